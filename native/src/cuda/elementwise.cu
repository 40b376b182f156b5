#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/ops.h"

namespace q3n::cuda {
namespace {

__global__ void silu_mul_kernel(const float* gu, int tokens, int inter, float* out) {
    pdl_launch_dependents();
    pdl_wait();
    const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= static_cast<size_t>(tokens) * inter) return;
    const size_t t = i / inter, c = i % inter;
    const float g = gu[t * 2 * inter + c], u = gu[t * 2 * inter + inter + c];
    out[i] = g / (1.0f + expf(-g)) * u;
}

__global__ void add_kernel(float* x, const float* y, int n) {
    pdl_launch_dependents();
    pdl_wait();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

__global__ void gather_kernel(const float* x, const int32_t* rows, int n, float* out) {
    pdl_launch_dependents();
    pdl_wait();
    const float* src = x + static_cast<size_t>(rows[blockIdx.x]) * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[static_cast<size_t>(blockIdx.x) * n + i] = src[i];
}

}  // namespace

void silu_mul(const float* gate_up, int tokens, int inter, float* out, cudaStream_t stream) {
    const size_t n = static_cast<size_t>(tokens) * inter;
    if (n == 0) return;
    Q3N_CUDA(launch_pdl(silu_mul_kernel, static_cast<unsigned>((n + 255) / 256), 256, 0, stream, gate_up, tokens, inter, out));
}

void add_inplace(float* x, const float* y, int n, cudaStream_t stream) {
    if (n == 0) return;
    Q3N_CUDA(launch_pdl(add_kernel, (n + 255) / 256, 256, 0, stream, x, y, n));
}

void gather_rows(const float* x, const int32_t* rows, int count, int n, float* out, cudaStream_t stream) {
    if (count == 0) return;
    Q3N_CUDA(launch_pdl(gather_kernel, count, 256, 0, stream, x, rows, n, out));
}

}  // namespace q3n::cuda
