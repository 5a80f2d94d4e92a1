//! Shared harness for the end-to-end tests: kube-sim and the proxy on
//! loopback (through `breakwater demo`'s own start-up), real HTTPS clients,
//! and kubectl.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod child;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use breakwater::config::{LimitsConfig, ProxyConfig};
use breakwater::demo::{Demo, DemoOptions};
use breakwater::identity::AuthConfig;
use breakwater::upstream::UpstreamConfig;
use breakwater_loadtest::sim::SimConfig;
use bytes::{Bytes, BytesMut};
use http::Response;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::pem::PemObject;
use serde_json::Value;

pub struct Env {
    pub demo: Demo,
    pub dir: tempfile::TempDir,
    pub cache: tempfile::TempDir,
}

/// kube-sim + proxy on free loopback ports, with kubeconfigs in a temp dir.
pub async fn demo_env() -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = tempfile::tempdir().expect("tempdir");
    let demo = Demo::start(&DemoOptions {
        dir: dir.path().to_path_buf(),
        port: 0,
        sim_port: 0,
        admin_port: 0,
        limits: None,
    })
    .await
    .expect("demo starts");
    Env { demo, dir, cache }
}

impl Env {
    pub fn proxy_url(&self) -> String {
        format!("https://{}", self.demo.proxy.addr())
    }

    /// Runs kubectl through the proxy with the demo kubeconfig.
    pub async fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_with(&self.demo.kubeconfig, args).await
    }

    /// Runs kubectl with the given kubeconfig, bounded to 60 s.
    pub async fn kubectl_with(&self, kubeconfig: &PathBuf, args: &[&str]) -> Output {
        let fut = kubectl_cmd(kubeconfig, self.cache.path())
            .args(args)
            .output();
        tokio::time::timeout(Duration::from_secs(60), fut)
            .await
            .expect("kubectl finished within 60 s")
            .expect("kubectl runs (is kubectl installed?)")
    }

    /// kubectl through the proxy that must succeed; returns stdout.
    pub async fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args).await;
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}\nstdout: {}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).expect("utf8 stdout")
    }
}

/// A passthrough proxy in front of `upstream`, verifying the demo's
/// ServiceAccount tokens locally, with the demo's serving certificate.
pub fn passthrough_config(env: &Env, upstream: String, grace: Duration) -> ProxyConfig {
    let dir = env.dir.path();
    ProxyConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        // Tests may also reach the proxy over plain HTTP on loopback.
        plain_listen: Some("127.0.0.1:0".parse().expect("addr")),
        privileged_listen: None,
        tls_cert: dir.join("proxy.crt"),
        tls_key: dir.join("proxy.key"),
        client_ca: None,
        upstream: UpstreamConfig::passthrough(upstream, Some(dir.join("kube-sim-ca.crt"))),
        auth: AuthConfig {
            service_account_key_files: vec![dir.join("sa.pub")],
            service_account_issuers: vec![SimConfig::default().issuer],
            ..AuthConfig::default()
        },
        admin_listen: "127.0.0.1:0".parse().expect("addr"),
        shutdown_grace: grace,
        limits: LimitsConfig::default(),
        watch: Default::default(),
        connections: Default::default(),
    }
}

/// A kubeconfig for `server` with either the admin certificate or a token.
pub fn write_kubeconfig(env: &Env, name: &str, server: &str, user: &str) -> PathBuf {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let path = env.dir.path().join(name);
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: u\n  user:\n    {user}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n",
        b64(&env.demo.proxy_ca_pem)
    );
    std::fs::write(&path, text).expect("write kubeconfig");
    path
}

pub fn kubectl_cmd(kubeconfig: &PathBuf, cache: &std::path::Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("kubectl");
    cmd.env("KUBECONFIG", kubeconfig)
        .env("KUBECACHEDIR", cache)
        .env("HOME", cache)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    cmd
}

