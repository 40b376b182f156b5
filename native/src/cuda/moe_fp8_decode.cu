// The FP8 experts at decode sizes (up to kFp8DecodeMaxTokens tokens) on tensor cores, three launches:
//   1. prologue: x quantised once per token (quantize_fp8's rule, f16 values), this step's counters
//      zeroed, and each token's picks listed by ascending permuted row, i.e. ascending expert;
//   2. gate/up with SwiGLU over all (expert that got tokens, 16-row weight tile) pairs; the last block
//      to finish a 128-column group of an expert quantises that group of its SwiGLU rows for down;
//   3. down over all (expert, 32-row tile) pairs; the last block to finish a 32-column tile of the
//      output adds each token's expert rows in ascending expert order (cpu::moe_forward's order, then
//      Qwen3-Next's shared term) into y.
// "Last" is an atomic ticket taken after a fence, so the work it gates reads complete results, and
// every sum has a fixed order whatever the schedule: results repeat bit for bit.
//
// Grid: x = a tile of weight rows (gate/up: 16 of each, one m16 tile; down: two m16 tiles, see
// down_tiles_per_block), y = a slot in
// moe_route's list of experts that got tokens, plus the shared expert's slot last. Slots past the
// number of active experts exit at once: the grid depends on the token count only, so a captured
// graph serves every routing.
//
// One thread copies the block's weight rows (contiguous in memory for each matrix) into shared
// memory with one bulk (TMA) copy per matrix as soon as the block starts, before pdl_wait(): the
// routing is final by then (routing_before_wait), so down's copies can land while gate/up's last blocks
// still run, and gate/up's while the prologue does. The copy engine keeps the whole tile in flight,
// 64 KB for gate/up at hidden 2048 with 3 blocks to an SM; gate's and up's copies complete on
// separate barriers, so gate's tile converts while up's still lands. (Per-thread 16-byte copies
// measured slower, and a bulk copy per row and group, to overlap conversion with arrival, slower
// still: 128-byte bulk copies are inefficient.) The warps split K by 128-wide scale groups
// and take the expert's rows 8 at a time as the n8 side of mma m16n8k16 (linear_fp8_mma.cu's
// arithmetic: weights to f16 with integer ops, activations e4m3 values held exactly in f16, fp32
// accumulators scaled per group by the activation's and the weight block's scales, spec 5.4), and the
// warps' partial rows are added in shared memory in warp order, one m16 tile at a time. Gate/up runs
// 8 warps a block; down, whose tiles are small (24 KB a block at I = 768) and many, 4, so that one
// wave of blocks covers a token.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/moe_common.cuh"
#include "cuda/moe_internal.h"

