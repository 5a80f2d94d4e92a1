//! The request path: what happens to one client request, in order.
//!
//! ```text
//! handle
//!   classify      what the apiserver would call it (verb, resource, watch?)
//!   authenticate  who is calling: client certificate, ServiceAccount JWT, TokenReview
//!   count         the caller's load in /debug/top's table (until the response ends)
//!   admit         limits and emergency blocks; the permit lives as long as the response
//!   sanitize      drop headers a client must never choose (X-Remote-*, hop-by-hop)
//!   identify      tell the apiserver who is calling, per the upstream auth mode
//!   hub           watches and LISTs served from a shared stream's cache
//!   charge        limits that charge only upstream-bound requests (`charges: upstream`)
//!   forward       send it upstream: pooled h2/h1, or a dedicated h1 connection for upgrades
//!   respond       stream the answer back, frame by frame, logging when it ends
//! ```
//!
//! Every failure becomes a Kubernetes `Status` response here, at the edge;
//! a failure in the middle of a streamed body is passed on as a broken stream
//! (h1: no terminating chunk, h2: RST_STREAM) so that a client can never take
//! a truncated watch or list for a complete one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

mod access;
mod observed;

use crate::admit::{Admission, Admit};
use crate::brake::{Framing, OpenStreams, Registration};
use crate::classify::{self, RequestInfo};
use crate::error::Chain;
use crate::identity::{AuthError, Authenticator, Identity};
use crate::status::{Details, Reason, Status};
use crate::upstream::{
    AuthMode, Body, BoxError, PoolError, ResponseBody, Route, Upstream, UpstreamError,
};
pub use access::AccessLog;
use breakwater_limits::Permit;
use observed::{Observed, Stop};

/// What every request handler shares.
pub struct Shared {
    pub upstream: Upstream,
    pub auth: Authenticator,
    pub admission: Arc<Admission>,
    /// Cancelled at the end of the shutdown grace period: long-running
    /// response streams then end cleanly instead of being cut.
    pub streams: CancellationToken,
    /// Shared watches and LIST rv=0 from their caches.
    pub hub: crate::watch::Hub,
    /// The proxy's tasks (upgrade splices here), awaited at shutdown.
    pub tasks: crate::tasks::TaskTracker,
    /// Who loads the apiserver now (`/debug/top`).
    pub top: Arc<crate::top::Top>,
    /// The long-running requests open, for blocks that end them.
    pub open: Arc<OpenStreams>,
    /// Where connections of privileged identities are served (see
    /// `accept::threads`); `None`: on the serving runtime like the rest.
    pub privileged: Option<tokio::runtime::Handle>,
}

