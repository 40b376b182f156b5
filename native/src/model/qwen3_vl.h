// Qwen3-VL and Qwen3-VL-MoE (architectures Qwen3VLForConditionalGeneration and
// Qwen3VLMoeForConditionalGeneration, shared/spec 4) on the CPU backend: the vision tower in front
// of the dense or MoE text decoder. The decoders are the text models' own runners; what makes them
// vision-language is in the config (MRoPE, DeepStack taps) and in the StepBatch (three-axis positions,
// placeholder rows with their features), which the engine fills from the sequence's vision items.
#pragma once

#include <functional>
#include <memory>

#include "core/thread_pool.h"
#include "kv/kv_cache.h"
#include "model/model_runner.h"
#include "model/weight_loader.h"

namespace q3n {

// Loads `model.visual.*` and the text model under `model.language_model.*` (MoE when the text
// config has experts) and returns a runner whose encode_vision runs the tower.
std::unique_ptr<ModelRunner> make_qwen3_vl_cpu(const ModelConfig& config, WeightSource& source, KvCache& kv,
                                               ThreadPool& pool, const std::function<bool(float)>& progress);

}  // namespace q3n
