//! `loadtest`: run kube-sim on its own, or run Breakwater's benchmarks.
//!
//! Only argument parsing, output files and printing live here; the work is in
//! the library (`breakwater_loadtest::sim`, `breakwater_loadtest::bench`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use breakwater_loadtest::bench::Protocol;
use breakwater_loadtest::bench::external::LoadGenerator;
use breakwater_loadtest::bench::overhead::{
    BENCH_PATH, ExternalUpstream, OverheadOpts, UpstreamKind, run_overhead,
};
use breakwater_loadtest::proc::StderrMode;
use breakwater_loadtest::sim::{KubeSim, SimConfig, SimPki, seed_demo};
use clap::{ArgAction, Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "loadtest",
    version,
    about = "kube-sim and benchmarks for Breakwater"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run kube-sim, a simulated kube-apiserver, until Ctrl-C; writes a
    /// kubeconfig and its certificates into --dir.
    Sim(SimArgs),
    /// Run a benchmark.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Incident lab: replay the DaemonSet storm against kube-sim (and with
    /// --compare, through Breakwater too) and write a report with plots.
    Storm(StormArgs),
}

#[derive(Args)]
struct StormArgs {
    /// Run direct, then through breakwater, and write the report to --out.
    #[arg(long)]
    compare: bool,
    /// Only through breakwater (without --compare: direct only).
    #[arg(long, conflicts_with = "compare")]
    through_breakwater: bool,
    /// Agents (nodes) in the fleet, 1..=20000.
    #[arg(long, default_value_t = 5000)]
    agents: usize,
    /// Nodes in the cluster (default: one per agent); agents run on the first.
    #[arg(long)]
    nodes: Option<usize>,
    /// Workload pods per node (besides the agent's own pod). The default
    /// shape, 5,000 nodes with 2 pods each, is the real cluster the lab is
    /// calibrated against.
    #[arg(long, default_value_t = 1)]
    pods_per_node: usize,
    /// Agents start uniformly within this window (0s: all at once).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    spread: Duration,
    /// Pods created and deleted per second during the storm.
    #[arg(long, default_value_t = 10.0)]
    churn: f64,
    /// LIST without resourceVersion (a consistent read from etcd) instead of rv=0.
    #[arg(long)]
    consistent_list: bool,
    /// Agents ask for protobuf first (`Accept: application/vnd.kubernetes.protobuf,
    /// application/json`), as kubelet and kube-proxy do.
    #[arg(long)]
    protobuf: bool,
    /// When the admin deletes the DaemonSet (the rollback).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    rollback_after: Duration,
    /// Upper bound on each run.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    max_duration: Duration,
    /// Random seed (agent start times, churn); both runs use the same.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// kube-sim's capacity model: small-cluster, or none (unlimited).
    #[arg(long, default_value = "small-cluster")]
    profile: String,
    /// Breakwater replicas; agents are spread over them and each enforces
    /// its share of the limits.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// The limits file for the breakwater run (default: docker/limits-storm.yaml, built in).
    #[arg(long)]
    limits: Option<PathBuf>,
    /// The breakwater binary (default: $BREAKWATER_BIN, else next to this executable).
    #[arg(long)]
    breakwater: Option<PathBuf>,
    /// Report directory.
    #[arg(long, default_value = "storm-report")]
    out: PathBuf,
    /// Show breakwater's logs (stderr).
    #[arg(long)]
    show_proxy_logs: bool,
    /// The admin probe opens a new connection (a TLS handshake) for every
    /// GET, as a `kubectl` command does, instead of re-using one.
    #[arg(long)]
    probe_new_connections: bool,
    /// Through Breakwater, the admin (probe and rollback) connects to a
    /// `--privileged-listen` listener of its own, as an operator would
    /// point admins' kubeconfigs at it.
    #[arg(long)]
    admin_listener: bool,
}

