//! Identity end to end: who the proxy says is calling, in each upstream
//! mode, with kube-sim's real authentication and RBAC behind it.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use breakwater::config::ProxyConfig;
use breakwater::identity::AuthConfig;
use breakwater::tls::UpstreamTls;
use breakwater::upstream::{AuthMode, DEFAULT_PROXY_USER, Timeouts, UpstreamConfig};
use breakwater_loadtest::pki::Ca;
use breakwater_loadtest::sim::SimConfig;
use breakwater_loadtest::sim::auth::AuthPath;
use http_body_util::{BodyExt, Empty};
use serde_json::{Value, json};

use common::{Env, Lines, counter_sum, demo_env, get, https_client, scrape, write_kubeconfig};

/// A proxy in front of the demo's kube-sim in `mode`. The proxy's own
/// credential is kube-sim's admin certificate (impersonate, passthrough) or
/// its front-proxy certificate (front-proxy, auto).
async fn proxy_in_mode(
    env: &Env,
    mode: AuthMode,
    local_sa_keys: bool,
) -> breakwater::server::ProxyHandle {
    proxy_with(env, mode, local_sa_keys, true).await
}

/// [`proxy_in_mode`] with Breakwater's own `--anonymous-auth`.
async fn proxy_with(
    env: &Env,
    mode: AuthMode,
    local_sa_keys: bool,
    anonymous: bool,
) -> breakwater::server::ProxyHandle {
    let dir = env.dir.path();
    let auth = if local_sa_keys {
        AuthConfig {
            service_account_key_files: vec![dir.join("sa.pub")],
            service_account_issuers: vec![SimConfig::default().issuer],
            ..AuthConfig::default()
        }
    } else {
        AuthConfig::default()
    };
    start_with_auth(env, mode, AuthConfig { anonymous, ..auth }).await
}

/// A proxy in front of the demo's kube-sim in `mode`, authenticating with `auth`.
async fn start_with_auth(
    env: &Env,
    mode: AuthMode,
    auth: AuthConfig,
) -> breakwater::server::ProxyHandle {
    let dir = env.dir.path();
    let client_cert = match mode {
        AuthMode::FrontProxy | AuthMode::Auto => (
            dir.join("front-proxy-client.crt"),
            dir.join("front-proxy-client.key"),
        ),
        AuthMode::Passthrough | AuthMode::Impersonate => {
            (dir.join("admin.crt"), dir.join("admin.key"))
        }
    };
    breakwater::server::start(ProxyConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        plain_listen: None,
        privileged_listen: None,
        tls_cert: dir.join("proxy.crt"),
        tls_key: dir.join("proxy.key"),
        client_ca: Some(dir.join("client-ca.crt")),
        upstream: UpstreamConfig {
            url: env.demo.sim.url(),
            tls: UpstreamTls {
                ca: Some(dir.join("kube-sim-ca.crt")),
                client_cert: Some(client_cert),
            },
            token_file: None,
            mode,
            proxy_user: DEFAULT_PROXY_USER.to_string(),
            timeouts: Timeouts::default(),
            lanes: Default::default(),
        },
        auth,
        admin_listen: "127.0.0.1:0".parse().expect("addr"),
        shutdown_grace: Duration::from_secs(1),
        limits: Default::default(),
        watch: Default::default(),
        connections: Default::default(),
    })
    .await
    .expect("proxy starts")
}

fn admin_user(env: &Env) -> String {
    let dir = env.dir.path();
    format!(
        "client-certificate: {}\n    client-key: {}",
        dir.join("admin.crt").display(),
        dir.join("admin.key").display()
    )
}

