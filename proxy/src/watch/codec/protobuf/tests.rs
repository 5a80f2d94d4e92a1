//! The protobuf codec against a real kube-apiserver v1.24's recordings and
//! their JSON twins (loadtest/tests/fixtures/apiserver-v1.24-protobuf).

use super::*;
use crate::watch::codec::{Codec, EventType};
use crate::watch::filter::selectable_fields;
use serde_json::Value;

fn fixture(name: &str) -> Bytes {
    let path = format!(
        "{}/../loadtest/tests/fixtures/apiserver-v1.24-protobuf/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    Bytes::from(std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}")))
}

const POD_FIELDS: fn() -> &'static [&'static str] = || selectable_fields("", "pods");

/// Every frame of a recorded watch, cut and decoded by the hub's codec.
fn frames(name: &str) -> Vec<(EventType, Bytes, Bytes)> {
    let mut buf = BytesMut::from(&fixture(name)[..]);
    let mut out = Vec::new();
    while let Some(frame) = Codec::Protobuf.next_frame(&mut buf).expect("a frame") {
        let ev = Codec::Protobuf
            .decode_event(&frame)
            .expect("decodes")
            .expect("an event");
        out.push((ev.ty.expect("a known type"), ev.object, frame));
    }
    assert!(buf.is_empty(), "{name}: {} trailing bytes", buf.len());
    out
}

/// (type, namespace/name, resourceVersion) of each JSON twin line.
fn twin(name: &str) -> Vec<(String, String, u64)> {
    String::from_utf8(fixture(name).to_vec())
        .expect("utf-8")
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("json");
            let m = &v["object"]["metadata"];
            let ns = m["namespace"].as_str().unwrap_or_default();
            let name = m["name"].as_str().unwrap_or_default();
            (
                v["type"].as_str().unwrap_or_default().to_string(),
                if name.is_empty() {
                    String::new()
                } else {
                    format!("{ns}/{name}")
                },
                m["resourceVersion"]
                    .as_str()
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0),
            )
        })
        .collect()
}

fn summary(frames: &[(EventType, Bytes, Bytes)]) -> Vec<(String, String, u64)> {
    frames
        .iter()
        .map(|(ty, obj, _)| {
            let m = Codec::Protobuf.read(obj, &[]).expect("reads").meta;
            let key = if m.name.is_empty() {
                String::new()
            } else {
                format!("{}/{}", m.namespace, m.name)
            };
            (ty.as_str().to_string(), key, m.rv)
        })
        .collect()
}

#[test]
fn recorded_watches_decode_to_their_json_twins() {
    for (pb, json) in [
        ("watch-pods.pb", "watch-pods.jsonl"),
        ("watch-pods-node-a.pb", "watch-pods-node-a.jsonl"),
    ] {
        let f = frames(pb);
        assert_eq!(summary(&f), twin(json), "{pb}");
    }
    // The twins of the others were not recorded; their shape is known.
    let label = summary(&frames("watch-pods-label-agent.pb"));
    assert!(
        label.contains(&("DELETED".into(), "pbfix/pa3".into(), label[3].2)),
        "pa3 leaves app=agent as DELETED: {label:?}"
    );
    let rv0 = summary(&frames("watch-pods-rv0.pb"));
    assert!(rv0.iter().take(3).all(|(t, _, _)| t == "ADDED"), "{rv0:?}");
}

#[test]
fn objects_read_with_their_labels_and_selectable_fields() {
    let f = frames("watch-pods-node-a.pb");
    let (ty, obj, _) = &f[1];
    assert_eq!(*ty, EventType::Added);
    let read = Codec::Protobuf.read(obj, POD_FIELDS()).expect("reads");
    assert_eq!(read.meta.name, "pu1");
    assert_eq!(read.meta.labels, vec![("app".into(), "agent".into())]);
    let at = |f: &str| POD_FIELDS().iter().position(|x| *x == f).expect("field");
    assert_eq!(read.meta.fields[at("spec.nodeName")], "node-a");
    assert_eq!(read.meta.fields[at("spec.hostNetwork")], "false");
    assert_eq!(read.meta.fields[at("spec.restartPolicy")], "Always");
    assert_eq!(read.meta.fields[at("status.phase")], "Pending");
    assert!(read.type_meta.uniform() == Some(true));
    // The same fields as the JSON twin's object, by the JSON reader.
    let lines = fixture("watch-pods-node-a.jsonl");
    let line = std::str::from_utf8(&lines)
        .expect("utf-8")
        .lines()
        .nth(1)
        .expect("a line");
    let v: Value = serde_json::from_str(line).expect("json");
    let json = serde_json::to_vec(&v["object"]).expect("json");
    let from_json = Codec::Json.read(&json, POD_FIELDS()).expect("reads");
    assert_eq!(read.meta, from_json.meta);
}

#[test]
fn every_selectable_field_has_a_place_in_its_message() {
    for (resource, kind) in [
        ("pods", "Pod"),
        ("events", "Event"),
        ("secrets", "Secret"),
        ("nodes", "Node"),
        ("namespaces", "Namespace"),
    ] {
        for field in selectable_fields("", resource) {
            assert!(
                field_tags(kind.as_bytes(), field).is_some(),
                "{kind} {field}"
            );
        }
    }
}

