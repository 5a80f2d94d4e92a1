//! The first request's credentials, read before hyper sees the connection.
//!
//! A connection whose client certificate names a privileged identity is
//! served on the privileged thread from its start ([`super::threads`]). A
//! bearer token is sent with each request, so its identity is known only
//! once a request has been read; kubectl and client-go send it as the first
//! thing on the connection, right behind the handshake. So, when some exempt
//! rule could make a token privileged, the connection's first header block
//! is read here: the request line and headers of HTTP/1.1 (httparse), or
//! for HTTP/2 the client preface, the frames before the first HEADERS
//! (SETTINGS, WINDOW_UPDATE, PRIORITY, PING) and the header block itself
//! (HEADERS and CONTINUATION, [`hpack`]-decoded). Its `Authorization:
//! Bearer` only chooses where the connection is served: every byte read is
//! replayed to hyper unchanged ([`Replay`]), and each request is
//! authenticated as before.
//!
//! Bounded: at most [`MAX_PEEK`] bytes and [`PEEK_DEADLINE`]; anything
//! unexpected (no `Authorization`, another scheme, two of them, a frame out
//! of place, a malformed block, a block too big, the deadline) ends the peek
//! and the connection is served as usual with what was read.
//!
//! [`scan`] is the pure core (bytes in, an answer out, unit-tested without
//! sockets); [`first_request`] is the shell that reads.

mod hpack;
#[cfg(test)]
mod tests;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderValue;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The most bytes read before hyper: room for a header block with a 4 KiB
/// token several times over (a bound ServiceAccount token is ~1 KiB, an
/// OIDC one 1–3 KiB), the HTTP/2 preface and the frames before it, and
/// hyper's own limits on HTTP/1.1 headers are higher, so nothing a client
/// may send is cut; past it the request is hyper's alone.
pub const MAX_PEEK: usize = 16 * 1024;

/// How long to wait for the first header block after the handshake. A TLS
/// 1.3 client sends its request in the flight that ends the handshake, so
/// it is normally here already; a TLS 1.2 client sends it one round trip
/// after our Finished, which 100 ms covers within a region, with room for
/// wake-ups on a loaded proxy. Waiting costs a parked task and no CPU, and
/// a client that says nothing loses nothing (hyper would wait for its bytes
/// too); a client slower than this is simply served on the serving runtime.
pub const PEEK_DEADLINE: Duration = Duration::from_millis(100);

/// The HTTP/2 client connection preface (RFC 9113 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// At most this many headers in an HTTP/1.1 request we look into (hyper
/// allows 100; kubectl sends under 10).
const MAX_H1_HEADERS: usize = 64;

/// What the connection speaks, as ALPN chose it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// No ALPN: HTTP/2 with prior knowledge if the preface comes, else
    /// HTTP/1.1 (what hyper's auto builder sniffs).
    Either,
}

impl Protocol {
    pub fn from_alpn(alpn: Option<&[u8]>) -> Protocol {
        match alpn {
            Some(b"h2") => Protocol::Http2,
            Some(_) => Protocol::Http1,
            None => Protocol::Either,
        }
    }
}

/// The first request's method, target and bearer credential.
#[derive(Clone, PartialEq, Eq)]
pub struct FirstRequest {
    pub method: http::Method,
    /// Path and query as sent.
    pub target: String,
    /// The whole `Authorization` value (`Bearer …`), marked sensitive.
    pub authorization: HeaderValue,
}

impl std::fmt::Debug for FirstRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credential.
        f.debug_struct("FirstRequest")
            .field("method", &self.method)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// What the bytes read so far say.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// The header block is not complete yet: read on.
    More,
    /// The first request carries a bearer token.
    Found(FirstRequest),
    /// Stop peeking: no bearer token, or something unexpected.
    Stop,
}

