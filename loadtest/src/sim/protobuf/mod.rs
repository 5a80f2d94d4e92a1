//! Kubernetes protobuf, both ways, for the built-in kinds kube-sim covers.
//!
//! Clients send it: since client-go 1.31 the typed clientset writes bodies
//! as `application/vnd.kubernetes.protobuf` (kubectl create configmap/
//! secret/namespace/serviceaccount/role/rolebinding…, `kubectl create
//! token`, `kubectl auth whoami`, `kubectl auth can-i`), with no JSON
//! fallback; kube-sim stores JSON, so [`decode`] turns those bodies into the
//! JSON the same client would have sent.
//!
//! Clients ask for it: kubelet, kube-proxy, CNI agents and any client-go
//! program built with `ContentType: application/vnd.kubernetes.protobuf`
//! send `Accept: application/vnd.kubernetes.protobuf, application/json` and
//! read protobuf answers and watch streams. [`encode_object`],
//! [`encode_list`] and [`watch_frame`] write what the apiserver writes
//! (byte for byte for the recorded v1.24 fixtures, see `tests.rs`).
//!
//! Wire format (fixtures/apiserver-v1.24-protobuf/README.md): a body is the
//! 4 bytes `k8s\0` and a `runtime.Unknown` {1 typeMeta {1 apiVersion, 2
//! kind}, 2 raw (the object's own message), 3 contentEncoding, 4
//! contentType}; a watch stream is frames of a 4-byte big-endian length and
//! a `meta.v1.WatchEvent` {1 type, 2 object {1 raw: an enveloped body}}.
//!
//! One table per kind ([`schema`]) drives both directions. Its limits: JSON
//! fields the table does not know are not written (and skipped when read);
//! a kind without a table is refused by [`decode`] (the caller answers 415)
//! and has no protobuf form, so the server answers it in JSON, which every
//! protobuf client also accepts (the apiserver has protobuf for every
//! built-in kind; custom resources have none there either).

mod decode;
mod encode;
mod schema;

use std::sync::Arc;

use serde_json::{Map, Value};

use encode::{bytes_field, nested};

/// The content type of a protobuf body.
pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";

/// The content type of a protobuf watch stream.
pub const WATCH_CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf;stream=watch";

/// The envelope prefix of every Kubernetes protobuf body.
const MAGIC: &[u8] = b"k8s\0";

/// Why a protobuf body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("protobuf body does not start with the k8s envelope")]
    NoEnvelope,
    #[error("truncated or malformed protobuf")]
    Malformed,
    #[error("kube-sim cannot decode protobuf for kind {0:?}; send JSON")]
    UnknownKind(String),
}

/// Whether a Content-Type (without parameters, lower case) is protobuf.
pub fn is_protobuf(content_type: &str) -> bool {
    content_type == CONTENT_TYPE
}

/// Whether kube-sim answers objects of `kind` (and `{kind}List`) in
/// `api_version` in protobuf.
pub fn encodes(api_version: &str, kind: &str) -> bool {
    Encoder::new(api_version, kind).is_some()
}

/// The protobuf form of one kind's objects and lists.
#[derive(Clone, Copy)]
pub struct Encoder {
    schema: &'static schema::Schema,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("kind", &self.schema.kind)
            .finish()
    }
}

impl Encoder {
    /// The encoder of `kind` in `api_version`; None when kube-sim has no
    /// protobuf form for it.
    pub fn new(api_version: &str, kind: &str) -> Option<Encoder> {
        let schema = schema::find(api_version, kind).filter(|s| s.encodes)?;
        Some(Encoder { schema })
    }

    /// `obj` (JSON, as stored) as an enveloped protobuf body.
    pub fn object(&self, obj: &Value) -> Vec<u8> {
        let empty = Map::new();
        let mut raw = Vec::with_capacity(512);
        encode::message(
            obj.as_object().unwrap_or(&empty),
            self.schema.fields,
            &mut raw,
        );
        envelope(self.schema.api_version, self.schema.kind, &raw)
    }

    /// A `{Kind}List` body: ListMeta from `metadata` (the JSON list's
    /// metadata), then each item as a bare message (no envelope, no TypeMeta).
    pub fn list(&self, metadata: &Value, items: &[Arc<Value>]) -> Vec<u8> {
        let empty = Map::new();
        let mut raw = Vec::with_capacity(256 + 512 * items.len());
        let meta = metadata.as_object().unwrap_or(&empty);
        nested(&mut raw, 1, |buf| {
            encode::message(meta, schema::LIST_META, buf)
        });
        for item in items {
            let obj = item.as_object().unwrap_or(&empty);
            nested(&mut raw, 2, |buf| {
                encode::message(obj, self.schema.fields, buf)
            });
        }
        envelope(
            self.schema.api_version,
            &format!("{}List", self.schema.kind),
            &raw,
        )
    }
}

/// `obj` as an enveloped protobuf body of `kind`; None when kube-sim has no
/// protobuf form for the kind.
pub fn encode_object(api_version: &str, kind: &str, obj: &Value) -> Option<Vec<u8>> {
    Encoder::new(api_version, kind).map(|e| e.object(obj))
}

/// A `{item_kind}List` body ([`Encoder::list`]).
pub fn encode_list(
    api_version: &str,
    item_kind: &str,
    metadata: &Value,
    items: &[Arc<Value>],
) -> Option<Vec<u8>> {
    Encoder::new(api_version, item_kind).map(|e| e.list(metadata, items))
}

