//! Which requests the hub serves, and which shared stream serves them.
//!
//! A request is eligible when the hub can answer it exactly as the apiserver
//! would: a resource-collection watch or a `resourceVersion=0` list, asking
//! for plain JSON or protobuf (Tables and other transformations go upstream
//! unshared), with selectors this proxy can evaluate itself. Everything else returns `None` and the
//! proxy forwards it untouched.
//!
//! The [`StreamKey`] names one upstream stream: the collection (group,
//! version, resource, namespace), the sharing scope (the identity: the same
//! user and groups get the same authorization decisions; or [`SHARED_SCOPE`]
//! for streams several identities join, each after a SubjectAccessReview,
//! see `share`), and, only when the broad watch was refused, the client's
//! own selectors.

use http::HeaderMap;
use http::header::ACCEPT;

use crate::classify::{self, RequestInfo, ResourceVersion, Verb};
use crate::identity::Identity;
use crate::watch::codec::Codec;
use crate::watch::filter::{Selector, selectable_fields};

/// One upstream stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamKey {
    pub target: Target,
    /// The identity's username and groups (who the upstream requests speak
    /// for), or [`SHARED_SCOPE`].
    pub scope: String,
    /// Selectors sent upstream: `None` for the broad (selector-free) stream.
    pub upstream_selectors: Option<(Option<String>, Option<String>)>,
    /// The encoding the stream asks for (the apiserver may answer JSON to
    /// protobuf: custom resources have none).
    pub codec: Codec,
}

/// The collection a stream lists and watches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub prefix: String,
    pub group: String,
    pub version: String,
    pub resource: String,
    /// Empty for cluster-scoped types and all-namespace requests.
    pub namespace: String,
}

impl Target {
    /// `/api/v1/namespaces/ns/pods`, `/apis/g/v/resource`.
    pub fn path(&self) -> String {
        let mut p = format!("/{}/", self.prefix);
        if !self.group.is_empty() {
            p.push_str(&self.group);
            p.push('/');
        }
        p.push_str(&self.version);
        if !self.namespace.is_empty() {
            p.push_str("/namespaces/");
            p.push_str(&self.namespace);
        }
        p.push('/');
        p.push_str(&self.resource);
        p
    }
}

/// What a client asked for.
#[derive(Debug, Clone)]
pub enum Mode {
    Watch(WatchOpts),
    /// LIST with resourceVersion=0, served from the cache.
    ListCached,
    /// LIST with resourceVersion unset: served from a live stream's cache once
    /// it is confirmed as fresh as the apiserver, when the answer fits in
    /// one page (`limit`); otherwise forwarded.
    ListConsistent {
        limit: Option<u64>,
    },
}

/// The per-client watch options.
#[derive(Debug, Clone)]
pub struct WatchOpts {
    pub rv: ResourceVersion,
    pub bookmarks: bool,
    pub timeout_seconds: Option<u64>,
    pub send_initial_events: Option<bool>,
}

/// An eligible request.
#[derive(Debug, Clone)]
pub struct Eligible {
    pub target: Target,
    pub scope: String,
    pub selector: Selector,
    pub label: Option<String>,
    pub field: Option<String>,
    pub mode: Mode,
    /// The encoding the client prefers.
    pub codec: Codec,
}

impl Eligible {
    /// The broad key (no selector upstream) or the exact one.
    pub fn key(&self, broad: bool) -> StreamKey {
        self.key_in(&self.scope, broad)
    }

    /// [`Eligible::key`] in another sharing scope ([`SHARED_SCOPE`]).
    pub fn key_in(&self, scope: &str, broad: bool) -> StreamKey {
        StreamKey {
            target: self.target.clone(),
            scope: scope.to_string(),
            upstream_selectors: (!broad).then(|| (self.label.clone(), self.field.clone())),
            codec: self.codec,
        }
    }

    /// The verb the apiserver authorizes this request as.
    pub fn verb(&self) -> &'static str {
        match self.mode {
            Mode::Watch(_) => "watch",
            Mode::ListCached | Mode::ListConsistent { .. } => "list",
        }
    }

    pub fn has_selectors(&self) -> bool {
        self.label.is_some() || self.field.is_some()
    }
}

