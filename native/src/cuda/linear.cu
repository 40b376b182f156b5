// Linear layers for decode and small batches (FP8 weights go to linear_fp8_mma.cu where they can):
// one warp per output row streams that row of weights once per kRowsPerPass rows of x (16-byte
// loads where the row length allows), so at batch 1 the kernel is a pure weight stream. Each lane issues kUnroll independent 16-byte loads before using
// any: one load in flight per lane leaves an H100 far below its bandwidth when a matrix has few
// rows (1024-row k/v projections give one 8-warp block per SM). Unrolling keeps each lane's
// summation order, so results do not depend on it.
#include <algorithm>
#include <cstdlib>

#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/linear_fp8_mma.h"
#include "cuda/ops.h"

namespace q3n::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kRowsPerPass = 4;
constexpr int kUnroll = 4;
// Qwen3-4B-FP8, H100, batch 1 / 8 decode, two interleaved runs each: 0 MB 382.6, 373.6 / 2,054,
// 2,084 tok/s; 4 MB 389.8, 388.1 / 2,101, 2,078; 8 MB 379.5, 371.1 / 2,078, 2,082; 16 MB 367.1, 368.8
// / 1,958, 1,988. Past a few MB the prefetches' own issue costs more than the streaming they hide.
constexpr int kL2PrefetchDefaultMb = 4;

__device__ __forceinline__ void unpack_bf16x8(const uint4& raw, float* w) {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        w[2 * i] = __uint_as_float(words[i] << 16);
        w[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
}

template <bool kVector>
__global__ void __launch_bounds__(kWarps * 32) gemv_bf16(const float* x, int rows, int K, const uint16_t* W, int N, float* y, int ldy) {
    pdl_launch_dependents();
    pdl_wait();
    const int n = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (n >= N) return;
    const uint16_t* w = W + static_cast<size_t>(n) * K;
    for (int m0 = 0; m0 < rows; m0 += kRowsPerPass) {
        float acc[kRowsPerPass] = {};
        if (kVector) {
            const int chunks = K / 8;
            const uint4* wv = reinterpret_cast<const uint4*>(w);
            for (int c0 = lane; c0 < chunks; c0 += 32 * kUnroll) {
                uint4 raw[kUnroll];
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    const int c = c0 + 32 * u;
                    raw[u] = c < chunks ? __ldcs(wv + c) : make_uint4(0, 0, 0, 0);
                }
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    const int c = c0 + 32 * u;
                    if (c >= chunks) break;
                    const int k = c * 8;
                    float wf[8];
                    unpack_bf16x8(raw[u], wf);
#pragma unroll
                    for (int r = 0; r < kRowsPerPass; ++r) {
                        if (m0 + r >= rows) break;
                        const float4* xr = reinterpret_cast<const float4*>(x + static_cast<size_t>(m0 + r) * K + k);
                        const float4 a = xr[0], b = xr[1];
                        acc[r] += a.x * wf[0] + a.y * wf[1] + a.z * wf[2] + a.w * wf[3] + b.x * wf[4] + b.y * wf[5] +
                                  b.z * wf[6] + b.w * wf[7];
                    }
                }
            }
        } else {
            for (int k = lane; k < K; k += 32) {
                const float wk = bf16_bits_to_float(w[k]);
#pragma unroll
                for (int r = 0; r < kRowsPerPass; ++r)
                    if (m0 + r < rows) acc[r] += x[static_cast<size_t>(m0 + r) * K + k] * wk;
            }
        }
#pragma unroll
        for (int r = 0; r < kRowsPerPass; ++r) {
            const float s = warp_sum(acc[r]);
            if (lane == 0 && m0 + r < rows) y[static_cast<size_t>(m0 + r) * ldy + n] = s;
        }
    }
}

__global__ void gemv_f32(const float* x, int rows, int K, const float* W, int N, float* y, int ldy) {
    pdl_launch_dependents();
    pdl_wait();
    const int n = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (n >= N) return;
    const float* w = W + static_cast<size_t>(n) * K;
    for (int m = 0; m < rows; ++m) {
        float acc = 0.0f;
        for (int k = lane; k < K; k += 32) acc += x[static_cast<size_t>(m) * K + k] * w[k];
        acc = warp_sum(acc);
        if (lane == 0) y[static_cast<size_t>(m) * ldy + n] = acc;
    }
}

