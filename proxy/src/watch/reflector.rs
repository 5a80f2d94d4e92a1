//! The upstream half of a stream: LIST, WATCH, re-watch, relist.
//!
//! A stream's task LISTs the collection (first from the apiserver's watch
//! cache, `resourceVersion=0`; after a 410 consistently, paginated) to fill
//! the cache and learn its resourceVersion and kind, then WATCHes from that
//! RV with bookmarks, handing each frame to [`Stream::on_frame`]. A watch
//! that ends or breaks is re-opened from the last RV seen, with backoff and
//! jitter; a refusal (403, 404…) ends the stream.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{ACCEPT, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::error::Chain;
use crate::upstream::{ResponseBody, Route, empty};
use crate::watch::cache::{Listed, TypeMetaSeen};
use crate::watch::codec::{Codec, EventType};
use crate::watch::error::{DecodeError, Failure, FetchError};
use crate::watch::stream::{Stream, WatchEnd};

/// Why a LIST gave no cache.
enum ListError {
    /// The apiserver will say the same again: give up.
    Refused(Failure),
    /// Try again after a backoff.
    Transient(FetchError),
}

impl Stream {
    /// `base` plus the selectors the stream sends upstream.
    pub(crate) fn query(&self, base: &str) -> String {
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

    /// A GET of the collection with `query`, with the donor's identity.
    pub(crate) async fn get(
        &self,
        query: &str,
        long_running: bool,
    ) -> Result<Response<ResponseBody>, FetchError> {
        let pq: http::uri::PathAndQuery = format!("{}?{}", self.key.target.path(), query)
            .parse()
            .map_err(|e| FetchError::Request(http::Error::from(e)))?;
        let mut req = Request::get(self.ctx.upstream.uri_for(Some(&pq)))
            .body(empty())
            .map_err(FetchError::Request)?;
        *req.headers_mut() = self.headers();
        req.headers_mut().insert(ACCEPT, self.key.codec.accept());
        self.ctx
            .upstream
            .send(req, Route::hub(long_running, pq.path()))
            .await
            .map_err(FetchError::Send)
    }

    /// The encoding of a successful answer, which must be the stream's.
    pub(crate) fn answered(&self, resp: &Response<ResponseBody>) -> Result<Codec, FetchError> {
        let codec = Codec::of_answer(resp.headers().get(CONTENT_TYPE));
        if self.settle_codec(codec) {
            Ok(codec)
        } else {
            Err(FetchError::Decode(DecodeError::Shape(
                "the apiserver changed the collection's encoding",
            )))
        }
    }

    /// A whole response body.
    pub(crate) async fn body(resp: Response<ResponseBody>) -> Result<Bytes, FetchError> {
        Ok(resp
            .into_body()
            .collect()
            .await
            .map_err(FetchError::Body)?
            .to_bytes())
    }

    async fn failure(resp: Response<ResponseBody>) -> Failure {
        let status = resp.status();
        let content_type = resp.headers().get(CONTENT_TYPE).cloned();
        Failure {
            status,
            content_type,
            body: Self::body(resp).await.unwrap_or_default(),
        }
    }

    /// The whole collection. The first fill reads `resourceVersion=0`, as
    /// client-go's reflector does: one request the apiserver answers from
    /// its watch cache (it ignores `limit` there), possibly a little behind
    /// — which the watch from its RV then catches up, and consistent
    /// joiners wait out with the freshness check. A relist after 410 must
    /// not go back in time, so it reads consistently from etcd, in pages
    /// of 500.
    async fn list_all(&self, from_cache: bool) -> Result<Listed, ListError> {
        let mut items = Vec::new();
        let mut seen = TypeMetaSeen::default();
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
            let stats = &self.ctx.stats;
            stats.upstream_lists.fetch_add(1, Ordering::Relaxed);
            let resp = self
                .get(&query, false)
                .await
                .map_err(ListError::Transient)?;
            if resp.status() == StatusCode::GONE && cont.is_some() {
                // The continue token expired mid-list: start over.
                cont = None;
                items.clear();
                seen = TypeMetaSeen::default();
                continue;
            }
            if !resp.status().is_success() {
                let f = Self::failure(resp).await;
                return Err(if f.is_refusal() {
                    ListError::Refused(f)
                } else {
                    ListError::Transient(FetchError::Status(f.status))
                });
            }
            let codec = self.answered(&resp).map_err(ListError::Transient)?;
            let body = Self::body(resp).await.map_err(ListError::Transient)?;
            let decode = |e| ListError::Transient(FetchError::Decode(e));
            let page = codec.decode_list(&body).map_err(decode)?;
            let type_meta = codec.item_type_meta(&page.kind, &page.api_version);
            for item in &page.items {
                let (read, full) = codec
                    .read_item(item, &type_meta, self.fields)
                    .map_err(decode)?;
                seen.saw(read.type_meta);
                items.push((read.meta, full));
            }
            match page.cont {
                Some(c) => cont = Some(c),
                None => {
                    if matches!(seen, TypeMetaSeen::Mixed) {
                        tracing::warn!(path = %self.key.target.path(), "list items disagree on kind/apiVersion; cached lists will be forwarded");
                    }
                    return Ok(Listed {
                        codec,
                        rv: page.resource_version.parse().unwrap_or(0),
                        kind: page.kind,
                        api_version: page.api_version,
                        items,
                        type_meta: seen,
                    });
                }
            }
        }
    }

