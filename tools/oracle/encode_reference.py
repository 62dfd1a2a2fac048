#!/usr/bin/env python3
"""Reference encodings from python sentencepiece, for the Rust parity test (tests/vocab_corpus.rs).

usage: encode_reference.py MODEL OUTPUT FILE...

Every FILE is read as UTF-8 and split on '\n' (the piece after a final newline included, as
Rust's str::split does); each line is encoded with SentencePieceProcessor.encode(line) (no BOS/EOS)
and written to OUTPUT as one JSON line [ids, sp.decode(ids)], files one after another.
"""
import json
import sys

import sentencepiece as spm


def main() -> None:
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    sp = spm.SentencePieceProcessor(model_file=sys.argv[1])
    with open(sys.argv[2], "w", encoding="utf-8") as out:
        for path in sys.argv[3:]:
            with open(path, encoding="utf-8", newline="") as f:
                lines = f.read().split("\n")
            for ids in sp.encode(lines):
                out.write(json.dumps([ids, sp.decode(ids)], ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
