//! The limiter end to end through its public API, with explicit instants
//! (no sleeping).

use std::time::{Duration, Instant, SystemTime};

use breakwater_limits::{
    Block, BlockError, BlockRespond, BlockTarget, Blocks, Decision, Limiter, LimiterConfig, Permit,
    RejectReason, Rejection, RequestAttrs, Subject, ValidatedLimits, explain, jittered,
};
use proptest::prelude::*;

const EXAMPLE: &str = include_str!("../../docker/limits.yaml");
const AGENT: &str = "system:serviceaccount:monitoring:node-agent";

fn limits(text: &str) -> ValidatedLimits {
    ValidatedLimits::from_yaml(text, "test.yaml").expect("valid limits")
}

fn req(verb: &str, resource: &str, ns: &str) -> RequestAttrs<'static> {
    // Leak-free 'static: the test only uses literals.
    let verb: &'static str = match verb {
        "get" => "get",
        "list" => "list",
        "watch" => "watch",
        "create" => "create",
        other => panic!("add {other}"),
    };
    let resource: &'static str = match resource {
        "pods" => "pods",
        "nodes" => "nodes",
        "namespaces" => "namespaces",
        "configmaps" => "configmaps",
        other => panic!("add {other}"),
    };
    let namespace: &'static str = match ns {
        "" => "",
        "default" => "default",
        "kube-system" => "kube-system",
        other => panic!("add {other}"),
    };
    RequestAttrs {
        verb,
        api_group: "",
        resource,
        subresource: "",
        namespace,
        is_resource_request: true,
    }
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

#[test]
fn permits_are_send_and_sync() {
    fn check<T: Send + Sync + 'static>() {}
    check::<Permit>();
    check::<Limiter>();
}

#[test]
fn rules_match_in_order_first_match_wins() {
    let l = Limiter::new(limits(EXAMPLE));
    let now = Instant::now();
    let masters = vec!["system:masters".to_string()];
    // An admin who is also the agent's SA name still gets the first rule.
    let admin_agent = Subject {
        user: AGENT,
        groups: &masters,
        ..Subject::default()
    };
    let p = admitted(l.admit(&admin_agent, &req("watch", "pods", ""), now));
    assert_eq!(p.rule(), Some("admins"));
    assert!(p.is_exempt());
    let p = admitted(l.admit(&user(AGENT), &req("watch", "pods", ""), now));
    assert_eq!(p.rule(), Some("telemetry-agents"));
    // Same SA, a verb the second rule does not list: falls to default.
    let p = admitted(l.admit(&user(AGENT), &req("get", "pods", "default"), now));
    assert_eq!(p.rule(), Some("default"));
    let p = admitted(l.admit(&user("alice"), &req("list", "pods", ""), now));
    assert_eq!(p.rule(), Some("default"));
}

#[test]
fn third_watch_is_rejected_and_closing_one_lets_a_new_one_in() {
    let l = Limiter::new(limits(EXAMPLE));
    let t0 = Instant::now();
    let w = req("watch", "pods", "");
    let a = admitted(l.admit(&user(AGENT), &w, t0));
    let _b = admitted(l.admit(&user(AGENT), &w, t0));
    let r = rejected(l.admit(&user(AGENT), &w, t0));
    assert_eq!(&*r.rule, "telemetry-agents");
    assert_eq!(r.reason, RejectReason::Watches);
    assert_eq!((r.limit, r.remaining, r.status), (2, 0, 429));
    assert_eq!(r.retry_after, Duration::from_secs(1));
    drop(a);
    // The slot is free, but both watch-open tokens (burst 2) are spent:
    // the real wait is the bucket's, one second at 1/s.
    let r = rejected(l.admit(&user(AGENT), &w, t0));
    assert_eq!(r.reason, RejectReason::WatchOpens);
    assert_eq!(r.retry_after, Duration::from_secs(1));
    assert_eq!(r.window, Duration::from_secs(2));
    let c = admitted(l.admit(&user(AGENT), &w, t0 + r.retry_after));
    assert_eq!(c.rule(), Some("telemetry-agents"));
    // Watches hold no upstream seat.
    assert_eq!(l.upstream_inflight(), 0);
    assert_eq!(l.rule_stats()[1].watches, 2);
}

