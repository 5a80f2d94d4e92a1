//! Upstream connections with stream accounting, one pool per lane.
//!
//! The apiserver, like every Go HTTP/2 server, serves at most 250 concurrent
//! streams on one connection (`--http2-max-streams-per-connection`). A watch
//! holds its stream for as long as it lives, so a client that puts every
//! request on one connection stalls for good once 250 watches are open: each
//! new request waits for a stream that never frees. Go's client opens another
//! connection then. hyper-util's pool cannot: it keeps one HTTP/2 connection
//! per host and lets hyper queue requests for a free stream without bound,
//! and it exposes neither the peer's stream limit nor how many streams are in
//! use. So the proxy keeps its own pool of hyper `SendRequest` handles:
//!
//! - every connection knows the peer's `SETTINGS_MAX_CONCURRENT_STREAMS`
//!   (read from the connection after each poll) and how many streams it
//!   carries; a request takes a stream on the oldest connection with one free,
//!   else opens a new connection, up to the lane's cap (over HTTP/1.1, a free
//!   connection its thread used last comes first: its TLS state and buffers
//!   are still in that core's cache);
//! - at the cap, a request waits a short, bounded time for a stream, then is
//!   refused ([`PoolError::Saturated`], a 429 at the edge), never queued
//!   without bound;
//! - the stream is held until the response body ends or is dropped (an h2
//!   stream stays open as long as its response streams);
//! - an apiserver that speaks only HTTP/1.1 gets one request per connection,
//!   connections are kept alive and reused, and the cap is scaled so the lane
//!   carries as many requests as over HTTP/2.
//!
//! Lanes are separate pools (see [`Lane`]): watches never take the streams
//! that GETs need, and exempt identities keep a path of their own.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HOST;
use http::uri::Authority;
use http::{HeaderValue, Request, Response, Uri, Version};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::rt::TokioTimer;
use tokio::sync::Notify;
use tower::ServiceExt;

use super::lanes::{Lane, LaneLimits, LaneMetrics, LaneStats};
use super::redrive::Redrive;
use super::{Body, BoxError};
use crate::error::Chain;
use crate::tasks::{TaskTracker, TrackedExecutor};

/// Over HTTP/1.1 a connection carries one request at a time; a lane may open
/// this many of them for each HTTP/2 connection it would have had (Go's
/// default stream limit), so its capacity in requests stays the same.
const H1_CONNECTIONS_PER_H2: usize = 250;

/// Connecting (TCP, TLS, HTTP/2 preface) gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection without streams for this long is closed, except the lane's
/// last one (a storm's connections do not linger for ever).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How often a lane looks for idle connections to close.
const REAP_EVERY: Duration = Duration::from_secs(1);

/// The receive window of one upstream stream: 256 KiB, ample on the
/// loopback or LAN path to a co-located apiserver.
const STREAM_WINDOW: u32 = 256 * 1024;

/// The receive window of one upstream connection: room for a full window
/// on each of the 250 streams the apiserver allows (64 MiB).
const CONNECTION_WINDOW: u32 = 256 * STREAM_WINDOW;

/// HTTP/2 settings for the connections.
#[derive(Debug, Clone, Copy)]
pub struct H2Settings {
    pub keepalive: Duration,
}

/// Why a request got no upstream response.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection could be made.
    #[error("connecting to the apiserver failed")]
    Connect(#[source] BoxError),
    /// The connection broke before a response arrived.
    #[error("the upstream connection failed")]
    Send(#[source] hyper::Error),
    /// Every connection of the lane is full and the lane is at its cap.
    #[error(
        "all {connections} upstream connections of lane {} are full ({streams} streams in use)",
        lane.as_str()
    )]
    Saturated {
        lane: Lane,
        connections: usize,
        streams: usize,
    },
    /// The proxy is shutting down and closed the lane ([`Pool::close`]).
    #[error("the upstream connections of lane {} are closed", .0.as_str())]
    Closed(Lane),
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// A lane's connections to the apiserver.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    lane: Lane,
    connector: Connector,
    target: Uri,
    authority: Authority,
    limits: LaneLimits,
    h2: H2Settings,
    /// The proxy's tasks: connection drivers and connects run there.
    tasks: TaskTracker,
    /// The runtime the lane's connections live on (connect, I/O driver,
    /// h2 driver task); `None`: the caller's.
    home: Option<tokio::runtime::Handle>,
    /// A connection opened for a request on a serving shard lives on that
    /// shard instead ([`Pool::shard_local`]).
    shard_local: bool,
    state: Mutex<State>,
    /// Signalled when a stream frees, a connection lands or a connect fails.
    changed: Notify,
    metrics: LaneMetrics,
}

