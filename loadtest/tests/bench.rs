//! `bench overhead` against an apiserver named by URL (`--upstream-url`,
//! the issue's real check as one command), with kube-sim playing the
//! operator's apiserver: the real `breakwater` binary and nginx (required:
//! CI installs nginx-light) in front of it, for both protocols. kube-sim's
//! own counters prove each target's requests reached it. And the bench with
//! its own kube-sim, on threads of its own or the clients'.

mod common;

use std::time::Duration;

use breakwater_loadtest::bench::overhead::{
    ExternalUpstream, OverheadOpts, UpstreamKind, run_overhead,
};
use breakwater_loadtest::bench::{Protocol, ScratchDir};
use breakwater_loadtest::sim::{Authorization, KubeSim, SimConfig, SimPki, resources};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_overhead_measures_an_apiserver_given_by_url() {
    let pki = SimPki::generate(&["127.0.0.1", "localhost"]).expect("pki");
    let sim = KubeSim::start(
        SimConfig {
            authorization: Authorization::AlwaysAllow,
            ..SimConfig::default()
        },
        pki,
    )
    .await
    .expect("kube-sim starts");
    let namespaces = resources::find("", "v1", "namespaces").expect("namespaces");
    sim.store()
        .create(
            namespaces,
            None,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}),
        )
        .expect("namespace");
    let configmaps = resources::find("", "v1", "configmaps").expect("configmaps");
    sim.store()
        .create(
            configmaps,
            Some("default"),
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "probe", "namespace": "default"},
                   "data": {"k": "v"}}),
        )
        .expect("configmap");
    let dir = ScratchDir::new().expect("scratch dir");
    let ca_file = dir
        .write("ca.crt", sim.pki().serving_ca.cert_pem())
        .expect("ca");
    let token = sim.issue_token("default", "checker", Duration::from_secs(600));
    let token_file = dir.write("token", &format!("{token}\n")).expect("token");

    // An IP address (nginx, which verifies DNS names only, then verifies
    // `kubernetes`, as every apiserver certificate carries), and a name as
    // in a kubeconfig (verified as such by the clients, breakwater and
    // nginx alike).
    let port = sim.addr().port();
    let url = |protocol| match protocol {
        Protocol::Http2 => format!("https://localhost:{port}"),
        _ => format!("https://127.0.0.1:{port}"),
    };
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let gets_before = sim.request_count("GET", "configmaps");
        let opts = OverheadOpts {
            clients: 4,
            duration: Duration::from_millis(400),
            warmup: Duration::from_millis(50),
            protocol,
            h2_connections: 2,
            rounds: 1,
            breakwater: Some(common::breakwater_bin()),
            with_nginx: true,
            upstream: UpstreamKind::External,
            external: Some(ExternalUpstream {
                url: url(protocol),
                ca_file: ca_file.clone(),
                token_file: token_file.clone(),
                path: "/api/v1/namespaces/default/configmaps/probe".into(),
                nginx_server_name: None,
                pid: None,
            }),
            ..OverheadOpts::default()
        };
        let report = run_overhead(opts)
            .await
            .unwrap_or_else(|e| panic!("{protocol}: {e:#}"));
        report.check().expect("no errors");
        let targets: Vec<&str> = report.phases.iter().map(|f| f.target.as_str()).collect();
        assert_eq!(targets, ["direct", "breakwater", "nginx"], "{protocol}");
        let mut requests = 0;
        for f in &report.phases {
            assert!(f.requests > 10, "{protocol}: {f:?}");
            assert_eq!(f.errors, 0, "{protocol}: {f:?}");
            requests += f.requests;
        }
        assert!(report.proxy.cpu_us_per_request.contains_key("breakwater"));
        assert!(
            report
                .nginx
                .as_ref()
                .is_some_and(|n| n.cpu_us_per_request.contains_key("nginx"))
        );
        assert_eq!(
            report.upstream_gets, None,
            "not known for an external apiserver"
        );
        assert_eq!(report.path, "/api/v1/namespaces/default/configmaps/probe");
        // Every measured request reached kube-sim, whichever way it went.
        let gets = sim.request_count("GET", "configmaps") - gets_before;
        assert!(
            gets >= requests,
            "{protocol}: {gets} GETs for {requests} requests"
        );
    }
    sim.shutdown().await;
}

/// The bench's own kube-sim, on a runtime of its own (as an apiserver is a
/// process of its own) or on the clients' (`--sim-threads 0`, the shape of
/// the figures before session 20): both serve every phase, count every
/// GET, and shut down cleanly from inside the clients' runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_overhead_runs_kube_sim_on_threads_of_its_own_or_the_clients() {
    for sim_threads in [1, 0] {
        let opts = OverheadOpts {
            clients: 4,
            duration: Duration::from_millis(300),
            warmup: Duration::from_millis(50),
            protocol: Protocol::Http1,
            rounds: 1,
            breakwater: Some(common::breakwater_bin()),
            sim_threads,
            ..OverheadOpts::default()
        };
        let report = run_overhead(opts)
            .await
            .unwrap_or_else(|e| panic!("--sim-threads {sim_threads}: {e:#}"));
        report.check().expect("no errors");
        assert_eq!(report.sim_threads, Some(sim_threads));
        let targets: Vec<&str> = report.phases.iter().map(|f| f.target.as_str()).collect();
        assert_eq!(targets, ["direct", "breakwater"]);
        let requests: u64 = report.phases.iter().map(|f| f.requests).sum();
        assert!(
            report
                .phases
                .iter()
                .all(|f| f.requests > 10 && f.errors == 0)
        );
        let gets = report.upstream_gets.expect("kube-sim counts its GETs");
        assert!(gets >= requests, "{gets} GETs for {requests} requests");
    }
}
