//! nginx as a baseline proxy: what operators put in front of an apiserver
//! today, configured by the benchmark itself.
//!
//! [`NginxProcess::start`] writes an `nginx.conf` into a private temporary
//! directory and runs `nginx -p DIR -c nginx.conf -g 'daemon off;'` as a
//! child: a TLS reverse proxy on 127.0.0.1 (HTTP/1.1 and HTTP/2 by ALPN) in
//! front of one HTTPS upstream, with everything nginx writes (pid file,
//! error log, temp paths) inside that directory, so it needs no root paths
//! and leaves nothing behind.
//!
//! The configuration is the fair one, not the default one:
//! - upstream keepalive (`keepalive` in the `upstream` block,
//!   `proxy_http_version 1.1`, `proxy_set_header Connection ""`): without
//!   it nginx opens a TLS connection to the upstream per request;
//! - `keepalive_requests 1000000` on both sides: the default of 1,000 ends
//!   a client's HTTP/2 connection (and an upstream connection) every 1,000
//!   requests, mid-phase, and makes nginx look slower than it is;
//! - `worker_processes` = the number of cores, which is how many worker
//!   threads breakwater's tokio runtime runs;
//! - the upstream's certificate verified (`proxy_ssl_verify on`) against
//!   its CA, as breakwater verifies it;
//! - the client's `Authorization` header forwarded as is (nginx's default),
//!   like breakwater's `passthrough` upstream auth; an access log only when
//!   breakwater writes its own (`--proxy-log info`), buffered like it.
//!
//! nginx has no readiness line on stdout; its master logs `start worker
//! process` (notice level) once its listening socket is open and its
//! workers are forked, and that line on its stderr is what we wait for.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::ScratchDir;
use crate::proc::Tail;

/// What to run `apt-get` with when nginx is missing (Debian's smallest nginx).
pub const INSTALL_HINT: &str = "apt-get install -y nginx-light";

/// How long nginx may take to start its workers.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Attempts at a free port: the port is picked by binding :0 and released
/// before nginx binds it, so another process may take it in between.
const PORT_ATTEMPTS: usize = 3;

/// A failure to find, configure, start or stop nginx.
#[derive(Debug, thiserror::Error)]
pub enum NginxError {
    #[error("nginx not found ({looked}); install it: {INSTALL_HINT}")]
    NotFound { looked: String },
    #[error("`{bin} -v` did not print a version")]
    Version { bin: PathBuf },
    #[error("writing nginx's files in {dir}")]
    Files {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to start {bin}")]
    Spawn {
        bin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("nginx exited before it was ready ({status}); its last output:\n{tail}")]
    ExitedEarly { status: String, tail: String },
    #[error("nginx was not ready after {after:?}; its last output:\n{tail}")]
    ReadyTimeout { after: Duration, tail: String },
    #[error("no free loopback port for nginx")]
    Port(#[source] std::io::Error),
    #[error("failed to signal or wait for nginx")]
    Io(#[from] std::io::Error),
}

/// The proxy nginx should be.
#[derive(Debug, Clone)]
pub struct NginxConfig {
    /// The nginx binary; `None` = [`find_nginx`].
    pub bin: Option<PathBuf>,
    /// `host:port` of the HTTPS upstream.
    pub upstream: SocketAddr,
    /// The name the upstream's certificate must carry (`proxy_ssl_name`):
    /// nginx checks DNS names only, so an IP address will not match.
    pub upstream_name: String,
    /// PEM of the CA that signed the upstream's certificate.
    pub upstream_ca_pem: String,
    /// nginx's own serving certificate and key (PEM).
    pub cert_pem: String,
    pub key_pem: String,
    /// `worker_processes`.
    pub workers: usize,
    /// Idle upstream connections each worker keeps (`keepalive`).
    pub upstream_keepalive: usize,
    /// An access log line per request (`combined`, into the run's directory,
    /// written in batches as breakwater's: `buffer=16k flush=100ms`), for a
    /// run where breakwater logs its own; else `access_log off`.
    pub access_log: bool,
}

/// The worker count that matches breakwater: tokio's multi-thread runtime
/// (breakwater's, with the defaults) runs one worker thread per core.
pub fn breakwater_worker_count() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Finds nginx on `PATH`, else in the sbin directories a non-root `PATH`
/// often lacks (Debian installs it as /usr/sbin/nginx).
pub fn find_nginx(explicit: Option<&Path>) -> Result<PathBuf, NginxError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(NginxError::NotFound {
                looked: format!("no file at {}", p.display()),
            })
        };
    }
    const ALSO: [&str; 3] = ["/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin"];
    super::find_program("nginx", &ALSO).ok_or_else(|| NginxError::NotFound {
        looked: "looked on PATH and in /usr/sbin, /usr/local/sbin, /usr/local/nginx/sbin"
            .to_string(),
    })
}

