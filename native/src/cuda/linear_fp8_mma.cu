// Block-FP8 linear for decode-sized batches (M <= 16 rows per launch) on tensor cores with fp32 accumulation.
// Decoding e4m3 weights to fp32 on CUDA cores capped the weight stream at about 40% of bandwidth.
// Hopper has no FP8 mma.sync, so the weights become f16 with three integer instructions per pair
// (exact: an e4m3 value is an f16 value times 2^8) and run through f16 HMMA; the activations,
// e4m3 values widened to fp32 by quantize_fp8, are exact in f16 too, so every product is exact.
//
// Work split: a block computes 16 weight rows (one m16 tile) at a time; its warps (16, or 10 or 8
// where those divide K's groups evenly: warps_for) take the 128-wide scale groups in turn, then add
// their partial rows in shared memory in warp order. Every
// call size uses the same split (calls past 16 rows run as launches of 16), so a row's result does
// not depend on how many rows share the call. (Splitting K over clusters of 2-4 blocks, to even out
// N = 2560's 160 tiles over 132 SMs, measured slower on the H100: 49 -> 35% of the stream for
// o_proj, 59 -> 51% for down_proj; the blocks became too short for their cluster barriers.)
//
// Persistent blocks: where the staged activations and the warps' partial rows fit in 48 KB together,
// a launch starts only as many blocks as the device holds at once (for one column tile the kernel
// stays within 64 registers, so that two blocks of 16 warps, three of 10 or four of 8 share an SM), and
// each takes the tiles blockIdx.x, + gridDim.x, ... With one block per tile, gate|up's N = 19456 is
// 1216 blocks in several waves, and every block pays the costs of its start while its SM's weight
// stream waits on them: the wait for the activations, their staged copy (an L2 read of M x K values
// and a barrier), the first group's load latency. A persistent block pays them once, and each warp
// issues its first group of the block's next tile before the current tile's reduction, so the
// stream goes on across tile boundaries. On the H100 (Qwen3-4B FP8, one row): q|k|v 8.66 -> 8.48 us,
// o 7.18 -> 6.55, gate|up 23.17 -> 21.75, down 14.14 -> 12.40. Every tile is still computed by the
// same code, with the same groups per warp in the same order and the same warp-order reduction:
// results equal the one-block-per-tile launch bit for bit (Q3N_GEMV_PERSISTENT=0 selects that one
// everywhere, to compare). The persistent launch keeps the partial rows in shared memory of their
// own beside the staged activations (one tile per block reuses the staged area for them), and a warp
// loads the weight scales, which change with the tile, with each group's weights instead of staging
// them. Past 8 rows the launch is one block per tile (a persistent kernel that read the activations
// from L2 was slower at 8 rows: batch-8 decode 1550 -> 1470 tok/s); up to 8 rows that do not fit so
// (Qwen3-4B: from 4 rows at o's K = 4096, from 2 at down's K = 9728) take the weight rings below, or,
// where no ring fits beside the staged activations (8 rows at K = 9728), the register prefetch with
// the opt-in shared memory.
//
// Weight rings (kStages): a persistent block whose staged activations do not fit in 48 KB beside the
// partial rows asks for the opt-in shared memory and streams each warp's next groups through
// cp.async into a ring there, 2 deep by default (Q3N_GEMV_STAGES), instead of running one block per
// tile. On the H100 (Qwen3-4B FP8, launches alone, % of the stream floor, measured with 16 warps a
// block everywhere, before warps_for):
// - 8 rows, one block per tile -> 2-stage ring: q|k|v 51.2 -> 58.1%, o 34.8 -> 49.0%, gate|up
//   60.5 -> 78.8%; deeper rings were slower (gate|up 77.9% with 3, 71.6% with 5). Decode at batch 8:
//   1,803 / 1,780 -> 1,934 / 1,965 tok/s. (With warps_for, q|k|v and gate|up fit 8 rows in 48 KB and
//   keep the registers: 65% and 80%.) down at 8 rows, one block per tile -> registers in the opt-in
//   memory: 33 -> 48%. Batch 8 then 2,051-2,065 tok/s.
// - One row: no ring depth beat the registers' next group (q|k|v 61.7% against 54.4-50.4% with 2-6
//   stages, gate|up 75.6% against 74.6-68.2%, down 65.4% against 62.5-59.9%), whether the copies
//   took fragment-ordered pieces or whole 128-byte rows; batch-1 decode 370 -> 358-365 tok/s. So
//   more bytes in flight is not what the one-row GEMV lacks, and one row keeps the registers.
//
// A fused RMSNorm prologue (residual add, norm and FP8 quantisation into the staged activations,
// once per persistent block) was tried and gained nothing measurable at batch 1: the norm kernel's
// latency already overlaps the GEMV's weight prefetch under PDL. The norm stays its own kernel.
//
// For one group a lane loads 2 x 16 bytes of row `gid` and 2 x 16 of row `gid + 8` (gid = lane / 4,
// tig = lane % 4), the whole 16 x 128 group in 4 coalesced loads, and runs 8 mmas of k = 16 into a
// fresh accumulator, which is then scaled by the weight block's and each row's activation scale
// and added to the running sum: spec 5.4's per-group partial sums.
//
// Within one mma the k order is free as long as A and B agree, so fragments follow the loads: word
// j (bytes 4j..4j+3) of the lane's 16-byte piece at offset tig*16 of a 64-byte half-group feeds mma
// j of that half, bytes 4j, 4j+1 as the fragment's k = tig*2, tig*2+1 and bytes 4j+2, 4j+3 as
// k = 8 + tig*2, 8 + tig*2 + 1, for A (rows) and B (activation columns) alike.
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "cuda/async_copy.cuh"
#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/device_info.h"
#include "cuda/fp8_mma.cuh"
#include "cuda/linear_fp8_mma.h"
#include "cuda/shared_memory_optin.h"

