//! The dry run: parameter counts and a memory plan from `config.json` alone (no weights read).
//!
//! Counts follow PEFT's `print_trainable_parameters`: the total includes the LoRA matrices, and
//! the model's vocab is the tokenizer's (after the resize the real run performs).

use super::config::TrainConfig;
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::json;
use std::path::Path;

/// The shape fields of an HF LLaMA `config.json` that the counts need.
#[derive(Clone, Debug, Deserialize)]
pub struct Dims {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    pub vocab_size: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub head_dim: Option<usize>,
}

impl Dims {
    pub fn from_model_dir(dir: &Path) -> Result<Dims> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let dims: Dims = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a LLaMA config", path.display()))?;
        if dims.num_attention_heads == 0
            || !dims.hidden_size.is_multiple_of(dims.num_attention_heads)
        {
            bail!(
                "{}: hidden_size {} is not a multiple of num_attention_heads {}",
                path.display(),
                dims.hidden_size,
                dims.num_attention_heads
            );
        }
        Ok(dims)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// (in, out) features of a projection by HF name.
    pub fn proj_shape(&self, name: &str) -> Result<(usize, usize)> {
        let c = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim();
        let kv = self.kv_heads() * self.head_dim();
        let f = self.intermediate_size;
        Ok(match name {
            "q_proj" => (c, q),
            "k_proj" | "v_proj" => (c, kv),
            "o_proj" => (q, c),
            "gate_proj" | "up_proj" => (c, f),
            "down_proj" => (f, c),
            _ => bail!("unknown projection {name:?}"),
        })
    }

    /// Parameters of the base model at vocab `v`.
    pub fn base_params(&self, v: usize) -> u64 {
        let c = self.hidden_size as u64;
        let per_layer: u64 = [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        .iter()
        .map(|p| {
            let (i, o) = self.proj_shape(p).unwrap();
            (i * o) as u64
        })
        .sum::<u64>()
            + 2 * c;
        let emb = v as u64 * c;
        let head = if self.tie_word_embeddings { 0 } else { emb };
        self.num_hidden_layers as u64 * per_layer + c + emb + head
    }
}

/// Parameter counts of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts {
    pub total: u64,
    pub trainable: u64,
    pub lora: u64,
}

/// Count total and trainable parameters for `cfg` on `dims` with the tokenizer's `vocab`.
pub fn count(dims: &Dims, cfg: &TrainConfig, vocab: usize) -> Result<Counts> {
    let c = dims.hidden_size as u64;
    let mut lora = 0u64;
    for t in &cfg.lora_targets {
        let (i, o) = dims.proj_shape(t)?;
        lora += (cfg.lora_rank * (i + o)) as u64;
    }
    lora *= dims.num_hidden_layers as u64;
    let mut trainable = lora;
    for m in &cfg.modules_to_save {
        match m.as_str() {
            "embed_tokens" => trainable += vocab as u64 * c,
            "lm_head" if !dims.tie_word_embeddings => trainable += vocab as u64 * c,
            "lm_head" => {}
            _ => bail!("unknown module {m:?}"),
        }
    }
    Ok(Counts {
        total: dims.base_params(vocab) + lora,
        trainable,
        lora,
    })
}

/// Bytes per element of weights / activations for a precision name.
fn precision_bytes(precision: &str) -> Result<(u64, u64)> {
    match precision {
        "f32" => Ok((4, 4)),
        "bf16" => Ok((2, 2)),
        _ => bail!("unknown precision {precision:?}: expected f32 or bf16"),
    }
}

/// How a backend lays out a micro-batch's activations (the inputs of [`activation_bytes`] that
/// depend on the backend and precision rather than on the model).
#[derive(Clone, Copy, Debug)]
pub struct ActLayout {
    /// Bytes per activation element (`a` below: 4 f32, 2 bf16/f16).
    pub bytes: u64,
    /// Gradient checkpointing: one layer set shared by all layers.
    pub checkpointing: bool,
    /// The fused lm_head + cross-entropy's vocabulary chunk ([`lm_head_ce_chunk`]), `None` for
    /// whole logits.
    pub ce_chunk: Option<usize>,
}

