// The Qwen3-VL vision rotary's geometry, shared by its kernels (vision_rope_2d.cu) and by the attention
// that turns q as it loads it (vision_attention_wgmma.cu): one definition of a patch's grid
// coordinates and of the rotary table's layout, so every turn of a slot uses the same float product.
#pragma once

#include <cuda_runtime.h>

namespace q3n::cuda {

// Grid row (x) and column (y) of patch p of an h x w frame in the processor's order: merge x merge
// blocks of patches, the blocks row-major.
__device__ __forceinline__ int2 patch_coords(int p, int h, int w, int merge) {
    const int q = p % (h * w), unit = merge * merge;
    const int block = q / unit, in_block = q % unit;
    return make_int2((block / (w / merge)) * merge + in_block / merge, (block % (w / merge)) * merge + in_block % merge);
}

// The angle of frequency slot i (< head_dim / 2) for patch p: the first quarter of the slots turns by
// the patch's grid row, the second by its column (inv_freq has head_dim / 4 entries).
__device__ __forceinline__ float patch_angle(int p, int i, int head_dim, int h, int w, int merge,
                                             const float* __restrict__ inv_freq) {
    const int2 rc = patch_coords(p, h, w, merge);
    const int quarter = head_dim / 4;
    return i < quarter ? static_cast<float>(rc.x) * inv_freq[i] : static_cast<float>(rc.y) * inv_freq[i - quarter];
}

// Where vision_rope_table keeps (cos, sin) of slot i of patch p: the slot's coordinate (row for the
// first quarter, column for the second) times head_dim / 4, plus the slot's frequency.
__device__ __forceinline__ int rope_table_index(int2 rc, int i, int quarter) {
    return i < quarter ? rc.x * quarter + i : rc.y * quarter + (i - quarter);
}

}  // namespace q3n::cuda
