// CUDA kernels of the Qwen3-Next blocks (shared/spec section 3) and of the sparse MoE (spec 2.2, 3.6),
// each the GPU twin of a CPU op in cpu/next_ops.h or cpu/ops.h with the same formula and layouts, so
// the CPU op is its test reference. Activations and recurrent state are fp32; expert weights stay bf16
// or block-FP8. Like ops.h: device pointers, a stream, launches checked, never a synchronisation.
//
// Packed sequences: `seq_starts` is a device array of num_seqs + 1 int32 token offsets (cu_seqlens,
// seq_starts[0] == 0), and `state` a device array of num_seqs device pointers, one per sequence.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/ops.h"

namespace q3n::cuda {

// ---- Gated DeltaNet --------------------------------------------------------------------------------

struct GdnShape {
    int nk;  // key heads (q and k)
    int nv;  // value heads, a multiple of nk; value head h reads q/k head h / (nv / nk)
    int dk;  // at most 512
    int dv;
};

// As cpu::GdnInputs: head h of token t at q + t * q_stride + h * dk (k likewise, v with dv), so q, k,
// v can be read in place from the conv output. g is the log-decay and beta the gate, [tokens, nv].
// q and k are L2-normalised already unless `l2norm` is set, in which case the kernels normalise
// them on the fly exactly as cpu::l2norm_heads does (x / sqrt(sum x^2 + l2norm_eps)), saving a pass.
struct GdnInputs {
    const float* q;
    int q_stride;
    const float* k;
    int k_stride;
    const float* v;
    int v_stride;
    const float* g;
    const float* beta;
    bool l2norm = false;
    float l2norm_eps = 1e-6f;
};

// The recurrent form (cpu::gated_delta_rule_recurrent), per sequence, value head and token:
//   S <- exp(g) S;  delta = beta (v - S^T k);  S <- S + k delta^T;  o = S^T (scale q)
// state[s] is [nv, dk, dv] fp32 (HF's layout), read and overwritten; out is [tokens, nv, dv].
// Meant for decode: with seq_starts == nullptr sequence s owns exactly token s. Any lengths work
// (tokens are walked in order with the state in registers), which also serves speculative decoding.
void gated_delta_rule_decode(const GdnShape& shape, const GdnInputs& in, float scale, const int32_t* seq_starts,
                             int num_seqs, float* const* state, float* out, cudaStream_t stream);

// The chunked (WY / UT-transform) form (cpu::gated_delta_rule_chunked), chunks of 64 tokens from each
// sequence's first token, for prefill. Same arguments and results as the recurrent form up to fp32
// rounding. Sequences of any length, including 0, are allowed; each (sequence, value head, 32-column
// slice of the state) is one block that walks its sequence's chunks in order.
void gated_delta_rule_chunked(const GdnShape& shape, const GdnInputs& in, float scale, const int32_t* seq_starts,
                              int num_seqs, float* const* state, float* out, cudaStream_t stream);

// ---- Causal depthwise conv1d + SiLU ----------------------------------------------------------------

// cpu::causal_conv1d_silu: for every sequence s, channel c and token t of s,
//   out[t, c] = silu( sum_{j<K} w[c, j] * m[t - (K-1) + j, c] )
// with rows before the sequence's first token taken from state[s] ([channels, K-1] fp32, oldest
// first), which is then overwritten with the last K-1 inputs. x and out are [tokens, channels]
// (out == x allowed). weight is [channels, K] fp32; 1 <= K <= 8. Decode is the case of one token
// per sequence.
void causal_conv1d_silu(const float* x, int channels, const float* weight, int kernel, const int32_t* seq_starts,
                        int num_seqs, float* const* state, float* out, cudaStream_t stream);

// ---- Sparse MoE: routing -------------------------------------------------------------------------

// The routing of one batch of `tokens` rows; every array is caller-owned device memory.
struct MoeRouting {
    int32_t* experts;     // [tokens, top_k] best first (as cpu::moe_route)
    float* weights;       // [tokens, top_k]
    int32_t* offsets;     // [num_experts + 1]: expert e owns permuted rows offsets[e] .. offsets[e+1]
    int32_t* order;       // [tokens * top_k]: permuted row -> assignment t * top_k + j
    int32_t* position;    // [tokens * top_k]: assignment -> permuted row (the inverse of order)
    int32_t* active;      // [num_experts + 1]: active[0] = experts with tokens, then their indices ascending
};

// cpu::moe_route on the device (fp32 softmax over all experts, top_k by repeated strict-greater scans:
// ties to the lower index, NaN below every number; then w / sum(w) when renormalising), followed by
// the counting sort of cpu::moe_forward: assignments grouped by expert, ascending within each. At
// most 1024 experts; one launch up to 64 tokens, two past that. Token t's logits start at
// logits + t * logits_ld (0: num_experts), so a router stacked with other outputs (Qwen3-Next's
// shared-expert gate as column num_experts) is read in place.
void moe_route(const float* logits, int tokens, int num_experts, int top_k, bool renormalize,
               const MoeRouting& routing, cudaStream_t stream, int logits_ld = 0);

// ---- Sparse MoE: experts -------------------------------------------------------------------------

// One SwiGLU expert: gate and up [I, H], down [H, I].
struct DeviceMoeExpert {
    DeviceLinear gate;
    DeviceLinear up;
    DeviceLinear down;
};

// The experts of one MoE block. `experts` is a device array of num_experts descriptors, followed by
// the shared expert's when has_shared (Qwen3-Next). Every weight has the same `type` (BF16 or
// FP8_E4M3), rows 16-byte aligned when hidden and the widths are multiples of 16 (the fast path).
struct DeviceMoe {
    WeightType type = WeightType::BF16;
    const DeviceMoeExpert* experts = nullptr;
    int num_experts = 0;
    int top_k = 0;
    int hidden = 0;
    int inter = 0;         // moe_intermediate_size
    bool has_shared = false;
    int shared_inter = 0;  // shared_expert_intermediate_size
};

// Bytes of the caller-owned workspace moe_experts needs for `tokens` rows.
size_t moe_workspace_bytes(const DeviceMoe& moe, int tokens);

// y[t] = sum over t's experts in ascending index order of w * Expert_e(x[t])
//        (+ sigmoid(shared_gate_logits[t * shared_gate_ld]) * Shared(x[t]) when moe.has_shared),
// the sums of cpu::moe_forward and of Qwen3-Next's MLP in the same order, repeating bit for bit. x
// and y are [tokens, hidden] and must not alias. Gate/up and down each run as one launch over all
// (expert, row tile) pairs, sized from the token count (a captured graph serves every routing);
// experts without tokens cost one early-exiting block per tile. FP8 experts with widths multiples of
// 16 run on tensor cores (3 launches up to 64 tokens, tiled GEMMs past that), the rest on CUDA cores.
// `workspace` must be 256-byte aligned (cudaMalloc'd) and hold moe_workspace_bytes. A shared_gate_ld
// of num_experts + 1 with shared_gate_logits = logits + num_experts reads the gate from the column
// after the router's (the stacked router|gate rows of DeviceMoeBlock::router_gate).
void moe_experts(const float* x, int tokens, const DeviceMoe& moe, const MoeRouting& routing,
                 const float* shared_gate_logits, float* y, void* workspace, cudaStream_t stream,
                 int shared_gate_ld = 1);

// moe_route then moe_experts, from the router's logits (token t's at logits + t * logits_ld, 0:
// num_experts). With Q3N_MOE_FUSED=1, where moe_forward_fusable holds, it is moe_forward_fused instead
// (which leaves `routing` unwritten).
void moe_forward(const float* logits, int logits_ld, int tokens, const DeviceMoe& moe, bool renormalize,
                 const MoeRouting& routing, const float* x, const float* shared_gate_logits, float* y, void* workspace,
                 cudaStream_t stream, int shared_gate_ld = 1);

// The same y, bit for bit, from one persistent launch (after a small prologue) that routes inside
// every block and streams the chosen experts' weights (moe_fp8_decode_fused.cu): 1 to 8 tokens, FP8
// experts on the tensor-core path, tokens * top_k <= 128. Off by default: slower than the two calls
// so far (measured on the H100; see that file).
bool moe_forward_fusable(const DeviceMoe& moe, int tokens);
void moe_forward_fused(const float* logits, int logits_ld, int tokens, const DeviceMoe& moe, bool renormalize,
                       const float* x, const float* shared_gate_logits, float* y, void* workspace, cudaStream_t stream,
                       int shared_gate_ld = 1);

// ---- Qwen3-Next layer glue (the CUDA runner's fused steps between the kernels above) ------------

// Spec 3.3 step 5 fused with the FP8 quantisation o_proj may need: for token t, head h, channel i,
//   o[t, h d + i] *= sigmoid(gate[t * gate_stride + h * 2d + i])      (cpu::sigmoid_gate_mul)
// in place, then (when q is not null) quantize_fp8's rule over each token's row of heads * d.
void sigmoid_gate_quantize(float* o, const float* gate, int gate_stride, int tokens, int heads, int head_dim, float* q,
                           float* scales, cudaStream_t stream);

// Spec 3.4 steps 1 and 3. `proj` rows (proj_stride floats) hold in_proj_qkvz's output (per key head
// group: q, k, r value heads' v, their z) and `ba` rows (ba_stride) in_proj_ba's (per group: r b's,
// then r a's). Writes the conv input qkv [tokens, 2 nk dk + nv dv] as q | k | v head-major
// (deinterleave_qkvz), z [tokens, nv dv], and the gates of cpu::gdn_gates: beta = sigmoid(b),
// g = -exp(A_log) * softplus(a + dt_bias) (softplus(x) = x above 20), both [tokens, nv].
void gdn_split_gates(const float* proj, int proj_stride, const float* ba, int ba_stride, int tokens,
                     const GdnShape& shape, const float* A_log, const float* dt_bias, float* qkv, float* z, float* beta,
                     float* g, cudaStream_t stream);

// gdn_split_gates then causal_conv1d_silu on the conv input it writes, in one launch (decode steps: two
// short launches become one): out is the conv's [tokens, 2 nk dk + nv dv], z, beta and g as
// gdn_split_gates writes them, state[s] carried as causal_conv1d_silu carries it; every value bit for
// bit the two kernels'. The tokens are those of seq_starts' sequences.
void gdn_split_conv(const float* proj, int proj_stride, const float* ba, int ba_stride, const GdnShape& shape,
                    const float* A_log, const float* dt_bias, const float* weight, int kernel, const int32_t* seq_starts,
                    int num_seqs, float* const* state, float* out, float* z, float* beta, float* g, cudaStream_t stream);

// A whole decode step of a Gated DeltaNet layer between in_proj and out_proj, in one launch: what
// gdn_split_conv, then gated_delta_rule_decode (q and k L2-normalised with l2norm_eps, q scaled by
// `scale`), then rmsnorm_gated_quantize (y, and q / scales when q is not null) compute, bit for bit,
// carrying both states the same way. `conv_state` and `state` are the two kernels' state tables.
// Shapes are limited (gdn_decode_fusable): dk <= 128, (nv / nk) x ceil(dv / 32) <= 8, conv kernel
// <= 4, and dv a multiple of 128 when quantising; the runner falls back to the three launches.
bool gdn_decode_fusable(const GdnShape& shape, int kernel, bool quantize);
void gdn_decode_fused(const float* proj, int proj_stride, const float* ba, int ba_stride, const GdnShape& shape,
                      const float* A_log, const float* dt_bias, const float* conv_weight, int kernel,
                      const float* norm_weight, float norm_eps, float l2norm_eps, float scale, const int32_t* seq_starts,
                      int num_seqs, float* const* conv_state, float* const* state, float* y, float* q, float* scales,
                      cudaStream_t stream);

// Spec 3.4 step 6 (cpu::rmsnorm_gated) on rows of `heads` heads of d values:
//   y = (w * (x / sqrt(mean(x^2) + eps))) * silu(z)        per head, w [d] shared by all heads
// y == x allowed; then (when q is not null) quantize_fp8's rule over each token's row of heads * d.
void rmsnorm_gated_quantize(const float* x, const float* z, const float* weight, int tokens, int heads, int d, float eps,
                            float* y, float* q, float* scales, cudaStream_t stream);

}  // namespace q3n::cuda
