//! The handshake benchmark: what a serving key costs a storm of new
//! connections.
//!
//! A DaemonSet rollout is thousands of new TLS connections, each a full
//! handshake in which the server signs once with its serving key. This
//! benchmark starts two `breakwater` children in front of one kube-sim, the
//! same flags but different serving certificates — ECDSA P-256 (what the
//! demo and the manifests' examples use) and RSA-2048 (what `openssl req
//! -newkey rsa:2048` and many PKI defaults give) — and has N clients open
//! new connections in a loop against each, alternating for several rounds
//! so both see the same machine noise. Each connection is a full handshake
//! (client session resumption is off, as for an agent's first connection)
//! and is closed once the handshake is done. Reported per key: handshakes
//! per second, handshake latency, and the proxy's CPU per handshake (from
//! `/proc`, the least noisy figure on a shared machine), with the ratio
//! RSA / P-256.
//!
//! The RSA certificate is made with `openssl` (ring, our crypto, cannot
//! generate RSA keys); without `openssl` on PATH the benchmark says so.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use hdrhistogram::Histogram;
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{Figures, Protocol, ScratchDir, client_tls, cpu_seconds, fmt_us, latency_histogram};
use crate::pki::Ca;
use crate::proc::{BreakwaterProcess, RunArgs, StartOptions, StderrMode, find_breakwater};
use crate::sim::{KubeSim, SimConfig, SimPki};

/// Key of the proxy child's CPU in [`Figures::cpu_us_per_request`] (here:
/// per handshake).
pub const PROXY_CPU: &str = "breakwater";

/// Options of [`run_handshake`].
#[derive(Debug, Clone)]
pub struct HandshakeOpts {
    /// Concurrent clients, each opening one connection after another.
    pub clients: usize,
    /// Measured time per phase.
    pub duration: Duration,
    /// Rounds of (P-256, RSA-2048); the best phase of each is reported.
    pub rounds: usize,
    pub breakwater: Option<PathBuf>,
    pub proxy_stderr: StderrMode,
}

impl Default for HandshakeOpts {
    fn default() -> HandshakeOpts {
        HandshakeOpts {
            clients: 32,
            duration: Duration::from_secs(5),
            rounds: 2,
            breakwater: None,
            proxy_stderr: StderrMode::Capture,
        }
    }
}

/// The figures of one run.
#[derive(Debug, Serialize)]
pub struct HandshakeReport {
    pub clients: usize,
    /// Every measured phase, in order ("p256", "rsa2048").
    pub phases: Vec<Figures>,
    /// The best phase (most handshakes/s) of each key.
    pub best: Vec<Figures>,
    /// RSA-2048 / P-256 of the best phases: proxy CPU per handshake.
    pub cpu_ratio_rsa_over_p256: Option<f64>,
    /// P-256 / RSA-2048 handshakes per second.
    pub rate_ratio_p256_over_rsa: Option<f64>,
}

impl HandshakeReport {
    pub fn table(&self) -> String {
        let mut out = format!(
            "new TLS connections (full handshakes), {} clients, best of each key\n\
             {:<10} {:>12} {:>10} {:>10} {:>10} {:>16}\n",
            self.clients, "key", "handshakes/s", "p50", "p99", "max", "proxy CPU/hs"
        );
        for f in &self.best {
            let cpu = f
                .cpu_us_per_request
                .get(PROXY_CPU)
                .map_or("-".to_string(), |us| format!("{us:.0}µs"));
            out.push_str(&format!(
                "{:<10} {:>12.0} {:>10} {:>10} {:>10} {:>16}\n",
                f.target,
                f.rps,
                fmt_us(f.p50_us),
                fmt_us(f.p99_us),
                fmt_us(f.max_us),
                cpu
            ));
        }
        if let (Some(cpu), Some(rate)) =
            (self.cpu_ratio_rsa_over_p256, self.rate_ratio_p256_over_rsa)
        {
            out.push_str(&format!(
                "RSA-2048 costs the proxy {cpu:.1}× the CPU of P-256 per handshake; P-256 completes {rate:.1}× the handshakes per second\n"
            ));
        }
        out
    }
}

/// Runs the benchmark (see the module docs).
pub async fn run_handshake(opts: HandshakeOpts) -> anyhow::Result<HandshakeReport> {
    ensure!(opts.clients > 0, "--clients must be at least 1");
    ensure!(opts.rounds > 0, "--rounds must be at least 1");
    let bin = find_breakwater(opts.breakwater.as_deref())?;
    let dir = ScratchDir::new().context("scratch directory")?;
    // The RSA pair first: without openssl there is nothing to compare.
    let rsa = rsa_pair(dir.path()).context(
        "make an RSA-2048 serving certificate with openssl (install it: apt-get install -y openssl)",
    )?;
    let pki = SimPki::generate(&["127.0.0.1", "localhost"]).context("kube-sim PKI")?;
    let sim = KubeSim::start(SimConfig::default(), pki)
        .await
        .context("start kube-sim")?;
    let result = with_sim(&sim, &bin, &dir, rsa, &opts).await;
    sim.shutdown().await;
    result
}

/// A serving pair and the CA (PEM) that signed it.
struct ServingPair {
    cert: PathBuf,
    key: PathBuf,
    ca_pem: String,
}