// Block-FP8 rows that linear_fp8_mma cannot take (K not a multiple of 16, or unaligned rows): one
// element per lane and step, scaled by its group's weight and activation scales.
__global__ void __launch_bounds__(kWarps * 32) gemv_fp8(const float* q, const float* qs, int rows, int K, const uint8_t* W,
                                                        const float* ws, int scale_cols, int N, float* y, int ldy) {
    pdl_launch_dependents();
    pdl_wait();
    const int n = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (n >= N) return;
    const uint8_t* w = W + static_cast<size_t>(n) * K;
    const float* wsr = ws + static_cast<size_t>(n / 128) * scale_cols;
    const int groups = (K + 127) / 128;
    for (int m0 = 0; m0 < rows; m0 += kRowsPerPass) {
        float acc[kRowsPerPass] = {};
        for (int k = lane; k < K; k += 32) {
            const float wk = e4m3_to_float(w[k]) * wsr[k / 128];
#pragma unroll
            for (int r = 0; r < kRowsPerPass; ++r)
                if (m0 + r < rows)
                    acc[r] += q[static_cast<size_t>(m0 + r) * K + k] * qs[static_cast<size_t>(m0 + r) * groups + k / 128] * wk;
        }
#pragma unroll
        for (int r = 0; r < kRowsPerPass; ++r) {
            const float s = warp_sum(acc[r]);
            if (lane == 0 && m0 + r < rows) y[static_cast<size_t>(m0 + r) * ldy + n] = s;
        }
    }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Q3N_L2_PREFETCH_MB, read once: how much of a decode GEMV's weights the kernel before it asks L2 for.
size_t l2_prefetch_cap() {
    static const size_t cap = [] {
        const char* v = std::getenv("Q3N_L2_PREFETCH_MB");
        return static_cast<size_t>(v && *v ? std::max(0, std::atoi(v)) : kL2PrefetchDefaultMb) << 20;
    }();
    return cap;
}

}  // namespace

L2Prefetch l2_prefetch_for(const DeviceLinear& w, int rows) {
    if (rows > 8 || !w.data || !aligned16(w.data)) return {};
    const size_t element = w.type == WeightType::FP8_E4M3 ? 1 : w.type == WeightType::BF16 ? 2 : 4;
    const size_t bytes = std::min(l2_prefetch_cap(), static_cast<size_t>(w.out) * w.in * element);
    return bytes ? L2Prefetch{w.data, bytes} : L2Prefetch{};
}

void linear(const float* x, const float* quantized, const float* act_scales, int rows, const DeviceLinear& w, float* y,
            int ldy, cudaStream_t stream) {
    if (rows == 0 || w.out == 0) return;
    const dim3 grid((w.out + kWarps - 1) / kWarps), block(kWarps * 32);
    switch (w.type) {
        case WeightType::BF16: {
            const auto* W = static_cast<const uint16_t*>(w.data);
            if (w.in % 8 == 0 && aligned16(W) && aligned16(x))
                Q3N_CUDA(launch_pdl(gemv_bf16<true>, grid, block, 0, stream, x, rows, w.in, W, w.out, y, ldy));
            else
                Q3N_CUDA(launch_pdl(gemv_bf16<false>, grid, block, 0, stream, x, rows, w.in, W, w.out, y, ldy));
            break;
        }
        case WeightType::F32:
            Q3N_CUDA(launch_pdl(gemv_f32, grid, block, 0, stream, x, rows, w.in, static_cast<const float*>(w.data), w.out, y, ldy));
            break;
        case WeightType::FP8_E4M3: {
            if (linear_fp8_mma_applicable(w, quantized)) return linear_fp8_mma(quantized, act_scales, rows, w, y, ldy, stream);
            Q3N_CUDA(launch_pdl(gemv_fp8, grid, block, 0, stream, quantized, act_scales, rows, w.in,
                                static_cast<const uint8_t*>(w.data), w.scales, w.scale_cols, w.out, y, ldy));
            break;
        }
    }
    Q3N_CUDA_LAUNCHED("linear");
}

}  // namespace q3n::cuda
