use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use ratatui::Terminal;
use ratatui::backend::TestBackend;

use super::render::{self, SortBy, Ui};
use super::table::{Arrival, Table};
use super::view::{self, LoadRow, TopView};
use super::*;

fn identity(name: &str) -> Arc<Identity> {
    Arc::new(Identity {
        username: name.to_string(),
        uid: String::new(),
        groups: vec!["system:authenticated".into()],
        extra: BTreeMap::new(),
    })
}

const AGENT: &str = "system:serviceaccount:monitoring:node-agent";

#[test]
fn a_callers_watches_and_requests_count_until_they_end() {
    let top = Arc::new(Top::new(64));
    let agent = identity(AGENT);
    let rule: Arc<str> = Arc::from("agents");
    let mut watches = Vec::new();
    for _ in 0..5 {
        let mut t = top.arrive(&agent, true);
        t.rule(Some(&rule));
        watches.push(t);
    }
    for _ in 0..20 {
        let mut t = top.arrive(&agent, false);
        t.rule(Some(&rule));
        t.end(200);
    }
    let throttled = top.arrive(&agent, false);
    throttled.end(429);

    let (rows, others) = top.identities.rows(Instant::now());
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.key.username, AGENT);
    assert_eq!(row.watches, 5);
    assert_eq!(row.inflight, 0);
    assert_eq!(row.totals.requests, 26);
    assert_eq!(row.totals.watch_opens, 5);
    assert_eq!(row.totals.throttled, 1);
    assert_eq!(row.rule.as_deref(), Some("agents"));
    assert_eq!(others.totals.requests, 0);
    let (rules, _) = top.rules.rows(Instant::now());
    assert_eq!(rules[0].watches, 5);

    drop(watches);
    let (rows, _) = top.identities.rows(Instant::now());
    assert_eq!((rows[0].watches, rows[0].inflight), (0, 0));
    let (rules, _) = top.rules.rows(Instant::now());
    assert_eq!(rules[0].watches, 0);
}

#[test]
fn a_hundred_thousand_identities_keep_memory_flat_and_the_heavy_on_top() {
    let top = Arc::new(Top::new(DEFAULT_IDENTITIES));
    let table = top.identities();
    let capacity = table.capacity();
    let footprint = table.footprint();
    assert_eq!(capacity, DEFAULT_IDENTITIES);

    let heavy: Vec<Arc<Identity>> = (0..10)
        .map(|i| identity(&format!("system:serviceaccount:storm:heavy-{i}")))
        .collect();
    let mut light: Vec<Weak<Identity>> = Vec::with_capacity(100_000);
    for i in 0..100_000 {
        let who = identity(&format!("system:serviceaccount:fleet:agent-{i}"));
        top.arrive(&who, false).end(200);
        light.push(Arc::downgrade(&who));
        if i % 100 == 0 {
            for h in &heavy {
                top.arrive(h, false).end(200);
            }
        }
        if i % 10_000 == 0 {
            // Memory does not grow with the keys seen.
            assert!(table.len() <= capacity);
            assert_eq!(table.footprint(), footprint);
        }
    }
    assert_eq!(table.capacity(), capacity);
    assert_eq!(table.footprint(), footprint);
    assert!(table.len() <= capacity);
    // The table holds at most `capacity` identities alive; the rest freed.
    let alive = light.iter().filter(|w| w.strong_count() > 0).count();
    assert!(alive <= capacity, "{alive} light identities still held");
    // Every request is counted, shown or not: a held key's totals start
    // when it entered, so the table shows at most what arrived.
    assert!(table.shown_totals().requests <= 100_000 + 10 * 1_000);

    let (mut rows, others) = table.rows(Instant::now());
    assert_eq!(others.totals.requests, 0, "no slot was busy");
    rows.sort_by_key(|r| std::cmp::Reverse(r.totals.requests));
    let mut top10: Vec<&str> = rows[..10].iter().map(|r| r.key.username.as_str()).collect();
    top10.sort();
    let mut want: Vec<&str> = heavy.iter().map(|h| h.username.as_str()).collect();
    want.sort();
    assert_eq!(top10, want);
    for r in &rows[..10] {
        // Tracked since their first request: exact.
        assert_eq!(r.totals.requests, 1_000);
        assert_eq!(r.error, 0);
    }
    println!(
        "top table: {} slots, {} bytes, {} identities held after 100,000",
        capacity,
        footprint,
        table.len()
    );
}

