// Qwen3-VL (dense and MoE text) on one GPU: model/qwen3_vl.cpp's composition with CUDA pieces. The
// tower is cuda/qwen3_vl_vision_cuda.h; the text model is the MoE runner's layer loop
// (cuda/qwen3_moe_cuda.cu: attention, then a sparse MoE block or the dense SwiGLU per layer), built
// here from the same shared pieces (DeviceWeights, StepInputs, DecodeGraphs, DeviceOutput) rather
// than by reaching into either runner, with what makes it vision-language:
//   - the rotary turns by the step's [3][tokens] MRoPE positions (qk_norm_rope_kv_write_mrope); the
//     cache slot stays the token's cache index;
//   - the placeholder rows' embeddings are replaced by the tower's merged features, and DeepStack tap
//     l is added to those rows after layer l (into the pending MLP output h, which the next layer's
//     norm, or the final add, folds into the residual stream: the CPU adds to x after folding, a
//     difference of fp32 summation order only).
// encode_vision runs the tower on the device and returns the features to the host, where the
// engine keeps them until the rows' steps; each step uploads its rows' features. Steps with vision
// rows never replay a graph (their shape is new each time); decode steps do.
#include "cuda/qwen3_vl_cuda.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/decode_graphs.h"
#include "cuda/device_buffer.h"
#include "cuda/device_guard.h"
#include "cuda/device_sampling.h"
#include "cuda/device_weights.h"
#include "cuda/next_ops.h"
#include "cuda/ops.h"
#include "cuda/qwen3_vl_vision_cuda.h"
#include "cuda/vision_ops.h"
#include "model/qwen3_dense.h"
#include "model/qwen3_moe.h"
#include "model/qwen3_vl_vision.h"

namespace q3n {
namespace {

using cuda::DeviceBuffer;
using cuda::DeviceLinear;
using cuda::StackedLinear;

const char* const kTextPrefix = "model.language_model.";

// The text weights of either decoder, seen as the MoE runner sees them (dense layers have no experts).
struct TextLayerView {
    const Qwen3LayerWeights* common = nullptr;
    bool sparse = false;
    const Linear* router = nullptr;
    const std::vector<cpu::MoeExpert>* experts = nullptr;
};

struct TextView {
    const Linear* embed = nullptr;
    const Linear* lm_head = nullptr;
    const std::vector<float>* final_norm = nullptr;
    std::vector<TextLayerView> layers;
};

struct LayerOnDevice {
    const float *input_norm = nullptr, *post_norm = nullptr, *q_norm = nullptr, *k_norm = nullptr;
    StackedLinear qkv;
    DeviceLinear o;
    bool sparse = false;
    cuda::DeviceMoeBlock moe;  // sparse layers
    StackedLinear gate_up;     // dense layers
    DeviceLinear down;
};

bool any_fp8(const TextView& w) {
    for (const auto& L : w.layers)
        if (L.common->q.type == WeightType::FP8_E4M3 || L.common->gate.type == WeightType::FP8_E4M3 ||
            (L.sparse && !L.experts->empty() && (*L.experts)[0].gate.type == WeightType::FP8_E4M3))
            return true;
    return false;
}

class Qwen3VlCuda : public ModelRunner {
public:
    Qwen3VlCuda(const ModelConfig& c, const TextView& w, const Qwen3VlVisionWeights& vw, KvCache& kv, int device)
        : c_(c), kv_(kv), guard_(device) {
        Q3N_CUDA(cudaSetDevice(device));
        Q3N_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
        vision_ = std::make_unique<cuda::Qwen3VlVisionCuda>(*c.vision, vw, stream_);
        taps_ = vision_->taps();
        if (vision_->config().out_hidden_size != c.hidden_size)
            fail(Q3N_ERR_BAD_CONFIG, "vision_config.out_hidden_size differs from the text hidden_size");
        if (taps_ > c.num_layers) fail(Q3N_ERR_BAD_CONFIG, "more DeepStack taps than text decoder layers");

        weights_ = std::make_unique<cuda::DeviceWeights>(stream_, any_fp8(w) && cuda::fp8_gemm_enabled(stream_));
        cuda::DeviceWeights& W = *weights_;
        embed_ = W.upload(*w.embed, false);
        const DeviceLinear lm_head = c.tie_word_embeddings ? embed_ : W.upload(*w.lm_head, false);
        // The CPU runners count the final norm's parameters but not its bytes; so does this one.
        const float* final_norm = W.upload_vector(*w.final_norm, 0.0f, false);
        W.count(w.final_norm->size(), 0);
        layers_.resize(c.num_layers);
        for (size_t l = 0; l < c.num_layers; ++l) {
            const TextLayerView& V = w.layers[l];
            const Qwen3LayerWeights& L = *V.common;
            LayerOnDevice& D = layers_[l];
            D.input_norm = W.upload_vector(L.input_norm);
            D.post_norm = W.upload_vector(L.post_attn_norm);
            D.q_norm = W.upload_vector(L.q_norm);
            D.k_norm = W.upload_vector(L.k_norm);
            D.qkv = W.upload_stacked({&L.q, &L.k, &L.v});
            D.o = W.upload(L.o);
            D.sparse = V.sparse;
            if (V.sparse) {
                D.moe = W.upload_moe(*V.router, *V.experts, c.num_experts_per_tok, nullptr, nullptr);
                max_moe_ = D.moe.moe;
            } else {
                D.gate_up = W.upload_stacked({&L.gate, &L.up});
                D.down = W.upload(L.down);
                has_dense_ = true;
            }
        }
        output_ = std::make_unique<cuda::DeviceOutput>(c.hidden_size, c.vocab_size, c.rms_norm_eps, lm_head, final_norm);
        const cpu::Rope rope = make_rope(c);
        rot_dim_ = static_cast<int>(rope.rot_dim);
        attention_scaling_ = rope.attention_scaling;
        inv_freq_ = W.upload_array(rope.inv_freq);
        if (!rope.axis.empty()) axis_ = W.upload_array(rope.axis);

        const KvCacheShape& s = kv.shape();
        if (s.num_layers < c.num_layers) fail(Q3N_ERR_INTERNAL, "the KV cache has fewer layers than the model");
        const size_t elem = s.dtype == KvDtype::F32 ? 4 : 2;
        layer_kv_bytes_ = s.num_blocks * s.block_size * s.kv_heads * s.head_dim * elem;
        kv_k_.resize(layer_kv_bytes_ * c.num_layers);
        kv_v_.resize(layer_kv_bytes_ * c.num_layers);
        size_activations(cuda::kMaxGraphTokens);
        Q3N_CUDA(cudaStreamSynchronize(stream_));
    }

