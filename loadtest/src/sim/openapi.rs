//! OpenAPI documents for the served types: `/openapi/v3` (index and one
//! document per group/version) and `/openapi/v2`.
//!
//! kubectl does not validate against these schemas when the server supports
//! server-side field validation: `kubectl apply/create` (validate=strict)
//! looks in the v3 document of the object's group/version for a PATCH
//! operation tagged with the object's `x-kubernetes-group-version-kind` that
//! takes a `fieldValidation` parameter (cli-runtime
//! query_param_verifier_v3.go) and, when found, leaves validation to the
//! server (`?fieldValidation=Strict`). So the documents carry real paths,
//! operations and parameters, and loose object schemas
//! (`x-kubernetes-preserve-unknown-fields`) tagged with their GVK.
//!
//! `apply` on an existing object builds a strategic merge patch from the v3
//! schema only when the PATCH operation accepts
//! `application/strategic-merge-patch+json` (see [`PATCH_TYPES`] for why it
//! does not here), else from `/openapi/v2` (protobuf), else from its
//! compiled-in types. kube-sim's v2 document is well-formed but empty, so
//! kubectl ends at its compiled-in types: the patch a real apiserver gets.

use std::sync::OnceLock;

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use serde_json::{Map, Value, json};

use crate::sim::discovery::{GIT_VERSION, bytes_response, fnv1a64, json_response, not_found};
use crate::sim::resources::{self, RESOURCES, ResourceType};

/// kubectl's media type for the v2 document.
pub const V2_PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf";

/// Answers an OpenAPI path, or `None` when `path` is not one.
pub fn serve(path: &str, query: Option<&str>, headers: &HeaderMap) -> Option<Response<Bytes>> {
    // `?hash=` pins a document version for caching; ours never change while
    // the process runs, so any hash gets the current document.
    let _ = query;
    let path = path.strip_suffix('/').unwrap_or(path);
    if path == "/openapi/v2" {
        return Some(serve_v2(headers));
    }
    if path == "/openapi/v3" {
        return Some(json_response(StatusCode::OK, &v3_index()));
    }
    let rest = path.strip_prefix("/openapi/v3/")?;
    Some(match documents().iter().find(|(p, _, _)| p == rest) {
        Some((_, body, _)) => bytes_response(StatusCode::OK, "application/json", body.clone()),
        None => not_found(),
    })
}

/// `/openapi/v3`: `{"paths":{"api/v1":{"serverRelativeURL":"/openapi/v3/api/v1?hash=…"}}}`.
pub fn v3_index() -> Value {
    let mut paths = Map::new();
    for (path, _, hash) in documents() {
        paths.insert(
            path.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={hash}")}),
        );
    }
    json!({"paths": paths})
}

/// (relative path "api/v1" | "apis/g/v", serialized document, hash), built once.
fn documents() -> &'static [(String, Bytes, String)] {
    static DOCS: OnceLock<Vec<(String, Bytes, String)>> = OnceLock::new();
    DOCS.get_or_init(|| {
        resources::group_versions()
            .into_iter()
            .map(|(group, version)| {
                let path = if group.is_empty() {
                    format!("api/{version}")
                } else {
                    format!("apis/{group}/{version}")
                };
                let body = Bytes::from(v3_document(group, version).to_string());
                let hash = format!("{:016X}", fnv1a64(&body));
                (path, body, hash)
            })
            .collect()
    })
}

/// The schema name the apiserver uses: `io.k8s.api.core.v1.ConfigMap`,
/// `io.k8s.api.apps.v1.Deployment`, `io.k8s.api.coordination.v1.Lease`.
pub fn definition_name(rt: &ResourceType, kind: &str) -> String {
    let package = if rt.group.is_empty() {
        "core"
    } else {
        rt.group.split('.').next().unwrap_or(rt.group)
    };
    format!("io.k8s.api.{package}.{}.{kind}", rt.version)
}

const META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1";

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn gvk(rt: &ResourceType, kind: &str) -> Value {
    json!({"group": rt.group, "version": rt.version, "kind": kind})
}

fn query_param(name: &str, description: &str, type_: &str) -> Value {
    json!({
        "name": name,
        "in": "query",
        "description": description,
        "schema": {"type": type_, "uniqueItems": true},
    })
}

