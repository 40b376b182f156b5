// The small Qwen3-Next config the CPU and CUDA Next tests share: nv = 2 nk, rotary a quarter of
// head_dim, interval 2 -> L F L F; hidden 128 and moe_intermediate 64 give the FP8 twin full and
// partial 128-wide groups, head_dim 32 keeps q_proj and k_proj from stacking under FP8.
#pragma once

#include <nlohmann/json.hpp>

namespace q3n_test {

inline nlohmann::json next_config() {
    return {{"architectures", {"Qwen3NextForCausalLM"}},
            {"model_type", "qwen3_next"},
            {"vocab_size", 256},
            {"hidden_size", 128},
            {"intermediate_size", 192},
            {"num_hidden_layers", 4},
            {"num_attention_heads", 4},
            {"num_key_value_heads", 2},
            {"head_dim", 32},
            {"max_position_embeddings", 4096},
            {"rms_norm_eps", 1e-6},
            {"rope_theta", 10000000.0},
            {"rope_scaling", nullptr},
            {"partial_rotary_factor", 0.25},
            {"tie_word_embeddings", false},
            {"full_attention_interval", 2},
            {"linear_num_key_heads", 2},
            {"linear_num_value_heads", 4},
            {"linear_key_head_dim", 32},
            {"linear_value_head_dim", 32},
            {"linear_conv_kernel_dim", 4},
            {"num_experts", 8},
            {"num_experts_per_tok", 2},
            {"moe_intermediate_size", 64},
            {"shared_expert_intermediate_size", 96},
            {"norm_topk_prob", true},
            {"decoder_sparse_step", 1},
            {"mlp_only_layers", nlohmann::json::array()},
            {"bos_token_id", 151643},
            {"eos_token_id", 151645}};
}

inline nlohmann::json fp8_next_config() {
    auto j = next_config();
    // Only lm_head listed: the loader itself keeps routers, shared_expert_gate and in_proj_ba BF16.
    j["quantization_config"] = {{"activation_scheme", "dynamic"}, {"fmt", "e4m3"}, {"quant_method", "fp8"},
                                {"weight_block_size", {128, 128}}, {"modules_to_not_convert", {"lm_head"}}};
    return j;
}

}  // namespace q3n_test
