//! Connection admission: what a new connection must pass before the proxy
//! spends anything on it, and the slots that bound TLS handshake work.
//!
//! A DaemonSet storm is thousands of new TLS connections at once, all before
//! any authentication, so no limit keyed on identity can see them. Each
//! handshake costs a signature or two (a millisecond of CPU for RSA-2048);
//! unbounded they take every core, and the requests of established clients,
//! the admin's kubectl among them, wait behind them. In the order they apply:
//!
//! 1. **accept rate per source** (governor, keyed by IP; off by default): a
//!    source that opens connections faster than that is refused;
//! 2. **open connections** (`max_connections`, 20,000): the proxy's whole
//!    budget of sockets, tasks and buffers;
//! 3. **open connections per source** (`max_connections_per_source`, off by
//!    default): one host cannot take the whole budget.
//!
//! Over any of them the socket is closed at once, before a byte is read (no
//! TLS alert and no HTTP answer: nothing has been said yet, and a client
//! retries a closed connection as it would a refused one), and the refusal is
//! counted in `breakwater_connections_refused_total{reason}`.
//!
//! 4. **handshake slots** ([`SlotIo`], `max_handshakes`, the number of cores):
//!    a handshake holds a slot only while rustls works on bytes that have
//!    arrived (parsing the ClientHello, signing, verifying a client chain),
//!    never while it waits for the network. A client that connects and stays
//!    silent, or sends its ClientHello and stalls, holds no slot; a
//!    connection waiting for a slot is a parked task (no CPU), and the wait
//!    counts against the 10 s handshake timeout. Established connections
//!    never take a slot, so their requests never queue behind handshakes:
//!    at most `max_handshakes` cores do handshake work at any moment.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::PollSemaphore;

use crate::pacing::{self, KeyedLimiter};

/// Past this many sources in the accept-rate map, it is pruned at once
/// rather than at the next upkeep. Each key is a source that completed a TCP
/// handshake within its bucket's window, so this is reached only by a flood
/// from that many addresses.
const MAX_RATE_SOURCES: usize = 100_000;

/// The caps on new connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open client connections, all listeners together.
    pub max_connections: NonZeroUsize,
    /// Open client connections from one IP address; 0 = no cap.
    pub max_connections_per_source: usize,
    /// TLS handshakes doing work at once.
    pub max_handshakes: NonZeroUsize,
    /// Serving shards ([`threads::Shards`]); 0: none.
    pub serving_threads: usize,
    /// New connections per second from one IP address; `None` = no cap.
    pub accept_rate_per_source: Option<AcceptRate>,
}

/// A rate of new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptRate {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

impl ConnectionLimits {
    /// The number of cores: the most handshake work that can run at once
    /// anyway; more slots would only let handshakes crowd out requests.
    pub fn default_max_handshakes() -> NonZeroUsize {
        std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
    }
}

impl Default for ConnectionLimits {
    fn default() -> ConnectionLimits {
        ConnectionLimits {
            // A connection costs a task and a few KiB of buffers; 20,000
            // covers a 5,000-node cluster's kubelets, proxies and agents
            // with room, and bounds what a flood can make us hold.
            max_connections: NonZeroUsize::new(20_000).expect("20000 is not zero"),
            // Off: a NAT or a load balancer puts a whole fleet behind one
            // address (and so does a lab that runs its agents on one host);
            // a default cap would close a legitimate fleet's connections.
            // Operators whose nodes reach the proxy with their own
            // addresses set it (docs/operations.md).
            max_connections_per_source: 0,
            max_handshakes: ConnectionLimits::default_max_handshakes(),
            // One per core, as nginx's `worker_processes auto`.
            serving_threads: ConnectionLimits::default_max_handshakes().get(),
            accept_rate_per_source: None,
        }
    }
}

/// Why a new connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    AcceptRate,
    MaxConnections,
    PerSource,
}

impl Refused {
    /// The `reason` label of `breakwater_connections_refused_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::AcceptRate => "accept_rate",
            Refused::MaxConnections => "max_connections",
            Refused::PerSource => "per_source",
        }
    }
}

