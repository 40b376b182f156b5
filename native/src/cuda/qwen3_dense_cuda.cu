// Qwen3 dense on one GPU. The graph is the CPU runner's (model/qwen3_dense.cpp) with neighbouring
// ops fused (residual add + RMSNorm + FP8 quantisation; SwiGLU + quantisation) and q|k|v and
// gate|up stored as one matrix each, so a decode layer is six kernels (attention normalises, rotates
// and caches q|k|v itself there). Decode-only steps replay a CUDA graph captured per (batch size,
// block-table width): at batch 1 the ~220 launches of a step would otherwise cost more than the
// weight stream. Logits stay on the device: sampling and
// log-probabilities run there (cuda/device_sampling.h).
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
#include "cuda/ops.h"
#include "model/qwen3_dense.h"

namespace q3n {

int cuda_device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // no driver: not an error, just no devices
        return 0;
    }
    return n;
}

namespace {

using cuda::DeviceBuffer;
using cuda::DeviceLinear;
using cuda::StackedLinear;

struct LayerOnDevice {
    const float *input_norm = nullptr, *post_norm = nullptr, *q_norm = nullptr, *k_norm = nullptr;
    StackedLinear qkv, gate_up;
    DeviceLinear o, down;
};

bool any_fp8(const Qwen3Weights& w) {
    return std::any_of(w.layers.begin(), w.layers.end(), [](const Qwen3LayerWeights& L) {
        return L.gate.type == WeightType::FP8_E4M3 || L.q.type == WeightType::FP8_E4M3;
    });
}

class Qwen3DenseCuda : public ModelRunner {
public:
    Qwen3DenseCuda(const ModelConfig& c, const Qwen3Weights& w, KvCache& kv, int device)
        : c_(c), kv_(kv), guard_(device) {
        Q3N_CUDA(cudaSetDevice(device));
        Q3N_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
        weights_ = std::make_unique<cuda::DeviceWeights>(stream_, any_fp8(w) && cuda::fp8_gemm_enabled(stream_));
        cuda::DeviceWeights& W = *weights_;
        embed_ = W.upload(w.embed, false);
        const DeviceLinear lm_head = c.tie_word_embeddings ? embed_ : W.upload(w.lm_head, false);
        // This runner's weight stats leave the norm vectors out (the CPU runner counts them).
        auto norm = [&](const std::vector<float>& v) { return W.upload_vector(v, 0.0f, false); };
        const float* final_norm = norm(w.final_norm);
        layers_.resize(c.num_layers);
        for (size_t l = 0; l < c.num_layers; ++l) {
            const Qwen3LayerWeights& L = w.layers[l];
            LayerOnDevice& D = layers_[l];
            D.input_norm = norm(L.input_norm);
            D.post_norm = norm(L.post_attn_norm);
            D.q_norm = norm(L.q_norm);
            D.k_norm = norm(L.k_norm);
            D.qkv = W.upload_stacked({&L.q, &L.k, &L.v});
            D.o = W.upload(L.o);
            D.gate_up = W.upload_stacked({&L.gate, &L.up});
            D.down = W.upload(L.down);
        }
        packed_ok_ = weights_->gemm();
        const int qkv_row = static_cast<int>((c.num_heads + 2 * c.num_kv_heads) * c.head_dim);
        for (const LayerOnDevice& D : layers_)
            packed_ok_ = packed_ok_ && cuda::takes_packed(D.qkv, qkv_row) && cuda::takes_packed(D.o, static_cast<int>(c.hidden_size)) &&
                         cuda::takes_packed(D.gate_up, static_cast<int>(2 * c.intermediate_size)) &&
                         cuda::takes_packed(D.down, static_cast<int>(c.hidden_size));
        output_ = std::make_unique<cuda::DeviceOutput>(c.hidden_size, c.vocab_size, c.rms_norm_eps, lm_head, final_norm);
        const cpu::Rope rope = make_rope(c);
        rot_dim_ = static_cast<int>(rope.rot_dim);
        attention_scaling_ = rope.attention_scaling;
        inv_freq_ = W.upload_array(rope.inv_freq);

        const KvCacheShape& s = kv.shape();
        const size_t elem = s.dtype == KvDtype::F32 ? 4 : 2;
        layer_kv_bytes_ = s.num_blocks * s.block_size * s.kv_heads * s.head_dim * elem;
        kv_k_.resize(layer_kv_bytes_ * s.num_layers);
        kv_v_.resize(layer_kv_bytes_ * s.num_layers);
        size_activations(cuda::kMaxGraphTokens);
        Q3N_CUDA(cudaStreamSynchronize(stream_));
    }

