//! A fixed-size table of the heaviest keys: space-saving (Metwally et al.,
//! 2005) with decay, sharded.
//!
//! Memory is allocated once: `shards × per_shard` slots, whatever the
//! number of distinct keys seen. A key that is not in the table takes the
//! slot with the lowest score and inherits that score (+1) as its possible
//! overcount, which is what keeps a heavy key from being pushed out by a
//! flood of light ones: a newcomer starts at the minimum, and only a key
//! that keeps arriving climbs past the heavy ones. Scores decay by an
//! eighth each tick (once a second), so "heavy" means heavy *now*.
//!
//! Slots with requests or watches open are never taken over: their gauges
//! must come back down when those requests end (the [`Ticket`] points at
//! the slot). If every slot of a shard is busy, a new key is not tracked
//! and counts in the table's "others" row instead; no count is lost.
//!
//! Why sharded mutexes and not atomics: an update touches five fields of
//! one slot plus the shard's minimum search, and a lock-free space-saving
//! needs a CAS loop over the minimum that is both harder to get right and
//! slower on two cores. A request takes its shard's lock twice (arrival and
//! end) for a few dozen nanoseconds: the hash of the name is the biggest
//! cost. Nothing is allocated per request: a slot keeps a clone of the
//! caller's `Arc` key, taken only when the key enters the table.

use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::Instant;

/// What a table key shows as its name.
pub trait Key: Clone + Send + Sync + 'static {
    fn name(&self) -> &str;
}

impl Key for std::sync::Arc<str> {
    fn name(&self) -> &str {
        self
    }
}

impl Key for std::sync::Arc<crate::identity::Identity> {
    fn name(&self) -> &str {
        &self.username
    }
}

/// Monotonic counts of one key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: u64,
    pub watch_opens: u64,
    /// Answered 429.
    pub throttled: u64,
    /// Answered 403.
    pub forbidden: u64,
}

impl Counts {
    fn minus(self, earlier: Counts) -> Counts {
        Counts {
            requests: self.requests.saturating_sub(earlier.requests),
            watch_opens: self.watch_opens.saturating_sub(earlier.watch_opens),
            throttled: self.throttled.saturating_sub(earlier.throttled),
            forbidden: self.forbidden.saturating_sub(earlier.forbidden),
        }
    }

    fn add(&mut self, other: Counts) {
        self.requests += other.requests;
        self.watch_opens += other.watch_opens;
        self.throttled += other.throttled;
        self.forbidden += other.forbidden;
    }
}

/// How many ticks of history a slot keeps for its rates.
pub const RATE_TICKS: usize = 5;

/// One row of the table, as read.
#[derive(Debug, Clone, PartialEq)]
pub struct Row<K> {
    pub key: K,
    /// Requests (not watches) open now.
    pub inflight: u64,
    /// Watches open now.
    pub watches: u64,
    /// Since the key entered the table.
    pub totals: Counts,
    /// Over the last few seconds, per second.
    pub rates: Rates,
    /// The most the key's score may be overstated by (space-saving's error).
    pub error: u64,
    /// The key's last rule (identities), if any.
    pub rule: Option<std::sync::Arc<str>>,
}

/// Per-second rates.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    pub requests: f64,
    pub watch_opens: f64,
    pub throttled: f64,
    pub forbidden: f64,
}

impl Rates {
    fn of(delta: Counts, secs: f64) -> Rates {
        if secs <= 0.0 {
            return Rates::default();
        }
        Rates {
            requests: delta.requests as f64 / secs,
            watch_opens: delta.watch_opens as f64 / secs,
            throttled: delta.throttled as f64 / secs,
            forbidden: delta.forbidden as f64 / secs,
        }
    }
}

struct Slot<K> {
    key: Option<K>,
    /// Bumped when the slot changes hands.
    generation: u32,
    inflight: u64,
    watches: u64,
    totals: Counts,
    /// `totals` at each of the last ticks (a ring indexed by the tick).
    history: [Counts; RATE_TICKS],
    score: u64,
    error: u64,
    rule: Option<std::sync::Arc<str>>,
}

impl<K> Slot<K> {
    fn empty() -> Slot<K> {
        Slot {
            key: None,
            generation: 0,
            inflight: 0,
            watches: 0,
            totals: Counts::default(),
            history: [Counts::default(); RATE_TICKS],
            score: 0,
            error: 0,
            rule: None,
        }
    }

    fn busy(&self) -> bool {
        self.inflight > 0 || self.watches > 0
    }
}

struct Shard<K> {
    /// The hashes of the slots' keys, scanned first (a few cache lines, not
    /// the slots themselves); 0 = empty.
    hashes: Box<[u64]>,
    slots: Box<[Slot<K>]>,
}

