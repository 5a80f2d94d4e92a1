//! Who is calling kube-sim, and the authentication review APIs.
//!
//! kube-sim authenticates like the apiserver's union authenticator:
//! requestheader (front-proxy) first — a client certificate from the
//! front-proxy CA with an allowed CN, the user in `X-Remote-User`,
//! `X-Remote-Group`, `X-Remote-Extra-*` ([`front_proxy_user`]) — then an x509
//! client certificate signed by the client CA (CN = user, each O = a group),
//! then a `Bearer` ServiceAccount token (an ES256 JWT signed with the sim's SA
//! key, shaped like the ones `kubectl create token` returns; see
//! fixtures/serviceaccount-token-claims.json). Impersonation headers are
//! parsed here ([`impersonation_requests`]) and authorized in server.rs. The
//! same module answers TokenRequest (`serviceaccounts/{name}/token`),
//! TokenReview and SelfSubjectReview (`kubectl auth whoami`); the access
//! reviews are in rbac.rs.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::Chain;

/// The `kid` of every token kube-sim signs (it has one signing key).
const KEY_ID: &str = "kube-sim";

/// The apiserver's minimum TokenRequest lifetime.
const MIN_TOKEN_SECONDS: i64 = 600;

/// The apiserver's default TokenRequest lifetime.
const DEFAULT_TOKEN_SECONDS: i64 = 3600;

/// The group every authenticated user is in.
pub const AUTHENTICATED: &str = "system:authenticated";
/// The group of anonymous requests.
pub const UNAUTHENTICATED: &str = "system:unauthenticated";
/// The user of requests without credentials.
pub const ANONYMOUS: &str = "system:anonymous";

/// An authenticated caller, as the apiserver's `user.Info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserInfo {
    pub username: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub uid: String,
    pub groups: Vec<String>,
    /// `user.Info.Extra` (keys lower case, as the authenticators produce them).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Vec<String>>,
}

impl UserInfo {
    /// The anonymous user (`--anonymous-auth=true`).
    pub fn anonymous() -> UserInfo {
        UserInfo {
            username: ANONYMOUS.to_string(),
            uid: String::new(),
            groups: vec![UNAUTHENTICATED.to_string()],
            extra: BTreeMap::new(),
        }
    }

    /// The apiserver's AuthenticatedGroupAdder: every authenticated user is
    /// in `system:authenticated` unless it already names either
    /// authenticated/unauthenticated group.
    pub fn with_authenticated_group(mut self) -> UserInfo {
        if !self
            .groups
            .iter()
            .any(|g| g == AUTHENTICATED || g == UNAUTHENTICATED)
        {
            self.groups.push(AUTHENTICATED.to_string());
        }
        self
    }
}

/// Why credentials were refused (logged, never sent: the client gets a bare 401).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid service account key")]
    Key(#[source] jsonwebtoken::errors::Error),
    #[error("invalid bearer token")]
    Token(#[source] jsonwebtoken::errors::Error),
    #[error("token subject {0:?} is not a service account")]
    Subject(String),
    #[error("service account public key as a JWK: {0}")]
    Jwks(String),
    #[error("legacy token's Secret is gone")]
    Revoked,
}

/// ServiceAccount token claims, in the apiserver's shape.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claims {
    aud: Vec<String>,
    exp: u64,
    iat: u64,
    iss: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    jti: String,
    #[serde(rename = "kubernetes.io")]
    kubernetes: KubernetesClaims,
    nbf: u64,
    sub: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KubernetesClaims {
    namespace: String,
    serviceaccount: ObjectRef,
    /// A token bound to a Pod names it, and (Kubernetes 1.30+) its node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod: Option<ObjectRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node: Option<ObjectRef>,
}

/// The issuer of legacy ServiceAccount tokens (those of
/// `kubernetes.io/service-account-token` Secrets, before TokenRequest).
pub const LEGACY_ISSUER: &str = "kubernetes/serviceaccount";

/// A legacy token's claims (pkg/serviceaccount/legacy.go): flat, no
/// expiry, no audience.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LegacyClaims {
    iss: String,
    #[serde(rename = "kubernetes.io/serviceaccount/namespace")]
    namespace: String,
    #[serde(rename = "kubernetes.io/serviceaccount/secret.name")]
    secret_name: String,
    #[serde(rename = "kubernetes.io/serviceaccount/service-account.name")]
    service_account_name: String,
    #[serde(rename = "kubernetes.io/serviceaccount/service-account.uid")]
    service_account_uid: String,
    sub: String,
}

/// A `{name, uid}` reference inside the `kubernetes.io` claim.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    pub name: String,
    #[serde(default)]
    pub uid: String,
}

