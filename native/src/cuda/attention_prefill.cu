// Paged causal GQA attention for prefill on Hopper tensor cores (wgmma m64nNk16, bf16 -> fp32), in
// the manner of FlashAttention: a block owns a tile of BM = 128 queries of one sequence and one query
// head, walks that sequence's keys in tiles of BN gathered through the block table, and keeps an
// online softmax in fp32 per query row, so the score matrix never leaves registers.
//
// Block: two warpgroups, warpgroup w owns query rows 64w..64w+63 of the tile (wgmma's M is 64).
// Each issues S = Q K^T with both operands in shared memory and O += P V with P in registers (the
// S accumulators' exponentials rounded to bf16, no shuffles: see Fragments) and V in shared memory.
// Key tiles are BN = 128 keys (64 at head_dim 256, where the 128 fp32 accumulators of O leave room
// for no more), double-buffered: two K stages and two V stages, filled with cp.async by all 256
// threads (one block per SM: 255 registers a thread, up to 194 KB of shared memory).
//
// Pipeline, iteration j >= 1 (j = 0 is the prologue: S_0 and its softmax), after one block barrier:
//   issue S_j = Q K_j^T (group a) and O += P_{j-1} V_{j-1} (group b), then the loads of K_{j+1} and
//   V_j; wait for a; mask S_j (diagonal tiles only), take the row maxima and exponentiate in place
//   while the tensor cores still run b; wait for b; round the exponentials into P's registers and
//   rescale O by exp2(m_{j-1} - m_j). (P is written only after b completes: registers written
//   while a wgmma is in flight and read by a later one make ptxas serialize every wgmma.)
// The barrier at the top of iteration j publishes K_j and V_{j-1} (loaded during iteration j - 1,
// each thread having waited for its own copies and fenced them for the async proxy that wgmma reads
// through) and frees K stage (j + 1) & 1 (last read by S_{j-1}) and V stage j & 1 (last read by
// P_{j-2} V_{j-2}), which is where iteration j loads K_{j+1} and V_j. The epilogue applies
// P_{last} V_{last} after one more barrier. One barrier per key tile in all.
//
// Shared layout (every tile, Q included): 64-column blocks of 128-byte rows, the 16-byte chunk c of
// row r stored at chunk c ^ (r & 7) (the 128-byte swizzle), each block 1024-byte aligned so that the
// swizzle wgmma applies to address bits [4, 7) from bits [7, 10) lines up with the rows. Q and K are
// K-major operands (rows are M or N, head dims are K): the descriptor's stride byte offset is the
// 1024 bytes between 8-row groups, its leading byte offset unused, and the k-step of 16 advances the
// start address by 32 bytes inside a 128-byte row (by a column block every 4 steps). V is the B of
// P V with K = keys along its rows, i.e. MN-major ("transposed"): the leading byte offset is the
// next 64 head dims (one column block), the stride byte offset the next 8 keys (1024 bytes), and a
// k-step of 16 keys advances the start by 2048 bytes. cp.async writes and wgmma reads are both free
// of bank conflicts under this swizzle.
//
// Fragments (PTX ISA, "Register Fragments and Shared Memory Matrix Layouts" of wgmma): warp i of a
// warpgroup holds rows 16i..16i+15; with lane = 4g + q, accumulator register 4j + e holds row
// g + 8 (e >> 1), column 8j + 2q + (e & 1). A from registers, per k-step of 16, has mma.m16n8k16's
// layout: a[0] = (row g, k 2q..2q+1), a[1] = (row g + 8, same k), a[2] = (row g, k 2q+8..2q+9),
// a[3] = (row g + 8, same k). So the S accumulators of keys 16kk..16kk+15 (registers 8kk..8kk+7)
// packed pairwise are exactly P's A registers for k-step kk: p[i] = bf16x2(s[2i], s[2i + 1]).
//
// Numerics: K and V are the cache's bf16 values (an F32 cache is rounded to bf16 on load); Q is
// scaled by scale * log2(e) in fp32 and rounded to bf16 once; scores, the softmax and the output
// accumulate in fp32; P is rounded to bf16 for the PV product. The row sum is taken of the fp32 P.
//
// Work split without a host sync: a query tile is a maximal run of tokens with the same sequence
// and the same position / BM (positions rise within a sequence, so a run has at most BM tokens and
// its diagonal lines up with the key tiles: only the last BM / BN key tiles need the causal mask).
// Block (h, y) takes every tile whose first token lies in window x = gridDim.y - 1 - y, tokens
// [x * BM, x * BM + BM): one tile per block for a long prompt, two where a sequence boundary falls
// inside the window, and at most BM (serially) for a step of one-token sequences, which is why
// attention_prefill_applicable() must not send decode-like steps here. Windows run in reverse so
// the first wave takes a prompt's last, longest tiles and the short ones fill the tail; the heads
// of one KV group run side by side and share their K/V tiles in L2.
#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/fp8_out.cuh"
#include "cuda/ops.h"
#include "cuda/wgmma.cuh"

