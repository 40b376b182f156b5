// Qwen3-Next on one GPU (shared/spec 3): the CPU runner's graph (model/qwen3_next.cpp), op for op,
// with neighbouring steps fused. Per layer:
//   Gated DeltaNet: rmsnorm_quantize (residual add + 1+w norm + FP8), linear(in_proj_qkvz | in_proj_ba),
//     gdn_split_gates, causal_conv1d_silu (per-sequence conv state; at decode both in one
//     gdn_split_conv launch), gated_delta_rule_decode (decode steps) or gated_delta_rule_chunked
//     (any step with a sequence of more than one token), both L2-normalising q and k on the fly,
//     rmsnorm_gated_quantize, linear(out_proj).
//   Gated attention: rmsnorm_quantize, linear(q_proj | k | v), qk_norm_rope_kv_write_gated (partial
//     rotary; q read from between its gates), attention (paged, head_dim up to 256),
//     sigmoid_gate_quantize, linear(o_proj).
//   MoE: rmsnorm_quantize, linear(router | shared_expert_gate) (one stacked matrix at decode sizes),
//     moe_forward: at decode sizes one persistent launch that routes and runs the routed and the
//     sigmoid-gated shared experts (moe_fp8_decode_fused.cu), else moe_route and moe_experts.
// Zero-centred norms need no kernel of their own: 1 + w is formed at upload in fp32, which is the
// factor cpu::rmsnorm_1p multiplies by, so rmsnorm_quantize's w * x_hat gives the same product.
//
// Recurrent state: each sequence owns one device allocation (conv then delta-rule state of every GDN
// layer, fp32), keyed by SequenceSpan::id, zeroed when the sequence starts at position 0 and recycled
// through a free list on release_sequence. Kernels reach the states through per-step pointer tables
// at fixed device addresses ([layer][conv, ssm][sequence]), so a decode graph captured once stays
// valid for any sequences that step with the same batch size.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <unordered_map>
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
#include "model/qwen3_next.h"

