// The FP8 experts at batch sizes up to kFusedDecodeMaxTokens, routing included, in one persistent
// launch (after a small prologue that quantises x and clears the counters). Opt-in (Q3N_MOE_FUSED=1
// or moe_forward_fused): on the H100 it is still slower than moe_route + moe_experts, see "Measured".
//
// Why try it: the three-launch path (moe_route, then moe_fp8_decode.cu's gate/up and down launches)
// left Qwen3-Next's MoE layer at 29% of its weight-streaming floor on the H200 at batch 1. The CUPTI
// timeline of Qwen3-30B (H100) showed the route 4.4 us and the prologue 2.1 us on one SM each before
// any weight moved; then gate/up's 64 KB blocks filled every SM's shared memory, so down's blocks, and
// their weight copies, waited for gate/up blocks to leave.
//
// Here every block routes the tokens itself (one warp a token, moe_route_token.cuh: the same experts
// and weight bits as moe_route) before pdl_wait(); a block per SM then streams weights through a ring
// of stages in shared memory, the producer warp issuing bulk (TMA) copies, and cp.async copies of each
// stage's weight-block scales, as far ahead as the ring allows, across items and from gate/up into
// down, while eight consumer warps compute. An item is a ticket taken with an atomic counter: gate/up
// tiles (16 rows of gate and of up, one expert) first, then down pieces (one expert, a run of output
// rows). A down piece waits on its expert's readiness counter, which the blocks that quantise its
// SwiGLU rows release group by group; because every gate/up ticket is handed out before any down
// ticket, and only running blocks take tickets, the rows a down piece waits for are always owned by
// running blocks that wait on nothing: no deadlock, however many blocks are resident (another launch
// may hold SMs).
//
// Bits: each output is computed with moe_fp8_decode.cu's arithmetic (the same groups per warp, 8
// warps for gate/up and 4 per tile for down, the same warp-order sums, the same SwiGLU quantisation
// and the same ascending-expert weighted sum), so the results equal moe_route + moe_experts bit for
// bit (the CudaMoe tests compare them). The mma columns are tokens here, not an expert's rows: a
// column's result depends only on its own activations, and the columns of tokens an expert did not get
// are computed and dropped (at most 8 columns, one n8 tile, cost the same).
//
// Measured (H100, bench_cuda_next_ops, Qwen3-Next's MoE shapes, batch 1; Q3N_MOE_FUSED_TRACE=PATH
// writes each block's timeline of one eager call to PATH.<tokens>):
//   - two calls 31 us; this launch first 70 us, now 46 us (4 stages; 6 are slower).
//   - Start-up: straight-line code runs at instruction-fetch speed the first time on each SM (x's
//     quantisation unrolled over 4 groups took 11 us; moved to the prologue). Routing still takes
//     ~5 us and the slot tables ~3 us before the first copy is issued; the first data lands at ~13 us.
//   - Streaming: the blocks move in lock-step waves of ~4-8 us per 64 KB item, ~1.3-1.5 TB/s, far
//     from the 3.0 TB/s that one block per SM streaming its own contiguous slice reaches (a probe with
//     the same ring); the old path streams at about the same rate. Per-stage scale loads from global
//     memory were moved to cp.async copies beside the weights: no change.
//
// Counters (cleared by the prologue, so a poisoned or reused workspace is fine): the ticket counter, a
// ticket per (expert slot, 128-column group) of the SwiGLU rows, a readiness count per slot, and a
// ticket per stage-sized run of output rows whose last holder adds the experts' rows into y.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <mutex>
#include <string>
#include <vector>

#include "core/error.h"
#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/device_buffer.h"
#include "cuda/device_info.h"
#include "cuda/moe_common.cuh"
#include "cuda/moe_internal.h"
#include "cuda/moe_route_token.cuh"

