//! kube-sim's authorizer: the apiserver's RBAC for the subset kube-sim serves.
//!
//! Requests are authorized like `--authorization-mode=RBAC`: members of
//! `system:masters` are allowed outright (the apiserver's privileged-group
//! authorizer runs before RBAC), then ClusterRoleBindings and the
//! RoleBindings of the request's namespace are walked, each subject matched
//! against the user (User, Group, ServiceAccount), and the referenced role's
//! rules checked (verbs, apiGroups, resources incl. `pods/exec` and `*/scale`
//! forms, resourceNames, nonResourceURLs with a trailing `*`). The objects
//! live in the ordinary store, so `kubectl create role/rolebinding` changes
//! what is allowed at once. [`seed_bootstrap`] installs the minimal bootstrap
//! policy the apiserver starts with, and [`forbidden`] shapes the 403 Status
//! exactly as `responsewriters.Forbidden` does.

use serde::Serialize;
use serde_json::{Value, json};

use super::auth::UserInfo;
use super::resources::{self, ResourceType};
use super::store::{ListOptions, Store, StoreError};

/// The group whose members every authorizer allows (the apiserver's
/// `system:masters` privileged group).
pub const MASTERS: &str = "system:masters";

/// How kube-sim authorizes requests (`--authorization-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Authorization {
    /// Every authenticated (or anonymous) request is allowed.
    AlwaysAllow,
    /// RBAC over the Role/ClusterRole/RoleBinding/ClusterRoleBinding objects
    /// in the store.
    #[default]
    Rbac,
}

/// What a request wants to do, as the apiserver's `authorizer.Attributes`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    /// Resource verbs (`get`, `list`, `impersonate`...) or, for non-resource
    /// requests, the lower-case HTTP method.
    pub verb: String,
    pub resource_request: bool,
    pub api_group: String,
    pub api_version: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// The URL path of a non-resource request.
    pub path: String,
}

impl Attributes {
    /// A non-resource request (`/healthz`, `/api`...).
    pub fn non_resource(verb: &str, path: &str) -> Attributes {
        Attributes {
            verb: verb.to_string(),
            path: path.to_string(),
            ..Attributes::default()
        }
    }
}

/// An authorization decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; the reason is what a SubjectAccessReview reports
    /// (`RBAC: allowed by ClusterRoleBinding ...`, empty for system:masters).
    Allow(String),
    /// Denied (RBAC gives no opinion and nothing else allows).
    Deny,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }
}

