//! Admission: [`Limiter::admit`] decides one request and returns a
//! [`Permit`] (RAII: dropping it releases what the request holds) or a
//! [`Rejection`] (with everything a 429 needs).
//!
//! Order of checks, and why:
//! 1. **Match** the first rule (blocks need to know the rule and whether it
//!    is exempt).
//! 2. **Blocks**: the emergency brake wins over everything; exempt traffic
//!    only by a forced block.
//! 3. **Exempt** rules skip every limit; they only take an upstream seat.
//! 4. **Concurrency** (per identity, then aggregate): watches take a watch
//!    slot, other non-long-running requests an in-flight slot. First, so a
//!    request rejected for concurrency burns no token.
//! 5. **Rates** (per identity, then aggregate; for watches also watch
//!    opens). A failure refunds the tokens already taken and releases the
//!    slots, so a rejected request leaves no trace.
//! 6. **Upstream seat** (non-long-running only): last, because it is the
//!    scarcest shared resource; failing it undoes steps 4-5.
//!
//! Watches, like in APF, do not hold an in-flight seat or an upstream seat for
//! their lifetime (they would pin it for hours); they hold a watch slot. They
//! take one `rate` token *and* one `watchOpens` token when opened. Other
//! long-running requests (exec, attach, portforward, proxy, log) take a
//! `rate` token only.
//!
//! A rule in `shadow` mode runs steps 4-5 exactly as if enforcing, but on a
//! would-be rejection undoes them and admits; the permit carries the
//! would-be [`Rejection`]. Blocks and upstream seats are always enforced.
//!
//! # Two steps, for rules that charge `upstream`
//! The proxy answers some requests itself (its watch hub serves watches and
//! LISTs from a shared cache); those cost the apiserver nothing, and a rule
//! with `charges: upstream` does not charge them. The proxy then admits in
//! two steps. [`Limiter::admit_client`], before the hub, runs steps 1-6 for
//! every rule except `charges: upstream` ones, of which it takes only the
//! concurrent-watch slots (they hold proxy memory whoever answers) and
//! defers the rest. [`Limiter::charge_upstream`], just before anything goes
//! upstream for the request, takes what was deferred: the in-flight slots
//! of step 4, then steps 5 and 6, with the same undo on failure. A request
//! the hub serves never reaches the second step. [`Limiter::admit`] is both
//! steps at once.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;

use crate::blocks::{self, ActiveBlock, Block, BlockError, Blocks};
use crate::bucket::RateLimit;
use crate::file::{Charges, Key, Mode, OnMissingKey};
use crate::matcher::{RequestAttrs, Subject};
use crate::quota::Unit;
use crate::state::{
    IdentityState, KeyHasher, RuleState, UpstreamState, acquire, acquire_seat, release, stripe,
};
use crate::validate::{LimitValues, Rule, ValidatedLimits};

/// `retry_after` for concurrency rejections (in-flight, watches, upstream
/// seats): the wait depends on other requests ending, so like the
/// apiserver's APF we say one second and let jitter spread the retries.
pub const CONCURRENCY_RETRY_AFTER: Duration = Duration::from_secs(1);

/// `retry_after` for a block without expiry.
pub const BLOCK_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Why a request was (or in shadow mode would have been) rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The identity's request rate.
    Rate,
    /// The identity's concurrent requests.
    Inflight,
    /// The identity's concurrent watches.
    Watches,
    /// The identity's watch-open rate.
    WatchOpens,
    /// The rule's aggregate request rate.
    AggregateRate,
    /// The rule's aggregate concurrent requests.
    AggregateInflight,
    /// The rule's aggregate concurrent watches.
    AggregateWatches,
    /// The rule's aggregate watch-open rate.
    AggregateWatchOpens,
    /// No upstream seat left for this class of traffic.
    UpstreamSeats,
    /// An emergency block.
    Blocked,
    /// The rule counts per `key` (`onMissingKey: refuse`) and the
    /// request's credentials do not carry it.
    MissingKey(Key),
}

impl RejectReason {
    /// A stable snake_case label (metrics, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Rate => "rate",
            RejectReason::Inflight => "inflight",
            RejectReason::Watches => "watches",
            RejectReason::WatchOpens => "watch_opens",
            RejectReason::AggregateRate => "aggregate_rate",
            RejectReason::AggregateInflight => "aggregate_inflight",
            RejectReason::AggregateWatches => "aggregate_watches",
            RejectReason::AggregateWatchOpens => "aggregate_watch_opens",
            RejectReason::UpstreamSeats => "upstream_seats",
            RejectReason::Blocked => "blocked",
            RejectReason::MissingKey(_) => "missing_key",
        }
    }

    /// Is it a token-bucket reason (for which `window` is meaningful)?
    pub fn is_rate(self) -> bool {
        matches!(
            self,
            RejectReason::Rate
                | RejectReason::WatchOpens
                | RejectReason::AggregateRate
                | RejectReason::AggregateWatchOpens
        )
    }
}

/// A rejection: everything a 429 (or a block's 403) response needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The rule that rejected (for blocks and upstream seats: the rule the
    /// request matched, or `-` if none).
    pub rule: Arc<str>,
    /// Which limit.
    pub reason: RejectReason,
    /// The real wait: for rates, until a token exists; for blocks, until
    /// expiry (or [`BLOCK_RETRY_AFTER`]); otherwise
    /// [`CONCURRENCY_RETRY_AFTER`]. Not jittered: see [`jittered`].
    pub retry_after: Duration,
    /// The limit hit (burst for rates, the cap for counters, 0 for blocks).
    pub limit: u64,
    /// What is left of it (0).
    pub remaining: u64,
    /// For rates, `burst / rate` (a `RateLimit-Policy` window); zero for
    /// the other reasons.
    pub window: Duration,
    /// HTTP status to answer: 429, or 403 for a block asking so.
    pub status: u16,
    /// The block's id when `reason` is `Blocked`.
    pub block_id: Option<Arc<str>>,
}

impl Rejection {
    /// A 429 for `rule`: `limit` reached (nothing remaining), wait
    /// `retry_after`; `window` for rates, zero otherwise.
    fn limited(
        rule: Arc<str>,
        reason: RejectReason,
        limit: u64,
        retry_after: Duration,
        window: Duration,
    ) -> Rejection {
        Rejection {
            rule,
            reason,
            retry_after,
            limit,
            remaining: 0,
            window,
            status: 429,
            block_id: None,
        }
    }
}

/// The identity's request-rate quota after an admission (for `RateLimit`
/// headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Bucket size (burst).
    pub limit: u64,
    /// Tokens left after this request.
    pub remaining: u64,
    /// `burst / rate`: time for an empty bucket to refill.
    pub window: Duration,
}

/// The outcome of [`Limiter::admit`].
#[derive(Debug)]
pub enum Decision {
    /// Go ahead; keep the permit until the response body or watch ends.
    Admitted(Permit),
    /// Answer with a 429 (or 403).
    Rejected(Rejection),
}

impl Decision {
    /// The permit, if admitted.
    pub fn permit(self) -> Result<Permit, Rejection> {
        match self {
            Decision::Admitted(p) => Ok(p),
            Decision::Rejected(r) => Err(r),
        }
    }
}

