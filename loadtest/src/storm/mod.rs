//! The incident lab: replay the DaemonSet storm against kube-sim, straight
//! and through Breakwater, and measure what the control plane and an admin
//! feel.
//!
//! One run ([`run_storm`]): kube-sim starts with the capacity model
//! (`small-cluster` unless told otherwise), seeded with one node's worth of
//! pods per agent and the telemetry DaemonSet (ServiceAccount
//! `monitoring/node-agent`, allowed to list/watch pods). N agents
//! ([`agent`]) start within `spread`, each a client-go-like informer on its
//! own TLS connection with its own token; pods churn at `churn`/s; an admin
//! (`system:masters`, client certificate) GETs `/api/v1/namespaces/default`
//! every 100 ms; after `rollback_after` the admin DELETEs the DaemonSet and
//! the lab measures how long that write took to succeed. Then churn stops,
//! the lab waits (bounded) for every agent to watch and to agree with
//! kube-sim, stops the fleet, and compares every agent's view with the truth.
//! [`run_compare`] does that twice — direct, then through `breakwater`
//! child process(es) — with the same seed, and [`report`] writes the summary
//! and the plots.
//!
//! Everything is bounded: agents ≤ 20,000, `max_duration`, 127.0.0.1 only.

pub mod agent;
pub mod pb;
pub mod report;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::proc::{BreakwaterProcess, RunArgs, StartOptions, StderrMode, find_breakwater};
use crate::sim::capacity::CapacityConfig;
use crate::sim::store::ListOptions;
use crate::sim::{KubeSim, SimConfig, SimPki, resources};
use agent::{AgentSpec, AgentState, FleetCounters};

/// The DaemonSet's namespace and ServiceAccount (as in docker/limits.yaml).
pub const AGENT_NAMESPACE: &str = "monitoring";
pub const AGENT_SA: &str = "node-agent";
/// Where the workload pods live.
const WORKLOAD_NAMESPACE: &str = "workloads";
/// The most agents a run accepts.
pub const MAX_AGENTS: usize = 20_000;
/// Sampling period of the time series.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// The admin probe's period.
const PROBE_EVERY: Duration = Duration::from_millis(100);
/// A probe slower than this counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// The limits file the "through Breakwater" run uses (docker/limits-storm.yaml).
pub const STORM_LIMITS: &str = include_str!("../../../docker/limits-storm.yaml");

/// How to run the storm.
#[derive(Debug, Clone)]
pub struct StormOpts {
    pub agents: usize,
    /// Nodes in the cluster (fewer than `agents`, 0 included: one per
    /// agent; agents run on the first ones). Every node has an agent pod and `pods_per_node` others.
    pub nodes: usize,
    /// Pods per node besides the agent's own pod.
    pub pods_per_node: usize,
    /// Agents start uniformly within this (zero: all at once).
    pub spread: Duration,
    /// Pods created and deleted per second (together) until the rollback.
    pub churn: f64,
    /// LIST without resourceVersion (a consistent read from etcd).
    pub consistent_list: bool,
    /// Agents ask for protobuf first, as kubelet does.
    pub protobuf: bool,
    /// When the admin deletes the DaemonSet.
    pub rollback_after: Duration,
    /// Hard bound on one run, from the first agent to the stop.
    pub max_duration: Duration,
    pub seed: u64,
    /// kube-sim's capacity model (`None`: unlimited).
    pub capacity: Option<CapacityConfig>,
    /// Breakwater replicas in the proxied run (agents spread over them).
    pub replicas: usize,
    /// The limits file's text (its `replicas:` is set to `replicas`).
    pub limits: String,
    /// The breakwater binary (`None`: find it like the benchmarks do).
    pub breakwater: Option<PathBuf>,
    /// Progress bars on stderr (hidden anyway when not a terminal).
    pub progress: bool,
    /// Pass the proxy's logs through to stderr.
    pub show_proxy_logs: bool,
    /// A new connection (and TLS handshake) for every admin probe, as
    /// kubectl makes one per command; else the probe re-uses its connection.
    pub probe_new_connections: bool,
    /// Through Breakwater, the admin (probe and rollback) connects to a
    /// `--privileged-listen` listener of its own instead of `--listen`.
    pub admin_listener: bool,
}

