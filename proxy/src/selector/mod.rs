//! Kubernetes label and field selectors: one parser, the apiserver's rules.
//!
//! Two parts of Breakwater read selectors, and both must read them exactly as
//! kube-apiserver does:
//!
//! - [`classify`](crate::classify) decides whether a query decodes as
//!   `ListOptions` (a syntactically invalid selector makes the apiserver fall
//!   back to a plain look at `watch` and set no name) and which object
//!   `fieldSelector=metadata.name=X` names. A looser parser would classify a
//!   request differently from the apiserver, which is a way around the limits.
//! - the watch hub ([`watch::filter`](crate::watch::filter)) evaluates each
//!   client's selector per event on a shared upstream watch. A looser parser
//!   would send a client objects the apiserver would not; a stricter one would
//!   refuse watches the apiserver serves.
//!
//! So there is one parse, into [`LabelSelector`] and [`FieldSelector`], ported
//! from k8s.io/apimachinery:
//!
//! - [`labels`]: pkg/labels/selector.go (`Parse`, its `Lexer` and `Parser`,
//!   `NewRequirement`, `Requirement.Matches`) with the key and value checks of
//!   pkg/util/validation/validation.go (`IsQualifiedName`,
//!   `IsValidLabelValue`, `IsDNS1123Subdomain`).
//! - [`fields`]: pkg/fields/selector.go (`ParseSelector`, `splitTerms`,
//!   `splitTerm`, `UnescapeValue`, `RequiresExactMatch`).
//!
//! Which fields a resource lets a field selector use is not part of the
//! grammar (the apiserver checks it per type after parsing); the watch hub
//! keeps that table.
//!
//! kube-sim (loadtest/src/sim/selectors.rs) has its own, independent parser as
//! the reference; proxy/tests/selector_differential.rs checks that the two
//! agree on what they accept and what they match.

pub mod fields;
pub mod labels;

#[cfg(test)]
mod tests;

pub use fields::{FieldOp, FieldSelector, FieldTerm, Fields};
pub use labels::{LabelSelector, Labels, Operator, Requirement};

/// Why `labels.Parse` or `fields.ParseSelector` rejects a selector; `Display`
/// follows the apiserver's wording.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// A label selector token where the grammar wants another.
    #[error("found '{found}', expected: {expected}")]
    Unexpected {
        found: String,
        expected: &'static str,
    },
    /// A label key that is not a qualified name (`[prefix/]name`).
    #[error("unable to parse requirement: key: Invalid value: {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    /// A label value that is not a valid label value.
    #[error("unable to parse requirement: values[{key}]: Invalid value: {value:?}: {reason}")]
    InvalidValue {
        key: String,
        value: String,
        reason: &'static str,
    },
    /// A `>` or `<` value that `strconv.ParseInt` rejects.
    #[error(
        "unable to parse requirement: values: Invalid value: {value:?}: for 'Gt', 'Lt' operators, the value must be an integer"
    )]
    NotAnInteger { value: String },
    /// A field selector term without `=`, `==` or `!=`.
    #[error("invalid selector: '{selector}'; can't understand '{term}'")]
    NoOperator { selector: String, term: String },
    /// A backslash in a field value not followed by `\`, `,` or `=`.
    #[error("invalid field selector: invalid escape sequence: {sequence}")]
    InvalidEscape { sequence: String },
    /// A bare `,` or `=` in a field value (Go prints the rune as a number).
    #[error("invalid field selector: unescaped character in value: {}", u32::from(*.0))]
    UnescapedCharacter(char),
}
