//! Where TLS handshakes run: threads of their own, beside the runtime that
//! serves established connections.
//!
//! In a storm, thousands of handshakes (a signature each) arrive at once.
//! On the serving runtime they took its workers in turn with the requests
//! of established connections, and the admin's GET waited behind them in
//! the runtime's queues. Here a handshake's CPU work never enters those
//! queues: the serving workers stay free for requests, and the kernel
//! shares the cores between the two sets of threads. Measured with
//! `loadtest storm --through-breakwater --agents 5000` on 2 cores, 3 runs
//! each (docs/architecture.md, "The admin under a handshake storm"):
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
//! the storm: the threads run at normal priority.

use std::future::Future;
use std::num::NonZeroUsize;

use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

/// The handshake threads. Dropping it stops them without waiting.
pub struct Handshakes {
    rt: Option<Runtime>,
}

impl Handshakes {
    /// `threads` threads (the handshake slots' count: more could not work
    /// at once anyway).
    pub fn new(threads: NonZeroUsize) -> std::io::Result<Handshakes> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.get())
            .thread_name("bw-handshake")
            .enable_time()
            .build()?;
        Ok(Handshakes { rt: Some(rt) })
    }

    /// Runs a handshake there. Its socket stays registered with the serving
    /// runtime's I/O driver, which wakes it wherever it is polled.
    pub fn spawn<F>(&self, fut: F) -> Option<JoinHandle<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.rt.as_ref().map(|rt| rt.spawn(fut))
    }
}

impl Drop for Handshakes {
    fn drop(&mut self) {
        // May be dropped on a runtime thread, where a blocking shutdown
        // would panic; handshakes still running are dropped with it.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