impl Default for StormOpts {
    fn default() -> StormOpts {
        StormOpts {
            agents: 5000,
            nodes: 0,
            pods_per_node: 1,
            spread: Duration::ZERO,
            churn: 10.0,
            consistent_list: false,
            protobuf: false,
            rollback_after: Duration::from_secs(10),
            max_duration: Duration::from_secs(120),
            seed: 1,
            capacity: Some(CapacityConfig::small_cluster()),
            replicas: 1,
            limits: STORM_LIMITS.to_string(),
            breakwater: None,
            progress: true,
            show_proxy_logs: false,
            probe_new_connections: false,
            admin_listener: false,
        }
    }
}

/// Direct to kube-sim, or through Breakwater.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Direct,
    Breakwater,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Breakwater => "breakwater",
        }
    }
}

/// One point of the time series.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Sample {
    pub t: f64,
    /// kube-sim seats in use (non-exempt requests being served).
    pub inflight: usize,
    /// Requests waiting for a seat at kube-sim.
    pub queued: usize,
    /// Requests and watch dispatches on kube-sim's modeled CPU.
    pub runnable: usize,
    /// Pod watches open at kube-sim.
    pub upstream_watches: i64,
    /// Agents with a watch open.
    pub agents_watching: usize,
    pub agent_429s: u64,
    pub upstream_lists: u64,
}

/// One admin probe.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Probe {
    pub t: f64,
    pub ms: f64,
    pub ok: bool,
}

/// The figures of one run (summary.json's `direct` / `breakwater`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunMetrics {
    pub agents: usize,
    /// Seconds from the first agent until every agent watched; `None` if never.
    pub all_watching_s: Option<f64>,
    pub list_p50_ms: f64,
    pub list_p99_ms: f64,
    pub agent_429s: u64,
    /// Of `agent_429s`, those that answered watch requests.
    pub agent_429s_watch: u64,
    pub agent_errors: u64,
    pub relists_410: u64,
    /// Successful LISTs and watches the agents got in protobuf (the rest
    /// were JSON).
    pub protobuf_answers: u64,
    /// LIST / WATCH requests on pods that reached kube-sim (any answer).
    pub upstream_lists: u64,
    pub upstream_watches: u64,
    /// The most pod watches open at kube-sim at once.
    pub peak_upstream_watches: i64,
    pub peak_inflight: usize,
    pub peak_queued: usize,
    /// 429s kube-sim itself answered.
    pub upstream_429s: u64,
    /// CPU seconds kube-sim's model spent.
    pub upstream_cpu_s: f64,
    pub admin_probes: usize,
    pub admin_failures: usize,
    pub admin_p50_ms: f64,
    pub admin_p99_ms: f64,
    pub admin_max_ms: f64,
    /// From the first DELETE attempt to the success; `None` if it never did.
    pub rollback_ms: Option<f64>,
    pub rollback_attempts: u32,
    /// Pod entries on which the final view of an agent that was watching
    /// disagrees with kube-sim (must be 0).
    pub events_lost: u64,
    /// Agents without a watch or an exact view when the run stopped (the
    /// storm had not settled within `max_duration`).
    pub agents_not_synced: usize,
    pub duration_s: f64,
    pub replicas: usize,
}

/// A run's figures and its time series.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunResult {
    pub mode: Mode,
    pub metrics: RunMetrics,
    pub samples: Vec<Sample>,
    pub probes: Vec<Probe>,
}

/// Both runs.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub direct: RunResult,
    pub breakwater: RunResult,
    pub opts_summary: String,
}

/// Raises the soft open-files limit to the hard one: a fleet of 5,000 needs
/// two descriptors per agent in this process (client and kube-sim's end), and
/// child proxies inherit the limit. The `rlimit` crate does it without unsafe.
pub fn raise_nofile_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0)
}

/// Runs direct, then through Breakwater, same seed.
pub async fn run_compare(opts: &StormOpts) -> anyhow::Result<Comparison> {
    let direct = run_storm(opts, Mode::Direct).await.context("direct run")?;
    let breakwater = run_storm(opts, Mode::Breakwater)
        .await
        .context("run through breakwater")?;
    Ok(Comparison {
        direct,
        breakwater,
        opts_summary: describe(opts),
    })
}

