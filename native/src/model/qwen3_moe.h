// Qwen3-MoE decoder (architecture Qwen3MoeForCausalLM, shared/spec 2) on the CPU backend: the dense
// model's attention, norms and head, with the MLP of sparse layers replaced by a routed block.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "core/thread_pool.h"
#include "kv/kv_cache.h"
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

// Reads every tensor of the architecture from `source` (per-expert names as released, spec 2.3).
Qwen3MoeWeights load_qwen3_moe_weights(const ModelConfig& config, WeightSource& source,
                                       const std::function<bool(float)>& progress);

std::unique_ptr<ModelRunner> make_qwen3_moe_cpu(const ModelConfig& config, Qwen3MoeWeights weights, KvCache& kv,
                                                ThreadPool& pool);

// ---- Pieces every Qwen3 decoder with standard attention shares ------------------------------------
// The dense runner keeps its own copy inside qwen3_dense.cpp (file-local there); these are the same
// operations in the same order, so the two models' attention layers compute identical numbers.

// The norms, QK-norms and q/k/v/o Linears of `layer` (everything but the MLP), spec 1.7 names.
void load_qwen3_attention(const ModelConfig& config, WeightSource& source, size_t layer, Qwen3LayerWeights& out);

// Grow-only activations of qwen3_attention_residual.
struct AttentionScratch {
    std::vector<float> h, q, k, v, attn;
};

// x += o_proj(attention(rope(qk_norm(qkv(rmsnorm(x)))))) over the batch's tokens (spec 1.1-1.4),
// storing this layer's K and V of every token in the cache first.
void qwen3_attention_residual(const ModelConfig& config, const Qwen3LayerWeights& weights,
                              const cpu::PagedKvLayer& kv, const cpu::Rope& rope, const StepBatch& batch, float* x,
                              AttentionScratch& scratch, ThreadPool& pool);

}  // namespace q3n