#[test]
fn rate_rejection_carries_the_exact_wait_and_refunds_nothing_twice() {
    let l = Limiter::new(limits(EXAMPLE));
    let t0 = Instant::now();
    let r = req("list", "pods", "");
    for _ in 0..10 {
        drop(admitted(l.admit(&user(AGENT), &r, t0)));
    }
    let rej = rejected(l.admit(&user(AGENT), &r, t0));
    assert_eq!(rej.reason, RejectReason::Rate);
    assert_eq!(rej.retry_after, Duration::from_millis(200));
    assert_eq!((rej.limit, rej.remaining), (10, 0));
    assert_eq!(rej.window, Duration::from_secs(2));
    let p = admitted(l.admit(&user(AGENT), &r, t0 + Duration::from_millis(200)));
    let q = p.quota().expect("per-identity rate quota");
    assert_eq!((q.limit, q.remaining), (10, 0));
}

#[test]
fn inflight_rejections_do_not_burn_tokens() {
    let l = Limiter::new(limits(EXAMPLE));
    let t0 = Instant::now();
    let r = req("list", "nodes", "");
    let held: Vec<Permit> = (0..4)
        .map(|_| admitted(l.admit(&user(AGENT), &r, t0)))
        .collect();
    for _ in 0..20 {
        assert_eq!(
            rejected(l.admit(&user(AGENT), &r, t0)).reason,
            RejectReason::Inflight
        );
    }
    drop(held);
    // 4 of 10 tokens were used; the 20 rejections took none.
    for _ in 0..6 {
        drop(admitted(l.admit(&user(AGENT), &r, t0)));
    }
    assert_eq!(
        rejected(l.admit(&user(AGENT), &r, t0)).reason,
        RejectReason::Rate
    );
}

#[test]
fn aggregate_watches_cap_the_fleet_whatever_its_size() {
    let l = Limiter::new(limits(
        &EXAMPLE.replace("monitoring/node-agent", "monitoring/*"),
    ));
    let w = req("watch", "pods", "");
    let mut now = Instant::now();
    let mut held = Vec::new();
    let mut rejected_agg = 0;
    for i in 0..100 {
        // Aggregate watch opens: 10/s burst 20; step 100 ms per agent.
        now += Duration::from_millis(100);
        let name = format!("system:serviceaccount:monitoring:agent-{i}");
        match l.admit(&user(&name), &w, now) {
            Decision::Admitted(p) => held.push(p),
            Decision::Rejected(r) => {
                assert_eq!(r.reason, RejectReason::AggregateWatches, "{r:?}");
                assert_eq!(r.limit, 50);
                rejected_agg += 1;
            }
        }
    }
    assert_eq!(held.len(), 50);
    assert_eq!(rejected_agg, 50);
    assert_eq!(l.rule_stats()[1].watches, 50);
    drop(held);
    assert_eq!(l.rule_stats()[1].watches, 0);
}

const SEATS: &str = r#"apiVersion: breakwater/v1alpha1
kind: Limits
upstream: {maxInflight: 10, reservedForExempt: 2}
rules:
  - name: admins
    match: {groups: ["system:masters"]}
    exempt: true
  - name: shadowed
    mode: shadow
    match: {users: ["shadow-*"]}
    perIdentity: {rate: 1, burst: 1, inflight: 1, watches: 1}
  - name: default
"#;

#[test]
fn exempt_requests_get_reserved_seats_while_others_saturate() {
    let l = Limiter::new(limits(SEATS));
    let now = Instant::now();
    let masters = vec!["system:masters".to_string()];
    let admin = Subject {
        user: "admin",
        groups: &masters,
        ..Subject::default()
    };
    let r = req("get", "pods", "default");
    let mut storm: Vec<Permit> = Vec::new();
    for i in 0..500 {
        let name = format!("bot-{i}");
        match l.admit(&user(&name), &r, now) {
            Decision::Admitted(p) => storm.push(p),
            Decision::Rejected(rej) => {
                assert_eq!(rej.reason, RejectReason::UpstreamSeats);
                assert_eq!(&*rej.rule, "default");
            }
        }
    }
    assert_eq!(
        storm.len(),
        8,
        "non-exempt traffic stops at maxInflight - reserved"
    );
    // Watches need no seat, even now.
    let watch = admitted(l.admit(&user("bot-x"), &req("watch", "pods", ""), now));
    let a1 = admitted(l.admit(&admin, &req("get", "namespaces", ""), now));
    let a2 = admitted(l.admit(&admin, &req("get", "namespaces", ""), now));
    assert!(a1.holds_upstream_seat() && a2.holds_upstream_seat());
    // All 10 seats taken: even exempt traffic waits now.
    assert_eq!(
        rejected(l.admit(&admin, &req("get", "namespaces", ""), now)).reason,
        RejectReason::UpstreamSeats
    );
    drop(a1);
    drop(admitted(l.admit(
        &admin,
        &req("get", "namespaces", ""),
        now,
    )));
    drop((storm, watch, a2));
    assert_eq!(l.upstream_inflight(), 0);
}