/// One line naming the knobs, for the report.
pub fn describe(o: &StormOpts) -> String {
    format!(
        "agents {}, nodes {}, pods/node {}, spread {:?}, churn {}/s, {} LIST, {}, rollback at {:?}, replicas {}, seed {}, capacity {}",
        o.agents,
        o.nodes.max(o.agents),
        o.pods_per_node,
        o.spread,
        o.churn,
        if o.consistent_list {
            "consistent (rv unset)"
        } else {
            "rv=0"
        },
        if o.protobuf { "protobuf" } else { "JSON" },
        o.rollback_after,
        o.replicas,
        o.seed,
        if o.capacity.is_some() {
            "model on"
        } else {
            "unlimited"
        }
    )
}

/// The runtime kube-sim runs on during a storm: two worker threads, shut
/// down in the background when dropped (a runtime cannot be dropped
/// blocking from async code).
struct SimRuntime {
    rt: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl SimRuntime {
    fn new() -> anyhow::Result<SimRuntime> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kube-sim")
            .enable_all()
            .build()
            .context("kube-sim's runtime")?;
        Ok(SimRuntime {
            handle: rt.handle().clone(),
            rt: Some(rt),
        })
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

impl Drop for SimRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Files the proxy child reads, in a private temporary directory.
struct ProxyFiles {
    dir: PathBuf,
}

impl Drop for ProxyFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One storm run.
pub async fn run_storm(opts: &StormOpts, mode: Mode) -> anyhow::Result<RunResult> {
    anyhow::ensure!(
        (1..=MAX_AGENTS).contains(&opts.agents),
        "--agents must be 1..={MAX_AGENTS}"
    );
    anyhow::ensure!(opts.replicas >= 1, "--replicas must be at least 1");
    let pki = SimPki::generate(&["127.0.0.1", "localhost"]).context("kube-sim certificates")?;
    let admin_cert = pki.admin_client().context("admin certificate")?;
    let cfg = SimConfig {
        capacity: opts.capacity.clone(),
        ..SimConfig::default()
    };
    let issuer = cfg.issuer.clone();
    // kube-sim runs on worker threads of its own, as the apiserver is a
    // process of its own: the fleet's thousands of tasks on this runtime
    // cannot queue its work (nor the proxy's answers that wait on it).
    let sim_rt = SimRuntime::new()?;
    let sim = sim_rt
        .handle()
        .spawn(KubeSim::start(cfg, pki))
        .await
        .context("kube-sim's start task")?
        .context("start kube-sim")?;
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let nodes: Vec<String> = (0..opts.nodes.max(opts.agents))
        .map(|i| format!("node-{i:05}"))
        .collect();
    seed(&sim, &nodes, opts.pods_per_node).context("seed kube-sim")?;

    // Through Breakwater: start the proxies, point agents and admin at them.
    let mut proxies = Vec::new();
    let mut _files = None;
    let (targets, admin_target): (Vec<std::net::SocketAddr>, _) = match mode {
        Mode::Direct => (vec![sim.addr()], sim.addr()),
        Mode::Breakwater => {
            let (files, procs) = start_proxies(opts, &sim, &issuer).await?;
            _files = Some(files);
            let addrs: Vec<_> = procs.iter().map(BreakwaterProcess::listen_addr).collect();
            let admin = procs[0].privileged_addr().unwrap_or(addrs[0]);
            proxies = procs;
            (addrs, admin)
        }
    };

    let roots = {
        let mut r = rustls::RootCertStore::empty();
        for c in rustls_pki_types::pem::PemObject::pem_slice_iter(
            sim.pki().serving_ca.cert_pem().as_bytes(),
        ) {
            r.add(c.context("serving CA PEM")?)?;
        }
        Arc::new(r)
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let agent_tls = {
        let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Every agent makes a full handshake, as agents on different nodes
        // do: a shared config would otherwise resume TLS sessions across
        // agents (rustls keeps tickets per server name) and spare the
        // server the signature a real storm costs it.
        c.resumption = rustls::client::Resumption::disabled();
        tokio_rustls::TlsConnector::from(Arc::new(c))
    };
    let admin_tls = {
        use rustls_pki_types::pem::PemObject;
        let certs =
            rustls_pki_types::CertificateDer::pem_slice_iter(admin_cert.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()?;
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(admin_cert.key_pem.as_bytes())?;
        let mut c = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)?;
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(c))
    };

    // The fleet: tokens first (signing 20k JWTs takes a moment), then go.
    let token_ttl = Duration::from_secs(3600);
    let counters = Arc::new(FleetCounters::default());
    let states: Vec<Arc<AgentState>> = (0..opts.agents)
        .map(|_| Arc::new(AgentState::default()))
        .collect();
    let specs: Vec<AgentSpec> = nodes
        .iter()
        .take(opts.agents)
        .enumerate()
        .map(|(i, node)| AgentSpec {
            node: node.clone(),
            token: sim.issue_token(AGENT_NAMESPACE, AGENT_SA, token_ttl),
            target: targets[i % targets.len()],
            tls: agent_tls.clone(),
            consistent_list: opts.consistent_list,
            protobuf: opts.protobuf,
        })
        .collect();
    let starts: Vec<Duration> = (0..opts.agents)
        .map(|_| opts.spread.mul_f64(rng.random::<f64>()))
        .collect();

    let bar = progress_bar(opts, mode);
    let stop_agents = CancellationToken::new();
    let stop_side = CancellationToken::new();
    let t0 = Instant::now();
    let mut fleet = tokio::task::JoinSet::new();
    for ((spec, state), start) in specs.into_iter().zip(states.iter().cloned()).zip(starts) {
        let counters = Arc::clone(&counters);
        let cancel = stop_agents.clone();
        fleet.spawn(async move {
            if !start.is_zero() {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(start) => {}
                }
            }
            agent::run(spec, state, counters, cancel).await;
        });
    }

    // Side tasks: the admin probe, churn, the sampler.
    let probes = Arc::new(Mutex::new(Vec::<Probe>::new()));
    let probe_task = spawn_probe_thread(
        admin_target,
        admin_tls.clone(),
        t0,
        Arc::clone(&probes),
        opts.probe_new_connections,
        stop_side.clone(),
    )?;
    let stop_churn = CancellationToken::new();
    let churn_task = tokio::spawn(churn(
        sim.store().clone(),
        nodes.clone(),
        opts.churn,
        opts.seed,
        stop_churn.clone(),
    ));
    let sim = Arc::new(sim);
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let sampler = tokio::spawn(sampler(
        Arc::clone(&sim),
        Arc::clone(&counters),
        t0,
        Arc::clone(&samples),
        bar.clone(),
        stop_side.clone(),
    ));

    // The rollback.
    let deadline = t0 + opts.max_duration;
    tokio::time::sleep_until((t0 + opts.rollback_after.min(opts.max_duration)).into()).await;
    let (rollback_ms, rollback_attempts) = rollback(admin_target, &admin_tls, deadline).await;
    let line = format!(
        "{}: rollback {} after {} attempt(s)",
        mode.name(),
        rollback_ms.map_or("did not succeed".to_string(), |ms| format!(
            "took {ms:.0} ms"
        )),
        rollback_attempts
    );
    if bar.is_hidden() {
        tracing::info!("{line}");
    } else {
        bar.println(line);
    }
    stop_churn.cancel();
    let _ = churn_task.await;

    // Wait (bounded) for every agent to watch and agree with the truth.
    let mut all_watching_at = None;
    while Instant::now() < deadline {
        let truth = truth(&sim);
        let all_watching = counters.watching.load(Ordering::Relaxed) == opts.agents;
        if all_watching && all_watching_at.is_none() {
            all_watching_at = Some(t0.elapsed().as_secs_f64());
        }
        let synced = states
            .iter()
            .zip(&nodes)
            .all(|(s, n)| diff(s, truth.get(n)) == 0);
        if synced && all_watching {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let duration_s = t0.elapsed().as_secs_f64();
    // Which agents reached a watch: only their views can be judged for lost
    // events; the others never finished their LIST+WATCH within the bound.
    let watched: Vec<bool> = states
        .iter()
        .map(|s| s.watching.load(Ordering::Relaxed))
        .collect();
    stop_agents.cancel();
    while fleet.join_next().await.is_some() {}
    stop_side.cancel();
    // The probe thread ends within one probe of the cancel.
    let _ = tokio::task::spawn_blocking(move || probe_task.join()).await;
    let _ = sampler.await;
    bar.finish_and_clear();

    // The verdict: every agent's final view against kube-sim's truth.
    let truth = truth(&sim);
    let mut events_lost = 0u64;
    let mut unsynced = 0usize;
    for ((s, n), watched) in states.iter().zip(&nodes).zip(&watched) {
        let d = diff(s, truth.get(n));
        if *watched {
            events_lost += d;
        }
        unsynced += usize::from(d > 0 || !watched);
    }

    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
    let probes = std::mem::take(&mut *probes.lock().unwrap_or_else(|e| e.into_inner()));
    let mut list_lat: Vec<f64> = states
        .iter()
        .flat_map(|s| {
            s.list_latencies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|d| d.as_secs_f64() * 1000.0)
                .collect::<Vec<_>>()
        })
        .collect();
    let mut admin_lat: Vec<f64> = probes.iter().filter(|p| p.ok).map(|p| p.ms).collect();
    let cap = sim.capacity_stats().unwrap_or_default();
    let metrics = RunMetrics {
        agents: opts.agents,
        all_watching_s: samples
            .iter()
            .find(|s| s.agents_watching >= opts.agents)
            .map(|s| s.t)
            .or(all_watching_at),
        list_p50_ms: percentile(&mut list_lat, 0.50),
        list_p99_ms: percentile(&mut list_lat, 0.99),
        agent_429s: counters.rejected_429.load(Ordering::Relaxed),
        agent_429s_watch: counters.rejected_429_watch.load(Ordering::Relaxed),
        agent_errors: counters.errors.load(Ordering::Relaxed),
        relists_410: counters.relists_410.load(Ordering::Relaxed),
        protobuf_answers: counters.protobuf_answers.load(Ordering::Relaxed),
        upstream_lists: sim.request_count("LIST", "pods"),
        // Watches are counted when they end; add those still open.
        upstream_watches: sim.request_count("WATCH", "pods")
            + u64::try_from(sim.open_watches("pods")).unwrap_or(0),
        peak_upstream_watches: samples
            .iter()
            .map(|s| s.upstream_watches)
            .max()
            .unwrap_or(0),
        peak_inflight: cap.peak_inflight,
        peak_queued: cap.peak_queued,
        upstream_429s: cap.rejected,
        upstream_cpu_s: cap.cpu_seconds,
        admin_probes: probes.len(),
        admin_failures: probes.iter().filter(|p| !p.ok).count(),
        admin_p50_ms: percentile(&mut admin_lat, 0.50),
        admin_p99_ms: percentile(&mut admin_lat, 0.99),
        admin_max_ms: admin_lat.iter().copied().fold(0.0, f64::max),
        rollback_ms,
        rollback_attempts,
        events_lost,
        agents_not_synced: unsynced,
        duration_s,
        replicas: if mode == Mode::Breakwater {
            opts.replicas
        } else {
            0
        },
    };

    for p in proxies {
        let _ = p.shutdown(Duration::from_secs(5)).await;
    }
    if let Ok(sim) = Arc::try_unwrap(sim) {
        let _ = sim_rt
            .handle()
            .spawn(async move { sim.shutdown().await })
            .await;
    }
    Ok(RunResult {
        mode,
        metrics,
        samples,
        probes,
    })
}

/// Nearest-rank percentile (0 for no data); sorts `v`.
pub fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn progress_bar(opts: &StormOpts, mode: Mode) -> indicatif::ProgressBar {
    if !opts.progress {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(opts.agents as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{prefix:>10} [{elapsed_precise}] {bar:30} {pos}/{len} watching  {msg}",
    ) {
        bar.set_style(style);
    }
    bar.set_prefix(mode.name());
    bar
}

/// Pods per node (truth): `node` → (`namespace/name` → resourceVersion).
fn truth(sim: &KubeSim) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let rt = resources::find("", "v1", "pods").expect("invariant: pods are served");
    let Ok(list) = sim.store().list(rt, None, &ListOptions::default()) else {
        return out;
    };
    for o in list.items {
        let node = o.pointer("/spec/nodeName").and_then(Value::as_str);
        let (Some(node), Some(ns), Some(name), Some(rv)) = (
            node,
            o.pointer("/metadata/namespace").and_then(Value::as_str),
            o.pointer("/metadata/name").and_then(Value::as_str),
            o.pointer("/metadata/resourceVersion")
                .and_then(Value::as_str),
        ) else {
            continue;
        };
        out.entry(node.to_string())
            .or_default()
            .insert(format!("{ns}/{name}"), rv.to_string());
    }
    out
}

/// Entries on which the agent's view and the truth disagree.
fn diff(state: &AgentState, truth: Option<&HashMap<String, String>>) -> u64 {
    let view = state.view.lock().unwrap_or_else(|e| e.into_inner());
    let empty = HashMap::new();
    let truth = truth.unwrap_or(&empty);
    let missing_or_stale = truth
        .iter()
        .filter(|(k, v)| view.get(*k) != Some(v))
        .count();
    let extra = view.keys().filter(|k| !truth.contains_key(*k)).count();
    (missing_or_stale + extra) as u64
}

fn pod(ns: &str, name: &str, node: &str, app: &str, sa: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
        "spec": {
            "nodeName": node,
            "serviceAccountName": sa,
            "containers": [{"name": app, "image": format!("{app}:1.0")}],
        },
        "status": {"phase": "Running"},
    })
}

