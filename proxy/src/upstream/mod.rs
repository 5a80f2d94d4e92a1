//! The client to the kube-apiserver.
//!
//! Requests travel in lanes ([`Lane`]), each a pool of connections with
//! stream accounting ([`pool`]): unary requests, long-running requests
//! (watches, `logs -f`, proxy), requests of exempt identities, and the
//! proxy's own (TokenReview, SubjectAccessReview, probes). A lane opens
//! another connection when the apiserver's per-connection stream limit (250)
//! is reached, up to its cap, and past the cap answers promptly instead of
//! queueing: 250 watches can never starve a GET, and the rollback always has
//! a path (see docs/architecture.md, "Upstream lanes").
//!
//! What the forwarding connections present depends on the upstream auth mode:
//! nothing in `passthrough` (a client request must never borrow the proxy's
//! identity), the proxy's certificate in `front-proxy` and `impersonate`.
//! In `auto` both kinds exist: a request that carries `X-Remote-User` (a
//! client-certificate caller) goes over the front-proxy connections, a
//! token caller's over connections that present nothing, so the apiserver
//! authenticates the token (and caches that) without also verifying a
//! certificate on every request. A request that came without credentials
//! asserts no identity at all: it goes over connections that present no
//! certificate, so the apiserver applies its own anonymous policy. The `own` lane always presents the
//! proxy's credentials. Protocol upgrades (exec, attach, port-forward) get an
//! HTTP/1.1 connection of their own.
//!
//! Long-running requests get no timeout of any kind here: the stream ends
//! only when the client or the apiserver ends it. Other requests get a
//! response-header timeout (504 when it passes); their bodies still stream
//! without one. HTTP/2 keepalive pings keep quiet upstream connections (a
//! watch with no events) alive through middleboxes.

mod lanes;
pub mod pool;
mod redrive;
mod review;

use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::HttpConnector;
use tower::ServiceExt;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use http::HeaderValue;

use crate::error::Chain;
use crate::tasks::TaskTracker;
use crate::tls::{self, ClientCert, TlsError, UpstreamTls};
use lanes::{HUB_LANE, OWN_LANE};
pub use lanes::{Lane, LaneLimits, LaneStats, Lanes, UnaryProtocol};
use pool::Pool;
pub use pool::{H2Settings, PoolError, ResponseBody};

/// Errors boxed for bodies that mix our own and hyper's.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every request and response inside the proxy.
pub type Body = BoxBody<Bytes, BoxError>;

/// A body from bytes (Status errors, probes).
pub fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made, or it broke before a response arrived,
    /// or every connection of the lane is full (see [`PoolError`]).
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// No response headers within the timeout.
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
}

/// Where a request goes and how long it may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub lane: Lane,
    /// What it is, for the latency histograms.
    pub class: crate::slo::Class,
    /// No response-header timeout (watch, follow, exec, proxy).
    pub long_running: bool,
    /// A protocol upgrade: an HTTP/1.1 connection of its own.
    pub upgrade: bool,
    /// The caller presented no credentials: assert no identity upstream,
    /// over connections that present no certificate.
    pub anonymous: bool,
}

impl Route {
    /// A client request.
    pub fn client(
        class: crate::slo::Class,
        long_running: bool,
        upgrade: bool,
        exempt: bool,
        anonymous: bool,
    ) -> Route {
        Route {
            lane: Lane::of(long_running || upgrade, exempt),
            class,
            long_running: long_running || upgrade,
            upgrade,
            anonymous,
        }
    }

    /// A request of the watch hub on behalf of its subscribers: a LIST, or
    /// a WATCH when `long_running`, of the collection at `path`.
    pub fn hub(long_running: bool, path: &str) -> Route {
        let class = crate::slo::Class::hub(long_running, path);
        Route {
            lane: Lane::Hub,
            ..Route::client(class, long_running, false, false, false)
        }
    }
}

/// Timeouts for upstream requests.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Response-header timeout for requests that are not long-running.
    pub response: Duration,
    /// HTTP/2 keepalive ping interval (and twice this as the ping timeout).
    pub keepalive: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            response: Duration::from_secs(60),
            keepalive: Duration::from_secs(30),
        }
    }
}

