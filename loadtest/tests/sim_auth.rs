//! kube-sim's authentication and authorization over real HTTPS: multi-group
//! client certificates, front-proxy (requestheader) authentication,
//! impersonation, RBAC allow/deny with the apiserver's 403 Status, anonymous
//! requests, and kubectl's `auth whoami`, `auth can-i`, `create role` and
//! `create rolebinding` against it.
//!
//! Every test starts its own kube-sim on 127.0.0.1:0.

mod common;

use common::{start, start_with};
use std::time::Duration;

use breakwater_loadtest::pki::CertPair;
use breakwater_loadtest::sim::{Authorization, KubeSim, SimConfig, resources};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

/// How long any single network step may take before the test fails.
const STEP: Duration = Duration::from_secs(10);

const WHOAMI: &str = "/apis/authentication.k8s.io/v1/selfsubjectreviews";

/// A hyper client (HTTP/2) presenting `cert` (or nothing) and `token` (or nothing).
struct Api {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
    token: Option<String>,
}

fn api(sim: &KubeSim, cert: Option<&CertPair>, token: Option<&str>) -> Api {
    let connector = common::connector(sim, cert, true);
    Api {
        client: Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector),
        base: sim.url(),
        token: token.map(str::to_string),
    }
}

impl Api {
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let body = body
            .map(|b| Bytes::from(serde_json::to_vec(b).expect("json")))
            .unwrap_or_default();
        let req = req.body(Full::new(body)).expect("request");
        let resp = tokio::time::timeout(STEP, self.client.request(req))
            .await
            .expect("response in time")
            .expect("response");
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

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> (StatusCode, Value) {
        let (s, _, v) = self.call(Method::GET, path, None, headers).await;
        (s, v)
    }

    /// `kubectl auth whoami`: the status.userInfo, or the failure.
    async fn whoami(&self, headers: &[(&str, &str)]) -> (StatusCode, Value) {
        let body = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"});
        let (s, _, v) = self.call(Method::POST, WHOAMI, Some(&body), headers).await;
        if s == StatusCode::CREATED {
            (s, v["status"]["userInfo"].clone())
        } else {
            (s, v)
        }
    }
}

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("fixture json")
}

fn rbac(plural: &str) -> &'static resources::ResourceType {
    resources::find("rbac.authorization.k8s.io", "v1", plural).expect("rbac type")
}

/// Creates Role `ns/name` with `rules` and binds it to ServiceAccount `ns/sa`.
fn grant(sim: &KubeSim, ns: &str, name: &str, sa: &str, rules: Value) {
    sim.store()
        .create(
            rbac("roles"),
            Some(ns),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                   "metadata": {"name": name, "namespace": ns}, "rules": rules}),
        )
        .expect("role");
    sim.store()
        .create(
            rbac("rolebindings"),
            Some(ns),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": {"name": name, "namespace": ns},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                   "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]}),
        )
        .expect("rolebinding");
}

#[tokio::test]
async fn a_client_cert_with_several_groups_is_in_all_of_them() {
    let sim = start().await;
    let cert = sim
        .pki()
        .client_ca
        .issue_client("alice", &["a", "b", "c"])
        .expect("cert");
    let (s, me) = api(&sim, Some(&cert), None).whoami(&[]).await;
    assert_eq!(s, StatusCode::CREATED, "{me}");
    assert_eq!(
        me,
        json!({"username": "alice", "groups": ["a", "b", "c", "system:authenticated"]})
    );
    // A group binding grants to every member.
    sim.store()
        .create(
            rbac("clusterrolebindings"),
            None,
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": "b-admins"},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
                   "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "b"}]}),
        )
        .expect("binding");
    let (s, _) = api(&sim, Some(&cert), None)
        .get("/api/v1/namespaces/demo/secrets", &[])
        .await;
    assert_eq!(s, StatusCode::OK);
    sim.shutdown().await;
}

