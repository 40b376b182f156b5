#include "model/qwen3_next.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <unordered_map>

#include "core/error.h"
#include "cpu/next_ops.h"
#include "model/qwen3_attention.h"
#include "model/qwen3_dense.h"

namespace q3n {
namespace {

// Reads tensors for one module tree. `optional` trees (MTP) take only what the checkpoint has, so
// partial or absent MTP modules load; everything that is read is shape-checked all the same.
struct TreeReader {
    WeightSource& src;
    bool optional = false;
    size_t loaded = 0;

    bool want(const std::string& name) {
        if (optional && !src.has(name)) return false;
        ++loaded;
        return true;
    }
    Linear linear(const std::string& module, size_t out, size_t in) {
        return want(module + ".weight") ? src.linear(module, out, in) : Linear{};
    }
    Linear linear_unquantized(const std::string& module, size_t out, size_t in) {
        return want(module + ".weight") ? src.linear_unquantized(module, out, in) : Linear{};
    }
    std::vector<float> vector(const std::string& name, size_t n) {
        return want(name) ? src.vector(name, n) : std::vector<float>{};
    }
    std::vector<float> tensor(const std::string& name, const std::vector<size_t>& shape) {
        return want(name) ? src.tensor(name, shape) : std::vector<float>{};
    }
};

// `p` ends with '.': "model.layers.3." or "mtp.layers.0.".
void load_layer(const ModelConfig& c, TreeReader& r, const std::string& p, NextLayerKind kind, bool sparse,
                NextLayerWeights& L) {
    const size_t H = c.hidden_size, d = c.head_dim, nH = c.num_heads, nKV = c.num_kv_heads;
    L.kind = kind;
    L.input_norm = r.vector(p + "input_layernorm.weight", H);
    L.post_attn_norm = r.vector(p + "post_attention_layernorm.weight", H);
    if (kind == NextLayerKind::FullAttention) {
        NextAttentionWeights& A = L.attn;
        A.q_norm = r.vector(p + "self_attn.q_norm.weight", d);
        A.k_norm = r.vector(p + "self_attn.k_norm.weight", d);
        A.q = r.linear(p + "self_attn.q_proj", nH * d * 2, H);  // query and gate per head
        A.k = r.linear(p + "self_attn.k_proj", nKV * d, H);
        A.v = r.linear(p + "self_attn.v_proj", nKV * d, H);
        A.o = r.linear(p + "self_attn.o_proj", H, nH * d);
    } else {
        const GdnDims g = c.gdn_dims();
        const size_t K = c.linear_conv_kernel_dim;
        NextGdnWeights& G = L.gdn;
        const std::string q = p + "linear_attn.";
        G.qkvz = r.linear(q + "in_proj_qkvz", g.qkvz_width(), H);
        // Spec 5.6: in_proj_ba has no FP8 form in the releases (the block GEMM cannot take it).
        G.ba = r.linear_unquantized(q + "in_proj_ba", g.ba_width(), H);
        G.conv = r.tensor(q + "conv1d.weight", {g.conv_dim(), 1, K});
        G.A_log = r.tensor(q + "A_log", {g.nv});
        G.dt_bias = r.tensor(q + "dt_bias", {g.nv});
        G.norm = r.vector(q + "norm.weight", g.dv);
        G.out = r.linear(q + "out_proj", H, g.value_dim());
    }
    NextMlpWeights& M = L.mlp;
    M.sparse = sparse;
    const std::string m = p + "mlp.";
    if (!sparse) {
        const size_t I = c.intermediate_size;
        M.dense = {r.linear(m + "gate_proj", I, H), r.linear(m + "up_proj", I, H), r.linear(m + "down_proj", H, I)};
        return;
    }
    const size_t E = c.num_experts, Ie = c.moe_intermediate_size, Is = c.shared_expert_intermediate_size;
    M.router = r.linear_unquantized(m + "gate", E, H);
    M.experts.resize(E);
    for (size_t e = 0; e < E; ++e) {
        const std::string x = m + "experts." + std::to_string(e) + ".";
        M.experts[e] = {r.linear(x + "gate_proj", Ie, H), r.linear(x + "up_proj", Ie, H), r.linear(x + "down_proj", H, Ie)};
    }
    M.shared = {r.linear(m + "shared_expert.gate_proj", Is, H), r.linear(m + "shared_expert.up_proj", Is, H),
                r.linear(m + "shared_expert.down_proj", H, Is)};
    M.shared_gate = r.linear_unquantized(m + "shared_expert_gate", 1, H);
}

}  // namespace

size_t qwen3_next_kv_layers(const ModelConfig& c) {
    return static_cast<size_t>(
        std::count(c.next_layer_kinds.begin(), c.next_layer_kinds.end(), NextLayerKind::FullAttention));
}

Qwen3NextWeights load_qwen3_next_weights(const ModelConfig& c, WeightSource& src,
                                         const std::function<bool(float)>& progress) {
    if (!c.is_qwen3_next() || c.next_layer_kinds.size() != c.num_layers)
        fail(Q3N_ERR_BAD_CONFIG, "Qwen3NextForCausalLM needs a qwen3_next config (layer schedule, linear attention sizes)");
    c.gdn_dims().validate("config.json");
    const size_t H = c.hidden_size;
    Qwen3NextWeights w;
    TreeReader r{src};
    w.embed = src.table("model.embed_tokens.weight", c.vocab_size, H);
    w.layers.resize(c.num_layers);
    for (size_t l = 0; l < c.num_layers; ++l) {
        load_layer(c, r, "model.layers." + std::to_string(l) + ".", c.next_layer_kinds[l], c.is_moe_layer(l), w.layers[l]);
        if (progress && progress(static_cast<float>(l + 1) / static_cast<float>(c.num_layers + 2)))
            fail(Q3N_ERR_INVALID_STATE, "loading was cancelled by the progress callback");
    }
    w.final_norm = src.vector("model.norm.weight", H);
    w.lm_head = c.tie_word_embeddings ? w.embed : src.linear("lm_head", c.vocab_size, H);

    // MTP (spec 3.7): kept, unused. HF and vLLM's main model ignore these tensors; a checkpoint
    // without them (or with only some) is as valid as one with the full module.
    TreeReader m{src, /*optional=*/true};
    w.mtp.pre_fc_norm_embedding = m.vector("mtp.pre_fc_norm_embedding.weight", H);
    w.mtp.pre_fc_norm_hidden = m.vector("mtp.pre_fc_norm_hidden.weight", H);
    w.mtp.norm = m.vector("mtp.norm.weight", H);
    w.mtp.fc = m.linear("mtp.fc", H, 2 * H);
    // Layers present in the file count, whatever num_nextn_predict_layers says (it may be absent).
    const size_t declared = std::max<size_t>(c.num_nextn_predict_layers, 1);
    for (size_t i = 0; i < declared || src.has("mtp.layers." + std::to_string(i) + ".input_layernorm.weight"); ++i) {
        const std::string p = "mtp.layers." + std::to_string(i) + ".";
        const size_t before = m.loaded;
        NextMtpLayerWeights L;
        load_layer(c, m, p, NextLayerKind::FullAttention, c.num_experts > 0, L.layer);
        L.present = m.loaded > before;
        if (!L.present) break;
        w.mtp.layers.push_back(std::move(L));
    }
    w.mtp.tensors = m.loaded;
    return w;
}

namespace {

void grow(std::vector<float>& v, size_t n) {
    if (v.size() < n) v.resize(n);
}

// The recurrent state of one sequence across every GDN layer, fp32 (spec 3.5): per layer the last
// K-1 pre-conv inputs [conv_dim, K-1] and the delta-rule state [nv, dk, dv].
struct SequenceState {
    std::vector<float> conv, ssm;
};

class Qwen3NextCpu : public Qwen3NextRunner {
public:
    Qwen3NextCpu(const ModelConfig& config, Qwen3NextWeights weights, KvCache& kv, ThreadPool& pool)
        : c_(config), w_(std::move(weights)), kv_(kv), pool_(pool), rope_(make_rope(config)), dims_(config.gdn_dims()) {
        const size_t L = c_.num_layers;
        slot_.assign(L, 0);
        size_t full = 0, lin = 0;
        for (size_t l = 0; l < L; ++l) slot_[l] = c_.next_layer_kinds[l] == NextLayerKind::FullAttention ? full++ : lin++;
        gdn_layers_ = lin;
        // Until the engine sizes the cache from qwen3_next_kv_layers, it holds num_layers slots:
        // the first `full` are used.
        if (full > kv_.shape().num_layers)
            fail(Q3N_ERR_INTERNAL, "the KV cache has fewer layers than the model's full-attention layers");
        conv_stride_ = dims_.conv_dim() * (c_.linear_conv_kernel_dim - 1);
        ssm_stride_ = dims_.nv * dims_.dk * dims_.dv;
        blocks_.resize(L);
        for (size_t l = 0; l < L; ++l) {
            const NextMlpWeights& M = w_.layers[l].mlp;
            if (!M.sparse) continue;
            blocks_[l] = {&M.router, M.experts.data(), M.experts.size(), c_.num_experts_per_tok, c_.norm_topk_prob};
        }
    }

