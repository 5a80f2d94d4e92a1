//! New connections end to end: the caps close a connection at once and
//! count it, and silent or slow clients cannot hold up other handshakes.

mod common;

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use breakwater::accept::ConnectionLimits;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use common::{counter_sum, demo_env, get, https_client, passthrough_config, scrape};

/// Whether the proxy closes `conn` (EOF or reset) within `within`.
async fn closed_within(conn: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, conn.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_the_per_source_cap_is_closed_at_once_and_counted() {
    let env = demo_env().await;
    let mut cfg = passthrough_config(&env, env.demo.sim.url(), Duration::from_secs(1));
    cfg.connections = ConnectionLimits {
        max_connections_per_source: 3,
        ..ConnectionLimits::default()
    };
    let proxy = breakwater::server::start(cfg).await.expect("start");
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(proxy.addr()).await.expect("connect"));
    }
    let started = Instant::now();
    let mut over = TcpStream::connect(proxy.addr()).await.expect("connect");
    assert!(closed_within(&mut over, Duration::from_secs(2)).await);
    assert!(started.elapsed() < Duration::from_secs(2));
    // The held ones are still open (they are in their handshake).
    assert!(!closed_within(&mut held[0], Duration::from_millis(100)).await);

    // One closes: a real client gets in again.
    held.pop();
    let client = https_client(&env.demo.proxy_ca_pem, true);
    let url = format!("https://{}/version", proxy.addr());
    let mut code = 0;
    for _ in 0..50 {
        if let Ok(resp) = client.request(get(&url, &env.demo.token)).await {
            code = resp.status().as_u16();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(code, 200);
    let metrics = scrape(proxy.admin_addr()).await;
    assert!(
        counter_sum(
            &metrics,
            "breakwater_connections_refused_total",
            &["reason=\"per_source\""]
        ) >= 1.0,
        "{metrics}"
    );
    drop(held);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_stalled_clients_do_not_hold_up_other_handshakes() {
    let env = demo_env().await;
    let mut cfg = passthrough_config(&env, env.demo.sim.url(), Duration::from_secs(1));
    cfg.connections = ConnectionLimits {
        max_handshakes: NonZeroUsize::MIN,
        ..ConnectionLimits::default()
    };
    let proxy = breakwater::server::start(cfg).await.expect("start");
    // Fifty connections that never say a word, and ten that send the start
    // of a TLS record and stall: with one handshake slot, any of them
    // holding it would stall every handshake for the 10 s timeout.
    let mut idle = Vec::new();
    for i in 0..60 {
        let mut conn = TcpStream::connect(proxy.addr()).await.expect("connect");
        if i % 6 == 0 {
            use tokio::io::AsyncWriteExt;
            conn.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
                .await
                .expect("write");
        }
        idle.push(conn);
    }
    let client = https_client(&env.demo.proxy_ca_pem, true);
    let url = format!("https://{}/version", proxy.addr());
    let started = Instant::now();
    let resp = client
        .request(get(&url, &env.demo.token))
        .await
        .expect("response");
    assert_eq!(resp.status(), 200);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "a handshake took {took:?}");
    drop(idle);
    proxy.shutdown().await;
}

/// A measurement, not a check (timings on a shared 2-core machine are
/// noisy): `cargo test -p breakwater --test connections -- --ignored
/// --nocapture`. 1,000 new TLS connections at once, each with one request,
/// while an established connection keeps asking and, mid-storm, a new
/// client (the admin's next kubectl) connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run with --ignored --nocapture"]
async fn measure_requests_during_a_handshake_storm() {
    let env = demo_env().await;
    let mut cfg = passthrough_config(&env, env.demo.sim.url(), Duration::from_secs(1));
    cfg.connections = ConnectionLimits {
        max_connections_per_source: 0,
        ..ConnectionLimits::default()
    };
    let proxy = breakwater::server::start(cfg).await.expect("start");
    let url = format!("https://{}/version", proxy.addr());
    let token = env.demo.token.clone();
    let established = https_client(&env.demo.proxy_ca_pem, true);
    assert_eq!(
        established
            .request(get(&url, &token))
            .await
            .expect("warm")
            .status(),
        200
    );
    let started = Instant::now();
    let mut storm = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let (ca, url, token) = (env.demo.proxy_ca_pem.clone(), url.clone(), token.clone());
        storm.spawn(async move {
            let client = https_client(&ca, true);
            client
                .request(get(&url, &token))
                .await
                .map(|r| r.status().as_u16())
        });
    }
    let mut on_established = Vec::new();
    let mut new_client = None;
    while !storm.is_empty() && started.elapsed() < Duration::from_secs(30) {
        let t = Instant::now();
        let resp = established.request(get(&url, &token)).await.expect("resp");
        assert_eq!(resp.status(), 200);
        on_established.push(t.elapsed());
        if new_client.is_none() && started.elapsed() > Duration::from_millis(200) {
            let t = Instant::now();
            let fresh = https_client(&env.demo.proxy_ca_pem, true);
            let code = fresh
                .request(get(&url, &token))
                .await
                .map(|r| r.status().as_u16());
            new_client = Some((t.elapsed(), code.ok()));
        }
        while storm.try_join_next().is_some() {}
    }
    while storm.join_next().await.is_some() {}
    let storm_took = started.elapsed();
    on_established.sort();
    let pct = |p: f64| on_established[((on_established.len() - 1) as f64 * p) as usize];
    eprintln!(
        "storm of 1000 new TLS connections took {storm_took:?}; established connection: \
         {} requests, p50 {:?}, p99 {:?}, max {:?}; a new client mid-storm: {new_client:?}",
        on_established.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0),
    );
    proxy.shutdown().await;
}

