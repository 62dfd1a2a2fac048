#!/usr/bin/env bash
# GPU check and benchmark (issue 10): the one prepared run on a lent H100/H200, under 8 minutes.
#
# Here (x86-64, no GPU):   tools/gpu-check.sh --prepare
#   builds the `--features cuda` binaries and copies them (stripped) to gpu-bin/ (git-ignored).
# On the GPU machine:       device run with carry ["gpu-bin"] and command `tools/gpu-check.sh`
#   (nothing is installed there; the image's CUDA 13.0 driver, NVRTC, cuBLAS, PyTorch, transformers
#   and PEFT are used as they are). Logs go under $OUT; the summary table is printed last and saved
#   as $OUT/summary.txt.
#
# Steps (each under its own time budget, all under a global deadline):
#   1. ceilings: D2D copy bandwidth, cuBLAS bf16 GEMM rate            (cuda-bench)
#   2. every kernel vs the CPU backend on fresh random inputs           (cuda_parity test binary)
#   3. a few training steps of a small model, GPU vs CPU losses         (zhllama bench, see TODO)
#   4. LLaMA-7B-shaped SFT (LoRA r8 ×7 + embed + lm_head) and pt1 (embedding only): zhllama vs
#      HF transformers + PEFT in the same run                          (zhllama bench + bench_torch_gpu.py)
#   5. rooflines: RMSNorm / AdamW bandwidth vs copy; fused lm_head+CE memory vs unfused; profile
#   6. summary table
# Without a GPU it exits 2 with "gpu-check: no usable NVIDIA GPU ..." (CI checks that).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${ZHLLAMA_GPU_BIN:-gpu-bin}"

