//! Request classification: what a request asks the apiserver to do.
//!
//! Breakwater limits by *kube verb and resource*, not by HTTP method and path, so it
//! must see a request exactly as kube-apiserver's `RequestInfoFactory.NewRequestInfo`
//! (apiserver/pkg/endpoints/request/requestinfo.go) sees it. Any difference is a way
//! around the limits: a request we count as a cheap `get` that the apiserver serves as
//! a `list`, or a `list` we count as a `watch`. [`classify`] is therefore a line-by-line
//! port, including the parts that look accidental:
//!
//! - The path is percent-decoded first, as Go's `url.URL.Path` is (`%2F` becomes a
//!   segment separator). A malformed escape makes Go's HTTP server answer 400 before
//!   any handler runs; we report it in [`RequestInfo::error`].
//! - Segments are split on `/` after trimming every leading and trailing `/`; empty
//!   segments in the middle (`/api//v1`) are kept, no `.`/`..` cleaning happens.
//! - The query is parsed like Go's `url.Values`: pairs split on `&`, pairs containing
//!   `;` or a malformed escape are dropped, `+` is a space, the first value wins.
//! - A `get` without a name becomes `list` or `watch`, and `fieldSelector=metadata.name=X`
//!   names the object, only if the whole query decodes as `ListOptions` (integers parse,
//!   both selectors are syntactically valid); otherwise the apiserver falls back to a
//!   plain look at `watch` and sets no name. The [`selector`](crate::selector)
//!   module parses both selectors exactly as the apiserver does for that reason.
//! - `fieldSelector`/`labelSelector` are recorded for list, watch and deletecollection
//!   (the `AuthorizeWithSelectors` behaviour, on by default since 1.32).
//!
//! Decoded bytes that are not UTF-8 are replaced by U+FFFD (Go keeps the raw bytes);
//! this never changes where segments split, and no valid object name contains them.
//!
//! [`list_params`] reads the LIST/WATCH query parameters Breakwater acts on, with the
//! apiserver's parse errors (which it answers with 400 BadRequest).

use std::borrow::Cow;

use crate::selector::{FieldSelector, LabelSelector, SelectorError};

#[cfg(test)]
mod tests;

/// The classification of one request, as kube-apiserver's `RequestInfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestInfo {
    /// True for `/api/{v}/...` and `/apis/{g}/{v}/...` requests that name a resource.
    pub is_resource_request: bool,
    /// The percent-decoded URL path (Go's `URL.Path`); the raw path if decoding failed.
    pub path: String,
    /// The kube verb; for non-resource requests the lower-cased HTTP method.
    pub verb: Verb,
    /// `api` or `apis`; empty for non-resource requests.
    pub api_prefix: &'static str,
    /// The API group; empty for the core group.
    pub api_group: String,
    pub api_version: String,
    /// Empty for cluster-scoped and all-namespace requests.
    pub namespace: String,
    /// The resource (not the kind), e.g. `pods`.
    pub resource: String,
    /// e.g. `status`, `exec`, `log`.
    pub subresource: String,
    /// From the path, or from `fieldSelector=metadata.name=X` on a list or watch.
    pub name: String,
    /// Where [`RequestInfo::parts`] starts: the index of the resource's
    /// segment in the trimmed `path`, or 0 when there are none (a resource
    /// request's start at 2 or later, after the prefix and version). An
    /// index, not copies: a request would otherwise pay an allocation per
    /// segment.
    parts_from: usize,
    /// The raw `fieldSelector` for list, watch and deletecollection (not for the
    /// legacy `/watch/` path form); empty otherwise.
    pub field_selector: String,
    /// The raw `labelSelector`, under the same rule as `field_selector`.
    pub label_selector: String,
    /// Set when the apiserver would not get as far as using this classification:
    /// [`ClassifyError::InvalidPathEscape`] (Go's HTTP server answers 400) or
    /// [`ClassifyError::MissingResource`] (`NewRequestInfo` fails; the apiserver
    /// answers 500 "failed to create RequestInfo").
    pub error: Option<ClassifyError>,
}

/// A kube verb (`RequestInfo.Verb`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    DeleteCollection,
    Proxy,
    /// A resource request whose HTTP method maps to no verb (Go's empty verb).
    Unknown,
    /// A non-resource request: the lower-cased HTTP method (`get`, `post`, ...).
    NonResource(Cow<'static, str>),
}

