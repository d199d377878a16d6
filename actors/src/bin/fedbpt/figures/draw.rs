//! PNG figures: a grid of panels, each with lines, markers and shaded spreads. Text needs a
//! font: DejaVu Sans from the system (`FEDBPT_FONT` names another); without one the figure is
//! drawn without labels.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

/// `(x, y)` points.
pub type Points = Vec<(f64, f64)>;
/// `(x, low, high)` spreads.
pub type Band = Vec<(f64, f64, f64)>;

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// A line through the points, with a small marker at each.
    Line,
    /// Markers only (values measured at some rounds, such as test accuracy).
    Markers,
    /// A dashed reference line (a baseline).
    Dashed,
}

/// One named series: points, and optionally a shaded band `(x, low, high)` around them (the
/// spread over seeds) or error bars where the style is [`Style::Markers`].
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub band: Vec<(f64, f64, f64)>,
    pub style: Style,
    /// Index into the palette, so that one method keeps its colour across panels.
    pub color: usize,
}

impl Series {
    pub fn new(
        name: impl Into<String>,
        style: Style,
        color: usize,
        points: Vec<(f64, f64)>,
    ) -> Self {
        Self { name: name.into(), points, band: Vec::new(), style, color }
    }

    pub fn with_band(mut self, band: Vec<(f64, f64, f64)>) -> Self {
        self.band = band;
        self
    }
}

/// One chart of the figure.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Ticks at whole numbers only (rounds).
    pub integer_x: bool,
    /// Logarithmic y axis (step sizes) when the values span more than a factor of 8; a linear
    /// one otherwise (a log axis over a narrow range has no ticks to read).
    pub log_y: bool,
    pub series: Vec<Series>,
}

impl Panel {
    pub fn new(title: impl Into<String>, x_label: &str, y_label: &str) -> Self {
        Self {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            integer_x: true,
            log_y: false,
            series: Vec::new(),
        }
    }
}

/// Means and population standard deviations over the rows of `runs` (one `Vec` of `(x, y)` per
/// seed), at the x values every run has. Returns the mean points and the `(x, mean - sd,
/// mean + sd)` band.
pub fn mean_and_band(runs: &[Points]) -> (Points, Band) {
    let Some(first) = runs.first() else { return (Vec::new(), Vec::new()) };
    let (mut mean, mut band) = (Vec::new(), Vec::new());
    for &(x, _) in first {
        let ys: Vec<f64> =
            runs.iter().filter_map(|r| r.iter().find(|p| p.0 == x).map(|p| p.1)).collect();
        if ys.len() != runs.len() {
            continue;
        }
        let (m, sd) = mean_std(&ys);
        mean.push((x, m));
        band.push((x, m - sd, m + sd));
    }
    (mean, band)
}

/// Mean and population standard deviation (0 for fewer than two values).
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n;
    (m, var.sqrt())
}

/// A qualitative palette that reads on white (no yellow), cycled.
fn color_of(i: usize) -> RGBAColor {
    const COLORS: [(u8, u8, u8); 8] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
    ];
    let (r, g, b) = COLORS[i % COLORS.len()];
    RGBColor(r, g, b).to_rgba()
}

