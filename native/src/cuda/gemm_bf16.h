// The vision tower's projections on cuBLASLt (gemm_bf16_cublaslt.cu): bf16 activations and weights,
// fp32 accumulation, the bias, GELU or residual add fused into the matmul's epilogue. vision_gemm
// (cuda/vision_ops.h) is the fallback wherever these return false.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <string>

#include "cuda/vision_ops.h"

namespace q3n::cuda {

// Whether cuBLASLt opens on the current device (says nothing about a particular shape).
bool gemm_bf16_available();

// y[m * ldy + n] = epilogue(sum_j x[m * ldx + j] W[n * k + j] + bias[n]) for m < rows, n < out, j < k: x bf16
// row-major with leading dimension ldx >= k, W the checkpoint's bf16 [out, k] row-major, products
// accumulated in fp32. Epilogues as vision_gemm's: Store, GeluTanh (cuBLASLt's GELU, the tanh form
// gelu_pytorch_tanh), GeluErf (cuBLASLt has none: p is stored in y's type, then a second kernel maps y
// to gelu_erf(y); for a bf16 y that rounds p to bf16 first, as transformers' bf16 Linear does before
// its activation), Accumulate (y += p: into an fp32 y in fp32; into a bf16 y cuBLASLt rounds p to
// bf16 and then the sum, the order of transformers' bf16 Linear and residual add). bias may be null.
//
// The bias has y's type: cuBLASLt documents the bias vector of a non-FP8 matmul as D's type, and the
// checkpoints' biases are bf16, so a bf16 copy is exact.
//
// Returns false, having enqueued nothing, when the call cannot take this path: a pointer (x, W, y,
// bias) not 16-byte aligned, a row stride (ldx, k, ldy) not a multiple of 16 bytes, ldx < k or
// ldy < out, or cuBLASLt refusing the problem. gemm_bf16_last_failure says which.
bool gemm_bf16(const __nv_bfloat16* x, int ldx, int rows, int k, const __nv_bfloat16* w, int out,
               const __nv_bfloat16* bias, __nv_bfloat16* y, int ldy, VisionEpilogue epilogue, cudaStream_t stream);
bool gemm_bf16(const __nv_bfloat16* x, int ldx, int rows, int k, const __nv_bfloat16* w, int out, const float* bias,
               float* y, int ldy, VisionEpilogue epilogue, cudaStream_t stream);

// Why the latest gemm_bf16 that returned false did (for tests and bug reports).
std::string gemm_bf16_last_failure();

// y[i] = x[i] rounded to bf16 (to nearest even) for i < n: how an fp32 producer feeds gemm_bf16, the
// rounding vision_gemm applies to its activations as it loads them.
void round_to_bf16(const float* x, __nv_bfloat16* y, size_t n, cudaStream_t stream);

}  // namespace q3n::cuda