namespace q3n::cuda {
namespace {

// Warps of a block (NW), from the K groups a tile's warps share: 16 where they divide them evenly, else
// 10 or 8 where those do, else 16. A tile's warps meet at a barrier to add their partial rows, so with
// K = 2560's 20 groups over 16 warps, 4 warps took a second group while 12 waited: barrier stalls were
// 48% of the warps' stall samples in gate|up's GEMV (Nsight Compute, H100). One M = 1 block per 16
// weight rows leaves N = 2560 with 160 blocks, one or two per SM: 16 warps each keep twice the weight
// bytes in flight per SM that 8 did. Every launch of a weight uses the same count, so its results do
// not depend on the launch.
int warps_for(int groups) {
    if (groups % 16 == 0) return 16;
    if (groups % 10 == 0) return 10;
    if (groups % 8 == 0) return 8;
    return 16;
}
// Shared memory a launch gets without the opt-in attribute: the register-prefetch launches stay
// within it, two blocks to an SM.
constexpr size_t kSmemLimit = 48 * 1024;
// Weight-ring depths: the deepest instantiated (deeper ones measured slower), and the default
// (Q3N_GEMV_STAGES overrides it).
constexpr int kMaxStages = 4;
constexpr int kDefaultStages = 2;

__device__ __forceinline__ uint32_t half2_bits(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
}

// Dynamic shared memory of a one-tile launch: the staged activations (f16 [M][groups * 128], exact
// for e4m3 values), their scales [M][groups] and the weight scales [groups]; reused after the main
// loop for the warps' partial rows.
size_t staged_bytes(int M, int groups) {
    return static_cast<size_t>(M) * groups * 128 * 2 + (static_cast<size_t>(M) + 1) * groups * 4;
}
size_t reduce_bytes(int NW, int NT) { return static_cast<size_t>(NW) * NT * 32 * 4 * 4; }
// A persistent launch's staged activations (f16 [M][K]) and their scales [M][groups], then, from this
// 16-byte aligned offset, the partial rows, which each tile rewrites while the staged values stay.
__host__ __device__ __forceinline__ size_t partial_offset(int M, int K) {
    const size_t groups = (K + 127) / 128;
    return (static_cast<size_t>(M) * K * 2 + static_cast<size_t>(M) * groups * 4 + 15) & ~static_cast<size_t>(15);
}
// Where the partial rows of a persistent launch end: the weight rings start there.
__host__ __device__ __forceinline__ size_t ring_offset(int NW, int M, int K, int NT) {
    return partial_offset(M, K) + static_cast<size_t>(NW) * NT * 32 * 4 * 4;
}
size_t persistent_bytes(int NW, int M, int K, int NT) { return ring_offset(NW, M, K, NT); }
// A ring stage of one warp: one group's 16 weight rows x 128 bytes, as 16-byte chunks [row][chunk],
// then each lane's copy of the group's weight scale.
constexpr size_t kRingStageBytes = 16 * 128 + 32 * 4;
// The 16-byte slot of chunk c of row r in a stage. Odd rows swap their halves, so that the eight
// lanes of a 16-byte read phase (rows gid, gid + 1, chunks h*4 .. h*4 + 3) cover all 32 banks.
__device__ __forceinline__ int ring_slot(int r, int c) { return r * 8 + (c ^ ((r & 1) << 2)); }
// The persistent launch with kStages-deep weight rings: its shared memory above, then the rings,
// [warp][stage].
size_t ring_bytes(int NW, int M, int K, int NT, int stages) {
    return ring_offset(NW, M, K, NT) + static_cast<size_t>(NW) * stages * kRingStageBytes;
}

// NT = column tiles of 8 activation rows (M <= 8 * NT).
//
// kStaged: the activations, their scales (and, with one tile per block, the weight scales) are
// copied to shared memory once, after the wait for their producer. Without it every group's
// iteration waits for two dependent L2 round trips (activation fragments, then scales) after its
// weights arrive, and at M > 1 the fp32 activation loads outweigh the weights. Used when they fit
// (kSmemLimit).
//
// kPersistent (staged only): the block loops over the tiles blockIdx.x, + gridDim.x, ...; otherwise
// it computes tile blockIdx.x alone.
//
// kStages (persistent only): 0, each warp's next group waits in registers; otherwise the warp keeps
// its next kStages groups (weights and scales) in flight through cp.async into a ring in shared
// memory, which holds no registers. The copies read whole 128-byte rows of a group, four rows an
// instruction, where the register loads read eight rows' 64-byte halves; the lanes then take their
// fragments from the stage.
template <int NW, int NT, bool kStaged, bool kPersistent, int kStages = 0>
__global__ void __launch_bounds__(NW * 32, NT == 1 ? 32 / NW : 1) gemv_fp8_mma(const float* q, const float* qs, int M, int K, const uint8_t* W,
                                                             const float* ws, int scale_cols, int N, float* y, int ldy) {
    static_assert(kStaged || !kPersistent, "persistent blocks only with the staged activations");
    static_assert(kStages == 0 || kPersistent, "weight rings only in persistent blocks");
    extern __shared__ __align__(16) unsigned char smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const int groups = (K + 127) / 128, tiles = (N + 15) / 16;
    const __half* xs = reinterpret_cast<const __half*>(smem);
    float* qs_s = reinterpret_cast<float*>(smem + static_cast<size_t>(kStaged ? M : 0) * K * 2);
    float* ws_s = qs_s + (kStaged ? M : 0) * groups;  // one tile per block only
    // The warps' partial rows, [warp][nt][lane][4] floats: with one tile per block over the staged
    // activations, which are no longer read after the main loop's barrier.
    float* partial = reinterpret_cast<float*>(smem + (kPersistent ? partial_offset(M, K) : 0));
    float acc[NT][4];

    // The lane's four 16-byte pieces of group g of tile t: rows a and b, half-groups 0 and 1. Pieces
    // past K (K is a multiple of 16) and rows past N read as zero.
    auto load = [&](int t, int g, uint4 (&a)[4]) {
        const int row_a = t * 16 + gid, row_b = row_a + 8;
        const uint8_t* wa = W + static_cast<size_t>(min(row_a, N - 1)) * K;
        const uint8_t* wb = W + static_cast<size_t>(min(row_b, N - 1)) * K;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int k = g * 128 + half * 64 + tig * 16;
            const bool in = k < K;
            a[2 * half] = in && row_a < N ? __ldcs(reinterpret_cast<const uint4*>(wa + k)) : make_uint4(0, 0, 0, 0);
            a[2 * half + 1] = in && row_b < N ? __ldcs(reinterpret_cast<const uint4*>(wb + k)) : make_uint4(0, 0, 0, 0);
        }
    };
    // Group g's weight block scale (one per 128 rows) for tile t. A persistent warp loads it with the
    // group's weights: a staged copy would go stale whenever the tile moves to another 128-row block.
    auto weight_scale = [&](int t, int g) { return ws[static_cast<size_t>(t >> 3) * scale_cols + g]; };