/// What a bound token is bound to, as the apiserver's TokenRequest with a
/// `boundObjectRef` of kind Pod writes it: the Pod, and since Kubernetes
/// 1.30 the node it runs on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Binding {
    pub pod: Option<ObjectRef>,
    pub node: Option<ObjectRef>,
}

/// `user.Info.Extra` keys of bound tokens, as the apiserver sets them.
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const EXTRA_NODE_UID: &str = "authentication.kubernetes.io/node-uid";

/// Signs and verifies ServiceAccount tokens.
pub struct Authenticator {
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// `/openid/v1/jwks` and `/.well-known/openid-configuration`, as
    /// served (they never change).
    jwks: Bytes,
    openid_configuration: Bytes,
    issuer: String,
    api_audiences: Vec<String>,
    /// Successful request authentications, like the apiserver's token cache
    /// (`--token-cache-ttl`-ish, 10 s): without it every request pays a
    /// P-256 verification, far dearer than a real apiserver.
    cache: std::sync::Mutex<std::collections::HashMap<String, (UserInfo, std::time::Instant)>>,
    /// The legacy tokens issued and not revoked. The apiserver looks each
    /// one's Secret up (`--service-account-lookup`); kube-sim keeps them.
    legacy: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// How long a verified token is trusted without verifying again.
const TOKEN_CACHE_TTL: Duration = Duration::from_secs(10);
/// Entries at most; the cache is cleared when full (a test server's bound).
const TOKEN_CACHE_MAX: usize = 65_536;

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Authenticator")
            .field("issuer", &self.issuer)
            .field("api_audiences", &self.api_audiences)
            .finish_non_exhaustive()
    }
}

/// The user of a ServiceAccount token (`username` already checked to be
/// `system:serviceaccount:NS:NAME`), with the groups the apiserver gives it.
fn service_account_user(
    username: String,
    namespace: &str,
    uid: String,
    extra: BTreeMap<String, Vec<String>>,
) -> UserInfo {
    UserInfo {
        username,
        uid,
        groups: vec![
            "system:serviceaccounts".to_string(),
            format!("system:serviceaccounts:{namespace}"),
            AUTHENTICATED.to_string(),
        ],
        extra,
    }
}

/// A P-256 public key (SPKI PEM) as the apiserver publishes its keys: a
/// JWK Set of one signing key, `kid` the one tokens carry.
fn p256_jwks(public_pem: &str) -> Result<Value, AuthError> {
    use base64::Engine;
    use rustls_pki_types::pem::PemObject;
    let spki = rustls_pki_types::SubjectPublicKeyInfoDer::from_pem_slice(public_pem.as_bytes())
        .map_err(|e| AuthError::Jwks(e.to_string()))?;
    // A P-256 SPKI ends with the uncompressed point: 0x04, X, Y.
    let der: &[u8] = spki.as_ref();
    let point = der
        .len()
        .checked_sub(65)
        .map(|at| &der[at..])
        .filter(|p| p[0] == 4)
        .ok_or_else(|| AuthError::Jwks("not an uncompressed P-256 public key".into()))?;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    Ok(json!({"keys": [{
        "use": "sig",
        "kty": "EC",
        "kid": KEY_ID,
        "crv": "P-256",
        "alg": "ES256",
        "x": b64(&point[1..33]),
        "y": b64(&point[33..]),
    }]}))
}

/// A signed token and when it expires (seconds since the epoch).
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub expires_at: u64,
}