/// The encoding the apiserver would answer with, when the hub can answer
/// in it: the first acceptable media type after ordering by quality, then
/// specificity, as the apiserver's content negotiation
/// (apimachinery's `negotiation.NegotiateMediaTypeOptions` over goautoneg)
/// picks. `None`: a clause asks for a transformation (`as=Table`,
/// `as=PartialObjectMetadata`) or for nothing the hub writes; forward.
fn negotiate(headers: &HeaderMap) -> Option<Codec> {
    struct Clause<'a> {
        media: &'a str,
        q: f32,
        specificity: u8,
    }
    let mut clauses = Vec::new();
    for v in headers.get_all(ACCEPT) {
        for part in v.to_str().ok()?.split(',') {
            let mut it = part.split(';');
            let media = it.next().unwrap_or_default().trim();
            let mut q = 1.0;
            for p in it.map(str::trim).filter(|p| !p.is_empty()) {
                match p.split_once('=') {
                    Some(("q", v)) => q = v.trim().parse().ok()?,
                    Some(("charset", _)) => {}
                    // `as=`, `g=`, `v=`, `stream=`: not a plain object.
                    _ => return None,
                }
            }
            let specificity = match media {
                "*/*" => 0,
                m if m.ends_with("/*") => 1,
                _ => 2,
            };
            if !media.is_empty() && q > 0.0 {
                clauses.push(Clause {
                    media,
                    q,
                    specificity,
                });
            }
        }
    }
    if clauses.is_empty() {
        return Some(Codec::Json);
    }
    // A stable sort, as Go's insertion sort of a few clauses is.
    clauses.sort_by(|a, b| {
        b.q.total_cmp(&a.q)
            .then_with(|| b.specificity.cmp(&a.specificity))
    });
    clauses.iter().find_map(|c| match c.media {
        "*/*" | "application/*" | "application/json" => Some(Codec::Json),
        "application/vnd.kubernetes.protobuf" => Some(Codec::Protobuf),
        _ => None,
    })
}

/// The scope of streams shared across identities. It cannot equal an
/// identity's scope: [`scope_of`] always contains a NUL.
pub const SHARED_SCOPE: &str = "shared";

/// The sharing scope of an identity.
pub fn scope_of(identity: &Identity) -> String {
    let mut groups = identity.groups.clone();
    groups.sort();
    format!("{}\u{0}{}", identity.username, groups.join("\u{0}"))
}

/// A consistent LIST of a collection (`resourceVersion` unset): served from
/// a live stream when it can be (see [`Mode::ListConsistent`]), else
/// coalesced with identical concurrent ones.
pub fn is_consistent_list(info: &RequestInfo, query: Option<&str>) -> bool {
    info.is_resource_request
        && info.error.is_none()
        && info.verb == Verb::List
        && info.subresource.is_empty()
        && info.parts().count() == 1
        && classify::list_params(query).is_ok_and(|p| p.resource_version == ResourceVersion::Unset)
}

