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