/// How the apiserver learns who the client is (`--upstream-auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    /// Forward the client's own `Authorization` header.
    #[default]
    Passthrough,
    /// The proxy's front-proxy certificate plus `X-Remote-*` headers.
    FrontProxy,
    /// The proxy's own credentials plus `Impersonate-*` headers.
    Impersonate,
    /// Bearer-token callers as `passthrough` (the apiserver caches token
    /// authentication), client-certificate callers as `front-proxy` (the
    /// proxy cannot present their certificate). Needs the front-proxy
    /// certificate, like `front-proxy`.
    Auto,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Passthrough => "passthrough",
            AuthMode::FrontProxy => "front-proxy",
            AuthMode::Impersonate => "impersonate",
            AuthMode::Auto => "auto",
        }
    }

    /// Whether the proxy sends `X-Remote-*` over its front-proxy
    /// certificate (for every caller, or for certificate callers in `auto`).
    pub fn uses_front_proxy(self) -> bool {
        matches!(self, AuthMode::FrontProxy | AuthMode::Auto)
    }
}

/// The header a front-proxy request names its user with. Client-sent
/// `X-Remote-*` headers are always removed before the proxy sets its own,
/// so in `auto` its presence says the proxy vouches for this caller.
const REMOTE_USER: &str = "x-remote-user";

/// Everything the proxy needs to reach the apiserver.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `https://host[:port]`.
    pub url: String,
    pub tls: UpstreamTls,
    /// A bearer token file for the proxy's own credentials (re-read on change).
    pub token_file: Option<PathBuf>,
    pub mode: AuthMode,
    /// In front-proxy mode, the user the proxy's own requests carry.
    pub proxy_user: String,
    pub timeouts: Timeouts,
    /// Connection caps per lane.
    pub lanes: Lanes,
}

impl UpstreamConfig {
    /// Passthrough to `url` trusting `ca`, default timeouts.
    pub fn passthrough(url: impl Into<String>, ca: Option<PathBuf>) -> UpstreamConfig {
        UpstreamConfig {
            url: url.into(),
            tls: UpstreamTls {
                ca,
                client_cert: None,
            },
            token_file: None,
            mode: AuthMode::Passthrough,
            proxy_user: DEFAULT_PROXY_USER.to_string(),
            timeouts: Timeouts::default(),
            lanes: Lanes::default(),
        }
    }
}

/// The identity the proxy's own front-proxy requests carry by default.
pub const DEFAULT_PROXY_USER: &str = "system:serviceaccount:kube-system:breakwater";

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The forwarding lanes, and the connector for upgrades, for one kind of
/// connection (presenting the mode's certificate, or nothing).
#[derive(Clone)]
struct Forward {
    unary: Pool,
    long_running: Pool,
    exempt: Pool,
    hub: Pool,
    /// HTTP/1.1 only: an upgrade takes its connection for good.
    upgrades: Connector,
}

impl Forward {
    fn pool(&self, lane: Lane) -> &Pool {
        match lane {
            Lane::Unary | Lane::Own => &self.unary,
            Lane::LongRunning => &self.long_running,
            Lane::Exempt => &self.exempt,
            Lane::Hub => &self.hub,
        }
    }
}

/// The apiserver, as the proxy sees it.
#[derive(Clone)]
pub struct Upstream {
    /// The proxy's tasks: connection drivers, connects, upgrade connections.
    tasks: TaskTracker,
    scheme: Scheme,
    authority: Authority,
    forward: Forward,
    /// Connections that present no certificate, when `forward` presents
    /// one (front-proxy, impersonate, auto): for callers without
    /// credentials, and in `auto` for token callers; else `forward` serves
    /// them.
    plain: Option<Forward>,
    own: Pool,
    client_cert: Option<Arc<ClientCert>>,
    token: Option<Arc<TokenFile>>,
    mode: AuthMode,
    proxy_user: HeaderValue,
    timeouts: Timeouts,
    /// Answer times by verb and resource class (the SLO histograms and
    /// `/debug/top`'s quantiles): every forwarded and hub request is timed
    /// here, in one place.
    latency: Arc<crate::slo::Latency>,
    /// The SelfSubjectReview version the apiserver serves, as last seen
    /// (for tokens reviewed without credentials of the proxy's own).
    self_subject_reviews: Arc<review::SelfSubjectReviews>,
}

