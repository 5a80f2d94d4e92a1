//! The emergency brake from the command line: `breakwater block`, `blocks`
//! and `unblock` (the real binary) against a proxy whose apiserver is
//! unreachable — they talk only to its admin listener, and the block is
//! decided at the proxy.

mod common;

use std::time::Duration;

use breakwater::config::LimitsConfig;
use breakwater::server::ProxyHandle;
use serde_json::Value;

use common::{Env, HttpsClient, demo_env, get, https_client, passthrough_config};

const LIMITS: &str = r#"apiVersion: breakwater/v1alpha1
kind: Limits
rules:
  - name: admins
    match:
      groups: ["system:masters"]
    exempt: true
  - name: viewers
    match:
      serviceAccounts: ["demo/viewer"]
    perIdentity: {rate: 1000, burst: 1000}
  - name: default
    perIdentity: {rate: 1000, burst: 1000}
"#;

/// A proxy in front of a closed port, with the demo's certificates and
/// ServiceAccount keys (tokens are verified locally), a limits file with
/// an exempt rule, and a blocks file.
struct Brake {
    env: Env,
    proxy: ProxyHandle,
    /// The admin listener, as `--admin` takes it.
    admin: String,
    client: HttpsClient,
    viewer_token: String,
}

async fn brake() -> Brake {
    let env = demo_env().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let limits = env.dir.path().join("brake-limits.yaml");
    std::fs::write(&limits, LIMITS).expect("write limits");
    let mut cfg = passthrough_config(
        &env,
        format!("https://127.0.0.1:{port}"),
        Duration::from_secs(1),
    );
    cfg.limits = LimitsConfig {
        file: Some(limits),
        blocks_file: Some(env.dir.path().join("brake-blocks.json")),
        rate_limit_headers: true,
    };
    let proxy = breakwater::server::start(cfg).await.expect("proxy starts");
    let admin = format!("http://{}", proxy.admin_addr());
    let text = std::fs::read_to_string(&env.demo.kubeconfig_viewer).expect("viewer kubeconfig");
    let viewer_token = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .expect("token line")
        .to_string();
    let client = https_client(&env.demo.proxy_ca_pem, false);
    Brake {
        env,
        proxy,
        admin,
        client,
        viewer_token,
    }
}

impl Brake {
    /// GETs one pod through the proxy with `token`: the status and the
    /// Retry-After header. (A GET of one object is forwarded; a LIST may
    /// wait for the watch hub's shared stream, which cannot start without
    /// the apiserver.)
    async fn get_pod(&self, token: &str) -> (u16, Option<String>) {
        let url = format!(
            "https://{}/api/v1/namespaces/demo/pods/agent-1",
            self.proxy.addr()
        );
        let resp = tokio::time::timeout(
            Duration::from_secs(20),
            self.client.request(get(&url, token)),
        )
        .await
        .expect("answered in time")
        .expect("response");
        let retry = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().expect("ascii").to_string());
        (resp.status().as_u16(), retry)
    }

    /// Runs `breakwater ARGS --admin ADMIN`.
    async fn cli(&self, args: &[&str]) -> Cli {
        let mut all = args.to_vec();
        all.extend(["--admin", &self.admin]);
        cli(&all).await
    }

    async fn shutdown(self) {
        self.proxy.shutdown().await;
        self.env.demo.shutdown().await;
    }
}

struct Cli {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Cli {
    fn success(self, what: &str) -> String {
        assert!(
            self.ok,
            "{what} failed ({:?}): {}\n{}",
            self.code, self.stderr, self.stdout
        );
        self.stdout
    }

