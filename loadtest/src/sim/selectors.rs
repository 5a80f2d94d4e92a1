//! Label and field selectors with the apiserver's grammar and semantics.
//!
//! Pure and allocation-light so that kube-sim's store and the proxy's watch
//! multiplexer filter `serde_json::Value` objects exactly as the apiserver
//! does (k8s.io/apimachinery/pkg/labels/selector.go, pkg/fields/selector.go,
//! and the per-type `GetAttrs` field sets in k8s.io/kubernetes/pkg/registry).
//! Both selectors default to "everything".

use serde_json::Value;

/// A selector that could not be parsed or uses an unsupported field; the
/// message is the apiserver's wording (it becomes a 400 BadRequest Status).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SelectorError(pub String);

/// Operator of one label requirement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LabelOp {
    /// `k=v`, `k==v`, `k in (v1,v2)`.
    In,
    /// `k!=v`, `k notin (v1,v2)`: also true when the label is absent.
    NotIn,
    /// `k`.
    Exists,
    /// `!k`.
    DoesNotExist,
    /// `k>5` (integer comparison; absent or non-integer labels fail).
    Gt,
    /// `k<5`.
    Lt,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct LabelRequirement {
    key: String,
    op: LabelOp,
    values: Vec<String>,
}

impl LabelRequirement {
    fn matches(&self, labels: Option<&serde_json::Map<String, Value>>) -> bool {
        let value = labels
            .and_then(|l| l.get(&self.key))
            .and_then(Value::as_str);
        match self.op {
            LabelOp::In => value.is_some_and(|v| self.values.iter().any(|x| x == v)),
            LabelOp::NotIn => !value.is_some_and(|v| self.values.iter().any(|x| x == v)),
            LabelOp::Exists => value.is_some(),
            LabelOp::DoesNotExist => value.is_none(),
            LabelOp::Gt | LabelOp::Lt => {
                let Some(have) = value.and_then(|v| v.parse::<i64>().ok()) else {
                    return false;
                };
                // Validated at parse time: exactly one integer value.
                let Some(want) = self.values.first().and_then(|v| v.parse::<i64>().ok()) else {
                    return false;
                };
                if self.op == LabelOp::Gt {
                    have > want
                } else {
                    have < want
                }
            }
        }
    }
}

/// A parsed `labelSelector` (all requirements ANDed); the default matches
/// everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<LabelRequirement>,
}

/// Lexer tokens of the label selector grammar (labels/selector.go).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Not,
    Eq,
    DoubleEq,
    NotEq,
    In,
    NotIn,
    Open,
    Close,
    Comma,
    Gt,
    Lt,
    End,
}

impl Tok {
    fn literal(&self) -> String {
        match self {
            Tok::Ident(s) => s.clone(),
            Tok::Not => "!".into(),
            Tok::Eq => "=".into(),
            Tok::DoubleEq => "==".into(),
            Tok::NotEq => "!=".into(),
            Tok::In => "in".into(),
            Tok::NotIn => "notin".into(),
            Tok::Open => "(".into(),
            Tok::Close => ")".into(),
            Tok::Comma => ",".into(),
            Tok::Gt => ">".into(),
            Tok::Lt => "<".into(),
            Tok::End => String::new(),
        }
    }
}

/// The bytes operators are made of.
fn is_special(b: u8) -> bool {
    matches!(b, b'!' | b'=' | b'>' | b'<' | b'(' | b')' | b',')
}

/// Only these four separate tokens: any other byte (a vertical tab, a
/// non-breaking space) is part of an identifier, which then fails validation.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// Splits a label selector into tokens as the apiserver's byte lexer does.
/// Go's reader returns 0 for a NUL byte just as at the end of the input: a
/// NUL where a token would start ends the selector, and one right after a
/// token is swallowed with it.
fn lex(s: &str) -> Vec<Tok> {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        while i < bytes.len() && is_space(bytes[i]) {
            i += 1;
        }
        if i == bytes.len() || bytes[i] == 0 {
            break;
        }
        let start = i;
        let tok = if is_special(bytes[i]) {
            i += 1;
            match (bytes[start], bytes.get(i)) {
                (b'=', Some(b'=')) => {
                    i += 1;
                    Tok::DoubleEq
                }
                (b'!', Some(b'=')) => {
                    i += 1;
                    Tok::NotEq
                }
                (b'!', _) => Tok::Not,
                (b'=', _) => Tok::Eq,
                (b'>', _) => Tok::Gt,
                (b'<', _) => Tok::Lt,
                (b'(', _) => Tok::Open,
                (b')', _) => Tok::Close,
                _ => Tok::Comma,
            }
        } else {
            while i < bytes.len() && bytes[i] != 0 && !is_space(bytes[i]) && !is_special(bytes[i]) {
                i += 1;
            }
            // Splits only at ASCII bytes, so this is a char boundary.
            match &s[start..i] {
                "in" => Tok::In,
                "notin" => Tok::NotIn,
                ident => Tok::Ident(ident.to_owned()),
            }
        };
        out.push(tok);
        if bytes.get(i) == Some(&0) {
            i += 1;
        }
    }
    out.push(Tok::End);
    out
}

