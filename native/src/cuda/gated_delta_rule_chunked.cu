// The gated delta rule in chunked form (spec 3.4 step 5'), the prefill kernel: the chunk products on
// tensor cores with fp32 accuracy, the state in fp32.
//
// Numerics. Every product runs on mma.sync m16n8k8 tf32 -> fp32 as three: x = hi + lo, hi = x rounded
// to tf32 (11 significant bits), lo = x - hi (exact in fp32; the tensor core keeps its top 11 bits),
// and x y ~ hi hi' + hi lo' + lo hi'. The dropped lo lo' and the truncation of lo are ~2^-22 of the
// product, so each product is about as accurate as the fp32 dot product it replaces, where one tf32
// product (2^-11 per input) would leave ~3e-4 relative error on the outputs, 30x the 1e-5 the tests
// hold this kernel to against the CPU recurrence. The three parts accumulate in separate registers
// (independent mma chains) and each product starts from zero: the state S (fp32, in registers for the
// whole sequence), exp(G) and the decays meet the products only in ordinary fp32 arithmetic.
//
// Work split. Each block owns a 32-column slice of one (sequence, value head)'s state and walks the
// sequence's chunks of 64 tokens in order (32 value heads x 4 slices fill an H100 with one 8192-token
// prompt). Columns of S are independent in the recurrence, but the key-side products, raw K K^T and
// Q K^T, are the same for every slice: the slices of a head form clusters of CS blocks (4, or 2 where
// clusters of 4 would not all fit at once, as on H100 and H200 with one block per SM), and each block
// computes 1/CS of their 16 x 8 blocks and writes them into every block's shared memory (DSMEM), one
// cluster barrier per chunk. The rest is recomputed per block because it is small: the decay and
// gate scaling of those blocks, T = (I + M)^-1 (16 x 16 diagonal blocks by forward substitution with
// one lane per column, then two rounds of block products: T_10 and T_32, then the lower-left 32 x 32
// block), and everything that involves the slice: X = K S, Y = Q S, R = diag(beta) (V - diag(e^G) X),
// V' = T R (the spec's U - W S: U = T diag(beta) V and W = T diag(beta e^G) K, never formed),
// O = diag(e^G) Y + A V' and S <- e^G_last S + K^T diag(e^(G_last - G)) V'.
//
// q and k are copied raw (cp.async, prefetched a chunk ahead: K_{c+1} into Q_c's buffer once Q_c is
// done with, Q_{c+1} into K_c's after the state update) and the L2 normalisation is applied as row
// factors on the products (rk_i rk_j on K K^T, rq_i rk_j on Q K^T, rk_i on X, folded into V'' for the
// update), which is the same linear algebra as normalising first. Every block reads its key head's
// whole q and k chunk (72 KB with V per block and chunk, the 8 blocks of a key head hitting the same
// rows in L2); issuing those copies stalls the warps for ~20% of a chunk on an H100 whether they go
// out at once or spread over the phases, which a multicast bulk copy per cluster would cut.
//
// Fragments come from shared memory in 8-byte pairs: an mma may take its 8 k indices in any order as
// long as A and B agree, so k-step k0 reads logical k = t and t + 4 from columns k0 + 2t and 2t + 1.
// Strides are chosen per use so no load conflicts: a row-major pair load (element [g][2t]) wants a
// stride of 8 or 24 mod 32, a k-major B read along rows 2t and 2t + 1 4 mod 16, and the update's K^T
// (natural order, element [t][g]) 8 mod 32, which the Q / K stride also is.
//
// dk > 128 takes the fp32 CUDA-core kernel kept below (one block per 32-column slice, everything
// recomputed per block): Q, K and S of a 256-dim head do not fit next to the tensor-core path's tiles.
#include <atomic>

#include "core/error.h"
#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/next_ops.h"

