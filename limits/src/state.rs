//! The limiter's mutable state: counters and buckets per rule (aggregate)
//! and per (rule, identity), and the upstream seat counter.
//!
//! Per-identity state lives in one bounded `DashMap` per rule, keyed by an
//! [`IdentityKey`], with a global entry count shared by all rules. An entry is only
//! ever removed when nothing refers to it but the map (`Arc::strong_count ==
//! 1`: no permit holds it, no admission is reading it — admissions clone
//! the `Arc` under the shard lock, and removal runs under the same shard's
//! write lock) and both its buckets are full. Such an entry is
//! indistinguishable from a fresh one, so eviction never hands out extra
//! tokens or forgets a held slot.

use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;

use crate::bucket::Gcra;

/// The map key of an identity: a 128-bit keyed hash (SipHash under two
/// random per-process keys) of the user name. Profiling showed the string
/// key's heap allocation to be a cache miss of its own on every lookup
/// among 100,000 identities; a hash stored in the table avoids it and the
/// allocation for new identities. Collisions are practically impossible
/// (about 1e-27 for a million names) and cannot be aimed at without the
/// random keys.
pub(crate) type IdentityKey = u128;

/// Computes [`IdentityKey`]s.
#[derive(Debug, Default)]
pub(crate) struct KeyHasher {
    a: RandomState,
    b: RandomState,
}

impl KeyHasher {
    #[inline]
    pub(crate) fn key(&self, user: &str) -> IdentityKey {
        (u128::from(self.a.hash_one(user)) << 64) | u128::from(self.b.hash_one(user))
    }

    /// The key of a rule's `key` other than the user: the kind goes into
    /// the hash, so a node named like a user never shares its state (one
    /// rule's map holds both when requests without the key fall back to
    /// their user).
    #[inline]
    pub(crate) fn key_of(&self, kind: crate::Key, a: &str, b: &str) -> IdentityKey {
        if kind == crate::Key::User {
            return self.key(a);
        }
        let v = (kind as u8, a, b);
        (u128::from(self.a.hash_one(v)) << 64) | u128::from(self.b.hash_one(v))
    }
}

/// The map's hasher: the key already is a uniform hash, so take 64 bits of
/// it instead of hashing it again.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PassThrough;

impl BuildHasher for PassThrough {
    type Hasher = PassThroughHasher;
    fn build_hasher(&self) -> PassThroughHasher {
        PassThroughHasher(0)
    }
}

#[derive(Debug)]
pub(crate) struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u128 keys are hashed here; fold anything else (unused).
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = (v as u64) ^ ((v >> 64) as u64);
    }
}

/// Counters and buckets of one identity under one rule.
#[derive(Debug, Default)]
pub(crate) struct IdentityState {
    pub(crate) inflight: AtomicU64,
    pub(crate) watches: AtomicU64,
    pub(crate) rate: Gcra,
    pub(crate) watch_opens: Gcra,
    /// Last admission, ns since the limiter's epoch (idle eviction).
    pub(crate) last_seen: AtomicU64,
}

impl IdentityState {
    /// Can this entry be dropped without changing any decision?
    /// `idle_ns`: how long it must have been unused (0 under memory pressure).
    fn evictable(this: &Arc<IdentityState>, now_ns: u64, idle_ns: u64) -> bool {
        Arc::strong_count(this) == 1
            && this.inflight.load(Ordering::Relaxed) == 0
            && this.watches.load(Ordering::Relaxed) == 0
            && this.rate.is_full(now_ns)
            && this.watch_opens.is_full(now_ns)
            && this
                .last_seen
                .load(Ordering::Relaxed)
                .saturating_add(idle_ns)
                <= now_ns
    }
}

/// Aggregate counters and buckets of one rule (all identities together).
///
/// In-flight and watch counts are kept even without a limit, so they can be
/// exported as gauges. With a limit they must be one exact atomic; without
/// one they go to a [`Striped`] counter instead, so that two cores admitting
/// requests of the same rule do not bounce one cache line between them.
#[derive(Debug, Default)]
pub(crate) struct AggregateState {
    pub(crate) inflight: AtomicU64,
    pub(crate) watches: AtomicU64,
    pub(crate) inflight_striped: Striped,
    pub(crate) watches_striped: Striped,
    pub(crate) rate: Gcra,
    pub(crate) watch_opens: Gcra,
}

/// Number of cells of a [`Striped`] counter.
const STRIPES: usize = 16;

/// One cache line per cell (128 bytes covers adjacent-line prefetching).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Cell(AtomicU64);

/// A counter split over cache-line-sized cells, one chosen per thread. A
/// unit is always given back to the cell it was taken from (the permit
/// remembers the cell), so every cell stays non-negative and the sum is
/// exact whenever it is read.
#[derive(Debug, Default)]
pub(crate) struct Striped {
    cells: [Cell; STRIPES],
}

impl Striped {
    pub(crate) fn add(&self, cell: u8) {
        self.cells[usize::from(cell) % STRIPES]
            .0
            .fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn sub(&self, cell: u8) {
        self.cells[usize::from(cell) % STRIPES]
            .0
            .fetch_sub(1, Ordering::Relaxed);
    }
    pub(crate) fn sum(&self) -> u64 {
        self.cells.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
    }
}

/// This thread's cell in every [`Striped`] counter.
pub(crate) fn stripe() -> u8 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: u8 = (NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES) as u8;
    }
    STRIPE.with(|s| *s)
}