namespace q3n::cuda::moe {
namespace {

constexpr int kTileN = 16;   // weight rows per matrix and block
constexpr int kColTile = 8;  // expert rows per pass (the mma's n)
constexpr int kPrologueWarps = 8;

template <bool kGateUp>
constexpr int kWarps = kGateUp ? 8 : 4;

struct Params {
    Dims d;
    const DeviceMoeExpert* experts;
    const int32_t* offsets;
    const int32_t* order;
    const int32_t* active;
    const __half* act_q;  // quantised activation rows: x (gate/up) or the SwiGLU rows (down)
    const float* act_s;   //   and their group scales
    int act_ld;           // elements per activation row
    int act_sld;          // scales per activation row
    float* out;
    int out_ld;
    int k_max;          // the longest K of the block's experts: the weight tile's row count bound
    int32_t* counters;  // gate/up: [slots][h_groups]; down: [tiles]
    // gate/up: the SwiGLU rows' quantisation
    __half* hq;
    float* hs;
    int h_groups;
    // down: the weighted sum
    const int2* picks;  // [tokens][k]: (permuted row, weight bits) by ascending row
    const float* shared_gate;  // token t's logit at shared_gate[t * sg_ld]
    int sg_ld;
    float* y;
    bool copy_before_wait;  // Q3N_MOE_EARLY_COPY=0 clears it (for measuring what it gains)
};

template <bool kGateUp>
size_t smem_bytes(int k_max, int sub) {
    constexpr size_t warps = kWarps<kGateUp>, mats = kGateUp ? 2 : 1;
    return mats * kTileN * static_cast<size_t>(sub) * k_max + warps * 32 * 4 * sizeof(float);
}

// Whether the expert blocks start their weight copies before pdl_wait(): on unless
// Q3N_MOE_EARLY_COPY=0 (for measuring what it gains).
bool copy_before_wait() {
    static const bool on = [] {
        const char* env = std::getenv("Q3N_MOE_EARLY_COPY");
        return !(env && std::strcmp(env, "0") == 0);
    }();
    return on;
}

// Down's m16 tiles per block. One tile a block gave Qwen3-Next's down (hidden 2048 over 10 experts and
// the shared one) 1408 blocks against 1056 resident (8 an SM): 1.33 waves of short blocks, each paying
// its start, expert lookup and copy latency. Two (32 rows, one 16 KB copy) make it 704 blocks in one
// wave; every output is still the same tile's code, groups and warp-order sum, so the results are the
// same bits. Q3N_MOE_DOWN_TILES=1 keeps one (for measuring what two gain).
int down_tiles_per_block() {
    static const int tiles = [] {
        const char* env = std::getenv("Q3N_MOE_DOWN_TILES");
        return env && std::strcmp(env, "1") == 0 ? 1 : 2;
    }();
    return tiles;
}

// A read of moe_route's output (active, offsets) before pdl_wait(), an exception to common.cuh's PDL
// contract that holds for the two expert launches alone. moe_route runs before the prologue, the
// prologue before gate/up, gate/up before down; each of these blocks calls pdl_wait() before
// pdl_launch_dependents(). So a gate/up block starts only after every prologue block has returned
// from its wait, i.e. after moe_route has completed and its writes have reached L2, and a down block
// only after every gate/up block has, which is later still. The load goes to L2 (ld.cg) because this
// SM's L1 may still hold the previous layer's routing at the same addresses.
__device__ __forceinline__ int32_t routing_before_wait(const int32_t* p) { return __ldcg(p); }

__global__ void __launch_bounds__(kPrologueWarps * 32)
    prologue_kernel(const float* x, Dims d, int groups, __half* xq, float* xs, const int32_t* position,
                    const float* weights, int2* picks, int32_t* counters, int n_counters) {
    pdl_wait();
    pdl_launch_dependents();
    const int item = blockIdx.x * kPrologueWarps + (threadIdx.x >> 5);
    if (item < d.tokens * groups) {
        const int t = item / groups, g = item - t * groups;
        quantize_group_f16_warp<false>(x + static_cast<size_t>(t) * d.hidden, d.hidden, g,
                                       xq + static_cast<size_t>(t) * d.hidden, xs + static_cast<size_t>(t) * groups + g);
    }
    const int id = blockIdx.x * blockDim.x + threadIdx.x, stride = gridDim.x * blockDim.x;
    for (int i = id; i < n_counters; i += stride) counters[i] = 0;
    for (int i = id; i < d.routed_rows; i += stride) {
        const int t = i / d.k, p = position[i];
        const int32_t* mine = position + static_cast<size_t>(t) * d.k;
        int rank = 0;  // positions of one token are distinct
        for (int j = 0; j < d.k; ++j) rank += mine[j] < p;
        picks[static_cast<size_t>(t) * d.k + rank] = make_int2(p, __float_as_int(weights[i]));
    }
}

// kGpw: scale groups per warp (K <= 128 * kGpw * warps); kSub: m16 tiles per block (down only).
// Register caps let 3 gate/up blocks or 8 (one tile) or 6 (two tiles) down blocks share an SM.
template <bool kGateUp, int kGpw, int kSub>
__global__ void __launch_bounds__(kWarps<kGateUp> * 32, kGateUp ? 3 : (kSub == 1 ? 8 : 6)) expert_gemv(Params P) {
    static_assert(!kGateUp || kSub == 1, "gate/up blocks take one tile");
    constexpr int kMats = kGateUp ? 2 : 1, kW = kWarps<kGateUp>, kRows = kTileN * kSub;
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ __align__(8) uint64_t weights_in[kMats];  // gate's tile is used while up's still lands
    __shared__ int last;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    unsigned char* wsm = smem;  // [matrix][kRows rows][K], as in memory
    float* red = reinterpret_cast<float*>(smem + static_cast<size_t>(kMats) * kRows * P.k_max);
    if (threadIdx.x < kMats) mbar_init(weights_in + threadIdx.x, 1);
    __syncthreads();

    const Dims& d = P.d;
    const int slot = blockIdx.y, n0 = blockIdx.x * kRows;
    const bool shared_slot = d.shared && slot == static_cast<int>(gridDim.y) - 1;

    // The expert's matrices, this warp's groups [g0, g1) of K, their pieces in flight.
    const uint8_t* wdata[kMats];
    const float* wscale[kMats];
    int N = 0, K = 0, scale_cols = 0, g0 = 0, g1 = 0;
    auto issue = [&](const DeviceMoeExpert& ex) {
        const DeviceLinear& a = kGateUp ? ex.gate : ex.down;
        N = a.out;
        K = a.in;
        scale_cols = a.scale_cols;
        wdata[0] = static_cast<const uint8_t*>(a.data);
        wscale[0] = a.scales;
        if constexpr (kGateUp) {
            wdata[kMats - 1] = static_cast<const uint8_t*>(ex.up.data);
            wscale[kMats - 1] = ex.up.scales;
        }
        const int G = (K + 127) / 128;
        g0 = min(G, warp * kGpw);
        g1 = min(G, g0 + kGpw);
        if (threadIdx.x == 0 && n0 < N) {
            const uint32_t bytes = static_cast<uint32_t>(min(kRows, N - n0) * K);  // rows past N are never loaded
#pragma unroll
            for (int m = 0; m < kMats; ++m) {
                mbar_arrive_expect(weights_in + m, bytes);
                bulk_copy(wsm + static_cast<size_t>(m) * kRows * K, wdata[m] + static_cast<size_t>(n0) * K, bytes,
                          weights_in + m);
            }
        }
    };

    // The weights go in flight before pdl_wait(): the routing that names the expert is final by the
    // time this block runs (see routing_before_wait), so the copy overlaps the previous launch's tail.
    int first = 0, count = 0;
    bool work = true;
    auto find_expert = [&] {
        if (shared_slot) {
            first = d.routed_rows;
            count = d.tokens;
            issue(P.experts[d.E]);
            return;
        }
        // slot < E: both loads in bounds, and in flight at once
        const int used = routing_before_wait(P.active), e = routing_before_wait(P.active + 1 + slot);
        if (slot < used) {
            first = routing_before_wait(P.offsets + e);
            count = routing_before_wait(P.offsets + e + 1) - first;
            issue(P.experts[e]);
        } else {
            work = false;
        }
    };
    if (P.copy_before_wait) find_expert();
    pdl_wait();
    pdl_launch_dependents();
    if (!P.copy_before_wait) find_expert();
    if (n0 >= N) work = false;  // nothing was issued
    // Bytes of the tile that are never loaded (rows past N, the end of a short group) convert to finite
    // f16 values (e4m3_pair_to_f16x2) and only meet zero activations or feed outputs nobody writes.

    if (work) {
        // Output (n0 + r, column c0 + c) of the cross-warp sum, for the first 128 threads.
        const int out_r = threadIdx.x & 15, out_c = threadIdx.x >> 4;
        const int out_l = (out_r & 7) * 4 + (out_c >> 1), out_i = (out_r >> 3) * 2 + (out_c & 1);
        for (int c0 = 0; c0 < count; c0 += kColTile) {
            const int nrows = min(kColTile, count - c0);
            auto act_row = [&](int c) {
                const int p = first + c0 + c;
                return kGateUp ? token_of_row(d, P.order, p) : p;
            };
            const __half* brow = gid < nrows ? P.act_q + static_cast<size_t>(act_row(gid)) * P.act_ld : nullptr;
            const float* srow0 = 2 * tig < nrows ? P.act_s + static_cast<size_t>(act_row(2 * tig)) * P.act_sld : nullptr;
            const float* srow1 =
                2 * tig + 1 < nrows ? P.act_s + static_cast<size_t>(act_row(2 * tig + 1)) * P.act_sld : nullptr;

            // B fragments of group g: this lane's 16 activations of each 64-wide half (column gid).
            auto load_b = [&](int g, uint32_t (&b)[2][4][2]) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    uint4 q0 = make_uint4(0, 0, 0, 0), q1 = q0;
                    const int k = g * 128 + h * 64 + tig * 16;
                    if (brow && k < K) {
                        const uint4* src = reinterpret_cast<const uint4*>(brow + k);
                        q0 = src[0];
                        q1 = src[1];
                    }
                    b_fragments(q0, q1, b[h]);
                }
            };

            // All of the warp's B fragments first (from L2), then each matrix as its tile lands.
            uint32_t b[kGpw][2][4][2];
#pragma unroll
            for (int i = 0; i < kGpw; ++i)
                if (g0 + i < g1) load_b(g0 + i, b[i]);
            float acc[kMats][kSub][4];
#pragma unroll
            for (int m = 0; m < kMats; ++m) {
                if (c0 == 0) mbar_wait(weights_in + m, 0);
#pragma unroll
                for (int sub = 0; sub < kSub; ++sub) {
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[m][sub][i] = 0.0f;
                const unsigned char* ra = wsm + static_cast<size_t>(m * kRows + sub * kTileN + gid) * K + tig * 16;
#pragma unroll
                for (int i = 0; i < kGpw; ++i) {
                    const int g = g0 + i;
                    if (g >= g1) break;
                    mma_scale_group(acc[m][sub], ra, K, g, b[i], srow0 ? srow0[g] : 0.0f, srow1 ? srow1[g] : 0.0f,
                                    wscale[m][(n0 >> 7) * scale_cols + g]);
                }
                }
            }

            // C fragment: acc[m][sub][0..1] = row gid, columns 2 tig, 2 tig + 1; [2..3] = row gid + 8.
#pragma unroll
            for (int sub = 0; sub < kSub; ++sub) {
                float res[kMats];
#pragma unroll
                for (int m = 0; m < kMats; ++m) {
                    __syncthreads();  // the previous readers of red are done
                    *reinterpret_cast<float4*>(red + (warp * 32 + lane) * 4) =
                        make_float4(acc[m][sub][0], acc[m][sub][1], acc[m][sub][2], acc[m][sub][3]);
                    __syncthreads();
                    res[m] = 0.0f;
                    if (threadIdx.x < 128)
#pragma unroll
                        for (int w = 0; w < kW; ++w) res[m] += red[(w * 32 + out_l) * 4 + out_i];
                }
                const int row = n0 + sub * kTileN + out_r;
                if (threadIdx.x < 128 && row < N && out_c < nrows) {
                    float* o = P.out + static_cast<size_t>(first + c0 + out_c) * P.out_ld + row;
                    if constexpr (kGateUp)
                        *o = silu_mul(res[0], res[kMats - 1]);
                    else
                        *o = res[0];
                }
            }
        }
        if (count <= 0)  // no copy may land in shared memory after the block is gone
            for (int m = 0; m < kMats; ++m) mbar_wait(weights_in + m, 0);
    }

