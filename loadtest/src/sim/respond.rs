//! How kube-sim writes its answers: objects, lists, watch frames and
//! Status errors, in the encoding negotiated for the request
//! ([`negotiate`](super::negotiate)): JSON, a Table (`kubectl get`), or
//! protobuf (client-go's `application/vnd.kubernetes.protobuf` clients).
//!
//! The apiserver negotiates errors like objects: a protobuf-first client
//! gets its 404 or 403 as a protobuf Status (fixtures/apiserver-v1.24-protobuf/
//! error-404.pb). A custom resource's handler has JSON only, so its errors
//! are JSON too.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::{Value, json};

use super::negotiate::{self, Output};
use super::resources::ResourceType;
use super::store::{Event, EventType, ListResult, StoreError};
use super::{protobuf, table};

/// The response body type of every kube-sim response.
pub type ResBody = BoxBody<Bytes, Infallible>;

const JSON: &str = "application/json";

/// How a request's objects are encoded.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Encoding {
    Json,
    Table,
    Protobuf(protobuf::Encoder),
}

/// What one request negotiated: for its objects, and for its errors.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Negotiated {
    pub(crate) objects: Encoding,
    /// Whether a Status (an error, or the Success of a binding) is protobuf.
    pub(crate) protobuf_status: bool,
}

impl Negotiated {
    /// For a request on objects of `rt`. Protobuf is offered for the
    /// built-in kinds kube-sim has tables for; errors are offered protobuf
    /// for every built-in kind, as the apiserver's serializers have it.
    pub(crate) fn for_type(rt: &ResourceType, headers: &HeaderMap) -> Negotiated {
        let encoder = (!rt.custom)
            .then(|| protobuf::Encoder::new(&rt.api_version(), rt.kind))
            .flatten();
        let objects = match negotiate::output(headers, encoder.is_some()) {
            Output::Json => Encoding::Json,
            Output::Table => Encoding::Table,
            Output::Protobuf => encoder.map_or(Encoding::Json, Encoding::Protobuf),
        };
        Negotiated {
            objects,
            protobuf_status: status_in_protobuf(headers, !rt.custom),
        }
    }

    /// The same, with a Table answered as plain JSON (for answers kube-sim
    /// has no Table form of: what a write or DELETECOLLECTION returns).
    pub(crate) fn without_table(&self) -> Negotiated {
        let objects = match self.objects {
            Encoding::Table => Encoding::Json,
            other => other,
        };
        Negotiated { objects, ..*self }
    }

    /// For a request no handler has claimed yet (authentication,
    /// authorization, routing): Status is the only answer.
    pub(crate) fn for_status(headers: &HeaderMap) -> Negotiated {
        Negotiated {
            objects: Encoding::Json,
            protobuf_status: status_in_protobuf(headers, true),
        }
    }
}

fn status_in_protobuf(headers: &HeaderMap, offered: bool) -> bool {
    negotiate::output(headers, offered) == Output::Protobuf
}

/// One object: a GET (`query` picks the Table's includeObject).
pub(crate) fn object(
    code: StatusCode,
    rt: &ResourceType,
    obj: &Value,
    neg: &Negotiated,
    query: Option<&str>,
) -> Response<ResBody> {
    match neg.objects {
        Encoding::Table => json_response(
            code,
            &table::object_table(rt, obj, table::include_object(query)),
        ),
        Encoding::Protobuf(pb) => protobuf_response(code, pb.object(obj)),
        Encoding::Json => json_response(code, obj),
    }
}

/// The object a write returns (kube-sim answers writes without Tables).
pub(crate) fn written(code: StatusCode, obj: &Value, neg: &Negotiated) -> Response<ResBody> {
    match neg.objects {
        Encoding::Protobuf(pb) => protobuf_response(code, pb.object(obj)),
        Encoding::Json | Encoding::Table => json_response(code, obj),
    }
}

/// A LIST (or what a DELETECOLLECTION removed).
pub(crate) fn list(
    rt: &ResourceType,
    result: &ListResult,
    neg: &Negotiated,
    query: Option<&str>,
) -> Response<ResBody> {
    match neg.objects {
        Encoding::Table => json_response(
            StatusCode::OK,
            &table::list_table(
                rt,
                &result.items,
                list_metadata(result),
                table::include_object(query),
            ),
        ),
        Encoding::Protobuf(pb) => protobuf_response(
            StatusCode::OK,
            pb.list(&list_metadata(result), &result.items),
        ),
        Encoding::Json => raw_json_response(StatusCode::OK, list_body(rt, result)),
    }
}

