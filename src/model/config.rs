//! The LLaMA hyper-parameters, read from and written back to an HF `config.json`.
//!
//! Only the keys the model uses are typed; the whole JSON object is kept in [`LlamaConfig::raw`] so
//! that keys we do not understand (`architectures`, `bos_token_id`, `rope_scaling`, ...) survive a
//! load → save round trip unchanged.

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value};
use std::path::Path;

/// The shape of a `LlamaForCausalLM` (HF `LlamaConfig`, the keys zhllama uses).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); HF's default is `num_attention_heads`.
    pub num_key_value_heads: usize,
    pub rms_norm_eps: f32,
    /// RoPE base; HF's default is 10000.
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
    /// `lm_head.weight` is `model.embed_tokens.weight` (no separate tensor in the checkpoint).
    pub tie_word_embeddings: bool,
    /// Std of the normal init HF uses for new weights (embedding rows added by a vocab resize).
    pub initializer_range: f32,
    /// The dtype the checkpoint was saved in (`"float32"`, `"float16"`, `"bfloat16"`), if stated.
    pub torch_dtype: Option<String>,
    /// The whole JSON object as read; [`LlamaConfig::to_json`] overlays the typed fields on it.
    pub raw: Map<String, Value>,
}

fn get_usize(obj: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|x| Some(x as usize))
            .with_context(|| format!("`{key}` must be a non-negative integer, got {v}")),
    }
}

fn get_f32(obj: &Map<String, Value>, key: &str) -> Result<Option<f32>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(|x| Some(x as f32))
            .with_context(|| format!("`{key}` must be a number, got {v}")),
    }
}

fn req_usize(obj: &Map<String, Value>, key: &str) -> Result<usize> {
    get_usize(obj, key)?.with_context(|| format!("missing required key `{key}`"))
}

