#include <cmath>

#include "cpu/ops.h"

namespace q3n::cpu {

void layer_norm(const float* x, const float* weight, const float* bias, float* y, size_t rows, size_t n, float eps,
                ThreadPool& pool) {
    const size_t grain = n >= 1024 ? 1 : 1024 / n + 1;
    pool.parallel_for(rows, [&](size_t begin, size_t end) {
        for (size_t r = begin; r < end; ++r) {
            const float* xr = x + r * n;
            float* yr = y + r * n;
            // Two passes in double: the ViT's residual stream has a large mean relative to its spread,
            // where a one-pass E[x^2] - E[x]^2 in fp32 would cancel.
            double mean = 0.0;
            for (size_t i = 0; i < n; ++i) mean += xr[i];
            mean /= static_cast<double>(n);
            double var = 0.0;
            for (size_t i = 0; i < n; ++i) var += (xr[i] - mean) * (xr[i] - mean);
            var /= static_cast<double>(n);
            const double inv = 1.0 / std::sqrt(var + eps);
            for (size_t i = 0; i < n; ++i)
                yr[i] = static_cast<float>((xr[i] - mean) * inv) * weight[i] + bias[i];
        }
    }, grain);
}

}  // namespace q3n::cpu
