//! kube-sim's transport made like the apiserver's: Go's `net/http` server
//! with the settings kube-apiserver gives it, as far as hyper allows.
//!
//! A proxy's cost per request depends on how its upstream talks, not only
//! on what it says (issue #17: behind a Go `net/http` server Breakwater
//! spent 53 µs per request, behind hyper-based kube-sim 34 µs). With
//! [`super::SimConfig::go_like_transport`] (the default) kube-sim copies:
//!
//! - **HTTP/2 settings** from k8s.io/apiserver's `secure_serving.go`: 250
//!   concurrent streams, a 256 KiB stream window and largest accepted
//!   frame (`resourceBody99Percentile`), a connection window of 256 KiB ×
//!   250 streams, and Go's `SETTINGS_MAX_HEADER_LIST_SIZE` (1 MiB
//!   `MaxHeaderBytes` + 10 × 32 bytes of per-field overhead).
//! - **Response headers**: besides the `Cache-Control: no-cache, private`,
//!   `Content-Type` and `Date` it always sent, a fresh `Audit-Id` per
//!   request and the API Priority and Fairness pair
//!   `X-Kubernetes-Pf-Flowschema-Uid` / `X-Kubernetes-Pf-Prioritylevel-Uid`
//!   (fixed per kube-sim instance, as a FlowSchema's uid is), which the
//!   recorded fixtures leave out as volatile. A proxy parses, copies and
//!   HPACK-encodes them on every response.
//! - **The flush pattern of Go's HTTP/2 server** ([`GoFlushBody`]): its
//!   handler hands HEADERS to the connection's serve loop and waits until
//!   they are written; the loop flushes whenever its queue is empty, so
//!   HEADERS go out in a TLS record (and usually a TCP segment) of their
//!   own, and the DATA follows in another. hyper queues both and flushes
//!   once. A small body (≤ 4 KiB, Go's handler buffer) then comes as one
//!   DATA frame with END_STREAM and a `Content-Length`; a larger one
//!   without `Content-Length` (Go cannot know it when the handler's first
//!   write overflows its buffer), as DATA and then an empty DATA frame
//!   with END_STREAM, each flushed on its own.
//!
//! Not copied: Go's HPACK encoder's choices (which fields it indexes),
//! its write scheduler's priorities, its 90 s idle timeout, and its
//! WINDOW_UPDATEs after request-body reads (Go's server returns window as
//! the handler reads; hyper's when half a window is used up). The last
//! matters for PATCH/PUT/POST bodies, not for the GETs the overhead
//! benchmark sends.
//! - **Go's HTTP/1.1 chunking** ([`GoFlushBody::http1_chunked`]): Go's server buffers a
//!   handler's first 2 KiB (`bufferBeforeChunkingSize`); a small response
//!   goes out with `Content-Length` in one write, as hyper's does, but a
//!   larger one (a pod is 3–6 KiB) without it, chunked, the terminating
//!   chunk written when the handler returns. A proxy then does not know
//!   the body's end until that last chunk arrives.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use super::respond::ResBody;

/// `resourceBody99Percentile` in k8s.io/apiserver: the stream window and
/// the largest frame the apiserver accepts.
pub const GO_STREAM_WINDOW: u32 = 256 * 1024;

/// Go's `handlerChunkWriteSize`: a response body up to this size is
/// buffered until the handler returns, and so goes out in one DATA frame
/// with END_STREAM and a known `Content-Length`.
const GO_HANDLER_BUFFER: u64 = 4 * 1024;

/// Go's `bufferBeforeChunkingSize`: an HTTP/1.1 response body larger than
/// this is sent chunked.
const GO_H1_CHUNKING_BUFFER: u64 = 2 * 1024;

/// Go's http2 server: `MaxHeaderBytes` (1 MiB default) plus ten typical
/// headers' 32 bytes of per-field overhead.
pub const GO_MAX_HEADER_LIST_SIZE: u32 = (1 << 20) + 10 * 32;

/// Applies the apiserver's HTTP/2 settings: `max_streams` per connection,
/// and with `go_like` its windows, frame and header-list sizes.
pub(crate) fn configure_http2(
    builder: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    max_streams: u32,
    go_like: bool,
) {
    let mut h2 = builder.http2();
    // The apiserver's stream limit, not hyper's default of 200: a client
    // multiplexing everything on one connection must stall where it would
    // against the real thing.
    h2.max_concurrent_streams(max_streams);
    if go_like {
        h2.initial_stream_window_size(GO_STREAM_WINDOW)
            .initial_connection_window_size(GO_STREAM_WINDOW.saturating_mul(max_streams))
            .max_frame_size(GO_STREAM_WINDOW)
            .max_header_list_size(GO_MAX_HEADER_LIST_SIZE);
    }
}

/// The headers the apiserver's filters add to every response.
#[derive(Debug, Clone)]
pub(crate) struct ApiserverHeaders {
    flowschema: HeaderValue,
    priority_level: HeaderValue,
}