/// A bad upstream URL or TLS setup.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamConfigError {
    #[error("upstream URL {0:?} must be https://host[:port]")]
    BadUrl(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("reading the upstream token file {path}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--proxy-user {0:?} is not a valid header value")]
    ProxyUser(String),
    #[error(
        "--upstream-auth {0} needs the proxy's client certificate (--upstream-client-cert/--upstream-client-key)"
    )]
    NeedsClientCert(&'static str),
    #[error(
        "--upstream-auth impersonate needs the proxy's own credentials (--upstream-token-file or --upstream-client-cert)"
    )]
    NeedsCredentials,
}

/// A bearer token file, re-read on change (projected ServiceAccount tokens
/// rotate). Never logged.
pub struct TokenFile {
    path: PathBuf,
    header: ArcSwapOption<HeaderValue>,
}

impl TokenFile {
    fn new(path: &Path) -> Result<TokenFile, UpstreamConfigError> {
        let t = TokenFile {
            path: path.to_owned(),
            header: ArcSwapOption::empty(),
        };
        t.reload()?;
        Ok(t)
    }

    /// Re-reads the file; on error the current token stays.
    pub fn reload(&self) -> Result<(), UpstreamConfigError> {
        let err = |source| UpstreamConfigError::Token {
            path: self.path.clone(),
            source,
        };
        let text = std::fs::read_to_string(&self.path).map_err(err)?;
        let mut value =
            HeaderValue::from_str(&format!("Bearer {}", text.trim())).map_err(|_| {
                err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the token is not a valid header value",
                ))
            })?;
        value.set_sensitive(true);
        self.header.store(Some(Arc::new(value)));
        Ok(())
    }

    fn header(&self) -> Option<HeaderValue> {
        self.header.load_full().map(|h| (*h).clone())
    }
}