const QUALIFIED_NAME_MSG: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
const LABEL_VALUE_MSG: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, at most 63 characters.
fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// A lowercase RFC 1123 subdomain (at most 253 characters).
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253
        && !s.is_empty()
        && s.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
                && (b[b.len() - 1].is_ascii_lowercase() || b[b.len() - 1].is_ascii_digit())
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

fn validate_label_key(key: &str) -> Result<(), SelectorError> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && !is_dns1123_subdomain(p)
    {
        return Err(SelectorError(format!(
            "unable to parse requirement: key: Invalid value: \"{key}\": prefix part a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
        )));
    }
    if name.is_empty() {
        return Err(SelectorError(format!(
            "unable to parse requirement: key: Invalid value: \"{key}\": name part must be non-empty"
        )));
    }
    if name.len() > 63 {
        return Err(SelectorError(format!(
            "unable to parse requirement: key: Invalid value: \"{key}\": name part must be no more than 63 characters"
        )));
    }
    if !is_label_name(name) {
        return Err(SelectorError(format!(
            "unable to parse requirement: key: Invalid value: \"{key}\": {QUALIFIED_NAME_MSG}"
        )));
    }
    Ok(())
}

fn validate_label_value(key: &str, value: &str, i: usize) -> Result<(), SelectorError> {
    if value.is_empty() {
        return Ok(());
    }
    if value.len() > 63 {
        return Err(SelectorError(format!(
            "unable to parse requirement: values[{i}][{key}]: Invalid value: \"{value}\": must be no more than 63 characters"
        )));
    }
    if !is_label_name(value) {
        return Err(SelectorError(format!(
            "unable to parse requirement: values[{i}][{key}]: Invalid value: \"{value}\": {LABEL_VALUE_MSG}"
        )));
    }
    Ok(())
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> &Tok {
        self.toks.get(self.pos).unwrap_or(&Tok::End)
    }
    fn next(&mut self) -> Tok {
        let t = self.peek().clone();
        if self.pos < self.toks.len() {
            self.pos += 1;
        }
        t
    }
    fn expected(found: &Tok, what: &str) -> SelectorError {
        SelectorError(format!("found '{}', expected: {what}", found.literal()))
    }

    /// A key or a value: `in` and `notin` are keywords only where an
    /// operator goes (`in=in` and `k in (notin)` are valid).
    fn word(tok: &Tok) -> Option<String> {
        match tok {
            Tok::Ident(s) => Some(s.clone()),
            Tok::In => Some("in".into()),
            Tok::NotIn => Some("notin".into()),
            _ => None,
        }
    }

    /// `( v1, v2 )`, with the apiserver's comma rules. Go's parser takes a
    /// run of commas two at a time, each pair standing for an empty value;
    /// after a pair it needs a value or another comma. So: `()`, `(,)`,
    /// `(a,)`, `(,a)` and `(a,,b)` hold the empty value, and a run of commas
    /// before `)` must be odd — `(a,,)` and `(,,)` are errors, `(a,,,)` is not.
    fn value_set(&mut self) -> Result<Vec<String>, SelectorError> {
        match self.next() {
            Tok::Open => {}
            other => return Err(Self::expected(&other, "'('")),
        }
        if *self.peek() == Tok::Close {
            self.next();
            return Ok(vec![String::new()]);
        }
        let mut values = Vec::new();
        let mut first = true;
        loop {
            let mut commas = 0;
            while *self.peek() == Tok::Comma {
                self.next();
                commas += 1;
            }
            let tok = self.next();
            if let Some(v) = Self::word(&tok) {
                if !first && commas == 0 {
                    return Err(Self::expected(&tok, "',' or ')'"));
                }
                if (first && commas > 0) || commas >= 2 {
                    values.push(String::new());
                }
                values.push(v);
                first = false;
                continue;
            }
            match tok {
                Tok::Close if commas % 2 == 1 => {
                    values.push(String::new());
                    return Ok(values);
                }
                Tok::Close if commas == 0 => return Ok(values),
                other => return Err(Self::expected(&other, "',', or identifier")),
            }
        }
    }

    fn requirement(&mut self) -> Result<LabelRequirement, SelectorError> {
        let negated = if *self.peek() == Tok::Not {
            self.next();
            true
        } else {
            false
        };
        let tok = self.next();
        let Some(key) = Self::word(&tok) else {
            return Err(Self::expected(&tok, "identifier"));
        };
        validate_label_key(&key)?;
        if negated {
            return match self.peek() {
                Tok::Comma | Tok::End => Ok(LabelRequirement {
                    key,
                    op: LabelOp::DoesNotExist,
                    values: Vec::new(),
                }),
                other => Err(Self::expected(other, "',' or 'end of string'")),
            };
        }
        let op = match self.peek() {
            Tok::Comma | Tok::End => {
                return Ok(LabelRequirement {
                    key,
                    op: LabelOp::Exists,
                    values: Vec::new(),
                });
            }
            Tok::Eq | Tok::DoubleEq => LabelOp::In,
            Tok::NotEq => LabelOp::NotIn,
            Tok::In => LabelOp::In,
            Tok::NotIn => LabelOp::NotIn,
            Tok::Gt => LabelOp::Gt,
            Tok::Lt => LabelOp::Lt,
            other => {
                return Err(Self::expected(other, "in, notin, =, ==, !=, gt, lt"));
            }
        };
        let set_form = matches!(self.peek(), Tok::In | Tok::NotIn);
        self.next();
        let values = if set_form {
            self.value_set()?
        } else {
            let tok = self.peek().clone();
            match (Self::word(&tok), tok) {
                (Some(v), _) => {
                    self.next();
                    vec![v]
                }
                // `k=` selects the empty value.
                (None, Tok::Comma | Tok::End) => vec![String::new()],
                (None, other) => return Err(Self::expected(&other, "identifier")),
            }
        };
        if matches!(op, LabelOp::Gt | LabelOp::Lt) && values[0].parse::<i64>().is_err() {
            return Err(SelectorError(format!(
                "unable to parse requirement: values[0]: Invalid value: \"{}\": for 'Gt', 'Lt' operators, the value must be an integer",
                values[0]
            )));
        }
        // `>`/`<` values are label values too: `k>-1` is rejected.
        for (i, v) in values.iter().enumerate() {
            validate_label_value(&key, v, i)?;
        }
        Ok(LabelRequirement { key, op, values })
    }
}