/// Reads from `io` until the first header block is in (at most
/// [`MAX_PEEK`] bytes, for at most [`PEEK_DEADLINE`]). Returns every byte
/// read, to be replayed with [`Replay`], and the request if it carries a
/// bearer token.
pub async fn first_request<I>(io: &mut I, protocol: Protocol) -> (Vec<u8>, Option<FirstRequest>)
where
    I: AsyncRead + Unpin,
{
    let mut buf = Vec::new();
    // read_buf is cancel safe: whatever a read returned before the deadline
    // is in `buf`.
    let found = tokio::time::timeout(PEEK_DEADLINE, read_until_scanned(io, protocol, &mut buf))
        .await
        .ok()
        .flatten();
    (buf, found)
}

async fn read_until_scanned<I>(
    io: &mut I,
    protocol: Protocol,
    buf: &mut Vec<u8>,
) -> Option<FirstRequest>
where
    I: AsyncRead + Unpin,
{
    loop {
        // Grow by what a read may bring, never past MAX_PEEK: a header
        // block is usually one or two TLS records.
        if buf.capacity() == buf.len() {
            let room = (buf.len().max(2048)).min(MAX_PEEK - buf.len());
            if room == 0 {
                return None;
            }
            buf.reserve_exact(room);
        }
        let mut limited = (&mut *io).take((MAX_PEEK - buf.len()) as u64);
        match limited.read_buf(buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        match scan(protocol, buf) {
            Scan::More => continue,
            Scan::Found(first) => return Some(first),
            Scan::Stop => return None,
        }
    }
}

/// The pure core: what `buf`, the connection's first bytes, says.
pub fn scan(protocol: Protocol, buf: &[u8]) -> Scan {
    let h2 = match protocol {
        Protocol::Http1 => false,
        Protocol::Http2 => true,
        // What hyper's auto builder sniffs; a partial preface reads on
        // (scan_h2 says More).
        Protocol::Either => {
            let n = buf.len().min(PREFACE.len());
            buf[..n] == PREFACE[..n]
        }
    };
    if h2 { scan_h2(buf) } else { scan_h1(buf) }
}

fn scan_h1(buf: &[u8]) -> Scan {
    let mut headers = [httparse::EMPTY_HEADER; MAX_H1_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => Scan::More,
        Ok(httparse::Status::Complete(_)) => {
            let authorization = req
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("authorization"))
                .map(|h| h.value);
            found(
                req.method.map(str::as_bytes),
                req.path.map(str::as_bytes),
                authorization,
            )
        }
        // Malformed, or more headers than we look at: hyper decides.
        Err(_) => Scan::Stop,
    }
}

/// HTTP/2 frame types (RFC 9113 6).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const PUSH_PROMISE: u8 = 0x5;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

fn scan_h2(buf: &[u8]) -> Scan {
    let n = buf.len().min(PREFACE.len());
    if buf[..n] != PREFACE[..n] {
        return Scan::Stop;
    }
    let mut rest = &buf[n..];
    if n < PREFACE.len() {
        return Scan::More;
    }
    // The header block, gathered from HEADERS and CONTINUATION fragments,
    // and its stream once HEADERS has come.
    let mut block: Vec<u8> = Vec::new();
    let mut stream = None;
    loop {
        // A frame that could not fit in the peek is never waited for.
        if rest.get(..3).is_some_and(|h| frame_len(h) > MAX_PEEK) {
            return Scan::Stop;
        }
        let Some((
            Frame {
                kind,
                flags,
                stream: id,
                payload,
            },
            tail,
        )) = frame(rest)
        else {
            return Scan::More;
        };
        rest = tail;
        match (kind, stream) {
            (HEADERS, None) => {
                let Some(fragment) = headers_fragment(flags, payload) else {
                    return Scan::Stop;
                };
                block.extend_from_slice(fragment);
                stream = Some(id);
            }
            (CONTINUATION, Some(s)) if s == id => block.extend_from_slice(payload),
            // Nothing may come between HEADERS and its CONTINUATIONs, and
            // these have no place before a first request.
            (_, Some(_)) | (DATA | RST_STREAM | PUSH_PROMISE | GOAWAY | CONTINUATION, None) => {
                return Scan::Stop;
            }
            // SETTINGS, PING, WINDOW_UPDATE, PRIORITY and unknown
            // extension frames (which RFC 9113 5.5 says to ignore).
            (_, None) => continue,
        }
        if flags & END_HEADERS != 0 {
            return h2_fields(&block);
        }
    }
}

