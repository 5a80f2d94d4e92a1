//! Tests for identity resolution: the shared fixtures and helpers, client
//! certificates and the header rules here; local ServiceAccount JWT
//! verification in `tests/service_accounts.rs`, the TokenReview cache in
//! `tests/review_cache.rs`, its caps in `tests/review_caps.rs`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls_pki_types::CertificateDer;
use serde_json::json;
use tokio::sync::Notify;

use super::*;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

// Test-only keys and certificates, made once with openssl (rcgen cannot make
// RSA keys with ring, nor a subject with several O or a UID attribute).
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
const RSA_CERT_PEM: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIDCzCCAfOgAwIBAgIULb0tlS47MXSVDRD7aeolyQ0lF+YwDQYJKoZIhvcNAQEL\n\
BQAwFDESMBAGA1UEAwwJc2Etc2lnbmVyMCAXDTI2MTEyNjA4Mzk0NFoYDzIxMjYx\n\
MTAyMDgzOTQ0WjAUMRIwEAYDVQQDDAlzYS1zaWduZXIwggEiMA0GCSqGSIb3DQEB\n\
AQUAA4IBDwAwggEKAoIBAQC4FEjQluxqTVbiPNdmExcRepiFrkGq6FosfzU4oO9v\n\
fE3R7ZriYF+/ZMmUlWLfWebQWw92GspYxm9PvSjDEzA8F/0sss4GVB44E/Noqv4r\n\
NgLOQTvud0ShFfg+tY4pXy/9YiTPuhBMPn0WtcM1mjHp3CJ2PyApqfiibbaWy+5F\n\
UkyIQ9ms4CRuXlWTOOOSYN+XxnfbSAHijMXjZ+eaRb+u+aVUUVDo+H7Wr9ltFQrN\n\
PiAd8nP0ewYs3ZtRelu/pJkZ1BJBIQ1olB3RdypCIcxIO86EBw2VhEkcl/7kgi60\n\
71alY+BAhgpYgTsaFSKILrGpGAqZLF/R7s64r/oYr2FlAgMBAAGjUzBRMB0GA1Ud\n\
DgQWBBT2YLekkvXEyYEQgJN7+2InYf9wJjAfBgNVHSMEGDAWgBT2YLekkvXEyYEQ\n\
gJN7+2InYf9wJjAPBgNVHRMBAf8EBTADAQH/MA0GCSqGSIb3DQEBCwUAA4IBAQBI\n\
WrlyMKMOTpH5uLhVLvt/xuNJHQB5EoNAvjk6cUVsB0LY9TePgwKnOEa4cvlUXDlM\n\
PzqzoCkD1ixWD4RhLkhJoVyAOuZ077TmU/mxHpijcv+LwYJYcKNKR1rvYaqvttGD\n\
8PAKtajHEL0/HMQxlCbFgdtjb7IqBhL2Bi/meMFgLbzKtUwKnjli4yOvdHHxXbAm\n\
plyeQvBW1fGGub5KGVyVEdUP9cDQxRhoNOuN9dA4dOByClIArvVcpipv2nU3uFz/\n\
ID1wf11FaUixwgQDzAWrfNqFMOC2VTa8rbpF7887CevSQt04ayYozyjc9dZ6mxMk\n\
Qw52QPAtzAGQ0HPm5u7E\n\
-----END CERTIFICATE-----\n\
";
/// Subject O=system:masters, O=team-a, CN=alice, UID(1.3.6.1.4.1.14677.1.1.1)=u-123.
const MULTI_O_CERT_PEM: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIBoDCCAUUCFFcIcbvbq/5GJ865oSb77RVsXx79MAoGCCqGSM49BAMCMFExFzAV\n\
BgNVBAoMDnN5c3RlbTptYXN0ZXJzMQ8wDQYDVQQKDAZ0ZWFtLWExDjAMBgNVBAMM\n\
BWFsaWNlMRUwEwYKKwYBBAHyVQEBAQwFdS0xMjMwIBcNMjYxMTI2MDgzOTQ3WhgP\n\
MjEyNjExMDIwODM5NDdaMFExFzAVBgNVBAoMDnN5c3RlbTptYXN0ZXJzMQ8wDQYD\n\
VQQKDAZ0ZWFtLWExDjAMBgNVBAMMBWFsaWNlMRUwEwYKKwYBBAHyVQEBAQwFdS0x\n\
MjMwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAARWmjIdrCsfxuYlaFD5U3dcYCJS\n\
tfIvSjShX9RW/EarYDKkGWrEBs6O+VOcgUWToU57hOZfRvTc7z6Ohp7bWIzhMAoG\n\
CCqGSM49BAMCA0kAMEYCIQCsZ9w4JoHkhOoxXj580HhmMwPCCuSrbwzFYL2BFqP/\n\
2QIhALk5TnIpEThTo3v+Am5xM4dP5aVnn+yWY3ljFMXyBkko\n\
-----END CERTIFICATE-----\n\
";
/// Subject O=team-a only: no CN.
const NO_CN_CERT_PEM: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIBeTCCAR+gAwIBAgIUIXId/5WyjXeg/GpaFA3o3+ZEqQIwCgYIKoZIzj0EAwIw\n\
ETEPMA0GA1UECgwGdGVhbS1hMCAXDTI2MTEyNjA4Mzk0NFoYDzIxMjYxMTAyMDgz\n\
OTQ0WjARMQ8wDQYDVQQKDAZ0ZWFtLWEwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNC\n\
AASZSj+M9TvMhKwoTukIagOjcwkfwCEM+ByU6m6DwDVByURj6n/rwsfpSfD4HUt4\n\
0sBLj2KRGV/xoUTfy79mAd5po1MwUTAdBgNVHQ4EFgQU7sniIqye1MjHGQFqV1gU\n\
3yDmVYUwHwYDVR0jBBgwFoAU7sniIqye1MjHGQFqV1gU3yDmVYUwDwYDVR0TAQH/\n\
BAUwAwEB/zAKBggqhkjOPQQDAgNIADBFAiEAoPs0wPfF5lAG8aP1Q4OD+FCqFF9Q\n\
cJ/5rbeVX7G4QYYCIHlZZIoUbhIeyrL0LTxbY/3I0weoNh6WSK8D+o+GZUwE\n\
-----END CERTIFICATE-----\n\
";

