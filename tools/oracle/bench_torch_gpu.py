#!/usr/bin/env python3
"""The PyTorch side of the GPU benchmark (tools/gpu-check.sh): HF transformers + PEFT training steps of
a LLaMA-7B-shaped model on one GPU, to compare with `zhllama bench --backend cuda` in the same run.

    python3 tools/oracle/bench_torch_gpu.py --stage sft|pt1 [--batch 4] [--seq 512] [--layers 32]
        [--steps 3] [--warmup 1] [--gemm-tflops X]

- Model: `LlamaForCausalLM` (dim 4096, ffn 11008, 32 heads, vocab 49954 as the merged Chinese
  tokenizer), random init directly on the GPU in bf16, `attn_implementation="sdpa"`.
- `sft`: the recipe's instruction-tuning setup — PEFT LoRA r=8, alpha 32, dropout 0.05 on
  q,k,v,o,gate,up,down, with `embed_tokens` and `lm_head` trained in full (`modules_to_save`).
- `pt1`: pre-training stage 1 — only `embed_tokens` trains, everything else frozen.
- Mixed precision as zhllama: frozen weights bf16; trainable parameters fp32 (master weights) under
  `torch.autocast(bfloat16)`; fused AdamW (lr 2e-4, wd 0.01) on the trainable parameters.
- One step = forward with labels + backward + optimizer step + zero_grad(set_to_none=True). Random
  tokens, labels = ids. Timed with `torch.cuda.synchronize()` around `--steps` steps after warm-up.
- Prints one JSON line: tokens/s, step ms, peak memory (max_memory_allocated), and the model FLOPs
  utilisation at 4·N FLOPs/token (N = matmul parameters: 32 layers' projections + lm_head; frozen
  base weights need no weight-gradient GEMMs, so forward 2N + input-gradient 2N; attention's
  T²-terms not counted) against `--gemm-tflops` (the GEMM rate gpu-check measured) when given.
"""

import argparse
import json
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", choices=["sft", "pt1"], default="sft")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--gemm-tflops", type=float, default=0.0)
    a = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if not torch.cuda.is_available():
        sys.exit("bench_torch_gpu: no CUDA device visible to PyTorch")
    dev = torch.device("cuda")
    v, c, f, h = 49954, 4096, 11008, 32
    cfg = LlamaConfig(
        vocab_size=v,
        hidden_size=c,
        intermediate_size=f,
        num_hidden_layers=a.layers,
        num_attention_heads=h,
        num_key_value_heads=h,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with dev:
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(prev)
    model.config.use_cache = False

    if a.stage == "sft":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(
            r=8,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            modules_to_save=["embed_tokens", "lm_head"],
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lcfg)
    else:
        for n, p in model.named_parameters():
            p.requires_grad_("embed_tokens" in n)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()  # fp32 master weights for what trains
    n_train = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.01, fused=True)

    g = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, v, (a.batch, a.seq), device=dev, generator=g)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / a.steps
    tokens = a.batch * a.seq
    n_matmul = a.layers * (4 * c * c + 3 * c * f) + c * v
    tps = tokens / dt
    out = {
        "impl": "hf+peft" if a.stage == "sft" else "hf",
        "stage": a.stage,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "batch": a.batch,
        "seq": a.seq,
        "layers": a.layers,
        "trainable_params": n_train,
        "step_ms": dt * 1e3,
        "tokens_per_s": tps,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss": float(loss),
        "flops_per_token_4n": 4 * n_matmul,
        "mfu_4n": (4 * n_matmul * tps / (a.gemm_tflops * 1e12)) if a.gemm_tflops > 0 else None,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
