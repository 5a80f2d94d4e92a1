//! The admission phase: limits and emergency blocks, decided before anything
//! reaches the apiserver.
//!
//! The decision itself is `breakwater-limits`' [`Limiter`], in two steps:
//! [`Admission::admit`] before the watch hub may answer the request from its
//! cache, and [`Admission::charge_upstream`] before anything goes upstream
//! for it (rules with `charges: upstream` charge their rates, in-flight
//! slots and upstream seat only there). This module turns it into HTTP: a 429 (or a block's 403) `Status` with a jittered
//! `Retry-After`, the `X-Breakwater-Rule` header naming the governing rule
//! (like the apiserver's `X-Kubernetes-PF-FlowSchema-UID`), the IETF draft
//! `RateLimit-Policy`/`RateLimit` headers when enabled, metrics, the hot
//! reload of the limits file, and the persisted block list.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use breakwater_limits::{
    ActiveBlock, Block, BlockError, BlockStatus, Decision, Limiter, LimitsError, Permit,
    RejectReason, Rejection, RequestAttrs, Subject, ValidatedLimits,
};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use crate::classify::RequestInfo;
use crate::error::Chain;
use crate::global::{Global, GlobalError, Outcome};
use crate::identity::Identity;
use crate::status::{Details, Reason, Status};
use crate::tasks::TaskTracker;
use crate::upstream::Body;
use arc_swap::ArcSwapOption;
use tokio_util::sync::CancellationToken;

/// Response header naming the rule that governed a request.
pub const RULE_HEADER: &str = "x-breakwater-rule";
/// [`RULE_HEADER`] as a name: inserting by `&str` copies the name each time.
static RULE_HEADER_NAME: HeaderName = HeaderName::from_static(RULE_HEADER);

/// Limits, blocks and their files.
pub struct Admission {
    limiter: Arc<Limiter>,
    limits_file: Option<PathBuf>,
    blocks_file: Option<PathBuf>,
    rate_limit_headers: bool,
    /// Serializes block changes with their write to disk.
    blocks_lock: std::sync::Mutex<()>,
    /// The shared backend of the aggregate limits (`backend: redis`); a
    /// reload that changes `backend` replaces it.
    global: ArcSwapOption<Global>,
    /// Where backends run ([`Admission::start_backend`]): the proxy's
    /// tracker and shutdown token.
    runner: std::sync::Mutex<Option<(TaskTracker, CancellationToken)>>,
    /// Serializes reloads (the file watcher and SIGHUP may both call).
    reload_lock: std::sync::Mutex<()>,
    /// The limits file's generation and last reload, for `/debug/top`.
    file_state: std::sync::Mutex<LimitsFileState>,
}

/// The limits file as admission last saw it (`/debug/top` shows it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitsFileState {
    pub file: Option<PathBuf>,
    /// 1 at start-up with a file; +1 per accepted reload.
    pub generation: u64,
    pub last_reload: Option<ReloadOutcome>,
}

/// How the last reload of the limits file went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadOutcome {
    pub at: SystemTime,
    /// Why the file was refused (its first problems); `None`: accepted.
    pub error: Option<String>,
}

impl ReloadOutcome {
    fn now(error: Option<&str>) -> ReloadOutcome {
        ReloadOutcome {
            at: SystemTime::now(),
            // The first problems are enough to point at the file; the log
            // has every one.
            error: error.map(|e| e.lines().take(5).collect::<Vec<_>>().join("\n")),
        }
    }
}