impl Authenticator {
    /// Loads the SA signing key pair (PKCS#8 private, SPKI public, PEM).
    pub fn new(
        sa_key_pem: &str,
        sa_public_pem: &str,
        issuer: String,
        api_audiences: Vec<String>,
    ) -> Result<Authenticator, AuthError> {
        Ok(Authenticator {
            encoding: EncodingKey::from_ec_pem(sa_key_pem.as_bytes()).map_err(AuthError::Key)?,
            decoding: DecodingKey::from_ec_pem(sa_public_pem.as_bytes()).map_err(AuthError::Key)?,
            jwks: Bytes::from(p256_jwks(sa_public_pem)?.to_string()),
            openid_configuration: Bytes::from(
                json!({
                    "issuer": issuer,
                    "jwks_uri": format!("{issuer}/openid/v1/jwks"),
                    "response_types_supported": ["id_token"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["ES256"],
                })
                .to_string(),
            ),
            issuer,
            api_audiences,
            cache: Default::default(),
            legacy: Default::default(),
        })
    }

    /// `GET /.well-known/openid-configuration`, as the apiserver's
    /// ServiceAccountIssuerDiscovery serves it (stable since 1.21, so also
    /// where SelfSubjectReview is not).
    pub fn openid_configuration(&self) -> Bytes {
        self.openid_configuration.clone()
    }

    /// `GET /openid/v1/jwks`: the public key tokens are verified with.
    pub fn jwks(&self) -> Bytes {
        self.jwks.clone()
    }

    /// The audiences a token must carry to authenticate against kube-sim.
    pub fn api_audiences(&self) -> &[String] {
        &self.api_audiences
    }

    /// Signs a token for ServiceAccount `namespace/name` (uid `sa_uid`) valid
    /// for `ttl`, for `audiences` (the API audiences when empty).
    pub fn issue(
        &self,
        namespace: &str,
        name: &str,
        sa_uid: &str,
        audiences: &[String],
        ttl: Duration,
    ) -> Result<IssuedToken, AuthError> {
        self.issue_bound(namespace, name, sa_uid, audiences, ttl, &Binding::default())
    }

    /// Like [`Authenticator::issue`], for a token bound to a Pod (and its
    /// node): the `kubernetes.io` claim names them, as the apiserver's
    /// bound tokens do.
    pub fn issue_bound(
        &self,
        namespace: &str,
        name: &str,
        sa_uid: &str,
        audiences: &[String],
        ttl: Duration,
        binding: &Binding,
    ) -> Result<IssuedToken, AuthError> {
        let now = unix_now();
        let exp = now + ttl.as_secs();
        let claims = Claims {
            aud: if audiences.is_empty() {
                self.api_audiences.clone()
            } else {
                audiences.to_vec()
            },
            exp,
            iat: now,
            iss: self.issuer.clone(),
            jti: random_uuid(),
            kubernetes: KubernetesClaims {
                namespace: namespace.to_string(),
                serviceaccount: ObjectRef {
                    name: name.to_string(),
                    uid: sa_uid.to_string(),
                },
                pod: binding.pod.clone(),
                node: binding.node.clone(),
            },
            nbf: now,
            sub: format!("system:serviceaccount:{namespace}:{name}"),
        };
        Ok(IssuedToken {
            token: self.sign(&claims)?,
            expires_at: exp,
        })
    }

    /// A legacy token, as the token controller put in a
    /// `kubernetes.io/service-account-token` Secret named `secret`: issuer
    /// [`LEGACY_ISSUER`], flat claims, no expiry, no audience. Valid until
    /// [`Authenticator::revoke_legacy`] (the Secret's deletion).
    pub fn issue_legacy(
        &self,
        namespace: &str,
        name: &str,
        sa_uid: &str,
        secret: &str,
    ) -> Result<String, AuthError> {
        let claims = LegacyClaims {
            iss: LEGACY_ISSUER.to_string(),
            namespace: namespace.to_string(),
            secret_name: secret.to_string(),
            service_account_name: name.to_string(),
            service_account_uid: sa_uid.to_string(),
            sub: format!("system:serviceaccount:{namespace}:{name}"),
        };
        let token = self.sign(&claims)?;
        if let Ok(mut legacy) = self.legacy.lock() {
            legacy.insert(token.clone());
        }
        Ok(token)
    }

    /// `claims` signed with the SA key (ES256, its `kid`).
    fn sign(&self, claims: &impl Serialize) -> Result<String, AuthError> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(KEY_ID.to_string());
        jsonwebtoken::encode(&header, claims, &self.encoding).map_err(AuthError::Token)
    }

