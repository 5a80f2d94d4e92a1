//! The overhead benchmark: what does putting breakwater in front of the
//! apiserver cost a plain unary GET?
//!
//! One process starts kube-sim (with one ConfigMap, `default/bench`) and the
//! real `breakwater` binary as a child in front of it. N keep-alive TLS
//! clients then GET that ConfigMap in a loop, authenticated with a
//! ServiceAccount bearer token (which the proxy forwards upstream as is, so the
//! same token works both ways): first straight to kube-sim (the baseline), then
//! through breakwater, alternating for several rounds so both see the same
//! machine noise; the best round of each is reported with the ratios
//! proxy/direct. Each phase connects all clients first, then runs a warm-up
//! whose requests are not recorded, then the measured window.
//!
//! kube-sim runs on a runtime of its own, one worker per core
//! ([`OverheadOpts::sim_threads`]), as an apiserver is a process of its
//! own. On the clients' runtime (`--sim-threads 0`, every figure before
//! session 20) one worker ended up running both the clients' and kube-sim's
//! chains while the other slept, and a proxy that answered from the other
//! core found the bench idle a sixth of the time (docs/benchmarks.md §1m).
//!
//! HTTP/1.1: one connection per client, one request at a time (like wrk).
//! HTTP/2: a few connections, the clients' requests multiplexed over them
//! (like h2load, or client-go sharing one connection).
//!
//! With `--with-nginx` ([`OverheadOpts::with_nginx`]) nginx, configured by
//! [`super::nginx`] as a TLS reverse proxy with upstream keepalive, is a
//! third target in every round (direct, breakwater, nginx), under the same
//! clients and phases; its CPU per request is its master's and workers'.
//!
//! With `--load-generator wrk|h2load` ([`OverheadOpts::load_generator`]) the
//! requests come from wrk or h2load instead of the bench's own clients
//! ([`super::external`]): the tools an operator, or a check against a real
//! apiserver, would use.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Empty};
use rustls::pki_types::ServerName;
use serde::Serialize;
use serde_json::json;

use super::external::{self, LoadGenerator};
use super::go_upstream::{self, GoUpstream, GoUpstreamConfig};
use super::nginx::{self, NginxConfig, NginxProcess};
use super::{
    ClientError, Conn, Connector, Figures, Protocol, ScratchDir, client_tls, cpu_seconds,
    cpu_seconds_tree, fmt_us, latency_histogram,
};
use crate::error::Chain;
use crate::pki::Ca;
use crate::proc::{BreakwaterProcess, RunArgs, StartOptions, StderrMode, find_breakwater};
use crate::sim::resources;
use crate::sim::store::StoreError;
use crate::sim::{KubeSim, SimConfig, SimPki};

/// The path every client GETs.
pub const BENCH_PATH: &str = "/api/v1/namespaces/default/configmaps/bench";

/// Key of the proxy child's CPU use in [`Figures::cpu_us_per_request`].
pub const PROXY_CPU: &str = "breakwater";
/// Key of this process's CPU use (kube-sim + the clients).
pub const LOADTEST_CPU: &str = "loadtest";
/// Key of nginx's CPU use (master + workers), and its phases' target.
pub const NGINX: &str = "nginx";
/// Key of the Go stand-in upstream's CPU use (`--upstream go`).
pub const UPSTREAM_CPU: &str = "upstream";

/// What the benchmark's clients and proxies talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamKind {
    /// kube-sim, with its Go-like transport ([`crate::sim::transport`]).
    KubeSim,
    /// kube-sim with hyper's own transport.
    KubeSimHyper,
    /// A Go `net/http` stand-in ([`go_upstream`]), when `go` is installed.
    Go,
    /// An apiserver of the operator's ([`OverheadOpts::external`]).
    External,
}

/// An apiserver the operator runs (`--upstream-url`): the bench GETs `path`
/// from it with one bearer token, directly, through breakwater and (with
/// `--with-nginx`) through nginx, all on this machine. This is the issue's
/// real check as one command.
#[derive(Debug, Clone)]
pub struct ExternalUpstream {
    /// `https://host[:port]`; breakwater gets it as `--upstream`, and the
    /// clients verify the certificate for `host` (a name or an IP address).
    pub url: String,
    /// PEM of the CA that signed the apiserver's serving certificate.
    pub ca_file: PathBuf,
    /// A file holding the bearer token every client sends.
    pub token_file: PathBuf,
    /// What every client GETs, e.g. one pod.
    pub path: String,
    /// The name nginx verifies (`proxy_ssl_name`; nginx checks DNS names
    /// only). `None`: the URL's host, or for an IP address `kubernetes`,
    /// which every apiserver serving certificate carries.
    pub nginx_server_name: Option<String>,
    /// The apiserver's process, when it runs on this machine: its CPU per
    /// request is then reported ("upstream").
    pub pid: Option<u32>,
}

/// Errors above this fraction of requests fail the benchmark.
pub const MAX_ERROR_FRACTION: f64 = 0.001;

/// Options of [`run_overhead`].
#[derive(Debug, Clone)]
pub struct OverheadOpts {
    /// Concurrent clients (each with one request in flight).
    pub clients: usize,
    /// Measured window per phase.
    pub duration: Duration,
    /// Unrecorded warm-up before each measured window.
    pub warmup: Duration,
    pub protocol: Protocol,
    /// HTTP/2 only: connections the clients' streams are spread over.
    pub h2_connections: usize,
    /// Rounds of (direct, proxy); the best phase of each target is reported.
    pub rounds: usize,
    /// Upper bound on requests per phase (warm-up included), besides time;
    /// the bench's own clients only (wrk and h2load run for the duration).
    pub max_requests: u64,
    /// The breakwater binary; `None` = [`find_breakwater`]'s search.
    pub breakwater: Option<PathBuf>,
    /// Log filter for the proxy child (`BREAKWATER_LOG`). Default "warn": the
    /// per-request access log would otherwise be part of what is measured
    /// (pass "info" to measure it; nginx then logs each request too).
    pub proxy_log: String,
    /// Show the proxy's logs instead of keeping them for error messages.
    pub proxy_stderr: StderrMode,
    /// nginx as a third target in each round (`--with-nginx`).
    pub with_nginx: bool,
    /// The nginx binary; `None` = [`nginx::find_nginx`]'s search.
    pub nginx: Option<PathBuf>,
    /// The upstream: kube-sim (Go-like or hyper transport) or the Go
    /// stand-in (`External` goes with [`OverheadOpts::external`]).
    pub upstream: UpstreamKind,
    /// The apiserver to measure against instead of kube-sim.
    pub external: Option<ExternalUpstream>,
    /// More `breakwater run` arguments, e.g. `--upstream-token-file F` or
    /// `--service-account-key-file F --service-account-issuer I` in front of
    /// an apiserver without SelfSubjectReview (before 1.27), or
    /// `--upstream-unary-protocol http2`.
    pub breakwater_args: Vec<std::ffi::OsString>,
    /// Who sends the requests: the bench's own clients, wrk or h2load.
    pub load_generator: LoadGenerator,
    /// About how large the GET's answer is, in bytes (the ConfigMap's data
    /// is padded to it). The default, ~1.4 KiB, is the size of all figures
    /// before session 15; a pod, what the issue's real check GETs, is 3–6
    /// KiB, and past 2 KiB Go's HTTP/1.1 server (so the apiserver, the Go
    /// stand-in and kube-sim) answers chunked.
    pub object_bytes: usize,
    /// kube-sim's own worker threads: it runs on a runtime of its own, as
    /// an apiserver is a process of its own (Go runs one thread per core).
    /// 0: on the clients' runtime, the shape of every figure before
    /// session 20 (docs/benchmarks.md §1m).
    pub sim_threads: usize,
}

