// Paged causal GQA attention for prefill on tensor cores (mma.sync m16n8k16 bf16 -> fp32), in the
// manner of FlashAttention-2: a block owns a tile of BQ queries of one sequence and one query head,
// walks that sequence's keys in tiles of KT gathered through the block table (cp.async, two stages),
// and keeps an online softmax in fp32 per query row, so the score matrix never leaves registers.
//
// Numerics: K and V are the cache's bf16 values (an F32 cache is rounded to bf16 on load); Q is
// scaled by scale * log2(e) in fp32 and rounded to bf16 once; scores, the softmax and the output
// accumulate in fp32; P is rounded to bf16 for the PV product. The row sum is taken of the fp32 P.
//
// Work split without a host sync: a query tile is a maximal run of tokens with the same sequence
// and the same position / BQ (positions rise within a sequence, so a run has at most BQ tokens and
// its diagonal lines up with the key tiles). Block x of the grid takes every tile whose first token
// lies in tokens [x * BQ, x * BQ + BQ): one tile per block for a long prompt, two where a sequence
// boundary falls inside the window, and at most BQ (serially) for a step of one-token sequences,
// which is why attention_prefill_applicable() must not send decode-like steps here.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type" and
// "ldmatrix"), with lane = 4 * g + q (g = groupID = lane >> 2, q = threadID_in_group = lane & 3):
//   A (16x16, row-major) regs a[0..3]: a[0] = A[g][2q, 2q+1], a[1] = A[g+8][2q, 2q+1],
//                                      a[2] = A[g][2q+8, 2q+9], a[3] = A[g+8][2q+8, 2q+9]
//   B (16x8, "col")      regs b[0..1]: b[0] = B[2q, 2q+1][g],   b[1] = B[2q+8, 2q+9][g]
//   C (16x8, fp32)       c[0..3]:      c[0], c[1] = C[g][2q, 2q+1],  c[2], c[3] = C[g+8][2q, 2q+1]
//   ldmatrix.x4: lanes 8i..8i+7 give the row addresses (16 bytes each) of 8x8 matrix i; register i of
//   lane l receives matrix i's row l >> 2, elements 2(l & 3) and 2(l & 3) + 1 (lower column in the
//   lower half). With .trans it receives column l >> 2, rows 2(l & 3) and 2(l & 3) + 1 instead.
// Shared tiles are row-major [row][ROW] bf16 with ROW = D + 8: a row is 2D + 16 bytes, so the eight
// 16-byte rows one ldmatrix matrix reads sit at 16-byte offsets r * 16 (mod 128) and hit all 32
// banks once; cp.async's 16-byte writes spread the same way.
#include <cuda_bf16.h>

#include <cstdint>

#include "cuda/cuda_check.h"
#include "cuda/ops.h"

