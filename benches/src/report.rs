//! The results, and how they are written: `report.md`, `report.json`, `chart.svg`.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Map, Value};

use crate::stats::Summary;

/// The scenario every throughput is compared with.
pub(crate) const BASELINE: &str = "raw_sql";
/// The baseline's figure.
pub(crate) const BASELINE_FIGURE: &str = "jobs_per_s";
/// Scenarios whose throughputs compare only among themselves (a single claim loop, not a
/// drain): no ratio to the baseline, no bars; their curves show them.
pub(crate) const OWN_SCALE: &[&str] = &["backlog", "xmin_pinned"];
/// The peer's scenario, and its figures that the ratios to the peer read: its bulk send,
/// pgbus's bulk send of the same jobs, and its drains (one per reader count).
pub(crate) const PEER: &str = "peer_pgmq";
pub(crate) const PEER_SEND: &str = "pgmq_send_batch_msgs_per_s";
pub(crate) const PEER_PGBUS_SEND: &str = "pgbus_send_batch_msgs_per_s";
pub(crate) const PEER_DRAIN_PREFIX: &str = "pgmq_drain_r";

/// What a figure measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    /// Jobs claimed, run and acked per second.
    JobsPerSec,
    /// Messages sent per second.
    MsgsPerSec,
    /// Milliseconds.
    Millis,
    /// Microseconds.
    Micros,
    /// Connections to the database.
    Connections,
    /// Kibibytes (of memory).
    KiB,
    /// Messages (a backlog).
    Messages,
    /// Table rows (dead tuples).
    Rows,
    /// Seconds.
    Seconds,
}

impl Unit {
    fn as_str(self) -> &'static str {
        match self {
            Unit::JobsPerSec => "jobs/s",
            Unit::MsgsPerSec => "msgs/s",
            Unit::Millis => "ms",
            Unit::Micros => "µs",
            Unit::Connections => "connections",
            Unit::KiB => "KiB",
            Unit::Messages => "messages",
            Unit::Rows => "rows",
            Unit::Seconds => "s",
        }
    }

    fn is_throughput(self) -> bool {
        matches!(self, Unit::JobsPerSec | Unit::MsgsPerSec)
    }

    fn format(self, value: f64) -> String {
        match self {
            Unit::JobsPerSec | Unit::MsgsPerSec | Unit::Messages | Unit::Rows => {
                thousands(value.round() as i64)
            }
            Unit::Seconds => format!("{value:.1}"),
            Unit::Millis if value < 10.0 => format!("{value:.2}"),
            Unit::Millis if value < 100.0 => format!("{value:.1}"),
            Unit::Millis => format!("{value:.0}"),
            Unit::Micros => format!("{value:.1}"),
            Unit::Connections if value.fract() == 0.0 => format!("{value:.0}"),
            Unit::Connections => format!("{value:.1}"),
            Unit::KiB => format!("{value:.1}"),
        }
    }
}

/// One measured quantity of a scenario, with one sample per run.
#[derive(Debug, Clone)]
pub(crate) struct Figure {
    /// Key in `report.json`.
    pub(crate) id: String,
    /// Row label in `report.md` and the chart.
    pub(crate) label: String,
    pub(crate) unit: Unit,
    pub(crate) samples: Vec<f64>,
    /// Shown beside the figure (e.g. "92% of ideal").
    pub(crate) note: Option<String>,
    /// Its median over the peer's (see [`Report::rate_against_peer`]).
    pub(crate) ratio_to_pgmq: Option<f64>,
}

impl Figure {
    pub(crate) fn new(
        id: impl Into<String>,
        label: impl Into<String>,
        unit: Unit,
        samples: Vec<f64>,
    ) -> Self {
        Figure {
            id: id.into(),
            label: label.into(),
            unit,
            samples,
            note: None,
            ratio_to_pgmq: None,
        }
    }

    pub(crate) fn summary(&self) -> Option<Summary> {
        Summary::of(&self.samples)
    }

    pub(crate) fn median(&self) -> Option<f64> {
        self.summary().map(|s| s.median)
    }
}

