//! `breakwater_request_duration_seconds{verb}`: a Prometheus summary whose
//! samples are buffered per thread.
//!
//! Through the `metrics` exporter every ended request pushed its duration
//! into an `AtomicBucket` that every serving thread writes (a contended
//! `fetch_add`, an epoch pin and a clock read per sample), and the
//! exporter's upkeep or a scrape folded the samples into its sketches. Here
//! a thread appends the sample to its own stripe's buffer (an uncontended
//! lock on a cache line of its own), and the samples are folded into the
//! same sketches ([`metrics_util::storage::Summary`], the exporter's) once a
//! second by the `/debug/top` ticker, at a scrape, or by the recording
//! thread itself when its buffer is full. What a scrape shows is what the
//! exporter showed: the quantiles 0, 0.5, 0.9, 0.95, 0.99, 0.999 and 1 over
//! the last 40 to 60 seconds (three windows of 20 s), and the sum and
//! count since start.

use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use metrics_util::storage::Summary;

use super::striped::{STRIPES, stripe};

/// The quantiles rendered, the exporter's defaults.
const QUANTILES: [f64; 7] = [0.0, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0];
/// The quantiles cover this many windows, the newest one filling.
const WINDOWS: usize = 3;
/// One window's span.
const WINDOW: Duration = Duration::from_secs(20);
/// A thread folds its own buffer past this many samples (64 KiB), so that
/// memory stays bounded where nothing else folds.
const FOLD_AT: usize = 8192;