#[tokio::test]
async fn front_proxy_headers_count_only_on_a_front_proxy_connection() {
    let sim = start().await;
    let proxy_cert = sim.pki().front_proxy_client().expect("front-proxy cert");
    let proxy = api(&sim, Some(&proxy_cert), None);
    let claims = [
        ("X-Remote-User", "alice"),
        ("X-Remote-Group", "g1"),
        ("X-Remote-Group", "g2"),
        ("X-Remote-Extra-Scopes", "read"),
        ("X-Remote-Extra-Acme.com%2Fteam", "blue"),
    ];
    let (s, me) = proxy.whoami(&claims).await;
    assert_eq!(s, StatusCode::CREATED, "{me}");
    assert_eq!(
        me,
        json!({"username": "alice", "groups": ["g1", "g2", "system:authenticated"],
               "extra": {"acme.com/team": ["blue"], "scopes": ["read"]}})
    );
    // The proxy's own certificate is never a user: without X-Remote-User the
    // request fails authentication.
    let (s, v) = proxy.get("/api/v1/namespaces", &[]).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v, fixture("error-401-unauthorized.body"));
    // ...unless a bearer token authenticates it.
    let token = sim.issue_token("demo", "viewer", Duration::from_secs(600));
    let (s, me) = api(&sim, Some(&proxy_cert), Some(&token)).whoami(&[]).await;
    assert_eq!(
        (s, me["username"].clone()),
        (
            StatusCode::CREATED,
            json!("system:serviceaccount:demo:viewer")
        )
    );
    // The headers are trusted: a front proxy can name system:masters.
    let masters = [
        ("X-Remote-User", "root"),
        ("X-Remote-Group", "system:masters"),
    ];
    let (s, _) = proxy.get("/api/v1/namespaces/demo/secrets", &masters).await;
    assert_eq!(s, StatusCode::OK);

    // On an ordinary client-cert or token connection they are ignored.
    let cert = sim.pki().client_ca.issue_client("bob", &[]).expect("cert");
    let (s, me) = api(&sim, Some(&cert), None).whoami(&masters).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(
        me,
        json!({"username": "bob", "groups": ["system:authenticated"]})
    );
    let (s, _) = api(&sim, Some(&cert), None)
        .get("/api/v1/namespaces/demo/secrets", &masters)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (_, me) = api(&sim, None, Some(&token)).whoami(&masters).await;
    assert_eq!(me["username"], "system:serviceaccount:demo:viewer");
    // Anonymous with the headers stays anonymous.
    let (s, v) = api(&sim, None, None)
        .get("/api/v1/namespaces/demo/secrets", &masters)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // A client-CA certificate named front-proxy-client is not a front proxy.
    let fake = sim
        .pki()
        .client_ca
        .issue_client("front-proxy-client", &[])
        .expect("cert");
    let (_, me) = api(&sim, Some(&fake), None).whoami(&claims).await;
    assert_eq!(me["username"], "front-proxy-client");
    sim.shutdown().await;
}

