//! Identity resolution per request: what authentication adds to each
//! request on the proxy's hot path.
//!
//! - `cert`: a client-certificate identity (the TLS layer already made it,
//!   per connection) — the floor.
//! - `token_review_cached`: an opaque token TokenReview already answered:
//!   SHA-256 of the token plus a cache hit.
//! - `sa_jwt_cached`: a ServiceAccount JWT verified before: the same.
//! - `sa_jwt_verify_es256` / `_rs256`: a ServiceAccount JWT seen for the
//!   first time: parse, signature check, claims, cache insert.
//!
//! Cached paths are polled once with `now_or_never` (a hit never waits), so
//! no executor overhead is in the figure; the verify paths run on a
//! current-thread runtime.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use breakwater::identity::{AuthConfig, Authenticator, Identity, ReviewFuture, TokenReviewer};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use futures_util::FutureExt as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

struct Yes;

impl TokenReviewer for Yes {
    fn review<'a>(&'a self, _token: &'a str) -> ReviewFuture<'a> {
        Box::pin(async {
            Ok(Some(Identity {
                username: "alice@example.com".into(),
                uid: "oidc-1".into(),
                groups: vec!["devs".into(), "system:authenticated".into()],
                extra: BTreeMap::new(),
            }))
        })
    }
}

fn bearer(token: &str) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
    );
    headers
}

