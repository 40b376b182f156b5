// Qwen3-MoE decoder (architecture Qwen3MoeForCausalLM, shared/spec 2) on the CPU backend: the dense
// model's attention, norms and head, with the MLP of sparse layers replaced by a routed block.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "core/thread_pool.h"
#include "kv/kv_cache.h"
#include "model/qwen3_attention.h"
#include "model/model_runner.h"
#include "model/weight_loader.h"

namespace q3n {

struct Qwen3MoeLayerWeights {
    // Norms and attention as in the dense model; gate/up/down are filled only on dense layers
    // (mlp_only_layers, or layers decoder_sparse_step skips), with intermediate_size.
    Qwen3LayerWeights common;
    bool sparse = false;
    Linear router;                        // mlp.gate [E, H]; BF16 in every released checkpoint
    std::vector<cpu::MoeExpert> experts;  // E separate views, as the checkpoint stores them
};

struct Qwen3MoeWeights {
    Linear embed;    // [vocab, hidden]
    Linear lm_head;  // [vocab, hidden]; the embedding's view when tied
    std::vector<float> final_norm;
    std::vector<Qwen3MoeLayerWeights> layers;
};

// Reads every tensor of the architecture from `source` under `prefix` ("model.", or Qwen3-VL-MoE's
// "model.language_model."). Experts come per expert as released for Qwen3-MoE (spec 2.3), or fused
// as released for Qwen3-VL-MoE (spec 4.3: `experts.gate_up_proj` [E, H, 2I], `experts.down_proj`
// [E, I, H], x.W) — the checkpoint's names decide, never the architecture.
Qwen3MoeWeights load_qwen3_moe_weights(const ModelConfig& config, WeightSource& source,
                                       const std::function<bool(float)>& progress,
                                       const std::string& prefix = "model.");

std::unique_ptr<ModelRunner> make_qwen3_moe_cpu(const ModelConfig& config, Qwen3MoeWeights weights, KvCache& kv,
                                                ThreadPool& pool);

}  // namespace q3n
