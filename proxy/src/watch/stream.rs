//! One shared upstream stream: its state, and how an upstream event reaches
//! the cache and the subscribers.
//!
//! The [`reflector`](crate::watch::reflector) LISTs and WATCHes the
//! collection and hands each frame to [`Stream::on_frame`]: the event is
//! read once (type, key, RV, labels, selectable fields), applied to the
//! [`Cache`], and fanned out to the subscribers — all under one lock, so a
//! client joining under that lock gets a snapshot (or a replay) and then
//! the live events with no gap and no duplicate.
//!
//! Upstream trouble is hidden: a watch that ends or breaks is re-opened from
//! the last RV seen; a 410 makes the stream relist once and pass the
//! apiserver's own ERROR event to its subscribers, ending their streams so
//! they relist — from this cache. A stream without subscribers lingers,
//! then closes; the hub, which alone decides which streams exist, then
//! forgets it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytes::Bytes;
use http::HeaderMap;
use tokio::sync::{OnceCell, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::Chain;
use crate::watch::cache::{Cache, Listed};
use crate::watch::codec::{Codec, EventType};
use crate::watch::context::Ctx;
use crate::watch::error::{Failure, FetchError};
use crate::watch::fanout::{SendError, Subscription};
use crate::watch::filter::{Selector, indexed_field, selectable_fields};
use crate::watch::key::StreamKey;
use crate::watch::subs::{Sub, Subs};

/// What joiners wait on.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub live: bool,
    pub rv: u64,
    /// Nothing in this collection changed up to here (see
    /// [`Stream::reach`]).
    pub fresh: u64,
    pub failed: Option<Failure>,
    pub closed: bool,
    /// Not live, and its last LIST could not even connect to the apiserver:
    /// joiners are forwarded (and fail as fast) rather than wait for it.
    pub unreachable: bool,
}

pub(crate) struct State {
    /// Listed, and not expired since.
    pub(crate) live: bool,
    pub(crate) closed: bool,
    /// The task ended and the accounting was undone.
    shut: bool,
    pub(crate) failed: Option<Failure>,
    /// See [`Progress::unreachable`].
    pub(crate) unreachable: bool,
    pub(crate) cache: Cache,
    pub(crate) subs: Subs,
    /// Since when nobody has used the stream (see [`Stream::idle_close`]).
    pub(crate) idle_since: Option<Instant>,
}

/// The result of a freshness check, shared by the clients of one round.
pub(crate) type FreshRound = Arc<OnceCell<Result<u64, Arc<FetchError>>>>;

/// One shared upstream stream.
pub struct Stream {
    pub key: StreamKey,
    pub(crate) ctx: Arc<Ctx>,
    /// The encoding the apiserver answered the first LIST in (see
    /// [`Stream::codec`]).
    codec: OnceLock<Codec>,
    /// The selectable fields of the collection's type (see
    /// [`selectable_fields`]).
    pub(crate) fields: &'static [&'static str],
    /// The identity headers of the latest donor (credentials rotate).
    headers: Mutex<HeaderMap>,
    state: Mutex<State>,
    progress: watch::Sender<Progress>,
    /// The next freshness check: every client that takes it before it
    /// starts shares its answer.
    pub(crate) fresh_round: Mutex<FreshRound>,
    /// When the latest freshness round began.
    pub(crate) fresh_last: Mutex<Option<Instant>>,
    next_id: AtomicU64,
    pub(crate) cancel: CancellationToken,
    /// One gap probe at a time (see [`Stream::extend_back`]).
    pub(crate) probe: tokio::sync::Mutex<()>,
}

/// How one upstream WATCH ended.
pub(crate) enum WatchEnd {
    /// Ended or broke: re-watch from the last RV.
    Again,
    /// 410: relist. The ERROR event frame to pass on.
    Expired(Bytes),
    Refused(Failure),
    Closed,
}

