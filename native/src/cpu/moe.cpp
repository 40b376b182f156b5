// The routed MLP of Qwen3-MoE on the CPU (shared/spec 2.2). The router and every expert go through
// cpu::linear, so BF16 and block-FP8 experts need nothing of their own here.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "core/error.h"
#include "cpu/ops.h"

namespace q3n::cpu {
namespace {

template <class T>
void grow(std::vector<T>& v, size_t n) {
    if (v.size() < n) v.resize(n);
}

// NaN ranks below every number so the selection stays a strict order whatever the activations hold;
// the NaN weights it then picks carry on into the logits, where the engine reports them.
inline float rank_key(float p) { return std::isnan(p) ? -std::numeric_limits<float>::infinity() : p; }

void check_block(const MoeBlock& b) {
    if (!b.router || !b.experts || b.num_experts == 0 || b.router->out != b.num_experts)
        fail(Q3N_ERR_INTERNAL, "MoE block without a router of num_experts rows or without experts");
    if (b.top_k == 0 || b.top_k > b.num_experts)
        fail(Q3N_ERR_INTERNAL, "MoE block with top_k " + std::to_string(b.top_k) + " outside [1, " +
                                   std::to_string(b.num_experts) + "]");
}

void check_expert(const MoeExpert& e, size_t hidden, size_t index) {
    const size_t I = e.gate.out;
    if (e.gate.in != hidden || e.up.in != hidden || e.up.out != I || e.down.in != I || e.down.out != hidden)
        fail(Q3N_ERR_INTERNAL, "MoE expert " + std::to_string(index) + " has gate/up/down shapes that do not chain");
}

}  // namespace

void moe_route(const float* logits, size_t tokens, size_t num_experts, size_t top_k, bool renormalize,
               int32_t* experts, float* weights) {
    if (top_k == 0 || top_k > num_experts) fail(Q3N_ERR_INTERNAL, "moe_route: top_k outside [1, num_experts]");
    thread_local std::vector<float> p;
    thread_local std::vector<uint8_t> taken;
    p.resize(num_experts);
    taken.resize(num_experts);
    for (size_t t = 0; t < tokens; ++t) {
        const float* l = logits + t * num_experts;
        float m = -std::numeric_limits<float>::infinity();
        for (size_t e = 0; e < num_experts; ++e) m = std::max(m, l[e]);
        float sum = 0.0f;
        for (size_t e = 0; e < num_experts; ++e) sum += p[e] = std::exp(l[e] - m);
        for (size_t e = 0; e < num_experts; ++e) p[e] /= sum;

        // top_k passes of a strict "greater" scan: equal probabilities keep the lower index, which
        // is what torch.topk returns in practice. O(k * E) is nothing next to the expert GEMMs.
        std::fill(taken.begin(), taken.end(), uint8_t{0});
        int32_t* et = experts + t * top_k;
        float* wt = weights + t * top_k;
        for (size_t j = 0; j < top_k; ++j) {
            size_t best = num_experts;
            for (size_t e = 0; e < num_experts; ++e)
                if (!taken[e] && (best == num_experts || rank_key(p[e]) > rank_key(p[best]))) best = e;
            taken[best] = 1;
            et[j] = static_cast<int32_t>(best);
            wt[j] = p[best];
        }
        if (renormalize) {
            float s = 0.0f;
            for (size_t j = 0; j < top_k; ++j) s += wt[j];
            for (size_t j = 0; j < top_k; ++j) wt[j] /= s;
        }
        // transformers then casts the weights to the hidden dtype (bf16 in a bf16 model). This
        // engine's activations are fp32, and so are the fp32 references it is checked against, so
        // the weights stay fp32: rounding them to bf16 would only add error.
    }
}

void moe_forward(const float* x, size_t tokens, const MoeBlock& b, float* y, MoeScratch& s, ThreadPool& pool) {
    if (tokens == 0) return;
    check_block(b);
    const size_t E = b.num_experts, k = b.top_k, H = b.router->in, assignments = tokens * k;

    grow(s.logits, tokens * E);
    grow(s.experts, assignments);
    grow(s.weights, assignments);
    linear(x, tokens, *b.router, s.logits.data(), pool);
    moe_route(s.logits.data(), tokens, E, k, b.renormalize, s.experts.data(), s.weights.data());

    // Counting sort of the (token, slot) assignments by expert: `order` lists them expert by expert,
    // tokens ascending within each, so every expert reads one contiguous run of gathered rows.
    s.offsets.assign(E + 1, 0);
    for (size_t i = 0; i < assignments; ++i) ++s.offsets[static_cast<size_t>(s.experts[i]) + 1];
    size_t most = 0, width = 0;
    for (size_t e = 0; e < E; ++e) {
        most = std::max<size_t>(most, s.offsets[e + 1]);
        if (s.offsets[e + 1] > 0) {
            check_expert(b.experts[e], H, e);
            width = std::max(width, b.experts[e].gate.out);
        }
        s.offsets[e + 1] += s.offsets[e];
    }
    grow(s.order, assignments);
    for (size_t i = 0; i < assignments; ++i)
        s.order[s.offsets[static_cast<size_t>(s.experts[i])]++] = static_cast<int32_t>(i);
    // Filling advanced each start to the next expert's start; shift them back.
    for (size_t e = E; e > 0; --e) s.offsets[e] = s.offsets[e - 1];
    s.offsets[0] = 0;

    grow(s.rows, most * H);
    grow(s.gate, most * width);
    grow(s.up, most * width);
    grow(s.out, most * H);
    std::fill(y, y + tokens * H, 0.0f);
    for (size_t e = 0; e < E; ++e) {
        const size_t first = s.offsets[e], n = s.offsets[e + 1] - first;
        if (n == 0) continue;  // an expert no token chose costs nothing
        const MoeExpert& ex = b.experts[e];
        const size_t I = ex.gate.out;
        const int32_t* ids = s.order.data() + first;
        for (size_t r = 0; r < n; ++r) std::copy_n(x + (ids[r] / k) * H, H, s.rows.data() + r * H);
        linear(s.rows.data(), n, ex.gate, s.gate.data(), pool);
        linear(s.rows.data(), n, ex.up, s.up.data(), pool);
        silu_mul(s.gate.data(), s.up.data(), s.gate.data(), n * I);
        linear(s.gate.data(), n, ex.down, s.out.data(), pool);
        // Experts are visited in index order, so each token sums its k terms in a fixed order
        // whatever the batch holds (transformers' eager loop adds them in the same order).
        for (size_t r = 0; r < n; ++r) {
            const float w = s.weights[ids[r]];
            float* yt = y + (ids[r] / k) * H;
            const float* o = s.out.data() + r * H;
            for (size_t h = 0; h < H; ++h) yt[h] += w * o[h];
        }
    }
}

}  // namespace q3n::cpu
