// A CPU emulation of the CUDA execution model, just enough to run zhllama's kernels unchanged on the
// host (tests/cuda_emulated.rs): every thread of a block is a std::thread, __syncthreads is a block
// barrier, warp shuffles exchange through a per-warp buffer between two warp barriers, __shared__
// variables are statics (blocks run one after another). Threads that return early drop out of the
// barriers, as exited threads do on the device. Slow, and only as faithful as this model: it checks
// the kernels' indexing, tiling, reductions and masking, not timing, memory ordering or occupancy.
#pragma once
#include "cuda_bf16.h"
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct dim3u {
    unsigned x = 0, y = 0, z = 0;
};
inline thread_local dim3u threadIdx, blockIdx;
inline dim3u blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

// CUDA's powf is not correctly rounded: the CUDA C++ Programming Guide bounds its error by 4 ulp.
// The host's is (nearly) correctly rounded, so a kernel that needs more accuracy than CUDA promises
// would pass here and fail on a GPU. The emulation's powf is therefore a legal CUDA powf that uses
// its error budget: the correctly rounded result moved 2 ulp up (exact cases, y = 0 or an exact
// 0/inf result, stay exact). Kernels should take such values from the host (e.g. RoPE's inv_freq).
inline float emu_cuda_powf(float x, float y) {
    const float r = (float)std::pow((double)x, (double)y);
    if (y == 0.0f || r == 0.0f || !std::isfinite(r)) return r;
    return std::nextafter(std::nextafter(r, INFINITY), INFINITY);
}
#define powf emu_cuda_powf

struct float4 {
    float x, y, z, w;
};
struct uint2 {
    unsigned int x, y;
};
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
inline float2 make_float2(float a, float b) { return float2{a, b}; }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }

struct EmuBlock {
    std::unique_ptr<std::barrier<>> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<double> lanes;  // one slot per thread for shuffles
};
inline EmuBlock* emu_block = nullptr;

inline void __syncthreads() { emu_block->block->arrive_and_wait(); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int o) {
    const unsigned t = threadIdx.x, w = t / 32, lane = t % 32;
    emu_block->lanes[t] = (double)v;
    emu_block->warps[w]->arrive_and_wait();
    T r = (T)emu_block->lanes[w * 32 + (lane ^ (unsigned)o)];
    emu_block->warps[w]->arrive_and_wait();
    return r;
}

// Run `k(args...)` over the grid, block by block, one std::thread per CUDA thread.
template <typename F>
void emu_launch(dim3u grid, unsigned threads, F k) {
    gridDim = grid;
    blockDim = dim3u{threads, 1, 1};
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                EmuBlock b;
                b.block = std::make_unique<std::barrier<>>(threads);
                for (unsigned w = 0; w < (threads + 31) / 32; w++)
                    b.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - w * 32)));
                b.lanes.assign(threads, 0.0);
                emu_block = &b;
                std::vector<std::thread> ts;
                ts.reserve(threads);
                for (unsigned t = 0; t < threads; t++)
                    ts.emplace_back([&, t] {
                        threadIdx = dim3u{t, 0, 0};
                        blockIdx = dim3u{bx, by, bz};
                        k();
                        b.warps[t / 32]->arrive_and_drop();
                        b.block->arrive_and_drop();
                    });
                for (auto& th : ts) th.join();
                emu_block = nullptr;
            }
}
