#include <cmath>
#include <vector>

#include "cpu/ops.h"

namespace q3n::cpu {

void apply_rope(float* x, size_t tokens, size_t heads, size_t head_dim, const int32_t* positions, const Rope& rope) {
    const size_t half = rope.rot_dim / 2;
    thread_local std::vector<float> cos_t, sin_t;
    cos_t.resize(half);
    sin_t.resize(half);
    for (size_t t = 0; t < tokens; ++t) {
        // The angle is an fp32 product, as transformers forms it (inv_freq @ position in fp32).
        for (size_t i = 0; i < half; ++i) {
            const size_t row = rope.axis.empty() ? 0 : rope.axis[i];
            const float phi = static_cast<float>(positions[row * tokens + t]) * rope.inv_freq[i];
            cos_t[i] = std::cos(phi) * rope.attention_scaling;
            sin_t[i] = std::sin(phi) * rope.attention_scaling;
        }
        for (size_t h = 0; h < heads; ++h) {
            float* v = x + (t * heads + h) * head_dim;
            for (size_t i = 0; i < half; ++i) {
                const float a = v[i], b = v[i + half];
                v[i] = a * cos_t[i] - b * sin_t[i];
                v[i + half] = b * cos_t[i] + a * sin_t[i];
            }
        }
    }
}

}  // namespace q3n::cpu