#[test]
fn shadow_mode_admits_and_reports_the_would_be_rejection() {
    let l = Limiter::new(limits(SEATS));
    let now = Instant::now();
    let r = req("get", "pods", "default");
    let first = admitted(l.admit(&user("shadow-1"), &r, now));
    assert!(first.shadow_rejection().is_none());
    let second = admitted(l.admit(&user("shadow-1"), &r, now));
    let would = second.shadow_rejection().expect("would-be rejection");
    assert_eq!(would.reason, RejectReason::Inflight);
    assert_eq!(&*would.rule, "shadowed");
    drop(first);
    let third = admitted(l.admit(&user("shadow-1"), &r, now));
    // Slot free again, but the 1-token bucket is empty: exactly as enforce.
    assert_eq!(
        third.shadow_rejection().map(|r| r.reason),
        Some(RejectReason::Rate)
    );
    drop((second, third));
    assert_eq!(l.rule_stats()[1].inflight, 0);
    assert_eq!(l.upstream_inflight(), 0);
}

#[derive(Debug, Clone)]
struct Op {
    who: u8,
    kind: u8,
    advance_ms: u16,
}

fn op() -> impl Strategy<Value = Op> {
    (0u8..12, 0u8..4, 0u16..40).prop_map(|(who, kind, advance_ms)| Op {
        who,
        kind,
        advance_ms,
    })
}

const MIXED: &str = r#"apiVersion: breakwater/v1alpha1
kind: Limits
upstream: {maxInflight: 40, reservedForExempt: 5}
rules:
  - name: admins
    match: {groups: ["system:masters"]}
    exempt: true
  - name: shadowed
    mode: shadow
    match: {users: ["u1", "u2", "u3"]}
    perIdentity: {rate: 20, burst: 3, inflight: 2, watches: 1, watchOpens: {rate: 5, burst: 1}}
    aggregate: {inflight: 4, watches: 2}
  - name: default
    perIdentity: {rate: 50, burst: 10, inflight: 3, watches: 2, watchOpens: {rate: 5, burst: 2}}
    aggregate: {rate: 200, burst: 40, inflight: 12, watches: 6, watchOpens: {rate: 20, burst: 5}}
"#;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    /// 10,000 requests and watches (exempt, shadow, enforced), permits
    /// dropped in random order: every counter returns to zero, and every
    /// identity entry becomes evictable (nothing held).
    #[test]
    fn counts_return_to_zero_after_10000_permits_dropped_in_random_order(
        ops in proptest::collection::vec(op(), 10_000),
        seed in any::<u64>(),
    ) {
        let l = Limiter::new(limits(MIXED));
        let masters = vec!["system:masters".to_string()];
        let names: Vec<String> = (0..12).map(|i| format!("u{i}")).collect();
        let mut now = Instant::now();
        let mut held: Vec<Permit> = Vec::new();
        let mut rng = seed;
        for o in &ops {
            now += Duration::from_millis(u64::from(o.advance_ms));
            let groups: &[String] = if o.who == 0 { &masters } else { &[] };
            let s = Subject { user: &names[usize::from(o.who)], groups, ..Subject::default() };
            let r = match o.kind {
                0 => req("watch", "pods", ""),
                1 => req("list", "pods", "default"),
                2 => req("get", "configmaps", "kube-system"),
                _ => req("create", "configmaps", "default"),
            };
            if let Decision::Admitted(p) = l.admit(&s, &r, now) {
                held.push(p);
            }
            // Drop a pseudo-random held permit now and then (xorshift).
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
            if !held.is_empty() && rng % 3 == 0 {
                let i = (rng as usize / 3) % held.len();
                drop(held.swap_remove(i));
            }
            // Invariants while running.
            for st in l.rule_stats() {
                if &*st.rule == "default" {
                    prop_assert!(st.inflight <= 12 && st.watches <= 6);
                }
                // "shadowed" admits everything: its gauges are unbounded.
            }
            prop_assert!(l.upstream_inflight() <= 40);
        }
        // Drop the rest in random order.
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
        prop_assert!(before > 0);
        let evicted = l.evict_idle(now + Duration::from_secs(3600));
        prop_assert_eq!(evicted, before);
        prop_assert_eq!(l.identity_entries(), 0);
    }
}

