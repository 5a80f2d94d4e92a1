//! Label selectors, as k8s.io/apimachinery/pkg/labels/selector.go parses and
//! matches them.
//!
//! ```text
//! <selector>    ::= <requirement> | <requirement> "," <selector>
//! <requirement> ::= KEY | "!" KEY | KEY ("=" | "==" | "!=" | ">" | "<") VALUE
//!                 | KEY ("in" | "notin") "(" VALUE { "," VALUE } ")"
//! ```
//!
//! The port keeps the parts of Go's lexer and parser that look accidental,
//! because each one decides whether the apiserver answers 400 or serves the
//! request:
//!
//! - The lexer works on bytes. Whitespace is only space, tab, CR and LF; any
//!   other byte that is not an operator (a vertical tab, a non-breaking space)
//!   belongs to an identifier, which then fails key or value validation.
//! - Go's `read` returns 0 both at the end and for a NUL byte. A NUL where a
//!   token starts therefore ends the selector (the rest is never looked at),
//!   and a NUL right after a token is skipped.
//! - `in` and `notin` are keywords only where an operator is expected:
//!   `in=in` and `x in (notin)` are valid.
//! - `x in ()` means `x in ("")`. In a value list an empty value may be
//!   written as `(,a)`, `(a,)` or `(a,,b)`; but after two commas the parser has
//!   already consumed the second one, so `(a,,)` and `(,,)` are errors while
//!   `(a,,,)` is valid.
//! - `x=` and `x!=` (value at the end or before a comma) compare with "".
//! - A `>`/`<` value must parse as an int64 *and* be a valid label value, so
//!   `x>-1` is an error (a label value starts with an alphanumeric).
//!
//! Go sorts the requirements by key, which only changes how a selector is
//! printed: matching is an AND, so here they stay in input order.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;

use super::SelectorError;

/// A parsed label selector: the AND of its requirements. The default (and the
/// parse of "") selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    reqs: Vec<Requirement>,
}

/// One requirement on one label key (Go's `labels.Requirement`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    key: String,
    op: Operator,
}

/// What a requirement asks of its key's value. `=` and `==` parse as `In`
/// with one value and `!=` as `NotIn`: Go's `Matches` treats them alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operator {
    /// The label is present with one of these values (sorted, no duplicates).
    In(Vec<String>),
    /// The label is absent or has none of these values.
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
    /// The label is present, parses as an int64 and is greater.
    GreaterThan(i64),
    /// The label is present, parses as an int64 and is less.
    LessThan(i64),
}

/// A set of labels, as Go's `labels.Labels`: `get` is `Has` and `Get` in one.
pub trait Labels {
    fn get(&self, key: &str) -> Option<&str>;
}

impl Labels for [(String, String)] {
    fn get(&self, key: &str) -> Option<&str> {
        self.iter()
            .find(|(k, _)| k == key)
            .map(|(_, value)| value.as_str())
    }
}

impl Labels for BTreeMap<String, String> {
    fn get(&self, key: &str) -> Option<&str> {
        BTreeMap::get(self, key).map(String::as_str)
    }
}

impl<S: BuildHasher> Labels for HashMap<String, String, S> {
    fn get(&self, key: &str) -> Option<&str> {
        HashMap::get(self, key).map(String::as_str)
    }
}

impl LabelSelector {
    /// Parses like `labels.Parse`.
    pub fn parse(selector: &str) -> Result<LabelSelector, SelectorError> {
        let mut parser = Parser::new(selector);
        let mut reqs = Vec::new();
        loop {
            match parser.peek().in_values() {
                Token::Identifier(_) | Token::Not => {
                    reqs.push(parser.requirement()?);
                    match parser.bump().in_values() {
                        Token::End => break,
                        Token::Comma => match parser.peek().in_values() {
                            Token::Identifier(_) | Token::Not => {}
                            other => return Err(unexpected(other, "identifier after ','")),
                        },
                        other => return Err(unexpected(other, "',' or 'end of string'")),
                    }
                }
                Token::End => break,
                other => return Err(unexpected(other, "!, identifier, or 'end of string'")),
            }
        }
        Ok(LabelSelector { reqs })
    }

