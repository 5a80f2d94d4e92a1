//! Who is calling: the identity every request carries, found the way
//! kube-apiserver finds it.
//!
//! Limits and watch sharing key on this identity, so it has to be exactly the
//! one the apiserver would compute, and a caller must not be able to claim
//! somebody else's. The sources, in the apiserver's order:
//!
//! 1. a verified client certificate ([`x509`]): CN = username, each O = a
//!    group. A certificate wins over any token, as in the apiserver.
//! 2. `Authorization: Bearer <token>`:
//!    - a JWT whose `iss` is one of the configured ServiceAccount issuers is
//!      verified locally with the cluster's public keys ([`jwt`]); if that
//!      fails the request is refused (401) — never passed to TokenReview,
//!      never downgraded to anonymous — except when an RSA key under 2,048
//!      bits (loaded with a warning: ring cannot verify with it) may have
//!      signed it: the apiserver accepts those, so TokenReview decides;
//!    - any other token (OIDC, static, legacy secret-based SA tokens, JWTs
//!      of an issuer we are not configured for — the apiserver's union
//!      authenticator would try its other authenticators on those too) is
//!      asked about upstream with a TokenReview ([`review`]), cached by the
//!      token's SHA-256; the reviews are capped (in flight and per second),
//!      so a flood of random tokens costs the apiserver a trickle and its
//!      senders a 429.
//! 3. no credentials: `system:anonymous` if allowed, else 401.
//!
//! Every authenticated identity carries `system:authenticated`, as the
//! apiserver's group adder gives it. Tokens and key material never appear in
//! errors, logs or `Debug` output.

pub(crate) mod jwt;
mod memo;
mod review;
#[cfg(test)]
mod tests;
mod x509;

use std::collections::BTreeMap;
use std::future::Future;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

pub use memo::TokenMemo;

use crate::error::Chain;

/// The group every authenticated user is in.
pub const AUTHENTICATED_GROUP: &str = "system:authenticated";
/// The group the anonymous user is in.
pub const UNAUTHENTICATED_GROUP: &str = "system:unauthenticated";
/// The anonymous user's name.
pub const ANONYMOUS_USER: &str = "system:anonymous";
/// The `extra` key of the Pod a bound ServiceAccount token was issued for.
pub const POD_NAME_EXTRA: &str = jwt::POD_NAME_KEY;
/// The `extra` key of the node a bound token's Pod runs on (1.30+).
pub const NODE_NAME_EXTRA: &str = jwt::NODE_NAME_KEY;
/// The prefix of every ServiceAccount username.
pub const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// Who is calling. Shared per request as `Arc<Identity>` (in `http::Extensions`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl Identity {
    /// `system:anonymous` in `system:unauthenticated`, as the apiserver names
    /// a request without credentials.
    pub fn anonymous() -> Identity {
        Identity {
            username: ANONYMOUS_USER.to_string(),
            uid: String::new(),
            groups: vec![UNAUTHENTICATED_GROUP.to_string()],
            extra: BTreeMap::new(),
        }
    }

    /// `Some((namespace, name))` for `system:serviceaccount:NS:NAME` users.
    pub fn service_account(&self) -> Option<(&str, &str)> {
        let rest = self.username.strip_prefix(SERVICE_ACCOUNT_PREFIX)?;
        let (ns, name) = rest.split_once(':')?;
        // The apiserver's SplitUsername wants exactly two non-empty parts.
        if ns.is_empty() || name.is_empty() || name.contains(':') {
            return None;
        }
        Some((ns, name))
    }

    /// Whether this is the anonymous user.
    pub fn is_anonymous(&self) -> bool {
        self.username == ANONYMOUS_USER
    }

    /// Adds `system:authenticated` unless present, as the apiserver's
    /// `AuthenticatedGroupAdder` does for every authenticated user.
    pub(crate) fn with_authenticated_group(mut self) -> Identity {
        if !self.groups.iter().any(|g| g == AUTHENTICATED_GROUP) {
            self.groups.push(AUTHENTICATED_GROUP.to_string());
        }
        self
    }
}