#[tokio::test]
async fn a_front_proxy_cert_with_a_disallowed_cn_is_401() {
    let sim = start().await;
    let rogue = sim
        .pki()
        .front_proxy_ca
        .issue_client("rogue-proxy", &[])
        .expect("cert");
    let (s, _, v) = api(&sim, Some(&rogue), None)
        .call(
            Method::GET,
            "/api/v1/namespaces",
            None,
            &[("X-Remote-User", "alice")],
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v, fixture("error-401-unauthorized.body"));
    let (s, _) = api(&sim, Some(&rogue), None).get("/healthz", &[]).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    sim.shutdown().await;

    // The allowed names are configurable; an empty list allows any CN.
    let sim = start_with(SimConfig {
        requestheader_allowed_names: vec!["other".into()],
        ..SimConfig::default()
    })
    .await;
    let default_cn = sim.pki().front_proxy_client().expect("cert");
    let (s, _) = api(&sim, Some(&default_cn), None)
        .whoami(&[("X-Remote-User", "alice")])
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    sim.shutdown().await;
    let sim = start_with(SimConfig {
        requestheader_allowed_names: vec![],
        ..SimConfig::default()
    })
    .await;
    let rogue = sim
        .pki()
        .front_proxy_ca
        .issue_client("rogue-proxy", &[])
        .expect("cert");
    let (s, me) = api(&sim, Some(&rogue), None)
        .whoami(&[("X-Remote-User", "alice")])
        .await;
    assert_eq!(
        (s, me["username"].clone()),
        (StatusCode::CREATED, json!("alice"))
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn impersonation_is_checked_with_the_impersonate_verb() {
    let sim = start().await;
    let admin = api(&sim, Some(&sim.pki().admin_client().expect("admin")), None);

    // The admin may impersonate anyone; groups default as the apiserver's.
    let as_viewer = [("Impersonate-User", "system:serviceaccount:demo:viewer")];
    let (s, me) = admin.whoami(&as_viewer).await;
    assert_eq!(s, StatusCode::CREATED, "{me}");
    assert_eq!(
        me,
        json!({"username": "system:serviceaccount:demo:viewer",
               "groups": ["system:serviceaccounts", "system:serviceaccounts:demo", "system:authenticated"]})
    );
    let (s, _) = admin.get("/api/v1/namespaces/demo/pods", &as_viewer).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = admin
        .get("/api/v1/namespaces/demo/configmaps", &as_viewer)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(
        v["message"],
        "configmaps is forbidden: User \"system:serviceaccount:demo:viewer\" cannot list resource \"configmaps\" in API group \"\" in the namespace \"demo\""
    );
    let full = [
        ("Impersonate-User", "bob"),
        ("Impersonate-Group", "devs"),
        ("Impersonate-Group", "ops"),
        ("Impersonate-Uid", "u-42"),
        ("Impersonate-Extra-Reason", "on-call"),
    ];
    let (s, me) = admin.whoami(&full).await;
    assert_eq!(s, StatusCode::CREATED, "{me}");
    assert_eq!(
        me,
        json!({"username": "bob", "uid": "u-42", "groups": ["devs", "ops", "system:authenticated"],
               "extra": {"reason": ["on-call"]}})
    );
    // Groups without a user: the apiserver's internal error.
    let (s, _, v) = admin
        .call(Method::GET, "/api", None, &[("Impersonate-Group", "devs")])
        .await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        v.as_str()
            .expect("text")
            .contains("without impersonating a user"),
        "{v}"
    );

    // A ServiceAccount without the verb gets the apiserver's 403.
    let viewer = api(
        &sim,
        None,
        Some(&sim.issue_token("demo", "viewer", Duration::from_secs(600))),
    );
    let (s, h, v) = viewer
        .call(
            Method::GET,
            "/api/v1/namespaces/demo/pods",
            None,
            &[("Impersonate-User", "kubernetes-admin")],
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(
        v,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "users \"kubernetes-admin\" is forbidden: User \"system:serviceaccount:demo:viewer\" cannot impersonate resource \"users\" in API group \"\" at the cluster scope",
               "reason": "Forbidden", "details": {"name": "kubernetes-admin", "kind": "users"}, "code": 403})
    );
    // Granted impersonation of one user (resourceNames) but not of groups.
    sim.store()
        .create(
            rbac("clusterroles"),
            None,
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                   "metadata": {"name": "impersonate-bob"},
                   "rules": [{"apiGroups": [""], "resources": ["users"], "verbs": ["impersonate"], "resourceNames": ["bob"]}]}),
        )
        .expect("role");
    sim.store()
        .create(
            rbac("clusterrolebindings"),
            None,
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": "viewer-impersonates-bob"},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "impersonate-bob"},
                   "subjects": [{"kind": "ServiceAccount", "name": "viewer", "namespace": "demo"}]}),
        )
        .expect("binding");
    let (s, me) = viewer.whoami(&[("Impersonate-User", "bob")]).await;
    assert_eq!(
        (s, me["username"].clone()),
        (StatusCode::CREATED, json!("bob"))
    );
    let (s, v) = viewer
        .whoami(&[
            ("Impersonate-User", "bob"),
            ("Impersonate-Group", "system:masters"),
        ])
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(
        v["message"],
        "groups \"system:masters\" is forbidden: User \"system:serviceaccount:demo:viewer\" cannot impersonate resource \"groups\" in API group \"\" at the cluster scope"
    );
    let (s, v) = viewer
        .whoami(&[("Impersonate-User", "bob"), ("Impersonate-Uid", "1")])
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(
        v["message"],
        "uids.authentication.k8s.io \"1\" is forbidden: User \"system:serviceaccount:demo:viewer\" cannot impersonate resource \"uids\" in API group \"authentication.k8s.io\" at the cluster scope"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn rbac_denies_with_the_apiservers_403_body() {
    let sim = start().await;
    // Recreate the fixture's situation exactly: SA fixtures/limited lists secrets.
    let ns = resources::find("", "v1", "namespaces").expect("ns");
    sim.store()
        .create(
            ns,
            None,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "fixtures"}}),
        )
        .expect("namespace");
    let token = sim.issue_token("fixtures", "limited", Duration::from_secs(600));
    let limited = api(&sim, None, Some(&token));
    let (s, h, v) = limited
        .call(
            Method::GET,
            "/api/v1/namespaces/fixtures/secrets",
            None,
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(v, fixture("error-403-forbidden.body"));
    // Discovery and self-reviews are everyone's.
    for path in [
        "/api",
        "/apis",
        "/api/v1",
        "/apis/rbac.authorization.k8s.io/v1",
        "/version",
        "/openapi/v3",
    ] {
        let (s, v) = limited.get(path, &[]).await;
        assert_eq!(s, StatusCode::OK, "{path}: {v}");
    }
    let (s, _) = limited.whoami(&[]).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, v) = limited.get("/metrics", &[]).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(
        v["message"],
        "forbidden: User \"system:serviceaccount:fixtures:limited\" cannot get path \"/metrics\""
    );
    // Unknown resources are authorized before they are routed.
    let (s, _) = limited.get("/api/v1/widgets", &[]).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    sim.shutdown().await;
}

