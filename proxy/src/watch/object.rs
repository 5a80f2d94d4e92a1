//! One object's JSON as the apiserver sent it: read in one borrowed pass,
//! kept and passed on byte for byte.
//!
//! The hub needs a few things of each object — its key, resourceVersion,
//! labels and the type's selectable fields ([`Meta`]), and whether it
//! carries `kind`/`apiVersion` at its top level ([`TypeMeta`]) — but never
//! the object as a tree. Decoding into a `serde_json::Value` and encoding
//! again would cost an allocation per node and change the apiserver's bytes
//! (key order, number formatting); adding TypeMeta without looking would
//! duplicate the keys of objects that have it (custom resources keep it in
//! LIST items, built-in types do not). So nothing here builds a `Value`:
//! [`read`] walks the bytes, borrows what it can and skips the rest
//! unparsed, and every edit — adding or removing TypeMeta, setting the
//! resourceVersion of a DELETED the hub makes — splices bytes at positions
//! the parse found, leaving every other byte as it came.

use std::borrow::Cow;
use std::fmt;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::watch::filter::{Meta, absent_field_value, field_path};

/// Which TypeMeta keys an object has at its top level.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TypeMeta {
    pub kind: bool,
    pub api_version: bool,
}

impl TypeMeta {
    /// `Some(true)` with both keys, `Some(false)` with neither, `None` for
    /// an object with only one (which no apiserver sends).
    pub fn uniform(self) -> Option<bool> {
        (self.kind == self.api_version).then_some(self.kind)
    }
}

/// What [`read`] found in an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub meta: Meta,
    pub type_meta: TypeMeta,
}

/// Reads an object's [`Meta`] (with the values of `fields`, the type's
/// selectable fields) and which TypeMeta keys it has, in one pass.
pub fn read(object: &[u8], fields: &[&str]) -> Result<Read, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(object);
    let read = Top { fields }.deserialize(&mut de)?;
    de.end()?;
    Ok(read)
}

/// A string that borrows from the input unless it had escapes.
struct Str<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Str<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// The part of `metadata` the hub keeps; every other key is skipped unparsed
/// (`managedFields` is most of a small object).
#[derive(Deserialize)]
struct ObjectMeta<'a> {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(rename = "resourceVersion", borrow, default)]
    resource_version: Cow<'a, str>,
    #[serde(default)]
    labels: Option<Labels>,
}

/// `metadata.labels`, straight into the pairs [`Meta`] keeps.
struct Labels(Vec<(String, String)>);

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Labels;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of labels")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Labels, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(pair) = map.next_entry::<String, String>()? {
                    out.push(pair);
                }
                Ok(Labels(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The top level of an object.
struct Top<'f> {
    fields: &'f [&'f str],
}

impl<'de> DeserializeSeed<'de> for Top<'_> {
    type Value = Read;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Read, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Top<'_> {
    type Value = Read;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a Kubernetes object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Read, A::Error> {
        let mut meta = Meta {
            fields: self
                .fields
                .iter()
                .map(|f| absent_field_value(f).to_owned())
                .collect(),
            ..Meta::default()
        };
        let mut type_meta = TypeMeta::default();
        while let Some(Str(key)) = map.next_key()? {
            match &*key {
                "metadata" => {
                    let m: ObjectMeta<'de> = map.next_value()?;
                    meta.name = m.name;
                    meta.namespace = m.namespace;
                    meta.rv = m.resource_version.parse().unwrap_or(0);
                    meta.labels = m.labels.map(|l| l.0).unwrap_or_default();
                }
                "kind" => {
                    type_meta.kind = true;
                    map.next_value::<IgnoredAny>()?;
                }
                "apiVersion" => {
                    type_meta.api_version = true;
                    map.next_value::<IgnoredAny>()?;
                }
                key => match child(self.fields, "", key) {
                    Some(prefix) => map.next_value_seed(Pick {
                        fields: self.fields,
                        prefix,
                        out: &mut meta.fields,
                    })?,
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                },
            }
        }
        Ok(Read { meta, type_meta })
    }
}

/// The path `prefix.key` (`key` at the top) when some selectable field is
/// at or below it: a slice of that field's path, so it lives as long as
/// `fields`.
fn child<'f>(fields: &[&'f str], prefix: &str, key: &str) -> Option<&'f str> {
    fields.iter().find_map(|&f| {
        let path = field_path(f);
        let below = if prefix.is_empty() {
            path
        } else {
            path.strip_prefix(prefix)?.strip_prefix('.')?
        };
        let after = below.strip_prefix(key)?;
        (after.is_empty() || after.starts_with('.')).then(|| &path[..path.len() - after.len()])
    })
}