/// The results of one scenario.
#[derive(Debug, Clone)]
pub(crate) struct Scenario {
    pub(crate) name: &'static str,
    /// What was measured and how, in a sentence or two.
    pub(crate) description: String,
    /// Counts and worker settings.
    pub(crate) settings: Vec<(String, String)>,
    pub(crate) figures: Vec<Figure>,
    pub(crate) notes: Vec<String>,
    /// `drain` only: its throughput over `raw_sql`'s (medians).
    pub(crate) ratio_to_raw_sql: Option<f64>,
    /// `drain` only: its best throughput over the peer's best (medians).
    pub(crate) ratio_to_pgmq: Option<f64>,
    /// Line charts of some of its figures (`chart.svg`), beside the bars.
    pub(crate) curves: Vec<Curve>,
}

/// A line chart: each series' values (medians, whiskers min to max) over a quantity.
#[derive(Debug, Clone)]
pub(crate) struct Curve {
    pub(crate) title: String,
    /// The quantity along the x axis ("ready messages").
    pub(crate) x_label: String,
    /// Whether x runs on a log scale (over powers of ten) or linearly from 0.
    pub(crate) log_x: bool,
    pub(crate) unit: Unit,
    pub(crate) series: Vec<Series>,
}

/// One line of a [`Curve`]: `(x, value)` points.
#[derive(Debug, Clone)]
pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) points: Vec<(f64, Summary)>,
}

impl Scenario {
    pub(crate) fn new(name: &'static str, description: impl Into<String>) -> Self {
        Scenario {
            name,
            description: description.into(),
            settings: Vec::new(),
            figures: Vec::new(),
            notes: Vec::new(),
            ratio_to_raw_sql: None,
            ratio_to_pgmq: None,
            curves: Vec::new(),
        }
    }

    pub(crate) fn setting(&mut self, name: &str, value: impl ToString) {
        self.settings.push((name.to_owned(), value.to_string()));
    }

    pub(crate) fn figure(&self, id: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.id == id)
    }
}

/// A target from the benchmarks issue, checked against this run.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) target: String,
    pub(crate) measured: String,
    pub(crate) met: bool,
}

/// Everything one run of the harness found.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    /// `quick` or `full`.
    pub(crate) plan: &'static str,
    pub(crate) conditions: Vec<(String, String)>,
    pub(crate) scenarios: Vec<Scenario>,
    pub(crate) targets: Vec<Target>,
    /// Scenarios of the issue not measured by this harness yet, with the reason.
    pub(crate) not_measured: Vec<(String, String)>,
    pub(crate) wall: Duration,
}

impl Report {
    pub(crate) fn scenario(&self, name: &str) -> Option<&Scenario> {
        self.scenarios.iter().find(|s| s.name == name)
    }

    /// The baseline's median throughput.
    fn baseline(&self) -> Option<f64> {
        self.scenario(BASELINE)?.figure(BASELINE_FIGURE)?.median()
    }

    /// A jobs/s figure over the baseline, when both exist.
    fn ratio(&self, scenario: &Scenario, figure: &Figure) -> Option<f64> {
        if scenario.name == BASELINE
            || figure.unit != Unit::JobsPerSec
            || OWN_SCALE.contains(&scenario.name)
        {
            return None;
        }
        Some(figure.median()? / self.baseline()?)
    }

    /// Sets the ratios to the peer, when it ran: every `drain` throughput over the peer's
    /// best drain (its best reader count), `drain`'s best over the same (both sides' best
    /// settings), and pgbus's bulk send over the peer's (medians over medians).
    pub(crate) fn rate_against_peer(&mut self) {
        let Some(peer) = self.scenario(PEER) else {
            return;
        };
        let best_drain = peer
            .figures
            .iter()
            .filter(|f| f.id.starts_with(PEER_DRAIN_PREFIX))
            .filter_map(Figure::median)
            .reduce(f64::max);
        let send = peer.figure(PEER_SEND).and_then(Figure::median);
        for scenario in &mut self.scenarios {
            let (wanted, peer_median): (fn(&Figure) -> bool, _) = match scenario.name {
                "drain" => (|f| f.unit == Unit::JobsPerSec, best_drain),
                PEER => (|f| f.id == PEER_PGBUS_SEND, send),
                _ => continue,
            };
            let Some(peer_median) = peer_median else {
                continue;
            };
            for figure in scenario.figures.iter_mut().filter(|f| wanted(f)) {
                figure.ratio_to_pgmq = figure.median().map(|m| m / peer_median);
            }
            if scenario.name == "drain" {
                scenario.ratio_to_pgmq = scenario
                    .figures
                    .iter()
                    .filter_map(|f| f.ratio_to_pgmq)
                    .reduce(f64::max);
            }
        }
    }