#[test]
fn reload_keeps_the_state_of_an_unchanged_rule_and_refills_a_changed_one() {
    let text = r#"apiVersion: breakwater/v1alpha1
kind: Limits
rules:
  - name: a
    match: {users: ["a"]}
    perIdentity: {rate: 1, burst: 2, watches: 5}
  - name: b
    perIdentity: {rate: 1, burst: 2, watches: 5}
"#;
    let l = Limiter::new(limits(text));
    let now = Instant::now();
    let w = req("watch", "pods", "");
    let ra = admitted(l.admit(&user("a"), &w, now));
    let _ra2 = admitted(l.admit(&user("a"), &w, now));
    let rb = admitted(l.admit(&user("b"), &w, now));
    let _rb2 = admitted(l.admit(&user("b"), &w, now));
    assert_eq!(
        rejected(l.admit(&user("a"), &w, now)).reason,
        RejectReason::Rate
    );
    assert_eq!(
        rejected(l.admit(&user("b"), &w, now)).reason,
        RejectReason::Rate
    );

    // Same `a`; `b` tightened to 2 watches.
    l.reload(limits(&text.replace(
        "  - name: b\n    perIdentity: {rate: 1, burst: 2, watches: 5}",
        "  - name: b\n    perIdentity: {rate: 1, burst: 3, watches: 2}",
    )));
    assert_eq!(l.limits().rules()[1].per_identity().watches, Some(2));
    // `a` unchanged: its bucket is still empty.
    assert_eq!(
        rejected(l.admit(&user("a"), &w, now)).reason,
        RejectReason::Rate
    );
    // `b` changed: bucket refilled, but its 2 open watches still count, so
    // the tightened limit holds at once.
    let r = rejected(l.admit(&user("b"), &w, now));
    assert_eq!((r.reason, r.limit), (RejectReason::Watches, 2));
    drop(rb);
    let _rb3 = admitted(l.admit(&user("b"), &w, now));
    // Permits from before the reload release into the kept state.
    drop(ra);
    assert_eq!(l.rule_stats()[0].watches, 1);
}

#[test]
fn reload_resets_a_renamed_rule() {
    let text = "apiVersion: breakwater/v1alpha1\nkind: Limits\nrules:\n  - name: a\n    perIdentity: {rate: 1, burst: 1}\n";
    let l = Limiter::new(limits(text));
    let now = Instant::now();
    let r = req("get", "pods", "default");
    drop(admitted(l.admit(&user("x"), &r, now)));
    assert!(matches!(
        l.admit(&user("x"), &r, now),
        Decision::Rejected(_)
    ));
    l.reload(limits(&text.replace("name: a", "name: a2")));
    drop(admitted(l.admit(&user("x"), &r, now)));
}

#[test]
fn a_million_identities_stay_under_the_cap() {
    let text = "apiVersion: breakwater/v1alpha1\nkind: Limits\nrules:\n  - name: default\n    perIdentity: {rate: 10, burst: 10, inflight: 5}\n";
    let cap = 20_000;
    let l = Limiter::with_config(
        limits(text),
        LimiterConfig {
            max_identities: cap,
            ..LimiterConfig::default()
        },
    );
    let r = req("get", "pods", "default");
    let start = Instant::now();
    let mut name = String::with_capacity(32);
    let mut admitted_count = 0u64;
    for i in 0..1_000_000u64 {
        // 10 µs apart (10 s in all). An entry becomes evictable 100 ms after
        // its request (its bucket is full again); the map fills 200 ms after
        // each pressure sweep, and sweeps run at most once a second, so in
        // between new identities share the overflow state (and most of them
        // are rejected by its rate): bounded memory, strict limits.
        let now = start + Duration::from_micros(10 * i);
        name.clear();
        use std::fmt::Write;
        write!(name, "user-{i}").expect("write to String");
        if let Decision::Admitted(p) = l.admit(&user(&name), &r, now) {
            admitted_count += 1;
            drop(p);
        }
        assert!(
            l.identity_entries() <= cap,
            "at {i}: {}",
            l.identity_entries()
        );
    }
    assert!(l.identity_entries() <= cap);
    // Sweeps reclaimed room every second: about cap (20k) per second.
    assert!(admitted_count >= 9 * cap as u64, "{admitted_count}");
    assert!(l.evict_idle(start + Duration::from_secs(3600)) > 0);
    assert_eq!(l.identity_entries(), 0);
}

