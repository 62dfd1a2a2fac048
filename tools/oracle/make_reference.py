#!/usr/bin/env python3
"""Regenerate the HF-transformers reference fixtures for the model tests (tests/model_*.rs).

    python3 -m pip install torch transformers peft safetensors   # ~5.6 GB, developers only; CI uses the committed files
    python3 tools/oracle/make_reference.py                        # rewrites tests/fixtures/model/

Measured with torch 2.15.0, transformers 5.24.0, peft 0.21.2. Deterministic: fixed seeds, CPU, eager
attention. Each case directory is an HF model directory (config.json + safetensors, exactly what
`save_pretrained` writes) plus `reference.safetensors`:

    input_ids [B,T] (i64), labels [B,T] (i64, -100 = ignore)
    logits [B,T,V], loss [] ,
    grad.<HF name> for every parameter, grad.inputs_embeds [B,T,C]
    (lora cases) <PEFT name without `base_model.model.` and `.default`> for each LoRA factor

The references are computed in float64 from the stored float32 (or bf16/f16-rounded) weights, so
they are the exact answer up to f64 rounding; the Rust side runs in f32 and the tests' tolerances
only have to cover f32 rounding (see the tolerance table in tests/model_parity.rs).

Cases (all 2 layers, tiny dims, < 5 MB in all):
  mha        4 heads = 4 kv heads, rope_theta 10000, odd T = 7, labels with -100 (incl. a whole row tail)
  gqa        6 heads / 2 kv heads, rope_theta 500000, rms_norm_eps 1e-5, T = 9
  tied       tie_word_embeddings, 4 heads / 1 kv head (MQA), T = 5
  lora       the mha shape + PEFT LoRA r=4 alpha=8 on q,v,o,gate,down (B randomised so every LoRA
             gradient is non-zero), dropout 0
  gqa_bf16_sharded   the gqa model saved in bf16, sharded (max_shard_size 20KB) + index;
                     reference logits/loss from the bf16-rounded weights
  tied_f16   the tied model saved in f16, single file; reference logits/loss from the f16 weights
  eval       tokens.json (a list of token-id lists of unequal lengths) for the gqa model and
             expected.json {"loss", "tokens"}: mean token cross-entropy over all predicted positions
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "model"


def make_model(seed, **cfg):
    torch.manual_seed(seed)
    config = LlamaConfig(
        attn_implementation="eager",
        attention_dropout=0.0,
        initializer_range=0.02,
        max_position_embeddings=64,
        **cfg,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    # HF's init (std 0.02, norms = 1) makes near-uniform attention and leaves the norm weights'
    # effect invisible; larger random weights exercise every term.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def make_inputs(seed, b, t, vocab):
    g = torch.Generator().manual_seed(seed + 2)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    drop = torch.rand((b, t), generator=g) < 0.25
    labels[drop] = -100
    labels[0, 0] = -100  # never a target anyway (nothing predicts position 0)
    labels[-1, t - 3 :] = -100  # a padded tail, as in SFT batches
    return ids, labels


def exact_rope(m64):
    """`.to(dtype)` also casts RoPE's `inv_freq` buffer (to bf16/f16 for the low-precision cases,
    which would make the reference itself off by 1e-3); set the exact f64 frequencies. (HF still
    takes cos/sin in float32, an error of ~1e-7 relative, far below the tests' tolerances.)"""
    for mod in m64.modules():
        if hasattr(mod, "inv_freq"):
            d = mod.inv_freq.numel() * 2
            theta = m64.config.rope_parameters["rope_theta"]
            exact = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
            mod.inv_freq = exact
            if hasattr(mod, "original_inv_freq"):
                mod.original_inv_freq = exact


def reference(model, ids, labels, with_grads=True):
    """Logits, loss and gradients of `model` (any dtype) computed in float64."""
    m64 = model.to(torch.float64)
    exact_rope(m64)
    m64.zero_grad(set_to_none=True)
    for p in m64.parameters():
        p.requires_grad_(with_grads)
    emb = m64.get_input_embeddings()(ids)
    if with_grads:
        emb.retain_grad()
    out = m64(inputs_embeds=emb, labels=labels)
    res = {"logits": out.logits.detach(), "loss": out.loss.detach()}
    if with_grads:
        out.loss.backward()
        res["grad.inputs_embeds"] = emb.grad.detach()
        for name, p in m64.named_parameters():
            res[f"grad.{clean(name)}"] = p.grad.detach()
    return res


def clean(name):
    """PEFT's parameter names → ours (`base_model.model.` and `.default` dropped, base_layer folded)."""
    name = name.removeprefix("base_model.model.")
    name = name.replace(".base_layer.", ".").replace(".default.", ".")
    return name


def write_case(name, model, ids, labels, extra=None, save_kwargs=None, ref_model=None):
    d = OUT / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    save_model = ref_model if ref_model is not None else model
    save_model.save_pretrained(d, **(save_kwargs or {}))
    (d / "generation_config.json").unlink(missing_ok=True)
    res = reference(model, ids, labels)
    tensors = {"input_ids": ids, "labels": labels}
    for k, v in res.items():
        tensors[k] = v.to(torch.float32).contiguous()
    # f32 would round the f64 reference; keep the loss in f64 (one number).
    tensors["loss"] = res["loss"].to(torch.float64).reshape(())
    tensors.update(extra or {})
    save_file({k: v.contiguous() for k, v in tensors.items()}, d / "reference.safetensors")
    print(f"{name}: loss {res['loss'].item():.6f}, {sum(f.stat().st_size for f in d.iterdir())} bytes")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(True)

    # MHA, default rope, odd sequence length.
    mha_cfg = dict(vocab_size=128, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6)
    mha = make_model(10, **mha_cfg)
    ids, labels = make_inputs(10, 2, 7, 128)
    write_case("mha", mha, ids, labels)

    # GQA, non-default rope_theta and eps.
    gqa_cfg = dict(vocab_size=160, hidden_size=48, intermediate_size=104, num_hidden_layers=2,
                   num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0)
    gqa = make_model(20, **gqa_cfg)
    ids, labels = make_inputs(20, 2, 9, 160)
    write_case("gqa", gqa, ids, labels)

    # Tied embeddings, multi-query.
    tied_cfg = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)
    tied = make_model(30, **tied_cfg)
    ids_t, labels_t = make_inputs(30, 3, 5, 96)
    write_case("tied", tied, ids_t, labels_t)

    # LoRA (PEFT) on the MHA shape.
    from peft import LoraConfig, get_peft_model

    base = make_model(40, **mha_cfg)
    peft_model = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                   target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]),
    )
    g = torch.Generator().manual_seed(41)
    lora_tensors = {}
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            if "lora_" in n:
                lora_tensors[clean(n)] = p.detach().clone().to(torch.float32)
    ids, labels = make_inputs(40, 2, 7, 128)
    # Save the base weights only, in HF layout; LoRA factors go into the reference file.
    base_only = make_model(40, **mha_cfg)
    write_case("lora", peft_model, ids, labels, extra=lora_tensors, ref_model=base_only)

    # Low-precision checkpoints: the gqa model in bf16 sharded, the tied one in f16.
    gqa_bf16 = make_model(20, **gqa_cfg).to(torch.bfloat16)
    ids, labels = make_inputs(20, 2, 9, 160)
    write_case("gqa_bf16_sharded", gqa_bf16, ids, labels,
               save_kwargs=dict(max_shard_size="20KB"), ref_model=make_model(20, **gqa_cfg).to(torch.bfloat16))
    tied_f16 = make_model(30, **tied_cfg).to(torch.float16)
    write_case("tied_f16", tied_f16, ids_t, labels_t, ref_model=make_model(30, **tied_cfg).to(torch.float16))

    # `zhllama eval` reference: mean CE over all predicted positions of unequal-length sequences.
    d = OUT / "eval"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    gqa64 = make_model(20, **gqa_cfg).to(torch.float64)
    exact_rope(gqa64)
    g = torch.Generator().manual_seed(50)
    seqs = [torch.randint(0, 160, (n,), generator=g).tolist() for n in (5, 12, 2, 9)]
    total, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            x = torch.tensor([s])
            out = gqa64(input_ids=x, labels=x)
            total += out.loss.item() * (len(s) - 1)
            count += len(s) - 1
    (d / "tokens.json").write_text(json.dumps(seqs) + "\n")
    (d / "expected.json").write_text(json.dumps({"model": "gqa", "loss": total / count, "tokens": count}) + "\n")
    print(f"eval: loss {total / count:.6f} over {count} tokens")

    size = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"total {size} bytes")
    assert size < 5 * 1024 * 1024, "fixtures must stay under 5 MB"


if __name__ == "__main__":
    main()
