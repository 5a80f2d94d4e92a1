//! Rule matching: who is asking ([`Subject`]), what they ask
//! ([`RequestAttrs`]), and the compiled `match` of a rule ([`Matcher`]).
//!
//! Everything is compiled at load time (globs classified into exact /
//! prefix / suffix / general, verbs into a bit set) so that matching a
//! request against a handful of rules costs tens of nanoseconds and never
//! allocates.

use std::fmt;

/// Who is asking: the authenticated user name and groups.
///
/// A ServiceAccount is recognised from the user name
/// `system:serviceaccount:NAMESPACE:NAME`, as the apiserver does.
/// `pod` and `node` are what a rule's `key` may count per instead of the
/// user; the proxy fills them from the credentials (see [`crate::Key`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Subject<'a> {
    /// User name (`system:serviceaccount:ns:name` for ServiceAccounts).
    pub user: &'a str,
    /// Groups.
    pub groups: &'a [String],
    /// The Pod name a bound ServiceAccount token carries
    /// (`authentication.kubernetes.io/pod-name`), if any. Pods are unique
    /// per namespace, and a token's Pod is in its ServiceAccount's
    /// namespace, so the limiter qualifies it with the user.
    pub pod: Option<&'a str>,
    /// The node name a bound token carries
    /// (`authentication.kubernetes.io/node-name`), if any. Without it the
    /// node of `system:node:NAME` in `system:nodes` is used.
    pub node: Option<&'a str>,
}

impl<'a> Subject<'a> {
    /// `(namespace, name)` if the user is a ServiceAccount.
    pub fn service_account(&self) -> Option<(&'a str, &'a str)> {
        self.user
            .strip_prefix("system:serviceaccount:")?
            .split_once(':')
    }

    /// The node: the token's node-name, else `NAME` of a node's own
    /// credentials (`system:node:NAME` in `system:nodes`, the Node
    /// authorizer's convention; the group is required so that a user merely
    /// named like a node is not taken for one).
    pub fn node_name(&self) -> Option<&'a str> {
        if let Some(n) = self.node.filter(|n| !n.is_empty()) {
            return Some(n);
        }
        let name = self.user.strip_prefix("system:node:")?;
        (!name.is_empty() && self.groups.iter().any(|g| g == "system:nodes")).then_some(name)
    }

    /// The value `key` counts this subject under, or `None` when the
    /// credentials do not carry it. For `pod` and `serviceAccount` it is
    /// the user name (which names the ServiceAccount, whose namespace
    /// qualifies the Pod); the Pod name is returned separately.
    pub fn key(&self, key: crate::Key) -> Option<(&'a str, &'a str)> {
        match key {
            crate::Key::User => Some((self.user, "")),
            crate::Key::Pod => {
                let pod = self.pod.filter(|p| !p.is_empty())?;
                self.service_account()?;
                Some((self.user, pod))
            }
            crate::Key::Node => self.node_name().map(|n| ("", n)),
            crate::Key::ServiceAccount => self.service_account().map(|_| (self.user, "")),
        }
    }
}

/// What is asked, as classified by the proxy (apiserver RequestInfo terms).
#[derive(Debug, Clone, Copy)]
pub struct RequestAttrs<'a> {
    /// `get`, `list`, `watch`, `create`, ...; lower-case HTTP method for
    /// non-resource requests.
    pub verb: &'a str,
    /// API group, `""` for the core group.
    pub api_group: &'a str,
    /// Resource, e.g. `pods`.
    pub resource: &'a str,
    /// Subresource, e.g. `log`, or `""`.
    pub subresource: &'a str,
    /// Namespace, `""` for cluster-scoped requests.
    pub namespace: &'a str,
    /// False for non-resource URLs (`/healthz`, `/version`, discovery).
    pub is_resource_request: bool,
}

impl RequestAttrs<'_> {
    /// A watch: takes a watch slot and a watch-open token, no in-flight seat.
    pub fn is_watch(&self) -> bool {
        self.verb == "watch"
    }

    /// Long-running as the apiserver's `LongRunningRequestCheck` defines it
    /// (verbs watch/proxy; subresources attach, exec, log, portforward,
    /// proxy). Long-running requests hold neither an in-flight seat nor an
    /// upstream seat, as in APF: they would pin a seat for hours.
    pub fn is_long_running(&self) -> bool {
        if !self.is_resource_request {
            return false;
        }
        matches!(self.verb, "watch" | "proxy")
            || matches!(
                self.subresource,
                "attach" | "exec" | "log" | "portforward" | "proxy"
            )
    }
}