namespace q3n::cuda {
namespace {

template <int D_>
struct Tiling {
    static constexpr int D = D_;
    static constexpr int BM = 128;                  // query rows: two warpgroups of 64
    static constexpr int BN = D == 256 ? 64 : 128;  // keys per tile
    static constexpr int THREADS = 256;
    static constexpr int CH = D / 8;                // 16-byte chunks per row
    static constexpr uint32_t Q_COL = BM * 128;     // bytes of one 64-column block of the Q tile
    static constexpr uint32_t KV_COL = BN * 128;    // ... of a K or V tile
    static constexpr uint32_t Q_BYTES = BM * D * 2, KV_BYTES = BN * D * 2;
    // Q, K x2, V x2, and the slack that aligns them to 1024 bytes.
    static constexpr size_t smem_bytes = Q_BYTES + 4 * KV_BYTES + 1024;
    static_assert(D % 64 == 0, "whole 128-byte swizzle rows");
    static_assert(BM % BN == 0, "key tiles must tile the query tile (diagonal alignment)");
    static_assert(THREADS % CH == 0 && (BN * CH) % THREADS == 0 && (BM * CH) % THREADS == 0,
                  "each thread copies whole chunk columns");
    static_assert(smem_bytes <= 227 * 1024, "one block per SM");
};

// Byte offset of 16-byte chunk c of row r in a tile of 64-column blocks of col_bytes each.
__device__ __forceinline__ uint32_t sw128(int r, int c, uint32_t col_bytes) {
    return (c >> 3) * col_bytes + r * 128 + (((c & 7) ^ (r & 7)) << 4);
}

// 16 bytes global -> shared without a register round trip; src_bytes = 0 writes zeros (keys past
// the tile's last position, whose block-table entries may not exist; V must be finite there, as
// P = 0 times NaN would not be 0).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void st_shared16(uint32_t addr, uint4 v) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}

// Shared memory written through the generic proxy (st.shared, cp.async) is read by wgmma through
// the async proxy: each writer fences after its writes have landed, before the barrier.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// The output's FP8 quantisation for o_proj (quantize_fp8's rule, packed for cuBLASLt) from the
// registers: at head_dim 128 a head is one 128-channel group, and a row's values
// sit in the four lanes of one quad (o[4j + e0], o[4j + e0 + 1] are dims 8j + 2tq, +1), so a
// group's amax is two shuffles away. The values are the fp32 outputs the plain epilogue stores
// (o * inv) and the amax is exact in any order: the codes and scales equal quantize_fp8 of `out`.
// Skips the fp32 output, which nothing reads on this path, and a kernel that read it back.
template <int D>
__device__ __forceinline__ void store_quantized(const Fp8Out& quant, int heads, int h, int row, bool valid, int tq,
                                                const float* o, int e0, float inv) {
    const int k = heads * D, groups = k / 128;
#pragma unroll
    for (int gi = 0; gi < D / 128; ++gi) {
        float amax = 0.0f;
#pragma unroll
        for (int j = gi * 16; j < gi * 16 + 16; ++j)
            amax = fmaxf(amax, fmaxf(fabsf(o[4 * j + e0] * inv), fabsf(o[4 * j + e0 + 1] * inv)));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
        if (!valid) continue;
        const float s = fp8_group_scale(amax);
        const int g = h * (D / 128) + gi;
        if (tq == 0)
            quant.scales8[quant.scales_m_fast ? static_cast<size_t>(g) * quant.padded + row : static_cast<size_t>(row) * groups + g] = s;
        uint8_t* dst = quant.q8 + static_cast<size_t>(row) * k + h * D + 2 * tq;
#pragma unroll
        for (int j = gi * 16; j < gi * 16 + 16; ++j) {
            const float a = fp8_scaled(o[4 * j + e0] * inv, s), b = fp8_scaled(o[4 * j + e0 + 1] * inv, s);
            *reinterpret_cast<uint16_t*>(dst + 8 * j) = static_cast<uint16_t>(float2_to_e4m3x2_hw(a, b));
        }
    }
}

template <int D, bool F32_KV>
__global__ void __launch_bounds__(256, 1)
    attention_prefill_kernel(DeviceKvLayer kv, const float* __restrict__ q, int q_stride, int heads, float q_scale,
                             bool q_vec4, int bs_shift, DeviceBatch batch, float* __restrict__ out, Fp8Out quant) {
    using C = Tiling<D>;
    constexpr int BM = C::BM, BN = C::BN, CH = C::CH, THREADS = C::THREADS;
    constexpr int NS = BN / 2;  // S accumulators per thread (64 x BN per warpgroup)
    constexpr int NO = D / 2;   // O accumulators per thread (64 x D per warpgroup)
    constexpr int NP = BN / 4;  // P registers, bf16 pairs
    constexpr int RPT = BN * CH / THREADS;  // K/V rows each thread copies per tile
    extern __shared__ unsigned char smem_raw[];
    __shared__ int s_lim[BM];              // position of each query row of the tile, -1 past its end
    __shared__ unsigned char s_start[BM];  // whether token w0 + i begins a query tile
    __shared__ int s_n;

    pdl_launch_dependents();
    pdl_wait();  // q, the cache and the step's tables all come from earlier kernels

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2, g = lane >> 2, tq = lane & 3;
    const int T = batch.tokens, w0 = (gridDim.y - 1 - blockIdx.y) * BM, h = blockIdx.x;
    const int kvh = h / (heads / kv.kv_heads);
    const int bs = kv.block_size;
    const bool grouped_rows = bs_shift >= 0 && bs >= RPT;
    const uint32_t row_bytes = static_cast<uint32_t>(kv.kv_heads) * D * (F32_KV ? 4 : 2);  // between cache slots
    const int32_t* __restrict__ seq_of = batch.seq_of_token;
    const int32_t* __restrict__ pos_of = batch.positions;

    const uint32_t raw = smem_addr(smem_raw);
    const uint32_t sQ = (raw + 1023u) & ~1023u, sK = sQ + C::Q_BYTES, sV = sK + 2 * C::KV_BYTES;

    if (tid < BM) {
        const int t = w0 + tid;
        bool start = false;
        if (t < T) start = t == 0 || seq_of[t] != seq_of[t - 1] || pos_of[t] / BM != pos_of[t - 1] / BM;
        s_start[tid] = start;
    }
    __syncthreads();

    // This thread's two query rows within the tile (g and g + 8 of its warp's 16).
    const int r0 = wg * 64 + (warp & 3) * 16 + g, r1 = r0 + 8;

    for (int i0 = 0;; ++i0) {
        while (i0 < BM && !s_start[i0]) ++i0;  // every thread scans the same flags: uniform
        if (i0 >= BM) break;
        const int t0 = w0 + i0;
        const int seq0 = seq_of[t0], bucket = pos_of[t0] / BM;
        if (tid == 0) s_n = BM;
        // Also ends every thread's work on the previous tile: its stages and Q may be overwritten.
        __syncthreads();
        if (tid < BM) {
            const int t = t0 + tid;
            int p = -1;
            if (t < T && seq_of[t] == seq0) {
                p = pos_of[t];
                if (p / BM != bucket) p = -1;
            }
            s_lim[tid] = p;
            if (p < 0) atomicMin(&s_n, tid);
        }
        __syncthreads();
        const int n = s_n;                // rows [0, n) are this tile's tokens (n >= 1: t0 itself)
        const int maxpos = s_lim[n - 1];  // positions rise, so the last row sees the most keys
        const int n_kt = maxpos / BN + 1;
        const int32_t* __restrict__ table = batch.block_tables + static_cast<size_t>(seq0) * batch.max_blocks;

        // Key tile kt (keys kt * BN + r of this sequence) into the tile at shared address dst. Thread
        // t copies chunk t % CH of the RPT consecutive rows from RPT * (t / CH): a half warp reads one
        // cache row (D bf16, contiguous), and with a power-of-two block_size >= RPT those rows share
        // one block, so one table lookup serves them all. Other block sizes look up every row. Rows
        // past maxpos are zero-filled, their addresses clamped into maxpos's row group (whose block
        // exists) and never read.
        auto load_rows = [&](const void* cache, uint32_t dst, int kt, auto grouped) {
            const int c = tid % CH, row0 = tid / CH * RPT, key0 = kt * BN + row0;
            const unsigned char* base = static_cast<const unsigned char*>(cache) +
                                        (static_cast<size_t>(kvh) * D + c * 8) * (F32_KV ? 4 : 2);
            uint32_t slot0 = 0;
            if constexpr (decltype(grouped)::value) {
                const int kc = min(key0, maxpos & ~(RPT - 1));
                slot0 = static_cast<uint32_t>(__ldg(table + (kc >> bs_shift)) * bs + (kc & (bs - 1)));
            }
#pragma unroll
            for (int i = 0; i < RPT; ++i) {
                const int r = row0 + i, key = key0 + i;
                const bool live = key <= maxpos;
                uint32_t slot = slot0 + i;
                if constexpr (!decltype(grouped)::value) {
                    const int kc = min(key, maxpos), bi = kc / bs;
                    slot = static_cast<uint32_t>(__ldg(table + bi) * bs + (kc - bi * bs));
                }
                const unsigned char* src = base + static_cast<size_t>(slot) * row_bytes;
                const uint32_t d = dst + sw128(r, c, C::KV_COL);
                if constexpr (!F32_KV) {
                    cp_async16(d, src, live ? 16 : 0);
                } else {
                    // The simple path: synchronous loads, rounded to bf16 on the way into shared memory.
                    uint4 w = make_uint4(0, 0, 0, 0);
                    if (live) {
                        const float4 a = reinterpret_cast<const float4*>(src)[0];
                        const float4 b = reinterpret_cast<const float4*>(src)[1];
                        w = make_uint4(pack_bf16(a.x, a.y), pack_bf16(a.z, a.w), pack_bf16(b.x, b.y),
                                       pack_bf16(b.z, b.w));
                    }
                    st_shared16(d, w);
                }
            }
        };
        auto load_tile = [&](const void* cache, uint32_t dst, int kt) {
            if (grouped_rows)
                load_rows(cache, dst, kt, std::true_type{});
            else
                load_rows(cache, dst, kt, std::false_type{});
        };

        load_tile(kv.k, sK, 0);
        load_tile(kv.v, sV, 0);
        cp_async_commit();  // in flight while Q is converted

        // Q rows of the tile, scaled into log2 units and rounded to bf16; rows past n are zeros.
#pragma unroll
        for (int i = 0; i < BM * CH / THREADS; ++i) {
            const int idx = tid + i * THREADS, r = idx / CH, c = idx % CH;
            uint4 w = make_uint4(0, 0, 0, 0);
            if (r < n) {
                const float* src = q + static_cast<size_t>(t0 + r) * q_stride + static_cast<size_t>(h) * D + c * 8;
                float4 a, b;
                if (q_vec4) {
                    a = reinterpret_cast<const float4*>(src)[0];
                    b = reinterpret_cast<const float4*>(src)[1];
                } else {
                    a = make_float4(src[0], src[1], src[2], src[3]);
                    b = make_float4(src[4], src[5], src[6], src[7]);
                }
                w = make_uint4(pack_bf16(a.x * q_scale, a.y * q_scale), pack_bf16(a.z * q_scale, a.w * q_scale),
                               pack_bf16(b.x * q_scale, b.y * q_scale), pack_bf16(b.z * q_scale, b.w * q_scale));
            }
            st_shared16(sQ + sw128(r, c, C::Q_COL), w);
        }

        // Rows past n take the tile's last position so that they stay finite (key 0 is always
        // visible) and are simply not written. A key tile needs the mask only where it reaches past
        // some row's position of the warp (the last BM / BN tiles).
        const int lim0 = r0 < n ? s_lim[r0] : maxpos, lim1 = r1 < n ? s_lim[r1] : maxpos;
        const int wmin = __reduce_min_sync(0xffffffffu, min(lim0, lim1));
        const bool active = wg * 64 < n;  // warpgroup-uniform: wgmma needs all four warps

        // Descriptors at stage 0, k-step 0; steps and stages add (bytes >> 4) to the start address.
        const uint64_t q_desc = sw128_desc(sQ + wg * 64 * 128, 16);
        const uint64_t k_desc = sw128_desc(sK, 16);
        const uint64_t v_desc = sw128_desc(sV, C::KV_COL);

        float o[NO];
        uint32_t p[NP];
#pragma unroll
        for (int i = 0; i < NO; ++i) o[i] = 0.0f;
#pragma unroll
        for (int i = 0; i < NP; ++i) p[i] = 0u;
        float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;  // l: this thread's partial row sums

        auto issue_s = [&](float(&s)[NS], int st) {  // S = Q K^T from K stage st
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const uint64_t a = q_desc + (((kk >> 2) * C::Q_COL + (kk & 3) * 32) >> 4);
                const uint64_t b = k_desc + ((st * C::KV_BYTES + (kk >> 2) * C::KV_COL + (kk & 3) * 32) >> 4);
                wgmma_ss<BN>(s, a, b, kk > 0);
            }
        };
        auto issue_pv = [&](int st) {  // O += P V from V stage st
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                const uint32_t a[4] = {p[4 * kk], p[4 * kk + 1], p[4 * kk + 2], p[4 * kk + 3]};
                wgmma_rs<D>(o, a, v_desc + ((st * C::KV_BYTES + kk * 2048) >> 4));
            }
        };
        // Online softmax of S (keys kbase..kbase + BN - 1) in log2 units, in place; returns the
        // factors that rescale O and l from the previous maxima. A row lives in the 4 lanes of a quad.
        auto softmax = [&](float(&s)[NS], int kbase, float& c0, float& c1) {
            if (kbase + BN - 1 > wmin) {
#pragma unroll
                for (int j = 0; j < BN / 8; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        if (kbase + 8 * j + 2 * tq + (e & 1) > (e < 2 ? lim0 : lim1)) s[4 * j + e] = -INFINITY;
            }
            float mx0 = m0, mx1 = m1;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                mx0 = fmaxf(mx0, fmaxf(s[4 * j], s[4 * j + 1]));
                mx1 = fmaxf(mx1, fmaxf(s[4 * j + 2], s[4 * j + 3]));
            }
#pragma unroll
            for (int off = 1; off <= 2; off <<= 1) {
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
            }
            // mx is finite: tile 0 comes first and key 0 is never masked. On tile 0, m = -inf gives
            // c = 0, which multiplies only zeros.
            c0 = fast_exp2(m0 - mx0);
            c1 = fast_exp2(m1 - mx1);
            m0 = mx0;
            m1 = mx1;
            float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                s[4 * j] = fast_exp2(s[4 * j] - mx0);
                s[4 * j + 1] = fast_exp2(s[4 * j + 1] - mx0);
                s[4 * j + 2] = fast_exp2(s[4 * j + 2] - mx1);
                s[4 * j + 3] = fast_exp2(s[4 * j + 3] - mx1);
                ps0 += s[4 * j] + s[4 * j + 1];
                ps1 += s[4 * j + 2] + s[4 * j + 3];
            }
            l0 = l0 * c0 + ps0;
            l1 = l1 * c1 + ps1;
        };
        // P's A registers from the exponentials. Only once the previous P V has completed: registers
        // written while a wgmma is in flight and read by a later one make ptxas serialize them all.
        auto to_p = [&](const float(&s)[NS]) {
#pragma unroll
            for (int i = 0; i < NP; ++i) p[i] = pack_bf16(s[2 * i], s[2 * i + 1]);
        };

