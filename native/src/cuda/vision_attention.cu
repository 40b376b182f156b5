// Bidirectional attention within each temporal slice of a vision item, fp32 on CUDA cores in the
// manner of FlashAttention: a block of 128 threads owns 128 queries of one (slice, head), one query per
// thread with q and the output accumulator in registers; K and V tiles of KT keys go through shared
// memory, where every thread reads the same key at once (a broadcast, no bank conflicts). The softmax
// is online per query, rescaled once per tile. Scores use exp2 of log2(e)-prescaled products: the same
// softmax to a few ulp as the CPU's segment_attention.
//
// Registers: q[HD] + acc[HD] + s[KT] per thread (176 at HD 72, KT 32, no spills; wider heads would spill, so
// KT is 16 at HD 80 and 8 at HD 128). Shared memory: 2 x KT x HD x 4 bytes = 18 KiB at HD 72.
#include <cmath>

#include "core/error.h"
#include "cuda/cuda_check.h"
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

}  // namespace q3n::cuda
