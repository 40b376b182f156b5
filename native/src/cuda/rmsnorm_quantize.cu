// RMSNorm fused with what surrounds it in a decoder layer: the residual add before it and the FP8
// quantisation of its output after it, so a layer's normalised activations never round-trip
// through memory between three kernels. The arithmetic is rmsnorm_kernel's (same block size, so
// the same sum order) followed by quantize_fp8's rule: fused and unfused results are bit-equal.
#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/l2_prefetch.cuh"
#include "cuda/fp8_out.cuh"
#include "cuda/ops.h"

namespace q3n::cuda {
namespace {

template <bool kAddResidual>
__global__ void rmsnorm_quantize_kernel(float* x, const float* residual, const float* w, int n, float eps, float* y,
                                        Fp8Out q, L2Prefetch next) {
    __shared__ float scratch[32];
    pdl_launch_dependents();
    const unsigned rows = gridDim.x - (next.bytes ? kL2PrefetchBlocks : 0);
    if (blockIdx.x >= rows) {  // reads no step data: no wait
        l2_prefetch(next, blockIdx.x - rows, kL2PrefetchBlocks);
        return;
    }
    pdl_wait();
    const size_t row = blockIdx.x;
    float* xr = x + row * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = xr[i];
        if (kAddResidual) {
            v += residual[row * n + i];
            xr[i] = v;
        }
        ss += v * v;
    }
    ss = block_sum(ss, scratch);  // its barriers also publish the residual sums written above
    const float inv = 1.0f / sqrtf(ss / static_cast<float>(n) + eps);
    if (y)
        for (int i = threadIdx.x; i < n; i += blockDim.x) y[row * n + i] = w[i] * (xr[i] * inv);
    if (q.q || q.q8) {
        const int groups = (n + 127) / 128, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
        for (int g = threadIdx.x >> 5; g < groups; g += warps) {
            float v[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int i = g * 128 + j * 32 + lane;
                v[j] = i < n ? w[i] * (xr[i] * inv) : 0.0f;
            }
            const float s = quantize_group_warp(v);
            store_fp8_group(q, row, g, groups, n, lane, v, s);
        }
    }
}

int block_for(int n) { return n >= 1024 ? 1024 : ((n + 31) / 32) * 32; }

}  // namespace

void rmsnorm_quantize(float* x, const float* residual, const float* weight, int rows, int n, float eps, float* y,
                      const Fp8Out& q, cudaStream_t stream, const L2Prefetch& next) {
    if (rows == 0) return;
    const unsigned grid = static_cast<unsigned>(rows) + (next.bytes ? kL2PrefetchBlocks : 0);
    if (residual)
        Q3N_CUDA(launch_pdl(rmsnorm_quantize_kernel<true>, grid, block_for(n), 0, stream, x, residual, weight, n, eps, y, q,
                            next));
    else
        Q3N_CUDA(launch_pdl(rmsnorm_quantize_kernel<false>, grid, block_for(n), 0, stream, x, nullptr, weight, n, eps, y, q,
                            next));
}

void rmsnorm_quantize(float* x, const float* residual, const float* weight, int rows, int n, float eps, float* y,
                      float* q, float* scales, cudaStream_t stream) {
    Fp8Out o;
    o.q = q;
    o.scales = scales;
    rmsnorm_quantize(x, residual, weight, rows, n, eps, y, o, stream);
}

}  // namespace q3n::cuda
