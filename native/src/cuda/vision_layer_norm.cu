// LayerNorm over rows, one block per row. Mean and variance are summed in double in two passes, as the
// CPU's layer_norm does: the ViT's residual stream has a large mean relative to its spread, where a
// one-pass E[x^2] - E[x]^2 in fp32 would cancel.
#include "cuda/cuda_check.h"
#include "cuda/vision_ops.h"

namespace q3n::cuda {
namespace {

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

}  // namespace

void vision_layer_norm(const float* x, const float* weight, const float* bias, float* y, int rows, int n, float eps,
                       cudaStream_t stream) {
    if (rows == 0) return;
    vision_layer_norm_kernel<<<rows, 256, 0, stream>>>(x, weight, bias, y, n, eps);
    Q3N_CUDA_LAUNCHED("vision_layer_norm");
}

}  // namespace q3n::cuda
