//! Who is this token? Asked of the apiserver.
//!
//! With credentials of its own (`--upstream-token-file`, or a client
//! certificate) the proxy asks with a `TokenReview`. Without them it asks
//! "who am I" with the token itself, a `SelfSubjectReview`, which any valid
//! token may make, so passthrough deployments need no RBAC for the proxy.
//!
//! SelfSubjectReview is young: `authentication.k8s.io/v1` from Kubernetes
//! 1.28, `v1beta1` in 1.27 (on by default), `v1alpha1` in 1.26 (behind the
//! `APISelfSubjectReview` feature gate), and none before (a 404). As
//! `kubectl auth whoami` does, the proxy tries v1, then v1beta1, then
//! v1alpha1, and remembers the version that answered, and asks again after
//! [`RECHECK_ABSENT`] when none did, so an upgraded control plane is
//! noticed.
//!
//! Where none is served, a ServiceAccount token of the TokenRequest API (a
//! JWT with the `kubernetes.io` claim: projected tokens, `kubectl create
//! token`), or a legacy Secret token (issuer `kubernetes/serviceaccount`),
//! is identified with the apiserver's own ServiceAccount keys.
//! ServiceAccountIssuerDiscovery publishes them (`/openid/v1/jwks`, and the
//! issuer at `/.well-known/openid-configuration`, stable since 1.21), and
//! the bootstrap policy lets every ServiceAccount read them. The proxy
//! reads the keys *with the token*: a 200 says the apiserver accepts the
//! token now (its own checks, a deleted Pod's token included), a 401 that
//! it does not. Then the signature must verify with one of those keys and
//! the issuer must be the apiserver's, and the identity is the one the
//! apiserver derives from the claims. Like a review, the answer is cached
//! for [`crate::identity`]'s review TTL. Any other token gets 503 ("unable
//! to authenticate"), and the log says once what to configure (a
//! TokenReview credential, or local ServiceAccount keys).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::uri::PathAndQuery;
use http::{HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;

use super::{Route, Upstream, full};
use crate::error::Chain;
use crate::identity::jwt::{self, KeySet};
use crate::identity::{Identity, ReviewError, ReviewFuture, TokenReviewer};

/// SelfSubjectReview's versions, newest first (the order kubectl tries).
const SELF_SUBJECT_REVIEW_VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha1"];

/// After finding no SelfSubjectReview, how long the proxy takes that for
/// the answer before asking the apiserver again.
pub const RECHECK_ABSENT: Duration = Duration::from_secs(60);

/// The remedy, for the log and the review error.
const NO_SELF_SUBJECT_REVIEW: &str = "the apiserver serves no SelfSubjectReview \
     (authentication.k8s.io v1, v1beta1 or v1alpha1: Kubernetes before 1.27, or 1.26 \
     without the APISelfSubjectReview feature gate), so a bearer token other than a \
     ServiceAccount token (which is checked against the apiserver's published keys, \
     /openid/v1/jwks) cannot be identified with the token alone; give Breakwater a \
     credential that may create tokenreviews (--upstream-token-file, or \
     --upstream-client-cert and --upstream-client-key), or verify ServiceAccount \
     tokens locally (--service-account-key-file and --service-account-issuer)";

/// ServiceAccountIssuerDiscovery's key set and issuer document.
const JWKS_PATH: &str = "/openid/v1/jwks";
/// The only type the apiserver serves the key set as (RFC 7517 §8.5.1).
const JWKS_TYPE: &str = "application/jwk-set+json";
const JSON: &str = "application/json";
const OPENID_CONFIGURATION_PATH: &str = "/.well-known/openid-configuration";

/// Clock skew allowed when checking a token's times (the apiserver, which
/// accepted the token a moment before, has checked them too).
const ISSUER_KEYS_SKEW: u64 = 60;

/// Which SelfSubjectReview version the apiserver serves, as last seen.
#[derive(Debug, Default)]
pub(super) struct SelfSubjectReviews {
    seen: Mutex<Seen>,
    /// The apiserver's ServiceAccount keys, as last read (where it serves
    /// no SelfSubjectReview).
    issuer_keys: Mutex<Option<Arc<IssuerKeys>>>,
}

/// The apiserver's published ServiceAccount keys and issuer.
struct IssuerKeys {
    /// The key set as served, to tell a rotation.
    jwks: bytes::Bytes,
    issuer: String,
    keys: KeySet,
}

impl std::fmt::Debug for IssuerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerKeys")
            .field("issuer", &self.issuer)
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, Default)]
enum Seen {
    /// Not asked yet.
    #[default]
    Unknown,
    /// This index of [`SELF_SUBJECT_REVIEW_VERSIONS`] answered last.
    Version(usize),
    /// Every version answered 404, at this time.
    Absent(Instant),
}