#[test]
fn busy_entries_are_never_taken_over_and_overflow_counts_as_others() {
    // One shard of two slots.
    let table: Table<Arc<str>> = Table::new(1, 2);
    let a: Arc<str> = Arc::from("a");
    let b: Arc<str> = Arc::from("b");
    let c: Arc<str> = Arc::from("c");
    let ea = table.arrive(&a, || a.clone(), Arrival::Watch);
    let eb = table.arrive(&b, || b.clone(), Arrival::Request);
    // Both slots are busy: c counts, unnamed.
    let ec = table.arrive(&c, || c.clone(), Arrival::Watch);
    let (rows, others) = table.rows(Instant::now());
    assert_eq!(rows.len(), 2);
    assert_eq!((others.totals.requests, others.watches), (1, 1));
    table.end(ec, Arrival::Watch, 403);
    table.end(eb, Arrival::Request, 200);
    // b is idle now: c may take its slot, inheriting b's score as error.
    let ec = table.arrive(&c, || c.clone(), Arrival::Request);
    table.end(ec, Arrival::Request, 429);
    let (rows, others) = table.rows(Instant::now());
    let names: Vec<&str> = rows.iter().map(|r| &*r.key).collect();
    assert!(names.contains(&"a") && names.contains(&"c"), "{names:?}");
    let c_row = rows.iter().find(|r| &*r.key == "c").expect("c");
    assert_eq!(c_row.error, 1);
    assert_eq!(c_row.totals.throttled, 1);
    assert_eq!((others.watches, others.totals.forbidden), (0, 1));
    // a's watch still ends on its own slot.
    table.end(ea, Arrival::Watch, 200);
    let (rows, _) = table.rows(Instant::now());
    assert!(rows.iter().all(|r| r.watches == 0));
}

#[test]
fn rates_cover_the_last_ticks_only() {
    let table: Table<Arc<str>> = Table::new(1, 4);
    let k: Arc<str> = Arc::from("k");
    let t0 = Instant::now();
    for _ in 0..100 {
        let e = table.arrive(&k, || k.clone(), Arrival::Request);
        table.end(e, Arrival::Request, 200);
    }
    // Five quiet ticks later the burst has left the window.
    for i in 1..=table::RATE_TICKS as u64 {
        table.tick(t0 + Duration::from_secs(i));
    }
    let (rows, _) = table.rows(t0 + Duration::from_secs(6));
    assert_eq!(rows[0].rates.requests, 0.0);
    assert_eq!(rows[0].totals.requests, 100);
    for _ in 0..10 {
        let e = table.arrive(&k, || k.clone(), Arrival::Request);
        table.end(e, Arrival::Request, 200);
    }
    let (rows, _) = table.rows(t0 + Duration::from_secs(6));
    // 10 requests over the 5 s since the oldest tick kept.
    assert!(
        (rows[0].rates.requests - 2.0).abs() < 1e-9,
        "{:?}",
        rows[0].rates
    );
}

fn sample_view() -> TopView {
    let row = |name: &str, rps: f64, watches: u64, throttled: f64| LoadRow {
        name: name.into(),
        rule: Some("agents".into()),
        requests_per_sec: rps,
        watches,
        watch_opens_per_sec: rps / 10.0,
        throttled_per_sec: throttled,
        requests: 100,
        ..LoadRow::default()
    };
    TopView {
        uptime_seconds: 42.0,
        identities: view::Identities {
            capacity: 512,
            rows: vec![
                row(AGENT, 12.5, 5, 0.0),
                row("system:serviceaccount:ci:builder", 40.0, 0, 3.0),
                row("alice", 1.0, 1, 0.0),
            ],
            others: LoadRow {
                name: "(others)".into(),
                ..LoadRow::default()
            },
        },
        rules: vec![LoadRow {
            name: "agents".into(),
            requests_per_sec: 53.5,
            watches: 6,
            watch_cap: Some(100),
            requests: 300,
            ..LoadRow::default()
        }],
        upstream: view::UpstreamView {
            seats: Some(view::Seats {
                in_use: 7,
                max_inflight: 400,
                reserved_for_exempt: 40,
            }),
            lanes: vec![view::LaneView {
                lane: "long-running".into(),
                connections: 1,
                streams: 3,
            }],
            latency: vec![view::LatencyView {
                verb_class: "list".into(),
                count: 12,
                p50_seconds: Some(0.012),
                p99_seconds: Some(1.5),
            }],
        },
        hub: view::HubView {
            streams: 2,
            subscribers: 10,
            shared_ratio: 5.0,
            cache_objects: 1200,
            cache_bytes: 3 << 20,
            evictions: 1,
            relists: 0,
        },
        blocks: vec![],
        limits: view::LimitsView {
            file: Some("/etc/breakwater/limits.yaml".into()),
            generation: 3,
            rules: 1,
            last_reload: Some(view::ReloadView {
                result: "error".into(),
                at_unix: 1,
                error: Some("limits.yaml:4:3: unknown field `rat`".into()),
            }),
        },
    }
}