impl Verb {
    /// The verb as the apiserver spells it (and as RBAC rules name it).
    pub fn as_str(&self) -> &str {
        match self {
            Verb::NonResource(method) => method,
            other => other.as_static_str().unwrap_or_default(),
        }
    }

    /// The verb as a `'static` string — every verb but a non-standard HTTP
    /// method on a non-resource path (which is owned). Metric labels use
    /// this so that clients cannot mint label values.
    pub fn as_static_str(&self) -> Option<&'static str> {
        Some(match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::DeleteCollection => "deletecollection",
            Verb::Proxy => "proxy",
            Verb::Unknown => "",
            Verb::NonResource(Cow::Borrowed(method)) => method,
            Verb::NonResource(Cow::Owned(_)) => return None,
        })
    }

    /// The verb as a bounded metric label: a custom HTTP method on a
    /// non-resource path is "other", so clients cannot mint label values.
    pub fn label(&self) -> &'static str {
        match self {
            Verb::Unknown => "unknown",
            other => other.as_static_str().unwrap_or("other"),
        }
    }

    /// Go's `strings.ToLower(req.Method)`; borrowed for the standard methods.
    fn lower_method(method: &http::Method) -> Verb {
        let lower: Cow<'static, str> = match method.as_str() {
            "GET" => Cow::Borrowed("get"),
            "HEAD" => Cow::Borrowed("head"),
            "POST" => Cow::Borrowed("post"),
            "PUT" => Cow::Borrowed("put"),
            "PATCH" => Cow::Borrowed("patch"),
            "DELETE" => Cow::Borrowed("delete"),
            "OPTIONS" => Cow::Borrowed("options"),
            "CONNECT" => Cow::Borrowed("connect"),
            "TRACE" => Cow::Borrowed("trace"),
            // Methods are ASCII tokens, so ASCII lower-casing equals Go's ToLower.
            other => Cow::Owned(other.to_ascii_lowercase()),
        };
        Verb::NonResource(lower)
    }
}

impl std::fmt::Display for Verb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl RequestInfo {
    /// True for watches, by query (`?watch=true`) or legacy path (`/watch/`).
    pub fn is_watch(&self) -> bool {
        self.verb == Verb::Watch
    }

    /// kube-apiserver's long-running check (`BasicLongRunningRequestCheck` with verbs
    /// {watch, proxy} and subresources {attach, exec, proxy, log, portforward}): these
    /// requests are exempt from the request timeout and from max-in-flight. Like the
    /// apiserver it ignores the query, so `log` without `follow=true` counts too.
    /// Comparing `as_str` (not the enum) keeps Go's quirk that a non-resource request
    /// with method `WATCH` or `PROXY` is long-running.
    pub fn is_long_running(&self) -> bool {
        if matches!(self.verb.as_str(), "watch" | "proxy") {
            return true;
        }
        if self.is_resource_request
            && matches!(
                self.subresource.as_str(),
                "attach" | "exec" | "proxy" | "log" | "portforward"
            )
        {
            return true;
        }
        !self.is_resource_request && self.path.starts_with("/debug/pprof/")
    }

    /// Path segments starting at the resource: `{resource}/{name}/{subresource}/...`
    /// (empty for a non-resource request).
    pub fn parts(&self) -> impl Iterator<Item = &str> {
        let segments = if self.parts_from == 0 {
            None
        } else {
            Some(self.path.trim_matches('/').split('/').skip(self.parts_from))
        };
        segments.into_iter().flatten()
    }

    fn non_resource(method: &http::Method, path: String) -> RequestInfo {
        RequestInfo {
            is_resource_request: false,
            path,
            verb: Verb::lower_method(method),
            api_prefix: "",
            api_group: String::new(),
            api_version: String::new(),
            namespace: String::new(),
            resource: String::new(),
            subresource: String::new(),
            name: String::new(),
            parts_from: 0,
            field_selector: String::new(),
            label_selector: String::new(),
            error: None,
        }
    }
}