impl Default for OverheadOpts {
    fn default() -> Self {
        OverheadOpts {
            clients: 64,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            protocol: Protocol::Http1,
            h2_connections: 4,
            rounds: 2,
            max_requests: 20_000_000,
            breakwater: None,
            proxy_log: "warn".to_string(),
            proxy_stderr: StderrMode::Capture,
            with_nginx: false,
            nginx: None,
            upstream: UpstreamKind::KubeSim,
            external: None,
            breakwater_args: Vec::new(),
            load_generator: LoadGenerator::Loadtest,
            object_bytes: DEFAULT_OBJECT_BYTES,
            sim_threads: default_sim_threads(),
        }
    }
}

/// kube-sim's worker threads by default: one per core, as Go runs an
/// apiserver (GOMAXPROCS).
pub fn default_sim_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// The bench ConfigMap's size before `--object-bytes` existed.
pub const DEFAULT_OBJECT_BYTES: usize = 1400;

/// One target's figure divided by another's (proxy / direct, or
/// breakwater / nginx).
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    /// Throughput through the proxy as a fraction of direct (1.0 = no cost).
    pub rps: f64,
    /// Median latency through the proxy / direct (1.0 = no cost).
    pub p50: f64,
    pub p99: f64,
}

impl Ratios {
    /// `a` / `b`, figure by figure (NaN where `b` is 0).
    pub fn of(a: &Figures, b: &Figures) -> Ratios {
        let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::NAN };
        Ratios {
            rps: ratio(a.rps, b.rps),
            p50: ratio(a.p50_us as f64, b.p50_us as f64),
            p99: ratio(a.p99_us as f64, b.p99_us as f64),
        }
    }
}

/// Whose CPU a phase accounts for besides this process's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProxyCpu {
    None,
    /// The breakwater child (all its threads are in its own figure).
    Breakwater(u32),
    /// nginx's master: its workers are processes of their own, summed in.
    Nginx(u32),
}

impl ProxyCpu {
    /// The `cpu_us_per_request` key and the CPU seconds used so far.
    fn read(self) -> Option<(&'static str, f64)> {
        match self {
            ProxyCpu::None => None,
            ProxyCpu::Breakwater(pid) => Some((PROXY_CPU, cpu_seconds(Some(pid))?)),
            ProxyCpu::Nginx(pid) => Some((NGINX, cpu_seconds_tree(pid)?)),
        }
    }
}

/// The `cpu_us_per_request` key of the proxy a target measures.
fn proxy_key(target: &str) -> &str {
    if target == NGINX { NGINX } else { PROXY_CPU }
}

/// The result of [`run_overhead`]; serializes to the `--json` file.
#[derive(Debug, Clone, Serialize)]
pub struct OverheadReport {
    pub protocol: Protocol,
    /// What answered: kube-sim (Go-like transport), kube-sim-hyper, or go.
    pub upstream: UpstreamKind,
    pub clients: usize,
    /// TCP/TLS connections per phase.
    pub connections: usize,
    pub duration_secs: f64,
    pub warmup_secs: f64,
    pub rounds: usize,
    /// Who sent the requests: "loadtest" (the bench's own clients), "wrk"
    /// or "h2load".
    pub load_generator: LoadGenerator,
    /// `--object-bytes`: about how large each answer was.
    pub object_bytes: usize,
    /// kube-sim's own worker threads (0: it ran on the clients' runtime;
    /// absent: not kube-sim, or a run before session 20, when it always
    /// did).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sim_threads: Option<usize>,
    /// Every phase in the order run: direct, breakwater (, nginx), direct, …
    pub phases: Vec<Figures>,
    /// The direct phase with the highest req/s.
    pub direct: Figures,
    /// The breakwater phase with the highest req/s.
    pub proxy: Figures,
    pub ratios: Ratios,
    /// With `--with-nginx`: the nginx phase with the highest req/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nginx: Option<Figures>,
    /// nginx / direct.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nginx_ratios: Option<Ratios>,
    /// breakwater / nginx, best phase of each (req/s ≥ 1 and p50 ≤ 1 mean
    /// breakwater is the better proxy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breakwater_vs_nginx: Option<Ratios>,
    /// nginx's `worker_processes` (= breakwater's runtime worker threads).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nginx_workers: Option<usize>,
    /// GETs of configmaps kube-sim (or the Go stand-in) counted (all
    /// phases, warm-ups, probes): proves the proxy phases really reached the
    /// upstream. Not known for an external apiserver.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_gets: Option<u64>,
    /// The path every client GET.
    pub path: String,
    pub breakwater_bin: PathBuf,
    /// Seconds since the Unix epoch when the run finished.
    pub finished_unix: u64,
}

impl OverheadReport {
    /// Fails if any phase had more than [`MAX_ERROR_FRACTION`] errors.
    pub fn check(&self) -> anyhow::Result<()> {
        for p in &self.phases {
            ensure!(
                p.error_fraction() <= MAX_ERROR_FRACTION,
                "{}: {} errors in {} requests ({:.3}%) exceeds {:.1}%",
                p.target,
                p.errors,
                p.requests,
                p.error_fraction() * 100.0,
                MAX_ERROR_FRACTION * 100.0
            );
        }
        Ok(())
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "breakwater overhead: {}, upstream {:?}, requests from {:?}, {} clients over {} connections, {:.0}s measured after {:.0}s warm-up, {} rounds\n\n",
            self.protocol,
            self.upstream,
            self.load_generator,
            self.clients,
            self.connections,
            self.duration_secs,
            self.warmup_secs,
            self.rounds
        );
        let header = format!(
            "{:<6} {:<12} {:>10} {:>7} {:>10} {:>9} {:>9} {:>9} {:>11} {:>11} {:>11}\n",
            "round",
            "target",
            "requests",
            "errors",
            "req/s",
            "p50",
            "p99",
            "max",
            "cpu/req px",
            "cpu/req lt",
            "cpu/req up"
        );
        out.push_str(&header);
        let cpu = |f: &Figures, key: &str| {
            f.cpu_us_per_request
                .get(key)
                .map_or_else(|| "-".to_string(), |us| format!("{us:.0}µs"))
        };
        let row = |round: &str, f: &Figures| {
            format!(
                "{:<6} {:<12} {:>10} {:>7} {:>10.0} {:>9} {:>9} {:>9} {:>11} {:>11} {:>11}\n",
                round,
                f.target,
                f.requests,
                f.errors,
                f.rps,
                fmt_us(f.p50_us),
                fmt_us(f.p99_us),
                fmt_us(f.max_us),
                cpu(f, proxy_key(&f.target)),
                cpu(f, LOADTEST_CPU),
                cpu(f, UPSTREAM_CPU)
            )
        };
        let per_round = if self.nginx.is_some() { 3 } else { 2 };
        for (i, f) in self.phases.iter().enumerate() {
            out.push_str(&row(&(i / per_round + 1).to_string(), f));
        }
        out.push('\n');
        out.push_str(&row("best", &self.direct));
        out.push_str(&row("best", &self.proxy));
        if let Some(n) = &self.nginx {
            out.push_str(&row("best", n));
        }
        out.push_str(&format!(
            "\nproxy/direct: req/s {:.2}x, p50 {:.2}x, p99 {:.2}x",
            self.ratios.rps, self.ratios.p50, self.ratios.p99
        ));
        if let Some(n) = self.upstream_gets {
            out.push_str(&format!("   (upstream GETs counted by the upstream: {n})"));
        }
        out.push('\n');
        if let (Some(n), Some(b)) = (&self.nginx_ratios, &self.breakwater_vs_nginx) {
            out.push_str(&format!(
                "nginx/direct: req/s {:.2}x, p50 {:.2}x, p99 {:.2}x   breakwater/nginx: req/s {:.2}x, p50 {:.2}x, p99 {:.2}x\n",
                n.rps, n.p50, n.p99, b.rps, b.p50, b.p99
            ));
        }
        out.push_str(
            "cpu/req: CPU time per request of the proxy under test (px: breakwater, or nginx's master + workers), of this process, kube-sim + clients (lt), and of the upstream when it is a process of its own (up: the Go stand-in, or --upstream-pid)\n",
        );
        out
    }
}