/// Handles one request from a client. Infallible: every outcome is a response.
///
/// `cert` is the identity of the connection's verified client certificate,
/// computed once per connection; `memo` the connection's last bearer token.
pub async fn handle(
    shared: Arc<Shared>,
    mut req: Request<Incoming>,
    peer: Peer,
    cert: Option<Arc<Identity>>,
    memo: Arc<crate::identity::TokenMemo>,
) -> Response<Body> {
    // Classify first: the access log, the timeouts and the limits all key on
    // the apiserver's own view of the request.
    let info = Arc::new(classify::classify(
        req.method(),
        req.uri().path(),
        req.uri().query(),
    ));
    let long_running = info.is_long_running();
    let upgrade = is_upgrade(req.headers());
    let mut log = AccessLog::new(&req, &info, peer.addr);

    // Authenticate before anything is forwarded: limits and watch sharing
    // key on this identity, and a bad credential must never fall through.
    // Long-running requests skip the connection's token memo: it would
    // keep a copy of the token for as long as a watch's connection lives.
    let memo = (!long_running).then_some(&*memo);
    let identity = match shared
        .auth
        .authenticate_on(memo, cert.as_ref(), req.headers(), log.start)
        .await
    {
        Ok(identity) => identity,
        Err(err) => {
            // Refusals over the TokenReview caps come in floods: they are
            // counted (breakwater_token_reviews_refused_total), not logged
            // one by one at info.
            if err.status_code() == 429 {
                tracing::debug!(reason = %Chain(&err), path = log.path(), "authentication throttled");
            } else {
                tracing::info!(reason = %Chain(&err), path = log.path(), "authentication failed");
            }
            return log.finish_with(auth_status(&err));
        }
    };
    log.identity = Some(identity.clone());
    // Count: the identity's load shows in /debug/top from now until the
    // response ends, refused or not (the access log ends the ticket).
    log.top = Some(shared.top.arrive(&identity, info.is_watch()));
    // Nothing verified a request without credentials: it asserts no
    // identity upstream, and the apiserver applies its own anonymous policy.
    let anonymous = shared.auth.is_unverified(&identity);

    // Admit before anything can go upstream: a rejected request costs the
    // apiserver nothing. The permit releases its slots when the response
    // ends. Rules that charge only upstream-bound requests leave the rest
    // of their charge to `charge`, below (or to the hub's gate).
    let mut permit = match shared.admission.admit(&identity, &info).await {
        Admit::Go(permit) => {
            log.rule(permit.rule_arc().as_ref());
            permit
        }
        Admit::Refuse { response, rule } => {
            log.rule(Some(&rule));
            return log.finish_with(response);
        }
    };
    // Long-running requests are registered until their response ends, so
    // that a block with `terminate: true` can end them.
    let registration = long_running.then(|| {
        shared.open.register(
            identity.clone(),
            info.clone(),
            &permit,
            &shared.streams,
            |f| shared.admission.limiter().with_blocks(f),
        )
    });

    // Sanitize before anything else reads the headers, then say who the
    // caller is in the way the apiserver is configured to trust.
    sanitize_request(req.headers_mut(), upgrade);
    append_forwarded_for(req.headers_mut(), &peer);
    if let Err(resp) = identify_upstream(
        &shared.upstream,
        &identity,
        Via::of(cert.is_some(), anonymous),
        req.headers_mut(),
    ) {
        return log.finish_with(
            resp.into_response::<bytes::Bytes>()
                .map(crate::upstream::full),
        );
    }

    // Watches and cached LISTs: served from one shared upstream stream when
    // the hub can answer exactly as the apiserver would; else forwarded.
    // Anonymous requests are always forwarded: what they may see is the
    // apiserver's decision, made per request. The hub asks its gate before
    // it sends anything upstream for this request (it starts a stream, or
    // LISTs through its coalescer): the gate charges what admission
    // deferred, and a refusal is the answer.
    if !anonymous && shared.hub.may_serve(&info) {
        let mut charge = Charge {
            admission: &shared.admission,
            permit: &mut permit,
            identity: &identity,
            info: &info,
            refused: false,
        };
        // Boxed: the hub's future is large, and every request's handler
        // would otherwise carry (and move) room for it.
        let served = Box::pin(shared.hub.serve(
            &info,
            req.uri(),
            req.headers(),
            &identity,
            &mut || charge.run(),
        ))
        .await;
        let refused = charge.refused;
        if let Some(resp) = served {
            if refused {
                return log.finish_with(resp);
            }
            shared.admission.served_uncharged(&permit, &info);
            return respond_local(&shared, resp, log, registration, info.is_watch(), permit);
        }
    }

    // Charge: the request goes upstream, so limits that charge only such
    // requests take their part now (a no-op if nothing is pending).
    // Outside the hub a request may wait one Redis round trip for an
    // empty local quota of a global limit to be filled.
    if let Err(resp) = shared
        .admission
        .charge_upstream_or_fill(&mut permit, &identity, &info)
        .await
    {
        return log.finish_with(*resp);
    }

    // Upgrades: take the client side of the connection before the request
    // is consumed; it resolves once we answer 101.
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let verb_class = crate::slo::VerbClass::of_verb(info.verb.as_str(), info.is_resource_request);
    let class = crate::slo::Class::new(
        verb_class,
        crate::slo::ResourceClass::of(info.is_resource_request, &info.name, &info.namespace),
    );
    let route = Route::client(class, long_running, upgrade, permit.is_exempt(), anonymous);
    let sent = Instant::now();
    let resp = match forward(&shared.upstream, req, route, sent).await {
        Ok(resp) => {
            // What the proxy added: everything before the request left
            // (authentication, admission, the hub's look); from then to
            // its headers is the apiserver's part, its own histogram.
            if !upgrade {
                let added = sent.saturating_duration_since(log.start);
                shared.upstream.latency().observe_added(verb_class, added);
            }
            resp
        }
        Err(err) => {
            let status = upstream_status(&err);
            tracing::warn!(error = %Chain(&err), path = log.path(), "upstream request failed");
            return log.finish_with(
                status
                    .into_response::<bytes::Bytes>()
                    .map(crate::upstream::full),
            );
        }
    };
    let stream = Stream {
        registration,
        is_watch: info.is_watch(),
        client_upgrade,
    };
    respond(&shared, resp, log, stream, permit)
}

