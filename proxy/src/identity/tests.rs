//! Tests for identity resolution: certificates, local ServiceAccount JWT
//! verification, the TokenReview cache, and the header rules.

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

// ---- ServiceAccount JWTs ----

#[tokio::test]
async fn fixture_shaped_token_gives_the_tokenreview_identity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (signer, public) = Signer::ec();
    let auth = Authenticator::new(sa_config(vec![write(dir.path(), "sa.pub", &public)]), None)
        .expect("authenticator");
    let got = auth
        .authenticate(None, &bearer(&signer.sign(&fixture_claims())))
        .await
        .expect("valid token");
    assert_eq!(*got, fixture_identity());
    assert_eq!(got.service_account(), Some(("fixtures", "limited")));
    assert!(!got.is_anonymous());
}

#[tokio::test]
async fn pod_bound_token_carries_pod_node_and_credential_extra() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (signer, public) = Signer::ec();
    let auth = Authenticator::new(sa_config(vec![write(dir.path(), "sa.pub", &public)]), None)
        .expect("authenticator");
    let got = auth
        .authenticate(None, &bearer(&signer.sign(&pod_claims())))
        .await
        .expect("valid token");
    let mut want = fixture_identity();
    for (k, v) in [
        ("authentication.kubernetes.io/pod-name", "agent-x7"),
        ("authentication.kubernetes.io/pod-uid", "pod-uid-1"),
        ("authentication.kubernetes.io/node-name", "node-7"),
        ("authentication.kubernetes.io/node-uid", "node-uid-7"),
        (
            "authentication.kubernetes.io/credential-id",
            "JTI=4f7d1a5e-0c1b-4f55-9d4c-2b3c9b0e8a11",
        ),
    ] {
        want.extra.insert(k.into(), vec![v.into()]);
    }
    assert_eq!(*got, want);
}

#[tokio::test]
async fn pod_claim_without_uid_adds_no_pod_extra() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (signer, public) = Signer::ec();
    let auth = Authenticator::new(sa_config(vec![write(dir.path(), "sa.pub", &public)]), None)
        .expect("authenticator");
    let mut claims = fixture_claims();
    claims["kubernetes.io"]["pod"] = json!({"name": "agent-x7"});
    let got = auth
        .authenticate(None, &bearer(&signer.sign(&claims)))
        .await
        .expect("valid token");
    assert!(got.extra.is_empty(), "{:?}", got.extra);
}

#[tokio::test]
async fn rsa_tokens_verify_with_public_key_and_certificate_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, content) in [("rsa.pub", RSA_PUBLIC_PEM), ("rsa.crt", RSA_CERT_PEM)] {
        let auth = Authenticator::new(sa_config(vec![write(dir.path(), name, content)]), None)
            .expect("authenticator");
        for alg in [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512] {
            let token = Signer::rsa(alg).sign(&fixture_claims());
            let got = auth.authenticate(None, &bearer(&token)).await;
            assert_eq!(
                *got.expect("rsa token"),
                fixture_identity(),
                "{name} {alg:?}"
            );
        }
    }
}

#[tokio::test]
async fn several_keys_in_one_file_and_several_files_all_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, a_pub) = Signer::ec();
    let (b, b_pub) = Signer::ec384();
    let (c, c_pub) = Signer::ec();
    let both = format!("{a_pub}{RSA_PUBLIC_PEM}{b_pub}");
    let auth = Authenticator::new(
        sa_config(vec![
            write(dir.path(), "both.pem", &both),
            write(dir.path(), "c.pem", &c_pub),
        ]),
        None,
    )
    .expect("authenticator");
    for signer in [&a, &b, &c, &Signer::rsa(Algorithm::RS256)] {
        let token = signer.sign(&fixture_claims());
        assert!(
            auth.authenticate(None, &bearer(&token)).await.is_ok(),
            "{:?}",
            signer.alg
        );
    }
}

