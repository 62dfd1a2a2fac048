#!/usr/bin/env python3
"""Regenerate tests/fixtures/train/: the PyTorch + transformers + PEFT reference for zhllama's
training loop (tests/train_parity.rs).

For each recipe stage (pt1: embedding only; pt2: LoRA on q,k,v,o + embed_tokens + lm_head;
sft: LoRA on all seven projections + embed_tokens + lm_head, response-only labels, right padding)
it trains a tiny random LlamaForCausalLM for K optimizer steps exactly as the original scripts'
Trainer does (per-micro-batch mean loss / accumulation, clip_grad_norm_ to max_grad_norm,
torch.optim.AdamW, get_cosine_schedule_with_warmup with warmup = ceil(ratio x steps)), with LoRA
dropout 0 and the LoRA weights set to values written into the fixture (B non-zero, so every
path carries gradient from step 1). `sft_token_mean` is the sft stage with current HF Trainer's
loss reduction instead: each micro-batch's loss is its summed token loss divided by the target
count of the whole accumulated batch (`num_items_in_batch`, passed to the model as Trainer
passes it), so every target token weighs the same. It records the micro-batches, the per-step losses, gradient
norms and learning rates, the initial and final trainable weights, the adapter PEFT saves, and
the model PEFT's merge_and_unload produces.

    pip install torch transformers peft safetensors
    python3 tools/oracle/make_train_reference.py            # writes tests/fixtures/train/

With --check-run DIR (a zhllama sft run directory over fixture data), it also loads zhllama's
adapter with PEFT and zhllama's merged model with transformers and compares their logits.
"""
import argparse
import json
import math
import os
import sys

import torch
from safetensors.torch import save_file, load_file
from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup
from peft import LoraConfig, get_peft_model, PeftModel

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "train")

VOCAB = 65  # 64 pieces + [PAD]
PAD = 64
CFG = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
           max_position_embeddings=128, tie_word_embeddings=False, hidden_act="silu",
           attention_bias=False, mlp_bias=False, initializer_range=0.02)
K = 6           # optimizer steps
ACCUM = 2       # micro-batches per step
MICRO = 2       # sequences per micro-batch
T = 16          # pre-training block size
STAGES = {
    # lr, warmup ratio, weight decay, lora targets, modules_to_save
    # (max_norm is chosen per stage so that clipping is active on some steps and not others)
    "pt1": dict(lr=2e-2, warmup=0.05, wd=0.01, targets=[], save=["embed_tokens"], max_norm=0.55),
    "pt2": dict(lr=1e-2, warmup=0.05, wd=0.01, targets=["q_proj", "k_proj", "v_proj", "o_proj"],
                save=["embed_tokens", "lm_head"], max_norm=1.5),
    "sft": dict(lr=1e-2, warmup=0.03, wd=0.0, max_norm=4.0,
                targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                save=["embed_tokens", "lm_head"]),
    # Half sft's LR: at 1e-2 the two sides' f32 rounding differences grew through the six AdamW
    # steps of these batches to 1.4e-4 relative in the step-5 gradient norm (weights still equal
    # to ~2e-6); at 5e-3 they stay at the other stages' level (~7e-6).
    "sft_token_mean": dict(lr=5e-3, warmup=0.03, wd=0.0, max_norm=4.0, kind="sft",
                           reduction="token-mean",
                           targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                    "up_proj", "down_proj"],
                           save=["embed_tokens", "lm_head"]),
}
R, ALPHA = 4, 32.0


def batches_for(stage, g):
    """K steps x ACCUM micro-batches of {ids, labels} ([MICRO, t] lists); `stage` is the kind."""
    steps = []
    for _ in range(K):
        micro = []
        for _ in range(ACCUM):
            if stage != "sft":
                ids = torch.randint(3, 64, (MICRO, T), generator=g)
                ids[:, 0] = 1  # BOS
                micro.append(dict(ids=ids.tolist(), labels=ids.tolist()))
            else:
                rows = []
                for _ in range(MICRO):
                    src = int(torch.randint(4, 10, (1,), generator=g))
                    tgt = int(torch.randint(2, 9, (1,), generator=g))
                    ids = [1] + torch.randint(3, 64, (src - 1 + tgt,), generator=g).tolist()
                    ids[-1] = 2  # </s>
                    rows.append((ids, src))
                t = max(len(r[0]) for r in rows)
                micro.append(dict(
                    ids=[r[0] + [PAD] * (t - len(r[0])) for r in rows],
                    labels=[[-100] * r[1] + r[0][r[1]:] + [-100] * (t - len(r[0])) for r in rows]))
        steps.append(micro)
    return steps


def trainable_state(model):
    """Trainable tensors under zhllama's (HF) names."""
    out = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        n = n.removeprefix("base_model.model.")
        n = n.replace(".modules_to_save.default.", ".").replace(".lora_A.default.", ".lora_A.")
        n = n.replace(".lora_B.default.", ".lora_B.")
        out[n] = p.detach().clone().contiguous()
    return out