/// Device bytes of the activations of one training micro-batch of `b` sequences of `t` tokens:
/// exactly what [`crate::model::Activations`] allocates (checked against `Activations::bytes()`
/// in `tests/model_checkpointing.rs`). With N = b·t, C hidden, K = kv width, F ffn, H heads,
/// V vocab, L layers, `a` = `layout.bytes` per activation element, 4 bytes per fp32
/// statistic and per id; LoRA rank r on the targets P (with `in_p` their input width), and
/// `δ` = 1 when the LoRA dropout is > 0:
///
/// - one layer set  S = a·N·(5C + 2K + 3F) + 4·N·(H + 2) + Σ_{p∈P} a·N·(r + δ·in_p)
///   (norm1/q/attention/resid-mid/norm2 outputs, k/v, gate/up/SwiGLU; 1/rms ×2, log-sum-exp;
///   LoRA `x·Aᵀ` and dropped-out input);
/// - residual stream  R = L·a·N·C (each layer's input), head  E = a·N·(2C + V) + 4·N·4
///   (output residual, final norm, logits; its 1/rms, per-token losses, ids, targets);
/// - backward scratch  G = a·N·(V + 4C + 2K + 3F + max(r,1) + δ·W) + 4·C
///   (d-logits, d-residual, d-norm, dq, d-attention, dk/dv, d-gate/up/SwiGLU, LoRA `dxa`, the
///   dropout's `dx` per input width, W = C + F, or C when F = C; the norm-weight scratch).
///
/// Total = R + E + G + L·S without `layout.checkpointing`, R + E + G + S with it (one layer set
/// shared by all layers; each layer's forward is recomputed before its backward). With `ce_chunk =
/// Some(k)` (the CUDA backend's fused lm_head + cross-entropy,
/// `Backend::lm_head_cross_entropy_buffers`) the logits and d-logits (2·a·N·V) are replaced by one
/// `[N, min(V, k)]` chunk and an fp32 log-sum-exp per token: a·N·min(V, k) + 4·N.
pub fn activation_bytes(
    dims: &Dims,
    cfg: &TrainConfig,
    (b, t): (usize, usize),
    vocab: usize,
    layout: ActLayout,
) -> u64 {
    let ActLayout {
        bytes: a,
        checkpointing,
        ce_chunk,
    } = layout;
    let n = (b * t) as u64;
    let c = dims.hidden_size as u64;
    let h = dims.num_attention_heads as u64;
    let k = (dims.kv_heads() * dims.head_dim()) as u64;
    let f = dims.intermediate_size as u64;
    let l = dims.num_hidden_layers as u64;
    let v = vocab as u64;
    let mut targets: Vec<&str> = cfg.lora_targets.iter().map(String::as_str).collect();
    targets.sort_unstable();
    targets.dedup();
    let lora = cfg.lora_rank > 0 && !targets.is_empty();
    let r = if lora { cfg.lora_rank as u64 } else { 0 };
    let delta = u64::from(lora && cfg.lora_dropout > 0.0);
    let mut set = a * n * (5 * c + 2 * k + 3 * f) + 4 * n * (h + 2);
    for tgt in &targets {
        let (i, _) = dims.proj_shape(tgt).unwrap_or((0, 0));
        set += a * n * (r + delta * i as u64);
    }
    let resid = l * a * n * c;
    let head = a * n * (2 * c + v) + 4 * n * 4;
    let w = if f == c { c } else { c + f };
    let grad = a * n * (v + 4 * c + 2 * k + 3 * f + r.max(1) + delta * w) + 4 * c;
    let sets = if checkpointing { 1 } else { l };
    let full = resid + head + grad + sets * set;
    match ce_chunk {
        None => full,
        // The fused op's buffers replace the logits and d-logits.
        Some(cols) => full - 2 * a * n * v + a * n * v.min(cols as u64) + 4 * n,
    }
}

/// The vocabulary chunk of the fused lm_head + cross-entropy at `precision`: the CUDA backend's
/// (every precision but `f32`, which is the CPU backend's layout: whole logits).
pub fn lm_head_ce_chunk(precision: &str) -> Option<usize> {
    (precision != "f32").then_some(crate::backend::cuda_options::LM_HEAD_CE_CHUNK_COLS)
}

