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
#include "cuda/gdn_common.cuh"
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
        const size_t head = base + static_cast<size_t>(h) * d;
        gated_norm_head_warp(x + head, z + head, w, d, eps, y + head, nullptr, nullptr);
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
    const int t = blockIdx.x, h = blockIdx.y * kHeadWarps + (threadIdx.x >> 5);
    if (h >= heads) return;
    const int n = heads * d;
    const size_t base = static_cast<size_t>(t) * n, head = base + static_cast<size_t>(h) * d;
    const int groups = n / 128;
    gated_norm_head_warp(x + head, z + head, w, d, eps, y + head, q ? q + head : nullptr,
                         q ? scales + static_cast<size_t>(t) * groups + h * d / 128 : nullptr);
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