/// What `respond` needs of a long-running request.
struct Stream {
    registration: Option<Registration>,
    is_watch: bool,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
}

fn stop(registration: Option<Registration>, is_watch: bool, headers: &HeaderMap) -> Option<Stop> {
    registration.map(|registration| Stop {
        registration,
        framing: Framing::of(is_watch, headers.get(header::CONTENT_TYPE)),
    })
}

/// The second admission step, offered to the hub as its gate.
struct Charge<'a> {
    admission: &'a Admission,
    permit: &'a mut Permit,
    identity: &'a Identity,
    info: &'a RequestInfo,
    /// The gate refused: the hub's answer is that refusal.
    refused: bool,
}

impl Charge<'_> {
    fn run(&mut self) -> Result<(), Box<Response<Body>>> {
        let res = self
            .admission
            .charge_upstream(self.permit, self.identity, self.info);
        self.refused |= res.is_err();
        res
    }
}

/// Sends the sanitized request upstream, in its lane.
///
/// Not an `async fn`: it would keep the request once more beside the send's
/// own state, in every request's handler future.
fn forward<'a>(
    upstream: &'a Upstream,
    req: Request<Incoming>,
    route: Route,
    sent: Instant,
) -> impl Future<Output = Result<Response<ResponseBody>, UpstreamError>> + 'a {
    let (mut parts, body) = req.into_parts();
    parts.uri = upstream.uri_for(parts.uri.path_and_query());
    let req = Request::from_parts(parts, body.map_err(BoxError::from).boxed());
    upstream.send_from(req, route, sent)
}

/// Streams the upstream response back to the client.
fn respond(
    shared: &Shared,
    resp: Response<ResponseBody>,
    log: AccessLog,
    stream: Stream,
    permit: Permit,
) -> Response<Body> {
    let mut resp = resp;
    shared.admission.decorate(&permit, resp.headers_mut());
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = stream.client_upgrade
    {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        // Upgrades are long-running: registered. Without a registration
        // (never expected) the splice still ends at shutdown.
        let end = stream
            .registration
            .as_ref()
            .map_or_else(|| shared.streams.clone(), |r| r.token().clone());
        shared.tasks.spawn(splice(
            client_upgrade,
            upstream_upgrade,
            log,
            end,
            (stream.registration, permit),
        ));
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, crate::upstream::empty());
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    unindexed_audit_id(&mut parts.headers);
    let status = parts.status;
    let stop = stop(stream.registration, stream.is_watch, &parts.headers);
    let body = Observed::new(body, log.with_status(status), stop, permit);
    Response::from_parts(parts, body.boxed())
}

/// Sends a response the proxy produced itself (the watch hub's), with the
/// same access log, shutdown handling and permit lifetime as a forwarded one.
fn respond_local(
    shared: &Shared,
    resp: Response<Body>,
    log: AccessLog,
    registration: Option<Registration>,
    is_watch: bool,
    permit: Permit,
) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    shared.admission.decorate(&permit, &mut parts.headers);
    let stop = stop(registration, is_watch, &parts.headers);
    let body = Observed::new(body, log.with_status(parts.status), stop, permit);
    Response::from_parts(parts, body.boxed())
}