fn write_params(patch: bool) -> Vec<Value> {
    let mut p = vec![
        query_param(
            "dryRun",
            "When present, indicates that modifications should not be persisted.",
            "string",
        ),
        query_param(
            "fieldManager",
            "fieldManager is a name associated with the actor or entity that is making these changes.",
            "string",
        ),
        query_param(
            "fieldValidation",
            "fieldValidation instructs the server on how to handle objects in the request (POST/PUT/PATCH) containing unknown or duplicate fields. Valid values are: - Ignore - Warn - Strict",
            "string",
        ),
    ];
    if patch {
        p.push(query_param(
            "force",
            "Force is going to \"force\" Apply requests. It means user will re-acquire conflicting fields owned by other people.",
            "boolean",
        ));
    }
    p
}

fn list_params() -> Vec<Value> {
    vec![
        query_param(
            "allowWatchBookmarks",
            "allowWatchBookmarks requests watch events with type \"BOOKMARK\".",
            "boolean",
        ),
        query_param(
            "continue",
            "The continue option should be set when retrieving more results from the server.",
            "string",
        ),
        query_param(
            "fieldSelector",
            "A selector to restrict the list of returned objects by their fields.",
            "string",
        ),
        query_param(
            "labelSelector",
            "A selector to restrict the list of returned objects by their labels.",
            "string",
        ),
        query_param(
            "limit",
            "limit is a maximum number of responses to return for a list call.",
            "integer",
        ),
        query_param(
            "resourceVersion",
            "resourceVersion sets a constraint on what resource versions a request may be served from.",
            "string",
        ),
        query_param(
            "resourceVersionMatch",
            "resourceVersionMatch determines how resourceVersion is applied to list calls.",
            "string",
        ),
        query_param(
            "sendInitialEvents",
            "`sendInitialEvents=true` may be set together with `watch=true`.",
            "boolean",
        ),
        query_param(
            "timeoutSeconds",
            "Timeout for the list/watch call.",
            "integer",
        ),
        query_param(
            "watch",
            "Watch for changes to the described resources and return them as a stream of add, update, and remove notifications.",
            "boolean",
        ),
    ]
}

fn path_param(name: &str) -> Value {
    json!({
        "name": name,
        "in": "path",
        "description": format!("{name} of the resource"),
        "required": true,
        "schema": {"type": "string", "uniqueItems": true},
    })
}

const JSON_TYPES: &[&str] = &[
    "application/json",
    "application/yaml",
    "application/vnd.kubernetes.protobuf",
];
/// PATCH request types. The apiserver also lists
/// `application/strategic-merge-patch+json` for built-in kinds; we leave it
/// out on purpose: with it, `kubectl apply` computes the patch from *these*
/// schemas, which are too loose for that ("unable to find api field"
/// warnings), while without it kubectl uses its compiled-in types — the same
/// patch it sends a real apiserver.
const PATCH_TYPES: &[&str] = &[
    "application/apply-patch+yaml",
    "application/json-patch+json",
    "application/merge-patch+json",
];

fn content(types: &[&str], schema: &Value) -> Value {
    let mut m = Map::new();
    for t in types {
        m.insert((*t).to_string(), json!({"schema": schema}));
    }
    Value::Object(m)
}

/// One operation. `body` is the request schema (POST/PUT/PATCH).
fn operation(
    rt: &ResourceType,
    kind: &str,
    action: &str,
    op_id: String,
    params: Vec<Value>,
    body: Option<(&[&str], Value)>,
    response: &str,
) -> Value {
    let mut op = Map::new();
    op.insert("description".into(), json!(format!("{action} {kind}")));
    op.insert("operationId".into(), json!(op_id));
    if !params.is_empty() {
        op.insert("parameters".into(), Value::Array(params));
    }
    if let Some((types, schema)) = body {
        op.insert(
            "requestBody".into(),
            json!({"content": content(types, &schema), "required": true}),
        );
    }
    let ok = json!({"description": "OK", "content": content(JSON_TYPES, &schema_ref(response))});
    let mut responses = Map::new();
    responses.insert("200".into(), ok.clone());
    if action == "post" {
        responses.insert("201".into(), json!({"description": "Created", "content": content(JSON_TYPES, &schema_ref(response))}));
        responses.insert("202".into(), json!({"description": "Accepted", "content": content(JSON_TYPES, &schema_ref(response))}));
    }
    if action == "put" {
        responses.insert("201".into(), json!({"description": "Created", "content": content(JSON_TYPES, &schema_ref(response))}));
    }
    responses.insert("401".into(), json!({"description": "Unauthorized"}));
    op.insert("responses".into(), Value::Object(responses));
    op.insert("tags".into(), json!([tag(rt)]));
    op.insert("x-kubernetes-action".into(), json!(action));
    op.insert("x-kubernetes-group-version-kind".into(), gvk(rt, kind));
    Value::Object(op)
}

