//! Validation: turns a parsed [`LimitsFile`] into [`ValidatedLimits`], the
//! only form the [`crate::Limiter`] accepts, reporting every problem at once.
//!
//! Everything the hot path needs is computed here, once: globs compiled,
//! verbs as a bit set, aggregate limits and upstream caps already divided by
//! `replicas`, GCRA constants for every rate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::bucket::RateLimit;
use crate::file::{
    self, BackendSpec, Charges, Key, LimitSpec, LimitsError, LimitsFile, Mode, OnMissingKey,
    Problem, Problems, RuleSpec, Seg,
};
use crate::matcher::{Glob, KNOWN_VERBS, Matcher, ResourcePattern, VerbSet};

/// Largest accepted rate (tokens per second): one token per nanosecond.
const MAX_RATE: f64 = 1e9;

/// Limits of one kind (per identity or aggregate), ready for the hot path.
/// `None` fields are unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LimitValues {
    /// Request rate (every request, watches included).
    pub rate: Option<RateLimit>,
    /// Concurrent non-long-running requests.
    pub inflight: Option<u64>,
    /// Concurrent watches.
    pub watches: Option<u64>,
    /// Watch-open rate.
    pub watch_opens: Option<RateLimit>,
}

impl LimitValues {
    /// True when nothing is limited.
    pub fn is_unlimited(&self) -> bool {
        self.rate.is_none()
            && self.inflight.is_none()
            && self.watches.is_none()
            && self.watch_opens.is_none()
    }
}

/// The global upstream caps of this replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamCaps {
    /// All seats (`maxInflight / replicas`, rounded down).
    pub max_inflight: u64,
    /// Seats only exempt rules may take (`reservedForExempt / replicas`,
    /// rounded up so a reserve never vanishes, at most `max_inflight`).
    pub reserved_for_exempt: u64,
}

impl UpstreamCaps {
    /// Seats non-exempt requests may use.
    pub fn non_exempt(&self) -> u64 {
        self.max_inflight - self.reserved_for_exempt
    }
}

/// Where aggregate limits are kept.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Backend {
    /// In this replica, at its `replicas` share.
    #[default]
    Local,
    /// In Redis, for every replica together.
    Redis(RedisBackend),
}

/// A validated `backend.redis`.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisBackend {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// TLS, with the CA file if one was given (`None` inside: system roots).
    pub tls: Option<Option<PathBuf>>,
    /// ACL user.
    pub username: Option<String>,
    /// The password file (read by the backend, not here).
    pub password_file: Option<PathBuf>,
    /// Key prefix.
    pub key_prefix: String,
    /// Slot lease.
    pub lease: Duration,
    /// Per-call timeout.
    pub timeout: Duration,
}

/// One validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub(crate) name: Arc<str>,
    pub(crate) mode: Mode,
    pub(crate) exempt: bool,
    pub(crate) charges: Charges,
    pub(crate) key: Key,
    pub(crate) on_missing_key: OnMissingKey,
    pub(crate) matcher: Matcher,
    pub(crate) per_identity: LimitValues,
    pub(crate) aggregate: LimitValues,
    /// `aggregate` undivided: what a shared backend enforces for all
    /// replicas together.
    pub(crate) global: LimitValues,
    pub(crate) spec: RuleSpec,
}

impl Rule {
    /// The rule's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Enforce or shadow.
    pub fn mode(&self) -> Mode {
        self.mode
    }
    /// Exempt rules bypass every limit.
    pub fn is_exempt(&self) -> bool {
        self.exempt
    }
    /// Which requests the rule's limits charge.
    pub fn charges(&self) -> Charges {
        self.charges
    }
    /// What `perIdentity` counts per.
    pub fn key(&self) -> Key {
        self.key
    }
    /// What a request without the key gets.
    pub fn on_missing_key(&self) -> OnMissingKey {
        self.on_missing_key
    }
    /// Per-identity limits.
    pub fn per_identity(&self) -> &LimitValues {
        &self.per_identity
    }
    /// Aggregate limits of this replica (already divided by `replicas`).
    pub fn aggregate(&self) -> &LimitValues {
        &self.aggregate
    }
    /// Aggregate limits of all replicas together (not divided), for a
    /// shared backend.
    pub fn global(&self) -> &LimitValues {
        &self.global
    }
    /// The compiled `match`.
    pub fn matcher(&self) -> &Matcher {
        &self.matcher
    }
    /// The rule as written.
    pub fn spec(&self) -> &RuleSpec {
        &self.spec
    }
    /// Same limits (what a reload compares to keep a rule's state).
    pub(crate) fn same_limits(&self, other: &Rule) -> bool {
        self.exempt == other.exempt
            && self.key == other.key
            && self.per_identity == other.per_identity
            && self.aggregate == other.aggregate
    }
}

