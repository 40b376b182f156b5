#include <cmath>
#include <vector>

#include "core/error.h"
#include "cpu/ops.h"

namespace q3n::cpu {

void vision_rope_2d(float* x, size_t tokens, size_t heads, size_t head_dim, const int32_t* coords, float theta) {
    require(head_dim % 4 == 0, Q3N_ERR_UNSUPPORTED, "the vision head dimension must be a multiple of 4");
    const size_t half = head_dim / 2, quarter = head_dim / 4;
    // transformers builds inv_freq and the angles in float32; so do we.
    std::vector<float> inv_freq(quarter);
    for (size_t i = 0; i < quarter; ++i)
        inv_freq[i] = static_cast<float>(1.0 / std::pow(static_cast<double>(theta), (2.0 * i) / static_cast<double>(half)));
    std::vector<float> cos_t(half), sin_t(half);
    for (size_t t = 0; t < tokens; ++t) {
        const float row = static_cast<float>(coords[2 * t]), col = static_cast<float>(coords[2 * t + 1]);
        for (size_t i = 0; i < quarter; ++i) {
            const float a = row * inv_freq[i], b = col * inv_freq[i];
            cos_t[i] = std::cos(a);
            sin_t[i] = std::sin(a);
            cos_t[quarter + i] = std::cos(b);
            sin_t[quarter + i] = std::sin(b);
        }
        for (size_t h = 0; h < heads; ++h) {
            float* v = x + (t * heads + h) * head_dim;
            for (size_t i = 0; i < half; ++i) {
                const float a = v[i], b = v[half + i];
                v[i] = a * cos_t[i] - b * sin_t[i];
                v[half + i] = b * cos_t[i] + a * sin_t[i];
            }
        }
    }
}

}  // namespace q3n::cpu
