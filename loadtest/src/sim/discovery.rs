//! API discovery: `/version`, `/api`, `/apis`, `/api/v1`, `/apis/{g}` and
//! `/apis/{g}/{v}`, generated from the types served now: the resource table
//! plus the custom resources of the CRDs created so far
//! ([`Store::types`](crate::sim::store::Store::types)).
//!
//! Clients (kubectl, client-go's RESTMapper, kube-rs) read these documents
//! before any resource request, so their shapes follow the apiserver's
//! legacy (unaggregated) discovery exactly (fixtures/discovery_*.body).
//! kubectl 1.32 first asks for aggregated discovery
//! (`application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList`);
//! answering `Content-Type: application/json` with the legacy documents makes
//! it fall back to them, as it does against an apiserver without aggregation.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde_json::{Map, Value, json};

use crate::sim::resources::{self, ResourceType};

/// The version kube-sim claims. kubectl's dispatcher picks its own minor from
/// `minor`, so this must name a kubectl that is installed (1.32).
pub const GIT_VERSION: &str = "v1.32.0-kube-sim";

/// Where `/api` says the server is reachable (the apiserver reports its
/// advertise address; clients ignore it unless they match the CIDR rules).
const SERVER_ADDRESS: &str = "127.0.0.1:6443";

/// Answers a discovery path from the served `types`, or `None` when `path`
/// is not one.
///
/// `/apis/{unknown}` and `/apis/{g}/{unknown}` are discovery paths the
/// apiserver answers with a 404 Status, so they get one here too.
pub fn serve(path: &str, types: &[&'static ResourceType]) -> Option<Response<Bytes>> {
    let path = path.strip_suffix('/').unwrap_or(path);
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    match segments.as_slice() {
        ["version"] => Some(json_response(StatusCode::OK, &version())),
        ["api"] => Some(json_response(StatusCode::OK, &api_versions())),
        ["apis"] => Some(json_response(StatusCode::OK, &api_group_list(types))),
        ["api", version] => Some(match resource_list(types, "", version) {
            Some(doc) => json_response(StatusCode::OK, &doc),
            None => not_found(),
        }),
        ["apis", group] => Some(match api_group(types, group) {
            Some(doc) => json_response(StatusCode::OK, &doc),
            None => not_found(),
        }),
        ["apis", group, version] => Some(match resource_list(types, group, version) {
            Some(doc) => json_response(StatusCode::OK, &doc),
            None => not_found(),
        }),
        _ => None,
    }
}

/// `/version` (k8s.io/apimachinery/pkg/version.Info).
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": GIT_VERSION,
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.23.4",
        "compiler": "gc",
        "platform": "linux/amd64"
    })
}

/// `/api`: the core group's versions.
pub fn api_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": SERVER_ADDRESS}
        ]
    })
}