    /// The legacy token is refused from now on, as when its Secret is
    /// deleted.
    pub fn revoke_legacy(&self, token: &str) {
        if let Ok(mut legacy) = self.legacy.lock() {
            legacy.remove(token);
        }
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(token);
        }
    }

    /// A legacy token's user: signed with the SA key, issued and not
    /// revoked.
    fn verify_legacy(&self, token: &str) -> Result<UserInfo, AuthError> {
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_issuer(&[LEGACY_ISSUER]);
        validation.set_required_spec_claims(&["iss", "sub"]);
        validation.validate_exp = false;
        validation.validate_aud = false;
        let claims = jsonwebtoken::decode::<LegacyClaims>(token, &self.decoding, &validation)
            .map_err(AuthError::Token)?
            .claims;
        // legacyValidator.Validate: every claim there, and sub naming them.
        let ns = &claims.namespace;
        let name = &claims.service_account_name;
        if [ns, name, &claims.secret_name, &claims.service_account_uid]
            .iter()
            .any(|c| c.is_empty())
            || claims.sub != format!("system:serviceaccount:{ns}:{name}")
        {
            return Err(AuthError::Subject(claims.sub));
        }
        let known = self
            .legacy
            .lock()
            .map(|l| l.contains(token))
            .unwrap_or(false);
        if !known {
            return Err(AuthError::Revoked);
        }
        Ok(service_account_user(
            claims.sub,
            ns,
            claims.service_account_uid,
            BTreeMap::new(),
        ))
    }

    /// Verifies a bearer token against the API audiences (or, issued by
    /// [`LEGACY_ISSUER`], as a legacy token).
    pub fn authenticate(&self, token: &str) -> Result<UserInfo, AuthError> {
        let now = std::time::Instant::now();
        if let Ok(cache) = self.cache.lock()
            && let Some((user, at)) = cache.get(token)
            && now.duration_since(*at) < TOKEN_CACHE_TTL
        {
            return Ok(user.clone());
        }
        let legacy = jsonwebtoken::dangerous::insecure_decode::<LegacyClaims>(token)
            .is_ok_and(|data| data.claims.iss == LEGACY_ISSUER);
        let user = if legacy {
            self.verify_legacy(token)?
        } else {
            self.verify(token, &self.api_audiences)
                .map(|(user, _)| user)?
        };
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= TOKEN_CACHE_MAX {
                cache.clear();
            }
            cache.insert(token.to_string(), (user.clone(), now));
        }
        Ok(user)
    }

    /// Verifies signature, issuer, expiry and that the token carries one of
    /// `audiences`; returns the user and the token's audiences that matched.
    pub fn verify(
        &self,
        token: &str,
        audiences: &[String],
    ) -> Result<(UserInfo, Vec<String>), AuthError> {
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        // The apiserver allows no clock skew on exp beyond its own leeway; a
        // minute keeps the sim forgiving without accepting stale tokens.
        validation.leeway = 60;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map_err(AuthError::Token)?;
        let claims = data.claims;
        let ns = &claims.kubernetes.namespace;
        let expected = format!(
            "system:serviceaccount:{}:{}",
            ns, claims.kubernetes.serviceaccount.name
        );
        if claims.sub != expected {
            return Err(AuthError::Subject(claims.sub));
        }
        let mut extra = BTreeMap::new();
        if let Some(pod) = &claims.kubernetes.pod {
            extra.insert(EXTRA_POD_NAME.to_string(), vec![pod.name.clone()]);
            extra.insert(EXTRA_POD_UID.to_string(), vec![pod.uid.clone()]);
        }
        if let Some(node) = &claims.kubernetes.node {
            extra.insert(EXTRA_NODE_NAME.to_string(), vec![node.name.clone()]);
            if !node.uid.is_empty() {
                extra.insert(EXTRA_NODE_UID.to_string(), vec![node.uid.clone()]);
            }
        }
        let matched = claims
            .aud
            .iter()
            .filter(|a| audiences.contains(a))
            .cloned()
            .collect();
        Ok((
            service_account_user(
                claims.sub.clone(),
                ns,
                claims.kubernetes.serviceaccount.uid.clone(),
                extra,
            ),
            matched,
        ))
    }

    /// The TokenRequest answer for ServiceAccount `namespace/name` whose uid is
    /// `sa_uid`: the request body echoed with `status.token` and
    /// `status.expirationTimestamp`. Err is the 422 message for a too short
    /// `expirationSeconds`.
    pub fn token_request(
        &self,
        namespace: &str,
        name: &str,
        sa_uid: &str,
        body: &Value,
        binding: &Binding,
    ) -> Result<Value, TokenRequestError> {
        let spec = body.get("spec").cloned().unwrap_or_else(|| json!({}));
        let seconds = spec
            .get("expirationSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(DEFAULT_TOKEN_SECONDS);
        if seconds < MIN_TOKEN_SECONDS {
            return Err(TokenRequestError::TooShort(seconds));
        }
        let audiences: Vec<String> = spec
            .get("audiences")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let issued = self
            .issue_bound(
                namespace,
                name,
                sa_uid,
                &audiences,
                Duration::from_secs(seconds.unsigned_abs()),
                binding,
            )
            .map_err(TokenRequestError::Sign)?;
        let audiences = if audiences.is_empty() {
            self.api_audiences.clone()
        } else {
            audiences
        };
        Ok(json!({
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "creationTimestamp": format_timestamp(unix_now()),
            },
            "spec": {
                "audiences": audiences,
                "expirationSeconds": seconds,
                "boundObjectRef": spec.get("boundObjectRef").cloned().unwrap_or(Value::Null),
            },
            "status": {
                "token": issued.token,
                "expirationTimestamp": format_timestamp(issued.expires_at),
            },
        }))
    }

    /// The TokenReview answer: the request echoed with `status`
    /// (fixtures/tokenreview.body). An invalid token is not an HTTP error: the
    /// review says `error` and leaves `authenticated` unset.
    pub fn token_review(&self, body: &Value) -> Value {
        let mut out = review_echo(body, "TokenReview", "authentication.k8s.io/v1");
        let token = body
            .pointer("/spec/token")
            .and_then(Value::as_str)
            .unwrap_or("");
        let wanted: Vec<String> = body
            .pointer("/spec/audiences")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let audiences = if wanted.is_empty() {
            self.api_audiences.clone()
        } else {
            wanted
        };
        out["status"] = match self.verify(token, &audiences) {
            Ok((user, matched)) => json!({
                "authenticated": true,
                "user": user,
                "audiences": matched,
            }),
            Err(e) => {
                tracing::debug!(error = %Chain(&e), "token review refused a token");
                json!({"user": {}, "error": "[invalid bearer token, token lookup failed]"})
            }
        };
        out
    }
}