/// Runs the benchmark end to end: kube-sim (or the external apiserver),
/// breakwater, the rounds. Returns the figures even when errors exceed the
/// threshold; call [`OverheadReport::check`] to apply it (the CLI does,
/// after printing).
pub async fn run_overhead(opts: OverheadOpts) -> anyhow::Result<OverheadReport> {
    ensure!(opts.clients > 0, "--clients must be at least 1");
    ensure!(opts.rounds > 0, "--rounds must be at least 1");
    ensure!(!opts.duration.is_zero(), "--duration must be positive");
    ensure!(
        opts.external.is_some() == (opts.upstream == UpstreamKind::External),
        "an external upstream needs its URL (--upstream-url), and only it"
    );
    let bin = find_breakwater(opts.breakwater.as_deref())?;
    if opts.with_nginx {
        // Before anything starts: a missing nginx is one line, and the fix.
        nginx::find_nginx(opts.nginx.as_deref())?;
    }
    // Before anything starts, too: a missing wrk or h2load, or wrk asked
    // for HTTP/2.
    let tool = opts.load_generator.find(opts.protocol)?;
    if opts.upstream == UpstreamKind::Go && go_upstream::find_go().is_none() {
        return Err(go_upstream::GoError::NotFound.into());
    }

    if let Some(ext) = &opts.external {
        let target = external_target(ext).await?;
        let measured = measure(&target, &bin, tool.as_deref(), &opts).await?;
        return Ok(report(&opts, measured, None, &target.path, &bin));
    }
    let pki = SimPki::generate(&["127.0.0.1", "localhost"]).context("kube-sim PKI")?;
    let config = SimConfig {
        go_like_transport: opts.upstream != UpstreamKind::KubeSimHyper,
        ..SimConfig::default()
    };
    // kube-sim's tasks run where it is started: on a runtime of its own
    // unless asked to share the clients'.
    let own = match opts.sim_threads {
        0 => None,
        n => Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(n)
                .thread_name("kube-sim")
                .enable_all()
                .build()
                .context("kube-sim's runtime")?,
        ),
    };
    let sim = match &own {
        None => KubeSim::start(config, pki).await,
        Some(rt) => rt
            .spawn(KubeSim::start(config, pki))
            .await
            .context("kube-sim's start")?,
    }
    .context("start kube-sim")?;
    let result = with_sim(&sim, &bin, tool.as_deref(), &opts).await;
    match own {
        None => sim.shutdown().await,
        Some(rt) => {
            let _ = rt.spawn(sim.shutdown()).await;
            rt.shutdown_background();
        }
    }
    result
}

/// Who answers the bench's GETs, as the clients, breakwater and nginx
/// reach it.
struct Target {
    addr: SocketAddr,
    /// breakwater's `--upstream`.
    url: String,
    /// The CA of its serving certificate.
    ca_pem: String,
    /// The name the clients verify; `None`: `addr`'s IP.
    server_name: Option<ServerName<'static>>,
    /// The name nginx verifies (a DNS name).
    nginx_name: String,
    /// Every client's `Authorization`.
    auth: HeaderValue,
    path: String,
    /// The upstream's process, when its CPU is to be read.
    pid: Option<u32>,
    /// The answer must be the seeded ConfigMap (kube-sim, the Go stand-in).
    seeded: bool,
}

impl Target {
    fn connector(&self, tls: Arc<rustls::ClientConfig>, proto: Protocol) -> Connector {
        Connector {
            addr: self.addr,
            tls,
            proto,
            server_name: self.server_name.clone(),
        }
    }
}

/// [`Target`] of an external apiserver: its URL resolved, its CA and the
/// token read.
async fn external_target(ext: &ExternalUpstream) -> anyhow::Result<Target> {
    let uri: http::Uri = ext
        .url
        .parse()
        .with_context(|| format!("--upstream-url {:?}", ext.url))?;
    ensure!(
        uri.scheme_str() == Some("https") && uri.path() == "/",
        "--upstream-url must be https://host[:port], not {:?}",
        ext.url
    );
    let host = uri
        .host()
        .context("--upstream-url has no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let addr = reachable(&host, port).await?;
    let server_name = ServerName::try_from(host.clone())
        .with_context(|| format!("{host:?} is not a TLS server name"))?;
    let is_ip = host.parse::<std::net::IpAddr>().is_ok();
    let ca_pem = std::fs::read_to_string(&ext.ca_file)
        .with_context(|| format!("read --upstream-ca {}", ext.ca_file.display()))?;
    let token = std::fs::read_to_string(&ext.token_file)
        .with_context(|| format!("read --token-file {}", ext.token_file.display()))?;
    let mut auth = HeaderValue::from_str(&format!("Bearer {}", token.trim()))
        .context("the token is not a valid header value")?;
    auth.set_sensitive(true);
    ensure!(
        ext.path.starts_with('/'),
        "--path must start with '/', not {:?}",
        ext.path
    );
    Ok(Target {
        addr,
        url: ext.url.trim_end_matches('/').to_string(),
        ca_pem,
        server_name: Some(server_name),
        nginx_name: ext.nginx_server_name.clone().unwrap_or_else(|| {
            if is_ip {
                "kubernetes".to_string()
            } else {
                host.clone()
            }
        }),
        auth,
        path: ext.path.clone(),
        pid: ext.pid,
        seeded: false,
    })
}

/// The first of `host`'s addresses that accepts a TCP connection (a name
/// such as `localhost` may resolve to `::1` first, where the apiserver does
/// not listen): the direct clients, wrk, h2load and nginx all use it.
async fn reachable(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("resolve {host}"))?
        .collect();
    let mut failures = Vec::new();
    for addr in &addrs {
        let connect = tokio::net::TcpStream::connect(addr);
        match tokio::time::timeout(Duration::from_secs(5), connect).await {
            Ok(Ok(_)) => return Ok(*addr),
            Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
            Err(_) => failures.push(format!("{addr}: no answer in 5 s")),
        }
    }
    bail!(
        "the upstream {host}:{port} is not reachable ({})",
        if failures.is_empty() {
            "no address".to_string()
        } else {
            failures.join("; ")
        }
    )
}

