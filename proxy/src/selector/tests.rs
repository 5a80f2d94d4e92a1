//! The selector grammar case by case, with the apiserver quirks spelled out;
//! proptest for "never panics". The differential test against kube-sim is in
//! proxy/tests/selector_differential.rs.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn label_matches(selector: &str, pairs: &[(&str, &str)]) -> bool {
    LabelSelector::parse(selector)
        .unwrap_or_else(|err| panic!("{selector:?} should parse: {err}"))
        .matches(&labels(pairs))
}

#[test]
fn label_selectors_are_validated_like_labels_parse() {
    let valid = [
        "",
        "   ",
        "x=a",
        "x==a",
        "x!=a",
        "x=",
        "x",
        "!x",
        "! x",
        "x in (a,b)",
        "x notin (a)",
        "x in ()",
        "x in (,a)",
        "x in (a,)",
        "x in (,)",
        "x in (a,,b)",
        "x in (a,,,)",
        "x>1",
        "x<01",
        "in in (a)",
        "example.com/x=a,y",
        "x=a , y!=b",
        " \t\r\nx\t=\na\r",
        "in=in",
        "notin",
        "!in",
        "x in (in,notin)",
        "x=in",
        "x notin(a)",
        "x=a,in,!notin",
        // Go's lexer reads a NUL byte as the end of input where a token starts,
        // and skips one right after a token.
        "x \u{0}garbage",
        "x\u{0}",
        "\u{0}((",
        "x=\u{0}a",
        "x=a\u{0},y",
    ];
    let invalid = [
        ",",
        "x=a,",
        "x,,y",
        ",x",
        "-x",
        "x-=a",
        "x=-a",
        "x>a",
        "x>",
        "x>-2",
        "x<1.5",
        "x>99999999999999999999",
        "x>(1)",
        "x\u{0}garbage=y",
        "x in",
        "x in (a",
        "x in a",
        "x in (a,,)",
        "x in (,,)",
        "x in (a b)",
        "x in (=)",
        "x = in (a)",
        "!x=a",
        "!!x",
        "x=a b",
        "x=a=b",
        "x===a",
        "x=(a)",
        "x y",
        "x gt 1",
        "x !",
        "x\u{b}=a",
        "x\u{a0}=a",
        "x=\u{c}",
        "/x",
        "x/",
        "Example.com/x",
        "a/b/c",
        "x>+1",
        "=x",
        "(",
        "x=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        "é=a",
    ];
    for selector in valid {
        assert!(
            LabelSelector::parse(selector).is_ok(),
            "{selector:?}: {:?}",
            LabelSelector::parse(selector)
        );
    }
    for selector in invalid {
        assert!(LabelSelector::parse(selector).is_err(), "{selector:?}");
    }
}

#[test]
fn label_keys_take_a_dns_subdomain_prefix_and_a_63_character_name() {
    let name63 = "n".repeat(63);
    let prefix253 = format!("{}.{}", "a".repeat(126), "b".repeat(126));
    assert!(LabelSelector::parse(&name63).is_ok());
    assert!(LabelSelector::parse(&format!("{prefix253}/{name63}")).is_ok());
    assert!(LabelSelector::parse(&format!("{prefix253}b/x")).is_err());
    assert!(LabelSelector::parse("a..b/x").is_err());
    assert!(LabelSelector::parse("-a.b/x").is_err());
    assert!(LabelSelector::parse("a_b/x").is_err());
    assert!(LabelSelector::parse("a-b.c9/X_y.Z").is_ok());
    assert!(LabelSelector::parse(&format!("k={}", "v".repeat(63))).is_ok());
}

