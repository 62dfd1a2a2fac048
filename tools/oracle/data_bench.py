#!/usr/bin/env python3
"""Pre-training data throughput, side by side in one run: `zhllama data pretrain` against the
original method, HF `datasets.map(tokenize)` + `datasets.map(group_texts)` (batch size 1000), with
the fast tokenizer (LlamaTokenizerFast converted from the same .model) and, optionally, the slow
sentencepiece-backed LlamaTokenizer the original scripts actually loaded.

Each side reads the same text files, tokenizes every line with BOS and groups into blocks; the
number reported is tokenized tokens per second of wall time (tokenizer loading/conversion not
counted for HF; for zhllama the whole command is timed, loading and shard writing included).

Usage: data_bench.py --zhllama target/release/zhllama --tokenizer merged/tokenizer.model
                     [--repeat 4] [--num-proc 1 2] [--slow] FILE...
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import chain

import datasets
import transformers
from transformers import LlamaTokenizer, LlamaTokenizerFast


def hf_run(tok, files, block_size, num_proc, cache):
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

    tokens = 0
    t0 = time.perf_counter()
    for i, f in enumerate(files):
        raw = datasets.load_dataset(
            "text", data_files=f, cache_dir=os.path.join(cache, f"c{i}")
        )
        tokd = raw.map(
            tokenize_function,
            batched=True,
            num_proc=num_proc,
            remove_columns="text",
            load_from_cache_file=False,
        )
        tokens += sum(len(x) for x in tokd["train"]["input_ids"])
        tokd.map(group_texts, batched=True, num_proc=num_proc, load_from_cache_file=False)
    return tokens, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--zhllama", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=4, help="copies of each file (longer runs)")
    ap.add_argument("--num-proc", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--slow", action="store_true", help="also time the slow LlamaTokenizer")
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    datasets.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    results = {}
    with tempfile.TemporaryDirectory() as work:
        files = []
        for r in range(a.repeat):
            for f in a.files:
                dst = os.path.join(work, f"r{r}_{os.path.basename(f)}")
                shutil.copyfile(f, dst)
                files.append(dst)
        tokdir = os.path.join(work, "tok")
        os.makedirs(tokdir)
        shutil.copyfile(a.tokenizer, os.path.join(tokdir, "tokenizer.model"))

        # zhllama, whole command.
        out = os.path.join(work, "zh_out")
        t0 = time.perf_counter()
        subprocess.run(
            [a.zhllama, "data", "pretrain", "--tokenizer", a.tokenizer, "--input", *files,
             "--output", out, "--block-size", str(a.block_size), "--quiet"],
            check=True,
        )
        secs = time.perf_counter() - t0
        m = json.load(open(os.path.join(out, "manifest.json")))
        results["zhllama"] = (m["tokenized_tokens"], secs)

        t0 = time.perf_counter()
        fast = LlamaTokenizerFast.from_pretrained(tokdir, from_slow=True, legacy=True)
        conv = time.perf_counter() - t0
        print(f"(fast tokenizer conversion: {conv:.1f} s, not counted)", file=sys.stderr)
        for n in a.num_proc:
            results[f"hf_fast_num_proc{n}"] = hf_run(
                fast, files, a.block_size, None if n == 1 else n, os.path.join(work, f"f{n}")
            )
        if a.slow:
            slow = LlamaTokenizer.from_pretrained(tokdir, legacy=True)
            for n in a.num_proc:
                results[f"hf_slow_num_proc{n}"] = hf_run(
                    slow, files, a.block_size, None if n == 1 else n, os.path.join(work, f"s{n}")
                )
    base = results["zhllama"][0] / results["zhllama"][1]
    print(f"{'method':<22} {'tokens':>10} {'seconds':>8} {'tokens/s':>10} {'zhllama x':>9}")
    for k, (tok, s) in results.items():
        rate = tok / s
        print(f"{k:<22} {tok:>10} {s:>8.2f} {rate:>10.0f} {base / rate:>9.2f}")
    print(
        f"cores: {os.cpu_count()}, transformers {transformers.__version__}, "
        f"datasets {datasets.__version__}"
    )


if __name__ == "__main__":
    main()