/// The value at `prefix`: a selectable field itself (its value is
/// recorded), or an object on the way to one (walked). No selectable field
/// is a prefix of another, so it is one or the other.
struct Pick<'a> {
    fields: &'a [&'a str],
    prefix: &'a str,
    out: &'a mut [String],
}

impl<'de> DeserializeSeed<'de> for Pick<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.fields.iter().any(|f| field_path(f) == self.prefix) {
            let raw = <&RawValue>::deserialize(d)?;
            let text = field_text(raw).map_err(<D::Error as de::Error>::custom)?;
            for (i, f) in self.fields.iter().enumerate() {
                if field_path(f) == self.prefix
                    && let Some(slot) = self.out.get_mut(i)
                {
                    slot.clone_from(&text);
                }
            }
            return Ok(());
        }
        d.deserialize_any(self)
    }
}

/// A selectable field's value as the apiserver's `GetAttrs` renders it:
/// strings as they are, `null` as "", anything else (booleans, numbers) as
/// its JSON text.
fn field_text(raw: &RawValue) -> Result<String, serde_json::Error> {
    match raw.get() {
        s if s.starts_with('"') => serde_json::from_str(s),
        "null" => Ok(String::new()),
        s => Ok(s.to_owned()),
    }
}

impl<'de> Visitor<'de> for Pick<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Pick {
            fields,
            prefix,
            out,
        } = self;
        while let Some(Str(key)) = map.next_key()? {
            match child(fields, prefix, &key) {
                Some(prefix) => map.next_value_seed(Pick {
                    fields,
                    prefix,
                    out: &mut *out,
                })?,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }

    // Not an object: nothing below it, so the fields keep their absent values.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
}

/// A collection's `kind` and `apiVersion`, encoded once, to add to objects
/// that lack them or take off objects that have them.
pub struct TypeMetaJson {
    /// `"Pod"`, `"v1"`: JSON strings.
    kind: String,
    api_version: String,
    /// `{"kind":K,"apiVersion":V,`: how built-in types' watch events begin.
    kind_first: String,
    /// `{"apiVersion":V,"kind":K,`: how sorted-key encoders (unstructured
    /// objects, kube-sim) begin them.
    api_version_first: String,
}

impl TypeMetaJson {
    pub fn new(kind: &str, api_version: &str) -> TypeMetaJson {
        let (kind, api_version) = (json_string(kind), json_string(api_version));
        TypeMetaJson {
            kind_first: format!("{{\"kind\":{kind},\"apiVersion\":{api_version},"),
            api_version_first: format!("{{\"apiVersion\":{api_version},\"kind\":{kind},"),
            kind,
            api_version,
        }
    }

    /// `object` as a watch event carries it: as it is when it has both keys
    /// (`has`, from [`read`]), else with the missing ones put first.
    pub fn complete(&self, object: &[u8], has: TypeMeta) -> Bytes {
        if has.kind && has.api_version {
            return Bytes::copy_from_slice(object);
        }
        let Some(rest) = object.strip_prefix(b"{") else {
            // Not an object; `read` would have refused it.
            return Bytes::copy_from_slice(object);
        };
        if !has.kind && !has.api_version && !rest.trim_ascii_start().starts_with(b"}") {
            let mut b = BytesMut::with_capacity(self.kind_first.len() + rest.len());
            b.extend_from_slice(self.kind_first.as_bytes());
            b.extend_from_slice(rest);
            return b.freeze();
        }
        let mut b = BytesMut::with_capacity(object.len() + self.kind_first.len());
        b.extend_from_slice(b"{");
        let mut first = true;
        for (missing, key, value) in [
            (!has.kind, "\"kind\":", &self.kind),
            (!has.api_version, "\"apiVersion\":", &self.api_version),
        ] {
            if missing {
                if !first {
                    b.extend_from_slice(b",");
                }
                b.extend_from_slice(key.as_bytes());
                b.extend_from_slice(value.as_bytes());
                first = false;
            }
        }
        if !rest.trim_ascii_start().starts_with(b"}") {
            b.extend_from_slice(b",");
        }
        b.extend_from_slice(rest);
        b.freeze()
    }

