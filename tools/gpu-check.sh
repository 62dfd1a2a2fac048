#!/usr/bin/env bash
# GPU check and benchmark: the one prepared run on an H100/H200, inside 8 minutes with a margin.
#
# Here (x86-64, no GPU):   tools/gpu-check.sh --prepare
#   builds the `--features cuda` binaries and copies them (stripped) to gpu-bin/ (git-ignored).
# On the GPU machine:       device run with carry ["gpu-bin"] and command `tools/gpu-check.sh`
#   (nothing is installed there; the image's CUDA 13.0 driver, NVRTC, cuBLAS, PyTorch, transformers
#   and PEFT are used as they are). Logs go under $OUT; $OUT/summary.txt is rewritten after every
#   step (a run cut short still leaves the table of what finished) and printed at the end.
# Dry run here:             tools/gpu-check.sh --dry-run
#   the same script with a fake `nvidia-smi` and stand-ins for every binary and for python, each of
#   which never finishes, so every step runs out its budget: the worst case. Prints each step's
#   order, budget and time, and the total, which must stay under the deadline.
#
# Steps, most important first, each under its own budget. The budgets add up to 400 s, inside the
# global deadline (GPU_CHECK_BUDGET_S, 420 s = 7 min: a minute of margin in eight, and ~1 s of
# overhead per step); a step that would start with under 15 s left is skipped:
#   1. headline: LLaMA-7B-shaped SFT (LoRA r8 ×7 + embed + lm_head) and pt1 (embedding only),
#      zhllama vs HF transformers + PEFT in the same run  (zhllama bench + bench_torch_gpu.py);
#      the first start compiles the kernels into $OUT/kernel-cache, later ones load them (the
#      warm-cache start the NVRTC check used to cover)
#   2. every kernel vs the CPU backend on fresh random inputs           (cuda_parity test binary)
#   3. ceilings (D2D copy, cuBLAS bf16 GEMM), rooflines, fused CE memory, per-kernel profile (cuda-bench)
#   4. a few training steps of a small model, GPU vs CPU losses         (zhllama bench --backend)
#   5. NCCL at world 1 and the NCCL wait/abort logic                    (cuda_nccl test binary)
#   6. summary table
# Without a GPU it exits 2 with "gpu-check: no usable NVIDIA GPU ..." (CI checks that).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${ZHLLAMA_GPU_BIN:-gpu-bin}"

if [ "${1:-}" = "--dry-run" ]; then
    # Stand-ins: `nvidia-smi` lists one GPU; every binary and python sleep until killed.
    fake="$(mktemp -d)"
    mkdir -p "$fake/bin" "$fake/path"
    cat >"$fake/path/nvidia-smi" <<'SMI'
#!/usr/bin/env bash
case "$*" in
    -L) echo "GPU 0: dry-run stand-in (UUID: GPU-00000000)" ;;
    *noheader*) echo "dry-run stand-in" ;;
    *) echo "name, memory.total [MiB], driver_version, clocks.max.sm [MHz]"; echo "dry-run stand-in, 0 MiB, 0, 0" ;;
esac
SMI
    for b in zhllama cuda-bench cuda_parity cuda_nccl python-standin; do
        printf '#!/usr/bin/env bash\necho "stand-in %s $*"\nexec sleep 100000\n' "$b" >"$fake/bin/$b"
    done
    chmod +x "$fake/path/nvidia-smi" "$fake/bin"/*
    rc=0
    PATH="$fake/path:$PATH" ZHLLAMA_GPU_BIN="$fake/bin" ZHLLAMA_GPU_CHECK_PYTHON="$fake/bin/python-standin" \
        OUT="${OUT:-$fake/out}" bash "$0" || rc=$?
    echo "gpu-check --dry-run: rc=$rc (non-zero expected: every stand-in step times out); logs in ${OUT:-$fake/out}"
    exit 0
fi

if [ "${1:-}" = "--prepare" ]; then
    set -e
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
    cargo build --release --features cuda --bins
    cargo test --release --features cuda --no-run --test cuda_parity --test cuda_nccl 2>&1 | tee /tmp/gpu-check-build.txt
    mkdir -p "$BIN"
    cp "$CARGO_TARGET_DIR/release/zhllama" "$CARGO_TARGET_DIR/release/cuda-bench" "$BIN/"
    for t in cuda_parity cuda_nccl; do
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
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-420}))
PY="${ZHLLAMA_GPU_CHECK_PYTHON:-python3}"
FAILED=()
SKIPPED=()
note() { echo "$*" | tee -a "$SUMMARY"; }
die() { echo "gpu-check: $*" | tee -a "$SUMMARY" >&2; exit 2; }

# Run "$@" with at most min(budget, time left before the deadline) seconds; log to $OUT/<name>.txt.
step() {
    local name="$1" budget="$2"
    shift 2
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 15 ]; then
        note "$name: SKIPPED (out of time)"
        SKIPPED+=("$name")
        return 124
    fi
    [ "$budget" -gt "$left" ] && budget="$left"
    echo "== $name (budget ${budget}s) $*" | tee -a "$OUT/gpu-check.log"
    local t0=$SECONDS rc=0
    timeout -k 5 "$budget" "$@" >"$OUT/$name.txt" 2>&1 || rc=$?
    echo "   rc=$rc in $((SECONDS - t0))s (at +$((SECONDS - START))s)" | tee -a "$OUT/gpu-check.log"
    [ "$rc" -eq 0 ] || FAILED+=("$name(rc=$rc)")
    tail -n 3 "$OUT/$name.txt" | sed 's/^/   | /' | tee -a "$OUT/gpu-check.log"
    summary >"$SUMMARY.tmp" 2>&1 && mv "$SUMMARY.tmp" "$SUMMARY"
    return $rc
}

LOSS_TOL=2e-2
losses() { awk '/^step [0-9]+ loss / {print $4}' "$1" 2>/dev/null; }
# Field KEY of the last JSON line of FILE (zhllama's and python's spacing both).
jget() { grep -o "\"$2\": *[^,}]*" "$1" 2>/dev/null | tail -1 | sed 's/.*: *//; s/^null$//'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2fx", a / b; else printf "n/a" }'; }
num() { awk -v a="$1" -v f="$2" 'BEGIN { if (a + 0 > 0) printf f, a; else printf "n/a" }'; }
pct() { awk -v a="$1" 'BEGIN { if (a + 0 > 0) printf "%.2f%%", 100 * a; else printf "n/a" }'; }