// What an admission holds, as bits.
const ID_INFLIGHT: u16 = 1;
const ID_WATCH: u16 = 2;
const AGG_INFLIGHT: u16 = 4;
const AGG_WATCH: u16 = 8;
const SEAT: u16 = 16;
const AGG_INFLIGHT_STRIPED: u16 = 32;
const AGG_WATCH_STRIPED: u16 = 64;
/// An in-flight slot of the rule's local quota (see [`crate::quota`]).
const QUOTA_INFLIGHT: u16 = 128;
const SLOT_BITS: u16 =
    ID_INFLIGHT | ID_WATCH | AGG_INFLIGHT | AGG_WATCH | AGG_INFLIGHT_STRIPED | AGG_WATCH_STRIPED;

/// An admitted request. Dropping it releases its in-flight or watch slot
/// (identity and aggregate) and its upstream seat, however the request ended.
/// `Send + Sync`: it may move into a response body or a watch task.
pub struct Permit {
    rule: Option<Arc<RuleState>>,
    /// Kept while an identity slot is held (to release it) or a charge is
    /// pending (the second step charges it).
    identity: Option<Arc<IdentityState>>,
    upstream: Option<Arc<UpstreamState>>,
    held: u16,
    /// The [`crate::state::Striped`] cell taken from.
    stripe: u8,
    exempt: bool,
    /// The rule's upstream-bound parts are not charged yet (see
    /// [`Limiter::charge_upstream`]).
    pending: bool,
    /// The rule's position in the snapshot that admitted the request: the
    /// second step finds the rule's limits there without a search, unless
    /// a reload moved it.
    index: u32,
    /// The local quota's epoch when its in-flight slot was taken.
    quota_epoch: u32,
    quota: Option<Quota>,
    shadow: Option<Box<Rejection>>,
    /// What a shared backend gave the request (its slot leases); dropped,
    /// and so released, with the permit.
    attached: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl Permit {
    /// Keeps `guard` until the permit drops: a shared backend's hold on
    /// the request's slots (its `Drop` releases them), so they end when the
    /// response or watch ends, however it ends. Replaces an earlier guard.
    pub fn attach(&mut self, guard: Box<dyn std::any::Any + Send + Sync>) {
        self.attached = Some(guard);
    }

    /// The governing rule's name (`None` if no rule matched); for the
    /// `X-Breakwater-Rule` header.
    pub fn rule(&self) -> Option<&str> {
        self.rule.as_deref().map(|r| &*r.name)
    }
    /// The governing rule's name, shared.
    pub fn rule_arc(&self) -> Option<Arc<str>> {
        self.rule.as_ref().map(|r| Arc::clone(&r.name))
    }
    /// Set when the request was admitted only because its rule is in
    /// shadow mode: what enforcing would have answered.
    pub fn shadow_rejection(&self) -> Option<&Rejection> {
        self.shadow.as_deref()
    }
    /// Admitted by an exempt rule.
    pub fn is_exempt(&self) -> bool {
        self.exempt
    }
    /// The identity's rate quota after this request, if the rule has a
    /// per-identity rate (for `RateLimit` / `RateLimit-Policy` headers).
    pub fn quota(&self) -> Option<Quota> {
        self.quota
    }
    /// Does it hold an upstream seat?
    pub fn holds_upstream_seat(&self) -> bool {
        self.held & SEAT != 0
    }
    /// Did [`Limiter::admit_client`] defer part of the charge (a rule with
    /// `charges: upstream`)? Then [`Limiter::charge_upstream`] must run
    /// before anything is sent upstream for the request; a request answered
    /// without the apiserver never runs it.
    pub fn charge_pending(&self) -> bool {
        self.pending
    }
}

impl std::fmt::Debug for Permit {
    // By hand: the derived form would print the rule's whole identity map.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("rule", &self.rule())
            .field("exempt", &self.exempt)
            .field("pending", &self.pending)
            .field("held", &format_args!("{:#06x}", self.held))
            .field("quota", &self.quota)
            .field("shadow_rejection", &self.shadow)
            .finish()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // A shared backend's hold goes first: a backend comparing its holds
        // with the counters below ([`Limiter::global_held`]) then never sees
        // a request gone from the counters but still held.
        drop(self.attached.take());
        if let Some(id) = &self.identity {
            if self.held & ID_INFLIGHT != 0 {
                release(&id.inflight);
            }
            if self.held & ID_WATCH != 0 {
                release(&id.watches);
            }
        }
        if let Some(r) = &self.rule {
            release_aggregate(r, self.held, self.stripe);
            if self.held & QUOTA_INFLIGHT != 0 {
                r.quota.give_back(Unit::Inflight, self.quota_epoch);
            }
        }
        if self.held & SEAT != 0 {
            // Through the rule when there is one (no extra Arc held).
            if let Some(u) = self
                .rule
                .as_ref()
                .map(|r| &r.upstream)
                .or(self.upstream.as_ref())
            {
                release(&u.used);
            }
        }
    }
}

/// Adds jitter to a `retry_after` so rejected clients do not come back in
/// lockstep. The result is whole seconds (what `Retry-After` carries), never
/// earlier than the real wait: `ceil(retry_after)` (at least 1 s) plus a
/// uniform 0..=max(1, half of it) seconds.
pub fn jittered<R: Rng + ?Sized>(retry_after: Duration, rng: &mut R) -> Duration {
    let base = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    let base = base.max(1);
    let spread = (base / 2).max(1);
    Duration::from_secs(base + rng.random_range(0..=spread))
}

/// Tunables of the limiter's memory.
#[derive(Debug, Clone, Copy)]
pub struct LimiterConfig {
    /// Cap on per-identity entries, all rules together. About 100 bytes
    /// each (a 24-byte table slot, a 64-byte state allocation):
    /// 1,000,000 ≈ 100 MB at worst.
    pub max_identities: usize,
    /// [`Limiter::evict_idle`] drops entries unused for this long.
    pub idle_after: Duration,
    /// When the map is full, at most one sweep (which then ignores
    /// `idle_after`) per this interval, so a flood of new identities cannot
    /// turn every admission into a full-map scan.
    pub pressure_sweep_interval: Duration,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        LimiterConfig {
            max_identities: 1_000_000,
            idle_after: Duration::from_secs(300),
            pressure_sweep_interval: Duration::from_secs(1),
        }
    }
}

/// The limits in force with their state, swapped as one on reload.
struct Snapshot {
    limits: Arc<ValidatedLimits>,
    /// Parallel to `limits.rules`.
    states: Vec<Arc<RuleState>>,
}

static NEXT_LIMITER_ID: AtomicU64 = AtomicU64::new(1);

/// This thread's copy of the snapshot of one limiter (the last one it used).
struct Cached {
    limiter: u64,
    generation: u64,
    snapshot: Arc<Snapshot>,
}

thread_local! {
    static CACHED: RefCell<Option<Cached>> = const { RefCell::new(None) };
}

/// Gauges of one rule, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleStats {
    /// Rule name.
    pub rule: Arc<str>,
    /// Admitted non-long-running requests of the rule still open (exempt
    /// and shadow ones included).
    pub inflight: u64,
    /// Admitted watches of the rule still open.
    pub watches: u64,
    /// Per-identity entries in memory.
    pub identities: usize,
}

