//! Threads of their own beside the runtime that serves established
//! connections: one set for TLS handshakes, one for the connections of
//! privileged callers.
//!
//! **Handshakes.** In a storm, thousands of handshakes (a signature each)
//! arrive at once. On the serving runtime they took its workers in turn with
//! the requests of established connections, and the admin's GET waited
//! behind them in the runtime's queues. On threads of their own a
//! handshake's CPU work never enters those queues: the serving workers stay
//! free for requests, and the kernel shares the cores between the two sets
//! of threads. Measured with `loadtest storm --through-breakwater --agents
//! 5000` on 2 cores, 3 runs each (docs/architecture.md, "The admin under a
//! handshake storm"):
//!
//! | handshakes run | all watching | admin p99 |
//! |---|---|---|
//! | on the serving runtime (2 slots) | 5.0–5.5 s | 1.1–2.5 s |
//! | on 2 threads of their own | 4.3–4.8 s | 138–221 ms |
//! | on 2 threads, nice +10 | 4.7–6.6 s | 100–655 ms |
//! | on 2 threads, nice +19 | 7.0–7.8 s | 92–215 ms |
//! | on 1 thread of its own | 5.7–6.5 s | 229–388 ms |
//!
//! A lower OS priority bought nothing the separation had not, and slowed
//! the storm: the threads run at normal priority. A handshake's socket stays
//! registered with the serving runtime's I/O driver, which wakes it wherever
//! it is polled.
//!
//! **Privileged connections.** Past the handshakes, the serving runtime's
//! queue holds the storm's own requests: thousands of LISTs answered from
//! the hub's cache and watches being set up. A request of the admin that
//! becomes ready waits behind all of them, and so does the upstream
//! connection that carries it. A connection whose client certificate, or
//! whose first request's bearer token ([`super::peek`]), names an identity
//! with an exempt rule is therefore served on a runtime of its own (one
//! thread, its own I/O driver and timers: see `server::serve_connection`),
//! and the upstream lane of exempt requests
//! opens its connections there. Measured in docs/architecture.md, "The
//! admin under a handshake storm".

use std::cell::Cell;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;

/// A small runtime of its own. Dropping it stops its threads without
/// waiting.
pub struct SideRuntime {
    handle: Handle,
    owner: Owner,
}

/// What stops a [`SideRuntime`] when dropped.
enum Owner {
    /// A multi-thread runtime, shut down without waiting (taken on drop).
    Runtime(Option<Runtime>),
    /// A current-thread runtime's own thread, which runs it until this
    /// sender is dropped.
    Thread {
        _stop: tokio::sync::oneshot::Sender<()>,
    },
}

impl SideRuntime {
    /// The handshake threads: `threads` of them (the handshake slots'
    /// count: more could not work at once anyway), timers only (their
    /// sockets belong to the serving runtime's I/O driver).
    pub fn handshakes(threads: NonZeroUsize) -> std::io::Result<SideRuntime> {
        Self::build(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads.get())
                .thread_name("bw-handshake")
                .enable_time(),
        )
    }

    /// The runtime of privileged connections: one thread with its own I/O
    /// driver, so that their sockets, and the upstream connections of the
    /// exempt lane, wake it and nothing else.
    pub fn privileged() -> std::io::Result<SideRuntime> {
        Self::build(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("bw-privileged")
                .enable_all(),
        )
    }

    /// A serving shard: one thread with its own I/O driver and timers
    /// ([`Shards`]), a current-thread runtime that the thread drives.
    ///
    /// Not a multi-thread runtime of one worker: that one runs a task
    /// woken by the running task next (its LIFO slot). A stream's task
    /// wakes its HTTP/2 connection's task when it queues an answer, so the
    /// connection wrote each answer alone, before the next stream's task
    /// ran. Here the woken connection task queues behind the streams whose
    /// upstream answers came in the same batch of I/O events, and writes
    /// all their frames at once (with the vendored h2's coalescing,
    /// vendor/README.md): `writev` per proxied GET over HTTP/2 2.08 → 1.18,
    /// CPU per request 19–20 → 15.4–17.9 µs (docs/benchmarks.md §1k).
    fn shard(index: usize, busy: Arc<Busy>) -> std::io::Result<SideRuntime> {
        let unparked = busy.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .on_thread_park(move || busy.parked())
            .on_thread_unpark(move || unparked.unparked())
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("bw-serve-{index}"))
            .spawn(move || {
                ON_SHARD.set(true);
                rt.block_on(async {
                    let _ = stopped.await;
                });
                rt.shutdown_background();
            })?;
        Ok(SideRuntime {
            handle,
            owner: Owner::Thread { _stop: stop },
        })
    }

    fn build(builder: &mut tokio::runtime::Builder) -> std::io::Result<SideRuntime> {
        let rt = builder.build()?;
        Ok(SideRuntime {
            handle: rt.handle().clone(),
            owner: Owner::Runtime(Some(rt)),
        })
    }

    /// Runs `fut` there.
    pub fn spawn<F>(&self, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(fut)
    }

    /// A handle to spawn there.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }
}