impl Upstream {
    /// The client for `cfg`; its connections' tasks are spawned on `tasks`
    /// (the proxy's tracker, awaited at shutdown after [`Upstream::close`]).
    pub fn new(
        cfg: &UpstreamConfig,
        tasks: TaskTracker,
        exempt_home: Option<tokio::runtime::Handle>,
    ) -> Result<Upstream, UpstreamConfigError> {
        let url = &cfg.url;
        let uri: Uri = url
            .parse()
            .map_err(|_| UpstreamConfigError::BadUrl(url.to_string()))?;
        let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned())
        else {
            return Err(UpstreamConfigError::BadUrl(url.to_string()));
        };
        if scheme != Scheme::HTTPS || uri.path().len() > 1 {
            return Err(UpstreamConfigError::BadUrl(url.to_string()));
        }
        let client_cert = match &cfg.tls.client_cert {
            Some((cert, key)) => Some(Arc::new(ClientCert::new(cert, key)?)),
            None => None,
        };
        let token = match &cfg.token_file {
            Some(path) => Some(Arc::new(TokenFile::new(path)?)),
            None => None,
        };
        match cfg.mode {
            AuthMode::FrontProxy | AuthMode::Auto if client_cert.is_none() => {
                return Err(UpstreamConfigError::NeedsClientCert(cfg.mode.as_str()));
            }
            AuthMode::Impersonate if client_cert.is_none() && token.is_none() => {
                return Err(UpstreamConfigError::NeedsCredentials);
            }
            _ => {}
        }
        let proxy_user = HeaderValue::from_str(&cfg.proxy_user)
            .map_err(|_| UpstreamConfigError::ProxyUser(cfg.proxy_user.clone()))?;
        // In passthrough the forwarding connections present nothing: a client
        // request without its own credentials must reach the apiserver as
        // anonymous, never as the proxy.
        let forward_cert = match cfg.mode {
            AuthMode::Passthrough => None,
            AuthMode::FrontProxy | AuthMode::Impersonate | AuthMode::Auto => client_cert.clone(),
        };
        let ca = cfg.tls.ca.as_deref();
        let h2 = H2Settings {
            keepalive: cfg.timeouts.keepalive,
        };
        let target: Uri = format!("{scheme}://{authority}")
            .parse()
            .map_err(|_| UpstreamConfigError::BadUrl(url.to_string()))?;
        // Every lane's connections live on the runtime the upstream was made
        // on (the serving one), whichever runtime's request opened them,
        // except the exempt lane's, on `exempt_home` when given.
        let serving = tokio::runtime::Handle::try_current().ok();
        let exempt_home = exempt_home.or_else(|| serving.clone());
        let forward = |cert: Option<Arc<ClientCert>>| -> Result<Forward, TlsError> {
            let h2_first = tls::upstream_connector(ca, cert.clone(), true)?;
            // HTTP/1.1 only: upgrades, and unary requests by default (one
            // request per connection at a time, as nginx and haproxy pool
            // them; docs/benchmarks.md §1c: a third less proxy CPU per
            // request than multiplexing them over h2, and Go's HTTP/1.1
            // server costs the apiserver less per request than its h2 one).
            let h1_only = tls::upstream_connector(ca, cert, false)?;
            let pool =
                |lane, connector: &Connector, limits, home: &Option<tokio::runtime::Handle>| {
                    Pool::new(
                        lane,
                        connector.clone(),
                        target.clone(),
                        limits,
                        h2,
                        tasks.clone(),
                    )
                    .with_home(home.clone())
                };
            let unary_connector = match cfg.lanes.unary_protocol {
                UnaryProtocol::Http1 => &h1_only,
                UnaryProtocol::Http2 => &h2_first,
            };
            Ok(Forward {
                // A unary request's connection on its serving shard.
                unary: pool(Lane::Unary, unary_connector, cfg.lanes.unary, &serving)
                    .shard_local(true),
                long_running: pool(
                    Lane::LongRunning,
                    &h2_first,
                    cfg.lanes.long_running,
                    &serving,
                ),
                exempt: pool(Lane::Exempt, &h2_first, cfg.lanes.exempt, &exempt_home),
                hub: pool(Lane::Hub, &h2_first, HUB_LANE, &serving),
                upgrades: h1_only,
            })
        };
        let plain = match forward_cert {
            Some(_) => Some(forward(None)?),
            None => None,
        };
        let own = Pool::new(
            Lane::Own,
            tls::upstream_connector(ca, client_cert.clone(), true)?,
            target.clone(),
            OWN_LANE,
            h2,
            tasks.clone(),
        )
        .with_home(serving.clone());
        let forward = forward(forward_cert)?;
        Ok(Upstream {
            tasks,
            scheme,
            authority,
            forward,
            plain,
            own,
            client_cert,
            token,
            mode: cfg.mode,
            proxy_user,
            timeouts: cfg.timeouts,
            latency: Arc::default(),
            self_subject_reviews: Arc::default(),
        })
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// The proxy's own bearer token, if it has one (impersonate mode sends it
    /// in place of the client's).
    pub fn own_token(&self) -> Option<HeaderValue> {
        self.token.as_ref().and_then(|t| t.header())
    }

    /// Whether the proxy has credentials of its own (certificate or token).
    pub fn has_own_credentials(&self) -> bool {
        self.client_cert.is_some() || self.token.is_some()
    }

    /// Re-reads the proxy's client certificate and token file. Each part
    /// that fails keeps its current value; the first error is returned.
    pub fn reload(&self) -> Result<(), UpstreamConfigError> {
        let cert = match &self.client_cert {
            Some(c) => c.reload().map_err(UpstreamConfigError::from),
            None => Ok(()),
        };
        let token = match &self.token {
            Some(t) => t.reload(),
            None => Ok(()),
        };
        cert.and(token)
    }