/// A limits file that passed validation; what [`crate::Limiter`] runs.
#[derive(Debug, Clone)]
pub struct ValidatedLimits {
    pub(crate) replicas: u32,
    pub(crate) backend: Backend,
    pub(crate) upstream: Option<UpstreamCaps>,
    pub(crate) rules: Vec<Rule>,
}

impl ValidatedLimits {
    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<ValidatedLimits, LimitsError> {
        let text = file::read(path)?;
        ValidatedLimits::from_yaml(&text, &path.display().to_string())
    }

    /// Parses and validates `text`; `file` labels the diagnostics.
    pub fn from_yaml(text: &str, file: &str) -> Result<ValidatedLimits, LimitsError> {
        let parsed = file::parse(text, file)?;
        validate(&parsed, text, file)
    }

    /// No rules, no upstream cap: admits everything.
    pub fn unlimited() -> ValidatedLimits {
        ValidatedLimits {
            replicas: 1,
            backend: Backend::Local,
            upstream: None,
            rules: Vec::new(),
        }
    }

    /// `replicas` from the file.
    pub fn replicas(&self) -> u32 {
        self.replicas
    }
    /// Where aggregate limits are kept.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }
    /// This replica's upstream caps, if any.
    pub fn upstream(&self) -> Option<UpstreamCaps> {
        self.upstream
    }
    /// Rules in match order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }
    /// Index of the first rule matching, if any.
    #[inline]
    pub fn match_rule(
        &self,
        subject: &crate::Subject<'_>,
        req: &crate::RequestAttrs<'_>,
    ) -> Option<usize> {
        self.rules
            .iter()
            .position(|r| r.matcher.matches(subject, req))
    }
}

/// A problem before its location is known.
struct Pending {
    path: Vec<Seg>,
    message: String,
    hint: String,
}

struct Collector {
    pending: Vec<Pending>,
}

impl Collector {
    fn push(&mut self, path: Vec<Seg>, message: impl Into<String>, hint: impl Into<String>) {
        self.pending.push(Pending {
            path,
            message: message.into(),
            hint: hint.into(),
        });
    }
}

fn at(base: &[Seg], more: &[Seg]) -> Vec<Seg> {
    let mut v = base.to_vec();
    v.extend_from_slice(more);
    v
}

