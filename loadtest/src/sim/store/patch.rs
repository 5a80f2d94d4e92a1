//! Patch application (RFC 7386 merge patch, RFC 6902 JSON patch, and the
//! strategic-merge directives kubectl may send) and the URL-safe base64 of
//! continue tokens: small enough to keep here rather than add crates.

use serde_json::{Map, Value};

/// RFC 7386: objects merge recursively, `null` deletes, anything else replaces.
pub(super) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else {
        return;
    };
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Removes strategic-merge directives (`$patch`, `$retainKeys`,
/// `$setElementOrder/…`, `$deleteFromPrimitiveList/…`) so that the rest can
/// be applied as a merge patch. An object carrying `"$patch": "delete"`
/// becomes `null` (delete that key).
pub(super) fn strip_directives(patch: &Value) -> Value {
    match patch {
        Value::Object(m) => {
            if m.get("$patch").and_then(Value::as_str) == Some("delete") {
                return Value::Null;
            }
            Value::Object(
                m.iter()
                    .filter(|(k, _)| !k.starts_with('$'))
                    .map(|(k, v)| (k.clone(), strip_directives(v)))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(
            a.iter()
                .filter(|v| {
                    // List entries that only carry a directive (`{"$patch":"delete",…}`) go.
                    !v.as_object().is_some_and(|m| m.contains_key("$patch"))
                })
                .map(strip_directives)
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Splits an RFC 6901 pointer into unescaped tokens.
fn pointer_tokens(path: &str) -> Result<Vec<String>, String> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(format!("invalid JSON pointer: {path:?}"));
    };
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn array_index(tok: &str, len: usize, allow_end: bool) -> Result<usize, String> {
    if allow_end && tok == "-" {
        return Ok(len);
    }
    let i: usize = tok
        .parse()
        .map_err(|_| format!("invalid array index: {tok:?}"))?;
    let max = if allow_end {
        len
    } else {
        len.saturating_sub(1)
    };
    if i > max || (!allow_end && len == 0) {
        return Err(format!("array index out of bounds: {i}"));
    }
    Ok(i)
}

/// The parent container of `tokens` and the last token.
fn parent_mut<'a>(
    doc: &'a mut Value,
    tokens: &[String],
) -> Result<(&'a mut Value, String), String> {
    let Some((last, init)) = tokens.split_last() else {
        return Err("the root cannot be a target here".into());
    };
    let mut cur = doc;
    for t in init {
        cur = match cur {
            Value::Object(m) => m
                .get_mut(t)
                .ok_or_else(|| format!("doc is missing path: {t}"))?,
            Value::Array(a) => {
                let i = array_index(t, a.len(), false)?;
                &mut a[i]
            }
            _ => return Err(format!("doc is missing path: {t}")),
        };
    }
    Ok((cur, last.clone()))
}

fn get_at<'a>(doc: &'a Value, tokens: &[String]) -> Result<&'a Value, String> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m
                .get(t)
                .ok_or_else(|| format!("doc is missing path: {t}"))?,
            Value::Array(a) => &a[array_index(t, a.len(), false)?],
            _ => return Err(format!("doc is missing path: {t}")),
        };
    }
    Ok(cur)
}

fn add_at(doc: &mut Value, tokens: &[String], value: Value) -> Result<(), String> {
    if tokens.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = parent_mut(doc, tokens)?;
    match parent {
        Value::Object(m) => {
            m.insert(last, value);
        }
        Value::Array(a) => {
            let i = array_index(&last, a.len(), true)?;
            a.insert(i, value);
        }
        _ => return Err(format!("doc is missing path: {last}")),
    }
    Ok(())
}

fn remove_at(doc: &mut Value, tokens: &[String]) -> Result<Value, String> {
    let (parent, last) = parent_mut(doc, tokens)?;
    match parent {
        Value::Object(m) => m
            .remove(&last)
            .ok_or_else(|| format!("doc is missing path: {last}")),
        Value::Array(a) => {
            let i = array_index(&last, a.len(), false)?;
            Ok(a.remove(i))
        }
        _ => Err(format!("doc is missing path: {last}")),
    }
}

/// RFC 6902: applies every operation or none (on error `doc` is unchanged).
pub(super) fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), String> {
    let Value::Array(ops) = patch else {
        return Err("a JSON patch must be an array of operations".into());
    };
    let mut work = doc.clone();
    for op in ops {
        let name = op
            .get("op")
            .and_then(Value::as_str)
            .ok_or("operation is missing \"op\"")?;
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or("operation is missing \"path\"")?;
        let tokens = pointer_tokens(path)?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| format!("{name} operation is missing \"value\""))
        };
        let from = || -> Result<Vec<String>, String> {
            pointer_tokens(
                op.get("from")
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("{name} operation is missing \"from\""))?,
            )
        };
        match name {
            "add" => add_at(&mut work, &tokens, value()?)?,
            "remove" => {
                remove_at(&mut work, &tokens)?;
            }
            "replace" => {
                get_at(&work, &tokens)?;
                if tokens.is_empty() {
                    work = value()?;
                } else {
                    remove_at(&mut work, &tokens)?;
                    add_at(&mut work, &tokens, value()?)?;
                }
            }
            "test" => {
                if *get_at(&work, &tokens)? != value()? {
                    return Err(format!("testing value {path} failed"));
                }
            }
            "move" => {
                let from = from()?;
                let v = remove_at(&mut work, &from)?;
                add_at(&mut work, &tokens, v)?;
            }
            "copy" => {
                let v = get_at(&work, &from()?)?.clone();
                add_at(&mut work, &tokens, v)?;
            }
            other => return Err(format!("unexpected kind: {other}")),
        }
    }
    *doc = work;
    Ok(())
}

/// URL-safe base64 without padding (Go's `base64.RawURLEncoding`).
pub(super) fn base64url_encode(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// Decodes [`base64url_encode`]'s output (padding tolerated).
pub(super) fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .ok()
}
