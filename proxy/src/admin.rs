//! The admin listener: health, readiness, metrics and the emergency brake,
//! over plain HTTP/1.1.
//!
//! - `GET /healthz`, `/livez`, `/readyz`, `/metrics`
//! - `GET /debug/top`: who loads the apiserver now, and what the proxy does
//!   about it (JSON, [`crate::top::view::TopView`]; `breakwater top` reads it)
//! - `GET /admin/v1/blocks`: the block list (JSON array of
//!   `breakwater_limits::BlockStatus`: each block with its `hits` and
//!   `terminated` counts)
//! - `POST /admin/v1/blocks`: add a block (a `Block` JSON object; `id` and
//!   `createdAt` may be left out); 201 with the stored block and its
//!   counts. With `"terminate": true` the matching long-running requests
//!   already open end before the answer (`terminated` says how many).
//!   400 for a malformed or invalid block, 409 for a duplicate id, 422
//!   for an exempt target without `force`
//! - `DELETE /admin/v1/blocks/{id}`: remove one; 404 if unknown
//!
//! Blocks work while the apiserver is unreachable: they are decided before
//! anything is forwarded.
//!
//! It binds 127.0.0.1 by default: it is for the kubelet's probes and the
//! node's Prometheus, never for clients. `/readyz` fails while the proxy
//! drains, so load balancers stop sending new connections before the
//! listener closes, and while the apiserver is unreachable.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admit::Admission;
use crate::error::Chain;
use crate::upstream::Upstream;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder. The first proxy in a process
/// installs it; later ones (tests run several) share it. What `/metrics`
/// serves is [`render_metrics`]: this recorder's metrics and the SLO
/// histograms.
pub fn prometheus() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        // The SLO histograms and the request-duration summary are not in
        // this recorder (`crate::slo::render` adds them).
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics will be empty");
        }
        crate::slo::RECORDER_INSTALLED.store(true, std::sync::atomic::Ordering::Relaxed);
        handle
    })
}

/// The text `/metrics` serves: the recorder's metrics, then the SLO
/// histograms with the apiserver's buckets and the request-duration
/// summary ([`crate::slo::render`]).
pub fn render_metrics() -> String {
    let mut text = prometheus().render();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    crate::slo::render(&mut text);
    text
}

/// What the admin endpoints read.
pub struct AdminState {
    /// False once shutdown has begun.
    pub ready: AtomicBool,
    pub upstream: Upstream,
    pub admission: Arc<Admission>,
    pub hub: crate::watch::Hub,
    pub top: Arc<crate::top::Top>,
    /// The long-running requests open (a terminating block ends its own).
    pub open: Arc<crate::brake::OpenStreams>,
}

