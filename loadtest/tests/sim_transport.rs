//! kube-sim's transport against the apiserver's (sim/transport.rs): the
//! HTTP/2 settings kube-apiserver gives Go's server, its response headers,
//! and Go's flush pattern (HEADERS and DATA in separate TLS records). Each
//! test also runs with `go_like_transport: false`, where hyper's defaults
//! must show, so none passes by accident.

mod common;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use breakwater_loadtest::sim::transport::{GO_MAX_HEADER_LIST_SIZE, GO_STREAM_WINDOW};
use breakwater_loadtest::sim::{KubeSim, SimConfig};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

const CONFIGMAP: &str = "/api/v1/namespaces/demo/configmaps";

async fn sim(go_like: bool) -> KubeSim {
    common::start_with(SimConfig {
        go_like_transport: go_like,
        ..SimConfig::default()
    })
    .await
}

/// TLS (ALPN h2) over `io` to `sim`, as the admin.
async fn tls<IO>(sim: &KubeSim, io: IO) -> tokio_rustls::client::TlsStream<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let admin = sim.pki().admin_client().expect("admin cert");
    let mut cfg = common::client_tls(sim, Some(&admin));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::IpAddress(sim.addr().ip().into()), io)
        .await
        .expect("TLS handshake")
}

/// One HTTP/2 frame: type, flags, stream, payload.
struct H2Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> H2Frame {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await.expect("frame header");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0; len];
    r.read_exact(&mut payload).await.expect("frame payload");
    H2Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    }
}

/// What kube-sim announces on a new HTTP/2 connection: its SETTINGS (id →
/// value) and the connection window it opens with WINDOW_UPDATE.
async fn announced(sim: &KubeSim) -> (Vec<(u16, u32)>, u32) {
    let tcp = TcpStream::connect(sim.addr()).await.expect("connect");
    let mut io = tls(sim, tcp).await;
    // The client preface, an empty SETTINGS frame, and a PING. hyper may
    // answer that PING in the same write as (and ahead of) its window
    // update, so a second PING, sent once the first is answered, marks the
    // end of what kube-sim sends on its own at the start.
    io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("preface");
    io.write_all(b"\x00\x00\x08\x06\x00\x00\x00\x00\x00breakwtr")
        .await
        .expect("ping");
    io.flush().await.expect("flush");
    let mut settings = None;
    let mut window = 65_535u32;
    let mut pongs = 0;
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let f = read_frame(&mut io).await;
            match (f.kind, f.flags & 1, f.stream) {
                (4, 0, 0) => {
                    settings = Some(
                        f.payload
                            .chunks(6)
                            .map(|c| {
                                (
                                    u16::from_be_bytes([c[0], c[1]]),
                                    u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                                )
                            })
                            .collect(),
                    );
                }
                (8, _, 0) => {
                    let inc = u32::from_be_bytes([
                        f.payload[0],
                        f.payload[1],
                        f.payload[2],
                        f.payload[3],
                    ]) & 0x7fff_ffff;
                    window += inc;
                }
                (6, 1, 0) => {
                    pongs += 1;
                    if pongs == 2 {
                        break;
                    }
                    io.write_all(b"\x00\x00\x08\x06\x00\x00\x00\x00\x00breakwtr")
                        .await
                        .expect("second ping");
                    io.flush().await.expect("flush");
                }
                _ => {}
            }
        }
    })
    .await
    .expect("kube-sim's preface arrived");
    (settings.expect("a SETTINGS frame"), window)
}

#[tokio::test]
async fn http2_settings_are_the_apiservers() {
    let go = sim(true).await;
    let (settings, window) = announced(&go).await;
    let get = |id: u16| settings.iter().find(|(i, _)| *i == id).map(|(_, v)| *v);
    // MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE,
    // MAX_HEADER_LIST_SIZE as kube-apiserver configures Go's server.
    assert_eq!(get(3), Some(250), "{settings:?}");
    assert_eq!(get(4), Some(256 * 1024), "{settings:?}");
    assert_eq!(get(5), Some(256 * 1024), "{settings:?}");
    assert_eq!(get(6), Some(GO_MAX_HEADER_LIST_SIZE), "{settings:?}");
    // The connection window: MaxUploadBufferPerConnection = 256 KiB × 250.
    assert_eq!(window, GO_STREAM_WINDOW * 250);
    go.shutdown().await;

    let hyper = sim(false).await;
    let (settings, window) = announced(&hyper).await;
    let get = |id: u16| settings.iter().find(|(i, _)| *i == id).map(|(_, v)| *v);
    assert_eq!(get(3), Some(250), "the stream limit holds either way");
    assert_ne!(get(4), Some(256 * 1024), "{settings:?}");
    assert_ne!(window, GO_STREAM_WINDOW * 250);
    hyper.shutdown().await;
}

/// A GET's response headers over `h2` or HTTP/1.1.
async fn get_headers(sim: &KubeSim, h2: bool) -> http::HeaderMap {
    let admin = sim.pki().admin_client().expect("admin cert");
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(h2)
        .build::<_, Full<Bytes>>(common::connector(sim, Some(&admin), h2));
    let resp = client
        .get(format!("{}{CONFIGMAP}", sim.url()).parse().expect("uri"))
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    resp.into_body().collect().await.expect("body");
    headers
}

