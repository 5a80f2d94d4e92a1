//! Limits end to end: the limits file enforced by the proxy in front of
//! kube-sim, with kubectl and raw clients.

mod common;

use std::process::Stdio;
use std::time::Duration;

use breakwater::demo::{Demo, DemoOptions};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

use common::{
    Env, Lines, env_with_limits, get, https_client, kubectl_cmd, viewer_token, write_atomically,
};

const LIMITS: &str = r#"apiVersion: breakwater/v1alpha1
kind: Limits
replicas: 1
upstream:
  maxInflight: 40
  reservedForExempt: 10
rules:
  - name: admins
    match:
      groups: ["system:masters"]
    exempt: true
  - name: viewers
    match:
      serviceAccounts: ["demo/viewer"]
    perIdentity: {rate: 1000, burst: 1000, inflight: 100, watches: WATCHES}
  - name: default
    perIdentity: {rate: 1000, burst: 1000, inflight: 1000, watches: 1000}
"#;

fn limits_text(watches: u32) -> String {
    LIMITS.replace("WATCHES", &watches.to_string())
}

fn limits_file(env: &Env) -> std::path::PathBuf {
    env.dir.path().join("limits").join("limits.yaml")
}

fn viewer_watches(env: &Env) -> u64 {
    env.demo
        .proxy
        .admission()
        .limiter()
        .rule_stats()
        .iter()
        .find(|s| s.rule.as_ref() == "viewers")
        .map(|s| s.watches)
        .unwrap_or(0)
}

/// Waits (bounded) until the viewer rule holds `n` watches.
async fn until_viewer_watches(env: &Env, n: u64) {
    for _ in 0..300 {
        if viewer_watches(env) == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "viewer watches stayed at {} (wanted {n})",
        viewer_watches(env)
    );
}

