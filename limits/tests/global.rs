//! Handing aggregate limits to a shared backend (`backend: redis`): the
//! limiter only counts them while the backend is in charge, says what the
//! backend must take, and enforces its share again at once when it is not.

use std::time::{Duration, Instant};

use breakwater_limits::{
    Backend, Decision, Limiter, Permit, RejectReason, RequestAttrs, Subject, ValidatedLimits,
};

const LIMITS: &str = r#"apiVersion: breakwater/v1alpha1
kind: Limits
replicas: 3
backend:
  redis:
    address: 127.0.0.1:6379
    keyPrefix: "prod:"
    leaseSeconds: 5
rules:
  - name: admins
    match: {groups: ["system:masters"]}
    exempt: true
  - name: fleet
    CHARGES
    match: {serviceAccounts: ["monitoring/*"]}
    aggregate: {watches: 10, rate: 30, burst: 9, inflight: 6}
"#;

fn limits(charges: &str) -> ValidatedLimits {
    ValidatedLimits::from_yaml(&LIMITS.replace("CHARGES", charges), "g.yaml").expect("valid")
}

fn req(verb: &'static str) -> RequestAttrs<'static> {
    RequestAttrs {
        verb,
        api_group: "",
        resource: "pods",
        subresource: "",
        namespace: "",
        is_resource_request: true,
    }
}

fn agent() -> Subject<'static> {
    Subject {
        user: "system:serviceaccount:monitoring:agent",
        ..Subject::default()
    }
}

fn admitted(d: Decision) -> Permit {
    match d {
        Decision::Admitted(p) => p,
        Decision::Rejected(r) => panic!("rejected: {r:?}"),
    }
}

#[test]
fn a_redis_backend_is_validated_and_keeps_the_undivided_limits() {
    let l = limits("charges: all");
    let Backend::Redis(r) = l.backend() else {
        panic!("redis backend")
    };
    assert_eq!((r.host.as_str(), r.port), ("127.0.0.1", 6379));
    assert_eq!(r.key_prefix, "prod:");
    assert_eq!(r.lease, Duration::from_secs(5));
    assert_eq!(r.timeout, Duration::from_millis(50));
    let rule = &l.rules()[1];
    assert_eq!(rule.aggregate().watches, Some(3), "the fallback share");
    assert_eq!(rule.global().watches, Some(10), "all replicas together");
    let bad = LIMITS
        .replace("CHARGES", "")
        .replace("127.0.0.1:6379", "redis")
        .replace("leaseSeconds: 5", "leaseSeconds: 0");
    let err = ValidatedLimits::from_yaml(&bad, "g.yaml")
        .expect_err("invalid")
        .to_string();
    assert!(
        err.contains("g.yaml:6:14: redis address `redis` is not `host:port`"),
        "{err}"
    );
    assert!(
        err.contains("leaseSeconds must be between 1 and 300"),
        "{err}"
    );
}

#[test]
fn while_the_backend_is_in_charge_aggregates_are_counted_not_enforced() {
    let l = Limiter::new(limits("charges: all"));
    let now = Instant::now();
    l.set_global(true);
    let mut held = Vec::new();
    for _ in 0..5 {
        let p = admitted(l.admit_client(&agent(), &req("watch"), now));
        let d = l.global_demand(&p, &req("watch")).expect("a demand");
        assert_eq!(d.watches, Some(10));
        assert_eq!(d.rate.map(|r| r.burst), Some(9));
        assert_eq!(d.inflight, None, "a watch holds no in-flight slot");
        held.push(p);
    }
    assert_eq!(l.rule_stats()[1].watches, 5, "counted");
    // The backend goes away: the share (3) applies at once to what is held.
    l.set_global(false);
    let r = match l.admit_client(&agent(), &req("watch"), now) {
        Decision::Rejected(r) => r,
        Decision::Admitted(_) => panic!("admitted over the share"),
    };
    assert_eq!(r.reason, RejectReason::AggregateWatches);
    assert_eq!(r.limit, 3);
    drop(held.drain(..3));
    let _p = admitted(l.admit_client(&agent(), &req("watch"), now));
}

