#include "model/registry.h"

#include "core/error.h"
#include "model/qwen3_dense.h"
#include "model/qwen3_moe.h"
#include "model/qwen3_next.h"
#include "model/qwen3_vl.h"
#ifdef Q3N_WITH_CUDA
#include "cuda/cuda_backend.h"
#include "cuda/qwen3_vl_cuda.h"
#endif

namespace q3n {

const std::vector<ArchitectureEntry>& architecture_registry() {
    static const std::vector<ArchitectureEntry> entries = {
        {"Qwen3ForCausalLM", "qwen3",
         [](const ModelConfig& c, WeightSource& src, KvCache& kv, ThreadPool& pool, const std::function<bool(float)>& progress) {
             return make_qwen3_dense_cpu(c, load_qwen3_weights(c, src, progress), kv, pool);
         },
#ifdef Q3N_WITH_CUDA
         [](const ModelConfig& c, WeightSource& src, KvCache& kv, int device, const std::function<bool(float)>& progress) {
             return make_qwen3_dense_cuda(c, load_qwen3_weights(c, src, progress), kv, device);
         }
#else
         nullptr
#endif
         ,
         nullptr},
        {"Qwen3MoeForCausalLM", "qwen3_moe",
         [](const ModelConfig& c, WeightSource& src, KvCache& kv, ThreadPool& pool, const std::function<bool(float)>& progress) {
             return make_qwen3_moe_cpu(c, load_qwen3_moe_weights(c, src, progress), kv, pool);
         },
#ifdef Q3N_WITH_CUDA
         [](const ModelConfig& c, WeightSource& src, KvCache& kv, int device, const std::function<bool(float)>& progress) {
             return make_qwen3_moe_cuda(c, load_qwen3_moe_weights(c, src, progress), kv, device);
         }
#else
         nullptr
#endif
         ,
         nullptr},
        {"Qwen3NextForCausalLM", "qwen3_next",
         [](const ModelConfig& c, WeightSource& src, KvCache& kv, ThreadPool& pool, const std::function<bool(float)>& progress) {
             return std::unique_ptr<ModelRunner>(make_qwen3_next_cpu(c, load_qwen3_next_weights(c, src, progress), kv, pool));
         },
#ifdef Q3N_WITH_CUDA
         [](const ModelConfig& c, WeightSource& src, KvCache& kv, int device, const std::function<bool(float)>& progress) {
             return std::unique_ptr<ModelRunner>(make_qwen3_next_cuda(c, load_qwen3_next_weights(c, src, progress), kv, device));
         }
#else
         nullptr
#endif
         ,
         qwen3_next_kv_layers},
        {"Qwen3VLForConditionalGeneration", "qwen3_vl",
         [](const ModelConfig& c, WeightSource& src, KvCache& kv, ThreadPool& pool, const std::function<bool(float)>& progress) {
             return make_qwen3_vl_cpu(c, src, kv, pool, progress);
         },
#ifdef Q3N_WITH_CUDA
         // The tower and the dense or MoE decoder on the GPU (cuda/qwen3_vl_cuda.cu).
         [](const ModelConfig& c, WeightSource& src, KvCache& kv, int device, const std::function<bool(float)>& progress) {
             return make_qwen3_vl_cuda(c, src, kv, device, progress);
         }
#else
         nullptr
#endif
         ,
         nullptr},
        {"Qwen3VLMoeForConditionalGeneration", "qwen3_vl_moe",
         [](const ModelConfig& c, WeightSource& src, KvCache& kv, ThreadPool& pool, const std::function<bool(float)>& progress) {
             return make_qwen3_vl_cpu(c, src, kv, pool, progress);
         },
#ifdef Q3N_WITH_CUDA
         // The tower and the dense or MoE decoder on the GPU (cuda/qwen3_vl_cuda.cu).
         [](const ModelConfig& c, WeightSource& src, KvCache& kv, int device, const std::function<bool(float)>& progress) {
             return make_qwen3_vl_cuda(c, src, kv, device, progress);
         }
#else
         nullptr
#endif
         ,
         nullptr},
    };
    return entries;
}

const ArchitectureEntry& find_architecture(const ModelConfig& config) {
    std::string supported;
    for (const auto& e : architecture_registry()) {
        if (!config.architecture.empty() ? e.name == config.architecture : e.model_type == config.model_type) return e;
        supported += (supported.empty() ? "" : ", ") + e.name;
    }
    const std::string what = !config.architecture.empty() ? "architecture '" + config.architecture + "'"
                                                          : "model_type '" + config.model_type + "' (no architectures field)";
    fail(Q3N_ERR_UNSUPPORTED, what + " is not supported; supported: " + supported);
}

}  // namespace q3n
