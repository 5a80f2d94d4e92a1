//! The other groups: discovery.k8s.io, coordination.k8s.io, RBAC, and the
//! review requests kubectl's typed clients send.

use super::core::OBJECT_REFERENCE;
use super::meta::{LABEL_SELECTOR, META};
use super::{Field, Kind, f, p, r};

// ------------------------------------------------- discovery.k8s.io/v1

const FOR_NAME: &[Field] = &[r(1, "name", Kind::Str)];

const ENDPOINT: &[Field] = &[
    r(1, "addresses", Kind::RepStr),
    f(
        2,
        "conditions",
        Kind::Msg(&[
            p(1, "ready", Kind::Bool),
            p(2, "serving", Kind::Bool),
            p(3, "terminating", Kind::Bool),
        ]),
    ),
    p(3, "hostname", Kind::Str),
    p(4, "targetRef", Kind::Msg(OBJECT_REFERENCE)),
    f(5, "deprecatedTopology", Kind::MapStr),
    p(6, "nodeName", Kind::Str),
    p(7, "zone", Kind::Str),
    p(
        8,
        "hints",
        Kind::Msg(&[
            f(1, "forZones", Kind::RepMsg(FOR_NAME)),
            f(2, "forNodes", Kind::RepMsg(FOR_NAME)),
        ]),
    ),
];

const ENDPOINT_PORT: &[Field] = &[
    p(1, "name", Kind::Str),
    p(2, "protocol", Kind::Str),
    p(3, "port", Kind::Int32),
    p(4, "appProtocol", Kind::Str),
];

pub(crate) const ENDPOINT_SLICE: &[Field] = &[
    META,
    r(2, "endpoints", Kind::RepMsg(ENDPOINT)),
    r(3, "ports", Kind::RepMsg(ENDPOINT_PORT)),
    r(4, "addressType", Kind::Str),
];

// ---------------------------------------------- coordination.k8s.io/v1

pub(crate) const LEASE: &[Field] = &[
    META,
    f(
        2,
        "spec",
        Kind::Msg(&[
            p(1, "holderIdentity", Kind::Str),
            p(2, "leaseDurationSeconds", Kind::Int32),
            p(3, "acquireTime", Kind::MicroTime),
            p(4, "renewTime", Kind::MicroTime),
            p(5, "leaseTransitions", Kind::Int32),
            p(6, "strategy", Kind::Str),
            p(7, "preferredHolder", Kind::Str),
        ]),
    ),
];

// --------------------------------------------------------------- RBAC

const POLICY_RULE: &[Field] = &[
    r(1, "verbs", Kind::RepStr),
    f(2, "apiGroups", Kind::RepStr),
    f(3, "resources", Kind::RepStr),
    f(4, "resourceNames", Kind::RepStr),
    f(5, "nonResourceURLs", Kind::RepStr),
];

pub(crate) const ROLE: &[Field] = &[META, r(2, "rules", Kind::RepMsg(POLICY_RULE))];

pub(crate) const CLUSTER_ROLE: &[Field] = &[
    META,
    r(2, "rules", Kind::RepMsg(POLICY_RULE)),
    p(
        3,
        "aggregationRule",
        Kind::Msg(&[f(1, "clusterRoleSelectors", Kind::RepMsg(LABEL_SELECTOR))]),
    ),
];

const SUBJECT: &[Field] = &[
    r(1, "kind", Kind::Str),
    f(2, "apiGroup", Kind::Str),
    r(3, "name", Kind::Str),
    f(4, "namespace", Kind::Str),
];

const ROLE_REF: &[Field] = &[
    r(1, "apiGroup", Kind::Str),
    r(2, "kind", Kind::Str),
    r(3, "name", Kind::Str),
];

/// RoleBinding and ClusterRoleBinding have the same fields.
pub(crate) const ROLE_BINDING: &[Field] = &[
    META,
    f(2, "subjects", Kind::RepMsg(SUBJECT)),
    r(3, "roleRef", Kind::Msg(ROLE_REF)),
];

// ------------------------------------------------ reviews (requests only)

pub(crate) const TOKEN_REQUEST: &[Field] = &[
    META,
    r(
        2,
        "spec",
        Kind::Msg(&[
            r(1, "audiences", Kind::RepStr),
            p(
                3,
                "boundObjectRef",
                Kind::Msg(&[
                    f(1, "kind", Kind::Str),
                    f(2, "apiVersion", Kind::Str),
                    f(3, "name", Kind::Str),
                    f(4, "uid", Kind::Str),
                ]),
            ),
            p(4, "expirationSeconds", Kind::Int64),
        ]),
    ),
];

pub(crate) const TOKEN_REVIEW: &[Field] = &[
    META,
    r(
        2,
        "spec",
        Kind::Msg(&[f(1, "token", Kind::Str), f(2, "audiences", Kind::RepStr)]),
    ),
];

pub(crate) const SELF_SUBJECT_REVIEW: &[Field] = &[META];

/// FieldSelectorAttributes and LabelSelectorAttributes share field numbers.
const SELECTOR_ATTRIBUTES: &[Field] = &[
    f(1, "rawSelector", Kind::Str),
    f(
        2,
        "requirements",
        Kind::RepMsg(&[
            r(1, "key", Kind::Str),
            r(2, "operator", Kind::Str),
            f(3, "values", Kind::RepStr),
        ]),
    ),
];

const RESOURCE_ATTRIBUTES: &[Field] = &[
    f(1, "namespace", Kind::Str),
    f(2, "verb", Kind::Str),
    f(3, "group", Kind::Str),
    f(4, "version", Kind::Str),
    f(5, "resource", Kind::Str),
    f(6, "subresource", Kind::Str),
    f(7, "name", Kind::Str),
    // Selectors (1.31+) are decoded so the review echoes them; kube-sim's
    // RBAC ignores them, as RBAC does.
    p(8, "fieldSelector", Kind::Msg(SELECTOR_ATTRIBUTES)),
    p(9, "labelSelector", Kind::Msg(SELECTOR_ATTRIBUTES)),
];

const NON_RESOURCE_ATTRIBUTES: &[Field] = &[f(1, "path", Kind::Str), f(2, "verb", Kind::Str)];

pub(crate) const SELF_SUBJECT_ACCESS_REVIEW: &[Field] = &[
    META,
    r(
        2,
        "spec",
        Kind::Msg(&[
            p(1, "resourceAttributes", Kind::Msg(RESOURCE_ATTRIBUTES)),
            p(
                2,
                "nonResourceAttributes",
                Kind::Msg(NON_RESOURCE_ATTRIBUTES),
            ),
        ]),
    ),
];

pub(crate) const SUBJECT_ACCESS_REVIEW: &[Field] = &[
    META,
    r(
        2,
        "spec",
        Kind::Msg(&[
            p(1, "resourceAttributes", Kind::Msg(RESOURCE_ATTRIBUTES)),
            p(
                2,
                "nonResourceAttributes",
                Kind::Msg(NON_RESOURCE_ATTRIBUTES),
            ),
            f(3, "user", Kind::Str),
            f(4, "groups", Kind::RepStr),
            f(6, "uid", Kind::Str),
        ]),
    ),
];
