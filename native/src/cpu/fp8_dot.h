// FP8 row dot products with AVX512-BF16: e4m3 weights become bf16 through a 128-entry table in
// registers, and the quantised activations are bf16 already (every e4m3 value is a bf16 value),
// so VDPBF16PS forms exact products and sums them in fp32 — the same numbers as the portable
// kernel up to summation order.
#pragma once

#include <cstddef>
#include <cstdint>

namespace q3n::cpu {

// True when the CPU has AVX512-BF16 (checked once).
bool fp8_bf16_dot_available();

// sum_g (sum_{k in g} a[k] * w[k]) * a_scales[g] * w_scales[g] over 128-wide groups; `a` holds the
// quantised activations as bf16 bit patterns.
float dot_fp8_row_bf16(const uint16_t* a, const uint8_t* w, const float* a_scales, const float* w_scales, size_t K);

}  // namespace q3n::cpu
