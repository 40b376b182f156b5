// Paged causal attention for decode steps (and, until the tensor-core prefill kernel takes them,
// prefills): one block per (token, kv head, key split). All query heads of a GQA group share the
// block, so each key and value row is read from memory once per group, not once per head; long
// contexts are split over several blocks whose partial results (unnormalised output, running max
// and sum) a second kernel merges. A decode step at batch 1 has only kv_heads x 1 groups: without
// the split, 8 blocks would walk 640 keys serially (45 us per layer on an H100).
//
// Inside a block each warp takes a quarter of the split's keys (see attention_split_kernel).
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>

#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/ops.h"

namespace q3n::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kSplitUnit = 64;  // a split's keys are a multiple of this: 16 per warp
constexpr int kWarps = kThreads / 32;
constexpr int kMaxDim = 256;
constexpr int kMaxSplits = 64;
constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
__device__ __forceinline__ float kv_at(const T* p, size_t i);
template <>
__device__ __forceinline__ float kv_at<float>(const float* p, size_t i) { return p[i]; }
template <>
__device__ __forceinline__ float kv_at<__nv_bfloat16>(const __nv_bfloat16* p, size_t i) { return __bfloat162float(p[i]); }

// Eight consecutive cache elements as floats (16-byte aligned for bf16, 32-byte for f32).
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* out) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        out[2 * i] = __uint_as_float(w[i] << 16);
        out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void load8(const float* p, float* out) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}

struct SplitOutput {
    float* out;       // [tokens, heads, d]: final, when the launch has one split
    float* partial;   // [tokens, heads, splits, d]: unnormalised, otherwise
    float2* ml;       // [tokens, heads, splits]: (running max in log2 units, sum)
    int splits;
    int chunk;        // keys per split, a multiple of kThreads
};

// Up to PL consecutive cache elements (a lane's dims) as floats.
template <int PL>
__device__ __forceinline__ void load_dims(const __nv_bfloat16* p, float* out) {
    if constexpr (PL == 2) {
        const uint32_t w = *reinterpret_cast<const uint32_t*>(p);
        out[0] = __uint_as_float(w << 16), out[1] = __uint_as_float(w & 0xffff0000u);
    } else if constexpr (PL == 4) {
        const uint2 w = *reinterpret_cast<const uint2*>(p);
        out[0] = __uint_as_float(w.x << 16), out[1] = __uint_as_float(w.x & 0xffff0000u);
        out[2] = __uint_as_float(w.y << 16), out[3] = __uint_as_float(w.y & 0xffff0000u);
    } else {
        load8(p, out);
    }
}
template <int PL>
__device__ __forceinline__ void load_dims(const float* p, float* out) {
    if constexpr (PL == 2) {
        const float2 v = *reinterpret_cast<const float2*>(p);
        out[0] = v.x, out[1] = v.y;
    } else if constexpr (PL == 4) {
        const float4 v = *reinterpret_cast<const float4*>(p);
        out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
    } else {
        load8(p, out);
    }
}

// Keys whose K and V rows are loaded before any is used; fewer when the group's q and output
// already fill the registers (Qwen3-Next: 8 heads per group, head_dim 256).
template <int MAXG, int PL>
__host__ __device__ constexpr int unroll_for() { return MAXG * PL >= 64 ? 2 : MAXG * PL >= 32 ? 4 : 8; }