/// Encodes one watch's events: JSON lines, one-row Tables, or protobuf
/// frames (4-byte length + WatchEvent).
pub(crate) struct EventEncoder {
    rt: &'static ResourceType,
    encoding: Encoding,
    /// The request query (a Table's includeObject).
    query: String,
    /// Column definitions go only in the first Table event (as the apiserver
    /// does with NoHeaders after the first); later ones carry null.
    sent_columns: bool,
}

impl EventEncoder {
    pub(crate) fn new(rt: &'static ResourceType, encoding: Encoding, query: Option<&str>) -> Self {
        EventEncoder {
            rt,
            encoding,
            query: query.unwrap_or("").to_string(),
            sent_columns: false,
        }
    }

    /// The stream's Content-Type.
    pub(crate) fn content_type(&self) -> &'static str {
        match self.encoding {
            Encoding::Protobuf(_) => protobuf::WATCH_CONTENT_TYPE,
            Encoding::Json | Encoding::Table => JSON,
        }
    }

    /// The ERROR event that ends a watch from a too old resourceVersion
    /// (fixtures/watch-rv-too-old.jsonl, apiserver-v1.24-protobuf/watch-too-old.pb).
    pub(crate) fn error(&self, e: &StoreError) -> Bytes {
        match self.encoding {
            Encoding::Protobuf(_) => Bytes::from(protobuf::watch_frame(
                "ERROR",
                &protobuf::encode_status(&e.to_status()),
            )),
            Encoding::Json | Encoding::Table => encode_frame("ERROR", &e.to_status()),
        }
    }

    pub(crate) fn encode(&mut self, event: &Event) -> Bytes {
        let kind = event.kind.as_str();
        match self.encoding {
            // A BOOKMARK is the collection's kind with only the RV (and the
            // initial-events-end annotation): in protobuf an all-zero
            // message but for those, as the apiserver writes it.
            Encoding::Protobuf(pb) => {
                Bytes::from(protobuf::watch_frame(kind, &pb.object(&event.object)))
            }
            Encoding::Json => encode_frame(kind, &*event.object),
            Encoding::Table => self.table_event(event),
        }
    }

    fn table_event(&mut self, event: &Event) -> Bytes {
        let kind = event.kind.as_str();
        if event.kind == EventType::Bookmark {
            let rv = event
                .object
                .pointer("/metadata/resourceVersion")
                .cloned()
                .unwrap_or_else(|| Value::String(event.rv.to_string()));
            let table = json!({
                "kind": "Table",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": {"resourceVersion": rv},
                "columnDefinitions": null,
                "rows": [],
            });
            return encode_frame(kind, &table);
        }
        let mut table = table::event_table(
            self.rt,
            &event.object,
            table::include_object(Some(self.query.as_str())),
        );
        if self.sent_columns {
            if let Some(obj) = table.as_object_mut() {
                obj.insert("columnDefinitions".to_string(), Value::Null);
            }
        } else {
            self.sent_columns = true;
        }
        encode_frame(kind, &table)
    }
}

/// `{"type":T,"object":{...}}\n`.
fn encode_frame<T: Serialize + ?Sized>(kind: &str, object: &T) -> Bytes {
    let mut buf = Vec::with_capacity(512);
    buf.extend_from_slice(b"{\"type\":\"");
    buf.extend_from_slice(kind.as_bytes());
    buf.extend_from_slice(b"\",\"object\":");
    if serde_json::to_writer(&mut buf, object).is_err() {
        buf.extend_from_slice(b"null");
    }
    buf.extend_from_slice(b"}\n");
    Bytes::from(buf)
}

/// `{"resourceVersion":..,"continue":..,"remainingItemCount":..}` (absent fields omitted).
pub(crate) fn list_metadata(result: &ListResult) -> Value {
    let mut meta = serde_json::Map::new();
    meta.insert(
        "resourceVersion".to_string(),
        Value::String(result.resource_version.to_string()),
    );
    if let Some(c) = &result.continue_token {
        meta.insert("continue".to_string(), Value::String(c.clone()));
    }
    if let Some(n) = result.remaining_item_count {
        meta.insert("remainingItemCount".to_string(), Value::from(n));
    }
    Value::Object(meta)
}

