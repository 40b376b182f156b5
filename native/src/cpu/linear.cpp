#include <algorithm>
#include <vector>

#include "core/error.h"
#include "cpu/fp8_dot.h"
#include "cpu/ops.h"
#include "cpu/simd.h"

namespace q3n::cpu {
namespace {

// Few rows (decode): widen each weight element once per row of x, inside the dot product, so the
// weights stream through once. Many rows (prefill): widen a weight row once into a buffer and
// reuse it for every row of x.
constexpr size_t kFusedRowsMax = 2;
constexpr size_t kGroup = 128;

Q3N_MULTIVERSION
float dot_f32(const float* a, const float* b, size_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (size_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
}

// Four rows of x against one widened weight row: four independent accumulators hide the FMA latency
// and each weight element is loaded once for four products.
Q3N_MULTIVERSION
void dot4_f32(const float* x, size_t ldx, const float* w, size_t n, float* out) {
    const float *a0 = x, *a1 = x + ldx, *a2 = x + 2 * ldx, *a3 = x + 3 * ldx;
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (size_t i = 0; i < n; ++i) {
        s0 += a0[i] * w[i];
        s1 += a1[i] * w[i];
        s2 += a2[i] * w[i];
        s3 += a3[i] * w[i];
    }
    out[0] = s0;
    out[1] = s1;
    out[2] = s2;
    out[3] = s3;
}

// y[m, n] for every m against one widened weight row.
void rows_times_row(const float* x, size_t rows, size_t K, const float* w, float* y, size_t N) {
    size_t m = 0;
    float r[4];
    for (; m + 4 <= rows; m += 4) {
        dot4_f32(x + m * K, K, w, K, r);
        for (size_t j = 0; j < 4; ++j) y[(m + j) * N] = r[j];
    }
    for (; m < rows; ++m) y[m * N] = dot_f32(x + m * K, w, K);
}

Q3N_MULTIVERSION
float dot_bf16(const float* a, const uint16_t* b, size_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (size_t i = 0; i < n; ++i) s += a[i] * widen_bf16(b[i]);
    return s;
}

// e4m3 code -> fp32, all 256 codes (1 KiB, stays in L1). A table lookup (a gather when vectorised)
// costs less than widening bit by bit, which made the FP8 dot products compute-bound.
struct E4m3Table {
    float v[256];
    E4m3Table() {
        for (int i = 0; i < 256; ++i) v[i] = widen_e4m3(static_cast<uint8_t>(i));
    }
};
const E4m3Table kE4m3;

// One activation row against one FP8 weight row, all 128-wide groups in one call: the per-group
// partial sum (fp32) times the activation's and the weight block's scales, accumulated in fp32.
Q3N_MULTIVERSION
float dot_fp8_row(const float* a, const uint8_t* w, const float* a_scales, const float* w_scales, size_t K) {
    const float* lut = kE4m3.v;
    float acc = 0.0f;
    for (size_t k0 = 0, g = 0; k0 < K; k0 += kGroup, ++g) {
        const size_t len = std::min(kGroup, K - k0);
        float partial = 0.0f;
#pragma omp simd reduction(+ : partial)
        for (size_t i = 0; i < len; ++i) partial += a[k0 + i] * lut[w[k0 + i]];
        acc += partial * a_scales[g] * w_scales[g];
    }
    return acc;
}

Q3N_MULTIVERSION
void widen_bf16_row(const uint16_t* src, float* dst, size_t n) {
    for (size_t i = 0; i < n; ++i) dst[i] = widen_bf16(src[i]);
}

Q3N_MULTIVERSION
void widen_e4m3_row(const uint8_t* src, float* dst, size_t n) {
    const float* lut = kE4m3.v;
    for (size_t i = 0; i < n; ++i) dst[i] = lut[src[i]];
}

size_t grain_for(size_t out) { return std::max<size_t>(8, out / 256); }

void linear_dense(const float* x, size_t rows, const Linear& w, float* y, ThreadPool& pool) {
    const size_t K = w.in, N = w.out;
    pool.parallel_for(N, [&](size_t n0, size_t n1) {
        thread_local std::vector<float> row;
        if (w.type == WeightType::F32) {
            const float* W = static_cast<const float*>(w.data);
            for (size_t n = n0; n < n1; ++n)
                for (size_t m = 0; m < rows; ++m) y[m * N + n] = dot_f32(x + m * K, W + n * K, K);
            return;
        }
        const uint16_t* W = static_cast<const uint16_t*>(w.data);
        if (rows <= kFusedRowsMax) {
            for (size_t n = n0; n < n1; ++n)
                for (size_t m = 0; m < rows; ++m) y[m * N + n] = dot_bf16(x + m * K, W + n * K, K);
            return;
        }
        row.resize(K);
        for (size_t n = n0; n < n1; ++n) {
            widen_bf16_row(W + n * K, row.data(), K);
            rows_times_row(x, rows, K, row.data(), y + n, N);
        }
    }, grain_for(N));
}

// Y[m, n] = sum_g (sum_{k in g} qx[m, k] * Wq[n, k]) * sx[m, g] * Sw[n / 128, g]   (spec 5.4)
void linear_fp8(const float* x, size_t rows, const Linear& w, float* y, ThreadPool& pool) {
    const size_t K = w.in, N = w.out, groups = (K + kGroup - 1) / kGroup;
    if (w.scale_cols != groups || w.block_scales.size() != ((N + kGroup - 1) / kGroup) * groups)
        fail(Q3N_ERR_INTERNAL, "FP8 linear has a scale grid that does not match its shape");

    // The quantised activations are widened back to fp32 once (exactly: e4m3 values are fp32 values),
    // so the inner loops are plain fp32 products like the tensor cores' fp8 x fp8 -> fp32.
    thread_local std::vector<uint8_t> qx;
    thread_local std::vector<float> qxf, sx;
    thread_local std::vector<uint16_t> qxb;
    qx.resize(rows * K);
    qxf.resize(rows * K);
    sx.resize(rows * groups);
    quantize_fp8_per_token_group(x, rows, K, qx.data(), sx.data());
    widen_e4m3_row(qx.data(), qxf.data(), rows * K);
    // With AVX512-BF16 the decode path multiplies bf16 pairs: e4m3 values are exact in bf16.
    const bool bf16_dot = rows <= kFusedRowsMax && fp8_bf16_dot_available();
    if (bf16_dot) {
        qxb.resize(rows * K);
        for (size_t i = 0; i < rows * K; ++i) qxb[i] = static_cast<uint16_t>(std::bit_cast<uint32_t>(qxf[i]) >> 16);
    }
    // Pointers, not the thread_local vectors: the workers have their own (empty) instances.
    const float* A = qxf.data();
    const uint16_t* AB = qxb.data();
    const float* As = sx.data();
    const uint8_t* W = static_cast<const uint8_t*>(w.data);

    pool.parallel_for(N, [&](size_t n0, size_t n1) {
        thread_local std::vector<float> row;
        const bool fused = rows <= kFusedRowsMax;
        if (!fused) row.resize(K);
        for (size_t n = n0; n < n1; ++n) {
            const uint8_t* wn = W + n * K;
            const float* ws = w.block_scales.data() + (n / kGroup) * groups;
            if (!fused) widen_e4m3_row(wn, row.data(), K);
            for (size_t m = 0; m < rows; ++m) {
                const float* am = A + m * K;
                if (bf16_dot) {
                    y[m * N + n] = dot_fp8_row_bf16(AB + m * K, wn, As + m * groups, ws, K);
                    continue;
                }
                if (fused) {
                    y[m * N + n] = dot_fp8_row(am, wn, As + m * groups, ws, K);
                    continue;
                }
                float acc = 0.0f;
                for (size_t g = 0; g < groups; ++g) {
                    const size_t k0 = g * kGroup, len = std::min(kGroup, K - k0);
                    acc += dot_f32(am + k0, row.data() + k0, len) * As[m * groups + g] * ws[g];
                }
                y[m * N + n] = acc;
            }
        }
    }, grain_for(N));
}

}  // namespace

void linear(const float* x, size_t rows, const Linear& w, float* y, ThreadPool& pool) {
    if (rows == 0) return;
    if (w.type == WeightType::FP8_E4M3)
        linear_fp8(x, rows, w, y, pool);
    else
        linear_dense(x, rows, w, y, pool);
}

}  // namespace q3n::cpu
