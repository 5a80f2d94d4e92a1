//! The hub's one encoding seam: how frames are cut, what is read out of an
//! object, and how envelopes (watch events, bookmarks, LISTs, Status) are
//! built around objects whose bytes stay the apiserver's.
//!
//! The stream logic never branches on the encoding; it asks its [`Codec`].
//! JSON is here (objects read by [`object`], borrowed); protobuf is in
//! [`protobuf`], with the same answers.

use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use serde_json::value::RawValue;

mod protobuf;

use crate::watch::error::DecodeError;
use crate::watch::object::{self, TypeMeta, TypeMetaJson};

/// How a stream speaks with the apiserver and with its subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Codec {
    /// `application/json`, watch events one per line.
    #[default]
    Json,
    /// `application/vnd.kubernetes.protobuf`, watch events length-prefixed.
    Protobuf,
}

/// A watch event's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
    Bookmark,
    Error,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
            EventType::Bookmark => "BOOKMARK",
            EventType::Error => "ERROR",
        }
    }

    fn parse(s: &str) -> Option<EventType> {
        Some(match s {
            "ADDED" => EventType::Added,
            "MODIFIED" => EventType::Modified,
            "DELETED" => EventType::Deleted,
            "BOOKMARK" => EventType::Bookmark,
            "ERROR" => EventType::Error,
            _ => return None,
        })
    }
}

/// One upstream watch event; its object a slice of the frame's bytes.
pub struct Event {
    /// `None`: a type this proxy does not know (skipped, as client-go does).
    pub ty: Option<EventType>,
    pub object: Bytes,
}

/// One page of a LIST: its items slices of the body where they can be.
pub struct ListPage {
    /// The collection's kind without `List` (`Pod`).
    pub kind: String,
    pub api_version: String,
    pub resource_version: String,
    pub cont: Option<String>,
    pub items: Vec<Bytes>,
}

/// A collection's kind and apiVersion, encoded once, to put on or take off
/// the objects of a LIST.
pub enum ItemTypeMeta {
    Json(TypeMetaJson),
    /// The envelope's encoded `typeMeta` field.
    Protobuf(Vec<u8>),
}

impl ItemTypeMeta {
    /// `object` as a watch event carries it: with kind and apiVersion.
    /// (Protobuf items never carry them: the envelope goes on.)
    pub fn complete(&self, object: &[u8], has: TypeMeta) -> Bytes {
        match self {
            ItemTypeMeta::Json(t) => t.complete(object, has),
            ItemTypeMeta::Protobuf(t) => protobuf::envelope(t, object),
        }
    }
}

impl Codec {
    /// What a stream of this codec asks the apiserver for: protobuf with
    /// JSON second, as client-go asks, since custom resources have no
    /// protobuf (the answer's Content-Type then says, [`Codec::of_answer`]).
    pub fn accept(self) -> HeaderValue {
        match self {
            Codec::Json => HeaderValue::from_static("application/json"),
            Codec::Protobuf => {
                HeaderValue::from_static("application/vnd.kubernetes.protobuf, application/json")
            }
        }
    }

    /// The encoding of an apiserver answer, by its Content-Type.
    pub fn of_answer(content_type: Option<&HeaderValue>) -> Codec {
        let media = content_type
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(str::trim)
            .unwrap_or_default();
        if media.eq_ignore_ascii_case(protobuf::MEDIA_TYPE) {
            Codec::Protobuf
        } else {
            Codec::Json
        }
    }

    /// The content type of the LISTs the hub answers.
    pub fn content_type(self) -> HeaderValue {
        match self {
            Codec::Json => HeaderValue::from_static("application/json"),
            Codec::Protobuf => HeaderValue::from_static(protobuf::MEDIA_TYPE),
        }
    }

    /// The content type of the watches the hub answers.
    pub fn watch_content_type(self) -> HeaderValue {
        match self {
            Codec::Json => HeaderValue::from_static("application/json"),
            Codec::Protobuf => HeaderValue::from_static(protobuf::WATCH_MEDIA_TYPE),
        }
    }