/// A `{Kind}List` body, shaped as the apiserver's storage shapes it.
///
/// Built-in types: a typed list, whose items carry no kind/apiVersion (the
/// encoder sets TypeMeta on the top-level object only). Custom resources:
/// an `UnstructuredList`, whose items are the stored objects as they are,
/// TypeMeta included, and whose keys are a Go map's (sorted, `continue`
/// always present, as in fixtures/apiserver-v1.24/list-widgets-empty.body).
/// Items are written straight from the shared objects (no per-item clone).
pub(crate) fn list_body(rt: &ResourceType, result: &ListResult) -> Vec<u8> {
    struct Items<'a> {
        items: &'a [Arc<Value>],
        type_meta: bool,
    }
    impl Serialize for Items<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(self.items.len()))?;
            for item in self.items {
                if self.type_meta {
                    seq.serialize_element(&**item)?;
                } else {
                    seq.serialize_element(&WithoutTypeMeta(item))?;
                }
            }
            seq.end()
        }
    }
    struct WithoutTypeMeta<'a>(&'a Value);
    impl Serialize for WithoutTypeMeta<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let Some(obj) = self.0.as_object() else {
                return self.0.serialize(s);
            };
            let mut map = s.serialize_map(None)?;
            for (k, v) in obj {
                if k != "kind" && k != "apiVersion" {
                    map.serialize_entry(k, v)?;
                }
            }
            map.end()
        }
    }
    #[derive(serde::Serialize)]
    struct List<'a> {
        kind: String,
        #[serde(rename = "apiVersion")]
        api_version: String,
        metadata: Value,
        items: Items<'a>,
    }
    #[derive(serde::Serialize)]
    struct UnstructuredList<'a> {
        #[serde(rename = "apiVersion")]
        api_version: String,
        items: Items<'a>,
        kind: String,
        metadata: Value,
    }
    let items = Items {
        items: &result.items,
        type_meta: rt.custom,
    };
    let mut metadata = list_metadata(result);
    let body = if rt.custom {
        if let Some(m) = metadata.as_object_mut() {
            m.entry("continue").or_insert_with(|| json!(""));
        }
        serde_json::to_vec(&UnstructuredList {
            api_version: rt.api_version(),
            items,
            kind: rt.list_kind(),
            metadata,
        })
    } else {
        serde_json::to_vec(&List {
            kind: rt.list_kind(),
            api_version: rt.api_version(),
            metadata,
            items,
        })
    };
    body.unwrap_or_default()
}

pub(crate) fn full(body: impl Into<Bytes>) -> ResBody {
    Full::new(body.into()).boxed()
}

fn with_api_headers(mut resp: Response<ResBody>, content_type: &'static str) -> Response<ResBody> {
    let h = resp.headers_mut();
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache, private"));
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

pub(crate) fn raw_json_response(code: StatusCode, body: Vec<u8>) -> Response<ResBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = code;
    with_api_headers(resp, JSON)
}

pub(crate) fn json_response<T: Serialize + ?Sized>(
    code: StatusCode,
    value: &T,
) -> Response<ResBody> {
    raw_json_response(code, serde_json::to_vec(value).unwrap_or_default())
}

fn protobuf_response(code: StatusCode, body: Vec<u8>) -> Response<ResBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = code;
    with_api_headers(resp, protobuf::CONTENT_TYPE)
}

/// A watch's 200 with its streaming body.
pub(crate) fn stream_response(body: ResBody, content_type: &'static str) -> Response<ResBody> {
    with_api_headers(Response::new(body), content_type)
}

/// A Status, JSON or protobuf as negotiated.
pub(crate) fn status(code: StatusCode, status: &Value, protobuf: bool) -> Response<ResBody> {
    if protobuf {
        protobuf_response(code, protobuf::encode_status(status))
    } else {
        json_response(code, status)
    }
}

/// A fixed Status body: in JSON written byte for byte in the apiserver's
/// field order, in protobuf encoded from it.
pub(crate) fn status_response(
    code: StatusCode,
    body: &'static str,
    protobuf: bool,
) -> Response<ResBody> {
    if protobuf && let Ok(value) = serde_json::from_str::<Value>(body) {
        return status(code, &value, true);
    }
    let mut resp = Response::new(full(body));
    *resp.status_mut() = code;
    with_api_headers(resp, JSON)
}

/// A raw JSON Status (e.g. RBAC's 403), re-encoded when protobuf was negotiated.
pub(crate) fn raw_status(code: StatusCode, body: Vec<u8>, protobuf: bool) -> Response<ResBody> {
    if protobuf && let Ok(value) = serde_json::from_slice::<Value>(&body) {
        return status(code, &value, true);
    }
    raw_json_response(code, body)
}