#[derive(Args)]
struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Directory for ca.crt, admin.crt, admin.key and kubeconfig (created if missing).
    #[arg(long, default_value = "./kube-sim")]
    dir: PathBuf,
    /// Seed namespaces, nodes, pods, configmaps and ServiceAccount demo/agent.
    #[arg(long)]
    seed_demo: bool,
    /// Concurrent streams allowed per HTTP/2 connection, as the apiserver's
    /// flag: 0 means Go's default, 250.
    #[arg(long, default_value_t = breakwater_loadtest::sim::GO_HTTP2_MAX_STREAMS)]
    http2_max_streams_per_connection: u32,
    /// Treat requests without credentials as system:anonymous (true) or
    /// answer them 401 (false), as the apiserver's flag:
    /// `--anonymous-auth=false`.
    #[arg(
        long,
        action = ArgAction::Set,
        default_value_t = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    anonymous_auth: bool,
    /// The `authentication.k8s.io` version serving SelfSubjectReview
    /// (`kubectl auth whoami`): v1 (Kubernetes 1.28+), v1beta1 (1.27),
    /// v1alpha1 (1.26 with its feature gate) or none (1.25 and before, e.g.
    /// v1.24: a proxy without credentials of its own cannot ask "who am I",
    /// and reads `/openid/v1/jwks` with a ServiceAccount token instead).
    #[arg(long, value_enum, default_value = "v1")]
    self_subject_review: breakwater_loadtest::sim::SelfSubjectReviewVersion,
    /// Talk like the apiserver's Go net/http server: its HTTP/2 windows and
    /// frame sizes, Audit-Id and APF response headers, HEADERS and DATA
    /// flushed separately (`--go-like-transport=false`: hyper's defaults).
    #[arg(
        long,
        action = ArgAction::Set,
        default_value_t = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    go_like_transport: bool,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Unary GET latency and throughput through breakwater vs direct to kube-sim (and nginx).
    Overhead(OverheadArgs),
    /// Watch fan-out: N watchers of one shared watch through breakwater, vs the raw-socket limit.
    Fanout(FanoutArgs),
    /// Breakwater RSS per idle watch: TLS HTTP/1.1 connection and HTTP/2 stream.
    Memory(MemoryArgs),
    /// New TLS connections per second and proxy CPU per handshake: ECDSA P-256 vs RSA-2048 serving keys.
    Handshake(HandshakeArgs),
}

#[derive(Args)]
struct HandshakeArgs {
    /// Concurrent clients, each opening one new connection after another.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Measured time per phase.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Rounds of (P-256, RSA-2048); the best phase of each is reported.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// The breakwater binary (default: $BREAKWATER_BIN, else next to this executable).
    #[arg(long)]
    breakwater: Option<PathBuf>,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Show breakwater's logs (stderr).
    #[arg(long)]
    show_proxy_logs: bool,
}

#[derive(Args)]
struct FanoutArgs {
    /// Watchers of the one shared watch.
    #[arg(long, default_value_t = 10_000)]
    subscribers: usize,
    /// Size of one watch event line, bytes.
    #[arg(long, default_value_t = 1024)]
    event_size: usize,
    /// Events written (upper bound; --max-duration may end the run first).
    #[arg(long, default_value_t = 500)]
    events: u64,
    /// Events per second (default: closed loop, as fast as --window allows).
    #[arg(long)]
    rate: Option<f64>,
    /// Events written but not yet received by every watcher, at most.
    #[arg(long, default_value_t = 32)]
    window: u64,
    /// TLS HTTP/2 (watches multiplexed as streams) instead of TLS HTTP/1.1.
    #[arg(long)]
    http2: bool,
    /// Plain HTTP/1.1 on loopback (breakwater's --plain-listen) instead of TLS HTTP/1.1.
    #[arg(long, conflicts_with = "http2")]
    plain: bool,
    /// HTTP/2: watches per connection (breakwater allows 1,000 streams).
    #[arg(long, default_value_t = 500)]
    streams_per_connection: usize,
    /// Upper bound on the writing phase.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    max_duration: Duration,
    /// Upper bound on each raw-socket-limit run.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    raw_duration: Duration,
    /// Skip the raw-socket baseline.
    #[arg(long)]
    skip_raw: bool,
    /// Subscribers ask for protobuf first and read protobuf frames, as
    /// kubelet's informers do.
    #[arg(long)]
    protobuf: bool,
    /// The breakwater binary (default: $BREAKWATER_BIN, else next to this executable).
    #[arg(long)]
    breakwater: Option<PathBuf>,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Show breakwater's logs (stderr).
    #[arg(long)]
    show_proxy_logs: bool,
}

