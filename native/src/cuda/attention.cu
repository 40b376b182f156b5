// Paged causal attention for decode steps (and, until the tensor-core prefill kernel takes them,
// prefills): one block per (token, kv head, key split). All query heads of a GQA group share the
// block, so each key and value row is read from memory once per group, not once per head; long
// contexts are split over several blocks whose partial results (unnormalised output, max and sum)
// a second kernel merges.
//
// A decode step at batch 1 has only kv_heads groups and a few keys per block: what costs is the
// latency chain, not the bytes. With lanes splitting head_dim, every key was a warp sum and two
// exp2 per head in a serial chain (16 us per layer at 35 keys where the memory floor is 1 us). So a
// block walks its split in tiles of TK keys, each tile in three barrier-separated phases with no
// per-key serial work:
//   1. scores: threads own (key, slice of head_dim); a thread dots its K slice with all G query
//      heads (q staged in shared memory, scaled by scale * log2 e), partial sums go to shared memory;
//   2. softmax: threads own (head, key); the slices are summed, a segmented warp max moves the head's
//      running max, p = exp2(s - max) goes back to shared memory (each lane keeps its own running
//      sum, added up once at the end);
//   3. P.V: threads own (16-byte slice of head_dim, heads, keys); acc += p * v, rescaled once per
//      tile when the running max moves.
// Tiles arrive by cp.async into two shared stages: tile i + 1 is in flight while tile i computes,
// and each tile's block ids are loaded a tile before its copies are issued, so that issuing never
// waits on the table.
//
// An FP8 o_proj reads the output as e4m3 values and one scale per 128 channels. When head_dim is a
// multiple of 128 each head is whole quantisation groups, so the kernel that finalises a head (the
// split kernel when there is one split, else the merge) quantises it as it stores it: one launch
// per layer fewer than a separate quantize_fp8, with the same arithmetic (common.cuh).
//
// Decode steps of the dense and MoE runners also fold qk_norm_rope_kv_write in front of the split
// kernel (attention_decode_qk_norm_rope, the kQkRope instances): each block normalises and rotates
// its group's q heads from the raw q|k|v row, with rotary factors computed once per block before
// the PDL wait, and the block whose split holds the token's position writes its k and v. On the
// H100 (Qwen3-4B-FP8, 512-token context) the norm launch and the split took 10.3-11.5 us after the
// q|k|v GEMV, the fused split 6.1-6.6 us (a first version that computed the rotary per head after the
// wait: 8.9-10.7 us). Decode, three interleaved pairs: batch 1 350.7 -> 363.9 tok/s, batch 8 1,764 ->
// 1,787, but batch 32 5,637 -> 5,499 (every split of a token normalises the q heads again), so the
// runners fuse up to 8 tokens a step. The earlier keys' copies leave before the wait, yet after a
// persistent GEMV, whose blocks hold every SM's registers, the split's blocks start only as the
// GEMV's end: that gains little.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/l2_prefetch.cuh"
#include "cuda/ops.h"
#include "cuda/qk_norm_rope.cuh"

namespace q3n::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kSplitUnit = 32;  // a split's keys are a multiple of this (and of every tile size)
constexpr int kMaxDim = 256;
constexpr int kMaxSplits = 64;  // the merge kernel holds one partial per split in registers
// Eight blocks per SM on an H100. A split is a latency chain (its tiles one after another), so
// shorter splits over more blocks finish sooner even past two blocks per SM: Qwen3-4B-FP8 decode,
// H100, 264 -> 1056 blocks: batch 8 1,543-1,550 -> 1,740-1,764 tok/s at a 512-token context and
// 967 -> 1,476 at 2K, batch 32 4,820 -> 5,479-5,493 (528: 1,690-1,740 and 4,830). Batch 1 is capped
// by the one-tile minimum (kSplitUnit keys a split) either way; from batch 128 there is one split.
constexpr int kTargetBlocks = 1056;
// Up to this table width one block per group walks all the keys: its second tile loads while the
// first computes, which costs less than a second (merge) kernel.
constexpr int kMinSplitKeys = 64;
// Static shared memory of one block stays under the 48 KB that needs no opt-in.
constexpr int kSmemBudget = 48 * 1024 - 512;
constexpr float kLog2e = 1.4426950408889634f;

