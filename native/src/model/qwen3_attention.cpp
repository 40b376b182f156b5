#include "model/qwen3_attention.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "core/error.h"

namespace q3n {

void load_qwen3_attention(const ModelConfig& c, WeightSource& src, size_t layer, Qwen3LayerWeights& L,
                          const std::string& prefix) {
    const size_t H = c.hidden_size, d = c.head_dim;
    const size_t q_out = static_cast<size_t>(c.num_heads) * d, kv_out = static_cast<size_t>(c.num_kv_heads) * d;
    const std::string p = prefix + "layers." + std::to_string(layer) + ".";
    L.input_norm = src.vector(p + "input_layernorm.weight", H);
    L.post_attn_norm = src.vector(p + "post_attention_layernorm.weight", H);
    L.q_norm = src.vector(p + "self_attn.q_norm.weight", d);
    L.k_norm = src.vector(p + "self_attn.k_norm.weight", d);
    L.q = src.linear(p + "self_attn.q_proj", q_out, H);
    L.k = src.linear(p + "self_attn.k_proj", kv_out, H);
    L.v = src.linear(p + "self_attn.v_proj", kv_out, H);
    L.o = src.linear(p + "self_attn.o_proj", H, q_out);
}

void qwen3_attention_residual(const ModelConfig& c, const Qwen3LayerWeights& L, const cpu::PagedKvLayer& kv,
                              const cpu::Rope& rope, const StepBatch& b, float* x, AttentionScratch& s,
                              ThreadPool& pool) {
    const size_t T = b.tokens.size(), H = c.hidden_size, d = c.head_dim, nH = c.num_heads, nKV = c.num_kv_heads;
    auto grow = [](std::vector<float>& v, size_t n) {
        if (v.size() < n) v.resize(n);
    };
    grow(s.h, T * H);
    grow(s.q, T * nH * d);
    grow(s.k, T * nKV * d);
    grow(s.v, T * nKV * d);
    grow(s.attn, T * nH * d);
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    cpu::rmsnorm(x, L.input_norm.data(), s.h.data(), T, H, c.rms_norm_eps, pool);
    cpu::linear(s.h.data(), T, L.q, s.q.data(), pool);
    cpu::linear(s.h.data(), T, L.k, s.k.data(), pool);
    cpu::linear(s.h.data(), T, L.v, s.v.data(), pool);
    cpu::rmsnorm(s.q.data(), L.q_norm.data(), s.q.data(), T * nH, d, c.rms_norm_eps, pool);
    cpu::rmsnorm(s.k.data(), L.k_norm.data(), s.k.data(), T * nKV, d, c.rms_norm_eps, pool);
    const int32_t* positions = b.positions.data();
    if (rope.position_axes() == 3) {
        if (b.mrope_positions.size() != 3 * T) fail(Q3N_ERR_INTERNAL, "an MRoPE model was stepped without [3][tokens] positions");
        positions = b.mrope_positions.data();
    }
    cpu::apply_rope(s.q.data(), T, nH, d, positions, rope);
    cpu::apply_rope(s.k.data(), T, nKV, d, positions, rope);
    cpu::kv_write(kv, s.k.data(), s.v.data(), b.slots.data(), T);
    cpu::attention(kv, s.q.data(), b.slots.data(), T, nH, scale, s.attn.data(), pool);
    cpu::linear(s.attn.data(), T, L.o, s.h.data(), pool);
    cpu::add_inplace(x, s.h.data(), T * H);
}

void qwen3_swiglu(const float* x, size_t T, const Linear& gate, const Linear& up, const Linear& down, float* out,
                  std::vector<float>& gate_buf, std::vector<float>& up_buf, ThreadPool& pool) {
    const size_t I = gate.out;
    if (gate_buf.size() < T * I) gate_buf.resize(T * I);
    if (up_buf.size() < T * I) up_buf.resize(T * I);
    cpu::linear(x, T, gate, gate_buf.data(), pool);
    cpu::linear(x, T, up, up_buf.data(), pool);
    cpu::silu_mul(gate_buf.data(), up_buf.data(), gate_buf.data(), T * I);
    cpu::linear(gate_buf.data(), T, down, out, pool);
}

void place_vision_embeddings(const StepBatch& b, float* x, size_t hidden) {
    for (size_t i = 0; i < b.vision_rows.size(); ++i)
        std::copy_n(b.vision_features[i], hidden, x + size_t(b.vision_rows[i]) * hidden);
}

void add_deepstack(const StepBatch& b, size_t layer, size_t taps, float* x, size_t hidden) {
    if (layer >= taps) return;
    for (size_t i = 0; i < b.vision_rows.size(); ++i) {
        const float* tap = b.vision_features[i] + (layer + 1) * hidden;
        float* row = x + size_t(b.vision_rows[i]) * hidden;
        for (size_t j = 0; j < hidden; ++j) row[j] += tap[j];
    }
}

void gather_logit_rows(const float* hidden, size_t computed, size_t width, const size_t* rows, size_t count,
                       std::vector<float>& out) {
    if (out.size() < count * width) out.resize(count * width);
    for (size_t r = 0; r < count; ++r) {
        if (rows[r] >= computed) fail(Q3N_ERR_INTERNAL, "logits requested for a row the last forward did not compute");
        std::copy_n(hidden + rows[r] * width, width, out.data() + r * width);
    }
}

void qwen3_logits(const float* hidden, size_t computed, const size_t* rows, size_t count,
                  const std::vector<float>& final_norm, const Linear& lm_head, float eps, std::vector<float>& scratch,
                  float* out, ThreadPool& pool) {
    const size_t H = lm_head.in;
    gather_logit_rows(hidden, computed, H, rows, count, scratch);
    cpu::rmsnorm(scratch.data(), final_norm.data(), scratch.data(), count, H, eps, pool);
    cpu::linear(scratch.data(), count, lm_head, out, pool);
}

}  // namespace q3n
