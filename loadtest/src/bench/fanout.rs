//! The fan-out benchmark: how many event deliveries per second can breakwater
//! push to N watchers of one shared upstream watch, how late do they arrive,
//! and what does it cost the proxy in CPU — against the raw-socket limit of
//! this machine, measured in the same run (BENCHMARKS.md).
//!
//! One process starts kube-sim (no capacity model, RBAC on) with a
//! ServiceAccount allowed to list/watch configmaps, and the real `breakwater`
//! binary in front of it. N subscribers watch the same collection
//! (`/api/v1/namespaces/fanout/configmaps`) with the same token, so they share
//! one upstream watch (checked: kube-sim counts one open WATCH). The writer
//! then updates one ConfigMap of about `--event-size` bytes in kube-sim's
//! store; each update carries its send time (nanoseconds since a shared
//! `Instant`, in data key `a-sent`, which sorts first so the clients find it in
//! the first bytes of each event line) and every client computes the delivery
//! lag at receipt.
//!
//! The writer is closed-loop unless `--rate` is given: it writes event k only
//! when the subscribers together have received `(k - window) × N` events, so
//! the proxy is kept busy without overrunning its per-subscriber queue (which
//! would evict subscribers, as the apiserver does, and measure nothing).
//!
//! With `--protobuf` the subscribers ask as client-go's protobuf clients do
//! and read length-prefixed protobuf frames; the send time is then found
//! after the ConfigMap data entry's key (`0a 06 "a-sent" 12 0f`).
//!
//! The runs are TLS HTTP/1.1 (one connection per watch), TLS HTTP/2 (watches
//! multiplexed as streams) and plain HTTP/1.1 on breakwater's loopback
//! listener (`--plain-listen`, `--plain`). The raw-socket limit is plaintext TCP: one thread
//! writes the same event bytes to N loopback sockets (one event per write, and
//! eight per write) while async readers drain them.

use std::io::Write;
use std::net::TcpStream as StdTcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Empty};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};

use super::{
    Conn, Connector, Protocol, ScratchDir, client_tls, cpu_seconds, fmt_us, latency_histogram,
};
use crate::error::Chain;
use crate::pki::Ca;
use crate::proc::{BreakwaterProcess, RunArgs, StartOptions, StderrMode, find_breakwater};
use crate::sim::resources;
use crate::sim::store::StoreError;
use crate::sim::{KubeSim, SimConfig, SimPki};

/// Namespace of the watched collection.
pub const NAMESPACE: &str = "fanout";
/// ServiceAccount whose token every subscriber uses.
pub const SERVICE_ACCOUNT: &str = "watcher";
/// The ConfigMap the writer updates.
pub const OBJECT: &str = "fanout-0";
/// The watch every subscriber opens (rv=0: start from the cache at once).
pub const WATCH_PATH: &str = "/api/v1/namespaces/fanout/configmaps?watch=true&resourceVersion=0";
/// What precedes the send time in every event line.
const SENT_MARKER: &[u8] = b"\"a-sent\":\"";
/// Digits of the zero-padded send time: a constant event size.
const SENT_DIGITS: usize = 15;
/// Shards of the lag histogram (fewer lock collisions between clients).
const HIST_SHARDS: usize = 16;

/// Options of [`run_fanout`].
#[derive(Debug, Clone)]
pub struct FanoutOpts {
    pub subscribers: usize,
    /// Target size of one watch event line (JSON envelope included), bytes.
    pub event_size: usize,
    /// Events written (upper bound; `max_duration` may end the run first).
    pub events: u64,
    /// Events per second; `None` = closed loop, as fast as the window allows.
    pub rate: Option<f64>,
    /// Events in flight at most (written but not yet received by everyone).
    pub window: u64,
    pub protocol: Protocol,
    /// HTTP/2: watches per connection (breakwater allows 1,000 streams).
    pub streams_per_connection: usize,
    /// Upper bound on the writing phase.
    pub max_duration: Duration,
    /// Upper bound on each raw-socket-limit run.
    pub raw_duration: Duration,
    /// Skip the raw-socket baseline.
    pub skip_raw: bool,
    /// Subscribers ask for protobuf first, as kubelet does.
    pub protobuf: bool,
    pub breakwater: Option<PathBuf>,
    pub proxy_stderr: StderrMode,
}

impl Default for FanoutOpts {
    fn default() -> Self {
        FanoutOpts {
            subscribers: 10_000,
            event_size: 1024,
            events: 500,
            rate: None,
            window: 32,
            protocol: Protocol::Http1,
            streams_per_connection: 500,
            max_duration: Duration::from_secs(60),
            raw_duration: Duration::from_secs(15),
            skip_raw: false,
            protobuf: false,
            breakwater: None,
            proxy_stderr: StderrMode::Capture,
        }
    }
}

/// The raw-socket limit at one batching.
#[derive(Debug, Clone, Serialize)]
pub struct RawFigures {
    /// Events per write() call.
    pub batch: usize,
    pub sockets: usize,
    /// Events written to every socket.
    pub events: u64,
    pub deliveries: u64,
    pub seconds: f64,
    pub deliveries_per_s: f64,
}

