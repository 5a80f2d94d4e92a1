//! The limits file as the operator writes it: the serde model, parsing, and
//! the diagnostics (`FILE:LINE:COL: message (hint: ...)`).
//!
//! Parsing happens in two passes. The first is plain serde: it stops at the
//! first syntax or type error (an unknown field, a string where a number is
//! expected), which serde_yaml_ng reports with its location. The second pass,
//! [`crate::validate`], checks meaning (rates, globs, duplicate names) and
//! reports *every* problem it finds.
//!
//! The serde model keeps no positions, so semantic problems are located
//! afterwards by [`locate`]: it deserializes the text once more with a
//! [`DeserializeSeed`] that walks the problem's path (`rules[2].perIdentity.rate`)
//! and deliberately fails on the node it reaches. serde_yaml_ng stamps every
//! error with the mark of the node being read, so the failure carries that
//! node's exact line and column, for block and flow style alike. It costs one
//! extra parse per problem, only on the error path.

use std::fmt;
use std::path::Path;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// The only `apiVersion` this crate reads.
pub const API_VERSION: &str = "breakwater/v1alpha1";
/// The only `kind` this crate reads.
pub const KIND: &str = "Limits";

/// The whole limits file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LimitsFile {
    /// Must be `breakwater/v1alpha1`.
    pub api_version: String,
    /// Must be `Limits`.
    pub kind: String,
    /// How many proxies share the load; aggregate limits and upstream caps
    /// are divided by it (each replica enforces its share). Default 1.
    #[serde(default = "default_replicas")]
    pub replicas: i64,
    /// Where aggregate limits are kept: `local` (the default: each replica
    /// enforces `1/replicas` of them) or `redis` (one shared state for
    /// every replica; the `replicas` share stays the fallback when Redis is
    /// unreachable).
    #[serde(default)]
    pub backend: BackendSpec,
    /// The global in-flight cap towards the apiserver. Absent: no cap.
    #[serde(default)]
    pub upstream: Option<UpstreamSpec>,
    /// Rules, matched in order; the first match wins. A request that matches
    /// no rule is admitted without rule limits (upstream seats still apply).
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

fn default_replicas() -> i64 {
    1
}

/// `backend`: `local`, or `redis: {...}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum BackendSpec {
    /// Each replica keeps its own state and enforces its `replicas` share.
    #[default]
    Local,
    /// Aggregate limits are kept in Redis, shared by every replica.
    Redis(RedisSpec),
}

/// `backend.redis`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RedisSpec {
    /// `host:port` of the Redis server.
    pub address: String,
    /// Connect with TLS. Absent: plain TCP (keep Redis on loopback or a
    /// private network then).
    #[serde(default)]
    pub tls: Option<RedisTlsSpec>,
    /// ACL user name (Redis 6+); absent: the default user.
    #[serde(default)]
    pub username: Option<String>,
    /// A file holding the password (`AUTH`); read at start-up, never logged.
    #[serde(default)]
    pub password_file: Option<String>,
    /// Prefix of every key Breakwater writes (several clusters may share a
    /// Redis). Default `breakwater:`.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// How long a replica's slot (a watch or in-flight request it holds)
    /// lives in Redis unless renewed; a replica renews its slots every third
    /// of it, so a dead replica's slots free within this time. Default 10.
    #[serde(default)]
    pub lease_seconds: Option<f64>,
    /// A Redis call slower than this counts as a failure: the replica falls
    /// back to its `replicas` share at once. Default 50.
    #[serde(default)]
    pub timeout_millis: Option<u64>,
}

// By hand: serde_yaml_ng reads enums as YAML tags (`!redis`); operators
// write `backend: local` or `backend: {redis: {...}}`.
impl<'de> Deserialize<'de> for BackendSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BackendSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`local` or a map with one key `redis`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<BackendSpec, E> {
                match v {
                    "local" => Ok(BackendSpec::Local),
                    other => Err(E::unknown_variant(other, &["local", "redis"])),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<BackendSpec, A::Error> {
                let mut out = None;
                while let Some(key) = map.next_key::<String>()? {
                    if out.is_some() {
                        return Err(de::Error::custom("backend has more than one kind"));
                    }
                    out = Some(match key.as_str() {
                        "redis" => BackendSpec::Redis(map.next_value()?),
                        "local" => {
                            map.next_value::<IgnoredAny>()?;
                            BackendSpec::Local
                        }
                        other => return Err(de::Error::unknown_field(other, &["local", "redis"])),
                    });
                }
                out.ok_or_else(|| de::Error::custom("backend is empty"))
            }
        }
        d.deserialize_any(V)
    }
}

