//! kube-sim's HTTP front: TLS accept loop, request classification, handlers.
//!
//! One request goes through named phases, in the apiserver's filter order:
//! 1. `authenticate` — requestheader (front-proxy CA connection with an
//!    allowed CN + X-Remote-User), then the client certificate, then a Bearer
//!    SA token; no credentials at all is `system:anonymous` (401 with
//!    `--anonymous-auth=false`); a credential that fails verification is a
//!    bare 401 Status;
//! 2. `impersonate` — Impersonate-* headers, each authorized with the
//!    `impersonate` verb (403 when denied);
//! 3. `authorize` — the request's attributes (the apiserver's RequestInfo,
//!    [`request_attributes`]) against RBAC; 403 Status when denied;
//! 4. non-resource paths — health, /version, /metrics, discovery, OpenAPI;
//! 5. `classify` — kube-sim's own routing: the served type, namespace, name,
//!    subresource and verb (watch vs list);
//! 6. the handler for the verb, whose errors become Status bodies.
//!
//! Watches stream: each event is written as its own frame the moment the
//! store emits it (a small channel between a pump task and the response
//! body, never a buffer of the whole stream), so a slow client pushes back on
//! its store queue and the store evicts it as the apiserver would.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::auth::{self, AuthPath, AuthRecord, Authenticator, Impersonate, UserInfo};
use super::binding::bind;
use super::metrics::{RequestLabels, SimMetrics};
use super::rbac::{self, Attributes, Authorizer, Decision};
use super::resources::ResourceType;
use super::respond::{
    self, EventEncoder, Negotiated, full, json_response, method_not_allowed, not_found,
    status_response, store_error, unsupported_media_type, unsupported_media_type_custom,
};
use super::store::{ListOptions, ListResult, PatchKind, Store, StoreError};
use super::{SimError, SimPki, discovery, exec, openapi, protobuf};
use crate::error::Chain;

/// Largest request body accepted (the apiserver's limit is 3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Frames buffered between a watch pump and its response body. Small on
/// purpose: when the client stops reading, the pump stops draining the
/// store's per-watcher queue, and the store closes a watcher that overflows.
const WATCH_FRAME_BUFFER: usize = 16;

/// The apiserver sends the pre-timeout bookmark this long before a watch's
/// deadline (cacher's `nextBookmarkTime`).
const PRE_TIMEOUT_BOOKMARK: Duration = Duration::from_secs(2);

pub use super::respond::ResBody;

/// State shared by every connection.
pub(crate) struct State {
    pub(crate) store: Store,
    pub(crate) auth: Authenticator,
    pub(crate) authz: Authorizer,
    /// Verifies a client certificate against the front-proxy CA only: a
    /// connection whose certificate passes is a front-proxy connection.
    pub(crate) front_proxy_verifier: Arc<dyn ClientCertVerifier>,
    /// `--requestheader-allowed-names` (empty: any CN).
    pub(crate) requestheader_allowed_names: Vec<String>,
    pub(crate) metrics: Arc<SimMetrics>,
    pub(crate) min_request_timeout: Duration,
    /// Cancelled on shutdown: stops the accept loop, ends watches, closes connections.
    pub(crate) cancel: CancellationToken,
    /// Every connection and watch pump, so shutdown can wait for them.
    pub(crate) tracker: TaskTracker,
    /// Incident lab: the capacity model (capacity.rs), when configured.
    pub(crate) capacity: Option<Arc<super::capacity::Capacity>>,
    /// SETTINGS_MAX_CONCURRENT_STREAMS per HTTP/2 connection (never 0 here:
    /// [`super::SimConfig::effective_http2_max_streams`] resolved it).
    pub(crate) http2_max_streams: u32,
    /// `--anonymous-auth`: whether a request without credentials is
    /// `system:anonymous` (true) or refused with 401 (false).
    /// Switchable at run time ([`super::KubeSim::set_anonymous_auth`]), as a
    /// restarted apiserver with another flag would be.
    pub(crate) anonymous_auth: std::sync::atomic::AtomicBool,
    /// Which authenticator accepted each user's requests.
    pub(crate) auth_record: AuthRecord,
    /// The Go-like transport ([`super::transport`]): the apiserver's
    /// response headers and HTTP/2 flushing, when on.
    pub(crate) go_like: Option<super::transport::ApiserverHeaders>,
}

/// The rustls config: our serving cert, ALPN h2 + http/1.1, client certs
/// optional but verified, when presented, against the client CA or the
/// front-proxy CA (which of the two is decided per connection afterwards).
pub(crate) fn tls_config(pki: &SimPki) -> Result<rustls::ServerConfig, SimError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_slice_iter(pki.server.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| SimError::Pem {
            what: "server certificate",
            source,
        })?;
    let key = PrivateKeyDer::from_pem_slice(pki.server.key_pem.as_bytes()).map_err(|source| {
        SimError::Pem {
            what: "server key",
            source,
        }
    })?;
    // Optional client certs: token users connect without one, as with the
    // apiserver's --client-ca-file.
    let verifier = client_verifier(
        &[
            ("client CA", pki.client_ca.cert_pem()),
            ("front-proxy CA", pki.front_proxy_ca.cert_pem()),
        ],
        &provider,
    )?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A verifier for client certificates chaining to any of `cas` (PEM);
