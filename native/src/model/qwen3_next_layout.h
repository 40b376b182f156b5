// Qwen3-Next layout facts as pure functions: which layers are Gated DeltaNet and which are gated
// attention (spec 3.1), and how the fused GDN input projections interleave their outputs (spec 3.4
// step 1). No weights and no kernels here, so the CPU and CUDA paths share one definition.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace q3n {

enum class NextLayerKind : uint8_t { LinearAttention, FullAttention };

// Spec 3.1. `layer_types` wins when present (each "linear_attention" or "full_attention", exactly
// num_layers of them); otherwise layer i is full attention iff (i + 1) % full_attention_interval == 0,
// as transformers builds it. Throws Q3N_ERR_BAD_CONFIG naming the problem.
std::vector<NextLayerKind> next_layer_schedule(uint32_t num_layers, const std::optional<std::vector<std::string>>& layer_types,
                                               uint32_t full_attention_interval, const std::string& source);

// The same from config.json: num_hidden_layers, then layer_types, else full_attention_interval
// (default 4, transformers' default).
std::vector<NextLayerKind> next_layer_schedule(const nlohmann::json& config, const std::string& source);

// Gated DeltaNet sizes (config linear_num_key_heads, linear_num_value_heads, linear_key_head_dim,
// linear_value_head_dim) and what follows from them.
struct GdnDims {
    size_t nk = 0;
    size_t nv = 0;
    size_t dk = 0;
    size_t dv = 0;

    size_t ratio() const { return nv / nk; }                       // value heads per key head, r
    size_t key_dim() const { return nk * dk; }
    size_t value_dim() const { return nv * dv; }
    size_t conv_dim() const { return 2 * key_dim() + value_dim(); }
    size_t qkvz_width() const { return 2 * key_dim() + 2 * value_dim(); }  // in_proj_qkvz rows
    size_t group_width() const { return 2 * dk + 2 * ratio() * dv; }        // per key head group
    size_t ba_width() const { return 2 * nv; }                              // in_proj_ba rows
    // Throws Q3N_ERR_BAD_CONFIG unless all are positive and nv is a multiple of nk.
    void validate(const std::string& source) const;
};

// Spec 3.4 step 1. `P` is in_proj_qkvz's output, [tokens, qkvz_width], viewed per token as nk groups
// of [q_g (dk) | k_g (dk) | v for value heads r*g..r*g+r-1 (r*dv) | z for the same heads (r*dv)].
// Writes `qkv` [tokens, conv_dim] as q (nk*dk) | k (nk*dk) | v (nv*dv), head-major inside each part:
// the channel order of the conv (step 2). Writes `z` [tokens, nv*dv].
void deinterleave_qkvz(const GdnDims& dims, const float* P, size_t tokens, float* qkv, float* z);

// `B` is in_proj_ba's output, [tokens, 2*nv], viewed per token as nk groups of
// [b for value heads r*g..r*g+r-1 | a for the same heads]. Writes b and a as [tokens, nv].
void deinterleave_ba(const GdnDims& dims, const float* B, size_t tokens, float* b, float* a);

// For a loader that prefers contiguous projections: entry i is the in_proj_qkvz weight row that
// becomes row i of the contiguous [q | k | v | z] layout (the order deinterleave_qkvz produces).
// Each group spans group_width rows, a multiple of 128 for the released models, so FP8 128-row scale
// blocks move whole when group_width % 128 == 0; the caller must check that.
std::vector<uint32_t> qkvz_contiguous_rows(const GdnDims& dims);

// Likewise for in_proj_ba: entry i is the weight row that becomes row i of [b (nv) | a (nv)].
std::vector<uint32_t> ba_contiguous_rows(const GdnDims& dims);

}  // namespace q3n
