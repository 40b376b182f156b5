// Qwen3-MoE on one GPU (shared/spec 2): the CPU runner's graph (model/qwen3_moe.cpp) with the dense
// CUDA runner's attention (fused residual + RMSNorm + FP8 quantisation, q|k|v stacked) and the MoE
// block as routing plus one grouped launch per projection over all experts (cuda/next_ops.h), so a
// sparse decode layer is a fixed handful of kernels whatever the number of experts:
//   rmsnorm_quantize, linear(qkv), qk_norm_rope_kv_write, attention, [quantize_fp8], linear(o),
//   rmsnorm_quantize, linear(router), moe_forward (at decode sizes with FP8 experts one persistent
//   launch that routes too; else moe_route (route + permute) and moe_experts (gate_up, down,
//   un-permute; quantize_fp8 twice with FP8 experts)).
// Dense layers (mlp_only_layers, decoder_sparse_step) take the dense runner's SwiGLU instead. Decode
// steps replay CUDA graphs; logits, sampling and scoring stay on the device.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cuda/cuda_backend.h"
#include "cuda/cuda_check.h"
#include "cuda/decode_graphs.h"
#include "cuda/device_buffer.h"
#include "cuda/device_guard.h"
#include "cuda/device_sampling.h"
#include "cuda/device_weights.h"
#include "cuda/next_ops.h"
#include "cuda/ops.h"
#include "model/qwen3_dense.h"
#include "model/qwen3_moe.h"

namespace q3n {
namespace {

using cuda::DeviceBuffer;
using cuda::DeviceLinear;
using cuda::StackedLinear;

struct MoeLayerOnDevice {
    const float *input_norm = nullptr, *post_norm = nullptr, *q_norm = nullptr, *k_norm = nullptr;
    StackedLinear qkv;
    DeviceLinear o;
    bool sparse = false;
    cuda::DeviceMoeBlock moe;           // sparse layers
    StackedLinear gate_up;              // dense layers
    DeviceLinear down;
};

bool any_fp8(const Qwen3MoeWeights& w) {
    for (const auto& L : w.layers)
        if (L.common.q.type == WeightType::FP8_E4M3 || (!L.experts.empty() && L.experts[0].gate.type == WeightType::FP8_E4M3))
            return true;
    return false;
}

class Qwen3MoeCuda : public ModelRunner {
public:
    Qwen3MoeCuda(const ModelConfig& c, const Qwen3MoeWeights& w, KvCache& kv, int device)
        : c_(c), kv_(kv), device_(device), guard_(device) {
        Q3N_CUDA(cudaSetDevice(device));
        Q3N_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
        weights_ = std::make_unique<cuda::DeviceWeights>(stream_, any_fp8(w) && cuda::fp8_gemm_enabled(stream_));
        cuda::DeviceWeights& W = *weights_;
        const DeviceLinear embed = W.upload(w.embed, false);
        embed_ = embed;
        const DeviceLinear lm_head = c.tie_word_embeddings ? embed : W.upload(w.lm_head, false);
        // The CPU runner counts the final norm's parameters but not its bytes; so does this one.
        const float* final_norm = W.upload_vector(w.final_norm, 0.0f, false);
        W.count(w.final_norm.size(), 0);
        layers_.resize(c.num_layers);
        for (size_t l = 0; l < c.num_layers; ++l) {
            const Qwen3MoeLayerWeights& L = w.layers[l];
            MoeLayerOnDevice& D = layers_[l];
            D.input_norm = W.upload_vector(L.common.input_norm);
            D.post_norm = W.upload_vector(L.common.post_attn_norm);
            D.q_norm = W.upload_vector(L.common.q_norm);
            D.k_norm = W.upload_vector(L.common.k_norm);
            D.qkv = W.upload_stacked({&L.common.q, &L.common.k, &L.common.v});
            D.o = W.upload(L.common.o);
            D.sparse = L.sparse;
            if (L.sparse) {
                D.moe = W.upload_moe(L.router, L.experts, c.num_experts_per_tok, nullptr, nullptr);
                max_moe_ = D.moe.moe;
            } else {
                D.gate_up = W.upload_stacked({&L.common.gate, &L.common.up});
                D.down = W.upload(L.common.down);
                has_dense_ = true;
            }
        }
        output_ = std::make_unique<cuda::DeviceOutput>(c.hidden_size, c.vocab_size, c.rms_norm_eps, lm_head, final_norm);
        const cpu::Rope rope = make_rope(c);
        rot_dim_ = static_cast<int>(rope.rot_dim);
        attention_scaling_ = rope.attention_scaling;
        inv_freq_ = W.upload_array(rope.inv_freq);

        const KvCacheShape& s = kv.shape();
        if (s.num_layers < c.num_layers) fail(Q3N_ERR_INTERNAL, "the KV cache has fewer layers than the model");
        const size_t elem = s.dtype == KvDtype::F32 ? 4 : 2;
        layer_kv_bytes_ = s.num_blocks * s.block_size * s.kv_heads * s.head_dim * elem;
        kv_k_.resize(layer_kv_bytes_ * c.num_layers);
        kv_v_.resize(layer_kv_bytes_ * c.num_layers);
        size_activations(cuda::kMaxGraphTokens);
        Q3N_CUDA(cudaStreamSynchronize(stream_));
    }