/// A TLS connection to `addr`, presenting `cert`/`key` when given (the
/// demo's admin: system:masters) and offering `alpn` (none when empty).
async fn tls_connection(
    env: &common::Env,
    addr: std::net::SocketAddr,
    client_cert: Option<(&str, &str)>,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let dir = env.dir.path();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(dir.join("proxy-ca.crt")).expect("ca") {
        roots.add(cert.expect("ca cert")).expect("add ca");
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut config = match client_cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(dir.join(cert))
                    .expect("cert")
                    .collect::<Result<Vec<_>, _>>()
                    .expect("cert"),
                PrivateKeyDer::from_pem_file(dir.join(key)).expect("key"),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").expect("name"), tcp)
        .await
        .expect("TLS")
}

/// One HTTP/1.1 connection to `addr` over TLS (no ALPN), presenting
/// `cert`/`key` when given.
async fn h1_connection(
    env: &common::Env,
    addr: std::net::SocketAddr,
    client_cert: Option<(&str, &str)>,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let tls = tls_connection(env, addr, client_cert, &[]).await;
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .expect("HTTP/1.1");
    tokio::spawn(conn);
    sender
}

/// GET `path` on `sender` (with `token` when given): the status.
async fn get_on(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    path: &str,
    token: Option<&str>,
) -> u16 {
    sender.ready().await.expect("ready");
    let req = get_request(http::Request::get(path).header("host", "127.0.0.1"), token);
    status_of(sender.send_request(req).await.expect("response")).await
}

/// The GET `req` with `token` as its bearer credential when given.
fn get_request(
    req: http::request::Builder,
    token: Option<&str>,
) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    let req = match token {
        Some(token) => req.header("authorization", format!("Bearer {token}")),
        None => req,
    };
    req.body(http_body_util::Empty::new()).expect("request")
}

/// A response's status, its body read to the end.
async fn status_of(resp: http::Response<hyper::body::Incoming>) -> u16 {
    use http_body_util::BodyExt;
    let status = resp.status().as_u16();
    resp.into_body().collect().await.expect("body");
    status
}

/// The admin's connection is served beside the storm: with every worker of
/// the serving runtime busy (here: its one worker blocked), a request on a
/// connection whose certificate names an identity with an exempt rule is
/// still answered at once, upstream included (the exempt lane lives on the
/// privileged thread too), while a ServiceAccount's waits for the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exempt_identity_is_answered_while_the_serving_runtime_is_busy() {
    use std::sync::atomic::Ordering;
    let env = demo_env().await;
    let (serving, proxy) = cert_admins_proxy(&env, false).await;
    let mut admin = h1_connection(&env, proxy.addr(), Some(("admin.crt", "admin.key"))).await;
    let mut agent = h1_connection(&env, proxy.addr(), None).await;
    let ns = "/api/v1/namespaces/default";
    assert_eq!(get_on(&mut admin, ns, None).await, 200);
    assert_eq!(get_on(&mut agent, ns, Some(&env.demo.token)).await, 200);

    let done = block_the_worker(&serving).await;
    let agent_get = tokio::spawn({
        let token = env.demo.token.clone();
        let done = done.clone();
        async move {
            let status = get_on(&mut agent, ns, Some(&token)).await;
            (status, done.load(Ordering::SeqCst))
        }
    });
    for _ in 0..5 {
        assert_eq!(get_on(&mut admin, ns, None).await, 200);
        assert!(
            !done.load(Ordering::SeqCst),
            "the admin's GET waited for the serving runtime"
        );
    }
    // The premise: requests of other callers did wait for the worker.
    let (status, after) = agent_get.await.expect("agent");
    assert_eq!(status, 200);
    assert!(after, "the agent's GET did not need the serving runtime");

    stop_on(serving, proxy).await;
}

