//! kube-sim over real HTTPS: the apiserver semantics clients depend on,
//! checked with a hyper client (HTTP/1.1 and HTTP/2, admin client cert or a
//! ServiceAccount token) and with kubectl itself.
//!
//! Every test starts its own kube-sim on 127.0.0.1:0.

mod common;

use common::{start, start_with};
use std::time::Duration;

use breakwater_loadtest::sim::{KubeSim, SimConfig, resources};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

/// How long any single network step may take before the test fails.
const STEP: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    H1,
    H2,
}

#[derive(Debug, Clone, Copy)]
enum Cred<'a> {
    Admin,
    Token(&'a str),
    Anonymous,
}

/// A hyper client speaking `proto` to `sim`, presenting the admin cert
/// (Admin) or nothing (Token/Anonymous).
struct Api {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
    token: Option<String>,
}

fn api(sim: &KubeSim, proto: Proto, cred: Cred<'_>) -> Api {
    let admin = matches!(cred, Cred::Admin).then(|| sim.pki().admin_client().expect("admin cert"));
    let h2 = matches!(proto, Proto::H2);
    let connector = common::connector(sim, admin.as_ref(), h2);
    let client = Client::builder(TokioExecutor::new())
        .http2_only(h2)
        .build(connector);
    Api {
        client,
        base: sim.url(),
        token: match cred {
            Cred::Token(t) => Some(t.to_string()),
            _ => None,
        },
    }
}

impl Api {
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> http::Response<Incoming> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let mut has_ct = false;
        for (k, v) in headers {
            has_ct |= k.eq_ignore_ascii_case("content-type");
            req = req.header(*k, *v);
        }
        if body.is_some() && !has_ct {
            req = req.header("content-type", "application/json");
        }
        let body = body
            .map(|b| Bytes::from(serde_json::to_vec(b).expect("json")))
            .unwrap_or_default();
        let req = req.body(Full::new(body)).expect("request");
        tokio::time::timeout(STEP, self.client.request(req))
            .await
            .expect("response in time")
            .expect("response")
    }

    /// A request whose whole body is JSON.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, Value) {
        let resp = self.send(method, path, body, headers).await;
        let (parts, body) = resp.into_parts();
        let bytes = tokio::time::timeout(STEP, body.collect())
            .await
            .expect("body in time")
            .expect("body")
            .to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (parts.status, parts.headers, value)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let (s, _, v) = self.call(Method::GET, path, None, &[]).await;
        (s, v)
    }

    /// Opens a watch and returns its event reader.
    async fn watch(&self, path: &str) -> Events {
        let resp = self.send(Method::GET, path, None, &[]).await;
        assert_eq!(resp.status(), StatusCode::OK, "watch {path}");
        assert_eq!(resp.headers()["content-type"], "application/json");
        Events {
            body: resp.into_body(),
            buf: Vec::new(),
        }
    }
}

/// Reads a watch stream one JSON line at a time.
struct Events {
    body: Incoming,
    buf: Vec<u8>,
}

impl Events {
    /// The next event, or None at the end of the stream.
    async fn next(&mut self) -> Option<Value> {
        tokio::time::timeout(STEP, self.next_inner())
            .await
            .expect("watch event or end in time")
    }

    async fn next_inner(&mut self) -> Option<Value> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(serde_json::from_slice(&line).expect("event json"));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        self.buf.extend_from_slice(data);
                    }
                }
                Some(Err(e)) => panic!("watch stream failed: {e}"),
                None => {
                    assert!(self.buf.is_empty(), "partial event at end of stream");
                    return None;
                }
            }
        }
    }
}

fn configmap(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels},
        "data": {"k": "v"},
    })
}

fn rv_of(v: &Value) -> u64 {
    v.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no resourceVersion in {v}"))
}

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("fixture json")
}

