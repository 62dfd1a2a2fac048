#!/usr/bin/env python3
"""Independent check of a `zhllama export` GGUF file with llama.cpp's own `gguf` package.

Reads the file back with `gguf.GGUFReader` and compares *every* metadata key and *every* tensor
with what they must be, rebuilt here from the inputs without any zhllama code:
- the hyper-parameters from the model's `config.json`;
- the vocabulary from the SentencePiece model, parsed with sentencepiece's own protobuf
  (`sentencepiece_model_pb2`): pieces, scores, piece types, special ids, add_dummy_prefix;
- the tensors from the safetensors file(s), parsed here with numpy: renamed to llama.cpp's names,
  q_proj/k_proj rows permuted for llama.cpp's RoPE (numpy reshape/swapaxes), then converted with
  numpy (f16), or gguf-py's reference quantizers (`gguf.quants.quantize`: bf16, Q8_0).
Tensor bytes must be identical; metadata values equal (f32 values compared as f32).

Usage: gguf_check.py --gguf FILE --model DIR --tokenizer MODEL_FILE --outtype f32|f16|bf16|q8_0
Prints one line per failure and a closing 'N passed, M failed'; exit status 1 on any failure.
"""
import argparse
import json
import os
import struct
import sys

import numpy as np
import gguf
from gguf.quants import quantize
from sentencepiece import sentencepiece_model_pb2

Q = gguf.GGMLQuantizationType


def read_safetensors(model_dir):
    """name -> float32 numpy array (row-major shape), from model.safetensors or the index."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for f in files:
        raw = open(os.path.join(model_dir, f), "rb").read()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            buf = raw[base + a : base + b]
            dt = info["dtype"]
            if dt == "F32":
                x = np.frombuffer(buf, dtype="<f4")
            elif dt == "F16":
                x = np.frombuffer(buf, dtype="<f2").astype(np.float32)
            elif dt == "BF16":
                x = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                raise SystemExit(f"{f}: tensor {name}: dtype {dt} not handled")
            out[name] = x.reshape(info["shape"]).astype(np.float32)
    return out


def hf_to_gguf(name):
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if name in fixed:
        return fixed[name]
    parts = name.split(".")
    # model.layers.N.<module...>.weight
    layer, module = parts[2], ".".join(parts[3:])
    short = {
        "input_layernorm.weight": "attn_norm",
        "self_attn.q_proj.weight": "attn_q",
        "self_attn.k_proj.weight": "attn_k",
        "self_attn.v_proj.weight": "attn_v",
        "self_attn.o_proj.weight": "attn_output",
        "post_attention_layernorm.weight": "ffn_norm",
        "mlp.gate_proj.weight": "ffn_gate",
        "mlp.up_proj.weight": "ffn_up",
        "mlp.down_proj.weight": "ffn_down",
    }[module]
    return f"blk.{layer}.{short}.weight"


def rope_permute(w, heads):
    """HF rotate_half layout -> llama.cpp's adjacent-pair layout, per head."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_bytes(x, outtype):
    if x.ndim == 1:
        return Q.F32, x.astype("<f4").tobytes()
    if outtype == "f32":
        return Q.F32, x.astype("<f4").tobytes()
    if outtype == "f16":
        return Q.F16, x.astype("<f2").tobytes()
    if outtype == "bf16":
        return Q.BF16, quantize(x, Q.BF16).tobytes()
    if outtype == "q8_0":
        if x.shape[-1] % 32 != 0:  # rows not whole blocks: llama.cpp's converter falls back to f16
            return Q.F16, x.astype("<f2").tobytes()
        return Q.Q8_0, quantize(x, Q.Q8_0).tobytes()
    raise SystemExit(f"outtype {outtype}?")