/// Validates a parsed file. `text` is the same file's text, used only to
/// locate problems; `file` labels them.
pub fn validate(
    parsed: &LimitsFile,
    text: &str,
    file: &str,
) -> Result<ValidatedLimits, LimitsError> {
    let mut c = Collector {
        pending: Vec::new(),
    };
    if parsed.api_version != file::API_VERSION {
        c.push(
            vec![Seg::Key("apiVersion")],
            format!("unsupported apiVersion `{}`", parsed.api_version),
            format!("set `apiVersion: {}`", file::API_VERSION),
        );
    }
    if parsed.kind != file::KIND {
        c.push(
            vec![Seg::Key("kind")],
            format!("unsupported kind `{}`", parsed.kind),
            format!("set `kind: {}`", file::KIND),
        );
    }
    let replicas = if parsed.replicas < 1 || parsed.replicas > i64::from(u32::MAX) {
        c.push(
            vec![Seg::Key("replicas")],
            format!("replicas must be at least 1, got {}", parsed.replicas),
            "set replicas to the number of proxies sharing the load (1 for one proxy)",
        );
        1
    } else {
        parsed.replicas as u32
    };
    let upstream = parsed.upstream.as_ref().and_then(|u| {
        let base = [Seg::Key("upstream")];
        let mut ok = true;
        if u.max_inflight < 1 {
            c.push(
                at(&base, &[Seg::Key("maxInflight")]),
                format!("maxInflight must be at least 1, got {}", u.max_inflight),
                "set a positive seat count, or remove `upstream` for no cap",
            );
            ok = false;
        } else if (u.max_inflight as u64) < u64::from(replicas) {
            c.push(
                at(&base, &[Seg::Key("maxInflight")]),
                format!(
                    "maxInflight {} divided among {replicas} replicas leaves no seat per replica",
                    u.max_inflight
                ),
                "raise maxInflight to at least `replicas`",
            );
            ok = false;
        }
        if u.reserved_for_exempt < 0 {
            c.push(
                at(&base, &[Seg::Key("reservedForExempt")]),
                format!(
                    "reservedForExempt must not be negative, got {}",
                    u.reserved_for_exempt
                ),
                "set 0 or more seats",
            );
            ok = false;
        } else if u.reserved_for_exempt > u.max_inflight {
            c.push(
                at(&base, &[Seg::Key("reservedForExempt")]),
                format!(
                    "reservedForExempt {} is larger than maxInflight {}",
                    u.reserved_for_exempt, u.max_inflight
                ),
                format!("make reservedForExempt at most {}", u.max_inflight),
            );
            ok = false;
        }
        ok.then(|| {
            let r = u64::from(replicas);
            let max_inflight = u.max_inflight as u64 / r;
            let reserved = (u.reserved_for_exempt as u64).div_ceil(r).min(max_inflight);
            UpstreamCaps {
                max_inflight,
                reserved_for_exempt: reserved,
            }
        })
    });

    let mut rules = Vec::with_capacity(parsed.rules.len());
    let mut catch_all: Option<&str> = None;
    for (i, spec) in parsed.rules.iter().enumerate() {
        let base = [Seg::Key("rules"), Seg::Index(i)];
        let name_path = at(&base, &[Seg::Key("name")]);
        if spec.name.is_empty() {
            c.push(
                name_path.clone(),
                "rule name is empty",
                "give every rule a unique name",
            );
        } else if let Some(bad) = spec
            .name
            .chars()
            .find(|ch| !(ch.is_ascii_alphanumeric() || "-_.:".contains(*ch)))
        {
            c.push(
                name_path.clone(),
                format!("rule name `{}` contains `{bad}`", spec.name),
                "use letters, digits, `-`, `_`, `.` and `:` (the name goes into headers and metric labels)",
            );
        }
        if let Some(first) = parsed.rules[..i].iter().position(|r| r.name == spec.name) {
            let (line, _) = file::locate(
                text,
                &[Seg::Key("rules"), Seg::Index(first), Seg::Key("name")],
            );
            c.push(
                name_path.clone(),
                format!("duplicate rule name `{}`", spec.name),
                format!("rename one of them; names must be unique (first used at line {line})"),
            );
        }
        if let Some(default) = catch_all {
            c.push(
                name_path.clone(),
                format!(
                    "rule `{}` is never reached: rule `{default}` above matches every request",
                    spec.name
                ),
                "move the rule without `match` to the end of the list",
            );
        }
        if spec.matches.is_empty() && catch_all.is_none() {
            catch_all = Some(&spec.name);
        }
        let matcher = compile_match(&mut c, &base, spec);
        if spec.exempt && (spec.per_identity.is_some() || spec.aggregate.is_some()) {
            let key = if spec.per_identity.is_some() {
                "perIdentity"
            } else {
                "aggregate"
            };
            c.push(
                at(&base, &[Seg::Key(key)]),
                format!(
                    "rule `{}` is exempt, so its limits would be ignored",
                    spec.name
                ),
                "remove the limits, or remove `exempt: true`",
            );
        }
        if spec.exempt && spec.charges.is_some() {
            c.push(
                at(&base, &[Seg::Key("charges")]),
                format!(
                    "rule `{}` is exempt, so it charges nothing and `charges` would be ignored",
                    spec.name
                ),
                "remove `charges`, or remove `exempt: true`",
            );
        }
        check_key(&mut c, &base, spec);
        let per_identity = spec
            .per_identity
            .as_ref()
            .map(|l| limit_values(&mut c, &at(&base, &[Seg::Key("perIdentity")]), l, 1))
            .unwrap_or_default();
        let aggregate = spec
            .aggregate
            .as_ref()
            .map(|l| limit_values(&mut c, &at(&base, &[Seg::Key("aggregate")]), l, replicas))
            .unwrap_or_default();
        // The same limits undivided; any problem was reported just above.
        let global = spec
            .aggregate
            .as_ref()
            .map(|l| {
                let mut scratch = Collector {
                    pending: Vec::new(),
                };
                limit_values(&mut scratch, &[], l, 1)
            })
            .unwrap_or_default();
        rules.push(Rule {
            name: Arc::from(spec.name.as_str()),
            mode: spec.mode,
            exempt: spec.exempt,
            charges: spec.charges.unwrap_or_default(),
            key: spec.key.unwrap_or_default(),
            on_missing_key: spec.on_missing_key.unwrap_or_default(),
            matcher,
            per_identity,
            aggregate,
            global,
            spec: spec.clone(),
        });
    }

    let backend = backend(&mut c, &parsed.backend);
    if c.pending.is_empty() {
        return Ok(ValidatedLimits {
            replicas,
            backend,
            upstream,
            rules,
        });
    }
    let mut problems: Vec<Problem> = c
        .pending
        .into_iter()
        .map(|p| {
            let (line, column) = file::locate(text, &p.path);
            Problem {
                file: file.to_string(),
                line,
                column,
                message: p.message,
                hint: p.hint,
            }
        })
        .collect();
    problems.sort_by_key(|p| (p.line, p.column));
    Err(LimitsError::Invalid(Problems(problems)))
}

