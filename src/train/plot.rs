//! Loss curves as a PNG, from runs' `metrics.jsonl`: a loss panel (training loss, its smoothed
//! curve, evaluation loss) over a learning-rate panel, both against the optimizer step, with a
//! title, axis titles and a legend. Several runs overlay in one figure (`zhllama plot RUN...`),
//! one colour per run, the legend naming each run.
//!
//! Drawn with `plotters`' bitmap backend; text is rendered by `ab_glyph` from the embedded font
//! `assets/fonts/SourceSansPro-Regular.ttf` (SIL OFL 1.1, licence beside it), so no system font
//! is needed. Ticks fall on "nice" steps (1, 2 or 5 × 10^k) and every label of an axis uses one
//! number format ([`tick_format`]).

use super::metrics::{METRICS_FILE, read};
use anyhow::{Context, Result, anyhow, ensure};
use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter};
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Figure size in pixels.
pub const W: u32 = 1000;
pub const H: u32 = 700;
/// The title's band at the top of the figure.
pub const TITLE_H: u32 = 40;
/// TensorBoard's default smoothing weight: `s_t = w·s_{t-1} + (1-w)·x_t`, debiased.
pub const SMOOTHING: f64 = 0.6;

const FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/SourceSansPro-Regular.ttf");
const FONT: &str = "sans-serif";

/// Register the embedded font with plotters (once per process).
fn font() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok()
    });
    ensure!(ok, "the embedded plot font could not be loaded");
    Ok(())
}

/// One run's curves.
#[derive(Clone, Debug, Default)]
pub struct RunCurves {
    /// Legend name (the run directory's name).
    pub name: String,
    /// The stage, from the newest checkpoint's trainer state, when there is one.
    pub stage: Option<String>,
    pub train: Vec<(f64, f64)>,
    pub eval: Vec<(f64, f64)>,
    pub lr: Vec<(f64, f64)>,
}

impl RunCurves {
    /// Read `run_dir/metrics.jsonl` (finite values only).
    pub fn load(run_dir: &Path) -> Result<RunCurves> {
        let records = read(&run_dir.join(METRICS_FILE))?;
        let pts = |f: &dyn Fn(&super::metrics::Record) -> Option<f64>| -> Vec<(f64, f64)> {
            records
                .iter()
                .filter_map(|r| f(r).filter(|v| v.is_finite()).map(|v| (r.step as f64, v)))
                .collect()
        };
        let curves = RunCurves {
            name: run_name(run_dir),
            stage: run_stage(run_dir),
            train: pts(&|r| r.loss),
            eval: pts(&|r| r.eval_loss),
            lr: pts(&|r| r.lr),
        };
        ensure!(
            !curves.train.is_empty() || !curves.eval.is_empty(),
            "{}: no finite loss to plot",
            run_dir.join(METRICS_FILE).display()
        );
        Ok(curves)
    }
}

fn run_name(dir: &Path) -> String {
    let abs = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    abs.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

fn run_stage(dir: &Path) -> Option<String> {
    let (_, ck) = super::checkpoint::list(dir).ok()?.into_iter().next()?;
    let text = std::fs::read_to_string(ck.join(super::checkpoint::STATE_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["stage"].as_str().map(str::to_string)
}

/// TensorBoard's smoothing of `pts` (exponential moving average, debiased for the start).
pub fn smooth(pts: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let mut last = 0.0;
    pts.iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            last = last * weight + (1.0 - weight) * y;
            let debias = 1.0 - weight.powi(i as i32 + 1);
            (x, last / debias)
        })
        .collect()
}

/// "Nice" tick positions covering `[lo, hi]` (about `n` of them), a step of 1, 2 or 5 × 10^k.
pub fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let step = tick_step(lo, hi, n);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + step * 1e-9 {
        out.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    out
}

fn tick_step(lo: f64, hi: f64, n: usize) -> f64 {
    let span = (hi - lo).max(1e-12);
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= n as f64)
        .unwrap_or(10.0 * mag)
}

