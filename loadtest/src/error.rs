//! Printing an error with its causes.
//!
//! A copy of `breakwater::error::Chain` (this crate never links the proxy):
//! our error types name their source once — the message says what failed,
//! `#[source]` says why — so wherever an error reaches a person (a log
//! line, a benchmark's report) it goes through [`Chain`], which prints the
//! whole way down.

use std::error::Error;
use std::fmt;

/// Displays an error and its causes, outermost first, joined by `: `.
///
/// Some foreign errors repeat their source in their own message (`Base64
/// error: Invalid byte`, whose source says `Invalid byte`); a cause whose
/// message the line already ends with is skipped, so it is printed once.
///
/// ```
/// use breakwater_loadtest::error::Chain;
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("reading {path}")]
/// struct ReadError {
///     path: String,
///     #[source]
///     source: std::io::Error,
/// }
///
/// let err = ReadError {
///     path: "tls.crt".into(),
///     source: std::io::Error::other("permission denied"),
/// };
/// assert_eq!(Chain(&err).to_string(), "reading tls.crt: permission denied");
/// ```
#[derive(Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn Error + 'a));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut last = self.0.to_string();
        f.write_str(&last)?;
        let mut cause = self.0.source();
        while let Some(err) = cause {
            let msg = err.to_string();
            if !msg.is_empty() && !last.ends_with(&msg) {
                write!(f, ": {msg}")?;
            }
            last = msg;
            cause = err.source();
        }
        Ok(())
    }
}

impl fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::Chain;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("starting")]
        Start(#[source] Middle),
    }

    #[derive(Debug, thiserror::Error)]
    enum Middle {
        #[error("reading {0}")]
        Read(&'static str, #[source] std::io::Error),
    }

    /// A foreign style: the message already carries the source.
    #[derive(Debug, thiserror::Error)]
    #[error("base64 error: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn every_cause_is_printed_once_outermost_first() {
        let err = Outer::Start(Middle::Read("a.pem", std::io::Error::other("denied")));
        assert_eq!(err.to_string(), "starting");
        assert_eq!(Chain(&err).to_string(), "starting: reading a.pem: denied");
    }

    #[test]
    fn a_cause_the_message_already_ends_with_is_not_repeated() {
        let err = Repeats(std::io::Error::other("invalid byte"));
        assert_eq!(Chain(&err).to_string(), "base64 error: invalid byte");
    }

    #[test]
    fn an_error_without_source_prints_as_itself() {
        let err = std::io::Error::other("plain");
        assert_eq!(Chain(&err).to_string(), "plain");
    }
}
