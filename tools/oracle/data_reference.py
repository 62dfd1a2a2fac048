#!/usr/bin/env python3
"""Reference outputs of the original Chinese-LLaMA-Alpaca data pipeline, for zhllama's parity tests.

It re-runs, with HF `datasets` and the slow sentencepiece-backed `LlamaTokenizer` (what the original
scripts used), the two pieces of logic zhllama reimplements:

* pre-training (run_clm_pt_with_peft.py): per file, `load_dataset("text")`, `tokenizer(text)`, then
  `group_texts` under `map(batched=True)` (batch size 1000). Writes every block, short ones included.
* SFT (build_dataset.py): per file, `load_dataset("json")`, the Alpaca prompt, `tokenizer(sources)`
  and `tokenizer(targets, add_special_tokens=False)`, truncation, labels; plus the collator's padding
  on consecutive batches (pure Python in place of torch's pad_sequence: same values).

The logic below is written from the recipe (docs/RECIPE.md §2, §4) to match those scripts; nothing is
copied from them. Pinned versions: tools/oracle/data_requirements.txt.

Usage:
  data_reference.py --tokenizer tokenizer.model --out DIR [--block-size 512] [--max-len 512]
                    [--pretrain FILE ...] [--sft FILE ...] [--batch-size 4]
Writes DIR/pretrain.json ({"files": [{"path", "lines", "blocks": [[ids]]}]}) and DIR/sft.json
({"pad_id", "vocab_size", "files": [{"path", "input_ids", "labels"}], "batches": [...]}).
"""

import argparse
import json
import os
import sys
import tempfile
from itertools import chain

import datasets
import transformers
from transformers import LlamaTokenizer

PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: "
)
IGNORE_INDEX = -100


def load_tokenizer(path, scratch):
    """As the original scripts: `LlamaTokenizer.from_pretrained(dir)`. A bare .model file is put in
    a directory first: in transformers 4.28 only `from_pretrained` registers the special tokens
    for splitting, so the constructor alone would encode a literal "</s>" as text."""
    if not os.path.isdir(path):
        d = os.path.join(scratch, "tokenizer")
        os.makedirs(d, exist_ok=True)
        os.symlink(os.path.abspath(path), os.path.join(d, "tokenizer.model"))
        path = d
    return LlamaTokenizer.from_pretrained(path, legacy=True)


CHUNKS = {}


def record_chunks(tok):
    """Wrap `_tokenize` (sentencepiece on one chunk between special tokens) to record its ids."""
    inner = tok._tokenize

    def wrapped(text, **kw):
        pieces = inner(text, **kw)
        CHUNKS[text] = [tok.sp_model.piece_to_id(p) for p in pieces]
        return pieces

    tok._tokenize = wrapped


def pretrain(tok, files, block_size, cache):
    def tokenize_function(examples):
        return tok(examples["text"])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total = len(concatenated[list(examples.keys())[0]])
        if total >= block_size:
            total = (total // block_size) * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total, block_size)]
            for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    out = []
    for f in files:
        raw = datasets.load_dataset("text", data_files=f, cache_dir=cache)
        tokenized = raw.map(tokenize_function, batched=True, remove_columns="text")
        grouped = tokenized.map(group_texts, batched=True)
        train = grouped["train"]
        assert train["labels"] == train["input_ids"]
        out.append(
            {"path": f, "lines": raw["train"].num_rows, "blocks": train["input_ids"]}
        )
    return {"block_size": block_size, "files": out}


def sft(tok, files, max_len, batch_size, cache):
    if tok.pad_token is None:
        tok.add_special_tokens(dict(pad_token="[PAD]"))

    def tokenization(examples):
        sources, targets = [], []
        for instruction, inp, output in zip(
            examples["instruction"], examples["input"], examples["output"]
        ):
            if inp is not None and inp != "":
                instruction = instruction + "\n" + inp
            sources.append(PROMPT_TEMPLATE.format_map({"instruction": instruction}))
            targets.append(f"{output}{tok.eos_token}")
        ts = tok(sources, return_attention_mask=False)
        tt = tok(targets, return_attention_mask=False, add_special_tokens=False)
        ids, labels = [], []
        for s, t in zip(ts["input_ids"], tt["input_ids"]):
            ids.append((s + t)[:max_len])
            labels.append(([IGNORE_INDEX] * len(s) + t)[:max_len])
        return {"input_ids": ids, "labels": labels}

    out, all_ids, all_labels = [], [], []
    for f in files:
        raw = datasets.load_dataset("json", data_files=f, cache_dir=cache)
        d = raw.map(
            tokenization, batched=True, remove_columns=["instruction", "input", "output"]
        )["train"]
        out.append({"path": f, "input_ids": d["input_ids"], "labels": d["labels"]})
        all_ids += d["input_ids"]
        all_labels += d["labels"]

    # DataCollatorForSupervisedDataset on consecutive batches (first 8).
    pad = tok.pad_token_id
    batches = []
    for b in range(0, min(len(all_ids), 8 * batch_size), batch_size):
        ids, labs = all_ids[b : b + batch_size], all_labels[b : b + batch_size]
        width = max(len(x) for x in ids)
        pid = [x + [pad] * (width - len(x)) for x in ids]
        plab = [x + [IGNORE_INDEX] * (width - len(x)) for x in labs]
        mask = [[int(t != pad) for t in row] for row in pid]
        batches.append(
            {"start": b, "input_ids": pid, "labels": plab, "attention_mask": mask}
        )
    return {
        "pad_id": pad,
        "vocab_size": len(tok),
        "max_len": max_len,
        "batch_size": batch_size,
        "files": out,
        "batches": batches,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--pretrain", nargs="*", default=[])
    ap.add_argument("--sft", nargs="*", default=[])
    ap.add_argument(
        "--record-chunks",
        action="store_true",
        help="also write chunks.json: every text chunk handed to sentencepiece and its ids",
    )
    a = ap.parse_args()
    datasets.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as cache:
        if a.pretrain:
            tok = load_tokenizer(a.tokenizer, os.path.join(cache, "pt"))
            if a.record_chunks:
                record_chunks(tok)
            r = pretrain(tok, a.pretrain, a.block_size, cache)
            with open(os.path.join(a.out, "pretrain.json"), "w") as f:
                json.dump(r, f)
        if a.sft:
            tok = load_tokenizer(a.tokenizer, os.path.join(cache, "sft"))
            if a.record_chunks:
                record_chunks(tok)
            r = sft(tok, a.sft, a.max_len, a.batch_size, cache)
            with open(os.path.join(a.out, "sft.json"), "w") as f:
                json.dump(r, f)
    if a.record_chunks:
        sp = tok.sp_model
        special = {
            "vocab_size": sp.get_piece_size(),
            "bos_id": sp.bos_id(),
            "eos_id": sp.eos_id(),
            "unk_id": sp.unk_id(),
            "pad_id": sp.piece_to_id("[PAD]") if sp.piece_to_id("[PAD]") != sp.unk_id() else None,
        }
        with open(os.path.join(a.out, "chunks.json"), "w") as f:
            json.dump({"model": special, "chunks": CHUNKS}, f)
    versions = {
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "python": sys.version.split()[0],
    }
    with open(os.path.join(a.out, "versions.json"), "w") as f:
        json.dump(versions, f)


if __name__ == "__main__":
    main()
