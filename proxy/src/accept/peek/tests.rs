use super::*;

const TOKEN: &str = "Bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhZG1pbiJ9.c2ln";

fn h1(headers: &str) -> Vec<u8> {
    format!("GET /api/v1/pods?watch=1 HTTP/1.1\r\nHost: x\r\n{headers}\r\n").into_bytes()
}

fn frame_bytes(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A literal field without indexing, name and value raw.
fn literal(name: &str, value: &str) -> Vec<u8> {
    let mut out = vec![0x00];
    for s in [name, value] {
        assert!(s.len() < 127);
        out.push(s.len() as u8);
        out.extend_from_slice(s.as_bytes());
    }
    out
}

/// What a client sends first over h2: the preface, SETTINGS, a
/// WINDOW_UPDATE, then the request's block split over HEADERS (padded, with
/// priority) and a CONTINUATION.
fn h2(fields: &[u8]) -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    out.extend(frame_bytes(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]));
    out.extend(frame_bytes(0x8, 0, 0, &[0, 0x0f, 0, 1]));
    let (head, tail) = fields.split_at(fields.len() / 2);
    let mut headers = vec![2]; // pad length
    headers.extend_from_slice(&[0, 0, 0, 0, 16]); // priority
    headers.extend_from_slice(head);
    headers.extend_from_slice(&[0, 0]); // padding
    out.extend(frame_bytes(HEADERS, PADDED | PRIORITY_FLAG, 1, &headers));
    out.extend(frame_bytes(CONTINUATION, END_HEADERS, 1, tail));
    out
}

fn request_fields(authorization: Option<&str>) -> Vec<u8> {
    // :method GET, :scheme https (static), then literals.
    let mut out = vec![0x82, 0x87];
    out.extend(literal(":path", "/api/v1/namespaces/default"));
    out.extend(literal(":authority", "proxy"));
    if let Some(a) = authorization {
        out.extend(literal("authorization", a));
    }
    out
}

fn found(scan: Scan) -> FirstRequest {
    match scan {
        Scan::Found(first) => first,
        other => panic!("expected a bearer token, got {other:?}"),
    }
}

#[test]
fn an_h1_request_yields_its_bearer_token_once_its_headers_are_complete() {
    let bytes = h1(&format!("Authorization: {TOKEN}\r\n"));
    for n in 0..bytes.len() {
        assert_eq!(scan(Protocol::Http1, &bytes[..n]), Scan::More, "{n} bytes");
    }
    let first = found(scan(Protocol::Http1, &bytes));
    assert_eq!(first.method, http::Method::GET);
    assert_eq!(first.target, "/api/v1/pods?watch=1");
    assert_eq!(first.authorization.as_bytes(), TOKEN.as_bytes());
    assert!(first.authorization.is_sensitive());
    // A body or a pipelined request behind it changes nothing.
    let mut more = bytes.clone();
    more.extend_from_slice(b"GET / HTTP/1.1\r\n");
    assert_eq!(found(scan(Protocol::Http1, &more)), first);
}

#[test]
fn an_h1_request_without_one_bearer_token_stops_the_peek() {
    for headers in [
        String::new(),
        "Authorization: Basic YTpi\r\n".to_string(),
        format!("Authorization: {TOKEN}\r\nAuthorization: {TOKEN}\r\n"),
    ] {
        assert_eq!(
            scan(Protocol::Http1, &h1(&headers)),
            Scan::Stop,
            "{headers:?}"
        );
    }
    assert_eq!(
        scan(Protocol::Http1, b"\x16\x03\x01garbage\r\n\r\n"),
        Scan::Stop
    );
    let many: String = (0..100).map(|i| format!("X-{i}: y\r\n")).collect();
    assert_eq!(scan(Protocol::Http1, &h1(&many)), Scan::Stop);
}

#[test]
fn an_h2_header_block_yields_its_bearer_token_once_it_is_complete() {
    let bytes = h2(&request_fields(Some(TOKEN)));
    for n in 0..bytes.len() {
        assert_eq!(scan(Protocol::Http2, &bytes[..n]), Scan::More, "{n} bytes");
    }
    let first = found(scan(Protocol::Http2, &bytes));
    assert_eq!(first.method, http::Method::GET);
    assert_eq!(first.target, "/api/v1/namespaces/default");
    assert_eq!(first.authorization.as_bytes(), TOKEN.as_bytes());
    // Without ALPN, the preface says h2.
    assert_eq!(found(scan(Protocol::Either, &bytes)), first);
    assert_eq!(
        found(scan(
            Protocol::Either,
            &h1(&format!("authorization: {TOKEN}\r\n"))
        ))
        .target,
        "/api/v1/pods?watch=1"
    );
    assert_eq!(scan(Protocol::Either, &PREFACE[..10]), Scan::More);
}

