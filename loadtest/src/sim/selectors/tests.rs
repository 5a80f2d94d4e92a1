use proptest::prelude::*;
use serde_json::json;

use super::*;

fn labelled(labels: Value) -> Value {
    json!({"kind": "ConfigMap", "metadata": {"name": "x", "namespace": "ns", "labels": labels}})
}

fn sel(s: &str) -> LabelSelector {
    LabelSelector::parse(s).expect("valid selector")
}

#[test]
fn empty_label_selector_matches_everything() {
    let s = sel("");
    assert!(s.is_empty());
    assert!(s.matches(&json!({})));
    assert!(LabelSelector::default().matches(&labelled(json!({"a": "b"}))));
}

#[test]
fn equality_operators_need_the_label_with_that_value() {
    let obj = labelled(json!({"team": "blue", "tier": "web"}));
    assert!(sel("team=blue").matches(&obj));
    assert!(sel("team==blue").matches(&obj));
    assert!(sel(" team = blue , tier=web ").matches(&obj));
    assert!(!sel("team=red").matches(&obj));
    assert!(!sel("team=blue,tier=db").matches(&obj));
    assert!(!sel("team=blue").matches(&labelled(json!({}))));
}

#[test]
fn inequality_and_notin_match_objects_without_the_label() {
    let none = labelled(json!({}));
    let blue = labelled(json!({"team": "blue"}));
    assert!(sel("team!=blue").matches(&none));
    assert!(!sel("team!=blue").matches(&blue));
    assert!(sel("team notin (blue,red)").matches(&none));
    assert!(!sel("team notin (blue,red)").matches(&blue));
    assert!(sel("team notin (red)").matches(&blue));
}

#[test]
fn set_and_existence_operators() {
    let blue = labelled(json!({"team": "blue"}));
    assert!(sel("team in (red, blue)").matches(&blue));
    assert!(!sel("team in (red)").matches(&blue));
    assert!(sel("team").matches(&blue));
    assert!(!sel("!team").matches(&blue));
    assert!(sel("!owner").matches(&blue));
    assert!(!sel("owner").matches(&blue));
    assert!(sel("example.com/team").matches(&labelled(json!({"example.com/team": "x"}))));
}

#[test]
fn empty_value_selects_the_empty_label() {
    assert!(sel("a=").matches(&labelled(json!({"a": ""}))));
    assert!(!sel("a=").matches(&labelled(json!({"a": "x"}))));
    assert!(sel("a in (x,)").matches(&labelled(json!({"a": ""}))));
}

#[test]
fn numeric_comparisons() {
    let obj = labelled(json!({"n": "5"}));
    assert!(sel("n>3").matches(&obj));
    assert!(!sel("n<3").matches(&obj));
    assert!(!sel("m>3").matches(&obj));
    assert!(LabelSelector::parse("n>x").is_err());
}

#[test]
fn malformed_label_selectors_are_rejected_with_apiserver_wording() {
    for bad in [
        "=a",
        "a b",
        "a in b",
        "a in (b",
        "!a=b",
        "a,",
        "a=(b)",
        "a in (b,,)",
        ",",
    ] {
        assert!(LabelSelector::parse(bad).is_err(), "{bad} should fail");
    }
    let e = LabelSelector::parse("Bad Key=x").expect_err("space in key");
    assert!(e.0.starts_with("found 'Key'"), "{e}");
    let e = LabelSelector::parse("-a=x").expect_err("bad key");
    assert!(
        e.0.starts_with("unable to parse requirement: key: Invalid value: \"-a\""),
        "{e}"
    );
    let e = LabelSelector::parse("a=-x").expect_err("bad value");
    assert!(
        e.0.starts_with("unable to parse requirement: values[0][a]: Invalid value: \"-x\""),
        "{e}"
    );
}

/// Cases read off labels/selector.go where a tidier grammar would differ.
#[test]
fn label_grammar_keeps_the_apiserver_quirks() {
    let empty = labelled(json!({"a": ""}));
    // `()` is the empty value, not an empty set.
    assert!(sel("a in ()").matches(&empty));
    assert!(!sel("a notin ()").matches(&empty));
    // Two commas before `)` are an error, one or three are not.
    for ok in [
        "a in (,)",
        "a in (x,)",
        "a in (x,,,)",
        "a in (,,x)",
        "a in (x,,y)",
    ] {
        assert!(sel(ok).matches(&empty), "{ok}");
    }
    for bad in ["a in (x,,)", "a in (,,)", "a in (x y)"] {
        assert!(LabelSelector::parse(bad).is_err(), "{bad}");
    }
    // `in`/`notin` are keywords only where an operator goes.
    assert!(sel("in=notin,x in (in)").matches(&labelled(json!({"in": "notin", "x": "in"}))));
    // Only space, tab, CR and LF separate tokens.
    assert!(sel(" a\t=\r\n").matches(&empty));
    for bad in ["a\u{b}=x", "a\u{a0}=x"] {
        assert!(LabelSelector::parse(bad).is_err(), "{bad:?}");
    }
    // A NUL ends the selector where a token starts; after a token it is skipped.
    assert!(sel("a=\u{0}x").matches(&labelled(json!({"a": "x"}))));
    assert!(sel("a= \u{0}!!!").matches(&empty));
    // `>`/`<` values are int64s and label values.
    assert!(sel("n>01").matches(&labelled(json!({"n": "2"}))));
    for bad in ["n>-1", "n>+1", "n>1.5", "n>"] {
        assert!(LabelSelector::parse(bad).is_err(), "{bad}");
    }
}

