//! A lock-free token bucket: GCRA (the generic cell rate algorithm) on one
//! `AtomicU64`.
//!
//! Why our own instead of `governor`: we need, on one atomic, an exact
//! "wait until a token exists" for `Retry-After`, a refund when a later check
//! of the same request fails (so a request rejected by its aggregate limit
//! does not also burn its identity's token), the remaining tokens for the
//! `RateLimit` header, and a cheap "is the bucket full" test for idle
//! eviction. GCRA gives all of these from a single number.
//!
//! GCRA stores the *theoretical arrival time* (TAT): the instant at which the
//! bucket would be full again. With emission interval `T = 1/rate` and
//! tolerance `τ = burst·T`, a request at `now` is admitted iff
//! `max(TAT, now) + T - now <= τ`, and then `TAT := max(TAT, now) + T`.
//! Over any window of length `t` this admits at most `burst + t/T` requests:
//! after the k-th admission in the window `TAT >= first + k·T` while
//! admission needs `TAT - now <= burst·T`, so `k <= burst + (now-first)/T`.
//! `T` is rounded *up* to whole nanoseconds so the bound `burst + rate·t`
//! still holds exactly.
//!
//! Times are nanoseconds since the owning limiter's epoch (an `Instant`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A rate limit with its GCRA constants precomputed at load time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Tokens per second, as configured (after division by replicas).
    pub rate: f64,
    /// Bucket size.
    pub burst: u64,
    /// `T`: nanoseconds per token, rounded up.
    emission_ns: u64,
    /// `τ = burst·T`: how far ahead of `now` the TAT may run.
    tolerance_ns: u64,
}

impl RateLimit {
    /// `rate` must be positive and finite and `burst >= 1` (validation
    /// guarantees it; out-of-range values are clamped, never a panic).
    pub fn new(rate: f64, burst: u64) -> RateLimit {
        let burst = burst.max(1);
        let emission = (1e9 / rate).ceil();
        let emission_ns = if emission.is_finite() && emission >= 1.0 {
            // `as` saturates for floats beyond u64::MAX.
            emission as u64
        } else {
            1
        };
        RateLimit {
            rate,
            burst,
            emission_ns,
            tolerance_ns: emission_ns.saturating_mul(burst),
        }
    }

    /// Time for an empty bucket to fill completely (`burst / rate`): the
    /// window of a `RateLimit-Policy` header.
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.tolerance_ns)
    }

    /// Time to earn one token.
    pub fn emission_interval(&self) -> Duration {
        Duration::from_nanos(self.emission_ns)
    }
}

/// One bucket's state: the TAT. Starts at 0 (= full at any `now`).
#[derive(Debug, Default)]
pub struct Gcra {
    tat: AtomicU64,
}

impl Gcra {
    /// A full bucket.
    pub fn new() -> Gcra {
        Gcra::default()
    }

    /// Takes one token at `now_ns`. `Ok(remaining tokens)` or
    /// `Err(wait until a token exists)`.
    #[inline]
    pub fn try_acquire(&self, lim: &RateLimit, now_ns: u64) -> Result<u64, Duration> {
        // Relaxed is enough throughout: the TAT is the only datum and it
        // publishes nothing else; every step is a read-modify-write on this
        // one location, so the modification order alone keeps it exact.
        let mut current = self.tat.load(Ordering::Relaxed);
        loop {
            // A TAT in the past means the bucket has been full since then;
            // tokens do not accumulate beyond `burst`, so start from now.
            let base = current.max(now_ns);
            let new_tat = base.saturating_add(lim.emission_ns);
            let ahead = new_tat - now_ns;
            if ahead > lim.tolerance_ns {
                // Not admitted and nothing written: a rejected request costs
                // no token. The wait is until `new_tat - τ`, when the same
                // request would just fit.
                return Err(Duration::from_nanos(ahead - lim.tolerance_ns));
            }
            // Publish our reservation only if nobody moved the TAT since we
            // read it; otherwise recompute from their value (it can only have
            // grown, or shrunk by a refund) and try again. `weak` may fail
            // spuriously, which the loop absorbs.
            match self.tat.compare_exchange_weak(
                current,
                new_tat,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok((lim.tolerance_ns - ahead) / lim.emission_ns),
                Err(actual) => current = actual,
            }
        }
    }

