//! `zhllama eval` end to end (the built binary): agreement with transformers' loss, and one-line
//! errors naming the file and the offending value on bad input.

mod model_common;

use model_common::fixture;
use std::path::Path;
use std::process::Command;

fn eval(model: &Path, tokens: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_zhllama"))
        .args(["eval", "--model"])
        .arg(model)
        .arg("--tokens")
        .arg(tokens)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn eval_matches_transformers() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("eval/expected.json")).unwrap())
            .unwrap();
    let model = fixture(expected["model"].as_str().unwrap());
    let (ok, stdout, stderr) = eval(&model, &fixture("eval/tokens.json"));
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "one JSON line: {stdout:?}");
    let got: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(got["tokens"], expected["tokens"]);
    let (l, want) = (
        got["loss"].as_f64().unwrap(),
        expected["loss"].as_f64().unwrap(),
    );
    eprintln!(
        "eval loss relative error {:.3e}",
        (l - want).abs() / want.abs()
    );
    // rel 4e-7: the per-token cross-entropies are f32 (each off by a few ulps, 2⁻²⁴ ≈ 6e-8
    // relative, from a differently ordered logsumexp), averaged in f64, so the mean is off by
    // about as much as one term; measured 4.0e-8, the bound is ten times that.
    assert!(
        (l - want).abs() <= 4e-7 * want.abs(),
        "loss {l} vs transformers {want}"
    );
}

#[test]
fn eval_rejects_bad_input_with_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("gqa"); // vocab 160
    let write = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let cases: Vec<(std::path::PathBuf, std::path::PathBuf, Vec<&str>)> = vec![
        (
            model.clone(),
            tmp.path().join("missing.json"),
            vec!["missing.json"],
        ),
        (
            model.clone(),
            write("empty.json", "[]"),
            vec!["empty.json", "empty list"],
        ),
        (
            model.clone(),
            write("big.json", "[[1, 2, 3], [4, 160, 5]]"),
            vec!["big.json", "160", "sequence 1", "position 1"],
        ),
        (
            model.clone(),
            write("neg.json", "[[1, -3]]"),
            vec!["neg.json", "-3"],
        ),
        (
            model.clone(),
            write("notjson.json", "[[1, 2"),
            vec!["notjson.json"],
        ),
        (
            model.clone(),
            write("flat.json", "[1, 2, 3]"),
            vec!["flat.json", "token-id lists"],
        ),
        (
            model.clone(),
            write("short.json", "[[5]]"),
            vec!["short.json", "fewer than 2 tokens"],
        ),
        (
            tmp.path().join("nomodel"),
            fixture("eval/tokens.json"),
            vec!["nomodel", "config.json"],
        ),
    ];
    for (m, t, wants) in cases {
        let (ok, stdout, stderr) = eval(&m, &t);
        assert!(!ok, "{} should fail, printed {stdout:?}", t.display());
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
        for w in wants {
            assert!(stderr.contains(w), "{stderr:?} should mention {w:?}");
        }
    }

    // Mismatched shapes in the weights: the gqa weights under the mha config.
    let bad = tmp.path().join("badmodel");
    std::fs::create_dir(&bad).unwrap();
    std::fs::copy(fixture("mha/config.json"), bad.join("config.json")).unwrap();
    std::fs::copy(
        fixture("gqa/model.safetensors"),
        bad.join("model.safetensors"),
    )
    .unwrap();
    let (ok, _, stderr) = eval(&bad, &fixture("eval/tokens.json"));
    assert!(!ok);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr:?}");
    for w in [
        "model.safetensors",
        "model.embed_tokens.weight",
        "[160, 48]",
        "[128, 32]",
    ] {
        assert!(stderr.contains(w), "{stderr:?} should mention {w:?}");
    }
}

#[test]
fn bench_tiny_runs_and_counts_flops_by_hand() {
    let out = Command::new(env!("CARGO_BIN_EXE_zhllama"))
        .args(["bench", "--preset", "tiny", "--steps", "1", "--warmup", "0"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // tiny: V 1000, C 64, F 176, 2 layers, 4 heads of 16, batch 2 × seq 64. Counted by shape:
    // per layer q,k,v,o 64×64, gate,up 176×64, down 64×176; lm_head 1000×64; each weight matmul
    // 2·N·in·out forward and twice that backward.
    let n = 128.0;
    let weights = 2.0 * (4.0 * 64.0 * 64.0 + 3.0 * 176.0 * 64.0) + 1000.0 * 64.0;
    let matmul = 3.0 * 2.0 * n * weights;
    // Causal attention: per (sequence, head) sum over queries i of (i+1) keys, QKᵀ and PV at
    // 2·16 FLOPs per pair, forward; the backward does 2× that.
    let pairs: f64 = (1..=64).map(|i| i as f64).sum();
    let attention = 3.0 * 2.0 * (2.0 * 16.0 * pairs) * 2.0 * 4.0 * 2.0;
    let got = j["gflop_per_step"].as_f64().unwrap() * 1e9;
    assert!(
        (got - (matmul + attention)).abs() < 1.0,
        "{got} vs {}",
        matmul + attention
    );
    // Random init (std 0.02) gives near-uniform predictions: loss ≈ ln(1000) = 6.91.
    let loss = j["loss"].as_f64().unwrap();
    assert!((loss - 1000f64.ln()).abs() < 0.1, "loss {loss}");
    assert!(j["tokens_per_s"].as_f64().unwrap() > 0.0);
}
