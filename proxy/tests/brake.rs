//! The emergency brake: `breakwater block`, `blocks` and `unblock` (the
//! real binary) against a proxy whose apiserver is unreachable — they talk
//! only to its admin listener, and the block is decided at the proxy; and
//! blocks with `terminate: true` ending what is already open (below).

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
    let viewer_token = common::viewer_token(&env);
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

// The emergency brake's `terminate: true`: a block also ends the matching
// long-running requests already open — shared and forwarded watches, JSON
// and protobuf, over HTTP/1.1 and HTTP/2, each ended cleanly between two
// events — while unary requests in flight finish, other identities and
// exempt admins carry on, and the permits return to zero.
mod terminate {
    use std::time::{Duration, Instant};

    use breakwater_loadtest::sim::resources;
    use bytes::{Buf, Bytes, BytesMut};
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Incoming;
    use serde_json::{Value, json};

    use crate::common::{
        Env, HttpsClient, Lines, env_with_limits, get, https_client, viewer_token,
    };

    const LIMITS: &str = r#"apiVersion: breakwater/v1alpha1
kind: Limits
replicas: 1
rules:
  - name: admins
    match:
      groups: ["system:masters"]
    exempt: true
  - name: agents
    match:
      serviceAccounts: ["demo/viewer"]
    perIdentity: {rate: 5000, burst: 5000, inflight: 100, watches: 1000}
  - name: default
    perIdentity: {rate: 5000, burst: 5000, inflight: 1000, watches: 1000}
"#;

    const AGENT: &str = "system:serviceaccount:demo:viewer";
    const PODS: &str = "/api/v1/namespaces/demo/pods";
    const TABLE: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json";
    const PROTOBUF: &str = "application/vnd.kubernetes.protobuf,application/json";
    const WAIT: Duration = Duration::from_secs(20);

    /// A request with a bearer token and an Accept header.
    fn request(url: &str, token: &str, accept: &str) -> http::Request<Empty<Bytes>> {
        http::Request::get(url)
            .header("authorization", format!("Bearer {token}"))
            .header("accept", accept)
            .body(Empty::new())
            .expect("request")
    }

    async fn open(client: &HttpsClient, url: &str, token: &str, accept: &str) -> Incoming {
        let resp = tokio::time::timeout(WAIT, client.request(request(url, token, accept)))
            .await
            .expect("answered in time")
            .expect("response");
        assert_eq!(resp.status(), 200, "{url} ({accept})");
        resp.into_body()
    }

    /// Reads a JSON watch to its end: the stream must end cleanly (no break,
    /// no half line). Returns the events read.
    async fn json_to_end(body: Incoming) -> usize {
        let mut lines = Lines::new(body);
        let mut n = 0;
        while let Some(line) = lines.next().await {
            serde_json::from_str::<Value>(&line).expect("every event whole");
            n += 1;
        }
        n
    }