    auto compute = [&](int t, int g, const uint4 (&a)[4], float wsc) {
        // Weights as f16 pairs, once for every column tile: word j of a 16-byte piece feeds mma j of
        // that half-group; fa/fb are rows gid / gid + 8, [..][0] its bytes 0-1, [..][1] bytes 2-3.
        uint32_t fa[2][4][2], fb[2][4][2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const uint32_t wa[4] = {a[2 * half].x, a[2 * half].y, a[2 * half].z, a[2 * half].w};
            const uint32_t wb[4] = {a[2 * half + 1].x, a[2 * half + 1].y, a[2 * half + 1].z, a[2 * half + 1].w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                fa[half][j][0] = e4m3_pair_to_f16x2(wa[j], kLowPair);
                fa[half][j][1] = e4m3_pair_to_f16x2(wa[j], kHighPair);
                fb[half][j][0] = e4m3_pair_to_f16x2(wb[j], kLowPair);
                fb[half][j][1] = e4m3_pair_to_f16x2(wb[j], kHighPair);
            }
        }
        if constexpr (!kPersistent) wsc = kStaged ? ws_s[g] : weight_scale(t, g);
        const float wscale = wsc * 256.0f;  // the f16 weights are the e4m3 values times 2^-8
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int n = nt * 8 + gid;  // this lane's activation row for B
            uint32_t b[2][4][2];
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int k = g * 128 + half * 64 + tig * 16;
                if (kStaged && n < M && k < K) {
                    // 16 f16 values k..k+15: word i holds elements 2i, 2i+1, as half2_bits packs them.
                    const uint4* src = reinterpret_cast<const uint4*>(xs + static_cast<size_t>(n) * K + k);
                    const uint4 lo = src[0], hi = src[1];
                    b[half][0][0] = lo.x, b[half][0][1] = lo.y, b[half][1][0] = lo.z, b[half][1][1] = lo.w;
                    b[half][2][0] = hi.x, b[half][2][1] = hi.y, b[half][3][0] = hi.z, b[half][3][1] = hi.w;
                } else if (!kStaged && n < M && k < K) {
                    const float4* src = reinterpret_cast<const float4*>(q + static_cast<size_t>(n) * K + k);
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const float4 v = src[j];  // e4m3 values: exact in f16
                        b[half][j][0] = half2_bits(v.x, v.y);
                        b[half][j][1] = half2_bits(v.z, v.w);
                    }
                } else {
#pragma unroll
                    for (int j = 0; j < 4; ++j) b[half][j][0] = b[half][j][1] = 0;
                }
            }
            float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int half = 0; half < 2; ++half)
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    mma_f16(part, fa[half][j][0], fb[half][j][0], fa[half][j][1], fb[half][j][1], b[half][j][0], b[half][j][1]);
            // C fragment: part[0..1] = rows gid, columns tig*2 + {0,1}; part[2..3] = rows gid + 8.
            const int c0 = nt * 8 + tig * 2, c1 = c0 + 1;
            const float* as = kStaged ? qs_s : qs;
            const float s0 = c0 < M ? as[static_cast<size_t>(c0) * groups + g] * wscale : 0.0f;
            const float s1 = c1 < M ? as[static_cast<size_t>(c1) * groups + g] * wscale : 0.0f;
            acc[nt][0] += part[0] * s0;
            acc[nt][1] += part[1] * s1;
            acc[nt][2] += part[2] * s0;
            acc[nt][3] += part[3] * s1;
        }
    };

    // The next group loads while this one computes. (Two groups ahead measured slower on the H100:
    // 41-61% of the stream floor against 49-71% at batch 1.) The weights are no step's output, so
    // the first group is in flight before the wait for the kernel that produced the activations.
    pdl_launch_dependents();
    const int t0 = blockIdx.x;
    uint4 cur[4], next[4];
    float ws_cur = 0.0f, ws_next = 0.0f;
    // The ring: the warp's (tile, group) items in the order it computes them, issued kStages ahead.
    uint4* ring = reinterpret_cast<uint4*>(smem + (kStages ? ring_offset(NW, M, K, NT) : 0)) +
                  static_cast<size_t>(warp) * kStages * (kRingStageBytes / 16);
    int issue_t = t0, issue_g = warp, stage = 0;
    [[maybe_unused]] uint64_t policy = 0;
    auto issue = [&](int st) {
        if (issue_t < tiles && issue_g < groups) {
            uint4* piece = ring + st * (kRingStageBytes / 16);
            // Copy i takes rows 4i .. 4i + 3 of the group whole, 128 contiguous bytes a row.
            const int chunk = lane & 7, k = issue_g * 128 + chunk * 16;
            const bool in = k < K;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int r = i * 4 + (lane >> 3), row = issue_t * 16 + r;
                const uint8_t* src = W + static_cast<size_t>(min(row, N - 1)) * K + (in ? k : 0);
                cp_async16(piece + ring_slot(r, chunk), src, in && row < N, policy);
            }
            cp_async4(reinterpret_cast<float*>(piece + 4 * 32) + lane,
                      ws + static_cast<size_t>(issue_t >> 3) * scale_cols + issue_g);
            issue_g += NW;
            if (issue_g >= groups) issue_g = warp, issue_t += gridDim.x;
        }
        cp_async_commit();  // empty groups too: the waits count one group per item
    };
    if constexpr (kStages > 0) {
        policy = l2_evict_first_policy();
#pragma unroll
        for (int st = 0; st < kStages; ++st) issue(st);
    } else if (warp < groups) {
        load(t0, warp, cur);
        if constexpr (kPersistent) ws_cur = weight_scale(t0, warp);
    }
    pdl_wait();
    if constexpr (kStaged) {
        // Four loads in flight per thread before any store: a loop of dependent load-store pairs
        // costs an L2 round trip per iteration.
        __half2* xw = reinterpret_cast<__half2*>(smem);
        const int quads = M * K / 4;  // K is a multiple of 16
        const float4* src = reinterpret_cast<const float4*>(q);
        for (int i0 = threadIdx.x; i0 < quads; i0 += 4 * NW * 32) {
            float4 v[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int i = i0 + u * NW * 32;
                v[u] = i < quads ? src[i] : make_float4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int i = i0 + u * NW * 32;
                if (i < quads) {
                    xw[2 * i] = __floats2half2_rn(v[u].x, v[u].y);
                    xw[2 * i + 1] = __floats2half2_rn(v[u].z, v[u].w);
                }
            }
        }
        for (int i = threadIdx.x; i < M * groups; i += blockDim.x) qs_s[i] = qs[i];
        if constexpr (!kPersistent)
            for (int i = threadIdx.x; i < groups; i += blockDim.x) ws_s[i] = weight_scale(t0, i);
        __syncthreads();
    }
    for (int t = t0;;) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[nt][i] = 0.0f;
        for (int g = warp; g < groups; g += NW) {
            if constexpr (kStages > 0) {
                cp_async_wait<kStages - 1>();
                __syncwarp();  // the stage holds the other lanes' copies too
                const uint4* piece = ring + stage * (kRingStageBytes / 16);
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    cur[2 * half] = piece[ring_slot(gid, half * 4 + tig)];
                    cur[2 * half + 1] = piece[ring_slot(gid + 8, half * 4 + tig)];
                }
                compute(t, g, cur, reinterpret_cast<const float*>(piece + 4 * 32)[lane]);
                __syncwarp();  // every lane has read the stage before its next item overwrites it
                issue(stage);
                stage = stage + 1 == kStages ? 0 : stage + 1;
                continue;
            }
            if constexpr (kPersistent) {
                // The warp's next group: this tile's, or after its last one the first of the block's
                // next tile, whose weights are then in flight through this tile's reduction.
                const bool last = g + NW >= groups;
                const int lt = last ? t + static_cast<int>(gridDim.x) : t, lg = last ? warp : g + NW;
                if (lt < tiles) {
                    load(lt, lg, next);
                    ws_next = weight_scale(lt, lg);
                }
            } else if (g + NW < groups) {
                load(t, g + NW, next);
            }
            compute(t, g, cur, ws_cur);
