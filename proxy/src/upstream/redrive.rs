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
use std::sync::atomic::{AtomicU8, Ordering};
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
    /// [`IDLE`], [`POLLING`] or [`WOKEN`]: one atomic, so that a wake-up
    /// and the end of a round cannot miss each other.
    round: AtomicU8,
    /// The task that polled last.
    task: AtomicWaker,
}

/// Not being polled: a wake-up goes to the task.
const IDLE: u8 = 0;
/// Being polled, not woken yet.
const POLLING: u8 = 1;
/// Being polled, and woken meanwhile: the poll goes another round.
const WOKEN: u8 = 2;

impl Wake for State {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // One compare-and-swap decides: either the round is still on and
        // will see WOKEN when it ends, or it has ended (IDLE) and the task
        // is woken. A load followed by a store could do neither: the round
        // could end between them, and the wake-up would wait in the flag
        // until something else woke the task (seen: a request stalled until
        // its 60 s response timeout polled it, then succeeded).
        if let Err(IDLE) =
            self.round
                .compare_exchange(POLLING, WOKEN, Ordering::AcqRel, Ordering::Acquire)
        {
            self.task.wake();
        }
    }
}

impl Redrive {
    pub(super) fn new() -> Redrive {
        let state = Arc::new(State {
            round: AtomicU8::new(IDLE),
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
            state.round.store(POLLING, Ordering::Release);
            let res = f(&mut own);
            // A wake-up after this swap reaches the task itself.
            let woken = state.round.swap(IDLE, Ordering::AcqRel) == WOKEN;
            if res.is_ready() || !woken {
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
    use std::sync::atomic::{AtomicU64, AtomicUsize};

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

    /// A wake-up from another thread as a round ends is never lost: it
    /// either gives the poll another round or reaches the task. (With a
    /// flag read and then written, a wake-up that read "polling" before the
    /// round ended and wrote its flag after was seen by neither: with the
    /// two threads released together and each delayed by a few to a few
    /// hundred spins, that version lost hundreds of these races.)
    #[test]
    fn a_wake_up_racing_the_end_of_a_round_is_never_lost() {
        use std::sync::Mutex;
        const RUNS: u64 = 50_000;
        // The waking thread waits until `go` reaches the run's number, so
        // that the two leave together; each then spins a varying while.
        // Waits spin, then yield (CI's cores are shared).
        fn wait_for(flag: &AtomicU64, run: u64) {
            let mut spins = 0;
            while flag.load(Ordering::Acquire) < run {
                if spins < 10_000 {
                    spins += 1;
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
        let go = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let kept: Arc<Mutex<Option<Waker>>> = Arc::default();
        let spin = |n: u64| {
            for _ in 0..n {
                std::hint::spin_loop();
            }
        };
        let waking = std::thread::spawn({
            let (go, done, kept) = (go.clone(), done.clone(), kept.clone());
            move || {
                for run in 1..=RUNS {
                    wait_for(&go, run);
                    let waker = kept.lock().expect("lock").take().expect("kept");
                    spin(run * 7 % 200);
                    waker.wake();
                    done.store(run, Ordering::Release);
                }
            }
        });
        let mut lost = 0;
        for run in 1..=RUNS {
            let count = Arc::new(Count(AtomicUsize::new(0)));
            let task = Waker::from(count.clone());
            let mut cx = Context::from_waker(&task);
            let r = Redrive::new();
            let mut rounds = 0;
            let res: Poll<()> = r.poll(&mut cx, |cx| {
                rounds += 1;
                if rounds == 1 {
                    *kept.lock().expect("lock") = Some(cx.waker().clone());
                    // The other thread wakes from here on, racing the end
                    // of this round.
                    go.store(run, Ordering::Release);
                    spin(run * 13 % 200);
                }
                Poll::Pending
            });
            wait_for(&done, run);
            assert_eq!(res, Poll::Pending);
            let woken = count.0.load(Ordering::SeqCst);
            // Exactly one of: another round, or the task woken.
            match (rounds, woken) {
                (2, 0) | (1, 1) => {}
                (1, 0) => lost += 1,
                other => panic!("unexpected (rounds, task wake-ups): {other:?}"),
            }
        }
        waking.join().expect("waking thread");
        assert_eq!(lost, 0, "wake-ups lost in {RUNS} races");
    }
}