    bool has_recurrent_state() const override { return true; }
    void release_sequence(uint64_t id) override { states_.erase(id); }
    size_t live_sequences() const override { return states_.size(); }
    size_t state_bytes_per_sequence() const override { return gdn_layers_ * (conv_stride_ + ssm_stride_) * sizeof(float); }

    WeightStats weight_stats() const override {
        // The MTP module is left out: nothing runs it, and transformers does not count it either.
        WeightStats s;
        auto add = [&](const Linear& l) {
            s.parameter_count += l.out * l.in;
            s.bytes += l.bytes();
            s.fp8 = s.fp8 || l.type == WeightType::FP8_E4M3;
        };
        auto add_f32 = [&](const std::vector<float>& v) {
            s.parameter_count += v.size();
            s.bytes += v.size() * 4;
        };
        add(w_.embed);
        if (!c_.tie_word_embeddings) add(w_.lm_head);
        add_f32(w_.final_norm);
        for (const auto& L : w_.layers) {
            add_f32(L.input_norm);
            add_f32(L.post_attn_norm);
            if (L.kind == NextLayerKind::FullAttention) {
                for (const Linear* l : {&L.attn.q, &L.attn.k, &L.attn.v, &L.attn.o}) add(*l);
                add_f32(L.attn.q_norm);
                add_f32(L.attn.k_norm);
            } else {
                for (const Linear* l : {&L.gdn.qkvz, &L.gdn.ba, &L.gdn.out}) add(*l);
                for (const auto* v : {&L.gdn.conv, &L.gdn.A_log, &L.gdn.dt_bias, &L.gdn.norm}) add_f32(*v);
            }
            const NextMlpWeights& M = L.mlp;
            if (M.sparse) {
                add(M.router);
                add(M.shared_gate);
                for (const auto& e : M.experts)
                    for (const Linear* l : {&e.gate, &e.up, &e.down}) add(*l);
                for (const Linear* l : {&M.shared.gate, &M.shared.up, &M.shared.down}) add(*l);
            } else {
                for (const Linear* l : {&M.dense.gate, &M.dense.up, &M.dense.down}) add(*l);
            }
        }
        return s;
    }