/// The limiter: limits in force plus their state. Share it (`Arc`) between
/// connections; every method takes `&self`.
pub struct Limiter {
    snapshot: RwLock<Arc<Snapshot>>,
    /// Serialises reloads (their state carry-over reads the old snapshot).
    reload_lock: Mutex<()>,
    /// Distinguishes limiters in the per-thread snapshot cache.
    id: u64,
    /// Bumped by every reload; tells threads their cached snapshot is stale.
    generation: AtomicU64,
    upstream: Arc<UpstreamState>,
    blocks: RwLock<Blocks>,
    /// Fast path: skip the blocks lock when there are none.
    has_blocks: AtomicBool,
    epoch: Instant,
    entries: Arc<AtomicUsize>,
    config: LimiterConfig,
    last_pressure_sweep: AtomicU64,
    no_rule: Arc<str>,
    keys: KeyHasher,
    /// A shared backend enforces the aggregate limits now (see
    /// [`Limiter::set_global`]).
    global: AtomicBool,
    /// Called when a local quota runs low or out.
    quota_low: QuotaHook,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("rules", &self.limits().rules().len())
            .field("identities", &self.identity_entries())
            .finish_non_exhaustive()
    }
}

impl Limiter {
    /// A limiter with default memory tunables.
    pub fn new(limits: ValidatedLimits) -> Limiter {
        Limiter::with_config(limits, LimiterConfig::default())
    }

