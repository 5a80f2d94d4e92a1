//! The Kubernetes protobuf encoding, as the hub needs it: read a few fields
//! out of an object, build envelopes around objects whose bytes stay the
//! apiserver's.
//!
//! What client-go's protobuf clients (kubelet, kube-proxy, most agents)
//! receive (k8s.io/apimachinery/pkg/runtime/serializer/protobuf):
//! - a unary body is `k8s\0` then a `runtime.Unknown` {1 typeMeta {1
//!   apiVersion, 2 kind}, 2 raw (the object's own message), 3
//!   contentEncoding, 4 contentType};
//! - a watch stream is frames of a 4-byte big-endian length and a
//!   `metav1.WatchEvent` {1 type, 2 object: RawExtension {1 raw}}, the raw
//!   again `k8s\0` + Unknown;
//! - a List message is {1 ListMeta {1 selfLink, 2 resourceVersion, 3
//!   continue}, 2 items (repeated, each the bare object message)}.
//!
//! The hub keeps every object enveloped (`k8s\0` + Unknown), as a watch
//! event carries it, and takes the envelope off for LIST items, as the JSON
//! side keeps kind and apiVersion on and takes them off. Nothing is ever
//! decoded whole: [`Scan`] walks a message's fields with prost's wire-format
//! primitives and borrows length-delimited values, so reading an event
//! costs a pass over its metadata, not a decode of the object.
//!
//! Envelopes are written as Go's gogo-generated marshallers write them
//! (fields in number order, empty non-pointer strings written), so a frame
//! the hub builds is byte for byte what the apiserver would send where the
//! hub knows the whole message.

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{WireType, decode_key, decode_varint, encode_key, encode_varint};

use crate::watch::error::DecodeError;
use crate::watch::filter::{Meta, absent_field_value};
use crate::watch::object::{Read, TypeMeta};

/// `application/vnd.kubernetes.protobuf`.
pub const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";
/// The content type of a protobuf watch stream.
pub const WATCH_MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf;stream=watch";

/// The prefix of every enveloped object.
const MAGIC: &[u8] = b"k8s\0";

/// A frame larger than this is refused rather than buffered: etcd keeps
/// objects under 1.5 MiB, and the apiserver's own limit on a watch frame
/// read by client-go is 16 MiB.
pub const MAX_FRAME: usize = 16 << 20;

fn bad(what: &'static str) -> DecodeError {
    DecodeError::Shape(what)
}

/// One field of a message.
#[derive(Debug, Clone, Copy)]
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    /// Fixed-width values the hub never reads.
    Fixed,
}

/// The fields of a message, in wire order, borrowed.
struct Scan<'a> {
    rest: &'a [u8],
}

impl<'a> Scan<'a> {
    fn new(msg: &'a [u8]) -> Scan<'a> {
        Scan { rest: msg }
    }
}

impl<'a> Iterator for Scan<'a> {
    /// (tag, value, the field's whole encoding).
    type Item = Result<(u32, Value<'a>, &'a [u8]), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let start = self.rest;
        let field = (|| {
            let (tag, wire) = decode_key(&mut self.rest).map_err(|_| bad("bad field key"))?;
            let value = match wire {
                WireType::Varint => {
                    Value::Varint(decode_varint(&mut self.rest).map_err(|_| bad("bad varint"))?)
                }
                WireType::LengthDelimited => {
                    let len = decode_varint(&mut self.rest).map_err(|_| bad("bad length"))?;
                    let len = usize::try_from(len).map_err(|_| bad("bad length"))?;
                    if len > self.rest.len() {
                        return Err(bad("truncated protobuf field"));
                    }
                    let (v, rest) = self.rest.split_at(len);
                    self.rest = rest;
                    Value::Bytes(v)
                }
                WireType::SixtyFourBit | WireType::ThirtyTwoBit => {
                    let n = if wire == WireType::SixtyFourBit { 8 } else { 4 };
                    if n > self.rest.len() {
                        return Err(bad("truncated protobuf field"));
                    }
                    self.rest = &self.rest[n..];
                    Value::Fixed
                }
                WireType::StartGroup | WireType::EndGroup => {
                    return Err(bad("protobuf groups are not used by Kubernetes"));
                }
            };
            let used = start.len() - self.rest.len();
            Ok((tag, value, &start[..used]))
        })();
        if field.is_err() {
            self.rest = &[];
        }
        Some(field)
    }
}

