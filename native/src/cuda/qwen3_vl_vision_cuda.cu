// The tower's forward on the device; the order of operations and the buffers mirror
// Qwen3VlVision::forward so that a difference between the two can be traced op by op.
#include "cuda/qwen3_vl_vision_cuda.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "core/error.h"
#include "core/numeric.h"
#include "cuda/cuda_check.h"
#include "cuda/gemm_bf16.h"
#include "cuda/vision_ops.h"

namespace q3n::cuda {
namespace {

// What the bf16 flow needs beyond the fp32 one: a head_dim vision_attention_bf16 has, bf16 rows of
// 16-byte multiples for cuBLASLt (hidden and intermediate sizes, hence the mergers' 4 x hidden too),
// feature rows and column offsets of 16-byte multiples (out_hidden_size a multiple of 4 floats), and
// cuBLASLt on this device.
bool bf16_flow_possible(const VisionConfig& c) {
    const char* env = std::getenv("Q3N_VISION_BF16");
    if (env && std::strcmp(env, "0") == 0) return false;
    const uint32_t hd = c.head_dim();
    return hd % 8 == 0 && hd <= 128 && hd * c.num_heads == c.hidden_size && c.hidden_size % 8 == 0 &&
           c.intermediate_size % 8 == 0 && c.out_hidden_size % 4 == 0 && gemm_bf16_available();
}

// Q3N_VISION_Q_ROPE=0 keeps the rotary as one pass over q and k (for measuring what turning q inside
// the attention gains; both give the same bits).
bool q_turned_in_attention_enabled() {
    const char* env = std::getenv("Q3N_VISION_Q_ROPE");
    return !(env && std::strcmp(env, "0") == 0);
}

// Q3N_VISION_GRAPHS=0: every item launched kernel by kernel (the header's Graphs paragraph).
bool graphs_disabled_by_env() {
    const char* env = std::getenv("Q3N_VISION_GRAPHS");
    return env && std::strcmp(env, "0") == 0;
}

// Q3N_VISION_F32_RESIDUAL=1 keeps the bf16 flow's residual stream in fp32 (for measuring what the
// bf16 stream gains, and for comparisons).
bool f32_residual_requested() {
    const char* env = std::getenv("Q3N_VISION_F32_RESIDUAL");
    return env && std::strcmp(env, "1") == 0;
}

// The bias a GEMM adding into a residual stream of type R takes: cuBLASLt wants the output's type.
const float* residual_bias(const float* b, const __nv_bfloat16*, const float*) { return b; }
const __nv_bfloat16* residual_bias(const float*, const __nv_bfloat16* b16, const __nv_bfloat16*) { return b16; }

}  // namespace

Qwen3VlVisionCuda::Qwen3VlVisionCuda(const VisionConfig& c, const Qwen3VlVisionWeights& w, cudaStream_t stream,
                                     bool bf16)
    : config_(c),
      stream_(stream),
      bf16_(bf16 && bf16_flow_possible(c)),
      bf16_residual_(!f32_residual_requested()),
      graphs_on_(!graphs_disabled_by_env()) {
    patch_embed_ = upload(w.patch_embed);
    {
        // The interpolation reads four rows per patch: widened once here rather than per read.
        const Linear& t = w.pos_embed;
        std::vector<float> table(t.out * t.in);
        if (t.type == WeightType::F32) {
            std::memcpy(table.data(), t.data, table.size() * sizeof(float));
        } else if (t.type == WeightType::BF16) {
            const uint16_t* src = static_cast<const uint16_t*>(t.data);
            for (size_t i = 0; i < table.size(); ++i) table[i] = bf16_to_float(src[i]);
        } else {
            fail(Q3N_ERR_UNSUPPORTED, "the vision position table must be BF16 or F32");
        }
        pos_table_ = upload_floats(table);
        stats_.parameter_count += t.out * t.in;
        stats_.bytes += t.bytes();
    }
    const size_t quarter = c.head_dim() / 4, half = c.head_dim() / 2;
    std::vector<float> inv(quarter);
    // cpu::vision_rope_2d's float32 table, bit for bit.
    for (size_t i = 0; i < quarter; ++i)
        inv[i] = static_cast<float>(1.0 / std::pow(static_cast<double>(c.rope_theta), (2.0 * i) / static_cast<double>(half)));
    inv_freq_ = upload_floats(inv);
    stats_.parameter_count -= quarter;  // a table, not a parameter (upload_floats counted it)
    stats_.bytes -= quarter * sizeof(float);

    for (const VisionBlockWeights& b : w.blocks) {
        Block d;
        d.norm1_w = upload_floats(b.norm1_w);
        d.norm1_b = upload_floats(b.norm1_b);
        d.norm2_w = upload_floats(b.norm2_w);
        d.norm2_b = upload_floats(b.norm2_b);
        d.qkv = upload(b.qkv);
        d.proj = upload(b.proj);
        d.fc1 = upload(b.fc1);
        d.fc2 = upload(b.fc2);
        blocks_.push_back(d);
    }
    merger_ = upload_merger(w.merger);
    for (const auto& m : w.deepstack) deepstack_.push_back(upload_merger(m));
    if (deepstack_.size() != c.deepstack_visual_indexes.size())
        fail(Q3N_ERR_BAD_CHECKPOINT, "the vision tower has a different number of DeepStack mergers than taps");
    // transformers taps in block order and picks the merger by the index's position in the list.
    tap_of_block_.assign(blocks_.size(), -1);
    for (size_t k = 0; k < c.deepstack_visual_indexes.size(); ++k) tap_of_block_.at(c.deepstack_visual_indexes[k]) = int(k);
}

const __nv_bfloat16* Qwen3VlVisionCuda::upload_bf16(const Linear& l) {
    std::vector<uint16_t> h(l.out * l.in);
    if (l.type == WeightType::BF16) {
        std::memcpy(h.data(), l.data, h.size() * 2);
    } else if (l.type == WeightType::F32) {
        // Exact for the widened Conv3d kernel of a BF16 checkpoint; an F32 checkpoint loses the low bits.
        const float* src = static_cast<const float*>(l.data);
        for (size_t i = 0; i < h.size(); ++i) h[i] = float_to_bf16(src[i]);
    } else if (l.type == WeightType::FP8_E4M3) {
        const uint8_t* src = static_cast<const uint8_t*>(l.data);
        for (size_t r = 0; r < l.out; ++r)
            for (size_t k = 0; k < l.in; ++k)
                h[r * l.in + k] = float_to_bf16(e4m3_to_float(src[r * l.in + k]) * l.block_scales[(r / 128) * l.scale_cols + k / 128]);
    } else {
        fail(Q3N_ERR_UNSUPPORTED, "a vision tower weight has a type the CUDA tower cannot take");
    }
    owned_.emplace_back(h.size() * 2);
    Q3N_CUDA(cudaMemcpy(owned_.back().get(), h.data(), h.size() * 2, cudaMemcpyHostToDevice));
    stats_.parameter_count += l.out * l.in;
    stats_.bytes += l.bytes();
    stats_.fp8 = stats_.fp8 || l.type == WeightType::FP8_E4M3;
    return owned_.back().as<__nv_bfloat16>();
}

const float* Qwen3VlVisionCuda::upload_floats(const std::vector<float>& v) {
    owned_.emplace_back(std::max<size_t>(v.size() * sizeof(float), 4));
    if (!v.empty()) Q3N_CUDA(cudaMemcpy(owned_.back().get(), v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice));
    stats_.parameter_count += v.size();
    stats_.bytes += v.size() * sizeof(float);
    return owned_.back().as<float>();
}

Qwen3VlVisionCuda::Affine Qwen3VlVisionCuda::upload(const VisionLinear& l) {
    Affine a;
    a.w = upload_bf16(l.w);
    a.b = upload_floats(l.b);
    a.out = static_cast<int>(l.w.out);
    a.in = static_cast<int>(l.w.in);
    if (bf16_) {
        // cuBLASLt takes a bf16 output's bias in bf16; the checkpoints' biases are bf16, so this is exact.
        // A copy of a parameter, not counted again in stats_.
        std::vector<uint16_t> h(l.b.size());
        for (size_t i = 0; i < h.size(); ++i) h[i] = float_to_bf16(l.b[i]);
        owned_.emplace_back(std::max<size_t>(h.size() * 2, 16));
        if (!h.empty()) Q3N_CUDA(cudaMemcpy(owned_.back().get(), h.data(), h.size() * 2, cudaMemcpyHostToDevice));
        a.b16 = owned_.back().as<__nv_bfloat16>();
    }
    return a;
}

Qwen3VlVisionCuda::Merger Qwen3VlVisionCuda::upload_merger(const VisionMergerWeights& m) {
    Merger d;
    d.norm_w = upload_floats(m.norm_w);
    d.norm_b = upload_floats(m.norm_b);
    d.fc1 = upload(m.fc1);
    d.fc2 = upload(m.fc2);
    d.postshuffle = m.postshuffle_norm;
    return d;
}

void Qwen3VlVisionCuda::forward(const float* pixels, const GridThw& grid, float* features) {
    const uint32_t ms = config_.spatial_merge_size;
    require(grid.t > 0 && grid.h > 0 && grid.w > 0 && grid.h % ms == 0 && grid.w % ms == 0, Q3N_ERR_INVALID_ARGUMENT,
            "a vision grid must be positive and divisible by spatial_merge_size " + std::to_string(ms));
    // The caller's features are the one buffer the bf16 flow does not own; cuBLASLt writes them in 16-byte units.
    if (bf16_ && (reinterpret_cast<uintptr_t>(features) & 15u) == 0) {
        if (forward_graph(pixels, grid, features)) return;
        if (forward_bf16(pixels, grid, features)) {
            if (graphs_on_) remember(graph_key(pixels, grid, features), nullptr);
            return;
        }
        // Every pointer and stride was within gemm_bf16's terms, so cuBLASLt itself said no: it would again.
        bf16_ = false;
    }
    forward_fp32(pixels, grid, features);
}

bool Qwen3VlVisionCuda::GraphKey::operator==(const GraphKey& o) const {
    return t == o.t && h == o.h && w == o.w && std::equal(std::begin(pointers), std::end(pointers), std::begin(o.pointers));
}

Qwen3VlVisionCuda::GraphKey Qwen3VlVisionCuda::graph_key(const float* pixels, const GridThw& grid,
                                                         const float* features) const {
    GraphKey k;
    k.t = grid.t;
    k.h = grid.h;
    k.w = grid.w;
    const void* p[] = {pixels, features, x_.get(), residual_.get(), y_.get(), qkv_.get(), att_.get(), mid_.get(), rope_.get()};
    static_assert(sizeof p == sizeof k.pointers, "every pointer a graph bakes in");
    std::copy(std::begin(p), std::end(p), std::begin(k.pointers));
    return k;
}

void Qwen3VlVisionCuda::remember(const GraphKey& key, std::unique_ptr<CUgraphExec_st, GraphExecDeleter> exec) {
    auto it = std::find_if(graphs_.begin(), graphs_.end(), [&](const CachedGraph& g) { return g.key == key; });
    if (it == graphs_.end()) {
        if (graphs_.size() >= kGraphs)
            graphs_.erase(std::min_element(graphs_.begin(), graphs_.end(),
                                           [](const CachedGraph& a, const CachedGraph& b) { return a.last_use < b.last_use; }));
        graphs_.push_back(CachedGraph{key, nullptr, 0});
        it = graphs_.end() - 1;
    }
    if (exec) it->exec = std::move(exec);
    it->last_use = ++graph_clock_;
}

bool Qwen3VlVisionCuda::forward_graph(const float* pixels, const GridThw& grid, float* features) {
    // The legacy default stream cannot be captured.
    if (!graphs_on_ || stream_ == nullptr || stream_ == cudaStreamLegacy) return false;
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream_, &capturing) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    if (capturing != cudaStreamCaptureStatusNone) return false;  // the caller's capture takes the launches
    const GraphKey key = graph_key(pixels, grid, features);
    auto it = std::find_if(graphs_.begin(), graphs_.end(), [&](const CachedGraph& g) { return g.key == key; });
    if (it == graphs_.end()) return false;  // a first call: eager, which makes the plans and scratch
    if (!it->exec) {
        // Seen once eagerly with these very buffers: nothing below allocates, so it can be captured.
        Q3N_CUDA(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
        bool captured = false;
        try {
            captured = forward_bf16(pixels, grid, features);
        } catch (...) {
            cudaGraph_t partial = nullptr;
            cudaStreamEndCapture(stream_, &partial);
            if (partial) cudaGraphDestroy(partial);
            throw;
        }
        cudaGraph_t graph = nullptr;
        const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);
        cudaGraphExec_t exec = nullptr;
        if (captured && ended == cudaSuccess && graph) {
            if (cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess) exec = nullptr;
        }
        if (graph) cudaGraphDestroy(graph);
        if (!exec) {
            // Nothing ran; the eager path redoes the item (and meets any refusal itself).
            cudaGetLastError();
            graphs_.erase(it);
            return false;
        }
        remember(key, std::unique_ptr<CUgraphExec_st, GraphExecDeleter>(exec));
        it = std::find_if(graphs_.begin(), graphs_.end(), [&](const CachedGraph& g) { return g.key == key; });
    }
    it->last_use = ++graph_clock_;
    Q3N_CUDA(cudaGraphLaunch(it->exec.get(), stream_));
    return true;
}

