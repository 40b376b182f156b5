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
// shared memory; more tokens route in many blocks, then permute in one. A decode step of one token
// (two at 512+ experts) routes with a thread per expert instead (route_block_permute_kernel, the
// same bits). Launches use PDL: nothing here reads the logits before pdl_wait().
#include <algorithm>
#include <cfloat>
#include <cstdlib>
#include <cstring>

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

// A decode step's routing with a thread per expert: route_token's result bit for bit, without its
// serial part. One warp's top_k picks over E / 32 values a lane are a chain of top_k warp-wide
// argmax rounds, each a tree over the lane's values (at E = 512, top-10: ~8,500 cycles, 4.3 us on an
// H100, measured). Here token t has the kPer warps [t kPer, t kPer + kPer), thread e expert e:
//   - the max, the exponentials and the sum are route_token's values: the sum adds each lane's
//     experts e = 32 i + lane in i order, then warp_sum, which every warp of the token repeats on the
//     exponentials in shared memory, so every p = exp / sum has route_token's bits;
//   - threshold: tau = the top_k-th largest of the maxima of 2^seg_log2-expert segments (at least
//     2 top_k segments, at most 32). The top_k segments with the largest maxima each hold a key of
//     at least tau, so every pick's key is >= tau: the picks are among the candidates with key >=
//     tau, typically a dozen;
//   - the candidates (when at most 32) go to one warp, a lane each, and each lane counts the
//     candidates ranked before its own (larger probability, then lower index): the ranks below
//     top_k are the picks in route_token's order. The weights are summed in pick order, as there.
// More than 32 candidates (ties, NaN) fall back to route_token for the token. Then the permutation:
// route_permute_kernel's, or for one token its result computed directly (the same arrays).
struct BlockRouteScratch {
    float logit_max[32];  // per warp of the token
    uint32_t segment_max[32];
    int candidates[32];  // per warp of the token
    uint32_t key[32];    // the candidates
    int expert[32];
    float prob[32];
    float picked[32];  // the picks' probabilities, best first
    uint32_t tau;
};

// Token count, expert count and top_k the block routing takes: segments of at most a warp with
// 2 top_k to 32 of them, every token's warps in one block, and few tokens. Against
// route_permute_kernel on an H100 (back-to-back launches): E = 512, top-10: 7.3 -> 5.1 us at one
// token, 7.4 -> 6.5 at two; E = 128, top-8: 4.9 -> 4.2 at one token, but 5.3 -> 7.4 at eight, and
// E = 256 at four tokens and E = 64 at three were slower too: the warp per token of the old kernel
// runs its tokens side by side, where this block holds fewer tokens' worth of threads.
bool block_route_applicable(int tokens, int kPer, int top_k) {
    return kPer >= 4 && top_k <= 16 && tokens <= std::max(1, kPer / 8) && tokens * kPer * 32 <= kPermuteThreads;
}
int block_route_segment_log2(int kPer, int top_k) {
    int s = 0;
    while ((2 << s) <= std::min(32, kPer * 32 / (2 * top_k))) ++s;
    return s;
}
size_t block_route_smem(int tokens, int kPer, int E, int top_k) {
    const int n = tokens * top_k;
    const size_t permute = tokens > 1 ? (static_cast<size_t>((n + 31) / 32) * E + 64) * sizeof(int) : 0;  // permute_block's
    return static_cast<size_t>(tokens) * (kPer * 32 * sizeof(float) + sizeof(BlockRouteScratch)) + n * sizeof(int32_t) +
           permute;
}

// The lanes whose (key, tie) come before this lane's (larger key, then smaller tie), counted: with
// distinct pairs, a rank 0..31 per lane.
__device__ __forceinline__ int warp_rank(uint32_t key, int tie) {
    int rank = 0;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
        const uint32_t other = __shfl_sync(0xffffffffu, key, j);
        const int other_tie = __shfl_sync(0xffffffffu, tie, j);
        rank += (other > key) | ((other == key) & (other_tie < tie));
    }
    return rank;
}

