//! Breakwater's limits: the operator's limits file, rule matching, token
//! buckets, in-flight and concurrent-watch counters, exempt lanes, emergency
//! blocks and hot reload. No HTTP, no I/O besides reading the limits file
//! and reading/writing the blocks file.
//!
//! # Layout
//! - [`file`]: the YAML model (`apiVersion: breakwater/v1alpha1`,
//!   `kind: Limits`) and diagnostics `FILE:LINE:COL: message (hint: ...)`.
//! - [`validate`]: parse → [`ValidatedLimits`] (globs compiled, aggregate
//!   limits and upstream caps divided by `replicas`), every problem at once.
//! - [`matcher`]: [`Subject`], [`RequestAttrs`], globs, first-match rules.
//! - [`bucket`]: lock-free GCRA token bucket with exact waits.
//! - [`state`] (private) and [`admission`]: the [`Limiter`], [`Permit`],
//!   [`Rejection`].
//! - [`blocks`]: the emergency brake and its JSON persistence.
//! - [`explain`]: what `check-limits` prints.
//!
//! # Wiring it into the proxy
//! ```no_run
//! use std::time::Instant;
//! use breakwater_limits::{Decision, Limiter, RequestAttrs, Subject, ValidatedLimits};
//!
//! // Startup (and on SIGHUP / file change: `limiter.reload(new)`; on Err
//! // keep the old limits and log every line of `err`).
//! let limits = ValidatedLimits::load("limits.yaml".as_ref()).expect("valid limits");
//! let limiter = std::sync::Arc::new(Limiter::new(limits));
//!
//! // Per request, after identity and classification:
//! let groups = vec!["system:authenticated".to_string()];
//! let subject = Subject { user: "system:serviceaccount:monitoring:node-agent", groups: &groups,
//!                         pod: Some("node-agent-x7k2p"), node: Some("node-7") };
//! let req = RequestAttrs { verb: "watch", api_group: "", resource: "pods", subresource: "",
//!                          namespace: "", is_resource_request: true };
//! match limiter.admit(&subject, &req, Instant::now()) {
//!     Decision::Admitted(permit) => {
//!         // X-Breakwater-Rule: permit.rule(); count permit.shadow_rejection();
//!         // move `permit` into the response body / watch stream so it is
//!         // dropped when that ends, however it ends.
//!         drop(permit);
//!     }
//!     Decision::Rejected(rej) => {
//!         // 429 (or rej.status == 403 for a block), Status reason
//!         // TooManyRequests naming rej.rule, Retry-After =
//!         // jittered(rej.retry_after, &mut rand::rng()).as_secs().
//!         let _ = breakwater_limits::jittered(rej.retry_after, &mut rand::rng());
//!     }
//! }
//! // Every ~30 s: limiter.evict_idle(Instant::now()); limiter.expire_blocks(SystemTime::now()).
//! ```
//!
//! # Semantics the proxy relies on
//! - Rules match in order, first match wins; no match = no rule limits
//!   (upstream seats still apply).
//! - Watches hold a watch slot, never an in-flight or upstream seat (as in
//!   APF); other long-running requests (exec/attach/portforward/proxy/log)
//!   hold nothing but take a rate token.
//! - Exempt rules bypass all limits; they may use all `maxInflight` seats,
//!   other traffic only `maxInflight - reservedForExempt`.
//! - Shadow rules never reject; the permit carries the would-be rejection.
//! - A rule with `charges: upstream` charges only requests that reach the
//!   apiserver: admit with [`Limiter::admit_client`] before the proxy may
//!   answer from its cache, then [`Limiter::charge_upstream`] before
//!   anything goes upstream for the request ([`Limiter::admit`] does both).
//!   Its concurrent-watch caps count every client watch at the first step.
//! - Blocks and upstream seats are enforced in every mode; exempt traffic is
//!   only blocked by a `force` block.
//! - A rule's `key` says what "identity" means for its per-identity
//!   limits: the user (default), the Pod or node of the credentials
//!   ([`Subject::pod`], [`Subject::node`]) or the ServiceAccount. A request
//!   without the key falls back to its user, or with `onMissingKey:
//!   refuse` gets a [`RejectReason::MissingKey`] rejection (status 403).
//! - `backend: redis` ([`Backend`]): the limiter stays local and
//!   synchronous; the proxy's Redis backend takes over the aggregate
//!   limits with [`Limiter::set_global`], asks [`Limiter::global_demand`]
//!   per admitted request, and hangs its slot lease on the permit with
//!   [`Permit::attach`]. The local counts always count, so handing the
//!   limits back (Redis unreachable) enforces this replica's share at once.
//! - Per-identity state is bounded by [`LimiterConfig::max_identities`];
//!   when full with nothing evictable, new identities share one overflow
//!   state per rule (limited together as one identity). Entries are keyed
//!   by a 128-bit keyed hash of the user name (no string kept).
//! - [`Limiter::reload`] keeps a rule's state by name; changed limits refill
//!   its buckets but keep its in-flight/watch counts (they are real open
//!   requests, so a tightened limit bites at once).
//! - [`Rejection::retry_after`] is the exact bucket wait (1 s for
//!   concurrency, remaining block time for blocks); jitter it with
//!   [`jittered`] before writing `Retry-After`.

pub mod admission;
pub mod blocks;
pub mod bucket;
pub mod explain;
pub mod file;
pub mod matcher;
pub mod quota;
mod state;
pub mod validate;

pub use admission::{
    BLOCK_RETRY_AFTER, CONCURRENCY_RETRY_AFTER, Decision, GlobalDemand, GlobalHeld, Limiter,
    LimiterConfig, Permit, Quota, QuotaRule, RejectReason, Rejection, RuleStats, jittered,
};
pub use blocks::{ActiveBlock, Block, BlockError, BlockRespond, BlockStatus, BlockTarget, Blocks};
pub use bucket::RateLimit;
pub use explain::{Explanation, explain};
pub use file::{
    BackendSpec, Charges, Key, LimitsError, LimitsFile, Mode, OnMissingKey, Problem, Problems,
};
pub use matcher::{RequestAttrs, Subject};
pub use quota::{Unit, UpstreamQuota};
pub use validate::{Backend, LimitValues, RedisBackend, Rule, UpstreamCaps, ValidatedLimits};