#[test]
fn exempt_rules_and_deferred_charges_ask_the_backend_nothing_more() {
    let l = Limiter::new(limits("charges: upstream"));
    l.set_global(true);
    let now = Instant::now();
    let masters = vec!["system:masters".to_string()];
    let admin = Subject {
        user: "admin",
        groups: &masters,
        ..Subject::default()
    };
    let p = admitted(l.admit_client(&admin, &req("list"), now));
    assert!(l.global_demand(&p, &req("list")).is_none());
    // A deferred LIST takes nothing at the first step; a watch only its slot.
    let p = admitted(l.admit_client(&agent(), &req("list"), now));
    assert!(l.global_demand(&p, &req("list")).is_none());
    let p = admitted(l.admit_client(&agent(), &req("watch"), now));
    let d = l.global_demand(&p, &req("watch")).expect("the watch slot");
    assert_eq!((d.watches, d.rate, d.watch_opens), (Some(10), None, None));
}

/// With the backend in charge, the second step of a `charges: upstream`
/// rule spends its local quota, not the replica's share: refused (and
/// the backend told) when the quota is empty, however much share is left;
/// an in-flight slot goes back to the quota when its request ends, but
/// not to a quota reset since.
#[test]
fn the_second_step_spends_the_local_quota_the_backend_granted() {
    use breakwater_limits::Unit;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let l = Limiter::new(limits("charges: upstream"));
    let told = Arc::new(AtomicUsize::new(0));
    let hook = Arc::clone(&told);
    l.set_quota_hook(Arc::new(move || {
        hook.fetch_add(1, Ordering::SeqCst);
    }));
    l.set_global(true);
    let now = Instant::now();
    let quotas = l.upstream_quotas();
    assert_eq!(quotas.len(), 1);
    let q = &quotas[0];
    assert_eq!((q.inflight, q.rate.map(|r| r.burst)), (Some(6), Some(9)));

    // Nothing granted yet: refused for the in-flight slot, nothing taken.
    let mut p = admitted(l.admit_client(&agent(), &req("list"), now));
    let rej = l
        .charge_upstream(&mut p, &req("list"), now)
        .expect_err("no quota");
    assert_eq!(rej.reason, RejectReason::AggregateInflight);
    assert_eq!(rej.limit, 6);
    assert!(told.load(Ordering::SeqCst) >= 1, "the backend was told");
    assert!(p.charge_pending());

    // A slot but no token: refused for the rate; the slot is given back.
    q.quota.grant(Unit::Inflight, 2);
    let rej = l
        .charge_upstream(&mut p, &req("list"), now)
        .expect_err("no token");
    assert_eq!(rej.reason, RejectReason::AggregateRate);
    assert_eq!(q.quota.available(Unit::Inflight), 2);

    // Both: charged; the slot is in use until the permit drops.
    q.quota.grant(Unit::Rate, 1);
    l.charge_upstream(&mut p, &req("list"), now)
        .expect("charged from the quota");
    assert_eq!(
        (
            q.quota.available(Unit::Inflight),
            q.quota.available(Unit::Rate)
        ),
        (1, 0)
    );
    drop(p);
    assert_eq!(q.quota.available(Unit::Inflight), 2);

    // A slot in use when the quota is reset (the backend failed or
    // stepped down) goes back to no pool.
    q.quota.grant(Unit::Rate, 1);
    let mut p = admitted(l.admit_client(&agent(), &req("list"), now));
    l.charge_upstream(&mut p, &req("list"), now)
        .expect("charged");
    q.quota.reset();
    drop(p);
    assert_eq!(q.quota.available(Unit::Inflight), 0);

    // The backend out of charge: the share again (30/3 = 10/s, burst 3).
    l.set_global(false);
    for _ in 0..2 {
        let mut p = admitted(l.admit_client(&agent(), &req("list"), now));
        l.charge_upstream(&mut p, &req("list"), now)
            .expect("the share");
    }
}