        // Iteration j's loads: K_{j+1} (K_1 in the prologue, j = 0) and V_j (V_0 came with K_0).
        auto load_next = [&](int j) {
            if (j + 1 < n_kt) load_tile(kv.k, sK + ((j + 1) & 1) * C::KV_BYTES, j + 1);
            if (j > 0) load_tile(kv.v, sV + (j & 1) * C::KV_BYTES, j);
            cp_async_commit();
        };

        // A warpgroup without rows (n <= 64) only loads. Each branch holds a whole wgmma pipeline
        // stage, issue to last wait: ptxas serializes wgmma whose stage spans a divergent branch.
        cp_async_wait_all();
        fence_proxy_async();  // Q (st.shared) and K_0 / V_0 (cp.async) for the async proxy
        __syncthreads();
        if (active) {
            // Each iteration's S is a fresh array: its first k-step ignores the input, and nothing
            // written into S by a softmax flows into a later wgmma.
            float s[NS];
            wgmma_fence();
            issue_s(s, 0);
            wgmma_commit();
            load_next(0);
            wgmma_wait<0>();
            reg_fence(s);
            float c0, c1;
            softmax(s, 0, c0, c1);
            to_p(s);
        } else {
            load_next(0);
        }

        for (int j = 1; j < n_kt; ++j) {
            cp_async_wait_all();
            fence_proxy_async();
            __syncthreads();
            if (active) {
                float s[NS];
                reg_fence(o);
                reg_fence(p);
                wgmma_fence();
                issue_s(s, j & 1);
                wgmma_commit();
                issue_pv((j - 1) & 1);
                wgmma_commit();
                load_next(j);  // behind the wgmma issue: the copies overlap the tensor cores
                wgmma_wait<1>();
                reg_fence(s);
                float c0, c1;
                softmax(s, j * BN, c0, c1);  // overlaps P_{j-1} V_{j-1}
                wgmma_wait<0>();
                reg_fence(o);
                reg_fence(p);
                to_p(s);
#pragma unroll
                for (int i = 0; i < NO; i += 4) {
                    o[i] *= c0;
                    o[i + 1] *= c0;
                    o[i + 2] *= c1;
                    o[i + 3] *= c1;
                }
            } else {
                load_next(j);
            }
        }