    /// Writes `report.md`, `report.json` and `chart.svg` into `dir`.
    pub(crate) fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("could not create {}", dir.display()))?;
        let json = serde_json::to_string_pretty(&self.json())?;
        for (name, text) in [
            ("report.md", self.markdown()),
            ("report.json", json + "\n"),
            ("chart.svg", self.chart()),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text)
                .with_context(|| format!("could not write {}", path.display()))?;
        }
        Ok(())
    }

    pub(crate) fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# pgbus benchmarks ({} run)\n", self.plan);
        let _ = writeln!(
            md,
            "Produced by `cargo xtask bench{}` in {:.0} s. Every scenario ran several times on a \
             fresh database; figures are the median of the runs, with the minimum and maximum. \
             Throughputs in jobs/s are also given as a ratio to the `raw_sql` baseline (a plain \
             claim/ack loop on tokio-postgres with no pgbus code).\n",
            if self.plan == "quick" { " --quick" } else { "" },
            self.wall.as_secs_f64()
        );
        md.push_str("## Conditions\n\n| | |\n|---|---|\n");
        for (name, value) in &self.conditions {
            let _ = writeln!(md, "| {name} | {value} |");
        }
        if !self.targets.is_empty() {
            md.push_str("\n## Targets\n\n| target | measured | met |\n|---|---|---|\n");
            for t in &self.targets {
                let met = if t.met { "yes" } else { "**no**" };
                let _ = writeln!(md, "| {} | {} | {met} |", t.target, t.measured);
            }
        }
        for scenario in &self.scenarios {
            let _ = writeln!(md, "\n## `{}`\n\n{}\n", scenario.name, scenario.description);
            for (name, value) in &scenario.settings {
                let _ = writeln!(md, "- {name}: {value}");
            }
            if !scenario.settings.is_empty() {
                md.push('\n');
            }
            md.push_str("| figure | median | min | max | unit | runs | |\n");
            md.push_str("|---|---:|---:|---:|---|---:|---|\n");
            for figure in &scenario.figures {
                let Some(s) = figure.summary() else {
                    let _ = writeln!(
                        md,
                        "| {} | – | – | – | {} | 0 | |",
                        figure.label,
                        figure.unit.as_str()
                    );
                    continue;
                };
                let mut remarks = Vec::new();
                if let Some(ratio) = self.ratio(scenario, figure) {
                    remarks.push(format!("{ratio:.2}× raw_sql"));
                }
                if let Some(ratio) = figure.ratio_to_pgmq {
                    remarks.push(format!("{ratio:.2}× pgmq"));
                }
                remarks.extend(figure.note.clone());
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    figure.label,
                    figure.unit.format(s.median),
                    figure.unit.format(s.min),
                    figure.unit.format(s.max),
                    figure.unit.as_str(),
                    figure.samples.len(),
                    remarks.join("; ")
                );
            }
            if let Some(ratio) = scenario.ratio_to_raw_sql {
                let _ = writeln!(
                    md,
                    "\n`ratio_to_raw_sql` (median over median): **{ratio:.2}**"
                );
            }
            if let Some(ratio) = scenario.ratio_to_pgmq {
                let _ = writeln!(
                    md,
                    "\n`ratio_to_pgmq` (best median over the peer's best median): \
                     **{ratio:.2}**"
                );
            }
            if !scenario.notes.is_empty() {
                md.push('\n');
                for note in &scenario.notes {
                    let _ = writeln!(md, "- {note}");
                }
            }
        }
        if !self.not_measured.is_empty() {
            md.push_str("\n## Not measured yet\n\n");
            for (name, reason) in &self.not_measured {
                let _ = writeln!(md, "- `{name}`: {reason}");
            }
        }
        md.push_str("\nChart: `chart.svg`. Raw figures of every run: `report.json`.\n");
        md
    }

    pub(crate) fn json(&self) -> Value {
        let scenarios: Vec<Value> = self
            .scenarios
            .iter()
            .map(|scenario| {
                let figures: Vec<Value> = scenario
                    .figures
                    .iter()
                    .map(|figure| {
                        let s = figure.summary();
                        let mut entry = json!({
                            "id": figure.id,
                            "label": figure.label,
                            "unit": figure.unit.as_str(),
                            "median": s.map(|s| s.median),
                            "min": s.map(|s| s.min),
                            "max": s.map(|s| s.max),
                            "runs": figure.samples.len(),
                            "samples": figure.samples,
                        });
                        if let Some(ratio) = self.ratio(scenario, figure) {
                            entry["ratio_to_raw_sql"] = json!(ratio);
                        }
                        if let Some(ratio) = figure.ratio_to_pgmq {
                            entry["ratio_to_pgmq"] = json!(ratio);
                        }
                        if let Some(note) = &figure.note {
                            entry["note"] = json!(note);
                        }
                        entry
                    })
                    .collect();
                let mut entry = json!({
                    "name": scenario.name,
                    "description": scenario.description,
                    "settings": pairs(&scenario.settings),
                    "figures": figures,
                    "notes": scenario.notes,
                });
                if let Some(ratio) = scenario.ratio_to_raw_sql {
                    entry["ratio_to_raw_sql"] = json!(ratio);
                }
                if let Some(ratio) = scenario.ratio_to_pgmq {
                    entry["ratio_to_pgmq"] = json!(ratio);
                }
                entry
            })
            .collect();
        json!({
            "plan": self.plan,
            "wall_seconds": self.wall.as_secs_f64(),
            "conditions": pairs(&self.conditions),
            "scenarios": scenarios,
            "targets": self.targets.iter().map(|t| json!({
                "target": t.target, "measured": t.measured, "met": t.met,
            })).collect::<Vec<_>>(),
            "not_measured": self.not_measured.iter().map(|(name, reason)| json!({
                "scenario": name, "reason": reason,
            })).collect::<Vec<_>>(),
        })
    }

    /// Two horizontal bar charts on log scales: throughputs, then latencies; bars are
    /// medians, whiskers span min to max.
    pub(crate) fn chart(&self) -> String {
        let mut panels = Vec::new();
        for (title, wanted) in [
            (
                "Throughput (median; whiskers: min to max; log scale)",
                (|_, unit| unit.is_throughput()) as fn(&str, Unit) -> bool,
            ),
            (
                "Enqueue-to-start latency in ms (median of runs; whiskers: min to max; log \
                 scale)",
                |scenario, unit| scenario == "latency" && unit == Unit::Millis,
            ),
        ] {
            let bars: Vec<Bar> = self
                .scenarios
                .iter()
                .flat_map(|scenario| {
                    scenario
                        .figures
                        .iter()
                        .filter(|f| wanted(scenario.name, f.unit))
                        .filter(|_| !OWN_SCALE.contains(&scenario.name))
                        .filter_map(|figure| {
                            let s = figure.summary()?;
                            Some(Bar {
                                label: format!("{}: {}", scenario.name, figure.label)
                                    .replace('`', ""),
                                value: format!(
                                    "{} {}",
                                    figure.unit.format(s.median),
                                    figure.unit.as_str()
                                ),
                                summary: s,
                                color: color(scenario.name, &figure.label),
                            })
                        })
                })
                .collect();
            if !bars.is_empty() {
                panels.push((title, bars));
            }
        }
        let curves: Vec<&Curve> = self
            .scenarios
            .iter()
            .flat_map(|scenario| &scenario.curves)
            .filter(|curve| curve.series.iter().any(|s| !s.points.is_empty()))
            .collect();
        svg(
            &format!("pgbus benchmarks ({} run)", self.plan),
            &panels,
            &curves,
        )
    }
}