    /// Gives back one token taken by `try_acquire` (the request was rejected
    /// by a later check). Moving the TAT back by `T` undoes exactly one
    /// reservation whatever happened in between: reservations are additive,
    /// and a TAT pushed below `now` is clamped by the next `max(TAT, now)`.
    pub fn refund(&self, lim: &RateLimit) {
        // fetch_update is a CAS loop; saturating so a refund never wraps.
        let _ = self
            .tat
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(lim.emission_ns))
            });
    }

    /// Tokens available at `now_ns` (for `RateLimit` headers and explain).
    pub fn remaining(&self, lim: &RateLimit, now_ns: u64) -> u64 {
        let tat = self.tat.load(Ordering::Relaxed);
        let used = tat.saturating_sub(now_ns);
        lim.tolerance_ns.saturating_sub(used) / lim.emission_ns
    }

    /// True when the bucket is full at `now_ns`: forgetting it is then
    /// indistinguishable from keeping it (a new bucket is full too).
    pub fn is_full(&self, now_ns: u64) -> bool {
        self.tat.load(Ordering::Relaxed) <= now_ns
    }

    /// Refills the bucket (used when a reload changes this rule's limits).
    pub fn reset(&self) {
        self.tat.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn full_bucket_admits_burst_then_waits_one_interval() {
        let lim = RateLimit::new(5.0, 10);
        let b = Gcra::new();
        let now = 100 * SEC;
        for i in 0..10 {
            assert_eq!(b.try_acquire(&lim, now), Ok(9 - i));
        }
        assert_eq!(b.try_acquire(&lim, now), Err(Duration::from_millis(200)));
        assert_eq!(
            b.try_acquire(&lim, now + SEC / 10),
            Err(Duration::from_millis(100))
        );
        assert_eq!(b.try_acquire(&lim, now + SEC / 5), Ok(0));
        assert!(!b.is_full(now + SEC / 5));
        assert!(b.is_full(now + 3 * SEC));
        assert_eq!(b.remaining(&lim, now + 3 * SEC), 10);
    }

    #[test]
    fn refund_returns_exactly_one_token() {
        let lim = RateLimit::new(1.0, 2);
        let b = Gcra::new();
        let now = 10 * SEC;
        assert!(b.try_acquire(&lim, now).is_ok());
        assert!(b.try_acquire(&lim, now).is_ok());
        assert!(b.try_acquire(&lim, now).is_err());
        b.refund(&lim);
        assert_eq!(b.try_acquire(&lim, now), Ok(0));
        assert!(b.try_acquire(&lim, now).is_err());
    }

    #[test]
    fn fractional_rates_work() {
        let lim = RateLimit::new(0.5, 1);
        let b = Gcra::new();
        assert!(b.try_acquire(&lim, SEC).is_ok());
        assert_eq!(b.try_acquire(&lim, SEC), Err(Duration::from_secs(2)));
        assert!(b.try_acquire(&lim, 3 * SEC).is_ok());
    }

    proptest! {
        /// Over any window of length t, at most burst + rate·t admissions.
        #[test]
        fn never_more_than_burst_plus_rate_times_t_over_any_window(
            rate in 0.1f64..2000.0,
            burst in 1u64..50,
            gaps in proptest::collection::vec(0u64..50_000_000, 1..400),
        ) {
            let lim = RateLimit::new(rate, burst);
            let b = Gcra::new();
            let mut now = SEC;
            let mut admitted = Vec::new();
            for gap in gaps {
                now += gap;
                if b.try_acquire(&lim, now).is_ok() {
                    admitted.push(now);
                }
            }
            // Every window [admitted[i], admitted[j]] (the tightest windows).
            for i in 0..admitted.len() {
                for j in i..admitted.len() {
                    let t = (admitted[j] - admitted[i]) as f64 / 1e9;
                    let count = (j - i + 1) as f64;
                    prop_assert!(
                        count <= burst as f64 + rate * t + 1e-9,
                        "{count} admissions in {t}s with rate {rate} burst {burst}"
                    );
                }
            }
        }

        /// A rejection's wait is exact: one nanosecond earlier still fails,
        /// at the wait it succeeds.
        #[test]
        fn retry_after_is_the_exact_wait(rate in 0.1f64..1000.0, burst in 1u64..20, n in 1usize..60) {
            let lim = RateLimit::new(rate, burst);
            let b = Gcra::new();
            let now = SEC;
            let mut wait = None;
            for _ in 0..n {
                if let Err(w) = b.try_acquire(&lim, now) {
                    wait = Some(w);
                    break;
                }
            }
            if let Some(w) = wait {
                let at = now + w.as_nanos() as u64;
                prop_assert!(b.try_acquire(&lim, at - 1).is_err());
                prop_assert!(b.try_acquire(&lim, at).is_ok());
            }
        }
    }
}
