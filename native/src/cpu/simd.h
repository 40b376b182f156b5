// Shared helpers for the CPU kernels. Hot loops are written so GCC vectorises them, and compiled
// in AVX-512, AVX2+FMA and baseline clones chosen at load time, so one binary runs everywhere.
#pragma once

#include <bit>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#  define Q3N_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#  define Q3N_MULTIVERSION
#endif

namespace q3n::cpu {

inline float widen_bf16(uint16_t h) { return std::bit_cast<float>(static_cast<uint32_t>(h) << 16); }

// e4m3fn -> fp32 without branches: magnitude bits at fp32 bit 20, times 2^120 (exact for
// subnormals too). The NaN code never occurs in a valid checkpoint and is not special-cased here.
inline float widen_e4m3(uint8_t v) {
    const uint32_t u = static_cast<uint32_t>(v);
    const float mag = std::bit_cast<float>((u & 0x7fu) << 20) * 0x1p120f;
    return std::bit_cast<float>(std::bit_cast<uint32_t>(mag) | ((u & 0x80u) << 24));
}

}  // namespace q3n::cpu