impl std::fmt::Debug for SideRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SideRuntime").finish_non_exhaustive()
    }
}

impl Drop for SideRuntime {
    fn drop(&mut self) {
        // May be dropped on a runtime thread, where a blocking shutdown
        // would panic; tasks still running are dropped with it.
        if let Owner::Runtime(rt) = &mut self.owner
            && let Some(rt) = rt.take()
        {
            rt.shutdown_background();
        }
    }
}

thread_local! {
    static ON_SHARD: Cell<bool> = const { Cell::new(false) };
}

/// Whether the current thread is a serving shard's ([`Shards`]).
pub fn on_shard() -> bool {
    ON_SHARD.get()
}

/// The serving shards' runtimes. Owned by the proxy's shutdown task alone
/// and dropped once every task has ended; [`Shards`] only spawns there.
#[derive(Debug, Default)]
pub struct ShardRuntimes {
    _runtimes: Vec<SideRuntime>,
}

/// The runtimes that serve client connections: one thread each, with its
/// own I/O driver and timers, as many as the cores by default
/// (`--serving-threads`).
///
/// A connection lives on one shard from accept to close: its TLS, its
/// HTTP/2 streams' tasks, and the HTTP/1.1 upstream connections its unary
/// requests open (`upstream::pool`, the unary lane) all wake that one
/// thread. On one work-stealing runtime of two workers they bounced between
/// the cores (the stream's task on one, its connection's on the other, the
/// upstream socket's readiness on either), and the proxy's CPU per request
/// was bimodal: about 22 µs, or 30–32 µs in about a third of the runs
/// (HTTP/2, 64 streams on 4 connections; nginx 20–23 µs). On shards it
/// was 19.6–22.1 µs in 9 runs (docs/benchmarks.md §1j). nginx's workers
/// share nothing either.
///
/// The price is nginx's: a connection cannot move to an idle core, and one
/// client that alone needs more than a core gets one core. A new connection
/// goes to the first shard that is less than half busy ([`PACK_BELOW`])
/// and holds at most [`SLACK`] more connections than the one with the
/// fewest; when every shard is busier, to the one with the fewest. A few
/// busy connections then share one thread until it is half busy, as they
/// share an nginx worker: spread over two threads, each idled and woke
/// twice as often (HTTP/2, 4 connections: 0.46 `epoll_wait` per request
/// against 0.34, +10% CPU per request). And a fleet's connections spread
/// evenly, never more than [`SLACK`] apart.
#[derive(Clone, Debug, Default)]
pub struct Shards {
    shards: Arc<[Arc<Shard>]>,
    next: Arc<AtomicUsize>,
}

#[derive(Debug)]
struct Shard {
    handle: Handle,
    /// Connections open there.
    open: AtomicUsize,
    /// The same, as `breakwater_serving_thread_connections{thread}`.
    gauge: metrics::Gauge,
    /// The time its thread runs.
    busy: Arc<Busy>,
    /// Its load over the last [`LOAD_WINDOW`] or so.
    load: Mutex<Load>,
}

/// A shard is packed with new connections while it is less busy than this.
pub const PACK_BELOW: f64 = 0.5;
/// Most connections a shard holds over the one with the fewest.
pub const SLACK: usize = 8;
/// How often a shard's load is measured anew (when a connection comes).
const LOAD_WINDOW: Duration = Duration::from_millis(100);
const PARKED: u64 = u64::MAX;

/// The time a shard's thread spends unparked (running tasks or polling
/// its I/O driver), kept by the runtime's park and unpark hooks.
#[derive(Debug)]
struct Busy {
    epoch: Instant,
    /// Nanoseconds since `epoch` when it last unparked; [`PARKED`] while
    /// parked.
    since: AtomicU64,
    /// Nanoseconds unparked over the intervals that ended.
    total: AtomicU64,
}

impl Busy {
    /// Running from now: a thread runs from its start until it first
    /// parks, and work spawned before that runs without an unpark.
    fn new() -> Busy {
        Busy {
            epoch: Instant::now(),
            since: AtomicU64::new(0),
            total: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(PARKED - 1)
    }

    fn unparked(&self) {
        self.since.store(self.now(), Ordering::Relaxed);
    }

    fn parked(&self) {
        let now = self.now();
        let since = self.since.swap(PARKED, Ordering::Relaxed);
        if since != PARKED {
            self.total
                .fetch_add(now.saturating_sub(since), Ordering::Relaxed);
        }
    }

    /// (now, nanoseconds unparked so far, the current interval included).
    fn so_far(&self) -> (u64, u64) {
        let now = self.now();
        let running = match self.since.load(Ordering::Relaxed) {
            PARKED => 0,
            since => now.saturating_sub(since),
        };
        (now, self.total.load(Ordering::Relaxed) + running)
    }
}

/// The last measure of a shard's load.
#[derive(Debug, Default)]
struct Load {
    at: u64,
    busy: u64,
    fraction: f64,
}

impl Shard {
    /// The fraction of the time its thread ran, over the window that ended
    /// at the last measure (at most [`LOAD_WINDOW`] old).
    fn load(&self) -> f64 {
        let mut last = self.load.lock().unwrap_or_else(PoisonError::into_inner);
        let (now, busy) = self.busy.so_far();
        let window = now.saturating_sub(last.at);
        if u128::from(window) >= LOAD_WINDOW.as_nanos() {
            last.fraction = busy.saturating_sub(last.busy) as f64 / window as f64;
            last.at = now;
            last.busy = busy;
        }
        last.fraction
    }
}

/// A connection counted on its shard until dropped.
#[derive(Debug)]
pub struct ShardTicket(Arc<Shard>);

impl Drop for ShardTicket {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.gauge.decrement(1.0);
    }
}