/// Namespaces, the agents' ServiceAccount and RBAC, the DaemonSet, one agent
/// pod and `pods_per_node` workload pods per node.
fn seed(sim: &KubeSim, nodes: &[String], pods_per_node: usize) -> anyhow::Result<()> {
    let store = sim.store();
    let find = |g: &str, v: &str, p: &str| {
        resources::find(g, v, p).with_context(|| format!("{p} is not served"))
    };
    let ns_rt = find("", "v1", "namespaces")?;
    for ns in ["default", AGENT_NAMESPACE, WORKLOAD_NAMESPACE] {
        let _ = store.create(
            ns_rt,
            None,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        );
    }
    store.create(
        find("", "v1", "serviceaccounts")?,
        Some(AGENT_NAMESPACE),
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": AGENT_SA, "namespace": AGENT_NAMESPACE}}),
    )?;
    store.create(
        find("rbac.authorization.k8s.io", "v1", "clusterroles")?,
        None,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": "node-agent"},
               "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]}),
    )?;
    store.create(
        find("rbac.authorization.k8s.io", "v1", "clusterrolebindings")?,
        None,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "node-agent"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "node-agent"},
               "subjects": [{"kind": "ServiceAccount", "name": AGENT_SA, "namespace": AGENT_NAMESPACE}]}),
    )?;
    store.create(
        find("apps", "v1", "daemonsets")?,
        Some(AGENT_NAMESPACE),
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
               "metadata": {"name": AGENT_SA, "namespace": AGENT_NAMESPACE},
               "spec": {"selector": {"matchLabels": {"app": AGENT_SA}},
                        "template": {"metadata": {"labels": {"app": AGENT_SA}},
                                     "spec": {"serviceAccountName": AGENT_SA,
                                              "containers": [{"name": "agent", "image": "node-agent:1.0"}]}}}}),
    )?;
    let pods = find("", "v1", "pods")?;
    for node in nodes {
        store.create(
            pods,
            Some(AGENT_NAMESPACE),
            pod(
                AGENT_NAMESPACE,
                &format!("node-agent-{node}"),
                node,
                AGENT_SA,
                AGENT_SA,
            ),
        )?;
        for i in 0..pods_per_node {
            store.create(
                pods,
                Some(WORKLOAD_NAMESPACE),
                pod(
                    WORKLOAD_NAMESPACE,
                    &format!("app-{node}-{i}"),
                    node,
                    "app",
                    "default",
                ),
            )?;
        }
    }
    Ok(())
}