/// A glob with `*` (any run of characters) and `?` (one character).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    source: Box<str>,
    kind: GlobKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum GlobKind {
    Any,
    Exact,
    Prefix(Box<str>),
    Suffix(Box<str>),
    General,
}

/// Why a glob was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    /// `""`.
    #[error("empty pattern")]
    Empty,
    /// Character classes, alternatives and escapes are not supported.
    #[error("unsupported glob character `{0}` in `{1}`")]
    Unsupported(char, String),
    /// Leading or trailing whitespace is almost always a quoting mistake.
    #[error("pattern `{0}` has leading or trailing whitespace")]
    Whitespace(String),
}

impl GlobError {
    /// A one-line fix hint.
    pub fn hint(&self) -> &'static str {
        match self {
            GlobError::Empty => "remove the empty entry, or use \"*\" to match anything",
            GlobError::Unsupported(..) => {
                "only `*` (any characters) and `?` (one character) are supported; list alternatives as separate entries"
            }
            GlobError::Whitespace(_) => "remove the spaces inside the quotes",
        }
    }
}

impl Glob {
    /// Compiles a pattern.
    pub fn new(pattern: &str) -> Result<Glob, GlobError> {
        if pattern.is_empty() {
            return Err(GlobError::Empty);
        }
        if pattern.trim() != pattern {
            return Err(GlobError::Whitespace(pattern.to_string()));
        }
        if let Some(c) = pattern.chars().find(|c| "[]{}\\".contains(*c)) {
            return Err(GlobError::Unsupported(c, pattern.to_string()));
        }
        let stars = pattern.matches('*').count();
        let has_q = pattern.contains('?');
        let kind = if pattern.chars().all(|c| c == '*') {
            GlobKind::Any
        } else if stars == 0 && !has_q {
            GlobKind::Exact
        } else if stars == 1 && !has_q && pattern.ends_with('*') {
            GlobKind::Prefix(pattern[..pattern.len() - 1].into())
        } else if stars == 1 && !has_q && pattern.starts_with('*') {
            GlobKind::Suffix(pattern[1..].into())
        } else {
            GlobKind::General
        };
        Ok(Glob {
            source: pattern.into(),
            kind,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Does `s` match?
    pub fn matches(&self, s: &str) -> bool {
        match &self.kind {
            GlobKind::Any => true,
            GlobKind::Exact => *self.source == *s,
            GlobKind::Prefix(p) => s.starts_with(&**p),
            GlobKind::Suffix(p) => s.ends_with(&**p),
            GlobKind::General => wildcard(self.source.as_bytes(), s.as_bytes()),
        }
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Iterative wildcard matching with single-star backtracking: O(len(p) *
/// len(s)) worst case, no recursion, no allocation. `?` matches one UTF-8
/// character (we step over continuation bytes).
fn wildcard(p: &[u8], s: &[u8]) -> bool {
    let char_len = |b: u8| match b {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    };
    let (mut pi, mut si) = (0usize, 0usize);
    // Position after the last `*` seen in p, and where in s it started.
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            pi += 1;
            star = Some((pi, si));
        } else if pi < p.len() && p[pi] == b'?' {
            pi += 1;
            si += char_len(s[si]).min(s.len() - si);
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            // Let the last star swallow one more character and retry.
            let next = ss + char_len(s[ss]).min(s.len() - ss);
            star = Some((sp, next));
            pi = sp;
            si = next;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// Verbs the file may name. Resource verbs as in RequestInfo, plus the
/// lower-case HTTP methods non-resource requests carry.
pub const KNOWN_VERBS: &[&str] = &[
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
    "proxy",
    "post",
    "put",
    "head",
    "options",
];

/// A set of verbs as a bit mask over [`KNOWN_VERBS`]; `*` sets `any`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VerbSet {
    bits: u32,
    any: bool,
}

impl VerbSet {
    /// Adds a verb from the file; false for an unknown verb.
    pub fn insert(&mut self, verb: &str) -> bool {
        if verb == "*" {
            self.any = true;
            return true;
        }
        match KNOWN_VERBS.iter().position(|v| *v == verb) {
            Some(i) => {
                self.bits |= 1 << i;
                true
            }
            None => false,
        }
    }

    /// Does the set contain `verb`? (An empty set is "any", handled by
    /// the caller.)
    pub fn contains(&self, verb: &str) -> bool {
        if self.any {
            return true;
        }
        match KNOWN_VERBS.iter().position(|v| *v == verb) {
            Some(i) => self.bits & (1 << i) != 0,
            None => false,
        }
    }

    fn is_empty(&self) -> bool {
        !self.any && self.bits == 0
    }
}

/// API groups written without a dot; any other dotless first part of a
/// two-part resource pattern is a resource (`pods/log`), not a group.
const DOTLESS_GROUPS: &[&str] = &[
    "core",
    "apps",
    "batch",
    "autoscaling",
    "policy",
    "extensions",
];

/// A compiled `resources` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourcePattern {
    source: Box<str>,
    /// `None`: any group.
    group: Option<Glob>,
    resource: Glob,
    /// `None`: the main resource only (no subresource).
    subresource: Option<Glob>,
    /// `*` alone: everything, subresources included (as in RBAC).
    all: bool,
}

impl ResourcePattern {
    /// Parses `resource`, `group/resource`, `resource/subresource` or
    /// `group/resource/subresource`. A two-part pattern is `group/resource`
    /// when the first part contains a dot or is one of `core`, `apps`,
    /// `batch`, `autoscaling`, `policy`, `extensions`; `core` names the
    /// legacy group `""`.
    pub fn new(pattern: &str) -> Result<ResourcePattern, String> {
        let parts: Vec<&str> = pattern.split('/').collect();
        let glob = |s: &str| Glob::new(s).map_err(|e| e.to_string());
        let group = |s: &str| -> Result<Option<Glob>, String> {
            if s == "core" {
                Ok(Some(Glob::new("core").map_err(|e| e.to_string())?))
            } else if s == "*" {
                Ok(None)
            } else {
                glob(s).map(Some)
            }
        };
        let (group, resource, subresource) = match parts.as_slice() {
            [r] => (None, glob(r)?, None),
            [a, b] if a.contains('.') || DOTLESS_GROUPS.contains(a) => (group(a)?, glob(b)?, None),
            [r, s] => (None, glob(r)?, Some(glob(s)?)),
            [g, r, s] => (group(g)?, glob(r)?, Some(glob(s)?)),
            _ => {
                return Err(format!(
                    "`{pattern}` has more than three `/`-separated parts"
                ));
            }
        };
        Ok(ResourcePattern {
            source: pattern.into(),
            all: pattern == "*",
            group,
            resource,
            subresource,
        })
    }

    /// Does the request's group/resource/subresource match?
    pub fn matches(&self, req: &RequestAttrs<'_>) -> bool {
        if self.all {
            return true;
        }
        if let Some(g) = &self.group {
            let group = if req.api_group.is_empty() {
                "core"
            } else {
                req.api_group
            };
            if !g.matches(group) {
                return false;
            }
        }
        if !self.resource.matches(req.resource) {
            return false;
        }
        match &self.subresource {
            None => req.subresource.is_empty(),
            Some(s) => !req.subresource.is_empty() && s.matches(req.subresource),
        }
    }

    /// As written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

/// Why a rule did not match (for `check-limits` explanations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    /// No user, group or serviceAccount entry matched.
    Subject,
    /// The verb is not listed.
    Verb,
    /// The rule lists resources and this is a non-resource request.
    NonResource,
    /// No resources entry matched.
    Resource,
    /// The rule lists namespaces and the request is cluster-scoped.
    ClusterScoped,
    /// No namespaces entry matched.
    Namespace,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mismatch::Subject => "no users/groups/serviceAccounts entry matches the caller",
            Mismatch::Verb => "the verb is not in `verbs`",
            Mismatch::NonResource => {
                "the rule lists `resources` and this is a non-resource request"
            }
            Mismatch::Resource => "no `resources` entry matches",
            Mismatch::ClusterScoped => {
                "the rule lists `namespaces` and the request is cluster-scoped"
            }
            Mismatch::Namespace => "no `namespaces` entry matches",
        })
    }
}

/// A rule's compiled `match`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Matcher {
    pub(crate) users: Vec<Glob>,
    pub(crate) groups: Vec<Glob>,
    pub(crate) service_accounts: Vec<(Glob, Glob)>,
    pub(crate) verbs: VerbSet,
    pub(crate) resources: Vec<ResourcePattern>,
    pub(crate) namespaces: Vec<Glob>,
}

impl Matcher {
    /// `None` if the rule matches; otherwise the first dimension that failed.
    pub fn mismatch(&self, subject: &Subject<'_>, req: &RequestAttrs<'_>) -> Option<Mismatch> {
        if !self.subject_matches(subject) {
            return Some(Mismatch::Subject);
        }
        if !self.verbs.is_empty() && !self.verbs.contains(req.verb) {
            return Some(Mismatch::Verb);
        }
        if !self.resources.is_empty() {
            if !req.is_resource_request {
                return Some(Mismatch::NonResource);
            }
            if !self.resources.iter().any(|r| r.matches(req)) {
                return Some(Mismatch::Resource);
            }
        }
        if !self.namespaces.is_empty() {
            if req.namespace.is_empty() {
                return Some(Mismatch::ClusterScoped);
            }
            if !self.namespaces.iter().any(|g| g.matches(req.namespace)) {
                return Some(Mismatch::Namespace);
            }
        }
        None
    }

