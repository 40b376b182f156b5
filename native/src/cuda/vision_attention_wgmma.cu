// Bidirectional attention within each segment of a vision item on Hopper tensor cores: wgmma
// (m64nNk16, bf16 -> fp32) on tiles the tensor memory accelerator (TMA) brings into shared memory, in
// the manner of FlashAttention-3. vision_attention_bf16 (vision_attention.cu) sends head_dim 64, 72,
// 80 and 128 here on compute capability 9.0 and keeps its mma.sync kernel for the rest.
//
// Block: BM queries of one (segment, head): WGS consumer warpgroups of 64 query rows each (wgmma's M)
// and a producer warpgroup, one thread of which issues every TMA copy. head_dim 64 and 72 run three
// consumers (BM = 192, 512 threads) or, where that takes fewer waves, four (BM = 256, 640 threads,
// 64-key S sub-tiles); 80 and 128 two (BM = 128, 384 threads; three spilled there). One block per SM
// (up to 225 KB of shared memory). Registers: the launch gives 65536 / threads a thread (168, 128 or
// 96; each SM sub-partition runs one warp of every warpgroup); setmaxnreg then moves the producer to
// 24 and the consumers to 240 (two), 160 (three) or 112 (four) (a separate producer warp alone would
// have capped everyone at 168, where head_dim 72 spilled and 128 serialized its wgmma).
//
// Pipeline. The keys of the segment stream in tiles of BN = 128 through a ring (Tiling::STAGES) of K tiles
// and another of V tiles, each stage with a "full" mbarrier (the producer's arrival and the copy's
// bytes) and an "empty" one (one arrival per consumer warp once its wgmma have read the stage). No
// block-wide barrier runs inside the key loop, so the consumer warpgroups drift apart, and WGS
// named barriers keep them in a round-robin (ping-pong for two): a warpgroup issues its wgmma only
// after the previous one has issued its own, so one warpgroup's softmax (ex2 on the MUFU, 16 a clock
// per SM: ~85% as long as the tensor work of the same tile at head_dim 72) runs while the others'
// matrix products keep the tensor cores busy. Within a warpgroup, iteration j issues S_j = Q K_j^T and then
// O += P_{j-1} V_{j-1}, and the softmax of S_j overlaps the second product; O is rescaled by
// exp2(m_{j-1} - m_j) and P_j is written to registers only once that product has completed
// (registers written while a wgmma is in flight and read by a later one make ptxas serialize them).
//
// Shared layout (attention_prefill.cu's, here written by the TMA): 64-dim column blocks of 128-byte
// rows, chunk c of row r at chunk c ^ (r & 7) (the 128-byte swizzle), each block 1024-byte aligned.
// The tensor map views qkv as [tokens][3 * heads][head_dim] and copies boxes of 64 dims x 128 tokens;
// head_dim 72 takes two boxes per tile, the second over dims 64..127 of which 72.. lie outside the
// tensor's innermost extent, so the TMA writes zeros there: Q K^T's fifth k-step (dims 64..79) reads
// those zeros in both q and k, which is the pad to 80, at no cost. Q and K are K-major operands (the
// descriptor's stride byte offset is the 1024 bytes between 8-row groups; a k-step advances 32 bytes
// within a row, a column block every 4 steps). V is the MN-major B of P V: the leading byte offset is
// the next 64 dims (one column block; N = 72 reads the first 8 dims of the second), the stride byte
// offset the next 8 keys, and a k-step of 16 keys advances 2048 bytes.
//
// Ragged tails. A tile's box reaches past the segment into the next segment's tokens (finite values)
// or past the tensor (zeros): in the last key tile the scores of keys at or past seg_len are set to
// -inf, so their P is exactly 0 and the finite V rows add nothing; query rows past the segment are
// computed like the others and not stored. All warpgroups of a block always run the whole loop
// (the round-robin needs them in step), the later ones on such rows when the segment ends early.
// A 192-row Q takes two 128-token boxes per column block (rows 192..255 of its 256-row column block
// are loaded and never read).
//
// Fragments (PTX ISA, wgmma register fragments): warp i of a warpgroup holds rows 16i..16i+15; with
// lane = 4g + q, accumulator register 4j + e holds row g + 8 (e >> 1), column 8j + 2q + (e & 1).
// The A fragment of a k-step of 16 has mma.m16n8k16's layout, so the exponentials of keys
// 16kk..16kk+15 (S registers 8kk..8kk+7) packed in pairs are P's A registers: p[i] = bf16x2(s[2i],
// s[2i + 1]).
//
// Numerics as vision_attention.cu's mma.sync kernel: q, k, v are the caller's bf16 values; the raw
// fp32 scores take the scale times log2(e) in the exponent's FMA (q is not rounded again); the row
// maximum, the row sum (of the fp32 P) and O accumulate in fp32; P is rounded to bf16 for P V; out =
// O / l rounded to bf16. Every tile rescales O (no lazy threshold: P <= 1 always). With q_rope, q is
// turned in shared memory first with the rotary kernels' arithmetic (QTurn below).
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "core/error.h"
#include "cuda/common.cuh"
#include "cuda/wgmma.cuh"
#include "cuda/cuda_check.h"
#include "cuda/device_info.h"
#include "cuda/vision_ops.h"
#include "cuda/vision_rope.cuh"