/// Why a request or its query could not be read; `Display` is fit for the message of
/// a 400 Status (except [`ClassifyError::MissingResource`], which the apiserver
/// reports as a 500).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    /// A `%` in the path not followed by two hex digits.
    #[error("invalid URL escape {0:?}")]
    InvalidPathEscape(String),
    /// `/api/v1/watch` or `/api/v1/proxy` with nothing after the verb.
    #[error("unable to determine kind and namespace from url, {0}")]
    MissingResource(String),
    /// An integer parameter that Go's `strconv.ParseInt` rejects.
    #[error("strconv.ParseInt: parsing {value:?}: {reason}")]
    InvalidInteger {
        param: &'static str,
        value: String,
        reason: &'static str,
    },
    /// An integer parameter that parses but is negative.
    #[error("{param} must be non-negative, got {value}")]
    Negative { param: &'static str, value: i64 },
    /// A `labelSelector` that `labels.Parse` rejects.
    #[error("invalid labelSelector {selector:?}: {reason}")]
    InvalidLabelSelector {
        selector: String,
        reason: SelectorError,
    },
    /// A `fieldSelector` that `fields.ParseSelector` rejects.
    #[error("invalid fieldSelector {selector:?}: {reason}")]
    InvalidFieldSelector {
        selector: String,
        reason: SelectorError,
    },
}

/// The API prefixes (`APIPrefixes`) and, of those, the ones without a group segment
/// (`GrouplessAPIPrefixes`) that kube-apiserver configures.
fn is_api_prefix(segment: &str) -> bool {
    matches!(segment, "api" | "apis")
}
fn is_groupless_prefix(prefix: &str) -> bool {
    prefix == "api"
}

/// Classifies a request like kube-apiserver's `NewRequestInfo`.
///
/// `path` is the raw (still percent-encoded) path component, `query` the raw query
/// without `?`. Never fails: problems the apiserver would reject the request for are
/// reported in [`RequestInfo::error`].
pub fn classify(method: &http::Method, path: &str, query: Option<&str>) -> RequestInfo {
    let decoded = match decode_path(path) {
        Ok(decoded) => decoded,
        Err(err) => {
            let mut info = RequestInfo::non_resource(method, path.to_owned());
            info.error = Some(err);
            return info;
        }
    };
    let query = query.unwrap_or("");

    // Go's splitPath: trim every leading/trailing '/', then split on each '/'.
    let trimmed = decoded.trim_matches('/');
    // On the stack: every path the apiserver serves has a handful of
    // segments (a proxy subresource's own path may have more).
    let mut stack: [&str; 16] = [""; 16];
    let heap: Vec<&str>;
    let segments: &[&str] = if trimmed.is_empty() {
        &[]
    } else {
        let mut n = 0;
        let mut overflow = false;
        for segment in trimmed.split('/') {
            let Some(slot) = stack.get_mut(n) else {
                overflow = true;
                break;
            };
            *slot = segment;
            n += 1;
        }
        if overflow {
            heap = trimmed.split('/').collect();
            &heap
        } else {
            &stack[..n]
        }
    };

    let mut parts: &[&str] = segments;
    if parts.len() < 3 || !is_api_prefix(parts[0]) {
        return RequestInfo::non_resource(method, decoded.into_owned());
    }
    let api_prefix = if is_groupless_prefix(parts[0]) {
        "api"
    } else {
        "apis"
    };
    parts = &parts[1..];

    let mut api_group = "";
    if !is_groupless_prefix(api_prefix) {
        // The prefix is consumed, so this asks "were there four parts?".
        if parts.len() < 3 {
            return RequestInfo::non_resource(method, decoded.into_owned());
        }
        api_group = parts[0];
        parts = &parts[1..];
    }

    let mut info = RequestInfo::non_resource(method, String::new());
    info.is_resource_request = true;
    info.api_prefix = api_prefix;
    info.api_group = api_group.to_owned();
    info.api_version = parts[0].to_owned();
    parts = &parts[1..];

    // Legacy `/{specialVerb}/...`: the path, not the method, gives the verb.
    let verb_via_path_prefix = matches!(parts[0], "proxy" | "watch");
    if verb_via_path_prefix {
        if parts.len() < 2 {
            // Go returns the info as far as it got (verb still the lower-cased method).
            info.error = Some(ClassifyError::MissingResource(url_for_error(
                &decoded, query,
            )));
            info.path = decoded.into_owned();
            return info;
        }
        info.verb = if parts[0] == "proxy" {
            Verb::Proxy
        } else {
            Verb::Watch
        };
        parts = &parts[1..];
    } else {
        // Go compares the method string exactly: "get" is not GET.
        info.verb = match method.as_str() {
            "POST" => Verb::Create,
            "GET" | "HEAD" => Verb::Get,
            "PUT" => Verb::Update,
            "PATCH" => Verb::Patch,
            "DELETE" => Verb::Delete,
            _ => Verb::Unknown,
        };
    }

    // `/namespaces/{namespace}/{resource}/...`: make parts relative to the resource,
    // unless the third segment is a subresource of the namespace itself.
    if parts[0] == "namespaces" && parts.len() > 1 {
        info.namespace = parts[1].to_owned();
        if parts.len() > 2 && !matches!(parts[2], "status" | "finalize") {
            parts = &parts[2..];
        }
    }

    // resource/name/subresource/anything/else; the proxy verb has no subresource.
    if parts.len() >= 3 && info.verb != Verb::Proxy {
        info.subresource = parts[2].to_owned();
    }
    if parts.len() >= 2 {
        info.name = parts[1].to_owned();
    }
    if !parts.is_empty() {
        info.resource = parts[0].to_owned();
    }
    if !parts.is_empty() {
        info.parts_from = segments.len() - parts.len();
    }

    let mut params = None;
    if info.name.is_empty() && info.verb == Verb::Get {
        let first = params.get_or_insert_with(|| FirstValues::parse(query));
        match decode_list_options(first) {
            Some(opts) => {
                info.verb = if opts.watch { Verb::Watch } else { Verb::List };
                if let Some(name) = opts.exact_name
                    && is_valid_path_segment_name(&name)
                {
                    info.name = name;
                }
            }
            None => {
                // Decoding failed: the apiserver still honours `watch`, with
                // `strings.ToLower` (not EqualFold) and sets no name.
                let watch = first
                    .watch
                    .as_deref()
                    .is_some_and(|value| !(value == "0" || go_to_lower_equals(value, "false")));
                info.verb = if watch { Verb::Watch } else { Verb::List };
            }
        }
    }
    if info.name.is_empty() && info.verb == Verb::Delete {
        info.verb = Verb::DeleteCollection;
    }

    if !verb_via_path_prefix
        && matches!(info.verb, Verb::List | Verb::Watch | Verb::DeleteCollection)
    {
        let first = params.get_or_insert_with(|| FirstValues::parse(query));
        if let Some(value) = &first.field_selector {
            info.field_selector = value.clone().into_owned();
        }
        if let Some(value) = &first.label_selector {
            info.label_selector = value.clone().into_owned();
        }
    }

    info.path = decoded.into_owned();
    info
}

