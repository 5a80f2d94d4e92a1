//! Shared harness for kube-sim's HTTP-level tests: a seeded kube-sim on
//! 127.0.0.1:0 and TLS connectors that trust it.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::sync::Arc;

use breakwater_loadtest::pki::CertPair;
use breakwater_loadtest::sim::{KubeSim, SimConfig, SimPki, seed_demo};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// kube-sim with fresh certificates and the demo seed.
pub async fn start_with(cfg: SimConfig) -> KubeSim {
    let pki = SimPki::generate(&["127.0.0.1", "localhost"]).expect("pki");
    let sim = KubeSim::start(cfg, pki).await.expect("start");
    seed_demo(sim.store()).expect("seed");
    sim
}

/// kube-sim with the default configuration.
pub async fn start() -> KubeSim {
    start_with(SimConfig::default()).await
}

/// A connector trusting `sim`'s serving CA, presenting `cert` (or nothing),
/// offering only h2 or only HTTP/1.1.
pub fn connector(
    sim: &KubeSim,
    cert: Option<&CertPair>,
    h2: bool,
) -> HttpsConnector<HttpConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(sim.pki().serving_ca.cert_pem().as_bytes()) {
        roots.add(c.expect("ca pem")).expect("add root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let tls = match cert {
        Some(pair) => {
            let certs = CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("cert pem");
            let key = PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes()).expect("key pem");
            builder
                .with_client_auth_cert(certs, key)
                .expect("client auth")
        }
        None => builder.with_no_client_auth(),
    };
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    if h2 {
        b.enable_http2().build()
    } else {
        b.enable_http1().build()
    }
}
