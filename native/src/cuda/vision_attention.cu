// Bidirectional attention within each temporal slice of a vision item, two kernels.
//
// vision_attention (fp32 on CUDA cores) in the manner of FlashAttention: a block of 128 threads owns
// 128 queries of one (slice, head), one query per thread with q and the output accumulator in
// registers; K and V tiles of KT keys go through shared memory, where every thread reads the same key
// at once (a broadcast, no bank conflicts). The softmax is online per query, rescaled once per tile.
// Scores use exp2 of log2(e)-prescaled products: the same softmax to a few ulp as the CPU's
// segment_attention.
//
// Registers: q[HD] + acc[HD] + s[KT] per thread (176 at HD 72, KT 32, no spills; wider heads would spill, so
// KT is 16 at HD 80 and 8 at HD 128). Shared memory: 2 x KT x HD x 4 bytes = 18 KiB at HD 72.
//
// vision_attention_bf16 (mma.sync m16n8k16 bf16 -> fp32) in the manner of FlashAttention-2: see the
// comment above its kernel below. On Hopper, head_dim 64, 72, 80 and 128 go to the wgmma kernel of
// vision_attention_wgmma.cu instead (TMA-fed tiles, a producer warpgroup, two to four consumer
// warpgroups taking turns); the other head dims stay here, each of them needing a wgmma N of its own there.
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "core/error.h"
#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/device_info.h"
#include "cuda/vision_ops.h"