# The summary table from whatever logs exist so far (called after every step, and at the end).
summary() {
    local copy gemm st zt ht zm res
    copy="$(awk '/ceiling  d2d_copy/ {print $3}' "$OUT/bench.txt" 2>/dev/null)"
    gemm="$(awk '/ceiling  gemm_bf16/ {print $3}' "$OUT/bench.txt" 2>/dev/null)"
    echo "${CARD_LINE:-}"
    echo "include: ${ZHLLAMA_CUDA_INCLUDE:-none found}"
    echo "================ gpu-check summary: ${CARD:-?} ================"
    printf "%-40s %s\n" "time so far" "$((SECONDS - START)) s of ${GPU_CHECK_BUDGET_S:-420} s"
    for st in sft pt1; do
        [ -e "$OUT/zh_$st.txt" ] || [ -e "$OUT/torch_$st.txt" ] || continue
        zt="$(jget "$OUT/zh_$st.txt" tokens_per_s)"
        ht="$(jget "$OUT/torch_$st.txt" tokens_per_s)"
        zm="$(jget "$OUT/zh_$st.txt" mem_used_bytes)"
        printf "%-40s %s\n" "7B $st tokens/s zhllama / HF (ratio)" "$(num "$zt" %.0f) / $(num "$ht" %.0f) ($(ratio "$zt" "$ht"))"
        # MFU against the GEMM rate measured in step 3 (the headline runs first, so it is applied here).
        printf "%-40s %s\n" "7B $st MFU 4N zhllama / HF" \
            "$(pct "$(awk -v t="$(jget "$OUT/zh_$st.txt" tflops)" -v g="$gemm" 'BEGIN { if (g + 0 > 0) print t / g }')") / $(pct "$(awk -v f="$(jget "$OUT/torch_$st.txt" flops_per_token_4n)" -v r="$ht" -v g="$gemm" 'BEGIN { if (g + 0 > 0) print f * r / (g * 1e12) }')")"
        printf "%-40s %s\n" "7B $st memory zhllama in use / HF peak" "$(awk -v b="$zm" 'BEGIN { if (b + 0 > 0) printf "%.1f GiB", b / 2^30; else printf "n/a" }') / $(num "$(jget "$OUT/torch_$st.txt" peak_mem_gib)" "%.1f GiB")"
        printf "%-40s %s\n" "7B $st profiled step TFLOP/s" "$(num "$(jget "$OUT/zh_$st.txt" profile_tflops)" %.1f)"
    done
    if [ -s "$OUT/parity.txt" ]; then
        printf "%-40s %s\n" "parity rows ok / total" \
            "$(grep -v '^test ' "$OUT/parity.txt" | grep -cE ' ok$') / $(grep -v '^test ' "$OUT/parity.txt" | grep -cE ' (ok|FAIL|NaN/Inf)$')"
        grep -E ' (FAIL|NaN/Inf)$' "$OUT/parity.txt" | head -20 | sed 's/^/  FAIL /'
        grep -E '^test result' "$OUT/parity.txt" | sed 's/^/  /'
    fi
    [ -n "$copy$gemm" ] && printf "%-40s %s\n" "d2d copy bandwidth / bf16 GEMM 8192^3" "${copy:-n/a} GB/s / ${gemm:-n/a} TFLOP/s"
    grep -E '^roofline|^attention|^ce_memory' "$OUT/bench.txt" 2>/dev/null | sed 's/^/  /'
    for st in full sft; do
        [ -e "$OUT/train_gpu_$st.txt" ] || continue
        res="$(paste <(losses "$OUT/train_cpu_$st.txt") <(losses "$OUT/train_gpu_$st.txt") | awk -v tol="$LOSS_TOL" '
            NF != 2 { n++; bad++; next }
            NF == 2 { n++; if ($1 !~ /^-?[0-9]+\.[0-9]+$/ || $2 !~ /^-?[0-9]+\.[0-9]+$/) { bad++; next }
                      d = ($2 - $1) / ($1 == 0 ? 1 : $1); if (d < 0) d = -d; if (d > m) m = d; if (d > tol) bad++ }
            END { if (n == 0) print "FAIL (no losses)"; else printf "%s (%d steps, max rel diff %.2e, tol %s)", (bad ? "FAIL" : "PASS"), n, m, tol }')"
        printf "%-40s %s\n" "GPU vs CPU losses, tiny-d64 $st" "$res"
        paste <(losses "$OUT/train_cpu_$st.txt") <(losses "$OUT/train_gpu_$st.txt") >"$OUT/losses_$st.tsv"
    done
    if grep -q '^kernel ' "$OUT/zh_sft.txt" 2>/dev/null; then
        echo "7B sft per-kernel profile (top 12 of one step; full table in zh_sft.txt):"
        grep -A12 '^kernel ' "$OUT/zh_sft.txt" | sed 's/^/  /'
    fi
    printf "%-40s %s\n" "failed steps" "${FAILED[*]:-none}"
    printf "%-40s %s\n" "skipped steps (out of time)" "${SKIPPED[*]:-none}"
    echo "logs: $OUT"
}

