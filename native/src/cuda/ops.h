// CUDA kernels of the dense Qwen3 forward pass, one op per .cu file. Activations are fp32 like the
// CPU backend's, so every op can be compared with its CPU twin; weights stay bf16 or block-FP8.
// Launchers take device pointers and a stream; they check the launch and never synchronise.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/device_buffer.h"
#include "model/weights.h"

namespace q3n::cuda {

// A Linear whose data (and FP8 block scales) live on the device.
struct DeviceLinear {
    WeightType type = WeightType::BF16;
    const void* data = nullptr;
    const float* scales = nullptr;  // FP8: [ceil(out/128), scale_cols]
    int out = 0;
    int in = 0;
    int scale_cols = 0;
    const float* gemm_scales = nullptr;  // FP8: the block scales in cuBLASLt's order (gemm_fp8), when available
};

// Where a quantising kernel (rmsnorm_quantize, silu_mul_quantize, quantize_fp8) puts a step's FP8
// activations. Widened: each e4m3 value as an fp32 in q [rows][k] and the scales in scales
// [rows][ceil(k/128)], what linear() reads. Packed: the e4m3 codes in q8 [rows][k] and the scales in
// scales8 in cuBLASLt's order ([group][padded] when scales_m_fast, else [row][group]), what
// gemm_fp8_packed reads: the producer writes the GEMM's input itself, where gemm_fp8 would read
// the widened values back and pack them in a pass of its own (four bytes read and one written per
// value, at 8K prompt tokens a tenth of Qwen3-4B's prefill). Rows from `rows` up to `padded` (the
// next multiple of 16) must be zero in both: zero_fp8_padding clears them.
struct Fp8Out {
    float* q = nullptr;
    float* scales = nullptr;
    uint8_t* q8 = nullptr;
    float* scales8 = nullptr;
    int padded = 0;
    bool scales_m_fast = false;
};

// The first bytes of the weights a decode step's next GEMV streams. A small kernel before that GEMV
// (a norm, SwiGLU, the attention), during which the memory would otherwise idle, asks L2 to fetch
// them (l2_prefetch.cuh), so that the GEMV finds them there. Empty: nothing to fetch.
struct L2Prefetch {
    const void* ptr = nullptr;
    size_t bytes = 0;
};

// What a step of `rows` rows should prefetch of w for its GEMV: up to Q3N_L2_PREFETCH_MB (4 by
// default, read once; 0 turns it off) of its first bytes when linear() streams w (rows <= 8), else
// nothing.
L2Prefetch l2_prefetch_for(const DeviceLinear& w, int rows);

// Grow-only buffers gemm_fp8 packs activations into (q8, scales, transposed) and linear_bf16_tc
// splits them into (hilo); sized before a graph capture.
struct GemmScratch {
    DeviceBuffer q8, scales, transposed, hilo;
};

// Where each token of a step sits: its sequence's block table and its position.
struct DeviceBatch {
    int tokens = 0;
    const int32_t* positions = nullptr;     // [tokens]
    const int32_t* seq_of_token = nullptr;  // [tokens]
    const int32_t* block_tables = nullptr;  // [sequences][max_blocks]
    int max_blocks = 0;
    // Some sequence brings several tokens (a prompt or a chunk of one): attention() may then take
    // the tensor-core prefill kernel. Decode steps (one token per sequence) never do, however wide.
    bool prefill = false;
};

// One layer of the device KV cache: [num_blocks][block_size][kv_heads][head_dim].
struct DeviceKvLayer {
    KvDtype dtype = KvDtype::BF16;
    void* k = nullptr;
    void* v = nullptr;
    int block_size = 16;
    int kv_heads = 0;
    int head_dim = 0;
};

void embed(const DeviceLinear& table, const int32_t* tokens, int count, float* out, cudaStream_t stream);

void rmsnorm(const float* x, const float* weight, float* y, int rows, int n, float eps, cudaStream_t stream);

// Per token and 128-channel group: s = max(amax, 1e-10) / 448, q = e4m3(clamp(x / s)). The values
// are stored widened to fp32 (exact) for the GEMV; `scales` is [rows, ceil(k/128)].
void quantize_fp8(const float* x, int rows, int k, float* q, float* scales, cudaStream_t stream);
void quantize_fp8(const float* x, int rows, int k, const Fp8Out& out, cudaStream_t stream);

// y[m * ldy + n] = sum_k x[m, k] W[n, k] for m < rows, n < w.out; ldy lets several Linears write
// side by side into one buffer (q|k|v, gate|up). FP8 weights read `quantized` and `act_scales`
// from quantize_fp8 instead of x (spec 5.4: per-group partial sums scaled by both scales).
void linear(const float* x, const float* quantized, const float* act_scales, int rows, const DeviceLinear& w, float* y,
            int ldy, cudaStream_t stream);

// y = x W^T for BF16 W and `rows` fp32 activation rows on tensor cores, accurate like linear():
// x is split into three bf16 parts (scratch.hilo must hold linear_bf16_tc_scratch_bytes; it is
// never grown here) and both go through cuBLASLt. False when this path cannot take the call (the
// caller runs linear()); y may then be partly written.
bool linear_bf16_tc(const float* x, int rows, const DeviceLinear& w, float* y, int ldy, GemmScratch& scratch,
                    cudaStream_t stream);
size_t linear_bf16_tc_scratch_bytes(int rows, int k);

// Whether gemm_fp8 can run on this device and cuBLASLt (probed once against linear(); synchronises).
bool gemm_fp8_available(cudaStream_t stream);
// Whether the runners send many-row FP8 linears to gemm_fp8: when it is available, unless the
// environment has Q3N_FP8_EXACT=1. Hopper's FP8 tensor cores accumulate with fewer bits than fp32
// (1-3e-4 relative per GEMM against the exact definition); the exact GEMV at every row count makes
// results batch-invariant (a prompt's logits do not depend on how its tokens were grouped into
// steps) at the cost of slower prefill. Read when a runner is created.
bool fp8_gemm_enabled(cudaStream_t stream);
// What the probe found, one line per operand arrangement tried (for benchmarks and bug reports).
std::string gemm_fp8_probe_report(cudaStream_t stream);
// The weight block scales ([ceil(out/128), ceil(in/128)] row-major) rearranged for gemm_fp8; empty
// when it is not available.
std::vector<float> gemm_fp8_weight_scales(const std::vector<float>& scales, int out, int in, cudaStream_t stream);
// linear() for FP8 weights on tensor cores through cuBLASLt, from quantize_fp8's output. Returns
// false (having done nothing) when this weight or output cannot take that path.
bool gemm_fp8(const float* quantized, const float* act_scales, int rows, const DeviceLinear& w, float* y, int ldy,
              GemmScratch& scratch, cudaStream_t stream);

// The packed Fp8Out for `rows` rows of `k` channels in scratch's q8 and scales (sized by
// DeviceWeights::size_gemm_scratch), in the scale order the probe chose; null pointers when
// gemm_fp8 is not available.
Fp8Out gemm_fp8_packed_out(GemmScratch& scratch, int rows, cudaStream_t stream);
// Zeroes the padding rows of a packed Fp8Out of `rows` rows of `k` channels (nothing when rows is a
// multiple of 16).
void zero_fp8_padding(const Fp8Out& out, int rows, int k, cudaStream_t stream);
// Whether gemm_fp8 and gemm_fp8_packed take this weight writing rows of `ldy` floats (they also need
// y, and gemm_fp8 its activations, 16-byte aligned).
bool gemm_fp8_takes(const DeviceLinear& w, int ldy);
// gemm_fp8 from a packed Fp8Out: no packing pass. False (having done nothing) where gemm_fp8_takes
// is false.
bool gemm_fp8_packed(const Fp8Out& in, int rows, const DeviceLinear& w, float* y, int ldy, GemmScratch& scratch,
                     cudaStream_t stream);

// qkv is [tokens, (heads + 2 * kv_heads) * head_dim] (q, then k, then v). Normalises q and k heads
// (RMSNorm over head_dim), applies NeoX rotary to their first rot_dim channels, and writes k and v
// into the cache; q is rewritten in place.
void qk_norm_rope_kv_write(float* qkv, int heads, const DeviceKvLayer& kv, const float* q_norm, const float* k_norm,
                           float eps, const float* inv_freq, int rot_dim, float attention_scaling,
                           const DeviceBatch& batch, cudaStream_t stream);

// qk_norm_rope_kv_write over Qwen3-Next's gated attention projection (spec 3.3 step 1): `src` rows
// (src_stride floats per token) hold q_proj's output, [heads, 2 head_dim] with each head's query
// followed by its gate, then k [kv_heads, head_dim] and v [kv_heads, head_dim]. The normalised,
// rotated q heads go to q_out ([tokens, q_stride floats], head h at h * head_dim), k and v to the
// cache; src is not written, so the gates stay there for sigmoid_gate_quantize.
void qk_norm_rope_kv_write_gated(const float* src, int src_stride, float* q_out, int q_stride, int heads,
                                 const DeviceKvLayer& kv, const float* q_norm, const float* k_norm, float eps,
                                 const float* inv_freq, int rot_dim, float attention_scaling, const DeviceBatch& batch,
                                 cudaStream_t stream);

// qk_norm_rope_kv_write for Interleaved-MRoPE (spec 4.4): rotary slot i (< rot_dim / 2) rotates by
// mrope[axis[i] * batch.tokens + t] (the t, h, w rows of StepBatch::mrope_positions), while the cache
// slot stays batch.positions[t]. axis holds 0, 1 or 2 per slot (config.cpp's mrope_axes).
void qk_norm_rope_kv_write_mrope(float* qkv, int heads, const DeviceKvLayer& kv, const float* q_norm,
                                 const float* k_norm, float eps, const float* inv_freq, const uint8_t* axis,
                                 int rot_dim, float attention_scaling, const int32_t* mrope, const DeviceBatch& batch,
                                 cudaStream_t stream);

// Causal GQA attention of each token's q heads over its sequence's cache up to its position.
// q has a row stride of `q_stride` floats per token; out is [tokens, heads * head_dim].
// With a workspace (attention_workspace_bytes for the step's token count) long contexts are split
// over several blocks per (token, kv head) and merged; without one each runs in a single block.
// With q_out (and q_scales), also out's FP8 quantisation exactly as quantize_fp8(out, tokens,
// heads * head_dim, q_out, q_scales) writes it, for an FP8 o_proj: when head_dim is a multiple of
// 128 (a head is whole quantisation groups) the decode kernels write it with the output, which saves
// a launch per layer; otherwise, and for prefill steps, quantize_fp8 runs after them. out is
// written either way.
void attention(const DeviceKvLayer& kv, const float* q, int q_stride, int heads, float scale, const DeviceBatch& batch,
               float* out, cudaStream_t stream, void* workspace = nullptr, size_t workspace_bytes = 0,
               float* q_out = nullptr, float* q_scales = nullptr);
size_t attention_workspace_bytes(int tokens, int heads, int kv_heads, int head_dim);

// qk_norm_rope_kv_write followed by attention() over the fused q|k|v row, as one launch (one more
// for the merge of long contexts), for decode steps: batch.prefill false, one token per sequence.
// Each attention block normalises and rotates its group's q heads itself, and the block holding the
// token's position writes k and v to the cache. The cache's earlier keys load before the kernel
// waits for the projection. Output, FP8 output and cache equal the two calls' bit for bit; qkv is
// not written. What it measured: attention.cu's header.
void attention_decode_qk_norm_rope(const DeviceKvLayer& kv, const float* qkv, int heads, const float* q_norm,
                                   const float* k_norm, float eps, const float* inv_freq, int rot_dim,
                                   float attention_scaling, float scale, const DeviceBatch& batch, float* out,
                                   cudaStream_t stream, void* workspace = nullptr, size_t workspace_bytes = 0,
                                   float* q_out = nullptr, float* q_scales = nullptr, const L2Prefetch& next = {});
// The shapes it takes: head_dim 64, 128 or 256 and rot_dim a multiple of 64 up to head_dim (those
// of qk_norm_rope_kv_write's warp form).
bool attention_decode_fusable(const DeviceKvLayer& kv, int rot_dim);
// Whether a runner should call it for this step instead of the two ops: a decode step of at most 8
// tokens (wider ones measured slower: every split of a token normalises its q heads again), a
// fusable shape, and Q3N_ATTN_FUSED_QK not 0 (read once, for measuring what it gains).
bool attention_decode_fuses(const DeviceBatch& batch, const DeviceKvLayer& kv, int rot_dim);
// attention() whose FP8 output goes to a packed Fp8Out (a step past the GEMV's rows): prefill steps
// quantise in attention_prefill's epilogue and leave out unwritten there; other steps write out and
// quantise it with quantize_fp8.
void attention_packed(const DeviceKvLayer& kv, const float* q, int q_stride, int heads, float scale,
                      const DeviceBatch& batch, float* out, cudaStream_t stream, void* workspace, size_t workspace_bytes,
                      const Fp8Out& quant);

// attention() on tensor cores for prefill steps (attention_prefill.cu): the same semantics, with Q
// and the softmax weights rounded to bf16 for the products (fp32 softmax and accumulation); an F32
// cache is rounded to bf16 on load. head_dim 64, 128 or 256. Positions must rise strictly within a
// sequence's tokens of a step (prefill chunks do); sequences need not start at position 0.
// With a packed `quant` (Fp8Out), out's FP8 quantisation as quantize_fp8(out, ..., quant) writes it,
// instead of out itself: in the kernel's epilogue at head_dim 128, else by quantize_fp8 after it.
void attention_prefill(const DeviceKvLayer& kv, const float* q, int q_stride, int heads, float scale,
                       const DeviceBatch& batch, float* out, cudaStream_t stream, const Fp8Out& quant = Fp8Out{});
// Whether attention() should hand a step of `tokens` tokens to attention_prefill (host side, from
// launch-time values only): a BF16 cache of a supported head_dim and more than 64 tokens.
bool attention_prefill_applicable(const DeviceKvLayer& kv, int tokens);

// out[t, i] = silu(gu[t, i]) * gu[t, inter + i], gu being [tokens, 2 * inter].
void silu_mul(const float* gate_up, int tokens, int inter, float* out, cudaStream_t stream);

void add_inplace(float* x, const float* y, int n, cudaStream_t stream);

// x += residual (when residual is not null), then y = rmsnorm(x) * weight in fp32 (when y is not
// null) and its FP8 quantisation into q/scales as quantize_fp8 writes them (when q is not null).
void rmsnorm_quantize(float* x, const float* residual, const float* weight, int rows, int n, float eps, float* y,
                      float* q, float* scales, cudaStream_t stream);
void rmsnorm_quantize(float* x, const float* residual, const float* weight, int rows, int n, float eps, float* y,
                      const Fp8Out& out, cudaStream_t stream, const L2Prefetch& next = {});

// silu_mul into `out` (when not null) and its FP8 quantisation into q/scales (when q is not null).
void silu_mul_quantize(const float* gate_up, int tokens, int inter, float* out, float* q, float* scales,
                       cudaStream_t stream);
void silu_mul_quantize(const float* gate_up, int tokens, int inter, float* out, const Fp8Out& q, cudaStream_t stream,
                       const L2Prefetch& next = {});

// out[r] = x[rows[r]] for rows of `n` floats.
void gather_rows(const float* x, const int32_t* rows, int count, int n, float* out, cudaStream_t stream);

}  // namespace q3n::cuda