    /// The stream's task: LIST, then WATCH until cancelled, idle or refused.
    pub(crate) async fn run(self: Arc<Self>) {
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
                Err(ListError::Refused(f)) => {
                    self.fail(f);
                    return;
                }
                Err(ListError::Transient(e)) => {
                    tracing::warn!(error = %Chain(&e), path = %self.key.target.path(), "shared stream LIST failed; retrying");
                    // Only a failure to connect: an apiserver that answers,
                    // even 429 or 5xx, is not sent the joiners' requests.
                    if matches!(
                        e,
                        FetchError::Send(crate::upstream::UpstreamError::Pool(
                            crate::upstream::PoolError::Connect(_)
                        ))
                    ) {
                        let mut st = self.lock();
                        st.unreachable = true;
                        self.publish(&st);
                    }
                    if !self.sleep(backoff.next()).await {
                        break;
                    }
                    continue;
                }
            }
            loop {
                let from = self.lock().cache.rv;
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
                    WatchEnd::Expired(frame) => {
                        self.expire(frame);
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

    /// One upstream WATCH from `from`, applied frame by frame.
    async fn watch_once(&self, from: u64) -> WatchEnd {
        let query = self.query(&format!(
            "watch=1&allowWatchBookmarks=true&resourceVersion={from}"
        ));
        self.ctx
            .stats
            .upstream_watches
            .fetch_add(1, Ordering::Relaxed);
        let resp = tokio::select! {
            _ = self.cancel.cancelled() => return WatchEnd::Closed,
            r = self.get(&query, true) => r,
        };
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %Chain(&e), "shared stream WATCH failed; retrying");
                return WatchEnd::Again;
            }
        };
        if !resp.status().is_success() {
            let f = Self::failure(resp).await;
            if f.status == StatusCode::GONE {
                // The apiserver's Status, as the ERROR event a watch gets.
                return WatchEnd::Expired(self.codec().event(EventType::Error, &f.body));
            }
            return if f.is_refusal() {
                WatchEnd::Refused(f)
            } else {
                WatchEnd::Again
            };
        }
        let codec = match self.answered(&resp) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, path = %self.key.target.path(), "shared stream WATCH answered in another encoding; retrying");
                return WatchEnd::Again;
            }
        };
        let mut body = resp.into_body();
        let mut buf = BytesMut::new();
        let linger = self.ctx.cfg.linger;
        let tick = (linger / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut ticker = tokio::time::interval(tick);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return WatchEnd::Closed,
                _ = ticker.tick() => {
                    if self.idle_close() {
                        return WatchEnd::Closed;
                    }
                }
                frame = body.frame() => match frame {
                    Some(Ok(frame)) => {
                        let Ok(data) = frame.into_data() else { continue };
                        buf.extend_from_slice(&data);
                        loop {
                            match codec.next_frame(&mut buf) {
                                Ok(Some(frame)) => {
                                    if let Some(end) = self.on_frame(frame) {
                                        return end;
                                    }
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    tracing::warn!(error = %e, "undecodable upstream watch stream; re-watching");
                                    return WatchEnd::Again;
                                }
                            }
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %Chain(&e), "shared upstream watch broke; re-watching");
                        return WatchEnd::Again;
                    }
                    None => return WatchEnd::Again,
                },
            }
        }
    }
}

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
