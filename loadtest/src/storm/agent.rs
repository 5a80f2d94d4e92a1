//! One fleet agent: a client-go informer for the pods on its node.
//!
//! It behaves like client-go's reflector: LIST pods with
//! `fieldSelector=spec.nodeName=<node>` (resourceVersion=0, or unset with
//! `--consistent-list`), then WATCH from the list's resourceVersion with
//! bookmarks; a 429 is retried after its `Retry-After` with jitter factor 1.0
//! (`wait.Jitter`), other failures with the reflector's exponential backoff
//! (800 ms doubling to 30 s, jittered); a 410 Gone (ERROR event or status)
//! re-lists; a watch that ends normally is re-opened from the last RV. Each
//! agent has its own TLS connection (HTTP/1.1, re-used for LIST then WATCH)
//! and its own ServiceAccount token. With `protobuf` it asks as kubelet
//! does (`Accept: application/vnd.kubernetes.protobuf, application/json`)
//! and reads whichever encoding the answer is in.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rand::Rng;
use tokio_util::sync::CancellationToken;

/// The pods an agent knows: `namespace/name` → resourceVersion.
pub type View = HashMap<String, String>;

/// Counters the whole fleet shares (read by the sampler and the report).
#[derive(Debug, Default)]
pub struct FleetCounters {
    /// Agents with a watch open now.
    pub watching: AtomicUsize,
    /// 429 responses agents received.
    pub rejected_429: AtomicU64,
    /// Of those, the answers to watch requests (the rest answered LISTs).
    pub rejected_429_watch: AtomicU64,
    /// Other failures (transport errors, 5xx) agents saw.
    pub errors: AtomicU64,
    /// LISTs that succeeded.
    pub lists_ok: AtomicU64,
    /// Re-lists after 410 Gone.
    pub relists_410: AtomicU64,
    /// Successful LISTs and watches answered in protobuf.
    pub protobuf_answers: AtomicU64,
}

/// What an agent needs to run.
#[derive(Clone)]
pub struct AgentSpec {
    pub node: String,
    pub token: String,
    pub target: SocketAddr,
    pub tls: tokio_rustls::TlsConnector,
    pub consistent_list: bool,
    /// Ask for protobuf first, as kubelet and kube-proxy do.
    pub protobuf: bool,
}

/// An agent's state visible to the lab: its view and whether it watches.
#[derive(Debug, Default)]
pub struct AgentState {
    pub view: Mutex<View>,
    /// Durations of its LISTs as client-go's `List` sees them: from needing
    /// the list (connecting and 429 retries included) to the parsed body.
    pub list_latencies: Mutex<Vec<Duration>>,
    /// A watch is open now.
    pub watching: AtomicBool,
}

enum Failure {
    /// 429: wait this long (before jitter).
    TooMany(Duration),
    /// 410 Gone: re-list.
    Gone,
    /// Anything else: back off and reconnect.
    Other,
}

/// client-go's reflector backoff: 800 ms × 2^n up to 30 s, jitter 1.0.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const INITIAL: Duration = Duration::from_millis(800);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Backoff {
        Backoff {
            next: Self::INITIAL,
        }
    }

    fn step(&mut self) -> Duration {
        let d = jitter(self.next);
        self.next = (self.next * 2).min(Self::MAX);
        d
    }

    fn reset(&mut self) {
        self.next = Self::INITIAL;
    }
}

/// `wait.Jitter(d, 1.0)`: a uniform wait in [d, 2d).
fn jitter(d: Duration) -> Duration {
    d.mul_f64(1.0 + rand::rng().random::<f64>())
}

/// Runs one agent until `cancel`.
pub async fn run(
    spec: AgentSpec,
    state: Arc<AgentState>,
    counters: Arc<FleetCounters>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new();
    let mut conn: Option<SendRequest<Empty<Bytes>>> = None;
    let mut rv: Option<String> = None;
    // When the agent began to need a LIST: its latency is what client-go's
    // `List` call takes, connecting (the first request dials) and waiting
    // out 429s included.
    let mut list_began: Option<Instant> = None;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        if rv.is_none() && list_began.is_none() {
            list_began = Some(Instant::now());
        }
        let sender = match conn.take() {
            Some(s) if !s.is_closed() => s,
            _ => match tokio::select! {
                _ = cancel.cancelled() => return,
                c = connect(&spec) => c,
            } {
                Ok(s) => s,
                Err(()) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    if sleep_or_cancel(backoff.step(), &cancel).await {
                        return;
                    }
                    continue;
                }
            },
        };
        let mut sender = sender;
        let step = match &rv {
            None => tokio::select! {
                _ = cancel.cancelled() => return,
                r = list(&spec, &mut sender, &state, &counters, list_began.unwrap_or_else(Instant::now)) => r.map(|new_rv| {
                    rv = Some(new_rv);
                    list_began = None;
                }),
            },
            Some(from) => {
                let from = from.clone();
                watch(
                    &spec,
                    &mut sender,
                    &state,
                    &counters,
                    &cancel,
                    from,
                    &mut rv,
                )
                .await
            }
        };
        match step {
            Ok(()) => {
                backoff.reset();
                conn = Some(sender);
            }
            Err(Failure::TooMany(after)) => {
                counters.rejected_429.fetch_add(1, Ordering::Relaxed);
                if rv.is_some() {
                    counters.rejected_429_watch.fetch_add(1, Ordering::Relaxed);
                }
                conn = Some(sender);
                if sleep_or_cancel(jitter(after), &cancel).await {
                    return;
                }
            }
            Err(Failure::Gone) => {
                counters.relists_410.fetch_add(1, Ordering::Relaxed);
                rv = None;
                conn = Some(sender);
            }
            Err(Failure::Other) => {
                if cancel.is_cancelled() {
                    return;
                }
                counters.errors.fetch_add(1, Ordering::Relaxed);
                if sleep_or_cancel(backoff.step(), &cancel).await {
                    return;
                }
            }
        }
    }
}

