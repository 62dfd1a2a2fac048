// Causal flash-style attention with grouped-query heads and rotary embedding applied on load,
// forward and backward, head dims 64 and 128. CPU reference: crate::ops::attention_forward /
// attention_backward after crate::ops::rope_forward (rope.cu holds the standalone rotation).
//
// Attention never holds a T×T matrix: each block walks key tiles with an online softmax (forward) and
// recomputes the probabilities from the saved log-sum-exp (backward). With an `inv_freq` table (d/2
// floats, `theta^(−2i/d)` computed on the host) RoPE is applied
// on the fly to q and k as they are loaded (positions pos_offset + t), and the backward returns the
// gradients with respect to the un-rotated q and k (the transpose rotation applied on the way out),
// so the model needs no separate rope pass; `inv_freq = nullptr` gives plain attention (the trait's op).
//
// v1 layout (correct and tiled, fp32 FMA, no tensor cores): 128 threads = 32 rows × 4 threads; each
// thread owns the float4 chunks sub, sub + 4, ... of its row (conflict-free shared-memory reads: the
// four threads of a row read 64 consecutive bytes, the eight rows of a warp the same tile row).
// Dot products reduce across the 4 threads of a row with two shuffles. Tiles: 32 queries × 32 keys.
// The backward is two kernels (dk/dv per key tile, then dq per query tile) so no atomics are needed
// and the result is deterministic.
#include "common.cuh"

#define ATT_ROWS 32
#define ATT_THREADS 128
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

// ---- helpers over one row slice held by 4 threads ---------------------------------------------------
// NE = D/16 float4 chunks per thread: chunk e of thread `sub` is row chunk e·4 + sub (features
// (e·4 + sub)·4 .. +4). Chunks e < NE/2 are in the first half of the head, and their rotate_half
// partners are chunks e + NE/2 of the same thread.

template <typename T, int D>
__device__ __forceinline__ void load_row(f4 (&r)[D / 16], const T* p, int sub) {
#pragma unroll
    for (int e = 0; e < D / 16; e++) r[e] = ld4(p, (e * 4 + sub) * 4);
}
template <int D>
__device__ __forceinline__ void zero_row(f4 (&r)[D / 16]) {
#pragma unroll
    for (int e = 0; e < D / 16; e++) r[e] = {0.0f, 0.0f, 0.0f, 0.0f};
}

__device__ __forceinline__ void rot_pair(float& a, float& b, float c, float s) {
    const float x1 = a, x2 = b;
    a = x1 * c - x2 * s;
    b = x2 * c + x1 * s;
}
// Rotate a register row slice by +angle (sign = 1) or −angle (sign = −1) at position pos.
template <int D>
__device__ __forceinline__ void rope_row(f4 (&r)[D / 16], int sub, int pos, const float* inv_freq, float sign) {
    constexpr int NE = D / 16;
#pragma unroll
    for (int e = 0; e < NE / 2; e++) {
        const int f = (e * 4 + sub) * 4;
        float c, s;
        rope_cs(pos, f + 0, inv_freq, c, s);
        rot_pair(r[e].x, r[e + NE / 2].x, c, sign * s);
        rope_cs(pos, f + 1, inv_freq, c, s);
        rot_pair(r[e].y, r[e + NE / 2].y, c, sign * s);
        rope_cs(pos, f + 2, inv_freq, c, s);
        rot_pair(r[e].z, r[e + NE / 2].z, c, sign * s);
        rope_cs(pos, f + 3, inv_freq, c, s);
        rot_pair(r[e].w, r[e + NE / 2].w, c, sign * s);
    }
}

// Dot product of a register slice with a shared-memory row (float, D wide), summed over the 4
// threads of the row.
template <int D>
__device__ __forceinline__ float dot_row(const f4 (&r)[D / 16], const float* srow, int sub) {
    float acc = 0.0f;
#pragma unroll
    for (int e = 0; e < D / 16; e++) {
        const float4 k = *reinterpret_cast<const float4*>(srow + (e * 4 + sub) * 4);
        acc += r[e].x * k.x + r[e].y * k.y + r[e].z * k.z + r[e].w * k.w;
    }
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    acc += __shfl_xor_sync(0xffffffffu, acc, 2);
    return acc;
}
// r += a · srow (slice).
template <int D>
__device__ __forceinline__ void axpy_row(f4 (&r)[D / 16], float a, const float* srow, int sub) {
#pragma unroll
    for (int e = 0; e < D / 16; e++) {
        const float4 k = *reinterpret_cast<const float4*>(srow + (e * 4 + sub) * 4);
        r[e].x += a * k.x;
        r[e].y += a * k.y;
        r[e].z += a * k.z;
        r[e].w += a * k.w;
    }
}

