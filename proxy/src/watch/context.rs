//! What every stream of the hub shares: settings, the upstream, accounting.
//!
//! A leaf module: the streams and their subscribers read it, nothing here
//! knows about them, so the hub's modules depend on each other one way.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::upstream::Upstream;

/// Hub settings.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// `--watch-cache`: false forwards every watch and list as before.
    pub enabled: bool,
    /// `--watch-linger`: how long a stream without subscribers stays open.
    pub linger: Duration,
    /// Recent changes kept per stream for watches from a recent RV.
    pub ring: usize,
    /// Events queued per subscriber before it counts as not reading.
    pub queue: usize,
    /// How long a client waits for a new stream's first LIST.
    pub ready_timeout: Duration,
    /// `--watch-share-across-identities`: let different identities share a
    /// stream after a SubjectAccessReview (needs the proxy's own credentials).
    pub share_across_identities: bool,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            enabled: true,
            linger: Duration::from_secs(30),
            ring: 1024,
            queue: 1024,
            ready_timeout: Duration::from_secs(60),
            share_across_identities: true,
        }
    }
}

/// What a stream needs of the hub: where to ask, its settings, where to
/// count. Never the hub's map of streams: the hub alone decides which
/// streams exist.
pub(crate) struct Ctx {
    pub(crate) upstream: Upstream,
    pub(crate) cfg: HubConfig,
    pub(crate) stats: Arc<Stats>,
    /// Collections (group, resource) the apiserver answered in JSON when
    /// asked for protobuf first: custom resources.
    json_only: Mutex<HashSet<(String, String)>>,
}

impl Ctx {
    pub(crate) fn new(upstream: Upstream, cfg: HubConfig, stats: Arc<Stats>) -> Ctx {
        Ctx {
            upstream,
            cfg,
            stats,
            json_only: Mutex::default(),
        }
    }

    /// Records that the apiserver has no protobuf for a collection.
    pub(crate) fn answers_json(&self, group: &str, resource: &str) {
        self.json_only
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((group.to_string(), resource.to_string()));
    }

    /// Whether the apiserver answered a collection in JSON to protobuf.
    pub(crate) fn is_json_only(&self, group: &str, resource: &str) -> bool {
        self.json_only
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&(group.to_string(), resource.to_string()))
    }
}

/// The hub's own accounting (also exported as metrics).
#[derive(Debug, Default)]
pub struct Stats {
    pub streams: AtomicU64,
    pub subscribers: AtomicU64,
    pub events: AtomicU64,
    pub deliveries: AtomicU64,
    pub evictions: AtomicU64,
    pub cache_objects: AtomicU64,
    pub cache_bytes: AtomicU64,
    pub expired: AtomicU64,
    pub relists: AtomicU64,
    pub upstream_lists: AtomicU64,
    pub upstream_watches: AtomicU64,
}

/// A point-in-time copy of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubStats {
    pub streams: u64,
    pub subscribers: u64,
    pub events: u64,
    pub deliveries: u64,
    pub evictions: u64,
    pub cache_objects: u64,
    pub cache_bytes: u64,
    pub expired: u64,
    pub relists: u64,
    pub upstream_lists: u64,
    pub upstream_watches: u64,
}

impl Stats {
    pub(crate) fn snapshot(&self) -> HubStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        HubStats {
            streams: l(&self.streams),
            subscribers: l(&self.subscribers),
            events: l(&self.events),
            deliveries: l(&self.deliveries),
            evictions: l(&self.evictions),
            cache_objects: l(&self.cache_objects),
            cache_bytes: l(&self.cache_bytes),
            expired: l(&self.expired),
            relists: l(&self.relists),
            upstream_lists: l(&self.upstream_lists),
            upstream_watches: l(&self.upstream_watches),
        }
    }

    /// Moves a cache's share of the totals from `before` to `after`
    /// (objects, bytes).
    pub(crate) fn cache_moved(&self, before: (u64, u64), after: (u64, u64)) {
        for (counter, (b, a)) in [
            (&self.cache_objects, (before.0, after.0)),
            (&self.cache_bytes, (before.1, after.1)),
        ] {
            if a >= b {
                counter.fetch_add(a - b, Ordering::Relaxed);
            } else {
                counter.fetch_sub(b - a, Ordering::Relaxed);
            }
        }
    }

    /// Pushes the gauges (cheap; called when streams or subscribers change).
    pub(crate) fn publish(&self) {
        let s = self.snapshot();
        metrics::gauge!("breakwater_watch_upstream_streams").set(s.streams as f64);
        metrics::gauge!("breakwater_watch_subscribers").set(s.subscribers as f64);
        let ratio = if s.streams == 0 {
            0.0
        } else {
            s.subscribers as f64 / s.streams as f64
        };
        metrics::gauge!("breakwater_watch_shared_ratio").set(ratio);
    }

    /// Pushes everything (counters as absolute values).
    pub(crate) fn export(&self) {
        self.publish();
        let s = self.snapshot();
        metrics::counter!("breakwater_watch_events_total").absolute(s.events);
        metrics::counter!("breakwater_watch_deliveries_total").absolute(s.deliveries);
        metrics::counter!("breakwater_watch_evictions_total").absolute(s.evictions);
        metrics::counter!("breakwater_watch_expired_total").absolute(s.expired);
        metrics::counter!("breakwater_watch_relists_total").absolute(s.relists);
        metrics::gauge!("breakwater_watch_cache_objects").set(s.cache_objects as f64);
        metrics::gauge!("breakwater_watch_cache_bytes").set(s.cache_bytes as f64);
    }
}