/// Copies bytes both ways between an upgraded client connection and the
/// upgraded upstream connection until either side closes.
async fn splice(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    log: AccessLog,
    end: CancellationToken,
    _held: (Option<Registration>, Permit),
) {
    let log = log.with_status(StatusCode::SWITCHING_PROTOCOLS);
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(err) => {
            tracing::warn!(error = %Chain(&err), path = log.path(), "upgrade failed");
            return;
        }
    };
    let mut client = hyper_util::rt::TokioIo::new(client);
    let mut upstream = hyper_util::rt::TokioIo::new(upstream);
    tokio::select! {
        res = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(err) = res {
                tracing::debug!(error = %Chain(&err), path = log.path(), "upgraded stream ended with an error");
            }
        }
        _ = end.cancelled() => {
            // Close both sides (a WebSocket client sees its connection end).
            use tokio::io::AsyncWriteExt;
            let _ = client.shutdown().await;
            let _ = upstream.shutdown().await;
        }
    }
    drop(log);
}

/// A `Status` response for a failed authentication, as the apiserver words it.
fn auth_status(err: &AuthError) -> Response<Body> {
    let status = match err.status_code() {
        503 => Status::service_unavailable(err.client_message()),
        429 => Status::failure(
            StatusCode::TOO_MANY_REQUESTS,
            Reason::TooManyRequests,
            err.client_message(),
        )
        .with_details(Details {
            retry_after_seconds: err.retry_after_secs(),
            ..Details::default()
        }),
        _ => Status::failure(
            StatusCode::UNAUTHORIZED,
            Reason::Unauthorized,
            err.client_message(),
        ),
    };
    status
        .into_response::<bytes::Bytes>()
        .map(crate::upstream::full)
}

/// Header names that carry impersonation (`Impersonate-User`, `-Group`,
/// `-Uid`, `-Extra-*`).
fn is_impersonation_header(name: &HeaderName) -> bool {
    name.as_str().starts_with("impersonate-")
}

/// How the caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Certificate,
    Token,
    /// No credentials at all.
    Nothing,
}

impl Via {
    fn of(certificate: bool, anonymous: bool) -> Via {
        match (certificate, anonymous) {
            (true, _) => Via::Certificate,
            (false, true) => Via::Nothing,
            (false, false) => Via::Token,
        }
    }
}

