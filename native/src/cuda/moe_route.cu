// The MoE router (spec 2.2) and the token permutation that groups each expert's rows, on the device.
//
// Routing: one warp per token; the token's probabilities sit in shared memory and each of the top_k
// picks is a warp-wide argmax with the CPU's order (larger first, equal values to the lower index,
// NaN below every number), so expert ids agree with cpu::moe_route wherever the probabilities do.
// Permutation: one block; a shared-memory histogram, a serial prefix sum over experts (E is at most a
// few thousand), then one warp places the assignments 32 at a time in their original order, ranking
// equal experts within a batch with __match_any_sync: the same stable counting sort as cpu::moe_forward,
// and deterministic, which keeps the expert GEMMs' row order (and so their results) run to run.
#include <cfloat>

#include "core/error.h"
#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/next_ops.h"

namespace q3n::cuda {
namespace {

constexpr int kRouteWarps = 4;
constexpr int kPermuteThreads = 1024;

__device__ __forceinline__ float rank_key(float p) { return isnan(p) ? -INFINITY : p; }

// (key, index) of the better of two candidates; index == n means "none".
__device__ __forceinline__ void better(float& key, int& idx, float k2, int i2, int n) {
    if (i2 == n) return;
    if (idx == n || k2 > key || (k2 == key && i2 < idx)) {
        key = k2;
        idx = i2;
    }
}

__global__ void route_kernel(const float* logits, int tokens, int E, int top_k, bool renormalize, int32_t* experts,
                             float* weights) {
    extern __shared__ unsigned char route_smem[];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int t = blockIdx.x * kRouteWarps + w;
    if (t >= tokens) return;
    float* p = reinterpret_cast<float*>(route_smem) + static_cast<size_t>(w) * E;
    unsigned char* taken = route_smem + static_cast<size_t>(kRouteWarps) * E * sizeof(float) + static_cast<size_t>(w) * E;
    const float* l = logits + static_cast<size_t>(t) * E;

    float m = -INFINITY;
    for (int e = lane; e < E; e += 32) m = fmaxf(m, l[e]);
    m = warp_max(m);
    float sum = 0.0f;
    for (int e = lane; e < E; e += 32) {
        const float v = expf(l[e] - m);
        p[e] = v;
        taken[e] = 0;
        sum += v;
    }
    sum = warp_sum(sum);
    for (int e = lane; e < E; e += 32) p[e] /= sum;
    __syncwarp();

    int32_t* et = experts + static_cast<size_t>(t) * top_k;
    float* wt = weights + static_cast<size_t>(t) * top_k;
    for (int j = 0; j < top_k; ++j) {
        float key = -INFINITY;
        int idx = E;
        for (int e = lane; e < E; e += 32)
            if (!taken[e]) better(key, idx, rank_key(p[e]), e, E);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float k2 = __shfl_xor_sync(0xffffffffu, key, o);
            const int i2 = __shfl_xor_sync(0xffffffffu, idx, o);
            better(key, idx, k2, i2, E);
        }
        if (lane == 0) {
            taken[idx] = 1;
            et[j] = idx;
            wt[j] = p[idx];
        }
        __syncwarp();
    }
    if (renormalize && lane == 0) {
        float s = 0.0f;  // in pick order, like the CPU
        for (int j = 0; j < top_k; ++j) s += wt[j];
        for (int j = 0; j < top_k; ++j) wt[j] /= s;
    }
}

__global__ void __launch_bounds__(kPermuteThreads)
    permute_kernel(const int32_t* experts, int n, int E, int32_t* offsets, int32_t* order, int32_t* position,
                   int32_t* active) {
    extern __shared__ int permute_smem[];
    int* count = permute_smem;
    int* cursor = permute_smem + E;
    for (int e = threadIdx.x; e < E; e += blockDim.x) count[e] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) atomicAdd(&count[experts[i]], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        int run = 0, used = 0;
        for (int e = 0; e < E; ++e) {
            offsets[e] = run;
            cursor[e] = run;
            if (count[e] > 0) active[1 + used++] = e;
            run += count[e];
        }
        offsets[E] = run;
        active[0] = used;
    }
    __syncthreads();
    if (threadIdx.x >= 32) return;
    const int lane = threadIdx.x;
    for (int base = 0; base < n; base += 32) {
        const int i = base + lane;
        const int e = i < n ? experts[i] : -1;
        const unsigned same = __match_any_sync(0xffffffffu, e);
        const int rank = __popc(same & ((1u << lane) - 1u));
        if (e >= 0) {
            const int pos = cursor[e] + rank;
            order[pos] = i;
            position[i] = pos;
        }
        __syncwarp();
        if (e >= 0 && rank == 0) cursor[e] += __popc(same);
        __syncwarp();
    }
}

}  // namespace

void moe_route(const float* logits, int tokens, int num_experts, int top_k, bool renormalize,
               const MoeRouting& routing, cudaStream_t stream) {
    require(top_k >= 1 && top_k <= num_experts, Q3N_ERR_INTERNAL, "moe_route: top_k outside [1, num_experts]");
    if (tokens == 0) return;
    const size_t route_bytes = static_cast<size_t>(kRouteWarps) * num_experts * (sizeof(float) + 1);
    const size_t permute_bytes = 2 * static_cast<size_t>(num_experts) * sizeof(int);
    require(route_bytes <= 48 * 1024 && permute_bytes <= 48 * 1024, Q3N_ERR_INTERNAL,
            "moe_route: more experts than the kernels' shared memory holds (2400)");
    route_kernel<<<(tokens + kRouteWarps - 1) / kRouteWarps, kRouteWarps * 32, route_bytes, stream>>>(
        logits, tokens, num_experts, top_k, renormalize, routing.experts, routing.weights);
    Q3N_CUDA_LAUNCHED("moe_route");
    permute_kernel<<<1, kPermuteThreads, permute_bytes, stream>>>(routing.experts, tokens * top_k, num_experts,
                                                                  routing.offsets, routing.order, routing.position,
                                                                  routing.active);
    Q3N_CUDA_LAUNCHED("moe_permute");
}

}  // namespace q3n::cuda