/// A Status (as [`StoreError::to_status`](super::store::StoreError::to_status)
/// shapes it) as an enveloped protobuf body.
pub fn encode_status(status: &Value) -> Vec<u8> {
    let empty = Map::new();
    let mut raw = Vec::with_capacity(128);
    encode::message(
        status.as_object().unwrap_or(&empty),
        schema::STATUS,
        &mut raw,
    );
    envelope("v1", "Status", &raw)
}

/// One watch frame: the 4-byte big-endian length, then WatchEvent {1 type,
/// 2 object {1 raw = `body`}}, `body` an enveloped object.
pub fn watch_frame(event_type: &str, body: &[u8]) -> Vec<u8> {
    let mut event = Vec::with_capacity(body.len() + 32);
    bytes_field(&mut event, 1, event_type.as_bytes());
    nested(&mut event, 2, |raw| bytes_field(raw, 1, body));
    let mut frame = Vec::with_capacity(event.len() + 4);
    let len = u32::try_from(event.len()).unwrap_or(u32::MAX);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&event);
    frame
}

/// `k8s\0` + runtime.Unknown. The apiserver writes contentEncoding and
/// contentType as empty strings (the tail of watch-too-old.pb: `1a 00 22 00`).
fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + 48);
    out.extend_from_slice(MAGIC);
    nested(&mut out, 1, |tm| {
        bytes_field(tm, 1, api_version.as_bytes());
        bytes_field(tm, 2, kind.as_bytes());
    });
    bytes_field(&mut out, 2, raw);
    bytes_field(&mut out, 3, b"");
    bytes_field(&mut out, 4, b"");
    out
}

/// Decodes an enveloped protobuf body (an object or a `{Kind}List`) into
/// its JSON form, with kind/apiVersion from the envelope.
pub fn decode(body: &[u8]) -> Result<Value, ProtoError> {
    let envelope = body.strip_prefix(MAGIC).ok_or(ProtoError::NoEnvelope)?;
    let mut api_version = String::new();
    let mut kind = String::new();
    let mut raw: &[u8] = &[];
    for item in decode::Reader(envelope) {
        match item? {
            (1, decode::Wire::Len(type_meta)) => {
                for tm in decode::Reader(type_meta) {
                    match tm? {
                        (1, decode::Wire::Len(v)) => api_version = utf8(v)?,
                        (2, decode::Wire::Len(v)) => kind = utf8(v)?,
                        _ => {}
                    }
                }
            }
            (2, decode::Wire::Len(v)) => raw = v,
            _ => {}
        }
    }
    let mut obj = match schema::find(&api_version, &kind) {
        Some(schema) => decode::message(raw, schema.fields)?,
        None => {
            let item = kind
                .strip_suffix("List")
                .and_then(|k| schema::find(&api_version, k))
                .filter(|s| s.encodes)
                .ok_or_else(|| ProtoError::UnknownKind(kind.clone()))?;
            list(raw, item.fields)?
        }
    };
    // Go's JSON puts TypeMeta first; the order of a Map is not ours to set,
    // the values are.
    obj.insert("apiVersion".to_string(), Value::String(api_version));
    obj.insert("kind".to_string(), Value::String(kind));
    Ok(Value::Object(obj))
}

/// A list's raw message: 1 ListMeta, 2 items (bare messages).
fn list(raw: &[u8], item: &'static [schema::Field]) -> Result<Map<String, Value>, ProtoError> {
    let mut metadata = Map::new();
    let mut items = Vec::new();
    for field in decode::Reader(raw) {
        match field? {
            (1, decode::Wire::Len(v)) => metadata = decode::message(v, schema::LIST_META)?,
            (2, decode::Wire::Len(v)) => items.push(Value::Object(decode::message(v, item)?)),
            _ => {}
        }
    }
    let mut out = Map::new();
    out.insert("metadata".to_string(), Value::Object(metadata));
    // `json:"items"` without omitempty: an empty list is null.
    let items = if items.is_empty() {
        Value::Null
    } else {
        Value::Array(items)
    };
    out.insert("items".to_string(), items);
    Ok(out)
}

/// One watch event (a frame without its length prefix) as
/// `{"type": T, "object": {...}}`.
pub fn decode_watch_event(event: &[u8]) -> Result<Value, ProtoError> {
    let mut kind = String::new();
    let mut object = Value::Null;
    for item in decode::Reader(event) {
        match item? {
            (1, decode::Wire::Len(v)) => kind = utf8(v)?,
            (2, decode::Wire::Len(raw_ext)) => {
                for field in decode::Reader(raw_ext) {
                    if let (1, decode::Wire::Len(body)) = field? {
                        object = decode(body)?;
                    }
                }
            }
            _ => {}
        }
    }
    let mut out = Map::new();
    out.insert("type".to_string(), Value::String(kind));
    out.insert("object".to_string(), object);
    Ok(Value::Object(out))
}

/// Splits a watch stream into its frames' events (without the length
/// prefixes); the rest is an incomplete frame still to come.
pub fn split_frames(stream: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut frames = Vec::new();
    let mut rest = stream;
    while let Some((len, tail)) = rest.split_first_chunk::<4>() {
        let n = u32::from_be_bytes(*len) as usize;
        if tail.len() < n {
            break;
        }
        let (frame, after) = tail.split_at(n);
        frames.push(frame);
        rest = after;
    }
    (frames, rest)
}

fn utf8(v: &[u8]) -> Result<String, ProtoError> {
    String::from_utf8(v.to_vec()).map_err(|_| ProtoError::Malformed)
}

#[cfg(test)]
mod tests;