#[tokio::test]
async fn jwks_file_verifies_tokens_and_selects_by_kid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut ec, _) = Signer::ec();
    let mut rsa = Signer::rsa(Algorithm::RS256);
    ec.kid = Some("ec-1".into());
    rsa.kid = Some("rsa-1".into());
    let mut ec_jwk = Jwk::from_encoding_key(&ec.key, Algorithm::ES256).expect("ec jwk");
    ec_jwk.common.key_id = ec.kid.clone();
    let mut rsa_jwk = Jwk::from_encoding_key(&rsa.key, Algorithm::RS256).expect("rsa jwk");
    rsa_jwk.common.key_id = rsa.kid.clone();
    let set = JwkSet {
        keys: vec![ec_jwk, rsa_jwk],
    };
    let file = write(
        dir.path(),
        "keys.json",
        &serde_json::to_string(&set).expect("json"),
    );
    let auth = Authenticator::new(sa_config(vec![file]), None).expect("authenticator");
    for signer in [&ec, &rsa] {
        let token = signer.sign(&fixture_claims());
        assert_eq!(
            *auth
                .authenticate(None, &bearer(&token))
                .await
                .expect("jwks"),
            fixture_identity()
        );
    }
    // A kid naming the EC key on an RSA signature: only the EC key is tried.
    rsa.kid = Some("ec-1".into());
    let reason = invalid_reason(
        auth.authenticate(None, &bearer(&rsa.sign(&fixture_claims())))
            .await,
    );
    assert!(reason.contains("signature"), "{reason}");
}

#[tokio::test]
async fn pem_key_kid_is_the_apiserver_key_id() {
    // The apiserver's kid: base64url(SHA-256(SPKI DER)). A token naming it
    // picks that key; an unknown kid still tries every key.
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut signer, public) = Signer::ec();
    let (_, spki) = x509_parser::pem::parse_x509_pem(public.as_bytes()).expect("pem");
    use base64::Engine as _;
    let kid = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(<sha2::Sha256 as sha2::Digest>::digest(&spki.contents));
    let file = write(dir.path(), "sa.pub", &format!("{RSA_PUBLIC_PEM}{public}"));
    let auth = Authenticator::new(sa_config(vec![file]), None).expect("authenticator");
    let keys = auth.keys.load();
    assert_eq!(keys.candidates(Some(&kid), Algorithm::ES256).count(), 1);
    signer.kid = Some(kid);
    assert!(
        auth.authenticate(None, &bearer(&signer.sign(&fixture_claims())))
            .await
            .is_ok()
    );
    signer.kid = Some("unknown".into());
    assert!(
        auth.authenticate(None, &bearer(&signer.sign(&pod_claims())))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn bad_tokens_of_the_configured_issuer_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (signer, public) = Signer::ec();
    let (forger, _) = Signer::ec();
    let reviewer = FakeReviewer::new(Ok(Some(alice())), false);
    let auth = reviewed(
        sa_config(vec![write(dir.path(), "sa.pub", &public)]),
        &reviewer,
    );
    let now = now();
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = fixture_claims();
        f(&mut c);
        c
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            signer.sign(&with(&|c| c["exp"] = json!(now - 120))),
            "expired",
        ),
        (
            "not yet valid",
            signer.sign(&with(&|c| c["nbf"] = json!(now + 600))),
            "not valid yet",
        ),
        (
            "issued in the future",
            signer.sign(&with(&|c| c["iat"] = json!(now + 600))),
            "future",
        ),
        (
            "no exp",
            signer.sign(&with(&|c| {
                c.as_object_mut().expect("object").remove("exp");
            })),
            "exp",
        ),
        (
            "wrong audience",
            signer.sign(&with(&|c| c["aud"] = json!(["https://other"]))),
            "audiences",
        ),
        (
            "no audience",
            signer.sign(&with(&|c| {
                c.as_object_mut().expect("object").remove("aud");
            })),
            "audiences",
        ),
        ("forged", forger.sign(&fixture_claims()), "signature"),
        (
            "sub of another account",
            signer.sign(&with(&|c| {
                c["sub"] = json!("system:serviceaccount:kube-system:admin")
            })),
            "sub",
        ),
        (
            "no kubernetes.io claims",
            signer.sign(&with(&|c| {
                c.as_object_mut().expect("object").remove("kubernetes.io");
            })),
            "kubernetes.io",
        ),
        (
            "HS256 with the public key as secret",
            Signer {
                key: EncodingKey::from_secret(public.as_bytes()),
                alg: Algorithm::HS256,
                kid: None,
            }
            .sign(&fixture_claims()),
            "algorithm",
        ),
    ];
    for (name, token, want) in cases {
        let result = auth.authenticate(None, &bearer(&token)).await;
        let err = result.expect_err(name);
        assert_eq!(err.status_code(), 401, "{name}");
        assert_eq!(err.client_message(), "Unauthorized");
        let AuthError::InvalidToken(reason) = &err else {
            panic!("{name}: {err:?}");
        };
        assert!(reason.contains(want), "{name}: {reason}");
        // The reason and Debug are for logs: never the token.
        assert!(!format!("{err} {err:?}").contains(&token), "{name}");
    }
    // None of them fell through to TokenReview.
    assert_eq!(reviewer.calls(), 0);
}