/// Who holds the open connections.
#[derive(Default)]
struct Open {
    total: usize,
    /// Only sources with a connection open (and only when the per-source
    /// cap is on): bounded by `max_connections`.
    by_source: HashMap<IpAddr, usize>,
}

/// Admission for new connections, shared by the listeners.
pub struct Gate {
    limits: ConnectionLimits,
    /// One short critical section per accept and per close; never held
    /// across an await.
    open: Mutex<Open>,
    rate: Option<KeyedLimiter<IpAddr>>,
    handshakes: Arc<Semaphore>,
    /// The threads handshakes run on (`None`: they could not be started,
    /// and handshakes run on the serving runtime).
    threads: Option<threads::SideRuntime>,
    open_gauge: metrics::Gauge,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Gate {
    pub fn new(limits: ConnectionLimits) -> Arc<Gate> {
        Arc::new(Gate {
            rate: limits
                .accept_rate_per_source
                .map(|r| pacing::keyed(r.per_second, r.burst)),
            handshakes: Arc::new(Semaphore::new(limits.max_handshakes.get())),
            threads: match threads::SideRuntime::handshakes(limits.max_handshakes) {
                Ok(threads) => Some(threads),
                Err(err) => {
                    tracing::warn!(error = %crate::error::Chain(&err), "no handshake threads; handshakes share the serving runtime");
                    None
                }
            },
            open: Mutex::new(Open::default()),
            open_gauge: metrics::gauge!("breakwater_client_connections"),
            limits,
        })
    }

    /// Admits a connection from `peer`, or says why not (and counts it).
    /// The connection counts as open until the [`Admitted`] is dropped.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admitted, Refused> {
        // One host, one key, whether it came as IPv4 or IPv4-mapped IPv6.
        let source = peer.to_canonical();
        let refused = self.check(source);
        if let Err(reason) = refused {
            metrics::counter!("breakwater_connections_refused_total", "reason" => reason.as_str())
                .increment(1);
            return Err(reason);
        }
        self.open_gauge.increment(1.0);
        Ok(Admitted {
            gate: self.clone(),
            source,
        })
    }

    fn check(&self, source: IpAddr) -> Result<(), Refused> {
        // The rate first: it counts attempts, so a source that hammers on a
        // full proxy is paced too.
        if let Some(rate) = &self.rate {
            if rate.len() > MAX_RATE_SOURCES {
                rate.retain_recent();
            }
            rate.check_key(&source).map_err(|_| Refused::AcceptRate)?;
        }
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.total >= self.limits.max_connections.get() {
            return Err(Refused::MaxConnections);
        }
        let per_source = self.limits.max_connections_per_source;
        if per_source != 0 {
            let count = open.by_source.entry(source).or_insert(0);
            if *count >= per_source {
                return Err(Refused::PerSource);
            }
            *count += 1;
        }
        open.total += 1;
        Ok(())
    }

    /// Runs a TLS handshake on the handshake threads (see
    /// [`threads`]); `None` if it could not finish there (they are
    /// shutting down).
    pub async fn handshake<F>(&self, fut: F) -> Option<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.threads {
            Some(threads) => threads.spawn(fut).await.ok(),
            None => Some(fut.await),
        }
    }

    /// The slots TLS handshakes take while they work ([`SlotIo`]).
    pub fn handshake_slots(&self) -> Arc<Semaphore> {
        self.handshakes.clone()
    }

    /// Forgets the accept-rate state of sources whose bucket is full again
    /// (called periodically; the map only grows otherwise).
    pub fn upkeep(&self) {
        if let Some(rate) = &self.rate {
            rate.retain_recent();
            rate.shrink_to_fit();
        }
    }

    /// Open connections (all sources), for tests and stats.
    pub fn open(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }

    fn close(&self, source: IpAddr) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.total = open.total.saturating_sub(1);
        if let Some(count) = open.by_source.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                open.by_source.remove(&source);
            }
        }
        drop(open);
        self.open_gauge.decrement(1.0);
    }
}

/// An admitted connection: it counts against the caps until dropped.
pub struct Admitted {
    gate: Arc<Gate>,
    source: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.gate.close(self.source);
    }
}

