// Over the q, k and v heads of a fused qkv row: q and k heads get their per-head RMSNorm and NeoX
// rotary (exactly the CPU's fp32 arithmetic), k and v heads are stored into the paged cache, q heads
// are written back in place for attention. Interleaved-MRoPE (Qwen3-VL, spec 4.4) is the same op with
// each frequency slot turned by its own axis's position; the plain form is that with every slot on
// the token's cache position.
//
// One warp per (token, head) where the head is whole warps of channels and each rotary half is too
// (every Qwen3 shape): lane l holds channels l, l + 32, ..., so both ends of every rotary pair sit in
// one lane and the norm needs only shuffles. A block per (token, head) with two barriers and a
// shared-memory exchange spent more time waiting than working: 8K prompt tokens of Qwen3-4B took
// 487 us a layer in it, for about 120 us of memory traffic. The warp form sums the squares in the
// block form's order (each 32-channel slice's butterfly, then the slices in order), so the norm is
// the same number. Other shapes (tiny test heads) keep the block form.
//
// Where the heads are read and q is written is a RowLayout: the fused [q | k | v] row in place, or
// Qwen3-Next's gated projection row (each query head followed by its gate), read where q_proj left
// it with q written to a separate row. The gated form saves Next's attention layers a launch that
// only copied the query heads out from between their gates.
#include <cuda_bf16.h>

#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/ops.h"
#include "cuda/qk_norm_rope.cuh"

namespace q3n::cuda {
namespace {

// Token t's head h (q heads, then k heads, then v heads) is read at head(t, h, ...); q heads are
// written at q_head(t, h, d).
struct RowLayout {
    const float* src;
    int src_stride;
    int q_pitch;  // floats from one q head to the next in src: d, or 2 d with the gates between
    float* q_out;
    int q_stride;