/// Creates and deletes workload pods on random nodes, `rate` operations/s
/// in total, until cancelled. Writes go to the store directly: they are the
/// scheduler's and kubelets' writes, not the storm's.
async fn churn(
    store: crate::sim::store::Store,
    nodes: Vec<String>,
    rate: f64,
    seed: u64,
    cancel: CancellationToken,
) {
    if rate <= 0.0 || nodes.is_empty() {
        return;
    }
    let Some(pods) = resources::find("", "v1", "pods") else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut live: Vec<String> = Vec::new();
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        // Alternate: create, then delete the oldest churn pod once a few exist.
        if n.is_multiple_of(2) || live.len() < 10 {
            let node = &nodes[rng.random_range(0..nodes.len())];
            let name = format!("churn-{n}");
            if store
                .create(
                    pods,
                    Some(WORKLOAD_NAMESPACE),
                    pod(WORKLOAD_NAMESPACE, &name, node, "churn", "default"),
                )
                .is_ok()
            {
                live.push(name);
            }
        } else {
            let name = live.remove(0);
            let _ = store.delete(pods, Some(WORKLOAD_NAMESPACE), &name);
        }
        n += 1;
    }
}

async fn sampler(
    sim: Arc<KubeSim>,
    counters: Arc<FleetCounters>,
    t0: Instant,
    out: Arc<Mutex<Vec<Sample>>>,
    bar: indicatif::ProgressBar,
    cancel: CancellationToken,
) {
    let mut ticker = tokio::time::interval(SAMPLE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let cap = sim.capacity_stats().unwrap_or_default();
        let s = Sample {
            t: t0.elapsed().as_secs_f64(),
            inflight: cap.inflight,
            queued: cap.queued,
            runnable: cap.runnable,
            upstream_watches: sim.open_watches("pods"),
            agents_watching: counters.watching.load(Ordering::Relaxed),
            agent_429s: counters.rejected_429.load(Ordering::Relaxed),
            upstream_lists: sim.request_count("LIST", "pods"),
        };
        bar.set_position(s.agents_watching as u64);
        bar.set_message(format!(
            "kube-sim in-flight {} queued {} watches {} | agent 429s {}",
            s.inflight, s.queued, s.upstream_watches, s.agent_429s
        ));
        out.lock().unwrap_or_else(|e| e.into_inner()).push(s);
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// One admin request on `conn` (reconnecting when needed): status or error.
async fn admin_request(
    conn: &mut Option<Sender>,
    target: std::net::SocketAddr,
    tls: &tokio_rustls::TlsConnector,
    method: Method,
    path: &str,
) -> Result<StatusCode, ()> {
    let mut sender = match conn.take() {
        Some(s) if !s.is_closed() => s,
        _ => agent::connect_with(target, tls).await?,
    };
    sender.ready().await.map_err(drop)?;
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, target.to_string())
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::USER_AGENT, "kubectl/v1.32.0 (storm admin)")
        .body(Empty::new())
        .map_err(drop)?;
    let resp = sender.send_request(req).await.map_err(drop)?;
    let status = resp.status();
    resp.into_body().collect().await.map_err(drop)?;
    *conn = Some(sender);
    Ok(status)
}

