//! rustls configuration: the serving side (client TLS termination) and the
//! upstream side (the pooled client to the apiserver).
//!
//! Both sides offer ALPN `h2` and `http/1.1`. Client certificates are
//! optional on the serving side (token clients must still connect) and, when
//! a client CA is configured, verified against it. Only the `ring` provider is
//! used, named explicitly so that no other crate in the process can change it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A failure to load or assemble TLS material. Never carries key bytes.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path}: no certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: certificate rejected as a CA")]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS configuration")]
    Config(#[from] rustls::Error),
    #[error("client certificate verifier")]
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

/// Where the apiserver's CA and the proxy's own client certificate are.
#[derive(Debug, Clone, Default)]
pub struct UpstreamTls {
    /// CA bundle that signed the apiserver's serving certificate.
    pub ca: Option<PathBuf>,
    /// The proxy's own client certificate and key, if any.
    pub client_cert: Option<(PathBuf, PathBuf)>,
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

/// The serving side, reloadable: the certificate, its key and the client CA
/// are re-read together and swapped in atomically. Each new connection takes
/// the config current at its accept; open connections keep theirs.
pub struct ServerTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    current: ArcSwap<ServerConfig>,
}

impl ServerTls {
    pub fn new(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<ServerTls, TlsError> {
        Ok(ServerTls {
            cert: cert.to_owned(),
            key: key.to_owned(),
            client_ca: client_ca.map(Path::to_owned),
            current: ArcSwap::from_pointee(server_config(cert, key, client_ca)?),
        })
    }

    /// Re-reads the files; on any error the current config stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = server_config(&self.cert, &self.key, self.client_ca.as_deref())?;
        self.current.store(Arc::new(fresh));
        Ok(())
    }

    /// An acceptor for one new connection.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }

    /// The files this config is made of (for the file watcher).
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.cert.clone(), self.key.clone()];
        files.extend(self.client_ca.clone());
        files
    }
}

/// The proxy's own client certificate for the apiserver, reloadable: new
/// upstream connections present the latest one.
pub struct ClientCert {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
}

impl std::fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCert")
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

impl ClientCert {
    pub fn new(cert: &Path, key: &Path) -> Result<ClientCert, TlsError> {
        Ok(ClientCert {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: ArcSwap::from_pointee(certified_key(cert, key)?),
        })
    }

    /// Re-reads the files; on any error the current certificate stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.current
            .store(Arc::new(certified_key(&self.cert, &self.key)?));
        Ok(())
    }

    pub fn files(&self) -> Vec<PathBuf> {
        vec![self.cert.clone(), self.key.clone()]
    }
}

fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let key = provider().key_provider.load_private_key(load_key(key)?)?;
    Ok(CertifiedKey::new(load_certs(cert)?, key))
}

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn upstream_client_config(
    ca: Option<&Path>,
    client_cert: Option<Arc<ClientCert>>,
) -> Result<ClientConfig, TlsError> {
    let roots = match ca {
        Some(ca) => root_store(ca)?,
        None => RootCertStore::empty(),
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match client_cert {
        Some(resolver) => builder.with_client_cert_resolver(resolver),
        None => builder.with_no_client_auth(),
    })
}

/// A connector for an upstream client. With `h2`, ALPN offers h2 then
/// http/1.1 (against an apiserver many client streams then share few
/// connections); without, only http/1.1 — protocol upgrades (exec, attach,
/// port-forward) need an HTTP/1.1 connection of their own. `client_cert` is
/// what the connections present, if anything.
pub fn upstream_connector(
    ca: Option<&Path>,
    client_cert: Option<Arc<ClientCert>>,
    h2: bool,
) -> Result<HttpsConnector<HttpConnector>, TlsError> {
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(upstream_client_config(ca, client_cert)?)
        .https_only()
        .enable_http1();
    Ok(if h2 {
        builder.enable_http2().wrap_connector(http_connector())
    } else {
        builder.wrap_connector(http_connector())
    })
}

fn http_connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
    http.set_keepalive(Some(std::time::Duration::from_secs(30)));
    http
}
