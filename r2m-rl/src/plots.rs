//! Line charts written as both PNG and SVG, and the plots of an RL run.
//!
//! - [`line_chart`] draws a [`Chart`] (title, axis labels, legend, tick labels; each [`Series`] a
//!   line, optionally with a shaded band such as min..max over seeds) into `<stem>.png` and
//!   `<stem>.svg`;
//! - [`plot_run`] reads a run's `metrics.jsonl` and writes `reward`, `kl`, `response_len` and
//!   `rm_loss` charts against the RL step.
//!
//! Everything is pure Rust (plotters with its bitmap, SVG and `ab_glyph` text backends): no
//! freetype or fontconfig. Text is rendered with DejaVu Sans 2.37, embedded below and registered
//! once. Its license (Bitstream Vera + Arev, redistribution allowed, copy included as
//! `r2m-rl/assets/DejaVuSans-LICENSE.txt`) permits bundling the unmodified font with software.
//!
//! Degenerate inputs never panic: non-finite values are skipped, a constant or single-valued axis
//! is padded, series without points are left out, and a chart with no data at all gets empty axes
//! with a "no data" note.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use r2m_core::{R2mError, Result};

/// DejaVu Sans 2.37, unmodified (Debian fonts-dejavu-core 2.37-6, sha256 abdc775b…8322).
/// License: Bitstream Vera Fonts license + Arev Fonts license (DejaVu changes are public domain);
/// both allow redistribution with software as long as the notice travels with it, see
/// `assets/DejaVuSans-LICENSE.txt`.
static FONT_TTF: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// The font family every text in the charts uses.
const FONT: &str = "sans-serif";

/// Size of every chart, in pixels (PNG) or user units (SVG).
const SIZE: (u32, u32) = (1024, 640);

/// A distinct, colour-blind-friendly palette (Tableau 10).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One line of a chart.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    /// The legend entry.
    pub name: String,
    /// `(x, y)` points, drawn in the given order; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
    /// optional band (x, lo, hi), e.g. min..max over seeds
    pub band: Option<Vec<(f64, f64, f64)>>,
}

impl Series {
    /// A series without a band.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
            band: None,
        }
    }
}

/// A line chart: title, axis labels and its series.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

/// Registers the embedded font once (for every family name plotters may ask for).
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            for family in [FONT, "serif", "monospace"] {
                plotters::style::register_font(family, FontStyle::Normal, FONT_TTF)
                    .map_err(|_| "the embedded DejaVu Sans font cannot be parsed".to_string())?;
            }
            Ok(())
        })
        .clone()
        .map_err(R2mError::Other)
}

/// A series with only its finite points and band entries (band sorted by x, lo <= hi).
struct Clean<'a> {
    name: &'a str,
    points: Vec<(f64, f64)>,
    band: Vec<(f64, f64, f64)>,
}

fn clean(s: &Series) -> Clean<'_> {
    let points = s
        .points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let mut band: Vec<(f64, f64, f64)> = s
        .band
        .iter()
        .flatten()
        .copied()
        .filter(|(x, lo, hi)| x.is_finite() && lo.is_finite() && hi.is_finite())
        .map(|(x, lo, hi)| (x, lo.min(hi), lo.max(hi)))
        .collect();
    band.sort_by(|a, b| a.0.total_cmp(&b.0));
    Clean {
        name: &s.name,
        points,
        band,
    }
}

/// The `(lo, hi)` axis range over `values`, padded so that it is never empty or degenerate and
/// never overflows; `pad_frac` of the span is added on both sides.
fn axis_range(values: impl Iterator<Item = f64>, pad_frac: f64) -> (f64, f64) {
    // Keep spans finite even for values near f64::MAX.
    const LIMIT: f64 = f64::MAX / 8.0;
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values {
        lo = lo.min(v.clamp(-LIMIT, LIMIT));
        hi = hi.max(v.clamp(-LIMIT, LIMIT));
    }
    if lo > hi {
        return (0.0, 1.0); // no values at all
    }
    let mag = lo.abs().max(hi.abs());
    let span = hi - lo;
    if span <= mag * 1e-9 || span == 0.0 {
        // Constant (or numerically constant) values: centre them in a visible range.
        let pad = if mag > 0.0 { mag * 0.1 } else { 1.0 };
        let mid = lo + span / 2.0;
        return (mid - pad, mid + pad);
    }
    (lo - span * pad_frac, hi + span * pad_frac)
}