/// Go prints `req.URL` in the special-verb error: path, then `?query` if any.
fn url_for_error(path: &str, query: &str) -> String {
    if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    }
}

/// Percent-decodes a path like Go's `url.PathUnescape`: `%XX` becomes a byte, `+`
/// stays `+`, and a `%` without two hex digits after it is an error.
pub fn decode_path(raw: &str) -> Result<Cow<'_, str>, ClassifyError> {
    let bytes = raw.as_bytes();
    if !bytes.contains(&b'%') {
        return Ok(Cow::Borrowed(raw));
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            match (
                bytes.get(i + 1).copied().and_then(hex_value),
                bytes.get(i + 2).copied().and_then(hex_value),
            ) {
                (Some(high), Some(low)) => {
                    out.push((high << 4) | low);
                    i += 3;
                }
                _ => {
                    // Go quotes at most the three bytes starting at the bad '%'.
                    let end = (i + 3).min(bytes.len());
                    let shown = String::from_utf8_lossy(&bytes[i..end]).into_owned();
                    return Err(ClassifyError::InvalidPathEscape(shown));
                }
            }
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(Cow::Owned(match String::from_utf8(out) {
        Ok(text) => text,
        Err(err) => String::from_utf8_lossy(err.as_bytes()).into_owned(),
    }))
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// Pairs of a query as Go's `url.ParseQuery` keeps them, in order. Go drops a pair
/// that contains `;` (since 1.17) or whose key or value holds a malformed escape;
/// form_urlencoded would keep both, so those pairs are filtered out first.
fn query_pairs(query: &str) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty() && !pair.contains(';') && escapes_well_formed(pair))
        .filter_map(|pair| form_urlencoded::parse(pair.as_bytes()).next())
}

