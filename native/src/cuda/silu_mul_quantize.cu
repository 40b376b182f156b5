// SwiGLU's product fused with the FP8 quantisation the down projection needs: one warp per
// (token, 128-channel group) computes silu(gate) * up exactly as silu_mul does and quantises it as
// quantize_fp8 does, so the intermediate activation is written once (or not at all in fp32).
#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/fp8_out.cuh"
#include "cuda/l2_prefetch.cuh"
#include "cuda/ops.h"

namespace q3n::cuda {
namespace {

// A warp takes kGroups consecutive groups of one token and issues all their loads before the first
// value is used: with one group a warp (8 loads in flight a lane) the kernel ran at 61% of its memory
// floor at 8K prompt tokens. Each group's arithmetic is unchanged.
constexpr int kGroups = 4;

__global__ void silu_mul_quantize_kernel(const float* gu, int tokens, int inter, float* out, Fp8Out q, L2Prefetch next) {
    pdl_launch_dependents();
    const unsigned own = gridDim.x - (next.bytes ? kL2PrefetchBlocks : 0);
    if (blockIdx.x >= own) {  // reads no step data: no wait
        l2_prefetch(next, blockIdx.x - own, kL2PrefetchBlocks);
        return;
    }
    pdl_wait();
    const int groups = (inter + 127) / 128, runs = (groups + kGroups - 1) / kGroups;
    const int item = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (item >= tokens * runs) return;
    const int t = item / runs, g0 = item % runs * kGroups, lane = threadIdx.x & 31;
    const float* row = gu + static_cast<size_t>(t) * 2 * inter;
    float gate[kGroups][4], up[kGroups][4];
#pragma unroll
    for (int u = 0; u < kGroups; ++u)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int i = (g0 + u) * 128 + j * 32 + lane;
            const bool in = g0 + u < groups && i < inter;
            gate[u][j] = in ? row[i] : 0.0f;
            up[u][j] = in ? row[inter + i] : 0.0f;
        }
#pragma unroll
    for (int u = 0; u < kGroups; ++u) {
        const int g = g0 + u;
        if (g >= groups) break;
        float v[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int i = g * 128 + j * 32 + lane;
            if (i < inter) {
                v[j] = gate[u][j] / (1.0f + expf(-gate[u][j])) * up[u][j];
                if (out) out[static_cast<size_t>(t) * inter + i] = v[j];
            } else {
                v[j] = 0.0f;
            }
        }
        if (!q.q && !q.q8) continue;
        const float s = quantize_group_warp(v);
        store_fp8_group(q, t, g, groups, inter, lane, v, s);
    }
}

}  // namespace

void silu_mul_quantize(const float* gate_up, int tokens, int inter, float* out, const Fp8Out& q, cudaStream_t stream,
                       const L2Prefetch& next) {
    const int items = tokens * (((inter + 127) / 128 + kGroups - 1) / kGroups);
    if (items == 0) return;
    const unsigned grid = static_cast<unsigned>((items + 7) / 8) + (next.bytes ? kL2PrefetchBlocks : 0);
    Q3N_CUDA(launch_pdl(silu_mul_quantize_kernel, grid, 256, 0, stream, gate_up, tokens, inter, out, q, next));
}

void silu_mul_quantize(const float* gate_up, int tokens, int inter, float* out, float* q, float* scales,
                       cudaStream_t stream) {
    Fp8Out o;
    o.q = q;
    o.scales = scales;
    silu_mul_quantize(gate_up, tokens, inter, out, o, stream);
}

}  // namespace q3n::cuda
