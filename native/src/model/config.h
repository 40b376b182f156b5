// The model's config.json, read into one struct and checked before any weight is touched.
// Both spellings of the rotary settings are accepted: the released checkpoints' `rope_theta` +
// `rope_scaling`, and transformers 5's `rope_parameters`.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "model/qwen3_next_layout.h"

namespace q3n {

struct RopeConfig {
    std::string type = "default";  // "default" or "yarn"
    double theta = 10000.0;
    double partial_rotary_factor = 1.0;
    // YaRN
    double factor = 1.0;
    uint32_t original_max_position_embeddings = 0;
    double beta_fast = 32.0;
    double beta_slow = 1.0;
    std::optional<double> attention_factor;
    bool truncate = true;
    // Qwen3-VL's Interleaved-MRoPE (spec 4.4): rotary slots per position axis (t, h, w), summing to
    // rot_dim / 2. Empty for every text-only model: one position per token.
    std::vector<uint32_t> mrope_section;
};

// The Qwen3-VL vision tower's `vision_config` (spec 4.2). Implemented in qwen3_vl_vision.cpp; here so
// that a ModelConfig can carry it.
struct VisionConfig {
    uint32_t depth = 0;
    uint32_t hidden_size = 0;
    uint32_t intermediate_size = 0;
    uint32_t num_heads = 0;
    uint32_t patch_size = 16;
    uint32_t temporal_patch_size = 2;
    uint32_t in_channels = 3;
    uint32_t spatial_merge_size = 2;
    uint32_t num_position_embeddings = 0;
    uint32_t out_hidden_size = 0;
    std::vector<uint32_t> deepstack_visual_indexes;
    bool gelu_tanh = true;       // hidden_act "gelu_pytorch_tanh" (released); "gelu" is the erf form
    float layer_norm_eps = 1e-6f;  // fixed in transformers, not in the config
    float rope_theta = 10000.0f;   // likewise

    uint32_t head_dim() const { return hidden_size / num_heads; }
    size_t patch_dim() const { return size_t(in_channels) * temporal_patch_size * patch_size * patch_size; }
    uint32_t grid_side() const;  // sqrt(num_position_embeddings)

    // Reads the `vision_config` object of a Qwen3-VL config.json (the whole document is passed).
    // Throws q3n::Error(Q3N_ERR_BAD_CONFIG) naming the field.
    static VisionConfig from_json(const nlohmann::json& config, const std::string& source);
};

// Spec 4.4's interleaved slot assignment: for rotary slot i, 0 (t), 1 (h) when i % 3 == 1 and
// i < 3 * section[1], 2 (w) when i % 3 == 2 and i < 3 * section[2], else 0.
std::vector<uint8_t> mrope_axes(const std::vector<uint32_t>& section);

struct Fp8Config {
    bool enabled = false;
    uint32_t block_n = 128;
    uint32_t block_k = 128;
    // Module-name prefixes kept in high precision (`modules_to_not_convert` or `ignored_layers`).
    std::vector<std::string> not_converted;

    bool is_excluded(const std::string& module) const;
};

struct ModelConfig {
    std::string architecture;
    std::string model_type;
    uint32_t vocab_size = 0;
    uint32_t hidden_size = 0;
    uint32_t intermediate_size = 0;
    uint32_t num_layers = 0;
    uint32_t num_heads = 0;
    uint32_t num_kv_heads = 0;
    uint32_t head_dim = 0;
    uint32_t max_position_embeddings = 0;
    float rms_norm_eps = 1e-6f;
    bool tie_word_embeddings = false;
    RopeConfig rope;
    Fp8Config fp8;
    std::string dtype;  // torch_dtype / dtype as written, informational
    int32_t bos_token_id = -1;
    std::vector<int32_t> eos_token_ids;

    // Qwen3-MoE (shared/spec 2). Read only when present; required for model_type qwen3_moe (or
    // architecture Qwen3MoeForCausalLM). num_experts == 0 means no layer is sparse.
    uint32_t num_experts = 0;
    uint32_t num_experts_per_tok = 0;
    uint32_t moe_intermediate_size = 0;
    bool norm_topk_prob = false;  // transformers' default; every released MoE config sets it true
    uint32_t decoder_sparse_step = 1;
    std::vector<uint32_t> mlp_only_layers;

    // Qwen3-Next (shared/spec 3). Read only for model_type qwen3_next (or architecture
    // Qwen3NextForCausalLM); every other architecture leaves these empty. The MoE fields above
    // (num_experts, ...) are read as for Qwen3-MoE and required here too.
    std::vector<NextLayerKind> next_layer_kinds;  // spec 3.1, from layer_types or full_attention_interval
    uint32_t linear_num_key_heads = 0;            // GDN nk
    uint32_t linear_num_value_heads = 0;          // GDN nv
    uint32_t linear_key_head_dim = 0;             // GDN dk
    uint32_t linear_value_head_dim = 0;           // GDN dv
    uint32_t linear_conv_kernel_dim = 0;          // GDN K
    uint32_t shared_expert_intermediate_size = 0;
    uint32_t num_nextn_predict_layers = 0;        // MTP layers (vLLM's default 1 when the field is absent)

    bool is_qwen3_next() const { return !next_layer_kinds.empty(); }

    // Qwen3-VL (spec 4). A config.json with `text_config` and `vision_config` is read as its text
    // model (every field above, from text_config; quantization_config and tie_word_embeddings from the
    // top level) plus these. `vision` is empty for text-only models.
    std::optional<VisionConfig> vision;
    int32_t image_token_id = -1;
    int32_t video_token_id = -1;
    int32_t vision_start_token_id = -1;
    int32_t vision_end_token_id = -1;
    GdnDims gdn_dims() const {
        return {linear_num_key_heads, linear_num_value_heads, linear_key_head_dim, linear_value_head_dim};
    }

    // Spec 2.1: sparse iff not listed in mlp_only_layers, experts exist and (layer+1) is a multiple
    // of decoder_sparse_step; every other layer has the dense SwiGLU of intermediate_size.
    bool is_moe_layer(size_t layer) const;

    // Throws q3n::Error(Q3N_ERR_BAD_CONFIG) naming the field, or Q3N_ERR_UNSUPPORTED for valid
    // settings this engine does not run (biases, sliding windows, other quantisation methods).
    static ModelConfig from_json(const nlohmann::json& j, const std::string& source);
    // Reads <dir>/config.json, and eos ids from <dir>/generation_config.json when present.
    static ModelConfig load(const std::string& directory);
};

}  // namespace q3n