def run_stage(stage, base_dir, g):
    s = STAGES[stage]
    kind = s.get("kind", stage)
    token_mean = s.get("reduction") == "token-mean"
    model = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    if s["targets"]:
        lcfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=s["targets"],
                          modules_to_save=s["save"], task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
        # Identical initial LoRA weights on both sides: B non-zero so A trains from step 1.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_A" in n:
                    bound = 1.0 / math.sqrt(p.shape[1])
                    p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
                elif "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    else:
        for n, p in model.named_parameters():
            p.requires_grad_(n == "model.embed_tokens.weight")
    model.train()
    init = trainable_state(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s["lr"], betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=s["wd"])
    warmup = math.ceil(K * s["warmup"])  # TrainingArguments.get_warmup_steps
    sched = get_cosine_schedule_with_warmup(opt, warmup, K)
    steps = batches_for(kind, g)
    losses, norms, lrs = [], [], []
    for micro in steps:
        lrs.append(opt.param_groups[0]["lr"])
        total = 0.0
        # HF Trainer's num_items_in_batch: the shifted labels' targets over the accumulated batch.
        n_items = sum(int((torch.tensor(mb["labels"])[:, 1:] != -100).sum()) for mb in micro)
        for mb in micro:
            ids = torch.tensor(mb["ids"])
            labels = torch.tensor(mb["labels"])
            mask = (ids != PAD) if kind == "sft" else torch.ones_like(ids, dtype=torch.bool)
            if token_mean:
                loss = model(input_ids=ids, attention_mask=mask.long(), labels=labels,
                             num_items_in_batch=torch.tensor(n_items)).loss
                loss.backward()
            else:
                loss = model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss
                (loss / ACCUM).backward()
            total += loss.item()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, s["max_norm"])))
        losses.append(total if token_mean else total / ACCUM)
        opt.step()
        sched.step()
        opt.zero_grad()
    final = trainable_state(model)
    save_file(init, os.path.join(OUT, f"{stage}_init.safetensors"))
    save_file(final, os.path.join(OUT, f"{stage}_final.safetensors"))
    meta = dict(stage=stage, steps=K, accumulation=ACCUM, micro_batch_size=MICRO, lr=s["lr"],
                warmup_ratio=s["warmup"], warmup_steps=warmup, weight_decay=s["wd"],
                lora_rank=R, lora_alpha=ALPHA, lora_targets=s["targets"],
                modules_to_save=s["save"], max_grad_norm=s["max_norm"],
                loss_reduction=s.get("reduction", "micro-batch-mean"), losses=losses,
                grad_norms=norms, lrs=lrs, batches=steps)
    with open(os.path.join(OUT, f"{stage}_reference.json"), "w") as f:
        json.dump(meta, f)
    # The adapter layout and merge are checked once per stage kind (not for sft_token_mean).
    if s["targets"] and "kind" not in s:
        adir = os.path.join(OUT, f"{stage}_peft_adapter")
        model.save_pretrained(adir)
        merged = model.merge_and_unload()
        msd = {k: v.contiguous() for k, v in merged.state_dict().items()}
        save_file(msd, os.path.join(OUT, f"{stage}_merged.safetensors"))
    print(stage, "losses", ["%.6f" % x for x in losses], "norms", ["%.3f" % x for x in norms])


def schedule_reference():
    """HF get_cosine_schedule_with_warmup multipliers for a few (warmup, total) pairs."""
    out = []
    for warmup, total in [(0, 10), (1, 10), (3, 20), (150, 3000), (7, 7)]:
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1.0)
        sched = get_cosine_schedule_with_warmup(opt, warmup, total)
        lrs = []
        for _ in range(total):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        out.append(dict(warmup=warmup, total=total, lrs=lrs))
    with open(os.path.join(OUT, "schedule_reference.json"), "w") as f:
        json.dump(out, f)


def check_run(run_dir, base_dir):
    """PEFT loads zhllama's adapter; transformers loads zhllama's merged model; same logits."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 64, (2, 12), generator=g)
    base = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, os.path.join(run_dir, "adapter")).eval()
    merged = LlamaForCausalLM.from_pretrained(os.path.join(run_dir, "merged"),
                                              torch_dtype=torch.float32).eval()
    with torch.no_grad():
        a = peft_model(input_ids=ids).logits
        b = merged(input_ids=ids).logits
    diff = float((a - b).abs().max())
    res = dict(max_abs_logit_diff=diff, max_abs_logit=float(a.abs().max()), ids=ids.tolist(),
               logits=b.tolist())
    print(json.dumps({k: v for k, v in res.items() if k not in ("ids", "logits")}))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-run", help="a zhllama run dir with adapter/ and merged/")
    ap.add_argument("--check-out", help="where to write the check result JSON")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    base_dir = os.path.join(OUT, "base")
    if args.check_run:
        res = check_run(args.check_run, base_dir)
        if args.check_out:
            with open(args.check_out, "w") as f:
                json.dump(res, f)
        return
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG)).to(torch.float32)
    model.save_pretrained(base_dir, safe_serialization=True)
    schedule_reference()
    for i, stage in enumerate(STAGES):
        run_stage(stage, base_dir, torch.Generator().manual_seed(100 + i))
    print("versions: torch", torch.__version__, file=sys.stderr)


if __name__ == "__main__":
    main()