/// One thread's samples, not folded yet, by verb.
#[repr(align(128))]
struct Stripe(Mutex<Vec<(&'static str, Vec<f64>)>>);

/// One verb's folded samples.
struct Series {
    verb: &'static str,
    /// Since start.
    count: u64,
    sum: f64,
    /// Indexed by window number modulo [`WINDOWS`], with that number.
    windows: [(u64, Summary); WINDOWS],
}

impl Series {
    fn new(verb: &'static str) -> Series {
        Series {
            verb,
            count: 0,
            sum: 0.0,
            windows: std::array::from_fn(|_| (0, Summary::with_defaults())),
        }
    }

    fn add(&mut self, samples: &[f64], window: u64) {
        let (number, summary) = &mut self.windows[window as usize % WINDOWS];
        if *number != window {
            *number = window;
            *summary = Summary::with_defaults();
        }
        for &s in samples {
            summary.add(s);
            self.sum += s;
        }
        self.count += samples.len() as u64;
    }

    /// The windows still in view at `window`, merged.
    fn recent(&self, window: u64) -> Summary {
        let mut merged = Summary::with_defaults();
        for (number, summary) in &self.windows {
            if *number + (WINDOWS as u64) > window && !summary.is_empty() {
                // Same configuration on both sides: merging cannot fail.
                let _ = merged.merge(summary);
            }
        }
        merged
    }
}

/// The folded series, and a spare buffer that circulates with the stripes'.
struct Folded {
    series: Vec<Series>,
    spare: Vec<f64>,
}

/// A summary by verb, its samples buffered per thread.
pub(crate) struct StripedSummary {
    stripes: [Stripe; STRIPES],
    folded: Mutex<Folded>,
    origin: OnceLock<Instant>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl StripedSummary {
    pub(crate) const fn new() -> Self {
        StripedSummary {
            stripes: [const { Stripe(Mutex::new(Vec::new())) }; STRIPES],
            folded: Mutex::new(Folded {
                series: Vec::new(),
                spare: Vec::new(),
            }),
            origin: OnceLock::new(),
        }
    }

    /// The window `now` falls in.
    fn window(&self, now: Instant) -> u64 {
        let origin = *self.origin.get_or_init(|| now);
        now.saturating_duration_since(origin).as_secs() / WINDOW.as_secs()
    }

    /// One ended request of `verb` that took `secs`.
    pub(crate) fn record(&self, verb: &'static str, secs: f64) {
        let stripe = &self.stripes[stripe()];
        let full = {
            let mut pending = locked(&stripe.0);
            let samples = match pending.iter().position(|(v, _)| *v == verb) {
                Some(i) => &mut pending[i].1,
                None => {
                    pending.push((verb, Vec::new()));
                    &mut pending.last_mut().expect("just pushed").1
                }
            };
            samples.push(secs);
            samples.len() >= FOLD_AT
        };
        if full {
            self.fold(Instant::now());
        }
    }

    /// Moves every buffered sample into the series, in the window of `now`.
    pub(crate) fn fold(&self, now: Instant) {
        let window = self.window(now);
        let mut folded = locked(&self.folded);
        let Folded { series, spare } = &mut *folded;
        for stripe in &self.stripes {
            for i in 0.. {
                // Swap the buffer out under the stripe's lock (no copy), and
                // fold it with the stripe free again.
                let verb = {
                    let mut pending = locked(&stripe.0);
                    let Some((verb, samples)) = pending.get_mut(i) else {
                        break;
                    };
                    std::mem::swap(samples, spare);
                    *verb
                };
                if spare.is_empty() {
                    continue;
                }
                let at = match series.iter().position(|s| s.verb == verb) {
                    Some(at) => at,
                    None => {
                        series.push(Series::new(verb));
                        series.len() - 1
                    }
                };
                series[at].add(spare, window);
                spare.clear();
            }
        }
    }

    /// Appends the family `name` in Prometheus' text format, as the
    /// `metrics` exporter rendered a summary: every verb recorded, its
    /// quantiles over the recent windows (0 when none has a sample), sum
    /// and count since start.
    pub(crate) fn render(&self, out: &mut String, name: &str, now: Instant) {
        self.fold(now);
        let window = self.window(now);
        let folded = locked(&self.folded);
        let mut series: Vec<&Series> = folded.series.iter().collect();
        if series.is_empty() {
            return;
        }
        series.sort_by_key(|s| s.verb);
        let _ = writeln!(out, "# TYPE {name} summary");
        for s in series {
            let verb = s.verb;
            let recent = s.recent(window);
            for q in QUANTILES {
                let value = recent.quantile(q).unwrap_or(0.0);
                let _ = writeln!(out, "{name}{{verb=\"{verb}\",quantile=\"{q}\"}} {value}");
            }
            let _ = writeln!(out, "{name}_sum{{verb=\"{verb}\"}} {}", s.sum);
            let _ = writeln!(out, "{name}_count{{verb=\"{verb}\"}} {}", s.count);
        }
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(s: &StripedSummary, now: Instant) -> String {
        let mut out = String::new();
        s.render(&mut out, "d_seconds", now);
        out
    }

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{series} in\n{text}"))
            .parse()
            .expect("a number")
    }

    /// The values at ranks around `q` of `sorted`, widened by the sketch's
    /// relative error (0.01%) and one rank either side.
    fn around(sorted: &[f64], q: f64) -> (f64, f64) {
        let rank = q * (sorted.len() - 1) as f64;
        let lo = (rank.floor() as usize).saturating_sub(1);
        let hi = (rank.ceil() as usize + 1).min(sorted.len() - 1);
        (sorted[lo] * (1.0 - 2e-4), sorted[hi] * (1.0 + 2e-4))
    }

    #[test]
    fn renders_the_exporters_series_with_quantiles_of_every_sample() {
        use metrics_exporter_prometheus::PrometheusBuilder;
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let ours = StripedSummary::new();
        let now = Instant::now();
        let mut samples: [Vec<f64>; 2] = Default::default();
        metrics::with_local_recorder(&recorder, || {
            for i in 1..=2_000u32 {
                let (series, verb, secs) = if i % 3 == 0 {
                    (1, "list", f64::from(i) / 1e3)
                } else {
                    (0, "get", f64::from(i) / 1e5)
                };
                metrics::histogram!("d_seconds", "verb" => verb).record(secs);
                ours.record(verb, secs);
                samples[series].push(secs);
            }
        });
        let theirs = handle.render();
        let ours = rendered(&ours, now);
        // The same series, named and labelled as the exporter names them.
        let names = |text: &str| {
            let mut names: Vec<String> = text
                .lines()
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(|l| l.rsplit_once(' ').expect("name value").0.to_string())
                .collect();
            names.sort();
            names
        };
        assert_eq!(names(&ours), names(&theirs));
        assert!(ours.starts_with("# TYPE d_seconds summary\n"), "{ours}");
        assert_eq!(ours.matches("# TYPE").count(), 1);
        assert!(
            ours.ends_with("\n\n"),
            "a blank line before the next family"
        );
        for (verb, mut samples) in ["get", "list"].into_iter().zip(samples) {
            // Sum and count as the exporter has them.
            for suffix in ["_sum", "_count"] {
                let series = format!("d_seconds{suffix}{{verb=\"{verb}\"}}");
                let (a, b) = (value(&ours, &series), value(&theirs, &series));
                assert!((a - b).abs() <= 1e-9 * b.abs(), "{series}: {a} vs {b}");
            }
            // Quantiles of all the samples. (Not compared with the
            // exporter's: version 0.18 folds a drained bucket newest block
            // first, and its rolling summary then drops every sample older
            // than the first one it folded: all but the newest block, 64 at
            // most.)
            samples.sort_by(f64::total_cmp);
            for q in QUANTILES {
                let series = format!("d_seconds{{verb=\"{verb}\",quantile=\"{q}\"}}");
                let got = value(&ours, &series);
                let (lo, hi) = around(&samples, q);
                assert!(
                    (lo..=hi).contains(&got),
                    "{series}: {got} not in {lo}..={hi}"
                );
            }
        }
    }

    #[test]
    fn nothing_is_lost_from_more_threads_than_stripes_or_a_full_buffer() {
        let s: &'static StripedSummary = Box::leak(Box::new(StripedSummary::new()));
        let per_thread = FOLD_AT as u64 + 100; // each thread folds its own once
        let threads: Vec<_> = (0..STRIPES + 3)
            .map(|_| {
                std::thread::spawn(move || {
                    for _ in 0..per_thread {
                        s.record("get", 0.002);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("recording thread");
        }
        let text = rendered(s, Instant::now());
        let n = (STRIPES as u64 + 3) * per_thread;
        assert_eq!(value(&text, "d_seconds_count{verb=\"get\"}"), n as f64);
        let sum = value(&text, "d_seconds_sum{verb=\"get\"}");
        assert!((sum - n as f64 * 0.002).abs() < 1e-6 * sum, "{sum}");
        let p50 = value(&text, "d_seconds{verb=\"get\",quantile=\"0.5\"}");
        assert!((p50 - 0.002).abs() < 0.002 * 1e-3, "{p50}");
    }

    #[test]
    fn quantiles_forget_old_windows_while_sum_and_count_keep_everything() {
        let s = StripedSummary::new();
        let t0 = Instant::now();
        s.record("patch", 5.0);
        s.fold(t0);
        s.record("patch", 0.010);
        let later = t0 + WINDOW * 2 + Duration::from_secs(1);
        let text = rendered(&s, later);
        // Both windows in view: the maximum is the old sample.
        let max = value(&text, "d_seconds{verb=\"patch\",quantile=\"1\"}");
        assert!((max - 5.0).abs() < 5.0 * 1e-3, "{text}");

        let text = rendered(&s, t0 + WINDOW * 3);
        let max = value(&text, "d_seconds{verb=\"patch\",quantile=\"1\"}");
        assert!((max - 0.010).abs() < 0.010 * 1e-3, "{text}");
        assert_eq!(value(&text, "d_seconds_count{verb=\"patch\"}"), 2.0);
        assert!((value(&text, "d_seconds_sum{verb=\"patch\"}") - 5.010).abs() < 1e-9);

        // Nothing in view: quantiles 0, as the exporter renders them.
        let text = rendered(&s, t0 + WINDOW * 6);
        assert_eq!(
            value(&text, "d_seconds{verb=\"patch\",quantile=\"0.99\"}"),
            0.0
        );
        assert_eq!(value(&text, "d_seconds_count{verb=\"patch\"}"), 2.0);
    }

    #[test]
    fn nothing_recorded_renders_nothing() {
        assert_eq!(rendered(&StripedSummary::new(), Instant::now()), "");
    }
}
