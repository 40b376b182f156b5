// Qwen3-VL's vision rows in the text model's residual stream (spec 4.1): the merged features replace
// the placeholder rows' embeddings, and DeepStack taps are added to them after the first layers. One
// block per row; rows are distinct, so no two blocks touch the same element.
#include "cuda/cuda_check.h"
#include "cuda/vision_ops.h"

namespace q3n::cuda {
namespace {

__global__ void vl_scatter_rows_kernel(float* __restrict__ x, const int32_t* __restrict__ rows, int n,
                                       const float* __restrict__ src, int src_stride, bool add) {
    float* dst = x + static_cast<size_t>(rows[blockIdx.x]) * n;
    const float* s = src + static_cast<size_t>(blockIdx.x) * src_stride;
    for (int j = threadIdx.x; j < n; j += blockDim.x) dst[j] = add ? dst[j] + s[j] : s[j];
}

}  // namespace

void vl_scatter_rows(float* x, const int32_t* rows, int count, int n, const float* src, int src_stride, bool add,
                     cudaStream_t stream) {
    if (count == 0) return;
    vl_scatter_rows_kernel<<<count, 256, 0, stream>>>(x, rows, n, src, src_stride, add);
    Q3N_CUDA_LAUNCHED("vl_scatter_rows");
}

}  // namespace q3n::cuda
