//! Training parity with PyTorch + transformers + PEFT (fixtures from
//! `tools/oracle/make_train_reference.py`): for each stage, K = 6 optimizer steps with gradient
//! accumulation 2 and active clipping, from the same initial weights (LoRA A and B written by the
//! oracle) with LoRA dropout 0. Checks per-step LR, loss and gradient norm, the final trainable
//! weights, the PEFT adapter layout, and merging PEFT's own adapter.

mod skip_common;
mod train_common;

use safetensors::SafeTensors;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use zhllama::backend::Backend;
use zhllama::backend::cpu::CpuBackend;
use zhllama::distributed::LocalComm;
use zhllama::train::config::{Stage, TrainConfig};
use zhllama::train::data::{Batch, Data};
use zhllama::train::{schedule::CosineSchedule, setup, trainer::Trainer};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train")
}

fn read_st(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{n}");
            let data = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (n, (v.shape().to_vec(), data))
        })
        .collect()
}

fn batch(mb: &Value) -> Batch {
    let rows = |k: &str| -> Vec<Vec<i32>> {
        mb[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_i64().unwrap() as i32)
                    .collect()
            })
            .collect()
    };
    let (ids, labels) = (rows("ids"), rows("labels"));
    let (b, t) = (ids.len(), ids[0].len());
    let ids: Vec<i32> = ids.concat();
    Batch {
        b,
        t,
        tokens: ids.iter().filter(|&&x| x != 64).count(),
        ids,
        labels: labels.concat(),
    }
}

/// Worst `|a - r| / (atol + rtol·|r|)` over two tensors (≤ 1 passes).
fn worst(a: &[f32], r: &[f32], atol: f64, rtol: f64) -> f64 {
    assert_eq!(a.len(), r.len());
    a.iter()
        .zip(r)
        .map(|(&a, &r)| (a as f64 - r as f64).abs() / (atol + rtol * (r as f64).abs()))
        .fold(0.0, f64::max)
}

/// `tensors` (HF names) as a PEFT adapter directory for `cfg`'s LoRA settings.
fn write_peft_adapter(
    dir: &Path,
    tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    cfg: &TrainConfig,
) {
    std::fs::create_dir_all(dir).unwrap();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, (s, d))| {
            (
                format!("base_model.model.{n}"),
                s.clone(),
                d.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors")).unwrap();
    let c = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha, "lora_dropout": 0.0, "target_modules": cfg.lora_targets,
        "modules_to_save": cfg.modules_to_save, "bias": "none",
    });
    std::fs::write(dir.join("adapter_config.json"), c.to_string()).unwrap();
}

