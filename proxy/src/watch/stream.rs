//! One shared upstream stream: LIST, WATCH, re-watch, the cache and the ring.
//!
//! A background task LISTs the collection (first from the apiserver's watch
//! cache, `resourceVersion=0`; after a 410 consistently, paginated) to fill
//! the cache and learn its resourceVersion and kind, then WATCHes from that
//! RV with bookmarks. Each upstream event is parsed once (type, key, RV, labels,
//! selectable fields), applied to the cache, appended to a bounded ring of
//! recent changes, and fanned out to the subscribers — all under one lock, so
//! a client joining under that lock gets a snapshot (or a replay) and then
//! the live events with no gap and no duplicate.
//!
//! Upstream trouble is hidden: a watch that ends or breaks is re-opened from
//! the last RV seen (backoff with jitter); a 410 makes the stream relist once
//! and pass the apiserver's own ERROR event to its subscribers, ending their
//! streams so they relist — from this cache. A stream without subscribers
//! lingers, then closes and leaves the hub.

use std::collections::{BTreeMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{ACCEPT, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::{OnceCell, watch};
use tokio_util::sync::CancellationToken;

use crate::classify::ResourceVersion;
use crate::upstream::{Body, full};
use crate::watch::fanout::{SendError, SubBody, queue};
use crate::watch::filter::{Meta, Selector, Transition, selectable_fields};
use crate::watch::key::{StreamKey, WatchOpts};
use crate::watch::object::{self, TypeMetaJson};
use crate::watch::subs::{Sub, Subs};
use crate::watch::{HubShared, Stats};

/// An error answer from the apiserver, passed on to clients as it came.
#[derive(Debug, Clone)]
pub struct Failure {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

impl Failure {
    pub fn response(&self) -> Response<Body> {
        let mut resp = Response::new(full(self.body.clone()));
        *resp.status_mut() = self.status;
        if let Some(ct) = &self.content_type {
            resp.headers_mut().insert(CONTENT_TYPE, ct.clone());
        }
        resp
    }
}

/// Why a client could not be served by this stream.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The stream closed (lingered out) between lookup and join: look again.
    #[error("the shared stream closed")]
    Closed,
    /// The apiserver refused the stream's LIST or WATCH.
    #[error("the apiserver refused the shared stream: {}", .0.status)]
    Refused(Failure),
    /// Not ready in time, or the freshness check failed: forward instead.
    #[error("the shared stream is not available: {0}")]
    Unavailable(String),
}

/// An object in the cache: its bytes and what was parsed of it.
///
/// The bytes are the object as a watch event carries it, with kind and
/// apiVersion: an upstream event's object exactly as it came; a LIST item
/// as it came when it has both keys (custom resources), else with the
/// missing ones put in front (built-in types). Never re-encoded.
pub struct Obj {
    pub bytes: Bytes,
    pub meta: Meta,
    /// `{"type":"ADDED","object":…}\n`, built at most once, shared by every
    /// client that gets this object as ADDED.
    added: OnceLock<Bytes>,
}

impl Obj {
    fn added_line(&self) -> Bytes {
        self.added
            .get_or_init(|| event_line("ADDED", &self.bytes))
            .clone()
    }
}

/// One upstream change, kept in the ring for replay.
struct Change {
    rv: u64,
    /// The upstream event line, as it came.
    line: Bytes,
    old: Option<Arc<Obj>>,
    new: Option<Arc<Obj>>,
    /// DELETED with the old object at this RV, for subscribers the object
    /// leaves: built at most once, shared.
    leave: OnceLock<Bytes>,
}

impl Change {
    fn line_for(&self, t: Transition) -> Option<Bytes> {
        match t {
            Transition::AsIs => Some(self.line.clone()),
            Transition::Enter => self.new.as_ref().map(|n| n.added_line()),
            Transition::Leave => {
                let old = self.old.as_ref()?;
                Some(
                    self.leave
                        .get_or_init(|| {
                            event_line("DELETED", &object::at_resource_version(&old.bytes, self.rv))
                        })
                        .clone(),
                )
            }
            Transition::Nothing => None,
        }
    }

    fn transition(&self, sel: &Selector) -> Transition {
        sel.transition(
            self.old.as_ref().map(|o| &o.meta),
            self.new.as_ref().map(|n| &n.meta),
        )
    }
}

fn event_line(kind: &str, object: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(object.len() + 32);
    b.extend_from_slice(b"{\"type\":\"");
    b.extend_from_slice(kind.as_bytes());
    b.extend_from_slice(b"\",\"object\":");
    b.extend_from_slice(object);
    b.extend_from_slice(b"}\n");
    b.freeze()
}

/// What joiners wait on.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub live: bool,
    pub rv: u64,
    /// Nothing in this collection changed up to here (see [`Stream::reach`]).
    pub fresh: u64,
    pub failed: Option<Failure>,
    pub closed: bool,
}

#[derive(Default)]
struct State {
    live: bool,
    closed: bool,
    /// The task ended and the accounting was undone.
    shut: bool,
    failed: Option<Failure>,
    rv: u64,
    /// Confirmed by a probe: no change of this collection up to this RV,
    /// though no event or bookmark has carried the stream's `rv` there.
    fresh: u64,
    kind: String,
    api_version: String,
    /// Whether the apiserver's LIST items of this collection carry kind and
    /// apiVersion (custom resources: yes; built-in types: no), as the
    /// stream's LISTs showed: a LIST from the cache writes its items the
    /// same way. `None` until a LIST had an item to tell.
    item_type_meta: Option<bool>,
    /// `namespace/name` → object: the order of the apiserver's storage keys
    /// (`/registry/pods/a-b/x` sorts before `/registry/pods/a/x`), which is
    /// the order of its consistent LISTs.
    objects: BTreeMap<String, Arc<Obj>>,
    bytes: usize,
    ring: VecDeque<Arc<Change>>,
    /// Every change after this RV is in the ring: replays from an RV below
    /// it are 410.
    ring_floor: u64,
    /// The upstream answered 410 for this RV: any RV up to it is expired.
    expired_below: u64,
    subs: Subs,
    idle_since: Option<Instant>,
}

/// One shared upstream stream.
pub struct Stream {
    pub key: StreamKey,
    hub: Arc<HubShared>,
    fields: &'static [&'static str],
    /// The identity headers of the latest client (credentials rotate).
    headers: Mutex<HeaderMap>,
    state: Mutex<State>,
    progress: watch::Sender<Progress>,
    /// The next freshness check: every client that takes it before it starts
    /// shares its answer.
    fresh: Mutex<Arc<OnceCell<Result<u64, String>>>>,
    next_id: AtomicU64,
    cancel: CancellationToken,
    /// One gap probe at a time (see [`Stream::extend_back`]).
    probe: tokio::sync::Mutex<()>,
}