#pragma unroll
            for (int i = 0; i < 4; ++i) cur[i] = next[i];
            ws_cur = ws_next;
        }

        // Persistent: the previous tile's sums have read the partial rows. One tile: the staged
        // activations they overwrite have been read.
        if (kPersistent ? t != t0 : kStaged) __syncthreads();
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) partial[(warp * NT + nt) * 128 + lane * 4 + i] = acc[nt][i];
        __syncthreads();
        // One output per thread and pass: (nt, lane, i) -> row r0 + gid (+8), column nt*8 + tig*2 (+1).
        const int r0 = t * 16;
        for (int o = threadIdx.x; o < NT * 128; o += blockDim.x) {
            const int nt = o / 128, l = (o / 4) % 32, i = o % 4;
            const int row = r0 + (l >> 2) + (i >= 2 ? 8 : 0), col = nt * 8 + (l & 3) * 2 + (i & 1);
            if (row >= N || col >= M) continue;
            float s = 0.0f;
#pragma unroll
            for (int w = 0; w < NW; ++w) s += partial[w * NT * 128 + o];
            y[static_cast<size_t>(col) * ldy + row] = s;
        }
        if constexpr (!kPersistent) break;
        t += gridDim.x;
        if (t >= tiles) break;
    }
}

// Whether GEMV launches run persistent: on unless Q3N_GEMV_PERSISTENT=0 (for measuring what it
// gains). Read once, so that the graphs of one run do not mix the two launches.
bool persistent_enabled() {
    static const bool enabled = [] {
        const char* v = std::getenv("Q3N_GEMV_PERSISTENT");
        return !(v && std::strcmp(v, "0") == 0);
    }();
    return enabled;
}