/// `coreV1`, `appsV1`, `coordinationV1` (operation ids and tags).
fn tag(rt: &ResourceType) -> String {
    let package = if rt.group.is_empty() {
        "core"
    } else {
        rt.group.split('.').next().unwrap_or(rt.group)
    };
    let mut v = rt.version.to_string();
    if let Some(first) = v.get_mut(0..1) {
        first.make_ascii_uppercase();
    }
    format!("{package}{v}")
}

fn path_item(params: Vec<Value>, ops: Vec<(&str, Value)>) -> Value {
    let mut item = Map::new();
    for (method, op) in ops {
        item.insert(method.to_string(), op);
    }
    let mut all = params;
    all.push(query_param(
        "pretty",
        "If 'true', then the output is pretty printed.",
        "string",
    ));
    item.insert("parameters".into(), Value::Array(all));
    Value::Object(item)
}

/// The v3 document of one group/version.
pub fn v3_document(group: &str, version: &str) -> Value {
    let mut paths = Map::new();
    let mut schemas = Map::new();
    for rt in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        add_type(rt, &mut paths, &mut schemas);
    }
    for (name, description) in [
        (
            "ObjectMeta",
            "ObjectMeta is metadata that all persisted resources must have, which includes all objects users must create.",
        ),
        (
            "ListMeta",
            "ListMeta describes metadata that synthetic resources must have, including lists and various status objects.",
        ),
        (
            "Status",
            "Status is a return value for calls that don't return other objects.",
        ),
        (
            "DeleteOptions",
            "DeleteOptions may be provided when deleting an API object.",
        ),
        (
            "Patch",
            "Patch is provided to give a concrete name and type to the Kubernetes PATCH request body.",
        ),
        (
            "WatchEvent",
            "Event represents a single event to a watched resource.",
        ),
    ] {
        schemas.insert(
            format!("{META}.{name}"),
            json!({
                "description": description,
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": true,
            }),
        );
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": GIT_VERSION},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"BearerToken": {"type": "apiKey", "description": "Bearer Token authentication", "name": "authorization", "in": "header"}},
        },
        "security": [{"BearerToken": []}],
    })
}

