//! Protobuf clients of the watch hub, end to end, as client-go's are
//! (kubelet, kube-proxy: `Accept: application/vnd.kubernetes.protobuf,
//! application/json`). What they receive is decoded with `k8s-pb`'s
//! generated types — independently of the hub's own codec — and compared
//! with what the same requests get straight from kube-sim.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use breakwater_loadtest::sim::resources::{self, ResourceType};
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use k8s_pb::api::core::v1::{Pod, PodList};
use k8s_pb::apimachinery::pkg::apis::meta::v1::{Status, WatchEvent};
use k8s_pb::apimachinery::pkg::runtime::Unknown;
use prost::Message;
use serde_json::json;

use common::{Clients, Env, HttpsClient, WAIT, clients, demo_env, until_stats};

const ACCEPT: &str = "application/vnd.kubernetes.protobuf, application/json";
const PODS: &str = "/api/v1/namespaces/demo/pods";
const NODES: usize = 20;
const PER_NODE: usize = 10;

fn pods() -> &'static ResourceType {
    resources::find("", "v1", "pods").expect("known type")
}

fn pod(name: &str, node: Option<&str>, app: &str) -> serde_json::Value {
    let mut spec = json!({"containers": [{"name": "c", "image": "busybox"}]});
    if let Some(n) = node {
        spec["nodeName"] = json!(n);
    }
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "demo", "labels": {"app": app}},
           "spec": spec})
}

/// A protobuf request with the demo's token.
async fn request(
    c: &Clients,
    client: &HttpsClient,
    base: &str,
    pq: &str,
) -> http::Response<Incoming> {
    let req = http::Request::get(format!("{base}{pq}"))
        .header("authorization", format!("Bearer {}", c.token))
        .header("accept", ACCEPT)
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    tokio::time::timeout(WAIT, client.request(req))
        .await
        .expect("answered in time")
        .expect("request")
}

/// Takes the `k8s\0` envelope off: (kind, the object's message).
fn unwrap(enveloped: &[u8]) -> (String, Vec<u8>) {
    let body = enveloped.strip_prefix(b"k8s\0").expect("the k8s envelope");
    let u = Unknown::decode(body).expect("runtime.Unknown");
    (
        u.type_meta.and_then(|t| t.kind).unwrap_or_default(),
        u.raw.unwrap_or_default(),
    )
}

/// One decoded event: (type, namespace/name or the Status reason, RV, code).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ev {
    ty: String,
    key: String,
    rv: String,
    code: i32,
}

/// Length-prefixed protobuf watch frames off a streaming body.
struct Frames {
    body: Incoming,
    buf: BytesMut,
}

impl Frames {
    async fn open(c: &Clients, client: &HttpsClient, base: &str, pq: &str) -> Frames {
        let resp = request(c, client, base, pq).await;
        assert_eq!(resp.status(), 200, "{pq}");
        assert_eq!(
            resp.headers()["content-type"],
            "application/vnd.kubernetes.protobuf;stream=watch",
            "{pq}"
        );
        Frames {
            body: resp.into_body(),
            buf: BytesMut::new(),
        }
    }

    async fn next(&mut self) -> Option<Ev> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
                if self.buf.len() >= 4 + len {
                    self.buf.advance(4);
                    let frame = self.buf.split_to(len);
                    return Some(decode(&frame));
                }
            }
            match self.body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.extend_from_slice(&d);
                    }
                }
                Some(Err(e)) => panic!("stream broke: {e}"),
                None => {
                    assert!(self.buf.is_empty(), "stream ended mid-frame");
                    return None;
                }
            }
        }
    }

    async fn take(&mut self, n: usize) -> Vec<Ev> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let ev = tokio::time::timeout(WAIT, self.next())
                .await
                .expect("an event in time")
                .expect("an event, not the end");
            out.push(ev);
        }
        out
    }
}

fn decode(frame: &[u8]) -> Ev {
    let we = WatchEvent::decode(frame).expect("a WatchEvent");
    let ty = we.r#type.unwrap_or_default();
    let raw = we.object.and_then(|o| o.raw).expect("an object");
    let (kind, msg) = unwrap(&raw);
    if kind == "Status" {
        let s = Status::decode(&msg[..]).expect("a Status");
        return Ev {
            ty,
            key: s.reason.unwrap_or_default(),
            rv: String::new(),
            code: s.code.unwrap_or_default(),
        };
    }
    assert_eq!(kind, "Pod");
    let m = Pod::decode(&msg[..])
        .expect("a Pod")
        .metadata
        .unwrap_or_default();
    Ev {
        ty,
        key: format!(
            "{}/{}",
            m.namespace.unwrap_or_default(),
            m.name.unwrap_or_default()
        ),
        rv: m.resource_version.unwrap_or_default(),
        code: 0,
    }
}