fn claims(jti: u64) -> serde_json::Value {
    let now = jsonwebtoken::get_current_timestamp();
    serde_json::json!({
        "aud": [ISSUER],
        "exp": now + 3600,
        "iat": now,
        "nbf": now,
        "iss": ISSUER,
        "jti": format!("jti-{jti}"),
        "kubernetes.io": {
            "namespace": "default",
            "serviceaccount": {"name": "agent", "uid": "e23903d9-e39b-48ed-b337-5168db17454d"},
            "pod": {"name": "agent-x7", "uid": "2d0f4c1e-6a5b-4c3d-8e7f-1a2b3c4d5e6f"},
            "node": {"name": "node-7", "uid": "9a8b7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d"}
        },
        "sub": "system:serviceaccount:default:agent"
    })
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ec = rcgen::KeyPair::generate().expect("p256");
    let ec_key = EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).expect("ec");
    let rsa_key = EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).expect("rsa");
    let keys = dir.path().join("sa.pub");
    std::fs::write(&keys, format!("{}{RSA_PUBLIC_PEM}", ec.public_key_pem())).expect("write");
    let cfg = AuthConfig {
        service_account_key_files: vec![keys],
        service_account_issuers: vec![ISSUER.into()],
        ..AuthConfig::default()
    };
    let reviewer: Arc<dyn TokenReviewer> = Arc::new(Yes);
    let auth = Authenticator::new(cfg, Some(reviewer)).expect("authenticator");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let jti = AtomicU64::new(0);
    let sign = |alg: Algorithm, key: &EncodingKey| {
        let claims = claims(jti.fetch_add(1, Ordering::Relaxed));
        jsonwebtoken::encode(&Header::new(alg), &claims, key).expect("sign")
    };

    let mut group = c.benchmark_group("identity");

    let cert = Arc::new(Identity {
        username: "system:node:node-7".into(),
        uid: String::new(),
        groups: vec!["system:nodes".into(), "system:authenticated".into()],
        extra: BTreeMap::new(),
    });
    let none = http::HeaderMap::new();
    group.bench_function("cert", |b| {
        b.iter(|| {
            auth.authenticate(Some(&cert), black_box(&none))
                .now_or_never()
                .expect("ready")
                .expect("ok")
        })
    });

    // A typical OIDC-sized opaque token.
    let opaque = bearer(&"x".repeat(900));
    rt.block_on(auth.authenticate(None, &opaque)).expect("warm");
    group.bench_function("token_review_cached", |b| {
        b.iter(|| {
            auth.authenticate(None, black_box(&opaque))
                .now_or_never()
                .expect("a cache hit never waits")
                .expect("ok")
        })
    });

    let sa = bearer(&sign(Algorithm::ES256, &ec_key));
    rt.block_on(auth.authenticate(None, &sa)).expect("warm");
    group.bench_function("sa_jwt_cached", |b| {
        b.iter(|| {
            auth.authenticate(None, black_box(&sa))
                .now_or_never()
                .expect("a cache hit never waits")
                .expect("ok")
        })
    });

    group.bench_function("sa_jwt_verify_es256", |b| {
        b.iter_batched(
            || bearer(&sign(Algorithm::ES256, &ec_key)),
            |h| rt.block_on(auth.authenticate(None, &h)).expect("ok"),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("sa_jwt_verify_rs256", |b| {
        b.iter_batched(
            || bearer(&sign(Algorithm::RS256, &rsa_key)),
            |h| rt.block_on(auth.authenticate(None, &h)).expect("ok"),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

// A test-only RSA key (rcgen cannot make RSA keys with ring).
const RSA_PRIVATE_PEM: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC4FEjQluxqTVbi\n\
PNdmExcRepiFrkGq6FosfzU4oO9vfE3R7ZriYF+/ZMmUlWLfWebQWw92GspYxm9P\n\
vSjDEzA8F/0sss4GVB44E/Noqv4rNgLOQTvud0ShFfg+tY4pXy/9YiTPuhBMPn0W\n\
tcM1mjHp3CJ2PyApqfiibbaWy+5FUkyIQ9ms4CRuXlWTOOOSYN+XxnfbSAHijMXj\n\
Z+eaRb+u+aVUUVDo+H7Wr9ltFQrNPiAd8nP0ewYs3ZtRelu/pJkZ1BJBIQ1olB3R\n\
dypCIcxIO86EBw2VhEkcl/7kgi6071alY+BAhgpYgTsaFSKILrGpGAqZLF/R7s64\n\
r/oYr2FlAgMBAAECggEAVXRVOUBXECJHK0/DTwedteeL1sNGiOjEs9N6CYfsn3y9\n\
Q69iL6U9zcQkMG4JMFaz6BXd354gQYYdNo9B1Q2bXspkJdP8AMQcIzxfyz9WLwkr\n\
1EREZjfIDF/+ll4CWQJvbNma7TQbTMnVmC1ZKhEjCsW+2dYEQFM/sWftU6PoQRVh\n\
MDphyc/Z43tZ8BFW1UTjFWRkCNrYS4CtID5+iRwNXyrU8wYqXOQkPYg5iPIOaQ2H\n\
Knc9PGbnqmFdKgkz9DxTWE865lwhBPZoCDmb0bTlawdm20NOAzePVfYJ2pik3ovb\n\
2GaGdhjGzYhd1ohJipgfT7Bi7c4aJtPGqpUsuSGUIQKBgQDue9cjq+hIDQYVWSq9\n\
YeL+G64i00pcwvAzP7tSNcflyvje0OxXaGvyCExbyjjGl1XclJBFle/NruemT7kz\n\
GI7hO7Ho/5JaFq8J6WMOecvvdlQKUeJsADXcb7OI02XfWsHvphbQFATJbzVP2urL\n\
J3xEaZbJcdX0W76ClhRisuxMGwKBgQDFmXzIRztHld+1/+9Cvii5WH1cQdL1G6HA\n\
NDymBdMVxi4+9VU+rTEPHU/XsbT1sd5vFvYCC5OZ0bE7Y9i8bmcsWfjNdVS/SvdY\n\
ce0qkGPwV42MTUDCG+PXy3nEnlEoLnvN9CyPOeg0Z6eBtKV12Oh3AqeI7U2aEdbK\n\
B1ARynrgfwKBgEUrJfryoSxEmr8WXY8QFQYegSMYpTjCUWiL04jEkHXVqNj3P5Ua\n\
dDR+s6brwAvZWM3hSPblxeeiEw3pkY2AUfCBn9g0R/5ZFeuKBXDtYnjRmQ5lMYah\n\
iP2maCwHJETjzdv0ECnJpJnH526B0BecHC67cUB8A9IbyeWWIdN+kYqBAoGAX2Kc\n\
TcG05/V9LEoDoWBSIEaLHUHZJ+DS0AlnTW16XARyxol/QOYxzG4F4MUz6XaXPWEE\n\
GDCma5ZBy72DHlLdExfLdsKwyjbR96vnJKjW1WouNhAEtq7n6X+bpEIYQyFNOjoo\n\
WGtHoCR5Q6+EP8MZVHm/jeWflEQQPy4QhMYNUtkCgYEAms0g5E23p+SYYXLqpgiZ\n\
aIutQBg7UJT2f1Z49s+u4xLEv50+mVSYBZVaRp4w0Vs90l4yxfIf0+IwNh4ngqWA\n\
46y3WXl5Fik+NkwF/VurqZPvTm0jvNEKMTF73KrMA+oFuNhVG2o8mBn1CoAo+wYv\n\
qscZKi3AGDvsZOzCWBNm3l0=\n\
-----END PRIVATE KEY-----\n\
";
const RSA_PUBLIC_PEM: &str = "\
-----BEGIN PUBLIC KEY-----\n\
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAuBRI0Jbsak1W4jzXZhMX\n\
EXqYha5BquhaLH81OKDvb3xN0e2a4mBfv2TJlJVi31nm0FsPdhrKWMZvT70owxMw\n\
PBf9LLLOBlQeOBPzaKr+KzYCzkE77ndEoRX4PrWOKV8v/WIkz7oQTD59FrXDNZox\n\
6dwidj8gKan4om22lsvuRVJMiEPZrOAkbl5VkzjjkmDfl8Z320gB4ozF42fnmkW/\n\
rvmlVFFQ6Ph+1q/ZbRUKzT4gHfJz9HsGLN2bUXpbv6SZGdQSQSENaJQd0XcqQiHM\n\
SDvOhAcNlYRJHJf+5IIutO9WpWPgQIYKWIE7GhUiiC6xqRgKmSxf0e7OuK/6GK9h\n\
ZQIDAQAB\n\
-----END PUBLIC KEY-----\n\
";