#[derive(Default)]
struct State {
    conns: Vec<Conn>,
    /// Connections being established.
    connecting: usize,
    /// The apiserver answered the last connection with HTTP/1.1.
    h1: bool,
    next_id: u64,
    /// Shut down: no new streams, no new connections.
    closed: bool,
    /// When `reap` may next look for idle connections.
    next_reap: Option<Instant>,
}

struct Conn {
    id: u64,
    tx: Tx,
    /// Streams (h2) or requests (h1, 0 or 1) in use.
    in_use: usize,
    /// The peer's current stream limit (h2), kept by the connection's driver.
    max: Arc<AtomicUsize>,
    idle_since: Option<Instant>,
    /// The thread that last took it ([`thread_tag`]).
    last_thread: u64,
    /// The thread that opened it: on a serving shard, the one whose I/O
    /// driver its socket is registered with.
    home_thread: u64,
}

enum Tx {
    H2(http2::SendRequest<Body>),
    /// `None` while a request uses the connection.
    H1(Option<H1>),
}

/// An HTTP/1.1 connection: its sender and the connection itself, which no
/// task of its own drives. The request that holds it drives it, while it
/// waits for its response and while its body is read ([`driving`],
/// [`ResponseBody`]), so a unary request's upstream exchange runs in the
/// task of the request: no hand-off to a connection task and back, which
/// cost a wake-up each way. An idle connection in the pool is not polled
/// (nothing happens on an idle HTTP/1.1 connection but its close, which the
/// next request finds: [`Pool::send`] then takes another, nothing sent).
struct H1 {
    tx: http1::SendRequest<Body>,
    conn: H1Driver,
    /// What the request polls of the connection, it polls through this.
    redrive: Redrive,
}

/// An HTTP/1.1 connection future; `None` once it has ended. A lock only to
/// make the response body `Sync`: one request holds it, uncontended.
type H1Driver = Mutex<Option<Pin<Box<H1Conn>>>>;
type H1Conn = http1::Connection<Io, Body>;

impl H1 {
    fn is_closed(&self) -> bool {
        self.tx.is_closed()
            || self
                .conn
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_none()
    }
}

/// Polls the connection (it reads and writes what it can).
fn drive(conn: &H1Driver, cx: &mut Context<'_>) {
    let mut conn = conn.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = conn.as_mut()
        && let Poll::Ready(res) = c.as_mut().poll(cx)
    {
        if let Err(e) = res {
            tracing::debug!(error = %Chain(&e), "upstream HTTP/1.1 connection ended with an error");
        }
        *conn = None;
    }
}

/// Polls `fut`, and beside it the connection whose sender it uses.
async fn driving<F: Future>(conn: &H1Driver, redrive: &Redrive, fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        redrive.poll(cx, |cx| {
            drive(conn, cx);
            fut.as_mut().poll(cx)
        })
    })
    .await
}

impl Conn {
    fn capacity(&self) -> usize {
        match &self.tx {
            Tx::H2(_) => self.max.load(Ordering::Relaxed),
            Tx::H1(_) => 1,
        }
    }

    fn is_open(&self) -> bool {
        match &self.tx {
            Tx::H2(tx) => !tx.is_closed(),
            Tx::H1(Some(h1)) => !h1.is_closed(),
            Tx::H1(None) => true,
        }
    }
}

