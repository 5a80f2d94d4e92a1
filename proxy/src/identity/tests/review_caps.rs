//! The TokenReview caps: a flood of distinct unknown tokens costs the
//! apiserver at most the concurrent cap plus the rate's burst, the rest get
//! 429 at once; coalesced callers share one slot; cached answers and local
//! ServiceAccount tokens never touch the caps.

use std::num::{NonZeroU32, NonZeroUsize};

use super::*;

fn caps(concurrent: usize, rate: u32, burst: u32) -> AuthConfig {
    AuthConfig {
        review_max_concurrent: NonZeroUsize::new(concurrent).expect("non-zero"),
        review_rate: NonZeroU32::new(rate).expect("non-zero"),
        review_burst: NonZeroU32::new(burst).expect("non-zero"),
        ..AuthConfig::default()
    }
}

fn retry_after(result: &Result<Arc<Identity>, AuthError>) -> Option<u64> {
    match result {
        Err(err @ AuthError::Throttled { .. }) => {
            assert_eq!(err.status_code(), 429);
            err.retry_after_secs()
        }
        _ => None,
    }
}

/// Lets the held reviews go once `ready` says the callers are where the
/// test wants them (bounded: a stuck test fails instead of hanging).
async fn release_when(reviewer: &FakeReviewer, reviews: usize, ready: impl Fn() -> bool) {
    for _ in 0..100_000 {
        if ready() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(ready(), "callers never got where the test wanted them");
    let gate = reviewer.gate.as_ref().expect("gated");
    for _ in 0..reviews {
        gate.notify_one();
    }
}

#[tokio::test(start_paused = true)]
async fn five_hundred_random_tokens_make_eight_reviews_and_the_rest_get_429_at_once() {
    let reviewer = FakeReviewer::new(Ok(Some(alice())), true);
    let auth = reviewed(AuthConfig::default(), &reviewer);
    let refused = AtomicUsize::new(0);
    let all = futures_util::future::join_all((0..500).map(|i| {
        let (auth, refused) = (&auth, &refused);
        async move {
            let result = auth
                .authenticate(None, &bearer(&format!("random-{i}")))
                .await;
            if retry_after(&result).is_some() {
                refused.fetch_add(1, Ordering::SeqCst);
            }
            result
        }
    }));
    // Every refusal comes back while the eight reviews are still held: no
    // caller queues behind them.
    let release = release_when(&reviewer, 8, || refused.load(Ordering::SeqCst) == 492);
    let (results, ()) = tokio::join!(all, release);
    assert_eq!(reviewer.calls(), 8);
    let authenticated = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(authenticated, 8);
    for r in &results {
        if r.is_err() {
            assert_eq!(retry_after(r), Some(1), "{r:?}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn reviews_past_the_rate_get_429_until_the_bucket_refills() {
    let reviewer = FakeReviewer::new(Ok(Some(alice())), false);
    let auth = reviewed(caps(8, 5, 5), &reviewer);
    for i in 0..5 {
        auth.authenticate(None, &bearer(&format!("t-{i}")))
            .await
            .expect("within the burst");
    }
    let late = bearer("late-token");
    let first = auth.authenticate(None, &late).await;
    let wait = retry_after(&first).expect("over the rate");
    assert_eq!(wait, 1);
    // The 429 is not remembered as "not authenticated", and asking again
    // before the wait costs the apiserver nothing.
    assert!(retry_after(&auth.authenticate(None, &late).await).is_some());
    assert_eq!(reviewer.calls(), 5);
    // Once the bucket has refilled as long as Retry-After said, the same
    // token is reviewed and works.
    tokio::time::advance(Duration::from_secs(wait)).await;
    assert_eq!(
        *auth.authenticate(None, &late).await.expect("refilled"),
        alice()
    );
    assert_eq!(reviewer.calls(), 6);
}

#[tokio::test(start_paused = true)]
async fn callers_of_one_new_token_share_one_review_slot() {
    let reviewer = FakeReviewer::new(Ok(Some(alice())), true);
    let auth = reviewed(caps(1, 100, 20), &reviewer);
    let same = bearer("shared-new-token");
    let entered = AtomicUsize::new(0);
    let shared = futures_util::future::join_all((0..100).map(|_| async {
        entered.fetch_add(1, Ordering::SeqCst);
        auth.authenticate(None, &same).await
    }));
    let other = async {
        release_when(&reviewer, 0, || {
            entered.load(Ordering::SeqCst) == 100 && reviewer.calls() == 1
        })
        .await;
        // The one slot is the shared review's: a different token is refused.
        let refused = auth.authenticate(None, &bearer("another-token")).await;
        assert_eq!(retry_after(&refused), Some(1));
        reviewer.gate.as_ref().expect("gated").notify_one();
    };
    let (results, ()) = tokio::join!(shared, other);
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(reviewer.calls(), 1);
    // The slot came back with the review.
    reviewer.gate.as_ref().expect("gated").notify_one();
    auth.authenticate(None, &bearer("another-token"))
        .await
        .expect("slot free again");
    assert_eq!(reviewer.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn cached_answers_and_local_service_account_tokens_never_touch_the_caps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (signer, public) = Signer::ec();
    let reviewer = FakeReviewer::new(Ok(Some(alice())), false);
    let auth = reviewed(
        AuthConfig {
            service_account_key_files: vec![write(dir.path(), "sa.pub", &public)],
            service_account_issuers: vec![ISSUER.into()],
            ..caps(1, 1, 1)
        },
        &reviewer,
    );
    let known = bearer("known-token");
    auth.authenticate(None, &known).await.expect("reviewed");
    // The one token of the rate is spent.
    let refused = auth.authenticate(None, &bearer("new-token")).await;
    assert!(retry_after(&refused).is_some());
    for _ in 0..10 {
        auth.authenticate(None, &known).await.expect("cached");
    }
    let sa = bearer(&signer.sign(&fixture_claims()));
    for _ in 0..10 {
        assert_eq!(
            *auth
                .authenticate(None, &sa)
                .await
                .expect("verified locally"),
            fixture_identity()
        );
    }
    assert_eq!(reviewer.calls(), 1);
}

#[test]
fn a_throttled_caller_is_told_when_to_retry_and_nothing_else() {
    let err = AuthError::Throttled {
        reason: "too many token reviews (rate); retry in 2s".into(),
        retry_after_secs: 2,
    };
    assert_eq!(err.status_code(), 429);
    assert_eq!(err.retry_after_secs(), Some(2));
    assert_eq!(
        err.client_message(),
        "Too many requests, please try again later."
    );
}