async fn with_sim(
    sim: &KubeSim,
    bin: &std::path::Path,
    tool: Option<&std::path::Path>,
    opts: &OverheadOpts,
) -> anyhow::Result<OverheadReport> {
    seed(sim, opts.object_bytes).context("seed kube-sim")?;
    let token = sim.issue_token("default", "bench", Duration::from_secs(3600));
    let auth = HeaderValue::from_str(&format!("Bearer {token}")).context("token header")?;
    // With `--upstream go`, the Go stand-in serves what kube-sim would.
    let go = match opts.upstream {
        UpstreamKind::Go => Some(start_go(sim, &token, &auth, opts.protocol).await?),
        UpstreamKind::KubeSim | UpstreamKind::KubeSimHyper | UpstreamKind::External => None,
    };
    let addr = go.as_ref().map_or(sim.addr(), GoUpstream::addr);
    let target = Target {
        addr,
        url: format!("https://{addr}"),
        ca_pem: sim.pki().serving_ca.cert_pem().to_string(),
        server_name: None,
        nginx_name: "localhost".to_string(),
        auth,
        path: BENCH_PATH.to_string(),
        pid: go.as_ref().and_then(GoUpstream::pid),
        seeded: true,
    };
    let measured = measure(&target, bin, tool, opts).await;
    let upstream_gets = match &go {
        Some(g) => {
            let direct =
                target.connector(client_tls(&[&target.ca_pem], opts.protocol)?, opts.protocol);
            go_gets(&direct, &target.auth, g).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "reading the Go stand-in's GET count");
                0
            })
        }
        None => sim.request_count("GET", "configmaps"),
    };
    if let Some(g) = go {
        g.shutdown().await;
    }
    Ok(report(
        opts,
        measured?,
        Some(upstream_gets),
        BENCH_PATH,
        bin,
    ))
}

/// What the rounds measured.
struct Measured {
    phases: Vec<Figures>,
    /// Connections per phase.
    connections: usize,
    nginx_workers: usize,
}

/// Starts breakwater (and nginx) in front of `target`, checks each path
/// with one GET, runs the rounds, stops the proxies.
async fn measure(
    target: &Target,
    bin: &std::path::Path,
    tool: Option<&std::path::Path>,
    opts: &OverheadOpts,
) -> anyhow::Result<Measured> {
    // The proxy's serving certificate, from a CA only this run trusts.
    let proxy_ca = Ca::new("breakwater-bench-ca")?;
    let proxy_cert = proxy_ca.issue_server(&["127.0.0.1", "localhost"])?;
    let dir = ScratchDir::new()?;
    let upstream_ca = dir.write("upstream-ca.crt", &target.ca_pem)?;
    let tls_cert = dir.write("breakwater.crt", &proxy_cert.cert_pem)?;
    let tls_key = dir.write("breakwater.key", &proxy_cert.key_pem)?;

    // Every client comes from 127.0.0.1: no per-source cap.
    let mut extra: Vec<std::ffi::OsString> =
        vec!["--max-connections-per-source".into(), "0".into()];
    extra.extend(opts.breakwater_args.iter().cloned());
    let args = RunArgs {
        tls_cert,
        tls_key,
        upstream: target.url.clone(),
        upstream_ca,
        extra,
        ..RunArgs::default()
    };
    let start = StartOptions {
        stderr: opts.proxy_stderr,
        // breakwater reads BREAKWATER_LOG; RUST_LOG too in case it ever does.
        envs: vec![
            ("BREAKWATER_LOG".into(), opts.proxy_log.clone().into()),
            ("RUST_LOG".into(), opts.proxy_log.clone().into()),
        ],
        ..StartOptions::default()
    };
    let proxy = BreakwaterProcess::start(bin, args.to_args(), start)
        .await
        .with_context(|| format!("start {}", bin.display()))?;
    tracing::info!(proxy = %proxy.listen_url(), upstream = %target.url, "breakwater is ready");

    let tls = client_tls(&[&target.ca_pem, proxy_ca.cert_pem()], opts.protocol)?;
    let direct = target.connector(tls.clone(), opts.protocol);
    let through = Connector {
        addr: proxy.listen_addr(),
        tls,
        proto: opts.protocol,
        server_name: None,
    };

    // Fail fast, with the answer in the message, if either path is broken.
    probe(&direct, target)
        .await
        .context("probe GET direct to the upstream")?;
    if let Err(e) = probe(&through, target).await {
        bail!(
            "probe GET through breakwater failed: {e:#}\nbreakwater output:\n{}",
            proxy.output_tail()
        );
    }

    // nginx in front of the same upstream, with a certificate from the
    // same CA as breakwater's, so the same clients trust both.
    let nginx_workers = nginx::breakwater_worker_count();
    let nginx = if opts.with_nginx {
        let cert = proxy_ca.issue_server(&["127.0.0.1", "localhost"])?;
        let n = NginxProcess::start(&NginxConfig {
            bin: opts.nginx.clone(),
            upstream: target.addr,
            upstream_name: target.nginx_name.clone(),
            upstream_ca_pem: target.ca_pem.clone(),
            cert_pem: cert.cert_pem,
            key_pem: cert.key_pem,
            workers: nginx_workers,
            // Every client's request may be in flight upstream at once.
            upstream_keepalive: opts.clients.max(32),
            // Like for like: nginx logs each request when breakwater does.
            access_log: access_logged(&opts.proxy_log),
        })
        .await
        .context("start nginx")?;
        tracing::info!(nginx = %n.addr(), workers = nginx_workers, "nginx is ready");
        Some(n)
    } else {
        None
    };
    let via_nginx = nginx.as_ref().map(|n| Connector {
        addr: n.addr(),
        tls: through.tls.clone(),
        proto: opts.protocol,
        server_name: None,
    });
    if let (Some(n), Some(c)) = (&nginx, &via_nginx)
        && let Err(e) = probe(c, target).await
    {
        bail!(
            "probe GET through nginx failed: {e:#}\n(nginx verifies the upstream's certificate for {:?}; --nginx-upstream-name picks another name)\nnginx output:\n{}",
            target.nginx_name,
            n.output_tail()
        );
    }

    let mut targets = vec![
        ("direct", &direct, ProxyCpu::None),
        (
            "breakwater",
            &through,
            proxy.pid().map_or(ProxyCpu::None, ProxyCpu::Breakwater),
        ),
    ];
    if let (Some(n), Some(c)) = (&nginx, &via_nginx) {
        targets.push((NGINX, c, n.pid().map_or(ProxyCpu::None, ProxyCpu::Nginx)));
    }
    let authorization = target.auth.to_str().context("token header")?;
    let mut phases = Vec::new();
    let mut connections = 0;
    for round in 1..=opts.rounds {
        for &(name, connector, cpu) in &targets {
            tracing::info!(round, target = name, "phase starts");
            let (figures, conns) = match tool {
                None => run_phase(name, connector, target, opts, cpu).await?,
                Some(program) => {
                    let run = external::Run {
                        generator: opts.load_generator,
                        program,
                        addr: connector.addr,
                        path: &target.path,
                        authorization,
                        protocol: opts.protocol,
                        clients: opts.clients,
                        h2_connections: opts.h2_connections,
                        duration: opts.duration,
                    };
                    run_tool_phase(&run, name, opts.warmup, cpu, target.pid).await?
                }
            };
            connections = conns;
            eprintln!(
                "round {round} {name:<10}: {:.0} req/s, p50 {}, p99 {}, {} errors",
                figures.rps,
                fmt_us(figures.p50_us),
                fmt_us(figures.p99_us),
                figures.errors
            );
            phases.push(figures);
        }
    }

    if phases
        .iter()
        .any(|f| f.target == "breakwater" && f.errors > 0)
    {
        // The proxy's own words are the quickest way to the cause.
        tracing::warn!(
            output = %proxy.output_tail(),
            "requests through breakwater failed; its last output follows"
        );
    }
    if phases.iter().any(|f| f.target == NGINX && f.errors > 0)
        && let Some(n) = &nginx
    {
        tracing::warn!(
            output = %n.output_tail(),
            "requests through nginx failed; its last output follows"
        );
    }
    if let Err(e) = proxy.shutdown(Duration::from_secs(10)).await {
        tracing::warn!(error = %Chain(&e), "stopping breakwater");
    }
    if let Some(n) = nginx
        && let Err(e) = n.shutdown(Duration::from_secs(10)).await
    {
        tracing::warn!(error = %Chain(&e), "stopping nginx");
    }
    Ok(Measured {
        phases,
        connections,
        nginx_workers,
    })
}

