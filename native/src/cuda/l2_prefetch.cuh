// The device side of L2Prefetch (ops.h): bulk prefetches into L2, which hold no registers and wait
// for nothing, issued by a kernel before its PDL wait (weights are no step's output).
#pragma once

#include <cstdint>

#include "cuda/ops.h"

namespace q3n::cuda {

// Thread `part` of `parts` issues its share of p's prefetches, 16 KB each.
__device__ __forceinline__ void l2_prefetch(const L2Prefetch& p, unsigned part, unsigned parts) {
    constexpr size_t kChunk = 16 * 1024;
    const char* base = static_cast<const char*>(p.ptr);
    for (size_t off = static_cast<size_t>(part) * kChunk; off < p.bytes; off += static_cast<size_t>(parts) * kChunk) {
        const size_t left = p.bytes - off;
        const uint32_t n = static_cast<uint32_t>(left < kChunk ? left : kChunk) & ~15u;
        if (n) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(base + off), "r"(n) : "memory");
    }
}

}  // namespace q3n::cuda
