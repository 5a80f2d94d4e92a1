//! Latency SLO accounting: how long the apiserver takes to answer, by verb
//! class and resource class, and how much time the proxy itself adds.
//!
//! Two consumers read the same observations:
//! - Prometheus, as histograms with the apiserver's own bucket boundaries
//!   (`apiserver_request_duration_seconds`), so the same SLO queries work on
//!   either side of the proxy: `breakwater_upstream_request_duration_seconds
//!   {verb_class, resource_class}` and `breakwater_proxy_added_seconds
//!   {verb_class}`;
//! - `/debug/top`, which needs p50/p99 *now* without a Prometheus: each verb
//!   class keeps atomic bucket counters here, and a once-a-second tick copies
//!   them into a short ring, so a quantile is computed over the last
//!   [`WINDOW_TICKS`] seconds the way `histogram_quantile` would.
//!
//! Labels are bounded by construction: both classes are enums with static
//! names, never a resource or an identity.

use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

mod striped;
mod summary;
use striped::Striped;
use summary::StripedSummary;

/// kube-apiserver's `apiserver_request_duration_seconds` buckets.
pub const APISERVER_BUCKETS: [f64; 23] = [
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
];

/// The histogram of upstream answer times (to the response headers).
pub const UPSTREAM_METRIC: &str = "breakwater_upstream_request_duration_seconds";
/// The histogram of the time the proxy adds to a forwarded request.
pub const ADDED_METRIC: &str = "breakwater_proxy_added_seconds";
/// The summary of how long requests take through the proxy, by verb (a
/// watch's whole stream).
pub const DURATION_METRIC: &str = "breakwater_request_duration_seconds";

/// How many one-second ticks the in-process quantiles look back over.
pub const WINDOW_TICKS: usize = 10;

/// The verb classes the apiserver's latency SLOs distinguish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerbClass {
    /// GET of one object.
    Get,
    /// LIST of a collection.
    List,
    /// Opening a WATCH (the time to its response headers).
    Watch,
    /// create, update, patch, delete, deletecollection.
    Mutating,
    /// Everything else: non-resource paths, proxy, connect subresources.
    Other,
}

impl VerbClass {
    pub const ALL: [VerbClass; 5] = [
        VerbClass::Get,
        VerbClass::List,
        VerbClass::Watch,
        VerbClass::Mutating,
        VerbClass::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VerbClass::Get => "get",
            VerbClass::List => "list",
            VerbClass::Watch => "watch",
            VerbClass::Mutating => "mutating",
            VerbClass::Other => "other",
        }
    }

    /// The class of a kube verb (`RequestInfo.verb.as_str()`).
    pub fn of_verb(verb: &str, is_resource_request: bool) -> VerbClass {
        if !is_resource_request {
            return VerbClass::Other;
        }
        match verb {
            "get" => VerbClass::Get,
            "list" => VerbClass::List,
            "watch" => VerbClass::Watch,
            "create" | "update" | "patch" | "delete" | "deletecollection" => VerbClass::Mutating,
            _ => VerbClass::Other,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The resource class: the apiserver's `scope` label, which its SLOs use
/// (sig-scalability: a read of one object within 1 s, of a namespace within
/// 5 s, of the whole cluster within 30 s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceClass {
    /// One named object.
    Resource,
    /// A collection in one namespace.
    Namespace,
    /// A cluster-wide collection (or a cluster-scoped resource's).
    Cluster,
    /// Not a resource request (`/healthz`, discovery, `/openapi`).
    None,
}

impl ResourceClass {
    pub const ALL: [ResourceClass; 4] = [
        ResourceClass::Resource,
        ResourceClass::Namespace,
        ResourceClass::Cluster,
        ResourceClass::None,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ResourceClass::Resource => "resource",
            ResourceClass::Namespace => "namespace",
            ResourceClass::Cluster => "cluster",
            ResourceClass::None => "none",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// From what the classifier found.
    pub fn of(is_resource_request: bool, name: &str, namespace: &str) -> ResourceClass {
        if !is_resource_request {
            ResourceClass::None
        } else if !name.is_empty() {
            ResourceClass::Resource
        } else if !namespace.is_empty() {
            ResourceClass::Namespace
        } else {
            ResourceClass::Cluster
        }
    }
}

/// The class of one upstream request, carried in its route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    pub verb: VerbClass,
    pub resource: ResourceClass,
}

impl Class {
    pub fn new(verb: VerbClass, resource: ResourceClass) -> Class {
        Class { verb, resource }
    }

    /// A collection read of the watch hub (LIST, or WATCH when
    /// `long_running`) at `path`: namespaced when the path names one.
    pub fn hub(long_running: bool, path: &str) -> Class {
        let verb = if long_running {
            VerbClass::Watch
        } else {
            VerbClass::List
        };
        // `/api/v1/namespaces/{ns}/{resource}` or `/apis/{g}/{v}/namespaces/{ns}/{resource}`;
        // `/api/v1/namespaces` alone lists the namespaces themselves.
        let namespaced = path
            .split_once("/namespaces/")
            .is_some_and(|(_, rest)| rest.contains('/'));
        let resource = if namespaced {
            ResourceClass::Namespace
        } else {
            ResourceClass::Cluster
        };
        Class { verb, resource }
    }
}

type Counts = [u64; APISERVER_BUCKETS.len() + 1];

/// Quantiles of one verb class over the recent window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantiles {
    pub class: VerbClass,
    /// Requests answered in the window.
    pub count: u64,
    /// `None` when nothing was answered in the window.
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

/// The upstream latency recorder (one per proxy, shared by its upstream
/// client). Recording is a few relaxed atomic adds, on the recording
/// thread's own cache lines, here and in the Prometheus histogram.
pub struct Latency {
    /// By verb class.
    classes: Box<Striped<5>>,
    /// Bucket counts at each of the last ticks, oldest first, with when.
    ring: Mutex<std::collections::VecDeque<(Instant, [Counts; 5])>>,
}

impl Default for Latency {
    fn default() -> Self {
        Latency::new()
    }
}

impl std::fmt::Debug for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Latency").finish_non_exhaustive()
    }
}