namespace q3n::cuda {
namespace {

constexpr int kBQ = 128;

template <int HD, int KT>
__global__ void __launch_bounds__(kBQ) vision_attention_kernel(const float* __restrict__ qkv, int seg_len, int heads,
                                                               float scale_log2, float* __restrict__ out) {
    __shared__ __align__(16) float Ks[KT][HD];
    __shared__ __align__(16) float Vs[KT][HD];
    const int hidden = heads * HD, stride = 3 * hidden;
    const int h = blockIdx.y;
    const size_t first = static_cast<size_t>(blockIdx.z) * seg_len;
    const int qi = blockIdx.x * kBQ + threadIdx.x;
    const bool active = qi < seg_len;

    float q[HD], acc[HD];
    {
        const float* src = qkv + (first + (active ? qi : 0)) * stride + h * HD;
#pragma unroll
        for (int d = 0; d < HD; d += 4) {
            const float4 v = *reinterpret_cast<const float4*>(src + d);
            q[d] = v.x * scale_log2;
            q[d + 1] = v.y * scale_log2;
            q[d + 2] = v.z * scale_log2;
            q[d + 3] = v.w * scale_log2;
        }
#pragma unroll
        for (int d = 0; d < HD; ++d) acc[d] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int k0 = 0; k0 < seg_len; k0 += KT) {
        __syncthreads();  // the previous tile is no longer read
        for (int c = threadIdx.x; c < KT * HD / 4; c += kBQ) {
            const int r = c / (HD / 4), col = (c % (HD / 4)) * 4, key = k0 + r;
            float4 kv = make_float4(0.f, 0.f, 0.f, 0.f), vv = kv;
            if (key < seg_len) {
                const float* src = qkv + (first + key) * stride + h * HD + col;
                kv = *reinterpret_cast<const float4*>(src + hidden);
                vv = *reinterpret_cast<const float4*>(src + 2 * hidden);
            }
            *reinterpret_cast<float4*>(&Ks[r][col]) = kv;
            *reinterpret_cast<float4*>(&Vs[r][col]) = vv;
        }
        __syncthreads();
        float s[KT];
        float tile_max = -INFINITY;
#pragma unroll
        for (int j = 0; j < KT; ++j) {
            float dot = 0.0f;
#pragma unroll
            for (int d = 0; d < HD; d += 4) {
                const float4 k = *reinterpret_cast<const float4*>(&Ks[j][d]);
                dot += q[d] * k.x + q[d + 1] * k.y + q[d + 2] * k.z + q[d + 3] * k.w;
            }
            s[j] = k0 + j < seg_len ? dot : -INFINITY;
            tile_max = fmaxf(tile_max, s[j]);
        }
        // Every tile holds at least one real key, so m_new is finite; exp2(-inf) = 0 on the first tile.
        const float m_new = fmaxf(m, tile_max);
        const float corr = exp2f(m - m_new);
        l *= corr;
#pragma unroll
        for (int d = 0; d < HD; ++d) acc[d] *= corr;
#pragma unroll
        for (int j = 0; j < KT; ++j) {
            const float p = exp2f(s[j] - m_new);
            l += p;
#pragma unroll
            for (int d = 0; d < HD; d += 4) {
                const float4 v = *reinterpret_cast<const float4*>(&Vs[j][d]);
                acc[d] += p * v.x;
                acc[d + 1] += p * v.y;
                acc[d + 2] += p * v.z;
                acc[d + 3] += p * v.w;
            }
        }
        m = m_new;
    }
    if (!active) return;
    const float inv = 1.0f / l;
    float* dst = out + (first + qi) * hidden + h * HD;
#pragma unroll
    for (int d = 0; d < HD; d += 4)
        *reinterpret_cast<float4*>(dst + d) = make_float4(acc[d] * inv, acc[d + 1] * inv, acc[d + 2] * inv, acc[d + 3] * inv);
}

template <int HD, int KT>
void launch(const float* qkv, int segments, int seg_len, int heads, float scale, float* out, cudaStream_t stream) {
    const dim3 grid((seg_len + kBQ - 1) / kBQ, heads, segments);
    vision_attention_kernel<HD, KT><<<grid, kBQ, 0, stream>>>(qkv, seg_len, heads, scale * 1.4426950408889634f, out);
}

// ---- bf16 on tensor cores -------------------------------------------------------------------------
//
// A block owns BQ = 16 * MT * WARPS queries of one (segment, head); each warp owns MT m-tiles of 16
// query rows (one mma M each), with their Q fragments in registers for the whole key loop. Every K or
// V fragment a warp reads from shared memory feeds its MT m-tiles' mma: at MT = 1 the ldmatrix traffic
// (~19 KiB a warp per 64-key tile at head_dim 72) asks about as many shared-memory cycles as the mma
// take tensor cycles; MT = 2 halves it. The segment's keys stream through shared memory in tiles
// of KT keys, K and V in a ring of STAGES buffers filled by cp.async: the tile STAGES - 1 ahead is
// requested right after the barrier that opens a tile, so one barrier per tile both publishes the
// landed tile and retires the buffer being refilled (every warp has left it). Scores, the online
// softmax (exp2, the scale times log2(e) folded into one FMA) and the output accumulate in fp32 in
// registers; P is rounded to bf16 for the P V product.
//
// Shapes: Q K^T's k extent is head_dim exactly: head_dim / 16 steps of m16n8k16 and, when head_dim is
// an odd multiple of 8 (72), one step of m16n8k8 for the last 8 dims, so nothing is padded or
// zeroed. P V's n extent is head_dim in n-tiles of 8 (72 = 4 pairs for ldmatrix.x4 + one x2). Keys
// past the segment are zero-filled rows (finite, so P = 0 times them stays 0) whose scores are set
// to -inf; query rows past it are zero-filled too (their softmax stays finite) and not stored.
//
// Fragment layouts as in attention_prefill.cu (PTX ISA, mma.m16n8k16 / m16n8k8 and ldmatrix), lane = 4g + q:
//   A (16x16 row-major): a[0] = A[g][2q, 2q+1], a[1] = A[g+8][2q..], a[2] = A[g][2q+8..], a[3] = A[g+8][2q+8..]
//   B (16x8 "col"):      b[0] = B[2q, 2q+1][g], b[1] = B[2q+8, 2q+9][g]
//   C (16x8 fp32):       c[0], c[1] = C[g][2q, 2q+1], c[2], c[3] = C[g+8][2q, 2q+1]
//   m16n8k8 keeps a[0], a[1] and b[0] of these (k < 8) and the same C.
//   ldmatrix: lanes 8i..8i+7 address the eight 16-byte rows of matrix i; register i of lane l gets
//   row l >> 2, elements 2(l & 3), +1 of matrix i (with .trans: column l >> 2, rows 2(l & 3), +1).
//
// Numerics: q, k, v are the caller's bf16 values, used as they are (the scale is applied to the fp32
// scores, so q is not rounded a second time); the row sum is of the fp32 P; out = O / l rounded to
// bf16 (nearest even). Against an exact softmax on the same inputs each output is off by at most
// 2^-7 max_j |v_j| (2^-8 from P's rounding, 2^-8 from the output's), ~2e-3 relative L2 on random data.
//
// Registers (ptxas, sm_90a): 245-255 for the wide tilings below, no spills up to head_dim 120;
// head_dim 128's wide tiling spills 80 bytes.

template <int HD_, int WARPS_, int MT_, int KT_, int STAGES_, int MIN_BLOCKS_>
struct Bf16Tiling {
    static constexpr int HD = HD_, WARPS = WARPS_, MT = MT_, KT = KT_, STAGES = STAGES_, MIN_BLOCKS = MIN_BLOCKS_;
    static constexpr int KF = HD / 16;           // full 16-wide k-steps of Q K^T
    static constexpr bool K8 = HD % 16 != 0;     // and one 8-wide step (m16n8k8) for the last 8 dims
    // Bf16 elements per shared row: an odd number of 16-byte units, so that the eight rows of one
    // ldmatrix matrix fall in eight distinct 16-byte bank groups (no conflicts).
    static constexpr int ROW = (HD / 8) % 2 != 0 ? HD : HD + 8;
    static constexpr int CH = HD / 8;  // 16-byte chunks of one token's q, k or v slice
    static constexpr int BQ = 16 * MT * WARPS;
    static constexpr int THREADS = 32 * WARPS;
    static constexpr int NT = KT / 8;  // score n-tiles of an m-tile
    static constexpr int DT = HD / 8;  // output n-tiles of an m-tile
    static constexpr size_t smem_bytes = static_cast<size_t>(BQ + 2 * STAGES * KT) * ROW * 2;
    static_assert(HD % 8 == 0 && HD <= 128 && KT % 32 == 0 && STAGES >= 2, "unsupported tiling");
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without a register round trip; src_bytes = 0 reads nothing and writes zeros.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
// Matrices 0 and 1 only: lanes 0..15 give the addresses.
__device__ __forceinline__ void ldsm_x2(uint32_t (&r)[2], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void ldsm_x2_trans(uint32_t (&r)[2], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr)
                 : "memory");
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// m16n8k8: a[0] = A[g][2q, 2q+1], a[1] = A[g+8][2q, 2q+1]; b = B[2q, 2q+1][g]; C as for k16.
__device__ __forceinline__ void mma_bf16_k8(float (&c)[4], const uint32_t (&a)[2], uint32_t b) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(b));
}

// Reduces a lane's 2 NT values of one row of an m-tile's scores (elements E, E + 1 of each n-tile:
// E = 0 for row g, 2 for row g + 8) as a pairwise tree, log2(2 NT) deep rather than a 2 NT-long
// chain of dependent instructions: with two warps per scheduler, latency is what stalls the softmax.
template <int E, int NT, class Op>
__device__ __forceinline__ float row_reduce(const float (&s)[NT][4], Op op) {
    static_assert((NT & (NT - 1)) == 0, "a power of two of n-tiles");
    float t[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) t[j] = op(s[j][E], s[j][E + 1]);
#pragma unroll
    for (int w = NT / 2; w >= 1; w /= 2)
#pragma unroll
        for (int j = 0; j < w; ++j) t[j] = op(t[j], t[j + w]);
    return t[0];
}

template <class C>
__global__ void __launch_bounds__(C::THREADS, C::MIN_BLOCKS)
    vision_attention_bf16_kernel(const __nv_bfloat16* __restrict__ qkv, int seg_len, int heads, float scale_log2,
                                 __nv_bfloat16* __restrict__ out) {
    constexpr int HD = C::HD, KF = C::KF, ROW = C::ROW, CH = C::CH, BQ = C::BQ, MT = C::MT, KT = C::KT,
                  THREADS = C::THREADS, STAGES = C::STAGES, NT = C::NT, DT = C::DT;
    constexpr uint32_t kStageBytes = KT * ROW * 2;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    // [BQ][ROW] Q, [STAGES][KT][ROW] K, [STAGES][KT][ROW] V.
    const uint32_t sQ_a = smem_addr(smem_raw), sK_a = sQ_a + BQ * ROW * 2, sV_a = sK_a + STAGES * kStageBytes;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tq = lane & 3;
    const int hidden = heads * HD;
    const size_t stride = 3 * static_cast<size_t>(hidden);
    const int q0 = blockIdx.x * BQ, h = blockIdx.y;
    const size_t first = static_cast<size_t>(blockIdx.z) * seg_len;
    const __nv_bfloat16* q_src = qkv + first * stride + static_cast<size_t>(h) * HD;
    const __nv_bfloat16* k_src = q_src + hidden;
    const __nv_bfloat16* v_src = k_src + hidden;
    const int n_kt = (seg_len + KT - 1) / KT;

    pdl_wait();

    // Rows [row0, row0 + ROWS) of the segment's slice `src` into shared rows from `dst`; rows at or
    // past seg_len are zeros (src-size 0, with the segment's row 0 as a harmless address).
    auto load_rows = [&](auto rows_tag, uint32_t dst, const __nv_bfloat16* src, int row0) {
        constexpr int ROWS = decltype(rows_tag)::value;
#pragma unroll
        for (int i = 0; i < (ROWS * CH + THREADS - 1) / THREADS; ++i) {
            const int c = tid + i * THREADS;
            if ((ROWS * CH) % THREADS != 0 && c >= ROWS * CH) break;
            const int r = c / CH, part = c % CH;
            const bool live = row0 + r < seg_len;
            cp_async16(dst + (r * ROW + part * 8) * 2, src + (live ? (row0 + r) * stride : 0) + part * 8, live ? 16 : 0);
        }
    };
    using KtTag = std::integral_constant<int, KT>;
    auto load_kv = [&](int kt) {
        const uint32_t off = (kt % STAGES) * kStageBytes;
        load_rows(KtTag{}, sK_a + off, k_src, kt * KT);
        load_rows(KtTag{}, sV_a + off, v_src, kt * KT);
    };

    load_rows(std::integral_constant<int, BQ>{}, sQ_a, q_src, q0);
    load_kv(0);
    cp_async_commit();
#pragma unroll
    for (int st = 1; st < STAGES - 1; ++st) {
        if (st < n_kt) load_kv(st);
        cp_async_commit();  // empty groups too: the wait counts below assume one group per tile
    }

    // Per-lane ldmatrix byte offsets (attention_prefill.cu derives the same three):
    //   Q, the A operand: matrix i is rows +8 (i & 1), columns +8 (i >> 1), so r[0..3] = a[0..3].
    //   K, the B operand of Q K^T (B[dim][key] = K[key][dim], non-transposed): matrix i is keys
    //   +8 (i >> 1), dims +8 (i & 1): r[0], r[1] = b[0], b[1] of keys 0..7, r[2], r[3] of keys 8..15.
    //   V, the B operand of P V (B[key][dim] = V[key][dim], hence .trans): matrix i is keys +8 (i & 1),
    //   dims +8 (i >> 1): r[0], r[1] = b[0], b[1] of dims 0..7, r[2], r[3] of dims 8..15; lanes 0..15
    //   alone give the x2 load of one 8-dim tile.
    // A warp owns rows [warp * 16 MT, +16 MT) of the block's queries, m-tile mt being rows +16 mt.
    const uint32_t q_off = ((warp * 16 * MT + (lane & 7) + ((lane >> 3) & 1) * 8) * ROW + (lane >> 4) * 8) * 2;
    const uint32_t k_off = (((lane & 7) + (lane >> 4) * 8) * ROW + ((lane >> 3) & 1) * 8) * 2;
    const uint32_t v_off = (((lane & 7) + ((lane >> 3) & 1) * 8) * ROW + (lane >> 4) * 8) * 2;
    //   The 8-wide step (dims KF * 16 ..): Q's x2 (matrices 0, 1 = rows +0, +8) is a[0], a[1] of
    //   m16n8k8; K's x4 takes matrix i = keys +8i, so r[i] is b[0] of the n-tile of keys 8i..8i+7.
    const uint32_t k8_off = (lane * ROW + KF * 16) * 2;

    cp_async_wait<STAGES - 2>();  // Q and tile 0
    __syncthreads();
    uint32_t qf[MT][KF > 0 ? KF : 1][4], qf8[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int kk = 0; kk < KF; ++kk) ldsm_x4(qf[mt][kk], sQ_a + q_off + mt * 16 * ROW * 2 + kk * 32);
        if constexpr (C::K8) ldsm_x2(qf8[mt], sQ_a + q_off + mt * 16 * ROW * 2 + KF * 32);
    }