// The shapes of one instantiation: MAXG heads per group at most, NV 16-byte vectors per padded row
// (a power of two: the row is NV * VE elements, VE = 16 / sizeof(KvT)).
template <int MAXG, int NV, typename KvT>
struct Shape {
    static constexpr int VE = 16 / static_cast<int>(sizeof(KvT));
    static constexpr int DP = NV * VE;
    // Shared rows are NV + 1 vectors apart: eight threads reading the same vector of eight
    // consecutive keys (phase 1) or eight consecutive vectors of one key (phase 3, cp.async) touch
    // eight different 16-byte bank groups.
    static constexpr int S = NV + 1;
    // Phase 3: a thread owns one vector (VE dims) of HPT heads; its accumulators stay at 32 floats.
    static constexpr int HPT = MAXG < 32 / VE ? MAXG : 32 / VE;
    static constexpr int HG = MAXG / HPT;        // head groups
    static constexpr int KG = kThreads / NV / HG;  // key groups, summed once at the end
    static constexpr int kFixedBytes = kThreads * MAXG * 4 /*partial scores*/ + MAXG * DP * 4 /*q*/ + MAXG * 12;
    static constexpr int kRedBytes = KG * MAXG * DP * 4;
    static constexpr int tiles_bytes(int tk) { return 2 * 2 * tk * S * 16; }  // K and V, two stages
    static constexpr int big_bytes(int tk) { return tiles_bytes(tk) > kRedBytes ? tiles_bytes(tk) : kRedBytes; }
    // Keys per tile: TK * NV = 512 vectors (32 keys at head_dim 128 in bf16, 16 at 256), at most 32,
    // halved while the block would not fit (large groups); a tile's work is G * TK * head_dim.
    static constexpr int pick_tk() {
        int tk = 512 / NV < 32 ? 512 / NV : 32;
        while (tk > 1 && kFixedBytes + big_bytes(tk) > kSmemBudget) tk /= 2;
        return tk;
    }
    static constexpr int TK = pick_tk();
    static constexpr int TPK = kThreads / TK;  // phase 1: threads per key
    static constexpr int KPT = TK / KG;        // phase 3: keys per thread per tile
    static constexpr int CPT = TK * NV / kThreads;  // 16-byte copies per thread per tile, K and V each
    static constexpr int NP = (MAXG * TK + kThreads - 1) / kThreads;  // phase 2: (head, key) entries per thread
    static constexpr int QPT = (MAXG * DP + kThreads - 1) / kThreads;
    static constexpr int kBigVecs = big_bytes(TK) / 16;
    static_assert(NV >= 8 && (NV & (NV - 1)) == 0 && NV <= kThreads / 2, "rows of 8 to 64 vectors");
    static_assert(TK >= 1 && TK <= 32 && 32 % TK == 0, "a tile's keys sit in one warp segment (phase 2)");
    static_assert(kSplitUnit % TK == 0, "splits hold whole tiles");
    static_assert(HG * HPT == MAXG && KG >= 1 && KPT * KG == TK && KPT % 2 == 0, "phase 3 covers the tile");
    static_assert((TK * NV) % kThreads == 0 && NV % TPK == 0, "phase 1 and the copies cover the tile");
    static_assert(kFixedBytes + big_bytes(TK) <= kSmemBudget, "shared memory");
};

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool live) {
    // src-size 0 writes zeros and reads nothing (keys past the split's end).
    const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(live ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all_but_newest() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }

// One 16-byte vector of cache elements as floats.
__device__ __forceinline__ void widen(const uint4& raw, float (&out)[8]) {  // bf16
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        out[2 * i] = __uint_as_float(w[i] << 16);
        out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void widen(const uint4& raw, float (&out)[4]) {  // f32
    out[0] = __uint_as_float(raw.x), out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z), out[3] = __uint_as_float(raw.w);
}

// Elements [e0, e0 + 16 / sizeof(T)) of a row as one vector, zero past d or when !live: the path
// for rows that are not whole 16-byte vectors (or not aligned to them).
__device__ __forceinline__ uint4 load_vec_checked(const __nv_bfloat16* row, int e0, int d, bool live) {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(row);
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const uint32_t lo = live && e0 + 2 * i < d ? p[e0 + 2 * i] : 0u;
        const uint32_t hi = live && e0 + 2 * i + 1 < d ? p[e0 + 2 * i + 1] : 0u;
        w[i] = lo | (hi << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}
__device__ __forceinline__ uint4 load_vec_checked(const float* row, int e0, int d, bool live) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = live && e0 + i < d ? __float_as_uint(row[e0 + i]) : 0u;
    return make_uint4(w[0], w[1], w[2], w[3]);
}

struct SplitOutput {
    float* out;       // [tokens, heads, d]: final, when the launch has one split
    float* partial;   // [tokens, heads, splits, d]: unnormalised, otherwise
    float2* ml;       // [tokens, heads, splits]: (max in log2 units, sum)
    int splits;
    int chunk;        // keys per split, a multiple of kSplitUnit
    float* q;         // [tokens, heads, d] and [tokens, heads, d / 128]: out's FP8 quantisation, when
    float* q_scales;  // not null (head_dim a multiple of 128) and the launch has one split
    L2Prefetch next;  // the o projection's first weight bytes, fetched into L2 while attention runs
};

// The fused decode launch's norm and rotary (attention_decode_qk_norm_rope): q is then the raw
// q|k|v row of qk_norm_rope_kv_write.
struct QkRope {
    const float* q_norm;
    const float* k_norm;
    float eps;
    const float* inv_freq;
    int rot_dim;
    float scaling;
};

// vec_ok: rows are whole 16-byte vectors at 16-byte aligned addresses, so tiles travel by cp.async;
// otherwise element by element (odd head_dims), synchronously.
//
// kQkRope (decode steps, one token per sequence, head_dim == DP): q is the raw q|k|v row. The block
// normalises and rotates its group's q heads itself, and the block whose split holds the token's
// own position does the same to its k head and writes k and v to the cache, and into its key tile
// when that is one of the first two (later tiles copy them back from the cache, written by then).
// Every key before the token's own was written by an earlier step, never by this step's kernels, so
// the first two tiles' copies of them leave before the wait for the q|k|v projection: an exception
// to common.cuh's PDL contract that holds only because each sequence brings one token.
template <int MAXG, int NV, typename KvT, bool kQkRope>
__global__ void __launch_bounds__(kThreads) attention_split_kernel(DeviceKvLayer kv, const float* q, int q_stride, int heads,
                                                                   float scale_log2, DeviceBatch batch, SplitOutput o,
                                                                   bool vec_ok, QkRope rope) {
    using Sh = Shape<MAXG, NV, KvT>;
    constexpr int VE = Sh::VE, DP = Sh::DP, S = Sh::S, TK = Sh::TK, TPK = Sh::TPK;
    constexpr int HPT = Sh::HPT, HG = Sh::HG, KG = Sh::KG, KPT = Sh::KPT, CPT = Sh::CPT, NP = Sh::NP;
    constexpr int RK = kThreads / NV;  // keys between one thread's copies within a tile

    // Two stages of [K tile][V tile], rows S vectors apart; after the last tile, the key groups'
    // accumulators [KG][MAXG][DP] for the final sum.
    __shared__ __align__(16) uint4 big_s[Sh::kBigVecs];
    // [TPK][MAXG][TK] partial scores; [0][h][k] then holds p (each (h, k) is read and rewritten by
    // one thread only).
    __shared__ __align__(16) float part_s[TPK * MAXG * TK];
    __shared__ __align__(16) float q_s[MAXG * DP];
    __shared__ float corr_s[MAXG];
    __shared__ float2 ml_s[MAXG];

    pdl_launch_dependents();
    l2_prefetch(o.next, (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x, gridDim.x * gridDim.y * gridDim.z);
    if constexpr (!kQkRope) pdl_wait();
    const int tid = threadIdx.x;
    const int t = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    const int d = kv.head_dim, G = heads / kv.kv_heads;
    const unsigned bs = kv.block_size;
    const int pos = batch.positions[t];
    const int seq = batch.seq_of_token[t];
    // The group's q rows, loaded now and stored to shared memory once the first tile is on its way.
    float qr[Sh::QPT];
    const float* qt = q + static_cast<size_t>(t) * q_stride + static_cast<size_t>(kvh) * G * d;
    if constexpr (!kQkRope) {
#pragma unroll
        for (int i = 0; i < Sh::QPT; ++i) {
            const int idx = tid + kThreads * i, h = idx / DP, e = idx % DP;
            qr[i] = idx < MAXG * DP && h < G && e < d ? qt[h * d + e] : 0.0f;
        }
    }
    const int first = split * o.chunk, end = min(first + o.chunk, pos + 1);
    const size_t out_row = static_cast<size_t>(t) * heads + static_cast<size_t>(kvh) * G;  // first head of the group

    if (first >= end) {  // this split lies past the token's position
        if constexpr (kQkRope) pdl_wait();
        if (o.splits > 1)
            for (int h = tid; h < G; h += kThreads) o.ml[(out_row + h) * o.splits + split] = make_float2(-INFINITY, 0.0f);
        return;
    }

    const KvT* K = static_cast<const KvT*>(kv.k);
    const KvT* V = static_cast<const KvT*>(kv.v);
    const int32_t* table = batch.block_tables + static_cast<size_t>(seq) * batch.max_blocks;
    const size_t row_elems = static_cast<size_t>(kv.kv_heads) * d;
    const int nv_live = (d + VE - 1) / VE;  // vectors of a row that hold dims
    // Copies: this thread moves vector `vec` of keys kk0 + RK c of each tile (c < CPT).
    const int vec = tid % NV, kk0 = tid / NV;
    const bool copier = vec < nv_live;

    // Keys past the end are clamped to the last one, so every table entry read is the sequence's.
    auto load_ids = [&](int k0, int (&ids)[CPT]) {
#pragma unroll
        for (int c = 0; c < CPT; ++c) ids[c] = table[static_cast<unsigned>(min(k0 + kk0 + RK * c, end - 1)) / bs];
    };
    // `skip`: a key whose row the fused prologue stores itself (none: -1).
    auto issue = [&](int k0, int stage, const int (&ids)[CPT], int skip) {
        uint4* ks = big_s + stage * 2 * TK * S;
        uint4* vs = ks + TK * S;
        if (!copier) return;
#pragma unroll
        for (int c = 0; c < CPT; ++c) {
            const int kk = kk0 + RK * c, key = k0 + kk;
            if (key == skip) continue;
            const unsigned kc = min(key, end - 1);
            const size_t row = (static_cast<size_t>(ids[c]) * bs + kc % bs) * row_elems + static_cast<size_t>(kvh) * d;
            if (vec_ok) {
                cp_async16(ks + kk * S + vec, K + row + vec * VE, key < end);
                cp_async16(vs + kk * S + vec, V + row + vec * VE, key < end);
            } else {
                ks[kk * S + vec] = load_vec_checked(K + row, vec * VE, d, key < end);
                vs[kk * S + vec] = load_vec_checked(V + row, vec * VE, d, key < end);
            }
        }
    };
    // The first two tiles go out together (their table entries too), so a two-tile split waits on
    // memory once; then tile i + 2 leaves as soon as tile i is done with its stage. One commit group
    // per tile, empty past the end, so "all but the newest group" is always the tile wanted next.
    const int own = kQkRope ? pos : -1;
    int ids[CPT], ids1[CPT];
    load_ids(first, ids);
    if (first + TK < end) load_ids(first + TK, ids1);
    issue(first, 0, ids, own);
    cp_async_commit();
    if (first + TK < end) issue(first + TK, 1, ids1, own);
    cp_async_commit();
    if (first + 2 * TK < end) load_ids(first + 2 * TK, ids);
    if constexpr (kQkRope) {
        constexpr int J = DP / 32, kWarpsPerBlock = kThreads / 32;
        constexpr int kMaxItems = (MAXG + 2 + kWarpsPerBlock - 1) / kWarpsPerBlock;
        const int warp = tid >> 5, lane = tid & 31;
        // The rotary factors (one set for every head of the token) and norm weights need no step data.
        float cs[J], sn[J], qw[J], kw[J];
        const float position = static_cast<float>(pos);
        rope_factors<J>(cs, sn, rope.inv_freq, rope.rot_dim, rope.scaling, lane, [&](int) { return position; });
        lane_values<J>(qw, rope.q_norm, lane);
        lane_values<J>(kw, rope.k_norm, lane);
        const bool holds_own = pos >= first && pos < end;
        const size_t own_slot = holds_own ? cache_slot(kv, table, pos, kvh, d) + lane : 0;
        pdl_wait();
        // Work items, warps taking them in turn: the group's q heads, then (in the split that holds
        // the token's position) its k and v heads. Every item's loads are issued before any math.
        const int items = G + (holds_own ? 2 : 0);
        const float* row = q + static_cast<size_t>(t) * q_stride;
        auto item_src = [&](int it) {
            return it < G ? qt + static_cast<size_t>(it) * d
                          : row + (static_cast<size_t>(it == G ? heads : heads + kv.kv_heads) + kvh) * d;
        };
        float x[kMaxItems][J];
#pragma unroll
        for (int i = 0; i < kMaxItems; ++i) {
            const int it = warp + kWarpsPerBlock * i;
            if (it < items)
#pragma unroll
                for (int j = 0; j < J; ++j) x[i][j] = item_src(it)[j * 32 + lane];
        }
#pragma unroll
        for (int i = 0; i < kMaxItems; ++i) {
            const int it = warp + kWarpsPerBlock * i;
            if (it >= items) continue;
            if (it < G) norm_rope_head_warp<J>(x[i], qw, rope.eps, cs, sn, rope.rot_dim);
            if (it == G) norm_rope_head_warp<J>(x[i], kw, rope.eps, cs, sn, rope.rot_dim);
            if (it < G) {
#pragma unroll
                for (int j = 0; j < J; ++j) q_s[it * DP + j * 32 + lane] = x[i][j] * scale_log2;
                continue;
            }
            const bool is_k = it == G;
            const int tile = (pos - first) / TK;
            KvT* tile_row = tile < 2 ? reinterpret_cast<KvT*>(big_s + (tile * 2 + (is_k ? 0 : 1)) * TK * S +
                                                              (pos - first - tile * TK) * S)
                                     : nullptr;
#pragma unroll
            for (int j = 0; j < J; ++j) {
                store_kv(kv, is_k, own_slot + j * 32, x[i][j]);
                if (tile_row) to_cache(x[i][j], tile_row[j * 32 + lane]);
            }
        }
    } else {
#pragma unroll
        for (int i = 0; i < Sh::QPT; ++i) {
            const int idx = tid + kThreads * i;
            if (idx < MAXG * DP) q_s[idx] = qr[i] * scale_log2;
        }
    }

    // Phase 1: key k1, vectors s1 + TPK j. Phase 3: vector `vec` of heads hg + HG i, keys kg * KPT + j.
    const int k1 = tid % TK, s1 = tid / TK;
    const int hg = (tid / NV) % HG, kg = tid / NV / HG;
    float m_run[NP], l_run[NP], acc[HPT][VE];
#pragma unroll
    for (int p = 0; p < NP; ++p) m_run[p] = -INFINITY, l_run[p] = 0.0f;
#pragma unroll
    for (int i = 0; i < HPT; ++i)
#pragma unroll
        for (int e = 0; e < VE; ++e) acc[i][e] = 0.0f;

    int stage = 0;
    for (int k0 = first; k0 < end; k0 += TK, stage ^= 1) {
        cp_async_wait_all_but_newest();  // this thread's copies of this tile have landed
        // Everyone's copies (and q_s) visible; every thread is past the previous tile's phase 3, so
        // part_s and corr_s are free.
        __syncthreads();
        const uint4* ks = big_s + stage * 2 * TK * S;
        const uint4* vs = ks + TK * S;

        // Phase 1: partial scores of key k1 over this thread's vectors, for every head of the group.
        {
            float dot[MAXG];
#pragma unroll
            for (int h = 0; h < MAXG; ++h) dot[h] = 0.0f;
#pragma unroll
            for (int j = 0; j < NV / TPK; ++j) {
                const int v = s1 + TPK * j;
                if (v < nv_live) {
                    float kf[VE];
                    widen(ks[k1 * S + v], kf);
#pragma unroll
                    for (int h = 0; h < MAXG; ++h) {
                        if (h >= G) break;
                        const float4* qv = reinterpret_cast<const float4*>(q_s + h * DP + v * VE);
#pragma unroll
                        for (int f = 0; f < VE / 4; ++f) {
                            const float4 w = qv[f];
                            dot[h] += w.x * kf[4 * f] + w.y * kf[4 * f + 1] + w.z * kf[4 * f + 2] + w.w * kf[4 * f + 3];
                        }
                    }
                }
            }
#pragma unroll
            for (int h = 0; h < MAXG; ++h)
                if (h < G) part_s[(s1 * MAXG + h) * TK + k1] = dot[h];
        }
        __syncthreads();

        // Phase 2: entry (h, k) = tid + kThreads p; the TK entries of a head are one warp segment,
        // so its max is shuffles within the segment, all lanes taking part.
#pragma unroll
        for (int p = 0; p < NP; ++p) {
            const int idx = tid + kThreads * p, h = idx / TK, k = idx % TK;
            const bool active = h < G, valid = active && k0 + k < end;
            float s = -INFINITY;
            if (valid) {
                s = 0.0f;
#pragma unroll
                for (int j = 0; j < TPK; ++j) s += part_s[(j * MAXG + h) * TK + k];
            }
            float mt = s;
#pragma unroll
            for (int off = TK / 2; off > 0; off >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, off));
            // An active head has a live key in every tile (the tile's first), so m_new is finite there.
            const float m_new = fmaxf(m_run[p], mt);
            const float pr = valid ? exp2f(s - m_new) : 0.0f;
            const float corr = m_run[p] == -INFINITY ? 0.0f : exp2f(m_run[p] - m_new);
            // Each lane keeps its own keys' sum (the segment shares m_run, so the scales agree);
            // the segment adds them up once, after the last tile.
            l_run[p] = l_run[p] * corr + pr;
            m_run[p] = m_new;
            if (active) {
                part_s[h * TK + k] = pr;
                if (k == 0) corr_s[h] = corr;
            }
        }
        __syncthreads();

        // Phase 3: acc = acc * corr + sum over this thread's keys of p * v.
        if (copier) {
#pragma unroll
            for (int i = 0; i < HPT; ++i) {
                const int h = hg + HG * i;
                if (h < G) {
                    const float c = corr_s[h];
#pragma unroll
                    for (int e = 0; e < VE; ++e) acc[i][e] *= c;
                }
            }
            // This thread's keys are consecutive: their p come as whole vectors.
            float pr[HPT][KPT];
#pragma unroll
            for (int i = 0; i < HPT; ++i) {
                const int h = min(hg + HG * i, G - 1);  // heads past G: read and ignored
                const float* src = part_s + h * TK + kg * KPT;
#pragma unroll
                for (int j = 0; j < KPT; j += KPT % 4 == 0 ? 4 : 2) {
                    if constexpr (KPT % 4 == 0) {
                        const float4 w = *reinterpret_cast<const float4*>(src + j);
                        pr[i][j] = w.x, pr[i][j + 1] = w.y, pr[i][j + 2] = w.z, pr[i][j + 3] = w.w;
                    } else {
                        const float2 w = *reinterpret_cast<const float2*>(src + j);
                        pr[i][j] = w.x, pr[i][j + 1] = w.y;
                    }
                }
            }
#pragma unroll
            for (int j = 0; j < KPT; ++j) {
                float vf[VE];
                widen(vs[(kg * KPT + j) * S + vec], vf);
#pragma unroll
                for (int i = 0; i < HPT; ++i)
                    if (hg + HG * i < G)
#pragma unroll
                        for (int e = 0; e < VE; ++e) acc[i][e] = fmaf(pr[i][j], vf[e], acc[i][e]);
            }
        }
        if (k0 + 2 * TK < end) {
            __syncthreads();  // this stage is read: tile i + 2 may take it
            issue(k0 + 2 * TK, stage, ids, -1);
            if (k0 + 3 * TK < end) load_ids(k0 + 3 * TK, ids);
        }
        cp_async_commit();
    }

#pragma unroll
    for (int p = 0; p < NP; ++p) {
        const int idx = tid + kThreads * p, h = idx / TK, k = idx % TK;
        float l = l_run[p];
#pragma unroll
        for (int off = TK / 2; off > 0; off >>= 1) l += __shfl_xor_sync(0xffffffffu, l, off);
        if (h < G && k == 0) ml_s[h] = make_float2(m_run[p], l);
    }
    __syncthreads();  // the last tile is read: big_s becomes the key groups' sums
    float* red_s = reinterpret_cast<float*>(big_s);
    if (copier)
#pragma unroll
        for (int i = 0; i < HPT; ++i) {
            const int h = hg + HG * i;
            if (h < G) {
                float4* dst = reinterpret_cast<float4*>(red_s + (kg * MAXG + h) * DP + vec * VE);
#pragma unroll
                for (int f = 0; f < VE / 4; ++f)
                    dst[f] = make_float4(acc[i][4 * f], acc[i][4 * f + 1], acc[i][4 * f + 2], acc[i][4 * f + 3]);
            }
        }
    __syncthreads();
    if (o.splits == 1 && o.q) {
        // One warp per 128-channel group, lanes holding channels j * 32 + lane as quantize_group_warp
        // takes them. Each value is summed and divided exactly as the loop below does it, so the
        // codes and scales are quantize_fp8's on `out` bit for bit.
        const int lane = tid & 31, gph = d / 128;
        for (int gi = tid >> 5; gi < G * gph; gi += kThreads / 32) {
            const int h = gi / gph, e0 = (gi - h * gph) * 128;
            const size_t r = out_row + h;
            float* out_g = o.out + r * d + e0;
            float* q_g = o.q + r * d + e0;
            float v[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int e = e0 + 32 * j + lane;
                float a = 0.0f;
#pragma unroll
                for (int g = 0; g < KG; ++g) a += red_s[(g * MAXG + h) * DP + e];
                v[j] = a / ml_s[h].y;
                out_g[32 * j + lane] = v[j];
            }
            const float s = quantize_group_warp(v);
#pragma unroll
            for (int j = 0; j < 4; ++j) q_g[32 * j + lane] = v[j];
            if (lane == 0) o.q_scales[r * gph + e0 / 128] = s;
        }
    } else {
        for (int idx = tid; idx < G * d; idx += kThreads) {
            const int h = idx / d, e = idx - h * d;
            float v = 0.0f;
#pragma unroll
            for (int g = 0; g < KG; ++g) v += red_s[(g * MAXG + h) * DP + e];
            const size_t r = out_row + h;
            if (o.splits == 1)
                o.out[r * d + e] = v / ml_s[h].y;
            else
                o.partial[(r * o.splits + split) * d + e] = v;
        }
    }
    if (o.splits > 1 && tid < G) o.ml[(out_row + tid) * o.splits + split] = ml_s[tid];
}

// One block per (token, head), one thread per element: its splits rescaled to their common
// maximum. Every split's partial is requested at once, with the (max, sum) pairs, so the merge
// waits on one round trip to L2, not two; the splits past the token's position wrote (-inf, 0) and
// no partial, and their stale values are selected away (weight 0), never multiplied. Each warp
// weighs the splits itself: no block barrier, except for the FP8 copy (q not null, d a multiple of
// 128), whose groups' amax spans four warps.
__global__ void __launch_bounds__(kMaxDim) attention_merge_kernel(const float* partial, const float2* ml, int splits,
                                                                  int d, float* out, float* q, float* q_scales) {
    constexpr int kPerLane = kMaxSplits / 32;
    __shared__ float w_s[kMaxDim / 32][kMaxSplits];
    __shared__ float amax_s[kMaxDim / 32];
    pdl_launch_dependents();
    pdl_wait();
    const size_t r = blockIdx.x;
    const int e = threadIdx.x, lane = e & 31, warp = e >> 5;
    // Walked as an address so that each load costs an add, not an index computation; read once, so
    // L2 only (ld.global.cg, which also keeps the load in the global space the cast lost).
    uintptr_t src = reinterpret_cast<uintptr_t>(partial + r * splits * d + e);
    const uintptr_t step = static_cast<uintptr_t>(d) * sizeof(float);
    const int n = e < d ? splits : 0;
    float p[kMaxSplits];
#pragma unroll
    for (int s = 0; s < kMaxSplits; ++s, src += step) p[s] = s < n ? __ldcg(reinterpret_cast<const float*>(src)) : 0.0f;
    float2 part[kPerLane];
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
        const int s = lane + 32 * j;
        part[j] = s < splits ? ml[r * splits + s] : make_float2(-INFINITY, 0.0f);
        mx = fmaxf(mx, part[j].x);
    }
    mx = warp_max(mx);
    float total = 0.0f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
        const float w = part[j].x != -INFINITY ? exp2f(part[j].x - mx) : 0.0f;
        w_s[warp][lane + 32 * j] = w;
        total += part[j].y * w;
    }
    total = warp_sum(total);
    __syncwarp();
    float acc = 0.0f;