namespace q3n::cuda {
namespace {

constexpr int C = 64;         // chunk length, as cpu::kGdnChunk
constexpr int BV = 32;        // state columns per block
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// ---- Tensor-core path ----------------------------------------------------------------------------

constexpr int kTiles = 10;          // 16 x 16 blocks on and below the diagonal of a C x C matrix
constexpr int kTld = 24;            // their row stride (A operands)
constexpr int kTile = 16 * kTld;
constexpr int kLdt = C + 8;         // T (A operand)
constexpr int kLdp = 2 * BV + 4;    // S as (hi, lo) pairs (B operand along rows 2t, 2t + 1)
constexpr int kLdr = BV + 4;        // R, V' (B operands along rows 2t, 2t + 1)
constexpr int kLdw = BV + 8;        // V'' (B operand of the update, natural order)
constexpr int kLdz = 12;            // per-warp scratch of the T rounds (B operand along rows 2t, 2t + 1)
constexpr int kZ = 32 * kLdz;

// Block (p, q), p >= q, of the lower block triangle is tile p (p + 1) / 2 + q.
__host__ __device__ constexpr int tri(int p) { return p * (p + 1) / 2; }
__host__ __device__ constexpr int tile_row(int tau) { return tau < 1 ? 0 : tau < 3 ? 1 : tau < 6 ? 2 : 3; }

// Offsets in floats. DKP: dk rounded up to 64 (64 or 128).
template <int DKP>
struct Smem {
    static constexpr int LDK = DKP + 8;                     // Q and K rows
    static constexpr int QK = 0;                            // two C x LDK buffers; K and Q swap each chunk
    static constexpr int RAW = QK + 2 * C * LDK;            // [2 chunks][M tiles, A tiles][kTile]
    static constexpr int TM = RAW + 2 * 2 * kTiles * kTile;  // T, C x kLdt
    static constexpr int SP = TM + C * kLdt;                // S split, DKP x kLdp
    static constexpr int RS = SP + DKP * kLdp;              // R, V', V''
    static constexpr int VP = RS + C * kLdr;
    static constexpr int VPP = VP + C * kLdr;
    static constexpr int ZS = VPP + C * kLdw;
    static constexpr int VEC = ZS + 4 * kZ;                 // G, exp(G), fk, beta, rq, rk
    static constexpr int FLOATS = VEC + 6 * C;
    static constexpr size_t BYTES = static_cast<size_t>(FLOATS) * sizeof(float);
    static_assert(RAW % 4 == 0 && TM % 4 == 0 && SP % 4 == 0 && RS % 4 == 0 && VP % 4 == 0 && VPP % 4 == 0 &&
                      ZS % 4 == 0 && VEC % 4 == 0 && LDK % 32 == 8,
                  "16-byte aligned regions; conflict-free Q / K strides");
    static_assert(BYTES <= 227 * 1024, "fits a block's shared memory");
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// src_bytes = 0 writes zeros: rows past the chunk's end.
__device__ __forceinline__ void cp_async16(float* dst, const float* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async4(float* dst, const float* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ uint32_t cluster_rank() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}
// The release is a GPU-scope fence (MEMBAR.GPU): it waits for this thread's outstanding stores, so
// it goes late in the chunk, when the DSMEM and global stores before it have long landed.
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory"); }

// Two floats at `local` in the shared memory of every block of the cluster (this one included).
template <int CS>
__device__ __forceinline__ void put2_all(float* local, float a, float b) {
    if constexpr (CS == 1) {
        *reinterpret_cast<float2*>(local) = make_float2(a, b);
    } else {
        const uint32_t addr = smem_addr(local);
#pragma unroll
        for (int r = 0; r < CS; ++r) {
            uint32_t remote;
            asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(addr), "r"(r));
            asm volatile("st.shared::cluster.v2.f32 [%0], {%1, %2};\n" ::"r"(remote), "f"(a), "f"(b) : "memory");
        }
    }
}

// x = hi + lo: hi rounded to nearest (ties away) at tf32's 10 mantissa bits, lo = x - hi exactly.
__device__ __forceinline__ void split(float x, uint32_t& hi, uint32_t& lo) {
    hi = (__float_as_uint(x) + 0x1000u) & 0xffffe000u;
    lo = __float_as_uint(x - __uint_as_float(hi));
}

__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// acc[0] += hi hi', acc[1] += hi lo', acc[2] += lo hi': three independent chains, so a warp keeps
// three mma in flight per output block (a phase here is a few dozen mma per warp: latency, not
// throughput, bounds it).
__device__ __forceinline__ void mma3(float (&acc)[3][4], const uint32_t (&ah)[4], const uint32_t (&al)[4],
                                     const uint32_t (&bh)[2], const uint32_t (&bl)[2]) {
    mma_tf32(acc[1], ah, bl);
    mma_tf32(acc[2], al, bh);
    mma_tf32(acc[0], ah, bh);
}
__device__ __forceinline__ float sum3(const float (&acc)[3][4], int e) { return acc[0][e] + (acc[1][e] + acc[2][e]); }

// Fragments (PTX ISA, mma.m16n8k8 .tf32), lane = 4 g + t:
//   A 16x8: a0 = A[g][t], a1 = A[g+8][t], a2 = A[g][t+4], a3 = A[g+8][t+4]
//   B 8x8:  b0 = B[t][g], b1 = B[t+4][g]
//   C 16x8: c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
// The pair order: logical k = t, t + 4 at memory k = 2t, 2t + 1.
// A row-major at p (A[m][k] = p[m * ld + k]), pair order.
__device__ __forceinline__ void load_a(const float* p, int ld, int g, int t, uint32_t (&hi)[4], uint32_t (&lo)[4]) {
    const float2 r0 = *reinterpret_cast<const float2*>(p + g * ld + 2 * t);
    const float2 r1 = *reinterpret_cast<const float2*>(p + (g + 8) * ld + 2 * t);
    split(r0.x, hi[0], lo[0]);
    split(r1.x, hi[1], lo[1]);
    split(r0.y, hi[2], lo[2]);
    split(r1.y, hi[3], lo[3]);
}
// B k-major (B[k][n] = p[k * ld + n]), pair order.
__device__ __forceinline__ void load_b_kn(const float* p, int ld, int g, int t, uint32_t (&hi)[2], uint32_t (&lo)[2]) {
    split(p[2 * t * ld + g], hi[0], lo[0]);
    split(p[(2 * t + 1) * ld + g], hi[1], lo[1]);
}
// B n-major (B[k][n] = p[n * ld + k], rows of K as the columns of K^T), pair order.
__device__ __forceinline__ void load_b_nk(const float* p, int ld, int g, int t, uint32_t (&hi)[2], uint32_t (&lo)[2]) {
    const float2 r = *reinterpret_cast<const float2*>(p + g * ld + 2 * t);
    split(r.x, hi[0], lo[0]);
    split(r.y, hi[1], lo[1]);
}

// 16 x 8 block of X Y^T over the padded key dimension: X rows at a, Y rows at b (stride LDK).
template <int DKP>
__device__ __forceinline__ void rows_dot(const float* a, const float* b, int g, int t, float (&c)[4]) {
    constexpr int LDK = Smem<DKP>::LDK;
    float acc[3][4] = {};
#pragma unroll 4
    for (int ks = 0; ks < DKP / 8; ++ks) {
        uint32_t ah[4], al[4], bh[2], bl[2];
        load_a(a + 8 * ks, LDK, g, t, ah, al);
        load_b_nk(b + 8 * ks, LDK, g, t, bh, bl);
        mma3(acc, ah, al, bh, bl);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) c[e] = sum3(acc, e);
}

// 16 rows (at a, stride LDK) times 16 columns of the state slice (sp: its (hi, lo) pairs at the
// first of those columns): two 16 x 8 blocks.
template <int DKP>
__device__ __forceinline__ void rows_times_state(const float* a, const float* sp, int g, int t, float (&c)[2][4]) {
    constexpr int LDK = Smem<DKP>::LDK;
    float acc[2][3][4] = {};
#pragma unroll 4
    for (int ks = 0; ks < DKP / 8; ++ks) {
        uint32_t ah[4], al[4];
        load_a(a + 8 * ks, LDK, g, t, ah, al);
#pragma unroll
        for (int n = 0; n < 2; ++n) {
            const float* p = sp + (8 * ks + 2 * t) * kLdp + 2 * (8 * n + g);
            const float2 b0 = *reinterpret_cast<const float2*>(p), b1 = *reinterpret_cast<const float2*>(p + kLdp);
            const uint32_t bh[2] = {__float_as_uint(b0.x), __float_as_uint(b1.x)};
            const uint32_t bl[2] = {__float_as_uint(b0.y), __float_as_uint(b1.y)};
            mma3(acc[n], ah, al, bh, bl);
        }
    }
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) c[n][e] = sum3(acc[n], e);
}

// The state slice in the update's accumulator layout -> its split pairs, the B operand of K S and Q S.
template <int MT>
__device__ __forceinline__ void store_state_split(const float (&st)[MT][2][4], float* sp, int rg, int ch, int g,
                                                  int t) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                uint32_t h0, l0, h1, l1;
                split(st[mt][n][2 * r], h0, l0);
                split(st[mt][n][2 * r + 1], h1, l1);
                *reinterpret_cast<float4*>(sp + (16 * (rg + 4 * mt) + g + 8 * r) * kLdp + 2 * (16 * ch + 8 * n + 2 * t)) =
                    make_float4(__uint_as_float(h0), __uint_as_float(l0), __uint_as_float(h1), __uint_as_float(l1));
            }
}