/// certificates stay optional.
pub(crate) fn client_verifier(
    cas: &[(&'static str, &str)],
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, SimError> {
    let mut roots = rustls::RootCertStore::empty();
    for (what, pem) in cas {
        for ca in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let ca = ca.map_err(|source| SimError::Pem { what, source })?;
            roots.add(ca)?;
        }
    }
    Ok(rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(provider),
    )
    .allow_unauthenticated()
    .build()?)
}

/// Accepts connections until shutdown. Accept errors (EMFILE, resets) are
/// logged and retried after a short pause instead of ending the server.
pub(crate) async fn accept_loop(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
) {
    loop {
        let accepted = tokio::select! {
            _ = state.cancel.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nodelay(true);
                state.tracker.spawn(serve_connection(
                    tcp,
                    peer,
                    acceptor.clone(),
                    Arc::clone(&state),
                ));
            }
            Err(e) => {
                tracing::warn!(error = %Chain(&e), "kube-sim accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Queues a bookmark into every bookmark-enabled watcher each `interval`
/// (the apiserver does this roughly every minute).
pub(crate) async fn bookmark_loop(state: Arc<State>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // the first tick is immediate
    loop {
        tokio::select! {
            _ = state.cancel.cancelled() => break,
            _ = ticker.tick() => state.store.send_bookmarks(),
        }
    }
}

/// What a connection's client certificate says about its caller.
#[derive(Debug)]
enum ConnCert {
    /// No client certificate.
    None,
    /// A client-CA certificate: its user (CN, O = groups).
    Client(UserInfo),
    /// A front-proxy-CA certificate; `allowed` when its CN is one of the
    /// requestheader allowed names. Never a user itself.
    FrontProxy { allowed: bool },
    /// A verified certificate that names no user (no CN).
    Invalid,
}

/// What a connection knows about its caller before any request.
struct ConnInfo {
    cert: ConnCert,
    /// Set until the connection's first request: with TLS 1.3 the client's
    /// Finished and its first request arrive together, so the goroutine
    /// that finishes the handshake goes straight on to serve it.
    fresh: std::sync::atomic::AtomicBool,
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
) {
    // Incident lab: the handshake's CPU, on the modeled CPU, before the
    // connection can speak (a Go server handshakes in the connection's
    // goroutine, queued on the run queue like every other).
    if let Some(cap) = &state.capacity {
        cap.serve(cap.cost().tls_handshake).await;
    }
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %Chain(&e), "kube-sim TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "kube-sim TLS handshake timed out");
            return;
        }
    };
    // rustls already verified the chain against one of the two CAs; which
    // one decides whether the certificate is a user or a front proxy.
    let cert = match tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.split_first())
    {
        None => ConnCert::None,
        Some((leaf, intermediates)) => {
            if state
                .front_proxy_verifier
                .verify_client_cert(leaf, intermediates, UnixTime::now())
                .is_ok()
            {
                let cn = auth::cert_common_name(leaf);
                let names = &state.requestheader_allowed_names;
                ConnCert::FrontProxy {
                    allowed: names.is_empty() || names.contains(&cn),
                }
            } else {
                auth::user_from_cert(leaf).map_or(ConnCert::Invalid, ConnCert::Client)
            }
        }
    };
    let conn = Arc::new(ConnInfo {
        cert,
        fresh: std::sync::atomic::AtomicBool::new(true),
    });
    let svc_state = Arc::clone(&state);
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let state = Arc::clone(&svc_state);
        let conn = Arc::clone(&conn);
        async move {
            let version = req.version();
            let mut resp = handle(&state, &conn, req).await;
            if let Some(headers) = &state.go_like {
                headers.apply(&mut resp);
                resp = super::transport::go_flush(resp, version);
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    super::transport::configure_http2(
        &mut builder,
        state.http2_max_streams,
        state.go_like.is_some(),
    );
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %Chain(&*e), "kube-sim connection ended with an error");
            }
        }
        _ = state.cancel.cancelled() => {
            // Finish in-flight requests (watches end on the same signal),
            // then close.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// One request, start to finish, with an access log line (never a token).
async fn handle(state: &Arc<State>, conn: &ConnInfo, req: Request<Incoming>) -> Response<ResBody> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = route(state, conn, req).await;
    tracing::debug!(%method, %path, status = resp.status().as_u16(), "kube-sim request");
    resp
}

async fn route(state: &Arc<State>, conn: &ConnInfo, req: Request<Incoming>) -> Response<ResBody> {
    let path = req.uri().path();
    // Errors before a handler claims the request are Status objects,
    // negotiated like any answer (protobuf for a protobuf-first client).
    let early = Negotiated::for_status(req.headers());

    // Phase 1: who is calling.
    let Some((user, via)) = authenticate(
        &state.auth,
        state
            .anonymous_auth
            .load(std::sync::atomic::Ordering::Relaxed),
        conn,
        req.headers(),
    ) else {
        state.metrics.record(non_resource_labels(), 401);
        return respond::unauthorized(&early);
    };
    state.auth_record.record(via, &user.username);

    // Phase 2: impersonation, authorized for the authenticated user.
    let user = match impersonate(&state.authz, user, req.headers(), &early) {
        Ok(user) => user,
        Err(resp) => {
            state
                .metrics
                .record(non_resource_labels(), resp.status().as_u16());
            return resp;
        }
    };

    // Phase 3: may this user make this request?
    let attrs = request_attributes(req.method(), path, req.uri().query());
    if let Err(resp) = authorize(&state.authz, &user, &attrs, req.headers(), &early) {
        let labels = classify(&state.store, req.method(), path, req.uri().query())
            .map(|info| info.labels())
            .unwrap_or_else(|_| non_resource_labels());
        state.metrics.record(labels, 403);
        return resp;
    }

    // Phase 4: non-resource endpoints.
    if let Some(resp) = public(path).or_else(|| non_resource(state, &req)) {
        state
            .metrics
            .record(non_resource_labels(), resp.status().as_u16());
        return resp;
    }

    // Phase 5: classify to a served type.
    let info = match classify(&state.store, req.method(), path, req.uri().query()) {
        Ok(info) => info,
        Err(Reject::NotFound) => return not_found(&early),
        Err(Reject::MethodNotAllowed) => return method_not_allowed(&early),
    };
    // How this request's objects and errors are encoded.
    let neg = Negotiated::for_type(info.rt, req.headers());

    // Incident lab (capacity.rs): what comes before APF in the apiserver's
    // handler chain (reading the request, authentication, authorization,
    // the filters) costs the request's base CPU before it can take a seat:
    // a request waiting for the CPU does not hold one.
    if let Some(cap) = &state.capacity {
        let base = cap.cost().request_base;
        if conn.fresh.swap(false, std::sync::atomic::Ordering::Relaxed) {
            cap.serve_next(base).await;
        } else {
            cap.serve(base).await;
        }
    }
    // APF-like admission — a seat, a wait in queue, or 429 — held until the
    // modeled CPU work below is done.
    let _seat = match &state.capacity {
        Some(cap) => match cap
            .admit_flow(
                user.groups.iter().any(|g| g == "system:masters"),
                // APF's `ByUser` flows: one per user.
                &user.username,
                seats(cap.config(), &state.store, &info),
                // A watch has no deadline (a long-running request).
                info.verb == Verb::Watch,
            )
            .await
        {
            Ok(seat) => Some(seat),
            Err(resp) => {
                state.metrics.record(info.labels(), resp.status().as_u16());
                return resp;
            }
        },
        None => None,
    };

    // Phase 6: the handler. Watches count themselves when they end.
    let labels = info.labels();
    let resp = match info.verb {
        // Incident lab: opening a watch costs the base CPU served above.
        Verb::Watch => return watch(state, &info, &neg, req.uri().query()),
        _ => dispatch(state, &info, &user, &neg, req).await,
    };
    // Incident lab: the rest of the CPU this request cost (its base was
    // served before admission), on the modeled CPU, holding the seat. A
    // request that goes to etcd first waits for etcd's CPU (its gRPC call
    // arrives from the network at the back of etcd's run queue); etcd's
    // answer arrives from the network too, so the apiserver's gRPC reader
    // rejoins the back of the apiserver's run queue before it hands the
    // message to the handler, which decodes it (`serve_from_etcd`). A
    // request answered without etcd goes straight on (`runnext`).
    if let Some(cap) = &state.capacity {
        let work =
            super::capacity::request_cost(cap.cost(), &state.store, &info_cost(&info), &resp);
        let rest = work.apiserver.saturating_sub(cap.cost().request_base);
        match work.etcd {
            Some(etcd) => {
                cap.serve_from_etcd(etcd, rest, info.verb == Verb::List)
                    .await
            }
            None => cap.serve_next(rest).await,
        }
    }
    state.metrics.record(labels, resp.status().as_u16());
    resp
}

/// Incident lab: the seats APF gives a request (a LIST's work estimate;
/// everything else one).
fn seats(cfg: &super::capacity::CapacityConfig, store: &Store, info: &ReqInfo) -> u32 {
    if info.verb != Verb::List {
        return 1;
    }
    let Ok(opts) = ListOptions::from_query(info.rt, &info.list_query) else {
        return 1;
    };
    let from_cache = opts.resource_version.as_deref() == Some("0");
    let selectors = !opts.label_selector.is_empty() || !opts.field_selector.is_empty();
    cfg.list_seats(store.count(info.rt), from_cache, selectors, opts.limit)
}

/// Incident lab: what the capacity model needs to know about a request.
fn info_cost(info: &ReqInfo) -> super::capacity::RequestKind {
    use super::capacity::RequestKind;
    match info.verb {
        Verb::List => {
            let opts = ListOptions::from_query(info.rt, &info.list_query).ok();
            let consistent = opts
                .as_ref()
                .is_some_and(|o| o.resource_version.as_deref().is_none_or(str::is_empty));
            // A consistent page without selectors reads limit+1 keys from etcd.
            let scan_bound = opts.as_ref().and_then(|o| {
                let plain = o.label_selector.is_empty() && o.field_selector.is_empty();
                o.limit.filter(|_| consistent && plain).map(|l| l + 1)
            });
            // The v1.24 cacher indexes pods by spec.nodeName
            // (`f:spec.nodeName`): an exact match reads only that node's pods.
            let indexed = info.rt.kind == "Pod"
                && opts
                    .as_ref()
                    .is_some_and(|o| o.field_selector.exact_value("spec.nodeName").is_some());
            RequestKind::List {
                rt: info.rt,
                consistent,
                scan_bound,
                indexed,
            }
        }
        Verb::Create | Verb::Update | Verb::Patch | Verb::Delete | Verb::DeleteCollection => {
            RequestKind::Write
        }
        // A GET without resourceVersion is a quorum read from etcd.
        Verb::Get => RequestKind::Read {
            consistent: ListOptions::from_query(info.rt, &info.list_query)
                .ok()
                .is_none_or(|o| o.resource_version.as_deref().is_none_or(str::is_empty)),
        },
        _ => RequestKind::Read { consistent: false },
    }
}

fn public(path: &str) -> Option<Response<ResBody>> {
    match path {
        "/healthz" | "/livez" | "/readyz" => Some(text(StatusCode::OK, "ok")),
        p if p.starts_with("/healthz/")
            || p.starts_with("/livez/")
            || p.starts_with("/readyz/") =>
        {
            Some(text(StatusCode::OK, "ok"))
        }
        "/version" => discovery::serve(path, &[]).map(bytes_response),
        _ => None,
    }
}

fn non_resource(state: &State, req: &Request<Incoming>) -> Option<Response<ResBody>> {
    let path = req.uri().path();
    if path == "/metrics" {
        let mut resp = Response::new(full(state.metrics.render()));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        return Some(resp);
    }
    if let Some(resp) = discovery::serve(path, &state.store.types()) {
        return Some(bytes_response(resp));
    }
    // ServiceAccountIssuerDiscovery, with the apiserver's content types.
    let document = match path {
        "/.well-known/openid-configuration" => {
            Some((state.auth.openid_configuration(), "application/json"))
        }
        "/openid/v1/jwks" => Some((state.auth.jwks(), "application/jwk-set+json")),
        _ => None,
    };
    if let Some((document, content_type)) = document {
        // go-restful routes them (pkg/routes/openidmetadata.go): an Accept
        // naming neither the produced type nor */* is a 406.
        let accept = req
            .headers()
            .get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !restful_accepts(accept, content_type) {
            return Some(text(StatusCode::NOT_ACCEPTABLE, "406: Not Acceptable"));
        }
        let mut resp = discovery::bytes_response(StatusCode::OK, content_type, document);
        // The apiserver lets these be cached (openidmetadata.go).
        resp.headers_mut().insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=3600"),
        );
        return Some(bytes_response(resp));
    }
    openapi::serve(path, req.uri().query(), req.headers()).map(bytes_response)
}

/// go-restful's `Route.matchesAccept`: an empty Accept is `*/*`; else one
/// of its media types (parameters dropped) must be `*/*` or exactly
/// `produces`.
fn restful_accepts(accept: &str, produces: &str) -> bool {
    let accept = if accept.trim().is_empty() {
        "*/*"
    } else {
        accept
    };
    accept.split(',').any(|m| {
        let m = m.split(';').next().unwrap_or("").trim();
        m == "*/*" || m == produces
    })
}

/// The apiserver's union authenticator: requestheader, x509, bearer token;
/// None (401) when a credential was presented and none succeeded; when
/// nothing was presented, the anonymous user if `anonymous` allows it
/// (`--anonymous-auth`), else None as well. With the user, which
/// authenticator accepted it.
fn authenticate(
    auth: &Authenticator,
    anonymous: bool,
    conn: &ConnInfo,
    headers: &HeaderMap,
) -> Option<(UserInfo, AuthPath)> {
    // A credential that failed: the request is refused unless a later
    // authenticator succeeds (the union returns the first success).
    let mut failed = false;
    match &conn.cert {
        ConnCert::Client(user) => return Some((user.clone(), AuthPath::ClientCertificate)),
        ConnCert::FrontProxy { allowed: true } => match auth::front_proxy_user(headers) {
            Some(user) => return Some((user, AuthPath::RequestHeader)),
            // requestheader has no opinion; x509 then rejects a certificate
            // that is not from the client CA.
            None => failed = true,
        },
        ConnCert::FrontProxy { allowed: false } | ConnCert::Invalid => failed = true,
        ConnCert::None => {}
    }
    if let Some(value) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        // bearertoken: only "Bearer <token>" is a token; anything else is
        // not this authenticator's business.
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .unwrap_or("");
        if !token.is_empty() {
            match auth.authenticate(token) {
                Ok(user) => {
                    let via = match conn.cert {
                        ConnCert::None => AuthPath::Token,
                        _ => AuthPath::TokenBesideCertificate,
                    };
                    return Some((user, via));
                }
                Err(e) => {
                    tracing::debug!(error = %Chain(&e), "kube-sim refused a bearer token");
                    failed = true;
                }
            }
        }
    }
    // The anonymous authenticator is the union's last member: it never
    // rescues a failed credential, and without it an empty request fails
    // like a bad one.
    if failed || !anonymous {
        None
    } else {
        Some((UserInfo::anonymous(), AuthPath::Anonymous))
    }
}

