//! wrk and h2load as the overhead bench's load generators
//! (`bench overhead --load-generator wrk|h2load`).
//!
//! The bench's own clients are Rust (hyper, h2); an operator checks a proxy
//! with wrk (HTTP/1.1) and h2load (HTTP/2 or HTTP/1.1), and so does issue
//! #17's check against a real apiserver. With either, the bench still starts
//! and configures every target and reads their CPU the same way; only the
//! requests come from the tool, run as a child process for each phase (a
//! warm-up run whose figures are dropped, then the measured run).
//!
//! Figures come from the tools' own counts, machine-readably: wrk through a
//! Lua `done()` hook that prints its request count, error counts and latency
//! percentiles; h2load through its per-request log (`--log-file`: status and
//! microseconds per request), from which the same histogram as the bench's
//! own clients' is built. Neither verifies the server's certificate.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use hdrhistogram::Histogram;
use serde::Serialize;

use super::{Figures, Protocol, latency_histogram};

/// Who sends the overhead bench's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LoadGenerator {
    /// The bench's own clients (hyper / h2, in this process).
    #[default]
    Loadtest,
    /// wrk (HTTP/1.1 only; Debian: `apt-get install -y wrk`).
    Wrk,
    /// h2load (HTTP/2, or HTTP/1.1 with `--h1`; Debian: `apt-get install -y
    /// nghttp2-client`).
    H2load,
}

impl LoadGenerator {
    /// The tool's program name and the Debian package that has it.
    fn program(self) -> Option<(&'static str, &'static str)> {
        match self {
            LoadGenerator::Loadtest => None,
            LoadGenerator::Wrk => Some(("wrk", "wrk")),
            LoadGenerator::H2load => Some(("h2load", "nghttp2-client")),
        }
    }

    /// The tool's path, or an error that says how to install it; also
    /// refuses wrk with HTTP/2, which it does not speak.
    pub fn find(self, protocol: Protocol) -> anyhow::Result<Option<PathBuf>> {
        let Some((name, package)) = self.program() else {
            return Ok(None);
        };
        ensure!(
            !(self == LoadGenerator::Wrk && protocol == Protocol::Http2),
            "wrk speaks HTTP/1.1 only: use --load-generator h2load with --http2"
        );
        ensure!(
            protocol != Protocol::PlainHttp1,
            "--load-generator {name} runs over TLS only"
        );
        match super::find_program(name, &["/usr/bin"]) {
            Some(p) => Ok(Some(p)),
            None => {
                bail!("{name} not found on PATH; install it (Debian: apt-get install -y {package})")
            }
        }
    }
}

/// One run of a tool against one target.
pub struct Run<'a> {
    pub generator: LoadGenerator,
    pub program: &'a Path,
    pub addr: SocketAddr,
    pub path: &'a str,
    /// The `Authorization` header's value.
    pub authorization: &'a str,
    pub protocol: Protocol,
    pub clients: usize,
    /// HTTP/2: connections the clients' streams share.
    pub h2_connections: usize,
    pub duration: Duration,
}

/// What a run measured, before CPU figures are added.
#[derive(Debug)]
pub struct Measured {
    pub figures: Figures,
    /// TCP/TLS connections the tool opened.
    pub connections: usize,
}