impl SelfSubjectReviews {
    fn seen(&self) -> Seen {
        *self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records what the apiserver answered; logs when it changed.
    fn record(&self, now: Seen) {
        let before = std::mem::replace(
            &mut *self
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            now,
        );
        match (before, now) {
            (Seen::Version(a), Seen::Version(b)) if a == b => {}
            (_, Seen::Version(i)) => tracing::info!(
                version = SELF_SUBJECT_REVIEW_VERSIONS[i],
                "tokens are identified with the apiserver's SelfSubjectReview"
            ),
            // Said once per recheck (the previous verdict had expired).
            (_, Seen::Absent(_)) => tracing::warn!("{NO_SELF_SUBJECT_REVIEW}"),
            (_, Seen::Unknown) => {}
        }
    }

    /// The keys last read, if the key set served now is the same.
    fn issuer_keys(&self, jwks: &[u8]) -> Option<Arc<IssuerKeys>> {
        self.issuer_keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .filter(|k| k.jwks == jwks)
    }

    /// Keeps `keys`; logs a new issuer or key set.
    fn keep_issuer_keys(&self, keys: Arc<IssuerKeys>) {
        let before = self
            .issuer_keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .replace(keys.clone());
        if before.is_none_or(|b| b.jwks != keys.jwks) {
            tracing::info!(
                issuer = %keys.issuer,
                keys = keys.keys.len(),
                "ServiceAccount tokens are checked against the apiserver's published keys ({JWKS_PATH})"
            );
        }
    }

    /// The version to try first, or `None` while a recent look found none.
    fn first(&self) -> Option<usize> {
        match self.seen() {
            Seen::Unknown => Some(0),
            Seen::Version(i) => Some(i),
            Seen::Absent(at) if at.elapsed() < RECHECK_ABSENT => None,
            Seen::Absent(_) => Some(0),
        }
    }
}

/// No SelfSubjectReview, and the token cannot be identified otherwise:
/// the remedy, and `why` (empty, or "; " and the detail).
fn cannot_identify(why: &str) -> ReviewError {
    ReviewError::Failed(format!("{NO_SELF_SUBJECT_REVIEW}{why}"))
}

fn failed(e: &dyn std::error::Error) -> ReviewError {
    ReviewError::Failed(Chain(e).to_string())
}

/// The apiserver's answer to a review.
struct Answer {
    status: StatusCode,
    body: bytes::Bytes,
}

impl Upstream {
    /// POSTs a review `body` to `path` (or GETs `path` without one, asking
    /// for `accept`: the apiserver's go-restful routes answer 406 to an
    /// Accept that names neither their type nor `*/*`): with the proxy's
    /// own credentials, or, without them, with the client's `token` over
    /// the passthrough lanes (which present no certificate: the token
    /// speaks for itself).
    async fn ask(
        &self,
        path: &str,
        body: Option<&serde_json::Value>,
        accept: &'static str,
        token: Option<&str>,
    ) -> Result<Answer, ReviewError> {
        let pq: PathAndQuery = path.parse().map_err(|e| failed(&e))?;
        let req = Request::builder()
            .uri(self.uri_for(Some(&pq)))
            .header(http::header::ACCEPT, accept);
        let mut req = match body {
            Some(body) => req
                .method(http::Method::POST)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(full(serde_json::to_vec(body).map_err(|e| failed(&e))?)),
            None => req.body(full(Vec::new())),
        }
        .map_err(|e| failed(&e))?;
        let resp = match token {
            None => self.send_own(req).await,
            Some(token) => {
                let mut bearer = HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| ReviewError::Failed("token is not a valid header value".into()))?;
                bearer.set_sensitive(true);
                req.headers_mut()
                    .insert(http::header::AUTHORIZATION, bearer);
                let class = crate::slo::Class::new(
                    crate::slo::VerbClass::Other,
                    crate::slo::ResourceClass::None,
                );
                self.send(req, Route::client(class, false, false, false, false))
                    .await
            }
        }
        .map_err(|e| failed(&e))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| failed(&e))?
            .to_bytes();
        Ok(Answer { status, body })
    }

    /// TokenReview with the proxy's own credentials.
    async fn token_review(&self, token: &str) -> Result<Option<Identity>, ReviewError> {
        const PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token},
        });
        let answer = self.ask(PATH, Some(&body), JSON, None).await?;
        if !answer.status.is_success() {
            return Err(ReviewError::Failed(format!(
                "{PATH} answered {}",
                answer.status
            )));
        }
        let v: serde_json::Value = serde_json::from_slice(&answer.body).map_err(|e| failed(&e))?;
        if v["status"]["authenticated"].as_bool() != Some(true) {
            return Ok(None);
        }
        Ok(Some(identity_from_user_info(&v["status"]["user"])))
    }

    /// SelfSubjectReview made with the token, in the version the apiserver
    /// serves (see the module's documentation).
    async fn self_subject_review(&self, token: &str) -> Result<Option<Identity>, ReviewError> {
        let reviews = &self.self_subject_reviews;
        let Some(first) = reviews.first() else {
            return self.review_with_issuer_keys(token).await;
        };
        let n = SELF_SUBJECT_REVIEW_VERSIONS.len();
        for i in (0..n).map(|k| (first + k) % n) {
            let version = SELF_SUBJECT_REVIEW_VERSIONS[i];
            let path = format!("/apis/authentication.k8s.io/{version}/selfsubjectreviews");
            let body = serde_json::json!({
                "apiVersion": format!("authentication.k8s.io/{version}"),
                "kind": "SelfSubjectReview",
            });
            let answer = self.ask(&path, Some(&body), JSON, Some(token)).await?;
            // Authentication comes before routing in the apiserver: a bad
            // token is a 401 at any version, a 404 means "not served".
            if answer.status == StatusCode::NOT_FOUND {
                continue;
            }
            reviews.record(Seen::Version(i));
            if answer.status == StatusCode::UNAUTHORIZED {
                return Ok(None);
            }
            if !answer.status.is_success() {
                return Err(ReviewError::Failed(format!(
                    "{path} answered {}",
                    answer.status
                )));
            }
            let v: serde_json::Value =
                serde_json::from_slice(&answer.body).map_err(|e| failed(&e))?;
            return Ok(Some(identity_from_user_info(&v["status"]["userInfo"])));
        }
        reviews.record(Seen::Absent(Instant::now()));
        self.review_with_issuer_keys(token).await
    }

    /// A key set not seen before (`jwks`, as served): parsed, with the
    /// issuer its document names (read with `token`), and kept.
    async fn read_issuer_keys(
        &self,
        jwks: bytes::Bytes,
        token: &str,
    ) -> Result<Arc<IssuerKeys>, ReviewError> {
        let config = self
            .ask(OPENID_CONFIGURATION_PATH, None, JSON, Some(token))
            .await?;
        if !config.status.is_success() {
            return Err(cannot_identify(&format!(
                "; {OPENID_CONFIGURATION_PATH} answered {}",
                config.status
            )));
        }
        let config: serde_json::Value =
            serde_json::from_slice(&config.body).map_err(|e| failed(&e))?;
        let Some(issuer) = config["issuer"].as_str().filter(|i| !i.is_empty()) else {
            return Err(cannot_identify(&format!(
                "; {OPENID_CONFIGURATION_PATH} names no issuer"
            )));
        };
        let keys = KeySet::from_jwks(&jwks)
            .map_err(|e| ReviewError::Failed(format!("{JWKS_PATH}: {e}")))?;
        let keys = Arc::new(IssuerKeys {
            jwks,
            issuer: issuer.to_string(),
            keys,
        });
        self.self_subject_reviews.keep_issuer_keys(keys.clone());
        Ok(keys)
    }

    /// Where no SelfSubjectReview is served: a ServiceAccount token checked
    /// against the apiserver's published keys, read with the token itself
    /// (see the module's documentation).
    async fn review_with_issuer_keys(&self, token: &str) -> Result<Option<Identity>, ReviewError> {
        let Some(claims) =
            jwt::peek(token).filter(|c| c.names_service_account() || c.is_legacy_service_account())
        else {
            return Err(cannot_identify(""));
        };
        let answer = self.ask(JWKS_PATH, None, JWKS_TYPE, Some(token)).await?;
        if answer.status == StatusCode::UNAUTHORIZED {
            return Ok(None);
        }
        if !answer.status.is_success() {
            return Err(cannot_identify(&format!(
                "; {JWKS_PATH} answered {}",
                answer.status
            )));
        }
        let keys = match self.self_subject_reviews.issuer_keys(&answer.body) {
            Some(keys) => keys,
            None => self.read_issuer_keys(answer.body, token).await?,
        };
        let verified = if claims.is_legacy_service_account() {
            // Signed with one of these keys and accepted just now (so its
            // Secret exists).
            jwt::verify_legacy(token, claims, &keys.keys)
        } else {
            // The apiserver's ServiceAccount authenticator took it only if
            // its issuer is the apiserver's; another authenticator (OIDC)
            // may name users otherwise.
            if claims.iss != keys.issuer {
                return Err(cannot_identify(""));
            }
            // The apiserver accepted it, so its audience is one the
            // apiserver accepts.
            let audiences = claims.audiences().to_vec();
            jwt::verify(
                token,
                claims,
                &keys.keys,
                &audiences,
                jwt::now(),
                ISSUER_KEYS_SKEW,
            )
            .map(|v| v.identity)
        };
        match verified {
            Ok(identity) => Ok(Some(identity.with_authenticated_group())),
            Err(e) => Err(cannot_identify(&format!("; {}", Chain(&e)))),
        }
    }
}