#[test]
fn when_full_with_nothing_evictable_new_identities_share_the_overflow_state() {
    let text = "apiVersion: breakwater/v1alpha1\nkind: Limits\nrules:\n  - name: default\n    perIdentity: {rate: 1, burst: 1, inflight: 1}\n";
    let l = Limiter::with_config(
        limits(text),
        LimiterConfig {
            max_identities: 2,
            ..LimiterConfig::default()
        },
    );
    let r = req("get", "pods", "default");
    let now = Instant::now();
    let _a = admitted(l.admit(&user("a"), &r, now));
    let _b = admitted(l.admit(&user("b"), &r, now));
    let _c = admitted(l.admit(&user("c"), &r, now));
    assert_eq!(l.identity_entries(), 2);
    // `d` shares the overflow state with `c`, whose slot is taken.
    assert_eq!(
        rejected(l.admit(&user("d"), &r, now)).reason,
        RejectReason::Inflight
    );
}

#[test]
fn blocks_reject_at_once_and_spare_exempt_traffic_unless_forced() {
    let l = Limiter::new(limits(EXAMPLE));
    let now = Instant::now();
    let list = req("list", "pods", "");
    let masters = vec!["system:masters".to_string()];
    let admin = Subject {
        user: "root",
        groups: &masters,
        ..Subject::default()
    };

    let mut b = Block::new(BlockTarget::Identity {
        user: AGENT.to_string(),
    });
    b.respond = BlockRespond::Status403;
    b.expires_at = Some(SystemTime::now() + Duration::from_secs(90));
    let id = b.id.clone();
    l.add_block(b).expect("block the agent");
    let r = rejected(l.admit(&user(AGENT), &list, now));
    assert_eq!((r.reason, r.status), (RejectReason::Blocked, 403));
    assert_eq!(r.block_id.as_deref(), Some(id.as_str()));
    assert!(r.retry_after > Duration::from_secs(80) && r.retry_after <= Duration::from_secs(90));
    assert!(l.remove_block(&id).is_some());
    drop(admitted(l.admit(&user(AGENT), &list, now)));

    // An exempt rule cannot be blocked by accident.
    let e = l.add_block(Block::new(BlockTarget::Rule {
        name: "admins".into(),
    }));
    assert!(matches!(e, Err(BlockError::Exempt(_))), "{e:?}");
    // Nor a rule that does not exist (it would never match), unless forced.
    let mut typo = Block::new(BlockTarget::Rule {
        name: "telemetry-agnets".into(),
    });
    let e = l.add_block(typo.clone());
    assert!(
        matches!(&e, Err(BlockError::UnknownRule(name, known)) if name == "telemetry-agnets" && known.contains("telemetry-agents")),
        "{e:?}"
    );
    typo.force = true;
    let typo_id = typo.id.clone();
    l.add_block(typo).expect("forced");
    assert!(l.remove_block(&typo_id).is_some());
    // A pattern block ("LIST pods cluster-wide") spares the admin.
    l.add_block(Block::new(BlockTarget::Pattern {
        verb: "list".into(),
        resource: "pods".into(),
        namespace: None,
    }))
    .expect("pattern");
    assert_eq!(
        rejected(l.admit(&user("bob"), &list, now)).reason,
        RejectReason::Blocked
    );
    drop(admitted(l.admit(
        &user("bob"),
        &req("list", "pods", "default"),
        now,
    )));
    drop(admitted(l.admit(&admin, &list, now)));
    // Forced: the admin too.
    let mut forced = Block::new(BlockTarget::Rule {
        name: "admins".into(),
    });
    forced.force = true;
    l.add_block(forced).expect("forced");
    assert_eq!(
        rejected(l.admit(&admin, &list, now)).reason,
        RejectReason::Blocked
    );
}