/// Runs [`admin_probe`] on an OS thread of its own with a runtime of its
/// own, so that the fleet's thousands of tasks on the main runtime cannot
/// delay it: what it measures is the proxy's (or the apiserver's) answer,
/// not the harness's scheduling. The thread also asks for a higher CPU
/// priority (nice -10, best effort: it needs CAP_SYS_NICE), as an admin's
/// kubectl on another machine would not compete with the agents at all.
fn spawn_probe_thread(
    target: std::net::SocketAddr,
    tls: tokio_rustls::TlsConnector,
    t0: Instant,
    out: Arc<Mutex<Vec<Probe>>>,
    new_connections: bool,
    cancel: CancellationToken,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("the admin probe's runtime")?;
    std::thread::Builder::new()
        .name("storm-admin-probe".into())
        .spawn(move || {
            raise_thread_priority();
            rt.block_on(admin_probe(target, tls, t0, out, new_connections, cancel));
        })
        .context("start the admin probe's thread")
}

/// Lowers this thread's nice value to -10 with `renice` (Linux applies a
/// thread id's priority to that thread alone). Best effort: without the
/// privilege the probe runs at normal priority, on its own thread still.
fn raise_thread_priority() {
    let tid = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let Some(tid) = tid else { return };
    let ok = std::process::Command::new("renice")
        .args(["-n", "-10", "-p", &tid])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        tracing::debug!(
            "could not raise the admin probe thread's priority; it runs at normal priority"
        );
    }
}