namespace q3n::cuda {
namespace {

template <int HD_, int WGS_ = (HD_ <= 72 ? 3 : 2)>
struct Tiling {
    static constexpr int HD = HD_;
    // Consumer warpgroups of 64 query rows. At head_dim <= 80 a tile's softmax (MUFU.EX2) is about as
    // long as its tensor work, so two warpgroups taking turns leave the tensor cores idle half the
    // time; three in a round-robin (192 queries a block, as FlashAttention-3 does for small head dims)
    // give each softmax two other warpgroups' matrix products to hide behind. head_dim 128 keeps two:
    // its 64 O registers with S and P would not fit the 160 a thread that three allow; nor does 80
    // (ptxas 12.4 spilled 80 bytes there), while 64 and 72 compile without spills.
    static constexpr int WGS = WGS_;
    static constexpr int BM = 64 * WGS;  // queries of a block
    static constexpr int BN = 128;       // keys of a tile (a TMA box)
    // Four warpgroups (256 queries a block) take each tile as two sub-tiles of 64 keys: their S, P and
    // O must fit in the 112 registers a thread that five warpgroups leave. They exist for the waves:
    // 4096 queries x 16 heads are 352 blocks of 192 (2.67 waves on 132 SMs, run as three) but 256 of
    // 256 (1.94, run as two of 4/3 the length), and launch() picks by that count.
    static constexpr int SUB = WGS == 4 ? 64 : 128;  // keys of a sub-tile: one S = Q K^T
    static constexpr int SUBS = BN / SUB;
    static constexpr int NB = (HD + 63) / 64;      // 64-dim column blocks of a tile
    // A V stage is released only when P V of its tile completes, late in the next iteration, and the
    // producer requests K_{t+1} after V_t: with two stages a copy would have about one iteration
    // (~0.7 us with two warpgroups) to land, about an L2 round trip under load; three leave two. With
    // three warpgroups and two column blocks (head_dim 72) three stages no longer fit beside the
    // 192-row Q, so two, but an iteration of the block is then ~1.5x longer, which buys the copy time.
    static constexpr int STAGES = (WGS >= 3 && NB == 2) ? 2 : 3;
    static constexpr int KSTEPS = (HD + 15) / 16;  // k-steps of Q K^T, head_dim padded to 16 with zeros
    static constexpr int NS = SUB / 2;             // S accumulators per thread (64 x SUB per warpgroup)
    static constexpr int NO = HD / 2;              // O accumulators per thread (64 x HD per warpgroup)
    static constexpr int NP = SUB / 4;             // P registers, bf16 pairs
    static constexpr int CONSUMERS = 128 * WGS;
    static constexpr int THREADS = CONSUMERS + 128;  // and the producer warpgroup
    // Registers a thread after setmaxnreg: each SM sub-partition holds one warp of every warpgroup,
    // and the launch gives each 65536 / THREADS rounded down to 8 (168 for 384 threads, 128 for 512);
    // the producer hands back all but 24, so that the consumers' 240 (two) or 160 (three) fit in the
    // same (WGS + 1) x that a lane.
    static constexpr int LAUNCH_REGS = (65536 / THREADS) & ~7;
    static constexpr int PRODUCER_REGS = 24, CONSUMER_REGS = WGS == 4 ? 112 : WGS == 3 ? 160 : 240;
    static_assert(PRODUCER_REGS + WGS * CONSUMER_REGS <= (WGS + 1) * LAUNCH_REGS, "within the launch's allocation");
    static constexpr uint32_t COL = 128 * 128;      // bytes of one column block of a 128-row tile
    static constexpr uint32_t TILE = NB * COL;      // bytes of a K or V tile
    // Q arrives in boxes of 128 tokens, so a 192-row Q takes two per column block and a column block
    // of Q spans 256 rows (the second box's last 64 rows are unused; a box that wrote over the next
    // column block, or two boxes writing the same rows, is what this avoids).
    static constexpr int QBOXES = (BM + 127) / 128;
    static constexpr uint32_t QCOL = QBOXES * COL;  // bytes of one column block of Q
    static constexpr uint32_t QTILE = NB * QCOL;
    // Q, the K and V rings, the slack that aligns them to 1024 bytes, and the mbarriers.
    static constexpr size_t smem_bytes = QTILE + 2 * STAGES * size_t(TILE) + 1024 + 128;
    static_assert(BN == 128 && BM % 64 == 0, "one box shape (64 dims x 128 tokens) serves Q, K and V");
    static_assert(HD % 8 == 0 && HD <= 128, "wgmma's N is a multiple of 8; two column blocks at most");
    static_assert(8 * (1 + 4 * STAGES) <= 128, "the mbarriers fit their slot");
    static_assert(smem_bytes <= 227 * 1024, "one block per SM");
    static_assert(WGS >= 2 && WGS <= 4, "named barriers 1..WGS, below any other named-barrier user");
    static_assert(WGS == 4 || HD <= 72 || WGS == 2, "three or four warpgroups spill above head_dim 72");
};

// ---- mbarriers and the TMA -------------------------------------------------------------------------

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}
// The issuing thread's arrival, announcing the bytes that the phase's copies will deliver.
__device__ __forceinline__ void mbar_arrive_expect(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// A predicated arrival rather than a branch: ptxas serializes wgmma whose pipeline spans a divergent
// branch, and these sit between a wgmma's issue and its last wait.
__device__ __forceinline__ void mbar_arrive_if(uint32_t bar, bool pred) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %1, 0;\n@p mbarrier.arrive.shared::cta.b64 _, [%0];\n}\n" ::"r"(bar),
        "r"(static_cast<uint32_t>(pred))
        : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    uint32_t done = 0;
    while (!done)
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
}

