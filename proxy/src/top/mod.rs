//! "Who is loading the apiserver right now": the proxy's live view for the
//! on-call, served as JSON at `/debug/top` on the admin listener and shown
//! by `breakwater top`.
//!
//! - [`table`]: the fixed-size heavy-hitter table (space-saving) that keeps
//!   identities and rules bounded whatever the fleet size;
//! - [`Top`] and [`Ticket`]: the request path's two touch points (arrival,
//!   end), and [`Top::view`], which joins the tables with the upstream,
//!   the hub, the blocks and the limits file into a [`view::TopView`];
//! - [`render`]: the terminal UI (ratatui) and the plain-text snapshot;
//! - [`client`]: `breakwater top`, which polls `/debug/top`.
//!
//! Identities never reach metrics labels (unbounded); they are here, in a
//! table of fixed size that shows the heaviest ones.

pub mod client;
pub mod render;
pub mod table;
pub mod view;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::identity::Identity;
use table::{Arrival, Entry, Row, Table};
use view::{LoadRow, TopView};

/// Identities the table holds by default: 32 shards of 16.
pub const DEFAULT_IDENTITIES: usize = 512;
const SHARDS: usize = 32;
/// Rules are few (a limits file's), one shard is enough.
const RULE_SLOTS: usize = 256;

/// The live load tables of one proxy.
pub struct Top {
    identities: Table<Arc<Identity>>,
    rules: Table<Arc<str>>,
    started: Instant,
}

impl std::fmt::Debug for Top {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Top")
            .field("identities", &self.identities.capacity())
            .finish_non_exhaustive()
    }
}

impl Default for Top {
    fn default() -> Self {
        Top::new(DEFAULT_IDENTITIES)
    }
}

/// The rule name of requests that no rule matched (as in metrics).
fn no_rule() -> &'static Arc<str> {
    static NO_RULE: OnceLock<Arc<str>> = OnceLock::new();
    NO_RULE.get_or_init(|| Arc::from("-"))
}

impl Top {
    /// Tables for about `identities` identities (rounded up to the shards).
    pub fn new(identities: usize) -> Top {
        Top {
            identities: Table::new(SHARDS, identities.div_ceil(SHARDS).max(1)),
            rules: Table::new(1, RULE_SLOTS),
            started: Instant::now(),
        }
    }

    /// The identity table (for tests and the view).
    pub fn identities(&self) -> &Table<Arc<Identity>> {
        &self.identities
    }

    /// An authenticated request arrives; keep the ticket until its
    /// response ends (the access log holds it).
    pub fn arrive(self: &Arc<Self>, identity: &Arc<Identity>, watch: bool) -> Ticket {
        let what = if watch {
            Arrival::Watch
        } else {
            Arrival::Request
        };
        let entry = self
            .identities
            .arrive(&identity.username, || Arc::clone(identity), what);
        Ticket {
            top: Arc::clone(self),
            what,
            identity: entry,
            rule: None,
            ended: false,
        }
    }

    /// Once a second: rates move on, scores decay.
    pub fn tick(&self, now: Instant) {
        self.identities.tick(now);
        self.rules.tick(now);
    }