async fn with_sim(
    sim: &KubeSim,
    bin: &Path,
    dir: &ScratchDir,
    rsa: ServingPair,
    opts: &HandshakeOpts,
) -> anyhow::Result<HandshakeReport> {
    let ca = Ca::new("breakwater-handshake-bench-ca")?;
    let leaf = ca.issue_server(&["127.0.0.1", "localhost"])?;
    let p256 = ServingPair {
        cert: dir.write("p256.crt", &leaf.cert_pem)?,
        key: dir.write("p256.key", &leaf.key_pem)?,
        ca_pem: ca.cert_pem().to_string(),
    };
    let upstream_ca = dir.write("upstream-ca.crt", sim.pki().serving_ca.cert_pem())?;
    let start = |pair: &ServingPair| {
        let args = RunArgs {
            tls_cert: pair.cert.clone(),
            tls_key: pair.key.clone(),
            upstream: sim.url(),
            upstream_ca: upstream_ca.clone(),
            // Every client comes from 127.0.0.1.
            extra: vec!["--max-connections-per-source".into(), "0".into()],
            ..RunArgs::default()
        };
        BreakwaterProcess::start(
            bin,
            args.to_args(),
            StartOptions {
                stderr: opts.proxy_stderr,
                ..StartOptions::default()
            },
        )
    };
    let proxies = [
        (
            "p256",
            start(&p256).await.context("start breakwater (P-256)")?,
            &p256,
        ),
        (
            "rsa2048",
            start(&rsa).await.context("start breakwater (RSA-2048)")?,
            &rsa,
        ),
    ];

    let mut phases = Vec::new();
    for round in 1..=opts.rounds {
        for (name, proxy, pair) in &proxies {
            let tls = client_tls(&[&pair.ca_pem], Protocol::Http1)?;
            let mut tls = (*tls).clone();
            // Every connection a full handshake, as an agent's first one.
            tls.resumption = rustls::client::Resumption::disabled();
            tracing::info!(round, key = name, "phase starts");
            let figures = phase(name, proxy, Arc::new(tls), opts).await?;
            if figures.error_fraction() > 0.001 {
                bail!(
                    "{name}: {} of {} handshakes failed\nbreakwater output:\n{}",
                    figures.errors,
                    figures.requests,
                    proxy.output_tail()
                );
            }
            phases.push(figures);
        }
    }
    let best: Vec<Figures> = ["p256", "rsa2048"]
        .iter()
        .filter_map(|key| {
            phases
                .iter()
                .filter(|f| f.target == *key)
                .max_by(|a, b| a.rps.total_cmp(&b.rps))
                .cloned()
        })
        .collect();
    let cpu = |key: &str| {
        best.iter()
            .find(|f| f.target == key)
            .and_then(|f| f.cpu_us_per_request.get(PROXY_CPU).copied())
    };
    let rate = |key: &str| best.iter().find(|f| f.target == key).map(|f| f.rps);
    Ok(HandshakeReport {
        clients: opts.clients,
        cpu_ratio_rsa_over_p256: cpu("rsa2048").zip(cpu("p256")).map(|(r, p)| r / p),
        rate_ratio_p256_over_rsa: rate("p256").zip(rate("rsa2048")).map(|(p, r)| p / r),
        phases,
        best,
    })
}

/// One measured window of new connections against `proxy`.
async fn phase(
    name: &str,
    proxy: &BreakwaterProcess,
    tls: Arc<rustls::ClientConfig>,
    opts: &HandshakeOpts,
) -> anyhow::Result<Figures> {
    let addr = proxy.listen_addr();
    let errors = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu_seconds(proxy.pid());
    let started = Instant::now();
    let deadline = started + opts.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..opts.clients {
        let (tls, errors) = (TlsConnector::from(tls.clone()), errors.clone());
        tasks.spawn(async move {
            let mut hist = latency_histogram();
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let ok = async {
                    let tcp = TcpStream::connect(addr).await.ok()?;
                    let _ = tcp.set_nodelay(true);
                    tls.connect(ServerName::IpAddress(addr.ip().into()), tcp)
                        .await
                        .ok()
                }
                .await;
                match ok {
                    Some(_conn) => {
                        let us = t0.elapsed().as_micros().max(1) as u64;
                        let _ = hist.record(us.min(hist.high()));
                    }
                    None => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            hist
        });
    }
    let mut hist: Histogram<u64> = latency_histogram();
    while let Some(res) = tasks.join_next().await {
        hist.add(res.context("client task")?)
            .context("merge histograms")?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_after = cpu_seconds(proxy.pid());
    let errors = errors.load(Ordering::Relaxed);
    let done = hist.len() + errors;
    let mut figures = Figures::new(name, &hist, done, errors, seconds);
    figures.rps = hist.len() as f64 / seconds;
    if let (Some(a), Some(b)) = (cpu_before, cpu_after)
        && !hist.is_empty()
    {
        figures
            .cpu_us_per_request
            .insert(PROXY_CPU.into(), (b - a) * 1e6 / hist.len() as f64);
    }
    Ok(figures)
}

/// An RSA-2048 CA and a serving certificate for 127.0.0.1 it signed, made
/// with the `openssl` command line.
fn rsa_pair(dir: &Path) -> anyhow::Result<ServingPair> {
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("run openssl")?;
        ensure!(
            out.status.success(),
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "rsa-ca.key",
        "-out",
        "rsa-ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=breakwater-bench-rsa-ca",
    ])?;
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "rsa.key",
        "-out",
        "rsa.csr",
        "-subj",
        "/CN=127.0.0.1",
    ])?;
    std::fs::write(
        dir.join("rsa.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "rsa.csr",
        "-CA",
        "rsa-ca.crt",
        "-CAkey",
        "rsa-ca.key",
        "-CAcreateserial",
        "-out",
        "rsa.crt",
        "-days",
        "2",
        "-extfile",
        "rsa.ext",
    ])?;
    Ok(ServingPair {
        cert: dir.join("rsa.crt"),
        key: dir.join("rsa.key"),
        ca_pem: std::fs::read_to_string(dir.join("rsa-ca.crt"))?,
    })
}