/// Why a TokenRequest was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenRequestError {
    #[error(
        "spec.expirationSeconds: Invalid value: {0}: may not specify a duration less than 10 minutes"
    )]
    TooShort(i64),
    #[error("signing failed")]
    Sign(#[source] AuthError),
}

/// The user of an x509 client certificate (DER): CN = username, each O = a
/// group, plus `system:authenticated`. None when it has no CN.
pub fn user_from_cert(der: &[u8]) -> Option<UserInfo> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let username = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())?
        .to_string();
    let groups: Vec<String> = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_string))
        .collect();
    Some(
        UserInfo {
            username,
            uid: String::new(),
            groups,
            extra: BTreeMap::new(),
        }
        .with_authenticated_group(),
    )
}

/// The CN of a certificate (DER), empty when it has none.
pub fn cert_common_name(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der)
        .ok()
        .and_then(|(_, cert)| {
            cert.subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok().map(str::to_string))
        })
        .unwrap_or_default()
}

/// `url.PathUnescape`, keeping the raw key when it is malformed (as the
/// apiserver's `unescapeExtraKey` does).
fn unescape_extra_key(key: &str) -> String {
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(b) => {
                    out.push(b);
                    i += 3;
                }
                None => return key.to_string(),
            }
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| key.to_string())
}

/// Extra values from headers `{prefix}{key}`: key lower-cased then
/// percent-decoded; values in header order.
fn extra_from_headers(headers: &http::HeaderMap, prefix: &str) -> BTreeMap<String, Vec<String>> {
    let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for name in headers.keys() {
        // http lower-cases header names, as Go's ToLower would.
        let Some(key) = name.as_str().strip_prefix(prefix) else {
            continue;
        };
        let values = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string));
        extra
            .entry(unescape_extra_key(key))
            .or_default()
            .extend(values);
    }
    extra
}

/// The requestheader authenticator (`--requestheader-username-headers=X-Remote-User`,
/// `--requestheader-group-headers=X-Remote-Group`,
/// `--requestheader-extra-headers-prefix=X-Remote-Extra-`), for a connection
/// whose certificate the caller already verified against the front-proxy CA
/// and the allowed names. None when X-Remote-User is absent or empty.
pub fn front_proxy_user(headers: &http::HeaderMap) -> Option<UserInfo> {
    let name = headers
        .get_all("x-remote-user")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| !v.is_empty())?
        .to_string();
    let groups = headers
        .get_all("x-remote-group")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .collect();
    Some(
        UserInfo {
            username: name,
            uid: String::new(),
            groups,
            extra: extra_from_headers(headers, "x-remote-extra-"),
        }
        .with_authenticated_group(),
    )
}

/// One thing a request asks to impersonate (the apiserver's
/// `buildImpersonationRequests` ObjectReferences).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Impersonate {
    /// `Impersonate-User: system:serviceaccount:{ns}:{name}`.
    ServiceAccount {
        namespace: String,
        name: String,
    },
    User(String),
    Group(String),
    /// `Impersonate-Extra-{key}: value` (one per value).
    Extra {
        key: String,
        value: String,
    },
    Uid(String),
}

impl Impersonate {
    /// Go's `%v` of the ObjectReference, for the "without impersonating a
    /// user" error.
    fn describe(&self) -> String {
        match self {
            Impersonate::ServiceAccount { namespace, name } => {
                format!("{{ServiceAccount {namespace} {name}    }}")
            }
            Impersonate::User(n) => format!("{{User  {n}    }}"),
            Impersonate::Group(n) => format!("{{Group  {n}    }}"),
            Impersonate::Extra { key, value } => {
                format!("{{UserExtra  {value}  authentication.k8s.io/v1  {key}}}")
            }
            Impersonate::Uid(u) => format!("{{UID  {u}  authentication.k8s.io/v1  }}"),
        }
    }
}