impl LlamaConfig {
    /// A config with HF's defaults for everything but the shape.
    pub fn new(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
    ) -> Self {
        LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            initializer_range: 0.02,
            torch_dtype: Some("float32".into()),
            raw: Map::new(),
        }
    }

    /// Parse and validate the JSON text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).context("not valid JSON")?;
        let Value::Object(obj) = value else {
            bail!("expected a JSON object at the top level");
        };
        let heads = req_usize(&obj, "num_attention_heads")?;
        let cfg = LlamaConfig {
            vocab_size: req_usize(&obj, "vocab_size")?,
            hidden_size: req_usize(&obj, "hidden_size")?,
            intermediate_size: req_usize(&obj, "intermediate_size")?,
            num_hidden_layers: req_usize(&obj, "num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: get_usize(&obj, "num_key_value_heads")?.unwrap_or(heads),
            rms_norm_eps: get_f32(&obj, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: match get_f32(&obj, "rope_theta")? {
                Some(t) => t,
                // transformers >= 4.5x may nest the base in `rope_parameters`.
                None => obj
                    .get("rope_parameters")
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|v| v.as_f64())
                    .map(|x| x as f32)
                    .unwrap_or(10000.0),
            },
            max_position_embeddings: get_usize(&obj, "max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: match obj.get("tie_word_embeddings") {
                None | Some(Value::Null) => false,
                Some(v) => v
                    .as_bool()
                    .with_context(|| format!("`tie_word_embeddings` must be a bool, got {v}"))?,
            },
            initializer_range: get_f32(&obj, "initializer_range")?.unwrap_or(0.02),
            torch_dtype: obj
                .get("torch_dtype")
                .or_else(|| obj.get("dtype"))
                .and_then(|v| v.as_str())
                .map(str::to_owned),
            raw: obj,
        };
        if let Some(scaling) = cfg.raw.get("rope_scaling")
            && !scaling.is_null()
        {
            bail!("`rope_scaling` = {scaling} is not supported (plain RoPE only)");
        }
        if let Some(rt) = cfg
            .raw
            .get("rope_parameters")
            .and_then(|p| p.get("rope_type"))
            .and_then(|v| v.as_str())
            && rt != "default"
        {
            bail!("`rope_parameters.rope_type` = {rt:?} is not supported (plain RoPE only)");
        }
        if let Some(act) = cfg.raw.get("hidden_act").and_then(|v| v.as_str())
            && act != "silu"
        {
            bail!("`hidden_act` = {act:?} is not supported (LLaMA uses \"silu\")");
        }
        for key in ["attention_bias", "mlp_bias"] {
            if cfg.raw.get(key).and_then(|v| v.as_bool()) == Some(true) {
                bail!("`{key}` = true is not supported (LLaMA projections have no bias)");
            }
        }
        if let Some(hd) = get_usize(&cfg.raw, "head_dim")?
            && cfg.num_attention_heads > 0
            && hd * cfg.num_attention_heads != cfg.hidden_size
        {
            bail!(
                "`head_dim` = {hd} but hidden_size {} / num_attention_heads {} = {} (only head_dim = hidden/heads is supported)",
                cfg.hidden_size,
                cfg.num_attention_heads,
                cfg.hidden_size / cfg.num_attention_heads
            );
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read and validate `path` (an HF `config.json`).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_json_str(&text).with_context(|| format!("bad LLaMA config {}", path.display()))
    }

    /// Check the shape is one the model can run: positive sizes, heads divide hidden, kv heads divide
    /// heads, even head dim (RoPE rotates pairs).
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
        ] {
            if v == 0 {
                bail!("`{name}` must be positive, got 0");
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            bail!(
                "num_attention_heads {} is not divisible by num_key_value_heads {}",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!("head dim {} must be even for RoPE", self.head_dim());
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            bail!("`rms_norm_eps` must be positive, got {}", self.rms_norm_eps);
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            bail!("`rope_theta` must be positive, got {}", self.rope_theta);
        }
        if self.vocab_size > i32::MAX as usize {
            bail!(
                "`vocab_size` {} does not fit token ids (i32)",
                self.vocab_size
            );
        }
        Ok(())
    }

    /// Per-head dimension `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Width of the k and v projections: `num_key_value_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim()
    }

    /// Parameters of one decoder layer (4 attention projections, 3 MLP projections, 2 norms).
    pub fn params_per_layer(&self) -> usize {
        let (c, f, kv) = (self.hidden_size, self.intermediate_size, self.kv_dim());
        2 * c * c + 2 * c * kv + 3 * c * f + 2 * c
    }

    /// All parameters, counting a tied embedding once.
    pub fn num_params(&self) -> usize {
        let emb = self.vocab_size * self.hidden_size;
        let head = if self.tie_word_embeddings { 0 } else { emb };
        emb + head + self.num_hidden_layers * self.params_per_layer() + self.hidden_size
    }

    /// Multiply-add FLOPs (2 per MAC) of one training step (forward + backward) on `b` sequences
    /// of `t` tokens with every weight trainable:
    /// - every matmul with a weight (7 projections per layer + lm_head): `2·N·in·out` forward, the
    ///   same again for the input gradient and for the weight gradient → `6·N·P_mm`;
    /// - causal attention: `QKᵀ` and `P·V` touch `T(T+1)/2` (query, key) pairs per head,
    ///   `2·d` FLOPs each → `2·B·H·d·T(T+1)` forward; the backward has four such products → 2× that;
    /// - elementwise ops (norms, RoPE, softmax, SwiGLU, cross-entropy) and the embedding gather
    ///   are not counted (< 1% at the bench shapes).
    pub fn train_step_flops(&self, b: usize, t: usize) -> f64 {
        let n = (b * t) as f64;
        let (c, f, kv) = (
            self.hidden_size as f64,
            self.intermediate_size as f64,
            self.kv_dim() as f64,
        );
        let p_mm = self.num_hidden_layers as f64 * (2.0 * c * c + 2.0 * c * kv + 3.0 * c * f)
            + self.vocab_size as f64 * c;
        let attn_fwd = 2.0
            * b as f64
            * self.num_attention_heads as f64
            * self.head_dim() as f64
            * (t * (t + 1)) as f64
            * self.num_hidden_layers as f64;
        6.0 * n * p_mm + 3.0 * attn_fwd
    }

    /// The config as a JSON object: the raw keys as read, with every typed field overlaid.
    pub fn to_json(&self) -> Value {
        let mut obj = self.raw.clone();
        let mut set = |k: &str, v: Value| {
            obj.insert(k.to_owned(), v);
        };
        set("vocab_size", self.vocab_size.into());
        set("hidden_size", self.hidden_size.into());
        set("intermediate_size", self.intermediate_size.into());
        set("num_hidden_layers", self.num_hidden_layers.into());
        set("num_attention_heads", self.num_attention_heads.into());
        set("num_key_value_heads", self.num_key_value_heads.into());
        set("rms_norm_eps", f32_json(self.rms_norm_eps));
        set(
            "max_position_embeddings",
            self.max_position_embeddings.into(),
        );
        set("tie_word_embeddings", self.tie_word_embeddings.into());
        set("initializer_range", f32_json(self.initializer_range));
        if let Some(p) = obj
            .get_mut("rope_parameters")
            .and_then(|p| p.as_object_mut())
        {
            p.insert("rope_theta".into(), f32_json(self.rope_theta));
        } else {
            obj.insert("rope_theta".into(), f32_json(self.rope_theta));
        }
        if let Some(d) = &self.torch_dtype {
            let key = if obj.contains_key("dtype") && !obj.contains_key("torch_dtype") {
                "dtype"
            } else {
                "torch_dtype"
            };
            obj.insert(key.into(), Value::String(d.clone()));
        }
        obj.entry("model_type").or_insert_with(|| "llama".into());
        obj.entry("architectures")
            .or_insert_with(|| Value::Array(vec!["LlamaForCausalLM".into()]));
        obj.entry("hidden_act").or_insert_with(|| "silu".into());
        Value::Object(obj)
    }

    /// Write `config.json` into `dir` atomically (pretty-printed, like `save_pretrained`).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.to_json())? + "\n";
        crate::util::write_atomic(&dir.join("config.json"), text.as_bytes())
    }
}

