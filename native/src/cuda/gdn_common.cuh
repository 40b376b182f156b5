// Arithmetic the Gated DeltaNet's kernels share (gdn_split_gates, causal_conv1d_silu and the decode
// launch that fuses them, gdn_split_conv; rmsnorm_gated_quantize and the recurrent decode kernel that
// ends with it): one copy, so a fused kernel computes every value exactly as the kernels it replaces.
#pragma once

#include <cuda_runtime.h>

#include "cuda/common.cuh"
#include "cuda/next_ops.h"

namespace q3n::cuda {

// cpu::rmsnorm_gated on one head of d values (d a multiple of 128, so the head is whole quantisation
// groups) by one warp, written to yr (yr == xr allowed), then each 128-channel group quantised with
// quantize_fp8's rule into qr and sr[group] when qr is not null. x is read through L2: in the
// recurrent kernel it comes from other blocks of the same launch.
__device__ __forceinline__ void gated_norm_head_warp(const float* xr, const float* zr, const float* w, int d, float eps,
                                                     float* yr, float* qr, float* sr) {
    const int lane = threadIdx.x & 31;
    float ss = 0.0f;
    for (int i = lane; i < d; i += 32) {
        const float xi = __ldcg(xr + i);
        ss += xi * xi;
    }
    const float inv = 1.0f / sqrtf(warp_sum(ss) / static_cast<float>(d) + eps);
    for (int g = 0; g < d / 128; ++g) {
        float v[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int i = g * 128 + j * 32 + lane;
            const float zi = zr[i];
            v[j] = (w[i] * (__ldcg(xr + i) * inv)) * (zi / (1.0f + expf(-zi)));
            yr[i] = v[j];
        }
        if (!qr) continue;
        const float s = quantize_group_warp(v);
        if (lane == 0) sr[g] = s;
#pragma unroll
        for (int j = 0; j < 4; ++j) qr[g * 128 + j * 32 + lane] = v[j];
    }
}

// cpu::gdn_gates for the value heads h = first, first + stride, ... of one token, from its
// in_proj_ba row (per key head group: r b's, then r a's): beta[h] = sigmoid(b), g[h] = -exp(A_log[h]) *
// softplus(a + dt_bias[h]), softplus(x) = x above 20.
__device__ __forceinline__ void gdn_token_gates(const float* ba_row, const GdnShape& sh, const float* A_log,
                                                const float* dt_bias, float* beta, float* g, int first, int stride) {
    const int r = sh.nv / sh.nk;
    for (int h = first; h < sh.nv; h += stride) {
        const int grp = h / r, j = h % r;
        const float b = ba_row[grp * 2 * r + j], a = ba_row[grp * 2 * r + r + j];
        beta[h] = 1.0f / (1.0f + expf(-b));
        const float x = a + dt_bias[h];
        const float sp = x > 20.0f ? x : log1pf(expf(x));
        g[h] = -expf(A_log[h]) * sp;
    }
}

// One channel of the causal depthwise conv + SiLU (K taps) with its K - 1 carried inputs, oldest
// first, in registers: step() takes the next input and returns silu of the window's weighted sum,
// summed in cpu::causal_conv1d_silu's order.
template <int K>
struct ConvChannel {
    static constexpr int H = K - 1;
    float w[K];
    float hist[H > 0 ? H : 1];

    __device__ __forceinline__ void load(const float* weight, int c, const float* state) {
#pragma unroll
        for (int j = 0; j < K; ++j) w[j] = weight[static_cast<size_t>(c) * K + j];
#pragma unroll
        for (int j = 0; j < H; ++j) hist[j] = state[j];
    }
    __device__ __forceinline__ float step(float cur) {
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < H; ++j) acc += w[j] * hist[j];
        acc += w[H] * cur;
#pragma unroll
        for (int j = 0; j + 1 < H; ++j) hist[j] = hist[j + 1];
        if (H > 0) hist[H > 0 ? H - 1 : 0] = cur;
        return acc / (1.0f + expf(-acc));
    }
    __device__ __forceinline__ void store(float* state) const {
#pragma unroll
        for (int j = 0; j < H; ++j) state[j] = hist[j];
    }
};

}  // namespace q3n::cuda