#[tokio::test]
async fn rbac_honours_resource_names_and_subresources() {
    let sim = start().await;
    grant(
        &sim,
        "demo",
        "limited",
        "agent",
        json!([
            {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["app-config"], "verbs": ["get", "update"]},
            {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
            {"apiGroups": ["apps"], "resources": ["*"], "verbs": ["list"]},
        ]),
    );
    let agent = api(
        &sim,
        None,
        Some(&sim.issue_token("demo", "agent", Duration::from_secs(600))),
    );
    let (s, _) = agent
        .get("/api/v1/namespaces/demo/configmaps/app-config", &[])
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = agent
        .get("/api/v1/namespaces/demo/configmaps/agent-config", &[])
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(
        v["message"],
        "configmaps \"agent-config\" is forbidden: User \"system:serviceaccount:demo:agent\" cannot get resource \"configmaps\" in API group \"\" in the namespace \"demo\""
    );
    assert_eq!(
        v["details"],
        json!({"name": "agent-config", "kind": "configmaps"})
    );
    let (s, _) = agent.get("/api/v1/namespaces/demo/configmaps", &[]).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // A list pinned to the name by a field selector is a named request.
    let (s, _) = agent
        .get(
            "/api/v1/namespaces/demo/configmaps?fieldSelector=metadata.name%3Dapp-config",
            &[],
        )
        .await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "list is not granted, even by name"
    );
    let (s, _) = agent
        .get("/api/v1/namespaces/demo/pods/web-0/log", &[])
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = agent.get("/api/v1/namespaces/demo/pods/web-0", &[]).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(
        v["message"],
        "pods \"web-0\" is forbidden: User \"system:serviceaccount:demo:agent\" cannot get resource \"pods\" in API group \"\" in the namespace \"demo\""
    );
    let (s, _, v) = agent
        .call(
            Method::POST,
            "/api/v1/namespaces/demo/pods/web-0/exec?command=ls",
            None,
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(
        v["message"],
        "pods \"web-0\" is forbidden: User \"system:serviceaccount:demo:agent\" cannot create resource \"pods/exec\" in API group \"\" in the namespace \"demo\""
    );
    let (s, _) = agent
        .get("/apis/apps/v1/namespaces/demo/deployments", &[])
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = agent.get("/apis/apps/v1/deployments", &[]).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(
        v["message"],
        "deployments.apps is forbidden: User \"system:serviceaccount:demo:agent\" cannot list resource \"deployments\" in API group \"apps\" at the cluster scope"
    );
    assert_eq!(
        v["details"],
        json!({"group": "apps", "kind": "deployments"})
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn anonymous_requests_reach_health_only_and_bad_credentials_are_401() {
    let sim = start().await;
    let anon = api(&sim, None, None);
    for path in ["/healthz", "/livez", "/readyz", "/version"] {
        let (s, _) = anon.get(path, &[]).await;
        assert_eq!(s, StatusCode::OK, "{path}");
    }
    let (s, v) = anon.get("/api/v1/pods", &[]).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(
        v["message"],
        "pods is forbidden: User \"system:anonymous\" cannot list resource \"pods\" in API group \"\" at the cluster scope"
    );
    let (s, v) = anon.get("/api/v1/namespaces", &[]).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(
        v["message"],
        "namespaces is forbidden: User \"system:anonymous\" cannot list resource \"namespaces\" in API group \"\" at the cluster scope"
    );
    let (s, v) = anon.get("/api", &[]).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(
        v["message"],
        "forbidden: User \"system:anonymous\" cannot get path \"/api\""
    );
    let (s, v) = anon.whoami(&[]).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // A token that fails verification is 401 everywhere, never anonymous.
    let bad = api(&sim, None, Some("not.a.jwt"));
    for path in ["/healthz", "/api", "/api/v1/pods"] {
        let (s, v) = bad.get(path, &[]).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(v, fixture("error-401-unauthorized.body"));
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn without_anonymous_auth_a_request_with_no_credentials_is_401() {
    assert!(
        SimConfig::default().anonymous_auth,
        "the apiserver's default is --anonymous-auth=true"
    );
    let sim = start_with(SimConfig {
        anonymous_auth: false,
        ..SimConfig::default()
    })
    .await;
    // No credentials: the union authenticator has no anonymous fallback, so
    // even the paths system:public-info-viewer grants are refused.
    let anon = api(&sim, None, None);
    for path in ["/healthz", "/version", "/api", "/api/v1/namespaces"] {
        let (s, h, v) = anon.call(Method::GET, path, None, &[]).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(h["content-type"], "application/json", "{path}");
        assert_eq!(h["cache-control"], "no-cache, private", "{path}");
        assert_eq!(v, fixture("error-401-unauthorized.body"), "{path}");
    }
    let (s, v) = anon.whoami(&[]).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");

    // Every real credential still authenticates.
    let admin = sim.pki().admin_client().expect("admin cert");
    let (s, _) = api(&sim, Some(&admin), None)
        .get("/api/v1/namespaces", &[])
        .await;
    assert_eq!(s, StatusCode::OK);
    let token = sim.issue_token("demo", "viewer", Duration::from_secs(600));
    let (s, me) = api(&sim, None, Some(&token)).whoami(&[]).await;
    assert_eq!(
        (s, me["username"].clone()),
        (
            StatusCode::CREATED,
            json!("system:serviceaccount:demo:viewer")
        )
    );
    let proxy_cert = sim.pki().front_proxy_client().expect("front-proxy cert");
    let proxy = api(&sim, Some(&proxy_cert), None);
    let (s, me) = proxy.whoami(&[("X-Remote-User", "alice")]).await;
    assert_eq!(
        (s, me["username"].clone()),
        (StatusCode::CREATED, json!("alice"))
    );
    // A front-proxy certificate without X-Remote-User was never anonymous.
    let (s, v) = proxy.get("/api/v1/namespaces", &[]).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v, fixture("error-401-unauthorized.body"));
    sim.shutdown().await;
}

#[tokio::test]
async fn access_reviews_evaluate_rbac() {
    let sim = start().await;
    let admin = api(&sim, Some(&sim.pki().admin_client().expect("admin")), None);
    let sar = |user: &str, verb: &str, resource: &str, ns: &str| {
        json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
               "spec": {"user": user, "groups": ["system:serviceaccounts", "system:authenticated"],
                        "resourceAttributes": {"namespace": ns, "verb": verb, "resource": resource,
                            "fieldSelector": {"rawSelector": "spec.nodeName=node-1"},
                            "labelSelector": {"rawSelector": "app=web"}}}})
    };
    let path = "/apis/authorization.k8s.io/v1/subjectaccessreviews";
    let viewer = "system:serviceaccount:demo:viewer";
    let (s, _, v) = admin
        .call(
            Method::POST,
            path,
            Some(&sar(viewer, "list", "pods", "demo")),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(
        v["status"],
        json!({"allowed": true, "reason": "RBAC: allowed by RoleBinding \"viewer-pod-viewer/demo\" of Role \"pod-viewer\" to ServiceAccount \"viewer/demo\""})
    );
    assert_eq!(
        v["spec"]["resourceAttributes"]["fieldSelector"]["rawSelector"],
        "spec.nodeName=node-1"
    );
    let (_, _, v) = admin
        .call(
            Method::POST,
            path,
            Some(&sar(viewer, "list", "secrets", "demo")),
            &[],
        )
        .await;
    assert_eq!(v["status"], json!({"allowed": false}));
    let (_, _, v) = admin
        .call(
            Method::POST,
            path,
            Some(&sar(
                "system:serviceaccount:kube-system:breakwater-demo-admin",
                "delete",
                "nodes",
                "",
            )),
            &[],
        )
        .await;
    assert_eq!(v["status"]["allowed"], true);

    // SelfSubjectAccessReview answers for the caller.
    let token = sim.issue_token("demo", "viewer", Duration::from_secs(600));
    let me = api(&sim, None, Some(&token));
    let ssar = |verb: &str, resource: &str| {
        json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
               "spec": {"resourceAttributes": {"namespace": "demo", "verb": verb, "resource": resource}}})
    };
    let path = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews";
    let (s, _, v) = me
        .call(Method::POST, path, Some(&ssar("watch", "pods")), &[])
        .await;
    assert_eq!(
        (s, v["status"]["allowed"].clone()),
        (StatusCode::CREATED, json!(true))
    );
    let (_, _, v) = me
        .call(Method::POST, path, Some(&ssar("delete", "pods")), &[])
        .await;
    assert_eq!(v["status"]["allowed"], false);
    let nr = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                    "spec": {"nonResourceAttributes": {"path": "/apis/apps", "verb": "get"}}});
    let (_, _, v) = me.call(Method::POST, path, Some(&nr), &[]).await;
    assert_eq!(v["status"]["allowed"], true);
    sim.shutdown().await;
}