    // Warps whose rows all lie past the segment (in its last block) only keep the barriers company.
    const bool warp_active = q0 + warp * 16 * MT < seg_len;
    float o[MT][DT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < DT; ++j) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.0f;
    // Per m-tile, rows g (index 0) and g + 8 (index 1): the running maximum of the raw scores and
    // this lane's share of the row sum (the quad's four lanes hold disjoint keys; summed at the end).
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.0f;

    for (int kt = 0; kt < n_kt; ++kt) {
        if (kt > 0) {
            cp_async_wait<STAGES - 2>();  // tile kt has landed for this thread's copies ...
            __syncthreads();              // ... and for everyone's; every warp has left tile kt - 1
        }
        if (kt + STAGES - 1 < n_kt) load_kv(kt + STAGES - 1);  // into the buffer of tile kt - 1
        cp_async_commit();
        if (!warp_active) continue;
        const uint32_t k_stage = sK_a + (kt % STAGES) * kStageBytes + k_off;
        const uint32_t k8_stage = sK_a + (kt % STAGES) * kStageBytes + k8_off;
        const uint32_t v_stage = sV_a + (kt % STAGES) * kStageBytes + v_off;

        float s[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int j = 0; j < NT; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KF; ++kk) {
#pragma unroll
            for (int jp = 0; jp < NT / 2; ++jp) {
                uint32_t b[4];
                ldsm_x4(b, k_stage + jp * 16 * ROW * 2 + kk * 32);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_bf16(s[mt][2 * jp], qf[mt][kk], b[0], b[1]);
                    mma_bf16(s[mt][2 * jp + 1], qf[mt][kk], b[2], b[3]);
                }
            }
        }
        if constexpr (C::K8) {
#pragma unroll
            for (int jq = 0; jq < NT / 4; ++jq) {
                uint32_t b[4];
                ldsm_x4(b, k8_stage + jq * 32 * ROW * 2);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int i = 0; i < 4; ++i) mma_bf16_k8(s[mt][4 * jq + i], qf8[mt], b[i]);
            }
        }
        // Only the segment's last tile can reach past it: s[.][j][e] is key 8j + 2tq + (e & 1) of the tile.
        if (kt * KT + KT > seg_len) {
            const int live = seg_len - kt * KT;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int j = 0; j < NT; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        if (8 * j + 2 * tq + (e & 1) >= live) s[mt][j][e] = -INFINITY;
        }

        // Online softmax; a row lives in the four lanes of a quad. The maxima are of raw scores
        // (scale_log2 > 0 preserves the order), finite from the first tile on (its key 0 is live).
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            float mx[2] = {fmaxf(m[mt][0], row_reduce<0>(s[mt], MaxOp{})), fmaxf(m[mt][1], row_reduce<2>(s[mt], MaxOp{}))};
#pragma unroll
            for (int off = 1; off <= 2; off <<= 1) {
                mx[0] = fmaxf(mx[0], __shfl_xor_sync(0xffffffffu, mx[0], off));
                mx[1] = fmaxf(mx[1], __shfl_xor_sync(0xffffffffu, mx[1], off));
            }
            // Keep a stale maximum while no row of the warp grows past it by 2^8 in probability: the
            // exponentials stay <= 256 (harmless for bf16 P and fp32 sums; the common factor cancels in
            // O / l) and the rescale of O, DT * 4 multiplies per m-tile, is skipped on most tiles. The
            // first tile always takes it (m = -inf): c = 0 times the still-zero O and l.
            const bool grow = (mx[0] - m[mt][0]) * scale_log2 > 8.0f || (mx[1] - m[mt][1]) * scale_log2 > 8.0f;
            if (__any_sync(0xffffffffu, grow)) {
                const float c0 = fast_exp2((m[mt][0] - mx[0]) * scale_log2);  // 0 on the first tile
                const float c1 = fast_exp2((m[mt][1] - mx[1]) * scale_log2);
                m[mt][0] = mx[0];
                m[mt][1] = mx[1];
                l[mt][0] *= c0;
                l[mt][1] *= c1;
#pragma unroll
                for (int j = 0; j < DT; ++j) {
                    o[mt][j][0] *= c0;
                    o[mt][j][1] *= c0;
                    o[mt][j][2] *= c1;
                    o[mt][j][3] *= c1;
                }
            }
            const float sub0 = m[mt][0] * scale_log2, sub1 = m[mt][1] * scale_log2;
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                s[mt][j][0] = fast_exp2(fmaf(s[mt][j][0], scale_log2, -sub0));
                s[mt][j][1] = fast_exp2(fmaf(s[mt][j][1], scale_log2, -sub0));
                s[mt][j][2] = fast_exp2(fmaf(s[mt][j][2], scale_log2, -sub1));
                s[mt][j][3] = fast_exp2(fmaf(s[mt][j][3], scale_log2, -sub1));
            }
            l[mt][0] += row_reduce<0>(s[mt], AddOp{});
            l[mt][1] += row_reduce<2>(s[mt], AddOp{});
        }

        // O += P V. The C layout of score n-tiles 2kk and 2kk + 1 is the A layout of the 16-key k-step kk.
