//! The watch hub on a custom resource: issue #6 says it serves every
//! resource the apiserver serves, CRDs included, with no built-in list of
//! types. kube-sim serves a CRD's types once the CRD exists; these tests put
//! the proxy in front of such a type and compare what clients get through
//! the hub with what kube-sim sends to a direct watch.

mod common;

use std::sync::Arc;

use breakwater_loadtest::sim::resources::{self, ResourceType};
use http_body_util::BodyExt;
use serde_json::{Value, json};

use common::{Env, WAIT, clients, demo_env, get, take, until_stats};

const NS: &str = "crd1";
const WATCHERS: usize = 50;

fn core(plural: &str) -> &'static ResourceType {
    resources::find("", "v1", plural).expect("known type")
}

/// Creates namespace `NS` and the `widgets.example.com` CRD (v1 storage,
/// v1beta1 served too) in kube-sim; returns the v1 Widget type.
fn install_widgets(env: &Env) -> &'static ResourceType {
    let store = env.demo.sim.store();
    store
        .create(
            core("namespaces"),
            None,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
        )
        .expect("namespace");
    let schema = json!({"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}});
    let crds = resources::find("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        .expect("kube-sim serves CRDs");
    let crd = store
        .create(
            crds,
            None,
            json!({
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {"name": "widgets.example.com"},
                "spec": {
                    "group": "example.com",
                    "scope": "Namespaced",
                    "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                    "versions": [
                        {"name": "v1", "served": true, "storage": true, "schema": schema,
                         "subresources": {"status": {}}},
                        {"name": "v1beta1", "served": true, "storage": false, "schema": schema},
                    ],
                },
            }),
        )
        .expect("create CRD");
    assert_eq!(crd["status"]["conditions"][1]["type"], "Established");
    assert_eq!(crd["status"]["conditions"][1]["status"], "True");
    store
        .find("example.com", "v1", "widgets")
        .expect("the CRD's type is served")
}

fn widget(name: &str, color: &str, size: u64) -> Value {
    json!({"apiVersion": "example.com/v1", "kind": "Widget",
           "metadata": {"name": name, "labels": {"color": color}},
           "spec": {"size": size}})
}

fn kinds_and_names(events: &[Value]) -> Vec<(&str, &str)> {
    events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default(),
                e["object"]["metadata"]["name"].as_str().unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_widget_watches_share_one_upstream_watch_and_see_what_a_direct_watch_sees() {
    let env = demo_env().await;
    let widgets = install_widgets(&env);
    let store = env.demo.sim.store();
    for (name, color, size) in [("w1", "blue", 1), ("w2", "red", 2)] {
        store
            .create(widgets, Some(NS), widget(name, color, size))
            .expect("create widget");
    }
    let c = Arc::new(clients(&env));
    let pq = format!("/apis/example.com/v1/namespaces/{NS}/widgets?watch=true");

    let mut tasks = Vec::new();
    for _ in 0..WATCHERS {
        let (c, pq) = (c.clone(), pq.clone());
        tasks.push(tokio::spawn(async move { c.watch(&pq).await }));
    }
    let mut watchers = Vec::new();
    for t in tasks {
        watchers.push(t.await.expect("join"));
    }
    until_stats(&env, "50 subscribers", |s| s.subscribers == WATCHERS as u64).await;
    assert_eq!(env.demo.proxy.watch_hub().stats().streams, 1);
    assert_eq!(
        env.demo.sim.open_watches("widgets"),
        1,
        "one upstream WATCH for 50 clients"
    );

    // Nothing was written since the shared stream listed, so a direct watch
    // opened now starts at the same resourceVersion as every client.
    let mut direct = c.direct_watch(&pq).await;
    assert_eq!(env.demo.sim.open_watches("widgets"), 2);

    store
        .create(widgets, Some(NS), widget("w3", "blue", 3))
        .expect("create");
    store
        .update(widgets, Some(NS), "w2", widget("w2", "red", 20))
        .expect("update");
    store
        .patch(
            widgets,
            Some(NS),
            "w3",
            &json!({"status": {"ready": true}}),
            breakwater_loadtest::sim::store::PatchKind::Merge,
        )
        .expect("patch");
    store.delete(widgets, Some(NS), "w1").expect("delete");
    // Written through the other served version: clients of v1 see it as v1.
    let beta = store
        .find("example.com", "v1beta1", "widgets")
        .expect("v1beta1 served");
    let mut w4 = widget("w4", "green", 4);
    w4["apiVersion"] = json!("example.com/v1beta1");
    store
        .create(beta, Some(NS), w4)
        .expect("create via v1beta1");

    let want = take(&mut direct, 7).await;
    assert_eq!(
        kinds_and_names(&want),
        [
            ("ADDED", "w1"),
            ("ADDED", "w2"),
            ("ADDED", "w3"),
            ("MODIFIED", "w2"),
            ("MODIFIED", "w3"),
            ("DELETED", "w1"),
            ("ADDED", "w4"),
        ]
    );
    assert!(
        want.iter()
            .all(|e| e["object"]["apiVersion"] == "example.com/v1"),
        "{want:?}"
    );
    let mut handles = Vec::new();
    for (i, mut w) in watchers.into_iter().enumerate() {
        let want = want.clone();
        handles.push(tokio::spawn(async move {
            let got = take(&mut w, 7).await;
            assert_eq!(got, want, "client {i}: the exact events of a direct watch");
            w
        }));
    }
    let mut watchers = Vec::new();
    for h in handles {
        watchers.push(h.await.expect("client saw the direct watch's events"));
    }
    assert_eq!(env.demo.sim.open_watches("widgets"), 2);

    // LIST rv=0 through the proxy: from the hub's cache, no upstream LIST,
    // and the same items kube-sim holds.
    let lists = env.demo.sim.request_count("LIST", "widgets");
    let list_pq = format!("/apis/example.com/v1/namespaces/{NS}/widgets?resourceVersion=0");
    let cached = c.get_json(&list_pq).await;
    assert_eq!(
        env.demo.sim.request_count("LIST", "widgets"),
        lists,
        "answered by the hub"
    );
    let blue = c
        .get_json_from(
            &c.proxy,
            &c.proxy_url,
            &format!("{list_pq}&labelSelector=color%3Dblue"),
        )
        .await;
    assert_eq!(env.demo.sim.request_count("LIST", "widgets"), lists);
    let truth = c
        .get_json_from(
            &c.direct,
            &c.sim_url,
            &format!("/apis/example.com/v1/namespaces/{NS}/widgets"),
        )
        .await;
    assert_eq!(cached["kind"], "WidgetList");
    assert_eq!(cached["apiVersion"], "example.com/v1");
    assert_eq!(cached["items"], truth["items"]);
    let blue_names: Vec<&str> = blue["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["metadata"]["name"].as_str().expect("name"))
        .collect();
    assert_eq!(blue_names, ["w3"]);
    drop(watchers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_crd_ends_proxied_watches_like_direct_ones_and_new_ones_get_404() {
    let env = demo_env().await;
    let widgets = install_widgets(&env);
    let store = env.demo.sim.store();
    for name in ["w1", "w2"] {
        store
            .create(widgets, Some(NS), widget(name, "blue", 1))
            .expect("create widget");
    }
    let c = clients(&env);
    let pq = format!("/apis/example.com/v1/namespaces/{NS}/widgets?watch=true");
    let mut proxied = [c.watch(&pq).await, c.watch(&pq).await];
    until_stats(&env, "2 subscribers", |s| s.subscribers == 2).await;
    let mut direct = c.direct_watch(&pq).await;
    assert_eq!(env.demo.sim.open_watches("widgets"), 2);

    let crds = resources::find("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        .expect("kube-sim serves CRDs");
    store
        .delete(crds, None, "widgets.example.com")
        .expect("delete the CRD");
    // The objects go first (DELETED each), then the type and its watches.
    let want = take(&mut direct, 4).await;
    assert_eq!(
        kinds_and_names(&want),
        [
            ("ADDED", "w1"),
            ("ADDED", "w2"),
            ("DELETED", "w1"),
            ("DELETED", "w2"),
        ]
    );
    assert!(
        direct.next_within(WAIT).await.is_none(),
        "direct watch ends"
    );
    for w in &mut proxied {
        assert_eq!(take(w, 4).await, want);
        assert!(w.next_within(WAIT).await.is_none(), "proxied watch ends");
    }
    until_stats(&env, "stream closed", |s| {
        s.streams == 0 && s.subscribers == 0
    })
    .await;
    assert_eq!(env.demo.sim.open_watches("widgets"), 0);

    // The type is gone: a new watch through the proxy gets kube-sim's 404.
    let resp = tokio::time::timeout(
        WAIT,
        c.proxy
            .request(get(&format!("{}{pq}", c.proxy_url), &c.token)),
    )
    .await
    .expect("answered in time")
    .expect("request");
    assert_eq!(resp.status(), 404);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let status: Value = serde_json::from_slice(&body).expect("Status JSON");
    assert_eq!(status["reason"], "NotFound");
}

/// Custom resources have no protobuf: a protobuf-first client (client-go's
/// default for generated clients of built-in types, and kubelet's) gets
/// JSON from the apiserver, and from the hub too. Once the hub has seen the
/// apiserver answer JSON for the collection, its JSON and protobuf-first
/// clients share one stream, whichever came first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_first_clients_of_a_custom_resource_get_json_from_the_json_stream() {
    let env = demo_env().await;
    let widgets = install_widgets(&env);
    let store = env.demo.sim.store();
    store
        .create(widgets, Some(NS), widget("w1", "blue", 1))
        .expect("create widget");
    let c = clients(&env);
    let pq = format!("/apis/example.com/v1/namespaces/{NS}/widgets?watch=true");
    let protobuf_first = || async {
        let req = http::Request::get(format!("{}{pq}", c.proxy_url))
            .header("authorization", format!("Bearer {}", c.token))
            .header(
                "accept",
                "application/vnd.kubernetes.protobuf, application/json",
            )
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        let resp = c.proxy.request(req).await.expect("answered");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/json");
        common::Lines::new(resp.into_body())
    };
    let mut first = protobuf_first().await;
    let mut json = c.watch(&pq).await;
    let mut later = Vec::new();
    for _ in 0..10 {
        later.push(protobuf_first().await);
    }
    until_stats(&env, "12 subscribers", |s| s.subscribers == 12).await;
    assert_eq!(
        env.demo.sim.open_watches("widgets"),
        1,
        "one upstream watch for JSON and protobuf-first clients of a custom resource"
    );
    assert_eq!(env.demo.proxy.watch_hub().stats().streams, 1);
    store
        .create(widgets, Some(NS), widget("w2", "red", 2))
        .expect("create widget");
    for w in std::iter::once(&mut first)
        .chain(std::iter::once(&mut json))
        .chain(later.iter_mut())
    {
        let got = take(w, 2).await;
        assert_eq!(kinds_and_names(&got), [("ADDED", "w1"), ("ADDED", "w2")]);
    }
}