// Box (c0, c1, c2) of the tensor map into shared memory at dst, completing on bar.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2,
                                            uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
}

// Moves this warpgroup's register allocation (sm_90a; all four warps execute it).
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

// Named barriers 1..WGS order the consumer warpgroups' wgmma issue (barrier 0 is __syncthreads'):
// warpgroup w syncs on barrier 1 + w and the warpgroup before it in the round-robin arrives there, so
// each barrier phase is exactly two warpgroups, 256 threads, whatever the number of warpgroups.
__device__ __forceinline__ void named_sync(uint32_t id) {
    asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory");
}
__device__ __forceinline__ void named_arrive(uint32_t id) {
    asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory");
}

// ---- wgmma -----------------------------------------------------------------------------------------

// Reduces a thread's values of one row of S (registers 4j + E, 4j + E + 1: E = 0 for row g, 2 for
// row g + 8) as a pairwise tree, log2 deep rather than a chain of dependent instructions.
template <int E, int NS, class Op>
__device__ __forceinline__ float row_reduce(const float (&s)[NS], Op op) {
    constexpr int NT = NS / 4;
    static_assert((NT & (NT - 1)) == 0, "a power of two of 8-column groups");
    float t[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) t[j] = op(s[4 * j + E], s[4 * j + E + 1]);
    // Constant bounds on both loops: an inner bound that shrank with the outer loop stopped the
    // unrolling and left t[] in local memory.
#pragma unroll
    for (int w = NT / 2; w >= 1; w /= 2)
#pragma unroll
        for (int j = 0; j < NT / 2; ++j)
            if (j < w) t[j] = op(t[j], t[j + w]);
    return t[0];
}

// ---- the rotary of q ---------------------------------------------------------------------------------

// Byte offset of element (row r, dim d) of the Q tile: 64-dim column blocks of 128-byte rows, chunk
// c of row r at chunk c ^ (r & 7) (the TMA's 128-byte swizzle).
template <uint32_t QCOL>
__device__ __forceinline__ uint32_t q_offset(int r, int d) {
    return (d >> 6) * QCOL + r * 128 + (((((d & 63) >> 3) ^ (r & 7))) << 4) + (d & 7) * 2;
}

// With q_rope, this warpgroup's 64 query rows land unturned and are turned in shared memory before its
// first S = Q K^T reads them: the rotary's q half costs no pass over memory (vision_rope_2d_bf16_keys
// turns only k). Thread t of the warpgroup takes row t / 2 and every other bf16 pair of slots (2j,
// 2j + 1 with their partners half + 2j, half + 2j + 1). The arithmetic is the rotary kernels'
// (rope_turn, one rounding to bf16), so the result equals a separate vision_rope_2d_bf16 bit for bit.
// Rows past the segment keep their values (they are computed and never stored). Cost, H100, 4096
// patches x 16 heads, with a table per patch: the attention 166 -> 172 us, against 22.6 -> 8.2 us for
// the rotary pass; the table loads and the barrier were most of it (the turn's own shared-memory work
// is under 1 us, and computing cos and sin here instead of loading them was slower still), hence the
// per-coordinate table that stays in L1.
template <int HD>
struct QTurn {
    static constexpr int HALF = HD / 2, WORDS = HALF / 2, PER = (WORDS + 1) / 2;
    float4 cs[PER];  // (cos, sin) of slots 2j and 2j + 1
    int row = 0;
    bool live = false;