#[test]
fn an_h2_connection_without_a_clean_first_block_stops_the_peek() {
    // No Authorization.
    assert_eq!(
        scan(Protocol::Http2, &h2(&request_fields(None))),
        Scan::Stop
    );
    // Not the preface.
    assert_eq!(scan(Protocol::Http2, b"GET / HTTP/1.1\r\n\r\n"), Scan::Stop);
    // DATA before any HEADERS.
    let mut data_first = PREFACE.to_vec();
    data_first.extend(frame_bytes(DATA, 0, 1, b"x"));
    assert_eq!(scan(Protocol::Http2, &data_first), Scan::Stop);
    // A SETTINGS frame between HEADERS and its CONTINUATION.
    let fields = request_fields(Some(TOKEN));
    let mut split = PREFACE.to_vec();
    split.extend(frame_bytes(HEADERS, 0, 1, &fields[..4]));
    split.extend(frame_bytes(0x4, 0, 0, &[]));
    split.extend(frame_bytes(CONTINUATION, END_HEADERS, 1, &fields[4..]));
    assert_eq!(scan(Protocol::Http2, &split), Scan::Stop);
    // A malformed block (index 0).
    assert_eq!(scan(Protocol::Http2, &h2(&[0x80, 0x80])), Scan::Stop);
    // A frame bigger than the peek is not waited for.
    let mut huge = PREFACE.to_vec();
    huge.extend_from_slice(&[0x01, 0x00, 0x00, HEADERS, END_HEADERS, 0, 0, 0, 1]);
    assert_eq!(scan(Protocol::Http2, &huge), Scan::Stop);
}

#[tokio::test]
async fn the_peeked_bytes_are_replayed_before_the_connection() {
    let request = h1(&format!("Authorization: {TOKEN}\r\nContent-Length: 5\r\n"));
    let mut sent = request.clone();
    sent.extend_from_slice(b"hello");
    let (mut client, mut server) = tokio::io::duplex(64);
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        client.write_all(&sent).await.expect("write");
        client
    });
    let (read, first) = first_request(&mut server, Protocol::Http1).await;
    assert!(first.is_some());
    assert!(read.len() >= request.len() && read.len() <= MAX_PEEK);
    let _client = writer.await.expect("writer");
    let mut replay = Replay::new(read, server);
    let mut all = vec![0; request.len() + 5];
    replay.read_exact(&mut all).await.expect("read");
    assert_eq!(&all[..request.len()], &request[..]);
    assert_eq!(&all[request.len()..], b"hello");
    assert!(replay.prefix.is_none(), "the prefix is freed once replayed");
}

#[tokio::test(start_paused = true)]
async fn a_silent_or_slow_client_ends_the_peek_at_the_deadline_with_what_it_sent() {
    let (mut client, mut server) = tokio::io::duplex(64);
    {
        use tokio::io::AsyncWriteExt;
        client
            .write_all(b"GET / HTTP/1.1\r\n")
            .await
            .expect("write");
    }
    let started = tokio::time::Instant::now();
    let (read, first) = first_request(&mut server, Protocol::Http1).await;
    assert_eq!(started.elapsed(), PEEK_DEADLINE);
    assert!(first.is_none());
    assert_eq!(read, b"GET / HTTP/1.1\r\n");
}

#[tokio::test]
async fn no_more_than_max_peek_bytes_are_read() {
    let mut endless = tokio::io::repeat(b'a');
    let (read, first) = first_request(&mut endless, Protocol::Http1).await;
    assert!(first.is_none());
    assert!(read.len() <= MAX_PEEK, "{}", read.len());
}

/// What a real HTTP/2 client sends first (hyper's client: h2's HPACK
/// encoder, Huffman where shorter, its own SETTINGS and WINDOW_UPDATE),
/// read until [`scan`] decides.
fn from_real_client(path: &str, token: &str, extra: &[(String, String)]) -> Scan {
    use tokio::io::AsyncReadExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (client, mut server) = tokio::io::duplex(256 * 1024);
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(client),
        )
        .await
        .expect("handshake");
        tokio::spawn(conn);
        let mut req =
            http::Request::get(format!("https://proxy{path}")).header("authorization", token);
        for (name, value) in extra {
            req = req.header(name.as_str(), value.as_str());
        }
        let req = req
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        let _response = tokio::spawn(send.send_request(req));
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n =
                tokio::time::timeout(std::time::Duration::from_secs(5), server.read(&mut chunk))
                    .await
                    .expect("the client sends its request")
                    .expect("read");
            assert!(n > 0, "the client closed before its request was scanned");
            buf.extend_from_slice(&chunk[..n]);
            match scan(Protocol::Http2, &buf) {
                Scan::More => continue,
                decided => return decided,
            }
        }
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Differential: whatever path, token and other headers a real client
    /// sends, the peek reads its path and token exactly.
    #[test]
    fn the_peek_reads_what_a_real_http2_client_sends(
        path in "/api/v1/[a-z0-9/-]{0,60}(\\?[a-z]{1,8}=[a-z0-9]{0,12})?",
        token in "[A-Za-z0-9._-]{1,1500}",
        extra in proptest::collection::vec(("x-[a-z0-9-]{1,20}", "[!-~]([ -~]{0,80}[!-~])?"), 0..8),
    ) {
        let authorization = format!("Bearer {token}");
        let first = found(from_real_client(&path, &authorization, &extra));
        proptest::prop_assert_eq!(first.method, http::Method::GET);
        proptest::prop_assert_eq!(first.target, path);
        proptest::prop_assert_eq!(first.authorization.as_bytes(), authorization.as_bytes());
    }

    /// Whatever bytes arrive, the peek answers without panicking.
    #[test]
    fn the_peek_takes_any_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
        for protocol in [Protocol::Http1, Protocol::Http2, Protocol::Either] {
            let _ = scan(protocol, &bytes);
        }
        let mut h2 = PREFACE.to_vec();
        h2.extend_from_slice(&bytes);
        let _ = scan(Protocol::Http2, &h2);
        let _ = hpack::Decoder::default().decode(&bytes, |_, _| {});
    }
}
