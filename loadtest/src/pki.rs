//! Certificates for kube-sim, the demo and the tests, made with rcgen.
//!
//! A Kubernetes cluster has several CAs: the serving CA (apiserver cert), the
//! client CA (x509 users: CN = username, O = groups), and the front-proxy
//! (requestheader) CA. [`Ca`] is one of them; it issues server and client
//! leaf certificates. Everything is in memory as PEM; callers write files
//! where a kubeconfig or a flag needs a path.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// A failure to make a key or a certificate.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("invalid subject alternative name {0:?}")]
    BadName(String),
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A self-signed certificate authority that issues leaf certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// A new CA whose subject CN is `common_name` (ECDSA P-256, 10 years).
    pub fn new(common_name: &str) -> Result<Ca, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok(Ca {
            issuer: Issuer::new(params, key),
            cert_pem,
        })
    }

    /// The CA certificate, PEM (what clients put in `certificate-authority-data`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A serving certificate for the given DNS names and IP addresses.
    pub fn issue_server(&self, names: &[&str]) -> Result<CertPair, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("localhost"),
        );
        params.distinguished_name = dn;
        params.subject_alt_names = names
            .iter()
            .map(|n| san(n))
            .collect::<Result<Vec<_>, _>>()?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate in the Kubernetes x509 convention: CN = username,
    /// one O per group.
    pub fn issue_client(&self, username: &str, groups: &[&str]) -> Result<CertPair, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        for g in groups {
            dn.push(DnType::OrganizationName, *g);
        }
        dn.push(DnType::CommonName, username);
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, mut params: CertificateParams) -> Result<CertPair, PkiError> {
        set_validity(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A fresh ECDSA P-256 key pair as PKCS#8 PEM (private) and SPKI PEM (public),
/// e.g. for signing ServiceAccount tokens.
pub fn signing_key_pem() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

fn san(name: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let dns = name
        .to_string()
        .try_into()
        .map_err(|_| PkiError::BadName(name.to_string()))?;
    Ok(SanType::DnsName(dns))
}

fn set_validity(params: &mut CertificateParams) {
    // Backdate an hour so small clock differences never make a fresh cert
    // "not yet valid".
    let now = std::time::SystemTime::now();
    let start = now - std::time::Duration::from_secs(3600);
    let end = now + std::time::Duration::from_secs(10 * 365 * 24 * 3600);
    params.not_before = start.into();
    params.not_after = end.into();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certs_are_pem() {
        let ca = Ca::new("test-ca").expect("ca");
        let server = ca
            .issue_server(&["localhost", "127.0.0.1"])
            .expect("server");
        let client = ca
            .issue_client("alice", &["system:masters"])
            .expect("client");
        for pem in [
            &server.cert_pem,
            &client.cert_pem,
            &ca.cert_pem().to_string(),
        ] {
            assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        }
        assert!(client.key_pem.contains("PRIVATE KEY"));
    }
}