    // The table's values for this thread, loaded before the kernel's wait for its predecessor: the
    // table is written once per tower pass, and a launch without PDL (the q|k|v GEMM) lies between
    // it and every attention (vision_attention_bf16's contract), so it is complete when this kernel
    // starts, and its latency then overlaps the predecessor's tail and the copy of Q.
    __device__ __forceinline__ void load(const VisionRopeTable& table, int wg, int t, int q0, int seg_len) {
        row = wg * 64 + (t >> 1);
        const int part = t & 1, patch = q0 + row;
        live = patch < seg_len;
        const int2 rc = patch_coords(live ? patch : 0, table.h, table.w, table.merge);
#pragma unroll
        for (int k = 0; k < PER; ++k) {
            const int word = part + 2 * k;
            // Slots 2 word and 2 word + 1 lie on the same side of the quarter (an even count).
            cs[k] = live && word < WORDS
                        ? *reinterpret_cast<const float4*>(table.cs + rope_table_index(rc, 2 * word, HD / 4))
                        : make_float4(1.0f, 0.0f, 1.0f, 0.0f);
        }
    }

    template <uint32_t QCOL, int WGS>
    __device__ __forceinline__ void apply(unsigned char* q_tile, int wg, int t) const {
        if (live) {
            const int part = t & 1;
#pragma unroll
            for (int k = 0; k < PER; ++k) {
                const int word = part + 2 * k;
                if (word >= WORDS) break;
                auto* first = reinterpret_cast<__nv_bfloat162*>(q_tile + q_offset<QCOL>(row, 2 * word));
                auto* second = reinterpret_cast<__nv_bfloat162*>(q_tile + q_offset<QCOL>(row, HALF + 2 * word));
                const float2 a = __bfloat1622float2(*first), b = __bfloat1622float2(*second);
                const float2 r0 = rope_turn(a.x, b.x, cs[k].x, cs[k].y), r1 = rope_turn(a.y, b.y, cs[k].z, cs[k].w);
                *first = __floats2bfloat162_rn(r0.x, r1.x);
                *second = __floats2bfloat162_rn(r0.y, r1.y);
            }
        }
        // The stores are the generic proxy's and wgmma reads through the async one; then the
        // warpgroup's own barrier (ids 1..WGS are the round-robin's): each warpgroup reads only its own
        // 64 rows.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        asm volatile("bar.sync %0, 128;\n" ::"r"(1 + WGS + wg) : "memory");
    }
};

template <int HD, int WGS>
__global__ void __launch_bounds__(Tiling<HD, WGS>::THREADS, 1)
    vision_attention_wgmma_kernel(const __grid_constant__ CUtensorMap qkv_map, int seg_len, int heads,
                                  float scale_log2, __nv_bfloat16* __restrict__ out,
                                  const VisionRopeTable q_rope) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
    __trap();  // wgmma exists on sm_90a only, the target CMakeLists.txt builds for