    /// The whole view: tables plus what the rest of the proxy reports.
    pub fn view(&self, sources: &Sources<'_>) -> TopView {
        let now = Instant::now();
        let (rows, others) = self.identities.rows(now);
        let mut identities: Vec<LoadRow> = rows
            .into_iter()
            .map(|r| load_row(r.key.username.clone(), &r))
            .collect();
        identities.sort_by(|a, b| {
            b.requests_per_sec
                .total_cmp(&a.requests_per_sec)
                .then(b.watches.cmp(&a.watches))
                .then(b.inflight.cmp(&a.inflight))
                .then(a.name.cmp(&b.name))
        });
        let others = load_row("(others)".into(), &others);

        let limiter = sources.admission.limiter();
        let limits = limiter.limits();
        let stats = limiter.rule_stats();
        let (rule_rows, _) = self.rules.rows(now);
        let mut rules = Vec::new();
        for rule in limits.rules() {
            let mut row = rule_rows
                .iter()
                .find(|r| &*r.key == rule.name())
                .map(|r| load_row(rule.name().to_string(), r))
                .unwrap_or_else(|| LoadRow {
                    name: rule.name().to_string(),
                    ..LoadRow::default()
                });
            // The limiter's counts are exact and include what admitted
            // before the table saw it (a reload, a restart of the view).
            if let Some(s) = stats.iter().find(|s| &*s.rule == rule.name()) {
                row.inflight = s.inflight;
                row.watches = s.watches;
            }
            row.watch_cap = rule.aggregate().watches;
            rules.push(row);
        }
        if let Some(r) = rule_rows.iter().find(|r| *r.key == **no_rule()) {
            rules.push(load_row("-".into(), r));
        }

        let upstream = &sources.upstream;
        let seats = limits.upstream().map(|caps| view::Seats {
            in_use: limiter.upstream_inflight(),
            max_inflight: caps.max_inflight,
            reserved_for_exempt: caps.reserved_for_exempt,
        });
        let lanes = crate::upstream::Lane::ALL
            .iter()
            .map(|&lane| {
                let s = upstream.lane_stats(lane);
                view::LaneView {
                    lane: lane.as_str().to_string(),
                    connections: s.connections,
                    streams: s.streams,
                }
            })
            .collect();
        let latency = upstream
            .latency()
            .quantiles()
            .into_iter()
            .map(|q| view::LatencyView {
                verb_class: q.class.as_str().to_string(),
                count: q.count,
                p50_seconds: q.p50,
                p99_seconds: q.p99,
            })
            .collect();
        let h = &sources.hub;
        let hub = view::HubView {
            streams: h.streams,
            subscribers: h.subscribers,
            shared_ratio: if h.streams == 0 {
                0.0
            } else {
                h.subscribers as f64 / h.streams as f64
            },
            cache_objects: h.cache_objects,
            cache_bytes: h.cache_bytes,
            evictions: h.evictions,
            relists: h.relists,
        };
        TopView {
            uptime_seconds: now.duration_since(self.started).as_secs_f64(),
            identities: view::Identities {
                capacity: self.identities.capacity(),
                rows: identities,
                others,
            },
            rules,
            upstream: view::UpstreamView {
                seats,
                lanes,
                latency,
            },
            hub,
            blocks: sources.admission.blocks(),
            limits: limits_view(sources.admission.limits_file_state(), limits.rules().len()),
        }
    }
}

/// What [`Top::view`] reads besides its own tables.
pub struct Sources<'a> {
    pub upstream: &'a crate::upstream::Upstream,
    pub admission: &'a crate::admit::Admission,
    pub hub: crate::watch::HubStats,
}

fn load_row<K>(name: String, r: &Row<K>) -> LoadRow {
    LoadRow {
        name,
        rule: r.rule.as_deref().map(str::to_string),
        requests_per_sec: r.rates.requests,
        inflight: r.inflight,
        watches: r.watches,
        watch_cap: None,
        watch_opens_per_sec: r.rates.watch_opens,
        throttled_per_sec: r.rates.throttled,
        forbidden_per_sec: r.rates.forbidden,
        requests: r.totals.requests,
        watch_opens: r.totals.watch_opens,
        throttled: r.totals.throttled,
        forbidden: r.totals.forbidden,
        error: r.error,
    }
}

/// One request's place in the tables, held until its response ends.
/// Dropping it without [`Ticket::end`] ends it with no status.
pub struct Ticket {
    top: Arc<Top>,
    what: Arrival,
    identity: Entry,
    rule: Option<Entry>,
    ended: bool,
}

impl Ticket {
    /// The rule that governs the request (`None`: no rule matched); once.
    pub fn rule(&mut self, rule: Option<&Arc<str>>) {
        if self.rule.is_some() {
            return;
        }
        let rule = rule.unwrap_or(no_rule());
        self.rule = Some(self.top.rules.arrive(rule, || Arc::clone(rule), self.what));
        self.top.identities.set_rule(self.identity, rule);
    }

    /// The response ended (or was refused) with `status`.
    pub fn end(mut self, status: u16) {
        self.finish(status);
    }

    fn finish(&mut self, status: u16) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        self.top.identities.end(self.identity, self.what, status);
        if let Some(rule) = self.rule {
            self.top.rules.end(rule, self.what, status);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.finish(0);
    }
}

/// Ticks the tables and the upstream latency window, and folds the
/// buffered request durations, once a second until `stop`.
pub async fn ticker(top: Arc<Top>, latency: Arc<crate::slo::Latency>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {
                let now = Instant::now();
                top.tick(now);
                latency.tick(now);
                crate::slo::fold_durations(now);
            }
        }
    }
}

/// The limits file's state as `/debug/top` shows it, with `rules` in force.
fn limits_view(state: crate::admit::LimitsFileState, rules: usize) -> view::LimitsView {
    view::LimitsView {
        file: state.file.map(|p| p.display().to_string()),
        generation: state.generation,
        rules,
        last_reload: state.last_reload.map(|r| view::ReloadView {
            result: if r.error.is_some() { "error" } else { "ok" }.to_string(),
            at_unix: r
                .at
                .duration_since(std::time::SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            error: r.error,
        }),
    }
}

#[cfg(test)]
mod tests;