#[test]
fn pod_and_node_blocks_match_bound_tokens_and_count_their_hits() {
    let l = Limiter::new(limits(EXAMPLE));
    let now = Instant::now();
    let list = req("list", "pods", "");
    let nodes = vec!["system:nodes".to_string()];
    let agent_on = |pod, node| Subject {
        user: AGENT,
        pod: Some(pod),
        node: Some(node),
        ..Subject::default()
    };
    let (ns, _) = user(AGENT).service_account().expect("a ServiceAccount");
    let pod = Block::new(BlockTarget::Pod {
        namespace: ns.to_string(),
        name: "agent-1".into(),
    });
    let pod_id = pod.id.clone();
    l.add_block(pod).expect("pod block");
    let node = Block::new(BlockTarget::Node { name: "n7".into() });
    let node_id = node.id.clone();
    l.add_block(node).expect("node block");

    // The Pod: only its own token, and only in its ServiceAccount's namespace.
    let r = rejected(l.admit(&agent_on("agent-1", "n1"), &list, now));
    assert_eq!(r.block_id.as_deref(), Some(pod_id.as_str()));
    drop(admitted(l.admit(&agent_on("agent-2", "n1"), &list, now)));
    drop(admitted(l.admit(&user(AGENT), &list, now)));
    // The node: bound tokens naming it, and the node's own credentials.
    let r = rejected(l.admit(&agent_on("agent-9", "n7"), &list, now));
    assert_eq!(r.block_id.as_deref(), Some(node_id.as_str()));
    let kubelet = Subject {
        user: "system:node:n7",
        groups: &nodes,
        ..Subject::default()
    };
    assert_eq!(
        rejected(l.admit(&kubelet, &list, now)).block_id.as_deref(),
        Some(node_id.as_str())
    );

    let hits: Vec<_> = l
        .blocks()
        .statuses()
        .into_iter()
        .map(|s| (s.block.id, s.hits))
        .collect();
    assert_eq!(hits, vec![(pod_id, 1), (node_id, 2)]);

    // Empty names are refused.
    let e = l.add_block(Block::new(BlockTarget::Pod {
        namespace: String::new(),
        name: "x".into(),
    }));
    assert!(matches!(e, Err(BlockError::Empty("namespace"))), "{e:?}");
}

#[test]
fn blocks_expire_and_persist_atomically() {
    let lim = limits(EXAMPLE);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("blocks.json");
    assert!(
        Blocks::load(&path)
            .expect("missing file = empty")
            .is_empty()
    );

    let mut blocks = Blocks::new();
    let mut b = Block::new(BlockTarget::Rule {
        name: "telemetry-agents".into(),
    });
    b.reason = Some("incident 42".into());
    let mut short = Block::new(BlockTarget::Identity { user: "bob".into() });
    short.expires_at = Some(SystemTime::now() + Duration::from_secs(5));
    blocks.add(b.clone(), &lim).expect("add");
    blocks.add(short.clone(), &lim).expect("add");
    assert!(matches!(
        blocks.add(b.clone(), &lim),
        Err(BlockError::DuplicateId(_))
    ));
    blocks.save(&path).expect("save");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names.len(), 1, "no temporary file left: {names:?}");

    let mut loaded = Blocks::load(&path).expect("load");
    let list = loaded.list();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].reason.as_deref(), Some("incident 42"));
    assert_eq!(list[0].target, b.target);
    let gone = loaded.expire(SystemTime::now() + Duration::from_secs(6));
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].id, short.id);

    // The limiter enforces loaded blocks.
    let l = Limiter::new(lim);
    l.set_blocks(loaded);
    let r = rejected(l.admit(&user(AGENT), &req("watch", "pods", ""), Instant::now()));
    assert_eq!(&*r.rule, "telemetry-agents");
    assert_eq!(r.retry_after, breakwater_limits::BLOCK_RETRY_AFTER);

    std::fs::write(&path, "{\"nope\": 1}").expect("write");
    assert!(matches!(Blocks::load(&path), Err(BlockError::Parse { .. })));
}

#[test]
fn jitter_never_shortens_the_wait_and_spreads_retries() {
    let mut rng = rand::rng();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let j = jittered(Duration::from_millis(4200), &mut rng);
        assert!(
            j >= Duration::from_secs(5) && j <= Duration::from_secs(7),
            "{j:?}"
        );
        assert_eq!(j.subsec_nanos(), 0);
        seen.insert(j);
    }
    assert!(seen.len() > 1);
    assert!(jittered(Duration::ZERO, &mut rng) >= Duration::from_secs(1));
}

