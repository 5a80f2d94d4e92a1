//! `charges: upstream`: the two-step admission through the public API, with
//! explicit instants. A request the proxy answers itself stops after
//! [`Limiter::admit_client`]; one that goes upstream also passes
//! [`Limiter::charge_upstream`].

use std::time::{Duration, Instant};

use breakwater_limits::{
    Decision, Limiter, Permit, RejectReason, Rejection, RequestAttrs, Subject, ValidatedLimits,
};
use proptest::prelude::*;

fn limits(text: &str) -> ValidatedLimits {
    ValidatedLimits::from_yaml(text, "test.yaml").expect("valid limits")
}

fn req(verb: &'static str, name_scoped: bool) -> RequestAttrs<'static> {
    RequestAttrs {
        verb,
        api_group: "",
        resource: "pods",
        subresource: "",
        namespace: if name_scoped { "default" } else { "" },
        is_resource_request: true,
    }
}

fn watch() -> RequestAttrs<'static> {
    req("watch", false)
}
fn list() -> RequestAttrs<'static> {
    req("list", false)
}
fn get() -> RequestAttrs<'static> {
    req("get", true)
}

fn user(name: &str) -> Subject<'_> {
    Subject {
        user: name,
        groups: &[],
        ..Subject::default()
    }
}

fn admitted(d: Decision) -> Permit {
    match d {
        Decision::Admitted(p) => p,
        Decision::Rejected(r) => panic!("rejected: {r:?}"),
    }
}

fn rejected(d: Decision) -> Rejection {
    match d {
        Decision::Admitted(p) => panic!("admitted under rule {:?}", p.rule()),
        Decision::Rejected(r) => r,
    }
}

/// A fleet rule with a tiny rate; `CHARGES` is replaced per test.
const FLEET: &str = r#"apiVersion: breakwater/v1alpha1
kind: Limits
upstream: {maxInflight: 10}
rules:
  - name: fleet
    charges: CHARGES
    match: {users: ["agent"]}
    perIdentity: {rate: 1, burst: 1, inflight: 2, watches: 100, watchOpens: {rate: 1, burst: 1}}
  - name: default
"#;

fn fleet(charges: &str) -> Limiter {
    Limiter::new(limits(&FLEET.replace("CHARGES", charges)))
}

fn watches(l: &Limiter, rule: &str) -> (u64, u64) {
    let s = l
        .rule_stats()
        .into_iter()
        .find(|s| &*s.rule == rule)
        .expect("rule");
    (s.inflight, s.watches)
}

#[test]
fn requests_answered_by_the_proxy_cost_an_upstream_rule_nothing() {
    let l = fleet("upstream");
    let now = Instant::now();
    let mut held = Vec::new();
    // 50 watches and 50 LISTs the hub answers: admitted, nothing charged.
    for _ in 0..50 {
        let p = admitted(l.admit_client(&user("agent"), &watch(), now));
        assert!(p.charge_pending());
        assert_eq!(p.rule(), Some("fleet"));
        assert_eq!(p.quota(), None, "no token taken, no quota to show");
        assert!(!p.holds_upstream_seat());
        held.push(p);
        held.push(admitted(l.admit_client(&user("agent"), &list(), now)));
    }
    // Concurrent LISTs beyond `inflight: 2` took no in-flight slot, yet
    // the gauges see every open request.
    assert_eq!(watches(&l, "fleet"), (50, 50));
    assert_eq!(l.upstream_inflight(), 0);

    // A forwarded GET is charged: the one token, then a 429 with its wait.
    let mut p = admitted(l.admit_client(&user("agent"), &get(), now));
    l.charge_upstream(&mut p, &get(), now)
        .expect("the burst's token");
    assert!(!p.charge_pending());
    assert!(p.holds_upstream_seat());
    assert_eq!(p.quota().map(|q| q.remaining), Some(0));
    let mut q = admitted(l.admit_client(&user("agent"), &get(), now));
    let rej = l
        .charge_upstream(&mut q, &get(), now)
        .expect_err("the bucket is empty");
    assert_eq!(rej.reason, RejectReason::Rate);
    assert_eq!(&*rej.rule, "fleet");
    assert_eq!(rej.retry_after, Duration::from_secs(1));
    // The refused request gives back its seat; dropping it, its gauge count.
    assert_eq!(l.upstream_inflight(), 1);
    drop(q);
    drop(p);
    drop(held);
    assert_eq!(watches(&l, "fleet"), (0, 0));
    assert_eq!(l.upstream_inflight(), 0);
}

