//! Protobuf messages → the JSON Go's encoder would write for the same
//! object: zero scalars left out (`omitempty`), structs always present
//! (Time as `null` when zero), pointers present when set, and fields
//! without `omitempty` always present (`null` for an empty slice).
//! Fields the table does not know are skipped.

use serde_json::{Map, Value};

use super::ProtoError;
use super::schema::{Field, Kind, Presence};

/// One message as JSON.
pub(super) fn message(buf: &[u8], fields: &[Field]) -> Result<Map<String, Value>, ProtoError> {
    let mut out = Map::new();
    let mut seen: Vec<u64> = Vec::new();
    for item in Reader(buf) {
        let (num, wire) = item?;
        let Some(field) = fields.iter().find(|fd| fd.num == num) else {
            continue;
        };
        seen.push(num);
        let Wire::Len(v) = wire else {
            let Wire::Varint(n) = wire else {
                return Err(ProtoError::Malformed);
            };
            let value = match field.kind {
                Kind::Bool => Value::Bool(n != 0),
                // int64 fields are two's complement varints; int32 ones are
                // sign-extended to 64 bits.
                Kind::Int64 => Value::from(n as i64),
                Kind::Int32 => Value::from(n as i64 as i32),
                _ => return Err(ProtoError::Malformed),
            };
            let zero = n == 0;
            if !zero || field.presence != Presence::Zero {
                out.insert(field.name.to_string(), value);
            }
            continue;
        };
        let name = field.name.to_string();
        match field.kind {
            Kind::Str => {
                if !v.is_empty() || field.presence != Presence::Zero {
                    out.insert(name, Value::String(utf8(v)?));
                }
            }
            Kind::Time => {
                out.insert(name, time(v, false)?);
            }
            Kind::MicroTime => {
                out.insert(name, time(v, true)?);
            }
            Kind::Quantity => {
                out.insert(name, Value::String(quantity(v)?));
            }
            Kind::IntOrString => {
                out.insert(name, int_or_string(v)?);
            }
            Kind::FieldsV1 => {
                let raw = first_bytes(v, 1)?.unwrap_or(b"null");
                out.insert(
                    name,
                    serde_json::from_slice(raw).map_err(|_| ProtoError::Malformed)?,
                );
            }
            Kind::Msg(inner) => {
                out.insert(name, Value::Object(message(v, inner)?));
            }
            Kind::Inline(inner) => out.extend(message(v, inner)?),
            Kind::MapStr | Kind::MapBytes | Kind::MapQuantity => {
                let (key, value) = map_entry(v, field.kind)?;
                let entry = out.entry(name).or_insert_with(|| Value::Object(Map::new()));
                if let Some(m) = entry.as_object_mut() {
                    m.insert(key, value);
                }
            }
            Kind::RepStr => push(&mut out, name, Value::String(utf8(v)?)),
            Kind::RepMsg(inner) => push(&mut out, name, Value::Object(message(v, inner)?)),
            Kind::Bool | Kind::Int32 | Kind::Int64 => return Err(ProtoError::Malformed),
        }
    }
    // What Go's JSON has even when the wire had nothing: structs (their
    // own always-present fields included) and fields without omitempty.
    for field in fields {
        if seen.contains(&field.num) || field.presence == Presence::Ptr {
            continue;
        }
        let name = field.name.to_string();
        match field.kind {
            Kind::Msg(inner) => {
                out.insert(name, Value::Object(message(&[], inner)?));
            }
            Kind::Inline(inner) => out.extend(message(&[], inner)?),
            Kind::Time | Kind::MicroTime => {
                out.insert(name, Value::Null);
            }
            Kind::Quantity => {
                out.insert(name, Value::String("0".to_string()));
            }
            Kind::IntOrString => {
                out.insert(name, Value::from(0));
            }
            _ if field.presence == Presence::Req => {
                let zero = match field.kind {
                    Kind::Str => Value::String(String::new()),
                    Kind::Bool => Value::Bool(false),
                    Kind::Int32 | Kind::Int64 => Value::from(0),
                    _ => Value::Null,
                };
                out.insert(name, zero);
            }
            _ => {}
        }
    }
    Ok(out)
}

