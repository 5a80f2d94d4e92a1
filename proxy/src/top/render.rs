//! Drawing a [`TopView`]: the terminal UI (ratatui) and the plain-text
//! snapshot of `breakwater top --once`. Both are pure functions of the view
//! and the UI state, so tests render them into a `TestBackend` or a string.

use std::fmt::Write as _;

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table};

use super::view::{LoadRow, TopView};

/// The column the tables are sorted by (descending; names ascending).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SortBy {
    /// Requests per second.
    #[default]
    Requests,
    /// Requests in flight.
    Inflight,
    /// Open watches.
    Watches,
    /// Watch opens per second.
    WatchOpens,
    /// 429s per second.
    Throttled,
    /// 403s per second.
    Forbidden,
    /// Name, A to Z.
    Name,
}

impl SortBy {
    const ORDER: [SortBy; 7] = [
        SortBy::Requests,
        SortBy::Inflight,
        SortBy::Watches,
        SortBy::WatchOpens,
        SortBy::Throttled,
        SortBy::Forbidden,
        SortBy::Name,
    ];

    /// The next column (the TUI's Tab).
    pub fn next(self) -> SortBy {
        let i = SortBy::ORDER.iter().position(|&s| s == self).unwrap_or(0);
        SortBy::ORDER[(i + 1) % SortBy::ORDER.len()]
    }

    /// The TUI's key for each column.
    pub fn from_key(c: char) -> Option<SortBy> {
        Some(match c {
            'r' => SortBy::Requests,
            'i' => SortBy::Inflight,
            'w' => SortBy::Watches,
            'o' => SortBy::WatchOpens,
            't' => SortBy::Throttled,
            'f' => SortBy::Forbidden,
            'n' => SortBy::Name,
            _ => return None,
        })
    }

    fn column(self) -> usize {
        SortBy::ORDER.iter().position(|&s| s == self).unwrap_or(0)
    }
}

/// Sorts rows by `by`, heaviest first; ties by name.
pub fn sort_rows(rows: &mut [LoadRow], by: SortBy) {
    rows.sort_by(|a, b| {
        let key = |r: &LoadRow| match by {
            SortBy::Requests => r.requests_per_sec,
            SortBy::Inflight => r.inflight as f64,
            SortBy::Watches => r.watches as f64,
            SortBy::WatchOpens => r.watch_opens_per_sec,
            SortBy::Throttled => r.throttled_per_sec,
            SortBy::Forbidden => r.forbidden_per_sec,
            SortBy::Name => 0.0,
        };
        key(b).total_cmp(&key(a)).then_with(|| a.name.cmp(&b.name))
    });
}

/// What the TUI shows besides the view.
#[derive(Debug, Clone, Default)]
pub struct Ui {
    /// The admin URL polled.
    pub admin: String,
    pub sort: SortBy,
    /// The last fetch failed: why (the last good view stays on screen).
    pub error: Option<String>,
}

const LOAD_HEADERS: [&str; 7] = ["REQ/S", "INFL", "WATCH", "OPEN/S", "429/S", "403/S", "NAME"];

fn rate(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v < 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

fn secs(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(s) if s < 1.0 => format!("{:.0}ms", s * 1000.0),
        Some(s) => format!("{s:.2}s"),
    }
}

fn bytes(v: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut x = v as f64;
    let mut unit = 0;
    while x >= 1024.0 && unit + 1 < UNITS.len() {
        x /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v} B")
    } else {
        format!("{x:.1} {}", UNITS[unit])
    }
}

fn watches(r: &LoadRow) -> String {
    match r.watch_cap {
        Some(cap) => format!("{}/{cap}", r.watches),
        None => r.watches.to_string(),
    }
}

/// The cells of a load row, in [`LOAD_HEADERS`] order.
fn load_cells(r: &LoadRow) -> [String; 7] {
    // `-` (no rule matched) says nothing worth a column's width.
    let name = match r.rule.as_deref() {
        Some(rule) if rule != "-" => format!("{}  [{rule}]", r.name),
        _ => r.name.clone(),
    };
    [
        rate(r.requests_per_sec),
        r.inflight.to_string(),
        watches(r),
        rate(r.watch_opens_per_sec),
        rate(r.throttled_per_sec),
        rate(r.forbidden_per_sec),
        name,
    ]
}

fn is_idle(r: &LoadRow) -> bool {
    r.requests == 0 && r.inflight == 0 && r.watches == 0
}

