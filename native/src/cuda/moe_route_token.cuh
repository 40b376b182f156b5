// One token's routing by one warp (cpu::moe_route's rule), shared by moe_route.cu and the fused decode
// MoE (moe_fp8_decode_fused.cu), so that both give the same experts and the same weight bits.
#pragma once

#include <cfloat>
#include <cstdint>

#include "cuda/common.cuh"

namespace q3n::cuda::moe {

// A probability as an integer with the same order (NaN below every number, as cpu::moe_route ranks
// it); 0 is below all of them and stands for "no candidate". Probabilities are never -0.
__device__ __forceinline__ uint32_t order_key(float p) {
    const uint32_t u = __float_as_uint(isnan(p) ? -INFINITY : p);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The lane's best remaining expert: largest key, then lowest index (i ascending is index ascending),
// as a tree so that the chain is log2(kPer) deep. Picked entries have key 0.
template <int kPer>
__device__ __forceinline__ void lane_best(const uint32_t (&keys)[kPer], const float (&p)[kPer], uint32_t& key, int& at,
                                          float& val) {
    uint32_t k[kPer];
    int i_[kPer];
    float v[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
        k[i] = keys[i];
        i_[i] = i;
        v[i] = p[i];
    }
#pragma unroll
    for (int s = 1; s < kPer; s <<= 1)
#pragma unroll
        for (int i = 0; i + s < kPer; i += 2 * s)
            if (k[i + s] > k[i]) {
                k[i] = k[i + s];
                i_[i] = i_[i + s];
                v[i] = v[i + s];
            }
    key = k[0];
    at = i_[0];
    val = v[0];
}

// cpu::moe_route for one token by one warp; E <= 32 * kPer. Each pick is the largest of the lanes'
// best keys (redux.sync), ties to the lowest expert index (a second redux over the tied lanes), so
// only the winning lane's candidate changes between picks. Lane j keeps pick j (j < 64) and writes
// it, renormalised in pick order like the CPU; `copy` (when set) gets the expert ids too. The logits
// are read through L2 (ld.cg): the fused decode MoE reads them before its pdl_wait(), when this SM's L1
// may still hold the previous layer's logits at the same addresses.
template <int kPer>
__device__ void route_token(const float* l, int E, int top_k, bool renormalize, int32_t* et, float* wt, int32_t* copy) {
    const int lane = threadIdx.x & 31;
    float p[kPer];
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
        const int e = i * 32 + lane;
        p[i] = e < E ? __ldcg(l + e) : -INFINITY;
        m = fmaxf(m, p[i]);
    }
    m = warp_max(m);
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
        p[i] = i * 32 + lane < E ? expf(p[i] - m) : 0.0f;
        sum += p[i];
    }
    sum = warp_sum(sum);
    uint32_t keys[kPer];  // 0 once picked, or past E
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
        p[i] /= sum;
        keys[i] = i * 32 + lane < E ? order_key(p[i]) : 0u;
    }
    float total = 0.0f;  // the same on every lane, summed in pick order
    int e0 = 0, e1 = 0;
    float w0 = 0.0f, w1 = 0.0f;
    for (int j = 0; j < top_k; ++j) {
        uint32_t key;
        int at;
        float val;
        lane_best(keys, p, key, at, val);
        const uint32_t top = __reduce_max_sync(0xffffffffu, key);
        const int win = static_cast<int>(__reduce_min_sync(0xffffffffu, key == top ? static_cast<uint32_t>(at * 32 + lane) : 0xffffffffu));
        const float w = __shfl_sync(0xffffffffu, val, win & 31);  // top_k <= E: a pick always exists
#pragma unroll
        for (int i = 0; i < kPer; ++i)
            if (lane == (win & 31) && i == at) keys[i] = 0u;
        total += w;
        if (j == lane) {
            e0 = win;
            w0 = w;
        } else if (j == lane + 32) {
            e1 = win;
            w1 = w;
        } else if (j >= 64 && lane == 0) {
            et[j] = win;
            wt[j] = w;
            if (copy) copy[j] = win;
        }
    }
    auto put = [&](int j, int e, float w) {
        if (j >= top_k) return;
        et[j] = e;
        wt[j] = renormalize ? w / total : w;
        if (copy) copy[j] = e;
    };
    put(lane, e0, w0);
    put(lane + 32, e1, w1);
    if (renormalize && lane == 0)
        for (int j = 64; j < top_k; ++j) wt[j] /= total;
}

}  // namespace q3n::cuda::moe
