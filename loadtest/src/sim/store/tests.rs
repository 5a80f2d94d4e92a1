use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::sim::resources::find;

fn rt(plural: &str) -> &'static ResourceType {
    RESOURCES
        .iter()
        .find(|r| r.plural == plural)
        .expect("known type")
}

fn cms() -> &'static ResourceType {
    rt("configmaps")
}

fn store_with_ns(window: usize, queue: usize) -> Store {
    let s = Store::new(window, queue);
    for ns in ["ns", "other"] {
        s.create(rt("namespaces"), None, json!({"metadata": {"name": ns}}))
            .expect("namespace");
    }
    s
}

fn cm(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}, "data": {"k": "v"}})
}

fn relabel(s: &Store, name: &str, labels: Value) -> Arc<Value> {
    s.patch(
        cms(),
        Some("ns"),
        name,
        &json!({"metadata": {"labels": labels}}),
        PatchKind::Merge,
    )
    .expect("patch")
}

fn opts(query: &str) -> ListOptions {
    ListOptions::from_query(cms(), query).expect("valid query")
}

fn drain(w: &mut Watch) -> Vec<Event> {
    let mut out = std::mem::take(&mut w.initial);
    while let Ok(ev) = w.rx.try_recv() {
        out.push(ev);
    }
    out
}

fn name_of(ev: &Event) -> &str {
    meta_str(&ev.object, "name").unwrap_or_default()
}

fn summary(events: &[Event]) -> Vec<(&'static str, String, Rv)> {
    events
        .iter()
        .map(|e| (e.kind.as_str(), name_of(e).to_string(), e.rv))
        .collect()
}

fn fixture(name: &str) -> Value {
    let text = match name {
        "error-400-bad-fieldselector.body" => {
            include_str!("../../../tests/fixtures/error-400-bad-fieldselector.body")
        }
        "error-404-notfound.body" => {
            include_str!("../../../tests/fixtures/error-404-notfound.body")
        }
        "error-409-alreadyexists.body" => {
            include_str!("../../../tests/fixtures/error-409-alreadyexists.body")
        }
        "error-409-conflict.body" => {
            include_str!("../../../tests/fixtures/error-409-conflict.body")
        }
        "error-422-invalid.body" => include_str!("../../../tests/fixtures/error-422-invalid.body"),
        "watch-rv-too-old.jsonl" => include_str!("../../../tests/fixtures/watch-rv-too-old.jsonl"),
        "list-configmaps-limit1.body" => {
            include_str!("../../../tests/fixtures/list-configmaps-limit1.body")
        }
        other => panic!("unknown fixture {other}"),
    };
    serde_json::from_str(text.trim()).expect("fixture is JSON")
}

#[test]
fn create_fills_server_fields_and_bumps_the_global_rv() {
    let s = store_with_ns(100, 100);
    let before = s.current_rv();
    let o = s
        .create(cms(), Some("ns"), cm("a", json!({})))
        .expect("create");
    assert_eq!(s.current_rv(), before + 1);
    assert_eq!(rv_of(&o), before + 1);
    assert_eq!(meta_str(&o, "namespace"), Some("ns"));
    assert_eq!(meta_str(&o, "uid").map(str::len), Some(36));
    let ts = meta_str(&o, "creationTimestamp").expect("timestamp");
    assert!(ts.ends_with('Z') && ts.len() == 20, "{ts}");
    let g = s
        .create(
            cms(),
            Some("ns"),
            json!({"metadata": {"generateName": "gen-"}}),
        )
        .expect("generateName");
    let name = meta_str(&g, "name").expect("name");
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");
    assert_eq!(s.count(cms()), 2);
    let d = s
        .create(rt("deployments"), Some("ns"), json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {"replicas": 1}}))
        .expect("deployment");
    assert_eq!(d["metadata"]["generation"], json!(1));
    let d2 = s
        .patch(
            rt("deployments"),
            Some("ns"),
            "d",
            &json!({"spec": {"replicas": 2}}),
            PatchKind::Merge,
        )
        .expect("scale");
    assert_eq!(d2["metadata"]["generation"], json!(2));
}

#[test]
fn creating_a_namespace_creates_its_default_service_account() {
    let s = store_with_ns(100, 100);
    let sa = s
        .get(rt("serviceaccounts"), Some("ns"), "default")
        .expect("default SA");
    assert_eq!(sa["kind"], "ServiceAccount");
    let ns = s.get(rt("namespaces"), None, "ns").expect("namespace");
    assert_eq!(ns["status"]["phase"], "Active");
}

#[test]
fn create_into_a_missing_namespace_is_404() {
    let s = store_with_ns(100, 100);
    let e = s
        .create(cms(), Some("nope"), cm("a", json!({})))
        .expect_err("missing ns");
    assert_eq!(e.code(), 404);
    assert_eq!(e.to_status()["message"], "namespaces \"nope\" not found");
}

#[test]
fn create_with_a_wrong_kind_is_400() {
    let s = store_with_ns(100, 100);
    let e = s
        .create(
            cms(),
            Some("ns"),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "a"}}),
        )
        .expect_err("kind mismatch");
    assert_eq!(e.code(), 400);
}

#[test]
fn duplicate_create_is_409_already_exists_like_the_apiserver() {
    let s = store_with_ns(100, 100);
    s.create(cms(), Some("ns"), cm("cm-a", json!({})))
        .expect("create");
    let e = s
        .create(cms(), Some("ns"), cm("cm-a", json!({})))
        .expect_err("dup");
    assert_eq!(e.code(), 409);
    assert_eq!(e.to_status(), fixture("error-409-alreadyexists.body"));
}

