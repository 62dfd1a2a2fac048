#!/usr/bin/env python3
"""Tokens/s encoding a corpus: zhllama vs python sentencepiece vs HF LlamaTokenizerFast.

usage: bench_tokenize.py MERGED_DIR CORPUS_DIR ZHLLAMA_BIN [REPEATS]

MERGED_DIR holds tokenizer.model (+ tokenizer.json) as `merge-tokenizers` writes it. Every *.txt
line of CORPUS_DIR is encoded without BOS/EOS. Each timing is the best of REPEATS (default 3).
zhllama is timed end to end through `zhllama tokenize` (process start, model load, encode, JSON
written to /dev/null), so its number is a lower bound on the encoder's own speed.
Reported: wall time and CPU time (user+sys, all threads). On a shared, oversubscribed machine the
CPU time of the 1-thread rows is the fair comparison; wall time shows parallel speedup.
Also reports how many lines each HF tokenizer encodes differently from sentencepiece.
Needs: pip install sentencepiece transformers tokenizers protobuf
"""
import glob
import os
import resource
import subprocess
import sys
import tempfile
import time


def cpu_now():
    """CPU seconds of this process (all threads) plus its finished children."""
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


def best(f, repeats):
    """(best wall seconds, best CPU seconds) over `repeats` runs."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), cpu_now()
        f()
        wall = min(wall, time.perf_counter() - w0)
        cpu = min(cpu, cpu_now() - c0)
    return wall, cpu


def main() -> None:
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    merged, corpus, zhllama = sys.argv[1:4]
    repeats = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    import sentencepiece as spm
    import tokenizers
    import transformers
    from transformers import LlamaTokenizerFast

    files = sorted(glob.glob(os.path.join(corpus, "*.txt")))
    lines = [l for f in files for l in open(f, encoding="utf-8").read().split("\n") if l]
    sp = spm.SentencePieceProcessor(model_file=os.path.join(merged, "tokenizer.model"))
    ref = sp.encode(lines)
    n_tok = sum(map(len, ref))
    print(f"corpus: {len(lines)} lines, {sum(map(len, lines))} chars, {n_tok} tokens (sentencepiece)")
    print(f"sentencepiece {spm.__version__}, transformers {transformers.__version__}, "
          f"tokenizers {tokenizers.__version__}, cpus {os.cpu_count()}")

    # HF fast tokenizer converted by transformers from the .model alone (what users get).
    with tempfile.TemporaryDirectory() as d:
        os.symlink(os.path.abspath(os.path.join(merged, "tokenizer.model")),
                   os.path.join(d, "tokenizer.model"))
        hf = LlamaTokenizerFast.from_pretrained(d, legacy=True)
    hf_ids = hf(lines, add_special_tokens=False)["input_ids"]
    ours = tokenizers.Tokenizer.from_file(os.path.join(merged, "tokenizer.json"))
    ours_ids = [e.ids for e in ours.encode_batch(lines, add_special_tokens=False)]
    for name, ids in [("HF LlamaTokenizerFast (transformers conversion)", hf_ids),
                      ("tokenizers on our tokenizer.json", ours_ids)]:
        diff = sum(a != b for a, b in zip(ids, ref))
        print(f"{name}: {diff} of {len(lines)} lines differ from sentencepiece, "
              f"{sum(map(len, ids)) - n_tok:+d} tokens")

    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as f:
        f.write("\n".join(lines) + "\n")
        joined = f.name

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        empty = f.name

    def cli(threads, path=joined):
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
        return lambda: subprocess.run(
            [zhllama, "tokenize", "--tokenizer", merged, "--input", path],
            stdout=subprocess.DEVNULL, check=True, env=env)

    cpus = os.cpu_count()
    rows = [
        ("python sentencepiece, 1 thread", lambda: sp.encode(lines, num_threads=1)),
        (f"python sentencepiece, {cpus} threads", lambda: sp.encode(lines, num_threads=cpus)),
        ("HF LlamaTokenizerFast, 1 call per line",
         lambda: [hf(l, add_special_tokens=False) for l in lines]),
        (f"HF LlamaTokenizerFast, batch ({cpus} threads)",
         lambda: hf(lines, add_special_tokens=False)),
        ("zhllama tokenize, 1 thread", cli(1)),
        (f"zhllama tokenize, {cpus} threads", cli(cpus)),
    ]
    times = {}
    for name, f in rows:
        times[name] = best(f, repeats)
    # Process start + model load alone (empty input); subtracted to estimate the encode itself.
    lw, lc = best(cli(1, empty), repeats)
    w1, c1 = times["zhllama tokenize, 1 thread"]
    times["zhllama encode+JSON only, 1 thread (minus load)"] = (w1 - lw, c1 - lc)
    print(f"zhllama start + load of the model alone: {lw:.3f} s wall, {lc:.3f} s cpu")
    bw, bc = times["python sentencepiece, 1 thread"]
    print(f"{'':48s} {'wall s':>8s} {'Mtok/s':>8s} {'x sp':>6s} | {'cpu s':>7s} {'Mtok/cpu-s':>10s} {'x sp':>6s}")
    for name, (w, c) in times.items():
        print(f"{name:48s} {w:8.3f} {n_tok / w / 1e6:8.2f} {bw / w:6.2f} | "
              f"{c:7.3f} {n_tok / c / 1e6:10.2f} {bc / c:6.2f}")
    os.unlink(joined)
    os.unlink(empty)


if __name__ == "__main__":
    main()