pub(crate) fn store_error(e: &StoreError, neg: &Negotiated) -> Response<ResBody> {
    let code = StatusCode::from_u16(e.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    status(code, &e.to_status(), neg.protobuf_status)
}

/// fixtures/error-401-unauthorized.body.
pub(crate) fn unauthorized(neg: &Negotiated) -> Response<ResBody> {
    status_response(
        StatusCode::UNAUTHORIZED,
        r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}"#,
        neg.protobuf_status,
    )
}

/// The apiserver's answer for a path no handler serves.
pub(crate) fn not_found(neg: &Negotiated) -> Response<ResBody> {
    status_response(
        StatusCode::NOT_FOUND,
        r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"the server could not find the requested resource","reason":"NotFound","details":{},"code":404}"#,
        neg.protobuf_status,
    )
}

pub(crate) fn method_not_allowed(neg: &Negotiated) -> Response<ResBody> {
    status_response(
        StatusCode::METHOD_NOT_ALLOWED,
        r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"the server does not allow this method on the requested resource","reason":"MethodNotAllowed","details":{},"code":405}"#,
        neg.protobuf_status,
    )
}

/// What the apiserver answers a strategic merge patch of a custom resource.
pub(crate) fn unsupported_media_type_custom(neg: &Negotiated) -> Response<ResBody> {
    status_response(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml","reason":"UnsupportedMediaType","code":415}"#,
        neg.protobuf_status,
    )
}

/// Server-side apply (`application/apply-patch+yaml`) is not simulated.
pub(crate) fn unsupported_media_type(neg: &Negotiated) -> Response<ResBody> {
    status_response(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json","reason":"UnsupportedMediaType","code":415}"#,
        neg.protobuf_status,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_items_lose_kind_and_api_version() {
        let rt = crate::sim::resources::find("", "v1", "configmaps").expect("cm");
        let result = ListResult {
            items: vec![Arc::new(
                json!({"kind":"ConfigMap","apiVersion":"v1","metadata":{"name":"a"}}),
            )],
            resource_version: 7,
            continue_token: Some("c".to_string()),
            remaining_item_count: Some(1),
        };
        let body: Value = serde_json::from_slice(&list_body(rt, &result)).expect("json");
        assert_eq!(
            body,
            json!({"kind":"ConfigMapList","apiVersion":"v1",
                   "metadata":{"resourceVersion":"7","continue":"c","remainingItemCount":1},
                   "items":[{"metadata":{"name":"a"}}]})
        );
    }

    #[test]
    fn custom_resource_list_items_keep_kind_and_api_version_in_the_apiservers_shape() {
        let rt = crate::sim::crd::intern(&crate::sim::crd::TypeSpec {
            group: "example.com".into(),
            version: "v1".into(),
            plural: "widgets".into(),
            singular: "widget".into(),
            kind: "Widget".into(),
            namespaced: true,
            short_names: Vec::new(),
            categories: Vec::new(),
            status: false,
        })
        .expect("interned");
        // The recorded empty list (an apiserver v1.24 answering JSON for a
        // CRD), byte for byte once compacted: sorted keys, `continue: ""`.
        let fixture = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/apiserver-v1.24/list-widgets-empty.body"
        ))
        .expect("fixture");
        let recorded: Value = serde_json::from_slice(&fixture).expect("json");
        let empty = ListResult {
            items: Vec::new(),
            resource_version: 13450,
            continue_token: None,
            remaining_item_count: None,
        };
        assert_eq!(
            String::from_utf8(list_body(rt, &empty)).expect("utf-8"),
            serde_json::to_string(&recorded).expect("json")
        );
        let w = json!({"apiVersion":"example.com/v1","kind":"Widget",
                       "metadata":{"name":"w"},"spec":{"size":1}});
        let result = ListResult {
            items: vec![Arc::new(w.clone())],
            resource_version: 7,
            continue_token: Some("c".to_string()),
            remaining_item_count: Some(1),
        };
        let body: Value = serde_json::from_slice(&list_body(rt, &result)).expect("json");
        assert_eq!(
            body,
            json!({"apiVersion":"example.com/v1","kind":"WidgetList",
                   "metadata":{"continue":"c","remainingItemCount":1,"resourceVersion":"7"},
                   "items":[w]})
        );
    }
}