/// GET /api/v1/namespaces/default every 100 ms (sequentially: a slow probe
/// delays the next, as a person retrying kubectl would).
async fn admin_probe(
    target: std::net::SocketAddr,
    tls: tokio_rustls::TlsConnector,
    t0: Instant,
    out: Arc<Mutex<Vec<Probe>>>,
    new_connections: bool,
    cancel: CancellationToken,
) {
    let mut conn = None;
    let mut ticker = tokio::time::interval(PROBE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if new_connections {
            conn = None;
        }
        let started = Instant::now();
        let r = tokio::select! {
            _ = cancel.cancelled() => return,
            r = tokio::time::timeout(
                PROBE_TIMEOUT,
                admin_request(&mut conn, target, &tls, Method::GET, "/api/v1/namespaces/default"),
            ) => r,
        };
        let ok = matches!(r, Ok(Ok(StatusCode::OK)));
        if !ok {
            conn = None;
        }
        out.lock().unwrap_or_else(|e| e.into_inner()).push(Probe {
            t: started.duration_since(t0).as_secs_f64(),
            ms: started.elapsed().as_secs_f64() * 1000.0,
            ok,
        });
    }
}

/// DELETE the DaemonSet, retrying (after 1 s, or the Retry-After) until it
/// succeeds or `deadline`. Returns (milliseconds until success, attempts).
async fn rollback(
    target: std::net::SocketAddr,
    tls: &tokio_rustls::TlsConnector,
    deadline: Instant,
) -> (Option<f64>, u32) {
    let path = format!("/apis/apps/v1/namespaces/{AGENT_NAMESPACE}/daemonsets/{AGENT_SA}");
    let started = Instant::now();
    let mut conn = None;
    let mut attempts = 0;
    while Instant::now() < deadline {
        attempts += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        let r = tokio::time::timeout(
            left,
            admin_request(&mut conn, target, tls, Method::DELETE, &path),
        )
        .await;
        if let Ok(Ok(s)) = r
            && s.is_success()
        {
            return (Some(started.elapsed().as_secs_f64() * 1000.0), attempts);
        }
        conn = None;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    (None, attempts)
}

/// Writes the proxy's files and starts `opts.replicas` breakwater children in
/// front-proxy mode, verifying agent tokens locally.
async fn start_proxies(
    opts: &StormOpts,
    sim: &KubeSim,
    issuer: &str,
) -> anyhow::Result<(ProxyFiles, Vec<BreakwaterProcess>)> {
    let bin = find_breakwater(opts.breakwater.as_deref())?;
    static RUN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "breakwater-storm-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let files = ProxyFiles { dir: dir.clone() };
    let pki = sim.pki();
    let serving = pki.serving_ca.issue_server(&["127.0.0.1", "localhost"])?;
    let front = pki.front_proxy_client()?;
    let w = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("write {}", p.display()))?;
        Ok(p)
    };
    let limits = set_replicas(&opts.limits, opts.replicas);
    let mut args = RunArgs {
        tls_cert: w("tls.crt", &serving.cert_pem)?,
        tls_key: w("tls.key", &serving.key_pem)?,
        client_ca: Some(w("client-ca.crt", pki.client_ca.cert_pem())?),
        upstream: sim.url(),
        upstream_ca: w("upstream-ca.crt", pki.serving_ca.cert_pem())?,
        upstream_client_cert: Some(w("front-proxy.crt", &front.cert_pem)?),
        upstream_client_key: Some(w("front-proxy.key", &front.key_pem)?),
        shutdown_grace: Some(Duration::from_secs(2)),
        extra: vec![
            "--upstream-auth".into(),
            "front-proxy".into(),
            "--service-account-key-file".into(),
            w("sa.pub", &pki.sa_public_pem)?.into(),
            "--service-account-issuer".into(),
            issuer.into(),
            "--limits".into(),
            w("limits.yaml", &limits)?.into(),
            // Every agent of the lab comes from 127.0.0.1, where a real
            // DaemonSet's come from one address per node.
            "--max-connections-per-source".into(),
            "0".into(),
        ],
        ..RunArgs::default()
    };
    if opts.admin_listener {
        args.extra
            .extend(["--privileged-listen".into(), "127.0.0.1:0".into()]);
    }
    let mut procs = Vec::new();
    for _ in 0..opts.replicas {
        let p = BreakwaterProcess::start(
            &bin,
            args.to_args(),
            StartOptions {
                stderr: if opts.show_proxy_logs {
                    StderrMode::Inherit
                } else {
                    StderrMode::Capture
                },
                // BREAKWATER_LOG in the lab's environment reaches the
                // proxies (with --show-proxy-logs, e.g. the access log).
                envs: vec![(
                    "BREAKWATER_LOG".into(),
                    std::env::var_os("BREAKWATER_LOG").unwrap_or_else(|| "warn".into()),
                )],
                ..StartOptions::default()
            },
        )
        .await
        .context("start breakwater")?;
        procs.push(p);
    }
    Ok((files, procs))
}

/// The limits text with its top-level `replicas:` set to `n`.
pub fn set_replicas(limits: &str, n: usize) -> String {
    let mut found = false;
    let mut out: Vec<String> = limits
        .lines()
        .map(|l| {
            if l.starts_with("replicas:") {
                found = true;
                format!("replicas: {n}")
            } else {
                l.to_string()
            }
        })
        .collect();
    if !found {
        out.insert(0, format!("replicas: {n}"));
    }
    out.join("\n") + "\n"
}

/// Writes the report of a comparison into `dir`.
pub fn write_report(c: &Comparison, dir: &Path) -> anyhow::Result<()> {
    report::write(c, dir)
}