fn default_key_prefix() -> String {
    "breakwater:".to_string()
}

/// `backend.redis.tls`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RedisTlsSpec {
    /// PEM file of the CA that signed the Redis server's certificate;
    /// absent: the system's roots.
    #[serde(default)]
    pub ca_file: Option<String>,
}

/// `upstream`: seats towards the apiserver.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpstreamSpec {
    /// Requests forwarded at once, all rules together (long-running requests
    /// such as watches do not hold a seat).
    pub max_inflight: i64,
    /// Seats only exempt rules may take, so a storm cannot take the last seat
    /// from an administrator. Default 0.
    #[serde(default)]
    pub reserved_for_exempt: i64,
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleSpec {
    /// Unique name; appears in 429 messages, headers and metrics.
    pub name: String,
    /// `enforce` (default) or `shadow` (count would-be rejections, reject nothing).
    #[serde(default)]
    pub mode: Mode,
    /// Which requests the rule governs. Absent or empty: every request.
    #[serde(default, rename = "match")]
    pub matches: MatchSpec,
    /// Bypass every limit and use the upstream seats reserved for exempt rules.
    #[serde(default)]
    pub exempt: bool,
    /// What the rule's limits charge: `all` (the default) charges every
    /// request the rule matches; `upstream` only those that reach the
    /// apiserver, so a watch or LIST the proxy's watch hub answers from its
    /// cache is free. Concurrent-watch caps count every client watch either
    /// way (each one holds proxy memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charges: Option<Charges>,
    /// What "identity" means for `perIdentity`: `user` (the default, the
    /// authenticated user name), `pod`, `node` or `serviceAccount`. With
    /// `pod`, each Pod of a DaemonSet gets its own limits although all share
    /// one ServiceAccount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Key>,
    /// What a request whose credentials lack the `key` gets: `user` (the
    /// default) counts it under its user name; `refuse` answers 403.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_missing_key: Option<OnMissingKey>,
    /// Limits applied to each identity (each `key`) separately.
    #[serde(default)]
    pub per_identity: Option<LimitSpec>,
    /// Limits applied to all identities matching the rule together
    /// (divided by `replicas`).
    #[serde(default)]
    pub aggregate: Option<LimitSpec>,
}

/// `mode` of a rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Mode {
    /// Reject requests over the limits.
    #[default]
    Enforce,
    /// Admit everything; report what would have been rejected.
    Shadow,
}

impl Mode {
    /// The name used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Shadow => "shadow",
        }
    }
}

/// `charges` of a rule: which requests its limits charge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Charges {
    /// Every request the rule matches, whoever answers it.
    #[default]
    All,
    /// Only requests that reach the apiserver: forwarded ones, and those
    /// for which the watch hub starts a stream or sends a LIST. Watches and
    /// LISTs the hub serves from its cache take no token, in-flight slot,
    /// watch-open token or upstream seat; concurrent-watch caps still count
    /// them.
    Upstream,
}

impl Charges {
    /// The name used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Charges::All => "all",
            Charges::Upstream => "upstream",
        }
    }
}

/// `key` of a rule: what its `perIdentity` limits are counted per.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Key {
    /// The authenticated user name (a ServiceAccount, a node, a person).
    /// Every request has one.
    #[default]
    User,
    /// The Pod a bound ServiceAccount token was issued for (its
    /// `authentication.kubernetes.io/pod-name` extra, qualified by the
    /// ServiceAccount's namespace).
    Pod,
    /// The node: a bound token's `authentication.kubernetes.io/node-name`
    /// extra (Kubernetes 1.30+ tokens of Pods), or `NAME` of a node's own
    /// credentials (user `system:node:NAME` in group `system:nodes`).
    Node,
    /// The ServiceAccount (`namespace/name`); other users have none.
    ServiceAccount,
}

impl Key {
    /// The name used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Key::User => "user",
            Key::Pod => "pod",
            Key::Node => "node",
            Key::ServiceAccount => "serviceAccount",
        }
    }

    /// Where the key comes from, for messages.
    pub fn source(self) -> &'static str {
        match self {
            Key::User => "the user name",
            Key::Pod => {
                "a bound ServiceAccount token's pod (extra authentication.kubernetes.io/pod-name)"
            }
            Key::Node => {
                "a bound ServiceAccount token's node (extra authentication.kubernetes.io/node-name, Kubernetes 1.30+) or a node's credentials (system:node:NAME in system:nodes)"
            }
            Key::ServiceAccount => "a ServiceAccount user (system:serviceaccount:NS:NAME)",
        }
    }
}

