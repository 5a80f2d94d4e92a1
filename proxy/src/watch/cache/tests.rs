//! The cache and ring without a network: what a client gets for each RV.

use super::*;
use crate::watch::filter::selectable_fields;
use serde_json::{Value, json};

const PODS: (&str, &str) = ("", "pods");

fn pod(name: &str, rv: u64, app: &str) -> Value {
    pod_in("d", name, rv, app)
}

fn pod_in(ns: &str, name: &str, rv: u64, app: &str) -> Value {
    json!({"kind": "Pod", "apiVersion": "v1",
           "metadata": {"name": name, "namespace": ns, "resourceVersion": rv.to_string(),
                        "labels": {"app": app}},
           "spec": {"nodeName": "n1"}})
}

fn read(obj: &Value) -> (Meta, Bytes) {
    let bytes = Bytes::from(serde_json::to_vec(obj).expect("json"));
    let read = Codec::Json
        .read(&bytes, selectable_fields(PODS.0, PODS.1))
        .expect("an object");
    (read.meta, bytes)
}

fn cache(ring: usize, rv: u64, objs: &[Value]) -> Cache {
    let mut c = Cache::new(Codec::Json, ring);
    install(&mut c, rv, objs);
    c
}

/// A LIST of `objs` at `rv` replaces what `c` holds.
fn install(c: &mut Cache, rv: u64, objs: &[Value]) {
    c.install(Listed {
        codec: Codec::Json,
        rv,
        kind: "Pod".into(),
        api_version: "v1".into(),
        items: objs.iter().map(read).collect(),
        type_meta: TypeMetaSeen::Uniform(false),
    });
}

fn apply(c: &mut Cache, ty: EventType, obj: &Value) -> Option<Arc<Change>> {
    let (meta, object) = read(obj);
    let frame = Codec::Json.event(ty, &object);
    c.apply(ty, meta, object, frame)
}

fn sel(label: &str) -> Selector {
    Selector::parse(Some(label), None, selectable_fields(PODS.0, PODS.1)).expect("a selector")
}

fn everything() -> Selector {
    Selector::parse(None, None, &[]).expect("everything")
}