fn escapes_well_formed(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let ok = bytes.get(i + 1).copied().and_then(hex_value).is_some()
                && bytes.get(i + 2).copied().and_then(hex_value).is_some();
            if !ok {
                return false;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    true
}

/// The first value of each `ListOptions` parameter (Go converts `values[0]`), read
/// in one pass over the query.
#[derive(Default)]
struct FirstValues<'q> {
    watch: Option<Cow<'q, str>>,
    label_selector: Option<Cow<'q, str>>,
    field_selector: Option<Cow<'q, str>>,
    resource_version: Option<Cow<'q, str>>,
    resource_version_match: Option<Cow<'q, str>>,
    timeout_seconds: Option<Cow<'q, str>>,
    limit: Option<Cow<'q, str>>,
    continue_token: Option<Cow<'q, str>>,
    allow_watch_bookmarks: Option<Cow<'q, str>>,
    send_initial_events: Option<Cow<'q, str>>,
}

impl<'q> FirstValues<'q> {
    fn parse(query: &'q str) -> FirstValues<'q> {
        let mut first = FirstValues::default();
        for (key, value) in query_pairs(query) {
            let slot = match key.as_ref() {
                "watch" => &mut first.watch,
                "labelSelector" => &mut first.label_selector,
                "fieldSelector" => &mut first.field_selector,
                "resourceVersion" => &mut first.resource_version,
                "resourceVersionMatch" => &mut first.resource_version_match,
                "timeoutSeconds" => &mut first.timeout_seconds,
                "limit" => &mut first.limit,
                "continue" => &mut first.continue_token,
                "allowWatchBookmarks" => &mut first.allow_watch_bookmarks,
                "sendInitialEvents" => &mut first.send_initial_events,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(value);
            }
        }
        first
    }
}

/// What `NewRequestInfo` takes from a successfully decoded `ListOptions`.
struct DecodedListOptions {
    watch: bool,
    exact_name: Option<String>,
}

/// `ParameterCodec.DecodeParameters` into `ListOptions`: `None` when it would fail.
fn decode_list_options(first: &FirstValues<'_>) -> Option<DecodedListOptions> {
    if let Some(value) = &first.timeout_seconds {
        go_parse_int64("timeoutSeconds", value).ok()?;
    }
    if let Some(value) = &first.limit {
        go_parse_int64("limit", value).ok()?;
    }
    if let Some(value) = &first.label_selector {
        LabelSelector::parse(value).ok()?;
    }
    let exact_name = match &first.field_selector {
        Some(value) => FieldSelector::parse(value)
            .ok()?
            .requires_exact_match("metadata.name")
            .map(str::to_owned),
        None => None,
    };
    Some(DecodedListOptions {
        watch: first.watch.as_deref().is_some_and(go_slice_string_to_bool),
        exact_name,
    })
}

/// apimachinery's `Convert_Slice_string_To_bool`: false only for "0" or anything
/// `strings.EqualFold` to "false"; every other value, including "", is true.
fn go_slice_string_to_bool(value: &str) -> bool {
    !(value == "0" || go_equal_fold(value, "false"))
}

/// Go's `strings.EqualFold` against an ASCII lower-case target. Unicode simple
/// folding adds exactly one non-ASCII match for these letters: U+017F 'ſ' ~ 's'
/// (and U+212A KELVIN SIGN ~ 'k').
fn go_equal_fold(value: &str, target: &str) -> bool {
    let mut chars = value.chars();
    for want in target.chars() {
        let Some(got) = chars.next() else {
            return false;
        };
        let folds = got.eq_ignore_ascii_case(&want)
            || (want == 's' && got == '\u{17F}')
            || (want == 'k' && got == '\u{212A}');
        if !folds {
            return false;
        }
    }
    chars.next().is_none()
}

/// `strings.ToLower(value) == target` for an ASCII lower-case target. No non-ASCII
/// rune lower-cases to one of the letters of "false", so ASCII folding is exact.
fn go_to_lower_equals(value: &str, target: &str) -> bool {
    value.eq_ignore_ascii_case(target)
}

/// Go's `strconv.ParseInt(value, 10, 64)`; Rust's `i64` parser accepts the same
/// language (optional sign, ASCII digits, no underscores or spaces).
fn go_parse_int64(param: &'static str, value: &str) -> Result<i64, ClassifyError> {
    value.parse::<i64>().map_err(|err| {
        let reason = match err.kind() {
            std::num::IntErrorKind::PosOverflow | std::num::IntErrorKind::NegOverflow => {
                "value out of range"
            }
            _ => "invalid syntax",
        };
        ClassifyError::InvalidInteger {
            param,
            value: value.to_owned(),
            reason,
        }
    })
}

/// `path.IsValidPathSegmentName`: the apiserver only uses a selector-given name
/// that could also appear as a path segment.
fn is_valid_path_segment_name(name: &str) -> bool {
    name != "." && name != ".." && !name.contains('/') && !name.contains('%')
}

// ---------------------------------------------------------------------------------
// LIST / WATCH parameters
// ---------------------------------------------------------------------------------

/// The `resourceVersion` of a LIST or WATCH.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ResourceVersion {
    /// Absent or empty: the latest state (a consistent read).
    Unset,
    /// "0": any state, typically the watch cache's.
    Any,
    /// Any other value, opaque, exactly as sent.
    Exact(String),
}

