#!/usr/bin/env bash
# The whole test suite on a fresh machine (this is what .ci/run calls, and the README's second command).
# It installs what the tests need, then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
# vocab: python sentencepiece is the reference for the tokenizer parity tests (tests/vocab_*.rs).
python3 -m pip install -q sentencepiece==0.2.3
cargo test --release --all-targets