/// True when cancelled during the sleep.
async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// One TLS connection speaking HTTP/1.1.
pub async fn connect_with(
    target: SocketAddr,
    tls: &tokio_rustls::TlsConnector,
) -> Result<SendRequest<Empty<Bytes>>, ()> {
    let tcp = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::net::TcpStream::connect(target),
    )
    .await
    .map_err(drop)?
    .map_err(drop)?;
    let _ = tcp.set_nodelay(true);
    let name = rustls_pki_types::ServerName::IpAddress(target.ip().into());
    let stream = tokio::time::timeout(Duration::from_secs(30), tls.connect(name, tcp))
        .await
        .map_err(drop)?
        .map_err(drop)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(drop)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn connect(spec: &AgentSpec) -> Result<SendRequest<Empty<Bytes>>, ()> {
    connect_with(spec.target, &spec.tls).await
}

fn request(spec: &AgentSpec, query: &str) -> Request<Empty<Bytes>> {
    Request::get(format!("/api/v1/pods?{query}"))
        .header(http::header::HOST, spec.target.to_string())
        .header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", spec.token),
        )
        .header(
            http::header::ACCEPT,
            if spec.protobuf {
                "application/vnd.kubernetes.protobuf, application/json"
            } else {
                "application/json"
            },
        )
        .header(http::header::USER_AGENT, "node-agent/1.0 (storm)")
        .body(Empty::new())
        .expect("invariant: a static request is valid")
}

fn selector(node: &str) -> String {
    form_urlencoded::Serializer::new(String::new())
        .append_pair("fieldSelector", &format!("spec.nodeName={node}"))
        .finish()
}

/// The `Retry-After` of a 429 (1 s when absent or unparsable).
fn retry_after(headers: &http::HeaderMap) -> Duration {
    let secs = headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1);
    Duration::from_secs(secs.max(1))
}

#[derive(serde::Deserialize)]
struct Meta {
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    name: String,
    #[serde(default, rename = "resourceVersion")]
    resource_version: String,
}

#[derive(serde::Deserialize)]
struct Obj {
    metadata: Meta,
    /// Present on ERROR events (a Status).
    #[serde(default)]
    code: Option<u16>,
}

/// Whether an answer is protobuf (else JSON), by its Content-Type.
fn is_protobuf(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/vnd.kubernetes.protobuf"))
}

#[derive(serde::Deserialize)]
struct PodList {
    metadata: Meta,
    #[serde(default)]
    items: Vec<Obj>,
}

#[derive(serde::Deserialize)]
struct WatchEvent {
    #[serde(rename = "type")]
    kind: String,
    object: Obj,
}

async fn list(
    spec: &AgentSpec,
    sender: &mut SendRequest<Empty<Bytes>>,
    state: &AgentState,
    counters: &FleetCounters,
    began: Instant,
) -> Result<String, Failure> {
    // client-go's reflector pages its LISTs (500); with resourceVersion=0
    // the apiserver's watch cache ignores the limit.
    let mut query = selector(&spec.node);
    query.push_str("&limit=500");
    if !spec.consistent_list {
        query.push_str("&resourceVersion=0");
    }
    sender.ready().await.map_err(|_| Failure::Other)?;
    let resp = sender
        .send_request(request(spec, &query))
        .await
        .map_err(|_| Failure::Other)?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|_| Failure::Other)?
        .to_bytes();
    match status {
        StatusCode::OK => {}
        StatusCode::TOO_MANY_REQUESTS => return Err(Failure::TooMany(retry_after(&headers))),
        StatusCode::GONE => return Err(Failure::Gone),
        _ => return Err(Failure::Other),
    }
    let (list_rv, metas): (String, Vec<Meta>) = if is_protobuf(&headers) {
        counters.protobuf_answers.fetch_add(1, Ordering::Relaxed);
        let (rv, items) = super::pb::list(&body).map_err(|_| Failure::Other)?;
        let items = items
            .into_iter()
            .map(|m| Meta {
                namespace: m.namespace,
                name: m.name,
                resource_version: m.resource_version,
            })
            .collect();
        (rv, items)
    } else {
        let list: PodList = serde_json::from_slice(&body).map_err(|_| Failure::Other)?;
        let items = list.items.into_iter().map(|o| o.metadata).collect();
        (list.metadata.resource_version, items)
    };
    let view: View = metas
        .into_iter()
        .map(|m| (format!("{}/{}", m.namespace, m.name), m.resource_version))
        .collect();
    *state.view.lock().unwrap_or_else(|e| e.into_inner()) = view;
    state
        .list_latencies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(began.elapsed());
    counters.lists_ok.fetch_add(1, Ordering::Relaxed);
    Ok(list_rv)
}