#[test]
fn lists_decode_and_rebuild_byte_for_byte() {
    let body = fixture("list-pods.pb");
    let page = Codec::Protobuf.decode_list(&body).expect("a list");
    assert_eq!(page.kind, "Pod");
    assert_eq!(page.api_version, "v1");
    let json: Value = serde_json::from_slice(&fixture("list-pods.json")).expect("json");
    assert_eq!(
        page.resource_version,
        json["metadata"]["resourceVersion"].as_str().expect("rv")
    );
    assert_eq!(
        page.items.len(),
        json["items"].as_array().expect("items").len()
    );
    let tm = Codec::Protobuf.item_type_meta(&page.kind, &page.api_version);
    let mut names = Vec::new();
    let mut objs = Vec::new();
    for item in &page.items {
        let (read, full) = Codec::Protobuf
            .read_item(item, &tm, POD_FIELDS())
            .expect("an item");
        assert!(
            body.as_ptr_range().contains(&item.as_ptr()),
            "items share the body, not copied"
        );
        names.push(read.meta.name.clone());
        objs.push(full);
    }
    let json_names: Vec<&str> = json["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["metadata"]["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, json_names);
    let rv: u64 = page.resource_version.parse().expect("rv");
    let rebuilt = Codec::Protobuf
        .list("Pod", "v1", rv, objs.iter().map(|o| &o[..]), false)
        .expect("a list");
    assert_eq!(rebuilt, &body[..], "the hub's LIST is the apiserver's");

    let limited = Codec::Protobuf
        .decode_list(&fixture("list-pods-limit1.pb"))
        .expect("a list");
    assert_eq!(limited.items.len(), 1);
    assert!(limited.cont.is_some(), "continue token");
}

#[test]
fn the_410_frame_is_the_apiservers() {
    let recorded = fixture("watch-too-old.pb");
    let f = frames("watch-too-old.pb");
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].0, EventType::Error);
    assert_eq!(Codec::Protobuf.status_code(&f[0].1), Some(410));
    // "too old resource version: 2 (3431)"
    assert_eq!(&Codec::Protobuf.expired(2, 3431)[..], &recorded[..]);
    let status = fixture("error-404.pb");
    assert_eq!(Codec::Protobuf.status_code(&status), Some(404));
}

#[test]
fn events_and_bookmarks_rebuild_as_the_apiserver_frames_them() {
    for (ty, obj, frame) in frames("watch-pods.pb") {
        if ty == EventType::Bookmark {
            let rv = Codec::Protobuf.read(&obj, &[]).expect("reads").meta.rv;
            let ours = Codec::Protobuf.bookmark("Pod", "v1", rv, false);
            let (t, o) = decode_event(&ours).expect("decodes");
            assert_eq!(t, "BOOKMARK");
            let u = unwrap(&o).expect("an envelope");
            assert_eq!((u.kind, u.api_version), (&b"Pod"[..], &b"v1"[..]));
            assert_eq!(Codec::Protobuf.read(&o, &[]).expect("reads").meta.rv, rv);
        } else {
            assert_eq!(Codec::Protobuf.event(ty, &obj), frame, "{ty:?}");
        }
    }
    let end = Codec::Protobuf.bookmark("Pod", "v1", 9, true);
    let (_, o) = decode_event(&end).expect("decodes");
    let meta = bytes_field(raw(&o).expect("raw"), 1)
        .expect("scans")
        .expect("metadata");
    let entry = bytes_field(meta, 12).expect("scans").expect("annotation");
    assert_eq!(
        bytes_field(entry, 1).expect("scans"),
        Some(&b"k8s.io/initial-events-end"[..])
    );
}

#[test]
fn at_resource_version_changes_only_the_resource_version() {
    let f = frames("watch-pods.pb");
    let (_, obj, _) = &f[0];
    let before = Codec::Protobuf.read(obj, POD_FIELDS()).expect("reads");
    let moved = Codec::Protobuf.at_resource_version(obj, 987_654_321);
    let after = Codec::Protobuf.read(&moved, POD_FIELDS()).expect("reads");
    assert_eq!(after.meta.rv, 987_654_321);
    assert_eq!(
        crate::watch::filter::Meta {
            rv: before.meta.rv,
            ..after.meta.clone()
        },
        before.meta
    );
    assert_eq!(moved.len(), obj.len() + 4, "\"13440\" became 9 digits");
    let back = Codec::Protobuf.at_resource_version(&moved, before.meta.rv);
    assert_eq!(back, &obj[..]);
}

#[test]
fn malformed_input_is_an_error_never_a_panic() {
    let f = frames("watch-pods.pb");
    let (_, obj, frame) = &f[0];
    for cut in [0, 3, 5, 40, obj.len() / 2, obj.len() - 1] {
        let _ = Codec::Protobuf.read(&obj[..cut], POD_FIELDS());
        let _ = Codec::Protobuf.decode_event(&frame.slice(..cut.min(frame.len())));
        let _ = Codec::Protobuf.decode_list(&obj.slice(..cut));
    }
    let mut huge = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0x0a][..]);
    assert!(
        Codec::Protobuf.next_frame(&mut huge).is_err(),
        "4 GiB frame"
    );
    assert!(Codec::Protobuf.read(b"not protobuf", &[]).is_err());
}
