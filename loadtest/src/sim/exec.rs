//! `pods/exec` over WebSocket, the way kubectl ≥ 1.30 speaks it.
//!
//! kube-sim runs no containers, so a session "runs" the command by echoing
//! its arguments: stdout gets the `command` query values after the first
//! (the program) joined by ' ' plus "\n", then the error channel gets a Success Status and the connection
//! closes. That is enough for `kubectl exec pod -- echo hi` to print `hi` and
//! exit 0, and for a proxy in front to see a real upgraded, long-lived
//! connection.
//!
//! Channel protocol (k8s.io/apimachinery/pkg/util/httpstream/wsstream and
//! client-go/tools/remotecommand/websocket.go): binary messages whose first
//! byte is the channel (0 stdin, 1 stdout, 2 stderr, 3 error/status,
//! 4 resize); `v5.channel.k8s.io` adds 255 = "close channel N". The status
//! format of v4 and v5 is the same JSON `Status`; older protocols differ and
//! are refused. SPDY (kubectl's fallback) is not implemented: a request
//! without a WebSocket upgrade gets a 400 Status saying so.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};

use crate::error::Chain;
use crate::sim::discovery::{json_response, status_body};

/// Subprotocols we speak, most preferred first.
pub const PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];

/// Channel ids of the remotecommand protocol.
pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const ERROR: u8 = 3;
pub const RESIZE: u8 = 4;
/// v5: `[255, N]` closes channel N.
pub const CLOSE: u8 = 255;

/// How long the echo "process" takes to start and write, as a node's
/// kubelet, CRI and container runtime take tens of milliseconds from the
/// exec request to the first output. client-go creates its stream readers
/// while its demultiplexing loop already reads (`readDemuxLoop` discards,
/// with "Unknown stream id", a message for a stream not created yet), so
/// output written the instant the upgrade completes races kubectl, which no
/// real node does; on a loaded machine kubectl lost the race and failed
/// with "closed all streams". There is nothing on the wire to wait for.
const PROCESS_START: Duration = Duration::from_millis(50);

/// How long a finished session waits for the client's close before dropping
/// the connection (a client that never answers must not pin the task).
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// What the client asked to run, from the query string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOptions {
    pub command: Vec<String>,
    pub container: Option<String>,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl ExecOptions {
    /// Parses the exec query (`command` repeats; booleans are "true"/"1").
    pub fn from_query(query: Option<&str>) -> ExecOptions {
        let mut o = ExecOptions::default();
        let truthy = |v: &str| v == "true" || v == "1";
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match k.as_ref() {
                "command" => o.command.push(v.into_owned()),
                "container" => o.container = Some(v.into_owned()),
                "stdin" => o.stdin = truthy(&v),
                "stdout" => o.stdout = truthy(&v),
                "stderr" => o.stderr = truthy(&v),
                "tty" => o.tty = truthy(&v),
                _ => {}
            }
        }
        o
    }

    /// What the simulated command writes to stdout: its arguments (argv[1..])
    /// joined by ' ' plus "\n", as `echo` would, so `kubectl exec pod --
    /// echo hi` prints "hi" like against a real cluster.
    pub fn output(&self) -> String {
        let args = self.command.get(1..).unwrap_or(&[]);
        format!("{}\n", args.join(" "))
    }
}

/// The error-channel document of a successful run (v4/v5).
pub const SUCCESS_STATUS: &str = r#"{"metadata":{},"status":"Success"}"#;

/// Answers an exec request: 101 + a spawned session for a WebSocket upgrade
/// speaking v5/v4.channel.k8s.io, a 400 Status otherwise.
pub fn serve(req: Request<hyper::body::Incoming>) -> Response<Bytes> {
    let (key, protocol) = match negotiate(req.headers()) {
        Ok(v) => v,
        Err(message) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                &status_body(400, "BadRequest", message),
            );
        }
    };
    let options = ExecOptions::from_query(req.uri().query());
    let mut resp = Response::new(Bytes::new());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(protocol),
    );
    // The session runs on the upgraded connection after hyper has written
    // the 101; it owns everything it needs, so it outlives this handler.
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                if let Err(e) = run_session(ws, &options).await {
                    tracing::debug!(error = %Chain(&e), "exec session ended with an error");
                }
            }
            Err(e) => tracing::debug!(error = %Chain(&e), "exec upgrade failed"),
        }
    });
    resp
}