    void forward(const StepBatch& b) override {
        const size_t T = b.tokens.size(), H = c_.hidden_size;
        bind_sequences(b);
        grow(x_, T * H);
        grow(h_, T * H);
        grow(mlp_, T * H);
        cpu::embed(w_.embed, b.tokens.data(), T, x_.data());
        size_t gdn_index = 0;
        for (size_t l = 0; l < c_.num_layers; ++l) {
            const NextLayerWeights& L = w_.layers[l];
            cpu::rmsnorm_1p(x_.data(), L.input_norm.data(), h_.data(), T, H, c_.rms_norm_eps, pool_);
            if (L.kind == NextLayerKind::FullAttention)
                attention(L.attn, kv_.layer(slot_[l]), b, T);
            else
                gated_delta_net(L.gdn, gdn_index++, T);
            cpu::add_inplace(x_.data(), h_.data(), T * H);

            cpu::rmsnorm_1p(x_.data(), L.post_attn_norm.data(), h_.data(), T, H, c_.rms_norm_eps, pool_);
            mlp(L.mlp, blocks_[l], T);
            cpu::add_inplace(x_.data(), mlp_.data(), T * H);
        }
        tokens_ = T;
    }

    void logits(const size_t* rows, size_t count, float* out) override {
        const size_t H = c_.hidden_size;
        gather_logit_rows(x_.data(), tokens_, H, rows, count, final_);
        cpu::rmsnorm_1p(final_.data(), w_.final_norm.data(), final_.data(), count, H, c_.rms_norm_eps, pool_);
        cpu::linear(final_.data(), count, w_.lm_head, out, pool_);
    }

private:
    // Checks the spans tile the batch and finds (or starts) each sequence's state. Done before any
    // layer runs, so a malformed batch changes no state.
    void bind_sequences(const StepBatch& b) {
        const size_t T = b.tokens.size(), n = b.sequences.size();
        seq_starts_.assign(1, 0);
        std::vector<SequenceState*> found(n, nullptr);
        for (size_t s = 0; s < n; ++s) {
            const SequenceSpan& span = b.sequences[s];
            if (span.first_token != seq_starts_.back() || span.count == 0)
                fail(Q3N_ERR_INTERNAL, "Qwen3-Next needs the batch's sequence spans in order, without gaps");
            seq_starts_.push_back(span.first_token + span.count);
            auto it = states_.find(span.id);
            if (!span.starts_at_zero && it == states_.end())
                fail(Q3N_ERR_INTERNAL, "sequence " + std::to_string(span.id) +
                                           " continues at a later position but its recurrent state is gone");
            if (it != states_.end()) found[s] = &it->second;
        }
        if (seq_starts_.back() != T) fail(Q3N_ERR_INTERNAL, "the sequence spans do not cover the batch's tokens");
        for (size_t s = 0; s < n; ++s) {
            const SequenceSpan& span = b.sequences[s];
            if (!span.starts_at_zero) continue;
            // A sequence starting at position 0 begins from the zero state (spec 3.4 step 5); a
            // state left from an earlier life of the same id (truncation) is cleared.
            SequenceState& st = found[s] ? *found[s] : states_[span.id];
            st.conv.assign(gdn_layers_ * conv_stride_, 0.0f);
            st.ssm.assign(gdn_layers_ * ssm_stride_, 0.0f);
            found[s] = &st;
        }
        live_ = std::move(found);
        conv_ptrs_.resize(n);
        ssm_ptrs_.resize(n);
    }