#pragma unroll
        for (int kk = 0; kk < KT / 16; ++kk) {
            uint32_t a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                a[mt][0] = pack_bf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                a[mt][1] = pack_bf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                a[mt][2] = pack_bf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                a[mt][3] = pack_bf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
            const uint32_t v_k = v_stage + kk * 16 * ROW * 2;
#pragma unroll
            for (int jp = 0; jp < DT / 2; ++jp) {
                uint32_t b[4];
                ldsm_x4_trans(b, v_k + jp * 32);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_bf16(o[mt][2 * jp], a[mt], b[0], b[1]);
                    mma_bf16(o[mt][2 * jp + 1], a[mt], b[2], b[3]);
                }
            }
            if constexpr (DT % 2 != 0) {
                uint32_t b[2];
                ldsm_x2_trans(b, v_k + (DT / 2) * 32);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) mma_bf16(o[mt][DT - 1], a[mt], b[0], b[1]);
            }
        }
    }
    cp_async_wait<0>();  // only empty groups remain; nothing may be in flight at exit
    pdl_launch_dependents();

    if (!warp_active) return;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
            l[mt][0] += __shfl_xor_sync(0xffffffffu, l[mt][0], off);
            l[mt][1] += __shfl_xor_sync(0xffffffffu, l[mt][1], off);
        }
        // o[mt][j][0..1] are dims 8j + 2tq, +1 of row g of the m-tile; o[mt][j][2..3] those of row g + 8.
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = q0 + (warp * MT + mt) * 16 + g + 8 * half;
            if (r >= seg_len) continue;
            const float inv = 1.0f / l[mt][half];
            __nv_bfloat16* dst = out + (first + r) * hidden + static_cast<size_t>(h) * HD + 2 * tq;
