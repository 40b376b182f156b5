// Qwen3 dense decoder (architecture Qwen3ForCausalLM, shared/spec section 1) on the CPU backend.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "core/thread_pool.h"
#include "kv/kv_cache.h"
#include "model/model_runner.h"
#include "model/weight_loader.h"

namespace q3n {

// Reads every tensor the architecture needs from `source` (the name map lives here). `prefix` is
// where the decoder's tensors live: "model." in Qwen3ForCausalLM, "model.language_model." in
// Qwen3-VL (spec 4.2); lm_head is never prefixed.
Qwen3Weights load_qwen3_weights(const ModelConfig& config, WeightSource& source,
                                const std::function<bool(float)>& progress, const std::string& prefix = "model.");

// Rotary tables for the config's rope settings (default or YaRN).
cpu::Rope make_rope(const ModelConfig& config);

std::unique_ptr<ModelRunner> make_qwen3_dense_cpu(const ModelConfig& config, Qwen3Weights weights, KvCache& kv,
                                                  ThreadPool& pool);

}  // namespace q3n