#[test]
fn stale_update_is_409_conflict_like_the_apiserver() {
    let s = store_with_ns(100, 100);
    let a = s
        .create(cms(), Some("ns"), cm("cm-a", json!({})))
        .expect("create");
    let mut stale = (*a).clone();
    relabel(&s, "cm-a", json!({"x": "1"}));
    stale["data"]["k"] = json!("w");
    let e = s
        .update(cms(), Some("ns"), "cm-a", stale.clone())
        .expect_err("stale");
    assert_eq!(e.to_status(), fixture("error-409-conflict.body"));
    // Without a resourceVersion the update is unconditional.
    remove_meta(&mut stale, "resourceVersion");
    let u = s
        .update(cms(), Some("ns"), "cm-a", stale)
        .expect("unconditional");
    assert_eq!(u["data"]["k"], "w");
    assert_eq!(meta_str(&u, "uid"), meta_str(&a, "uid"));
    assert_eq!(
        meta_str(&u, "creationTimestamp"),
        meta_str(&a, "creationTimestamp")
    );
}

#[test]
fn invalid_name_is_422_like_the_apiserver() {
    let s = store_with_ns(100, 100);
    let e = s
        .create(cms(), Some("ns"), cm("Bad_Name", json!({})))
        .expect_err("invalid");
    assert_eq!(e.code(), 422);
    assert_eq!(e.to_status(), fixture("error-422-invalid.body"));
    let e = s
        .create(cms(), Some("ns"), json!({"metadata": {}}))
        .expect_err("no name");
    assert_eq!(
        e.to_status()["details"]["causes"][0]["reason"],
        "FieldValueRequired"
    );
}

#[test]
fn not_found_and_unsupported_field_label_statuses_match_fixtures() {
    let s = store_with_ns(100, 100);
    let e = s.get(cms(), Some("ns"), "nope").expect_err("missing");
    assert_eq!(e.to_status(), fixture("error-404-notfound.body"));
    let e =
        ListOptions::from_query(rt("pods"), "fieldSelector=spec.bogus%3Dx").expect_err("bad field");
    assert_eq!(e.to_status(), fixture("error-400-bad-fieldselector.body"));
    let e = s
        .get(rt("deployments"), Some("ns"), "d")
        .expect_err("missing");
    let st = e.to_status();
    assert_eq!(st["message"], "deployments.apps \"d\" not found");
    assert_eq!(
        st["details"],
        json!({"name": "d", "group": "apps", "kind": "deployments"})
    );
}

#[test]
fn list_options_parse_every_parameter() {
    let o = ListOptions::from_query(
        rt("pods"),
        "labelSelector=app%3Dweb&fieldSelector=spec.nodeName%3Dnode-1&resourceVersion=5&resourceVersionMatch=NotOlderThan&limit=10&continue=abc&sendInitialEvents=true&allowWatchBookmarks=true&timeoutSeconds=30&watch=1",
    )
    .expect("valid");
    assert!(!o.label_selector.is_empty() && !o.field_selector.is_empty());
    assert_eq!(o.resource_version.as_deref(), Some("5"));
    assert_eq!(o.resource_version_match.as_deref(), Some("NotOlderThan"));
    assert_eq!(
        (o.limit, o.continue_token.as_deref()),
        (Some(10), Some("abc"))
    );
    assert_eq!(o.send_initial_events, Some(true));
    assert!(o.allow_bookmarks && o.watch);
    assert_eq!(o.timeout_seconds, Some(30));
    assert!(
        !ListOptions::from_query(cms(), "watch=false")
            .expect("ok")
            .watch
    );
    for bad in [
        "limit=x",
        "timeoutSeconds=x",
        "labelSelector=a%20b",
        "resourceVersionMatch=Bogus",
        "allowWatchBookmarks=maybe",
    ] {
        let e = ListOptions::from_query(cms(), bad).expect_err(bad);
        assert_eq!(e.code(), 400, "{bad}");
    }
}

#[test]
fn merge_patch_deletes_with_null_and_strategic_directives_are_ignored() {
    let s = store_with_ns(100, 100);
    s.create(cms(), Some("ns"), cm("a", json!({"x": "1", "y": "2"})))
        .expect("create");
    let p = s
        .patch(
            cms(),
            Some("ns"),
            "a",
            &json!({"metadata": {"labels": {"x": null, "z": "3"}}, "data": {"n": "m"}}),
            PatchKind::Merge,
        )
        .expect("merge");
    assert_eq!(p["metadata"]["labels"], json!({"y": "2", "z": "3"}));
    assert_eq!(p["data"], json!({"k": "v", "n": "m"}));
    let p = s
        .patch(
            cms(),
            Some("ns"),
            "a",
            &json!({"$setElementOrder/data": [{"k": 1}], "data": {"k": "w", "$patch": "merge"}}),
            PatchKind::StrategicMerge,
        )
        .expect("strategic");
    assert_eq!(p["data"], json!({"k": "w", "n": "m"}));
    assert!(p.get("$setElementOrder/data").is_none());
}