/// `nginx -v`'s version, e.g. (1, 22, 1).
async fn version(bin: &Path) -> Result<(u32, u32, u32), NginxError> {
    let out = Command::new(bin)
        .arg("-v")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| NginxError::Spawn {
            bin: bin.to_path_buf(),
            source,
        })?;
    // "nginx version: nginx/1.22.1" on stderr (stdout in some builds).
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    parse_version(&text).ok_or_else(|| NginxError::Version {
        bin: bin.to_path_buf(),
    })
}

fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let v = text.split("nginx/").nth(1)?.split_whitespace().next()?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

/// The configuration file. `http2_directive`: nginx 1.25.1 replaced the
/// `http2` parameter of `listen` with the `http2 on;` directive (and
/// warns about the old form); older versions know only the parameter.
fn render_conf(cfg: &NginxConfig, dir: &Path, port: u16, http2_directive: bool) -> String {
    let d = dir.display();
    let (listen_http2, http2_on) = if http2_directive {
        ("", "\n        http2 on;")
    } else {
        (" http2", "")
    };
    let access_log = if cfg.access_log {
        format!("{d}/access.log combined buffer=16k flush=100ms")
    } else {
        "off".to_string()
    };
    format!(
        "# Written by breakwater's `loadtest bench overhead --with-nginx`.
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
# The readiness signal: the master logs `start worker process` here.
error_log stderr notice;

events {{
    worker_connections 4096;
}}

http {{
    access_log {access_log};
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;

    # Clients: the default of 1,000 requests per connection would end HTTP/2
    # connections mid-run.
    keepalive_requests 1000000;
    keepalive_timeout 300s;

    upstream apiserver {{
        server {upstream};
        keepalive {keepalive};
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}

    server {{
        listen 127.0.0.1:{port} ssl{listen_http2};{http2_on}
        ssl_certificate {d}/nginx.crt;
        ssl_certificate_key {d}/nginx.key;
        ssl_protocols TLSv1.2 TLSv1.3;

        location / {{
            proxy_pass https://apiserver;
            # Upstream keepalive needs HTTP/1.1 and no `Connection: close`.
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_ssl_trusted_certificate {d}/upstream-ca.crt;
            proxy_ssl_verify on;
            proxy_ssl_name {name};
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
            # Authorization is forwarded untouched (nginx's default), as
            # breakwater's passthrough mode does.
        }}
    }}
}}
",
        workers = cfg.workers.max(1),
        upstream = cfg.upstream,
        keepalive = cfg.upstream_keepalive.max(1),
        name = cfg.upstream_name,
    )
}

/// A running nginx (master and workers) that has started its workers.
/// Dropping it sends the master SIGTERM, which stops the workers too
/// (killing only the master would orphan them, still listening).
pub struct NginxProcess {
    child: Child,
    addr: SocketAddr,
    tail: Tail,
    /// Holds the configuration, certificates, logs and temp paths.
    dir: ScratchDir,
}

impl std::fmt::Debug for NginxProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NginxProcess")
            .field("pid", &self.child.id())
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl NginxProcess {
    /// Writes the configuration and starts nginx on a free loopback port.
    pub async fn start(cfg: &NginxConfig) -> Result<NginxProcess, NginxError> {
        let bin = find_nginx(cfg.bin.as_deref())?;
        let (major, minor, patch) = version(&bin).await?;
        let http2_directive = (major, minor, patch) >= (1, 25, 1);
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port().map_err(NginxError::Port)?;
            match Self::start_on(&bin, cfg, port, http2_directive).await {
                Ok(p) => return Ok(p),
                // Someone took the port between our probe and nginx's bind.
                Err(NginxError::ExitedEarly { tail, status })
                    if tail.contains("Address already in use") =>
                {
                    last = Some(NginxError::ExitedEarly { tail, status });
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(NginxError::Port(std::io::Error::other(
            "every port attempt failed",
        ))))
    }

    async fn start_on(
        bin: &Path,
        cfg: &NginxConfig,
        port: u16,
        http2_directive: bool,
    ) -> Result<NginxProcess, NginxError> {
        let dir = ScratchDir::new().map_err(|source| NginxError::Files {
            dir: std::env::temp_dir(),
            source,
        })?;
        let files = |source| NginxError::Files {
            dir: dir.path().to_path_buf(),
            source,
        };
        dir.write("nginx.crt", &cfg.cert_pem).map_err(files)?;
        dir.write("nginx.key", &cfg.key_pem).map_err(files)?;
        dir.write("upstream-ca.crt", &cfg.upstream_ca_pem)
            .map_err(files)?;
        dir.write(
            "nginx.conf",
            &render_conf(cfg, dir.path(), port, http2_directive),
        )
        .map_err(files)?;
        // nginx opens `logs/error.log` under its prefix before it reads
        // the configuration; `-e` points that at our directory too.
        let mut child = Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg("nginx.conf")
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-g")
            .arg("daemon off;")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| NginxError::Spawn {
                bin: bin.to_path_buf(),
                source,
            })?;
        let tail = Tail::default();
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| NginxError::Io(std::io::Error::other("stderr was not captured")))?;
        let mut lines = BufReader::new(stderr).lines();
        let ready = tokio::time::timeout(READY_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                let started = line.contains("start worker process");
                tail.push(line);
                if started {
                    return Ok(true);
                }
            }
            Ok::<_, std::io::Error>(false)
        })
        .await;
        let mut process = NginxProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            tail: tail.clone(),
            dir,
        };
        match ready {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                // stderr closed: the master is gone (or going).
                let status = tokio::time::timeout(Duration::from_secs(5), process.child.wait())
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map_or_else(|| "still running".to_string(), |s| s.to_string());
                return Err(NginxError::ExitedEarly {
                    status,
                    tail: process.output_tail(),
                });
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                return Err(NginxError::ReadyTimeout {
                    after: READY_TIMEOUT,
                    tail: process.output_tail(),
                });
            }
        }
        // Keep draining stderr so nginx never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                tail.push(line);
            }
        });
        Ok(process)
    }

    /// Where nginx listens (TLS, h2 and http/1.1 by ALPN).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The master's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The last lines of nginx's stderr and its error log in the directory.
    pub fn output_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default();
        let log_tail: Vec<&str> = log.lines().rev().take(20).collect();
        let mut out = self.tail.text();
        if !log_tail.is_empty() {
            out.push_str("\nerror.log:\n");
            out.push_str(&log_tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        out
    }

    /// SIGTERM to the master (it stops its workers), then waits up to
    /// `grace`; SIGKILL after that.
    pub async fn shutdown(mut self, grace: Duration) -> Result<(), NginxError> {
        self.terminate();
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(?grace, "nginx did not exit after SIGTERM; killing it");
            self.child.kill().await?;
        }
        Ok(())
    }

    /// `kill -TERM` through the system tool: no libc, no unsafe.
    fn terminate(&mut self) {
        if let Ok(None) = self.child.try_wait()
            && let Some(pid) = self.child.id()
        {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for NginxProcess {
    fn drop(&mut self) {
        // An error path or a panic must not leave nginx's workers running.
        self.terminate();
    }
}

/// A loopback port free right now.
fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(l.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_from_nginx_v() {
        assert_eq!(
            parse_version("nginx version: nginx/1.22.1\n"),
            Some((1, 22, 1))
        );
        assert_eq!(
            parse_version("nginx version: nginx/1.25.1 (Ubuntu)"),
            Some((1, 25, 1))
        );
        assert_eq!(parse_version("command not found"), None);
    }

    #[test]
    fn a_missing_nginx_says_how_to_install_it() {
        let err = find_nginx(Some(Path::new("/nonexistent/nginx"))).expect_err("absent");
        assert!(
            err.to_string().contains("apt-get install -y nginx-light"),
            "{err}"
        );
    }

    fn cfg() -> NginxConfig {
        NginxConfig {
            bin: None,
            upstream: SocketAddr::from(([127, 0, 0, 1], 6443)),
            upstream_name: "localhost".into(),
            upstream_ca_pem: String::new(),
            cert_pem: String::new(),
            key_pem: String::new(),
            workers: 2,
            upstream_keepalive: 64,
            access_log: false,
        }
    }

    #[test]
    fn the_configuration_keeps_connections_and_everything_in_its_directory() {
        let dir = Path::new("/tmp/bench-x");
        let old = render_conf(&cfg(), dir, 8443, false);
        assert!(old.contains("listen 127.0.0.1:8443 ssl http2;"), "{old}");
        assert!(!old.contains("http2 on;"));
        let new = render_conf(&cfg(), dir, 8443, true);
        assert!(
            new.contains("listen 127.0.0.1:8443 ssl;\n        http2 on;"),
            "{new}"
        );
        assert!(old.contains("access_log off;"), "{old}");
        let logged = render_conf(
            &NginxConfig {
                access_log: true,
                ..cfg()
            },
            dir,
            8443,
            true,
        );
        assert!(
            logged.contains("access_log /tmp/bench-x/access.log combined buffer=16k flush=100ms;"),
            "{logged}"
        );
        for conf in [old, new] {
            // Both sides of the proxy keep their connections for the run.
            assert_eq!(conf.matches("keepalive_requests 1000000;").count(), 2);
            assert!(conf.contains("keepalive 64;"));
            assert!(conf.contains("proxy_http_version 1.1;"));
            assert!(conf.contains("proxy_set_header Connection \"\";"));
            assert!(conf.contains("proxy_ssl_verify on;"));
            assert!(conf.contains("worker_processes 2;"));
            // Every path nginx writes is inside its directory.
            for line in conf.lines().map(str::trim) {
                if line.starts_with("pid ")
                    || line.starts_with("error_log /")
                    || line.contains("_temp_path ")
                    || line.starts_with("ssl_certificate")
                {
                    assert!(line.contains("/tmp/bench-x/"), "{line}");
                }
            }
        }
    }
}
