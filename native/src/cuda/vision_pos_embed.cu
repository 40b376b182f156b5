// The learned position table interpolated to an item's grid and added to its patch embeddings, one
// block per patch. The arithmetic is cpu::pos_embed_interpolate's: torch's float32 linspace (first
// half counted up from 0, second half down from side - 1, with a float32 step), truncated corners and
// the four bilinear weights; explicit _rn intrinsics keep nvcc from fusing the linspace into FMAs, so
// the corners and weights are bit-identical to the CPU's.
#include "cuda/cuda_check.h"
#include "cuda/vision_ops.h"

namespace q3n::cuda {
namespace {

__device__ __forceinline__ float linspace_at(float end, int steps, int i) {
    if (steps == 1) return 0.0f;
    const float step = __fdiv_rn(end, static_cast<float>(steps - 1));
    return i < steps / 2 ? __fmul_rn(step, static_cast<float>(i))
                         : __fsub_rn(end, __fmul_rn(step, static_cast<float>(steps - i - 1)));
}

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// y = x + the interpolated row; y may be x (the fp32 flow adds in place).
template <typename Out>
__global__ void vision_pos_embed_kernel(const float* x, const float* __restrict__ table, int side, int h, int w,
                                        int merge, int hidden, Out* y) {
    const int p = blockIdx.x;
    // Processor order within a frame: (h/merge, w/merge, merge, merge); every frame repeats it.
    const int q = p % (h * w), unit = merge * merge;
    const int block = q / unit, in_block = q % unit;
    const int row = (block / (w / merge)) * merge + in_block / merge;
    const int col = (block % (w / merge)) * merge + in_block % merge;
    const float last = static_cast<float>(side - 1);
    const float yy = linspace_at(last, h, row), xx = linspace_at(last, w, col);
    const int y0 = static_cast<int>(yy), x0 = static_cast<int>(xx);
    const int y1 = min(y0 + 1, side - 1), x1 = min(x0 + 1, side - 1);
    const float dy = __fsub_rn(yy, static_cast<float>(y0)), dx = __fsub_rn(xx, static_cast<float>(x0));
    const float w0 = __fmul_rn(1.0f - dy, 1.0f - dx), w1 = __fmul_rn(1.0f - dy, dx), w2 = __fmul_rn(dy, 1.0f - dx),
                w3 = __fmul_rn(dy, dx);
    const float* e0 = table + static_cast<size_t>(y0 * side + x0) * hidden;
    const float* e1 = table + static_cast<size_t>(y0 * side + x1) * hidden;
    const float* e2 = table + static_cast<size_t>(y1 * side + x0) * hidden;
    const float* e3 = table + static_cast<size_t>(y1 * side + x1) * hidden;
    const float* xr = x + static_cast<size_t>(p) * hidden;
    Out* yr = y + static_cast<size_t>(p) * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        store(yr + i, xr[i] + (e0[i] * w0 + e1[i] * w1 + e2[i] * w2 + e3[i] * w3));
}

}  // namespace

void vision_pos_embed_add(float* x, const float* table, int side, int t, int h, int w, int merge, int hidden,
                          cudaStream_t stream) {
    const int patches = t * h * w;
    if (patches == 0) return;
    vision_pos_embed_kernel<float><<<patches, 128, 0, stream>>>(x, table, side, h, w, merge, hidden, x);
    Q3N_CUDA_LAUNCHED("vision_pos_embed_add");
}

void vision_pos_embed_add_bf16(const float* x, const float* table, int side, int t, int h, int w, int merge, int hidden,
                               __nv_bfloat16* y, cudaStream_t stream) {
    const int patches = t * h * w;
    if (patches == 0) return;
    vision_pos_embed_kernel<__nv_bfloat16><<<patches, 128, 0, stream>>>(x, table, side, h, w, merge, hidden, y);
    Q3N_CUDA_LAUNCHED("vision_pos_embed_add_bf16");
}

}  // namespace q3n::cuda