/// The "others" row: keys that found every slot of their shard busy.
#[derive(Default)]
struct Others {
    inflight: u64,
    watches: u64,
    totals: Counts,
    history: [Counts; RATE_TICKS],
}

/// Where a request's counts went, to take its gauges back when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    shard: u16,
    /// `u16::MAX`: the others row.
    slot: u16,
    generation: u32,
}

/// What one arrival is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// A request that is not a watch (counts in flight until it ends).
    Request,
    /// A watch (counts as open until it ends).
    Watch,
}

/// The fixed-size table.
pub struct Table<K> {
    shards: Box<[Mutex<Shard<K>>]>,
    others: Mutex<Others>,
    hasher: std::hash::RandomState,
    ticks: Mutex<TickClock>,
}

/// When each of the last ticks happened (for rates).
struct TickClock {
    index: usize,
    at: [Option<Instant>; RATE_TICKS],
    started: Instant,
}

impl<K: Key> Table<K> {
    /// `shards × per_shard` slots, all allocated now (`per_shard` ≥ 1).
    pub fn new(shards: usize, per_shard: usize) -> Table<K> {
        let shards = shards.clamp(1, u16::MAX as usize);
        let per_shard = per_shard.clamp(1, u16::MAX as usize - 1);
        Table {
            shards: (0..shards)
                .map(|_| {
                    Mutex::new(Shard {
                        hashes: vec![0; per_shard].into_boxed_slice(),
                        slots: (0..per_shard).map(|_| Slot::empty()).collect(),
                    })
                })
                .collect(),
            others: Mutex::new(Others::default()),
            hasher: std::hash::RandomState::new(),
            ticks: Mutex::new(TickClock {
                index: 0,
                at: [None; RATE_TICKS],
                started: Instant::now(),
            }),
        }
    }

    /// How many keys it can hold.
    pub fn capacity(&self) -> usize {
        self.shards.len() * self.per_shard()
    }

    fn per_shard(&self) -> usize {
        self.shards
            .first()
            .map(|s| lock(s).slots.len())
            .unwrap_or(0)
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| lock(s).slots.iter().filter(|s| s.key.is_some()).count())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes the table holds, keys' own memory aside (each slot holds
    /// one `Arc` to a key that exists anyway while its request runs).
    pub fn footprint(&self) -> usize {
        let per_slot = std::mem::size_of::<Slot<K>>() + std::mem::size_of::<u64>();
        std::mem::size_of::<Self>()
            + self.shards.len() * std::mem::size_of::<Mutex<Shard<K>>>()
            + self.capacity() * per_slot
    }

    fn hash(&self, name: &str) -> u64 {
        // 0 marks an empty slot.
        self.hasher.hash_one(name).max(1)
    }

    /// Counts an arrival of `name` (its key made by `key` if it enters the
    /// table). Returns where it went, for [`Table::end`].
    pub fn arrive(&self, name: &str, key: impl FnOnce() -> K, what: Arrival) -> Entry {
        let hash = self.hash(name);
        let shard_index = (hash % self.shards.len() as u64) as usize;
        let mut shard = lock(&self.shards[shard_index]);
        let Shard { hashes, slots } = &mut *shard;
        let found = hashes.iter().enumerate().position(|(i, &h)| {
            h == hash && slots[i].key.as_ref().is_some_and(|k| k.name() == name)
        });
        let index = match found {
            Some(i) => Some(i),
            None => Self::take_over(hashes, slots, hash, key),
        };
        let Some(i) = index else {
            drop(shard);
            let mut others = lock(&self.others);
            let o = &mut *others;
            count(&mut o.totals, &mut o.inflight, &mut o.watches, what);
            return Entry {
                shard: shard_index as u16,
                slot: u16::MAX,
                generation: 0,
            };
        };
        let slot = &mut slots[i];
        slot.score += 1;
        count(
            &mut slot.totals,
            &mut slot.inflight,
            &mut slot.watches,
            what,
        );
        Entry {
            shard: shard_index as u16,
            slot: i as u16,
            generation: slot.generation,
        }
    }