/// The apiserver's impersonation filter: each Impersonate-* request is
/// authorized for `user` with the `impersonate` verb, then the request runs
/// as the impersonated user.
#[allow(clippy::result_large_err)]
fn impersonate(
    authz: &Authorizer,
    user: UserInfo,
    headers: &HeaderMap,
    neg: &Negotiated,
) -> Result<UserInfo, Response<ResBody>> {
    let requests = match auth::impersonation_requests(headers) {
        Ok(r) if r.is_empty() => return Ok(user),
        Ok(r) => r,
        Err(e) => return Err(internal_error(&e)),
    };
    let groups_specified = headers.contains_key("impersonate-group");
    let mut username = String::new();
    let mut groups: Vec<String> = Vec::new();
    let mut extra: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut uid = String::new();
    for r in &requests {
        let mut attrs = Attributes {
            verb: "impersonate".to_string(),
            resource_request: true,
            api_version: "v1".to_string(),
            ..Attributes::default()
        };
        match r {
            Impersonate::ServiceAccount { namespace, name } => {
                attrs.resource = "serviceaccounts".into();
                attrs.namespace = namespace.clone();
                attrs.name = name.clone();
                username = format!("system:serviceaccount:{namespace}:{name}");
                if !groups_specified {
                    groups = vec![
                        "system:serviceaccounts".to_string(),
                        format!("system:serviceaccounts:{namespace}"),
                    ];
                }
            }
            Impersonate::User(name) => {
                attrs.resource = "users".into();
                attrs.name = name.clone();
                username = name.clone();
            }
            Impersonate::Group(name) => {
                attrs.resource = "groups".into();
                attrs.name = name.clone();
                groups.push(name.clone());
            }
            Impersonate::Extra { key, value } => {
                attrs.api_group = "authentication.k8s.io".into();
                attrs.resource = "userextras".into();
                attrs.subresource = key.clone();
                attrs.name = value.clone();
                extra.entry(key.clone()).or_default().push(value.clone());
            }
            Impersonate::Uid(value) => {
                attrs.api_group = "authentication.k8s.io".into();
                attrs.resource = "uids".into();
                attrs.name = value.clone();
                uid = value.clone();
            }
        }
        if let Decision::Deny = authz.authorize(&user, &attrs) {
            return Err(forbidden(&user, &attrs, neg));
        }
    }
    if username != auth::ANONYMOUS {
        if !groups
            .iter()
            .any(|g| g == auth::AUTHENTICATED || g == auth::UNAUTHENTICATED)
        {
            groups.push(auth::AUTHENTICATED.to_string());
        }
    } else if !groups.iter().any(|g| g == auth::UNAUTHENTICATED) {
        groups.push(auth::UNAUTHENTICATED.to_string());
    }
    tracing::debug!(from = %user.username, to = %username, "kube-sim impersonation");
    Ok(UserInfo {
        username,
        uid,
        groups,
        extra,
    })
}