/// How callers are authenticated.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// PEM files with public keys (RSA or EC; several per file allowed;
    /// certificates' public keys too) and/or JWKS JSON files (detected by
    /// content).
    pub service_account_key_files: Vec<PathBuf>,
    /// Accepted `iss` values; empty = local SA verification disabled (every
    /// token goes to TokenReview).
    pub service_account_issuers: Vec<String>,
    /// Accepted audiences (`aud` must intersect); empty = the issuers (the
    /// apiserver's default `--api-audiences`).
    pub api_audiences: Vec<String>,
    /// Allow requests without credentials as `system:anonymous` (else
    /// [`AuthError::NoCredentials`] → 401).
    pub anonymous: bool,
    /// How long an authenticated TokenReview answer is reused.
    pub review_ttl: Duration,
    /// How long a "not authenticated" TokenReview answer is reused.
    pub review_negative_ttl: Duration,
    /// Most cached TokenReview answers (and, separately, most cached local
    /// JWT verifications).
    pub review_cache_size: u64,
    /// Tolerance for `exp`, `nbf` and `iat`.
    pub clock_skew: Duration,
    /// Most TokenReviews (and SelfSubjectReviews) in flight upstream at once;
    /// past it a new token gets 429 at once.
    pub review_max_concurrent: NonZeroUsize,
    /// TokenReviews started per second, sustained; past it a new token gets
    /// 429 with the wait in `Retry-After`.
    pub review_rate: NonZeroU32,
    /// TokenReviews that may start at once after a quiet spell.
    pub review_burst: NonZeroU32,
}

impl Default for AuthConfig {
    fn default() -> AuthConfig {
        AuthConfig {
            service_account_key_files: Vec::new(),
            service_account_issuers: Vec::new(),
            api_audiences: Vec::new(),
            anonymous: true,
            // The apiserver's webhook token authenticator caches for 2 min
            // (--authentication-token-webhook-cache-ttl); negative answers
            // briefly so a freshly created token soon works.
            review_ttl: Duration::from_secs(120),
            review_negative_ttl: Duration::from_secs(10),
            review_cache_size: 100_000,
            clock_skew: Duration::from_secs(60),
            // A review is one small POST the apiserver answers in
            // milliseconds: 8 at once and 100/s cover a cluster's new
            // tokens (each reviewed once per TTL) with room, and keep a
            // flood of random tokens to a trickle upstream.
            review_max_concurrent: NonZeroUsize::new(8).expect("8 is not zero"),
            review_rate: NonZeroU32::new(100).expect("100 is not zero"),
            review_burst: NonZeroU32::new(20).expect("20 is not zero"),
        }
    }
}

/// The future a [`TokenReviewer`] returns.
pub type ReviewFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Option<Identity>, ReviewError>> + Send + 'a>>;

/// Validates a bearer token upstream (the proxy implements it with a
/// TokenReview POST).
pub trait TokenReviewer: Send + Sync + 'static {
    /// `Ok(Some(identity))` authenticated; `Ok(None)` the apiserver says not
    /// authenticated; `Err` = could not ask.
    fn review<'a>(&'a self, token: &'a str) -> ReviewFuture<'a>;
}

/// Asking upstream about a token failed (not: the token is bad).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReviewError {
    #[error("token review failed: {0}")]
    Failed(String),
}

/// Why a request could not be authenticated. Reasons are for the log; none
/// carries a token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials and anonymous requests are disabled")]
    NoCredentials,
    #[error("invalid bearer token: {0}")]
    InvalidToken(String),
    #[error("unsupported Authorization scheme (only Bearer is accepted)")]
    Unsupported,
    #[error(
        "token is not a ServiceAccount token of a configured issuer and no TokenReview is configured"
    )]
    CannotVerify,
    #[error("token review unavailable: {0}")]
    ReviewUnavailable(String),
    /// Over the TokenReview caps: the token was not asked about.
    #[error("{reason}")]
    Throttled {
        reason: String,
        retry_after_secs: u64,
    },
}

impl AuthError {
    /// The HTTP status: 401, except 503 when the upstream could not be asked
    /// and 429 when the proxy would not ask it (in both the token may well be
    /// good; the client should retry).
    pub fn status_code(&self) -> u16 {
        match self {
            AuthError::ReviewUnavailable(_) => 503,
            AuthError::Throttled { .. } => 429,
            _ => 401,
        }
    }

    /// For a 429: when to retry, in seconds.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            AuthError::Throttled {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        }
    }

    /// The message for the client's Status: the apiserver says only
    /// "Unauthorized", so nothing about the token leaks.
    pub fn client_message(&self) -> &'static str {
        match self {
            AuthError::ReviewUnavailable(_) => {
                "the server is currently unable to authenticate the request"
            }
            AuthError::Throttled { .. } => "Too many requests, please try again later.",
            _ => "Unauthorized",
        }
    }
}