    /// Cuts the next whole frame off `buf`, if there is one; an error for
    /// bytes that cannot start a frame.
    pub fn next_frame(self, buf: &mut BytesMut) -> Result<Option<Bytes>, DecodeError> {
        match self {
            Codec::Json => Ok(buf
                .iter()
                .position(|&b| b == b'\n')
                .map(|pos| buf.split_to(pos + 1).freeze())),
            Codec::Protobuf => protobuf::next_frame(buf),
        }
    }

    /// Reads a watch event frame; `Ok(None)` for a frame that carries none
    /// (a blank line).
    pub fn decode_event(self, frame: &Bytes) -> Result<Option<Event>, DecodeError> {
        match self {
            Codec::Json => {
                #[derive(serde::Deserialize)]
                struct Line<'a> {
                    #[serde(rename = "type", borrow)]
                    kind: std::borrow::Cow<'a, str>,
                    #[serde(borrow)]
                    object: &'a RawValue,
                }
                if frame.trim_ascii().is_empty() {
                    return Ok(None);
                }
                let line: Line<'_> = serde_json::from_slice(frame)?;
                Ok(Some(Event {
                    ty: EventType::parse(&line.kind),
                    object: slice_of(frame, line.object.get()),
                }))
            }
            Codec::Protobuf => {
                let (ty, object) = protobuf::decode_event(frame)?;
                Ok(Some(Event {
                    ty: EventType::parse(&ty),
                    object,
                }))
            }
        }
    }

    /// What the hub keeps of an object: key, RV, labels, the `fields`
    /// selectors read, and whether it carries kind and apiVersion.
    pub fn read(self, object: &[u8], fields: &[&str]) -> Result<object::Read, DecodeError> {
        match self {
            Codec::Json => Ok(object::read(object, fields)?),
            Codec::Protobuf => protobuf::read(object, fields),
        }
    }

    /// Reads a LIST item and makes it what the cache keeps: as a watch
    /// event carries it.
    pub fn read_item(
        self,
        item: &Bytes,
        type_meta: &ItemTypeMeta,
        fields: &[&str],
    ) -> Result<(object::Read, Bytes), DecodeError> {
        match self {
            Codec::Json => {
                let read = self.read(item, fields)?;
                let full = type_meta.complete(item, read.type_meta);
                Ok((read, full))
            }
            // The kind, which says where `fields` are, is on the envelope.
            Codec::Protobuf => {
                let full = type_meta.complete(item, TypeMeta::default());
                Ok((self.read(&full, fields)?, full))
            }
        }
    }

    /// The `code` of a Status object (an ERROR event's).
    pub fn status_code(self, object: &[u8]) -> Option<u64> {
        match self {
            Codec::Json => {
                #[derive(serde::Deserialize)]
                struct Status {
                    code: Option<u64>,
                }
                serde_json::from_slice::<Status>(object).ok()?.code
            }
            Codec::Protobuf => protobuf::status_code(object),
        }
    }

    /// Reads one page of a LIST.
    pub fn decode_list(self, body: &Bytes) -> Result<ListPage, DecodeError> {
        match self {
            Codec::Json => {
                #[derive(serde::Deserialize)]
                struct Page<'a> {
                    #[serde(default)]
                    kind: String,
                    #[serde(rename = "apiVersion", default)]
                    api_version: String,
                    metadata: ListMeta,
                    #[serde(borrow, default)]
                    items: Option<Vec<&'a RawValue>>,
                }
                #[derive(serde::Deserialize)]
                struct ListMeta {
                    #[serde(rename = "resourceVersion", default)]
                    resource_version: String,
                    #[serde(rename = "continue", default)]
                    cont: Option<String>,
                }
                let page: Page<'_> = serde_json::from_slice(body)?;
                let items = page
                    .items
                    .iter()
                    .flatten()
                    .map(|item| match object::one_line(item.get().as_bytes()) {
                        std::borrow::Cow::Borrowed(_) => slice_of(body, item.get()),
                        std::borrow::Cow::Owned(v) => Bytes::from(v),
                    })
                    .collect();
                let kind = match page.kind.strip_suffix("List") {
                    Some(k) => k.to_string(),
                    None => page.kind,
                };
                Ok(ListPage {
                    kind,
                    api_version: page.api_version,
                    resource_version: page.metadata.resource_version,
                    cont: page.metadata.cont.filter(|c| !c.is_empty()),
                    items,
                })
            }
            Codec::Protobuf => {
                let page = protobuf::decode_list(body)?;
                Ok(ListPage {
                    kind: page
                        .kind
                        .strip_suffix("List")
                        .unwrap_or(page.kind)
                        .to_string(),
                    api_version: page.api_version.to_string(),
                    resource_version: page.resource_version.to_string(),
                    cont: (!page.cont.is_empty()).then(|| page.cont.to_string()),
                    items: page.items.iter().map(|i| body.slice_ref(i)).collect(),
                })
            }
        }
    }

    /// The collection's kind and apiVersion, to put on LIST items.
    pub fn item_type_meta(self, kind: &str, api_version: &str) -> ItemTypeMeta {
        match self {
            Codec::Json => ItemTypeMeta::Json(TypeMetaJson::new(kind, api_version)),
            Codec::Protobuf => ItemTypeMeta::Protobuf(protobuf::type_meta_field(api_version, kind)),
        }
    }

    /// A watch event frame around `object`.
    pub fn event(self, ty: EventType, object: &[u8]) -> Bytes {
        match self {
            Codec::Json => {
                let mut b = BytesMut::with_capacity(object.len() + 32);
                b.extend_from_slice(b"{\"type\":\"");
                b.extend_from_slice(ty.as_str().as_bytes());
                b.extend_from_slice(b"\",\"object\":");
                b.extend_from_slice(object.trim_ascii());
                b.extend_from_slice(b"}\n");
                b.freeze()
            }
            Codec::Protobuf => protobuf::event(ty.as_str(), object),
        }
    }

    /// `object` with `metadata.resourceVersion` set to `rv`, every other
    /// byte as it was.
    pub fn at_resource_version(self, object: &[u8], rv: u64) -> Vec<u8> {
        match self {
            Codec::Json => object::at_resource_version(object, rv),
            // Cached objects were read once already; one that no longer
            // reads is sent as it is.
            Codec::Protobuf => {
                protobuf::at_resource_version(object, rv).unwrap_or_else(|_| object.to_vec())
            }
        }
    }

    /// A BOOKMARK frame: the collection's kind with only its
    /// resourceVersion (and the initial-events-end annotation).
    pub fn bookmark(self, kind: &str, api_version: &str, rv: u64, initial_end: bool) -> Bytes {
        match self {
            Codec::Json => {
                let annotations = if initial_end {
                    ",\"annotations\":{\"k8s.io/initial-events-end\":\"true\"}"
                } else {
                    ""
                };
                let object = format!(
                    "{{\"kind\":{},\"apiVersion\":{},\"metadata\":{{\"resourceVersion\":\"{rv}\",\"creationTimestamp\":null{annotations}}}}}",
                    json_string(kind),
                    json_string(api_version),
                );
                self.event(EventType::Bookmark, object.as_bytes())
            }
            Codec::Protobuf => protobuf::bookmark(kind, api_version, rv, initial_end),
        }
    }

    /// The ERROR frame the apiserver sends a watch from an RV it no longer
    /// has: Status 410 Expired.
    pub fn expired(self, requested: u64, oldest: u64) -> Bytes {
        match self {
            Codec::Json => {
                let status = format!(
                    "{{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"metadata\":{{}},\"status\":\"Failure\",\"message\":\"too old resource version: {requested} ({oldest})\",\"reason\":\"Expired\",\"code\":410}}"
                );
                self.event(EventType::Error, status.as_bytes())
            }
            Codec::Protobuf => {
                let message = format!("too old resource version: {requested} ({oldest})");
                let status = protobuf::status(&message, "Expired", 410);
                self.event(EventType::Error, &status)
            }
        }
    }

    /// Whether LIST items are written differently by type (JSON: custom
    /// resources keep kind and apiVersion, built-in types lose them);
    /// protobuf items are bare messages whatever the type.
    pub fn items_vary_by_type(self) -> bool {
        matches!(self, Codec::Json)
    }

    /// A LIST of `objs` at `rv`. `items_have_type_meta`: whether the
    /// apiserver writes this collection's items with kind and apiVersion
    /// (custom resources) or without (built-in types); cached objects
    /// carry them, so they are taken off for the latter.
    pub fn list<'a>(
        self,
        kind: &str,
        api_version: &str,
        rv: u64,
        objs: impl Iterator<Item = &'a [u8]> + Clone,
        items_have_type_meta: bool,
    ) -> Result<Vec<u8>, DecodeError> {
        match self {
            Codec::Json => {
                let size: usize = objs.clone().map(|o| o.len() + 1).sum();
                let mut out = Vec::with_capacity(size + 128);
                out.extend_from_slice(b"{\"kind\":");
                out.extend_from_slice(json_string(&format!("{kind}List")).as_bytes());
                out.extend_from_slice(b",\"apiVersion\":");
                out.extend_from_slice(json_string(api_version).as_bytes());
                out.extend_from_slice(b",\"metadata\":{\"resourceVersion\":\"");
                out.extend_from_slice(rv.to_string().as_bytes());
                out.extend_from_slice(b"\"},\"items\":[");
                let without = (!items_have_type_meta).then(|| TypeMetaJson::new(kind, api_version));
                for (i, o) in objs.enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    match &without {
                        Some(tm) => tm.write_without(&mut out, o),
                        None => out.extend_from_slice(o),
                    }
                }
                out.extend_from_slice(b"]}");
                Ok(out)
            }
            // List items are bare messages whatever the type.
            Codec::Protobuf => protobuf::list(kind, api_version, rv, objs),
        }
    }
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// `part`, a slice the JSON parser borrowed from `whole`, as a `Bytes`
/// sharing `whole`'s buffer (a copy if it somehow is not inside it).
fn slice_of(whole: &Bytes, part: &str) -> Bytes {
    let start = (part.as_ptr() as usize).wrapping_sub(whole.as_ptr() as usize);
    match start.checked_add(part.len()) {
        Some(end) if end <= whole.len() => whole.slice(start..end),
        _ => Bytes::copy_from_slice(part.as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_object_is_the_frames_own_bytes() {
        let line = Bytes::from_static(b"{\"type\":\"ADDED\",\"object\": {\"b\":1.0,\"a\":1} }\n");
        let ev = Codec::Json
            .decode_event(&line)
            .expect("decodes")
            .expect("an event");
        assert_eq!(ev.ty, Some(EventType::Added));
        assert_eq!(&ev.object[..], b"{\"b\":1.0,\"a\":1}");
        let at = line.windows(2).position(|w| w == b" {").expect("object") + 1;
        assert_eq!(
            ev.object.as_ptr(),
            line[at..].as_ptr(),
            "shared, not copied"
        );
        assert_eq!(&slice_of(&line, "{}")[..], b"{}");
        assert!(
            Codec::Json
                .decode_event(&Bytes::from_static(b" \n"))
                .expect("blank")
                .is_none()
        );
    }

    #[test]
    fn frames_are_cut_at_line_ends_and_built_around_objects() {
        let mut buf = BytesMut::from(&b"{\"a\":1}\n{\"b\""[..]);
        assert_eq!(
            Codec::Json.next_frame(&mut buf).expect("json").as_deref(),
            Some(&b"{\"a\":1}\n"[..])
        );
        assert_eq!(Codec::Json.next_frame(&mut buf).expect("json"), None);
        assert_eq!(&buf[..], b"{\"b\"");
        let ev = Codec::Json.event(EventType::Deleted, b"{\"x\":1}");
        assert_eq!(&ev[..], b"{\"type\":\"DELETED\",\"object\":{\"x\":1}}\n");
        let bm = Codec::Json.bookmark("Pod", "v1", 7, true);
        let v: serde_json::Value = serde_json::from_slice(&bm).expect("json");
        assert_eq!(v["object"]["metadata"]["resourceVersion"], "7");
        assert_eq!(
            v["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
            "true"
        );
        let ex: serde_json::Value =
            serde_json::from_slice(&Codec::Json.expired(3, 9)).expect("json");
        assert_eq!(ex["type"], "ERROR");
        assert_eq!(ex["object"]["code"], 410);
        assert_eq!(
            Codec::Json.status_code(ex["object"].to_string().as_bytes()),
            Some(410)
        );
    }
}