/// A signing key for test tokens.
struct Signer {
    key: EncodingKey,
    alg: Algorithm,
    kid: Option<String>,
}

impl Signer {
    fn ec() -> (Signer, String) {
        let pair = rcgen::KeyPair::generate().expect("p256 key");
        let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).expect("ec pem");
        (
            Signer {
                key,
                alg: Algorithm::ES256,
                kid: None,
            },
            pair.public_key_pem(),
        )
    }

    fn ec384() -> (Signer, String) {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("p384");
        let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).expect("ec pem");
        (
            Signer {
                key,
                alg: Algorithm::ES384,
                kid: None,
            },
            pair.public_key_pem(),
        )
    }

    fn rsa(alg: Algorithm) -> Signer {
        Signer {
            key: EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).expect("rsa pem"),
            alg,
            kid: None,
        }
    }

    fn sign(&self, claims: &serde_json::Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = self.kid.clone();
        jsonwebtoken::encode(&header, claims, &self.key).expect("sign")
    }
}

fn now() -> i64 {
    jwt::now() as i64
}

/// Claims shaped like the recorded `kubectl create token` claims
/// (fixtures/apiserver-v1.24/serviceaccount-token-claims.json), with times
/// around now.
fn fixture_claims() -> serde_json::Value {
    let now = now();
    json!({
        "aud": [ISSUER],
        "exp": now + 3600,
        "iat": now,
        "iss": ISSUER,
        "kubernetes.io": {
            "namespace": "fixtures",
            "serviceaccount": {"name": "limited", "uid": "e23903d9-e39b-48ed-b337-5168db17454d"}
        },
        "nbf": now,
        "sub": "system:serviceaccount:fixtures:limited"
    })
}

