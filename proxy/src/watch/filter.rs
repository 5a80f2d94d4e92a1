//! Label and field selectors, evaluated locally with the apiserver's rules.
//!
//! Node-scoped watches (`fieldSelector=spec.nodeName=X`) from thousands of
//! agents share one broad upstream watch; each client's selector is then
//! applied here, per event, to the few fields parsed out of the object
//! ([`Meta`]). This is an independent implementation of
//! k8s.io/apimachinery's `labels.Parse` / `fields.ParseSelector` semantics
//! and of the per-type field sets (`GetAttrs`) for the covered types. A
//! selector this module cannot evaluate exactly (an unknown field label, a
//! field of a type it does not know) is never broadened: the hub gives the
//! request back to the proxy, which forwards it as is.
//!
//! [`Transition`] encodes the apiserver's rule for a changed object: old
//! matched & new matches → MODIFIED; only new → ADDED; only old → DELETED
//! (the old object at the new resourceVersion); neither → nothing.

/// The fields the apiserver lets a `fieldSelector` use for a resource, beyond
/// `metadata.name` and `metadata.namespace` (which every type has).
/// Core-group types only; every other type (CRDs included) gets the two
/// metadata fields, as `DefaultMetaV1FieldSelectorConversion` gives them.
pub fn selectable_fields(group: &str, resource: &str) -> &'static [&'static str] {
    if !group.is_empty() {
        return &[];
    }
    match resource {
        "pods" => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        "events" => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        "secrets" => &["type"],
        "nodes" => &["spec.unschedulable"],
        "namespaces" => &["status.phase"],
        _ => &[],
    }
}

/// What the hub keeps parsed of each object: its key, resourceVersion,
/// labels and the values of the type's selectable fields (aligned with
/// [`selectable_fields`]), as [`object::read`](crate::watch::object::read)
/// takes them out of the object's bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    pub namespace: String,
    pub name: String,
    pub rv: u64,
    pub labels: Vec<(String, String)>,
    pub fields: Vec<String>,
}