/// The report of `measured`: the best phase of each target, and the ratios.
fn report(
    opts: &OverheadOpts,
    measured: Measured,
    upstream_gets: Option<u64>,
    path: &str,
    bin: &std::path::Path,
) -> OverheadReport {
    let Measured {
        phases,
        connections,
        nginx_workers,
    } = measured;
    let best = |target: &str| {
        phases
            .iter()
            .filter(|f| f.target == target)
            .max_by(|a, b| a.rps.total_cmp(&b.rps))
            .cloned()
            .expect("at least one round ran")
    };
    let direct = best("direct");
    let proxy = best("breakwater");
    let nginx_best = opts.with_nginx.then(|| best(NGINX));
    let ratios = Ratios::of(&proxy, &direct);
    OverheadReport {
        protocol: opts.protocol,
        upstream: opts.upstream,
        clients: opts.clients,
        connections,
        duration_secs: opts.duration.as_secs_f64(),
        warmup_secs: opts.warmup.as_secs_f64(),
        rounds: opts.rounds,
        load_generator: opts.load_generator,
        object_bytes: opts.object_bytes,
        sim_threads: matches!(
            opts.upstream,
            UpstreamKind::KubeSim | UpstreamKind::KubeSimHyper
        )
        .then_some(opts.sim_threads),
        nginx_ratios: nginx_best.as_ref().map(|n| Ratios::of(n, &direct)),
        breakwater_vs_nginx: nginx_best.as_ref().map(|n| Ratios::of(&proxy, n)),
        nginx: nginx_best,
        nginx_workers: opts.with_nginx.then_some(nginx_workers),
        phases,
        direct,
        proxy,
        ratios,
        upstream_gets,
        path: path.to_string(),
        breakwater_bin: bin.to_path_buf(),
        finished_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    }
}

/// Builds and starts the Go stand-in serving what kube-sim serves: the
/// bench ConfigMap's bytes and a SelfSubjectReview answer for the token's
/// ServiceAccount, with a certificate from kube-sim's serving CA (so
/// breakwater, nginx and the clients trust it as they trust kube-sim).
async fn start_go(
    sim: &KubeSim,
    token: &str,
    auth: &HeaderValue,
    protocol: Protocol,
) -> anyhow::Result<GoUpstream> {
    let tls = client_tls(&[sim.pki().serving_ca.cert_pem()], protocol)?;
    let to_sim = Connector {
        addr: sim.addr(),
        tls,
        proto: protocol,
        server_name: None,
    };
    let mut conn = to_sim.connect().await?;
    let resp = conn.send(request(&conn, &to_sim, BENCH_PATH, auth)).await?;
    ensure!(
        resp.status().is_success(),
        "GET {BENCH_PATH} from kube-sim answered {}",
        resp.status()
    );
    let body = resp.into_body().collect().await?.to_bytes().to_vec();
    let sa = sim
        .store()
        .get(
            resources::find("", "v1", "serviceaccounts")
                .context("kube-sim serves serviceaccounts")?,
            Some("default"),
            "bench",
        )
        .context("the bench ServiceAccount")?;
    let uid = sa["metadata"]["uid"].as_str().unwrap_or_default();
    let self_subject_review = serde_json::to_vec(&json!({
        "kind": "SelfSubjectReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "status": {"userInfo": {
            "username": "system:serviceaccount:default:bench",
            "uid": uid,
            "groups": ["system:serviceaccounts", "system:serviceaccounts:default",
                       "system:authenticated"],
        }},
    }))?;
    let cert = sim
        .pki()
        .serving_ca
        .issue_server(&["127.0.0.1", "localhost"])?;
    let go = GoUpstream::start(&GoUpstreamConfig {
        cert_pem: cert.cert_pem,
        key_pem: cert.key_pem,
        token: token.to_string(),
        path: BENCH_PATH.to_string(),
        body,
        self_subject_review,
    })
    .await
    .context("start the Go stand-in upstream")?;
    tracing::info!(addr = %go.addr(), "Go stand-in upstream is ready");
    Ok(go)
}

/// GETs of the bench path the Go stand-in answered (its `/__gets`).
async fn go_gets(direct: &Connector, auth: &HeaderValue, go: &GoUpstream) -> anyhow::Result<u64> {
    let mut conn = direct.connect().await?;
    let mut req = request(&conn, direct, BENCH_PATH, auth);
    *req.uri_mut() = conn.request_uri(go.addr(), "/__gets").parse()?;
    let resp = conn.send(req).await?;
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(std::str::from_utf8(&body)?.trim().parse()?)
}

/// Namespace `default` (if kube-sim does not make it), ServiceAccount
/// `default/bench` (the token's subject), a Role and RoleBinding letting it
/// read configmaps, and ConfigMap `default/bench` of about `object_bytes`
/// (JSON).
fn seed(sim: &KubeSim, object_bytes: usize) -> anyhow::Result<()> {
    let find = |plural| {
        resources::find("", "v1", plural).with_context(|| format!("kube-sim serves no v1 {plural}"))
    };
    let store = sim.store();
    let tolerate_exists = |r: Result<_, StoreError>| match r {
        Ok(_) | Err(StoreError::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e),
    };
    tolerate_exists(store.create(
        find("namespaces")?,
        None,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}),
    ))?;
    tolerate_exists(store.create(
        find("serviceaccounts")?,
        Some("default"),
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": "bench", "namespace": "default"}}),
    ))?;
    // Least privilege, as an operator would grant it: the SA may get
    // configmaps in its namespace (a no-op where kube-sim allows everything).
    const RBAC: &str = "rbac.authorization.k8s.io";
    if let (Some(roles), Some(bindings)) = (
        resources::find(RBAC, "v1", "roles"),
        resources::find(RBAC, "v1", "rolebindings"),
    ) {
        tolerate_exists(store.create(
            roles,
            Some("default"),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                   "metadata": {"name": "bench-reader", "namespace": "default"},
                   "rules": [{"apiGroups": [""], "resources": ["configmaps"],
                              "verbs": ["get", "list", "watch"]}]}),
        ))?;
        tolerate_exists(store.create(
            bindings,
            Some("default"),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": {"name": "bench-reader", "namespace": "default"},
                   "roleRef": {"apiGroup": RBAC, "kind": "Role", "name": "bench-reader"},
                   "subjects": [{"kind": "ServiceAccount", "name": "bench",
                                 "namespace": "default"}]}),
        ))?;
    }
    // Sixteen keys of `"key-NN":"value-NN-xxx…",` (18 bytes each besides
    // the padding) and ~500 bytes of the rest of the object.
    let pad = (object_bytes.saturating_sub(500) / 16)
        .saturating_sub(18)
        .max(1);
    let data: serde_json::Map<String, serde_json::Value> = (0..16)
        .map(|i| {
            (
                format!("key-{i:02}"),
                json!(format!("value-{i:02}-{}", "x".repeat(pad))),
            )
        })
        .collect();
    store.create(
        find("configmaps")?,
        Some("default"),
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "bench", "namespace": "default",
                            "labels": {"app.kubernetes.io/name": "breakwater-bench"}},
               "data": data}),
    )?;
    Ok(())
}

