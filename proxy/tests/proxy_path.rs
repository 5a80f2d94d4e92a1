//! The transparent path: streaming, differential equality with a direct
//! watch, errors as Status, and graceful shutdown.

mod common;

use std::time::Duration;

use breakwater_loadtest::sim::resources;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use common::{Lines, demo_env, event_summary, get, https_client};

fn configmap(name: &str, data: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": name, "namespace": "default", "labels": {"app": "diff"}},
           "data": {"k": data}})
}

async fn list_rv(client: &common::HttpsClient, base: &str, token: &str) -> String {
    let resp = client
        .request(get(
            &format!("{base}/api/v1/namespaces/default/configmaps"),
            token,
        ))
        .await
        .expect("list");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let v: Value = serde_json::from_slice(&body).expect("json");
    v["metadata"]["resourceVersion"]
        .as_str()
        .expect("list RV")
        .to_string()
}

/// One event, and then nothing more from upstream: if the proxy held bytes
/// back until more arrived (a buffer to fill, a flush on the next write),
/// the event would never reach the client.
async fn single_event_arrives_alone(h2: bool) {
    let env = demo_env().await;
    let client = https_client(&env.demo.proxy_ca_pem, h2);
    let base = env.proxy_url();
    let rv = list_rv(&client, &base, &env.demo.token).await;
    let url =
        format!("{base}/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={rv}");
    let resp = client
        .request(get(&url, &env.demo.token))
        .await
        .expect("watch");
    assert_eq!(resp.status(), 200);
    let mut lines = Lines::new(resp.into_body());

    let cm = resources::find("", "v1", "configmaps").expect("type");
    env.demo
        .sim
        .store()
        .create(cm, Some("default"), configmap("lonely", "1"))
        .expect("create");
    let line = lines
        .next_within(Duration::from_secs(10))
        .await
        .expect("an event, not the end");
    let (kind, name, _) = event_summary(&line);
    assert_eq!((kind.as_str(), name.as_str()), ("ADDED", "lonely"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_event_is_delivered_without_waiting_for_more_bytes_over_http1() {
    single_event_arrives_alone(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_event_is_delivered_without_waiting_for_more_bytes_over_http2() {
    single_event_arrives_alone(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_through_the_proxy_equals_the_direct_watch() {
    let env = demo_env().await;
    let token = &env.demo.token;
    let proxied = https_client(&env.demo.proxy_ca_pem, true);
    let direct = https_client(env.demo.sim.pki().serving_ca.cert_pem(), true);
    let rv = list_rv(&direct, &env.demo.sim.url(), token).await;
    let path = format!(
        "/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={rv}&labelSelector=app%3Ddiff"
    );
    let via = proxied
        .request(get(&format!("{}{path}", env.proxy_url()), token))
        .await
        .expect("proxied watch");
    let dir = direct
        .request(get(&format!("{}{path}", env.demo.sim.url()), token))
        .await
        .expect("direct watch");
    let mut via = Lines::new(via.into_body());
    let mut dir = Lines::new(dir.into_body());

    let cm = resources::find("", "v1", "configmaps").expect("type");
    let store = env.demo.sim.store();
    let mut expected = 0;
    for i in 0..20 {
        let name = format!("d{}", i % 5);
        if i < 5 {
            store
                .create(cm, Some("default"), configmap(&name, "0"))
                .expect("create");
        } else if i < 15 {
            store
                .patch(
                    cm,
                    Some("default"),
                    &name,
                    &json!({"data": {"k": i.to_string()}}),
                    breakwater_loadtest::sim::store::PatchKind::Merge,
                )
                .expect("patch");
        } else {
            store.delete(cm, Some("default"), &name).expect("delete");
        }
        expected += 1;
    }
    let mut kinds = Vec::new();
    for _ in 0..expected {
        let a = via
            .next_within(Duration::from_secs(10))
            .await
            .expect("proxied event");
        let b = dir
            .next_within(Duration::from_secs(10))
            .await
            .expect("direct event");
        assert_eq!(a, b, "the proxy must pass events through byte for byte");
        kinds.push(event_summary(&a).0);
    }
    assert_eq!(kinds.iter().filter(|k| *k == "ADDED").count(), 5);
    assert_eq!(kinds.iter().filter(|k| *k == "MODIFIED").count(), 10);
    assert_eq!(kinds.iter().filter(|k| *k == "DELETED").count(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_apiserver_is_a_503_status() {
    let env = demo_env().await;
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let proxy = breakwater::server::start(common::passthrough_config(
        &env,
        format!("https://127.0.0.1:{port}"),
        Duration::from_secs(1),
    ))
    .await
    .expect("start");
    let client = https_client(&env.demo.proxy_ca_pem, false);
    // Forwarded, and what the watch hub would serve: a consistent LIST, a
    // LIST rv=0 and a watch. The hub's shared stream cannot LIST either;
    // its joiners are forwarded at once rather than wait out its retries
    // (they waited 60 s until session 7).
    for pq in [
        "/api/v1/namespaces/demo/pods/x",
        "/api/v1/namespaces",
        "/api/v1/namespaces/demo/pods?resourceVersion=0",
        "/api/v1/namespaces/demo/configmaps?watch=1",
    ] {
        let resp = tokio::time::timeout(
            Duration::from_secs(5),
            client.request(get(
                &format!("https://{}{pq}", proxy.addr()),
                &env.demo.token,
            )),
        )
        .await
        .unwrap_or_else(|_| panic!("{pq}: answered within 5 s"))
        .expect("response");
        assert_eq!(resp.status(), 503, "{pq}");
        assert_eq!(resp.headers()["content-type"], "application/json");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let v: Value = serde_json::from_slice(&body).expect("Status json");
        assert_eq!(v["kind"], "Status");
        assert_eq!(v["reason"], "ServiceUnavailable");
        assert_eq!(v["code"], 503);
    }
    proxy.shutdown().await;
}

/// An apiserver that accepts connections and never answers: a request that
/// is not long-running gets a 504 Status once the response timeout has run
/// (connecting is part of it), not before, and not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_apiserver_is_a_504_status_after_the_response_timeout() {
    let env = demo_env().await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let mut config = common::passthrough_config(
        &env,
        format!("https://127.0.0.1:{port}"),
        Duration::from_secs(1),
    );
    config.upstream.timeouts.response = Duration::from_secs(1);
    let proxy = breakwater::server::start(config).await.expect("start");
    let client = https_client(&env.demo.proxy_ca_pem, false);
    let started = std::time::Instant::now();
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        client.request(get(
            &format!("https://{}/api/v1/namespaces/demo/pods/x", proxy.addr()),
            &env.demo.token,
        )),
    )
    .await
    .expect("answered within 5 s")
    .expect("response");
    let took = started.elapsed();
    assert_eq!(resp.status(), 504);
    assert!(took >= Duration::from_secs(1), "answered after {took:?}");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let v: Value = serde_json::from_slice(&body).expect("Status json");
    assert_eq!(v["kind"], "Status");
    assert_eq!(v["code"], 504);
    assert_eq!(v["message"], "the apiserver did not answer within 1s");
    proxy.shutdown().await;
    holder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_fails_readiness_then_ends_watches_cleanly() {
    let env = demo_env().await;
    let proxy = breakwater::server::start(common::passthrough_config(
        &env,
        env.demo.sim.url(),
        Duration::from_millis(300),
    ))
    .await
    .expect("start");
    let client = https_client(&env.demo.proxy_ca_pem, false);
    let url = format!(
        "https://{}/api/v1/namespaces/default/configmaps?watch=true",
        proxy.addr()
    );
    let resp = client
        .request(get(&url, &env.demo.token))
        .await
        .expect("watch");
    assert_eq!(resp.status(), 200);
    let mut lines = Lines::new(resp.into_body());
    let admin = proxy.admin_addr();
    assert!(readyz(admin).await.starts_with("HTTP/1.1 200"));

    let shutdown = tokio::spawn(proxy.shutdown());
    // Readiness fails while the watch is still draining.
    let mut seen = String::new();
    for _ in 0..50 {
        seen = readyz(admin).await;
        if seen.starts_with("HTTP/1.1 503") {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(
        seen.starts_with("HTTP/1.1 503"),
        "readyz during drain: {seen}"
    );
    // The watch must end as a normal end of stream (Lines panics on a
    // broken stream), after the grace period.
    let end = tokio::time::timeout(Duration::from_secs(15), async {
        while lines.next().await.is_some() {}
    })
    .await;
    assert!(
        end.is_ok(),
        "the watch ended within the grace period + margin"
    );
    shutdown.await.expect("shutdown finished");
}

/// Shutdown waits for every task the proxy spawned, and they all end within
/// the grace period: a watch the hub serves, a forwarded watch, an upgraded
/// exec stream and the idle pooled upstream connection of an earlier GET
/// (whose driver task would otherwise live until kube-sim closed it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_watches_exec_and_idle_upstream_connections_within_the_grace() {
    use futures_util::StreamExt;

    let env = demo_env().await;
    let grace = Duration::from_secs(1);
    let proxy =
        breakwater::server::start(common::passthrough_config(&env, env.demo.sim.url(), grace))
            .await
            .expect("start");
    let token = &env.demo.token;
    let base = format!("https://{}", proxy.addr());
    let client = https_client(&env.demo.proxy_ca_pem, true);

    // A unary GET: its upstream connection stays in the pool, idle.
    let resp = client
        .request(get(&format!("{base}/api/v1/namespaces/demo/pods"), token))
        .await
        .expect("list pods");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let pods: Value = serde_json::from_slice(&body).expect("json");
    let pod = pods["items"][0]["metadata"]["name"]
        .as_str()
        .expect("the demo seeds pods in namespace demo")
        .to_string();

    // A watch the hub serves, and a Table watch it forwards.
    let watch = format!("{base}/api/v1/namespaces/default/configmaps?watch=true");
    let resp = client.request(get(&watch, token)).await.expect("watch");
    assert_eq!(resp.status(), 200);
    let mut shared = Lines::new(resp.into_body());
    let mut table = get(&watch, token);
    table.headers_mut().insert(
        "accept",
        http::HeaderValue::from_static("application/json;as=Table;v=v1;g=meta.k8s.io"),
    );
    let resp = client.request(table).await.expect("table watch");
    assert_eq!(resp.status(), 200);
    let mut forwarded = resp.into_body();
    assert_eq!(
        proxy.watch_hub().stats().subscribers,
        1,
        "the hub serves one"
    );

    // An exec, upgraded and spliced (over the plain loopback listener).
    // kube-sim sends the output, the status and its close, then waits
    // 10 s for the client's close, which never comes: the splice is open
    // until the shutdown ends it.
    let plain = proxy.plain_addr().expect("plain listener");
    let mut exec = common::exec_echo_hi(plain, token, &pod).await;

    let stopped = tokio::time::timeout(grace * 2 + Duration::from_secs(10), proxy.shutdown())
        .await
        .expect("shutdown returned");
    assert_eq!(
        stopped.tasks_left, 0,
        "every task of the proxy ended within the grace period"
    );
    // The watches ended cleanly (Lines panics on a broken stream), and the
    // exec stream is over.
    while shared.next_within(Duration::from_secs(1)).await.is_some() {}
    while let Some(frame) = forwarded.frame().await {
        frame.expect("the forwarded watch ends cleanly");
    }
    while let Some(Ok(_)) = exec.next().await {}
}

async fn readyz(admin: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin)
        .await
        .expect("admin connect");
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    String::from_utf8_lossy(&buf).into_owned()
}

/// `--plain-listen`: the same proxy over plain HTTP on loopback, HTTP/1.1
/// and HTTP/2 with prior knowledge, identified by the bearer token; a
/// client-sent X-Remote-User changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_loopback_listener_serves_http1_and_h2c_by_token() {
    let env = demo_env().await;
    let proxy = breakwater::server::start(common::passthrough_config(
        &env,
        env.demo.sim.url(),
        Duration::from_secs(1),
    ))
    .await
    .expect("start");
    let plain = proxy.plain_addr().expect("plain listener configured");
    assert!(plain.ip().is_loopback());
    for h2 in [false, true] {
        let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(h2)
                .build_http();
        let review = format!("http://{plain}/api/v1/namespaces/default/configmaps");
        let resp = client
            .request(get(&review, &env.demo.token))
            .await
            .expect("response");
        assert_eq!(resp.status(), 200, "h2={h2}");
        assert_eq!(
            resp.version(),
            if h2 {
                http::Version::HTTP_2
            } else {
                http::Version::HTTP_11
            }
        );
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["kind"], "ConfigMapList");

        // No token: anonymous, which kube-sim's RBAC refuses, whatever the
        // client claims in X-Remote-User.
        let mut spoof = get(&review, "");
        spoof.headers_mut().remove(http::header::AUTHORIZATION);
        spoof
            .headers_mut()
            .insert("x-remote-user", http::HeaderValue::from_static("admin"));
        spoof.headers_mut().insert(
            "x-remote-group",
            http::HeaderValue::from_static("system:masters"),
        );
        let resp = client.request(spoof).await.expect("response");
        assert_eq!(resp.status(), 403, "h2={h2}");
    }
    proxy.shutdown().await;
}

/// `breakwater probe` (the exec readiness probe for sidecars): 0 on a ready
/// admin listener, 1 with a reason when nothing answers or the URL is not
/// plain HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_command_reports_readiness_by_exit_code() {
    let env = demo_env().await;
    let bin = env!("CARGO_BIN_EXE_breakwater");
    let run = |url: String| async move {
        tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(bin)
                .args(["probe", "--url", &url])
                .output(),
        )
        .await
        .expect("probe finishes")
        .expect("probe runs")
    };
    let ready = run(format!("http://{}/readyz", env.demo.proxy.admin_addr())).await;
    assert!(ready.status.success(), "{ready:?}");
    assert!(String::from_utf8_lossy(&ready.stdout).starts_with("ok: "));

    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let down = run(format!("http://127.0.0.1:{port}/readyz")).await;
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("not ready"));

    let tls = run(format!("https://{}/readyz", env.demo.proxy.addr())).await;
    assert_eq!(tls.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&tls.stderr).contains("only plain http://"));
}