impl Meta {
    /// The value a field requirement compares with.
    pub(crate) fn field(&self, at: FieldRef) -> &str {
        match at {
            FieldRef::Name => &self.name,
            FieldRef::Namespace => &self.namespace,
            FieldRef::At(i) => self.fields.get(i).map(String::as_str).unwrap_or_default(),
        }
    }

    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Where in the object a selectable field's value is (events expose
/// `source` as the reporting component's name).
pub(crate) fn field_path(field: &str) -> &str {
    if field == "source" {
        "source.component"
    } else {
        field
    }
}

/// A selectable field's value when the object does not have it, as the
/// apiserver's `GetAttrs` renders it: booleans "false", strings "".
pub(crate) fn absent_field_value(field: &str) -> &'static str {
    if matches!(field, "spec.unschedulable" | "spec.hostNetwork") {
        "false"
    } else {
        ""
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelOp {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
    Gt(i64),
    Lt(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct LabelReq {
    key: String,
    op: LabelOp,
}

/// Where a field requirement reads its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum FieldRef {
    Name,
    Namespace,
    /// Index into [`Meta::fields`].
    At(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldReq {
    field: FieldRef,
    equals: bool,
    value: String,
}

/// A client's label and field selector, ready to evaluate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

impl Selector {
    /// Parses both selectors for a type whose selectable fields are
    /// `supported`. `None` when either cannot be evaluated locally exactly.
    pub fn parse(label: Option<&str>, field: Option<&str>, supported: &[&str]) -> Option<Selector> {
        let labels = match label {
            Some(s) => parse_labels(s)?,
            None => Vec::new(),
        };
        let fields = match field {
            Some(s) => parse_fields(s, supported)?,
            None => Vec::new(),
        };
        Some(Selector { labels, fields })
    }

    /// True when it selects everything.
    pub fn is_everything(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }

    /// A field this selector requires to equal one value (the first such
    /// requirement): only objects with that value can ever match, so the
    /// stream files the subscriber under it (`spec.nodeName=node-7`).
    pub(crate) fn index_key(&self) -> Option<(FieldRef, &str)> {
        self.fields
            .iter()
            .find(|r| r.equals)
            .map(|r| (r.field, r.value.as_str()))
    }

    /// Whether the object passes.
    pub fn matches(&self, m: &Meta) -> bool {
        self.fields
            .iter()
            .all(|r| (m.field(r.field) == r.value) == r.equals)
            && self.labels.iter().all(|r| {
                let v = m.label(&r.key);
                match &r.op {
                    LabelOp::In(vals) => v.is_some_and(|v| vals.iter().any(|x| x == v)),
                    LabelOp::NotIn(vals) => !v.is_some_and(|v| vals.iter().any(|x| x == v)),
                    LabelOp::Exists => v.is_some(),
                    LabelOp::DoesNotExist => v.is_none(),
                    LabelOp::Gt(n) => v
                        .and_then(|v| v.parse::<i64>().ok())
                        .is_some_and(|v| v > *n),
                    LabelOp::Lt(n) => v
                        .and_then(|v| v.parse::<i64>().ok())
                        .is_some_and(|v| v < *n),
                }
            })
    }

    /// What a subscriber with this selector gets for a change of one object.
    pub fn transition(&self, old: Option<&Meta>, new: Option<&Meta>) -> Transition {
        let o = old.is_some_and(|m| self.matches(m));
        let n = new.is_some_and(|m| self.matches(m));
        match (old.is_some(), new.is_some(), o, n) {
            (false, true, _, true) | (_, true, true, true) => Transition::AsIs,
            (_, true, false, true) => Transition::Enter,
            (true, true, true, false) => Transition::Leave,
            // A deletion the subscriber saw the object for.
            (true, false, true, _) => Transition::AsIs,
            _ => Transition::Nothing,
        }
    }
}

/// The event a subscriber gets for one upstream change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The upstream event as it came (ADDED, MODIFIED or DELETED).
    AsIs,
    /// ADDED with the new object (it entered the selector).
    Enter,
    /// DELETED with the old object at the new resourceVersion (it left).
    Leave,
    Nothing,
}

/// Splits on commas outside parentheses.
fn split_top(s: &str) -> Option<Vec<&str>> {
    let (mut depth, mut start, mut out) = (0i32, 0usize, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if depth < 0 {
            return None;
        }
    }
    out.push(&s[start..]);
    (depth == 0).then_some(out)
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
}

fn parse_labels(s: &str) -> Option<Vec<LabelReq>> {
    if s.trim().is_empty() {
        return Some(Vec::new());
    }
    let mut out = Vec::new();
    for term in split_top(s)? {
        let t = term.trim();
        if let Some(k) = t.strip_prefix('!') {
            let k = k.trim();
            valid_key(k).then_some(())?;
            out.push(LabelReq {
                key: k.into(),
                op: LabelOp::DoesNotExist,
            });
            continue;
        }
        if let Some(open) = t.find('(') {
            let head = t[..open].trim_end();
            let body = t[open + 1..].strip_suffix(')')?;
            let vals: Vec<String> = body.split(',').map(|v| v.trim().to_string()).collect();
            let (key, op) = if let Some(k) = head.strip_suffix(" notin") {
                (k.trim(), LabelOp::NotIn(vals))
            } else if let Some(k) = head.strip_suffix(" in") {
                (k.trim(), LabelOp::In(vals))
            } else {
                return None;
            };
            valid_key(key).then_some(())?;
            out.push(LabelReq {
                key: key.into(),
                op,
            });
            continue;
        }
        let (key, op) = if let Some((k, v)) = t.split_once("!=") {
            (k, LabelOp::NotIn(vec![v.trim().into()]))
        } else if let Some((k, v)) = t.split_once("==") {
            (k, LabelOp::In(vec![v.trim().into()]))
        } else if let Some((k, v)) = t.split_once('=') {
            (k, LabelOp::In(vec![v.trim().into()]))
        } else if let Some((k, v)) = t.split_once('>') {
            (k, LabelOp::Gt(v.trim().parse().ok()?))
        } else if let Some((k, v)) = t.split_once('<') {
            (k, LabelOp::Lt(v.trim().parse().ok()?))
        } else {
            (t, LabelOp::Exists)
        };
        let key = key.trim();
        valid_key(key).then_some(())?;
        out.push(LabelReq {
            key: key.into(),
            op,
        });
    }
    Some(out)
}

/// Splits on commas not escaped by `\` (fields.splitTerms).
fn split_unescaped(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut esc) = (Vec::new(), String::new(), false);
    for c in s.chars() {
        if esc {
            cur.push('\\');
            cur.push(c);
            esc = false;
        } else if c == '\\' {
            esc = true;
        } else if c == ',' {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    if esc {
        cur.push('\\');
    }
    out.push(cur);
    out
}

fn unescape(v: &str) -> Option<String> {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next()? {
                e @ ('\\' | ',' | '=') => out.push(e),
                _ => return None,
            },
            ',' | '=' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

fn parse_fields(s: &str, supported: &[&str]) -> Option<Vec<FieldReq>> {
    let mut out = Vec::new();
    for term in split_unescaped(s) {
        if term.is_empty() {
            continue;
        }
        let b = term.as_bytes();
        let mut i = 0;
        let mut split = None;
        while i < b.len() {
            if b[i] == b'\\' {
                i += 2;
                continue;
            }
            if b[i] == b'!' && b.get(i + 1) == Some(&b'=') {
                split = Some((i, i + 2, false));
                break;
            }
            if b[i] == b'=' {
                let skip = if b.get(i + 1) == Some(&b'=') { 2 } else { 1 };
                split = Some((i, i + skip, true));
                break;
            }
            i += 1;
        }
        let (end, vstart, equals) = split?;
        let name = &term[..end];
        let field = match name {
            "metadata.name" => FieldRef::Name,
            "metadata.namespace" => FieldRef::Namespace,
            other => FieldRef::At(supported.iter().position(|f| *f == other)?),
        };
        out.push(FieldReq {
            field,
            equals,
            value: unescape(&term[vstart..])?,
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// What the hub reads of `obj` (see [`crate::watch::object::read`]).
    pub(super) fn meta_of(obj: &Value, fields: &[&str]) -> Meta {
        let bytes = serde_json::to_vec(obj).expect("json");
        crate::watch::object::read(&bytes, fields)
            .expect("an object")
            .meta
    }

    fn pod(node: &str, labels: Value) -> Meta {
        meta_of(
            &json!({"metadata": {"name": "p", "namespace": "d", "resourceVersion": "7", "labels": labels},
                    "spec": {"nodeName": node}}),
            selectable_fields("", "pods"),
        )
    }

    #[test]
    fn node_selector_matches_only_its_node() {
        let s = Selector::parse(
            None,
            Some("spec.nodeName=node-1"),
            selectable_fields("", "pods"),
        )
        .expect("supported");
        assert!(s.matches(&pod("node-1", json!({}))));
        assert!(!s.matches(&pod("node-2", json!({}))));
        assert_eq!(pod("x", json!({})).rv, 7);
    }

    #[test]
    fn label_grammar_covers_sets_existence_and_comparisons() {
        let m = pod("n", json!({"app": "web", "tier": "3"}));
        let ok = |s: &str| {
            Selector::parse(Some(s), None, &[])
                .expect("parses")
                .matches(&m)
        };
        assert!(ok("app=web"));
        assert!(ok("app==web,tier"));
        assert!(ok("app in (web, db),!missing"));
        assert!(!ok("app notin (web)"));
        assert!(ok("app!=db"));
        assert!(ok("tier>2"));
        assert!(!ok("tier<2"));
        assert!(ok("missing!=x"));
    }

    #[test]
    fn unsupported_fields_are_refused_not_broadened() {
        assert!(
            Selector::parse(
                None,
                Some("spec.nodeName=x"),
                selectable_fields("", "configmaps")
            )
            .is_none()
        );
        assert!(Selector::parse(None, Some("metadata.name=x"), &[]).is_some());
    }

    #[test]
    fn transitions_follow_the_apiserver() {
        let s = Selector::parse(None, Some("spec.nodeName=a"), selectable_fields("", "pods"))
            .expect("supported");
        let (a, b) = (pod("a", json!({})), pod("b", json!({})));
        assert_eq!(s.transition(Some(&a), Some(&a)), Transition::AsIs);
        assert_eq!(s.transition(Some(&b), Some(&a)), Transition::Enter);
        assert_eq!(s.transition(Some(&a), Some(&b)), Transition::Leave);
        assert_eq!(s.transition(Some(&b), Some(&b)), Transition::Nothing);
        assert_eq!(s.transition(None, Some(&a)), Transition::AsIs);
        assert_eq!(s.transition(Some(&a), None), Transition::AsIs);
        assert_eq!(s.transition(Some(&b), None), Transition::Nothing);
    }

    mod differential {
        //! The same selectors on the same objects, here and in kube-sim
        //! (the reference implementation of the apiserver's semantics).
        use super::super::*;
        use super::meta_of;
        use breakwater_loadtest::sim::selectors::{FieldSelector, LabelSelector};
        use proptest::prelude::*;
        use serde_json::{Value, json};

        fn label_term() -> impl Strategy<Value = String> {
            let key = prop::sample::select(vec!["app", "tier", "x.io/k"]);
            let val = prop::sample::select(vec!["web", "db", "3", "7", ""]);
            (key, val, 0..9usize).prop_map(|(k, v, op)| match op {
                0 => format!("{k}={v}"),
                1 => format!("{k}=={v}"),
                2 => format!("{k}!={v}"),
                3 => format!("{k} in (web,{v})"),
                4 => format!("{k} notin ({v},db)"),
                5 => k.to_string(),
                6 => format!("!{k}"),
                7 => format!("{k}>4"),
                _ => format!("{k}<4"),
            })
        }

        fn field_term() -> impl Strategy<Value = String> {
            let field = prop::sample::select(vec![
                "spec.nodeName",
                "status.phase",
                "metadata.name",
                "metadata.namespace",
                "spec.hostNetwork",
            ]);
            let val = prop::sample::select(vec!["node-1", "Running", "p", "d", "false", ""]);
            (field, val, any::<bool>())
                .prop_map(|(f, v, eq)| format!("{f}{}{v}", if eq { "=" } else { "!=" }))
        }

        fn object() -> impl Strategy<Value = Value> {
            let label = prop::option::of(prop::sample::select(vec!["web", "db", "3", "7", ""]));
            (
                label.clone(),
                label.clone(),
                label,
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
            )
                .prop_map(|(app, tier, k, node, running, host)| {
                    let mut labels = serde_json::Map::new();
                    for (key, v) in [("app", app), ("tier", tier), ("x.io/k", k)] {
                        if let Some(v) = v {
                            labels.insert(key.into(), json!(v));
                        }
                    }
                    let mut spec = json!({});
                    if node {
                        spec["nodeName"] = json!("node-1");
                    }
                    if host {
                        spec["hostNetwork"] = json!(true);
                    }
                    json!({"kind": "Pod",
                           "metadata": {"name": "p", "namespace": "d", "labels": labels},
                           "spec": spec,
                           "status": if running { json!({"phase": "Running"}) } else { json!({}) }})
                })
        }

        proptest! {
            #[test]
            fn selectors_agree_with_kube_sim(
                labels in prop::collection::vec(label_term(), 0..3),
                fields in prop::collection::vec(field_term(), 0..3),
                obj in object(),
            ) {
                let (l, f) = (labels.join(","), fields.join(","));
                let ours = Selector::parse(
                    (!l.is_empty()).then_some(l.as_str()),
                    (!f.is_empty()).then_some(f.as_str()),
                    selectable_fields("", "pods"),
                )
                .expect("supported");
                let sim = LabelSelector::parse(&l).expect("sim parses").matches(&obj)
                    && FieldSelector::parse_for("Pod", &f).expect("sim parses").matches(&obj);
                let meta = meta_of(&obj, selectable_fields("", "pods"));
                prop_assert_eq!(ours.matches(&meta), sim, "labels {:?} fields {:?} on {}", l, f, obj);
            }
        }
    }
}