/// Formats tick labels with a precision that matches the tick spacing plotters picks for
/// `range` with at most `max_ticks` ticks (steps of 1, 2 or 5 times a power of ten), switching to
/// scientific notation for very large or very small magnitudes.
fn tick_formatter(range: (f64, f64), max_ticks: usize) -> impl Fn(&f64) -> String {
    let span = (range.1 - range.0).abs();
    let mag = range.0.abs().max(range.1.abs());
    let raw = span / max_ticks.max(2) as f64;
    let base = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * base)
        .find(|s| span / s + 1.0 <= max_ticks as f64 + 0.5)
        .unwrap_or(10.0 * base);
    let scientific = mag >= 1e6 || (mag > 0.0 && mag < 1e-3);
    let decimals = (-step.log10().floor()).clamp(0.0, 12.0) as usize;
    // Mantissa decimals: as many as the step needs below the largest magnitude's exponent.
    let sci_decimals = (mag.log10().floor() - step.log10().floor()).clamp(0.0, 8.0) as usize;
    move |v: &f64| {
        let v = if v.abs() < step * 1e-6 { 0.0 } else { *v };
        if scientific && v != 0.0 {
            format!("{v:.sci_decimals$e}")
        } else {
            format!("{v:.decimals$}")
        }
    }
}

/// The legend corner that covers the fewest points (legend boxes sit in a corner of the plot).
fn legend_corner(series: &[Clean<'_>], xr: (f64, f64), yr: (f64, f64)) -> SeriesLabelPosition {
    let n = series.len() as f64;
    // Rough legend footprint, as a fraction of the plotting area.
    let (w, h) = (0.35, (0.07 * n + 0.04).min(0.9));
    let candidates = [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    let count = |right: bool, upper: bool| {
        series
            .iter()
            .flat_map(|s| {
                s.points
                    .iter()
                    .copied()
                    .chain(s.band.iter().flat_map(|&(x, lo, hi)| [(x, lo), (x, hi)]))
            })
            .filter(|&(x, y)| {
                let fx = (x - xr.0) / (xr.1 - xr.0);
                let fy = (y - yr.0) / (yr.1 - yr.0);
                let in_x = if right { fx >= 1.0 - w } else { fx <= w };
                let in_y = if upper { fy >= 1.0 - h } else { fy <= h };
                in_x && in_y
            })
            .count()
    };
    candidates
        .into_iter()
        .min_by_key(|&(_, right, upper)| count(right, upper))
        .map(|(pos, _, _)| pos)
        .unwrap_or(SeriesLabelPosition::UpperRight)
}

/// Draws `chart` on `root` (any backend: the same code writes the PNG and the SVG).
/// The axes' ranges over every point and band of `series`. A little x padding keeps the
/// markers of the first and last points inside the frame.
fn data_ranges(series: &[Clean<'_>]) -> ((f64, f64), (f64, f64)) {
    let xs = series.iter().flat_map(|s| {
        let band = s.band.iter().map(|b| b.0);
        s.points.iter().map(|p| p.0).chain(band)
    });
    let ys = series.iter().flat_map(|s| {
        let band = s.band.iter().flat_map(|b| [b.1, b.2]);
        s.points.iter().map(|p| p.1).chain(band)
    });
    (axis_range(xs, 0.01), axis_range(ys, 0.05))
}

/// "no data", centred at `(x, y)`, for a chart without points.
fn no_data(x: f64, y: f64) -> Text<'static, (f64, f64), &'static str> {
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    let style = (FONT, 22)
        .into_font()
        .color(&RGBColor(120, 120, 120))
        .pos(Pos::new(HPos::Center, VPos::Center));
    Text::new("no data", (x, y), style)
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    chart: &Chart,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let series: Vec<Clean<'_>> = chart
        .series
        .iter()
        .map(clean)
        .filter(|s| !s.points.is_empty() || !s.band.is_empty())
        .collect();
    let (xr, yr) = data_ranges(&series);
    const X_TICKS: usize = 10;
    const Y_TICKS: usize = 8;
    let x_fmt = tick_formatter(xr, X_TICKS);
    let y_fmt = tick_formatter(yr, Y_TICKS);

    root.fill(&WHITE)?;
    let mut ctx = ChartBuilder::on(root)
        .caption(&chart.title, (FONT, 28).into_font().color(&BLACK))
        .margin(16)
        .x_label_area_size(56)
        .y_label_area_size(96)
        .build_cartesian_2d(xr.0..xr.1, yr.0..yr.1)?;
    ctx.configure_mesh()
        .x_labels(X_TICKS)
        .y_labels(Y_TICKS)
        .x_desc(chart.x_label.as_str())
        .y_desc(chart.y_label.as_str())
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .label_style((FONT, 16).into_font().color(&BLACK))
        .axis_desc_style((FONT, 20).into_font().color(&BLACK))
        .max_light_lines(2)
        .light_line_style(RGBColor(238, 238, 238))
        .bold_line_style(RGBColor(205, 205, 205))
        .axis_style(BLACK)
        .draw()?;

    if series.is_empty() {
        ctx.plotting_area()
            .draw(&no_data((xr.0 + xr.1) / 2.0, (yr.0 + yr.1) / 2.0))?;
        return root.present();
    }

    // Bands first, so that every line is drawn on top of every band.
    for (i, s) in series.iter().enumerate() {
        if s.band.len() >= 2 {
            let color = PALETTE[i % PALETTE.len()];
            let outline: Vec<(f64, f64)> = s
                .band
                .iter()
                .map(|&(x, _, hi)| (x, hi))
                .chain(s.band.iter().rev().map(|&(x, lo, _)| (x, lo)))
                .collect();
            ctx.draw_series(std::iter::once(Polygon::new(
                outline,
                color.mix(0.2).filled(),
            )))?;
        }
    }
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let line = color.stroke_width(2);
        let anno = ctx.draw_series(LineSeries::new(s.points.iter().copied(), line))?;
        anno.label(s.name).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
        });
        // Markers make short series (and single points, which draw no line) visible.
        if s.points.len() <= 40 {
            ctx.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    ctx.configure_series_labels()
        .position(legend_corner(&series, xr, yr))
        .label_font((FONT, 16).into_font().color(&BLACK))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .margin(12)
        .draw()?;
    root.present()
}

/// Writes `<stem>.png` and `<stem>.svg` in `dir` (created if missing); returns both paths.
pub fn line_chart(dir: &Path, stem: &str, chart: &Chart) -> Result<Vec<PathBuf>> {
    ensure_font()?;
    std::fs::create_dir_all(dir).map_err(|e| R2mError::io(dir, e))?;
    let png = dir.join(format!("{stem}.png"));
    let svg = dir.join(format!("{stem}.svg"));
    let failed = |path: &Path, e: &dyn std::fmt::Display| {
        R2mError::Other(format!("{}: cannot draw the chart: {e}", path.display()))
    };

    {
        let root = BitMapBackend::new(&png, SIZE).into_drawing_area();
        draw(&root, chart).map_err(|e| failed(&png, &e))?;
    }

    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, SIZE).into_drawing_area();
        draw(&root, chart).map_err(|e| failed(&svg, &e))?;
    }
    std::fs::write(&svg, text).map_err(|e| R2mError::io(&svg, e))?;
    Ok(vec![png, svg])
}

