//! Shared harness for kube-sim's HTTP-level tests: a seeded kube-sim on
//! 127.0.0.1:0, TLS connectors that trust it, and a raw HTTP/2 connection.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::sync::Arc;

use breakwater_loadtest::pki::CertPair;
use breakwater_loadtest::sim::{KubeSim, SimConfig, SimPki, seed_demo};
use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http2;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

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

/// A rustls client config trusting `sim`'s serving CA and presenting `cert`
/// (or nothing); no ALPN, the caller picks the protocols.
pub fn client_tls(sim: &KubeSim, cert: Option<&CertPair>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(sim.pki().serving_ca.cert_pem().as_bytes()) {
        roots.add(c.expect("ca pem")).expect("add root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    match cert {
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
    }
}

/// A connector trusting `sim`'s serving CA, presenting `cert` (or nothing),
/// offering only h2 or only HTTP/1.1.
pub fn connector(
    sim: &KubeSim,
    cert: Option<&CertPair>,
    h2: bool,
) -> HttpsConnector<HttpConnector> {
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_tls(sim, cert))
        .https_only();
    if h2 {
        b.enable_http2().build()
    } else {
        b.enable_http1().build()
    }
}

/// The IO of a raw connection to kube-sim: TLS over TCP.
pub type TlsIo = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// ONE HTTP/2 connection to `sim` over TLS (ALPN h2), presenting `cert` (or
/// nothing), with no pool behind it: every request sent on the returned
/// handle shares the connection, as with a proxy that multiplexes all its
/// traffic upstream. The caller drives the connection (spawn or poll it).
pub async fn h2_connect(
    sim: &KubeSim,
    cert: Option<&CertPair>,
) -> (
    http2::SendRequest<Full<Bytes>>,
    http2::Connection<TlsIo, Full<Bytes>, TokioExecutor>,
) {
    let mut tls = client_tls(sim, cert);
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(sim.addr())
        .await
        .expect("connect to kube-sim");
    let name = ServerName::IpAddress(sim.addr().ip().into());
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .expect("TLS handshake with kube-sim");
    assert_eq!(
        stream.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "kube-sim negotiates h2"
    );
    http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .expect("HTTP/2 handshake with kube-sim")
}

// ---------------------------------------------------------------- kubectl

/// kubectl is an external tool: without it the kubectl tests have nothing
/// to drive and say so instead of failing (`.ci/run` requires it).
pub fn kubectl_available() -> bool {
    let ok = std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("kubectl not found on PATH; skipping");
    }
    ok
}

/// A kube-sim and a kubeconfig for its admin in a private temp dir
/// (removed on drop), for driving it with real kubectl.
pub struct Kubectl {
    pub sim: KubeSim,
    pub dir: std::path::PathBuf,
}

impl Drop for Kubectl {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Kubectl {
    /// Writes the admin kubeconfig for `sim` into a fresh temp dir named
    /// after `prefix`.
    pub fn new(sim: KubeSim, prefix: &str) -> Kubectl {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let admin = sim.pki().admin_client().expect("admin cert");
        let dir = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).expect("write");
            p
        };
        let ca = write("ca.crt", sim.pki().serving_ca.cert_pem());
        let cert = write("admin.crt", &admin.cert_pem);
        let key = write("admin.key", &admin.key_pem);
        write(
            "kubeconfig",
            &format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: sim\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: admin\n  user:\n    client-certificate: {}\n    client-key: {}\ncontexts:\n- name: sim\n  context: {{cluster: sim, user: admin}}\ncurrent-context: sim\n",
                sim.url(),
                ca.display(),
                cert.display(),
                key.display()
            ),
        );
        Kubectl { sim, dir }
    }

    /// `kubectl ARGS` with this kubeconfig and a private cache and HOME.
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("kubectl");
        c.arg("--kubeconfig")
            .arg(self.dir.join("kubeconfig"))
            .arg("--cache-dir")
            .arg(self.dir.join("cache"))
            .args(args)
            .env("HOME", &self.dir)
            .kill_on_drop(true)
            .stdin(std::process::Stdio::null());
        c
    }

    /// Runs kubectl (at most 60 s): (success, stdout, stderr).
    pub async fn try_run(&self, args: &[&str]) -> (bool, String, String) {
        let out = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            self.command(args).output(),
        )
        .await
        .expect("kubectl finishes within 60s")
        .expect("kubectl runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs kubectl, which must succeed: (stdout, stderr).
    pub async fn run(&self, args: &[&str]) -> (String, String) {
        let (ok, stdout, stderr) = self.try_run(args).await;
        assert!(ok, "kubectl {args:?} failed: {stderr}\n{stdout}");
        (stdout, stderr)
    }

    /// Starts a long-running kubectl (`get … -w`) whose stdout is read line
    /// by line.
    pub fn spawn_lines(&self, args: &[&str]) -> KubectlLines {
        use tokio::io::AsyncBufReadExt;
        let mut child = self
            .command(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        let out = child.stdout.take().expect("stdout");
        KubectlLines {
            child,
            lines: tokio::io::BufReader::new(out).lines(),
        }
    }

    /// Writes `text` to `name` in the temp dir.
    pub fn file(&self, name: &str, text: &str) -> std::path::PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }
}

/// A running kubectl's stdout, a line at a time (killed on drop).
pub struct KubectlLines {
    pub child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl KubectlLines {
    /// The next line, within 30 s; kubectl must still be running.
    pub async fn next(&mut self) -> String {
        tokio::time::timeout(std::time::Duration::from_secs(30), self.lines.next_line())
            .await
            .expect("a line within 30s")
            .expect("read")
            .expect("kubectl still running")
    }
}

/// The `breakwater` binary for tests that run it as a child: next to the
/// test executable (`cargo test --workspace` builds it first) or
/// `$BREAKWATER_BIN`; on a fresh `cargo test -p breakwater-loadtest` it is
/// built once, bounded in time, with a clear failure if that fails.
pub fn breakwater_bin() -> std::path::PathBuf {
    static BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = breakwater_loadtest::proc::find_breakwater(None) {
            return p;
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut child = std::process::Command::new(cargo)
            .args(["build", "-p", "breakwater"])
            .spawn()
            .expect("run cargo build -p breakwater");
        // Bounded: a build that waits on a lock forever must not hang the test.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        loop {
            if let Some(status) = child.try_wait().expect("wait for cargo") {
                assert!(status.success(), "cargo build -p breakwater failed");
                break;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("cargo build -p breakwater took over 300 s; build it first");
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        breakwater_loadtest::proc::find_breakwater(None).unwrap_or_else(|e| panic!("{e}"))
    })
    .clone()
}
