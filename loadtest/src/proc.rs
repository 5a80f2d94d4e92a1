//! Runs the real `breakwater` binary as a child process, black-box.
//!
//! The load tests and benchmarks never link the proxy (see DESIGN.md): they
//! start the binary an operator would run, wait for the two readiness lines it
//! prints on stdout, and talk to it over sockets.
//!
//! ```text
//! breakwater: listening on https://127.0.0.1:PORT
//! breakwater: admin on http://127.0.0.1:PORT
//! ```
//!
//! Logs go to the child's stderr; by default we keep the last lines in memory so
//! that a failure to start can say why, without flooding the benchmark's output.
//! [`BreakwaterProcess::shutdown`] stops it gracefully (SIGTERM, then SIGKILL
//! after a grace period); dropping the handle kills it outright
//! (`kill_on_drop`), so an early return or a panic never leaks a proxy.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

/// Environment variable naming the `breakwater` binary when `--breakwater` is not given.
pub const BREAKWATER_BIN_ENV: &str = "BREAKWATER_BIN";

/// Prefix of the readiness line carrying the proxy's listen address.
const LISTEN_PREFIX: &str = "breakwater: listening on https://";
/// Prefix of the (optional) line carrying the plain loopback listener's
/// address; printed before the two readiness lines.
const PLAIN_PREFIX: &str = "breakwater: plain HTTP on http://";
/// Prefix of the (optional) line carrying the privileged TLS listener's
/// address; printed before the two readiness lines.
const PRIVILEGED_PREFIX: &str = "breakwater: privileged TLS on https://";
/// Prefix of the readiness line carrying the admin listener's address.
const ADMIN_PREFIX: &str = "breakwater: admin on http://";

/// How many lines of the child's output we keep for error messages. Bounded so
/// a chatty proxy in a long benchmark cannot grow our memory; older lines drop.
const TAIL_LINES: usize = 200;

/// A failure to find, start or stop the `breakwater` binary.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error(
        "the breakwater binary was not found (looked at: {}); build it with \
         `cargo build --release -p breakwater`, or pass --breakwater PATH or set {BREAKWATER_BIN_ENV}",
        .searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NotFound { searched: Vec<PathBuf> },
    #[error("failed to start {path}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("breakwater exited before it was ready ({status}); last output:\n{tail}")]
    ExitedEarly { status: String, tail: String },
    #[error("breakwater was not ready after {after:?}; last output:\n{tail}")]
    ReadyTimeout { after: Duration, tail: String },
    #[error("unparsable readiness line from breakwater: {0:?}")]
    BadReadyLine(String),
    #[error("failed to signal or wait for breakwater")]
    Io(#[from] std::io::Error),
}

/// Where the child's stderr (its logs) goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StderrMode {
    /// Keep the last lines in memory ([`BreakwaterProcess::output_tail`]).
    #[default]
    Capture,
    /// Pass through to our own stderr (for debugging a run).
    Inherit,
}

/// How to start the child.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// How long to wait for both readiness lines.
    pub ready_timeout: Duration,
    pub stderr: StderrMode,
    /// Extra environment variables (e.g. `RUST_LOG`).
    pub envs: Vec<(OsString, OsString)>,
}

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions {
            ready_timeout: Duration::from_secs(30),
            stderr: StderrMode::Capture,
            envs: Vec::new(),
        }
    }
}

/// The arguments of `breakwater run`, so callers need not spell the flags.
#[derive(Debug, Clone, Default)]
pub struct RunArgs {
    /// `--listen`; `None` = 127.0.0.1:0.
    pub listen: Option<SocketAddr>,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub client_ca: Option<PathBuf>,
    /// e.g. `https://127.0.0.1:6443`.
    pub upstream: String,
    pub upstream_ca: PathBuf,
    pub upstream_client_cert: Option<PathBuf>,
    pub upstream_client_key: Option<PathBuf>,
    /// `--admin-listen`; `None` = 127.0.0.1:0 (we always want the admin line).
    pub admin_listen: Option<SocketAddr>,
    pub shutdown_grace: Option<Duration>,
    /// Appended verbatim after the flags above.
    pub extra: Vec<OsString>,
}

