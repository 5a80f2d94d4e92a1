//! Benchmarks: the pieces every benchmark shares.
//!
//! Each benchmark runs its baseline in the same process and the same run
//! (see BENCHMARKS.md): the machines are shared and noisy, so only ratios
//! between figures taken side by side mean much. This module holds the load
//! generator's client side — TLS config, keep-alive HTTP/1.1 and multiplexed
//! HTTP/2 connections made directly with hyper over tokio-rustls (no pool, so
//! we control exactly how many connections exist) — and the latency figures
//! derived from an HDR histogram.
//!
//! Benchmarks:
//! - [`overhead`]: unary GET latency and throughput through breakwater vs direct
//!   (and vs nginx, [`nginx`], with `--with-nginx`).

pub mod external;
pub mod fanout;
pub mod go_upstream;
pub mod handshake;
pub mod memory;
pub mod nginx;
pub mod overhead;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::error::Chain;

/// A failure of the load generator's client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad CA certificate PEM")]
    Pem(#[from] rustls::pki_types::pem::Error),
    #[error("TLS configuration")]
    Tls(#[from] rustls::Error),
    #[error("connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} negotiated ALPN {got:?}, the benchmark asked for {wanted}")]
    Alpn {
        addr: SocketAddr,
        wanted: &'static str,
        got: Option<String>,
    },
    #[error("HTTP")]
    Http(#[from] hyper::Error),
}

/// The HTTP version a benchmark client speaks (chosen by ALPN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http1,
    Http2,
    /// HTTP/1.1 without TLS, on breakwater's loopback `--plain-listen`.
    PlainHttp1,
}

impl Protocol {
    fn alpn(self) -> &'static str {
        match self {
            Protocol::Http1 | Protocol::PlainHttp1 => "http/1.1",
            Protocol::Http2 => "h2",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Http1 => "HTTP/1.1",
            Protocol::Http2 => "HTTP/2",
            Protocol::PlainHttp1 => "plain HTTP/1.1",
        })
    }
}

/// A rustls client config trusting exactly the given CA certificates (PEM),
/// offering only `proto` by ALPN so the server cannot silently pick the other.
pub fn client_tls(
    ca_pems: &[&str],
    proto: Protocol,
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    for pem in ca_pems {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert?)?;
        }
    }
    // An explicit provider: the process default is ambiguous when a dependency
    // enables a second rustls backend.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![proto.alpn().as_bytes().to_vec()];
    Ok(Arc::new(cfg))
}

/// Where and how to connect: everything a client needs to (re)connect.
#[derive(Clone)]
pub struct Connector {
    pub addr: SocketAddr,
    pub tls: Arc<rustls::ClientConfig>,
    pub proto: Protocol,
    /// The name the server's certificate must carry; `None`: `addr`'s IP.
    pub server_name: Option<ServerName<'static>>,
}

impl Connector {
    /// One TLS connection with the negotiated protocol checked. The connection
    /// driver runs on a spawned task and ends when every sender is dropped.
    pub async fn connect(&self) -> Result<Conn, ClientError> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: self.addr,
                source,
            })?;
        // Latency benchmarks must not measure Nagle's algorithm.
        tcp.set_nodelay(true)
            .map_err(|source| ClientError::Connect {
                addr: self.addr,
                source,
            })?;
        if self.proto == Protocol::PlainHttp1 {
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %Chain(&e), "benchmark plain h1 connection ended");
                }
            });
            return Ok(Conn::H1(sender));
        }
        let name = self
            .server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(self.addr.ip().into()));
        let tls = TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|source| ClientError::Connect {
                addr: self.addr,
                source,
            })?;
        let got = tls
            .get_ref()
            .1
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        if got.as_deref() != Some(self.proto.alpn()) {
            return Err(ClientError::Alpn {
                addr: self.addr,
                wanted: self.proto.alpn(),
                got,
            });
        }
        let io = TokioIo::new(tls);
        match self.proto {
            Protocol::Http1 | Protocol::PlainHttp1 => {
                let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %Chain(&e), "benchmark h1 connection ended");
                    }
                });
                Ok(Conn::H1(sender))
            }
            Protocol::Http2 => {
                let (sender, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %Chain(&e), "benchmark h2 connection ended");
                    }
                });
                Ok(Conn::H2(sender))
            }
        }
    }
}

