// LayerNorm over rows. Mean and variance are summed in double in two passes, as the CPU's layer_norm
// does: the ViT's residual stream has a large mean relative to its spread, where a one-pass
// E[x^2] - E[x]^2 in fp32 would cancel.
//
// vision_layer_norm: one block per row. vision_layer_norm_bf16: one warp per row (eight rows a block),
// so its reductions are shuffles alone. Its statistics then differ from the block kernel's only in the
// order of the double additions, far below fp32's resolution, so each element is the block kernel's
// float, rounded once to bf16 for the GEMM that reads it.
#include "cuda/cuda_check.h"
#include "cuda/vision_ops.h"

namespace q3n::cuda {
namespace {

constexpr int kWarpRows = 8;

__device__ __forceinline__ double block_sum_double(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double total = 0.0;
    for (int i = 0; i < warps; ++i) total += scratch[i];
    return total;
}

__device__ __forceinline__ double warp_sum_double(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__global__ void vision_layer_norm_kernel(const float* __restrict__ x, const float* __restrict__ weight,
                                         const float* __restrict__ bias, float* __restrict__ y, int n, float eps) {
    __shared__ double scratch[32];
    const float* xr = x + static_cast<size_t>(blockIdx.x) * n;
    float* yr = y + static_cast<size_t>(blockIdx.x) * n;
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += xr[i];
    const double mean = block_sum_double(s, scratch) / n;
    double v = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const double d = xr[i] - mean;
        v += d * d;
    }
    const double var = block_sum_double(v, scratch) / n;
    const double inv = 1.0 / sqrt(var + static_cast<double>(eps));
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        yr[i] = static_cast<float>((xr[i] - mean) * inv) * weight[i] + bias[i];
}

// The row is read three times; after the first pass it comes from L1 (8 rows of 4.6 KB at hidden 1152).
__global__ void __launch_bounds__(32 * kWarpRows)
    vision_layer_norm_bf16_kernel(const float* __restrict__ x, const float* __restrict__ weight,
                                  const float* __restrict__ bias, __nv_bfloat16* __restrict__ y, int rows, int n,
                                  float eps) {
    const int lane = threadIdx.x & 31, row = blockIdx.x * kWarpRows + (threadIdx.x >> 5);
    if (row >= rows) return;  // whole warps: no shuffle below misses a lane
    const float* xr = x + static_cast<size_t>(row) * n;
    __nv_bfloat16* yr = y + static_cast<size_t>(row) * n;
    double s = 0.0;
    for (int i = lane; i < n; i += 32) s += xr[i];
    const double mean = warp_sum_double(s) / n;
    double v = 0.0;
    for (int i = lane; i < n; i += 32) {
        const double d = xr[i] - mean;
        v += d * d;
    }
    const double var = warp_sum_double(v) / n;
    const double inv = 1.0 / sqrt(var + static_cast<double>(eps));
    for (int i = lane; i < n; i += 32)
        yr[i] = __float2bfloat16_rn(static_cast<float>((xr[i] - mean) * inv) * weight[i] + bias[i]);
}

}  // namespace

void vision_layer_norm(const float* x, const float* weight, const float* bias, float* y, int rows, int n, float eps,
                       cudaStream_t stream) {
    if (rows == 0) return;
    vision_layer_norm_kernel<<<rows, 256, 0, stream>>>(x, weight, bias, y, n, eps);
    Q3N_CUDA_LAUNCHED("vision_layer_norm");
}

void vision_layer_norm_bf16(const float* x, const float* weight, const float* bias, __nv_bfloat16* y, int rows, int n,
                            float eps, cudaStream_t stream) {
    if (rows == 0) return;
    vision_layer_norm_bf16_kernel<<<(rows + kWarpRows - 1) / kWarpRows, 32 * kWarpRows, 0, stream>>>(x, weight, bias, y,
                                                                                                     rows, n, eps);
    Q3N_CUDA_LAUNCHED("vision_layer_norm_bf16");
}

}  // namespace q3n::cuda