/// The LIST/WATCH query parameters Breakwater acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchParams {
    pub resource_version: ResourceVersion,
    /// `NotOlderThan` or `Exact` (not validated here; the apiserver answers 422).
    pub resource_version_match: Option<String>,
    /// A syntactically valid label selector; `None` when absent or empty.
    pub label_selector: Option<String>,
    /// A syntactically valid field selector; `None` when absent or empty.
    pub field_selector: Option<String>,
    pub timeout_seconds: Option<u64>,
    /// `allowWatchBookmarks`: false only when absent, "0" or "false" (any case).
    pub allow_bookmarks: bool,
    /// `sendInitialEvents`; `Some(true)` for any value but "0"/"false".
    pub send_initial_events: Option<bool>,
    pub limit: Option<u64>,
    /// `continue`; `None` when absent or empty.
    pub continue_token: Option<String>,
}

/// Reads the LIST/WATCH parameters the way the apiserver decodes `ListOptions`
/// (first value of each parameter wins). Errors are what the apiserver rejects with
/// 400 BadRequest, plus negative `timeoutSeconds`/`limit`, which Breakwater refuses
/// itself (the apiserver parses them as signed integers).
pub fn list_params(query: Option<&str>) -> Result<WatchParams, ClassifyError> {
    let first = FirstValues::parse(query.unwrap_or(""));
    let non_empty = |value: &Option<Cow<'_, str>>| {
        value
            .as_deref()
            .filter(|value| !value.is_empty())
            .map(str::to_owned)
    };

    let resource_version = match first.resource_version.as_deref() {
        None | Some("") => ResourceVersion::Unset,
        Some("0") => ResourceVersion::Any,
        Some(other) => ResourceVersion::Exact(other.to_owned()),
    };
    if let Some(selector) = &first.label_selector {
        LabelSelector::parse(selector).map_err(|reason| ClassifyError::InvalidLabelSelector {
            selector: selector.clone().into_owned(),
            reason,
        })?;
    }
    if let Some(selector) = &first.field_selector {
        FieldSelector::parse(selector).map_err(|reason| ClassifyError::InvalidFieldSelector {
            selector: selector.clone().into_owned(),
            reason,
        })?;
    }
    Ok(WatchParams {
        resource_version,
        resource_version_match: non_empty(&first.resource_version_match),
        label_selector: non_empty(&first.label_selector),
        field_selector: non_empty(&first.field_selector),
        timeout_seconds: non_negative("timeoutSeconds", first.timeout_seconds.as_deref())?,
        allow_bookmarks: first
            .allow_watch_bookmarks
            .as_deref()
            .is_some_and(go_slice_string_to_bool),
        send_initial_events: first
            .send_initial_events
            .as_deref()
            .map(go_slice_string_to_bool),
        limit: non_negative("limit", first.limit.as_deref())?,
        continue_token: non_empty(&first.continue_token),
    })
}

fn non_negative(param: &'static str, value: Option<&str>) -> Result<Option<u64>, ClassifyError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let parsed = go_parse_int64(param, value)?;
    u64::try_from(parsed)
        .map(Some)
        .map_err(|_| ClassifyError::Negative {
            param,
            value: parsed,
        })
}