/// The authorization filter. A WebSocket `GET` of pods/exec also needs
/// `create` (AuthorizePodWebsocketUpgradeCreatePermission, on since 1.31).
#[allow(clippy::result_large_err)]
fn authorize(
    authz: &Authorizer,
    user: &UserInfo,
    attrs: &Attributes,
    headers: &HeaderMap,
    neg: &Negotiated,
) -> Result<(), Response<ResBody>> {
    if let Decision::Deny = authz.authorize(user, attrs) {
        return Err(forbidden(user, attrs, neg));
    }
    let upgrade = headers
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if upgrade
        && attrs.resource_request
        && attrs.verb == "get"
        && attrs.resource == "pods"
        && matches!(
            attrs.subresource.as_str(),
            "exec" | "attach" | "portforward"
        )
    {
        let create = Attributes {
            verb: "create".to_string(),
            ..attrs.clone()
        };
        if let Decision::Deny = authz.authorize(user, &create) {
            return Err(forbidden(user, &create, neg));
        }
    }
    Ok(())
}

/// The apiserver's RequestInfo, for authorization: resource requests under
/// `/api/{v}/` and `/apis/{g}/{v}/` (whether kube-sim serves the type or
/// not, so an unknown resource is 403 before it is 404, as upstream), every
/// other path a non-resource request with the lower-case method as verb.
pub(crate) fn request_attributes(method: &Method, path: &str, query: Option<&str>) -> Attributes {
    let non_resource = || Attributes::non_resource(&method.as_str().to_ascii_lowercase(), path);
    let mut parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if parts.len() < 3 {
        return non_resource();
    }
    let mut attrs = Attributes {
        resource_request: true,
        path: path.to_string(),
        ..Attributes::default()
    };
    match parts[0] {
        "api" => parts.remove(0),
        "apis" => {
            if parts.len() < 4 {
                return non_resource();
            }
            attrs.api_group = parts[1].to_string();
            parts.drain(..2).next().unwrap_or_default()
        }
        _ => return non_resource(),
    };
    attrs.api_version = parts.remove(0).to_string();
    if matches!(parts.first(), Some(&"watch") | Some(&"proxy")) {
        if parts.len() < 2 {
            return non_resource();
        }
        attrs.verb = parts.remove(0).to_string();
    } else {
        attrs.verb = match *method {
            Method::POST => "create",
            Method::GET | Method::HEAD => "get",
            Method::PUT => "update",
            Method::PATCH => "patch",
            Method::DELETE => "delete",
            _ => "",
        }
        .to_string();
    }
    if parts.first() == Some(&"namespaces") && parts.len() > 1 {
        attrs.namespace = parts[1].to_string();
        if parts.len() > 2 && !matches!(parts[2], "status" | "finalize") {
            parts.drain(..2);
        }
    }
    if parts.len() >= 3 && attrs.verb != "proxy" {
        attrs.subresource = parts[2].to_string();
    }
    if parts.len() >= 2 {
        attrs.name = parts[1].to_string();
    }
    if let Some(r) = parts.first() {
        attrs.resource = r.to_string();
    }
    let query = query.unwrap_or("");
    if attrs.name.is_empty() && attrs.verb == "get" {
        attrs.verb = if wants_watch(query) { "watch" } else { "list" }.to_string();
    }
    if attrs.name.is_empty() && matches!(attrs.verb.as_str(), "list" | "watch") {
        // A field selector pinning metadata.name names the object.
        if let Some((_, fs)) =
            form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "fieldSelector")
        {
            let fs = fs.trim();
            if let Some(name) = fs
                .strip_prefix("metadata.name==")
                .or_else(|| fs.strip_prefix("metadata.name="))
                && !name.is_empty()
                && !name.contains([',', '/', '%'])
                && name != "."
                && name != ".."
            {
                attrs.name = name.to_string();
            }
        }
    }
    if attrs.name.is_empty() && attrs.verb == "delete" {
        attrs.verb = "deletecollection".to_string();
    }
    attrs
}

