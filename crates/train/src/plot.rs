//! SVG charts, drawn with plotters into a string and written atomically: line charts (a run's
//! training curves, several runs overlaid, the comparison reports' curves, reward-KL frontiers and
//! collapse monitors) and interval charts (a comparison table's final numbers with their 95%
//! intervals).
//!
//! It lives in the train crate, below every method, so that the place where a run's metrics are
//! written can also draw them; the recipes crate re-exports it for its reports. SVG only: the
//! text is laid out with plotters' built-in font metrics, so nothing depends on system fonts.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Result, TrainError};

/// One line of a chart: a name for the legend and its (x, y) points in drawing order. Points
/// with a non-finite coordinate are left out.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One chart of a figure.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

/// Lines with at most this many points get a marker at each point.
const MAX_MARKED_POINTS: usize = 60;

/// Distinct colours, in legend order (repeats past ten).
const COLOURS: [RGBColor; 10] = [
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

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    // 5% of the span either side. A flat line or a lone point has (nearly) no span: it is
    // widened by 10% of its value instead, so the ticks stay distinct numbers.
    let span = hi - lo;
    let magnitude = lo.abs().max(hi.abs());
    let pad = if span > magnitude * 1e-9 {
        span * 0.05
    } else if magnitude > 0.0 {
        magnitude * 0.1
    } else {
        1.0
    };
    (lo - pad, hi + pad)
}

fn plot_error(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::invalid(format!("plot {}: {e}", path.display()))
}

/// Draw `panels` in a grid of `columns` (each 560 x 400 pixels) into the SVG file at `path`.
pub fn write_svg(path: &Path, panels: &[Panel], columns: usize) -> Result<()> {
    let columns = columns.clamp(1, panels.len().max(1));
    let rows = panels.len().div_ceil(columns).max(1);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (560 * columns as u32, 400 * rows as u32))
            .into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_error(path, e))?;
        let areas = root.split_evenly((rows, columns));
        for (panel, area) in panels.iter().zip(areas.iter()) {
            draw_panel(panel, area).map_err(|e| plot_error(path, e))?;
        }
        root.present().map_err(|e| plot_error(path, e))?;
    }
    save(path, &svg)
}

/// Write a drawn picture, creating its directory if needed.
fn save(path: &Path, svg: &str) -> Result<()> {
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|e| TrainError::io(d, e))?;
    }
    crate::run::write_atomic(path, svg.as_bytes())
}

/// One row of an [`IntervalChart`]: an estimate and its interval.
#[derive(Debug, Clone)]
pub struct Interval {
    pub name: String,
    pub estimate: f64,
    /// `[low, high]`; a non-finite end draws the estimate without a bar.
    pub interval: [f64; 2],
}

/// A table's final numbers as a dot-and-whisker chart: one row per entry, top to bottom in the
/// given order, the value on the horizontal axis (so long row names stay readable), and an
/// optional dashed vertical reference line (e.g. the 0.5 win-rate of a tie with the reference).
#[derive(Debug, Clone)]
pub struct IntervalChart {
    pub title: String,
    pub x_label: String,
    pub rows: Vec<Interval>,
    pub reference: Option<f64>,
}

/// Draw `chart` (720 pixels wide, 36 per row) into the SVG file at `path`.
pub fn write_interval_svg(path: &Path, chart: &IntervalChart) -> Result<()> {
    let height = 120 + 36 * chart.rows.len().max(1) as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_error(path, e))?;
        draw_intervals(chart, &root).map_err(|e| plot_error(path, e))?;
        root.present().map_err(|e| plot_error(path, e))?;
    }
    save(path, &svg)
}

fn draw_intervals(
    chart: &IntervalChart,
    area: &Area<'_>,
) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let n = chart.rows.len();
    let finite_ends = chart.rows.iter().flat_map(|r| {
        [r.estimate, r.interval[0], r.interval[1]]
            .into_iter()
            .chain(chart.reference)
    });
    let (x0, x1) = range(finite_ends);
    // Rows are drawn top to bottom: row i sits at y = n - 1 - i.
    let name_at = |v: &SegmentValue<i32>| -> String {
        let i = match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => *i,
            SegmentValue::Last => return String::new(),
        };
        usize::try_from(n as i32 - 1 - i)
            .ok()
            .and_then(|row| chart.rows.get(row))
            .map(|r| r.name.clone())
            .unwrap_or_default()
    };
    let longest = chart.rows.iter().map(|r| r.name.len()).max().unwrap_or(4);
    let mut c = ChartBuilder::on(area)
        .caption(&chart.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size((longest as u32 * 8 + 16).clamp(60, 300))
        // A segmented range holds both its ends: rows 0..=n-1 (a lone row gets a spare one
        // above it, as a range of one value has no extent).
        .build_cartesian_2d(x0..x1, (0..(n as i32 - 1).max(1)).into_segmented())?;
    c.configure_mesh()
        .x_desc(chart.x_label.as_str())
        .y_labels(n.max(1))
        .y_label_formatter(&name_at)
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    if let Some(r) = chart.reference.filter(|r| r.is_finite()) {
        c.draw_series(std::iter::once(PathElement::new(
            vec![(r, SegmentValue::Exact(0)), (r, SegmentValue::Last)],
            BLACK.mix(0.35).stroke_width(1),
        )))?;
    }
    for (i, row) in chart.rows.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let y = SegmentValue::CenterOf(n as i32 - 1 - i as i32);
        let [lo, hi] = row.interval;
        if lo.is_finite() && hi.is_finite() {
            c.draw_series(std::iter::once(PathElement::new(
                vec![(lo, y.clone()), (hi, y.clone())],
                colour.stroke_width(2),
            )))?;
            // End caps, drawn in pixels so they do not depend on the row spacing.
            for end in [lo, hi] {
                c.draw_series(std::iter::once(
                    EmptyElement::at((end, y.clone()))
                        + PathElement::new(vec![(0, -7), (0, 7)], colour.stroke_width(2)),
                ))?;
            }
        }
        if row.estimate.is_finite() {
            c.draw_series(std::iter::once(Circle::new(
                (row.estimate, y.clone()),
                5,
                colour.filled(),
            )))?;
        }
    }
    Ok(())
}

