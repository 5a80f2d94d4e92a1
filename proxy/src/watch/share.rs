//! Cross-identity sharing: may this identity join a stream that other
//! identities share?
//!
//! Within one identity (same user and groups) sharing is always safe: the
//! apiserver would make the same authorization decision for every client.
//! Across identities the hub asks the apiserver with a SubjectAccessReview
//! for the joining identity (user, uid, groups, extra) and the attributes
//! of what it asked for: the verb it used (`watch`, or `list` for a LIST
//! rv=0), group, version, resource, namespace (empty = all namespaces) and
//! its label/field selectors (`resourceAttributes.labelSelector` /
//! `fieldSelector`, authorization.k8s.io/v1 since Kubernetes 1.31; older
//! apiservers drop the unknown fields, and RBAC ignores selectors anyway,
//! so the answer is never broader than the request).
//!
//! Answers are cached per (scope, attributes) in a bounded moka cache, the
//! scope being the user and groups the hub already shares a stream within
//! ([`key::scope_of`]: a DaemonSet's agents, whose bound tokens differ only
//! in their pod claims, are one scope): "allowed" for [`POSITIVE_TTL`],
//! "denied" for [`NEGATIVE_TTL`] (so a freshly granted role works soon); a
//! failure to ask counts as a denial (a proxy without permission to create
//! reviews must not ask once per watch of a storm). A request with
//! selectors is first asked about without them: allowed the whole
//! collection, it is allowed any part of it, so the agents of a DaemonSet,
//! each with its own node's field selector, cost one review, not one each.
//! Only a denial (never a failure) makes it ask about its own selectors.
//! Identical concurrent reviews (the agents arriving at once) share one
//! upstream request through `get_with`.
//!
//! # Whose credentials a shared stream uses
//!
//! A shared stream speaks upstream with the credentials of a *donor*: the
//! latest joiner whose reviews allowed both `list` and `watch` of exactly
//! what the stream asks upstream ([`Sharing::may_open`]). A joiner that may
//! only watch what it asked for (say, through its selectors) joins an
//! existing stream but never lends it credentials, so it cannot make the
//! stream's next re-watch fail.
//!
//! Revocation is bounded this way: every upstream request of the stream
//! (its LIST, each re-watch, freshness checks) carries the donor's
//! identity, so the apiserver re-authorizes the stream whenever it
//! re-watches. If the donor lost access, that request is refused, the
//! stream fails and its subscribers' watches end (as when an apiserver
//! restarts); each one that comes back is reviewed again (an "allowed"
//! answer lives at most [`POSITIVE_TTL`], and a refused donor's answers
//! are forgotten at once, see [`Sharing::forget`]). Until the current
//! upstream watch ends (the apiserver's own request timeout), events go
//! only to subscribers that were each allowed when they joined — the same
//! guarantee the apiserver gives: it authorizes a watch once, at its start.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::uri::PathAndQuery;
use http::{HeaderValue, Request};
use http_body_util::BodyExt;

use super::key;
use moka::Expiry;
use moka::future::Cache;

use crate::error::Chain;
use crate::identity::Identity;
use crate::upstream::{Upstream, full};
use crate::watch::key::Target;

/// How long an "allowed" answer is reused.
pub const POSITIVE_TTL: Duration = Duration::from_secs(60);
/// How long a "denied" answer is reused.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(10);
/// Most cached answers; moka evicts by TinyLFU beyond it, so one-off
/// identities cannot push out the hot ones.
pub const CACHE_SIZE: u64 = 100_000;

/// What a review asks: may the identity do `verb` on this collection,
/// restricted to these selectors?
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attributes {
    /// `watch` or `list`.
    pub verb: &'static str,
    pub group: String,
    pub version: String,
    pub resource: String,
    /// Empty: all namespaces (or a cluster-scoped type).
    pub namespace: String,
    pub label_selector: Option<String>,
    pub field_selector: Option<String>,
}

impl Attributes {
    /// `verb` on `target` with the given selectors.
    pub fn new(
        verb: &'static str,
        target: &Target,
        label_selector: Option<String>,
        field_selector: Option<String>,
    ) -> Attributes {
        Attributes {
            verb,
            group: target.group.clone(),
            version: target.version.clone(),
            resource: target.resource.clone(),
            namespace: target.namespace.clone(),
            label_selector,
            field_selector,
        }
    }

    /// The `spec.resourceAttributes` of a SubjectAccessReview.
    fn to_json(&self) -> serde_json::Value {
        let mut ra = serde_json::json!({
            "verb": self.verb,
            "group": self.group,
            "version": self.version,
            "resource": self.resource,
            "namespace": self.namespace,
        });
        // rawSelector: the apiserver parses it (webhooks may prefer
        // `requirements`, which it then fills in).
        if let Some(l) = &self.label_selector {
            ra["labelSelector"] = serde_json::json!({ "rawSelector": l });
        }
        if let Some(f) = &self.field_selector {
            ra["fieldSelector"] = serde_json::json!({ "rawSelector": f });
        }
        ra
    }
}