/// The benchmark request, built from shared header values (cheap clones).
fn request(
    conn: &Conn,
    connector: &Connector,
    path: &str,
    auth: &HeaderValue,
) -> Request<Empty<Bytes>> {
    super::get_request(conn, connector, path, auth, "breakwater-loadtest/bench")
}

/// One GET of the target's path that must answer 2xx with a JSON object
/// (the seeded ConfigMap, from kube-sim or the Go stand-in).
async fn probe(connector: &Connector, target: &Target) -> anyhow::Result<()> {
    let path = &target.path;
    let mut conn = connector.connect().await?;
    let resp = conn
        .send(request(&conn, connector, path, &target.auth))
        .await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    ensure!(
        status.is_success(),
        "GET {path} answered {status}: {}",
        String::from_utf8_lossy(&body)
    );
    let v: serde_json::Value = serde_json::from_slice(&body).context("response is not JSON")?;
    ensure!(
        !target.seeded || (v["metadata"]["name"] == "bench" && v["kind"] == "ConfigMap"),
        "GET {path} answered an unexpected object: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(())
}

/// Shared by a phase's clients: when to record, when to stop.
struct Clock {
    /// What every request GETs.
    path: String,
    measure_from: Instant,
    end: Instant,
    issued: AtomicU64,
    max_requests: u64,
}

/// What one client saw inside the measured window.
struct ClientStats {
    hist: Histogram<u64>,
    requests: u64,
    errors: u64,
    last_done: Option<Instant>,
}

/// One phase against one target: connect, warm up, measure. Returns the
/// figures and the number of connections used.
async fn run_phase(
    name: &str,
    connector: &Connector,
    target: &Target,
    opts: &OverheadOpts,
    proxy_cpu: ProxyCpu,
) -> anyhow::Result<(Figures, usize)> {
    let (auth, upstream_pid) = (&target.auth, target.pid);
    // Connect everything before the clock starts: handshakes are not requests.
    let conns: Vec<Conn> = match opts.protocol {
        Protocol::Http1 | Protocol::PlainHttp1 => connect_all(connector, opts.clients).await?,
        Protocol::Http2 => {
            let n = opts.h2_connections.clamp(1, opts.clients);
            let shared = connect_all(connector, n).await?;
            (0..opts.clients)
                .map(|i| {
                    shared[i % n]
                        .share()
                        .expect("HTTP/2 connections can be shared")
                })
                .collect()
        }
    };
    let connections = match opts.protocol {
        Protocol::Http1 | Protocol::PlainHttp1 => opts.clients,
        Protocol::Http2 => opts.h2_connections.clamp(1, opts.clients),
    };

    let now = Instant::now();
    let clock = Arc::new(Clock {
        path: target.path.clone(),
        measure_from: now + opts.warmup,
        end: now + opts.warmup + opts.duration,
        issued: AtomicU64::new(0),
        max_requests: opts.max_requests,
    });
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|conn| tokio::spawn(client(conn, connector.clone(), auth.clone(), clock.clone())))
        .collect();

    // CPU use is sampled at the edges of the measured window (the clients
    // decide per request whether it is inside; the few in flight at either
    // edge are noise well below one clock tick per phase).
    tokio::time::sleep_until(clock.measure_from.into()).await;
    let cpu_before = CpuSample::take(proxy_cpu, upstream_pid);

    let mut hist = latency_histogram();
    let (mut requests, mut errors) = (0u64, 0u64);
    let mut last_done = clock.measure_from;
    for t in tasks {
        let s = t.await.context("benchmark client task panicked")?;
        hist.add(&s.hist).context("merge histograms")?;
        requests += s.requests;
        errors += s.errors;
        if let Some(d) = s.last_done {
            last_done = last_done.max(d);
        }
    }
    let cpu_after = CpuSample::take(proxy_cpu, upstream_pid);
    let seconds = last_done.duration_since(clock.measure_from).as_secs_f64();
    let mut figures = Figures::new(name, &hist, requests, errors, seconds);
    cpu_before.per_request(&cpu_after, &mut figures);
    Ok((figures, connections))
}

/// One phase with wrk or h2load sending the requests: an unrecorded warm-up
/// run, then the measured run, CPU read around it. The "loadtest" CPU
/// figure is then kube-sim's alone (the tool is a process of its own).
async fn run_tool_phase(
    run: &external::Run<'_>,
    target: &str,
    warmup: Duration,
    proxy_cpu: ProxyCpu,
    upstream_pid: Option<u32>,
) -> anyhow::Result<(Figures, usize)> {
    if !warmup.is_zero() {
        let warm = external::Run {
            duration: warmup,
            ..*run
        };
        warm.measure(target).await.context("warm-up")?;
    }
    let before = CpuSample::take(proxy_cpu, upstream_pid);
    let measured = run.measure(target).await?;
    let after = CpuSample::take(proxy_cpu, upstream_pid);
    let mut figures = measured.figures;
    before.per_request(&after, &mut figures);
    Ok((figures, measured.connections))
}

/// CPU seconds used so far by this process, the proxy under test and the
/// Go stand-in, each when known.
struct CpuSample {
    own: Option<f64>,
    proxy: Option<(&'static str, f64)>,
    upstream: Option<f64>,
}

impl CpuSample {
    fn take(proxy_cpu: ProxyCpu, upstream_pid: Option<u32>) -> CpuSample {
        CpuSample {
            own: cpu_seconds(None),
            proxy: proxy_cpu.read(),
            upstream: upstream_pid.and_then(|p| cpu_seconds(Some(p))),
        }
    }