impl RunArgs {
    /// The full argument vector, starting with the `run` subcommand.
    pub fn to_args(&self) -> Vec<OsString> {
        let local0 = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut a: Vec<OsString> = vec!["run".into()];
        let mut flag = |name: &str, value: OsString| {
            a.push(name.into());
            a.push(value);
        };
        flag("--listen", self.listen.unwrap_or(local0).to_string().into());
        flag("--tls-cert", self.tls_cert.clone().into());
        flag("--tls-key", self.tls_key.clone().into());
        if let Some(ca) = &self.client_ca {
            flag("--client-ca", ca.clone().into());
        }
        flag("--upstream", self.upstream.clone().into());
        flag("--upstream-ca", self.upstream_ca.clone().into());
        if let Some(cert) = &self.upstream_client_cert {
            flag("--upstream-client-cert", cert.clone().into());
        }
        if let Some(key) = &self.upstream_client_key {
            flag("--upstream-client-key", key.clone().into());
        }
        flag(
            "--admin-listen",
            self.admin_listen.unwrap_or(local0).to_string().into(),
        );
        if let Some(grace) = self.shutdown_grace {
            flag(
                "--shutdown-grace",
                humantime::format_duration(grace).to_string().into(),
            );
        }
        a.extend(self.extra.iter().cloned());
        a
    }
}

/// Finds the `breakwater` binary: `explicit` (from `--breakwater`), else
/// `$BREAKWATER_BIN`, else next to the current executable (`target/<profile>/`,
/// also when we run from `target/<profile>/deps/`).
pub fn find_breakwater(explicit: Option<&Path>) -> Result<PathBuf, ProcError> {
    let mut searched = Vec::new();
    if let Some(p) = explicit {
        // An explicit path that is wrong is an error, not a reason to guess.
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        return Err(ProcError::NotFound {
            searched: vec![p.to_path_buf()],
        });
    }
    if let Some(p) = std::env::var_os(BREAKWATER_BIN_ENV) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        searched.push(p);
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        let mut dirs = vec![dir.to_path_buf()];
        if dir.file_name().is_some_and(|n| n == "deps")
            && let Some(up) = dir.parent()
        {
            dirs.push(up.to_path_buf());
        }
        for d in dirs {
            let p = d.join(format!("breakwater{}", std::env::consts::EXE_SUFFIX));
            if p.is_file() {
                return Ok(p);
            }
            searched.push(p);
        }
    }
    Err(ProcError::NotFound { searched })
}

/// A running `breakwater` child that has printed its readiness lines.
pub struct BreakwaterProcess {
    child: Child,
    listen: SocketAddr,
    admin: SocketAddr,
    plain: Option<SocketAddr>,
    privileged: Option<SocketAddr>,
    tail: Tail,
}

impl std::fmt::Debug for BreakwaterProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BreakwaterProcess")
            .field("pid", &self.child.id())
            .field("listen", &self.listen)
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

impl BreakwaterProcess {
    /// Starts `bin` with `args` and waits until it has printed both readiness
    /// lines (or exited, or `opts.ready_timeout` passed).
    pub async fn start<I, S>(
        bin: &Path,
        args: I,
        opts: StartOptions,
    ) -> Result<BreakwaterProcess, ProcError>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let mut cmd = Command::new(bin);
        cmd.args(args.into_iter().map(Into::into))
            .envs(opts.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(match opts.stderr {
                StderrMode::Capture => Stdio::piped(),
                StderrMode::Inherit => Stdio::inherit(),
            })
            // The safety net: a dropped handle (error path, panic) never leaks a proxy.
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| ProcError::Spawn {
            path: bin.to_path_buf(),
            source,
        })?;