/// Evaluates requests against the RBAC objects of a store.
#[derive(Clone)]
pub struct Authorizer {
    mode: Authorization,
    store: Store,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Authorizer {
    pub fn new(mode: Authorization, store: Store) -> Authorizer {
        Authorizer { mode, store }
    }

    pub fn mode(&self) -> Authorization {
        self.mode
    }

    /// May `user` do `attrs`?
    pub fn authorize(&self, user: &UserInfo, attrs: &Attributes) -> Decision {
        if self.mode == Authorization::AlwaysAllow || user.groups.iter().any(|g| g == MASTERS) {
            return Decision::Allow(String::new());
        }
        let all = ListOptions::default();
        if let Some(rt) = rbac_type("clusterrolebindings")
            && let Ok(bindings) = self.store.list(rt, None, &all)
        {
            for b in &bindings.items {
                if let Some(reason) = self.binding_allows(b, user, attrs, None) {
                    return Decision::Allow(reason);
                }
            }
        }
        if !attrs.namespace.is_empty()
            && let Some(rt) = rbac_type("rolebindings")
            && let Ok(bindings) = self.store.list(rt, Some(&attrs.namespace), &all)
        {
            for b in &bindings.items {
                if let Some(reason) =
                    self.binding_allows(b, user, attrs, Some(attrs.namespace.as_str()))
                {
                    return Decision::Allow(reason);
                }
            }
        }
        Decision::Deny
    }

    /// The allow reason when `binding` (a RoleBinding in `namespace`, or a
    /// ClusterRoleBinding when None) grants `attrs` to `user`.
    fn binding_allows(
        &self,
        binding: &Value,
        user: &UserInfo,
        attrs: &Attributes,
        namespace: Option<&str>,
    ) -> Option<String> {
        let subjects = binding.get("subjects")?.as_array()?;
        let subject = subjects
            .iter()
            .find(|s| applies_to_user(user, s, namespace.unwrap_or("")))?;
        let role_kind = str_at(binding, "/roleRef/kind");
        let role_name = str_at(binding, "/roleRef/name");
        let role = match (role_kind, namespace) {
            ("ClusterRole", _) => self
                .store
                .get(rbac_type("clusterroles")?, None, role_name)
                .ok()?,
            ("Role", Some(ns)) => self
                .store
                .get(rbac_type("roles")?, Some(ns), role_name)
                .ok()?,
            _ => return None,
        };
        let rules = role.get("rules")?.as_array()?;
        if !rules.iter().any(|r| rule_allows(attrs, r)) {
            return None;
        }
        let binding_name = str_at(binding, "/metadata/name");
        Some(match namespace {
            None => format!(
                "RBAC: allowed by ClusterRoleBinding {binding_name:?} of {role_kind} {role_name:?} to {}",
                describe_subject(subject, "")
            ),
            Some(ns) => format!(
                "RBAC: allowed by RoleBinding {:?} of {role_kind} {role_name:?} to {}",
                format!("{binding_name}/{ns}"),
                describe_subject(subject, ns)
            ),
        })
    }
}

fn rbac_type(plural: &str) -> Option<&'static ResourceType> {
    resources::find("rbac.authorization.k8s.io", "v1", plural)
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn strings(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// rbac's `appliesToUser`.
fn applies_to_user(user: &UserInfo, subject: &Value, namespace: &str) -> bool {
    let name = str_at(subject, "/name");
    match str_at(subject, "/kind") {
        "User" => user.username == name,
        "Group" => user.groups.iter().any(|g| g == name),
        "ServiceAccount" => {
            let ns = match str_at(subject, "/namespace") {
                "" => namespace,
                ns => ns,
            };
            !ns.is_empty() && user.username == format!("system:serviceaccount:{ns}:{name}")
        }
        _ => false,
    }
}

/// rbac's `describeSubject`.
fn describe_subject(subject: &Value, binding_namespace: &str) -> String {
    let kind = str_at(subject, "/kind");
    let name = str_at(subject, "/name");
    if kind == "ServiceAccount" {
        let ns = match str_at(subject, "/namespace") {
            "" => binding_namespace,
            ns => ns,
        };
        return format!("{kind} {:?}", format!("{name}/{ns}"));
    }
    format!("{kind} {name:?}")
}

/// rbac's `RuleAllows`.
pub fn rule_allows(attrs: &Attributes, rule: &Value) -> bool {
    let verbs = strings(rule, "verbs");
    if !verbs.iter().any(|v| v == "*" || *v == attrs.verb) {
        return false;
    }
    if !attrs.resource_request {
        return strings(rule, "nonResourceURLs").iter().any(|u| {
            u == "*"
                || *u == attrs.path
                || (u.ends_with('*') && attrs.path.starts_with(u.trim_end_matches('*')))
        });
    }
    let groups = strings(rule, "apiGroups");
    if !groups.iter().any(|g| g == "*" || *g == attrs.api_group) {
        return false;
    }
    let combined = if attrs.subresource.is_empty() {
        attrs.resource.clone()
    } else {
        format!("{}/{}", attrs.resource, attrs.subresource)
    };
    let resource_ok = strings(rule, "resources").iter().any(|r| {
        r == "*"
            || *r == combined
            || (!attrs.subresource.is_empty()
                && r.len() == attrs.subresource.len() + 2
                && r.starts_with("*/")
                && r.ends_with(attrs.subresource.as_str()))
    });
    if !resource_ok {
        return false;
    }
    let names = strings(rule, "resourceNames");
    names.is_empty() || names.contains(&attrs.name)
}

/// `metav1.StatusDetails` in the apiserver's field order (empty fields omitted).
#[derive(Serialize)]
struct Details<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    name: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    group: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    kind: &'a str,
}

/// A `metav1.Status` failure in the apiserver's field order.
#[derive(Serialize)]
struct Status<'a> {
    kind: &'static str,
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    metadata: Value,
    status: &'static str,
    message: String,
    reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<Details<'a>>,
    code: u16,
}