/// All state of one rule. Shared (`Arc`) between the current snapshot, the
/// next one after a reload that keeps the rule, and live permits.
#[derive(Debug)]
pub(crate) struct RuleState {
    pub(crate) name: Arc<str>,
    pub(crate) aggregate: AggregateState,
    pub(crate) identities: DashMap<IdentityKey, Arc<IdentityState>, PassThrough>,
    /// Shared by identities that found the map full with nothing evictable:
    /// they are limited together as if they were one identity (strict but
    /// bounded; aggregate limits apply as usual).
    pub(crate) overflow: Arc<IdentityState>,
    /// Entries of all rules' maps together (the cap is global).
    entries: Arc<AtomicUsize>,
    /// The limiter's seat counter, reached through the rule so a permit
    /// needs one `Arc` (fewer shared reference counts to bump).
    pub(crate) upstream: Arc<UpstreamState>,
    /// What a shared backend granted ahead of time for the rule's second
    /// admission step (see [`crate::quota`]).
    pub(crate) quota: Arc<crate::quota::UpstreamQuota>,
}

impl RuleState {
    pub(crate) fn new(
        name: Arc<str>,
        entries: Arc<AtomicUsize>,
        upstream: Arc<UpstreamState>,
    ) -> RuleState {
        RuleState {
            name,
            aggregate: AggregateState::default(),
            // More shards than dashmap's default (4 x cores) so that
            // concurrent admissions rarely share a shard lock's cache line.
            identities: DashMap::with_hasher_and_shard_amount(PassThrough, 64),
            overflow: Arc::default(),
            entries,
            upstream,
            quota: Arc::default(),
        }
    }

    /// Refills every bucket of the rule (its limits changed on reload);
    /// counters are kept because they count requests that are really open.
    pub(crate) fn reset_buckets(&self) {
        self.aggregate.rate.reset();
        self.aggregate.watch_opens.reset();
        self.overflow.rate.reset();
        self.overflow.watch_opens.reset();
        for e in self.identities.iter() {
            e.value().rate.reset();
            e.value().watch_opens.reset();
        }
    }

    /// The identity's state, creating it if there is room.
    /// `full` is called (without any map reference held) when the global
    /// cap is reached; it may evict, and returns whether there is room now.
    #[inline]
    pub(crate) fn identity(
        &self,
        key: IdentityKey,
        now_ns: u64,
        cap: usize,
        full: impl FnOnce() -> bool,
    ) -> Arc<IdentityState> {
        // Fast path: a known identity costs a shard read lock and a probe.
        if let Some(e) = self.identities.get(&key) {
            let s = Arc::clone(e.value());
            drop(e);
            s.last_seen.store(now_ns, Ordering::Relaxed);
            return s;
        }
        // The check and the insert are not one atomic step, so concurrent
        // first sightings may overshoot the cap by at most the number of
        // admitting threads.
        if self.entries.load(Ordering::Relaxed) >= cap && !full() {
            return Arc::clone(&self.overflow);
        }
        let s = match self.identities.entry(key) {
            dashmap::Entry::Occupied(o) => Arc::clone(o.get()),
            dashmap::Entry::Vacant(v) => {
                self.entries.fetch_add(1, Ordering::Relaxed);
                Arc::clone(v.insert(Arc::default()).value())
            }
        };
        s.last_seen.store(now_ns, Ordering::Relaxed);
        s
    }

    /// Drops evictable entries; returns how many.
    pub(crate) fn evict(&self, now_ns: u64, idle_ns: u64) -> usize {
        let mut removed = 0usize;
        self.identities.retain(|_, v| {
            let drop_it = IdentityState::evictable(v, now_ns, idle_ns);
            removed += usize::from(drop_it);
            !drop_it
        });
        self.entries.fetch_sub(removed, Ordering::Relaxed);
        removed
    }
}

impl Drop for RuleState {
    fn drop(&mut self) {
        // The rule left the limits and its last permit is gone: its entries
        // no longer count against the global cap.
        self.entries
            .fetch_sub(self.identities.len(), Ordering::Relaxed);
    }
}

/// Seats towards the apiserver in use (kept across reloads: the requests
/// holding them are real).
#[derive(Debug, Default)]
pub(crate) struct UpstreamState {
    pub(crate) used: AtomicU64,
}

/// Takes one unit of `counter` if it stays within `limit`. A CAS loop rather
/// than add-then-undo, so a request at the limit never makes a concurrent
/// one fail spuriously. Relaxed: the counter guards no other memory.
#[inline]
pub(crate) fn acquire(counter: &AtomicU64, limit: Option<u64>) -> bool {
    match limit {
        None => {
            counter.fetch_add(1, Ordering::Relaxed);
            true
        }
        Some(limit) => counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                (c < limit).then_some(c + 1)
            })
            .is_ok(),
    }
}

/// Takes one upstream seat if fewer than `limit` are in use. Unlike
/// [`acquire`] this is add-then-undo: one locked add instead of a CAS loop
/// that two cores admitting at once keep failing (measured: ~300 ns per
/// decision on 2 threads with the CAS loop). The price: while a request
/// over the cap is undoing its add, a concurrent one may see the counter
/// one too high and be rejected although a seat was free — only at the
/// cap, where a 429 with a 1 s retry is the expected answer anyway. The
/// count never exceeds `limit` plus the number of threads mid-undo, and
/// an admitted request always had a seat.
#[inline]
pub(crate) fn acquire_seat(counter: &AtomicU64, limit: u64) -> bool {
    if counter.fetch_add(1, Ordering::Relaxed) < limit {
        true
    } else {
        counter.fetch_sub(1, Ordering::Relaxed);
        false
    }
}

/// Gives back one unit taken by [`acquire`].
#[inline]
pub(crate) fn release(counter: &AtomicU64) {
    counter.fetch_sub(1, Ordering::Relaxed);
}
