//! Forwarded long-running requests against an apiserver that allows a
//! limited number of streams per HTTP/2 connection (kube-sim, like the
//! apiserver, advertises SETTINGS_MAX_CONCURRENT_STREAMS): they must never
//! starve other requests, exempt identities keep a lane of their own, and a
//! full lane answers 429 at once instead of hanging.

mod common;

use std::time::Duration;

use breakwater::config::LimitsConfig;
use breakwater::upstream::Lane;
use bytes::{Bytes, BytesMut};
use common::{Env, HttpsClient, demo_env, https_client, passthrough_config};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;

/// What a Table watch asks for: kubectl `get -w` does this, and the hub
/// forwards it unshared.
const TABLE: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json";

fn watch_request(base: &str, token: &str, accept: &str) -> http::Request<Empty<Bytes>> {
    http::Request::get(format!(
        "{base}/api/v1/namespaces/default/pods?watch=true&allowWatchBookmarks=false"
    ))
    .header("authorization", format!("Bearer {token}"))
    .header("accept", accept)
    .body(Empty::new())
    .expect("request")
}

/// Reads a stream until `needle` shows up in its bytes (Table rows, JSON
/// events and protobuf frames all carry the object's name verbatim).
async fn until_seen(mut body: Incoming, needle: &[u8]) -> Incoming {
    let mut buf = BytesMut::new();
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                    if buf.windows(needle.len()).any(|w| w == needle) {
                        return body;
                    }
                    // Keep only a tail long enough to catch a split needle.
                    if buf.len() > 64 * 1024 {
                        let keep = buf.split_off(buf.len() - needle.len());
                        buf = keep;
                    }
                }
            }
            Some(Err(e)) => panic!("watch broke: {e:?}"),
            None => panic!("watch ended before {:?}", String::from_utf8_lossy(needle)),
        }
    }
}

/// Reads a stream to its end, discarding what arrives.
async fn drain(mut body: Incoming) {
    while let Some(Ok(_)) = body.frame().await {}
}

