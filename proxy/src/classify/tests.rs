//! Tables ported from apiserver's requestinfo_test.go (same inputs, same expected
//! outputs), plus watch detection, selector use, list_params and fuzzing.

use super::*;
use http::Method;
use proptest::prelude::*;

fn method(name: &str) -> Method {
    Method::from_bytes(name.as_bytes()).expect("test method is a valid token")
}

/// Splits a test URL like `http.NewRequest` does into path and query.
fn classify_url(method_name: &str, url: &str) -> RequestInfo {
    let (path, query) = match url.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (url, None),
    };
    classify(&method(method_name), path, query)
}

/// method, url, verb, prefix, group, version, namespace, resource, subresource, name, parts
type ApiCase = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
);

#[test]
fn get_api_request_info_matches_apiserver_table() {
    // (Go's table says prefix "api" for /apis/... rows but never checks it; we check
    // the real prefix.)
    #[rustfmt::skip]
    let cases: &[ApiCase] = &[
        // resource paths
        ("GET", "/api/v1/namespaces", "list", "api", "", "v1", "", "namespaces", "", "", &["namespaces"]),
        ("GET", "/api/v1/namespaces/other", "get", "api", "", "v1", "other", "namespaces", "", "other", &["namespaces", "other"]),
        ("GET", "/api/v1/namespaces/other/pods", "list", "api", "", "v1", "other", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/namespaces/other/pods/foo", "get", "api", "", "v1", "other", "pods", "", "foo", &["pods", "foo"]),
        ("HEAD", "/api/v1/namespaces/other/pods/foo", "get", "api", "", "v1", "other", "pods", "", "foo", &["pods", "foo"]),
        ("GET", "/api/v1/pods", "list", "api", "", "v1", "", "pods", "", "", &["pods"]),
        ("HEAD", "/api/v1/pods", "list", "api", "", "v1", "", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/namespaces/other/pods/foo", "get", "api", "", "v1", "other", "pods", "", "foo", &["pods", "foo"]),
        ("GET", "/api/v1/namespaces/other/pods", "list", "api", "", "v1", "other", "pods", "", "", &["pods"]),
        // special verbs
        ("GET", "/api/v1/proxy/namespaces/other/pods/foo", "proxy", "api", "", "v1", "other", "pods", "", "foo", &["pods", "foo"]),
        ("GET", "/api/v1/proxy/namespaces/other/pods/foo/subpath/not/a/subresource", "proxy", "api", "", "v1", "other", "pods", "", "foo", &["pods", "foo", "subpath", "not", "a", "subresource"]),
        ("GET", "/api/v1/watch/pods", "watch", "api", "", "v1", "", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/pods?watch=true", "watch", "api", "", "v1", "", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/pods?watch=false", "list", "api", "", "v1", "", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/watch/namespaces/other/pods", "watch", "api", "", "v1", "other", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/namespaces/other/pods?watch=1", "watch", "api", "", "v1", "other", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/namespaces/other/pods?watch=0", "list", "api", "", "v1", "other", "pods", "", "", &["pods"]),
        // subresource identification
        ("GET", "/api/v1/namespaces/other/pods/foo/status", "get", "api", "", "v1", "other", "pods", "status", "foo", &["pods", "foo", "status"]),
        ("GET", "/api/v1/namespaces/other/pods/foo/proxy/subpath", "get", "api", "", "v1", "other", "pods", "proxy", "foo", &["pods", "foo", "proxy", "subpath"]),
        // More segments than classify keeps on the stack (16).
        ("GET", "/apis/g/v1/namespaces/other/pods/foo/proxy/a/b/c/d/e/f/g/h/i/j/k", "get", "apis", "g", "v1", "other", "pods", "proxy", "foo", &["pods", "foo", "proxy", "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"]),
        ("PUT", "/api/v1/namespaces/other/finalize", "update", "api", "", "v1", "other", "namespaces", "finalize", "other", &["namespaces", "other", "finalize"]),
        ("PUT", "/api/v1/namespaces/other/status", "update", "api", "", "v1", "other", "namespaces", "status", "other", &["namespaces", "other", "status"]),
        // verb identification
        ("PATCH", "/api/v1/namespaces/other/pods/foo", "patch", "api", "", "v1", "other", "pods", "", "foo", &["pods", "foo"]),
        ("DELETE", "/api/v1/namespaces/other/pods/foo", "delete", "api", "", "v1", "other", "pods", "", "foo", &["pods", "foo"]),
        ("POST", "/api/v1/namespaces/other/pods", "create", "api", "", "v1", "other", "pods", "", "", &["pods"]),
        // deletecollection verb identification
        ("DELETE", "/api/v1/nodes", "deletecollection", "api", "", "v1", "", "nodes", "", "", &["nodes"]),
        ("DELETE", "/api/v1/namespaces", "deletecollection", "api", "", "v1", "", "namespaces", "", "", &["namespaces"]),
        ("DELETE", "/api/v1/namespaces/other/pods", "deletecollection", "api", "", "v1", "other", "pods", "", "", &["pods"]),
        ("DELETE", "/apis/extensions/v1/namespaces/other/pods", "deletecollection", "apis", "extensions", "v1", "other", "pods", "", "", &["pods"]),
        // api group identification
        ("POST", "/apis/extensions/v1/namespaces/other/pods", "create", "apis", "extensions", "v1", "other", "pods", "", "", &["pods"]),
        // api version identification
        ("POST", "/apis/extensions/v1beta3/namespaces/other/pods", "create", "apis", "extensions", "v1beta3", "other", "pods", "", "", &["pods"]),
    ];
    for &(m, url, verb, prefix, group, version, namespace, resource, subresource, name, parts) in
        cases
    {
        let info = classify_url(m, url);
        let context = format!("{m} {url}: {info:?}");
        assert!(info.is_resource_request, "{context}");
        assert_eq!(info.error, None, "{context}");
        assert_eq!(info.verb.as_str(), verb, "{context}");
        assert_eq!(info.api_prefix, prefix, "{context}");
        assert_eq!(info.api_group, group, "{context}");
        assert_eq!(info.api_version, version, "{context}");
        assert_eq!(info.namespace, namespace, "{context}");
        assert_eq!(info.resource, resource, "{context}");
        assert_eq!(info.subresource, subresource, "{context}");
        assert_eq!(info.name, name, "{context}");
        assert_eq!(info.parts().collect::<Vec<_>>(), parts, "{context}");
    }
}

#[test]
fn get_api_request_info_error_cases_are_non_resource_requests() {
    for url in [
        "/",
        "/api/version/",
        "/apis/group/version/",
        "/badprefix/version/resource",
        "/apis/version/resource",
    ] {
        let info = classify_url("GET", url);
        assert!(!info.is_resource_request, "{url}: {info:?}");
        assert_eq!(info.error, None, "{url}");
        assert_eq!(info.verb.as_str(), "get", "{url}");
    }
}

#[test]
fn get_non_api_request_info_matches_apiserver_table() {
    let cases = [
        ("/api/version/resource", true),
        ("/apis/group/version/resource/name/subresource", true),
        ("/api/version/resource/name/subresource", true),
        ("/apis/batch/v1/job", true),
        ("/apis/batch/v1/job/foo", true),
        ("/apis/batch/v1/job/foo/scale", true),
        ("/not-api/version/resource", false),
        ("/apis/extensions/v1beta1", false),
        ("/apis/extensions/v1beta1/", false),
        ("/api/version", false),
        ("/api", false),
        ("/", false),
        ("", false),
    ];
    for (url, expected) in cases {
        assert_eq!(
            classify_url("GET", url).is_resource_request,
            expected,
            "{url}"
        );
    }
}

#[test]
fn selector_parsing_matches_apiserver_table() {
    // name, method, url, expected name, verb, fieldSelector, labelSelector
    #[rustfmt::skip]
    let cases = [
        ("no selector", "GET", "/apis/group/version/resource", "", "list", "", ""),
        ("metadata.name selector", "GET", "/apis/group/version/resource?fieldSelector=metadata.name=name1", "name1", "list", "metadata.name=name1", ""),
        ("metadata.name selector with watch", "GET", "/apis/group/version/resource?watch=true&fieldSelector=metadata.name=name1", "name1", "watch", "metadata.name=name1", ""),
        ("random selector", "GET", "/apis/group/version/resource?fieldSelector=foo=bar&labelSelector=baz=qux", "", "list", "foo=bar", "baz=qux"),
        ("invalid selector with metadata.name", "GET", "/apis/group/version/resource?fieldSelector=metadata.name=name1,foo", "", "list", "metadata.name=name1,foo", ""),
        ("invalid selector with metadata.name with watch", "GET", "/apis/group/version/resource?fieldSelector=metadata.name=name1,foo&watch=true", "", "watch", "metadata.name=name1,foo", ""),
        ("invalid selector with metadata.name with watch false", "GET", "/apis/group/version/resource?fieldSelector=metadata.name=name1,foo&watch=false", "", "list", "metadata.name=name1,foo", ""),
        ("selector on deletecollection is honored", "DELETE", "/apis/group/version/resource?fieldSelector=foo=bar&labelSelector=baz=qux", "", "deletecollection", "foo=bar", "baz=qux"),
        ("selector on repeated param matches parsed param", "GET", "/apis/group/version/resource?fieldSelector=metadata.name=foo&fieldSelector=metadata.name=bar&labelSelector=foo=bar&labelSelector=foo=baz", "foo", "list", "metadata.name=foo", "foo=bar"),
        ("selector on other verb is ignored", "GET", "/apis/group/version/resource/name?fieldSelector=foo=bar&labelSelector=foo=bar", "name", "get", "", ""),
        ("selector on deprecated root type watch is not parsed", "GET", "/apis/group/version/watch/resource?fieldSelector=metadata.name=foo&labelSelector=foo=bar", "", "watch", "", ""),
        ("selector on deprecated root item watch is not parsed", "GET", "/apis/group/version/watch/resource/name?fieldSelector=metadata.name=foo&labelSelector=foo=bar", "name", "watch", "", ""),
    ];
    for (name, m, url, expected_name, verb, field_selector, label_selector) in cases {
        let info = classify_url(m, url);
        assert_eq!(info.name, expected_name, "{name}: {info:?}");
        assert_eq!(info.verb.as_str(), verb, "{name}");
        assert_eq!(info.field_selector, field_selector, "{name}");
        assert_eq!(info.label_selector, label_selector, "{name}");
    }
}

#[test]
fn older_field_selector_table_still_holds() {
    // TestFieldSelectorParsing from the pre-1.31 test file (same URLs, name and verb).
    let cases = [
        ("/apis/group/version/resource", "", "list"),
        (
            "/apis/group/version/resource?fieldSelector=metadata.name=name1",
            "name1",
            "list",
        ),
        (
            "/apis/group/version/resource?watch=true&fieldSelector=metadata.name=name1",
            "name1",
            "watch",
        ),
        (
            "/apis/group/version/resource?fieldSelector=foo=bar",
            "",
            "list",
        ),
        (
            "/apis/group/version/resource?fieldSelector=metadata.name=name1,foo",
            "",
            "list",
        ),
        (
            "/apis/group/version/resource?fieldSelector=metadata.name=name1,foo&watch=true",
            "",
            "watch",
        ),
        (
            "/apis/group/version/resource?fieldSelector=metadata.name=name1,foo&watch=false",
            "",
            "list",
        ),
    ];
    for (url, name, verb) in cases {
        let info = classify_url("GET", url);
        assert_eq!(
            (info.name.as_str(), info.verb.as_str()),
            (name, verb),
            "{url}"
        );
    }
}

#[test]
fn patch_of_a_namespace_keeps_its_namespace_as_current_apiserver_does() {
    // 1.27-1.30 special-cased this (namespace ""); the special case was removed again.
    let info = classify_url("PATCH", "/api/v1/namespaces/new-namespace");
    assert_eq!(info.verb, Verb::Patch);
    assert_eq!(info.namespace, "new-namespace");
    assert_eq!(info.resource, "namespaces");
    assert_eq!(info.name, "new-namespace");
}

#[test]
fn watch_query_values_follow_go_bool_conversion() {
    let cases = [
        ("watch=true", Verb::Watch),
        ("watch=1", Verb::Watch),
        ("watch=false", Verb::List),
        ("watch=0", Verb::List),
        ("watch=FALSE", Verb::List),
        ("watch=False", Verb::List),
        ("watch=", Verb::Watch),
        ("watch", Verb::Watch),
        ("watch=yes", Verb::Watch),
        ("watch=00", Verb::Watch),
        ("watch=false&watch=true", Verb::List),
        ("watch=true&watch=false", Verb::Watch),
        // Go's url.ParseQuery drops pairs with ';' or a malformed escape.
        ("watch=true;x=1", Verb::List),
        ("watch=%ZZ", Verb::List),
        ("watch=%ZZ&watch=1", Verb::Watch),
        // Decoded before comparing; '+' is a space.
        ("watch=%66alse", Verb::List),
        ("%77atch=1", Verb::Watch),
        ("watch=+false", Verb::Watch),
        // EqualFold: U+017F LATIN SMALL LETTER LONG S folds to 's'.
        ("watch=fal%C5%BFe", Verb::List),
        ("Watch=true", Verb::List),
        ("", Verb::List),
    ];
    for (query, verb) in cases {
        let info = classify(&Method::GET, "/api/v1/pods", Some(query));
        assert_eq!(info.verb, verb, "{query}");
        assert_eq!(info.is_watch(), verb == Verb::Watch, "{query}");
    }
}

#[test]
fn undecodable_list_options_fall_back_to_to_lower_and_drop_the_name() {
    // timeoutSeconds=abc makes DecodeParameters fail: no name from the selector, and
    // `watch` is compared with ToLower, where the long s does not fold.
    let query = "timeoutSeconds=abc&fieldSelector=metadata.name=x&watch=fal%C5%BFe";
    let info = classify(&Method::GET, "/api/v1/pods", Some(query));
    assert_eq!(info.verb, Verb::Watch);
    assert_eq!(info.name, "");
    assert_eq!(info.field_selector, "metadata.name=x");

    for query in [
        "limit=-x&fieldSelector=metadata.name=x",
        "labelSelector=a%20in&fieldSelector=metadata.name=x",
        "labelSelector=-bad&fieldSelector=metadata.name=x",
        "timeoutSeconds=&fieldSelector=metadata.name=x",
    ] {
        let info = classify(&Method::GET, "/api/v1/pods", Some(query));
        assert_eq!(
            (info.verb.clone(), info.name.as_str()),
            (Verb::List, ""),
            "{query}"
        );
    }
    // Negative integers decode fine in Go.
    let info = classify(
        &Method::GET,
        "/api/v1/pods",
        Some("limit=-1&fieldSelector=metadata.name=x"),
    );
    assert_eq!(info.name, "x");
}

#[test]
fn field_selector_names_follow_fields_parse_selector() {
    let cases = [
        ("metadata.name=x", "x"),
        ("metadata.name==x", "x"),
        ("metadata.name!=x", ""),
        ("metadata.name%3Dx", "x"),
        ("metadata.namespace=ns,metadata.name=x", "x"),
        // Terms are sorted before the first exact match is taken.
        ("metadata.name=b,metadata.name=a", "a"),
        ("metadata.name!=a,metadata.name=b", "b"),
        // Escaped comma is data; the value is unescaped, then must be a path segment.
        ("metadata.name=a%5C,b", "a,b"),
        ("metadata.name=a%2Fb", ""),
        ("metadata.name=..", ""),
        ("metadata.name=a%25b", ""),
        ("metadata.name=", ""),
        ("metadata.name===x", ""),
        ("metadata.name=a%5Cx", ""),
        ("spec.nodeName=n1", ""),
        ("", ""),
    ];
    for (selector, name) in cases {
        let info = classify(
            &Method::GET,
            "/api/v1/pods",
            Some(&format!("fieldSelector={selector}")),
        );
        assert_eq!(info.name, name, "{selector}");
    }
}

#[test]
fn delete_with_field_selector_stays_deletecollection_without_name() {
    let info = classify(
        &Method::DELETE,
        "/api/v1/namespaces/ns/pods",
        Some("fieldSelector=metadata.name=x"),
    );
    assert_eq!(info.verb, Verb::DeleteCollection);
    assert_eq!(info.name, "");
    assert_eq!(info.field_selector, "metadata.name=x");
}

#[test]
fn legacy_watch_paths_set_the_watch_verb_whatever_the_method() {
    for (m, path, namespace, name) in [
        ("GET", "/api/v1/watch/pods", "", ""),
        ("GET", "/api/v1/watch/namespaces/ns/pods", "ns", ""),
        ("GET", "/api/v1/watch/namespaces/ns/pods/p1", "ns", "p1"),
        ("POST", "/apis/apps/v1/watch/deployments", "", ""),
        (
            "GET",
            "/apis/apps/v1/watch/namespaces/ns/deployments/d",
            "ns",
            "d",
        ),
    ] {
        let info = classify(&method(m), path, Some("watch=false"));
        assert_eq!(info.verb, Verb::Watch, "{path}");
        assert!(info.is_watch() && info.is_long_running(), "{path}");
        assert_eq!(
            (info.namespace.as_str(), info.name.as_str()),
            (namespace, name)
        );
    }
}

#[test]
fn special_verb_without_resource_is_the_apiserver_500_case() {
    for path in ["/api/v1/watch", "/api/v1/proxy/", "/apis/g/v1/watch"] {
        let info = classify(&Method::GET, path, None);
        assert!(info.is_resource_request, "{path}");
        assert!(
            matches!(info.error, Some(ClassifyError::MissingResource(_))),
            "{path}: {info:?}"
        );
        assert_eq!(info.verb.as_str(), "get", "{path}");
        assert!(info.parts().next().is_none());
    }
}

#[test]
fn non_resource_requests_carry_the_lower_cased_method() {
    for (m, verb) in [
        ("GET", "get"),
        ("HEAD", "head"),
        ("POST", "post"),
        ("PUT", "put"),
        ("PATCH", "patch"),
        ("DELETE", "delete"),
        ("OPTIONS", "options"),
        ("PROPFIND", "propfind"),
        ("get", "get"),
    ] {
        let info = classify(&method(m), "/healthz", None);
        assert!(!info.is_resource_request);
        assert_eq!(info.verb.as_str(), verb, "{m}");
    }
    // Go matches methods case-sensitively: "get" on a resource has no verb.
    let info = classify(&method("get"), "/api/v1/pods", None);
    assert_eq!(info.verb, Verb::Unknown);
    assert_eq!(info.verb.as_str(), "");
    let info = classify(&Method::OPTIONS, "/api/v1/pods/x", None);
    assert_eq!(info.verb, Verb::Unknown);
}

#[test]
fn paths_are_percent_decoded_and_split_like_go() {
    let info = classify(&Method::GET, "/api/v1/namespaces/a%2Fb/pods", None);
    assert_eq!(info.path, "/api/v1/namespaces/a/b/pods");
    assert_eq!(info.namespace, "a");
    assert_eq!(info.resource, "b");
    assert_eq!(info.name, "pods");

    let info = classify(&Method::GET, "/api/v1/namespaces/%6Es/pods", None);
    assert_eq!(info.namespace, "ns");

    // Every leading/trailing slash is trimmed; inner empty segments are kept.
    let info = classify(&Method::GET, "///api/v1/pods///", None);
    assert_eq!(
        (info.resource.as_str(), info.verb.as_str()),
        ("pods", "list")
    );
    let info = classify(&Method::GET, "/api//v1/pods", None);
    assert!(info.is_resource_request);
    assert_eq!(info.api_version, "");
    assert_eq!(info.resource, "v1");
    assert_eq!(info.name, "pods");

    // '+' is literal in paths.
    let info = classify(&Method::GET, "/api/v1/namespaces/a+b/pods", None);
    assert_eq!(info.namespace, "a+b");
}

#[test]
fn malformed_path_escapes_are_reported_not_classified() {
    for path in [
        "/api/v1/namespaces/%zz/pods",
        "/api/v1/pods%",
        "/api/v1/pods%4",
    ] {
        let info = classify(&Method::GET, path, None);
        assert!(!info.is_resource_request, "{path}");
        assert!(
            matches!(info.error, Some(ClassifyError::InvalidPathEscape(_))),
            "{path}"
        );
        assert_eq!(info.path, path);
    }
    assert_eq!(
        decode_path("/a/%zzz").expect_err("bad escape").to_string(),
        r#"invalid URL escape "%zz""#
    );
}

#[test]
fn long_running_mirrors_the_apiserver_check() {
    let cases = [
        ("GET", "/api/v1/pods", "watch=1", true),
        ("GET", "/api/v1/pods", "", false),
        ("GET", "/api/v1/namespaces/n/pods/p/log", "", true),
        (
            "GET",
            "/api/v1/namespaces/n/pods/p/exec",
            "command=ls",
            true,
        ),
        ("POST", "/api/v1/namespaces/n/pods/p/attach", "", true),
        ("POST", "/api/v1/namespaces/n/pods/p/portforward", "", true),
        ("GET", "/api/v1/namespaces/n/services/s/proxy/x", "", true),
        ("GET", "/api/v1/proxy/namespaces/n/pods/p", "", true),
        ("GET", "/api/v1/namespaces/n/pods/p/status", "", false),
        ("GET", "/debug/pprof/profile", "", true),
        ("GET", "/healthz", "", false),
        ("WATCH", "/healthz", "", true),
    ];
    for (m, path, query, expected) in cases {
        let info = classify(&method(m), path, Some(query));
        assert_eq!(info.is_long_running(), expected, "{m} {path}?{query}");
    }
}

#[test]
fn list_params_reads_watch_parameters() {
    let params = list_params(Some(
        "watch=1&resourceVersion=12345&allowWatchBookmarks=true&timeoutSeconds=300\
         &labelSelector=app%3Dweb&fieldSelector=spec.nodeName%3Dn1&sendInitialEvents=false",
    ))
    .expect("valid parameters");
    assert_eq!(
        params,
        WatchParams {
            resource_version: ResourceVersion::Exact("12345".to_owned()),
            resource_version_match: None,
            label_selector: Some("app=web".to_owned()),
            field_selector: Some("spec.nodeName=n1".to_owned()),
            timeout_seconds: Some(300),
            allow_bookmarks: true,
            send_initial_events: Some(false),
            limit: None,
            continue_token: None,
        }
    );
}

#[test]
fn list_params_defaults_and_resource_version_forms() {
    let empty = list_params(None).expect("no query");
    assert_eq!(
        empty,
        WatchParams {
            resource_version: ResourceVersion::Unset,
            resource_version_match: None,
            label_selector: None,
            field_selector: None,
            timeout_seconds: None,
            allow_bookmarks: false,
            send_initial_events: None,
            limit: None,
            continue_token: None,
        }
    );
    let rv = |query: &str| list_params(Some(query)).expect("valid").resource_version;
    assert_eq!(rv("resourceVersion="), ResourceVersion::Unset);
    assert_eq!(rv("resourceVersion=0"), ResourceVersion::Any);
    assert_eq!(
        rv("resourceVersion=00"),
        ResourceVersion::Exact("00".into())
    );
    assert_eq!(
        rv("resourceVersion=0&resourceVersion=5"),
        ResourceVersion::Any
    );

    let params = list_params(Some(
        "limit=500&continue=abc%3D%3D&resourceVersion=7&resourceVersionMatch=NotOlderThan\
         &allowWatchBookmarks=0&sendInitialEvents=",
    ))
    .expect("valid");
    assert_eq!(params.limit, Some(500));
    assert_eq!(params.continue_token.as_deref(), Some("abc=="));
    assert_eq!(
        params.resource_version_match.as_deref(),
        Some("NotOlderThan")
    );
    assert!(!params.allow_bookmarks);
    assert_eq!(params.send_initial_events, Some(true));
    assert_eq!(
        list_params(Some("timeoutSeconds=%2B5"))
            .expect("+5")
            .timeout_seconds,
        Some(5)
    );
    assert_eq!(list_params(Some("limit=-0")).expect("-0").limit, Some(0));
}

#[test]
fn list_params_rejects_what_the_apiserver_cannot_decode() {
    let cases = [
        "timeoutSeconds=abc",
        "timeoutSeconds=",
        "timeoutSeconds=1.5",
        "timeoutSeconds=%205",
        "timeoutSeconds=99999999999999999999",
        "limit=-1",
        "limit=1_000",
        "timeoutSeconds=-3",
        "labelSelector=a%20in",
        "labelSelector=%3Dx",
        "fieldSelector=foo",
        "fieldSelector=a%3Db%3Dc",
    ];
    for query in cases {
        let err = list_params(Some(query)).expect_err(query);
        assert!(!err.to_string().is_empty());
    }
    assert_eq!(
        list_params(Some("timeoutSeconds=abc"))
            .expect_err("abc")
            .to_string(),
        r#"strconv.ParseInt: parsing "abc": invalid syntax"#
    );
    assert!(matches!(
        list_params(Some("limit=-1")),
        Err(ClassifyError::Negative {
            param: "limit",
            value: -1
        })
    ));
    // Only the first value counts, as in Go.
    assert!(list_params(Some("limit=5&limit=abc")).is_ok());
}

fn arbitrary_method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::GET),
        Just(Method::HEAD),
        Just(Method::POST),
        Just(Method::PUT),
        Just(Method::PATCH),
        Just(Method::DELETE),
        Just(Method::OPTIONS),
        "[A-Za-z]{1,8}".prop_map(|name| method(&name)),
    ]
}