// Rows [t0, t0 + L) of q or k (dk columns from `src`) into a C-row buffer, a warp per row; rows past
// L are zero-filled, columns past dk were zeroed once and are never written.
template <int LDK>
__device__ __forceinline__ void issue_rows(float* dst, const float* src, int stride, int t0, int L, int dk, bool vec4) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll 1
    for (int i = warp; i < C; i += kWarps) {
        const bool ok = i < L;
        const float* s = src + static_cast<size_t>(t0 + (ok ? i : 0)) * stride;
        float* d = dst + i * LDK;
        if (vec4)
            for (int x = 4 * lane; x < dk; x += 128) cp_async16(d + x, s + x, ok ? 16 : 0);
        else
            for (int x = lane; x < dk; x += 32) cp_async4(d + x, s + x, ok ? 4 : 0);
    }
}

// post_scale / ||row|| (as cpu::l2norm_heads: eps inside the root) for this warp's 8 rows, 0 past
// the chunk's end: the 8 sums reduce side by side, and lane r takes row r's root.
template <int DKP>
__device__ __forceinline__ void row_factors(const float* buf, int L, bool l2norm, float eps, float post_scale,
                                            float* dst) {
    constexpr int LDK = Smem<DKP>::LDK, R = C / kWarps;
    const int lane = threadIdx.x & 31, row0 = (threadIdx.x >> 5) * R;
    float f = post_scale;
    if (l2norm) {
        float ss[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            ss[r] = 0.0f;
#pragma unroll
            for (int x = lane; x < DKP; x += 32) ss[r] += buf[(row0 + r) * LDK + x] * buf[(row0 + r) * LDK + x];
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
#pragma unroll
            for (int r = 0; r < R; ++r) ss[r] += __shfl_xor_sync(0xffffffffu, ss[r], o);
        float mine = ss[0];
#pragma unroll
        for (int r = 1; r < R; ++r) mine = lane == r ? ss[r] : mine;
        f *= 1.0f / sqrtf(mine + eps);
    }
    if (lane < R) dst[row0 + lane] = row0 + lane < L ? f : 0.0f;
}

// Block roles inside a chunk (warp w, lane = 4 g + t):
//   ch = w >> 2: the slice's columns 16 ch .. 16 ch + 15 everywhere;
//   rt: the chunk's rows 16 rt .. + 15 in X, Y, R, V', O; w & 3 for ch = 0 and 3 - (w & 3) for ch = 1,
//       so the two warps of a scheduler (w, w + 4) get complementary shares of the triangular T R, A V';
//   rg = w & 3: the state rows 16 (rg + 4 m) .. + 15 (m < DKP / 64) in the update.
template <int DKP, int CS>
__global__ void __cluster_dims__(CS, 1, 1) __launch_bounds__(kThreads, 1)
    gdn_chunked_tc_kernel(GdnShape sh, GdnInputs in, float scale, const int32_t* seq_starts, float* const* state,
                          float* out, bool vec4) {
    using SM = Smem<DKP>;
    constexpr int LDK = SM::LDK, MT = DKP / 64;
    extern __shared__ __align__(16) float smem[];
    float* const Tm = smem + SM::TM;
    float* const Sp = smem + SM::SP;
    float* const Rs = smem + SM::RS;
    float* const Vp = smem + SM::VP;
    float* const Vpp = smem + SM::VPP;
    float* const Zw = smem + SM::ZS + (threadIdx.x >> 5 & 3) * kZ;  // warps 0-3 use it
    float* const Gs = smem + SM::VEC;
    float* const eGs = Gs + C;
    float* const fks = eGs + C;  // rk_i exp(G_last - G_i): the update's row factors
    float* const bs = fks + C;
    float* const rqs = bs + C;
    float* const rks = rqs + C;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int ch = warp >> 2, rg = warp & 3, rt = ch == 0 ? rg : 3 - rg;
    const int c0 = blockIdx.x * BV, h = blockIdx.y, s = blockIdx.z;
    const int rank = CS == 1 ? 0 : static_cast<int>(cluster_rank());

    for (int i = tid; i < 2 * C * LDK; i += kThreads) smem[SM::QK + i] = 0.0f;
    pdl_wait();
    const int t_begin = seq_starts[s], t_end = seq_starts[s + 1];
    if (t_begin >= t_end) return;  // the whole cluster: its blocks share the sequence
    const int dk = sh.dk, dv = sh.dv, nv = sh.nv, kh = h / (nv / sh.nk);
    float* const S = state[s] + static_cast<size_t>(h) * dk * dv;
    const float* const qsrc = in.q + kh * dk;
    const float* const ksrc = in.k + kh * dk;

    float st[MT][2][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = 16 * (rg + 4 * mt) + g + 8 * (e >> 1), col = c0 + 16 * ch + 8 * n + 2 * t + (e & 1);
                st[mt][n][e] = row < dk && col < dv ? S[static_cast<size_t>(row) * dv + col] : 0.0f;
            }
    store_state_split<MT>(st, Sp, rg, ch, g, t);

    // Chunk c + 1's V (at this thread's R positions), g and beta (warp 0: rows lane, lane + 32).
    float vpre[2][4], gpre[2], bpre[2];
    auto prefetch = [&](int t0, int L) {
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = 16 * rt + g + 8 * (e >> 1), col = c0 + 16 * ch + 8 * n + 2 * t + (e & 1);
                vpre[n][e] = row < L && col < dv ? in.v[static_cast<size_t>(t0 + row) * in.v_stride + h * dv + col] : 0.0f;
            }
        if (warp == 0)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int row = lane + 32 * r;
                gpre[r] = row < L ? in.g[static_cast<size_t>(t0 + row) * nv + h] : 0.0f;
                bpre[r] = row < L ? in.beta[static_cast<size_t>(t0 + row) * nv + h] : 0.0f;
            }
    };

    __syncthreads();  // the zero fill lands before any copy into the same rows
    {
        const int L0 = min(C, t_end - t_begin);
        issue_rows<LDK>(smem + SM::QK, ksrc, in.k_stride, t_begin, L0, dk, vec4);
        cp_async_commit();
        issue_rows<LDK>(smem + SM::QK + C * LDK, qsrc, in.q_stride, t_begin, L0, dk, vec4);
        cp_async_commit();
        prefetch(t_begin, L0);
    }
    if constexpr (CS > 1) {  // every block of the cluster running before anyone writes into it
        cluster_arrive();
        cluster_wait();
    }

    int it = 0;
    for (int t0 = t_begin; t0 < t_end; t0 += C, ++it) {
        const int L = min(C, t_end - t0);
        const bool more = t0 + C < t_end;
        const int L1 = more ? min(C, t_end - t0 - C) : 0;
        float* const kb = smem + SM::QK + (it & 1) * C * LDK;
        float* const qb = smem + SM::QK + ((it + 1) & 1) * C * LDK;
        // Blocks write chunk c's tiles into buffer c & 1 of every block once they are past chunk c - 1's
        // cluster barrier, which every block reaches only after finishing chunk c - 2.
        float* const raw = smem + SM::RAW + (it & 1) * 2 * kTiles * kTile;

        // ---- G (inclusive cumsum in the chunk; rows past L add 0), exp(G), beta.
        if (warp == 0) {
            float a = gpre[0], b = gpre[1];
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const float x = __shfl_up_sync(0xffffffffu, a, o), y = __shfl_up_sync(0xffffffffu, b, o);
                if (lane >= o) a += x, b += y;
            }
            b += __shfl_sync(0xffffffffu, a, 31);
            Gs[lane] = a;
            Gs[lane + 32] = b;
            eGs[lane] = expf(a);
            eGs[lane + 32] = expf(b);
            bs[lane] = bpre[0];
            bs[lane + 32] = bpre[1];
        }
        cp_async_wait<1>();  // K_c (Q_c may still be in flight)
        __syncthreads();
        const float g_last = Gs[L - 1];

        // ---- K's row factors, raw K K^T blocks (this block's share), X = K S.
        row_factors<DKP>(kb, L, in.l2norm, in.l2norm_eps, 1.0f, rks);
        const int shares = 2 * kTiles / CS;  // 16 x 8 blocks of each of M and A per cluster rank
        for (int li = warp; li < shares; li += kWarps) {
            const int j = li * CS + rank, tau = j >> 1, hh = j & 1, p = tile_row(tau), q = tau - tri(p);
            float c[4];
            rows_dot<DKP>(kb + 16 * p * LDK, kb + (16 * q + 8 * hh) * LDK, g, t, c);
            float* d = raw + tau * kTile + g * kTld + 8 * hh + 2 * t;
            put2_all<CS>(d, c[0], c[1]);
            put2_all<CS>(d + 8 * kTld, c[2], c[3]);
        }
        float x[2][4];
        rows_times_state<DKP>(kb + 16 * rt * LDK, Sp + 2 * 16 * ch, g, t, x);

        cp_async_wait<0>();  // Q_c
        __syncthreads();     // ... in every thread's view; rk visible

        // ---- R = diag(beta) (V - diag(exp(G) rk) X): the right-hand side of (I + M) V' = R.
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int row = 16 * rt + g + 8 * r, col = 16 * ch + 8 * n + 2 * t;
                const float f = eGs[row] * rks[row], b = bs[row];
                *reinterpret_cast<float2*>(Rs + row * kLdr + col) =
                    make_float2(b * (vpre[n][2 * r] - f * x[n][2 * r]), b * (vpre[n][2 * r + 1] - f * x[n][2 * r + 1]));
            }

        // ---- Raw Q K^T blocks, Y = Q S, Q's row factors.
        for (int li = warp; li < shares; li += kWarps) {
            const int j = li * CS + rank, tau = j >> 1, hh = j & 1, p = tile_row(tau), q = tau - tri(p);
            float c[4];
            rows_dot<DKP>(qb + 16 * p * LDK, kb + (16 * q + 8 * hh) * LDK, g, t, c);
            float* d = raw + (kTiles + tau) * kTile + g * kTld + 8 * hh + 2 * t;
            put2_all<CS>(d, c[0], c[1]);
            put2_all<CS>(d + 8 * kTld, c[2], c[3]);
        }
        float y[2][4];
        rows_times_state<DKP>(qb + 16 * rt * LDK, Sp + 2 * 16 * ch, g, t, y);
        row_factors<DKP>(qb, L, in.l2norm, in.l2norm_eps, scale, rqs);
        if constexpr (CS > 1) cluster_arrive();
        __syncthreads();  // Q_c is finished with; R and rq visible
        if constexpr (CS > 1) cluster_wait();  // every block's tiles of this chunk are in `raw`
        // The next chunk's K (into Q_c's buffer), V, g and beta.
        if (more) {
            issue_rows<LDK>(qb, ksrc, in.k_stride, t0 + C, L1, dk, vec4);
            prefetch(t0 + C, L1);
        }
        cp_async_commit();  // possibly empty: one group per half-chunk keeps the waits above uniform

        // ---- M = strict_lower(diag(beta) K K^T . D) and A = lower(Q K^T . D) in place, with the row
        // factors; D_ij = exp(G_i - G_j) only where i >= j (G falls along the chunk, so the upper
        // part could overflow). Thread (il, jl) takes entry (il, jl) of every tile, so it reads the
        // factors of 4 rows and 4 columns once.
        {
            const int il = tid >> 4, jl = tid & 15;
            float gi[4], gj[4], fi[4], fa[4], rj[4], mv[kTiles], av[kTiles];
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                const int i = 16 * p + il, j = 16 * p + jl;
                gi[p] = Gs[i];
                fi[p] = bs[i] * rks[i];
                fa[p] = rqs[i];
                gj[p] = Gs[j];
                rj[p] = rks[j];
            }
