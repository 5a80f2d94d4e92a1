//! `breakwater check-limits`: which rule a sample request matches, why the
//! rules before it did not, and the limits that apply (after division by
//! `replicas`). Pure: works on [`ValidatedLimits`] alone, no state.

use std::fmt;

use crate::bucket::RateLimit;
use crate::file::{Charges, Key, Mode, OnMissingKey};
use crate::matcher::{Mismatch, RequestAttrs, Subject};
use crate::validate::{LimitValues, UpstreamCaps, ValidatedLimits};

/// A rule the request did not match, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Rule name.
    pub rule: String,
    /// The first dimension that failed.
    pub why: Mismatch,
}

/// The rule that matched.
#[derive(Debug, Clone, PartialEq)]
pub struct MatchedRule {
    /// Position in the file (0-based).
    pub index: usize,
    /// Rule name.
    pub name: String,
    /// Enforce or shadow.
    pub mode: Mode,
    /// Exempt?
    pub exempt: bool,
    /// Which requests its limits charge.
    pub charges: Charges,
    /// What the per-identity limits count per.
    pub key: Key,
    /// What a request without the key gets.
    pub on_missing_key: OnMissingKey,
    /// The sample request's value of the key (`None`: its credentials lack
    /// it).
    pub key_value: Option<String>,
    /// Per-identity limits.
    pub per_identity: LimitValues,
    /// Aggregate limits of one replica.
    pub aggregate: LimitValues,
    /// Aggregate limits of all replicas together (what a shared backend
    /// enforces).
    pub global: LimitValues,
}

/// The answer of [`explain`].
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    /// Rules before the match (all rules if none matched).
    pub skipped: Vec<Skipped>,
    /// The first matching rule.
    pub matched: Option<MatchedRule>,
    /// `replicas` of the file.
    pub replicas: u32,
    /// Aggregate limits are shared by all replicas (`backend: redis`).
    pub shared: bool,
    /// This replica's upstream caps.
    pub upstream: Option<UpstreamCaps>,
    /// The request is a watch.
    pub watch: bool,
    /// The request is long-running (holds no in-flight or upstream seat).
    pub long_running: bool,
}

/// Explains how `limits` treat the request.
pub fn explain(
    limits: &ValidatedLimits,
    subject: &Subject<'_>,
    req: &RequestAttrs<'_>,
) -> Explanation {
    let mut skipped = Vec::new();
    let mut matched = None;
    for (index, r) in limits.rules.iter().enumerate() {
        match r.matcher.mismatch(subject, req) {
            Some(why) => skipped.push(Skipped {
                rule: r.name.to_string(),
                why,
            }),
            None => {
                matched = Some(MatchedRule {
                    index,
                    name: r.name.to_string(),
                    mode: r.mode,
                    exempt: r.exempt,
                    charges: r.charges,
                    key: r.key,
                    on_missing_key: r.on_missing_key,
                    key_value: subject.key(r.key).map(|(a, b)| match r.key {
                        Key::Pod => format!("{}/{b}", subject.service_account().map_or(a, |s| s.0)),
                        Key::Node => b.to_string(),
                        _ => a.to_string(),
                    }),
                    per_identity: r.per_identity,
                    aggregate: r.aggregate,
                    global: r.global,
                });
                break;
            }
        }
    }
    Explanation {
        skipped,
        matched,
        replicas: limits.replicas,
        shared: matches!(limits.backend, crate::validate::Backend::Redis(_)),
        upstream: limits.upstream,
        watch: req.is_watch(),
        long_running: req.is_long_running(),
    }
}

struct Rate<'a>(&'a RateLimit);

impl fmt::Display for Rate<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s burst {}", self.0.rate, self.0.burst)
    }
}

struct Limits<'a>(&'a LimitValues);

impl fmt::Display for Limits<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = self.0;
        if l.is_unlimited() {
            return f.write_str("none");
        }
        let mut parts = Vec::new();
        if let Some(r) = &l.rate {
            parts.push(format!("rate {}", Rate(r)));
        }
        if let Some(n) = l.inflight {
            parts.push(format!("inflight {n}"));
        }
        if let Some(n) = l.watches {
            parts.push(format!("watches {n}"));
        }
        if let Some(r) = &l.watch_opens {
            parts.push(format!("watchOpens {}", Rate(r)));
        }
        f.write_str(&parts.join(", "))
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.skipped {
            writeln!(f, "rule `{}`: no match: {}", s.rule, s.why)?;
        }
        match &self.matched {
            None => {
                writeln!(
                    f,
                    "no rule matches: the request is admitted without rule limits"
                )?;
            }
            Some(m) => {
                writeln!(
                    f,
                    "rule `{}` (#{}) matches: mode {}{}",
                    m.name,
                    m.index + 1,
                    m.mode.as_str(),
                    if m.exempt {
                        ", exempt (bypasses every limit)"
                    } else {
                        ""
                    }
                )?;
                if !m.exempt {
                    let charges = match m.charges {
                        Charges::All => "every request it matches",
                        Charges::Upstream => {
                            "only requests that reach the apiserver (watches and LISTs the watch hub serves from its cache are free; concurrent watches always count)"
                        }
                    };
                    writeln!(f, "  charges {}: {charges}", m.charges.as_str())?;
                    if m.key == Key::User {
                        writeln!(f, "  per identity: {}", Limits(&m.per_identity))?;
                    } else {
                        writeln!(
                            f,
                            "  per {} (key {}, from {}): {}",
                            m.key.as_str(),
                            m.key.as_str(),
                            m.key.source(),
                            Limits(&m.per_identity)
                        )?;
                        let missing = match m.on_missing_key {
                            OnMissingKey::User => "counted under its user name",
                            OnMissingKey::Refuse => "refused with 403 naming the missing key",
                        };
                        writeln!(
                            f,
                            "  a request without a {}: {missing} (onMissingKey {})",
                            m.key.as_str(),
                            m.on_missing_key.as_str()
                        )?;
                        match &m.key_value {
                            Some(v) => writeln!(f, "  this request: {} {v}", m.key.as_str())?,
                            None => writeln!(
                                f,
                                "  this request: no {} in its credentials",
                                m.key.as_str()
                            )?,
                        }
                    }
                    if self.shared {
                        writeln!(
                            f,
                            "  aggregate (all replicas together, in Redis): {}",
                            Limits(&m.global)
                        )?;
                        writeln!(
                            f,
                            "  aggregate while Redis is unreachable (this replica, replicas={}): {}",
                            self.replicas,
                            Limits(&m.aggregate)
                        )?;
                        if m.charges == Charges::Upstream {
                            writeln!(
                                f,
                                "  (charges upstream: its rate, inflight and watchOpens are taken when a request goes upstream, always at this replica's share; its watches are global)"
                            )?;
                        }
                    } else {
                        writeln!(
                            f,
                            "  aggregate (this replica, replicas={}): {}",
                            self.replicas,
                            Limits(&m.aggregate)
                        )?;
                    }
                }
            }
        }
        let takes = if self.watch {
            "a watch: takes a watch slot, a rate token and a watchOpens token; no in-flight or upstream seat"
        } else if self.long_running {
            "long-running: takes a rate token; no in-flight or upstream seat"
        } else {
            "takes an in-flight slot, a rate token and an upstream seat"
        };
        writeln!(f, "request: {takes}")?;
        match &self.upstream {
            None => write!(f, "upstream: no cap"),
            Some(u) => write!(
                f,
                "upstream (this replica): {} seats, {} reserved for exempt rules",
                u.max_inflight, u.reserved_for_exempt
            ),
        }
    }
}