/// TokenReview with the proxy's own credentials, else SelfSubjectReview
/// with the token itself.
impl TokenReviewer for Upstream {
    fn review<'a>(&'a self, token: &'a str) -> ReviewFuture<'a> {
        Box::pin(async move {
            if self.has_own_credentials() {
                self.token_review(token).await
            } else {
                self.self_subject_review(token).await
            }
        })
    }
}

/// `authentication.k8s.io/v1 UserInfo` → Identity.
fn identity_from_user_info(user: &serde_json::Value) -> Identity {
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let extra = user["extra"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), strings(v))).collect())
        .unwrap_or_default();
    Identity {
        username: user["username"].as_str().unwrap_or_default().to_string(),
        uid: user["uid"].as_str().unwrap_or_default().to_string(),
        groups: strings(&user["groups"]),
        extra,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_found_version_is_tried_first_and_an_absent_one_is_rechecked_later() {
        let r = SelfSubjectReviews::default();
        assert_eq!(r.first(), Some(0), "v1 first");
        r.record(Seen::Version(1));
        assert_eq!(r.first(), Some(1), "then the version that answered");
        r.record(Seen::Absent(Instant::now()));
        assert_eq!(r.first(), None, "none served: not asked again at once");
        let long_ago = Instant::now().checked_sub(RECHECK_ABSENT + Duration::from_secs(1));
        if let Some(at) = long_ago {
            r.record(Seen::Absent(at));
            assert_eq!(r.first(), Some(0), "asked again after the recheck time");
        }
    }
}