/// Opens `n` Table watches (forwarded, unshared) through `client`, and
/// returns their bodies once every one has its response headers.
async fn open_watches(client: &HttpsClient, base: &str, token: &str, n: usize) -> Vec<Incoming> {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let req = watch_request(base, token, TABLE);
        let client = client.clone();
        set.spawn(async move { (i, client.request(req).await) });
    }
    let mut bodies: Vec<Option<Incoming>> = (0..n).map(|_| None).collect();
    while let Some(res) = tokio::time::timeout(Duration::from_secs(60), set.join_next())
        .await
        .expect("every watch answered within 60 s")
    {
        let (i, resp) = res.expect("task");
        let resp = resp.expect("watch request");
        assert_eq!(resp.status(), 200, "watch {i}");
        bodies[i] = Some(resp.into_body());
    }
    bodies.into_iter().map(|b| b.expect("answered")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_forwarded_watches_leave_kubectl_fast_and_all_keep_delivering() {
    let env = demo_env().await;
    // Two client connections: the proxy's own server allows 1,000 streams
    // on one.
    let clients = [
        https_client(&env.demo.proxy_ca_pem, true),
        https_client(&env.demo.proxy_ca_pem, true),
    ];
    let base = env.proxy_url();
    let mut watches = Vec::new();
    for client in &clients {
        watches.extend(open_watches(client, &base, &env.demo.token, 500).await);
    }
    let lane = env.demo.proxy.upstream().lane_stats(Lane::LongRunning);
    assert!(
        lane.streams >= 1000 && lane.connections >= 4,
        "1,000 forwarded watches need at least four 250-stream connections: {lane:?}"
    );

    // kubectl through the proxy answers while they are open: a GET, an
    // apply, a delete. The bar is "answers at all, quickly" (it hung for
    // good before the lanes), so each gets 15 s.
    let within = Duration::from_secs(15);
    let kubectl = |args: &'static [&'static str]| {
        let env = &env;
        async move {
            let out = tokio::time::timeout(within, env.kubectl(args))
                .await
                .unwrap_or_else(|_| panic!("kubectl {args:?} answered within {within:?}"));
            assert!(
                out.status.success(),
                "kubectl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).expect("utf8")
        }
    };
    assert!(kubectl(&["get", "ns"]).await.contains("default"));
    let manifest = env.dir.path().join("lanes-cm.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: lanes, namespace: default}\ndata: {a: b}\n",
    )
    .expect("write manifest");
    let apply = ["apply", "-f", manifest.to_str().expect("utf8 path")];
    let out = tokio::time::timeout(within, env.kubectl(&apply))
        .await
        .expect("kubectl apply answered in time");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    kubectl(&["delete", "configmap", "lanes", "-n", "default"]).await;

    // Every one of the 1,000 watches still delivers a new event.
    kubectl(&["run", "lanes-probe", "-n", "default", "--image=busybox"]).await;
    let mut set = tokio::task::JoinSet::new();
    for body in watches {
        set.spawn(until_seen(body, b"lanes-probe"));
    }
    let mut delivered = 0;
    while let Some(res) = tokio::time::timeout(Duration::from_secs(60), set.join_next())
        .await
        .expect("every watch delivered the new pod within 60 s")
    {
        let _body = res.expect("watch task");
        delivered += 1;
    }
    assert_eq!(delivered, 1000);
}

/// A front-proxy Breakwater in front of the demo's kube-sim with small
/// lanes: one long-running connection, admins exempt.
async fn small_lanes_proxy(env: &Env) -> breakwater::server::ProxyHandle {
    let dir = env.dir.path();
    let limits = dir.join("lanes-limits.yaml");
    std::fs::write(
        &limits,
        "apiVersion: breakwater/v1alpha1\nkind: Limits\nrules:\n- name: admins\n  match:\n    groups: [\"system:masters\"]\n  exempt: true\n",
    )
    .expect("write limits");
    let mut cfg = passthrough_config(env, env.demo.sim.url(), Duration::from_secs(1));
    cfg.client_ca = Some(dir.join("client-ca.crt"));
    cfg.upstream.mode = breakwater::upstream::AuthMode::FrontProxy;
    cfg.upstream.tls.client_cert = Some((
        dir.join("front-proxy-client.crt"),
        dir.join("front-proxy-client.key"),
    ));
    cfg.upstream.lanes.long_running.max_connections = 1;
    // A freed stream is taken by a waiting request within this wait.
    cfg.upstream.lanes.long_running.wait = Duration::from_secs(1);
    cfg.limits = LimitsConfig {
        file: Some(limits),
        ..LimitsConfig::default()
    };
    breakwater::server::start(cfg).await.expect("proxy starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exempt_admin_gets_through_while_the_long_running_lane_is_at_its_cap() {
    let env = demo_env().await;
    let proxy = small_lanes_proxy(&env).await;
    let base = format!("https://{}", proxy.addr());
    let client = https_client(&env.demo.proxy_ca_pem, true);

    // Fill the one long-running connection: as many forwarded watches as
    // kube-sim allows streams on it.
    let mut held = Vec::new();
    loop {
        let req = watch_request(&base, &env.demo.token, TABLE);
        let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
            .await
            .expect("a watch is answered, not queued")
            .expect("request");
        if resp.status() == 429 {
            // At the cap: a prompt Status with Retry-After.
            assert_eq!(resp.headers()["retry-after"], "1");
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            let status: serde_json::Value = serde_json::from_slice(&body).expect("Status json");
            assert_eq!(status["kind"], "Status");
            assert_eq!(status["reason"], "TooManyRequests");
            assert_eq!(status["details"]["retryAfterSeconds"], 1);
            break;
        }
        assert_eq!(resp.status(), 200);
        // Read each held watch, as a client would: unread bodies would fill
        // the client connection's flow-control window and stall it.
        held.push(tokio::spawn(drain(resp.into_body())));
        assert!(held.len() <= 1000, "the lane never reached its cap");
    }
    let lane = proxy.upstream().lane_stats(Lane::LongRunning);
    assert_eq!(lane.connections, 1, "{lane:?}");
    assert_eq!(lane.streams, held.len(), "{lane:?}");
    assert!(held.len() >= 100, "kube-sim allows at least 100 streams");

    // Unary requests of the same identity have their own lane.
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(common::get(
            &format!("{base}/api/v1/namespaces/default"),
            &env.demo.token,
        )),
    )
    .await
    .expect("a GET is answered while the long-running lane is full")
    .expect("GET");
    assert_eq!(resp.status(), 200);

    // The watch hub's shared streams have a lane of their own: a shared
    // watch of another collection still starts its upstream stream (until
    // session 7 it waited behind the forwarded watches and got their 429).
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(common::get(
            &format!("{base}/api/v1/namespaces/default/configmaps?watch=true"),
            &env.demo.token,
        )),
    )
    .await
    .expect("a shared watch is answered while the long-running lane is full")
    .expect("watch");
    assert_eq!(resp.status(), 200);
    let shared = tokio::spawn(drain(resp.into_body()));
    let hub = proxy.upstream().lane_stats(Lane::Hub);
    assert!(
        hub.streams >= 1,
        "the hub's stream is in its own lane: {hub:?}"
    );
    assert_eq!(
        proxy.upstream().lane_stats(Lane::LongRunning).streams,
        held.len(),
        "and takes nothing of the forwarded watches' lane"
    );

    // The admin (exempt, by certificate) watches and lists with kubectl.
    let kubeconfig = env.dir.path().join("lanes-admin.kubeconfig");
    let text = std::fs::read_to_string(&env.demo.kubeconfig).expect("demo kubeconfig");
    let text = text.replace(&env.proxy_url(), &base);
    assert!(
        text.contains(&base),
        "the demo kubeconfig names the proxy URL"
    );
    std::fs::write(&kubeconfig, text).expect("write kubeconfig");
    let out = env
        .kubectl_with(
            &kubeconfig,
            &["get", "pods", "-A", "-w", "--request-timeout=2s"],
        )
        .await;
    // `-w` ends at the request timeout, successfully once the watch was
    // answered; a refusal would fail it.
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ns = env.kubectl_with(&kubeconfig, &["get", "ns"]).await;
    assert!(
        ns.status.success(),
        "{}",
        String::from_utf8_lossy(&ns.stderr)
    );
    assert!(
        proxy.upstream().lane_stats(Lane::Exempt).connections >= 1,
        "the admin went over the exempt lane"
    );

    // A watch ends: the next non-exempt watch gets its stream (waiting,
    // at most the lane's wait, for the end to reach the pool).
    held.pop().expect("a held watch").abort();
    let req = watch_request(&base, &env.demo.token, TABLE);
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("answered")
        .expect("request");
    if resp.status() != 200 {
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        panic!(
            "a freed stream is not reused: {status} {} (lane: {:?}, held: {})",
            String::from_utf8_lossy(&body),
            proxy.upstream().lane_stats(Lane::LongRunning),
            held.len()
        );
    }
    for watch in held {
        watch.abort();
    }
    shared.abort();
    proxy.shutdown().await;
}
