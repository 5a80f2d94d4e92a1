//! Plain rate caps: governor's GCRA on tokio's clock.
//!
//! Two places in front of authentication need a rate cap and nothing more:
//! the per-source accept rate ([`crate::accept`], keyed by IP) and the
//! TokenReview rate (`identity::review`, one bucket). That is exactly
//! governor's job. Admission's limits (`breakwater-limits`) keep their own
//! GCRA because they need refunds, the exact wait for `Retry-After` and the
//! remaining tokens on one atomic, which governor does not give.
//!
//! The clock is tokio's: paused-time tests drive the buckets with
//! `time::advance`, and a wait computed here matches tokio's timers.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, Quota, RateLimiter};

/// Time since the limiter was built, read from tokio's clock.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start: tokio::time::Instant,
}

impl TokioClock {
    fn new() -> TokioClock {
        TokioClock {
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.start.elapsed())
    }
}

/// One bucket for everybody.
pub type DirectLimiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Nanos>>;

/// One bucket per key. The map only grows: [`KeyedLimiter::retain_recent`]
/// drops the keys whose bucket is full again.
pub type KeyedLimiter<K> =
    RateLimiter<K, DefaultKeyedStateStore<K>, TokioClock, NoOpMiddleware<Nanos>>;

/// `per_second` sustained, up to `burst` at once.
fn quota(per_second: NonZeroU32, burst: NonZeroU32) -> Quota {
    Quota::per_second(per_second).allow_burst(burst)
}

/// A single bucket of `per_second`, `burst`.
pub fn direct(per_second: NonZeroU32, burst: NonZeroU32) -> DirectLimiter {
    RateLimiter::new(
        quota(per_second, burst),
        InMemoryState::default(),
        TokioClock::new(),
    )
}

/// A bucket of `per_second`, `burst` per key.
pub fn keyed<K>(per_second: NonZeroU32, burst: NonZeroU32) -> KeyedLimiter<K>
where
    K: Clone + std::hash::Hash + Eq,
{
    RateLimiter::new(
        quota(per_second, burst),
        DefaultKeyedStateStore::default(),
        TokioClock::new(),
    )
}

/// How long until `refused` would conform, in whole seconds for
/// `Retry-After` (at least 1: "0" would invite an immediate retry).
pub fn retry_after_secs(refused: &NotUntil<Nanos>, clock: &TokioClock) -> u64 {
    let wait: Duration = refused.wait_time_from(clock.now());
    wait.as_secs_f64().ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).expect("non-zero")
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_refills_on_tokios_clock() {
        let limiter = direct(nz(2), nz(3));
        for _ in 0..3 {
            assert!(limiter.check().is_ok());
        }
        let refused = limiter.check().expect_err("burst spent");
        assert_eq!(retry_after_secs(&refused, limiter.clock()), 1);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(limiter.check().is_ok());
        assert!(limiter.check().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn keyed_buckets_are_independent_and_forgotten_when_full_again() {
        let limiter = keyed::<u32>(nz(1), nz(1));
        assert!(limiter.check_key(&1).is_ok());
        assert!(limiter.check_key(&1).is_err());
        assert!(limiter.check_key(&2).is_ok());
        assert_eq!(limiter.len(), 2);
        tokio::time::advance(Duration::from_secs(2)).await;
        limiter.retain_recent();
        assert_eq!(limiter.len(), 0);
    }
}