/// A stream (or an HTTP/1.1 connection) held by one request until its
/// response ends.
struct Slot {
    pool: Arc<Inner>,
    conn: u64,
    h1: Option<H1>,
    /// The response was read to its end: an HTTP/1.1 connection may carry
    /// the next request.
    ended: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pool.release(self.conn, self.h1.take(), self.ended);
    }
}

enum Sender {
    H2(http2::SendRequest<Body>),
    H1,
}

impl Pool {
    pub fn new(
        lane: Lane,
        connector: Connector,
        target: Uri,
        limits: LaneLimits,
        h2: H2Settings,
        tasks: TaskTracker,
    ) -> Pool {
        let authority = target
            .authority()
            .cloned()
            .expect("the upstream URL was checked to have an authority");
        Pool {
            inner: Arc::new(Inner {
                lane,
                connector,
                target,
                authority,
                limits,
                h2,
                tasks,
                home: None,
                shard_local: false,
                state: Mutex::new(State::default()),
                changed: Notify::new(),
                metrics: LaneMetrics::new(lane),
            }),
        }
    }

    /// Connections and streams in use right now.
    /// The lane's connections live on `home` (see `Inner::home`). Only
    /// before the pool is shared.
    pub fn with_home(mut self, home: Option<tokio::runtime::Handle>) -> Pool {
        Arc::get_mut(&mut self.inner)
            .expect("a pool is homed before it is shared")
            .home = home;
        self
    }

    /// A connection opened for a request on a serving shard
    /// ([`crate::accept::threads::Shards`]) lives on that shard: its socket
    /// registers with the shard's I/O driver, and its readiness wakes the
    /// request's own thread (`take` gives that shard's requests only that
    /// shard's connections, below the cap). Only before the pool is shared.
    pub fn shard_local(mut self, on: bool) -> Pool {
        Arc::get_mut(&mut self.inner)
            .expect("a pool is set up before it is shared")
            .shard_local = on;
        self
    }

    pub fn stats(&self) -> LaneStats {
        let st = self.inner.lock();
        LaneStats {
            connections: st.conns.len(),
            streams: st.conns.iter().map(|c| c.in_use).sum(),
        }
    }

    /// Closes the lane at shutdown: idle connections end now (their driver
    /// tasks with them), connections that still carry a stream end with
    /// their last one, and requests from now on get [`PoolError::Closed`].
    /// Without this the idle connections (and their tasks, which the
    /// shutdown waits for) would live until the apiserver closed them.
    pub fn close(&self) {
        let mut st = self.inner.lock();
        st.closed = true;
        let conns = std::mem::take(&mut st.conns);
        drop(st);
        let streams: usize = conns.iter().map(|c| c.in_use).sum();
        self.inner.metrics.connections.decrement(conns.len() as f64);
        self.inner.metrics.streams.decrement(streams as f64);
        // Dropping the last `SendRequest` of a connection ends it: an h2
        // connection once its open streams are done, an h1 one at once
        // (a request in flight holds its sender in its slot).
        drop(conns);
        self.inner.changed.notify_waiters();
    }