template <int kPer>
__global__ void __launch_bounds__(kPermuteThreads)
    route_block_permute_kernel(const float* logits, int ld, int tokens, int E, int top_k, bool renormalize, int seg_log2,
                               MoeRouting r) {
    constexpr int Ep = kPer * 32;
    extern __shared__ __align__(16) int route_smem[];
    auto* scratch = reinterpret_cast<BlockRouteScratch*>(route_smem);
    float* exps = reinterpret_cast<float*>(scratch + tokens);
    int32_t* picks = reinterpret_cast<int32_t*>(exps + tokens * Ep);
    int* hist = picks + tokens * top_k;
    const int tid = threadIdx.x, lane = tid & 31, t = tid / Ep, e = tid - t * Ep, w = e >> 5;
    BlockRouteScratch& ts = scratch[t];
    float* ex_t = exps + t * Ep;
    const float* l = logits + static_cast<size_t>(t) * ld;
    pdl_wait();
    pdl_launch_dependents();

    const float x = e < E ? __ldcg(l + e) : -INFINITY;
    const float wm = warp_max(x);
    if (lane == 0) ts.logit_max[w] = wm;
    __syncthreads();
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < kPer; ++i) m = fmaxf(m, ts.logit_max[i]);
    const float ex = e < E ? expf(x - m) : 0.0f;
    ex_t[e] = ex;
    __syncthreads();
    float part = 0.0f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) part += ex_t[i * 32 + lane];
    const float p = ex / warp_sum(part);
    const uint32_t key = e < E ? moe::order_key(p) : 0u;

    uint32_t seg = key;
    for (int o = 1; o < (1 << seg_log2); o <<= 1) seg = max(seg, __shfl_xor_sync(0xffffffffu, seg, o));
    if ((e & ((1 << seg_log2) - 1)) == 0) ts.segment_max[e >> seg_log2] = seg;
    __syncthreads();
    if (w == 0) {
        const int segments = Ep >> seg_log2;
        const uint32_t v = lane < segments ? ts.segment_max[lane] : 0u;
        const int rank = warp_rank(v, lane);
        const uint32_t tau = __shfl_sync(0xffffffffu, v, __ffs(__ballot_sync(0xffffffffu, rank == top_k - 1)) - 1);
        if (lane == 0) ts.tau = tau;
    }
    __syncthreads();
    const uint32_t tau = ts.tau;
    const unsigned mine = __ballot_sync(0xffffffffu, tau != 0u && key >= tau);
    if (lane == 0) ts.candidates[w] = __popc(mine);
    __syncthreads();
    int before = 0, count = 0;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
        const int c = ts.candidates[i];
        before += i < w ? c : 0;
        count += c;
    }
    if (count <= 32 && ((mine >> lane) & 1u)) {
        const int slot = before + __popc(mine & ((1u << lane) - 1u));
        ts.key[slot] = key;
        ts.expert[slot] = e;
        ts.prob[slot] = p;
    }
    __syncthreads();
    if (w == 0) {
        int32_t* et = r.experts + static_cast<size_t>(t) * top_k;
        float* wt = r.weights + static_cast<size_t>(t) * top_k;
        int32_t* pk = picks + t * top_k;
        if (count > 32 || tau == 0u) {
            moe::route_token<kPer>(l, E, top_k, renormalize, et, wt, pk);
        } else {
            const uint32_t ck = lane < count ? ts.key[lane] : 0u;
            const int ci = lane < count ? ts.expert[lane] : 0x7fffffff;
            const float cp = lane < count ? ts.prob[lane] : 0.0f;
            const int rank = warp_rank(ck, ci);
            const bool pick = lane < count && rank < top_k;
            if (pick) ts.picked[rank] = cp;
            __syncwarp();
            float total = 0.0f;  // route_token's sum, in pick order
            for (int j = 0; j < top_k; ++j) total += ts.picked[j];
            if (pick) {
                et[rank] = ci;
                wt[rank] = renormalize ? cp / total : cp;
                pk[rank] = ci;
            }
        }
    }
    __syncthreads();
    if (tokens > 1) {
        permute_block(picks, tokens * top_k, E, hist, hist + (tokens * top_k + 31) / 32 * E, r);
        return;
    }
    // One token: its experts are distinct, so the counting sort puts pick j at the rank of its expert
    // among the picks, and expert e's rows start at the number of picks below e.
    for (int expert = tid; expert <= E; expert += blockDim.x) {
        int below = 0;
        for (int j = 0; j < top_k; ++j) below += picks[j] < expert;
        r.offsets[expert] = below;
    }
    if (tid < top_k) {
        const int chosen = picks[tid];
        int pos = 0;
        for (int j = 0; j < top_k; ++j) pos += picks[j] < chosen;
        r.order[pos] = tid;
        r.position[tid] = pos;
        r.active[1 + pos] = chosen;
    }
    if (tid == 0) r.active[0] = top_k;
}

// Whether moe_route takes route_block_permute_kernel where it applies: on unless Q3N_ROUTE_BLOCK=0
// (for measuring what it gains; the results are the same bits).
bool block_route_enabled() {
    static const bool on = [] {
        const char* v = std::getenv("Q3N_ROUTE_BLOCK");
        return !(v && std::strcmp(v, "0") == 0);
    }();
    return on;
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
    if (block_route_enabled() && block_route_applicable(tokens, kPer, top_k)) {
        const size_t smem = block_route_smem(tokens, kPer, E, top_k);
        allow_shared_memory(reinterpret_cast<const void*>(route_block_permute_kernel<kPer>), smem);
        Q3N_CUDA(launch_pdl(route_block_permute_kernel<kPer>, dim3(1), dim3(tokens * kPer * 32), smem, stream, logits, ld,
                            tokens, E, top_k, renormalize, block_route_segment_log2(kPer, top_k), r));
        return;
    }
    if (tokens <= kFusedMaxTokens) {
        // A thread per expert and a warp per token, up to 32: small blocks start and synchronise faster.
        const int threads = std::min(kPermuteThreads, (std::max(E, 32 * std::min(tokens, 32)) + 31) / 32 * 32);
        const size_t smem = permute_smem(E, threads) + static_cast<size_t>(tokens) * top_k * sizeof(int32_t);
        allow_shared_memory(reinterpret_cast<const void*>(route_permute_kernel<kPer>), smem);
        Q3N_CUDA(launch_pdl(route_permute_kernel<kPer>, dim3(1), dim3(threads), smem, stream, logits, ld, tokens, E,
                            top_k, renormalize, r));
        return;
    }
    Q3N_CUDA(launch_pdl(route_kernel<kPer>, dim3((tokens + kRouteWarps - 1) / kRouteWarps), dim3(kRouteWarps * 32), 0,
                        stream, logits, ld, tokens, E, top_k, renormalize, r.experts, r.weights));
    const size_t smem = permute_smem(E, kPermuteThreads);
    allow_shared_memory(reinterpret_cast<const void*>(permute_kernel), smem);
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