    ~Qwen3VlCuda() override {
        graphs_.clear();
        vision_.reset();
        if (stream_) cudaStreamDestroy(stream_);
    }

    WeightStats weight_stats() const override {
        WeightStats s = weights_->stats();
        s.parameter_count += vision_->stats().parameter_count;
        s.bytes += vision_->stats().bytes;
        // The tower is BF16 in the FP8 releases too (spec 5.6); the checkpoint's format is the text model's.
        return s;
    }

    void forward(const StepBatch& b) override {
        guard_([&] { run_forward(b); });
    }

    void logits(const size_t* rows, size_t count, float* out) override {
        guard_([&] {
            output_->compute(x_.as<float>(), tokens_, rows, count, stream_);
            output_->copy_logits(count, out, stream_);
        });
    }

    bool samples_on_device() const override { return true; }

    void sample(const size_t* rows, size_t count, const DeviceSamplingRequest* requests,
                DeviceSamplingResult* results) override {
        guard_([&] {
            output_->compute(x_.as<float>(), tokens_, rows, count, stream_);
            output_->sample(count, requests, results, stream_);
        });
    }

    void score(const size_t* rows, size_t count, const int32_t* tokens, uint32_t top_k, q3n_token_logprob* out) override {
        guard_([&] {
            output_->compute(x_.as<float>(), tokens_, rows, count, stream_);
            output_->score(count, tokens, top_k, out, stream_);
        });
    }

    bool has_vision() const override { return true; }

    void encode_vision(const float* pixels, const GridThw& grid, std::vector<float>& features) override {
        guard_([&] {
            const size_t patches = size_t(grid.t) * grid.h * grid.w, cols = vision_->config().patch_dim();
            const size_t tokens = vision_->tokens(grid), width = vision_->feature_width();
            pixels_dev_.reserve(patches * cols * 4);
            features_dev_.reserve(std::max<size_t>(tokens * width * 4, 4));
            Q3N_CUDA(cudaMemcpyAsync(pixels_dev_.get(), pixels, patches * cols * 4, cudaMemcpyHostToDevice, stream_));
            vision_->forward(pixels_dev_.as<float>(), grid, features_dev_.as<float>());
            features.resize(tokens * width);
            Q3N_CUDA(cudaMemcpyAsync(features.data(), features_dev_.get(), tokens * width * 4, cudaMemcpyDeviceToHost, stream_));
            Q3N_CUDA(cudaStreamSynchronize(stream_));
        });
    }

private:
    cuda::DeviceKvLayer kv_layer(size_t l) const {
        const KvCacheShape& s = kv_.shape();
        return cuda::DeviceKvLayer{s.dtype, kv_k_.as<uint8_t>() + l * layer_kv_bytes_, kv_v_.as<uint8_t>() + l * layer_kv_bytes_,
                                   static_cast<int>(s.block_size), static_cast<int>(s.kv_heads), static_cast<int>(s.head_dim)};
    }