#[tokio::test]
async fn always_allow_mode_skips_rbac() {
    let sim = start_with(SimConfig {
        authorization: Authorization::AlwaysAllow,
        ..SimConfig::default()
    })
    .await;
    let token = sim.issue_token("demo", "agent", Duration::from_secs(600));
    let (s, _) = api(&sim, None, Some(&token))
        .get("/api/v1/namespaces/kube-system/secrets", &[])
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = api(&sim, None, None).get("/api/v1/pods", &[]).await;
    assert_eq!(s, StatusCode::OK);
    sim.shutdown().await;
}

// ---- kubectl ------------------------------------------------------------

fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn kubectl_installed() -> bool {
    std::process::Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_ok()
}

/// Writes a kubeconfig for `sim` with a client cert or a token.
fn kubeconfig(
    sim: &KubeSim,
    dir: &std::path::Path,
    name: &str,
    cert: Option<&CertPair>,
    token: Option<&str>,
) -> std::path::PathBuf {
    let user = match (cert, token) {
        (Some(c), _) => format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            base64(c.cert_pem.as_bytes()),
            base64(c.key_pem.as_bytes())
        ),
        (None, Some(t)) => format!("    token: {t}\n"),
        (None, None) => "    {}\n".to_string(),
    };
    let config = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: sim\n  cluster:\n    server: {}\n    certificate-authority-data: {}\n\
         users:\n- name: u\n  user:\n{user}\
         contexts:\n- name: sim\n  context:\n    cluster: sim\n    user: u\ncurrent-context: sim\n",
        sim.url(),
        base64(sim.pki().serving_ca.cert_pem().as_bytes()),
    );
    let path = dir.join(name);
    std::fs::write(&path, config).expect("write kubeconfig");
    path
}