#[test]
fn json_patch_supports_kubectls_operations() {
    let s = store_with_ns(100, 100);
    s.create(cms(), Some("ns"), cm("a", json!({"x": "1"})))
        .expect("create");
    let p = s
        .patch(
            cms(),
            Some("ns"),
            "a",
            &json!([
                {"op": "add", "path": "/data/list", "value": [1, 3]},
                {"op": "add", "path": "/data/list/1", "value": 2},
                {"op": "add", "path": "/data/list/-", "value": 4},
                {"op": "replace", "path": "/data/k", "value": "w"},
                {"op": "test", "path": "/data/k", "value": "w"},
                {"op": "copy", "from": "/data/k", "path": "/data/k2"},
                {"op": "move", "from": "/data/k2", "path": "/data/k3"},
                {"op": "remove", "path": "/metadata/labels/x"},
                {"op": "add", "path": "/metadata/annotations", "value": {"a~b/c": "1"}},
                {"op": "remove", "path": "/metadata/annotations/a~0b~1c"}
            ]),
            PatchKind::Json,
        )
        .expect("json patch");
    assert_eq!(
        p["data"],
        json!({"k": "w", "k3": "w", "list": [1, 2, 3, 4]})
    );
    assert_eq!(p["metadata"]["labels"], json!({}));
    assert_eq!(p["metadata"]["annotations"], json!({}));
    let before = s.current_rv();
    let e = s
        .patch(cms(), Some("ns"), "a", &json!([{"op": "replace", "path": "/data/k", "value": "z"}, {"op": "test", "path": "/data/k", "value": "nope"}]), PatchKind::Json)
        .expect_err("failed test");
    assert_eq!(e.code(), 400);
    assert_eq!(s.current_rv(), before, "a failed patch changes nothing");
    assert_eq!(
        s.get(cms(), Some("ns"), "a").expect("get")["data"]["k"],
        "w"
    );
}

#[test]
fn patch_with_a_stale_resource_version_conflicts() {
    let s = store_with_ns(100, 100);
    s.create(cms(), Some("ns"), cm("a", json!({})))
        .expect("create");
    let e = s
        .patch(
            cms(),
            Some("ns"),
            "a",
            &json!({"metadata": {"resourceVersion": "1"}}),
            PatchKind::Merge,
        )
        .expect_err("stale");
    assert_eq!(e.code(), 409);
}

#[test]
fn no_op_update_keeps_the_rv_and_emits_nothing() {
    let s = store_with_ns(100, 100);
    let a = s
        .create(cms(), Some("ns"), cm("a", json!({"x": "1"})))
        .expect("create");
    let mut w = s
        .watch(cms(), Some("ns"), &opts("resourceVersion=0"))
        .expect("watch");
    assert_eq!(drain(&mut w).len(), 1);
    let before = s.current_rv();
    let u = s
        .update(cms(), Some("ns"), "a", (*a).clone())
        .expect("update");
    let p = relabel(&s, "a", json!({"x": "1"}));
    assert_eq!(s.current_rv(), before);
    assert_eq!(rv_of(&u), rv_of(&a));
    assert_eq!(rv_of(&p), rv_of(&a));
    assert!(drain(&mut w).is_empty());
}

#[test]
fn watch_from_unset_and_zero_rv_sends_current_objects_then_changes() {
    let s = store_with_ns(100, 100);
    s.create(cms(), Some("ns"), cm("b", json!({}))).expect("b");
    s.create(cms(), Some("ns"), cm("a", json!({}))).expect("a");
    s.create(cms(), Some("other"), cm("c", json!({})))
        .expect("c");
    for q in ["", "resourceVersion=", "resourceVersion=0"] {
        let mut w = s.watch(cms(), Some("ns"), &opts(q)).expect("watch");
        let initial: Vec<_> = summary(&w.initial)
            .into_iter()
            .map(|(t, n, _)| (t, n))
            .collect();
        assert_eq!(
            initial,
            vec![("ADDED", "a".to_string()), ("ADDED", "b".to_string())],
            "{q}"
        );
        for ev in &w.initial {
            assert_eq!(rv_of(&ev.object), ev.rv);
        }
        w.initial.clear();
        let d = s.create(cms(), Some("ns"), cm("d", json!({}))).expect("d");
        s.create(
            cms(),
            Some("other"),
            cm(&format!("e{}", q.len()), json!({})),
        )
        .expect("other ns");
        let live = drain(&mut w);
        assert_eq!(
            summary(&live),
            vec![("ADDED", "d".to_string(), rv_of(&d))],
            "{q}"
        );
        s.delete(cms(), Some("ns"), "d").expect("delete");
        let _ = drain(&mut w);
    }
    // All namespaces.
    let w = s.watch(cms(), None, &opts("")).expect("watch");
    assert_eq!(w.initial.len(), 6);
}

#[test]
fn watch_from_rv_in_window_replays_exactly_then_continues_live() {
    let s = store_with_ns(100, 100);
    let a = s.create(cms(), Some("ns"), cm("a", json!({}))).expect("a");
    let from = rv_of(&a);
    s.create(cms(), Some("ns"), cm("b", json!({}))).expect("b");
    relabel(&s, "a", json!({"team": "blue"}));
    s.delete(cms(), Some("ns"), "b").expect("delete");
    let mut w = s
        .watch(cms(), Some("ns"), &opts(&format!("resourceVersion={from}")))
        .expect("watch");
    let kinds: Vec<_> = summary(&w.initial)
        .into_iter()
        .map(|(t, n, _)| (t, n))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("ADDED", "b".into()),
            ("MODIFIED", "a".into()),
            ("DELETED", "b".into())
        ]
    );
    s.create(cms(), Some("ns"), cm("c", json!({}))).expect("c");
    let all = drain(&mut w);
    assert_eq!(all.len(), 4);
    // Consecutive RVs: no gaps, no duplicates (configmaps is the only type written).
    for (i, ev) in all.iter().enumerate() {
        assert_eq!(ev.rv, from + 1 + i as Rv);
        assert_eq!(rv_of(&ev.object), ev.rv);
    }
    // The deleted object carries the deletion's RV.
    assert_eq!(all[2].kind, EventType::Deleted);
    assert_eq!(rv_of(&all[2].object), from + 3);
}