/// The apiserver's `forbiddenMessage`.
pub fn forbidden_message(user: &UserInfo, attrs: &Attributes) -> String {
    let who = &user.username;
    if !attrs.resource_request {
        return format!("User {who:?} cannot {} path {:?}", attrs.verb, attrs.path);
    }
    let mut resource = attrs.resource.clone();
    if !attrs.subresource.is_empty() {
        resource = format!("{resource}/{}", attrs.subresource);
    }
    if !attrs.namespace.is_empty() {
        return format!(
            "User {who:?} cannot {} resource {resource:?} in API group {:?} in the namespace {:?}",
            attrs.verb, attrs.api_group, attrs.namespace
        );
    }
    format!(
        "User {who:?} cannot {} resource {resource:?} in API group {:?} at the cluster scope",
        attrs.verb, attrs.api_group
    )
}

/// The 403 Status body of `responsewriters.Forbidden` (fixtures/error-403-forbidden.body):
/// `apierrors.NewForbidden(group/resource, name, forbiddenMessage[: reason])`.
pub fn forbidden(user: &UserInfo, attrs: &Attributes, reason: &str) -> Vec<u8> {
    let mut err = forbidden_message(user, attrs);
    if !reason.is_empty() {
        err = format!("{err}: {reason}");
    }
    let qualified = if attrs.api_group.is_empty() {
        attrs.resource.clone()
    } else {
        format!("{}.{}", attrs.resource, attrs.api_group)
    };
    let message = if attrs.resource.is_empty() && attrs.api_group.is_empty() {
        format!("forbidden: {err}")
    } else if attrs.name.is_empty() {
        format!("{qualified} is forbidden: {err}")
    } else {
        format!("{qualified} {:?} is forbidden: {err}", attrs.name)
    };
    let status = Status {
        kind: "Status",
        api_version: "v1",
        metadata: json!({}),
        status: "Failure",
        message,
        reason: "Forbidden",
        details: Some(Details {
            name: &attrs.name,
            group: &attrs.api_group,
            kind: &attrs.resource,
        }),
        code: 403,
    };
    serde_json::to_vec(&status).unwrap_or_default()
}