/// A client's TCP stream that, during the TLS handshake, reads only while it
/// holds a handshake slot, and gives the slot back as soon as it would wait
/// for the network.
///
/// rustls does a handshake's CPU work right after a read returns bytes (in
/// tokio-rustls, `read_tls` then `process_new_packets`, in the same poll),
/// so holding the slot from the read that returns bytes to the next read
/// or write that would block covers exactly that work. Once the handshake is
/// done, [`SlotIo::handshake_done`] drops the gating: the connection's
/// requests never touch a slot, and an idle connection carries one empty
/// pointer for it.
pub struct SlotIo {
    tcp: TcpStream,
    gating: Option<Box<Gating>>,
}

struct Gating {
    slots: PollSemaphore,
    slot: Option<OwnedSemaphorePermit>,
    waiting: metrics::Gauge,
    /// Whether this connection is counted in `waiting`.
    counted: bool,
}

impl Gating {
    fn set_waiting(&mut self, waiting: bool) {
        if waiting != self.counted {
            self.counted = waiting;
            if waiting {
                self.waiting.increment(1.0);
            } else {
                self.waiting.decrement(1.0);
            }
        }
    }
}

impl Drop for Gating {
    fn drop(&mut self) {
        self.set_waiting(false);
    }
}

impl SlotIo {
    /// `tcp`, gated by `slots` until [`SlotIo::handshake_done`].
    pub fn new(tcp: TcpStream, slots: Arc<Semaphore>) -> SlotIo {
        SlotIo {
            tcp,
            gating: Some(Box::new(Gating {
                slots: PollSemaphore::new(slots),
                slot: None,
                waiting: metrics::gauge!("breakwater_tls_handshakes_waiting"),
                counted: false,
            })),
        }
    }

    /// The handshake is over: the slot goes back, and reads and writes go
    /// straight to the socket from now on.
    pub fn handshake_done(&mut self) {
        self.gating = None;
    }

    /// Moves the socket to the I/O driver of the runtime this is called on
    /// (from the one it was accepted on), so that its readiness wakes that
    /// runtime alone. On an error the socket stays where it was, and still
    /// works from here (a wake then crosses runtimes).
    pub fn rehome(&mut self) -> io::Result<()> {
        use std::os::fd::AsFd;
        // A second descriptor of the same socket, registered here; dropping
        // the first deregisters it from the old driver and closes it.
        let fd = self.tcp.as_fd().try_clone_to_owned()?;
        self.tcp = TcpStream::from_std(std::net::TcpStream::from(fd))?;
        Ok(())
    }

    /// Whether this stream currently holds a handshake slot.
    pub fn holds_slot(&self) -> bool {
        self.gating.as_ref().is_some_and(|g| g.slot.is_some())
    }
}

impl AsyncRead for SlotIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(gating) = this.gating.as_deref_mut() else {
            return Pin::new(&mut this.tcp).poll_read(cx, buf);
        };
        if gating.slot.is_none() {
            // Wait for bytes holding nothing, then for a slot to work on
            // them (the bytes wait in the kernel meanwhile).
            ready!(this.tcp.poll_read_ready(cx))?;
            gating.set_waiting(true);
            match ready!(gating.slots.poll_acquire(cx)) {
                Some(slot) => gating.slot = Some(slot),
                None => return Poll::Ready(Err(io::Error::other("handshake slots closed"))),
            }
            gating.set_waiting(false);
        }
        let res = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if res.is_pending() {
            // Nothing to work on: waiting for the network holds no slot.
            gating.slot = None;
        }
        res
    }
}

impl AsyncWrite for SlotIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.tcp).poll_write(cx, buf);
        if res.is_pending()
            && let Some(gating) = this.gating.as_deref_mut()
        {
            // A client that does not read our flight holds no slot either.
            gating.slot = None;
        }
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        if res.is_pending()
            && let Some(gating) = this.gating.as_deref_mut()
        {
            gating.slot = None;
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// Prunes the accept-rate map every `every` until `stop`.
pub async fn upkeep(
    gate: Arc<Gate>,
    every: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => gate.upkeep(),
        }
    }
}

pub mod peek;
#[cfg(test)]
mod tests;
pub mod threads;