if [ "${1:-}" = "--prepare" ]; then
    set -e
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
    cargo build --release --features cuda --bins
    cargo test --release --features cuda --no-run --test cuda_parity --test cuda_nvrtc_compile --test cuda_nccl 2>&1 | tee /tmp/gpu-check-build.txt
    mkdir -p "$BIN"
    cp "$CARGO_TARGET_DIR/release/zhllama" "$CARGO_TARGET_DIR/release/cuda-bench" "$BIN/"
    for t in cuda_parity cuda_nvrtc_compile cuda_nccl; do
        exe="$(grep -o "[^ (]*/deps/$t-[0-9a-f]*" /tmp/gpu-check-build.txt | tail -1)"
        [ -n "$exe" ] || exe="$(ls -t "$CARGO_TARGET_DIR"/release/deps/$t-* | grep -v '\.d$' | head -1)"
        cp "$exe" "$BIN/$t"
    done
    strip --strip-debug "$BIN"/* 2>/dev/null || true
    du -sh "$BIN"
    echo "gpu-check: prepared $BIN/; run it on the GPU machine with carry [\"$BIN\"]"
    exit 0
fi

OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
START=$SECONDS
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-460}))
FAILED=()
note() { echo "$*" | tee -a "$SUMMARY"; }
die() { echo "gpu-check: $*" | tee -a "$SUMMARY" >&2; exit 2; }

# Run "$@" with at most min(budget, time left before the deadline) seconds; log to $OUT/<name>.txt.
step() {
    local name="$1" budget="$2"
    shift 2
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 15 ]; then
        note "$name: SKIPPED (out of time)"
        return 124
    fi
    [ "$budget" -gt "$left" ] && budget="$left"
    echo "== $name (budget ${budget}s) $*" | tee -a "$OUT/gpu-check.log"
    local t0=$SECONDS rc=0
    timeout -k 5 "$budget" "$@" >"$OUT/$name.txt" 2>&1 || rc=$?
    echo "   rc=$rc in $((SECONDS - t0))s" | tee -a "$OUT/gpu-check.log"
    [ "$rc" -eq 0 ] || FAILED+=("$name(rc=$rc)")
    tail -n 3 "$OUT/$name.txt" | sed 's/^/   | /' | tee -a "$OUT/gpu-check.log"
    return $rc
}

# ---- 0. the machine -----------------------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >"$OUT/nvidia-smi.txt" 2>&1 \
    || ! grep -q "^GPU " "$OUT/nvidia-smi.txt"; then
    die "no usable NVIDIA GPU (nvidia-smi missing or lists no GPU); this script runs on a lent GPU machine"
fi
if [ "${ZHLLAMA_GPU_CHECK_NO_BUILD:-0}" != 1 ] && [ ! -x "$BIN/cuda-bench" ]; then
    die "no $BIN/cuda-bench: run 'tools/gpu-check.sh --prepare' on the build machine and carry $BIN"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >>"$OUT/nvidia-smi.txt" 2>&1
CARD="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
note "card: $CARD | driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1) | $(date -u +%FT%TZ)"

# CUDA headers and libraries for NVRTC/cuBLAS: the image's toolkit, else PyTorch's nvidia wheels.
for d in "${CUDA_HOME:-/usr/local/cuda}" /usr/local/cuda /usr/local/cuda-13.0; do
    if [ -f "$d/include/cuda_bf16.h" ]; then
        export ZHLLAMA_CUDA_INCLUDE="$d/include"
        export LD_LIBRARY_PATH="$d/lib64:$d/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        break
    fi
done
PYNV="$(python3 -c 'import nvidia, os; print(list(nvidia.__path__)[0])' 2>/dev/null || true)"
if [ -n "$PYNV" ]; then
    for lib in "$PYNV"/cu13/lib "$PYNV"/*/lib; do
        [ -d "$lib" ] && LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$lib"
    done
    export LD_LIBRARY_PATH
    if [ -z "${ZHLLAMA_CUDA_INCLUDE:-}" ] && [ -f "$PYNV/cu13/include/cuda_bf16.h" ]; then
        export ZHLLAMA_CUDA_INCLUDE="$PYNV/cu13/include"
    fi
fi
export ZHLLAMA_KERNEL_CACHE="$OUT/kernel-cache"
# On the GPU machine a GPU test that cannot open the device is a failure, not a skip.
export ZHLLAMA_REQUIRE_GPU=1
note "include: ${ZHLLAMA_CUDA_INCLUDE:-none found}"

# ---- 1 + 5. ceilings, rooflines, fused CE memory, per-kernel profile --------------------------------
step bench 150 "$BIN/cuda-bench" all --reps 5
# ---- 2. parity --------------------------------------------------------------------------------------
step parity 110 "$BIN/cuda_parity" --nocapture --test-threads=1
# NVRTC check with the image's own NVRTC (registers/spills as compiled for this card's toolkit).
step nvrtc 60 "$BIN/cuda_nvrtc_compile" --nocapture every_kernel
# NCCL at world 1: collectives and a ZeRO-2 step bit-identical to LocalComm (issue 10).
step nccl 45 "$BIN/cuda_nccl" --nocapture --test-threads=1

COPY="$(awk '/ceiling  d2d_copy/ {print $3}' "$OUT/bench.txt" 2>/dev/null)"
GEMM="$(awk '/ceiling  gemm_bf16/ {print $3}' "$OUT/bench.txt" 2>/dev/null)"

# ---- 3. training steps GPU vs CPU (needs `zhllama bench --backend cuda`) ------------------------------
# TODO(model/train): `zhllama bench` takes `--backend cuda` once the model helper wires
# `CudaBackend::with_options` into src/cli/bench.rs; until then this step reports "not available".
if "$BIN/zhllama" bench --help 2>/dev/null | grep -q -- "--backend"; then
    step train_cpu 45 "$BIN/zhllama" bench --preset tiny --backend cpu --steps 3 --warmup 0
    step train_gpu 45 "$BIN/zhllama" bench --preset tiny --backend cuda --steps 3 --warmup 0
else
    note "train steps GPU vs CPU: not available (zhllama bench has no --backend flag in this build)"
fi

# ---- 4. headline: LLaMA-7B shape, SFT and pt1, zhllama vs HF+PEFT --------------------------------------
BATCH="${GPU_CHECK_BATCH:-4}"
# TODO(model/train): the SFT/pt1 stage flags of `zhllama bench` (`--stage sft|pt1 --random-init`) are
# the model helper's; this runs them when `zhllama bench --help` lists `--stage`.
if "$BIN/zhllama" bench --help 2>/dev/null | grep -q -- "--stage"; then
    step zh_sft 90 "$BIN/zhllama" bench --preset 7b --backend cuda --stage sft --random-init --batch "$BATCH" --seq 512 --steps 3
    step zh_pt1 60 "$BIN/zhllama" bench --preset 7b --backend cuda --stage pt1 --random-init --batch "$BATCH" --seq 512 --steps 3
else
    note "zhllama 7B SFT/pt1 bench: not available (zhllama bench has no --stage flag in this build)"
fi
step torch_sft 110 python3 tools/oracle/bench_torch_gpu.py --stage sft --batch "$BATCH" --seq 512 --steps 3 --gemm-tflops "${GEMM:-0}"
step torch_pt1 70 python3 tools/oracle/bench_torch_gpu.py --stage pt1 --batch "$BATCH" --seq 512 --steps 3 --gemm-tflops "${GEMM:-0}"

# ---- 6. summary ------------------------------------------------------------------------------------------
{
    echo
    echo "================ gpu-check summary: $CARD ================"
    printf "%-40s %s\n" "total time" "$((SECONDS - START)) s"
    printf "%-40s %s\n" "d2d copy bandwidth" "${COPY:-n/a} GB/s"
    printf "%-40s %s\n" "cuBLAS bf16 GEMM 8192^3" "${GEMM:-n/a} TFLOP/s"
    if [ -s "$OUT/parity.txt" ]; then
        printf "%-40s %s\n" "parity rows ok / total" \
            "$(grep -v '^test ' "$OUT/parity.txt" | grep -cE ' ok$') / $(grep -v '^test ' "$OUT/parity.txt" | grep -cE ' (ok|FAIL|NaN/Inf)$')"
        grep -E ' (FAIL|NaN/Inf)$' "$OUT/parity.txt" | head -20 | sed 's/^/  FAIL /'
        grep -E '^test result' "$OUT/parity.txt" | sed 's/^/  /'
    fi
    grep -E '^roofline|^attention|^ce_memory' "$OUT/bench.txt" 2>/dev/null | sed 's/^/  /'
    for s in torch_sft torch_pt1 zh_sft zh_pt1 train_cpu train_gpu; do
        [ -s "$OUT/$s.txt" ] && printf "%-40s %s\n" "$s" "$(grep -E 'tokens|loss' "$OUT/$s.txt" | tail -1)"
    done
    printf "%-40s %s\n" "failed steps" "${FAILED[*]:-none}"
    echo "logs: $OUT"
} | tee -a "$SUMMARY"
[ "${#FAILED[@]}" -eq 0 ]
