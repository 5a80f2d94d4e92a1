//! The listener: accept, TLS, HTTP/1.1 or HTTP/2, and graceful shutdown.
//!
//! Shutdown order (SIGTERM or [`ProxyHandle::shutdown`]):
//! 1. `/readyz` fails and the listener closes: no new connections;
//! 2. every connection is told to finish (h1: close after the current
//!    response, h2: GOAWAY) and in-flight requests drain, for up to the
//!    grace period;
//! 3. then long-running streams (watches, upgraded exec/attach streams) end
//!    cleanly, so that clients see a normal end of stream and re-watch
//!    elsewhere; connections get 5 s more to close;
//! 4. the watch hub's upstream streams end, the upstream lanes close (idle
//!    pooled connections end at once), the admin listener stops, and the
//!    proxy waits for every task it spawned (one [`TaskTracker`], see
//!    [`crate::tasks`]), for at most one more grace period; then the process
//!    exits.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioTimer;
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::threads::{ShardRuntimes, Shards, SideRuntime};
use crate::accept::{self, Gate};
use crate::admin::{self, AdminState};
use crate::admit::{self, Admission, AdmitError};
use crate::config::ProxyConfig;
use crate::error::Chain;
use crate::identity::{Authenticator, IdentityError, TokenReviewer};
use crate::proxy::{self, Shared};
use crate::reload;
use crate::tasks::TrackedExecutor;
use crate::tls::{ServerTls, TlsError};
use crate::upstream::{BoxError, Upstream, UpstreamConfigError};

mod connection;
use connection::{Door, accept_loop};

/// HTTP/2 streams per client connection.
const MAX_STREAMS: u32 = 1000;
/// HTTP/2 PINGs on idle connections, and how long to wait for the answer.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long an HTTP/1.1 client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a TLS handshake may take, waiting for handshake slots included.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("serving TLS")]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Upstream(#[from] UpstreamConfigError),
    #[error("authentication")]
    Identity(#[from] IdentityError),
    #[error("limits")]
    Limits(#[from] AdmitError),
    #[error("binding {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running proxy.
pub struct ProxyHandle {
    addr: SocketAddr,
    admin_addr: SocketAddr,
    plain_addr: Option<SocketAddr>,
    privileged_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    done: tokio::task::JoinHandle<Stopped>,
    admission: Arc<Admission>,
    reload_all: Arc<dyn Fn() + Send + Sync>,
    hub: crate::watch::Hub,
    upstream: Upstream,
    open: Arc<crate::brake::OpenStreams>,
    shards: Shards,
}

impl ProxyHandle {
    /// The client connections open on each serving thread (empty without
    /// them), as `breakwater_serving_thread_connections` counts them.
    pub fn serving_thread_connections(&self) -> Vec<usize> {
        self.shards.open()
    }

    /// How many long-running requests are open (watches, streams,
    /// upgrades), as registered for terminating blocks.
    pub fn open_streams(&self) -> usize {
        self.open.len()
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The privileged TLS listener, when configured (`--privileged-listen`).
    pub fn privileged_addr(&self) -> Option<SocketAddr> {
        self.privileged_addr
    }

    /// The plain-HTTP loopback listener, when configured (`--plain-listen`).
    pub fn plain_addr(&self) -> Option<SocketAddr> {
        self.plain_addr
    }

    /// The watch multiplexer (its accounting: [`crate::watch::Hub::stats`]).
    pub fn watch_hub(&self) -> &crate::watch::Hub {
        &self.hub
    }

    /// The client to the apiserver (its lanes: [`Upstream::lane_stats`]).
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Limits, blocks and their state.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// What SIGHUP does: re-read the limits file and every certificate,
    /// key and token file. Failures keep the current values (and are logged).
    pub fn reload(&self) {
        (self.reload_all)();
    }

    /// Starts the shutdown sequence and waits for it to finish.
    pub async fn shutdown(self) -> Stopped {
        self.shutdown.cancel();
        match self.done.await {
            Ok(stopped) => stopped,
            // The sequence itself panicked: nothing is known to have ended.
            Err(_) => Stopped {
                tasks_left: usize::MAX,
            },
        }
    }
}

/// How a shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// The proxy's tasks still running when the last grace period ran out
    /// (they are dropped with the runtime); 0 when every task ended in time.
    pub tasks_left: usize,
}

/// The listen backlog asked for; Linux caps it at `net.core.somaxconn`
/// (4096 by default), which is what Go's net/http, and so the apiserver,
/// uses. tokio's `TcpListener::bind` asks for 1024: 5,000 agents
/// connecting at once overflowed it, and the kernel's dropped handshakes
/// came back after SYN retransmits of 1, 3, 7 and 15 s (a storm of 5,000
/// took 16.8 s to be all watching, its last 52 agents 8 s of it).
pub const LISTEN_BACKLOG: u32 = 65_535;

/// Binds `addr`, registering the listener with the current runtime's I/O
/// driver (or the one entered).
fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    let listen = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As TcpListener::bind does on Unix: a restarted proxy rebinds at
        // once, whatever connections of the old one linger in TIME_WAIT.
        #[cfg(unix)]
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|source| StartError::Bind { addr, source })
}