    ~Qwen3MoeCuda() override {
        graphs_.clear();
        if (stream_) cudaStreamDestroy(stream_);
    }

    WeightStats weight_stats() const override { return weights_->stats(); }

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
        if (weights_->size_gemm_scratch(gemm_scratch_, T, kmax)) moved = true;  // rows padded as gemm_fp8 pads them
        if (moved) graphs_.clear();
    }

    // A DeviceLinear or a StackedLinear, from this step's activation buffers (cuda::project's rule).
    template <typename Weight>
    void lin(const float* x, int rows, const Weight& w, float* y, int ldy) {
        cuda::project(x, qf_.as<float>(), qs_.as<float>(), rows, w, y, ldy, gemm_scratch_, stream_);
    }

    // x (+ residual) -> RMSNorm -> what the next Linears read: fp32 into hn_, FP8 into qf_/qs_.
    void norm_for(float* x, const float* residual, const float* weight, int T, bool f32, bool fp8) {
        cuda::rmsnorm_quantize(x, residual, weight, T, c_.hidden_size, c_.rms_norm_eps, f32 ? hn_.as<float>() : nullptr,
                               fp8 ? qf_.as<float>() : nullptr, fp8 ? qs_.as<float>() : nullptr, stream_);
    }

    cuda::MoeRouting routing() const {
        return cuda::MoeRouting{route_experts_.as<int32_t>(), route_weights_.as<float>(), route_offsets_.as<int32_t>(),
                                route_order_.as<int32_t>(), route_position_.as<int32_t>(), route_active_.as<int32_t>()};
    }

