//! The resource types kube-sim serves, in one table.
//!
//! Discovery, OpenAPI, routing, Tables and storage all read this table, so a
//! type is added in exactly one place. The shapes follow the apiserver's
//! `APIResource` (see fixtures/discovery_*.body). Custom resources are not
//! here: a running kube-sim adds the types of its CRDs
//! ([`Store::types`](crate::sim::store::Store::types), built by `crd`);
//! OpenAPI documents only the built-in types.

/// One served resource (a plural name under a group/version).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceType {
    /// API group; "" for the core group (`/api/v1`).
    pub group: &'static str,
    pub version: &'static str,
    /// Plural, lower case: `pods`.
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    /// `ListKind` is `{kind}List`.
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub verbs: &'static [&'static str],
    /// Subresources served for this type (e.g. `status`, `exec`, `token`).
    pub subresources: &'static [Subresource],
    pub categories: &'static [&'static str],
    /// A custom resource served because a CustomResourceDefinition exists
    /// (see `crd`): its objects may be read through any served version of
    /// the CRD, and it prints the CRD default Table (Name, Age).
    pub custom: bool,
}

/// A subresource as discovery lists it (`pods/exec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subresource {
    pub name: &'static str,
    pub kind: &'static str,
    /// Group/version of the subresource's own kind when it differs.
    pub group: &'static str,
    pub version: &'static str,
    pub verbs: &'static [&'static str],
}

/// The verbs of an ordinary stored type.
pub const CRUD: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
/// Review-style types (TokenReview, SubjectAccessReview): create only.
pub const CREATE_ONLY: &[&str] = &["create"];

/// The `status` subresource of an ordinary stored type.
pub const STATUS: Subresource = Subresource {
    name: "status",
    kind: "",
    group: "",
    version: "",
    verbs: &["get", "patch", "update"],
};

impl ResourceType {
    /// `v1` or `apps/v1`.
    pub fn group_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The `apiVersion` field of objects of this type (same as group_version).
    pub fn api_version(&self) -> String {
        self.group_version()
    }

    /// `PodList`.
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// Whether objects of this type are stored (have list/watch).
    pub fn is_stored(&self) -> bool {
        self.verbs.contains(&"watch")
    }

    /// URL prefix of the group/version: `/api/v1` or `/apis/apps/v1`.
    pub fn prefix(&self) -> String {
        if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        }
    }
}