#[tokio::test]
async fn discovery_and_health_answer_over_both_protocols() {
    let sim = start().await;
    for proto in [Proto::H1, Proto::H2] {
        let a = api(&sim, proto, Cred::Admin);
        for path in ["/api", "/apis", "/api/v1", "/apis/apps/v1"] {
            let (s, v) = a.get(path).await;
            assert_eq!(s, StatusCode::OK, "{path}: {v}");
            assert!(v.get("kind").is_some(), "{path}: {v}");
        }
        let anon = api(&sim, proto, Cred::Anonymous);
        let (s, v) = anon.get("/version").await;
        assert_eq!(s, StatusCode::OK);
        assert!(
            v["gitVersion"]
                .as_str()
                .expect("gitVersion")
                .starts_with("v1.")
        );
        let (s, v) = anon.get("/healthz").await;
        assert_eq!((s, v), (StatusCode::OK, Value::String("ok".into())));
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn bad_credentials_get_the_apiservers_401_and_none_are_anonymous() {
    let sim = start().await;
    for proto in [Proto::H1, Proto::H2] {
        let a = api(&sim, proto, Cred::Token("not.a.jwt"));
        let (s, h, v) = a.call(Method::GET, "/api/v1/namespaces", None, &[]).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["cache-control"], "no-cache, private");
        assert_eq!(v, fixture("error-401-unauthorized.body"));
        let (s, _) = a.get("/api").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        // No credentials: system:anonymous, which RBAC lets see health only.
        let a = api(&sim, proto, Cred::Anonymous);
        let (s, h, v) = a.call(Method::GET, "/api/v1/namespaces", None, &[]).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(v["reason"], "Forbidden");
        let (s, _) = a.get("/api").await;
        assert_eq!(s, StatusCode::FORBIDDEN);
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn unknown_paths_are_404_and_wrong_methods_405() {
    let sim = start().await;
    let a = api(&sim, Proto::H2, Cred::Admin);
    let (s, v) = a.get("/api/v1/widgets").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["reason"], "NotFound");
    assert_eq!(
        v["message"],
        "the server could not find the requested resource"
    );
    let (s, _, v) = a
        .call(
            Method::PUT,
            "/api/v1/namespaces/demo/configmaps",
            Some(&json!({})),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(v["reason"], "MethodNotAllowed");
    sim.shutdown().await;
}

#[tokio::test]
async fn crud_round_trip_with_apiserver_errors() {
    let sim = start().await;
    for (i, proto) in [Proto::H1, Proto::H2].into_iter().enumerate() {
        let a = api(&sim, proto, Cred::Admin);
        let name = format!("cm-{i}");
        let base = "/api/v1/namespaces/demo/configmaps";
        let cm = configmap(&name, json!({"team": "blue"}));

        let (s, _, created) = a.call(Method::POST, base, Some(&cm), &[]).await;
        assert_eq!(s, StatusCode::CREATED, "{created}");
        assert_eq!(created["kind"], "ConfigMap");
        assert_eq!(created["metadata"]["namespace"], "demo");
        let (s, _, dup) = a.call(Method::POST, base, Some(&cm), &[]).await;
        assert_eq!(s, StatusCode::CONFLICT);
        assert_eq!(dup["reason"], "AlreadyExists");

        let (s, got) = a.get(&format!("{base}/{name}")).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(got, created);

        // Update with the current RV succeeds; with the old one it conflicts.
        let mut next = created.clone();
        next["data"]["k"] = json!("v2");
        let (s, _, updated) = a
            .call(Method::PUT, &format!("{base}/{name}"), Some(&next), &[])
            .await;
        assert_eq!(s, StatusCode::OK, "{updated}");
        assert!(rv_of(&updated) > rv_of(&created));
        let (s, _, stale) = a
            .call(Method::PUT, &format!("{base}/{name}"), Some(&next), &[])
            .await;
        assert_eq!(s, StatusCode::CONFLICT);
        assert_eq!(stale["reason"], "Conflict");

        let (s, _, patched) = a
            .call(
                Method::PATCH,
                &format!("{base}/{name}"),
                Some(&json!({"data": {"extra": "1"}})),
                &[("content-type", "application/merge-patch+json")],
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{patched}");
        assert_eq!(patched["data"], json!({"k": "v2", "extra": "1"}));
        let (s, _, patched) = a
            .call(
                Method::PATCH,
                &format!("{base}/{name}"),
                Some(&json!([{"op": "remove", "path": "/data/extra"}])),
                &[("content-type", "application/json-patch+json")],
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{patched}");
        assert_eq!(patched["data"], json!({"k": "v2"}));
        let (s, _, v) = a
            .call(
                Method::PATCH,
                &format!("{base}/{name}"),
                Some(&json!({})),
                &[("content-type", "application/apply-patch+yaml")],
            )
            .await;
        assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(v["reason"], "UnsupportedMediaType");

        let (s, _, deleted) = a
            .call(Method::DELETE, &format!("{base}/{name}"), None, &[])
            .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(deleted["metadata"]["name"], name.as_str());
        let (s, missing) = a.get(&format!("{base}/{name}")).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let mut expected = fixture("error-404-notfound.body");
        expected["message"] = json!(format!("configmaps \"{name}\" not found"));
        expected["details"]["name"] = json!(name);
        assert_eq!(missing, expected);
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn lists_filter_by_selectors_and_paginate() {
    let sim = start().await;
    let a = api(&sim, Proto::H2, Cred::Admin);

    let (s, list) = a
        .get("/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1")
        .await;
    assert_eq!(s, StatusCode::OK, "{list}");
    assert_eq!(list["kind"], "PodList");
    assert_eq!(list["apiVersion"], "v1");
    let items = list["items"].as_array().expect("items");
    assert!(!items.is_empty());
    for item in items {
        assert_eq!(item["spec"]["nodeName"], "node-1");
        assert!(item.get("kind").is_none() && item.get("apiVersion").is_none());
    }

    let (_, web) = a
        .get("/api/v1/namespaces/demo/pods?labelSelector=app%3Dweb")
        .await;
    let names: Vec<&str> = web["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|p| p["metadata"]["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["web-0", "web-1", "web-2"]);

    // limit + continue walk every pod exactly once.
    let (_, all) = a.get("/api/v1/pods").await;
    let total = all["items"].as_array().expect("items").len();
    let mut seen = Vec::new();
    let mut path = "/api/v1/pods?limit=3".to_string();
    for _ in 0..total + 1 {
        let (s, page) = a.get(&path).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        for p in page["items"].as_array().expect("items") {
            seen.push(p["metadata"]["name"].as_str().expect("name").to_string());
        }
        match page["metadata"]["continue"].as_str() {
            Some(c) if !c.is_empty() => {
                assert!(page["metadata"]["remainingItemCount"].as_u64().is_some());
                path = format!("/api/v1/pods?limit=3&continue={c}");
            }
            _ => break,
        }
    }
    assert_eq!(seen.len(), total);
    seen.dedup();
    assert_eq!(seen.len(), total);
    sim.shutdown().await;
}

#[tokio::test]
async fn watches_from_unset_zero_and_list_rv_stream_events_as_they_happen() {
    let sim = start().await;
    for (i, proto) in [Proto::H1, Proto::H2].into_iter().enumerate() {
        let a = api(&sim, proto, Cred::Admin);
        let base = "/api/v1/namespaces/demo/configmaps";
        let (_, list) = a.get(base).await;
        let existing = list["items"].as_array().expect("items").len();
        let list_rv = list["metadata"]["resourceVersion"]
            .as_str()
            .expect("rv")
            .to_string();

        // Unset and "0": synthetic ADDED for what exists.
        for rv in ["", "&resourceVersion=0"] {
            let mut w = a.watch(&format!("{base}?watch=true{rv}")).await;
            for _ in 0..existing {
                let ev = w.next().await.expect("initial event");
                assert_eq!(ev["type"], "ADDED");
                assert_eq!(ev["object"]["kind"], "ConfigMap");
            }
        }

        // From the list RV: nothing until a change, then that change.
        let mut w = a
            .watch(&format!("{base}?watch=1&resourceVersion={list_rv}"))
            .await;
        let name = format!("live-{i}");
        let (s, _, created) = a
            .call(Method::POST, base, Some(&configmap(&name, json!({}))), &[])
            .await;
        assert_eq!(s, StatusCode::CREATED);
        let ev = w.next().await.expect("event");
        assert_eq!(ev["type"], "ADDED");
        assert_eq!(ev["object"]["metadata"]["name"], name.as_str());
        assert_eq!(rv_of(&ev["object"]), rv_of(&created));

        // Legacy /watch/ path pinned to one name.
        let mut legacy = a
            .watch(&format!(
                "/api/v1/watch/namespaces/demo/configmaps/{name}?resourceVersion={}",
                rv_of(&created)
            ))
            .await;
        let (s, _, _) = a
            .call(Method::DELETE, &format!("{base}/{name}"), None, &[])
            .await;
        assert_eq!(s, StatusCode::OK);
        let ev = legacy.next().await.expect("event");
        assert_eq!(ev["type"], "DELETED");
        assert_eq!(ev["object"]["metadata"]["name"], name.as_str());
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn a_too_old_resource_version_gets_one_410_error_event_then_eof() {
    let sim = start().await;
    let cms = resources::find("", "v1", "configmaps").expect("configmaps");
    let a = api(&sim, Proto::H2, Cred::Admin);
    for i in 0..3 {
        let (s, _, _) = a
            .call(
                Method::POST,
                "/api/v1/namespaces/demo/configmaps",
                Some(&configmap(&format!("old-{i}"), json!({}))),
                &[],
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);
    }
    sim.store().compact(cms);
    for proto in [Proto::H1, Proto::H2] {
        let a = api(&sim, proto, Cred::Admin);
        let mut w = a
            .watch("/api/v1/namespaces/demo/configmaps?watch=true&resourceVersion=2")
            .await;
        let ev = w.next().await.expect("error event");
        let expected = fixture("watch-rv-too-old.jsonl");
        assert_eq!(ev["type"], "ERROR");
        assert_eq!(ev["object"]["code"], 410);
        assert_eq!(ev["object"]["reason"], expected["object"]["reason"]);
        let msg = ev["object"]["message"].as_str().expect("message");
        assert!(msg.starts_with("too old resource version: 2 ("), "{msg}");
        assert!(w.next().await.is_none(), "stream ends after the error");
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn bookmarks_reach_watchers_that_allow_them() {
    let sim = start_with(SimConfig {
        bookmark_interval: Duration::from_millis(200),
        ..SimConfig::default()
    })
    .await;
    for proto in [Proto::H1, Proto::H2] {
        let a = api(&sim, proto, Cred::Admin);
        let (_, list) = a.get("/api/v1/namespaces/demo/configmaps").await;
        let rv = list["metadata"]["resourceVersion"]
            .as_str()
            .expect("rv")
            .to_string();
        let mut w = a
            .watch(&format!(
                "/api/v1/namespaces/demo/configmaps?watch=true&allowWatchBookmarks=true&resourceVersion={rv}"
            ))
            .await;
        let ev = w.next().await.expect("bookmark");
        assert_eq!(ev["type"], "BOOKMARK");
        assert_eq!(ev["object"]["kind"], "ConfigMap");
        assert!(rv_of(&ev["object"]) >= rv.parse::<u64>().expect("rv"));
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn timeout_seconds_ends_the_watch_cleanly() {
    let sim = start().await;
    for proto in [Proto::H1, Proto::H2] {
        let a = api(&sim, proto, Cred::Admin);
        let (_, list) = a.get("/api/v1/namespaces/demo/configmaps").await;
        let rv = list["metadata"]["resourceVersion"]
            .as_str()
            .expect("rv")
            .to_string();
        let started = std::time::Instant::now();
        let mut w = a
            .watch(&format!(
                "/api/v1/namespaces/demo/configmaps?watch=true&timeoutSeconds=1&resourceVersion={rv}"
            ))
            .await;
        assert!(w.next().await.is_none(), "no events, then a clean end");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(900), "ended early: {took:?}");
    }
    assert_eq!(sim.open_watches("configmaps"), 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn selector_transitions_become_added_and_deleted() {
    let sim = start().await;
    let a = api(&sim, Proto::H1, Cred::Admin);
    let base = "/api/v1/namespaces/demo/configmaps";
    let (_, list) = a.get(base).await;
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_string();
    let mut w = a
        .watch(&format!(
            "{base}?watch=true&labelSelector=team%3Dblue&resourceVersion={rv}"
        ))
        .await;
    let (s, _, _) = a
        .call(Method::POST, base, Some(&configmap("cm-c", json!({}))), &[])
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let label = |team: &str| json!({"metadata": {"labels": {"team": team}}});
    let merge = [("content-type", "application/merge-patch+json")];
    let (_, _, blue) = a
        .call(
            Method::PATCH,
            &format!("{base}/cm-c"),
            Some(&label("blue")),
            &merge,
        )
        .await;
    let (_, _, red) = a
        .call(
            Method::PATCH,
            &format!("{base}/cm-c"),
            Some(&label("red")),
            &merge,
        )
        .await;

    // The unlabelled create is invisible; entering is ADDED.
    let ev = w.next().await.expect("added");
    assert_eq!(ev["type"], "ADDED");
    assert_eq!(rv_of(&ev["object"]), rv_of(&blue));
    // Leaving is DELETED with the old object at the new RV.
    let ev = w.next().await.expect("deleted");
    assert_eq!(ev["type"], "DELETED");
    assert_eq!(ev["object"]["metadata"]["labels"]["team"], "blue");
    assert_eq!(rv_of(&ev["object"]), rv_of(&red));
    sim.shutdown().await;
}

/// What `kubectl get` sends.
const TABLE_ACCEPT: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";

#[tokio::test]
async fn kubectl_style_table_watches_send_one_row_tables() {
    let sim = start().await;
    let a = api(&sim, Proto::H2, Cred::Admin);
    let base = "/api/v1/namespaces/demo/configmaps";
    let (s, _, table) = a
        .call(
            Method::GET,
            &format!("{base}?limit=500"),
            None,
            &[("accept", TABLE_ACCEPT)],
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(table["kind"], "Table");
    let rv = table["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_string();
    let resp = a
        .send(
            Method::GET,
            &format!("{base}?watch=true&resourceVersion={rv}"),
            None,
            &[("accept", TABLE_ACCEPT)],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut w = Events {
        body: resp.into_body(),
        buf: Vec::new(),
    };
    for name in ["t-1", "t-2"] {
        let (s, _, _) = a
            .call(Method::POST, base, Some(&configmap(name, json!({}))), &[])
            .await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let first = w.next().await.expect("first");
    assert_eq!(first["type"], "ADDED");
    assert_eq!(first["object"]["kind"], "Table");
    assert!(first["object"]["columnDefinitions"].is_array());
    assert_eq!(first["object"]["rows"].as_array().expect("rows").len(), 1);
    // Like the apiserver: column definitions only on the first event.
    let second = w.next().await.expect("second");
    assert_eq!(second["object"]["kind"], "Table");
    assert!(second["object"]["columnDefinitions"].is_null());
    sim.shutdown().await;
}

#[tokio::test]
async fn put_status_changes_only_the_status() {
    let sim = start().await;
    let a = api(&sim, Proto::H1, Cred::Admin);
    let path = "/api/v1/namespaces/demo/pods/web-0";
    let (_, pod) = a.get(path).await;
    let mut next = pod.clone();
    next["status"]["phase"] = json!("Succeeded");
    next["spec"]["nodeName"] = json!("elsewhere");
    let (s, _, updated) = a
        .call(Method::PUT, &format!("{path}/status"), Some(&next), &[])
        .await;
    assert_eq!(s, StatusCode::OK, "{updated}");
    assert_eq!(updated["status"]["phase"], "Succeeded");
    assert_eq!(updated["spec"]["nodeName"], pod["spec"]["nodeName"]);
    let (s, status) = a.get(&format!("{path}/status")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(status["status"]["phase"], "Succeeded");
    sim.shutdown().await;
}

#[tokio::test]
async fn a_token_from_the_token_subresource_authenticates() {
    let sim = start().await;
    let admin = api(&sim, Proto::H2, Cred::Admin);
    let request = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"audiences": null, "expirationSeconds": 3600},
    });
    let (s, _, answer) = admin
        .call(
            Method::POST,
            "/api/v1/namespaces/demo/serviceaccounts/agent/token",
            Some(&request),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["kind"], "TokenRequest");
    assert!(
        answer["status"]["expirationTimestamp"]
            .as_str()
            .expect("exp")
            .ends_with('Z')
    );
    let token = answer["status"]["token"]
        .as_str()
        .expect("token")
        .to_string();

    let (s, _, missing) = admin
        .call(
            Method::POST,
            "/api/v1/namespaces/demo/serviceaccounts/nobody/token",
            Some(&request),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{missing}");

    for proto in [Proto::H1, Proto::H2] {
        let sa = api(&sim, proto, Cred::Token(&token));
        let (s, _, me) = sa
            .call(
                Method::POST,
                "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                Some(
                    &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}),
                ),
                &[],
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{me}");
        assert_eq!(
            me["status"]["userInfo"]["username"],
            "system:serviceaccount:demo:agent"
        );
        assert_eq!(
            me["status"]["userInfo"]["groups"],
            json!([
                "system:serviceaccounts",
                "system:serviceaccounts:demo",
                "system:authenticated"
            ])
        );
        // RBAC: nothing grants the agent configmaps until a Role does.
        let (s, _) = sa.get("/api/v1/namespaces/demo/configmaps").await;
        assert_eq!(s, StatusCode::FORBIDDEN);
    }
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "cm-reader"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}]});
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "agent-cm-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "agent", "namespace": "demo"}]});
    for (path, body) in [
        (
            "/apis/rbac.authorization.k8s.io/v1/namespaces/demo/roles",
            &role,
        ),
        (
            "/apis/rbac.authorization.k8s.io/v1/namespaces/demo/rolebindings",
            &binding,
        ),
    ] {
        let (s, _, v) = admin.call(Method::POST, path, Some(body), &[]).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    for proto in [Proto::H1, Proto::H2] {
        let sa = api(&sim, proto, Cred::Token(&token));
        let (s, _) = sa.get("/api/v1/namespaces/demo/configmaps").await;
        assert_eq!(s, StatusCode::OK);
    }

    // TokenReview answers like fixtures/tokenreview.body.
    let (s, _, review) = admin
        .call(
            Method::POST,
            "/apis/authentication.k8s.io/v1/tokenreviews",
            Some(&json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}})),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let shape = fixture("tokenreview.body");
    assert_eq!(review["kind"], shape["kind"]);
    assert_eq!(review["status"]["authenticated"], true);
    assert_eq!(
        review["status"]["user"]["username"],
        "system:serviceaccount:demo:agent"
    );
    assert_eq!(review["status"]["audiences"], shape["status"]["audiences"]);

    // The admin's own identity comes from its certificate.
    let (_, _, me) = admin
        .call(
            Method::POST,
            "/apis/authentication.k8s.io/v1/selfsubjectreviews",
            Some(&json!({})),
            &[],
        )
        .await;
    assert_eq!(me["status"]["userInfo"]["username"], "kubernetes-admin");

    let (s, _, sar) = admin
        .call(
            Method::POST,
            "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            Some(&json!({"spec": {"user": "x", "resourceAttributes": {"verb": "list", "resource": "secrets"}}})),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(sar["kind"], fixture("subjectaccessreview.body")["kind"]);
    // User "x" has no bindings: denied, shaped like the fixture's status.
    assert_eq!(sar["status"], fixture("subjectaccessreview.body")["status"]);
    sim.shutdown().await;
}

#[tokio::test]
async fn metrics_count_lists_and_open_watches() {
    let sim = start().await;
    let a = api(&sim, Proto::H2, Cred::Admin);
    let before = sim.request_count("LIST", "configmaps");
    let (s, _) = a.get("/api/v1/namespaces/demo/configmaps").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(sim.request_count("LIST", "configmaps"), before + 1);

    let w = a
        .watch("/api/v1/configmaps?watch=true&resourceVersion=0")
        .await;
    assert_eq!(sim.open_watches("configmaps"), 1);
    let (_, text) = a.get("/metrics").await;
    let text = text.as_str().expect("text");
    assert!(text.contains("# TYPE apiserver_request_total counter"));
    assert!(text.contains(
        "apiserver_longrunning_requests{component=\"apiserver\",group=\"\",resource=\"configmaps\",scope=\"cluster\",subresource=\"\",verb=\"WATCH\",version=\"v1\"} 1"
    ), "{text}");
    assert!(text.contains("verb=\"LIST\""));

    // Dropping the client's stream ends the watch on the server.
    drop(w);
    for _ in 0..200 {
        if sim.open_watches("configmaps") == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sim.open_watches("configmaps"), 0);
    assert_eq!(sim.request_count("WATCH", "configmaps"), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn shutdown_ends_open_watches() {
    let sim = start().await;
    let cms = resources::find("", "v1", "configmaps").expect("configmaps");
    let existing = sim.store().count(cms);
    let a = api(&sim, Proto::H1, Cred::Admin);
    let mut w = a
        .watch("/api/v1/configmaps?watch=true&resourceVersion=0")
        .await;
    for _ in 0..existing {
        assert_eq!(w.next().await.expect("initial event")["type"], "ADDED");
    }
    tokio::time::timeout(STEP, sim.shutdown())
        .await
        .expect("shutdown in time");
    assert!(w.next().await.is_none(), "the watch ends with the server");
}

// ---- HTTP/2 stream limit ------------------------------------------------

const PODS_WATCH: &str = "/api/v1/namespaces/default/pods?watch=true";

/// A bodiless GET of `path` on `sim`, for a raw HTTP/2 connection.
fn h2_get(sim: &KubeSim, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("{}{path}", sim.url()))
        .body(Full::default())
        .expect("request")
}

#[tokio::test]
async fn a_request_beyond_the_stream_limit_waits_for_a_free_stream() {
    let sim = start_with(SimConfig {
        http2_max_streams_per_connection: 5,
        ..SimConfig::default()
    })
    .await;
    let admin = sim.pki().admin_client().expect("admin cert");
    let (mut send, conn) = common::h2_connect(&sim, Some(&admin)).await;
    let driver = tokio::spawn(conn);

    // Five watches fill the connection; each gets its headers.
    let mut watches = Vec::new();
    for _ in 0..5 {
        let resp = tokio::time::timeout(STEP, send.send_request(h2_get(&sim, PODS_WATCH)))
            .await
            .expect("watch headers in time")
            .expect("watch response");
        assert_eq!(resp.status(), StatusCode::OK);
        watches.push(resp.into_body());
    }

    // The sixth has no stream to open while they stay open. /version
    // answers at once when it gets through, so a pending answer means the
    // stream limit held it.
    let mut sixth = std::pin::pin!(send.send_request(h2_get(&sim, "/version")));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sixth.as_mut())
            .await
            .is_err(),
        "a sixth stream was served while five were open"
    );

    // Ending one watch frees its stream for the waiting request.
    drop(watches.pop());
    let resp = tokio::time::timeout(STEP, sixth)
        .await
        .expect("the sixth request is served once a stream is free")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);

    drop(watches);
    drop(send);
    tokio::time::timeout(STEP, driver)
        .await
        .expect("the connection closes once its handles are gone")
        .expect("driver task")
        .expect("connection ends cleanly");
    sim.shutdown().await;
}

#[tokio::test]
async fn the_default_stream_limit_is_gos_250() {
    // 0 is the apiserver's spelling of "Go's default".
    for limit in [SimConfig::default().http2_max_streams_per_connection, 0] {
        let sim = start_with(SimConfig {
            http2_max_streams_per_connection: limit,
            ..SimConfig::default()
        })
        .await;
        let (mut send, conn) = common::h2_connect(&sim, None).await;
        let mut conn = std::pin::pin!(conn);
        // kube-sim's SETTINGS frame precedes any response on the
        // connection, so after one round trip the client has applied it.
        let round_trip = async {
            let resp = send.send_request(h2_get(&sim, "/version")).await?;
            assert_eq!(resp.status(), StatusCode::OK);
            resp.into_body().collect().await.map(|_| ())
        };
        tokio::select! {
            r = tokio::time::timeout(STEP, round_trip) => {
                r.expect("GET /version in time").expect("GET /version");
            }
            r = conn.as_mut() => panic!("the connection ended during GET /version: {r:?}"),
        }
        assert_eq!(conn.current_max_send_streams(), 250, "limit {limit}");
        sim.shutdown().await;
    }
}

// ---- kubectl end to end -------------------------------------------------

fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[test]
fn base64_matches_rfc4648_vectors() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
}

/// Runs kubectl with `kubeconfig`; returns stdout, panics with stderr on failure.
async fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .env_remove("KUBECONFIG")
            .env("HOME", kubeconfig.parent().expect("dir"))
            .output(),
    )
    .await
    .expect("kubectl in time")
    .expect("run kubectl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn kubectl_works_directly_against_kube_sim() {
    if std::process::Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_err()
    {
        eprintln!("kubectl not installed; skipping");
        return;
    }
    let sim = start().await;
    let admin = sim.pki().admin_client().expect("admin");
    let dir = std::env::temp_dir().join(format!("kube-sim-kubectl-{}", sim.addr().port()));
    std::fs::create_dir_all(&dir).expect("dir");
    let kubeconfig = dir.join("kubeconfig");
    let config = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: sim\n  cluster:\n    server: {}\n    certificate-authority-data: {}\n\
         users:\n- name: admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n\
         contexts:\n- name: sim\n  context:\n    cluster: sim\n    user: admin\ncurrent-context: sim\n",
        sim.url(),
        base64(sim.pki().serving_ca.cert_pem().as_bytes()),
        base64(admin.cert_pem.as_bytes()),
        base64(admin.key_pem.as_bytes()),
    );
    std::fs::write(&kubeconfig, config).expect("write kubeconfig");

    let ns = kubectl(&kubeconfig, &["get", "ns"]).await;
    for n in ["default", "kube-system", "demo"] {
        assert!(ns.contains(n), "{ns}");
    }
    let pods = kubectl(&kubeconfig, &["get", "pods", "-A"]).await;
    assert!(pods.contains("web-0") && pods.contains("Running"), "{pods}");
    kubectl(
        &kubeconfig,
        &["create", "configmap", "x", "--from-literal=a=b"],
    )
    .await;
    let yaml = kubectl(&kubeconfig, &["get", "cm", "x", "-o", "yaml"]).await;
    assert!(yaml.contains("a: b") && yaml.contains("name: x"), "{yaml}");
    let resources = kubectl(&kubeconfig, &["api-resources"]).await;
    assert!(
        resources.contains("configmaps") && resources.contains("deployments"),
        "{resources}"
    );
    let me = kubectl(&kubeconfig, &["auth", "whoami"]).await;
    assert!(me.contains("kubernetes-admin"), "{me}");
    kubectl(&kubeconfig, &["create", "namespace", "team-a"]).await;
    let sas = kubectl(&kubeconfig, &["get", "serviceaccounts", "-n", "team-a"]).await;
    assert!(sas.contains("default"), "{sas}");

    // `kubectl create token` (protobuf TokenRequest), then a token-only
    // kubeconfig: the client cert would otherwise win over the token.
    let token = kubectl(&kubeconfig, &["create", "token", "agent", "-n", "demo"]).await;
    let token_config = dir.join("kubeconfig-token");
    let config = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: sim\n  cluster:\n    server: {}\n    certificate-authority-data: {}\n\
         users:\n- name: agent\n  user:\n    token: {}\n\
         contexts:\n- name: sim\n  context:\n    cluster: sim\n    user: agent\ncurrent-context: sim\n",
        sim.url(),
        base64(sim.pki().serving_ca.cert_pem().as_bytes()),
        token.trim(),
    );
    std::fs::write(&token_config, config).expect("write kubeconfig");
    let me = kubectl(&token_config, &["auth", "whoami"]).await;
    assert!(me.contains("system:serviceaccount:demo:agent"), "{me}");

    let _ = std::fs::remove_dir_all(&dir);
    sim.shutdown().await;
}
