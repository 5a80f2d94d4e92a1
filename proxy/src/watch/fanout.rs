//! One subscriber: its bounded queue and the response body that drains it.
//!
//! The shared stream pushes each event's encoded line (one `Bytes`, shared by
//! every subscriber it goes to) into the subscriber's bounded queue with
//! `try_send`, under the stream's lock: a full queue means the client is not
//! reading, and the stream drops the subscriber (closing its queue) rather
//! than wait — the apiserver closes unresponsive watchers the same way, and
//! the client re-watches from its last resourceVersion. Nobody else slows
//! down, and memory per subscriber stays bounded by the queue.
//!
//! The body drains everything queued into ONE frame per poll, so a burst
//! costs one write syscall per wake instead of one per event. It also owns
//! the client's own `timeoutSeconds` (a clean end) and asks the stream for
//! a bookmark just before it.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::Frame;
use tokio::sync::mpsc;
use tokio::time::Sleep;

use crate::upstream::BoxError;
use crate::watch::Stats;
use crate::watch::stream::Stream;

/// Upper bound of one coalesced frame: big enough to batch a burst, small
/// enough not to hold a large copy per subscriber.
const MAX_FRAME: usize = 64 * 1024;

/// How long before the client's timeout the last bookmark is asked for
/// (so the client resumes from the newest RV), as the apiserver does.
const PRE_TIMEOUT_BOOKMARK: Duration = Duration::from_secs(2);

/// The response body of one shared watch.
pub struct SubBody {
    initial: VecDeque<Bytes>,
    rx: mpsc::Receiver<Bytes>,
    deadline: Pin<Box<Sleep>>,
    pre_timeout: Option<Pin<Box<Sleep>>>,
    stream: Arc<Stream>,
    id: u64,
    done: bool,
    stats: Arc<Stats>,
}

impl SubBody {
    pub(crate) fn new(
        initial: Vec<Bytes>,
        rx: mpsc::Receiver<Bytes>,
        timeout: Duration,
        bookmarks: bool,
        stream: Arc<Stream>,
        id: u64,
        stats: Arc<Stats>,
    ) -> SubBody {
        stats.subscribers.fetch_add(1, Ordering::Relaxed);
        stats.publish();
        let pre_timeout = timeout
            .checked_sub(PRE_TIMEOUT_BOOKMARK)
            .filter(|d| bookmarks && !d.is_zero())
            .map(|d| Box::pin(tokio::time::sleep(d)));
        SubBody {
            initial: initial.into(),
            rx,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            pre_timeout,
            stream,
            id,
            done: false,
            stats,
        }
    }
}

impl http_body::Body for SubBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            // The client's own timeoutSeconds: a clean end, no error event.
            this.done = true;
            return Poll::Ready(None);
        }
        if let Some(pre) = this.pre_timeout.as_mut()
            && pre.as_mut().poll(cx).is_ready()
        {
            this.pre_timeout = None;
            this.stream.request_bookmark(this.id);
        }
        let mut first: Option<Bytes> = None;
        let mut buf: Option<BytesMut> = None;
        let mut total = 0usize;
        let mut push = |b: Bytes, total: &mut usize| {
            *total += b.len();
            match (&mut first, &mut buf) {
                (None, _) => first = Some(b),
                (Some(f), None) => {
                    let mut m = BytesMut::with_capacity(f.len() + b.len() * 4);
                    m.extend_from_slice(f);
                    m.extend_from_slice(&b);
                    buf = Some(m);
                }
                (Some(_), Some(m)) => m.extend_from_slice(&b),
            }
        };
        while total < MAX_FRAME {
            match this.initial.pop_front() {
                Some(b) => push(b, &mut total),
                None => break,
            }
        }
        let mut ended = false;
        if this.initial.is_empty() {
            while total < MAX_FRAME {
                match this.rx.poll_recv(cx) {
                    Poll::Ready(Some(b)) => push(b, &mut total),
                    Poll::Ready(None) => {
                        ended = true;
                        break;
                    }
                    Poll::Pending => break,
                }
            }
        }
        let frame = match (buf, first) {
            (Some(m), _) => Some(m.freeze()),
            (None, f) => f,
        };
        match frame {
            Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
            // The stream closed this subscriber (evicted, 410, upstream
            // refused, shutdown) and everything queued is out: a clean end.
            None if ended => {
                this.done = true;
                Poll::Ready(None)
            }
            None => Poll::Pending,
        }
    }
}

impl Drop for SubBody {
    fn drop(&mut self) {
        self.stream.remove(self.id);
        self.stats.subscribers.fetch_sub(1, Ordering::Relaxed);
        self.stats.publish();
    }
}