/// Installs the apiserver's bootstrap policy, minimal: cluster-admin for
/// system:masters, discovery and self-reviews for every authenticated user,
/// health and version for everyone, the service-account issuer's discovery
/// documents for every ServiceAccount. Existing objects are left alone.
pub fn seed_bootstrap(store: &Store) -> Result<(), StoreError> {
    let cluster_roles = [
        (
            "cluster-admin",
            json!([
                {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                {"nonResourceURLs": ["*"], "verbs": ["*"]},
            ]),
        ),
        (
            "system:discovery",
            json!([{"nonResourceURLs": [
                "/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez",
                "/openapi", "/openapi/*", "/readyz", "/version", "/version/",
            ], "verbs": ["get"]}]),
        ),
        (
            // What an authenticating proxy or aggregated apiserver needs.
            "system:auth-delegator",
            json!([
                {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
                {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
            ]),
        ),
        (
            "system:basic-user",
            json!([
                {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"], "verbs": ["create"]},
                {"apiGroups": ["authorization.k8s.io"], "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]},
            ]),
        ),
        (
            "system:public-info-viewer",
            json!([{"nonResourceURLs": [
                "/healthz", "/livez", "/readyz", "/version", "/version/",
            ], "verbs": ["get"]}]),
        ),
        (
            // ServiceAccountIssuerDiscovery (bootstrappolicy/policy.go).
            "system:service-account-issuer-discovery",
            json!([{"nonResourceURLs": [
                "/.well-known/openid-configuration", "/openid/v1/jwks",
            ], "verbs": ["get"]}]),
        ),
    ];
    let rt = rbac_type("clusterroles").expect("invariant: RBAC types are in the resource table");
    for (name, rules) in cluster_roles {
        create_unless_exists(
            store,
            rt,
            None,
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {
                    "name": name,
                    "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
                    "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"},
                },
                "rules": rules,
            }),
        )?;
    }
    let authenticated = json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:authenticated"});
    let unauthenticated = json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:unauthenticated"});
    let bindings = [
        (
            "cluster-admin",
            json!([{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": MASTERS}]),
        ),
        ("system:discovery", json!([authenticated])),
        ("system:basic-user", json!([authenticated])),
        (
            "system:public-info-viewer",
            json!([authenticated, unauthenticated]),
        ),
        (
            // Every ServiceAccount, as the apiserver binds it.
            "system:service-account-issuer-discovery",
            json!([{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:serviceaccounts"}]),
        ),
    ];
    for (name, subjects) in bindings {
        bind_cluster_role(store, name, name, subjects, true)?;
    }
    Ok(())
}

/// Creates ClusterRoleBinding `name` of ClusterRole `role` to `subjects`
/// (unless it exists).
pub fn bind_cluster_role(
    store: &Store,
    name: &str,
    role: &str,
    subjects: Value,
    bootstrap: bool,
) -> Result<(), StoreError> {
    let rt =
        rbac_type("clusterrolebindings").expect("invariant: RBAC types are in the resource table");
    let mut metadata = json!({"name": name});
    if bootstrap {
        metadata["labels"] = json!({"kubernetes.io/bootstrapping": "rbac-defaults"});
        metadata["annotations"] = json!({"rbac.authorization.kubernetes.io/autoupdate": "true"});
    }
    create_unless_exists(
        store,
        rt,
        None,
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": metadata,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": subjects,
        }),
    )
}

/// The SubjectAccessReview (user from `spec`) or SelfSubjectAccessReview
/// (`requester`) answer, evaluated with `authz` (shape:
/// fixtures/subjectaccessreview.body). Selector attributes are echoed and
/// ignored, as RBAC ignores them.
pub fn access_review(
    authz: &Authorizer,
    body: &Value,
    kind: &str,
    api_version: &str,
    requester: &UserInfo,
) -> Value {
    let mut out = super::auth::review_echo(body, kind, api_version);
    let spec = body.get("spec").cloned().unwrap_or_else(|| json!({}));
    let user = if kind == "SubjectAccessReview" {
        UserInfo {
            username: str_at(&spec, "/user").to_string(),
            uid: str_at(&spec, "/uid").to_string(),
            groups: strings(&spec, "groups"),
            extra: spec
                .get("extra")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| {
                            let values = v
                                .as_array()
                                .map(|a| {
                                    a.iter()
                                        .filter_map(|x| x.as_str().map(str::to_string))
                                        .collect()
                                })
                                .unwrap_or_default();
                            (k.clone(), values)
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    } else {
        requester.clone()
    };
    let attrs = if let Some(ra) = spec.get("resourceAttributes") {
        Attributes {
            verb: str_at(ra, "/verb").to_string(),
            resource_request: true,
            api_group: str_at(ra, "/group").to_string(),
            api_version: str_at(ra, "/version").to_string(),
            resource: str_at(ra, "/resource").to_string(),
            subresource: str_at(ra, "/subresource").to_string(),
            namespace: str_at(ra, "/namespace").to_string(),
            name: str_at(ra, "/name").to_string(),
            path: String::new(),
        }
    } else {
        let nra = spec
            .get("nonResourceAttributes")
            .cloned()
            .unwrap_or_else(|| json!({}));
        Attributes::non_resource(str_at(&nra, "/verb"), str_at(&nra, "/path"))
    };
    out["status"] = match authz.authorize(&user, &attrs) {
        Decision::Allow(reason) if reason.is_empty() => json!({"allowed": true}),
        Decision::Allow(reason) => json!({"allowed": true, "reason": reason}),
        Decision::Deny => json!({"allowed": false}),
    };
    out
}

fn create_unless_exists(
    store: &Store,
    rt: &'static ResourceType,
    namespace: Option<&str>,
    obj: Value,
) -> Result<(), StoreError> {
    match store.create(rt, namespace, obj) {
        Ok(_) | Err(StoreError::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, groups: &[&str]) -> UserInfo {
        UserInfo {
            username: name.to_string(),
            uid: String::new(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            extra: Default::default(),
        }
    }

    fn res(verb: &str, group: &str, resource: &str, sub: &str, ns: &str, name: &str) -> Attributes {
        Attributes {
            verb: verb.into(),
            resource_request: true,
            api_group: group.into(),
            api_version: "v1".into(),
            resource: resource.into(),
            subresource: sub.into(),
            namespace: ns.into(),
            name: name.into(),
            path: String::new(),
        }
    }

    #[test]
    fn rules_match_verbs_groups_resources_subresources_and_names() {
        let rule =
            json!({"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"]});
        assert!(rule_allows(&res("get", "", "pods", "", "a", "p"), &rule));
        assert!(rule_allows(&res("get", "", "pods", "log", "a", "p"), &rule));
        assert!(!rule_allows(
            &res("get", "", "pods", "exec", "a", "p"),
            &rule
        ));
        assert!(!rule_allows(
            &res("delete", "", "pods", "", "a", "p"),
            &rule
        ));
        assert!(!rule_allows(
            &res("get", "apps", "pods", "", "a", "p"),
            &rule
        ));
        let star_sub = json!({"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["*"]});
        assert!(rule_allows(
            &res("update", "apps", "deployments", "status", "", "d"),
            &star_sub
        ));
        assert!(!rule_allows(
            &res("update", "apps", "deployments", "", "", "d"),
            &star_sub
        ));
        let named = json!({"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["one"], "verbs": ["get"]});
        assert!(rule_allows(
            &res("get", "", "configmaps", "", "a", "one"),
            &named
        ));
        assert!(!rule_allows(
            &res("get", "", "configmaps", "", "a", "two"),
            &named
        ));
        assert!(!rule_allows(
            &res("get", "", "configmaps", "", "a", ""),
            &named
        ));
        let urls = json!({"nonResourceURLs": ["/apis/*", "/healthz"], "verbs": ["get"]});
        assert!(rule_allows(
            &Attributes::non_resource("get", "/apis/apps/v1"),
            &urls
        ));
        assert!(rule_allows(
            &Attributes::non_resource("get", "/healthz"),
            &urls
        ));
        assert!(!rule_allows(
            &Attributes::non_resource("get", "/healthz/etcd"),
            &urls
        ));
        assert!(!rule_allows(
            &Attributes::non_resource("post", "/healthz"),
            &urls
        ));
        // A resource rule never matches a non-resource request and vice versa.
        assert!(!rule_allows(&res("get", "", "healthz", "", "", ""), &urls));
    }

    #[test]
    fn forbidden_messages_match_the_apiserver() {
        let sa = user("system:serviceaccount:fixtures:limited", &[]);
        let body = forbidden(&sa, &res("list", "", "secrets", "", "fixtures", ""), "");
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            v,
            json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
                "message":"secrets is forbidden: User \"system:serviceaccount:fixtures:limited\" cannot list resource \"secrets\" in API group \"\" in the namespace \"fixtures\"",
                "reason":"Forbidden","details":{"kind":"secrets"},"code":403})
        );
        let v: Value = serde_json::from_slice(&forbidden(
            &sa,
            &res("impersonate", "", "users", "", "", "bob"),
            "",
        ))
        .expect("json");
        assert_eq!(
            v["message"],
            "users \"bob\" is forbidden: User \"system:serviceaccount:fixtures:limited\" cannot impersonate resource \"users\" in API group \"\" at the cluster scope"
        );
        assert_eq!(v["details"], json!({"name": "bob", "kind": "users"}));
        let v: Value = serde_json::from_slice(&forbidden(
            &sa,
            &Attributes::non_resource("get", "/metrics"),
            "",
        ))
        .expect("json");
        assert_eq!(
            v["message"],
            "forbidden: User \"system:serviceaccount:fixtures:limited\" cannot get path \"/metrics\""
        );
        assert_eq!(v["details"], json!({}));
    }

    #[test]
    fn bindings_grant_to_users_groups_and_service_accounts() {
        let store = Store::new(100, 100);
        seed_bootstrap(&store).expect("bootstrap");
        let ns = resources::find("", "v1", "namespaces").expect("ns");
        store
            .create(
                ns,
                None,
                json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":"demo"}}),
            )
            .expect("ns");
        store
            .create(
                rbac_type("roles").expect("roles"),
                Some("demo"),
                json!({"apiVersion":"rbac.authorization.k8s.io/v1","kind":"Role",
                    "metadata":{"name":"pod-reader","namespace":"demo"},
                    "rules":[{"apiGroups":[""],"resources":["pods"],"verbs":["get","list"]}]}),
            )
            .expect("role");
        store
            .create(
                rbac_type("rolebindings").expect("rb"),
                Some("demo"),
                json!({"apiVersion":"rbac.authorization.k8s.io/v1","kind":"RoleBinding",
                    "metadata":{"name":"read-pods","namespace":"demo"},
                    "roleRef":{"apiGroup":"rbac.authorization.k8s.io","kind":"Role","name":"pod-reader"},
                    "subjects":[{"kind":"ServiceAccount","name":"viewer"},
                                {"kind":"User","apiGroup":"rbac.authorization.k8s.io","name":"alice"}]}),
            )
            .expect("rb");
        let authz = Authorizer::new(Authorization::Rbac, store.clone());
        let viewer = user(
            "system:serviceaccount:demo:viewer",
            &["system:authenticated"],
        );
        let d = authz.authorize(&viewer, &res("list", "", "pods", "", "demo", ""));
        assert_eq!(
            d,
            Decision::Allow(
                "RBAC: allowed by RoleBinding \"read-pods/demo\" of Role \"pod-reader\" to ServiceAccount \"viewer/demo\"".into()
            )
        );
        assert!(
            !authz
                .authorize(&viewer, &res("list", "", "pods", "", "other", ""))
                .allowed()
        );
        assert!(
            !authz
                .authorize(&viewer, &res("list", "", "pods", "", "", ""))
                .allowed()
        );
        assert!(
            !authz
                .authorize(&viewer, &res("list", "", "configmaps", "", "demo", ""))
                .allowed()
        );
        let alice = user("alice", &["system:authenticated"]);
        assert!(
            authz
                .authorize(&alice, &res("get", "", "pods", "", "demo", "p"))
                .allowed()
        );
        // Discovery for every authenticated user, health for everyone.
        assert_eq!(
            authz.authorize(&alice, &Attributes::non_resource("get", "/apis/apps/v1")),
            Decision::Allow(
                "RBAC: allowed by ClusterRoleBinding \"system:discovery\" of ClusterRole \"system:discovery\" to Group \"system:authenticated\"".into()
            )
        );
        let anon = user("system:anonymous", &["system:unauthenticated"]);
        assert!(
            authz
                .authorize(&anon, &Attributes::non_resource("get", "/healthz"))
                .allowed()
        );
        assert!(
            !authz
                .authorize(&anon, &Attributes::non_resource("get", "/api"))
                .allowed()
        );
        let admin = user("kubernetes-admin", &[MASTERS, "system:authenticated"]);
        assert_eq!(
            authz.authorize(&admin, &res("delete", "", "nodes", "", "", "n")),
            Decision::Allow(String::new())
        );
        let open = Authorizer::new(Authorization::AlwaysAllow, store);
        assert!(
            open.authorize(&anon, &res("delete", "", "nodes", "", "", "n"))
                .allowed()
        );
    }
}