namespace q3n::cuda::moe {
namespace {

constexpr int kConsumerWarps = 8;
constexpr int kConsumers = kConsumerWarps * 32;
constexpr int kThreads = kConsumers + 32;  // the last warp's lane 0 issues the copies
constexpr int kTileN = 16;                 // weight rows of an m16 tile
constexpr int kMaxGpw = 4;                 // 128-wide groups per warp (fp8_decode_applicable's bound)
constexpr int kMaxStages = 8;
constexpr int kStagesWanted = 4;
constexpr int kMaxPicks = kFusedDecodeMaxTokens * 16;  // tokens x top_k
constexpr int kMaxSlots = kMaxPicks + 1;         // experts with tokens, then the shared expert
constexpr int kDownStagesPerItem = 2;            // a down item's bytes match a gate/up item's (two stages)

struct FusedParams {
    const float* logits;
    int logits_ld;
    int E, top_k, tokens, route_per;
    bool renormalize;
    const __half* xq;  // [tokens, hidden] x quantised by prologue_kernel, and its scales
    const float* xs;
    int hidden;
    const DeviceMoeExpert* experts;  // E routed, then the shared expert
    bool shared;
    int inter, shared_inter, width;  // width: the SwiGLU rows' stride, max(inter, shared_inter)
    const float* shared_gate;
    int sg_ld;
    float* h;      // [rows, width] SwiGLU rows (moe_fp8_decode.cu's permuted rows)
    __half* hq;    // [rows, width] and their scales [rows, wg]
    float* hs;
    float* o;      // [rows, hidden] expert outputs
    float* y;
    int32_t* next_item;      // the ticket counter
    int32_t* group_tickets;  // [kMaxSlots][wg]
    int32_t* ready;          // [kMaxSlots]
    int32_t* sum_tickets;    // [hidden / down_rows]
    int wg;                  // ceil(width / 128)
    int stages, stage_bytes, down_rows;  // down_rows: output rows a stage holds (a multiple of 16)
    unsigned long long* trace;           // Q3N_MOE_FUSED_TRACE: per block [entry, tables, wait, n, (item, begin, end)...]
};
constexpr int kTraceWords = 256;

// The routing every block derives for itself, in shared memory.
struct Tables {
    int32_t pick_e[kMaxPicks];  // route_token's picks, token-major, best first
    float pick_w[kMaxPicks];
    int32_t pick_slot[kMaxPicks];
    int32_t first_of_expert[kMaxPicks];  // 1 where the pick is its expert's first
    int32_t sorted_row[kMaxPicks];       // token t's picks by ascending expert: permuted row, weight
    float sorted_w[kMaxPicks];
    int32_t slot_expert[kMaxSlots];
    uint32_t slot_mask[kMaxSlots];  // bit t: token t has the expert
    int32_t slot_first[kMaxSlots];  // the slot's first permuted row
    int32_t stage_item[kMaxStages];
    float stage_scales[kMaxStages][32];  // the stage's weight-block scales (one 128-row block, <= 32 groups)
    int n_routed;  // slots of routed experts
    int flag;
};

__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumers) : "memory"); }

// The cross-block handoffs: every consumer thread writes, the consumers synchronise, then thread 0
// alone publishes (release) or takes a ticket (acquire and release); after the next consumer barrier
// the others read what the ticket guards through L2. One fence-carrying operation per handoff rather
// than a __threadfence() in every thread.
__device__ __forceinline__ int32_t ticket_acq_rel(int32_t* p) {
    int32_t old;
    asm volatile("atom.add.acq_rel.gpu.global.s32 %0, [%1], 1;\n" : "=r"(old) : "l"(p) : "memory");
    return old;
}
__device__ __forceinline__ void publish_release(int32_t* p) {
    asm volatile("red.add.release.gpu.global.s32 [%0], 1;\n" ::"l"(p) : "memory");
}
__device__ __forceinline__ int32_t load_acquire(const int32_t* p) {
    int32_t v;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ uint64_t global_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
    return t;
}

// Groups per warp as moe_fp8_decode.cu's launches instantiate them (1, 2 or 4, from the widest K of
// the matrix kind, not the expert's own): the same split of K over the warps gives the same sums.
__device__ __forceinline__ int launched_gpw(int gpw) { return gpw <= 1 ? 1 : gpw <= 2 ? 2 : 4; }

__device__ void route_any(int per, const float* l, int E, int k, bool renorm, int32_t* et, float* wt) {
    switch (per) {
        case 1: route_token<1>(l, E, k, renorm, et, wt, nullptr); break;
        case 2: route_token<2>(l, E, k, renorm, et, wt, nullptr); break;
        case 4: route_token<4>(l, E, k, renorm, et, wt, nullptr); break;
        case 8: route_token<8>(l, E, k, renorm, et, wt, nullptr); break;
        case 16: route_token<16>(l, E, k, renorm, et, wt, nullptr); break;
        default: route_token<32>(l, E, k, renorm, et, wt, nullptr); break;
    }
}