fn push(out: &mut Map<String, Value>, name: String, v: Value) {
    let entry = out.entry(name).or_insert_with(|| Value::Array(Vec::new()));
    if let Some(a) = entry.as_array_mut() {
        a.push(v);
    }
}

fn map_entry(buf: &[u8], kind: Kind) -> Result<(String, Value), ProtoError> {
    let mut key = String::new();
    let mut value = match kind {
        Kind::MapQuantity => Value::String("0".to_string()),
        _ => Value::String(String::new()),
    };
    for item in Reader(buf) {
        match item? {
            (1, Wire::Len(v)) => key = utf8(v)?,
            (2, Wire::Len(v)) => {
                value = Value::String(match kind {
                    Kind::MapBytes => base64(v),
                    Kind::MapQuantity => quantity(v)?,
                    _ => utf8(v)?,
                });
            }
            _ => {}
        }
    }
    Ok((key, value))
}

/// The first length-delimited field `num` of a message.
fn first_bytes(buf: &[u8], num: u64) -> Result<Option<&[u8]>, ProtoError> {
    for item in Reader(buf) {
        if let (n, Wire::Len(v)) = item?
            && n == num
        {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

fn quantity(buf: &[u8]) -> Result<String, ProtoError> {
    Ok(match first_bytes(buf, 1)? {
        Some(v) => utf8(v)?,
        None => "0".to_string(),
    })
}

fn int_or_string(buf: &[u8]) -> Result<Value, ProtoError> {
    let (mut kind, mut int, mut string) = (0u64, 0i64, String::new());
    for item in Reader(buf) {
        match item? {
            (1, Wire::Varint(v)) => kind = v,
            (2, Wire::Varint(v)) => int = i64::from(v as i64 as i32),
            (3, Wire::Len(v)) => string = utf8(v)?,
            _ => {}
        }
    }
    Ok(if kind == 1 {
        Value::String(string)
    } else {
        Value::from(int)
    })
}

/// Time: an empty message is the zero time (`null`); otherwise whole
/// seconds (Go drops Time's nanos on decode). MicroTime keeps microseconds.
fn time(buf: &[u8], micro: bool) -> Result<Value, ProtoError> {
    if buf.is_empty() {
        return Ok(Value::Null);
    }
    let (mut seconds, mut nanos) = (0i64, 0u32);
    for item in Reader(buf) {
        match item? {
            (1, Wire::Varint(v)) => seconds = v as i64,
            (2, Wire::Varint(v)) => nanos = v as u32,
            _ => {}
        }
    }
    let Ok(seconds) = u64::try_from(seconds) else {
        return Ok(Value::Null);
    };
    let at = std::time::UNIX_EPOCH + std::time::Duration::new(seconds, nanos.min(999_999_999));
    Ok(Value::String(if micro {
        humantime::format_rfc3339_micros(at).to_string()
    } else {
        super::super::auth::format_timestamp(seconds)
    }))
}

fn utf8(v: &[u8]) -> Result<String, ProtoError> {
    String::from_utf8(v.to_vec()).map_err(|_| ProtoError::Malformed)
}

/// Standard base64 with padding (how JSON carries `[]byte`).
pub(super) fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// A protobuf field value by wire type.
pub(super) enum Wire<'a> {
    Varint(u64),
    Len(&'a [u8]),
    Fixed,
}

/// Iterates the (field number, value) pairs of a message.
pub(super) struct Reader<'a>(pub(super) &'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, ProtoError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.0.split_first().ok_or(ProtoError::Malformed)?;
            self.0 = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(ProtoError::Malformed)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if n > self.0.len() {
            return Err(ProtoError::Malformed);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn field(&mut self) -> Result<(u64, Wire<'a>), ProtoError> {
        let key = self.varint()?;
        let wire = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Wire::Fixed
            }
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|_| ProtoError::Malformed)?;
                Wire::Len(self.take(n)?)
            }
            5 => {
                self.take(4)?;
                Wire::Fixed
            }
            _ => return Err(ProtoError::Malformed),
        };
        Ok((key >> 3, wire))
    }
}

impl<'a> Iterator for Reader<'a> {
    type Item = Result<(u64, Wire<'a>), ProtoError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let item = self.field();
        if item.is_err() {
            // Stop after the first error.
            self.0 = &[];
        }
        Some(item)
    }
}
