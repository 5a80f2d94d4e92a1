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