/// The result of [`run_fanout`].
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    pub protocol: Protocol,
    /// `json` or `protobuf`: what the subscribers asked for and read.
    pub encoding: &'static str,
    pub subscribers: usize,
    /// TLS connections the subscribers used.
    pub connections: usize,
    /// Bytes of one event line as delivered.
    pub event_bytes: usize,
    pub rate: Option<f64>,
    pub window: u64,
    pub events_written: u64,
    /// Open WATCHes of configmaps at kube-sim while all subscribers watched.
    pub upstream_watches: i64,
    /// Seconds to open all watches (TLS handshakes included).
    pub connect_seconds: f64,
    pub deliveries: u64,
    /// From the first write to the last receipt.
    pub seconds: f64,
    pub deliveries_per_s: f64,
    pub lag_p50_us: u64,
    pub lag_p99_us: u64,
    pub lag_max_us: u64,
    /// Breakwater's CPU seconds per 1M deliveries.
    pub proxy_cpu_s_per_million: Option<f64>,
    /// This process (kube-sim + the N clients) per 1M deliveries.
    pub loadtest_cpu_s_per_million: Option<f64>,
    /// Subscribers that did not receive every event (evicted, errors, time).
    pub incomplete_subscribers: usize,
    /// First few subscriber errors, for the report.
    pub errors: Vec<String>,
    pub raw: Vec<RawFigures>,
    pub machine: String,
    pub finished_unix: u64,
}

impl FanoutReport {
    /// Breakwater's deliveries/s as a fraction of the raw limit at `batch`.
    pub fn fraction_of_raw(&self, batch: usize) -> Option<f64> {
        self.raw
            .iter()
            .find(|r| r.batch == batch && r.deliveries_per_s > 0.0)
            .map(|r| self.deliveries_per_s / r.deliveries_per_s)
    }

    /// The human-readable summary.
    pub fn table(&self) -> String {
        let mut out = format!(
            "breakwater fan-out: {}, {}, {} subscribers over {} connections, events of {} B, {}\n",
            match self.protocol {
                Protocol::PlainHttp1 => "plain HTTP/1.1 (loopback)".to_string(),
                p => format!("TLS {p}"),
            },
            self.encoding,
            self.subscribers,
            self.connections,
            self.event_bytes,
            match self.rate {
                Some(r) => format!("{r} events/s"),
                None => format!("closed loop (window {} events)", self.window),
            }
        );
        out.push_str(&format!("machine: {}\n\n", self.machine));
        out.push_str(&format!(
            "upstream watches at kube-sim: {}   watches opened in {:.1} s\n",
            self.upstream_watches, self.connect_seconds
        ));
        out.push_str(&format!(
            "events written: {}   deliveries: {} in {:.2} s = {:.0} deliveries/s\n",
            self.events_written, self.deliveries, self.seconds, self.deliveries_per_s
        ));
        out.push_str(&format!(
            "delivery lag: p50 {}, p99 {}, max {}\n",
            fmt_us(self.lag_p50_us),
            fmt_us(self.lag_p99_us),
            fmt_us(self.lag_max_us)
        ));
        let cpu = |c: Option<f64>| c.map_or_else(|| "-".to_string(), |s| format!("{s:.2} s"));
        out.push_str(&format!(
            "CPU per 1M deliveries: breakwater {}, loadtest (kube-sim + clients) {}\n",
            cpu(self.proxy_cpu_s_per_million),
            cpu(self.loadtest_cpu_s_per_million)
        ));
        if self.incomplete_subscribers > 0 {
            out.push_str(&format!(
                "INCOMPLETE: {} subscribers missed events; first errors: {:?}\n",
                self.incomplete_subscribers, self.errors
            ));
        }
        for r in &self.raw {
            out.push_str(&format!(
                "raw-socket limit, {} event(s)/write, {} sockets: {} deliveries in {:.2} s = {:.0}/s; breakwater = {:.3} of it\n",
                r.batch,
                r.sockets,
                r.deliveries,
                r.seconds,
                r.deliveries_per_s,
                if r.deliveries_per_s > 0.0 {
                    self.deliveries_per_s / r.deliveries_per_s
                } else {
                    f64::NAN
                }
            ));
        }
        out
    }
}