/// Parses the Impersonate-* headers. Err is the apiserver's internal error
/// text for groups, extras or a uid without a user.
pub fn impersonation_requests(headers: &http::HeaderMap) -> Result<Vec<Impersonate>, String> {
    let mut out = Vec::new();
    let user = headers
        .get("impersonate-user")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let has_user = !user.is_empty();
    if has_user {
        out.push(match split_sa_username(user) {
            Some((namespace, name)) => Impersonate::ServiceAccount { namespace, name },
            None => Impersonate::User(user.to_string()),
        });
    }
    let mut has_other = false;
    for g in headers.get_all("impersonate-group") {
        has_other = true;
        out.push(Impersonate::Group(g.to_str().unwrap_or("").to_string()));
    }
    for (key, values) in extra_from_headers(headers, "impersonate-extra-") {
        has_other = true;
        for value in values {
            out.push(Impersonate::Extra {
                key: key.clone(),
                value,
            });
        }
    }
    let uid = headers
        .get("impersonate-uid")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !uid.is_empty() {
        has_other = true;
        out.push(Impersonate::Uid(uid.to_string()));
    }
    if has_other && !has_user {
        let list: Vec<String> = out.iter().map(Impersonate::describe).collect();
        return Err(format!(
            "requested [{}] without impersonating a user",
            list.join(" ")
        ));
    }
    Ok(out)
}

/// `serviceaccount.SplitUsername`: `system:serviceaccount:{ns}:{name}` with
/// both parts non-empty and no further ':'.
fn split_sa_username(username: &str) -> Option<(String, String)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, name) = rest.split_once(':')?;
    if ns.is_empty() || name.is_empty() || name.contains(':') {
        return None;
    }
    Some((ns.to_string(), name.to_string()))
}

/// The SelfSubjectReview answer (`kubectl auth whoami`), in `api_version`
/// (the version asked at, [`super::SelfSubjectReviewVersion`]).
pub fn self_subject_review(body: &Value, api_version: &str, user: &UserInfo) -> Value {
    let mut out = review_echo(body, "SelfSubjectReview", api_version);
    out["status"] = json!({ "userInfo": user });
    out
}