/// The verb of a resource request (the apiserver's RequestInfo.Verb).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    DeleteCollection,
    /// exec: an upgraded, long-running connection.
    Connect,
}

impl Verb {
    /// Lower case, as discovery lists verbs.
    fn discovery_name(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create | Verb::Connect => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::DeleteCollection => "deletecollection",
        }
    }

    /// Upper case, as `apiserver_request_total` reports it (CleanVerb).
    fn metric_name(self) -> &'static str {
        match self {
            Verb::Get => "GET",
            Verb::List => "LIST",
            Verb::Watch => "WATCH",
            Verb::Create => "POST",
            Verb::Update => "PUT",
            Verb::Patch => "PATCH",
            Verb::Delete => "DELETE",
            Verb::DeleteCollection => "DELETECOLLECTION",
            Verb::Connect => "CONNECT",
        }
    }
}

/// A classified resource request.
#[derive(Debug)]
struct ReqInfo {
    verb: Verb,
    rt: &'static ResourceType,
    namespace: Option<String>,
    name: Option<String>,
    /// A subresource this type serves (`status`, `exec`, `token`, `log`).
    subresource: Option<&'static str>,
    /// The query to parse list options from (legacy `/watch/` paths with a
    /// name get a `metadata.name` field selector added).
    list_query: String,
}

impl ReqInfo {
    fn labels(&self) -> RequestLabels {
        let scope = if self.name.is_some() || self.verb == Verb::Create {
            "resource"
        } else if self.namespace.is_some() {
            "namespace"
        } else {
            "cluster"
        };
        RequestLabels {
            verb: self.verb.metric_name(),
            group: self.rt.group,
            version: self.rt.version,
            resource: self.rt.plural,
            subresource: self.subresource.unwrap_or(""),
            scope,
        }
    }

    fn ns(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }
}

/// Why a path is not a request kube-sim serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reject {
    /// 404: no such resource path.
    NotFound,
    /// 405: the resource exists but not with this method.
    MethodNotAllowed,
}

/// The apiserver's RequestInfo for `/api/v1/...` and `/apis/{g}/{v}/...`,
/// against the types `store` serves now (custom resources included).
fn classify(
    store: &Store,
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> Result<ReqInfo, Reject> {
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, mut rest) = match parts.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(Reject::NotFound),
    };
    let legacy_watch = rest.first() == Some(&"watch");
    if legacy_watch {
        rest = &rest[1..];
    }
    // `/namespaces/{ns}/{resource}...` moves to the inner resource, except the
    // namespace's own subresources (requestinfo.go's namespaceSubresources).
    let mut namespace = None;
    if rest.first() == Some(&"namespaces")
        && rest.len() > 2
        && !matches!(rest[2], "status" | "finalize")
    {
        namespace = Some(rest[1].to_string());
        rest = &rest[2..];
    }
    let (resource, name, sub) = match rest {
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some(*name), None),
        [resource, name, sub] => (*resource, Some(*name), Some(*sub)),
        _ => return Err(Reject::NotFound),
    };
    let Some(rt) = store.find(group, version, resource) else {
        return Err(Reject::NotFound);
    };
    if rt.namespaced != namespace.is_some() && (name.is_some() || !rt.namespaced) {
        // A named namespaced object needs its namespace; a cluster-scoped
        // type has no namespaced path.
        return Err(Reject::NotFound);
    }
    let subresource = match sub {
        None => None,
        Some(s) => match rt.subresources.iter().find(|r| r.name == s) {
            Some(r) => Some(r.name),
            None => return Err(Reject::NotFound),
        },
    };
    let query = query.unwrap_or("");
    let verb = if legacy_watch {
        if !matches!(*method, Method::GET | Method::HEAD) || subresource.is_some() {
            return Err(Reject::MethodNotAllowed);
        }
        Verb::Watch
    } else {
        match (method.clone(), name.is_some(), subresource) {
            (Method::GET | Method::HEAD, false, _) => {
                if wants_watch(query) {
                    Verb::Watch
                } else {
                    Verb::List
                }
            }
            (Method::GET | Method::HEAD, true, Some("exec")) => Verb::Connect,
            (Method::POST, true, Some("exec")) => Verb::Connect,
            (Method::GET | Method::HEAD, true, _) => Verb::Get,
            (Method::POST, false, _) => Verb::Create,
            (Method::POST, true, Some(_)) => Verb::Create,
            (Method::PUT, true, _) => Verb::Update,
            (Method::PATCH, true, _) => Verb::Patch,
            (Method::DELETE, true, None) => Verb::Delete,
            (Method::DELETE, false, None) => Verb::DeleteCollection,
            _ => return Err(Reject::MethodNotAllowed),
        }
    };
    // Namespaced types are only listed or watched across namespaces; every
    // other verb needs the namespace in the path.
    if rt.namespaced && namespace.is_none() && !matches!(verb, Verb::List | Verb::Watch) {
        return Err(Reject::MethodNotAllowed);
    }
    let allowed = match subresource {
        None => rt.verbs.contains(&verb.discovery_name()),
        Some(s) => rt
            .subresources
            .iter()
            .any(|r| r.name == s && r.verbs.contains(&verb.discovery_name())),
    };
    if !allowed {
        return Err(Reject::MethodNotAllowed);
    }
    let mut list_query = query.to_string();
    if legacy_watch && let Some(name) = name {
        let has_fs = form_urlencoded::parse(query.as_bytes()).any(|(k, _)| k == "fieldSelector");
        if !has_fs {
            let extra: String = form_urlencoded::Serializer::new(String::new())
                .append_pair("fieldSelector", &format!("metadata.name={name}"))
                .finish();
            if !list_query.is_empty() {
                list_query.push('&');
            }
            list_query.push_str(&extra);
        }
    }
    let name = if legacy_watch {
        None
    } else {
        name.map(str::to_string)
    };
    Ok(ReqInfo {
        verb,
        rt,
        namespace,
        name,
        subresource,
        list_query,
    })
}

/// GET without a name is a watch when `watch` is anything but "false"/"0".
fn wants_watch(query: &str) -> bool {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "watch")
        .is_some_and(|(_, v)| v != "false" && v != "0")
}