/// The dry-run JSON line.
pub fn plan(
    dims: &Dims,
    cfg: &TrainConfig,
    stage: &str,
    vocab: usize,
    world: usize,
    precision: &str,
) -> Result<serde_json::Value> {
    if world == 0 {
        bail!("world size must be ≥ 1");
    }
    let counts = count(dims, cfg, vocab)?;
    let (wb, ab) = precision_bytes(precision)?;
    let p = counts.trainable;
    // ZeRO-2's own arithmetic (the same at every precision: `Zero2` keeps an fp32 master copy, m
    // and v of its shard, and the averaged fp32 gradient shard).
    let mp = crate::distributed::memory_plan(p as usize, world);
    let weights = counts.total * wb;
    // The trainer sums micro-batch gradients in fp32 device buffers, a pairwise tree of them.
    let gradients = p * 4;
    let accumulation = gradients
        * crate::distributed::zero::accumulator_buffers(cfg.accumulation_steps(world)?) as u64;
    let optimizer = p * 12;
    let act_mem = |checkpointing| {
        let layout = ActLayout {
            bytes: ab,
            checkpointing,
            ce_chunk: lm_head_ce_chunk(precision),
        };
        activation_bytes(
            dims,
            cfg,
            (cfg.micro_batch_size, cfg.max_length),
            vocab,
            layout,
        )
    };
    let (acts_full, acts_ckpt) = (act_mem(false), act_mem(true));
    let acts = if cfg.gradient_checkpointing {
        acts_ckpt
    } else {
        acts_full
    };
    let opt_rank = mp.optimizer_bytes_per_rank;
    let grad_rank = mp.gradient_bytes_per_rank;
    Ok(json!({
        "stage": stage,
        "vocab_size": vocab,
        "total_params": counts.total,
        "trainable_params": counts.trainable,
        "trainable_percent": (counts.trainable as f64 / counts.total as f64 * 1e4).round() / 100.0,
        "lora_params": counts.lora,
        "precision": precision,
        "world_size": world,
        "micro_batch_size": cfg.micro_batch_size,
        "max_length": cfg.max_length,
        "accumulation_steps": cfg.accumulation_steps(world)?,
        "weights_bytes": weights,
        "gradient_bytes": gradients,
        "optimizer_bytes": optimizer,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "activation_bytes_per_micro_batch": acts,
        "activation_bytes_per_micro_batch_without_checkpointing": acts_full,
        "activation_bytes_per_micro_batch_with_checkpointing": acts_ckpt,
        "optimizer_bytes_per_rank": opt_rank,
        "gradient_bytes_per_rank": grad_rank,
        "gradient_accumulation_bytes_per_rank": accumulation,
        "total_bytes_per_rank": weights + accumulation + opt_rank + acts,
    }))
}

/// Host bytes the CPU backend needs at least to run `dims` (vocab `vocab`) on `t` tokens without
/// training: the f32 weights, the KV cache (2·L·t·K) and one layer's activations plus the logits,
/// `4·t·(5C + 2K + 3F + V)`. What `eval`, `generate` and `merge-lora` check against the memory
/// available before they load anything.
pub fn inference_bytes(dims: &Dims, vocab: usize, t: usize) -> u64 {
    let c = dims.hidden_size as u64;
    let k = (dims.kv_heads() * dims.head_dim()) as u64;
    let f = dims.intermediate_size as u64;
    let l = dims.num_hidden_layers as u64;
    let t = t as u64;
    let weights = dims.base_params(vocab).saturating_mul(4);
    let per_token = 2 * l * k + 5 * c + 2 * k + 3 * f + vocab as u64;
    weights.saturating_add(t.saturating_mul(4).saturating_mul(per_token))
}

/// `MemAvailable` of `/proc/meminfo`, in bytes (None where there is no such file or line).
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Refuse to load `model_dir` when `need` bytes exceed `available` (`source` says where the
/// figure comes from), naming the model, its size and how to override.
pub fn check_fits(
    model_dir: &Path,
    purpose: &str,
    need: u64,
    available: u64,
    source: &str,
) -> Result<()> {
    if need > available {
        bail!(
            "model {} needs at least {:.2} GiB for {purpose} (from its config.json), but {:.2} GiB \
             is available ({source}); set ZHLLAMA_MEMORY_LIMIT=<bytes> or =off if you know better",
            model_dir.display(),
            need as f64 / (1u64 << 30) as f64,
            available as f64 / (1u64 << 30) as f64
        );
    }
    Ok(())
}
