//! The report's charts, drawn by plotters into SVG strings (its SVG backend: `<text>` elements laid out by the
//! browser, so no font files are read). Each function takes the figures it plots and returns one `<svg>`.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::ReportError;
use super::eval::{EvalCalibration, EvalFieldScore};
use super::figures::{CONFIDENCE_BINS, FieldFill, ThroughputBin};
use super::read::StageShare;

const WIDTH: u32 = 900;
const FONT: &str = "sans-serif";
const BLUE: RGBColor = RGBColor(66, 113, 196);
const ORANGE: RGBColor = RGBColor(230, 126, 34);
const GREEN: RGBColor = RGBColor(46, 139, 87);
const GREY: RGBColor = RGBColor(120, 120, 120);

fn chart_error(e: impl std::fmt::Display) -> ReportError {
    ReportError::Chart(e.to_string())
}

/// Draws into a fresh SVG string of `height` pixels.
fn svg(
    height: u32,
    draw: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> Result<(), ReportError>,
) -> Result<String, ReportError> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_error)?;
        draw(&root)?;
        root.present().map_err(chart_error)?;
    }
    Ok(out)
}

/// A value label left-anchored at a bar's end.
fn bar_label(text: String, at: (f64, f64)) -> Text<'static, (f64, f64), String> {
    Text::new(
        text,
        at,
        TextStyle::from((FONT, 12).into_font()).pos(Pos::new(HPos::Left, VPos::Center)),
    )
}

/// Categories on a vertical axis, the first at the top: category i is centred on `n - 1 - i + 0.5`.
fn category_y(i: usize, n: usize) -> f64 {
    (n - 1 - i) as f64 + 0.5
}

fn percent(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

/// Pages (bars) and rows (line) per time bin.
pub fn throughput(bins: &[ThroughputBin]) -> Result<String, ReportError> {
    let end = bins.last().map_or(1.0, |b| b.start_s + b.width_s);
    let top = bins
        .iter()
        .map(|b| b.pages.max(b.rows))
        .max()
        .unwrap_or(0)
        .max(1) as f64
        * 1.15;
    let width = bins.first().map_or(1.0, |b| b.width_s);
    svg(320, |root| {
        let mut chart = ChartBuilder::on(root)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..end, 0f64..top)
            .map_err(chart_error)?;
        chart
            .configure_mesh()
            .x_desc(format!("seconds since the run started (bins of {width} s)"))
            .y_desc("per bin")
            .label_style((FONT, 12))
            .draw()
            .map_err(chart_error)?;
        chart
            .draw_series(bins.iter().map(|b| {
                Rectangle::new(
                    [
                        (b.start_s, 0.0),
                        (b.start_s + b.width_s * 0.9, b.pages as f64),
                    ],
                    BLUE.mix(0.75).filled(),
                )
            }))
            .map_err(chart_error)?
            .label("pages")
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], BLUE.filled()));
        chart
            .draw_series(LineSeries::new(
                bins.iter()
                    .map(|b| (b.start_s + b.width_s * 0.45, b.rows as f64)),
                ORANGE.stroke_width(2),
            ))
            .map_err(chart_error)?
            .label("rows")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], ORANGE.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(GREY)
            .label_font((FONT, 12))
            .draw()
            .map_err(chart_error)
    })
}

/// Horizontal bars with a value label each: one group of bars per category, one series per (name, colour).
fn grouped_bars(
    names: &[String],
    series: &[(&str, RGBColor, Vec<Option<f64>>)],
    x_max: f64,
    x_desc: &str,
    label: fn(f64) -> String,
) -> Result<String, ReportError> {
    let n = names.len().max(1);
    let height = 70 + 28 * n as u32 * series.len().max(1) as u32 / 2 + 40;
    svg(height.max(160), |root| {
        let mut chart = ChartBuilder::on(root)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(170)
            .build_cartesian_2d(0f64..x_max * 1.4, 0f64..n as f64)
            .map_err(chart_error)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .x_desc(x_desc)
            .x_label_formatter(&|x| label(*x))
            .label_style((FONT, 12))
            .draw()
            .map_err(chart_error)?;
        // Category names in the label area, right-aligned against the axis at each group's centre.
        for (i, name) in names.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(0.0, category_y(i, names.len())));
            root.draw(&Text::new(
                name.clone(),
                (x - 8, y),
                TextStyle::from((FONT, 12).into_font()).pos(Pos::new(HPos::Right, VPos::Center)),
            ))
            .map_err(chart_error)?;
        }
        let band = 0.8 / series.len().max(1) as f64;
        for (s, (name, colour, values)) in series.iter().enumerate() {
            let bar = |i: usize| {
                let top = category_y(i, names.len()) + 0.4 - s as f64 * band;
                (top - band * 0.9, top)
            };
            let colour = *colour;
            chart
                .draw_series(values.iter().enumerate().filter_map(|(i, v)| {
                    let (lo, hi) = bar(i);
                    v.map(|v| Rectangle::new([(0.0, lo), (v, hi)], colour.filled()))
                }))
                .map_err(chart_error)?
                .label(*name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled())
                });
            chart
                .draw_series(values.iter().enumerate().map(|(i, v)| {
                    let (lo, hi) = bar(i);
                    let text = v.map_or_else(|| "n/a".to_string(), label);
                    bar_label(text, (v.unwrap_or(0.0) + x_max * 0.01, (lo + hi) / 2.0))
                }))
                .map_err(chart_error)?;
        }
        if series.len() > 1 {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.9))
                .border_style(GREY)
                .label_font((FONT, 12))
                .draw()
                .map_err(chart_error)?;
        }
        Ok(())
    })
}