    /// Adds each process's CPU per request between `self` and `after` to
    /// `figures` (nothing when no request completed).
    fn per_request(&self, after: &CpuSample, figures: &mut Figures) {
        let requests = figures.requests;
        let per_request = |before: Option<f64>, after: Option<f64>| {
            let (b, a) = before.zip(after)?;
            (requests > 0).then(|| (a - b) * 1e6 / requests as f64)
        };
        let cpu = &mut figures.cpu_us_per_request;
        if let Some(us) = per_request(self.own, after.own) {
            cpu.insert(LOADTEST_CPU.to_string(), us);
        }
        if let (Some((key, before)), Some((_, after))) = (self.proxy, after.proxy)
            && let Some(us) = per_request(Some(before), Some(after))
        {
            cpu.insert(key.to_string(), us);
        }
        if let Some(us) = per_request(self.upstream, after.upstream) {
            cpu.insert(UPSTREAM_CPU.to_string(), us);
        }
    }
}

async fn connect_all(connector: &Connector, n: usize) -> Result<Vec<Conn>, ClientError> {
    let handshakes = (0..n).map(|_| {
        let c = connector.clone();
        tokio::spawn(async move { c.connect().await })
    });
    let mut conns = Vec::with_capacity(n);
    for h in handshakes.collect::<Vec<_>>() {
        let conn = h.await.map_err(|e| ClientError::Connect {
            addr: connector.addr,
            source: std::io::Error::other(e),
        })??;
        conns.push(conn);
    }
    Ok(conns)
}

/// One client: a request at a time until the clock ends or the request budget
/// is spent. A transport error counts as an error and costs a reconnect; a
/// failed reconnect ends the client (rather than spin on a dead target).
async fn client(
    mut conn: Conn,
    connector: Connector,
    auth: HeaderValue,
    clock: Arc<Clock>,
) -> ClientStats {
    let mut s = ClientStats {
        hist: latency_histogram(),
        requests: 0,
        errors: 0,
        last_done: None,
    };
    loop {
        let started = Instant::now();
        if started >= clock.end
            || clock.issued.fetch_add(1, Ordering::Relaxed) >= clock.max_requests
        {
            break;
        }
        let measured = started >= clock.measure_from;
        let req = request(&conn, &connector, &clock.path, &auth);
        let (ok, transport_failed) = match conn.send(req).await {
            Ok(resp) => {
                let success = resp.status().is_success();
                // Read the whole body: the latency a client sees ends there.
                match resp.into_body().collect().await {
                    Ok(_) => (success, false),
                    Err(_) => (false, true),
                }
            }
            Err(_) => (false, true),
        };
        let done = Instant::now();
        if measured {
            s.requests += 1;
            s.last_done = Some(done);
            if ok {
                let us =
                    u64::try_from(done.duration_since(started).as_micros()).unwrap_or(u64::MAX);
                s.hist.saturating_record(us.max(1));
            } else {
                s.errors += 1;
            }
        }
        if transport_failed {
            match connector.connect().await {
                Ok(c) => conn = c,
                Err(e) => {
                    tracing::warn!(error = %Chain(&e), "benchmark client could not reconnect; it stops");
                    if measured {
                        s.errors += 1;
                    }
                    break;
                }
            }
        }
    }
    s
}

/// Whether the log filter `filter` (`BREAKWATER_LOG`) writes breakwater's
/// access log (target `breakwater::access`, level `info`): asked of the
/// `EnvFilter` breakwater builds from it, with breakwater's default when it
/// does not parse.
fn access_logged(filter: &str) -> bool {
    use tracing_subscriber::layer::SubscriberExt as _;
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,breakwater::access=info"));
    tracing::subscriber::with_default(
        tracing_subscriber::registry().with(filter),
        || tracing::enabled!(target: "breakwater::access", tracing::Level::INFO),
    )
}

#[cfg(test)]
mod tests {
    use http::header::AUTHORIZATION;
    use std::net::SocketAddr;

    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::net::TcpListener;

    use super::*;

