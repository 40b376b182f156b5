#include <algorithm>
#include <cmath>

#include "core/numeric.h"
#include "cpu/ops.h"

namespace q3n::cpu {

void quantize_fp8_per_token_group(const float* x, size_t rows, size_t k, uint8_t* q, float* scales) {
    constexpr size_t kGroup = 128;
    const size_t groups = (k + kGroup - 1) / kGroup;
    for (size_t r = 0; r < rows; ++r) {
        const float* xr = x + r * k;
        for (size_t g = 0; g < groups; ++g) {
            const size_t begin = g * kGroup, end = std::min(k, begin + kGroup);
            float amax = 0.0f;
            for (size_t i = begin; i < end; ++i) amax = std::max(amax, std::fabs(xr[i]));
            // The eps keeps all-zero groups finite (vLLM's choice); the division below matches
            // torch's `x / s` bit for bit, so the same inputs round to the same e4m3 codes.
            const float s = std::max(amax, 1e-10f) / 448.0f;
            scales[r * groups + g] = s;
            for (size_t i = begin; i < end; ++i)
                q[r * k + i] = float_to_e4m3(std::clamp(xr[i] / s, -448.0f, 448.0f));
        }
    }
}

}  // namespace q3n::cpu