// Blocks of `kernel` with `smem` bytes of dynamic shared memory that the device holds at once, asked
// once per kernel, size and device (the launches of a model ask for a handful of sizes).
int resident_blocks(const void* kernel, int threads, size_t smem) {
    struct Known {
        const void* kernel;
        size_t smem;
        int threads, dev, blocks;
    };
    static std::mutex mu;
    static std::vector<Known> known;
    int dev = 0;
    Q3N_CUDA(cudaGetDevice(&dev));
    std::lock_guard<std::mutex> lock(mu);
    for (const Known& k : known)
        if (k.kernel == kernel && k.smem == smem && k.threads == threads && k.dev == dev) return k.blocks;
    int per_sm = 0;
    Q3N_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
    const int blocks = std::max(1, per_sm) * sm_count();
    known.push_back({kernel, smem, threads, dev, blocks});
    return blocks;
}

// The weight-ring depth of persistent launches: Q3N_GEMV_STAGES (0: each warp's next group in
// registers instead), read once, so that the graphs of one run do not mix launches.
int default_stages() {
    static const int stages = [] {
        const char* v = std::getenv("Q3N_GEMV_STAGES");
        return v && *v ? std::max(0, std::atoi(v)) : kDefaultStages;
    }();
    return stages;
}

// The deepest instantiated ring of at most `stages` whose shared memory the device gives one block, in
// a persistent launch of rows <= 8; 0 where none fits (the caller then takes another launch).
template <int NW, int kStages>
int launch_ring(const float* q, const float* qs, int M, const DeviceLinear& w, float* y, int ldy, int blocks, int stages,
                cudaStream_t stream) {
    if constexpr (kStages < 2) {
        return 0;
    } else {
        const auto kernel = gemv_fp8_mma<NW, 1, true, true, kStages>;
        const void* k = reinterpret_cast<const void*>(kernel);
        const size_t bytes = ring_bytes(NW, M, w.in, 1, kStages);
        if (kStages > stages || bytes > shared_memory_optin_cap(k))
            return launch_ring<NW, kStages - 1>(q, qs, M, w, y, ldy, blocks, stages, stream);
        allow_shared_memory(k, bytes);
        const int tiles = (w.out + 15) / 16;
        const int grid = std::min(tiles, blocks > 0 ? blocks : resident_blocks(k, NW * 32, bytes));
        Q3N_CUDA(launch_pdl(kernel, dim3(grid), dim3(NW * 32), bytes, stream, q, qs, M, w.in,
                            static_cast<const uint8_t*>(w.data), w.scales, w.scale_cols, w.out, y, ldy));
        return kStages;
    }
}

