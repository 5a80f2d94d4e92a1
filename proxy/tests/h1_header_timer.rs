//! The vendored hyper's header-read timer (vendor/README.md,
//! `hyper-h1-header-timer-reuse.patch`): one timer per connection, reset
//! for each request's head instead of dropped and made again. Whatever the
//! connection did before (requests quicker or slower than the timeout),
//! a head that does not arrive in time still closes it, and one that does
//! is still answered.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TIMEOUT: Duration = Duration::from_millis(300);

/// An HTTP/1.1 server with the proxy's settings but a short header-read
/// timeout; `/slow` answers after twice the timeout.
async fn server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    if req.uri().path() == "/slow" {
                        tokio::time::sleep(TIMEOUT * 2).await;
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(TIMEOUT)
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// Sends a GET of `path` and reads its whole answer (2-byte body).
async fn get(tcp: &mut TcpStream, path: &str) -> String {
    let head = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
    tcp.write_all(head.as_bytes()).await.expect("send a head");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"\r\n\r\nok") {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .expect("read");
        assert!(
            n > 0,
            "closed before answering {path}: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Sends half a head; the server must close the connection, and not
/// before the timeout.
async fn stall_closes(tcp: &mut TcpStream) {
    let took = stall(tcp).await;
    assert!(
        took >= TIMEOUT,
        "closed {took:?} after a stalled head, before the timeout"
    );
}

/// Sends half a head and returns how long the server took to close.
async fn stall(tcp: &mut TcpStream) -> Duration {
    let start = Instant::now();
    tcp.write_all(b"GET /stalled HTTP/1.1\r\nHo")
        .await
        .expect("send half a head");
    let mut buf = [0u8; 1024];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("the server closes a stalled head within 10 s");
        // hyper may answer 408 before closing; what counts is the close.
        match read {
            Ok(0) | Err(_) => return start.elapsed(),
            Ok(_) => {}
        }
    }
}

#[tokio::test]
async fn later_heads_on_a_connection_are_timed_from_their_own_start() {
    let addr = server().await;
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    // Five requests, each after two thirds of the timeout: together far
    // longer than it, each well within it.
    for _ in 0..5 {
        tokio::time::sleep(TIMEOUT * 2 / 3).await;
        assert!(get(&mut tcp, "/").await.starts_with("HTTP/1.1 200"));
    }
    stall_closes(&mut tcp).await;
}

#[tokio::test]
async fn a_request_served_longer_than_the_timeout_leaves_the_next_head_timed() {
    let addr = server().await;
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    // The kept timer's deadline passes while /slow is served.
    assert!(get(&mut tcp, "/slow").await.starts_with("HTTP/1.1 200"));
    assert!(get(&mut tcp, "/").await.starts_with("HTTP/1.1 200"));
    stall_closes(&mut tcp).await;
}

#[tokio::test]
async fn a_first_head_that_stalls_is_closed() {
    let addr = server().await;
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    stall_closes(&mut tcp).await;
}
