//! Kubernetes `Status` error bodies for the responses Breakwater itself
//! originates.
//!
//! Clients (kubectl, client-go, kube-rs) decode error bodies as
//! `meta/v1.Status`; anything else shows up as an opaque "unknown" error.
//! Every error the proxy answers on its own therefore goes through here, with
//! the apiserver's reason names and shapes (fixtures/error-*.body).

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;

/// `metav1.StatusReason` values the proxy uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    TooManyRequests,
    InternalError,
    ServiceUnavailable,
    Timeout,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::BadRequest => "BadRequest",
            Reason::Unauthorized => "Unauthorized",
            Reason::Forbidden => "Forbidden",
            Reason::NotFound => "NotFound",
            Reason::MethodNotAllowed => "MethodNotAllowed",
            Reason::TooManyRequests => "TooManyRequests",
            Reason::InternalError => "InternalError",
            Reason::ServiceUnavailable => "ServiceUnavailable",
            Reason::Timeout => "Timeout",
        }
    }
}

/// A `Status` object. Field order follows the apiserver's encoding.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    kind: &'static str,
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    metadata: Empty,
    status: &'static str,
    message: String,
    reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<Box<Details>>,
    code: u16,
}

#[derive(Debug, Clone, Serialize)]
struct Empty {}

/// `StatusDetails`: only the fields the proxy fills.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Details {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(rename = "retryAfterSeconds", skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
}

impl Status {
    /// A failure Status with the given HTTP code, reason and message.
    pub fn failure(code: StatusCode, reason: Reason, message: impl Into<String>) -> Status {
        Status {
            kind: "Status",
            api_version: "v1",
            metadata: Empty {},
            status: "Failure",
            message: message.into(),
            reason: reason.as_str(),
            details: None,
            code: code.as_u16(),
        }
    }

    pub fn with_details(mut self, details: Details) -> Status {
        self.details = Some(Box::new(details));
        self
    }

    pub fn code(&self) -> StatusCode {
        StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The JSON body.
    pub fn to_bytes(&self) -> Bytes {
        // Serializing a struct of strings and numbers cannot fail.
        Bytes::from(serde_json::to_vec(self).expect("Status serializes"))
    }

    /// A full HTTP response carrying this Status, with `Retry-After` when the
    /// details name one.
    pub fn into_response<B: From<Bytes>>(self) -> Response<B> {
        let retry_after = self.details.as_ref().and_then(|d| d.retry_after_seconds);
        let mut resp = Response::new(B::from(self.to_bytes()));
        *resp.status_mut() = self.code();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache, private"),
        );
        if let Some(secs) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }

    pub fn bad_request(message: impl Into<String>) -> Status {
        Status::failure(StatusCode::BAD_REQUEST, Reason::BadRequest, message)
    }

    pub fn service_unavailable(message: impl Into<String>) -> Status {
        Status::failure(
            StatusCode::SERVICE_UNAVAILABLE,
            Reason::ServiceUnavailable,
            message,
        )
    }

    pub fn gateway_timeout(message: impl Into<String>) -> Status {
        Status::failure(StatusCode::GATEWAY_TIMEOUT, Reason::Timeout, message)
    }

    pub fn internal(message: impl Into<String>) -> Status {
        Status::failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            Reason::InternalError,
            message,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_many_requests_matches_the_apiserver_shape() {
        let s = Status::failure(
            StatusCode::TOO_MANY_REQUESTS,
            Reason::TooManyRequests,
            "slow down",
        )
        .with_details(Details {
            retry_after_seconds: Some(3),
            ..Details::default()
        });
        let body = String::from_utf8(s.to_bytes().to_vec()).expect("utf8");
        assert_eq!(
            body,
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"slow down","reason":"TooManyRequests","details":{"retryAfterSeconds":3},"code":429}"#
        );
        let resp: Response<Bytes> = s.into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "3");
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
    }

    #[test]
    fn status_without_details_omits_the_field() {
        let s = Status::service_unavailable("upstream unreachable");
        let v: serde_json::Value = serde_json::from_slice(&s.to_bytes()).expect("json");
        assert_eq!(v["code"], 503);
        assert_eq!(v["reason"], "ServiceUnavailable");
        assert!(v.get("details").is_none());
    }
}