/// Every type kube-sim serves.
pub const RESOURCES: &[ResourceType] = &[
    ResourceType {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
        verbs: &[
            "create", "delete", "get", "list", "patch", "update", "watch",
        ],
        subresources: &[STATUS],
        categories: &[],
        custom: false,
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        short_names: &["no"],
        verbs: CRUD,
        subresources: &[STATUS],
        categories: &[],
        custom: false,
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short_names: &["po"],
        verbs: CRUD,
        subresources: &[
            STATUS,
            // What a scheduler POSTs to put a pod on a node.
            Subresource {
                name: "binding",
                kind: "Binding",
                group: "",
                version: "",
                verbs: &["create"],
            },
            Subresource {
                name: "exec",
                kind: "PodExecOptions",
                group: "",
                version: "",
                verbs: &["create", "get"],
            },
            Subresource {
                name: "log",
                kind: "Pod",
                group: "",
                version: "",
                verbs: &["get"],
            },
        ],
        categories: &["all"],
        custom: false,
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "configmaps",
        singular: "configmap",
        kind: "ConfigMap",
        namespaced: true,
        short_names: &["cm"],
        verbs: CRUD,
        subresources: &[],
        categories: &[],
        custom: false,
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "secrets",
        singular: "secret",
        kind: "Secret",
        namespaced: true,
        short_names: &[],
        verbs: CRUD,
        subresources: &[],
        categories: &[],
        custom: false,
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short_names: &["svc"],
        verbs: CRUD,
        subresources: &[STATUS],
        categories: &["all"],
        custom: false,
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "serviceaccounts",
        singular: "serviceaccount",
        kind: "ServiceAccount",
        namespaced: true,
        short_names: &["sa"],
        verbs: CRUD,
        subresources: &[Subresource {
            name: "token",
            kind: "TokenRequest",
            group: "authentication.k8s.io",
            version: "v1",
            verbs: &["create"],
        }],
        categories: &[],
        custom: false,
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        verbs: CRUD,
        subresources: &[],
        categories: &[],
        custom: false,
    },
    ResourceType {
        group: "apps",
        version: "v1",
        plural: "deployments",
        singular: "deployment",
        kind: "Deployment",
        namespaced: true,
        short_names: &["deploy"],
        verbs: CRUD,
        subresources: &[STATUS],
        categories: &["all"],
        custom: false,
    },
    ResourceType {
        group: "apps",
        version: "v1",
        plural: "daemonsets",
        singular: "daemonset",
        kind: "DaemonSet",
        namespaced: true,
        short_names: &["ds"],
        verbs: CRUD,
        subresources: &[STATUS],
        categories: &["all"],
        custom: false,
    },
    ResourceType {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        singular: "lease",
        kind: "Lease",
        namespaced: true,
        short_names: &[],
        verbs: CRUD,
        subresources: &[],
        categories: &[],
        custom: false,
    },
    ResourceType {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "clusterrolebindings",
        singular: "clusterrolebinding",
        kind: "ClusterRoleBinding",
        namespaced: false,
        short_names: &[],
        verbs: CRUD,
        subresources: &[],
        categories: &[],
        custom: false,
    },
    ResourceType {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "clusterroles",
        singular: "clusterrole",
        kind: "ClusterRole",
        namespaced: false,
        short_names: &[],
        verbs: CRUD,
        subresources: &[],
        categories: &[],
        custom: false,
    },
    ResourceType {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "rolebindings",
        singular: "rolebinding",
        kind: "RoleBinding",
        namespaced: true,
        short_names: &[],
        verbs: CRUD,
        subresources: &[],
        categories: &[],
        custom: false,
    },
    ResourceType {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "roles",
        singular: "role",
        kind: "Role",
        namespaced: true,
        short_names: &[],
        verbs: CRUD,
        subresources: &[],
        categories: &[],
        custom: false,
    },
    ResourceType {
        group: "authentication.k8s.io",
        version: "v1",
        plural: "tokenreviews",
        singular: "tokenreview",
        kind: "TokenReview",
        namespaced: false,
        short_names: &[],
        verbs: CREATE_ONLY,
        subresources: &[],
        categories: &[],
        custom: false,
    },
    // Served at one version only ([`SelfSubjectReviewVersion`], [`builtin`]).
    self_subject_review("v1"),
    ResourceType {
        group: "authorization.k8s.io",
        version: "v1",
        plural: "subjectaccessreviews",
        singular: "subjectaccessreview",
        kind: "SubjectAccessReview",
        namespaced: false,
        short_names: &[],
        verbs: CREATE_ONLY,
        subresources: &[],
        categories: &[],
        custom: false,
    },
    ResourceType {
        group: "authorization.k8s.io",
        version: "v1",
        plural: "selfsubjectaccessreviews",
        singular: "selfsubjectaccessreview",
        kind: "SelfSubjectAccessReview",
        namespaced: false,
        short_names: &[],
        verbs: CREATE_ONLY,
        subresources: &[],
        categories: &[],
        custom: false,
    },
    // Creating one registers its custom resource types (see `crd`).
    ResourceType {
        group: "apiextensions.k8s.io",
        version: "v1",
        plural: "customresourcedefinitions",
        singular: "customresourcedefinition",
        kind: "CustomResourceDefinition",
        namespaced: false,
        short_names: &["crd", "crds"],
        verbs: CRUD,
        subresources: &[STATUS],
        categories: &["api-extensions"],
        custom: false,
    },
];