/// `onMissingKey` of a rule: what happens to a request without its `key`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum OnMissingKey {
    /// Count it under its user name, as if the rule had `key: user`.
    #[default]
    User,
    /// Refuse it: 403 with a Status naming the missing key.
    Refuse,
}

impl OnMissingKey {
    /// The name used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            OnMissingKey::User => "user",
            OnMissingKey::Refuse => "refuse",
        }
    }
}

/// `match`: every listed dimension must match (AND); within the subject
/// dimensions (users, groups, serviceAccounts) any entry matching is enough
/// (OR), as in RBAC and APF subjects. An empty list matches everything.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MatchSpec {
    /// User names (globs `*`, `?`).
    #[serde(default)]
    pub users: Vec<String>,
    /// Group names (globs).
    #[serde(default)]
    pub groups: Vec<String>,
    /// `namespace/name` of ServiceAccounts (globs in either part).
    #[serde(default)]
    pub service_accounts: Vec<String>,
    /// Request verbs (`get`, `list`, `watch`, ...; `*`).
    #[serde(default)]
    pub verbs: Vec<String>,
    /// `resource`, `group/resource`, `resource/subresource`,
    /// `group/resource/subresource`; globs in each part; `*` alone matches all.
    #[serde(default)]
    pub resources: Vec<String>,
    /// Namespaces (globs). A cluster-scoped request never matches a rule
    /// that lists namespaces.
    #[serde(default)]
    pub namespaces: Vec<String>,
}

impl MatchSpec {
    /// True when nothing is listed: the rule matches every request.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
            && self.groups.is_empty()
            && self.service_accounts.is_empty()
            && self.verbs.is_empty()
            && self.resources.is_empty()
            && self.namespaces.is_empty()
    }
}

/// `perIdentity` / `aggregate`. Absent fields mean "no limit".
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LimitSpec {
    /// Requests per second (token refill rate); needs `burst` or defaults it
    /// to `max(1, ceil(rate))`.
    #[serde(default)]
    pub rate: Option<f64>,
    /// Bucket size: requests admitted at once after a quiet period.
    #[serde(default)]
    pub burst: Option<i64>,
    /// Concurrent non-long-running requests.
    #[serde(default)]
    pub inflight: Option<i64>,
    /// Concurrent watches (0 forbids watching).
    #[serde(default)]
    pub watches: Option<i64>,
    /// Rate of watch opens.
    #[serde(default)]
    pub watch_opens: Option<RateSpec>,
}

/// `watchOpens: {rate, burst}`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateSpec {
    /// Opens per second.
    pub rate: f64,
    /// Opens at once; defaults to `max(1, ceil(rate))`.
    #[serde(default)]
    pub burst: Option<i64>,
}

/// One problem in a limits file, with where it is and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file name as given by the caller (used only for display).
    pub file: String,
    /// 1-based line; 0 when unknown.
    pub line: usize,
    /// 1-based column; 0 when unknown.
    pub column: usize,
    /// What is wrong.
    pub message: String,
    /// One line saying how to fix it.
    pub hint: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {} (hint: {})",
            self.file, self.line, self.column, self.message, self.hint
        )
    }
}

/// Every problem found, one per line when displayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Why a limits file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    /// The file could not be read.
    #[error("{path}: cannot read limits file")]
    Read {
        /// The path given.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is not a valid limits file.
    #[error("{0}")]
    Invalid(Problems),
}

impl LimitsError {
    /// The problems, if the file was invalid (empty for read errors).
    pub fn problems(&self) -> &[Problem] {
        match self {
            LimitsError::Read { .. } => &[],
            LimitsError::Invalid(p) => &p.0,
        }
    }
}