        let tail = Tail::default();
        let stderr_task = child
            .stderr
            .take()
            .map(|stderr| tokio::spawn(drain(stderr, tail.clone(), "stderr")));
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| ProcError::Io(std::io::Error::other("child stdout was not captured")))?;

        let mut lines = BufReader::new(stdout).lines();
        let waited = tokio::time::timeout(opts.ready_timeout, async {
            let mut listen = None;
            let mut admin = None;
            let mut plain = None;
            let mut privileged = None;
            while listen.is_none() || admin.is_none() {
                let Some(line) = lines.next_line().await? else {
                    return Ok(None); // stdout closed: the child is exiting
                };
                tail.push(format!("stdout: {line}"));
                let trimmed = line.trim_end();
                if let Some(rest) = trimmed.strip_prefix(LISTEN_PREFIX) {
                    listen = Some(parse_addr(rest, &line)?);
                } else if let Some(rest) = trimmed.strip_prefix(ADMIN_PREFIX) {
                    admin = Some(parse_addr(rest, &line)?);
                } else if let Some(rest) = trimmed.strip_prefix(PLAIN_PREFIX) {
                    plain = Some(parse_addr(rest, &line)?);
                } else if let Some(rest) = trimmed.strip_prefix(PRIVILEGED_PREFIX) {
                    privileged = Some(parse_addr(rest, &line)?);
                }
            }
            Ok::<_, ProcError>(listen.zip(admin).map(|(l, a)| (l, a, plain, privileged)))
        })
        .await;

        let (listen, admin, plain, privileged) = match waited {
            Ok(Ok(Some(addrs))) => addrs,
            Ok(Ok(None)) => {
                let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map_or_else(|| "still running".to_string(), |s| s.to_string());
                // The stderr drain ends at EOF once the child is gone; wait for
                // it so the error carries the child's last words.
                if let Some(task) = stderr_task {
                    let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
                }
                return Err(ProcError::ExitedEarly {
                    status,
                    tail: tail.text(),
                });
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(ProcError::ReadyTimeout {
                    after: opts.ready_timeout,
                    tail: tail.text(),
                });
            }
        };

        // Keep reading stdout so the child never blocks on a full pipe.
        let stdout_tail = tail.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                stdout_tail.push(format!("stdout: {line}"));
            }
        });

        Ok(BreakwaterProcess {
            child,
            listen,
            admin,
            plain,
            privileged,
            tail,
        })
    }

    /// The plain-HTTP loopback listener, when started with `--plain-listen`.
    pub fn plain_addr(&self) -> Option<SocketAddr> {
        self.plain
    }

    /// The privileged TLS listener, when started with `--privileged-listen`.
    pub fn privileged_addr(&self) -> Option<SocketAddr> {
        self.privileged
    }

    /// The proxy's TLS listen address.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// `https://127.0.0.1:PORT`.
    pub fn listen_url(&self) -> String {
        format!("https://{}", self.listen)
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// `http://127.0.0.1:PORT`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// The child's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The child's resident set size in KiB (`VmRSS` in /proc/PID/status), for
    /// memory benchmarks; `None` if it cannot be read (exited, not Linux).
    pub fn rss_kib(&self) -> Option<u64> {
        let pid = self.child.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// The last lines the child printed (stdout and captured stderr).
    pub fn output_tail(&self) -> String {
        self.tail.text()
    }

    /// Sends SIGTERM and waits up to `grace` for a clean exit, then SIGKILL.
    /// Returns the exit status.
    pub async fn shutdown(mut self, grace: Duration) -> Result<ExitStatus, ProcError> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        if let Some(pid) = self.child.id() {
            // `kill -TERM` through the system tool: no libc, no unsafe.
            let sent = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await?;
            if !sent.success() {
                // Most likely it exited between try_wait and kill; wait reaps it.
                tracing::debug!(pid, "kill -TERM failed; the child may have exited");
            }
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                tracing::warn!(?grace, "breakwater did not exit after SIGTERM; killing it");
                self.child.kill().await?;
                Ok(self.child.wait().await?)
            }
        }
    }
}

