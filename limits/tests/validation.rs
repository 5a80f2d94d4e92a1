//! The limits file: the example parses, every error is reported with its
//! line, column and a hint, all semantic problems at once.

use breakwater_limits::{Charges, LimitsError, Mode, ValidatedLimits};

/// The file from the limits issue, verbatim: field names are an interface.
const ISSUE_EXAMPLE: &str = r#"apiVersion: breakwater/v1alpha1
kind: Limits
replicas: 1
upstream:
  maxInflight: 400
  reservedForExempt: 50
rules:
  - name: admins
    match:
      groups: ["system:masters"]
    exempt: true
  - name: telemetry-agents
    mode: enforce
    match:
      serviceAccounts: ["monitoring/node-agent"]
      verbs: ["list", "watch"]
      resources: ["pods", "nodes"]
    perIdentity:
      rate: 5
      burst: 10
      inflight: 4
      watches: 2
      watchOpens: {rate: 1, burst: 2}
    aggregate:
      watches: 50
      watchOpens: {rate: 10, burst: 20}
  - name: default
    perIdentity: {rate: 50, burst: 100, inflight: 20, watches: 100}
"#;

#[test]
fn the_issue_example_parses_and_validates() {
    let l = ValidatedLimits::from_yaml(ISSUE_EXAMPLE, "limits.yaml").expect("valid");
    assert_eq!(l.replicas(), 1);
    let up = l.upstream().expect("upstream");
    assert_eq!((up.max_inflight, up.reserved_for_exempt), (400, 50));
    let names: Vec<&str> = l.rules().iter().map(|r| r.name()).collect();
    assert_eq!(names, ["admins", "telemetry-agents", "default"]);
    assert!(l.rules()[0].is_exempt());
    let t = &l.rules()[1];
    assert_eq!(t.mode(), Mode::Enforce);
    let rate = t.per_identity().rate.expect("rate");
    assert_eq!((rate.rate, rate.burst), (5.0, 10));
    assert_eq!(t.per_identity().inflight, Some(4));
    assert_eq!(t.per_identity().watches, Some(2));
    assert_eq!(t.aggregate().watches, Some(50));
    let wo = t.aggregate().watch_opens.expect("watchOpens");
    assert_eq!((wo.rate, wo.burst), (10.0, 20));
}

#[test]
fn the_docker_example_file_parses_and_validates() {
    let text = include_str!("../../docker/limits.yaml");
    ValidatedLimits::from_yaml(text, "docker/limits.yaml").expect("docker/limits.yaml is valid");
}

#[test]
fn load_reads_a_file_and_reports_a_missing_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("limits.yaml");
    std::fs::write(&path, ISSUE_EXAMPLE).expect("write");
    assert!(ValidatedLimits::load(&path).is_ok());
    let err = ValidatedLimits::load(&dir.path().join("nope.yaml")).expect_err("missing");
    assert!(matches!(err, LimitsError::Read { .. }), "{err}");
}

#[test]
fn replicas_divide_aggregate_limits_and_upstream_but_not_per_identity() {
    let text = ISSUE_EXAMPLE.replace("replicas: 1", "replicas: 3");
    let l = ValidatedLimits::from_yaml(&text, "l.yaml").expect("valid");
    let up = l.upstream().expect("upstream");
    assert_eq!(up.max_inflight, 133);
    assert_eq!(up.reserved_for_exempt, 17, "the reserve rounds up");
    let t = &l.rules()[1];
    assert_eq!(t.aggregate().watches, Some(16));
    let wo = t.aggregate().watch_opens.expect("watchOpens");
    assert_eq!(wo.burst, 6);
    assert!((wo.rate - 10.0 / 3.0).abs() < 1e-9);
    assert_eq!(t.per_identity().watches, Some(2));
}