    /// Sends a request whose URI is absolute (scheme and authority of the
    /// apiserver). The stream is held until the response body ends.
    pub async fn send(&self, mut req: Request<Body>) -> Result<Response<ResponseBody>, PoolError> {
        let mut retried = false;
        loop {
            let (mut slot, sender) = self.inner.acquire().await?;
            let result = match sender {
                Sender::H2(mut tx) => {
                    *req.version_mut() = Version::HTTP_2;
                    tx.try_send_request(req).await
                }
                Sender::H1 => {
                    origin_form(&mut req, &self.inner.authority);
                    let h1 = slot
                        .h1
                        .as_mut()
                        .expect("an HTTP/1.1 slot holds its connection");
                    let H1 { tx, conn, redrive } = h1;
                    // A connection returns to the pool as soon as its last
                    // response ended, before hyper has seen the end: it is
                    // ready once driven (at once, usually). Closed
                    // meanwhile: nothing was sent, take another.
                    let ready = driving(conn, redrive, tx.ready()).await;
                    if ready.is_err() {
                        self.inner.discard(slot.conn);
                        continue;
                    }
                    driving(conn, redrive, tx.try_send_request(req)).await
                }
            };
            match result {
                Ok(resp) => return Ok(resp.map(|b| ResponseBody::new(b, slot))),
                // A connection closing under us (GOAWAY, idle close) hands
                // the request back unsent: try once more on another one.
                Err(mut e) => match e.take_message() {
                    Some(back) if !retried => {
                        retried = true;
                        self.inner.discard(slot.conn);
                        req = back;
                    }
                    _ => return Err(PoolError::Send(e.into_error())),
                },
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves counters that are still
        // consistent enough to go on with; never poison the whole proxy.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a stream: on an open connection with room, else on a new
    /// connection, else after waiting for one to free.
    async fn acquire(self: &Arc<Self>) -> Result<(Slot, Sender), PoolError> {
        let mut deadline: Option<Instant> = None;
        loop {
            // Register interest before looking, so a stream freed between the
            // look and the wait is not missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let connect = {
                let mut st = self.lock();
                if st.closed {
                    return Err(PoolError::Closed(self.lane));
                }
                self.reap(&mut st);
                if let Some(taken) = self.take(&mut st) {
                    return Ok(taken);
                }
                // Over HTTP/2 one new connection serves hundreds of waiters:
                // open them one at a time. Over HTTP/1.1 each request needs one.
                let may_connect =
                    st.conns.len() + st.connecting < self.cap(&st) && (st.connecting == 0 || st.h1);
                if may_connect {
                    st.connecting += 1;
                }
                (may_connect, st.connecting)
            };
            match connect {
                // Then take a stream like any waiter (over HTTP/1.1 another
                // request may win the new connection: look again).
                (true, _) => self.connect().await?,
                // A connection is on its way: wait for it, however long the
                // connect takes (it has its own timeout).
                (false, connecting) if connecting > 0 => {
                    self.metrics.waiting.increment(1.0);
                    changed.await;
                    self.metrics.waiting.decrement(1.0);
                }
                (false, _) => {
                    let deadline =
                        *deadline.get_or_insert_with(|| Instant::now() + self.limits.wait);
                    if Instant::now() >= deadline {
                        return Err(self.saturated(&self.lock()));
                    }
                    self.metrics.waiting.increment(1.0);
                    let woke = tokio::time::timeout_at(deadline.into(), changed).await;
                    self.metrics.waiting.decrement(1.0);
                    if woke.is_err() {
                        // One last look: a stream may have freed at the deadline.
                        let mut st = self.lock();
                        if let Some(taken) = self.take(&mut st) {
                            return Ok(taken);
                        }
                        return Err(self.saturated(&st));
                    }
                }
            }
        }
    }

    /// Whether this thread's connections are its own: a shard-local lane,
    /// on a serving shard.
    fn local_here(&self) -> bool {
        self.shard_local && crate::accept::threads::on_shard()
    }

    /// The most connections the lane may hold.
    fn cap(&self, st: &State) -> usize {
        let cap = if st.h1 {
            self.limits.max_connections * H1_CONNECTIONS_PER_H2
        } else {
            self.limits.max_connections
        };
        cap.max(1)
    }

    /// The refusal at the cap; `st` is the locked state (the caller holds
    /// the lock: it must not be taken again here).
    fn saturated(&self, st: &State) -> PoolError {
        self.metrics.saturated.increment(1);
        PoolError::Saturated {
            lane: self.lane,
            connections: st.conns.len(),
            streams: st.conns.iter().map(|c| c.in_use).sum(),
        }
    }

    /// A stream on the oldest open connection with room (packing streams
    /// onto few connections lets the others go idle and close). Over
    /// HTTP/1.1, a free connection this thread took last comes first:
    /// its request drives it here, and its TLS state and buffers are still
    /// in this core's cache (−2 to −4% of the proxy's CPU per request with
    /// wrk and our clients at 32 connections, docs/benchmarks.md §1i).
    ///
    /// On a serving shard, a shard-local lane ([`Pool::shard_local`])
    /// takes only a connection opened there, and opens one rather than take
    /// another shard's: that one's readiness would wake the other shard's
    /// thread, which would then wake this one, for every response. Another
    /// shard's connection is taken only when the lane cannot open more.
    fn take(self: &Arc<Self>, st: &mut State) -> Option<(Slot, Sender)> {
        // `is_open` last: it reads the connection's shared state, the
        // other two only the pool's own fields.
        let free = |c: &Conn| c.in_use < c.capacity();
        if self.local_here() {
            let me = thread_tag();
            if let Some(i) = st
                .conns
                .iter()
                .position(|c| free(c) && c.home_thread == me && c.is_open())
            {
                return Some(self.take_at(st, i));
            }
            if st.conns.len() + st.connecting < self.cap(st) {
                return None;
            }
        }
        let mine = if st.h1 {
            let me = thread_tag();
            st.conns
                .iter()
                .position(|c| free(c) && c.last_thread == me && c.is_open())
        } else {
            None
        };
        let i = mine.or_else(|| st.conns.iter().position(|c| free(c) && c.is_open()))?;
        Some(self.take_at(st, i))
    }

    /// Closes connections that have carried nothing for a while (dropping
    /// the last `SendRequest` ends an h2 connection gracefully), and forgets
    /// closed ones.
    ///
    /// At most once a second: it runs on every request, and over HTTP/1.1
    /// the lane may hold hundreds of connections (a closed one is never
    /// taken meanwhile: `take` checks).
    fn reap(&self, st: &mut State) {
        let now = Instant::now();
        if st.next_reap.is_some_and(|next| now < next) {
            return;
        }
        st.next_reap = Some(now + REAP_EVERY);
        let before = st.conns.len();
        let mut kept_idle = false;
        st.conns.retain(|c| {
            if !c.is_open() && c.in_use == 0 {
                return false;
            }
            match c.idle_since {
                Some(t) if now.saturating_duration_since(t) >= IDLE_TIMEOUT && kept_idle => false,
                Some(_) => {
                    kept_idle = true;
                    true
                }
                None => true,
            }
        });
        let gone = before - st.conns.len();
        if gone > 0 {
            self.metrics.connections.decrement(gone as f64);
        }
    }

    /// Opens a connection on a task of its own and waits for it to join the
    /// pool. A requester that goes away meanwhile (client gone, timeout)
    /// neither leaves `connecting` counted for ever, which would stop the
    /// lane from connecting again, nor wastes the connection: waiters use it.
    async fn connect(self: &Arc<Self>) -> Result<(), PoolError> {
        let pool = Arc::clone(self);
        let connect = async move {
            let result = tokio::time::timeout(CONNECT_TIMEOUT, pool.open()).await;
            pool.landed(result)
        };
        // On the lane's home, the socket registers with its I/O driver and
        // the driver task (spawned by `open`) runs there.
        let task = match &self.home {
            Some(home) if !self.local_here() => self.tasks.spawn_on(connect, home),
            _ => self.tasks.spawn(connect),
        };
        match task.await {
            Ok(result) => result,
            Err(e) => Err(PoolError::Connect(e.into())),
        }
    }

    /// Settles a connect: the connection joins the pool, or the error is
    /// returned; either way the waiters look again.
    fn landed(
        &self,
        result: Result<Result<Conn, PoolError>, tokio::time::error::Elapsed>,
    ) -> Result<(), PoolError> {
        let mut st = self.lock();
        st.connecting -= 1;
        let result = match result {
            // Closed while connecting: the connection is dropped here, which
            // ends it (and its driver).
            Ok(Ok(_)) if st.closed => Err(PoolError::Closed(self.lane)),
            Ok(Ok(conn)) => {
                st.h1 = matches!(conn.tx, Tx::H1(_));
                st.conns.push(conn);
                self.metrics.connections.increment(1.0);
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(PoolError::Connect(
                format!("no connection within {}s", CONNECT_TIMEOUT.as_secs()).into(),
            )),
        };
        drop(st);
        self.changed.notify_waiters();
        result
    }

    fn take_at(self: &Arc<Self>, st: &mut State, i: usize) -> (Slot, Sender) {
        let conn = &mut st.conns[i];
        conn.in_use += 1;
        conn.idle_since = None;
        conn.last_thread = thread_tag();
        self.metrics.streams.increment(1.0);
        let (h1, sender) = match &mut conn.tx {
            Tx::H2(tx) => (None, Sender::H2(tx.clone())),
            Tx::H1(h1) => (h1.take(), Sender::H1),
        };
        (
            Slot {
                pool: Arc::clone(self),
                conn: conn.id,
                h1,
                ended: false,
            },
            sender,
        )
    }

    /// One new connection: TCP, TLS (ALPN h2 then http/1.1), then the
    /// protocol's handshake; its driver runs on its own task.
    async fn open(self: &Arc<Self>) -> Result<Conn, PoolError> {
        let io = self
            .connector
            .clone()
            .oneshot(self.target.clone())
            .await
            .map_err(PoolError::Connect)?;
        let h2 = io.connected().is_negotiated_h2();
        let id = {
            let mut st = self.lock();
            st.next_id += 1;
            st.next_id
        };
        let max = Arc::new(AtomicUsize::new(0));
        let tx = if h2 {
            let (tx, conn) = http2::Builder::new(TrackedExecutor::new(self.tasks.clone()))
                .timer(TokioTimer::new())
                .keep_alive_interval(self.h2.keepalive)
                .keep_alive_timeout(self.h2.keepalive * 2)
                .keep_alive_while_idle(true)
                // Fixed windows, no BDP: a stream's window is small enough
                // that the connection's holds every stream's at once, so
                // one slow client (its watch unread) can never stall the
                // other 249 streams of its connection; and h2's budget for
                // buffered small DATA frames (half the connection window)
                // stays far from exhaustion, which would close the
                // connection with ENHANCE_YOUR_CALM and break every watch
                // on it (seen with BDP's 64 KiB starting window).
                .adaptive_window(false)
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .handshake(io)
                .await
                .map_err(|e| PoolError::Connect(e.into()))?;
            max.store(conn.current_max_send_streams(), Ordering::Relaxed);
            self.tasks.spawn(Driver {
                conn: Box::pin(conn),
                max: Arc::clone(&max),
                pool: Arc::downgrade(self),
                id,
            });
            Tx::H2(tx)
        } else {
            let (tx, conn) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(|e| PoolError::Connect(e.into()))?;
            // Driven by the requests that use it (see [`H1`]); dropped (and
            // closed) with the pool's entry.
            max.store(1, Ordering::Relaxed);
            Tx::H1(Some(H1 {
                tx,
                conn: Mutex::new(Some(Box::pin(conn))),
                redrive: Redrive::new(),
            }))
        };
        Ok(Conn {
            id,
            tx,
            in_use: 0,
            max,
            idle_since: None,
            last_thread: 0,
            home_thread: thread_tag(),
        })
    }

    /// Gives a stream back. An HTTP/1.1 connection whose response was read
    /// to its end goes back at once (the next request drives it the rest
    /// of the way, [`Pool::send`]); one whose response was dropped half-read
    /// (the client went away), or that closed, is dropped, which closes it.
    fn release(self: &Arc<Self>, id: u64, h1: Option<H1>, ended: bool) {
        if h1.as_ref().is_some_and(|h1| !ended || h1.is_closed()) {
            // Half-read (the client went away) or closed: not reusable.
            self.discard(id);
            return;
        }
        self.put_back(id, h1);
    }

    fn put_back(&self, id: u64, h1: Option<H1>) {
        let mut st = self.lock();
        if let Some(conn) = st.conns.iter_mut().find(|c| c.id == id) {
            conn.in_use = conn.in_use.saturating_sub(1);
            self.metrics.streams.decrement(1.0);
            if let (Tx::H1(slot), Some(tx)) = (&mut conn.tx, h1) {
                *slot = Some(tx);
            }
            if conn.in_use == 0 {
                conn.idle_since = Some(Instant::now());
            }
        }
        drop(st);
        self.changed.notify_one();
    }

    /// Forgets a connection that closed or refused a request; its streams
    /// still in use end with their responses.
    fn discard(&self, id: u64) {
        let mut st = self.lock();
        if let Some(i) = st.conns.iter().position(|c| c.id == id) {
            // `remove`, not `swap_remove`: the picker relies on oldest first.
            let conn = st.conns.remove(i);
            self.metrics.connections.decrement(1.0);
            self.metrics.streams.decrement(conn.in_use as f64);
        }
        drop(st);
        self.changed.notify_waiters();
    }
}

/// A number for the current thread, unique in the process.
fn thread_tag() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    thread_local! {
        static TAG: u64 = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    TAG.with(|t| *t)
}

/// Drives an h2 connection and keeps the pool's view of the peer's stream
/// limit current (the server's SETTINGS arrive after the handshake, and may
/// change later).
struct Driver {
    conn: Pin<Box<H2Conn>>,
    max: Arc<AtomicUsize>,
    pool: Weak<Inner>,
    id: u64,
}

/// What the connector yields: TLS over TCP.
type Io = hyper_rustls::MaybeHttpsStream<hyper_util::rt::TokioIo<tokio::net::TcpStream>>;
type H2Conn = http2::Connection<Io, Body, TrackedExecutor>;

impl Future for Driver {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let res = this.conn.as_mut().poll(cx);
        let max = this.conn.current_max_send_streams();
        if this.max.swap(max, Ordering::Relaxed) < max
            && let Some(pool) = this.pool.upgrade()
        {
            // More room than assumed: waiters may go.
            pool.changed.notify_waiters();
        }
        match res {
            Poll::Pending => Poll::Pending,
            Poll::Ready(res) => {
                if let Err(e) = res {
                    tracing::debug!(error = %Chain(&e), "upstream HTTP/2 connection ended with an error");
                }
                if let Some(pool) = this.pool.upgrade() {
                    pool.discard(this.id);
                }
                Poll::Ready(())
            }
        }
    }
}

/// A response body that holds its stream until it ends.
pub struct ResponseBody {
    inner: Incoming,
    slot: Option<Slot>,
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // A body hyper never polls because it has nothing (HEAD, 204, an
        // empty Content-Length) ended all the same.
        if let Some(slot) = self.slot.as_mut()
            && http_body::Body::is_end_stream(&self.inner)
        {
            slot.ended = true;
        }
    }
}

impl ResponseBody {
    fn new(inner: Incoming, slot: Slot) -> ResponseBody {
        ResponseBody {
            inner,
            slot: Some(slot),
        }
    }

