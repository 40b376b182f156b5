// The model registry: config.json `architectures` -> how to build that model. The model kind is never
// guessed from folder or file names.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/thread_pool.h"
#include "kv/kv_cache.h"
#include "model/model_runner.h"
#include "model/weight_loader.h"

namespace q3n {

struct ArchitectureEntry {
    std::string name;  // e.g. "Qwen3ForCausalLM"
    std::string model_type;  // config.json model_type, used only when `architectures` is absent
    std::function<std::unique_ptr<ModelRunner>(const ModelConfig&, WeightSource&, KvCache&, ThreadPool&,
                                               const std::function<bool(float)>& progress)>
        create_cpu;
    // Empty when this build has no CUDA backend or the architecture has no CUDA implementation yet.
    std::function<std::unique_ptr<ModelRunner>(const ModelConfig&, WeightSource&, KvCache&, int device,
                                               const std::function<bool(float)>& progress)>
        create_cuda;
    // Layers that keep K and V in the paged cache; empty means every layer (hybrid models have fewer).
    std::function<size_t(const ModelConfig&)> kv_layers;
};

const std::vector<ArchitectureEntry>& architecture_registry();

// The entry for the config's architecture; throws Q3N_ERR_UNSUPPORTED naming the supported ones.
const ArchitectureEntry& find_architecture(const ModelConfig& config);

}  // namespace q3n
