//! Freshness: when a stream may answer as the apiserver would right now.
//!
//! A consistent request (resourceVersion unset) must see every change up to
//! the moment it arrived. The stream learns the apiserver's current RV from
//! one cheap LIST (`limit=1`) shared by every client of a round, then waits
//! until its cache has reached it — or, since that RV is the store's and
//! global, until one short upstream watch confirms nothing in this
//! collection changed in between. Short watches also catch up clients that
//! watch from an RV older than the stream's ring.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::error::Chain;
use crate::watch::codec::EventType;
use crate::watch::error::{FetchError, JoinError, Unavailable};
use crate::watch::stream::Stream;

/// How long a freshness round waits for more clients before it checks.
const FRESH_GATHER: Duration = Duration::from_millis(5);

/// Rounds of one stream start at least this far apart: under a storm of
/// consistent LISTs, at most 4 freshness checks a second reach the
/// apiserver, each answering every client that arrived before it began.
/// (100 ms until session 7: a 5,000-agent storm of consistent LISTs made
/// 44 upstream LISTs over its 5 s; the apiserver's own answer to a
/// consistent LIST of a large collection takes longer than the 250 ms a
/// client may now wait for the next round, and a lone request never
/// waits.)
pub(crate) const FRESH_EVERY: Duration = Duration::from_millis(250);

/// How long a consistent joiner waits for the stream's own events before
/// probing upstream (see [`Stream::reach`]).
const REACH_AT_ONCE: Duration = Duration::from_millis(200);

/// The bound of one short upstream watch (it asks for `timeoutSeconds=1`).
const SHORT_WATCH: Duration = Duration::from_secs(5);

/// How a [`Stream::short_watch`] ended.
enum Short<T> {
    /// The event callback stopped it with this.
    Stopped(T),
    /// The apiserver ended it (its `timeoutSeconds`).
    Ended,
    /// The event callback gave up on it.
    GaveUp,
}

/// What [`Stream::catch_up`] read.
pub(crate) enum Gap {
    /// The client's events after its RV, up to the stream's floor.
    Events(Vec<Bytes>),
    /// The apiserver's ERROR event (410: the RV is too old), to pass on.
    Error(Bytes),
}

impl Stream {
    /// The apiserver's current RV, from a LIST with limit=1. Every client
    /// that asked before the check started shares it; a round gathers
    /// arrivals for [`FRESH_GATHER`] before it starts, and starts no sooner
    /// than [`FRESH_EVERY`] after the previous round if that one answered
    /// several clients, so a storm of
    /// consistent LISTs and joins costs at most four cheap checks a second,
    /// not one per client. Its item, if any, also tells a
    /// stream that does not know yet whether list items carry TypeMeta.
    pub(crate) async fn fresh_rv(&self) -> Result<u64, Unavailable> {
        let round = self
            .fresh_round
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        round
            .get_or_init(|| async {
                let last = *self.fresh_last.lock().unwrap_or_else(|e| e.into_inner());
                let gathered = Instant::now() + FRESH_GATHER;
                let start = last.map_or(gathered, |l| gathered.max(l + FRESH_EVERY));
                tokio::time::sleep_until(start).await;
                {
                    // Clients arriving from now on need a check of their own.
                    let mut slot = self.fresh_round.lock().unwrap_or_else(|e| e.into_inner());
                    *slot = Arc::new(OnceCell::new());
                    // Only a round that answers several clients spaces the
                    // next: a lone client's consistent requests in sequence
                    // (a controller, kubectl) are never held back, and cost
                    // the apiserver one cheap check each, less than
                    // forwarding them would.
                    let shared = Arc::strong_count(&round) > 1;
                    *self.fresh_last.lock().unwrap_or_else(|e| e.into_inner()) =
                        shared.then(Instant::now);
                }
                self.check_fresh().await.map_err(Arc::new)
            })
            .await
            .clone()
            .map_err(Unavailable::Freshness)
    }

    async fn check_fresh(&self) -> Result<u64, FetchError> {
        self.ctx
            .stats
            .upstream_lists
            .fetch_add(1, Ordering::Relaxed);
        let resp = self.get(&self.query("limit=1"), false).await?;
        if !resp.status().is_success() {
            return Err(FetchError::Status(resp.status()));
        }
        let codec = self.answered(&resp)?;
        let body = Self::body(resp).await?;
        let page = codec.decode_list(&body).map_err(FetchError::Decode)?;
        // An item tells how the apiserver lists this collection's items,
        // for a stream whose LIST had none to tell.
        if let Some(item) = page.items.first()
            && let Ok(read) = codec.read(item, &[])
        {
            let mut st = self.lock();
            if st.cache.item_type_meta.is_none() {
                st.cache.item_type_meta = read.type_meta.uniform();
            }
        }
        page.resource_version.parse().map_err(|_| {
            FetchError::Decode(crate::watch::error::DecodeError::Shape(
                "no resourceVersion in the freshness check",
            ))
        })
    }

