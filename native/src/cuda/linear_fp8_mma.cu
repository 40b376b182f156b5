// Block-FP8 linear for decode-sized batches (M <= 64 rows) on tensor cores: mma.sync m16n8k32 e4m3
// with fp32 accumulation. Decoding e4m3 weights on CUDA cores capped the weight stream at about
// 40% of bandwidth; the tensor cores take the bytes as they are, so the kernel is a pure stream.
//
// Work split: a block owns 16 weight rows (one m16 tile) and its 8 warps split K by 128-wide
// scale groups, then add their partial rows in shared memory (fixed order: deterministic). For one
// group a lane loads 2 x 16 bytes of row `gid` and 2 x 16 of row `gid + 8` (gid = lane / 4, tig =
// lane % 4), the whole 16 x 128 group in 4 coalesced loads, and runs 4 mmas of k = 32 into a fresh
// accumulator, which is then scaled by the weight block's and each row's activation scale and added
// to the running sum: spec 5.4's per-group partial sums, and the partial sum never lives long in
// the tensor core's reduced-precision accumulator.
//
// Within one mma the k order is free as long as A and B agree, so fragments follow the loads: the
// lane's 16 bytes at physical offset tig*16 of a 64-byte half-group serve two mmas; mma h (0, 1)
// takes bytes tig*16 + h*8 + [0..3] as the fragment's k = tig*4 + [0..3] and bytes tig*16 + h*8 +
// [4..7] as k = 16 + tig*4 + [0..3], for A (rows) and B (activation columns) alike.
//
// Activations arrive as quantize_fp8 writes them (e4m3 values widened to fp32); each lane re-packs
// the 16 it needs per half-group into bytes with integer ops (exact, as the values are e4m3).
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/linear_fp8_mma.h"

namespace q3n::cuda {
namespace {

constexpr int kWarps = 8;

// The e4m3 code of an fp32 that holds an e4m3 value: scaling by 2^-120 puts the magnitude bits at
// bit 20 (subnormal e4m3 values land on fp32 subnormals, exactly), the inverse of e4m3_to_float.
__device__ __forceinline__ uint32_t e4m3_code(float v) {
    const uint32_t u = __float_as_uint(v * 7.52316384526264e-37f);  // 2^-120
    return ((u >> 20) & 0x7fu) | ((u >> 24) & 0x80u);
}

__device__ __forceinline__ uint32_t pack4(const float4& v) {
    return e4m3_code(v.x) | (e4m3_code(v.y) << 8) | (e4m3_code(v.z) << 16) | (e4m3_code(v.w) << 24);
}

__device__ __forceinline__ void mma_e4m3(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// NT = column tiles of 8 activation rows (M <= 8 * NT).
template <int NT>
__global__ void __launch_bounds__(kWarps * 32) gemv_fp8_mma(const float* q, const float* qs, int M, int K,
                                                            const uint8_t* W, const float* ws, int scale_cols, int N,
                                                            float* y, int ldy) {
    __shared__ float partial[kWarps][NT][32][4];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const int r0 = blockIdx.x * 16;
    const int groups = (K + 127) / 128;
    const int row_a = r0 + gid, row_b = r0 + gid + 8;
    const uint8_t* wa = W + static_cast<size_t>(min(row_a, N - 1)) * K;
    const uint8_t* wb = W + static_cast<size_t>(min(row_b, N - 1)) * K;
    const float* wsr = ws + static_cast<size_t>(r0 / 128) * scale_cols;

    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[nt][i] = 0.0f;

    // The lane's four 16-byte pieces of group g: rows a and b, half-groups 0 and 1. Pieces past K
    // (K is a multiple of 16) and rows past N read as zero.
    auto load = [&](int g, uint4 (&a)[4]) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int k = g * 128 + half * 64 + tig * 16;
            const bool in = k < K;
            a[2 * half] = in && row_a < N ? __ldcs(reinterpret_cast<const uint4*>(wa + k)) : make_uint4(0, 0, 0, 0);
            a[2 * half + 1] = in && row_b < N ? __ldcs(reinterpret_cast<const uint4*>(wb + k)) : make_uint4(0, 0, 0, 0);
        }
    };

