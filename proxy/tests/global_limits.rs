//! Global limits on Redis: three Breakwater replicas in front of one
//! kube-sim share a real `redis-server` (started here on a free loopback
//! port, without persistence) and enforce one rule's aggregate limits
//! together; a dead replica's slots lapse with their lease; without Redis
//! each replica enforces its static share, and global enforcement resumes
//! when Redis returns.
//!
//! Needs `redis-server` on PATH (Debian package `redis-server`; .ci/run
//! installs it).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use breakwater::config::LimitsConfig;
use breakwater::server::ProxyHandle;
use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use common::{Env, demo_env, passthrough_config};

/// A `redis-server` of our own; killed on drop.
struct Redis {
    port: u16,
    child: Option<tokio::process::Child>,
    dir: tempfile::TempDir,
}

impl Redis {
    async fn start() -> Redis {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let mut r = Redis {
            port,
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        r.restart().await;
        r
    }

    async fn restart(&mut self) {
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server runs (apt-get install redis-server)");
        self.child = Some(child);
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server did not listen on {}", self.port);
    }

    async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.expect("kill redis-server");
        }
    }
}

type Plain = Client<HttpConnector, Empty<Bytes>>;

struct Fleet {
    env: Env,
    replicas: Vec<ProxyHandle>,
    token: String,
    client: Plain,
}

const LEASE: Duration = Duration::from_secs(2);

async fn fleet(redis: &Redis, rule: &str) -> Fleet {
    let env = demo_env().await;
    let text = format!(
        r#"apiVersion: breakwater/v1alpha1
kind: Limits
replicas: 3
backend:
  redis:
    address: 127.0.0.1:{port}
    keyPrefix: "test:"
    leaseSeconds: {lease}
    timeoutMillis: 200
rules:
  - name: fleet
    match: {{serviceAccounts: ["demo/viewer"]}}
{rule}
"#,
        port = redis.port,
        lease = LEASE.as_secs()
    );
    let file = env.dir.path().join("global-limits.yaml");
    std::fs::write(&file, text).expect("write limits");
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let mut cfg = passthrough_config(&env, env.demo.sim.url(), Duration::from_secs(2));
        cfg.limits = LimitsConfig {
            file: Some(file.clone()),
            ..LimitsConfig::default()
        };
        replicas.push(
            breakwater::server::start(cfg)
                .await
                .expect("replica starts"),
        );
    }
    let viewer = std::fs::read_to_string(&env.demo.kubeconfig_viewer).expect("kubeconfig");
    let token = viewer
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .expect("token line")
        .to_string();
    let fleet = Fleet {
        env,
        replicas,
        token,
        client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
    };
    fleet.until_up(&[0, 1, 2]).await;
    fleet
}

impl Fleet {
    fn plain(&self, i: usize) -> SocketAddr {
        self.replicas[i].plain_addr().expect("plain listener")
    }

    fn global(&self, i: usize) -> &breakwater::global::Global {
        self.replicas[i]
            .admission()
            .global()
            .expect("redis backend")
    }