fn parse_addr(rest: &str, line: &str) -> Result<SocketAddr, ProcError> {
    rest.trim()
        .trim_end_matches('/')
        .parse()
        .map_err(|_| ProcError::BadReadyLine(line.to_string()))
}

/// The last [`TAIL_LINES`] lines of the child's output.
#[derive(Clone, Default)]
pub(crate) struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    pub(crate) fn push(&self, line: String) {
        // A poisoned lock only means a drain task panicked mid-push; the lines
        // are still usable for an error message.
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() == TAIL_LINES {
            q.pop_front();
        }
        q.push_back(line);
    }

    pub(crate) fn text(&self) -> String {
        let q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.iter().map(String::as_str).collect::<Vec<_>>().join("\n")
    }
}

async fn drain<R: AsyncRead + Unpin>(r: R, tail: Tail, label: &'static str) {
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tail.push(format!("{label}: {line}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_args_spell_the_cli_contract() {
        let args = RunArgs {
            tls_cert: "c.crt".into(),
            tls_key: "c.key".into(),
            upstream: "https://127.0.0.1:6443".into(),
            upstream_ca: "ca.crt".into(),
            shutdown_grace: Some(Duration::from_secs(30)),
            ..RunArgs::default()
        }
        .to_args();
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "run",
                "--listen",
                "127.0.0.1:0",
                "--tls-cert",
                "c.crt",
                "--tls-key",
                "c.key",
                "--upstream",
                "https://127.0.0.1:6443",
                "--upstream-ca",
                "ca.crt",
                "--admin-listen",
                "127.0.0.1:0",
                "--shutdown-grace",
                "30s"
            ]
        );
    }

    #[test]
    fn explicit_missing_path_is_a_clear_error() {
        let err =
            find_breakwater(Some(Path::new("/nonexistent/breakwater"))).expect_err("must not find");
        assert!(
            err.to_string()
                .contains("cargo build --release -p breakwater")
        );
    }

    /// A stand-in child (a shell script) that prints the readiness lines
    /// proves the parsing and the graceful stop without the real proxy.
    #[tokio::test]
    async fn readiness_lines_are_parsed_and_sigterm_stops_the_child() {
        // The trap goes first: like the real proxy, the handler exists
        // before readiness is announced.
        let script = "trap 'exit 0' TERM; echo 'starting' >&2; \
                      echo 'breakwater: listening on https://127.0.0.1:4431'; \
                      echo 'breakwater: admin on http://127.0.0.1:9091'; \
                      while :; do sleep 0.05; done";
        let p = BreakwaterProcess::start(
            Path::new("/bin/sh"),
            ["-c", script],
            StartOptions::default(),
        )
        .await
        .expect("ready");
        assert_eq!(p.listen_url(), "https://127.0.0.1:4431");
        assert_eq!(p.admin_url(), "http://127.0.0.1:9091");
        assert!(p.rss_kib().is_some_and(|kib| kib > 0));
        let status = p.shutdown(Duration::from_secs(10)).await.expect("stopped");
        assert!(status.success(), "{status}");
    }

    #[tokio::test]
    async fn early_exit_reports_the_child_output() {
        let script = "echo 'error: bad flag --frob' >&2; exit 2";
        let err = BreakwaterProcess::start(
            Path::new("/bin/sh"),
            ["-c", script],
            StartOptions::default(),
        )
        .await
        .expect_err("must fail");
        let msg = err.to_string();
        assert!(msg.contains("exited before it was ready"), "{msg}");
        assert!(msg.contains("bad flag --frob"), "{msg}");
    }
}