#[test]
fn an_all_rule_charges_every_request_at_the_first_step() {
    let l = fleet("all");
    let now = Instant::now();
    let first = admitted(l.admit_client(&user("agent"), &watch(), now));
    assert!(!first.charge_pending());
    assert_eq!(
        rejected(l.admit_client(&user("agent"), &watch(), now)).reason,
        RejectReason::Rate
    );
    assert_eq!(
        rejected(l.admit_client(&user("agent"), &list(), now)).reason,
        RejectReason::Rate
    );
    // Nothing deferred: the second step is a no-op.
    let mut first = first;
    l.charge_upstream(&mut first, &watch(), now)
        .expect("nothing pending");
}

#[test]
fn one_step_admit_charges_an_upstream_rule_in_full() {
    let l = fleet("upstream");
    let now = Instant::now();
    let p = admitted(l.admit(&user("agent"), &list(), now));
    assert!(!p.charge_pending());
    assert!(p.holds_upstream_seat());
    assert_eq!(
        rejected(l.admit(&user("agent"), &list(), now)).reason,
        RejectReason::Rate
    );
}

#[test]
fn the_watch_cap_counts_client_watches_whatever_charges_says() {
    let text = FLEET
        .replace("CHARGES", "upstream")
        .replace("watches: 100", "watches: 3");
    let l = Limiter::new(limits(&text));
    let now = Instant::now();
    let open: Vec<Permit> = (0..3)
        .map(|_| admitted(l.admit_client(&user("agent"), &watch(), now)))
        .collect();
    let rej = rejected(l.admit_client(&user("agent"), &watch(), now));
    assert_eq!(rej.reason, RejectReason::Watches);
    assert_eq!(rej.limit, 3);
    drop(open);
    drop(admitted(l.admit_client(&user("agent"), &watch(), now)));
}

#[test]
fn the_second_step_charges_watch_opens_and_refunds_them_on_refusal() {
    let text = r#"apiVersion: breakwater/v1alpha1
kind: Limits
rules:
  - name: fleet
    charges: upstream
    perIdentity: {watches: 10, watchOpens: {rate: 0.1, burst: 2}}
    aggregate: {watchOpens: {rate: 1, burst: 1}}
"#;
    let l = Limiter::new(limits(text));
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    // A watch that goes upstream (the hub starts a stream for it) takes a
    // watch-open token from both buckets.
    let mut a = admitted(l.admit_client(&user("agent"), &watch(), at(0)));
    l.charge_upstream(&mut a, &watch(), at(0)).expect("tokens");
    // The fleet bucket is empty: refused, and the identity's token given back.
    let mut b = admitted(l.admit_client(&user("agent"), &watch(), at(0)));
    let rej = l
        .charge_upstream(&mut b, &watch(), at(0))
        .expect_err("fleet bucket empty");
    assert_eq!(rej.reason, RejectReason::AggregateWatchOpens);
    // The refused request still holds its first-step watch slot until the
    // caller drops it.
    assert_eq!(watches(&l, "fleet").1, 2);
    drop(b);
    assert_eq!(watches(&l, "fleet").1, 1);
    // The identity's second token (refunded) then goes; a third would need
    // 10 s.
    let mut c = admitted(l.admit_client(&user("agent"), &watch(), at(1)));
    l.charge_upstream(&mut c, &watch(), at(1))
        .expect("the refunded token");
    let mut d = admitted(l.admit_client(&user("agent"), &watch(), at(2)));
    assert_eq!(
        l.charge_upstream(&mut d, &watch(), at(2))
            .expect_err("identity bucket empty")
            .reason,
        RejectReason::WatchOpens
    );
}

#[test]
fn an_aggregate_refusal_at_the_second_step_refunds_the_identity_token() {
    let text = r#"apiVersion: breakwater/v1alpha1
kind: Limits
rules:
  - name: fleet
    charges: upstream
    perIdentity: {rate: 0.1, burst: 1}
    aggregate: {rate: 1, burst: 1}
"#;
    let l = Limiter::new(limits(text));
    let t0 = Instant::now();
    let mut a = admitted(l.admit_client(&user("a"), &get(), t0));
    l.charge_upstream(&mut a, &get(), t0).expect("a's token");
    let mut b = admitted(l.admit_client(&user("b"), &get(), t0));
    assert_eq!(
        l.charge_upstream(&mut b, &get(), t0)
            .expect_err("fleet bucket empty")
            .reason,
        RejectReason::AggregateRate
    );
    drop(b);
    // b's own token came back: once the fleet bucket refills (1 s), b gets
    // through, although its own bucket would need 10 s to refill.
    let t1 = t0 + Duration::from_secs(1);
    let mut b = admitted(l.admit_client(&user("b"), &get(), t1));
    l.charge_upstream(&mut b, &get(), t1)
        .expect("b's refunded token");
}

