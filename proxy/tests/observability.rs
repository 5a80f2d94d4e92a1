//! The alert rules and the dashboard: promtool checks and unit-tests the
//! rules (docs/alerts/), the PrometheusRule in docker/ carries the same
//! groups, and every metric the dashboard or the rules name is one a live
//! proxy really exports.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use breakwater::demo::{Demo, DemoOptions};
use common::*;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

fn rules_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("docs/alerts"))
        .expect("docs/alerts")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty());
    files
}

/// promtool from Debian's `prometheus` package. Without it the test is
/// skipped, unless BREAKWATER_REQUIRE_PROMTOOL is set (CI sets it).
fn promtool() -> Option<PathBuf> {
    let found = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some(PathBuf::from("promtool"));
    }
    if std::env::var_os("BREAKWATER_REQUIRE_PROMTOOL").is_some() {
        panic!(
            "promtool not found and BREAKWATER_REQUIRE_PROMTOOL is set: apt-get install prometheus"
        );
    }
    eprintln!(
        "SKIPPED: promtool not found (apt-get install prometheus); \
         set BREAKWATER_REQUIRE_PROMTOOL=1 to fail instead"
    );
    None
}

fn run(cmd: &mut std::process::Command) {
    let out = cmd.output().expect("promtool runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_alert_rules_file_passes_promtool_check_and_its_unit_tests() {
    let Some(promtool) = promtool() else { return };
    for file in rules_files() {
        run(std::process::Command::new(&promtool)
            .args(["check", "rules"])
            .arg(&file));
    }
    // Synthetic series make each alert fire, then clear.
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/alerts");
    run(std::process::Command::new(&promtool)
        .args(["test", "rules", "breakwater_test.yaml"])
        .current_dir(&tests));
}

fn yaml(path: &Path) -> serde_yaml_ng::Value {
    let text = std::fs::read_to_string(path).expect("read");
    serde_yaml_ng::from_str(&text).expect("yaml")
}

#[test]
fn the_prometheus_rule_manifest_carries_the_same_groups() {
    let rules = yaml(&repo().join("docs/alerts/breakwater.rules.yaml"));
    let manifest = yaml(&repo().join("docker/prometheus-rule.yaml"));
    assert_eq!(manifest["kind"], "PrometheusRule");
    assert_eq!(manifest["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(manifest["spec"]["groups"], rules["groups"]);
    // The alerts the runbook relies on.
    let names: BTreeSet<String> = rules["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").iter())
        .filter_map(|r| r["alert"].as_str().map(str::to_string))
        .collect();
    for want in [
        "BreakwaterApiserverReadsSlow",
        "BreakwaterRejectionsRising",
        "BreakwaterFleetNearWatchCap",
        "BreakwaterUpstreamStreamsExhausted",
        "BreakwaterUpstreamUnreachable",
        "BreakwaterEmergencyBlockActive",
        "BreakwaterLimitsReloadFailing",
    ] {
        assert!(names.contains(want), "{want} missing: {names:?}");
    }
}

/// Every `breakwater_*` name in a text.
fn metric_names(text: &str, into: &mut BTreeSet<String>) {
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("breakwater_") {
        let start = i + at;
        let end = start
            + bytes[start..]
                .iter()
                .take_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || **b == b'_')
                .count();
        // Not part of a longer word (e.g. `x_breakwater_y`).
        let standalone =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if standalone {
            into.insert(text[start..end].to_string());
        }
        i = end;
    }
}

fn strings(v: &Value, into: &mut Vec<String>) {
    match v {
        Value::String(s) => into.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| strings(x, into)),
        Value::Object(o) => o.values().for_each(|x| strings(x, into)),
        _ => {}
    }
}

fn dashboard() -> Value {
    let text =
        std::fs::read_to_string(repo().join("docs/dashboards/breakwater.json")).expect("read");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

#[test]
fn the_dashboard_parses_and_every_panel_has_a_query() {
    let dash = dashboard();
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().expect("id")), "duplicate id");
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} has no query", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            assert!(expr.contains("breakwater_"), "{expr}");
            queries += 1;
        }
    }
    assert!(queries >= 20, "{queries}");
}

