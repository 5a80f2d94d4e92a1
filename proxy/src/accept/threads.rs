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

use std::future::Future;
use std::num::NonZeroUsize;

use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;

/// A small runtime of its own. Dropping it stops its threads without
/// waiting.
pub struct SideRuntime {
    rt: Option<Runtime>,
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

    fn build(builder: &mut tokio::runtime::Builder) -> std::io::Result<SideRuntime> {
        Ok(SideRuntime {
            rt: Some(builder.build()?),
        })
    }

    /// Runs `fut` there.
    pub fn spawn<F>(&self, fut: F) -> Option<JoinHandle<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.rt.as_ref().map(|rt| rt.spawn(fut))
    }

    /// A handle to spawn there.
    pub fn handle(&self) -> Option<Handle> {
        self.rt.as_ref().map(|rt| rt.handle().clone())
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
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