/// Binds the listeners and starts serving.
pub async fn start(cfg: ProxyConfig) -> Result<ProxyHandle, StartError> {
    let server_tls = Arc::new(ServerTls::new(
        &cfg.tls_cert,
        &cfg.tls_key,
        cfg.client_ca.as_deref(),
    )?);
    // The recorder first: the upstream lanes register their metric handles
    // when they are built.
    admin::prometheus();
    // Every task of the proxy, awaited at shutdown (crate::tasks).
    let tasks = TaskTracker::new();
    // Connections of privileged identities, and the exempt lane's upstream
    // connections, run on a thread of their own (accept::threads). Owned
    // by the shutdown task below, dropped once every task has ended.
    let privileged = match SideRuntime::privileged() {
        Ok(rt) => Some(rt),
        Err(err) => {
            tracing::warn!(error = %Chain(&err), "no thread for privileged connections; they share the serving runtime");
            None
        }
    };
    let privileged_handle = privileged.as_ref().map(SideRuntime::handle);
    // The threads that serve client connections (accept::threads::Shards),
    // owned by the shutdown task too.
    let (shard_runtimes, shards) = match Shards::new(cfg.connections.serving_threads) {
        Ok(pair) => pair,
        Err(err) => {
            tracing::warn!(error = %Chain(&err), "no serving threads; connections are served on the shared runtime");
            (ShardRuntimes::default(), Shards::default())
        }
    };
    let handle_shards = shards.clone();
    let upstream = Upstream::new(&cfg.upstream, tasks.clone(), privileged_handle.clone())?;
    let handle_upstream = upstream.clone();
    let reviewer: Arc<dyn TokenReviewer> = Arc::new(upstream.clone());
    let key_files = cfg.auth.service_account_key_files.clone();
    let auth = Authenticator::new(cfg.auth.clone(), Some(reviewer))?;
    let listener = bind(cfg.listen)?;
    let admin_listener = bind(cfg.admin_listen)?;
    let plain_listener = match cfg.plain_listen {
        Some(a) => Some(bind(a)?),
        None => None,
    };
    // The privileged listener is registered with the privileged thread's
    // I/O driver, and accepts there (`Door::Privileged`).
    let privileged_listener = match cfg.privileged_listen {
        Some(a) => {
            let _there = privileged_handle
                .as_ref()
                .map(tokio::runtime::Handle::enter);
            let l = bind(a)?;
            let bound = l
                .local_addr()
                .map_err(|source| StartError::Bind { addr: a, source })?;
            Some((l, bound))
        }
        None => None,
    };
    let privileged_addr = privileged_listener.as_ref().map(|(_, a)| *a);
    let plain_addr = match &plain_listener {
        Some(l) => Some(l.local_addr().map_err(|source| StartError::Bind {
            addr: cfg.plain_listen.unwrap_or(cfg.listen),
            source,
        })?),
        None => None,
    };
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: cfg.admin_listen,
            source,
        })?;

    let shutdown = CancellationToken::new();
    let admission = Arc::new(Admission::new(
        cfg.limits.file.as_deref(),
        cfg.limits.blocks_file.as_deref(),
        cfg.limits.rate_limit_headers,
    )?);
    let streams = CancellationToken::new();
    let top = Arc::new(crate::top::Top::default());
    let open = Arc::new(crate::brake::OpenStreams::default());
    let open_streams = open.clone();
    tasks.spawn(crate::top::ticker(
        top.clone(),
        upstream.latency().clone(),
        shutdown.clone(),
    ));
    let shared = Arc::new(Shared {
        top: top.clone(),
        upstream: upstream.clone(),
        auth,
        admission: admission.clone(),
        hub: crate::watch::Hub::new(upstream.clone(), cfg.watch.clone(), streams.clone()),
        streams,
        tasks: tasks.clone(),
        open: open.clone(),
        privileged: privileged_handle,
    });
    let hub = shared.hub.clone();
    let mut watched = server_tls.files();
    watched.extend(upstream.files());
    watched.extend(key_files);
    // The file watchers and upkeep end by themselves on `shutdown`.
    reload::spawn(&tasks, watched, shutdown.clone(), {
        let (tls, shared) = (server_tls.clone(), shared.clone());
        move || {
            reload::reload_all(&tls, &shared);
        }
    });
    if let Some(file) = admission.limits_file().map(Path::to_path_buf) {
        let admission = admission.clone();
        reload::spawn(&tasks, vec![file], shutdown.clone(), move || {
            let _ = admission.reload();
        });
    }
    // Global limits: connects to Redis, renews this replica's slots, falls
    // back to the local share while Redis is away.
    admission.start_backend(&tasks, shutdown.clone());
    tasks.spawn(admit::maintenance(
        admission.clone(),
        Duration::from_secs(5),
        shutdown.clone(),
    ));
    // New connections: caps, per-source pacing and handshake slots, shared
    // by both listeners.
    let gate = Gate::new(cfg.connections.clone());
    if cfg.connections.accept_rate_per_source.is_some() {
        tasks.spawn(accept::upkeep(
            gate.clone(),
            Duration::from_secs(10),
            shutdown.clone(),
        ));
    }
    let reload_all: Arc<dyn Fn() + Send + Sync> = {
        let (tls, shared) = (server_tls.clone(), shared.clone());
        Arc::new(move || {
            let _ = shared.admission.reload();
            reload::reload_all(&tls, &shared);
        })
    };
    let admin_state = Arc::new(AdminState {
        ready: true.into(),
        upstream,
        admission: admission.clone(),
        hub: hub.clone(),
        top,
        open,
    });
    let admin_stop = CancellationToken::new();
    tasks.spawn(admin::serve(
        admin_listener,
        admin_state.clone(),
        admin_stop.clone(),
        tasks.clone(),
    ));
    // The shutdown sequence is the one task outside the tracker: it is the
    // one that waits for it.
    let done = tokio::spawn({
        let shutdown = shutdown.clone();
        let upstream = shared.upstream.clone();
        async move {
            let conns = Connections {
                tasks: tasks.clone(),
                tracker: TaskTracker::new(),
                stop: CancellationToken::new(),
                serving: tokio::runtime::Handle::current(),
                shards,
            };
            {
                let plain = async {
                    if let Some(l) = plain_listener {
                        let (shared, shutdown) = (shared.clone(), shutdown.clone());
                        accept_loop(
                            l,
                            Door::Plain,
                            gate.clone(),
                            shared,
                            conns.clone(),
                            shutdown,
                        )
                        .await;
                    }
                };
                let privileged_door = async {
                    let Some((l, _)) = privileged_listener else {
                        return;
                    };
                    let door = Door::Privileged(server_tls.clone());
                    let run = accept_loop(
                        l,
                        door,
                        gate.clone(),
                        shared.clone(),
                        conns.clone(),
                        shutdown.clone(),
                    );
                    match &shared.privileged {
                        // Err: that runtime is gone, and the loop with it.
                        Some(there) => drop(there.spawn(run).await),
                        // No privileged thread: a listener like --listen.
                        None => run.await,
                    }
                };
                let tls = accept_loop(
                    listener,
                    Door::Main(server_tls.clone()),
                    gate.clone(),
                    shared.clone(),
                    conns.clone(),
                    shutdown.clone(),
                );
                tokio::join!(tls, plain, privileged_door);
            }
            // Step 1 is done (listener closed); fail readiness too.
            admin_state.ready.store(false, Ordering::Release);
            drain(conns, &shared, cfg.shutdown_grace).await;
            // Step 4. Every client stream is over: the watch hub's upstream
            // streams end too; then the upstream lanes close, the admin
            // listener stops, and every task of the proxy is waited for.
            shared.streams.cancel();
            let deadline = tokio::time::Instant::now() + cfg.shutdown_grace;
            if tokio::time::timeout_at(deadline, shared.hub.closed())
                .await
                .is_err()
            {
                tracing::warn!("watch hub tasks still running after the shutdown grace period");
            }
            upstream.close();
            admin_stop.cancel();
            tasks.close();
            if tokio::time::timeout_at(deadline, tasks.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    tasks = tasks.len(),
                    "tasks still running after the shutdown grace period; exiting anyway"
                );
            } else {
                tracing::info!("shut down");
            }
            drop(privileged);
            drop(shard_runtimes);
            Stopped {
                tasks_left: tasks.len(),
            }
        }
    });
    tracing::info!(
        %addr,
        %admin_addr,
        privileged = %privileged_addr.map_or_else(|| "off".to_string(), |a| a.to_string()),
        plain = %plain_addr.map_or_else(|| "off".to_string(), |a| a.to_string()),
        upstream = %cfg.upstream.url,
        mode = cfg.upstream.mode.as_str(),
        "breakwater serving"
    );
    Ok(ProxyHandle {
        addr,
        admin_addr,
        plain_addr,
        privileged_addr,
        shutdown,
        done,
        admission,
        reload_all,
        hub,
        upstream: handle_upstream,
        open: open_streams,
        shards: handle_shards,
    })
}

