//! The incident lab's report: `summary.md`, `summary.json`
//! (`{"direct": M, "breakwater": M}`), `timeseries.json`, and PNG plots of
//! both runs side by side over time.
//!
//! Plots use plotters' bitmap backend with text drawn by ab_glyph from a font
//! compiled into the binary (DejaVu Sans Mono, free licence), so a fresh clone
//! renders labelled PNGs without system fonts.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use serde_json::json;

use super::{Comparison, RunMetrics, RunResult};

/// DejaVu Sans Mono (Bitstream Vera licence, see docs/incident-lab.md).
const FONT: &[u8] = include_bytes!("DejaVuSansMono.ttf");
const FAMILY: &str = "sans-serif";

/// Writes the summary of a single run (`--through-breakwater`, or direct
/// only) into `dir`: `summary.json` as `{"<mode>": M}`, the same shape as a
/// comparison's with one side, and `timeseries.json`.
pub fn write_one(r: &RunResult, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mode = r.mode.name();
    let mut summary = serde_json::Map::new();
    summary.insert(mode.into(), serde_json::to_value(&r.metrics)?);
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )
    .context("write summary.json")?;
    let mut series = serde_json::Map::new();
    series.insert(
        mode.into(),
        json!({"samples": r.samples, "probes": r.probes}),
    );
    std::fs::write(dir.join("timeseries.json"), serde_json::to_string(&series)?)
        .context("write timeseries.json")
}

/// Writes every artefact into `dir` (created if missing).
pub fn write(c: &Comparison, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let summary = json!({
        "direct": c.direct.metrics,
        "breakwater": c.breakwater.metrics,
    });
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )
    .context("write summary.json")?;
    std::fs::write(dir.join("summary.md"), markdown(c)).context("write summary.md")?;
    let series = json!({
        "direct": {"samples": c.direct.samples, "probes": c.direct.probes},
        "breakwater": {"samples": c.breakwater.samples, "probes": c.breakwater.probes},
    });
    std::fs::write(dir.join("timeseries.json"), serde_json::to_string(&series)?)
        .context("write timeseries.json")?;
    plots(c, dir)
}

fn opt(v: Option<f64>, unit: &str) -> String {
    v.map_or_else(|| "never".to_string(), |v| format!("{v:.1}{unit}"))
}

/// The summary table, one row per figure.
pub fn markdown(c: &Comparison) -> String {
    let (d, b) = (&c.direct.metrics, &c.breakwater.metrics);
    let rows: Vec<(&str, String, String)> = vec![
        ("agents", d.agents.to_string(), b.agents.to_string()),
        (
            "time until all agents watch",
            opt(d.all_watching_s, " s"),
            opt(b.all_watching_s, " s"),
        ),
        ("agent LIST p50", ms(d.list_p50_ms), ms(b.list_p50_ms)),
        ("agent LIST p99", ms(d.list_p99_ms), ms(b.list_p99_ms)),
        (
            "429s seen by agents",
            d.agent_429s.to_string(),
            b.agent_429s.to_string(),
        ),
        (
            "other agent errors",
            d.agent_errors.to_string(),
            b.agent_errors.to_string(),
        ),
        (
            "upstream LISTs (pods, at kube-sim)",
            d.upstream_lists.to_string(),
            b.upstream_lists.to_string(),
        ),
        (
            "upstream WATCHes (pods, at kube-sim)",
            d.upstream_watches.to_string(),
            b.upstream_watches.to_string(),
        ),
        (
            "peak pod watches open at kube-sim",
            d.peak_upstream_watches.to_string(),
            b.peak_upstream_watches.to_string(),
        ),
        (
            "peak in-flight at kube-sim (seats)",
            d.peak_inflight.to_string(),
            b.peak_inflight.to_string(),
        ),
        (
            "peak queued at kube-sim",
            d.peak_queued.to_string(),
            b.peak_queued.to_string(),
        ),
        (
            "429s answered by kube-sim",
            d.upstream_429s.to_string(),
            b.upstream_429s.to_string(),
        ),
        (
            "kube-sim modeled CPU",
            format!("{:.1} s", d.upstream_cpu_s),
            format!("{:.1} s", b.upstream_cpu_s),
        ),
        (
            "admin probes (failed)",
            format!("{} ({})", d.admin_probes, d.admin_failures),
            format!("{} ({})", b.admin_probes, b.admin_failures),
        ),
        ("admin probe p50", ms(d.admin_p50_ms), ms(b.admin_p50_ms)),
        ("admin probe p99", ms(d.admin_p99_ms), ms(b.admin_p99_ms)),
        ("admin probe max", ms(d.admin_max_ms), ms(b.admin_max_ms)),
        (
            "rollback (DELETE DaemonSet) took",
            opt(d.rollback_ms, " ms"),
            opt(b.rollback_ms, " ms"),
        ),
        (
            "events lost (watching agent's view ≠ truth)",
            d.events_lost.to_string(),
            b.events_lost.to_string(),
        ),
        (
            "agents not watching/synced at the stop",
            d.agents_not_synced.to_string(),
            b.agents_not_synced.to_string(),
        ),
        (
            "run length",
            format!("{:.1} s", d.duration_s),
            format!("{:.1} s", b.duration_s),
        ),
    ];
    let mut s = String::new();
    s.push_str("# Incident lab: DaemonSet storm, direct vs through Breakwater\n\n");
    s.push_str(&format!("Run: {}.\n\n", c.opts_summary));
    s.push_str("| figure | direct | breakwater |\n|---|---:|---:|\n");
    for (name, dv, bv) in rows {
        s.push_str(&format!("| {name} | {dv} | {bv} |\n"));
    }
    s.push_str(
        "\nPlots: storm.png (all panels); inflight.png, watches.png, admin.png, agents.png.\n",
    );
    s
}