    ~Qwen3DenseCuda() override {
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
        const size_t H = c_.hidden_size, I = c_.intermediate_size, d = c_.head_dim;
        const size_t row = static_cast<size_t>(c_.num_heads + 2 * c_.num_kv_heads) * d;
        const size_t kmax = std::max<size_t>({H, I, size_t(c_.num_heads) * d});
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
        grow(gu_, T * 2 * I * 4);
        grow(act_, T * I * 4);
        grow(qf_, T * kmax * 4);
        grow(qs_, T * ((kmax + 127) / 128) * 4);
        if (weights_->size_gemm_scratch(gemm_scratch_, T, kmax)) moved = true;
        if (moved) graphs_.clear();
    }

    // Prefill steps (past the GEMV's rows) whose FP8 linears all take cuBLASLt's GEMM: the quantising
    // kernels write its packed input themselves (cuda::Fp8Out). H100, Qwen3-4B-FP8, against packing
    // in gemm_fp8: TTFT 1K 15.8 -> 14.2 ms, 8K 150.7 -> 138.2 ms; decode batch 32 +5%.
    bool packed_step(int T) const { return packed_ok_ && T > cuda::kGemvMaxRows; }

    // Where this step's quantising kernel writes FP8 activations of k channels for the next linear.
    cuda::Fp8Out fp8_out(int T, int k) {
        cuda::Fp8Out out;
        if (packed_step(T)) {
            out = cuda::gemm_fp8_packed_out(gemm_scratch_, T, stream_);
            cuda::zero_fp8_padding(out, T, k, stream_);
        } else {
            out.q = qf_.as<float>();
            out.scales = qs_.as<float>();
        }
        return out;
    }

    // A DeviceLinear or a StackedLinear, from this step's activation buffers (cuda::project's rule).
    template <typename Weight>
    void lin(const float* x, int rows, const Weight& w, float* y, int ldy) {
        if (packed_step(rows))
            cuda::project_packed(x, cuda::gemm_fp8_packed_out(gemm_scratch_, rows, stream_), rows, w, y, ldy, gemm_scratch_, stream_);
        else
            cuda::project(x, qf_.as<float>(), qs_.as<float>(), rows, w, y, ldy, gemm_scratch_, stream_);
    }

    // x (+ residual) -> RMSNorm -> what the next Linears read: fp32 into hn_, FP8 into qf_/qs_ or packed.
    // `next`: the weights of the projection after it, whose first bytes L2 fetches meanwhile.
    void norm_for(float* x, const float* residual, const float* weight, int T, bool f32, bool fp8,
                  const StackedLinear& next) {
        cuda::rmsnorm_quantize(x, residual, weight, T, c_.hidden_size, c_.rms_norm_eps, f32 ? hn_.as<float>() : nullptr,
                               fp8 ? fp8_out(T, c_.hidden_size) : cuda::Fp8Out{}, stream_,
                               cuda::l2_prefetch_for(next.parts.front(), T));
    }

