#include "model/qwen3_moe.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "core/error.h"
#include "model/qwen3_dense.h"

namespace q3n {

Qwen3MoeWeights load_qwen3_moe_weights(const ModelConfig& c, WeightSource& src, const std::function<bool(float)>& progress,
                                       const std::string& prefix) {
    if (c.num_experts == 0 || c.num_experts_per_tok == 0 || c.moe_intermediate_size == 0)
        fail(Q3N_ERR_BAD_CONFIG, "the MoE text model needs num_experts, num_experts_per_tok and moe_intermediate_size");
    const size_t H = c.hidden_size, I = c.intermediate_size, Ie = c.moe_intermediate_size, E = c.num_experts;
    Qwen3MoeWeights w;
    w.embed = src.table(prefix + "embed_tokens.weight", c.vocab_size, H);
    w.layers.resize(c.num_layers);
    for (size_t l = 0; l < c.num_layers; ++l) {
        const std::string p = prefix + "layers." + std::to_string(l) + ".mlp.";
        Qwen3MoeLayerWeights& L = w.layers[l];
        load_qwen3_attention(c, src, l, L.common, prefix);
        L.sparse = c.is_moe_layer(l);
        if (L.sparse) {
            // The router follows the same dtype rules as every Linear: the released FP8 checkpoints
            // list it in modules_to_not_convert, so it arrives (and is made, for dummy weights) BF16.
            L.router = src.linear(p + "gate", E, H);
            L.experts.resize(E);
            const std::string gate_up = p + "experts.gate_up_proj", down = p + "experts.down_proj";
            if (src.has(gate_up)) {
                // Gate columns come first, then up (spec 4.3); both transposed to [I_e, H] views.
                for (size_t e = 0; e < E; ++e) {
                    L.experts[e].gate = src.fused_expert_linear(gate_up, E, H, 2 * Ie, e, 0, Ie);
                    L.experts[e].up = src.fused_expert_linear(gate_up, E, H, 2 * Ie, e, Ie, Ie);
                    L.experts[e].down = src.fused_expert_linear(down, E, Ie, H, e, 0, H);
                }
            } else {
                for (size_t e = 0; e < E; ++e) {
                    const std::string q = p + "experts." + std::to_string(e) + ".";
                    L.experts[e].gate = src.linear(q + "gate_proj", Ie, H);
                    L.experts[e].up = src.linear(q + "up_proj", Ie, H);
                    L.experts[e].down = src.linear(q + "down_proj", H, Ie);
                }
            }
        } else {
            L.common.gate = src.linear(p + "gate_proj", I, H);
            L.common.up = src.linear(p + "up_proj", I, H);
            L.common.down = src.linear(p + "down_proj", H, I);
        }
        if (progress && progress(static_cast<float>(l + 1) / static_cast<float>(c.num_layers + 1)))
            fail(Q3N_ERR_INVALID_STATE, "loading was cancelled by the progress callback");
    }
    w.final_norm = src.vector(prefix + "norm.weight", H);
    w.lm_head = c.tie_word_embeddings ? w.embed : src.linear("lm_head", c.vocab_size, H);
    return w;
}

namespace {

class Qwen3MoeCpu : public ModelRunner {
public:
    Qwen3MoeCpu(const ModelConfig& config, Qwen3MoeWeights weights, KvCache& kv, ThreadPool& pool)
        : c_(config), w_(std::move(weights)), kv_(kv), pool_(pool), rope_(make_rope(config)),
          deepstack_taps_(config.vision ? config.vision->deepstack_visual_indexes.size() : 0) {
        blocks_.resize(w_.layers.size());
        for (size_t l = 0; l < w_.layers.size(); ++l) {
            const Qwen3MoeLayerWeights& L = w_.layers[l];
            if (!L.sparse) continue;
            blocks_[l].router = &L.router;
            blocks_[l].experts = L.experts.data();
            blocks_[l].num_experts = L.experts.size();
            blocks_[l].top_k = c_.num_experts_per_tok;
            blocks_[l].renormalize = c_.norm_topk_prob;
        }
    }

