#!/usr/bin/env bash
# The parser fuzz job (not part of tools/test.sh, which runs the same targets at a smoke budget):
# every target of tests/fuzz_parsers.rs gets CASES mutated seeds plus CASES random inputs.
# Usage: tools/fuzz.sh [CASES]   (default 10000; docs/RELIABILITY.md records the last run)
set -euo pipefail
cd "$(dirname "$0")/.."
CASES="${1:-10000}"
ZHLLAMA_FUZZ_CASES="$CASES" cargo test --release --test fuzz_parsers -- --nocapture --test-threads 1 2>&1 |
    grep -oE 'fuzz [^:]+: [0-9]+ executions, [0-9]+ crashes|test result.*|panicked.*|FAILED.*'