    if constexpr (kGateUp) {
        // The blocks of one (expert, 128-column group) take tickets; the last quantises the group.
        if (!work) return;
        __threadfence();
        __syncthreads();
        const int g = n0 >> 7;
        if (threadIdx.x == 0) {
            const int tiles = min(128 / kTileN, (N - g * 128 + kTileN - 1) / kTileN);
            last = atomicAdd(P.counters + slot * P.h_groups + g, 1) == tiles - 1;
        }
        __syncthreads();
        if (!last) return;
        __threadfence();
        for (int r = warp; r < count; r += kW) {
            const size_t p = static_cast<size_t>(first + r);
            quantize_group_f16_warp<true>(P.out + p * P.out_ld, N, g, P.hq + p * P.out_ld, P.hs + p * P.h_groups + g);
        }
    } else {
        // Every block of a 16-column tile takes a ticket, with or without an expert; the last sums.
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) last = atomicAdd(P.counters + blockIdx.x, 1) == static_cast<int>(gridDim.y) - 1;
        __syncthreads();
        if (!last) return;
        __threadfence();
        const int H = d.hidden, cols = min(kRows, H - n0);
        for (int i = threadIdx.x; i < d.tokens * kRows; i += blockDim.x) {
            const int t = i / kRows, c = i - t * kRows, n = n0 + c;
            if (c >= cols) continue;
            const int2* pk = P.picks + static_cast<size_t>(t) * d.k;
            float acc = 0.0f;
            for (int j = 0; j < d.k; ++j) {
                const int2 q = pk[j];
                acc += __int_as_float(q.y) * __ldcg(P.out + static_cast<size_t>(q.x) * H + n);
            }
            if (d.shared) {
                const float sg = 1.0f / (1.0f + expf(-P.shared_gate[static_cast<size_t>(t) * P.sg_ld]));
                acc += sg * __ldcg(P.out + static_cast<size_t>(d.routed_rows + t) * H + n);
            }
            P.y[static_cast<size_t>(t) * H + n] = acc;
        }
    }
}