/// The last length-delimited value of field `tag` (proto's last-wins rule
/// for a scalar; Go never writes a message field twice).
fn bytes_field(msg: &[u8], tag: u32) -> Result<Option<&[u8]>, DecodeError> {
    let mut found = None;
    for f in Scan::new(msg) {
        if let (t, Value::Bytes(v), _) = f?
            && t == tag
        {
            found = Some(v);
        }
    }
    Ok(found)
}

fn varint_field(msg: &[u8], tag: u32) -> Result<Option<u64>, DecodeError> {
    let mut found = None;
    for f in Scan::new(msg) {
        if let (t, Value::Varint(v), _) = f?
            && t == tag
        {
            found = Some(v);
        }
    }
    Ok(found)
}

fn utf8(b: &[u8]) -> Result<&str, DecodeError> {
    std::str::from_utf8(b).map_err(|_| bad("a protobuf string is not UTF-8"))
}

fn put_bytes(out: &mut impl BufMut, tag: u32, value: &[u8]) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(value.len() as u64, out);
    out.put_slice(value);
}

fn put_header(out: &mut impl BufMut, tag: u32, len: usize) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(len as u64, out);
}

fn header_len(tag: u32, len: usize) -> usize {
    prost::encoding::key_len(tag) + prost::encoding::encoded_len_varint(len as u64)
}

/// An envelope's parts: (typeMeta's apiVersion, kind, raw).
struct Unknown<'a> {
    api_version: &'a [u8],
    kind: &'a [u8],
    raw: &'a [u8],
}

fn unwrap(enveloped: &[u8]) -> Result<Unknown<'_>, DecodeError> {
    let body = enveloped
        .strip_prefix(MAGIC)
        .ok_or(bad("protobuf object without the k8s envelope"))?;
    unknown(body)
}

/// An object enveloped or bare (a LIST item), its kind unknown if bare. No
/// object message starts with `k8s\0`: 0x6b would be field 13 starting a
/// group, which Kubernetes never uses.
fn parts(object: &[u8]) -> Result<Unknown<'_>, DecodeError> {
    match object.strip_prefix(MAGIC) {
        Some(body) => unknown(body),
        None => Ok(Unknown {
            api_version: &[],
            kind: &[],
            raw: object,
        }),
    }
}

fn unknown(body: &[u8]) -> Result<Unknown<'_>, DecodeError> {
    let mut u = Unknown {
        api_version: &[],
        kind: &[],
        raw: &[],
    };
    for f in Scan::new(body) {
        match f? {
            (1, Value::Bytes(tm), _) => {
                u.api_version = bytes_field(tm, 1)?.unwrap_or_default();
                u.kind = bytes_field(tm, 2)?.unwrap_or_default();
            }
            (2, Value::Bytes(raw), _) => u.raw = raw,
            _ => {}
        }
    }
    Ok(u)
}

/// The encoded `typeMeta` field (key included) of an envelope.
pub fn type_meta_field(api_version: &str, kind: &str) -> Vec<u8> {
    let mut tm = Vec::with_capacity(api_version.len() + kind.len() + 4);
    put_bytes(&mut tm, 1, api_version.as_bytes());
    put_bytes(&mut tm, 2, kind.as_bytes());
    let mut out = Vec::with_capacity(tm.len() + 2);
    put_bytes(&mut out, 1, &tm);
    out
}

/// The trailing `contentEncoding` and `contentType`, empty, as the
/// apiserver writes them.
const UNKNOWN_TAIL: &[u8] = &[0x1a, 0x00, 0x22, 0x00];

/// `k8s\0` + Unknown {typeMeta, raw}.
pub fn envelope(type_meta: &[u8], raw: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(MAGIC.len() + type_meta.len() + raw.len() + 12);
    out.put_slice(MAGIC);
    out.put_slice(type_meta);
    put_bytes(&mut out, 2, raw);
    out.put_slice(UNKNOWN_TAIL);
    out.freeze()
}

