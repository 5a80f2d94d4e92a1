//! A small client for the admin listener (plain HTTP, on the node's
//! loopback): what `breakwater top`, `block`, `blocks` and `unblock` use.
//!
//! Each call is bounded in time (connecting, the answer and its body) and
//! in size (the body), and decodes JSON. An error answer's
//! `{"error": "message"}` becomes the error's message, so the command can
//! print what the proxy said.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The largest answer read (a full `/debug/top` document is ~200 KiB).
pub const MAX_BODY: usize = 8 << 20;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a call to the admin listener failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}: only plain http:// URLs (the admin listener) can be used")]
    NotHttp(String),
    #[error("{0}: not a URL")]
    BadUrl(String),
    /// Nothing accepted the connection.
    #[error("cannot reach the admin listener at {base}")]
    Unreachable {
        base: String,
        #[source]
        source: BoxError,
    },
    /// The connection broke, or the answer could not be read.
    #[error("{method} {url}")]
    Request {
        method: Method,
        url: String,
        #[source]
        source: BoxError,
    },
    #[error("the admin listener at {base} did not answer within {}", humantime::format_duration(*within))]
    Timeout { base: String, within: Duration },
    /// An answer other than 2xx; `message` is the proxy's `error` field.
    #[error("{}", status_line(method, url, *status, message.as_deref()))]
    Status {
        method: Method,
        url: String,
        status: StatusCode,
        message: Option<String>,
    },
    #[error("{method} {url}: not the answer expected (a different breakwater version?)")]
    Decode {
        method: Method,
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

fn status_line(method: &Method, url: &str, status: StatusCode, message: Option<&str>) -> String {
    match message {
        Some(m) => m.to_string(),
        None => format!("{method} {url} answered {status}"),
    }
}

impl AdminError {
    /// The HTTP status of an error answer.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            AdminError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client of one admin listener.
#[derive(Clone)]
pub struct AdminClient {
    base: String,
    timeout: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    /// A client of the admin listener at `admin` (`http://host:port`, a
    /// trailing `/` is fine); each call may take up to `timeout`.
    pub fn new(admin: &str, timeout: Duration) -> Result<AdminClient, AdminError> {
        let base = admin.trim_end_matches('/').to_string();
        let uri: http::Uri = base.parse().map_err(|_| AdminError::BadUrl(admin.into()))?;
        if uri.scheme_str() != Some("http") {
            return Err(AdminError::NotHttp(admin.into()));
        }
        if uri.authority().is_none() {
            return Err(AdminError::BadUrl(admin.into()));
        }
        let client =
            Client::builder(hyper_util::rt::TokioExecutor::new()).build(HttpConnector::new());
        Ok(AdminClient {
            base,
            timeout,
            client,
        })
    }

    /// The listener's URL, without a trailing `/`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `GET path`, decoded.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, AdminError> {
        self.call(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body, the answer decoded.
    pub async fn post<B, T>(&self, path: &str, body: &B) -> Result<T, AdminError>
    where
        B: Serialize + ?Sized,
        T: DeserializeOwned,
    {
        let body = serde_json::to_vec(body).map_err(|source| AdminError::Decode {
            method: Method::POST,
            url: self.url(path),
            source,
        })?;
        self.call(Method::POST, path, Some(Bytes::from(body))).await
    }

    /// `DELETE path`, the answer decoded.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, AdminError> {
        self.call(Method::DELETE, path, None).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<T, AdminError> {
        let url = self.url(path);
        let (status, bytes) = tokio::time::timeout(self.timeout, self.send(&method, &url, body))
            .await
            .map_err(|_| AdminError::Timeout {
                base: self.base.clone(),
                within: self.timeout,
            })??;
        if !status.is_success() {
            #[derive(serde::Deserialize)]
            struct ErrorBody {
                error: String,
            }
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .ok()
                .map(|b| b.error);
            return Err(AdminError::Status {
                method,
                url,
                status,
                message,
            });
        }
        serde_json::from_slice(&bytes).map_err(|source| AdminError::Decode {
            method,
            url,
            source,
        })
    }

    async fn send(
        &self,
        method: &Method,
        url: &str,
        body: Option<Bytes>,
    ) -> Result<(StatusCode, Bytes), AdminError> {
        let request_error = |source: BoxError| AdminError::Request {
            method: method.clone(),
            url: url.to_string(),
            source,
        };
        let mut req = http::Request::builder()
            .method(method.clone())
            .uri(url)
            .header(header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| request_error(e.into()))?;
        let resp = self.client.request(req).await.map_err(|e| {
            if e.is_connect() {
                // "client error (Connect)" says nothing its cause does not.
                let source: BoxError = match std::error::Error::source(&e) {
                    Some(cause) => crate::error::Chain(cause).to_string().into(),
                    None => e.into(),
                };
                AdminError::Unreachable {
                    base: self.base.clone(),
                    source,
                }
            } else {
                request_error(e.into())
            }
        })?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(request_error)?
            .to_bytes();
        Ok((status, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_urls_with_a_host_are_taken() {
        let t = Duration::from_secs(1);
        let c = AdminClient::new("http://127.0.0.1:9444/", t).expect("client");
        assert_eq!(c.base(), "http://127.0.0.1:9444");
        assert_eq!(
            c.url("/admin/v1/blocks"),
            "http://127.0.0.1:9444/admin/v1/blocks"
        );
        assert!(matches!(
            AdminClient::new("https://127.0.0.1:6443", t),
            Err(AdminError::NotHttp(_))
        ));
        assert!(matches!(
            AdminClient::new("not a url", t),
            Err(AdminError::BadUrl(_))
        ));
    }

    #[test]
    fn an_error_answer_reads_as_the_proxys_message() {
        let err = AdminError::Status {
            method: Method::POST,
            url: "http://127.0.0.1:9444/admin/v1/blocks".into(),
            status: StatusCode::CONFLICT,
            message: Some("a block with id `x` already exists".into()),
        };
        assert_eq!(err.to_string(), "a block with id `x` already exists");
        assert_eq!(err.status(), Some(StatusCode::CONFLICT));
        let err = AdminError::Status {
            method: Method::GET,
            url: "http://127.0.0.1:9444/debug/top".into(),
            status: StatusCode::NOT_FOUND,
            message: None,
        };
        assert_eq!(
            err.to_string(),
            "GET http://127.0.0.1:9444/debug/top answered 404 Not Found"
        );
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable_with_its_cause() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = closed.local_addr().expect("addr").port();
        drop(closed);
        let base = format!("http://127.0.0.1:{port}");
        let c = AdminClient::new(&base, Duration::from_secs(5)).expect("client");
        let err = c
            .get::<serde_json::Value>("/admin/v1/blocks")
            .await
            .expect_err("nothing listens");
        let line = crate::error::Chain(&err).to_string();
        assert!(
            line.starts_with(&format!("cannot reach the admin listener at {base}: ")),
            "{line}"
        );
        assert!(!line.contains("client error"), "{line}");
    }
}