async fn watch_status(env: &Env, token: &str) -> (u16, http::HeaderMap, Value) {
    let client = https_client(&env.demo.proxy_ca_pem, false);
    let url = format!("{}/api/v1/namespaces/demo/pods?watch=1", env.proxy_url());
    let resp = client.request(get(&url, token)).await.expect("response");
    let code = resp.status().as_u16();
    let headers = resp.headers().clone();
    if code != 200 {
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        return (
            code,
            headers,
            serde_json::from_slice(&body).unwrap_or(Value::Null),
        );
    }
    (code, headers, Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_watch_is_rejected_with_retry_after_and_a_closed_watch_frees_a_slot() {
    let env = env_with_limits(&limits_text(2)).await;
    let token = viewer_token(&env);

    // Two `kubectl get pods -w` as the limited ServiceAccount.
    let mut watchers = Vec::new();
    for _ in 0..2 {
        let mut child = kubectl_cmd(&env.demo.kubeconfig_viewer, env.cache.path())
            .args(["get", "pods", "-n", "demo", "-w"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let header = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("in time")
            .expect("read")
            .expect("header");
        assert!(header.starts_with("NAME"), "{header}");
        watchers.push((child, lines));
    }
    until_viewer_watches(&env, 2).await;

    // The third is refused: 429, Retry-After, a Status naming the rule.
    let (code, headers, status) = watch_status(&env, &token).await;
    assert_eq!(code, 429, "{status}");
    let retry: u64 = headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(retry >= 1);
    assert_eq!(headers["x-breakwater-rule"], "viewers");
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "TooManyRequests");
    assert_eq!(status["details"]["retryAfterSeconds"], retry);
    assert!(
        status["message"]
            .as_str()
            .expect("message")
            .contains("viewers"),
        "{status}"
    );
    // Counted, by rule and reason, never by identity.
    let (_, metrics) = admin_call(env.demo.proxy.admin_addr(), "GET", "/metrics", "").await;
    // (Other tests in this process count blocks under the same rule.)
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("breakwater_rejected_total")
                && l.contains("rule=\"viewers\"")
                && l.contains("reason=\"watches\"")),
        "no rejection metric in:\n{metrics}"
    );
    assert!(
        !metrics.contains("system:serviceaccount"),
        "metrics must not carry identities"
    );

    // The exempt admin is unaffected.
    let pods = env.kubectl_ok(&["get", "pods", "-n", "demo"]).await;
    assert!(pods.contains("NAME"));
    let out = env
        .kubectl_ok(&["get", "pods", "-n", "demo", "-w", "--request-timeout=1s"])
        .await;
    assert!(out.contains("NAME"));

    // Closing one watch lets a new one in.
    let (mut first, _) = watchers.remove(0);
    first.kill().await.expect("kill");
    until_viewer_watches(&env, 1).await;
    let (code, headers, _) = watch_status(&env, &token).await;
    assert_eq!(code, 200);
    assert_eq!(headers["x-breakwater-rule"], "viewers");
    // The demo turns on the IETF draft headers: the rule's bucket, as sent.
    assert_eq!(headers["ratelimit-policy"], "\"viewers\";q=1000;w=1");
    let remaining = headers["ratelimit"].to_str().expect("ascii");
    assert!(remaining.starts_with("\"viewers\";r="), "{remaining}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tightened_limit_applies_without_restart_and_an_invalid_file_keeps_the_old_one() {
    let env = env_with_limits(&limits_text(5)).await;
    let token = viewer_token(&env);
    let client = https_client(&env.demo.proxy_ca_pem, true);
    let url = format!("{}/api/v1/namespaces/demo/pods?watch=1", env.proxy_url());
    let mut open = Vec::new();
    for _ in 0..2 {
        let resp = client.request(get(&url, &token)).await.expect("watch");
        assert_eq!(resp.status(), 200);
        open.push(resp);
    }
    until_viewer_watches(&env, 2).await;

    // Tighten to 2: the third is refused at once.
    write_atomically(&limits_file(&env), &limits_text(2));
    let mut refused = false;
    for _ in 0..100 {
        let (code, _, _) = watch_status(&env, &token).await;
        if code == 429 {
            refused = true;
            break;
        }
        // Admitted while the reload had not happened yet: let it go again.
        until_viewer_watches(&env, 2).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        refused,
        "the tightened limit was enforced without a restart"
    );

    // An invalid file is refused; the old limits (2) stay in force.
    write_atomically(
        &limits_file(&env),
        "apiVersion: breakwater/v1alpha1\nkind: Limits\nrules:\n  - name: viewers\n    perIdentity: {rate: -1}\n",
    );
    // A reload by hand reports the problem with its line and column.
    let err = env
        .demo
        .proxy
        .admission()
        .reload()
        .expect_err("invalid file refused");
    assert!(err.to_string().contains(":5:"), "{err}");
    let (code, _, _) = watch_status(&env, &token).await;
    assert_eq!(code, 429, "the old limit is still enforced");
    drop(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_service_account_stays_blocked_across_a_restart_until_unblocked() {
    let env = env_with_limits(&limits_text(5)).await;
    let token = viewer_token(&env);
    let admin = env.demo.proxy.admin_addr();
    let url = format!("{}/api/v1/namespaces/demo/pods", env.proxy_url());
    let client = https_client(&env.demo.proxy_ca_pem, false);
    assert_eq!(
        client
            .request(get(&url, &token))
            .await
            .expect("resp")
            .status(),
        200
    );

    let (code, body) = admin_call(
        admin,
        "POST",
        "/admin/v1/blocks",
        r#"{"target": {"kind": "identity", "user": "system:serviceaccount:demo:viewer"}, "reason": "test"}"#,
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let id = serde_json::from_str::<Value>(&body).expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let resp = client.request(get(&url, &token)).await.expect("resp");
    assert_eq!(resp.status(), 429);
    // The admin is not affected.
    env.kubectl_ok(&["get", "ns"]).await;

    // Restart the proxy on the same files: the block is still there.
    let dir = env.dir.path().to_path_buf();
    let file = limits_file(&env);
    env.demo.shutdown().await;
    let demo = Demo::start(&DemoOptions {
        dir: dir.clone(),
        port: 0,
        sim_port: 0,
        admin_port: 0,
        limits: Some(file),
    })
    .await
    .expect("restart");
    // A fresh kube-sim means fresh keys: read the new viewer token.
    let text = std::fs::read_to_string(&demo.kubeconfig_viewer).expect("kubeconfig");
    let token = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .expect("token")
        .to_string();
    let client = https_client(&demo.proxy_ca_pem, false);
    let url = format!("https://{}/api/v1/namespaces/demo/pods", demo.proxy.addr());
    let resp = client.request(get(&url, &token)).await.expect("resp");
    assert_eq!(resp.status(), 429, "blocked after a restart");

    let (code, body) = admin_call(
        demo.proxy.admin_addr(),
        "DELETE",
        &format!("/admin/v1/blocks/{id}"),
        "",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let resp = client.request(get(&url, &token)).await.expect("resp");
    assert_eq!(resp.status(), 200, "served once unblocked");
    demo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_return_to_zero_however_requests_and_watches_end() {
    let env = env_with_limits(&limits_text(1000)).await;
    let token = viewer_token(&env);
    let client = https_client(&env.demo.proxy_ca_pem, true);
    let base = env.proxy_url();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..10_000u32 {
        let (client, base, token) = (client.clone(), base.clone(), token.clone());
        tasks.spawn(async move {
            match i % 4 {
                // A normal request, read to the end.
                0 => {
                    let resp = client
                        .request(get(&format!("{base}/api/v1/namespaces/demo/pods"), &token))
                        .await
                        .expect("list");
                    let _ = resp.into_body().collect().await;
                }
                // A request abandoned before its body was read.
                1 => {
                    let resp = client
                        .request(get(&format!("{base}/api/v1/namespaces/demo/pods"), &token))
                        .await
                        .expect("list");
                    drop(resp);
                }
                // A watch that ends by its own timeout.
                2 if i % 40 == 2 => {
                    let resp = client
                        .request(get(
                            &format!("{base}/api/v1/namespaces/demo/pods?watch=1&timeoutSeconds=1"),
                            &token,
                        ))
                        .await
                        .expect("watch");
                    let mut lines = Lines::new(resp.into_body());
                    while lines.next().await.is_some() {}
                }
                // A watch the client aborts mid-stream.
                _ => {
                    let resp = client
                        .request(get(
                            &format!("{base}/api/v1/namespaces/demo/pods?watch=1"),
                            &token,
                        ))
                        .await
                        .expect("watch");
                    let mut lines = Lines::new(resp.into_body());
                    let _ = lines.next().await;
                    drop(lines);
                }
            }
        });
        // Bounded concurrency: 200 at a time.
        if tasks.len() >= 200 {
            let _ = tasks.join_next().await;
        }
    }
    while tasks.join_next().await.is_some() {}
    // Stream ends propagate asynchronously: wait (bounded) for zero.
    let limiter = env.demo.proxy.admission().limiter();
    let mut last = Vec::new();
    for _ in 0..500 {
        last = limiter
            .rule_stats()
            .iter()
            .map(|s| (s.rule.to_string(), s.inflight, s.watches))
            .collect();
        if last.iter().all(|(_, i, w)| *i == 0 && *w == 0) && limiter.upstream_inflight() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "counts did not return to zero: {last:?}, upstream {}",
        limiter.upstream_inflight()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exempt_admin_gets_through_while_500_requests_saturate_the_upstream_cap() {
    let env = env_with_limits(&limits_text(5)).await;
    // A non-exempt identity allowed to create configmaps (kube-sim then
    // waits for each request body instead of refusing at once).
    let token = env.demo.token.clone();
    // 500 requests that hold their upstream seat: POSTs whose bodies never
    // finish, so the apiserver keeps waiting for them.
    let mut holders = Vec::new();
    let mut refused = 0;
    let url = format!("{}/api/v1/namespaces/demo/configmaps", env.proxy_url());
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build::<_, http_body_util::StreamBody<common::Rx>>(common::https_connector(
            &env.demo.proxy_ca_pem,
            true,
        ));
    let mut pending = tokio::task::JoinSet::new();
    for _ in 0..500 {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let req = http::Request::post(&url)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(http_body_util::StreamBody::new(common::Rx(rx)))
            .expect("request");
        holders.push(tx);
        let client = client.clone();
        pending.spawn(async move { client.request(req).await.map(|r| r.status().as_u16()) });
    }
    // Non-exempt traffic may hold 40 - 10 = 30 seats: the rest are refused.
    while let Some(res) = tokio::time::timeout(Duration::from_secs(30), pending.join_next())
        .await
        .expect("refusals arrive")
    {
        let code = res.expect("task").expect("response");
        assert_eq!(code, 429, "only refusals finish while the bodies are open");
        refused += 1;
        if refused == 470 {
            break;
        }
    }
    assert_eq!(
        refused, 470,
        "every request beyond the 30 non-exempt seats is refused"
    );
    assert_eq!(env.demo.proxy.admission().limiter().upstream_inflight(), 30);

    // The admin (exempt) still gets through, on a reserved seat.
    let ns = env.kubectl_ok(&["get", "ns"]).await;
    assert!(ns.contains("demo"));
    drop(holders);
    pending.abort_all();
}

/// One plain-HTTP call to the admin listener.
async fn admin_call(
    admin: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect admin");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_holds_while_the_apiserver_is_unreachable() {
    let env = env_with_limits(&limits_text(5)).await;
    let token = viewer_token(&env);
    let Env {
        demo,
        dir: _dir,
        cache: _cache,
    } = env;
    let (code, body) = admin_call(
        demo.proxy.admin_addr(),
        "POST",
        "/admin/v1/blocks",
        r#"{"target": {"kind": "pattern", "verb": "list", "resource": "pods", "namespace": "*"}}"#,
    )
    .await;
    assert_eq!(code, 201, "{body}");
    // The apiserver goes away.
    let breakwater::demo::Demo {
        sim,
        proxy,
        proxy_ca_pem,
        ..
    } = demo;
    sim.shutdown().await;
    let client = https_client(&proxy_ca_pem, false);
    let url = format!("https://{}/api/v1/namespaces/demo/pods", proxy.addr());
    let resp = client.request(get(&url, &token)).await.expect("response");
    // Decided at the proxy: the block's 429, not an upstream 503.
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    // Unblocked requests do get the 503 Status.
    let url = format!("https://{}/api/v1/namespaces/demo/pods/x", proxy.addr());
    let resp = client.request(get(&url, &token)).await.expect("response");
    assert_eq!(resp.status(), 503);
    proxy.shutdown().await;
}

// ------------------------------------------------- charges: upstream | all

/// The viewer's rule with a tiny rate: two tokens, the next one in 10 s.
const CHARGES: &str = r#"apiVersion: breakwater/v1alpha1
kind: Limits
rules:
  - name: admins
    match:
      groups: ["system:masters"]
    exempt: true
  - name: viewers
    charges: CHARGES
    match:
      serviceAccounts: ["demo/viewer"]
    perIdentity: {rate: 0.1, burst: 2, watches: WATCHES}
  - name: default
    perIdentity: {rate: 1000, burst: 1000}
"#;

fn charges_text(charges: &str, watches: u32) -> String {
    CHARGES
        .replace("CHARGES", charges)
        .replace("WATCHES", &watches.to_string())
}

const POD_WATCH: &str = "/api/v1/namespaces/demo/pods?watch=1";
const POD_LIST_RV0: &str = "/api/v1/namespaces/demo/pods?resourceVersion=0";

/// Sends `n` GETs of `pq` at once as `token`; returns their responses
/// (kept: a watch stays open while its response lives).
async fn at_once(
    env: &Env,
    token: &str,
    pq: &str,
    n: usize,
) -> Vec<http::Response<hyper::body::Incoming>> {
    let client = https_client(&env.demo.proxy_ca_pem, true);
    let url = format!("{}{pq}", env.proxy_url());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (client, req) = (client.clone(), get(&url, token));
        tasks.spawn(async move { client.request(req).await.expect("response") });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(resp) = tokio::time::timeout(Duration::from_secs(30), tasks.join_next())
        .await
        .expect("answered in time")
    {
        out.push(resp.expect("task"));
    }
    out
}

fn codes(resps: &[http::Response<hyper::body::Incoming>]) -> Vec<u16> {
    resps.iter().map(|r| r.status().as_u16()).collect()
}

/// One GET of a single pod (always forwarded); its status and rule header.
async fn get_one_pod(env: &Env, token: &str) -> (u16, String) {
    let client = https_client(&env.demo.proxy_ca_pem, true);
    let list = format!("{}{POD_LIST_RV0}", env.proxy_url());
    let admin = env.demo.token.clone();
    let body = client
        .request(get(&list, &admin))
        .await
        .expect("list")
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let list: Value = serde_json::from_slice(&body).expect("json");
    let name = list["items"][0]["metadata"]["name"]
        .as_str()
        .expect("a pod in demo");
    let url = format!("{}/api/v1/namespaces/demo/pods/{name}", env.proxy_url());
    let resp = client.request(get(&url, token)).await.expect("get");
    let rule = resp
        .headers()
        .get("x-breakwater-rule")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (resp.status().as_u16(), rule)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_charging_upstream_lets_50_hub_served_watches_and_lists_through_but_limits_gets() {
    let env = env_with_limits(&charges_text("upstream", 1000)).await;
    let token = viewer_token(&env);
    // The first watch starts the shared stream: it goes upstream, so it
    // is charged (one of the two tokens).
    let first = at_once(&env, &token, POD_WATCH, 1).await;
    assert_eq!(codes(&first), [200]);
    let before = env.demo.proxy.watch_hub().stats();

    // 49 more watches and 50 LISTs rv=0 join it: none is charged.
    let watches = at_once(&env, &token, POD_WATCH, 49).await;
    let lists = at_once(&env, &token, POD_LIST_RV0, 50).await;
    assert!(
        codes(&watches).iter().all(|c| *c == 200),
        "{:?}",
        codes(&watches)
    );
    assert!(
        codes(&lists).iter().all(|c| *c == 200),
        "{:?}",
        codes(&lists)
    );
    for r in watches.iter().chain(&lists) {
        assert_eq!(r.headers()["x-breakwater-rule"], "viewers");
        // Nothing charged, so no quota to report.
        assert!(r.headers().get("ratelimit").is_none());
    }
    // All from the one stream (its freshness checks aside, nothing else
    // went upstream for them).
    let stats = env.demo.proxy.watch_hub().stats();
    assert_eq!(
        (stats.streams, stats.upstream_watches),
        (before.streams, before.upstream_watches),
        "served by the hub: {stats:?}"
    );
    assert_eq!(stats.subscribers, 50, "{stats:?}");
    until_viewer_watches(&env, 50).await;

    // A GET of one pod is forwarded, so charged: the second token, then 429.
    assert_eq!(get_one_pod(&env, &token).await, (200, "viewers".into()));
    assert_eq!(get_one_pod(&env, &token).await, (429, "viewers".into()));
    // The cached ones are still free once the bucket is empty.
    assert_eq!(
        codes(&at_once(&env, &token, POD_LIST_RV0, 5).await),
        [200; 5]
    );
    drop((first, watches, lists));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_must_catch_up_upstream_is_charged() {
    let env = env_with_limits(&charges_text("upstream", 1000)).await;
    let token = viewer_token(&env);
    // A resourceVersion from before the shared stream, and a change after
    // it that the stream's LIST will already hold: the gap only the
    // apiserver can replay.
    let old = env.demo.sim.store().current_rv();
    let pods = breakwater_loadtest::sim::resources::find("", "v1", "pods").expect("pods");
    env.demo
        .sim
        .store()
        .create(
            pods,
            Some("demo"),
            serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "in-the-gap"},
                "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "i"}]}}),
        )
        .expect("pod");
    // The first watch starts the stream: charged (one of the two tokens).
    let first = at_once(&env, &token, POD_WATCH, 1).await;
    assert_eq!(codes(&first), [200]);
    // From the old RV the gap goes upstream: charged (the second token).
    let from_old = format!("{POD_WATCH}&resourceVersion={old}");
    let caught_up = at_once(&env, &token, &from_old, 1).await;
    assert_eq!(codes(&caught_up), [200]);
    // The next one would go upstream too: refused, and nothing is sent.
    // (The stream's own upstream watch follows its LIST: count from when
    // kube-sim has seen it and the catch-up.)
    for _ in 0..2000 {
        if env.demo.sim.request_count("WATCH", "pods") >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let watches = env.demo.sim.request_count("WATCH", "pods");
    assert_eq!(watches, 2, "the stream's watch and one catch-up");
    let refused = at_once(&env, &token, &from_old, 1).await;
    assert_eq!(codes(&refused), [429]);
    assert_eq!(refused[0].headers()["x-breakwater-rule"], "viewers");
    assert_eq!(env.demo.sim.request_count("WATCH", "pods"), watches);
    // Joining the stream without a gap stays free.
    assert_eq!(codes(&at_once(&env, &token, POD_WATCH, 3).await), [200; 3]);
    drop((first, caught_up));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_rule_charging_all_paces_the_hub_served_watches_and_lists() {
    let env = env_with_limits(&charges_text("all", 1000)).await;
    let token = viewer_token(&env);
    let watches = at_once(&env, &token, POD_WATCH, 50).await;
    let lists = at_once(&env, &token, POD_LIST_RV0, 50).await;
    let refused = codes(&watches)
        .iter()
        .chain(&codes(&lists))
        .filter(|c| **c == 429)
        .count();
    // Two tokens, plus one per 10 s: at most a few of the 100 get through.
    assert!(refused >= 95, "only {refused} of 100 were refused");
    assert_eq!(get_one_pod(&env, &token).await.0, 429);
    drop((watches, lists));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_cap_counts_hub_served_watches_of_a_rule_charging_upstream() {
    let env = env_with_limits(&charges_text("upstream", 3)).await;
    let token = viewer_token(&env);
    let first = at_once(&env, &token, POD_WATCH, 1).await;
    assert_eq!(codes(&first), [200]);
    let more = at_once(&env, &token, POD_WATCH, 2).await;
    assert_eq!(codes(&more), [200, 200]);
    until_viewer_watches(&env, 3).await;
    // The fourth would be served by the hub, free of tokens, but it is a
    // fourth client watch: refused.
    let (code, headers, status) = watch_status(&env, &token).await;
    assert_eq!(code, 429, "{status}");
    assert_eq!(headers["x-breakwater-rule"], "viewers");
    assert!(
        status["message"]
            .as_str()
            .expect("message")
            .contains("concurrent watches"),
        "{status}"
    );
    drop((first, more));
}

const PER_POD: &str = r#"apiVersion: breakwater/v1alpha1
kind: Limits
rules:
  - name: agents
    key: KEY
    onMissingKey: refuse
    match:
      serviceAccounts: ["demo/viewer"]
    perIdentity: {watches: 1}
"#;

/// Opens a watch and keeps it open: `Ok(body)` on 200, else the status and
/// the Status JSON.
async fn hold_watch(env: &Env, token: &str) -> Result<hyper::body::Incoming, (u16, Value)> {
    let client = https_client(&env.demo.proxy_ca_pem, false);
    let url = format!("{}/api/v1/namespaces/demo/pods?watch=1", env.proxy_url());
    let resp = client.request(get(&url, token)).await.expect("response");
    let code = resp.status().as_u16();
    if code == 200 {
        return Ok(resp.into_body());
    }
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Err((code, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_one_service_account_each_get_their_own_watch_and_a_token_without_a_pod_is_refused()
{
    let env = env_with_limits(&PER_POD.replace("KEY", "pod")).await;
    let ttl = Duration::from_secs(3600);
    let sim = &env.demo.sim;
    let pod_a = sim.issue_bound_token("demo", "viewer", "agent-a", Some("node-1"), ttl);
    let pod_b = sim.issue_bound_token("demo", "viewer", "agent-b", Some("node-1"), ttl);
    let unbound = sim.issue_token("demo", "viewer", ttl);

    let _a = hold_watch(&env, &pod_a).await.expect("pod a's first watch");
    let (code, status) = hold_watch(&env, &pod_a)
        .await
        .expect_err("pod a's second watch");
    assert_eq!(code, 429, "{status}");
    let _b = hold_watch(&env, &pod_b)
        .await
        .expect("pod b has its own cap");

    let (code, status) = hold_watch(&env, &unbound).await.expect_err("no pod");
    assert_eq!(code, 403, "{status}");
    assert_eq!(status["reason"], "Forbidden", "{status}");
    let message = status["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("rule \"agents\" limits each pod separately")
            && message.contains("carry no pod"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_on_one_node_share_its_cap_and_a_token_without_a_node_is_refused() {
    let env = env_with_limits(&PER_POD.replace("KEY", "node")).await;
    let ttl = Duration::from_secs(3600);
    let sim = &env.demo.sim;
    let on_1 = sim.issue_bound_token("demo", "viewer", "agent-a", Some("node-1"), ttl);
    let also_on_1 = sim.issue_bound_token("demo", "viewer", "agent-b", Some("node-1"), ttl);
    let on_2 = sim.issue_bound_token("demo", "viewer", "agent-c", Some("node-2"), ttl);
    // A bound token from before Kubernetes 1.30: a pod but no node.
    let old = sim.issue_bound_token("demo", "viewer", "agent-d", None, ttl);

    let _a = hold_watch(&env, &on_1).await.expect("node-1's watch");
    let (code, _) = hold_watch(&env, &also_on_1)
        .await
        .expect_err("node-1 is full");
    assert_eq!(code, 429);
    let _c = hold_watch(&env, &on_2).await.expect("node-2's watch");
    let (code, status) = hold_watch(&env, &old).await.expect_err("no node");
    assert_eq!(code, 403, "{status}");
    assert!(
        status["message"]
            .as_str()
            .unwrap_or_default()
            .contains("carry no node"),
        "{status}"
    );
}

/// Only an exempt rule that names subjects makes an identity privileged
/// (its connections served on the privileged thread, its first request's
/// token read before hyper): one that names none exempts requests of every
/// caller, and would otherwise put every connection on that one thread.
#[test]
fn only_an_exempt_rule_that_names_subjects_makes_identities_privileged() {
    use breakwater::admit::Admission;
    use breakwater::identity::Identity;
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Identity {
        username: "system:serviceaccount:monitoring:agent".to_string(),
        uid: String::new(),
        groups: vec!["system:serviceaccounts".to_string()],
        extra: Default::default(),
    };
    let admin = Identity {
        username: "kubernetes-admin".to_string(),
        uid: String::new(),
        groups: vec!["system:masters".to_string()],
        extra: Default::default(),
    };
    let load = |name: &str, rules: &str| {
        let file = dir.path().join(name);
        let text = format!("apiVersion: breakwater/v1alpha1\nkind: Limits\nrules:\n{rules}");
        std::fs::write(&file, text).expect("write");
        Admission::new(Some(&file), None, false).expect("admission")
    };
    let reads = load(
        "reads.yaml",
        "  - name: reads\n    match: {verbs: [get]}\n    exempt: true\n",
    );
    assert!(!reads.is_privileged(&agent));
    assert!(!reads.is_privileged(&admin));
    assert!(!reads.may_privilege_tokens());
    let admins = load(
        "admins.yaml",
        "  - name: reads\n    match: {verbs: [get]}\n    exempt: true\n  - name: admins\n    match: {groups: [\"system:masters\"]}\n    exempt: true\n",
    );
    assert!(!admins.is_privileged(&agent));
    assert!(admins.is_privileged(&admin));
    assert!(admins.may_privilege_tokens());
}