/// Why admission could not be set up, or a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error(transparent)]
    Limits(#[from] LimitsError),
    #[error(transparent)]
    Blocks(#[from] BlockError),
    #[error("limits backend")]
    Global(#[from] GlobalError),
}

/// What admission says about one request.
pub enum Admit {
    /// Go ahead; keep the permit (if any) until the response ends.
    Go(Permit),
    /// Answer this instead (a 429, or a block's 403 or 429).
    Refuse {
        response: Response<Body>,
        /// The rule that refused it (`-` for a block of no rule).
        rule: Arc<str>,
    },
}

impl Admission {
    /// Loads the limits file (none: no limits) and the persisted blocks.
    pub fn new(
        limits_file: Option<&Path>,
        blocks_file: Option<&Path>,
        rate_limit_headers: bool,
    ) -> Result<Admission, AdmitError> {
        let limits = match limits_file {
            Some(path) => ValidatedLimits::load(path)?,
            None => ValidatedLimits::unlimited(),
        };
        let global = match limits.backend() {
            breakwater_limits::Backend::Local => None,
            breakwater_limits::Backend::Redis(cfg) => Some(Global::new(cfg)?),
        };
        let limiter = Arc::new(Limiter::new(limits));
        if let Some(path) = blocks_file {
            limiter.set_blocks(breakwater_limits::Blocks::load(path)?);
        }
        let file_state = std::sync::Mutex::new(LimitsFileState {
            file: limits_file.map(Path::to_owned),
            generation: u64::from(limits_file.is_some()),
            last_reload: None,
        });
        let admission = Admission {
            limiter,
            limits_file: limits_file.map(Path::to_owned),
            blocks_file: blocks_file.map(Path::to_owned),
            rate_limit_headers,
            blocks_lock: std::sync::Mutex::new(()),
            file_state,
            global: ArcSwapOption::new(global.map(Arc::new)),
            runner: std::sync::Mutex::new(None),
            reload_lock: std::sync::Mutex::new(()),
        };
        admission.publish_limits(false);
        admission.publish_backend();
        Ok(admission)
    }

    /// The Redis backend in force, if the limits file asks for one.
    pub fn global(&self) -> Option<Global> {
        self.global.load().as_deref().cloned()
    }

    /// Runs the backend in force, and each one a reload brings in, on
    /// `tasks` until `stop`: connects, renews, falls back and recovers
    /// (see [`Global::run`]).
    pub fn start_backend(&self, tasks: &TaskTracker, stop: CancellationToken) {
        *self.runner.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((tasks.clone(), stop.clone()));
        if let Some(global) = self.global() {
            tasks.spawn(global.run(Arc::clone(&self.limiter), stop));
        }
    }

    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// Whether some exempt rule of the limits in force names `identity`
    /// (by user, group or ServiceAccount; verbs and resources aside): its
    /// connections are served beside the storm (`server::serve_connection`).
    /// An exempt rule that names no subject exempts requests (say, every
    /// caller's `/healthz`), not identities: it makes nobody privileged,
    /// or every connection would crowd onto the one privileged thread.
    pub fn is_privileged(&self, identity: &Identity) -> bool {
        let subject = subject(identity);
        self.limiter.limits().rules().iter().any(|r| {
            r.is_exempt() && r.matcher().names_subjects() && r.matcher().subject_matches(&subject)
        })
    }

    /// Whether some exempt rule names subjects, so that a bearer token could
    /// name a privileged identity: only then is a connection's first request
    /// read before hyper to find its token (`accept::peek`).
    pub fn may_privilege_tokens(&self) -> bool {
        self.limiter
            .limits()
            .rules()
            .iter()
            .any(|r| r.is_exempt() && r.matcher().names_subjects())
    }

    /// The limits file, for the file watcher.
    pub fn limits_file(&self) -> Option<&Path> {
        self.limits_file.as_deref()
    }

    /// Re-reads the limits file. A valid file swaps in atomically (rules
    /// whose limits did not change keep their state); an invalid one is
    /// refused, every problem logged with its line and column, and the old
    /// limits stay in force.
    ///
    /// A changed `backend` is applied too (see `Admission::switch_backend`);
    /// a Redis backend whose password or CA file cannot be read refuses the
    /// whole file, and the old backend stays.
    pub fn reload(&self) -> Result<(), AdmitError> {
        let Some(path) = &self.limits_file else {
            return Ok(());
        };
        let _serial = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let limits = match ValidatedLimits::load(path) {
            Ok(limits) => limits,
            Err(err) => return Err(self.refuse(err.into())),
        };
        let backend_changed = limits.backend() != self.limiter.limits().backend();
        let next = match (backend_changed, limits.backend()) {
            (true, breakwater_limits::Backend::Redis(cfg)) => match Global::new(cfg) {
                Ok(g) => Some(g),
                Err(err) => return Err(self.refuse(err.into())),
            },
            _ => None,
        };
        let rules = limits.rules().len();
        if backend_changed {
            self.switch_backend(limits, next);
        } else {
            self.limiter.reload(limits);
        }
        metrics::counter!("breakwater_limits_reloads_total", "result" => "ok").increment(1);
        self.set_file_state(|v| {
            v.generation += 1;
            v.last_reload = Some(ReloadOutcome::now(None));
        });
        self.publish_limits(false);
        tracing::info!(file = %path.display(), rules, "limits reloaded");
        Ok(())
    }

    /// Records and logs a refused reload; the old limits stay in force.
    fn refuse(&self, err: AdmitError) -> AdmitError {
        metrics::counter!("breakwater_limits_reloads_total", "result" => "error").increment(1);
        let problems = Chain(&err).to_string();
        self.set_file_state(|v| v.last_reload = Some(ReloadOutcome::now(Some(&problems))));
        self.publish_limits(true);
        for line in problems.lines() {
            tracing::error!(problem = %line, "limits file refused; the old limits stay in force");
        }
        err
    }

    /// Swaps in `limits` with another backend (`next`; `None`: local),
    /// without losing or double counting a held slot:
    ///
    /// 1. The old Redis backend retires: the limiter enforces every limit
    ///    locally, at this replica's share, from now on (fail static
    ///    while the new backend connects); the old backend removes the
    ///    slots it holds from its Redis and stops.
    /// 2. The new rules swap in.
    /// 3. The new backend takes over the slots held now (requests
    ///    admitted before it, which keep running) and registers them
    ///    when its Redis answers, within the caps, before it takes the
    ///    aggregate limits from the limiter (as after an outage); it
    ///    releases them as those requests end.
    fn switch_backend(&self, limits: ValidatedLimits, next: Option<Global>) {
        let from = backend_name(self.limiter.limits().backend());
        let to = backend_name(limits.backend());
        // Requests admitted from here until `next` is in place are decided
        // locally and hold nothing in Redis: step 3 counts them.
        match self.global.swap(None) {
            Some(old) => old.retire(&self.limiter),
            None => self.limiter.set_global(false),
        }
        self.limiter.reload(limits);
        if let Some(next) = next {
            self.global.store(Some(Arc::new(next.clone())));
            next.adopt(&self.limiter.global_held());
            let runner = self
                .runner
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some((tasks, stop)) = runner {
                tasks.spawn(next.run(Arc::clone(&self.limiter), stop));
            }
        }
        self.publish_backend();
        tracing::warn!(from, to, "the limits backend changed");
    }

    /// `breakwater_limits_backend{backend}`: 1 for the backend in force.
    fn publish_backend(&self) {
        let redis = self.global.load().is_some();
        metrics::gauge!("breakwater_limits_backend", "backend" => "redis").set(if redis {
            1.0
        } else {
            0.0
        });
        metrics::gauge!("breakwater_limits_backend", "backend" => "local").set(if redis {
            0.0
        } else {
            1.0
        });
    }

    /// Decides one request, before the watch hub may answer it: blocks,
    /// and every limit except the upstream-bound parts of `charges:
    /// upstream` rules, which [`Admission::charge_upstream`] takes if the
    /// request (or anything on its behalf) goes upstream.
    ///
    /// With a Redis backend up, the rule's aggregate limits are then taken
    /// in Redis (one round trip); if Redis fails, the request is decided
    /// again locally, at this replica's share (fail static).
    pub async fn admit(&self, identity: &Identity, info: &RequestInfo) -> Admit {
        let subject = subject(identity);
        let attrs = attrs(info);
        let verb = info.verb.label();
        let mut decision = self.limiter.admit_client(&subject, &attrs, Instant::now());
        let mut again = false;
        // The backend in force; cloned (one `Arc`) only for a request
        // that asks it for something.
        let global = match &decision {
            Decision::Admitted(permit) => self
                .global
                .load()
                .as_deref()
                .and_then(|g| Some((g.clone(), self.limiter.global_demand(permit, &attrs)?))),
            Decision::Rejected(_) => None,
        };
        if let (Some((global, demand)), Decision::Admitted(permit)) = (global, &mut decision) {
            let outcome = if global.is_up() {
                // Boxed: only requests under a global limit wait on Redis,
                // and unboxed its state would make every request's handler
                // future (moved into its box per request) 632 bytes larger.
                Box::pin(global.acquire(&demand)).await
            } else {
                // Decided locally; its slot goes to Redis when Redis returns.
                Ok(Outcome::Granted(global.hold_unregistered(&demand)))
            };
            match outcome {
                Ok(Outcome::Granted(hold)) => {
                    if let Some(hold) = hold {
                        permit.attach(Box::new(hold));
                    }
                }
                Ok(Outcome::Refused(reason, wait)) => {
                    let rej = demand.rejection(reason, wait);
                    if demand.shadow {
                        count_shadow(&rej, verb, identity);
                    } else {
                        count_rejected(&rej, verb);
                        return Admit::Refuse {
                            response: self.rejection_response(&rej),
                            rule: Arc::clone(&rej.rule),
                        };
                    }
                }
                Err(err) => {
                    metrics::counter!("breakwater_global_limits_errors_total", "op" => "acquire")
                        .increment(1);
                    global.fall_back(&self.limiter, &err);
                    again = true;
                }
            }
        }
        if again {
            // Give back what the first decision took (its aggregate limits
            // were left to Redis), then decide again with every limit
            // local, at this replica's share. The per-identity tokens the
            // first decision spent stay spent: once per request, only at
            // the moment Redis fails.
            drop(decision);
            decision = self.limiter.admit_client(&subject, &attrs, Instant::now());
            if let (Some(global), Decision::Admitted(permit)) = (self.global(), &mut decision)
                && let Some(demand) = self.limiter.global_demand(permit, &attrs)
                && let Some(hold) = global.hold_unregistered(&demand)
            {
                permit.attach(Box::new(hold));
            }
        }
        match decision {
            Decision::Admitted(permit) => {
                if let Some(would) = permit.shadow_rejection() {
                    count_shadow(would, verb, identity);
                }
                // A pending request is counted once its fate is known.
                if !permit.charge_pending() {
                    count_admitted(&permit, verb);
                }
                Admit::Go(permit)
            }
            Decision::Rejected(rej) => {
                count_rejected(&rej, verb);
                Admit::Refuse {
                    response: self.rejection_response(&rej),
                    rule: Arc::clone(&rej.rule),
                }
            }
        }
    }

    /// The second step: charges what [`Admission::admit`] deferred, just
    /// before the request, or anything on its behalf, goes upstream. A
    /// no-op when nothing is pending (a `charges: all` rule, or charged
    /// already). `Err`: answer this (a 429; boxed, as it is the rare path)
    /// and send nothing upstream; dropping the permit releases what the
    /// first step took.
    pub fn charge_upstream(
        &self,
        permit: &mut Permit,
        identity: &Identity,
        info: &RequestInfo,
    ) -> Result<(), Box<Response<Body>>> {
        if !permit.charge_pending() {
            return Ok(());
        }
        let shadowed = permit.shadow_rejection().is_some();
        let res = self.try_charge(permit, info);
        self.charged(res, shadowed, permit, identity, info)
    }

    /// [`Admission::charge_upstream`] where waiting is allowed (a request
    /// about to be forwarded, outside the watch hub): when the local quota
    /// of a global limit is empty, fills it from Redis (one round trip)
    /// and tries once more, rather than refusing a request the fleet has
    /// room for.
    pub async fn charge_upstream_or_fill(
        &self,
        permit: &mut Permit,
        identity: &Identity,
        info: &RequestInfo,
    ) -> Result<(), Box<Response<Body>>> {
        if !permit.charge_pending() {
            return Ok(());
        }
        let shadowed = permit.shadow_rejection().is_some();
        let mut res = self.try_charge(permit, info);
        if let Err(rej) = &res
            && self.limiter.global_active()
            && matches!(
                rej.reason,
                RejectReason::AggregateRate
                    | RejectReason::AggregateInflight
                    | RejectReason::AggregateWatchOpens
            )
            && let Some(global) = self.global()
            && global.is_up()
        {
            // Boxed, as in `admit`: only global limits wait on Redis.
            match Box::pin(global.fill(&self.limiter, Some(&rej.rule))).await {
                Ok(()) => res = self.try_charge(permit, info),
                Err(err) => {
                    metrics::counter!("breakwater_global_limits_errors_total", "op" => "quota")
                        .increment(1);
                    tracing::debug!(error = %Chain(&err), "filling a local quota failed");
                }
            }
        }
        self.charged(res, shadowed, permit, identity, info)
    }

    fn try_charge(&self, permit: &mut Permit, info: &RequestInfo) -> Result<(), Rejection> {
        self.limiter
            .charge_upstream(permit, &attrs(info), Instant::now())
    }

    /// Counts and answers the second step's outcome (`shadowed`: the first
    /// step had recorded a would-be rejection already).
    fn charged(
        &self,
        res: Result<(), Rejection>,
        shadowed: bool,
        permit: &mut Permit,
        identity: &Identity,
        info: &RequestInfo,
    ) -> Result<(), Box<Response<Body>>> {
        let verb = info.verb.label();
        match res {
            Ok(()) => {
                if !shadowed && let Some(would) = permit.shadow_rejection() {
                    count_shadow(would, verb, identity);
                }
                count_admitted(permit, verb);
                Ok(())
            }
            Err(rej) => {
                count_rejected(&rej, verb);
                Err(Box::new(self.rejection_response(&rej)))
            }
        }
    }

    /// A request whose charge was pending was answered without the
    /// apiserver (by the watch hub): admitted, and charged nothing.
    pub fn served_uncharged(&self, permit: &Permit, info: &RequestInfo) {
        if !permit.charge_pending() {
            return;
        }
        let verb = info.verb.label();
        count_admitted(permit, verb);
        let rule = permit.rule().unwrap_or("-").to_string();
        metrics::counter!("breakwater_uncharged_total", "rule" => rule, "verb" => verb)
            .increment(1);
    }

    /// Headers for an admitted response: the rule, and the quota if enabled.
    pub fn decorate(&self, permit: &Permit, headers: &mut HeaderMap) {
        let Some(rule) = permit.rule() else { return };
        if let Ok(v) = HeaderValue::from_str(rule) {
            headers.insert(RULE_HEADER_NAME.clone(), v);
        }
        if self.rate_limit_headers
            && let Some(q) = permit.quota()
        {
            let w = q.window.as_secs().max(1);
            if let Ok(v) = HeaderValue::from_str(&format!("\"{rule}\";q={};w={w}", q.limit)) {
                headers.insert("ratelimit-policy", v);
            }
            let refill = w
                .saturating_mul(q.limit - q.remaining)
                .checked_div(q.limit)
                .unwrap_or(0);
            if let Ok(v) =
                HeaderValue::from_str(&format!("\"{rule}\";r={};t={refill}", q.remaining))
            {
                headers.insert("ratelimit", v);
            }
        }
    }

    fn rejection_response(&self, rej: &Rejection) -> Response<Body> {
        let retry = breakwater_limits::jittered(rej.retry_after, &mut rand::rng())
            .as_secs()
            .max(1);
        let missing = match rej.reason {
            RejectReason::MissingKey(key) => Some(key),
            _ => None,
        };
        let (code, reason, message) = match (&rej.block_id, rej.status, missing) {
            (None, _, Some(key)) => (
                StatusCode::FORBIDDEN,
                Reason::Forbidden,
                format!(
                    "Breakwater rule {:?} limits each {} separately and refuses requests without one; this request's credentials carry no {} (it comes from {})",
                    rej.rule.as_ref(),
                    key.as_str(),
                    key.as_str(),
                    key.source()
                ),
            ),
            (Some(id), 403, _) => (
                StatusCode::FORBIDDEN,
                Reason::Forbidden,
                format!(
                    "blocked by Breakwater emergency block {id:?} (rule {:?})",
                    rej.rule.as_ref()
                ),
            ),
            (Some(id), _, _) => (
                StatusCode::TOO_MANY_REQUESTS,
                Reason::TooManyRequests,
                format!(
                    "blocked by Breakwater emergency block {id:?} (rule {:?}); retry later",
                    rej.rule.as_ref()
                ),
            ),
            (None, _, None) => (
                StatusCode::TOO_MANY_REQUESTS,
                Reason::TooManyRequests,
                format!(
                    "too many requests: Breakwater rule {:?} limits {} to {}; retry after {retry}s",
                    rej.rule.as_ref(),
                    describe(rej),
                    rej.limit
                ),
            ),
        };
        let mut status = Status::failure(code, reason, message);
        if code == StatusCode::TOO_MANY_REQUESTS {
            status = status.with_details(Details {
                retry_after_seconds: Some(retry),
                ..Details::default()
            });
        }
        let mut resp = status
            .into_response::<bytes::Bytes>()
            .map(crate::upstream::full);
        if let Ok(v) = HeaderValue::from_str(&rej.rule) {
            resp.headers_mut().insert(RULE_HEADER_NAME.clone(), v);
        }
        if self.rate_limit_headers && rej.reason.is_rate() {
            let w = rej.window.as_secs().max(1);
            if let Ok(v) = HeaderValue::from_str(&format!("\"{}\";q={};w={w}", rej.rule, rej.limit))
            {
                resp.headers_mut().insert("ratelimit-policy", v);
            }
            if let Ok(v) = HeaderValue::from_str(&format!("\"{}\";r=0;t={retry}", rej.rule)) {
                resp.headers_mut().insert("ratelimit", v);
            }
        }
        resp
    }

    /// Adds a block and persists the list; returns it as in force (with
    /// its counters).
    pub fn add_block(&self, block: Block) -> Result<ActiveBlock, AdmitError> {
        let _serial = self.blocks_lock.lock().unwrap_or_else(|p| p.into_inner());
        let active = self.limiter.add_block(block)?;
        self.publish_blocks();
        self.persist()?;
        let block = active.block();
        tracing::warn!(id = %block.id, target = ?block.target, terminate = block.terminate, "emergency block added");
        Ok(active)
    }

    /// Removes a block and persists the list.
    pub fn remove_block(&self, id: &str) -> Result<Option<Block>, AdmitError> {
        let _serial = self.blocks_lock.lock().unwrap_or_else(|p| p.into_inner());
        let removed = self.limiter.remove_block(id);
        self.publish_blocks();
        if removed.is_some() {
            self.persist()?;
            tracing::warn!(id, "emergency block removed");
        }
        Ok(removed)
    }

    pub fn blocks(&self) -> Vec<Block> {
        self.limiter.blocks().list()
    }

    /// The blocks with their hit and termination counts.
    pub fn block_statuses(&self) -> Vec<BlockStatus> {
        self.limiter.blocks().statuses()
    }

    /// The limits file's generation and last reload.
    pub fn limits_file_state(&self) -> LimitsFileState {
        self.file_state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_file_state(&self, f: impl FnOnce(&mut LimitsFileState)) {
        f(&mut self.file_state.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The limits file's gauges: its generation, and whether the last
    /// attempt to load it was refused (the old limits are in force: alert).
    fn publish_limits(&self, failing: bool) {
        let generation = self.limits_file_state().generation;
        metrics::gauge!("breakwater_limits_generation").set(generation as f64);
        metrics::gauge!("breakwater_limits_reload_failing").set(if failing { 1.0 } else { 0.0 });
    }

    fn persist(&self) -> Result<(), AdmitError> {
        if let Some(path) = &self.blocks_file {
            self.limiter.blocks().save(path)?;
        }
        Ok(())
    }

    /// Emergency blocks in force (an alert fires while any is).
    fn publish_blocks(&self) {
        metrics::gauge!("breakwater_blocks_active").set(self.limiter.blocks().len() as f64);
    }

    /// Periodic upkeep: idle identities, expired blocks, gauges.
    pub fn maintain(&self) {
        self.limiter.evict_idle(Instant::now());
        let expired = self.limiter.expire_blocks(SystemTime::now());
        if !expired.is_empty() {
            let _serial = self.blocks_lock.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(err) = self.persist() {
                tracing::warn!(error = %Chain(&err), "could not persist the block list");
            }
        }
        self.publish_blocks();
        let limits = self.limiter.limits();
        for s in self.limiter.rule_stats() {
            metrics::gauge!("breakwater_rule_inflight", "rule" => s.rule.to_string())
                .set(s.inflight as f64);
            metrics::gauge!("breakwater_rule_watches", "rule" => s.rule.to_string())
                .set(s.watches as f64);
            // The aggregate cap beside the count, so "a fleet near its cap"
            // is one division in PromQL (this replica's share of it).
            if let Some(cap) = limits
                .rules()
                .iter()
                .find(|r| r.name() == &*s.rule)
                .and_then(|r| r.aggregate().watches)
            {
                metrics::gauge!("breakwater_rule_watch_limit", "rule" => s.rule.to_string())
                    .set(cap as f64);
            }
        }
        metrics::gauge!("breakwater_upstream_inflight")
            .set(self.limiter.upstream_inflight() as f64);
        metrics::gauge!("breakwater_limit_identities").set(self.limiter.identity_entries() as f64);
    }
}

/// Runs [`Admission::maintain`] every `every` until `stop`.
pub async fn maintenance(
    admission: Arc<Admission>,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => admission.maintain(),
        }
    }
}

fn backend_name(b: &breakwater_limits::Backend) -> &'static str {
    match b {
        breakwater_limits::Backend::Local => "local",
        breakwater_limits::Backend::Redis(_) => "redis",
    }
}

/// Who asks, as the limiter sees it: the user, groups, and the Pod and
/// node a bound ServiceAccount token names (for rules with `key: pod` or
/// `key: node`; the node of a node's own certificate the limiter reads from
/// the user name).
pub fn subject(identity: &Identity) -> Subject<'_> {
    let first = |k: &str| {
        identity
            .extra
            .get(k)
            .and_then(|v| v.first())
            .map(String::as_str)
    };
    Subject {
        user: &identity.username,
        groups: &identity.groups,
        pod: first(crate::identity::POD_NAME_EXTRA),
        node: first(crate::identity::NODE_NAME_EXTRA),
    }
}

/// What the limiter needs to know of a request.
pub fn attrs(info: &RequestInfo) -> RequestAttrs<'_> {
    RequestAttrs {
        verb: info.verb.as_str(),
        api_group: &info.api_group,
        resource: &info.resource,
        subresource: &info.subresource,
        namespace: &info.namespace,
        is_resource_request: info.is_resource_request,
    }
}

