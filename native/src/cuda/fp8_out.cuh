// Device side of Fp8Out (ops.h): how a quantising kernel stores one 128-channel group.
#pragma once

#include "cuda/common.cuh"
#include "cuda/ops.h"

namespace q3n::cuda {

// Group g of row `row` (k channels, `groups` groups a row), held by one warp as v[j] = value of
// channel g * 128 + j * 32 + lane (already e4m3 values, quantize_group_warp's output) with scale s.
__device__ __forceinline__ void store_fp8_group(const Fp8Out& o, size_t row, int g, int groups, int k, int lane,
                                                const float (&v)[4], float s) {
    if (o.q8) {
        if (lane == 0) o.scales8[o.scales_m_fast ? static_cast<size_t>(g) * o.padded + row : row * groups + g] = s;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int i = g * 128 + j * 32 + lane;
            if (i < k) o.q8[row * k + i] = float_to_e4m3_hw(v[j]);  // exact: v[j] is an e4m3 value
        }
        return;
    }
    if (lane == 0) o.scales[row * groups + g] = s;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int i = g * 128 + j * 32 + lane;
        if (i < k) o.q[row * k + i] = v[j];
    }
}

}  // namespace q3n::cuda