// Load `ATT_ROWS` rows (global rows row0.., stride `ld_row` elements between consecutive rows of
// the tile) into shared memory as float, rotating by +angle when inv_freq is given; rows ≥ t are zeroed.
template <typename T, int D>
__device__ __forceinline__ void load_tile(float* s, const T* g, long long ld_row, int row0, int t, const float* inv_freq,
                                          int pos_offset) {
    constexpr int NC = D / 4;  // float4 chunks per row
    if (inv_freq != nullptr) {
        for (int w = threadIdx.x; w < ATT_ROWS * NC / 2; w += ATT_THREADS) {
            const int r = w / (NC / 2), c = w % (NC / 2);
            f4 a = {0.0f, 0.0f, 0.0f, 0.0f}, b = a;
            if (row0 + r < t) {
                const T* p = g + (long long)(row0 + r) * ld_row;
                a = ld4(p, c * 4);
                b = ld4(p, c * 4 + D / 2);
                const int pos = pos_offset + row0 + r;
                float cs, sn;
                rope_cs(pos, c * 4 + 0, inv_freq, cs, sn);
                rot_pair(a.x, b.x, cs, sn);
                rope_cs(pos, c * 4 + 1, inv_freq, cs, sn);
                rot_pair(a.y, b.y, cs, sn);
                rope_cs(pos, c * 4 + 2, inv_freq, cs, sn);
                rot_pair(a.z, b.z, cs, sn);
                rope_cs(pos, c * 4 + 3, inv_freq, cs, sn);
                rot_pair(a.w, b.w, cs, sn);
            }
            *reinterpret_cast<float4*>(s + r * D + c * 4) = make_float4(a.x, a.y, a.z, a.w);
            *reinterpret_cast<float4*>(s + r * D + c * 4 + D / 2) = make_float4(b.x, b.y, b.z, b.w);
        }
    } else {
        for (int w = threadIdx.x; w < ATT_ROWS * NC; w += ATT_THREADS) {
            const int r = w / NC, c = w % NC;
            f4 a = {0.0f, 0.0f, 0.0f, 0.0f};
            if (row0 + r < t) a = ld4(g + (long long)(row0 + r) * ld_row, c * 4);
            *reinterpret_cast<float4*>(s + r * D + c * 4) = make_float4(a.x, a.y, a.z, a.w);
        }
    }
}