namespace q3n {
namespace {

using cuda::DeviceBuffer;
using cuda::DeviceLinear;
using cuda::StackedLinear;

struct NextAttentionOnDevice {
    const float *q_norm = nullptr, *k_norm = nullptr;  // 1 + w
    StackedLinear qgkv;                                // q_proj (query and gate per head) | k | v
    DeviceLinear o;
};

struct NextGdnOnDevice {
    StackedLinear in_proj;  // in_proj_qkvz | in_proj_ba
    const float *conv = nullptr, *A_log = nullptr, *dt_bias = nullptr, *norm = nullptr;
    DeviceLinear out;
};

struct NextMlpOnDevice {
    bool sparse = true;
    cuda::DeviceMoeBlock moe;  // sparse: routed experts, shared expert and its gate
    StackedLinear gate_up;     // dense (mlp_only_layers)
    DeviceLinear down;
};

struct NextLayerOnDevice {
    NextLayerKind kind = NextLayerKind::LinearAttention;
    const float *input_norm = nullptr, *post_norm = nullptr;  // 1 + w
    NextAttentionOnDevice attn;
    NextGdnOnDevice gdn;
    NextMlpOnDevice mlp;
    size_t slot = 0;  // KV slot (full attention) or GDN state index
};

bool any_fp8(const Qwen3NextWeights& w) {
    for (const auto& L : w.layers)
        if (L.attn.q.type == WeightType::FP8_E4M3 || L.gdn.qkvz.type == WeightType::FP8_E4M3 ||
            (!L.mlp.experts.empty() && L.mlp.experts[0].gate.type == WeightType::FP8_E4M3))
            return true;
    return false;
}

// Every tensor of a (possibly partial, MTP) layer is present.
bool complete(const NextLayerWeights& L) {
    auto has = [](const Linear& l) { return l.data != nullptr; };
    if (L.input_norm.empty() || L.post_attn_norm.empty()) return false;
    if (L.kind == NextLayerKind::FullAttention) {
        if (!has(L.attn.q) || !has(L.attn.k) || !has(L.attn.v) || !has(L.attn.o) || L.attn.q_norm.empty()) return false;
    } else if (!has(L.gdn.qkvz) || !has(L.gdn.ba) || !has(L.gdn.out)) {
        return false;
    }
    const NextMlpWeights& M = L.mlp;
    if (!M.sparse) return has(M.dense.gate) && has(M.dense.up) && has(M.dense.down);
    if (!has(M.router) || !has(M.shared_gate) || M.experts.empty() || !has(M.shared.gate)) return false;
    for (const auto& e : M.experts)
        if (!has(e.gate) || !has(e.up) || !has(e.down)) return false;
    return true;
}

// Whether a GDN layer's in_proj_ba runs on a second stream beside in_proj_qkvz at decode sizes (on
// unless Q3N_NEXT_OVERLAP=0, for measuring what it gains; the results are the same).
bool ba_beside_qkvz() {
    static const bool on = [] {
        const char* v = std::getenv("Q3N_NEXT_OVERLAP");
        return !(v && std::strcmp(v, "0") == 0);
    }();
    return on;
}

// Whether decode steps split in_proj_qkvz and run the causal conv in one launch (gdn_split_conv; on
// unless Q3N_NEXT_SPLIT_CONV=0, for measuring what it gains; the results are the same bits).
bool split_conv_fused() {
    static const bool on = [] {
        const char* v = std::getenv("Q3N_NEXT_SPLIT_CONV");
        return !(v && std::strcmp(v, "0") == 0);
    }();
    return on;
}

// Whether one-sequence decode steps run everything between a GDN layer's in_proj and out_proj in one
// launch (gdn_decode_fused, where its shape limits allow; on unless Q3N_NEXT_GDN_FUSED=0, for
// measuring what it gains; the results are the same bits).
bool gdn_step_fused() {
    static const bool on = [] {
        const char* v = std::getenv("Q3N_NEXT_GDN_FUSED");
        return !(v && std::strcmp(v, "0") == 0);
    }();
    return on;
}

class Qwen3NextCuda : public Qwen3NextRunner {
public:
    Qwen3NextCuda(const ModelConfig& c, const Qwen3NextWeights& w, KvCache& kv, int device)
        : c_(c), kv_(kv), device_(device), guard_(device), dims_(c.gdn_dims()) {
        Q3N_CUDA(cudaSetDevice(device));
        Q3N_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
        Q3N_CUDA(cudaStreamCreateWithFlags(&side_, cudaStreamNonBlocking));
        Q3N_CUDA(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming));
        Q3N_CUDA(cudaEventCreateWithFlags(&join_, cudaEventDisableTiming));
        weights_ = std::make_unique<cuda::DeviceWeights>(stream_, any_fp8(w) && cuda::fp8_gemm_enabled(stream_));
        cuda::DeviceWeights& W = *weights_;
        embed_ = W.upload(w.embed, false);
        const DeviceLinear lm_head = c.tie_word_embeddings ? embed_ : W.upload(w.lm_head, false);
        const float* final_norm = W.upload_vector(w.final_norm, 1.0f);
        size_t full = 0, lin = 0;
        layers_.resize(c.num_layers);
        for (size_t l = 0; l < c.num_layers; ++l) {
            upload_layer(W, w.layers[l], layers_[l]);
            layers_[l].slot = layers_[l].kind == NextLayerKind::FullAttention ? full++ : lin++;
        }
        gdn_layers_ = lin;
        full_layers_ = full;
        // MTP (spec 3.7): kept on the device for a future draft step, outside the weight stats like
        // the CPU runner's (nothing runs it). Only whole pieces are uploaded.
        if (w.mtp.tensors > 0) {
            mtp_weights_ = std::make_unique<cuda::DeviceWeights>(stream_, false);
            for (const auto* v : {&w.mtp.pre_fc_norm_embedding, &w.mtp.pre_fc_norm_hidden, &w.mtp.norm})
                if (!v->empty()) mtp_.norms.push_back(mtp_weights_->upload_vector(*v, 1.0f));
            if (w.mtp.fc.data) mtp_.fc = mtp_weights_->upload(w.mtp.fc, false);
            for (const auto& L : w.mtp.layers)
                if (L.present && complete(L.layer)) {
                    mtp_.layers.emplace_back();
                    upload_layer(*mtp_weights_, L.layer, mtp_.layers.back());
                }
        }
        output_ = std::make_unique<cuda::DeviceOutput>(c.hidden_size, c.vocab_size, c.rms_norm_eps, lm_head, final_norm);
        const cpu::Rope rope = make_rope(c);
        rot_dim_ = static_cast<int>(rope.rot_dim);
        attention_scaling_ = rope.attention_scaling;
        inv_freq_ = W.upload_array(rope.inv_freq);