#else
    using C = Tiling<HD, WGS>;
    constexpr int BM = C::BM, BN = C::BN, NB = C::NB, STAGES = C::STAGES, NS = C::NS, NO = C::NO, NP = C::NP;
    constexpr int SUB = C::SUB, SUBS = C::SUBS;
    constexpr uint32_t COL = C::COL, TILE = C::TILE, QCOL = C::QCOL;
    extern __shared__ unsigned char smem_raw[];
    const uint32_t sQ = (smem_addr(smem_raw) + 1023u) & ~1023u;
    const uint32_t sK = sQ + C::QTILE, sV = sK + STAGES * TILE, bars = sV + STAGES * TILE;
    // The mbarriers, 8 bytes each: Q landed; per stage, K landed, K released, V landed, V released.
    const uint32_t q_full = bars;
    auto k_full = [&](int st) { return bars + 8 * (1 + st); };
    auto k_empty = [&](int st) { return bars + 8 * (1 + STAGES + st); };
    auto v_full = [&](int st) { return bars + 8 * (1 + 2 * STAGES + st); };
    auto v_empty = [&](int st) { return bars + 8 * (1 + 3 * STAGES + st); };

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int q0 = blockIdx.x * BM, h = blockIdx.y;
    const int first = blockIdx.z * seg_len;  // the segment's first token (the host checks that it fits)
    const int n_kt = (seg_len + BN - 1) / BN;
    const int n_sub = (seg_len + SUB - 1) / SUB;  // sub-tiles: j lies in stage (j / SUBS) % STAGES

    if (tid == 0) {
        mbar_init(q_full, 1);
#pragma unroll
        for (int st = 0; st < STAGES; ++st) {
            mbar_init(k_full(st), 1);
            mbar_init(v_full(st), 1);
            mbar_init(k_empty(st), C::CONSUMERS / 32);
            mbar_init(v_empty(st), C::CONSUMERS / 32);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (tid == 0) asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&qkv_map)) : "memory");
    QTurn<HD> turn;
    const bool turn_q = q_rope.cs != nullptr;
    if (turn_q && warp < C::CONSUMERS / 32) turn.load(q_rope, warp >> 2, tid & 127, q0, seg_len);
    pdl_wait();  // qkv comes from the previous kernel, and out may still be read by it

    // The roles are the two branches of one if/else, as setmaxnreg wants them.
    if (warp >= C::CONSUMERS / 32) {
        // The producer: one thread issues every copy. Tile t of K (V) waits until both warpgroups have
        // released the stage's previous tile, t - STAGES: the parity asked for is that of the phase
        // before the one being filled, so the first STAGES tiles pass at once (a fresh mbarrier
        // counts its phase -1 as complete).
        setmaxnreg_dec<C::PRODUCER_REGS>();
        if (tid == C::CONSUMERS) {
            mbar_arrive_expect(q_full, C::QTILE);
#pragma unroll
            for (int b = 0; b < NB; ++b)
#pragma unroll
                for (int x = 0; x < C::QBOXES; ++x)
                    tma_load_3d(sQ + b * QCOL + x * COL, &qkv_map, 64 * b, h, first + q0 + 128 * x, q_full);
            for (int t = 0; t < n_kt; ++t) {
                const int st = t % STAGES;
                const uint32_t free_parity = ((t / STAGES) & 1) ^ 1;
                mbar_wait(k_empty(st), free_parity);
                mbar_arrive_expect(k_full(st), TILE);
#pragma unroll
                for (int b = 0; b < NB; ++b)
                    tma_load_3d(sK + st * TILE + b * COL, &qkv_map, 64 * b, heads + h, first + t * BN, k_full(st));
                mbar_wait(v_empty(st), free_parity);
                mbar_arrive_expect(v_full(st), TILE);
#pragma unroll
                for (int b = 0; b < NB; ++b)
                    tma_load_3d(sV + st * TILE + b * COL, &qkv_map, 64 * b, 2 * heads + h, first + t * BN,
                                v_full(st));
            }
        }
        pdl_launch_dependents();
    } else {
        setmaxnreg_inc<C::CONSUMER_REGS>();
        const int wg = warp >> 2, g = lane >> 2, tq = lane & 3;
        // The named barriers of the round-robin: this warpgroup's, and the next one's.
        const uint32_t my_turn = 1 + wg, next_turn = 1 + (wg + 1 == C::WGS ? 0 : wg + 1);
        const bool releaser = lane == 0;  // one arrival per warp on an empty barrier

        // Descriptors at stage 0, k-step 0; steps and stages add (bytes >> 4) to the start address.
        const uint64_t q_desc = sw128_desc(sQ + wg * 64 * 128, 16);
        const uint64_t k_desc = sw128_desc(sK, 16);
        const uint64_t v_desc = sw128_desc(sV, COL);

        float o[NO];
        uint32_t p[NP];
#pragma unroll
        for (int i = 0; i < NO; ++i) o[i] = 0.0f;
#pragma unroll
        for (int i = 0; i < NP; ++i) p[i] = 0u;
        // Rows g (0) and g + 8 (1) of the warp's 16: running maximum of the raw scores, and this thread's
        // share of the row sum (the quad's four threads hold disjoint keys; summed at the end).
        float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;

        // Sub-tile j's keys start (j % SUBS) * SUB rows into its stage: SUB rows of 128 bytes in a K
        // column block, SUB / 16 k-steps of 2048 bytes in V.
        auto stage_of = [&](int j) { return (j / SUBS) % STAGES; };
        auto issue_s = [&](float(&s)[NS], int j) {  // S = Q K^T from sub-tile j
            const uint32_t base = stage_of(j) * TILE + (j % SUBS) * SUB * 128;
#pragma unroll
            for (int kk = 0; kk < C::KSTEPS; ++kk) {
                const uint32_t qstep = (kk >> 2) * QCOL + (kk & 3) * 32, kstep = (kk >> 2) * COL + (kk & 3) * 32;
                wgmma_ss<SUB>(s, q_desc + (qstep >> 4), k_desc + ((base + kstep) >> 4), kk > 0);
            }
        };
        auto issue_pv = [&](int j) {  // O += P V from sub-tile j
            const uint32_t base = stage_of(j) * TILE + (j % SUBS) * (SUB / 16) * 2048;
#pragma unroll
            for (int kk = 0; kk < SUB / 16; ++kk) {
                const uint32_t a[4] = {p[4 * kk], p[4 * kk + 1], p[4 * kk + 2], p[4 * kk + 3]};
                wgmma_rs<HD>(o, a, v_desc + ((base + kk * 2048) >> 4));
            }
        };
        // A stage is released after its last sub-tile (the segment's last tile may have fewer).
        auto last_of_stage = [&](int j) { return j % SUBS == SUBS - 1 || j == n_sub - 1; };
        auto parity_of = [&](int j) { return static_cast<uint32_t>((j / SUBS / STAGES) & 1); };
        // Online softmax of S in place, in log2 units; c0, c1 rescale O and l from the previous maxima.
        // `masked` tiles (the last, and the first, which may be both) set keys at or past `live` to
        // -inf: a select per element, which the other tiles leave out (masked is a constant once
        // inlined; a generic lambda here, called from the generic `iteration`, crashed nvcc 12.4's
        // front end). The maxima are of raw scores (scale_log2 > 0 keeps their order) and finite from
        // the first tile on, whose key 0 is live; m = -inf there gives c = 0, which multiplies only
        // zeros.
        auto softmax = [&](float(&s)[NS], int live, bool masked, float& c0, float& c1) {
            if (masked) {
#pragma unroll
                for (int j = 0; j < SUB / 8; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        s[4 * j + e] = 8 * j + 2 * tq + (e & 1) < live ? s[4 * j + e] : -INFINITY;
            }
            float mx0 = fmaxf(m0, row_reduce<0>(s, MaxOp{})), mx1 = fmaxf(m1, row_reduce<2>(s, MaxOp{}));
#pragma unroll
            for (int off = 1; off <= 2; off <<= 1) {
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
            }
            c0 = fast_exp2((m0 - mx0) * scale_log2);
            c1 = fast_exp2((m1 - mx1) * scale_log2);
            m0 = mx0;
            m1 = mx1;
            const float sub0 = mx0 * scale_log2, sub1 = mx1 * scale_log2;
#pragma unroll
            for (int j = 0; j < NS / 4; ++j) {
                s[4 * j] = fast_exp2(fmaf(s[4 * j], scale_log2, -sub0));
                s[4 * j + 1] = fast_exp2(fmaf(s[4 * j + 1], scale_log2, -sub0));
                s[4 * j + 2] = fast_exp2(fmaf(s[4 * j + 2], scale_log2, -sub1));
                s[4 * j + 3] = fast_exp2(fmaf(s[4 * j + 3], scale_log2, -sub1));
            }
            l0 = fmaf(l0, c0, row_reduce<0>(s, AddOp{}));
            l1 = fmaf(l1, c1, row_reduce<2>(s, AddOp{}));
        };
        auto to_p = [&](const float(&s)[NS]) {
#pragma unroll
            for (int i = 0; i < NP; ++i) p[i] = pack_bf16(s[2 * i], s[2 * i + 1]);
        };

        // Turns: warpgroup 0 issues first (the last warpgroup's arrival stands for a previous turn of its
        // own), then each issue is followed by an arrival on the next warpgroup's barrier: 0, 1, .., WGS
        // - 1, 0, ... A barrier never holds two arrivals: the arriver's next one comes only after its own
        // next turn, which needs the owner of the barrier to have passed it first. Every wait below is
        // for a copy requested well before, or for the previous warpgroup's issue, which never waits on
        // this one's.
        if (wg == C::WGS - 1) named_arrive(1);

        {  // S_0
            mbar_wait(q_full, 0);
            if (turn_q) turn.template apply<QCOL, C::WGS>(smem_raw + (sQ - smem_addr(smem_raw)), wg, tid & 127);
            mbar_wait(k_full(0), 0);
            float s[NS];
            named_sync(my_turn);
            wgmma_fence();
            issue_s(s, 0);
            wgmma_commit();
            named_arrive(next_turn);
            wgmma_wait<0>();
            reg_fence(s);
            mbar_arrive_if(k_empty(0), releaser && last_of_stage(0));
            float c0, c1;
            softmax(s, seg_len, true, c0, c1);
            to_p(s);
        }
        // S_j with P_{j-1} V_{j-1}.
        auto iteration = [&](int j, auto masked) {
            const int st = stage_of(j), pst = stage_of(j - 1);
            mbar_wait(k_full(st), parity_of(j));
            mbar_wait(v_full(pst), parity_of(j - 1));
            float s[NS];  // fresh: its first k-step ignores the input
            named_sync(my_turn);
            reg_fence(o);
            reg_fence(p);
            wgmma_fence();
            issue_s(s, j);
            wgmma_commit();
            issue_pv(j - 1);
            wgmma_commit();
            named_arrive(next_turn);
            wgmma_wait<1>();
            reg_fence(s);
            mbar_arrive_if(k_empty(st), releaser && last_of_stage(j));
            float c0, c1;
            softmax(s, seg_len - j * SUB, decltype(masked)::value, c0, c1);  // overlaps P_{j-1} V_{j-1}
            wgmma_wait<0>();
            reg_fence(o);
            reg_fence(p);
            mbar_arrive_if(v_empty(pst), releaser && last_of_stage(j - 1));
            to_p(s);
            // Once the row maxima settle, most tiles leave every c at exactly 1: the warp skips the
            // multiplications then (bit-identical; no wgmma of this warpgroup is in flight here).
            if (__any_sync(0xffffffffu, c0 != 1.0f || c1 != 1.0f)) {
#pragma unroll
                for (int i = 0; i < NO; i += 4) {
                    o[i] *= c0;
                    o[i + 1] *= c0;
                    o[i + 2] *= c1;
                    o[i + 3] *= c1;
                }
            }
        };
        for (int j = 1; j < n_sub - 1; ++j) iteration(j, std::false_type{});
        if (n_sub > 1) iteration(n_sub - 1, std::true_type{});
        {  // P_last V_last
            const int pst = stage_of(n_sub - 1);
            mbar_wait(v_full(pst), parity_of(n_sub - 1));
            named_sync(my_turn);
            reg_fence(o);
            reg_fence(p);
            wgmma_fence();
            issue_pv(n_sub - 1);
            wgmma_commit();
            named_arrive(next_turn);
            wgmma_wait<0>();
            reg_fence(o);
        }
        if (wg == 0) named_sync(1);  // takes the last warpgroup's last arrival: all barriers end where they began
        pdl_launch_dependents();

#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
            l0 += __shfl_xor_sync(0xffffffffu, l0, off);
            l1 += __shfl_xor_sync(0xffffffffu, l1, off);
        }
        const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
        // o[4j], o[4j + 1] are dims 8j + 2tq, +1 of row r0; o[4j + 2], o[4j + 3] those of row r0 + 8.
        const int r0 = q0 + wg * 64 + (warp & 3) * 16 + g, r1 = r0 + 8;
        const size_t hidden = static_cast<size_t>(heads) * HD;
        if (r0 < seg_len) {
            __nv_bfloat16* dst = out + static_cast<size_t>(first + r0) * hidden + static_cast<size_t>(h) * HD + 2 * tq;
#pragma unroll
            for (int j = 0; j < HD / 8; ++j)
                *reinterpret_cast<uint32_t*>(dst + 8 * j) = pack_bf16(o[4 * j] * inv0, o[4 * j + 1] * inv0);
        }
        if (r1 < seg_len) {
            __nv_bfloat16* dst = out + static_cast<size_t>(first + r1) * hidden + static_cast<size_t>(h) * HD + 2 * tq;
#pragma unroll
            for (int j = 0; j < HD / 8; ++j)
                *reinterpret_cast<uint32_t*>(dst + 8 * j) = pack_bf16(o[4 * j + 2] * inv1, o[4 * j + 3] * inv1);
        }
    }