/// The object message inside an envelope.
pub fn raw(enveloped: &[u8]) -> Result<&[u8], DecodeError> {
    Ok(unwrap(enveloped)?.raw)
}

/// Cuts the next frame (its length prefix included) off `buf`.
pub fn next_frame(buf: &mut BytesMut) -> Result<Option<Bytes>, DecodeError> {
    let Some(prefix) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*prefix) as usize;
    if len > MAX_FRAME {
        return Err(bad("a protobuf watch frame over 16 MiB"));
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    Ok(Some(buf.split_to(4 + len).freeze()))
}

/// A frame's event type and its object (enveloped), sharing the frame.
pub fn decode_event(frame: &Bytes) -> Result<(String, Bytes), DecodeError> {
    let msg = frame
        .get(4..)
        .ok_or(bad("a protobuf watch frame without its length"))?;
    let mut ty = String::new();
    let mut object: &[u8] = &[];
    for f in Scan::new(msg) {
        match f? {
            (1, Value::Bytes(t), _) => ty = utf8(t)?.to_string(),
            (2, Value::Bytes(ext), _) => object = bytes_field(ext, 1)?.unwrap_or_default(),
            _ => {}
        }
    }
    Ok((ty, frame.slice_ref(object)))
}

/// A watch frame: length, WatchEvent {type, object {raw}}.
pub fn event(ty: &str, enveloped: &[u8]) -> Bytes {
    let ext_len = header_len(1, enveloped.len()) + enveloped.len();
    let msg_len = header_len(1, ty.len()) + ty.len() + header_len(2, ext_len) + ext_len;
    let mut out = BytesMut::with_capacity(4 + msg_len);
    out.put_u32(msg_len as u32);
    put_bytes(&mut out, 1, ty.as_bytes());
    put_header(&mut out, 2, ext_len);
    put_bytes(&mut out, 1, enveloped);
    out.freeze()
}

/// Where a selectable field is in a kind's message (tags from the object
/// down) and whether it is a bool, as k8s.io/api's generated.proto numbers
/// them. A field missing here reads as absent.
fn field_tags(kind: &[u8], field: &str) -> Option<(&'static [u32], bool)> {
    Some(match (kind, field) {
        (b"Pod", "spec.nodeName") => (&[2, 10], false),
        (b"Pod", "spec.restartPolicy") => (&[2, 3], false),
        (b"Pod", "spec.schedulerName") => (&[2, 19], false),
        (b"Pod", "spec.serviceAccountName") => (&[2, 8], false),
        (b"Pod", "spec.hostNetwork") => (&[2, 11], true),
        (b"Pod", "status.phase") => (&[3, 1], false),
        (b"Pod", "status.podIP") => (&[3, 6], false),
        (b"Pod", "status.nominatedNodeName") => (&[3, 11], false),
        (b"Event", "involvedObject.kind") => (&[2, 1], false),
        (b"Event", "involvedObject.namespace") => (&[2, 2], false),
        (b"Event", "involvedObject.name") => (&[2, 3], false),
        (b"Event", "involvedObject.uid") => (&[2, 4], false),
        (b"Event", "involvedObject.apiVersion") => (&[2, 5], false),
        (b"Event", "involvedObject.resourceVersion") => (&[2, 6], false),
        (b"Event", "involvedObject.fieldPath") => (&[2, 7], false),
        (b"Event", "reason") => (&[3], false),
        (b"Event", "source") => (&[5, 1], false),
        (b"Event", "type") => (&[9], false),
        (b"Event", "reportingComponent") => (&[14], false),
        (b"Secret", "type") => (&[3], false),
        (b"Node", "spec.unschedulable") => (&[2, 4], true),
        (b"Namespace", "status.phase") => (&[3, 1], false),
        _ => return None,
    })
}