/// Axes whose values all lie within +-SMALL_AXIS are labelled in scientific notation.
const SMALL_AXIS: f64 = 1e-2;

fn scientific(v: &f64) -> String {
    if *v == 0.0 {
        "0".into()
    } else {
        format!("{v:.2e}")
    }
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn draw_panel(
    panel: &Panel,
    area: &Area<'_>,
) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let finite = |s: &Series| -> Vec<(f64, f64)> {
        s.points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect()
    };
    let all: Vec<(f64, f64)> = panel.series.iter().flat_map(finite).collect();
    let all_lines: Vec<Vec<(f64, f64)>> = panel.series.iter().map(finite).collect();
    let (x0, x1) = range(all.iter().map(|p| p.0));
    let (y0, y1) = range(all.iter().map(|p| p.1));
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(panel.x_label.as_str())
        .y_desc(panel.y_label.as_str())
        .light_line_style(WHITE.mix(0.0));
    // plotters' default labels run out of digits below 1e-3 (a learning rate's ticks would all
    // read 0.0001): such axes get scientific notation.
    if x0.abs().max(x1.abs()) < SMALL_AXIS {
        mesh.x_label_formatter(&scientific);
    }
    if y0.abs().max(y1.abs()) < SMALL_AXIS {
        mesh.y_label_formatter(&scientific);
    }
    mesh.draw()?;
    for (i, s) in panel.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points = finite(s);
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))?
            .label(s.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
            });
        // Markers show where the measurements are on sparse lines (and make a lone point
        // visible at all); on dense ones they would only blur the line.
        if points.len() <= MAX_MARKED_POINTS {
            chart.draw_series(
                points
                    .into_iter()
                    .map(move |p| Circle::new(p, 3, colour.filled())),
            )?;
        }
    }
    if panel.series.len() > 1 {
        chart
            .configure_series_labels()
            .position(emptiest_corner(&all_lines, (x0, x1), (y0, y1)))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()?;
    }
    Ok(())
}

/// The corner of the plot whose box (a third of the width, two fifths of the height) the lines
/// cross least (sampled along every segment), for the legend.
fn emptiest_corner(
    lines: &[Vec<(f64, f64)>],
    (x0, x1): (f64, f64),
    (y0, y1): (f64, f64),
) -> SeriesLabelPosition {
    let mut samples = Vec::new();
    for line in lines {
        for w in line.windows(2) {
            for i in 0..=10 {
                let f = i as f64 / 10.0;
                samples.push((
                    (w[0].0 + f * (w[1].0 - w[0].0) - x0) / (x1 - x0),
                    (w[0].1 + f * (w[1].1 - w[0].1) - y0) / (y1 - y0),
                ));
            }
        }
        if let [p] = line.as_slice() {
            samples.push(((p.0 - x0) / (x1 - x0), (p.1 - y0) / (y1 - y0)));
        }
    }
    let corners = [
        (SeriesLabelPosition::LowerRight, 0.66, 0.0),
        (SeriesLabelPosition::UpperLeft, 0.0, 0.6),
        (SeriesLabelPosition::UpperRight, 0.66, 0.6),
        (SeriesLabelPosition::LowerLeft, 0.0, 0.0),
    ];
    let count = |cx: f64, cy: f64| {
        samples
            .iter()
            .filter(|(x, y)| (cx..=cx + 0.34).contains(x) && (cy..=cy + 0.4).contains(y))
            .count()
    };
    corners
        .into_iter()
        .min_by_key(|(_, cx, cy)| count(*cx, *cy))
        .map(|c| c.0)
        .unwrap_or(SeriesLabelPosition::LowerRight)
}
