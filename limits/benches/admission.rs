//! Admission decision cost: `admit` + dropping the permit (what one request
//! costs the proxy), with 100,000 known identities, on 1 and 2 threads.
//! Includes `Instant::now()`, as the proxy calls it per request.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use breakwater_limits::{Decision, Limiter, RequestAttrs, Subject, ValidatedLimits};
use criterion::{Criterion, criterion_group, criterion_main};

const IDENTITIES: usize = 100_000;

const LIMITS: &str = r#"apiVersion: breakwater/v1alpha1
kind: Limits
upstream: {maxInflight: 100000, reservedForExempt: 50}
rules:
  - name: admins
    match: {groups: ["system:masters"]}
    exempt: true
  - name: telemetry-agents
    match:
      serviceAccounts: ["monitoring/node-agent"]
      verbs: ["list", "watch"]
      resources: ["pods", "nodes"]
    perIdentity: {rate: 1000000, burst: 1000000, inflight: 4, watches: 2}
  - name: default
    perIdentity: {rate: 1000000, burst: 1000000, inflight: 20, watches: 100}
"#;

fn setup() -> (Arc<Limiter>, Arc<Vec<String>>) {
    let limits = ValidatedLimits::from_yaml(LIMITS, "bench.yaml").expect("valid");
    let limiter = Arc::new(Limiter::new(limits));
    let users: Vec<String> = (0..IDENTITIES)
        .map(|i| format!("system:serviceaccount:team-{}:controller-{i}", i % 100))
        .collect();
    let req = request();
    let now = Instant::now();
    for u in &users {
        let s = Subject {
            user: u,
            groups: &[],
            ..Subject::default()
        };
        assert!(matches!(
            limiter.admit(&s, &req, now),
            Decision::Admitted(_)
        ));
    }
    assert_eq!(limiter.identity_entries(), IDENTITIES);
    (limiter, Arc::new(users))
}

fn request() -> RequestAttrs<'static> {
    RequestAttrs {
        verb: "list",
        api_group: "",
        resource: "configmaps",
        subresource: "",
        namespace: "default",
        is_resource_request: true,
    }
}

/// Runs `iters` decisions on one thread, walking the identities from `start`.
fn run(limiter: &Limiter, users: &[String], start: usize, iters: u64) {
    let req = request();
    let mut i = start;
    for _ in 0..iters {
        i = (i + 7919) % users.len(); // a prime stride: no cache-friendly order
        let s = Subject {
            user: &users[i],
            groups: &[],
            ..Subject::default()
        };
        match limiter.admit(&s, &req, Instant::now()) {
            Decision::Admitted(p) => drop(black_box(p)),
            Decision::Rejected(r) => panic!("unexpected rejection {r:?}"),
        }
    }
}

fn bench(c: &mut Criterion) {
    let (limiter, users) = setup();
    let mut g = c.benchmark_group("admission_100k_identities");
    g.bench_function("1_thread", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            run(&limiter, &users, 0, iters);
            t.elapsed()
        })
    });
    // Two threads each doing `iters` decisions; reported time is wall time
    // per decision *per thread* (aggregate throughput is twice 1/time).
    g.bench_function("2_threads", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            std::thread::scope(|s| {
                for k in 0..2 {
                    let (l, u) = (&limiter, &users);
                    s.spawn(move || run(l, u, k * 50_000, iters));
                }
            });
            t.elapsed()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = bench
}
criterion_main!(benches);