#[tokio::test]
async fn unsigned_alg_none_token_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, public) = Signer::ec();
    let auth = Authenticator::new(sa_config(vec![write(dir.path(), "sa.pub", &public)]), None)
        .expect("authenticator");
    use base64::Engine as _;
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let token = format!(
        "{}.{}.",
        b64(&json!({"alg": "none"})),
        b64(&fixture_claims())
    );
    let reason = invalid_reason(auth.authenticate(None, &bearer(&token)).await);
    assert!(
        reason.contains("header") || reason.contains("algorithm"),
        "{reason}"
    );
}

#[tokio::test]
async fn expiry_within_the_clock_skew_is_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (signer, public) = Signer::ec();
    let auth = Authenticator::new(sa_config(vec![write(dir.path(), "sa.pub", &public)]), None)
        .expect("authenticator");
    let mut claims = fixture_claims();
    claims["exp"] = json!(now() - 20);
    claims["nbf"] = json!(now() + 20);
    assert!(
        auth.authenticate(None, &bearer(&signer.sign(&claims)))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn explicit_api_audiences_replace_the_issuer_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (signer, public) = Signer::ec();
    let mut cfg = sa_config(vec![write(dir.path(), "sa.pub", &public)]);
    cfg.api_audiences = vec!["api".into(), "breakwater".into()];
    let auth = Authenticator::new(cfg, None).expect("authenticator");
    let mut claims = fixture_claims();
    claims["aud"] = json!("breakwater");
    assert!(
        auth.authenticate(None, &bearer(&signer.sign(&claims)))
            .await
            .is_ok()
    );
    let reason = invalid_reason(
        auth.authenticate(None, &bearer(&signer.sign(&fixture_claims())))
            .await,
    );
    assert!(reason.contains("audiences"), "{reason}");
}

#[tokio::test]
async fn jwt_of_an_unconfigured_issuer_goes_to_token_review() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (signer, public) = Signer::ec();
    let mut claims = fixture_claims();
    claims["iss"] = json!("https://oidc.example.com");
    let token = signer.sign(&claims);
    let reviewer = FakeReviewer::new(Ok(Some(alice())), false);
    let files = vec![write(dir.path(), "sa.pub", &public)];
    let auth = reviewed(sa_config(files.clone()), &reviewer);
    let got = auth
        .authenticate(None, &bearer(&token))
        .await
        .expect("reviewed");
    assert_eq!(*got, alice());
    assert_eq!(reviewer.calls(), 1);
    // Without a reviewer nobody can vouch for it.
    let alone = Authenticator::new(sa_config(files), None).expect("authenticator");
    let err = alone
        .authenticate(None, &bearer(&token))
        .await
        .expect_err("no reviewer");
    assert!(matches!(err, AuthError::CannotVerify), "{err:?}");
    assert_eq!(err.status_code(), 401);
}