def expected_metadata(cfg, sp, vocab, outtype, name):
    ftype = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[outtype]
    heads = cfg["num_attention_heads"]
    m = {
        "general.architecture": "llama",
        "general.name": name,
        "general.file_type": ftype,
        "general.quantization_version": 2,
        "llama.vocab_size": vocab,
        "llama.context_length": cfg.get("max_position_embeddings", 2048),
        "llama.embedding_length": cfg["hidden_size"],
        "llama.block_count": cfg["num_hidden_layers"],
        "llama.feed_forward_length": cfg["intermediate_size"],
        "llama.rope.dimension_count": cfg["hidden_size"] // heads,
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": cfg.get("num_key_value_heads") or heads,
        "llama.attention.layer_norm_rms_epsilon": np.float32(cfg.get("rms_norm_eps", 1e-6)),
        "llama.rope.freq_base": np.float32(cfg.get("rope_theta", 10000.0)),
        "tokenizer.ggml.model": "llama",
    }
    pieces = list(sp.pieces)
    tokens = [p.piece for p in pieces]
    scores = [np.float32(p.score) for p in pieces]
    types = [int(p.type) for p in pieces]  # sentencepiece's numbering is llama.cpp's
    ids = {p: i for i, p in enumerate(tokens)}
    ts = sp.trainer_spec

    def control(piece):
        i = ids.get(piece)
        return i if i is not None and types[i] == 3 else None

    bos, eos = control(ts.bos_piece or "<s>"), control(ts.eos_piece or "</s>")
    unk = next(i for i, t in enumerate(types) if t == 2)
    pad = control(ts.pad_piece or "<pad>")
    if pad is None:
        pad = ids.get("[PAD]")
    if vocab == len(tokens) + 1:  # the SFT script's added [PAD], a control token
        tokens.append("[PAD]")
        scores.append(np.float32(0.0))
        types.append(3)
        pad = len(tokens) - 1
    elif vocab != len(tokens):
        raise SystemExit(f"model vocab {vocab} vs tokenizer {len(tokens)}")
    m["tokenizer.ggml.tokens"] = tokens
    m["tokenizer.ggml.scores"] = scores
    m["tokenizer.ggml.token_type"] = types
    if bos is not None:
        m["tokenizer.ggml.bos_token_id"] = bos
    if eos is not None:
        m["tokenizer.ggml.eos_token_id"] = eos
    m["tokenizer.ggml.unknown_token_id"] = unk
    if pad is not None:
        m["tokenizer.ggml.padding_token_id"] = pad
    m["tokenizer.ggml.add_bos_token"] = bos is not None
    m["tokenizer.ggml.add_eos_token"] = False
    m["tokenizer.ggml.add_space_prefix"] = bool(sp.normalizer_spec.add_dummy_prefix)
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--outtype", required=True, choices=["f32", "f16", "bf16", "q8_0"])
    a = ap.parse_args()

    passed, failed = 0, 0

    def check(ok, what):
        nonlocal passed, failed
        if ok:
            passed += 1
        else:
            failed += 1
            print(f"FAIL: {what}")

    cfg = json.load(open(os.path.join(a.model, "config.json")))
    sp = sentencepiece_model_pb2.ModelProto()
    sp.ParseFromString(open(a.tokenizer, "rb").read())
    weights = read_safetensors(a.model)
    weights = {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
    vocab = weights["model.embed_tokens.weight"].shape[0]
    name = os.path.basename(os.path.realpath(a.model))
    want_meta = expected_metadata(cfg, sp, vocab, a.outtype, name)

    r = gguf.GGUFReader(a.gguf)
    check(r.fields["GGUF.version"].contents() == 3, "GGUF version 3")
    got_keys = {k for k in r.fields if not k.startswith("GGUF.")}
    check(got_keys == set(want_meta), f"metadata keys: extra {sorted(got_keys - set(want_meta))}, "
          f"missing {sorted(set(want_meta) - got_keys)}")
    for k, want in want_meta.items():
        if k not in r.fields:
            continue
        got = r.fields[k].contents()
        if isinstance(want, list) and want and isinstance(want[0], np.float32):
            ok = np.array_equal(np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32))
        elif isinstance(want, np.float32):
            ok = np.float32(got) == want
        else:
            ok = got == want
        shown = got if not isinstance(got, list) else f"list of {len(got)}"
        check(ok, f"metadata {k}: got {shown!r}")

    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    want_names = {hf_to_gguf(n): n for n in weights}
    got_names = {t.name for t in r.tensors}
    check(got_names == set(want_names), f"tensor names: extra {sorted(got_names - set(want_names))}, "
          f"missing {sorted(set(want_names) - got_names)}")
    for t in r.tensors:
        hf = want_names.get(t.name)
        if hf is None:
            continue
        x = weights[hf]
        if hf.endswith("q_proj.weight"):
            x = rope_permute(x, heads)
        elif hf.endswith("k_proj.weight"):
            x = rope_permute(x, kv_heads)
        ty, want = expected_bytes(x, a.outtype)
        check(t.tensor_type == ty, f"{t.name}: type {t.tensor_type!r}, expected {ty!r}")
        check([int(d) for d in t.shape] == list(reversed(x.shape)),
              f"{t.name}: dims {list(t.shape)}, expected {list(reversed(x.shape))}")
        check(t.data_offset % 32 == 0, f"{t.name}: data offset {t.data_offset} not 32-aligned")
        got = np.ascontiguousarray(t.data).view(np.uint8).tobytes()
        check(got == want, f"{t.name}: {len(got)} bytes differ from the expected {len(want)}")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