#[derive(Args)]
struct MemoryArgs {
    /// CI's quick run: only the h1 watch and h2 stream cases, 1,200 watches
    /// each, 400 per h2 connection, a shorter settle (about two seconds).
    #[arg(long)]
    quick: bool,
    /// Idle watches (or connections) per case [default: 2000, --quick: 1200].
    #[arg(long)]
    watches: Option<usize>,
    /// HTTP/2: watches per connection [default: 500, --quick: 400].
    #[arg(long)]
    streams_per_connection: Option<usize>,
    /// Exit non-zero if a TLS HTTP/1.1 watch costs more KiB than this.
    #[arg(long)]
    max_kib_per_h1_watch: Option<f64>,
    /// Exit non-zero if an HTTP/2 watch stream costs more KiB than this.
    #[arg(long)]
    max_kib_per_h2_stream: Option<f64>,
    /// Show breakwater's logs (stderr).
    #[arg(long)]
    show_proxy_logs: bool,
    /// The breakwater binary (default: $BREAKWATER_BIN, else next to this executable).
    #[arg(long)]
    breakwater: Option<PathBuf>,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct OverheadArgs {
    /// Concurrent clients, each with one request in flight.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Measured time per phase (e.g. 10s, 1m).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unrecorded warm-up before each measured phase.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Speak HTTP/2, the clients multiplexed over --h2-connections connections.
    #[arg(long)]
    http2: bool,
    /// HTTP/2 connections per phase.
    #[arg(long, default_value_t = 4)]
    h2_connections: usize,
    /// Rounds of (direct, breakwater); the best phase of each is reported.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Upper bound on requests per phase, besides time (the bench's own
    /// clients only).
    #[arg(long, default_value_t = 20_000_000)]
    max_requests: u64,
    /// The breakwater binary (default: $BREAKWATER_BIN, else next to this executable).
    #[arg(long)]
    breakwater: Option<PathBuf>,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Log filter for the breakwater child (BREAKWATER_LOG); "info" includes
    /// its per-request access log in what is measured (and nginx, with
    /// --with-nginx, then writes an access log too).
    #[arg(long, default_value = "warn")]
    proxy_log: String,
    /// Show breakwater's logs (stderr) instead of keeping them for errors.
    #[arg(long)]
    show_proxy_logs: bool,
    /// nginx as a third target in every round (a TLS reverse proxy with
    /// upstream keepalive, configured by the bench; Debian: `apt-get
    /// install -y nginx-light`).
    #[arg(long)]
    with_nginx: bool,
    /// The nginx binary (default: `nginx` on PATH, else /usr/sbin/nginx).
    #[arg(long, requires = "with_nginx")]
    nginx: Option<PathBuf>,
    /// kube-sim's transport: `go-like` (the apiserver's HTTP/2 settings,
    /// response headers and flushing) or `hyper` (hyper's defaults).
    #[arg(long, value_enum, default_value = "go-like")]
    upstream_transport: UpstreamTransport,
    /// The upstream: `kube-sim`, or `go`, a Go net/http stand-in serving
    /// the same ConfigMap (built with the local `go`; Debian: golang-go).
    #[arg(long, value_enum, default_value = "kube-sim")]
    upstream: UpstreamArg,
    /// Who sends the requests: the bench's own clients (`loadtest`), `wrk`
    /// (HTTP/1.1; Debian: wrk) or `h2load` (Debian: nghttp2-client), run
    /// as a child per phase with --clients (and, over HTTP/2,
    /// --h2-connections).
    #[arg(long, value_enum, default_value = "loadtest")]
    load_generator: LoadGenerator,
    /// About how large the GET's answer is, in bytes; a pod is 3000-6000,
    /// and past 2048 the Go-like upstreams answer HTTP/1.1 chunked.
    #[arg(long, default_value_t = breakwater_loadtest::bench::overhead::DEFAULT_OBJECT_BYTES)]
    object_bytes: usize,
    /// kube-sim's worker threads: it runs on a runtime of its own, as an
    /// apiserver is a process of its own (Go: one thread per core). 0 runs
    /// it on the clients' runtime, as every run before session 20 did
    /// (their figures, docs/benchmarks.md §1m). [default: the cores]
    #[arg(long, conflicts_with = "upstream_url")]
    sim_threads: Option<usize>,
    /// Measure against an apiserver of yours instead of kube-sim:
    /// `https://host[:port]`, with --upstream-ca, --token-file and --path.
    /// breakwater and nginx run on this machine in front of it, bound to
    /// 127.0.0.1; the clients verify its certificate for `host`.
    #[arg(long, requires_all = ["upstream_ca", "token_file"], conflicts_with_all = ["upstream", "upstream_transport", "object_bytes"])]
    upstream_url: Option<String>,
    /// With --upstream-url: the CA of the apiserver's serving certificate (PEM).
    #[arg(long, requires = "upstream_url")]
    upstream_ca: Option<PathBuf>,
    /// With --upstream-url: a file holding the bearer token every client
    /// sends (e.g. `kubectl create token SA`); wrk and h2load get it as a
    /// command-line header.
    #[arg(long, requires = "upstream_url")]
    token_file: Option<PathBuf>,
    /// With --upstream-url: what every client GETs, e.g.
    /// /api/v1/namespaces/default/pods/NAME [default: the bench ConfigMap's path].
    #[arg(long, requires = "upstream_url")]
    path: Option<String>,
    /// With --upstream-url: the name nginx verifies in the apiserver's
    /// certificate (nginx checks DNS names only) [default: the URL's host,
    /// or `kubernetes` for an IP address].
    #[arg(long, requires = "upstream_url")]
    nginx_upstream_name: Option<String>,
    /// With --upstream-url: the apiserver's pid, when it runs on this
    /// machine; its CPU per request is then reported (cpu/req up).
    #[arg(long, requires = "upstream_url")]
    upstream_pid: Option<u32>,
    /// One more `breakwater run` argument; repeat it, e.g.
    /// `--breakwater-arg=--upstream-token-file=F` in front of an apiserver
    /// without SelfSubjectReview (before 1.27).
    #[arg(long, allow_hyphen_values = true)]
    breakwater_arg: Vec<std::ffi::OsString>,
}

/// How kube-sim talks in the overhead bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum UpstreamTransport {
    GoLike,
    Hyper,
}

