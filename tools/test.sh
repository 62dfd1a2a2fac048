#!/usr/bin/env bash
# The whole test suite on a fresh machine (this is what .ci/run calls, and the README's second command).
# It installs what the tests need, then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- skips: collected, summarised at the end ---------------------------------------------------------
# A test that cannot run here (no ../shared data, no oracle, no GPU, ...) appends one line
# "SKIP <target>::<test>: <reason>" to $ZHLLAMA_SKIP_LOG (tests/skip_common/mod.rs); the last line this
# script prints summarises them. With ZHLLAMA_REQUIRE_ALL=1 (what .ci/run sets) every skip except
# "no usable GPU" fails its test instead.
ZHLLAMA_SKIP_LOG="$(mktemp -t zhllama-skips.XXXXXX)"
export ZHLLAMA_SKIP_LOG
skip_summary() {
    local rc=$? n
    n=$(wc -l <"$ZHLLAMA_SKIP_LOG")
    if [ "$n" -eq 0 ]; then
        echo "test.sh: nothing skipped (exit $rc)"
    else
        # One line: the count, then each distinct reason (up to its first ": ", so "no usable GPU: <the
        # driver's error>" counts as one) with how many tests it skipped; the full lines are above.
        echo "test.sh: $n skipped (exit $rc): $(sed -e 's/^SKIP [^ ]*: //' -e 's/: .*//' "$ZHLLAMA_SKIP_LOG" \
            | sort | uniq -c | sed 's/^ *\([0-9]*\) /\1 × /' | paste -sd ';' - | sed 's/;/; /g')"
    fi
    rm -f "$ZHLLAMA_SKIP_LOG"
}
trap skip_summary EXIT
# ---- end skips ---------------------------------------------------------------------------------------

# ---- installs: everything the tests need; any failure stops the script -------------------------------
# g++ builds the kernel emulation (tests/cuda_emulated.rs); cc the fake NVTX injection (tests/cuda_nvtx.rs).
if ! command -v g++ >/dev/null 2>&1 || ! command -v cc >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y g++
fi
# vocab: python sentencepiece is the reference for the tokenizer parity tests (tests/vocab_*.rs).
python3 -m pip install -q sentencepiece==0.2.3
# NCCL's clear-error and version tests (tests/cuda_nccl.rs) open the library of PyTorch's wheel.
python3 -m pip install -q --disable-pip-version-check nvidia-nccl-cu13==2.32.3
# data: the pinned Python oracle for the data parity tests, in its own venv so other
# pins cannot clash.
if [ ! -x .venv/data-oracle/bin/python ]; then python3 -m venv .venv/data-oracle; fi
.venv/data-oracle/bin/pip install -q -r tools/oracle/data_requirements.txt
# The live PEFT oracle (tests/train_parity.rs: PEFT itself loads the adapter zhllama saves). torch from
# PyPI brings the CUDA libraries (~3 GB, minutes), so it is installed once into a venv outside the clone,
# keyed by the requirements' sha256, and reused by every later run; `.complete` marks a finished install.
peft_req=tools/oracle/peft_requirements.txt
peft_venv="${ZHLLAMA_ORACLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zhllama}/peft-oracle-$(sha256sum "$peft_req" | cut -c1-16)"
if [ ! -f "$peft_venv/.complete" ]; then
    rm -rf "$peft_venv"
    mkdir -p "$(dirname "$peft_venv")"
    python3 -m venv "$peft_venv"
    "$peft_venv/bin/pip" install -q --disable-pip-version-check -r "$peft_req"
    touch "$peft_venv/.complete"
fi
export ZHLLAMA_PEFT_PYTHON="$peft_venv/bin/python"
# export: llama.cpp's `gguf` package reads every exported GGUF key and tensor back (tests/export_gguf.rs;
# tools/oracle/gguf_requirements.txt). The llama.cpp run itself (logits, greedy ids, tokenizer) builds
# llama.cpp from source and is a separate command: tools/oracle/llamacpp_check.sh.
if [ ! -x .venv/gguf-oracle/bin/python ]; then python3 -m venv .venv/gguf-oracle; fi
.venv/gguf-oracle/bin/pip install -q -r tools/oracle/gguf_requirements.txt
# train: TensorBoard's own event-file reader (tests/train_tensorboard.rs), in a light venv (no torch).
if [ ! -x .venv/tb-oracle/bin/python ]; then python3 -m venv .venv/tb-oracle; fi
.venv/tb-oracle/bin/pip install -q -r tools/oracle/tensorboard_requirements.txt
# ---- end installs ------------------------------------------------------------------------------------

