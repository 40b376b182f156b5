// Engine-side weight tensors. A Linear points into the memory-mapped checkpoint (or into buffers the
// loader owns) and records how its numbers are stored.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace q3n {

enum class WeightType { F32, BF16, FP8_E4M3 };

enum class KvDtype { F32, BF16 };

const char* weight_type_name(WeightType type);

// A [out, in] matrix, row-major (PyTorch's Linear layout), applied as y = x . W^T.
struct Linear {
    WeightType type = WeightType::F32;
    const void* data = nullptr;
    size_t out = 0;
    size_t in = 0;
    // FP8 only: one fp32 multiplier per 128x128 block, [ceil(out/128), ceil(in/128)] row-major.
    std::vector<float> block_scales;
    size_t scale_cols = 0;

    size_t bytes() const;
};

struct Qwen3LayerWeights {
    std::vector<float> input_norm;      // [hidden]
    std::vector<float> post_attn_norm;  // [hidden]
    std::vector<float> q_norm;          // [head_dim]
    std::vector<float> k_norm;          // [head_dim]
    Linear q, k, v, o;
    Linear gate, up, down;
};

struct Qwen3Weights {
    Linear embed;    // [vocab, hidden]
    Linear lm_head;  // [vocab, hidden]; a copy of `embed`'s view when tied
    std::vector<float> final_norm;
    std::vector<Qwen3LayerWeights> layers;
    // Storage the views above point into when they are not in the mapped files (dummy weights,
    // converted f16 tensors). Never resized after loading.
    // The mapped checkpoint itself is kept alive by the engine's model object.
    std::vector<std::unique_ptr<uint8_t[]>> owned;
};

}  // namespace q3n
