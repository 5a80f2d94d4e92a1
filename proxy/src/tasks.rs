//! The proxy's spawned tasks, on one `TaskTracker`.
//!
//! [`crate::server::start`] creates one [`TaskTracker`] and every task the
//! proxy spawns goes on it: client connections, upstream connection
//! drivers and connects, upgrade splices, the file watchers, upkeep, the
//! admin listener. hyper spawns tasks of its own (an HTTP/2 server stream
//! per request, the HTTP/2 client's connection task, request-body pipes);
//! [`TrackedExecutor`] hands those to the same tracker. Shutdown then waits
//! on the tracker (bounded by the grace period), so "the proxy has stopped"
//! means that no task of it is still running — not merely that the
//! listener closed. The watch hub keeps a tracker of its own for its
//! streams ([`crate::watch::Hub::closed`]), awaited in the same step.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

pub use tokio_util::task::TaskTracker;

/// hyper's executor: spawns hyper's background tasks on the proxy's
/// tracker instead of bare `tokio::spawn`. Cheap to clone (one `Arc`).
#[derive(Clone, Debug)]
pub struct TrackedExecutor(TaskTracker);

impl TrackedExecutor {
    pub fn new(tasks: TaskTracker) -> TrackedExecutor {
        TrackedExecutor(tasks)
    }
}

impl<F> hyper::rt::Executor<F> for TrackedExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(fut);
    }
}

/// A future that is polled only when its own waker fired (and on the first
/// poll), however often the task that holds it is polled.
///
/// `select!` and hand-written combinators poll every branch each time
/// their task wakes. A connection's task wakes once or twice per request
/// (and once per watch event it delivers), while its shutdown signal fires
/// once in the proxy's life; yet polling a `CancellationToken`'s
/// `cancelled()` locks the token's mutex and its `Notify`'s, both shared by
/// every connection on every serving thread. Behind `OnWake` such a poll
/// reads one atomic of the connection's own instead.
pub struct OnWake<F> {
    fut: Pin<Box<F>>,
    signal: Arc<WakeSignal>,
    /// `signal` as a waker, made once.
    inner: Waker,
    /// The task's waker last registered with `signal`.
    outer: Option<Waker>,
}

/// Set when `fut`'s waker fires; wakes the task that holds the `OnWake`.
struct WakeSignal {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for WakeSignal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> OnWake<F> {
    pub fn new(fut: F) -> OnWake<F> {
        let signal = Arc::new(WakeSignal {
            // The first poll polls `fut`.
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        OnWake {
            fut: Box::pin(fut),
            inner: Waker::from(signal.clone()),
            signal,
            outer: None,
        }
    }
}

impl<F: Future> Future for OnWake<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let signal = &this.signal;
        let woken = signal.woken.load(Ordering::Acquire);
        if !woken && this.outer.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        // Woken (a wake takes the registered waker), or polled by another
        // task's waker (tokio's never changes for one task): register.
        signal.task.register(cx.waker());
        this.outer = Some(cx.waker().clone());
        // Not woken before: look again, since a wake before the register
        // went to the old waker.
        if !woken && !signal.woken.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        // Cleared before `fut` is polled: a wake from that poll on is kept.
        signal.woken.store(false, Ordering::Relaxed);
        this.fut
            .as_mut()
            .poll(&mut Context::from_waker(&this.inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    /// Counts its wakes.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Pending until `ready` is set; counts its polls and keeps the last
    /// waker it was given.
    #[derive(Default)]
    struct Probe {
        polls: AtomicUsize,
        ready: AtomicBool,
        waker: Mutex<Option<Waker>>,
    }

    fn probe(p: Arc<Probe>) -> impl Future<Output = ()> {
        std::future::poll_fn(move |cx| {
            p.polls.fetch_add(1, Ordering::SeqCst);
            *p.waker.lock().expect("probe lock") = Some(cx.waker().clone());
            if p.ready.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    fn fire(p: &Probe, ready: bool) {
        p.ready.store(ready, Ordering::SeqCst);
        let waker = p.waker.lock().expect("probe lock").take();
        waker.expect("the probe was polled").wake();
    }

    #[test]
    fn the_inner_future_is_polled_only_after_its_waker_fired() {
        let p = Arc::new(Probe::default());
        let mut fut = OnWake::new(probe(p.clone()));
        let task = Arc::new(Count::default());
        let waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        for _ in 0..10 {
            assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        }
        assert_eq!(
            p.polls.load(Ordering::SeqCst),
            1,
            "polled once, on the first poll"
        );

        // A wake that leaves it pending: polled once more, then quiet again.
        fire(&p, false);
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the task is woken");
        for _ in 0..10 {
            assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        }
        assert_eq!(p.polls.load(Ordering::SeqCst), 2);

        // The next wake still reaches the task (it re-registered), and the
        // output comes through.
        fire(&p, true);
        assert_eq!(task.0.load(Ordering::SeqCst), 2);
        assert!(Pin::new(&mut fut).poll(&mut cx).is_ready());
        assert_eq!(p.polls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_wake_goes_to_the_waker_of_the_latest_poll() {
        let p = Arc::new(Probe::default());
        let mut fut = OnWake::new(probe(p.clone()));
        let (a, b) = (Arc::new(Count::default()), Arc::new(Count::default()));
        let (wa, wb) = (Waker::from(a.clone()), Waker::from(b.clone()));
        assert!(
            Pin::new(&mut fut)
                .poll(&mut Context::from_waker(&wa))
                .is_pending()
        );
        assert!(
            Pin::new(&mut fut)
                .poll(&mut Context::from_waker(&wb))
                .is_pending()
        );
        assert_eq!(p.polls.load(Ordering::SeqCst), 1);
        fire(&p, true);
        assert_eq!(
            (a.0.load(Ordering::SeqCst), b.0.load(Ordering::SeqCst)),
            (0, 1)
        );
        assert!(
            Pin::new(&mut fut)
                .poll(&mut Context::from_waker(&wb))
                .is_ready()
        );
    }

    #[tokio::test]
    async fn a_cancelled_token_ends_the_wait() {
        let token = tokio_util::sync::CancellationToken::new();
        let waiting = tokio::spawn(OnWake::new(token.clone().cancelled_owned()));
        tokio::task::yield_now().await;
        token.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .expect("ends once cancelled")
            .expect("the task");
    }
}
