//! Watch sharing across identities, end to end: ServiceAccounts with and
//! without RBAC rights watch through the demo proxy (front-proxy mode, so
//! the proxy can ask kube-sim SubjectAccessReviews), and kube-sim's own
//! counters say how many upstream watches and reviews that cost.

mod common;

use std::time::Duration;

use breakwater_loadtest::sim::resources::{self, ResourceType};
use http_body_util::BodyExt;
use serde_json::{Value, json};

use common::{Env, HttpsClient, Lines, demo_env, get, https_client};

const WAIT: Duration = Duration::from_secs(20);
const DAY: Duration = Duration::from_secs(24 * 3600);
const PODS: &str = "/api/v1/namespaces/demo/pods";

fn rt(group: &str, plural: &str) -> &'static ResourceType {
    resources::find(group, "v1", plural).expect("known type")
}

/// ServiceAccount demo/`name`, bound (or not) to the demo's pod-viewer Role
/// (get/list/watch pods in demo); returns its token.
fn service_account(env: &Env, name: &str, pod_viewer: bool) -> String {
    let store = env.demo.sim.store();
    store
        .create(
            rt("", "serviceaccounts"),
            Some("demo"),
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": name, "namespace": "demo"}}),
        )
        .expect("service account");
    if pod_viewer {
        store
            .create(
                rt("rbac.authorization.k8s.io", "rolebindings"),
                Some("demo"),
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                       "metadata": {"name": format!("{name}-pod-viewer"), "namespace": "demo"},
                       "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                   "name": "pod-viewer"},
                       "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": "demo"}]}),
            )
            .expect("role binding");
    }
    env.demo.sim.issue_token("demo", name, DAY)
}

fn revoke(env: &Env, name: &str) {
    env.demo
        .sim
        .store()
        .delete(
            rt("rbac.authorization.k8s.io", "rolebindings"),
            Some("demo"),
            &format!("{name}-pod-viewer"),
        )
        .expect("delete role binding");
}

fn create_pod(env: &Env, name: &str) {
    env.demo
        .sim
        .store()
        .create(
            rt("", "pods"),
            Some("demo"),
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name},
                   "spec": {"nodeName": "node-1",
                            "containers": [{"name": "c", "image": "busybox"}]}}),
        )
        .expect("create pod");
}

fn reviews(env: &Env) -> u64 {
    env.demo.sim.request_count("POST", "subjectaccessreviews")
}

fn client(env: &Env) -> HttpsClient {
    https_client(&env.demo.proxy_ca_pem, true)
}

/// A request through the proxy, answered (headers) in time.
async fn send(
    env: &Env,
    c: &HttpsClient,
    pq: &str,
    token: &str,
) -> http::Response<hyper::body::Incoming> {
    tokio::time::timeout(
        WAIT,
        c.request(get(&format!("{}{pq}", env.proxy_url()), token)),
    )
    .await
    .expect("answered in time")
    .expect("request")
}

async fn watch(env: &Env, c: &HttpsClient, pq: &str, token: &str) -> Lines {
    let resp = send(env, c, pq, token).await;
    assert_eq!(resp.status(), 200, "{pq}");
    Lines::new(resp.into_body())
}

/// Reads events until one names `pod`; returns that event's line.
async fn until_pod(lines: &mut Lines, pod: &str) -> String {
    for _ in 0..100 {
        let line = lines
            .next_within(WAIT)
            .await
            .expect("an event, not the end");
        let v: Value = serde_json::from_str(&line).expect("event json");
        if v["object"]["metadata"]["name"] == pod {
            return line;
        }
    }
    panic!("{pod} never arrived");
}