    /// Does the rule match?
    #[inline]
    pub fn matches(&self, subject: &Subject<'_>, req: &RequestAttrs<'_>) -> bool {
        self.mismatch(subject, req).is_none()
    }

    /// Whether the rule lists users, groups or ServiceAccounts (a rule
    /// without any matches every subject).
    pub fn names_subjects(&self) -> bool {
        !(self.users.is_empty() && self.groups.is_empty() && self.service_accounts.is_empty())
    }

    /// Subject part only: any users/groups/serviceAccounts entry (OR), or
    /// none listed.
    pub fn subject_matches(&self, subject: &Subject<'_>) -> bool {
        if self.users.is_empty() && self.groups.is_empty() && self.service_accounts.is_empty() {
            return true;
        }
        if self.users.iter().any(|g| g.matches(subject.user)) {
            return true;
        }
        if self
            .groups
            .iter()
            .any(|g| subject.groups.iter().any(|s| g.matches(s)))
        {
            return true;
        }
        if let Some((ns, name)) = subject.service_account() {
            return self
                .service_accounts
                .iter()
                .any(|(n, m)| n.matches(ns) && m.matches(name));
        }
        false
    }

    /// Does the subject part name this user (ignoring groups)? Used to refuse
    /// blocking an exempt identity by accident.
    pub(crate) fn names_user(&self, user: &str) -> bool {
        let s = Subject {
            user,
            groups: &[],
            ..Subject::default()
        };
        let listed =
            !(self.users.is_empty() && self.groups.is_empty() && self.service_accounts.is_empty());
        listed && self.subject_matches(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(p: &str) -> Glob {
        Glob::new(p).expect("valid glob")
    }

    #[test]
    fn globs_match_as_documented() {
        let cases: &[(&str, &str, bool)] = &[
            ("*", "", true),
            ("*", "anything", true),
            ("pods", "pods", true),
            ("pods", "pod", false),
            ("kube-*", "kube-system", true),
            ("kube-*", "kube-", true),
            ("kube-*", "default", false),
            ("*-agent", "node-agent", true),
            ("*-agent", "node-agents", false),
            ("node-?", "node-a", true),
            ("node-?", "node-ab", false),
            ("n?de-*-x", "node-foo-x", true),
            ("n?de-*-x", "node-foo-y", false),
            ("*a*b*", "xxaxxbxx", true),
            ("*a*b*", "xxbxxaxx", false),
            ("a*b*c", "abbbc", true),
            ("a*b*c", "abcb", false),
            ("?", "é", true),
            ("**", "x", true),
            ("a**", "a", true),
        ];
        for (p, s, want) in cases {
            assert_eq!(g(p).matches(s), *want, "{p:?} vs {s:?}");
        }
    }

    #[test]
    fn bad_globs_are_refused() {
        assert_eq!(Glob::new(""), Err(GlobError::Empty));
        assert!(matches!(
            Glob::new("pod[s]"),
            Err(GlobError::Unsupported('[', _))
        ));
        assert!(matches!(
            Glob::new("{a,b}"),
            Err(GlobError::Unsupported('{', _))
        ));
        assert!(matches!(Glob::new(" pods"), Err(GlobError::Whitespace(_))));
    }

    fn req<'a>(
        verb: &'a str,
        group: &'a str,
        res: &'a str,
        sub: &'a str,
        ns: &'a str,
    ) -> RequestAttrs<'a> {
        RequestAttrs {
            verb,
            api_group: group,
            resource: res,
            subresource: sub,
            namespace: ns,
            is_resource_request: true,
        }
    }

