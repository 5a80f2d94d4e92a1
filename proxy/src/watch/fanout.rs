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
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::Frame;
use tokio::time::Sleep;

use crate::upstream::BoxError;
use crate::watch::context::Stats;
use crate::watch::filter::Selector;

/// Upper bound of one coalesced frame: big enough to batch a burst, small
/// enough not to hold a large copy per subscriber.
const MAX_FRAME: usize = 64 * 1024;

/// How long before the client's timeout the last bookmark is asked for
/// (so the client resumes from the newest RV), as the apiserver does.
const PRE_TIMEOUT_BOOKMARK: Duration = Duration::from_secs(2);

/// Queued events a subscriber's queue gives back its memory above (after
/// a burst, once drained): an idle watcher holds no queue at all.
const KEEP_QUEUE: usize = 16;

/// Why [`QueueTx::try_send`] did not queue.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SendError {
    /// The subscriber is not reading: evict it.
    Full,
    /// The subscriber is gone.
    Closed,
}

/// One subscriber's bounded queue.
///
/// Not a tokio `mpsc` channel: that allocates a block of 32 slots (about
/// 1.3 KiB) per channel up front and keeps it, and at 10,000 idle watches
/// that is most of what a watch costs. This queue is a `VecDeque` that is
/// empty — unallocated — while the watcher is idle, behind a mutex that
/// only the stream (pushing, under its own lock) and the subscriber's body
/// (draining a whole batch per lock) ever take.
struct Queue {
    state: Mutex<QueueState>,
    bound: usize,
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<Bytes>,
    /// The sender is gone (evicted, 410, shutdown) or the body is.
    closed: bool,
    waker: Option<Waker>,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // No code path panics while holding it; recover rather than spread.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The stream's end of a subscriber's queue. Dropping it ends the
/// subscriber's stream once what is queued has been sent.
pub(crate) struct QueueTx(Arc<Queue>);

/// The body's end.
struct QueueRx(Arc<Queue>);

/// A bounded queue of `bound` events.
pub(crate) fn queue(bound: usize) -> (QueueTx, QueueRxHandle) {
    let q = Arc::new(Queue {
        state: Mutex::new(QueueState::default()),
        bound: bound.max(1),
    });
    (QueueTx(q.clone()), QueueRxHandle(QueueRx(q)))
}

/// The body's end of a queue, handed to [`SubBody::new`].
pub(crate) struct QueueRxHandle(QueueRx);

impl QueueTx {
    /// Queues `b` unless the subscriber is gone or not reading.
    pub(crate) fn try_send(&self, b: Bytes) -> Result<(), SendError> {
        let waker = {
            let mut st = self.0.lock();
            if st.closed {
                return Err(SendError::Closed);
            }
            if st.items.len() >= self.0.bound {
                return Err(SendError::Full);
            }
            st.items.push_back(b);
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }
}

impl Drop for QueueTx {
    fn drop(&mut self) {
        let waker = {
            let mut st = self.0.lock();
            st.closed = true;
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl QueueRx {
    /// Moves queued events (up to about `max` bytes) into `out`; `true`
    /// when the queue is closed and empty (the end of the stream). Registers
    /// the task's waker when nothing was queued.
    fn drain(&self, cx: &Context<'_>, max: usize, mut out: impl FnMut(Bytes) -> usize) -> bool {
        let mut st = self.0.lock();
        let mut total = 0usize;
        let mut took = false;
        while total < max {
            match st.items.pop_front() {
                Some(b) => {
                    total += out(b);
                    took = true;
                }
                None => break,
            }
        }
        if st.items.is_empty() {
            if st.items.capacity() > KEEP_QUEUE {
                st.items = VecDeque::new();
            }
            if st.closed {
                return true;
            }
            if !took && !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                st.waker = Some(cx.waker().clone());
            }
        }
        false
    }
}

impl Drop for QueueRx {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.closed = true;
        st.items = VecDeque::new();
        st.waker = None;
    }
}

/// What a subscriber's body asks of the stream it is subscribed to.
///
/// The body holds it weakly: the hub alone keeps streams alive, and a body
/// that outlives its stream (shut down, refused) just has nobody to tell.
pub(crate) trait Subscription: Send + Sync {
    /// Queue a BOOKMARK at the stream's RV for subscriber `id`, in order
    /// with its events.
    fn request_bookmark(&self, id: u64, sel: &Selector);
    /// Forget subscriber `id` (its body was dropped).
    fn remove(&self, id: u64, sel: &Selector);
}

/// Which subscriber of which stream a body is.
pub(crate) struct SubHandle {
    pub(crate) stream: Weak<dyn Subscription>,
    pub(crate) id: u64,
    /// Where the stream filed this subscriber.
    pub(crate) sel: Arc<Selector>,
}

/// The response body of one shared watch.
pub struct SubBody {
    initial: VecDeque<Bytes>,
    rx: QueueRx,
    deadline: Pin<Box<Sleep>>,
    pre_timeout: Option<Pin<Box<Sleep>>>,
    handle: SubHandle,
    done: bool,
    stats: Arc<Stats>,
}

impl SubBody {
    pub(crate) fn new(
        initial: Vec<Bytes>,
        rx: QueueRxHandle,
        timeout: Duration,
        bookmarks: bool,
        handle: SubHandle,
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
            rx: rx.0,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            pre_timeout,
            handle,
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
            let h = &this.handle;
            if let Some(stream) = h.stream.upgrade() {
                stream.request_bookmark(h.id, &h.sel);
            }
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
        if this.initial.is_empty() && this.initial.capacity() > 0 {
            // The snapshot is out: its slots are not needed for the
            // watch's (long) rest.
            this.initial = VecDeque::new();
        }
        let mut ended = false;
        if this.initial.is_empty() && total < MAX_FRAME {
            ended = this.rx.drain(cx, MAX_FRAME - total, |b| {
                let n = b.len();
                push(b, &mut total);
                n
            });
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
        let h = &self.handle;
        if let Some(stream) = h.stream.upgrade() {
            stream.remove(h.id, &h.sel);
        }
        self.stats.subscribers.fetch_sub(1, Ordering::Relaxed);
        self.stats.publish();
    }
}

#[cfg(test)]
mod tests;