// ---- forward --------------------------------------------------------------------------------------
// out[b,t,h,d] =, lse[b,h,t] = (natural log of Σ_j exp(scale·q·k_j)). Grid (ceil(t/32), b·h).
template <typename T, int D>
__device__ void attention_forward_v1(T* __restrict__ out, float* __restrict__ lse, const T* __restrict__ q,
                                     const T* __restrict__ k, const T* __restrict__ v, int b, int t, int h,
                                     int hkv, const float* inv_freq, int pos_offset) {
    __shared__ __align__(16) float Ks[ATT_ROWS * D];
    __shared__ __align__(16) float Vs[ATT_ROWS * D];
    // The frequency table in shared memory: the K tiles of the main loop read it from there, so no
    // global pointer stays live across the loop (it cost 3 spilled registers on sm_80).
    __shared__ float invf[D / 2];
    const bool rope = inv_freq != nullptr;
    if (rope) {
        for (int i = threadIdx.x; i < D / 2; i += ATT_THREADS) invf[i] = inv_freq[i];
        __syncthreads();
    }
    constexpr int NE = D / 16;
    const int q0 = blockIdx.x * ATT_ROWS;
    const int bi = blockIdx.y / h, hi = blockIdx.y % h, kvh = hi / (h / hkv);
    const int row = threadIdx.x / 4, sub = threadIdx.x % 4;
    const int qi = q0 + row;
    const float scale2 = rsqrtf((float)D) * LOG2E;  // scores in log2 units

    f4 qr[NE], acc[NE];
    zero_row<D>(acc);
    if (qi < t) {
        load_row<T, D>(qr, q + (((long long)bi * t + qi) * h + hi) * D, sub);
        if (rope) rope_row<D>(qr, sub, pos_offset + qi, invf, 1.0f);
    } else {
        zero_row<D>(qr);
    }
#pragma unroll
    for (int e = 0; e < NE; e++) {
        qr[e].x *= scale2;
        qr[e].y *= scale2;
        qr[e].z *= scale2;
        qr[e].w *= scale2;
    }
    float m = -ZH_INF, l = 0.0f;
    const long long kv_ld = (long long)hkv * D;
    const T* kbase = k + ((long long)bi * t * hkv + kvh) * D;
    const T* vbase = v + ((long long)bi * t * hkv + kvh) * D;
    const int kend = min(t, q0 + ATT_ROWS);
    for (int k0 = 0; k0 < kend; k0 += ATT_ROWS) {
        __syncthreads();
        if (rope) {
            load_tile<T, D>(Ks, kbase, kv_ld, k0, t, invf, pos_offset);
        } else {
            load_tile<T, D>(Ks, kbase, kv_ld, k0, t, nullptr, 0);
        }
        load_tile<T, D>(Vs, vbase, kv_ld, k0, t, nullptr, 0);
        __syncthreads();
        float s[ATT_ROWS];
        float mt = -ZH_INF;
#pragma unroll
        for (int j = 0; j < ATT_ROWS; j++) {
            s[j] = dot_row<D>(qr, Ks + j * D, sub);
            if (k0 + j > qi || k0 + j >= t) s[j] = -ZH_INF;
            mt = fmaxf(mt, s[j]);
        }
        const float mn = fmaxf(m, mt);
        const float corr = exp2f(m - mn);  // m = −inf on the first tile: exp2f(−inf) = 0
        l *= corr;
#pragma unroll
        for (int e = 0; e < NE; e++) {
            acc[e].x *= corr;
            acc[e].y *= corr;
            acc[e].z *= corr;
            acc[e].w *= corr;
        }
#pragma unroll
        for (int j = 0; j < ATT_ROWS; j++) {
            const float p = exp2f(s[j] - mn);
            l += p;
            axpy_row<D>(acc, p, Vs + j * D, sub);
        }
        m = mn;
    }
    if (qi < t) {
        const float inv = 1.0f / l;
        T* o = out + (((long long)bi * t + qi) * h + hi) * D;
#pragma unroll
        for (int e = 0; e < NE; e++) {
            f4 r = {acc[e].x * inv, acc[e].y * inv, acc[e].z * inv, acc[e].w * inv};
            st4(o, (e * 4 + sub) * 4, r);
        }
        if (sub == 0) lse[((long long)bi * h + hi) * t + qi] = (m + log2f(l)) * LN2;
    }
}

// ---- backward ----------------------------------------------------------------------------------------
// delta[b,h,t] = Σ_d dout·out (the softmax-backward row term). One warp per (b, t, h) row.
template <typename T>
__device__ void attention_backward_delta_v1(float* __restrict__ delta, const T* __restrict__ dout,
                                            const T* __restrict__ out, int b, int t, int h, int d) {
    const long long rowid = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (rowid >= (long long)b * t * h) return;
    const long long base = rowid * d;
    float s = 0.0f;
    for (int i = lane; i < d; i += 32) s += ld(dout, base + i) * ld(out, base + i);
    s = warp_sum(s);
    const int hi = (int)(rowid % h);
    const long long bt = rowid / h;
    const int ti = (int)(bt % t), bi = (int)(bt / t);
    if (lane == 0) delta[((long long)bi * h + hi) * t + ti] = s;
}

