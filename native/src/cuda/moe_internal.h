// What the sparse-MoE files share (moe_route.cu, moe_grouped_gemm.cu and the moe_*.cu paths it
// dispatches to): the block's sizes as the kernels see them, the workspace carve and the launchers.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

#include "cuda/cuda_check.h"
#include "cuda/next_ops.h"
#include "cuda/shared_memory_optin.h"

namespace q3n::cuda::moe {

// Permuted rows: routed assignments first (grouped by expert, moe_route's order), then, with a shared
// expert, one row per token (row routed_rows + t). `width` is the stride of the SwiGLU rows.
struct Dims {
    int E, k, tokens, routed_rows, width, hidden;
    bool shared;
};

// The row of x (a token) that permuted row p reads.
__device__ __forceinline__ int token_of_row(const Dims& d, const int32_t* order, int p) {
    return p < d.routed_rows ? order[p] / d.k : p - d.routed_rows;
}

// Carved from moe_experts' workspace; the f16 buffers are e4m3 values (exact in f16) for the
// tensor-core paths, the fp32 ones (same bytes, reused) quantize_fp8's output for the CUDA-core path.
struct Workspace {
    void* xq;      // [tokens, hidden]
    float* xs;     // [tokens, ceil(hidden / 128)]
    float* h;      // [rows, width] SwiGLU output
    void* hq;      // [rows, width]
    float* hs;     // [rows, ceil(width / 128)]
    float* o;      // [rows, hidden] expert outputs before the weighted sum
    int32_t* plan; // the prefill tile list (moe_fp8_prefill.cu)
    int32_t* decode;  // the decode path's counters and per-token pick lists (moe_fp8_decode.cu)
};

// moe_quantize_rows.cu: quantize_fp8's rule per row and 128-channel group, values stored as f16.
// Row r has len0 channels when r < split, else len1 (routed and shared SwiGLU rows); channels past a
// row's length are neither read nor written. src and q have `ld` elements per row, scales scale_ld.
void quantize_rows_f16(const float* src, int rows, int split, int len0, int len1, int ld, __half* q, float* scales,
                       int scale_ld, cudaStream_t stream);

// moe_unpermute.cu: y[t] = sum over t's experts in ascending index order of w * o[row] (+ the shared
// expert's row times sigmoid(shared_gate[t * sg_ld])).
void unpermute(const float* o, const Dims& d, const MoeRouting& r, const float* shared_gate, int sg_ld, float* y,
               cudaStream_t stream);

// moe_fp8_decode.cu: whether the decode path takes this block (FP8, widths multiples of 16, hidden
// <= 4096, intermediate <= 2048), the bytes of its workspace region, and the whole block (y included)
// for up to kFp8DecodeMaxTokens tokens.
constexpr int kFp8DecodeMaxTokens = 64;
bool fp8_decode_applicable(const DeviceMoe& m);
size_t fp8_decode_scratch_bytes(const DeviceMoe& m, int tokens);
void fp8_decode(const float* x, const DeviceMoe& m, const Dims& d, const MoeRouting& r, const float* shared_gate,
                int sg_ld, float* y, const Workspace& w, cudaStream_t stream);

// moe_fp8_decode_fused.cu: routing and the FP8 experts in one persistent launch (after a prologue that
// quantises x and clears its counters), for 1 to kFusedDecodeMaxTokens tokens; y as moe_route +
// fp8_decode give it, bit for bit, without writing the routing arrays. Its counters live in the
// decode region of the workspace (fp8_decode_scratch_bytes covers them).
constexpr int kFusedDecodeMaxTokens = 8;
bool fused_decode_applicable(const DeviceMoe& m, int tokens);
size_t fused_decode_scratch_bytes(const DeviceMoe& m, int tokens);
void fused_decode(const float* logits, int logits_ld, const float* x, const DeviceMoe& m, const Dims& d,
                  bool renormalize, const float* shared_gate, int sg_ld, float* y, const Workspace& w,
                  cudaStream_t stream);

// moe_fp8_prefill.cu: SwiGLU rows into w.h, then expert outputs into w.o, for any number of tokens,
// as tiled tensor-core GEMMs (unpermute() then sums them).
bool fp8_prefill_applicable(const DeviceMoe& m);
size_t fp8_prefill_plan_bytes(const DeviceMoe& m, int tokens);
void fp8_prefill(const float* x, const DeviceMoe& m, const Dims& d, const MoeRouting& r, const Workspace& w,
                 cudaStream_t stream);

}  // namespace q3n::cuda::moe