/// The named groups in discovery order (core excluded), each with its versions.
fn groups(types: &[&'static ResourceType]) -> Vec<(&'static str, Vec<&'static str>)> {
    let mut out: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
    for (group, version) in resources::group_versions_of(types.iter().copied()) {
        if group.is_empty() {
            continue;
        }
        match out.iter_mut().find(|(g, _)| *g == group) {
            Some((_, versions)) => versions.push(version),
            None => out.push((group, vec![version])),
        }
    }
    out
}

/// One `APIGroup` entry; the first listed version is the preferred one.
fn group_entry(group: &str, versions: &[&str]) -> Value {
    let gv = |v: &str| json!({"groupVersion": format!("{group}/{v}"), "version": v});
    json!({
        "name": group,
        "versions": versions.iter().map(|v| gv(v)).collect::<Vec<_>>(),
        "preferredVersion": gv(versions.first().copied().unwrap_or("v1")),
    })
}

/// `/apis`.
pub fn api_group_list(types: &[&'static ResourceType]) -> Value {
    let groups: Vec<Value> = groups(types)
        .iter()
        .map(|(g, versions)| group_entry(g, versions))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/{group}`; `None` for a group kube-sim does not serve.
pub fn api_group(types: &[&'static ResourceType], group: &str) -> Option<Value> {
    let (name, versions) = groups(types).into_iter().find(|(g, _)| *g == group)?;
    let mut entry = group_entry(name, &versions);
    let obj = entry.as_object_mut().expect("group_entry builds an object");
    let mut doc = Map::new();
    doc.insert("kind".into(), json!("APIGroup"));
    doc.insert("apiVersion".into(), json!("v1"));
    doc.append(obj);
    Some(Value::Object(doc))
}

/// `/api/v1` (group "") or `/apis/{group}/{version}`: an `APIResourceList`
/// with every resource and subresource, sorted by name like the apiserver.
/// `None` for a group/version kube-sim does not serve.
pub fn resource_list(types: &[&'static ResourceType], group: &str, version: &str) -> Option<Value> {
    let types: Vec<&ResourceType> = types
        .iter()
        .copied()
        .filter(|r| r.group == group && r.version == version)
        .collect();
    if types.is_empty() {
        return None;
    }
    let mut entries: Vec<(String, Value)> = Vec::new();
    for rt in types {
        entries.push((rt.plural.to_string(), resource_entry(rt)));
        for sub in rt.subresources {
            let name = format!("{}/{}", rt.plural, sub.name);
            let mut e = Map::new();
            e.insert("name".into(), json!(name));
            e.insert("singularName".into(), json!(""));
            e.insert("namespaced".into(), json!(rt.namespaced));
            // A subresource whose kind lives in another group/version says so
            // (serviceaccounts/token -> authentication.k8s.io/v1 TokenRequest).
            if !sub.group.is_empty() || !sub.version.is_empty() {
                e.insert("group".into(), json!(sub.group));
                e.insert("version".into(), json!(sub.version));
            }
            let kind = if sub.kind.is_empty() {
                rt.kind
            } else {
                sub.kind
            };
            e.insert("kind".into(), json!(kind));
            e.insert("verbs".into(), json!(sorted(sub.verbs)));
            entries.push((name, Value::Object(e)));
        }
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let resources: Vec<Value> = entries.into_iter().map(|(_, v)| v).collect();
    // The core list carries no apiVersion; named groups' lists do (fixtures).
    Some(if group.is_empty() {
        json!({"kind": "APIResourceList", "groupVersion": version, "resources": resources})
    } else {
        json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": format!("{group}/{version}"),
            "resources": resources,
        })
    })
}

/// The `APIResource` of a top-level type.
fn resource_entry(rt: &ResourceType) -> Value {
    let mut e = Map::new();
    e.insert("name".into(), json!(rt.plural));
    // apiservers since 1.27 fill singularName (kubectl uses it for lookups).
    e.insert("singularName".into(), json!(rt.singular));
    e.insert("namespaced".into(), json!(rt.namespaced));
    e.insert("kind".into(), json!(rt.kind));
    e.insert("verbs".into(), json!(sorted(rt.verbs)));
    if !rt.short_names.is_empty() {
        e.insert("shortNames".into(), json!(rt.short_names));
    }
    if !rt.categories.is_empty() {
        e.insert("categories".into(), json!(rt.categories));
    }
    if rt.is_stored() {
        e.insert("storageVersionHash".into(), json!(storage_version_hash(rt)));
    }
    Value::Object(e)
}

fn sorted(verbs: &[&'static str]) -> Vec<&'static str> {
    let mut v = verbs.to_vec();
    v.sort_unstable();
    v
}

/// A stable 8-byte hash of the storage version, base64 like the apiserver's.
/// Clients compare it only for equality (to notice storage migrations), so
/// FNV-1a over "group/version/kind" serves as well as the real SHA-256 prefix.
pub fn storage_version_hash(rt: &ResourceType) -> String {
    let key = format!("{}/{}/{}", rt.group, rt.version, rt.kind);
    base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        fnv1a64(key.as_bytes()).to_be_bytes(),
    )
}

/// FNV-1a, 64 bit: a dependency-free stable hash for version hashes and
/// OpenAPI document hashes.
pub(crate) fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A JSON response with the headers the apiserver puts on discovery and
/// error documents (`cache-control: no-cache, private`).
pub(crate) fn json_response(status: StatusCode, body: &Value) -> Response<Bytes> {
    bytes_response(status, "application/json", Bytes::from(body.to_string()))
}

pub(crate) fn bytes_response(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<Bytes> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// A failure `Status` shaped like the apiserver's.
pub(crate) fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": {},
        "code": code,
    })
}

/// The apiserver's answer to a non-resource path it does not serve.
pub(crate) fn not_found() -> Response<Bytes> {
    json_response(
        StatusCode::NOT_FOUND,
        &status_body(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::resources::RESOURCES;
    use std::collections::BTreeSet;

    /// Discovery of the built-in types (a kube-sim without CRDs).
    fn serve(path: &str) -> Option<Response<Bytes>> {
        let types: Vec<&'static ResourceType> = RESOURCES.iter().collect();
        super::serve(path, &types)
    }

    fn fixture(name: &str) -> Value {
        let path = format!(
            "{}/tests/fixtures/apiserver-v1.24/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).expect("fixture exists");
        serde_json::from_str(&text).expect("fixture is JSON")
    }

    fn body(resp: &Response<Bytes>) -> Value {
        serde_json::from_slice(resp.body()).expect("JSON body")
    }

    fn keys(v: &Value) -> BTreeSet<String> {
        v.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The entry named `name` in an APIResourceList.
    fn entry<'a>(list: &'a Value, name: &str) -> &'a Value {
        list["resources"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["name"] == name))
            .unwrap_or_else(|| panic!("{name} listed"))
    }

    #[test]
    fn discovery_documents_carry_apiserver_headers() {
        for path in [
            "/version",
            "/api",
            "/apis",
            "/api/v1",
            "/apis/apps",
            "/apis/apps/v1",
        ] {
            let resp = serve(path).expect("discovery path");
            assert_eq!(resp.status(), StatusCode::OK, "{path}");
            assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
            assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-cache, private");
        }
    }

    #[test]
    fn version_has_the_fixture_keys_and_claims_1_32() {
        let v = body(&serve("/version").expect("served"));
        assert_eq!(keys(&v), keys(&fixture("discovery_version.body")));
        assert_eq!(v["major"], "1");
        assert_eq!(v["minor"], "32");
    }

    #[test]
    fn api_versions_matches_fixture_shape() {
        let v = body(&serve("/api").expect("served"));
        let f = fixture("discovery_api.body");
        assert_eq!(keys(&v), keys(&f));
        assert_eq!(v["versions"], f["versions"]);
        assert_eq!(
            keys(&v["serverAddressByClientCIDRs"][0]),
            keys(&f["serverAddressByClientCIDRs"][0])
        );
    }

    #[test]
    fn group_list_names_every_served_group_with_preferred_version() {
        let v = body(&serve("/apis").expect("served"));
        let f = fixture("discovery_apis.body");
        assert_eq!(keys(&v), keys(&f));
        let fixture_apps = f["groups"]
            .as_array()
            .and_then(|g| g.iter().find(|g| g["name"] == "apps"))
            .expect("apps in fixture");
        let apps = v["groups"]
            .as_array()
            .and_then(|g| g.iter().find(|g| g["name"] == "apps"))
            .expect("apps served");
        assert_eq!(apps, fixture_apps);
        for g in [
            "coordination.k8s.io",
            "authentication.k8s.io",
            "authorization.k8s.io",
        ] {
            assert!(
                v["groups"]
                    .as_array()
                    .expect("array")
                    .iter()
                    .any(|x| x["name"] == g),
                "{g}"
            );
        }
    }

    #[test]
    fn single_group_is_an_api_group() {
        let v = body(&serve("/apis/apps").expect("served"));
        assert_eq!(v["kind"], "APIGroup");
        assert_eq!(v["name"], "apps");
        assert_eq!(v["preferredVersion"]["groupVersion"], "apps/v1");
    }

    #[test]
    fn core_resource_list_matches_fixture_entries() {
        let v = body(&serve("/api/v1").expect("served"));
        let f = fixture("discovery_api_v1.body");
        assert_eq!(keys(&v), keys(&f));
        assert_eq!(v["groupVersion"], "v1");
        for name in [
            "configmaps",
            "pods",
            "pods/binding",
            "pods/exec",
            "pods/status",
            "pods/log",
            "serviceaccounts/token",
            "namespaces",
            "namespaces/status",
            "nodes",
            "services",
        ] {
            let ours = entry(&v, name);
            let theirs = entry(&f, name);
            assert_eq!(keys(ours), keys(theirs), "{name}");
            for k in [
                "kind",
                "namespaced",
                "verbs",
                "group",
                "version",
                "shortNames",
                "categories",
            ] {
                assert_eq!(ours.get(k), theirs.get(k), "{name}.{k}");
            }
        }
        let names: Vec<&str> = v["resources"]
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|r| r["name"].as_str())
            .collect();
        let mut sorted_names = names.clone();
        sorted_names.sort_unstable();
        assert_eq!(names, sorted_names);
    }

    #[test]
    fn group_resource_lists_match_fixture_entries() {
        let v = body(&serve("/apis/apps/v1").expect("served"));
        let f = fixture("discovery_apis_apps_v1.body");
        assert_eq!(keys(&v), keys(&f));
        for name in ["deployments", "deployments/status", "daemonsets"] {
            let (ours, theirs) = (entry(&v, name), entry(&f, name));
            assert_eq!(keys(ours), keys(theirs), "{name}");
            assert_eq!(ours["verbs"], theirs["verbs"], "{name}");
        }
        let v = body(&serve("/apis/coordination.k8s.io/v1").expect("served"));
        let f = fixture("discovery_apis_coordination.k8s.io_v1.body");
        assert_eq!(keys(entry(&v, "leases")), keys(entry(&f, "leases")));
        let v = body(&serve("/apis/authentication.k8s.io/v1").expect("served"));
        let f = fixture("discovery_apis_authentication.k8s.io_v1.body");
        assert_eq!(
            entry(&v, "tokenreviews")["verbs"],
            entry(&f, "tokenreviews")["verbs"]
        );
    }

    #[test]
    fn unknown_groups_are_404_status_and_other_paths_are_not_discovery() {
        let resp = serve("/apis/example.com").expect("discovery path");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(body(&resp)["reason"], "NotFound");
        assert_eq!(
            serve("/apis/apps/v2").expect("discovery path").status(),
            StatusCode::NOT_FOUND
        );
        assert!(serve("/api/v1/pods").is_none());
        assert!(serve("/healthz").is_none());
        assert!(serve("/openapi/v3").is_none());
    }

    #[test]
    fn storage_version_hash_is_eight_bytes_of_base64() {
        assert_eq!(storage_version_hash(&RESOURCES[0]).len(), 12);
    }
}