    __device__ __forceinline__ const float* head(int t, int h, int heads, int d) const {
        const size_t off = h < heads ? static_cast<size_t>(h) * q_pitch
                                     : static_cast<size_t>(heads) * q_pitch + static_cast<size_t>(h - heads) * d;
        return src + static_cast<size_t>(t) * src_stride + off;
    }
    __device__ __forceinline__ float* q_head(int t, int h, int d) const {
        return q_out + static_cast<size_t>(t) * q_stride + static_cast<size_t>(h) * d;
    }
};

__global__ void qk_norm_rope_kv_kernel(RowLayout rows, int heads, int kv_heads, int d, DeviceKvLayer kv,
                                       const float* q_norm, const float* k_norm, float eps, const float* inv_freq,
                                       int rot_dim, float scaling, const int32_t* mrope, const uint8_t* axis,
                                       DeviceBatch batch) {
    extern __shared__ float shared[];  // d normalised values + 32 for the reduction
    float* vals = shared;
    float* scratch = shared + d;
    pdl_launch_dependents();
    pdl_wait();
    const int t = blockIdx.x, h = blockIdx.y, i = threadIdx.x;
    const float* head = rows.head(t, h, heads, d);
    const bool is_q = h < heads, is_k = !is_q && h < heads + kv_heads, is_v = h >= heads + kv_heads;

    float x = i < d ? head[i] : 0.0f;
    if (!is_v) {
        const float ss = block_sum(x * x, scratch);
        const float inv = 1.0f / sqrtf(ss / static_cast<float>(d) + eps);
        const float* w = is_q ? q_norm : k_norm;
        if (i < d) vals[i] = w[i] * (x * inv);
        __syncthreads();
        if (i < d) {
            const int half = rot_dim / 2;
            if (i < rot_dim) {
                const int slot = i < half ? i : i - half;
                // MRoPE rows are [3][tokens]; the plain form rotates by the cache position.
                const float p = static_cast<float>(mrope ? mrope[static_cast<size_t>(axis[slot]) * batch.tokens + t]
                                                         : batch.positions[t]);
                const float phi = p * inv_freq[slot];
                if (i < half)
                    x = vals[i] * (cosf(phi) * scaling) - vals[i + half] * (sinf(phi) * scaling);
                else
                    x = vals[i] * (cosf(phi) * scaling) + vals[i - half] * (sinf(phi) * scaling);
            } else {
                x = vals[i];
            }
        }
    }
    if (i >= d) return;
    if (is_q) {
        rows.q_head(t, h, d)[i] = x;
        return;
    }
    const int kvh = is_k ? h - heads : h - heads - kv_heads;
    store_kv(kv, is_k, kv_slot(kv, batch, t, kvh, d) + i, x);
}

// J = head_dim / 32 channels per lane; rot_dim / 2 a multiple of 32.
template <int J>
__global__ void qk_norm_rope_kv_warp_kernel(RowLayout rows, int heads, int kv_heads, DeviceKvLayer kv,
                                            const float* q_norm, const float* k_norm, float eps, const float* inv_freq,
                                            int rot_dim, float scaling, const int32_t* mrope, const uint8_t* axis,
                                            DeviceBatch batch) {
    constexpr int d = J * 32;
    pdl_launch_dependents();
    pdl_wait();
    const int per_token = heads + 2 * kv_heads;
    const int item = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (item >= batch.tokens * per_token) return;
    const int t = item / per_token, h = item % per_token;
    const float* head = rows.head(t, h, heads, d);
    const bool is_q = h < heads, is_k = !is_q && h < heads + kv_heads, is_v = h >= heads + kv_heads;
    float x[J];
#pragma unroll
    for (int j = 0; j < J; ++j) x[j] = head[j * 32 + lane];
    if (!is_v) {
        float w[J], cs[J], sn[J];
        lane_values<J>(w, is_q ? q_norm : k_norm, lane);
        rope_factors<J>(cs, sn, inv_freq, rot_dim, scaling, lane, [&](int slot) {
            // MRoPE rows are [3][tokens]; the plain form rotates by the cache position.
            return static_cast<float>(mrope ? mrope[static_cast<size_t>(axis[slot]) * batch.tokens + t] : batch.positions[t]);
        });
        norm_rope_head_warp<J>(x, w, eps, cs, sn, rot_dim);
    }
    if (is_q) {
        float* q = rows.q_head(t, h, d);
#pragma unroll
        for (int j = 0; j < J; ++j) q[j * 32 + lane] = x[j];
        return;
    }
    const int kvh = is_k ? h - heads : h - heads - kv_heads;
    const size_t slot = kv_slot(kv, batch, t, kvh, d) + lane;
#pragma unroll
    for (int j = 0; j < J; ++j) store_kv(kv, is_k, slot + j * 32, x[j]);
}

template <int J>
void launch_warps(const RowLayout& rows, int heads, const DeviceKvLayer& kv, const float* q_norm, const float* k_norm, float eps,
                  const float* inv_freq, int rot_dim, float attention_scaling, const int32_t* mrope, const uint8_t* axis,
                  const DeviceBatch& batch, cudaStream_t stream) {
    constexpr int kWarps = 4;
    const int items = batch.tokens * (heads + 2 * kv.kv_heads);
    Q3N_CUDA(launch_pdl(qk_norm_rope_kv_warp_kernel<J>, (items + kWarps - 1) / kWarps, kWarps * 32, 0, stream, rows, heads,
                        kv.kv_heads, kv, q_norm, k_norm, eps, inv_freq, rot_dim, attention_scaling, mrope, axis, batch));
}

void launch(const RowLayout& rows, int heads, const DeviceKvLayer& kv, const float* q_norm, const float* k_norm, float eps,
            const float* inv_freq, int rot_dim, float attention_scaling, const int32_t* mrope, const uint8_t* axis,
            const DeviceBatch& batch, cudaStream_t stream) {
    if (batch.tokens == 0) return;
    const int d = kv.head_dim;
    if (rot_dim % 64 == 0 && rot_dim <= d) {
        switch (d) {
            case 64: return launch_warps<2>(rows, heads, kv, q_norm, k_norm, eps, inv_freq, rot_dim, attention_scaling, mrope, axis, batch, stream);
            case 128: return launch_warps<4>(rows, heads, kv, q_norm, k_norm, eps, inv_freq, rot_dim, attention_scaling, mrope, axis, batch, stream);
            case 256: return launch_warps<8>(rows, heads, kv, q_norm, k_norm, eps, inv_freq, rot_dim, attention_scaling, mrope, axis, batch, stream);
            default: break;
        }
    }
    const dim3 grid(batch.tokens, heads + 2 * kv.kv_heads);
    const int threads = ((d + 31) / 32) * 32;
    Q3N_CUDA(launch_pdl(qk_norm_rope_kv_kernel, grid, threads, (d + 32) * sizeof(float), stream, rows, heads, kv.kv_heads,
                        d, kv, q_norm, k_norm, eps, inv_freq, rot_dim, attention_scaling, mrope, axis, batch));
}

// The fused row, read and written in place.
RowLayout fused_row(float* qkv, int heads, const DeviceKvLayer& kv) {
    const int row = (heads + 2 * kv.kv_heads) * kv.head_dim;
    return RowLayout{qkv, row, kv.head_dim, qkv, row};
}

}  // namespace

void qk_norm_rope_kv_write(float* qkv, int heads, const DeviceKvLayer& kv, const float* q_norm, const float* k_norm,
                           float eps, const float* inv_freq, int rot_dim, float attention_scaling,
                           const DeviceBatch& batch, cudaStream_t stream) {
    launch(fused_row(qkv, heads, kv), heads, kv, q_norm, k_norm, eps, inv_freq, rot_dim, attention_scaling, nullptr,
           nullptr, batch, stream);
}

void qk_norm_rope_kv_write_mrope(float* qkv, int heads, const DeviceKvLayer& kv, const float* q_norm,
                                 const float* k_norm, float eps, const float* inv_freq, const uint8_t* axis,
                                 int rot_dim, float attention_scaling, const int32_t* mrope, const DeviceBatch& batch,
                                 cudaStream_t stream) {
    launch(fused_row(qkv, heads, kv), heads, kv, q_norm, k_norm, eps, inv_freq, rot_dim, attention_scaling, mrope,
           axis, batch, stream);
}

void qk_norm_rope_kv_write_gated(const float* src, int src_stride, float* q_out, int q_stride, int heads,
                                 const DeviceKvLayer& kv, const float* q_norm, const float* k_norm, float eps,
                                 const float* inv_freq, int rot_dim, float attention_scaling, const DeviceBatch& batch,
                                 cudaStream_t stream) {
    const RowLayout rows{src, src_stride, 2 * kv.head_dim, q_out, q_stride};
    launch(rows, heads, kv, q_norm, k_norm, eps, inv_freq, rot_dim, attention_scaling, nullptr, nullptr, batch, stream);
}

}  // namespace q3n::cuda