    /// True when it selects everything.
    pub fn is_everything(&self) -> bool {
        self.reqs.is_empty()
    }

    pub fn requirements(&self) -> &[Requirement] {
        &self.reqs
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches<L: Labels + ?Sized>(&self, labels: &L) -> bool {
        self.reqs.iter().all(|req| req.matches(labels))
    }
}

impl Requirement {
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn operator(&self) -> &Operator {
        &self.op
    }

    /// Go's `Requirement.Matches`.
    pub fn matches<L: Labels + ?Sized>(&self, labels: &L) -> bool {
        let value = labels.get(&self.key);
        let has = |values: &[String], value: &str| values.iter().any(|v| v == value);
        match &self.op {
            Operator::In(values) => value.is_some_and(|v| has(values, v)),
            Operator::NotIn(values) => !value.is_some_and(|v| has(values, v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
            // Rust's i64 parser accepts the language of Go's
            // `strconv.ParseInt(v, 10, 64)`: an optional sign and ASCII digits.
            Operator::GreaterThan(bound) => value
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v > *bound),
            Operator::LessThan(bound) => value
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v < *bound),
        }
    }
}

// ---------------------------------------------------------------------------------
// Lexer
// ---------------------------------------------------------------------------------

/// A token with its literal. `in` and `notin` lex as keywords; where the
/// parser wants a value ([`Token::in_values`]) they are identifiers again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token<'s> {
    End,
    Identifier(&'s str),
    In,
    NotIn,
    Not,
    Equals,
    DoubleEquals,
    NotEquals,
    GreaterThan,
    LessThan,
    OpenPar,
    ClosedPar,
    Comma,
}

impl<'s> Token<'s> {
    /// Go's `Values` parser context.
    fn in_values(self) -> Token<'s> {
        match self {
            Token::In => Token::Identifier("in"),
            Token::NotIn => Token::Identifier("notin"),
            other => other,
        }
    }

    fn literal(self) -> &'s str {
        match self {
            Token::End => "",
            Token::Identifier(literal) => literal,
            Token::In => "in",
            Token::NotIn => "notin",
            Token::Not => "!",
            Token::Equals => "=",
            Token::DoubleEquals => "==",
            Token::NotEquals => "!=",
            Token::GreaterThan => ">",
            Token::LessThan => "<",
            Token::OpenPar => "(",
            Token::ClosedPar => ")",
            Token::Comma => ",",
        }
    }
}

/// Go's `isWhitespace`.
fn is_whitespace(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\r' | b'\n')
}

/// Go's `isSpecialSymbol`: the bytes operators are made of.
fn is_special(byte: u8) -> bool {
    matches!(byte, b'=' | b'!' | b'(' | b')' | b',' | b'>' | b'<')
}

/// Go's `Lexer`, one token at a time. Tokens split only at ASCII bytes, so
/// every literal is a valid `&str` slice of the input.
struct Lexer<'s> {
    s: &'s str,
    pos: usize,
}

impl<'s> Lexer<'s> {
    fn next_token(&mut self) -> Token<'s> {
        let bytes = self.s.as_bytes();
        while bytes.get(self.pos).copied().is_some_and(is_whitespace) {
            self.pos += 1;
        }
        let start = self.pos;
        let token = match bytes.get(start) {
            // Go reads a NUL as the end; stay at the end so that it is sticky.
            None | Some(0) => {
                self.pos = bytes.len();
                return Token::End;
            }
            // Every special byte is a token by itself; Go's longest-match loop
            // can only extend one to `==` or `!=`.
            Some(&first) if is_special(first) => {
                let pair = (first, bytes.get(start + 1).copied());
                self.pos = start + 1;
                match pair {
                    (b'=', Some(b'=')) => {
                        self.pos += 1;
                        Token::DoubleEquals
                    }
                    (b'!', Some(b'=')) => {
                        self.pos += 1;
                        Token::NotEquals
                    }
                    (b'=', _) => Token::Equals,
                    (b'!', _) => Token::Not,
                    (b'>', _) => Token::GreaterThan,
                    (b'<', _) => Token::LessThan,
                    (b'(', _) => Token::OpenPar,
                    (b')', _) => Token::ClosedPar,
                    _ => Token::Comma,
                }
            }
            Some(_) => {
                let end = bytes[start..]
                    .iter()
                    .position(|&b| b == 0 || is_special(b) || is_whitespace(b))
                    .map_or(bytes.len(), |len| start + len);
                self.pos = end;
                match &self.s[start..end] {
                    "in" => Token::In,
                    "notin" => Token::NotIn,
                    literal => Token::Identifier(literal),
                }
            }
        };
        // Both of Go's scanners stop at a 0 from `read` without unreading it:
        // a NUL right after a token is consumed.
        if bytes.get(self.pos) == Some(&0) {
            self.pos += 1;
        }
        token
    }
}