/// The client connections: their tasks (from accept to close, TLS handshake
/// included) and the signal that tells each to finish gracefully.
#[derive(Clone)]
struct Connections {
    /// The proxy's tracker: connection tasks are spawned there.
    tasks: TaskTracker,
    /// The connections alone, so that step 2 can wait for them.
    tracker: TaskTracker,
    stop: CancellationToken,
    /// The runtime that serves the connections of unprivileged callers
    /// without serving shards.
    serving: tokio::runtime::Handle,
    /// Where connections of unprivileged callers are served.
    shards: Shards,
}

impl Connections {
    fn spawn(&self, conn: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(self.tracker.track_future(conn));
    }

    fn spawn_on(
        &self,
        conn: impl Future<Output = ()> + Send + 'static,
        rt: &tokio::runtime::Handle,
    ) {
        self.tasks.spawn_on(self.tracker.track_future(conn), rt);
    }
}

/// Steps 2 and 3 of the shutdown order.
async fn drain(conns: Connections, shared: &Shared, grace: Duration) {
    let connections = conns.tracker.len();
    tracing::info!(connections, grace_s = grace.as_secs_f64(), "draining");
    conns.tracker.close();
    conns.stop.cancel();
    let all_done = conns.tracker.wait();
    tokio::pin!(all_done);
    if tokio::time::timeout(grace, all_done.as_mut()).await.is_ok() {
        tracing::info!("drained");
        return;
    }
    tracing::info!("grace period over; ending long-running streams");
    shared.streams.cancel();
    if tokio::time::timeout(Duration::from_secs(5), all_done)
        .await
        .is_err()
    {
        tracing::warn!("connections still open after ending streams; closing anyway");
    }
}

