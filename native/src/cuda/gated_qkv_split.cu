// Qwen3-Next's gated attention projects query and gate interleaved per head (spec 3.3 step 1). The
// dense path's qk_norm_rope_kv_write reads [q | k | v] rows, so this copies q, k and v into that row
// shape and leaves the gates in place; its cost is one read of q, k, v per token, beside a GEMV
// that reads a whole weight matrix.
#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/next_ops.h"

namespace q3n::cuda {
namespace {

__global__ void gated_qkv_split_kernel(const float* src, int src_stride, int heads, int kv_heads, int d, float* qkv) {
    const int t = blockIdx.x, q_width = heads * d, row = (heads + 2 * kv_heads) * d;
    const float* in = src + static_cast<size_t>(t) * src_stride;
    float* out = qkv + static_cast<size_t>(t) * row;
    for (int i = threadIdx.x; i < row; i += blockDim.x) {
        // q head h sits at h * 2d in src; k and v follow all the query/gate pairs unchanged.
        out[i] = i < q_width ? in[(i / d) * 2 * d + i % d] : in[q_width + i];
    }
}

}  // namespace

void gated_qkv_split(const float* src, int src_stride, int tokens, int heads, int kv_heads, int head_dim, float* qkv,
                     cudaStream_t stream) {
    if (tokens == 0) return;
    gated_qkv_split_kernel<<<tokens, 256, 0, stream>>>(src, src_stride, heads, kv_heads, head_dim, qkv);
    Q3N_CUDA_LAUNCHED("gated_qkv_split");
}

}  // namespace q3n::cuda