    // Every activation buffer sized for `tokens` rows. A reallocation moves buffers that captured
    // graphs point at, so it drops them.
    void size_activations(int tokens) {
        const size_t T = static_cast<size_t>(std::max(tokens, 1));
        const size_t H = c_.hidden_size, d = c_.head_dim, I = has_dense_ ? c_.intermediate_size : 0;
        const size_t row = static_cast<size_t>(c_.num_heads + 2 * c_.num_kv_heads) * d;
        const size_t kmax = std::max<size_t>({H, I, size_t(c_.num_heads) * d});
        const size_t E = c_.num_experts, k = c_.num_experts_per_tok;
        bool moved = false;
        auto grow = [&](DeviceBuffer& b, size_t bytes) {
            if (bytes > b.bytes()) {
                b.resize(bytes);
                moved = true;
            }
        };
        grow(x_, T * H * 4);
        grow(h_, T * H * 4);
        grow(hn_, T * H * 4);
        grow(qkv_, T * row * 4);
        grow(attn_, T * c_.num_heads * d * 4);
        grow(attn_ws_, cuda::attention_workspace_bytes(static_cast<int>(T), c_.num_heads, c_.num_kv_heads, d));
        grow(mrope_dev_, 3 * T * 4);
        if (I) {
            grow(gu_, T * 2 * I * 4);
            grow(act_, T * I * 4);
        }
        grow(qf_, T * kmax * 4);
        grow(qs_, T * ((kmax + 127) / 128) * 4);
        if (E) {
            grow(router_logits_, T * E * 4);
            grow(route_experts_, T * k * 4);
            grow(route_weights_, T * k * 4);
            grow(route_order_, T * k * 4);
            grow(route_position_, T * k * 4);
            grow(route_offsets_, (E + 1) * 4);
            grow(route_active_, (E + 1) * 4);
            if (max_moe_.num_experts) grow(moe_workspace_, cuda::moe_workspace_bytes(max_moe_, static_cast<int>(T)));
        }
        if (weights_->gemm()) {
            grow(gemm_scratch_.q8, T * kmax);
            grow(gemm_scratch_.scales, T * ((kmax + 127) / 128) * 4);
            grow(gemm_scratch_.transposed, T * static_cast<size_t>(weights_->max_gemm_out()) * 4);
        }
        if (moved) graphs_.clear();
    }

    // A DeviceLinear or a StackedLinear, from this step's activation buffers (cuda::project's rule).
    template <typename Weight>
    void lin(const float* x, int rows, const Weight& w, float* y, int ldy) {
        cuda::project(x, qf_.as<float>(), qs_.as<float>(), rows, w, y, ldy, gemm_scratch_, stream_);
    }

    void norm_for(float* x, const float* residual, const float* weight, int T, bool f32, bool fp8) {
        cuda::rmsnorm_quantize(x, residual, weight, T, c_.hidden_size, c_.rms_norm_eps, f32 ? hn_.as<float>() : nullptr,
                               fp8 ? qf_.as<float>() : nullptr, fp8 ? qs_.as<float>() : nullptr, stream_);
    }

    cuda::MoeRouting routing() const {
        return cuda::MoeRouting{route_experts_.as<int32_t>(), route_weights_.as<float>(), route_offsets_.as<int32_t>(),
                                route_order_.as<int32_t>(), route_position_.as<int32_t>(), route_active_.as<int32_t>()};
    }

