// The Qwen3-VL vision tower on one GPU (shared/spec 4.2): the CPU tower's graph (model/qwen3_vl_vision.cpp)
// with its ops from cuda/vision_ops.h. Every projection runs on tensor cores with bf16 weights and
// activations rounded to bf16 on load (vision_gemm.cu states what that costs against the fp32 CPU tower);
// norms, rotary, attention and the GELUs stay fp32. One item (an image, or a video's slices) per call.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <vector>

#include "cuda/device_buffer.h"
#include "model/model_runner.h"
#include "model/qwen3_vl_vision.h"

namespace q3n::cuda {

class Qwen3VlVisionCuda {
public:
    // Uploads the tower (BF16 as is; F32 rounded to bf16, FP8 dequantised to bf16) on the current
    // device; the host weights may go afterwards. Work is enqueued on `stream`, which the caller owns.
    Qwen3VlVisionCuda(const VisionConfig& config, const Qwen3VlVisionWeights& weights, cudaStream_t stream);

    const VisionConfig& config() const { return config_; }
    size_t taps() const { return deepstack_.size(); }
    // Floats per merged token in forward's output: the merger's row, then each DeepStack tap's.
    size_t feature_width() const { return (1 + taps()) * config_.out_hidden_size; }
    size_t tokens(const GridThw& g) const {
        return size_t(g.t) * g.h * g.w / (size_t(config_.spatial_merge_size) * config_.spatial_merge_size);
    }
    // The host weights' count, as the CPU runner reports them.
    const WeightStats& stats() const { return stats_; }

    // pixels: device [t*h*w, patch_dim] in the processor's row order; features: device
    // [tokens(grid), feature_width()]. Enqueues only (grows scratch on a larger grid than seen before).
    // Throws Q3N_ERR_INVALID_ARGUMENT for a grid not divisible by spatial_merge_size.
    void forward(const float* pixels, const GridThw& grid, float* features);

private:
    struct Affine {
        const __nv_bfloat16* w = nullptr;
        const float* b = nullptr;
        int out = 0, in = 0;
    };
    struct Block {
        const float *norm1_w = nullptr, *norm1_b = nullptr, *norm2_w = nullptr, *norm2_b = nullptr;
        Affine qkv, proj, fc1, fc2;
    };
    struct Merger {
        const float *norm_w = nullptr, *norm_b = nullptr;
        Affine fc1, fc2;
        bool postshuffle = false;
    };

    Affine upload(const VisionLinear& l);
    const __nv_bfloat16* upload_bf16(const Linear& l);
    const float* upload_floats(const std::vector<float>& v);
    Merger upload_merger(const VisionMergerWeights& m);
    void merge(const Merger& m, int patches, float* features, int column);

    VisionConfig config_;
    cudaStream_t stream_;
    std::vector<DeviceBuffer> owned_;
    Affine patch_embed_;
    const float* pos_table_ = nullptr;  // [side * side, hidden] fp32
    const float* inv_freq_ = nullptr;   // [head_dim / 4]
    std::vector<Block> blocks_;
    std::vector<int> tap_of_block_;  // DeepStack merger index per block, or -1
    Merger merger_;
    std::vector<Merger> deepstack_;
    WeightStats stats_;
    DeviceBuffer x_, y_, qkv_, att_, mid_;
};

}  // namespace q3n::cuda
