#!/usr/bin/env python3
"""Time the PyTorch side of `zhllama bench`: forward+backward training steps of the same LLaMA shape.

    python3 tools/oracle/bench_torch.py --preset small [--threads N] [--steps N] [--attn sdpa|eager]

Same shapes, same FLOP count and the same JSON line as `zhllama bench` (see src/cli/bench.rs):
HF `LlamaForCausalLM`, float32 on CPU, random init, random tokens with labels = ids, every weight
requires grad; one step = `zero_grad(set_to_none=True)` + forward with labels + `loss.backward()`.
`--threads` defaults to the core count (what rayon uses on the Rust side). Run both sides back to
back in one command on the same machine and compare the ratio (docs/PERF.md).
"""

import argparse
import json
import os
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# name: (vocab, dim, ffn, layers, heads, kv heads, batch, seq, default steps) — as src/cli/bench.rs
PRESETS = {
    "tiny": (1000, 64, 176, 2, 4, 4, 2, 64, 20),
    "small": (49954, 512, 1376, 8, 8, 8, 4, 256, 5),
    "7b": (49954, 4096, 11008, 32, 32, 32, 1, 512, 3),
}


def train_step_flops(v, c, f, layers, h, kv_heads, b, t):
    """Exactly LlamaConfig::train_step_flops: 6·N·P_mm + 3 · (causal attention forward)."""
    d = c // h
    kv = kv_heads * d
    p_mm = layers * (2 * c * c + 2 * c * kv + 3 * c * f) + v * c
    attn_fwd = 2 * b * h * d * t * (t + 1) * layers
    return 6 * b * t * p_mm + 3 * attn_fwd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small", choices=PRESETS)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    a = ap.parse_args()
    v, c, f, layers, h, kvh, b, t, steps = PRESETS[a.preset]
    layers = a.layers or layers
    b, t, steps = a.batch or b, a.seq or t, max(1, a.steps or steps)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=v, hidden_size=c, intermediate_size=f, num_hidden_layers=layers,
                      num_attention_heads=h, num_key_value_heads=kvh, max_position_embeddings=max(2048, t),
                      attn_implementation=a.attn)
    model = LlamaForCausalLM(cfg).to(torch.float32).train()
    ids = torch.randint(0, v, (b, t))

    def step():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        return out.loss.item()

    for _ in range(a.warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    secs = (time.perf_counter() - start) / steps
    flops = train_step_flops(v, c, f, layers, h, kvh, b, t)
    tok_s = b * t / secs
    print(f"{a.preset} on torch {torch.__version__} ({a.threads} threads, {a.attn}): {b}×{t} tokens, "
          f"{secs * 1e3:.1f} ms/step, {tok_s:.0f} tokens/s, {flops / secs / 1e9:.1f} GFLOP/s (loss {loss:.4f})",
          file=sys.stderr)
    print(json.dumps({"impl": "torch", "backend": f"torch-cpu-{a.threads}t-{a.attn}", "preset": a.preset,
                      "batch": b, "seq": t, "layers": layers, "steps": steps, "step_ms": secs * 1e3,
                      "tokens_per_s": tok_s, "gflop_per_step": flops / 1e9, "gflops": flops / secs / 1e9,
                      "loss": loss}))


if __name__ == "__main__":
    main()
