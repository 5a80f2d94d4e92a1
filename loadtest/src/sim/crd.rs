//! CustomResourceDefinitions: what a CRD body means to kube-sim.
//!
//! The apiserver's apiextensions controllers validate a CRD, accept its names
//! (`NamesAccepted`), mark it `Established` and from then on serve each of its
//! served versions as a resource type. kube-sim does the same synchronously
//! inside the CRD write (the [`store`](crate::sim::store) registers the types
//! before the CRD is committed, so a client that sees `Established=True` can
//! use the resource at once). This module holds the pure part: validation and
//! defaulting of the body, the types it defines ([`TypeSpec`]), the status the
//! controllers would write, and interning of the types as
//! `&'static ResourceType` (the shape every other module of kube-sim takes).
//!
//! Not modelled: schema validation, pruning and defaulting of custom objects
//! (every object is stored as sent, as with `x-kubernetes-preserve-unknown-fields`),
//! conversion webhooks (versions convert by rewriting `apiVersion`, the `None`
//! strategy), `additionalPrinterColumns` (Tables have Name and Age), the
//! `scale` subresource, and the `Terminating` phase of a deleted CRD (its
//! objects are deleted and the CRD removed in one step).

use std::sync::Mutex;

use serde_json::{Map, Value, json};

use crate::sim::resources::{CRUD, RESOURCES, ResourceType, STATUS, Subresource};
use crate::sim::store::StoreError;

/// At most this many distinct custom resource types are interned per
/// process. Each is leaked (a few hundred bytes) so that it can be a
/// `&'static ResourceType` like the built-in ones; identical registrations
/// (the same CRD created again, in this or another kube-sim) reuse the first,
/// so only a client minting new names in a loop reaches the bound, and then
/// gets a 422 instead of growing memory without end.
pub const MAX_INTERNED_TYPES: usize = 1000;

const KIND: &str = "CustomResourceDefinition";

/// One resource type a CRD defines: a served version under its names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeSpec {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// `subresources.status` is set for this version.
    pub status: bool,
}

impl TypeSpec {
    fn matches(&self, rt: &ResourceType) -> bool {
        rt.custom
            && rt.group == self.group
            && rt.version == self.version
            && rt.plural == self.plural
            && rt.singular == self.singular
            && rt.kind == self.kind
            && rt.namespaced == self.namespaced
            && rt.short_names.iter().eq(self.short_names.iter())
            && rt.categories.iter().eq(self.categories.iter())
            && rt.subresources.is_empty() != self.status
    }

    fn leak(&self) -> &'static ResourceType {
        let s = |v: &str| -> &'static str { Box::leak(v.to_owned().into_boxed_str()) };
        let list = |v: &[String]| -> &'static [&'static str] {
            Box::leak(
                v.iter()
                    .map(|x| s(x))
                    .collect::<Vec<_>>()
                    .into_boxed_slice(),
            )
        };
        let subresources: &'static [Subresource] = if self.status { &[STATUS] } else { &[] };
        Box::leak(Box::new(ResourceType {
            group: s(&self.group),
            version: s(&self.version),
            plural: s(&self.plural),
            singular: s(&self.singular),
            kind: s(&self.kind),
            namespaced: self.namespaced,
            short_names: list(&self.short_names),
            verbs: CRUD,
            subresources,
            categories: list(&self.categories),
            custom: true,
        }))
    }
}

/// The `&'static ResourceType` for `spec`: an earlier identical one, or a
/// newly leaked one while fewer than [`MAX_INTERNED_TYPES`] exist.
pub fn intern(spec: &TypeSpec) -> Result<&'static ResourceType, StoreError> {
    static INTERNED: Mutex<Vec<&'static ResourceType>> = Mutex::new(Vec::new());
    // Only pushes happen under the lock, so a poisoned list is still whole.
    let mut interned = INTERNED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(rt) = interned.iter().find(|rt| spec.matches(rt)) {
        return Ok(rt);
    }
    if interned.len() >= MAX_INTERNED_TYPES {
        return Err(StoreError::BadRequest(format!(
            "kube-sim serves at most {MAX_INTERNED_TYPES} distinct custom resource types per process"
        )));
    }
    let rt = spec.leak();
    interned.push(rt);
    Ok(rt)
}

/// A CRD after validation: its names and the types of its served versions.
#[derive(Debug, Clone)]
pub struct Definition {
    pub group: String,
    pub plural: String,
    pub kind: String,
    /// Served versions, the storage version first (the preferred version in
    /// discovery), then in the order of `spec.versions`.
    pub types: Vec<TypeSpec>,
    /// The storage version (recorded in `status.storedVersions`).
    pub storage: String,
}