impl Latency {
    pub fn new() -> Latency {
        Latency {
            classes: Box::new(Striped::new()),
            ring: Mutex::new(std::collections::VecDeque::with_capacity(WINDOW_TICKS + 1)),
        }
    }

    /// One upstream answer (response headers) after `took`.
    pub fn observe_upstream(&self, class: Class, took: Duration) {
        self.classes.observe(class.verb.index(), took);
        UPSTREAM.observe(upstream_series(class), took);
    }

    /// The time the proxy added to a forwarded request: everything from its
    /// arrival to its response headers except the apiserver's part.
    pub fn observe_added(&self, verb: VerbClass, took: Duration) {
        ADDED.observe(verb.index(), took);
    }

    /// Copies the counters into the window's ring (call once a second).
    pub fn tick(&self, now: Instant) {
        let counts: [Counts; 5] = std::array::from_fn(|i| self.classes.load(i).0);
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if ring.len() > WINDOW_TICKS {
            ring.pop_front();
        }
        ring.push_back((now, counts));
    }

    /// p50 and p99 per verb class over the window (since the oldest tick
    /// kept; everything recorded so far before the first tick).
    pub fn quantiles(&self) -> Vec<Quantiles> {
        let base = {
            let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            ring.front().map(|(_, c)| *c)
        };
        VerbClass::ALL
            .iter()
            .map(|&class| {
                let now = self.classes.load(class.index()).0;
                let mut window = now;
                if let Some(base) = &base {
                    for (w, b) in window.iter_mut().zip(base[class.index()]) {
                        *w = w.saturating_sub(b);
                    }
                }
                let count = window.iter().sum();
                Quantiles {
                    class,
                    count,
                    p50: quantile(0.5, &window),
                    p99: quantile(0.99, &window),
                }
            })
            .collect()
    }
}

/// `histogram_quantile` over one set of (non-cumulative) bucket counts:
/// linear interpolation inside the bucket; the +Inf bucket answers its
/// lower bound, as Prometheus does.
pub fn quantile(q: f64, counts: &Counts) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut seen = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        let next = seen + c;
        if (next as f64) >= rank && c > 0 {
            let lower = if i == 0 {
                0.0
            } else {
                APISERVER_BUCKETS[i - 1]
            };
            let Some(&upper) = APISERVER_BUCKETS.get(i) else {
                return Some(lower);
            };
            let into = (rank - seen as f64) / c as f64;
            return Some(lower + (upper - lower) * into.clamp(0.0, 1.0));
        }
        seen = next;
    }
    Some(APISERVER_BUCKETS[APISERVER_BUCKETS.len() - 1])
}

/// Set by [`crate::admin::prometheus`] once the proxy's recorder is
/// installed: metric handles made from then on are bound to it.
pub static RECORDER_INSTALLED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// [`UPSTREAM_METRIC`] by verb class × resource class ([`upstream_series`]),
/// process-wide as the Prometheus recorder is.
static UPSTREAM: Striped<20> = Striped::new();
/// [`ADDED_METRIC`] by verb class.
static ADDED: Striped<5> = Striped::new();
/// [`DURATION_METRIC`] by verb.
static DURATIONS: StripedSummary = StripedSummary::new();

fn upstream_series(class: Class) -> usize {
    class.verb.index() * ResourceClass::ALL.len() + class.resource.index()
}

/// Appends the SLO histograms ([`UPSTREAM_METRIC`], [`ADDED_METRIC`], with
/// the apiserver's buckets) and the request-duration summary
/// ([`DURATION_METRIC`]) to a Prometheus text exposition; they are kept
/// here, not in the `metrics` recorder (`slo/striped.rs` and
/// `slo/summary.rs` say why).
pub fn render(out: &mut String) {
    UPSTREAM.render(out, UPSTREAM_METRIC, |i| {
        let (verb, resource) = (
            VerbClass::ALL[i / ResourceClass::ALL.len()],
            ResourceClass::ALL[i % ResourceClass::ALL.len()],
        );
        format!(
            "verb_class=\"{}\",resource_class=\"{}\"",
            verb.as_str(),
            resource.as_str()
        )
    });
    ADDED.render(out, ADDED_METRIC, |i| {
        format!("verb_class=\"{}\"", VerbClass::ALL[i].as_str())
    });
    DURATIONS.render(out, DURATION_METRIC, Instant::now());
}

