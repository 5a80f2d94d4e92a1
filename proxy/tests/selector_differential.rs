//! The proxy's selector parser against kube-sim's, on the same inputs.
//!
//! kube-sim (loadtest/src/sim/selectors.rs) keeps its own implementation of
//! k8s.io/apimachinery's `labels.Parse` and `fields.ParseSelector` as an
//! independent reference. The inputs come from a grammar that mostly writes
//! valid selectors and, often enough, nearly valid ones: keywords as keys and
//! values, empty and doubled commas in value lists, `>`/`<` with values that
//! are not int64s or not label values, whitespace Go does not skip, NUL
//! bytes, escapes in field values and names, bad keys. Both sides must agree
//! on what they accept and, for what they accept, on what they select. When
//! they did not, the apiserver's Go source decided which side was wrong.

use std::collections::BTreeMap;

use breakwater::selector::{FieldSelector, LabelSelector};
use breakwater::watch::filter::{Selector, selectable_fields};
use breakwater_loadtest::sim::selectors as sim;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Value, json};

const CASES: u32 = 512;

/// Whitespace Go skips and, when `noisy`, bytes it does not (vertical tab,
/// NBSP, NUL).
fn space(noisy: bool) -> BoxedStrategy<&'static str> {
    let skipped = prop_oneof![
        2 => Just(""),
        1 => select(vec![" ", "  ", "\t", "\n", "\r"]),
    ];
    if noisy {
        prop_oneof![8 => skipped, 1 => select(vec!["\u{b}", "\u{a0}", "\u{0}"])].boxed()
    } else {
        skipped.boxed()
    }
}

/// Valid keys, keywords among them, and when `noisy` invalid ones.
fn label_key(noisy: bool) -> BoxedStrategy<String> {
    let good = select(vec!["app", "tier", "x.io/k", "in", "notin"]).prop_map(str::to_owned);
    if !noisy {
        return good.boxed();
    }
    let bad = select(vec![
        "gt".to_owned(),
        "-a".to_owned(),
        "k-".to_owned(),
        "A.io/k".to_owned(),
        "/k".to_owned(),
        "k/".to_owned(),
        "a/b/c".to_owned(),
        "x..io/k".to_owned(),
        "é".to_owned(),
        "a_b/k".to_owned(),
        String::new(),
        "k".repeat(64),
        format!("{}/k", "p".repeat(254)),
    ]);
    prop_oneof![4 => good, 1 => bad].boxed()
}

/// Label values (integers among them for `>`/`<`), and when `noisy` values
/// that are not int64s or not label values.
fn label_value(noisy: bool) -> BoxedStrategy<String> {
    let good =
        select(vec!["web", "db", "3", "7", "", "in", "notin", "x.y", "01"]).prop_map(str::to_owned);
    if !noisy {
        return good.boxed();
    }
    let bad = select(vec![
        "-1".to_owned(),
        "+2".to_owned(),
        "-x".to_owned(),
        "x-".to_owned(),
        "1.5".to_owned(),
        "9223372036854775808".to_owned(),
        "a_b".to_owned(),
        "é".to_owned(),
        "v".repeat(64),
    ]);
    prop_oneof![4 => good, 1 => bad].boxed()
}

/// `( ... )` bodies, with Go's comma quirks; the last forms are errors.
fn value_list(noisy: bool) -> impl Strategy<Value = String> {
    let forms = if noisy { 0..16usize } else { 0..10 };
    (label_value(noisy), label_value(noisy), forms, space(noisy)).prop_map(|(a, b, form, sp)| {
        match form {
            0 => "()".to_owned(),
            1 => format!("({a})"),
            2 => format!("({sp}{a}{sp},{sp}{b}{sp})"),
            3 => format!("(,{a})"),
            4 => format!("({a},)"),
            5 => format!("({a},,{b})"),
            6 => "(,)".to_owned(),
            7 => format!("({a},,,)"),
            8 => format!("(,,{a})"),
            9 => format!("({a},{b},{a})"),
            10 => format!("({a},,)"),
            11 => "(,,)".to_owned(),
            12 => format!("({a} {b})"),
            13 => format!("({a}"),
            14 => a,
            _ => format!("({a},={b})"),
        }
    })
}

