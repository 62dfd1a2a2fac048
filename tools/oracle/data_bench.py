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
Packages: tools/oracle/data_bench_requirements.txt (a transformers recent enough to convert the
49953-piece model to a fast tokenizer in seconds; 4.28's converter is quadratic in the vocab).
"""

import argparse
import json
import resource
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
    c0 = cpu(resource.RUSAGE_SELF)
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
    # num_proc workers are child processes: their CPU time is not in RUSAGE_SELF (None there).
    c = cpu(resource.RUSAGE_SELF) - c0 if num_proc is None else None
    return tokens, time.perf_counter() - t0, c


def cpu(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--zhllama", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=4, help="copies of each file (longer runs)")
    ap.add_argument("--num-proc", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--slow", action="store_true", help="also time the slow LlamaTokenizer")
    ap.add_argument(
        "--rounds", type=int, default=3,
        help="methods run interleaved this many times; the best time of each is reported",
    )
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

        def zhllama(r):
            out = os.path.join(work, f"zh_out{r}")
            c0 = cpu(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run(
                [a.zhllama, "data", "pretrain", "--tokenizer", a.tokenizer, "--input", *files,
                 "--output", out, "--block-size", str(a.block_size), "--quiet"],
                check=True,
            )
            secs = time.perf_counter() - t0
            c = cpu(resource.RUSAGE_CHILDREN) - c0
            m = json.load(open(os.path.join(out, "manifest.json")))
            shutil.rmtree(out)
            return m["tokenized_tokens"], secs, c

        t0 = time.perf_counter()
        fast = LlamaTokenizerFast.from_pretrained(tokdir, from_slow=True, legacy=True)
        print(f"(fast tokenizer conversion: {time.perf_counter() - t0:.1f} s, not counted)",
              file=sys.stderr)
        slow = LlamaTokenizer.from_pretrained(tokdir, legacy=True) if a.slow else None
        for r in range(a.rounds):
            runs = {"zhllama": lambda: zhllama(r)}
            for n in a.num_proc:
                runs[f"hf_fast_num_proc{n}"] = lambda n=n: hf_run(
                    fast, files, a.block_size, None if n == 1 else n,
                    os.path.join(work, f"f{n}_{r}"))
            if slow is not None and r == 0:
                runs["hf_slow_num_proc1"] = lambda: hf_run(
                    slow, files, a.block_size, None, os.path.join(work, "s1"))
            for k, fn in runs.items():
                res = fn()
                if k not in results or res[1] < results[k][1]:
                    results[k] = res
    base = results["zhllama"][0] / results["zhllama"][1]
    base_cpu = results["zhllama"][0] / results["zhllama"][2]
    print(f"{'method':<20} {'tokens':>9} {'wall s':>7} {'tokens/s':>9} {'zhllama x':>9}"
          f" {'cpu s':>7} {'tokens/cpu-s':>12} {'zhllama x':>9}")
    for k, (tok, s, c) in results.items():
        rate = tok / s
        cpu_cols = (f"{c:>7.2f} {tok / c:>12.0f} {base_cpu / (tok / c):>9.2f}"
                    if c else f"{'-':>7} {'-':>12} {'-':>9}")
        print(f"{k:<20} {tok:>9} {s:>7.2f} {rate:>9.0f} {base / rate:>9.2f} {cpu_cols}")
    print(
        f"cores: {os.cpu_count()}, transformers {transformers.__version__}, "
        f"datasets {datasets.__version__}"
    )


if __name__ == "__main__":
    main()
