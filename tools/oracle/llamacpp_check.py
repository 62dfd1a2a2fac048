#!/usr/bin/env python3
"""llama.cpp itself (through llama-cpp-python) on files written by `zhllama export`.

Driven by tools/oracle/llamacpp_check.sh, which builds the inputs. Checks:
1. logits: llama.cpp's logits for fixed ids vs zhllama's forward (the `eval` forward,
   `Llama::forward_logits`, dumped by examples/export_check.rs) on the same f32 HF model.
   Error measure: max|a - b| / max|ref| over the whole [T, V] array (relative to the logit scale;
   an elementwise relative error would be dominated by logits that are near zero). Tolerances:
   - f32 1e-4: both sides compute in f32 from identical weights; only the summation order differs
     (GEMM blocking, llama.cpp's RoPE/softmax/RMS-norm kernels), a few ulps per op.
   - f16 2e-2: the weights are rounded to f16 (relative 2^-11 ≈ 4.9e-4) and ggml's CPU matmul also
     rounds the activations to f16 before each f16 dot product; ~10 such matmuls in series on a
     random model with spread-out logits amplify this to a few 1e-3 (measured 3.4e-3). 2e-2
     leaves a 5x margin while still catching a wrong layout (which gives O(1) errors).
   - q8_0 1e-1: weights in 8-bit blocks (step = block max / 127, error up to half a step, i.e.
     up to 0.4 % of the block's largest value) and ggml quantizes the activations to Q8_0 too,
     in every one of the ~10 matmuls in series; on this deliberately spread-out model (init std
     0.35) that measures 8.0e-2 (deterministic: fixed seed, ids and thread count). A transposed
     or unpermuted tensor gives errors near 1, so 1e-1 still separates right from wrong.
2. greedy: the ids llama.cpp picks by argmax for 32 steps from the prompt ids equal zhllama's
   greedy ids (the `generate` call of `zhllama generate --temperature 0 --repetition-penalty 1`),
   and the text `zhllama generate` printed equals the decode of those ids.
   (llama.cpp's own detokenization keeps the leading space of the first piece, which
   sentencepiece's decode drops; that is reported, not asserted.)
3. tokenizer: llama.cpp's tokenizer (the vocabulary embedded in the GGUF file) vs `zhllama
   tokenize` on every line of the corpus files given; prints how many lines differ, with examples.

Prints 'N passed, M failed'; exit 1 on any failure of 1. or 2. (3. is reported, not asserted).
"""
import argparse
import json
import sys

import numpy as np
import llama_cpp
from llama_cpp import Llama

TOL = {"f32": 1e-4, "f16": 2e-2, "q8_0": 1e-1}


def load(path, vocab_only=False):
    # The KV cache in f32 (type 0; llama.cpp's default is f16, which alone costs ~1e-3 of the
    # logit scale), so the f32 comparison is f32 end to end.
    return Llama(model_path=path, n_ctx=256, n_batch=256, logits_all=True, n_threads=2,
                 vocab_only=vocab_only, verbose=False, type_k=0, type_v=0)