/// Colours of a curve's lines, in order.
const PALETTE: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

fn pairs(pairs: &[(String, String)]) -> Value {
    Value::Object(
        pairs
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect::<Map<_, _>>(),
    )
}

/// `n` with a comma between each group of three digits.
pub(crate) fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        out.insert(0, '-');
    }
    out
}

struct Bar {
    label: String,
    value: String,
    summary: Summary,
    color: &'static str,
}

fn color(scenario: &str, label: &str) -> &'static str {
    match scenario {
        "raw_sql" => "#7f7f7f",
        "drain" => "#1f77b4",
        "enqueue" => "#2ca02c",
        "io_bound" if label.starts_with("threads") => "#9467bd",
        "io_bound" => "#ff7f0e",
        "latency" => "#d62728",
        "stream_publish" => "#8c564b",
        PEER => "#bcbd22",
        _ => "#17becf",
    }
}

const WIDTH: f64 = 960.0;
const LABEL_WIDTH: f64 = 330.0;
const VALUE_WIDTH: f64 = 130.0;
const BAR_HEIGHT: f64 = 16.0;
const ROW: f64 = 22.0;

fn svg(title: &str, panels: &[(&str, Vec<Bar>)], curves: &[&Curve]) -> String {
    let plot_left = LABEL_WIDTH;
    let plot_width = WIDTH - LABEL_WIDTH - VALUE_WIDTH;
    let mut body = String::new();
    let mut y = 40.0;
    let _ = writeln!(
        body,
        r#"<text x="{}" y="24" font-size="16" font-weight="bold" text-anchor="middle">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    for (panel_title, bars) in panels {
        y += 20.0;
        let _ = writeln!(
            body,
            r#"<text x="10" y="{y}" font-size="13" font-weight="bold">{}</text>"#,
            escape(panel_title)
        );
        y += 10.0;
        let positive = |v: f64| if v > 0.0 { Some(v) } else { None };
        let lo = bars
            .iter()
            .filter_map(|b| positive(b.summary.min))
            .fold(f64::INFINITY, f64::min);
        let hi = bars
            .iter()
            .filter_map(|b| positive(b.summary.max))
            .fold(0.0, f64::max);
        let (lo, hi) = if lo.is_finite() && hi > 0.0 {
            let lo = 10f64.powf(lo.log10().floor());
            let hi = 10f64.powf(hi.log10().ceil()).max(lo * 10.0);
            (lo, hi)
        } else {
            (1.0, 10.0)
        };
        let x = |v: f64| {
            let v = v.clamp(lo, hi);
            plot_left + plot_width * (v.log10() - lo.log10()) / (hi.log10() - lo.log10())
        };
        let top = y;
        let bottom = y + ROW * bars.len() as f64 + 4.0;
        // Grid lines and labels at powers of ten.
        let mut tick = lo;
        while tick <= hi * 1.000_001 {
            let tx = x(tick);
            let _ = writeln!(
                body,
                r##"<line x1="{tx:.1}" y1="{top}" x2="{tx:.1}" y2="{bottom}" stroke="#dddddd"/>"##
            );
            let _ = writeln!(
                body,
                r##"<text x="{tx:.1}" y="{}" font-size="10" fill="#555555" text-anchor="middle">{}</text>"##,
                bottom + 12.0,
                tick_label(tick)
            );
            tick *= 10.0;
        }
        for bar in bars {
            let bar_y = y + (ROW - BAR_HEIGHT) / 2.0;
            let mid = bar_y + BAR_HEIGHT / 2.0;
            let end = x(bar.summary.median);
            let _ = writeln!(
                body,
                r#"<text x="{}" y="{}" font-size="11" text-anchor="end">{}</text>"#,
                plot_left - 6.0,
                mid + 4.0,
                escape(&bar.label)
            );
            let _ = writeln!(
                body,
                r#"<rect x="{plot_left}" y="{bar_y}" width="{:.1}" height="{BAR_HEIGHT}" fill="{}"/>"#,
                (end - plot_left).max(1.0),
                bar.color
            );
            let (wmin, wmax) = (x(bar.summary.min), x(bar.summary.max));
            let _ = writeln!(
                body,
                r##"<line x1="{wmin:.1}" y1="{mid}" x2="{wmax:.1}" y2="{mid}" stroke="#222222"/><line x1="{wmin:.1}" y1="{}" x2="{wmin:.1}" y2="{}" stroke="#222222"/><line x1="{wmax:.1}" y1="{}" x2="{wmax:.1}" y2="{}" stroke="#222222"/>"##,
                mid - 4.0,
                mid + 4.0,
                mid - 4.0,
                mid + 4.0
            );
            let _ = writeln!(
                body,
                r#"<text x="{:.1}" y="{}" font-size="11">{}</text>"#,
                wmax.max(end) + 6.0,
                mid + 4.0,
                escape(&bar.value)
            );
            y += ROW;
        }
        y = bottom + 24.0;
    }
    for curve in curves {
        y = draw_curve(&mut body, y, curve);
    }
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         viewBox=\"0 0 {WIDTH} {height}\" font-family=\"sans-serif\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{body}</svg>\n",
        height = y + 10.0
    )
}