    /// Waits until the stream is live and has seen `rv`.
    pub(crate) async fn ready(&self, rv: u64) -> Result<(), JoinError> {
        let mut rx = self.progress();
        let wait = rx.wait_for(|p| {
            p.closed || p.failed.is_some() || p.unreachable || (p.live && p.rv.max(p.fresh) >= rv)
        });
        let p = match tokio::time::timeout(self.ctx.cfg.ready_timeout, wait).await {
            Ok(Ok(p)) => p.clone(),
            Ok(Err(_)) => return Err(JoinError::Closed),
            Err(_) => return Err(Unavailable::NotReady.into()),
        };
        if p.unreachable && !(p.live && p.rv.max(p.fresh) >= rv) {
            // Forwarded, it fails as fast (503) instead of waiting out the
            // stream's retries; the apiserver is not reachable to load.
            return Err(Unavailable::Unreachable.into());
        }
        if let Some(f) = p.failed {
            return Err(JoinError::Refused(f));
        }
        if p.closed {
            return Err(JoinError::Closed);
        }
        Ok(())
    }

    /// Waits until the stream is known to hold everything up to `need`, the
    /// apiserver's RV from the freshness check.
    ///
    /// That RV is the store's, global: when only other collections changed
    /// since this stream's last event, no event will ever carry the stream
    /// there, and bookmarks come about once a minute. So if the stream does
    /// not get there at once, one short upstream watch from the stream's RV
    /// (shared by every joiner waiting meanwhile) tells whether anything in
    /// this collection changed up to `need`: if not, the stream is fresh;
    /// if so, the stream's own watch brings the change and we look again.
    pub(crate) async fn reach(&self, need: u64) -> Result<(), JoinError> {
        if need == 0 {
            return self.ready(0).await;
        }
        let until = Instant::now() + self.ctx.cfg.ready_timeout;
        loop {
            if let Ok(r) = tokio::time::timeout(REACH_AT_ONCE, self.ready(need)).await {
                return r;
            }
            if Instant::now() >= until {
                return Err(Unavailable::NotReached.into());
            }
            let _one = self.probe.lock().await;
            let from = {
                let st = self.lock();
                if st.cache.position() >= need {
                    continue;
                }
                st.cache.rv
            };
            if self.gap_is_empty(from, need).await == Some(true) {
                let mut st = self.lock();
                // A relist meanwhile starts over from its own, newer RV.
                if st.cache.rv >= from && st.live {
                    st.cache.fresh = st.cache.fresh.max(need);
                    self.publish(&st);
                }
            }
        }
    }

    /// Lets the ring reach back to `n` when the apiserver confirms nothing
    /// in this collection changed between `n` and the ring's floor.
    ///
    /// Clients that LIST consistently (forwarded) and then WATCH from that
    /// RV usually ask for an RV a little older than a stream that started
    /// after their LIST. One short upstream watch from `n` (ending at once
    /// or after a second) tells whether the gap is empty; if it is, this
    /// and every later client from `n` on are served locally.
    pub(crate) async fn extend_back(&self, n: u64) {
        if self.lock().cache.gap_below(n).is_none() {
            return;
        }
        let _one = self.probe.lock().await;
        let Some(floor) = self.lock().cache.gap_below(n) else {
            return;
        };
        // Clients of a storm that listed before the stream began share an
        // RV: once one probe found a change in their gap, the others go
        // straight to their catch-up.
        if self.lock().cache.gap_known_nonempty(n, floor) {
            return;
        }
        match self.gap_is_empty(n, floor).await {
            Some(true) => self.lock().cache.extend_floor(n, floor),
            Some(false) => self.lock().cache.note_nonempty_gap(n, floor),
            None => {}
        }
    }

