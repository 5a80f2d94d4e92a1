//! Coalescing of identical concurrent consistent LISTs.
//!
//! A consistent LIST (`resourceVersion` unset) must reflect the state at or
//! after the moment it was asked, so it cannot come from a cache. But when
//! many clients ask the same LIST at once (a DaemonSet restarting), one
//! upstream request can answer all that arrived before it started: its
//! answer is at least as fresh as each of them needs. Later arrivals start
//! the next round. The key is the full path and query, the identity scope
//! and the Accept header, so every waiter gets exactly what it would have
//! got (Tables included: the bytes pass through untouched).
//!
//! The upstream answer is read whole (up to [`MAX_BODY`]) and shared as one
//! `Bytes`; a bigger one, or an upstream failure, sends each waiter back to
//! the ordinary forwarding path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_LENGTH};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use tokio::sync::OnceCell;

use crate::upstream::{Body, Upstream, full};

/// The largest LIST body shared in memory.
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// One upstream answer, shared by its waiters.
#[derive(Debug, Clone)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

type Round = Arc<OnceCell<Option<Answer>>>;

/// One key: at most one upstream request in flight, and the next round
/// gathering the waiters that arrive meanwhile.
#[derive(Default)]
struct Entry {
    flight: tokio::sync::Mutex<()>,
    next: Mutex<Round>,
}

/// Per key, the round being gathered. An entry leaves when a round ends
/// with nobody waiting for the next, so the map holds only keys in use.
#[derive(Default)]
pub struct Coalescer {
    pending: Mutex<HashMap<String, Arc<Entry>>>,
}

impl Coalescer {
    /// Answers a consistent LIST, sharing the upstream request with every
    /// identical one that arrived before it started. `None`: forward it.
    pub async fn list(
        &self,
        upstream: &Upstream,
        scope: &str,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Option<Response<Body>> {
        let accept = headers
            .get(ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let pq = uri.path_and_query()?.clone();
        let key = format!("{scope}\u{0}{accept}\u{0}{pq}");
        let entry = {
            let mut map = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        let round = entry.next.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let answer = round
            .get_or_init(|| async {
                // Wait for the previous round's request to end; meanwhile
                // arrivals join this round.
                let _flight = entry.flight.lock().await;
                // This round starts now: later arrivals need the next one.
                *entry.next.lock().unwrap_or_else(|e| e.into_inner()) = Round::default();
                let answer = fetch(upstream, &pq, headers).await;
                let mut map = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                let idle =
                    Arc::strong_count(&entry.next.lock().unwrap_or_else(|e| e.into_inner())) == 1;
                if idle && map.get(&key).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
                    map.remove(&key);
                }
                answer
            })
            .await
            .clone()?;
        let mut resp = Response::new(full(answer.body));
        *resp.status_mut() = answer.status;
        *resp.headers_mut() = answer.headers;
        Some(resp)
    }
}

async fn fetch(
    upstream: &Upstream,
    pq: &http::uri::PathAndQuery,
    headers: &HeaderMap,
) -> Option<Answer> {
    let mut req = Request::get(upstream.uri_for(Some(pq)))
        .body(crate::upstream::empty())
        .ok()?;
    *req.headers_mut() = headers.clone();
    let resp = upstream
        .send(req, crate::upstream::Route::hub(false, pq.path()))
        .await
        .ok()?;
    let (parts, body) = resp.into_parts();
    let body = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .ok()?
        .to_bytes();
    let mut headers = parts.headers;
    for name in ["connection", "keep-alive", "transfer-encoding", "trailer"] {
        headers.remove(name);
    }
    headers.remove(CONTENT_LENGTH);
    Some(Answer {
        status: parts.status,
        headers,
        body,
    })
}