fn config_for(stage: Stage, r: &Value) -> TrainConfig {
    let strs = |k: &str| -> Vec<String> {
        r[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect()
    };
    let micro = r["micro_batch_size"].as_u64().unwrap() as usize;
    let accum = r["accumulation"].as_u64().unwrap() as usize;
    TrainConfig {
        batch_size: micro * accum,
        micro_batch_size: micro,
        learning_rate: r["lr"].as_f64().unwrap(),
        max_steps: r["steps"].as_u64().unwrap(),
        max_length: 64,
        warmup_ratio: r["warmup_ratio"].as_f64().unwrap(),
        weight_decay: r["weight_decay"].as_f64().unwrap(),
        max_grad_norm: r["max_grad_norm"].as_f64().unwrap(),
        lora_rank: if strs("lora_targets").is_empty() {
            0
        } else {
            4
        },
        lora_alpha: r["lora_alpha"].as_f64().unwrap(),
        lora_dropout: 0.0,
        lora_targets: strs("lora_targets"),
        modules_to_save: strs("modules_to_save"),
        // The fixtures made before the key existed are the default reduction's.
        loss_reduction: r["loss_reduction"]
            .as_str()
            .unwrap_or("micro-batch-mean")
            .to_string(),
        ..TrainConfig::preset(stage)
    }
}

// Tolerances (each about ten times the worst measured over the four fixtures: three stages, and
// sft with the token-mean reduction).
// - Loss: rel 1e-6. Both sides run the same f32 math; only summation order differs (GEMM
//   blocking, softmax reductions), ~1e-7 relative per op. Measured worst 1.1e-7 (2 f32 ulps).
// - Gradient norm: rel 5e-5; it is a sum of squares of many gradients, each with ~1e-6 relative
//   noise, and it sets the clipping factor. Measured worst 6.0e-6 (sft step 4).
// - Final weights: atol 5e-6 + rtol 5e-5. AdamW normalises each update by sqrt(v): an element
//   with a near-zero gradient gets an update of size ~lr whose sign follows float noise, so after
//   K steps at lr 1e-2 an element can differ by O(lr · noise / |g|). Measured worst 0.14 of this
//   tolerance (max |Δ| 1.1e-6, sft embed_tokens), while a wrong step (a missed clip, an
//   off-by-one LR, a bias-correction slip) moves weights by ≥ 1e-3 (every tensor moves by more
//   than a thousand tolerances, asserted below).
const LOSS_RTOL: f64 = 1e-6;
const NORM_RTOL: f64 = 5e-5;
const W_ATOL: f64 = 5e-6;
const W_RTOL: f64 = 5e-5;

/// The fixture `name` (`{name}_reference.json`, `{name}_init/final.safetensors`) of `stage`.
fn parity(stage: Stage) {
    parity_of(stage, &stage.to_string());
}

fn parity_of(stage: Stage, name: &str) {
    let fx = fixtures();
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(fx.join(format!("{name}_reference.json"))).unwrap(),
    )
    .unwrap();
    let cfg = config_for(stage, &r);
    assert_eq!(
        cfg.warmup(),
        r["warmup_steps"].as_u64().unwrap(),
        "HF warmup rounding"
    );
    let be = Arc::new(CpuBackend::new());
    // The oracle's initial trainable weights (its LoRA A/B, the embedding/lm_head it trains).
    let init = read_st(&fx.join(format!("{name}_init.safetensors")));
    let tmp = tempfile::tempdir().unwrap();
    let model = if stage == Stage::Pt1 {
        // pt1 trains the embedding alone (no adapter): its initial value is the base's.
        let model = setup::load_model(be.clone(), &fx.join("base"), &cfg, stage, 65, None).unwrap();
        let host = model.download_params().unwrap();
        for e in model
            .layout()
            .entries()
            .iter()
            .filter(|e| e.loc().trainable())
        {
            assert_eq!(
                &host.trainable[e.range.clone()],
                init[&e.name].1.as_slice(),
                "{}",
                e.name
            );
        }
        model
    } else {
        // pt2/sft start from them as a PEFT adapter, as `train --init-adapter` does.
        let dir = tmp.path().join("init_adapter");
        write_peft_adapter(&dir, &init, &cfg);
        let ad = zhllama::model::peft::load_adapter(&dir).unwrap();
        let mut c = cfg.clone();
        assert!(
            setup::adopt_adapter_config(&mut c, stage, &ad, &dir)
                .unwrap()
                .is_empty()
        );
        setup::load_model_init(be.clone(), &fx.join("base"), &c, stage, 65, None, Some(&ad))
            .unwrap()
    };
    let layout = model.layout().clone();
    let host = model.download_params().unwrap();
    let mut n_trainable = 0;
    for e in layout.entries().iter().filter(|e| e.loc().trainable()) {
        let (shape, data) = init
            .get(&e.name)
            .unwrap_or_else(|| panic!("oracle lacks {}", e.name));
        assert_eq!(shape, &e.shape, "{}", e.name);
        assert!(
            &host.trainable[e.range.clone()] == data.as_slice(),
            "{}: not the oracle's",
            e.name
        );
        n_trainable += 1;
    }
    assert_eq!(n_trainable, init.len(), "same trainable tensors as PyTorch");

    let data = Data::open(&train_common::pretrain_data(&tmp.path().join("d"), 64, 16)).unwrap();
    let comm = LocalComm;
    let mut t = Trainer::new(
        model,
        &data,
        cfg.clone(),
        stage,
        &comm,
        &tmp.path().join("o"),
        None,
    )
    .unwrap();
    for (s, micro) in r["batches"].as_array().unwrap().iter().enumerate() {
        let batches: Vec<Batch> = micro.as_array().unwrap().iter().map(batch).collect();
        let rec = t.step_with(&batches, false).unwrap();
        let (want_loss, want_norm, want_lr) = (
            r["losses"][s].as_f64().unwrap(),
            r["grad_norms"][s].as_f64().unwrap(),
            r["lrs"][s].as_f64().unwrap(),
        );
        let (loss, norm, lr) = (rec.loss.unwrap(), rec.grad_norm.unwrap(), rec.lr.unwrap());
        eprintln!(
            "{stage} step {s}: loss {loss:.7} ref {want_loss:.7}  norm {norm:.6} ref {want_norm:.6}  lr {lr:e} ref {want_lr:e}"
        );
        assert!(
            (lr - want_lr).abs() <= 1e-15 * want_lr.abs(),
            "{stage} step {s}: lr {lr} vs {want_lr}"
        );
        eprintln!(
            "{stage} step {s}: loss rel err {:.3e}, norm rel err {:.3e}",
            (loss - want_loss).abs() / want_loss.abs(),
            (norm - want_norm).abs() / want_norm
        );
        assert!(
            (loss - want_loss).abs() <= LOSS_RTOL * want_loss.abs(),
            "{stage} step {s}: loss {loss} vs {want_loss}"
        );
        assert!(
            (norm - want_norm).abs() <= NORM_RTOL * want_norm,
            "{stage} step {s}: grad norm {norm} vs {want_norm}"
        );
        assert_eq!(rec.skipped, Some(false));
    }
    // At least one step clipped and one did not (the fixture is built that way).
    let norms: Vec<f64> = r["grad_norms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!(
        norms.iter().any(|&n| n > cfg.max_grad_norm)
            && norms.iter().any(|&n| n < cfg.max_grad_norm)
    );

    let final_ref = read_st(&fx.join(format!("{name}_final.safetensors")));
    let params = t.params();
    for e in layout.entries().iter().filter(|e| e.loc().trainable()) {
        let (_, want) = &final_ref[&e.name];
        let init_w = &init[&e.name].1;
        let got = &params[e.range.clone()];
        let w = worst(got, want, W_ATOL, W_RTOL);
        // the weights did move, by far more than the tolerance
        let moved = worst(init_w, want, W_ATOL, W_RTOL);
        let max_abs = got
            .iter()
            .zip(want.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "{stage} {}: worst {w:.3} (moved {moved:.1}), max |Δ| {max_abs:.3e}",
            e.name
        );
        assert!(
            w <= 1.0,
            "{stage} {}: final weights off by {w} tolerance units",
            e.name
        );
        assert!(
            moved > 1000.0,
            "{stage} {}: weights barely moved ({moved})",
            e.name
        );
    }

    // Our adapter has PEFT's layout: same tensor names, shapes and config as PEFT's own save
    // (checked once per stage, on the default reduction's fixture).
    if stage != Stage::Pt1 && name == stage.to_string() {
        let ours = tmp.path().join("adapter");
        let host = t.model.download_params().unwrap();
        zhllama::model::peft::save_adapter(
            &ours,
            &host,
            t.model.lora(),
            &cfg.modules_to_save,
            None,
        )
        .unwrap();
        let peft_dir = fx.join(format!("{stage}_peft_adapter"));
        let a = read_st(&ours.join("adapter_model.safetensors"));
        let b = read_st(&peft_dir.join("adapter_model.safetensors"));
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (n, (shape, data)) in &a {
            assert_eq!(shape, &b[n].0, "{n}");
            assert!(worst(data, &b[n].1, W_ATOL, W_RTOL) <= 1.0, "{n}");
        }
        let ca: Value = serde_json::from_str(
            &std::fs::read_to_string(ours.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let cb: Value = serde_json::from_str(
            &std::fs::read_to_string(peft_dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        for k in [
            "peft_type",
            "task_type",
            "r",
            "lora_alpha",
            "bias",
            "fan_in_fan_out",
        ] {
            assert_eq!(ca[k], cb[k], "adapter_config {k}");
        }
        let sorted = |v: &Value| {
            let mut s: Vec<String> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_string())
                .collect();
            s.sort();
            s
        };
        assert_eq!(sorted(&ca["target_modules"]), sorted(&cb["target_modules"]));
        assert_eq!(
            sorted(&ca["modules_to_save"]),
            sorted(&cb["modules_to_save"])
        );

        // Merging PEFT's adapter gives PEFT's merge_and_unload (W += B·A·alpha/r, full modules
        // replaced). atol 1e-6: one rank-4 product per element, summed in a different order.
        let ad = zhllama::model::peft::load_adapter(&peft_dir).unwrap();
        let merged = tmp.path().join("merged");
        zhllama::model::peft::merge_into_dir(&fx.join("base"), &[ad], &merged, 1 << 20).unwrap();
        assert!(merged.join("model.safetensors.index.json").exists());
        let ck = zhllama::model::weights::Checkpoint::open(&merged).unwrap();
        let want = read_st(&fx.join(format!("{stage}_merged.safetensors")));
        let mut n = 0;
        for (name, (shape, data)) in &want {
            let (s, got) = ck.read(name).unwrap();
            assert_eq!(&s, shape, "{name}");
            assert!(worst(&got, data, 1e-6, 1e-6) <= 1.0, "merged {name}");
            n += 1;
        }
        assert_eq!(n, ck.names().count(), "same tensors as PEFT's merged model");
    }
}

#[test]
fn pt1_matches_pytorch() {
    parity(Stage::Pt1);
}

#[test]
fn pt2_matches_pytorch_and_peft() {
    parity(Stage::Pt2);
}

#[test]
fn sft_matches_pytorch_and_peft() {
    parity(Stage::Sft);
}

/// HF Trainer's `num_items_in_batch` reduction (`--loss-reduction token-mean`): every target
/// token of the accumulated batch weighs the same. The fixture's micro-batches have different
/// target counts, so the original scripts' reduction would give other losses and gradients.
#[test]
fn sft_token_mean_matches_hf_trainer_num_items_in_batch() {
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("sft_token_mean_reference.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(r["loss_reduction"], "token-mean");
    let counts = |mb: &Value| {
        mb["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array().unwrap()[1..]
                    .iter()
                    .filter(|l| l.as_i64() != Some(-100))
                    .count()
            })
            .sum::<usize>()
    };
    let uneven = r["batches"].as_array().unwrap().iter().filter(|step| {
        let c: Vec<usize> = step.as_array().unwrap().iter().map(counts).collect();
        c.iter().any(|&x| x != c[0])
    });
    assert!(
        uneven.count() >= 3,
        "the fixture needs steps whose micro-batches have different target counts"
    );
    parity_of(Stage::Sft, "sft_token_mean");
}

#[test]
fn cosine_schedule_matches_hf() {
    let refs: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("schedule_reference.json")).unwrap(),
    )
    .unwrap();
    for case in refs.as_array().unwrap() {
        let s = CosineSchedule {
            base_lr: 1.0,
            warmup_steps: case["warmup"].as_u64().unwrap(),
            total_steps: case["total"].as_u64().unwrap(),
        };
        for (i, want) in case["lrs"].as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap();
            // Same f64 formula in the same order: equal to the last bit (1e-15 allows for a libm
            // cos that differs by an ulp).
            assert!((s.lr(i as u64) - want).abs() <= 1e-15, "{case:?} step {i}");
        }
    }
}