// The B fragments and the two columns' scales of one 128-wide group g for this lane, from f16
// activation rows (row_of_gid: the row of this lane's column gid, or -1 for none; srow0 / srow1: the
// rows of columns 2 tig and 2 tig + 1), read through L2: another block of this launch, or the prologue,
// wrote them.
__device__ __forceinline__ void load_group_b(const __half* q, const float* scales, int ld, int sld, int K, int g,
                                             int row_of_gid, int srow0, int srow1, uint32_t (&b)[2][4][2],
                                             float& s0, float& s1) {
    const int tig = threadIdx.x & 3;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        uint4 q0 = make_uint4(0, 0, 0, 0), q1 = q0;
        const int k = g * 128 + h * 64 + tig * 16;
        if (row_of_gid >= 0 && k < K) {
            const uint4* src = reinterpret_cast<const uint4*>(q + static_cast<size_t>(row_of_gid) * ld + k);
            q0 = __ldcg(src);
            q1 = __ldcg(src + 1);
        }
        b_fragments(q0, q1, b[h]);
    }
    s0 = srow0 >= 0 ? __ldcg(scales + static_cast<size_t>(srow0) * sld + g) : 0.0f;
    s1 = srow1 >= 0 ? __ldcg(scales + static_cast<size_t>(srow1) * sld + g) : 0.0f;
}

// acc += the m16 tile at `ra` (this lane's row gid, byte tig * 16; row stride K) times the warp's
// groups [g0, g1) of B: expert_gemv's loop over mma_scale_group.
__device__ __forceinline__ void tile_groups(float (&acc)[4], const unsigned char* ra, int K, int g0, int g1,
                                            const uint32_t (&b)[kMaxGpw][2][4][2], const float (&sa0)[kMaxGpw],
                                            const float (&sa1)[kMaxGpw], const float* wscale) {
#pragma unroll
    for (int i = 0; i < kMaxGpw; ++i) {
        const int g = g0 + i;
        if (g >= g1) break;
        mma_scale_group(acc, ra, K, g, b[i], sa0[i], sa1[i], wscale[g]);
    }
}

// Clears the counters and quantises x (moe_fp8_decode.cu's prologue rule: one warp a 128-channel
// group, f16 values of the e4m3 codes), for the fused kernel to read after its wait.
constexpr int kPrologueWarps = 8;
__global__ void __launch_bounds__(kPrologueWarps * 32)
    prologue_kernel(const float* x, int T, int H, __half* xq, float* xs, int32_t* counters, int n) {
    // The wait comes first: the fused kernel, launched after this one, reads the router's logits before
    // its own wait, which is safe only once every block here has returned from this one.
    pdl_wait();
    pdl_launch_dependents();
    const int groups = (H + 127) / 128, item = blockIdx.x * kPrologueWarps + (threadIdx.x >> 5);
    if (item < T * groups) {
        const int t = item / groups, g = item - t * groups;
        quantize_group_f16_warp<false>(x + static_cast<size_t>(t) * H, H, g, xq + static_cast<size_t>(t) * H,
                                       xs + static_cast<size_t>(t) * groups + g);
    }
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) counters[i] = 0;
}