/// Runs the benchmark: kube-sim, breakwater, N watches, the writer, then the
/// raw-socket limit at the same N.
pub async fn run_fanout(opts: FanoutOpts) -> anyhow::Result<FanoutReport> {
    ensure!(opts.subscribers > 0, "--subscribers must be at least 1");
    ensure!(opts.events > 0, "--events must be at least 1");
    ensure!(opts.window > 0, "--window must be at least 1");
    let nofile = crate::storm::raise_nofile_limit();
    // Each TLS watch costs a descriptor here and one in breakwater; the raw
    // run needs two here.
    if nofile < (opts.subscribers as u64) * 2 + 256 {
        tracing::warn!(
            nofile,
            "open-files limit may be too low for {} subscribers",
            opts.subscribers
        );
    }
    let bin = find_breakwater(opts.breakwater.as_deref())?;
    let pki = SimPki::generate(&["127.0.0.1", "localhost"]).context("kube-sim PKI")?;
    let sim = KubeSim::start(SimConfig::default(), pki)
        .await
        .context("start kube-sim")?;
    let result = with_sim(&sim, &bin, &opts).await;
    sim.shutdown().await;
    let mut report = result?;
    eprintln!("{}", report.table());
    if !opts.skip_raw {
        let event = event_line(&sim_free_object(report.event_bytes));
        // The raw run holds both ends of every socket in this process: two
        // descriptors per subscriber, under the hard open-files limit.
        let sockets = opts
            .subscribers
            .min((nofile.saturating_sub(600) / 2) as usize)
            .max(1);
        if sockets < opts.subscribers {
            eprintln!("raw-socket limit measured at {sockets} sockets (open-files limit {nofile})");
        }
        for batch in [1, 8] {
            let raw = raw_limit(
                sockets,
                event.clone(),
                batch,
                report.events_written.max(8),
                opts.raw_duration,
            )
            .await
            .with_context(|| format!("raw-socket limit, batch {batch}"))?;
            eprintln!(
                "raw limit, {batch}/write: {:.0} deliveries/s",
                raw.deliveries_per_s
            );
            report.raw.push(raw);
        }
    }
    Ok(report)
}

/// A breakwater child in front of a seeded kube-sim, with its TLS material.
pub(crate) struct ProxyEnv {
    pub proxy: BreakwaterProcess,
    pub proxy_ca: Ca,
    pub token: String,
    _dir: ScratchDir,
}

impl ProxyEnv {
    /// Seeds `sim` (see [`seed`]) and starts breakwater in front of it.
    pub(crate) async fn start(
        sim: &KubeSim,
        bin: &Path,
        stderr: StderrMode,
        event_size: usize,
    ) -> anyhow::Result<ProxyEnv> {
        seed(sim, event_size).context("seed kube-sim")?;
        let token = sim.issue_token(NAMESPACE, SERVICE_ACCOUNT, Duration::from_secs(3600));
        let proxy_ca = Ca::new("breakwater-fanout-ca")?;
        let cert = proxy_ca.issue_server(&["127.0.0.1", "localhost"])?;
        let dir = ScratchDir::new()?;
        let args = RunArgs {
            tls_cert: dir.write("breakwater.crt", &cert.cert_pem)?,
            tls_key: dir.write("breakwater.key", &cert.key_pem)?,
            upstream: sim.url(),
            upstream_ca: dir.write("upstream-ca.crt", sim.pki().serving_ca.cert_pem())?,
            // Plain HTTP/1.1 on loopback too, for the plaintext figure.
            // Every subscriber comes from 127.0.0.1: no per-source cap.
            extra: vec![
                "--plain-listen".into(),
                "127.0.0.1:0".into(),
                "--max-connections-per-source".into(),
                "0".into(),
            ],
            ..RunArgs::default()
        };
        let start = StartOptions {
            stderr,
            envs: vec![
                ("BREAKWATER_LOG".into(), "warn".into()),
                ("RUST_LOG".into(), "warn".into()),
            ],
            ..StartOptions::default()
        };
        let proxy = BreakwaterProcess::start(bin, args.to_args(), start)
            .await
            .with_context(|| format!("start {}", bin.display()))?;
        Ok(ProxyEnv {
            proxy,
            proxy_ca,
            token,
            _dir: dir,
        })
    }

    /// A connector to the proxy speaking `proto`.
    pub(crate) fn connector(&self, proto: Protocol) -> anyhow::Result<Connector> {
        let addr = match proto {
            Protocol::PlainHttp1 => self
                .proxy
                .plain_addr()
                .context("breakwater announced no plain listener")?,
            _ => self.proxy.listen_addr(),
        };
        Ok(Connector {
            addr,
            tls: client_tls(&[self.proxy_ca.cert_pem()], proto)?,
            proto,
            server_name: None,
        })
    }

    pub(crate) fn auth(&self) -> anyhow::Result<HeaderValue> {
        HeaderValue::from_str(&format!("Bearer {}", self.token)).context("token header")
    }
}