impl LabelSelector {
    /// Parses the `labelSelector` query value; "" selects everything.
    pub fn parse(s: &str) -> Result<LabelSelector, SelectorError> {
        let mut p = Parser {
            toks: lex(s),
            pos: 0,
        };
        let mut requirements = Vec::new();
        if *p.peek() == Tok::End {
            return Ok(LabelSelector::default());
        }
        loop {
            requirements.push(p.requirement()?);
            match p.next() {
                Tok::End => break,
                Tok::Comma => {
                    if *p.peek() == Tok::End {
                        return Err(SelectorError(
                            "found '', expected: identifier after ','".into(),
                        ));
                    }
                }
                other => return Err(Parser::expected(&other, "',' or 'end of string'")),
            }
        }
        Ok(LabelSelector { requirements })
    }

    /// Whether the object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        if self.requirements.is_empty() {
            return true;
        }
        let labels = obj
            .get("metadata")
            .and_then(|m| m.get("labels"))
            .and_then(Value::as_object);
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// True when the selector selects everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

/// Operator of one field requirement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FieldOp {
    Equals,
    NotEquals,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldRequirement {
    field: String,
    op: FieldOp,
    value: String,
}

/// A parsed `fieldSelector` (all terms ANDed); the default matches
/// everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    requirements: Vec<FieldRequirement>,
}

/// Field labels every type supports (`DefaultMetaV1FieldSelectorConversion`).
const META_FIELDS: &[&str] = &["metadata.name", "metadata.namespace"];
const POD_FIELDS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
];
const EVENT_FIELDS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
];
const SECRET_FIELDS: &[&str] = &["metadata.name", "metadata.namespace", "type"];
const NODE_FIELDS: &[&str] = &["metadata.name", "metadata.namespace", "spec.unschedulable"];
const NAMESPACE_FIELDS: &[&str] = &["metadata.name", "metadata.namespace", "status.phase"];

/// The field labels the apiserver accepts in a fieldSelector for `kind`.
pub fn supported_field_labels(kind: &str) -> &'static [&'static str] {
    match kind {
        "Pod" => POD_FIELDS,
        "Event" => EVENT_FIELDS,
        "Secret" => SECRET_FIELDS,
        "Node" => NODE_FIELDS,
        "Namespace" => NAMESPACE_FIELDS,
        _ => META_FIELDS,
    }
}