// One launch of up to 8 * NT rows with NW warps a block, when blocks >= 0 persistent (at most
// `blocks` blocks, 0: as many as the device holds at once, never more than the tiles):
// - with each warp's next weights in registers where the staged activations fit in 48 KB;
// - up to 8 rows, beyond that (or everywhere, with ring_everywhere): with a weight ring of up to
//   `stages` deep where one fits, else in registers with the opt-in shared memory;
// otherwise one block per tile. Returns what ran (linear_fp8_mma_launch).
template <int NW, int NT>
int launch_warps(const float* q, const float* qs, int M, const DeviceLinear& w, float* y, int ldy, int blocks, int stages,
           bool ring_everywhere, cudaStream_t stream) {
    const int tiles = (w.out + 15) / 16;
    const auto* W = static_cast<const uint8_t*>(w.data);
    const size_t persistent = persistent_bytes(NW, M, w.in, NT);
    if constexpr (NT == 1) {
        if (blocks >= 0 && stages > 0 && (ring_everywhere || persistent > kSmemLimit)) {
            const int ran = launch_ring<NW, kMaxStages>(q, qs, M, w, y, ldy, blocks, stages, stream);
            if (ran > 0) return ran;
        }
    }
    const auto kernel = gemv_fp8_mma<NW, NT, true, true>;
    const void* k = reinterpret_cast<const void*>(kernel);
    // Up to 8 rows with no ring that fits still run persistent in the opt-in shared memory: one
    // block per tile read its activations from L2 group by group (Qwen3-4B's down_proj at 8 rows:
    // 33 -> 48% of the stream floor, H100). Staging them as e4m3 codes instead (half the bytes, two
    // blocks an SM, converted to f16 at use: the same bits) measured slower: 41%, and batch-8 decode
    // 2,051-2,065 -> 1,996 tok/s; the conversion of every activation fragment costs more.
    if (blocks >= 0 && (persistent <= kSmemLimit || (NT == 1 && persistent <= shared_memory_optin_cap(k)))) {
        allow_shared_memory(k, persistent);
        const int grid = std::min(tiles, blocks > 0 ? blocks : resident_blocks(k, NW * 32, persistent));
        Q3N_CUDA(launch_pdl(kernel, dim3(grid), dim3(NW * 32), persistent, stream, q, qs, M, w.in, W, w.scales, w.scale_cols,
                            w.out, y, ldy));
        return 0;
    }
    const dim3 grid(tiles), block(NW * 32);
    const size_t staged = staged_bytes(M, (w.in + 127) / 128);
    if (staged <= kSmemLimit)
        Q3N_CUDA(launch_pdl(gemv_fp8_mma<NW, NT, true, false>, grid, block, std::max(staged, reduce_bytes(NW, NT)), stream, q,
                            qs, M, w.in, W, w.scales, w.scale_cols, w.out, y, ldy));
    else
        Q3N_CUDA(launch_pdl(gemv_fp8_mma<NW, NT, false, false>, grid, block, reduce_bytes(NW, NT), stream, q, qs, M, w.in, W,
                            w.scales, w.scale_cols, w.out, y, ldy));
    return -1;
}