pub type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// A TLS connector trusting `ca_pem`, offering only h2 or only HTTP/1.1.
pub fn https_connector(ca_pem: &str, h2: bool) -> hyper_rustls::HttpsConnector<HttpConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("ca pem")).expect("add ca");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    if h2 {
        b.enable_http2().build()
    } else {
        b.enable_http1().build()
    }
}

/// An HTTPS client trusting `ca_pem`, speaking only h2 or only HTTP/1.1.
pub fn https_client(ca_pem: &str, h2: bool) -> HttpsClient {
    let mut builder = Client::builder(TokioExecutor::new());
    if h2 {
        builder.http2_only(true);
    }
    builder.build(https_connector(ca_pem, h2))
}

/// A request body fed from a channel: the request stays open (and
/// unfinished) until the sender is dropped.
pub struct Rx(
    pub tokio::sync::mpsc::Receiver<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>,
);

impl futures_util::Stream for Rx {
    type Item = Result<hyper::body::Frame<Bytes>, std::convert::Infallible>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// A GET with a bearer token.
pub fn get(url: &str, token: &str) -> http::Request<Empty<Bytes>> {
    http::Request::get(url)
        .header("authorization", format!("Bearer {token}"))
        .body(Empty::new())
        .expect("request")
}

/// Reads newline-delimited frames (watch events) from a streaming body.
pub struct Lines {
    body: Incoming,
    buf: BytesMut,
}

impl Lines {
    pub fn new(body: Incoming) -> Lines {
        Lines {
            body,
            buf: BytesMut::new(),
        }
    }

    /// The next line, or None at a clean end of stream. Panics on a broken
    /// stream or after `within`.
    pub async fn next_within(&mut self, within: Duration) -> Option<String> {
        tokio::time::timeout(within, self.next())
            .await
            .expect("a line arrived in time")
    }

    pub async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(pos + 1);
                return Some(String::from_utf8_lossy(&line[..pos]).into_owned());
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(err)) => panic!("stream broke: {err}"),
                None => {
                    assert!(self.buf.is_empty(), "stream ended mid-line");
                    return None;
                }
            }
        }
    }
}

