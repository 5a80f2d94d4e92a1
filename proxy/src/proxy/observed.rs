//! The response body the client gets: passed through frame by frame (no
//! buffering), logged when it ends, and, for long-running streams, ended
//! cleanly between two events when the proxy shuts down or an emergency
//! block terminates it.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::AccessLog;
use crate::brake::{Ending, Framing, Registration};
use crate::error::Chain;
use crate::tasks::OnWake;
use crate::upstream::{Body, BoxError};
use breakwater_limits::Permit;

/// A long-running stream's way to end: its registration (whose token
/// fires at shutdown or on a terminating block) and where its events end.
pub struct Stop {
    pub registration: Registration,
    pub framing: Framing,
}

/// Generic over the inner body so that a forwarded response is boxed once
/// (here), not twice.
pub struct Observed<B: http_body::Body = Body> {
    inner: B,
    log: Option<AccessLog>,
    end: Option<Ender>,
    bytes: u64,
    /// Held until the body is dropped: in-flight and watch slots free
    /// exactly when the response ends, however it ends.
    _permit: Permit,
}

struct Ender {
    /// Polled with every frame: behind `OnWake`, one atomic read.
    fired: OnWake<WaitForCancellationFutureOwned>,
    /// Set once the token fired: the stream ends at the next boundary.
    ending: bool,
    at: Ending,
    /// Unregisters when the body goes.
    registration: Registration,
}

impl<B: http_body::Body> Observed<B> {
    pub fn new(inner: B, log: AccessLog, stop: Option<Stop>, permit: Permit) -> Observed<B> {
        Observed {
            inner,
            log: Some(log),
            end: stop.map(|s| Ender {
                fired: OnWake::new(s.registration.token().clone().cancelled_owned()),
                ending: false,
                at: Ending::new(s.framing),
                registration: s.registration,
            }),
            bytes: 0,
            _permit: permit,
        }
    }

    fn end(&mut self, outcome: &'static str) {
        if let Some(mut log) = self.log.take() {
            log.outcome = outcome;
            log.bytes = self.bytes;
        }
    }
}

/// Why the stream was told to end.
fn stop_outcome(shutdown: bool) -> &'static str {
    if shutdown { "shutdown" } else { "terminated" }
}

impl<B> http_body::Body for Observed<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let poll_inner = |inner: &mut B, cx: &mut Context<'_>| {
            Pin::new(inner)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into)))
        };
        if let Some(end) = this.end.as_mut()
            && (end.ending || Pin::new(&mut end.fired).poll(cx).is_ready())
        {
            end.ending = true;
            if end.at.can_end_now() {
                let outcome = stop_outcome(end.registration.is_shutdown());
                this.end(outcome);
                return Poll::Ready(None);
            }
            // Mid-event: finish the event, then end; past the deadline,
            // break the stream rather than end it on half an event.
            return match poll_inner(&mut this.inner, cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let data = end.at.cut(data);
                        this.bytes += data.len() as u64;
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                },
                Poll::Ready(Some(Err(err))) => {
                    this.end("upstream-error");
                    Poll::Ready(Some(Err(err)))
                }
                Poll::Ready(None) => {
                    this.end("complete");
                    Poll::Ready(None)
                }
                Poll::Pending => {
                    if end.at.poll_overdue(cx).is_ready() {
                        this.end("cut");
                        return Poll::Ready(Some(Err(
                            "the stream was told to end and its event did not finish in time"
                                .into(),
                        )));
                    }
                    Poll::Pending
                }
            };
        }
        match poll_inner(&mut this.inner, cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                    if let Some(end) = this.end.as_mut() {
                        end.at.sent(data);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                tracing::warn!(error = %Chain(&*err), "upstream response stream broke; passing the break on");
                this.end("upstream-error");
                Poll::Ready(Some(Err(err)))
            }
            Poll::Ready(None) => {
                this.end("complete");
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: http_body::Body> Drop for Observed<B> {
    fn drop(&mut self) {
        // hyper stops polling a body that reports its own end (a known
        // length, fully sent), so the end may only show here.
        if http_body::Body::is_end_stream(&self.inner) {
            self.end("complete");
        } else if let Some(log) = self.log.as_mut() {
            log.bytes = self.bytes;
        }
    }
}