/// Waits (bounded) until the hub's accounting satisfies `cond`.
async fn until_stats(env: &Env, what: &str, cond: impl Fn(&breakwater::watch::HubStats) -> bool) {
    for _ in 0..2000 {
        if cond(&env.demo.proxy.watch_hub().stats()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: {:?}", env.demo.proxy.watch_hub().stats());
}

/// Waits (bounded) until kube-sim has `n` pod watches open.
async fn until_upstream_watches(env: &Env, n: i64) {
    for _ in 0..2000 {
        if env.demo.sim.open_watches("pods") == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "kube-sim pod watches: {} (want {n})",
        env.demo.sim.open_watches("pods")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_allowed_identities_share_one_upstream_watch_and_see_the_same_events() {
    let env = demo_env().await;
    let alpha = service_account(&env, "alpha", true);
    let beta = service_account(&env, "beta", true);
    let c = client(&env);
    let mut a = watch(&env, &c, &format!("{PODS}?watch=1"), &alpha).await;
    let mut b = watch(
        &env,
        &c,
        &format!("{PODS}?watch=1&allowWatchBookmarks=true"),
        &beta,
    )
    .await;
    // The demo's viewer too, from a LIST rv=0 and a watch from its RV.
    let viewer = std::fs::read_to_string(&env.demo.kubeconfig_viewer)
        .expect("kubeconfig")
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: ").map(str::to_string))
        .expect("viewer token");
    let list = send(&env, &c, &format!("{PODS}?resourceVersion=0"), &viewer).await;
    assert_eq!(list.status(), 200);
    let list: Value =
        serde_json::from_slice(&list.into_body().collect().await.expect("body").to_bytes())
            .expect("list json");
    let rv = list["metadata"]["resourceVersion"].as_str().expect("rv");
    let mut v = watch(
        &env,
        &c,
        &format!("{PODS}?watch=1&resourceVersion={rv}"),
        &viewer,
    )
    .await;
    until_stats(&env, "three subscribers", |s| s.subscribers == 3).await;
    assert_eq!(env.demo.proxy.watch_hub().stats().streams, 1);
    until_upstream_watches(&env, 1).await;

    create_pod(&env, "shared-1");
    let from_a = until_pod(&mut a, "shared-1").await;
    let from_b = until_pod(&mut b, "shared-1").await;
    let from_v = until_pod(&mut v, "shared-1").await;
    assert_eq!(from_a, from_b, "the same event bytes");
    assert_eq!(from_a, from_v, "the same event bytes");
    assert!(from_a.starts_with("{\"type\":\"ADDED\""), "{from_a}");
    assert_eq!(env.demo.sim.open_watches("pods"), 1);
    let metrics = breakwater::admin::render_metrics();
    assert!(
        metrics.contains("breakwater_watch_sar_total{result=\"allowed\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_identity_gets_the_apiservers_403_and_never_sees_a_shared_event() {
    let env = demo_env().await;
    let alpha = service_account(&env, "alpha", true);
    let nobody = service_account(&env, "nobody", false);
    let c = client(&env);
    let mut a = watch(&env, &c, &format!("{PODS}?watch=1"), &alpha).await;
    until_stats(&env, "alpha subscribed", |s| s.subscribers == 1).await;
    for pq in [
        format!("{PODS}?watch=1"),
        format!("{PODS}?watch=1&resourceVersion=0"),
        format!("{PODS}?watch=1&fieldSelector=spec.nodeName%3Dnode-1"),
        format!("{PODS}?resourceVersion=0"),
    ] {
        let resp = send(&env, &c, &pq, &nobody).await;
        assert_eq!(resp.status(), 403, "{pq}");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let status: Value = serde_json::from_slice(&body).expect("Status json");
        assert_eq!(status["kind"], "Status", "{status}");
        assert_eq!(status["reason"], "Forbidden", "{status}");
        let message = status["message"].as_str().expect("message");
        assert!(
            message.contains("User \"system:serviceaccount:demo:nobody\" cannot"),
            "the apiserver's own words: {message}"
        );
    }
    // Nobody joined: alpha is still alone on the one stream. The stream
    // nobody's own selector started was refused upstream; its task ends
    // (and is counted out) just after the 403 it handed over, so wait for
    // that. A subscriber nobody had added would keep the count at 2.
    until_stats(&env, "alpha alone on one stream", |s| {
        (s.streams, s.subscribers) == (1, 1)
    })
    .await;
    create_pod(&env, "secret-ish");
    until_pod(&mut a, "secret-ish").await;
    assert_eq!(env.demo.proxy.watch_hub().stats().subscribers, 1);
    let metrics = breakwater::admin::render_metrics();
    assert!(
        metrics.contains("breakwater_watch_sar_total{result=\"denied\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reviews_are_cached_one_per_identity_and_verb() {
    let env = demo_env().await;
    let alpha = service_account(&env, "alpha", true);
    let beta = service_account(&env, "beta", true);
    let c = client(&env);
    let before = reviews(&env);
    let mut open = Vec::new();
    for _ in 0..5 {
        open.push(watch(&env, &c, &format!("{PODS}?watch=1"), &alpha).await);
    }
    for _ in 0..3 {
        let resp = send(&env, &c, &format!("{PODS}?resourceVersion=0"), &alpha).await;
        assert_eq!(resp.status(), 200);
    }
    // alpha: watch (to join) and list (to lend its credentials) — two.
    assert_eq!(reviews(&env) - before, 2);
    // Concurrent joins of a new identity share their reviews too.
    let joins = (0..10).map(|_| watch(&env, &c, "/api/v1/namespaces/demo/pods?watch=1", &beta));
    open.extend(futures_util::future::join_all(joins).await);
    assert_eq!(reviews(&env) - before, 4);
    until_stats(&env, "fifteen subscribers", |s| s.subscribers == 15).await;
    assert_eq!(env.demo.proxy.watch_hub().stats().streams, 1);
    assert_eq!(env.demo.sim.open_watches("pods"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_donor_is_asked_again_when_its_stream_is_refused() {
    let env = demo_env().await;
    let alpha = service_account(&env, "alpha", true);
    let beta = service_account(&env, "beta", true);
    let c = client(&env);
    let mut a = watch(&env, &c, &format!("{PODS}?watch=1"), &alpha).await;
    until_stats(&env, "alpha subscribed", |s| s.subscribers == 1).await;
    // beta joins last, so the stream now speaks with beta's credentials.
    let mut b = watch(&env, &c, &format!("{PODS}?watch=1"), &beta).await;
    until_stats(&env, "beta subscribed", |s| s.subscribers == 2).await;
    revoke(&env, "beta");
    // The re-watch carries beta's identity: kube-sim refuses it, the
    // stream fails and its subscribers' watches end.
    env.demo.sim.store().close_watches();
    for lines in [&mut a, &mut b] {
        for _ in 0..100 {
            if lines.next_within(WAIT).await.is_none() {
                break;
            }
        }
    }
    until_stats(&env, "the stream is gone", |s| s.streams == 0).await;
    // alpha comes back first and starts a new stream with its own
    // credentials; beta, asked again, is refused by the apiserver itself.
    let mut a = watch(&env, &c, &format!("{PODS}?watch=1"), &alpha).await;
    let resp = send(&env, &c, &format!("{PODS}?watch=1"), &beta).await;
    assert_eq!(resp.status(), 403);
    create_pod(&env, "after-revocation");
    until_pod(&mut a, "after-revocation").await;
    let stats = env.demo.proxy.watch_hub().stats();
    assert_eq!((stats.streams, stats.subscribers), (1, 1), "{stats:?}");
}
