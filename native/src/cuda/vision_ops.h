// CUDA kernels of the Qwen3-VL vision tower and of the VL text model's extras (shared/spec 4), one op
// per .cu file: vision_gemm, vision_layer_norm, vision_pos_embed, vision_rope_2d, vision_attention
// (with vision_attention_wgmma), vl_scatter_rows (the bf16 GEMM through cuBLASLt is
// cuda/gemm_bf16.h's). Their CPU twins are cpu/ops.h's layer_norm, gelu, add_bias,
// pos_embed_interpolate, vision_rope_2d, segment_attention and model/qwen3_attention.cpp's
// place_vision_embeddings / add_deepstack. Launchers take device pointers and a stream, check the
// launch and never synchronise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/ops.h"

namespace q3n::cuda {

// What vision_gemm does with the accumulated product p = sum_k x[m, k] W[n, k] (+ bias[n]).
enum class VisionEpilogue : int {
    Store = 0,       // y = p
    GeluTanh = 1,    // y = gelu_pytorch_tanh(p)
    GeluErf = 2,     // y = gelu_erf(p)
    Accumulate = 3,  // y += p (the residual adds of a ViT block)
};

// y[m * ldy + n] for m < rows, n < out: a tensor-core GEMM (mma.sync m16n8k16, bf16 x bf16 -> fp32)
// of fp32 activations rounded to bf16 (round to nearest even) as they are loaded, against bf16
// weights [out, k] row-major. k must be a multiple of 8. bias may be null.
void vision_gemm(const float* x, int rows, int k, const __nv_bfloat16* w, int out, const float* bias, float* y, int ldy,
                 VisionEpilogue epilogue, cudaStream_t stream);

// LayerNorm of `rows` rows of n (weight and bias), mean and variance in double like the CPU's.
void vision_layer_norm(const float* x, const float* weight, const float* bias, float* y, int rows, int n, float eps,
                       cudaStream_t stream);
// The same LayerNorm written as bf16 for a bf16 GEMM (cuda/gemm_bf16.h): each element is computed in
// fp32 exactly as vision_layer_norm computes it and rounded once (round to nearest even).
void vision_layer_norm_bf16(const float* x, const float* weight, const float* bias, __nv_bfloat16* y, int rows, int n,
                            float eps, cudaStream_t stream);
// The same over bf16 rows (the bf16 flow's residual stream), widened exactly before the arithmetic.
void vision_layer_norm_bf16(const __nv_bfloat16* x, const float* weight, const float* bias, __nv_bfloat16* y, int rows,
                            int n, float eps, cudaStream_t stream);

// x[p] += the learned [side*side, hidden] fp32 table interpolated bilinearly to a t x h x w grid, for
// the item's t*h*w patches in the processor's order (cpu::pos_embed_interpolate's arithmetic).
void vision_pos_embed_add(float* x, const float* table, int side, int t, int h, int w, int merge, int hidden,
                          cudaStream_t stream);
// y[p] = x[p] + the same interpolated row, the fp32 sum rounded once to bf16 (the bf16 flow's residual
// stream starts here).
void vision_pos_embed_add_bf16(const float* x, const float* table, int side, int t, int h, int w, int merge, int hidden,
                               __nv_bfloat16* y, cudaStream_t stream);

// The ViT's 2-D rotary, in place, on the q and k parts of qkv rows [tokens, 3, heads, head_dim] of one
// t x h x w item (patch coordinates derived from the processor's order). inv_freq has head_dim / 4
// entries, theta^(-2i / (head_dim / 2)) as float32, the CPU's table.
void vision_rope_2d(float* qkv, int tokens, int heads, int head_dim, int h, int w, int merge, const float* inv_freq,
                    cudaStream_t stream);
// The same rotary on bf16 qkv rows, in place: vision_rope_2d's fp32 arithmetic on the widened values,
// each result rounded once (round to nearest even).
void vision_rope_2d_bf16(__nv_bfloat16* qkv, int tokens, int heads, int head_dim, int h, int w, int merge,
                         const float* inv_freq, cudaStream_t stream);

// The rotary of one h x w frame as a table: (cos, sin) of c * inv_freq[i] at cs[c * (head_dim / 4) + i]
// for every grid coordinate c < max(h, w) (a patch's row turns the first quarter of its slots, its
// column the second): every angle vision_rope_2d computes, bit for bit, computed once for all blocks of
// the tower. vision_rope_table_entries(h, w, head_dim) float2s.
struct VisionRopeTable {
    const float2* cs = nullptr;
    int h = 0, w = 0, merge = 0;
};
size_t vision_rope_table_entries(int h, int w, int head_dim);
void vision_rope_table(float2* table, int h, int w, int head_dim, const float* inv_freq, cudaStream_t stream);
// Whether vision_rope_2d_bf16_keys takes head_dim (a multiple of 8, at most 128).
bool vision_rope_2d_keys_applies(int head_dim);
// vision_rope_2d_bf16 on the k heads only, from the table of the item's frame (token t is patch
// t % (h * w)): for an attention that turns q itself as it loads it (vision_attention_bf16's q_rope).
// Equal to vision_rope_2d_bf16's k heads bit for bit; the q heads are left as they are.
void vision_rope_2d_bf16_keys(__nv_bfloat16* qkv, int tokens, int heads, int head_dim, const VisionRopeTable& table,
                              cudaStream_t stream);

// Bidirectional attention within consecutive segments of seg_len tokens (one temporal slice each) over
// qkv rows [segments * seg_len, 3, heads, head_dim]; out is [tokens, heads * head_dim]. fp32
// throughout. head_dim 24, 32, 64, 72, 80 or 128 (others: Q3N_ERR_UNSUPPORTED).
void vision_attention(const float* qkv, int segments, int seg_len, int heads, int head_dim, float scale, float* out,
                      cudaStream_t stream);

// The same attention on tensor cores (bf16 -> fp32, online softmax in fp32): qkv rows
// [segments * seg_len, 3, heads, head_dim] in bf16, out [tokens, heads * head_dim] in bf16.
// head_dim a multiple of 8, at most 128 (others: Q3N_ERR_UNSUPPORTED). Where
// vision_attention_wgmma_applies(head_dim), it runs vision_attention_bf16_wgmma; otherwise mma.sync.
// q_rope (the rotary table of the frame each segment is; row r of a segment is its patch r): the q
// heads are still unturned and the kernel turns them as they arrive, exactly as vision_rope_2d_bf16
// would have (the k heads must be turned already: vision_rope_2d_bf16_keys). The table is read before
// the wait for the previous kernel, so a launch without programmatic dependent launch (such as the
// q|k|v GEMM before vision_rope_2d_bf16_keys) must lie between the table's writer and this call. Only
// where vision_attention_wgmma_applies(head_dim); elsewhere Q3N_ERR_INVALID_ARGUMENT.
void vision_attention_bf16(const __nv_bfloat16* qkv, int segments, int seg_len, int heads, int head_dim, float scale,
                           __nv_bfloat16* out, cudaStream_t stream, const VisionRopeTable* q_rope = nullptr);

// Whether vision_attention_bf16_wgmma serves head_dim (64, 72, 80 or 128) on the current device
// (compute capability 9.0).
bool vision_attention_wgmma_applies(int head_dim);
// vision_attention_bf16's attention on Hopper's wgmma with TMA-fed tiles (vision_attention_wgmma.cu):
// the same arguments, results and error bound; qkv 16-byte aligned, out 4-byte aligned. warpgroups:
// consumer warpgroups a block, 0 to choose by the launch's waves; 3 or 4 at head_dim 64 and 72, 2 at
// 80 and 128 (tests pin each variant).
void vision_attention_bf16_wgmma(const __nv_bfloat16* qkv, int segments, int seg_len, int heads, int head_dim,
                                 float scale, __nv_bfloat16* out, cudaStream_t stream, int warpgroups = 0,
                                 const VisionRopeTable* q_rope = nullptr);

// For i < count: x[rows[i] * n + j] (= or +=) src[i * src_stride + j], j < n. Rows are distinct.
void vl_scatter_rows(float* x, const int32_t* rows, int count, int n, const float* src, int src_stride, bool add,
                     cudaStream_t stream);

}  // namespace q3n::cuda