/// Namespace `fanout`, ServiceAccount `fanout/watcher`, a ClusterRole letting
/// it get/list/watch configmaps and its binding, and ConfigMap `fanout-0`
/// padded so one watch event line is about `event_size` bytes.
pub(crate) fn seed(sim: &KubeSim, event_size: usize) -> anyhow::Result<()> {
    let find = |g: &str, v: &str, p: &str| {
        resources::find(g, v, p).with_context(|| format!("kube-sim serves no {p}"))
    };
    let store = sim.store();
    let tolerate_exists = |r: Result<_, StoreError>| match r {
        Ok(_) | Err(StoreError::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e),
    };
    tolerate_exists(store.create(
        find("", "v1", "namespaces")?,
        None,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
    ))?;
    tolerate_exists(store.create(
        find("", "v1", "serviceaccounts")?,
        Some(NAMESPACE),
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": SERVICE_ACCOUNT, "namespace": NAMESPACE}}),
    ))?;
    const RBAC: &str = "rbac.authorization.k8s.io";
    tolerate_exists(store.create(
        find(RBAC, "v1", "clusterroles")?,
        None,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": "fanout-watcher"},
               "rules": [{"apiGroups": [""], "resources": ["configmaps"],
                          "verbs": ["get", "list", "watch"]}]}),
    ))?;
    tolerate_exists(store.create(
        find(RBAC, "v1", "clusterrolebindings")?,
        None,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "fanout-watcher"},
               "roleRef": {"apiGroup": RBAC, "kind": "ClusterRole", "name": "fanout-watcher"},
               "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT,
                             "namespace": NAMESPACE}]}),
    ))?;
    let cms = find("", "v1", "configmaps")?;
    // Create with no padding, measure what kube-sim adds, then pad to size.
    let created = store.create(cms, Some(NAMESPACE), object(0, 0))?;
    let overhead = event_line(&created).len();
    let pad = event_size.saturating_sub(overhead);
    store.update(cms, Some(NAMESPACE), OBJECT, object(0, pad))?;
    Ok(())
}

/// The ConfigMap body with send time `sent_nanos` and `pad` bytes of padding.
fn object(sent_nanos: u64, pad: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": OBJECT, "namespace": NAMESPACE},
           "data": {"a-sent": format!("{sent_nanos:0SENT_DIGITS$}"), "pad": "x".repeat(pad)}})
}

/// A stand-in for the stored object (with kube-sim's metadata fields) of
/// about `event_bytes` as an event line, for the raw-socket run.
fn sim_free_object(event_bytes: usize) -> Value {
    let mut v = object(1, 0);
    v["metadata"]["uid"] = json!("00000000-0000-0000-0000-000000000000");
    v["metadata"]["resourceVersion"] = json!("1000");
    v["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    let overhead = event_line(&v).len();
    v["data"]["pad"] = json!("x".repeat(event_bytes.saturating_sub(overhead)));
    v
}

/// `{"type":"MODIFIED","object":OBJ}\n`, as a watch stream frames it.
fn event_line(obj: &Value) -> Bytes {
    let mut s = serde_json::to_vec(&json!({"type": "MODIFIED", "object": obj}))
        .expect("a JSON value serializes");
    s.push(b'\n');
    Bytes::from(s)
}

/// The send time in one event line: the digits after `"a-sent":"`. Looked
/// for in the first bytes first (keys are sorted, so it comes early).
pub fn parse_sent(line: &[u8]) -> Option<u64> {
    let head = &line[..line.len().min(200)];
    let at = find(head, SENT_MARKER).or_else(|| find(line, SENT_MARKER))?;
    let digits = &line[at + SENT_MARKER.len()..];
    let end = digits.iter().position(|b| !b.is_ascii_digit())?;
    if end == 0 {
        return None;
    }
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Index of the first `\n` in `buf`, eight bytes at a time (the readers scan
/// every delivered byte; a byte loop would cost the clients more CPU than the
/// proxy spends).
pub fn find_newline(buf: &[u8]) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    const NL: u64 = LO * b'\n' as u64;
    let mut chunks = buf.chunks_exact(8);
    let mut base = 0;
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("chunks_exact gives 8 bytes")) ^ NL;
        // A zero byte in w (a newline in c) sets its high bit here.
        let z = w.wrapping_sub(LO) & !w & HI;
        if z != 0 {
            return Some(base + (z.trailing_zeros() / 8) as usize);
        }
        base += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == b'\n')
        .map(|i| base + i)
}

/// What precedes the send time in a protobuf ConfigMap: the data map
/// entry's key field (1, "a-sent") and its value's tag and length (2, 15).
const SENT_MARKER_PB: &[u8] = b"\x0a\x06a-sent\x12\x0f";

