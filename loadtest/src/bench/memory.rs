//! The memory benchmark: what does one idle watch cost breakwater in RSS?
//!
//! For each case a fresh kube-sim and breakwater child are started (so one
//! case's freed-but-kept heap does not flatter the next), one warm-up watch
//! opens the shared upstream stream and fills its cache, and the child's RSS
//! (`VmRSS`, [`BreakwaterProcess::rss_kib`]) is read; then N idle watches of
//! the same collection are opened and, once every response head has arrived
//! and the RSS has settled, it is read again. KiB per watch = the difference
//! / N. Cases:
//! - `tls-h1-connection`: N TLS connections with no request (the connection's
//!   own share, to tell it apart from the watch's);
//! - `tls-h1-watch`: N TLS HTTP/1.1 connections, one watch each;
//! - `tls-h2-stream`: N watches as HTTP/2 streams over a few connections.
//!
//! The per-subscriber queue (a bounded channel) allocates only when events
//! are queued, so an idle watch measures connection, TLS, HTTP and
//! subscriber state.
//!
//! [`MemoryOpts::quick`] (`--quick`) runs the two watch cases with 1,200
//! watches in a few seconds, and [`MemoryReport::check`] fails a run
//! above given KiB per watch: CI guards the savings this way (an h1 watch
//! grows by ~10 KiB if the vendored hyper patch is lost).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use serde::Serialize;
use tokio::sync::Semaphore;

use super::fanout::{ProxyEnv, machine, watch_request};
use super::{Conn, Connector, Protocol};
use crate::error::Chain;
use crate::proc::{StderrMode, find_breakwater};
use crate::sim::{KubeSim, SimConfig, SimPki};

/// Options of [`run_memory`].
#[derive(Debug, Clone)]
pub struct MemoryOpts {
    /// The cases to run, in order.
    pub cases: Vec<Case>,
    pub watches: usize,
    /// HTTP/2: streams per connection (breakwater allows 1,000).
    pub streams_per_connection: usize,
    /// How long RSS is left to settle after the last watch opened.
    pub settle: Duration,
    pub breakwater: Option<PathBuf>,
    pub proxy_stderr: StderrMode,
}

impl Default for MemoryOpts {
    fn default() -> Self {
        MemoryOpts {
            cases: vec![Case::TlsH1Connection, Case::TlsH1Watch, Case::TlsH2Stream],
            watches: 2000,
            streams_per_connection: 500,
            settle: Duration::from_secs(2),
            breakwater: None,
            proxy_stderr: StderrMode::Capture,
        }
    }
}

impl MemoryOpts {
    /// CI's run (`--quick`): the two watch cases only, 1,200 watches each
    /// (the h2 ones over three connections), a shorter settle; about two
    /// seconds in all. Fewer watches make the figure noisier (RSS moves in
    /// allocator steps): at 400 the h2 stream measured 4.7–5.7 KiB against
    /// a 6 KiB ceiling, at 1,200 4.5–5.2.
    pub fn quick() -> MemoryOpts {
        MemoryOpts {
            cases: vec![Case::TlsH1Watch, Case::TlsH2Stream],
            watches: 1200,
            streams_per_connection: 400,
            settle: Duration::from_secs(1),
            ..MemoryOpts::default()
        }
    }
}

/// Ceilings for [`MemoryReport::check`], KiB per item; `None`: not checked.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MemoryLimits {
    /// [`Case::TlsH1Watch`].
    pub h1_watch: Option<f64>,
    /// [`Case::TlsH2Stream`].
    pub h2_stream: Option<f64>,
}

/// Which kind of idle client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Case {
    TlsH1Connection,
    TlsH1Watch,
    TlsH2Stream,
}

impl Case {
    pub fn name(self) -> &'static str {
        match self {
            Case::TlsH1Connection => "TLS h1 connection, no request",
            Case::TlsH1Watch => "TLS h1 watch (1 per connection)",
            Case::TlsH2Stream => "TLS h2 watch stream",
        }
    }
}

/// One case's figures.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryFigures {
    pub case: Case,
    pub items: usize,
    pub connections: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub kib_per_item: f64,
    /// Seconds to open them all.
    pub open_seconds: f64,
}

/// The result of [`run_memory`].
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    pub cases: Vec<MemoryFigures>,
    pub machine: String,
    pub finished_unix: u64,
}

impl MemoryReport {
    /// Fails if a case costs more per item than its ceiling in `limits`,
    /// or if a checked case was not run.
    pub fn check(&self, limits: &MemoryLimits) -> anyhow::Result<()> {
        let ceilings = [
            (Case::TlsH1Watch, limits.h1_watch),
            (Case::TlsH2Stream, limits.h2_stream),
        ];
        for (case, max) in ceilings {
            let Some(max) = max else { continue };
            let f = self
                .cases
                .iter()
                .find(|f| f.case == case)
                .with_context(|| format!("{}: not measured, cannot check it", case.name()))?;
            ensure!(
                f.kib_per_item <= max,
                "{}: {:.1} KiB per item exceeds the ceiling of {max:.1} KiB",
                case.name(),
                f.kib_per_item
            );
        }
        Ok(())
    }

    pub fn table(&self) -> String {
        let mut out = format!("breakwater memory per idle watch ({})\n\n", self.machine);
        out.push_str(&format!(
            "{:<34} {:>7} {:>6} {:>11} {:>11} {:>10} {:>8}\n",
            "case", "items", "conns", "RSS before", "RSS after", "KiB/item", "open s"
        ));
        for c in &self.cases {
            out.push_str(&format!(
                "{:<34} {:>7} {:>6} {:>8} KiB {:>7} KiB {:>10.1} {:>8.1}\n",
                c.case.name(),
                c.items,
                c.connections,
                c.rss_before_kib,
                c.rss_after_kib,
                c.kib_per_item,
                c.open_seconds
            ));
        }
        out
    }
}