/// The headers that say who the caller is, copied from the client request
/// (after the proxy set them for its upstream auth mode).
pub fn identity_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        let n = name.as_str();
        if n == "authorization" || n.starts_with("x-remote-") || n.starts_with("impersonate-") {
            out.append(name.clone(), value.clone());
        }
    }
    out.insert(ACCEPT, HeaderValue::from_static("application/json"));
    out
}

enum WatchEnd {
    /// Ended or broke: re-watch from the last RV.
    Again,
    /// 410: relist. The ERROR event line to pass on.
    Expired(Bytes),
    Refused(Failure),
    Closed,
}

enum Fetch {
    Refused(Failure),
    Transient(String),
}

/// A LIST, complete.
struct Listed {
    rv: u64,
    kind: String,
    api_version: String,
    /// Each item as the cache keeps it (see [`Obj`]).
    items: Vec<(Meta, Bytes)>,
    /// Whether the items carried kind and apiVersion.
    item_type_meta: ItemTypeMeta,
}

/// One page of a LIST: its items are borrowed slices of the body, read
/// one by one and kept as they came.
#[derive(serde::Deserialize)]
struct Page<'a> {
    #[serde(default)]
    kind: String,
    #[serde(rename = "apiVersion", default)]
    api_version: String,
    metadata: ListMeta,
    #[serde(borrow, default)]
    items: Option<Vec<&'a RawValue>>,
}

#[derive(serde::Deserialize)]
struct ListMeta {
    #[serde(rename = "resourceVersion", default)]
    resource_version: String,
    #[serde(rename = "continue", default)]
    cont: Option<String>,
}

/// Whether LIST items carry TypeMeta, from the items seen so far.
#[derive(Debug, Default)]
enum ItemTypeMeta {
    #[default]
    NoItems,
    Uniform(bool),
    Mixed,
}

impl ItemTypeMeta {
    fn saw(&mut self, item: object::TypeMeta) {
        *self = match (&*self, item.uniform()) {
            (_, None) | (ItemTypeMeta::Mixed, _) => ItemTypeMeta::Mixed,
            (ItemTypeMeta::NoItems, Some(t)) => ItemTypeMeta::Uniform(t),
            (ItemTypeMeta::Uniform(a), Some(b)) if *a == b => ItemTypeMeta::Uniform(b),
            (ItemTypeMeta::Uniform(_), Some(_)) => ItemTypeMeta::Mixed,
        }
    }

    /// What a stream records after a LIST that saw `self`, having recorded
    /// `before`: items without agreement leave it unknown (cached LISTs are
    /// then forwarded); a LIST without items tells nothing new.
    fn record(&self, before: Option<bool>) -> Option<bool> {
        match self {
            ItemTypeMeta::NoItems => before,
            ItemTypeMeta::Uniform(t) => Some(*t),
            ItemTypeMeta::Mixed => None,
        }
    }
}

impl Stream {
    pub(crate) fn start(key: StreamKey, headers: HeaderMap, hub: Arc<HubShared>) -> Arc<Stream> {
        let fields = selectable_fields(&key.target.group, &key.target.resource);
        let stream = Arc::new(Stream {
            key,
            fields,
            headers: Mutex::new(headers),
            state: Mutex::new(State::default()),
            progress: watch::channel(Progress::default()).0,
            fresh: Mutex::new(Arc::new(OnceCell::new())),
            next_id: AtomicU64::new(1),
            cancel: hub.cancel.child_token(),
            probe: tokio::sync::Mutex::new(()),
            hub,
        });
        stream.hub.stats.streams.fetch_add(1, Ordering::Relaxed);
        stream.hub.stats.publish();
        tokio::spawn(stream.clone().run());
        stream
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation leaves the state consistent; a panic elsewhere
        // must not take every watch down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_headers(&self, headers: HeaderMap) {
        *self.headers.lock().unwrap_or_else(|e| e.into_inner()) = headers;
    }

    fn stats(&self) -> &Stats {
        &self.hub.stats
    }

    pub(crate) fn hub_stats(&self) -> Arc<Stats> {
        self.hub.stats.clone()
    }

    fn publish(&self, st: &State) {
        self.progress.send_modify(|p| {
            p.live = st.live;
            p.rv = st.rv;
            p.fresh = st.fresh;
            p.failed = st.failed.clone();
            p.closed = st.closed;
        });
    }

    // ---------------------------------------------------------------- upstream

    fn query(&self, base: &str) -> String {
        let mut q = form_urlencoded::Serializer::new(base.to_string());
        if let Some((label, field)) = &self.key.upstream_selectors {
            if let Some(l) = label {
                q.append_pair("labelSelector", l);
            }
            if let Some(f) = field {
                q.append_pair("fieldSelector", f);
            }
        }
        q.finish()
    }

    async fn get(
        &self,
        query: &str,
        long_running: bool,
    ) -> Result<Response<crate::upstream::ResponseBody>, String> {
        let pq = format!("{}?{}", self.key.target.path(), query);
        let pq: http::uri::PathAndQuery = pq.parse().map_err(|e| format!("bad path: {e}"))?;
        let mut req = Request::get(self.hub.upstream.uri_for(Some(&pq)))
            .body(crate::upstream::empty())
            .map_err(|e| e.to_string())?;
        *req.headers_mut() = self
            .headers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.hub
            .upstream
            .send(req, crate::upstream::Route::hub(long_running))
            .await
            .map_err(|e| e.to_string())
    }