impl Stream {
    /// A stream for `key`, not running yet: the hub runs
    /// [`Stream::run`] on its task tracker and forgets the stream when it
    /// returns.
    pub(crate) fn new(
        key: StreamKey,
        headers: HeaderMap,
        ctx: Arc<Ctx>,
        cancel: CancellationToken,
    ) -> Arc<Stream> {
        let codec = key.codec;
        let fields = selectable_fields(&key.target.group, &key.target.resource);
        let index = indexed_field(&key.target.group, &key.target.resource);
        ctx.stats.streams.fetch_add(1, Ordering::Relaxed);
        ctx.stats.publish();
        Arc::new(Stream {
            key,
            fields,
            codec: OnceLock::new(),
            headers: Mutex::new(headers),
            state: Mutex::new(State {
                live: false,
                closed: false,
                shut: false,
                failed: None,
                unreachable: false,
                cache: Cache::new(codec, ctx.cfg.ring).indexed(index),
                subs: Subs::default(),
                idle_since: None,
            }),
            progress: watch::channel(Progress::default()).0,
            fresh_round: Mutex::new(Arc::new(OnceCell::new())),
            fresh_last: Mutex::new(None),
            next_id: AtomicU64::new(1),
            cancel,
            probe: tokio::sync::Mutex::new(()),
            ctx,
        })
    }

    /// The stream's encoding: what the apiserver answered its first LIST
    /// in, else what it asks for. Every frame it keeps and serves is in it.
    pub(crate) fn codec(&self) -> Codec {
        self.codec.get().copied().unwrap_or(self.key.codec)
    }

    /// Settles the encoding on the first answer; `false` if a later one
    /// differs (it cannot be mixed into the cache).
    pub(crate) fn settle_codec(&self, answered: Codec) -> bool {
        let settled = *self.codec.get_or_init(|| {
            if answered != self.key.codec {
                // Custom resources have no protobuf: its clients get JSON
                // from the apiserver, and from the JSON stream from now on.
                self.ctx
                    .answers_json(&self.key.target.group, &self.key.target.resource);
            }
            answered
        });
        settled == answered
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation leaves the state consistent; a panic elsewhere
        // must not take every watch down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_headers(&self, headers: HeaderMap) {
        *self.headers.lock().unwrap_or_else(|e| e.into_inner()) = headers;
    }