fn limits_line(view: &TopView) -> String {
    let l = &view.limits;
    let file = l.file.as_deref().unwrap_or("(none)");
    let reload = match &l.last_reload {
        None => "no reload yet".to_string(),
        Some(r) if r.result == "ok" => "last reload ok".to_string(),
        Some(r) => format!(
            "LAST RELOAD REFUSED: {}",
            r.error
                .as_deref()
                .unwrap_or("")
                .lines()
                .next()
                .unwrap_or("")
        ),
    };
    format!(
        "limits {file}: generation {}, {} rules, {reload}",
        l.generation, l.rules
    )
}

fn block_lines(view: &TopView) -> Vec<String> {
    view.blocks
        .iter()
        .map(|b| {
            let target = serde_json::to_string(&b.target).unwrap_or_default();
            format!("{}  {}  {target}", b.id, b.respond.code())
        })
        .collect()
}

fn upstream_lines(view: &TopView) -> Vec<String> {
    let u = &view.upstream;
    let mut out = Vec::new();
    match &u.seats {
        Some(s) => out.push(format!(
            "seats {} in use of {} ({} reserved for exempt)",
            s.in_use, s.max_inflight, s.reserved_for_exempt
        )),
        None => out.push("seats: no upstream cap in the limits file".into()),
    }
    let lanes: Vec<String> = u
        .lanes
        .iter()
        .map(|l| format!("{} {}/{}", l.lane, l.connections, l.streams))
        .collect();
    out.push(format!("conns/streams: {}", lanes.join("  ")));
    for l in &u.latency {
        out.push(format!(
            "{:<9} p50 {:>7}  p99 {:>7}  ({} in 10s)",
            l.verb_class,
            secs(l.p50_seconds),
            secs(l.p99_seconds),
            l.count
        ));
    }
    out
}

fn hub_lines(view: &TopView) -> Vec<String> {
    let h = &view.hub;
    vec![
        format!("streams {}  subscribers {}", h.streams, h.subscribers),
        format!("shared {:.1}x (subscribers per stream)", h.shared_ratio),
        format!(
            "cache {} objects, {}",
            h.cache_objects,
            bytes(h.cache_bytes)
        ),
        format!("evictions {}  relists {}", h.evictions, h.relists),
    ]
}

/// The plain-text snapshot (`breakwater top --once`): every section, the
/// `limit` heaviest identities by `sort`, columns separated by spaces.
pub fn plain(view: &TopView, sort: SortBy, limit: usize) -> String {
    let mut out = String::new();
    let table = |out: &mut String, title: &str, rows: &[LoadRow]| {
        let _ = writeln!(out, "{title}");
        let _ = writeln!(
            out,
            "{:>8} {:>6} {:>9} {:>7} {:>7} {:>7}  {}",
            LOAD_HEADERS[0],
            LOAD_HEADERS[1],
            LOAD_HEADERS[2],
            LOAD_HEADERS[3],
            LOAD_HEADERS[4],
            LOAD_HEADERS[5],
            LOAD_HEADERS[6]
        );
        for r in rows {
            let c = load_cells(r);
            let _ = writeln!(
                out,
                "{:>8} {:>6} {:>9} {:>7} {:>7} {:>7}  {}",
                c[0], c[1], c[2], c[3], c[4], c[5], c[6]
            );
        }
    };
    let _ = writeln!(
        out,
        "breakwater top  uptime {:.0}s  {}",
        view.uptime_seconds,
        limits_line(view)
    );
    let _ = writeln!(out);
    let mut ids: Vec<LoadRow> = view
        .identities
        .rows
        .iter()
        .filter(|r| !is_idle(r))
        .cloned()
        .collect();
    sort_rows(&mut ids, sort);
    ids.truncate(limit);
    if !is_idle(&view.identities.others) {
        ids.push(view.identities.others.clone());
    }
    table(
        &mut out,
        &format!(
            "IDENTITIES (top {} of a table of {})",
            ids.len(),
            view.identities.capacity
        ),
        &ids,
    );
    let _ = writeln!(out);
    let mut rules = view.rules.clone();
    sort_rows(&mut rules, sort);
    table(&mut out, "RULES", &rules);
    let _ = writeln!(out);
    let _ = writeln!(out, "UPSTREAM");
    for l in upstream_lines(view) {
        let _ = writeln!(out, "  {l}");
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "WATCH HUB");
    for l in hub_lines(view) {
        let _ = writeln!(out, "  {l}");
    }
    let _ = writeln!(out);
    let blocks = block_lines(view);
    let _ = writeln!(out, "BLOCKS ({})", blocks.len());
    for l in blocks {
        let _ = writeln!(out, "  {l}");
    }
    out
}