/// The value at `tags` in `msg`, as `GetAttrs` renders it.
fn field_value(msg: &[u8], tags: &[u32], boolean: bool) -> Result<Option<String>, DecodeError> {
    let Some((&last, path)) = tags.split_last() else {
        return Ok(None);
    };
    let mut at = msg;
    for &t in path {
        match bytes_field(at, t)? {
            Some(inner) => at = inner,
            None => return Ok(None),
        }
    }
    Ok(if boolean {
        varint_field(at, last)?.map(|v| (v != 0).to_string())
    } else {
        bytes_field(at, last)?
            .map(|v| utf8(v).map(str::to_string))
            .transpose()?
    })
}

/// What the hub keeps of an object (the kind, from the envelope, says
/// where `fields` are; a bare LIST item has its metadata read only).
pub fn read(object: &[u8], fields: &[&str]) -> Result<Read, DecodeError> {
    let u = parts(object)?;
    let mut meta = Meta::default();
    if let Some(m) = bytes_field(u.raw, 1)? {
        for f in Scan::new(m) {
            match f? {
                (1, Value::Bytes(v), _) => meta.name = utf8(v)?.to_string(),
                (3, Value::Bytes(v), _) => meta.namespace = utf8(v)?.to_string(),
                (6, Value::Bytes(v), _) => meta.rv = utf8(v)?.parse().unwrap_or(0),
                (11, Value::Bytes(entry), _) => {
                    let key = bytes_field(entry, 1)?.unwrap_or_default();
                    let value = bytes_field(entry, 2)?.unwrap_or_default();
                    meta.labels
                        .push((utf8(key)?.to_string(), utf8(value)?.to_string()));
                }
                _ => {}
            }
        }
    }
    meta.fields = fields
        .iter()
        .map(|&field| {
            let value = match field_tags(u.kind, field) {
                Some((tags, boolean)) => field_value(u.raw, tags, boolean)?,
                None => None,
            };
            Ok(value.unwrap_or_else(|| absent_field_value(field).to_string()))
        })
        .collect::<Result<_, DecodeError>>()?;
    Ok(Read {
        meta,
        type_meta: TypeMeta {
            kind: true,
            api_version: true,
        },
    })
}

/// The `code` of an enveloped Status.
pub fn status_code(enveloped: &[u8]) -> Option<u64> {
    varint_field(raw(enveloped).ok()?, 6).ok()?
}

/// `msg` with length-delimited field `tag` replaced by `with(old)` (added
/// at the end if absent); every other byte as it was.
fn replace_field(
    msg: &[u8],
    tag: u32,
    with: impl FnOnce(&[u8]) -> Result<Vec<u8>, DecodeError>,
) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(msg.len() + 16);
    let mut with = Some(with);
    for f in Scan::new(msg) {
        match f? {
            (t, Value::Bytes(old), _) if t == tag && with.is_some() => {
                let new = with.take().map(|w| w(old)).transpose()?.unwrap_or_default();
                put_bytes(&mut out, tag, &new);
            }
            (_, _, whole) => out.extend_from_slice(whole),
        }
    }
    if let Some(w) = with {
        put_bytes(&mut out, tag, &w(&[])?);
    }
    Ok(out)
}

/// An enveloped object with `metadata.resourceVersion` set to `rv`.
pub fn at_resource_version(enveloped: &[u8], rv: u64) -> Result<Vec<u8>, DecodeError> {
    let body = enveloped
        .strip_prefix(MAGIC)
        .ok_or(bad("protobuf object without the k8s envelope"))?;
    let rv = rv.to_string();
    let body = replace_field(body, 2, |raw| {
        replace_field(raw, 1, |meta| {
            replace_field(meta, 6, |_| Ok(rv.as_bytes().to_vec()))
        })
    })?;
    let mut out = Vec::with_capacity(MAGIC.len() + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&body);
    Ok(out)
}