impl ApiserverHeaders {
    /// New uids for this kube-sim's one FlowSchema and PriorityLevel.
    pub(crate) fn new() -> ApiserverHeaders {
        let uid = || {
            HeaderValue::from_str(&super::auth::random_uuid())
                .expect("a UUID is a valid header value")
        };
        ApiserverHeaders {
            flowschema: uid(),
            priority_level: uid(),
        }
    }

    /// `Audit-Id` on every response (the audit filter runs first); the APF
    /// pair on those that got past authentication (APF classifies by user).
    pub(crate) fn apply(&self, resp: &mut Response<ResBody>) {
        let authenticated = resp.status() != StatusCode::UNAUTHORIZED;
        let h = resp.headers_mut();
        if let Ok(id) = HeaderValue::from_str(&super::auth::random_uuid()) {
            h.insert("audit-id", id);
        }
        if authenticated {
            h.insert("x-kubernetes-pf-flowschema-uid", self.flowschema.clone());
            h.insert(
                "x-kubernetes-pf-prioritylevel-uid",
                self.priority_level.clone(),
            );
        }
    }
}

/// With `go_like`, a response's body sent the way Go's server sends it:
/// over HTTP/2 flushed as it flushes, over HTTP/1.1 chunked above 2 KiB
/// ([`GoFlushBody`]).
pub(crate) fn go_flush(resp: Response<ResBody>, version: Version) -> Response<ResBody> {
    if version == Version::HTTP_2 {
        return resp.map(|body| GoFlushBody::new(body).boxed());
    }
    let large = resp
        .body()
        .size_hint()
        .exact()
        .is_some_and(|n| n > GO_H1_CHUNKING_BUFFER);
    if large {
        return resp.map(|body| GoFlushBody::http1_chunked(body).boxed());
    }
    resp
}

/// A response body that lets the connection flush what it has queued
/// before each of its frames, so HEADERS and DATA leave in separate writes
/// as they do from Go's HTTP/2 server (see the module docs); over HTTP/1.1
/// ([`GoFlushBody::http1_chunked`]) only before its end.
///
/// The yield is a self-wake: tokio puts a task that woke itself at the back
/// of the run queue, behind the connection task that the queued HEADERS
/// woke, which then writes and flushes them.
pub(crate) struct GoFlushBody {
    inner: ResBody,
    /// Yield before the next frame (or the end).
    yield_next: bool,
    /// Go's large-body pattern: no `Content-Length`, and END_STREAM on an
    /// empty DATA frame of its own after the data.
    separate_end: bool,
    /// The data is all sent and the separate end is due.
    end_due: bool,
}

impl GoFlushBody {
    fn new(inner: ResBody) -> GoFlushBody {
        let separate_end = inner
            .size_hint()
            .exact()
            .is_some_and(|n| n > GO_HANDLER_BUFFER);
        GoFlushBody {
            inner,
            yield_next: true,
            separate_end,
            end_due: false,
        }
    }

    /// Go's HTTP/1.1 answer past its 2 KiB buffer: no length (so hyper
    /// chunks it), head and data written together, the terminating chunk
    /// held back until the task has been polled once more, so that it goes
    /// out in a write of its own, as Go's does when the handler returns.
    fn http1_chunked(inner: ResBody) -> GoFlushBody {
        GoFlushBody {
            inner,
            yield_next: false,
            separate_end: true,
            end_due: false,
        }
    }
}

impl Body for GoFlushBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if this.yield_next {
            this.yield_next = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if this.end_due {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(frame)) => {
                // Go writes each handler chunk, and then the end, as a
                // write of its own.
                this.yield_next = true;
                if this.separate_end && this.inner.is_end_stream() {
                    this.end_due = true;
                }
                Poll::Ready(Some(frame))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        // A held-back end is reported by the next poll (an empty frame).
        !self.separate_end && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.separate_end {
            // Go sent its headers before it knew the length.
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    fn response(len: usize) -> Response<ResBody> {
        Response::new(Full::new(Bytes::from(vec![b'x'; len])).boxed())
    }

    #[tokio::test]
    async fn http1_bodies_past_go_buffer_go_out_chunked_and_whole() {
        // Up to 2 KiB: a known length (hyper sends Content-Length).
        let small = go_flush(response(2048), Version::HTTP_11);
        assert_eq!(small.body().size_hint().exact(), Some(2048));
        // Past it: no length (hyper chunks), and every byte still there.
        let large = go_flush(response(4000), Version::HTTP_11);
        assert_eq!(large.body().size_hint().exact(), None);
        assert!(!large.body().is_end_stream());
        let body = large.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body.len(), 4000);
        // HTTP/2 keeps its own pattern: a length up to 4 KiB.
        let h2 = go_flush(response(4000), Version::HTTP_2);
        assert_eq!(h2.body().size_hint().exact(), Some(4000));
    }
}
