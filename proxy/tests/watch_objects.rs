//! Every object the watch hub writes, read with a parser that refuses
//! duplicate keys: the initial ADDEDs of a watch (from the cache, i.e. from
//! LIST items), a watch from a recent resourceVersion (the ring), a
//! consistent watch, the ADDED and DELETED the hub makes when an object
//! enters or leaves a client's selector, its bookmarks and the upstream's,
//! and LISTs served from the cache — for a built-in type, whose LIST items
//! carry no kind/apiVersion, and for a custom resource, whose LIST items do.
//!
//! serde_json keeps the last of two equal keys without a word, so the
//! comparisons with kube-sim in the other watch tests cannot see a
//! duplicated `kind`; [`DupCheck`] can. Where kube-sim's bytes are the
//! apiserver's (its LIST items, its watch events), the hub's must be the
//! same bytes, not an equal re-encoding.

mod common;

use std::collections::HashSet;
use std::fmt;

use breakwater_loadtest::sim::resources::{self, ResourceType};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use common::{Clients, Env, Lines, WAIT, clients, demo_env, get, until_stats};

/// Any JSON value; an object with a repeated key (at any depth) is an error.
struct DupCheck;

impl<'de> Deserialize<'de> for DupCheck {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DupCheck)
    }
}

impl<'de> Visitor<'de> for DupCheck {
    type Value = DupCheck;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON without duplicate keys")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<DupCheck, A::Error> {
        let mut keys = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !keys.insert(key.clone()) {
                return Err(de::Error::custom(format!("duplicate key {key:?}")));
            }
            map.next_value::<DupCheck>()?;
        }
        Ok(DupCheck)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<DupCheck, A::Error> {
        while seq.next_element::<DupCheck>()?.is_some() {}
        Ok(DupCheck)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<DupCheck, E> {
        Ok(DupCheck)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<DupCheck, E> {
        Ok(DupCheck)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<DupCheck, E> {
        Ok(DupCheck)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<DupCheck, E> {
        Ok(DupCheck)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<DupCheck, E> {
        Ok(DupCheck)
    }
    fn visit_unit<E: de::Error>(self) -> Result<DupCheck, E> {
        Ok(DupCheck)
    }
}

/// `text` parsed, after checking it has no duplicate key.
fn strict(text: &[u8]) -> Value {
    if let Err(e) = serde_json::from_slice::<DupCheck>(text) {
        panic!("{e}: {}", String::from_utf8_lossy(text));
    }
    serde_json::from_slice(text).expect("json")
}

#[test]
fn dup_check_refuses_a_repeated_key_at_any_depth() {
    assert!(serde_json::from_str::<DupCheck>(r#"{"a":[{"b":1,"c":{"d":null}}],"e":"f"}"#).is_ok());
    for bad in [
        r#"{"kind":"Widget","apiVersion":"v1","kind":"Widget"}"#,
        r#"{"object":{"metadata":{"name":"a","name":"a"}}}"#,
        r#"[{"a":1},{"b":[{"c":1,"c":2}]}]"#,
    ] {
        assert!(serde_json::from_str::<DupCheck>(bad).is_err(), "{bad}");
    }
}

/// The collection under test and what the apiserver's objects of it carry.
struct Collection {
    rt: &'static ResourceType,
    ns: &'static str,
    kind: &'static str,
    api_version: &'static str,
    /// LIST items carry kind/apiVersion (custom resources) or not (built-in).
    typed_items: bool,
    /// An object named `name` in label group `group`.
    body: fn(&str, &str) -> Value,
}

impl Collection {
    fn path(&self) -> String {
        let prefix = if self.rt.group.is_empty() {
            "/api/v1".to_string()
        } else {
            format!("/apis/{}/{}", self.rt.group, self.rt.version)
        };
        format!("{prefix}/namespaces/{}/{}", self.ns, self.rt.plural)
    }

    /// One watch event line: no duplicate key; its object carries kind and
    /// apiVersion, as every watch event's object does.
    fn event(&self, line: &str) -> Value {
        let ev = strict(line.as_bytes());
        let object = ev["object"].as_object().expect("an object");
        assert_eq!(object.get("kind"), Some(&json!(self.kind)), "{line}");
        assert_eq!(
            object.get("apiVersion"),
            Some(&json!(self.api_version)),
            "{line}"
        );
        ev
    }

    /// A LIST body: no duplicate key; items with or without TypeMeta as
    /// the apiserver writes them. Returns the items' own bytes.
    fn list(&self, body: &[u8]) -> Vec<String> {
        let list = strict(body);
        assert_eq!(list["kind"], format!("{}List", self.kind));
        assert_eq!(list["apiVersion"], self.api_version);
        for item in list["items"].as_array().expect("items") {
            let item = item.as_object().expect("an object");
            if self.typed_items {
                assert_eq!(item.get("kind"), Some(&json!(self.kind)), "{item:?}");
                assert_eq!(
                    item.get("apiVersion"),
                    Some(&json!(self.api_version)),
                    "{item:?}"
                );
            } else {
                assert!(
                    !item.contains_key("kind") && !item.contains_key("apiVersion"),
                    "{item:?}"
                );
            }
        }
        #[derive(Deserialize)]
        struct Items<'a> {
            #[serde(borrow)]
            items: Vec<&'a RawValue>,
        }
        let items: Items<'_> = serde_json::from_slice(body).expect("a list");
        items.items.iter().map(|i| i.get().to_string()).collect()
    }

    fn create(&self, env: &Env, name: &str, group: &str) -> u64 {
        let obj = env
            .demo
            .sim
            .store()
            .create(self.rt, Some(self.ns), (self.body)(name, group))
            .expect("create");
        rv_of(&obj)
    }

    fn regroup(&self, env: &Env, name: &str, group: &str) {
        env.demo
            .sim
            .store()
            .update(self.rt, Some(self.ns), name, (self.body)(name, group))
            .expect("update");
    }
}

fn rv_of(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("rv")
}

fn core(plural: &str) -> &'static ResourceType {
    resources::find("", "v1", plural).expect("known type")
}

fn namespace(env: &Env, ns: &str) {
    env.demo
        .sim
        .store()
        .create(
            core("namespaces"),
            None,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        )
        .expect("namespace");
}

/// A GET's whole body.
async fn body(c: &Clients, proxy: bool, pq: &str) -> Vec<u8> {
    let (client, base) = if proxy {
        (&c.proxy, &c.proxy_url)
    } else {
        (&c.direct, &c.sim_url)
    };
    let resp = tokio::time::timeout(WAIT, client.request(get(&format!("{base}{pq}"), &c.token)))
        .await
        .expect("answered in time")
        .expect("request");
    assert_eq!(resp.status(), 200, "{pq}");
    resp.into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec()
}

/// The next `n` lines of a watch.
async fn lines(w: &mut Lines, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(w.next_within(WAIT).await.expect("an event, not the end"));
    }
    out
}

fn summary(events: &[Value]) -> Vec<(&str, &str)> {
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

/// Drives every path by which the hub writes an object, checking each.
async fn every_object_the_hub_writes_is_checked(env: &Env, col: &Collection) {
    let c = clients(env);
    let base = col.path();
    let plural = col.rt.plural;
    let sim = &env.demo.sim;
    // "a" and "b" will change; "keep" stays as the stream's LIST had it.
    col.create(env, "a", "one");
    col.create(env, "b", "two");
    col.create(env, "keep", "two");

    // The stream starts (LIST rv=0); the first watches' ADDEDs come from
    // the cache, that is from the LIST's items.
    let mut all = c
        .watch(&format!(
            "{base}?watch=1&resourceVersion=0&allowWatchBookmarks=true"
        ))
        .await;
    let mut one = c
        .watch(&format!(
            "{base}?watch=1&resourceVersion=0&labelSelector=group%3Done"
        ))
        .await;
    until_stats(env, "two subscribers", |s| s.subscribers == 2).await;
    let initial: Vec<Value> = lines(&mut all, 3)
        .await
        .iter()
        .map(|l| col.event(l))
        .collect();
    assert_eq!(
        summary(&initial),
        [("ADDED", "a"), ("ADDED", "b"), ("ADDED", "keep")]
    );
    let initial: Vec<Value> = lines(&mut one, 1)
        .await
        .iter()
        .map(|l| col.event(l))
        .collect();
    assert_eq!(summary(&initial), [("ADDED", "a")]);

    // LIST rv=0 from the cache: the items kube-sim lists, byte for byte.
    let lists = sim.request_count("LIST", plural);
    let cached = col.list(&body(&c, true, &format!("{base}?resourceVersion=0")).await);
    assert_eq!(
        sim.request_count("LIST", plural),
        lists,
        "served by the hub"
    );
    let direct = col.list(&body(&c, false, &base).await);
    assert_eq!(cached, direct);

    // Changes: the hub passes the upstream events on, and makes its own
    // for the selector's client (a leaves: DELETED at the new RV; b enters:
    // ADDED).
    let from = col.create(env, "c", "one");
    col.regroup(env, "a", "two");
    col.regroup(env, "b", "one");
    env.demo
        .sim
        .store()
        .delete(col.rt, Some(col.ns), "c")
        .expect("delete");
    let changes: Vec<Value> = lines(&mut all, 4)
        .await
        .iter()
        .map(|l| col.event(l))
        .collect();
    assert_eq!(
        summary(&changes),
        [
            ("ADDED", "c"),
            ("MODIFIED", "a"),
            ("MODIFIED", "b"),
            ("DELETED", "c")
        ]
    );
    let selected: Vec<Value> = lines(&mut one, 4)
        .await
        .iter()
        .map(|l| col.event(l))
        .collect();
    assert_eq!(
        summary(&selected),
        [
            ("ADDED", "c"),
            ("DELETED", "a"),
            ("ADDED", "b"),
            ("DELETED", "c")
        ]
    );
    // The DELETED the hub made is the old object at the change's RV.
    assert_eq!(
        selected[1]["object"]["metadata"]["resourceVersion"],
        changes[1]["object"]["metadata"]["resourceVersion"]
    );
    assert_eq!(selected[1]["object"]["metadata"]["labels"]["group"], "one");

    // A watch from a recent RV (the ring): the upstream's lines as they came.
    let pq = format!("{base}?watch=1&resourceVersion={from}");
    let mut replay = c.watch(&pq).await;
    let mut direct_replay = c.direct_watch(&pq).await;
    let (got, want) = (
        lines(&mut replay, 3).await,
        lines(&mut direct_replay, 3).await,
    );
    for l in &got {
        col.event(l);
    }
    assert_eq!(got, want);
    drop(direct_replay);

    // A consistent watch (rv unset): the cache after the changes, objects
    // from the LIST and from watch events alike.
    let mut unset = c.watch(&format!("{base}?watch=1")).await;
    let snapshot: Vec<Value> = lines(&mut unset, 3)
        .await
        .iter()
        .map(|l| col.event(l))
        .collect();
    assert_eq!(
        summary(&snapshot),
        [("ADDED", "a"), ("ADDED", "b"), ("ADDED", "keep")]
    );
    // Initial events with their end bookmark (the hub's own bookmark).
    let mut streaming = c
        .watch(&format!(
            "{base}?watch=1&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan"
        ))
        .await;
    let events: Vec<Value> = lines(&mut streaming, 4)
        .await
        .iter()
        .map(|l| col.event(l))
        .collect();
    assert_eq!(events[3]["type"], "BOOKMARK");
    assert_eq!(
        events[3]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    // The upstream's bookmark, passed on (after a change elsewhere, so it
    // is past the stream's RV).
    env.demo
        .sim
        .store()
        .create(
            core("configmaps"),
            Some(col.ns),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "elsewhere"}}),
        )
        .expect("configmap");
    env.demo.sim.store().send_bookmarks();
    let bookmark = col.event(&lines(&mut all, 1).await[0]);
    assert_eq!(bookmark["type"], "BOOKMARK");
    // The hub's bookmark before a client's timeout, then the end.
    let mut short = c
        .watch(&format!(
            "{base}?watch=1&resourceVersion=0&timeoutSeconds=3&allowWatchBookmarks=true"
        ))
        .await;
    let events: Vec<Value> = lines(&mut short, 4)
        .await
        .iter()
        .map(|l| col.event(l))
        .collect();
    assert_eq!(events[3]["type"], "BOOKMARK");
    assert!(short.next_within(WAIT).await.is_none(), "clean end");
    // Every watch above is served by the hub: all, one, replay, unset,
    // streaming (and short, which ended).
    until_stats(env, "five subscribers", |s| s.subscribers == 5).await;

    // LIST rv=0 again, now of objects from the LIST and from watch events.
    let lists = sim.request_count("LIST", plural);
    let cached = col.list(&body(&c, true, &format!("{base}?resourceVersion=0")).await);
    assert_eq!(
        sim.request_count("LIST", plural),
        lists,
        "served by the hub"
    );
    let direct = col.list(&body(&c, false, &base).await);
    assert_eq!(cached.len(), 3);
    assert_eq!(cached, direct);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_through_the_hub_have_no_duplicate_keys_and_list_without_type_meta() {
    let env = demo_env().await;
    namespace(&env, "obj1");
    let pods = Collection {
        rt: core("pods"),
        ns: "obj1",
        kind: "Pod",
        api_version: "v1",
        typed_items: false,
        body: |name, group| {
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "labels": {"group": group}},
                   "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "busybox"}]}})
        },
    };
    every_object_the_hub_writes_is_checked(&env, &pods).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widgets_through_the_hub_have_no_duplicate_keys_and_list_with_type_meta() {
    let env = demo_env().await;
    namespace(&env, "obj2");
    let schema = json!({"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}});
    let crds = resources::find("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        .expect("kube-sim serves CRDs");
    let store = env.demo.sim.store();
    store
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
                    "versions": [{"name": "v1", "served": true, "storage": true, "schema": schema}],
                },
            }),
        )
        .expect("create CRD");
    let widgets = Collection {
        rt: store
            .find("example.com", "v1", "widgets")
            .expect("the CRD's type is served"),
        ns: "obj2",
        kind: "Widget",
        api_version: "example.com/v1",
        typed_items: true,
        body: |name, group| {
            json!({"apiVersion": "example.com/v1", "kind": "Widget",
                   "metadata": {"name": name, "labels": {"group": group}},
                   "spec": {"size": 1.5, "parts": [{"kind": "bolt"}]}})
        },
    };
    every_object_the_hub_writes_is_checked(&env, &widgets).await;
}