    /// Fails with exit 1 and one `error: …` line; returns it.
    fn failure(self, what: &str) -> String {
        assert_eq!(
            self.code,
            Some(1),
            "{what}: {}\n{}",
            self.stderr,
            self.stdout
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{what}: one line: {}", self.stderr);
        assert!(lines[0].starts_with("error: "), "{what}: {}", self.stderr);
        lines[0].to_string()
    }
}

async fn cli(args: &[&str]) -> Cli {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_breakwater"))
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the command finished within 30 s")
    .expect("breakwater runs");
    Cli {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).expect("utf8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("utf8 stderr"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_is_blocked_listed_and_unblocked_while_the_apiserver_is_down() {
    let b = brake().await;
    let admin_token = b.env.demo.token.clone();

    // Nothing blocked: the unreachable apiserver answers through the proxy
    // as a 503.
    assert_eq!(b.get_pod(&b.viewer_token).await.0, 503);
    let out = b.cli(&["blocks"]).await.success("blocks");
    assert_eq!(out, "No blocks.\n");

    let out = b
        .cli(&[
            "block",
            "serviceaccount",
            "demo/viewer",
            "--for",
            "30m",
            "--terminate",
            "--reason",
            "INC-1234",
        ])
        .await
        .success("block serviceaccount");
    // block/ID created; ended 0 open requests now
    let id = out
        .strip_prefix("block/")
        .and_then(|rest| rest.split_once(" created"))
        .map(|(id, _)| id.to_string())
        .unwrap_or_else(|| panic!("block/ID created: {out}"));
    assert!(!id.is_empty(), "{out}");
    assert!(out.contains("ended 0 open requests"), "{out}");

    // Refused at the proxy, with the block's 429: the ServiceAccount's
    // requests never reach (the lack of) the apiserver. Another identity
    // still gets the upstream's 503.
    let (code, retry) = b.get_pod(&b.viewer_token).await;
    assert_eq!(code, 429);
    assert!(retry.is_some(), "a 429 says when to retry");
    assert_eq!(b.get_pod(&admin_token).await.0, 503, "not blocked");

    let json = b
        .cli(&["blocks", "-o", "json"])
        .await
        .success("blocks -o json");
    let list: Value = serde_json::from_str(&json).expect("json");
    let list = list.as_array().expect("an array");
    assert_eq!(list.len(), 1, "{json}");
    let block = &list[0];
    assert_eq!(block["id"], id.as_str());
    assert_eq!(
        block["target"],
        serde_json::json!({"kind": "identity", "user": "system:serviceaccount:demo:viewer"})
    );
    assert!(block["hits"].as_u64().expect("hits") >= 1, "{block}");
    assert_eq!(block["terminate"], true);
    assert_eq!(block["reason"], "INC-1234");
    assert_eq!(block["respond"], 429);
    let expires = humantime::parse_rfc3339_weak(block["expiresAt"].as_str().expect("expiresAt"))
        .expect("time");
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .expect("in the future");
    assert!(
        left > Duration::from_secs(29 * 60) && left <= Duration::from_secs(30 * 60),
        "{left:?}"
    );

    let table = b.cli(&["blocks"]).await.success("blocks");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    for column in [
        "ID",
        "TARGET",
        "RESPOND",
        "TERMINATE",
        "EXPIRES",
        "HITS",
        "ENDED",
        "AGE",
        "REASON",
    ] {
        assert!(lines[0].contains(column), "{table}");
    }
    let row = lines[1];
    assert!(row.starts_with(&format!("{id} ")), "{table}");
    assert!(row.contains("serviceaccount demo/viewer"), "{table}");
    assert!(row.contains("INC-1234"), "{table}");
    assert!(row.contains(" 29m ") || row.contains(" 28m "), "{table}");

    let out = b.cli(&["unblock", &id]).await.success("unblock");
    assert_eq!(out, format!("block/{id} deleted\n"));
    let out = b.cli(&["blocks"]).await.success("blocks");
    assert_eq!(out, "No blocks.\n");
    assert_eq!(b.get_pod(&b.viewer_token).await.0, 503, "unblocked");
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exempt_rule_is_blocked_only_with_force() {
    let b = brake().await;
    let line = b
        .cli(&["block", "rule", "admins", "--reason", "oops"])
        .await
        .failure("block an exempt rule");
    assert!(line.contains("--force"), "{line}");
    assert!(line.contains("admins"), "{line}");
    let out = b.cli(&["blocks"]).await.success("blocks");
    assert_eq!(out, "No blocks.\n", "nothing was added");

    let out = b
        .cli(&[
            "block", "rule", "admins", "--force", "--id", "lockdown", "-o", "json",
        ])
        .await
        .success("block --force");
    let block: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(block["id"], "lockdown");
    assert_eq!(block["force"], true);
    assert_eq!(
        block["target"],
        serde_json::json!({"kind": "rule", "name": "admins"})
    );

    let table = b.cli(&["blocks"]).await.success("blocks");
    assert!(table.contains("rule admins (forced)"), "{table}");
    let out = b.cli(&["unblock", "--all"]).await.success("unblock --all");
    assert_eq!(out, "block/lockdown deleted\n");
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mistakes_fail_with_one_clear_line() {
    let b = brake().await;

    // A pattern needs its scope.
    let line = b
        .cli(&["block", "pattern", "--verb", "list", "--resource", "pods"])
        .await
        .failure("pattern without a scope");
    assert!(
        line.contains("--namespace")
            && line.contains("--all-namespaces")
            && line.contains("--cluster-wide"),
        "{line}"
    );
    // With one, it works; the proxy's own checks speak through the CLI.
    let out = b
        .cli(&[
            "block",
            "pattern",
            "--verb",
            "list",
            "--resource",
            "pods",
            "--cluster-wide",
            "--respond",
            "403",
            "--id",
            "pods",
        ])
        .await
        .success("pattern --cluster-wide");
    assert_eq!(out, "block/pods created\n");
    let line = b
        .cli(&["block", "user", "alice", "--id", "pods"])
        .await
        .failure("a duplicate id");
    assert_eq!(line, "error: a block with id `pods` already exists");
    let line = b
        .cli(&[
            "block",
            "pattern",
            "--verb",
            "frobnicate",
            "--resource",
            "pods",
            "-A",
        ])
        .await
        .failure("an unknown verb");
    assert!(line.contains("frobnicate"), "{line}");

    // An unknown id is named; the known one beside it is still removed.
    let line = b
        .cli(&["unblock", "no-such-block"])
        .await
        .failure("unblock an unknown id");
    assert!(line.contains("\"no-such-block\""), "{line}");
    let both = b.cli(&["unblock", "block/pods", "nope"]).await;
    assert_eq!(both.stdout, "block/pods deleted\n");
    assert!(both.stderr.contains("\"nope\""), "{}", both.stderr);
    assert_eq!(both.code, Some(1));

    // --all-expired: a block whose time is up goes (unless the proxy's
    // sweep got there first); then there is nothing left to do.
    b.cli(&["block", "node", "n1", "--for", "1ms", "--id", "brief"])
        .await
        .success("block --for 1ms");
    let out = b
        .cli(&["unblock", "--all-expired"])
        .await
        .success("unblock --all-expired");
    assert!(
        out == "block/brief deleted\n"
            || out == "block/brief already gone\n"
            || out == "No expired blocks.\n",
        "{out}"
    );
    let out = b
        .cli(&["unblock", "--all-expired"])
        .await
        .success("unblock --all-expired");
    assert_eq!(out, "No expired blocks.\n");

    // No admin listener there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let nowhere = format!(
        "http://127.0.0.1:{}",
        closed.local_addr().expect("addr").port()
    );
    drop(closed);
    let line = cli(&["blocks", "--admin", &nowhere])
        .await
        .failure("an unreachable admin listener");
    assert!(
        line.starts_with(&format!(
            "error: cannot reach the admin listener at {nowhere}: "
        )),
        "{line}"
    );
    let line = cli(&["blocks", "--admin", "https://127.0.0.1:6443"])
        .await
        .failure("an https URL");
    assert!(line.contains("http://"), "{line}");
    b.shutdown().await;
}