    // The layers, from the embedding to the last residual add: launches only, so a graph can hold them.
    void enqueue_layers(int T, const cuda::DeviceBatch& batch) {
        const int H = c_.hidden_size, d = c_.head_dim, I = c_.intermediate_size;
        const int nH = c_.num_heads, row = (nH + 2 * c_.num_kv_heads) * d;
        float *x = x_.as<float>(), *h = h_.as<float>(), *hn = hn_.as<float>(), *qkv = qkv_.as<float>();
        float* attn = attn_.as<float>();
        const float scale = 1.0f / std::sqrt(static_cast<float>(d));

        cuda::embed(embed_, inputs_.tokens(), T, x, stream_);
        for (size_t l = 0; l < c_.num_layers; ++l) {
            MoeLayerOnDevice& L = layers_[l];
            const cuda::DeviceKvLayer kv = kv_layer(l);
            // The previous layer's MLP output joins the residual stream inside this norm.
            norm_for(x, l == 0 ? nullptr : h, L.input_norm, T, L.qkv.f32_input, L.qkv.fp8_input);
            lin(hn, T, L.qkv, qkv, row);
            const bool o_fp8 = cuda::is_fp8(L.o);
            if (cuda::attention_decode_fuses(batch, kv, rot_dim_)) {
                // Norm, rotary, cache write and attention in one launch (cuda/attention.cu).
                cuda::attention_decode_qk_norm_rope(kv, qkv, nH, L.q_norm, L.k_norm, c_.rms_norm_eps, inv_freq_, rot_dim_,
                                                    attention_scaling_, scale, batch, attn, stream_, attn_ws_.get(),
                                                    attn_ws_.bytes(), o_fp8 ? qf_.as<float>() : nullptr,
                                                    o_fp8 ? qs_.as<float>() : nullptr);
            } else {
                cuda::qk_norm_rope_kv_write(qkv, nH, kv, L.q_norm, L.k_norm, c_.rms_norm_eps, inv_freq_, rot_dim_,
                                            attention_scaling_, batch, stream_);
                cuda::attention(kv, qkv, row, nH, scale, batch, attn, stream_, attn_ws_.get(), attn_ws_.bytes(),
                                o_fp8 ? qf_.as<float>() : nullptr, o_fp8 ? qs_.as<float>() : nullptr);
            }
            lin(attn, T, L.o, h, H);
            if (L.sparse) {
                // Experts read fp32 activations (FP8 experts quantise inside moe_experts); so does the
                // router unless a checkpoint quantised it.
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
        }
        cuda::add_inplace(x, h, T * H, stream_);
    }

    void run_forward(const StepBatch& b) {
        const int T = static_cast<int>(b.tokens.size());
        const bool decode_only = cuda::is_decode_only(b);
        if (inputs_.upload(b, static_cast<int>(kv_.shape().block_size), decode_only, stream_)) graphs_.clear();
        size_activations(T);
        const cuda::DeviceBatch batch = inputs_.batch();
        if (decode_only)
            graphs_.run(cuda::DecodeGraphs::key(T, inputs_.max_blocks()), stream_, [&] { enqueue_layers(T, batch); });
        else
            enqueue_layers(T, batch);
        tokens_ = T;
    }

    ModelConfig c_;
    KvCache& kv_;
    int device_;
    cuda::DeviceGuard guard_;
    cudaStream_t stream_ = nullptr;
    std::unique_ptr<cuda::DeviceWeights> weights_;
    std::unique_ptr<cuda::DeviceOutput> output_;
    DeviceLinear embed_;
    const float* inv_freq_ = nullptr;
    std::vector<MoeLayerOnDevice> layers_;
    cuda::DeviceMoe max_moe_;  // every sparse layer has this shape: sizes the workspace
    bool has_dense_ = false;
    int rot_dim_ = 0;
    float attention_scaling_ = 1.0f;
    size_t layer_kv_bytes_ = 0;
    DeviceBuffer kv_k_, kv_v_;
    cuda::StepInputs inputs_;
    cuda::DecodeGraphs graphs_;
    DeviceBuffer x_, h_, hn_, qkv_, attn_, attn_ws_, gu_, act_, qf_, qs_;
    DeviceBuffer router_logits_, route_experts_, route_weights_, route_order_, route_position_, route_offsets_,
        route_active_, moe_workspace_;
    cuda::GemmScratch gemm_scratch_;
    size_t tokens_ = 0;
};

}  // namespace

std::unique_ptr<ModelRunner> make_qwen3_moe_cuda(const ModelConfig& config, const Qwen3MoeWeights& weights, KvCache& kv,
                                                 int device) {
    return std::make_unique<Qwen3MoeCuda>(config, weights, kv, device);
}

}  // namespace q3n
