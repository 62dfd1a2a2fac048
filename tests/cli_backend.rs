//! `--backend cpu|cuda` in the CLI, `zhllama bench --stage`, and the `fill_uniform` op's CPU reference.
//!
//! - A build without the `cuda` feature answers `--backend cuda` on every model subcommand with the
//!   clear "built without the `cuda` feature" error and a non-zero exit, never a panic.
//! - `bench --stage S` and `train --dry-run --stage S` count the trainable parameters by two code
//!   paths (the model's `ParamLayout` vs the dry-run's arithmetic over config.json); both must agree,
//!   and the sft count must equal a count written out by hand from the LoRA shapes.
//! - `fill_uniform` (CPU): range, moments and histogram within stated statistical bounds,
//!   reproducible by seed, different for different seeds.

mod skip_common;

use std::process::Command;
use zhllama::backend::Backend;
use zhllama::backend::cpu::CpuBackend;

fn zhllama(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_zhllama"))
        .args(args)
        .output()
        .expect("run zhllama")
}

#[test]
fn backend_cuda_without_the_feature_is_a_clear_error() {
    if zhllama::backend::cuda::ENABLED {
        skip_common::skip("this build has the `cuda` feature (the error would be about the GPU)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    let (m, d, o, t) = (p("model"), p("data"), p("out"), p("tokens.json"));
    let cases: Vec<Vec<&str>> = vec![
        vec![
            "train",
            "--stage",
            "sft",
            "--model",
            &m,
            "--data",
            &d,
            "--output",
            &o,
            "--backend",
            "cuda",
        ],
        // After a config override, named options go through the trainer's own re-parsing.
        vec![
            "train",
            "--stage",
            "pt1",
            "--model",
            &m,
            "--learning-rate",
            "1e-4",
            "--backend",
            "cuda",
        ],
        vec!["eval", "--model", &m, "--tokens", &t, "--backend", "cuda"],
        vec![
            "generate",
            "--model",
            &m,
            "--tokenizer",
            &t,
            "--prompt",
            "hi",
            "--backend",
            "cuda",
        ],
        vec![
            "bench",
            "--preset",
            "tiny",
            "--backend",
            "cuda",
            "--steps",
            "1",
        ],
        vec![
            "bench",
            "--preset",
            "tiny",
            "--stage",
            "sft",
            "--random-init",
            "--backend",
            "cuda",
        ],
    ];
    for args in cases {
        let out = zhllama(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("built without the `cuda` feature"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: not one line: {err}"
        );
    }
    // An unknown backend is refused by the argument parser, naming the choices.
    let out = zhllama(&["bench", "--preset", "tiny", "--backend", "tpu"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cpu") && err.contains("cuda"), "{err}");
}

fn json_of(out: &std::process::Output, what: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| l.starts_with('{')).unwrap();
    serde_json::from_str(line).unwrap()
}

#[test]
fn bench_stage_counts_trainable_parameters_as_the_dry_run_does() {
    // The `tiny` preset's shape (src/cli/bench.rs): V 1000, C 64, F 176, 2 layers, 4 heads, 4 kv heads.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1000,
            "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 2048, "tie_word_embeddings": false}"#,
    )
    .unwrap();
    let model = dir.path().display().to_string();
    let mut counts = Vec::new();
    for stage in ["pt1", "pt2", "sft"] {
        let bench = json_of(
            &zhllama(&[
                "bench",
                "--preset",
                "tiny",
                "--backend",
                "cpu",
                "--stage",
                stage,
                "--steps",
                "2",
                "--warmup",
                "0",
            ]),
            "bench",
        );
        let dry = json_of(
            &zhllama(&["train", "--stage", stage, "--model", &model, "--dry-run"]),
            "train --dry-run",
        );
        assert_eq!(
            bench["trainable_params"], dry["trainable_params"],
            "stage {stage}: bench {bench} vs dry-run {dry}"
        );
        assert_eq!(bench["total_params"], dry["total_params"], "stage {stage}");
        // Two steps and a warm-up of none: two finite losses, and AdamW moved the second one.
        let losses = bench["losses"].as_array().unwrap();
        assert_eq!(losses.len(), 2, "{stage}");
        let (l0, l1) = (losses[0].as_f64().unwrap(), losses[1].as_f64().unwrap());
        assert!(
            l0.is_finite() && l1.is_finite() && l0 != l1,
            "{stage}: {l0} {l1}"
        );
        counts.push(bench["trainable_params"].as_u64().unwrap());
    }
    // By hand: embedding / lm_head 1000·64 each; LoRA r8 adds r·(in + out) per adapted projection:
    // q,k,v,o 64→64: 8·128 = 1024 each; gate, up 64→176 and down 176→64: 8·240 = 1920 each.
    let (embed, per_qkvo, per_mlp) = (64_000u64, 1024u64, 1920u64);
    assert_eq!(counts[0], embed, "pt1: the embedding only");
    assert_eq!(counts[1], 2 * embed + 2 * 4 * per_qkvo, "pt2");
    assert_eq!(
        counts[2],
        2 * embed + 2 * (4 * per_qkvo + 3 * per_mlp),
        "sft"
    );
}

#[test]
fn fill_uniform_is_uniform_reproducible_and_seeded() {
    let be = CpuBackend::new();
    let n = 1usize << 20;
    let (lo, hi) = (-0.5f32, 2.0f32);
    let mut x = vec![0f32; n];
    be.fill_uniform(&mut x, 42, lo, hi);

    assert!(
        x.iter().all(|&v| (lo..hi).contains(&v)),
        "a value outside [lo, hi)"
    );

    // Moments. For U(lo, hi): mean (lo+hi)/2, variance w²/12 (w = hi − lo), fourth central moment
    // w⁴/80. The sample mean's standard error is σ/√n; the sample variance's is
    // √((μ₄ − σ⁴)/n). A 6-standard-error bound fails by chance with probability ~2e-9 for a true
    // uniform source; at n = 2²⁰ the mean bound is 6·0.289·w/1024 ≈ 1.7e-3·w, so a bias of 1% of
    // the range would be caught.
    let (w, nf) = ((hi - lo) as f64, n as f64);
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / nf;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (nf - 1.0);
    let (mu, sigma2) = ((lo + hi) as f64 / 2.0, w * w / 12.0);
    let se_mean = (sigma2 / nf).sqrt();
    let se_var = ((w.powi(4) / 80.0 - sigma2 * sigma2) / nf).sqrt();
    assert!(
        (mean - mu).abs() < 6.0 * se_mean,
        "mean {mean} vs {mu} (se {se_mean:e})"
    );
    assert!(
        (var - sigma2).abs() < 6.0 * se_var,
        "variance {var} vs {sigma2} (se {se_var:e})"
    );

    // Histogram: 16 equal bins; each count is Binomial(n, 1/16), standard deviation
    // √(n·p·(1−p)) ≈ 248; 6 of those per bin (probability of a false failure ~3e-8 over 16 bins).
    let mut bins = [0usize; 16];
    for &v in &x {
        bins[(((v - lo) / (hi - lo)) as f64 * 16.0).min(15.0) as usize] += 1;
    }
    let (p, expect) = (1.0 / 16.0, nf / 16.0);
    let sd = (nf * p * (1.0 - p)).sqrt();
    for (i, &c) in bins.iter().enumerate() {
        assert!(
            (c as f64 - expect).abs() < 6.0 * sd,
            "bin {i}: {c} vs {expect}"
        );
    }

    // Neighbours are uncorrelated: the lag-1 correlation of n independent values has standard error
    // 1/√n; bound 6/√n.
    let cov = x
        .windows(2)
        .map(|p| (p[0] as f64 - mean) * (p[1] as f64 - mean))
        .sum::<f64>()
        / (nf - 1.0);
    assert!(
        (cov / var).abs() < 6.0 / nf.sqrt(),
        "lag-1 correlation {}",
        cov / var
    );

    // Same seed: the same bits; another seed: (almost) every value differs — two independent
    // 24-bit draws coincide with probability 2⁻²⁴, so ~0.06 equal pairs are expected in 2²⁰.
    let mut y = vec![0f32; n];
    be.fill_uniform(&mut y, 42, lo, hi);
    assert!(x.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()));
    be.fill_uniform(&mut y, 43, lo, hi);
    let same = x.iter().zip(&y).filter(|(a, b)| a == b).count();
    assert!(same < 8, "{same} equal values between seeds 42 and 43");

    // Indices count from the start of the view: a sub-slice gets the stream's first values.
    let mut z = vec![0f32; 1000];
    be.fill_uniform(&mut z[..], 42, lo, hi);
    assert_eq!(&z[..], &x[..1000]);

    // lo == hi is a constant fill (how norms are set to one on the device).
    be.fill_uniform(&mut z, 7, 1.0, 1.0);
    assert!(z.iter().all(|&v| v == 1.0));
}

#[test]
fn random_on_device_has_the_init_scales_of_random() {
    use std::sync::Arc;
    use zhllama::model::{Kind, Llama, LlamaConfig};
    use zhllama::train::config::{Stage, TrainConfig};
    let cfg = LlamaConfig::new(1000, 128, 352, 2, 2, 1);
    let spec = zhllama::train::setup::train_spec(&TrainConfig::preset(Stage::Sft)).unwrap();
    let be = Arc::new(CpuBackend::new());
    let m = Llama::random_on_device(be.clone(), cfg.clone(), spec.clone(), 5).unwrap();
    let host = m.download_params().unwrap();
    let std = cfg.initializer_range as f64;
    for e in m.layout().entries() {
        let v = host.entry(e);
        let n = v.len() as f64;
        match e.kind {
            Kind::Norm { .. } | Kind::FinalNorm => {
                assert!(v.iter().all(|&x| x == 1.0), "{}: norms are one", e.name)
            }
            Kind::LoraB { .. } => assert!(v.iter().all(|&x| x == 0.0), "{}: B is zero", e.name),
            Kind::LoraA { .. } => {
                // PEFT's kaiming-uniform bound 1/√fan_in.
                let b = 1.0 / (e.shape[1] as f32).sqrt();
                assert!(v.iter().all(|&x| x.abs() <= b), "{}: outside ±{b}", e.name);
                assert!(
                    v.iter().any(|&x| x.abs() > 0.5 * b),
                    "{}: not spread",
                    e.name
                );
            }
            _ => {
                // HF's init has standard deviation `initializer_range`; the uniform stand-in must too.
                // The sample variance of n uniforms has relative standard error √(0.8/n) (kurtosis
                // 9/5 of the uniform: Var(s²)/σ⁴ = (9/5 − 1)/n); bound 6 of those.
                let var = v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / n;
                let rel = (var / (std * std) - 1.0).abs();
                assert!(
                    rel < 6.0 * (0.8 / n).sqrt(),
                    "{}: variance {var} vs {}",
                    e.name,
                    std * std
                );
            }
        }
    }
    // The host-initialised model has the same layout: the two can stand in for each other.
    let h = Llama::random(be, cfg, spec, 5).unwrap();
    assert_eq!(h.layout().entries().len(), m.layout().entries().len());
    assert_eq!(h.layout().trainable_len(), m.layout().trainable_len());
    assert_eq!(h.layout().frozen_len(), m.layout().frozen_len());
}