/// Loading ServiceAccount keys or reading a certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("reading service account key file {path}")]
    ReadKeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("service account key file {path}: {reason}")]
    ParseKeyFile { path: PathBuf, reason: String },
    #[error("service account issuers are configured but no key file is")]
    NoKeys,
    #[error("client certificate: {0}")]
    Certificate(String),
}

/// Resolves the [`Identity`] of each request. Cheap to share (`Arc`); keys
/// swap atomically on [`Authenticator::reload_keys`].
pub struct Authenticator {
    /// The verified client-certificate and anonymous paths need nothing;
    /// kept whole for reloads.
    cfg: AuthConfig,
    /// Precomputed so each request checks without allocating.
    audiences: Vec<String>,
    keys: ArcSwap<jwt::KeySet>,
    /// Locally verified SA tokens by SHA-256, so a busy client costs one
    /// signature check per TTL rather than per request.
    verified: review::VerifiedCache,
    reviews: review::ReviewCache,
    reviewer: Option<Arc<dyn TokenReviewer>>,
    anonymous: Arc<Identity>,
    /// Bumped when the keys reload: every connection's [`TokenMemo`] is
    /// stale from then on.
    generation: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print keys or cached token hashes.
        f.debug_struct("Authenticator")
            .field("issuers", &self.cfg.service_account_issuers)
            .field("audiences", &self.audiences)
            .field("keys", &self.keys.load().len())
            .field("reviewer", &self.reviewer.is_some())
            .field("anonymous", &self.cfg.anonymous)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Loads the SA keys (when issuers are configured) and sets up the caches.
    pub fn new(
        cfg: AuthConfig,
        reviewer: Option<Arc<dyn TokenReviewer>>,
    ) -> Result<Authenticator, IdentityError> {
        let keys = if cfg.service_account_issuers.is_empty() {
            jwt::KeySet::default()
        } else {
            if cfg.service_account_key_files.is_empty() {
                return Err(IdentityError::NoKeys);
            }
            jwt::KeySet::load(&cfg.service_account_key_files)?
        };
        let audiences = if cfg.api_audiences.is_empty() {
            cfg.service_account_issuers.clone()
        } else {
            cfg.api_audiences.clone()
        };
        Ok(Authenticator {
            verified: review::VerifiedCache::new(cfg.review_cache_size, cfg.review_ttl),
            reviews: review::ReviewCache::new(
                cfg.review_cache_size,
                cfg.review_ttl,
                cfg.review_negative_ttl,
                review::ReviewCaps::new(
                    cfg.review_max_concurrent,
                    cfg.review_rate,
                    cfg.review_burst,
                ),
            ),
            keys: ArcSwap::from_pointee(keys),
            audiences,
            reviewer,
            anonymous: Arc::new(Identity::anonymous()),
            generation: Default::default(),
            cfg,
        })
    }