fn screen(view: Option<&TopView>, ui: &Ui) -> Vec<String> {
    let mut terminal = Terminal::new(TestBackend::new(140, 40)).expect("terminal");
    terminal.draw(|f| render::draw(f, view, ui)).expect("draw");
    let buf = terminal.backend().buffer().clone();
    (0..buf.area.height)
        .map(|y| {
            (0..buf.area.width)
                .map(|x| buf[(x, y)].symbol().to_string())
                .collect::<String>()
        })
        .collect()
}

fn line_of(lines: &[String], needle: &str) -> usize {
    lines
        .iter()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not on screen:\n{}", lines.join("\n")))
}

#[test]
fn the_screen_shows_every_section_sorted_by_the_chosen_column() {
    let view = sample_view();
    let ui = Ui {
        admin: "http://127.0.0.1:9444".into(),
        sort: SortBy::Requests,
        error: None,
    };
    let lines = screen(Some(&view), &ui);
    println!("{}", lines.join("\n"));
    let agent = line_of(&lines, AGENT);
    let builder = line_of(&lines, "ci:builder");
    assert!(builder < agent, "busiest first");
    // The agent's row: 12.5 req/s shown as 12 (no decimals at 10+), 5 watches.
    let row: Vec<&str> = lines[agent].split_whitespace().collect();
    assert!(row.contains(&"5"), "{}", lines[agent]);
    assert!(lines[line_of(&lines, "REQ/S▼")].contains("WATCH"));
    line_of(&lines, "seats 7 in use of 400 (40 reserved for exempt)");
    line_of(&lines, "conns/streams: long-running 1/3");
    line_of(&lines, "p99   1.50s");
    line_of(&lines, "shared 5.0x");
    line_of(&lines, "3.0 MiB");
    line_of(&lines, "6/100");
    line_of(&lines, "generation 3");
    line_of(&lines, "LAST RELOAD REFUSED");
    line_of(&lines, "Blocks (0)");

    let by_watches = Ui {
        sort: SortBy::Watches,
        ..ui.clone()
    };
    let lines = screen(Some(&view), &by_watches);
    assert!(line_of(&lines, AGENT) < line_of(&lines, "ci:builder"));
    assert!(line_of(&lines, "WATCH▼") < line_of(&lines, AGENT));
}

#[test]
fn the_screen_says_why_before_the_first_snapshot() {
    let ui = Ui {
        admin: "http://127.0.0.1:1".into(),
        sort: SortBy::Requests,
        error: Some("connection refused".into()),
    };
    let lines = screen(None, &ui);
    line_of(&lines, "connection refused");
}

#[test]
fn the_plain_snapshot_lists_active_identities_with_their_watches() {
    let view = sample_view();
    let text = render::plain(&view, SortBy::Watches, 20);
    let agent = text
        .lines()
        .find(|l| l.contains(AGENT))
        .expect("agent listed");
    let cols: Vec<&str> = agent.split_whitespace().collect();
    // REQ/S INFL WATCH OPEN/S 429/S 403/S NAME [rule]
    assert_eq!(cols[2], "5", "{agent}");
    assert_eq!(cols[6], AGENT);
    assert!(text.contains("IDENTITIES"));
    assert!(text.contains("BLOCKS (0)"));
    let limited = render::plain(&view, SortBy::Watches, 1);
    assert!(limited.contains(AGENT) && !limited.contains("alice"));
}

#[test]
fn the_view_round_trips_through_json() {
    let view = sample_view();
    let text = serde_json::to_string(&view).expect("json");
    assert!(text.contains("\"requestsPerSec\""));
    let back: TopView = serde_json::from_str(&text).expect("parse");
    assert_eq!(back, view);
}