namespace q3n::cuda {
namespace {

template <int D_, int WARPS_, int KT_>
struct Tiling {
    static constexpr int D = D_, WARPS = WARPS_, KT = KT_;
    static constexpr int BQ = 16 * WARPS;    // each warp owns 16 query rows (one mma M)
    static constexpr int THREADS = 32 * WARPS;
    static constexpr int ROW = D + 8;        // bf16 elements per shared row (16 bytes of padding)
    static constexpr int CH = D / 8;         // 16-byte chunks per row
    // Q in registers costs D / 4 registers; at D = 256 that and the D / 2 accumulators do not fit.
    static constexpr bool Q_IN_REGS = D <= 128;
    static constexpr size_t smem_bytes = static_cast<size_t>(BQ + 4 * KT) * ROW * 2;  // Q, K x2, V x2
    static_assert(KT % 16 == 0 && BQ % KT == 0, "key tiles must tile the query tile (diagonal alignment)");
    static_assert(THREADS % CH == 0 && (KT * CH) % THREADS == 0, "each thread copies whole chunk columns");
    static_assert(BQ <= THREADS, "one thread per query row for the tile bookkeeping");
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without a register round trip; src_bytes = 0 writes zeros (keys past
// the tile's last position, whose block-table entries may not exist).
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

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (lo) is the low half
    return *reinterpret_cast<const uint32_t*>(&v);
}

template <int D, int WARPS, int KT, bool F32_KV>
__global__ void __launch_bounds__(WARPS * 32, 1)
    attention_prefill_kernel(DeviceKvLayer kv, const float* __restrict__ q, int q_stride, int heads, float q_scale,
                             bool q_vec4, DeviceBatch batch, float* __restrict__ out) {
    using C = Tiling<D, WARPS, KT>;
    constexpr int BQ = C::BQ, ROW = C::ROW, CH = C::CH, THREADS = C::THREADS;
    constexpr int NT = KT / 8;  // score n-tiles per warp
    constexpr int DT = D / 8;   // output n-tiles per warp
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __nv_bfloat16* sQ = reinterpret_cast<__nv_bfloat16*>(smem_raw);
    __nv_bfloat16* sK = sQ + BQ * ROW;      // [2][KT][ROW]
    __nv_bfloat16* sV = sK + 2 * KT * ROW;  // [2][KT][ROW]
    __shared__ int s_lim[BQ];               // position of each query row of the tile, -1 past its end
    __shared__ unsigned char s_start[BQ];   // whether token w0 + i begins a query tile
    __shared__ int s_n;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tq = lane & 3;
    // Heads run along x and windows along y in reverse: the first wave takes the last windows,
    // whose causal tiles are the longest, so the short ones fill the tail; the heads of one KV group
    // run side by side and share their K/V tiles in L2.
    const int T = batch.tokens, w0 = (gridDim.y - 1 - blockIdx.y) * BQ, h = blockIdx.x;
    const int kvh = h / (heads / kv.kv_heads);
    const int32_t* __restrict__ seq_of = batch.seq_of_token;
    const int32_t* __restrict__ pos_of = batch.positions;

    if (tid < BQ) {
        const int t = w0 + tid;
        bool start = false;
        if (t < T) start = t == 0 || seq_of[t] != seq_of[t - 1] || pos_of[t] / BQ != pos_of[t - 1] / BQ;
        s_start[tid] = start;
    }
    __syncthreads();

    // Per-lane ldmatrix offsets in bytes (see the layouts above).
    //   Q (A operand, x4 = the four 8x8 quarters of a 16x16 block): matrix i = lane >> 3 is rows
    //   +8 * (i & 1), columns +8 * (i >> 1), so a[0..3] come out in mma order.
    const uint32_t q_off = ((warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * ROW + (lane >> 4) * 8) * 2;
    //   K (B operand of S = Q K^T, B[k = dim][n = key] = K[key][dim], so K's rows are B's columns and
    //   the non-transposed load gives b[] directly): matrix i is keys +8 * (i >> 1), dims +8 * (i & 1),
    //   so r[0], r[1] are b0, b1 of keys n0..n0+7 and r[2], r[3] those of keys n0+8..n0+15.
    const uint32_t k_off = (((lane & 7) + (lane >> 4) * 8) * ROW + ((lane >> 3) & 1) * 8) * 2;
    //   V (B operand of O = P V, B[k = key][n = dim] = V[key][dim], row-major in k, hence .trans):
    //   matrix i is keys +8 * (i & 1), dims +8 * (i >> 1): r[0], r[1] are b0, b1 of dims n0..n0+7
    //   and r[2], r[3] those of dims n0+8..n0+15.
    const uint32_t v_off = (((lane & 7) + ((lane >> 3) & 1) * 8) * ROW + (lane >> 4) * 8) * 2;
    const uint32_t sQ_a = smem_addr(sQ), sK_a = smem_addr(sK), sV_a = smem_addr(sV);
    constexpr uint32_t kStageBytes = KT * ROW * 2;

    for (int i0 = 0;; ++i0) {
        while (i0 < BQ && !s_start[i0]) ++i0;  // every thread scans the same flags: uniform
        if (i0 >= BQ) break;
        const int t0 = w0 + i0;
        const int seq0 = seq_of[t0], bucket = pos_of[t0] / BQ;
        if (tid == 0) s_n = BQ;
        __syncthreads();
        if (tid < BQ) {
            const int t = t0 + tid;
            int p = -1;
            if (t < T && seq_of[t] == seq0) {
                p = pos_of[t];
                if (p / BQ != bucket) p = -1;
            }
            s_lim[tid] = p;
            if (p < 0) atomicMin(&s_n, tid);
        }
        __syncthreads();
        const int n = s_n;                  // rows [0, n) are this tile's tokens (n >= 1: t0 itself)
        const int maxpos = s_lim[n - 1];    // positions rise, so the last row sees the most keys
        const int n_kt = maxpos / KT + 1;
        const int32_t* table = batch.block_tables + static_cast<size_t>(seq0) * batch.max_blocks;

        // Stage one key tile: key kt * KT + r of this sequence, row r of stage `st`.
        auto load_kv = [&](int kt, int st) {
            const int part = tid % CH;
#pragma unroll
            for (int i = 0; i < KT * CH / THREADS; ++i) {
                const int r = tid / CH + i * (THREADS / CH);
                const int key = kt * KT + r;
                const uint32_t dst_off = st * kStageBytes + (r * ROW + part * 8) * 2;
                size_t off = 0;
                const bool live = key <= maxpos;
                if (live)
                    off = ((static_cast<size_t>(table[key / kv.block_size]) * kv.block_size + key % kv.block_size) *
                               kv.kv_heads + kvh) * D + part * 8;
                if constexpr (!F32_KV) {
                    const __nv_bfloat16* kb = static_cast<const __nv_bfloat16*>(kv.k);
                    const __nv_bfloat16* vb = static_cast<const __nv_bfloat16*>(kv.v);
                    cp_async16(sK_a + dst_off, kb + off, live ? 16 : 0);
                    cp_async16(sV_a + dst_off, vb + off, live ? 16 : 0);
                } else {
                    // The simple path: synchronous loads, rounded to bf16 on the way into shared memory.
                    uint4 kw = make_uint4(0, 0, 0, 0), vw = kw;
                    if (live) {
                        const float4* kf = reinterpret_cast<const float4*>(static_cast<const float*>(kv.k) + off);
                        const float4* vf = reinterpret_cast<const float4*>(static_cast<const float*>(kv.v) + off);
                        const float4 k0 = kf[0], k1 = kf[1], v0 = vf[0], v1 = vf[1];
                        kw = make_uint4(pack_bf16(k0.x, k0.y), pack_bf16(k0.z, k0.w), pack_bf16(k1.x, k1.y),
                                        pack_bf16(k1.z, k1.w));
                        vw = make_uint4(pack_bf16(v0.x, v0.y), pack_bf16(v0.z, v0.w), pack_bf16(v1.x, v1.y),
                                        pack_bf16(v1.z, v1.w));
                    }
                    *reinterpret_cast<uint4*>(reinterpret_cast<unsigned char*>(sK) + dst_off) = kw;
                    *reinterpret_cast<uint4*>(reinterpret_cast<unsigned char*>(sV) + dst_off) = vw;
                }
            }
            cp_async_commit();
        };

        load_kv(0, 0);  // in flight while Q is converted

        // Q rows of the tile, scaled into log2 units and rounded to bf16; rows past n are zeros.
        for (int idx = tid; idx < BQ * (D / 4); idx += THREADS) {
            const int r = idx / (D / 4), c = (idx % (D / 4)) * 4;
            float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
            if (r < n) {
                const float* src = q + static_cast<size_t>(t0 + r) * q_stride + static_cast<size_t>(h) * D + c;
                v = q_vec4 ? *reinterpret_cast<const float4*>(src) : make_float4(src[0], src[1], src[2], src[3]);
            }
            *reinterpret_cast<uint2*>(sQ + r * ROW + c) =
                make_uint2(pack_bf16(v.x * q_scale, v.y * q_scale), pack_bf16(v.z * q_scale, v.w * q_scale));
        }
        __syncthreads();

        // This thread's two rows (g and g + 8 of the warp's 16); rows past n take the tile's last
        // position so that they stay finite (key 0 is always visible) and are simply not written.
        const int r0 = warp * 16 + g, r1 = r0 + 8;
        const int lim0 = r0 < n ? s_lim[r0] : maxpos, lim1 = r1 < n ? s_lim[r1] : maxpos;
        const int wmax = __reduce_max_sync(0xffffffffu, max(lim0, lim1));
        const int wmin = __reduce_min_sync(0xffffffffu, min(lim0, lim1));
        const bool warp_active = warp * 16 < n;

        uint32_t qf[C::Q_IN_REGS ? D / 16 : 1][4];
        if constexpr (C::Q_IN_REGS) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(qf[kk], sQ_a + q_off + kk * 32);
        }

        float o[DT][4];
#pragma unroll
        for (int j = 0; j < DT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
        float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;  // l: this thread's partial row sums

        for (int kt = 0; kt < n_kt; ++kt) {
            const int st = kt & 1;
            // The other stage was last read in iteration kt - 1, which ended with a barrier.
            if (kt + 1 < n_kt) {
                load_kv(kt + 1, st ^ 1);
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            __syncthreads();
            const int kbase = kt * KT;
            if (warp_active && kbase <= wmax) {  // else every key of the tile is above every row's position
                const uint32_t k_stage = sK_a + st * kStageBytes + k_off;
                const uint32_t v_stage = sV_a + st * kStageBytes + v_off;
                float s[NT][4];
#pragma unroll
                for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk) {
                    uint32_t a[4];
                    if constexpr (C::Q_IN_REGS) {
#pragma unroll
                        for (int e = 0; e < 4; ++e) a[e] = qf[kk][e];
                    } else {
                        ldsm_x4(a, sQ_a + q_off + kk * 32);
                    }
#pragma unroll
                    for (int jp = 0; jp < NT / 2; ++jp) {
                        uint32_t b[4];
                        ldsm_x4(b, k_stage + jp * 16 * ROW * 2 + kk * 32);
                        mma_bf16(s[2 * jp], a, b[0], b[1]);
                        mma_bf16(s[2 * jp + 1], a, b[2], b[3]);
                    }
                }
                // Causal mask, only on tiles that reach past some row's position: s[j][e] is key
                // kbase + 8j + 2tq + (e & 1) of row r0 (e < 2) or r1 (e >= 2).
                if (kbase + KT - 1 > wmin) {
#pragma unroll
                    for (int j = 0; j < NT; ++j)
#pragma unroll
                        for (int e = 0; e < 4; ++e)
                            if (kbase + 8 * j + 2 * tq + (e & 1) > (e < 2 ? lim0 : lim1)) s[j][e] = -INFINITY;
                }
                // Online softmax in log2 units; a row lives in the 4 lanes of a quad.
                float mx0 = m0, mx1 = m1;
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
                    mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
                }
#pragma unroll
                for (int off = 1; off <= 2; off <<= 1) {
                    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
                    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
                }
                // mx is finite: the first tile a warp computes is tile 0, and key 0 is never masked.
                const float c0 = exp2f(m0 - mx0), c1 = exp2f(m1 - mx1);
                m0 = mx0;
                m1 = mx1;
                float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    s[j][0] = exp2f(s[j][0] - mx0);
                    s[j][1] = exp2f(s[j][1] - mx0);
                    s[j][2] = exp2f(s[j][2] - mx1);
                    s[j][3] = exp2f(s[j][3] - mx1);
                    ps0 += s[j][0] + s[j][1];
                    ps1 += s[j][2] + s[j][3];
                }
                l0 = l0 * c0 + ps0;
                l1 = l1 * c1 + ps1;
#pragma unroll
                for (int j = 0; j < DT; ++j) {
                    o[j][0] *= c0;
                    o[j][1] *= c0;
                    o[j][2] *= c1;
                    o[j][3] *= c1;
                }
                // O += P V. The C layout of two adjacent score n-tiles is the A layout of one
                // 16-key k-step: a[0] = P[g][2tq..] = s[2kk][0..1], a[1] = P[g+8][2tq..] = s[2kk][2..3],
                // a[2] = P[g][8+2tq..] = s[2kk+1][0..1], a[3] = P[g+8][8+2tq..] = s[2kk+1][2..3].
#pragma unroll
                for (int kk = 0; kk < KT / 16; ++kk) {
                    const uint32_t a[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                                           pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                           pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
                    for (int jp = 0; jp < DT / 2; ++jp) {
                        uint32_t b[4];
                        ldsm_x4_trans(b, v_stage + kk * 16 * ROW * 2 + jp * 32);
                        mma_bf16(o[2 * jp], a, b[0], b[1]);
                        mma_bf16(o[2 * jp + 1], a, b[2], b[3]);
                    }
                }
            }
            __syncthreads();  // stage st is overwritten by the load issued in iteration kt + 1
        }

        if (warp_active) {
#pragma unroll
            for (int off = 1; off <= 2; off <<= 1) {
                l0 += __shfl_xor_sync(0xffffffffu, l0, off);
                l1 += __shfl_xor_sync(0xffffffffu, l1, off);
            }
            const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
            // o[j][0..1] are dims 8j + 2tq, +1 of row r0; o[j][2..3] the same dims of row r1.
            if (r0 < n) {
                float* dst = out + (static_cast<size_t>(t0 + r0) * heads + h) * D + 2 * tq;
#pragma unroll
                for (int j = 0; j < DT; ++j)
                    *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[j][0] * inv0, o[j][1] * inv0);
            }
            if (r1 < n) {
                float* dst = out + (static_cast<size_t>(t0 + r1) * heads + h) * D + 2 * tq;
#pragma unroll
                for (int j = 0; j < DT; ++j)
                    *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[j][2] * inv1, o[j][3] * inv1);
            }
        }
        // The loop's last barrier already separates this tile's reads of sQ and s_lim from the
        // next tile's writes.
    }
}

template <int D, int WARPS, int KT>
void launch(const DeviceKvLayer& kv, const float* q, int q_stride, int heads, float scale, const DeviceBatch& batch,
            float* out, cudaStream_t stream) {
    using C = Tiling<D, WARPS, KT>;
    const float q_scale = scale * 1.4426950408889634f;  // log2(e): the softmax runs on exp2
    const bool q_vec4 = reinterpret_cast<uintptr_t>(q) % 16 == 0 && q_stride % 4 == 0;
    const dim3 grid(heads, (batch.tokens + C::BQ - 1) / C::BQ);
    require(grid.y <= 65535, Q3N_ERR_UNSUPPORTED, "attention_prefill: too many tokens in one step");
    if (kv.dtype == KvDtype::F32) {
        auto* kernel = attention_prefill_kernel<D, WARPS, KT, true>;
        Q3N_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(C::smem_bytes)));
        kernel<<<grid, C::THREADS, C::smem_bytes, stream>>>(kv, q, q_stride, heads, q_scale, q_vec4, batch, out);
    } else {
        auto* kernel = attention_prefill_kernel<D, WARPS, KT, false>;
        Q3N_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(C::smem_bytes)));
        kernel<<<grid, C::THREADS, C::smem_bytes, stream>>>(kv, q, q_stride, heads, q_scale, q_vec4, batch, out);
    }
    Q3N_CUDA_LAUNCHED("attention_prefill");
}