async fn dispatch(
    state: &Arc<State>,
    info: &ReqInfo,
    user: &UserInfo,
    neg: &Negotiated,
    req: Request<Incoming>,
) -> Response<ResBody> {
    let rt = info.rt;
    let store = &state.store;
    if info.verb == Verb::Connect {
        // pods/exec: exec.rs answers the WebSocket upgrade and runs the session.
        return bytes_response(exec::serve(req));
    }
    if info.subresource == Some("log") {
        return match store.get(rt, info.ns(), info.name()) {
            Ok(_) => text(StatusCode::OK, ""),
            Err(e) => store_error(&e, neg),
        };
    }
    let query = req.uri().query().map(str::to_string);
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| {
            s.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let result = match info.verb {
        Verb::Get => store
            .get(rt, info.ns(), info.name())
            .map(|obj| respond::object(StatusCode::OK, rt, &obj, neg, query.as_deref())),
        Verb::List => list(store, info, neg, query.as_deref()),
        Verb::DeleteCollection => ListOptions::from_query(rt, &info.list_query)
            .and_then(|opts| store.delete_collection(rt, info.ns(), &opts))
            .map(|items| {
                let result = ListResult {
                    items,
                    resource_version: store.current_rv(),
                    continue_token: None,
                    remaining_item_count: None,
                };
                respond::list(rt, &result, &neg.without_table(), None)
            }),
        Verb::Delete => store
            .delete(rt, info.ns(), info.name())
            .map(|obj| respond::written(StatusCode::OK, &obj, neg)),
        Verb::Create | Verb::Update | Verb::Patch => {
            let body = match read_body(req, &content_type, neg).await {
                Ok(body) => body,
                Err(resp) => return resp,
            };
            write(state, info, user, neg, &content_type, body)
        }
        Verb::Watch | Verb::Connect => unreachable_verb(),
    };
    result.unwrap_or_else(|e| store_error(&e, neg))
}

/// Watch and connect are routed before `dispatch`; reaching here is a bug,
/// answered as a 500 rather than a panic.
fn unreachable_verb() -> Result<Response<ResBody>, StoreError> {
    Ok(status_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"internal error","reason":"InternalError","code":500}"#,
        false,
    ))
}

fn list(
    store: &Store,
    info: &ReqInfo,
    neg: &Negotiated,
    query: Option<&str>,
) -> Result<Response<ResBody>, StoreError> {
    let rt = info.rt;
    let opts = ListOptions::from_query(rt, &info.list_query)?;
    let result = store.list(rt, info.ns(), &opts)?;
    Ok(respond::list(rt, &result, neg, query))
}

/// Create, update, patch (and their subresources) with a decoded body.
fn write(
    state: &State,
    info: &ReqInfo,
    user: &UserInfo,
    neg: &Negotiated,
    content_type: &str,
    body: Value,
) -> Result<Response<ResBody>, StoreError> {
    let rt = info.rt;
    let store = &state.store;
    let ns = info.ns();
    match (info.verb, info.subresource) {
        (Verb::Create, None) => {
            if !rt.is_stored() {
                return Ok(review(state, rt, user, &body));
            }
            if let (Some(ns), Some(body_ns)) = (
                ns,
                body.pointer("/metadata/namespace").and_then(Value::as_str),
            ) && !body_ns.is_empty()
                && body_ns != ns
            {
                return Err(StoreError::BadRequest(
                    "the namespace of the provided object does not match the namespace sent on the request"
                        .to_string(),
                ));
            }
            let created = store.create(rt, ns, body)?;
            if rt.plural == "namespaces"
                && let Some(name) = created.pointer("/metadata/name").and_then(Value::as_str)
            {
                // The serviceaccount controller's job in a real cluster.
                if let Err(e) = super::ensure_default_service_account(store, name) {
                    tracing::warn!(namespace = name, error = %Chain(&e), "kube-sim could not create the default ServiceAccount");
                }
            }
            Ok(respond::written(StatusCode::CREATED, &created, neg))
        }
        (Verb::Create, Some("token")) => {
            let ns = ns.unwrap_or("");
            let sa = store.get(rt, Some(ns), info.name())?;
            let uid = sa
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or("");
            let binding = super::token_binding(store, ns, &body);
            match state
                .auth
                .token_request(ns, info.name(), uid, &body, &binding)
            {
                Ok(answer) => Ok(json_response(StatusCode::CREATED, &answer)),
                Err(auth::TokenRequestError::TooShort(s)) => Err(StoreError::Invalid {
                    kind: "TokenRequest".to_string(),
                    name: info.name().to_string(),
                    message: format!(
                        "spec.expirationSeconds: Invalid value: {s}: may not specify a duration less than 10 minutes"
                    ),
                }),
                Err(e) => {
                    tracing::error!(error = %Chain(&e), "kube-sim could not sign a token");
                    unreachable_verb()
                }
            }
        }
        (Verb::Update, None) => {
            check_name(&body, info.name())?;
            let updated = store.update(rt, ns, info.name(), body)?;
            Ok(respond::written(StatusCode::OK, &updated, neg))
        }
        (Verb::Update, Some("status")) => {
            // PUT status replaces only .status (and carries the caller's RV
            // for the optimistic-concurrency check).
            check_name(&body, info.name())?;
            let current = store.get(rt, ns, info.name())?;
            let mut next = (*current).clone();
            next["status"] = body.get("status").cloned().unwrap_or(Value::Null);
            if let Some(rv) = body.pointer("/metadata/resourceVersion") {
                next["metadata"]["resourceVersion"] = rv.clone();
            }
            let updated = store.update(rt, ns, info.name(), next)?;
            Ok(respond::written(StatusCode::OK, &updated, neg))
        }
        (Verb::Patch, None | Some("status")) => {
            let kind = match content_type {
                "application/merge-patch+json" => PatchKind::Merge,
                // Custom resources have no patch strategies (no Go struct tags).
                "application/strategic-merge-patch+json" if rt.custom => {
                    return Ok(unsupported_media_type_custom(neg));
                }
                "application/strategic-merge-patch+json" => PatchKind::StrategicMerge,
                "application/json-patch+json" => PatchKind::Json,
                _ => return Ok(unsupported_media_type(neg)),
            };
            let patched = store.patch(rt, ns, info.name(), &body, kind)?;
            Ok(respond::written(StatusCode::OK, &patched, neg))
        }
        (Verb::Create, Some("binding")) => {
            bind(store, rt, ns.unwrap_or(""), info.name(), &body)?;
            // BindingREST answers a bare Status Success.
            Ok(respond::status(
                StatusCode::CREATED,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Success", "code": 201}),
                neg.protobuf_status,
            ))
        }
        _ => Ok(method_not_allowed(neg)),
    }
}

/// PUT bodies must name the object of the URL.
fn check_name(body: &Value, name: &str) -> Result<(), StoreError> {
    match body.pointer("/metadata/name").and_then(Value::as_str) {
        Some(n) if n != name => Err(StoreError::BadRequest(format!(
            "the name of the object ({n}) does not match the name on the URL ({name})"
        ))),
        _ => Ok(()),
    }
}