#pragma unroll
    for (int s = 0; s < kMaxSplits; ++s) {
        const float w = w_s[warp][s];
        acc += w > 0.0f ? p[s] * w : 0.0f;
    }
    const float x = acc / total;
    if (e < d) out[r * d + e] = x;
    if (q) {  // every thread holds a channel: blockDim.x == d
        const float wmax = warp_max(fabsf(x));
        if (lane == 0) amax_s[warp] = wmax;
        __syncthreads();
        const int w0 = warp & ~3;  // the first of this group's four warps
        const float s = fp8_group_scale(fmaxf(fmaxf(amax_s[w0], amax_s[w0 + 1]), fmaxf(amax_s[w0 + 2], amax_s[w0 + 3])));
        q[r * d + e] = fp8_quantize_value(x, s);
        if ((e & 127) == 0) q_scales[r * (d / 128) + e / 128] = s;
    }
}

// rope: the fused decode prologue's inputs, or null for attention over normalised q rows.
template <int MAXG, int NV, typename KvT>
void launch_split(const DeviceKvLayer& kv, const float* q, int q_stride, int heads, float scale_log2, const DeviceBatch& batch,
                  const SplitOutput& o, const QkRope* rope, cudaStream_t stream) {
    const dim3 grid(batch.tokens, kv.kv_heads, o.splits);
    const bool vec_ok = (static_cast<size_t>(kv.head_dim) * sizeof(KvT)) % 16 == 0 &&
                        reinterpret_cast<uintptr_t>(kv.k) % 16 == 0 && reinterpret_cast<uintptr_t>(kv.v) % 16 == 0;
    if (rope)
        Q3N_CUDA(launch_pdl(attention_split_kernel<MAXG, NV, KvT, true>, grid, dim3(kThreads), 0, stream, kv, q, q_stride,
                            heads, scale_log2, batch, o, vec_ok, *rope));
    else
        Q3N_CUDA(launch_pdl(attention_split_kernel<MAXG, NV, KvT, false>, grid, dim3(kThreads), 0, stream, kv, q, q_stride,
                            heads, scale_log2, batch, o, vec_ok, QkRope{}));
}