/// `breakwater_admitted_total{rule,verb}`, once per admitted request,
/// through handles each thread keeps per (rule, verb)
/// ([`crate::slo::with_handle`]).
fn count_admitted(permit: &Permit, verb: &'static str) {
    thread_local! {
        static HANDLES: crate::slo::Handles<(Option<Arc<str>>, &'static str), metrics::Counter> =
            crate::slo::Handles::default();
    }
    crate::slo::with_handle(
        &HANDLES,
        (permit.rule_arc(), verb),
        |(rule, _)| {
            let rule = rule.as_deref().unwrap_or("-").to_string();
            metrics::counter!("breakwater_admitted_total", "rule" => rule, "verb" => verb)
        },
        |counter| counter.increment(1),
    );
}

fn count_rejected(rej: &Rejection, verb: &'static str) {
    metrics::counter!("breakwater_rejected_total",
        "rule" => rej.rule.to_string(), "verb" => verb, "reason" => rej.reason.as_str())
    .increment(1);
}

fn count_shadow(would: &Rejection, verb: &'static str, identity: &Identity) {
    metrics::counter!("breakwater_shadow_rejections_total",
        "rule" => would.rule.to_string(), "verb" => verb, "reason" => would.reason.as_str())
    .increment(1);
    tracing::info!(rule = %would.rule, reason = would.reason.as_str(), user = %identity.username,
        "shadow mode: would have rejected");
}

fn describe(rej: &Rejection) -> &'static str {
    use breakwater_limits::RejectReason as R;
    match rej.reason {
        R::Rate => "each identity's request burst",
        R::Inflight => "each identity's requests in flight",
        R::Watches => "each identity's concurrent watches",
        R::WatchOpens => "each identity's watch-open burst",
        R::AggregateRate => "the request burst of all identities it matches",
        R::AggregateInflight => "the requests in flight of all identities it matches",
        R::AggregateWatches => "the concurrent watches of all identities it matches",
        R::AggregateWatchOpens => "the watch-open burst of all identities it matches",
        R::UpstreamSeats => "the requests in flight to the apiserver",
        R::Blocked => "blocked requests",
        R::MissingKey(_) => "requests without its key",
    }
}