/// Each stage's busy seconds over the run's wall time.
pub fn stage_shares(stages: &[StageShare]) -> Result<String, ReportError> {
    let names: Vec<String> = stages.iter().map(|s| s.stage.clone()).collect();
    let shares: Vec<Option<f64>> = stages.iter().map(|s| Some(s.share)).collect();
    let max = shares.iter().flatten().copied().fold(1.0, f64::max);
    grouped_bars(
        &names,
        &[("busy share", BLUE, shares)],
        max,
        "busy time / wall time (above 100%: parallel workers)",
        percent,
    )
}

/// Per field: filled values over answered rows, and over `ok` rows.
pub fn fill_rates(fills: &[FieldFill]) -> Result<String, ReportError> {
    let names: Vec<String> = fills.iter().map(|f| f.field.clone()).collect();
    grouped_bars(
        &names,
        &[
            (
                "answered rows",
                BLUE,
                fills.iter().map(FieldFill::rate).collect(),
            ),
            (
                "ok rows",
                GREEN,
                fills.iter().map(FieldFill::ok_rate).collect(),
            ),
        ],
        1.0,
        "share of rows holding a value",
        percent,
    )
}

/// Small multiples: per field, its filled values by confidence bin.
pub fn confidence_histograms(fills: &[FieldFill]) -> Result<String, ReportError> {
    const COLUMNS: usize = 3;
    let rows = fills.len().div_ceil(COLUMNS).max(1);
    svg(rows as u32 * 190, |root| {
        let panels = root.split_evenly((rows, COLUMNS));
        for (fill, panel) in fills.iter().zip(panels.iter()) {
            let top = fill
                .confidence_bins
                .iter()
                .copied()
                .max()
                .unwrap_or(0)
                .max(1) as f64
                * 1.25;
            let values: usize = fill.confidence_bins.iter().sum();
            let mut chart = ChartBuilder::on(panel)
                .caption(format!("{} ({values} values)", fill.field), (FONT, 13))
                .margin(8)
                .x_label_area_size(28)
                .y_label_area_size(36)
                .build_cartesian_2d(0f64..1f64, 0f64..top)
                .map_err(chart_error)?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(6)
                .y_labels(4)
                .label_style((FONT, 10))
                .draw()
                .map_err(chart_error)?;
            let width = 1.0 / CONFIDENCE_BINS as f64;
            chart
                .draw_series(fill.confidence_bins.iter().enumerate().map(|(i, &count)| {
                    let x = i as f64 * width;
                    Rectangle::new(
                        [(x + width * 0.05, 0.0), (x + width * 0.95, count as f64)],
                        BLUE.filled(),
                    )
                }))
                .map_err(chart_error)?;
            chart
                .draw_series(
                    fill.confidence_bins
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| **c > 0)
                        .map(|(i, &count)| {
                            Text::new(
                                count.to_string(),
                                ((i as f64 + 0.5) * width, count as f64 + top * 0.02),
                                TextStyle::from((FONT, 10).into_font())
                                    .pos(Pos::new(HPos::Center, VPos::Bottom)),
                            )
                        }),
                )
                .map_err(chart_error)?;
        }
        Ok(())
    })
}

/// Per field precision, recall and F1 from `pixtract eval`.
pub fn eval_scores(fields: &[EvalFieldScore]) -> Result<String, ReportError> {
    let names: Vec<String> = fields.iter().map(|f| f.field.clone()).collect();
    let series = |g: fn(&EvalFieldScore) -> f64| fields.iter().map(|f| Some(g(f))).collect();
    grouped_bars(
        &names,
        &[
            ("precision", BLUE, series(|f| f.precision)),
            ("recall", ORANGE, series(|f| f.recall)),
            ("F1", GREEN, series(|f| f.f1)),
        ],
        1.0,
        "score",
        |x| format!("{x:.2}"),
    )
}

/// Accuracy against mean confidence per reliability bin, with the diagonal of perfect calibration.
pub fn reliability(calibration: &EvalCalibration) -> Result<String, ReportError> {
    svg(360, |root| {
        let mut chart = ChartBuilder::on(root)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..1f64, 0f64..1.05f64)
            .map_err(chart_error)?;
        chart
            .configure_mesh()
            .x_desc("mean confidence in the bin")
            .y_desc("accuracy")
            .label_style((FONT, 12))
            .draw()
            .map_err(chart_error)?;
        chart
            .draw_series(LineSeries::new(vec![(0.0, 0.0), (1.0, 1.0)], GREY))
            .map_err(chart_error)?
            .label("perfect calibration")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], GREY));
        let points: Vec<(f64, f64, usize)> = calibration
            .bins
            .iter()
            .filter(|b| b.2 > 0)
            .map(|b| (b.3, b.4, b.2))
            .collect();
        chart
            .draw_series(
                points
                    .iter()
                    .map(|&(c, a, _)| Circle::new((c, a), 5, BLUE.filled())),
            )
            .map_err(chart_error)?
            .label("bins (label: values)")
            .legend(|(x, y)| Circle::new((x + 6, y), 5, BLUE.filled()));
        chart
            .draw_series(
                points
                    .iter()
                    .map(|&(c, a, n)| bar_label(n.to_string(), (c + 0.015, a))),
            )
            .map_err(chart_error)?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(GREY)
            .label_font((FONT, 12))
            .draw()
            .map_err(chart_error)
    })
}