fn ms(v: f64) -> String {
    format!("{v:.1} ms")
}

/// One plotted line: label, colour, (t, y) points.
type Line = (&'static str, RGBColor, Vec<(f64, f64)>);

/// One panel: a quantity over time for both runs.
struct Panel {
    file: &'static str,
    title: &'static str,
    y_label: &'static str,
    log_y: bool,
    /// (label, colour, points) per line, per run.
    series: fn(&RunResult) -> Vec<Line>,
}

fn panels() -> Vec<Panel> {
    vec![
        Panel {
            file: "inflight.png",
            title: "kube-sim in-flight and queue",
            y_label: "requests",
            log_y: false,
            series: |r| {
                vec![
                    (
                        "in-flight (seats)",
                        BLUE,
                        r.samples.iter().map(|s| (s.t, s.inflight as f64)).collect(),
                    ),
                    (
                        "queued",
                        RED,
                        r.samples.iter().map(|s| (s.t, s.queued as f64)).collect(),
                    ),
                ]
            },
        },
        Panel {
            file: "watches.png",
            title: "pod watches open at kube-sim",
            y_label: "watches",
            log_y: false,
            series: |r| {
                vec![(
                    "upstream watches",
                    RGBColor(0, 130, 0),
                    r.samples
                        .iter()
                        .map(|s| (s.t, s.upstream_watches as f64))
                        .collect(),
                )]
            },
        },
        Panel {
            file: "admin.png",
            title: "admin probe latency (GET namespace, 100 ms)",
            y_label: "ms (log)",
            log_y: true,
            series: |r| {
                vec![(
                    "admin GET",
                    RGBColor(150, 0, 150),
                    r.probes.iter().map(|p| (p.t, p.ms.max(0.1))).collect(),
                )]
            },
        },
        Panel {
            file: "agents.png",
            title: "agents watching",
            y_label: "agents",
            log_y: false,
            series: |r| {
                vec![(
                    "agents watching",
                    RGBColor(0, 90, 200),
                    r.samples
                        .iter()
                        .map(|s| (s.t, s.agents_watching as f64))
                        .collect(),
                )]
            },
        },
    ]
}

fn register_font() {
    // Registering twice is harmless; the first registration wins.
    let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
}

/// Every panel as its own PNG, and all of them in storm.png.
fn plots(c: &Comparison, dir: &Path) -> anyhow::Result<()> {
    register_font();
    let runs = [&c.direct, &c.breakwater];
    let t_max = runs
        .iter()
        .flat_map(|r| r.samples.iter().map(|s| s.t))
        .fold(1.0, f64::max);
    for p in panels() {
        let path = dir.join(p.file);
        let root = BitMapBackend::new(&path, (1400, 450)).into_drawing_area();
        draw_panel(&root, &p, &runs, t_max).with_context(|| format!("draw {}", path.display()))?;
        root.present()
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("write {}", path.display()))?;
    }
    let path = dir.join("storm.png");
    let root = BitMapBackend::new(&path, (1400, 1800)).into_drawing_area();
    let rows = root.split_evenly((4, 1));
    for (area, p) in rows.iter().zip(panels()) {
        draw_panel(area, &p, &runs, t_max).context("draw storm.png")?;
    }
    root.present()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("write storm.png")?;
    Ok(())
}

fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    p: &Panel,
    runs: &[&RunResult; 2],
    t_max: f64,
) -> anyhow::Result<()> {
    let err = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("{e:?}");
    area.fill(&WHITE).map_err(err)?;
    let area = area.titled(p.title, (FAMILY, 24)).map_err(err)?;
    let halves = area.split_evenly((1, 2));
    let all: Vec<Vec<Line>> = runs.iter().map(|r| (p.series)(r)).collect();
    // One y range for both runs, so the halves compare at a glance.
    let y_max = all
        .iter()
        .flatten()
        .flat_map(|(_, _, pts)| pts.iter().map(|(_, y)| *y))
        .fold(1.0, f64::max)
        * 1.1;
    for ((half, run), lines) in halves.iter().zip(runs.iter()).zip(&all) {
        let caption = format!("{} ", run.mode.name());
        let mut b = ChartBuilder::on(half);
        b.caption(caption, (FAMILY, 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60);
        if p.log_y {
            let mut chart = b
                .build_cartesian_2d(0.0..t_max, (0.1..y_max).log_scale())
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("seconds since the storm began")
                .y_desc(p.y_label)
                .label_style((FAMILY, 13))
                .draw()
                .map_err(err)?;
            for (label, colour, pts) in lines {
                let c = *colour;
                chart
                    .draw_series(pts.iter().map(|&(x, y)| Circle::new((x, y), 2, c.filled())))
                    .map_err(err)?
                    .label(*label)
                    .legend(move |(x, y)| Circle::new((x + 10, y), 3, c.filled()));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font((FAMILY, 13))
                .draw()
                .map_err(err)?;
        } else {
            let mut chart = b.build_cartesian_2d(0.0..t_max, 0.0..y_max).map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("seconds since the storm began")
                .y_desc(p.y_label)
                .label_style((FAMILY, 13))
                .draw()
                .map_err(err)?;
            for (label, colour, pts) in lines {
                let c = *colour;
                chart
                    .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
                    .map_err(err)?
                    .label(*label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font((FAMILY, 13))
                .draw()
                .map_err(err)?;
        }
    }
    Ok(())
}

/// The figures as a one-line JSON object (for logs).
pub fn one_line(m: &RunMetrics) -> String {
    serde_json::to_string(m).unwrap_or_default()
}
