// The ViT's 2-D rotary on the q and k heads of fused qkv rows, one block per patch: the first quarter
// of each head's frequency slots turns by the patch's grid row, the second by its column, and NeoX
// rotate-half pairs channel i with i + head_dim / 2 (cpu::vision_rope_2d; the angle is the same single
// float32 product, the cos/sin CUDA's full-precision ones).
//
// One kernel for fp32 and bf16 rows: the bf16 variant widens each value, does the fp32 variant's
// arithmetic instruction for instruction, and rounds each result once.
#include <cstdint>
#include <cstring>

#include "cuda/cuda_check.h"
#include "cuda/vision_ops.h"

namespace q3n::cuda {
namespace {

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void narrow(float* p, float v) { *p = v; }
__device__ __forceinline__ void narrow(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// The angle of frequency slot i (< head_dim / 2) for patch p of a t x h x w item in the processor's
// order (merge x merge blocks of patches, row-major): the first quarter of the slots turns by the
// patch's grid row, the second by its column.
__device__ __forceinline__ float patch_angle(int p, int i, int head_dim, int h, int w, int merge,
                                             const float* __restrict__ inv_freq) {
    const int q = p % (h * w), unit = merge * merge, quarter = head_dim / 4;
    const int block = q / unit, in_block = q % unit;
    const float row = static_cast<float>((block / (w / merge)) * merge + in_block / merge);
    const float col = static_cast<float>((block % (w / merge)) * merge + in_block % merge);
    return i < quarter ? row * inv_freq[i] : col * inv_freq[i - quarter];
}

// Threads take a frequency slot i each (blockDim / (head_dim / 2) groups of them) and turn that slot
// in every q and k head: one angle per thread rather than one per element. A warp's slots are
// consecutive channels of a head, so its accesses are contiguous.
template <typename T>
__global__ void vision_rope_2d_kernel(T* __restrict__ qkv, int heads, int head_dim, int h, int w, int merge,
                                      const float* __restrict__ inv_freq) {
    const int p = blockIdx.x;
    const int half = head_dim / 2, hidden = heads * head_dim;
    const int groups = max(1, static_cast<int>(blockDim.x) / half);
    T* base = qkv + static_cast<size_t>(p) * 3 * hidden;
    for (int t = threadIdx.x; t < groups * half; t += blockDim.x) {
        const int i = t % half;
        const float angle = patch_angle(p, i, head_dim, h, w, merge, inv_freq);
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

// The bf16 rotary of the tower (27 calls per image) as a memory-bound kernel. The one-patch blocks above
// move two bytes per access and leave a quarter of their threads idle at head_dim 72 (28.7 us a call
// at 4096 patches, H200); a loop of load-turn-store per thread is no better, each iteration waiting
// on its own loads (22.7 us). Here a block takes kPatchesPerBlock patches: their angles' cos and sin
// once into shared memory, then each thread loads all its items (four adjacent slots of one head,
// both halves: two 8-byte loads) before it turns and stores any. Same per-element arithmetic as the
// kernel above.
// Slots j, j + 1 of the first half (a, two bf16 in one word) and of the second (b), turned in place.
__device__ __forceinline__ void turn(uint32_t& a_bits, uint32_t& b_bits, const float* c, const float* s) {
    __nv_bfloat162 a2, b2;
    memcpy(&a2, &a_bits, 4);
    memcpy(&b2, &b_bits, 4);
    const float2 a = __bfloat1622float2(a2), b = __bfloat1622float2(b2);
    a2 = __floats2bfloat162_rn(a.x * c[0] - b.x * s[0], a.y * c[1] - b.y * s[1]);
    b2 = __floats2bfloat162_rn(b.x * c[0] + a.x * s[0], b.y * c[1] + a.y * s[1]);
    memcpy(&a_bits, &a2, 4);
    memcpy(&b_bits, &b2, 4);
}

constexpr int kPatchesPerBlock = 8;
constexpr int kThreads = 256;
constexpr int kMaxItems = 12;  // per thread: 8 patches x 2 heads x head_dim / 8 <= 3072 (hidden <= 1536)
constexpr int kMaxHalf = 64;   // head_dim <= 128

__global__ void __launch_bounds__(kThreads)
    vision_rope_2d_quads_kernel(__nv_bfloat16* __restrict__ qkv, int tokens, int heads, int head_dim, int h, int w,
                                int merge, const float* __restrict__ inv_freq) {
    __shared__ float cos_s[kPatchesPerBlock][kMaxHalf], sin_s[kPatchesPerBlock][kMaxHalf];
    const int half = head_dim / 2, quads = half / 4, hidden = heads * head_dim;
    const int first = blockIdx.x * kPatchesPerBlock;
    const int count = min(kPatchesPerBlock, tokens - first);
    const int per_patch = 2 * heads * quads;  // the q heads then the k heads, contiguous in the row
    const int items = count * per_patch;
    // Loads first: nothing here depends on the angles.
    uint2 lo[kMaxItems], hi[kMaxItems];
#pragma unroll
    for (int k = 0; k < kMaxItems; ++k) {
        const int t = threadIdx.x + k * kThreads;
        if (t >= items) continue;
        const int local = t / per_patch, rest = t % per_patch;
        const __nv_bfloat16* v = qkv + static_cast<size_t>(first + local) * 3 * hidden + (rest / quads) * head_dim;
        const int i = 4 * (rest % quads);
        lo[k] = *reinterpret_cast<const uint2*>(v + i);
        hi[k] = *reinterpret_cast<const uint2*>(v + half + i);
    }
    for (int t = threadIdx.x; t < count * half; t += kThreads) {
        const int local = t / half, i = t % half;
        const float angle = patch_angle(first + local, i, head_dim, h, w, merge, inv_freq);
        cos_s[local][i] = cosf(angle);
        sin_s[local][i] = sinf(angle);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kMaxItems; ++k) {
        const int t = threadIdx.x + k * kThreads;
        if (t >= items) continue;
        const int local = t / per_patch, rest = t % per_patch;
        __nv_bfloat16* v = qkv + static_cast<size_t>(first + local) * 3 * hidden + (rest / quads) * head_dim;
        const int i = 4 * (rest % quads);
        uint2 first = lo[k], second = hi[k];
        turn(first.x, second.x, cos_s[local] + i, sin_s[local] + i);
        turn(first.y, second.y, cos_s[local] + i + 2, sin_s[local] + i + 2);
        *reinterpret_cast<uint2*>(v + i) = first;
        *reinterpret_cast<uint2*>(v + half + i) = second;
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
    // 8-byte accesses need four-slot groups within each half (head_dim % 8 == 0) and an 8-byte aligned row.
    const int items = kPatchesPerBlock * 2 * heads * (head_dim / 8);
    if (head_dim % 8 == 0 && head_dim / 2 <= kMaxHalf && items <= kMaxItems * kThreads &&
        (reinterpret_cast<uintptr_t>(qkv) & 7) == 0) {
        vision_rope_2d_quads_kernel<<<(tokens + kPatchesPerBlock - 1) / kPatchesPerBlock, kThreads, 0, stream>>>(
            qkv, tokens, heads, head_dim, h, w, merge, inv_freq);
        Q3N_CUDA_LAUNCHED("vision_rope_2d_bf16");
        return;
    }
    vision_rope_2d_kernel<__nv_bfloat16><<<tokens, 128, 0, stream>>>(qkv, heads, head_dim, h, w, merge, inv_freq);
    Q3N_CUDA_LAUNCHED("vision_rope_2d_bf16");
}

}  // namespace q3n::cuda