    /// Re-reads the SA key files; on error the old keys stay and the error is
    /// returned.
    pub fn reload_keys(&self) -> Result<(), IdentityError> {
        if self.cfg.service_account_issuers.is_empty() {
            return Ok(());
        }
        let keys = jwt::KeySet::load(&self.cfg.service_account_key_files)?;
        self.keys.store(Arc::new(keys));
        // A key may have been withdrawn: tokens it signed must stop working
        // now, not when their cache entry expires.
        self.verified.clear();
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// The identity a verified client certificate carries: CN = username,
    /// each O = a group, plus `system:authenticated`. Err if no CN.
    pub fn from_certificate(
        leaf: &rustls_pki_types::CertificateDer<'_>,
    ) -> Result<Identity, IdentityError> {
        x509::identity(leaf.as_ref()).map(Identity::with_authenticated_group)
    }

    /// Whether `identity` is the one given to a request without credentials
    /// (nothing verified it: the apiserver must decide about such a request
    /// itself).
    pub fn is_unverified(&self, identity: &Arc<Identity>) -> bool {
        Arc::ptr_eq(identity, &self.anonymous)
    }

    /// [`Authenticator::authenticate`] for a request of the connection whose
    /// memo is `memo`: a bearer token that connection presented under a
    /// second ago names the same identity without hashing or a cache lookup.
    /// `now`: the request's arrival, the memo's clock (the caller has read
    /// it already).
    pub async fn authenticate_on(
        &self,
        memo: Option<&TokenMemo>,
        cert: Option<&Arc<Identity>>,
        headers: &http::HeaderMap,
        now: std::time::Instant,
    ) -> Result<Arc<Identity>, AuthError> {
        if let Some(cert) = cert {
            return Ok(cert.clone());
        }
        let Some(memo) = memo else {
            return Box::pin(self.authenticate(None, headers)).await;
        };
        let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
        let header = match (values.next(), values.next()) {
            (Some(header), None) => header,
            // Boxed here and below: the full path's future is large, and
            // every request's handler would carry room for it.
            _ => return Box::pin(self.authenticate(None, headers)).await,
        };
        let generation = self.generation.load(std::sync::atomic::Ordering::Acquire);
        if let Some(identity) = memo.get(header, generation, now) {
            return Ok(identity);
        }
        let identity = Box::pin(self.authenticate(None, headers)).await?;
        if !self.is_unverified(&identity) {
            memo.set(header, &identity, generation, now);
        }
        Ok(identity)
    }

    /// The caller's identity: the connection's certificate identity if any,
    /// else the bearer token's, else anonymous (if allowed).
    pub async fn authenticate(
        &self,
        cert: Option<&Arc<Identity>>,
        headers: &http::HeaderMap,
    ) -> Result<Arc<Identity>, AuthError> {
        // x509 wins over tokens, like the apiserver's union (certificates
        // are tried first).
        if let Some(cert) = cert {
            return Ok(cert.clone());
        }
        let Some(token) = bearer_token(headers)? else {
            return if self.cfg.anonymous {
                Ok(self.anonymous.clone())
            } else {
                Err(AuthError::NoCredentials)
            };
        };
        let hash = review::token_hash(token);
        if !self.cfg.service_account_issuers.is_empty() {
            // A token verified a moment ago needs no parsing at all.
            if let Some(hit) = self.verified.get(&hash).await
                && jwt::now() <= hit.exp.saturating_add(self.cfg.clock_skew.as_secs())
            {
                return Ok(hit.identity);
            }
            if let Some(claims) = jwt::peek(token)
                && self.cfg.service_account_issuers.contains(&claims.iss)
            {
                return self.verify_local(token, hash, claims).await;
            }
        }
        let Some(reviewer) = &self.reviewer else {
            return Err(AuthError::CannotVerify);
        };
        self.reviews.review(hash, reviewer.as_ref(), token).await
    }

    /// Verifies a ServiceAccount JWT of a configured issuer and remembers
    /// the answer until the token expires or the TTL passes.
    async fn verify_local(
        &self,
        token: &str,
        hash: [u8; 32],
        claims: jwt::Peeked,
    ) -> Result<Arc<Identity>, AuthError> {
        let now = jwt::now();
        let keys = self.keys.load();
        let verified = match jwt::verify(
            token,
            claims,
            &keys,
            &self.audiences,
            now,
            self.cfg.clock_skew.as_secs(),
        ) {
            Ok(verified) => verified,
            // A key too short for ring may have signed it (the apiserver
            // accepts such keys): the apiserver decides, as for a token of
            // an issuer we do not verify.
            Err(jwt::JwtError::ShortKey) if self.reviewer.is_some() => {
                drop(keys);
                let reviewer = self.reviewer.as_deref().expect("checked just above");
                return self.reviews.review(hash, reviewer, token).await;
            }
            Err(e) => return Err(AuthError::InvalidToken(Chain(&e).to_string())),
        };
        let identity = Arc::new(verified.identity.with_authenticated_group());
        self.verified
            .insert(hash, identity.clone(), verified.exp, now)
            .await;
        Ok(identity)
    }
}

/// The bearer token of `Authorization`, as the apiserver's bearer
/// authenticator reads it: scheme case-insensitive, the token the second
/// space-separated part. `Ok(None)` when there is no header at all.
fn bearer_token(headers: &http::HeaderMap) -> Result<Option<&str>, AuthError> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    // Two Authorization headers could mean one identity here and another
    // upstream; refuse rather than guess.
    if values.next().is_some() {
        return Err(AuthError::InvalidToken(
            "more than one Authorization header".into(),
        ));
    }
    let value = value
        .to_str()
        .map_err(|_| AuthError::InvalidToken("Authorization is not visible ASCII".into()))?
        .trim();
    if value.is_empty() {
        return Ok(None);
    }
    let mut parts = value.splitn(3, ' ');
    let scheme = parts.next().unwrap_or_default();
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Unsupported);
    }
    match parts.next() {
        Some(token) if !token.is_empty() => Ok(Some(token)),
        _ => Err(AuthError::InvalidToken("empty bearer token".into())),
    }
}