async fn pod_list(
    c: &Clients,
    client: &HttpsClient,
    base: &str,
    pq: &str,
) -> (String, Vec<(String, String)>) {
    let resp = request(c, client, base, pq).await;
    assert_eq!(resp.status(), 200, "{pq}");
    assert_eq!(
        resp.headers()["content-type"],
        "application/vnd.kubernetes.protobuf",
        "{pq}"
    );
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let (kind, msg) = unwrap(&body);
    assert_eq!(kind, "PodList");
    let list = PodList::decode(&msg[..]).expect("a PodList");
    let items = list
        .items
        .into_iter()
        .map(|p| {
            let m = p.metadata.unwrap_or_default();
            (
                m.name.unwrap_or_default(),
                m.resource_version.unwrap_or_default(),
            )
        })
        .collect();
    (
        list.metadata
            .and_then(|m| m.resource_version)
            .unwrap_or_default(),
        items,
    )
}

fn node(i: usize) -> String {
    format!("pb-node-{i}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_scoped_protobuf_watches_get_what_the_apiserver_sends_at_the_cost_of_one() {
    let env = demo_env().await;
    let c = clients(&env);
    let watch = |i: usize| format!("{PODS}?watch=1&fieldSelector=spec.nodeName%3D{}", node(i));

    let mut proxied = Vec::new();
    for i in 0..NODES {
        for _ in 0..PER_NODE {
            proxied.push((i, Frames::open(&c, &c.proxy, &c.proxy_url, &watch(i)).await));
        }
    }
    until_stats(&env, "every protobuf watcher subscribed", |s| {
        s.subscribers >= (NODES * PER_NODE) as u64
    })
    .await;
    let upstream = env.demo.sim.open_watches("pods");
    assert!(
        upstream <= 2,
        "{} protobuf node watches cost {upstream} upstream pod watches",
        NODES * PER_NODE
    );
    let mut direct = Vec::new();
    for i in 0..NODES {
        for _ in 0..PER_NODE {
            direct.push((i, Frames::open(&c, &c.direct, &c.sim_url, &watch(i)).await));
        }
    }

    // Each node: a pod arrives, is relabelled, goes. An unbound pod is
    // bound to node 3 with pods/binding: it enters that node's watch as ADDED.
    let store = env.demo.sim.store();
    store
        .create(pods(), Some("demo"), pod("pb-unbound", None, "agent"))
        .expect("create");
    for i in 0..NODES {
        let name = format!("pb-pod-{i}");
        store
            .create(pods(), Some("demo"), pod(&name, Some(&node(i)), "agent"))
            .expect("create");
        store
            .patch(
                pods(),
                Some("demo"),
                &name,
                &json!({"metadata": {"labels": {"app": "web"}}}),
                breakwater_loadtest::sim::store::PatchKind::Merge,
            )
            .expect("relabel");
    }
    let binding = json!({"apiVersion": "v1", "kind": "Binding",
                         "metadata": {"name": "pb-unbound", "namespace": "demo"},
                         "target": {"apiVersion": "v1", "kind": "Node", "name": node(3)}});
    let file = env.dir.path().join("binding.json");
    std::fs::write(&file, binding.to_string()).expect("write binding");
    env.kubectl_ok(&[
        "create",
        "--raw",
        &format!("{PODS}/pb-unbound/binding"),
        "-f",
        file.to_str().expect("utf-8 path"),
    ])
    .await;
    for i in 0..NODES {
        store
            .delete(pods(), Some("demo"), &format!("pb-pod-{i}"))
            .expect("delete");
    }

    let expected = |i: usize| if i == 3 { 4 } else { 3 };
    let mut seen: BTreeMap<usize, Vec<Ev>> = BTreeMap::new();
    for (i, f) in &mut direct {
        let evs = f.take(expected(*i)).await;
        seen.entry(*i).or_insert(evs);
    }
    for (i, f) in &mut proxied {
        let evs = f.take(expected(*i)).await;
        assert_eq!(&evs, &seen[i], "node {i}: proxied vs direct");
    }
    let types: Vec<&str> = seen[&3].iter().map(|e| e.ty.as_str()).collect();
    assert_eq!(
        types,
        ["ADDED", "MODIFIED", "ADDED", "DELETED"],
        "{:?}",
        seen[&3]
    );
    assert_eq!(
        seen[&3][2].key, "demo/pb-unbound",
        "bound pod enters as ADDED"
    );
    assert!(
        env.demo.sim.open_watches("pods") <= 2 + (NODES * PER_NODE) as i64,
        "the direct watches are the only others"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_selectors_410_and_cached_lists_match_the_apiserver() {
    let env = demo_env().await;
    let c = clients(&env);
    let store = env.demo.sim.store();
    store
        .create(pods(), Some("demo"), pod("pl-1", Some("n1"), "pl-agent"))
        .expect("create");

    // LIST rv=0 from the hub's cache decodes to the upstream LIST's items.
    let mut label = Frames::open(
        &c,
        &c.proxy,
        &c.proxy_url,
        &format!("{PODS}?watch=1&labelSelector=app%3Dpl-agent"),
    )
    .await;
    let first = label.take(1).await;
    assert_eq!(
        (first[0].ty.as_str(), first[0].key.as_str()),
        ("ADDED", "demo/pl-1")
    );
    let (_, cached) = pod_list(
        &c,
        &c.proxy,
        &c.proxy_url,
        &format!("{PODS}?resourceVersion=0"),
    )
    .await;
    let (_, upstream) = pod_list(
        &c,
        &c.direct,
        &c.sim_url,
        &format!("{PODS}?resourceVersion=0"),
    )
    .await;
    let sorted = |mut v: Vec<(String, String)>| {
        v.sort();
        v
    };
    assert!(!cached.is_empty());
    assert_eq!(sorted(cached), sorted(upstream));

    // A relabelled pod leaves the label watch as DELETED.
    store
        .patch(
            pods(),
            Some("demo"),
            "pl-1",
            &json!({"metadata": {"labels": {"app": "web"}}}),
            breakwater_loadtest::sim::store::PatchKind::Merge,
        )
        .expect("relabel");
    let left = label.take(1).await;
    assert_eq!(
        (left[0].ty.as_str(), left[0].key.as_str()),
        ("DELETED", "demo/pl-1")
    );

    // A watch from an RV the cache no longer has gets 410 Expired, in protobuf.
    for _ in 0..5 {
        store
            .patch(
                pods(),
                Some("demo"),
                "pl-1",
                &json!({"metadata": {"annotations": {"x": rand_suffix()}}}),
                breakwater_loadtest::sim::store::PatchKind::Merge,
            )
            .expect("touch");
    }
    store.compact(pods());
    let mut old = Frames::open(
        &c,
        &c.proxy,
        &c.proxy_url,
        &format!("{PODS}?watch=1&resourceVersion=1"),
    )
    .await;
    let ev = old.take(1).await;
    assert_eq!(
        (ev[0].ty.as_str(), ev[0].key.as_str(), ev[0].code),
        ("ERROR", "Expired", 410)
    );
}

fn rand_suffix() -> String {
    format!("{:?}", std::time::Instant::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_protobuf_clients_of_one_collection_cost_two_upstream_watches() {
    let env: Env = demo_env().await;
    let c = clients(&env);
    let mut pb = Vec::new();
    let mut js = Vec::new();
    for _ in 0..10 {
        pb.push(Frames::open(&c, &c.proxy, &c.proxy_url, &format!("{PODS}?watch=1")).await);
        js.push(c.watch(&format!("{PODS}?watch=1")).await);
    }
    until_stats(&env, "20 subscribers", |s| s.subscribers >= 20).await;
    assert_eq!(env.demo.proxy.watch_hub().stats().streams, 2);
    // A stream is live after its LIST; its WATCH follows at once.
    for _ in 0..2000 {
        let open = env.demo.sim.open_watches("pods");
        assert!(open <= 2, "{open} upstream pod watches");
        if open == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(env.demo.sim.open_watches("pods"), 2);
    env.demo
        .sim
        .store()
        .create(pods(), Some("demo"), pod("mixed-1", Some("n1"), "x"))
        .expect("create");
    for f in &mut pb {
        loop {
            let ev = f.take(1).await.remove(0);
            if ev.key == "demo/mixed-1" {
                assert_eq!(ev.ty, "ADDED");
                break;
            }
        }
    }
    for l in &mut js {
        loop {
            let line = l.next_within(WAIT).await.expect("an event");
            let (ty, name, _) = common::event_summary(&line);
            if name == "mixed-1" {
                assert_eq!(ty, "ADDED");
                break;
            }
        }
    }
}