// ---------------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------------

/// Go's `Parser` with one token of lookahead (all it ever uses).
struct Parser<'s> {
    lexer: Lexer<'s>,
    next: Token<'s>,
}

fn unexpected(found: Token<'_>, expected: &'static str) -> SelectorError {
    SelectorError::Unexpected {
        found: found.literal().to_owned(),
        expected,
    }
}

impl<'s> Parser<'s> {
    fn new(s: &'s str) -> Parser<'s> {
        let mut lexer = Lexer { s, pos: 0 };
        let next = lexer.next_token();
        Parser { lexer, next }
    }

    fn peek(&self) -> Token<'s> {
        self.next
    }

    fn bump(&mut self) -> Token<'s> {
        std::mem::replace(&mut self.next, self.lexer.next_token())
    }

    /// `parseRequirement`: key, operator, values, then `NewRequirement`'s checks.
    fn requirement(&mut self) -> Result<Requirement, SelectorError> {
        let mut token = self.bump().in_values();
        let negated = token == Token::Not;
        if negated {
            token = self.bump().in_values();
        }
        let Token::Identifier(key) = token else {
            return Err(unexpected(token, "identifier"));
        };
        validate_key(key)?;
        if negated {
            // Whatever follows is the caller's to reject (`!x=a`).
            return Ok(Requirement {
                key: key.to_owned(),
                op: Operator::DoesNotExist,
            });
        }
        if matches!(self.peek().in_values(), Token::End | Token::Comma) {
            return Ok(Requirement {
                key: key.to_owned(),
                op: Operator::Exists,
            });
        }
        // The operator is read in Go's `KeyAndOperator` context: here `in`
        // and `notin` are keywords.
        let op = match self.bump() {
            token @ (Token::In | Token::NotIn) => {
                let values = self.value_list()?;
                for value in &values {
                    validate_value(key, value)?;
                }
                let mut values: Vec<String> = values.into_iter().map(str::to_owned).collect();
                // Go collects values in a `sets.String`.
                values.sort_unstable();
                values.dedup();
                if token == Token::In {
                    Operator::In(values)
                } else {
                    Operator::NotIn(values)
                }
            }
            token @ (Token::Equals | Token::DoubleEquals | Token::NotEquals) => {
                let value = self.exact_value()?;
                validate_value(key, value)?;
                if token == Token::NotEquals {
                    Operator::NotIn(vec![value.to_owned()])
                } else {
                    Operator::In(vec![value.to_owned()])
                }
            }
            token @ (Token::GreaterThan | Token::LessThan) => {
                let value = self.exact_value()?;
                let bound = value
                    .parse::<i64>()
                    .map_err(|_| SelectorError::NotAnInteger {
                        value: value.to_owned(),
                    })?;
                validate_value(key, value)?;
                if token == Token::GreaterThan {
                    Operator::GreaterThan(bound)
                } else {
                    Operator::LessThan(bound)
                }
            }
            other => return Err(unexpected(other, "in, notin, =, ==, !=, gt, lt")),
        };
        Ok(Requirement {
            key: key.to_owned(),
            op,
        })
    }

    /// `parseValues` and `parseIdentifiersList`: `( v, v, ... )`.
    fn value_list(&mut self) -> Result<Vec<&'s str>, SelectorError> {
        let open = self.bump().in_values();
        if open != Token::OpenPar {
            return Err(unexpected(open, "'('"));
        }
        match self.peek().in_values() {
            Token::ClosedPar => {
                self.bump();
                return Ok(vec![""]);
            }
            Token::Identifier(_) | Token::Comma => {}
            other => return Err(unexpected(other, "',', ')' or identifier")),
        }
        let mut values = Vec::new();
        loop {
            match self.bump().in_values() {
                Token::Identifier(value) => {
                    values.push(value);
                    match self.peek().in_values() {
                        Token::Comma => {}
                        Token::ClosedPar => break,
                        other => return Err(unexpected(other, "',' or ')'")),
                    }
                }
                Token::Comma => {
                    // `(,` starts with an empty value.
                    if values.is_empty() {
                        values.push("");
                    }
                    match self.peek().in_values() {
                        // `,)` ends with one.
                        Token::ClosedPar => {
                            values.push("");
                            break;
                        }
                        // `,,` has one between; Go consumes the second comma
                        // here, so the next token must be a value or a comma.
                        Token::Comma => {
                            self.bump();
                            values.push("");
                        }
                        _ => {}
                    }
                }
                other => return Err(unexpected(other, "',', or identifier")),
            }
        }
        // The loop only ends with `)` as the lookahead.
        self.bump();
        Ok(values)
    }

    /// `parseExactValue`: one identifier, or "" before a comma or the end.
    fn exact_value(&mut self) -> Result<&'s str, SelectorError> {
        if matches!(self.peek().in_values(), Token::End | Token::Comma) {
            return Ok("");
        }
        match self.bump().in_values() {
            Token::Identifier(value) => Ok(value),
            other => Err(unexpected(other, "identifier")),
        }
    }
}

