// The CUDA backend as the engine sees it: plain C++, no CUDA types.
#pragma once

#include <memory>

#include "kv/kv_cache.h"
#include "model/config.h"
#include "model/model_runner.h"
#include "model/weights.h"

namespace q3n {

// Number of usable CUDA devices (0 when there is no driver or no GPU).
int cuda_device_count();

// Uploads the weights to `device` and allocates the KV cache there in the layout `kv` hands out
// blocks for (kv keeps only the bookkeeping).
std::unique_ptr<ModelRunner> make_qwen3_dense_cuda(const ModelConfig& config, const Qwen3Weights& weights, KvCache& kv,
                                                   int device);

}  // namespace q3n
