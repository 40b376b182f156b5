#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/fp8_out.cuh"
#include "cuda/ops.h"

namespace q3n::cuda {
namespace {

// One warp per (row, 128-channel group): each lane holds 4 values.
__global__ void quantize_kernel(const float* x, int rows, int k, Fp8Out out) {
    pdl_launch_dependents();
    pdl_wait();
    const int groups = (k + 127) / 128;
    const int item = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (item >= rows * groups) return;
    const int r = item / groups, g = item % groups, lane = threadIdx.x & 31;
    const float* xr = x + static_cast<size_t>(r) * k;
    float v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int i = g * 128 + j * 32 + lane;
        v[j] = i < k ? xr[i] : 0.0f;
    }
    const float s = quantize_group_warp(v);
    store_fp8_group(out, r, g, groups, k, lane, v, s);
}

}  // namespace

void quantize_fp8(const float* x, int rows, int k, const Fp8Out& out, cudaStream_t stream) {
    const int items = rows * ((k + 127) / 128);
    if (items == 0) return;
    Q3N_CUDA(launch_pdl(quantize_kernel, (items + 7) / 8, 256, 0, stream, x, rows, k, out));
}

void quantize_fp8(const float* x, int rows, int k, float* q, float* scales, cudaStream_t stream) {
    Fp8Out out;
    out.q = q;
    out.scales = scales;
    quantize_fp8(x, rows, k, out, stream);
}

}  // namespace q3n::cuda