// ---------------------------------------------------------------------------------
// Validation (apimachinery/pkg/util/validation/validation.go)
// ---------------------------------------------------------------------------------

/// `IsQualifiedName`: `[prefix/]name`, the prefix a DNS-1123 subdomain, the
/// name at most 63 characters of `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`.
fn validate_key(key: &str) -> Result<(), SelectorError> {
    let invalid = |reason| SelectorError::InvalidKey {
        key: key.to_owned(),
        reason,
    };
    let mut parts = key.split('/');
    let first = parts.next().unwrap_or_default();
    let name = match (parts.next(), parts.next()) {
        (None, _) => first,
        (Some(name), None) => {
            if first.is_empty() {
                return Err(invalid("prefix part must be non-empty"));
            }
            if !is_dns1123_subdomain(first) {
                return Err(invalid(
                    "prefix part a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
                ));
            }
            name
        }
        (Some(_), Some(_)) => {
            return Err(invalid(
                "a qualified name must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character, with an optional DNS subdomain prefix and '/'",
            ));
        }
    };
    if name.is_empty() {
        return Err(invalid("name part must be non-empty"));
    }
    if name.len() > 63 {
        return Err(invalid("name part must be no more than 63 characters"));
    }
    if !is_qualified_name_part(name) {
        return Err(invalid(
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
        ));
    }
    Ok(())
}

/// `IsValidLabelValue`: empty, or at most 63 characters of a qualified name.
fn validate_value(key: &str, value: &str) -> Result<(), SelectorError> {
    let invalid = |reason| SelectorError::InvalidValue {
        key: key.to_owned(),
        value: value.to_owned(),
        reason,
    };
    if value.len() > 63 {
        return Err(invalid("must be no more than 63 characters"));
    }
    if !value.is_empty() && !is_qualified_name_part(value) {
        return Err(invalid(
            "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
        ));
    }
    Ok(())
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`
fn is_qualified_name_part(name: &str) -> bool {
    let bytes = name.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && bytes
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

/// `IsDNS1123Subdomain`: at most 253 characters, dot-separated labels of
/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`.
fn is_dns1123_subdomain(value: &str) -> bool {
    let is_label = |label: &[u8]| match (label.first(), label.last()) {
        (Some(&first), Some(&last)) => {
            let lower_alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
            lower_alnum(first)
                && lower_alnum(last)
                && label.iter().all(|&b| lower_alnum(b) || b == b'-')
        }
        _ => false,
    };
    value.len() <= 253 && value.as_bytes().split(|&b| b == b'.').all(is_label)
}
