//! A Go `net/http` upstream for the overhead benchmark
//! (`--upstream go`): the apiserver's transport itself, not a copy of it.
//!
//! kube-apiserver serves through Go's standard HTTP/2 server; kube-sim is
//! hyper made to look like it ([`crate::sim::transport`]). This stand-in
//! (`go_upstream.go`, built with the local `go` toolchain, Debian's
//! `golang-go`, into a temporary directory) answers the benchmark's GET with
//! the exact bytes kube-sim served for it and the apiserver's headers, so
//! breakwater, nginx and the direct clients meet Go's framing and flushing.
//! It checks the bearer token and answers breakwater's SelfSubjectReview
//! with kube-sim's own answer. Optional: the bench uses it only when asked
//! and `go` is installed; no test needs it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::ScratchDir;
use crate::proc::Tail;

/// The stand-in's source, built at run time.
const SOURCE: &str = include_str!("go_upstream.go");

/// Prefix of the stand-in's readiness line on stdout.
const READY_PREFIX: &str = "go-standin: listening on ";

/// How long `go build` and the start may take.
const BUILD_TIMEOUT: Duration = Duration::from_secs(300);

/// A failure to build or start the Go stand-in.
#[derive(Debug, thiserror::Error)]
pub enum GoError {
    #[error("`go` not found on PATH; install it: apt-get install -y golang-go")]
    NotFound,
    #[error("writing the stand-in's files in {dir}")]
    Files {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`go build` failed:\n{0}")]
    Build(String),
    #[error("running {what}")]
    Spawn {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the Go stand-in was not ready within {after:?}; its last output:\n{tail}")]
    NotReady { after: Duration, tail: String },
}

/// What the stand-in serves.
#[derive(Debug, Clone)]
pub struct GoUpstreamConfig {
    /// Serving certificate and key (PEM), from a CA its clients trust.
    pub cert_pem: String,
    pub key_pem: String,
    /// The only bearer token it accepts.
    pub token: String,
    /// The path it answers GETs of, with `body`.
    pub path: String,
    pub body: Vec<u8>,
    /// Its answer to a SelfSubjectReview (breakwater's review of the token).
    pub self_subject_review: Vec<u8>,
}

/// `go` on PATH, if installed.
pub fn find_go() -> Option<PathBuf> {
    super::find_program("go", &["/usr/lib/go/bin"])
}

/// The running stand-in (one process; killed on drop).
pub struct GoUpstream {
    child: Child,
    addr: SocketAddr,
    tail: Tail,
    _dir: ScratchDir,
}

impl GoUpstream {
    /// Builds the stand-in and starts it on a free loopback port.
    pub async fn start(cfg: &GoUpstreamConfig) -> Result<GoUpstream, GoError> {
        let go = find_go().ok_or(GoError::NotFound)?;
        let dir = ScratchDir::new().map_err(|source| GoError::Files {
            dir: std::env::temp_dir(),
            source,
        })?;
        let files = |source| GoError::Files {
            dir: dir.path().to_path_buf(),
            source,
        };
        let src = dir.write("main.go", SOURCE).map_err(files)?;
        let cert = dir.write("tls.crt", &cfg.cert_pem).map_err(files)?;
        let key = dir.write("tls.key", &cfg.key_pem).map_err(files)?;
        let token = dir.write("token", &cfg.token).map_err(files)?;
        let body = dir.path().join("body.json");
        std::fs::write(&body, &cfg.body).map_err(files)?;
        let ssr = dir.path().join("ssr.json");
        std::fs::write(&ssr, &cfg.self_subject_review).map_err(files)?;
        let bin = dir.path().join("standin");

        let build = tokio::time::timeout(
            BUILD_TIMEOUT,
            Command::new(&go)
                .arg("build")
                .arg("-o")
                .arg(&bin)
                .arg(&src)
                .current_dir(dir.path())
                // No module, no network: the stand-in uses the standard
                // library only.
                .env("GO111MODULE", "off")
                .env("GOFLAGS", "")
                .stdin(Stdio::null())
                .output(),
        )
        .await
        .map_err(|_| GoError::Build(format!("timed out after {BUILD_TIMEOUT:?}")))?
        .map_err(|source| GoError::Spawn {
            what: "go build",
            source,
        })?;
        if !build.status.success() {
            return Err(GoError::Build(
                String::from_utf8_lossy(&build.stderr).into_owned(),
            ));
        }

        let mut child = Command::new(&bin)
            .args([&cert, &key, &token])
            .arg(&cfg.path)
            .args([&body, &ssr])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| GoError::Spawn {
                what: "the Go stand-in",
                source,
            })?;
        let tail = Tail::default();
        if let Some(stderr) = child.stderr.take() {
            let tail = tail.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tail.push(line);
                }
            });
        }
        let stdout = child.stdout.take().ok_or_else(|| GoError::Spawn {
            what: "the Go stand-in",
            source: std::io::Error::other("stdout was not captured"),
        })?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(20), async {
            while let Ok(Some(line)) = lines.next_line().await {
                tail.push(line.clone());
                if let Some(addr) = line.strip_prefix(READY_PREFIX) {
                    return addr.trim().parse::<SocketAddr>().ok();
                }
            }
            None
        })
        .await;
        let Ok(Some(addr)) = ready else {
            return Err(GoError::NotReady {
                after: Duration::from_secs(20),
                tail: tail.text(),
            });
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(GoUpstream {
            child,
            addr,
            tail,
            _dir: dir,
        })
    }

    /// Where it listens (TLS, h2 and http/1.1).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Its last output.
    pub fn output_tail(&self) -> String {
        self.tail.text()
    }

    /// Stops it.
    pub async fn shutdown(mut self) {
        let _ = self.child.kill().await;
    }
}