def logits_of(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", action="append", required=True, help="TYPE=FILE, e.g. f32=tiny.gguf")
    ap.add_argument("--ids", required=True, help="comma-separated ids")
    ap.add_argument("--ref-logits", required=True, help="f32 [T, V] from examples/export_check")
    ap.add_argument("--greedy", required=True, help="JSON from `export_check greedy`")
    ap.add_argument("--generate-text", required=True, help="stdout of `zhllama generate`")
    ap.add_argument("--vocab-gguf", required=True, help="GGUF whose tokenizer to compare")
    ap.add_argument("--our-tokens", required=True, help="`zhllama tokenize` output (JSON lines)")
    ap.add_argument("--corpus", required=True, help="the text those ids came from")
    a = ap.parse_args()
    passed, failed = 0, 0

    def check(ok, what):
        nonlocal passed, failed
        print(("ok:   " if ok else "FAIL: ") + what)
        if ok:
            passed += 1
        else:
            failed += 1

    ids = [int(x) for x in a.ids.split(",")]
    files = dict(x.split("=", 1) for x in a.gguf)
    ref = np.fromfile(a.ref_logits, dtype="<f4")
    ref = ref.reshape(len(ids), -1)
    scale = float(np.abs(ref).max())
    for ty, path in files.items():
        llm = load(path)
        got = logits_of(llm, ids)
        check(got.shape == ref.shape, f"{ty}: logits shape {got.shape} vs {ref.shape}")
        err = float(np.abs(got - ref).max()) / scale
        same_argmax = int((got.argmax(1) == ref.argmax(1)).sum())
        check(err <= TOL[ty], f"{ty}: logits max|llama.cpp - zhllama| / max|zhllama| = {err:.3e} "
              f"(tolerance {TOL[ty]:g}); argmax equal at {same_argmax}/{len(ids)} positions")
        if ty == "f32":
            g = json.load(open(a.greedy))
            seq = list(g["prompt_ids"])
            llm.reset()
            llm.eval(seq)
            out = []
            eos = llm.token_eos()
            for _ in range(len(g["ids"]) if g["ids"] else 32):
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                if nxt == eos:
                    break
                out.append(nxt)
                if len(out) == 32:
                    break
                llm.eval([nxt])
            check(len(g["ids"]) == 32, f"zhllama generated {len(g['ids'])} tokens (32 wanted, no EOS)")
            check(out == g["ids"], f"greedy ids: llama.cpp {out[:8]}... vs zhllama {g['ids'][:8]}... "
                  f"({sum(x == y for x, y in zip(out, g['ids']))}/{len(g['ids'])} equal)")
            cli = open(a.generate_text, encoding="utf-8").read()
            cli = cli[:-1] if cli.endswith("\n") else cli
            text = llm.detokenize(out).decode("utf-8", errors="replace")
            check(cli == g["text"], f"`zhllama generate` printed the decode of its greedy ids ({len(cli)} chars)")
            print(f"info: llama.cpp's own detokenization of the ids equals ours: {text == g['text']}"
                  + ("" if text == g["text"] else f" (llama.cpp {text[:40]!r}, zhllama {g['text'][:40]!r})"))
        del llm

    # Tokenizer: llama.cpp on the embedded vocabulary vs zhllama tokenize, line by line.
    vocab = load(a.vocab_gguf, vocab_only=True)
    lines = open(a.corpus, encoding="utf-8").read()
    lines = (lines[:-1] if lines.endswith("\n") else lines).split("\n")
    ours = [json.loads(l) for l in open(a.our_tokens, encoding="utf-8")]
    assert len(ours) == len(lines), (len(ours), len(lines))
    diff_lines, tok_ours, tok_theirs, shown = 0, 0, 0, 0
    for line, mine in zip(lines, ours):
        theirs = vocab.tokenize(line.encode("utf-8"), add_bos=False, special=False)
        tok_ours += len(mine)
        tok_theirs += len(theirs)
        if theirs != mine:
            diff_lines += 1
            if shown < 5:
                shown += 1
                k = next(i for i, (x, y) in enumerate(zip(theirs + [-1], mine + [-1])) if x != y)
                lo = max(0, k - 2)
                piece = lambda t: vocab.detokenize([t]).decode("utf-8", "replace") if t >= 0 else "<end>"
                print(f"tokenizer diff at token {k}: llama.cpp {[piece(t) for t in theirs[lo:k + 3]]} "
                      f"zhllama {[piece(t) for t in mine[lo:k + 3]]}")
    print(f"tokenizer: {len(lines) - diff_lines}/{len(lines)} lines identical; "
          f"{tok_ours} zhllama tokens, {tok_theirs} llama.cpp tokens")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