/// With serving threads (the default: one per core), a connection lives on
/// one of them from accept to close, and the threads' connections are never
/// more than 9 apart (which thread takes which is `accept::threads`' unit
/// tests'). Their requests need nothing of the
/// runtime that accepted them: with its one worker taken, an established
/// connection's GET is still answered, upstream included. (Without serving
/// threads, the tests above show the opposite: the agent's GET waits for
/// that worker.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_fill_the_serving_threads_and_need_nothing_of_the_accepting_runtime() {
    use std::sync::atomic::Ordering;
    let env = demo_env().await;
    let mut cfg = passthrough_config(&env, env.demo.sim.url(), Duration::from_secs(1));
    cfg.connections.serving_threads = 2;
    let (main, proxy) = start_on_one_worker(cfg).await;
    let ns = "/api/v1/namespaces/default";
    let mut agents = Vec::new();
    for _ in 0..12 {
        let mut agent = h1_connection(&env, proxy.addr(), None).await;
        assert_eq!(get_on(&mut agent, ns, Some(&env.demo.token)).await, 200);
        agents.push(agent);
    }
    let open = proxy.serving_thread_connections();
    assert_eq!(open.len(), 2);
    assert_eq!(open.iter().sum::<usize>(), 12, "{open:?}");
    assert!(open[0].abs_diff(open[1]) <= 9, "{open:?}");

    let done = block_the_worker(&main).await;
    for agent in &mut agents {
        assert_eq!(get_on(agent, ns, Some(&env.demo.token)).await, 200);
        assert!(
            !done.load(Ordering::SeqCst),
            "a GET waited for the runtime that accepted its connection"
        );
    }
    drop(agents);
    stop_on(main, proxy).await;
}

/// A caller that is not privileged may connect to the privileged listener:
/// with serving threads, its connection leaves the privileged thread for one
/// of them (counted there while it is open) and is served as on `--listen`.
/// (Counted per proxy: the metrics registry is the test process's, shared
/// with the tests that run beside this one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unprivileged_caller_on_the_privileged_listener_is_served_on_a_serving_thread() {
    let env = demo_env().await;
    let mut cfg = passthrough_config(&env, env.demo.sim.url(), Duration::from_secs(1));
    cfg.privileged_listen = Some("127.0.0.1:0".parse().expect("addr"));
    cfg.limits = breakwater::config::LimitsConfig {
        file: Some(exempt_limits(&env, "groups: [\"system:masters\"]")),
        ..Default::default()
    };
    cfg.connections.serving_threads = 2;
    let proxy = breakwater::server::start(cfg).await.expect("start");
    let privileged = proxy.privileged_addr().expect("a privileged listener");
    assert_eq!(proxy.serving_thread_connections().iter().sum::<usize>(), 0);
    let mut agent = h1_connection(&env, privileged, None).await;
    let ns = "/api/v1/namespaces/default";
    assert_eq!(get_on(&mut agent, ns, Some(&env.demo.token)).await, 200);
    assert_eq!(
        proxy.serving_thread_connections().iter().sum::<usize>(),
        1,
        "served on the privileged thread"
    );
    assert_eq!(get_on(&mut agent, ns, Some(&env.demo.token)).await, 200);
    drop(agent);
    proxy.shutdown().await;
}

