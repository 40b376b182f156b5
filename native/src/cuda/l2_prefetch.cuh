// The device side of L2Prefetch (ops.h): bulk prefetches into L2, which hold no registers and wait
// for nothing, issued by a kernel before its PDL wait (weights are no step's output).
#pragma once

#include <cstdint>

#include "cuda/ops.h"

namespace q3n::cuda {

// Blocks a kernel adds to its grid only to issue prefetches, where its own blocks are too few to
// spread them: one SM issues bulk prefetches at a fraction of the memory's rate (Qwen3-4B-FP8, H100:
// 8 MB from the norm's one block took batch-1 decode from 385 to 255 tok/s).
constexpr unsigned kL2PrefetchBlocks = 64;

// Block `block` of `blocks` issues its share of p's prefetches, 16 KB each: chunk c goes to block
// c % blocks, so that every block (SM) takes a share.
__device__ __forceinline__ void l2_prefetch(const L2Prefetch& p, unsigned block, unsigned blocks) {
    constexpr size_t kChunk = 16 * 1024;
    const char* base = static_cast<const char*>(p.ptr);
    const size_t first = block + static_cast<size_t>(blocks) * threadIdx.x, step = static_cast<size_t>(blocks) * blockDim.x;
    for (size_t off = first * kChunk; off < p.bytes; off += step * kChunk) {
        const size_t left = p.bytes - off;
        const uint32_t n = static_cast<uint32_t>(left < kChunk ? left : kChunk) & ~15u;
        if (n) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(base + off), "r"(n) : "memory");
    }
}

}  // namespace q3n::cuda