    /// Reads a protobuf watch to its end: every frame whole, no break.
    async fn protobuf_to_end(mut body: Incoming) -> usize {
        let mut buf = BytesMut::new();
        let mut n = 0;
        loop {
            while buf.len() >= 4 {
                let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
                if buf.len() < 4 + len {
                    break;
                }
                buf.advance(4 + len);
                n += 1;
            }
            match body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        buf.extend_from_slice(&d);
                    }
                }
                Some(Err(e)) => panic!("protobuf stream broke: {e}"),
                None => {
                    assert!(buf.is_empty(), "protobuf stream ended mid-frame");
                    return n;
                }
            }
        }
    }

    /// POSTs/DELETEs the admin block API; (status, JSON).
    async fn admin(env: &Env, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<Bytes>>();
        let url = format!("http://{}{path}", env.demo.proxy.admin_addr());
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = http::Request::builder()
            .method(method)
            .uri(url)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(Bytes::from(body)))
            .expect("admin request");
        let resp = client.request(req).await.expect("admin answers");
        let code = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    fn rule_counts(env: &Env, rule: &str) -> (u64, u64) {
        env.demo
            .proxy
            .admission()
            .limiter()
            .rule_stats()
            .iter()
            .find(|s| s.rule.as_ref() == rule)
            .map(|s| (s.inflight, s.watches))
            .unwrap_or((0, 0))
    }

    /// Waits (bounded) for a condition that has no signal to await.
    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond() {
            assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn pod(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "demo"},
               "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_terminating_block_ends_open_streams_cleanly_and_leaves_the_rest() {
        let env = env_with_limits(LIMITS).await;
        let agent = viewer_token(&env);
        let other = env.demo.token.clone();
        let base = env.proxy_url();
        let h2 = https_client(&env.demo.proxy_ca_pem, true);
        let h1 = https_client(&env.demo.proxy_ca_pem, false);
        let url = format!("{base}{PODS}?watch=1");

        // The agent's 200 watches: shared JSON over HTTP/2 and HTTP/1.1, shared
        // protobuf, and forwarded Tables (the hub does not share those).
        let mut json_watches = Vec::new();
        for i in 0..170 {
            let client = if i % 17 == 0 { &h1 } else { &h2 };
            json_watches.push(open(client, &url, &agent, "application/json").await);
        }
        let mut pb_watches = Vec::new();
        for _ in 0..20 {
            pb_watches.push(open(&h2, &url, &agent, PROTOBUF).await);
        }
        let upstream_before_tables = env.demo.sim.open_watches("pods");
        let mut table_watches = Vec::new();
        for i in 0..10 {
            let client = if i % 2 == 0 { &h1 } else { &h2 };
            table_watches.push(open(client, &url, &agent, TABLE).await);
        }
        until("the Table watches are open upstream", || {
            env.demo.sim.open_watches("pods") == upstream_before_tables + 10
        })
        .await;
        // Ten LISTs whose answers have begun but are not read yet.
        let mut lists = Vec::new();
        for i in 0..10 {
            let client = if i % 2 == 0 { &h1 } else { &h2 };
            lists.push(open(client, &format!("{base}{PODS}"), &agent, "application/json").await);
        }
        // Another identity's watches, and an exempt admin's (kubectl with the
        // system:masters certificate).
        let mut others = Vec::new();
        for _ in 0..5 {
            others.push(Lines::new(
                open(&h2, &url, &other, "application/json").await,
            ));
        }
        let mut admin_watch = crate::common::kubectl_cmd(&env.demo.kubeconfig, env.cache.path())
            .args(["get", "pods", "-n", "demo", "-w", "-o", "name"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        let mut admin_out = tokio::io::BufReader::new(admin_watch.stdout.take().expect("stdout"));
        until("the agent holds 200 watches", || {
            rule_counts(&env, "agents").1 == 200
        })
        .await;
        // kubectl -w LISTs, then watches.
        until("every watch is registered", || {
            env.demo.proxy.open_streams() == 200 + 5 + 1
        })
        .await;

        // The brake.
        let started = Instant::now();
        let (code, block) = admin(
            &env,
            "POST",
            "/admin/v1/blocks",
            Some(
                json!({"target": {"kind": "identity", "user": AGENT}, "terminate": true,
                        "reason": "test"}),
            ),
        )
        .await;
        assert_eq!(code, 201, "{block}");
        assert_eq!(block["terminated"], 200, "{block}");

        // Every watch ends, cleanly, within a second.
        let ended = async {
            let json = futures_util::future::join_all(json_watches.into_iter().map(json_to_end));
            let pb = futures_util::future::join_all(pb_watches.into_iter().map(protobuf_to_end));
            let tables = futures_util::future::join_all(table_watches.into_iter().map(json_to_end));
            tokio::join!(json, pb, tables)
        };
        tokio::time::timeout(Duration::from_secs(1), ended)
            .await
            .expect("every watch ended within 1 s");
        let took = started.elapsed();
        eprintln!("200 watches ended {took:?} after the block was asked for");

        // The LISTs complete.
        for body in lists {
            let bytes = body.collect().await.expect("the LIST completes").to_bytes();
            let list: Value = serde_json::from_slice(&bytes).expect("a whole PodList");
            assert_eq!(list["kind"], "PodList");
        }
        // The forwarded watches are closed upstream too.
        until("the Table watches are closed upstream", || {
            env.demo.sim.open_watches("pods") == upstream_before_tables
        })
        .await;
        // The agent's permits are all back.
        until("the agent's permits are back", || {
            rule_counts(&env, "agents") == (0, 0)
        })
        .await;
        assert_eq!(env.demo.proxy.open_streams(), 5 + 1);

        // A new request of the agent meets the block.
        let resp = h1.request(get(&url, &agent)).await.expect("answered");
        assert_eq!(resp.status(), 429);
        assert!(resp.headers().contains_key("retry-after"));

        // The others carry on: a new pod reaches their open watches.
        env.demo
            .sim
            .store()
            .create(
                resources::find("", "v1", "pods").expect("pods"),
                Some("demo"),
                pod("after-block"),
            )
            .expect("create pod");
        for w in &mut others {
            loop {
                let line = w.next_within(WAIT).await.expect("still open");
                if line.contains("after-block") {
                    break;
                }
            }
        }
        use tokio::io::AsyncBufReadExt;
        let mut line = String::new();
        loop {
            line.clear();
            tokio::time::timeout(WAIT, admin_out.read_line(&mut line))
                .await
                .expect("the admin's watch goes on")
                .expect("read");
            assert!(!line.is_empty(), "the admin's kubectl -w ended");
            if line.contains("after-block") {
                break;
            }
        }

        // Unblocked, the agent's reconnects succeed.
        let id = block["id"].as_str().expect("id");
        let (code, _) = admin(&env, "DELETE", &format!("/admin/v1/blocks/{id}"), None).await;
        assert_eq!(code, 200);
        let mut again = Vec::new();
        for _ in 0..10 {
            again.push(open(&h2, &url, &agent, "application/json").await);
        }
        until("the agent watches again", || {
            rule_counts(&env, "agents").1 == 10
        })
        .await;
        let _ = admin_watch.kill().await;
    }

    /// An upgraded stream (exec over WebSocket) closes when a terminating block
    /// matches it, even with no limits file.
    #[tokio::test]
    async fn a_terminating_block_closes_upgraded_streams() {
        use futures_util::StreamExt;

        let env = crate::common::demo_env().await;
        let proxy = breakwater::server::start(crate::common::passthrough_config(
            &env,
            env.demo.sim.url(),
            Duration::from_secs(1),
        ))
        .await
        .expect("start");
        let token = &env.demo.token;
        let plain = proxy.plain_addr().expect("plain listener");
        let pod = env
            .demo
            .sim
            .store()
            .create(
                resources::find("", "v1", "pods").expect("pods"),
                Some("demo"),
                pod("shell"),
            )
            .expect("create pod");
        let name = pod["metadata"]["name"].as_str().expect("name");
        let mut exec = crate::common::exec_echo_hi(plain, token, name).await;
        // kube-sim now waits for the client's close, which does not come: the
        // splice stays open until the block ends it.
        assert_eq!(proxy.open_streams(), 1);

        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<Bytes>>();
        let user = "system:serviceaccount:kube-system:breakwater-demo-admin";
        let req = http::Request::post(format!("http://{}/admin/v1/blocks", proxy.admin_addr()))
            .body(http_body_util::Full::new(Bytes::from(
                json!({"target": {"kind": "identity", "user": user}, "terminate": true})
                    .to_string(),
            )))
            .expect("request");
        let resp = client.request(req).await.expect("admin answers");
        assert_eq!(resp.status(), 201);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let block: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(block["terminated"], 1, "{block}");
        // The proxy closes both sides at once (the client has not read
        // kube-sim's close yet, so nothing else would end the splice for 10 s).
        tokio::time::timeout(
            Duration::from_secs(1),
            until("the splice is gone", || proxy.open_streams() == 0),
        )
        .await
        .expect("the exec stream closed within 1 s");
        tokio::time::timeout(Duration::from_secs(1), async {
            while let Some(Ok(_)) = exec.next().await {}
        })
        .await
        .expect("the client sees its end");
        proxy.shutdown().await;
    }
}