/// HTTP/1.1 or HTTP/2 on an established connection (TLS, or plain on
/// loopback), until it ends or `stop` has it finish gracefully.
async fn serve_http<I>(
    io: I,
    peer: SocketAddr,
    alpn: Option<Vec<u8>>,
    cert: Option<Arc<crate::identity::Identity>>,
    memo: Arc<crate::identity::TokenMemo>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    // HTTP/2 streams run on tasks of their own, on the proxy's tracker.
    let exec = TrackedExecutor::new(shared.tasks.clone());
    let client = proxy::Peer::new(peer);
    let svc = service_fn(move |req| {
        LazyHandler::Waiting(Some(Box::new(Call {
            shared: shared.clone(),
            req,
            peer: client.clone(),
            cert: cert.clone(),
            memo: memo.clone(),
        })))
    });
    // ALPN already chose the protocol: serve it directly. The auto
    // builder would first read 24 bytes to sniff the HTTP/2 preface, and
    // handing those back to HTTP/1.1 makes hyper grow its read buffer to
    // 16 KiB, kept for the connection's life (every idle watch pays it).
    // Without ALPN (rare with TLS; always on the plain listener) the auto
    // builder sniffs: HTTP/2 with prior knowledge, else HTTP/1.1.
    let res: Result<(), BoxError> = match alpn.as_deref() {
        Some(b"h2") => {
            let mut h2 = hyper::server::conn::http2::Builder::new(exec);
            h2.timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS)
                .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
                .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT);
            let conn = h2.serve_connection(io, svc);
            until_stopped(Box::pin(conn), &stop, |c| c.as_mut().graceful_shutdown())
                .await
                .map_err(Into::into)
        }
        Some(b"http/1.1") => {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(io, svc)
                .with_upgrades();
            until_stopped(Box::pin(conn), &stop, |c| c.as_mut().graceful_shutdown())
                .await
                .map_err(Into::into)
        }
        _ => {
            let mut builder = auto::Builder::new(exec);
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS)
                .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
                .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT);
            let conn = builder.serve_connection_with_upgrades(io, svc);
            until_stopped(Box::pin(conn), &stop, |c| c.as_mut().graceful_shutdown()).await
        }
    };
    if let Err(err) = res {
        tracing::debug!(%peer, error = %Chain(&*err), "connection ended with an error");
    }
}

