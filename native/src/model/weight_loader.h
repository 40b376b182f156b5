// Turns checkpoint tensors into engine tensors: checks each shape against the config, recognises
// block-FP8 Linears (an F8_E4M3 weight with its weight_scale_inv), widens scales and norms to fp32,
// and keeps bf16 and fp8 data in place in the mapping. Also makes seeded random weights of the same
// shapes and types for the dummy load format.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/thread_pool.h"
#include "io/checkpoint.h"
#include "model/config.h"
#include "model/weights.h"

namespace q3n {

class WeightSource {
public:
    virtual ~WeightSource() = default;
    // A Linear named by its module ("model.layers.0.self_attn.q_proj") of shape [out, in].
    virtual Linear linear(const std::string& module, size_t out, size_t in) = 0;
    // An embedding table (never FP8 in the released checkpoints, but handled like a Linear).
    virtual Linear table(const std::string& name, size_t rows, size_t cols) = 0;
    // A 1-D tensor widened to fp32 (norm weights).
    virtual std::vector<float> vector(const std::string& name, size_t size) = 0;
    virtual bool has(const std::string& name) const = 0;

    // ---- Added for Qwen3-Next (spec 3.4, 5.6) ---------------------------------------------------
    // A tensor of any rank widened to fp32, row-major (conv1d.weight [channels, 1, K], A_log,
    // dt_bias). Dummy weights: seeded uniform values in [-1, 1) / sqrt(last dim).
    virtual std::vector<float> tensor(const std::string& name, const std::vector<size_t>& shape) = 0;
    // A Linear the model always keeps in high precision (routers, shared_expert_gate, in_proj_ba:
    // vLLM builds them without a quant config). From a checkpoint it is read exactly like linear()
    // (the stored dtype decides); dummy weights make it BF16 even when the config is FP8 and the
    // module is not in its exclusion list.
    virtual Linear linear_unquantized(const std::string& module, size_t out, size_t in) = 0;

    // ---- Added for Qwen3-VL-MoE (spec 4.3) --------------------------------------------------------
    // One expert's [out, in] Linear cut from a fused tensor `name` stored for x.W as [experts, in,
    // total] (the released Qwen3-VL-MoE `experts.gate_up_proj` / `experts.down_proj`): columns
    // [first, first + out) of slice `expert`, transposed into loader-owned memory in the stored
    // float type (bf16 stays bf16). Fused FP8 experts are refused: their scale layout is unverified.
    virtual Linear fused_expert_linear(const std::string& name, size_t experts, size_t in, size_t total, size_t expert,
                                       size_t first, size_t out) = 0;
};

// Reads from a checkpoint; `owned` receives buffers for tensors that had to be converted or realigned.
std::unique_ptr<WeightSource> checkpoint_source(const Checkpoint& checkpoint, const ModelConfig& config,
                                                std::vector<std::unique_ptr<uint8_t[]>>& owned);

// Seeded random weights of the shapes asked for: bf16, or block-FP8 with scales where the config is
// FP8 and the module is not excluded. Values are scaled by 1/sqrt(in) so activations stay finite.
std::unique_ptr<WeightSource> dummy_source(const ModelConfig& config, uint64_t seed, ThreadPool& pool,
                                           std::vector<std::unique_ptr<uint8_t[]>>& owned);

}  // namespace q3n