    /// A TLS server (h1 and h2 by ALPN) that answers the bench path like
    /// kube-sim when the bearer token is "good", 401 otherwise.
    async fn fake_apiserver(ca: &Ca) -> SocketAddr {
        let pair = ca.issue_server(&["127.0.0.1"]).expect("server cert");
        let certs = CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("cert pem");
        let key = PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes()).expect("key pem");
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                        let good = req.headers().get(AUTHORIZATION)
                            == Some(&HeaderValue::from_static("Bearer good"))
                            && req.uri().path() == BENCH_PATH;
                        let (status, body) = if good {
                            (
                                200,
                                r#"{"kind":"ConfigMap","apiVersion":"v1","metadata":{"name":"bench"}}"#,
                            )
                        } else {
                            (401, r#"{"kind":"Status","code":401}"#)
                        };
                        http::Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from_static(body.as_bytes())))
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        addr
    }

    /// The fake apiserver as a bench target, GET with `authorization`.
    fn fake_target(addr: SocketAddr, ca: &Ca, authorization: &'static str) -> Target {
        Target {
            addr,
            url: format!("https://{addr}"),
            ca_pem: ca.cert_pem().to_string(),
            server_name: None,
            nginx_name: "localhost".into(),
            auth: HeaderValue::from_static(authorization),
            path: BENCH_PATH.into(),
            pid: None,
            seeded: true,
        }
    }

    fn opts(protocol: Protocol) -> OverheadOpts {
        OverheadOpts {
            clients: 4,
            duration: Duration::from_millis(300),
            warmup: Duration::from_millis(50),
            protocol,
            h2_connections: 2,
            ..OverheadOpts::default()
        }
    }

    /// `--upstream-url`: an IP address is verified as such by the clients,
    /// and nginx (DNS names only) verifies `kubernetes`; a name is reached
    /// at the address that accepts (`localhost` may resolve to `::1`
    /// first) and verified as the name by both; a URL with a scheme or path
    /// the bench cannot use, or an unreachable one, is refused.
    #[tokio::test]
    async fn an_external_upstream_is_reached_and_verified_by_its_urls_host() {
        let dir = ScratchDir::new().expect("dir");
        let ca = Ca::new("ext-ca").expect("ca");
        let ca_file = dir.write("ca.crt", ca.cert_pem()).expect("ca");
        let token_file = dir.write("token", "abc\n").expect("token");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let ext = |url: String| ExternalUpstream {
            url,
            ca_file: ca_file.clone(),
            token_file: token_file.clone(),
            path: "/api/v1/namespaces/default/pods/p".into(),
            nginx_server_name: None,
            pid: None,
        };
        let t = external_target(&ext(format!("https://127.0.0.1:{}", addr.port())))
            .await
            .expect("an IP address");
        assert_eq!(t.addr, addr);
        assert_eq!(t.nginx_name, "kubernetes");
        assert_eq!(t.server_name, Some(ServerName::IpAddress(addr.ip().into())));
        assert_eq!(t.auth.to_str().expect("ascii"), "Bearer abc");
        assert!(t.auth.is_sensitive());
        assert!(!t.seeded);
        assert_eq!(t.path, "/api/v1/namespaces/default/pods/p");

        let t = external_target(&ext(format!("https://localhost:{}/", addr.port())))
            .await
            .expect("a name");
        assert_eq!(t.addr, addr);
        assert_eq!(t.nginx_name, "localhost");
        assert_eq!(
            t.server_name,
            Some(ServerName::try_from("localhost").expect("name"))
        );
        assert_eq!(t.url, format!("https://localhost:{}", addr.port()));

        for bad in [
            format!("http://127.0.0.1:{}", addr.port()),
            format!("https://127.0.0.1:{}/api", addr.port()),
        ] {
            let err = external_target(&ext(bad.clone())).await.err().expect(&bad);
            assert!(
                format!("{err:#}").contains("must be https://host[:port]"),
                "{bad}: {err:#}"
            );
        }
        drop(listener);
        let err = external_target(&ext(format!("https://127.0.0.1:{}", addr.port())))
            .await
            .err()
            .expect("nothing listens");
        assert!(format!("{err:#}").contains("not reachable"), "{err:#}");
    }

    #[test]
    fn the_access_log_is_on_where_the_filter_lets_breakwater_access_info_through() {
        for (filter, on) in [
            ("warn", false),
            ("info", true),
            ("debug", true),
            ("info,breakwater::access=off", false),
            ("warn,breakwater::access=info", true),
            ("warn,breakwater=info", true),
            ("info,breakwater=warn", false),
            ("info,breakwater=warn,breakwater::access=info", true),
            ("info,breakwater::accessor=off", true),
            ("warn,breakwater::access", true),
            ("", false),
        ] {
            assert_eq!(access_logged(filter), on, "{filter:?}");
        }
    }
    #[tokio::test]
    async fn a_phase_counts_successes_for_both_protocols() {
        let ca = Ca::new("test-ca").expect("ca");
        let addr = fake_apiserver(&ca).await;
        let good = fake_target(addr, &ca, "Bearer good");
        for protocol in [Protocol::Http1, Protocol::Http2] {
            let connector = good.connector(
                client_tls(&[ca.cert_pem()], protocol).expect("tls"),
                protocol,
            );
            probe(&connector, &good).await.expect("probe");
            let (f, conns) =
                run_phase("direct", &connector, &good, &opts(protocol), ProxyCpu::None)
                    .await
                    .expect("phase");
            assert!(f.requests > 10, "{protocol}: {f:?}");
            assert_eq!(f.errors, 0, "{protocol}: {f:?}");
            assert!(f.p50_us > 0 && f.p50_us <= f.max_us, "{f:?}");
            assert_eq!(conns, if protocol == Protocol::Http1 { 4 } else { 2 });
        }
    }

    /// wrk and h2load (required: CI installs wrk and nghttp2-client) as the
    /// phase's load generator: their figures are read back, a refused
    /// request counts as an error, and wrk is refused HTTP/2.
    #[tokio::test]
    async fn wrk_and_h2load_phases_count_successes_and_errors() {
        let ca = Ca::new("test-ca").expect("ca");
        let addr = fake_apiserver(&ca).await;
        for (generator, protocol) in [
            (LoadGenerator::Wrk, Protocol::Http1),
            (LoadGenerator::H2load, Protocol::Http1),
            (LoadGenerator::H2load, Protocol::Http2),
        ] {
            let program = generator
                .find(protocol)
                .unwrap_or_else(|e| panic!("{e:#}"))
                .expect("a tool");
            for (token, good) in [("Bearer good", true), ("Bearer bad", false)] {
                let run = external::Run {
                    generator,
                    program: &program,
                    addr,
                    path: BENCH_PATH,
                    authorization: token,
                    protocol,
                    clients: 4,
                    h2_connections: 2,
                    duration: Duration::from_secs(1),
                };
                let what = format!("{generator:?} {protocol} {token}");
                let (f, conns) =
                    run_tool_phase(&run, "direct", Duration::ZERO, ProxyCpu::None, None)
                        .await
                        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
                assert!(f.requests > 10, "{what}: {f:?}");
                assert!(f.seconds > 0.5 && f.seconds < 5.0, "{what}: {f:?}");
                if good {
                    assert_eq!(f.errors, 0, "{what}: {f:?}");
                    assert!(f.p50_us > 0 && f.p50_us <= f.max_us, "{what}: {f:?}");
                } else {
                    assert_eq!(f.errors, f.requests, "{what}: {f:?}");
                }
                assert!(f.cpu_us_per_request.contains_key(LOADTEST_CPU), "{f:?}");
                let expected = if protocol == Protocol::Http2 { 2 } else { 4 };
                assert_eq!(conns, expected, "{what}");
            }
        }
    }

    /// nginx (required: CI installs nginx-light) in front of a real
    /// kube-sim, configured as the bench configures it: both protocols
    /// reach kube-sim through it with the client's own token, and the
    /// phase accounts nginx's CPU under its own key.
    #[tokio::test]
    async fn nginx_target_proxies_the_bench_get_for_both_protocols() {
        let pki = SimPki::generate(&["127.0.0.1", "localhost"]).expect("pki");
        let sim = KubeSim::start(SimConfig::default(), pki)
            .await
            .expect("kube-sim");
        seed(&sim, DEFAULT_OBJECT_BYTES).expect("seed");
        let token = sim.issue_token("default", "bench", Duration::from_secs(600));
        let target = Target {
            auth: HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
            ..fake_target(sim.addr(), &sim.pki().serving_ca, "unused")
        };
        let ca = Ca::new("nginx-test-ca").expect("ca");
        let cert = ca.issue_server(&["127.0.0.1"]).expect("cert");
        let nginx = NginxProcess::start(&NginxConfig {
            bin: None,
            upstream: sim.addr(),
            upstream_name: "localhost".into(),
            upstream_ca_pem: sim.pki().serving_ca.cert_pem().to_string(),
            cert_pem: cert.cert_pem,
            key_pem: cert.key_pem,
            workers: 2,
            upstream_keepalive: 8,
            // Checks that nginx takes the directive.
            access_log: true,
        })
        .await
        .unwrap_or_else(|e| panic!("{}", Chain(&e)));
        let pid = nginx.pid().expect("nginx runs");
        for protocol in [Protocol::Http1, Protocol::Http2] {
            let connector = Connector {
                addr: nginx.addr(),
                tls: client_tls(&[ca.cert_pem()], protocol).expect("tls"),
                proto: protocol,
                server_name: None,
            };
            probe(&connector, &target)
                .await
                .unwrap_or_else(|e| panic!("{protocol}: {e:#}\n{}", nginx.output_tail()));
            let gets_before = sim.request_count("GET", "configmaps");
            let (f, _) = run_phase(
                NGINX,
                &connector,
                &target,
                &opts(protocol),
                ProxyCpu::Nginx(pid),
            )
            .await
            .expect("phase");
            assert!(f.requests > 10, "{protocol}: {f:?}");
            assert_eq!(f.errors, 0, "{protocol}: {f:?}\n{}", nginx.output_tail());
            assert!(f.cpu_us_per_request.contains_key(NGINX), "{f:?}");
            assert!(!f.cpu_us_per_request.contains_key(PROXY_CPU), "{f:?}");
            // Every request went through to kube-sim (warm-up ones too).
            let gets = sim.request_count("GET", "configmaps") - gets_before;
            assert!(
                gets >= f.requests,
                "{protocol}: {gets} upstream GETs for {f:?}"
            );
        }
        // The client's token is what kube-sim saw: a bad one is refused
        // upstream, not by nginx, and comes back as the apiserver's 401.
        let connector = Connector {
            addr: nginx.addr(),
            tls: client_tls(&[ca.cert_pem()], Protocol::Http1).expect("tls"),
            proto: Protocol::Http1,
            server_name: None,
        };
        let nope = Target {
            auth: HeaderValue::from_static("Bearer nope"),
            ..fake_target(sim.addr(), &sim.pki().serving_ca, "unused")
        };
        let err = probe(&connector, &nope)
            .await
            .expect_err("a bad token is refused");
        assert!(format!("{err:#}").contains("401"), "{err:#}");
        nginx
            .shutdown(Duration::from_secs(10))
            .await
            .expect("stop nginx");
        sim.shutdown().await;
    }

    #[tokio::test]
    async fn non_2xx_answers_are_errors_and_fail_the_check() {
        let ca = Ca::new("test-ca").expect("ca");
        let addr = fake_apiserver(&ca).await;
        let bad = fake_target(addr, &ca, "Bearer bad");
        let connector = bad.connector(
            client_tls(&[ca.cert_pem()], Protocol::Http1).expect("tls"),
            Protocol::Http1,
        );
        assert!(probe(&connector, &bad).await.is_err());
        let (f, _) = run_phase(
            "breakwater",
            &connector,
            &bad,
            &opts(Protocol::Http1),
            ProxyCpu::None,
        )
        .await
        .expect("phase");
        assert!(f.requests > 0);
        assert_eq!(f.errors, f.requests);
        let report = OverheadReport {
            protocol: Protocol::Http1,
            upstream: UpstreamKind::KubeSim,
            clients: 4,
            connections: 4,
            duration_secs: 0.3,
            warmup_secs: 0.05,
            rounds: 1,
            load_generator: LoadGenerator::Loadtest,
            object_bytes: DEFAULT_OBJECT_BYTES,
            sim_threads: Some(2),
            phases: vec![f.clone()],
            direct: f.clone(),
            proxy: f,
            ratios: Ratios {
                rps: 1.0,
                p50: 1.0,
                p99: 1.0,
            },
            nginx: None,
            nginx_ratios: None,
            breakwater_vs_nginx: None,
            nginx_workers: None,
            upstream_gets: None,
            path: BENCH_PATH.into(),
            breakwater_bin: PathBuf::new(),
            finished_unix: 0,
        };
        assert!(report.check().is_err());
        assert!(report.table().contains("proxy/direct"));
    }
}
