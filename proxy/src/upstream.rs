//! The pooled client to the kube-apiserver.
//!
//! Two hyper-util clients share one TLS setup: the pooled one offers h2 and
//! http/1.1 by ALPN (against an apiserver, h2 lets every client stream share a
//! few connections), the other speaks only HTTP/1.1 for protocol upgrades
//! (exec, attach, port-forward), which need a connection of their own.
//!
//! Long-running requests (watch, exec, logs, port-forward) get no timeout of
//! any kind here: the stream ends only when the client or the apiserver ends
//! it. Other requests get a response-header timeout (504 when it passes);
//! their bodies still stream without one. HTTP/2 keepalive pings keep quiet
//! upstream connections (a watch with no events) alive through middleboxes.

use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::tls::{self, TlsError, UpstreamTls};

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

/// Why a request could not be forwarded. The proxy turns each into a Status.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made, or it broke before a response arrived.
    #[error("upstream unreachable: {0}")]
    Unreachable(#[source] hyper_util::client::legacy::Error),
    /// No response headers within the timeout.
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
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

/// The apiserver, as the proxy sees it.
#[derive(Clone)]
pub struct Upstream {
    scheme: Scheme,
    authority: Authority,
    pooled: Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Body,
    >,
    upgrades: Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Body,
    >,
    timeouts: Timeouts,
}

/// A bad upstream URL or TLS setup.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamConfigError {
    #[error("upstream URL {0:?} must be https://host[:port]")]
    BadUrl(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl Upstream {
    pub fn new(
        url: &str,
        tls: &UpstreamTls,
        timeouts: Timeouts,
    ) -> Result<Upstream, UpstreamConfigError> {
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
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .http2_keep_alive_interval(timeouts.keepalive)
            .http2_keep_alive_timeout(timeouts.keepalive * 2)
            .http2_keep_alive_while_idle(true)
            .http2_adaptive_window(true);
        let pooled = builder.build(tls::upstream_connector(tls)?);
        let upgrades = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(tls::upgrade_connector(tls)?);
        Ok(Upstream {
            scheme,
            authority,
            pooled,
            upgrades,
            timeouts,
        })
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

    /// Sends a request whose URI is already absolute (see [`Upstream::uri_for`]).
    ///
    /// `long_running` requests wait for their response headers without a
    /// timeout; `upgrade` requests go over a dedicated HTTP/1.1 connection.
    pub async fn send(
        &self,
        mut req: Request<Body>,
        long_running: bool,
        upgrade: bool,
    ) -> Result<Response<Incoming>, UpstreamError> {
        // The pooled client picks h2 or h1 per connection; a request marked
        // HTTP/2 would be refused on an h1 connection.
        *req.version_mut() = Version::HTTP_11;
        let client = if upgrade {
            &self.upgrades
        } else {
            &self.pooled
        };
        let fut = client.request(req);
        if long_running || upgrade {
            return fut.await.map_err(UpstreamError::Unreachable);
        }
        match tokio::time::timeout(self.timeouts.response, fut).await {
            Ok(res) => res.map_err(UpstreamError::Unreachable),
            Err(_) => Err(UpstreamError::Timeout(self.timeouts.response)),
        }
    }

    /// Whether the apiserver answers its readiness endpoint (any HTTP answer
    /// below 500 counts: an apiserver that refuses our credentials is up).
    pub async fn probe(&self, timeout: Duration) -> bool {
        let uri = self.uri_for(Some(&PathAndQuery::from_static("/readyz")));
        let req = match Request::get(uri).body(empty()) {
            Ok(r) => r,
            Err(_) => return false,
        };
        match tokio::time::timeout(timeout, self.pooled.request(req)).await {
            Ok(Ok(resp)) => resp.status().as_u16() < 500,
            _ => false,
        }
    }
}