#[test]
fn watch_from_an_rv_older_than_the_window_is_410_expired() {
    let s = store_with_ns(3, 100);
    let first = s
        .create(cms(), Some("ns"), cm("a0", json!({})))
        .expect("create");
    for i in 1..6 {
        s.create(cms(), Some("ns"), cm(&format!("a{i}"), json!({})))
            .expect("create");
    }
    // Window holds the last 3 creates: rv first+3..first+5; oldest servable = first+2.
    let oldest = rv_of(&first) + 2;
    let e = s
        .watch(
            cms(),
            Some("ns"),
            &opts(&format!("resourceVersion={}", rv_of(&first))),
        )
        .expect_err("too old");
    match e {
        StoreError::Expired {
            requested,
            oldest: o,
        } => {
            assert_eq!((requested, o), (rv_of(&first), oldest));
        }
        other => panic!("unexpected {other:?}"),
    }
    let mut w = s
        .watch(
            cms(),
            Some("ns"),
            &opts(&format!("resourceVersion={oldest}")),
        )
        .expect("oldest servable RV still replays");
    assert_eq!(drain(&mut w).len(), 3);
    // The Status is shaped like the apiserver's ERROR event object.
    let st = StoreError::Expired {
        requested: 2,
        oldest: 198,
    }
    .to_status();
    assert_eq!(
        json!({"type": "ERROR", "object": st}),
        fixture("watch-rv-too-old.jsonl")
    );
}

#[test]
fn compact_makes_older_rvs_expire_and_current_still_works() {
    let s = store_with_ns(100, 100);
    let a = s
        .create(cms(), Some("ns"), cm("a", json!({})))
        .expect("create");
    s.create(cms(), Some("ns"), cm("b", json!({})))
        .expect("create");
    let at = s.current_rv();
    s.compact(cms());
    let e = s
        .watch(
            cms(),
            Some("ns"),
            &opts(&format!("resourceVersion={}", rv_of(&a))),
        )
        .expect_err("compacted");
    assert_eq!(e.code(), 410);
    assert_eq!(
        e.to_string(),
        format!("too old resource version: {} ({at})", rv_of(&a))
    );
    let mut w = s
        .watch(cms(), Some("ns"), &opts(&format!("resourceVersion={at}")))
        .expect("current RV");
    s.create(cms(), Some("ns"), cm("c", json!({})))
        .expect("create");
    assert_eq!(drain(&mut w).len(), 1);
}

fn pod(name: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
           "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]}})
}

#[test]
fn label_selector_transitions_follow_the_apiserver() {
    // The fixture's sequence: create cm-c, label blue, relabel red, delete.
    let s = store_with_ns(100, 100);
    let from = s.current_rv();
    let mut live = s
        .watch(
            cms(),
            Some("ns"),
            &opts(&format!("resourceVersion={from}&labelSelector=team%3Dblue")),
        )
        .expect("watch");
    s.create(cms(), Some("ns"), cm("cm-c", json!(null)))
        .expect("create");
    let blue = relabel(&s, "cm-c", json!({"team": "blue"}));
    let red = relabel(&s, "cm-c", json!({"team": "red"}));
    s.delete(cms(), Some("ns"), "cm-c").expect("delete");
    let mut replay = s
        .watch(
            cms(),
            Some("ns"),
            &opts(&format!("resourceVersion={from}&labelSelector=team%3Dblue")),
        )
        .expect("watch");
    for events in [drain(&mut live), drain(&mut replay)] {
        assert_eq!(
            summary(&events),
            vec![
                ("ADDED", "cm-c".into(), rv_of(&blue)),
                ("DELETED", "cm-c".into(), rv_of(&red))
            ]
        );
        // Leaving the selector: the OLD object (still blue) with the NEW rv.
        assert_eq!(
            events[1].object["metadata"]["labels"],
            json!({"team": "blue"})
        );
        assert_eq!(rv_of(&events[1].object), rv_of(&red));
    }
}

#[test]
fn pod_moving_between_nodes_is_deleted_then_added_for_node_watchers() {
    let s = store_with_ns(100, 100);
    s.create(rt("pods"), Some("ns"), pod("p", "node-1"))
        .expect("pod");
    let q = |n: &str| {
        ListOptions::from_query(rt("pods"), &format!("fieldSelector=spec.nodeName%3D{n}"))
            .expect("ok")
    };
    let mut on1 = s.watch(rt("pods"), None, &q("node-1")).expect("watch");
    let mut on2 = s.watch(rt("pods"), None, &q("node-2")).expect("watch");
    assert_eq!(drain(&mut on1).len(), 1);
    assert!(drain(&mut on2).is_empty());
    let moved = s
        .patch(
            rt("pods"),
            Some("ns"),
            "p",
            &json!({"spec": {"nodeName": "node-2"}}),
            PatchKind::StrategicMerge,
        )
        .expect("move");
    let e1 = drain(&mut on1);
    assert_eq!(summary(&e1), vec![("DELETED", "p".into(), rv_of(&moved))]);
    assert_eq!(e1[0].object["spec"]["nodeName"], "node-1");
    assert_eq!(rv_of(&e1[0].object), rv_of(&moved));
    let e2 = drain(&mut on2);
    assert_eq!(summary(&e2), vec![("ADDED", "p".into(), rv_of(&moved))]);
    assert_eq!(e2[0].object["spec"]["nodeName"], "node-2");
    // An unrelated change to the moved pod is MODIFIED for node-2 only.
    s.patch(
        rt("pods"),
        Some("ns"),
        "p",
        &json!({"metadata": {"labels": {"a": "b"}}}),
        PatchKind::Merge,
    )
    .expect("label");
    assert!(drain(&mut on1).is_empty());
    assert_eq!(drain(&mut on2)[0].kind, EventType::Modified);
}