    /// The empty slot, or the idle one with the lowest score (its score,
    /// +1 on arrival, is inherited as the newcomer's possible overcount).
    fn take_over(
        hashes: &mut [u64],
        slots: &mut [Slot<K>],
        hash: u64,
        key: impl FnOnce() -> K,
    ) -> Option<usize> {
        let victim = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.busy())
            .min_by_key(|(_, s)| if s.key.is_none() { 0 } else { s.score + 1 })
            .map(|(i, _)| i)?;
        let slot = &mut slots[victim];
        let inherited = if slot.key.is_some() { slot.score } else { 0 };
        *slot = Slot {
            key: Some(key()),
            generation: slot.generation.wrapping_add(1),
            score: inherited,
            error: inherited,
            ..Slot::empty()
        };
        hashes[victim] = hash;
        Some(victim)
    }

    /// Sets the key's last rule (only while its entry is current).
    pub fn set_rule(&self, entry: Entry, rule: &std::sync::Arc<str>) {
        self.with(entry, |slot| {
            if slot.rule.as_deref() != Some(&**rule) {
                slot.rule = Some(std::sync::Arc::clone(rule));
            }
        });
    }

    /// The request of `entry` ended with HTTP `status`.
    pub fn end(&self, entry: Entry, what: Arrival, status: u16) {
        if entry.slot == u16::MAX {
            let mut others = lock(&self.others);
            let o = &mut *others;
            finish(&mut o.totals, &mut o.inflight, &mut o.watches, what, status);
            return;
        }
        self.with(entry, |slot| {
            finish(
                &mut slot.totals,
                &mut slot.inflight,
                &mut slot.watches,
                what,
                status,
            );
        });
    }

    fn with(&self, entry: Entry, f: impl FnOnce(&mut Slot<K>)) {
        let Some(shard) = self.shards.get(entry.shard as usize) else {
            return;
        };
        let mut shard = lock(shard);
        if let Some(slot) = shard.slots.get_mut(entry.slot as usize)
            && slot.generation == entry.generation
            && slot.key.is_some()
        {
            f(slot);
        }
    }

    /// Once a second: rates' history moves on, scores decay.
    pub fn tick(&self, now: Instant) {
        let index = {
            let mut clock = lock(&self.ticks);
            clock.index = (clock.index + 1) % RATE_TICKS;
            let i = clock.index;
            clock.at[i] = Some(now);
            i
        };
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            for slot in shard.slots.iter_mut().filter(|s| s.key.is_some()) {
                slot.history[index] = slot.totals;
                slot.score -= slot.score / 8;
                slot.error -= slot.error / 8;
            }
        }
        let mut others = lock(&self.others);
        others.history[index] = others.totals;
    }

    /// Every key held, and the others row, with rates over the last
    /// [`RATE_TICKS`] ticks (or since the table started).
    pub fn rows(&self, now: Instant) -> (Vec<Row<K>>, Row<()>) {
        let (oldest, since) = {
            let clock = lock(&self.ticks);
            let oldest = (clock.index + 1) % RATE_TICKS;
            match clock.at[oldest] {
                Some(at) => (Some(oldest), at),
                None => (None, clock.started),
            }
        };
        let secs = now.saturating_duration_since(since).as_secs_f64();
        let base = |history: &[Counts; RATE_TICKS]| match oldest {
            Some(i) => history[i],
            None => Counts::default(),
        };
        let mut rows = Vec::new();
        for shard in self.shards.iter() {
            let shard = lock(shard);
            for slot in shard.slots.iter() {
                let Some(key) = &slot.key else { continue };
                rows.push(Row {
                    key: key.clone(),
                    inflight: slot.inflight,
                    watches: slot.watches,
                    totals: slot.totals,
                    rates: Rates::of(slot.totals.minus(base(&slot.history)), secs),
                    error: slot.error,
                    rule: slot.rule.clone(),
                });
            }
        }
        let others = lock(&self.others);
        let others = Row {
            key: (),
            inflight: others.inflight,
            watches: others.watches,
            totals: others.totals,
            rates: Rates::of(others.totals.minus(base(&others.history)), secs),
            error: 0,
            rule: None,
        };
        (rows, others)
    }

    /// The totals of every key held plus the others row: what the table
    /// has counted and still shows.
    pub fn shown_totals(&self) -> Counts {
        let mut sum = Counts::default();
        for shard in self.shards.iter() {
            for slot in lock(shard).slots.iter() {
                sum.add(slot.totals);
            }
        }
        sum.add(lock(&self.others).totals);
        sum
    }
}

fn count(totals: &mut Counts, inflight: &mut u64, watches: &mut u64, what: Arrival) {
    totals.requests += 1;
    match what {
        Arrival::Request => *inflight += 1,
        Arrival::Watch => {
            totals.watch_opens += 1;
            *watches += 1;
        }
    }
}

fn finish(totals: &mut Counts, inflight: &mut u64, watches: &mut u64, what: Arrival, status: u16) {
    match what {
        Arrival::Request => *inflight = inflight.saturating_sub(1),
        Arrival::Watch => *watches = watches.saturating_sub(1),
    }
    match status {
        429 => totals.throttled += 1,
        403 => totals.forbidden += 1,
        _ => {}
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Counters only: a panic elsewhere cannot leave them unusable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