#pragma unroll
            for (int tau = 0; tau < kTiles; ++tau) {
                mv[tau] = raw[tau * kTile + il * kTld + jl];
                av[tau] = raw[(kTiles + tau) * kTile + il * kTld + jl];
            }
#pragma unroll
            for (int tau = 0; tau < kTiles; ++tau) {
                const int p = tile_row(tau), q = tau - tri(p);
                float m = 0.0f, a = 0.0f;
                if (p > q || il >= jl) {
                    const float d = expf(gi[p] - gj[q]) * rj[q];
                    m = p > q || il > jl ? mv[tau] * (fi[p] * d) : 0.0f;
                    a = av[tau] * (fa[p] * d);
                }
                raw[tau * kTile + il * kTld + jl] = m;
                raw[(kTiles + tau) * kTile + il * kTld + jl] = a;
            }
            if (tid < C) fks[tid] = tid < L ? rks[tid] * expf(g_last - Gs[tid]) : 0.0f;
        }
        __syncthreads();

        // ---- T = (I + M)^-1. Diagonal blocks: T_pp column j by lane j of warp p, in registers.
        if (warp < 4 && lane < 16) {
            const float* m = raw + (tri(warp) + warp) * kTile;
            float tc[16];
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                float a0 = 0.0f, a1 = 0.0f;  // two chains: half the dependent latency
#pragma unroll
                for (int k = 0; k < i; ++k) {
                    if (k & 1)
                        a1 = fmaf(m[i * kTld + k], tc[k], a1);
                    else
                        a0 = fmaf(m[i * kTld + k], tc[k], a0);
                }
                tc[i] = i == lane ? 1.0f : (i > lane ? -(a0 + a1) : 0.0f);
            }
            float* d = Tm + 16 * warp * kLdt + 16 * warp + lane;