    // The layers, from the embedding to the last residual add: kernel launches only, so the same
    // sequence can be captured into a graph.
    void enqueue_layers(int T, const cuda::DeviceBatch& batch) {
        const int H = c_.hidden_size, I = c_.intermediate_size, d = c_.head_dim;
        const int nH = c_.num_heads, row = (nH + 2 * c_.num_kv_heads) * d;
        float *x = x_.as<float>(), *h = h_.as<float>(), *hn = hn_.as<float>(), *qkv = qkv_.as<float>();
        float *attn = attn_.as<float>(), *gu = gu_.as<float>(), *act = act_.as<float>();
        const float scale = 1.0f / std::sqrt(static_cast<float>(d));

        cuda::embed(embed_, inputs_.tokens(), T, x, stream_);
        for (size_t l = 0; l < c_.num_layers; ++l) {
            LayerOnDevice& L = layers_[l];
            const cuda::DeviceKvLayer kv = kv_layer(l);
            // The previous layer's MLP output joins the residual stream inside this norm.
            norm_for(x, l == 0 ? nullptr : h, L.input_norm, T, L.qkv.f32_input, L.qkv.fp8_input, L.qkv);
            lin(hn, T, L.qkv, qkv, row);
            const bool o_fp8 = cuda::is_fp8(L.o);
            if (cuda::attention_decode_fuses(batch, kv, rot_dim_)) {
                // Norm, rotary, cache write and attention in one launch (cuda/attention.cu); its steps are
                // within the GEMV's rows, so the FP8 output is never the packed GEMM input.
                cuda::attention_decode_qk_norm_rope(kv, qkv, nH, L.q_norm, L.k_norm, c_.rms_norm_eps, inv_freq_, rot_dim_,
                                                    attention_scaling_, scale, batch, attn, stream_, attn_ws_.get(),
                                                    attn_ws_.bytes(), o_fp8 ? qf_.as<float>() : nullptr,
                                                    o_fp8 ? qs_.as<float>() : nullptr, cuda::l2_prefetch_for(L.o, T));
            } else {
                cuda::qk_norm_rope_kv_write(qkv, nH, kv, L.q_norm, L.k_norm, c_.rms_norm_eps, inv_freq_, rot_dim_,
                                            attention_scaling_, batch, stream_);
                if (o_fp8 && packed_step(T))
                    cuda::attention_packed(kv, qkv, row, nH, scale, batch, attn, stream_, attn_ws_.get(), attn_ws_.bytes(),
                                           fp8_out(T, nH * d));
                else
                    cuda::attention(kv, qkv, row, nH, scale, batch, attn, stream_, attn_ws_.get(), attn_ws_.bytes(),
                                    o_fp8 ? qf_.as<float>() : nullptr, o_fp8 ? qs_.as<float>() : nullptr);
            }
            lin(attn, T, L.o, h, H);
            norm_for(x, h, L.post_norm, T, L.gate_up.f32_input, L.gate_up.fp8_input, L.gate_up);
            lin(hn, T, L.gate_up, gu, 2 * I);
            const bool down_fp8 = cuda::is_fp8(L.down);
            cuda::silu_mul_quantize(gu, T, I, down_fp8 ? nullptr : act, down_fp8 ? fp8_out(T, I) : cuda::Fp8Out{}, stream_,
                                    cuda::l2_prefetch_for(L.down, T));
            lin(act, T, L.down, h, H);
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
    cuda::DeviceGuard guard_;
    cudaStream_t stream_ = nullptr;
    std::unique_ptr<cuda::DeviceWeights> weights_;
    std::unique_ptr<cuda::DeviceOutput> output_;
    DeviceLinear embed_;
    const float* inv_freq_ = nullptr;
    std::vector<LayerOnDevice> layers_;
    int rot_dim_ = 0;
    float attention_scaling_ = 1.0f;
    size_t layer_kv_bytes_ = 0;
    DeviceBuffer kv_k_, kv_v_;
    cuda::StepInputs inputs_;
    cuda::DecodeGraphs graphs_;
    DeviceBuffer x_, h_, hn_, qkv_, attn_, attn_ws_, gu_, act_, qf_, qs_;
    cuda::GemmScratch gemm_scratch_;
    size_t tokens_ = 0;
    bool packed_ok_ = false;
};

}  // namespace

std::unique_ptr<ModelRunner> make_qwen3_dense_cuda(const ModelConfig& config, const Qwen3Weights& weights, KvCache& kv,
                                                   int device) {
    return std::make_unique<Qwen3DenseCuda>(config, weights, kv, device);
}

}  // namespace q3n