/// Height of a curve's plot area, and its left margin (the y axis's labels).
const CURVE_HEIGHT: f64 = 200.0;
const CURVE_LEFT: f64 = 80.0;
/// Width kept right of a curve's plot for its legend.
const LEGEND_WIDTH: f64 = 260.0;

/// Draws a line chart below `y` (x on a log scale over powers of ten, or linear from 0; y
/// linear from 0); returns where the next panel starts.
fn draw_curve(body: &mut String, y: f64, curve: &Curve) -> f64 {
    let title_y = y + 20.0;
    let _ = writeln!(
        body,
        r#"<text x="10" y="{title_y}" font-size="13" font-weight="bold">{}</text>"#,
        escape(&curve.title)
    );
    let (top, left) = (title_y + 16.0, CURVE_LEFT);
    let (width, bottom) = (WIDTH - CURVE_LEFT - LEGEND_WIDTH, top + CURVE_HEIGHT);
    let points = || curve.series.iter().flat_map(|series| &series.points);
    let x_max = points().map(|(x, _)| *x).fold(0.0, f64::max);
    // The x axis: where a value lands, and the gridlines.
    let (px, x_ticks): (Box<dyn Fn(f64) -> f64>, Vec<f64>) = if curve.log_x {
        let x_min = points()
            .map(|(x, _)| *x)
            .filter(|x| *x > 0.0)
            .fold(f64::INFINITY, f64::min);
        let lo = 10f64.powf(x_min.log10().floor());
        let hi = 10f64.powf(x_max.log10().ceil()).max(lo * 10.0);
        let ticks = std::iter::successors(Some(lo), |t| Some(t * 10.0))
            .take_while(|t| *t <= hi * 1.000_001)
            .collect();
        let span = hi.log10() - lo.log10();
        (
            Box::new(move |x: f64| left + width * (x.clamp(lo, hi).log10() - lo.log10()) / span),
            ticks,
        )
    } else {
        let hi = nice_ceiling(x_max);
        let ticks = (0..=4).map(|step| hi * f64::from(step) / 4.0).collect();
        (
            Box::new(move |x: f64| left + width * (x / hi).clamp(0.0, 1.0)),
            ticks,
        )
    };
    let y_max = nice_ceiling(points().map(|(_, s)| s.max).fold(0.0, f64::max));
    let py = |v: f64| bottom - CURVE_HEIGHT * (v / y_max).clamp(0.0, 1.0);
    for tick in x_ticks {
        let tx = px(tick);
        let _ = writeln!(
            body,
            r##"<line x1="{tx:.1}" y1="{top}" x2="{tx:.1}" y2="{bottom}" stroke="#dddddd"/><text x="{tx:.1}" y="{}" font-size="10" fill="#555555" text-anchor="middle">{}</text>"##,
            bottom + 12.0,
            tick_label(tick)
        );
    }
    for step in 0..=4 {
        let value = y_max * f64::from(step) / 4.0;
        let ty = py(value);
        let _ = writeln!(
            body,
            r##"<line x1="{left}" y1="{ty:.1}" x2="{:.1}" y2="{ty:.1}" stroke="#eeeeee"/><text x="{:.1}" y="{:.1}" font-size="10" fill="#555555" text-anchor="end">{}</text>"##,
            left + width,
            left - 4.0,
            ty + 3.0,
            curve.unit.format(value)
        );
    }
    let _ = writeln!(
        body,
        r##"<text x="{:.1}" y="{}" font-size="11" text-anchor="middle">{}{}; y: {}</text>"##,
        left + width / 2.0,
        bottom + 28.0,
        escape(&curve.x_label),
        if curve.log_x { " (log scale)" } else { "" },
        curve.unit.as_str()
    );
    for (i, series) in curve.series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let mut sorted = series.points.clone();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        let path: Vec<String> = sorted
            .iter()
            .map(|(x, s)| format!("{:.1},{:.1}", px(*x), py(s.median)))
            .collect();
        let _ = writeln!(
            body,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            path.join(" ")
        );
        // Markers and whiskers where the points are few enough to see.
        if sorted.len() <= 20 {
            for (x, s) in &sorted {
                let (cx, cy) = (px(*x), py(s.median));
                let _ = writeln!(
                    body,
                    r#"<line x1="{cx:.1}" y1="{:.1}" x2="{cx:.1}" y2="{:.1}" stroke="{color}"/><circle cx="{cx:.1}" cy="{cy:.1}" r="3.5" fill="{color}"/>"#,
                    py(s.min),
                    py(s.max)
                );
            }
        }
        let ly = top + 10.0 + 18.0 * i as f64;
        let lx = left + width + 16.0;
        let _ = writeln!(
            body,
            r#"<circle cx="{lx:.1}" cy="{ly:.1}" r="4" fill="{color}"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
            lx + 10.0,
            ly + 4.0,
            escape(&series.name)
        );
    }
    bottom + 44.0
}