#[test]
fn explain_names_the_rule_its_limits_and_why_earlier_rules_failed() {
    let lim = limits(&EXAMPLE.replace("replicas: 1", "replicas: 2"));
    let e = explain(&lim, &user(AGENT), &req("watch", "pods", ""));
    let m = e.matched.as_ref().expect("matched");
    assert_eq!(m.name, "telemetry-agents");
    assert_eq!(e.skipped.len(), 1);
    let text = e.to_string();
    assert!(
        text.contains("rule `admins`: no match: no users/groups/serviceAccounts entry matches"),
        "{text}"
    );
    assert!(
        text.contains("rule `telemetry-agents` (#2) matches: mode enforce"),
        "{text}"
    );
    assert!(
        text.contains(
            "per identity: rate 5/s burst 10, inflight 4, watches 2, watchOpens 1/s burst 2"
        ),
        "{text}"
    );
    assert!(
        text.contains("aggregate (this replica, replicas=2): watches 25, watchOpens 5/s burst 10"),
        "{text}"
    );
    assert!(text.contains("a watch: takes a watch slot"), "{text}");
    assert!(
        text.contains("upstream (this replica): 200 seats, 25 reserved"),
        "{text}"
    );

    let e = explain(&lim, &user(AGENT), &req("get", "pods", "default"));
    assert_eq!(e.matched.as_ref().map(|m| m.name.as_str()), Some("default"));
    assert!(
        e.to_string()
            .contains("rule `telemetry-agents`: no match: the verb is not in `verbs`")
    );
}

#[test]
fn two_threads_never_exceed_limits_and_counts_return_to_zero() {
    let text = r#"apiVersion: breakwater/v1alpha1
kind: Limits
upstream: {maxInflight: 6, reservedForExempt: 1}
rules:
  - name: default
    perIdentity: {rate: 1000000, burst: 1000000, inflight: 3, watches: 2}
    aggregate: {inflight: 4, watches: 3}
"#;
    let l = Limiter::new(limits(text));
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..2 {
            let l = &l;
            s.spawn(move || {
                let names = ["a", "b", "c"];
                let mut held: Vec<Permit> = Vec::new();
                for i in 0..20_000usize {
                    let who = names[(i + t) % 3];
                    let r = if i % 3 == 0 {
                        req("watch", "pods", "")
                    } else {
                        req("get", "pods", "default")
                    };
                    let now = start + Duration::from_micros(i as u64);
                    if let Decision::Admitted(p) = l.admit(&user(who), &r, now) {
                        held.push(p);
                    }
                    let st = &l.rule_stats()[0];
                    assert!(st.inflight <= 4, "{st:?}");
                    assert!(st.watches <= 3, "{st:?}");
                    assert!(l.upstream_inflight() <= 5 + 2, "seats");
                    if held.len() > 2 || i % 5 == 0 {
                        held.remove(0);
                    }
                }
            });
        }
    });
    let st = &l.rule_stats()[0];
    assert_eq!((st.inflight, st.watches, l.upstream_inflight()), (0, 0, 0));
}

#[test]
fn a_block_parses_from_a_minimal_json_body() {
    let b: Block = serde_json::from_str(
        r#"{"target": {"kind": "pattern", "verb": "list", "resource": "pods"}, "respond": 403, "expiresAt": "2030-01-01T00:00:00Z"}"#,
    )
    .expect("minimal body");
    assert_eq!(b.id.len(), 16);
    assert_eq!(b.respond, BlockRespond::Status403);
    assert!(b.expires_at.is_some());
    assert!(matches!(
        b.target,
        BlockTarget::Pattern {
            namespace: None,
            ..
        }
    ));
    let bad = serde_json::from_str::<Block>(
        r#"{"target": {"kind": "rule", "name": "x"}, "respond": 500}"#,
    );
    assert!(bad.is_err());
    let json = serde_json::to_string(&b).expect("serialize");
    assert!(json.contains(r#""respond":403"#), "{json}");
    assert!(
        json.contains(r#""expiresAt":"2030-01-01T00:00:00.000Z""#),
        "{json}"
    );
}