/// `peft_check.json` (oracle `--check-run`): transformers loaded zhllama's merged model and wrote
/// its logits; here zhllama's own logits for the merged model (merge-lora of the committed
/// adapter) match transformers'. (That PEFT loads what `save_adapter` writes today is checked
/// live, by PEFT itself, in `peft_loads_the_adapter_save_adapter_writes`.) atol 1e-5: logits are
/// O(1), one forward of f32 math in a different order (~1e-7 relative per op, a few dozen ops deep).
#[test]
fn transformers_loads_our_merged_model_with_our_logits() {
    let fx = fixtures();
    let check: Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("peft_check.json")).unwrap())
            .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ad = zhllama::model::peft::load_adapter(&fx.join("zhllama_sft_adapter")).unwrap();
    let merged = tmp.path().join("merged");
    zhllama::model::peft::merge_into_dir(&fx.join("base"), &[ad], &merged, 1 << 30).unwrap();
    let be = Arc::new(CpuBackend::new());
    let model =
        zhllama::model::Llama::from_dir(be.clone(), &merged, zhllama::model::TrainSpec::frozen())
            .unwrap();
    let ids: Vec<Vec<i32>> = check["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap() as i32)
                .collect()
        })
        .collect();
    let (b, t) = (ids.len(), ids[0].len());
    let mut acts = zhllama::model::Activations::new_inference(&model, b, t).unwrap();
    model.forward_logits(&mut acts, &ids.concat()).unwrap();
    let v = model.config().vocab_size;
    let mut got = vec![0.0f32; b * t * v];
    be.download(acts.logits(), &mut got).unwrap();
    let want: Vec<f32> = check["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter())
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect();
    assert_eq!(got.len(), want.len());
    let w = worst(&got, &want, 1e-5, 0.0);
    assert!(w <= 1.0, "logits differ from transformers' by {w} × 1e-5");
}