#[test]
fn send_initial_events_ends_with_the_initial_events_end_bookmark() {
    let s = store_with_ns(100, 100);
    s.create(cms(), Some("ns"), cm("a", json!({}))).expect("a");
    let cur = s.current_rv();
    let w = s
        .watch(
            cms(),
            Some("ns"),
            &opts(
                "sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true",
            ),
        )
        .expect("watch");
    assert_eq!(w.initial.len(), 2);
    let bm = &w.initial[1];
    assert_eq!(bm.kind, EventType::Bookmark);
    assert_eq!(bm.rv, cur);
    assert_eq!(
        *bm.object,
        json!({"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"resourceVersion": cur.to_string(), "creationTimestamp": null, "annotations": {"k8s.io/initial-events-end": "true"}}})
    );
    // Without allowWatchBookmarks there is no bookmark.
    let w = s
        .watch(cms(), Some("ns"), &opts("sendInitialEvents=true"))
        .expect("watch");
    assert_eq!(w.initial.len(), 1);
}

#[test]
fn bookmarks_go_only_to_watchers_that_allow_them() {
    let s = store_with_ns(100, 100);
    let mut with = s
        .watch(cms(), Some("ns"), &opts("allowWatchBookmarks=true"))
        .expect("watch");
    let mut without = s.watch(cms(), Some("ns"), &opts("")).expect("watch");
    s.create(cms(), Some("ns"), cm("a", json!({}))).expect("a");
    s.send_bookmarks();
    with.request_bookmark();
    without.request_bookmark();
    let got = drain(&mut with);
    assert_eq!(
        got.iter().map(|e| e.kind).collect::<Vec<_>>(),
        vec![EventType::Added, EventType::Bookmark, EventType::Bookmark]
    );
    assert_eq!(got[1].rv, s.current_rv());
    assert_eq!(
        got[1].object["metadata"]["resourceVersion"],
        s.current_rv().to_string()
    );
    assert_eq!(drain(&mut without).len(), 1);
}

#[test]
fn a_slow_watcher_whose_queue_overflows_is_closed() {
    let s = store_with_ns(100, 2);
    let mut slow = s.watch(cms(), Some("ns"), &opts("")).expect("watch");
    for i in 0..3 {
        s.create(cms(), Some("ns"), cm(&format!("a{i}"), json!({})))
            .expect("create");
    }
    // The two queued events are still delivered, then the stream ends.
    assert!(slow.rx.try_recv().is_ok());
    assert!(slow.rx.try_recv().is_ok());
    assert!(matches!(
        slow.rx.try_recv(),
        Err(mpsc::error::TryRecvError::Disconnected)
    ));
    // The store no longer tracks it; a new watch works.
    assert_eq!(s.shared.lock(cms()).watchers.len(), 0);
}

#[test]
fn close_watches_ends_every_stream_and_drop_unregisters() {
    let s = store_with_ns(100, 10);
    let mut a = s.watch(cms(), Some("ns"), &opts("")).expect("watch");
    let mut b = s.watch(rt("pods"), None, &opts("")).expect("watch");
    let c = s.watch(cms(), None, &opts("")).expect("watch");
    drop(c);
    assert_eq!(s.shared.lock(cms()).watchers.len(), 1);
    s.close_watches();
    assert!(matches!(
        a.rx.try_recv(),
        Err(mpsc::error::TryRecvError::Disconnected)
    ));
    assert!(matches!(
        b.rx.try_recv(),
        Err(mpsc::error::TryRecvError::Disconnected)
    ));
}

#[tokio::test]
async fn live_events_arrive_on_an_async_receiver() {
    let s = store_with_ns(100, 10);
    let mut w = s.watch(cms(), Some("ns"), &opts("")).expect("watch");
    let s2 = s.clone();
    let writer = tokio::spawn(async move {
        s2.create(cms(), Some("ns"), cm("a", json!({})))
            .expect("create");
    });
    let ev = w.rx.recv().await.expect("event");
    assert_eq!((ev.kind, name_of(&ev)), (EventType::Added, "a"));
    writer.await.expect("writer");
}

fn names(r: &ListResult) -> Vec<String> {
    r.items
        .iter()
        .map(|o| meta_str(o, "name").unwrap_or_default().to_string())
        .collect()
}

#[test]
fn pagination_is_consistent_with_the_first_pages_rv() {
    let s = store_with_ns(100, 100);
    for n in ["a", "b", "c"] {
        s.create(cms(), Some("ns"), cm(n, json!({})))
            .expect("create");
    }
    s.create(cms(), Some("other"), cm("z", json!({})))
        .expect("create");
    let p1 = s.list(cms(), Some("ns"), &opts("limit=1")).expect("page 1");
    assert_eq!(names(&p1), vec!["a"]);
    assert_eq!(p1.remaining_item_count, Some(2));
    let token = p1.continue_token.clone().expect("continue");
    // The token has the apiserver's shape.
    let (rv, start) = decode_continue(&token).expect("decodes");
    assert_eq!((rv, start.as_str()), (p1.resource_version, "a"));
    // Writes between pages must not show up in page 2.
    s.delete(cms(), Some("ns"), "b").expect("delete b");
    relabel(&s, "c", json!({"late": "yes"}));
    s.create(cms(), Some("ns"), cm("bb", json!({})))
        .expect("create bb");
    let p2 = s
        .list(
            cms(),
            Some("ns"),
            &opts(&format!("limit=1&continue={token}")),
        )
        .expect("page 2");
    assert_eq!(names(&p2), vec!["b"]);
    assert_eq!(p2.resource_version, p1.resource_version);
    let token2 = p2.continue_token.clone().expect("continue");
    let p3 = s
        .list(
            cms(),
            Some("ns"),
            &opts(&format!("limit=5&continue={token2}")),
        )
        .expect("page 3");
    assert_eq!(names(&p3), vec!["c"]);
    assert!(
        p3.items[0]["metadata"]
            .get("labels")
            .is_none_or(|l| l.get("late").is_none())
    );
    assert_eq!(
        (p3.continue_token.as_ref(), p3.remaining_item_count),
        (None, None)
    );
    // A fresh list sees the writes.
    let now = s.list(cms(), Some("ns"), &opts("")).expect("list");
    assert_eq!(names(&now), vec!["a", "bb", "c"]);
    assert_eq!(now.resource_version, s.current_rv());
}

#[test]
fn pagination_across_namespaces_and_with_selectors() {
    let s = store_with_ns(100, 100);
    s.create(cms(), Some("ns"), cm("a", json!({"team": "blue"})))
        .expect("create");
    s.create(cms(), Some("ns"), cm("b", json!({})))
        .expect("create");
    s.create(cms(), Some("other"), cm("a", json!({"team": "blue"})))
        .expect("create");
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    for _ in 0..10 {
        let q = match &token {
            Some(t) => format!("limit=1&continue={t}"),
            None => "limit=1".into(),
        };
        let page = s.list(cms(), None, &opts(&q)).expect("page");
        seen.extend(page.items.iter().map(|o| {
            format!(
                "{}/{}",
                meta_str(o, "namespace").unwrap_or_default(),
                meta_str(o, "name").unwrap_or_default()
            )
        }));
        token = page.continue_token;
        if token.is_none() {
            break;
        }
    }
    assert_eq!(seen, vec!["ns/a", "ns/b", "other/a"]);
    let p = s
        .list(cms(), None, &opts("limit=1&labelSelector=team%3Dblue"))
        .expect("page");
    assert_eq!(names(&p), vec!["a"]);
    assert!(p.continue_token.is_some());
    assert_eq!(p.remaining_item_count, None, "omitted with selectors");
}

#[test]
fn list_rv_zero_ignores_limit_like_the_watch_cache() {
    let s = store_with_ns(100, 100);
    for n in ["a", "b", "c"] {
        s.create(cms(), Some("ns"), cm(n, json!({})))
            .expect("create");
    }
    let r = s
        .list(cms(), Some("ns"), &opts("limit=1&resourceVersion=0"))
        .expect("list");
    assert_eq!(r.items.len(), 3);
    assert!(r.continue_token.is_none());
}

#[test]
fn an_expired_continue_token_is_410() {
    let s = store_with_ns(100, 100);
    for n in ["a", "b"] {
        s.create(cms(), Some("ns"), cm(n, json!({})))
            .expect("create");
    }
    let p1 = s.list(cms(), Some("ns"), &opts("limit=1")).expect("page");
    s.create(cms(), Some("ns"), cm("c", json!({})))
        .expect("create");
    s.compact(cms());
    let token = p1.continue_token.expect("token");
    let e = s
        .list(
            cms(),
            Some("ns"),
            &opts(&format!("limit=1&continue={token}")),
        )
        .expect_err("expired");
    assert!(matches!(e, StoreError::ContinueExpired));
    let st = e.to_status();
    assert_eq!(
        (st["code"].clone(), st["reason"].clone()),
        (json!(410), json!("Expired"))
    );
    assert!(
        st["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("The provided continue parameter is too old"))
    );
    assert!(
        s.list(cms(), Some("ns"), &opts("limit=1&continue=%%%"))
            .is_err()
    );
}

#[test]
fn list_exact_rebuilds_old_state_or_expires() {
    let s = store_with_ns(100, 100);
    let a = s
        .create(cms(), Some("ns"), cm("a", json!({})))
        .expect("create");
    s.create(cms(), Some("ns"), cm("b", json!({})))
        .expect("create");
    relabel(&s, "a", json!({"v": "2"}));
    let r = s
        .list(
            cms(),
            Some("ns"),
            &opts(&format!(
                "resourceVersion={}&resourceVersionMatch=Exact",
                rv_of(&a)
            )),
        )
        .expect("exact");
    assert_eq!(names(&r), vec!["a"]);
    assert_eq!(r.items[0], a);
    assert_eq!(r.resource_version, rv_of(&a));
    let r = s
        .list(
            cms(),
            Some("ns"),
            &opts(&format!(
                "resourceVersion={}&resourceVersionMatch=NotOlderThan",
                rv_of(&a)
            )),
        )
        .expect("not older than");
    assert_eq!(names(&r), vec!["a", "b"]);
    s.compact(cms());
    let e = s
        .list(
            cms(),
            Some("ns"),
            &opts(&format!(
                "resourceVersion={}&resourceVersionMatch=Exact",
                rv_of(&a)
            )),
        )
        .expect_err("expired");
    assert_eq!(e.code(), 410);
    assert_eq!(
        s.list(cms(), Some("ns"), &opts("resourceVersionMatch=Exact"))
            .expect_err("no rv")
            .code(),
        400
    );
}

#[test]
fn list_filters_by_namespace_and_selectors() {
    let s = store_with_ns(100, 100);
    s.create(rt("pods"), Some("ns"), pod("p1", "node-1"))
        .expect("pod");
    s.create(rt("pods"), Some("ns"), pod("p2", "node-2"))
        .expect("pod");
    s.create(rt("pods"), Some("other"), pod("p3", "node-1"))
        .expect("pod");
    let q =
        ListOptions::from_query(rt("pods"), "fieldSelector=spec.nodeName%3Dnode-1").expect("ok");
    assert_eq!(
        names(&s.list(rt("pods"), None, &q).expect("list")),
        vec!["p1", "p3"]
    );
    assert_eq!(
        names(&s.list(rt("pods"), Some("ns"), &q).expect("list")),
        vec!["p1"]
    );
    let nodes = s
        .list(rt("namespaces"), None, &ListOptions::default())
        .expect("list");
    assert_eq!(names(&nodes), vec!["ns", "other"]);
}

#[test]
fn the_node_index_answers_like_a_scan() {
    // The same selectors answered with the index (spec.nodeName=X) and by a
    // scan (spec.nodeName==X,metadata.name!=, which the index does not
    // serve), through creates, moves between nodes, deletes and pages.
    let s = store_with_ns(100, 100);
    for (ns, name, node) in [
        ("ns", "a", "node-1"),
        ("ns", "b", "node-2"),
        ("other", "c", "node-1"),
        ("ns", "d", "node-1"),
        ("other", "e", ""),
    ] {
        s.create(rt("pods"), Some(ns), pod(name, node))
            .expect("pod");
    }
    let before_move = s.current_rv();
    s.patch(
        rt("pods"),
        Some("ns"),
        "b",
        &json!({"spec": {"nodeName": "node-1"}}),
        PatchKind::StrategicMerge,
    )
    .expect("move");
    s.delete(rt("pods"), Some("ns"), "d").expect("delete");
    let list = |ns: Option<&str>, query: &str| {
        let q = ListOptions::from_query(rt("pods"), query).expect("query");
        s.list(rt("pods"), ns, &q).expect("list")
    };
    for ns in [None, Some("ns"), Some("other")] {
        for node in ["node-1", "node-2", "node-3"] {
            let indexed = format!("fieldSelector=spec.nodeName%3D{node}");
            let scanned = format!("fieldSelector=spec.nodeName%3D%3D{node},metadata.name!%3D");
            assert_eq!(
                names(&list(ns, &indexed)),
                names(&list(ns, &scanned)),
                "{ns:?} {node}"
            );
        }
    }
    assert_eq!(
        names(&list(None, "fieldSelector=spec.nodeName%3Dnode-1")),
        vec!["a", "b", "c"]
    );
    // Pages: a limit of 1 walks the same keys in the same order.
    let first = list(None, "fieldSelector=spec.nodeName%3Dnode-1&limit=1");
    assert_eq!(names(&first), vec!["a"]);
    let token = first.continue_token.expect("more");
    let rest = list(
        None,
        &format!("fieldSelector=spec.nodeName%3Dnode-1&continue={token}"),
    );
    assert_eq!(names(&rest), vec!["b", "c"]);
    // A past state is not in the index: answered by a scan of that state.
    let old = list(
        None,
        &format!(
            "fieldSelector=spec.nodeName%3Dnode-1&resourceVersion={before_move}&resourceVersionMatch=Exact"
        ),
    );
    assert_eq!(names(&old), vec!["a", "d", "c"]);
}

#[test]
fn delete_collection_removes_matching_objects_with_events() {
    let s = store_with_ns(100, 100);
    s.create(cms(), Some("ns"), cm("a", json!({"x": "1"})))
        .expect("create");
    s.create(cms(), Some("ns"), cm("b", json!({})))
        .expect("create");
    s.create(cms(), Some("other"), cm("c", json!({"x": "1"})))
        .expect("create");
    let mut w = s
        .watch(cms(), None, &opts("resourceVersion="))
        .expect("watch");
    w.initial.clear();
    let gone = s
        .delete_collection(cms(), Some("ns"), &opts("labelSelector=x"))
        .expect("deletecollection");
    assert_eq!(gone.len(), 1);
    assert_eq!(s.count(cms()), 2);
    let evs = drain(&mut w);
    assert_eq!(
        summary(&evs)
            .into_iter()
            .map(|(t, n, _)| (t, n))
            .collect::<Vec<_>>(),
        vec![("DELETED", "a".to_string())]
    );
    assert_eq!(
        s.delete(cms(), Some("ns"), "a").expect_err("gone").code(),
        404
    );
}

#[test]
fn continue_token_matches_the_apiserver_encoding() {
    // fixtures/list-configmaps-limit1.body: {"v":"meta.k8s.io/v1","rv":209,"start":"cm-a\u0000"}
    let body = fixture("list-configmaps-limit1.body");
    let token = body["metadata"]["continue"].as_str().expect("token");
    assert_eq!(
        decode_continue(token).expect("decodes"),
        (209, "cm-a".to_string())
    );
    assert_eq!(encode_continue(209, "cm-a"), token);
    for data in [&b""[..], b"f", b"fo", b"foo", b"foob", b"\xff\x00\x10"] {
        assert_eq!(
            patch::base64url_decode(&patch::base64url_encode(data)).as_deref(),
            Some(data)
        );
    }
}

// ---- property test: watch output equals a reference model ----

#[derive(Debug, Clone)]
enum Op {
    Create(usize, Option<&'static str>),
    Update(usize, Option<&'static str>),
    Delete(usize),
}

const NAMES: [&str; 4] = ["a", "b", "c", "d"];
const TEAMS: [Option<&str>; 3] = [None, Some("blue"), Some("red")];
const SELECTORS: [&str; 6] = [
    "",
    "team=blue",
    "team!=blue",
    "team in (blue,red)",
    "!team",
    "team",
];

fn op_strategy() -> impl Strategy<Value = Op> {
    let team = (0..TEAMS.len()).prop_map(|i| TEAMS[i]);
    prop_oneof![
        (0..NAMES.len(), team.clone()).prop_map(|(n, t)| Op::Create(n, t)),
        (0..NAMES.len(), team).prop_map(|(n, t)| Op::Update(n, t)),
        (0..NAMES.len()).prop_map(Op::Delete),
    ]
}

fn labels_of(team: Option<&str>) -> Value {
    match team {
        Some(t) => json!({"team": t}),
        None => json!({}),
    }
}

/// Applies `op` to the store; returns (rv, old team state, new team state) when it wrote.
#[allow(clippy::type_complexity)] // a test-local tuple is clearer than a one-off struct
fn apply(
    s: &Store,
    model: &mut [Option<Option<&'static str>>; 4],
    op: &Op,
) -> Option<(
    Rv,
    usize,
    Option<Option<&'static str>>,
    Option<Option<&'static str>>,
)> {
    match *op {
        Op::Create(n, t) => {
            let r = s.create(
                cms(),
                Some("ns"),
                json!({"metadata": {"name": NAMES[n], "labels": labels_of(t)}}),
            );
            if model[n].is_some() {
                assert!(matches!(r, Err(StoreError::AlreadyExists { .. })));
                return None;
            }
            model[n] = Some(t);
            Some((rv_of(&r.expect("create")), n, None, Some(t)))
        }
        Op::Update(n, t) => {
            let before = s.current_rv();
            let r = s.update(
                cms(),
                Some("ns"),
                NAMES[n],
                json!({"metadata": {"name": NAMES[n], "labels": labels_of(t)}}),
            );
            let old = model[n]?;
            let o = r.expect("update");
            if old == t {
                assert_eq!(s.current_rv(), before, "no-op update");
                return None;
            }
            model[n] = Some(t);
            Some((rv_of(&o), n, Some(old), Some(t)))
        }
        Op::Delete(n) => {
            let r = s.delete(cms(), Some("ns"), NAMES[n]);
            let old = model[n].take()?;
            Some((rv_of(&r.expect("delete")), n, Some(old), None))
        }
    }
}

fn model_matches(sel: &str, team: Option<&str>) -> bool {
    match sel {
        "" => true,
        "team=blue" => team == Some("blue"),
        "team!=blue" => team != Some("blue"),
        "team in (blue,red)" => team.is_some(),
        "!team" => team.is_none(),
        "team" => team.is_some(),
        _ => unreachable!(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn watch_from_rv_yields_exactly_the_model_transitions(
        before in proptest::collection::vec(op_strategy(), 0..12),
        after in proptest::collection::vec(op_strategy(), 0..24),
        sel_i in 0..SELECTORS.len(),
    ) {
        let s = store_with_ns(1000, 1000);
        let mut model = [None; 4];
        for op in &before {
            apply(&s, &mut model, op);
        }
        let sel = SELECTORS[sel_i];
        let q = format!("resourceVersion={}&labelSelector={}", s.current_rv(), form_urlencoded::byte_serialize(sel.as_bytes()).collect::<String>());
        let mut live = s.watch(cms(), Some("ns"), &opts(&q)).expect("watch");
        let mut expected = Vec::new();
        for op in &after {
            if let Some((rv, n, old, new)) = apply(&s, &mut model, op) {
                let om = old.is_some_and(|t| model_matches(sel, t));
                let nm = new.is_some_and(|t| model_matches(sel, t));
                let carried = match (om, nm) {
                    (true, true) => Some(("MODIFIED", new)),
                    (false, true) => Some(("ADDED", new)),
                    (true, false) => Some(("DELETED", old)),
                    (false, false) => None,
                };
                if let Some((kind, team)) = carried {
                    expected.push((kind, NAMES[n].to_string(), rv, labels_of(team.flatten())));
                }
            }
        }
        let mut replay = s.watch(cms(), Some("ns"), &opts(&q)).expect("replay watch");
        for got in [drain(&mut live), drain(&mut replay)] {
            let got: Vec<_> = got.iter().map(|e| (e.kind.as_str(), name_of(e).to_string(), e.rv, e.object["metadata"].get("labels").cloned().unwrap_or(json!({})))).collect();
            prop_assert_eq!(&got, &expected);
            for e in &got {
                prop_assert_eq!(rv_of(&json!({"metadata": {"resourceVersion": e.2.to_string()}})), e.2);
            }
        }
    }
}

#[test]
fn resources_lookup_helper_agrees() {
    assert_eq!(find("", "v1", "configmaps"), Some(cms()));
}

#[test]
fn lists_come_in_etcd_key_order_across_namespaces() {
    let s = Store::new(100, 100);
    for ns in ["a", "a-b", "a0"] {
        s.create(rt("namespaces"), None, json!({"metadata": {"name": ns}}))
            .expect("namespace");
        for name in ["y", "x"] {
            s.create(cms(), Some(ns), cm(name, json!({})))
                .expect("configmap");
        }
    }
    let all = s.list(cms(), None, &opts("")).expect("list");
    let keys: Vec<String> = all
        .items
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                meta_str(o, "namespace").unwrap_or_default(),
                meta_str(o, "name").unwrap_or_default()
            )
        })
        .collect();
    // Byte order of "namespace/name": '-' < '/' < '0'.
    assert_eq!(keys, ["a-b/x", "a-b/y", "a/x", "a/y", "a0/x", "a0/y"]);
    // Pages continue in the same order.
    let first = s.list(cms(), None, &opts("limit=3")).expect("page 1");
    let token = first.continue_token.expect("more");
    let rest = s
        .list(cms(), None, &opts(&format!("limit=3&continue={token}")))
        .expect("page 2");
    let names: Vec<&str> = first
        .items
        .iter()
        .chain(rest.items.iter())
        .map(|o| meta_str(o, "namespace").unwrap_or_default())
        .collect();
    assert_eq!(names, ["a-b", "a-b", "a", "a", "a0", "a0"]);
    assert_eq!(
        s.list(cms(), Some("a"), &opts(""))
            .expect("one ns")
            .items
            .len(),
        2
    );
}