// MAXG: the largest GQA group this instantiation takes (heads per kv head); PL: dims per lane
// (head_dim / 32 rounded up). kContig: head_dim == 32 * PL, so a lane's dims are consecutive and
// one vector load fetches them; otherwise lane owns dims lane + 32 i.
//
// Each warp walks its own quarter of the split's keys with its own online softmax (no block-wide
// barrier inside the loop); lanes split head_dim, so one K or V row is one coalesced warp load and
// a score is a warp sum. The four warps' (max, sum, output) merge once at the end.
template <int MAXG, int PL, typename KvT, bool kContig>
__global__ void __launch_bounds__(kThreads) attention_split_kernel(DeviceKvLayer kv, const float* q, int q_stride, int heads,
                                                                   float scale_log2, DeviceBatch batch, SplitOutput o) {
    __shared__ float red_s[kWarps][kMaxDim];
    __shared__ float mw_s[kWarps][MAXG], lw_s[kWarps][MAXG];
    const int t = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int d = kv.head_dim, G = heads / kv.kv_heads;
    const int pos = batch.positions[t];
    const int first = split * o.chunk, end = min(first + o.chunk, pos + 1);
    const size_t out_row = static_cast<size_t>(t) * heads + static_cast<size_t>(kvh) * G;  // first head of the group

    if (first >= end) {  // this split lies past the token's position
        if (o.splits > 1)
            for (int h = threadIdx.x; h < G; h += kThreads) o.ml[(out_row + h) * o.splits + split] = make_float2(-INFINITY, 0.0f);
        return;
    }
    auto dim = [&](int i) { return kContig ? lane * PL + i : lane + 32 * i; };
    float qv[MAXG][PL], m[MAXG], l[MAXG], acc[MAXG][PL];
#pragma unroll
    for (int h = 0; h < MAXG; ++h) {
        m[h] = -INFINITY;
        l[h] = 0.0f;
#pragma unroll
        for (int i = 0; i < PL; ++i) {
            const int e = dim(i);
            qv[h][i] = h < G && e < d ? q[static_cast<size_t>(t) * q_stride + (static_cast<size_t>(kvh) * G + h) * d + e] * scale_log2
                                      : 0.0f;
            acc[h][i] = 0.0f;
        }
    }
    const KvT* K = static_cast<const KvT*>(kv.k);
    const KvT* V = static_cast<const KvT*>(kv.v);
    const int32_t* table = batch.block_tables + static_cast<size_t>(batch.seq_of_token[t]) * batch.max_blocks;
    const int per_warp = (o.chunk + kWarps - 1) / kWarps;
    const int k0 = first + warp * per_warp, k1 = min(k0 + per_warp, end);
    // The block ids of a window of 32 table entries sit one per lane, so a key's row address costs
    // a shuffle instead of a dependent load before every round of K/V loads.
    const int last_block = (end - 1) / kv.block_size;
    int window = k0 / kv.block_size;
    int block_id = window + lane <= last_block ? table[window + lane] : 0;
    auto row_of = [&](int key) {
        const int id = __shfl_sync(0xffffffffu, block_id, key / kv.block_size - window);
        return (static_cast<size_t>(id) * kv.block_size + key % kv.block_size) * kv.kv_heads * d + static_cast<size_t>(kvh) * d;
    };

    constexpr int kUnroll = unroll_for<MAXG, PL>();
    for (int k = k0; k < k1; k += kUnroll) {
        if ((min(k + kUnroll, k1) - 1) / kv.block_size - window >= 32) {  // the round reaches past the window
            window = k / kv.block_size;
            block_id = window + lane <= last_block ? table[window + lane] : 0;
        }
        float kf[kUnroll][PL], vf[kUnroll][PL];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const bool in = k + u < k1;
            // Past the warp's last key the row of key k is read again and ignored: an unconditional
            // load keeps all of them in flight (loads under a branch were issued one at a time, each
            // waited for before the next: 25 us per layer at batch 1).
            const size_t r = row_of(in ? k + u : k);
            if (kContig) {
                load_dims<PL>(K + r + lane * PL, kf[u]);
                load_dims<PL>(V + r + lane * PL, vf[u]);
            } else {
#pragma unroll
                for (int i = 0; i < PL; ++i) {
                    const int e = dim(i);
                    kf[u][i] = in && e < d ? kv_at(K + r, e) : 0.0f;
                    vf[u][i] = in && e < d ? kv_at(V + r, e) : 0.0f;
                }
            }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            if (k + u >= k1) break;  // uniform over the warp
#pragma unroll
            for (int h = 0; h < MAXG; ++h) {
                if (h >= G) break;
                float part = 0.0f;
#pragma unroll
                for (int i = 0; i < PL; ++i) part += qv[h][i] * kf[u][i];
                const float s = warp_sum(part);
                const float m_new = fmaxf(m[h], s);
                const float corr = exp2f(m[h] - m_new), p = exp2f(s - m_new);  // corr = 0 on the first key
                l[h] = l[h] * corr + p;
#pragma unroll
                for (int i = 0; i < PL; ++i) acc[h][i] = acc[h][i] * corr + p * vf[u][i];
                m[h] = m_new;
            }
        }
    }

    // Merge the warps, head by head.
    if (lane == 0)
