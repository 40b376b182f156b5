// The FP8 tensor-core arithmetic shared by the GEMV (linear_fp8_mma.cu) and the MoE expert kernels.
// Hopper has no FP8 mma.sync (its FP8 tensor-core path is wgmma): an e4m3 mma.sync compiles to f16
// HMMA behind per-element conversions. Converting the weights with integer instructions and running
// f16 HMMA with fp32 accumulation gives the same exact products.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

namespace q3n::cuda {

// Two e4m3 bytes of `word` (a byte_perm selector puts them in the high byte of each 16-bit half) as
// an f16 pair with the same sign, exponent and mantissa bits: the e4m3 value times 2^-8 (f16's
// exponent bias is 8 above e4m3's), exact, subnormals included. Three integer instructions per
// pair; the cvt from e4m3 runs at a fraction of that rate. Any byte gives a finite f16 (the exponent
// field stays below 16), so bytes nobody loaded contribute exact zeros against zero activations.
__device__ __forceinline__ uint32_t e4m3_pair_to_f16x2(uint32_t word, uint32_t selector) {
    const uint32_t t = __byte_perm(word, 0u, selector);
    return (t & 0x80008000u) | ((t >> 1) & 0x3f803f80u);
}

// e4m3_pair_to_f16x2 selectors: bytes 0 and 1 of a word, bytes 2 and 3.
constexpr uint32_t kLowPair = 0x1404, kHighPair = 0x3424;

// d += A (16 x 16, row) * B (16 x 8, col), f16 inputs, fp32 accumulation (products exact).
__device__ __forceinline__ void mma_f16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                        uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

}  // namespace q3n::cuda