/// What one request's handler needs.
struct Call {
    shared: Arc<Shared>,
    req: hyper::Request<hyper::body::Incoming>,
    peer: proxy::Peer,
    cert: Option<Arc<crate::identity::Identity>>,
    memo: Arc<crate::identity::TokenMemo>,
}

type Handler = Pin<Box<dyn Future<Output = hyper::Response<crate::upstream::Body>> + Send>>;

/// The service future: the request until its task first runs, then the
/// boxed handler.
///
/// Boxed, because the handler's state machine is a few KiB and hyper keeps
/// a slot of the service future's size for the connection's life (h1) or
/// inline in each stream's task (h2), long after a watch's handler has
/// returned its response. Lazily, because hyper calls the service as soon
/// as a request's headers are in — on HTTP/2 for hundreds of streams per
/// read — and those tasks then wait in the run queue: a burst of 2,000
/// watches would hold 2,000 handler boxes at once, and the allocator keeps
/// that peak as RSS long after (measured: 1.5 KiB per idle h2 watch).
enum LazyHandler {
    Waiting(Option<Box<Call>>),
    Running(Handler),
}

impl Future for LazyHandler {
    type Output = Result<hyper::Response<crate::upstream::Body>, Infallible>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = &mut *self;
        if let LazyHandler::Waiting(call) = this {
            let Some(call) = call.take() else {
                // Polled after it finished: hyper never does.
                return std::task::Poll::Pending;
            };
            let Call {
                shared,
                req,
                peer,
                cert,
                memo,
            } = *call;
            *this = LazyHandler::Running(Box::pin(proxy::handle(shared, req, peer, cert, memo)));
        }
        match this {
            LazyHandler::Running(h) => h.as_mut().poll(cx).map(Ok),
            LazyHandler::Waiting(_) => std::task::Poll::Pending,
        }
    }
}

/// Drives `conn` to its end; once `stop` is cancelled, asks it to finish
/// gracefully (h1: close after the current response, h2: GOAWAY) and keeps
/// driving it until it has. Callers box `conn`: the three kinds differ in
/// size, and boxed, the connection's task is sized for the one it serves.
async fn until_stopped<C, E>(
    conn: C,
    stop: &CancellationToken,
    graceful_shutdown: impl FnOnce(&mut C),
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>> + Unpin,
{
    let mut conn = conn;
    // Polled with the connection each time its task wakes (per request,
    // per watch event delivered): behind `OnWake` that is one atomic read,
    // not the shared token's two mutexes.
    tokio::select! {
        res = &mut conn => return res,
        _ = crate::tasks::OnWake::new(stop.cancelled()) => {}
    }
    graceful_shutdown(&mut conn);
    conn.await
}
