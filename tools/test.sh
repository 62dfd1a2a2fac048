#!/usr/bin/env bash
# The whole test suite on a fresh machine (this is what .ci/run calls, and the README's second command).
# It installs what the tests need, then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
# vocab: python sentencepiece is the reference for the tokenizer parity tests (tests/vocab_*.rs).
python3 -m pip install -q sentencepiece==0.2.3
# data (issue 4): the pinned Python oracle for the data parity tests, in its own venv so other
# pins cannot clash; without it (offline) those tests skip with a message.
if [ ! -x .venv/data-oracle/bin/python ]; then python3 -m venv .venv/data-oracle || true; fi
.venv/data-oracle/bin/pip install -q -r tools/oracle/data_requirements.txt \
  || echo "warning: data oracle packages not installed; the data parity tests will skip"
cargo test --release --all-targets

# --- distributed (issue 8): OpenMPI from the system packages, then the multi-process tests ---
# (the `mpi` crate needs libopenmpi-dev + libclang-dev for bindgen; the tests call mpirun themselves)
if ! command -v mpirun >/dev/null 2>&1 || ! command -v mpicc >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y libopenmpi-dev openmpi-bin libclang-dev pkg-config
fi
cargo test --release --features mpi --test distributed_mpi --test distributed_train