#[tokio::test]
async fn without_issuers_every_token_goes_to_token_review() {
    let (signer, _) = Signer::ec();
    let reviewer = FakeReviewer::new(Ok(Some(fixture_identity())), false);
    let auth = reviewed(AuthConfig::default(), &reviewer);
    let got = auth
        .authenticate(None, &bearer(&signer.sign(&fixture_claims())))
        .await
        .expect("reviewed");
    assert_eq!(*got, fixture_identity());
    assert_eq!(reviewer.calls(), 1);
}

#[tokio::test]
async fn reload_picks_up_a_rotated_key_and_keeps_the_old_keys_on_a_broken_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, old_pub) = Signer::ec();
    let (new, new_pub) = Signer::ec();
    let file = write(dir.path(), "sa.pub", &old_pub);
    let auth = Authenticator::new(sa_config(vec![file.clone()]), None).expect("authenticator");
    let old_token = old.sign(&fixture_claims());
    assert!(auth.authenticate(None, &bearer(&old_token)).await.is_ok());

    write(dir.path(), "sa.pub", &new_pub);
    auth.reload_keys().expect("reload");
    assert!(
        auth.authenticate(None, &bearer(&new.sign(&fixture_claims())))
            .await
            .is_ok()
    );
    // The withdrawn key's token stops working at once, though it was cached.
    let reason = invalid_reason(auth.authenticate(None, &bearer(&old_token)).await);
    assert!(reason.contains("signature"), "{reason}");

    // A half-written file: the reload fails, naming the file; the keys stay.
    write(dir.path(), "sa.pub", &new_pub[..new_pub.len() / 2]);
    let err = auth.reload_keys().expect_err("broken file");
    assert!(err.to_string().contains("sa.pub"), "{err}");
    assert!(
        auth.authenticate(None, &bearer(&new.sign(&pod_claims())))
            .await
            .is_ok()
    );

    std::fs::remove_file(&file).expect("remove");
    assert!(matches!(
        auth.reload_keys(),
        Err(IdentityError::ReadKeyFile { .. })
    ));
    assert!(
        auth.authenticate(None, &bearer(&new.sign(&pod_claims())))
            .await
            .is_ok()
    );
}

#[test]
fn key_files_that_cannot_be_used_are_refused_at_startup() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(matches!(
        Authenticator::new(sa_config(vec![]), None),
        Err(IdentityError::NoKeys)
    ));
    let private = write(dir.path(), "private.pem", RSA_PRIVATE_PEM);
    let err = Authenticator::new(sa_config(vec![private]), None).expect_err("private only");
    assert!(err.to_string().contains("private"), "{err}");
    // Nothing about the key itself in the message.
    assert!(!err.to_string().contains("MII"), "{err}");
    let empty = write(dir.path(), "empty.pem", "nothing here\n");
    let err = Authenticator::new(sa_config(vec![empty]), None).expect_err("no keys");
    assert!(err.to_string().contains("no usable public keys"), "{err}");
    let hmac = write(
        dir.path(),
        "hmac.json",
        r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#,
    );
    let err = Authenticator::new(sa_config(vec![hmac]), None).expect_err("symmetric");
    assert!(err.to_string().contains("unsupported key type"), "{err}");
}

#[test]
fn debug_output_names_no_key_material() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), "sa.pub", RSA_PUBLIC_PEM);
    let auth = Authenticator::new(sa_config(vec![file]), None).expect("authenticator");
    let debug = format!("{auth:?}");
    assert!(debug.contains("keys: 1"), "{debug}");
    assert!(!debug.contains("MII"), "{debug}");
}

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

// ---- the TokenReview cache ----