/// Whether the hub serves this request, and how.
pub fn eligible(
    info: &RequestInfo,
    query: Option<&str>,
    headers: &HeaderMap,
    identity: &Identity,
) -> Option<Eligible> {
    if !info.is_resource_request
        || info.error.is_some()
        || !info.subresource.is_empty()
        || info.parts().count() != 1
    {
        return None;
    }
    let codec = negotiate(headers)?;
    let params = classify::list_params(query).ok()?;
    if params.resource_version_match.as_deref() == Some("Exact") {
        return None;
    }
    let mode = match info.verb {
        Verb::Watch => {
            if let ResourceVersion::Exact(n) = &params.resource_version {
                // The apiserver answers a non-numeric RV itself (400).
                n.parse::<u64>().ok()?;
            }
            Mode::Watch(WatchOpts {
                rv: params.resource_version.clone(),
                bookmarks: params.allow_bookmarks,
                timeout_seconds: params.timeout_seconds,
                send_initial_events: params.send_initial_events,
            })
        }
        Verb::List
            if params.resource_version == ResourceVersion::Any
                && params.continue_token.is_none() =>
        {
            Mode::ListCached
        }
        Verb::List
            if params.resource_version == ResourceVersion::Unset
                && params.continue_token.is_none()
                && params.resource_version_match.is_none() =>
        {
            Mode::ListConsistent {
                limit: params.limit.filter(|&l| l > 0),
            }
        }
        _ => return None,
    };
    let selector = Selector::parse(
        params.label_selector.as_deref(),
        params.field_selector.as_deref(),
        selectable_fields(&info.api_group, &info.resource),
    )?;
    Some(Eligible {
        target: Target {
            prefix: info.api_prefix.to_owned(),
            group: info.api_group.clone(),
            version: info.api_version.clone(),
            resource: info.resource.clone(),
            namespace: info.namespace.clone(),
        },
        scope: scope_of(identity),
        selector,
        label: params.label_selector,
        field: params.field_selector,
        mode,
        codec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn check(path: &str, query: &str, accept: Option<&'static str>) -> Option<Eligible> {
        let info = classify::classify(&http::Method::GET, path, Some(query));
        let mut h = HeaderMap::new();
        if let Some(a) = accept {
            h.insert(ACCEPT, HeaderValue::from_static(a));
        }
        eligible(&info, Some(query), &h, &Identity::anonymous())
    }

    #[test]
    fn json_watches_and_cached_lists_are_served() {
        let e = check(
            "/api/v1/pods",
            "watch=1&fieldSelector=spec.nodeName%3Dn1",
            None,
        )
        .expect("eligible");
        assert_eq!(e.target.path(), "/api/v1/pods");
        assert!(matches!(e.mode, Mode::Watch(_)));
        assert!(
            check(
                "/api/v1/namespaces/d/pods",
                "resourceVersion=0",
                Some("application/json, */*")
            )
            .is_some()
        );
        assert!(
            check(
                "/apis/apps/v1/deployments",
                "watch=true",
                Some("application/json")
            )
            .is_some()
        );
    }

    #[test]
    fn the_encoding_is_negotiated_as_the_apiserver_does() {
        let codec = |accept| check("/api/v1/pods", "watch=1", Some(accept)).map(|e| e.codec);
        let pb = "application/vnd.kubernetes.protobuf";
        assert_eq!(codec(pb), Some(Codec::Protobuf));
        assert_eq!(
            codec("application/vnd.kubernetes.protobuf, application/json"),
            Some(Codec::Protobuf),
            "client-go's protobuf clients"
        );
        assert_eq!(
            codec("application/json, application/vnd.kubernetes.protobuf"),
            Some(Codec::Json)
        );
        assert_eq!(
            codec("application/json;q=0.5, application/vnd.kubernetes.protobuf"),
            Some(Codec::Protobuf),
            "quality first"
        );
        assert_eq!(
            codec("*/*, application/vnd.kubernetes.protobuf"),
            Some(Codec::Protobuf),
            "then specificity"
        );
        assert_eq!(codec("text/html, */*"), Some(Codec::Json));
        assert_eq!(
            check("/api/v1/pods", "watch=1", None).map(|e| e.codec),
            Some(Codec::Json)
        );
        let a = check("/api/v1/pods", "watch=1", Some(pb)).expect("eligible");
        let b = check("/api/v1/pods", "watch=1", None).expect("eligible");
        assert_ne!(a.key(true), b.key(true), "one stream per encoding");
    }

    #[test]
    fn tables_exact_and_unsupported_go_upstream() {
        let table = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json";
        assert!(check("/api/v1/pods", "watch=1", Some(table)).is_none());
        let meta = "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io";
        assert!(check("/api/v1/pods", "watch=1", Some(meta)).is_none());
        assert!(check("/api/v1/pods", "watch=1", Some("text/plain")).is_none());
        assert!(
            matches!(
                check("/api/v1/pods", "limit=500", None).map(|e| e.mode),
                Some(Mode::ListConsistent { limit: Some(500) })
            ),
            "consistent lists may be served by a live stream"
        );
        assert!(
            check("/api/v1/pods", "limit=500&continue=abc", None).is_none(),
            "their next pages are the apiserver's"
        );
        assert!(check("/api/v1/pods", "watch=1&resourceVersion=abc", None).is_none());
        assert!(
            check(
                "/api/v1/configmaps",
                "watch=1&fieldSelector=data.x%3D1",
                None
            )
            .is_none()
        );
        assert!(check("/api/v1/namespaces/d/pods/p", "", None).is_none());
    }
}