// rows: the block's weight rows (kTileN * tiles per block); blocks: along N.
template <bool kGateUp, int kSub>
void launch(const Params& P, int gpw, int rows, int slots, cudaStream_t stream) {
    const int blocks = (rows + kTileN * kSub - 1) / (kTileN * kSub);
    auto go = [&](auto kernel) {
        const size_t smem = smem_bytes<kGateUp>(P.k_max, kSub);
        allow_shared_memory(reinterpret_cast<const void*>(kernel), smem);
        Q3N_CUDA(launch_pdl(kernel, dim3(blocks, slots), dim3(kWarps<kGateUp> * 32), smem, stream, P));
    };
    if (gpw <= 1)
        go(expert_gemv<kGateUp, 1, kSub>);
    else if (gpw <= 2)
        go(expert_gemv<kGateUp, 2, kSub>);
    else
        go(expert_gemv<kGateUp, 4, kSub>);
}

template <bool kGateUp>
int groups_per_warp(int K) {
    return ((K + 127) / 128 + kWarps<kGateUp> - 1) / kWarps<kGateUp>;
}

// Slots (experts that can have tokens, plus the shared expert) and the counters they use.
int slots_of(const DeviceMoe& m, int tokens) {
    return std::min(m.num_experts, tokens * m.top_k) + (m.has_shared ? 1 : 0);
}
int counters_of(const DeviceMoe& m, int tokens) {
    const int width = m.has_shared ? std::max(m.inter, m.shared_inter) : m.inter;
    return slots_of(m, tokens) * ((width + 127) / 128) + (m.hidden + kTileN - 1) / kTileN;
}

}  // namespace

