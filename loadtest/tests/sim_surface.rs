//! kube-sim's pods/exec over a real socket: a minimal hyper HTTP/1.1 server
//! routes every request to `exec::serve`, and a tokio-tungstenite client
//! speaks `v5.channel.k8s.io` to it the way kubectl does.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use breakwater_loadtest::sim::exec;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Serves `exec::serve` on 127.0.0.1:0; returns the address.
async fn exec_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = service_fn(|req| async move {
                    Ok::<_, Infallible>(exec::serve(req).map(Full::new))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

const EXEC_PATH: &str = "/api/v1/namespaces/demo/pods/web-0/exec?command=echo&command=hi&container=web&stdout=true&stderr=true";

/// Everything the server sends until it closes: binary messages in order.
async fn read_all<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Vec<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut got = Vec::new();
    // Bounded: the session sends three frames; 16 is plenty.
    for _ in 0..16 {
        let next = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("server answers within 10s");
        match next {
            Some(Ok(Message::Binary(b))) => got.push(b.to_vec()),
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("websocket error: {e}"),
        }
    }
    got
}

#[tokio::test]
async fn exec_over_v5_websocket_echoes_the_command_then_reports_success() {
    let addr = exec_server().await;
    let mut req = format!("ws://{addr}{EXEC_PATH}")
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "v5.channel.k8s.io, v4.channel.k8s.io, v3.channel.k8s.io"
            .parse()
            .expect("header"),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    assert_eq!(resp.status(), http::StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(
        resp.headers()["sec-websocket-protocol"],
        "v5.channel.k8s.io"
    );

    let got = read_all(&mut ws).await;
    assert_eq!(got.len(), 2, "stdout then status: {got:?}");
    assert_eq!(got[0], b"\x01hi\n");
    assert_eq!(got[1][0], exec::ERROR);
    let status: serde_json::Value = serde_json::from_slice(&got[1][1..]).expect("status JSON");
    assert_eq!(status["status"], "Success");
}

#[tokio::test]
async fn exec_with_stdin_ignores_input_and_still_finishes() {
    let addr = exec_server().await;
    let path = EXEC_PATH.replace("stderr=true", "stderr=true&stdin=true");
    let mut req = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "v4.channel.k8s.io".parse().expect("header"),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    assert_eq!(
        resp.headers()["sec-websocket-protocol"],
        "v4.channel.k8s.io"
    );
    // Client input (stdin data, v5 close-stdin) must not disturb the session.
    ws.send(Message::Binary(vec![exec::STDIN, b'x'].into()))
        .await
        .expect("send stdin");
    let got = read_all(&mut ws).await;
    assert_eq!(got.first().map(Vec::as_slice), Some(&b"\x01hi\n"[..]));
    assert_eq!(got.last().map(|m| m[0]), Some(exec::ERROR));
}

#[tokio::test]
async fn exec_without_websocket_upgrade_is_a_400_status() {
    let addr = exec_server().await;
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    // kubectl's SPDY fallback: POST with Upgrade: SPDY/3.1.
    let req = http::Request::post(EXEC_PATH)
        .header("host", addr.to_string())
        .header("connection", "Upgrade")
        .header("upgrade", "SPDY/3.1")
        .header("x-stream-protocol-version", "v4.channel.k8s.io")
        .body(Full::new(bytes::Bytes::new()))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), http::StatusCode::BAD_REQUEST);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .expect("body")
        .to_bytes();
    let status: serde_json::Value = serde_json::from_slice(&body).expect("Status JSON");
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["code"], 400);
    assert!(
        status["message"]
            .as_str()
            .is_some_and(|m| m.contains("WebSocket"))
    );
}

// ---- real kubectl against a running kube-sim --------------------------------

mod kubectl {
    use std::path::Path;

    use breakwater_loadtest::sim::resources;

    /// A kube-sim with the demo seed, and a kubeconfig for its admin in a
    /// private temp dir (removed on drop).
    pub use crate::common::Kubectl as Env;

    pub fn available() -> bool {
        crate::common::kubectl_available()
    }

    pub async fn start() -> Env {
        Env::new(crate::common::start().await, "sim-surface")
    }

    pub fn path_str(p: &Path) -> &str {
        p.to_str().expect("utf-8 temp path")
    }

