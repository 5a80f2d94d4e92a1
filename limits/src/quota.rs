//! Local quotas of global limits: units of a rule's aggregate limits that a
//! shared backend granted this replica ahead of time, spent without asking
//! it.
//!
//! The second admission step of a `charges: upstream` rule
//! ([`crate::Limiter::charge_upstream`]) runs where nothing may wait for a
//! network round trip (inside the watch hub). With a shared backend in
//! charge it spends these units instead: a rate or watch-open token, or a
//! free in-flight slot. The backend keeps them topped up in the
//! background (a small batch of tokens taken from its bucket, a block of
//! in-flight leases), takes back what sits unused, and resets them when it
//! steps down. Every unit spent here was taken from the global limit
//! first, so a quota never lets the fleet past it; what it costs is slack:
//! units one replica holds unspent that another could have used.
//!
//! Pure bookkeeping (atomics, no I/O): the backend decides the sizes.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// One rule's local quota. Shared (`Arc`) by the limiter, which spends it,
/// and the backend, which fills it.
#[derive(Debug, Default)]
pub struct UpstreamQuota {
    /// Rate tokens granted and not spent.
    rate: AtomicU64,
    /// Watch-open tokens granted and not spent.
    watch_opens: AtomicU64,
    /// In-flight slots granted (leased in the backend) and not in use.
    inflight_free: AtomicU64,
    /// Bumped by [`UpstreamQuota::reset`]: a slot taken before goes back
    /// to no pool when its request ends.
    epoch: AtomicU32,
    /// Units spent, ever (the backend sees demand, or its absence).
    spent: AtomicU64,
    /// Units asked for and missing, ever (the backend fills on demand).
    misses: AtomicU64,
}

/// What a [`UpstreamQuota`] is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// A rate token.
    Rate,
    /// A watch-open token.
    WatchOpen,
    /// An in-flight slot (given back when the request ends).
    Inflight,
}

impl UpstreamQuota {
    fn counter(&self, unit: Unit) -> &AtomicU64 {
        match unit {
            Unit::Rate => &self.rate,
            Unit::WatchOpen => &self.watch_opens,
            Unit::Inflight => &self.inflight_free,
        }
    }

    /// Takes one unit; `false` (and a miss counted) when none is left.
    pub(crate) fn take(&self, unit: Unit) -> bool {
        let c = self.counter(unit);
        // A CAS loop rather than fetch_sub: the count must never wrap
        // below zero, even for an instant another thread could see.
        let taken = c
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if taken {
            self.spent.fetch_add(1, Ordering::Relaxed);
        } else {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    /// Gives a unit back: one taken by a request that was then refused,
    /// or the in-flight slot of a request that ended, if the quota was not
    /// reset since it was taken (`epoch`).
    pub(crate) fn give_back(&self, unit: Unit, epoch: u32) {
        if self.epoch.load(Ordering::Acquire) == epoch {
            self.counter(unit).fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The epoch a taken unit belongs to.
    pub(crate) fn epoch(&self) -> u32 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Adds `n` units the backend granted.
    pub fn grant(&self, unit: Unit, n: u64) {
        self.counter(unit).fetch_add(n, Ordering::AcqRel);
    }

    /// Takes back up to `max` unspent units (to return them to the
    /// backend); returns how many.
    pub fn take_back(&self, unit: Unit, max: u64) -> u64 {
        let c = self.counter(unit);
        match c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            Some(n - n.min(max))
        }) {
            Ok(before) => before.min(max),
            Err(_) => 0,
        }
    }

    /// Unspent units now.
    pub fn available(&self, unit: Unit) -> u64 {
        self.counter(unit).load(Ordering::Acquire)
    }

    /// Units spent so far (all kinds).
    pub fn spent(&self) -> u64 {
        self.spent.load(Ordering::Relaxed)
    }

    /// Units asked for and missing so far (all kinds).
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Forgets every unit (the backend stepped down or failed): in-flight
    /// slots in use then are given back to no pool when their requests
    /// end. Returns the unspent tokens `(rate, watch opens)` dropped.
    pub fn reset(&self) -> (u64, u64) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.inflight_free.store(0, Ordering::Release);
        (
            self.rate.swap(0, Ordering::AcqRel),
            self.watch_opens.swap(0, Ordering::AcqRel),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quota_never_goes_below_zero_and_counts_its_misses() {
        let q = UpstreamQuota::default();
        assert!(!q.take(Unit::Rate));
        q.grant(Unit::Rate, 2);
        assert!(q.take(Unit::Rate) && q.take(Unit::Rate));
        assert!(!q.take(Unit::Rate));
        assert_eq!((q.spent(), q.misses(), q.available(Unit::Rate)), (2, 2, 0));
    }

    #[test]
    fn a_slot_taken_before_a_reset_goes_back_to_no_pool() {
        let q = UpstreamQuota::default();
        q.grant(Unit::Inflight, 2);
        let epoch = q.epoch();
        assert!(q.take(Unit::Inflight));
        q.give_back(Unit::Inflight, epoch);
        assert_eq!(q.available(Unit::Inflight), 2);
        assert!(q.take(Unit::Inflight));
        q.reset();
        q.give_back(Unit::Inflight, epoch);
        assert_eq!(q.available(Unit::Inflight), 0);
    }

    #[test]
    fn take_back_returns_at_most_what_is_unspent() {
        let q = UpstreamQuota::default();
        q.grant(Unit::WatchOpen, 3);
        assert_eq!(q.take_back(Unit::WatchOpen, 2), 2);
        assert_eq!(q.take_back(Unit::WatchOpen, 5), 1);
        assert_eq!(q.take_back(Unit::WatchOpen, 5), 0);
    }
}