impl Shards {
    /// `count` shards; none (connections stay on the runtime that accepts
    /// them) for 0.
    pub fn new(count: usize) -> std::io::Result<(ShardRuntimes, Shards)> {
        let mut runtimes = Vec::with_capacity(count);
        let mut shards = Vec::with_capacity(count);
        for index in 0..count {
            let busy = Arc::new(Busy::new());
            let rt = SideRuntime::shard(index, busy.clone())?;
            let handle = rt.handle();
            runtimes.push(rt);
            shards.push(Arc::new(Shard {
                handle,
                open: AtomicUsize::new(0),
                gauge: metrics::gauge!("breakwater_serving_thread_connections", "thread" => index.to_string()),
                busy,
                load: Mutex::default(),
            }));
        }
        Ok((
            ShardRuntimes {
                _runtimes: runtimes,
            },
            Shards {
                shards: shards.into(),
                next: Arc::default(),
            },
        ))
    }

    /// The connections open on each shard.
    pub fn open(&self) -> Vec<usize> {
        self.shards
            .iter()
            .map(|s| s.open.load(Ordering::Relaxed))
            .collect()
    }

    /// The shard a new connection goes to (see [`Shards`]). `None`
    /// without shards.
    pub fn pick(&self) -> Option<(Handle, ShardTicket)> {
        let n = self.shards.len();
        let open = |s: &Shard| s.open.load(Ordering::Relaxed);
        let fewest = self.shards.iter().map(|s| open(s)).min()?;
        let packed = self
            .shards
            .iter()
            .find(|s| open(s) <= fewest + SLACK && s.load() < PACK_BELOW);
        let shard = match packed {
            Some(shard) => shard,
            None => {
                let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
                (0..n)
                    .map(|i| &self.shards[(start + i) % n])
                    .min_by_key(|s| open(s))?
            }
        };
        shard.open.fetch_add(1, Ordering::Relaxed);
        shard.gauge.increment(1.0);
        Some((shard.handle.clone(), ShardTicket(shard.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which of `shards` each ticket counts on.
    fn placed(shards: &Shards, tickets: &[ShardTicket]) -> Vec<usize> {
        let mut open = vec![0; shards.shards.len()];
        for t in tickets {
            let i = shards
                .shards
                .iter()
                .position(|s| Arc::ptr_eq(s, &t.0))
                .expect("a shard of these");
            open[i] += 1;
        }
        open
    }

    #[test]
    fn idle_shards_fill_in_order_up_to_the_slack_over_the_fewest() {
        let (_runtimes, shards) = Shards::new(2).expect("shards");
        let mut tickets = Vec::new();
        for _ in 0..12 {
            tickets.push(shards.pick().expect("a shard").1);
        }
        // The first 9 (0 to 8 over the fewest), then one each.
        assert_eq!(placed(&shards, &tickets), vec![10, 2]);
        // A closed connection is forgotten: back to 9 over 2, within the
        // slack, so the next goes to the first again.
        tickets.swap_remove(0);
        tickets.push(shards.pick().expect("a shard").1);
        assert_eq!(placed(&shards, &tickets), vec![10, 2]);
        drop(tickets);
        assert!(
            shards
                .shards
                .iter()
                .all(|s| s.open.load(Ordering::Relaxed) == 0)
        );
    }

    #[test]
    fn a_busy_shard_is_passed_over_until_every_shard_is_busy() {
        let (_runtimes, shards) = Shards::new(2).expect("shards");
        // Take the first shard's thread for 600 ms (as a connection's
        // work would), and let a measure window pass within it.
        let (taken_tx, taken) = std::sync::mpsc::channel();
        let first = shards.shards[0].handle.clone();
        first.spawn(async move {
            let _ = taken_tx.send(());
            std::thread::sleep(Duration::from_millis(600));
        });
        taken.recv().expect("the first shard runs");
        let _ = shards.shards[0].load();
        std::thread::sleep(LOAD_WINDOW + Duration::from_millis(50));
        let (_, ticket) = shards.pick().expect("a shard");
        assert_eq!(placed(&shards, &[ticket]), vec![0, 1]);
    }
}