/// Asserts that `text` fails with exactly these `(line, column, message
/// fragment)` problems, each with a hint and the `FILE:LINE:COL:` format.
fn assert_problems(text: &str, want: &[(usize, usize, &str)]) {
    let err = ValidatedLimits::from_yaml(text, "f.yaml").expect_err("must be invalid");
    let got = err.problems();
    let shown = err.to_string();
    assert_eq!(got.len(), want.len(), "problems:\n{shown}");
    for (p, (line, col, frag)) in got.iter().zip(want) {
        assert_eq!((p.line, p.column), (*line, *col), "{p}");
        assert!(p.message.contains(frag), "{p} should mention {frag:?}");
        assert!(!p.hint.is_empty(), "{p}");
        assert!(
            p.to_string().starts_with(&format!("f.yaml:{line}:{col}: ")),
            "{p}"
        );
        assert!(p.to_string().contains(" (hint: "), "{p}");
    }
    assert_eq!(shown.lines().count(), want.len());
}

const HEAD: &str = "apiVersion: breakwater/v1alpha1\nkind: Limits\n";

#[test]
fn unknown_field_in_a_rule_is_located() {
    let text =
        format!("{HEAD}rules:\n  - name: a\n    perIdentity:\n      rate: 1\n      brust: 2\n");
    assert_problems(&text, &[(7, 7, "unknown field `brust`")]);
}

#[test]
fn unknown_top_level_field_is_located() {
    assert_problems(
        &format!("{HEAD}rule: []\n"),
        &[(3, 1, "unknown field `rule`")],
    );
}

#[test]
fn unknown_mode_is_located() {
    let text = format!("{HEAD}rules:\n  - name: a\n    mode: dry-run\n");
    assert_problems(&text, &[(5, 11, "unknown variant `dry-run`")]);
}

#[test]
fn a_syntax_error_is_located() {
    let text = format!("{HEAD}rules:\n  - name: a\n   bad: [\n");
    let err = ValidatedLimits::from_yaml(&text, "f.yaml").expect_err("syntax");
    let p = &err.problems()[0];
    assert!(p.line >= 4, "{p}");
    assert!(p.to_string().contains("(hint: "), "{p}");
}

#[test]
fn wrong_api_version_and_kind_are_both_reported() {
    assert_problems(
        "apiVersion: v1\nkind: Limit\n",
        &[(1, 13, "apiVersion `v1`"), (2, 7, "kind `Limit`")],
    );
}

#[test]
fn missing_api_version_is_reported() {
    assert_problems("kind: Limits\n", &[(1, 1, "missing field `apiVersion`")]);
}

#[test]
fn zero_and_negative_rates_and_small_bursts_are_all_reported_at_once() {
    let text = format!(
        "{HEAD}rules:\n  - name: a\n    perIdentity: {{rate: 0, burst: 5}}\n    match: {{verbs: [get]}}\n  - name: b\n    perIdentity:\n      rate: -2\n      burst: 0\n      watchOpens: {{rate: 1, burst: 0}}\n"
    );
    assert_problems(
        &text,
        &[
            (5, 25, "rate must be a positive number, got 0"),
            (9, 13, "rate must be a positive number, got -2"),
            (10, 14, "burst must be at least 1, got 0"),
            (11, 36, "burst must be at least 1, got 0"),
        ],
    );
}

#[test]
fn bad_globs_and_service_accounts_and_verbs_and_resources_are_located() {
    let text = format!(
        "{HEAD}rules:\n  - name: a\n    match:\n      users: [\"\"]\n      groups: [\"sys[tem]\"]\n      serviceAccounts: [\"monitoring\", \"ns/a{{b}}\"]\n      verbs: [\"LIST\"]\n      resources: [\"a/b/c/d\"]\n      namespaces: [\" kube-system\"]\n"
    );
    assert_problems(
        &text,
        &[
            (6, 15, "users: empty pattern"),
            (7, 16, "unsupported glob character `[`"),
            (8, 25, "not `namespace/name`"),
            (8, 39, "unsupported glob character `{`"),
            (9, 15, "unknown verb `LIST`"),
            (10, 19, "more than three"),
            (11, 20, "whitespace"),
        ],
    );
}

#[test]
fn duplicate_rule_names_point_at_the_second_and_name_the_first_line() {
    let text = format!("{HEAD}rules:\n  - name: a\n    match: {{users: [x]}}\n  - name: a\n");
    let err = ValidatedLimits::from_yaml(&text, "f.yaml").expect_err("dup");
    assert_problems(&text, &[(6, 11, "duplicate rule name `a`")]);
    assert!(err.problems()[0].hint.contains("line 4"), "{err}");
}

