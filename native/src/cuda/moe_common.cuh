// Device helpers of the sparse-MoE kernels: the FP8 tensor-core fragments (on fp8_mma.cuh's
// e4m3 -> f16 conversion and f16 HMMA, as linear_fp8_mma.cu), per-thread and bulk async copies
// into shared memory, and a block-wide scan.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/async_copy.cuh"
#include "cuda/common.cuh"
#include "cuda/fp8_mma.cuh"

namespace q3n::cuda::moe {

// A lane's 16 weight bytes of rows gid and gid + 8 (wa, wb) as the A fragments of four mma k-steps.
// Within one mma the k order is free as long as A and B agree, so word j feeds step j: bytes 4j, 4j+1
// as k = 2 tig, 2 tig + 1 and bytes 4j+2, 4j+3 as k = 8 + 2 tig, 9 + 2 tig; the activations follow
// the same bytes (halves 4j .. 4j+3 of the lane's 16 values, b_fragments).
__device__ __forceinline__ void a_fragments(const uint4& wa, const uint4& wb, uint32_t (&f)[4][4]) {
    const uint32_t a[4] = {wa.x, wa.y, wa.z, wa.w}, c[4] = {wb.x, wb.y, wb.z, wb.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        f[j][0] = e4m3_pair_to_f16x2(a[j], kLowPair);
        f[j][1] = e4m3_pair_to_f16x2(c[j], kLowPair);
        f[j][2] = e4m3_pair_to_f16x2(a[j], kHighPair);
        f[j][3] = e4m3_pair_to_f16x2(c[j], kHighPair);
    }
}

// The four k-steps of one 16-byte piece: d += A(f) * B(b).
__device__ __forceinline__ void mma_piece(float (&d)[4], const uint32_t (&f)[4][4], const uint32_t (&b)[4][2]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) mma_f16(d, f[j][0], f[j][1], f[j][2], f[j][3], b[j][0], b[j][1]);
}

// acc += scale group g (128 wide) of an m16 weight tile times the warp's B fragments of that group,
// scaled per group as spec 5.4 sums it: (part * activation scale) * weight scale, the CPU's order.
// ra: this lane's row gid of the tile at byte tig * 16, rows K bytes apart; the f16 weights are the
// e4m3 values times 2^-8, hence * 256. Every FP8 decode expert kernel (moe_fp8_decode.cu and the
// fused launch) goes through here, which their bit-equality rests on.
__device__ __forceinline__ void mma_scale_group(float (&acc)[4], const unsigned char* ra, int K, int g,
                                                const uint32_t (&b)[2][4][2], float sa0, float sa1, float weight_scale) {
    float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        uint32_t f[4][4];
        a_fragments(*reinterpret_cast<const uint4*>(ra + g * 128 + h * 64),
                    *reinterpret_cast<const uint4*>(ra + static_cast<size_t>(8) * K + g * 128 + h * 64), f);
        mma_piece(part, f, b[h]);
    }
    const float sw = weight_scale * 256.0f;
    acc[0] += part[0] * sa0 * sw;
    acc[1] += part[1] * sa1 * sw;
    acc[2] += part[2] * sa0 * sw;
    acc[3] += part[3] * sa1 * sw;
}

// The B fragments of mma_piece from a lane's 16 f16 activations (two 16-byte loads).
__device__ __forceinline__ void b_fragments(const uint4& q0, const uint4& q1, uint32_t (&b)[4][2]) {
    b[0][0] = q0.x;
    b[0][1] = q0.y;
    b[1][0] = q0.z;
    b[1][1] = q0.w;
    b[2][0] = q1.x;
    b[2][1] = q1.y;
    b[3][0] = q1.z;
    b[3][1] = q1.w;
}

// Bulk (TMA) copies into shared memory completing on an mbarrier: one instruction puts a block's whole
// weight tile in flight (the decode kernels measured faster so than with the per-thread copies above).
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// One thread; the block synchronises before anyone else touches the barrier.
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(arrivals) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// The issuing thread's arrival, announcing the bytes the copies of this phase will deliver.
__device__ __forceinline__ void mbar_arrive_expect(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}

// 16-byte aligned addresses, bytes a multiple of 16.
__device__ __forceinline__ void bulk_copy(void* smem, const void* gmem, uint32_t bytes, uint64_t* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                     smem_addr(smem)),
                 "l"(gmem), "r"(bytes), "r"(smem_addr(bar))
                 : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
    const uint32_t addr = smem_addr(bar);
    uint32_t done = 0;
    while (!done)
        asm volatile(
            "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(addr), "r"(parity)
            : "memory");
}

// One arrival without bytes: a consumer warp's "done reading this stage" (the barrier counts warps).
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

// One warp quantises channels [128 g, 128 g + 128) of a row of `len` fp32 values with quantize_fp8's
// rule: the e4m3 values as f16 into q (same channel indices), the group's scale into *scale. kL2: read
// the row through L2 (rows another block of the same launch wrote). Every FP8 MoE path quantises its
// activations here, so they all get the same codes.
template <bool kL2>
__device__ __forceinline__ void quantize_group_f16_warp(const float* row, int len, int g, __half* q, float* scale) {
    const int lane = threadIdx.x & 31;
    float v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int k = g * 128 + j * 32 + lane;
        v[j] = k < len ? (kL2 ? __ldcg(row + k) : row[k]) : 0.0f;
    }
    const float s = quantize_group_warp(v);
    if (lane == 0) *scale = s;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int k = g * 128 + j * 32 + lane;
        if (k < len) q[k] = __float2half_rn(v[j]);
    }
}

__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// Exclusive prefix sums of a and b over the block (blockDim.x a multiple of 32, at most 1024), with
// their totals; `tmp` holds 64 ints. Every thread of the block must call it.
__device__ __forceinline__ void block_scan2(int& a, int& b, int& total_a, int& total_b, int* tmp) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int ia = a, ib = b;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int ta = __shfl_up_sync(0xffffffffu, ia, o), tb = __shfl_up_sync(0xffffffffu, ib, o);
        if (lane >= o) {
            ia += ta;
            ib += tb;
        }
    }
    if (lane == 31) {
        tmp[warp] = ia;
        tmp[32 + warp] = ib;
    }
    __syncthreads();
    if (warp == 0) {
        int wa = lane < warps ? tmp[lane] : 0, wb = lane < warps ? tmp[32 + lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int ta = __shfl_up_sync(0xffffffffu, wa, o), tb = __shfl_up_sync(0xffffffffu, wb, o);
            if (lane >= o) {
                wa += ta;
                wb += tb;
            }
        }
        tmp[lane] = wa;
        tmp[32 + lane] = wb;
    }
    __syncthreads();
    a = (warp > 0 ? tmp[warp - 1] : 0) + ia - a;
    b = (warp > 0 ? tmp[32 + warp - 1] : 0) + ib - b;
    total_a = tmp[warps - 1];
    total_b = tmp[32 + warps - 1];
    __syncthreads();
}

}  // namespace q3n::cuda::moe