    // Spec 3.3: h <- o_proj((attention(rope(norm(q)), rope(norm(k)), v)) * sigmoid(gate)).
    void attention(const NextAttentionWeights& A, const cpu::PagedKvLayer& kv, const StepBatch& b, size_t T) {
        const size_t d = c_.head_dim, nH = c_.num_heads, nKV = c_.num_kv_heads;
        grow(qg_, T * nH * 2 * d);
        grow(q_, T * nH * d);
        grow(gate_, T * nH * d);
        grow(k_, T * nKV * d);
        grow(v_, T * nKV * d);
        grow(attn_, T * nH * d);
        cpu::linear(h_.data(), T, A.q, qg_.data(), pool_);
        cpu::split_query_gate(qg_.data(), T, nH, d, q_.data(), gate_.data());
        cpu::linear(h_.data(), T, A.k, k_.data(), pool_);
        cpu::linear(h_.data(), T, A.v, v_.data(), pool_);
        cpu::rmsnorm_1p(q_.data(), A.q_norm.data(), q_.data(), T * nH, d, c_.rms_norm_eps, pool_);
        cpu::rmsnorm_1p(k_.data(), A.k_norm.data(), k_.data(), T * nKV, d, c_.rms_norm_eps, pool_);
        cpu::apply_rope(q_.data(), T, nH, d, b.positions.data(), rope_);  // first rot_dim channels only
        cpu::apply_rope(k_.data(), T, nKV, d, b.positions.data(), rope_);
        cpu::kv_write(kv, k_.data(), v_.data(), b.slots.data(), T);
        cpu::attention(kv, q_.data(), b.slots.data(), T, nH, 1.0f / std::sqrt(static_cast<float>(d)), attn_.data(), pool_);
        cpu::sigmoid_gate_mul(attn_.data(), gate_.data(), T * nH * d);
        cpu::linear(attn_.data(), T, A.o, h_.data(), pool_);
    }

