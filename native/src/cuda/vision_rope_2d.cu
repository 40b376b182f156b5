// The ViT's 2-D rotary on the q and k heads of fused qkv rows, one block per patch: the first quarter
// of each head's frequency slots turns by the patch's grid row, the second by its column, and NeoX
// rotate-half pairs channel i with i + head_dim / 2 (cpu::vision_rope_2d; the angle is the same single
// float32 product, the cos/sin CUDA's full-precision ones).
#include "cuda/cuda_check.h"
#include "cuda/vision_ops.h"

namespace q3n::cuda {
namespace {

__global__ void vision_rope_2d_kernel(float* __restrict__ qkv, int heads, int head_dim, int h, int w, int merge,
                                      const float* __restrict__ inv_freq) {
    const int p = blockIdx.x;
    const int q = p % (h * w), unit = merge * merge;
    const int block = q / unit, in_block = q % unit;
    const float row = static_cast<float>((block / (w / merge)) * merge + in_block / merge);
    const float col = static_cast<float>((block % (w / merge)) * merge + in_block % merge);
    const int half = head_dim / 2, quarter = head_dim / 4, hidden = heads * head_dim;
    float* base = qkv + static_cast<size_t>(p) * 3 * hidden;
    // Pairs of q heads then k heads: q and k are the row's first two thirds, contiguous.
    for (int j = threadIdx.x; j < 2 * heads * half; j += blockDim.x) {
        const int head = j / half, i = j % half;
        float* v = base + head * head_dim;
        const float angle = i < quarter ? row * inv_freq[i] : col * inv_freq[i - quarter];
        const float c = cosf(angle), s = sinf(angle);
        const float a = v[i], b = v[half + i];
        v[i] = a * c - b * s;
        v[half + i] = b * c + a * s;
    }
}

}  // namespace

void vision_rope_2d(float* qkv, int tokens, int heads, int head_dim, int h, int w, int merge, const float* inv_freq,
                    cudaStream_t stream) {
    if (tokens == 0) return;
    vision_rope_2d_kernel<<<tokens, 128, 0, stream>>>(qkv, heads, head_dim, h, w, merge, inv_freq);
    Q3N_CUDA_LAUNCHED("vision_rope_2d");
}

}  // namespace q3n::cuda