fn pod(node: &str, phase: &str) -> Value {
    json!({"kind": "Pod", "metadata": {"name": "p", "namespace": "ns"},
           "spec": {"nodeName": node}, "status": {"phase": phase}})
}

#[test]
fn field_selectors_compare_pod_fields() {
    let p = pod("node-1", "Running");
    let f = |s: &str| FieldSelector::parse_for("Pod", s).expect("valid");
    assert!(f("spec.nodeName=node-1").matches(&p));
    assert!(f("spec.nodeName==node-1,status.phase=Running").matches(&p));
    assert!(!f("spec.nodeName=node-2").matches(&p));
    assert!(f("spec.nodeName!=node-2").matches(&p));
    assert!(f("metadata.namespace=ns,metadata.name=p").matches(&p));
    assert!(f("spec.hostNetwork=false").matches(&p));
    // An unscheduled pod has spec.nodeName "".
    assert!(f("spec.nodeName=").matches(&pod("", "Pending")));
    assert!(FieldSelector::default().matches(&p));
}

#[test]
fn field_selectors_on_other_types() {
    let node = json!({"kind": "Node", "metadata": {"name": "n"}, "spec": {"unschedulable": true}});
    assert!(
        FieldSelector::parse_for("Node", "spec.unschedulable=true")
            .expect("ok")
            .matches(&node)
    );
    let node2 = json!({"kind": "Node", "metadata": {"name": "n"}, "spec": {}});
    assert!(
        FieldSelector::parse_for("Node", "spec.unschedulable=false")
            .expect("ok")
            .matches(&node2)
    );
    let ev = json!({"kind": "Event", "metadata": {"name": "e"}, "involvedObject": {"kind": "Pod", "name": "p"},
                    "reason": "Started", "type": "Normal", "source": {"component": "kubelet"}});
    let f = FieldSelector::parse_for(
        "Event",
        "involvedObject.kind=Pod,involvedObject.name=p,source=kubelet,type=Normal,reason=Started",
    )
    .expect("ok");
    assert!(f.matches(&ev));
    let secret = json!({"kind": "Secret", "metadata": {"name": "s"}, "type": "Opaque"});
    assert!(
        FieldSelector::parse_for("Secret", "type=Opaque")
            .expect("ok")
            .matches(&secret)
    );
}

#[test]
fn unsupported_field_label_uses_the_apiserver_message() {
    let e = FieldSelector::parse_for("Pod", "spec.bogus=x").expect_err("unsupported");
    assert_eq!(e.0, "field label not supported: spec.bogus");
    let e = FieldSelector::parse_for("ConfigMap", "spec.nodeName=x").expect_err("unsupported");
    assert_eq!(e.0, "field label not supported: spec.nodeName");
    assert!(FieldSelector::parse_for("ConfigMap", "metadata.name=x").is_ok());
}

#[test]
fn malformed_field_selectors_are_rejected() {
    let e = FieldSelector::parse("abc").expect_err("no operator");
    assert_eq!(e.0, "invalid selector: 'abc'; can't understand 'abc'");
    assert!(FieldSelector::parse("a=b\\").is_err());
    // Field names have no escapes: this is name `a\`, value `b=c`.
    assert!(FieldSelector::parse("a\\=b=c").is_err());
    assert!(FieldSelector::parse("a\\=b").is_ok());
}

#[test]
fn exact_name_is_the_first_in_sorted_term_order() {
    let f = FieldSelector::parse("metadata.name=b,metadata.name=a").expect("valid");
    assert_eq!(f.exact_name(), Some("a"));
}

#[test]
fn escaped_field_values_round_trip() {
    let f = FieldSelector::parse("metadata.name=a\\,b").expect("escaped comma");
    assert!(f.matches(&json!({"metadata": {"name": "a,b"}})));
    assert_eq!(f.exact_name(), Some("a,b"));
}

proptest! {
    #[test]
    fn label_parse_never_panics(s in "\\PC{0,40}") {
        let _ = LabelSelector::parse(&s);
    }

    #[test]
    fn label_parse_never_panics_on_grammar_soup(s in "[a-z!=,() <>in]{0,30}") {
        if let Ok(sel) = LabelSelector::parse(&s) {
            let _ = sel.matches(&labelled(json!({"a": "b", "in": "x"})));
        }
    }

    #[test]
    fn field_parse_never_panics(s in "\\PC{0,40}") {
        if let Ok(sel) = FieldSelector::parse(&s) {
            let _ = sel.matches(&pod("n", "Running"));
            let _ = sel.check_supported("Pod");
        }
    }

    #[test]
    fn equality_selector_matches_exactly_that_value(v in "[a-z0-9]{1,10}", w in "[a-z0-9]{1,10}") {
        let s = LabelSelector::parse(&format!("k={v}")).expect("valid");
        prop_assert_eq!(s.matches(&labelled(json!({"k": w.clone()}))), v == w);
        let n = LabelSelector::parse(&format!("k!={v}")).expect("valid");
        prop_assert_eq!(n.matches(&labelled(json!({"k": w.clone()}))), v != w);
    }
}
