//! Field selectors, as k8s.io/apimachinery/pkg/fields/selector.go parses and
//! matches them.
//!
//! A field selector is a comma-separated list of `field=value`,
//! `field==value` or `field!=value` terms, ANDed. Unlike label selectors there
//! is no lexer and no whitespace rule: every byte counts.
//!
//! - Terms are split on commas not escaped by a backslash (`splitTerms`); the
//!   backslash stays in the term. Empty terms are skipped, so `a=b,` is valid.
//! - Each term is split at the first position where `!=`, `==` or `=` starts,
//!   tried in that order (`splitTerm`). The field name has no escapes: in
//!   `a\=b=c` the name is `a\` and the value `b=c`, which is then an error.
//! - The value is unescaped (`UnescapeValue`): `\\`, `\,` and `\=` stand for
//!   the character; any other escape, a trailing `\`, or a bare `,` or `=`
//!   is an error.
//! - Go sorts the raw terms before parsing them, so `RequiresExactMatch` (how
//!   `fieldSelector=metadata.name=X` names an object) answers with the first
//!   `=`/`==` term for the field in sorted order, not in input order.
//!
//! Which field names a resource supports is checked by the caller.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;

use super::SelectorError;

/// A parsed field selector: the AND of its terms. The default (and the parse
/// of "") selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    terms: Vec<FieldTerm>,
}

/// One `field=value` or `field!=value` term, the value unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldTerm {
    field: String,
    op: FieldOp,
    value: String,
}

/// `=` and `==` are the same operator (Go's `hasTerm`); `!=` is `notHasTerm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FieldOp {
    Equals,
    NotEquals,
}

/// An object's selectable fields, as Go's `fields.Fields`: a field the
/// object does not have reads as "".
pub trait Fields {
    fn get(&self, field: &str) -> &str;
}

impl Fields for BTreeMap<String, String> {
    fn get(&self, field: &str) -> &str {
        BTreeMap::get(self, field).map_or("", String::as_str)
    }
}

impl<S: BuildHasher> Fields for HashMap<String, String, S> {
    fn get(&self, field: &str) -> &str {
        HashMap::get(self, field).map_or("", String::as_str)
    }
}

impl FieldSelector {
    /// Parses like `fields.ParseSelector`.
    pub fn parse(selector: &str) -> Result<FieldSelector, SelectorError> {
        let mut raw = split_terms(selector);
        raw.sort_unstable();
        let mut terms = Vec::with_capacity(raw.len());
        for term in raw {
            if term.is_empty() {
                continue;
            }
            let Some((field, op, value)) = split_term(term) else {
                return Err(SelectorError::NoOperator {
                    selector: selector.to_owned(),
                    term: term.to_owned(),
                });
            };
            terms.push(FieldTerm {
                field: field.to_owned(),
                op,
                value: unescape(value)?.into_owned(),
            });
        }
        Ok(FieldSelector { terms })
    }

    /// True when it selects everything.
    pub fn is_everything(&self) -> bool {
        self.terms.is_empty()
    }

    /// The terms in Go's (sorted) order.
    pub fn terms(&self) -> &[FieldTerm] {
        &self.terms
    }

    /// Go's `RequiresExactMatch`: the value of the first `field=value` term.
    pub fn requires_exact_match(&self, field: &str) -> Option<&str> {
        self.terms
            .iter()
            .find(|term| term.op == FieldOp::Equals && term.field == field)
            .map(|term| term.value.as_str())
    }

    /// Whether the object's fields satisfy every term.
    pub fn matches<F: Fields + ?Sized>(&self, fields: &F) -> bool {
        self.terms
            .iter()
            .all(|term| term.matches(fields.get(&term.field)))
    }
}

impl FieldTerm {
    pub fn field(&self) -> &str {
        &self.field
    }

    pub fn op(&self) -> FieldOp {
        self.op
    }

    pub fn value(&self) -> &str {
        &self.value
    }

    /// Whether a field with value `have` passes this term.
    pub fn matches(&self, have: &str) -> bool {
        (have == self.value) == (self.op == FieldOp::Equals)
    }
}

/// `splitTerms`: splits on commas not escaped by a backslash. Go skips the
/// whole rune after a backslash; skipping one byte is the same, since no
/// UTF-8 continuation byte is `,` or `\`.
fn split_terms(selector: &str) -> Vec<&str> {
    if selector.is_empty() {
        return Vec::new();
    }
    let mut terms = Vec::with_capacity(1);
    let mut start = 0;
    let mut escaped = false;
    for (index, byte) in selector.bytes().enumerate() {
        if escaped {
            escaped = false;
        } else if byte == b'\\' {
            escaped = true;
        } else if byte == b',' {
            terms.push(&selector[start..index]);
            start = index + 1;
        }
    }
    terms.push(&selector[start..]);
    terms
}

/// `splitTerm`: the first position where `!=`, `==` or `=` starts, tried in
/// that order. Operators are ASCII, so a byte scan finds the position Go's
/// scan over runes finds.
fn split_term(term: &str) -> Option<(&str, FieldOp, &str)> {
    let bytes = term.as_bytes();
    (0..bytes.len()).find_map(|at| {
        let rest = &bytes[at..];
        let (op, len) = if rest.starts_with(b"!=") {
            (FieldOp::NotEquals, 2)
        } else if rest.starts_with(b"==") {
            (FieldOp::Equals, 2)
        } else if rest.starts_with(b"=") {
            (FieldOp::Equals, 1)
        } else {
            return None;
        };
        Some((&term[..at], op, &term[at + len..]))
    })
}

/// `UnescapeValue`; borrows when there is nothing to unescape.
fn unescape(value: &str) -> Result<Cow<'_, str>, SelectorError> {
    if !value.contains(['\\', ',', '=']) {
        return Ok(Cow::Borrowed(value));
    }
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(escaped @ ('\\' | ',' | '=')) => out.push(escaped),
                Some(other) => {
                    return Err(SelectorError::InvalidEscape {
                        sequence: format!("\\{other}"),
                    });
                }
                None => {
                    return Err(SelectorError::InvalidEscape {
                        sequence: "\\".to_owned(),
                    });
                }
            },
            ',' | '=' => return Err(SelectorError::UnescapedCharacter(c)),
            other => out.push(other),
        }
    }
    Ok(Cow::Owned(out))
}
