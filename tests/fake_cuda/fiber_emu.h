// The CUDA execution model on the host for the stand-in driver (tests/fake_cuda/): the same model as
// tests/cuda_emu/emu.h (and its bf16/f16 stand-ins), but every CUDA thread of a block is a fiber
// (ucontext) on one OS thread instead of a std::thread, so that whole training runs are affordable.
// `__syncthreads` and the two warp barriers around a shuffle switch back to a scheduler that releases
// a barrier once every live thread of the block (or warp) has reached it; threads that return drop
// out, as exited threads do on the device. A block whose threads wait at different barriers is a
// divergent barrier: reported, and the process stops. `__shared__` variables are statics (blocks run
// one after another, kernels one at a time); dynamic shared memory (`extern __shared__`, rewritten
// by tools/fake-cuda.sh) is a per-launch buffer of exactly the launch's size.
// Context switches are six saved registers and a stack swap (x86-64 System V; no signal-mask system
// call as in swapcontext), which is what makes a training step affordable; the AddressSanitizer build
// (FAKE_CUDA_UCONTEXT) uses ucontext, which the sanitizer knows.
#pragma once
#include "cuda_fp16.h"  // tests/cuda_emu: also brings cuda_bf16.h
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#include <vector>

struct dim3u {
    unsigned x = 0, y = 0, z = 0;
};
inline thread_local dim3u threadIdx, blockIdx, blockDim, gridDim;
inline thread_local void* emu_dyn_smem_ptr = nullptr;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define __restrict__ __restrict

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
inline int max(int a, int b) { return a > b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

enum EmuState { EMU_READY, EMU_AT_BLOCK, EMU_AT_WARP, EMU_DONE };

#ifndef FAKE_CUDA_UCONTEXT
extern "C" void fk_switch(void** save_sp, void* to_sp);
asm(R"(
    .text
    .globl fk_switch
    .type fk_switch,@function
fk_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size fk_switch,.-fk_switch
)");
#endif

struct EmuFibers {
    unsigned n = 0;
#ifdef FAKE_CUDA_UCONTEXT
    std::vector<ucontext_t> ctx;
    ucontext_t sched;
#else
    std::vector<void*> ctx;  // saved stack pointers
    void* sched = nullptr;
#endif
    std::vector<int> state;
    std::vector<double> lanes;
    std::vector<char*> stacks;
    unsigned cur = 0;
    void (*body)(void*) = nullptr;
    void* arg = nullptr;
    const char* kernel = "";
};
inline thread_local EmuFibers* emu_f = nullptr;

inline void emu_wait(int st) {
    EmuFibers* f = emu_f;
    const unsigned t = f->cur;
    f->state[t] = st;
#ifdef FAKE_CUDA_UCONTEXT
    swapcontext(&f->ctx[t], &f->sched);
#else
    fk_switch(&f->ctx[t], f->sched);
#endif
}
inline void __syncthreads() { emu_wait(EMU_AT_BLOCK); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int o) {
    EmuFibers* f = emu_f;
    const unsigned t = f->cur, w = t / 32, lane = t % 32;
    f->lanes[t] = (double)v;
    emu_wait(EMU_AT_WARP);
    const unsigned src = w * 32 + (lane ^ (unsigned)o);
    T r = (T)emu_f->lanes[src < emu_f->n ? src : t];
    emu_wait(EMU_AT_WARP);
    return r;
}

// Stacks: 256 KiB each with a PROT_NONE page below, so a kernel's stack overflow faults.
constexpr size_t EMU_STACK = 256 * 1024;

inline void emu_trampoline() {
    EmuFibers* f = emu_f;
    f->body(f->arg);
    emu_f->state[emu_f->cur] = EMU_DONE;
#ifndef FAKE_CUDA_UCONTEXT
    void* dead;
    fk_switch(&dead, emu_f->sched);  // never resumed
    __builtin_unreachable();
#endif  // ucontext: returning resumes uc_link (the scheduler)
}

// Run one block: `body(arg)` in every thread of `block` (linear id x-fastest; warps of 32).
inline void emu_run_block(EmuFibers& f, const char* kernel, dim3u block, void (*body)(void*), void* arg) {
    const unsigned n = block.x * block.y * block.z;
    f.n = n;
    f.kernel = kernel;
    f.ctx.resize(n);
    f.state.assign(n, EMU_READY);
    f.lanes.assign(n, 0.0);
    f.body = body;
    f.arg = arg;
    while (f.stacks.size() < n) {
        void* p = mmap(nullptr, EMU_STACK + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            std::fprintf(stderr, "fake-cuda: cannot map a fiber stack\n");
            _exit(97);
        }
        mprotect(p, 4096, PROT_NONE);
        f.stacks.push_back((char*)p + 4096);
    }
    for (unsigned t = 0; t < n; t++) {
#ifdef FAKE_CUDA_UCONTEXT
        getcontext(&f.ctx[t]);
        f.ctx[t].uc_stack.ss_sp = f.stacks[t];
        f.ctx[t].uc_stack.ss_size = EMU_STACK;
        f.ctx[t].uc_link = &f.sched;
        makecontext(&f.ctx[t], emu_trampoline, 0);
#else
        // A fresh stack that "returns" into emu_trampoline: six zeroed callee-saved registers, the
        // entry address, and a null return address so the entry sees a call-aligned stack.
        void** sp = (void**)(f.stacks[t] + EMU_STACK);
        *--sp = nullptr;
        *--sp = (void*)&emu_trampoline;
        for (int r = 0; r < 6; r++) *--sp = nullptr;
        f.ctx[t] = sp;
#endif
    }
    emu_f = &f;
    blockDim = block;
    for (;;) {
        for (unsigned t = 0; t < n; t++) {
            if (f.state[t] != EMU_READY) continue;
            f.cur = t;
            threadIdx = dim3u{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
#ifdef FAKE_CUDA_UCONTEXT
            swapcontext(&f.sched, &f.ctx[t]);
#else
            fk_switch(&f.sched, f.ctx[t]);
#endif
        }
        unsigned live = 0, at_block = 0;
        for (unsigned t = 0; t < n; t++) {
            live += f.state[t] != EMU_DONE;
            at_block += f.state[t] == EMU_AT_BLOCK;
        }
        if (live == 0) break;
        bool released = false;
        if (at_block == live) {
            for (unsigned t = 0; t < n; t++)
                if (f.state[t] == EMU_AT_BLOCK) f.state[t] = EMU_READY;
            released = true;
        } else {
            for (unsigned w = 0; w * 32 < n; w++) {
                unsigned wl = 0, ww = 0;
                for (unsigned t = w * 32; t < std::min(n, w * 32 + 32); t++) {
                    wl += f.state[t] != EMU_DONE;
                    ww += f.state[t] == EMU_AT_WARP;
                }
                if (wl > 0 && ww == wl) {
                    for (unsigned t = w * 32; t < std::min(n, w * 32 + 32); t++) f.state[t] = EMU_READY;
                    released = true;
                }
            }
        }
        if (!released) {
            std::fprintf(stderr,
                         "fake-cuda: FAULT: kernel %s block (%u,%u,%u): divergent barrier (%u live threads, "
                         "%u at __syncthreads, the rest at a warp shuffle)\n",
                         kernel, blockIdx.x, blockIdx.y, blockIdx.z, live, at_block);
            _exit(97);
        }
    }
    emu_f = nullptr;
}

// One kernel launch over the whole grid, block after block.
inline void emu_run_grid(const char* kernel, dim3u grid, dim3u block, void* dyn_smem, void (*body)(void*),
                         void* arg) {
    static thread_local EmuFibers fibers;
    gridDim = grid;
    emu_dyn_smem_ptr = dyn_smem;
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                blockIdx = dim3u{bx, by, bz};
                emu_run_block(fibers, kernel, block, body, arg);
            }
}
