#include "model/qwen3_dense.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "model/qwen3_attention.h"

namespace q3n {

Qwen3Weights load_qwen3_weights(const ModelConfig& c, WeightSource& src, const std::function<bool(float)>& progress,
                                const std::string& prefix) {
    const size_t H = c.hidden_size, I = c.intermediate_size;
    Qwen3Weights w;
    w.embed = src.table(prefix + "embed_tokens.weight", c.vocab_size, H);
    w.layers.resize(c.num_layers);
    for (size_t l = 0; l < c.num_layers; ++l) {
        const std::string p = prefix + "layers." + std::to_string(l) + ".";
        Qwen3LayerWeights& L = w.layers[l];
        load_qwen3_attention(c, src, l, L, prefix);
        L.gate = src.linear(p + "mlp.gate_proj", I, H);
        L.up = src.linear(p + "mlp.up_proj", I, H);
        L.down = src.linear(p + "mlp.down_proj", H, I);
        if (progress && progress(static_cast<float>(l + 1) / static_cast<float>(c.num_layers + 1)))
            fail(Q3N_ERR_INVALID_STATE, "loading was cancelled by the progress callback");
    }
    w.final_norm = src.vector(prefix + "norm.weight", H);
    // Tied checkpoints may still carry an lm_head tensor; the embedding is what the model uses.
    w.lm_head = c.tie_word_embeddings ? w.embed : src.linear("lm_head", c.vocab_size, H);
    return w;
}

cpu::Rope make_rope(const ModelConfig& c) {
    cpu::Rope rope;
    const size_t dim = static_cast<size_t>(std::lround(c.head_dim * c.rope.partial_rotary_factor)) & ~size_t{1};
    rope.rot_dim = dim;
    const double base = c.rope.theta;
    std::vector<double> extrapolation(dim / 2);
    for (size_t i = 0; i < dim / 2; ++i)
        extrapolation[i] = 1.0 / std::pow(base, static_cast<double>(2 * i) / static_cast<double>(dim));
    rope.inv_freq.resize(dim / 2);
    // Interleaving only picks the position each slot rotates by; the frequencies (YaRN's included)
    // are those of the 1-D rope.
    if (!c.rope.mrope_section.empty()) {
        rope.axis = mrope_axes(c.rope.mrope_section);
        if (rope.axis.size() != dim / 2)
            fail(Q3N_ERR_BAD_CONFIG, "mrope_section covers " + std::to_string(rope.axis.size()) + " rotary slots, not " +
                                         std::to_string(dim / 2));
    }
    if (c.rope.type != "yarn") {
        for (size_t i = 0; i < dim / 2; ++i) rope.inv_freq[i] = static_cast<float>(extrapolation[i]);
        return rope;
    }
    // YaRN (shared/spec 1.4): frequencies below the correction range are divided by `factor`,
    // those above are kept, with a linear ramp between; cos and sin are scaled by mscale.
    const double s = c.rope.factor, L0 = c.rope.original_max_position_embeddings;
    auto correction_dim = [&](double rotations) {
        return static_cast<double>(dim) * std::log(L0 / (rotations * 2.0 * M_PI)) / (2.0 * std::log(base));
    };
    double low = correction_dim(c.rope.beta_fast), high = correction_dim(c.rope.beta_slow);
    if (c.rope.truncate) {
        low = std::floor(low);
        high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, static_cast<double>(dim - 1));
    if (low == high) high += 0.001;
    for (size_t i = 0; i < dim / 2; ++i) {
        const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
        const double keep = 1.0 - ramp;  // 1: keep the original frequency
        rope.inv_freq[i] = static_cast<float>(extrapolation[i] / s * (1.0 - keep) + extrapolation[i] * keep);
    }
    rope.attention_scaling = static_cast<float>(
        c.rope.attention_factor ? *c.rope.attention_factor : (s <= 1.0 ? 1.0 : 0.1 * std::log(s) + 1.0));
    return rope;
}

namespace {

class Qwen3DenseCpu : public ModelRunner {
public:
    Qwen3DenseCpu(const ModelConfig& config, Qwen3Weights weights, KvCache& kv, ThreadPool& pool)
        : c_(config), w_(std::move(weights)), kv_(kv), pool_(pool), rope_(make_rope(config)),
          deepstack_taps_(config.vision ? config.vision->deepstack_visual_indexes.size() : 0) {}

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
            for (const Linear* l : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down}) add(*l);
            const size_t norms = L.input_norm.size() + L.post_attn_norm.size() + L.q_norm.size() + L.k_norm.size();
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

        cpu::embed(w_.embed, b.tokens.data(), T, x_.data());
        place_vision_embeddings(b, x_.data(), H);
        for (size_t l = 0; l < c_.num_layers; ++l) {
            const Qwen3LayerWeights& L = w_.layers[l];
            qwen3_attention_residual(c_, L, kv_.layer(l), rope_, b, x_.data(), attention_, pool_);

            cpu::rmsnorm(x_.data(), L.post_attn_norm.data(), h_.data(), T, H, c_.rms_norm_eps, pool_);
            qwen3_swiglu(h_.data(), T, L.gate, L.up, L.down, h_.data(), gate_, up_, pool_);
            cpu::add_inplace(x_.data(), h_.data(), T * H);
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
    Qwen3Weights w_;
    KvCache& kv_;
    ThreadPool& pool_;
    cpu::Rope rope_;
    size_t deepstack_taps_;  // Qwen3-VL's text model; 0 otherwise
    std::vector<float> x_, h_, gate_, up_, final_;
    AttentionScratch attention_;
    size_t tokens_ = 0;  // rows of x_ the last forward filled
};

}  // namespace

std::unique_ptr<ModelRunner> make_qwen3_dense_cpu(const ModelConfig& config, Qwen3Weights weights, KvCache& kv,
                                                  ThreadPool& pool) {
    return std::make_unique<Qwen3DenseCpu>(config, std::move(weights), kv, pool);
}

}  // namespace q3n