fn label_term(noisy: bool) -> BoxedStrategy<String> {
    let good_ops = vec!["=", "==", "!=", ">", "<"];
    let exact_op = if noisy {
        prop_oneof![4 => select(good_ops), 1 => select(vec!["gt", "===", "=!", "!", "<="])].boxed()
    } else {
        select(good_ops).boxed()
    };
    let set_op = if noisy {
        select(vec!["in", "notin", "in", "notin", "IN", "in(", "notin("])
    } else {
        select(vec!["in", "notin"])
    };
    let (sp, key, value) = (|| space(noisy), || label_key(noisy), || label_value(noisy));
    let terms = prop_oneof![
        2 => key(),
        2 => (sp(), key()).prop_map(|(sp, k)| format!("!{sp}{k}")),
        6 => (key(), sp(), exact_op, sp(), value())
            .prop_map(|(k, s1, op, s2, v)| format!("{k}{s1}{op}{s2}{v}")),
        4 => (key(), set_op, sp(), value_list(noisy))
            .prop_map(|(k, op, sp, body)| format!("{k} {op}{sp}{body}")),
    ];
    if noisy {
        prop_oneof![
            12 => terms,
            1 => select(vec!["=", ",", "(", ")", "!", "=x", "!!k", "k ! v"]).prop_map(str::to_owned),
        ]
        .boxed()
    } else {
        terms.boxed()
    }
}

/// Half clean (valid unless a `>`/`<` value is not an integer), half noisy.
fn label_selector() -> impl Strategy<Value = String> {
    any::<bool>().prop_flat_map(|noisy| {
        let sep = if noisy {
            prop_oneof![
                8 => Just(",".to_owned()),
                3 => (space(true), space(true)).prop_map(|(a, b)| format!("{a},{b}")),
                1 => select(vec![",,", "", " "]).prop_map(str::to_owned),
            ]
            .boxed()
        } else {
            (space(false), space(false))
                .prop_map(|(a, b)| format!("{a},{b}"))
                .boxed()
        };
        (
            space(noisy),
            prop::collection::vec((label_term(noisy), sep), 0..5),
            space(noisy),
        )
            .prop_map(|(lead, terms, trail)| {
                let mut out = lead.to_owned();
                let count = terms.len();
                for (i, (term, sep)) in terms.into_iter().enumerate() {
                    out.push_str(&term);
                    if i + 1 < count {
                        out.push_str(&sep);
                    }
                }
                out.push_str(trail);
                out
            })
    })
}

fn label_set() -> impl Strategy<Value = BTreeMap<String, String>> {
    let value = prop::option::of(select(vec!["web", "db", "3", "7", "", "-1", "in", "x.y"]));
    prop::collection::vec(value, 5).prop_map(|values| {
        ["app", "tier", "x.io/k", "in", "notin"]
            .into_iter()
            .zip(values)
            .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned())))
            .collect()
    })
}

fn field_term() -> impl Strategy<Value = String> {
    let field = prop_oneof![
        8 => select(vec![
            "metadata.name",
            "metadata.namespace",
            "spec.nodeName",
            "status.phase",
            "spec.hostNetwork",
        ]),
        1 => select(vec!["a\\", "spec.bogus", "", " spec.nodeName", "a!b", "x\\,y"]),
    ];
    let op = prop_oneof![
        8 => select(vec!["=", "==", "!="]),
        1 => select(vec!["", "===", "!==", "=!", "!"]),
    ];
    let value = prop_oneof![
        8 => select(vec!["node-1", "", "p", "d", "Running", "false", "true", "a\\,b"]),
        2 => select(vec!["a\\=b", "a\\\\b", "a=b", "a\\x", "a\\", "x,y", " p", "é"]),
    ];
    (field, op, value).prop_map(|(f, op, v)| format!("{f}{op}{v}"))
}

fn field_selector() -> impl Strategy<Value = String> {
    let sep = prop_oneof![8 => Just(","), 1 => Just(",,"), 1 => Just("\\,")];
    (
        prop::collection::vec((field_term(), sep), 0..4),
        any::<bool>(),
    )
        .prop_map(|(terms, trailing)| {
            let mut out = String::new();
            let count = terms.len();
            for (i, (term, sep)) in terms.into_iter().enumerate() {
                out.push_str(&term);
                if i + 1 < count || trailing {
                    out.push_str(sep);
                }
            }
            out
        })
}

