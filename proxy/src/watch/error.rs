//! What can go wrong between the hub and the apiserver, typed: a timeout, an
//! unreachable apiserver, a refusal and an undecodable answer are different
//! things to log, to count and to act on.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Response, StatusCode};

use crate::upstream::{Body, UpstreamError, full};

/// An error answer from the apiserver, passed on to clients as it came.
#[derive(Debug, Clone)]
pub struct Failure {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

impl Failure {
    pub fn response(&self) -> Response<Body> {
        let mut resp = Response::new(full(self.body.clone()));
        *resp.status_mut() = self.status;
        if let Some(ct) = &self.content_type {
            resp.headers_mut().insert(CONTENT_TYPE, ct.clone());
        }
        resp
    }

    /// A client error the apiserver will repeat (403, 404, 400…): the
    /// stream gives up and passes it on. 410 and 429 are not refusals: the
    /// first is a relist, the second a retry.
    pub(crate) fn is_refusal(&self) -> bool {
        let code = self.status.as_u16();
        (400..500).contains(&code) && code != 429 && code != 410
    }
}

/// Why a request of the hub to the apiserver gave nothing usable.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No connection, a broken one, a full lane, or no response headers in
    /// time (the upstream client's own errors).
    #[error("the apiserver could not be asked")]
    Send(#[source] UpstreamError),
    /// The request itself could not be built (a path that is not a URI).
    #[error("the request could not be built")]
    Request(#[source] http::Error),
    /// An answer other than success (refusals are [`Failure`]s instead).
    #[error("the apiserver answered {0}")]
    Status(StatusCode),
    /// The answer broke off while being read.
    #[error("the apiserver's answer broke off")]
    Body(#[source] hyper::Error),
    /// The answer was not what the apiserver sends.
    #[error("the apiserver's answer could not be decoded")]
    Decode(#[source] DecodeError),
    /// A short watch gave no answer within its bound.
    #[error("the apiserver did not answer within {0:?}")]
    Timeout(Duration),
}

/// Bytes that are not the encoding a codec reads.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid JSON")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Shape(&'static str),
}

/// Why a client could not be served by a stream.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The stream closed (lingered out) between lookup and join: look again.
    #[error("the shared stream closed")]
    Closed,
    /// The apiserver refused the stream's LIST or WATCH.
    #[error("the apiserver refused the shared stream: {}", .0.status)]
    Refused(Failure),
    /// The hub cannot answer exactly as the apiserver would: forward.
    #[error("the shared stream cannot answer")]
    Unavailable(#[source] Unavailable),
}

impl From<Unavailable> for JoinError {
    fn from(u: Unavailable) -> JoinError {
        JoinError::Unavailable(u)
    }
}

/// Why a request is forwarded rather than served by a stream.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("the shared stream did not become ready in time")]
    NotReady,
    #[error("the shared stream's LIST could not connect to the apiserver")]
    Unreachable,
    #[error("the shared stream did not reach the apiserver's resourceVersion in time")]
    NotReached,
    #[error("the freshness check failed")]
    Freshness(#[source] Arc<FetchError>),
    #[error("resourceVersion {0} predates the shared stream")]
    Predates(u64),
    #[error("{items} items exceed limit={limit}: the apiserver pages them")]
    ExceedsLimit { items: usize, limit: u64 },
    #[error("whether this collection's list items carry kind and apiVersion is not known yet")]
    ItemTypeMetaUnknown,
    #[error("a cached object no longer decodes")]
    Undecodable(#[source] Arc<DecodeError>),
}