template <int MAXG, typename KvT>
void launch_dim(const DeviceKvLayer& kv, const float* q, int q_stride, int heads, float scale_log2, const DeviceBatch& batch,
                const SplitOutput& o, const QkRope* rope, cudaStream_t stream) {
    constexpr int per64 = 64 * static_cast<int>(sizeof(KvT)) / 16;  // vectors in 64 elements
    if (kv.head_dim <= 64) launch_split<MAXG, per64, KvT>(kv, q, q_stride, heads, scale_log2, batch, o, rope, stream);
    else if (kv.head_dim <= 128) launch_split<MAXG, 2 * per64, KvT>(kv, q, q_stride, heads, scale_log2, batch, o, rope, stream);
    else launch_split<MAXG, 4 * per64, KvT>(kv, q, q_stride, heads, scale_log2, batch, o, rope, stream);
}

template <typename KvT>
void launch_group(int group, const DeviceKvLayer& kv, const float* q, int q_stride, int heads, float scale_log2,
                  const DeviceBatch& batch, const SplitOutput& o, const QkRope* rope, cudaStream_t stream) {
    if (group <= 1) launch_dim<1, KvT>(kv, q, q_stride, heads, scale_log2, batch, o, rope, stream);
    else if (group <= 2) launch_dim<2, KvT>(kv, q, q_stride, heads, scale_log2, batch, o, rope, stream);
    else if (group <= 4) launch_dim<4, KvT>(kv, q, q_stride, heads, scale_log2, batch, o, rope, stream);
    else if (group <= 8) launch_dim<8, KvT>(kv, q, q_stride, heads, scale_log2, batch, o, rope, stream);
    else launch_dim<16, KvT>(kv, q, q_stride, heads, scale_log2, batch, o, rope, stream);
}