#[test]
fn a_seat_refusal_at_the_second_step_refunds_the_tokens() {
    let text = r#"apiVersion: breakwater/v1alpha1
kind: Limits
upstream: {maxInflight: 1}
rules:
  - name: fleet
    charges: upstream
    perIdentity: {rate: 0.1, burst: 2}
"#;
    let l = Limiter::new(limits(text));
    let now = Instant::now();
    let mut a = admitted(l.admit_client(&user("a"), &get(), now));
    l.charge_upstream(&mut a, &get(), now).expect("seat");
    let mut b = admitted(l.admit_client(&user("a"), &get(), now));
    assert_eq!(
        l.charge_upstream(&mut b, &get(), now)
            .expect_err("no seat")
            .reason,
        RejectReason::UpstreamSeats
    );
    drop(b);
    drop(a);
    // Two tokens in the burst: one spent by `a`, the refused one refunded.
    let mut c = admitted(l.admit_client(&user("a"), &get(), now));
    l.charge_upstream(&mut c, &get(), now)
        .expect("the refunded token");
}

#[test]
fn charging_twice_takes_one_token() {
    let text = FLEET
        .replace("CHARGES", "upstream")
        .replace("burst: 1, inflight", "burst: 2, inflight");
    let l = Limiter::new(limits(&text));
    let now = Instant::now();
    let mut a = admitted(l.admit_client(&user("agent"), &get(), now));
    l.charge_upstream(&mut a, &get(), now).expect("first");
    l.charge_upstream(&mut a, &get(), now)
        .expect("nothing pending");
    assert_eq!(a.quota().map(|q| q.remaining), Some(1));
    // One in-flight slot, one seat, one gauge count.
    assert_eq!(watches(&l, "fleet").0, 1);
    assert_eq!(l.upstream_inflight(), 1);
}

#[test]
fn a_shadow_upstream_rule_admits_at_the_second_step_and_reports() {
    let text = FLEET
        .replace("CHARGES", "upstream")
        .replace("  - name: fleet\n", "  - name: fleet\n    mode: shadow\n");
    let l = Limiter::new(limits(&text));
    let now = Instant::now();
    let mut a = admitted(l.admit_client(&user("agent"), &get(), now));
    l.charge_upstream(&mut a, &get(), now).expect("token");
    assert!(a.shadow_rejection().is_none());
    let mut b = admitted(l.admit_client(&user("agent"), &get(), now));
    l.charge_upstream(&mut b, &get(), now)
        .expect("shadow never refuses");
    assert_eq!(
        b.shadow_rejection().map(|r| r.reason),
        Some(RejectReason::Rate)
    );
    assert_eq!(watches(&l, "fleet").0, 2, "both counted once");
    drop((a, b));
    assert_eq!(watches(&l, "fleet"), (0, 0));
}

#[test]
fn a_reload_between_the_steps_charges_the_limits_in_force() {
    let l = fleet("upstream");
    let now = Instant::now();
    let mut pending = admitted(l.admit_client(&user("agent"), &get(), now));
    // The rule moves down a place and its burst grows.
    let text = FLEET
        .replace("CHARGES", "upstream")
        .replace("burst: 1, inflight", "burst: 5, inflight")
        .replace(
            "rules:\n",
            "rules:\n  - name: first\n    match: {users: [\"other\"]}\n",
        );
    l.reload(limits(&text));
    l.charge_upstream(&mut pending, &get(), now)
        .expect("charged");
    assert_eq!(
        pending.quota().map(|q| (q.limit, q.remaining)),
        Some((5, 4))
    );

    // A rule that left the limits charges nothing.
    let mut orphan = admitted(l.admit_client(&user("agent"), &get(), now));
    l.reload(limits(
        "apiVersion: breakwater/v1alpha1\nkind: Limits\nrules: []\n",
    ));
    l.charge_upstream(&mut orphan, &get(), now)
        .expect("nothing to charge");
    assert!(!orphan.charge_pending());
    assert_eq!(orphan.quota(), None);
}

const MIXED: &str = r#"apiVersion: breakwater/v1alpha1
kind: Limits
upstream: {maxInflight: 30, reservedForExempt: 2}
rules:
  - name: fleet
    charges: upstream
    match: {users: ["u1", "u2", "u3", "u4"]}
    perIdentity: {rate: 20, burst: 3, inflight: 2, watches: 3, watchOpens: {rate: 5, burst: 2}}
    aggregate: {rate: 40, burst: 6, inflight: 5, watches: 8, watchOpens: {rate: 8, burst: 3}}
  - name: shadowed
    mode: shadow
    charges: upstream
    match: {users: ["u5", "u6"]}
    perIdentity: {rate: 20, burst: 2, inflight: 1, watches: 1}
  - name: default
    perIdentity: {rate: 50, burst: 4, inflight: 3, watches: 2}