/// Runs kubectl; returns (success, stdout, stderr).
async fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> (bool, String, String) {
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
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn kubectl_ok(kubeconfig: &std::path::Path, args: &[&str]) -> String {
    let (ok, out, err) = kubectl(kubeconfig, args).await;
    assert!(ok, "kubectl {args:?} failed: {err}\n{out}");
    out
}

#[tokio::test]
async fn kubectl_auth_and_rbac_commands_work() {
    if !kubectl_installed() {
        eprintln!("kubectl not installed; skipping");
        return;
    }
    let sim = start().await;
    let dir = std::env::temp_dir().join(format!("kube-sim-auth-{}", sim.addr().port()));
    std::fs::create_dir_all(&dir).expect("dir");
    let admin = kubeconfig(
        &sim,
        &dir,
        "admin",
        Some(&sim.pki().admin_client().expect("admin")),
        None,
    );
    let cert = sim
        .pki()
        .client_ca
        .issue_client("alice", &["team-a", "team-b"])
        .expect("cert");
    let alice = kubeconfig(&sim, &dir, "alice", Some(&cert), None);
    let viewer_token = sim.issue_token("demo", "viewer", Duration::from_secs(600));
    let viewer = kubeconfig(&sim, &dir, "viewer", None, Some(&viewer_token));

    // whoami shows a cert user's groups.
    let me = kubectl_ok(&alice, &["auth", "whoami", "-o", "json"]).await;
    let me: Value = serde_json::from_str(&me).expect("whoami json");
    assert_eq!(me["status"]["userInfo"]["username"], "alice");
    assert_eq!(
        me["status"]["userInfo"]["groups"],
        json!(["team-a", "team-b", "system:authenticated"])
    );

    // can-i answers from RBAC (exit status 1 for "no").
    assert_eq!(
        kubectl_ok(&viewer, &["auth", "can-i", "list", "pods", "-n", "demo"])
            .await
            .trim(),
        "yes"
    );
    let (ok, out, _) = kubectl(&viewer, &["auth", "can-i", "list", "secrets", "-n", "demo"]).await;
    assert!(!ok);
    assert_eq!(out.trim(), "no");
    let (ok, out, _) = kubectl(
        &viewer,
        &["auth", "can-i", "get", "pods", "-n", "kube-system"],
    )
    .await;
    assert_eq!((ok, out.trim()), (false, "no"));
    assert_eq!(
        kubectl_ok(&admin, &["auth", "can-i", "*", "*"])
            .await
            .trim(),
        "yes"
    );
    // A denied kubectl get shows the apiserver's message.
    let (ok, _, err) = kubectl(&viewer, &["get", "configmaps", "-n", "demo"]).await;
    assert!(!ok);
    assert!(
        err.contains("configmaps is forbidden: User \"system:serviceaccount:demo:viewer\" cannot list resource \"configmaps\""),
        "{err}"
    );

    // kubectl create role / rolebinding / clusterrolebinding (protobuf bodies).
    kubectl_ok(
        &admin,
        &[
            "create",
            "role",
            "cm-reader",
            "--verb=get,list",
            "--resource=configmaps",
            "-n",
            "demo",
        ],
    )
    .await;
    kubectl_ok(
        &admin,
        &[
            "create",
            "rolebinding",
            "viewer-cm",
            "--role=cm-reader",
            "--serviceaccount=demo:viewer",
            "-n",
            "demo",
        ],
    )
    .await;
    let roles = kubectl_ok(&admin, &["get", "roles", "-n", "demo"]).await;
    assert!(
        roles.contains("cm-reader") && roles.contains("pod-viewer"),
        "{roles}"
    );
    let cm = kubectl_ok(&viewer, &["get", "configmaps", "-n", "demo"]).await;
    assert!(cm.contains("app-config"), "{cm}");
    let rb = kubectl_ok(
        &admin,
        &[
            "get",
            "rolebinding",
            "viewer-cm",
            "-n",
            "demo",
            "-o",
            "json",
        ],
    )
    .await;
    let rb: Value = serde_json::from_str(&rb).expect("json");
    assert_eq!(
        rb["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-reader"})
    );
    assert_eq!(
        rb["subjects"],
        json!([{"kind": "ServiceAccount", "name": "viewer", "namespace": "demo"}])
    );
    kubectl_ok(
        &admin,
        &[
            "create",
            "clusterrole",
            "node-reader",
            "--verb=get,list",
            "--resource=nodes",
        ],
    )
    .await;
    kubectl_ok(
        &admin,
        &[
            "create",
            "clusterrolebinding",
            "alice-nodes",
            "--clusterrole=node-reader",
            "--user=alice",
        ],
    )
    .await;
    let nodes = kubectl_ok(&alice, &["get", "nodes"]).await;
    assert!(nodes.contains("node-1"), "{nodes}");
    // Impersonation through kubectl's --as.
    assert_eq!(
        kubectl_ok(&admin, &["auth", "can-i", "get", "nodes", "--as=alice"])
            .await
            .trim(),
        "yes"
    );
    let (ok, _, err) = kubectl(&viewer, &["get", "pods", "-n", "demo", "--as=alice"]).await;
    assert!(!ok);
    assert!(
        err.contains("cannot impersonate resource \"users\""),
        "{err}"
    );

    let _ = std::fs::remove_dir_all(&dir);
    sim.shutdown().await;
}