    /// The events a watch from `n` with the client's own `selectors` gets
    /// up to `floor` (where the stream's ring begins), read from one short
    /// upstream watch (`timeoutSeconds=1`; the apiserver replays what it
    /// has at once). The apiserver computes the selector transitions, so
    /// they are exactly a direct watch's; the shared stream carries on from
    /// `floor`. `None` (forward the watch instead) when the apiserver does
    /// not answer in time or the gap is larger than the ring.
    pub(crate) async fn catch_up(
        &self,
        n: u64,
        floor: u64,
        (label, field): (Option<&str>, Option<&str>),
    ) -> Option<Gap> {
        let query = {
            let mut q = form_urlencoded::Serializer::new(String::new());
            q.append_pair("watch", "1");
            q.append_pair("resourceVersion", &n.to_string());
            q.append_pair("timeoutSeconds", "1");
            if let Some(l) = label {
                q.append_pair("labelSelector", l);
            }
            if let Some(f) = field {
                q.append_pair("fieldSelector", f);
            }
            q.finish()
        };
        let mut frames = Vec::new();
        let ring = self.ctx.cfg.ring;
        // Break(Some(Some(frame))): the apiserver's ERROR; Break(Some(None)):
        // the replay reached the floor.
        let end = self
            .short_watch(&query, |frame, ty, rv| match ty {
                None => ControlFlow::Break(None),
                Some(EventType::Error) => ControlFlow::Break(Some(Some(frame))),
                Some(EventType::Bookmark) if rv >= floor => ControlFlow::Break(Some(None)),
                Some(EventType::Bookmark) => ControlFlow::Continue(()),
                _ if rv > floor => ControlFlow::Break(Some(None)),
                _ if frames.len() < ring => {
                    frames.push(frame);
                    ControlFlow::Continue(())
                }
                _ => ControlFlow::Break(None),
            })
            .await
            .ok()?;
        Some(match end {
            Short::Stopped(Some(error)) => Gap::Error(error),
            // Reached the floor, or the watch ended (timeoutSeconds): the
            // replay is complete.
            Short::Stopped(None) | Short::Ended => Gap::Events(frames),
            Short::GaveUp => return None,
        })
    }

    /// Whether nothing in this collection changed in `(n, floor]`, from a
    /// short upstream watch from `n` (no answer: not empty).
    /// Whether nothing changed in `(n, floor]`; `None` when the apiserver
    /// did not say.
    async fn gap_is_empty(&self, n: u64, floor: u64) -> Option<bool> {
        let query = self.query(&format!("watch=1&resourceVersion={n}&timeoutSeconds=1"));
        let end = self
            .short_watch(&query, |_, ty, rv| match ty {
                Some(EventType::Bookmark) if rv >= floor => ControlFlow::Break(Some(Some(true))),
                Some(EventType::Bookmark) => ControlFlow::Continue(()),
                Some(EventType::Added | EventType::Modified | EventType::Deleted) => {
                    ControlFlow::Break(Some(Some(rv > floor)))
                }
                _ => ControlFlow::Break(Some(None)),
            })
            .await;
        match end {
            Ok(Short::Stopped(empty)) => empty,
            // Ended (timeoutSeconds) with no change at all since `n`.
            Ok(Short::Ended) => Some(true),
            Ok(Short::GaveUp) => None,
            Err(e) => {
                tracing::debug!(error = %Chain(&e), "gap probe gave no answer");
                None
            }
        }
    }

    /// One short upstream watch (`query` asks for `timeoutSeconds=1`),
    /// counted and bounded to [`SHORT_WATCH`]. Each event frame goes to
    /// `on_event` with its type (`None`: unknown) and RV: `Continue` reads
    /// on, `Break(Some(t))` stops with `t`, `Break(None)` gives up.
    async fn short_watch<T>(
        &self,
        query: &str,
        mut on_event: impl FnMut(Bytes, Option<EventType>, u64) -> ControlFlow<Option<T>>,
    ) -> Result<Short<T>, FetchError> {
        self.ctx
            .stats
            .upstream_watches
            .fetch_add(1, Ordering::Relaxed);
        let read = async {
            let resp = self.get(query, true).await?;
            if !resp.status().is_success() {
                return Err(FetchError::Status(resp.status()));
            }
            let codec = self.answered(&resp)?;
            let mut body = resp.into_body();
            let mut buf = BytesMut::new();
            while let Some(frame) = body.frame().await {
                let Ok(data) = frame.map_err(FetchError::Body)?.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&data);
                while let Some(frame) = codec.next_frame(&mut buf).map_err(FetchError::Decode)? {
                    let Some(ev) = codec.decode_event(&frame).map_err(FetchError::Decode)? else {
                        continue;
                    };
                    let rv = match ev.ty {
                        Some(EventType::Error) | None => 0,
                        Some(_) => {
                            codec
                                .read(&ev.object, &[])
                                .map_err(FetchError::Decode)?
                                .meta
                                .rv
                        }
                    };
                    if let ControlFlow::Break(done) = on_event(frame, ev.ty, rv) {
                        return Ok(done.map_or(Short::GaveUp, Short::Stopped));
                    }
                }
            }
            Ok(Short::Ended)
        };
        tokio::time::timeout(SHORT_WATCH, read)
            .await
            .map_err(|_| FetchError::Timeout(SHORT_WATCH))?
    }
}