fn add_type(rt: &ResourceType, paths: &mut Map<String, Value>, schemas: &mut Map<String, Value>) {
    let def = definition_name(rt, rt.kind);
    let list_def = definition_name(rt, &rt.list_kind());
    let kind_title = format!(
        "{}{}",
        if rt.namespaced { "Namespaced" } else { "" },
        rt.kind
    );
    let op_id = |verb: &str, suffix: &str| format!("{verb}{}{kind_title}{suffix}", tag_title(rt));
    let base = rt.prefix();
    let (collection, mut scope_params) = if rt.namespaced {
        (
            format!("{base}/namespaces/{{namespace}}/{}", rt.plural),
            vec![path_param("namespace")],
        )
    } else {
        (format!("{base}/{}", rt.plural), vec![])
    };
    let has = |verb: &str| rt.verbs.contains(&verb);
    let patch_body = || (PATCH_TYPES, schema_ref(&format!("{META}.Patch")));
    let object_body = || (&["*/*"][..], schema_ref(&def));

    let mut collection_ops = Vec::new();
    if has("list") {
        collection_ops.push((
            "get",
            operation(
                rt,
                rt.kind,
                "list",
                op_id("list", ""),
                list_params(),
                None,
                &list_def,
            ),
        ));
    }
    if has("create") {
        collection_ops.push((
            "post",
            operation(
                rt,
                rt.kind,
                "post",
                op_id("create", ""),
                write_params(false),
                Some(object_body()),
                &def,
            ),
        ));
    }
    if has("deletecollection") {
        collection_ops.push((
            "delete",
            operation(
                rt,
                rt.kind,
                "deletecollection",
                op_id("deleteCollection", ""),
                list_params(),
                None,
                &format!("{META}.Status"),
            ),
        ));
    }
    paths.insert(
        collection.clone(),
        path_item(scope_params.clone(), collection_ops),
    );

    if rt.namespaced && has("list") {
        paths.insert(
            format!("{base}/{}", rt.plural),
            path_item(
                vec![],
                vec![(
                    "get",
                    operation(
                        rt,
                        rt.kind,
                        "list",
                        format!("list{}{}ForAllNamespaces", tag_title(rt), rt.kind),
                        list_params(),
                        None,
                        &list_def,
                    ),
                )],
            ),
        );
    }

    if rt.is_stored() {
        scope_params.insert(0, path_param("name"));
        let mut item_ops = vec![(
            "get",
            operation(rt, rt.kind, "get", op_id("read", ""), vec![], None, &def),
        )];
        if has("update") {
            item_ops.push((
                "put",
                operation(
                    rt,
                    rt.kind,
                    "put",
                    op_id("replace", ""),
                    write_params(false),
                    Some(object_body()),
                    &def,
                ),
            ));
        }
        if has("patch") {
            item_ops.push((
                "patch",
                operation(
                    rt,
                    rt.kind,
                    "patch",
                    op_id("patch", ""),
                    write_params(true),
                    Some(patch_body()),
                    &def,
                ),
            ));
        }
        if has("delete") {
            item_ops.push((
                "delete",
                operation(
                    rt,
                    rt.kind,
                    "delete",
                    op_id("delete", ""),
                    vec![],
                    None,
                    &format!("{META}.Status"),
                ),
            ));
        }
        paths.insert(
            format!("{collection}/{{name}}"),
            path_item(scope_params.clone(), item_ops),
        );

        for sub in rt.subresources.iter().filter(|s| s.name == "status") {
            let suffix = "Status";
            let ops = vec![
                (
                    "get",
                    operation(
                        rt,
                        rt.kind,
                        "get",
                        op_id("read", suffix),
                        vec![],
                        None,
                        &def,
                    ),
                ),
                (
                    "put",
                    operation(
                        rt,
                        rt.kind,
                        "put",
                        op_id("replace", suffix),
                        write_params(false),
                        Some(object_body()),
                        &def,
                    ),
                ),
                (
                    "patch",
                    operation(
                        rt,
                        rt.kind,
                        "patch",
                        op_id("patch", suffix),
                        write_params(true),
                        Some(patch_body()),
                        &def,
                    ),
                ),
            ];
            paths.insert(
                format!("{collection}/{{name}}/{}", sub.name),
                path_item(scope_params.clone(), ops),
            );
        }
    }

    let mut properties = Map::new();
    properties.insert(
        "apiVersion".into(),
        json!({"description": "APIVersion defines the versioned schema of this representation of an object.", "type": "string"}),
    );
    properties.insert(
        "kind".into(),
        json!({"description": "Kind is a string value representing the REST resource this object represents.", "type": "string"}),
    );
    properties.insert(
        "metadata".into(),
        json!({"allOf": [schema_ref(&format!("{META}.ObjectMeta"))], "default": {}}),
    );
    schemas.insert(
        def.clone(),
        json!({
            "description": format!("{} (kube-sim: fields beyond apiVersion/kind/metadata are not described; the server validates).", rt.kind),
            "type": "object",
            "properties": properties,
            "x-kubernetes-preserve-unknown-fields": true,
            "x-kubernetes-group-version-kind": [gvk(rt, rt.kind)],
        }),
    );
    if rt.is_stored() {
        schemas.insert(
            list_def,
            json!({
                "description": format!("{} is a list of {}.", rt.list_kind(), rt.kind),
                "type": "object",
                "required": ["items"],
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "items": {"type": "array", "items": {"allOf": [schema_ref(&def)], "default": {}}},
                    "metadata": {"allOf": [schema_ref(&format!("{META}.ListMeta"))], "default": {}},
                },
                "x-kubernetes-group-version-kind": [gvk(rt, &rt.list_kind())],
            }),
        );
    }
}

/// `CoreV1`, `AppsV1` for operation ids.
fn tag_title(rt: &ResourceType) -> String {
    let mut t = tag(rt);
    if let Some(first) = t.get_mut(0..1) {
        first.make_ascii_uppercase();
    }
    t
}

/// `/openapi/v2`: protobuf (what kubectl asks for) or JSON. Empty of
/// definitions and paths: kubectl then finds no schema or patch type for any
/// kind and falls back to its compiled-in types (see the module doc).
fn serve_v2(headers: &HeaderMap) -> Response<Bytes> {
    let accept = headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if accept.contains("protobuf") {
        return bytes_response(StatusCode::OK, V2_PROTOBUF, Bytes::from(v2_protobuf()));
    }
    json_response(
        StatusCode::OK,
        &json!({
            "swagger": "2.0",
            "info": {"title": "Kubernetes", "version": GIT_VERSION},
            "paths": {},
            "definitions": {},
        }),
    )
}