/// `backend`: a Redis address must be `host:port`, the lease and timeout
/// in sensible ranges.
fn backend(c: &mut Collector, spec: &BackendSpec) -> Backend {
    let BackendSpec::Redis(r) = spec else {
        return Backend::Local;
    };
    let base = [Seg::Key("backend"), Seg::Key("redis")];
    let (host, port) = match r.address.rsplit_once(':').map(|(h, p)| {
        (
            h.trim_start_matches('[').trim_end_matches(']'),
            p.parse::<u16>(),
        )
    }) {
        Some((h, Ok(p))) if !h.is_empty() && p != 0 => (h.to_string(), p),
        _ => {
            c.push(
                at(&base, &[Seg::Key("address")]),
                format!("redis address `{}` is not `host:port`", r.address),
                "write the address as `host:port`, e.g. `127.0.0.1:6379`",
            );
            (String::new(), 0)
        }
    };
    if r.key_prefix.is_empty() {
        c.push(
            at(&base, &[Seg::Key("keyPrefix")]),
            "keyPrefix is empty",
            "set a prefix such as `breakwater:CLUSTER:` (or remove it for `breakwater:`)",
        );
    }
    let lease = r.lease_seconds.unwrap_or(10.0);
    if !(lease.is_finite() && (1.0..=300.0).contains(&lease)) {
        c.push(
            at(&base, &[Seg::Key("leaseSeconds")]),
            format!("leaseSeconds must be between 1 and 300, got {lease}"),
            "a dead replica's slots free within the lease; 10 is a good start",
        );
    }
    let timeout = r.timeout_millis.unwrap_or(50);
    if !(1..=5000).contains(&timeout) {
        c.push(
            at(&base, &[Seg::Key("timeoutMillis")]),
            format!("timeoutMillis must be between 1 and 5000, got {timeout}"),
            "a decision waits at most this long for Redis before falling back; 50 is a good start",
        );
    }
    Backend::Redis(RedisBackend {
        host,
        port,
        tls: r
            .tls
            .as_ref()
            .map(|t| t.ca_file.as_ref().map(PathBuf::from)),
        username: r.username.clone(),
        password_file: r.password_file.as_ref().map(PathBuf::from),
        key_prefix: r.key_prefix.clone(),
        lease: Duration::from_secs_f64(lease.clamp(1.0, 300.0)),
        timeout: Duration::from_millis(timeout.clamp(1, 5000)),
    })
}