    // The layers, from the embedding to the last residual add: launches only, so a graph can hold them
    // (when vision == 0, which every decode step satisfies).
    void enqueue_layers(int T, const cuda::DeviceBatch& batch, int vision) {
        const int H = c_.hidden_size, d = c_.head_dim, I = c_.intermediate_size;
        const int nH = c_.num_heads, row = (nH + 2 * c_.num_kv_heads) * d;
        const int width = static_cast<int>(vision_->feature_width());
        float *x = x_.as<float>(), *h = h_.as<float>(), *hn = hn_.as<float>(), *qkv = qkv_.as<float>();
        float* attn = attn_.as<float>();
        const float scale = 1.0f / std::sqrt(static_cast<float>(d));

        cuda::embed(embed_, inputs_.tokens(), T, x, stream_);
        if (vision)
            cuda::vl_scatter_rows(x, vision_rows_dev_.as<int32_t>(), vision, H, vision_dev_.as<float>(), width, false, stream_);
        for (size_t l = 0; l < c_.num_layers; ++l) {
            LayerOnDevice& L = layers_[l];
            const cuda::DeviceKvLayer kv = kv_layer(l);
            norm_for(x, l == 0 ? nullptr : h, L.input_norm, T, L.qkv.f32_input, L.qkv.fp8_input);
            lin(hn, T, L.qkv, qkv, row);
            if (axis_)
                cuda::qk_norm_rope_kv_write_mrope(qkv, nH, kv, L.q_norm, L.k_norm, c_.rms_norm_eps, inv_freq_, axis_, rot_dim_,
                                                  attention_scaling_, mrope_dev_.as<int32_t>(), batch, stream_);
            else
                cuda::qk_norm_rope_kv_write(qkv, nH, kv, L.q_norm, L.k_norm, c_.rms_norm_eps, inv_freq_, rot_dim_,
                                            attention_scaling_, batch, stream_);
            const bool o_fp8 = cuda::is_fp8(L.o);
            cuda::attention(kv, qkv, row, nH, scale, batch, attn, stream_, attn_ws_.get(), attn_ws_.bytes(),
                            o_fp8 ? qf_.as<float>() : nullptr, o_fp8 ? qs_.as<float>() : nullptr);
            lin(attn, T, L.o, h, H);
            if (L.sparse) {
                norm_for(x, h, L.post_norm, T, true, cuda::is_fp8(L.moe.router));
                const cuda::DeviceMoe& m = L.moe.moe;
                lin(hn, T, L.moe.router, router_logits_.as<float>(), m.num_experts);
                cuda::moe_forward(router_logits_.as<float>(), m.num_experts, T, m, c_.norm_topk_prob, routing(), hn, nullptr, h,
                                  moe_workspace_.get(), stream_);
            } else {
                norm_for(x, h, L.post_norm, T, L.gate_up.f32_input, L.gate_up.fp8_input);
                lin(hn, T, L.gate_up, gu_.as<float>(), 2 * I);
                const bool down_fp8 = cuda::is_fp8(L.down);
                cuda::silu_mul_quantize(gu_.as<float>(), T, I, down_fp8 ? nullptr : act_.as<float>(),
                                        down_fp8 ? qf_.as<float>() : nullptr, down_fp8 ? qs_.as<float>() : nullptr, stream_);
                lin(act_.as<float>(), T, L.down, h, H);
            }
            if (vision && l < taps_)
                cuda::vl_scatter_rows(h, vision_rows_dev_.as<int32_t>(), vision, H, vision_dev_.as<float>() + (l + 1) * H,
                                      width, true, stream_);
        }
        cuda::add_inplace(x, h, T * H, stream_);
    }