// Splits that keep the GPU busy without a partial buffer beyond the workspace: about eight blocks
// per SM in all, at least kSplitUnit keys per split (one tile at head_dim 128), at most kMaxSplits;
// none for tables of up to kMinSplitKeys keys.
int choose_splits(int tokens, int kv_heads, int max_keys) {
    if (max_keys <= kMinSplitKeys) return 1;
    const int groups = std::max(1, tokens * kv_heads);
    const int want = std::max(1, kTargetBlocks / groups);
    const int most = std::max(1, (max_keys + kSplitUnit - 1) / kSplitUnit);
    return std::min({want, most, kMaxSplits});
}

// The split kernel (and the merge past one split) for decode-shaped steps; rope as launch_split.
void split_attention(const DeviceKvLayer& kv, const float* q, int q_stride, int heads, float scale, const DeviceBatch& batch,
                     float* out, cudaStream_t stream, void* workspace, size_t workspace_bytes, float* q_out, float* q_scales,
                     const QkRope* rope, const L2Prefetch& next = {}) {
    if (kv.head_dim <= 0 || kv.head_dim > kMaxDim) fail(Q3N_ERR_UNSUPPORTED, "head_dim above 256 is not supported on the GPU");
    if (kv.kv_heads <= 0 || heads % kv.kv_heads != 0 || heads / kv.kv_heads > 16)
        fail(Q3N_ERR_UNSUPPORTED, "attention on the GPU needs heads to be a multiple of kv_heads, at most 16 per group");
    // The table width bounds every position of the step (a graph replays with the same width).
    const int max_keys = std::max(1, batch.max_blocks * kv.block_size);
    const bool fused = q_out && kv.head_dim % 128 == 0;
    SplitOutput o{out, nullptr, nullptr, 1, 0, nullptr, nullptr, next};
    int splits = choose_splits(batch.tokens, kv.kv_heads, max_keys);
    const size_t per_split = static_cast<size_t>(batch.tokens) * heads * (static_cast<size_t>(kv.head_dim) + 2) * sizeof(float);
    if (splits > 1 && workspace) splits = static_cast<int>(std::min<size_t>(splits, workspace_bytes / per_split));
    if (!workspace) splits = 1;
    splits = std::max(splits, 1);
    // Chunks are whole units; recount the splits the rounding leaves.
    o.chunk = ((max_keys + splits - 1) / splits + kSplitUnit - 1) / kSplitUnit * kSplitUnit;
    o.splits = std::max(1, (max_keys + o.chunk - 1) / o.chunk);
    if (o.splits > 1) {  // the (max, sum) pairs first: float2 alignment whatever head_dim is
        o.ml = static_cast<float2*>(workspace);
        o.partial = reinterpret_cast<float*>(o.ml + static_cast<size_t>(batch.tokens) * heads * o.splits);
    } else if (fused) {
        o.q = q_out, o.q_scales = q_scales;
    }
    const float scale_log2 = scale * kLog2e;
    const int group = heads / kv.kv_heads;
    if (kv.dtype == KvDtype::F32)
        launch_group<float>(group, kv, q, q_stride, heads, scale_log2, batch, o, rope, stream);
    else
        launch_group<__nv_bfloat16>(group, kv, q, q_stride, heads, scale_log2, batch, o, rope, stream);
    if (o.splits > 1)
        Q3N_CUDA(launch_pdl(attention_merge_kernel, dim3(static_cast<unsigned>(batch.tokens) * heads),
                            dim3((kv.head_dim + 31) / 32 * 32), 0, stream, o.partial, o.ml, o.splits, kv.head_dim, out,
                            fused ? q_out : nullptr, fused ? q_scales : nullptr));
    if (q_out && !fused) quantize_fp8(out, batch.tokens, heads * kv.head_dim, q_out, q_scales, stream);
}

}  // namespace

