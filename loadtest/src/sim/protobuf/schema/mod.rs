//! The protobuf shape of each kind kube-sim speaks protobuf for: one table
//! of fields per message, read by both the decoder (request bodies, the
//! fixtures) and the encoder (responses, watch frames).
//!
//! Field numbers come from k8s.io/api's and apimachinery's
//! `generated.proto`. What the `.proto` does not say is how Go's
//! gogo-generated `Marshal` treats a field, and that decides the bytes: a
//! non-pointer field is written even when it is zero (an empty
//! `generateName` is `12 00`, an empty `PodStatus` is still a message), a
//! pointer field only when set. [`Presence`] records which; the JSON side
//! (`omitempty` or not) follows from the same Go type. The always-written
//! fields are v1.24's (the fixtures' version): fields that later releases
//! added as non-pointers (`PodStatus.resize`, `observedGeneration`) are
//! written only when the JSON has them, and `ObjectMeta.clusterName` (15,
//! removed in 1.25) is written empty as v1.24 does.
//!
//! Only the fields below are known: a JSON field missing here is dropped
//! from the protobuf form (an apiserver has every field; kube-sim has what
//! its tests, storms and fixtures use).

mod core;
mod meta;
mod other;

pub(crate) use meta::{LIST_META, STATUS};

/// How a field's value is carried.
#[derive(Clone, Copy)]
pub(crate) enum Kind {
    Str,
    Bool,
    Int32,
    Int64,
    /// meta/v1 Time {1 seconds, 2 nanos}: RFC 3339 seconds in JSON, null when zero.
    Time,
    /// meta/v1 MicroTime: the same message, microseconds in JSON.
    MicroTime,
    /// resource.Quantity {1 string}.
    Quantity,
    /// intstr.IntOrString {1 type, 2 intVal, 3 strVal}: a number or a string in JSON.
    IntOrString,
    /// meta/v1 FieldsV1 {1 raw}: the raw bytes are the JSON object itself.
    FieldsV1,
    Msg(&'static [Field]),
    /// An embedded Go struct with `json:",inline"`: its own message in
    /// protobuf, its fields at the parent's level in JSON.
    Inline(&'static [Field]),
    /// map<string, string> (entries {1 key, 2 value}, sorted by key).
    MapStr,
    /// map<string, bytes>.
    MapBytes,
    /// map<string, Quantity> (a ResourceList).
    MapQuantity,
    RepStr,
    RepMsg(&'static [Field]),
}

/// What Go's types make of a zero value (see the module doc).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Presence {
    /// A non-pointer field with `omitempty`: always in protobuf; in JSON,
    /// left out when zero (a struct, Time, Quantity or IntOrString is never
    /// left out: Go's `omitempty` does not apply to structs).
    Zero,
    /// A pointer: in protobuf and JSON only when set (even to zero).
    Ptr,
    /// A non-pointer field without `omitempty`: always in both; an empty
    /// slice or map is JSON `null`.
    Req,
}

/// One field of a message.
pub(crate) struct Field {
    pub(crate) num: u64,
    pub(crate) name: &'static str,
    pub(crate) kind: Kind,
    pub(crate) presence: Presence,
}

/// A non-pointer field with `omitempty`.
pub(crate) const fn f(num: u64, name: &'static str, kind: Kind) -> Field {
    Field {
        num,
        name,
        kind,
        presence: Presence::Zero,
    }
}

/// A pointer field.
pub(crate) const fn p(num: u64, name: &'static str, kind: Kind) -> Field {
    Field {
        num,
        name,
        kind,
        presence: Presence::Ptr,
    }
}

/// A non-pointer field without `omitempty`.
pub(crate) const fn r(num: u64, name: &'static str, kind: Kind) -> Field {
    Field {
        num,
        name,
        kind,
        presence: Presence::Req,
    }
}

/// The top-level message of one kind.
pub(crate) struct Schema {
    pub(crate) api_version: &'static str,
    pub(crate) kind: &'static str,
    pub(crate) fields: &'static [Field],
    /// Whether kube-sim answers this kind in protobuf. The review kinds'
    /// tables cover only what a client sends (their answers stay JSON,
    /// which clients accept too).
    pub(crate) encodes: bool,
}

const fn object(api_version: &'static str, kind: &'static str, fields: &'static [Field]) -> Schema {
    Schema {
        api_version,
        kind,
        fields,
        encodes: true,
    }
}

const fn request(
    api_version: &'static str,
    kind: &'static str,
    fields: &'static [Field],
) -> Schema {
    Schema {
        api_version,
        kind,
        fields,
        encodes: false,
    }
}

const RBAC: &str = "rbac.authorization.k8s.io/v1";
const AUTHN: &str = "authentication.k8s.io/v1";
const AUTHZ: &str = "authorization.k8s.io/v1";

/// Every kind with a table.
pub(crate) const SCHEMAS: &[Schema] = &[
    object("v1", "Pod", core::POD),
    object("v1", "Node", core::NODE),
    object("v1", "Namespace", core::NAMESPACE),
    object("v1", "ConfigMap", core::CONFIG_MAP),
    object("v1", "Secret", core::SECRET),
    object("v1", "Service", core::SERVICE),
    object("v1", "ServiceAccount", core::SERVICE_ACCOUNT),
    object("v1", "Binding", core::BINDING),
    object("v1", "Status", meta::STATUS),
    object(
        "discovery.k8s.io/v1",
        "EndpointSlice",
        other::ENDPOINT_SLICE,
    ),
    object("coordination.k8s.io/v1", "Lease", other::LEASE),
    object(RBAC, "Role", other::ROLE),
    object(RBAC, "ClusterRole", other::CLUSTER_ROLE),
    object(RBAC, "RoleBinding", other::ROLE_BINDING),
    object(RBAC, "ClusterRoleBinding", other::ROLE_BINDING),
    request(AUTHN, "TokenRequest", other::TOKEN_REQUEST),
    request(AUTHN, "TokenReview", other::TOKEN_REVIEW),
    request(AUTHN, "SelfSubjectReview", other::SELF_SUBJECT_REVIEW),
    // 1.27's and 1.26's SelfSubjectReview: the v1 message's fields.
    request(
        "authentication.k8s.io/v1beta1",
        "SelfSubjectReview",
        other::SELF_SUBJECT_REVIEW,
    ),
    request(
        "authentication.k8s.io/v1alpha1",
        "SelfSubjectReview",
        other::SELF_SUBJECT_REVIEW,
    ),
    request(
        AUTHZ,
        "SelfSubjectAccessReview",
        other::SELF_SUBJECT_ACCESS_REVIEW,
    ),
    request(AUTHZ, "SubjectAccessReview", other::SUBJECT_ACCESS_REVIEW),
];

/// The table of `kind` in `api_version`.
pub(crate) fn find(api_version: &str, kind: &str) -> Option<&'static Schema> {
    SCHEMAS
        .iter()
        .find(|s| s.kind == kind && s.api_version == api_version)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every message reachable from a table, once per visit.
    fn visit(fields: &'static [Field], seen: &mut Vec<*const Field>, f: &mut impl FnMut(&[Field])) {
        if seen.contains(&fields.as_ptr()) {
            return;
        }
        seen.push(fields.as_ptr());
        f(fields);
        for field in fields {
            match field.kind {
                Kind::Msg(inner) | Kind::Inline(inner) | Kind::RepMsg(inner) => {
                    visit(inner, seen, f)
                }
                _ => {}
            }
        }
    }

    #[test]
    fn every_message_lists_its_fields_in_number_order_once() {
        // The encoder writes fields in table order, and gogo writes them in
        // number order: a table out of order would change the bytes.
        let mut seen = Vec::new();
        for schema in SCHEMAS {
            visit(schema.fields, &mut seen, &mut |fields| {
                for pair in fields.windows(2) {
                    assert!(
                        pair[0].num < pair[1].num,
                        "{}: field {} ({}) before {} ({})",
                        schema.kind,
                        pair[0].num,
                        pair[0].name,
                        pair[1].num,
                        pair[1].name
                    );
                }
                let inline_names: Vec<&str> = fields.iter().map(|f| f.name).collect();
                for (i, name) in inline_names.iter().enumerate() {
                    assert!(
                        !inline_names[i + 1..].contains(name),
                        "{}: {name} twice",
                        schema.kind
                    );
                }
            });
        }
    }

    #[test]
    fn kinds_are_found_by_api_version_and_kind() {
        assert!(find("v1", "Pod").is_some_and(|s| s.encodes));
        assert!(find("example.com/v1", "Pod").is_none());
        assert!(find(AUTHN, "TokenReview").is_some_and(|s| !s.encodes));
    }
}