    async fn failure(resp: Response<crate::upstream::ResponseBody>) -> Failure {
        let status = resp.status();
        let content_type = resp.headers().get(CONTENT_TYPE).cloned();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        Failure {
            status,
            content_type,
            body,
        }
    }

    fn classify_failure(f: Failure) -> Fetch {
        let code = f.status.as_u16();
        if (400..500).contains(&code) && code != 429 && code != 410 {
            Fetch::Refused(f)
        } else {
            Fetch::Transient(format!("upstream answered {}", f.status))
        }
    }

    /// The whole collection. The first fill reads `resourceVersion=0`, as
    /// client-go's reflector does: one request the apiserver answers from its
    /// watch cache (it ignores `limit` there), possibly a little behind —
    /// which the watch from its RV then catches up, and consistent joiners
    /// wait out with the freshness check. A relist after 410 must not go
    /// back in time, so it reads consistently from etcd, in pages of 500.
    async fn list_all(&self, from_cache: bool) -> Result<Listed, Fetch> {
        let mut items = Vec::new();
        let mut seen = ItemTypeMeta::default();
        let mut cont: Option<String> = None;
        loop {
            let query = {
                let mut base = form_urlencoded::Serializer::new(String::new());
                if from_cache {
                    base.append_pair("resourceVersion", "0");
                } else {
                    base.append_pair("limit", "500");
                }
                if let Some(c) = &cont {
                    base.append_pair("continue", c);
                }
                self.query(&base.finish())
            };
            self.stats().upstream_lists.fetch_add(1, Ordering::Relaxed);
            let resp = self.get(&query, false).await.map_err(Fetch::Transient)?;
            if resp.status() == StatusCode::GONE && cont.is_some() {
                // The continue token expired mid-list: start over.
                cont = None;
                items.clear();
                seen = ItemTypeMeta::default();
                continue;
            }
            if !resp.status().is_success() {
                return Err(Self::classify_failure(Self::failure(resp).await));
            }
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| Fetch::Transient(e.to_string()))?
                .to_bytes();
            let page: Page<'_> = serde_json::from_slice(&body)
                .map_err(|e| Fetch::Transient(format!("undecodable list: {e}")))?;
            let kind = page.kind.strip_suffix("List").unwrap_or(&page.kind);
            let type_meta = TypeMetaJson::new(kind, &page.api_version);
            for item in page.items.iter().flatten() {
                let item = object::one_line(item.get().as_bytes());
                let read = object::read(&item, self.fields)
                    .map_err(|e| Fetch::Transient(format!("undecodable list item: {e}")))?;
                seen.saw(read.type_meta);
                items.push((read.meta, type_meta.complete(&item, read.type_meta)));
            }
            match page.metadata.cont.filter(|c| !c.is_empty()) {
                Some(c) => cont = Some(c),
                None => {
                    if matches!(seen, ItemTypeMeta::Mixed) {
                        tracing::warn!(path = %self.key.target.path(), "list items disagree on kind/apiVersion; cached lists will be forwarded");
                    }
                    return Ok(Listed {
                        rv: page.metadata.resource_version.parse().unwrap_or(0),
                        kind: kind.to_string(),
                        api_version: page.api_version,
                        items,
                        item_type_meta: seen,
                    });
                }
            }
        }
    }

    /// Replaces the cache with a fresh LIST; the ring restarts at its RV.
    fn install(&self, listed: Listed) {
        let mut objects = BTreeMap::new();
        let mut bytes = 0usize;
        for (meta, full) in listed.items {
            bytes += full.len();
            objects.insert(
                object_key(&meta),
                Arc::new(Obj {
                    bytes: full,
                    meta,
                    added: OnceLock::new(),
                }),
            );
        }
        let mut st = self.lock();
        self.account(&st, false);
        st.objects = objects;
        st.bytes = bytes;
        st.rv = listed.rv;
        st.kind = listed.kind;
        st.api_version = listed.api_version;
        st.item_type_meta = listed.item_type_meta.record(st.item_type_meta);
        st.ring.clear();
        st.ring_floor = listed.rv;
        st.fresh = 0;
        st.live = true;
        self.account(&st, true);
        self.publish(&st);
    }

    /// Adds (or removes) this stream's cache to the hub's totals.
    fn account(&self, st: &State, add: bool) {
        let s = self.stats();
        let (o, b) = (st.objects.len() as u64, st.bytes as u64);
        if add {
            s.cache_objects.fetch_add(o, Ordering::Relaxed);
            s.cache_bytes.fetch_add(b, Ordering::Relaxed);
        } else {
            s.cache_objects.fetch_sub(o, Ordering::Relaxed);
            s.cache_bytes.fetch_sub(b, Ordering::Relaxed);
        }
    }

    async fn run(self: Arc<Self>) {
        let mut backoff = Backoff::default();
        let mut from_cache = true;
        'list: loop {
            if self.cancel.is_cancelled() {
                break;
            }
            let listed = tokio::select! {
                _ = self.cancel.cancelled() => break,
                r = self.list_all(from_cache) => r,
            };
            match listed {
                Ok(l) => {
                    self.install(l);
                    from_cache = false;
                }
                Err(Fetch::Refused(f)) => {
                    self.fail(f);
                    return;
                }
                Err(Fetch::Transient(e)) => {
                    tracing::warn!(error = %e, path = %self.key.target.path(), "shared stream LIST failed; retrying");
                    if !self.sleep(backoff.next()).await {
                        break;
                    }
                    continue;
                }
            }
            loop {
                let from = self.lock().rv;
                let began = Instant::now();
                match self.watch_once(from).await {
                    WatchEnd::Again => {
                        if began.elapsed() > Duration::from_secs(1) {
                            backoff = Backoff::default();
                        }
                        if !self.sleep(backoff.next()).await {
                            break 'list;
                        }
                    }
                    WatchEnd::Expired(line) => {
                        self.expire(line);
                        continue 'list;
                    }
                    WatchEnd::Refused(f) => {
                        self.fail(f);
                        return;
                    }
                    WatchEnd::Closed => break 'list,
                }
            }
        }
        self.shut();
    }

    /// Sleeps unless cancelled; false when cancelled.
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    /// One upstream WATCH from `from`, applied event by event.
    async fn watch_once(&self, from: u64) -> WatchEnd {
        let query = self.query(&format!(
            "watch=1&allowWatchBookmarks=true&resourceVersion={from}"
        ));
        self.stats()
            .upstream_watches
            .fetch_add(1, Ordering::Relaxed);
        let resp = tokio::select! {
            _ = self.cancel.cancelled() => return WatchEnd::Closed,
            r = self.get(&query, true) => r,
        };
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "shared stream WATCH failed; retrying");
                return WatchEnd::Again;
            }
        };
        if !resp.status().is_success() {
            let f = Self::failure(resp).await;
            if f.status == StatusCode::GONE {
                let mut line = BytesMut::from(&b"{\"type\":\"ERROR\",\"object\":"[..]);
                line.extend_from_slice(f.body.trim_ascii());
                line.extend_from_slice(b"}\n");
                return WatchEnd::Expired(line.freeze());
            }
            return match Self::classify_failure(f) {
                Fetch::Refused(f) => WatchEnd::Refused(f),
                Fetch::Transient(_) => WatchEnd::Again,
            };
        }
        let mut body = resp.into_body();
        let mut buf = BytesMut::new();
        let linger = self.hub.cfg.linger;
        let tick = (linger / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut ticker = tokio::time::interval(tick);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return WatchEnd::Closed,
                _ = ticker.tick() => {
                    if self.try_close() {
                        return WatchEnd::Closed;
                    }
                }
                frame = body.frame() => match frame {
                    Some(Ok(frame)) => {
                        let Ok(data) = frame.into_data() else { continue };
                        buf.extend_from_slice(&data);
                        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                            let line = buf.split_to(pos + 1).freeze();
                            if let Some(end) = self.apply(line) {
                                return end;
                            }
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "shared upstream watch broke; re-watching");
                        return WatchEnd::Again;
                    }
                    None => return WatchEnd::Again,
                },
            }
        }
    }

    /// Applies one upstream event line; `Some` ends this upstream watch.
    fn apply(&self, line: Bytes) -> Option<WatchEnd> {
        /// The event, its object a borrowed slice of the line: read for
        /// what the cache needs, and kept (and passed on) as it came.
        #[derive(serde::Deserialize)]
        struct Event<'a> {
            #[serde(rename = "type", borrow)]
            kind: std::borrow::Cow<'a, str>,
            #[serde(borrow)]
            object: &'a RawValue,
        }
        let ev: Event<'_> = match serde_json::from_slice(&line) {
            Ok(ev) => ev,
            Err(_) if line.trim_ascii().is_empty() => return None,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable upstream watch event; re-watching");
                return Some(WatchEnd::Again);
            }
        };
        // 'static, so the line can move on while the type is still needed.
        let kind = match &*ev.kind {
            "ADDED" => "ADDED",
            "MODIFIED" => "MODIFIED",
            "DELETED" => "DELETED",
            "BOOKMARK" => "BOOKMARK",
            "ERROR" => {
                #[derive(serde::Deserialize)]
                struct Status {
                    code: Option<u64>,
                }
                let code = serde_json::from_str::<Status>(ev.object.get())
                    .ok()
                    .and_then(|s| s.code);
                if code == Some(410) {
                    return Some(WatchEnd::Expired(line));
                }
                tracing::warn!(status = %ev.object.get(), "upstream watch ERROR event; re-watching");
                return Some(WatchEnd::Again);
            }
            _ => return None,
        };
        let fields = if kind == "BOOKMARK" {
            &[][..]
        } else {
            self.fields
        };
        let meta = match object::read(ev.object.get().as_bytes(), fields) {
            Ok(read) => read.meta,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable object in an upstream watch event; re-watching");
                return Some(WatchEnd::Again);
            }
        };
        let rv = meta.rv;
        if kind == "BOOKMARK" {
            let mut st = self.lock();
            if rv > st.rv {
                st.rv = rv;
                st.subs.retain(|s| {
                    if !s.bookmarks || s.min_rv >= rv {
                        return true;
                    }
                    s.tx.try_send(line.clone()) != Err(SendError::Full)
                });
                self.publish(&st);
            }
            return None;
        }
        self.stats().events.fetch_add(1, Ordering::Relaxed);
        // The object's own bytes, shared with the line: nothing added.
        let bytes = slice_of(&line, ev.object.get());
        let key = object_key(&meta);
        let new_obj = Arc::new(Obj {
            bytes,
            meta,
            added: OnceLock::new(),
        });
        if kind == "ADDED" {
            let _ = new_obj.added.set(line.clone());
        }
        let mut st = self.lock();
        if rv <= st.rv {
            // Already applied (a re-watch overlapping what we saw).
            return None;
        }
        let s = self.stats();
        let cached = if kind == "DELETED" {
            st.objects.remove(&key)
        } else {
            st.objects.insert(key, new_obj.clone())
        };
        let removed = cached.as_ref().map_or(0, |o| o.bytes.len());
        let added = if kind == "DELETED" {
            0
        } else {
            new_obj.bytes.len()
        };
        st.bytes = (st.bytes + added).saturating_sub(removed);
        s.cache_bytes.fetch_add(added as u64, Ordering::Relaxed);
        s.cache_bytes.fetch_sub(removed as u64, Ordering::Relaxed);
        match (kind, cached.is_some()) {
            ("DELETED", true) => {
                s.cache_objects.fetch_sub(1, Ordering::Relaxed);
            }
            ("ADDED" | "MODIFIED", false) => {
                s.cache_objects.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        // A deletion of an object the cache never had is judged on the
        // deleted object itself.
        let old = match (kind, cached) {
            ("DELETED", None) => Some(new_obj.clone()),
            (_, cached) => cached,
        };
        let change = Arc::new(Change {
            rv,
            line,
            old,
            new: (kind != "DELETED").then_some(new_obj),
            leave: OnceLock::new(),
        });
        let (mut delivered, mut evicted) = (0u64, 0u64);
        let (old_meta, new_meta) = (
            change.old.as_ref().map(|o| &o.meta),
            change.new.as_ref().map(|n| &n.meta),
        );
        st.subs.retain_seeing(old_meta, new_meta, |sub| {
            if rv <= sub.min_rv {
                return true;
            }
            let Some(b) = change.line_for(change.transition(&sub.sel)) else {
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
        st.ring.push_back(change);
        while st.ring.len() > self.hub.cfg.ring {
            if let Some(c) = st.ring.pop_front() {
                st.ring_floor = c.rv;
            }
        }
        st.rv = rv;
        self.publish(&st);
        None
    }

    /// The upstream said 410: pass its ERROR event to every subscriber, end
    /// their streams (they relist, from this cache once it is refilled), and
    /// hold joiners until the relist is in.
    fn expire(&self, line: Bytes) {
        let s = self.stats();
        s.expired.fetch_add(1, Ordering::Relaxed);
        s.relists.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        st.expired_below = st.expired_below.max(st.rv);
        for sub in st.subs.take() {
            let _ = sub.tx.try_send(line.clone());
        }
        st.live = false;
        self.publish(&st);
    }

    /// The apiserver refused: leave the hub, end every subscriber, and tell
    /// joiners why.
    fn fail(&self, f: Failure) {
        tracing::info!(status = %f.status, path = %self.key.target.path(), "apiserver refused a shared stream");
        self.leave_hub();
        let mut st = self.lock();
        st.failed = Some(f);
        drop(st.subs.take());
        self.publish(&st);
        drop(st);
        self.shut();
    }

    fn leave_hub(&self) {
        let mut map = self.hub.streams.lock().unwrap_or_else(|e| e.into_inner());
        if map
            .get(&self.key)
            .is_some_and(|s| std::ptr::eq(Arc::as_ptr(s), self))
        {
            map.remove(&self.key);
        }
    }

    /// Final accounting when the task ends.
    fn shut(&self) {
        self.leave_hub();
        let mut st = self.lock();
        if !st.shut {
            st.shut = true;
            st.closed = true;
            self.account(&st, false);
            drop(st.subs.take());
            st.objects.clear();
            st.ring.clear();
            st.bytes = 0;
            self.publish(&st);
            drop(st);
            self.stats().streams.fetch_sub(1, Ordering::Relaxed);
            self.stats().publish();
        }
    }

    /// Closes the stream when nobody used it for the linger period.
    fn try_close(&self) -> bool {
        // Lock order everywhere: the hub's map, then a stream's state.
        let mut map = self.hub.streams.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = self.lock();
        if !st.subs.is_empty() {
            st.idle_since = None;
            return false;
        }
        let since = *st.idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < self.hub.cfg.linger {
            return false;
        }
        st.closed = true;
        self.publish(&st);
        if map
            .get(&self.key)
            .is_some_and(|s| std::ptr::eq(Arc::as_ptr(s), self))
        {
            map.remove(&self.key);
        }
        drop(st);
        drop(map);
        tracing::debug!(path = %self.key.target.path(), "shared stream idle; closing");
        true
    }

    // ----------------------------------------------------------------- clients

    /// The apiserver's current RV, from a LIST with limit=1. Every client
    /// that asked before the check started shares it; a round gathers
    /// arrivals for [`FRESH_GATHER`] before it starts, so a burst of
    /// consistent LISTs and joins costs one cheap check per few
    /// milliseconds, not one per client. Its item, if any, also tells a
    /// stream that does not know yet whether list items carry TypeMeta.
    async fn fresh_rv(&self) -> Result<u64, String> {
        let round = self.fresh.lock().unwrap_or_else(|e| e.into_inner()).clone();
        round
            .get_or_init(|| async {
                tokio::time::sleep(FRESH_GATHER).await;
                // Clients arriving from now on need a check of their own.
                *self.fresh.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(OnceCell::new());
                self.stats().upstream_lists.fetch_add(1, Ordering::Relaxed);
                let resp = self.get(&self.query("limit=1"), false).await?;
                if !resp.status().is_success() {
                    return Err(format!("freshness check answered {}", resp.status()));
                }
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?
                    .to_bytes();
                let page: Page<'_> = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
                // An item tells how the apiserver lists this collection's
                // items, for a stream whose LIST had none to tell.
                if let Some(item) = page.items.iter().flatten().next()
                    && let Ok(read) = object::read(item.get().as_bytes(), &[])
                {
                    let mut st = self.lock();
                    if st.item_type_meta.is_none() {
                        st.item_type_meta = read.type_meta.uniform();
                    }
                }
                page.metadata
                    .resource_version
                    .parse()
                    .map_err(|_| "no resourceVersion in the freshness check".to_string())
            })
            .await
            .clone()
    }

    /// Waits until the stream is live and has seen `rv`.
    async fn ready(&self, rv: u64) -> Result<(), JoinError> {
        let mut rx = self.progress.subscribe();
        let wait =
            rx.wait_for(|p| p.closed || p.failed.is_some() || (p.live && p.rv.max(p.fresh) >= rv));
        let p = match tokio::time::timeout(self.hub.cfg.ready_timeout, wait).await {
            Ok(Ok(p)) => p.clone(),
            Ok(Err(_)) => return Err(JoinError::Closed),
            Err(_) => {
                return Err(JoinError::Unavailable(
                    "the shared stream did not become ready in time".into(),
                ));
            }
        };
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
    async fn reach(&self, need: u64) -> Result<(), JoinError> {
        if need == 0 {
            return self.ready(0).await;
        }
        let until = Instant::now() + self.hub.cfg.ready_timeout;
        loop {
            if let Ok(r) = tokio::time::timeout(REACH_AT_ONCE, self.ready(need)).await {
                return r;
            }
            if Instant::now() >= until {
                return Err(JoinError::Unavailable(
                    "the shared stream did not reach the apiserver's resourceVersion in time"
                        .into(),
                ));
            }
            let _one = self.probe.lock().await;
            let from = {
                let st = self.lock();
                if st.rv.max(st.fresh) >= need {
                    continue;
                }
                st.rv
            };
            if self.gap_is_empty(from, need).await {
                let mut st = self.lock();
                // A relist meanwhile starts over from its own, newer RV.
                if st.rv >= from && st.live {
                    st.fresh = st.fresh.max(need);
                    self.publish(&st);
                }
            }
        }
    }

    /// Lets the ring reach back to `n` when the apiserver confirms nothing
    /// in this collection changed between `n` and the stream's start.
    ///
    /// Clients that LIST consistently (forwarded) and then WATCH from that
    /// RV usually ask for an RV a little older than a stream that started
    /// after their LIST. One short upstream watch from `n` (ending at once
    /// or after a second) tells whether the gap is empty; if it is, this
    /// and every later client from `n` on are served locally.
    async fn extend_back(&self, n: u64) {
        let below = |st: &State| n < st.ring_floor && n > st.expired_below;
        if !below(&self.lock()) {
            return;
        }
        let _one = self.probe.lock().await;
        let floor = {
            let st = self.lock();
            if !below(&st) {
                return;
            }
            st.ring_floor
        };
        if self.gap_is_empty(n, floor).await {
            let mut st = self.lock();
            // Unless a relist or the ring moved the floor meanwhile.
            if st.ring_floor == floor {
                st.ring_floor = n;
            }
        }
    }

    /// The events a watch from `n` with the client's own `selectors` gets
    /// up to `floor` (where the stream's ring begins), read from one short
    /// upstream watch (`timeoutSeconds=1`; the apiserver replays what it
    /// has at once). The apiserver computes the selector transitions, so
    /// they are exactly a direct watch's; the shared stream carries on from
    /// `floor`. `None` (forward the watch instead) when the apiserver does
    /// not answer in time or the gap is larger than the ring.
    async fn catch_up(
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
        let mut lines = Vec::new();
        let ring = self.hub.cfg.ring;
        // Break(Some(Some(line))): the apiserver's ERROR; Break(Some(None)):
        // the replay reached the floor.
        let end = self
            .short_watch(&query, |line, kind, rv| match kind {
                "" => ControlFlow::Break(None),
                "ERROR" => ControlFlow::Break(Some(Some(line))),
                "BOOKMARK" if rv >= floor => ControlFlow::Break(Some(None)),
                "BOOKMARK" => ControlFlow::Continue(()),
                _ if rv > floor => ControlFlow::Break(Some(None)),
                _ if lines.len() < ring => {
                    lines.push(line);
                    ControlFlow::Continue(())
                }
                _ => ControlFlow::Break(None),
            })
            .await?;
        Some(match end {
            Short::Stopped(Some(error)) => Gap::Error(error),
            // Reached the floor, or the watch ended (timeoutSeconds): the
            // replay is complete.
            Short::Stopped(None) | Short::Ended => Gap::Events(lines),
        })
    }

    /// Whether nothing in this collection changed in `(n, floor]`, from a
    /// short upstream watch from `n` (no answer: not empty).
    async fn gap_is_empty(&self, n: u64, floor: u64) -> bool {
        let query = self.query(&format!("watch=1&resourceVersion={n}&timeoutSeconds=1"));
        let end = self
            .short_watch(&query, |_, kind, rv| match kind {
                "BOOKMARK" if rv >= floor => ControlFlow::Break(Some(true)),
                "BOOKMARK" => ControlFlow::Continue(()),
                "ADDED" | "MODIFIED" | "DELETED" => ControlFlow::Break(Some(rv > floor)),
                _ => ControlFlow::Break(Some(false)),
            })
            .await;
        match end {
            Some(Short::Stopped(empty)) => empty,
            // Ended (timeoutSeconds) with no change at all since `n`.
            Some(Short::Ended) => true,
            None => false,
        }
    }

    /// One short upstream watch (`query` asks for `timeoutSeconds=1`),
    /// counted and bounded to 5 s. Each event line goes to `on_event` with
    /// its type and RV: `Continue` reads on, `Break(Some(t))` stops with
    /// `t`, `Break(None)` gives up. `None`: no usable answer (refused,
    /// broken, undecodable, too slow).
    async fn short_watch<T>(
        &self,
        query: &str,
        mut on_event: impl FnMut(Bytes, &str, u64) -> ControlFlow<Option<T>>,
    ) -> Option<Short<T>> {
        self.stats()
            .upstream_watches
            .fetch_add(1, Ordering::Relaxed);
        let read = async {
            let resp = self.get(query, true).await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let mut body = resp.into_body();
            let mut buf = BytesMut::new();
            while let Some(frame) = body.frame().await {
                let Ok(data) = frame.ok()?.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&data);
                while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line = buf.split_to(pos + 1).freeze();
                    let v: Value = serde_json::from_slice(&line).ok()?;
                    let rv = v.get("object").and_then(resource_version).unwrap_or(0);
                    let kind = v.get("type").and_then(Value::as_str).unwrap_or_default();
                    if let ControlFlow::Break(done) = on_event(line, kind, rv) {
                        return done.map(Short::Stopped);
                    }
                }
            }
            Some(Short::Ended)
        };
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .ok()
            .flatten()
    }

    /// A client's watch: its snapshot or replay, then the live events.
    pub(crate) async fn join(
        self: &Arc<Self>,
        sel: Arc<Selector>,
        opts: &WatchOpts,
        selectors: (Option<&str>, Option<&str>),
    ) -> Result<Response<Body>, JoinError> {
        let send_initial = opts
            .send_initial_events
            .unwrap_or(!matches!(opts.rv, ResourceVersion::Exact(_)));
        let need = match (&opts.rv, send_initial) {
            (ResourceVersion::Unset, true) => {
                self.ready(0).await?;
                self.fresh_rv().await.map_err(JoinError::Unavailable)?
            }
            _ => 0,
        };
        self.reach(need).await?;
        // A watch from before the stream's floor: its gap, from the apiserver.
        let mut caught_up: Option<(u64, Vec<Bytes>)> = None;
        if let (ResourceVersion::Exact(n), false) = (&opts.rv, send_initial) {
            let n: u64 = n.parse().unwrap_or(0);
            self.extend_back(n).await;
            let (floor, expired_below) = {
                let st = self.lock();
                (st.ring_floor, st.expired_below)
            };
            if n < floor && n > expired_below {
                match self.catch_up(n, floor, selectors).await {
                    Some(Gap::Events(lines)) => caught_up = Some((floor, lines)),
                    Some(Gap::Error(line)) => return Ok(watch_response(full(line))),
                    None => {}
                }
            }
        }
        let timeout = match opts.timeout_seconds {
            Some(s) if s > 0 => Duration::from_secs(s),
            _ => Duration::from_secs(1800).mul_f64(1.0 + rand::random::<f64>()),
        };
        let mut st = self.lock();
        if st.closed || !st.live {
            return Err(JoinError::Closed);
        }
        if let Some(f) = &st.failed {
            return Err(JoinError::Refused(f.clone()));
        }
        let mut initial = Vec::new();
        let min_rv;
        if send_initial {
            initial.extend(
                st.objects
                    .values()
                    .filter(|o| sel.matches(&o.meta))
                    .map(|o| o.added_line()),
            );
            if opts.send_initial_events == Some(true) && opts.bookmarks {
                initial.push(self.bookmark_line(&st, true));
            }
            min_rv = st.rv;
        } else if let ResourceVersion::Exact(n) = &opts.rv {
            let n: u64 = n.parse().unwrap_or(0);
            if n <= st.expired_below {
                // The apiserver already told us this far back is gone.
                self.stats().expired.fetch_add(1, Ordering::Relaxed);
                let floor = st.ring_floor;
                drop(st);
                return Ok(expired_response(n, floor));
            }
            // After a catch-up the ring takes over at the floor it reached.
            let from = caught_up.as_ref().map_or(n, |(floor, _)| *floor);
            if from < st.ring_floor {
                // Older than what this stream saw, but the apiserver may
                // still have it (the stream started, or its ring rolled,
                // after N): let the apiserver answer.
                return Err(JoinError::Unavailable(format!(
                    "resourceVersion {n} predates the shared stream"
                )));
            }
            if let Some((_, lines)) = caught_up.take() {
                initial.extend(lines);
            }
            initial.extend(
                st.ring
                    .iter()
                    .filter(|c| c.rv > from)
                    .filter_map(|c| c.line_for(c.transition(&sel))),
            );
            min_rv = from.max(st.rv);
        } else {
            min_rv = st.rv;
        }
        let (tx, rx) = queue(self.hub.cfg.queue);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        st.subs.push(Sub {
            id,
            sel: sel.clone(),
            bookmarks: opts.bookmarks,
            min_rv,
            tx,
        });
        st.idle_since = None;
        drop(st);
        let body = SubBody::new(initial, rx, timeout, opts.bookmarks, self.clone(), id, sel);
        Ok(watch_response(http_body_util::BodyExt::boxed(body)))
    }

    /// A LIST from the cache: `consistent` is `None` for `resourceVersion=0`
    /// (the cache as it is, `limit` ignored as the apiserver's watch cache
    /// does), or `Some(limit)` for a consistent LIST (rv unset): served once
    /// the stream is confirmed as fresh as the apiserver (the freshness check
    /// a consistent watch join waits for), and only when every match fits in
    /// one page — a continue token would be ours, not the apiserver's.
    pub(crate) async fn list(
        &self,
        sel: &Selector,
        consistent: Option<Option<u64>>,
    ) -> Result<Response<Body>, JoinError> {
        self.ready(0).await?;
        if consistent.is_some() {
            let need = self.fresh_rv().await.map_err(JoinError::Unavailable)?;
            self.reach(need).await?;
        }
        let (objs, rv, kind, api_version, item_type_meta) = {
            let mut st = self.lock();
            if st.closed || !st.live {
                return Err(JoinError::Closed);
            }
            if let Some(f) = &st.failed {
                return Err(JoinError::Refused(f.clone()));
            }
            // A LIST is the start of an informer: keep the stream for its WATCH.
            if st.subs.is_empty() {
                st.idle_since = Some(Instant::now());
            }
            let objs: Vec<Arc<Obj>> = st
                .objects
                .values()
                .filter(|o| sel.matches(&o.meta))
                .cloned()
                .collect();
            if let Some(Some(limit)) = consistent
                && objs.len() as u64 > limit
            {
                return Err(JoinError::Unavailable(format!(
                    "{} items exceed limit={limit}: the apiserver pages them",
                    objs.len()
                )));
            }
            // Every change up to `rv` is applied (or, past it up to `fresh`,
            // confirmed absent): the snapshot is consistent there.
            (
                objs,
                st.rv.max(st.fresh),
                st.kind.clone(),
                st.api_version.clone(),
                st.item_type_meta,
            )
        };
        let item_type_meta = match item_type_meta {
            Some(t) => t,
            // No item to write: no question how.
            None if objs.is_empty() => false,
            None => {
                // The stream's LISTs had no item to tell how the apiserver
                // writes them; the freshness check's LIST (limit=1) may
                // (a consistent LIST has just had one).
                if consistent.is_none() {
                    self.fresh_rv().await.map_err(JoinError::Unavailable)?;
                }
                self.lock().item_type_meta.ok_or_else(|| {
                    JoinError::Unavailable(
                        "whether this collection's list items carry kind and apiVersion is not known yet"
                            .into(),
                    )
                })?
            }
        };
        let size: usize = objs.iter().map(|o| o.bytes.len() + 1).sum();
        let mut out = Vec::with_capacity(size + 128);
        out.extend_from_slice(b"{\"kind\":");
        out.extend_from_slice(Value::String(format!("{kind}List")).to_string().as_bytes());
        out.extend_from_slice(b",\"apiVersion\":");
        out.extend_from_slice(Value::String(api_version.clone()).to_string().as_bytes());
        out.extend_from_slice(b",\"metadata\":{\"resourceVersion\":\"");
        out.extend_from_slice(rv.to_string().as_bytes());
        out.extend_from_slice(b"\"},\"items\":[");
        // Items as the apiserver writes them: custom resources' with their
        // kind and apiVersion (the cached bytes as they are), built-in
        // types' without.
        let type_meta = (!item_type_meta).then(|| TypeMetaJson::new(&kind, &api_version));
        for (i, o) in objs.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            match &type_meta {
                Some(tm) => tm.write_without(&mut out, &o.bytes),
                None => out.extend_from_slice(&o.bytes),
            }
        }
        out.extend_from_slice(b"]}");
        let mut resp = Response::new(full(out));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(resp)
    }

    fn bookmark_line(&self, st: &State, initial_end: bool) -> Bytes {
        let annotations = if initial_end {
            ",\"annotations\":{\"k8s.io/initial-events-end\":\"true\"}"
        } else {
            ""
        };
        let object = format!(
            "{{\"kind\":{},\"apiVersion\":{},\"metadata\":{{\"resourceVersion\":\"{}\",\"creationTimestamp\":null{}}}}}",
            Value::String(st.kind.clone()),
            Value::String(st.api_version.clone()),
            st.rv.max(st.fresh),
            annotations
        );
        event_line("BOOKMARK", object.as_bytes())
    }

    /// Queues a BOOKMARK at the current RV for one subscriber, in order with
    /// its events (before its timeout).
    pub(crate) fn request_bookmark(&self, id: u64, sel: &Selector) {
        let st = self.lock();
        if let Some(sub) = st.subs.find(id, sel).filter(|s| s.bookmarks) {
            let _ = sub.tx.try_send(self.bookmark_line(&st, false));
        }
    }

    /// Forgets a subscriber (its body was dropped).
    pub(crate) fn remove(&self, id: u64, sel: &Selector) {
        let mut st = self.lock();
        // Dropped after the lock (dropping a queue wakes nobody here, but
        // keep the critical section to the bookkeeping).
        let sub = st.subs.remove(id, sel);
        if st.subs.is_empty() && st.idle_since.is_none() {
            st.idle_since = Some(Instant::now());
        }
        drop(st);
        drop(sub);
    }

    /// Subscribers right now (tests, stats).
    pub fn subscribers(&self) -> usize {
        self.lock().subs.len()
    }
}

/// The cache's key of an object: its storage key below the resource prefix.
fn object_key(meta: &Meta) -> String {
    format!("{}/{}", meta.namespace, meta.name)
}

/// `part`, a slice the JSON parser borrowed from `line`, as a `Bytes`
/// sharing `line`'s buffer (a copy if it somehow is not inside it).
fn slice_of(line: &Bytes, part: &str) -> Bytes {
    let start = (part.as_ptr() as usize).wrapping_sub(line.as_ptr() as usize);
    match start.checked_add(part.len()) {
        Some(end) if end <= line.len() => line.slice(start..end),
        _ => Bytes::copy_from_slice(part.as_bytes()),
    }
}

/// 200 with one ERROR event (410 Expired), then the end: what the apiserver
/// sends a watch from an RV it no longer has.
pub fn expired_response(requested: u64, oldest: u64) -> Response<Body> {
    let status = format!(
        "{{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"metadata\":{{}},\"status\":\"Failure\",\"message\":\"too old resource version: {requested} ({oldest})\",\"reason\":\"Expired\",\"code\":410}}"
    );
    watch_response(full(event_line("ERROR", status.as_bytes())))
}

fn watch_response(body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// How a [`Stream::short_watch`] ended.
enum Short<T> {
    /// The event callback stopped it with this.
    Stopped(T),
    /// The apiserver ended it (its `timeoutSeconds`).
    Ended,
}

/// An object's `metadata.resourceVersion`, as a number.
fn resource_version(obj: &Value) -> Option<u64> {
    obj.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
}

/// What [`Stream::catch_up`] read.
enum Gap {
    /// The client's events after its RV, up to the stream's floor.
    Events(Vec<Bytes>),
    /// The apiserver's ERROR event (410: the RV is too old), to pass on.
    Error(Bytes),
}

/// How long a freshness round waits for more clients before it checks.
const FRESH_GATHER: Duration = Duration::from_millis(5);

/// How long a consistent joiner waits for the stream's own events before
/// probing upstream (see [`Stream::reach`]).
const REACH_AT_ONCE: Duration = Duration::from_millis(200);

/// Exponential backoff with jitter, 100 ms to 10 s.
#[derive(Default)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let base = Duration::from_millis(100) * 2u32.saturating_pow(self.attempt.min(7));
        self.attempt += 1;
        base.min(Duration::from_secs(10))
            .mul_f64(0.5 + rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_object_is_the_lines_own_bytes() {
        let line = Bytes::from_static(b"{\"type\":\"ADDED\",\"object\": {\"b\":1.0,\"a\":1} }\n");
        #[derive(serde::Deserialize)]
        struct Event<'a> {
            #[serde(borrow)]
            object: &'a RawValue,
        }
        let ev: Event<'_> = serde_json::from_slice(&line).expect("event");
        let object = slice_of(&line, ev.object.get());
        assert_eq!(&object[..], b"{\"b\":1.0,\"a\":1}");
        let at = line.windows(2).position(|w| w == b" {").expect("object") + 1;
        assert_eq!(object.as_ptr(), line[at..].as_ptr(), "shared, not copied");
        assert_eq!(&slice_of(&line, "{}")[..], b"{}");
    }

    #[test]
    fn a_stream_records_item_type_meta_only_from_items_that_agree() {
        let (with, without) = (
            object::TypeMeta {
                kind: true,
                api_version: true,
            },
            object::TypeMeta::default(),
        );
        let seen = |items: &[object::TypeMeta]| {
            let mut s = ItemTypeMeta::default();
            for t in items {
                s.saw(*t);
            }
            s
        };
        assert_eq!(seen(&[with, with]).record(None), Some(true));
        assert_eq!(seen(&[without]).record(Some(true)), Some(false));
        assert_eq!(
            seen(&[]).record(Some(true)),
            Some(true),
            "no items: as before"
        );
        assert_eq!(seen(&[with, without]).record(Some(true)), None);
        let half = object::TypeMeta {
            kind: true,
            api_version: false,
        };
        assert_eq!(seen(&[half]).record(None), None);
    }
}