/// An admin's kubectl dials anew for every command. On the privileged
/// listener a new connection is accepted and handshaken on the privileged
/// thread: it is answered while the serving runtime is taken, where a new
/// connection to `--listen` waits for it (that listener accepts there). A
/// caller that is not privileged may connect there too, and is served on
/// the serving runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_on_the_privileged_listener_skips_the_busy_runtime() {
    use std::sync::atomic::Ordering;
    let env = demo_env().await;
    let (serving, proxy) = cert_admins_proxy(&env, true).await;
    let privileged = proxy.privileged_addr().expect("a privileged listener");
    let ns = "/api/v1/namespaces/default";
    let mut agent = h1_connection(&env, privileged, None).await;
    assert_eq!(get_on(&mut agent, ns, Some(&env.demo.token)).await, 200);

    let done = block_the_worker(&serving).await;
    let on_main_listener = async {
        let mut admin = h1_connection(&env, proxy.addr(), Some(("admin.crt", "admin.key"))).await;
        assert_eq!(get_on(&mut admin, ns, None).await, 200);
        done.load(Ordering::SeqCst)
    };
    let on_privileged_listener = async {
        for _ in 0..3 {
            let mut admin = h1_connection(&env, privileged, Some(("admin.crt", "admin.key"))).await;
            assert_eq!(get_on(&mut admin, ns, None).await, 200);
            assert!(
                !done.load(Ordering::SeqCst),
                "the admin's new connection waited for the serving runtime"
            );
        }
    };
    let (after, ()) = tokio::join!(on_main_listener, on_privileged_listener);
    // The premise: a new connection to --listen did wait for the worker.
    assert!(
        after,
        "a new connection on --listen did not need the serving runtime"
    );
    // The unprivileged caller's connection still works, on the serving runtime.
    assert_eq!(get_on(&mut agent, ns, Some(&env.demo.token)).await, 200);

    stop_on(serving, proxy).await;
}

/// A proxy on a serving runtime of its own with one worker that serves its
/// connections too (no serving threads; apart from the test's and
/// kube-sim's), in front-proxy mode with client certificates,
/// and an exempt rule for the group system:masters (the demo's admin
/// certificate); with a privileged listener when `privileged_listen`.
async fn cert_admins_proxy(
    env: &common::Env,
    privileged_listen: bool,
) -> (tokio::runtime::Runtime, breakwater::server::ProxyHandle) {
    use breakwater::config::LimitsConfig;
    use breakwater::upstream::AuthMode;

    let dir = env.dir.path();
    let limits = exempt_limits(env, "groups: [\"system:masters\"]");
    let mut cfg = passthrough_config(env, env.demo.sim.url(), Duration::from_secs(1));
    cfg.client_ca = Some(dir.join("client-ca.crt"));
    cfg.privileged_listen = privileged_listen.then(|| "127.0.0.1:0".parse().expect("addr"));
    cfg.upstream.mode = AuthMode::FrontProxy;
    cfg.upstream.tls.client_cert = Some((
        dir.join("front-proxy-client.crt"),
        dir.join("front-proxy-client.key"),
    ));
    cfg.limits = LimitsConfig {
        file: Some(limits),
        ..LimitsConfig::default()
    };
    cfg.connections.serving_threads = 0;
    start_on_one_worker(cfg).await
}

/// A proxy on a serving runtime of its own with one worker that serves its
/// connections too (no serving threads; apart from the test's and
/// kube-sim's), verifying the demo's ServiceAccount tokens
/// locally, with an exempt rule for ServiceAccount
/// kube-system/breakwater-demo-admin (the demo's token).
async fn proxy_on_one_worker(
    env: &common::Env,
) -> (tokio::runtime::Runtime, breakwater::server::ProxyHandle) {
    let limits = exempt_limits(
        env,
        "serviceAccounts: [\"kube-system/breakwater-demo-admin\"]",
    );
    let mut cfg = passthrough_config(env, env.demo.sim.url(), Duration::from_secs(1));
    cfg.limits = breakwater::config::LimitsConfig {
        file: Some(limits),
        ..Default::default()
    };
    cfg.connections.serving_threads = 0;
    start_on_one_worker(cfg).await
}

/// A limits file in the test's directory with one exempt rule whose match
/// is `subjects` (one line of YAML under `match:`).
fn exempt_limits(env: &common::Env, subjects: &str) -> std::path::PathBuf {
    let path = env.dir.path().join("limits-exempt.yaml");
    let text = format!(
        "apiVersion: breakwater/v1alpha1\nkind: Limits\nrules:\n  - name: admins\n    match:\n      {subjects}\n    exempt: true\n"
    );
    std::fs::write(&path, text).expect("write limits");
    path
}

/// Starts the proxy on a runtime of its own with one worker (apart from the
/// test's and kube-sim's): the worker these tests block. Without serving
/// threads (`cfg.connections.serving_threads` 0) it serves the connections
/// of `--listen` too.
async fn start_on_one_worker(
    cfg: breakwater::config::ProxyConfig,
) -> (tokio::runtime::Runtime, breakwater::server::ProxyHandle) {
    let serving = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let proxy = serving
        .spawn(breakwater::server::start(cfg))
        .await
        .expect("task")
        .expect("proxy starts");
    (serving, proxy)
}

/// Shuts the proxy down on its serving runtime, then that runtime.
async fn stop_on(serving: tokio::runtime::Runtime, proxy: breakwater::server::ProxyHandle) {
    serving
        .spawn(proxy.shutdown())
        .await
        .expect("shutdown task");
    serving.shutdown_background();
}