/// Serves the admin endpoints until `stop` is cancelled, then waits for its
/// connections to finish. Its tasks (connections, metrics upkeep) run on
/// `tasks`, the proxy's tracker.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    // The admin connections, to wait for them here.
    let conns = TaskTracker::new();
    tasks.spawn({
        let stop = stop.clone();
        let upstream = state.upstream.clone();
        async move {
            // Upkeep drains any histogram recorded through `metrics` (none
            // of the proxy's own: `crate::slo` keeps those). The
            // apiserver is probed as /readyz does, so that
            // `breakwater_upstream_up` stays current without a kubelet
            // probing us (one GET /readyz per 5 s).
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => prometheus().run_upkeep(),
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = upstream.probe(Duration::from_secs(2)) => {}
                }
            }
        }
    });
    loop {
        let (tcp, _) = tokio::select! {
            _ = stop.cancelled() => break,
            res = listener.accept() => match res {
                Ok(pair) => pair,
                Err(err) => {
                    tracing::warn!(error = %Chain(&err), "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let stop = stop.clone();
        tasks.spawn(conns.track_future(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        }));
    }
    conns.close();
    conns.wait().await;
}

async fn route(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(rest) = req.uri().path().strip_prefix("/admin/v1/blocks") {
        return blocks(state, rest.to_string(), req).await;
    }
    match req.uri().path() {
        "/healthz" | "/livez" => text(StatusCode::OK, "ok"),
        "/readyz" => {
            if !state.ready.load(Ordering::Acquire) {
                text(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
            } else if state.upstream.probe(Duration::from_secs(2)).await {
                text(StatusCode::OK, "ok")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "apiserver unreachable")
            }
        }
        "/debug/top" => {
            let sources = crate::top::Sources {
                upstream: &state.upstream,
                admission: &state.admission,
                hub: state.hub.stats(),
            };
            json(StatusCode::OK, &state.top.view(&sources))
        }
        "/metrics" => {
            let mut resp = Response::new(Full::new(Bytes::from(render_metrics())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            resp
        }
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

/// The block-list API.
async fn blocks(state: &AdminState, rest: String, req: Request<Incoming>) -> Response<Full<Bytes>> {
    use http::Method;
    use http_body_util::BodyExt;
    let admission = &state.admission;
    match (req.method().clone(), rest.as_str()) {
        (Method::GET, "" | "/") => json(StatusCode::OK, &admission.block_statuses()),
        (Method::POST, "" | "/") => {
            // Bounded: a block is a few hundred bytes.
            let limited = http_body_util::Limited::new(req.into_body(), 64 * 1024);
            let body = match limited.collect().await {
                Ok(b) => b.to_bytes(),
                Err(err) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!("reading the body: {}", Chain(&*err)),
                    );
                }
            };
            let block: breakwater_limits::Block = match serde_json::from_slice(&body) {
                Ok(b) => b,
                Err(err) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!("not a block: {}", Chain(&err)),
                    );
                }
            };
            match admission.add_block(block) {
                Ok(active) => {
                    if active.block().terminate {
                        state.open.terminate(&active);
                    }
                    json(StatusCode::CREATED, &active.status())
                }
                Err(err) => {
                    use breakwater_limits::BlockError;
                    let status = match &err {
                        crate::admit::AdmitError::Blocks(BlockError::DuplicateId(_)) => {
                            StatusCode::CONFLICT
                        }
                        crate::admit::AdmitError::Blocks(BlockError::Exempt(_)) => {
                            StatusCode::UNPROCESSABLE_ENTITY
                        }
                        crate::admit::AdmitError::Blocks(
                            BlockError::InvalidPattern(_)
                            | BlockError::Empty(_)
                            | BlockError::UnknownRule(..),
                        ) => StatusCode::BAD_REQUEST,
                        // Added, but not saved: the answer must say so.
                        _ => StatusCode::INTERNAL_SERVER_ERROR,
                    };
                    error(status, &Chain(&err).to_string())
                }
            }
        }
        (Method::DELETE, id) if id.len() > 1 => match admission.remove_block(&id[1..]) {
            Ok(Some(block)) => json(StatusCode::OK, &block),
            Ok(None) => error(StatusCode::NOT_FOUND, "no such block"),
            Err(err) => error(StatusCode::INTERNAL_SERVER_ERROR, &Chain(&err).to_string()),
        },
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "use GET or POST /admin/v1/blocks, DELETE /admin/v1/blocks/{id}",
        ),
    }
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({"error": message}))
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Why `breakwater probe` failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}: only plain http:// URLs (the admin listener) can be probed")]
    NotHttp(String),
    #[error("GET {url}")]
    Request {
        url: String,
        #[source]
        source: crate::upstream::BoxError,
    },
    #[error("{0} answered {1}")]
    Status(String, http::StatusCode),
    #[error("{0}: no answer within {1:?}")]
    Timeout(String, std::time::Duration),
}

/// `breakwater probe`: GETs an admin endpoint (default `/readyz`) and
/// succeeds on 200. For exec probes where the kubelet cannot reach the
/// admin listener on the pod's loopback (a sidecar without hostNetwork),
/// in an image without curl.
pub async fn probe(url: &str, within: std::time::Duration) -> Result<(), ProbeError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| ProbeError::Request {
            url: url.into(),
            source: e.into(),
        })?;
    if uri.scheme_str() != Some("http") {
        return Err(ProbeError::NotHttp(url.into()));
    }
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let resp = tokio::time::timeout(within, client.get(uri))
        .await
        .map_err(|_| ProbeError::Timeout(url.into(), within))?
        .map_err(|e| ProbeError::Request {
            url: url.into(),
            source: e.into(),
        })?;
    if resp.status() == http::StatusCode::OK {
        Ok(())
    } else {
        Err(ProbeError::Status(url.into(), resp.status()))
    }
}