    /// A limiter with explicit memory tunables.
    pub fn with_config(limits: ValidatedLimits, config: LimiterConfig) -> Limiter {
        let entries = Arc::new(AtomicUsize::new(0));
        let upstream: Arc<UpstreamState> = Arc::default();
        let states = limits
            .rules
            .iter()
            .map(|r| {
                Arc::new(RuleState::new(
                    Arc::clone(&r.name),
                    Arc::clone(&entries),
                    Arc::clone(&upstream),
                ))
            })
            .collect();
        Limiter {
            snapshot: RwLock::new(Arc::new(Snapshot {
                limits: Arc::new(limits),
                states,
            })),
            reload_lock: Mutex::new(()),
            id: NEXT_LIMITER_ID.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            upstream,
            blocks: RwLock::new(Blocks::new()),
            has_blocks: AtomicBool::new(false),
            // Instants passed to `admit` are measured from here; earlier
            // ones count as the epoch itself.
            epoch: Instant::now(),
            entries,
            config,
            last_pressure_sweep: AtomicU64::new(0),
            no_rule: Arc::from("-"),
            keys: KeyHasher::default(),
            global: AtomicBool::new(false),
            quota_low: QuotaHook::default(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Arc<ValidatedLimits> {
        Arc::clone(&self.read_snapshot().limits)
    }

    fn read_snapshot(&self) -> std::sync::RwLockReadGuard<'_, Arc<Snapshot>> {
        // A panic while holding the lock cannot leave the Arc half-written.
        self.snapshot.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn ns(&self, now: Instant) -> u64 {
        // u64 nanoseconds last 584 years.
        now.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// Atomically swaps in new limits. A rule keeps its state (identity
    /// map, counters, buckets) when a rule of the same name exists in both;
    /// if its limits (or `exempt`) changed, its token buckets are refilled
    /// but its in-flight and watch counters are kept, because they count
    /// requests that are really open — a tightened watch limit is then
    /// enforced at once against the watches already held. Rules that
    /// disappear drop their state once their last permit ends. Upstream seat
    /// usage always carries over.
    pub fn reload(&self, limits: ValidatedLimits) {
        let _serial = self
            .reload_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let old = Arc::clone(&self.read_snapshot());
        let states = limits
            .rules
            .iter()
            .map(
                |r| match old.limits.rules.iter().position(|o| o.name == r.name) {
                    Some(i) => {
                        let st = Arc::clone(&old.states[i]);
                        if !old.limits.rules[i].same_limits(r) {
                            st.reset_buckets();
                        }
                        st
                    }
                    None => Arc::new(RuleState::new(
                        Arc::clone(&r.name),
                        Arc::clone(&self.entries),
                        Arc::clone(&self.upstream),
                    )),
                },
            )
            .collect();
        let next = Arc::new(Snapshot {
            limits: Arc::new(limits),
            states,
        });
        *self
            .snapshot
            .write()
            .unwrap_or_else(PoisonError::into_inner) = next;
        // After the write: a thread that sees the new generation finds the
        // new snapshot under the lock.
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Runs `f` on the snapshot in force, from this thread's cache when it
    /// is current. Taking the `RwLock` on every request would make every
    /// admission write the lock's cache line, which then bounces between
    /// cores; the generation is only read (a shared cache line stays
    /// shared). The cost: a thread that stops admitting keeps its last
    /// snapshot alive until it admits again or exits.
    #[inline]
    fn with_snapshot<R>(&self, f: impl FnOnce(&Snapshot) -> R) -> R {
        let generation = self.generation.load(Ordering::Acquire);
        CACHED.with(|cell| {
            let Ok(mut slot) = cell.try_borrow_mut() else {
                // Re-entered (not done today): use the lock.
                return f(&self.read_snapshot());
            };
            let fresh =
                matches!(&*slot, Some(c) if c.limiter == self.id && c.generation == generation);
            if !fresh {
                *slot = Some(Cached {
                    limiter: self.id,
                    generation,
                    snapshot: Arc::clone(&self.read_snapshot()),
                });
            }
            match &*slot {
                Some(c) => f(&c.snapshot),
                None => f(&self.read_snapshot()),
            }
        })
    }

    /// Decides one request at `now` (pass `Instant::now()`; tests pass
    /// explicit instants; instants before the limiter was created count as
    /// its creation). Never blocks beyond short lock sections (a shard read
    /// lock; the blocks read lock only while blocks exist). Admitting a
    /// known identity allocates nothing; a new identity allocates its state.
    ///
    /// Charges everything, whatever the rule's `charges` says: for a request
    /// known to go upstream. The proxy, which may answer a request itself,
    /// uses [`Limiter::admit_client`] and [`Limiter::charge_upstream`].
    pub fn admit(&self, subject: &Subject<'_>, req: &RequestAttrs<'_>, now: Instant) -> Decision {
        self.with_snapshot(|snap| self.admit_in(snap, subject, req, now, false))
    }

    /// The first step of a two-step admission (see the module docs): like
    /// [`Limiter::admit`], except that for a rule with `charges: upstream`
    /// it takes only the concurrent-watch slots and leaves the rest to
    /// [`Limiter::charge_upstream`] ([`Permit::charge_pending`] says so).
    /// Blocks are decided here, for every request.
    pub fn admit_client(
        &self,
        subject: &Subject<'_>,
        req: &RequestAttrs<'_>,
        now: Instant,
    ) -> Decision {
        self.with_snapshot(|snap| self.admit_in(snap, subject, req, now, true))
    }

    /// The second step: charges what [`Limiter::admit_client`] deferred
    /// (in-flight slots, rate and watch-open tokens, the upstream seat),
    /// just before the request, or anything on its behalf, goes upstream.
    /// `req` must be the request given to the first step. Does nothing when
    /// nothing is pending, so calling it twice is harmless.
    ///
    /// On `Err` the permit is unchanged: it still holds what the first step
    /// took, and dropping it (the request is refused) releases that. A rule
    /// in shadow mode never errs here; the permit then carries the would-be
    /// rejection (unless the first step already recorded one). The limits
    /// are those in force now: a reload between the steps charges the
    /// rule's new limits, and nothing if the rule is gone.
    pub fn charge_upstream(
        &self,
        permit: &mut Permit,
        req: &RequestAttrs<'_>,
        now: Instant,
    ) -> Result<(), Rejection> {
        if !permit.pending {
            return Ok(());
        }
        self.with_snapshot(|snap| self.charge_in(snap, permit, req, now))
    }

    fn charge_in(
        &self,
        snap: &Snapshot,
        permit: &mut Permit,
        req: &RequestAttrs<'_>,
        now: Instant,
    ) -> Result<(), Rejection> {
        let Some(rs) = permit.rule.as_ref() else {
            permit.pending = false;
            return Ok(());
        };
        // The rule's state is kept across reloads by name, so the same
        // `RuleState` finds the rule's limits in force now.
        let at = usize::try_from(permit.index).unwrap_or(usize::MAX);
        let index = match snap.states.get(at) {
            Some(s) if Arc::ptr_eq(s, rs) => Some(at),
            _ => snap.states.iter().position(|s| Arc::ptr_eq(s, rs)),
        };
        let Some(rule) = index.map(|i| &snap.limits.rules[i]) else {
            permit.pending = false;
            return Ok(());
        };
        let stripe = permit.stripe;
        let identity = permit.identity.as_deref();
        // With a shared backend in charge, the rule's aggregate limits are
        // spent from the local quota it granted (no round trip here);
        // otherwise they are this replica's share, as in the first step.
        let local_aggregate = !self.global.load(Ordering::Relaxed);
        let how = How {
            step: Step::Upstream,
            local_aggregate,
        };
        let taken = take_rule(rule, rs, identity, req, self.ns(now), stripe, how).and_then(
            |(held, quota)| {
                if local_aggregate {
                    return Ok((held, quota, Units::default()));
                }
                match take_quota(rule, rs, req, &self.quota_low) {
                    Ok(units) => Ok((held, quota, units)),
                    Err(rej) => {
                        let again = Undo {
                            after_success: true,
                            local_aggregate,
                        };
                        undo(rule, rs, identity, held, req, again, stripe);
                        Err(rej)
                    }
                }
            },
        );
        let (mut held, quota, units, shadow) = match taken {
            Ok((held, quota, units)) => (held, quota, units, None),
            // Undone; the first step's gauge count stays.
            Err(rej) if rule.mode == Mode::Shadow => (0, None, Units::default(), Some(rej)),
            Err(rej) => return Err(rej),
        };
        let epoch = rs.quota.epoch();
        if !req.is_long_running()
            && let Some(c) = snap.limits.upstream
        {
            if !acquire_seat(&self.upstream.used, c.non_exempt()) {
                // A shadow would-be rejection already undid (and holds)
                // nothing; otherwise give back what this step took.
                if shadow.is_none() {
                    let again = Undo {
                        after_success: true,
                        local_aggregate,
                    };
                    undo(rule, rs, identity, held, req, again, stripe);
                    units.give_back(&rs.quota, epoch);
                }
                return Err(self.seat_rejection(Arc::clone(&rule.name), c.non_exempt()));
            }
            held |= SEAT;
        }
        // The first step counted the request in the rule's in-flight gauge
        // only; a slot taken now counts it instead. Given back after the
        // take, so the gauge never dips below the truth.
        if held & (AGG_INFLIGHT | AGG_INFLIGHT_STRIPED) != 0
            && permit.held & AGG_INFLIGHT_STRIPED != 0
        {
            rs.aggregate.inflight_striped.sub(stripe);
            permit.held &= !AGG_INFLIGHT_STRIPED;
        }
        if units.has(Unit::Inflight) {
            held |= QUOTA_INFLIGHT;
            permit.quota_epoch = epoch;
        }
        permit.held |= held;
        permit.quota = quota;
        if permit.shadow.is_none() {
            permit.shadow = shadow.map(Box::new);
        }
        permit.pending = false;
        if permit.held & (ID_INFLIGHT | ID_WATCH) == 0 {
            permit.identity = None;
        }
        Ok(())
    }

    fn admit_in(
        &self,
        snap: &Snapshot,
        subject: &Subject<'_>,
        req: &RequestAttrs<'_>,
        now: Instant,
        two_step: bool,
    ) -> Decision {
        let now_ns = self.ns(now);
        let matched = snap.limits.match_rule(subject, req);
        let index = matched.map_or(0, |i| u32::try_from(i).unwrap_or(u32::MAX));
        let rule = matched.map(|i| (&snap.limits.rules[i], &snap.states[i]));

        if self.has_blocks.load(Ordering::Relaxed)
            && let Some(rej) = self.check_blocks(subject, req, rule.map(|(r, _)| r))
        {
            return Decision::Rejected(rej);
        }

        let seat_needed = !req.is_long_running();
        let caps = snap.limits.upstream;
        let Some((rule, rs)) = rule else {
            // No rule: unlimited, but still a non-exempt upstream seat.
            let mut held = 0;
            if seat_needed && let Some(c) = caps {
                if !acquire_seat(&self.upstream.used, c.non_exempt()) {
                    return Decision::Rejected(
                        self.seat_rejection(Arc::clone(&self.no_rule), c.non_exempt()),
                    );
                }
                held |= SEAT;
            }
            return Decision::Admitted(self.permit(None, None, held, Flags::default(), None, None));
        };

        if rule.exempt {
            let mut held = 0;
            if seat_needed && let Some(c) = caps {
                if !acquire_seat(&self.upstream.used, c.max_inflight) {
                    return Decision::Rejected(
                        self.seat_rejection(Arc::clone(&rule.name), c.max_inflight),
                    );
                }
                held |= SEAT;
            }
            // Counted for the rule's gauges only.
            held |= count_only(rs, req, stripe());
            let flags = Flags {
                exempt: true,
                ..Flags::default()
            };
            return Decision::Admitted(self.permit(Some(rs), None, held, flags, None, None));
        }

        // The per-identity state is the rule's `key`'s; a request without
        // it falls back to its user, or is refused (in shadow mode: would
        // be).
        let mut missing = None;
        let identity = if rule.per_identity.is_unlimited() {
            None
        } else {
            let key = match subject.key(rule.key) {
                Some((a, b)) => self.keys.key_of(rule.key, a, b),
                None => {
                    if rule.on_missing_key == OnMissingKey::Refuse {
                        let rej = missing_key_rejection(rule);
                        if rule.mode != Mode::Shadow {
                            return Decision::Rejected(rej);
                        }
                        missing = Some(Box::new(rej));
                    }
                    self.keys.key(subject.user)
                }
            };
            Some(rs.identity(key, now_ns, self.config.max_identities, || {
                self.pressure_sweep(now_ns)
            }))
        };
        let step = if two_step && rule.charges == Charges::Upstream {
            Step::Client
        } else {
            Step::All
        };
        // With a shared backend up, this step's aggregate limits are the
        // backend's to enforce (see `Limiter::set_global`): here they are
        // only counted.
        let how = How {
            step,
            local_aggregate: !self.global.load(Ordering::Relaxed),
        };
        let (mut held, quota, shadow) =
            match take_rule(rule, rs, identity.as_deref(), req, now_ns, stripe(), how) {
                // A deferred request that is not a watch took nothing, but
                // it is really open: it counts in the rule's gauges.
                Ok((held, quota)) if step == Step::Client && !req.is_watch() => {
                    (held | count_only(rs, req, stripe()), quota, None)
                }
                Ok((held, quota)) => (held, quota, None),
                // Everything was undone; the request is really open, so it
                // still counts in the rule's gauges (not in its limits).
                Err(rej) if rule.mode == Mode::Shadow => {
                    (count_only(rs, req, stripe()), None, Some(Box::new(rej)))
                }
                Err(rej) => return Decision::Rejected(rej),
            };
        // A deferred request takes its seat in the second step, if it ever
        // goes upstream.
        if seat_needed
            && step == Step::All
            && let Some(c) = caps
        {
            if !acquire_seat(&self.upstream.used, c.non_exempt()) {
                // A shadow would-be rejection already undid (and holds)
                // nothing; otherwise give back everything the rule took.
                if shadow.is_none() {
                    let again = Undo {
                        after_success: true,
                        local_aggregate: how.local_aggregate,
                    };
                    undo(rule, rs, identity.as_deref(), held, req, again, stripe());
                } else {
                    release_aggregate(rs, held, stripe());
                }
                return Decision::Rejected(
                    self.seat_rejection(Arc::clone(&rule.name), c.non_exempt()),
                );
            }
            held |= SEAT;
        }
        let pending = step == Step::Client;
        let identity = identity.filter(|_| pending || held & (ID_INFLIGHT | ID_WATCH) != 0);
        let flags = Flags {
            exempt: false,
            pending,
            index,
        };
        // A missing key is the first thing enforcing would have refused.
        let shadow = missing.or(shadow);
        Decision::Admitted(self.permit(Some(rs), identity, held, flags, quota, shadow))
    }

    fn permit(
        &self,
        rs: Option<&Arc<RuleState>>,
        identity: Option<Arc<IdentityState>>,
        held: u16,
        flags: Flags,
        quota: Option<Quota>,
        shadow: Option<Box<Rejection>>,
    ) -> Permit {
        Permit {
            rule: rs.map(Arc::clone),
            identity,
            // With a rule, the seat is released through the rule's Arc.
            upstream: (held & SEAT != 0 && rs.is_none()).then(|| Arc::clone(&self.upstream)),
            held,
            stripe: stripe(),
            exempt: flags.exempt,
            pending: flags.pending,
            index: flags.index,
            quota_epoch: 0,
            quota,
            shadow,
            attached: None,
        }
    }

    fn seat_rejection(&self, rule: Arc<str>, limit: u64) -> Rejection {
        Rejection::limited(
            rule,
            RejectReason::UpstreamSeats,
            limit,
            CONCURRENCY_RETRY_AFTER,
            Duration::ZERO,
        )
    }

    fn check_blocks(
        &self,
        subject: &Subject<'_>,
        req: &RequestAttrs<'_>,
        rule: Option<&Rule>,
    ) -> Option<Rejection> {
        let now = SystemTime::now();
        let blocks = self.blocks.read().unwrap_or_else(PoisonError::into_inner);
        let b = blocks.find(
            subject,
            req,
            rule.map(|r| r.name()),
            rule.is_some_and(|r| r.exempt),
            now,
        )?;
        Some(Rejection {
            rule: rule.map_or_else(|| Arc::clone(&self.no_rule), |r| Arc::clone(&r.name)),
            reason: RejectReason::Blocked,
            retry_after: blocks::remaining(b, now)
                .unwrap_or(BLOCK_RETRY_AFTER)
                .max(Duration::from_secs(1)),
            limit: 0,
            remaining: 0,
            window: Duration::ZERO,
            status: b.respond.code(),
            block_id: Some(Arc::from(b.id.as_str())),
        })
    }

    /// Called when the identity map is full: evicts every entry that can go
    /// (ignoring the idle period — such entries are indistinguishable from
    /// fresh ones), at most once per `pressure_sweep_interval`. Returns
    /// whether there is room now.
    fn pressure_sweep(&self, now_ns: u64) -> bool {
        let interval = self.config.pressure_sweep_interval.as_nanos() as u64;
        let last = self.last_pressure_sweep.load(Ordering::Relaxed);
        // The first sweep is always allowed; then one per interval, claimed
        // by CAS so concurrent callers do not all scan.
        if (last != 0 && now_ns < last.saturating_add(interval))
            || self
                .last_pressure_sweep
                .compare_exchange(last, now_ns.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return self.entries.load(Ordering::Relaxed) < self.config.max_identities;
        }
        let states: Vec<Arc<RuleState>> = self.read_snapshot().states.clone();
        for s in &states {
            s.evict(now_ns, 0);
        }
        self.entries.load(Ordering::Relaxed) < self.config.max_identities
    }

    /// Drops per-identity entries idle for `idle_after` (nothing held, full
    /// buckets). Call it periodically (e.g. every 30 s); returns how many.
    /// Scans the whole map, shard by shard.
    pub fn evict_idle(&self, now: Instant) -> usize {
        let now_ns = self.ns(now);
        let idle = self.config.idle_after.as_nanos() as u64;
        let states: Vec<Arc<RuleState>> = self.read_snapshot().states.clone();
        states.iter().map(|s| s.evict(now_ns, idle)).sum()
    }

    /// Hands the aggregate limits to a shared backend (`true`) or takes
    /// them back (`false`, the default). While handed over, the first
    /// admission step ([`Limiter::admit_client`], or [`Limiter::admit`])
    /// only counts what its aggregate limits would take, and the caller
    /// must ask the backend for [`Limiter::global_demand`] before letting
    /// the request go; the second step ([`Limiter::charge_upstream`]),
    /// which must decide without waiting, spends the rule's local quota
    /// the backend granted ahead of time ([`crate::quota`]). Taken back,
    /// every check is local again at once, against this replica's share
    /// and the counts it holds: the fallback when the backend is
    /// unreachable, which never admits more than the share.
    pub fn set_global(&self, on: bool) {
        self.global.store(on, Ordering::Relaxed);
    }

    /// Calls `hook` whenever the second step finds a rule's local quota
    /// empty, or empties it: a shared backend fills it then, off the
    /// request path. It must not block (a notification).
    pub fn set_quota_hook(&self, hook: Arc<dyn Fn() + Send + Sync>) {
        *self
            .quota_low
            .0
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(hook);
    }

    /// The rules whose second step a shared backend serves from local
    /// quotas (`charges: upstream` rules with an aggregate rate, in-flight
    /// or watch-open limit), with their limits for all replicas together
    /// and their quotas.
    pub fn upstream_quotas(&self) -> Vec<QuotaRule> {
        let snap = Arc::clone(&self.read_snapshot());
        snap.limits
            .rules
            .iter()
            .zip(&snap.states)
            .filter(|(r, _)| !r.exempt && r.charges == Charges::Upstream)
            .filter(|(r, _)| {
                r.global.rate.is_some()
                    || r.global.inflight.is_some()
                    || r.global.watch_opens.is_some()
            })
            .map(|(r, s)| QuotaRule {
                rule: Arc::clone(&r.name),
                rate: r.global.rate,
                watch_opens: r.global.watch_opens,
                inflight: r.global.inflight,
                quota: Arc::clone(&s.quota),
            })
            .collect()
    }

    /// Is a shared backend enforcing the aggregate limits?
    pub fn global_active(&self) -> bool {
        self.global.load(Ordering::Relaxed)
    }

    /// What the shared backend must take for a request the first step just
    /// admitted with `permit`: the parts of its rule's aggregate limits
    /// (undivided) that the step left to it. `None`: nothing (no rule, an
    /// exempt one, or no aggregate limits for this request). Also while
    /// the backend is not in charge: a slot taken then must still be
    /// registered with the backend when it returns.
    pub fn global_demand(&self, permit: &Permit, req: &RequestAttrs<'_>) -> Option<GlobalDemand> {
        if permit.exempt {
            return None;
        }
        let rs = permit.rule.as_ref()?;
        self.with_snapshot(|snap| {
            let at = usize::try_from(permit.index).unwrap_or(usize::MAX);
            let index = match snap.states.get(at) {
                Some(s) if Arc::ptr_eq(s, rs) => Some(at),
                _ => snap.states.iter().position(|s| Arc::ptr_eq(s, rs)),
            }?;
            let rule = &snap.limits.rules[index];
            let g = &rule.global;
            let watch = req.is_watch();
            // The first step of a deferred rule took only the watch slot.
            let all = !permit.pending;
            let d = GlobalDemand {
                rule: Arc::clone(&rule.name),
                shadow: rule.mode == Mode::Shadow,
                watches: g.watches.filter(|_| watch),
                inflight: g
                    .inflight
                    .filter(|_| all && !watch && !req.is_long_running()),
                rate: g.rate.filter(|_| all),
                watch_opens: g.watch_opens.filter(|_| all && watch),
            };
            (!d.is_empty()).then_some(d)
        })
    }

    /// The slots held in this replica that a shared backend counts, per
    /// rule: what [`Limiter::global_demand`] asks the backend for, counted
    /// (exactly) whether or not the backend is in charge. A backend taking
    /// over (a reload switched `backend`) registers these as the slots of
    /// requests admitted before it.
    pub fn global_held(&self) -> Vec<GlobalHeld> {
        let snap = Arc::clone(&self.read_snapshot());
        snap.limits
            .rules
            .iter()
            .zip(&snap.states)
            .filter(|(r, _)| !r.exempt)
            .filter_map(|(r, s)| {
                let g = &r.global;
                let held = GlobalHeld {
                    rule: Arc::clone(&r.name),
                    watches: g
                        .watches
                        .map(|cap| (cap, s.aggregate.watches.load(Ordering::Relaxed))),
                    // A `charges: upstream` rule takes its in-flight slot in
                    // the second step, from a local quota (the backend
                    // leased it for the pool, not for the request).
                    inflight: g
                        .inflight
                        .filter(|_| r.charges != Charges::Upstream)
                        .map(|cap| (cap, s.aggregate.inflight.load(Ordering::Relaxed))),
                };
                (held.watches.is_some() || held.inflight.is_some()).then_some(held)
            })
            .collect()
    }

    /// Per-identity entries in memory (all rules).
    pub fn identity_entries(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }

    /// Upstream seats in use.
    pub fn upstream_inflight(&self) -> u64 {
        self.upstream.used.load(Ordering::Relaxed)
    }

    /// Gauges per rule, in rule order.
    pub fn rule_stats(&self) -> Vec<RuleStats> {
        self.read_snapshot()
            .states
            .iter()
            .map(|s| RuleStats {
                rule: Arc::clone(&s.name),
                inflight: s.aggregate.inflight.load(Ordering::Relaxed)
                    + s.aggregate.inflight_striped.sum(),
                watches: s.aggregate.watches.load(Ordering::Relaxed)
                    + s.aggregate.watches_striped.sum(),
                identities: s.identities.len(),
            })
            .collect()
    }

    /// Adds a block, checked against the limits in force (see
    /// [`Blocks::add`]). Persisting is the caller's job ([`Limiter::blocks`]
    /// + [`Blocks::save`]).
    pub fn add_block(&self, block: Block) -> Result<ActiveBlock, BlockError> {
        let limits = self.limits();
        let mut b = self.blocks.write().unwrap_or_else(PoisonError::into_inner);
        let added = b.add(block, &limits)?.clone();
        self.has_blocks.store(true, Ordering::Relaxed);
        Ok(added)
    }

    /// Removes a block by id.
    pub fn remove_block(&self, id: &str) -> Option<Block> {
        let mut b = self.blocks.write().unwrap_or_else(PoisonError::into_inner);
        let gone = b.remove(id);
        self.has_blocks.store(!b.is_empty(), Ordering::Relaxed);
        gone
    }

    /// Removes lapsed blocks; returns them (persist if non-empty).
    pub fn expire_blocks(&self, now: SystemTime) -> Vec<Block> {
        let mut b = self.blocks.write().unwrap_or_else(PoisonError::into_inner);
        let gone = b.expire(now);
        self.has_blocks.store(!b.is_empty(), Ordering::Relaxed);
        gone
    }

    /// Replaces all blocks (e.g. with [`Blocks::load`] at startup).
    pub fn set_blocks(&self, blocks: Blocks) {
        let mut b = self.blocks.write().unwrap_or_else(PoisonError::into_inner);
        *b = blocks;
        self.has_blocks.store(!b.is_empty(), Ordering::Relaxed);
    }

    /// Reads the blocks in force without copying them; `f` is not called
    /// while there are none.
    pub fn with_blocks(&self, f: &mut dyn FnMut(&Blocks)) {
        if self.has_blocks.load(Ordering::Acquire) {
            f(&self.blocks.read().unwrap_or_else(PoisonError::into_inner));
        }
    }

    /// A copy of the blocks (list them, or `save` them).
    pub fn blocks(&self) -> Blocks {
        self.blocks
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A rule whose second admission step spends a local quota (see
/// [`Limiter::upstream_quotas`]).
#[derive(Debug, Clone)]
pub struct QuotaRule {
    /// The rule.
    pub rule: Arc<str>,
    /// Its aggregate rate for all replicas.
    pub rate: Option<RateLimit>,
    /// Its aggregate watch-open rate for all replicas.
    pub watch_opens: Option<RateLimit>,
    /// Its aggregate in-flight cap for all replicas.
    pub inflight: Option<u64>,
    /// The quota (shared with the limiter).
    pub quota: Arc<crate::quota::UpstreamQuota>,
}

/// A rule's slots a shared backend counts, held in this replica (see
/// [`Limiter::global_held`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalHeld {
    /// The rule.
    pub rule: Arc<str>,
    /// The rule's watch cap for all replicas, and the watches held here.
    pub watches: Option<(u64, u64)>,
    /// The same for in-flight requests.
    pub inflight: Option<(u64, u64)>,
}

/// What a shared backend must take for one request: its rule's aggregate
/// limits for all replicas together, the parts that apply (see
/// [`Limiter::global_demand`]).
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalDemand {
    /// The rule (the backend keys its state by name).
    pub rule: Arc<str>,
    /// The rule is in shadow mode: a refusal is only reported.
    pub shadow: bool,
    /// A watch slot under this cap.
    pub watches: Option<u64>,
    /// An in-flight slot under this cap.
    pub inflight: Option<u64>,
    /// A token of this bucket.
    pub rate: Option<RateLimit>,
    /// A watch-open token of this bucket.
    pub watch_opens: Option<RateLimit>,
}

impl GlobalDemand {
    /// Nothing to take.
    pub fn is_empty(&self) -> bool {
        self.watches.is_none()
            && self.inflight.is_none()
            && self.rate.is_none()
            && self.watch_opens.is_none()
    }

    /// The rejection for a refusal of the backend: `reason` is one of the
    /// aggregate reasons, `retry_after` the bucket's wait (counts: pass
    /// [`CONCURRENCY_RETRY_AFTER`]).
    pub fn rejection(&self, reason: RejectReason, retry_after: Duration) -> Rejection {
        let (limit, window) = match reason {
            RejectReason::AggregateWatches => (self.watches.unwrap_or(0), Duration::ZERO),
            RejectReason::AggregateInflight => (self.inflight.unwrap_or(0), Duration::ZERO),
            RejectReason::AggregateRate => self
                .rate
                .map_or((0, Duration::ZERO), |r| (r.burst, r.window())),
            RejectReason::AggregateWatchOpens => self
                .watch_opens
                .map_or((0, Duration::ZERO), |r| (r.burst, r.window())),
            _ => (0, Duration::ZERO),
        };
        Rejection::limited(Arc::clone(&self.rule), reason, limit, retry_after, window)
    }
}

/// The permit's flags besides what it holds.
#[derive(Debug, Clone, Copy, Default)]
struct Flags {
    exempt: bool,
    pending: bool,
    index: u32,
}

/// Which parts of a rule's limits an admission step takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Everything: one-step admission, or a rule that charges `all`.
    All,
    /// What every client request costs whoever answers it: the
    /// concurrent-watch slots.
    Client,
    /// What [`Step::Client`] left: in-flight slots, rates, watch opens.
    Upstream,
}

/// No limit at all: the aggregate a step enforces when a shared backend
/// enforces it instead (counts are still kept, for gauges and fallback).
const UNLIMITED: LimitValues = LimitValues {
    rate: None,
    inflight: None,
    watches: None,
    watch_opens: None,
};

/// How [`take_rule`] takes: which step, and whether the rule's aggregate
/// limits are enforced here.
#[derive(Debug, Clone, Copy)]
struct How {
    step: Step,
    local_aggregate: bool,
}

impl How {
    fn aggregate(self, rule: &Rule) -> &LimitValues {
        if self.local_aggregate {
            &rule.aggregate
        } else {
            &UNLIMITED
        }
    }
}

/// How [`undo`] gives back: after `take_rule` succeeded (every token this
/// request took is refunded), and whether aggregate tokens were taken here.
#[derive(Debug, Clone, Copy)]
struct Undo {
    after_success: bool,
    local_aggregate: bool,
}

/// Steps 4-5 of the module docs, the parts `step` names. On `Err`,
/// everything taken is undone.
#[inline]
fn take_rule(
    rule: &Rule,
    rs: &RuleState,
    identity: Option<&IdentityState>,
    req: &RequestAttrs<'_>,
    now_ns: u64,
    stripe: u8,
    how: How,
) -> Result<(u16, Option<Quota>), Rejection> {
    let pi = &rule.per_identity;
    let ag = how.aggregate(rule);
    let step = how.step;
    let watch = req.is_watch();
    let (client, upstream) = (step != Step::Upstream, step != Step::Client);
    let mut held = 0u16;
    let fail =
        |held: u16, reason: RejectReason, limit: u64, retry_after: Duration, window: Duration| {
            let again = Undo {
                after_success: false,
                local_aggregate: how.local_aggregate,
            };
            undo(rule, rs, identity, held, req, again, stripe);
            Rejection::limited(Arc::clone(&rule.name), reason, limit, retry_after, window)
        };
    let counter_fail = |held, reason, limit: Option<u64>| {
        fail(
            held,
            reason,
            limit.unwrap_or(0),
            CONCURRENCY_RETRY_AFTER,
            Duration::ZERO,
        )
    };

    // 4. Concurrency.
    if watch && client {
        if let Some(id) = identity {
            if !acquire(&id.watches, pi.watches) {
                return Err(counter_fail(held, RejectReason::Watches, pi.watches));
            }
            held |= ID_WATCH;
        }
        // The exact counter whenever the rule has a cap, even one a shared
        // backend enforces now: falling back checks it at once.
        if rule.aggregate.watches.is_none() {
            rs.aggregate.watches_striped.add(stripe);
            held |= AGG_WATCH_STRIPED;
        } else if acquire(&rs.aggregate.watches, ag.watches) {
            held |= AGG_WATCH;
        } else {
            return Err(counter_fail(
                held,
                RejectReason::AggregateWatches,
                ag.watches,
            ));
        }
    } else if !watch && !req.is_long_running() && upstream {
        if let Some(id) = identity {
            if !acquire(&id.inflight, pi.inflight) {
                return Err(counter_fail(held, RejectReason::Inflight, pi.inflight));
            }
            held |= ID_INFLIGHT;
        }
        if rule.aggregate.inflight.is_none() {
            rs.aggregate.inflight_striped.add(stripe);
            held |= AGG_INFLIGHT_STRIPED;
        } else if acquire(&rs.aggregate.inflight, ag.inflight) {
            held |= AGG_INFLIGHT;
        } else {
            return Err(counter_fail(
                held,
                RejectReason::AggregateInflight,
                ag.inflight,
            ));
        }
    }

    if !upstream {
        return Ok((held, None));
    }

    // 5. Rates. Bits above the slot bits record tokens taken, for undo.
    let rate_fail =
        |held, reason, lim: &RateLimit, wait| fail(held, reason, lim.burst, wait, lim.window());
    let mut quota = None;
    if let (Some(id), Some(lim)) = (identity, &pi.rate) {
        match id.rate.try_acquire(lim, now_ns) {
            Ok(remaining) => {
                quota = Some(Quota {
                    limit: lim.burst,
                    remaining,
                    window: lim.window(),
                });
                held |= TOK_ID_RATE;
            }
            Err(wait) => return Err(rate_fail(held, RejectReason::Rate, lim, wait)),
        }
    }
    if let Some(lim) = &ag.rate {
        match rs.aggregate.rate.try_acquire(lim, now_ns) {
            Ok(_) => held |= TOK_AGG_RATE,
            Err(wait) => return Err(rate_fail(held, RejectReason::AggregateRate, lim, wait)),
        }
    }
    if watch {
        if let (Some(id), Some(lim)) = (identity, &pi.watch_opens) {
            match id.watch_opens.try_acquire(lim, now_ns) {
                Ok(_) => held |= TOK_ID_WO,
                Err(wait) => return Err(rate_fail(held, RejectReason::WatchOpens, lim, wait)),
            }
        }
        if let Some(lim) = &ag.watch_opens
            && let Err(wait) = rs.aggregate.watch_opens.try_acquire(lim, now_ns)
        {
            return Err(rate_fail(
                held,
                RejectReason::AggregateWatchOpens,
                lim,
                wait,
            ));
        }
        // Last check: nothing after it can fail, so its bit is not needed.
    }
    // The permit keeps only the slot bits; tokens are spent for good.
    Ok((held & SLOT_BITS, quota))
}

/// The second step's aggregate limits from the rule's local quota (a
/// shared backend is in charge): an in-flight slot, a rate token, a
/// watch-open token, as the request needs. All or nothing; a refusal
/// names the limit whose quota ran out, and the backend is told
/// (`quota_low`) to fill it.
fn take_quota(
    rule: &Rule,
    rs: &RuleState,
    req: &RequestAttrs<'_>,
    quota_low: &QuotaHook,
) -> Result<Units, Rejection> {
    let g = &rule.global;
    let watch = req.is_watch();
    let wants = [
        (
            Unit::Inflight,
            g.inflight
                .filter(|_| !watch && !req.is_long_running())
                .is_some(),
            RejectReason::AggregateInflight,
        ),
        (Unit::Rate, g.rate.is_some(), RejectReason::AggregateRate),
        (
            Unit::WatchOpen,
            g.watch_opens.filter(|_| watch).is_some(),
            RejectReason::AggregateWatchOpens,
        ),
    ];
    let mut units = Units::default();
    for (unit, wanted, reason) in wants {
        if !wanted {
            continue;
        }
        if rs.quota.take(unit) {
            units.add(unit);
            if rs.quota.available(unit) == 0 {
                quota_low.notify();
            }
            continue;
        }
        units.give_back(&rs.quota, rs.quota.epoch());
        quota_low.notify();
        let (limit, retry_after, window) = match reason {
            RejectReason::AggregateRate => g
                .rate
                .map_or((0, CONCURRENCY_RETRY_AFTER, Duration::ZERO), |r| {
                    (r.burst, r.emission_interval(), r.window())
                }),
            RejectReason::AggregateWatchOpens => g
                .watch_opens
                .map_or((0, CONCURRENCY_RETRY_AFTER, Duration::ZERO), |r| {
                    (r.burst, r.emission_interval(), r.window())
                }),
            _ => (
                g.inflight.unwrap_or(0),
                CONCURRENCY_RETRY_AFTER,
                Duration::ZERO,
            ),
        };
        return Err(Rejection::limited(
            Arc::clone(&rule.name),
            reason,
            limit,
            retry_after,
            window,
        ));
    }
    Ok(units)
}

/// The quota units one charge took (a set of [`Unit`]s, without an
/// allocation).
#[derive(Debug, Clone, Copy, Default)]
struct Units(u8);

impl Units {
    const ALL: [Unit; 3] = [Unit::Inflight, Unit::Rate, Unit::WatchOpen];

    fn bit(unit: Unit) -> u8 {
        match unit {
            Unit::Inflight => 1,
            Unit::Rate => 2,
            Unit::WatchOpen => 4,
        }
    }

    fn add(&mut self, unit: Unit) {
        self.0 |= Units::bit(unit);
    }

    fn has(self, unit: Unit) -> bool {
        self.0 & Units::bit(unit) != 0
    }

    fn give_back(self, quota: &crate::quota::UpstreamQuota, epoch: u32) {
        for unit in Units::ALL {
            if self.has(unit) {
                quota.give_back(unit, epoch);
            }
        }
    }
}

/// Tells a shared backend that a local quota ran low or out (see
/// [`Limiter::set_quota_hook`]).
#[derive(Default)]
struct QuotaHook(RwLock<Option<Arc<dyn Fn() + Send + Sync>>>);

impl QuotaHook {
    fn notify(&self) {
        let hook = self
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(hook) = hook {
            hook();
        }
    }
}

// Token bits, only used between take_rule's steps and undo.
const TOK_ID_RATE: u16 = 256;
const TOK_AGG_RATE: u16 = 512;
const TOK_ID_WO: u16 = 1024;

/// Undoes what `held` records. `after_success`: called after `take_rule`
/// succeeded (the upstream seat failed), when token bits were already
/// stripped — then every token this request took is refunded from `req`.
fn undo(
    rule: &Rule,
    rs: &RuleState,
    identity: Option<&IdentityState>,
    held: u16,
    req: &RequestAttrs<'_>,
    how: Undo,
    stripe: u8,
) {
    let pi = &rule.per_identity;
    let ag = if how.local_aggregate {
        &rule.aggregate
    } else {
        &UNLIMITED
    };
    let after_success = how.after_success;
    if let Some(id) = identity {
        if held & ID_INFLIGHT != 0 {
            release(&id.inflight);
        }
        if held & ID_WATCH != 0 {
            release(&id.watches);
        }
    }
    release_aggregate(rs, held, stripe);
    let took = |bit: u16| after_success || held & bit != 0;
    if let Some(id) = identity {
        if let Some(lim) = &pi.rate
            && took(TOK_ID_RATE)
        {
            id.rate.refund(lim);
        }
        if req.is_watch()
            && let Some(lim) = &pi.watch_opens
            && took(TOK_ID_WO)
        {
            id.watch_opens.refund(lim);
        }
    }
    if let Some(lim) = &ag.rate
        && took(TOK_AGG_RATE)
    {
        rs.aggregate.rate.refund(lim);
    }
    if after_success
        && req.is_watch()
        && let Some(lim) = &ag.watch_opens
    {
        rs.aggregate.watch_opens.refund(lim);
    }
}

/// Releases the aggregate slots recorded in `held`.
#[inline]
fn release_aggregate(rs: &RuleState, held: u16, stripe: u8) {
    if held & AGG_INFLIGHT != 0 {
        release(&rs.aggregate.inflight);
    }
    if held & AGG_WATCH != 0 {
        release(&rs.aggregate.watches);
    }
    if held & AGG_INFLIGHT_STRIPED != 0 {
        rs.aggregate.inflight_striped.sub(stripe);
    }
    if held & AGG_WATCH_STRIPED != 0 {
        rs.aggregate.watches_striped.sub(stripe);
    }
}

/// The refusal of a request without its rule's `key`: 403, since the same
/// credentials will never carry it (a retry cannot help).
fn missing_key_rejection(rule: &Rule) -> Rejection {
    Rejection {
        rule: Arc::clone(&rule.name),
        reason: RejectReason::MissingKey(rule.key),
        retry_after: CONCURRENCY_RETRY_AFTER,
        limit: 0,
        remaining: 0,
        window: Duration::ZERO,
        status: 403,
        block_id: None,
    }
}

/// Counts an admitted request that takes no limited slot (exempt, or a
/// shadow would-be rejection) in the rule's striped gauges.
#[inline]
fn count_only(rs: &RuleState, req: &RequestAttrs<'_>, stripe: u8) -> u16 {
    if req.is_watch() {
        rs.aggregate.watches_striped.add(stripe);
        AGG_WATCH_STRIPED
    } else if !req.is_long_running() {
        rs.aggregate.inflight_striped.add(stripe);
        AGG_INFLIGHT_STRIPED
    } else {
        0
    }
}