#pragma unroll
        for (int h = 0; h < MAXG; ++h)
            if (h < G) mw_s[warp][h] = m[h], lw_s[warp][h] = l[h];
    for (int h = 0; h < G; ++h) {
#pragma unroll
        for (int hh = 0; hh < MAXG; ++hh)
            if (hh == h)
#pragma unroll
                for (int i = 0; i < PL; ++i) {
                    const int e = dim(i);
                    if (e < d) red_s[warp][e] = acc[hh][i];
                }
        __syncthreads();
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, mw_s[w][h]);
        float wt[kWarps], total = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
            wt[w] = mw_s[w][h] == -INFINITY ? 0.0f : exp2f(mw_s[w][h] - mx);  // a warp with no keys counts nothing
            total += lw_s[w][h] * wt[w];
        }
        const size_t r = out_row + h;
        for (int e = threadIdx.x; e < d; e += kThreads) {
            float v = 0.0f;
#pragma unroll
            for (int w = 0; w < kWarps; ++w) v += red_s[w][e] * wt[w];
            if (o.splits == 1)
                o.out[r * d + e] = v / total;
            else
                o.partial[(r * o.splits + split) * d + e] = v;
        }
        if (o.splits > 1 && threadIdx.x == 0) o.ml[r * o.splits + split] = make_float2(mx, total);
        __syncthreads();  // red_s is rewritten for the next head
    }
}

// Merges the splits of one (token, head): each rescaled to the common maximum.
__global__ void attention_merge_kernel(const float* partial, const float2* ml, int splits, int d, float* out) {
    const size_t r = blockIdx.x;
    float mx = -INFINITY;
    for (int s = 0; s < splits; ++s) mx = fmaxf(mx, ml[r * splits + s].x);
    float total = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const float2 v = ml[r * splits + s];
        if (v.x != -INFINITY) total += v.y * exp2f(v.x - mx);
    }
    const float inv = 1.0f / total;
    for (int e = threadIdx.x; e < d; e += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float2 v = ml[r * splits + s];
            if (v.x != -INFINITY) acc += partial[(r * splits + s) * d + e] * exp2f(v.x - mx);
        }
        out[r * d + e] = acc * inv;
    }
}

template <int MAXG, int PL, typename KvT>
void launch_split(const DeviceKvLayer& kv, const float* q, int q_stride, int heads, float scale_log2, const DeviceBatch& batch,
                  const SplitOutput& o, cudaStream_t stream) {
    const dim3 grid(batch.tokens, kv.kv_heads, o.splits);
    if (kv.head_dim == 32 * PL)
        attention_split_kernel<MAXG, PL, KvT, true><<<grid, kThreads, 0, stream>>>(kv, q, q_stride, heads, scale_log2, batch, o);
    else
        attention_split_kernel<MAXG, PL, KvT, false><<<grid, kThreads, 0, stream>>>(kv, q, q_stride, heads, scale_log2, batch, o);
}