/// A thread's metric handles by label set, for [`with_handle`].
pub(crate) type Handles<K, H> = std::cell::RefCell<std::collections::HashMap<K, H>>;

/// How many handles one thread keeps per metric at most: label sets that
/// come and go (rule names change with reloads) cannot grow it unbounded.
const HANDLES_MAX: usize = 4096;

/// Records through the handle `cache` keeps for `key`, registering it on
/// first use. Once the proxy's recorder is installed
/// ([`crate::admin::prometheus`]) a request then formats no label and looks
/// nothing up in the recorder's registry (the `metrics` macros copy the
/// key's labels into a new allocation on every call). Before (a unit test's
/// request), through a fresh registration each time, so that no handle bound
/// to no recorder is ever kept.
pub(crate) fn with_handle<K: Eq + std::hash::Hash, H>(
    cache: &'static std::thread::LocalKey<Handles<K, H>>,
    key: K,
    register: impl FnOnce(&K) -> H,
    record: impl FnOnce(&H),
) {
    if !RECORDER_INSTALLED.load(Ordering::Relaxed) {
        return record(&register(&key));
    }
    cache.with(|cache| match cache.try_borrow_mut() {
        Ok(mut handles) => {
            if handles.len() >= HANDLES_MAX && !handles.contains_key(&key) {
                handles.clear();
            }
            record(handles.entry(key).or_insert_with_key(register));
        }
        Err(_) => record(&register(&key)),
    });
}

/// `breakwater_requests_total{verb,code}` (through handles each thread
/// keeps per (verb, code), [`with_handle`]) and
/// [`DURATION_METRIC`]`{verb}` for one ended request.
pub fn count_request(verb: &'static str, status: u16, elapsed: Duration) {
    thread_local! {
        static HANDLES: Handles<(&'static str, u16), metrics::Counter> = Handles::default();
    }
    with_handle(
        &HANDLES,
        (verb, status),
        |_| metrics::counter!("breakwater_requests_total", "verb" => verb, "code" => status.to_string()),
        |count| count.increment(1),
    );
    DURATIONS.record(verb, elapsed.as_secs_f64());
}

/// Folds the request durations buffered per thread into the summary's
/// windows (the `/debug/top` ticker calls it once a second; a scrape folds
/// too).
pub fn fold_durations(now: Instant) {
    DURATIONS.fold(now);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_fall_into_the_apiservers_classes() {
        assert_eq!(VerbClass::of_verb("get", true), VerbClass::Get);
        assert_eq!(VerbClass::of_verb("patch", true), VerbClass::Mutating);
        assert_eq!(
            VerbClass::of_verb("deletecollection", true),
            VerbClass::Mutating
        );
        assert_eq!(VerbClass::of_verb("get", false), VerbClass::Other);
        assert_eq!(VerbClass::of_verb("proxy", true), VerbClass::Other);
    }

    #[test]
    fn hub_paths_are_namespaced_only_below_a_namespace() {
        assert_eq!(
            Class::hub(false, "/api/v1/namespaces/demo/pods").resource,
            ResourceClass::Namespace
        );
        assert_eq!(
            Class::hub(true, "/api/v1/namespaces").resource,
            ResourceClass::Cluster
        );
        assert_eq!(
            Class::hub(true, "/apis/apps/v1/deployments").verb,
            VerbClass::Watch
        );
    }

    #[test]
    fn quantiles_interpolate_within_a_bucket() {
        let mut counts: Counts = [0; APISERVER_BUCKETS.len() + 1];
        // 100 answers between 0.1 and 0.2 s.
        counts[4] = 100;
        let p50 = quantile(0.5, &counts).expect("some");
        assert!((p50 - 0.15).abs() < 1e-9, "{p50}");
        // One slow outlier beyond 60 s: p99 stays in the bucket, p100 is 60.
        counts[APISERVER_BUCKETS.len()] = 1;
        assert!(quantile(0.99, &counts).expect("some") <= 0.2);
        assert_eq!(quantile(1.0, &counts), Some(60.0));
        assert_eq!(quantile(0.5, &[0; 24]), None);
    }

    #[test]
    fn the_window_forgets_what_came_before_its_oldest_tick() {
        let lat = Latency::new();
        let class = Class::new(VerbClass::List, ResourceClass::Cluster);
        for _ in 0..10 {
            lat.observe_upstream(class, Duration::from_secs(5));
        }
        let t0 = Instant::now();
        for i in 0..=WINDOW_TICKS {
            lat.tick(t0 + Duration::from_secs(i as u64));
        }
        lat.observe_upstream(class, Duration::from_millis(10));
        let list = lat.quantiles()[VerbClass::List.index()];
        assert_eq!(list.count, 1);
        assert!(list.p99.expect("some") <= 0.025);
    }
}