#[test]
fn equality_and_sets_match_like_requirement_matches() {
    let blue = [("team", "blue"), ("n", "5"), ("empty", "")];
    assert!(label_matches("team=blue", &blue));
    assert!(label_matches("team==blue,n", &blue));
    assert!(!label_matches("team=red", &blue));
    assert!(label_matches("team in (red, blue)", &blue));
    assert!(!label_matches("team notin (red,blue)", &blue));
    assert!(label_matches("team notin (red)", &blue));
    // `!=` and `notin` also select objects without the label.
    assert!(label_matches("owner!=x", &blue));
    assert!(label_matches("owner notin (x)", &blue));
    assert!(!label_matches("owner in (x)", &blue));
    assert!(label_matches("!owner", &blue));
    assert!(!label_matches("!team", &blue));
    assert!(label_matches("", &blue));
    assert!(label_matches("", &[]));
}

#[test]
fn empty_values_select_the_empty_label_value() {
    let with_empty = [("empty", "")];
    for selector in ["empty=", "empty in ()", "empty in (,x)", "empty in (x,)"] {
        assert!(label_matches(selector, &with_empty), "{selector}");
        assert!(!label_matches(selector, &[]), "{selector}");
    }
    assert!(!label_matches("empty notin ()", &with_empty));
    assert!(label_matches("empty notin ()", &[("empty", "x")]));
    assert!(!label_matches("empty=", &[("empty", "x")]));
}

#[test]
fn comparisons_need_an_integer_label() {
    let five = [("n", "5")];
    assert!(label_matches("n>3", &five));
    assert!(label_matches("n<6", &five));
    assert!(!label_matches("n>5", &five));
    assert!(!label_matches("m>3", &five));
    assert!(!label_matches("n>3", &[("n", "x")]));
    assert!(label_matches("n<3", &[("n", "-7")]));
    assert!(label_matches("n>3", &[("n", "+7")]));
    assert!(!label_matches("n>3", &[("n", "07.0")]));
}

#[test]
fn keywords_are_identifiers_where_values_go() {
    let sel = LabelSelector::parse("in=notin,notin in (in)").expect("valid");
    assert_eq!(sel.requirements().len(), 2);
    assert_eq!(sel.requirements()[0].key(), "in");
    assert_eq!(
        sel.requirements()[0].operator(),
        &Operator::In(vec!["notin".to_owned()])
    );
    assert!(sel.matches(&labels(&[("in", "notin"), ("notin", "in")])));
}

#[test]
fn set_values_are_sorted_without_duplicates() {
    let sel = LabelSelector::parse("x in (b,,a,b)").expect("valid");
    assert_eq!(
        sel.requirements()[0].operator(),
        &Operator::In(vec![String::new(), "a".to_owned(), "b".to_owned()])
    );
}

#[test]
fn label_errors_use_the_apiserver_wording() {
    let err = |s: &str| LabelSelector::parse(s).expect_err(s).to_string();
    assert_eq!(
        err("x y"),
        "found 'y', expected: in, notin, =, ==, !=, gt, lt"
    );
    assert_eq!(err("x=a,"), "found '', expected: identifier after ','");
    assert_eq!(err("x in (a,,)"), "found ')', expected: ',', or identifier");
    assert!(err("-x").starts_with("unable to parse requirement: key: Invalid value: \"-x\""));
    assert!(err("x>a").contains("the value must be an integer"));
}

#[test]
fn field_selectors_parse_like_fields_parse_selector() {
    let valid = [
        "",
        ",",
        "a=b",
        "a==b",
        "a!=b",
        "a=",
        "=b",
        "=",
        "a=b,",
        ",a=b,,c!=d",
        "a\\=b",
        "a b = c",
        "a=b\\,c",
        "a=b\\=c",
        "a=b\\\\c",
        "a!b=c",
        "spec.nodeName=node-1,metadata.name=x",
    ];
    let invalid = [
        "a",
        "a=b,c",
        "a=b=c",
        "a==b=c",
        "a===b",
        "a!==b",
        "a=b\\",
        "a=b\\x",
        "a\\=b=c",
        "a=b\\,c\\",
        "\\,",
    ];
    for selector in valid {
        assert!(
            FieldSelector::parse(selector).is_ok(),
            "{selector:?}: {:?}",
            FieldSelector::parse(selector)
        );
    }
    for selector in invalid {
        assert!(FieldSelector::parse(selector).is_err(), "{selector:?}");
    }
}