/// What answers in the overhead bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum UpstreamArg {
    KubeSim,
    Go,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().cmd {
        Cmd::Sim(a) => sim(a).await,
        Cmd::Bench(BenchCmd::Overhead(a)) => overhead(a).await,
        Cmd::Bench(BenchCmd::Fanout(a)) => fanout(a).await,
        Cmd::Bench(BenchCmd::Memory(a)) => memory(a).await,
        Cmd::Bench(BenchCmd::Handshake(a)) => handshake(a).await,
        Cmd::Storm(a) => storm(a).await,
    }
}

async fn sim(a: SimArgs) -> anyhow::Result<()> {
    let ip = a.listen.ip().to_string();
    let mut names = vec!["127.0.0.1", "localhost"];
    if !a.listen.ip().is_unspecified() && !names.contains(&ip.as_str()) {
        names.push(&ip);
    }
    let pki = SimPki::generate(&names).context("generate kube-sim certificates")?;
    let admin = pki
        .admin_client()
        .context("issue the admin client certificate")?;
    let cfg = SimConfig {
        listen: a.listen,
        http2_max_streams_per_connection: a.http2_max_streams_per_connection,
        anonymous_auth: a.anonymous_auth,
        go_like_transport: a.go_like_transport,
        self_subject_review: a.self_subject_review,
        ..SimConfig::default()
    };
    let sim = KubeSim::start(cfg, pki)
        .await
        .with_context(|| format!("start kube-sim on {}", a.listen))?;
    if a.seed_demo {
        seed_demo(sim.store()).context("seed demo objects")?;
    }

    std::fs::create_dir_all(&a.dir).with_context(|| format!("create {}", a.dir.display()))?;
    // Absolute paths in the kubeconfig so it works from any working directory.
    let dir = a
        .dir
        .canonicalize()
        .with_context(|| format!("resolve {}", a.dir.display()))?;
    let ca = write(&dir, "ca.crt", sim.pki().serving_ca.cert_pem())?;
    let cert = write(&dir, "admin.crt", &admin.cert_pem)?;
    let key = write_private(&dir, "admin.key", &admin.key_pem)?;
    // A wildcard listen address is not something a client can dial (nor is it
    // in the serving certificate); point the kubeconfig at loopback instead.
    let server = if a.listen.ip().is_unspecified() {
        format!("https://127.0.0.1:{}", sim.addr().port())
    } else {
        sim.url()
    };
    let kubeconfig = write(&dir, "kubeconfig", &kubeconfig(&server, &ca, &cert, &key))?;

    println!("kube-sim: serving on {server}");
    println!(
        "kube-sim: kubeconfig {} (user kubernetes-admin, group system:masters)",
        kubeconfig.display()
    );
    println!(
        "kube-sim: CA {}, client cert {}, key {}",
        ca.display(),
        cert.display(),
        key.display()
    );
    if a.seed_demo {
        let token = sim.issue_token("demo", "agent", Duration::from_secs(24 * 3600));
        let token_file = write_private(&dir, "agent.token", &token)?;
        println!(
            "kube-sim: ServiceAccount demo/agent token (24h) in {}",
            token_file.display()
        );
    }
    println!();
    println!("  KUBECONFIG={} kubectl get ns", kubeconfig.display());
    println!();
    println!("Ctrl-C stops it.");

    wait_for_stop().await?;
    println!("kube-sim: shutting down");
    sim.shutdown().await;
    Ok(())
}

