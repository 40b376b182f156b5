// SwiGLU's product fused with the FP8 quantisation the down projection needs: one warp per
// (token, 128-channel group) computes silu(gate) * up exactly as silu_mul does and quantises it as
// quantize_fp8 does, so the intermediate activation is written once (or not at all in fp32).
#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/ops.h"

namespace q3n::cuda {
namespace {

__global__ void silu_mul_quantize_kernel(const float* gu, int tokens, int inter, float* out, float* q, float* scales) {
    pdl_launch_dependents();
    pdl_wait();
    const int groups = (inter + 127) / 128;
    const int item = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (item >= tokens * groups) return;
    const int t = item / groups, g = item % groups, lane = threadIdx.x & 31;
    const float* row = gu + static_cast<size_t>(t) * 2 * inter;
    float v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int i = g * 128 + j * 32 + lane;
        if (i < inter) {
            const float gate = row[i], up = row[inter + i];
            v[j] = gate / (1.0f + expf(-gate)) * up;
            if (out) out[static_cast<size_t>(t) * inter + i] = v[j];
        } else {
            v[j] = 0.0f;
        }
    }
    if (!q) return;
    const float s = quantize_group_warp(v);
    if (lane == 0) scales[static_cast<size_t>(t) * groups + g] = s;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int i = g * 128 + j * 32 + lane;
        if (i < inter) q[static_cast<size_t>(t) * inter + i] = v[j];
    }
}

}  // namespace

void silu_mul_quantize(const float* gate_up, int tokens, int inter, float* out, float* q, float* scales,
                       cudaStream_t stream) {
    const int items = tokens * ((inter + 127) / 128);
    if (items == 0) return;
    Q3N_CUDA(launch_pdl(silu_mul_quantize_kernel, (items + 7) / 8, 256, 0, stream, gate_up, tokens, inter, out, q, scales));
}

}  // namespace q3n::cuda