/// Counts the agent as watching while alive.
struct Watching<'a>(&'a FleetCounters, &'a AgentState);

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        self.1.watching.store(false, Ordering::Relaxed);
        self.0.watching.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One WATCH from `from`; keeps `rv` current. Ok when the stream ended
/// normally (re-watch from `rv`).
async fn watch(
    spec: &AgentSpec,
    sender: &mut SendRequest<Empty<Bytes>>,
    state: &AgentState,
    counters: &FleetCounters,
    cancel: &CancellationToken,
    from: String,
    rv: &mut Option<String>,
) -> Result<(), Failure> {
    // client-go picks a timeout in [5, 10) minutes.
    let timeout = rand::rng().random_range(300..600);
    let query = format!(
        "{}&resourceVersion={from}&watch=true&allowWatchBookmarks=true&timeoutSeconds={timeout}",
        selector(&spec.node)
    );
    tokio::select! {
        _ = cancel.cancelled() => return Ok(()),
        r = sender.ready() => r.map_err(|_| Failure::Other)?,
    }
    let resp = tokio::select! {
        _ = cancel.cancelled() => return Ok(()),
        r = sender.send_request(request(spec, &query)) => r.map_err(|_| Failure::Other)?,
    };
    match resp.status() {
        StatusCode::OK => {}
        StatusCode::TOO_MANY_REQUESTS => {
            let after = retry_after(resp.headers());
            // Drain the small Status body so the connection can be re-used.
            let _ = resp.into_body().collect().await;
            return Err(Failure::TooMany(after));
        }
        StatusCode::GONE => return Err(Failure::Gone),
        _ => return Err(Failure::Other),
    }
    let protobuf = is_protobuf(resp.headers());
    if protobuf {
        counters.protobuf_answers.fetch_add(1, Ordering::Relaxed);
    }
    counters.watching.fetch_add(1, Ordering::Relaxed);
    state.watching.store(true, Ordering::Relaxed);
    let _watching = Watching(counters, state);
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    loop {
        let frame = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            f = body.frame() => f,
        };
        let Some(frame) = frame else {
            return Ok(()); // the server ended the watch: re-watch from rv
        };
        let frame = frame.map_err(|_| Failure::Other)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        if protobuf {
            while let Some(frame) = super::pb::next_frame(&mut buf) {
                let (kind, m, code) = super::pb::event(&frame).map_err(|_| Failure::Other)?;
                let ev = WatchEvent {
                    kind,
                    object: Obj {
                        metadata: Meta {
                            namespace: m.namespace,
                            name: m.name,
                            resource_version: m.resource_version,
                        },
                        code,
                    },
                };
                apply(state, &ev, rv)?;
            }
            continue;
        }
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line = buf.split_to(nl + 1);
            let line = line.chunk();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let ev: WatchEvent = serde_json::from_slice(line).map_err(|_| Failure::Other)?;
            apply(state, &ev, rv)?;
        }
    }
}

fn apply(state: &AgentState, ev: &WatchEvent, rv: &mut Option<String>) -> Result<(), Failure> {
    let m = &ev.object.metadata;
    match ev.kind.as_str() {
        "ADDED" | "MODIFIED" => {
            state.view.lock().unwrap_or_else(|e| e.into_inner()).insert(
                format!("{}/{}", m.namespace, m.name),
                m.resource_version.clone(),
            );
        }
        "DELETED" => {
            state
                .view
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&format!("{}/{}", m.namespace, m.name));
        }
        "BOOKMARK" => {}
        "ERROR" => {
            return Err(if ev.object.code == Some(410) {
                Failure::Gone
            } else {
                Failure::Other
            });
        }
        _ => return Err(Failure::Other),
    }
    if !m.resource_version.is_empty() {
        *rv = Some(m.resource_version.clone());
    }
    Ok(())
}