/// (type, name, resourceVersion) of each frame.
fn events(frames: &[Bytes]) -> Vec<(String, String, String)> {
    frames
        .iter()
        .map(|f| {
            let v: Value = serde_json::from_slice(f).expect("an event");
            (
                v["type"].as_str().unwrap_or_default().to_string(),
                v["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                v["object"]["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

fn ev(t: &str, name: &str, rv: u64) -> (String, String, String) {
    (t.into(), name.into(), rv.to_string())
}

#[test]
fn a_snapshot_is_the_selected_objects_in_storage_key_order() {
    let c = cache(
        8,
        10,
        &[
            pod_in("b", "p", 3, "x"),
            pod_in("a", "p", 4, "y"),
            pod_in("a-b", "p", 5, "x"),
        ],
    );
    assert_eq!(c.size().0, 3);
    let namespaces = |frames: Vec<Bytes>| -> Vec<(String, String)> {
        frames
            .iter()
            .map(|f| {
                let v: Value = serde_json::from_slice(f).expect("an event");
                let m = &v["object"]["metadata"];
                (
                    m["namespace"].as_str().unwrap_or_default().to_string(),
                    m["resourceVersion"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect()
    };
    let ns = |n: &str, rv: u64| (n.to_string(), rv.to_string());
    assert_eq!(
        namespaces(c.snapshot_frames(&everything())),
        vec![ns("a-b", 5), ns("a", 4), ns("b", 3)],
        "a-b/p sorts before a/p, as etcd's keys do"
    );
    assert_eq!(
        namespaces(c.snapshot_frames(&sel("app=x"))),
        vec![ns("a-b", 5), ns("b", 3)]
    );
}

#[test]
fn changes_apply_once_and_replay_after_the_asked_rv() {
    let mut c = cache(8, 10, &[pod("a", 4, "x")]);
    assert!(apply(&mut c, EventType::Modified, &pod("a", 11, "x")).is_some());
    assert!(apply(&mut c, EventType::Added, &pod("b", 12, "x")).is_some());
    assert!(
        apply(&mut c, EventType::Added, &pod("b", 12, "x")).is_none(),
        "a re-watch overlapping what was seen applies nothing"
    );
    assert!(apply(&mut c, EventType::Deleted, &pod("a", 13, "x")).is_some());
    assert_eq!(c.rv, 13);
    assert_eq!(c.size().0, 1);
    assert_eq!(c.since(10), Since::Ring);
    assert_eq!(
        events(&c.replay(11, &everything())),
        vec![ev("ADDED", "b", 12), ev("DELETED", "a", 13)]
    );
    assert!(c.replay(13, &everything()).is_empty());
}

#[test]
fn selector_transitions_enter_as_added_and_leave_as_deleted_at_the_change() {
    let mut c = cache(8, 10, &[pod("a", 4, "x")]);
    apply(&mut c, EventType::Modified, &pod("a", 11, "y"));
    apply(&mut c, EventType::Modified, &pod("a", 12, "x"));
    apply(&mut c, EventType::Modified, &pod("a", 13, "x"));
    apply(&mut c, EventType::Modified, &pod("a", 14, "z"));
    let frames = c.replay(10, &sel("app=x"));
    assert_eq!(
        events(&frames),
        vec![
            ev("DELETED", "a", 11),
            ev("ADDED", "a", 12),
            ev("MODIFIED", "a", 13),
            ev("DELETED", "a", 14),
        ],
        "the old object, at the resourceVersion of the change that moved it out"
    );
    let left: Value = serde_json::from_slice(&frames[0]).expect("json");
    assert_eq!(
        left["object"]["metadata"]["labels"]["app"], "x",
        "the old object"
    );
    assert!(c.replay(10, &sel("app=nothing")).is_empty());
}

#[test]
fn a_deletion_of_an_object_never_cached_is_judged_on_itself() {
    let mut c = cache(8, 10, &[]);
    apply(&mut c, EventType::Deleted, &pod("ghost", 11, "x"));
    assert_eq!(
        events(&c.replay(10, &sel("app=x"))),
        vec![ev("DELETED", "ghost", 11)]
    );
    assert!(c.replay(10, &sel("app=y")).is_empty());
    assert_eq!(c.size(), (0, 0));
}

#[test]
fn the_ring_wraps_and_its_floor_follows() {
    let mut c = cache(3, 10, &[]);
    for rv in 11..=15 {
        apply(&mut c, EventType::Added, &pod(&format!("p{rv}"), rv, "x"));
    }
    // Kept: 13, 14, 15. Every change after 12 is in the ring.
    assert_eq!(c.since(12), Since::Ring);
    assert_eq!(c.since(11), Since::Predates { floor: 12 });
    assert_eq!(events(&c.replay(12, &everything())).len(), 3);
    assert_eq!(c.gap_below(11), Some(12));
    c.extend_floor(11, 99);
    assert_eq!(
        c.since(11),
        Since::Predates { floor: 12 },
        "a stale floor changes nothing"
    );
    c.extend_floor(11, 12);
    assert_eq!(
        c.since(11),
        Since::Ring,
        "a confirmed-empty gap joins the ring"
    );
}

#[test]
fn rvs_at_or_below_a_410_are_expired_and_a_relist_restarts_the_ring() {
    let mut c = cache(8, 10, &[pod("a", 4, "x")]);
    apply(&mut c, EventType::Modified, &pod("a", 11, "x"));
    c.expire();
    assert_eq!(c.since(11), Since::Expired { oldest: 10 });
    assert_eq!(c.since(5), Since::Expired { oldest: 10 });
    assert_eq!(
        c.gap_below(5),
        None,
        "no probe for what the apiserver said is gone"
    );
    c.install(Listed {
        codec: Codec::Json,
        rv: 20,
        kind: "Pod".into(),
        api_version: "v1".into(),
        items: vec![read(&pod("a", 19, "x"))],
        type_meta: TypeMetaSeen::NoItems,
    });
    assert_eq!(c.since(20), Since::Ring);
    assert_eq!(
        c.since(15),
        Since::Predates { floor: 20 },
        "between the 410 and the relist"
    );
    assert_eq!(c.since(11), Since::Expired { oldest: 20 });
    assert_eq!(
        c.item_type_meta,
        Some(false),
        "a LIST without items tells nothing new"
    );
}

#[test]
fn bookmarks_move_the_rv_forward_only_and_carry_the_position() {
    let mut c = cache(8, 10, &[]);
    assert!(c.bookmark(15));
    assert!(!c.bookmark(12));
    assert_eq!(c.rv, 15);
    c.fresh = 30;
    let bm: Value = serde_json::from_slice(&c.bookmark_frame(true)).expect("json");
    assert_eq!(bm["type"], "BOOKMARK");
    assert_eq!(bm["object"]["kind"], "Pod");
    assert_eq!(bm["object"]["metadata"]["resourceVersion"], "30");
    assert!(
        apply(&mut c, EventType::Added, &pod("late", 14, "x")).is_none(),
        "an event at or below a bookmark was already covered"
    );
}

#[test]
fn a_stream_records_item_type_meta_only_from_items_that_agree() {
    let (with, without) = (
        TypeMeta {
            kind: true,
            api_version: true,
        },
        TypeMeta::default(),
    );
    let seen = |items: &[TypeMeta]| {
        let mut s = TypeMetaSeen::default();
        for t in items {
            s.saw(*t);
        }
        s
    };
    assert_eq!(seen(&[with, with]).record(None), Some(true));
    assert_eq!(seen(&[without]).record(Some(true)), Some(false));
    assert_eq!(
        seen(&[]).record(Some(true)),
        Some(true),
        "no items: as before"
    );
    assert_eq!(seen(&[with, without]).record(Some(true)), None);
    let half = TypeMeta {
        kind: true,
        api_version: false,
    };
    assert_eq!(seen(&[half]).record(None), None);
}

#[test]
fn a_gap_that_contains_a_changed_one_is_known_to_hold_changes() {
    let mut c = Cache::new(Codec::Json, 16);
    assert!(!c.gap_known_nonempty(5, 10));
    c.note_nonempty_gap(5, 10);
    // Any gap containing (5, 10] holds that change.
    assert!(c.gap_known_nonempty(5, 10));
    assert!(c.gap_known_nonempty(3, 12));
    // A gap that may leave it out is not known.
    assert!(!c.gap_known_nonempty(6, 10));
    assert!(!c.gap_known_nonempty(5, 9));
}

#[test]
fn the_node_index_answers_like_a_scan() {
    // Pods on three nodes, in two namespaces; then moves between nodes,
    // deletions (of cached and never-cached pods) and a relist: after each
    // step, every node's indexed snapshot is the scan's, in the same order.
    let on = |ns: &str, name: &str, rv: u64, node: &str, app: &str| {
        let mut p = pod_in(ns, name, rv, app);
        p["spec"]["nodeName"] = json!(node);
        p
    };
    let items: Vec<Value> = (0..30)
        .map(|i| {
            let ns = if i % 2 == 0 { "a" } else { "a-b" };
            on(ns, &format!("p{i}"), 1, &format!("n{}", i % 3), "web")
        })
        .collect();
    let fields = selectable_fields(PODS.0, PODS.1);
    let index = crate::watch::filter::indexed_field(PODS.0, PODS.1);
    assert_eq!(index, Some(0), "pods are indexed by spec.nodeName");
    let mut indexed = Cache::new(Codec::Json, 64).indexed(index);
    let mut scanned = Cache::new(Codec::Json, 64);
    let check = |indexed: &Cache, scanned: &Cache, step: &str| {
        for node in ["n0", "n1", "n2", "n3", ""] {
            for label in [None, Some("app=web"), Some("app=db")] {
                let s = Selector::parse(label, Some(&format!("spec.nodeName={node}")), fields)
                    .expect("a selector");
                let names = |c: &Cache| {
                    c.snapshot(&s)
                        .map(|o| format!("{}/{}", o.meta.namespace, o.meta.name))
                        .collect::<Vec<_>>()
                };
                assert_eq!(
                    names(indexed),
                    names(scanned),
                    "{step}: node {node:?} {label:?}"
                );
            }
        }
    };
    for c in [&mut indexed, &mut scanned] {
        install(c, 1, &items);
    }
    check(&indexed, &scanned, "installed");
    assert_eq!(
        indexed
            .snapshot(&Selector::parse(None, Some("spec.nodeName=n1"), fields).expect("sel"))
            .count(),
        10
    );
    let steps: Vec<(EventType, Value)> = vec![
        (EventType::Modified, on("a", "p0", 2, "n1", "web")),
        (EventType::Modified, on("a", "p0", 3, "n1", "db")),
        (EventType::Deleted, on("a-b", "p1", 4, "n1", "web")),
        (EventType::Added, on("a", "new", 5, "n3", "web")),
        (EventType::Deleted, on("a", "never", 6, "n2", "web")),
        (EventType::Modified, on("a", "new", 7, "", "web")),
    ];
    for (i, (ty, obj)) in steps.iter().enumerate() {
        for c in [&mut indexed, &mut scanned] {
            apply(c, *ty, obj);
        }
        check(&indexed, &scanned, &format!("step {i}"));
    }
    for c in [&mut indexed, &mut scanned] {
        install(c, 9, &items[..7]);
    }
    check(&indexed, &scanned, "relisted");
}
