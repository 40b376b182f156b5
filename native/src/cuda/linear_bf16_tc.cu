// Many-row linears with BF16 weights on tensor cores, as accurate as the fp32 GEMV: the fp32
// activations are split into three bf16 parts, hi = bf16(x), mid = bf16(x - hi), lo = bf16(x - hi
// - mid), so x = hi + mid + lo to about 2^-26 relative, and y = hi W^T + mid W^T + lo W^T through
// cuBLASLt's bf16 GEMM with fp32 accumulation (gemm_bf16: a store, then two accumulates into the
// same fp32 y). Rounding x to bf16 alone moves each product by up to 2^-9, far outside the 1e-4 the
// BF16 fixtures hold against transformers in fp32; two parts (2^-17) measured 1-3e-5 on the
// fixtures' logits against the CPU, where the GEMV lands below 1e-5. Three times the tensor-core
// FLOPs of a plain bf16 GEMM, still tens of times faster than the CUDA-core GEMV past a few rows.
#include <cuda_bf16.h>

#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/gemm_bf16.h"
#include "cuda/ops.h"

namespace q3n::cuda {
namespace {

__global__ void split_bf16_kernel(const float* __restrict__ x, size_t n, __nv_bfloat16* __restrict__ hi,
                                  __nv_bfloat16* __restrict__ mid, __nv_bfloat16* __restrict__ lo) {
    pdl_launch_dependents();
    pdl_wait();
    const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = x[i];
    // Each difference is exact in fp32 (Sterbenz: the parts agree in their leading bits).
    const __nv_bfloat16 h = __float2bfloat16_rn(v);
    const float r = v - __bfloat162float(h);
    const __nv_bfloat16 m = __float2bfloat16_rn(r);
    hi[i] = h;
    mid[i] = m;
    lo[i] = __float2bfloat16_rn(r - __bfloat162float(m));
}

}  // namespace

size_t linear_bf16_tc_scratch_bytes(int rows, int k) { return static_cast<size_t>(rows) * k * 3 * sizeof(__nv_bfloat16); }

bool linear_bf16_tc(const float* x, int rows, const DeviceLinear& w, float* y, int ldy, GemmScratch& scratch,
                    cudaStream_t stream) {
    if (w.type != WeightType::BF16 || rows <= 0 || w.in % 8 != 0 || scratch.hilo.bytes() < linear_bf16_tc_scratch_bytes(rows, w.in))
        return false;
    const size_t n = static_cast<size_t>(rows) * w.in;
    auto* hi = scratch.hilo.as<__nv_bfloat16>();
    auto* mid = hi + n;
    auto* lo = mid + n;
    Q3N_CUDA(launch_pdl(split_bf16_kernel, static_cast<unsigned>((n + 255) / 256), 256, 0, stream, x, n, hi, mid, lo));
    const auto* W = static_cast<const __nv_bfloat16*>(w.data);
    if (!gemm_bf16(hi, w.in, rows, w.in, W, w.out, static_cast<const float*>(nullptr), y, ldy, VisionEpilogue::Store, stream))
        return false;
    // A refusal here leaves y partly done; the caller's GEMV then overwrites all of it.
    return gemm_bf16(mid, w.in, rows, w.in, W, w.out, static_cast<const float*>(nullptr), y, ldy, VisionEpilogue::Accumulate,
                     stream) &&
           gemm_bf16(lo, w.in, rows, w.in, W, w.out, static_cast<const float*>(nullptr), y, ldy, VisionEpilogue::Accumulate,
                     stream);
}

}  // namespace q3n::cuda
