// Arithmetic the Gated DeltaNet's kernels share (gdn_split_gates, causal_conv1d_silu, the recurrent
// decode kernel, the gated output norm, and the decode launches that fuse them: gdn_split_conv and
// gdn_decode_fused): one copy, so a fused kernel computes every value exactly as the kernels it
// replaces.
#pragma once

#include <cuda_runtime.h>

#include "cuda/common.cuh"
#include "cuda/next_ops.h"

namespace q3n::cuda {

// cpu::gdn_gates for one value head: beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias),
// softplus(x) = x above 20.
__device__ __forceinline__ void gdn_gate_values(float b, float a, float A_log_h, float dt_bias_h, float& beta, float& g) {
    beta = 1.0f / (1.0f + expf(-b));
    const float x = a + dt_bias_h;
    const float sp = x > 20.0f ? x : log1pf(expf(x));
    g = -expf(A_log_h) * sp;
}

// Value head h's b and a in a token's in_proj_ba row (per key head group: r b's, then r a's).
__device__ __forceinline__ int gdn_b_source(int h, const GdnShape& sh) {
    const int r = sh.nv / sh.nk;
    return (h / r) * 2 * r + h % r;
}
__device__ __forceinline__ int gdn_a_source(int h, const GdnShape& sh) { return gdn_b_source(h, sh) + sh.nv / sh.nk; }

// The gates of value heads h = first, first + stride, ... of one token, from its in_proj_ba row.
__device__ __forceinline__ void gdn_token_gates(const float* ba_row, const GdnShape& sh, const float* A_log,
                                                const float* dt_bias, float* beta, float* g, int first, int stride) {
    for (int h = first; h < sh.nv; h += stride)
        gdn_gate_values(ba_row[gdn_b_source(h, sh)], ba_row[gdn_a_source(h, sh)], A_log[h], dt_bias[h], beta[h], g[h]);
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

// Where conv channel c (q | k | v head-major) lies in a token's in_proj_qkvz row, whose key head
// groups each hold q (dk), k (dk), then r value heads' v (r dv) and z (r dv).
__device__ __forceinline__ int gdn_conv_source(int c, const GdnShape& sh) {
    const int r = sh.nv / sh.nk, rdv = r * sh.dv, gw = 2 * sh.dk + 2 * rdv, key_dim = sh.nk * sh.dk;
    if (c < key_dim) return (c / sh.dk) * gw + c % sh.dk;
    if (c < 2 * key_dim) return ((c - key_dim) / sh.dk) * gw + sh.dk + (c - key_dim) % sh.dk;
    const int v = c - 2 * key_dim;
    return (v / rdv) * gw + 2 * sh.dk + v % rdv;
}

// Where value head h's z starts in a token's in_proj_qkvz row (its dv values are contiguous there).
__device__ __forceinline__ int gdn_z_source(int h, const GdnShape& sh) {
    const int r = sh.nv / sh.nk, rdv = r * sh.dv;
    return (h / r) * (2 * sh.dk + 2 * rdv) + 2 * sh.dk + rdv + (h % r) * sh.dv;
}

// The recurrent decode kernels' block: lane = one of 32 state columns, warp = one of 8 row groups
// (rows rg, rg + 8, ...).
constexpr int kGdnCols = 32;
constexpr int kGdnRowGroups = 8;

// q (scaled) or k of one token into shared memory by one warp, L2-normalised first when asked,
// with the same expression as cpu::l2norm_heads (x * (1 / sqrt(sum + eps))).
__device__ __forceinline__ void gdn_load_head(const float* src, int d, bool l2norm, float eps, float post_scale,
                                              float* dst) {
    const int lane = threadIdx.x & 31;
    float ss = 0.0f;
    for (int i = lane; i < d; i += 32) {
        const float v = src[i];
        dst[i] = v;
        ss += v * v;
    }
    const float inv = l2norm ? 1.0f / sqrtf(warp_sum(ss) + eps) : 1.0f;
    for (int i = lane; i < d; i += 32) {
        const float v = l2norm ? dst[i] * inv : dst[i];
        dst[i] = post_scale == 1.0f ? v : post_scale * v;
    }
}

// The thread's R state rows (rg, rg + 8, ...) of column col of one value head's [dk, dv] state S,
// zero where !ok or past dk; and their store back. Register arrays are indexed only by unrolled
// loop counters so they stay in registers.
template <int R>
__device__ __forceinline__ void gdn_load_state_rows(float (&r)[R], const float* S, int dk, int dv, int col, bool ok) {
    const int rg = threadIdx.x >> 5;
#pragma unroll
    for (int m = 0; m < R; ++m) {
        const int i = rg + m * kGdnRowGroups;
        r[m] = ok && i < dk ? S[static_cast<size_t>(i) * dv + col] : 0.0f;
    }
}
template <int R>
__device__ __forceinline__ void gdn_store_state_rows(const float (&r)[R], float* S, int dk, int dv, int col, bool ok) {
    const int rg = threadIdx.x >> 5;
#pragma unroll
    for (int m = 0; m < R; ++m) {
        const int i = rg + m * kGdnRowGroups;
        if (ok && i < dk) S[static_cast<size_t>(i) * dv + col] = r[m];
    }
}

// One token of the delta rule on the block's 32 columns, with R state rows per thread in r (indexed
// only by unrolled counters, so they stay in registers): S <- decay S; delta = beta (v - S^T k);
// S <- S + k delta^T; returns o = S^T q in warp 0 (the other warps' return value is meaningless).
// sq and sk hold the token's scaled q and k; the two dk-long sums finish through red_u and red_o.
template <int R>
__device__ __forceinline__ float gdn_recurrent_token(float (&r)[R], const float* sq, const float* sk, int dk,
                                                     float decay, float beta, float v,
                                                     float (&red_u)[kGdnRowGroups][kGdnCols],
                                                     float (&red_o)[kGdnRowGroups][kGdnCols]) {
    const int lane = threadIdx.x & 31, rg = threadIdx.x >> 5;
    float u = 0.0f;
#pragma unroll
    for (int m = 0; m < R; ++m) {
        const int i = rg + m * kGdnRowGroups;
        if (i < dk) {
            r[m] *= decay;
            u += sk[i] * r[m];
        }
    }
    red_u[rg][lane] = u;
    __syncthreads();
    u = 0.0f;
#pragma unroll
    for (int g = 0; g < kGdnRowGroups; ++g) u += red_u[g][lane];
    const float delta = beta * (v - u);

    float o = 0.0f;
#pragma unroll
    for (int m = 0; m < R; ++m) {
        const int i = rg + m * kGdnRowGroups;
        if (i < dk) {
            r[m] += sk[i] * delta;
            o += sq[i] * r[m];
        }
    }
    red_o[rg][lane] = o;
    __syncthreads();
    o = 0.0f;
    if (rg == 0)
#pragma unroll
        for (int g = 0; g < kGdnRowGroups; ++g) o += red_o[g][lane];
    return o;
}

// The gated output norm of one head by one warp (cpu::rmsnorm_gated):
//   y = (w * (x / sqrt(mean(x^2) + eps))) * silu(z)
// x, z, w and y hold the head's d values (y may be x). When q is not null (d a multiple of 128, so
// quantize_fp8's groups of 128 lie inside the head), each group is also quantised with its rule into
// q (the head's first value) and scales (the head's first group).
__device__ __forceinline__ void gated_norm_head_warp(const float* x, const float* z, const float* w, int d, float eps,
                                                     float* y, float* q, float* scales) {
    const int lane = threadIdx.x & 31;
    float ss = 0.0f;
    for (int i = lane; i < d; i += 32) ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(warp_sum(ss) / static_cast<float>(d) + eps);
    if (d % 128 != 0) {
        for (int i = lane; i < d; i += 32) {
            const float zi = z[i];
            y[i] = (w[i] * (x[i] * inv)) * (zi / (1.0f + expf(-zi)));
        }
        return;
    }
    for (int g = 0; g < d / 128; ++g) {
        float v[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int i = g * 128 + j * 32 + lane;
            const float zi = z[i];
            v[j] = (w[i] * (x[i] * inv)) * (zi / (1.0f + expf(-zi)));
            y[i] = v[j];  // y may be x: each lane reads and writes only its own i from here on
        }
        if (!q) continue;
        const float s = quantize_group_warp(v);
        if (lane == 0) scales[g] = s;
#pragma unroll
        for (int j = 0; j < 4; ++j) q[g * 128 + j * 32 + lane] = v[j];
    }
}

}  // namespace q3n::cuda
