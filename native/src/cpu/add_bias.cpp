#include "cpu/ops.h"

namespace q3n::cpu {

void add_bias(float* y, const float* bias, size_t rows, size_t n) {
    for (size_t r = 0; r < rows; ++r) {
        float* yr = y + r * n;
#pragma omp simd
        for (size_t i = 0; i < n; ++i) yr[i] += bias[i];
    }
}

}  // namespace q3n::cpu