/// The names a scrape shows: histograms as `_bucket`, `_sum`, `_count`.
fn exported(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .filter(|n| n.starts_with("breakwater_"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alerts_name_only_metrics_a_live_proxy_exports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = dir.path().join("limits.yaml");
    // One rule with an aggregate watch cap, so the cap gauge and a
    // rejection exist.
    std::fs::write(
        &limits,
        "apiVersion: breakwater/v1alpha1\nkind: Limits\nupstream: {maxInflight: 400, reservedForExempt: 40}\n\
         rules:\n- name: demo-admin\n  match: {serviceAccounts: [\"kube-system/breakwater-demo-admin\"]}\n  \
         aggregate: {watches: 2}\n",
    )
    .expect("write limits");
    let demo = Demo::start(&DemoOptions {
        dir: dir.path().to_path_buf(),
        port: 0,
        sim_port: 0,
        admin_port: 0,
        limits: Some(limits),
    })
    .await
    .expect("demo starts");
    let env = Env {
        demo,
        dir,
        cache: tempfile::tempdir().expect("tempdir"),
    };
    let c = clients(&env);
    // A forwarded GET (the upstream and added-latency histograms), two
    // watches (the cap), and a third one refused (a rejection).
    let ns = c.get_json("/api/v1/namespaces/default").await;
    assert_eq!(ns["metadata"]["name"], "default");
    let _w1 = c.watch("/api/v1/namespaces/default/pods?watch=1").await;
    let _w2 = c.watch("/api/v1/namespaces/default/pods?watch=1").await;
    let refused = c
        .proxy
        .request(get(
            &format!("{}/api/v1/namespaces/default/pods?watch=1", c.proxy_url),
            &c.token,
        ))
        .await
        .expect("answer");
    assert_eq!(refused.status(), 429);

    let mut wanted = BTreeSet::new();
    for s in {
        let mut all = Vec::new();
        strings(&dashboard(), &mut all);
        all
    } {
        metric_names(&s, &mut wanted);
    }
    let from_dashboard = wanted.len();
    // The rules' expressions (their descriptions may name other metrics
    // to look at).
    for file in rules_files() {
        let rules = yaml(&file);
        for group in rules["groups"].as_sequence().expect("groups") {
            for rule in group["rules"].as_sequence().expect("rules") {
                metric_names(rule["expr"].as_str().expect("expr"), &mut wanted);
            }
        }
    }
    assert!(from_dashboard >= 15, "{wanted:?}");

    // Gauges set by periodic upkeep appear within seconds: poll.
    let admin = env.demo.proxy.admin_addr();
    let deadline = Instant::now() + Duration::from_secs(30);
    let missing = loop {
        let have = exported(&scrape(admin).await);
        let missing: Vec<&String> = wanted.iter().filter(|n| !have.contains(*n)).collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing.into_iter().cloned().collect::<Vec<_>>();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        missing.is_empty(),
        "named in docs/dashboards or docs/alerts but not exported: {missing:?}"
    );
    // The SLO histograms have the apiserver's buckets.
    let text = scrape(admin).await;
    for le in ["0.005", "0.025", "1.25", "45", "60", "+Inf"] {
        assert!(
            text.lines().any(|l| l
                .starts_with("breakwater_upstream_request_duration_seconds_bucket")
                && l.contains("verb_class=\"get\"")
                && l.contains(&format!("le=\"{le}\""))),
            "no le={le} bucket"
        );
    }
    // And the whole exposition parses as Prometheus parses it (exit 1 is a
    // parse error; 3 is lint only, e.g. metrics without HELP text).
    if let Some(promtool) = promtool() {
        use std::io::Write as _;
        let mut child = std::process::Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool runs");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(
                text.split_once("\r\n\r\n")
                    .expect("an HTTP answer")
                    .1
                    .as_bytes(),
            )
            .expect("write the scrape");
        let out = child.wait_with_output().expect("promtool ends");
        assert!(
            matches!(out.status.code(), Some(0 | 3)),
            "promtool check metrics: {:?}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    env.demo.shutdown().await;
}

/// The per-request metrics go through handles registered once per label set
/// (proxy/src/slo.rs, admit.rs) or per-thread stripes (the SLO histograms,
/// the request-duration summary): each request must still count once in
/// what `/metrics` serves, on whichever thread serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_forwarded_request_counts_once_in_the_per_request_metrics() {
    let env = demo_env().await;
    let admin = env.demo.proxy.admin_addr();
    let client = https_client(&env.demo.proxy_ca_pem, true);
    let url = format!(
        "{}/api/v1/namespaces/demo/configmaps/absent",
        env.proxy_url()
    );
    let figures = |text: &str| {
        [
            counter_sum(text, "breakwater_admitted_total", &["verb=\"get\""]),
            counter_sum(
                text,
                "breakwater_upstream_request_duration_seconds_count",
                &["verb_class=\"get\"", "resource_class=\"resource\""],
            ),
            counter_sum(
                text,
                "breakwater_proxy_added_seconds_count",
                &["verb_class=\"get\""],
            ),
        ]
    };
    // One request first, so that every series exists before the baseline.
    let resp = client
        .request(get(&url, &env.demo.token))
        .await
        .expect("get");
    assert_eq!(resp.status(), 404);
    let (before, before_ended, before_durations) = {
        // The first request's own counts, once its response has ended.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let text = scrape(admin).await;
            let ended = counter_sum(
                &text,
                "breakwater_requests_total",
                &["verb=\"get\"", "code=\"404\""],
            );
            if ended >= 1.0 || tokio::time::Instant::now() > deadline {
                let durations = counter_sum(
                    &text,
                    "breakwater_request_duration_seconds_count",
                    &["verb=\"get\""],
                );
                break (figures(&text), ended, durations);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    const REQUESTS: usize = 40;
    let answers = futures_util::future::join_all(
        (0..REQUESTS).map(|_| client.request(get(&url, &env.demo.token))),
    )
    .await;
    for resp in answers {
        assert_eq!(resp.expect("get").status(), 404);
    }
    let after = figures(&scrape(admin).await);
    for (i, name) in ["admitted", "upstream duration count", "added count"]
        .iter()
        .enumerate()
    {
        assert_eq!(
            after[i] - before[i],
            REQUESTS as f64,
            "{name}: {before:?} -> {after:?}"
        );
    }
    // A request's total and duration are counted when its response ends,
    // which may be after the client has read it: wait for the count.
    let ended = |text: &str| {
        counter_sum(
            text,
            "breakwater_requests_total",
            &["verb=\"get\"", "code=\"404\""],
        )
    };
    let durations = |text: &str| {
        counter_sum(
            text,
            "breakwater_request_duration_seconds_count",
            &["verb=\"get\""],
        )
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let text = scrape(admin).await;
        if ended(&text) - before_ended >= REQUESTS as f64 || tokio::time::Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(ended(&text) - before_ended, REQUESTS as f64, "{text}");
    // The summary counts every request of the verb (this process's other
    // tests may add their own GETs).
    assert!(
        durations(&text) - before_durations >= REQUESTS as f64,
        "{text}"
    );
    let p50 = counter_sum(
        &text,
        "breakwater_request_duration_seconds",
        &["verb=\"get\"", "quantile=\"0.5\""],
    );
    assert!(p50 > 0.0 && p50 < 10.0, "p50 {p50}:\n{text}");
    assert!(
        text.contains("# TYPE breakwater_request_duration_seconds summary"),
        "{text}"
    );
    env.demo.shutdown().await;
}

/// The real binary's access log: one line per request in `tracing`'s
/// default format, in the order the requests ended, written without more
/// traffic (the sink's flusher: 40 lines never fill a batch) and at exit;
/// `BREAKWATER_LOG` still turns it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_logs_one_access_line_per_request_in_order() {
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;

    let env = demo_env().await;
    let token = viewer_token(&env);
    let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let fetch = |proxy: &common::child::Child, i: usize| {
        let url = format!(
            "http://{}/api/v1/namespaces/demo/pods/missing-{i}",
            proxy.plain
        );
        let req = client.request(get(&url, &token));
        async move {
            let resp = req.await.expect("answered");
            assert_eq!(resp.status(), 404);
        }
    };
    let line_of = |i: usize| format!("path=\"/api/v1/namespaces/demo/pods/missing-{i}\"");

    let mut proxy =
        common::child::Child::start_logging(&env, None, "warn,breakwater::access=info").await;
    for i in 0..40 {
        fetch(&proxy, i).await;
    }
    proxy.until_logged(&[&line_of(39)]).await;
    // One more, and the process told to stop at once: its line is written
    // at exit at the latest.
    fetch(&proxy, 40).await;
    proxy.signal("TERM").await;
    let status = proxy.child.wait().await.expect("exits");
    assert!(status.success(), "{status:?}");
    proxy.until_logged(&[&line_of(40)]).await;
    let log = proxy.log.borrow().clone();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" breakwater::access: "))
        .collect();
    assert_eq!(lines.len(), 41, "one line per request:\n{log}");
    for (i, line) in lines.iter().enumerate() {
        let (at, fields) = line
            .split_once("  INFO breakwater::access: ")
            .unwrap_or_else(|| panic!("tracing's layout: {line}"));
        // 2026-12-06T20:12:44.908537Z
        let b = at.as_bytes();
        assert!(
            at.len() == 27
                && b[4] == b'-'
                && b[10] == b'T'
                && b[19] == b'.'
                && at.ends_with('Z')
                && at.starts_with("20"),
            "timestamp: {line}"
        );
        let want = format!(
            "method=GET {} verb=\"get\" resource=pods namespace=\"demo\" \
             user=\"system:serviceaccount:demo:viewer\" status=404 outcome=\"complete\" bytes=",
            line_of(i)
        );
        assert!(fields.starts_with(&want), "in order, as sent: {line}");
        let (_, duration) = fields
            .split_once(" duration_ms=")
            .unwrap_or_else(|| panic!("{line}"));
        let (ms, peer) = duration.split_once(" peer=127.0.0.1:").expect(line);
        let (whole, frac) = ms.split_once('.').expect(line);
        assert!(
            whole.parse::<u64>().is_ok() && frac.len() == 3 && frac.parse::<u32>().is_ok(),
            "{line}"
        );
        assert!(peer.parse::<u16>().is_ok(), "{line}");
    }

    // Filtered out: no access line, even at exit.
    let mut quiet =
        common::child::Child::start_logging(&env, None, "info,breakwater::access=off").await;
    fetch(&quiet, 0).await;
    quiet.signal("TERM").await;
    quiet.child.wait().await.expect("exits");
    quiet.until_logged(&["shut down"]).await;
    let log = quiet.log.borrow().clone();
    assert!(!log.contains("breakwater::access"), "{log}");
}
