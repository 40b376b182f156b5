// The Qwen3-VL vision tower on the CPU (shared/spec 4.2): Conv3d patch embedding as a GEMM, the learned
// position table interpolated to each grid, pre-LayerNorm ViT blocks with 2-D rotary and attention
// bounded to each image / frame pair, the 2x2 patch merger, and the DeepStack mergers tapped after the
// configured blocks. Weights `model.visual.*` come through the WeightSource like every model's; the
// whole tower is BF16 in the released FP8 checkpoints too (spec 5.6), but any Linear the loader
// accepts (F32, BF16, block FP8) runs.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "core/thread_pool.h"
#include "model/mrope_positions.h"
#include "model/weight_loader.h"
#include "model/weights.h"

namespace q3n {

class Checkpoint;

struct VisionLinear {
    Linear w;
    std::vector<float> b;
};

struct VisionBlockWeights {
    std::vector<float> norm1_w, norm1_b, norm2_w, norm2_b;
    VisionLinear qkv, proj, fc1, fc2;
};

struct VisionMergerWeights {
    std::vector<float> norm_w, norm_b;  // [hidden], or [4 hidden] after the shuffle (DeepStack)
    VisionLinear fc1, fc2;
    bool postshuffle_norm = false;
};

struct Qwen3VlVisionWeights {
    VisionLinear patch_embed;  // [hidden, patch_dim] (the Conv3d kernel flattened, F32)
    Linear pos_embed;          // [side * side, hidden]
    std::vector<VisionBlockWeights> blocks;
    VisionMergerWeights merger;
    std::vector<VisionMergerWeights> deepstack;  // deepstack_merger_list.{k}
};

Qwen3VlVisionWeights load_qwen3_vl_vision(WeightSource& source, const VisionConfig& config,
                                          std::vector<std::unique_ptr<uint8_t[]>>& owned);

struct VisionOutput {
    size_t tokens = 0;                          // merged tokens = patches / merge^2
    std::vector<float> merged;                  // [tokens, out_hidden]
    std::vector<std::vector<float>> deepstack;  // per DeepStack tap in block order, [tokens, out_hidden]
};

class Qwen3VlVision {
public:
    Qwen3VlVision(VisionConfig config, Qwen3VlVisionWeights weights);
    ~Qwen3VlVision();

    // Opens <dir> (config.json, the safetensors) and loads the tower alone.
    static std::unique_ptr<Qwen3VlVision> load(const std::string& directory);

    const VisionConfig& config() const { return config_; }
    // The host weights, for a backend that uploads them (cuda/qwen3_vl_vision_cuda.h).
    const Qwen3VlVisionWeights& weights() const { return weights_; }

    // pixel_values: [n_patches, patch_dim] fp32 in the processor's order (spec 4.2), the patches of
    // each grid in turn; n_patches must be sum(t*h*w). Throws Q3N_ERR_INVALID_ARGUMENT otherwise.
    VisionOutput forward(const float* pixel_values, size_t n_patches, const std::vector<GridThw>& grids,
                         ThreadPool& pool) const;

private:
    void merge(const std::vector<float>& x, size_t patches, const VisionMergerWeights& m, std::vector<float>& out,
               ThreadPool& pool) const;

    VisionConfig config_;
    Qwen3VlVisionWeights weights_;
    std::unique_ptr<Checkpoint> checkpoint_;  // what the weights point into, when load() opened it
    std::vector<std::unique_ptr<uint8_t[]>> owned_;
};

}  // namespace q3n