        cp_async_wait_all();  // V of the last tile
        fence_proxy_async();
        __syncthreads();
        if (active) {
            reg_fence(o);
            reg_fence(p);
            wgmma_fence();
            issue_pv((n_kt - 1) & 1);
            wgmma_commit();
            wgmma_wait<0>();
            reg_fence(o);
#pragma unroll
            for (int off = 1; off <= 2; off <<= 1) {
                l0 += __shfl_xor_sync(0xffffffffu, l0, off);
                l1 += __shfl_xor_sync(0xffffffffu, l1, off);
            }
            const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
            // o[4j], o[4j + 1] are dims 8j + 2tq, +1 of row r0; o[4j + 2], o[4j + 3] those of row r1.
            if constexpr (D == 128) {
                if (quant.q8) {
                    store_quantized<D>(quant, heads, h, t0 + r0, r0 < n, tq, o, 0, inv0);
                    store_quantized<D>(quant, heads, h, t0 + r1, r1 < n, tq, o, 2, inv1);
                    continue;
                }
            }
            if (r0 < n) {
                float* dst = out + (static_cast<size_t>(t0 + r0) * heads + h) * D + 2 * tq;
#pragma unroll
                for (int j = 0; j < D / 8; ++j)
                    *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[4 * j] * inv0, o[4 * j + 1] * inv0);
            }
            if (r1 < n) {
                float* dst = out + (static_cast<size_t>(t0 + r1) * heads + h) * D + 2 * tq;
#pragma unroll
                for (int j = 0; j < D / 8; ++j)
                    *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[4 * j + 2] * inv1, o[4 * j + 3] * inv1);
            }
        }
    }
}