impl Run<'_> {
    /// Runs the tool for `self.duration` and reads its figures; `target`
    /// names them.
    pub async fn measure(&self, target: &str) -> anyhow::Result<Measured> {
        let dir = super::ScratchDir::new()?;
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let url = format!("https://{}{}", self.addr, self.path);
        let secs = self.duration.as_secs_f64().max(0.001);
        let mut cmd = tokio::process::Command::new(self.program);
        let (connections, log) = match self.generator {
            LoadGenerator::Loadtest => bail!("the bench's own clients are not a tool"),
            LoadGenerator::Wrk => {
                let script = dir.write("report.lua", WRK_SCRIPT)?;
                cmd.arg("--threads")
                    .arg(threads.min(self.clients).to_string())
                    .arg("--connections")
                    .arg(self.clients.to_string())
                    .arg("--duration")
                    .arg(format!("{}s", secs.ceil()))
                    .arg("--timeout")
                    .arg("10s")
                    .arg("--script")
                    .arg(&script)
                    .arg("--header")
                    .arg(format!("Authorization: {}", self.authorization))
                    .arg(&url);
                (self.clients, None)
            }
            LoadGenerator::H2load => {
                let log = dir.path().join("requests.tsv");
                let (conns, streams) = match self.protocol {
                    Protocol::Http2 => {
                        let c = self.h2_connections.clamp(1, self.clients);
                        (c, self.clients.div_ceil(c))
                    }
                    Protocol::Http1 | Protocol::PlainHttp1 => {
                        cmd.arg("--h1");
                        (self.clients, 1)
                    }
                };
                cmd.arg("--clients")
                    .arg(conns.to_string())
                    .arg("--max-concurrent-streams")
                    .arg(streams.to_string())
                    .arg("--threads")
                    .arg(threads.min(conns).to_string())
                    .arg("--duration")
                    .arg(format!("{secs}"))
                    .arg(format!("--log-file={}", log.display()))
                    .arg("--header")
                    .arg(format!("authorization: {}", self.authorization))
                    .arg(&url);
                (conns, Some(log))
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let name = self.program.display().to_string();
        let child = cmd.spawn().with_context(|| format!("start {name}"))?;
        let out = tokio::time::timeout(
            self.duration + Duration::from_secs(30),
            child.wait_with_output(),
        )
        .await
        .with_context(|| format!("{name} did not finish in its time"))?
        .with_context(|| format!("run {name}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success(),
            "{name} failed ({}):\n{stdout}{stderr}",
            out.status
        );
        let figures = match log {
            None => parse_wrk(target, &stdout),
            Some(log) => {
                let text = std::fs::read_to_string(&log)
                    .with_context(|| format!("read {}", log.display()))?;
                parse_h2load(target, &stdout, &text)
            }
        }
        .with_context(|| format!("read {name}'s figures from:\n{stdout}{stderr}"))?;
        // A target it could not reach at all leaves no request to count,
        // and no error either: that is no measurement.
        ensure!(
            figures.requests > 0,
            "{name} completed no request against {url}:\n{stdout}{stderr}"
        );
        Ok(Measured {
            figures,
            connections,
        })
    }
}

/// wrk's `done()` hook: one line of counts, then the percentiles (µs).
const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("bench-counts %d %d %d %d %d %d %d\n",
    summary.requests, summary.duration,
    e.connect, e.read, e.write, e.status, e.timeout))
  io.write(string.format("bench-latency %d %d %d %d %d\n",
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
"#;

/// The numbers after `key` on its line of `out`.
fn numbers(out: &str, key: &str) -> anyhow::Result<Vec<u64>> {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .with_context(|| format!("no {key:?} line"))?;
    line.split_whitespace()
        .map(|n| n.parse().with_context(|| format!("{key}: {n:?}")))
        .collect()
}

/// Figures from wrk's output with [`WRK_SCRIPT`]'s lines. wrk counts a
/// completed request with a status of 400 or more as a status error; errors
/// here are those and the socket errors (connect, read, write, timeout).
fn parse_wrk(target: &str, out: &str) -> anyhow::Result<Figures> {
    let counts = numbers(out, "bench-counts ")?;
    let lat = numbers(out, "bench-latency ")?;
    let (
        [requests, duration_us, connect, read, write, status, timeout],
        [p50, p90, p99, p999, max],
    ) = (counts.as_slice(), lat.as_slice())
    else {
        bail!("unexpected wrk report: {counts:?} {lat:?}");
    };
    let seconds = *duration_us as f64 / 1e6;
    // A failed connection or a timeout is no completed request: count it in.
    let errors = connect + read + write + status + timeout;
    let requests = requests + connect + timeout;
    let mut f = Figures::new(target, &latency_histogram(), requests, errors, seconds);
    (f.p50_us, f.p90_us, f.p99_us, f.p999_us, f.max_us) = (*p50, *p90, *p99, *p999, *max);
    Ok(f)
}

/// Figures from h2load's per-request log (`start_µs<TAB>status<TAB>µs`,
/// status -1 for a failed stream) and its summary's measured time. Every
/// request ended in the log counts; errors are those without a 2xx status;
/// latencies are of the successful ones, like the bench's own clients'.
fn parse_h2load(target: &str, out: &str, log: &str) -> anyhow::Result<Figures> {
    let finished = out
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(',').next())
        .context("no \"finished in\" line")?;
    let seconds =
        parse_h2load_duration(finished).with_context(|| format!("finished in {finished:?}"))?;
    let mut hist: Histogram<u64> = latency_histogram();
    let (mut requests, mut errors) = (0u64, 0u64);
    for (n, line) in log.lines().enumerate() {
        let mut cols = line.split('\t');
        let (Some(_start), Some(status), Some(us)) = (cols.next(), cols.next(), cols.next()) else {
            bail!("log line {}: {line:?}", n + 1);
        };
        let status: i32 = status
            .parse()
            .with_context(|| format!("log line {}: status {status:?}", n + 1))?;
        let us: u64 = us
            .trim()
            .parse()
            .with_context(|| format!("log line {}: time {us:?}", n + 1))?;
        requests += 1;
        if (200..300).contains(&status) {
            hist.saturating_record(us.max(1));
        } else {
            errors += 1;
        }
    }
    Ok(Figures::new(target, &hist, requests, errors, seconds))
}

/// h2load's durations: "10.00s", "523.12ms", "812us".
fn parse_h2load_duration(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else {
        (s.strip_suffix('s')?, 1.0)
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_figures_come_from_the_done_hook() {
        let out = "Running 5s test @ https://127.0.0.1:1/x\n  2 threads and 8 connections\n\
                   bench-counts 1000 5000000 0 1 0 3 2\nbench-latency 900 1500 2500 4000 9000\n";
        let f = parse_wrk("wrk", out).expect("parse");
        assert_eq!(f.requests, 1002);
        assert_eq!(f.errors, 6);
        assert!((f.seconds - 5.0).abs() < 1e-9);
        assert!((f.rps - 200.4).abs() < 1e-9);
        assert_eq!((f.p50_us, f.p99_us, f.max_us), (900, 2500, 9000));
        assert!(parse_wrk("wrk", "Running 5s test\n").is_err());
    }

    #[test]
    fn h2load_figures_come_from_its_request_log() {
        let out = "finished in 2.00s, 2.00 req/s, 1KB/s\nrequests: 4 total\n";
        let log = "1700000000000000\t200\t1000\n1700000000000001\t200\t3000\n\
                   1700000000000002\t-1\t50\n1700000000000003\t401\t70\n";
        let f = parse_h2load("h2load", out, log).expect("parse");
        assert_eq!((f.requests, f.errors), (4, 2));
        assert!((f.rps - 2.0).abs() < 1e-9);
        assert!(f.p50_us >= 999 && f.p50_us <= 1001, "{f:?}");
        assert!(f.max_us >= 2990 && f.max_us <= 3010, "{f:?}");
        assert!(parse_h2load("h2load", "", log).is_err());
        assert!(parse_h2load("h2load", out, "1\tOK\t5\n").is_err());
        assert_eq!(parse_h2load_duration("250.5ms"), Some(0.2505));
        assert_eq!(parse_h2load_duration("10.00s"), Some(10.0));
        assert_eq!(parse_h2load_duration("812us"), Some(0.000812));
        assert_eq!(parse_h2load_duration("soon"), None);
    }

    /// Nothing listens at the address: neither tool may report that as a
    /// measurement (wrk exits with an error; h2load exits 0 with every
    /// request failed and none in its log).
    #[tokio::test]
    async fn a_target_that_cannot_be_reached_is_an_error() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        for (generator, protocol) in [
            (LoadGenerator::Wrk, Protocol::Http1),
            (LoadGenerator::H2load, Protocol::Http2),
        ] {
            let program = generator
                .find(protocol)
                .unwrap_or_else(|e| panic!("{e:#}"))
                .expect("a tool");
            let run = Run {
                generator,
                program: &program,
                addr,
                path: "/",
                authorization: "Bearer x",
                protocol,
                clients: 2,
                h2_connections: 1,
                duration: Duration::from_secs(1),
            };
            let err = run.measure("direct").await.expect_err("nothing to measure");
            assert!(
                format!("{err:#}").contains(&addr.to_string()),
                "{generator:?}: {err:#}"
            );
        }
    }

    #[test]
    fn wrk_is_refused_for_http2_with_the_alternative() {
        let err = LoadGenerator::Wrk
            .find(Protocol::Http2)
            .expect_err("wrk has no HTTP/2");
        assert!(err.to_string().contains("h2load"), "{err}");
        assert!(
            LoadGenerator::Loadtest
                .find(Protocol::Http2)
                .expect("nothing to find")
                .is_none()
        );
    }
}