void Qwen3VlVisionCuda::merge_fp32(const Merger& m, int patches, float* features, int column) {
    const int h = static_cast<int>(config_.hidden_size), unit = int(config_.spatial_merge_size * config_.spatial_merge_size);
    const int tokens = patches / unit, wide = h * unit;
    float *x = x_.as<float>(), *y = y_.as<float>(), *mid = mid_.as<float>();
    // Consecutive `unit` patches are one merged token, so [patches, h] is already [tokens, wide].
    if (m.postshuffle)
        vision_layer_norm(x, m.norm_w, m.norm_b, y, tokens, wide, config_.layer_norm_eps, stream_);
    else
        vision_layer_norm(x, m.norm_w, m.norm_b, y, patches, h, config_.layer_norm_eps, stream_);
    vision_gemm(y, tokens, wide, m.fc1.w, m.fc1.out, m.fc1.b, mid, m.fc1.out, VisionEpilogue::GeluErf, stream_);
    vision_gemm(mid, tokens, m.fc1.out, m.fc2.w, m.fc2.out, m.fc2.b, features + column, static_cast<int>(feature_width()),
                VisionEpilogue::Store, stream_);
}

void Qwen3VlVisionCuda::forward_fp32(const float* pixels, const GridThw& grid, float* features) {
    const VisionConfig& c = config_;
    const uint32_t ms = c.spatial_merge_size;
    const int frame = static_cast<int>(grid.h * grid.w), n = static_cast<int>(grid.t) * frame;
    const int h = static_cast<int>(c.hidden_size), heads = static_cast<int>(c.num_heads), hd = static_cast<int>(c.head_dim());
    const int inter = static_cast<int>(c.intermediate_size), P = static_cast<int>(c.patch_dim());
    const size_t rows = static_cast<size_t>(n);
    x_.reserve(rows * h * 4);
    y_.reserve(rows * h * 4);
    qkv_.reserve(rows * 3 * h * 4);
    att_.reserve(rows * h * 4);
    // The MLP's [n, inter] and the mergers' [tokens, 4h] = [n, h] share one buffer.
    mid_.reserve(rows * std::max(inter, h) * 4);
    float *x = x_.as<float>(), *y = y_.as<float>(), *qkv = qkv_.as<float>(), *att = att_.as<float>(), *mid = mid_.as<float>();

    vision_gemm(pixels, n, P, patch_embed_.w, h, patch_embed_.b, x, h, VisionEpilogue::Store, stream_);
    vision_pos_embed_add(x, pos_table_, static_cast<int>(c.grid_side()), static_cast<int>(grid.t), static_cast<int>(grid.h),
                         static_cast<int>(grid.w), static_cast<int>(ms), h, stream_);
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const VisionEpilogue act = c.gelu_tanh ? VisionEpilogue::GeluTanh : VisionEpilogue::GeluErf;
    for (size_t b = 0; b < blocks_.size(); ++b) {
        const Block& B = blocks_[b];
        vision_layer_norm(x, B.norm1_w, B.norm1_b, y, n, h, c.layer_norm_eps, stream_);
        vision_gemm(y, n, h, B.qkv.w, 3 * h, B.qkv.b, qkv, 3 * h, VisionEpilogue::Store, stream_);
        vision_rope_2d(qkv, n, heads, hd, static_cast<int>(grid.h), static_cast<int>(grid.w), static_cast<int>(ms), inv_freq_,
                       stream_);
        // Attention stays within one temporal slice.
        vision_attention(qkv, static_cast<int>(grid.t), frame, heads, hd, scale, att, stream_);
        vision_gemm(att, n, h, B.proj.w, h, B.proj.b, x, h, VisionEpilogue::Accumulate, stream_);
        vision_layer_norm(x, B.norm2_w, B.norm2_b, y, n, h, c.layer_norm_eps, stream_);
        vision_gemm(y, n, h, B.fc1.w, inter, B.fc1.b, mid, inter, act, stream_);
        vision_gemm(mid, n, inter, B.fc2.w, h, B.fc2.b, x, h, VisionEpilogue::Accumulate, stream_);
        if (tap_of_block_[b] >= 0)
            merge_fp32(deepstack_[tap_of_block_[b]], n, features, (tap_of_block_[b] + 1) * static_cast<int>(c.out_hidden_size));
    }
    merge_fp32(merger_, n, features, 0);
}

