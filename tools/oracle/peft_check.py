"""The live PEFT oracle: PEFT itself loads an adapter directory on a base model and writes the
logits for the given ids (tests/train_parity.rs compares them with zhllama's own).

usage: peft_check.py --base DIR --adapter DIR --ids '[[1, 2, ...], ...]' --out FILE.json
"""
import argparse
import json

import peft
import torch
import transformers
from peft import PeftModel
from transformers import LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--ids", required=True, help="JSON list of equal-length id lists")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    base = LlamaForCausalLM.from_pretrained(a.base, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, a.adapter).eval()
    ids = torch.tensor(json.loads(a.ids), dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    with open(a.out, "w") as f:
        json.dump({"logits": logits.tolist(),
                   "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                "peft": peft.__version__}}, f)


if __name__ == "__main__":
    main()
