//! The TokenReview cache: one review per new token however many requests
//! carry it, TTLs for answers, no caching of failures.

use super::*;

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
