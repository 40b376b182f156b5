// The output gate of Qwen3-Next's attention (spec 3.3 step 5) fused with the FP8 quantisation of
// o_proj's input, like silu_mul_quantize: one warp per (token, 128-channel group) gates the values
// with cpu::sigmoid_gate_mul's expression and quantises them with quantize_fp8's rule, so the gated
// activation is written once.
#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/next_ops.h"

namespace q3n::cuda {
namespace {

__global__ void sigmoid_gate_quantize_kernel(float* o, const float* gate, int gate_stride, int tokens, int heads, int d,
                                             float* q, float* scales) {
    pdl_wait();
    pdl_launch_dependents();
    const int n = heads * d, groups = (n + 127) / 128;
    const int item = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (item >= tokens * groups) return;
    const int t = item / groups, g = item % groups, lane = threadIdx.x & 31;
    float* row = o + static_cast<size_t>(t) * n;
    const float* gr = gate + static_cast<size_t>(t) * gate_stride;
    float v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int i = g * 128 + j * 32 + lane;
        if (i < n) {
            const float gv = gr[(i / d) * 2 * d + i % d];
            v[j] = row[i] * (1.0f / (1.0f + expf(-gv)));
            row[i] = v[j];
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
        if (i < n) q[static_cast<size_t>(t) * n + i] = v[j];
    }
}

}  // namespace

void sigmoid_gate_quantize(float* o, const float* gate, int gate_stride, int tokens, int heads, int head_dim, float* q,
                           float* scales, cudaStream_t stream) {
    const int items = tokens * ((heads * head_dim + 127) / 128);
    if (items == 0) return;
    Q3N_CUDA(launch_pdl(sigmoid_gate_quantize_kernel, dim3((items + 7) / 8), dim3(256), 0, stream, o, gate, gate_stride,
                        tokens, heads, head_dim, q, scales));
}

}  // namespace q3n::cuda
