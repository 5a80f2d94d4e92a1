//! JSON objects as stored → protobuf messages, the way Go's gogo-generated
//! `Marshal` writes them: fields in number order, non-pointer fields even
//! when zero, pointer fields only when set, map entries sorted by key.
//!
//! Encoding never fails: a JSON value of the wrong type is treated as
//! absent (written as its zero value when the field is always written), and
//! JSON fields without a table entry are not written at all.

use serde_json::{Map, Value};

use super::schema::{Field, Kind, Presence};

/// Appends `obj` as the message described by `fields`.
pub(super) fn message(obj: &Map<String, Value>, fields: &[Field], out: &mut Vec<u8>) {
    for field in fields {
        let value = obj.get(field.name).filter(|v| !v.is_null());
        let always = field.presence != Presence::Ptr;
        match field.kind {
            Kind::Inline(inner) => {
                // The embedded struct's fields sit beside ours in JSON.
                nested(out, field.num, |buf| message(obj, inner, buf));
            }
            Kind::RepStr => {
                for s in array(value).iter().filter_map(Value::as_str) {
                    bytes_field(out, field.num, s.as_bytes());
                }
            }
            Kind::RepMsg(inner) => {
                for item in array(value) {
                    let empty = Map::new();
                    let item = item.as_object().unwrap_or(&empty);
                    nested(out, field.num, |buf| message(item, inner, buf));
                }
            }
            Kind::MapStr | Kind::MapBytes | Kind::MapQuantity => {
                let Some(map) = value.and_then(Value::as_object) else {
                    continue;
                };
                // Go sorts map keys before writing them; so do we, whatever
                // order the JSON map keeps.
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                for key in keys {
                    let v = &map[key.as_str()];
                    nested(out, field.num, |entry| {
                        bytes_field(entry, 1, key.as_bytes());
                        match field.kind {
                            Kind::MapBytes => bytes_field(entry, 2, &unbase64(v)),
                            Kind::MapQuantity => nested(entry, 2, |q| quantity(v, q)),
                            _ => bytes_field(entry, 2, v.as_str().unwrap_or("").as_bytes()),
                        }
                    });
                }
            }
            _ if value.is_none() && !always => {}
            kind => single(kind, value, field.num, out),
        }
    }
}

/// One non-repeated field; `value` None means zero.
fn single(kind: Kind, value: Option<&Value>, num: u64, out: &mut Vec<u8>) {
    match kind {
        Kind::Str => {
            let s = value.and_then(Value::as_str).unwrap_or("");
            bytes_field(out, num, s.as_bytes());
        }
        Kind::Bool => {
            let b = value.and_then(Value::as_bool).unwrap_or(false);
            varint_field(out, num, u64::from(b));
        }
        // Negative int32s are sign-extended to ten bytes, as Go does.
        Kind::Int32 | Kind::Int64 => varint_field(out, num, int(value) as u64),
        Kind::Time | Kind::MicroTime => nested(out, num, |buf| time(value, buf)),
        Kind::Quantity => nested(out, num, |buf| {
            quantity(value.unwrap_or(&Value::Null), buf);
        }),
        Kind::IntOrString => nested(out, num, |buf| int_or_string(value, buf)),
        Kind::FieldsV1 => nested(out, num, |buf| {
            if let Some(v) = value {
                // FieldsV1 carries its JSON object as raw bytes; Go wrote
                // it compact with sorted keys, as serde_json does.
                bytes_field(buf, 1, &serde_json::to_vec(v).unwrap_or_default());
            }
        }),
        Kind::Msg(inner) => {
            let empty = Map::new();
            let obj = value.and_then(Value::as_object).unwrap_or(&empty);
            nested(out, num, |buf| message(obj, inner, buf));
        }
        Kind::Inline(_)
        | Kind::RepStr
        | Kind::RepMsg(_)
        | Kind::MapStr
        | Kind::MapBytes
        | Kind::MapQuantity => {}
    }
}

fn array(value: Option<&Value>) -> &[Value] {
    value.and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

fn int(value: Option<&Value>) -> i64 {
    value
        .and_then(|v| v.as_i64().or_else(|| v.as_f64().map(|f| f as i64)))
        .unwrap_or(0)
}

/// meta/v1 Time: nothing for the zero time, else {1 seconds, 2 nanos}.
/// Time's JSON has whole seconds; MicroTime's has microseconds.
fn time(value: Option<&Value>, out: &mut Vec<u8>) {
    let Some(at) = value
        .and_then(Value::as_str)
        .and_then(|s| humantime::parse_rfc3339_weak(s).ok())
    else {
        return;
    };
    let (seconds, nanos) = match at.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(_) => return,
    };
    varint_field(out, 1, seconds as u64);
    varint_field(out, 2, u64::from(nanos));
}

/// resource.Quantity {1 string}: the canonical string as JSON has it.
fn quantity(value: &Value, out: &mut Vec<u8>) {
    let s = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => "0".to_string(),
    };
    bytes_field(out, 1, s.as_bytes());
}

/// intstr.IntOrString {1 type (0 int, 1 string), 2 intVal, 3 strVal}, all written.
fn int_or_string(value: Option<&Value>, out: &mut Vec<u8>) {
    match value {
        Some(Value::String(s)) => {
            varint_field(out, 1, 1);
            varint_field(out, 2, 0);
            bytes_field(out, 3, s.as_bytes());
        }
        other => {
            varint_field(out, 1, 0);
            varint_field(out, 2, int(other) as u64);
            bytes_field(out, 3, b"");
        }
    }
}

fn unbase64(v: &Value) -> Vec<u8> {
    use base64::Engine;
    v.as_str()
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .unwrap_or_default()
}

pub(super) fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_field(out: &mut Vec<u8>, num: u64, v: u64) {
    varint(out, num << 3);
    varint(out, v);
}

/// A length-delimited field (string, bytes, message).
pub(super) fn bytes_field(out: &mut Vec<u8>, num: u64, bytes: &[u8]) {
    varint(out, (num << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// A message field whose body `write` produces.
pub(super) fn nested(out: &mut Vec<u8>, num: u64, write: impl FnOnce(&mut Vec<u8>)) {
    let mut buf = Vec::new();
    write(&mut buf);
    bytes_field(out, num, &buf);
}
