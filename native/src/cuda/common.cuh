// Device helpers shared by the kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace q3n::cuda {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block; every thread gets the result. `scratch` holds one float per warp.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < warps; ++w) total += scratch[w];
    return total;
}

__device__ __forceinline__ float bf16_bits_to_float(uint16_t h) { return __uint_as_float(static_cast<uint32_t>(h) << 16); }

// e4m3fn -> fp32 exactly as the CPU backend does it (magnitude bits at bit 20, times 2^120).
__device__ __forceinline__ float e4m3_to_float(uint32_t v) {
    const float mag = __uint_as_float((v & 0x7fu) << 20) * 1.329227995784916e36f;  // 2^120
    return __uint_as_float(__float_as_uint(mag) | ((v & 0x80u) << 24));
}

// fp32 -> e4m3fn, round to nearest even, saturating: the CPU's float_to_e4m3 for finite input.
__device__ __forceinline__ uint8_t float_to_e4m3(float f) {
    const uint8_t sign = (__float_as_uint(f) >> 24) & 0x80u;
    const float a = fabsf(f);
    if (a >= 448.0f) return sign | 0x7e;
    if (a < 0.015625f) return sign | static_cast<uint8_t>(__float2int_rn(a * 512.0f));  // subnormals
    int e;
    const float frac = frexpf(a, &e);
    int m = __float2int_rn((frac * 2.0f - 1.0f) * 8.0f);
    int exp = e - 1 + 7;
    if (m == 8) {
        m = 0;
        ++exp;
    }
    if (exp > 15 || (exp == 15 && m == 7)) return sign | 0x7e;
    return sign | static_cast<uint8_t>((exp << 3) | m);
}

// One warp quantises one 128-channel group held as v[j] = x[j * 32 + lane] (zero past the row's end):
// returns the group's scale and replaces v by its e4m3 values widened to fp32. The same rule as
// quantize_fp8 (s = max(amax, 1e-10) / 448, a true division, round to nearest even, saturate).
__device__ __forceinline__ float quantize_group_warp(float (&v)[4]) {
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) amax = fmaxf(amax, fabsf(v[j]));
    amax = warp_max(amax);
    const float s = fmaxf(amax, 1e-10f) / 448.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = e4m3_to_float(float_to_e4m3(fminf(fmaxf(__fdiv_rn(v[j], s), -448.0f), 448.0f)));
    return s;
}

}  // namespace q3n::cuda