#pragma unroll
            for (int i = 0; i < 16; ++i) d[i * kLdt] = tc[i];
        }
        __syncthreads();
        // T_10 = -T_11 M_10 T_00 and T_32 = -T_33 M_32 T_22, a 16 x 8 half per warp.
        if (warp < 4) {
            const int p = 2 * (warp >> 1) + 1, q = p - 1, hh = warp & 1;
            float z[3][4] = {};
#pragma unroll
            for (int kk = 0; kk < 2; ++kk) {
                uint32_t ah[4], al[4], bh[2], bl[2];
                load_a(raw + (tri(p) + q) * kTile + 8 * kk, kTld, g, t, ah, al);
                load_b_kn(Tm + (16 * q + 8 * kk) * kLdt + 16 * q + 8 * hh, kLdt, g, t, bh, bl);
                mma3(z, ah, al, bh, bl);
            }
            *reinterpret_cast<float2*>(Zw + g * kLdz + 2 * t) = make_float2(sum3(z, 0), sum3(z, 1));
            *reinterpret_cast<float2*>(Zw + (g + 8) * kLdz + 2 * t) = make_float2(sum3(z, 2), sum3(z, 3));
            __syncwarp();
            float o[3][4] = {};
#pragma unroll
            for (int kk = 0; kk < 2; ++kk) {
                uint32_t ah[4], al[4], bh[2], bl[2];
                load_a(Tm + 16 * p * kLdt + 16 * p + 8 * kk, kLdt, g, t, ah, al);
                load_b_kn(Zw + 8 * kk * kLdz, kLdz, g, t, bh, bl);
                mma3(o, ah, al, bh, bl);
            }
            float* d = Tm + (16 * p + g) * kLdt + 16 * q + 8 * hh + 2 * t;
            *reinterpret_cast<float2*>(d) = make_float2(-sum3(o, 0), -sum3(o, 1));
            *reinterpret_cast<float2*>(d + 8 * kLdt) = make_float2(-sum3(o, 2), -sum3(o, 3));
        }
        __syncthreads();
        // The lower-left 32 x 32 block, -T[32:, 32:] M[32:, :32] T[:32, :32], 8 columns per warp:
        // Z = M[32:, :32] T[:32, cols] (rows 32..63 of Z in the scratch), then -T[32:, 32:] Z.
        if (warp < 4) {
            const int nb = warp, q0 = nb >> 1;
#pragma unroll
            for (int p = 2; p < 4; ++p) {
                float z[3][4] = {};
                for (int mm = q0; mm < 2; ++mm)
#pragma unroll
                    for (int kk = 0; kk < 2; ++kk) {
                        uint32_t ah[4], al[4], bh[2], bl[2];
                        load_a(raw + (tri(p) + mm) * kTile + 8 * kk, kTld, g, t, ah, al);
                        load_b_kn(Tm + (16 * mm + 8 * kk) * kLdt + 8 * nb, kLdt, g, t, bh, bl);
                        mma3(z, ah, al, bh, bl);
                    }
                float* zr = Zw + (16 * (p - 2) + g) * kLdz + 2 * t;
                *reinterpret_cast<float2*>(zr) = make_float2(sum3(z, 0), sum3(z, 1));
                *reinterpret_cast<float2*>(zr + 8 * kLdz) = make_float2(sum3(z, 2), sum3(z, 3));
            }
            __syncwarp();
#pragma unroll
            for (int p = 2; p < 4; ++p) {
                float o[3][4] = {};
#pragma unroll
                for (int kk = 0; kk < 2 * (p - 1); ++kk) {  // T[16p.., 32 + 8 kk ..] against Z rows 8 kk ..
                    uint32_t ah[4], al[4], bh[2], bl[2];
                    load_a(Tm + 16 * p * kLdt + 32 + 8 * kk, kLdt, g, t, ah, al);
                    load_b_kn(Zw + 8 * kk * kLdz, kLdz, g, t, bh, bl);
                    mma3(o, ah, al, bh, bl);
                }
                float* d = Tm + (16 * p + g) * kLdt + 8 * nb + 2 * t;
                *reinterpret_cast<float2*>(d) = make_float2(-sum3(o, 0), -sum3(o, 1));
                *reinterpret_cast<float2*>(d + 8 * kLdt) = make_float2(-sum3(o, 2), -sum3(o, 3));
            }
        }
        __syncthreads();

        // ---- V' = T R (T lower triangular: k-blocks 0 .. rt), and V'' = diag(fk) V' for the update.
        {
            float acc[2][3][4] = {};
            for (int ks = 0; ks < 2 * rt + 2; ++ks) {
                uint32_t ah[4], al[4];
                load_a(Tm + 16 * rt * kLdt + 8 * ks, kLdt, g, t, ah, al);
#pragma unroll
                for (int n = 0; n < 2; ++n) {
                    uint32_t bh[2], bl[2];
                    load_b_kn(Rs + 8 * ks * kLdr + 16 * ch + 8 * n, kLdr, g, t, bh, bl);
                    mma3(acc[n], ah, al, bh, bl);
                }
            }
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int row = 16 * rt + g + 8 * r, col = 16 * ch + 8 * n + 2 * t;
                    const float v0 = sum3(acc[n], 2 * r), v1 = sum3(acc[n], 2 * r + 1);
                    const float f = fks[row];
                    *reinterpret_cast<float2*>(Vp + row * kLdr + col) = make_float2(v0, v1);
                    *reinterpret_cast<float2*>(Vpp + row * kLdw + col) = make_float2(f * v0, f * v1);
                }
        }
        __syncthreads();

        // ---- O = diag(exp(G) rq) Y + A V' for the chunk's rows.
        {
            float acc[2][3][4] = {};
            for (int ks = 0; ks < 2 * rt + 2; ++ks) {
                uint32_t ah[4], al[4];
                load_a(raw + (kTiles + tri(rt) + (ks >> 1)) * kTile + 8 * (ks & 1), kTld, g, t, ah, al);
#pragma unroll
                for (int n = 0; n < 2; ++n) {
                    uint32_t bh[2], bl[2];
                    load_b_kn(Vp + 8 * ks * kLdr + 16 * ch + 8 * n, kLdr, g, t, bh, bl);
                    mma3(acc[n], ah, al, bh, bl);
                }
            }
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = 16 * rt + g + 8 * (e >> 1), col = c0 + 16 * ch + 8 * n + 2 * t + (e & 1);
                    if (row < L && col < dv)
                        out[(static_cast<size_t>(t0 + row) * nv + h) * dv + col] =
                            eGs[row] * rqs[row] * y[n][e] + sum3(acc[n], e);
                }
        }

        // ---- S <- exp(G_last) S + K^T V'' (rk and the decays are in V''), tokens in natural order.
        {
            float acc[MT][2][3][4] = {};
#pragma unroll 2
            for (int ks = 0; ks < C / 8; ++ks) {
                const float* v = Vpp + (8 * ks + t) * kLdw + 16 * ch + g;
                uint32_t bh[2][2], bl[2][2];
#pragma unroll
                for (int n = 0; n < 2; ++n) {
                    split(v[8 * n], bh[n][0], bl[n][0]);
                    split(v[4 * kLdw + 8 * n], bh[n][1], bl[n][1]);
                }
                const float* k = kb + (8 * ks + t) * LDK + g;
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const int m0 = 16 * (rg + 4 * mt);
                    uint32_t ah[4], al[4];
                    split(k[m0], ah[0], al[0]);
                    split(k[m0 + 8], ah[1], al[1]);
                    split(k[4 * LDK + m0], ah[2], al[2]);
                    split(k[4 * LDK + m0 + 8], ah[3], al[3]);
#pragma unroll
                    for (int n = 0; n < 2; ++n) mma3(acc[mt][n], ah, al, bh[n], bl[n]);
                }
            }
            const float decay = expf(g_last);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < 2; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) st[mt][n][e] = decay * st[mt][n][e] + sum3(acc[mt][n], e);
            store_state_split<MT>(st, Sp, rg, ch, g, t);
        }
        __syncthreads();  // K_c, T, R, V', V'' and the state split are finished with
        if (more) issue_rows<LDK>(kb, qsrc, in.q_stride, t0 + C, L1, dk, vec4);
        cp_async_commit();
    }

    pdl_launch_dependents();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = 16 * (rg + 4 * mt) + g + 8 * (e >> 1), col = c0 + 16 * ch + 8 * n + 2 * t + (e & 1);
                if (row < dk && col < dv) S[static_cast<size_t>(row) * dv + col] = st[mt][n][e];
            }
}

