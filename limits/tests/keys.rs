//! A rule's `key`: per-identity limits counted per Pod, node or
//! ServiceAccount instead of per user, and what happens to a request
//! without the key.

use std::time::{Duration, Instant};

use breakwater_limits::{
    Decision, Key, Limiter, LimiterConfig, Permit, RejectReason, Rejection, RequestAttrs, Subject,
    ValidatedLimits, explain,
};

const AGENT: &str = "system:serviceaccount:monitoring:node-agent";

fn limits(key: &str, on_missing: Option<&str>, mode: &str) -> ValidatedLimits {
    let on_missing = on_missing
        .map(|m| format!("    onMissingKey: {m}\n"))
        .unwrap_or_default();
    let text = format!(
        r#"apiVersion: breakwater/v1alpha1
kind: Limits
rules:
  - name: agents
    mode: {mode}
    key: {key}
{on_missing}    match: {{serviceAccounts: ["monitoring/*"], groups: ["system:nodes"]}}
    perIdentity: {{watches: 1}}
"#
    );
    ValidatedLimits::from_yaml(&text, "keys.yaml").expect("valid limits")
}

fn watch() -> RequestAttrs<'static> {
    RequestAttrs {
        verb: "watch",
        api_group: "",
        resource: "pods",
        subresource: "",
        namespace: "",
        is_resource_request: true,
    }
}

