// The vision tower's projections on tensor cores: mma.sync m16n8k16 (bf16 x bf16 -> fp32) over block
// tiles of BM x 128 outputs and 32-deep k slices, with the bias, GELU or residual add in the epilogue.
//
// Precision: the weights are the checkpoint's bf16 values, exactly; the fp32 activations are rounded
// to bf16 (relative error <= 2^-8 each) as they are loaded, and products accumulate in fp32. Against
// the CPU's fp32 x widened-bf16 products a K-long dot product therefore moves by about
// 2^-8 / sqrt(3) * ||x|| ||w|| (random-sign roundings): a few 1e-3 relative per GEMM, which is the
// tolerance budget the tests state. transformers runs the released towers in bf16 throughout.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), with
// lane = 4 g + q (g = lane >> 2, q = lane & 3), two bf16 per 32-bit register, lower index in the low half:
//   A (16x16 row-major): a0 = A[g][2q, 2q+1], a1 = A[g+8][2q, 2q+1], a2 = A[g][2q+8, 2q+9], a3 = A[g+8][2q+8, 2q+9]
//   B (16x8 "col"):      b0 = B[2q, 2q+1][g], b1 = B[2q+8, 2q+9][g]
//   C (16x8 fp32):       c0, c1 = C[g][2q, 2q+1], c2, c3 = C[g+8][2q, 2q+1]
// B[k][n] = W[n][k], so a B register is two k-adjacent weights of one output row: W is stored
// transposed in shared memory exactly as it is in global memory ([n][k]) and no transpose is needed.
//
// Shared tiles are [rows][ROW] bf16 with ROW = 32 + 8 = 40, i.e. 20 words a row: the 32 lanes of a
// fragment load read word 20 g + q (+ const), and {20 g mod 32} = {0,20,8,28,16,4,24,12} plus q < 4
// covers 32 distinct banks. Rows are 80 bytes, so the 8-byte (A) and 16-byte (W) stores stay aligned.
// Shared memory: 2 stages x (BM + 128) x 40 x 2 bytes = 40 KiB at BM = 128 (static limit 48 KiB).
#include <cuda_bf16.h>

#include <algorithm>

#include "core/error.h"
#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/vision_ops.h"

