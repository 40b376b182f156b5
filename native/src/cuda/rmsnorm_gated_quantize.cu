// The Gated DeltaNet's output norm (spec 3.4 step 6: plain weight, gate after the norm) fused with
// the FP8 quantisation out_proj may need. One block per token: a warp per head normalises and gates
// with cpu::rmsnorm_gated's expression, then, after a barrier (which also makes the block's global
// writes visible to all its threads), a warp per 128-channel group quantises the token's row with
// quantize_fp8's rule. Groups need not align with heads.
//
// Where they do (head_dim a multiple of 128, as in every Qwen3-Next config), the per-head kernel below
// runs instead: one warp per (token, head) normalises, gates and quantises its head's groups with the
// same expressions in the same order (bit-identical output), and a decode step's token spreads over
// heads / 8 blocks rather than one (11 us in one block at 32 heads x 128 on an H100).
#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/next_ops.h"

namespace q3n::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    rmsnorm_gated_quantize_kernel(const float* x, const float* z, const float* w, int heads, int d, float eps, float* y,
                                  float* q, float* scales) {
    pdl_wait();
    pdl_launch_dependents();
    const int t = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = kThreads / 32;
    const int n = heads * d;
    const size_t base = static_cast<size_t>(t) * n;
    for (int h = warp; h < heads; h += warps) {
        const float* xr = x + base + static_cast<size_t>(h) * d;
        const float* zr = z + base + static_cast<size_t>(h) * d;
        float* yr = y + base + static_cast<size_t>(h) * d;
        float ss = 0.0f;
        for (int i = lane; i < d; i += 32) ss += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(warp_sum(ss) / static_cast<float>(d) + eps);
        for (int i = lane; i < d; i += 32) {
            const float zi = zr[i];
            yr[i] = (w[i] * (xr[i] * inv)) * (zi / (1.0f + expf(-zi)));
        }
    }
    if (!q) return;
    __syncthreads();
    const int groups = (n + 127) / 128;
    for (int g = warp; g < groups; g += warps) {
        float v[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int i = g * 128 + j * 32 + lane;
            v[j] = i < n ? y[base + i] : 0.0f;
        }
        const float s = quantize_group_warp(v);
        if (lane == 0) scales[static_cast<size_t>(t) * groups + g] = s;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int i = g * 128 + j * 32 + lane;
            if (i < n) q[base + i] = v[j];
        }
    }
}

constexpr int kHeadWarps = 8;

__global__ void __launch_bounds__(32 * kHeadWarps)
    rmsnorm_gated_quantize_heads_kernel(const float* x, const float* z, const float* w, int heads, int d, float eps,
                                        float* y, float* q, float* scales) {
    pdl_wait();
    pdl_launch_dependents();
    const int t = blockIdx.x, lane = threadIdx.x & 31, h = blockIdx.y * kHeadWarps + (threadIdx.x >> 5);
    if (h >= heads) return;
    const int n = heads * d;
    const size_t base = static_cast<size_t>(t) * n, head = base + static_cast<size_t>(h) * d;
    const float* xr = x + head;
    const float* zr = z + head;
    float ss = 0.0f;
    for (int i = lane; i < d; i += 32) ss += xr[i] * xr[i];
    const float inv = 1.0f / sqrtf(warp_sum(ss) / static_cast<float>(d) + eps);
    const int groups = n / 128;
    for (int g = h * d / 128; g < (h + 1) * d / 128; ++g) {
        float v[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int i = g * 128 + j * 32 + lane - h * d;  // within the head
            const float zi = zr[i];
            v[j] = (w[i] * (xr[i] * inv)) * (zi / (1.0f + expf(-zi)));
            y[head + i] = v[j];
        }
        if (!q) continue;
        const float s = quantize_group_warp(v);
        if (lane == 0) scales[static_cast<size_t>(t) * groups + g] = s;
#pragma unroll
        for (int j = 0; j < 4; ++j) q[base + g * 128 + j * 32 + lane] = v[j];
    }
}

}  // namespace

void rmsnorm_gated_quantize(const float* x, const float* z, const float* weight, int tokens, int heads, int d, float eps,
                            float* y, float* q, float* scales, cudaStream_t stream) {
    if (tokens == 0) return;
    if (d % 128 == 0) {
        const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>((heads + kHeadWarps - 1) / kHeadWarps));
        Q3N_CUDA(launch_pdl(rmsnorm_gated_quantize_heads_kernel, grid, dim3(32 * kHeadWarps), 0, stream, x, z, weight, heads,
                            d, eps, y, q, scales));
        return;
    }
    Q3N_CUDA(launch_pdl(rmsnorm_gated_quantize_kernel, dim3(tokens), dim3(kThreads), 0, stream, x, z, weight, heads, d, eps,
                        y, q, scales));
}

}  // namespace q3n::cuda