/// Takes the serving runtime's one worker for 3 s (as thousands of ready
/// tasks would); the flag is set when it is given back.
async fn block_the_worker(
    serving: &tokio::runtime::Runtime,
) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (taken_tx, taken) = tokio::sync::oneshot::channel();
    serving.spawn({
        let done = done.clone();
        async move {
            let _ = taken_tx.send(());
            std::thread::sleep(Duration::from_secs(3));
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    taken.await.expect("the worker is taken");
    done
}

/// GET `path` with `token` on an HTTP/2 connection: the status.
async fn h2_get_on(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    path: &str,
    token: &str,
) -> u16 {
    sender.ready().await.expect("ready");
    let req = get_request(
        http::Request::get(format!("https://127.0.0.1{path}")),
        Some(token),
    );
    status_of(sender.send_request(req).await.expect("response")).await
}

/// A bearer-token admin is served beside the storm too: the first request
/// of a connection without a certificate is read before hyper, its token
/// authenticated, and a connection whose token names an identity with an
/// exempt rule goes to the privileged thread. Over HTTP/1.1 (no ALPN) and
/// HTTP/2 (ALPN h2, HPACK as hyper's client encodes it), the admin's GETs
/// are answered while the serving runtime's one worker is blocked; another
/// ServiceAccount's token waits for the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exempt_token_identity_is_answered_while_the_serving_runtime_is_busy() {
    use std::sync::atomic::Ordering;
    let env = demo_env().await;
    let (serving, proxy) = proxy_on_one_worker(&env).await;
    let admin_token = env.demo.token.clone();
    let viewer = common::viewer_token(&env);
    let ns = "/api/v1/namespaces/default";
    // What the viewer may read.
    let pods = "/api/v1/namespaces/demo/pods";

    // Each connection's first request follows its handshake at once, as
    // kubectl's does (the peek waits 100 ms for it).
    let mut admin_h1 = h1_connection(&env, proxy.addr(), None).await;
    assert_eq!(get_on(&mut admin_h1, ns, Some(&admin_token)).await, 200);
    let tls = tls_connection(&env, proxy.addr(), None, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut admin_h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .expect("HTTP/2");
    tokio::spawn(conn);
    assert_eq!(h2_get_on(&mut admin_h2, ns, &admin_token).await, 200);
    let mut agent = h1_connection(&env, proxy.addr(), None).await;
    assert_eq!(get_on(&mut agent, pods, Some(&viewer)).await, 200);

    let done = block_the_worker(&serving).await;
    let agent_get = tokio::spawn({
        let done = done.clone();
        async move {
            let status = get_on(&mut agent, pods, Some(&viewer)).await;
            (status, done.load(Ordering::SeqCst))
        }
    });
    for _ in 0..3 {
        assert_eq!(get_on(&mut admin_h1, ns, Some(&admin_token)).await, 200);
        assert!(
            !done.load(Ordering::SeqCst),
            "the admin's GET (HTTP/1.1) waited for the serving runtime"
        );
        assert_eq!(h2_get_on(&mut admin_h2, ns, &admin_token).await, 200);
        assert!(
            !done.load(Ordering::SeqCst),
            "the admin's GET (HTTP/2) waited for the serving runtime"
        );
    }
    // The premise: a token that names no exempt identity did wait.
    let (status, after) = agent_get.await.expect("agent");
    assert_eq!(status, 200);
    assert!(
        after,
        "the other ServiceAccount's GET did not need the serving runtime"
    );

    stop_on(serving, proxy).await;
}

/// The bytes read to find the token are replayed to hyper: a request body
/// sent with the headers, and a request pipelined behind it in the same
/// write, both arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peeked_bytes_reach_hyper_unchanged() {
    use tokio::io::AsyncWriteExt;
    let env = demo_env().await;
    let (serving, proxy) = proxy_on_one_worker(&env).await;
    let token = env.demo.token.clone();
    let body = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"peeked"},"data":{"k":"replayed"}}"#;
    let path = "/api/v1/namespaces/default/configmaps";
    let sent = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}\
         GET {path}/peeked HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut tls = tls_connection(&env, proxy.addr(), None, &[b"http/1.1"]).await;
    tls.write_all(sent.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer))
        .await
        .expect("both answers within 10 s")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    let second = answer
        .find("HTTP/1.1 200")
        .expect("the pipelined GET's answer");
    assert!(answer[second..].contains("\"k\":\"replayed\""), "{answer}");

    stop_on(serving, proxy).await;
}