/// Sets the headers that tell the apiserver who the caller is, per mode.
///
/// A caller without credentials gets no identity headers in any mode (and
/// travels over connections that present no certificate): asserting
/// `system:anonymous` would bypass the apiserver's own `--anonymous-auth`.
///
/// - passthrough: the client's `Authorization` goes through as is. A caller
///   known only by its client certificate cannot be passed on (the proxy
///   cannot present the client's certificate), so it is refused.
/// - front-proxy: `X-Remote-User/Group/Extra-*` over the proxy's front-proxy
///   certificate; the client's `Authorization` is dropped.
/// - impersonate: the proxy's own credentials plus `Impersonate-*`; a client
///   that impersonates itself is refused, since the two cannot combine.
/// - auto: a token caller as passthrough (the apiserver caches token
///   authentication, and verifies no certificate of ours), a certificate
///   caller as front-proxy. The upstream client routes each by the
///   headers set here (`X-Remote-User` or not).
fn identify_upstream(
    upstream: &Upstream,
    identity: &Identity,
    via: Via,
    headers: &mut HeaderMap,
) -> Result<(), Status> {
    let refuse = |code: StatusCode, reason: Reason, msg: &str| Status::failure(code, reason, msg);
    if upstream.mode() == AuthMode::Impersonate && headers.keys().any(is_impersonation_header) {
        // A client that impersonates cannot combine with the proxy's own
        // impersonation (anonymous callers included: refused the same way).
        return Err(refuse(
            StatusCode::FORBIDDEN,
            Reason::Forbidden,
            "Impersonate-* headers cannot be used through this proxy: it already \
             impersonates the caller (--upstream-auth impersonate)",
        ));
    }
    if via == Via::Nothing {
        headers.remove(header::AUTHORIZATION);
        return Ok(());
    }
    match upstream.mode() {
        AuthMode::Auto if via == Via::Token => {}
        AuthMode::Auto => front_proxy_headers(identity, headers),
        AuthMode::Passthrough => {
            if via == Via::Certificate {
                return Err(refuse(
                    StatusCode::UNAUTHORIZED,
                    Reason::Unauthorized,
                    "client certificate users cannot be passed through to the apiserver: \
                     use a bearer token, or run the proxy with --upstream-auth front-proxy or impersonate",
                ));
            }
        }
        AuthMode::FrontProxy => front_proxy_headers(identity, headers),
        AuthMode::Impersonate => {
            headers.remove(header::AUTHORIZATION);
            if let Some(token) = upstream.own_token() {
                headers.insert(header::AUTHORIZATION, token);
            }
            insert(headers, "impersonate-user", &identity.username);
            for group in &identity.groups {
                // The apiserver adds these itself; naming them would need
                // extra impersonation rights for nothing.
                if group != "system:authenticated" && group != "system:unauthenticated" {
                    append(headers, "impersonate-group", group);
                }
            }
            if !identity.uid.is_empty() {
                insert(headers, "impersonate-uid", &identity.uid);
            }
            for (key, values) in &identity.extra {
                let name = format!("impersonate-extra-{}", escape_extra_key(key));
                for v in values {
                    append(headers, &name, v);
                }
            }
        }
    }
    Ok(())
}

/// `X-Remote-User/Group/Extra-*` in place of the client's `Authorization`.
fn front_proxy_headers(identity: &Identity, headers: &mut HeaderMap) {
    headers.remove(header::AUTHORIZATION);
    insert(headers, "x-remote-user", &identity.username);
    for group in &identity.groups {
        append(headers, "x-remote-group", group);
    }
    for (key, values) in &identity.extra {
        let name = format!("x-remote-extra-{}", escape_extra_key(key));
        for v in values {
            append(headers, &name, v);
        }
    }
}

fn insert(headers: &mut HeaderMap, name: &str, value: &str) {
    if let (Ok(n), Ok(v)) = (
        HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_str(value),
    ) {
        headers.insert(n, v);
    }
}

fn append(headers: &mut HeaderMap, name: &str, value: &str) {
    if let (Ok(n), Ok(v)) = (
        HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_str(value),
    ) {
        headers.append(n, v);
    }
}

/// Extra keys travel percent-encoded in header names (the apiserver
/// unescapes them): `authentication.kubernetes.io/pod-name` becomes
/// `authentication.kubernetes.io%2fpod-name`.
fn escape_extra_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b.to_ascii_lowercase() as char);
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}