/// The review types (create-only, never stored).
fn review(state: &State, rt: &ResourceType, user: &UserInfo, body: &Value) -> Response<ResBody> {
    let answer = match rt.plural {
        "tokenreviews" => state.auth.token_review(body),
        "selfsubjectreviews" => auth::self_subject_review(body, &rt.api_version(), user),
        _ => rbac::access_review(&state.authz, body, rt.kind, &rt.api_version(), user),
    };
    json_response(StatusCode::CREATED, &answer)
}

/// A watch: 200 at once, then one frame per event as the store emits it.
fn watch(
    state: &Arc<State>,
    info: &ReqInfo,
    neg: &Negotiated,
    query: Option<&str>,
) -> Response<ResBody> {
    let rt = info.rt;
    let labels = info.labels();
    let mut opts = match ListOptions::from_query(rt, &info.list_query) {
        Ok(opts) => opts,
        Err(e) => {
            let resp = store_error(&e, neg);
            state.metrics.record(labels, resp.status().as_u16());
            return resp;
        }
    };
    opts.watch = true;
    let encoder = EventEncoder::new(rt, neg.objects, query);
    let watch = match state.store.watch(rt, info.ns(), &opts) {
        Ok(w) => w,
        Err(e @ StoreError::Expired { .. }) => {
            // The apiserver answers 200 and one ERROR event carrying the 410
            // Status, then ends the stream (fixtures/watch-rv-too-old.jsonl).
            state.metrics.record(labels, 200);
            let frame = encoder.error(&e);
            return respond::stream_response(Full::new(frame).boxed(), encoder.content_type());
        }
        Err(e) => {
            let resp = store_error(&e, neg);
            state.metrics.record(labels, resp.status().as_u16());
            return resp;
        }
    };
    let timeout = match opts.timeout_seconds {
        Some(s) if s > 0 => Duration::from_secs(s),
        // The apiserver's default: --min-request-timeout × [1, 2).
        _ => state
            .min_request_timeout
            .mul_f64(1.0 + rand::random::<f64>()),
    };
    let content_type = encoder.content_type();
    let (tx, mut rx) = mpsc::channel::<Bytes>(WATCH_FRAME_BUFFER);
    let guard = state.metrics.long_running(labels, 200);
    state.tracker.spawn(pump(
        watch,
        tx,
        encoder,
        timeout,
        state.cancel.clone(),
        guard,
        state.capacity.clone(),
    ));
    let body = StreamBody::new(futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|frame| frame.map(|b| Ok(Frame::data(b))))
    }));
    respond::stream_response(body.boxed(), content_type)
}

/// Moves one watch's events from the store to its response body until the
/// deadline, the store closing the watch, the client leaving, or shutdown.
/// Dropping the `Watch` at the end unregisters it from the store; dropping
/// the guard counts the request.
async fn pump(
    mut watch: super::store::Watch,
    tx: mpsc::Sender<Bytes>,
    mut encoder: EventEncoder,
    timeout: Duration,
    cancel: CancellationToken,
    _guard: super::metrics::LongRunningGuard,
    capacity: Option<Arc<super::capacity::Capacity>>,
) {
    // Incident lab: an open watch holds memory and CPU in the model.
    let _ticket = capacity.as_ref().map(|c| c.watch_opened());
    let deadline = tokio::time::Instant::now() + timeout;
    for event in std::mem::take(&mut watch.initial) {
        let frame = encoder.encode(&event);
        // Incident lab: each event delivered costs dispatch CPU.
        if let Some(c) = &capacity {
            c.serve(c.cost().event(frame.len())).await;
        }
        if !send(&tx, frame, &cancel, deadline).await {
            return;
        }
    }
    // Like the cacher: a bookmark just before the deadline, so the client
    // resumes from the newest RV; none when the watch is shorter than that.
    let mut pre_timeout = timeout
        .checked_sub(PRE_TIMEOUT_BOOKMARK)
        .filter(|d| !d.is_zero())
        .map(|d| tokio::time::Instant::now() + d);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            _ = tx.closed() => return,
            _ = tokio::time::sleep_until(deadline) => return,
            _ = sleep_until_opt(pre_timeout), if pre_timeout.is_some() => {
                pre_timeout = None;
                watch.request_bookmark();
            }
            event = watch.rx.recv() => match event {
                Some(event) => {
                    let frame = encoder.encode(&event);
                    // Incident lab: each event delivered costs dispatch CPU.
                    if let Some(c) = &capacity {
                        c.serve(c.cost().event(frame.len())).await;
                    }
                    if !send(&tx, frame, &cancel, deadline).await {
                        return;
                    }
                }
                None => return,
            },
        }
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Sends one frame, giving up on shutdown, at the deadline, or when the
/// client is gone. False means the stream is over.
async fn send(
    tx: &mpsc::Sender<Bytes>,
    frame: Bytes,
    cancel: &CancellationToken,
    deadline: tokio::time::Instant,
) -> bool {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep_until(deadline) => false,
        r = tx.send(frame) => r.is_ok(),
    }
}

/// Reads and decodes a request body (at most [`MAX_BODY`]): JSON, or the
/// protobuf that client-go's typed clients send for built-in types.
async fn read_body(
    req: Request<Incoming>,
    content_type: &str,
    neg: &Negotiated,
) -> Result<Value, Response<ResBody>> {
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            let too_large = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            return Err(if too_large {
                status_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"the server has received a request that is too large","reason":"RequestEntityTooLarge","code":413}"#,
                    neg.protobuf_status,
                )
            } else {
                store_error(
                    &StoreError::BadRequest(format!(
                        "error reading the request body: {}",
                        Chain(&*e)
                    )),
                    neg,
                )
            });
        }
    };
    if protobuf::is_protobuf(content_type) {
        return protobuf::decode(&bytes).map_err(|e| {
            tracing::debug!(error = %Chain(&e), "kube-sim could not decode a protobuf body");
            unsupported_media_type(neg)
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        store_error(
            &StoreError::BadRequest(format!("couldn't get version/kind; json parse error: {e}")),
            neg,
        )
    })
}

fn non_resource_labels() -> RequestLabels {
    RequestLabels {
        verb: "GET",
        group: "",
        version: "",
        resource: "",
        subresource: "",
        scope: "",
    }
}

fn bytes_response(resp: Response<Bytes>) -> Response<ResBody> {
    resp.map(full)
}