/// The value of a selectable field as the apiserver's `GetAttrs` renders it:
/// strings as-is, booleans as "true"/"false", missing as "" (or "false").
fn field_value(obj: &Value, field: &str) -> String {
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
    // Events expose `source` as the component that reported them.
    let path = if kind == "Event" && field == "source" {
        "source.component"
    } else {
        field
    };
    let mut cur = obj;
    for part in path.split('.') {
        match cur.get(part) {
            Some(v) => cur = v,
            None => {
                return if matches!(field, "spec.unschedulable" | "spec.hostNetwork") {
                    "false".into()
                } else {
                    String::new()
                };
            }
        }
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Splits on unescaped commas (fields.splitTerms).
fn split_terms(s: &str) -> Vec<String> {
    let mut terms = Vec::new();
    let mut cur = String::new();
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            cur.push('\\');
            cur.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == ',' {
            terms.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    if escaped {
        cur.push('\\');
    }
    terms.push(cur);
    terms
}

/// Removes `\` escapes from a field value (fields.UnescapeValue).
fn unescape(v: &str) -> Result<String, SelectorError> {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            if matches!(c, ',' | '=') {
                return Err(SelectorError(format!(
                    "invalid field selector value: unescaped character '{c}'"
                )));
            }
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(e @ ('\\' | ',' | '=')) => out.push(e),
            Some(e) => {
                return Err(SelectorError(format!(
                    "invalid field selector value: invalid escape sequence '\\{e}'"
                )));
            }
            None => {
                return Err(SelectorError(
                    "invalid field selector value: invalid escape sequence at end of string".into(),
                ));
            }
        }
    }
    Ok(out)
}

/// Finds the first operator in a term: `!=`, `==` or `=` (fields.splitTerm).
/// The field name has no escapes: in `a\=b` the name is `a\`.
fn split_term(term: &str) -> Option<(&str, FieldOp, &str)> {
    for (i, _) in term.char_indices() {
        let rest = &term[i..];
        if let Some(value) = rest.strip_prefix("!=") {
            return Some((&term[..i], FieldOp::NotEquals, value));
        }
        if let Some(value) = rest.strip_prefix("==") {
            return Some((&term[..i], FieldOp::Equals, value));
        }
        if let Some(value) = rest.strip_prefix('=') {
            return Some((&term[..i], FieldOp::Equals, value));
        }
    }
    None
}

impl FieldSelector {
    /// Parses the `fieldSelector` query value (grammar only, any field label).
    pub fn parse(s: &str) -> Result<FieldSelector, SelectorError> {
        let mut requirements = Vec::new();
        if s.is_empty() {
            return Ok(FieldSelector::default());
        }
        // The apiserver sorts the raw terms first; `exact_name` depends on it.
        let mut terms = split_terms(s);
        terms.sort_unstable();
        for term in terms {
            if term.is_empty() {
                continue;
            }
            let Some((field, op, value)) = split_term(&term) else {
                return Err(SelectorError(format!(
                    "invalid selector: '{s}'; can't understand '{term}'"
                )));
            };
            requirements.push(FieldRequirement {
                field: field.to_string(),
                op,
                value: unescape(value)?,
            });
        }
        Ok(FieldSelector { requirements })
    }

    /// Parses and checks every field label against what `kind` supports
    /// (400 "field label not supported: X" otherwise).
    pub fn parse_for(kind: &str, s: &str) -> Result<FieldSelector, SelectorError> {
        let sel = FieldSelector::parse(s)?;
        sel.check_supported(kind)?;
        Ok(sel)
    }

    /// Rejects field labels `kind` does not support, with the apiserver's message.
    pub fn check_supported(&self, kind: &str) -> Result<(), SelectorError> {
        let supported = supported_field_labels(kind);
        match self
            .requirements
            .iter()
            .find(|r| !supported.contains(&r.field.as_str()))
        {
            Some(r) => Err(SelectorError(format!(
                "field label not supported: {}",
                r.field
            ))),
            None => Ok(()),
        }
    }

    /// Whether the object's selectable fields satisfy every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        self.requirements.iter().all(|r| {
            let have = field_value(obj, &r.field);
            match r.op {
                FieldOp::Equals => have == r.value,
                FieldOp::NotEquals => have != r.value,
            }
        })
    }

    /// The name pinned by `metadata.name=X`, if any (authz treats such a
    /// list/watch as a request for that one object); with several, the
    /// first in sorted term order, as `RequiresExactMatch` answers.
    pub fn exact_name(&self) -> Option<&str> {
        self.exact_value("metadata.name")
    }

    /// The value `field` must equal, when a term says so (the apiserver's
    /// `RequiresExactMatch`, which picks a watch-cache index).
    pub fn exact_value(&self, field: &str) -> Option<&str> {
        self.requirements
            .iter()
            .find(|r| r.field == field && r.op == FieldOp::Equals)
            .map(|r| r.value.as_str())
    }

    /// True when the selector selects everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

#[cfg(test)]
mod tests;