// Clusters of CS blocks that fit on the device at once (0: none), asked once per device.
template <int DKP, int CS>
int resident_clusters() {
    static std::atomic<int> known[16];  // per device ordinal: count + 1, 0 = not asked yet
    int dev = 0;
    Q3N_CUDA(cudaGetDevice(&dev));
    if (dev < 16)
        if (const int v = known[dev].load(std::memory_order_relaxed)) return v - 1;
    const auto kernel = gdn_chunked_tc_kernel<DKP, CS>;
    Q3N_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(Smem<DKP>::BYTES)));
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(CS, 1, 1);
    config.blockDim = dim3(kThreads, 1, 1);
    config.dynamicSmemBytes = Smem<DKP>::BYTES;
    int n = 0;
    Q3N_CUDA(cudaOccupancyMaxActiveClusters(&n, kernel, &config));
    if (dev < 16) known[dev].store(n + 1, std::memory_order_relaxed);
    return n;
}

template <int DKP, int CS>
void launch_tc(const GdnShape& shape, const GdnInputs& in, float scale, const int32_t* seq_starts, int num_seqs,
               float* const* state, float* out, bool vec4, cudaStream_t stream) {
    const auto kernel = gdn_chunked_tc_kernel<DKP, CS>;
    constexpr size_t bytes = Smem<DKP>::BYTES;
    Q3N_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    const int slices = (shape.dv + BV - 1) / BV;
    const dim3 grid((slices + CS - 1) / CS * CS, shape.nv, num_seqs);
    Q3N_CUDA(launch_pdl(kernel, grid, dim3(kThreads), bytes, stream, shape, in, scale, seq_starts, state, out, vec4));
}

// Four slices share one head's key-side work where clusters of four fill the device as well as
// clusters of two would (GPCs whose SM count is not a multiple of 4 can leave a wave short).
template <int DKP>
void launch_tc(const GdnShape& shape, const GdnInputs& in, float scale, const int32_t* seq_starts, int num_seqs,
               float* const* state, float* out, bool vec4, cudaStream_t stream) {
    const int slices = (shape.dv + BV - 1) / BV;
    if (slices == 1) return launch_tc<DKP, 1>(shape, in, scale, seq_starts, num_seqs, state, out, vec4, stream);
    if (slices >= 3) {
        const long heads = static_cast<long>(shape.nv) * num_seqs;
        const long c4 = (slices + 3) / 4 * heads, c2 = (slices + 1) / 2 * heads;
        const int r4 = resident_clusters<DKP, 4>(), r2 = resident_clusters<DKP, 2>();
        const long w4 = r4 > 0 ? (c4 + r4 - 1) / r4 : -1, w2 = r2 > 0 ? (c2 + r2 - 1) / r2 : -1;
        if (w4 > 0 && (w2 < 0 || w4 <= w2))
            return launch_tc<DKP, 4>(shape, in, scale, seq_starts, num_seqs, state, out, vec4, stream);
    }
    launch_tc<DKP, 2>(shape, in, scale, seq_starts, num_seqs, state, out, vec4, stream);
}