/// The user the apiserver's TokenReview gave for that token
/// (fixtures/apiserver-v1.24/tokenreview.body).
fn fixture_identity() -> Identity {
    Identity {
        username: "system:serviceaccount:fixtures:limited".into(),
        uid: "e23903d9-e39b-48ed-b337-5168db17454d".into(),
        groups: vec![
            "system:serviceaccounts".into(),
            "system:serviceaccounts:fixtures".into(),
            "system:authenticated".into(),
        ],
        extra: BTreeMap::new(),
    }
}

/// A pod-bound token as a 1.32 apiserver issues it: pod, node and jti.
fn pod_claims() -> serde_json::Value {
    let mut c = fixture_claims();
    c["jti"] = json!("4f7d1a5e-0c1b-4f55-9d4c-2b3c9b0e8a11");
    c["kubernetes.io"]["pod"] = json!({"name": "agent-x7", "uid": "pod-uid-1"});
    c["kubernetes.io"]["node"] = json!({"name": "node-7", "uid": "node-uid-7"});
    c
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).expect("write key file");
    path
}

fn sa_config(files: Vec<PathBuf>) -> AuthConfig {
    AuthConfig {
        service_account_key_files: files,
        service_account_issuers: vec![ISSUER.into()],
        ..AuthConfig::default()
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

fn cert_der(pem: &str) -> CertificateDer<'static> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
    CertificateDer::from(pem.contents)
}

/// A TokenReviewer that counts calls, answers as told, and can be held
/// until released so that callers really overlap.
struct FakeReviewer {
    calls: AtomicUsize,
    started: Notify,
    gate: Option<Notify>,
    answer: Mutex<Result<Option<Identity>, ReviewError>>,
}

impl FakeReviewer {
    fn new(answer: Result<Option<Identity>, ReviewError>, gated: bool) -> Arc<FakeReviewer> {
        Arc::new(FakeReviewer {
            calls: AtomicUsize::new(0),
            started: Notify::new(),
            gate: gated.then(Notify::new),
            answer: Mutex::new(answer),
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn set(&self, answer: Result<Option<Identity>, ReviewError>) {
        *self.answer.lock().expect("lock") = answer;
    }
}

impl TokenReviewer for FakeReviewer {
    fn review<'a>(&'a self, _token: &'a str) -> ReviewFuture<'a> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.started.notify_one();
            if let Some(gate) = &self.gate {
                gate.notified().await;
            }
            self.answer.lock().expect("lock").clone()
        })
    }
}

fn alice() -> Identity {
    Identity {
        username: "alice@example.com".into(),
        uid: "oidc-1".into(),
        groups: vec!["devs".into(), "system:authenticated".into()],
        extra: BTreeMap::new(),
    }
}

fn reviewed(cfg: AuthConfig, reviewer: &Arc<FakeReviewer>) -> Authenticator {
    let reviewer: Arc<dyn TokenReviewer> = reviewer.clone();
    Authenticator::new(cfg, Some(reviewer)).expect("authenticator")
}

fn invalid_reason(result: Result<Arc<Identity>, AuthError>) -> String {
    match result {
        Err(AuthError::InvalidToken(reason)) => reason,
        other => panic!("expected InvalidToken, got {other:?}"),
    }
}

mod review_cache;
mod review_caps;
mod service_accounts;

// ---- client certificates ----

#[test]
fn certificate_with_several_organizations_gives_each_as_a_group() {
    let der = cert_der(MULTI_O_CERT_PEM);
    let got = Authenticator::from_certificate(&der).expect("identity");
    let fingerprint = <sha2::Sha256 as sha2::Digest>::digest(der.as_ref());
    let hex: String = fingerprint.iter().map(|b| format!("{b:02x}")).collect();
    let mut extra = BTreeMap::new();
    extra.insert(
        "authentication.kubernetes.io/credential-id".to_string(),
        vec![format!("X509SHA256={hex}")],
    );
    assert_eq!(
        got,
        Identity {
            username: "alice".into(),
            uid: "u-123".into(),
            groups: vec![
                "system:masters".into(),
                "team-a".into(),
                "system:authenticated".into()
            ],
            extra,
        }
    );
}

#[test]
fn rcgen_client_certificate_gives_cn_and_o() {
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::OrganizationName, "system:nodes");
    dn.push(rcgen::DnType::CommonName, "system:node:node-7");
    params.distinguished_name = dn;
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("cert");
    let got = Authenticator::from_certificate(cert.der()).expect("identity");
    assert_eq!(got.username, "system:node:node-7");
    assert_eq!(got.groups, ["system:nodes", "system:authenticated"]);
    assert_eq!(got.uid, "");
    assert_eq!(got.service_account(), None);
}