bool fp8_decode_applicable(const DeviceMoe& m) {
    const int inter = m.has_shared ? std::max(m.inter, m.shared_inter) : m.inter;
    return m.type == WeightType::FP8_E4M3 && m.hidden % 16 == 0 && m.inter % 16 == 0 &&
           (!m.has_shared || m.shared_inter % 16 == 0) && groups_per_warp<true>(m.hidden) <= 4 &&
           groups_per_warp<false>(inter) <= 4;
}

size_t fp8_decode_scratch_bytes(const DeviceMoe& m, int tokens) {
    const int t = std::min(tokens, kFp8DecodeMaxTokens);  // constant past the decode sizes: monotonic
    return std::max((static_cast<size_t>(counters_of(m, t)) + 1) / 2 * 8 + static_cast<size_t>(t) * m.top_k * sizeof(int2),
                    fused_decode_scratch_bytes(m, tokens));
}

void fp8_decode(const float* x, const DeviceMoe& m, const Dims& d, const MoeRouting& r, const float* shared_gate,
                int sg_ld, float* y, const Workspace& w, cudaStream_t stream) {
    const int T = d.tokens, H = d.hidden, slots = slots_of(m, T);
    const int hg = (H + 127) / 128, wg = (d.width + 127) / 128, n_counters = counters_of(m, T);
    int32_t* counters = w.decode;
    int2* picks = reinterpret_cast<int2*>(w.decode + (n_counters + 1) / 2 * 2);
    auto* xq = static_cast<__half*>(w.xq);
    auto* hq = static_cast<__half*>(w.hq);

    const int prologue_blocks = std::max((T * hg + kPrologueWarps - 1) / kPrologueWarps, 1);
    Q3N_CUDA(launch_pdl(prologue_kernel, dim3(prologue_blocks), dim3(kPrologueWarps * 32), 0, stream, x, d, hg, xq,
                        w.xs, r.position, r.weights, picks, counters, n_counters));

    Params P{};
    P.d = d;
    P.experts = m.experts;
    P.offsets = r.offsets;
    P.order = r.order;
    P.active = r.active;
    P.copy_before_wait = copy_before_wait();

    // gate/up -> SwiGLU rows, quantised group by group
    P.act_q = xq;
    P.act_s = w.xs;
    P.act_ld = H;
    P.act_sld = hg;
    P.out = w.h;
    P.out_ld = d.width;
    P.counters = counters;
    P.hq = hq;
    P.hs = w.hs;
    P.h_groups = wg;
    P.k_max = H;
    launch<true, 1>(P, groups_per_warp<true>(H), d.width, slots, stream);

    // down -> expert output rows -> y
    P.act_q = hq;
    P.act_s = w.hs;
    P.act_ld = d.width;
    P.act_sld = wg;
    P.out = w.o;
    P.out_ld = H;
    P.counters = counters + slots * wg;
    P.picks = picks;
    P.shared_gate = shared_gate;
    P.sg_ld = sg_ld;
    P.y = y;
    P.k_max = d.width;
    if (down_tiles_per_block() == 2)
        launch<false, 2>(P, groups_per_warp<false>(d.width), H, slots, stream);
    else
        launch<false, 1>(P, groups_per_warp<false>(d.width), H, slots, stream);
}

}  // namespace q3n::cuda::moe
