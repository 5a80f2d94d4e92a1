//! The operator's cockpit against a live proxy: `/debug/top` counts one
//! ServiceAccount's watches and GETs under its name and takes them back
//! when they end, and `breakwater top --once` (the real binary, against
//! `breakwater demo`) lists a ServiceAccount with its open watches.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const DEMO_SA: &str = "system:serviceaccount:kube-system:breakwater-demo-admin";

/// GETs `/debug/top` from the admin listener.
async fn debug_top(admin: std::net::SocketAddr) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect admin");
    s.write_all(b"GET /debug/top HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/json"), "{head}");
    serde_json::from_str(body).expect("json")
}

fn identity<'a>(view: &'a Value, name: &str) -> Option<&'a Value> {
    view["identities"]["rows"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == name)
}

/// Polls `/debug/top` until `cond` holds for `name`'s row, for up to 20 s.
async fn until_row(
    admin: std::net::SocketAddr,
    name: &str,
    what: &str,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let view = debug_top(admin).await;
        if let Some(row) = identity(&view, name)
            && cond(row)
        {
            return row.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {}",
            serde_json::to_string_pretty(&view["identities"]).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_watches_and_twenty_gets_show_under_their_service_account_then_drain() {
    let env = demo_env().await;
    let c = clients(&env);
    let admin = env.demo.proxy.admin_addr();

    let mut watches = Vec::new();
    for _ in 0..5 {
        watches.push(c.watch("/api/v1/namespaces/default/pods?watch=1").await);
    }
    for _ in 0..20 {
        let ns = c.get_json("/api/v1/namespaces/default").await;
        assert_eq!(ns["metadata"]["name"], "default");
    }

    let row = until_row(
        admin,
        DEMO_SA,
        "5 watches, 25 requests, none in flight",
        |r| r["watches"] == 5 && r["requests"] == 25 && r["inflight"] == 0,
    )
    .await;
    assert_eq!(row["watchOpens"], 5, "{row}");
    assert_eq!(row["throttled"], 0, "{row}");
    assert_eq!(row["forbidden"], 0, "{row}");
    assert!(row["requestsPerSec"].as_f64().expect("rate") > 0.0, "{row}");

    // The rest of the document is there too.
    let view = debug_top(admin).await;
    assert!(view["identities"]["capacity"].as_u64().expect("capacity") >= 512);
    assert!(view["hub"]["subscribers"].as_u64().expect("subscribers") >= 5);
    let lanes: Vec<&str> = view["upstream"]["lanes"]
        .as_array()
        .expect("lanes")
        .iter()
        .filter_map(|l| l["lane"].as_str())
        .collect();
    assert_eq!(lanes, ["unary", "long-running", "exempt", "hub", "own"]);
    let get = view["upstream"]["latency"]
        .as_array()
        .expect("latency")
        .iter()
        .find(|l| l["verbClass"] == "get")
        .expect("get class")
        .clone();
    assert!(get["count"].as_u64().expect("count") >= 20, "{get}");
    assert!(get["p99Seconds"].as_f64().is_some(), "{get}");
    assert_eq!(view["blocks"], serde_json::json!([]));

    // The watches end: the counts go back to zero.
    drop(watches);
    let row = until_row(admin, DEMO_SA, "no watch left", |r| r["watches"] == 0).await;
    assert_eq!(row["inflight"], 0, "{row}");
    assert_eq!(row["requests"], 25, "{row}");
    env.demo.shutdown().await;
}

/// The bar: `breakwater demo` running, five watches open with kubectl as
/// the demo's viewer ServiceAccount, and `breakwater top --once` lists it
/// with 5 watches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_once_lists_a_service_account_with_its_five_watches() {
    use tokio::io::AsyncBufReadExt;
    let bin = env!("CARGO_BIN_EXE_breakwater");
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = tempfile::tempdir().expect("tempdir");
    let mut demo = tokio::process::Command::new(bin)
        .args(["demo", "--dir"])
        .arg(dir.path())
        .env("BREAKWATER_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("demo runs");
    let stdout = demo.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    // The demo prints the command to run; take the admin URL from it.
    let admin = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read demo output") {
            if let Some(rest) = line.trim().strip_prefix("breakwater top --admin ") {
                return rest.trim().to_string();
            }
        }
        panic!("the demo ended without printing the top command");
    })
    .await
    .expect("the demo printed its banner within 60 s");
    assert!(admin.starts_with("http://127.0.0.1:"), "{admin}");

    let viewer = dir.path().join("kubeconfig-viewer");
    let mut kubectls = Vec::new();
    for _ in 0..5 {
        kubectls.push(
            kubectl_cmd(&viewer, cache.path())
                .args(["get", "--raw", "/api/v1/namespaces/demo/pods?watch=1"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("kubectl runs"),
        );
    }

    let sa = "system:serviceaccount:demo:viewer";
    let deadline = Instant::now() + Duration::from_secs(60);
    let last = loop {
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::process::Command::new(bin)
                .args(["top", "--once", "--admin", &admin])
                .output(),
        )
        .await
        .expect("top --once finishes")
        .expect("top runs");
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).expect("utf8");
        // REQ/S INFL WATCH OPEN/S 429/S 403/S NAME [rule]
        let watches = text
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cols| cols.len() >= 7 && cols[6] == sa)
            .map(|cols| cols[2].to_string());
        if watches.as_deref() == Some("5") {
            break text;
        }
        for k in kubectls.iter_mut() {
            assert!(
                k.try_wait().expect("kubectl status").is_none(),
                "a kubectl watch ended early"
            );
        }
        assert!(
            Instant::now() < deadline,
            "{sa} never showed 5 watches:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(last.contains("IDENTITIES"), "{last}");
    assert!(
        last.contains("UPSTREAM") && last.contains("WATCH HUB"),
        "{last}"
    );
    drop(kubectls);
    let _ = demo.start_kill();
    let _ = demo.wait().await;
}