/// The send time in one protobuf watch frame.
pub fn parse_sent_pb(frame: &[u8]) -> Option<u64> {
    let at = find(frame, SENT_MARKER_PB)?;
    let digits = frame.get(at + SENT_MARKER_PB.len()..at + SENT_MARKER_PB.len() + SENT_DIGITS)?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Splits a stream of body chunks into length-prefixed protobuf frames and
/// hands each complete frame's send time (0 when absent) to the caller.
#[derive(Default)]
pub struct FrameSplitter {
    buf: Vec<u8>,
}

impl FrameSplitter {
    pub fn feed(&mut self, chunk: &[u8], mut on_frame: impl FnMut(u64)) {
        self.buf.extend_from_slice(chunk);
        let mut at = 0;
        while let Some(len) = self.buf.get(at..at + 4) {
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let Some(frame) = self.buf.get(at + 4..at + 4 + len) else {
                break;
            };
            on_frame(parse_sent_pb(frame).unwrap_or(0));
            at += 4 + len;
        }
        self.buf.drain(..at);
    }
}

/// A subscriber's reader for its encoding.
enum Splitter {
    Lines(LineSplitter),
    Frames(FrameSplitter),
}

impl Splitter {
    fn feed(&mut self, chunk: &[u8], on_event: impl FnMut(u64)) {
        match self {
            Splitter::Lines(s) => s.feed(chunk, on_event),
            Splitter::Frames(s) => s.feed(chunk, on_event),
        }
    }
}

/// Splits a stream of body chunks into lines and hands each complete line's
/// send time (0 when absent) to the caller.
#[derive(Default)]
pub struct LineSplitter {
    carry: Vec<u8>,
}

impl LineSplitter {
    /// Feeds one chunk; calls `on_line` with each completed line's send time.
    pub fn feed(&mut self, mut chunk: &[u8], mut on_line: impl FnMut(u64)) {
        if !self.carry.is_empty() {
            match find_newline(chunk) {
                Some(i) => {
                    self.carry.extend_from_slice(&chunk[..i]);
                    on_line(parse_sent(&self.carry).unwrap_or(0));
                    self.carry.clear();
                    chunk = &chunk[i + 1..];
                }
                None => {
                    self.carry.extend_from_slice(chunk);
                    return;
                }
            }
        }
        while let Some(i) = find_newline(chunk) {
            on_line(parse_sent(&chunk[..i]).unwrap_or(0));
            chunk = &chunk[i + 1..];
        }
        self.carry.extend_from_slice(chunk);
    }
}

/// What all subscribers and the writer share.
struct Shared {
    base: Instant,
    /// Subscribers whose watch answered 200.
    ready: AtomicUsize,
    ready_notify: Notify,
    /// Events received by all subscribers together (send time > 0 only).
    delivered: AtomicU64,
    progress: Notify,
    /// Nanoseconds since `base` of the latest receipt of anyone.
    last_receipt: AtomicU64,
    hists: Vec<Mutex<Histogram<u64>>>,
    /// Subscribers stop reading here at the latest.
    deadline: Instant,
    /// Subscribers ask for and read protobuf.
    protobuf: bool,
}

impl Shared {
    fn nanos(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// How one subscriber ended.
struct SubOutcome {
    received: u64,
    error: Option<String>,
}

async fn with_sim(sim: &KubeSim, bin: &Path, opts: &FanoutOpts) -> anyhow::Result<FanoutReport> {
    let env = ProxyEnv::start(sim, bin, opts.proxy_stderr, opts.event_size).await?;
    let connector = env.connector(opts.protocol)?;
    let auth = env.auth()?;
    let event_bytes = event_line(
        &*sim
            .store()
            .get(
                resources::find("", "v1", "configmaps").context("configmaps")?,
                Some(NAMESPACE),
                OBJECT,
            )
            .context("seeded object")?,
    )
    .len();

    let connect_started = Instant::now();
    let shared = Arc::new(Shared {
        base: Instant::now(),
        ready: AtomicUsize::new(0),
        ready_notify: Notify::new(),
        delivered: AtomicU64::new(0),
        progress: Notify::new(),
        last_receipt: AtomicU64::new(0),
        hists: (0..HIST_SHARDS)
            .map(|_| Mutex::new(latency_histogram()))
            .collect(),
        deadline: Instant::now() + opts.max_duration + Duration::from_secs(120),
        protobuf: opts.protobuf,
    });
    let n = opts.subscribers;
    // Connections: one per watch (h1), or shared by `streams_per_connection`.
    let conns = match opts.protocol {
        Protocol::Http1 | Protocol::PlainHttp1 => n,
        Protocol::Http2 => n.div_ceil(opts.streams_per_connection.max(1)),
    };
    let handshakes = Arc::new(Semaphore::new(128));
    let mut h2: Vec<Conn> = Vec::new();
    if opts.protocol == Protocol::Http2 {
        for _ in 0..conns {
            h2.push(connector.connect().await?);
        }
    }
    // Events each subscriber expects: unknown (MAX) until the writer is done.
    let (expected_tx, expected_rx) = tokio::sync::watch::channel(u64::MAX);
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let conn = match opts.protocol {
            Protocol::Http1 | Protocol::PlainHttp1 => None,
            Protocol::Http2 => Some(h2[i % conns].share().expect("h2 connections can be shared")),
        };
        let (connector, auth, shared, sem, expected) = (
            connector.clone(),
            auth.clone(),
            shared.clone(),
            handshakes.clone(),
            expected_rx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            subscriber(conn, connector, auth, shared, sem, expected, i).await
        }));
    }
    drop(h2);
    // Wait for every watch to be open (or the first failure to show).
    let open_by = Instant::now() + Duration::from_secs(180);
    loop {
        let notified = shared.ready_notify.notified();
        let ready = shared.ready.load(Ordering::Acquire);
        if ready >= n {
            break;
        }
        if let Some(t) = tasks.iter().find(|t| t.is_finished()) {
            let _ = t;
            bail!(
                "a subscriber ended before all {n} watches were open ({ready} open); breakwater output:\n{}",
                env.proxy.output_tail()
            );
        }
        if Instant::now() >= open_by {
            bail!("only {ready} of {n} watches open after 180 s");
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
    }
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    let upstream_watches = sim.open_watches("configmaps");
    eprintln!(
        "{n} watches open in {connect_seconds:.1} s; upstream watches at kube-sim: {upstream_watches}"
    );

    // The writer: closed loop (window) or paced (rate), bounded by count and time.
    let cms = resources::find("", "v1", "configmaps").context("configmaps")?;
    let template = sim.store().get(cms, Some(NAMESPACE), OBJECT)?;
    let pad_len = template["data"]["pad"].as_str().map_or(0, str::len);
    let pid = env.proxy.pid();
    let write_started = Instant::now();
    let cpu_before = (cpu_seconds(pid), cpu_seconds(None));
    let write_end = write_started + opts.max_duration;
    let mut written = 0u64;
    let n64 = n as u64;
    while written < opts.events && Instant::now() < write_end {
        let k = written + 1;
        if let Some(rate) = opts.rate {
            let at = write_started + Duration::from_secs_f64(written as f64 / rate);
            tokio::time::sleep_until(at.into()).await;
        }
        // Flow control: at most `window` events not yet everywhere.
        let need = k.saturating_sub(opts.window).saturating_mul(n64);
        loop {
            let notified = shared.progress.notified();
            if shared.delivered.load(Ordering::Acquire) >= need || Instant::now() >= write_end {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
        let sent = shared.nanos().max(1);
        sim.store()
            .update(cms, Some(NAMESPACE), OBJECT, object(sent, pad_len))
            .context("update the fan-out object")?;
        written = k;
    }
    // Subscribers that already have everything end now.
    let _ = expected_tx.send(written);
    let mut incomplete = 0usize;
    let mut errors = Vec::new();
    let mut deliveries = 0u64;
    // Subscribers end when they have `written` events; bound the wait.
    let drain_by = Instant::now() + Duration::from_secs(60);
    for mut t in tasks {
        let left = drain_by.saturating_duration_since(Instant::now());
        let joined = tokio::time::timeout(left.max(Duration::from_millis(1)), &mut t).await;
        if joined.is_err() {
            t.abort();
        }
        match joined {
            Ok(Ok(o)) => {
                deliveries += o.received;
                if o.received < written {
                    incomplete += 1;
                }
                if let Some(e) = o.error
                    && errors.len() < 5
                {
                    errors.push(e);
                }
            }
            Ok(Err(e)) => {
                incomplete += 1;
                errors.push(format!("subscriber task: {e}"));
            }
            Err(_) => {
                incomplete += 1;
                if errors.len() < 5 {
                    errors.push("subscriber still short of events after the drain bound".into());
                }
            }
        }
    }
    let cpu_after = (cpu_seconds(pid), cpu_seconds(None));
    let last = shared.last_receipt.load(Ordering::Acquire);
    let first = write_started.duration_since(shared.base).as_nanos() as f64;
    let seconds = ((last as f64 - first) / 1e9).max(1e-9);
    let mut hist = latency_histogram();
    for h in &shared.hists {
        hist.add(&*h.lock().unwrap_or_else(|e| e.into_inner()))
            .context("merge histograms")?;
    }
    let per_million = |b: Option<f64>, a: Option<f64>| {
        let (b, a) = b.zip(a)?;
        (deliveries > 0).then(|| (a - b) * 1e6 / deliveries as f64)
    };
    let report = FanoutReport {
        encoding: if opts.protobuf { "protobuf" } else { "json" },
        protocol: opts.protocol,
        subscribers: n,
        connections: conns,
        event_bytes,
        rate: opts.rate,
        window: opts.window,
        events_written: written,
        upstream_watches,
        connect_seconds,
        deliveries,
        seconds,
        deliveries_per_s: deliveries as f64 / seconds,
        lag_p50_us: hist.value_at_quantile(0.5),
        lag_p99_us: hist.value_at_quantile(0.99),
        lag_max_us: hist.max(),
        proxy_cpu_s_per_million: per_million(cpu_before.0, cpu_after.0),
        loadtest_cpu_s_per_million: per_million(cpu_before.1, cpu_after.1),
        incomplete_subscribers: incomplete,
        errors,
        raw: Vec::new(),
        machine: machine(),
        finished_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    if let Err(e) = env.proxy.shutdown(Duration::from_secs(10)).await {
        tracing::warn!(error = %Chain(&e), "stopping breakwater");
    }
    Ok(report)
}

/// The watch request.
pub(crate) fn watch_request(
    conn: &Conn,
    connector: &Connector,
    auth: &HeaderValue,
) -> Request<Empty<Bytes>> {
    super::get_request(
        conn,
        connector,
        WATCH_PATH,
        auth,
        "breakwater-loadtest/fanout",
    )
}

/// One watcher: connect (h1) or use the shared connection (h2), open the
/// watch, then read until it has every event the writer wrote.
async fn subscriber(
    conn: Option<Conn>,
    connector: Connector,
    auth: HeaderValue,
    shared: Arc<Shared>,
    handshakes: Arc<Semaphore>,
    mut expected: tokio::sync::watch::Receiver<u64>,
    idx: usize,
) -> SubOutcome {
    let protobuf = shared.protobuf;
    let fail = |e: String| SubOutcome {
        received: 0,
        error: Some(e),
    };
    let mut conn = match conn {
        Some(c) => c,
        None => {
            let _permit = handshakes.acquire().await;
            match connector.connect().await {
                Ok(c) => c,
                Err(e) => return fail(format!("connect: {}", Chain(&e))),
            }
        }
    };
    let mut req = watch_request(&conn, &connector, &auth);
    if protobuf {
        req.headers_mut().insert(
            http::header::ACCEPT,
            HeaderValue::from_static("application/vnd.kubernetes.protobuf, application/json"),
        );
    }
    let resp = match conn.send(req).await {
        Ok(r) => r,
        Err(e) => return fail(format!("watch request: {}", Chain(&e))),
    };
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes());
        return fail(format!("watch answered {status}: {body:?}"));
    }
    shared.ready.fetch_add(1, Ordering::AcqRel);
    shared.ready_notify.notify_one();
    let is_pb = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| {
            v.as_bytes()
                .starts_with(b"application/vnd.kubernetes.protobuf")
        });
    if is_pb != protobuf {
        return fail(format!(
            "asked {} and the watch answered {:?}",
            if protobuf { "protobuf" } else { "JSON" },
            resp.headers().get(http::header::CONTENT_TYPE)
        ));
    }
    let mut splitter = if protobuf {
        Splitter::Frames(FrameSplitter::default())
    } else {
        Splitter::Lines(LineSplitter::default())
    };
    let mut body = resp.into_body();
    let mut received = 0u64;
    let mut lags: Vec<u64> = Vec::with_capacity(64);
    let shard = idx % HIST_SHARDS;
    loop {
        if received >= *expected.borrow_and_update() {
            break;
        }
        let frame = tokio::select! {
            f = body.frame() => f,
            r = expected.changed() => {
                if r.is_err() {
                    return SubOutcome { received, error: Some("run ended".into()) };
                }
                continue;
            }
            _ = tokio::time::sleep_until(shared.deadline.into()) => {
                return SubOutcome { received, error: Some("deadline".into()) };
            }
        };
        let data = match frame {
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
            Some(Err(e)) => {
                return SubOutcome {
                    received,
                    error: Some(format!("body: {}", Chain(&e))),
                };
            }
            None => {
                return SubOutcome {
                    received,
                    error: Some("watch ended (evicted or closed)".into()),
                };
            }
        };
        let now = shared.nanos();
        let before = received;
        splitter.feed(&data, |sent| {
            if sent > 0 {
                received += 1;
                lags.push(now.saturating_sub(sent) / 1_000);
            }
        });
        if received > before {
            shared.last_receipt.fetch_max(now, Ordering::AcqRel);
            {
                let mut h = shared.hists[shard]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                for us in lags.drain(..) {
                    h.saturating_record(us.max(1));
                }
            }
            shared
                .delivered
                .fetch_add(received - before, Ordering::AcqRel);
            shared.progress.notify_one();
        }
    }
    drop(conn);
    SubOutcome {
        received,
        error: None,
    }
}

/// The raw-socket limit: one thread writes `event` (`batch` copies per
/// write) to `n` loopback sockets while async readers drain and count them.
/// Bounded by `max_events` per socket and `max_time` of writing.
pub async fn raw_limit(
    n: usize,
    event: Bytes,
    batch: usize,
    max_events: u64,
    max_time: Duration,
) -> anyhow::Result<RawFigures> {
    ensure!(n > 0 && batch > 0, "raw limit needs sockets and a batch");
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let bytes = Arc::new(AtomicU64::new(0));
    let base = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut writers: Vec<StdTcpStream> = Vec::with_capacity(n);
    let mut readers = Vec::with_capacity(n);
    for _ in 0..n {
        let client = TcpStream::connect(addr).await?;
        let (server, _) = listener.accept().await?;
        server.set_nodelay(true)?;
        let std = server.into_std()?;
        std.set_nonblocking(false)?;
        writers.push(std);
        let (bytes, last) = (bytes.clone(), last.clone());
        readers.push(tokio::spawn(async move {
            // A per-thread scratch buffer: N readers do not need N buffers.
            thread_local! {
                static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 64 * 1024]);
            }
            loop {
                if client.readable().await.is_err() {
                    return;
                }
                let got = BUF.with(|b| client.try_read(&mut b.borrow_mut()));
                match got {
                    Ok(0) => return,
                    Ok(k) => {
                        bytes.fetch_add(k as u64, Ordering::AcqRel);
                        let now = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
                        last.fetch_max(now, Ordering::AcqRel);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        }));
    }
    let buf: Vec<u8> = event
        .iter()
        .copied()
        .cycle()
        .take(event.len() * batch)
        .collect();
    let rounds_max = (max_events / batch as u64).max(1);
    let writer = std::thread::spawn(move || -> std::io::Result<(u64, u64)> {
        let start = Instant::now();
        let start_ns = u64::try_from(start.duration_since(base).as_nanos()).unwrap_or(0);
        let mut rounds = 0u64;
        while rounds < rounds_max && start.elapsed() < max_time {
            for s in writers.iter_mut() {
                s.write_all(&buf)?;
            }
            rounds += 1;
        }
        // Closing the sockets ends the readers once they have drained.
        drop(writers);
        Ok((rounds, start_ns))
    });
    let (rounds, start_ns) = tokio::task::spawn_blocking(move || writer.join())
        .await
        .context("join the writer")?
        .map_err(|_| anyhow::anyhow!("raw writer thread panicked"))??;
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(60), r).await;
    }
    let events = rounds * batch as u64;
    let total = bytes.load(Ordering::Acquire);
    let deliveries = total / event.len() as u64;
    let seconds = ((last.load(Ordering::Acquire).saturating_sub(start_ns)) as f64 / 1e9).max(1e-9);
    Ok(RawFigures {
        batch,
        sockets: n,
        events,
        deliveries,
        seconds,
        deliveries_per_s: deliveries as f64 / seconds,
    })
}