        const KvCacheShape& s = kv.shape();
        if (full > s.num_layers) fail(Q3N_ERR_INTERNAL, "the KV cache has fewer layers than the model's full-attention layers");
        const size_t elem = s.dtype == KvDtype::F32 ? 4 : 2;
        layer_kv_bytes_ = s.num_blocks * s.block_size * s.kv_heads * s.head_dim * elem;
        kv_k_.resize(std::max<size_t>(layer_kv_bytes_ * full, 4));
        kv_v_.resize(std::max<size_t>(layer_kv_bytes_ * full, 4));

        conv_stride_ = dims_.conv_dim() * (c.linear_conv_kernel_dim - 1);
        ssm_stride_ = dims_.nv * dims_.dk * dims_.dv;
        size_activations(cuda::kMaxGraphTokens);
        Q3N_CUDA(cudaStreamSynchronize(stream_));
    }

    ~Qwen3NextCuda() override {
        graphs_.clear();
        if (fork_) cudaEventDestroy(fork_);
        if (join_) cudaEventDestroy(join_);
        if (side_) cudaStreamDestroy(side_);
        if (stream_) cudaStreamDestroy(stream_);
    }

    bool has_recurrent_state() const override { return true; }
    void release_sequence(uint64_t id) override {
        auto it = states_.find(id);
        if (it == states_.end()) return;
        // Kept for the next sequence rather than freed: cudaFree would wait for the whole device, and
        // stream order already keeps a reuse behind the work that still reads the old contents.
        free_.push_back(std::move(it->second));
        states_.erase(it);
    }
    size_t live_sequences() const override { return states_.size(); }
    size_t state_bytes_per_sequence() const override { return gdn_layers_ * (conv_stride_ + ssm_stride_) * sizeof(float); }

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
    struct MtpOnDevice {
        std::vector<const float*> norms;
        DeviceLinear fc;
        std::vector<NextLayerOnDevice> layers;
    };

    void upload_layer(cuda::DeviceWeights& W, const NextLayerWeights& L, NextLayerOnDevice& D) {
        D.kind = L.kind;
        D.input_norm = W.upload_vector(L.input_norm, 1.0f);
        D.post_norm = W.upload_vector(L.post_attn_norm, 1.0f);
        if (L.kind == NextLayerKind::FullAttention) {
            D.attn.q_norm = W.upload_vector(L.attn.q_norm, 1.0f);
            D.attn.k_norm = W.upload_vector(L.attn.k_norm, 1.0f);
            D.attn.qgkv = W.upload_stacked({&L.attn.q, &L.attn.k, &L.attn.v});
            D.attn.o = W.upload(L.attn.o);
        } else {
            D.gdn.in_proj = W.upload_stacked({&L.gdn.qkvz, &L.gdn.ba});
            D.gdn.conv = W.upload_vector(L.gdn.conv);
            D.gdn.A_log = W.upload_vector(L.gdn.A_log);
            D.gdn.dt_bias = W.upload_vector(L.gdn.dt_bias);
            D.gdn.norm = W.upload_vector(L.gdn.norm);
            D.gdn.out = W.upload(L.gdn.out);
        }
        const NextMlpWeights& M = L.mlp;
        D.mlp.sparse = M.sparse;
        if (M.sparse) {
            D.mlp.moe = W.upload_moe(M.router, M.experts, c_.num_experts_per_tok, &M.shared, &M.shared_gate);
            if (&W == weights_.get()) max_moe_ = D.mlp.moe.moe;
        } else {
            D.mlp.gate_up = W.upload_stacked({&M.dense.gate, &M.dense.up});
            D.mlp.down = W.upload(M.dense.down);
            has_dense_ = true;
        }
    }