/// Runs every case, each with its own kube-sim and breakwater.
pub async fn run_memory(opts: MemoryOpts) -> anyhow::Result<MemoryReport> {
    ensure!(opts.watches > 0, "--watches must be at least 1");
    crate::storm::raise_nofile_limit();
    let bin = find_breakwater(opts.breakwater.as_deref())?;
    let mut cases = Vec::new();
    for &case in &opts.cases {
        let pki = SimPki::generate(&["127.0.0.1", "localhost"]).context("kube-sim PKI")?;
        let sim = KubeSim::start(SimConfig::default(), pki)
            .await
            .context("start kube-sim")?;
        let r = one_case(&sim, &bin, &opts, case).await;
        sim.shutdown().await;
        let f = r.with_context(|| case.name())?;
        eprintln!("{}: {:.1} KiB each", case.name(), f.kib_per_item);
        cases.push(f);
    }
    Ok(MemoryReport {
        cases,
        machine: machine(),
        finished_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    })
}

/// RSS once it stops moving (two reads 250 ms apart within 16 KiB), or
/// after `max`.
async fn settled_rss(env: &ProxyEnv, max: Duration) -> anyhow::Result<u64> {
    let until = Instant::now() + max;
    let mut last = env.proxy.rss_kib().context("read breakwater RSS")?;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = env.proxy.rss_kib().context("read breakwater RSS")?;
        if now.abs_diff(last) < 16 || Instant::now() >= until {
            return Ok(now);
        }
        last = now;
    }
}

async fn one_case(
    sim: &KubeSim,
    bin: &std::path::Path,
    opts: &MemoryOpts,
    case: Case,
) -> anyhow::Result<MemoryFigures> {
    let env = ProxyEnv::start(sim, bin, opts.proxy_stderr, 1024).await?;
    let proto = match case {
        Case::TlsH2Stream => Protocol::Http2,
        _ => Protocol::Http1,
    };
    let connector = env.connector(proto)?;
    let auth = env.auth()?;
    // Warm-up: the shared upstream stream, its cache, the TLS and HTTP code
    // paths (first-use allocations are not per watch).
    let mut warm = connector.connect().await?;
    let warm_resp = warm.send(watch_request(&warm, &connector, &auth)).await?;
    ensure!(
        warm_resp.status().is_success(),
        "warm-up watch answered {}",
        warm_resp.status()
    );
    let before = settled_rss(&env, opts.settle * 3).await?;

    let n = opts.watches;
    let started = Instant::now();
    let mut keep: Vec<Conn> = Vec::new();
    let mut bodies = Vec::new();
    let connections;
    match case {
        Case::TlsH1Connection | Case::TlsH1Watch => {
            connections = n;
            let sem = std::sync::Arc::new(Semaphore::new(128));
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    let (c, a, sem) = (connector.clone(), auth.clone(), sem.clone());
                    tokio::spawn(async move { open(&c, &a, case, &sem).await })
                })
                .collect();
            for t in tasks {
                let (conn, body) = t.await.context("open task")??;
                keep.push(conn);
                bodies.extend(body);
            }
        }
        Case::TlsH2Stream => {
            connections = n.div_ceil(opts.streams_per_connection.max(1));
            for _ in 0..connections {
                keep.push(connector.connect().await?);
            }
            let tasks: Vec<_> = (0..n)
                .map(|i| {
                    let mut conn = keep[i % connections].share().expect("h2 shares");
                    let (c, a) = (connector.clone(), auth.clone());
                    tokio::spawn(async move {
                        let resp = conn.send(watch_request(&conn, &c, &a)).await?;
                        ensure!(
                            resp.status().is_success(),
                            "watch answered {}",
                            resp.status()
                        );
                        Ok::<_, anyhow::Error>(resp.into_body())
                    })
                })
                .collect();
            for t in tasks {
                bodies.push(t.await.context("open task")??);
            }
        }
    }
    let open_seconds = started.elapsed().as_secs_f64();
    if case != Case::TlsH1Connection {
        let w = sim.open_watches("configmaps");
        ensure!(w == 1, "expected 1 upstream watch at kube-sim, saw {w}");
    }
    let after = settled_rss(&env, opts.settle * 5).await?;
    let figures = MemoryFigures {
        case,
        items: n,
        connections,
        rss_before_kib: before,
        rss_after_kib: after,
        kib_per_item: (after as f64 - before as f64) / n as f64,
        open_seconds,
    };
    // Every client goes (the warm-up watch too: breakwater's drain would
    // otherwise wait its whole grace period for it).
    drop(bodies);
    drop(keep);
    drop(warm_resp);
    drop(warm);
    if let Err(e) = env.proxy.shutdown(Duration::from_secs(10)).await {
        tracing::warn!(error = %Chain(&e), "stopping breakwater");
    }
    Ok(figures)
}

/// One HTTP/1.1 connection, with a watch unless `case` is the bare connection.
async fn open(
    c: &Connector,
    auth: &http::HeaderValue,
    case: Case,
    sem: &Semaphore,
) -> anyhow::Result<(Conn, Option<hyper::body::Incoming>)> {
    let mut conn = {
        let _permit = sem.acquire().await;
        c.connect().await?
    };
    if case == Case::TlsH1Connection {
        return Ok((conn, None));
    }
    let resp = conn.send(watch_request(&conn, c, auth)).await?;
    ensure!(
        resp.status().is_success(),
        "watch answered {}",
        resp.status()
    );
    Ok((conn, Some(resp.into_body())))
}