fn text(code: StatusCode, body: &'static str) -> Response<ResBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// `responsewriters.Forbidden`: 403 with the Status of
/// fixtures/error-403-forbidden.body.
fn forbidden(user: &UserInfo, attrs: &Attributes, neg: &Negotiated) -> Response<ResBody> {
    let mut resp = respond::raw_status(
        StatusCode::FORBIDDEN,
        rbac::forbidden(user, attrs, ""),
        neg.protobuf_status,
    );
    resp.headers_mut().insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// `responsewriters.InternalError`: a plain-text 500.
fn internal_error(err: &str) -> Response<ResBody> {
    let mut resp = Response::new(full(format!("Internal Server Error: {err}\n")));
    *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// go-restful's Accept matching, as the apiserver's key set route
    /// applies it: `kubectl get --raw` (`application/json, */*`) and an
    /// exact type pass; `application/json` alone or `application/*` is a
    /// 406.
    #[test]
    fn restful_routes_match_accept_exactly_or_by_star_star() {
        let jwks = "application/jwk-set+json";
        assert!(restful_accepts("", jwks));
        assert!(restful_accepts("*/*", jwks));
        assert!(restful_accepts("application/json, */*", jwks));
        assert!(restful_accepts(
            "text/html;q=0.5, application/jwk-set+json;q=0.9",
            jwks
        ));
        assert!(!restful_accepts("application/json", jwks));
        assert!(!restful_accepts("application/*", jwks));
    }

    fn info(method: Method, path: &str, query: &str) -> Result<ReqInfo, StatusCode> {
        classify(&Store::new(10, 10), &method, path, Some(query)).map_err(|r| match r {
            Reject::NotFound => StatusCode::NOT_FOUND,
            Reject::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        })
    }

    #[test]
    fn classify_reads_namespace_name_and_subresource() {
        let i = info(Method::GET, "/api/v1/namespaces/demo/pods/web-0/status", "").expect("ok");
        assert_eq!(i.verb, Verb::Get);
        assert_eq!(i.rt.plural, "pods");
        assert_eq!(i.namespace.as_deref(), Some("demo"));
        assert_eq!(i.name.as_deref(), Some("web-0"));
        assert_eq!(i.subresource, Some("status"));
        assert_eq!(i.labels().scope, "resource");
    }

    #[test]
    fn the_namespace_itself_is_a_cluster_scoped_object() {
        let i = info(Method::GET, "/api/v1/namespaces/demo", "").expect("ok");
        assert_eq!(i.rt.plural, "namespaces");
        assert_eq!(i.name.as_deref(), Some("demo"));
        assert_eq!(i.namespace, None);
        let i = info(Method::PUT, "/api/v1/namespaces/demo/status", "").expect("ok");
        assert_eq!((i.verb, i.subresource), (Verb::Update, Some("status")));
    }

    #[test]
    fn get_without_name_is_list_or_watch() {
        let list = info(Method::GET, "/apis/apps/v1/deployments", "watch=false").expect("ok");
        assert_eq!(list.verb, Verb::List);
        assert_eq!(list.labels().scope, "cluster");
        let w = info(Method::GET, "/api/v1/namespaces/a/pods", "watch=1").expect("ok");
        assert_eq!(w.verb, Verb::Watch);
        assert_eq!(w.labels().scope, "namespace");
        let w = info(Method::GET, "/api/v1/namespaces/a/pods", "watch").expect("ok");
        assert_eq!(w.verb, Verb::Watch);
    }

    #[test]
    fn legacy_watch_paths_are_watches_pinned_by_name() {
        let w = info(Method::GET, "/api/v1/watch/namespaces/a/pods/p1", "").expect("ok");
        assert_eq!(w.verb, Verb::Watch);
        assert_eq!(w.name, None);
        assert_eq!(w.list_query, "fieldSelector=metadata.name%3Dp1");
    }

    #[test]
    fn unknown_paths_and_methods_are_refused() {
        assert_eq!(
            info(Method::GET, "/api/v1/widgets", "").err(),
            Some(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            info(Method::GET, "/api/v1/pods/x", "").err(),
            Some(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            info(Method::GET, "/api/v1/namespaces/a/nodes", "").err(),
            Some(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            info(Method::PUT, "/api/v1/namespaces/a/pods", "").err(),
            Some(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(
            info(
                Method::GET,
                "/apis/authentication.k8s.io/v1/tokenreviews",
                ""
            )
            .err(),
            Some(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(
            info(Method::DELETE, "/api/v1/namespaces", "").err(),
            Some(StatusCode::METHOD_NOT_ALLOWED)
        );
    }

    #[test]
    fn exec_and_token_are_subresource_verbs() {
        let e = info(
            Method::GET,
            "/api/v1/namespaces/a/pods/p/exec",
            "command=ls",
        )
        .expect("ok");
        assert_eq!(e.verb, Verb::Connect);
        let t = info(
            Method::POST,
            "/api/v1/namespaces/a/serviceaccounts/sa/token",
            "",
        )
        .expect("ok");
        assert_eq!((t.verb, t.subresource), (Verb::Create, Some("token")));
    }

    fn attrs(method: Method, path: &str, query: &str) -> Attributes {
        request_attributes(&method, path, Some(query))
    }

    #[test]
    fn request_attributes_follow_request_info() {
        let a = attrs(Method::GET, "/api/v1/namespaces/demo/pods", "limit=500");
        assert_eq!(
            (
                a.verb.as_str(),
                a.resource.as_str(),
                a.namespace.as_str(),
                a.resource_request
            ),
            ("list", "pods", "demo", true)
        );
        let a = attrs(Method::GET, "/api/v1/namespaces/demo/pods", "watch=1");
        assert_eq!(a.verb, "watch");
        let a = attrs(Method::POST, "/api/v1/namespaces/demo/pods/p/exec", "");
        assert_eq!(
            (a.verb.as_str(), a.subresource.as_str(), a.name.as_str()),
            ("create", "exec", "p")
        );
        let a = attrs(Method::GET, "/api/v1/namespaces/demo", "");
        assert_eq!(
            (
                a.verb.as_str(),
                a.resource.as_str(),
                a.namespace.as_str(),
                a.name.as_str()
            ),
            ("get", "namespaces", "demo", "demo")
        );
        let a = attrs(
            Method::GET,
            "/apis/rbac.authorization.k8s.io/v1/clusterroles",
            "",
        );
        assert_eq!(
            (
                a.api_group.as_str(),
                a.resource.as_str(),
                a.namespace.as_str()
            ),
            ("rbac.authorization.k8s.io", "clusterroles", "")
        );
        let a = attrs(Method::GET, "/api/v1/watch/namespaces/a/configmaps/c", "");
        assert_eq!((a.verb.as_str(), a.name.as_str()), ("watch", "c"));
        let a = attrs(
            Method::GET,
            "/api/v1/namespaces/a/configmaps",
            "fieldSelector=metadata.name%3Dc",
        );
        assert_eq!((a.verb.as_str(), a.name.as_str()), ("list", "c"));
        let a = attrs(Method::DELETE, "/api/v1/namespaces/a/configmaps", "");
        assert_eq!(a.verb, "deletecollection");
        for p in [
            "/api",
            "/api/v1",
            "/apis/apps/v1",
            "/healthz",
            "/openapi/v3",
        ] {
            let a = attrs(Method::GET, p, "");
            assert!(!a.resource_request, "{p}");
            assert_eq!((a.verb.as_str(), a.path.as_str()), ("get", p));
        }
    }
}
