// The two steps where Qwen3-Next's gated attention differs from dense Qwen3 attention (spec 3.3).
// Everything between them (1+w QK-norm, partial RoPE via Rope.rot_dim, paged causal GQA attention)
// is the dense path's kernels.
#include <cmath>
#include <cstring>

#include "cpu/next_ops.h"
#include "cpu/simd.h"

namespace q3n::cpu {

// The query/gate split is per head: head h's 2d outputs are [q_h | gate_h]. Splitting the whole
// row into two contiguous halves instead would silently pair queries with other heads' gates.
void split_query_gate(const float* qg, size_t tokens, size_t heads, size_t head_dim, float* q, float* gate) {
    for (size_t i = 0; i < tokens * heads; ++i) {
        const float* src = qg + i * 2 * head_dim;
        std::memcpy(q + i * head_dim, src, head_dim * sizeof(float));
        std::memcpy(gate + i * head_dim, src + head_dim, head_dim * sizeof(float));
    }
}

Q3N_MULTIVERSION
void sigmoid_gate_mul(float* out, const float* gate, size_t n) {
    for (size_t i = 0; i < n; ++i) out[i] *= 1.0f / (1.0f + std::exp(-gate[i]));
}

}  // namespace q3n::cpu