#pragma unroll
            for (int j = 0; j < DT; ++j)
                *reinterpret_cast<uint32_t*>(dst + 8 * j) = pack_bf16(o[mt][j][2 * half] * inv, o[mt][j][2 * half + 1] * inv);
        }
    }
}

template <class C>
void launch_bf16(const __nv_bfloat16* qkv, int segments, int seg_len, int heads, float scale, __nv_bfloat16* out,
                 cudaStream_t stream) {
    auto* kernel = vision_attention_bf16_kernel<C>;
    Q3N_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(C::smem_bytes)));
    // All of the unified L1 as shared memory, so that MIN_BLOCKS blocks fit side by side (cp.async.cg
    // bypasses L1 and nothing else is cached there).
    Q3N_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
    const dim3 grid((seg_len + C::BQ - 1) / C::BQ, heads, segments);
    Q3N_CUDA(launch_pdl(kernel, grid, dim3(C::THREADS), C::smem_bytes, stream, qkv, seg_len, heads,
                        scale * 1.4426950408889634f, out));
}

// Tilings, measured on an H100 at 4096 tokens x 16 heads against 4 or 8 warps, 1 or 2 m-tiles per
// warp, 32 or 64 keys per tile, 2 or 3 stages (TFLOP/s of the QK^T and PV products at head_dim 64 /
// 72 / 80 / 128: 307 / 304 / 318 / 297; the best 1-m-tile tiling gave 262 at 72):
//   head_dim <= 80: 8 warps x 2 m-tiles (256 queries), 64 keys, one block of ~250 registers per SM;
//   head_dim > 80: 4 warps x 2 m-tiles (128 queries), 32 keys (fewer score registers), two blocks.
// Grids too small to fill every SM with those (a 448x448 image is 784 tokens: 4 blocks of 256 per
// head) take 4 warps x 1 m-tile (64 queries) instead, 3 or 2 blocks per SM (784 tokens, 16 heads,
// head_dim 72: 131 TFLOP/s against 94 with the wide tiling).
template <int HD>
using WideTiling = std::conditional_t<(HD <= 80), Bf16Tiling<HD, 8, 2, 64, 2, 1>, Bf16Tiling<HD, 4, 2, 32, 2, 2>>;
template <int HD>
using NarrowTiling = Bf16Tiling<HD, 4, 1, 64, 2, (HD <= 80 ? 3 : 2)>;

