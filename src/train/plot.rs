//! The loss curve of a run as a PNG: training loss (blue) and evaluation loss (red, dots) against
//! the step, read from the run's `metrics.jsonl`. Drawn with `plotters`' bitmap backend; tick
//! labels use a built-in 3×5 pixel font for digits, so no system font (fontconfig) is needed.

use super::metrics::{METRICS_FILE, read};
use anyhow::{Context, Result, ensure};
use plotters::prelude::*;
use std::path::Path;

const W: u32 = 960;
const H: u32 = 540;
const MARGIN_L: i32 = 70;
const MARGIN_R: i32 = 20;
const MARGIN_T: i32 = 20;
const MARGIN_B: i32 = 40;

/// 3×5 glyphs (rows top to bottom, 3 bits each, MSB = left column) for `0-9 . - e`.
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [0b111, 0b101, 0b101, 0b101, 0b111],
        '1' => [0b010, 0b110, 0b010, 0b010, 0b111],
        '2' => [0b111, 0b001, 0b111, 0b100, 0b111],
        '3' => [0b111, 0b001, 0b111, 0b001, 0b111],
        '4' => [0b101, 0b101, 0b111, 0b001, 0b001],
        '5' => [0b111, 0b100, 0b111, 0b001, 0b111],
        '6' => [0b111, 0b100, 0b111, 0b101, 0b111],
        '7' => [0b111, 0b001, 0b010, 0b010, 0b010],
        '8' => [0b111, 0b101, 0b111, 0b101, 0b111],
        '9' => [0b111, 0b101, 0b111, 0b001, 0b111],
        '.' => [0b000, 0b000, 0b000, 0b000, 0b010],
        '-' => [0b000, 0b000, 0b111, 0b000, 0b000],
        'e' => [0b000, 0b111, 0b111, 0b100, 0b111],
        _ => return None,
    })
}

/// Draw `text` with its top-left corner at `(x, y)`, each font pixel a `scale`×`scale` square.
fn draw_text<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    text: &str,
    x: i32,
    y: i32,
    scale: i32,
) -> Result<()> {
    let mut cx = x;
    for ch in text.chars() {
        if let Some(rows) = glyph(ch) {
            for (ry, bits) in rows.iter().enumerate() {
                for rx in 0..3 {
                    if bits & (0b100 >> rx) != 0 {
                        let x0 = cx + rx * scale;
                        let y0 = y + ry as i32 * scale;
                        area.draw(&Rectangle::new(
                            [(x0, y0), (x0 + scale - 1, y0 + scale - 1)],
                            BLACK.filled(),
                        ))
                        .map_err(|e| anyhow::anyhow!("drawing failed: {e}"))?;
                    }
                }
            }
        }
        cx += 4 * scale;
    }
    Ok(())
}

fn text_width(text: &str, scale: i32) -> i32 {
    text.chars().count() as i32 * 4 * scale - scale
}

/// Short decimal for a tick value.
fn tick_label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1e5 || v.abs() < 1e-2 {
        format!("{v:.1e}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// "Nice" tick positions covering `[lo, hi]` (about `n` of them).
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= n as f64)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + step * 1e-9 {
        out.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    out
}

/// Draw the loss curves of `run_dir/metrics.jsonl` into `png`.
pub fn plot_run(run_dir: &Path, png: &Path) -> Result<()> {
    let records = read(&run_dir.join(METRICS_FILE))?;
    let train: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.loss.filter(|l| l.is_finite()).map(|l| (r.step as f64, l)))
        .collect();
    let eval: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| {
            r.eval_loss
                .filter(|l| l.is_finite())
                .map(|l| (r.step as f64, l))
        })
        .collect();
    ensure!(
        !train.is_empty() || !eval.is_empty(),
        "{}: no finite loss to plot",
        run_dir.join(METRICS_FILE).display()
    );
    let all = train.iter().chain(&eval);
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let tmp = crate::util::temp_path(png).with_extension("png");
    {
        let root = BitMapBackend::new(&tmp, (W, H)).into_drawing_area();
        let err = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing failed: {e:?}");
        root.fill(&WHITE).map_err(err)?;
        let (pw, ph) = (
            W as i32 - MARGIN_L - MARGIN_R,
            H as i32 - MARGIN_T - MARGIN_B,
        );
        let px = |x: f64| MARGIN_L + ((x - x0) / (x1 - x0) * pw as f64).round() as i32;
        let py = |y: f64| MARGIN_T + ph - ((y - y0) / (y1 - y0) * ph as f64).round() as i32;
        // frame
        root.draw(&Rectangle::new(
            [(MARGIN_L, MARGIN_T), (MARGIN_L + pw, MARGIN_T + ph)],
            BLACK.stroke_width(1),
        ))
        .map_err(err)?;
        for t in ticks(x0, x1, 8) {
            let x = px(t);
            root.draw(&PathElement::new(
                vec![(x, MARGIN_T + ph), (x, MARGIN_T + ph + 5)],
                BLACK,
            ))
            .map_err(err)?;
            root.draw(&PathElement::new(
                vec![(x, MARGIN_T), (x, MARGIN_T + ph)],
                RGBColor(225, 225, 225),
            ))
            .map_err(err)?;
            let s = tick_label(t);
            draw_text(&root, &s, x - text_width(&s, 3) / 2, MARGIN_T + ph + 10, 3)?;
        }
        for t in ticks(y0, y1, 6) {
            let y = py(t);
            root.draw(&PathElement::new(
                vec![(MARGIN_L - 5, y), (MARGIN_L, y)],
                BLACK,
            ))
            .map_err(err)?;
            root.draw(&PathElement::new(
                vec![(MARGIN_L, y), (MARGIN_L + pw, y)],
                RGBColor(225, 225, 225),
            ))
            .map_err(err)?;
            let s = tick_label(t);
            draw_text(&root, &s, MARGIN_L - 10 - text_width(&s, 3), y - 5, 3)?;
        }
        let blue = RGBColor(31, 119, 180);
        let red = RGBColor(214, 39, 40);
        if train.len() > 1 {
            root.draw(&PathElement::new(
                train
                    .iter()
                    .map(|&(x, y)| (px(x), py(y)))
                    .collect::<Vec<_>>(),
                blue.stroke_width(2),
            ))
            .map_err(err)?;
        } else if let Some(&(x, y)) = train.first() {
            root.draw(&Circle::new((px(x), py(y)), 3, blue.filled()))
                .map_err(err)?;
        }
        if eval.len() > 1 {
            root.draw(&PathElement::new(
                eval.iter()
                    .map(|&(x, y)| (px(x), py(y)))
                    .collect::<Vec<_>>(),
                red.stroke_width(2),
            ))
            .map_err(err)?;
        }
        for &(x, y) in &eval {
            root.draw(&Circle::new((px(x), py(y)), 4, red.filled()))
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    std::fs::rename(&tmp, png)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), png.display()))?;
    Ok(())
}