    async fn until_up(&self, which: &[usize]) {
        for _ in 0..400 {
            if which.iter().all(|&i| self.global(i).is_up()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("replicas {which:?} did not reach Redis");
    }

    async fn request(&self, i: usize, pq: &str) -> http::Response<Incoming> {
        let req = http::Request::get(format!("http://{}{pq}", self.plain(i)))
            .header("authorization", format!("Bearer {}", self.token))
            .body(Empty::new())
            .expect("request");
        tokio::time::timeout(Duration::from_secs(20), self.client.request(req))
            .await
            .expect("answered in time")
            .expect("response")
    }

    /// Opens a watch on replica `i`: the open body (kept open while held),
    /// or the refusal's status.
    async fn watch(&self, i: usize) -> Result<Incoming, u16> {
        let resp = self
            .request(i, "/api/v1/namespaces/demo/pods?watch=1")
            .await;
        match resp.status().as_u16() {
            200 => Ok(resp.into_body()),
            code => Err(code),
        }
    }

    /// Opens `n` watches on each replica in `which` at once; returns the
    /// open ones per replica and every refusal's status.
    async fn open_at_once(&self, which: &[usize], n: usize) -> (Vec<Vec<Incoming>>, Vec<u16>) {
        let opens = which
            .iter()
            .flat_map(|&i| (0..n).map(move |_| i))
            .map(|i| async move { (i, self.watch(i).await) });
        let results = futures_util::future::join_all(opens).await;
        let mut open: Vec<Vec<Incoming>> = (0..3).map(|_| Vec::new()).collect();
        let mut refused = Vec::new();
        for (i, r) in results {
            match r {
                Ok(body) => open[i].push(body),
                Err(code) => refused.push(code),
            }
        }
        (open, refused)
    }
}

fn count(open: &[Vec<Incoming>]) -> usize {
    open.iter().map(Vec::len).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_ten_watches_leases_lapse_and_redis_outages_fall_back_to_the_share() {
    let mut redis = Redis::start().await;
    let fleet = fleet(&redis, "    aggregate: {watches: 10}").await;

    // 30 concurrent opens, 10 on each replica: exactly 10 in all.
    let (mut open, refused) = fleet.open_at_once(&[0, 1, 2], 10).await;
    assert_eq!(count(&open), 10, "admitted across the fleet");
    assert_eq!(refused.len(), 20);
    assert!(refused.iter().all(|&c| c == 429), "{refused:?}");
    let per: Vec<usize> = open.iter().map(Vec::len).collect();
    assert!(
        per.iter().any(|&n| n > 3),
        "some replica held more than its static share of 3: {per:?}"
    );

    // The replica holding most dies without releasing its slots.
    let dead = (0..3).max_by_key(|&i| open[i].len()).expect("a replica");
    let lost = open[dead].len();
    fleet.global(dead).abandon();
    let mut fleet = fleet;
    let handle = fleet.replicas.remove(dead);
    open.remove(dead);
    let died = Instant::now();
    let _stopped = handle.shutdown().await;
    let alive = [0, 1];
    // Its slots still count until their lease lapses...
    assert_eq!(
        fleet.watch(0).await.err(),
        Some(429),
        "slots held by the dead replica"
    );
    // ...and free within it.
    let mut regained = Vec::new();
    while regained.len() < lost {
        assert!(
            died.elapsed() < LEASE + Duration::from_secs(2),
            "{} of {lost} slots freed after {:?}",
            regained.len(),
            died.elapsed()
        );
        if let Ok(body) = fleet.watch(regained.len() % 2).await {
            regained.push(body);
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(
        fleet.watch(1).await.err(),
        Some(429),
        "still 10 in all after the dead replica's slots moved"
    );

    // Close everything; then stop Redis: each replica enforces its share.
    drop(regained);
    drop(open);
    for _ in 0..200 {
        if alive.iter().all(|&i| fleet.global(i).leases() == 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    redis.stop().await;
    let (held, refused) = fleet.open_at_once(&alive, 5).await;
    let per: Vec<usize> = held.iter().map(Vec::len).collect();
    assert_eq!(&per[..2], &[3, 3], "each replica's static share (10/3)");
    assert!(refused.iter().all(|&c| c == 429), "{refused:?}");
    assert!(alive.iter().all(|&i| !fleet.global(i).is_up()));

    // Redis returns: the held watches are registered again, and the fleet
    // admits the 4 left of 10, not a share each.
    redis.restart().await;
    fleet.until_up(&alive).await;
    let (more, refused) = fleet.open_at_once(&alive, 5).await;
    assert_eq!(count(&more), 4, "10 minus the 6 held");
    assert_eq!(refused.len(), 6);
    drop((held, more));
    for r in fleet.replicas.drain(..) {
        let _stopped = r.shutdown().await;
    }
    drop(fleet.env);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_token_bucket_admits_its_rate_across_replicas() {
    const RATE: f64 = 20.0;
    const BURST: f64 = 10.0;
    let redis = Redis::start().await;
    let fleet = fleet(&redis, "    aggregate: {rate: 20, burst: 10}").await;
    // Uneven offered load: 30/s, 10/s and 2/s. Static shares would admit
    // about 6.7 + 6.7 + 2 per second; the global bucket admits 20.
    let offered = [30.0f64, 10.0, 2.0];
    let window = Duration::from_secs(10);
    let start = Instant::now();
    let admitted = futures_util::future::join_all(offered.iter().enumerate().map(|(i, per_s)| {
        let fleet = &fleet;
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_s));
            let (mut ok, mut refused) = (0u32, 0u32);
            while start.elapsed() < window {
                tick.tick().await;
                let resp = fleet
                    .request(i, "/api/v1/namespaces/demo/pods/no-such-pod")
                    .await;
                if resp.status() == 429 {
                    refused += 1;
                } else {
                    ok += 1;
                }
            }
            (ok, refused)
        }
    }))
    .await;
    let elapsed = start.elapsed().as_secs_f64();
    let total: u32 = admitted.iter().map(|a| a.0).sum();
    let expected = BURST + RATE * elapsed;
    let error = (f64::from(total) - expected).abs() / (RATE * elapsed);
    assert!(
        error <= 0.05,
        "admitted {total} in {elapsed:.2}s, expected {expected:.0} (±5%): {admitted:?}"
    );
    assert!(
        f64::from(admitted[0].0) > BURST / 3.0 + RATE / 3.0 * elapsed * 1.3,
        "the busy replica got more than its static share: {admitted:?}"
    );
    for r in fleet.replicas {
        let _stopped = r.shutdown().await;
    }
}

/// Admission latency, local against Redis on loopback: `Admission::admit`
/// (the first step, with the Redis round trip when the backend is up) and
/// dropping the permit (its release is queued, sent in batches). Run with
/// `cargo test --release -p breakwater --test global_limits -- --ignored
/// --nocapture measure`; figures in docs/benchmarks.md §6.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test"]
async fn measure_admission_latency_local_and_redis() {
    use breakwater::admit::{Admission, Admit};
    use breakwater::identity::Identity;
    let redis = Redis::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let rule = "rules:\n  - name: fleet\n    match: {serviceAccounts: [\"monitoring/*\"]}\n    perIdentity: {rate: 1000000, burst: 1000000, watches: 1000000}\n    aggregate: {rate: 1000000, burst: 1000000, inflight: 1000000, watches: 1000000}\n";
    let local = format!("apiVersion: breakwater/v1alpha1\nkind: Limits\nreplicas: 3\n{rule}");
    let shared = format!(
        "apiVersion: breakwater/v1alpha1\nkind: Limits\nreplicas: 3\nbackend:\n  redis: {{address: \"127.0.0.1:{}\", leaseSeconds: 10}}\n{rule}",
        redis.port
    );
    let identity = Identity {
        username: "system:serviceaccount:monitoring:agent".to_string(),
        uid: String::new(),
        groups: vec!["system:serviceaccounts".to_string()],
        extra: Default::default(),
    };
    for (name, text) in [("local", local), ("redis", shared)] {
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, text).expect("write");
        let admission =
            std::sync::Arc::new(Admission::new(Some(&file), None, false).expect("admission"));
        let stop = tokio_util::sync::CancellationToken::new();
        if let Some(g) = admission.global().cloned() {
            let a = admission.clone();
            tokio::spawn(g.run(move |on| a.limiter().set_global(on), stop.clone()));
            while !admission.limiter().global_active() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        for (kind, method, path, query) in [
            (
                "get",
                http::Method::GET,
                "/api/v1/namespaces/monitoring/pods/p",
                None,
            ),
            ("watch", http::Method::GET, "/api/v1/pods", Some("watch=1")),
        ] {
            let info = breakwater::classify::classify(&method, path, query);
            let mut took = Vec::with_capacity(20_000);
            for i in 0..22_000 {
                let t = Instant::now();
                match admission.admit(&identity, &info).await {
                    Admit::Go(permit) => drop(permit),
                    Admit::Refuse { .. } => panic!("refused"),
                }
                if i >= 2_000 {
                    took.push(t.elapsed());
                }
            }
            took.sort();
            let q = |p: f64| took[((took.len() as f64 * p) as usize).min(took.len() - 1)];
            println!(
                "{name:5} {kind:5}: p50 {:?}  p90 {:?}  p99 {:?}  p99.9 {:?}  max {:?}",
                q(0.5),
                q(0.9),
                q(0.99),
                q(0.999),
                took[took.len() - 1]
            );
        }
        stop.cancel();
    }
}