    void run_forward(const StepBatch& b) {
        const int T = static_cast<int>(b.tokens.size());
        if (axis_ && b.mrope_positions.size() != 3 * b.tokens.size())
            fail(Q3N_ERR_INTERNAL, "an MRoPE model was stepped without [3][tokens] positions");
        if (b.vision_rows.size() != b.vision_features.size())
            fail(Q3N_ERR_INTERNAL, "a step's vision rows and features differ in number");
        const int vision = static_cast<int>(b.vision_rows.size());
        const bool decode_only = cuda::is_decode_only(b) && vision == 0;
        if (inputs_.upload(b, static_cast<int>(kv_.shape().block_size), decode_only, stream_)) graphs_.clear();
        size_activations(T);
        if (axis_)
            Q3N_CUDA(cudaMemcpyAsync(mrope_dev_.get(), b.mrope_positions.data(), 3 * size_t(T) * 4, cudaMemcpyHostToDevice,
                                     stream_));
        if (vision) {
            const size_t width = vision_->feature_width();
            vision_rows_host_.resize(vision);
            for (int i = 0; i < vision; ++i) {
                if (b.vision_rows[i] >= b.tokens.size()) fail(Q3N_ERR_INTERNAL, "a vision row lies outside the step");
                vision_rows_host_[i] = static_cast<int32_t>(b.vision_rows[i]);
            }
            vision_dev_.reserve(size_t(vision) * width * 4);
            vision_rows_dev_.reserve(vision_rows_host_.size() * 4);
            // Straight from the engine's memory, one copy per run of rows that lie one after another
            // there (an item's rows do), with no staging copy on the host: 64 MB for a 1024x1024 image
            // at Qwen3-VL-8B's four feature blocks. The sources are pageable, so each copy is staged
            // before the call returns, within the call that the engine's pointers are valid for.
            for (int i = 0; i < vision;) {
                int j = i + 1;
                while (j < vision && b.vision_features[j] == b.vision_features[j - 1] + width) ++j;
                Q3N_CUDA(cudaMemcpyAsync(vision_dev_.as<float>() + size_t(i) * width, b.vision_features[i],
                                         size_t(j - i) * width * 4, cudaMemcpyHostToDevice, stream_));
                i = j;
            }
            Q3N_CUDA(cudaMemcpyAsync(vision_rows_dev_.get(), vision_rows_host_.data(), vision_rows_host_.size() * 4,
                                     cudaMemcpyHostToDevice, stream_));
        }
        const cuda::DeviceBatch batch = inputs_.batch();
        if (decode_only)
            graphs_.run(cuda::DecodeGraphs::key(T, inputs_.max_blocks()), stream_, [&] { enqueue_layers(T, batch, 0); });
        else
            enqueue_layers(T, batch, vision);
        tokens_ = T;
    }

    ModelConfig c_;
    KvCache& kv_;
    cuda::DeviceGuard guard_;
    cudaStream_t stream_ = nullptr;
    std::unique_ptr<cuda::Qwen3VlVisionCuda> vision_;
    size_t taps_ = 0;
    std::unique_ptr<cuda::DeviceWeights> weights_;
    std::unique_ptr<cuda::DeviceOutput> output_;
    DeviceLinear embed_;
    const float* inv_freq_ = nullptr;
    const uint8_t* axis_ = nullptr;  // MRoPE slot axes; null for a 1-D rope
    std::vector<LayerOnDevice> layers_;
    cuda::DeviceMoe max_moe_;
    bool has_dense_ = false;
    int rot_dim_ = 0;
    float attention_scaling_ = 1.0f;
    size_t layer_kv_bytes_ = 0;
    DeviceBuffer kv_k_, kv_v_;
    cuda::StepInputs inputs_;
    cuda::DecodeGraphs graphs_;
    DeviceBuffer x_, h_, hn_, qkv_, attn_, attn_ws_, gu_, act_, qf_, qs_, mrope_dev_;
    DeviceBuffer router_logits_, route_experts_, route_weights_, route_order_, route_position_, route_offsets_,
        route_active_, moe_workspace_;
    cuda::GemmScratch gemm_scratch_;
    DeviceBuffer pixels_dev_, features_dev_, vision_dev_, vision_rows_dev_;
    std::vector<int32_t> vision_rows_host_;
    size_t tokens_ = 0;
};

}  // namespace

std::unique_ptr<ModelRunner> make_qwen3_vl_cuda(const ModelConfig& c, WeightSource& src, KvCache& kv, int device,
                                                const std::function<bool(float)>& progress) {
    if (!c.vision) fail(Q3N_ERR_BAD_CONFIG, "a Qwen3-VL architecture needs vision_config and text_config");
    // The host copies live until the upload is done; the device holds everything afterwards.
    std::vector<std::unique_ptr<uint8_t[]>> owned;
    const Qwen3VlVisionWeights vw = load_qwen3_vl_vision(src, *c.vision, owned);
    TextView view;
    if (c.num_experts > 0) {
        const Qwen3MoeWeights w = load_qwen3_moe_weights(c, src, progress, kTextPrefix);
        view.embed = &w.embed;
        view.lm_head = &w.lm_head;
        view.final_norm = &w.final_norm;
        for (const auto& L : w.layers) view.layers.push_back({&L.common, L.sparse, &L.router, &L.experts});
        return std::make_unique<Qwen3VlCuda>(c, view, vw, kv, device);
    }
    const Qwen3Weights w = load_qwen3_weights(c, src, progress, kTextPrefix);
    view.embed = &w.embed;
    view.lm_head = &w.lm_head;
    view.final_norm = &w.final_norm;
    for (const auto& L : w.layers) view.layers.push_back({&L, false, nullptr, nullptr});
    return std::make_unique<Qwen3VlCuda>(c, view, vw, kv, device);
}

}  // namespace q3n
