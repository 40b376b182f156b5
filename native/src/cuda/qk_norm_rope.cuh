// The per-head RMSNorm and NeoX rotary of a query or key head, and the cache store of k and v, as
// qk_norm_rope_kv.cu's warp form does them. The decode attention kernel that folds this step into
// its own prologue (attention.cu, attention_decode_qk_norm_rope) calls the same functions, so the
// two paths write the same bits.
#pragma once

#include <cuda_bf16.h>

#include "cuda/common.cuh"
#include "cuda/ops.h"

namespace q3n::cuda {

// Element index of channel 0 of kv head `kvh` at position `pos` of the sequence whose block table
// is `table` (head dim d).
__device__ __forceinline__ size_t cache_slot(const DeviceKvLayer& kv, const int32_t* table, int pos, int kvh, int d) {
    return (static_cast<size_t>(table[pos / kv.block_size]) * kv.block_size + pos % kv.block_size) * kv.kv_heads * d +
           static_cast<size_t>(kvh) * d;
}

// cache_slot of token t's position in its sequence.
__device__ __forceinline__ size_t kv_slot(const DeviceKvLayer& kv, const DeviceBatch& batch, int t, int kvh, int d) {
    return cache_slot(kv, batch.block_tables + static_cast<size_t>(batch.seq_of_token[t]) * batch.max_blocks,
                      batch.positions[t], kvh, d);
}

// A value as the cache holds it.
__device__ __forceinline__ void to_cache(float x, float& out) { out = x; }
__device__ __forceinline__ void to_cache(float x, __nv_bfloat16& out) { out = __float2bfloat16_rn(x); }

// One value into the K (or V) cache at element `slot`, in the cache's dtype.
__device__ __forceinline__ void store_kv(const DeviceKvLayer& kv, bool is_k, size_t slot, float x) {
    void* base = is_k ? kv.k : kv.v;
    if (kv.dtype == KvDtype::F32)
        to_cache(x, static_cast<float*>(base)[slot]);
    else
        to_cache(x, static_cast<__nv_bfloat16*>(base)[slot]);
}

// a[i] for a runtime i < J, in registers: a plain a[i] puts the array in local memory.
template <int J>
__device__ __forceinline__ float pick(const float (&a)[J], int i) {
    float r = 0.0f;
#pragma unroll
    for (int k = 0; k < J; ++k) r = k == i ? a[k] : r;
    return r;
}

// A lane's rotary factors for a head of J * 32 channels: slice j < rot_dim / 64 (slot j * 32 + lane)
// turns by position_of(slot) * inv_freq[slot]; cs and sn hold its cos and sin times `scaling`
// (zero past the rotary). They depend on the position only, not on the head or the step's data,
// so one computation serves every head of a token, and may run before a kernel's PDL wait.
template <int J, typename PositionOf>
__device__ __forceinline__ void rope_factors(float (&cs)[J], float (&sn)[J], const float* inv_freq, int rot_dim,
                                             float scaling, int lane, PositionOf position_of) {
    const int half = rot_dim / 64;
#pragma unroll
    for (int j = 0; j < J; ++j) {
        cs[j] = sn[j] = 0.0f;
        if (j < half) {
            const int slot = j * 32 + lane;
            float s, c;
            sincosf(__fmul_rn(position_of(slot), inv_freq[slot]), &s, &c);
            cs[j] = __fmul_rn(c, scaling);
            sn[j] = __fmul_rn(s, scaling);
        }
    }
}

// One head of J * 32 channels in a warp, lane l holding channels j * 32 + l (so both ends of every
// rotary pair sit in one lane): RMSNorm with the norm weight's lane values w[j] = weight[j * 32 + l],
// then the NeoX rotary over the first rot_dim channels (rot_dim / 2 a multiple of 32) with
// rope_factors' cs and sn. The squares are summed slice by slice, each slice a butterfly, in the
// order of the block form of qk_norm_rope_kv.cu, so every form computes the same norm. Products and
// sums are rounded one by one (no contraction into fma), as the CPU's rope.cpp computes them, so
// that every kernel inlining this computes the same bits whatever the compiler fuses around it.
template <int J>
__device__ __forceinline__ void norm_rope_head_warp(float (&x)[J], const float (&w)[J], float eps, const float (&cs)[J],
                                                    const float (&sn)[J], int rot_dim) {
    constexpr int d = J * 32;
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < J; ++j) ss += warp_sum(__fmul_rn(x[j], x[j]));
    const float inv = 1.0f / sqrtf(ss / static_cast<float>(d) + eps);
    float v[J];
#pragma unroll
    for (int j = 0; j < J; ++j) v[j] = __fmul_rn(w[j], __fmul_rn(x[j], inv));
    const int half = rot_dim / 64;  // in slices of 32 channels
#pragma unroll
    for (int j = 0; j < J; ++j) {
        if (j < half) {
            x[j] = __fsub_rn(__fmul_rn(v[j], cs[j]), __fmul_rn(pick(v, j + half), sn[j]));
        } else if (j < 2 * half) {
            const int p = j - half;  // the pair's first slice, whose angle this one shares
            x[j] = __fadd_rn(__fmul_rn(v[j], pick(cs, p)), __fmul_rn(pick(v, p), pick(sn, p)));
        } else {
            x[j] = v[j];
        }
    }
}

// A lane's values of a per-channel vector, as norm_rope_head_warp takes the norm weight.
template <int J>
__device__ __forceinline__ void lane_values(float (&out)[J], const float* v, int lane) {
#pragma unroll
    for (int j = 0; j < J; ++j) out[j] = v[j * 32 + lane];
}

}  // namespace q3n::cuda
