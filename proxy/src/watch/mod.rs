//! The watch multiplexer: N identical or node-scoped watches cost the
//! apiserver one.
//!
//! ```text
//! Hub::serve(request)                       (this module: owns which streams exist)
//!   key::eligible     collection watch or LIST rv=0 / consistent, selectors we can evaluate?
//!   share             may this identity join a cross-identity stream? (SubjectAccessReview)
//!   broad key         (collection, shared scope or identity) — no selector upstream
//!     stream          one shared stream: state, an upstream frame → cache → subscribers
//!       reflector     its task: LIST + WATCH upstream, re-watch, 410 → relist
//!       cache         pure: objects at RV, changes since RV, 410?
//!       codec         the encoding seam: frames, object metadata, envelopes
//!         object        JSON objects read borrowed, bytes kept as the apiserver sent them
//!         protobuf      k8s\0 envelopes, length-prefixed frames, a borrowing field scanner
//!       fresh         freshness checks and gap probes (short upstream watches)
//!       serve         join: snapshot / replay / 410, then live events;
//!                     list: LIST rv=0 or consistent LIST from the cache
//!       subs, fanout  subscribers filed by field value; bounded queues and bodies
//!   list::Coalescer   identical concurrent consistent LISTs share one upstream request
//!   exact key         only when the broad LIST/WATCH is refused (403)
//! ```
//!
//! Dependencies run one way, down this picture: a stream knows nothing of
//! the hub (it gets a [`context::Ctx`]), a subscriber's body holds its
//! stream weakly, and the hub alone adds streams to its map and removes
//! them when their task ends.
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
//! Streams are per encoding: JSON and protobuf clients of one collection
//! share two upstream streams. A stream asks for what its clients prefer
//! and keeps what the apiserver answered (custom resources have no
//! protobuf, so their protobuf-first clients get JSON, and once the hub
//! has seen that, share one stream with the JSON clients).
//!
//! Before the hub sends anything upstream for one request — it starts a
//! stream (its LIST and WATCH), or sends a consistent LIST through the
//! [`list::Coalescer`] — it asks the caller's [`Gate`]; the request path
//! charges the request's upstream-bound limits there, and a refusal is
//! answered before anything leaves. Joining a stream that exists, and the
//! hub's own shared, bounded upstream work (freshness checks, at most ten
//! a second per stream; gap probes; cached SubjectAccessReviews), ask
//! nothing.
//!
//! Anything the hub cannot answer exactly as the apiserver would (Tables,
//! `resourceVersionMatch=Exact`, continue tokens, consistent LISTs with
//! more matches than their `limit`, selectors on
//! fields this proxy cannot read) returns `None`, and the proxy forwards it
//! as before.

mod cache;
mod codec;
pub mod context;
pub mod error;
mod fanout;
pub mod filter;
mod fresh;
pub mod key;
pub mod list;
pub mod object;
mod reflector;
mod serve;
pub mod share;
mod stream;
mod subs;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::{HeaderMap, Response, StatusCode, Uri};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::classify::RequestInfo;
use crate::identity::Identity;
use crate::upstream::{Body, Upstream};
use codec::Codec;
use context::Ctx;
pub use context::{HubConfig, HubStats, Stats};
use error::{Failure, JoinError};
use key::{Eligible, Mode, SHARED_SCOPE, StreamKey};
use stream::Stream;

