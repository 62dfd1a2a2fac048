// Host stand-in for <cuda_fp16.h> used by the CPU emulation of the kernels (tests/cuda_emulated.rs):
// just the __half types and conversions common.cuh uses. Conversions go through g++'s IEEE
// binary16 `_Float16`, so rounding (to nearest even), subnormals and overflow to ±inf are those of
// the device's __float2half_rn.
#pragma once
#include <cstdint>
#include <cstring>
#include "cuda_bf16.h"  // float2
struct __half {
    uint16_t x;
};
struct __half2 {
    __half x, y;
};
inline float __half2float(__half h) {
    _Float16 v;
    std::memcpy(&v, &h.x, 2);
    return (float)v;
}
inline __half __float2half_rn(float f) {
    _Float16 v = (_Float16)f;
    __half h;
    std::memcpy(&h.x, &v, 2);
    return h;
}
inline float2 __half22float2(__half2 v) { return float2{__half2float(v.x), __half2float(v.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