    cuda::DeviceKvLayer kv_layer(size_t slot) const {
        const KvCacheShape& s = kv_.shape();
        return cuda::DeviceKvLayer{s.dtype, kv_k_.as<uint8_t>() + slot * layer_kv_bytes_,
                                   kv_v_.as<uint8_t>() + slot * layer_kv_bytes_, static_cast<int>(s.block_size),
                                   static_cast<int>(s.kv_heads), static_cast<int>(s.head_dim)};
    }

    void size_activations(int tokens) {
        const size_t T = static_cast<size_t>(std::max(tokens, 1));
        const GdnDims& g = dims_;
        const size_t H = c_.hidden_size, d = c_.head_dim, nH = c_.num_heads, nKV = c_.num_kv_heads;
        const size_t I = has_dense_ ? c_.intermediate_size : 0;
        const size_t E = c_.num_experts, k = c_.num_experts_per_tok;
        const size_t kmax = std::max<size_t>({H, nH * d, g.value_dim(), I});
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
        if (full_layers_) {
            grow(qgkv_, T * (2 * nH + 2 * nKV) * d * 4);
            grow(qkv_, T * (nH + 2 * nKV) * d * 4);
            grow(attn_, T * nH * d * 4);
            grow(attn_ws_, cuda::attention_workspace_bytes(static_cast<int>(T), nH, nKV, d));
        }
        if (gdn_layers_) {
            grow(proj_, T * (g.qkvz_width() + g.ba_width()) * 4);
            grow(conv_, T * g.conv_dim() * 4);
            grow(z_, T * g.value_dim() * 4);
            grow(beta_, T * g.nv * 4);
            grow(decay_, T * g.nv * 4);
            grow(core_, T * g.value_dim() * 4);
        }
        if (I) {
            grow(gu_, T * 2 * I * 4);
            grow(act_, T * I * 4);
        }
        grow(qf_, T * kmax * 4);
        grow(qs_, T * ((kmax + 127) / 128) * 4);
        if (E) {
            grow(router_logits_, T * (E + 1) * 4);  // room for the stacked gate's column
            grow(shared_gate_, T * 4);
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

    void norm_for(float* x, const float* residual, const float* weight, int T, bool f32, bool fp8) {
        cuda::rmsnorm_quantize(x, residual, weight, T, c_.hidden_size, c_.rms_norm_eps, f32 ? hn_.as<float>() : nullptr,
                               fp8 ? qf_.as<float>() : nullptr, fp8 ? qs_.as<float>() : nullptr, stream_);
    }

    cuda::MoeRouting routing() const {
        return cuda::MoeRouting{route_experts_.as<int32_t>(), route_weights_.as<float>(), route_offsets_.as<int32_t>(),
                                route_order_.as<int32_t>(), route_position_.as<int32_t>(), route_active_.as<int32_t>()};
    }

    // This step's state pointers of GDN layer `index` (conv or delta rule), one per sequence.
    float* const* state_table(size_t index, int kind) const {
        return state_ptrs_.as<float*>() + (2 * index + kind) * static_cast<size_t>(num_seqs_);
    }

    // Spec 3.3: h <- o_proj(attention(rope(norm(q)), rope(norm(k)), v) * sigmoid(gate)).
    void enqueue_attention(const NextLayerOnDevice& L, int T, const cuda::DeviceBatch& batch) {
        const int d = c_.head_dim, nH = c_.num_heads, nKV = c_.num_kv_heads;
        const int wide = (2 * nH + 2 * nKV) * d, row = (nH + 2 * nKV) * d;
        const NextAttentionOnDevice& A = L.attn;
        const cuda::DeviceKvLayer kv = kv_layer(L.slot);
        lin(hn_.as<float>(), T, A.qgkv, qgkv_.as<float>(), wide);
        cuda::qk_norm_rope_kv_write_gated(qgkv_.as<float>(), wide, qkv_.as<float>(), row, nH, kv, A.q_norm, A.k_norm,
                                          c_.rms_norm_eps, inv_freq_, rot_dim_, attention_scaling_, batch, stream_);
        cuda::attention(kv, qkv_.as<float>(), row, nH, 1.0f / std::sqrt(static_cast<float>(d)), batch, attn_.as<float>(),
                        stream_, attn_ws_.get(), attn_ws_.bytes());
        const bool fp8 = cuda::is_fp8(A.o);
        cuda::sigmoid_gate_quantize(attn_.as<float>(), qgkv_.as<float>() + d, wide, T, nH, d, fp8 ? qf_.as<float>() : nullptr,
                                    fp8 ? qs_.as<float>() : nullptr, stream_);
        lin(attn_.as<float>(), T, A.o, h_.as<float>(), c_.hidden_size);
    }

    // Spec 3.4 over the packed sequences, each from its own state.
    void enqueue_gdn(const NextLayerOnDevice& L, int T, bool decode) {
        const GdnDims& g = dims_;
        const NextGdnOnDevice& G = L.gdn;
        const int conv = static_cast<int>(g.conv_dim()), wide = static_cast<int>(g.qkvz_width() + g.ba_width());
        const cuda::GdnShape shape{static_cast<int>(g.nk), static_cast<int>(g.nv), static_cast<int>(g.dk),
                                   static_cast<int>(g.dv)};
        float* proj = proj_.as<float>();
        if (T <= cuda::kGemvMaxRows && G.in_proj.parts.size() == 2 && ba_beside_qkvz()) {
            // in_proj_ba (BF16, 2 x nv rows) is a latency-bound launch of its own (H100: 4.8 us for 256 KB);
            // on a second stream it runs beside qkvz's FP8 GEMV instead of after it. Decode sizes only:
            // there both are GEMVs, which use no shared scratch.
            Q3N_CUDA(cudaEventRecord(fork_, stream_));
            Q3N_CUDA(cudaStreamWaitEvent(side_, fork_, 0));
            cuda::project(hn_.as<float>(), qf_.as<float>(), qs_.as<float>(), T, G.in_proj.parts[1], proj + G.in_proj.offsets[1],
                          wide, gemm_scratch_, side_);
            Q3N_CUDA(cudaEventRecord(join_, side_));
            cuda::project(hn_.as<float>(), qf_.as<float>(), qs_.as<float>(), T, G.in_proj.parts[0], proj + G.in_proj.offsets[0],
                          wide, gemm_scratch_, stream_);
            Q3N_CUDA(cudaStreamWaitEvent(stream_, join_, 0));
        } else {
            lin(hn_.as<float>(), T, G.in_proj, proj, wide);
        }
        const bool fp8 = cuda::is_fp8(G.out);
        const int taps = static_cast<int>(c_.linear_conv_kernel_dim);
        const float scale = 1.0f / std::sqrt(static_cast<float>(g.dk));
        // One sequence only: with more, the fused launch's blocks (128 registers a thread, clusters of
        // 8) come in several waves, each paying the whole chain, and it measured slower than the three
        // launches (H100, Qwen3-Next shapes, alone: 2 sequences 11.4 against 9.4 us, 8: 33 against 21).
        if (decode && num_seqs_ == 1 && gdn_step_fused() && cuda::gdn_decode_fusable(shape, taps, fp8)) {
            cuda::gdn_decode_fused(proj, wide, proj + g.qkvz_width(), wide, shape, G.A_log, G.dt_bias, G.conv, taps, G.norm,
                                   c_.rms_norm_eps, 1e-6f, scale, seq_starts_.as<int32_t>(), num_seqs_,
                                   state_table(L.slot, 0), state_table(L.slot, 1), core_.as<float>(),
                                   fp8 ? qf_.as<float>() : nullptr, fp8 ? qs_.as<float>() : nullptr, stream_);
            lin(core_.as<float>(), T, G.out, h_.as<float>(), c_.hidden_size);
            return;
        }
        if (decode && split_conv_fused()) {
            cuda::gdn_split_conv(proj, wide, proj + g.qkvz_width(), wide, shape, G.A_log, G.dt_bias, G.conv, taps,
                                 seq_starts_.as<int32_t>(), num_seqs_,
                                 state_table(L.slot, 0), conv_.as<float>(), z_.as<float>(), beta_.as<float>(),
                                 decay_.as<float>(), stream_);
        } else {
            cuda::gdn_split_gates(proj, wide, proj + g.qkvz_width(), wide, T, shape, G.A_log, G.dt_bias, conv_.as<float>(),
                                  z_.as<float>(), beta_.as<float>(), decay_.as<float>(), stream_);
            cuda::causal_conv1d_silu(conv_.as<float>(), conv, G.conv, taps,
                                     seq_starts_.as<int32_t>(), num_seqs_, state_table(L.slot, 0), conv_.as<float>(),
                                     stream_);
        }
        const float* qkv = conv_.as<float>();
        const int key_dim = static_cast<int>(g.key_dim());
        const cuda::GdnInputs in{qkv,        conv, qkv + key_dim, conv, qkv + 2 * key_dim, conv, decay_.as<float>(),
                                 beta_.as<float>(), true, 1e-6f};
        if (decode)
            cuda::gated_delta_rule_decode(shape, in, scale, seq_starts_.as<int32_t>(), num_seqs_, state_table(L.slot, 1),
                                          core_.as<float>(), stream_);
        else
            cuda::gated_delta_rule_chunked(shape, in, scale, seq_starts_.as<int32_t>(), num_seqs_, state_table(L.slot, 1),
                                           core_.as<float>(), stream_);
        cuda::rmsnorm_gated_quantize(core_.as<float>(), z_.as<float>(), G.norm, T, shape.nv, shape.dv, c_.rms_norm_eps,
                                     core_.as<float>(), fp8 ? qf_.as<float>() : nullptr, fp8 ? qs_.as<float>() : nullptr,
                                     stream_);
        lin(core_.as<float>(), T, G.out, h_.as<float>(), c_.hidden_size);
    }

    // Spec 3.6: h <- routed(hn) + sigmoid(hn . w_sg) * SwiGLU_shared(hn), or the dense SwiGLU.
    void enqueue_mlp(const NextLayerOnDevice& L, int T) {
        const NextMlpOnDevice& M = L.mlp;
        float* hn = hn_.as<float>();
        if (M.sparse) {
            const cuda::DeviceMoe& m = M.moe.moe;
            const int E = m.num_experts;
            float* logits = router_logits_.as<float>();
            // Up to kGemvMaxRows rows every linear is the GEMV, which computes each output row on its
            // own: the stacked matrix gives the router's and the gate's values bit for bit, in one
            // launch instead of two. Past it the router goes to cuBLASLt, which needs 16-byte row
            // strides (E + 1 floats is not one when E is a multiple of 4, as 512 is) and picks its
            // algorithm by shape, so the two stay apart there and keep their results.
            if (M.moe.router_gate.data && T <= cuda::kGemvMaxRows) {
                lin(hn, T, M.moe.router_gate, logits, E + 1);
                cuda::moe_forward(logits, E + 1, T, m, c_.norm_topk_prob, routing(), hn, logits + E, h_.as<float>(),
                                  moe_workspace_.get(), stream_, E + 1);
                return;
            }
            lin(hn, T, M.moe.router, logits, E);
            lin(hn, T, M.moe.shared_gate, shared_gate_.as<float>(), 1);
            cuda::moe_forward(logits, E, T, m, c_.norm_topk_prob, routing(), hn, shared_gate_.as<float>(), h_.as<float>(),
                              moe_workspace_.get(), stream_);
            return;
        }
        const int I = c_.intermediate_size;
        lin(hn, T, M.gate_up, gu_.as<float>(), 2 * I);
        const bool down_fp8 = cuda::is_fp8(M.down);
        cuda::silu_mul_quantize(gu_.as<float>(), T, I, down_fp8 ? nullptr : act_.as<float>(),
                                down_fp8 ? qf_.as<float>() : nullptr, down_fp8 ? qs_.as<float>() : nullptr, stream_);
        lin(act_.as<float>(), T, M.down, h_.as<float>(), c_.hidden_size);
    }

    void enqueue_layers(int T, const cuda::DeviceBatch& batch, bool decode) {
        float *x = x_.as<float>(), *h = h_.as<float>();
        cuda::embed(embed_, inputs_.tokens(), T, x, stream_);
        for (size_t l = 0; l < c_.num_layers; ++l) {
            const NextLayerOnDevice& L = layers_[l];
            const bool full = L.kind == NextLayerKind::FullAttention;
            const StackedLinear& first = full ? L.attn.qgkv : L.gdn.in_proj;
            // The previous layer's MLP output joins the residual stream inside this norm.
            norm_for(x, l == 0 ? nullptr : h, L.input_norm, T, first.f32_input, first.fp8_input);
            if (full)
                enqueue_attention(L, T, batch);
            else
                enqueue_gdn(L, T, decode);
            // Router and experts read fp32 (FP8 experts quantise inside moe_experts); a dense MLP
            // reads what its gate|up needs.
            const bool dense = !L.mlp.sparse;
            norm_for(x, h, L.post_norm, T, !dense || L.mlp.gate_up.f32_input, dense && L.mlp.gate_up.fp8_input);
            enqueue_mlp(L, T);
        }
        cuda::add_inplace(x, h, T * c_.hidden_size, stream_);
    }

    // Checks the spans tile the batch and finds (or starts) each sequence's state, before any
    // launch, so a malformed batch changes no state. Then refreshes the device pointer tables.
    // Returns true when a device buffer moved.
    bool bind_sequences(const StepBatch& b) {
        const size_t T = b.tokens.size(), n = b.sequences.size();
        seq_starts_host_.assign(1, 0);
        for (size_t s = 0; s < n; ++s) {
            const SequenceSpan& span = b.sequences[s];
            if (span.first_token != static_cast<size_t>(seq_starts_host_.back()) || span.count == 0)
                fail(Q3N_ERR_INTERNAL, "Qwen3-Next needs the batch's sequence spans in order, without gaps");
            seq_starts_host_.push_back(static_cast<int32_t>(span.first_token + span.count));
            if (!span.starts_at_zero && !states_.count(span.id))
                fail(Q3N_ERR_INTERNAL, "sequence " + std::to_string(span.id) +
                                           " continues at a later position but its recurrent state is gone");
        }
        if (static_cast<size_t>(seq_starts_host_.back()) != T)
            fail(Q3N_ERR_INTERNAL, "the sequence spans do not cover the batch's tokens");

        const size_t floats = gdn_layers_ * (conv_stride_ + ssm_stride_);
        live_.resize(n);
        for (size_t s = 0; s < n; ++s) {
            const SequenceSpan& span = b.sequences[s];
            auto it = states_.find(span.id);
            if (it == states_.end()) {
                DeviceBuffer buf;
                if (!free_.empty()) {
                    buf = std::move(free_.back());
                    free_.pop_back();
                } else {
                    buf.resize(std::max<size_t>(floats * sizeof(float), 4));
                }
                it = states_.emplace(span.id, std::move(buf)).first;
            }
            // Spec 3.4 step 5: a sequence at position 0 starts from the zero state, also when its id
            // had an earlier life (truncation to 0).
            if (span.starts_at_zero && floats)
                Q3N_CUDA(cudaMemsetAsync(it->second.get(), 0, floats * sizeof(float), stream_));
            live_[s] = it->second.as<float>();
        }

        num_seqs_ = static_cast<int>(n);
        state_ptrs_host_.resize(2 * gdn_layers_ * n);
        for (size_t i = 0; i < gdn_layers_; ++i)
            for (size_t s = 0; s < n; ++s) {
                state_ptrs_host_[(2 * i) * n + s] = live_[s] + i * conv_stride_;
                state_ptrs_host_[(2 * i + 1) * n + s] = live_[s] + gdn_layers_ * conv_stride_ + i * ssm_stride_;
            }
        bool moved = false;
        auto grow = [&](DeviceBuffer& buf, size_t bytes) {
            if (bytes > buf.bytes()) {
                buf.resize(std::max(bytes, buf.bytes() * 2));
                moved = true;
            }
        };
        const size_t cap = std::max<size_t>(n, cuda::kMaxGraphTokens);
        grow(seq_starts_, (cap + 1) * 4);
        grow(state_ptrs_, std::max<size_t>(2 * gdn_layers_ * cap, 1) * sizeof(float*));
        Q3N_CUDA(cudaMemcpyAsync(seq_starts_.get(), seq_starts_host_.data(), (n + 1) * 4, cudaMemcpyHostToDevice, stream_));
        if (!state_ptrs_host_.empty())
            Q3N_CUDA(cudaMemcpyAsync(state_ptrs_.get(), state_ptrs_host_.data(), state_ptrs_host_.size() * sizeof(float*),
                                     cudaMemcpyHostToDevice, stream_));
        return moved;
    }

    void run_forward(const StepBatch& b) {
        const int T = static_cast<int>(b.tokens.size());
        bool moved = bind_sequences(b);
        const bool decode_only = cuda::is_decode_only(b);
        moved = inputs_.upload(b, static_cast<int>(kv_.shape().block_size), decode_only, stream_) || moved;
        if (moved) graphs_.clear();
        size_activations(T);
        const cuda::DeviceBatch batch = inputs_.batch();
        if (decode_only)
            graphs_.run(cuda::DecodeGraphs::key(T, inputs_.max_blocks()), stream_,
                        [&] { enqueue_layers(T, batch, true); });
        else
            enqueue_layers(T, batch, false);
        tokens_ = T;
    }

    ModelConfig c_;
    KvCache& kv_;
    int device_;
    cuda::DeviceGuard guard_;
    GdnDims dims_;
    cudaStream_t stream_ = nullptr;
    cudaStream_t side_ = nullptr;            // in_proj_ba beside in_proj_qkvz at decode sizes
    cudaEvent_t fork_ = nullptr, join_ = nullptr;
    std::unique_ptr<cuda::DeviceWeights> weights_, mtp_weights_;
    std::unique_ptr<cuda::DeviceOutput> output_;
    DeviceLinear embed_;
    const float* inv_freq_ = nullptr;
    std::vector<NextLayerOnDevice> layers_;
    MtpOnDevice mtp_;
    cuda::DeviceMoe max_moe_;
    bool has_dense_ = false;
    size_t gdn_layers_ = 0, full_layers_ = 0, conv_stride_ = 0, ssm_stride_ = 0;
    int rot_dim_ = 0;
    float attention_scaling_ = 1.0f;
    size_t layer_kv_bytes_ = 0;
    DeviceBuffer kv_k_, kv_v_;

    std::unordered_map<uint64_t, DeviceBuffer> states_;
    std::vector<DeviceBuffer> free_;
    std::vector<float*> live_, state_ptrs_host_;
    std::vector<int32_t> seq_starts_host_;
    DeviceBuffer seq_starts_, state_ptrs_;
    int num_seqs_ = 0;

    cuda::StepInputs inputs_;
    cuda::DecodeGraphs graphs_;
    DeviceBuffer x_, h_, hn_, qgkv_, qkv_, attn_, attn_ws_, proj_, conv_, z_, beta_, decay_, core_, gu_, act_, qf_, qs_;
    DeviceBuffer router_logits_, shared_gate_, route_experts_, route_weights_, route_order_, route_position_,
        route_offsets_, route_active_, moe_workspace_;
    cuda::GemmScratch gemm_scratch_;
    size_t tokens_ = 0;
};

}  // namespace

std::unique_ptr<Qwen3NextRunner> make_qwen3_next_cuda(const ModelConfig& config, const Qwen3NextWeights& weights,
                                                      KvCache& kv, int device) {
    return std::make_unique<Qwen3NextCuda>(config, weights, kv, device);
}

}  // namespace q3n