/// One client connection. An h2 connection is shared between clients with
/// [`Conn::share`], which multiplexes their requests as streams.
pub enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Conn {
    /// Sends one request when the connection is ready for it.
    pub async fn send(
        &mut self,
        req: http::Request<Empty<Bytes>>,
    ) -> Result<http::Response<Incoming>, hyper::Error> {
        match self {
            Conn::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            Conn::H2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }

    /// Another handle on the same connection: `Some` for HTTP/2 (streams are
    /// multiplexed), `None` for HTTP/1.1 (one request at a time per connection).
    pub fn share(&self) -> Option<Conn> {
        match self {
            Conn::H1(_) => None,
            Conn::H2(s) => Some(Conn::H2(s.clone())),
        }
    }

    /// The form of request URI this protocol wants: origin-form (`/path`) plus a
    /// Host header for HTTP/1.1, absolute (`https://host/path`, giving the
    /// :scheme and :authority pseudo-headers) for HTTP/2.
    pub fn request_uri(&self, addr: SocketAddr, path_and_query: &str) -> String {
        match self {
            Conn::H1(_) => path_and_query.to_string(),
            Conn::H2(_) => format!("https://{addr}{path_and_query}"),
        }
    }
}

/// A new latency histogram in microseconds: 1 µs to 60 s, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds are valid")
}

/// Latency and throughput of one measured phase against one target.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    /// What was measured, e.g. "direct" or "breakwater".
    pub target: String,
    /// Requests completed inside the measured window (successes and errors).
    pub requests: u64,
    /// Requests that failed: non-2xx answers and transport errors.
    pub errors: u64,
    /// Length of the measured window (after warm-up), seconds.
    pub seconds: f64,
    /// Completed requests per second.
    pub rps: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// CPU time per completed request, µs, by process ("breakwater",
    /// "loadtest" = kube-sim + clients), over the measured window. Less noisy
    /// than latency on a shared machine: it is what the process itself spent.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub cpu_us_per_request: BTreeMap<String, f64>,
}

impl Figures {
    /// Figures from a merged histogram of successful requests.
    pub fn new(
        target: &str,
        hist: &Histogram<u64>,
        requests: u64,
        errors: u64,
        seconds: f64,
    ) -> Figures {
        Figures {
            target: target.to_string(),
            requests,
            errors,
            seconds,
            rps: if seconds > 0.0 {
                requests as f64 / seconds
            } else {
                0.0
            },
            p50_us: hist.value_at_quantile(0.50),
            p90_us: hist.value_at_quantile(0.90),
            p99_us: hist.value_at_quantile(0.99),
            p999_us: hist.value_at_quantile(0.999),
            max_us: hist.max(),
            cpu_us_per_request: BTreeMap::new(),
        }
    }

    /// Errors as a fraction of requests (0 when nothing ran).
    pub fn error_fraction(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

/// CPU time (user + system, all threads) a process has used so far, from
/// `/proc/PID/stat`; `pid` None = this process. `None` if unreadable (not
/// Linux, process gone). Resolution is one clock tick (usually 10 ms).
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // Field 2 (comm) may contain spaces and parentheses; everything after the
    // last ')' is space-separated, starting with field 3 (state).
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. indexes 11 and 12 here.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks_per_second())
}

/// CPU time of process `pid` and of its direct children (nginx's master
/// and its workers): the same `/proc/PID/stat` figure as [`cpu_seconds`],
/// summed. A child's time is only in its parent's `cutime` once it has
/// been reaped, so the children are read one by one. `None` if `pid`'s
/// own figure cannot be read.
pub fn cpu_seconds_tree(pid: u32) -> Option<f64> {
    let own = cpu_seconds(Some(pid))?;
    let children: f64 = children_of(pid)
        .into_iter()
        .filter_map(|c| cpu_seconds(Some(c)))
        .sum();
    Some(own + children)
}

