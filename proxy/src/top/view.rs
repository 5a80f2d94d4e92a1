//! The `/debug/top` document: what the admin listener serves and what
//! `breakwater top` reads. One set of types for both sides, so they cannot
//! drift; unknown fields are ignored on read, so an older `top` can read a
//! newer proxy.

use serde::{Deserialize, Serialize};

/// One snapshot of who loads the apiserver and what the proxy does about it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TopView {
    /// Seconds since the proxy started.
    pub uptime_seconds: f64,
    pub identities: Identities,
    /// One row per rule of the limits file, in file order, plus `-` for
    /// requests no rule matched (when there were any).
    pub rules: Vec<LoadRow>,
    pub upstream: UpstreamView,
    pub hub: HubView,
    pub blocks: Vec<breakwater_limits::Block>,
    pub limits: LimitsView,
}

/// The heaviest identities (approximate top-K in fixed memory).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Identities {
    /// How many identities the table can hold.
    pub capacity: usize,
    /// Identities held now (the heaviest recently; see `error`).
    pub rows: Vec<LoadRow>,
    /// Identities that found the table full of busy entries: counted, not named.
    pub others: LoadRow,
}

/// The load of one identity or rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LoadRow {
    pub name: String,
    /// The identity's last rule (identities only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    pub requests_per_sec: f64,
    /// Requests (not watches) open now.
    pub inflight: u64,
    /// Watches open now.
    pub watches: u64,
    /// The rule's cap on its watches, all identities together (rules only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watch_cap: Option<u64>,
    pub watch_opens_per_sec: f64,
    /// Answers 429 per second.
    pub throttled_per_sec: f64,
    /// Answers 403 per second.
    pub forbidden_per_sec: f64,
    /// Since the row appeared: requests, watch opens, 429s, 403s.
    pub requests: u64,
    pub watch_opens: u64,
    pub throttled: u64,
    pub forbidden: u64,
    /// Space-saving's bound on how much an identity's weight may be
    /// overstated (0 for an identity tracked since its first request).
    pub error: u64,
}

/// The apiserver side.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct UpstreamView {
    /// Upstream seats (`upstream:` in the limits file), when configured.
    pub seats: Option<Seats>,
    pub lanes: Vec<LaneView>,
    /// Over the last ten seconds.
    pub latency: Vec<LatencyView>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Seats {
    pub in_use: u64,
    pub max_inflight: u64,
    pub reserved_for_exempt: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LaneView {
    pub lane: String,
    pub connections: usize,
    pub streams: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LatencyView {
    /// get, list, watch (open), mutating, other.
    pub verb_class: String,
    pub count: u64,
    pub p50_seconds: Option<f64>,
    pub p99_seconds: Option<f64>,
}

/// The watch hub.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HubView {
    pub streams: u64,
    pub subscribers: u64,
    /// Subscribers per upstream stream.
    pub shared_ratio: f64,
    pub cache_objects: u64,
    pub cache_bytes: u64,
    pub evictions: u64,
    pub relists: u64,
}

/// The limits file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LimitsView {
    pub file: Option<String>,
    /// 1 at start-up with a file; +1 per accepted reload.
    pub generation: u64,
    pub rules: usize,
    pub last_reload: Option<ReloadView>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ReloadView {
    /// `ok` or `error`.
    pub result: String,
    /// Seconds since the Unix epoch.
    pub at_unix: u64,
    /// Why the file was refused (the first problems).
    pub error: Option<String>,
}