fn agent<'a>(pod: Option<&'a str>, node: Option<&'a str>) -> Subject<'a> {
    Subject {
        user: AGENT,
        groups: &[],
        pod,
        node,
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
fn each_pod_of_one_service_account_gets_its_own_watch_cap() {
    let l = Limiter::new(limits("pod", None, "enforce"));
    let now = Instant::now();
    let a = admitted(l.admit(&agent(Some("agent-a"), None), &watch(), now));
    let b = admitted(l.admit(&agent(Some("agent-b"), None), &watch(), now));
    let again = rejected(l.admit(&agent(Some("agent-a"), None), &watch(), now));
    assert_eq!(again.reason, RejectReason::Watches);
    assert_eq!(l.identity_entries(), 2);
    drop((a, b));
}

#[test]
fn a_pod_name_is_qualified_by_its_service_account() {
    let l = Limiter::new(limits("pod", None, "enforce"));
    let now = Instant::now();
    let other = Subject {
        user: "system:serviceaccount:monitoring:other",
        ..agent(Some("same-name"), None)
    };
    let _a = admitted(l.admit(&agent(Some("same-name"), None), &watch(), now));
    let _b = admitted(l.admit(&other, &watch(), now));
}

#[test]
fn a_request_without_a_pod_falls_back_to_its_user_by_default() {
    let l = Limiter::new(limits("pod", None, "enforce"));
    let now = Instant::now();
    let _pod = admitted(l.admit(&agent(Some("agent-a"), None), &watch(), now));
    // Legacy tokens (no pod) share the user's state: one watch for all.
    let _one = admitted(l.admit(&agent(None, None), &watch(), now));
    let two = rejected(l.admit(&agent(None, None), &watch(), now));
    assert_eq!(two.reason, RejectReason::Watches);
}

#[test]
fn a_request_without_a_pod_is_refused_with_403_when_the_rule_says_so() {
    let l = Limiter::new(limits("pod", Some("refuse"), "enforce"));
    let r = rejected(l.admit(&agent(None, None), &watch(), Instant::now()));
    assert_eq!(r.reason, RejectReason::MissingKey(Key::Pod));
    assert_eq!(r.status, 403);
    assert_eq!(r.reason.as_str(), "missing_key");
    assert_eq!(
        l.identity_entries(),
        0,
        "a refused request creates no state"
    );
}

#[test]
fn a_shadow_rule_admits_a_request_without_its_key_and_reports_it() {
    let l = Limiter::new(limits("pod", Some("refuse"), "shadow"));
    let p = admitted(l.admit(&agent(None, None), &watch(), Instant::now()));
    let would = p.shadow_rejection().expect("would-be rejection");
    assert_eq!(would.reason, RejectReason::MissingKey(Key::Pod));
}

#[test]
fn node_comes_from_the_token_or_from_a_nodes_own_credentials() {
    let l = Limiter::new(limits("node", Some("refuse"), "enforce"));
    let now = Instant::now();
    // Two agents on node-1 share its cap; node-2's agent has its own.
    let _a = admitted(l.admit(&agent(Some("a"), Some("node-1")), &watch(), now));
    let r = rejected(l.admit(&agent(Some("b"), Some("node-1")), &watch(), now));
    assert_eq!(r.reason, RejectReason::Watches);
    let _c = admitted(l.admit(&agent(Some("c"), Some("node-2")), &watch(), now));
    // The kubelet of node-2 (client certificate CN system:node:node-2, O
    // system:nodes) counts with node-2's agents.
    let nodes = vec!["system:nodes".to_string()];
    let kubelet = Subject {
        user: "system:node:node-2",
        groups: &nodes,
        ..Subject::default()
    };
    let r = rejected(l.admit(&kubelet, &watch(), now));
    assert_eq!(r.reason, RejectReason::Watches);
    // A node's name without the group is not a node: no key, refused.
    let impostor = Subject {
        user: "system:node:node-3",
        groups: &nodes[..0],
        ..Subject::default()
    };
    assert_eq!(kubelet.node_name(), Some("node-2"));
    assert_eq!(impostor.node_name(), None);
    // A token without node-name (before Kubernetes 1.30) lacks the key.
    let r = rejected(l.admit(&agent(Some("d"), None), &watch(), now));
    assert_eq!(r.reason, RejectReason::MissingKey(Key::Node));
}

#[test]
fn service_account_key_refuses_other_users() {
    let l = Limiter::new(limits("serviceAccount", Some("refuse"), "enforce"));
    let now = Instant::now();
    let _a = admitted(l.admit(&agent(Some("a"), None), &watch(), now));
    // Every pod of the ServiceAccount shares its state.
    let r = rejected(l.admit(&agent(Some("b"), None), &watch(), now));
    assert_eq!(r.reason, RejectReason::Watches);
    let nodes = vec!["system:nodes".to_string()];
    let kubelet = Subject {
        user: "system:node:n1",
        groups: &nodes,
        ..Subject::default()
    };
    let r = rejected(l.admit(&kubelet, &watch(), now));
    assert_eq!(r.reason, RejectReason::MissingKey(Key::ServiceAccount));
}

#[test]
fn per_pod_state_stays_bounded_and_idle_pods_are_evicted() {
    let cfg = LimiterConfig {
        max_identities: 100,
        idle_after: Duration::from_secs(1),
        pressure_sweep_interval: Duration::from_secs(1),
    };
    let l = Limiter::with_config(limits("pod", None, "enforce"), cfg);
    let now = Instant::now();
    for i in 0..1000 {
        let pod = format!("agent-{i}");
        drop(admitted(l.admit(&agent(Some(&pod), None), &watch(), now)));
    }
    assert!(
        l.identity_entries() <= 102,
        "entries {}",
        l.identity_entries()
    );
    assert!(l.evict_idle(now + Duration::from_secs(2)) > 0);
    assert_eq!(l.identity_entries(), 0);
}

#[test]
fn explain_names_the_key_and_what_a_request_without_it_gets() {
    let lim = limits("pod", Some("refuse"), "enforce");
    let text = explain(&lim, &agent(Some("agent-a"), None), &watch()).to_string();
    assert!(
        text.contains("per pod (key pod, from a bound ServiceAccount token's pod"),
        "{text}"
    );
    assert!(text.contains("refused with 403"), "{text}");
    assert!(
        text.contains("this request: pod monitoring/agent-a"),
        "{text}"
    );
    let text = explain(&lim, &agent(None, None), &watch()).to_string();
    assert!(
        text.contains("this request: no pod in its credentials"),
        "{text}"
    );
}

#[test]
fn key_and_on_missing_key_are_validated() {
    let bad = |rule: &str| {
        let text =
            format!("apiVersion: breakwater/v1alpha1\nkind: Limits\nrules:\n  - name: r\n{rule}");
        ValidatedLimits::from_yaml(&text, "k.yaml")
            .expect_err("invalid")
            .to_string()
    };
    let e = bad("    key: pod\n    aggregate: {watches: 3}\n");
    assert!(
        e.contains("k.yaml:5:10: rule `r` has `key: pod` but no perIdentity"),
        "{e}"
    );
    let e = bad("    onMissingKey: refuse\n    perIdentity: {watches: 3}\n");
    assert!(
        e.contains("keys on the user, which every request has"),
        "{e}"
    );
    let e = bad("    key: pods\n    perIdentity: {watches: 3}\n");
    assert!(e.contains("unknown variant `pods`"), "{e}");
}
