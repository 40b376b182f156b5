#include <cstring>

#include "core/error.h"
#include "cpu/ops.h"
#include "cpu/simd.h"

namespace q3n::cpu {

void embed(const Linear& table, const int32_t* tokens, size_t count, float* out) {
    const size_t h = table.in;
    for (size_t t = 0; t < count; ++t) {
        const size_t row = static_cast<size_t>(tokens[t]);
        float* o = out + t * h;
        switch (table.type) {
            case WeightType::F32:
                std::memcpy(o, static_cast<const float*>(table.data) + row * h, h * sizeof(float));
                break;
            case WeightType::BF16: {
                const uint16_t* src = static_cast<const uint16_t*>(table.data) + row * h;
                for (size_t i = 0; i < h; ++i) o[i] = widen_bf16(src[i]);
                break;
            }
            case WeightType::FP8_E4M3: {
                const uint8_t* src = static_cast<const uint8_t*>(table.data) + row * h;
                const float* s = table.block_scales.data() + (row / 128) * table.scale_cols;
                for (size_t i = 0; i < h; ++i) o[i] = widen_e4m3(src[i]) * s[i / 128];
                break;
            }
        }
    }
}

}  // namespace q3n::cpu