fn invalid(name: &str, message: impl Into<String>) -> StoreError {
    StoreError::Invalid {
        kind: KIND.to_string(),
        name: name.to_string(),
        message: message.into(),
    }
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn strings_at(v: &Value, pointer: &str) -> Vec<String> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// A lowercase RFC 1035 label (what the apiserver requires of plural,
/// singular and version names).
fn is_dns1035_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && !s.ends_with('-')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Validates a CRD body as the apiextensions-apiserver does (the checks a
/// client meets in practice, first failure reported) and fills the defaults
/// it applies (`names.singular`, `names.listKind`, `conversion`).
pub fn validate(obj: &mut Value) -> Result<Definition, StoreError> {
    let name = str_at(obj, "/metadata/name").to_string();
    let group = str_at(obj, "/spec/group").to_string();
    let plural = str_at(obj, "/spec/names/plural").to_string();
    let kind = str_at(obj, "/spec/names/kind").to_string();
    if group.is_empty() {
        return Err(invalid(&name, "spec.group: Required value"));
    }
    if !group.contains('.') {
        return Err(invalid(
            &name,
            format!(
                "spec.group: Invalid value: \"{group}\": should be a domain with at least one dot"
            ),
        ));
    }
    // The apiserver would let an approved CRD share a built-in group (the
    // built-in types winning); kube-sim keeps its routing simple instead.
    if RESOURCES.iter().any(|r| r.group == group) {
        return Err(invalid(
            &name,
            format!("spec.group: Invalid value: \"{group}\": kube-sim serves this group itself"),
        ));
    }
    if plural.is_empty() {
        return Err(invalid(&name, "spec.names.plural: Required value"));
    }
    if !is_dns1035_label(&plural) {
        return Err(invalid(
            &name,
            format!(
                "spec.names.plural: Invalid value: \"{plural}\": a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character"
            ),
        ));
    }
    if kind.is_empty() {
        return Err(invalid(&name, "spec.names.kind: Required value"));
    }
    if name != format!("{plural}.{group}") {
        return Err(invalid(
            &name,
            format!(
                "metadata.name: Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"
            ),
        ));
    }
    let namespaced = match str_at(obj, "/spec/scope") {
        "Namespaced" => true,
        "Cluster" => false,
        "" => return Err(invalid(&name, "spec.scope: Required value")),
        s => {
            return Err(invalid(
                &name,
                format!(
                    "spec.scope: Unsupported value: \"{s}\": supported values: \"Cluster\", \"Namespaced\""
                ),
            ));
        }
    };
    let mut singular = str_at(obj, "/spec/names/singular").to_string();
    if singular.is_empty() {
        singular = kind.to_ascii_lowercase();
    }
    let short_names = strings_at(obj, "/spec/names/shortNames");
    let categories = strings_at(obj, "/spec/names/categories");

    let versions = obj
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if versions.is_empty() {
        return Err(invalid(
            &name,
            "spec.versions: Invalid value: null: must have exactly one version marked as storage version",
        ));
    }
    let mut storage = Vec::new();
    let mut types = Vec::new();
    for (i, v) in versions.iter().enumerate() {
        let vname = str_at(v, "/name");
        if !is_dns1035_label(vname) {
            return Err(invalid(
                &name,
                format!(
                    "spec.versions[{i}].name: Invalid value: \"{vname}\": a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character"
                ),
            ));
        }
        if v.pointer("/schema/openAPIV3Schema").is_none() {
            return Err(invalid(
                &name,
                format!(
                    "spec.versions[{i}].schema.openAPIV3Schema: Required value: schemas are required"
                ),
            ));
        }
        let flag = |f: &str| v.get(f).and_then(Value::as_bool).unwrap_or(false);
        if flag("storage") {
            storage.push(vname.to_string());
        }
        if flag("served") {
            types.push(TypeSpec {
                group: group.clone(),
                version: vname.to_string(),
                plural: plural.clone(),
                singular: singular.clone(),
                kind: kind.clone(),
                namespaced,
                short_names: short_names.clone(),
                categories: categories.clone(),
                status: v.pointer("/subresources/status").is_some(),
            });
        }
    }
    let [storage] = <[String; 1]>::try_from(storage).map_err(|_| {
        invalid(
            &name,
            "spec.versions: Invalid value: \"\": must have exactly one version marked as storage version",
        )
    })?;
    // The storage version first: it becomes the preferred version.
    types.sort_by_key(|t| t.version != storage);

    // The defaults the apiserver writes into the stored CRD.
    if let Some(names) = obj
        .pointer_mut("/spec/names")
        .and_then(Value::as_object_mut)
    {
        names
            .entry("singular")
            .or_insert_with(|| json!(singular.clone()));
        names
            .entry("listKind")
            .or_insert_with(|| json!(format!("{kind}List")));
    }
    if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
        spec.entry("conversion")
            .or_insert_with(|| json!({"strategy": "None"}));
    }
    Ok(Definition {
        group,
        plural,
        kind,
        types,
        storage,
    })
}

/// Writes the status the names and establishing controllers would:
/// `acceptedNames`, the `NamesAccepted` and `Established` conditions (their
/// `lastTransitionTime` kept from `old` while unchanged) and `storedVersions`.
/// `conflict` is the reason the names could not be accepted, if any.
pub fn set_status(
    obj: &mut Value,
    def: &Definition,
    old: Option<&Value>,
    conflict: Option<&str>,
    now: &str,
) {
    let condition = |type_: &str, status: &str, reason: &str, message: &str| {
        let since = old
            .and_then(|o| o.pointer("/status/conditions"))
            .and_then(Value::as_array)
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c["type"] == type_ && c["status"] == status)
            })
            .and_then(|c| c.get("lastTransitionTime").cloned())
            .unwrap_or_else(|| json!(now));
        json!({
            "type": type_,
            "status": status,
            "lastTransitionTime": since,
            "reason": reason,
            "message": message,
        })
    };
    let (names_accepted, established) = match conflict {
        None => (
            condition("NamesAccepted", "True", "NoConflicts", "no conflicts found"),
            condition(
                "Established",
                "True",
                "InitialNamesAccepted",
                "the initial names have been accepted",
            ),
        ),
        Some(why) => (
            condition("NamesAccepted", "False", "NameConflict", why),
            condition(
                "Established",
                "False",
                "NotAccepted",
                "not all names are accepted",
            ),
        ),
    };
    let mut accepted = Map::new();
    if conflict.is_none()
        && let Some(names) = obj.pointer("/spec/names").and_then(Value::as_object)
    {
        for (k, v) in names {
            accepted.insert(k.clone(), v.clone());
        }
    }
    let mut stored: Vec<Value> = old
        .and_then(|o| o.pointer("/status/storedVersions"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if !stored.iter().any(|v| v == def.storage.as_str()) {
        stored.push(json!(def.storage));
    }
    if let Some(o) = obj.as_object_mut() {
        o.insert(
            "status".into(),
            json!({
                "conditions": [names_accepted, established],
                "acceptedNames": accepted,
                "storedVersions": stored,
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn widgets() -> Value {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "widgets.example.com"},
            "spec": {
                "group": "example.com",
                "scope": "Namespaced",
                "names": {"plural": "widgets", "kind": "Widget", "shortNames": ["wd"]},
                "versions": [
                    {"name": "v1beta1", "served": true, "storage": false,
                     "schema": {"openAPIV3Schema": {"type": "object"}}},
                    {"name": "v1", "served": true, "storage": true,
                     "schema": {"openAPIV3Schema": {"type": "object"}},
                     "subresources": {"status": {}}},
                    {"name": "v1alpha1", "served": false, "storage": false,
                     "schema": {"openAPIV3Schema": {"type": "object"}}},
                ],
            },
        })
    }

    #[test]
    fn served_versions_become_types_with_storage_first_and_defaults_filled() {
        let mut crd = widgets();
        let def = validate(&mut crd).expect("valid");
        let versions: Vec<&str> = def.types.iter().map(|t| t.version.as_str()).collect();
        assert_eq!(versions, ["v1", "v1beta1"]);
        assert_eq!(def.storage, "v1");
        assert!(def.types[0].status && !def.types[1].status);
        assert!(
            def.types
                .iter()
                .all(|t| t.namespaced && t.singular == "widget")
        );
        assert_eq!(crd["spec"]["names"]["listKind"], "WidgetList");
        assert_eq!(crd["spec"]["conversion"]["strategy"], "None");
    }

    #[test]
    fn invalid_definitions_are_refused_with_the_field_at_fault() {
        let cases: [(&str, Value, &str); 5] = [
            (
                "/metadata/name",
                json!("gadgets.example.com"),
                "metadata.name",
            ),
            ("/spec/group", json!("example"), "spec.group"),
            ("/spec/scope", json!("Global"), "spec.scope"),
            ("/spec/versions/1/storage", json!(false), "spec.versions"),
            ("/spec/group", json!("apps"), "spec.group"),
        ];
        for (pointer, value, field) in cases {
            let mut crd = widgets();
            *crd.pointer_mut(pointer).expect("field exists") = value;
            match validate(&mut crd) {
                Err(StoreError::Invalid { message, .. }) => {
                    assert!(message.starts_with(field), "{pointer}: {message}")
                }
                other => panic!("{pointer}: expected Invalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn status_is_established_and_keeps_transition_times() {
        let mut crd = widgets();
        let def = validate(&mut crd).expect("valid");
        set_status(&mut crd, &def, None, None, "2024-01-01T00:00:00Z");
        assert_eq!(crd["status"]["conditions"][1]["type"], "Established");
        assert_eq!(crd["status"]["conditions"][1]["status"], "True");
        assert_eq!(crd["status"]["acceptedNames"]["kind"], "Widget");
        assert_eq!(crd["status"]["storedVersions"], json!(["v1"]));
        let old = crd.clone();
        set_status(&mut crd, &def, Some(&old), None, "2025-01-01T00:00:00Z");
        assert_eq!(
            crd["status"]["conditions"][0]["lastTransitionTime"],
            "2024-01-01T00:00:00Z"
        );
        set_status(
            &mut crd,
            &def,
            Some(&old),
            Some("taken"),
            "2025-01-01T00:00:00Z",
        );
        assert_eq!(crd["status"]["conditions"][1]["status"], "False");
        assert_eq!(crd["status"]["acceptedNames"], json!({}));
    }

    mod in_the_store {
        use super::*;
        use crate::sim::resources::find;
        use crate::sim::store::{EventType, ListOptions, Store};

        fn store() -> Store {
            let s = Store::new(100, 100);
            s.create(
                find("", "v1", "namespaces").expect("ns"),
                None,
                json!({"metadata": {"name": "ns"}}),
            )
            .expect("namespace");
            s
        }

        fn crds() -> &'static ResourceType {
            find("apiextensions.k8s.io", "v1", "customresourcedefinitions").expect("served")
        }

        #[test]
        fn a_created_crd_serves_its_versions_and_other_stores_do_not_see_them() {
            let (s, other) = (store(), store());
            let crd = s.create(crds(), None, widgets()).expect("created");
            assert_eq!(crd["status"]["conditions"][1]["status"], "True");
            assert_eq!(crd["metadata"]["generation"], 1);
            let v1 = s.find("example.com", "v1", "widgets").expect("v1");
            assert!(s.find("example.com", "v1beta1", "widgets").is_some());
            assert!(s.find("example.com", "v1alpha1", "widgets").is_none());
            assert_eq!(s.find_kind("example.com/v1", "Widget"), Some(v1));
            let gvs = s.group_versions();
            assert_eq!(
                &gvs[gvs.len() - 2..],
                [("example.com", "v1"), ("example.com", "v1beta1")]
            );
            assert!(other.find("example.com", "v1", "widgets").is_none());
            assert!(matches!(
                other.list(v1, Some("ns"), &ListOptions::default()),
                Err(StoreError::NotServed)
            ));
        }

        #[test]
        fn every_served_version_reads_and_watches_the_same_objects_in_its_own_version() {
            let s = store();
            s.create(crds(), None, widgets()).expect("created");
            let v1 = s.find("example.com", "v1", "widgets").expect("v1");
            let beta = s
                .find("example.com", "v1beta1", "widgets")
                .expect("v1beta1");
            let mut watch = s
                .watch(beta, Some("ns"), &ListOptions::default())
                .expect("watch");
            let w = json!({"apiVersion": "example.com/v1", "kind": "Widget",
                "metadata": {"name": "w"}, "spec": {"size": 1}});
            let created = s.create(v1, Some("ns"), w).expect("create");
            let read = s.get(beta, Some("ns"), "w").expect("get");
            assert_eq!(read["apiVersion"], "example.com/v1beta1");
            assert_eq!(read["spec"], created["spec"]);
            let ev = watch.rx.try_recv().expect("ADDED");
            assert_eq!(ev.kind, EventType::Added);
            assert_eq!(ev.object["apiVersion"], "example.com/v1beta1");
            // Writing it back unchanged through v1beta1 is a no-op.
            let again = s
                .update(beta, Some("ns"), "w", (*read).clone())
                .expect("update");
            assert_eq!(
                again["metadata"]["resourceVersion"],
                created["metadata"]["resourceVersion"]
            );
            assert!(watch.rx.try_recv().is_err(), "no event for a no-op");
            // A spec change moves the generation; status (a subresource of v1) does not.
            let changed = s
                .patch(
                    v1,
                    Some("ns"),
                    "w",
                    &json!({"spec": {"size": 2}}),
                    crate::sim::store::PatchKind::Merge,
                )
                .expect("patch");
            assert_eq!(changed["metadata"]["generation"], 2);
            let status = s
                .patch(
                    v1,
                    Some("ns"),
                    "w",
                    &json!({"status": {"ok": true}}),
                    crate::sim::store::PatchKind::Merge,
                )
                .expect("patch");
            assert_eq!(status["metadata"]["generation"], 2);
        }

        #[test]
        fn deleting_the_crd_deletes_its_objects_then_ends_watches_and_the_type() {
            let s = store();
            s.create(crds(), None, widgets()).expect("created");
            let v1 = s.find("example.com", "v1", "widgets").expect("v1");
            for name in ["a", "b"] {
                s.create(v1, Some("ns"), json!({"metadata": {"name": name}}))
                    .expect("create");
            }
            let opts = ListOptions {
                resource_version: Some(s.current_rv().to_string()),
                ..ListOptions::default()
            };
            let mut watch = s.watch(v1, None, &opts).expect("watch");
            s.delete(crds(), None, "widgets.example.com")
                .expect("delete");
            let mut seen = Vec::new();
            while let Ok(ev) = watch.rx.try_recv() {
                seen.push((ev.kind, ev.object["metadata"]["name"].clone()));
            }
            assert_eq!(
                seen,
                [
                    (EventType::Deleted, json!("a")),
                    (EventType::Deleted, json!("b"))
                ]
            );
            assert!(watch.rx.is_closed(), "the type's watches end");
            assert!(s.find("example.com", "v1", "widgets").is_none());
            assert_eq!(
                s.get(v1, Some("ns"), "a").map_err(|e| e.code()).err(),
                Some(404)
            );
            // Created again, it starts empty.
            s.create(crds(), None, widgets()).expect("created again");
            assert_eq!(s.count(v1), 0);
        }

        #[test]
        fn updating_the_crd_changes_the_served_versions_and_keeps_the_objects() {
            let s = store();
            let created = s.create(crds(), None, widgets()).expect("created");
            let v1 = s.find("example.com", "v1", "widgets").expect("v1");
            s.create(v1, Some("ns"), json!({"metadata": {"name": "a"}}))
                .expect("create");
            let mut body = widgets();
            body["spec"]["versions"][0]["served"] = json!(false);
            let updated = s
                .update(crds(), None, "widgets.example.com", body)
                .expect("updated");
            assert_eq!(updated["metadata"]["generation"], 2);
            assert_eq!(
                updated["status"]["conditions"][1]["lastTransitionTime"],
                created["status"]["conditions"][1]["lastTransitionTime"]
            );
            assert!(s.find("example.com", "v1beta1", "widgets").is_none());
            assert_eq!(s.count(v1), 1, "objects survive while a version is served");
        }

        #[test]
        fn a_second_crd_with_taken_names_is_stored_but_not_established() {
            let s = store();
            s.create(crds(), None, widgets()).expect("created");
            let mut gizmos = widgets();
            gizmos["metadata"]["name"] = json!("gizmos.example.com");
            gizmos["spec"]["names"]["plural"] = json!("gizmos");
            let stored = s.create(crds(), None, gizmos).expect("stored");
            assert_eq!(stored["status"]["conditions"][0]["reason"], "NameConflict");
            assert_eq!(stored["status"]["conditions"][1]["status"], "False");
            assert!(s.find("example.com", "v1", "gizmos").is_none());
            assert!(s.find("example.com", "v1", "widgets").is_some());
        }
    }

    #[test]
    fn identical_specs_intern_to_one_type() {
        let mut crd = widgets();
        let def = validate(&mut crd).expect("valid");
        let a = intern(&def.types[0]).expect("interned");
        let b = intern(&def.types[0].clone()).expect("interned");
        assert!(std::ptr::eq(a, b));
        assert!(a.custom && a.subresources.len() == 1 && a.verbs == CRUD);
        assert!(!std::ptr::eq(a, intern(&def.types[1]).expect("interned")));
    }
}
