//! rustls configuration: the serving side (client TLS termination) and the
//! upstream side (the pooled client to the apiserver).
//!
//! Both sides offer ALPN `h2` and `http/1.1`. Client certificates are
//! optional on the serving side (token clients must still connect) and, when
//! a client CA is configured, verified against it. Only the `ring` provider is
//! used, named explicitly so that no other crate in the process can change it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A failure to load or assemble TLS material. Never carries key bytes.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path}: no certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: certificate rejected as a CA: {source}")]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The crypto provider every config here uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn root_store(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: ca.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

/// ALPN protocols in preference order.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The serving config: our certificate, ALPN h2 + http/1.1, and optional
/// client-certificate verification against `client_ca`.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerConfig, TlsError> {
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(ca)?), provider())
                    .allow_unauthenticated()
                    .build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(load_certs(cert)?, load_key(key)?)?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// What the proxy presents to the apiserver.
#[derive(Debug, Clone, Default)]
pub struct UpstreamTls {
    /// CA bundle that signed the apiserver's serving certificate.
    pub ca: Option<PathBuf>,
    /// The proxy's own client certificate and key, if any.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

fn upstream_client_config(tls: &UpstreamTls) -> Result<ClientConfig, TlsError> {
    let roots = match &tls.ca {
        Some(ca) => root_store(ca)?,
        None => RootCertStore::empty(),
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match &tls.client_cert {
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
        None => builder.with_no_client_auth(),
    })
}

/// A connector for the pooled upstream client: ALPN h2 then http/1.1, so
/// that against an apiserver many client streams share few connections.
pub fn upstream_connector(tls: &UpstreamTls) -> Result<HttpsConnector<HttpConnector>, TlsError> {
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(upstream_client_config(tls)?)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http_connector()))
}

/// A connector offering only http/1.1: protocol upgrades (exec, attach,
/// port-forward) need an HTTP/1.1 connection of their own.
pub fn upgrade_connector(tls: &UpstreamTls) -> Result<HttpsConnector<HttpConnector>, TlsError> {
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(upstream_client_config(tls)?)
        .https_only()
        .enable_http1()
        .wrap_connector(http_connector()))
}

fn http_connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
    http.set_keepalive(Some(std::time::Duration::from_secs(30)));
    http
}
