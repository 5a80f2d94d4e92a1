//! The watch multiplexer: N identical or node-scoped watches cost the
//! apiserver one.
//!
//! ```text
//! Hub::serve(request)
//!   key::eligible     plain-JSON collection watch or LIST rv=0, selectors we can evaluate?
//!   share             may this identity join a cross-identity stream? (SubjectAccessReview)
//!   broad key         (collection, shared scope or identity) — no selector upstream
//!     stream::Stream  LIST + WATCH upstream, cache, ring, re-watch, 410 → relist
//!       object        each object read borrowed (key, RV, labels, fields, TypeMeta),
//!                     its bytes kept as the apiserver sent them
//!       join          snapshot / replay / 410, then live events (fanout::SubBody)
//!       list          LIST rv=0 from the cache; consistent LIST (rv unset) from
//!                     a live stream's cache after the freshness check
//!   list::Coalescer   identical concurrent consistent LISTs share one upstream request
//!   exact key         only when the broad LIST/WATCH is refused (403)
//! ```
//!
//! Sharing is scoped to one identity (same user and groups, so the same
//! authorization decisions) by default: a stream speaks upstream with the
//! credentials of the clients that share it. Across identities only when a
//! cached SubjectAccessReview says the joining identity may do what it
//! asked (verb, collection, selectors), and only when the proxy has
//! credentials of its own to ask with; a denied identity (or a failed
//! review) stays in its own scope, so the apiserver answers it itself — a
//! 403 if it may not. Whose credentials a shared stream uses, and how
//! revocation is bounded: see [`share`].
//!
//! Anything the hub cannot answer exactly as the apiserver would (Tables,
//! protobuf, `resourceVersionMatch=Exact`, continue tokens, consistent LISTs
//! with no live stream or more matches than their `limit`, selectors on
//! fields this proxy cannot read) returns `None`, and the proxy forwards it
//! as before.

pub mod fanout;
pub mod filter;
pub mod key;
pub mod list;
pub mod object;
pub mod share;
pub mod stream;
mod subs;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderMap, Response, StatusCode, Uri};
use tokio_util::sync::CancellationToken;