/// An ObjectMeta as Go writes a zero one with only a resourceVersion (and
/// annotations): the non-pointer fields 1–8 are always written.
fn bare_object_meta(rv: u64, annotations: &[(&str, &str)]) -> Vec<u8> {
    let mut m = Vec::with_capacity(48);
    for tag in 1..=5 {
        put_bytes(&mut m, tag, b"");
    }
    put_bytes(&mut m, 6, rv.to_string().as_bytes());
    encode_key(7, WireType::Varint, &mut m);
    encode_varint(0, &mut m);
    put_bytes(&mut m, 8, b"");
    for (k, v) in annotations {
        let mut entry = Vec::with_capacity(k.len() + v.len() + 4);
        put_bytes(&mut entry, 1, k.as_bytes());
        put_bytes(&mut entry, 2, v.as_bytes());
        put_bytes(&mut m, 12, &entry);
    }
    m
}

/// A BOOKMARK frame: the collection's kind with only its resourceVersion.
pub fn bookmark(kind: &str, api_version: &str, rv: u64, initial_end: bool) -> Bytes {
    let annotations: &[(&str, &str)] = if initial_end {
        &[("k8s.io/initial-events-end", "true")]
    } else {
        &[]
    };
    let mut object = Vec::new();
    put_bytes(&mut object, 1, &bare_object_meta(rv, annotations));
    event(
        "BOOKMARK",
        &envelope(&type_meta_field(api_version, kind), &object),
    )
}

/// An enveloped `Status` with `code` and `reason`, as the apiserver writes
/// a failure.
pub fn status(message: &str, reason: &str, code: u32) -> Bytes {
    let mut s = Vec::with_capacity(message.len() + 48);
    put_bytes(&mut s, 1, &[0x0a, 0x00, 0x12, 0x00, 0x1a, 0x00]);
    put_bytes(&mut s, 2, b"Failure");
    put_bytes(&mut s, 3, message.as_bytes());
    put_bytes(&mut s, 4, reason.as_bytes());
    encode_key(6, WireType::Varint, &mut s);
    encode_varint(u64::from(code), &mut s);
    envelope(&type_meta_field("v1", "Status"), &s)
}

/// One page of a LIST body.
pub struct Page<'a> {
    pub api_version: &'a str,
    pub kind: &'a str,
    pub resource_version: &'a str,
    pub cont: &'a str,
    /// The bare item messages.
    pub items: Vec<&'a [u8]>,
}

pub fn decode_list(body: &[u8]) -> Result<Page<'_>, DecodeError> {
    let u = unwrap(body)?;
    let mut page = Page {
        api_version: utf8(u.api_version)?,
        kind: utf8(u.kind)?,
        resource_version: "",
        cont: "",
        items: Vec::new(),
    };
    for f in Scan::new(u.raw) {
        match f? {
            (1, Value::Bytes(lm), _) => {
                page.resource_version = utf8(bytes_field(lm, 2)?.unwrap_or_default())?;
                page.cont = utf8(bytes_field(lm, 3)?.unwrap_or_default())?;
            }
            (2, Value::Bytes(item), _) => page.items.push(item),
            _ => {}
        }
    }
    Ok(page)
}

/// A List of `objects` (enveloped; their envelopes are taken off) at `rv`.
pub fn list<'a>(
    kind: &str,
    api_version: &str,
    rv: u64,
    objects: impl Iterator<Item = &'a [u8]> + Clone,
) -> Result<Vec<u8>, DecodeError> {
    let rv = rv.to_string();
    let mut list_meta = Vec::with_capacity(rv.len() + 6);
    put_bytes(&mut list_meta, 1, b"");
    put_bytes(&mut list_meta, 2, rv.as_bytes());
    put_bytes(&mut list_meta, 3, b"");
    let mut msg_len = header_len(1, list_meta.len()) + list_meta.len();
    for o in objects.clone() {
        let raw = raw(o)?.len();
        msg_len += header_len(2, raw) + raw;
    }
    let type_meta = type_meta_field(api_version, &format!("{kind}List"));
    let mut out = Vec::with_capacity(MAGIC.len() + type_meta.len() + msg_len + 16);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&type_meta);
    put_header(&mut out, 2, msg_len);
    put_bytes(&mut out, 1, &list_meta);
    for o in objects {
        put_bytes(&mut out, 2, raw(o)?);
    }
    out.extend_from_slice(UNKNOWN_TAIL);
    Ok(out)
}

#[cfg(test)]
mod tests;