/// Ctrl-C, or SIGTERM (a terminal closing, a process supervisor).
async fn wait_for_stop() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("wait for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

fn write(dir: &Path, name: &str, contents: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, contents).with_context(|| format!("write {}", p.display()))?;
    Ok(p)
}

/// Like [`write`], readable by the owner only (keys, tokens).
fn write_private(dir: &Path, name: &str, contents: &str) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&p)
        .with_context(|| format!("write {}", p.display()))?;
    f.write_all(contents.as_bytes())
        .with_context(|| format!("write {}", p.display()))?;
    Ok(p)
}

fn kubeconfig(server: &str, ca: &Path, cert: &Path, key: &Path) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: kube-sim
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: kubernetes-admin
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: kube-sim
  context:
    cluster: kube-sim
    user: kubernetes-admin
    namespace: default
current-context: kube-sim
",
        ca = ca.display(),
        cert = cert.display(),
        key = key.display()
    )
}

async fn overhead(a: OverheadArgs) -> anyhow::Result<()> {
    let opts = OverheadOpts {
        clients: a.clients,
        duration: a.duration,
        warmup: a.warmup,
        protocol: if a.http2 {
            Protocol::Http2
        } else {
            Protocol::Http1
        },
        h2_connections: a.h2_connections,
        rounds: a.rounds,
        max_requests: a.max_requests,
        breakwater: a.breakwater,
        proxy_log: a.proxy_log,
        proxy_stderr: if a.show_proxy_logs {
            StderrMode::Inherit
        } else {
            StderrMode::Capture
        },
        with_nginx: a.with_nginx,
        nginx: a.nginx,
        upstream: match (a.upstream, a.upstream_transport) {
            _ if a.upstream_url.is_some() => UpstreamKind::External,
            (UpstreamArg::Go, _) => UpstreamKind::Go,
            (UpstreamArg::KubeSim, UpstreamTransport::GoLike) => UpstreamKind::KubeSim,
            (UpstreamArg::KubeSim, UpstreamTransport::Hyper) => UpstreamKind::KubeSimHyper,
        },
        external: match (a.upstream_url, a.upstream_ca, a.token_file) {
            (Some(url), Some(ca_file), Some(token_file)) => Some(ExternalUpstream {
                url,
                ca_file,
                token_file,
                path: a.path.unwrap_or_else(|| BENCH_PATH.to_string()),
                nginx_server_name: a.nginx_upstream_name,
                pid: a.upstream_pid,
            }),
            _ => None,
        },
        breakwater_args: a.breakwater_arg,
        load_generator: a.load_generator,
        object_bytes: a.object_bytes,
        sim_threads: a
            .sim_threads
            .unwrap_or_else(breakwater_loadtest::bench::overhead::default_sim_threads),
    };
    let report = run_overhead(opts).await?;
    println!("{}", report.table());
    if let Some(path) = a.json {
        let json = serde_json::to_string_pretty(&report).context("serialize the report")?;
        std::fs::write(&path, json + "\n").with_context(|| format!("write {}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    report.check()
}

async fn fanout(a: FanoutArgs) -> anyhow::Result<()> {
    use breakwater_loadtest::bench::fanout::{FanoutOpts, run_fanout};
    let opts = FanoutOpts {
        subscribers: a.subscribers,
        event_size: a.event_size,
        events: a.events,
        rate: a.rate,
        window: a.window,
        protocol: if a.http2 {
            Protocol::Http2
        } else if a.plain {
            Protocol::PlainHttp1
        } else {
            Protocol::Http1
        },
        streams_per_connection: a.streams_per_connection,
        max_duration: a.max_duration,
        raw_duration: a.raw_duration,
        skip_raw: a.skip_raw,
        protobuf: a.protobuf,
        breakwater: a.breakwater,
        proxy_stderr: if a.show_proxy_logs {
            StderrMode::Inherit
        } else {
            StderrMode::Capture
        },
    };
    let report = run_fanout(opts).await?;
    println!("{}", report.table());
    write_json(a.json.as_deref(), &report)?;
    anyhow::ensure!(
        report.incomplete_subscribers == 0,
        "{} subscribers did not receive every event",
        report.incomplete_subscribers
    );
    Ok(())
}

async fn memory(a: MemoryArgs) -> anyhow::Result<()> {
    use breakwater_loadtest::bench::memory::{MemoryLimits, MemoryOpts, run_memory};
    let base = if a.quick {
        MemoryOpts::quick()
    } else {
        MemoryOpts::default()
    };
    let opts = MemoryOpts {
        watches: a.watches.unwrap_or(base.watches),
        streams_per_connection: a
            .streams_per_connection
            .unwrap_or(base.streams_per_connection),
        breakwater: a.breakwater,
        proxy_stderr: if a.show_proxy_logs {
            StderrMode::Inherit
        } else {
            StderrMode::Capture
        },
        ..base
    };
    let report = run_memory(opts).await?;
    println!("{}", report.table());
    write_json(a.json.as_deref(), &report)?;
    report.check(&MemoryLimits {
        h1_watch: a.max_kib_per_h1_watch,
        h2_stream: a.max_kib_per_h2_stream,
    })
}

async fn handshake(a: HandshakeArgs) -> anyhow::Result<()> {
    use breakwater_loadtest::bench::handshake::{HandshakeOpts, run_handshake};
    let report = run_handshake(HandshakeOpts {
        clients: a.clients,
        duration: a.duration,
        rounds: a.rounds,
        breakwater: a.breakwater,
        proxy_stderr: if a.show_proxy_logs {
            StderrMode::Inherit
        } else {
            StderrMode::Capture
        },
    })
    .await?;
    println!("{}", report.table());
    write_json(a.json.as_deref(), &report)
}

/// Writes `report` as pretty JSON to `path`, if given.
fn write_json<T: serde::Serialize>(path: Option<&Path>, report: &T) -> anyhow::Result<()> {
    if let Some(path) = path {
        let json = serde_json::to_string_pretty(report).context("serialize the report")?;
        std::fs::write(path, json + "\n").with_context(|| format!("write {}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}

async fn storm(a: StormArgs) -> anyhow::Result<()> {
    use breakwater_loadtest::sim::capacity::CapacityConfig;
    use breakwater_loadtest::storm::{self, Mode, StormOpts};
    let capacity = match a.profile.as_str() {
        "none" => None,
        name => Some(
            CapacityConfig::profile(name)
                .with_context(|| format!("unknown --profile {name} (small-cluster, none)"))?,
        ),
    };
    let limits = match &a.limits {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?,
        None => storm::STORM_LIMITS.to_string(),
    };
    let nofile = storm::raise_nofile_limit();
    if nofile < (a.agents as u64) * 3 {
        eprintln!(
            "warning: open-files limit {nofile} may be too low for {} agents (need ~3 per agent)",
            a.agents
        );
    }
    let opts = StormOpts {
        agents: a.agents,
        nodes: a.nodes.unwrap_or(0),
        pods_per_node: a.pods_per_node,
        spread: a.spread,
        churn: a.churn,
        consistent_list: a.consistent_list,
        protobuf: a.protobuf,
        rollback_after: a.rollback_after,
        max_duration: a.max_duration,
        seed: a.seed,
        capacity,
        replicas: a.replicas,
        limits,
        breakwater: a.breakwater,
        progress: true,
        show_proxy_logs: a.show_proxy_logs,
        probe_new_connections: a.probe_new_connections,
        admin_listener: a.admin_listener,
    };
    let started = std::time::Instant::now();
    if a.compare {
        let c = storm::run_compare(&opts).await?;
        storm::write_report(&c, &a.out)?;
        println!("{}", storm::report::markdown(&c));
        println!(
            "report written to {} in {:.0} s",
            a.out.display(),
            started.elapsed().as_secs_f64()
        );
    } else {
        let mode = if a.through_breakwater {
            Mode::Breakwater
        } else {
            Mode::Direct
        };
        let r = storm::run_storm(&opts, mode).await?;
        storm::report::write_one(&r, &a.out)?;
        println!("{}: {}", mode.name(), storm::report::one_line(&r.metrics));
        println!(
            "summary written to {}",
            a.out.join("summary.json").display()
        );
    }
    Ok(())
}