/// `key` and `onMissingKey` only mean something next to `perIdentity`
/// limits, and `onMissingKey` only for a key a request can lack.
fn check_key(c: &mut Collector, base: &[Seg], spec: &RuleSpec) {
    let limited = spec.per_identity.is_some() && !spec.exempt;
    if let Some(key) = spec.key
        && !limited
    {
        c.push(
            at(base, &[Seg::Key("key")]),
            format!(
                "rule `{}` has `key: {}` but no perIdentity limits for it to key",
                spec.name,
                key.as_str()
            ),
            "add `perIdentity` limits, or remove `key` (aggregate limits count every identity together)",
        );
    }
    if let Some(on) = spec.on_missing_key {
        if spec.key.unwrap_or_default() == Key::User {
            c.push(
                at(base, &[Seg::Key("onMissingKey")]),
                format!(
                    "rule `{}` has `onMissingKey: {}` but keys on the user, which every request has",
                    spec.name,
                    on.as_str()
                ),
                "set `key: pod`, `key: node` or `key: serviceAccount`, or remove `onMissingKey`",
            );
        } else if !limited && spec.key.is_none() {
            c.push(
                at(base, &[Seg::Key("onMissingKey")]),
                format!(
                    "rule `{}` has `onMissingKey` but no perIdentity limits",
                    spec.name
                ),
                "add `perIdentity` limits with a `key`, or remove `onMissingKey`",
            );
        }
    }
}

fn compile_match(c: &mut Collector, base: &[Seg], spec: &RuleSpec) -> Matcher {
    let m = &spec.matches;
    let mpath = at(base, &[Seg::Key("match")]);
    let globs = |c: &mut Collector, key: &'static str, list: &[String]| -> Vec<Glob> {
        let mut out = Vec::with_capacity(list.len());
        for (j, p) in list.iter().enumerate() {
            match Glob::new(p) {
                Ok(g) => out.push(g),
                Err(e) => c.push(
                    at(&mpath, &[Seg::Key(key), Seg::Index(j)]),
                    format!("{key}: {e}"),
                    e.hint(),
                ),
            }
        }
        out
    };
    let users = globs(c, "users", &m.users);
    let groups = globs(c, "groups", &m.groups);
    let namespaces = globs(c, "namespaces", &m.namespaces);
    let mut service_accounts = Vec::with_capacity(m.service_accounts.len());
    for (j, p) in m.service_accounts.iter().enumerate() {
        let path = at(&mpath, &[Seg::Key("serviceAccounts"), Seg::Index(j)]);
        let Some((ns, name)) = p.split_once('/').filter(|(_, n)| !n.contains('/')) else {
            c.push(
                path,
                format!("serviceAccounts: `{p}` is not `namespace/name`"),
                "write the ServiceAccount as `namespace/name`, e.g. `monitoring/node-agent` or `kube-system/*`",
            );
            continue;
        };
        match (Glob::new(ns), Glob::new(name)) {
            (Ok(a), Ok(b)) => service_accounts.push((a, b)),
            (Err(e), _) | (_, Err(e)) => {
                c.push(path, format!("serviceAccounts: `{p}`: {e}"), e.hint());
            }
        }
    }
    let mut verbs = VerbSet::default();
    for (j, v) in m.verbs.iter().enumerate() {
        if !verbs.insert(v) {
            c.push(
                at(&mpath, &[Seg::Key("verbs"), Seg::Index(j)]),
                format!("unknown verb `{v}`"),
                format!("use `*` or one of: {}", KNOWN_VERBS.join(", ")),
            );
        }
    }
    let mut resources = Vec::with_capacity(m.resources.len());
    for (j, r) in m.resources.iter().enumerate() {
        match ResourcePattern::new(r) {
            Ok(p) => resources.push(p),
            Err(e) => c.push(
                at(&mpath, &[Seg::Key("resources"), Seg::Index(j)]),
                format!("resources: {e}"),
                "write `resource`, `group/resource`, `resource/subresource` or `group/resource/subresource` (globs `*`, `?` in each part)",
            ),
        }
    }
    Matcher {
        users,
        groups,
        service_accounts,
        verbs,
        resources,
        namespaces,
    }
}

