//! Shared helpers of the model tests: fixture paths, reading the HF reference files written by
//! `tools/oracle/make_reference.py`, and the tolerance check.
#![allow(dead_code)]

use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use zhllama::backend::cpu::CpuBackend;
use zhllama::model::{Checkpoint, Kind, Llama, LlamaConfig, LoraConfig, Proj, TrainSpec};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/model")
        .join(name)
}

/// A reference tensor: shape + values widened to f64.
pub struct RefTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

/// Every tensor of `<case>/reference.safetensors` (f32, f64 or i64), as f64.
pub fn read_reference(case: &str) -> HashMap<String, RefTensor> {
    let bytes = std::fs::read(fixture(case).join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let d = view.data();
        let data: Vec<f64> = match view.dtype() {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            Dtype::F64 => d
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::I64 => d
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            other => panic!("unexpected dtype {other:?} for {name}"),
        };
        out.insert(
            name.to_string(),
            RefTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    out
}

pub fn ids(r: &HashMap<String, RefTensor>, name: &str) -> (Vec<i32>, usize, usize) {
    let t = &r[name];
    (
        t.data.iter().map(|&x| x as i32).collect(),
        t.shape[0],
        t.shape[1],
    )
}

/// A tolerance `|got - ref| <= atol + rtol·|ref|` per element, with `atol = floor · max|ref|`:
/// elements far below the tensor's own scale are judged against that scale (a gradient entry that
/// is a cancellation of larger terms cannot carry more *relative* precision than those terms).
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub rtol: f64,
    pub floor: f64,
    pub why: &'static str,
}

/// Worst `(|got-ref| / (max|ref|))` and whether every element passes `tol`.
pub fn compare(what: &str, got: &[f32], want: &[f64], tol: Tol) -> Result<f64, String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} values, reference has {}",
            got.len(),
            want.len()
        ));
    }
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let atol = tol.floor * scale;
    let mut worst = 0.0f64;
    for (i, (&g, &r)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - r).abs();
        worst = worst.max(err / scale.max(f64::MIN_POSITIVE));
        if err.is_nan() || err > atol + tol.rtol * r.abs() {
            return Err(format!(
                "{what}[{i}]: got {g}, want {r} (|err| {err:.3e} > {atol:.3e} + {}·|ref|; tolerance: {})",
                tol.rtol, tol.why
            ));
        }
    }
    Ok(worst)
}

pub fn cpu() -> Arc<CpuBackend> {
    Arc::new(CpuBackend::new())
}

pub fn load(case: &str, spec: TrainSpec) -> Llama<CpuBackend> {
    Llama::from_dir(cpu(), &fixture(case), spec).unwrap_or_else(|e| panic!("{case}: {e:#}"))
}

/// The LoRA config of the `lora` fixture (make_reference.py).
pub fn fixture_lora() -> LoraConfig {
    LoraConfig::new(
        4,
        8.0,
        0.0,
        &[Proj::Q, Proj::V, Proj::O, Proj::Gate, Proj::Down],
        0,
    )
    .unwrap()
}

/// Load `case` with `spec`; LoRA factors (if any) from the reference file.
pub fn load_with_ref(
    case: &str,
    spec: TrainSpec,
    r: &HashMap<String, RefTensor>,
) -> Llama<CpuBackend> {
    let dir = fixture(case);
    let cfg = LlamaConfig::load(&dir.join("config.json")).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    Llama::new(cpu(), cfg, spec, |e, out| {
        if matches!(e.kind, Kind::LoraA { .. } | Kind::LoraB { .. }) {
            let t = &r[&e.name];
            assert_eq!(t.shape, e.shape, "{}", e.name);
            for (o, x) in out.iter_mut().zip(&t.data) {
                *o = *x as f32;
            }
        } else {
            ck.read_into(&e.name, &e.shape, out)?;
        }
        Ok(true)
    })
    .unwrap()
}
