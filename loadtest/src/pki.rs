//! Certificates for kube-sim, the demo and the tests, made with rcgen.
//!
//! A Kubernetes cluster has several CAs: the serving CA (apiserver cert), the
//! client CA (x509 users: CN = username, O = groups), and the front-proxy
//! (requestheader) CA. [`Ca`] is one of them; it issues server and client
//! leaf certificates. Everything is in memory as PEM; callers write files
//! where a kubeconfig or a flag needs a path.
//!
//! Every key is ECDSA P-256, named explicitly: the demo's serving
//! certificate is what operators copy, and P-256 costs a quarter of
//! RSA-2048's CPU per handshake (`loadtest bench handshake`).
//!
//! rcgen's `DistinguishedName` holds one value per attribute type, but a
//! Kubernetes client certificate carries one O per group. So client
//! certificates are made by rcgen with a placeholder subject, then their
//! subject is replaced by one built here (one RDN per O, then the CN) and the
//! TBS certificate is signed again with the CA key ([`replace_subject`]).

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SigningKey,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// A failure to make a key or a certificate.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed")]
    Rcgen(#[from] rcgen::Error),
    #[error("invalid subject alternative name {0:?}")]
    BadName(String),
    #[error("malformed certificate DER from rcgen")]
    Der,
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
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
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
    /// one O per group (in order, before the CN, as kubeadm writes them).
    pub fn issue_client(&self, username: &str, groups: &[&str]) -> Result<CertPair, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, username);
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let pair = self.sign(params)?;
        let der =
            CertificateDer::from_pem_slice(pair.cert_pem.as_bytes()).map_err(|_| PkiError::Der)?;
        let subject = subject_der(username, groups);
        let der = replace_subject(&der, &subject, self.issuer.key())?;
        Ok(CertPair {
            cert_pem: pem_encode("CERTIFICATE", &der),
            key_pem: pair.key_pem,
        })
    }

    fn sign(&self, mut params: CertificateParams) -> Result<CertPair, PkiError> {
        set_validity(&mut params);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
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
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

/// The subject Name: one single-attribute RDN per group (O, UTF8String),
/// then the CN.
fn subject_der(username: &str, groups: &[&str]) -> Vec<u8> {
    // id-at-organizationName 2.5.4.10 and id-at-commonName 2.5.4.3.
    const O: &[u8] = &[0x06, 0x03, 0x55, 0x04, 0x0a];
    const CN: &[u8] = &[0x06, 0x03, 0x55, 0x04, 0x03];
    let rdn = |oid: &[u8], value: &str| {
        let mut atv = oid.to_vec();
        atv.extend(tlv(0x0c, value.as_bytes()));
        tlv(0x31, &tlv(0x30, &atv))
    };
    let mut rdns = Vec::new();
    for g in groups {
        rdns.extend(rdn(O, g));
    }
    rdns.extend(rdn(CN, username));
    tlv(0x30, &rdns)
}

/// Replaces the subject of a certificate and signs the new TBS with `key`
/// (the issuing CA's key, same algorithm as the original signature).
fn replace_subject(
    cert: &[u8],
    subject: &[u8],
    key: &impl SigningKey,
) -> Result<Vec<u8>, PkiError> {
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    let (outer, _) = read_tlv(cert)?;
    let parts = children(outer.content)?;
    let [tbs, alg, _sig] = parts.as_slice() else {
        return Err(PkiError::Der);
    };
    // TBSCertificate ::= SEQUENCE { [0] version, serial, signature, issuer,
    //   validity, subject, subjectPublicKeyInfo, [3] extensions }
    let fields = children(tbs.content)?;
    let subject_index = if fields.first().map(|f| f.tag) == Some(0xa0) {
        5
    } else {
        4
    };
    if fields.len() <= subject_index {
        return Err(PkiError::Der);
    }
    let mut tbs_content = Vec::with_capacity(tbs.content.len() + subject.len());
    for (i, f) in fields.iter().enumerate() {
        if i == subject_index {
            tbs_content.extend_from_slice(subject);
        } else {
            tbs_content.extend_from_slice(f.raw);
        }
    }
    let new_tbs = tlv(0x30, &tbs_content);
    let signature = key.sign(&new_tbs)?;
    let mut bits = vec![0u8]; // no unused bits
    bits.extend(signature);
    let mut body = new_tbs;
    body.extend_from_slice(alg.raw);
    body.extend(tlv(0x03, &bits));
    Ok(tlv(0x30, &body))
}

/// One DER element: its tag, its content and its whole encoding.
struct Tlv<'a> {
    tag: u8,
    content: &'a [u8],
    raw: &'a [u8],
}

/// Reads one element from the front of `buf`; returns it and the rest.
fn read_tlv(buf: &[u8]) -> Result<(Tlv<'_>, &[u8]), PkiError> {
    let (&tag, rest) = buf.split_first().ok_or(PkiError::Der)?;
    let (&first, rest) = rest.split_first().ok_or(PkiError::Der)?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err(PkiError::Der);
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return Err(PkiError::Der);
    }
    let header = buf.len() - rest.len();
    Ok((
        Tlv {
            tag,
            content: &rest[..len],
            raw: &buf[..header + len],
        },
        &rest[len..],
    ))
}

fn children(mut buf: &[u8]) -> Result<Vec<Tlv<'_>>, PkiError> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let (t, rest) = read_tlv(buf)?;
        out.push(t);
        buf = rest;
    }
    Ok(out)
}

/// A DER element with definite length.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// PEM with 64-column base64 lines.
fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
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

    #[test]
    fn client_certs_carry_one_o_per_group_and_verify_against_the_ca() {
        let ca = Ca::new("test-ca").expect("ca");
        let pair = ca.issue_client("alice", &["a", "b", "c"]).expect("client");
        let der = CertificateDer::from_pem_slice(pair.cert_pem.as_bytes()).expect("pem");
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parse");
        let orgs: Vec<&str> = cert
            .subject()
            .iter_organization()
            .map(|o| o.as_str().expect("utf8"))
            .collect();
        assert_eq!(orgs, ["a", "b", "c"]);
        let cn: Vec<&str> = cert
            .subject()
            .iter_common_name()
            .map(|o| o.as_str().expect("utf8"))
            .collect();
        assert_eq!(cn, ["alice"]);
        // The re-signed certificate still chains to the CA (webpki, as the
        // TLS server verifies it).
        let ca_der = CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).expect("ca pem");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_der.clone()).expect("root");
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            provider,
        )
        .build()
        .expect("verifier");
        verifier
            .verify_client_cert(&der, &[], rustls_pki_types::UnixTime::now())
            .expect("chains to the CA");
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).expect("ca parse");
        assert_eq!(cert.issuer(), ca_cert.subject());
    }

    #[test]
    fn a_client_cert_without_groups_has_only_a_cn() {
        let ca = Ca::new("test-ca").expect("ca");
        let pair = ca.issue_client("bob", &[]).expect("client");
        let der = CertificateDer::from_pem_slice(pair.cert_pem.as_bytes()).expect("pem");
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parse");
        assert_eq!(cert.subject().iter_organization().count(), 0);
        assert_eq!(cert.subject().to_string(), "CN=bob");
    }
}