/// The python of the live PEFT oracle venv (`ZHLLAMA_PEFT_PYTHON`, set by tools/test.sh), or
/// `None` after a skip.
fn peft_python() -> Option<PathBuf> {
    let py = std::env::var_os("ZHLLAMA_PEFT_PYTHON").map(PathBuf::from);
    match py {
        Some(p) if p.exists() => Some(p),
        _ => {
            skip_common::skip(
                "ZHLLAMA_PEFT_PYTHON does not name a python with torch + transformers + peft \
                 (tools/test.sh installs tools/oracle/peft_requirements.txt)",
            );
            None
        }
    }
}

/// PEFT itself (`PeftModel.from_pretrained`, tools/oracle/peft_check.py) loads the adapter that
/// `save_adapter` writes now (the SFT stage: LoRA on every projection, embed_tokens and lm_head in
/// full, all with trained, non-zero values), and its logits equal zhllama's for the same base +
/// adapter. Tolerance atol 2.5e-6 on logits of size O(1): both sides run one f32 forward whose
/// operations differ only in order (~1e-7 relative each, a few dozen deep); PEFT adds B·A·x
/// unmerged where zhllama merges W + s·B·A first, another few ulps. Measured worst 2.4e-7 (torch
/// 2.15.0, transformers 4.57.6, peft 0.21.2); the bound is ten times that.
#[test]
fn peft_loads_the_adapter_save_adapter_writes() {
    let Some(py) = peft_python() else { return };
    let fx = fixtures();
    let stage = Stage::Sft;
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(fx.join(format!("{stage}_reference.json"))).unwrap(),
    )
    .unwrap();
    let cfg = config_for(stage, &r);
    let be = Arc::new(CpuBackend::new());
    let mut model = setup::load_model(be.clone(), &fx.join("base"), &cfg, stage, 65, None).unwrap();
    // The oracle's trained weights: LoRA B non-zero, embedding and lm_head moved off the base.
    let fin = read_st(&fx.join(format!("{stage}_final.safetensors")));
    let mut host = model.download_params().unwrap();
    for e in model
        .layout()
        .entries()
        .iter()
        .filter(|e| e.loc().trainable())
    {
        let (_, data) = &fin[&e.name];
        assert!(data.iter().any(|&x| x != 0.0), "{}: all zero", e.name);
        host.trainable[e.range.clone()].copy_from_slice(data);
    }
    be.upload(model.trainable_mut(), &host.trainable).unwrap();
    let host = model.download_params().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    zhllama::model::peft::save_adapter(&adapter, &host, model.lora(), &cfg.modules_to_save, None)
        .unwrap();

    // zhllama: merge-lora of that adapter, then a forward.
    let ad = zhllama::model::peft::load_adapter(&adapter).unwrap();
    let merged = tmp.path().join("merged");
    zhllama::model::peft::merge_into_dir(&fx.join("base"), &[ad], &merged, 1 << 30).unwrap();
    let m =
        zhllama::model::Llama::from_dir(be.clone(), &merged, zhllama::model::TrainSpec::frozen())
            .unwrap();
    let (b, t) = (2, 12);
    let ids: Vec<i32> = (0..b * t)
        .map(|i| 3 + ((i * 37 + 11) % 61) as i32)
        .collect();
    let mut acts = zhllama::model::Activations::new_inference(&m, b, t).unwrap();
    m.forward_logits(&mut acts, &ids).unwrap();
    let v = m.config().vocab_size;
    let mut got = vec![0.0f32; b * t * v];
    be.download(acts.logits(), &mut got).unwrap();
    // ... and the base model's, to show the adapter matters.
    let base = zhllama::model::Llama::from_dir(
        be.clone(),
        &fx.join("base"),
        zhllama::model::TrainSpec::frozen(),
    )
    .unwrap();
    let mut acts = zhllama::model::Activations::new_inference(&base, b, t).unwrap();
    base.forward_logits(&mut acts, &ids).unwrap();
    let mut plain = vec![0.0f32; b * t * v];
    be.download(acts.logits(), &mut plain).unwrap();

    // PEFT.
    let rows: Vec<Vec<i32>> = ids.chunks(t).map(<[i32]>::to_vec).collect();
    let out = tmp.path().join("peft.json");
    let o = std::process::Command::new(&py)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/oracle/peft_check.py"))
        .arg("--base")
        .arg(fx.join("base"))
        .arg("--adapter")
        .arg(&adapter)
        .args(["--ids", &serde_json::to_string(&rows).unwrap(), "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "PEFT could not load our adapter:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let res: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let want: Vec<f32> = res["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter())
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect();
    assert_eq!(got.len(), want.len());
    const ATOL: f64 = 2.5e-6;
    let w = worst(&got, &want, ATOL, 0.0);
    let moved = worst(&plain, &want, ATOL, 0.0);
    eprintln!(
        "PEFT {}: worst |Δ| {:.3e}; the base model is {moved:.0} tolerances away",
        res["versions"],
        w * ATOL
    );
    assert!(w <= 1.0, "logits differ from PEFT's by {w} × {ATOL}");
    assert!(
        moved > 100.0,
        "the adapter barely changes the logits ({moved})"
    );
}
