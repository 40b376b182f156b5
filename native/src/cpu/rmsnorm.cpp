#include <cmath>

#include "cpu/ops.h"
#include "cpu/simd.h"

namespace q3n::cpu {
namespace {

Q3N_MULTIVERSION
void rmsnorm_row(const float* x, const float* w, float* y, size_t n, float eps) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (size_t i = 0; i < n; ++i) sum += x[i] * x[i];
    const float inv = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
    // transformers multiplies the normalised value by the weight (in that order).
#pragma omp simd
    for (size_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * inv);
}

}  // namespace

void rmsnorm(const float* x, const float* weight, float* y, size_t rows, size_t n, float eps, ThreadPool& pool) {
    const size_t grain = n >= 1024 ? 1 : 1024 / n + 1;
    pool.parallel_for(rows, [&](size_t begin, size_t end) {
        for (size_t r = begin; r < end; ++r) rmsnorm_row(x + r * n, weight, y + r * n, n, eps);
    }, grain);
}

}  // namespace q3n::cpu