use crate::classify::RequestInfo;
use crate::identity::Identity;
use crate::upstream::{Body, Upstream};
use key::{Eligible, Mode, SHARED_SCOPE, StreamKey};
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
    /// Cross-identity sharing decisions; `None` when disabled or when the
    /// proxy has no credentials of its own to ask the apiserver with.
    share: Option<share::Sharing>,
    /// Per shared-scope key, the identity whose credentials its stream
    /// uses. When the stream is gone (refused, idle) its donor's answers
    /// are forgotten, so a donor that lost access is asked again at once.
    /// Bounded: cleared when it reaches [`MAX_REFUSED`].
    donors: Mutex<HashMap<StreamKey, Identity>>,
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
    /// No stream for the key, and this client may not start one.
    Absent,
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
        // Asking needs credentials of our own (front-proxy, impersonate, or
        // passthrough with --upstream-client-cert/--upstream-token-file).
        let share = (cfg.enabled && cfg.share_across_identities && upstream.has_own_credentials())
            .then(|| {
                share::Sharing::new(
                    Arc::new(upstream.clone()),
                    share::CACHE_SIZE,
                    share::POSITIVE_TTL,
                    share::NEGATIVE_TTL,
                )
            });
        Hub {
            shared: Arc::new(HubShared {
                upstream,
                cfg,
                streams: Mutex::new(HashMap::new()),
                stats,
                cancel,
                refused: Mutex::new(HashMap::new()),
                lists: list::Coalescer::default(),
                share,
                donors: Mutex::new(HashMap::new()),
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
        let req = key::eligible(info, uri.query(), headers, identity);
        if key::is_consistent_list(info, uri.query()) {
            if let Some(req) = &req
                && let Some(resp) = self.serve_eligible(req, headers, identity).await
            {
                return Some(resp);
            }
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
        self.serve_eligible(&req?, headers, identity).await
    }

    /// [`Hub::serve`] for an eligible request.
    async fn serve_eligible(
        &self,
        req: &Eligible,
        headers: &HeaderMap,
        identity: &Identity,
    ) -> Option<Response<Body>> {
        let ident = identity_headers(headers);
        // Across identities first, when the apiserver says this one may join.
        if let Some(shared) = self.serve_shared(req, &ident, identity).await {
            return shared;
        }
        let broad = req.key(true);
        let broad_refused = req.has_selectors() && self.recently_refused(&broad);
        if !broad_refused {
            match self.serve_on(broad.clone(), req, &ident, true).await {
                Outcome::Served(r) => return Some(r),
                Outcome::Forward | Outcome::Absent => return None,
                Outcome::Refused(f) => {
                    if !(f.status == StatusCode::FORBIDDEN && req.has_selectors()) {
                        return Some(f.response());
                    }
                    self.remember_refused(broad);
                }
            }
        }
        // The identity may not list everything, but perhaps what it asked for.
        match self.serve_on(req.key(false), req, &ident, true).await {
            Outcome::Served(r) => Some(r),
            Outcome::Refused(f) => Some(f.response()),
            Outcome::Forward | Outcome::Absent => None,
        }
    }

    /// Serves the request from a stream shared across identities when a
    /// SubjectAccessReview allows this identity what it asked. `None`: stay
    /// in the identity's own scope; `Some(None)`: forward.
    async fn serve_shared(
        &self,
        req: &Eligible,
        ident: &HeaderMap,
        identity: &Identity,
    ) -> Option<Option<Response<Body>>> {
        let share = self.shared.share.as_ref()?;
        let (label, field) = (req.label.clone(), req.field.clone());
        if !share
            .may_join(identity, req.verb(), &req.target, label, field)
            .await
        {
            return None;
        }
        // The broad stream, then (with selectors) the exact one.
        let mut keys = vec![req.key_in(SHARED_SCOPE, true)];
        if req.has_selectors() {
            keys.push(req.key_in(SHARED_SCOPE, false));
        }
        for key in keys {
            let sent = key.upstream_selectors.clone().unwrap_or_default();
            self.forget_gone_donor(share, &key, &sent).await;
            let donor = share.may_open(identity, &req.target, &sent).await;
            if donor {
                self.record_donor(&key, identity);
            }
            match self.serve_on(key, req, ident, donor).await {
                Outcome::Served(r) => return Some(Some(r)),
                Outcome::Forward => return Some(None),
                // The stream spoke with a donor's credentials, perhaps not
                // this client's: never pass that refusal on. If this client
                // lent its credentials, ask about it again next time.
                Outcome::Refused(_) => {
                    if donor {
                        share.forget(identity, &req.target, &sent).await;
                    }
                }
                Outcome::Absent => {}
            }
        }
        None
    }

    /// If `key` has no stream now, forgets the answers of the identity
    /// whose credentials the last one used (it may have been refused).
    async fn forget_gone_donor(
        &self,
        share: &share::Sharing,
        key: &StreamKey,
        sent: &(Option<String>, Option<String>),
    ) {
        // Lock order: the hub's map, then the donors.
        let gone = {
            let streams = self
                .shared
                .streams
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if streams.contains_key(key) {
                None
            } else {
                let mut donors = self.shared.donors.lock().unwrap_or_else(|e| e.into_inner());
                donors.remove(key)
            }
        };
        if let Some(identity) = gone {
            share.forget(&identity, &key.target, sent).await;
        }
    }

    fn record_donor(&self, key: &StreamKey, identity: &Identity) {
        let mut donors = self.shared.donors.lock().unwrap_or_else(|e| e.into_inner());
        if donors.len() >= MAX_REFUSED && !donors.contains_key(key) {
            donors.clear();
        }
        donors.insert(key.clone(), identity.clone());
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

    async fn serve_on(
        &self,
        key: StreamKey,
        req: &Eligible,
        ident: &HeaderMap,
        donor: bool,
    ) -> Outcome {
        let sel = Arc::new(req.selector.clone());
        // A stream may close between lookup and join; a few tries settle it.
        // A consistent LIST is served by a live stream, never starts one: a
        // one-off LIST is cheaper upstream than a LIST and a WATCH.
        let create = !matches!(req.mode, Mode::ListConsistent { .. });
        for _ in 0..3 {
            let Some(stream) = self.stream_for(&key, ident, donor, create) else {
                return Outcome::Absent;
            };
            let res = match &req.mode {
                Mode::Watch(opts) => {
                    let selectors = (req.label.as_deref(), req.field.as_deref());
                    stream.join(sel.clone(), opts, selectors).await
                }
                Mode::ListCached => stream.list(&sel, None).await,
                Mode::ListConsistent { limit } => stream.list(&sel, Some(*limit)).await,
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

    /// The stream for `key`, started with `ident` if there is none and
    /// `create` says so. Only a
    /// `donor` lends the stream its credentials (the latest donor's carry
    /// its upstream requests); a non-donor joins an existing stream or
    /// gets `None`.
    fn stream_for(
        &self,
        key: &StreamKey,
        ident: &HeaderMap,
        donor: bool,
        create: bool,
    ) -> Option<Arc<Stream>> {
        let mut map = self
            .shared
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(key) {
            if donor {
                s.set_headers(ident.clone());
            }
            return Some(s.clone());
        }
        if !donor || !create {
            return None;
        }
        let s = Stream::start(key.clone(), ident.clone(), self.shared.clone());
        map.insert(key.clone(), s.clone());
        Some(s)
    }
}
