// Qwen3-VL and Qwen3-VL-MoE on one GPU (plain C++, no CUDA types; the registry's CUDA slot).
#pragma once

#include <functional>
#include <memory>

#include "kv/kv_cache.h"
#include "model/config.h"
#include "model/model_runner.h"
#include "model/weight_loader.h"

namespace q3n {

// Loads `model.visual.*` and the dense or MoE text model under `model.language_model.*` (MoE when the
// text config has experts), uploads both to `device` and allocates the KV cache there.
std::unique_ptr<ModelRunner> make_qwen3_vl_cuda(const ModelConfig& config, WeightSource& source, KvCache& kv, int device,
                                                const std::function<bool(float)>& progress);

}  // namespace q3n
