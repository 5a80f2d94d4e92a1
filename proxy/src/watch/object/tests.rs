use super::*;
use crate::watch::filter::selectable_fields;
use proptest::prelude::*;
use serde_json::{Value, json};

fn pods() -> &'static [&'static str] {
    selectable_fields("", "pods")
}

fn field<'a>(read: &'a Read, fields: &[&str], name: &str) -> &'a str {
    let i = fields.iter().position(|f| *f == name).expect("selectable");
    &read.meta.fields[i]
}

#[test]
fn read_takes_the_key_rv_labels_and_selectable_fields_in_one_pass() {
    let pod = br#"{"metadata":{"name":"p","namespace":"d","resourceVersion":"42",
        "managedFields":[{"manager":"x","fieldsV1":{"f:spec":{}}}],
        "labels":{"app":"web","tier":"3"}},
        "spec":{"nodeName":"node-1","containers":[{"name":"c"}],"restartPolicy":"Always"},
        "status":{"phase":"Running","podIP":"10.0.0.1"}}"#;
    let read = read(pod, pods()).expect("a pod");
    assert_eq!(
        (
            read.meta.namespace.as_str(),
            read.meta.name.as_str(),
            read.meta.rv
        ),
        ("d", "p", 42)
    );
    assert_eq!(
        read.meta.labels,
        vec![
            ("app".to_string(), "web".to_string()),
            ("tier".to_string(), "3".to_string())
        ]
    );
    assert_eq!(field(&read, pods(), "spec.nodeName"), "node-1");
    assert_eq!(field(&read, pods(), "spec.restartPolicy"), "Always");
    assert_eq!(field(&read, pods(), "status.phase"), "Running");
    assert_eq!(field(&read, pods(), "status.podIP"), "10.0.0.1");
    // Absent: booleans read "false", strings "".
    assert_eq!(field(&read, pods(), "spec.hostNetwork"), "false");
    assert_eq!(field(&read, pods(), "spec.schedulerName"), "");
    assert_eq!(read.type_meta, TypeMeta::default());
}

#[test]
fn read_renders_fields_as_get_attrs_does() {
    let pod = br#"{"spec":{"hostNetwork":true,"nodeName":null,"schedulerName":"a\"b"},"status":7}"#;
    let read = read(pod, pods()).expect("a pod");
    assert_eq!(field(&read, pods(), "spec.hostNetwork"), "true");
    assert_eq!(field(&read, pods(), "spec.nodeName"), "");
    assert_eq!(field(&read, pods(), "spec.schedulerName"), "a\"b");
    // Not an object on the way: the field is absent.
    assert_eq!(field(&read, pods(), "status.phase"), "");
    let events = selectable_fields("", "events");
    let event = br#"{"kind":"Event","apiVersion":"v1","metadata":{"name":"e"},
        "involvedObject":{"kind":"Pod","name":"p"},"reason":"Started","type":"Normal",
        "source":{"component":"kubelet","host":"n"}}"#;
    let read = super::read(event, events).expect("an event");
    assert_eq!(field(&read, events, "involvedObject.kind"), "Pod");
    assert_eq!(field(&read, events, "involvedObject.name"), "p");
    assert_eq!(field(&read, events, "reason"), "Started");
    assert_eq!(field(&read, events, "type"), "Normal");
    assert_eq!(field(&read, events, "source"), "kubelet");
    assert_eq!(
        read.type_meta,
        TypeMeta {
            kind: true,
            api_version: true
        }
    );
}