/// Asking upstream failed (not: the answer was "denied").
#[derive(Debug, Clone, thiserror::Error)]
pub enum SarError {
    #[error("subject access review failed: {0}")]
    Failed(String),
}

/// The future an [`AccessReviewer`] returns: `Ok(allowed)`.
pub type SarFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, SarError>> + Send + 'a>>;

/// Answers SubjectAccessReviews (the proxy: a POST upstream with its own
/// credentials; tests: a fake).
pub trait AccessReviewer: Send + Sync + 'static {
    fn review<'a>(&'a self, identity: &'a Identity, attrs: &'a Attributes) -> SarFuture<'a>;
}

/// `POST /apis/authorization.k8s.io/v1/subjectaccessreviews` with the
/// proxy's own credentials (it needs `create subjectaccessreviews`, which
/// `system:auth-delegator` grants).
impl AccessReviewer for Upstream {
    fn review<'a>(&'a self, identity: &'a Identity, attrs: &'a Attributes) -> SarFuture<'a> {
        Box::pin(async move {
            let failed = |m: String| SarError::Failed(m);
            let body = serde_json::json!({
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": {
                    "user": identity.username,
                    "uid": identity.uid,
                    "groups": identity.groups,
                    "extra": identity.extra,
                    "resourceAttributes": attrs.to_json(),
                },
            });
            let uri = self.uri_for(Some(&PathAndQuery::from_static(
                "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            )));
            let req = Request::post(uri)
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(
                    http::header::ACCEPT,
                    HeaderValue::from_static("application/json"),
                )
                .body(full(
                    serde_json::to_vec(&body).map_err(|e| failed(Chain(&e).to_string()))?,
                ))
                .map_err(|e| failed(Chain(&e).to_string()))?;
            let resp = self
                .send_own(req)
                .await
                .map_err(|e| failed(Chain(&e).to_string()))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| failed(Chain(&e).to_string()))?
                .to_bytes();
            if !status.is_success() {
                return Err(failed(format!("the apiserver answered {status}")));
            }
            let v: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| failed(Chain(&e).to_string()))?;
            let allowed = v.pointer("/status/allowed").and_then(|a| a.as_bool());
            let denied = v.pointer("/status/denied").and_then(|d| d.as_bool());
            match allowed {
                Some(a) => Ok(a && denied != Some(true)),
                None => Err(failed("no status.allowed in the answer".into())),
            }
        })
    }
}

/// A scope ([`key::scope_of`]) and what it asks.
type Key = (String, Attributes);

/// A cached answer. A failure to ask is remembered like a denial, but it
/// does not lead to a narrower question (that would fail too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Allowed,
    Denied,
    Failed,
}

/// Allowed and denied answers age differently.
struct AnswerExpiry {
    positive: Duration,
    negative: Duration,
}

impl Expiry<Key, Answer> for AnswerExpiry {
    fn expire_after_create(&self, _key: &Key, answer: &Answer, _at: Instant) -> Option<Duration> {
        Some(if *answer == Answer::Allowed {
            self.positive
        } else {
            self.negative
        })
    }
}

/// The sharing decisions, cached. Cheap to share (`Arc` it).
pub struct Sharing {
    reviewer: Arc<dyn AccessReviewer>,
    cache: Cache<Key, Answer>,
    /// When a failed review was last logged at warn level (at most once a
    /// minute: a proxy without permission to create SubjectAccessReviews
    /// would otherwise log one line per watch).
    warned: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Sharing {
    pub fn new(
        reviewer: Arc<dyn AccessReviewer>,
        capacity: u64,
        positive: Duration,
        negative: Duration,
    ) -> Sharing {
        Sharing {
            reviewer,
            cache: Cache::builder()
                .max_capacity(capacity)
                .expire_after(AnswerExpiry { positive, negative })
                .build(),
            warned: std::sync::Mutex::new(None),
        }
    }

    /// Whether `identity` may do `attrs`; a failure to ask counts as "no"
    /// (the caller then stays within the identity's own scope) and is
    /// remembered like a denial: a proxy the apiserver will not answer
    /// (no permission to create SubjectAccessReviews, an outage) must not
    /// ask again for every watch of a storm.
    pub async fn allowed(&self, identity: &Identity, attrs: Attributes) -> bool {
        self.answer(identity, attrs).await == Answer::Allowed
    }

    async fn answer(&self, identity: &Identity, attrs: Attributes) -> Answer {
        let key = (key::scope_of(identity), attrs);
        self.cache
            .get_with_by_ref(&key, async {
                let res = self.reviewer.review(identity, &key.1).await;
                let (answer, result) = match &res {
                    Ok(true) => (Answer::Allowed, "allowed"),
                    Ok(false) => (Answer::Denied, "denied"),
                    Err(err) => {
                        self.warn_failed(err, identity);
                        (Answer::Failed, "error")
                    }
                };
                metrics::counter!("breakwater_watch_sar_total", "result" => result).increment(1);
                answer
            })
            .await
    }

    fn warn_failed(&self, err: &dyn std::fmt::Display, identity: &Identity) {
        let mut last = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(60)) {
            *last = Some(std::time::Instant::now());
            tracing::warn!(error = %err, user = %identity.username, "not sharing watches across identities (SubjectAccessReview failed; repeats are logged at debug for a minute; see breakwater_watch_sar_total{{result=\"error\"}})");
        } else {
            tracing::debug!(error = %err, user = %identity.username, "not sharing a watch across identities");
        }
    }

