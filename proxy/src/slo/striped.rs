//! Histograms with the apiserver's buckets, their counts split over
//! per-thread stripes.
//!
//! Every forwarded request records two observations (the apiserver's answer
//! time, the time the proxy added). Through the `metrics` exporter each was
//! a push into an `AtomicBucket` whose blocks every serving thread writes
//! (a contended `fetch_add` and an epoch pin per sample, the samples kept
//! until a scrape drains them). Here a thread adds to its own stripe's
//! counters, two relaxed adds on cache lines no other thread writes (unless
//! more threads record than there are stripes), and a scrape sums the
//! stripes.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use super::{APISERVER_BUCKETS, Counts};

/// Bucket counts (the boundaries, then +Inf), then the sum in nanoseconds.
const SLOTS: usize = APISERVER_BUCKETS.len() + 2;
const SUM: usize = APISERVER_BUCKETS.len() + 1;

/// More than the threads that record at once on most machines (one per
/// core serves connections); threads beyond share stripes, which is only
/// slower.
pub(super) const STRIPES: usize = 16;

/// One thread's counters for all `N` series, on cache lines of its own.
#[repr(align(128))]
struct Stripe<const N: usize>([[AtomicU64; SLOTS]; N]);

/// `N` histograms (one per label set), striped.
pub(crate) struct Striped<const N: usize> {
    stripes: [Stripe<N>; STRIPES],
}

impl<const N: usize> Striped<N> {
    pub(crate) const fn new() -> Self {
        Striped {
            stripes: [const { Stripe([const { [const { AtomicU64::new(0) }; SLOTS] }; N]) };
                STRIPES],
        }
    }

    /// One observation of `series`.
    pub(crate) fn observe(&self, series: usize, took: Duration) {
        let bucket = APISERVER_BUCKETS.partition_point(|&b| b < took.as_secs_f64());
        let slots = &self.stripes[stripe()].0[series];
        // Relaxed: counters; a scrape only needs each add once.
        slots[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        slots[SUM].fetch_add(nanos, Ordering::Relaxed);
    }

    /// `series`' counts per bucket (not cumulative; the last is +Inf's
    /// own) and the sum of its observations in nanoseconds, all stripes
    /// summed.
    pub(crate) fn load(&self, series: usize) -> (Counts, u64) {
        let mut counts: Counts = [0; APISERVER_BUCKETS.len() + 1];
        let mut sum = 0u64;
        for stripe in &self.stripes {
            let slots = &stripe.0[series];
            for (c, slot) in counts.iter_mut().zip(slots) {
                *c += slot.load(Ordering::Relaxed);
            }
            sum = sum.wrapping_add(slots[SUM].load(Ordering::Relaxed));
        }
        (counts, sum)
    }

    /// Appends the family `name` in Prometheus' text format: every series
    /// observed at least once, with the labels `labels(series)` gives
    /// (`k="v"` pairs, comma-separated), as the `metrics` exporter
    /// rendered it.
    pub(crate) fn render(&self, out: &mut String, name: &str, labels: impl Fn(usize) -> String) {
        let mut typed = false;
        for series in 0..N {
            let (counts, sum) = self.load(series);
            let total: u64 = counts.iter().sum();
            if total == 0 {
                continue;
            }
            if !typed {
                let _ = writeln!(out, "# TYPE {name} histogram");
                typed = true;
            }
            let labels = labels(series);
            let mut cumulative = 0;
            for (i, c) in counts.iter().enumerate() {
                cumulative += c;
                let le: &dyn std::fmt::Display = match APISERVER_BUCKETS.get(i) {
                    Some(bound) => bound,
                    None => &"+Inf",
                };
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
            }
            let secs = Duration::from_nanos(sum).as_secs_f64();
            let _ = writeln!(out, "{name}_sum{{{labels}}} {secs}");
            let _ = writeln!(out, "{name}_count{{{labels}}} {total}");
        }
        if typed {
            out.push('\n');
        }
    }
}

/// This thread's stripe, assigned round-robin on its first observation.
pub(super) fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    STRIPE.with(|s| *s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_buckets_from_every_thread() {
        let h: &'static Striped<2> = Box::leak(Box::new(Striped::new()));
        // More threads than stripes: some share one, nothing is lost.
        let threads: Vec<_> = (0..STRIPES + 3)
            .map(|_| {
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        h.observe(1, Duration::from_millis(3)); // le 0.005
                        h.observe(1, Duration::from_millis(25)); // le 0.025, on the boundary
                        h.observe(1, Duration::from_secs(61)); // +Inf
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("recording thread");
        }
        let n = (STRIPES as u64 + 3) * 100;
        let (counts, sum) = h.load(1);
        assert_eq!(counts[0], n);
        assert_eq!(counts[1], n);
        assert_eq!(counts[APISERVER_BUCKETS.len()], n);
        assert_eq!(counts.iter().sum::<u64>(), 3 * n);
        assert_eq!(sum, n * (3_000_000 + 25_000_000 + 61_000_000_000));
        assert_eq!(h.load(0), ([0; APISERVER_BUCKETS.len() + 1], 0));
    }

    #[test]
    fn renders_cumulative_buckets_sum_and_count_for_observed_series_only() {
        let h: Striped<3> = Striped::new();
        let mut out = String::new();
        h.render(&mut out, "x_seconds", |i| format!("s=\"{i}\""));
        assert_eq!(out, "", "nothing observed, nothing rendered");

        h.observe(2, Duration::from_millis(30)); // le 0.05
        h.observe(2, Duration::from_millis(1500)); // le 1.5
        h.render(&mut out, "x_seconds", |i| format!("s=\"{i}\""));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "# TYPE x_seconds histogram");
        assert_eq!(lines[1], "x_seconds_bucket{s=\"2\",le=\"0.005\"} 0");
        assert!(lines.contains(&"x_seconds_bucket{s=\"2\",le=\"0.05\"} 1"));
        assert!(lines.contains(&"x_seconds_bucket{s=\"2\",le=\"1.25\"} 1"));
        assert!(lines.contains(&"x_seconds_bucket{s=\"2\",le=\"1.5\"} 2"));
        assert!(lines.contains(&"x_seconds_bucket{s=\"2\",le=\"60\"} 2"));
        assert!(lines.contains(&"x_seconds_bucket{s=\"2\",le=\"+Inf\"} 2"));
        assert!(lines.contains(&"x_seconds_sum{s=\"2\"} 1.53"));
        assert!(lines.contains(&"x_seconds_count{s=\"2\"} 2"));
        assert!(!out.contains("s=\"0\"") && !out.contains("s=\"1\""));
        // TYPE, the buckets and +Inf, sum and count, and a blank line
        // before the next family, as the exporter separates them.
        assert_eq!(lines.len(), 1 + APISERVER_BUCKETS.len() + 1 + 2 + 1);
        assert_eq!(lines.last(), Some(&""));
    }
}
