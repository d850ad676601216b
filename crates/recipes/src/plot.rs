//! SVG line charts for the comparison reports (curves against samples, reward-KL frontiers,
//! collapse monitors), drawn with plotters into a string and written atomically.

use std::path::Path;

use plotters::prelude::*;
use rlhf_train::{Result, TrainError};

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
    let pad = ((hi - lo) * 0.05).max(1e-6);
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
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|e| TrainError::io(d, e))?;
    }
    rlhf_train::run::write_atomic(path, svg.as_bytes())
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
    chart
        .configure_mesh()
        .x_desc(panel.x_label.as_str())
        .y_desc(panel.y_label.as_str())
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for (i, s) in panel.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points = finite(s);
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))?
            .label(s.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(move |p| Circle::new(p, 3, colour.filled())),
        )?;
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
