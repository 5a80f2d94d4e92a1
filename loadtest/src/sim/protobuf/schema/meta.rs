//! k8s.io/apimachinery meta/v1: ObjectMeta, ListMeta, Status and the small
//! messages every kind shares.

use super::{Field, Kind, f, p, r};

pub(crate) const OWNER_REFERENCE: &[Field] = &[
    r(1, "kind", Kind::Str),
    r(3, "name", Kind::Str),
    r(4, "uid", Kind::Str),
    r(5, "apiVersion", Kind::Str),
    p(6, "controller", Kind::Bool),
    p(7, "blockOwnerDeletion", Kind::Bool),
];

const MANAGED_FIELDS_ENTRY: &[Field] = &[
    f(1, "manager", Kind::Str),
    f(2, "operation", Kind::Str),
    f(3, "apiVersion", Kind::Str),
    p(4, "time", Kind::Time),
    f(6, "fieldsType", Kind::Str),
    p(7, "fieldsV1", Kind::FieldsV1),
    f(8, "subresource", Kind::Str),
];

pub(crate) const OBJECT_META: &[Field] = &[
    f(1, "name", Kind::Str),
    f(2, "generateName", Kind::Str),
    f(3, "namespace", Kind::Str),
    f(4, "selfLink", Kind::Str),
    f(5, "uid", Kind::Str),
    f(6, "resourceVersion", Kind::Str),
    f(7, "generation", Kind::Int64),
    f(8, "creationTimestamp", Kind::Time),
    p(9, "deletionTimestamp", Kind::Time),
    p(10, "deletionGracePeriodSeconds", Kind::Int64),
    f(11, "labels", Kind::MapStr),
    f(12, "annotations", Kind::MapStr),
    f(13, "ownerReferences", Kind::RepMsg(OWNER_REFERENCE)),
    f(14, "finalizers", Kind::RepStr),
    // v1.24 still has clusterName (gone in 1.25) and writes it empty.
    f(15, "clusterName", Kind::Str),
    f(17, "managedFields", Kind::RepMsg(MANAGED_FIELDS_ENTRY)),
];

/// `metadata` of every object.
pub(crate) const META: Field = f(1, "metadata", Kind::Msg(OBJECT_META));

pub(crate) const LIST_META: &[Field] = &[
    f(1, "selfLink", Kind::Str),
    f(2, "resourceVersion", Kind::Str),
    f(3, "continue", Kind::Str),
    p(4, "remainingItemCount", Kind::Int64),
];

const STATUS_CAUSE: &[Field] = &[
    f(1, "reason", Kind::Str),
    f(2, "message", Kind::Str),
    f(3, "field", Kind::Str),
];

const STATUS_DETAILS: &[Field] = &[
    f(1, "name", Kind::Str),
    f(2, "group", Kind::Str),
    f(3, "kind", Kind::Str),
    f(4, "causes", Kind::RepMsg(STATUS_CAUSE)),
    f(5, "retryAfterSeconds", Kind::Int32),
    f(6, "uid", Kind::Str),
];

pub(crate) const STATUS: &[Field] = &[
    f(1, "metadata", Kind::Msg(LIST_META)),
    f(2, "status", Kind::Str),
    f(3, "message", Kind::Str),
    f(4, "reason", Kind::Str),
    p(5, "details", Kind::Msg(STATUS_DETAILS)),
    f(6, "code", Kind::Int32),
];

pub(crate) const LABEL_SELECTOR_REQUIREMENT: &[Field] = &[
    r(1, "key", Kind::Str),
    r(2, "operator", Kind::Str),
    f(3, "values", Kind::RepStr),
];

pub(crate) const LABEL_SELECTOR: &[Field] = &[
    f(1, "matchLabels", Kind::MapStr),
    f(
        2,
        "matchExpressions",
        Kind::RepMsg(LABEL_SELECTOR_REQUIREMENT),
    ),
];

/// meta/v1 Condition (Service and most newer types' status conditions).
pub(crate) const CONDITION: &[Field] = &[
    r(1, "type", Kind::Str),
    r(2, "status", Kind::Str),
    f(3, "observedGeneration", Kind::Int64),
    r(4, "lastTransitionTime", Kind::Time),
    r(5, "reason", Kind::Str),
    r(6, "message", Kind::Str),
];
