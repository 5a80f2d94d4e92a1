//! A client connection from accept to established: the caps, the TLS
//! handshake (on the handshake threads, or inline on the privileged thread
//! for the privileged listener), the peek of a token's first request, and
//! the choice of the runtime that serves it (`super::serve_http`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::accept::peek::{self, FirstRequest, Protocol, Replay};
use crate::accept::{Gate, SlotIo};
use crate::error::Chain;
use crate::identity::Authenticator;
use crate::proxy::Shared;
use crate::tls::ServerTls;

use super::{Connections, HANDSHAKE_TIMEOUT, serve_http};

/// The listener a connection came in on.
#[derive(Clone)]
pub(super) enum Door {
    /// `--listen`: TLS, handshakes on the handshake threads.
    Main(Arc<ServerTls>),
    /// `--privileged-listen`: TLS, accepted and handshaken on the
    /// privileged thread (its accept loop runs there).
    Privileged(Arc<ServerTls>),
    /// `--plain-listen`: plain HTTP on loopback.
    Plain,
}

/// Accepts on `listener` until shutdown, as `door` says (TLS, or plain on
/// the loopback listener), on the runtime it runs on (the privileged door's
/// runs on the privileged thread). A connection over the caps of `gate` is
/// closed at once, before a byte is read.
pub(super) async fn accept_loop(
    listener: TcpListener,
    door: Door,
    gate: Arc<Gate>,
    shared: Arc<Shared>,
    conns: Connections,
    shutdown: CancellationToken,
) {
    // The privileged door's handshakes run on the one privileged thread, one
    // at a time, under slots of their own: a storm's handshakes never stand
    // before them.
    let slots = match door {
        Door::Privileged(_) => Arc::new(tokio::sync::Semaphore::new(1)),
        _ => gate.handshake_slots(),
    };
    let mut backoff = Duration::from_millis(5);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            res = listener.accept() => match res {
                Ok(pair) => {
                    backoff = Duration::from_millis(5);
                    pair
                }
                Err(err) => {
                    // EMFILE/ENFILE and aborted handshakes: the listener
                    // itself is fine; wait a little and go on.
                    tracing::warn!(error = %Chain(&err), "accept failed; backing off");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        // Over a cap: close now, neither a task nor a handshake spent
        // (counted in breakwater_connections_refused_total by the gate).
        let admitted = match gate.admit(peer.ip()) {
            Ok(admitted) => admitted,
            Err(reason) => {
                tracing::debug!(%peer, reason = reason.as_str(), "connection refused");
                drop(tcp);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        // A connection of the main or plain listener is served on a
        // serving shard (accept::threads::Shards) from here on: its socket
        // leaves this runtime's I/O driver now and joins the shard's.
        let (home, ticket) = match door {
            Door::Privileged(_) => (None, None),
            _ => conns.shards.pick().unzip(),
        };
        let sock = match home {
            None => Sock::Here(tcp),
            Some(_) => match tcp.into_std() {
                Ok(std) => Sock::Moving(std),
                Err(err) => {
                    tracing::debug!(%peer, error = %Chain(&err), "connection dropped: its socket could not move to a serving thread");
                    continue;
                }
            },
        };
        let (shared, conns2) = (shared.clone(), conns.clone());
        let serve = match &door {
            Door::Main(tls) | Door::Privileged(tls) => Serve::Tls {
                slots: slots.clone(),
                acceptor: tls.acceptor(),
                gate: gate.clone(),
                privileged_door: matches!(door, Door::Privileged(_)),
            },
            Door::Plain => Serve::Plain,
        };
        let task = async move {
            // Counted on its shard and against the caps until it ends.
            let (_ticket, _admitted) = (ticket, admitted);
            let tcp = match sock.settle() {
                Ok(tcp) => tcp,
                Err(err) => {
                    tracing::debug!(%peer, error = %Chain(&err), "connection dropped: no serving thread took its socket");
                    return;
                }
            };
            match serve {
                Serve::Tls {
                    slots,
                    acceptor,
                    gate,
                    privileged_door,
                } => {
                    let io = SlotIo::new(tcp, slots);
                    serve_connection(io, peer, acceptor, (gate, privileged_door), shared, conns2)
                        .await;
                }
                Serve::Plain => {
                    let memo = Arc::default();
                    let stop = conns2.stop.clone();
                    serve_http(TokioIo::new(tcp), peer, None, None, memo, shared, stop).await;
                }
            }
        };
        match &home {
            Some(home) => conns.spawn_on(task, home),
            None => conns.spawn(task),
        }
    }
    drop(listener);
}

/// A new connection's socket: still on the accepting runtime's I/O driver,
/// or on its way to a serving shard's.
enum Sock {
    Here(TcpStream),
    Moving(std::net::TcpStream),
}

impl Sock {
    /// The socket, registered with the I/O driver of the runtime this is
    /// called on if it was moving.
    fn settle(self) -> std::io::Result<TcpStream> {
        match self {
            Sock::Here(tcp) => Ok(tcp),
            Sock::Moving(std) => TcpStream::from_std(std),
        }
    }
}

/// How a door serves its connections.
enum Serve {
    Tls {
        slots: Arc<tokio::sync::Semaphore>,
        acceptor: tokio_rustls::TlsAcceptor,
        gate: Arc<Gate>,
        privileged_door: bool,
    },
    Plain,
}

/// The TLS handshake and the HTTP connection, which finishes gracefully
/// once the connections' `stop` is cancelled (its task in the accept loop
/// holds its place in the caps and on its shard); the gate runs the
/// handshake on its threads (see [`crate::accept::threads`]), or, for the
/// privileged door, it runs here on the privileged thread.
async fn serve_connection(
    io: SlotIo,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    (gate, privileged_door): (Arc<Gate>, bool),
    shared: Arc<Shared>,
    conns: Connections,
) {
    // The handshake (and, when a token could be privileged, the first
    // request's header block) is a task of its own on the handshake
    // threads, so its state is freed when it is done instead of sizing this
    // task for the connection's whole life, and a slow client's bytes never
    // wake the serving runtime's queue. On the privileged door it runs
    // here, on the privileged thread.
    let on_privileged_thread = privileged_door && shared.privileged.is_some();
    let established = if on_privileged_thread {
        Some(establish(io, peer, acceptor, shared.clone()).await)
    } else {
        gate.handshake(establish(io, peer, acceptor, shared.clone()))
            .await
    };
    let Some(Some(established)) = established else {
        // The handshake failed, or the handshake threads are gone (the
        // proxy is shutting down).
        return;
    };
    let Established {
        tls,
        cert,
        alpn,
        peeked,
        first,
    } = established;
    // The connection's last bearer token (crate::identity::TokenMemo); the
    // peek's authentication fills it, so the first request reuses it.
    let memo = Arc::new(crate::identity::TokenMemo::default());
    let privileged = shared.privileged.is_some()
        && match (&cert, first) {
            (Some(id), _) => shared.admission.is_privileged(id),
            (None, Some(first)) => token_is_privileged(&shared, &memo, first, peer).await,
            (None, None) => false,
        };
    // Whatever the peek read is read again by hyper first: nothing is lost.
    let mut io = Replay::new(peeked, tls);
    let stop = conns.stop.clone();
    // A privileged identity's connection (an exempt rule names it) is
    // served on the privileged thread: its requests never queue behind the
    // storm's. Any other caller's on the serving runtime, even when it came
    // in through the privileged door.
    let (home, ticket) = match (privileged, on_privileged_thread) {
        // Already where it belongs.
        (true, true) | (false, false) => (None, None),
        // `privileged` implies a privileged runtime.
        (true, false) => (shared.privileged.clone(), None),
        (false, true) => {
            metrics::counter!("breakwater_privileged_listener_unprivileged_total").increment(1);
            tracing::debug!(%peer, "an unprivileged caller on the privileged listener; served on the serving runtime");
            match conns.shards.pick() {
                Some((shard, ticket)) => (Some(shard), Some(ticket)),
                None => (Some(conns.serving.clone()), None),
            }
        }
    };
    let Some(home) = home else {
        serve_http(TokioIo::new(io), peer, alpn, cert, memo, shared, stop).await;
        return;
    };
    // The socket moves to that runtime's I/O driver. This task stays,
    // holding the connection's place in the caps and the tracker.
    let served = home.spawn(async move {
        let _ticket = ticket;
        if let Err(err) = io.get_mut().get_mut().0.rehome() {
            tracing::debug!(%peer, error = %Chain(&err), "connection stays on its first runtime's I/O driver");
        }
        serve_http(TokioIo::new(io), peer, alpn, cert, memo, shared, stop).await;
    });
    // Err: the runtime is shutting down, and the connection with it.
    let _ = served.await;
}

/// A TLS connection, handshake done.
struct Established {
    tls: tokio_rustls::server::TlsStream<SlotIo>,
    /// The identity of its verified client certificate.
    cert: Option<Arc<crate::identity::Identity>>,
    alpn: Option<Vec<u8>>,
    /// What [`peek::first_request`] read, to be replayed to hyper.
    peeked: Vec<u8>,
    /// The first request, when it carries a bearer token.
    first: Option<FirstRequest>,
}

/// The handshake, under [`HANDSHAKE_TIMEOUT`] (waiting for handshake slots
/// included, see [`SlotIo`]); then, for a connection without a
/// certificate while some exempt rule could make a bearer token
/// privileged, its first header block ([`peek`]). `None` if the handshake
/// failed.
async fn establish(
    io: SlotIo,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
) -> Option<Established> {
    let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            tracing::debug!(%peer, error = %Chain(&err), "TLS handshake failed");
            return None;
        }
        Err(_) => {
            metrics::counter!("breakwater_connections_refused_total", "reason" => "handshake_timeout")
                .increment(1);
            tracing::debug!(%peer, "TLS handshake timed out");
            return None;
        }
    };
    // Requests (and the peek) never take a handshake slot.
    tls.get_mut().0.handshake_done();
    // x509 identity: once per connection, from the verified chain's leaf.
    let cert = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        None => None,
        Some(leaf) => match Authenticator::from_certificate(leaf) {
            Ok(identity) => Some(Arc::new(identity)),
            Err(err) => {
                tracing::info!(%peer, error = %Chain(&err), "client certificate carries no usable identity");
                None
            }
        },
    };
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    // A certificate wins over any token (as in the apiserver), and without
    // an exempt rule no token is privileged: then nothing is read here.
    let (peeked, first) =
        if cert.is_none() && shared.privileged.is_some() && shared.admission.may_privilege_tokens()
        {
            peek::first_request(&mut tls, Protocol::from_alpn(alpn.as_deref())).await
        } else {
            (Vec::new(), None)
        };
    Some(Established {
        tls,
        cert,
        alpn,
        peeked,
        first,
    })
}

/// Whether the bearer token of a connection's first request names a
/// privileged identity. Authenticated as that request will be, through the
/// connection's memo (skipped for a long-running request, as the request
/// path skips it): the request then finds the answer in the memo or the
/// caches, so the token is verified once, and a TokenReview it needs is the
/// one the request would have made (coalesced with it, cached for both). A
/// refusal is not acted on here: the request meets it again and answers it.
async fn token_is_privileged(
    shared: &Shared,
    memo: &crate::identity::TokenMemo,
    first: FirstRequest,
    peer: SocketAddr,
) -> bool {
    let (path, query) = match first.target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (first.target.as_str(), None),
    };
    let long_running = crate::classify::classify(&first.method, path, query).is_long_running();
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, first.authorization);
    let memo = (!long_running).then_some(memo);
    let now = std::time::Instant::now();
    match shared.auth.authenticate_on(memo, None, &headers, now).await {
        Ok(identity) => {
            let privileged =
                !shared.auth.is_unverified(&identity) && shared.admission.is_privileged(&identity);
            if privileged {
                tracing::debug!(%peer, user = %identity.username, "bearer token names a privileged identity; connection served on the privileged thread");
            }
            privileged
        }
        Err(_) => false,
    }
}