    /// The credential files to watch for rotation.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        if let Some(c) = &self.client_cert {
            files.extend(c.files());
        }
        if let Some(t) = &self.token {
            files.push(t.path.clone());
        }
        files
    }

    /// The absolute upstream URI for a client's path and query.
    pub fn uri_for(&self, path_and_query: Option<&PathAndQuery>) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(
            path_and_query
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        Uri::from_parts(parts).expect("scheme, authority and path make a valid URI")
    }

    /// Sends a client request whose URI is already absolute (see
    /// [`Upstream::uri_for`]) and whose headers already carry the identity
    /// (none for an anonymous route).
    ///
    /// Long-running requests wait for their response headers without a
    /// timeout; upgrades go over an HTTP/1.1 connection of their own.
    pub fn send(
        &self,
        req: Request<Body>,
        route: Route,
    ) -> impl std::future::Future<Output = Result<Response<ResponseBody>, UpstreamError>> + '_ {
        self.send_from(req, route, std::time::Instant::now())
    }

    /// [`Upstream::send`] of a request that left its caller at `sent`: the
    /// apiserver's answer time and the response timeout count from there
    /// (the caller's clock read serves both).
    pub async fn send_from(
        &self,
        req: Request<Body>,
        route: Route,
        sent: std::time::Instant,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        let forward = match &self.plain {
            Some(plain) if !self.presents_certificate(&route, req.headers()) => plain,
            _ => &self.forward,
        };
        if route.upgrade {
            // Boxed: rare, and every other request would carry room for it.
            return Box::pin(self.with_timeout(
                Self::send_upgrade(forward.upgrades.clone(), req, &self.authority, &self.tasks),
                None,
            ))
            .await;
        }
        let pool = forward.pool(route.lane);
        let res = self
            .with_timeout(pool.send(req), (!route.long_running).then_some(sent))
            .await;
        // Any answer counts (a 429 or 500 took the apiserver's time too);
        // a request that never got one (refused, unreachable) does not.
        if res.is_ok() {
            self.latency.observe_upstream(route.class, sent.elapsed());
        }
        res
    }

    /// Whether a request goes over the connections that present the
    /// proxy's certificate (when there are any): never for a caller without
    /// credentials; in `auto` only for a front-proxy request (it carries
    /// `X-Remote-User`), so a token is never sent beside a certificate the
    /// apiserver would verify for nothing.
    fn presents_certificate(&self, route: &Route, headers: &http::HeaderMap) -> bool {
        if route.anonymous {
            return false;
        }
        match self.mode {
            AuthMode::Auto => headers.contains_key(REMOTE_USER),
            _ => true,
        }
    }

    /// The answer-time recorder (histograms and recent quantiles).
    pub fn latency(&self) -> &Arc<crate::slo::Latency> {
        &self.latency
    }

    /// Sends one of the proxy's own requests (TokenReview, probes) with the
    /// proxy's own credentials.
    pub async fn send_own(
        &self,
        mut req: Request<Body>,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        let headers = req.headers_mut();
        if let Some(token) = self.own_token() {
            headers.insert(http::header::AUTHORIZATION, token);
        }
        if self.mode.uses_front_proxy() {
            headers.insert(REMOTE_USER, self.proxy_user.clone());
        }
        self.with_timeout(self.own.send(req), Some(std::time::Instant::now()))
            .await
    }

    /// Closes every lane (the proxy's shutdown, once clients and the watch
    /// hub are done): idle connections end now, busy ones with their last
    /// stream, and further requests fail with [`PoolError::Closed`]. Idle
    /// pooled connections would otherwise keep their driver tasks, which
    /// the shutdown waits for, alive until the apiserver closed them.
    pub fn close(&self) {
        for forward in std::iter::once(&self.forward).chain(&self.plain) {
            forward.unary.close();
            forward.long_running.close();
            forward.exempt.close();
            forward.hub.close();
        }
        self.own.close();
    }

    /// Connections and streams in use in one forwarding lane (for callers
    /// with credentials: in `auto`, both kinds of connection, summed).
    pub fn lane_stats(&self, lane: Lane) -> LaneStats {
        match lane {
            Lane::Own => self.own.stats(),
            lane => {
                let mut s = self.forward.pool(lane).stats();
                if self.mode == AuthMode::Auto
                    && let Some(plain) = &self.plain
                {
                    let p = plain.pool(lane).stats();
                    s.connections += p.connections;
                    s.streams += p.streams;
                }
                s
            }
        }
    }

    /// `fut`, under the response timeout counted from `from` if there is
    /// one.
    ///
    /// Not an `async fn`: one would keep `fut` twice in its state (the
    /// argument, and what it awaits), and every request's handler future
    /// carries this one.
    fn with_timeout<F>(
        &self,
        fut: F,
        from: Option<std::time::Instant>,
    ) -> impl std::future::Future<Output = Result<Response<ResponseBody>, UpstreamError>> + use<F>
    where
        F: std::future::Future<Output = Result<Response<ResponseBody>, PoolError>>,
    {
        use futures_util::FutureExt as _;
        use futures_util::future::Either;
        let limit = self.timeouts.response;
        let fut = if let Some(from) = from {
            let deadline = tokio::time::Instant::from_std(from) + limit;
            Either::Left(tokio::time::timeout_at(deadline, fut))
        } else {
            Either::Right(fut.map(Ok))
        };
        fut.map(move |res| match res {
            Ok(res) => Ok(res?),
            Err(_) => Err(UpstreamError::Timeout(limit)),
        })
    }

    /// An upgrade (exec, attach, port-forward) on a new HTTP/1.1 connection,
    /// which the upgraded stream then owns.
    async fn send_upgrade(
        connector: Connector,
        mut req: Request<Body>,
        authority: &Authority,
        tasks: &TaskTracker,
    ) -> Result<Response<ResponseBody>, PoolError> {
        let io = connector
            .oneshot(req.uri().clone())
            .await
            .map_err(PoolError::Connect)?;
        let (mut tx, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| PoolError::Connect(e.into()))?;
        // Ends when the connection is upgraded (the splice then owns it),
        // or closes.
        tasks.spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %Chain(&e), "upstream upgrade connection ended with an error");
            }
        });
        pool::origin_form(&mut req, authority);
        let resp = tx.send_request(req).await.map_err(PoolError::Send)?;
        Ok(resp.map(ResponseBody::unpooled))
    }

    /// Whether the apiserver answers its readiness endpoint (any HTTP answer
    /// below 500 counts: an apiserver that refuses our credentials is up).
    pub async fn probe(&self, timeout: Duration) -> bool {
        let uri = self.uri_for(Some(&PathAndQuery::from_static("/readyz")));
        let req = match Request::get(uri).body(empty()) {
            Ok(r) => r,
            Err(_) => return false,
        };
        let up = match tokio::time::timeout(timeout, self.send_own(req)).await {
            Ok(Ok(resp)) => resp.status().as_u16() < 500,
            _ => false,
        };
        // For the "apiserver unreachable" alert: the last probe's answer
        // (the kubelet's /readyz probes and the admin listener's upkeep).
        metrics::gauge!("breakwater_upstream_up").set(if up { 1.0 } else { 0.0 });
        up
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_and_front_proxy_need_the_front_proxy_certificate() {
        for mode in [AuthMode::Auto, AuthMode::FrontProxy] {
            let cfg = UpstreamConfig {
                mode,
                ..UpstreamConfig::passthrough("https://127.0.0.1:6443", None)
            };
            let err = Upstream::new(&cfg, TaskTracker::new(), None)
                .err()
                .expect("refused without a client certificate");
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("--upstream-auth {} needs", mode.as_str())),
                "{msg}"
            );
        }
    }

    #[test]
    fn the_mode_names_are_the_flag_values() {
        use clap::ValueEnum;
        for mode in AuthMode::value_variants() {
            let parsed: AuthMode =
                serde_json::from_value(serde_json::json!(mode.as_str())).expect("config name");
            assert_eq!(parsed, *mode);
            let flag = mode.to_possible_value().expect("a flag value");
            assert_eq!(flag.get_name(), mode.as_str());
        }
    }
}
