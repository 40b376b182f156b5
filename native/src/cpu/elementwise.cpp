#include <cmath>

#include "cpu/ops.h"
#include "cpu/simd.h"

namespace q3n::cpu {

Q3N_MULTIVERSION
void silu_mul(const float* gate, const float* up, float* out, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        const float g = gate[i];
        out[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
}

Q3N_MULTIVERSION
void add_inplace(float* x, const float* y, size_t n) {
#pragma omp simd
    for (size_t i = 0; i < n; ++i) x[i] += y[i];
}

}  // namespace q3n::cpu