__global__ void __launch_bounds__(kThreads, 1) fused_kernel(FusedParams P) {
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ __align__(8) uint64_t full[kMaxStages], empty[kMaxStages];
    __shared__ Tables tb;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tig = lane & 3;
    const int T = P.tokens, H = P.hidden, K1 = P.top_k, n_picks = T * K1, NS = P.stages;
    float* red = reinterpret_cast<float*>(smem + static_cast<size_t>(NS) * P.stage_bytes);  // [2][8 warps][32][4]

    unsigned long long* trace = P.trace ? P.trace + static_cast<size_t>(blockIdx.x) * kTraceWords : nullptr;
    if (trace && tid == 0) trace[0] = global_ns();
    if (tid == 0) {
        for (int s = 0; s < NS; ++s) {
            // full: the issuing lane's expect_tx arrival plus one per producer lane once its scale copies land
            asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(full + s)), "n"(33) : "memory");
            asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(empty + s)), "n"(kConsumerWarps)
                         : "memory");
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        if (trace) trace[240] = global_ns();
    }

    __syncthreads();  // the barriers are initialised

    if (warp == kConsumerWarps) {
        // The producer warp takes its first ticket while the consumers route. The ticket counter is step
        // data (cleared by prologue_kernel): after the wait.
        pdl_launch_dependents();
        if (lane == 0) {
            pdl_wait();
            tb.flag = atomicAdd(P.next_item, 1);
        }
    } else {
        // Before pdl_wait(): the router's logits. This launch follows prologue_kernel, whose blocks
        // return from their wait (the router GEMV, and so everything before it, complete) before they
        // let this one start: they are final. They are read through L2, as this SM's L1 may still hold
        // the previous layer's logits at the same addresses. Nothing is written to global memory before
        // the wait.
        if (warp < T)
            route_any(P.route_per, P.logits + static_cast<size_t>(warp) * P.logits_ld, P.E, K1, P.renormalize,
                      tb.pick_e + warp * K1, tb.pick_w + warp * K1);
        if (trace && tid == 0) trace[241] = global_ns();
        consumers_sync();
        // The slots: experts with tokens ascending (moe_route's active list), then the shared expert;
        // each slot's permuted rows (moe_route's order: by expert, tokens ascending).
        if (tid < n_picks) {
            const int e = tb.pick_e[tid];
            int first = 1;
            for (int j = 0; j < tid; ++j) first &= tb.pick_e[j] != e;
            tb.first_of_expert[tid] = first;
        }
        consumers_sync();
        if (tid < n_picks) {
            const int e = tb.pick_e[tid];
            int slot = 0;
            uint32_t mask = 0;
            for (int j = 0; j < n_picks; ++j) {
                const int ej = tb.pick_e[j];
                slot += tb.first_of_expert[j] && ej < e;
                if (ej == e) mask |= 1u << (j / K1);
            }
            tb.pick_slot[tid] = slot;
            if (tb.first_of_expert[tid]) {
                tb.slot_expert[slot] = e;
                tb.slot_mask[slot] = mask;
            }
        }
        consumers_sync();
        int routed = 0;
        for (int j = 0; j < n_picks; ++j) routed += tb.first_of_expert[j];
        if (tid == 0) tb.n_routed = routed;
        if (tid <= routed) {
            int first = 0;
            for (int q = 0; q < tid; ++q) first += __popc(tb.slot_mask[q]);
            if (tid == routed) {  // the shared expert's rows follow the routed ones, one per token
                tb.slot_expert[tid] = P.E;
                tb.slot_mask[tid] = (1u << T) - 1u;
                tb.slot_first[tid] = n_picks;
            } else {
                tb.slot_first[tid] = first;
            }
        }
        consumers_sync();
        if (tid < n_picks) {
            const int t = tid / K1, e = tb.pick_e[tid], q = tb.pick_slot[tid];
            int rank = 0;
            for (int j = t * K1; j < t * K1 + K1; ++j) rank += tb.pick_e[j] < e;
            tb.sorted_row[t * K1 + rank] = tb.slot_first[q] + __popc(tb.slot_mask[q] & ((1u << t) - 1u));
            tb.sorted_w[t * K1 + rank] = tb.pick_w[tid];
        }
    }
    __syncthreads();  // the tables are complete, and the first ticket taken
    const int n_routed = tb.n_routed;

    if (trace && tid == 0) trace[1] = global_ns();
    const int n_slots = n_routed + (P.shared ? 1 : 0);
    const int tiles_routed = (P.inter + kTileN - 1) / kTileN;
    const int n_gate_up = n_routed * tiles_routed + (P.shared ? (P.shared_inter + kTileN - 1) / kTileN : 0);
    const int item_rows = P.down_rows * kDownStagesPerItem;
    const int down_per_slot = (H + item_rows - 1) / item_rows;
    const int n_items = n_gate_up + n_slots * down_per_slot;
    auto expert_of = [&](int s) -> const DeviceMoeExpert& { return P.experts[s < n_routed ? tb.slot_expert[s] : P.E]; };
    auto gate_up_item = [&](int item, int& s, int& n0) {
        if (item < n_routed * tiles_routed) {
            s = item / tiles_routed;
            n0 = (item - s * tiles_routed) * kTileN;
        } else {
            s = n_routed;
            n0 = (item - n_routed * tiles_routed) * kTileN;
        }
    };
    auto stage_at = [&](int u) { return smem + static_cast<size_t>(u % NS) * P.stage_bytes; };

    if (warp == kConsumerWarps) {
        // The producer warp: lane 0 takes tickets and issues the weight copies; every lane copies one of
        // the stage's weight-block scales (cp.async) and arrives on the stage's barrier once it has landed.
        int u = 0;
        auto issue = [&](int item, const void* src, uint32_t bytes, const float* scale_row, int scale_cols) {
            const int st = u % NS;
            if (u >= NS) mbar_wait(empty + st, ((u / NS) - 1) & 1);
            if (lane == 0) {
                tb.stage_item[st] = item;
                mbar_arrive_expect(full + st, bytes);
                if (bytes) bulk_copy(stage_at(u), src, bytes, full + st);
            }
            if (lane < scale_cols)
                asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(&tb.stage_scales[st][lane])),
                             "l"(scale_row + lane)
                             : "memory");
            asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(full + st)) : "memory");
            ++u;
        };
        int item = __shfl_sync(0xffffffffu, tb.flag, 0);
        while (item < n_items) {
            int next = 0;
            if (lane == 0) next = atomicAdd(P.next_item, 1);  // in flight while this item's copies are issued
            if (item < n_gate_up) {
                int s, n0;
                gate_up_item(item, s, n0);
                const DeviceMoeExpert& ex = expert_of(s);
                const uint32_t bytes = static_cast<uint32_t>(min(kTileN, ex.gate.out - n0) * H);
                for (int m = 0; m < 2; ++m) {
                    const DeviceLinear& a = m == 0 ? ex.gate : ex.up;
                    issue(item, static_cast<const uint8_t*>(a.data) + static_cast<size_t>(n0) * H, bytes,
                          a.scales + (n0 >> 7) * a.scale_cols, a.scale_cols);
                }
            } else {
                const int d = item - n_gate_up, s = d / down_per_slot, r0 = (d - s * down_per_slot) * item_rows;
                const DeviceLinear& a = expert_of(s).down;
                for (int r = r0; r < min(H, r0 + item_rows); r += P.down_rows)
                    issue(item, static_cast<const uint8_t*>(a.data) + static_cast<size_t>(r) * a.in,
                          static_cast<uint32_t>(min(P.down_rows, H - r) * a.in), a.scales + (r >> 7) * a.scale_cols,
                          a.scale_cols);
            }
            item = __shfl_sync(0xffffffffu, next, 0);
        }
        issue(-1, nullptr, 0, nullptr, 0);  // the end, for the consumers
        return;
    }

    // Consumers: everything below reads or writes step data.
    pdl_wait();
    pdl_launch_dependents();
    // gate/up's activations: this warp's groups of x for every token (column = token), as B fragments
    // kept all along, with the scales of the lane's two columns.
    const int GH = (H + 127) / 128, gpw_u = launched_gpw((GH + kConsumerWarps - 1) / kConsumerWarps);
    const int ug0 = min(GH, warp * gpw_u), ug1 = min(GH, ug0 + gpw_u);
    uint32_t bx[kMaxGpw][2][4][2];
    float xs0[kMaxGpw], xs1[kMaxGpw];
