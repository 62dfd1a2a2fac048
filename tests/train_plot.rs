//! loss.png: decodes, has the expected size, its title band holds anti-aliased text (a real
//! font: the old 3×5 pixel digits had only two grey levels), both panels hold curves; `zhllama
//! plot` overlays two runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use zhllama::train::metrics::{METRICS_FILE, Record};
use zhllama::train::plot;

fn run_dir(dir: &Path, base: f64, steps: u64, lr: f64) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut text = String::new();
    for s in 1..=steps {
        let r = Record {
            step: s,
            loss: Some(base + 2.0 / s as f64 + 0.05 * ((s * 7 % 5) as f64)),
            lr: Some(lr * (1.0 - s as f64 / (steps + 1) as f64)),
            ..Record::default()
        };
        text.push_str(&serde_json::to_string(&r).unwrap());
        text.push('\n');
        if s % 10 == 0 {
            let e = Record {
                step: s,
                eval_loss: Some(base + 2.2 / s as f64),
                ..Record::default()
            };
            text.push_str(&serde_json::to_string(&e).unwrap());
            text.push('\n');
        }
    }
    std::fs::write(dir.join(METRICS_FILE), text).unwrap();
    dir.to_path_buf()
}

/// (pixels darker than 200 in every channel, distinct grey levels among non-white pixels) in
/// rows `rows`, for pixels whose three channels are equal (text is black on white).
fn grey_stats(img: &image::RgbImage, rows: std::ops::Range<u32>) -> (usize, usize) {
    let mut dark = 0;
    let mut levels = std::collections::BTreeSet::new();
    for y in rows {
        for x in 0..img.width() {
            let p = img.get_pixel(x, y).0;
            if p[0] == p[1] && p[1] == p[2] && p[0] < 250 {
                levels.insert(p[0]);
                if p[0] < 200 {
                    dark += 1;
                }
            }
        }
    }
    (dark, levels.len())
}

/// Pixels of (about) colour `c` in rows `rows`.
fn colour_pixels(img: &image::RgbImage, rows: std::ops::Range<u32>, c: [u8; 3]) -> usize {
    rows.flat_map(|y| (0..img.width()).map(move |x| (x, y)))
        .filter(|&(x, y)| {
            let p = img.get_pixel(x, y).0;
            (0..3).all(|i| (p[i] as i32 - c[i] as i32).abs() <= 8)
        })
        .count()
}

#[test]
fn loss_png_has_a_title_in_a_real_font_and_both_panels() {
    let tmp = tempfile::tempdir().unwrap();
    let run = run_dir(&tmp.path().join("my-run"), 2.0, 60, 2e-4);
    let png = tmp.path().join("loss.png");
    plot::plot_run(&run, &png).unwrap();
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!((img.width(), img.height()), (plot::W, plot::H));
    let (dark, levels) = grey_stats(&img, 0..plot::TITLE_H);
    assert!(dark > 200, "title band: only {dark} dark pixels");
    // Anti-aliased glyph edges: many grey levels (a bitmap font gives one or two).
    assert!(
        levels > 20,
        "title band: {levels} grey levels, not rendered text"
    );
    // Loss panel (upper 70% of the body) and learning-rate panel both carry the run's colour.
    let split = plot::TITLE_H + (plot::H - plot::TITLE_H) * 7 / 10;
    let blue = [31, 119, 180];
    assert!(colour_pixels(&img, plot::TITLE_H..split, blue) > 300);
    assert!(colour_pixels(&img, split..plot::H, blue) > 300);
    // eval points in red in the loss panel
    assert!(colour_pixels(&img, plot::TITLE_H..split, [214, 39, 40]) > 50);
}

#[test]
fn zhllama_plot_overlays_two_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let a = run_dir(&tmp.path().join("run-a"), 2.0, 60, 2e-4);
    let b = run_dir(&tmp.path().join("run-b"), 3.0, 40, 1e-4);
    let png = tmp.path().join("both.png");
    let out = Command::new(env!("CARGO_BIN_EXE_zhllama"))
        .arg("plot")
        .args([&a, &b])
        .arg("--output")
        .arg(&png)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!((img.width(), img.height()), (plot::W, plot::H));
    let split = plot::TITLE_H + (plot::H - plot::TITLE_H) * 7 / 10;
    // One colour per run, in both panels.
    for c in [[31, 119, 180], [255, 127, 14]] {
        assert!(
            colour_pixels(&img, plot::TITLE_H..split, c) > 200,
            "{c:?} loss"
        );
        assert!(colour_pixels(&img, split..plot::H, c) > 200, "{c:?} lr");
    }
    // Several runs need an explicit --output.
    let out = Command::new(env!("CARGO_BIN_EXE_zhllama"))
        .arg("plot")
        .args([&a, &b])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--output is required"));
}
