// The MoE router (spec 2.2) and the token permutation that groups each expert's rows, on the device.
//
// Routing: one warp per token with the token's probabilities in registers (E / 32 per lane); each of
// the top_k picks is a warp-wide argmax with the CPU's order (larger first, equal values to the lower
// index, NaN below every number), so expert ids agree with cpu::moe_route wherever the probabilities do.
// Permutation: one block, each warp owning a contiguous run of the assignments. Every warp
// counts its run per expert (ranking equal experts 32 at a time with __match_any_sync), one thread
// per expert turns the counts into the expert's offset (a block scan) and each warp's starting row,
// and the warps place their runs in order: the stable counting sort of cpu::moe_forward,
// deterministic, which keeps the expert GEMMs' row order (and so their results) run to run.
//
// Up to kFusedMaxTokens tokens (decode) both run in one block of one launch, with the picks in
// shared memory; more tokens route in many blocks, then permute in one. Launches use PDL: nothing
// here reads the logits before pdl_wait().
#include <algorithm>
#include <cfloat>

#include "core/error.h"
#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/moe_common.cuh"
#include "cuda/moe_internal.h"
#include "cuda/moe_route_token.cuh"
#include "cuda/next_ops.h"

namespace q3n::cuda {
namespace {

using moe::route_token;

constexpr int kMaxExperts = 1024;  // one expert per thread of the permutation block
constexpr int kRouteWarps = 8;
constexpr int kPermuteThreads = 1024;
constexpr int kFusedMaxTokens = 64;

// The counting sort of the n assignments `picks` (global or shared memory) by one block of at least
// E threads (at most 1024); `hist` holds E ints per warp, `tmp` 64.
__device__ void permute_block(const int32_t* picks, int n, int E, int* hist, int* tmp, const MoeRouting& r) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    // Runs of whole 32-assignment batches; only the W warps with a run keep a histogram row.
    const int chunk = 32 * (((n + 31) / 32 + warps - 1) / warps), W = (n + chunk - 1) / chunk;
    const int beg = min(n, warp * chunk), end = min(n, beg + chunk);
    for (int i = tid; i < W * E; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    int* mine = hist + warp * E;
    for (int base = beg; base < end; base += 32) {
        const int i = base + lane;
        const int e = i < end ? picks[i] : -1;
        const unsigned same = __match_any_sync(0xffffffffu, e);
        if (e >= 0 && lane == __ffs(same) - 1) mine[e] += __popc(same);
        __syncwarp();
    }
    __syncthreads();
    int total = 0;
    if (tid < E)
        for (int w = 0; w < W; ++w) total += hist[w * E + tid];
    int off = total, rank = total > 0 ? 1 : 0, rows = 0, used = 0;
    moe::block_scan2(off, rank, rows, used, tmp);
    if (tid < E) {
        r.offsets[tid] = off;
        if (total > 0) r.active[1 + rank] = tid;
        int run = off;  // warp w's first row of this expert
        for (int w = 0; w < W; ++w) {
            const int c = hist[w * E + tid];
            hist[w * E + tid] = run;
            run += c;
        }
    }
    if (tid == 0) {
        r.offsets[E] = rows;
        r.active[0] = used;
    }
    __syncthreads();
    for (int base = beg; base < end; base += 32) {
        const int i = base + lane;
        const int e = i < end ? picks[i] : -1;
        const unsigned same = __match_any_sync(0xffffffffu, e);
        const int before = __popc(same & ((1u << lane) - 1u));
        if (e >= 0) {
            const int pos = mine[e] + before;
            r.order[pos] = i;
            r.position[i] = pos;
        }
        __syncwarp();
        if (e >= 0 && before == 0) mine[e] += __popc(same);
        __syncwarp();
    }
}

// A histogram row per warp and the scan's scratch.
size_t permute_smem(int E, int threads) { return (threads / 32 * static_cast<size_t>(E) + 64) * sizeof(int); }

template <int kPer>
__global__ void __launch_bounds__(kPermuteThreads)
    route_permute_kernel(const float* logits, int ld, int tokens, int E, int top_k, bool renormalize, MoeRouting r) {
    extern __shared__ int route_smem[];
    const int hist = (blockDim.x >> 5) * E;
    int32_t* picks = route_smem + hist + 64;
    pdl_wait();
    pdl_launch_dependents();
    for (int t = threadIdx.x >> 5; t < tokens; t += blockDim.x >> 5)
        route_token<kPer>(logits + static_cast<size_t>(t) * ld, E, top_k, renormalize,
                          r.experts + static_cast<size_t>(t) * top_k, r.weights + static_cast<size_t>(t) * top_k,
                          picks + t * top_k);
    __syncthreads();
    permute_block(picks, tokens * top_k, E, route_smem, route_smem + hist, r);
}

template <int kPer>
__global__ void __launch_bounds__(kRouteWarps * 32)
    route_kernel(const float* logits, int ld, int tokens, int E, int top_k, bool renormalize, int32_t* experts,
                 float* weights) {
    pdl_wait();
    pdl_launch_dependents();
    const int t = blockIdx.x * kRouteWarps + (threadIdx.x >> 5);
    if (t >= tokens) return;
    route_token<kPer>(logits + static_cast<size_t>(t) * ld, E, top_k, renormalize, experts + static_cast<size_t>(t) * top_k,
                      weights + static_cast<size_t>(t) * top_k, nullptr);
}

__global__ void __launch_bounds__(kPermuteThreads) permute_kernel(int n, int E, MoeRouting r) {
    extern __shared__ int permute_smem_buf[];
    pdl_wait();
    pdl_launch_dependents();
    permute_block(r.experts, n, E, permute_smem_buf, permute_smem_buf + (blockDim.x >> 5) * E, r);
}

template <int kPer>
void launch(const float* logits, int ld, int tokens, int E, int top_k, bool renormalize, const MoeRouting& r,
            cudaStream_t stream) {
    if (tokens <= kFusedMaxTokens) {
        // A thread per expert and a warp per token, up to 32: small blocks start and synchronise faster.
        const int threads = std::min(kPermuteThreads, (std::max(E, 32 * std::min(tokens, 32)) + 31) / 32 * 32);
        const size_t smem = permute_smem(E, threads) + static_cast<size_t>(tokens) * top_k * sizeof(int32_t);
        moe::allow_shared_memory(reinterpret_cast<const void*>(route_permute_kernel<kPer>), smem);
        Q3N_CUDA(launch_pdl(route_permute_kernel<kPer>, dim3(1), dim3(threads), smem, stream, logits, ld, tokens, E,
                            top_k, renormalize, r));
        return;
    }
    Q3N_CUDA(launch_pdl(route_kernel<kPer>, dim3((tokens + kRouteWarps - 1) / kRouteWarps), dim3(kRouteWarps * 32), 0,
                        stream, logits, ld, tokens, E, top_k, renormalize, r.experts, r.weights));
    const size_t smem = permute_smem(E, kPermuteThreads);
    moe::allow_shared_memory(reinterpret_cast<const void*>(permute_kernel), smem);
    Q3N_CUDA(launch_pdl(permute_kernel, dim3(1), dim3(kPermuteThreads), smem, stream, tokens * top_k, E, r));
}

}  // namespace

void moe_route(const float* logits, int tokens, int num_experts, int top_k, bool renormalize,
               const MoeRouting& routing, cudaStream_t stream, int logits_ld) {
    require(top_k >= 1 && top_k <= num_experts, Q3N_ERR_INTERNAL, "moe_route: top_k outside [1, num_experts]");
    require(num_experts <= kMaxExperts, Q3N_ERR_INTERNAL, "moe_route: more than 1024 experts");
    const int ld = logits_ld == 0 ? num_experts : logits_ld;
    require(ld >= num_experts, Q3N_ERR_INTERNAL, "moe_route: logits row stride below num_experts");
    if (tokens == 0) return;
    const int per = (num_experts + 31) / 32;
    if (per <= 1)
        launch<1>(logits, ld, tokens, num_experts, top_k, renormalize, routing, stream);
    else if (per <= 2)
        launch<2>(logits, ld, tokens, num_experts, top_k, renormalize, routing, stream);
    else if (per <= 4)
        launch<4>(logits, ld, tokens, num_experts, top_k, renormalize, routing, stream);
    else if (per <= 8)
        launch<8>(logits, ld, tokens, num_experts, top_k, renormalize, routing, stream);
    else if (per <= 16)
        launch<16>(logits, ld, tokens, num_experts, top_k, renormalize, routing, stream);
    else
        launch<32>(logits, ld, tokens, num_experts, top_k, renormalize, routing, stream);
}

}  // namespace q3n::cuda