fn rate_limit(
    c: &mut Collector,
    path: &[Seg],
    rate_key: &'static str,
    rate: f64,
    burst: Option<i64>,
    replicas: u32,
) -> Option<RateLimit> {
    let mut ok = true;
    if !(rate.is_finite() && rate > 0.0) {
        c.push(
            at(path, &[Seg::Key(rate_key)]),
            format!("{rate_key} must be a positive number, got {rate}"),
            "set a rate above 0 (requests per second; fractions like 0.5 are allowed), or remove the field for no limit",
        );
        ok = false;
    } else if rate > MAX_RATE {
        c.push(
            at(path, &[Seg::Key(rate_key)]),
            format!("{rate_key} {rate} is above the maximum {MAX_RATE}"),
            "remove the field for no rate limit",
        );
        ok = false;
    }
    let burst = match burst {
        Some(b) if b < 1 => {
            c.push(
                at(path, &[Seg::Key("burst")]),
                format!("burst must be at least 1, got {b}"),
                "set burst to the number of requests allowed at once (1 or more)",
            );
            ok = false;
            1
        }
        Some(b) => b as u64,
        // Default: one second's worth, at least one token.
        None => (rate.ceil() as u64).max(1),
    };
    if !ok {
        return None;
    }
    let r = u64::from(replicas);
    if burst < r {
        c.push(
            at(path, &[Seg::Key("burst")]),
            format!(
                "burst {burst} divided among {replicas} replicas leaves less than 1 per replica"
            ),
            "raise burst to at least `replicas`",
        );
        return None;
    }
    Some(RateLimit::new(rate / f64::from(replicas), burst / r))
}

fn count(
    c: &mut Collector,
    path: &[Seg],
    key: &'static str,
    value: Option<i64>,
    min: i64,
    replicas: u32,
) -> Option<u64> {
    let v = value?;
    if v < min {
        let hint = if min == 0 {
            "use 0 or more (0 forbids it), or remove the field for no limit"
        } else {
            "use 1 or more, or remove the field for no limit"
        };
        c.push(
            at(path, &[Seg::Key(key)]),
            format!("{key} must be at least {min}, got {v}"),
            hint,
        );
        return None;
    }
    let per = v as u64 / u64::from(replicas);
    if v > 0 && per == 0 {
        c.push(
            at(path, &[Seg::Key(key)]),
            format!("{key} {v} divided among {replicas} replicas leaves 0 per replica"),
            "raise the limit to at least `replicas`",
        );
        return None;
    }
    Some(per)
}

fn limit_values(c: &mut Collector, path: &[Seg], l: &LimitSpec, replicas: u32) -> LimitValues {
    let rate = match (l.rate, l.burst) {
        (Some(rate), burst) => rate_limit(c, path, "rate", rate, burst, replicas),
        (None, Some(_)) => {
            c.push(
                at(path, &[Seg::Key("burst")]),
                "burst without rate",
                "add `rate` (requests per second) next to `burst`",
            );
            None
        }
        (None, None) => None,
    };
    let watch_opens = l.watch_opens.as_ref().and_then(|w| {
        rate_limit(
            c,
            &at(path, &[Seg::Key("watchOpens")]),
            "rate",
            w.rate,
            w.burst,
            replicas,
        )
    });
    LimitValues {
        rate,
        inflight: count(c, path, "inflight", l.inflight, 1, replicas),
        watches: count(c, path, "watches", l.watches, 0, replicas),
        watch_opens,
    }
}
