//! The access log: one line per request, written when its response (or
//! stream) ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response, StatusCode};

use crate::classify::RequestInfo;
use crate::identity::Identity;
use crate::upstream::Body;

/// One access-log line per request, written when the response (or stream)
/// ends, however it ends. Never the query string (it may carry tokens in
/// exec or proxy URLs) and never headers.
///
/// It holds what the line needs by reference (the request's URI and
/// classification, the caller's identity) and formats nothing until the
/// line is written: with the access log filtered out, a request pays no
/// allocation for it.
pub struct AccessLog {
    pub(super) start: Instant,
    method: http::Method,
    path: LoggedPath,
    info: Arc<RequestInfo>,
    peer: SocketAddr,
    pub(super) identity: Option<Arc<Identity>>,
    status: Option<StatusCode>,
    pub(super) outcome: &'static str,
    pub(super) bytes: u64,
    /// The request's place in /debug/top's tables, ended with the status.
    pub(super) top: Option<crate::top::Ticket>,
}

/// The request's path, for the log line.
enum LoggedPath {
    /// The request's URI (a reference count): for requests that end soon.
    Uri(http::Uri),
    /// A copy: a long-running request's log lives as long as its stream,
    /// and the URI would keep the connection's whole read buffer alive
    /// with it (hyper's parsed URI shares it), for every idle watch.
    Copied(Box<str>),
}

impl AccessLog {
    pub(super) fn new<B>(req: &Request<B>, info: &Arc<RequestInfo>, peer: SocketAddr) -> AccessLog {
        let path = if info.is_long_running() {
            LoggedPath::Copied(req.uri().path().into())
        } else {
            LoggedPath::Uri(req.uri().clone())
        };
        AccessLog {
            start: Instant::now(),
            method: req.method().clone(),
            path,
            info: info.clone(),
            peer,
            identity: None,
            status: None,
            outcome: "client-gone",
            bytes: 0,
            top: None,
        }
    }

    /// The request's path (never its query).
    pub(super) fn path(&self) -> &str {
        match &self.path {
            LoggedPath::Uri(uri) => uri.path(),
            LoggedPath::Copied(path) => path,
        }
    }

    /// The governing rule, for /debug/top.
    pub(super) fn rule(&mut self, rule: Option<&Arc<str>>) {
        if let Some(top) = self.top.as_mut() {
            top.rule(rule);
        }
    }

    pub(super) fn with_status(mut self, status: StatusCode) -> AccessLog {
        self.status = Some(status);
        self
    }

    pub(super) fn finish_with(mut self, resp: Response<Body>) -> Response<Body> {
        self.status = Some(resp.status());
        self.outcome = "complete";
        resp
    }
}

/// `resource` or `resource/subresource`, as the access log shows it.
struct ResourceLabel<'a>(&'a RequestInfo);

impl std::fmt::Display for ResourceLabel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.resource)?;
        if !self.0.subresource.is_empty() {
            write!(f, "/{}", self.0.subresource)?;
        }
        Ok(())
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        let status = self.status.map(|s| s.as_u16()).unwrap_or(0);
        if let Some(top) = self.top.take() {
            top.end(status);
        }
        let elapsed = self.start.elapsed();
        let verb = self.info.verb.label();
        if tracing::enabled!(target: "breakwater::access", tracing::Level::INFO) {
            self.log_line(verb, status, elapsed);
        }
        crate::slo::count_request(verb, status, elapsed);
    }
}

impl AccessLog {
    /// The line itself: formatted by [`crate::logsink`] when it is
    /// installed (the binary, colours off), else by `tracing`.
    #[cold]
    fn log_line(&self, verb: &str, status: u16, elapsed: std::time::Duration) {
        let user = self.identity.as_ref().map_or("", |i| i.username.as_str());
        let written = crate::logsink::access(&crate::logsink::AccessLine {
            method: self.method.as_str(),
            path: self.path(),
            verb,
            resource: &self.info.resource,
            subresource: &self.info.subresource,
            namespace: self.info.namespace.as_str(),
            user,
            status,
            outcome: self.outcome,
            bytes: self.bytes,
            duration: elapsed,
            peer: self.peer,
        });
        if written {
            return;
        }
        tracing::info!(
            target: "breakwater::access",
            method = %self.method,
            path = self.path(),
            verb,
            resource = %ResourceLabel(&self.info),
            namespace = self.info.namespace.as_str(),
            user,
            status,
            outcome = self.outcome,
            bytes = self.bytes,
            duration_ms = format_args!("{}.{:03}", elapsed.as_micros() / 1000, elapsed.as_micros() % 1000),
            peer = %self.peer,
        );
    }
}