/// One parsed metrics line: its step and its JSON object.
type Row = (f64, serde_json::Map<String, serde_json::Value>);

/// Reads `metrics.jsonl`; a step that appears twice (a resumed run re-doing steps) keeps its last
/// line. Lines without a numeric `step` are skipped; a line that is not a JSON object is an error.
fn read_metrics(path: &Path) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).map_err(|e| R2mError::io(path, e))?;
    let mut rows: Vec<Row> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| R2mError::format(path, format!("line {}: invalid JSON: {e}", i + 1)))?;
        let serde_json::Value::Object(obj) = value else {
            return Err(R2mError::format(
                path,
                format!("line {}: expected a JSON object", i + 1),
            ));
        };
        if let Some(step) = obj
            .get("step")
            .and_then(|v| v.as_f64())
            .filter(|s| s.is_finite())
        {
            rows.push((step, obj));
        }
    }
    // Stable sort, then keep the last line of each step.
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out: Vec<Row> = Vec::with_capacity(rows.len());
    for row in rows {
        match out.last_mut() {
            Some(last) if last.0 == row.0 => *last = row,
            _ => out.push(row),
        }
    }
    Ok(out)
}

/// `(step, value)` of `key` over `rows`, skipping lines where it is missing, null or not finite.
fn column(rows: &[Row], key: &str) -> Vec<(f64, f64)> {
    rows.iter()
        .filter_map(|(step, obj)| {
            let v = obj.get(key)?.as_f64()?;
            v.is_finite().then_some((*step, v))
        })
        .collect()
}