    /// Whether `identity` may join a shared stream of `target` for a
    /// request with `verb` and its own selectors (what the apiserver would
    /// authorize for that request).
    pub async fn may_join(
        &self,
        identity: &Identity,
        verb: &'static str,
        target: &Target,
        label: Option<String>,
        field: Option<String>,
    ) -> bool {
        if label.is_none() && field.is_none() {
            return self
                .allowed(identity, Attributes::new(verb, target, None, None))
                .await;
        }
        match self
            .answer(identity, Attributes::new(verb, target, None, None))
            .await
        {
            Answer::Allowed => true,
            Answer::Failed => false,
            Answer::Denied => {
                self.allowed(identity, Attributes::new(verb, target, label, field))
                    .await
            }
        }
    }

    /// Whether `identity`'s credentials may carry a shared stream of
    /// `target` that sends `selectors` upstream: it must be allowed to
    /// both list and watch exactly that.
    pub async fn may_open(
        &self,
        identity: &Identity,
        target: &Target,
        selectors: &(Option<String>, Option<String>),
    ) -> bool {
        let (label, field) = selectors.clone();
        // Watch first: a watcher's own `may_join` answer is already cached.
        self.allowed(
            identity,
            Attributes::new("watch", target, label.clone(), field.clone()),
        )
        .await
            && self
                .allowed(identity, Attributes::new("list", target, label, field))
                .await
    }