/// The smallest of 1, 2, 2.5, 4, 5 or 8 times a power of ten at or above `value` (which is
/// then divided into four gridlines with short labels); 1 for nothing positive.
fn nice_ceiling(value: f64) -> f64 {
    if value <= 0.0 || !value.is_finite() {
        return 1.0;
    }
    let power = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 2.5, 4.0, 5.0, 8.0, 10.0]
        .into_iter()
        .map(|step| step * power)
        .find(|nice| *nice >= value)
        .unwrap_or(10.0 * power)
}

fn tick_label(value: f64) -> String {
    if value >= 1.0 {
        thousands(value.round() as i64)
    } else {
        format!("{value}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let mut raw = Scenario::new("raw_sql", "baseline");
        raw.figures.push(Figure::new(
            BASELINE_FIGURE,
            "drain",
            Unit::JobsPerSec,
            vec![1000.0, 1200.0, 1100.0],
        ));
        let mut drain = Scenario::new("drain", "pgbus workers");
        drain.figures.push(Figure::new(
            "jobs_per_s",
            "<2 workers> & co",
            Unit::JobsPerSec,
            vec![2200.0, 2000.0, 2400.0],
        ));
        drain.ratio_to_raw_sql = Some(2.0);
        let mut latency = Scenario::new("latency", "latency");
        latency.figures.push(Figure::new(
            "listen_p50_ms",
            "LISTEN p50",
            Unit::Millis,
            vec![1.5, 2.5, 2.0],
        ));
        Report {
            plan: "quick",
            conditions: vec![("cores".into(), "2".into())],
            scenarios: vec![raw, drain, latency],
            targets: Vec::new(),
            not_measured: vec![("groups".into(), "not built yet".into())],
            wall: Duration::from_secs(60),
        }
    }

    #[test]
    fn markdown_has_medians_ranges_and_ratios() {
        let md = report().markdown();
        assert!(
            md.contains(
                "| <2 workers> & co | 2,200 | 2,000 | 2,400 | jobs/s | 3 | 2.00× raw_sql |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| LISTEN p50 | 2.00 | 1.50 | 2.50 | ms | 3 |"),
            "{md}"
        );
        assert!(md.contains("`groups`: not built yet"), "{md}");
    }

    #[test]
    fn json_has_one_entry_per_scenario_and_the_drain_ratio() {
        let json = report().json();
        let scenarios = json["scenarios"].as_array().unwrap();
        assert_eq!(scenarios.len(), 3);
        assert_eq!(scenarios[1]["name"], "drain");
        assert_eq!(scenarios[1]["ratio_to_raw_sql"], 2.0);
        assert_eq!(scenarios[1]["figures"][0]["median"], 2200.0);
        assert_eq!(
            scenarios[1]["figures"][0]["ratio_to_raw_sql"],
            2200.0 / 1100.0
        );
        assert_eq!(scenarios[0]["figures"][0]["min"], 1000.0);
    }

    #[test]
    fn chart_escapes_labels_and_draws_every_bar() {
        let svg = report().chart();
        assert!(svg.starts_with("<?xml"));
        assert_eq!(
            svg.matches("<rect ").count(),
            1 + 3,
            "background and three bars"
        );
        assert!(svg.contains("drain: &lt;2 workers&gt; &amp; co"), "{svg}");
        assert!(svg.contains("latency in ms"));
    }

    #[test]
    fn formats_numbers() {
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(999), "999");
        assert_eq!(Unit::Millis.format(1.234), "1.23");
        assert_eq!(Unit::Millis.format(512.4), "512");
        assert_eq!(Unit::Connections.format(4.0), "4");
        assert_eq!(nice_ceiling(29_028.0), 40_000.0);
        assert_eq!(nice_ceiling(8.78), 10.0);
        assert_eq!(nice_ceiling(2.0), 2.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
    }

    #[test]
    fn chart_draws_curves_and_ratios_to_the_peer() {
        let mut report = report();
        let mut peer = Scenario::new(PEER, "peer");
        for (id, median) in [
            (PEER_SEND, 100.0),
            (PEER_PGBUS_SEND, 50.0),
            ("pgmq_drain_r2_jobs_per_s", 1000.0),
            ("pgmq_drain_r4_jobs_per_s", 1100.0),
        ] {
            let unit = if id.contains("drain") {
                Unit::JobsPerSec
            } else {
                Unit::MsgsPerSec
            };
            peer.figures.push(Figure::new(id, id, unit, vec![median]));
        }
        let mut backlog = Scenario::new("backlog", "curve");
        for (id, value) in [("a", 10.0), ("b", 8.0)] {
            backlog
                .figures
                .push(Figure::new(id, id, Unit::JobsPerSec, vec![value]));
        }
        let points = backlog
            .figures
            .iter()
            .zip([10_000.0, 100_000.0])
            .map(|(f, x)| (x, f.summary().unwrap()))
            .collect();
        backlog.curves.push(Curve {
            title: "a curve".to_owned(),
            x_label: "ready".to_owned(),
            log_x: true,
            unit: Unit::JobsPerSec,
            series: vec![Series {
                name: "ready only".to_owned(),
                points,
            }],
        });
        report.scenarios.push(peer);
        report.scenarios.push(backlog);
        report.rate_against_peer();
        let drain = report.scenario("drain").unwrap();
        assert_eq!(drain.ratio_to_pgmq, Some(2200.0 / 1100.0), "best over best");
        let peer = report.scenario(PEER).unwrap();
        assert_eq!(
            peer.figure(PEER_PGBUS_SEND).unwrap().ratio_to_pgmq,
            Some(0.5)
        );
        assert_eq!(peer.figure(PEER_SEND).unwrap().ratio_to_pgmq, None);
        let md = report.markdown();
        assert!(md.contains("2.00× pgmq"), "{md}");
        assert!(
            md.contains("| a | 10 | 10 | 10 | jobs/s | 1 |  |"),
            "no raw_sql ratio: {md}"
        );
        let svg = report.chart();
        assert!(svg.contains("<polyline"), "{svg}");
        assert!(svg.contains(">ready only</text>"), "{svg}");
        assert!(
            !svg.contains("backlog: a"),
            "a curve's figures get no bars: {svg}"
        );
    }
}