/// `(type, name, resourceVersion)` of a watch event line.
pub fn event_summary(line: &str) -> (String, String, String) {
    let v: serde_json::Value = serde_json::from_str(line).expect("event json");
    (
        v["type"].as_str().unwrap_or_default().to_string(),
        v["object"]["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        v["object"]["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

// ------------------------------------------------------------ watch tests

/// How long a watch test waits for an answer or an event.
pub const WAIT: Duration = Duration::from_secs(20);

/// Clients to the proxy and straight to kube-sim, with the demo's token.
pub struct Clients {
    pub proxy: HttpsClient,
    pub direct: HttpsClient,
    pub proxy_url: String,
    pub sim_url: String,
    pub token: String,
}

pub fn clients(env: &Env) -> Clients {
    let sim_ca = std::fs::read_to_string(env.dir.path().join("kube-sim-ca.crt")).expect("ca");
    Clients {
        proxy: https_client(&env.demo.proxy_ca_pem, true),
        direct: https_client(&sim_ca, true),
        proxy_url: env.proxy_url(),
        sim_url: env.demo.sim.url(),
        token: env.demo.token.clone(),
    }
}

impl Clients {
    async fn answer(&self, client: &HttpsClient, base: &str, pq: &str) -> Response<Incoming> {
        let resp = tokio::time::timeout(
            WAIT,
            client.request(get(&format!("{base}{pq}"), &self.token)),
        )
        .await
        .expect("answered in time")
        .expect("request");
        assert_eq!(resp.status(), 200, "{pq}");
        resp
    }

    pub async fn open(&self, client: &HttpsClient, base: &str, pq: &str) -> Lines {
        Lines::new(self.answer(client, base, pq).await.into_body())
    }

    /// A watch through the proxy.
    pub async fn watch(&self, pq: &str) -> Lines {
        self.open(&self.proxy, &self.proxy_url, pq).await
    }

    /// The same watch straight to kube-sim.
    pub async fn direct_watch(&self, pq: &str) -> Lines {
        self.open(&self.direct, &self.sim_url, pq).await
    }

    /// A JSON GET through `client` at `base`.
    pub async fn get_json_from(&self, client: &HttpsClient, base: &str, pq: &str) -> Value {
        let resp = self.answer(client, base, pq).await;
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        serde_json::from_slice(&body).expect("json")
    }

    /// A JSON GET through the proxy.
    pub async fn get_json(&self, pq: &str) -> Value {
        self.get_json_from(&self.proxy, &self.proxy_url, pq).await
    }
}

/// The next `n` events of a stream, parsed.
pub async fn take(lines: &mut Lines, n: usize) -> Vec<Value> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let line = lines
            .next_within(WAIT)
            .await
            .expect("an event, not the end");
        out.push(serde_json::from_str(&line).expect("event json"));
    }
    out
}

/// Waits (bounded) until the hub's accounting satisfies `cond`.
pub async fn until_stats(
    env: &Env,
    what: &str,
    cond: impl Fn(&breakwater::watch::HubStats) -> bool,
) {
    for _ in 0..2000 {
        if cond(&env.demo.proxy.watch_hub().stats()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: {:?}", env.demo.proxy.watch_hub().stats());
}

/// The proxy's Prometheus text from its admin listener.
pub async fn scrape(admin: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect admin");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    String::from_utf8_lossy(&buf).into_owned()
}

/// The sum of a counter's samples whose line contains every one of `labels`.
pub fn counter_sum(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ------------------------------------------------------------ limits

/// Writes via a rename, as editors and ConfigMap volumes do.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

pub async fn env_with_limits(text: &str) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = tempfile::tempdir().expect("tempdir");
    let limits_dir = dir.path().join("limits");
    std::fs::create_dir_all(&limits_dir).expect("mkdir");
    let file = limits_dir.join("limits.yaml");
    write_atomically(&file, text);
    let demo = Demo::start(&DemoOptions {
        dir: dir.path().to_path_buf(),
        port: 0,
        sim_port: 0,
        admin_port: 0,
        limits: Some(file),
    })
    .await
    .expect("demo starts");
    Env { demo, dir, cache }
}

/// The token of ServiceAccount demo/viewer (from its kubeconfig).
pub fn viewer_token(env: &Env) -> String {
    let text = std::fs::read_to_string(&env.demo.kubeconfig_viewer).expect("viewer kubeconfig");
    text.lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .expect("token line")
        .to_string()
}

// ------------------------------------------------------------ exec

/// An exec of `echo hi` in `pod` (namespace demo) over WebSocket
/// (`v5.channel.k8s.io`), through the plain loopback listener at `plain`,
/// upgraded and spliced; returns the session once its stdout (`hi`) has
/// arrived. kube-sim then sends the status and its close and waits 10 s for
/// the client's close: until the client reads on, the splice stays open.
pub async fn exec_echo_hi(
    plain: std::net::SocketAddr,
    token: &str,
    pod: &str,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let mut req = format!(
        "ws://{plain}/api/v1/namespaces/demo/pods/{pod}/exec?command=echo&command=hi&stdout=true"
    )
    .into_client_request()
    .expect("ws request");
    let h = req.headers_mut();
    h.insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    h.insert(
        "sec-websocket-protocol",
        http::HeaderValue::from_static("v5.channel.k8s.io"),
    );
    let tcp = tokio::net::TcpStream::connect(plain)
        .await
        .expect("connect");
    let (mut exec, _) = tokio_tungstenite::client_async(req, tcp)
        .await
        .expect("exec upgraded");
    match exec.next().await {
        Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], b"\x01hi\n"),
        other => panic!("exec stdout: {other:?}"),
    }
    exec
}