template <int MAXG, typename KvT>
void launch_dim(const DeviceKvLayer& kv, const float* q, int q_stride, int heads, float scale_log2, const DeviceBatch& batch,
                const SplitOutput& o, cudaStream_t stream) {
    if (kv.head_dim <= 64) launch_split<MAXG, 2, KvT>(kv, q, q_stride, heads, scale_log2, batch, o, stream);
    else if (kv.head_dim <= 128) launch_split<MAXG, 4, KvT>(kv, q, q_stride, heads, scale_log2, batch, o, stream);
    else launch_split<MAXG, 8, KvT>(kv, q, q_stride, heads, scale_log2, batch, o, stream);
}

template <typename KvT>
void launch_group(int group, const DeviceKvLayer& kv, const float* q, int q_stride, int heads, float scale_log2,
                  const DeviceBatch& batch, const SplitOutput& o, cudaStream_t stream) {
    if (group <= 1) launch_dim<1, KvT>(kv, q, q_stride, heads, scale_log2, batch, o, stream);
    else if (group <= 2) launch_dim<2, KvT>(kv, q, q_stride, heads, scale_log2, batch, o, stream);
    else if (group <= 4) launch_dim<4, KvT>(kv, q, q_stride, heads, scale_log2, batch, o, stream);
    else if (group <= 8) launch_dim<8, KvT>(kv, q, q_stride, heads, scale_log2, batch, o, stream);
    else launch_dim<16, KvT>(kv, q, q_stride, heads, scale_log2, batch, o, stream);
}

// Splits that keep the GPU busy without a partial buffer beyond the workspace: about two blocks
// per SM in all, at least kSplitUnit keys per split, at most kMaxSplits.
int choose_splits(int tokens, int kv_heads, int max_keys) {
    const int groups = std::max(1, tokens * kv_heads);
    const int want = std::max(1, 264 / groups);
    const int most = std::max(1, (max_keys + kSplitUnit - 1) / kSplitUnit);
    return std::min({want, most, kMaxSplits});
}

}  // namespace

size_t attention_workspace_bytes(int tokens, int heads, int kv_heads, int head_dim) {
    const int splits = choose_splits(tokens, kv_heads, kMaxSplits * kSplitUnit);
    if (splits <= 1) return 0;
    return static_cast<size_t>(tokens) * heads * splits * (static_cast<size_t>(head_dim) + 2) * sizeof(float);
}

void attention(const DeviceKvLayer& kv, const float* q, int q_stride, int heads, float scale, const DeviceBatch& batch,
               float* out, cudaStream_t stream, void* workspace, size_t workspace_bytes) {
    if (batch.tokens == 0) return;
    if (batch.prefill && attention_prefill_applicable(kv, batch.tokens))
        return attention_prefill(kv, q, q_stride, heads, scale, batch, out, stream);
    if (kv.head_dim > kMaxDim) fail(Q3N_ERR_UNSUPPORTED, "head_dim above 256 is not supported on the GPU");
    if (kv.kv_heads <= 0 || heads % kv.kv_heads != 0 || heads / kv.kv_heads > 16)
        fail(Q3N_ERR_UNSUPPORTED, "attention on the GPU needs heads to be a multiple of kv_heads, at most 16 per group");
    // The table width bounds every position of the step (a graph replays with the same width).
    const int max_keys = batch.max_blocks * kv.block_size;
    SplitOutput o{out, nullptr, nullptr, 1, 0};
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
    }
    const float scale_log2 = scale * kLog2e;
    const int group = heads / kv.kv_heads;
    if (kv.dtype == KvDtype::F32)
        launch_group<float>(group, kv, q, q_stride, heads, scale_log2, batch, o, stream);
    else
        launch_group<__nv_bfloat16>(group, kv, q, q_stride, heads, scale_log2, batch, o, stream);
    Q3N_CUDA_LAUNCHED("attention");
    if (o.splits > 1) {
        attention_merge_kernel<<<static_cast<unsigned>(batch.tokens) * heads, 128, 0, stream>>>(o.partial, o.ml, o.splits,
                                                                                               kv.head_dim, out);
        Q3N_CUDA_LAUNCHED("attention_merge");
    }
}

}  // namespace q3n::cuda
