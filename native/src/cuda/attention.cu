// Paged causal attention, one block per (token, head): each of the 16 warps walks every 16th key of
// the sequence with an online softmax (scores in fp32), then the warps' partial results are merged.
// GQA: query head h reads KV head h / (heads / kv_heads). Split-K over long contexts comes later.
#include <cuda_bf16.h>

#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/ops.h"

namespace q3n::cuda {
namespace {

constexpr int kWarps = 16;  // decode has only heads x sequences blocks: parallelism comes from keys
constexpr int kMaxPerLane = 8;  // head_dim <= 256

__device__ __forceinline__ float load_kv(const void* base, KvDtype dtype, size_t i) {
    return dtype == KvDtype::F32 ? static_cast<const float*>(base)[i]
                                 : __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
}

__global__ void attention_kernel(DeviceKvLayer kv, const float* q, int q_stride, int heads, float scale,
                                 DeviceBatch batch, float* out) {
    __shared__ float m_s[kWarps], l_s[kWarps];
    __shared__ float acc_s[kWarps][kMaxPerLane * 32];
    const int t = blockIdx.x, h = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    const int d = kv.head_dim, per_lane = (d + 31) / 32;
    const int kvh = h / (heads / kv.kv_heads);
    const float* qh = q + static_cast<size_t>(t) * q_stride + static_cast<size_t>(h) * d;
    float qv[kMaxPerLane], acc[kMaxPerLane];
#pragma unroll
    for (int j = 0; j < kMaxPerLane; ++j) {
        const int e = lane + 32 * j;
        qv[j] = (j < per_lane && e < d) ? qh[e] : 0.0f;
        acc[j] = 0.0f;
    }
    const int pos = batch.positions[t];
    const int32_t* table = batch.block_tables + static_cast<size_t>(batch.seq_of_token[t]) * batch.max_blocks;
    float m = -INFINITY, l = 0.0f;
    for (int key = warp; key <= pos; key += kWarps) {
        const size_t base = (static_cast<size_t>(table[key / kv.block_size]) * kv.block_size + key % kv.block_size) *
                                kv.kv_heads * d + static_cast<size_t>(kvh) * d;
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < kMaxPerLane; ++j) {
            const int e = lane + 32 * j;
            if (j < per_lane && e < d) dot += qv[j] * load_kv(kv.k, kv.dtype, base + e);
        }
        const float s = warp_sum(dot) * scale;
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new), p = expf(s - m_new);
        l = l * corr + p;
#pragma unroll
        for (int j = 0; j < kMaxPerLane; ++j) {
            const int e = lane + 32 * j;
            if (j < per_lane && e < d) acc[j] = acc[j] * corr + p * load_kv(kv.v, kv.dtype, base + e);
        }
        m = m_new;
    }
    if (lane == 0) {
        m_s[warp] = m;
        l_s[warp] = l;
    }
#pragma unroll
    for (int j = 0; j < kMaxPerLane; ++j) acc_s[warp][lane + 32 * j] = acc[j];
    __syncthreads();
    // Merge the warps: rescale each to the common maximum.
    float mx = -INFINITY;
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, m_s[w]);
    float total = 0.0f;
    for (int w = 0; w < kWarps; ++w) total += m_s[w] == -INFINITY ? 0.0f : l_s[w] * expf(m_s[w] - mx);
    for (int e = threadIdx.x; e < d; e += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < kWarps; ++w)
            if (m_s[w] != -INFINITY) o += acc_s[w][e] * expf(m_s[w] - mx);
        out[(static_cast<size_t>(t) * heads + h) * d + e] = o / total;
    }
}

}  // namespace

void attention(const DeviceKvLayer& kv, const float* q, int q_stride, int heads, float scale, const DeviceBatch& batch,
               float* out, cudaStream_t stream) {
    if (batch.tokens == 0) return;
    if (kv.head_dim > 32 * kMaxPerLane) fail(Q3N_ERR_UNSUPPORTED, "head_dim above 256 is not supported on the GPU");
    attention_kernel<<<dim3(batch.tokens, heads), kWarps * 32, 0, stream>>>(kv, q, q_stride, heads, scale, batch, out);
    Q3N_CUDA_LAUNCHED("attention");
}

}  // namespace q3n::cuda
