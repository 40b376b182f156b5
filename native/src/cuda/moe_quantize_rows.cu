// quantize_fp8's rule for the MoE tensor-core paths: per row and 128-channel group, the same scale and
// e4m3 codes (quantize_group_warp), with the values stored as f16 (exact) so that the GEMMs load them
// straight into mma fragments, at half the bytes of fp32. Rows may have two lengths: the routed
// experts' SwiGLU rows are I wide and the shared expert's Is, in one buffer of stride max(I, Is).
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/moe_common.cuh"
#include "cuda/moe_internal.h"

namespace q3n::cuda::moe {
namespace {

constexpr int kWarps = 8;

// One warp per (row, group).
__global__ void __launch_bounds__(kWarps * 32) quantize_rows_kernel(const float* src, int rows, int split, int len0,
                                                                     int len1, int ld, int groups, __half* q,
                                                                     float* scales, int scale_ld) {
    pdl_wait();
    pdl_launch_dependents();
    const int item = blockIdx.x * kWarps + (threadIdx.x >> 5);
    if (item >= rows * groups) return;
    const int r = item / groups, g = item % groups, len = r < split ? len0 : len1;
    if (g * 128 >= len) return;
    quantize_group_f16_warp<false>(src + static_cast<size_t>(r) * ld, len, g, q + static_cast<size_t>(r) * ld,
                                   scales + static_cast<size_t>(r) * scale_ld + g);
}

}  // namespace

void quantize_rows_f16(const float* src, int rows, int split, int len0, int len1, int ld, __half* q, float* scales,
                       int scale_ld, cudaStream_t stream) {
    const int groups = (std::max(len0, len1) + 127) / 128;
    const int items = rows * groups;
    if (items == 0) return;
    Q3N_CUDA(launch_pdl(quantize_rows_kernel, dim3((items + kWarps - 1) / kWarps), dim3(kWarps * 32), 0, stream, src,
                        rows, split, len0, len1, ld, groups, q, scales, scale_ld));
}

}  // namespace q3n::cuda::moe
