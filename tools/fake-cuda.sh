#!/usr/bin/env bash
# Run a command under the CUDA stand-in (tests/fake_cuda/): a test-only libcuda.so.1, libcublas.so.13,
# libcublasLt.so.13 and libnccl.so.2 that run the CUDA backend on the CPU, with kernels/*.cu compiled
# by g++ against the host emulation. NVRTC stays the real one (from the nvidia-cuda-nvrtc wheel).
#
#   tools/fake-cuda.sh target/release/zhllama bench --backend cuda --preset tiny-d64 --stage sft --steps 3
#
# Builds the stand-in into target/fake-cuda/ when its inputs changed (cached by content hash), then
# runs CMD with LD_LIBRARY_PATH pointing at it. FAKE_CUDA_ASAN=1 builds the emulated kernels with
# AddressSanitizer (into target/fake-cuda-asan/; slower). FAKE_CUDA_UNSUPPORTED=name1,name2 makes those
# entry points answer "not supported" (to test that the backend fails cleanly).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SRC="$ROOT/tests/fake_cuda"
EMU="$ROOT/tests/cuda_emu"
ASAN="${FAKE_CUDA_ASAN:-0}"
OUT="$ROOT/target/fake-cuda"; [ "$ASAN" = 1 ] && OUT="$ROOT/target/fake-cuda-asan"
CUDARC="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | sort | tail -1)"
[ -d "$CUDARC" ] || { echo "fake-cuda: cudarc 0.19 sources not found under ~/.cargo/registry (run cargo build --features cuda first)" >&2; exit 2; }
CU13="${FAKE_CUDA_CU13:-$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))' 2>/dev/null || true)}"
[ -f "$CU13/include/cuda_bf16.h" ] || { echo "fake-cuda: the NVRTC wheel (nvidia-cuda-nvrtc, cu13) is not installed" >&2; exit 2; }

key="$(cat "$0" "$SRC"/*.cpp "$SRC"/*.h "$SRC"/*.py "$EMU"/*.h "$ROOT"/kernels/* | sha256sum | cut -c1-16)-asan$ASAN"
# One builder at a time (the ranks of an `mpirun` all start here); the others wait, then reuse it.
mkdir -p "$(dirname "$OUT")"
exec 9>"$OUT.lock"
flock 9
if [ "$(cat "$OUT/stamp" 2>/dev/null)" != "$key" ]; then
    echo "fake-cuda: building the stand-in into $OUT" >&2
    rm -rf "$OUT.tmp"; mkdir -p "$OUT.tmp/lib"
    B="$OUT.tmp"
    python3 "$SRC/gen_kernels.py" "$ROOT/kernels" "$EMU" "$SRC" "$B" >&2
    python3 "$SRC/gen_stubs.py" "$CUDARC/src/driver/sys/mod.rs" cu 801 "$B/stubs_cuda.cpp" >&2
    python3 "$SRC/gen_stubs.py" "$CUDARC/src/cublas/sys/mod.rs" cublas 15 "$B/stubs_cublas.cpp" >&2
    python3 "$SRC/gen_stubs.py" "$CUDARC/src/cublaslt/sys/mod.rs" cublasLt 15 "$B/stubs_cublaslt.cpp" >&2
    python3 "$SRC/gen_stubs.py" "$CUDARC/src/nccl/sys/mod.rs" nccl 5 "$B/stubs_nccl.cpp" >&2
    KFLAGS=(-O2 -g)
    if [ "$ASAN" = 1 ]; then KFLAGS=(-O1 -g -fsanitize=address -fno-omit-frame-pointer -DFAKE_CUDA_UCONTEXT); fi
    CXX=(g++ -std=c++20 -fPIC -shared -pthread -I "$EMU" -I "$SRC" -I "$B")
    "${CXX[@]}" "${KFLAGS[@]}" "$B/kernels.cpp" -o "$B/lib/libfakecuda_kernels.so" &
    kpid=$!
    "${CXX[@]}" -O2 -g -Wl,-soname,libcuda.so.1 "$SRC/driver.cpp" "$B/stubs_cuda.cpp" -ldl -o "$B/lib/libcuda.so.1"
    "${CXX[@]}" -O2 -g -Wl,-soname,libcublas.so.13 "$SRC/cublas.cpp" "$B/stubs_cublas.cpp" \
        -L "$B/lib" -l:libcuda.so.1 -Wl,-rpath,'$ORIGIN' -o "$B/lib/libcublas.so.13"
    g++ -fPIC -shared -Wl,-soname,libcublasLt.so.13 "$B/stubs_cublaslt.cpp" \
        -L "$B/lib" -l:libcuda.so.1 -Wl,-rpath,'$ORIGIN' -o "$B/lib/libcublasLt.so.13"
    "${CXX[@]}" -O2 -g -Wl,-soname,libnccl.so.2 "$SRC/nccl.cpp" "$B/stubs_nccl.cpp" \
        -L "$B/lib" -l:libcuda.so.1 -Wl,-rpath,'$ORIGIN' -lrt -o "$B/lib/libnccl.so.2"
    wait "$kpid"
    echo "$key" > "$B/stamp"
    rm -rf "$OUT"; mv "$B" "$OUT"
fi
flock -u 9
exec 9>&-
[ "$#" -gt 0 ] || exit 0
export LD_LIBRARY_PATH="$OUT/lib:$CU13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export ZHLLAMA_CUDA_INCLUDE="${ZHLLAMA_CUDA_INCLUDE:-$CU13/include}"
if [ "$ASAN" = 1 ]; then
    # The sanitizer runtime must come first; fibers switch stacks, which ASan is told to tolerate.
    export LD_PRELOAD="$(g++ -print-file-name=libasan.so)${LD_PRELOAD:+:$LD_PRELOAD}"
    export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:detect_stack_use_after_return=0:halt_on_error=1}"
fi
exec "$@"