    WeightStats weight_stats() const override {
        WeightStats s;
        auto add = [&](const Linear& l) {
            s.parameter_count += l.out * l.in;
            s.bytes += l.bytes();
            s.fp8 = s.fp8 || l.type == WeightType::FP8_E4M3;
        };
        add(w_.embed);
        if (!c_.tie_word_embeddings) add(w_.lm_head);
        for (const auto& L : w_.layers) {
            const Qwen3LayerWeights& C = L.common;
            for (const Linear* l : {&C.q, &C.k, &C.v, &C.o}) add(*l);
            if (L.sparse) {
                add(L.router);
                for (const auto& e : L.experts)
                    for (const Linear* l : {&e.gate, &e.up, &e.down}) add(*l);
            } else {
                for (const Linear* l : {&C.gate, &C.up, &C.down}) add(*l);
            }
            const size_t norms = C.input_norm.size() + C.post_attn_norm.size() + C.q_norm.size() + C.k_norm.size();
            s.parameter_count += norms;
            s.bytes += norms * 4;
        }
        s.parameter_count += w_.final_norm.size();
        return s;
    }

    void forward(const StepBatch& b) override {
        const size_t T = b.tokens.size(), H = c_.hidden_size;
        // Grow-only scratch: steady-state decode allocates nothing.
        grow(x_, T * H);
        grow(h_, T * H);
        grow(mlp_, T * H);
        cpu::embed(w_.embed, b.tokens.data(), T, x_.data());
        place_vision_embeddings(b, x_.data(), H);
        for (size_t l = 0; l < c_.num_layers; ++l) {
            const Qwen3MoeLayerWeights& L = w_.layers[l];
            qwen3_attention_residual(c_, L.common, kv_.layer(l), rope_, b, x_.data(), attn_, pool_);
            cpu::rmsnorm(x_.data(), L.common.post_attn_norm.data(), h_.data(), T, H, c_.rms_norm_eps, pool_);
            if (L.sparse) {
                cpu::moe_forward(h_.data(), T, blocks_[l], mlp_.data(), moe_, pool_);
            } else {
                qwen3_swiglu(h_.data(), T, L.common.gate, L.common.up, L.common.down, mlp_.data(), gate_, up_, pool_);
            }
            cpu::add_inplace(x_.data(), mlp_.data(), T * H);
            add_deepstack(b, l, deepstack_taps_, x_.data(), H);
        }
        tokens_ = T;
    }

    void logits(const size_t* rows, size_t count, float* out) override {
        qwen3_logits(x_.data(), tokens_, rows, count, w_.final_norm, w_.lm_head, c_.rms_norm_eps, final_, out, pool_);
    }

private:
    static void grow(std::vector<float>& v, size_t n) {
        if (v.size() < n) v.resize(n);
    }

    ModelConfig c_;
    Qwen3MoeWeights w_;
    KvCache& kv_;
    ThreadPool& pool_;
    cpu::Rope rope_;
    size_t deepstack_taps_;  // Qwen3-VL-MoE's text model; 0 otherwise
    std::vector<cpu::MoeBlock> blocks_;  // per layer; empty for dense layers
    AttentionScratch attn_;
    cpu::MoeScratch moe_;
    std::vector<float> x_, h_, mlp_, gate_, up_, final_;
    size_t tokens_ = 0;  // rows of x_ the last forward filled
};

}  // namespace

std::unique_ptr<ModelRunner> make_qwen3_moe_cpu(const ModelConfig& config, Qwen3MoeWeights weights, KvCache& kv,
                                                ThreadPool& pool) {
    return std::make_unique<Qwen3MoeCpu>(config, std::move(weights), kv, pool);
}

}  // namespace q3n