// dk =, dv = for one tile of 32 keys of kv head kvh, summed over the query heads of its group and over
// the query tiles that can see these keys. Grid (ceil(t/32), b·hkv). Shared: the group's q (rotated)
// and dout tiles.
template <typename T, int D>
__device__ void attention_backward_dkdv_v1(T* __restrict__ dk, T* __restrict__ dv, const T* __restrict__ dout,
                                           const T* __restrict__ q, const T* __restrict__ k,
                                           const T* __restrict__ v, const float* __restrict__ lse,
                                           const float* __restrict__ delta, int b, int t, int h, int hkv,
                                           const float* inv_freq, int pos_offset) {
    __shared__ __align__(16) float Qs[ATT_ROWS * D];
    __shared__ __align__(16) float Gs[ATT_ROWS * D];
    __shared__ float Ls[ATT_ROWS], Ds[ATT_ROWS];
    constexpr int NE = D / 16;
    const int k0 = blockIdx.x * ATT_ROWS;
    const int bi = blockIdx.y / hkv, kvh = blockIdx.y % hkv, group = h / hkv;
    const int row = threadIdx.x / 4, sub = threadIdx.x % 4;
    const int kj = k0 + row;
    const float scale = rsqrtf((float)D);

    f4 kr[NE], vr[NE], dkr[NE], dvr[NE];
    zero_row<D>(dkr);
    zero_row<D>(dvr);
    if (kj < t) {
        const long long off = (((long long)bi * t + kj) * hkv + kvh) * D;
        load_row<T, D>(kr, k + off, sub);
        load_row<T, D>(vr, v + off, sub);
        if (inv_freq != nullptr) rope_row<D>(kr, sub, pos_offset + kj, inv_freq, 1.0f);
    } else {
        zero_row<D>(kr);
        zero_row<D>(vr);
    }
    const long long q_ld = (long long)h * D;
    for (int hg = 0; hg < group; hg++) {
        const int hi = kvh * group + hg;
        const T* qbase = q + ((long long)bi * t * h + hi) * D;
        const T* gbase = dout + ((long long)bi * t * h + hi) * D;
        const float* lrow = lse + ((long long)bi * h + hi) * t;
        const float* drow = delta + ((long long)bi * h + hi) * t;
        for (int q0 = (k0 / ATT_ROWS) * ATT_ROWS; q0 < t; q0 += ATT_ROWS) {
            __syncthreads();
            load_tile<T, D>(Qs, qbase, q_ld, q0, t, inv_freq, pos_offset);
            load_tile<T, D>(Gs, gbase, q_ld, q0, t, nullptr, 0);
            if (threadIdx.x < ATT_ROWS) {
                const int qi = q0 + threadIdx.x;
                Ls[threadIdx.x] = qi < t ? lrow[qi] : 0.0f;
                Ds[threadIdx.x] = qi < t ? drow[qi] : 0.0f;
            }
            __syncthreads();
            for (int i = 0; i < ATT_ROWS; i++) {
                const int qi = q0 + i;
                const float sc = dot_row<D>(kr, Qs + i * D, sub) * scale;
                const float dp = dot_row<D>(vr, Gs + i * D, sub);
                const bool live = qi < t && kj < t && kj <= qi;
                const float p = live ? expf(sc - Ls[i]) : 0.0f;
                const float ds = p * (dp - Ds[i]);
                axpy_row<D>(dvr, p, Gs + i * D, sub);
                axpy_row<D>(dkr, ds * scale, Qs + i * D, sub);
            }
        }
    }
    if (kj < t) {
        if (inv_freq != nullptr) rope_row<D>(dkr, sub, pos_offset + kj, inv_freq, -1.0f);
        const long long off = (((long long)bi * t + kj) * hkv + kvh) * D;
#pragma unroll
        for (int e = 0; e < NE; e++) {
            st4(dk + off, (e * 4 + sub) * 4, dkr[e]);
            st4(dv + off, (e * 4 + sub) * 4, dvr[e]);
        }
    }
}

