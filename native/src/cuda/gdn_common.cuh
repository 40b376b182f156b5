// Arithmetic the Gated DeltaNet's kernels share (gdn_split_gates, causal_conv1d_silu and the decode
// launch that fuses them, gdn_split_conv): one copy, so the fused kernel computes every value exactly
// as the kernels it replaces.
#pragma once

#include <cuda_runtime.h>

#include "cuda/next_ops.h"

namespace q3n::cuda {

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