template <int HD>
void dispatch_bf16(const __nv_bfloat16* qkv, int segments, int seg_len, int heads, float scale, __nv_bfloat16* out,
                   cudaStream_t stream) {
    using Wide = WideTiling<HD>;
    const int sms = sm_count();
    const long long wide_blocks = static_cast<long long>((seg_len + Wide::BQ - 1) / Wide::BQ) * heads * segments;
    if (wide_blocks >= static_cast<long long>(sms) * Wide::MIN_BLOCKS)
        launch_bf16<Wide>(qkv, segments, seg_len, heads, scale, out, stream);
    else
        launch_bf16<NarrowTiling<HD>>(qkv, segments, seg_len, heads, scale, out, stream);
}

}  // namespace

void vision_attention(const float* qkv, int segments, int seg_len, int heads, int head_dim, float scale, float* out,
                      cudaStream_t stream) {
    if (segments == 0 || seg_len == 0) return;
    switch (head_dim) {
        case 24: launch<24, 32>(qkv, segments, seg_len, heads, scale, out, stream); break;
        case 32: launch<32, 32>(qkv, segments, seg_len, heads, scale, out, stream); break;
        case 64: launch<64, 32>(qkv, segments, seg_len, heads, scale, out, stream); break;
        case 72: launch<72, 32>(qkv, segments, seg_len, heads, scale, out, stream); break;
        case 80: launch<80, 16>(qkv, segments, seg_len, heads, scale, out, stream); break;
        case 128: launch<128, 8>(qkv, segments, seg_len, heads, scale, out, stream); break;
        default:
            fail(Q3N_ERR_UNSUPPORTED, "vision attention on CUDA has no kernel for head_dim " + std::to_string(head_dim));
    }
    Q3N_CUDA_LAUNCHED("vision_attention");
}