/// Checks the upgrade headers; returns the client key and our protocol.
fn negotiate(headers: &HeaderMap) -> Result<(String, &'static str), &'static str> {
    const NOT_WEBSOCKET: &str = "kube-sim supports pods/exec only over WebSocket (v5.channel.k8s.io or v4.channel.k8s.io); SPDY is not supported";
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return Err(NOT_WEBSOCKET);
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .ok_or("missing Sec-WebSocket-Key")?
        .to_string();
    let offered: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(|t| t.trim().to_string())
        .collect();
    let protocol = PROTOCOLS
        .iter()
        .find(|p| offered.iter().any(|o| o == *p))
        .ok_or(
            "no supported streaming protocol offered (want v5.channel.k8s.io or v4.channel.k8s.io)",
        )?;
    Ok((key, protocol))
}

/// Runs one exec session on an established WebSocket: output, status, close.
///
/// Stdin and resize messages are read and discarded: the echo "process" does
/// not read them, and draining keeps a client with `-i` from blocking on a
/// full socket before it sees the status.
pub async fn run_session<S>(
    mut ws: WebSocketStream<S>,
    options: &ExecOptions,
) -> Result<(), tokio_tungstenite::tungstenite::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::sleep(PROCESS_START).await;
    if options.stdout {
        ws.send(channel_message(STDOUT, options.output().as_bytes()))
            .await?;
    }
    ws.send(channel_message(ERROR, SUCCESS_STATUS.as_bytes()))
        .await?;
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    })))
    .await?;
    // Wait (bounded) for the client's close so the TCP connection ends
    // cleanly instead of with a reset while the client still writes stdin.
    let drain = async {
        while let Some(msg) = ws.next().await {
            if msg.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_WAIT, drain).await;
    Ok(())
}

/// A binary message on `channel`.
pub fn channel_message(channel: u8, data: &[u8]) -> Message {
    let mut buf = Vec::with_capacity(data.len() + 1);
    buf.push(channel);
    buf.extend_from_slice(data);
    Message::Binary(Bytes::from(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn query_parses_repeated_commands_and_flags() {
        let o = ExecOptions::from_query(Some(
            "command=echo&command=hi&command=a%20b&container=c&stdout=true&stderr=1&stdin=false",
        ));
        assert_eq!(o.command, vec!["echo", "hi", "a b"]);
        assert_eq!(o.container.as_deref(), Some("c"));
        assert!(o.stdout && o.stderr && !o.stdin && !o.tty);
        assert_eq!(o.output(), "hi a b\n");
        assert_eq!(ExecOptions::from_query(None).output(), "\n");
    }

    #[test]
    fn negotiation_prefers_v5_and_refuses_spdy() {
        let kubectl = headers(&[
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            (
                "sec-websocket-protocol",
                "v5.channel.k8s.io, v4.channel.k8s.io, v3.channel.k8s.io, v2.channel.k8s.io, channel.k8s.io",
            ),
        ]);
        assert_eq!(
            negotiate(&kubectl),
            Ok(("dGhlIHNhbXBsZSBub25jZQ==".to_string(), "v5.channel.k8s.io"))
        );
        let v4_only = headers(&[
            ("upgrade", "websocket"),
            ("connection", "keep-alive, Upgrade"),
            ("sec-websocket-key", "k"),
            ("sec-websocket-protocol", "v4.channel.k8s.io"),
        ]);
        assert_eq!(negotiate(&v4_only).map(|(_, p)| p), Ok("v4.channel.k8s.io"));
        let old = headers(&[
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-key", "k"),
            ("sec-websocket-protocol", "channel.k8s.io"),
        ]);
        assert!(negotiate(&old).is_err());
        let spdy = headers(&[
            ("upgrade", "SPDY/3.1"),
            ("connection", "Upgrade"),
            ("x-stream-protocol-version", "v4.channel.k8s.io"),
        ]);
        assert!(negotiate(&spdy).is_err());
    }

    #[test]
    fn channel_messages_are_prefixed_with_the_channel_id() {
        let Message::Binary(b) = channel_message(STDOUT, b"hi\n") else {
            panic!("binary message");
        };
        assert_eq!(&b[..], b"\x01hi\n");
    }
}