"#;

#[derive(Debug, Clone)]
struct Op {
    who: u8,
    kind: u8,
    upstream: bool,
    advance_ms: u16,
}

fn op() -> impl Strategy<Value = Op> {
    (0u8..8, 0u8..3, any::<bool>(), 0u16..30).prop_map(|(who, kind, upstream, advance_ms)| Op {
        who,
        kind,
        upstream,
        advance_ms,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    /// Random watches, LISTs and GETs, each either answered by the proxy
    /// (first step only) or sent upstream (both steps), permits dropped at
    /// random. For the `upstream` rule: what was charged never exceeds
    /// burst + rate·t (per identity and for the fleet), the watch caps
    /// hold for every client watch, seats are taken only by what went
    /// upstream; at the end every count is back to zero and every identity
    /// entry is evictable.
    #[test]
    fn charged_requests_stay_within_the_buckets_and_counts_return_to_zero(
        ops in proptest::collection::vec(op(), 3_000),
        seed in any::<u64>(),
    ) {
        let l = Limiter::new(limits(MIXED));
        let names: Vec<String> = (0..8).map(|i| format!("u{i}")).collect();
        let start = Instant::now();
        let mut now = start;
        let mut held: Vec<Permit> = Vec::new();
        let mut charged_by = [0u64; 8];
        let mut opens_by = [0u64; 8];
        let mut rng = seed;
        for o in &ops {
            now += Duration::from_millis(u64::from(o.advance_ms));
            let who = usize::from(o.who);
            let s = user(&names[who]);
            let r = match o.kind {
                0 => watch(),
                1 => list(),
                _ => get(),
            };
            let Decision::Admitted(mut p) = l.admit_client(&s, &r, now) else {
                continue;
            };
            if o.upstream {
                let shadow_before = p.shadow_rejection().is_some();
                match l.charge_upstream(&mut p, &r, now) {
                    Ok(()) => {
                        let fleet = p.rule() == Some("fleet");
                        if fleet && !(shadow_before || p.shadow_rejection().is_some()) {
                            charged_by[who] += 1;
                            if o.kind == 0 {
                                opens_by[who] += 1;
                            }
                        }
                        held.push(p);
                    }
                    Err(rej) => {
                        prop_assert_eq!(p.rule(), Some(&*rej.rule));
                        drop(p);
                    }
                }
            } else {
                held.push(p);
            }
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
            if !held.is_empty() && rng % 3 == 0 {
                let i = (rng as usize / 3) % held.len();
                drop(held.swap_remove(i));
            }
            let t = (now - start).as_secs_f64();
            for (i, n) in charged_by.iter().enumerate() {
                prop_assert!((*n as f64) <= 3.0 + 20.0 * t + 1e-6, "u{} charged {} in {}s", i, n, t);
            }
            prop_assert!((charged_by.iter().sum::<u64>() as f64) <= 6.0 + 40.0 * t + 1e-6);
            for n in &opens_by {
                prop_assert!((*n as f64) <= 2.0 + 5.0 * t + 1e-6);
            }
            prop_assert!((opens_by.iter().sum::<u64>() as f64) <= 3.0 + 8.0 * t + 1e-6);
            let fleet = l.rule_stats().into_iter().find(|s| &*s.rule == "fleet").expect("fleet");
            prop_assert!(fleet.watches <= 8, "{:?}", fleet);
            let seats = held.iter().filter(|p| p.holds_upstream_seat()).count() as u64;
            prop_assert_eq!(l.upstream_inflight(), seats);
            prop_assert!(seats <= 28);
        }
        while !held.is_empty() {
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
            let i = rng as usize % held.len();
            drop(held.swap_remove(i));
        }
        for st in l.rule_stats() {
            prop_assert_eq!((st.inflight, st.watches), (0, 0), "{:?}", st);
        }
        prop_assert_eq!(l.upstream_inflight(), 0);
        let before = l.identity_entries();
        prop_assert_eq!(l.evict_idle(now + Duration::from_secs(3600)), before);
        prop_assert_eq!(l.identity_entries(), 0);
    }
}

#[test]
fn explain_says_what_the_rule_charges() {
    let up = limits(&FLEET.replace("CHARGES", "upstream"));
    let text = breakwater_limits::explain(&up, &user("agent"), &watch()).to_string();
    assert!(
        text.contains("  charges upstream: only requests that reach the apiserver"),
        "{text}"
    );
    let all = limits(&FLEET.replace("CHARGES", "all"));
    let text = breakwater_limits::explain(&all, &user("agent"), &watch()).to_string();
    assert!(
        text.contains("  charges all: every request it matches"),
        "{text}"
    );
}