// dq = for one tile of 32 queries of head hi. Grid (ceil(t/32), b·h).
template <typename T, int D>
__device__ void attention_backward_dq_v1(T* __restrict__ dq, const T* __restrict__ dout, const T* __restrict__ q,
                                         const T* __restrict__ k, const T* __restrict__ v,
                                         const float* __restrict__ lse, const float* __restrict__ delta, int b,
                                         int t, int h, int hkv, const float* inv_freq, int pos_offset) {
    __shared__ __align__(16) float Ks[ATT_ROWS * D];
    __shared__ __align__(16) float Vs[ATT_ROWS * D];
    constexpr int NE = D / 16;
    const int q0 = blockIdx.x * ATT_ROWS;
    const int bi = blockIdx.y / h, hi = blockIdx.y % h, kvh = hi / (h / hkv);
    const int row = threadIdx.x / 4, sub = threadIdx.x % 4;
    const int qi = q0 + row;
    const float scale = rsqrtf((float)D);

    f4 qr[NE], gr[NE], dqr[NE];
    zero_row<D>(dqr);
    float lrow = 0.0f, drow = 0.0f;
    if (qi < t) {
        const long long off = (((long long)bi * t + qi) * h + hi) * D;
        load_row<T, D>(qr, q + off, sub);
        load_row<T, D>(gr, dout + off, sub);
        if (inv_freq != nullptr) rope_row<D>(qr, sub, pos_offset + qi, inv_freq, 1.0f);
        lrow = lse[((long long)bi * h + hi) * t + qi];
        drow = delta[((long long)bi * h + hi) * t + qi];
    } else {
        zero_row<D>(qr);
        zero_row<D>(gr);
    }
    const long long kv_ld = (long long)hkv * D;
    const T* kbase = k + ((long long)bi * t * hkv + kvh) * D;
    const T* vbase = v + ((long long)bi * t * hkv + kvh) * D;
    const int kend = min(t, q0 + ATT_ROWS);
    for (int k0 = 0; k0 < kend; k0 += ATT_ROWS) {
        __syncthreads();
        load_tile<T, D>(Ks, kbase, kv_ld, k0, t, inv_freq, pos_offset);
        load_tile<T, D>(Vs, vbase, kv_ld, k0, t, nullptr, 0);
        __syncthreads();
        for (int j = 0; j < ATT_ROWS; j++) {
            const int kj = k0 + j;
            const float sc = dot_row<D>(qr, Ks + j * D, sub) * scale;
            const float dp = dot_row<D>(gr, Vs + j * D, sub);
            const bool live = qi < t && kj < t && kj <= qi;
            const float p = live ? expf(sc - lrow) : 0.0f;
            axpy_row<D>(dqr, p * (dp - drow) * scale, Ks + j * D, sub);
        }
    }
    if (qi < t) {
        if (inv_freq != nullptr) rope_row<D>(dqr, sub, pos_offset + qi, inv_freq, -1.0f);
        const long long off = (((long long)bi * t + qi) * h + hi) * D;
#pragma unroll
        for (int e = 0; e < NE; e++) st4(dq + off, (e * 4 + sub) * 4, dqr[e]);
    }
}

#define ATT_INSTANCES(T, SUF, D)                                                                           \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_forward_v1_d##D##_##SUF(           \
        T* out, float* lse, const T* q, const T* k, const T* v, int b, int t, int h, int hkv, const float* inv_freq,   \
        int pos_offset) {                                                                                  \
        attention_forward_v1<T, D>(out, lse, q, k, v, b, t, h, hkv, inv_freq, pos_offset);                    \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_backward_dkdv_v1_d##D##_##SUF(      \
        T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v, const float* lse,                  \
        const float* delta, int b, int t, int h, int hkv, const float* inv_freq, int pos_offset) {                   \
        attention_backward_dkdv_v1<T, D>(dk, dv, dout, q, k, v, lse, delta, b, t, h, hkv, inv_freq, pos_offset); \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_backward_dq_v1_d##D##_##SUF(        \
        T* dq, const T* dout, const T* q, const T* k, const T* v, const float* lse, const float* delta,     \
        int b, int t, int h, int hkv, const float* inv_freq, int pos_offset) {                                       \
        attention_backward_dq_v1<T, D>(dq, dout, q, k, v, lse, delta, b, t, h, hkv, inv_freq, pos_offset);    \
    }
ATT_INSTANCES(bf16, bf16, 64)
ATT_INSTANCES(bf16, bf16, 128)
ATT_INSTANCES(f16, f16, 64)
ATT_INSTANCES(f16, f16, 128)
ATT_INSTANCES(float, f32, 64)
ATT_INSTANCES(float, f32, 128)

#define ATT_DELTA_INSTANCE(T, SUF)                                                                        \
    extern "C" __global__ void attention_backward_delta_v1_##SUF(float* delta, const T* dout, const T* out,  \
                                                                 int b, int t, int h, int d) {             \
        attention_backward_delta_v1(delta, dout, out, b, t, h, d);                                        \
    }
ATT_DELTA_INSTANCE(bf16, bf16)
ATT_DELTA_INSTANCE(f16, f16)
ATT_DELTA_INSTANCE(float, f32)
