//! The wake-ups a request and the HTTP/1.1 connection it drives give each
//! other, kept inside the request's task.
//!
//! A unary request drives its upstream connection itself (see `pool::H1`):
//! one task polls both the connection and the request's side of it (the
//! sender's readiness, the response, its body). When one of them wakes the
//! other while the task polls them — the connection's "ready for the next
//! request", a body's "want more" — the waker is the task's own, and a task
//! that wakes itself is, to tokio, a task that yields: it goes to the back
//! of the queue and an idle worker is woken to take it. At one client that
//! was two futex wake-ups (and two context switches on the other core) per
//! request. Polled through [`Redrive::poll`], such a wake-up re-polls at
//! once, in the same poll; only wake-ups from outside (the socket, a timer)
//! reach the task.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Polls past this many self-wake-ups in one go (or past the task's tokio
/// budget) yield to the runtime after all: a connection that keeps waking
/// itself must not starve the others.
const MAX_ROUNDS: usize = 8;

pub(super) struct Redrive {
    state: Arc<State>,
    /// `state` as a waker, made once.
    waker: Waker,
}

struct State {
    /// Set while [`Redrive::poll`] polls: a wake-up then only asks for
    /// another round.
    polling: AtomicBool,
    again: AtomicBool,
    /// The task that polled last.
    task: AtomicWaker,
}

impl Wake for State {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.polling.load(Ordering::SeqCst) {
            self.again.store(true, Ordering::SeqCst);
        } else {
            self.task.wake();
        }
    }
}

impl Redrive {
    pub(super) fn new() -> Redrive {
        let state = Arc::new(State {
            polling: AtomicBool::new(false),
            again: AtomicBool::new(false),
            task: AtomicWaker::new(),
        });
        Redrive {
            waker: Waker::from(state.clone()),
            state,
        }
    }

    /// Polls `f` with a waker of its own (see the module's text), again
    /// while it woke itself, up to [`MAX_ROUNDS`] times and while the task
    /// has budget left.
    pub(super) fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        mut f: impl FnMut(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        let state = &self.state;
        state.task.register(cx.waker());
        let mut own = Context::from_waker(&self.waker);
        for _ in 0..MAX_ROUNDS {
            state.again.store(false, Ordering::SeqCst);
            state.polling.store(true, Ordering::SeqCst);
            let res = f(&mut own);
            state.polling.store(false, Ordering::SeqCst);
            // A wake-up after this point reaches the task itself.
            if res.is_ready() || !state.again.swap(false, Ordering::SeqCst) {
                return res;
            }
            // Out of tokio's budget for this poll, the I/O resources answer
            // Pending (and wake) until the task has yielded: yield now.
            if !tokio::task::coop::has_budget_remaining() {
                break;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts the task's wake-ups.
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_wake_up_while_polled_re_polls_at_once_and_later_ones_reach_the_task() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let task = Waker::from(count.clone());
        let mut cx = Context::from_waker(&task);
        let r = Redrive::new();
        // Wakes itself twice, then is ready: three rounds, no task wake-up.
        let mut rounds = 0;
        let res = r.poll(&mut cx, |cx| {
            rounds += 1;
            if rounds < 3 {
                cx.waker().wake_by_ref();
                Poll::Pending
            } else {
                Poll::Ready(rounds)
            }
        });
        assert_eq!(res, Poll::Ready(3));
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        // Pending without waking itself: one round; the waker it kept
        // (as a socket would) reaches the task afterwards.
        let mut kept = None;
        let res: Poll<()> = r.poll(&mut cx, |cx| {
            kept = Some(cx.waker().clone());
            Poll::Pending
        });
        assert_eq!(res, Poll::Pending);
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        kept.expect("kept").wake();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        // Waking itself forever: yields to the runtime after MAX_ROUNDS.
        let mut n = 0;
        let res: Poll<()> = r.poll(&mut cx, |cx| {
            n += 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        });
        assert_eq!(res, Poll::Pending);
        assert_eq!(n, MAX_ROUNDS);
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
    }
}