/// Which `authentication.k8s.io` version serves SelfSubjectReview
/// (`kubectl auth whoami`), as in the apiserver's release history: `v1`
/// from Kubernetes 1.28 (kube-sim's default; it reports 1.32), `v1beta1` in
/// 1.27, `v1alpha1` in 1.26 with the `APISelfSubjectReview` feature gate,
/// and none before: a v1.24 apiserver, like the recorded fixtures, answers
/// 404 at every version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SelfSubjectReviewVersion {
    #[default]
    V1,
    V1beta1,
    V1alpha1,
    /// Not served (Kubernetes 1.25 and before).
    #[value(name = "none")]
    Absent,
}

/// SelfSubjectReview at `version` (the v1 type is in [`RESOURCES`], the
/// others replace it in [`builtin`]).
const fn self_subject_review(version: &'static str) -> ResourceType {
    ResourceType {
        group: "authentication.k8s.io",
        version,
        plural: "selfsubjectreviews",
        singular: "selfsubjectreview",
        kind: "SelfSubjectReview",
        namespaced: false,
        short_names: &[],
        verbs: CREATE_ONLY,
        subresources: &[],
        categories: &[],
        custom: false,
    }
}

static SELF_SUBJECT_REVIEW_V1BETA1: ResourceType = self_subject_review("v1beta1");
static SELF_SUBJECT_REVIEW_V1ALPHA1: ResourceType = self_subject_review("v1alpha1");

/// The built-in types a kube-sim serves, with SelfSubjectReview at
/// `self_subject_review` (in the v1 type's place, or left out).
pub fn builtin(self_subject_review: SelfSubjectReviewVersion) -> Vec<&'static ResourceType> {
    let replacement = match self_subject_review {
        SelfSubjectReviewVersion::V1 => return RESOURCES.iter().collect(),
        SelfSubjectReviewVersion::V1beta1 => Some(&SELF_SUBJECT_REVIEW_V1BETA1),
        SelfSubjectReviewVersion::V1alpha1 => Some(&SELF_SUBJECT_REVIEW_V1ALPHA1),
        SelfSubjectReviewVersion::Absent => None,
    };
    let mut out: Vec<&'static ResourceType> = RESOURCES
        .iter()
        .filter(|r| !(r.group == "authentication.k8s.io" && r.plural == "selfsubjectreviews"))
        .collect();
    // After the group's v1 types, as the apiserver lists a group's
    // preferred version first.
    let at = out
        .iter()
        .rposition(|r| r.group == "authentication.k8s.io")
        .map_or(out.len(), |i| i + 1);
    if let Some(r) = replacement {
        out.insert(at, r);
    }
    out
}

/// The distinct group/versions of the built-in types, in discovery order
/// (core first). A running kube-sim also serves its CRDs' types:
/// [`Store::group_versions`](crate::sim::store::Store::group_versions).
pub fn group_versions() -> Vec<(&'static str, &'static str)> {
    group_versions_of(RESOURCES.iter())
}

/// The distinct group/versions of `types`, in their order.
pub fn group_versions_of<'a>(
    types: impl IntoIterator<Item = &'a ResourceType>,
) -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&'static str, &'static str)> = Vec::new();
    for r in types {
        if !out.contains(&(r.group, r.version)) {
            out.push((r.group, r.version));
        }
    }
    out
}

/// Looks a built-in type up by group, version and plural. Custom resources
/// exist per kube-sim instance: [`Store::find`](crate::sim::store::Store::find).
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Looks a built-in type up by its `apiVersion` and `kind` (as found in a
/// request body); [`Store::find_kind`](crate::sim::store::Store::find_kind)
/// also sees custom resources.
pub fn find_kind(api_version: &str, kind: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|r| r.kind == kind && r.api_version() == api_version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_is_found_by_its_own_coordinates() {
        for r in RESOURCES {
            assert_eq!(find(r.group, r.version, r.plural), Some(r));
            assert_eq!(find_kind(&r.api_version(), r.kind), Some(r));
        }
    }

    #[test]
    fn core_group_comes_first_in_discovery_order() {
        assert_eq!(group_versions()[0], ("", "v1"));
    }
}
