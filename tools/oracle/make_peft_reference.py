#!/usr/bin/env python3
"""Regenerate tests/fixtures/peft/: adapters saved by real PEFT in every layout it writes for
LLaMA, and what PEFT's merge_and_unload makes of them (tests/peft_adapters.rs).

A tiny random LlamaForCausalLM (vocab 48, f32) is the base. Each case wraps a copy of it with
get_peft_model, sets every adapter weight to seeded random values (LoRA B is zero at init, which
would hide a missing merge), saves the adapter with save_pretrained (save_embedding_layers="auto",
PEFT's default), then merges with merge_and_unload and records the merged model's logits and mean
cross-entropy on fixed ids.

Cases:
- resized_pt2: the recipe's pt2 shape on a vocabulary resized 48 -> 64 before PEFT: LoRA r=4 on
  q,k,v,o + modules_to_save embed_tokens, lm_head (PEFT sees the resize and writes
  `*.modules_to_save.weight` and `*.original_module.weight`).
- plain_r8: not resized, LoRA on all seven projections with r=8, rank_pattern, alpha_pattern and
  use_rslora.
- embed_lora_r2: resized 48 -> 64, LoRA r=2 on embed_tokens (lora_embedding_A/B), q_proj, v_proj
  and lm_head (PEFT also saves the resized base layers).

    python3 -m venv .venv/peft-oracle
    .venv/peft-oracle/bin/pip install torch transformers peft safetensors
    .venv/peft-oracle/bin/python tools/oracle/make_peft_reference.py   # writes tests/fixtures/peft/
"""
import json
import os
import sys

import torch
import transformers
import peft
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures", "peft")
VOCAB = 48
CFG = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
           max_position_embeddings=64, tie_word_embeddings=False, hidden_act="silu",
           attention_bias=False, mlp_bias=False, initializer_range=0.02)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "resized_pt2": dict(vocab=64, cfg=dict(r=4, lora_alpha=32.0, target_modules=ALL[:4],
                                           modules_to_save=["embed_tokens", "lm_head"])),
    "plain_r8": dict(vocab=VOCAB, cfg=dict(r=8, lora_alpha=16.0, target_modules=ALL,
                                           rank_pattern={"q_proj": 2, "layers.1.mlp.up_proj": 4},
                                           alpha_pattern={"down_proj": 4.0}, use_rslora=True)),
    "embed_lora_r2": dict(vocab=64, cfg=dict(r=2, lora_alpha=8.0,
                                             target_modules=["embed_tokens", "q_proj", "v_proj",
                                                             "lm_head"])),
}


def ids_for(vocab, g):
    return torch.randint(0, vocab, (2, 12), generator=g)


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**CFG)).to(torch.float32).eval()
    base.save_pretrained(os.path.join(OUT, "base"), safe_serialization=True)
    os.chdir(OUT)
    expected = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                             "peft": peft.__version__}}
    for i, (name, case) in enumerate(CASES.items()):
        g = torch.Generator().manual_seed(100 + i)
        # Loaded from disk as a user would: PEFT then knows the base (base_model_name_or_path,
        # relative to the fixture directory) and, with save_embedding_layers="auto", sees the
        # resize and saves the embedding layers as well.
        model = LlamaForCausalLM.from_pretrained("base", dtype=torch.float32).eval()
        if case["vocab"] != VOCAB:
            model.resize_token_embeddings(case["vocab"])
        pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0,
                                              **case["cfg"]))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        pm.save_pretrained(name)
        merged = pm.merge_and_unload().eval()
        ids = ids_for(case["vocab"], g)
        with torch.no_grad():
            out = merged(input_ids=ids, labels=ids)
        expected[name] = {
            "ids": ids.tolist(),
            "loss": out.loss.item(),
            "logits": [round(x, 9) for x in out.logits.flatten().tolist()],
            "vocab": case["vocab"],
        }
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f)
    print("versions:", expected["versions"], file=sys.stderr)


if __name__ == "__main__":
    main()
