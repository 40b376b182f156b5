// The Qwen3-VL vision tower on one GPU (shared/spec 4.2): the CPU tower's graph (model/qwen3_vl_vision.cpp)
// with its ops from cuda/vision_ops.h and cuda/gemm_bf16.h. One item (an image, or a video's slices) per
// call. Two data flows, the same graph:
//   - bf16 (the default): what a GEMM or the attention reads is stored in bf16, as transformers runs the
//     released towers. LayerNorms write bf16 (fp32 arithmetic, one rounding); the qkv projection writes
//     bf16 (+bias), the rotary turns it in place, vision_attention_bf16 writes bf16; fc1 writes bf16
//     through the GELU; proj and fc2 add into the residual stream (cuBLASLt, beta = 1). The stream is
//     bf16, as in transformers' bf16 tower, and rounded as there: p + bias to bf16, then the sum. The
//     patch embedding is computed in fp32 from the pixels rounded to bf16 (the rounding vision_gemm
//     applies on load), the position rows added in fp32, and the sum rounded once. Against an fp32
//     stream this halves the bytes the residual adds and the LayerNorms move (H100, 1024x1024: 0.3 ms
//     of 12.2; README, vision tower); Q3N_VISION_F32_RESIDUAL=1 keeps it fp32. The mergers likewise:
//     bf16 LayerNorm, fc1 bf16 through the erf GELU, fc2 into the fp32 features.
//
// Graphs. An item's ~240 launches cost about 0.2 ms more run one by one than replayed from a CUDA
// graph (H100, 1024x1024). A grid seen before, with the same pixel and feature buffers (the runner's
// own, which persist) and the same scratch, is captured on its second call and replayed after that;
// the first call of a grid runs eagerly (its cuBLASLt plans and scratch are made then, which a capture
// could not do). Up to kGraphs graphs are kept, the least recently used dropped first. A graph bakes
// in every pointer it was captured with, so the key holds them all: a scratch buffer that grew for a
// larger grid makes older graphs' keys miss. Q3N_VISION_GRAPHS=0 or use_graphs(false) turns this off;
// a stream already being captured by the caller, or the legacy default stream, gets the launches
// themselves.
//
//   - fp32: every activation fp32, rounded to bf16 only as vision_gemm loads it (vision_gemm.cu states
//     what that costs), attention and GELUs in fp32. Taken where the bf16 flow cannot be: a head_dim
//     vision_attention_bf16 lacks, widths whose rows are not 16-byte multiples, no cuBLASLt, features
//     not 16-byte aligned (that call only), Q3N_VISION_BF16=0, or cuBLASLt refusing a plan (from then on).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "cuda/device_buffer.h"
#include "model/model_runner.h"
#include "model/qwen3_vl_vision.h"

namespace q3n::cuda {

class Qwen3VlVisionCuda {
public:
    // Uploads the tower (BF16 as is; F32 rounded to bf16, FP8 dequantised to bf16) on the current
    // device; the host weights may go afterwards. Work is enqueued on `stream`, which the caller owns.
    // bf16 = false keeps the fp32 data flow (for comparisons); true takes the bf16 one where it can.
    Qwen3VlVisionCuda(const VisionConfig& config, const Qwen3VlVisionWeights& weights, cudaStream_t stream,
                      bool bf16 = true);

    const VisionConfig& config() const { return config_; }
    size_t taps() const { return deepstack_.size(); }
    // Floats per merged token in forward's output: the merger's row, then each DeepStack tap's.
    size_t feature_width() const { return (1 + taps()) * config_.out_hidden_size; }
    size_t tokens(const GridThw& g) const {
        return size_t(g.t) * g.h * g.w / (size_t(config_.spatial_merge_size) * config_.spatial_merge_size);
    }
    // The host weights' count, as the CPU runner reports them.
    const WeightStats& stats() const { return stats_; }
    // Whether forward takes the bf16 data flow (see above).
    bool bf16() const { return bf16_; }

    // pixels: device [t*h*w, patch_dim] in the processor's row order; features: device
    // [tokens(grid), feature_width()]. Enqueues only (grows scratch on a larger grid than seen before).
    // Throws Q3N_ERR_INVALID_ARGUMENT for a grid not divisible by spatial_merge_size.
    void forward(const float* pixels, const GridThw& grid, float* features);
    // Whether forward may capture and replay graphs (see above); on unless Q3N_VISION_GRAPHS=0.
    void use_graphs(bool on) { graphs_on_ = on; }

private:
    struct Affine {
        const __nv_bfloat16* w = nullptr;
        const float* b = nullptr;
        const __nv_bfloat16* b16 = nullptr;  // b in bf16, for a bf16 output (bf16 flow only)
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
    void forward_fp32(const float* pixels, const GridThw& grid, float* features);
    void merge_fp32(const Merger& m, int patches, float* features, int column);
    // false: cuBLASLt refused a GEMM (what was enqueued before it is harmless, forward_fp32 redoes the item).
    bool forward_bf16(const float* pixels, const GridThw& grid, float* features);
    // R: the residual stream's type (bf16_residual_).
    template <typename R>
    bool forward_bf16_with(const float* pixels, const GridThw& grid, float* features);
    template <typename R>
    bool merge_bf16(const Merger& m, const R* x, int patches, float* features, int column);

    // Everything a captured forward depends on that can change between calls.
    struct GraphKey {
        uint32_t t = 0, h = 0, w = 0;
        const void* pointers[9] = {};  // pixels, features, and the scratch buffers
        bool operator==(const GraphKey& o) const;
    };
    struct GraphExecDeleter {
        void operator()(cudaGraphExec_t e) const { cudaGraphExecDestroy(e); }
    };
    struct CachedGraph {
        GraphKey key;
        std::unique_ptr<CUgraphExec_st, GraphExecDeleter> exec;  // null: run eagerly once, not captured yet
        uint64_t last_use = 0;
    };
    static constexpr size_t kGraphs = 8;
    GraphKey graph_key(const float* pixels, const GridThw& grid, const float* features) const;
    // true: the item was enqueued as a graph (replayed, or captured now and launched).
    bool forward_graph(const float* pixels, const GridThw& grid, float* features);
    void remember(const GraphKey& key, std::unique_ptr<CUgraphExec_st, GraphExecDeleter> exec);

    VisionConfig config_;
    cudaStream_t stream_;
    bool bf16_ = false;
    bool bf16_residual_ = true;  // the bf16 flow's residual stream in bf16 (Q3N_VISION_F32_RESIDUAL=1: fp32)
    std::vector<DeviceBuffer> owned_;
    Affine patch_embed_;
    const float* pos_table_ = nullptr;  // [side * side, hidden] fp32
    const float* inv_freq_ = nullptr;   // [head_dim / 4]
    std::vector<Block> blocks_;
    std::vector<int> tap_of_block_;  // DeepStack merger index per block, or -1
    Merger merger_;
    std::vector<Merger> deepstack_;
    WeightStats stats_;
    // x_ is the fp32 residual stream (the bf16 flow's with Q3N_VISION_F32_RESIDUAL=1; otherwise only
    // the patch embedding before the position add, which writes residual_); the others hold fp32 or
    // bf16 by the flow.
    DeviceBuffer x_, residual_, y_, qkv_, att_, mid_;
    DeviceBuffer rope_;  // the bf16 flow's rotary table of the item's frame (vision_rope_table)
    bool graphs_on_ = true;
    std::vector<CachedGraph> graphs_;
    uint64_t graph_clock_ = 0;
};

}  // namespace q3n::cuda