/// The one label format of an axis whose ticks are `ticks`: fixed-point with as many decimals
/// as the step needs (`9.8, 10.0, 10.2`; `0, 500, 1000`), or, when the largest tick is below
/// 0.01 or at least 1e6, scientific with as many mantissa decimals as the step needs
/// (`0.0e0, 5.0e-5, 1.0e-4`).
pub fn tick_format(ticks: &[f64]) -> impl Fn(f64) -> String + use<> {
    let step = if ticks.len() > 1 {
        (ticks[1] - ticks[0]).abs()
    } else {
        ticks.first().map_or(1.0, |t| t.abs().max(1e-300))
    };
    let max = ticks.iter().fold(0f64, |m, t| m.max(t.abs()));
    // The fewest decimals that write the step (hence every tick, a multiple of it) exactly.
    let decimals = |scale: f64| {
        let x = step / scale;
        (0..12)
            .find(|&d| {
                let y = x * 10f64.powi(d as i32);
                (y - y.round()).abs() <= 1e-6 * y.abs().max(1.0)
            })
            .unwrap_or(12)
    };
    let sci = max > 0.0 && !(1e-2..1e6).contains(&max);
    let (sci_dec, fix_dec) = if sci {
        let exp = 10f64.powf(max.log10().floor());
        (decimals(exp), 0)
    } else {
        (0, decimals(1.0))
    };
    move |v: f64| {
        if sci {
            format!("{v:.sci_dec$e}")
        } else {
            let s = format!("{v:.fix_dec$}");
            // "-0.0" reads as a different number than "0.0".
            if s.starts_with('-') && s[1..].chars().all(|c| c == '0' || c == '.') {
                s[1..].to_string()
            } else {
                s
            }
        }
    }
}

/// A linear f64 axis whose ticks are exactly ours (plotters picks its own otherwise).
struct Ticked {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ticked {
    fn new(lo: f64, hi: f64, ticks: &[f64]) -> Ticked {
        Ticked {
            lo,
            hi,
            ticks: ticks.to_vec(),
        }
    }
}

impl Ranged for Ticked {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;
    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let f = (v - self.lo) / (self.hi - self.lo);
        limit.0 + (f * (limit.1 - limit.0) as f64).round() as i32
    }
    fn key_points<Hint: KeyPointHint>(&self, _hint: Hint) -> Vec<f64> {
        self.ticks.clone()
    }
    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

/// Only the bound `configure_mesh` asks for: every axis sets its own label formatter.
impl ValueFormatter<f64> for Ticked {
    fn format(v: &f64) -> String {
        v.to_string()
    }
}

/// The run's colour (a colour-blind-safe palette: tab10's first entries).
fn colour(i: usize) -> RGBColor {
    const P: [RGBColor; 6] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
    ];
    P[i % P.len()]
}
const EVAL: RGBColor = RGBColor(214, 39, 40);

fn bounds<'a>(pts: impl Iterator<Item = &'a (f64, f64)>) -> Option<(f64, f64, f64, f64)> {
    pts.fold(None, |b, &(x, y)| {
        Some(match b {
            None => (x, x, y, y),
            Some((x0, x1, y0, y1)) => (x0.min(x), x1.max(x), y0.min(y), y1.max(y)),
        })
    })
}

/// Draw the loss curves of `run_dir/metrics.jsonl` into `png`, titled by the run and its stage.
pub fn plot_run(run_dir: &Path, png: &Path) -> Result<()> {
    let run = RunCurves::load(run_dir)?;
    let title = match &run.stage {
        Some(s) => format!("{} ({s}): loss and learning rate", run.name),
        None => format!("{}: loss and learning rate", run.name),
    };
    plot(&[run], &title, png)
}

/// Overlay the runs in `run_dirs` (legend by run name) into `png`.
pub fn plot_runs(run_dirs: &[PathBuf], png: &Path) -> Result<()> {
    ensure!(!run_dirs.is_empty(), "no run to plot");
    if run_dirs.len() == 1 {
        return plot_run(&run_dirs[0], png);
    }
    let runs = run_dirs
        .iter()
        .map(|d| RunCurves::load(d))
        .collect::<Result<Vec<_>>>()?;
    let names: Vec<String> = runs
        .iter()
        .map(|r| match &r.stage {
            Some(s) => format!("{} ({s})", r.name),
            None => r.name.clone(),
        })
        .collect();
    plot(&runs, &format!("loss: {}", names.join(" vs ")), png)
}