/// The Status for a request that never got an upstream response.
fn upstream_status(err: &UpstreamError) -> Status {
    match err {
        UpstreamError::Timeout(d) => Status::gateway_timeout(format!(
            "the apiserver did not answer within {}s",
            d.as_secs()
        )),
        UpstreamError::Pool(PoolError::Saturated {
            lane, connections, ..
        }) => Status::failure(
            StatusCode::TOO_MANY_REQUESTS,
            Reason::TooManyRequests,
            format!(
                "too many requests: all {connections} of Breakwater's upstream connections for {} requests are full; retry later",
                lane.as_str()
            ),
        )
        .with_details(Details {
            retry_after_seconds: Some(1),
            ..Details::default()
        }),
        UpstreamError::Pool(PoolError::Connect(_) | PoolError::Send(_)) => {
            Status::service_unavailable("the apiserver is unreachable from the proxy")
        }
        UpstreamError::Pool(PoolError::Closed(_)) => {
            Status::service_unavailable("the proxy is shutting down")
        }
    }
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Header names that describe one hop, not the request (RFC 9110 §7.6.1).
///
/// Names, not strings: removing by `&str` parses the name on every call,
/// twice per request (request and response) for each of the eight.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers (and those the Connection header names). An
/// upgrade keeps `Connection: Upgrade` and `Upgrade`, which it needs.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most requests and responses carry none of them (HTTP/2 forbids them):
    // one look at each name present is cheaper than hashing and removing
    // nine names that are absent.
    let any = headers
        .keys()
        .any(|name| name == header::UPGRADE || HOP_BY_HOP.contains(name));
    if !any {
        if upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        }
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        if upgrade && name == header::CONNECTION {
            continue;
        }
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Marks the apiserver's `Audit-Id` (a new UUID in every response) so that
/// HTTP/2 sends it as a literal the client never indexes. Indexed, each
/// response would add a value no later response repeats to both ends' HPACK
/// tables, evicting entries that do repeat, and h2's encoder would first
/// compare it with every `audit-id` value already in its table. HTTP/1.1
/// ignores the mark.
fn unindexed_audit_id(headers: &mut HeaderMap) {
    static AUDIT_ID: HeaderName = HeaderName::from_static("audit-id");
    if let Some(value) = headers.get_mut(&AUDIT_ID) {
        value.set_sensitive(true);
    }
}

/// Request headers a client must never choose.
///
/// `X-Remote-*` carry identity on front-proxy connections; the apiserver
/// trusts them from the proxy's certificate, so a client must not be able to
/// smuggle them through. `Host` names the proxy, not the apiserver; the
/// upstream client sets its own.
fn sanitize_request(headers: &mut HeaderMap, upgrade: bool) {
    strip_hop_by_hop(headers, upgrade);
    let remote: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-remote-"))
        .cloned()
        .collect();
    for name in remote {
        headers.remove(name);
    }
    headers.remove(header::HOST);
}

/// The client's address, and its `X-Forwarded-For` entry, formatted once
/// per connection (per request it cost a `fmt::write` and an allocation).
#[derive(Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    forwarded: Option<HeaderValue>,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            forwarded: HeaderValue::try_from(addr.ip().to_string()).ok(),
        }
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, peer: &Peer) {
    static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    let Some(ip) = peer.forwarded.as_ref() else {
        return;
    };
    let value = match headers.get(&X_FORWARDED_FOR).map(HeaderValue::as_bytes) {
        Some(prev) => HeaderValue::from_bytes(&[prev, b", ", ip.as_bytes()].concat()),
        None => Ok(ip.clone()),
    };
    if let Ok(value) = value {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_sent_remote_headers_and_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("x-remote-user", HeaderValue::from_static("system:admin"));
        h.append("X-Remote-Group", HeaderValue::from_static("system:masters"));
        h.insert("x-remote-extra-scopes", HeaderValue::from_static("x"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-custom"),
        );
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        h.insert(header::HOST, HeaderValue::from_static("proxy:6443"));
        sanitize_request(&mut h, false);
        assert!(h.get("x-remote-user").is_none());
        assert!(h.get("x-remote-group").is_none());
        assert!(h.get("x-remote-extra-scopes").is_none());
        assert!(h.get("x-custom").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get(header::HOST).is_none());
        assert_eq!(h[header::AUTHORIZATION], "Bearer t");
    }

    #[test]
    fn upgrade_requests_keep_connection_upgrade() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        sanitize_request(&mut h, true);
        assert_eq!(h[header::CONNECTION], "Upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
    }

    #[test]
    fn forwarded_for_appends_the_peer() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        append_forwarded_for(&mut h, &Peer::new("127.0.0.1:5000".parse().expect("addr")));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        // Without one, the connection's own value, the same on every request.
        let peer = Peer::new("[::1]:5000".parse().expect("addr"));
        for _ in 0..2 {
            let mut h = HeaderMap::new();
            append_forwarded_for(&mut h, &peer);
            assert_eq!(h["x-forwarded-for"], "::1");
        }
    }
}
