// CPU kernels for the Qwen3-Next blocks (shared/spec section 3): the zero-centred and gated RMSNorms,
// the Gated DeltaNet pieces (causal depthwise conv with carried state, gates, L2 norm, the gated
// delta rule in recurrent and chunked form) and the parts of gated attention that differ from dense
// attention. Activations and recurrent state are fp32. Like the rest of cpu/, these are the reference
// the CUDA kernels are tested against, so each states its formula exactly.
//
// Packed sequences: kernels that carry state take several sequences at once, packed token-major
// one after another, with `seq_starts[s] .. seq_starts[s+1]` the token rows of sequence s
// (`num_seqs + 1` entries, seq_starts[0] == 0, like FLA's cu_seqlens) and one state pointer per
// sequence. A decode step is the case where every sequence has one token.
#pragma once

#include <cstddef>

#include "core/thread_pool.h"

namespace q3n::cpu {

// ---- Norms (next_norms.cpp) ----------------------------------------------------------------------

// Zero-centred RMSNorm (spec 3.2), used by every Qwen3-Next norm except the GDN output norm:
//   y[r] = (x[r] / sqrt(mean(x[r]^2) + eps)) * (1 + w)
// The checkpoint stores w as an offset from 1 (initialised to zeros). In place allowed.
void rmsnorm_1p(const float* x, const float* weight, float* y, size_t rows, size_t n, float eps, ThreadPool& pool);

// The GDN's gated output norm (spec 3.4 step 6), plain-weight form with the gate after the norm:
//   y[r] = (w * (x[r] / sqrt(mean(x[r]^2) + eps))) * silu(z[r])
// Rows are (token, value head) pairs of n = dv values; w is shared by all heads. In place allowed
// (y == x).
void rmsnorm_gated(const float* x, const float* z, const float* weight, float* y, size_t rows, size_t n, float eps,
                   ThreadPool& pool);

// FLA's l2norm (spec 3.4 step 4), in place on `heads` vectors of d values per token:
//   x <- x / sqrt(sum(x^2) + eps)           (eps inside the root; the spec's eps is 1e-6)
// Head h of token t starts at x + t * token_stride + h * d, so q and k can be normalised where the
// conv left them (inside its [T, conv_dim] output) in one call.
void l2norm_heads(float* x, size_t tokens, size_t heads, size_t d, size_t token_stride, float eps, ThreadPool& pool);

// ---- Causal depthwise conv1d + SiLU (causal_conv1d.cpp) ------------------------------------------

// Spec 3.4 step 2 for every sequence s:
//   out[t, c] = silu( sum_{j=0}^{K-1} w[c, j] * m[t - (K-1) + j, c] )
// where m rows before the sequence's first token come from its conv state. x and out are
// [tokens, channels] (out == x allowed). weight is [channels, K] fp32 (the checkpoint's
// [channels, 1, K] widened). state[s] is [channels, K-1] fp32: for each channel the last K-1
// pre-conv inputs, oldest first (zeros for a new sequence); it is read before and written after,
// so consecutive calls chain exactly.
void causal_conv1d_silu(const float* x, size_t channels, const float* weight, size_t kernel, const size_t* seq_starts,
                        size_t num_seqs, float* const* state, float* out, ThreadPool& pool);

// ---- Gated DeltaNet (gated_delta_rule.cpp) -------------------------------------------------------

// Spec 3.4 step 3, per token t and value head h (b, a, beta, g are [tokens, nv]):
//   beta = sigmoid(b);   g = -exp(A_log[h]) * softplus(a + dt_bias[h])   (softplus(x) = x for x > 20)
void gdn_gates(const float* b, const float* a, const float* A_log, const float* dt_bias, size_t tokens, size_t nv,
               float* beta, float* g);

struct GdnShape {
    size_t nk;  // key heads (q and k)
    size_t nv;  // value heads; a multiple of nk. Value head h reads q/k head h / (nv / nk).
    size_t dk;
    size_t dv;
};

// The inputs of the delta rule for a packed batch. q and k must already be L2-normalised
// (l2norm_heads); the 1/sqrt(dk) query scale is the `scale` argument. Head h of token t is at
// q + t * q_stride + h * dk (k likewise, v with dv), so they can be read straight out of the conv
// output ([T, conv_dim]: strides conv_dim) or from separate [T, heads, d] buffers.
struct GdnInputs {
    const float* q;
    size_t q_stride;
    const float* k;
    size_t k_stride;
    const float* v;
    size_t v_stride;
    const float* g;     // [tokens, nv] log-decay, <= 0
    const float* beta;  // [tokens, nv]
};

// The recurrent form (spec 3.4 step 5), per sequence, value head h (state S [dk, dv]) and token t:
//   S <- exp(g) S;  delta = beta (v - S^T k);  S <- S + k delta^T;  o = S^T (scale q)
// state[s] is [nv, dk, dv] fp32, row-major (HF's layout; vLLM stores the transpose), read as the
// initial state and overwritten with the final one. out is [tokens, nv, dv].
void gated_delta_rule_recurrent(const GdnShape& shape, const GdnInputs& in, float scale, const size_t* seq_starts,
                                size_t num_seqs, float* const* state, float* out, ThreadPool& pool);

// The chunked (WY / UT-transform) form of the same recurrence (spec 3.4 step 5'), chunks of 64 tokens
// counted from each sequence's first token. Same arguments and results as the recurrent form up to
// fp32 rounding. On the CPU it does more flops per token than the recurrent form and is no faster
// (about equal at the 80B-A3B head sizes, T = 512, 2 cores); it is here as the reference for the GPU
// prefill kernels, which compute exactly these chunk quantities.
void gated_delta_rule_chunked(const GdnShape& shape, const GdnInputs& in, float scale, const size_t* seq_starts,
                              size_t num_seqs, float* const* state, float* out, ThreadPool& pool);

inline constexpr size_t kGdnChunk = 64;

// ---- Gated attention (gated_attention.cpp) -------------------------------------------------------

// Spec 3.3 step 1: q_proj's output is [tokens, heads, 2 * head_dim] with each head's query followed
// by its gate. Writes q and gate as [tokens, heads, head_dim] each.
void split_query_gate(const float* qg, size_t tokens, size_t heads, size_t head_dim, float* q, float* gate);

// Spec 3.3 step 5: out <- out * sigmoid(gate), elementwise over n values.
void sigmoid_gate_mul(float* out, const float* gate, size_t n);

}  // namespace q3n::cpu