# ---- 0. the machine -----------------------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >"$OUT/nvidia-smi.txt" 2>&1 \
    || ! grep -q "^GPU " "$OUT/nvidia-smi.txt"; then
    die "no usable NVIDIA GPU (nvidia-smi missing or lists no GPU); this script runs on a GPU machine"
fi
if [ "${ZHLLAMA_GPU_CHECK_NO_BUILD:-0}" != 1 ] && [ ! -x "$BIN/cuda-bench" ]; then
    die "no $BIN/cuda-bench: run 'tools/gpu-check.sh --prepare' on the build machine and carry $BIN"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >>"$OUT/nvidia-smi.txt" 2>&1
CARD="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
CARD_LINE="card: $CARD | driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1) | $(date -u +%FT%TZ)"
note "$CARD_LINE"

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

# ---- 1. headline: LLaMA-7B shape, SFT and pt1, zhllama vs HF+PEFT -----------------------------------
BATCH="${GPU_CHECK_BATCH:-4}"
# --profile adds one step under the per-kernel CUDA-event profiler (its table is in zh_sft.txt). The
# GEMM ceiling is measured later (step 3); the summary relates the two.
step zh_sft 75 "$BIN/zhllama" bench --preset 7b --backend cuda --stage sft --random-init --batch "$BATCH" --seq 512 --steps 3 --profile
step torch_sft 75 "$PY" tools/oracle/bench_torch_gpu.py --stage sft --batch "$BATCH" --seq 512 --steps 3
step zh_pt1 40 "$BIN/zhllama" bench --preset 7b --backend cuda --stage pt1 --random-init --batch "$BATCH" --seq 512 --steps 3
step torch_pt1 40 "$PY" tools/oracle/bench_torch_gpu.py --stage pt1 --batch "$BATCH" --seq 512 --steps 3
# ---- 2. parity --------------------------------------------------------------------------------------
step parity 55 "$BIN/cuda_parity" --nocapture --test-threads=1
# ---- 3. ceilings, rooflines, fused CE memory, per-kernel profile --------------------------------------
step bench 40 "$BIN/cuda-bench" all --reps 3
# ---- 4. training steps GPU vs CPU -------------------------------------------------------------------
# The same seeded weights and tokens on both backends (`tiny-d64`: the smallest shape with the head dim
# 64 the CUDA attention kernels take): `full` (forward + backward of every weight, no update: the same
# loss each step) and `sft` (LoRA + embedding + lm_head with AdamW: the loss moves each step).
# Every per-step loss must agree within 2e-2 relative: the GPU stores weights and activations in bf16
# (2^-9 relative rounding each) through ~20 ops per layer, which moves the loss by up to ~1e-2.
for st in full sft; do
    step "train_cpu_$st" 15 "$BIN/zhllama" bench --preset tiny-d64 --stage "$st" --backend cpu --seed 3 --steps 4 --warmup 1
    step "train_gpu_$st" 15 "$BIN/zhllama" bench --preset tiny-d64 --stage "$st" --backend cuda --seed 3 --steps 4 --warmup 1
done
# ---- 5. NCCL at world 1 (collectives and a ZeRO-2 step bit-identical to LocalComm) -------------------
step nccl 15 "$BIN/cuda_nccl" --nocapture --test-threads=1

summary | tee "$SUMMARY.tmp"
mv "$SUMMARY.tmp" "$SUMMARY"
grep -q '^GPU vs CPU losses.* FAIL' "$SUMMARY" && FAILED+=("losses")
[ "${#FAILED[@]}" -eq 0 ]