/// Draws the whole screen.
pub fn draw(frame: &mut Frame<'_>, view: Option<&TopView>, ui: &Ui) {
    let [head, ids, rules, bottom, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(6),
        Constraint::Length(
            view.map(|v| v.rules.len() as u16 + 3)
                .unwrap_or(3)
                .clamp(3, 12),
        ),
        Constraint::Length(10),
        Constraint::Length(1),
    ])
    .areas(frame.area());

    let Some(view) = view else {
        let msg = ui
            .error
            .as_deref()
            .unwrap_or("waiting for the first snapshot…");
        frame.render_widget(
            Paragraph::new(format!("breakwater top  {}  {msg}", ui.admin)),
            head,
        );
        return;
    };

    let mut title = vec![
        Span::styled("breakwater top ", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(format!(
            " {}  uptime {:.0}s  ",
            ui.admin, view.uptime_seconds
        )),
        Span::raw(limits_line(view)),
    ];
    if let Some(err) = &ui.error {
        title.push(Span::raw("  "));
        title.push(Span::styled(
            format!("fetch failed: {err}"),
            Style::new().red(),
        ));
    }
    frame.render_widget(Paragraph::new(Line::from(title)), head);

    let mut id_rows: Vec<LoadRow> = view
        .identities
        .rows
        .iter()
        .filter(|r| !is_idle(r))
        .cloned()
        .collect();
    sort_rows(&mut id_rows, ui.sort);
    if !is_idle(&view.identities.others) {
        id_rows.push(view.identities.others.clone());
    }
    load_table(
        frame,
        ids,
        &format!(
            " Identities ({} active, table of {}) ",
            id_rows.len(),
            view.identities.capacity
        ),
        &id_rows,
        ui.sort,
    );
    let mut rule_rows = view.rules.clone();
    sort_rows(&mut rule_rows, ui.sort);
    load_table(frame, rules, " Rules ", &rule_rows, ui.sort);

    let [up, hub, blocks] = Layout::horizontal([
        Constraint::Percentage(50),
        Constraint::Percentage(25),
        Constraint::Percentage(25),
    ])
    .areas(bottom);
    let lines = |v: Vec<String>| v.into_iter().map(Line::from).collect::<Vec<_>>();
    frame.render_widget(
        Paragraph::new(lines(upstream_lines(view))).block(Block::bordered().title(" Upstream ")),
        up,
    );
    frame.render_widget(
        Paragraph::new(lines(hub_lines(view))).block(Block::bordered().title(" Watch hub ")),
        hub,
    );
    let block_list = block_lines(view);
    let block_title = format!(" Blocks ({}) ", block_list.len());
    let block_style = if block_list.is_empty() {
        Style::new()
    } else {
        Style::new().red()
    };
    frame.render_widget(
        Paragraph::new(lines(block_list)).block(
            Block::bordered()
                .title(block_title)
                .border_style(block_style),
        ),
        blocks,
    );
    frame.render_widget(
        Paragraph::new(
            "sort: r req/s  i in-flight  w watches  o opens/s  t 429/s  f 403/s  n name  Tab next   q quit",
        )
        .dim(),
        foot,
    );
}

fn load_table(frame: &mut Frame<'_>, area: Rect, title: &str, rows: &[LoadRow], sort: SortBy) {
    let header = Row::new(LOAD_HEADERS.iter().enumerate().map(|(i, h)| {
        let cell = Cell::from(if i == sort.column() {
            format!("{h}▼")
        } else {
            (*h).to_string()
        });
        if i == sort.column() {
            cell.style(Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED))
        } else {
            cell.style(Style::new().add_modifier(Modifier::BOLD))
        }
    }));
    let body = rows.iter().map(|r| {
        let row = Row::new(load_cells(r));
        if r.throttled_per_sec > 0.0 || r.forbidden_per_sec > 0.0 {
            row.style(Style::new().yellow())
        } else {
            row
        }
    });
    let widths = [
        Constraint::Length(8),
        Constraint::Length(6),
        Constraint::Length(11),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Fill(1),
    ];
    frame.render_widget(
        Table::new(body, widths)
            .header(header)
            .block(Block::bordered().title(title.to_string())),
        area,
    );
}
