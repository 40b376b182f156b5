// The Qwen3-Next norms. Three forms that are easy to mix up (spec 3.2, 3.4 steps 4 and 6):
//   - every decoder/attention/MTP norm is zero-centred: x_hat * (1 + w), the stored w an offset;
//   - the GDN output norm is the plain w * x_hat (its weight is initialised to ones), times silu(z);
//   - the q/k L2 norm divides by sqrt(sum + eps), not by sqrt(mean + eps).
#include <cmath>

#include "cpu/next_ops.h"
#include "cpu/simd.h"

namespace q3n::cpu {
namespace {

size_t grain_for(size_t n) { return n >= 1024 ? 1 : 1024 / n + 1; }

Q3N_MULTIVERSION
float sum_squares(const float* x, size_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (size_t i = 0; i < n; ++i) s += x[i] * x[i];
    return s;
}

Q3N_MULTIVERSION
void rmsnorm_1p_row(const float* x, const float* w, float* y, size_t n, float eps) {
    const float inv = 1.0f / std::sqrt(sum_squares(x, n) / static_cast<float>(n) + eps);
    // HF Qwen3NextRMSNorm: the normalised value times (1 + w), with 1 + w formed in fp32.
#pragma omp simd
    for (size_t i = 0; i < n; ++i) y[i] = (x[i] * inv) * (1.0f + w[i]);
}

Q3N_MULTIVERSION
void rmsnorm_gated_row(const float* x, const float* z, const float* w, float* y, size_t n, float eps) {
    const float inv = 1.0f / std::sqrt(sum_squares(x, n) / static_cast<float>(n) + eps);
    // HF Qwen3NextRMSNormGated (norm_before_gate): w * x_hat first, then the fp32 silu of the gate.
    // HF rounds x_hat to the activation dtype before the weight; our activations are fp32, so no cast.
    for (size_t i = 0; i < n; ++i) {
        const float zi = z[i];
        y[i] = (w[i] * (x[i] * inv)) * (zi / (1.0f + std::exp(-zi)));
    }
}

Q3N_MULTIVERSION
void l2norm_row(float* x, size_t n, float eps) {
    const float inv = 1.0f / std::sqrt(sum_squares(x, n) + eps);
#pragma omp simd
    for (size_t i = 0; i < n; ++i) x[i] *= inv;
}

}  // namespace

void rmsnorm_1p(const float* x, const float* weight, float* y, size_t rows, size_t n, float eps, ThreadPool& pool) {
    pool.parallel_for(rows, [&](size_t begin, size_t end) {
        for (size_t r = begin; r < end; ++r) rmsnorm_1p_row(x + r * n, weight, y + r * n, n, eps);
    }, grain_for(n));
}

void rmsnorm_gated(const float* x, const float* z, const float* weight, float* y, size_t rows, size_t n, float eps,
                   ThreadPool& pool) {
    pool.parallel_for(rows, [&](size_t begin, size_t end) {
        for (size_t r = begin; r < end; ++r) rmsnorm_gated_row(x + r * n, z + r * n, weight, y + r * n, n, eps);
    }, grain_for(n));
}

void l2norm_heads(float* x, size_t tokens, size_t heads, size_t d, size_t token_stride, float eps, ThreadPool& pool) {
    pool.parallel_for(tokens * heads, [&](size_t begin, size_t end) {
        for (size_t i = begin; i < end; ++i) l2norm_row(x + (i / heads) * token_stride + (i % heads) * d, d, eps);
    }, grain_for(d));
}

}  // namespace q3n::cpu
