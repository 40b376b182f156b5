// The ViT's 2-D rotary on the q and k heads of fused qkv rows, one block per patch: the first quarter
// of each head's frequency slots turns by the patch's grid row, the second by its column, and NeoX
// rotate-half pairs channel i with i + head_dim / 2 (cpu::vision_rope_2d; the angle is the same single
// float32 product, the cos/sin CUDA's full-precision ones).
//
// One kernel for fp32 and bf16 rows: the bf16 variant widens each value, does the fp32 variant's
// arithmetic instruction for instruction, and rounds each result once.
#include "cuda/cuda_check.h"
#include "cuda/vision_ops.h"

namespace q3n::cuda {
namespace {

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void narrow(float* p, float v) { *p = v; }
__device__ __forceinline__ void narrow(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Threads take a frequency slot i each (blockDim / (head_dim / 2) groups of them) and turn that slot
// in every q and k head: one angle per thread rather than one per element. A warp's slots are
// consecutive channels of a head, so its accesses are contiguous.
template <typename T>
__global__ void vision_rope_2d_kernel(T* __restrict__ qkv, int heads, int head_dim, int h, int w, int merge,
                                      const float* __restrict__ inv_freq) {
    const int p = blockIdx.x;
    const int q = p % (h * w), unit = merge * merge;
    const int block = q / unit, in_block = q % unit;
    const float row = static_cast<float>((block / (w / merge)) * merge + in_block / merge);
    const float col = static_cast<float>((block % (w / merge)) * merge + in_block % merge);
    const int half = head_dim / 2, quarter = head_dim / 4, hidden = heads * head_dim;
    const int groups = max(1, static_cast<int>(blockDim.x) / half);
    T* base = qkv + static_cast<size_t>(p) * 3 * hidden;
    for (int t = threadIdx.x; t < groups * half; t += blockDim.x) {
        const int i = t % half;
        const float angle = i < quarter ? row * inv_freq[i] : col * inv_freq[i - quarter];
        const float c = cosf(angle), s = sinf(angle);
        // The q heads then the k heads: q and k are the row's first two thirds, contiguous.
        for (int head = t / half; head < 2 * heads; head += groups) {
            T* v = base + head * head_dim;
            const float a = widen(v[i]), b = widen(v[half + i]);
            narrow(v + i, a * c - b * s);
            narrow(v + half + i, b * c + a * s);
        }
    }
}

}  // namespace

void vision_rope_2d(float* qkv, int tokens, int heads, int head_dim, int h, int w, int merge, const float* inv_freq,
                    cudaStream_t stream) {
    if (tokens == 0) return;
    vision_rope_2d_kernel<float><<<tokens, 128, 0, stream>>>(qkv, heads, head_dim, h, w, merge, inv_freq);
    Q3N_CUDA_LAUNCHED("vision_rope_2d");
}

void vision_rope_2d_bf16(__nv_bfloat16* qkv, int tokens, int heads, int head_dim, int h, int w, int merge,
                         const float* inv_freq, cudaStream_t stream) {
    if (tokens == 0) return;
    vision_rope_2d_kernel<__nv_bfloat16><<<tokens, 128, 0, stream>>>(qkv, heads, head_dim, h, w, merge, inv_freq);
    Q3N_CUDA_LAUNCHED("vision_rope_2d_bf16");
}

}  // namespace q3n::cuda