template <typename R>
bool Qwen3VlVisionCuda::merge_bf16(const Merger& m, const R* x, int patches, float* features, int column) {
    const int h = static_cast<int>(config_.hidden_size), unit = int(config_.spatial_merge_size * config_.spatial_merge_size);
    const int tokens = patches / unit, wide = h * unit;
    __nv_bfloat16 *y = y_.as<__nv_bfloat16>(), *mid = mid_.as<__nv_bfloat16>();
    // Consecutive `unit` patches are one merged token, so [patches, h] is already [tokens, wide].
    if (m.postshuffle)
        vision_layer_norm_bf16(x, m.norm_w, m.norm_b, y, tokens, wide, config_.layer_norm_eps, stream_);
    else
        vision_layer_norm_bf16(x, m.norm_w, m.norm_b, y, patches, h, config_.layer_norm_eps, stream_);
    return gemm_bf16(y, wide, tokens, wide, m.fc1.w, m.fc1.out, m.fc1.b16, mid, m.fc1.out, VisionEpilogue::GeluErf,
                     stream_) &&
           gemm_bf16(mid, m.fc1.out, tokens, m.fc1.out, m.fc2.w, m.fc2.out, m.fc2.b, features + column,
                     static_cast<int>(feature_width()), VisionEpilogue::Store, stream_);
}

