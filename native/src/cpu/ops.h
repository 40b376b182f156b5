// CPU kernels: the reference backend. Activations are fp32 throughout; weights stay in their
// checkpoint format (bf16 or block-FP8) and are widened inside the inner loops. The FP8 path does
// what the GPU kernels do (shared/spec 5.3-5.4): activations quantised per token per 128 channels to
// e4m3, block products summed in fp32 and scaled per block.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/thread_pool.h"
#include "model/weights.h"

namespace q3n::cpu {

// y[r] = w * x[r] / sqrt(mean(x[r]^2) + eps), for `rows` rows of `n` values. In place allowed.
void rmsnorm(const float* x, const float* weight, float* y, size_t rows, size_t n, float eps, ThreadPool& pool);

// Per token and 128-channel group g: s = max(amax, 1e-10) / 448, q = e4m3(clamp(x / s, -448, 448)).
// The last group of a row may be shorter than 128. `q` holds [rows, k] bytes, `scales` [rows, ceil(k/128)].
void quantize_fp8_per_token_group(const float* x, size_t rows, size_t k, uint8_t* q, float* scales);

// y[m, n] = sum_k x[m, k] * W[n, k] for a Linear of any weight type; y is [rows, w.out].
void linear(const float* x, size_t rows, const Linear& w, float* y, ThreadPool& pool);

// Embedding lookup: rows of `table` ([vocab, hidden]) widened to fp32.
void embed(const Linear& table, const int32_t* tokens, size_t count, float* out);

// out = silu(gate) * up, elementwise over n values.
void silu_mul(const float* gate, const float* up, float* out, size_t n);

// x += y, elementwise.
void add_inplace(float* x, const float* y, size_t n);

// Rotary tables: inv_freq per rotated pair and the attention scaling YaRN applies to cos and sin.
struct Rope {
    std::vector<float> inv_freq;  // rot_dim / 2 entries
    float attention_scaling = 1.0f;
    size_t rot_dim = 0;
    // MRoPE (Qwen3-VL, spec 4.4): which position axis (0 t, 1 h, 2 w) drives each of the rot_dim / 2
    // slots. Empty: one position per token drives every slot.
    std::vector<uint8_t> axis;

    size_t position_axes() const { return axis.empty() ? 1 : 3; }
};

// NeoX ("rotate half") rotary embedding on the first rope.rot_dim channels of every head of x
// ([tokens, heads, head_dim]). `positions` holds rope.position_axes() rows of `tokens` values: one
// position per token, or for MRoPE the t row, then the h row, then the w row ([3][tokens]).
void apply_rope(float* x, size_t tokens, size_t heads, size_t head_dim, const int32_t* positions, const Rope& rope);

// A layer's slice of the paged KV cache: [num_blocks][block_size][kv_heads][head_dim] for K and V.
struct PagedKvLayer {
    KvDtype dtype;
    void* k;
    void* v;
    size_t block_size;
    size_t kv_heads;
    size_t head_dim;
};

// Where one query token reads and writes: its sequence's block table and its position.
struct TokenSlot {
    const int32_t* block_table;
    int32_t position;  // attends to positions [0, position]; its own K/V lands at `position`
};

// Stores k and v ([tokens, kv_heads, head_dim]) at each token's slot.
void kv_write(const PagedKvLayer& kv, const float* k, const float* v, const TokenSlot* slots, size_t tokens);

// Causal GQA attention over the paged cache. q is [tokens, heads, head_dim]; out the same shape.
// Query head h uses KV head h / (heads / kv_heads). Scores and softmax in fp32.
void attention(const PagedKvLayer& kv, const float* q, const TokenSlot* slots, size_t tokens, size_t heads,
               float scale, float* out, ThreadPool& pool);

// ---- Mixture of experts (Qwen3-MoE, shared/spec 2.2; implemented in moe.cpp) -------------------

// One expert: a SwiGLU of width moe_intermediate_size. Views into the checkpoint like every Linear.
struct MoeExpert {
    Linear gate;  // [I_e, H]
    Linear up;    // [I_e, H]
    Linear down;  // [H, I_e]
};

// A sparse block: the router [E, H] and its E experts (the caller keeps both alive).
struct MoeBlock {
    const Linear* router = nullptr;
    const MoeExpert* experts = nullptr;
    size_t num_experts = 0;
    size_t top_k = 0;
    bool renormalize = false;  // norm_topk_prob
};

// Per token: p = softmax(logits) in fp32 over all experts, the top_k largest (ties: lower index
// first, as torch.topk in practice), weights p or p / sum(top-k p) when renormalising. logits is
// [tokens, num_experts]; experts and weights are [tokens, top_k], best first.
void moe_route(const float* logits, size_t tokens, size_t num_experts, size_t top_k, bool renormalize,
               int32_t* experts, float* weights);

// Grow-only buffers of moe_forward, kept by the caller so steady-state decode allocates nothing.
struct MoeScratch {
    std::vector<float> logits, weights, rows, gate, up, out;
    std::vector<int32_t> experts, order;
    std::vector<uint32_t> offsets;
};

// y[t] = sum_j w[t, j] * Expert_{e[t, j]}(x[t]) for tokens rows of x ([tokens, H]); y is
// [tokens, H] and must not alias x. Each expert runs once on the rows routed to it.
void moe_forward(const float* x, size_t tokens, const MoeBlock& block, float* y, MoeScratch& scratch,
                 ThreadPool& pool);

}  // namespace q3n::cpu