    // Spec 3.4 over the packed sequences, each from its own state.
    void gated_delta_net(const NextGdnWeights& G, size_t index, size_t T) {
        const GdnDims& g = dims_;
        const size_t conv = g.conv_dim(), nv = g.nv, n = live_.size();
        for (size_t s = 0; s < n; ++s) {
            conv_ptrs_[s] = live_[s]->conv.data() + index * conv_stride_;
            ssm_ptrs_[s] = live_[s]->ssm.data() + index * ssm_stride_;
        }
        grow(proj_, T * g.qkvz_width());
        grow(qkv_, T * conv);
        grow(z_, T * g.value_dim());
        grow(ba_, T * g.ba_width());
        grow(b_, T * nv);
        grow(a_, T * nv);
        grow(beta_, T * nv);
        grow(decay_, T * nv);
        grow(core_, T * g.value_dim());
        cpu::linear(h_.data(), T, G.qkvz, proj_.data(), pool_);
        deinterleave_qkvz(g, proj_.data(), T, qkv_.data(), z_.data());
        cpu::linear(h_.data(), T, G.ba, ba_.data(), pool_);
        deinterleave_ba(g, ba_.data(), T, b_.data(), a_.data());
        cpu::causal_conv1d_silu(qkv_.data(), conv, G.conv.data(), c_.linear_conv_kernel_dim, seq_starts_.data(), n,
                                conv_ptrs_.data(), qkv_.data(), pool_);
        // q and k heads are adjacent in the conv output (q block then k block): one call for both.
        cpu::l2norm_heads(qkv_.data(), T, 2 * g.nk, g.dk, conv, 1e-6f, pool_);
        cpu::gdn_gates(b_.data(), a_.data(), G.A_log.data(), G.dt_bias.data(), T, nv, beta_.data(), decay_.data());
        const cpu::GdnShape shape{g.nk, g.nv, g.dk, g.dv};
        const cpu::GdnInputs in{qkv_.data(), conv, qkv_.data() + g.key_dim(), conv, qkv_.data() + 2 * g.key_dim(), conv,
                                decay_.data(), beta_.data()};
        // The recurrent form for prefill too: on the CPU the chunked form is no faster (next_ops.h),
        // and one code path makes decode token by token and one prefill the same arithmetic.
        cpu::gated_delta_rule_recurrent(shape, in, 1.0f / std::sqrt(static_cast<float>(g.dk)), seq_starts_.data(), n,
                                        ssm_ptrs_.data(), core_.data(), pool_);
        cpu::rmsnorm_gated(core_.data(), z_.data(), G.norm.data(), core_.data(), T * nv, g.dv, c_.rms_norm_eps, pool_);
        cpu::linear(core_.data(), T, G.out, h_.data(), pool_);
    }

    // Spec 3.6: mlp = routed(h) + sigmoid(h . w_sg) * SwiGLU_shared(h).
    void mlp(const NextMlpWeights& M, const cpu::MoeBlock& block, size_t T) {
        const size_t H = c_.hidden_size;
        const cpu::MoeExpert& swiglu = M.sparse ? M.shared : M.dense;
        const size_t I = swiglu.gate.out;
        grow(up_gate_, T * I);
        grow(up_, T * I);
        grow(shared_, T * H);
        grow(sg_, T);
        cpu::linear(h_.data(), T, swiglu.gate, up_gate_.data(), pool_);
        cpu::linear(h_.data(), T, swiglu.up, up_.data(), pool_);
        cpu::silu_mul(up_gate_.data(), up_.data(), up_gate_.data(), T * I);
        if (!M.sparse) {
            cpu::linear(up_gate_.data(), T, swiglu.down, mlp_.data(), pool_);
            return;
        }
        cpu::linear(up_gate_.data(), T, swiglu.down, shared_.data(), pool_);
        cpu::linear(h_.data(), T, M.shared_gate, sg_.data(), pool_);
        cpu::moe_forward(h_.data(), T, block, mlp_.data(), moe_, pool_);
        for (size_t t = 0; t < T; ++t) {
            const float s = 1.0f / (1.0f + std::exp(-sg_[t]));
            float* y = mlp_.data() + t * H;
            const float* e = shared_.data() + t * H;
            for (size_t i = 0; i < H; ++i) y[i] += s * e[i];
        }
    }

    ModelConfig c_;
    Qwen3NextWeights w_;
    KvCache& kv_;
    ThreadPool& pool_;
    cpu::Rope rope_;
    GdnDims dims_;
    std::vector<size_t> slot_;  // per layer: KV slot (full attention) or GDN state index
    size_t gdn_layers_ = 0, conv_stride_ = 0, ssm_stride_ = 0;
    std::vector<cpu::MoeBlock> blocks_;
    cpu::MoeScratch moe_;
    std::unordered_map<uint64_t, SequenceState> states_;
    // This forward's sequences: token ranges and state pointers (of the current GDN layer).
    std::vector<size_t> seq_starts_;
    std::vector<SequenceState*> live_;
    std::vector<float*> conv_ptrs_, ssm_ptrs_;
    std::vector<float> x_, h_, mlp_, final_;
    std::vector<float> qg_, q_, gate_, k_, v_, attn_;
    std::vector<float> proj_, qkv_, z_, ba_, b_, a_, beta_, decay_, core_;
    std::vector<float> up_gate_, up_, shared_, sg_;
    size_t tokens_ = 0;
};

}  // namespace

std::unique_ptr<Qwen3NextRunner> make_qwen3_next_cpu(const ModelConfig& config, Qwen3NextWeights weights, KvCache& kv,
                                                     ThreadPool& pool) {
    return std::make_unique<Qwen3NextCpu>(config, std::move(weights), kv, pool);
}

}  // namespace q3n