#endif
}

// cuTensorMapEncodeTiled through the runtime (the engine does not link libcuda itself).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
    static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
        void* fn = nullptr;
        cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
        Q3N_CUDA(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
#else
        Q3N_CUDA(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found));
#endif
        require(found == cudaDriverEntryPointSuccess && fn != nullptr, Q3N_ERR_DEVICE,
                "vision attention: the driver has no cuTensorMapEncodeTiled");
        return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
    }();
    return encode;
}

template <int HD, int WGS = Tiling<HD>::WGS>
void launch(const __nv_bfloat16* qkv, int segments, int seg_len, int heads, float scale, __nv_bfloat16* out,
            const VisionRopeTable* q_rope, cudaStream_t stream) {
    using C = Tiling<HD, WGS>;
    // qkv as [tokens][3 * heads][HD] (q of head h at index h, k at heads + h, v at 2 heads + h), boxes
    // of 64 dims x 1 x 128 tokens; reads past HD or past the last token are zeros (OOB fill NONE).
    CUtensorMap map;
    const cuuint64_t dims[3] = {static_cast<cuuint64_t>(HD), static_cast<cuuint64_t>(3) * heads,
                                static_cast<cuuint64_t>(segments) * seg_len};
    const cuuint64_t strides[2] = {static_cast<cuuint64_t>(HD) * 2, static_cast<cuuint64_t>(3) * heads * HD * 2};
    const cuuint32_t box[3] = {64, 1, static_cast<cuuint32_t>(C::BN)};
    const cuuint32_t element_strides[3] = {1, 1, 1};
    const CUresult r = tensor_map_encoder()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<__nv_bfloat16*>(qkv),
                                            dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    require(r == CUDA_SUCCESS, Q3N_ERR_DEVICE,
            "vision attention: cuTensorMapEncodeTiled failed with error " + std::to_string(static_cast<int>(r)));
    auto* kernel = vision_attention_wgmma_kernel<HD, WGS>;
    Q3N_CUDA(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(C::smem_bytes)));
    const dim3 grid((seg_len + C::BM - 1) / C::BM, heads, segments);
    Q3N_CUDA(launch_pdl(kernel, grid, dim3(C::THREADS), C::smem_bytes, stream, map, seg_len, heads,
                        scale * 1.4426950408889634f, out, q_rope ? *q_rope : VisionRopeTable{}));
}