    #[test]
    fn resource_patterns_follow_rbac_and_apf() {
        let m = |p: &str, r: RequestAttrs<'_>| ResourcePattern::new(p).expect("valid").matches(&r);
        assert!(m("pods", req("get", "", "pods", "", "a")));
        assert!(
            !m("pods", req("get", "", "pods", "log", "a")),
            "main resource only"
        );
        assert!(m("pods/log", req("get", "", "pods", "log", "a")));
        assert!(m("pods/*", req("get", "", "pods", "exec", "a")));
        assert!(!m("pods/*", req("get", "", "pods", "", "a")));
        assert!(m(
            "apps/deployments",
            req("get", "apps", "deployments", "", "a")
        ));
        assert!(!m(
            "apps/deployments",
            req("get", "extensions", "deployments", "", "a")
        ));
        assert!(
            m("deployments", req("get", "apps", "deployments", "", "a")),
            "any group"
        );
        assert!(m("core/pods", req("get", "", "pods", "", "a")));
        assert!(!m(
            "core/pods",
            req("get", "metrics.k8s.io", "pods", "", "a")
        ));
        assert!(m(
            "apps/deployments/scale",
            req("patch", "apps", "deployments", "scale", "a")
        ));
        assert!(m(
            "*.k8s.io/*",
            req("get", "metrics.k8s.io", "pods", "", "a")
        ));
        assert!(
            m("*", req("get", "", "pods", "log", "a")),
            "* alone matches subresources"
        );
        assert!(ResourcePattern::new("a/b/c/d").is_err());
    }