#[test]
fn reserved_for_exempt_above_max_inflight_is_located() {
    let text = format!("{HEAD}upstream:\n  maxInflight: 10\n  reservedForExempt: 11\n");
    assert_problems(
        &text,
        &[(5, 22, "reservedForExempt 11 is larger than maxInflight 10")],
    );
}

#[test]
fn zero_replicas_and_zero_inflight_and_negative_watches_are_located() {
    let text = format!(
        "{HEAD}replicas: 0\nrules:\n  - name: a\n    perIdentity: {{inflight: 0, watches: -1}}\n"
    );
    assert_problems(
        &text,
        &[
            (3, 11, "replicas must be at least 1"),
            (6, 29, "inflight must be at least 1"),
            (6, 41, "watches must be at least 0"),
        ],
    );
}

#[test]
fn a_rule_after_a_catch_all_is_unreachable() {
    let text =
        format!("{HEAD}rules:\n  - name: default\n  - name: late\n    match: {{users: [x]}}\n");
    assert_problems(&text, &[(5, 11, "rule `late` is never reached")]);
}

#[test]
fn exempt_rules_with_limits_are_refused() {
    let text =
        format!("{HEAD}rules:\n  - name: a\n    exempt: true\n    perIdentity: {{rate: 1}}\n");
    assert_problems(&text, &[(6, 18, "exempt, so its limits would be ignored")]);
}

#[test]
fn aggregate_limits_too_small_for_the_replicas_are_located() {
    let text = format!("{HEAD}replicas: 4\nrules:\n  - name: a\n    aggregate: {{watches: 3}}\n");
    assert_problems(&text, &[(6, 26, "leaves 0 per replica")]);
}

#[test]
fn rule_names_must_be_header_safe() {
    let text = format!("{HEAD}rules:\n  - name: \"a b\"\n");
    assert_problems(&text, &[(4, 11, "contains ` `")]);
}

#[test]
fn charges_defaults_to_all_and_reads_upstream() {
    let text = format!(
        "{HEAD}rules:\n  - name: fleet\n    match: {{users: [a]}}\n    charges: upstream\n    perIdentity: {{rate: 1}}\n  - name: default\n"
    );
    let l = ValidatedLimits::from_yaml(&text, "f.yaml").expect("valid");
    assert_eq!(l.rules()[0].charges(), Charges::Upstream);
    assert_eq!(l.rules()[1].charges(), Charges::All, "the default");
    let text = text.replace("charges: upstream", "charges: all");
    let l = ValidatedLimits::from_yaml(&text, "f.yaml").expect("valid");
    assert_eq!(l.rules()[0].charges(), Charges::All);
}

#[test]
fn an_unknown_charges_value_is_located_with_the_values_allowed() {
    let text = format!("{HEAD}rules:\n  - name: fleet\n    charges: cache\n");
    assert_problems(&text, &[(5, 14, "unknown variant `cache`")]);
    let err = ValidatedLimits::from_yaml(&text, "f.yaml").expect_err("invalid");
    let shown = err.to_string();
    assert!(
        shown.contains("`all`") && shown.contains("`upstream`"),
        "{shown}"
    );
}

#[test]
fn charges_on_an_exempt_rule_is_an_error() {
    let text = format!("{HEAD}rules:\n  - name: admins\n    exempt: true\n    charges: upstream\n");
    assert_problems(&text, &[(6, 14, "is exempt, so it charges nothing")]);
}

#[test]
fn the_lab_files_charge_the_storm_fleet_only_upstream() {
    for (name, text) in [
        (
            "docker/limits.yaml",
            include_str!("../../docker/limits.yaml"),
        ),
        (
            "docker/limits-storm.yaml",
            include_str!("../../docker/limits-storm.yaml"),
        ),
    ] {
        let l = ValidatedLimits::from_yaml(text, name).expect("valid");
        let fleet = l
            .rules()
            .iter()
            .find(|r| r.name() == "telemetry-agents")
            .expect("the fleet's rule");
        assert_eq!(fleet.charges(), Charges::Upstream, "{name}");
    }
}