async fn whoami(env: &Env, kubeconfig: &PathBuf) -> Value {
    let out = env
        .kubectl_with(kubeconfig, &["auth", "whoami", "-o", "json"])
        .await;
    assert!(
        out.status.success(),
        "whoami failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("whoami json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whoami_names_the_caller_in_every_upstream_mode() {
    let env = demo_env().await;
    let sa_token = env
        .kubectl_ok(&["create", "token", "default", "-n", "demo"])
        .await;
    let sa_token = sa_token.trim().to_string();
    for mode in [
        AuthMode::FrontProxy,
        AuthMode::Impersonate,
        AuthMode::Passthrough,
        AuthMode::Auto,
    ] {
        let proxy = proxy_in_mode(&env, mode, true).await;
        let server = format!("https://{}", proxy.addr());
        let as_admin = write_kubeconfig(&env, "kc-admin", &server, &admin_user(&env));
        let as_sa = write_kubeconfig(&env, "kc-sa", &server, &format!("token: {sa_token}"));

        let sa = whoami(&env, &as_sa).await;
        assert_eq!(
            sa["status"]["userInfo"]["username"], "system:serviceaccount:demo:default",
            "{mode:?}: {sa}"
        );
        let groups = sa["status"]["userInfo"]["groups"].to_string();
        assert!(
            groups.contains("system:serviceaccounts:demo"),
            "{mode:?}: {groups}"
        );

        if mode == AuthMode::Passthrough {
            // The proxy cannot present the client's certificate upstream.
            let out = env.kubectl_with(&as_admin, &["auth", "whoami"]).await;
            assert!(
                !out.status.success(),
                "{mode:?}: a cert user must be refused"
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("front-proxy or impersonate"), "{err}");
        } else {
            let admin = whoami(&env, &as_admin).await;
            assert_eq!(
                admin["status"]["userInfo"]["username"], "kubernetes-admin",
                "{mode:?}"
            );
            let groups = admin["status"]["userInfo"]["groups"].to_string();
            assert!(groups.contains("system:masters"), "{mode:?}: {groups}");
        }
        proxy.shutdown().await;
    }
}

/// Requests of `user` that kube-sim authenticated since `before`, per path.
fn auth_delta(
    env: &Env,
    user: &str,
    before: &std::collections::BTreeMap<AuthPath, u64>,
) -> std::collections::BTreeMap<AuthPath, u64> {
    env.demo
        .sim
        .auth_paths(user)
        .into_iter()
        .map(|(path, n)| (path, n - before.get(&path).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// One proxy in `auto`: a token client and a certificate client, over
/// HTTP/1.1 and HTTP/2, directly and through the watch hub. kube-sim sees
/// each as who it is, and says how it found out: the token as a token on a
/// connection without a certificate (what the apiserver caches; no
/// front-proxy certificate to verify), the certificate user by
/// requestheader (the only way the proxy can speak for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_passes_tokens_through_and_names_certificate_users_by_front_proxy_headers() {
    let env = demo_env().await;
    let proxy = proxy_in_mode(&env, AuthMode::Auto, true).await;
    let base = format!("https://{}", proxy.addr());
    let sa = "system:serviceaccount:demo:viewer";
    let admin = "kubernetes-admin";
    let sa_before = env.demo.sim.auth_paths(sa);
    let admin_before = env.demo.sim.auth_paths(admin);

    // kubectl, both ways: the apiserver's own answer to "who am I".
    let as_sa = write_kubeconfig(
        &env,
        "kc-auto-sa",
        &base,
        &format!("token: {}", common::viewer_token(&env)),
    );
    let as_admin = write_kubeconfig(&env, "kc-auto-admin", &base, &admin_user(&env));
    let who = whoami(&env, &as_sa).await;
    assert_eq!(who["status"]["userInfo"]["username"], sa, "{who}");
    let who = whoami(&env, &as_admin).await;
    assert_eq!(who["status"]["userInfo"]["username"], admin, "{who}");
    let groups = who["status"]["userInfo"]["groups"].to_string();
    assert!(groups.contains("system:masters"), "{groups}");

    // A GET and a watch (served by the hub, whose upstream stream carries
    // the caller's credentials) with the token, over both protocols.
    let token = common::viewer_token(&env);
    for h2 in [false, true] {
        let client = https_client(&env.demo.proxy_ca_pem, h2);
        let resp = client
            .request(get(&format!("{base}/api/v1/namespaces/demo/pods"), &token))
            .await
            .expect("GET");
        assert_eq!(resp.status(), 200, "h2={h2}");
        let resp = client
            .request(get(
                &format!("{base}/api/v1/namespaces/demo/pods?watch=true&resourceVersion=0&timeoutSeconds=1"),
                &token,
            ))
            .await
            .expect("watch");
        assert_eq!(resp.status(), 200, "h2={h2}");
        let mut lines = Lines::new(resp.into_body());
        assert!(
            lines.next_within(Duration::from_secs(20)).await.is_some(),
            "h2={h2}: an event"
        );
    }

    let sa_paths = auth_delta(&env, sa, &sa_before);
    assert!(
        sa_paths.get(&AuthPath::Token).copied().unwrap_or(0) >= 5,
        "the token went through as a token: {sa_paths:?}"
    );
    assert_eq!(
        sa_paths.len(),
        1,
        "and only so (no certificate beside it, no X-Remote-User): {sa_paths:?}"
    );
    let admin_paths = auth_delta(&env, admin, &admin_before);
    assert!(
        admin_paths
            .get(&AuthPath::RequestHeader)
            .copied()
            .unwrap_or(0)
            >= 1,
        "{admin_paths:?}"
    );
    assert_eq!(
        admin_paths.len(),
        1,
        "by front-proxy headers only: {admin_paths:?}"
    );
    proxy.shutdown().await;
}

/// Signs SA-shaped claims with `key_pem` (ES256).
fn sign(key_pem: &str, claims: &Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_ec_pem(key_pem.as_bytes()).expect("ec key");
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        claims,
        &key,
    )
    .expect("sign")
}

fn claims(iss: &str, aud: &str, exp_offset: i64) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    json!({
        "iss": iss, "aud": [aud], "sub": "system:serviceaccount:demo:default",
        "exp": now + exp_offset, "nbf": now - 10, "iat": now - 10,
        "kubernetes.io": {"namespace": "demo", "serviceaccount": {"name": "default", "uid": "u-1"}},
    })
}

async fn status_of(client: &common::HttpsClient, url: &str, token: &str) -> (u16, Value) {
    let resp = client.request(get(url, token)).await.expect("response");
    let code = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (code, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_401_never_anonymous() {
    let env = demo_env().await;
    let pki = env.demo.sim.pki();
    let issuer = SimConfig::default().issuer;
    let (other_key, _) = breakwater_loadtest::pki::signing_key_pem().expect("key");
    let cases = [
        (
            "expired",
            sign(&pki.sa_key_pem, &claims(&issuer, &issuer, -3600)),
        ),
        (
            "wrong issuer",
            sign(
                &pki.sa_key_pem,
                &claims("https://evil.example", &issuer, 3600),
            ),
        ),
        (
            "wrong audience",
            sign(&pki.sa_key_pem, &claims(&issuer, "other-audience", 3600)),
        ),
        ("forged", sign(&other_key, &claims(&issuer, &issuer, 3600))),
        ("garbage", "not-a-token".to_string()),
    ];
    let client = https_client(&env.demo.proxy_ca_pem, true);
    let url = format!("{}/api/v1/namespaces/demo/pods", env.proxy_url());
    for (what, token) in cases {
        let (code, body) = status_of(&client, &url, &token).await;
        assert_eq!(code, 401, "{what}: {body}");
        assert_eq!(body["kind"], "Status", "{what}");
        assert_eq!(body["reason"], "Unauthorized", "{what}");
    }
    // The same claims, properly signed, pass.
    let good = sign(&pki.sa_key_pem, &claims(&issuer, &issuer, 3600));
    let (code, _) = status_of(&client, &url, &good).await;
    assert_ne!(code, 401);
}

/// The vendored h2 keeps the last long Huffman-coded header value a
/// connection sent without indexing or never indexed (vendor/README.md): a
/// client that does not index `authorization` (h2's own client sends it
/// without indexing, nghttp2's — h2load, curl — never indexed) has its token
/// decoded once per connection, not per request. Two tokens of one length
/// that differ in one character, alternated on one HTTP/2 connection in
/// either form, must each be read as themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_alternated_on_one_http2_connection_are_each_read_as_sent() {
    let env = demo_env().await;
    let pki = env.demo.sim.pki();
    let issuer = SimConfig::default().issuer;
    let good = sign(&pki.sa_key_pem, &claims(&issuer, &issuer, 3600));
    let forged = same_length_twin(&good);
    assert_eq!(good.len(), forged.len());
    assert_ne!(good, forged);
    // One client, HTTP/2 only: its requests share one pooled connection.
    let client = https_client(&env.demo.proxy_ca_pem, true);
    let url = format!("{}/api/v1/namespaces/demo/pods", env.proxy_url());
    // h2's encoder sends a sensitive value as a never-indexed literal.
    let status = |token: &str, never_indexed: bool| {
        let mut req = get(&url, token);
        if let Some(v) = req.headers_mut().get_mut(http::header::AUTHORIZATION) {
            v.set_sensitive(never_indexed);
        }
        let client = client.clone();
        async move {
            let resp = client.request(req).await.expect("response");
            let code = resp.status().as_u16();
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            (code, String::from_utf8_lossy(&body).into_owned())
        }
    };
    for never_indexed in [false, true, false] {
        for round in 0..3 {
            let what = format!("round {round}, never indexed: {never_indexed}");
            let (code, body) = status(&good, never_indexed).await;
            assert_ne!(code, 401, "{what}, the signed token: {body}");
            let (code, body) = status(&forged, never_indexed).await;
            assert_eq!(code, 401, "{what}, the altered token: {body}");
        }
    }
}

/// `token` with one signature character replaced by another whose HPACK
/// Huffman code has the same length (RFC 7541 Appendix B): the coded values
/// then differ in their bits only, not in their length.
fn same_length_twin(token: &str) -> String {
    const SAME_CODE_LENGTH: [&str; 3] = [
        "012aceiost",
        "-3456789A_bdfghlmnpru",
        "BCDEFGHIJKLMNOPQRSTUVWYjkqvwxyz",
    ];
    let signature_at = token.rfind('.').expect("a JWT") + 1;
    let mut chars: Vec<char> = token.chars().collect();
    for c in chars.iter_mut().skip(signature_at) {
        if let Some(class) = SAME_CODE_LENGTH.iter().find(|class| class.contains(*c)) {
            let at = class.find(*c).expect("in class");
            *c = class[(at + 1) % class.len()..]
                .chars()
                .next()
                .expect("char");
            return chars.into_iter().collect();
        }
    }
    panic!("no replaceable character in the signature");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sent_remote_headers_do_not_change_who_you_are() {
    let env = demo_env().await;
    let viewer = std::fs::read_to_string(&env.demo.kubeconfig_viewer).expect("viewer kubeconfig");
    let token = viewer
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .expect("viewer token")
        .to_string();
    let client = https_client(&env.demo.proxy_ca_pem, false);
    let spoof = |req: http::Request<Empty<bytes::Bytes>>| {
        let (mut parts, body) = req.into_parts();
        parts
            .headers
            .insert("x-remote-user", "system:admin".parse().expect("hv"));
        parts
            .headers
            .append("x-remote-group", "system:masters".parse().expect("hv"));
        http::Request::from_parts(parts, body)
    };
    // whoami with spoofed headers.
    let req = http::Request::post(format!(
        "{}/apis/authentication.k8s.io/v1/selfsubjectreviews",
        env.proxy_url()
    ))
    .header("authorization", format!("Bearer {token}"))
    .header("x-remote-user", "system:admin")
    .header("x-remote-group", "system:masters")
    .header("content-type", "application/json")
    .body(http_body_util::Full::new(bytes::Bytes::from_static(
        br#"{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}"#,
    )))
    .expect("request");
    let full_client = {
        let mut roots = rustls::RootCertStore::empty();
        use rustls_pki_types::pem::PemObject;
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(env.demo.proxy_ca_pem.as_bytes())
        {
            roots.add(c.expect("pem")).expect("add");
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let conn = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build::<_, http_body_util::Full<bytes::Bytes>>(conn)
    };
    let resp = full_client.request(req).await.expect("whoami");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(
        v["status"]["userInfo"]["username"], "system:serviceaccount:demo:viewer",
        "{v}"
    );

    // An RBAC-denied request stays denied.
    let url = format!("{}/api/v1/namespaces/demo/secrets", env.proxy_url());
    let resp = client
        .request(spoof(get(&url, &token)))
        .await
        .expect("response");
    assert_eq!(resp.status(), 403);
    // And what it may do still works.
    let url = format!("{}/api/v1/namespaces/demo/pods", env.proxy_url());
    let resp = client
        .request(spoof(get(&url, &token)))
        .await
        .expect("response");
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_review_serves_a_thousand_concurrent_requests() {
    let env = demo_env().await;
    // No local SA keys: every token goes to TokenReview, made with the
    // proxy's own (admin) certificate.
    let proxy = proxy_in_mode(&env, AuthMode::Passthrough, false).await;
    let token = env
        .demo
        .sim
        .issue_token("demo", "default", Duration::from_secs(3600));
    let before = env.demo.sim.request_count("POST", "tokenreviews");
    let client = https_client(&env.demo.proxy_ca_pem, true);
    let url = format!("https://{}/version", proxy.addr());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let (client, url, token) = (client.clone(), url.clone(), token.clone());
        tasks.spawn(async move {
            let resp = client.request(get(&url, &token)).await.expect("response");
            resp.status().as_u16()
        });
    }
    while let Some(code) = tasks.join_next().await {
        assert_eq!(code.expect("task"), 200);
    }
    let after = env.demo.sim.request_count("POST", "tokenreviews");
    assert_eq!(
        after - before,
        1,
        "one TokenReview for 1,000 concurrent requests"
    );
    // Within the TTL, the cache answers.
    let (code, _) = status_of(&client, &url, &token).await;
    assert_eq!(code, 200);
    assert_eq!(
        env.demo.sim.request_count("POST", "tokenreviews") - before,
        1
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_random_tokens_is_not_a_token_review_flood() {
    use std::num::{NonZeroU32, NonZeroUsize};
    let env = demo_env().await;
    let (concurrent, rate, burst) = (4, 10, 10);
    // No local SA keys: every token goes to TokenReview.
    let proxy = start_with_auth(
        &env,
        AuthMode::Passthrough,
        AuthConfig {
            review_max_concurrent: NonZeroUsize::new(concurrent).expect("non-zero"),
            review_rate: NonZeroU32::new(rate).expect("non-zero"),
            review_burst: NonZeroU32::new(burst).expect("non-zero"),
            ..AuthConfig::default()
        },
    )
    .await;
    let before = env.demo.sim.request_count("POST", "tokenreviews");
    let client = https_client(&env.demo.proxy_ca_pem, true);
    let url = format!("https://{}/version", proxy.addr());
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..500 {
        let (client, url) = (client.clone(), url.clone());
        tasks.spawn(async move {
            let token = format!("random-{i}-{}", rand::random::<u64>());
            let sent = std::time::Instant::now();
            let resp = client.request(get(&url, &token)).await.expect("response");
            let retry_after = resp
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            let code = resp.status().as_u16();
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            let status: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            (code, retry_after, status, sent.elapsed())
        });
    }
    let (mut refused, mut unauthorized) = (0, 0);
    while let Some(done) = tasks.join_next().await {
        let (code, retry_after, status, took) = done.expect("task");
        match code {
            401 => unauthorized += 1,
            429 => {
                refused += 1;
                assert_eq!(status["reason"], "TooManyRequests", "{status}");
                assert!(retry_after.is_some_and(|s| s >= 1), "{retry_after:?}");
                // Refused at once, not queued behind the reviews.
                assert!(took < Duration::from_secs(5), "a 429 took {took:?}");
            }
            other => panic!("random token answered {other}: {status}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let reviews = env.demo.sim.request_count("POST", "tokenreviews") - before;
    let bound = burst as f64 + rate as f64 * elapsed;
    assert!(
        (reviews as f64) <= bound,
        "{reviews} TokenReviews in {elapsed:.2}s: more than {bound}"
    );
    assert_eq!(unauthorized as u64, reviews, "each review said no");
    assert_eq!(refused + unauthorized, 500);
    assert!(refused >= 500 - bound as usize, "{refused} refused");
    let metrics = scrape(proxy.admin_addr()).await;
    assert!(
        counter_sum(&metrics, "breakwater_token_reviews_refused_total", &[]) >= refused as f64,
        "{metrics}"
    );
    assert!(!metrics.contains("random-"), "metrics carry no tokens");

    // A real token works once the bucket has refilled: wait as long as the
    // proxy's Retry-After says, a bounded number of times.
    let token = env
        .demo
        .sim
        .issue_token("demo", "default", Duration::from_secs(3600));
    let mut code = 0;
    for _ in 0..10 {
        let resp = client.request(get(&url, &token)).await.expect("response");
        code = resp.status().as_u16();
        if code != 429 {
            break;
        }
        let wait = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .expect("Retry-After on a 429");
        tokio::time::sleep(Duration::from_secs(wait)).await;
    }
    assert_eq!(code, 200, "a valid token authenticates after the flood");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_serving_certificate_is_used_by_new_connections_while_a_watch_stays_up() {
    let env = demo_env().await;
    // The proxy's cert files live in their own directory, as a mounted Secret would.
    let certs = tempfile::tempdir().expect("tempdir");
    let old_ca = Ca::new("old-ca").expect("ca");
    let new_ca = Ca::new("new-ca").expect("ca");
    let write = |ca: &Ca| {
        let pair = ca.issue_server(&["localhost", "127.0.0.1"]).expect("cert");
        std::fs::write(certs.path().join("tls.key.tmp"), &pair.key_pem).expect("key");
        std::fs::write(certs.path().join("tls.crt.tmp"), &pair.cert_pem).expect("cert");
        std::fs::rename(
            certs.path().join("tls.key.tmp"),
            certs.path().join("tls.key"),
        )
        .expect("mv");
        std::fs::rename(
            certs.path().join("tls.crt.tmp"),
            certs.path().join("tls.crt"),
        )
        .expect("mv");
    };
    write(&old_ca);
    let mut cfg = common::passthrough_config(&env, env.demo.sim.url(), Duration::from_secs(1));
    cfg.tls_cert = certs.path().join("tls.crt");
    cfg.tls_key = certs.path().join("tls.key");
    let proxy = breakwater::server::start(cfg).await.expect("start");
    let base = format!("https://{}", proxy.addr());
    let token = &env.demo.token;

    let old_client = https_client(old_ca.cert_pem(), false);
    let watch = old_client
        .request(get(
            &format!("{base}/api/v1/namespaces/default/configmaps?watch=1"),
            token,
        ))
        .await
        .expect("watch");
    assert_eq!(watch.status(), 200);
    let mut lines = Lines::new(watch.into_body());

    write(&new_ca);
    // New connections see the new certificate once the reload has run.
    let mut ok = false;
    for _ in 0..100 {
        let fresh = https_client(new_ca.cert_pem(), false);
        if let Ok(resp) = fresh.request(get(&format!("{base}/version"), token)).await {
            ok = resp.status() == 200;
            if ok {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ok,
        "a client trusting only the new CA connects after rotation"
    );

    // The watch opened before the rotation still delivers.
    let cm = breakwater_loadtest::sim::resources::find("", "v1", "configmaps").expect("type");
    env.demo
        .sim
        .store()
        .create(
            cm,
            Some("default"),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "after-rotation"}}),
        )
        .expect("create");
    loop {
        let line = lines
            .next_within(Duration::from_secs(10))
            .await
            .expect("the old watch is still open");
        if line.contains("after-rotation") {
            break;
        }
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_impersonation_passes_through_front_proxy_and_is_refused_in_impersonate_mode() {
    let env = demo_env().await;
    // Front-proxy mode (the demo): kubectl --as reaches the apiserver, which
    // authorizes the admin's impersonation.
    let out = env
        .kubectl_ok(&[
            "--as",
            "system:serviceaccount:demo:viewer",
            "auth",
            "whoami",
            "-o",
            "json",
        ])
        .await;
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        v["status"]["userInfo"]["username"], "system:serviceaccount:demo:viewer",
        "{v}"
    );

    // Impersonate mode: the proxy already impersonates; a client's own
    // Impersonate-* headers cannot combine with that.
    let proxy = proxy_in_mode(&env, AuthMode::Impersonate, true).await;
    let client = https_client(&env.demo.proxy_ca_pem, false);
    let mut req = get(
        &format!("https://{}/api/v1/namespaces/demo/pods", proxy.addr()),
        &env.demo.token,
    );
    req.headers_mut().insert(
        "impersonate-user",
        "system:serviceaccount:demo:viewer".parse().expect("hv"),
    );
    let resp = client.request(req).await.expect("response");
    assert_eq!(resp.status(), 403);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let v: Value = serde_json::from_slice(&body).expect("Status");
    assert_eq!(v["reason"], "Forbidden");
    let msg = v["message"].as_str().expect("message");
    assert!(
        msg.contains("Impersonate-* headers cannot be used through this proxy"),
        "{msg}"
    );
    proxy.shutdown().await;
}

/// A request without any credentials: status code and Status body.
async fn anonymous_get(client: &common::HttpsClient, url: &str) -> (u16, Value) {
    let req = http::Request::get(url).body(Empty::new()).expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("answered in time")
        .expect("response");
    let code = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (code, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_credentials_meets_the_apiservers_own_anonymous_policy_in_every_mode() {
    let env = demo_env().await;
    let client = https_client(&env.demo.proxy_ca_pem, true);
    let sim_ca = std::fs::read_to_string(env.dir.path().join("kube-sim-ca.crt")).expect("ca");
    let direct = https_client(&sim_ca, true);
    let paths = [
        "/api/v1/namespaces",
        // A watch: the hub never serves a caller nobody verified.
        "/api/v1/namespaces/default/pods?watch=true&timeoutSeconds=1",
        "/version",
    ];
    for mode in [
        AuthMode::Passthrough,
        AuthMode::FrontProxy,
        AuthMode::Impersonate,
        AuthMode::Auto,
    ] {
        let proxy = proxy_in_mode(&env, mode, true).await;
        let base = format!("https://{}", proxy.addr());
        for sim_anonymous in [true, false] {
            env.demo.sim.set_anonymous_auth(sim_anonymous);
            for pq in paths {
                // Through the proxy, the answer is the one the apiserver
                // gives a client that came directly without credentials.
                let (code, status) = anonymous_get(&client, &format!("{base}{pq}")).await;
                let (want, want_status) =
                    anonymous_get(&direct, &format!("{}{pq}", env.demo.sim.url())).await;
                let ctx = format!("{mode:?}, kube-sim --anonymous-auth={sim_anonymous}, {pq}");
                assert_eq!(code, want, "{ctx}: {status}");
                match (sim_anonymous, pq) {
                    (false, _) => assert_eq!(code, 401, "{ctx}"),
                    (true, "/version") => assert_eq!(code, 200, "{ctx}"),
                    (true, _) => {
                        assert_eq!(code, 403, "{ctx}");
                        let msg = status["message"].as_str().unwrap_or_default();
                        assert!(msg.contains("User \"system:anonymous\""), "{ctx}: {msg}");
                    }
                }
                if code != 200 {
                    assert_eq!(status["reason"], want_status["reason"], "{ctx}");
                    assert_eq!(status["message"], want_status["message"], "{ctx}");
                }
            }
        }
        proxy.shutdown().await;
    }
    env.demo.sim.set_anonymous_auth(true);

    // Breakwater's own --anonymous-auth=false answers 401 itself, although
    // the apiserver would have let the request in as system:anonymous.
    let proxy = proxy_with(&env, AuthMode::FrontProxy, true, false).await;
    let (code, status) = anonymous_get(&client, &format!("https://{}/version", proxy.addr())).await;
    assert_eq!(code, 401, "{status}");
    assert_eq!(status["reason"], "Unauthorized");
    proxy.shutdown().await;
}

/// Authenticated requests kube-sim saw from `user`, by any path.
fn authenticated(sim: &breakwater_loadtest::sim::KubeSim, user: &str) -> u64 {
    sim.auth_paths(user).values().sum()
}

/// Adds a 429 block of `user` through the admin API.
async fn block(admin: std::net::SocketAddr, user: &str) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::post(format!("http://{admin}/admin/v1/blocks"))
        .body(http_body_util::Full::new(bytes::Bytes::from(
            json!({"target": {"kind": "identity", "user": user}}).to_string(),
        )))
        .expect("request");
    let resp = client.request(req).await.expect("admin answers");
    assert_eq!(resp.status(), 201);
}

/// Apiservers before 1.28 serve SelfSubjectReview at v1beta1 (1.27) or
/// v1alpha1 (1.26), or not at all (1.24, 1.25; KUBE-SEMANTICS.md). A
/// passthrough proxy with no credentials of its own and no local keys
/// asks "who am I" as kubectl does: v1, then the older versions, and
/// keeps asking at the one that answered, so the caller is identified
/// (a block on its name applies). With none served, a ServiceAccount token
/// is checked against the apiserver's published keys (`/openid/v1/jwks`,
/// read with the token, and the issuer's document once): identified, a
/// block on its name applies, and for a minute no SelfSubjectReview is
/// tried again, so a token flood does not turn into three 404s per token.
/// Legacy Secret tokens likewise. A token the apiserver refuses there is a
/// 401; one that is no ServiceAccount token is a 503 Status (it may well be
/// good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_without_credentials_asks_who_am_i_at_the_version_the_apiserver_serves() {
    use breakwater_loadtest::sim::{KubeSim, SelfSubjectReviewVersion as Ssr, SimPki};
    let env = demo_env().await;
    let client = https_client(&env.demo.proxy_ca_pem, true);
    for served in [Ssr::V1beta1, Ssr::V1alpha1, Ssr::Absent] {
        let pki = SimPki::generate(&["127.0.0.1", "localhost"]).expect("pki");
        let sim = KubeSim::start(
            SimConfig {
                self_subject_review: served,
                ..SimConfig::default()
            },
            pki,
        )
        .await
        .expect("kube-sim starts");
        let ca = env.dir.path().join(format!("sim-{served:?}-ca.crt"));
        std::fs::write(&ca, sim.pki().serving_ca.cert_pem()).expect("write ca");
        let mut cfg = common::passthrough_config(&env, sim.url(), Duration::from_secs(1));
        cfg.upstream.tls.ca = Some(ca);
        // No local keys: every token is asked about upstream.
        cfg.auth = AuthConfig::default();
        let proxy = breakwater::server::start(cfg).await.expect("proxy starts");
        let url = format!("https://{}/version", proxy.addr());

        let first = sim.issue_token("demo", "first", Duration::from_secs(600));
        let second = sim.issue_token("demo", "second", Duration::from_secs(600));
        let (code, status) = status_of(&client, &url, &first).await;
        if served == Ssr::Absent {
            assert_eq!(code, 200, "{status}");
            // v1, v1beta1, v1alpha1 (404 each), the key set, the issuer's
            // document, then the GET.
            assert_eq!(authenticated(&sim, "system:serviceaccount:demo:first"), 6);
            // Another token, at once: no SelfSubjectReview; the key set,
            // unchanged (so no issuer document), then the GET.
            let (code, _) = status_of(&client, &url, &second).await;
            assert_eq!(code, 200);
            assert_eq!(authenticated(&sim, "system:serviceaccount:demo:second"), 2);
            block(proxy.admin_addr(), "system:serviceaccount:demo:second").await;
            let (code, status) = status_of(&client, &url, &second).await;
            assert_eq!(code, 429, "{status}");
            let (code, _) = status_of(&client, &url, &first).await;
            assert_eq!(code, 200, "only the blocked name");
            // Its signature spoiled: the apiserver refuses it, so do we.
            let third = sim.issue_token("demo", "third", Duration::from_secs(600));
            let (head, signature) = third.rsplit_once('.').expect("a JWT");
            let flipped = if signature.starts_with('A') { 'B' } else { 'A' };
            let forged = format!("{head}.{flipped}{}", &signature[1..]);
            let (code, status) = status_of(&client, &url, &forged).await;
            assert_eq!(code, 401, "{status}");
            // A legacy Secret token (no expiry, no audience): the apiserver
            // accepts it, so it is identified too, and a block on its name
            // holds; once its Secret is gone, it is a 401.
            let legacy = sim.issue_legacy_token("demo", "ci");
            let (code, status) = status_of(&client, &url, &legacy).await;
            assert_eq!(code, 200, "{status}");
            block(proxy.admin_addr(), "system:serviceaccount:demo:ci").await;
            let (code, _) = status_of(&client, &url, &legacy).await;
            assert_eq!(code, 429, "a legacy token's name is known");
            let gone = sim.issue_legacy_token("demo", "ci-old");
            sim.revoke_legacy_token(&gone);
            let (code, status) = status_of(&client, &url, &gone).await;
            assert_eq!(code, 401, "{status}");
            // Not a ServiceAccount token: nothing can say who it is.
            let (code, status) = status_of(&client, &url, "an-opaque-token").await;
            assert_eq!(code, 503, "{status}");
            assert_eq!(status["kind"], "Status", "{status}");
            assert_eq!(
                status["message"], "the server is currently unable to authenticate the request",
                "{status}"
            );
        } else {
            assert_eq!(code, 200, "{served:?}: {status}");
            // v1 (404), v1beta1 (201, or 404 before v1alpha1), then the GET.
            let asked = if served == Ssr::V1beta1 { 2 } else { 3 };
            assert_eq!(
                authenticated(&sim, "system:serviceaccount:demo:first"),
                asked + 1,
                "{served:?}"
            );
            let (code, _) = status_of(&client, &url, &second).await;
            assert_eq!(code, 200);
            // The version found is asked first: one review, one GET.
            assert_eq!(
                authenticated(&sim, "system:serviceaccount:demo:second"),
                2,
                "{served:?}"
            );
            // The proxy knows who the caller is: a block on the name holds.
            block(proxy.admin_addr(), "system:serviceaccount:demo:second").await;
            let (code, status) = status_of(&client, &url, &second).await;
            assert_eq!(code, 429, "{served:?}: {status}");
            let (code, _) = status_of(&client, &url, &first).await;
            assert_eq!(code, 200, "{served:?}: only the blocked name");
        }
        proxy.shutdown().await;
        sim.shutdown().await;
    }
}