// Whether blocks of four warpgroups end sooner than blocks of three: one block per SM, a block's time
// proportional to its warpgroups (the tensor cores are the shared limit), so the waves each takes,
// times its length.
bool four_warpgroups_finish_first(int segments, int seg_len, int heads) {
    const int sms = sm_count();
    auto waves = [&](int rows) {
        const long long blocks = static_cast<long long>(segments) * heads * ((seg_len + rows - 1) / rows);
        return (blocks + sms - 1) / sms;
    };
    return 4 * waves(256) < 3 * waves(192);
}

}  // namespace

bool vision_attention_wgmma_applies(int head_dim) {
    if (head_dim != 64 && head_dim != 72 && head_dim != 80 && head_dim != 128) return false;
    int device = 0, major = 0;
    Q3N_CUDA(cudaGetDevice(&device));
    Q3N_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    return major == 9;
}

void vision_attention_bf16_wgmma(const __nv_bfloat16* qkv, int segments, int seg_len, int heads, int head_dim,
                                 float scale, __nv_bfloat16* out, cudaStream_t stream, int warpgroups,
                                 const VisionRopeTable* q_rope) {
    if (segments == 0 || seg_len == 0) return;
    // Tile coordinates (a segment's first token plus up to a tile past its end) are 32-bit ints.
    require(segments > 0 && seg_len > 0 && heads > 0 && segments <= 65535 && heads <= 65535 &&
                static_cast<long long>(segments) * seg_len <= 0x7fffffffLL - 256,
            Q3N_ERR_INVALID_ARGUMENT, "vision_attention_bf16_wgmma: bad shape");
    require(scale > 0.0f, Q3N_ERR_INVALID_ARGUMENT, "vision_attention_bf16_wgmma: the scale must be positive");
    require(reinterpret_cast<uintptr_t>(qkv) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 4 == 0,
            Q3N_ERR_INVALID_ARGUMENT,
            "vision_attention_bf16_wgmma: qkv must be 16-byte aligned and out 4-byte aligned");
    require(!q_rope || (q_rope->cs && reinterpret_cast<uintptr_t>(q_rope->cs) % 16 == 0 && q_rope->merge > 0 &&
                        q_rope->h % q_rope->merge == 0 && q_rope->w % q_rope->merge == 0 &&
                        static_cast<long long>(q_rope->h) * q_rope->w == seg_len),
            Q3N_ERR_INVALID_ARGUMENT,
            "vision_attention_bf16_wgmma: the rotary table must be 16-byte aligned and its grid one segment");
    const bool small_head = head_dim == 64 || head_dim == 72;
    require(warpgroups == 0 || (small_head && (warpgroups == 3 || warpgroups == 4)) ||
                (!small_head && warpgroups == 2),
            Q3N_ERR_INVALID_ARGUMENT,
            "vision_attention_bf16_wgmma: " + std::to_string(warpgroups) + " warpgroups at head_dim " +
                std::to_string(head_dim));
    if (small_head && (warpgroups == 4 || (warpgroups == 0 && four_warpgroups_finish_first(segments, seg_len, heads)))) {
        if (head_dim == 64)
            launch<64, 4>(qkv, segments, seg_len, heads, scale, out, q_rope, stream);
        else
            launch<72, 4>(qkv, segments, seg_len, heads, scale, out, q_rope, stream);
        Q3N_CUDA_LAUNCHED("vision_attention_bf16_wgmma");
        return;
    }
    switch (head_dim) {
        case 64: launch<64>(qkv, segments, seg_len, heads, scale, out, q_rope, stream); break;
        case 72: launch<72>(qkv, segments, seg_len, heads, scale, out, q_rope, stream); break;
        case 80: launch<80>(qkv, segments, seg_len, heads, scale, out, q_rope, stream); break;
        case 128: launch<128>(qkv, segments, seg_len, heads, scale, out, q_rope, stream); break;
        default:
            fail(Q3N_ERR_UNSUPPORTED,
                 "vision attention (wgmma) has no kernel for head_dim " + std::to_string(head_dim));
    }
    Q3N_CUDA_LAUNCHED("vision_attention_bf16_wgmma");
}

}  // namespace q3n::cuda
