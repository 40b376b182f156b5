// The CUDA backend as the engine sees it: plain C++, no CUDA types.
#pragma once

#include <memory>

#include "kv/kv_cache.h"
#include "model/config.h"
#include "model/model_runner.h"
#include "model/qwen3_moe.h"
#include "model/qwen3_next.h"
#include "model/weights.h"

namespace q3n {

// Number of usable CUDA devices (0 when there is no driver or no GPU).
int cuda_device_count();

// Uploads the weights to `device` and allocates the KV cache there in the layout `kv` hands out
// blocks for (kv keeps only the bookkeeping).
std::unique_ptr<ModelRunner> make_qwen3_dense_cuda(const ModelConfig& config, const Qwen3Weights& weights, KvCache& kv,
                                                   int device);

// Qwen3-MoE (spec 2) on `device`; the same contract as make_qwen3_dense_cuda.
std::unique_ptr<ModelRunner> make_qwen3_moe_cuda(const ModelConfig& config, const Qwen3MoeWeights& weights, KvCache& kv,
                                                 int device);

// Qwen3-Next (spec 3) on `device`: the KV cache holds the full-attention layers only (kv may have
// more slots; the first qwen3_next_kv_layers are used), and each sequence's conv and delta-rule
// states live on the device from its first step until release_sequence.
std::unique_ptr<Qwen3NextRunner> make_qwen3_next_cuda(const ModelConfig& config, const Qwen3NextWeights& weights,
                                                      KvCache& kv, int device);

}  // namespace q3n