#[test]
fn read_refuses_what_is_not_one_object() {
    let bad: [&[u8]; 4] = [b"[1]", b"{\"metadata\":{\"name\":1}}", b"{} {}", b"{"];
    for bad in bad {
        assert!(read(bad, &[]).is_err(), "{}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn complete_adds_only_missing_type_meta_and_keeps_the_rest_byte_for_byte() {
    let tm = TypeMetaJson::new("Pod", "v1");
    let cases: [(&str, &str); 5] = [
        (
            r#"{"metadata":{"name":"a"},"n":1.0e3}"#,
            r#"{"kind":"Pod","apiVersion":"v1","metadata":{"name":"a"},"n":1.0e3}"#,
        ),
        (
            r#"{"apiVersion":"v1","metadata":{},"kind":"Pod"}"#,
            r#"{"apiVersion":"v1","metadata":{},"kind":"Pod"}"#,
        ),
        (
            r#"{"apiVersion":"v1","metadata":{}}"#,
            r#"{"kind":"Pod","apiVersion":"v1","metadata":{}}"#,
        ),
        (r#"{"kind":"Pod"}"#, r#"{"apiVersion":"v1","kind":"Pod"}"#),
        ("{}", r#"{"kind":"Pod","apiVersion":"v1"}"#),
    ];
    for (object, want) in cases {
        let has = read(object.as_bytes(), &[]).expect("object").type_meta;
        assert_eq!(
            std::str::from_utf8(&tm.complete(object.as_bytes(), has)).expect("utf-8"),
            want
        );
    }
}

#[test]
fn write_without_cuts_type_meta_wherever_it_is() {
    let tm = TypeMetaJson::new("Pod", "v1");
    let cases: [(&str, &str); 5] = [
        (
            r#"{"kind":"Pod","apiVersion":"v1","metadata":{}}"#,
            r#"{"metadata":{}}"#,
        ),
        (
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{}}"#,
            r#"{"metadata":{}}"#,
        ),
        (
            r#"{"metadata":{"kind":"x"}, "kind" : "Pod","n":1.50,"apiVersion":"v1"}"#,
            r#"{"metadata":{"kind":"x"},"n":1.50}"#,
        ),
        (r#"{"\u006bind":"Pod","metadata":{}}"#, r#"{"metadata":{}}"#),
        (r#"{"kind":"Pod","apiVersion":"v1"}"#, "{}"),
    ];
    for (object, want) in cases {
        let mut out = b"[".to_vec();
        tm.write_without(&mut out, object.as_bytes());
        assert_eq!(
            std::str::from_utf8(&out[1..]).expect("utf-8"),
            want,
            "{object}"
        );
    }
}

#[test]
fn at_resource_version_changes_only_the_resource_version() {
    let cases: [(&str, &str); 4] = [
        (
            r#"{"kind":"Pod","metadata":{"name":"a","resourceVersion":"5"},"n":1.0}"#,
            r#"{"kind":"Pod","metadata":{"name":"a","resourceVersion":"9"},"n":1.0}"#,
        ),
        (
            r#"{"metadata":{"name":"a"},"n":1.0}"#,
            r#"{"metadata":{"resourceVersion":"9","name":"a"},"n":1.0}"#,
        ),
        (
            r#"{"metadata":{}}"#,
            r#"{"metadata":{"resourceVersion":"9"}}"#,
        ),
        (r#"{"n":1}"#, r#"{"n":1}"#),
    ];
    for (object, want) in cases {
        assert_eq!(
            String::from_utf8(at_resource_version(object.as_bytes(), 9)).expect("utf-8"),
            want
        );
    }
}

#[test]
fn one_line_drops_whitespace_outside_strings_only() {
    let pretty = "{\n  \"a\": \"x y\\\" \\n z\",\n  \"b\": [ 1, 2 ]\n}";
    assert_eq!(
        std::str::from_utf8(&one_line(pretty.as_bytes())).expect("utf-8"),
        r#"{"a":"x y\" \n z","b":[1,2]}"#
    );
    let compact = br#"{"a": "x y"}"#;
    assert!(matches!(one_line(compact), Cow::Borrowed(b) if b == compact));
}

fn member() -> impl Strategy<Value = (String, Value)> {
    let key = prop::sample::select(vec!["kind", "apiVersion", "metadata", "spec", "data", "z"]);
    let value = prop_oneof![
        Just(json!("Widget")),
        Just(json!({"name": "w", "resourceVersion": "3"})),
        Just(json!(1.5)),
        Just(json!([{"kind": "inner"}])),
        Just(json!(null)),
    ];
    // `read` refuses an object whose metadata is not one (no apiserver
    // sends such a thing); any other member may be anything.
    (key, value).prop_map(|(k, v)| {
        let v = if k == "metadata" {
            json!({"name": "w", "resourceVersion": "3"})
        } else {
            v
        };
        (k.to_string(), v)
    })
}

proptest! {
    /// Whatever members an object has, in whatever order: completed, it
    /// has each TypeMeta key once and everything else unchanged; written
    /// without, it has neither and everything else unchanged.
    #[test]
    fn complete_and_write_without_never_duplicate_or_lose_a_member(
        members in prop::collection::vec(member(), 0..6),
    ) {
        let mut object = String::from("{");
        let mut seen = std::collections::HashSet::new();
        let mut others = serde_json::Map::new();
        for (k, v) in &members {
            if !seen.insert(k.clone()) {
                continue;
            }
            if object.len() > 1 {
                object.push(',');
            }
            object.push_str(&format!("{}:{v}", json!(k)));
            if k != "kind" && k != "apiVersion" {
                others.insert(k.clone(), v.clone());
            }
        }
        object.push('}');
        let tm = TypeMetaJson::new("Widget", "example.com/v1");
        let has = read(object.as_bytes(), &[]).expect("object").type_meta;
        let full = tm.complete(object.as_bytes(), has);
        let keys = |b: &[u8]| -> Vec<String> {
            let mut de = serde_json::Deserializer::from_slice(b);
            struct Keys;
            impl<'de> Visitor<'de> for Keys {
                type Value = Vec<String>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Vec<String>, A::Error> {
                    let mut out = Vec::new();
                    while let Some(k) = m.next_key::<String>()? {
                        m.next_value::<IgnoredAny>()?;
                        out.push(k);
                    }
                    Ok(out)
                }
            }
            de.deserialize_map(Keys).expect("an object")
        };
        let full_keys = keys(&full);
        for k in ["kind", "apiVersion"] {
            prop_assert_eq!(full_keys.iter().filter(|x| *x == k).count(), 1, "{}", String::from_utf8_lossy(&full));
        }
        prop_assert_eq!(full_keys.len(), others.len() + 2);
        let mut listed = Vec::new();
        tm.write_without(&mut listed, &full);
        let listed_keys = keys(&listed);
        prop_assert_eq!(listed_keys.len(), others.len());
        let listed: Value = serde_json::from_slice(&listed).expect("json");
        prop_assert_eq!(listed, Value::Object(others));
    }
}
