#include "model/weights.h"

namespace q3n {

const char* weight_type_name(WeightType type) {
    switch (type) {
        case WeightType::F32: return "F32";
        case WeightType::BF16: return "BF16";
        case WeightType::FP8_E4M3: return "FP8_E4M3";
    }
    return "?";
}

size_t Linear::bytes() const {
    const size_t elem = type == WeightType::F32 ? 4 : type == WeightType::BF16 ? 2 : 1;
    return out * in * elem + block_scales.size() * sizeof(float);
}

}  // namespace q3n