void vision_attention_bf16(const __nv_bfloat16* qkv, int segments, int seg_len, int heads, int head_dim, float scale,
                           __nv_bfloat16* out, cudaStream_t stream, const VisionRopeTable* q_rope) {
    if (segments == 0 || seg_len == 0) return;
    require(segments > 0 && seg_len > 0 && heads > 0 && segments <= 65535 && heads <= 65535, Q3N_ERR_INVALID_ARGUMENT,
            "vision_attention_bf16: bad shape");
    require(scale > 0.0f, Q3N_ERR_INVALID_ARGUMENT, "vision_attention_bf16: the scale must be positive");
    require(reinterpret_cast<uintptr_t>(qkv) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 4 == 0,
            Q3N_ERR_INVALID_ARGUMENT, "vision_attention_bf16: qkv must be 16-byte aligned and out 4-byte aligned");
    if (vision_attention_wgmma_applies(head_dim)) {
        vision_attention_bf16_wgmma(qkv, segments, seg_len, heads, head_dim, scale, out, stream, 0, q_rope);
        return;
    }
    require(q_rope == nullptr, Q3N_ERR_INVALID_ARGUMENT,
            "vision_attention_bf16: only the wgmma kernels turn q (head_dim " + std::to_string(head_dim) + ")");
    switch (head_dim) {
        case 8: dispatch_bf16<8>(qkv, segments, seg_len, heads, scale, out, stream); break;
        case 16: dispatch_bf16<16>(qkv, segments, seg_len, heads, scale, out, stream); break;
        case 24: dispatch_bf16<24>(qkv, segments, seg_len, heads, scale, out, stream); break;
        case 32: dispatch_bf16<32>(qkv, segments, seg_len, heads, scale, out, stream); break;
        case 40: dispatch_bf16<40>(qkv, segments, seg_len, heads, scale, out, stream); break;
        case 48: dispatch_bf16<48>(qkv, segments, seg_len, heads, scale, out, stream); break;
        case 56: dispatch_bf16<56>(qkv, segments, seg_len, heads, scale, out, stream); break;
        case 64: dispatch_bf16<64>(qkv, segments, seg_len, heads, scale, out, stream); break;
        case 72: dispatch_bf16<72>(qkv, segments, seg_len, heads, scale, out, stream); break;
        case 80: dispatch_bf16<80>(qkv, segments, seg_len, heads, scale, out, stream); break;
        case 88: dispatch_bf16<88>(qkv, segments, seg_len, heads, scale, out, stream); break;
        case 96: dispatch_bf16<96>(qkv, segments, seg_len, heads, scale, out, stream); break;
        case 104: dispatch_bf16<104>(qkv, segments, seg_len, heads, scale, out, stream); break;
        case 112: dispatch_bf16<112>(qkv, segments, seg_len, heads, scale, out, stream); break;
        case 120: dispatch_bf16<120>(qkv, segments, seg_len, heads, scale, out, stream); break;
        case 128: dispatch_bf16<128>(qkv, segments, seg_len, heads, scale, out, stream); break;
        default:
            fail(Q3N_ERR_UNSUPPORTED,
                 "vision attention (bf16) on CUDA has no kernel for head_dim " + std::to_string(head_dim));
    }
}

}  // namespace q3n::cuda