fn path_like() -> impl Strategy<Value = String> {
    let segment = prop_oneof![
        Just(String::new()),
        Just("/".to_owned()),
        prop::sample::select(vec![
            "api",
            "apis",
            "v1",
            "namespaces",
            "watch",
            "proxy",
            "status",
            "finalize",
            "pods",
            "apps",
            "log",
            "exec",
            "%2F",
            "%",
            "%zz",
            "%C5%BF",
            "..",
        ])
        .prop_map(str::to_owned),
        any::<String>(),
    ];
    prop::collection::vec(segment, 0..40).prop_map(|segments| segments.join("/"))
}

fn query_like() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "watch",
        "fieldSelector",
        "labelSelector",
        "limit",
        "timeoutSeconds",
        "resourceVersion",
        "continue",
        "sendInitialEvents",
        "allowWatchBookmarks",
        "x",
        "",
    ]);
    let value = prop_oneof![
        any::<String>(),
        "[a-z.=!,()<> %\\\\;+0-9-]{0,24}",
        Just("metadata.name=x".to_owned()),
    ];
    prop::collection::vec((key, value, any::<bool>()), 0..12).prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(key, value, with_eq)| {
                if with_eq {
                    format!("{key}={value}")
                } else {
                    format!("{key}{value}")
                }
            })
            .collect::<Vec<_>>()
            .join("&")
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn classify_never_panics_and_is_deterministic(
        m in arbitrary_method(),
        path in prop_oneof![path_like(), any::<String>()],
        query in prop::option::of(prop_oneof![query_like(), any::<String>()]),
    ) {
        let first = classify(&m, &path, query.as_deref());
        let second = classify(&m, &path, query.as_deref());
        prop_assert_eq!(&first, &second);
        if first.is_resource_request {
            prop_assert!(first.api_prefix == "api" || first.api_prefix == "apis");
            if first.error.is_none() {
                prop_assert_eq!(first.parts().next(), Some(first.resource.as_str()));
            }
        } else {
            prop_assert!(first.resource.is_empty() && first.namespace.is_empty());
        }
        prop_assert!(!first.is_watch() || first.is_long_running());
    }

    #[test]
    fn list_params_never_panics_and_is_deterministic(
        query in prop::option::of(prop_oneof![query_like(), any::<String>()]),
    ) {
        let first = list_params(query.as_deref());
        let second = list_params(query.as_deref());
        prop_assert_eq!(first, second);
    }
}

#[test]
fn very_long_paths_and_queries_are_handled() {
    let path = "/".repeat(100_000) + &"api/v1/pods/".repeat(10_000);
    let info = classify(&Method::GET, &path, Some(&"watch=1&".repeat(10_000)));
    assert!(info.is_resource_request);
    assert_eq!(info.resource, "pods");
    assert_eq!(info.name, "api");
    assert_eq!(info.subresource, "v1");
    let selector = format!("labelSelector={}", "a in (".repeat(10_000));
    assert!(list_params(Some(&selector)).is_err());
}