    /// A body that holds no pooled stream (upgrades on their own connection).
    pub(crate) fn unpooled(inner: Incoming) -> ResponseBody {
        ResponseBody { inner, slot: None }
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let inner = &mut this.inner;
        // An HTTP/1.1 connection is driven by its request (see [`H1`]).
        let res = match this.slot.as_ref().and_then(|s| s.h1.as_ref()) {
            Some(h1) => h1.redrive.poll(cx, |cx| {
                drive(&h1.conn, cx);
                Pin::new(&mut *inner).poll_frame(cx)
            }),
            None => Pin::new(inner).poll_frame(cx),
        };
        match &res {
            Poll::Ready(None) => {
                // The stream is over: its slot is free for the next request
                // now, not when the body is dropped.
                if let Some(mut slot) = this.slot.take() {
                    slot.ended = true;
                }
            }
            Poll::Ready(Some(Err(_))) => this.slot = None,
            _ => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// HTTP/1.1 wants origin-form (`/path?query`) and a Host header.
pub(crate) fn origin_form(req: &mut Request<Body>, authority: &Authority) {
    *req.version_mut() = Version::HTTP_11;
    if !req.headers().contains_key(HOST)
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        req.headers_mut().insert(HOST, v);
    }
    if let Some(pq) = req.uri().path_and_query().cloned() {
        let mut parts = http::uri::Parts::default();
        parts.path_and_query = Some(pq);
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
}