bool supported_shape(const DeviceKvLayer& kv) {
    const int d = kv.head_dim;
    return (d == 64 || d == 128 || d == 256) && kv.kv_heads > 0 && kv.block_size > 0 &&
           reinterpret_cast<uintptr_t>(kv.k) % 16 == 0 && reinterpret_cast<uintptr_t>(kv.v) % 16 == 0;
}

}  // namespace

bool attention_prefill_applicable(const DeviceKvLayer& kv, int tokens) {
    // Below ~64 tokens a step is decode-like (one or a few tokens per sequence): the CUDA-core
    // kernel spreads those over more blocks. F32 caches stay on the exact fp32 path.
    return tokens > 64 && kv.dtype == KvDtype::BF16 && supported_shape(kv);
}

void attention_prefill(const DeviceKvLayer& kv, const float* q, int q_stride, int heads, float scale,
                       const DeviceBatch& batch, float* out, cudaStream_t stream) {
    if (batch.tokens == 0) return;
    require(supported_shape(kv), Q3N_ERR_UNSUPPORTED,
            "attention_prefill: head_dim must be 64, 128 or 256 and the cache 16-byte aligned");
    require(heads > 0 && heads % kv.kv_heads == 0, Q3N_ERR_INTERNAL, "attention_prefill: heads not a multiple of kv_heads");
    // Tilings (measured on an H100 against the alternatives of 4/8 warps x 32/64 keys): 128 queries
    // x 64 keys with 8 warps at head_dim 128 (one block of 222 registers a thread per SM), 64 x 64
    // with 4 warps at 64 (two blocks per SM). Q stays in registers up to 128; at 256 the 128 fp32
    // accumulators per thread leave no room for it, so 64 x 32 with Q read from shared memory.
    switch (kv.head_dim) {
        case 64: launch<64, 4, 64>(kv, q, q_stride, heads, scale, batch, out, stream); break;
        case 128: launch<128, 8, 64>(kv, q, q_stride, heads, scale, batch, out, stream); break;
        default: launch<256, 4, 32>(kv, q, q_stride, heads, scale, batch, out, stream); break;
    }
}

}  // namespace q3n::cuda