/// Draw `runs` into `png` (written to a temp file, then renamed).
pub fn plot(runs: &[RunCurves], title: &str, png: &Path) -> Result<()> {
    font()?;
    let losses = runs.iter().flat_map(|r| r.train.iter().chain(&r.eval));
    let (x0, mut x1, y0, y1) = bounds(losses).context("no loss to plot")?;
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let (l0, l1) = match bounds(runs.iter().flat_map(|r| r.lr.iter())) {
        Some((_, _, a, b)) if b > a => (a.min(0.0), b * 1.05),
        Some((_, _, _, b)) if b > 0.0 => (0.0, b * 1.05),
        _ => (0.0, 1.0),
    };
    let xt = ticks(x0, x1, 10);
    let yt = ticks(y0, y1, 8);
    let lt = ticks(l0, l1, 4);
    let (fx, fy, fl) = (tick_format(&xt), tick_format(&yt), tick_format(&lt));
    let overlay = runs.len() > 1;

    let tmp = crate::util::temp_path(png).with_extension("png");
    let guard = crate::util::TempGuard::new(&tmp);
    {
        let err = |e: DrawingAreaErrorKind<_>| anyhow!("drawing {}: {e:?}", png.display());
        let root = BitMapBackend::new(&tmp, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (head, body) = root.split_vertically(TITLE_H);
        head.draw_text(
            title,
            &TextStyle::from((FONT, 24).into_font()).color(&BLACK).pos(
                plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Center,
                    plotters::style::text_anchor::VPos::Center,
                ),
            ),
            (W as i32 / 2, TITLE_H as i32 / 2),
        )
        .map_err(err)?;
        let (upper, lower) = body.split_vertically((H - TITLE_H) * 7 / 10);

        let mut chart = ChartBuilder::on(&upper)
            .margin_left(10)
            .margin_right(20)
            .margin_top(5)
            .x_label_area_size(45)
            .y_label_area_size(75)
            .build_cartesian_2d(Ticked::new(x0, x1, &xt), Ticked::new(y0, y1, &yt))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .axis_desc_style((FONT, 18))
            .label_style((FONT, 15))
            .x_label_formatter(&|v| fx(*v))
            .y_label_formatter(&|v| fy(*v))
            .light_line_style(WHITE)
            .draw()
            .map_err(err)?;
        for (i, run) in runs.iter().enumerate() {
            let c = colour(i);
            let who = |what: &str| {
                if overlay {
                    format!("{}: {what}", run.name)
                } else {
                    what.to_string()
                }
            };
            if !run.train.is_empty() {
                chart
                    .draw_series(LineSeries::new(
                        run.train.iter().copied(),
                        c.mix(0.3).stroke_width(1),
                    ))
                    .map_err(err)?
                    .label(who("train"))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 24, y)], c.mix(0.3).stroke_width(2))
                    });
                chart
                    .draw_series(LineSeries::new(
                        smooth(&run.train, SMOOTHING),
                        c.stroke_width(2),
                    ))
                    .map_err(err)?
                    .label(who(&format!("train, smoothed ({SMOOTHING})")))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(2))
                    });
            }
            if !run.eval.is_empty() {
                let ec = if overlay { c } else { EVAL };
                chart
                    .draw_series(LineSeries::new(
                        run.eval.iter().copied(),
                        ec.stroke_width(2),
                    ))
                    .map_err(err)?;
                chart
                    .draw_series(run.eval.iter().map(|&p| Circle::new(p, 4, ec.filled())))
                    .map_err(err)?
                    .label(who("eval"))
                    .legend(move |(x, y)| Circle::new((x + 12, y), 4, ec.filled()));
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;

        let mut lr = ChartBuilder::on(&lower)
            .margin_left(10)
            .margin_right(20)
            .margin_bottom(5)
            .x_label_area_size(45)
            .y_label_area_size(75)
            .build_cartesian_2d(Ticked::new(x0, x1, &xt), Ticked::new(l0, l1, &lt))
            .map_err(err)?;
        lr.configure_mesh()
            .x_desc("step")
            .y_desc("learning rate")
            .axis_desc_style((FONT, 18))
            .label_style((FONT, 15))
            .x_label_formatter(&|v| fx(*v))
            .y_label_formatter(&|v| fl(*v))
            .light_line_style(WHITE)
            .draw()
            .map_err(err)?;
        for (i, run) in runs.iter().enumerate() {
            if run.lr.is_empty() {
                continue;
            }
            let c = colour(i);
            lr.draw_series(LineSeries::new(run.lr.iter().copied(), c.stroke_width(2)))
                .map_err(err)?
                .label(if overlay {
                    format!("{}: learning rate", run.name)
                } else {
                    "learning rate".to_string()
                })
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(2))
                });
        }
        lr.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    std::fs::rename(&tmp, png)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), png.display()))?;
    guard.disarm();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(t: &[f64]) -> Vec<String> {
        let f = tick_format(t);
        t.iter().map(|&v| f(v)).collect()
    }

    #[test]
    fn one_format_per_axis() {
        // The old plot's "10.20, 10, 9.80": now one number of decimals for all.
        assert_eq!(labels(&ticks(9.75, 10.25, 4)), ["9.8", "10.0", "10.2"]);
        assert_eq!(
            labels(&[0.0, 500.0, 1000.0, 1500.0]),
            ["0", "500", "1000", "1500"]
        );
        assert_eq!(labels(&[2.5, 2.75, 3.0]), ["2.50", "2.75", "3.00"]);
        assert_eq!(labels(&[-0.2, 0.0, 0.2]), ["-0.2", "0.0", "0.2"]);
        // A learning-rate axis: scientific, one mantissa precision.
        assert_eq!(
            labels(&ticks(0.0, 2.1e-4, 5)),
            ["0.0e0", "5.0e-5", "1.0e-4", "1.5e-4", "2.0e-4"]
        );
        assert_eq!(labels(&[0.0, 2e-3, 4e-3]), ["0e0", "2e-3", "4e-3"]);
    }

    #[test]
    fn ticks_are_nice_and_cover_the_range() {
        for (lo, hi, n) in [
            (0.0, 1000.0, 10),
            (9.71, 10.33, 8),
            (1e-6, 3e-4, 4),
            (1.0, 7.0, 10),
        ] {
            let t = ticks(lo, hi, n);
            assert!(t.len() >= 2 && t.len() <= n + 1, "{lo}..{hi}: {t:?}");
            let step = t[1] - t[0];
            let mant = step / 10f64.powf(step.log10().floor());
            assert!(
                // 10 × 10^(k-1): a step of 0.1 read back as 0.0999…96 after the subtraction.
                [1.0, 2.0, 5.0, 10.0]
                    .iter()
                    .any(|m| (mant - m).abs() < 1e-9 * m),
                "{lo}..{hi}: step {step}"
            );
            assert!(t[0] >= lo - 1e-12 && t[0] - step < lo, "{lo}..{hi}: {t:?}");
            assert!(*t.last().unwrap() <= hi * (1.0 + 1e-9) && t.last().unwrap() + step > hi);
        }
    }

    #[test]
    fn smoothing_is_tensorboards_debiased_ema() {
        let pts = [(1.0, 4.0), (2.0, 2.0), (3.0, 3.0)];
        let s = smooth(&pts, 0.6);
        // By hand: EMA 1.6, 0.96+0.8=1.76, 1.056+1.2=2.256; debias 0.4, 0.64, 0.784.
        let want = [4.0, 1.76 / 0.64, 2.256 / 0.784];
        for (got, w) in s.iter().zip(want) {
            assert!((got.1 - w).abs() < 1e-12, "{} vs {w}", got.1);
        }
        // A constant stays constant.
        assert!(
            smooth(&[(1.0, 2.0); 5], 0.9)
                .iter()
                .all(|p| (p.1 - 2.0).abs() < 1e-12)
        );
    }
}
