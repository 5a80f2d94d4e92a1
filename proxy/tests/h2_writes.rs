//! The vendored h2's write coalescing (vendor/README.md,
//! `h2-write-coalesce.patch`): the DATA frames of many streams that are
//! ready together leave in one write, and bodies of every size still
//! arrive whole.
//!
//! h2 is driven directly over an in-memory pipe that counts the writes the
//! server's connection makes, as the proxy's TLS stream turns each into a
//! record and a `writev`.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

/// A pipe end that counts its writes and, like a TLS stream or a socket,
/// takes vectored writes whole.
struct Counted {
    io: DuplexStream,
    writes: Arc<AtomicUsize>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.writes.fetch_add(1, Ordering::SeqCst);
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let whole: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        self.poll_write(cx, &whole)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

fn body(stream: usize, len: usize) -> Bytes {
    (0..len)
        .map(|i| b'a' + ((stream * 7 + i) % 26) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// Answers one request per entry of `sizes` (a body of that many bytes
/// each), all queued before the server's connection is polled again, and
/// returns how many writes the connection made from then until every body
/// had arrived at the client, whole.
async fn answer_together(sizes: &[usize]) -> usize {
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let writes = Arc::new(AtomicUsize::new(0));
    let server_io = Counted {
        io: server_io,
        writes: writes.clone(),
    };

    let (client, client_conn) = h2::client::handshake(client_io).await.expect("handshake");
    tokio::spawn(async move {
        let _ = client_conn.await;
    });
    let mut server = h2::server::handshake(server_io)
        .await
        .expect("server handshake");

    let mut responses = Vec::new();
    for i in 0..sizes.len() {
        let mut client = client.clone().ready().await.expect("client ready");
        let request = Request::get(format!("https://sim/{i}"))
            .body(())
            .expect("a request");
        let (response, _) = client.send_request(request, true).expect("send");
        responses.push(response);
    }
    let mut respond = Vec::new();
    for _ in sizes {
        let (request, send) = server.accept().await.expect("a stream").expect("ok");
        let i: usize = request.uri().path()[1..].parse().expect("a stream number");
        respond.push((i, send));
    }

    let before = writes.load(Ordering::SeqCst);
    for (i, send) in &mut respond {
        let mut stream = send
            .send_response(Response::new(()), false)
            .expect("response head");
        stream.send_data(body(*i, sizes[*i]), true).expect("body");
    }

    let received = tokio::spawn(async move {
        let mut bodies = Vec::new();
        for response in responses {
            let mut recv = response.await.expect("response").into_body();
            let mut got = Vec::new();
            while let Some(chunk) = recv.data().await {
                let chunk = chunk.expect("data");
                recv.flow_control()
                    .release_capacity(chunk.len())
                    .expect("release");
                got.extend_from_slice(&chunk);
            }
            bodies.push(got);
        }
        bodies
    });
    // Drive the server's connection until the client has every body.
    let bodies = tokio::select! {
        bodies = received => bodies.expect("client task"),
        _ = async { while server.accept().await.is_some() {} } => panic!("connection ended"),
    };
    for (i, got) in bodies.iter().enumerate() {
        assert_eq!(got.len(), sizes[i], "stream {i}'s body length");
        assert!(got[..] == body(i, sizes[i])[..], "stream {i}'s body");
    }
    writes.load(Ordering::SeqCst) - before
}

#[tokio::test]
async fn the_answers_of_ten_streams_ready_together_leave_in_one_write() {
    // Ten ConfigMap-sized answers: unpatched, each DATA frame past 256
    // bytes was chained and flushed alone (ten writes at least).
    let writes = answer_together(&[1_400; 10]).await;
    assert_eq!(
        writes, 1,
        "ten answers ready together left in {writes} writes"
    );
}

#[tokio::test]
async fn bodies_of_every_size_arrive_whole_when_coalesced() {
    // Small, chained (past the copy limit), multi-frame and past the
    // connection's initial window (65,535 bytes: the client's window
    // updates must reach the server's queued frames).
    let sizes = [
        0, 1, 255, 256, 1_400, 8_192, 8_193, 16_384, 40_000, 70_000, 3,
    ];
    let writes = answer_together(&sizes).await;
    assert!(writes >= 2, "{writes} writes for {sizes:?}");
}