#[test]
fn certificate_without_common_name_has_no_identity() {
    let err = Authenticator::from_certificate(&cert_der(NO_CN_CERT_PEM)).expect_err("no CN");
    assert!(err.to_string().contains("common name"), "{err}");
    let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
    assert!(Authenticator::from_certificate(&garbage).is_err());
}

#[tokio::test]
async fn certificate_identity_wins_over_a_token() {
    let reviewer = FakeReviewer::new(Ok(Some(alice())), false);
    let auth = reviewed(AuthConfig::default(), &reviewer);
    let cert = Arc::new(Authenticator::from_certificate(&cert_der(MULTI_O_CERT_PEM)).expect("id"));
    let got = auth
        .authenticate(Some(&cert), &bearer("some-other-token"))
        .await
        .expect("cert");
    assert!(Arc::ptr_eq(&got, &cert));
    // Even a Basic header is irrelevant once the certificate spoke.
    let mut basic = http::HeaderMap::new();
    basic.insert(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_static("Basic YTpi"),
    );
    assert!(auth.authenticate(Some(&cert), &basic).await.is_ok());
    assert_eq!(reviewer.calls(), 0);
}

// ---- headers and anonymous ----

#[tokio::test]
async fn no_credentials_is_anonymous_only_when_allowed() {
    let on = Authenticator::new(AuthConfig::default(), None).expect("authenticator");
    let got = on
        .authenticate(None, &http::HeaderMap::new())
        .await
        .expect("anonymous");
    assert_eq!(*got, Identity::anonymous());
    assert!(got.is_anonymous());
    assert_eq!(got.groups, ["system:unauthenticated"]);
    assert_eq!(got.service_account(), None);

    let off = Authenticator::new(
        AuthConfig {
            anonymous: false,
            ..AuthConfig::default()
        },
        None,
    )
    .expect("authenticator");
    let err = off
        .authenticate(None, &http::HeaderMap::new())
        .await
        .expect_err("401");
    assert!(matches!(err, AuthError::NoCredentials));
    assert_eq!(err.status_code(), 401);
}

#[tokio::test]
async fn bad_authorization_headers_are_refused_not_anonymous() {
    let reviewer = FakeReviewer::new(Ok(Some(alice())), false);
    let auth = reviewed(AuthConfig::default(), &reviewer);
    let header = |v: &'static str| {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_static(v),
        );
        h
    };
    let err = auth
        .authenticate(None, &header("Basic YWRtaW46YWRtaW4="))
        .await
        .expect_err("basic");
    assert!(matches!(err, AuthError::Unsupported), "{err:?}");
    assert_eq!(err.status_code(), 401);
    let err = auth
        .authenticate(None, &header("Bearer"))
        .await
        .expect_err("empty");
    assert!(matches!(err, AuthError::InvalidToken(_)), "{err:?}");
    let mut two = bearer("a");
    two.append(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_static("Bearer b"),
    );
    let err = auth
        .authenticate(None, &two)
        .await
        .expect_err("two headers");
    assert!(matches!(err, AuthError::InvalidToken(_)), "{err:?}");
    assert_eq!(reviewer.calls(), 0);
    // The scheme is case-insensitive, as in the apiserver.
    assert_eq!(
        *auth
            .authenticate(None, &header("bearer tok"))
            .await
            .expect("ok"),
        alice()
    );
}

#[test]
fn service_account_splits_only_well_formed_names() {
    let mut id = fixture_identity();
    assert_eq!(id.service_account(), Some(("fixtures", "limited")));
    for bad in [
        "system:serviceaccount:ns",
        "system:serviceaccount::name",
        "system:serviceaccount:ns:",
        "system:serviceaccount:a:b:c",
        "alice",
    ] {
        id.username = bad.into();
        assert_eq!(id.service_account(), None, "{bad}");
    }
}
