//! The little of the Kubernetes protobuf encoding a fleet agent reads, as
//! kubelet's informers receive it (`--protobuf`): a PodList's
//! resourceVersion and its items' keys and RVs, and per watch frame the
//! event type, the object's key and RV, or a Status's code.
//!
//! A scan over prost's wire primitives (field numbers from k8s.io/api's
//! generated.proto): an agent reads four fields of each Pod, as the JSON
//! agent's serde struct does, rather than decoding whole Pods — the load
//! generator must not be the bottleneck it measures.

use prost::encoding::{WireType, decode_key, decode_varint};

/// An object's `metadata`: namespace, name, resourceVersion.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Meta {
    pub namespace: String,
    pub name: String,
    pub resource_version: String,
}

/// A malformed message.
#[derive(Debug)]
pub struct Malformed;

/// The length-delimited fields of a message: (tag, value).
fn fields(mut msg: &[u8]) -> impl Iterator<Item = Result<(u32, Field<'_>), Malformed>> {
    std::iter::from_fn(move || {
        if msg.is_empty() {
            return None;
        }
        let field = (|| {
            let (tag, wire) = decode_key(&mut msg).map_err(|_| Malformed)?;
            Ok(match wire {
                WireType::Varint => (
                    tag,
                    Field::Varint(decode_varint(&mut msg).map_err(|_| Malformed)?),
                ),
                WireType::LengthDelimited => {
                    let len = usize::try_from(decode_varint(&mut msg).map_err(|_| Malformed)?)
                        .map_err(|_| Malformed)?;
                    if len > msg.len() {
                        return Err(Malformed);
                    }
                    let (v, rest) = msg.split_at(len);
                    msg = rest;
                    (tag, Field::Bytes(v))
                }
                WireType::SixtyFourBit | WireType::ThirtyTwoBit => {
                    let n = if wire == WireType::SixtyFourBit { 8 } else { 4 };
                    msg = msg.get(n..).ok_or(Malformed)?;
                    (tag, Field::Other)
                }
                WireType::StartGroup | WireType::EndGroup => return Err(Malformed),
            })
        })();
        if field.is_err() {
            msg = &[];
        }
        Some(field)
    })
}

#[derive(Debug, Clone, Copy)]
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Other,
}

fn string(b: &[u8]) -> Result<String, Malformed> {
    String::from_utf8(b.to_vec()).map_err(|_| Malformed)
}

fn bytes(msg: &[u8], want: u32) -> Result<Option<&[u8]>, Malformed> {
    let mut found = None;
    for f in fields(msg) {
        if let (tag, Field::Bytes(v)) = f?
            && tag == want
        {
            found = Some(v);
        }
    }
    Ok(found)
}

/// `k8s\0` + runtime.Unknown → (kind, raw).
fn unwrap(enveloped: &[u8]) -> Result<(String, &[u8]), Malformed> {
    let body = enveloped.strip_prefix(b"k8s\0").ok_or(Malformed)?;
    let kind = match bytes(body, 1)? {
        Some(tm) => string(bytes(tm, 2)?.unwrap_or_default())?,
        None => String::new(),
    };
    Ok((kind, bytes(body, 2)?.unwrap_or_default()))
}

fn meta(object: &[u8]) -> Result<Meta, Malformed> {
    let mut m = Meta::default();
    if let Some(om) = bytes(object, 1)? {
        for f in fields(om) {
            match f? {
                (1, Field::Bytes(v)) => m.name = string(v)?,
                (3, Field::Bytes(v)) => m.namespace = string(v)?,
                (6, Field::Bytes(v)) => m.resource_version = string(v)?,
                _ => {}
            }
        }
    }
    Ok(m)
}

/// A PodList body: (its resourceVersion, its items' metadata).
pub fn list(body: &[u8]) -> Result<(String, Vec<Meta>), Malformed> {
    let (_, raw) = unwrap(body)?;
    let mut rv = String::new();
    let mut items = Vec::new();
    for f in fields(raw) {
        match f? {
            (1, Field::Bytes(lm)) => rv = string(bytes(lm, 2)?.unwrap_or_default())?,
            (2, Field::Bytes(item)) => items.push(meta(item)?),
            _ => {}
        }
    }
    Ok((rv, items))
}

/// One watch event (the frame without its length prefix): type, the
/// object's metadata, and a Status's code for ERROR events.
pub fn event(msg: &[u8]) -> Result<(String, Meta, Option<u16>), Malformed> {
    let mut ty = String::new();
    let mut object: &[u8] = &[];
    for f in fields(msg) {
        match f? {
            (1, Field::Bytes(v)) => ty = string(v)?,
            (2, Field::Bytes(ext)) => object = bytes(ext, 1)?.unwrap_or_default(),
            _ => {}
        }
    }
    let (kind, raw) = unwrap(object)?;
    if kind == "Status" {
        let mut code = None;
        for f in fields(raw) {
            if let (6, Field::Varint(c)) = f? {
                code = u16::try_from(c).ok();
            }
        }
        return Ok((ty, Meta::default(), code));
    }
    Ok((ty, meta(raw)?, None))
}

/// Cuts the next length-prefixed frame's message off `buf`.
pub fn next_frame(buf: &mut bytes::BytesMut) -> Option<bytes::Bytes> {
    let len = u32::from_be_bytes(*buf.first_chunk::<4>()?) as usize;
    if buf.len() < 4 + len {
        return None;
    }
    let mut frame = buf.split_to(4 + len);
    Some(frame.split_off(4).freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/apiserver-v1.24-protobuf/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn recorded_lists_and_watches_read_as_their_json_twins() {
        let (rv, items) = list(&fixture("list-pods.pb")).expect("a list");
        let json: serde_json::Value =
            serde_json::from_slice(&fixture("list-pods.json")).expect("json");
        assert_eq!(rv, json["metadata"]["resourceVersion"]);
        let names: Vec<&str> = items.iter().map(|m| m.name.as_str()).collect();
        let want: Vec<&str> = json["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| i["metadata"]["name"].as_str().expect("name"))
            .collect();
        assert_eq!(names, want);

        let mut buf = bytes::BytesMut::from(&fixture("watch-pods.pb")[..]);
        let twin = String::from_utf8(fixture("watch-pods.jsonl")).expect("utf-8");
        for line in twin.lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("json");
            let frame = next_frame(&mut buf).expect("a frame");
            let (ty, m, code) = event(&frame).expect("an event");
            assert_eq!(ty, v["type"]);
            assert_eq!(
                m.resource_version,
                v["object"]["metadata"]["resourceVersion"]
            );
            assert_eq!(code, None);
        }
        assert!(buf.is_empty());

        let mut old = bytes::BytesMut::from(&fixture("watch-too-old.pb")[..]);
        let (ty, _, code) = event(&next_frame(&mut old).expect("a frame")).expect("an event");
        assert_eq!((ty.as_str(), code), ("ERROR", Some(410)));
    }
}