/// Reads a file; the only I/O of the limits file path.
pub(crate) fn read(path: &Path) -> Result<String, LimitsError> {
    std::fs::read_to_string(path).map_err(|source| LimitsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Parses `text` (pass one: syntax and types). `file` labels diagnostics.
pub fn parse(text: &str, file: &str) -> Result<LimitsFile, LimitsError> {
    serde_yaml_ng::from_str::<LimitsFile>(text).map_err(|e| {
        let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
        let full = e.to_string();
        // serde_yaml_ng appends " at line L column C" (and libyaml adds
        // context with its own marks); we print the location ourselves.
        let message = match full.find(" at line ") {
            Some(i) => full[..i].to_string(),
            None => full,
        };
        let hint = serde_hint(&message);
        LimitsError::Invalid(Problems(vec![Problem {
            file: file.to_string(),
            line,
            column,
            message,
            hint,
        }]))
    })
}

/// A fix hint for serde's messages, chosen by their well-known wording.
fn serde_hint(message: &str) -> String {
    let h = if message.contains("unknown field") {
        "remove the field or fix its spelling; field names are camelCase (see docs/limits.md)"
    } else if message.contains("unknown variant") {
        "use one of the listed values"
    } else if message.contains("missing field") {
        "add the field; `apiVersion: breakwater/v1alpha1` and `kind: Limits` are required, and every rule needs a `name`"
    } else if message.contains("duplicate") {
        "remove one of the duplicated keys"
    } else if message.contains("invalid type") {
        "give the field a value of the type shown (numbers unquoted, lists in [...] or `- ` items)"
    } else {
        "check indentation and quoting around this position (YAML syntax)"
    };
    h.to_string()
}

/// One step of a path into the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    /// A mapping key.
    Key(&'static str),
    /// A sequence index.
    Index(usize),
}

/// Finds the line and column of the node at `path`, or of its nearest
/// existing ancestor (a missing optional field is reported where its parent
/// is). `(0, 0)` if nothing can be located.
pub(crate) fn locate(text: &str, path: &[Seg]) -> (usize, usize) {
    for len in (0..=path.len()).rev() {
        let probe = Probe(&path[..len]);
        if let Err(e) = probe.deserialize(serde_yaml_ng::Deserializer::from_str(text))
            && let Some(l) = e.location()
        {
            return (l.line(), l.column());
        }
    }
    (0, 0)
}

/// Walks `0` and fails on the node at its end; see the module docs.
struct Probe<'p>(&'p [Seg]);

impl<'de> DeserializeSeed<'de> for Probe<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Probe<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("probe target")
    }

    // Every visit_* not overridden returns `invalid_type`, an error that
    // serde_yaml_ng stamps with the current node's mark. At the end of the
    // path that is exactly what we want; scalars met before the end mean the
    // path does not exist, so they are accepted silently.
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.scalar(de::Unexpected::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.scalar(de::Unexpected::Signed(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.scalar(de::Unexpected::Unsigned(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.scalar(de::Unexpected::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.scalar(de::Unexpected::Str(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.scalar(de::Unexpected::Unit)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let want = match self.0.first() {
            None => return Err(de::Error::custom("probe target")),
            Some(Seg::Key(k)) => Some(*k),
            Some(Seg::Index(_)) => None,
        };
        while let Some(key) = map.next_key::<String>()? {
            if Some(key.as_str()) == want {
                return map.next_value_seed(Probe(&self.0[1..]));
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let want = match self.0.first() {
            None => return Err(de::Error::custom("probe target")),
            Some(Seg::Index(i)) => Some(*i),
            Some(Seg::Key(_)) => None,
        };
        let mut i = 0usize;
        loop {
            if Some(i) == want {
                return seq
                    .next_element_seed(Probe(&self.0[1..]))
                    .map(|_: Option<()>| ());
            }
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }
}

impl Probe<'_> {
    fn scalar<E: de::Error>(self, v: de::Unexpected<'_>) -> Result<(), E> {
        if self.0.is_empty() {
            Err(E::invalid_type(v, &self))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_finds_block_and_flow_nodes() {
        let text = "a: 1\nrules:\n  - name: x\n    per: {rate: 5, burst: 0}\n";
        assert_eq!(locate(text, &[Seg::Key("a")]), (1, 4));
        assert_eq!(
            locate(text, &[Seg::Key("rules"), Seg::Index(0), Seg::Key("name")]),
            (3, 11)
        );
        assert_eq!(
            locate(
                text,
                &[
                    Seg::Key("rules"),
                    Seg::Index(0),
                    Seg::Key("per"),
                    Seg::Key("burst")
                ]
            ),
            (4, 27)
        );
    }

    #[test]
    fn locate_falls_back_to_the_nearest_ancestor() {
        let text = "a: 1\nrules:\n  - name: x\n";
        assert_eq!(
            locate(text, &[Seg::Key("rules"), Seg::Index(0), Seg::Key("nope")]),
            (3, 5)
        );
    }

    #[test]
    fn unknown_field_is_reported_with_its_location_and_a_hint() {
        let text = "apiVersion: breakwater/v1alpha1\nkind: Limits\nrulez: []\n";
        let err = parse(text, "l.yaml").expect_err("unknown field");
        let p = &err.problems()[0];
        assert_eq!((p.line, p.column), (3, 1), "{err}");
        assert!(p.message.contains("unknown field `rulez`"), "{err}");
        assert!(err.to_string().starts_with("l.yaml:3:1: "), "{err}");
        assert!(err.to_string().contains("(hint: "), "{err}");
    }
}