    #[tokio::test]
    async fn kubectl_discovers_lists_and_prints_tables() {
        if !available() {
            return;
        }
        let env = start().await;
        let (out, err) = env.run(&["get", "ns"]).await;
        assert!(out.starts_with("NAME"), "{out}");
        assert!(out.contains("demo ") && out.contains("Active"), "{out}");
        assert!(err.is_empty(), "discovery fallback must be silent: {err}");

        let (out, _) = env.run(&["api-resources"]).await;
        for line in ["configmaps", "deployments", "leases", "tokenreviews"] {
            assert!(out.contains(line), "{line} in {out}");
        }
        let (out, _) = env.run(&["get", "pods", "-A", "-o", "wide"]).await;
        let header = out.lines().next().expect("header");
        for col in [
            "NAMESPACE",
            "READY",
            "STATUS",
            "RESTARTS",
            "AGE",
            "IP",
            "NODE",
            "NOMINATED NODE",
            "READINESS GATES",
        ] {
            assert!(header.contains(col), "{col} in {header}");
        }
        assert!(
            out.contains("web-0") && out.contains("1/1") && out.contains("Running"),
            "{out}"
        );
        let (out, _) = env.run(&["get", "nodes"]).await;
        assert!(out.contains("node-1") && out.contains("Ready"), "{out}");
    }

    #[tokio::test]
    async fn kubectl_apply_creates_then_updates_with_strict_validation() {
        if !available() {
            return;
        }
        let env = start().await;
        let manifest = |value: &str| {
            format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\n  namespace: demo\ndata:\n  key: \"{value}\"\n"
            )
        };
        let f = env.file("cm.yaml", &manifest("one"));
        let (out, err) = env.run(&["apply", "-f", path_str(&f)]).await;
        assert!(out.contains("configmap/applied created"), "{out}");
        assert!(err.is_empty(), "no openapi warnings: {err}");

        let f = env.file("cm.yaml", &manifest("two"));
        let (out, err) = env.run(&["apply", "-f", path_str(&f)]).await;
        assert!(out.contains("configmap/applied configured"), "{out}");
        assert!(err.is_empty(), "no openapi warnings: {err}");

        let rt = resources::find("", "v1", "configmaps").expect("type");
        let cm = env
            .sim
            .store()
            .get(rt, Some("demo"), "applied")
            .expect("stored");
        assert_eq!(cm["data"]["key"], "two");

        let (out, _) = env
            .run(&["get", "cm", "applied", "-n", "demo", "-o", "yaml"])
            .await;
        assert!(
            out.contains("key: two") && out.contains("kind: ConfigMap"),
            "{out}"
        );
        let (out, _) = env
            .run(&[
                "create",
                "cm",
                "created",
                "-n",
                "demo",
                "--from-literal=a=b",
            ])
            .await;
        assert!(out.contains("configmap/created created"), "{out}");
    }

    #[tokio::test]
    async fn kubectl_exec_prints_the_echoed_arguments() {
        if !available() {
            return;
        }
        let env = start().await;
        let (out, _) = env
            .run(&["exec", "-n", "demo", "web-0", "--", "echo", "hi"])
            .await;
        assert_eq!(out, "hi\n");
    }

    #[tokio::test]
    async fn kubectl_get_watch_prints_rows_for_new_objects() {
        if !available() {
            return;
        }
        let env = start().await;
        let mut kubectl = env.spawn_lines(&["get", "cm", "-n", "demo", "-w"]);
        let header = kubectl.next().await;
        assert!(
            header.starts_with("NAME") && header.contains("DATA"),
            "{header}"
        );
        // The seed has two configmaps in demo; wait until both are printed.
        let (a, b) = (kubectl.next().await, kubectl.next().await);
        assert!(a.contains("-config") && b.contains("-config"), "{a} / {b}");

        let rt = resources::find("", "v1", "configmaps").expect("type");
        env.sim
            .store()
            .create(
                rt,
                Some("demo"),
                serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "watched", "namespace": "demo"}, "data": {"k": "v"}}),
            )
            .expect("create");
        let row = kubectl.next().await;
        assert!(row.starts_with("watched") && row.contains(" 1 "), "{row}");
        kubectl.child.kill().await.expect("stop kubectl");
    }
}
