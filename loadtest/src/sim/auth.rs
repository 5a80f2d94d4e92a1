//! Who is calling kube-sim, and the authentication/authorization review APIs.
//!
//! kube-sim authenticates like the apiserver: an x509 client certificate
//! signed by the client CA first (CN = user, each O = a group), then a
//! `Bearer` ServiceAccount token (an ES256 JWT signed with the sim's SA key,
//! shaped like the ones `kubectl create token` returns; see
//! fixtures/serviceaccount-token-claims.json). The same module answers
//! TokenRequest (`serviceaccounts/{name}/token`), TokenReview,
//! SelfSubjectReview (`kubectl auth whoami`) and the access reviews, which
//! allow everything for now (there is no RBAC in kube-sim yet).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The `kid` of every token kube-sim signs (it has one signing key).
const KEY_ID: &str = "kube-sim";

/// The apiserver's minimum TokenRequest lifetime.
const MIN_TOKEN_SECONDS: i64 = 600;

/// The apiserver's default TokenRequest lifetime.
const DEFAULT_TOKEN_SECONDS: i64 = 3600;

/// An authenticated caller, as the apiserver's `user.Info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserInfo {
    pub username: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub uid: String,
    pub groups: Vec<String>,
}

/// Why credentials were refused (logged, never sent: the client gets a bare 401).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid service account key: {0}")]
    Key(#[source] jsonwebtoken::errors::Error),
    #[error("invalid bearer token: {0}")]
    Token(#[source] jsonwebtoken::errors::Error),
    #[error("token subject {0:?} is not a service account")]
    Subject(String),
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ObjectRef {
    name: String,
    #[serde(default)]
    uid: String,
}

/// Signs and verifies ServiceAccount tokens.
pub struct Authenticator {
    encoding: EncodingKey,
    decoding: DecodingKey,
    issuer: String,
    api_audiences: Vec<String>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Authenticator")
            .field("issuer", &self.issuer)
            .field("api_audiences", &self.api_audiences)
            .finish_non_exhaustive()
    }
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
            issuer,
            api_audiences,
        })
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
            },
            nbf: now,
            sub: format!("system:serviceaccount:{namespace}:{name}"),
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(KEY_ID.to_string());
        let token =
            jsonwebtoken::encode(&header, &claims, &self.encoding).map_err(AuthError::Token)?;
        Ok(IssuedToken {
            token,
            expires_at: exp,
        })
    }

    /// Verifies a bearer token against the API audiences.
    pub fn authenticate(&self, token: &str) -> Result<UserInfo, AuthError> {
        self.verify(token, &self.api_audiences)
            .map(|(user, _)| user)
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
        let matched = claims
            .aud
            .iter()
            .filter(|a| audiences.contains(a))
            .cloned()
            .collect();
        Ok((
            UserInfo {
                username: claims.sub.clone(),
                uid: claims.kubernetes.serviceaccount.uid.clone(),
                groups: vec![
                    "system:serviceaccounts".to_string(),
                    format!("system:serviceaccounts:{ns}"),
                    "system:authenticated".to_string(),
                ],
            },
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
            .issue(
                namespace,
                name,
                sa_uid,
                &audiences,
                Duration::from_secs(seconds.unsigned_abs()),
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
                tracing::debug!(error = %e, "token review refused a token");
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
    #[error("signing failed: {0}")]
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
    let mut groups: Vec<String> = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_string))
        .collect();
    groups.push("system:authenticated".to_string());
    Some(UserInfo {
        username,
        uid: String::new(),
        groups,
    })
}

/// The SelfSubjectReview answer (`kubectl auth whoami`).
pub fn self_subject_review(body: &Value, user: &UserInfo) -> Value {
    let mut out = review_echo(body, "SelfSubjectReview", "authentication.k8s.io/v1");
    out["status"] = json!({ "userInfo": user });
    out
}

/// The SubjectAccessReview / SelfSubjectAccessReview answer: allowed, since
/// kube-sim has no RBAC yet (shape: fixtures/subjectaccessreview.body).
pub fn access_review(body: &Value, kind: &str, api_version: &str) -> Value {
    let mut out = review_echo(body, kind, api_version);
    out["status"] = json!({ "allowed": true });
    out
}

/// The request body with kind/apiVersion set, `metadata.creationTimestamp`
/// null (reviews are never stored) and any client-sent status dropped.
fn review_echo(body: &Value, kind: &str, api_version: &str) -> Value {
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
        // One O: pki::Ca::issue_client keeps only the last O (rcgen's
        // DistinguishedName replaces entries of the same type).
        let pair = ca
            .issue_client("alice", &["system:masters"])
            .expect("client");
        let der = pem_to_der(&pair.cert_pem);
        let user = user_from_cert(&der).expect("user");
        assert_eq!(user.username, "alice");
        assert_eq!(user.groups, vec!["system:masters", "system:authenticated"]);
    }

    fn pem_to_der(pem: &str) -> Vec<u8> {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .expect("pem")
            .to_vec()
    }
}
