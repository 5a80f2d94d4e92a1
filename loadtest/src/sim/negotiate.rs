//! Response content negotiation, as the apiserver does it
//! (apiserver/pkg/endpoints/handlers/negotiation over goautoneg).
//!
//! The Accept header (its first line, as Go's `Header.Get` reads it) is
//! split into clauses, sorted by q-value (stable for equal q, except that a
//! wildcard type or subtype moves behind a concrete one), and the first
//! clause that one of the serializers accepts wins. The serializers are
//! tried in the apiserver's order: JSON, YAML, then protobuf where the kind
//! has it, so `*/*` and `application/*` mean JSON. A clause's parameters
//! can ask for a transformation: `as=Table;g=meta.k8s.io;v=v1` (or
//! `v1beta1`) is a Table, served as JSON only (the apiserver allows JSON
//! and YAML Tables); `stream=watch` is accepted by JSON and protobuf.
//!
//! Where kube-sim differs: it has no YAML and no PartialObjectMetadata, so
//! clauses asking for those are passed over; and when no clause is
//! acceptable it answers JSON where the apiserver answers 406.

use http::HeaderMap;
use http::header::ACCEPT;

/// How a response is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Json,
    /// A meta.k8s.io Table (JSON), what `kubectl get` asks for.
    Table,
    /// `application/vnd.kubernetes.protobuf`.
    Protobuf,
}

/// One clause of an Accept header.
#[derive(Debug)]
struct Clause<'a> {
    ty: &'a str,
    sub: &'a str,
    q: f32,
    params: Vec<(&'a str, &'a str)>,
}

impl Clause<'_> {
    fn param(&self, key: &str) -> Option<&str> {
        // Go keeps the last value of a repeated parameter.
        self.params
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
    }
}

/// goautoneg.ParseAccept: the clauses, best first.
fn parse(header: &str) -> Vec<Clause<'_>> {
    let mut clauses = Vec::new();
    for part in header.split(',') {
        let part = part.trim_matches(' ');
        let mut pieces = part.split(';');
        let range = pieces.next().unwrap_or("");
        let mut types = range.split('/');
        let ty = types.next().unwrap_or("").trim_matches(' ');
        let sub = match (types.next(), types.next()) {
            (None, None) if ty == "*" => "*",
            (Some(sub), None) => sub.trim_matches(' '),
            _ => continue,
        };
        let mut clause = Clause {
            ty,
            sub,
            q: 1.0,
            params: Vec::new(),
        };
        for param in pieces {
            let Some((key, value)) = param.split_once('=') else {
                continue;
            };
            let key = key.trim_matches(' ');
            if key == "q" {
                // strconv.ParseFloat on the untrimmed value; an error is 0.
                clause.q = value.parse().unwrap_or(0.0);
            } else {
                clause.params.push((key, value.trim_matches(' ')));
            }
        }
        clauses.push(clause);
    }
    // sort.Sort on so few clauses is Go's insertion sort, with goautoneg's
    // Less (not a strict order, so the exact algorithm matters).
    let less = |a: &Clause<'_>, b: &Clause<'_>| {
        a.q > b.q || (a.ty != "*" && b.ty == "*") || (a.sub != "*" && b.sub == "*")
    };
    for i in 1..clauses.len() {
        let mut j = i;
        while j > 0 && less(&clauses[j], &clauses[j - 1]) {
            clauses.swap(j, j - 1);
            j -= 1;
        }
    }
    clauses
}

/// The serializers, in the apiserver's order.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Serializer {
    Json,
    Yaml,
    Protobuf,
}

impl Serializer {
    fn media(self) -> (&'static str, &'static str) {
        match self {
            Serializer::Json => ("application", "json"),
            Serializer::Yaml => ("application", "yaml"),
            Serializer::Protobuf => ("application", "vnd.kubernetes.protobuf"),
        }
    }
}

/// What `accept` gets for a kind that has a protobuf form (`protobuf`) or not.
pub fn negotiate(accept: Option<&str>, protobuf: bool) -> Output {
    let Some(header) = accept.filter(|h| !h.is_empty()) else {
        return Output::Json;
    };
    let serializers: &[Serializer] = if protobuf {
        &[Serializer::Json, Serializer::Yaml, Serializer::Protobuf]
    } else {
        &[Serializer::Json, Serializer::Yaml]
    };
    for clause in parse(header) {
        for &s in serializers {
            let (ty, sub) = s.media();
            let matches = (clause.ty == ty && (clause.sub == sub || clause.sub == "*"))
                || (clause.ty == "*" && clause.sub == "*");
            if matches && let Some(out) = accepts(&clause, s) {
                return out;
            }
        }
    }
    Output::Json
}