    /// Appends `object` to `out` without its top-level `kind` and
    /// `apiVersion`, as a built-in type's LIST item. The usual shapes are a
    /// prefix to cut; otherwise a borrowed parse finds the members, and
    /// every other member is copied as it is.
    pub fn write_without(&self, out: &mut Vec<u8>, object: &[u8]) {
        for p in [&self.kind_first, &self.api_version_first] {
            if let Some(rest) = object.strip_prefix(p.as_bytes()) {
                out.push(b'{');
                out.extend_from_slice(rest);
                return;
            }
        }
        let start = out.len();
        let mut de = serde_json::Deserializer::from_slice(object);
        let done = Without {
            object,
            out: &mut *out,
        }
        .deserialize(&mut de)
        .and_then(|()| de.end());
        if let Err(e) = done {
            // Cached objects were read once already, so this does not
            // happen; the object as it is beats a broken list.
            tracing::warn!(error = %e, "cached object unreadable; listed as it is");
            out.truncate(start);
            out.extend_from_slice(object);
        }
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
}

/// Where `part` (borrowed from `whole`) begins in `whole`.
fn offset_in(whole: &[u8], part: &str) -> Option<usize> {
    let at = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    (at + part.len() <= whole.len()).then_some(at)
}

/// Whether a raw key (with its quotes) is `name`.
fn key_is(raw: &RawValue, name: &str) -> bool {
    let s = raw.get();
    if s.contains('\\') {
        return serde_json::from_str::<Cow<'_, str>>(s).is_ok_and(|k| k == name);
    }
    s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) == Some(name)
}

/// Copies an object's top-level members but `kind` and `apiVersion`.
struct Without<'a> {
    object: &'a [u8],
    out: &'a mut Vec<u8>,
}

impl<'de> DeserializeSeed<'de> for Without<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Without<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a Kubernetes object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.out.push(b'{');
        let mut first = true;
        while let Some(key) = map.next_key::<&'de RawValue>()? {
            let value = map.next_value::<&'de RawValue>()?;
            if key_is(key, "kind") || key_is(key, "apiVersion") {
                continue;
            }
            // The member from its key's opening quote to its value's end.
            let (Some(from), Some(to)) = (
                offset_in(self.object, key.get()),
                offset_in(self.object, value.get()),
            ) else {
                return Err(de::Error::custom("member not borrowed from the object"));
            };
            let member = self
                .object
                .get(from..to + value.get().len())
                .ok_or_else(|| de::Error::custom("member out of the object"))?;
            if !first {
                self.out.push(b',');
            }
            self.out.extend_from_slice(member);
            first = false;
        }
        self.out.push(b'}');
        Ok(())
    }
}

/// `object` with `metadata.resourceVersion` set to `rv`, every other byte
/// as it was: the old object of a DELETED for a subscriber the object
/// left, which the apiserver sends at the change's resourceVersion.
pub fn at_resource_version(object: &[u8], rv: u64) -> Vec<u8> {
    #[derive(Deserialize)]
    struct Top<'a> {
        #[serde(borrow, default)]
        metadata: Option<&'a RawValue>,
    }
    #[derive(Deserialize)]
    struct Metadata<'a> {
        #[serde(rename = "resourceVersion", borrow, default)]
        resource_version: Option<&'a RawValue>,
    }
    let value = format!("\"{rv}\"");
    let splice = |at: usize, end: usize, insert: &[u8]| {
        let mut out = Vec::with_capacity(object.len() + insert.len());
        out.extend_from_slice(&object[..at]);
        out.extend_from_slice(insert);
        out.extend_from_slice(&object[end..]);
        out
    };
    let Ok(Top {
        metadata: Some(metadata),
    }) = serde_json::from_slice::<Top<'_>>(object)
    else {
        return object.to_vec();
    };
    let Some(meta_at) = offset_in(object, metadata.get()) else {
        return object.to_vec();
    };
    match serde_json::from_str::<Metadata<'_>>(metadata.get()) {
        Ok(Metadata {
            resource_version: Some(old),
        }) => match offset_in(object, old.get()) {
            Some(at) => splice(at, at + old.get().len(), value.as_bytes()),
            None => object.to_vec(),
        },
        // No resourceVersion (the apiserver always sets one): add it first.
        Ok(Metadata {
            resource_version: None,
        }) => {
            let empty = metadata.get()[1..].trim_start().starts_with('}');
            let member = format!(
                "\"resourceVersion\":{value}{}",
                if empty { "" } else { "," }
            );
            splice(meta_at + 1, meta_at + 1, member.as_bytes())
        }
        Err(_) => object.to_vec(),
    }
}

/// `object` on one line: whitespace outside strings dropped when it has
/// line breaks (an apiserver pretty-prints for `?pretty` and for curl's
/// User-Agent), as it is otherwise. A cached object becomes part of a
/// watch event line, so a line break in it would split the event.
pub fn one_line(object: &[u8]) -> Cow<'_, [u8]> {
    if !object.iter().any(|&b| b == b'\n' || b == b'\r') {
        return Cow::Borrowed(object);
    }
    let mut out = Vec::with_capacity(object.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in object {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            in_string = b == b'"';
            out.push(b);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests;