size_t attention_workspace_bytes(int tokens, int heads, int kv_heads, int head_dim) {
    const int splits = choose_splits(tokens, kv_heads, kMaxSplits * kSplitUnit);
    if (splits <= 1) return 0;
    return static_cast<size_t>(tokens) * heads * splits * (static_cast<size_t>(head_dim) + 2) * sizeof(float);
}

void attention(const DeviceKvLayer& kv, const float* q, int q_stride, int heads, float scale, const DeviceBatch& batch,
               float* out, cudaStream_t stream, void* workspace, size_t workspace_bytes, float* q_out, float* q_scales) {
    if (batch.tokens == 0) return;
    // Prefill is not launch-bound: its quantisation stays a separate kernel.
    if (batch.prefill && attention_prefill_applicable(kv, batch.tokens)) {
        attention_prefill(kv, q, q_stride, heads, scale, batch, out, stream);
        if (q_out) quantize_fp8(out, batch.tokens, heads * kv.head_dim, q_out, q_scales, stream);
        return;
    }
    split_attention(kv, q, q_stride, heads, scale, batch, out, stream, workspace, workspace_bytes, q_out, q_scales, nullptr);
}

void attention_packed(const DeviceKvLayer& kv, const float* q, int q_stride, int heads, float scale,
                      const DeviceBatch& batch, float* out, cudaStream_t stream, void* workspace, size_t workspace_bytes,
                      const Fp8Out& quant) {
    if (batch.tokens == 0) return;
    if (batch.prefill && attention_prefill_applicable(kv, batch.tokens))
        return attention_prefill(kv, q, q_stride, heads, scale, batch, out, stream, quant);
    attention(kv, q, q_stride, heads, scale, batch, out, stream, workspace, workspace_bytes);
    quantize_fp8(out, batch.tokens, heads * kv.head_dim, quant, stream);
}

