// The standard Qwen3 sub-layers (attention, spec 1.1-1.4; SwiGLU, spec 1.5) and the logits-row gather,
// shared by every decoder that uses them (dense, MoE, Next, the VL language models), so they compute
// identical numbers.
#pragma once

#include <string>
#include <vector>

#include "core/thread_pool.h"
#include "cpu/ops.h"
#include "model/config.h"
#include "model/model_runner.h"
#include "model/weight_loader.h"
#include "model/weights.h"

namespace q3n {

// The norms, QK-norms and q/k/v/o Linears of `layer` (everything but the MLP), spec 1.7 names under
// `prefix` ("model." for the text models, "model.language_model." for Qwen3-VL's, spec 4.2).
void load_qwen3_attention(const ModelConfig& config, WeightSource& source, size_t layer, Qwen3LayerWeights& out,
                          const std::string& prefix = "model.");

// Grow-only activations of qwen3_attention_residual.
struct AttentionScratch {
    std::vector<float> h, q, k, v, attn;
};

// x += o_proj(attention(rope(qk_norm(qkv(rmsnorm(x)))))) over the batch's tokens, storing this
// layer's K and V of every token in the cache first.
void qwen3_attention_residual(const ModelConfig& config, const Qwen3LayerWeights& weights,
                              const cpu::PagedKvLayer& kv, const cpu::Rope& rope, const StepBatch& batch, float* x,
                              AttentionScratch& scratch, ThreadPool& pool);

// out = down(silu(gate(x)) * up(x)) for T rows (spec 1.5); `gate_buf`/`up_buf` are grow-only scratch.
void qwen3_swiglu(const float* x, size_t tokens, const Linear& gate, const Linear& up, const Linear& down, float* out,
                  std::vector<float>& gate_buf, std::vector<float>& up_buf, ThreadPool& pool);

// Qwen3-VL (spec 4.1): the embeddings of the batch's placeholder rows become the vision tower's merged
// features. No-op for a batch without vision rows.
void place_vision_embeddings(const StepBatch& batch, float* x, size_t hidden);

// DeepStack (spec 4.1): after decoder layer `layer`, tap `layer`'s features are added to the
// placeholder rows, for layer < taps. No-op otherwise.
void add_deepstack(const StepBatch& batch, size_t layer, size_t taps, float* x, size_t hidden);

// Copies the hidden-state rows whose logits are wanted (of the `computed` rows of the last forward)
// into `out`, refusing rows the forward did not compute.
void gather_logit_rows(const float* hidden, size_t computed, size_t width, const size_t* rows, size_t count,
                       std::vector<float>& out);

// Logits of the given rows of the last forward's hidden states: the standard final RMSNorm, then
// the vocabulary projection (dense and MoE; Qwen3-Next's final norm is the zero-centred one).
void qwen3_logits(const float* hidden, size_t computed, const size_t* rows, size_t count,
                  const std::vector<float>& final_norm, const Linear& lm_head, float eps, std::vector<float>& scratch,
                  float* out, ThreadPool& pool);

}  // namespace q3n