/// The v2 document as gnostic's `openapi.v2.Document` protobuf:
/// `swagger = 1`, `info = 2 {title = 1, version = 2}`, `paths = 8 {}`.
pub fn v2_protobuf() -> Vec<u8> {
    fn field(out: &mut Vec<u8>, number: u8, bytes: &[u8]) {
        // Length-delimited (wire type 2); every length here is < 128, so a
        // single varint byte.
        out.push((number << 3) | 2);
        out.push(u8::try_from(bytes.len()).expect("short field"));
        out.extend_from_slice(bytes);
    }
    let mut info = Vec::new();
    field(&mut info, 1, b"Kubernetes");
    field(&mut info, 2, GIT_VERSION.as_bytes());
    let mut doc = Vec::new();
    field(&mut doc, 1, b"2.0");
    field(&mut doc, 2, &info);
    field(&mut doc, 8, &[]);
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Value {
        let resp = serve(path, None, &HeaderMap::new()).expect("openapi path");
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        serde_json::from_slice(resp.body()).expect("JSON")
    }

    /// What cli-runtime's supportsQueryParamV3 does: a PATCH operation for
    /// the GVK whose parameters name `param`.
    fn patch_supports(doc: &Value, group: &str, version: &str, kind: &str, param: &str) -> bool {
        let want = json!({"group": group, "version": version, "kind": kind});
        doc["paths"]
            .as_object()
            .expect("paths")
            .values()
            .any(|item| {
                item.get("patch").is_some_and(|op| {
                    op["x-kubernetes-group-version-kind"] == want
                        && op["parameters"]
                            .as_array()
                            .is_some_and(|ps| ps.iter().any(|p| p["name"] == param))
                })
            })
    }

    #[test]
    fn index_points_at_every_group_version() {
        let index = get("/openapi/v3");
        let paths = index["paths"].as_object().expect("paths");
        for p in ["api/v1", "apis/apps/v1", "apis/coordination.k8s.io/v1"] {
            let url = paths[p]["serverRelativeURL"].as_str().expect("url");
            assert!(url.starts_with(&format!("/openapi/v3/{p}?hash=")), "{url}");
            let doc = get(url.split('?').next().expect("path"));
            assert_eq!(doc["openapi"], "3.0.0");
        }
    }

    #[test]
    fn every_stored_kind_supports_field_validation_on_patch() {
        for rt in RESOURCES.iter().filter(|r| r.verbs.contains(&"patch")) {
            let doc = v3_document(rt.group, rt.version);
            assert!(
                patch_supports(&doc, rt.group, rt.version, rt.kind, "fieldValidation"),
                "{}",
                rt.kind
            );
            assert!(!patch_supports(
                &doc, rt.group, rt.version, rt.kind, "nonsense"
            ));
        }
    }

    #[test]
    fn configmap_paths_and_schema_look_like_the_apiservers() {
        let doc = get("/openapi/v3/api/v1");
        let item = &doc["paths"]["/api/v1/namespaces/{namespace}/configmaps/{name}"];
        let patch = &item["patch"];
        assert!(
            patch["requestBody"]["content"]
                .get("application/merge-patch+json")
                .is_some()
        );
        assert_eq!(patch["x-kubernetes-action"], "patch");
        let post = &doc["paths"]["/api/v1/namespaces/{namespace}/configmaps"]["post"];
        assert_eq!(
            post["x-kubernetes-group-version-kind"],
            json!({"group": "", "version": "v1", "kind": "ConfigMap"})
        );
        let schema = &doc["components"]["schemas"]["io.k8s.api.core.v1.ConfigMap"];
        assert_eq!(
            schema["x-kubernetes-group-version-kind"],
            json!([{"group": "", "version": "v1", "kind": "ConfigMap"}])
        );
        assert!(doc["paths"].get("/api/v1/configmaps").is_some());
        assert!(doc["paths"].get("/api/v1/nodes/{name}/status").is_some());
        let apps = get("/openapi/v3/apis/apps/v1");
        assert!(
            apps["components"]["schemas"]
                .get("io.k8s.api.apps.v1.Deployment")
                .is_some()
        );
    }

    #[test]
    fn unknown_documents_are_404_and_other_paths_are_not_openapi() {
        let resp = serve("/openapi/v3/apis/example.com/v1", None, &HeaderMap::new())
            .expect("openapi path");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert!(serve("/api/v1", None, &HeaderMap::new()).is_none());
    }

    #[test]
    fn v2_is_protobuf_when_asked() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::ACCEPT,
            http::HeaderValue::from_static(V2_PROTOBUF),
        );
        let resp = serve("/openapi/v2", None, &h).expect("served");
        assert_eq!(resp.headers()[http::header::CONTENT_TYPE], V2_PROTOBUF);
        assert_eq!(&resp.body()[..5], b"\x0a\x032.0");
        assert_eq!(get("/openapi/v2")["swagger"], "2.0");
    }
}
