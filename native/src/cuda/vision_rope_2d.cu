// The ViT's 2-D rotary on the q and k heads of fused qkv rows, one block per patch: the first quarter
// of each head's frequency slots turns by the patch's grid row, the second by its column, and NeoX
// rotate-half pairs channel i with i + head_dim / 2 (cpu::vision_rope_2d; the angle is the same single
// float32 product, the cos/sin CUDA's full-precision ones).
//
// The tower's bf16 flow on Hopper takes another route: vision_rope_table once per item, then
// vision_rope_2d_bf16_keys on the k heads while the attention turns q as it loads it.
//
// One kernel for fp32 and bf16 rows: the bf16 variant widens each value, does the fp32 variant's
// arithmetic instruction for instruction, and rounds each result once.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "core/error.h"
#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/vision_ops.h"
#include "cuda/vision_rope.cuh"

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
            const float2 r = rope_turn(widen(v[i]), widen(v[half + i]), c, s);
            narrow(v + i, r.x);
            narrow(v + half + i, r.y);
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
    const float2 r0 = rope_turn(a.x, b.x, c[0], s[0]), r1 = rope_turn(a.y, b.y, c[1], s[1]);
    a2 = __floats2bfloat162_rn(r0.x, r1.x);
    b2 = __floats2bfloat162_rn(r0.y, r1.y);
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

// The table: (cos, sin) of c * inv_freq[i] at [c * quarter + i] for every grid coordinate c below
// max(h, w): every angle of the frame is one of these products (patch_angle), so a table-driven turn
// equals the kernels above bit for bit, from a table small enough to stay in L1 (9 KB for a 64 x 64
// grid at head_dim 72, against 1.2 MB for a table per patch).
__global__ void vision_rope_table_kernel(float2* __restrict__ table, int coords, int quarter,
                                         const float* __restrict__ inv_freq) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= coords * quarter) return;
    const float angle = static_cast<float>(t / quarter) * inv_freq[t % quarter];
    table[t] = make_float2(cosf(angle), sinf(angle));
}

// The k heads only, from the table (the attention turns q itself as it loads it): a thread per
// (token, head, four slots), 8-byte loads of both halves and two 16-byte table loads (one per pair of
// slots: a quad may straddle the quarter where the row's slots end), all issued before any
// arithmetic. One item per thread keeps the whole launch resident in one wave (the multi-item kernel
// above holds 128 registers a thread, so two of its blocks fit an SM and 4096 patches take two
// waves): H100, 4096 patches x 16 heads, 9.3 us against its 22.6 for q and k.
__global__ void __launch_bounds__(256)
    vision_rope_2d_keys_kernel(__nv_bfloat16* __restrict__ qkv, int tokens, int heads, int head_dim,
                               const VisionRopeTable table) {
    pdl_launch_dependents();  // the attention's blocks may take SMs as this kernel's drain
    pdl_wait();               // qkv comes from the GEMM before
    const int half = head_dim / 2, quads = half / 4, quarter = head_dim / 4;
    const long long t = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (t >= static_cast<long long>(tokens) * heads * quads) return;
    const int quad = static_cast<int>(t % quads);
    const long long rest = t / quads;
    const int head = static_cast<int>(rest % heads), token = static_cast<int>(rest / heads);
    __nv_bfloat16* v = qkv + static_cast<size_t>(token) * 3 * heads * head_dim + static_cast<size_t>(heads + head) * head_dim;
    const int i = 4 * quad;
    uint2 lo = *reinterpret_cast<const uint2*>(v + i), hi = *reinterpret_cast<const uint2*>(v + half + i);
    const int2 rc = patch_coords(token, table.h, table.w, table.merge);
    // (cos, sin) of slots i, i + 1 | i + 2, i + 3 (quarter is even, so a pair never straddles it).
    const float4 cs01 = *reinterpret_cast<const float4*>(table.cs + rope_table_index(rc, i, quarter));
    const float4 cs23 = *reinterpret_cast<const float4*>(table.cs + rope_table_index(rc, i + 2, quarter));
    const float c01[2] = {cs01.x, cs01.z}, s01[2] = {cs01.y, cs01.w};
    const float c23[2] = {cs23.x, cs23.z}, s23[2] = {cs23.y, cs23.w};
    turn(lo.x, hi.x, c01, s01);
    turn(lo.y, hi.y, c23, s23);
    *reinterpret_cast<uint2*>(v + i) = lo;
    *reinterpret_cast<uint2*>(v + half + i) = hi;
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

size_t vision_rope_table_entries(int h, int w, int head_dim) {
    return static_cast<size_t>(std::max(h, w)) * (head_dim / 4);
}

void vision_rope_table(float2* table, int h, int w, int head_dim, const float* inv_freq, cudaStream_t stream) {
    const int count = static_cast<int>(vision_rope_table_entries(h, w, head_dim));
    if (count == 0) return;
    vision_rope_table_kernel<<<(count + 255) / 256, 256, 0, stream>>>(table, std::max(h, w), head_dim / 4, inv_freq);
    Q3N_CUDA_LAUNCHED("vision_rope_table");
}

bool vision_rope_2d_keys_applies(int head_dim) { return head_dim % 8 == 0 && head_dim <= 128; }

void vision_rope_2d_bf16_keys(__nv_bfloat16* qkv, int tokens, int heads, int head_dim, const VisionRopeTable& table,
                              cudaStream_t stream) {
    if (tokens == 0) return;
    require(vision_rope_2d_keys_applies(head_dim) && heads > 0 && table.h > 0 && table.w > 0 && table.merge > 0 &&
                table.h % table.merge == 0 && table.w % table.merge == 0 && (reinterpret_cast<uintptr_t>(qkv) & 7) == 0 &&
                (reinterpret_cast<uintptr_t>(table.cs) & 15) == 0,
            Q3N_ERR_INVALID_ARGUMENT, "vision_rope_2d_bf16_keys: head_dim must be a multiple of 8 (at most 128), the "
                                      "grid a whole number of merge blocks, qkv 8-byte and the table 16-byte aligned");
    const long long items = static_cast<long long>(tokens) * heads * (head_dim / 8);
    Q3N_CUDA(launch_pdl(vision_rope_2d_keys_kernel, static_cast<unsigned>((items + 255) / 256), 256, 0, stream, qkv, tokens,
                        heads, head_dim, table));
    Q3N_CUDA_LAUNCHED("vision_rope_2d_bf16_keys");
}

}  // namespace q3n::cuda
