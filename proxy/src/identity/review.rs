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
//!
//! A flood of distinct unknown tokens must not become a TokenReview flood
//! against the apiserver we protect, and it arrives before any limit can
//! apply (limits key on the identity the review finds). So the reviews
//! themselves are capped ([`ReviewCaps`]): at most `review_max_concurrent`
//! at once and `review_rate` per second (burst `review_burst`). Over a cap
//! the caller gets 429 with `Retry-After` at once, never a queue, and the
//! refusal is not cached: the same token asks again on its next request.
//! The caps are taken inside moka's init future, so the callers that share
//! one review share its slot too; cached answers and locally verified
//! ServiceAccount tokens never reach them.

use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, SemaphorePermit};

use super::{AuthError, Identity, ReviewError, TokenReviewer};
use crate::error::Chain;
use crate::pacing::{self, DirectLimiter};

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

/// Why a review did not give an answer. Neither is cached.
#[derive(Debug, thiserror::Error)]
enum NoAnswer {
    /// Over a cap: not asked at all.
    #[error("too many token reviews ({cap}); retry in {retry_after_secs}s")]
    Throttled {
        cap: &'static str,
        retry_after_secs: u64,
    },
    #[error(transparent)]
    Failed(#[from] ReviewError),
}

/// The bounds on the reviews the proxy asks upstream: slots for reviews in
/// flight, and a rate for starting them.
pub(crate) struct ReviewCaps {
    slots: Semaphore,
    rate: DirectLimiter,
}

impl ReviewCaps {
    pub(crate) fn new(concurrent: NonZeroUsize, per_second: NonZeroU32, burst: NonZeroU32) -> Self {
        ReviewCaps {
            slots: Semaphore::new(concurrent.get()),
            rate: pacing::direct(per_second, burst),
        }
    }

    /// A slot for one review, or a refusal at once. The slot first: it is
    /// given back when the review ends, while a token of the rate is spent
    /// for good, so a review refused for want of a slot costs no token.
    fn take(&self) -> Result<SemaphorePermit<'_>, NoAnswer> {
        // The semaphore is never closed: the only error is "no permit left".
        let Ok(slot) = self.slots.try_acquire() else {
            metrics::counter!("breakwater_token_reviews_refused_total", "reason" => "concurrency")
                .increment(1);
            // Reviews take milliseconds; a second is plenty for one to end.
            return Err(NoAnswer::Throttled {
                cap: "concurrency",
                retry_after_secs: 1,
            });
        };
        if let Err(refused) = self.rate.check() {
            metrics::counter!("breakwater_token_reviews_refused_total", "reason" => "rate")
                .increment(1);
            return Err(NoAnswer::Throttled {
                cap: "rate",
                retry_after_secs: pacing::retry_after_secs(&refused, self.rate.clock()),
            });
        }
        Ok(slot)
    }
}

/// TokenReview answers by token hash, with concurrent lookups coalesced and
/// the reviews themselves capped.
pub(crate) struct ReviewCache {
    cache: Cache<[u8; 32], CachedReview>,
    caps: ReviewCaps,
}

impl ReviewCache {
    pub(crate) fn new(
        capacity: u64,
        positive: Duration,
        negative: Duration,
        caps: ReviewCaps,
    ) -> ReviewCache {
        ReviewCache {
            cache: Cache::builder()
                .max_capacity(capacity)
                .expire_after(ReviewExpiry { positive, negative })
                .build(),
            caps,
        }
    }

    /// The cached answer for `hash`, or one review of `token` shared by every
    /// concurrent caller with the same token (within the caps).
    pub(crate) async fn review(
        &self,
        hash: [u8; 32],
        reviewer: &dyn TokenReviewer,
        token: &str,
    ) -> Result<Arc<Identity>, AuthError> {
        let answer = self
            .cache
            .try_get_with(hash, async {
                // Only the caller that runs the review gets here: the
                // ones coalesced onto it take no slot of their own.
                let _slot = self.caps.take()?;
                let answer = reviewer.review(token).await;
                let result = match &answer {
                    Ok(Some(_)) => "authenticated",
                    Ok(None) => "rejected",
                    Err(_) => "error",
                };
                metrics::counter!("breakwater_token_reviews_total", "result" => result)
                    .increment(1);
                match answer? {
                    Some(identity) => Ok(CachedReview::Authenticated(Arc::new(
                        identity.with_authenticated_group(),
                    ))),
                    None => Ok::<_, NoAnswer>(CachedReview::Rejected),
                }
            })
            .await;
        match answer {
            Ok(CachedReview::Authenticated(identity)) => Ok(identity),
            Ok(CachedReview::Rejected) => Err(AuthError::InvalidToken(
                "token review: not authenticated".into(),
            )),
            Err(err) => Err(match &*err {
                NoAnswer::Throttled {
                    retry_after_secs, ..
                } => AuthError::Throttled {
                    reason: err.to_string(),
                    retry_after_secs: *retry_after_secs,
                },
                NoAnswer::Failed(failed) => AuthError::ReviewUnavailable(Chain(failed).to_string()),
            }),
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