// ==== Qwen3-VL vision tower (shared/spec 4.2) ====================================================
// One op per file: layer_norm.cpp, gelu.cpp, add_bias.cpp, pos_embed_interpolate.cpp,
// vision_rope_2d.cpp, segment_attention.cpp.
#include "model/mrope_positions.h"  // GridThw

namespace q3n::cpu {

// y = (x - mean) / sqrt(var + eps) * weight + bias per row (biased variance, as torch's LayerNorm).
// Statistics in double. In place allowed.
void layer_norm(const float* x, const float* weight, const float* bias, float* y, size_t rows, size_t n, float eps,
                ThreadPool& pool);

// In place. gelu_tanh is transformers' "gelu_pytorch_tanh", 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3)));
// gelu_erf is torch.nn.GELU(), 0.5x(1 + erf(x / sqrt(2))).
void gelu_tanh(float* x, size_t n);
void gelu_erf(float* x, size_t n);

// y[r, i] += bias[i] for `rows` rows of n.
void add_bias(float* y, const float* bias, size_t rows, size_t n);

// The learned [side*side, hidden] position table interpolated bilinearly to each grid (transformers'
// fast_pos_embed_interpolate: float32 linspace(0, side-1, h) per axis, floor/ceil corners, weights
// (1-dy)(1-dx), (1-dy)dx, dy(1-dx), dy dx summed in that order), one row per patch in the processor's
// patch order (t, h/merge, w/merge, merge, merge); out is [sum t*h*w, hidden].
void pos_embed_interpolate(const Linear& table, size_t side, const GridThw* grids, size_t n_grids, uint32_t merge,
                           float* out);

// (row, col) on its grid of every patch, in the same patch order; coords is [n_patches, 2].
void vision_patch_coords(const GridThw* grids, size_t n_grids, uint32_t merge, int32_t* coords);

// The ViT's 2-D rotary on x [tokens, heads, head_dim] (head_dim % 4 == 0): angles
// [row * f_i, col * f_i] for f_i = theta^(-2i / (head_dim/2)), i < head_dim/4, duplicated to head_dim
// and applied NeoX style (rotate half) to the whole head.
void vision_rope_2d(float* x, size_t tokens, size_t heads, size_t head_dim, const int32_t* coords, float theta);

// Bidirectional attention restricted to segments [cu[s], cu[s+1]) (one image or video frame pair each).
// q, k, v, out are [tokens, heads, head_dim]; scores and softmax in fp32.
void segment_attention(const float* q, const float* k, const float* v, size_t tokens, size_t heads, size_t head_dim,
                       const uint32_t* cu_seqlens, size_t segments, float scale, float* out, ThreadPool& pool);

}  // namespace q3n::cpu