/// acceptMediaTypeOptions + AllowsMediaTypeTransform for one serializer.
fn accepts(clause: &Clause<'_>, s: Serializer) -> Option<Output> {
    // YAML has no stream serializer; the only stream schema is `watch`.
    if let Some(stream) = clause.param("stream")
        && !stream.is_empty()
        && (s == Serializer::Yaml || stream != "watch")
    {
        return None;
    }
    let convert = clause.param("as");
    let table = match convert {
        None => false,
        Some("Table") => {
            let meta = clause.param("g") == Some("meta.k8s.io")
                && matches!(clause.param("v"), Some("v1" | "v1beta1"));
            // Tables only as JSON or YAML.
            if !meta || s == Serializer::Protobuf {
                return None;
            }
            true
        }
        // PartialObjectMetadata(List) is not simulated; anything else the
        // apiserver refuses too.
        Some(_) => return None,
    };
    match s {
        // kube-sim writes no YAML: on to the next serializer or clause.
        Serializer::Yaml => None,
        Serializer::Json if table => Some(Output::Table),
        Serializer::Json => Some(Output::Json),
        Serializer::Protobuf => Some(Output::Protobuf),
    }
}

/// [`negotiate`] with the request's Accept header.
pub fn output(headers: &HeaderMap, protobuf: bool) -> Output {
    negotiate(headers.get(ACCEPT).and_then(|v| v.to_str().ok()), protobuf)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PB: &str = "application/vnd.kubernetes.protobuf";

    #[test]
    fn protobuf_first_gets_protobuf_where_the_kind_has_it() {
        let client_go = "application/vnd.kubernetes.protobuf, application/json";
        assert_eq!(negotiate(Some(client_go), true), Output::Protobuf);
        // Custom resources (fixture list-crd-accept-pb.*) and kinds without
        // a protobuf form: the next clause, JSON.
        assert_eq!(negotiate(Some(client_go), false), Output::Json);
        assert_eq!(negotiate(Some(PB), true), Output::Protobuf);
        assert_eq!(
            negotiate(
                Some("application/vnd.kubernetes.protobuf;stream=watch"),
                true
            ),
            Output::Protobuf
        );
    }

    #[test]
    fn json_first_wildcards_and_no_header_get_json() {
        for accept in [
            "application/json, application/vnd.kubernetes.protobuf",
            "*/*",
            "application/*",
            "*",
            "",
        ] {
            assert_eq!(negotiate(Some(accept), true), Output::Json, "{accept}");
        }
        assert_eq!(negotiate(None, true), Output::Json);
        // A wildcard after protobuf loses to it, even when listed first
        // with the same q.
        assert_eq!(
            negotiate(Some("*/*, application/vnd.kubernetes.protobuf"), true),
            Output::Protobuf
        );
    }

    #[test]
    fn q_values_reorder_the_clauses() {
        assert_eq!(
            negotiate(
                Some("application/json;q=0.5, application/vnd.kubernetes.protobuf"),
                true
            ),
            Output::Protobuf
        );
        assert_eq!(
            negotiate(
                Some("application/vnd.kubernetes.protobuf;q=0.5, application/json;q=0.9"),
                true
            ),
            Output::Json
        );
        assert_eq!(
            negotiate(
                Some("application/vnd.kubernetes.protobuf;q=bad, application/json"),
                true
            ),
            Output::Json
        );
    }

    #[test]
    fn a_table_first_gets_a_table_and_never_in_protobuf() {
        let kubectl = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
        assert_eq!(negotiate(Some(kubectl), true), Output::Table);
        // fixture list-pods-table-accept-pb.body: Table first, protobuf second.
        let table_then_pb =
            "application/json;as=Table;v=v1;g=meta.k8s.io, application/vnd.kubernetes.protobuf";
        assert_eq!(negotiate(Some(table_then_pb), true), Output::Table);
        assert_eq!(
            negotiate(
                Some(
                    "application/vnd.kubernetes.protobuf;as=Table;v=v1;g=meta.k8s.io, application/json"
                ),
                true
            ),
            Output::Json
        );
        assert_eq!(
            negotiate(Some("*/*;as=Table;v=v1;g=meta.k8s.io"), false),
            Output::Table
        );
        assert_eq!(
            negotiate(
                Some("application/json, application/json;as=Table;v=v1;g=meta.k8s.io"),
                true
            ),
            Output::Json
        );
    }

    #[test]
    fn unsupported_transforms_and_yaml_are_passed_over() {
        assert_eq!(
            negotiate(
                Some(
                    "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io,application/vnd.kubernetes.protobuf"
                ),
                true
            ),
            Output::Protobuf
        );
        assert_eq!(
            negotiate(
                Some("application/json;as=Table;g=example.com;v=v1, application/json"),
                true
            ),
            Output::Json
        );
        assert_eq!(
            negotiate(
                Some("application/yaml, application/vnd.kubernetes.protobuf"),
                true
            ),
            Output::Protobuf
        );
        // Nothing acceptable: JSON (the apiserver says 406).
        assert_eq!(negotiate(Some("text/html"), true), Output::Json);
    }
}
