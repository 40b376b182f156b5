// The standard Qwen3 attention sub-layer (spec 1.1-1.4), shared by every decoder that uses it
// (dense, MoE, the VL language models), so they compute identical numbers.
#pragma once

#include <vector>

#include "core/thread_pool.h"
#include "cpu/ops.h"
#include "model/config.h"
#include "model/model_runner.h"
#include "model/weight_loader.h"
#include "model/weights.h"

namespace q3n {

// The norms, QK-norms and q/k/v/o Linears of `layer` (everything but the MLP), spec 1.7 names.
void load_qwen3_attention(const ModelConfig& config, WeightSource& source, size_t layer, Qwen3LayerWeights& out);

// Grow-only activations of qwen3_attention_residual.
struct AttentionScratch {
    std::vector<float> h, q, k, v, attn;
};

// x += o_proj(attention(rope(qk_norm(qkv(rmsnorm(x)))))) over the batch's tokens, storing this
// layer's K and V of every token in the cache first.
void qwen3_attention_residual(const ModelConfig& config, const Qwen3LayerWeights& weights,
                              const cpu::PagedKvLayer& kv, const cpu::Rope& rope, const StepBatch& batch, float* x,
                              AttentionScratch& scratch, ThreadPool& pool);

}  // namespace q3n
