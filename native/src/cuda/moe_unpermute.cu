// The weighted sum that ends an MoE block: y[t] = sum over t's experts in ascending index order of
// w * o[row] (+ sigmoid(sg[t * sg_ld]) * the shared expert's row), cpu::moe_forward's order, then Qwen3-Next's
// shared term last. Rows are laid out by ascending expert, so ranking t's rows by position ranks its
// experts; the top_k entries are ranked in parallel (positions are distinct), not by a serial sort,
// which kept one thread walking dependent loads.
#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/moe_internal.h"

namespace q3n::cuda::moe {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxTopK = 64;

// grid (tokens, ceil(H / 256)): one output channel per thread.
__global__ void __launch_bounds__(kThreads) unpermute_kernel(const float* o, Dims d, const int32_t* position,
                                                             const float* weights, const float* shared_gate, int sg_ld,
                                                             float* y) {
    __shared__ int seen[kMaxTopK], rows[kMaxTopK];
    __shared__ float seen_w[kMaxTopK], ws[kMaxTopK];
    pdl_wait();
    pdl_launch_dependents();
    const int t = blockIdx.x, tid = threadIdx.x;
    if (tid < d.k) {
        seen[tid] = position[static_cast<size_t>(t) * d.k + tid];
        seen_w[tid] = weights[static_cast<size_t>(t) * d.k + tid];
    }
    __syncthreads();
    if (tid < d.k) {
        int rank = 0;
        for (int j = 0; j < d.k; ++j) rank += seen[j] < seen[tid];
        rows[rank] = seen[tid];
        ws[rank] = seen_w[tid];
    }
    __syncthreads();
    const int n = blockIdx.y * kThreads + tid;
    if (n >= d.hidden) return;
    float acc = 0.0f;
    for (int j = 0; j < d.k; ++j) acc += ws[j] * o[static_cast<size_t>(rows[j]) * d.hidden + n];
    if (d.shared) {
        const float sg = 1.0f / (1.0f + expf(-shared_gate[static_cast<size_t>(t) * sg_ld]));
        acc += sg * o[static_cast<size_t>(d.routed_rows + t) * d.hidden + n];
    }
    y[static_cast<size_t>(t) * d.hidden + n] = acc;
}

}  // namespace

void unpermute(const float* o, const Dims& d, const MoeRouting& r, const float* shared_gate, int sg_ld, float* y,
               cudaStream_t stream) {
    require(d.k <= kMaxTopK, Q3N_ERR_INTERNAL, "moe unpermute: top_k above 64");
    Q3N_CUDA(launch_pdl(unpermute_kernel, dim3(d.tokens, (d.hidden + kThreads - 1) / kThreads), dim3(kThreads), 0,
                        stream, o, d, r.position, r.weights, shared_gate, sg_ld, y));
}

}  // namespace q3n::cuda::moe