bool attention_decode_fusable(const DeviceKvLayer& kv, int rot_dim) {
    const int d = kv.head_dim;
    return (d == 64 || d == 128 || d == 256) && rot_dim >= 0 && rot_dim % 64 == 0 && rot_dim <= d;
}

bool attention_decode_fuses(const DeviceBatch& batch, const DeviceKvLayer& kv, int rot_dim) {
    // Qwen3-4B-FP8, H100, 512-token context, three interleaved pairs: batch 1 350.7 -> 363.9 tok/s,
    // batch 8 1,764 -> 1,787, batch 32 5,637 -> 5,499.
    constexpr int kMaxTokens = 8;
    static const bool enabled = [] {
        const char* v = std::getenv("Q3N_ATTN_FUSED_QK");
        return !(v && std::strcmp(v, "0") == 0);
    }();
    return enabled && !batch.prefill && batch.tokens <= kMaxTokens && attention_decode_fusable(kv, rot_dim);
}

void attention_decode_qk_norm_rope(const DeviceKvLayer& kv, const float* qkv, int heads, const float* q_norm,
                                   const float* k_norm, float eps, const float* inv_freq, int rot_dim,
                                   float attention_scaling, float scale, const DeviceBatch& batch, float* out,
                                   cudaStream_t stream, void* workspace, size_t workspace_bytes, float* q_out,
                                   float* q_scales, const L2Prefetch& next) {
    if (batch.tokens == 0) return;
    if (batch.prefill) fail(Q3N_ERR_INTERNAL, "attention_decode_qk_norm_rope takes decode steps only (one token per sequence)");
    if (!attention_decode_fusable(kv, rot_dim))
        fail(Q3N_ERR_INTERNAL, "attention_decode_qk_norm_rope: head_dim must be 64, 128 or 256 and rot_dim whole 64-channel pairs");
    const QkRope rope{q_norm, k_norm, eps, inv_freq, rot_dim, attention_scaling};
    const int row = (heads + 2 * kv.kv_heads) * kv.head_dim;
    split_attention(kv, qkv, row, heads, scale, batch, out, stream, workspace, workspace_bytes, q_out, q_scales, &rope, next);
}

}  // namespace q3n::cuda