/// The hub's state: the streams, and what decides who may use them.
struct HubShared {
    ctx: Arc<Ctx>,
    /// The streams that exist. Only the hub adds and removes them: a stream
    /// is added when a donor opens it and removed when its task ends.
    /// Bounded by what clients keep open: a stream closes when it has had
    /// no subscriber for the linger period.
    streams: Mutex<HashMap<StreamKey, Arc<Stream>>>,
    /// Ends every stream (the proxy's shutdown).
    cancel: CancellationToken,
    /// Every task of the hub (streams, metrics export), awaited at shutdown.
    tasks: TaskTracker,
    /// The runtime the hub was made on, where its streams run.
    home: Option<tokio::runtime::Handle>,
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

impl HubShared {
    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<StreamKey, Arc<Stream>>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets `stream` once its task has ended (unless a newer stream
    /// already took its key).
    fn forget(&self, stream: &Arc<Stream>) {
        let mut map = self.streams();
        if map.get(&stream.key).is_some_and(|s| Arc::ptr_eq(s, stream)) {
            map.remove(&stream.key);
        }
    }

    /// Whether `key` has a stream that still serves.
    fn has_stream(&self, key: &StreamKey) -> bool {
        self.streams().get(key).is_some_and(|s| !s.is_closed())
    }
}

/// The headers that say who the caller is, copied from the client request
/// (after the proxy set them for its upstream auth mode).
fn identity_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        let n = name.as_str();
        if n == "authorization" || n.starts_with("x-remote-") || n.starts_with("impersonate-") {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

const MAX_REFUSED: usize = 10_000;
const REFUSED_TTL: Duration = Duration::from_secs(60);

/// Asked before the hub sends anything upstream on one request's behalf.
/// `Err` is the response to answer instead (a 429); the hub then sends
/// nothing. It may be asked more than once for one request and must
/// charge it at most once.
pub type Gate<'a> = dyn FnMut() -> Result<(), Box<Response<Body>>> + Send + 'a;

/// The watch multiplexer. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Hub {
    shared: Arc<HubShared>,
}

enum Outcome {
    Served(Response<Body>),
    /// The gate refused: answer this, never forward.
    Limited(Response<Body>),
    Refused(Failure),
    Forward,
    /// No stream for the key, and this client may not start one.
    Absent,
}

impl Hub {
    /// `cancel` ends every upstream stream (the proxy's shutdown; then
    /// [`Hub::closed`] waits for them).
    pub fn new(upstream: Upstream, cfg: HubConfig, cancel: CancellationToken) -> Hub {
        let stats = Arc::new(Stats::default());
        let tasks = TaskTracker::new();
        if cfg.enabled {
            let (stats, cancel) = (stats.clone(), cancel.clone());
            tasks.spawn(async move {
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
                ctx: Arc::new(Ctx::new(upstream, cfg, stats)),
                streams: Mutex::new(HashMap::new()),
                cancel,
                tasks,
                home: tokio::runtime::Handle::try_current().ok(),
                refused: Mutex::new(HashMap::new()),
                lists: list::Coalescer::default(),
                share,
                donors: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The hub's accounting now.
    pub fn stats(&self) -> HubStats {
        self.shared.ctx.stats.snapshot()
    }

    /// Waits until every task of the hub has ended (after its cancel token
    /// was cancelled).
    pub async fn closed(&self) {
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }

    /// Serves a watch or a LIST rv=0 from a shared stream, or `None` when
    /// the proxy should forward the request as usual. `headers` already
    /// carry the upstream identity (after `identify_upstream`). `gate` is
    /// asked before anything goes upstream for this request (see [`Gate`]).
    /// Whether [`Hub::serve`] could answer this request at all (a LIST or
    /// a WATCH, with the hub on): the proxy skips the hub for the rest.
    pub fn may_serve(&self, info: &RequestInfo) -> bool {
        self.shared.ctx.cfg.enabled
            && matches!(
                info.verb,
                crate::classify::Verb::List | crate::classify::Verb::Watch
            )
    }

    pub async fn serve(
        &self,
        info: &RequestInfo,
        uri: &Uri,
        headers: &HeaderMap,
        identity: &Identity,
        gate: &mut Gate<'_>,
    ) -> Option<Response<Body>> {
        if !self.shared.ctx.cfg.enabled {
            return None;
        }
        let req = key::eligible(info, uri.query(), headers, identity);
        if key::is_consistent_list(info, uri.query()) {
            if let Some(req) = &req
                && let Some(resp) = self.serve_eligible(req, headers, identity, gate).await
            {
                return Some(resp);
            }
            // Coalesced, but an upstream LIST all the same.
            if let Err(refusal) = gate() {
                return Some(*refusal);
            }
            return self
                .shared
                .lists
                .list(
                    &self.shared.ctx.upstream,
                    &key::scope_of(identity),
                    uri,
                    headers,
                )
                .await;
        }
        self.serve_eligible(&req?, headers, identity, gate).await
    }

    /// [`Hub::serve`] for an eligible request.
    async fn serve_eligible(
        &self,
        req: &Eligible,
        headers: &HeaderMap,
        identity: &Identity,
        gate: &mut Gate<'_>,
    ) -> Option<Response<Body>> {
        let ident = identity_headers(headers);
        // Across identities first, when the apiserver says this one may join.
        if let Some(shared) = self.serve_shared(req, &ident, identity, gate).await {
            return shared;
        }
        let broad = req.key(true);
        let broad_refused = req.has_selectors() && self.recently_refused(&broad);
        if !broad_refused {
            match self.serve_on(broad.clone(), req, &ident, true, gate).await {
                Outcome::Served(r) | Outcome::Limited(r) => return Some(r),
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
        match self.serve_on(req.key(false), req, &ident, true, gate).await {
            Outcome::Served(r) | Outcome::Limited(r) => Some(r),
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
        gate: &mut Gate<'_>,
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
            let key = self.settled_key(key);
            let sent = key.upstream_selectors.clone().unwrap_or_default();
            self.forget_gone_donor(share, &key, &sent).await;
            let donor = share.may_open(identity, &req.target, &sent).await;
            if donor {
                self.record_donor(&key, identity);
            }
            match self.serve_on(key, req, ident, donor, gate).await {
                Outcome::Served(r) | Outcome::Limited(r) => return Some(Some(r)),
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
        let gone = if self.shared.has_stream(key) {
            None
        } else {
            let mut donors = self.shared.donors.lock().unwrap_or_else(|e| e.into_inner());
            donors.remove(key)
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
        gate: &mut Gate<'_>,
    ) -> Outcome {
        let key = self.settled_key(key);
        let sel = Arc::new(req.selector.clone());
        // A stream may close between lookup and join; a few tries settle it.
        // A cold consistent LIST starts the stream too: in a storm it is the
        // first of thousands (each informer's LIST before its WATCH), and
        // they all wait for the one stream instead of each going upstream.
        for _ in 0..3 {
            let stream = match self.stream_for(&key, ident, donor, gate) {
                Ok(Some(stream)) => stream,
                Ok(None) => return Outcome::Absent,
                Err(refusal) => return Outcome::Limited(*refusal),
            };
            let res = match &req.mode {
                Mode::Watch(opts) => {
                    let selectors = (req.label.as_deref(), req.field.as_deref());
                    stream.join(sel.clone(), opts, selectors, gate).await
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

    /// `key`, or for a collection the apiserver answers only in JSON
    /// (custom resources: it has no protobuf for them), the one stream of
    /// the collection whichever encoding its clients asked first: an
    /// existing stream under either key, else the JSON key.
    fn settled_key(&self, key: StreamKey) -> StreamKey {
        let t = &key.target;
        if !self.shared.ctx.is_json_only(&t.group, &t.resource) {
            return key;
        }
        let json = StreamKey {
            codec: Codec::Json,
            ..key.clone()
        };
        let protobuf = StreamKey {
            codec: Codec::Protobuf,
            ..key
        };
        let map = self.shared.streams();
        let live = |k: &StreamKey| map.get(k).is_some_and(|s| !s.is_closed());
        if !live(&json) && live(&protobuf) {
            return protobuf;
        }
        json
    }

    /// The stream for `key`, started with `ident` if there is none (or
    /// only a closed one). Only a `donor` lends the
    /// stream its credentials (the latest donor's carry its upstream
    /// requests); a non-donor joins an existing stream or gets `None`.
    /// Starting one asks `gate` first: `Err` is its refusal.
    fn stream_for(
        &self,
        key: &StreamKey,
        ident: &HeaderMap,
        donor: bool,
        gate: &mut Gate<'_>,
    ) -> Result<Option<Arc<Stream>>, Box<Response<Body>>> {
        let mut map = self.shared.streams();
        if let Some(s) = map.get(key).filter(|s| !s.is_closed()) {
            if donor {
                s.set_headers(ident.clone());
            }
            return Ok(Some(s.clone()));
        }
        if !donor {
            return Ok(None);
        }
        // A new stream LISTs and WATCHes upstream for this request: the
        // gate decides first. Asked under the map's lock, so that of
        // requests racing to start the stream only the one that does is
        // charged (the gate is synchronous: a few atomics, and a response
        // built only when it refuses).
        gate()?;
        let stream = Stream::new(
            key.clone(),
            ident.clone(),
            self.shared.ctx.clone(),
            self.shared.cancel.child_token(),
        );
        map.insert(key.clone(), stream.clone());
        drop(map);
        let hub: Weak<HubShared> = Arc::downgrade(&self.shared);
        let run = stream.clone();
        let run = async move {
            run.clone().run().await;
            if let Some(hub) = hub.upgrade() {
                hub.forget(&run);
            }
        };
        // On the serving runtime even when a privileged client (served on
        // a thread of its own) starts the stream: the fleet joins it.
        match &self.shared.home {
            Some(home) => self.shared.tasks.spawn_on(run, home),
            None => self.shared.tasks.spawn(run),
        };
        Ok(Some(stream))
    }
}
