#!/usr/bin/env python3
"""PyTorch + PEFT side of the LoRA-SFT step benchmark in docs/PERF.md (section "Training step").

Writes the benchmark's base model (random, f32) to MODEL_DIR for zhllama to load, then times
optimizer steps of LoRA SFT (r 8, alpha 32, dropout 0.05 on all seven projections,
embed_tokens + lm_head trained in full, AdamW, clipping 1.0) on [micro, seq] batches whose first
SRC positions carry label -100, exactly the shape `zhllama train --stage sft` sees on the data
built for the same run. Prints one JSON line with tokens/s (input tokens per second).

    python3 tools/oracle/bench_train_torch.py MODEL_DIR [--steps 3] [--threads 2]
"""
import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("model_dir")
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--micro", type=int, default=4)
ap.add_argument("--seq", type=int, default=256)
ap.add_argument("--src", type=int, default=156)
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=49954, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
model = LlamaForCausalLM(cfg).float()
model.save_pretrained(args.model_dir, safe_serialization=True)
model = get_peft_model(model, LoraConfig(
    r=8, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    modules_to_save=["embed_tokens", "lm_head"]))
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
ids = torch.randint(3, 64, (args.micro, args.seq))
labels = ids.clone()
labels[:, : args.src] = -100


def step():
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad()


step()  # warm-up
t0 = time.perf_counter()
for _ in range(args.steps):
    step()
dt = (time.perf_counter() - t0) / args.steps
print(json.dumps({"impl": "pytorch+peft", "torch": torch.__version__, "threads": args.threads,
                  "step_s": dt, "tokens_per_s": args.micro * args.seq / dt}))