// ---- fp32 CUDA-core path (dk up to 256) -----------------------------------------------------------
//
// One block per (sequence, value head, 32-column slice of the state) walks its sequence's chunks of
// 64 tokens in order with its dk x 32 slice of S in shared memory. Every chunk quantity that does not
// involve V or S is recomputed by each slice's block. V' = U - W S is formed as
// T (diag(beta) (V - diag(exp G) K S)), so W (C x dk) is never stored, which keeps a dk = 256 head
// within the 227 KB of shared memory. T comes from forward substitution, column by column (each
// column of T solves (I + M) x = e_j on its own), four lanes per column.

constexpr int kLdc = C + 1;   // C x C matrices: one pad column against bank conflicts
constexpr int kMaxDk = 256;   // shared memory bound (see chunked_smem_floats)

// Rows of Q and K are dk long with an odd stride, so the 16 different rows a warp reads in the
// K K^T tiles fall in different banks.
__host__ __device__ inline int ld_k(int dk) { return dk % 2 == 0 ? dk + 1 : dk; }

__host__ __device__ inline size_t chunked_smem_floats(int dk) {
    return 2 * static_cast<size_t>(C) * ld_k(dk)   // Q, K
           + static_cast<size_t>(dk) * BV          // S slice
           + 2 * static_cast<size_t>(C) * kLdc     // M (then A), T
           + 2 * static_cast<size_t>(C) * BV       // V (then V'), R
           + 4 * C;                                // G, exp(G), exp(G_last - G), beta
}

// Row i of q or k for this chunk into shared memory by one warp: optionally L2-normalised as
// cpu::l2norm_heads does, then multiplied by post_scale (the query scale); zeros past the chunk.
__device__ __forceinline__ void load_row(const float* src, bool valid, int d, bool l2norm, float eps,
                                         float post_scale, float* dst) {
    const int lane = threadIdx.x & 31;
    float ss = 0.0f;
    for (int x = lane; x < d; x += 32) {
        const float v = valid ? src[x] : 0.0f;
        dst[x] = v;
        ss += v * v;
    }
    const float inv = l2norm ? 1.0f / sqrtf(warp_sum(ss) + eps) : 1.0f;
    if (valid && (l2norm || post_scale != 1.0f))
        for (int x = lane; x < d; x += 32) dst[x] = post_scale * (l2norm ? dst[x] * inv : dst[x]);
}

__global__ void __launch_bounds__(kThreads)
    gdn_chunked_fp32_kernel(GdnShape sh, GdnInputs in, float scale, const int32_t* seq_starts, float* const* state,
                            float* out) {
    extern __shared__ float smem[];
    const int dk = sh.dk, dv = sh.dv, ldk = ld_k(dk);
    float* Qs = smem;
    float* Ks = Qs + C * ldk;
    float* Ss = Ks + C * ldk;
    float* Ms = Ss + dk * BV;  // M, then A once T is formed
    float* Ts = Ms + C * kLdc;
    float* Vs = Ts + C * kLdc;  // V, then V'
    float* Rs = Vs + C * BV;
    float* G = Rs + C * BV;
    float* eG = G + C;
    float* fG = eG + C;
    float* bs = fG + C;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int c0 = blockIdx.x * BV, h = blockIdx.y, s = blockIdx.z;
    pdl_wait();
    const int t_begin = seq_starts[s], t_end = seq_starts[s + 1];
    if (t_begin >= t_end) return;
    const int kh = h / (sh.nv / sh.nk);
    const int col = c0 + lane;
    const bool col_ok = col < dv;
    float* S = state[s] + static_cast<size_t>(h) * dk * dv;

    // Thread (warp, lane) owns column `lane` of rows warp, warp + 8, ... of every C x BV and dk x BV
    // tile: a warp touches one row at a time, 32 consecutive floats.
    for (int x = warp; x < dk; x += kWarps) Ss[x * BV + lane] = col_ok ? S[static_cast<size_t>(x) * dv + col] : 0.0f;

    for (int t0 = t_begin; t0 < t_end; t0 += C) {
        const int L = min(C, t_end - t0);
        __syncthreads();  // the previous chunk is finished with every tile

        // ---- Load the chunk; rows past L are zero (k = 0, beta = 0, g = 0 add nothing).
        for (int i = warp; i < C; i += kWarps) {
            const size_t t = static_cast<size_t>(t0 + i);
            load_row(in.q + t * in.q_stride + kh * dk, i < L, dk, in.l2norm, in.l2norm_eps, scale, Qs + i * ldk);
            load_row(in.k + t * in.k_stride + kh * dk, i < L, dk, in.l2norm, in.l2norm_eps, 1.0f, Ks + i * ldk);
            Vs[i * BV + lane] = i < L && col_ok ? in.v[t * in.v_stride + h * dv + col] : 0.0f;
        }
        if (tid < C) {
            const size_t t = static_cast<size_t>(t0 + tid);
            G[tid] = tid < L ? in.g[t * sh.nv + h] : 0.0f;
            bs[tid] = tid < L ? in.beta[t * sh.nv + h] : 0.0f;
        }
        __syncthreads();
        if (tid == 0) {
            float cum = 0.0f;  // sequential, like the CPU op's running sum
            for (int i = 0; i < C; ++i) G[i] = cum += G[i];
        }
        __syncthreads();
        const float g_last = G[L - 1];
        if (tid < C) {
            eG[tid] = expf(G[tid]);
            fG[tid] = tid < L ? expf(g_last - G[tid]) : 0.0f;
        }

        // ---- M = strict_lower(diag(beta) K K^T . D), 4 x 4 entries per thread (rows ti + 16a,
        // columns tj + 16b), and against the entering state: X = K S, O_inter = Q S.
        {
            const int ti = tid >> 4, tj = tid & 15;
            float acc[4][4] = {};
            for (int x = 0; x < dk; ++x) {
                float ki[4], kj[4];
#pragma unroll
                for (int a = 0; a < 4; ++a) ki[a] = Ks[(ti + 16 * a) * ldk + x];
#pragma unroll
                for (int b = 0; b < 4; ++b) kj[b] = Ks[(tj + 16 * b) * ldk + x];
#pragma unroll
                for (int a = 0; a < 4; ++a)
#pragma unroll
                    for (int b = 0; b < 4; ++b) acc[a][b] += ki[a] * kj[b];
            }
#pragma unroll
            for (int a = 0; a < 4; ++a)
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    const int i = ti + 16 * a, j = tj + 16 * b;
                    Ms[i * kLdc + j] = j < i ? bs[i] * acc[a][b] * expf(G[i] - G[j]) : 0.0f;
                }
        }
        __syncthreads();  // eG visible below
        float o_inter[C / kWarps];
#pragma unroll
        for (int m = 0; m < C / kWarps; ++m) {
            const int i = warp + kWarps * m;
            float xs = 0.0f, os = 0.0f;
            for (int x = 0; x < dk; ++x) {
                const float sv = Ss[x * BV + lane];
                xs += Ks[i * ldk + x] * sv;
                os += Qs[i * ldk + x] * sv;
            }
            o_inter[m] = os * eG[i];
            Rs[i * BV + lane] = bs[i] * (Vs[i * BV + lane] - eG[i] * xs);
        }
        __syncthreads();

        // ---- T = (I + M)^-1: T_ij = -sum_{m=j}^{i-1} M_im T_mj, column j by lanes 4j .. 4j+3. Every
        // lane runs every i so the shuffles see the whole warp.
        {
            const int j = tid >> 2, p = tid & 3;
            for (int i = 0; i < C; ++i) {
                float part = 0.0f;
                if (i > j && i < L)
                    for (int m = j + p; m < i; m += 4) part -= Ms[i * kLdc + m] * Ts[m * kLdc + j];
                part += __shfl_xor_sync(0xffffffffu, part, 1);
                part += __shfl_xor_sync(0xffffffffu, part, 2);
                if (p == 0) Ts[i * kLdc + j] = i == j ? 1.0f : (i > j && i < L ? part : 0.0f);
                __syncwarp();
            }
        }
        __syncthreads();

        // ---- A = lower_incl(Q K^T . D) into M's place; V' = T R into V's place.
        {
            const int ti = tid >> 4, tj = tid & 15;
            float acc[4][4] = {};
            for (int x = 0; x < dk; ++x) {
                float qi[4], kj[4];
#pragma unroll
                for (int a = 0; a < 4; ++a) qi[a] = Qs[(ti + 16 * a) * ldk + x];
#pragma unroll
                for (int b = 0; b < 4; ++b) kj[b] = Ks[(tj + 16 * b) * ldk + x];
#pragma unroll
                for (int a = 0; a < 4; ++a)
#pragma unroll
                    for (int b = 0; b < 4; ++b) acc[a][b] += qi[a] * kj[b];
            }
#pragma unroll
            for (int a = 0; a < 4; ++a)
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    const int i = ti + 16 * a, j = tj + 16 * b;
                    Ms[i * kLdc + j] = j <= i ? acc[a][b] * expf(G[i] - G[j]) : 0.0f;
                }
        }
