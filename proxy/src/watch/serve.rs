//! Serving clients from a stream: a watch's snapshot or replay and then its
//! live events, a LIST from the cache. Encoded by the stream's codec.

use std::sync::{Arc, Weak};
use std::time::Duration;

use http::Response;
use http::header::CONTENT_TYPE;
use tokio::time::Instant;

use crate::classify::ResourceVersion;
use crate::upstream::{Body, full};
use crate::watch::Gate;
use crate::watch::cache::{Obj, Since};
use crate::watch::error::{JoinError, Unavailable};
use crate::watch::fanout::{SubBody, SubHandle, Subscription, queue};
use crate::watch::filter::Selector;
use crate::watch::fresh::Gap;
use crate::watch::key::WatchOpts;
use crate::watch::stream::Stream;
use crate::watch::subs::Sub;

impl Stream {
    /// A client's watch: its snapshot or replay, then the live events.
    pub(crate) async fn join(
        self: &Arc<Self>,
        sel: Arc<Selector>,
        opts: &WatchOpts,
        selectors: (Option<&str>, Option<&str>),
        gate: &mut Gate<'_>,
    ) -> Result<Response<Body>, JoinError> {
        let send_initial = opts
            .send_initial_events
            .unwrap_or(!matches!(opts.rv, ResourceVersion::Exact(_)));
        let need = match (&opts.rv, send_initial) {
            (ResourceVersion::Unset, true) => {
                self.ready(0).await?;
                self.fresh_rv().await?
            }
            _ => 0,
        };
        self.reach(need).await?;
        let from_rv = match (&opts.rv, send_initial) {
            (ResourceVersion::Exact(n), false) => Some(n.parse::<u64>().unwrap_or(0)),
            _ => None,
        };
        // A watch from before the stream's floor: its gap, from the apiserver.
        let mut caught_up: Option<(u64, Vec<bytes::Bytes>)> = None;
        if let Some(n) = from_rv {
            self.extend_back(n).await;
            let gap = self.lock().cache.gap_below(n);
            if let Some(floor) = gap {
                // The gap is read upstream for this client: it is charged
                // like any request that goes upstream (its refusal is the
                // answer, and nothing goes upstream).
                if let Err(refusal) = gate() {
                    return Ok(*refusal);
                }
                match self.catch_up(n, floor, selectors).await {
                    Some(Gap::Events(frames)) => caught_up = Some((floor, frames)),
                    Some(Gap::Error(frame)) => return Ok(self.watch_response(full(frame))),
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
            initial = st.cache.snapshot_frames(&sel);
            if opts.send_initial_events == Some(true) && opts.bookmarks {
                initial.push(st.cache.bookmark_frame(true));
            }
            min_rv = st.cache.rv;
        } else if let Some(n) = from_rv {
            // After a catch-up the ring takes over at the floor it reached.
            let from = caught_up.as_ref().map_or(n, |(floor, _)| *floor);
            match st.cache.since(from) {
                Since::Expired { oldest } => {
                    // The apiserver already told us this far back is gone.
                    self.ctx
                        .stats
                        .expired
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    drop(st);
                    return Ok(self.watch_response(full(self.codec().expired(n, oldest))));
                }
                // Older than what this stream saw, but the apiserver may
                // still have it (the stream started, or its ring rolled,
                // after N): let the apiserver answer.
                Since::Predates { .. } => return Err(Unavailable::Predates(n).into()),
                Since::Ring => {}
            }
            if let Some((_, frames)) = caught_up.take() {
                initial.extend(frames);
            }
            initial.extend(st.cache.replay(from, &sel));
            min_rv = from.max(st.cache.rv);
        } else {
            min_rv = st.cache.rv;
        }
        let (tx, rx) = queue(self.ctx.cfg.queue);
        let id = self.next_id();
        Stream::subscribe(
            &mut st,
            Sub {
                id,
                sel: sel.clone(),
                bookmarks: opts.bookmarks,
                min_rv,
                tx,
            },
        );
        drop(st);
        let stream: Weak<dyn Subscription> =
            Arc::downgrade(&(self.clone() as Arc<dyn Subscription>));
        let handle = SubHandle { stream, id, sel };
        let body = SubBody::new(
            initial,
            rx,
            timeout,
            opts.bookmarks,
            handle,
            self.ctx.stats.clone(),
        );
        Ok(self.watch_response(http_body_util::BodyExt::boxed(body)))
    }

    /// A LIST from the cache: `consistent` is `None` for `resourceVersion=0`
    /// (the cache as it is, `limit` ignored as the apiserver's watch cache
    /// does), or `Some(limit)` for a consistent LIST (rv unset): served once
    /// the stream is confirmed as fresh as the apiserver (the freshness
    /// check a consistent watch join waits for), and only when every match
    /// fits in one page — a continue token would be ours, not the
    /// apiserver's.
    pub(crate) async fn list(
        &self,
        sel: &Selector,
        consistent: Option<Option<u64>>,
    ) -> Result<Response<Body>, JoinError> {
        self.ready(0).await?;
        if consistent.is_some() {
            let need = self.fresh_rv().await?;
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
            let objs: Vec<Arc<Obj>> = st.cache.snapshot(sel).cloned().collect();
            if let Some(Some(limit)) = consistent
                && objs.len() as u64 > limit
            {
                return Err(Unavailable::ExceedsLimit {
                    items: objs.len(),
                    limit,
                }
                .into());
            }
            // Every change up to `rv` is applied (or, past it up to `fresh`,
            // confirmed absent): the snapshot is consistent there.
            let c = &st.cache;
            (
                objs,
                c.position(),
                c.kind.clone(),
                c.api_version.clone(),
                c.item_type_meta,
            )
        };
        let codec = self.codec();
        let item_type_meta = match item_type_meta {
            Some(t) => t,
            // No item to write, or an encoding that writes every type's
            // items alike: no question how.
            None if objs.is_empty() || !codec.items_vary_by_type() => false,
            None => {
                // The stream's LISTs had no item to tell how the apiserver
                // writes them; the freshness check's LIST (limit=1) may (a
                // consistent LIST has just had one).
                if consistent.is_none() {
                    self.fresh_rv().await?;
                }
                self.lock()
                    .cache
                    .item_type_meta
                    .ok_or(Unavailable::ItemTypeMetaUnknown)?
            }
        };
        let body = codec
            .list(
                &kind,
                &api_version,
                rv,
                objs.iter().map(|o| &o.bytes[..]),
                item_type_meta,
            )
            .map_err(|e| Unavailable::Undecodable(Arc::new(e)))?;
        let mut resp = Response::new(full(body));
        resp.headers_mut()
            .insert(CONTENT_TYPE, codec.content_type());
        Ok(resp)
    }

    fn watch_response(&self, body: Body) -> Response<Body> {
        let mut resp = Response::new(body);
        resp.headers_mut()
            .insert(CONTENT_TYPE, self.codec().watch_content_type());
        resp
    }
}