/// Pids whose parent is `pid`, from `/proc/*/stat` (field 4, ppid).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = &stat[stat.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// `getconf CLK_TCK` (no libc here); 100, the Linux default, if that fails.
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// Microseconds in a human unit for tables: "842µs", "1.27ms", "2.10s".
pub fn fmt_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.2}ms", us as f64 / 1_000.0)
    } else {
        format!("{:.2}s", us as f64 / 1_000_000.0)
    }
}

/// A GET of `path` on `conn` with a bearer `auth` header, as the benchmark
/// clients send it (built from shared header values: cheap clones).
pub(crate) fn get_request(
    conn: &Conn,
    connector: &Connector,
    path: &str,
    auth: &http::HeaderValue,
    agent: &'static str,
) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    use http::HeaderValue;
    use http::header::{ACCEPT, AUTHORIZATION, HOST, USER_AGENT};
    let mut b = http::Request::builder()
        .method(http::Method::GET)
        .uri(conn.request_uri(connector.addr, path))
        .header(AUTHORIZATION, auth.clone())
        .header(ACCEPT, HeaderValue::from_static("application/json"))
        .header(USER_AGENT, HeaderValue::from_static(agent));
    if matches!(conn, Conn::H1(_)) {
        b = b.header(HOST, connector.addr.to_string());
    }
    b.body(http_body_util::Empty::new())
        .expect("static request parts are valid")
}

/// The first file named `name` in a `PATH` directory, else in one of
/// `also` (where distributions install what is not on a user's `PATH`).
pub(crate) fn find_program(name: &str, also: &[&str]) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(also.iter().map(std::path::PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A private temporary directory for a benchmark's certificate files,
/// removed when dropped.
pub struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    pub fn new() -> std::io::Result<ScratchDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir =
            std::env::temp_dir().join(format!("breakwater-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(ScratchDir(dir))
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    pub fn write(&self, name: &str, contents: &str) -> std::io::Result<std::path::PathBuf> {
        let p = self.0.join(name);
        std::fs::write(&p, contents)?;
        Ok(p)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_take_percentiles_from_the_histogram() {
        let mut h = latency_histogram();
        for us in 1..=1000u64 {
            h.record(us).expect("in range");
        }
        let f = Figures::new("direct", &h, 1000, 1, 2.0);
        assert_eq!(f.rps, 500.0);
        assert!((499..=501).contains(&f.p50_us), "{}", f.p50_us);
        assert!((989..=991).contains(&f.p99_us), "{}", f.p99_us);
        assert_eq!(f.max_us, 1000);
        assert!((f.error_fraction() - 0.001).abs() < 1e-12);
    }

    #[test]
    fn cpu_time_of_this_process_grows_with_work() {
        let before = cpu_seconds(None).expect("readable on Linux");
        let mut x = 0u64;
        let start = std::time::Instant::now();
        // Bounded busy loop: ~50 ms of CPU, enough for several clock ticks.
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let after = cpu_seconds(None).expect("readable on Linux");
        assert!(after > before, "{before} -> {after}");
    }

    #[test]
    fn a_process_tree_counts_its_children() {
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("read _")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("sh runs");
        let me = std::process::id();
        assert!(children_of(me).contains(&child.id()));
        assert!(!children_of(child.id()).contains(&me));
        assert!(cpu_seconds_tree(me).is_some());
        drop(child.stdin.take());
        child.wait().expect("sh exits once its stdin closes");
    }

    #[test]
    fn microseconds_print_in_a_readable_unit() {
        assert_eq!(fmt_us(842), "842µs");
        assert_eq!(fmt_us(1_270), "1.27ms");
        assert_eq!(fmt_us(2_100_000), "2.10s");
    }
}