template <int D>
void launch(const DeviceKvLayer& kv, const float* q, int q_stride, int heads, float scale, const DeviceBatch& batch,
            float* out, const Fp8Out& quant, cudaStream_t stream) {
    using C = Tiling<D>;
    const float q_scale = scale * 1.4426950408889634f;  // log2(e): the softmax runs on exp2
    const bool q_vec4 = reinterpret_cast<uintptr_t>(q) % 16 == 0 && q_stride % 4 == 0;
    const int bs = kv.block_size;
    const int bs_shift = (bs & (bs - 1)) == 0 ? __builtin_ctz(static_cast<unsigned>(bs)) : -1;
    const dim3 grid(heads, (batch.tokens + C::BM - 1) / C::BM);
    require(grid.y <= 65535, Q3N_ERR_UNSUPPORTED, "attention_prefill: too many tokens in one step");
    auto run = [&](auto* kernel) {
        Q3N_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(C::smem_bytes)));
        Q3N_CUDA(launch_pdl(kernel, grid, dim3(C::THREADS), C::smem_bytes, stream, kv, q, q_stride, heads, q_scale,
                            q_vec4, bs_shift, batch, out, quant));
    };
    if (kv.dtype == KvDtype::F32)
        run(attention_prefill_kernel<D, true>);
    else
        run(attention_prefill_kernel<D, false>);
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
                       const DeviceBatch& batch, float* out, cudaStream_t stream, const Fp8Out& quant) {
    if (batch.tokens == 0) return;
    // At head_dim 64 a group spans two heads' blocks; at 256 the epilogue's registers would spill.
    if (quant.q8 && kv.head_dim != 128) {
        attention_prefill(kv, q, q_stride, heads, scale, batch, out, stream);
        return quantize_fp8(out, batch.tokens, heads * kv.head_dim, quant, stream);
    }
    require(supported_shape(kv), Q3N_ERR_UNSUPPORTED,
            "attention_prefill: head_dim must be 64, 128 or 256 and the cache 16-byte aligned");
    require(heads > 0 && heads % kv.kv_heads == 0, Q3N_ERR_INTERNAL, "attention_prefill: heads not a multiple of kv_heads");
    switch (kv.head_dim) {
        case 64: launch<64>(kv, q, q_stride, heads, scale, batch, out, quant, stream); break;
        case 128: launch<128>(kv, q, q_stride, heads, scale, batch, out, quant, stream); break;
        default: launch<256>(kv, q, q_stride, heads, scale, batch, out, quant, stream); break;
    }
    Q3N_CUDA_LAUNCHED("attention_prefill");
}

}  // namespace q3n::cuda