/// One HTTP/2 frame.
struct Frame<'a> {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: &'a [u8],
}

/// The next complete frame of `buf` and the rest; `None` while it is
/// incomplete.
fn frame(buf: &[u8]) -> Option<(Frame<'_>, &[u8])> {
    let header = buf.get(..9)?;
    let len = frame_len(header);
    let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
    let payload = buf.get(9..9 + len)?;
    let frame = Frame {
        kind: header[3],
        flags: header[4],
        stream,
        payload,
    };
    Some((frame, &buf[9 + len..]))
}

/// A frame's payload length: the 24 bits its header starts with.
fn frame_len(header: &[u8]) -> usize {
    usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2])
}

/// A HEADERS frame's block fragment, without padding and priority.
fn headers_fragment(flags: u8, payload: &[u8]) -> Option<&[u8]> {
    let (pad, mut payload) = if flags & PADDED != 0 {
        let (&pad, rest) = payload.split_first()?;
        (usize::from(pad), rest)
    } else {
        (0, payload)
    };
    if flags & PRIORITY_FLAG != 0 {
        payload = payload.get(5..)?;
    }
    payload.get(..payload.len().checked_sub(pad)?)
}

fn h2_fields(block: &[u8]) -> Scan {
    let (mut method, mut path) = (None, None);
    let mut authorization = Vec::new();
    let decoded = hpack::Decoder::default().decode(block, |name, value| match name {
        b":method" => method = Some(value.to_vec()),
        b":path" => path = Some(value.to_vec()),
        // HTTP/2 field names are lower case (RFC 9113 8.2.1).
        b"authorization" => authorization.push(value.to_vec()),
        _ => {}
    });
    if decoded.is_err() {
        return Scan::Stop;
    }
    found(
        method.as_deref(),
        path.as_deref(),
        authorization.iter().map(Vec::as_slice),
    )
}

/// `Found` if the request has exactly one `Authorization` and it is a bearer
/// token, as the authenticator would read it; else `Stop`.
fn found<'a>(
    method: Option<&[u8]>,
    target: Option<&[u8]>,
    mut authorization: impl Iterator<Item = &'a [u8]>,
) -> Scan {
    let (Some(value), None) = (authorization.next(), authorization.next()) else {
        return Scan::Stop;
    };
    let is_bearer = value
        .get(..7)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case(b"bearer "));
    let (Some(method), Some(target)) = (method, target) else {
        return Scan::Stop;
    };
    let (Ok(method), Ok(target), Ok(mut authorization)) = (
        http::Method::from_bytes(method),
        std::str::from_utf8(target),
        HeaderValue::from_bytes(value),
    ) else {
        return Scan::Stop;
    };
    if !is_bearer {
        return Scan::Stop;
    }
    authorization.set_sensitive(true);
    Scan::Found(FirstRequest {
        method,
        target: target.to_string(),
        authorization,
    })
}

/// A connection whose first bytes were already read: they are read again
/// first, then the connection itself. Writes go straight through.
pub struct Replay<I> {
    /// Freed once replayed, so an idle connection holds none of it.
    prefix: Option<Box<Prefix>>,
    inner: I,
}

struct Prefix {
    bytes: Vec<u8>,
    at: usize,
}

impl<I> Replay<I> {
    /// `inner`, with `prefix` read before it.
    pub fn new(prefix: Vec<u8>, inner: I) -> Replay<I> {
        Replay {
            prefix: (!prefix.is_empty()).then(|| {
                Box::new(Prefix {
                    bytes: prefix,
                    at: 0,
                })
            }),
            inner,
        }
    }

    pub fn get_mut(&mut self) -> &mut I {
        &mut self.inner
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Replay<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(prefix) = this.prefix.as_deref_mut() {
            let left = &prefix.bytes[prefix.at..];
            let n = left.len().min(buf.remaining());
            buf.put_slice(&left[..n]);
            prefix.at += n;
            if prefix.at == prefix.bytes.len() {
                this.prefix = None;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Replay<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