cargo test --release --all-targets --no-fail-fast

# ---- distributed: OpenMPI from the system packages, then the multi-process tests ---
# (the `mpi` crate needs libopenmpi-dev + libclang-dev for bindgen; the tests call mpirun themselves)
if ! command -v mpirun >/dev/null 2>&1 || ! command -v mpicc >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y libopenmpi-dev openmpi-bin libclang-dev pkg-config
fi
cargo test --release --features mpi --test distributed_mpi --test distributed_train
# ---- cuda: the CUDA backend's CI without a GPU -------------------------------------------------------
# Builds with `--features cuda` and compiles every kernels/*.cu with NVRTC for sm_80 and sm_90 (fails on
# any compile error or register spill; prints registers/spills per kernel). NVRTC and the CUDA headers
# come from the pinned PyPI wheels; nothing here needs a GPU or nvcc.
cuda_ci() {
    python3 -m pip install -q --disable-pip-version-check \
        nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96
    local cu13
    cu13="$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
    [ -f "$cu13/include/cuda_bf16.h" ] || { echo "cuda_ci: no cuda_bf16.h under $cu13/include" >&2; return 1; }
    export LD_LIBRARY_PATH="$cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export ZHLLAMA_CUDA_INCLUDE="$cu13/include"
    cargo build --release --features cuda --bins
    cargo test --release --features cuda --test cuda_nvrtc_compile --test cuda_parity --test cuda_nvtx --test cuda_nccl -- --nocapture
    # The GPU check script must parse, and fail clearly on a machine without a GPU.
    bash -n tools/gpu-check.sh
    local out rc=0
    out="$(OUT="$(mktemp -d)" ZHLLAMA_GPU_CHECK_NO_BUILD=1 bash tools/gpu-check.sh 2>&1)" || rc=$?
    if [ "$rc" -eq 0 ] || ! grep -q "gpu-check: no usable NVIDIA GPU" <<<"$out"; then
        echo "cuda_ci: tools/gpu-check.sh should exit non-zero with a clear message without a GPU (rc=$rc):" >&2
        echo "$out" >&2
        return 1
    fi
}
cuda_ci
# ---- end cuda ----------------------------------------------------------------------------------------
# ---- fake-cuda: the CUDA backend end to end on the CPU stand-in (tests/fake_cuda/) ----------------------
# Runs after the distributed and cuda sections (OpenMPI and the NVRTC wheel are installed by then).
# tools/fake-cuda.sh builds the stand-in once (cached in target/fake-cuda/); the e2e tests compare
# bench/train/generate/mpirun under it with the CPU backend; the GPU parity suite runs under it too.
fake_cuda_ci() {
    bash tools/fake-cuda.sh
    cargo test --release --features cuda,mpi --test fake_cuda_e2e -- --test-threads 1 --nocapture
    # The GPU parity suite under the stand-in, its all-kernels sweep included (~1 min emulated;
    # ZHLLAMA_PARITY_OPS=attention,cross_entropy runs a subset).
    bash tools/fake-cuda.sh cargo test --release --features cuda,mpi --test cuda_parity -- --test-threads 1
    # The kernels built with AddressSanitizer (out-of-bounds __shared__ and local arrays; device memory
    # has the stand-in's guard pages): one sft step, every kernel of a training step.
    FAKE_CUDA_ASAN=1 bash tools/fake-cuda.sh target/release/zhllama bench --backend cuda --preset tiny-d64 \
        --stage sft --steps 1 --warmup 0 >/dev/null
}
fake_cuda_ci
# ---- end fake-cuda ---------------------------------------------------------------------------------------