#pragma unroll
    for (int i = 0; i < kMaxGpw; ++i) {
        const int g = ug0 + i;
        xs0[i] = xs1[i] = 0.0f;
        if (g < ug1)
            load_group_b(P.xq, P.xs, H, GH, H, g, gid < T ? gid : -1, 2 * tig < T ? 2 * tig : -1,
                         2 * tig + 1 < T ? 2 * tig + 1 : -1, bx[i], xs0[i], xs1[i]);
    }
    if (trace && tid == 0) trace[2] = global_ns();
    int traced = 0;
    const int out_r = tid & 15, out_c = (tid >> 4) & 7;  // a thread's (row, token) of a summed m16 tile
    const int out_l = (out_r & 7) * 4 + (out_c >> 1), out_i = (out_r >> 3) * 2 + (out_c & 1);
    auto row_of = [&](int s, int t) { return tb.slot_first[s] + __popc(tb.slot_mask[s] & ((1u << t) - 1u)); };
    int u = 0;
    auto wait_stage = [&]() {
        mbar_wait(full + u % NS, (u / NS) & 1);
        return stage_at(u);
    };
    auto release_stage = [&]() {
        __syncwarp();
        if (lane == 0) mbar_arrive(empty + u % NS);
        ++u;
    };

    int ready_slot = -1;  // the slot whose down activations bd holds
    uint32_t bd[kMaxGpw][2][4][2];
    float ds0[kMaxGpw], ds1[kMaxGpw];
    for (;;) {
        wait_stage();
        const int item = tb.stage_item[u % NS];
        if (item < 0) break;
        if (trace && tid == 0 && 6 + 3 * traced < 240) {
            trace[4 + 3 * traced] = item;
            trace[5 + 3 * traced] = global_ns();
        }
        if (item < n_gate_up) {
            int s, n0;
            gate_up_item(item, s, n0);
            const DeviceMoeExpert& ex = expert_of(s);
            const int N = ex.gate.out;
            float acc[2][4];
#pragma unroll
            for (int m = 0; m < 2; ++m) {
                const unsigned char* w = m == 0 ? stage_at(u) : wait_stage();
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[m][i] = 0.0f;
                tile_groups(acc[m], w + static_cast<size_t>(gid) * H + tig * 16, H, ug0, ug1, bx, xs0, xs1,
                            tb.stage_scales[u % NS]);
                release_stage();
            }
            consumers_sync();  // the previous readers of red are done
#pragma unroll
            for (int m = 0; m < 2; ++m)
                *reinterpret_cast<float4*>(red + ((m * kConsumerWarps + warp) * 32 + lane) * 4) =
                    make_float4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
            consumers_sync();
            if (tid < 128) {
                float res[2];
#pragma unroll
                for (int m = 0; m < 2; ++m) {
                    res[m] = 0.0f;
#pragma unroll
                    for (int w = 0; w < kConsumerWarps; ++w) res[m] += red[((m * kConsumerWarps + w) * 32 + out_l) * 4 + out_i];
                }
                const int row = n0 + out_r;
                if (row < N && out_c < T && (tb.slot_mask[s] >> out_c & 1u))
                    P.h[static_cast<size_t>(row_of(s, out_c)) * P.width + row] = silu_mul(res[0], res[1]);
            }
            // The blocks of one (slot, 128-column group) take tickets; the last quantises the group of
            // the slot's rows and counts it towards the slot's readiness.
            consumers_sync();
            const int g = n0 >> 7;
            if (tid == 0) {
                const int tiles = min(128 / kTileN, (N - g * 128 + kTileN - 1) / kTileN);
                tb.flag = ticket_acq_rel(P.group_tickets + s * P.wg + g) == tiles - 1;
            }
            consumers_sync();
            if (tb.flag) {
                const int rows = __popc(tb.slot_mask[s]);
                for (int r = warp; r < rows; r += kConsumerWarps) {
                    const size_t p = static_cast<size_t>(tb.slot_first[s] + r);
                    quantize_group_f16_warp<true>(P.h + p * P.width, N, g, P.hq + p * P.width, P.hs + p * P.wg + g);
                }
                consumers_sync();
                if (tid == 0) publish_release(P.ready + s);
            }
            if (trace && tid == 0 && 6 + 3 * traced < 240) trace[6 + 3 * traced++] = global_ns();
            continue;
        }

        // A down item: rows [r0, r0 + item_rows) of one slot's down projection, a stage at a time.
        const int d = item - n_gate_up, s = d / down_per_slot, r0 = (d - s * down_per_slot) * item_rows;
        const DeviceLinear& a = expert_of(s).down;
        const int K = a.in, GK = (K + 127) / 128, gpw_d = launched_gpw((P.wg + 3) / 4);
        const int dg0 = min(GK, (warp & 3) * gpw_d), dg1 = min(GK, dg0 + gpw_d);
        if (s != ready_slot) {
            if (tid == 0)
                while (load_acquire(P.ready + s) < GK) __nanosleep(64);
            consumers_sync();
            const uint32_t mask = tb.slot_mask[s];
            const int brow = gid < T && (mask >> gid & 1u) ? row_of(s, gid) : -1;
            const int c0 = 2 * tig, c1 = 2 * tig + 1;
            const int srow0 = c0 < T && (mask >> c0 & 1u) ? row_of(s, c0) : -1;
            const int srow1 = c1 < T && (mask >> c1 & 1u) ? row_of(s, c1) : -1;
#pragma unroll
            for (int i = 0; i < kMaxGpw; ++i) {
                const int g = dg0 + i;
                ds0[i] = ds1[i] = 0.0f;
                if (g < dg1) load_group_b(P.hq, P.hs, P.width, P.wg, K, g, brow, srow0, srow1, bd[i], ds0[i], ds1[i]);
            }
            ready_slot = s;
        }
        for (int r = r0; r < min(H, r0 + item_rows); r += P.down_rows) {
            const unsigned char* w = r == r0 ? stage_at(u) : wait_stage();
            const int rows = min(P.down_rows, H - r), tiles = (rows + kTileN - 1) / kTileN;
            // Tiles in pairs: warps 0-3 take the even one, 4-7 the odd one, each its groups of K.
            for (int p = 0; p < tiles; p += 2) {
                const int tile = p + (warp >> 2);
                float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                if (tile < tiles)
                    tile_groups(acc, w + static_cast<size_t>(tile * kTileN + gid) * K + tig * 16, K, dg0, dg1, bd, ds0,
                                ds1, tb.stage_scales[u % NS]);
                consumers_sync();
                *reinterpret_cast<float4*>(red + (warp * 32 + lane) * 4) = make_float4(acc[0], acc[1], acc[2], acc[3]);
                consumers_sync();
                const int half = tid >> 7, mine = p + half;
                if (mine < tiles) {
                    float res = 0.0f;
#pragma unroll
                    for (int w4 = 0; w4 < 4; ++w4) res += red[((half * 4 + w4) * 32 + out_l) * 4 + out_i];
                    const int row = r + mine * kTileN + out_r;
                    if (row < H && out_c < T && (tb.slot_mask[s] >> out_c & 1u))
                        P.o[static_cast<size_t>(row_of(s, out_c)) * H + row] = res;
                }
            }
            release_stage();

            // Every slot's piece of these rows takes a ticket; the last adds each token's experts.
            consumers_sync();
            if (tid == 0) tb.flag = ticket_acq_rel(P.sum_tickets + r / P.down_rows) == n_slots - 1;
            consumers_sync();
            if (tb.flag) {
                for (int i = tid; i < T * rows; i += kConsumers) {
                    const int t = i / rows, n = r + (i - t * rows);
                    float acc = 0.0f;
                    for (int j = 0; j < K1; ++j)
                        acc += tb.sorted_w[t * K1 + j] * __ldcg(P.o + static_cast<size_t>(tb.sorted_row[t * K1 + j]) * H + n);
                    if (P.shared) {
                        const float sg = 1.0f / (1.0f + expf(-P.shared_gate[static_cast<size_t>(t) * P.sg_ld]));
                        acc += sg * __ldcg(P.o + static_cast<size_t>(n_picks + t) * H + n);
                    }
                    P.y[static_cast<size_t>(t) * H + n] = acc;
                }
            }
        }
        if (trace && tid == 0 && 6 + 3 * traced < 240) trace[6 + 3 * traced++] = global_ns();
    }
    if (trace && tid == 0) trace[3] = traced;
}

