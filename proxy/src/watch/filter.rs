//! Label and field selectors, evaluated locally with the apiserver's rules.
//!
//! Node-scoped watches (`fieldSelector=spec.nodeName=X`) from thousands of
//! agents share one broad upstream watch; each client's selector is then
//! applied here, per event, to the few fields parsed out of the object
//! ([`Meta`]). The selectors are parsed by [`crate::selector`] (the
//! apiserver's `labels.Parse` / `fields.ParseSelector`); this module adds
//! the per-type field sets (`GetAttrs`) for the covered types and resolves
//! each field term to where [`Meta`] keeps its value, once per watch, so
//! that an event costs no lookups by name. A selector this module cannot
//! evaluate exactly (an invalid one, an unknown field label, a field of a
//! type it does not know) is never broadened: the hub gives the request back
//! to the proxy, which forwards it as is and lets the apiserver answer.
//!
//! [`Transition`] encodes the apiserver's rule for a changed object: old
//! matched & new matches → MODIFIED; only new → ADDED; only old → DELETED
//! (the old object at the new resourceVersion); neither → nothing.

use crate::selector::{FieldOp, FieldSelector, FieldTerm, LabelSelector, Labels};

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

/// The selectable field a stream's cache indexes, as a position in
/// [`selectable_fields`]: a pod's `spec.nodeName`, the field the v1.24
/// cacher indexes too. A node's agent LISTs its few pods out of every pod
/// of the cluster; with the index that costs its few pods, not a scan.
pub fn indexed_field(group: &str, resource: &str) -> Option<usize> {
    let fields = selectable_fields(group, resource);
    (resource == "pods")
        .then(|| fields.iter().position(|f| *f == "spec.nodeName"))
        .flatten()
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
}

impl Labels for Meta {
    fn get(&self, key: &str) -> Option<&str> {
        Labels::get(self.labels.as_slice(), key)
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

/// Where a field requirement reads its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum FieldRef {
    Name,
    Namespace,
    /// Index into [`Meta::fields`].
    At(usize),
}

/// A field term with its field resolved to where [`Meta`] keeps the value.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldReq {
    at: FieldRef,
    term: FieldTerm,
}

/// A client's label and field selector, ready to evaluate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    labels: LabelSelector,
    fields: Vec<FieldReq>,
}

impl Selector {
    /// Parses both selectors for a type whose selectable fields are
    /// `supported`. `None` when either is invalid (the apiserver answers
    /// 400) or names a field this type does not have here (the apiserver
    /// may know it, or answer 400 "field label not supported").
    pub fn parse(label: Option<&str>, field: Option<&str>, supported: &[&str]) -> Option<Selector> {
        let labels = match label {
            Some(s) => LabelSelector::parse(s).ok()?,
            None => LabelSelector::default(),
        };
        let fields = match field {
            Some(s) => FieldSelector::parse(s)
                .ok()?
                .terms()
                .iter()
                .map(|term| {
                    let at = match term.field() {
                        "metadata.name" => FieldRef::Name,
                        "metadata.namespace" => FieldRef::Namespace,
                        other => FieldRef::At(supported.iter().position(|f| *f == other)?),
                    };
                    let term = term.clone();
                    Some(FieldReq { at, term })
                })
                .collect::<Option<Vec<_>>>()?,
            None => Vec::new(),
        };
        Some(Selector { labels, fields })
    }

    /// True when it selects everything.
    pub fn is_everything(&self) -> bool {
        self.labels.is_everything() && self.fields.is_empty()
    }

    /// A field this selector requires to equal one value (the first such
    /// requirement): only objects with that value can ever match, so the
    /// stream files the subscriber under it (`spec.nodeName=node-7`).
    pub(crate) fn index_key(&self) -> Option<(FieldRef, &str)> {
        self.fields
            .iter()
            .find(|r| r.term.op() == FieldOp::Equals)
            .map(|r| (r.at, r.term.value()))
    }

    /// Whether the object passes.
    pub fn matches(&self, m: &Meta) -> bool {
        self.fields.iter().all(|r| r.term.matches(m.field(r.at))) && self.labels.matches(m)
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// What the hub reads of `obj` (see [`crate::watch::object::read`]).
    fn meta_of(obj: &Value, fields: &[&str]) -> Meta {
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
    fn invalid_selectors_are_left_to_the_apiserver() {
        assert!(Selector::parse(Some("app in (web,,)"), None, &[]).is_none());
        assert!(Selector::parse(None, Some("metadata.name=a=b"), &[]).is_none());
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
}