#[tokio::test]
async fn responses_carry_the_apiservers_headers() {
    let go = sim(true).await;
    for h2 in [true, false] {
        let a = get_headers(&go, h2).await;
        let b = get_headers(&go, h2).await;
        let s = |h: &http::HeaderMap, n: &str| {
            h.get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(s(&a, "cache-control"), "no-cache, private", "h2={h2}");
        assert_eq!(s(&a, "content-type"), "application/json", "h2={h2}");
        assert!(!s(&a, "date").is_empty(), "h2={h2}: {a:?}");
        assert!(!s(&a, "content-length").is_empty(), "h2={h2}: {a:?}");
        // A fresh audit id per request; the APF uids of the one flow.
        assert_eq!(s(&a, "audit-id").len(), 36, "h2={h2}: {a:?}");
        assert_ne!(s(&a, "audit-id"), s(&b, "audit-id"));
        for apf in [
            "x-kubernetes-pf-flowschema-uid",
            "x-kubernetes-pf-prioritylevel-uid",
        ] {
            assert_eq!(s(&a, apf).len(), 36, "h2={h2}: {a:?}");
            assert_eq!(s(&a, apf), s(&b, apf));
        }
    }
    go.shutdown().await;

    let hyper = sim(false).await;
    let h = get_headers(&hyper, true).await;
    assert!(!h.contains_key("audit-id"), "{h:?}");
    hyper.shutdown().await;
}

/// A TCP stream that counts the TLS application-data records it reads
/// (content type 23: every record after a TLS 1.3 handshake). One write
/// by the server's TLS layer is at least one record, so records say how
/// many writes a response took.
struct RecordCounter {
    tcp: TcpStream,
    records: Arc<AtomicUsize>,
    header: Vec<u8>,
    remaining: usize,
}

impl RecordCounter {
    fn count(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(bytes.len());
                self.remaining -= n;
                bytes = &bytes[n..];
                continue;
            }
            let need = 5 - self.header.len();
            let n = need.min(bytes.len());
            self.header.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.header.len() == 5 {
                if self.header[0] == 23 {
                    self.records.fetch_add(1, Ordering::SeqCst);
                }
                self.remaining = u16::from_be_bytes([self.header[3], self.header[4]]) as usize;
                self.header.clear();
            }
        }
    }
}

impl AsyncRead for RecordCounter {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let fresh = buf.filled()[before..].to_vec();
            this.count(&fresh);
        }
        r
    }
}

impl AsyncWrite for RecordCounter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// TLS records a GET of `path`'s response took over HTTP/2 (after a
/// first GET has settled the connection: SETTINGS, tickets).
async fn records_per_response(sim: &KubeSim, path: &str) -> usize {
    let records = Arc::new(AtomicUsize::new(0));
    let tcp = TcpStream::connect(sim.addr()).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let io = tls(
        sim,
        RecordCounter {
            tcp,
            records: records.clone(),
            header: Vec::new(),
            remaining: 0,
        },
    )
    .await;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let mut get = async || {
        let req = http::Request::get(format!("{}{path}", sim.url()))
            .body(Full::<Bytes>::default())
            .expect("request");
        let resp = send.send_request(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.expect("body").to_bytes()
    };
    get().await;
    let before = records.load(Ordering::SeqCst);
    let body = get().await;
    assert!(!body.is_empty());
    records.load(Ordering::SeqCst) - before
}

/// A ConfigMap of about 8 KiB: larger than Go's 4 KiB handler buffer.
fn seed_large(sim: &KubeSim) -> String {
    let rt = breakwater_loadtest::sim::resources::find("", "v1", "configmaps").expect("served");
    sim.store()
        .create(
            rt,
            Some("demo"),
            serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "large", "namespace": "demo"},
                "data": {"blob": "x".repeat(8 * 1024)}}),
        )
        .expect("create");
    format!("{CONFIGMAP}/large")
}

#[tokio::test]
async fn http2_headers_and_data_leave_in_separate_writes_as_from_go() {
    let small = format!("{CONFIGMAP}/agent-config");
    let go = sim(true).await;
    let large = seed_large(&go);
    // A small body: HEADERS, then DATA with END_STREAM.
    assert_eq!(records_per_response(&go, &small).await, 2);
    // A large one: HEADERS, DATA, then an empty DATA with END_STREAM.
    assert_eq!(records_per_response(&go, &large).await, 3);
    go.shutdown().await;

    // hyper's own pattern: all frames in one write.
    let hyper = sim(false).await;
    let large = seed_large(&hyper);
    assert_eq!(records_per_response(&hyper, &small).await, 1);
    assert_eq!(records_per_response(&hyper, &large).await, 1);
    hyper.shutdown().await;
}

#[tokio::test]
async fn a_large_http2_body_comes_without_content_length_as_from_go() {
    for (go_like, has_length) in [(true, false), (false, true)] {
        let sim = sim(go_like).await;
        let large = seed_large(&sim);
        let admin = sim.pki().admin_client().expect("admin cert");
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build::<_, Full<Bytes>>(common::connector(&sim, Some(&admin), true));
        let resp = client
            .get(format!("{}{large}", sim.url()).parse().expect("uri"))
            .await
            .expect("GET");
        assert_eq!(
            resp.headers().contains_key("content-length"),
            has_length,
            "go_like={go_like}: {:?}",
            resp.headers()
        );
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert!(body.len() > 8 * 1024);
        sim.shutdown().await;
    }
}