    auto compute = [&](int g, const uint4 (&a)[4]) {
        const float wscale = wsr[g];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int n = nt * 8 + gid;  // this lane's activation row for B
            uint32_t b[2][4];
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int k = g * 128 + half * 64 + tig * 16;
                if (n < M && k < K) {
                    const float4* src = reinterpret_cast<const float4*>(q + static_cast<size_t>(n) * K + k);
#pragma unroll
                    for (int j = 0; j < 4; ++j) b[half][j] = pack4(src[j]);
                } else {
#pragma unroll
                    for (int j = 0; j < 4; ++j) b[half][j] = 0;
                }
            }
            float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const uint4& ra = a[2 * half];
                const uint4& rb = a[2 * half + 1];
                mma_e4m3(part, ra.x, rb.x, ra.y, rb.y, b[half][0], b[half][1]);
                mma_e4m3(part, ra.z, rb.z, ra.w, rb.w, b[half][2], b[half][3]);
            }
            // C fragment: part[0..1] = rows gid, columns tig*2 + {0,1}; part[2..3] = rows gid + 8.
            const int c0 = nt * 8 + tig * 2, c1 = c0 + 1;
            const float s0 = c0 < M ? qs[static_cast<size_t>(c0) * groups + g] * wscale : 0.0f;
            const float s1 = c1 < M ? qs[static_cast<size_t>(c1) * groups + g] * wscale : 0.0f;
            acc[nt][0] += part[0] * s0;
            acc[nt][1] += part[1] * s1;
            acc[nt][2] += part[2] * s0;
            acc[nt][3] += part[3] * s1;
        }
    };

    // The next group loads while this one computes. (Two groups ahead measured slower on the H100:
    // 41-61% of the stream floor against 49-71% at batch 1.)
    uint4 cur[4], next[4];
    int g = warp;
    if (g < groups) load(g, cur);
    for (; g < groups; g += kWarps) {
        if (g + kWarps < groups) load(g + kWarps, next);
        compute(g, cur);
#pragma unroll
        for (int i = 0; i < 4; ++i) cur[i] = next[i];
    }

#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) partial[warp][nt][lane][i] = acc[nt][i];
    __syncthreads();
    // One output per thread and pass: (nt, lane, i) -> row r0 + gid (+8), column nt*8 + tig*2 (+1).
    for (int o = threadIdx.x; o < NT * 32 * 4; o += blockDim.x) {
        const int nt = o / 128, l = (o / 4) % 32, i = o % 4;
        const int row = r0 + (l >> 2) + (i >= 2 ? 8 : 0), col = nt * 8 + (l & 3) * 2 + (i & 1);
        if (row >= N || col >= M) continue;
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += partial[w][nt][l][i];
        y[static_cast<size_t>(col) * ldy + row] = s;
    }
}

}  // namespace

bool linear_fp8_mma_applicable(const DeviceLinear& w, const void* quantized) {
    return w.type == WeightType::FP8_E4M3 && w.in % 16 == 0 && (reinterpret_cast<uintptr_t>(w.data) & 15u) == 0 &&
           (reinterpret_cast<uintptr_t>(quantized) & 15u) == 0;
}

void linear_fp8_mma(const float* quantized, const float* act_scales, int rows, const DeviceLinear& w, float* y, int ldy,
                    cudaStream_t stream) {
    const dim3 grid((w.out + 15) / 16), block(kWarps * 32);
    const auto* W = static_cast<const uint8_t*>(w.data);
    const int K = w.in, groups = (K + 127) / 128;
    // Past 64 rows the weights stream once per 64: the many-row path (gemm_fp8) should take those.
    for (int m0 = 0; m0 < rows; m0 += kLinearFp8MmaMaxRows) {
        const int m = std::min(kLinearFp8MmaMaxRows, rows - m0);
        const float* qm = quantized + static_cast<size_t>(m0) * K;
        const float* sm = act_scales + static_cast<size_t>(m0) * groups;
        float* ym = y + static_cast<size_t>(m0) * ldy;
        if (m <= 8)
            gemv_fp8_mma<1><<<grid, block, 0, stream>>>(qm, sm, m, K, W, w.scales, w.scale_cols, w.out, ym, ldy);
        else if (m <= 16)
            gemv_fp8_mma<2><<<grid, block, 0, stream>>>(qm, sm, m, K, W, w.scales, w.scale_cols, w.out, ym, ldy);
        else if (m <= 32)
            gemv_fp8_mma<4><<<grid, block, 0, stream>>>(qm, sm, m, K, W, w.scales, w.scale_cols, w.out, ym, ldy);
        else
            gemv_fp8_mma<8><<<grid, block, 0, stream>>>(qm, sm, m, K, W, w.scales, w.scale_cols, w.out, ym, ldy);
        Q3N_CUDA_LAUNCHED("linear_fp8_mma");
    }
}

}  // namespace q3n::cuda