fn pod() -> impl Strategy<Value = Value> {
    (
        label_set(),
        select(vec!["p", "a,b", "a=b"]),
        prop::option::of(select(vec!["node-1", "node-2", ""])),
        prop::option::of(select(vec!["Running", "Pending"])),
        prop::option::of(any::<bool>()),
    )
        .prop_map(|(labels, name, node, phase, host)| {
            let mut spec = json!({});
            if let Some(node) = node {
                spec["nodeName"] = json!(node);
            }
            if let Some(host) = host {
                spec["hostNetwork"] = json!(host);
            }
            let status = phase.map_or_else(|| json!({}), |phase| json!({"phase": phase}));
            json!({"kind": "Pod",
                   "metadata": {"name": name, "namespace": "d", "resourceVersion": "7",
                                "labels": labels},
                   "spec": spec, "status": status})
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn label_selectors_parse_and_match_like_kube_sim(
        selector in label_selector(),
        labels in label_set(),
    ) {
        let ours = LabelSelector::parse(&selector);
        let theirs = sim::LabelSelector::parse(&selector);
        prop_assert_eq!(
            ours.is_ok(), theirs.is_ok(),
            "{:?}: proxy {:?}, kube-sim {:?}", selector, ours, theirs
        );
        if let (Ok(ours), Ok(theirs)) = (ours, theirs) {
            let object = json!({"metadata": {"labels": labels}});
            prop_assert_eq!(
                ours.matches(&labels), theirs.matches(&object),
                "{:?} on {:?}", selector, labels
            );
        }
    }

    #[test]
    fn field_selectors_parse_and_name_objects_like_kube_sim(selector in field_selector()) {
        let ours = FieldSelector::parse(&selector);
        let theirs = sim::FieldSelector::parse(&selector);
        prop_assert_eq!(
            ours.is_ok(), theirs.is_ok(),
            "{:?}: proxy {:?}, kube-sim {:?}", selector, ours, theirs
        );
        if let (Ok(ours), Ok(theirs)) = (ours, theirs) {
            prop_assert_eq!(
                ours.requires_exact_match("metadata.name"), theirs.exact_name(),
                "{:?}", selector
            );
        }
    }

    /// Short strings over the grammar's alphabet, for what the grammar above
    /// does not think of.
    #[test]
    fn grammar_soup_parses_alike(selector in "[aiknot!=,()<> \t\u{0}\u{b}./09\\-]{0,16}") {
        prop_assert_eq!(
            LabelSelector::parse(&selector).is_ok(),
            sim::LabelSelector::parse(&selector).is_ok(),
            "labelSelector {:?}", selector
        );
        prop_assert_eq!(
            FieldSelector::parse(&selector).is_ok(),
            sim::FieldSelector::parse(&selector).is_ok(),
            "fieldSelector {:?}", selector
        );
    }

    /// The watch hub's whole decision on pods: whether it takes the watch
    /// (kube-sim, like the apiserver, answers 400 to what it does not take)
    /// and which objects the subscriber sees, from the fields the hub reads
    /// out of the object's bytes.
    #[test]
    fn watch_selectors_agree_with_kube_sim_on_pods(
        label in label_selector(),
        field in field_selector(),
        object in pod(),
    ) {
        let fields = selectable_fields("", "pods");
        let ours = Selector::parse(Some(&label), Some(&field), fields);
        let theirs = sim::LabelSelector::parse(&label)
            .and_then(|l| Ok((l, sim::FieldSelector::parse_for("Pod", &field)?)));
        prop_assert_eq!(
            ours.is_some(), theirs.is_ok(),
            "labels {:?} fields {:?}: kube-sim {:?}", label, field, theirs
        );
        if let (Some(ours), Ok((labels, fields_sel))) = (ours, theirs) {
            let bytes = serde_json::to_vec(&object).expect("json");
            let meta = breakwater::watch::object::read(&bytes, fields).expect("an object").meta;
            prop_assert_eq!(
                ours.matches(&meta),
                labels.matches(&object) && fields_sel.matches(&object),
                "labels {:?} fields {:?} on {}", label, field, object
            );
        }
    }
}