/// An f32 as the shortest JSON number that parses back to the same f32 (`1e-6`, not
/// `9.999999974752427e-7`).
fn f32_json(x: f32) -> Value {
    let shortest: f64 = format!("{x}").parse().unwrap_or(x as f64);
    serde_json::Number::from_f64(shortest)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_round_trip() {
        let text = r#"{"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "rms_norm_eps": 1e-5,
            "bos_token_id": 1, "architectures": ["LlamaForCausalLM"]}"#;
        let c = LlamaConfig::from_json_str(text).unwrap();
        assert_eq!(c.num_key_value_heads, 4, "HF default: kv heads = heads");
        assert_eq!(c.rope_theta, 10000.0, "HF default rope_theta");
        assert_eq!(c.head_dim(), 8);
        let back = LlamaConfig::from_json_str(&c.to_json().to_string()).unwrap();
        assert_eq!(
            back,
            LlamaConfig {
                raw: back.raw.clone(),
                ..c
            }
        );
        assert_eq!(back.raw["bos_token_id"], 1, "unknown keys survive");
        // Written as the f32's shortest decimal, not its f64 widening 9.99999974737875e-6.
        assert_eq!(back.raw["rms_norm_eps"].as_f64(), Some(1e-5));
    }

    #[test]
    fn rejects_bad_shapes() {
        let bad = [
            (
                r#"{"vocab_size": 100, "hidden_size": 30, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}"#,
                "not divisible by num_attention_heads",
            ),
            (
                r#"{"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 3}"#,
                "num_key_value_heads 3",
            ),
            (
                r#"{"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4}"#,
                "num_hidden_layers",
            ),
            (
                r#"{"vocab_size": -1, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}"#,
                "vocab_size",
            ),
            (
                r#"{"vocab_size": 100, "hidden_size": 36, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 12}"#,
                "even",
            ),
        ];
        for (text, want) in bad {
            let err = format!("{:#}", LlamaConfig::from_json_str(text).unwrap_err());
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }

    #[test]
    fn param_count_matches_hand_count() {
        // LLaMA-7B at vocab 49953: 6,885,486,592 (docs/RECIPE.md §3).
        let c = LlamaConfig::new(49953, 4096, 11008, 32, 32, 32);
        assert_eq!(c.num_params(), 6_885_486_592);
    }
}