template <int NT>
int launch(const float* q, const float* qs, int M, const DeviceLinear& w, float* y, int ldy, int blocks, int stages,
           bool ring_everywhere, cudaStream_t stream) {
    switch (warps_for((w.in + 127) / 128)) {
        case 8: return launch_warps<8, NT>(q, qs, M, w, y, ldy, blocks, stages, ring_everywhere, stream);
        case 10: return launch_warps<10, NT>(q, qs, M, w, y, ldy, blocks, stages, ring_everywhere, stream);
        default: return launch_warps<16, NT>(q, qs, M, w, y, ldy, blocks, stages, ring_everywhere, stream);
    }
}

}  // namespace

bool linear_fp8_mma_applicable(const DeviceLinear& w, const void* quantized) {
    return w.type == WeightType::FP8_E4M3 && w.in % 16 == 0 && (reinterpret_cast<uintptr_t>(w.data) & 15u) == 0 &&
           (reinterpret_cast<uintptr_t>(quantized) & 15u) == 0;
}

int linear_fp8_mma_launch(const float* quantized, const float* act_scales, int rows, const DeviceLinear& w, float* y,
                          int ldy, int blocks, int stages, bool ring_everywhere, cudaStream_t stream) {
    const int K = w.in, groups = (K + 127) / 128;
    int ran = kMaxStages;
    // Past 16 rows the weights stream once per 16: the many-row path (gemm_fp8) should take those.
    for (int m0 = 0; m0 < rows; m0 += kLinearFp8MmaMaxRows) {
        const int m = std::min(kLinearFp8MmaMaxRows, rows - m0);
        const float* qm = quantized + static_cast<size_t>(m0) * K;
        const float* sm = act_scales + static_cast<size_t>(m0) * groups;
        float* ym = y + static_cast<size_t>(m0) * ldy;
        ran = std::min(ran, m <= 8 ? launch<1>(qm, sm, m, w, ym, ldy, blocks, stages, ring_everywhere, stream)
                                   : launch<2>(qm, sm, m, w, ym, ldy, blocks, stages, ring_everywhere, stream));
    }
    return ran;
}

void linear_fp8_mma(const float* quantized, const float* act_scales, int rows, const DeviceLinear& w, float* y, int ldy,
                    cudaStream_t stream) {
    linear_fp8_mma_launch(quantized, act_scales, rows, w, y, ldy, persistent_enabled() ? 0 : -1, default_stages(), false,
                          stream);
}

}  // namespace q3n::cuda