#[tokio::test]
async fn thousand_concurrent_requests_with_one_new_token_make_one_review() {
    let reviewer = FakeReviewer::new(Ok(Some(alice())), true);
    let auth = reviewed(AuthConfig::default(), &reviewer);
    let headers = bearer("opaque-token-1");
    let entered = AtomicUsize::new(0);
    let all = futures_util::future::join_all((0..1000).map(|_| async {
        entered.fetch_add(1, Ordering::SeqCst);
        auth.authenticate(None, &headers).await
    }));
    let release = async {
        reviewer.started.notified().await;
        // join_all polls its futures in slices; let every caller get inside
        // authenticate() while the one review is held.
        for _ in 0..10_000 {
            if entered.load(Ordering::SeqCst) == 1000 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(entered.load(Ordering::SeqCst), 1000);
        assert_eq!(reviewer.calls(), 1);
        reviewer.gate.as_ref().expect("gated").notify_one();
    };
    let (results, ()) = tokio::join!(all, release);
    assert_eq!(reviewer.calls(), 1);
    let first = results[0].as_ref().expect("authenticated").clone();
    assert_eq!(*first, alice());
    for r in &results {
        assert!(Arc::ptr_eq(r.as_ref().expect("authenticated"), &first));
    }
    // Within the TTL: no new review.
    for _ in 0..10 {
        auth.authenticate(None, &headers).await.expect("cached");
    }
    assert_eq!(reviewer.calls(), 1);
}

#[tokio::test]
async fn reviews_expire_after_their_ttl() {
    let reviewer = FakeReviewer::new(Ok(Some(alice())), false);
    let auth = reviewed(
        AuthConfig {
            review_ttl: Duration::from_millis(200),
            ..AuthConfig::default()
        },
        &reviewer,
    );
    let headers = bearer("opaque-token-2");
    auth.authenticate(None, &headers).await.expect("first");
    auth.authenticate(None, &headers).await.expect("cached");
    assert_eq!(reviewer.calls(), 1);
    // moka keeps its own clock, so real time has to pass (bounded wait).
    tokio::time::sleep(Duration::from_millis(400)).await;
    auth.authenticate(None, &headers).await.expect("again");
    assert_eq!(reviewer.calls(), 2);
}

#[tokio::test]
async fn negative_answers_are_cached_for_the_negative_ttl() {
    let reviewer = FakeReviewer::new(Ok(None), false);
    let auth = reviewed(
        AuthConfig {
            review_negative_ttl: Duration::from_millis(200),
            ..AuthConfig::default()
        },
        &reviewer,
    );
    let headers = bearer("opaque-token-3");
    for _ in 0..3 {
        let reason = invalid_reason(auth.authenticate(None, &headers).await);
        assert!(reason.contains("not authenticated"), "{reason}");
    }
    assert_eq!(reviewer.calls(), 1);
    // The token became valid upstream; after the negative TTL it works.
    reviewer.set(Ok(Some(alice())));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        *auth.authenticate(None, &headers).await.expect("valid now"),
        alice()
    );
    assert_eq!(reviewer.calls(), 2);
}

#[tokio::test]
async fn review_failures_are_503_and_not_cached() {
    let reviewer = FakeReviewer::new(Err(ReviewError::Failed("connection refused".into())), false);
    let auth = reviewed(AuthConfig::default(), &reviewer);
    let headers = bearer("opaque-token-4");
    let err = auth
        .authenticate(None, &headers)
        .await
        .expect_err("unavailable");
    assert!(matches!(err, AuthError::ReviewUnavailable(_)), "{err:?}");
    assert_eq!(err.status_code(), 503);
    assert!(err.to_string().contains("connection refused"), "{err}");
    reviewer.set(Ok(Some(alice())));
    assert!(auth.authenticate(None, &headers).await.is_ok());
    assert_eq!(reviewer.calls(), 2);
}

#[tokio::test]
async fn different_tokens_are_reviewed_separately() {
    let reviewer = FakeReviewer::new(Ok(Some(alice())), false);
    let auth = reviewed(AuthConfig::default(), &reviewer);
    auth.authenticate(None, &bearer("token-a"))
        .await
        .expect("a");
    auth.authenticate(None, &bearer("token-b"))
        .await
        .expect("b");
    assert_eq!(reviewer.calls(), 2);
}

#[tokio::test]
async fn review_identity_gets_system_authenticated() {
    let mut bare = alice();
    bare.groups = vec!["devs".into()];
    let reviewer = FakeReviewer::new(Ok(Some(bare)), false);
    let auth = reviewed(AuthConfig::default(), &reviewer);
    let got = auth.authenticate(None, &bearer("t")).await.expect("ok");
    assert_eq!(got.groups, ["devs", "system:authenticated"]);
}