    /// Forgets `identity`'s answers for what a stream asks upstream (the
    /// apiserver refused that stream: the donor may have lost access).
    pub async fn forget(
        &self,
        identity: &Identity,
        target: &Target,
        selectors: &(Option<String>, Option<String>),
    ) {
        for verb in ["watch", "list"] {
            let (label, field) = selectors.clone();
            let attrs = Attributes::new(verb, target, label, field);
            self.cache
                .invalidate(&(key::scope_of(identity), attrs))
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Allows `allowed_user` everything and "carol" what a field selector
    /// narrows; counts calls; fails while `fail`.
    struct Fake {
        allowed_user: &'static str,
        calls: AtomicUsize,
        fail: Mutex<bool>,
        seen: Mutex<Vec<Attributes>>,
    }

    impl AccessReviewer for Fake {
        fn review<'a>(&'a self, identity: &'a Identity, attrs: &'a Attributes) -> SarFuture<'a> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                self.seen.lock().expect("lock").push(attrs.clone());
                // Long enough for concurrent callers to pile up.
                tokio::time::sleep(Duration::from_millis(50)).await;
                if *self.fail.lock().expect("lock") {
                    return Err(SarError::Failed("down".into()));
                }
                Ok(identity.username == self.allowed_user
                    || (identity.username == "carol" && attrs.field_selector.is_some()))
            })
        }
    }

    fn fake() -> Arc<Fake> {
        Arc::new(Fake {
            allowed_user: "alice",
            calls: AtomicUsize::new(0),
            fail: Mutex::new(false),
            seen: Mutex::new(Vec::new()),
        })
    }

    fn who(name: &str) -> Identity {
        Identity {
            username: name.into(),
            uid: String::new(),
            groups: vec!["system:authenticated".into()],
            extra: BTreeMap::new(),
        }
    }

    fn pods() -> Target {
        Target {
            prefix: "api".into(),
            group: String::new(),
            version: "v1".into(),
            resource: "pods".into(),
            namespace: "demo".into(),
        }
    }

    fn sharing(f: &Arc<Fake>) -> Sharing {
        Sharing::new(
            f.clone(),
            100,
            Duration::from_secs(60),
            Duration::from_secs(10),
        )
    }

    #[tokio::test]
    async fn concurrent_identical_reviews_cost_one_request_and_answers_are_reused() {
        let f = fake();
        let s = Arc::new(sharing(&f));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.may_join(&who("alice"), "watch", &pods(), None, None)
                    .await
            }));
        }
        for t in tasks {
            assert!(t.await.expect("task"));
        }
        assert_eq!(f.calls.load(Ordering::SeqCst), 1);
        // The same identity asking to open needs `list` too: one more.
        assert!(s.may_open(&who("alice"), &pods(), &(None, None)).await);
        assert_eq!(f.calls.load(Ordering::SeqCst), 2);
        assert!(!s.may_join(&who("bob"), "watch", &pods(), None, None).await);
        assert!(!s.may_join(&who("bob"), "watch", &pods(), None, None).await);
        assert_eq!(f.calls.load(Ordering::SeqCst), 3, "denials are cached too");
    }

    #[tokio::test]
    async fn selectors_are_part_of_the_question_and_failures_count_as_denials() {
        let f = fake();
        // moka keeps its own clock, so the expiry is waited for for real.
        let s = Sharing::new(
            f.clone(),
            100,
            Duration::from_secs(60),
            Duration::from_millis(100),
        );
        *f.fail.lock().expect("lock") = true;
        let field = Some("spec.nodeName=n1".to_string());
        for _ in 0..3 {
            assert!(
                !s.may_join(&who("alice"), "watch", &pods(), None, field.clone())
                    .await
            );
        }
        assert_eq!(
            f.calls.load(Ordering::SeqCst),
            1,
            "a failure is remembered: a storm does not ask once per watch"
        );
        *f.fail.lock().expect("lock") = false;
        let mut allowed = false;
        for _ in 0..100 {
            if s.may_join(&who("alice"), "watch", &pods(), None, field.clone())
                .await
            {
                allowed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(allowed, "asked again once the denial expired");
        assert_eq!(f.calls.load(Ordering::SeqCst), 2);
        // Both times about the whole collection: a failure never leads to
        // asking about the selectors, and a grant covers them.
        let seen = f.seen.lock().expect("lock").clone();
        assert!(seen.iter().all(|a| a.field_selector.is_none()), "{seen:?}");
        // Denied the collection, carol is asked about her own selectors.
        assert!(
            s.may_join(&who("carol"), "watch", &pods(), None, field.clone())
                .await
        );
        let seen = f.seen.lock().expect("lock").clone();
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[2].field_selector, None);
        assert_eq!(seen[3].field_selector, field);
        assert_eq!(seen[3].namespace, "demo");
        let json = seen[3].to_json();
        assert_eq!(json["fieldSelector"]["rawSelector"], "spec.nodeName=n1");
        assert!(json.get("labelSelector").is_none());
    }

    #[tokio::test]
    async fn a_daemonsets_agents_cost_one_review() {
        // One ServiceAccount, a bound token per pod (its own pod claims),
        // a field selector per node: one scope, one question.
        let f = fake();
        let s = Arc::new(sharing(&f));
        let mut tasks = Vec::new();
        for i in 0..50 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut agent = who("alice");
                agent.extra.insert(
                    "authentication.kubernetes.io/pod-name".into(),
                    vec![format!("agent-{i}")],
                );
                let field = Some(format!("spec.nodeName=node-{i}"));
                s.may_join(&agent, "watch", &pods(), None, field).await
            }));
        }
        for t in tasks {
            assert!(t.await.expect("task"));
        }
        assert_eq!(f.calls.load(Ordering::SeqCst), 1);
        // Another user is another scope.
        assert!(!s.may_join(&who("bob"), "watch", &pods(), None, None).await);
        assert_eq!(f.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn denials_expire_sooner_than_grants_and_forget_drops_both_verbs() {
        let f = fake();
        // moka keeps its own clock, so this waits for real (briefly).
        let s = Sharing::new(
            f.clone(),
            100,
            Duration::from_secs(60),
            Duration::from_millis(100),
        );
        assert!(s.may_open(&who("alice"), &pods(), &(None, None)).await);
        assert!(!s.may_join(&who("bob"), "watch", &pods(), None, None).await);
        assert_eq!(f.calls.load(Ordering::SeqCst), 3);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(s.may_open(&who("alice"), &pods(), &(None, None)).await);
        assert!(!s.may_join(&who("bob"), "watch", &pods(), None, None).await);
        assert_eq!(f.calls.load(Ordering::SeqCst), 4, "only bob asked again");
        s.forget(&who("alice"), &pods(), &(None, None)).await;
        assert!(s.may_open(&who("alice"), &pods(), &(None, None)).await);
        assert_eq!(f.calls.load(Ordering::SeqCst), 6);
    }
}