#pragma unroll
        for (int m = 0; m < C / kWarps; ++m) {
            const int i = warp + kWarps * m;
            float acc = 0.0f;
            for (int j = 0; j <= i; ++j) acc += Ts[i * kLdc + j] * Rs[j * BV + lane];
            Vs[i * BV + lane] = acc;
        }
        __syncthreads();

        // ---- O = diag(exp G) Q S + A V' for the chunk's rows; then
        // S <- exp(G_last) S + (diag(exp(G_last - G)) K)^T V'.
#pragma unroll
        for (int m = 0; m < C / kWarps; ++m) {
            const int i = warp + kWarps * m;
            if (i < L && col_ok) {
                float acc = o_inter[m];
                for (int j = 0; j <= i; ++j) acc += Ms[i * kLdc + j] * Vs[j * BV + lane];
                out[(static_cast<size_t>(t0 + i) * sh.nv + h) * dv + col] = acc;
            }
        }
        const float decay = expf(g_last);
        for (int x = warp; x < dk; x += kWarps) {
            float acc = Ss[x * BV + lane] * decay;
            for (int i = 0; i < L; ++i) acc += (fG[i] * Ks[i * ldk + x]) * Vs[i * BV + lane];
            Ss[x * BV + lane] = acc;
        }
    }

    __syncthreads();
    if (col_ok)
        for (int x = warp; x < dk; x += kWarps) S[static_cast<size_t>(x) * dv + col] = Ss[x * BV + lane];
}

}  // namespace

void gated_delta_rule_chunked(const GdnShape& shape, const GdnInputs& in, float scale, const int32_t* seq_starts,
                              int num_seqs, float* const* state, float* out, cudaStream_t stream) {
    require(shape.nk > 0 && shape.nv > 0 && shape.nv % shape.nk == 0 && shape.dk > 0 && shape.dv > 0 &&
                shape.dk <= kMaxDk,
            Q3N_ERR_INTERNAL, "gated_delta_rule_chunked: bad head shape (nv a multiple of nk, dk <= 256)");
    if (num_seqs == 0) return;
    if (shape.dk <= 128) {
        // 16-byte copies of q and k rows need every row start 16-byte aligned.
        const auto aligned = [](const float* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
        const bool vec4 = shape.dk % 4 == 0 && in.q_stride % 4 == 0 && in.k_stride % 4 == 0 && aligned(in.q) &&
                          aligned(in.k);
        if (shape.dk <= 64)
            launch_tc<64>(shape, in, scale, seq_starts, num_seqs, state, out, vec4, stream);
        else
            launch_tc<128>(shape, in, scale, seq_starts, num_seqs, state, out, vec4, stream);
        return;
    }
    const size_t bytes = chunked_smem_floats(shape.dk) * sizeof(float);
    Q3N_CUDA(cudaFuncSetAttribute(gdn_chunked_fp32_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(bytes)));
    const dim3 grid((shape.dv + BV - 1) / BV, shape.nv, num_seqs);
    Q3N_CUDA(launch_pdl(gdn_chunked_fp32_kernel, grid, dim3(kThreads), bytes, stream, shape, in, scale, seq_starts,
                        state, out));
}

}  // namespace q3n::cuda