/// The request body with kind/apiVersion set, `metadata.creationTimestamp`
/// null (reviews are never stored) and any client-sent status dropped.
pub(crate) fn review_echo(body: &Value, kind: &str, api_version: &str) -> Value {
    let mut out = json!({
        "kind": kind,
        "apiVersion": api_version,
        "metadata": {"creationTimestamp": null},
        "spec": body.get("spec").cloned().unwrap_or_else(|| json!({})),
    });
    if let Some(meta) = body.get("metadata").and_then(Value::as_object) {
        let mut meta = meta.clone();
        meta.insert("creationTimestamp".to_string(), Value::Null);
        out["metadata"] = Value::Object(meta);
    }
    out
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// RFC 3339 in UTC with seconds precision, as the apiserver writes
/// timestamps: `2026-11-26T06:45:05Z`.
pub fn format_timestamp(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Howard Hinnant's days-to-civil algorithm (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// A random (version 4) UUID string.
pub fn random_uuid() -> String {
    let b: [u8; 16] = rand::random();
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-4{:x}{:02x}-{:x}{:x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[0],
        b[1],
        b[2],
        b[3],
        b[4],
        b[5],
        b[6] & 0x0f,
        b[7],
        8 | (b[8] & 0x03),
        b[8] >> 4,
        b[9],
        b[10],
        b[11],
        b[12],
        b[13],
        b[14],
        b[15]
    )
}

/// Which of the apiserver's authenticators accepted a request: what a
/// request cost the apiserver to authenticate depends on it (a token is
/// cached after its first review; a client certificate is verified on
/// every request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AuthPath {
    /// requestheader: a front-proxy certificate with `X-Remote-User`.
    RequestHeader,
    /// x509: the caller's own client certificate.
    ClientCertificate,
    /// A bearer token on a connection without a client certificate.
    Token,
    /// A bearer token on a connection that also presented a client
    /// certificate, which the union authenticator checked (and failed)
    /// first: certificate work for nothing on every request.
    TokenBesideCertificate,
    /// No credentials: `system:anonymous`.
    Anonymous,
}

impl AuthPath {
    const ALL: [AuthPath; 5] = [
        AuthPath::RequestHeader,
        AuthPath::ClientCertificate,
        AuthPath::Token,
        AuthPath::TokenBesideCertificate,
        AuthPath::Anonymous,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// Users counted by [`AuthRecord`] at most; requests of further users are
/// not counted (a storm's thousands of agents fit; a flood of random
/// front-proxy usernames cannot grow kube-sim's memory).
const MAX_RECORDED_USERS: usize = 20_000;

/// How many requests each user was authenticated by each [`AuthPath`]:
/// lets a test see not only who kube-sim thought was calling, but how it
/// found out.
#[derive(Debug, Default)]
pub struct AuthRecord {
    /// Per username, one count per [`AuthPath`]. Looked up by `&str`, so a
    /// known user's request allocates nothing.
    counts: std::sync::Mutex<std::collections::HashMap<String, [u64; 5]>>,
}

impl AuthRecord {
    /// Counts one request of `user` authenticated by `path`.
    pub fn record(&self, path: AuthPath, user: &str) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = counts.get_mut(user) {
            c[path.index()] += 1;
        } else if counts.len() < MAX_RECORDED_USERS {
            let mut c = [0; 5];
            c[path.index()] = 1;
            counts.insert(user.to_string(), c);
        }
    }

    /// The requests of `user` per path that authenticated them (paths with
    /// none left out).
    pub fn of(&self, user: &str) -> BTreeMap<AuthPath, u64> {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let Some(c) = counts.get(user) else {
            return BTreeMap::new();
        };
        AuthPath::ALL
            .iter()
            .filter(|p| c[p.index()] > 0)
            .map(|&p| (p, c[p.index()]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authenticator() -> Authenticator {
        let (key, public) = crate::pki::signing_key_pem().expect("key");
        Authenticator::new(
            &key,
            &public,
            "https://kubernetes.default.svc.cluster.local".to_string(),
            vec!["https://kubernetes.default.svc.cluster.local".to_string()],
        )
        .expect("authenticator")
    }

    /// Legacy tokens authenticate until their Secret goes, and only with
    /// the SA key's signature.
    #[test]
    fn legacy_tokens_authenticate_until_revoked() {
        let auth = authenticator();
        let token = auth
            .issue_legacy("demo", "ci", "uid-ci", "ci-token")
            .expect("token");
        let user = auth.authenticate(&token).expect("a legacy token");
        assert_eq!(user.username, "system:serviceaccount:demo:ci");
        assert_eq!(user.uid, "uid-ci");
        assert_eq!(
            user.groups,
            [
                "system:serviceaccounts",
                "system:serviceaccounts:demo",
                AUTHENTICATED
            ]
        );
        let other = authenticator()
            .issue_legacy("demo", "ci", "uid-ci", "ci-token")
            .expect("token");
        assert!(
            auth.authenticate(&other).is_err(),
            "another key's signature"
        );
        auth.revoke_legacy(&token);
        assert!(auth.authenticate(&token).is_err(), "its Secret is gone");
    }

    /// What a verifier without the key file sees: the published key set
    /// verifies a token kube-sim signed, selected by its `kid`, and the
    /// discovery document names the tokens' issuer.
    #[test]
    fn the_published_key_set_verifies_the_tokens_it_signs() {
        let auth = authenticator();
        let token = auth
            .issue("demo", "agent", "uid-1", &[], Duration::from_secs(600))
            .expect("token");
        let set: jsonwebtoken::jwk::JwkSet =
            serde_json::from_slice(&auth.jwks()).expect("a JWK Set");
        let header = jsonwebtoken::decode_header(&token.token).expect("header");
        let jwk = set
            .find(header.kid.as_deref().expect("kid"))
            .expect("the kid is published");
        let key = DecodingKey::from_jwk(jwk).expect("a key");
        let mut validation = Validation::new(Algorithm::ES256);
        let config: Value =
            serde_json::from_slice(&auth.openid_configuration()).expect("a document");
        let issuer = config["issuer"].as_str().expect("issuer").to_string();
        validation.set_issuer(&[&issuer]);
        validation.set_audience(auth.api_audiences());
        let claims =
            jsonwebtoken::decode::<Value>(&token.token, &key, &validation).expect("verifies");
        assert_eq!(claims.claims["sub"], "system:serviceaccount:demo:agent");
        // Another key's set does not.
        let other = authenticator();
        let set: jsonwebtoken::jwk::JwkSet =
            serde_json::from_slice(&other.jwks()).expect("a JWK Set");
        let key = DecodingKey::from_jwk(&set.keys[0]).expect("a key");
        assert!(jsonwebtoken::decode::<Value>(&token.token, &key, &validation).is_err());
    }

    #[test]
    fn an_issued_token_authenticates_as_its_service_account() {
        let auth = authenticator();
        let t = auth
            .issue("demo", "agent", "u-1", &[], Duration::from_secs(600))
            .expect("issue");
        let user = auth.authenticate(&t.token).expect("valid");
        assert_eq!(user.username, "system:serviceaccount:demo:agent");
        assert_eq!(user.uid, "u-1");
        assert_eq!(
            user.groups,
            vec![
                "system:serviceaccounts",
                "system:serviceaccounts:demo",
                "system:authenticated"
            ]
        );
    }

    #[test]
    fn a_token_for_another_audience_or_key_is_refused() {
        let auth = authenticator();
        let t = auth
            .issue(
                "demo",
                "agent",
                "",
                &["vault".to_string()],
                Duration::from_secs(600),
            )
            .expect("issue");
        assert!(auth.authenticate(&t.token).is_err());
        let other = authenticator();
        let t = other
            .issue("demo", "agent", "", &[], Duration::from_secs(600))
            .expect("issue");
        assert!(auth.authenticate(&t.token).is_err());
        assert!(auth.authenticate("not-a-jwt").is_err());
    }

    #[test]
    fn token_review_reports_user_or_error() {
        let auth = authenticator();
        let t = auth
            .issue("demo", "agent", "u-2", &[], Duration::from_secs(600))
            .expect("issue");
        let ok = auth.token_review(&json!({"spec": {"token": t.token}}));
        assert_eq!(ok["status"]["authenticated"], true);
        assert_eq!(
            ok["status"]["user"]["username"],
            "system:serviceaccount:demo:agent"
        );
        let bad = auth.token_review(&json!({"spec": {"token": "x"}}));
        assert!(bad["status"].get("authenticated").is_none());
        assert!(bad["status"]["error"].is_string());
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(format_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_timestamp(1_795_675_504), "2026-11-26T06:45:04Z");
        assert_eq!(format_timestamp(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn client_cert_subject_gives_user_and_groups() {
        let ca = crate::pki::Ca::new("ca").expect("ca");
        let pair = ca
            .issue_client("alice", &["system:masters", "team-a"])
            .expect("client");
        let der = pem_to_der(&pair.cert_pem);
        let user = user_from_cert(&der).expect("user");
        assert_eq!(user.username, "alice");
        assert_eq!(
            user.groups,
            vec!["system:masters", "team-a", "system:authenticated"]
        );
        assert_eq!(cert_common_name(&der), "alice");
    }

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                http::HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn the_auth_record_counts_each_path_per_user() {
        let r = AuthRecord::default();
        r.record(AuthPath::Token, "alice");
        r.record(AuthPath::Token, "alice");
        r.record(AuthPath::RequestHeader, "alice");
        r.record(AuthPath::ClientCertificate, "bob");
        let alice = r.of("alice");
        assert_eq!(alice.get(&AuthPath::Token), Some(&2));
        assert_eq!(alice.get(&AuthPath::RequestHeader), Some(&1));
        assert_eq!(alice.len(), 2);
        assert_eq!(
            r.of("bob").into_iter().collect::<Vec<_>>(),
            [(AuthPath::ClientCertificate, 1)]
        );
        assert!(r.of("carol").is_empty());
    }

    #[test]
    fn front_proxy_headers_give_user_groups_and_extra() {
        let h = headers(&[
            ("X-Remote-User", "alice"),
            ("X-Remote-Group", "a"),
            ("X-Remote-Group", "b"),
            ("X-Remote-Extra-Scopes", "x"),
            ("X-Remote-Extra-Scopes", "y"),
            ("X-Remote-Extra-Example.com%2fKey", "z"),
        ]);
        let user = front_proxy_user(&h).expect("user");
        assert_eq!(user.username, "alice");
        assert_eq!(user.groups, ["a", "b", "system:authenticated"]);
        assert_eq!(user.extra["scopes"], ["x", "y"]);
        assert_eq!(user.extra["example.com/key"], ["z"]);
        assert!(front_proxy_user(&headers(&[("X-Remote-Group", "a")])).is_none());
        assert!(front_proxy_user(&headers(&[("X-Remote-User", "")])).is_none());
    }

    #[test]
    fn impersonation_headers_parse_like_the_apiserver() {
        let h = headers(&[
            ("Impersonate-User", "system:serviceaccount:demo:viewer"),
            ("Impersonate-Group", "g1"),
            ("Impersonate-Extra-Reason", "why"),
            ("Impersonate-Uid", "u-1"),
        ]);
        assert_eq!(
            impersonation_requests(&h).expect("ok"),
            vec![
                Impersonate::ServiceAccount {
                    namespace: "demo".into(),
                    name: "viewer".into()
                },
                Impersonate::Group("g1".into()),
                Impersonate::Extra {
                    key: "reason".into(),
                    value: "why".into()
                },
                Impersonate::Uid("u-1".into()),
            ]
        );
        let err =
            impersonation_requests(&headers(&[("Impersonate-Group", "g")])).expect_err("no user");
        assert!(err.ends_with("without impersonating a user"), "{err}");
        assert!(
            impersonation_requests(&headers(&[]))
                .expect("ok")
                .is_empty()
        );
        assert_eq!(
            impersonation_requests(&headers(&[("Impersonate-User", "system:serviceaccount:x")]))
                .expect("ok"),
            vec![Impersonate::User("system:serviceaccount:x".into())]
        );
    }

    fn pem_to_der(pem: &str) -> Vec<u8> {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .expect("pem")
            .to_vec()
    }
}
