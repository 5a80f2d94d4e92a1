//! The watch multiplexer: N identical or node-scoped watches cost the
//! apiserver one.
//!
//! ```text
//! Hub::serve(request)
//!   key::eligible     plain-JSON collection watch or LIST rv=0, selectors we can evaluate?
//!   broad key         (collection, identity) — no selector upstream
//!     stream::Stream  LIST + WATCH upstream, cache, ring, re-watch, 410 → relist
//!       join          snapshot / replay / 410, then live events (fanout::SubBody)
//!       list          LIST rv=0 from the cache
//!   list::Coalescer   identical concurrent consistent LISTs share one upstream request
//!   exact key         only when the broad LIST/WATCH is refused (403)
//! ```
//!
//! Sharing is scoped to one identity (same user and groups, so the same
//! authorization decisions): a stream speaks upstream with the credentials
//! of the clients that share it. Cross-identity sharing (after a
//! SubjectAccessReview) is not implemented.
//!
//! Anything the hub cannot answer exactly as the apiserver would (Tables,
//! protobuf, consistent LISTs, `resourceVersionMatch=Exact`, selectors on
//! fields this proxy cannot read) returns `None`, and the proxy forwards it
//! as before.

pub mod fanout;
pub mod filter;
pub mod key;
pub mod list;
pub mod stream;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderMap, Response, StatusCode, Uri};
use tokio_util::sync::CancellationToken;

use crate::classify::RequestInfo;
use crate::identity::Identity;
use crate::upstream::{Body, Upstream};
use key::{Eligible, Mode, StreamKey};
use stream::{JoinError, Stream, identity_headers};

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
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            enabled: true,
            linger: Duration::from_secs(30),
            ring: 1024,
            queue: 1024,
            ready_timeout: Duration::from_secs(60),
        }
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
    fn snapshot(&self) -> HubStats {
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
    fn export(&self) {
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

/// What streams share with the hub.
pub(crate) struct HubShared {
    pub(crate) upstream: Upstream,
    pub(crate) cfg: HubConfig,
    /// Bounded by what clients keep open: a stream leaves when it has had
    /// no subscriber for the linger period.
    pub(crate) streams: Mutex<HashMap<StreamKey, Arc<Stream>>>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) cancel: CancellationToken,
    /// Broad keys the apiserver refused recently: go straight to exact keys.
    /// Bounded: cleared when it reaches [`MAX_REFUSED`].
    refused: Mutex<HashMap<StreamKey, Instant>>,
    /// Identical concurrent consistent LISTs.
    lists: list::Coalescer,
}

const MAX_REFUSED: usize = 10_000;
const REFUSED_TTL: Duration = Duration::from_secs(60);

/// The watch multiplexer. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Hub {
    shared: Arc<HubShared>,
}

enum Outcome {
    Served(Response<Body>),
    Refused(stream::Failure),
    Forward,
}

impl Hub {
    /// `cancel` ends every upstream stream (the proxy's shutdown).
    pub fn new(upstream: Upstream, cfg: HubConfig, cancel: CancellationToken) -> Hub {
        let stats = Arc::new(Stats::default());
        if cfg.enabled {
            let (stats, cancel) = (stats.clone(), cancel.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tick.tick() => stats.export(),
                    }
                }
            });
        }
        Hub {
            shared: Arc::new(HubShared {
                upstream,
                cfg,
                streams: Mutex::new(HashMap::new()),
                stats,
                cancel,
                refused: Mutex::new(HashMap::new()),
                lists: list::Coalescer::default(),
            }),
        }
    }

    /// The hub's accounting now.
    pub fn stats(&self) -> HubStats {
        self.shared.stats.snapshot()
    }

    /// Serves a watch or a LIST rv=0 from a shared stream, or `None` when
    /// the proxy should forward the request as usual. `headers` already
    /// carry the upstream identity (after `identify_upstream`).
    pub async fn serve(
        &self,
        info: &RequestInfo,
        uri: &Uri,
        headers: &HeaderMap,
        identity: &Identity,
    ) -> Option<Response<Body>> {
        if !self.shared.cfg.enabled {
            return None;
        }
        if key::is_consistent_list(info, uri.query()) {
            return self
                .shared
                .lists
                .list(
                    &self.shared.upstream,
                    &key::scope_of(identity),
                    uri,
                    headers,
                )
                .await;
        }
        let req = key::eligible(info, uri.query(), headers, identity)?;
        let ident = identity_headers(headers);
        let broad = req.key(true);
        let broad_refused = req.has_selectors() && self.recently_refused(&broad);
        if !broad_refused {
            match self.serve_on(broad.clone(), &req, &ident).await {
                Outcome::Served(r) => return Some(r),
                Outcome::Forward => return None,
                Outcome::Refused(f) => {
                    if !(f.status == StatusCode::FORBIDDEN && req.has_selectors()) {
                        return Some(f.response());
                    }
                    self.remember_refused(broad);
                }
            }
        }
        // The identity may not list everything, but perhaps what it asked for.
        match self.serve_on(req.key(false), &req, &ident).await {
            Outcome::Served(r) => Some(r),
            Outcome::Refused(f) => Some(f.response()),
            Outcome::Forward => None,
        }
    }

    fn recently_refused(&self, key: &StreamKey) -> bool {
        let map = self
            .shared
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        map.get(key).is_some_and(|t| t.elapsed() < REFUSED_TTL)
    }

    fn remember_refused(&self, key: StreamKey) {
        let mut map = self
            .shared
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_REFUSED {
            map.clear();
        }
        map.insert(key, Instant::now());
    }

    async fn serve_on(&self, key: StreamKey, req: &Eligible, ident: &HeaderMap) -> Outcome {
        let sel = Arc::new(req.selector.clone());
        // A stream may close between lookup and join; a few tries settle it.
        for _ in 0..3 {
            let stream = self.stream_for(&key, ident);
            let res = match &req.mode {
                Mode::Watch(opts) => stream.join(sel.clone(), opts).await,
                Mode::ListCached => stream.list(&sel).await,
            };
            match res {
                Ok(resp) => return Outcome::Served(resp),
                Err(JoinError::Closed) => continue,
                Err(JoinError::Refused(f)) => return Outcome::Refused(f),
                Err(JoinError::Unavailable(why)) => {
                    tracing::info!(reason = %why, "watch hub forwarding instead");
                    return Outcome::Forward;
                }
            }
        }
        Outcome::Forward
    }

    fn stream_for(&self, key: &StreamKey, ident: &HeaderMap) -> Arc<Stream> {
        let mut map = self
            .shared
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(key) {
            s.set_headers(ident.clone());
            return s.clone();
        }
        let s = Stream::start(key.clone(), ident.clone(), self.shared.clone());
        map.insert(key.clone(), s.clone());
        s
    }
}