int width_of(const DeviceMoe& m) { return m.has_shared ? std::max(m.inter, m.shared_inter) : m.inter; }

// The launch shape for a block: stage bytes (16 rows of gate at K = hidden, or a whole number of down
// tiles) and how many stages fit beside the partial-sum buffer. stages == 0: it does not fit.
struct Shape {
    int stage_bytes = 0, stages = 0, down_rows = 0;
    size_t smem = 0;
};

constexpr size_t kRedBytes = 2 * kConsumerWarps * 32 * 4 * sizeof(float);

Shape shape_of(const DeviceMoe& m) {
    Shape s;
    const int width = width_of(m);
    s.stage_bytes = kTileN * std::max(m.hidden, width);
    // A power of two of tiles, so that a stage's rows stay in one 128-row block of weight scales.
    const int fit = std::min(8, s.stage_bytes / (kTileN * width));
    s.down_rows = kTileN * (fit >= 8 ? 8 : fit >= 4 ? 4 : fit >= 2 ? 2 : 1);
    static std::mutex mu;
    static int optin[16] = {}, static_bytes = -1;
    int dev = 0;
    Q3N_CUDA(cudaGetDevice(&dev));
    {
        std::lock_guard<std::mutex> lock(mu);
        if (dev < 16 && optin[dev] == 0)
            Q3N_CUDA(cudaDeviceGetAttribute(&optin[dev], cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
        if (static_bytes < 0) {
            cudaFuncAttributes attributes{};
            Q3N_CUDA(cudaFuncGetAttributes(&attributes, fused_kernel));
            static_bytes = static_cast<int>(attributes.sharedSizeBytes);
        }
    }
    const long avail = static_cast<long>(dev < 16 ? optin[dev] : 0) - static_bytes - static_cast<long>(kRedBytes);
    // Four stages: six (all that fit at hidden 2048) measured slower, their copies landing later.
    s.stages = static_cast<int>(std::min<long>(kStagesWanted, std::max<long>(0, avail / s.stage_bytes)));
    if (const char* env = std::getenv("Q3N_MOE_FUSED_STAGES")) s.stages = std::min(s.stages, std::atoi(env));
    if (s.stages < 2) s.stages = 0;
    s.smem = static_cast<size_t>(s.stages) * s.stage_bytes + kRedBytes;
    return s;
}

int slots_max(const DeviceMoe& m, int tokens) { return std::min(m.num_experts, tokens * m.top_k) + (m.has_shared ? 1 : 0); }

// Counters: the ticket counter, group tickets, readiness, row-run tickets, each kind starting a
// 128-byte line of its own (the readiness spin and the ticket atomics stay off each other's lines).
constexpr int kLine = 32;
int line_up(int n) { return (n + kLine - 1) / kLine * kLine; }
struct CounterLayout {
    int group_tickets, ready, sum_tickets, total;
};
CounterLayout counter_layout(const DeviceMoe& m, int tokens, int down_rows) {
    const int wg = (width_of(m) + 127) / 128, slots = slots_max(m, tokens);
    CounterLayout c;
    c.group_tickets = kLine;
    c.ready = c.group_tickets + line_up(slots * wg);
    c.sum_tickets = c.ready + line_up(slots);
    c.total = c.sum_tickets + (m.hidden + down_rows - 1) / down_rows;
    return c;
}

void write_trace(const DeviceBuffer& trace, int grid, const Shape& shape, const std::string& path, cudaStream_t stream) {
    std::vector<unsigned long long> h(size_t(grid) * kTraceWords);
    Q3N_CUDA(cudaStreamSynchronize(stream));
    Q3N_CUDA(cudaMemcpy(h.data(), trace.get(), h.size() * 8, cudaMemcpyDeviceToHost));
    FILE* f = std::fopen(path.c_str(), "w");
    if (!f) return;
    std::fprintf(f, "stages %d stage_bytes %d down_rows %d\n", shape.stages, shape.stage_bytes, shape.down_rows);
    for (int b = 0; b < grid; ++b) {
        const unsigned long long* t = h.data() + size_t(b) * kTraceWords;
        std::fprintf(f, "block %d entry %llu tables %llu wait %llu n %llu start %lld %lld 0 0", b, t[0], t[1], t[2], t[3],
                     (long long)(t[240] - t[0]), (long long)(t[241] - t[0]));
        for (unsigned long long i = 0; i < t[3] && 6 + 3 * i < kTraceWords; ++i)
            std::fprintf(f, " %llu:%llu:%llu", t[4 + 3 * i], t[5 + 3 * i], t[6 + 3 * i]);
        std::fprintf(f, "\n");
    }
    std::fclose(f);
}

}  // namespace

bool fused_decode_applicable(const DeviceMoe& m, int tokens) {
    if (tokens < 1 || tokens > kFusedDecodeMaxTokens || tokens * m.top_k > kMaxPicks ||
        m.num_experts > 1024 || !fp8_decode_applicable(m))
        return false;
    return shape_of(m).stages > 0;
}

size_t fused_decode_scratch_bytes(const DeviceMoe& m, int tokens) {
    const int t = std::min(tokens, kFusedDecodeMaxTokens);
    return static_cast<size_t>(counter_layout(m, t, kTileN).total) * sizeof(int32_t);  // kTileN: the most row runs
}

void fused_decode(const float* logits, int logits_ld, const float* x, const DeviceMoe& m, const Dims& d,
                  bool renormalize, const float* shared_gate, int sg_ld, float* y, const Workspace& w,
                  cudaStream_t stream) {
    const Shape shape = shape_of(m);
    const int width = width_of(m), wg = (width + 127) / 128;
    const CounterLayout layout = counter_layout(m, d.tokens, shape.down_rows);
    const int prologue_blocks = std::max((d.tokens * ((m.hidden + 127) / 128) + kPrologueWarps - 1) / kPrologueWarps, 1);
    Q3N_CUDA(launch_pdl(prologue_kernel, dim3(prologue_blocks), dim3(kPrologueWarps * 32), 0, stream, x, d.tokens,
                        m.hidden, static_cast<__half*>(w.xq), w.xs, w.decode, layout.total));

    FusedParams P{};
    P.logits = logits;
    P.logits_ld = logits_ld;
    P.E = m.num_experts;
    P.top_k = m.top_k;
    P.tokens = d.tokens;
    const int per = (m.num_experts + 31) / 32;
    P.route_per = per <= 1 ? 1 : per <= 2 ? 2 : per <= 4 ? 4 : per <= 8 ? 8 : per <= 16 ? 16 : 32;
    P.renormalize = renormalize;
    P.xq = static_cast<const __half*>(w.xq);
    P.xs = w.xs;
    P.hidden = m.hidden;
    P.experts = m.experts;
    P.shared = m.has_shared;
    P.inter = m.inter;
    P.shared_inter = m.shared_inter;
    P.width = width;
    P.shared_gate = shared_gate;
    P.sg_ld = sg_ld;
    P.h = w.h;
    P.hq = static_cast<__half*>(w.hq);
    P.hs = w.hs;
    P.o = w.o;
    P.y = y;
    P.next_item = w.decode;
    P.group_tickets = w.decode + layout.group_tickets;
    P.ready = w.decode + layout.ready;
    P.sum_tickets = w.decode + layout.sum_tickets;
    P.wg = wg;
    P.stages = shape.stages;
    P.stage_bytes = shape.stage_bytes;
    P.down_rows = shape.down_rows;
    allow_shared_memory(reinterpret_cast<const void*>(fused_kernel), shape.smem);
    const int grid = sm_count();
    // Q3N_MOE_FUSED_TRACE=PATH: each block's timeline of this call to PATH.<tokens> (eager calls only:
    // it synchronises; a diagnostic, see "Measured" at the top).
    const char* trace_path = std::getenv("Q3N_MOE_FUSED_TRACE");
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (trace_path) Q3N_CUDA(cudaStreamIsCapturing(stream, &capture));
    DeviceBuffer trace;
    if (trace_path && capture == cudaStreamCaptureStatusNone) {
        trace = DeviceBuffer(size_t(grid) * kTraceWords * 8);
        Q3N_CUDA(cudaMemsetAsync(trace.get(), 0, trace.bytes(), stream));
        P.trace = static_cast<unsigned long long*>(trace.get());
    }
    Q3N_CUDA(launch_pdl(fused_kernel, dim3(grid), dim3(kThreads), shape.smem, stream, P));
    if (P.trace) write_trace(trace, grid, shape, std::string(trace_path) + "." + std::to_string(d.tokens), stream);
}

}  // namespace q3n::cuda::moe