#[test]
fn field_terms_split_at_the_first_operator() {
    let term = |s: &str| {
        let sel = FieldSelector::parse(s).expect(s);
        let t = &sel.terms()[0];
        (t.field().to_owned(), t.op(), t.value().to_owned())
    };
    assert_eq!(term("a=b"), ("a".into(), FieldOp::Equals, "b".into()));
    assert_eq!(term("a==b"), ("a".into(), FieldOp::Equals, "b".into()));
    assert_eq!(term("a!=b"), ("a".into(), FieldOp::NotEquals, "b".into()));
    // The name has no escapes: the backslash is part of it.
    assert_eq!(term("a\\=b"), ("a\\".into(), FieldOp::Equals, "b".into()));
    assert_eq!(term("a=x\\,y"), ("a".into(), FieldOp::Equals, "x,y".into()));
    assert_eq!(term("a=x\\\\"), ("a".into(), FieldOp::Equals, "x\\".into()));
    assert_eq!(term(" a = b"), (" a ".into(), FieldOp::Equals, " b".into()));
}

#[test]
fn exact_match_takes_the_first_equality_in_sorted_order() {
    let exact = |s: &str| {
        FieldSelector::parse(s)
            .expect(s)
            .requires_exact_match("metadata.name")
            .map(str::to_owned)
    };
    assert_eq!(exact("metadata.name=x"), Some("x".into()));
    assert_eq!(exact("metadata.name==x"), Some("x".into()));
    assert_eq!(exact("metadata.name!=x"), None);
    assert_eq!(exact("metadata.name=b,metadata.name=a"), Some("a".into()));
    assert_eq!(exact("metadata.name!=a,metadata.name=b"), Some("b".into()));
    assert_eq!(exact("metadata.name=a\\,b"), Some("a,b".into()));
    assert_eq!(exact("spec.nodeName=n"), None);
    assert_eq!(exact(""), None);
}

#[test]
fn field_selectors_compare_whole_values() {
    let fields: BTreeMap<String, String> = [("spec.nodeName", "n1"), ("status.phase", "Running")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let matches = |s: &str| FieldSelector::parse(s).expect(s).matches(&fields);
    assert!(matches("spec.nodeName=n1"));
    assert!(matches("spec.nodeName=n1,status.phase!=Pending"));
    assert!(!matches("spec.nodeName=n"));
    // A field the object lacks reads as "".
    assert!(matches("spec.other="));
    assert!(!matches("spec.other!="));
    assert!(matches(""));
}

#[test]
fn field_errors_use_the_apiserver_wording() {
    let err = |s: &str| FieldSelector::parse(s).expect_err(s).to_string();
    assert_eq!(
        err("abc"),
        "invalid selector: 'abc'; can't understand 'abc'"
    );
    assert_eq!(
        err("a=b\\x"),
        "invalid field selector: invalid escape sequence: \\x"
    );
    assert_eq!(
        err("a=b=c"),
        "invalid field selector: unescaped character in value: 61"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parsers_never_panic(selector in any::<String>()) {
        if let Ok(sel) = LabelSelector::parse(&selector) {
            let _ = sel.matches(&labels(&[("a", "1")]));
        }
        if let Ok(sel) = FieldSelector::parse(&selector) {
            let _ = sel.requires_exact_match("metadata.name");
        }
    }

    #[test]
    fn label_grammar_soup_never_panics(selector in "[a-z!=,() <>\t\u{0}in]{0,30}") {
        let _ = LabelSelector::parse(&selector);
    }

    #[test]
    fn equality_selects_exactly_that_value(want in "[a-z0-9]{1,10}", have in "[a-z0-9]{1,10}") {
        let present = labels(&[("k", &have)]);
        let eq = LabelSelector::parse(&format!("k={want}")).expect("valid");
        prop_assert_eq!(eq.matches(&present), want == have);
        let ne = LabelSelector::parse(&format!("k!={want}")).expect("valid");
        prop_assert_eq!(ne.matches(&present), want != have);
    }
}