    pub(crate) fn headers(&self) -> HeaderMap {
        self.headers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Closed (idle, refused, shut down): the hub starts a new one instead.
    pub(crate) fn is_closed(&self) -> bool {
        self.progress.borrow().closed
    }

    pub(crate) fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    pub(crate) fn publish(&self, st: &State) {
        self.progress.send_modify(|p| {
            p.live = st.live;
            p.rv = st.cache.rv;
            p.fresh = st.cache.fresh;
            p.failed = st.failed.clone();
            p.closed = st.closed;
            p.unreachable = st.unreachable && !st.live;
        });
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Replaces the cache with a fresh LIST; the ring restarts at its RV.
    pub(crate) fn install(&self, listed: Listed) {
        let mut st = self.lock();
        let before = st.cache.size();
        st.cache.install(listed);
        self.ctx.stats.cache_moved(before, st.cache.size());
        st.live = true;
        st.unreachable = false;
        self.publish(&st);
    }

    /// Applies one upstream watch frame; `Some` ends this upstream watch.
    pub(crate) fn on_frame(&self, frame: Bytes) -> Option<WatchEnd> {
        let ev = match self.codec().decode_event(&frame) {
            Ok(Some(ev)) => ev,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(error = %Chain(&e), "undecodable upstream watch event; re-watching");
                return Some(WatchEnd::Again);
            }
        };
        let ty = match ev.ty {
            Some(EventType::Error) => {
                if self.codec().status_code(&ev.object) == Some(410) {
                    return Some(WatchEnd::Expired(frame));
                }
                tracing::warn!(status = %String::from_utf8_lossy(&ev.object), "upstream watch ERROR event; re-watching");
                return Some(WatchEnd::Again);
            }
            Some(ty) => ty,
            // An event type this proxy does not know: skipped, as client-go does.
            None => return None,
        };
        let fields = if ty == EventType::Bookmark {
            &[][..]
        } else {
            self.fields
        };
        let meta = match self.codec().read(&ev.object, fields) {
            Ok(read) => read.meta,
            Err(e) => {
                tracing::warn!(error = %Chain(&e), "undecodable object in an upstream watch event; re-watching");
                return Some(WatchEnd::Again);
            }
        };
        if ty == EventType::Bookmark {
            let rv = meta.rv;
            let mut st = self.lock();
            if st.cache.bookmark(rv) {
                st.subs.retain(|s| {
                    if !s.bookmarks || s.min_rv >= rv {
                        return true;
                    }
                    s.tx.try_send(frame.clone()) != Err(SendError::Full)
                });
                self.publish(&st);
            }
            return None;
        }
        let s = &self.ctx.stats;
        s.events.fetch_add(1, Ordering::Relaxed);
        let mut guard = self.lock();
        let st = &mut *guard;
        let before = st.cache.size();
        let change = st.cache.apply(ty, meta, ev.object, frame)?;
        s.cache_moved(before, st.cache.size());
        let (codec, rv) = (self.codec(), change.rv);
        let (mut delivered, mut evicted) = (0u64, 0u64);
        st.subs
            .retain_seeing(change.old_meta(), change.new_meta(), |sub| {
                if rv <= sub.min_rv {
                    return true;
                }
                let Some(b) = change.frame_for(&sub.sel, codec) else {
                    return true;
                };
                match sub.tx.try_send(b) {
                    Ok(()) => {
                        delivered += 1;
                        true
                    }
                    Err(SendError::Full) => {
                        evicted += 1;
                        false
                    }
                    Err(SendError::Closed) => false,
                }
            });
        s.deliveries.fetch_add(delivered, Ordering::Relaxed);
        if evicted > 0 {
            s.evictions.fetch_add(evicted, Ordering::Relaxed);
            tracing::info!(evicted, path = %self.key.target.path(), "closed shared watchers that stopped reading");
        }
        self.publish(st);
        None
    }

    /// The upstream said 410: pass its ERROR event to every subscriber, end
    /// their streams (they relist, from this cache once it is refilled),
    /// and hold joiners until the relist is in.
    pub(crate) fn expire(&self, frame: Bytes) {
        let s = &self.ctx.stats;
        s.expired.fetch_add(1, Ordering::Relaxed);
        s.relists.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        st.cache.expire();
        for sub in st.subs.take() {
            let _ = sub.tx.try_send(frame.clone());
        }
        st.live = false;
        self.publish(&st);
    }

    /// The apiserver refused: end every subscriber, tell joiners why, and
    /// close.
    pub(crate) fn fail(&self, f: Failure) {
        tracing::info!(status = %f.status, path = %self.key.target.path(), "apiserver refused a shared stream");
        let mut st = self.lock();
        st.failed = Some(f);
        drop(st.subs.take());
        self.publish(&st);
        drop(st);
        self.shut();
    }

    /// Final accounting when the task ends.
    pub(crate) fn shut(&self) {
        let mut st = self.lock();
        if st.shut {
            return;
        }
        st.shut = true;
        st.closed = true;
        let before = st.cache.size();
        st.cache.clear();
        self.ctx.stats.cache_moved(before, st.cache.size());
        drop(st.subs.take());
        self.publish(&st);
        drop(st);
        self.ctx.stats.streams.fetch_sub(1, Ordering::Relaxed);
        self.ctx.stats.publish();
    }

    /// Closes the stream when nobody used it for the linger period: true
    /// when it did (joiners that find it closed ask the hub again).
    pub(crate) fn idle_close(&self) -> bool {
        let mut st = self.lock();
        if !st.subs.is_empty() {
            st.idle_since = None;
            return false;
        }
        let since = *st.idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < self.ctx.cfg.linger {
            return false;
        }
        st.closed = true;
        self.publish(&st);
        drop(st);
        tracing::debug!(path = %self.key.target.path(), "shared stream idle; closing");
        true
    }

    /// Files a subscriber; it gets the events after `min_rv`.
    pub(crate) fn subscribe(st: &mut State, sub: Sub) {
        st.subs.push(sub);
        st.idle_since = None;
    }
}

impl Subscription for Stream {
    fn request_bookmark(&self, id: u64, sel: &Selector) {
        let st = self.lock();
        if let Some(sub) = st.subs.find(id, sel).filter(|s| s.bookmarks) {
            let _ = sub.tx.try_send(st.cache.bookmark_frame(false));
        }
    }

    fn remove(&self, id: u64, sel: &Selector) {
        let mut st = self.lock();
        // Dropped after the lock: keep the critical section to the
        // bookkeeping.
        let sub = st.subs.remove(id, sel);
        if st.subs.is_empty() && st.idle_since.is_none() {
            st.idle_since = Some(Instant::now());
        }
        drop(st);
        drop(sub);
    }
}