    #[test]
    fn service_accounts_are_derived_from_the_user_name() {
        let m = Matcher {
            service_accounts: vec![(g("monitoring"), g("node-*"))],
            ..Matcher::default()
        };
        let yes = Subject {
            user: "system:serviceaccount:monitoring:node-agent",
            groups: &[],
            ..Subject::default()
        };
        let no = Subject {
            user: "system:serviceaccount:default:node-agent",
            groups: &[],
            ..Subject::default()
        };
        let user = Subject {
            user: "monitoring/node-agent",
            groups: &[],
            ..Subject::default()
        };
        assert!(m.subject_matches(&yes));
        assert!(!m.subject_matches(&no));
        assert!(!m.subject_matches(&user));
    }

    #[test]
    fn cluster_scoped_requests_do_not_match_namespaced_rules() {
        let m = Matcher {
            namespaces: vec![g("*")],
            ..Matcher::default()
        };
        let s = Subject {
            user: "u",
            groups: &[],
            ..Subject::default()
        };
        assert_eq!(
            m.mismatch(&s, &req("list", "", "nodes", "", "")),
            Some(Mismatch::ClusterScoped)
        );
        assert_eq!(m.mismatch(&s, &req("list", "", "pods", "", "x")), None);
    }

    #[test]
    fn long_running_follows_the_apiserver() {
        assert!(req("watch", "", "pods", "", "a").is_long_running());
        assert!(req("get", "", "pods", "log", "a").is_long_running());
        assert!(req("create", "", "pods", "exec", "a").is_long_running());
        assert!(!req("list", "", "pods", "", "a").is_long_running());
    }
}