namespace q3n::cuda {
namespace {

constexpr int kBN = 128, kBK = 32, kRow = kBK + 8, kThreads = 256;

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float epilogue_value(float p, int epi) {
    if (epi == static_cast<int>(VisionEpilogue::GeluTanh)) {
        const float k = 0.7978845608028654f;  // sqrt(2 / pi), the CPU's gelu_tanh
        return 0.5f * p * (1.0f + tanhf(k * (p + 0.044715f * p * p * p)));
    }
    if (epi == static_cast<int>(VisionEpilogue::GeluErf)) return 0.5f * p * (1.0f + erff(p * 0.7071067811865476f));
    return p;
}

// Eight warps as 2 (rows) x 4 (columns); a warp owns BM/2 x 32 outputs = MT x 4 mma tiles.
template <int BM>
__global__ void __launch_bounds__(kThreads) vision_gemm_kernel(const float* __restrict__ x, int M, int K,
                                                               const __nv_bfloat16* __restrict__ w, int N,
                                                               const float* __restrict__ bias, float* __restrict__ y,
                                                               int ldy, int epi) {
    constexpr int MT = BM / 32, NT = 4;
    constexpr int A_ITERS = BM * (kBK / 4) / kThreads;  // float4 chunks of the A tile per thread
    constexpr int B_ITERS = kBN * (kBK / 8) / kThreads;  // 8-bf16 chunks of the W tile per thread
    __shared__ __align__(16) __nv_bfloat16 As[2][BM][kRow];
    __shared__ __align__(16) __nv_bfloat16 Bs[2][kBN][kRow];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = (warp >> 2) * (BM / 2), wn = (warp & 3) * 32;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * kBN;
    const int g = lane >> 2, q = lane & 3;

    float4 ra[A_ITERS];
    uint4 rb[B_ITERS];
    // k is a multiple of 8, so a 4-float or 8-bf16 chunk is wholly inside or wholly past the end.
    auto load = [&](int k0) {
#pragma unroll
        for (int i = 0; i < A_ITERS; ++i) {
            const int c = tid + i * kThreads, r = c >> 3, col = (c & 7) * 4;
            const int gm = m0 + r, gk = k0 + col;
            ra[i] = gm < M && gk < K ? *reinterpret_cast<const float4*>(x + static_cast<size_t>(gm) * K + gk)
                                     : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int i = 0; i < B_ITERS; ++i) {
            const int c = tid + i * kThreads, r = c >> 2, col = (c & 3) * 8;
            const int gn = n0 + r, gk = k0 + col;
            rb[i] = gn < N && gk < K ? *reinterpret_cast<const uint4*>(w + static_cast<size_t>(gn) * K + gk)
                                     : make_uint4(0u, 0u, 0u, 0u);
        }
    };
    auto store = [&](int buf) {
#pragma unroll
        for (int i = 0; i < A_ITERS; ++i) {
            const int c = tid + i * kThreads, r = c >> 3, col = (c & 7) * 4;
            *reinterpret_cast<uint2*>(&As[buf][r][col]) = make_uint2(pack_bf16(ra[i].x, ra[i].y), pack_bf16(ra[i].z, ra[i].w));
        }
#pragma unroll
        for (int i = 0; i < B_ITERS; ++i) {
            const int c = tid + i * kThreads, r = c >> 2, col = (c & 3) * 8;
            *reinterpret_cast<uint4*>(&Bs[buf][r][col]) = rb[i];
        }
    };

    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    const int ktiles = (K + kBK - 1) / kBK;
    load(0);
    store(0);
    __syncthreads();
    for (int kt = 0; kt < ktiles; ++kt) {
        const int buf = kt & 1;
        // The next slice's global loads are in flight while this one multiplies.
        if (kt + 1 < ktiles) load((kt + 1) * kBK);
#pragma unroll
        for (int kk = 0; kk < kBK; kk += 16) {
            uint32_t a[MT][4], b[NT][2];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const __nv_bfloat16* p = &As[buf][wm + mt * 16 + g][kk + 2 * q];
                a[mt][0] = *reinterpret_cast<const uint32_t*>(p);
                a[mt][1] = *reinterpret_cast<const uint32_t*>(p + 8 * kRow);
                a[mt][2] = *reinterpret_cast<const uint32_t*>(p + 8);
                a[mt][3] = *reinterpret_cast<const uint32_t*>(p + 8 * kRow + 8);
            }
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const __nv_bfloat16* p = &Bs[buf][wn + nt * 8 + g][kk + 2 * q];
                b[nt][0] = *reinterpret_cast<const uint32_t*>(p);
                b[nt][1] = *reinterpret_cast<const uint32_t*>(p + 8);
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) mma_bf16(acc[mt][nt], a[mt], b[nt][0], b[nt][1]);
        }
        // The other stage was last read in iteration kt - 1, which ended at a barrier: safe to fill.
        if (kt + 1 < ktiles) store(buf ^ 1);
        __syncthreads();
    }

#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = m0 + wm + mt * 16 + g + (e >= 2 ? 8 : 0);
                const int c = n0 + wn + nt * 8 + 2 * q + (e & 1);
                if (r >= M || c >= N) continue;
                float p = acc[mt][nt][e];
                if (bias) p += bias[c];
                float* dst = y + static_cast<size_t>(r) * ldy + c;
                if (epi == static_cast<int>(VisionEpilogue::Accumulate))
                    *dst += p;
                else
                    *dst = epilogue_value(p, epi);
            }
}

int multiprocessors() {
    static const int n = [] {
        int dev = 0, count = 0;
        if (cudaGetDevice(&dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
            cudaGetLastError();
            return 132;
        }
        return count;
    }();
    return n;
}

}  // namespace

void vision_gemm(const float* x, int rows, int k, const __nv_bfloat16* w, int out, const float* bias, float* y, int ldy,
                 VisionEpilogue epilogue, cudaStream_t stream) {
    if (rows == 0 || out == 0) return;
    require(k % 8 == 0 && k > 0, Q3N_ERR_UNSUPPORTED, "vision_gemm needs an inner dimension that is a multiple of 8");
    const int nb = (out + kBN - 1) / kBN;
    // Half-height tiles when full ones would leave multiprocessors idle (a 448x448 image's 784 rows).
    const bool small = static_cast<long>(nb) * ((rows + 127) / 128) < multiprocessors();
    if (small) {
        vision_gemm_kernel<64><<<dim3(nb, (rows + 63) / 64), kThreads, 0, stream>>>(x, rows, k, w, out, bias, y, ldy,
                                                                                   static_cast<int>(epilogue));
    } else {
        vision_gemm_kernel<128><<<dim3(nb, (rows + 127) / 128), kThreads, 0, stream>>>(x, rows, k, w, out, bias, y, ldy,
                                                                                     static_cast<int>(epilogue));
    }
    Q3N_CUDA_LAUNCHED("vision_gemm");
}

}  // namespace q3n::cuda