fn font_registered() -> bool {
    static FONT: OnceLock<bool> = OnceLock::new();
    *FONT.get_or_init(|| {
        let candidates = [
            std::env::var("FEDBPT_FONT").unwrap_or_default(),
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf".into(),
            "/usr/share/fonts/TTF/DejaVuSans.ttf".into(),
        ];
        for c in candidates.iter().filter(|c| !c.is_empty()) {
            if let Ok(bytes) = std::fs::read(c) {
                // The font lives as long as the process: plotters keeps a reference to it.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Draws `panels` in a grid of `columns` columns (rows as needed) into a PNG at `path`, each
/// panel `panel` = (width, height) pixels, with `title` above them all.
pub fn figure_png(
    path: &Path,
    title: &str,
    columns: usize,
    panel: (u32, u32),
    panels: &[Panel],
) -> Result<()> {
    let columns = columns.clamp(1, panels.len().max(1));
    let rows = panels.len().div_ceil(columns).max(1);
    let with_text = font_registered();
    let header = if with_text { 40 } else { 0 };
    let size = (panel.0 * columns as u32, panel.1 * rows as u32 + header);
    let root = BitMapBackend::new(path, size).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow!("plot {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let body = if with_text {
        root.titled(title, ("sans-serif", 24)).map_err(|e| err(&e))?
    } else {
        root.clone()
    };
    for (area, panel) in body.split_evenly((rows, columns)).iter().zip(panels) {
        draw_panel(area, panel, with_text).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

fn draw_panel(area: &Area<'_>, panel: &Panel, with_text: bool) -> Result<(), String> {
    let xs = panel
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0).chain(s.band.iter().map(|b| b.0)));
    let ys: Vec<f64> = panel
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1).chain(s.band.iter().flat_map(|b| [b.1, b.2])))
        .filter(|y| y.is_finite() && (!panel.log_y || *y > 0.0))
        .collect();
    let (x_min, x_max) =
        xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    if ys.is_empty() || !x_min.is_finite() {
        return Ok(());
    }
    let (x_lo, x_hi) = if x_max > x_min { (x_min, x_max) } else { (x_min - 1.0, x_max + 1.0) };
    let pad_x = if panel.integer_x { 0.3 } else { 0.03 * (x_hi - x_lo) };
    let (x_lo, x_hi) = (x_lo - pad_x, x_hi + pad_x);
    let y_min = ys.iter().copied().fold(f64::INFINITY, f64::min);
    let y_max = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut builder = ChartBuilder::on(area);
    builder.margin(14).x_label_area_size(42).y_label_area_size(64);
    if with_text {
        builder.caption(&panel.title, ("sans-serif", 18));
    }
    let integer_ticks = |x: &f64| {
        if (x - x.round()).abs() < 1e-9 {
            format!("{:.0}", x)
        } else {
            String::new()
        }
    };
    let x_ticks = if panel.integer_x {
        let span = (x_max - x_min).round().max(1.0) as usize;
        span.min(10) + 1
    } else {
        8
    };
    if panel.log_y && y_max > 8.0 * y_min {
        let (lo, hi) = (y_min * 0.8, y_max * 1.25);
        let mut chart = builder
            .build_cartesian_2d(x_lo..x_hi, (lo..hi).log_scale())
            .map_err(|e| e.to_string())?;
        let mut mesh = chart.configure_mesh();
        mesh.x_labels(x_ticks).y_labels(8);
        if panel.integer_x {
            mesh.x_label_formatter(&integer_ticks);
        }
        mesh.y_label_formatter(&|y| format!("{y:.3}"));
        if with_text {
            mesh.x_desc(panel.x_label.as_str()).y_desc(panel.y_label.as_str());
        } else {
            mesh.disable_x_axis().disable_y_axis();
        }
        mesh.draw().map_err(|e| e.to_string())?;
        let (corner, _) = legend_corner(panel, (x_lo, x_hi), (lo.ln(), hi.ln()), f64::ln);
        draw_series(&mut chart, panel, with_text, corner)
    } else {
        let pad = 0.08 * (y_max - y_min).max(1e-3);
        let (y_lo, mut y_hi) = (y_min - pad, y_max + pad);
        let (mut corner, covered) = legend_corner(panel, (x_lo, x_hi), (y_lo, y_hi), |y| y);
        let mut y_labels = 8;
        if covered > 0 && has_legend(panel, with_text) {
            // Every corner has data: raise the top so that the data fill the lower part of the
            // chart and the legend the upper, with as many ticks on the data as before.
            let room = legend_room(panel);
            y_hi = y_lo + (y_hi - y_lo) / room;
            y_labels = (8.0 / room).round() as usize;
            corner = legend_corner(panel, (x_lo, x_hi), (y_lo, y_hi), |y| y).0;
        }
        let mut chart =
            builder.build_cartesian_2d(x_lo..x_hi, y_lo..y_hi).map_err(|e| e.to_string())?;
        let mut mesh = chart.configure_mesh();
        mesh.x_labels(x_ticks).y_labels(y_labels);
        if panel.integer_x {
            mesh.x_label_formatter(&integer_ticks);
        }
        // The room made for a legend has no data: its ticks stay unlabelled, so that a share
        // axis does not seem to go past 100%.
        let data_top = y_max + pad;
        let above_data = |y: &f64| {
            if *y > data_top {
                String::new()
            } else {
                let text = format!("{y:.3}");
                text.trim_end_matches('0').trim_end_matches('.').to_string()
            }
        };
        if y_hi > data_top {
            mesh.y_label_formatter(&above_data);
        }
        if with_text {
            mesh.x_desc(panel.x_label.as_str()).y_desc(panel.y_label.as_str());
        } else {
            mesh.disable_x_axis().disable_y_axis();
        }
        mesh.draw().map_err(|e| e.to_string())?;
        draw_series(&mut chart, panel, with_text, corner)
    }
}

/// The share of a linear y range the data keep when no corner is free for the legend: less the
/// more entries the legend has (each takes about a fifteenth of a panel's height).
fn legend_room(panel: &Panel) -> f64 {
    let entries = panel.series.iter().filter(|s| !s.name.is_empty()).count() as f64;
    (0.92 - 0.065 * entries).clamp(0.3, 0.6)
}

/// Whether the panel draws a legend: two or more named series (a lone series is named by the
/// panel's title; an unnamed one, such as a reference line the title explains, by nothing).
fn has_legend(panel: &Panel, with_text: bool) -> bool {
    with_text && panel.series.iter().filter(|s| !s.name.is_empty()).count() > 1
}

/// The corner of the plot area that the fewest drawn points fall in (lines sampled between
/// their points, error bars and bands at both ends), so that the legend covers no data, and
/// how many fall in it. `scale` maps a y value to the axis' own scale (`ln` on a log axis).
fn legend_corner(
    panel: &Panel,
    (x_lo, x_hi): (f64, f64),
    (y_lo, y_hi): (f64, f64),
    scale: impl Fn(f64) -> f64,
) -> (SeriesLabelPosition, usize) {
    let mut drawn: Vec<(f64, f64)> = Vec::new();
    for s in &panel.series {
        drawn.extend(s.band.iter().flat_map(|b| [(b.0, b.1), (b.0, b.2)]));
        drawn.extend(&s.points);
        if s.style != Style::Markers {
            for w in s.points.windows(2) {
                drawn.extend((1..8).map(|k| {
                    let t = k as f64 / 8.0;
                    (w[0].0 + t * (w[1].0 - w[0].0), w[0].1 + t * (w[1].1 - w[0].1))
                }));
            }
        }
    }
    let unit = |v: f64, lo: f64, hi: f64| (v - lo) / (hi - lo).max(1e-12);
    let in_corner = |right: bool, upper: bool| {
        drawn
            .iter()
            .filter(|&&(_, y)| y.is_finite() && (y > 0.0 || !panel.log_y))
            .filter(|&&(x, y)| {
                let (u, v) = (unit(x, x_lo, x_hi), unit(scale(y), y_lo, y_hi));
                (if right { u > 0.5 } else { u < 0.5 }) && (if upper { v > 0.62 } else { v < 0.38 })
            })
            .count()
    };
    // Ties keep the first: lower right, then the others.
    [
        (SeriesLabelPosition::LowerRight, in_corner(true, false)),
        (SeriesLabelPosition::UpperRight, in_corner(true, true)),
        (SeriesLabelPosition::LowerLeft, in_corner(false, false)),
        (SeriesLabelPosition::UpperLeft, in_corner(false, true)),
    ]
    .into_iter()
    .min_by_key(|&(_, n)| n)
    .unwrap_or((SeriesLabelPosition::LowerRight, 0))
}

fn draw_series<'a, Y>(
    chart: &mut ChartContext<
        'a,
        BitMapBackend<'a>,
        Cartesian2d<plotters::coord::types::RangedCoordf64, Y>,
    >,
    panel: &Panel,
    with_text: bool,
    legend_at: SeriesLabelPosition,
) -> Result<(), String>
where
    Y: Ranged<ValueType = f64>,
{
    for s in &panel.series {
        let color = color_of(s.color);
        if !s.band.is_empty() && s.style != Style::Markers {
            let mut outline: Vec<(f64, f64)> = s.band.iter().map(|b| (b.0, b.2)).collect();
            outline.extend(s.band.iter().rev().map(|b| (b.0, b.1)));
            chart
                .draw_series(std::iter::once(Polygon::new(outline, color.mix(0.18).filled())))
                .map_err(|e| e.to_string())?;
        }
        let legend = match s.style {
            Style::Line => {
                chart
                    .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(|e| e.to_string())?;
                chart
                    .draw_series(LineSeries::new(s.points.clone(), color.stroke_width(2)))
                    .map_err(|e| e.to_string())?
            }
            Style::Markers => {
                for b in &s.band {
                    chart
                        .draw_series(std::iter::once(PathElement::new(
                            vec![(b.0, b.1), (b.0, b.2)],
                            color.stroke_width(2),
                        )))
                        .map_err(|e| e.to_string())?;
                }
                chart
                    .draw_series(s.points.iter().map(|&p| {
                        EmptyElement::at(p) + Cross::new((0, 0), 6, color.stroke_width(3))
                    }))
                    .map_err(|e| e.to_string())?
            }
            Style::Dashed => chart
                .draw_series(DashedLineSeries::new(s.points.clone(), 8, 6, color.stroke_width(2)))
                .map_err(|e| e.to_string())?,
        };
        if with_text && !s.name.is_empty() {
            // A dashed series' sample is dashed too: two strokes with a gap.
            let gap = if s.style == Style::Dashed { 3 } else { 0 };
            legend.label(s.name.clone()).legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (10 - gap, 0)], color.stroke_width(2))
                    + PathElement::new(vec![(10 + gap, 0), (20, 0)], color.stroke_width(2))
            });
        }
    }
    if has_legend(panel, with_text) {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(legend_at)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_legend_goes_to_the_corner_without_data() {
        let mut panel = Panel::new("t", "round", "%");
        // A falling line fills the upper left and the lower right.
        panel.series.push(Series::new("a", Style::Line, 0, vec![(0.0, 10.0), (10.0, 0.0)]));
        let (corner, covered) = legend_corner(&panel, (0.0, 10.0), (0.0, 10.0), |y| y);
        assert!(matches!(corner, SeriesLabelPosition::UpperRight), "{corner:?}");
        assert_eq!(covered, 0);
        // An error bar reaching into the lower right (the compare figure's last test point)
        // and a baseline across the top leave the lower left.
        panel.series = vec![
            Series::new("m", Style::Markers, 0, vec![(0.0, 9.0), (10.0, 4.0)])
                .with_band(vec![(10.0, 0.5, 7.5)]),
            Series::new("b", Style::Dashed, 1, vec![(0.0, 7.0), (10.0, 7.0)]),
        ];
        let (corner, _) = legend_corner(&panel, (0.0, 10.0), (0.0, 10.0), |y| y);
        assert!(matches!(corner, SeriesLabelPosition::LowerLeft), "{corner:?}");
    }

    #[test]
    fn a_legend_with_no_free_corner_gets_room_above_the_data() {
        // Two crossing lines between 30 and 70 cover all four corners of their own range.
        let mut panel = Panel::new("t", "round", "%");
        panel.series = vec![
            Series::new("a", Style::Line, 0, vec![(0.0, 30.0), (5.0, 70.0), (10.0, 30.0)]),
            Series::new("b", Style::Line, 1, vec![(0.0, 70.0), (5.0, 30.0), (10.0, 70.0)]),
        ];
        let (_, covered) = legend_corner(&panel, (0.0, 10.0), (30.0, 70.0), |y| y);
        assert!(covered > 0);
        let raised = 30.0 + 40.0 / legend_room(&panel);
        let (corner, covered) = legend_corner(&panel, (0.0, 10.0), (30.0, raised), |y| y);
        assert_eq!(covered, 0);
        assert!(matches!(corner, SeriesLabelPosition::UpperRight), "{corner:?}");
        // An unnamed reference line is no legend entry: one named series draws no legend.
        panel.series[1].name.clear();
        assert!(!has_legend(&panel, true));
    }

    #[test]
    fn mean_and_band_use_the_rounds_every_run_has() {
        let runs =
            vec![vec![(1.0, 80.0), (2.0, 82.0), (3.0, 90.0)], vec![(1.0, 84.0), (2.0, 82.0)]];
        let (mean, band) = mean_and_band(&runs);
        assert_eq!(mean, vec![(1.0, 82.0), (2.0, 82.0)]);
        assert_eq!(band, vec![(1.0, 80.0, 84.0), (2.0, 82.0, 82.0)]);
        assert_eq!(mean_and_band(&[]).0, vec![]);
    }

    #[test]
    fn figures_are_written_even_when_panels_are_empty() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Panel::new("accuracy", "round", "%");
        p.series.push(
            Series::new("dev", Style::Line, 0, vec![(0.0, 80.0), (1.0, 81.0), (2.0, 83.0)])
                .with_band(vec![(0.0, 79.0, 81.0), (1.0, 80.0, 82.0), (2.0, 82.0, 84.0)]),
        );
        p.series.push(Series::new("test", Style::Markers, 1, vec![(2.0, 82.5)]));
        p.series.push(Series::new("manual", Style::Dashed, 2, vec![(0.0, 77.0), (2.0, 77.0)]));
        let mut s = Panel::new("sigma", "round", "sigma");
        s.log_y = true;
        s.series.push(Series::new("sigma", Style::Line, 0, vec![(1.0, 0.5), (2.0, 0.25)]));
        let empty = Panel::new("nothing", "round", "");
        let path = dir.path().join("f.png");
        figure_png(&path, "t", 2, (700, 420), &[p, s, empty]).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > 1000);
    }
}
