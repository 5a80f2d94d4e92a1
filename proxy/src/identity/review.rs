//! Caches for token answers, keyed by the SHA-256 of the token so that the
//! token itself is never kept (a heap dump of the proxy holds no credentials
//! beyond those in flight).
//!
//! - [`ReviewCache`]: TokenReview answers. A storm of clients presenting the
//!   same new token (a DaemonSet restarting) costs ONE review: moka's
//!   `try_get_with` makes concurrent lookups of one key wait for a single
//!   init future. Authenticated answers live `review_ttl`, "not
//!   authenticated" `review_negative_ttl` (so a token created a moment later
//!   starts working soon); failures to ask are not cached, so the next
//!   request asks again.
//! - [`VerifiedCache`]: locally verified ServiceAccount JWTs, so a busy
//!   client pays one signature check per TTL. An entry never outlives the
//!   token's `exp`, and the whole cache is dropped when the keys reload.
//!
//! Both are bounded by `review_cache_size` entries (moka evicts by
//! TinyLFU when full, so a flood of one-off tokens cannot push out the hot
//! ones).

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;
use sha2::{Digest, Sha256};

use super::{AuthError, Identity, TokenReviewer};
use crate::error::Chain;

/// The cache key of a token.
pub(crate) fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A TokenReview answer worth remembering.
#[derive(Clone)]
enum CachedReview {
    Authenticated(Arc<Identity>),
    Rejected,
}

/// Per-entry lifetimes: positive and negative answers age differently.
struct ReviewExpiry {
    positive: Duration,
    negative: Duration,
}

impl Expiry<[u8; 32], CachedReview> for ReviewExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &CachedReview,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(match value {
            CachedReview::Authenticated(_) => self.positive,
            CachedReview::Rejected => self.negative,
        })
    }
}

/// TokenReview answers by token hash, with concurrent lookups coalesced.
pub(crate) struct ReviewCache {
    cache: Cache<[u8; 32], CachedReview>,
}

impl ReviewCache {
    pub(crate) fn new(capacity: u64, positive: Duration, negative: Duration) -> ReviewCache {
        ReviewCache {
            cache: Cache::builder()
                .max_capacity(capacity)
                .expire_after(ReviewExpiry { positive, negative })
                .build(),
        }
    }

    /// The cached answer for `hash`, or one review of `token` shared by every
    /// concurrent caller with the same token.
    pub(crate) async fn review(
        &self,
        hash: [u8; 32],
        reviewer: &dyn TokenReviewer,
        token: &str,
    ) -> Result<Arc<Identity>, AuthError> {
        let answer = self
            .cache
            .try_get_with(hash, async {
                match reviewer.review(token).await? {
                    Some(identity) => Ok(CachedReview::Authenticated(Arc::new(
                        identity.with_authenticated_group(),
                    ))),
                    None => Ok::<_, super::ReviewError>(CachedReview::Rejected),
                }
            })
            .await;
        match answer {
            Ok(CachedReview::Authenticated(identity)) => Ok(identity),
            Ok(CachedReview::Rejected) => Err(AuthError::InvalidToken(
                "token review: not authenticated".into(),
            )),
            Err(err) => Err(AuthError::ReviewUnavailable(Chain(&err).to_string())),
        }
    }
}

/// A locally verified token.
#[derive(Clone)]
pub(crate) struct LocalHit {
    pub(crate) identity: Arc<Identity>,
    /// The token's `exp`, re-checked on every hit.
    pub(crate) exp: u64,
    /// How long the entry lives: the TTL, or less if the token expires sooner.
    ttl: Duration,
}

struct LocalExpiry;

impl Expiry<[u8; 32], LocalHit> for LocalExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &LocalHit,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// Locally verified ServiceAccount tokens by token hash.
pub(crate) struct VerifiedCache {
    cache: Cache<[u8; 32], LocalHit>,
    ttl: Duration,
}

impl VerifiedCache {
    pub(crate) fn new(capacity: u64, ttl: Duration) -> VerifiedCache {
        VerifiedCache {
            cache: Cache::builder()
                .max_capacity(capacity)
                .expire_after(LocalExpiry)
                .build(),
            ttl,
        }
    }

    pub(crate) async fn get(&self, hash: &[u8; 32]) -> Option<LocalHit> {
        self.cache.get(hash).await
    }

    /// Remembers a verification made at `now` of a token expiring at `exp`.
    pub(crate) async fn insert(&self, hash: [u8; 32], identity: Arc<Identity>, exp: u64, now: u64) {
        let left = Duration::from_secs(exp.saturating_sub(now));
        let ttl = self.ttl.min(left);
        if ttl.is_zero() {
            return;
        }
        self.cache
            .insert(hash, LocalHit { identity, exp, ttl })
            .await;
    }

    /// Forgets every verification (the keys changed).
    pub(crate) fn clear(&self) {
        self.cache.invalidate_all();
    }
}
