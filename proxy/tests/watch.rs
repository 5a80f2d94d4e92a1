//! The watch multiplexer end to end: kube-sim behind the proxy, real
//! sockets, and every proxied stream compared with what kube-sim itself
//! sends to a direct watch with the same parameters.

mod common;

use std::sync::Arc;
use std::time::Duration;

use breakwater_loadtest::sim::resources::{self, ResourceType};
use futures_util::StreamExt;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use common::{Env, WAIT, clients, demo_env, get, https_client, take, until_stats};

fn rt(plural: &str) -> &'static ResourceType {
    resources::find("", "v1", plural).expect("known type")
}

fn namespace(env: &Env, ns: &str) {
    env.demo
        .sim
        .store()
        .create(
            rt("namespaces"),
            None,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        )
        .expect("namespace");
}

fn pod_body(name: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "labels": {"app": "web"}},
           "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}})
}

fn create_pod(env: &Env, ns: &str, name: &str, node: &str) -> u64 {
    let obj = env
        .demo
        .sim
        .store()
        .create(rt("pods"), Some(ns), pod_body(name, node))
        .expect("create pod");
    rv_of(&obj)
}

fn move_pod(env: &Env, ns: &str, name: &str, node: &str) {
    env.demo
        .sim
        .store()
        .update(rt("pods"), Some(ns), name, pod_body(name, node))
        .expect("update pod");
}

fn delete_pod(env: &Env, ns: &str, name: &str) {
    env.demo
        .sim
        .store()
        .delete(rt("pods"), Some(ns), name)
        .expect("delete pod");
}

fn rv_of(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("rv")
}

/// kube-sim's open pod watches once they reach `want` (short upstream
/// watches end a moment after their clients), or after 10 s.
async fn open_pod_watches_settle_at(env: &Env, want: i64) -> i64 {
    let mut open = env.demo.sim.open_watches("pods");
    for _ in 0..1000 {
        if open == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        open = env.demo.sim.open_watches("pods");
    }
    open
}