bool Qwen3VlVisionCuda::forward_bf16(const float* pixels, const GridThw& grid, float* features) {
    if (!bf16_residual_) return forward_bf16_with<float>(pixels, grid, features);
    return forward_bf16_with<__nv_bfloat16>(pixels, grid, features);
}

template <typename R>
bool Qwen3VlVisionCuda::forward_bf16_with(const float* pixels, const GridThw& grid, float* features) {
    const VisionConfig& c = config_;
    const uint32_t ms = c.spatial_merge_size;
    const int frame = static_cast<int>(grid.h * grid.w), n = static_cast<int>(grid.t) * frame;
    const int h = static_cast<int>(c.hidden_size), heads = static_cast<int>(c.num_heads), hd = static_cast<int>(c.head_dim());
    const int inter = static_cast<int>(c.intermediate_size), P = static_cast<int>(c.patch_dim());
    const size_t rows = static_cast<size_t>(n);
    // x_: the patch embedding in fp32, then (bf16 residual) the stream from the position add on.
    x_.reserve(rows * h * 4);
    if (std::is_same_v<R, __nv_bfloat16>) residual_.reserve(rows * h * 2);
    y_.reserve(rows * h * 2);
    // The qkv rows, and before the first block the pixels in bf16.
    qkv_.reserve(rows * std::max(3 * h, P) * 2);
    att_.reserve(rows * h * 2);
    // The MLP's [n, inter] and the mergers' [tokens, 4h] = [n, h] share one buffer.
    mid_.reserve(rows * std::max(inter, h) * 2);
    float* embedded_rows = x_.as<float>();
    R* x = std::is_same_v<R, float> ? x_.as<R>() : residual_.as<R>();
    __nv_bfloat16 *y = y_.as<__nv_bfloat16>(), *qkv = qkv_.as<__nv_bfloat16>(), *att = att_.as<__nv_bfloat16>(),
                  *mid = mid_.as<__nv_bfloat16>();

    // The pixels rounded to bf16 once, as vision_gemm rounds them on load; the embedding's output is
    // fp32 either way, so a refusal here costs only this GEMM's speed.
    bool embedded = false;
    if (P % 8 == 0) {
        round_to_bf16(pixels, qkv, rows * P, stream_);
        embedded = gemm_bf16(qkv, P, n, P, patch_embed_.w, h, patch_embed_.b, embedded_rows, h, VisionEpilogue::Store,
                             stream_);
    }
    if (!embedded)
        vision_gemm(pixels, n, P, patch_embed_.w, h, patch_embed_.b, embedded_rows, h, VisionEpilogue::Store, stream_);
    if constexpr (std::is_same_v<R, float>)
        vision_pos_embed_add(x, pos_table_, static_cast<int>(c.grid_side()), static_cast<int>(grid.t),
                             static_cast<int>(grid.h), static_cast<int>(grid.w), static_cast<int>(ms), h, stream_);
    else
        vision_pos_embed_add_bf16(embedded_rows, pos_table_, static_cast<int>(c.grid_side()), static_cast<int>(grid.t),
                                  static_cast<int>(grid.h), static_cast<int>(grid.w), static_cast<int>(ms), h, x, stream_);
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const VisionEpilogue act = c.gelu_tanh ? VisionEpilogue::GeluTanh : VisionEpilogue::GeluErf;
    // Where the wgmma attention runs it turns q itself as it loads it, and the rotary pass over memory
    // shrinks to the k heads (H100, 4096 patches: 22.6 us a block for q and k, 9.3 for k alone, and
    // the attention 1.3 us longer); both read one table of the frame's cos and sin, computed once for
    // all blocks.
    const bool q_turned_in_attention =
        vision_attention_wgmma_applies(hd) && vision_rope_2d_keys_applies(hd) && q_turned_in_attention_enabled();
    VisionRopeTable rope;
    if (q_turned_in_attention) {
        rope_.reserve(vision_rope_table_entries(static_cast<int>(grid.h), static_cast<int>(grid.w), hd) * sizeof(float2));
        rope.cs = rope_.as<float2>();
        rope.h = static_cast<int>(grid.h);
        rope.w = static_cast<int>(grid.w);
        rope.merge = static_cast<int>(ms);
        vision_rope_table(rope_.as<float2>(), rope.h, rope.w, hd, inv_freq_, stream_);
    }
    for (size_t b = 0; b < blocks_.size(); ++b) {
        const Block& B = blocks_[b];
        vision_layer_norm_bf16(x, B.norm1_w, B.norm1_b, y, n, h, c.layer_norm_eps, stream_);
        if (!gemm_bf16(y, h, n, h, B.qkv.w, 3 * h, B.qkv.b16, qkv, 3 * h, VisionEpilogue::Store, stream_)) return false;
        if (q_turned_in_attention)
            vision_rope_2d_bf16_keys(qkv, n, heads, hd, rope, stream_);
        else
            vision_rope_2d_bf16(qkv, n, heads, hd, static_cast<int>(grid.h), static_cast<int>(grid.w),
                                static_cast<int>(ms), inv_freq_, stream_);
        // Attention stays within one temporal slice.
        vision_attention_bf16(qkv, static_cast<int>(grid.t), frame, heads, hd, scale, att, stream_,
                              q_turned_in_attention ? &rope : nullptr);
        if (!gemm_bf16(att, h, n, h, B.proj.w, h, residual_bias(B.proj.b, B.proj.b16, x), x, h, VisionEpilogue::Accumulate,
                       stream_))
            return false;
        vision_layer_norm_bf16(x, B.norm2_w, B.norm2_b, y, n, h, c.layer_norm_eps, stream_);
        if (!gemm_bf16(y, h, n, h, B.fc1.w, inter, B.fc1.b16, mid, inter, act, stream_)) return false;
        if (!gemm_bf16(mid, inter, n, inter, B.fc2.w, h, residual_bias(B.fc2.b, B.fc2.b16, x), x, h,
                       VisionEpilogue::Accumulate, stream_))
            return false;
        if (tap_of_block_[b] >= 0 && !merge_bf16(deepstack_[tap_of_block_[b]], x, n, features,
                                                 (tap_of_block_[b] + 1) * static_cast<int>(c.out_hidden_size)))
            return false;
    }
    return merge_bf16(merger_, x, n, features, 0);
}

}  // namespace q3n::cuda