// ---- SelfSubjectReview across apiserver versions ---------------------------

/// The resource names `/apis/authentication.k8s.io/{version}` lists (empty
/// when that version is not served).
async fn authentication_resources(api: &Api, version: &str) -> Vec<String> {
    let (s, v) = api
        .get(&format!("/apis/authentication.k8s.io/{version}"), &[])
        .await;
    if s == StatusCode::NOT_FOUND {
        return Vec::new();
    }
    assert_eq!(s, StatusCode::OK, "{v}");
    v["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r["name"].as_str().expect("name").to_string())
        .collect()
}

/// SelfSubjectReview is `authentication.k8s.io/v1` from Kubernetes 1.28,
/// v1beta1 in 1.27, v1alpha1 in 1.26 (feature gate), and absent before: a
/// v1.24 apiserver (the recorded fixtures) lists only tokenreviews and
/// answers 404. kube-sim serves the configured one only, in POST and in
/// discovery; a bad token is a 401 at any version (authentication comes
/// before routing); and kubectl's `auth whoami`, which tries v1, v1beta1
/// and v1alpha1 in turn, finds it.
#[tokio::test]
async fn self_subject_review_is_served_at_the_configured_version_only() {
    use breakwater_loadtest::sim::SelfSubjectReviewVersion as Ssr;
    let fixture_v1 = fixture("apiserver-v1.24/discovery_apis_authentication.k8s.io_v1.body");
    let v124_names: Vec<&str> = fixture_v1["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r["name"].as_str().expect("name"))
        .collect();
    for (served, at) in [
        (Ssr::V1, Some("v1")),
        (Ssr::V1beta1, Some("v1beta1")),
        (Ssr::V1alpha1, Some("v1alpha1")),
        (Ssr::Absent, None),
    ] {
        let sim = start_with(SimConfig {
            self_subject_review: served,
            ..SimConfig::default()
        })
        .await;
        let token = sim.issue_token("demo", "viewer", Duration::from_secs(600));
        let as_sa = api(&sim, None, Some(&token));
        let bad = api(&sim, None, Some("not-a-token"));
        for version in ["v1", "v1beta1", "v1alpha1"] {
            let path = format!("/apis/authentication.k8s.io/{version}/selfsubjectreviews");
            let body = json!({"apiVersion": format!("authentication.k8s.io/{version}"),
                              "kind": "SelfSubjectReview"});
            let (s, _, v) = as_sa.call(Method::POST, &path, Some(&body), &[]).await;
            if at == Some(version) {
                assert_eq!(s, StatusCode::CREATED, "{served:?} {version}: {v}");
                assert_eq!(v["apiVersion"], format!("authentication.k8s.io/{version}"));
                assert_eq!(
                    v["status"]["userInfo"]["username"],
                    "system:serviceaccount:demo:viewer"
                );
            } else {
                assert_eq!(s, StatusCode::NOT_FOUND, "{served:?} {version}: {v}");
                assert_eq!(v["reason"], "NotFound", "{v}");
            }
            let (s, _, _) = bad.call(Method::POST, &path, Some(&body), &[]).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{served:?} {version}");

            let listed = authentication_resources(&as_sa, version).await;
            assert_eq!(
                listed.iter().any(|n| n == "selfsubjectreviews"),
                at == Some(version),
                "{served:?} {version}: {listed:?}"
            );
        }
        if served == Ssr::Absent {
            assert_eq!(
                authentication_resources(&as_sa, "v1").await,
                v124_names,
                "as v1.24 lists authentication.k8s.io/v1"
            );
        }

        if kubectl_installed() {
            let dir = std::env::temp_dir().join(format!("kube-sim-ssr-{}", sim.addr().port()));
            std::fs::create_dir_all(&dir).expect("dir");
            let kc = kubeconfig(&sim, &dir, "viewer", None, Some(&token));
            let (ok, out, err) = kubectl(&kc, &["auth", "whoami", "-o", "json"]).await;
            if at.is_some() {
                assert!(ok, "{served:?}: kubectl auth whoami: {err}");
                let me: Value = serde_json::from_str(&out).expect("whoami json");
                assert_eq!(
                    me["status"]["userInfo"]["username"],
                    "system:serviceaccount:demo:viewer"
                );
            } else {
                assert!(!ok, "{served:?}: whoami must fail: {out}");
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        sim.shutdown().await;
    }
}