fn summary(events: &[Value]) -> Vec<(String, String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default().to_string(),
                e["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                e["object"]["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_identical_watches_cost_one_upstream_watch_and_see_what_a_direct_watch_sees() {
    let env = demo_env().await;
    namespace(&env, "w1");
    create_pod(&env, "w1", "seed-a", "node-1");
    create_pod(&env, "w1", "seed-b", "node-2");
    let c = Arc::new(clients(&env));
    let pq = "/api/v1/namespaces/w1/pods?watch=1";
    let mut direct = c.direct_watch(pq).await;
    let mut watchers = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move { c.watch(pq).await }));
    }
    for t in tasks {
        watchers.push(t.await.expect("join"));
    }
    until_stats(&env, "1000 subscribers", |s| s.subscribers == 1000).await;
    assert_eq!(
        env.demo.sim.open_watches("pods"),
        2,
        "one direct + one shared"
    );
    assert_eq!(env.demo.proxy.watch_hub().stats().streams, 1);
    let metrics = breakwater::admin::render_metrics();
    for name in [
        "breakwater_watch_shared_ratio",
        "breakwater_watch_subscribers",
        "breakwater_watch_upstream_streams",
    ] {
        assert!(metrics.contains(name), "{name} on /metrics");
    }

    create_pod(&env, "w1", "p1", "node-1");
    move_pod(&env, "w1", "p1", "node-2");
    delete_pod(&env, "w1", "seed-a");
    let want = take(&mut direct, 5).await;
    assert_eq!(
        summary(&want)
            .iter()
            .map(|s| s.0.as_str())
            .collect::<Vec<_>>(),
        ["ADDED", "ADDED", "ADDED", "MODIFIED", "DELETED"]
    );
    let mut handles = Vec::new();
    for (i, mut w) in watchers.into_iter().enumerate() {
        let want = want.clone();
        handles.push(tokio::spawn(async move {
            let got = take(&mut w, 5).await;
            if i % 50 == 0 {
                assert_eq!(got, want, "client {i}: the exact events of a direct watch");
            } else {
                assert_eq!(summary(&got), summary(&want), "client {i}");
            }
        }));
    }
    for h in handles {
        h.await.expect("client saw the direct watch's events");
    }
    assert_eq!(env.demo.sim.open_watches("pods"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_scoped_watches_share_one_broad_watch_with_apiserver_transitions() {
    let env = demo_env().await;
    namespace(&env, "w2");
    let c = Arc::new(clients(&env));
    let pq = |i: usize| {
        format!(
            "/api/v1/namespaces/w2/pods?watch=1&resourceVersion=0&fieldSelector=spec.nodeName%3Dnode-{i}"
        )
    };
    let mut direct1 = c.direct_watch(&pq(1)).await;
    let mut direct2 = c.direct_watch(&pq(2)).await;
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let (c, pq) = (c.clone(), pq(i));
        tasks.push(tokio::spawn(async move { c.watch(&pq).await }));
    }
    let mut watchers = Vec::new();
    for t in tasks {
        watchers.push(t.await.expect("join"));
    }
    until_stats(&env, "1000 subscribers", |s| s.subscribers == 1000).await;
    assert_eq!(
        env.demo.sim.open_watches("pods"),
        3,
        "two direct + one shared"
    );
    let before = env.demo.proxy.watch_hub().stats();

    create_pod(&env, "w2", "mover", "node-1");
    move_pod(&env, "w2", "mover", "node-2");
    delete_pod(&env, "w2", "mover");
    create_pod(&env, "w2", "marker", "node-3");

    let want1 = take(&mut direct1, 2).await;
    let want2 = take(&mut direct2, 2).await;
    assert_eq!(
        summary(&want1)
            .iter()
            .map(|s| s.0.as_str())
            .collect::<Vec<_>>(),
        ["ADDED", "DELETED"]
    );
    assert_eq!(
        summary(&want2)
            .iter()
            .map(|s| s.0.as_str())
            .collect::<Vec<_>>(),
        ["ADDED", "DELETED"]
    );
    let mut it = watchers.into_iter();
    let _node0 = it.next();
    let mut node1 = it.next().expect("node-1");
    let mut node2 = it.next().expect("node-2");
    let mut node3 = it.next().expect("node-3");
    assert_eq!(
        take(&mut node1, 2).await,
        want1,
        "node-1: ADDED, then DELETED (old object, new RV)"
    );
    assert_eq!(
        take(&mut node2, 2).await,
        want2,
        "node-2: ADDED on entering, DELETED"
    );
    let marker = take(&mut node3, 1).await;
    assert_eq!(
        summary(&marker)[0].1,
        "marker",
        "node-3 saw nothing of the mover"
    );
    // Nobody else got anything: the hub delivered exactly these 5 events.
    until_stats(&env, "5 deliveries", |s| {
        s.deliveries - before.deliveries == 5
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        env.demo.proxy.watch_hub().stats().deliveries - before.deliveries,
        5
    );
    assert_eq!(env.demo.sim.open_watches("pods"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_at_unset_zero_recent_and_expired_resource_versions() {
    let env = demo_env().await;
    namespace(&env, "w3");
    let c = clients(&env);
    let base = "/api/v1/namespaces/w3/pods?watch=1";
    create_pod(&env, "w3", "a", "node-1");
    // Opens the shared stream (its LIST is at the current RV).
    let mut first = c.watch(&format!("{base}&resourceVersion=0")).await;
    assert_eq!(summary(&take(&mut first, 1).await)[0].1, "a");
    let after_a = create_pod(&env, "w3", "b", "node-1");
    create_pod(&env, "w3", "c", "node-2");
    assert_eq!(take(&mut first, 2).await.len(), 2);

    // "": consistent snapshot, as a direct watch.
    let mut unset = c.watch(base).await;
    let mut direct = c.direct_watch(base).await;
    assert_eq!(take(&mut unset, 3).await, take(&mut direct, 3).await);
    // "0": the cache at once.
    let mut zero = c.watch(&format!("{base}&resourceVersion=0")).await;
    assert_eq!(summary(&take(&mut zero, 3).await).len(), 3);
    // Recent N: the replay of what came after N, as the apiserver's.
    let from = format!("{base}&resourceVersion={after_a}");
    let mut replay = c.watch(&from).await;
    let mut direct_replay = c.direct_watch(&from).await;
    let got = take(&mut replay, 1).await;
    assert_eq!(got, take(&mut direct_replay, 1).await);
    assert_eq!(summary(&got)[0].1, "c");
    // Older than the shared stream: the apiserver replays the gap (one short
    // upstream watch), then the shared stream carries on; as a direct watch.
    let old = format!("{base}&resourceVersion=1");
    let mut before = c.watch(&old).await;
    let mut direct_before = c.direct_watch(&old).await;
    assert_eq!(
        take(&mut before, 3).await,
        take(&mut direct_before, 3).await
    );
    // Everything live still flows to every joiner.
    create_pod(&env, "w3", "d", "node-3");
    for w in [&mut first, &mut unset, &mut zero, &mut replay, &mut before] {
        assert_eq!(summary(&take(w, 1).await)[0].1, "d");
    }
    // The watch older than the stream caught up with one short upstream
    // watch and joined: kube-sim holds the shared watch and three direct.
    assert_eq!(
        open_pod_watches_settle_at(&env, 4).await,
        4,
        "one shared, three direct"
    );
}

/// A consistent join ("" or sendInitialEvents) must not wait for the next
/// bookmark when the apiserver's RV moved on for other collections only:
/// kube-sim, like the apiserver, bookmarks once a minute, and the freshness
/// check's RV is the store's global one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_joins_are_prompt_when_only_other_collections_changed() {
    let env = demo_env().await;
    namespace(&env, "w9");
    let c = clients(&env);
    let base = "/api/v1/namespaces/w9/pods?watch=1";
    create_pod(&env, "w9", "a", "node-1");
    let mut first = c.watch(&format!("{base}&resourceVersion=0")).await;
    assert_eq!(summary(&take(&mut first, 1).await)[0].1, "a");
    for round in 0..3 {
        // Other collections move the global RV past the pods' stream.
        for i in 0..3 {
            env.demo
                .sim
                .store()
                .create(
                    rt("configmaps"),
                    Some("w9"),
                    json!({"apiVersion": "v1", "kind": "ConfigMap",
                           "metadata": {"name": format!("cm-{round}-{i}"), "namespace": "w9"}}),
                )
                .expect("configmap");
        }
        let pq = if round == 2 {
            format!(
                "{base}&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan"
            )
        } else {
            base.to_string()
        };
        let opened = tokio::time::timeout(Duration::from_secs(10), c.watch(&pq))
            .await
            .expect("a consistent join within seconds, not at the next bookmark");
        let mut unset = opened;
        let mut direct = c.direct_watch(&pq).await;
        let pods = round + 1;
        let (got, want) = (take(&mut unset, pods).await, take(&mut direct, pods).await);
        assert_eq!(summary(&got), summary(&want), "round {round}");
        if round == 2 {
            let (end, direct_end) = (take(&mut unset, 1).await, take(&mut direct, 1).await);
            for e in [&end[0], &direct_end[0]] {
                assert_eq!(e["type"], "BOOKMARK");
                assert_eq!(
                    e["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
                    "true"
                );
            }
            let newest = got.iter().map(|e| rv_of(&e["object"])).max().expect("pods");
            assert!(rv_of(&end[0]["object"]) >= newest);
        }
        // And it is live: a new pod reaches both.
        create_pod(&env, "w9", &format!("p{round}"), "node-1");
        assert_eq!(
            summary(&take(&mut unset, 1).await)[0].1,
            format!("p{round}")
        );
        assert_eq!(
            summary(&take(&mut direct, 1).await)[0].1,
            format!("p{round}")
        );
        drop(direct);
        // The next round's joins see this pod too.
        let _ = take(&mut first, 1).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_timeouts_and_initial_events_end_follow_the_client() {
    let env = demo_env().await;
    namespace(&env, "w4");
    create_pod(&env, "w4", "a", "node-1");
    let c = clients(&env);
    let base = "/api/v1/namespaces/w4/pods?watch=1";
    // sendInitialEvents: ADDED, then the end-of-initial-events bookmark.
    let mut streaming = c
        .watch(&format!(
            "{base}&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan"
        ))
        .await;
    let ev = take(&mut streaming, 2).await;
    assert_eq!(ev[0]["type"], "ADDED");
    assert_eq!(ev[1]["type"], "BOOKMARK");
    assert_eq!(
        ev[1]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    assert_eq!(ev[1]["object"]["kind"], "Pod");
    // timeoutSeconds=3 with bookmarks: a bookmark before the end, then a clean end.
    let started = std::time::Instant::now();
    let mut short = c
        .watch(&format!(
            "{base}&resourceVersion=0&timeoutSeconds=3&allowWatchBookmarks=true"
        ))
        .await;
    assert_eq!(take(&mut short, 1).await[0]["type"], "ADDED");
    let bm = take(&mut short, 1).await.remove(0);
    assert_eq!(bm["type"], "BOOKMARK");
    assert!(
        short.next_within(WAIT).await.is_none(),
        "clean end at its timeout"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(10),
        "{took:?}"
    );
    // Without allowWatchBookmarks: no bookmark, just the clean end.
    let mut plain = c
        .watch(&format!("{base}&resourceVersion=0&timeoutSeconds=3"))
        .await;
    assert_eq!(take(&mut plain, 1).await[0]["type"], "ADDED");
    assert!(plain.next_within(WAIT).await.is_none());
    // The long watch is still there.
    create_pod(&env, "w4", "b", "node-1");
    assert_eq!(summary(&take(&mut streaming, 1).await)[0].1, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_watch_restarts_are_invisible_to_clients() {
    let env = demo_env().await;
    namespace(&env, "w5");
    let c = Arc::new(clients(&env));
    let mut watchers = Vec::new();
    for _ in 0..50 {
        watchers.push(
            c.watch("/api/v1/namespaces/w5/pods?watch=1&resourceVersion=0")
                .await,
        );
    }
    until_stats(&env, "50 subscribers", |s| s.subscribers == 50).await;
    let watches_before = env.demo.proxy.watch_hub().stats().upstream_watches;
    for i in 0..5 {
        create_pod(&env, "w5", &format!("p{i}"), "node-1");
    }
    env.demo.sim.store().close_watches();
    until_stats(&env, "a re-watch", |s| s.upstream_watches > watches_before).await;
    // The re-watch is registered in kube-sim before it is closed again.
    for _ in 0..500 {
        if env.demo.sim.open_watches("pods") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 5..10 {
        create_pod(&env, "w5", &format!("p{i}"), "node-1");
    }
    env.demo.sim.store().close_watches();
    for i in 10..12 {
        create_pod(&env, "w5", &format!("p{i}"), "node-1");
    }
    for w in &mut watchers {
        let names: Vec<String> = summary(&take(w, 12).await)
            .into_iter()
            .map(|s| s.1)
            .collect();
        let want: Vec<String> = (0..12).map(|i| format!("p{i}")).collect();
        assert_eq!(names, want, "every event exactly once, in order");
    }
    assert!(env.demo.proxy.watch_hub().stats().upstream_watches >= watches_before + 2);
    assert_eq!(env.demo.sim.open_watches("pods"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_sends_clients_410_and_their_relists_are_served_by_the_hub() {
    let env = demo_env().await;
    namespace(&env, "w6");
    create_pod(&env, "w6", "a", "node-1");
    let c = Arc::new(clients(&env));
    let mut watchers = Vec::new();
    for _ in 0..20 {
        let mut w = c
            .watch("/api/v1/namespaces/w6/pods?watch=1&resourceVersion=0")
            .await;
        take(&mut w, 1).await;
        watchers.push(w);
    }
    create_pod(&env, "w6", "b", "node-1");
    for w in &mut watchers {
        take(w, 1).await;
    }
    let stale = c
        .get_json("/api/v1/namespaces/w6/pods?resourceVersion=0")
        .await["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_string();
    // Another type moves the global RV past the hub's, then the window goes.
    namespace(&env, "w6-other");
    let lists_before = env.demo.sim.request_count("LIST", "pods");
    env.demo.sim.store().compact(rt("pods"));
    env.demo.sim.store().close_watches();
    for w in &mut watchers {
        let err = take(w, 1).await.remove(0);
        assert_eq!(err["type"], "ERROR", "{err}");
        assert_eq!(err["object"]["code"], 410);
        assert!(w.next_within(WAIT).await.is_none(), "then the end");
    }
    // A watch from before the 410 gets the apiserver's answer from the hub.
    let watches = env.demo.sim.request_count("WATCH", "pods");
    let mut gone = c
        .watch(&format!(
            "/api/v1/namespaces/w6/pods?watch=1&resourceVersion={stale}"
        ))
        .await;
    let err = take(&mut gone, 1).await.remove(0);
    assert_eq!(err["object"]["reason"], "Expired", "{err}");
    assert!(gone.next_within(WAIT).await.is_none());
    // Each client relists (rv=0, as a reflector does) and watches on.
    let mut rewatched = Vec::new();
    for _ in 0..20 {
        let list = c
            .get_json("/api/v1/namespaces/w6/pods?resourceVersion=0")
            .await;
        assert_eq!(list["kind"], "PodList");
        assert_eq!(list["items"].as_array().map(Vec::len), Some(2));
        assert!(
            list["items"][0].get("kind").is_none(),
            "items carry no kind"
        );
        let rv = list["metadata"]["resourceVersion"]
            .as_str()
            .expect("rv")
            .to_string();
        rewatched.push(
            c.watch(&format!(
                "/api/v1/namespaces/w6/pods?watch=1&resourceVersion={rv}"
            ))
            .await,
        );
    }
    create_pod(&env, "w6", "c", "node-1");
    for w in &mut rewatched {
        assert_eq!(summary(&take(w, 1).await)[0].1, "c");
    }
    let lists_after = env.demo.sim.request_count("LIST", "pods");
    assert!(
        lists_after - lists_before <= 1,
        "upstream LISTs rose by {}",
        lists_after - lists_before
    );
    assert!(env.demo.proxy.watch_hub().stats().expired >= 2);
    assert!(
        env.demo.sim.request_count("WATCH", "pods") <= watches + 1,
        "the stale watch was answered locally"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_lists_filter_by_selectors_and_cost_no_upstream_list() {
    let env = demo_env().await;
    namespace(&env, "w7");
    for i in 0..6 {
        create_pod(&env, "w7", &format!("p{i}"), &format!("node-{}", i % 3));
    }
    let c = clients(&env);
    let first = c
        .get_json("/api/v1/namespaces/w7/pods?resourceVersion=0")
        .await;
    assert_eq!(first["items"].as_array().map(Vec::len), Some(6));
    let lists = env.demo.sim.request_count("LIST", "pods");
    for i in 0..3 {
        let l = c
            .get_json(&format!(
                "/api/v1/namespaces/w7/pods?resourceVersion=0&fieldSelector=spec.nodeName%3Dnode-{i}"
            ))
            .await;
        let names: Vec<&str> = l["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|p| p["metadata"]["name"].as_str().expect("name"))
            .collect();
        assert_eq!(names, [format!("p{i}"), format!("p{}", i + 3)]);
    }
    let none = c
        .get_json("/api/v1/namespaces/w7/pods?resourceVersion=0&labelSelector=app%3Ddb")
        .await;
    assert_eq!(none["items"].as_array().map(Vec::len), Some(0));
    assert_eq!(env.demo.sim.request_count("LIST", "pods"), lists);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_evicted_while_others_keep_receiving() {
    let env = demo_env().await;
    namespace(&env, "w8");
    // A proxy of our own with small queues, so that eviction comes quickly.
    let mut cfg = common::passthrough_config(&env, env.demo.sim.url(), Duration::from_secs(1));
    cfg.watch.queue = 8;
    let proxy = breakwater::server::start(cfg).await.expect("proxy");
    let c = clients(&env);
    let url = format!("https://{}", proxy.addr());
    let pq = "/api/v1/namespaces/w8/pods?watch=1&resourceVersion=0";
    // h1 clients: one connection each, so the stalled one backs up alone.
    let h1 = https_client(&env.demo.proxy_ca_pem, false);
    let stalled = h1
        .request(get(&format!("{url}{pq}"), &c.token))
        .await
        .expect("stalled watch");
    let mut good = c
        .open(&https_client(&env.demo.proxy_ca_pem, false), &url, pq)
        .await;
    let pad = "x".repeat(16 * 1024);
    let mut created = 0;
    while proxy.watch_hub().stats().evictions == 0 && created < 4000 {
        for _ in 0..5 {
            let mut body = pod_body(&format!("p{created}"), "node-1");
            body["metadata"]["annotations"] = json!({"pad": pad});
            env.demo
                .sim
                .store()
                .create(rt("pods"), Some("w8"), body)
                .expect("create");
            created += 1;
        }
        // Keep the good client drained as we go.
        for _ in 0..5 {
            good.next_within(WAIT)
                .await
                .expect("good client keeps receiving");
        }
    }
    assert!(
        proxy.watch_hub().stats().evictions >= 1,
        "evicted after {created}"
    );
    assert_eq!(
        proxy.watch_hub().stats().subscribers,
        2,
        "the stalled body is still held"
    );
    create_pod(&env, "w8", "after", "node-1");
    let last = take(&mut good, 1).await;
    assert_eq!(summary(&last)[0].1, "after");
    drop(stalled);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflector_loops_and_kube_rs_watchers_converge_to_the_true_state() {
    let env = demo_env().await;
    namespace(&env, "w9");
    for i in 0..5 {
        create_pod(&env, "w9", &format!("p{i}"), "node-1");
    }
    let c = Arc::new(clients(&env));
    // A client-go style reflector: LIST rv=0, then WATCH from its RV.
    let (watching_tx, watching) = tokio::sync::oneshot::channel();
    let reflector = {
        let c = c.clone();
        tokio::spawn(async move {
            let list = c
                .get_json("/api/v1/namespaces/w9/pods?resourceVersion=0")
                .await;
            let mut state = std::collections::BTreeMap::new();
            for p in list["items"].as_array().expect("items") {
                state.insert(
                    p["metadata"]["name"].as_str().expect("n").to_string(),
                    p["metadata"]["resourceVersion"].clone(),
                );
            }
            let rv = list["metadata"]["resourceVersion"]
                .as_str()
                .expect("rv")
                .to_string();
            let mut w = c
                .watch(&format!("/api/v1/namespaces/w9/pods?watch=1&resourceVersion={rv}&allowWatchBookmarks=true"))
                .await;
            let _ = watching_tx.send(());
            loop {
                let ev: Value =
                    serde_json::from_str(&w.next_within(WAIT).await.expect("event")).expect("json");
                let name = ev["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                match ev["type"].as_str() {
                    Some("ADDED" | "MODIFIED") => {
                        state.insert(
                            name.clone(),
                            ev["object"]["metadata"]["resourceVersion"].clone(),
                        );
                    }
                    Some("DELETED") => {
                        state.remove(&name);
                    }
                    _ => {}
                }
                if name == "done" {
                    return state;
                }
            }
        })
    };
    // kube-rs's watcher through the proxy.
    let kubeconfig = kube::config::Kubeconfig::read_from(&env.demo.kubeconfig).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    let client = kube::Client::try_from(config).expect("client");
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, "w9");
    let mut stream =
        kube::runtime::watcher(pods, kube::runtime::watcher::Config::default()).boxed();
    let mut kube_state = std::collections::BTreeSet::new();
    let mut init = std::collections::BTreeSet::new();
    loop {
        match tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("kube-rs event")
            .expect("stream")
            .expect("ok")
        {
            kube::runtime::watcher::Event::InitApply(p) => {
                init.insert(p.metadata.name.unwrap_or_default());
            }
            kube::runtime::watcher::Event::InitDone => break,
            _ => {}
        }
    }
    kube_state.extend(init);
    watching.await.expect("reflector is watching");
    delete_pod(&env, "w9", "p0");
    move_pod(&env, "w9", "p1", "node-2");
    create_pod(&env, "w9", "p9", "node-1");
    create_pod(&env, "w9", "done", "node-1");
    loop {
        match tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("kube-rs event")
            .expect("stream")
            .expect("ok")
        {
            kube::runtime::watcher::Event::Apply(p) => {
                let name = p.metadata.name.unwrap_or_default();
                kube_state.insert(name.clone());
                if name == "done" {
                    break;
                }
            }
            kube::runtime::watcher::Event::Delete(p) => {
                kube_state.remove(&p.metadata.name.unwrap_or_default());
            }
            _ => {}
        }
    }
    let truth = env
        .demo
        .sim
        .store()
        .list(rt("pods"), Some("w9"), &Default::default())
        .expect("list");
    let true_names: std::collections::BTreeSet<String> = truth
        .items
        .iter()
        .map(|p| p["metadata"]["name"].as_str().expect("n").to_string())
        .collect();
    assert_eq!(kube_state, true_names, "kube-rs watcher");
    let reflected = reflector.await.expect("reflector");
    let true_rvs: std::collections::BTreeMap<String, Value> = truth
        .items
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"].as_str().expect("n").to_string(),
                p["metadata"]["resourceVersion"].clone(),
            )
        })
        .collect();
    assert_eq!(reflected, true_rvs, "reflector loop");
}

/// A consistent LIST (rv unset, kube-rs and client-go relists) of a
/// collection with a live stream is answered from its cache once the stream
/// is confirmed fresh: the same items as kube-sim's own consistent LIST, a
/// few cheap upstream checks instead of one LIST each. A LIST that would
/// need more than one page goes upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_lists_of_a_watched_collection_are_served_fresh_from_the_cache() {
    let env = demo_env().await;
    namespace(&env, "w11");
    for i in 0..5 {
        create_pod(
            &env,
            "w11",
            &format!("p{i}"),
            if i < 3 { "node-1" } else { "node-2" },
        );
    }
    let c = Arc::new(clients(&env));
    let node1 = "/api/v1/namespaces/w11/pods?fieldSelector=spec.nodeName%3Dnode-1";
    // An agent's watch opens the (broad) shared stream.
    let mut watch = c.watch(&format!("{node1}&watch=1&resourceVersion=0")).await;
    assert_eq!(take(&mut watch, 3).await.len(), 3);
    let names = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| i["metadata"]["name"].as_str().expect("name").to_string())
            .collect()
    };
    let direct_list = |pq: String| {
        let c = c.clone();
        async move {
            let resp = c
                .direct
                .request(get(&format!("{}{pq}", c.sim_url), &c.token))
                .await
                .expect("direct list");
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            serde_json::from_slice::<Value>(&body).expect("json")
        }
    };
    let paged = format!("{node1}&limit=500");
    let before = env.demo.sim.request_count("LIST", "pods");
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (c, pq) = (c.clone(), paged.clone());
        tasks.push(tokio::spawn(async move { c.get_json(&pq).await }));
    }
    let want = direct_list(paged.clone()).await;
    for t in tasks {
        let got = t.await.expect("join");
        assert_eq!(names(&got), names(&want));
        assert_eq!(got["kind"], "PodList");
        assert!(got["metadata"]["continue"].is_null());
    }
    // Less the direct LIST that gave `want`.
    let upstream = env.demo.sim.request_count("LIST", "pods") - before - 1;
    eprintln!("100 consistent LISTs cost {upstream} upstream LIST requests");
    assert!(
        upstream < 25,
        "100 consistent LISTs cost {upstream} upstream LISTs"
    );

    // Fresh after a write, and prompt after other collections moved the RV.
    create_pod(&env, "w11", "late", "node-1");
    env.demo
        .sim
        .store()
        .create(
            rt("configmaps"),
            Some("w11"),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "moves-rv"}}),
        )
        .expect("configmap");
    let got = tokio::time::timeout(Duration::from_secs(10), c.get_json(&paged))
        .await
        .expect("a consistent LIST within seconds");
    assert_eq!(names(&got), names(&direct_list(paged.clone()).await));
    assert!(names(&got).contains(&"late".to_string()));
    // Its RV is one a watch can continue from: the next change arrives.
    let rv = got["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_string();
    let mut from = c
        .watch(&format!("{node1}&watch=1&resourceVersion={rv}"))
        .await;
    move_pod(&env, "w11", "p0", "node-2");
    let ev = take(&mut from, 1).await;
    let (kind, name, _) = &summary(&ev)[0];
    assert_eq!((kind.as_str(), name.as_str()), ("DELETED", "p0"));

    // More matches than the limit: the apiserver's own pages.
    let small = format!("{node1}&limit=2");
    let got = c.get_json(&small).await;
    assert_eq!(names(&got).len(), 2);
    assert!(
        got["metadata"]["continue"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_concurrent_consistent_lists_share_upstream_requests() {
    let env = demo_env().await;
    namespace(&env, "w10");
    for i in 0..3 {
        create_pod(&env, "w10", &format!("p{i}"), "node-1");
    }
    let c = Arc::new(clients(&env));
    let before = env.demo.sim.request_count("LIST", "pods");
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.get_json("/api/v1/namespaces/w10/pods").await
        }));
    }
    for t in tasks {
        let list = t.await.expect("join");
        assert_eq!(list["items"].as_array().map(Vec::len), Some(3));
    }
    let upstream = env.demo.sim.request_count("LIST", "pods") - before;
    eprintln!("200 consistent LISTs cost {upstream} upstream");
    assert!(
        upstream < 100,
        "200 identical LISTs cost {upstream} upstream LISTs"
    );
    // A LIST after a write sees it: rounds never answer later arrivals.
    create_pod(&env, "w10", "late", "node-1");
    let list = c.get_json("/api/v1/namespaces/w10/pods").await;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(4));
}

/// A storm of cold consistent LISTs (each agent's first LIST, rv unset,
/// one selector per node) on a proxy with no stream yet: the first starts
/// the shared stream, the rest wait for it, and every one is answered from
/// the cache once it is confirmed fresh — a handful of upstream LISTs, not
/// one per selector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_consistent_lists_start_one_stream_and_cost_o1_upstream() {
    let env = demo_env().await;
    namespace(&env, "w13");
    const NODES: usize = 20;
    for i in 0..NODES {
        create_pod(&env, "w13", &format!("p{i}"), &format!("cold-{i}"));
    }
    let c = Arc::new(clients(&env));
    let before = env.demo.sim.request_count("LIST", "pods");
    let mut tasks = Vec::new();
    for i in 0..200 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let node = i % NODES;
            let list = c
                .get_json(&format!(
                    "/api/v1/namespaces/w13/pods?limit=500&fieldSelector=spec.nodeName%3Dcold-{node}"
                ))
                .await;
            (node, list)
        }));
    }
    for t in tasks {
        let (node, list) = t.await.expect("join");
        let names: Vec<&str> = list["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|p| p["metadata"]["name"].as_str().expect("name"))
            .collect();
        assert_eq!(names, [format!("p{node}")], "node cold-{node}");
        assert!(list["metadata"]["continue"].is_null());
    }
    let upstream = env.demo.sim.request_count("LIST", "pods") - before;
    eprintln!("200 cold consistent LISTs over {NODES} selectors cost {upstream} upstream LISTs");
    assert!(
        upstream <= 5,
        "200 cold consistent LISTs cost {upstream} upstream LISTs"
    );
    assert_eq!(env.demo.proxy.watch_hub().stats().streams, 1);
    // Fresh still means fresh: a LIST after a write sees it.
    create_pod(&env, "w13", "late", "cold-0");
    let list = c
        .get_json("/api/v1/namespaces/w13/pods?fieldSelector=spec.nodeName%3Dcold-0")
        .await;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_identity_gets_403_and_never_joins_another_identitys_stream() {
    let env = demo_env().await;
    let c = clients(&env);
    // The admin's shared stream of kube-system pods exists.
    let mut admin = c
        .watch("/api/v1/namespaces/kube-system/pods?watch=1&resourceVersion=0")
        .await;
    until_stats(&env, "admin subscribed", |s| s.subscribers == 1).await;
    let viewer_cfg = std::fs::read_to_string(&env.demo.kubeconfig_viewer).expect("kubeconfig");
    let viewer = viewer_cfg
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .expect("viewer token")
        .to_string();
    for pq in [
        "/api/v1/namespaces/kube-system/pods?watch=1",
        "/api/v1/namespaces/kube-system/pods?watch=1&fieldSelector=spec.nodeName%3Dnode-1",
        "/api/v1/namespaces/kube-system/pods?resourceVersion=0",
    ] {
        let resp = c
            .proxy
            .request(get(&format!("{}{pq}", c.proxy_url), &viewer))
            .await
            .expect("request");
        assert_eq!(resp.status(), 403, "{pq}");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let status: Value = serde_json::from_slice(&body).expect("Status json");
        assert_eq!(status["reason"], "Forbidden", "{status}");
    }
    assert_eq!(env.demo.proxy.watch_hub().stats().subscribers, 1);
    // The viewer may watch pods in demo: its own stream, not the admin's.
    let own = c
        .proxy
        .request(get(
            &format!(
                "{}/api/v1/namespaces/demo/pods?watch=1&resourceVersion=0",
                c.proxy_url
            ),
            &viewer,
        ))
        .await
        .expect("request");
    assert_eq!(own.status(), 200);
    until_stats(&env, "two streams", |s| {
        s.streams == 2 && s.subscribers == 2
    })
    .await;
    create_pod(&env, "kube-system", "admin-only", "node-1");
    // The seeded kube-system pods come first, then the new one.
    let mut seen = Vec::new();
    for _ in 0..100 {
        let name = summary(&take(&mut admin, 1).await).remove(0).1;
        if name == "admin-only" {
            return;
        }
        seen.push(name);
    }
    panic!("admin never saw its pod: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_subscribers_lingers_then_closes_upstream() {
    let env = demo_env().await;
    namespace(&env, "w11");
    let mut cfg = common::passthrough_config(&env, env.demo.sim.url(), Duration::from_secs(1));
    cfg.watch.linger = Duration::from_millis(300);
    let proxy = breakwater::server::start(cfg).await.expect("proxy");
    let c = clients(&env);
    let url = format!("https://{}", proxy.addr());
    let pq = "/api/v1/namespaces/w11/pods?watch=1&resourceVersion=0";
    let first = c.open(&c.proxy, &url, pq).await;
    for _ in 0..500 {
        if env.demo.sim.open_watches("pods") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(env.demo.sim.open_watches("pods"), 1);
    drop(first);
    // Back within the linger period: the same upstream watch serves it.
    let watches = proxy.watch_hub().stats().upstream_watches;
    let second = c.open(&c.proxy, &url, pq).await;
    assert_eq!(proxy.watch_hub().stats().upstream_watches, watches);
    drop(second);
    let started = std::time::Instant::now();
    for _ in 0..500 {
        if env.demo.sim.open_watches("pods") == 0 && proxy.watch_hub().stats().streams == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(env.demo.sim.open_watches("pods"), 0, "closed upstream");
    assert_eq!(proxy.watch_hub().stats().streams, 0);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_consistent_list_just_before_the_stream_started_is_shared() {
    let env = demo_env().await;
    namespace(&env, "w12");
    create_pod(&env, "w12", "a", "node-1");
    let c = clients(&env);
    // A consistent LIST (forwarded), then the global RV moves on elsewhere.
    let list = c.get_json("/api/v1/namespaces/w12/pods").await;
    let n = list["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_string();
    namespace(&env, "w12-other");
    // The stream starts now (its LIST is newer than N): one probe confirms
    // the gap is empty, and the watch is served from the shared stream.
    let pq = format!("/api/v1/namespaces/w12/pods?watch=1&resourceVersion={n}");
    let mut first = c.watch(&pq).await;
    until_stats(&env, "shared", |s| s.subscribers == 1).await;
    let watches = env.demo.sim.request_count("WATCH", "pods");
    let mut second = c.watch(&pq).await;
    until_stats(&env, "both shared", |s| s.subscribers == 2).await;
    assert_eq!(
        env.demo.sim.request_count("WATCH", "pods"),
        watches,
        "no probe needed twice"
    );
    create_pod(&env, "w12", "b", "node-1");
    for w in [&mut first, &mut second] {
        assert_eq!(summary(&take(w, 1).await)[0].1, "b");
    }
    // Pods changed in the gap: one short upstream watch replays the gap
    // (the apiserver's own events for this client, its selectors applied
    // by the apiserver), then the client is on the shared stream.
    let old = rv_of(
        &env.demo
            .sim
            .store()
            .get(rt("pods"), Some("w12"), "a")
            .expect("a"),
    ) - 1;
    let mut kept = Vec::new();
    for pq in [
        format!("/api/v1/namespaces/w12/pods?watch=1&resourceVersion={old}"),
        format!(
            "/api/v1/namespaces/w12/pods?watch=1&resourceVersion={old}&fieldSelector=spec.nodeName%3Dnode-1"
        ),
    ] {
        let subscribers = env.demo.proxy.watch_hub().stats().subscribers;
        let mut caught_up = c.watch(&pq).await;
        let mut direct = c.direct_watch(&pq).await;
        assert_eq!(take(&mut caught_up, 2).await, take(&mut direct, 2).await);
        until_stats(&env, "caught up, then shared", |s| {
            s.subscribers == subscribers + 1
        })
        .await;
        let name = format!("c{subscribers}");
        create_pod(&env, "w12", &name, "node-1");
        let (got, want) = (take(&mut caught_up, 1).await, take(&mut direct, 1).await);
        assert_eq!(got, want);
        for w in [&mut first, &mut second] {
            assert_eq!(summary(&take(w, 1).await)[0].1, name);
        }
        for w in &mut kept {
            assert_eq!(summary(&take(w, 1).await)[0].1, name);
        }
        kept.push(caught_up);
        drop(direct);
    }
    // The catch-up watches were short: kube-sim holds the shared one only.
    assert_eq!(
        open_pod_watches_settle_at(&env, 1).await,
        1,
        "only the shared watch stays open upstream"
    );
}