/// Reads a run's metrics.jsonl (one JSON object per RL step) and writes the run plots into
/// `out_dir`: `reward.{png,svg}` (reward_mean, plus gold_mean if any line has it),
/// `kl.{png,svg}`, `response_len.{png,svg}` and `rm_loss.{png,svg}` (rm_loss, rm_bt, rm_gre; only
/// when some line has rm_loss), all against `step`. Returns the written paths. Missing/null fields
/// are skipped; a malformed line is an error naming the file and the line number.
pub fn plot_run(metrics_jsonl: &Path, out_dir: &Path) -> Result<Vec<PathBuf>> {
    let rows = read_metrics(metrics_jsonl)?;
    // The run directory's name tells runs apart when plots are compared side by side.
    let run = metrics_jsonl
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| format!(" ({})", n.to_string_lossy()))
        .unwrap_or_default();
    let charts: [(&str, &str, &str, &[&str], bool); 4] = [
        (
            "reward",
            "Reward",
            "reward",
            &["reward_mean", "gold_mean"],
            false,
        ),
        ("kl", "KL to the reference policy", "KL", &["kl"], false),
        (
            "response_len",
            "Response length",
            "tokens",
            &["response_len"],
            false,
        ),
        (
            "rm_loss",
            "R2M reward-model update loss",
            "loss",
            &["rm_loss", "rm_bt", "rm_gre"],
            true,
        ),
    ];
    let mut written = Vec::new();
    for (stem, title, y_label, keys, needs_first) in charts {
        let series: Vec<Series> = keys
            .iter()
            .map(|k| Series::new(*k, column(&rows, k)))
            .collect();
        if needs_first && series[0].points.is_empty() {
            continue;
        }
        // Optional series (gold_mean, rm_bt, ...) appear only when present.
        let series = series
            .into_iter()
            .enumerate()
            .filter(|(i, s)| *i == 0 || !s.points.is_empty())
            .map(|(_, s)| s)
            .collect();
        let chart = Chart {
            title: format!("{title}{run}"),
            x_label: "step".into(),
            y_label: y_label.into(),
            series,
        };
        written.extend(line_chart(out_dir, stem, &chart)?);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

    fn check_files(paths: &[PathBuf], title: &str, names: &[&str]) {
        assert_eq!(paths.len(), 2);
        let png = std::fs::read(&paths[0]).unwrap();
        assert!(png.len() > 1000, "PNG too small: {}", png.len());
        assert!(png.starts_with(PNG_MAGIC));
        let svg = std::fs::read_to_string(&paths[1]).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        assert!(svg.contains(title), "title missing from SVG");
        for n in names {
            assert!(svg.contains(n), "series `{n}` missing from SVG");
        }
    }

    fn chart(series: Vec<Series>) -> Chart {
        Chart {
            title: "Test chart".into(),
            x_label: "step".into(),
            y_label: "value".into(),
            series,
        }
    }

    #[test]
    fn plots_line_chart_writes_png_and_svg() {
        let dir = tempfile::tempdir().unwrap();
        let sine: Vec<(f64, f64)> = (0..50)
            .map(|i| (i as f64, (i as f64 / 5.0).sin()))
            .collect();
        let band = sine.iter().map(|&(x, y)| (x, y - 0.2, y + 0.2)).collect();
        let c = chart(vec![
            Series {
                name: "sine".into(),
                points: sine,
                band: Some(band),
            },
            Series::new(
                "ramp",
                (0..50).map(|i| (i as f64, i as f64 / 50.0)).collect(),
            ),
        ]);
        let paths = line_chart(&dir.path().join("sub"), "demo", &c).unwrap();
        assert_eq!(paths[0], dir.path().join("sub/demo.png"));
        assert_eq!(paths[1], dir.path().join("sub/demo.svg"));
        check_files(&paths, "Test chart", &["sine", "ramp", "step", "value"]);
    }

    #[test]
    fn plots_degenerate_inputs_do_not_panic() {
        let dir = tempfile::tempdir().unwrap();
        let cases: Vec<(&str, Vec<Series>)> = vec![
            ("one_point", vec![Series::new("one", vec![(3.0, 0.5)])]),
            (
                "constant",
                vec![Series::new(
                    "flat",
                    (0..10).map(|i| (i as f64, 2.0)).collect(),
                )],
            ),
            (
                "zeros",
                vec![Series::new(
                    "zero",
                    (0..10).map(|i| (i as f64, 0.0)).collect(),
                )],
            ),
            (
                "nan",
                vec![Series::new(
                    "holes",
                    vec![
                        (0.0, 1.0),
                        (1.0, f64::NAN),
                        (f64::INFINITY, 2.0),
                        (3.0, f64::NEG_INFINITY),
                        (4.0, 0.5),
                    ],
                )],
            ),
            (
                "huge",
                vec![Series::new("big", vec![(0.0, -f64::MAX), (1.0, f64::MAX)])],
            ),
            (
                "tiny",
                vec![Series::new("small", vec![(0.0, 1e-9), (1.0, 3e-9)])],
            ),
            (
                "bad_band",
                vec![Series {
                    name: "banded".into(),
                    points: vec![(0.0, 1.0)],
                    band: Some(vec![(0.0, 2.0, 0.0), (f64::NAN, 0.0, 1.0)]),
                }],
            ),
        ];
        for (stem, series) in cases {
            let names: Vec<String> = series.iter().map(|s| s.name.clone()).collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let paths = line_chart(dir.path(), stem, &chart(series)).unwrap();
            check_files(&paths, "Test chart", &names);
        }
        // Only NaNs, an empty series, no series at all: empty axes, no panic.
        for (stem, series) in [
            (
                "all_nan",
                vec![Series::new("nan", vec![(f64::NAN, f64::NAN)])],
            ),
            ("empty_series", vec![Series::new("empty", vec![])]),
            ("no_series", vec![]),
        ] {
            let paths = line_chart(dir.path(), stem, &chart(series)).unwrap();
            check_files(&paths, "Test chart", &["no data"]);
        }
    }

    #[test]
    fn plots_tick_labels_match_the_spacing() {
        let f = tick_formatter((1.0, 10.0), 10);
        assert_eq!(f(&2.0), "2");
        let f = tick_formatter((-0.5, 0.5), 8);
        assert_eq!(f(&0.2), "0.2");
        assert_eq!(f(&-1e-17), "0.0");
        // Ticks 1.0e-6, 1.2e-6, ...: distinct labels, in scientific notation.
        let f = tick_formatter((1e-6, 2e-6), 8);
        assert_eq!(f(&1.2e-6), "1.2e-6");
        assert_eq!(f(&1.4e-6), "1.4e-6");
        let f = tick_formatter((0.0, 3e6), 8);
        assert_eq!(f(&1.5e6), "1.5e6");
    }

    #[test]
    fn plots_run_writes_all_charts() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("my-run");
        std::fs::create_dir_all(&run).unwrap();
        let metrics = run.join("metrics.jsonl");
        let mut lines = String::new();
        for s in 1..=6 {
            let gold = if s % 2 == 0 {
                format!(r#","gold_mean":{}"#, s as f64 * 0.1)
            } else {
                String::new()
            };
            lines.push_str(&format!(
                r#"{{"step":{s},"reward_mean":{},"kl":{},"response_len":50.0,"value_loss":null,"rm_loss":0.5,"rm_bt":0.3,"rm_gre":null{gold}}}"#,
                s as f64 * 0.05,
                s as f64 * 0.01
            ));
            lines.push('\n');
        }
        lines.push_str("\n  \n"); // blank lines are fine
        std::fs::write(&metrics, lines).unwrap();
        let out = run.join("plots");
        let paths = plot_run(&metrics, &out).unwrap();
        let stems: Vec<String> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            stems,
            [
                "reward.png",
                "reward.svg",
                "kl.png",
                "kl.svg",
                "response_len.png",
                "response_len.svg",
                "rm_loss.png",
                "rm_loss.svg"
            ]
        );
        check_files(
            &paths[0..2],
            "Reward (my-run)",
            &["reward_mean", "gold_mean"],
        );
        check_files(
            &paths[6..8],
            "R2M reward-model update loss",
            &["rm_loss", "rm_bt"],
        );
        let rm_svg = std::fs::read_to_string(&paths[7]).unwrap();
        assert!(!rm_svg.contains("rm_gre"), "an all-null series is left out");

        // Without rm_loss and gold_mean: three charts, reward without a gold series.
        std::fs::write(
            &metrics,
            "{\"step\":1,\"reward_mean\":0.1,\"kl\":0.0,\"response_len\":5}\n",
        )
        .unwrap();
        let paths = plot_run(&metrics, &out).unwrap();
        assert_eq!(paths.len(), 6);
        let svg = std::fs::read_to_string(&paths[1]).unwrap();
        assert!(!svg.contains("gold_mean"));
    }

    #[test]
    fn plots_run_malformed_line_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.jsonl");
        std::fs::write(
            &metrics,
            "{\"step\":1,\"reward_mean\":0.1}\n{\"step\":2,\"reward_mean\":0.2}\n{\"step\":3,\"rew\n",
        )
        .unwrap();
        let err = plot_run(&metrics, &dir.path().join("plots"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("metrics.jsonl"), "{err}");

        std::fs::write(&metrics, "{\"step\":1}\n[1, 2]\n").unwrap();
        let err = plot_run(&metrics, &dir.path().join("plots"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");

        let err = plot_run(&dir.path().join("missing.jsonl"), dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.jsonl"), "{err}");
    }
}