/// "2 CPUs, AMD EPYC ..." from the standard library and /proc/cpuinfo.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} CPUs, {model}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_time_is_found_early_or_late_and_absent_is_none() {
        let line = event_line(&object(123_456, 50));
        assert_eq!(parse_sent(&line), Some(123_456));
        let late = format!(
            "{{\"x\":\"{}\",\"a-sent\":\"000000000000042\"}}",
            "y".repeat(500)
        );
        assert_eq!(parse_sent(late.as_bytes()), Some(42));
        assert_eq!(parse_sent(b"{\"type\":\"BOOKMARK\"}"), None);
        assert_eq!(parse_sent(b"\"a-sent\":\"\""), None);
    }

    #[test]
    fn newline_search_matches_a_byte_loop() {
        for len in 0..40 {
            for at in 0..=len {
                let mut v = vec![b'a'; len];
                if at < len {
                    v[at] = b'\n';
                }
                // Bytes that differ from '\n' by one bit must not match.
                if at + 1 < len {
                    v[at + 1] = b'\n' ^ 0x80;
                }
                let want = v.iter().position(|&b| b == b'\n');
                assert_eq!(find_newline(&v), want, "len {len} at {at}");
            }
        }
    }

    #[test]
    fn lines_split_across_chunks_are_reassembled() {
        let mut all = Vec::new();
        for sent in 1..=5u64 {
            all.extend_from_slice(&event_line(&object(sent * 1000, 30)));
        }
        for cut in [1usize, 7, 50, 97, all.len() - 1] {
            let mut s = LineSplitter::default();
            let mut got = Vec::new();
            for chunk in all.chunks(cut) {
                s.feed(chunk, |t| got.push(t));
            }
            assert_eq!(got, vec![1000, 2000, 3000, 4000, 5000], "chunks of {cut}");
        }
    }

    #[test]
    fn protobuf_frames_split_across_chunks_are_reassembled() {
        let frame = |sent: u64| {
            let mut msg = b"\x0a\x08MODIFIED\x12\x30".to_vec();
            msg.extend_from_slice(SENT_MARKER_PB);
            msg.extend_from_slice(format!("{sent:0SENT_DIGITS$}").as_bytes());
            let mut f = (msg.len() as u32).to_be_bytes().to_vec();
            f.extend_from_slice(&msg);
            f
        };
        let all: Vec<u8> = (1..=5).flat_map(frame).collect();
        for cut in [1, 3, 4, 7, 29, 64] {
            let mut s = FrameSplitter::default();
            let mut got = Vec::new();
            for chunk in all.chunks(cut) {
                s.feed(chunk, |sent| got.push(sent));
            }
            assert_eq!(got, vec![1, 2, 3, 4, 5], "chunks of {cut}");
        }
        assert_eq!(parse_sent_pb(b"no marker"), None);
    }

    #[test]
    fn padding_brings_the_event_to_the_asked_size() {
        let v = sim_free_object(1024);
        assert_eq!(event_line(&v).len(), 1024);
    }

    #[tokio::test]
    async fn raw_limit_delivers_every_byte() {
        let event = event_line(&sim_free_object(256));
        let r = raw_limit(4, event, 8, 64, Duration::from_secs(5))
            .await
            .expect("raw run");
        assert_eq!(r.events, 64);
        assert_eq!(r.deliveries, 4 * 64);
        assert!(r.deliveries_per_s > 0.0);
    }
}
