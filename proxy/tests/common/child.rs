//! A proxy as its own process (`breakwater run`, the real binary).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::Env;

/// A replica as its own process (`breakwater run`, the real binary): its
/// metrics and logs are its own, and it can be paused with SIGSTOP.
pub struct Child {
    pub child: tokio::process::Child,
    pub plain: SocketAddr,
    pub admin: SocketAddr,
    /// Everything it logged so far (stderr).
    pub log: tokio::sync::watch::Receiver<String>,
}

impl Child {
    /// Starts a replica in front of `env`'s kube-sim with the limits file
    /// `limits`, logging at debug level (so a test sees whatever it could
    /// leak).
    pub async fn start(env: &Env, limits: Option<&Path>) -> Child {
        Self::start_logging(env, limits, "info,breakwater=debug").await
    }

    /// As [`Child::start`], with the log filter `filter` (BREAKWATER_LOG).
    pub async fn start_logging(env: &Env, limits: Option<&Path>, filter: &str) -> Child {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt};
        let d = env.dir.path();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_breakwater"))
            .arg("run")
            .args(["--listen", "127.0.0.1:0", "--plain-listen", "127.0.0.1:0"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .arg("--tls-cert")
            .arg(d.join("proxy.crt"))
            .arg("--tls-key")
            .arg(d.join("proxy.key"))
            .args(["--upstream", &env.demo.sim.url()])
            .arg("--upstream-ca")
            .arg(d.join("kube-sim-ca.crt"))
            .arg("--service-account-key-file")
            .arg(d.join("sa.pub"))
            .args([
                "--service-account-issuer",
                &breakwater_loadtest::sim::SimConfig::default().issuer,
            ])
            .args(["--shutdown-grace", "1s"])
            .args(
                limits
                    .iter()
                    .flat_map(|l| [std::ffi::OsStr::new("--limits"), l.as_os_str()]),
            )
            .env("BREAKWATER_LOG", filter)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("breakwater runs");
        let (tx, log) = tokio::sync::watch::channel(String::new());
        let mut stderr = child.stderr.take().expect("stderr");
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                tx.send_modify(|log| log.push_str(&text));
            }
        });
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let (mut plain, mut admin) = (None, None);
        tokio::time::timeout(Duration::from_secs(30), async {
            while plain.is_none() || admin.is_none() {
                let line = lines
                    .next_line()
                    .await
                    .expect("read stdout")
                    .unwrap_or_else(|| panic!("replica exited: {}", log.borrow().as_str()));
                let addr = |p: &str| line.strip_prefix(p).map(|a| a.parse().expect("address"));
                plain = plain.or_else(|| addr("breakwater: plain HTTP on http://"));
                admin = admin.or_else(|| addr("breakwater: admin on http://"));
            }
        })
        .await
        .expect("the replica announced its listeners within 30 s");
        // Keep draining stdout so the child never blocks on it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Child {
            child,
            plain: plain.expect("plain listener"),
            admin: admin.expect("admin listener"),
            log,
        }
    }

    /// Waits (bounded) until the log has a line containing every one of
    /// `needles`; returns that line.
    pub async fn until_logged(&mut self, needles: &[&str]) -> String {
        let found = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Some(line) = self
                    .log
                    .borrow_and_update()
                    .lines()
                    .find(|l| needles.iter().all(|n| l.contains(n)))
                {
                    return line.to_string();
                }
                self.log.changed().await.expect("the log reader ended");
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "no log line with {needles:?}:\n{}",
                self.log.borrow().as_str()
            )
        })
    }

    /// The value of a metric without labels, from the replica's admin
    /// listener.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = super::scrape(self.admin).await;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// Waits (bounded) until `name` reads `want`.
    pub async fn until_metric(&self, name: &str, want: f64) {
        let mut last = None;
        for _ in 0..400 {
            last = self.metric(name).await;
            if last == Some(want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{name} stayed {last:?}, not {want}");
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id().expect("running")).expect("pid")
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) with kill(1) and waits for it to
    /// be sent.
    pub async fn signal(&self, signal: &str) {
        let status = tokio::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .await
            .expect("kill runs");
        assert!(status.success(), "kill -{signal}");
    }
}
