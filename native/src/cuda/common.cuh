// Device helpers shared by the kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

namespace q3n::cuda {

// Programmatic dependent launch (PDL). A kernel launched with launch_pdl may start while the kernel
// before it on the stream is still running: at batch 1 a decode step is ~400 kernels of a few
// microseconds each, and without PDL every one pays its launch and ramp-up after the previous one
// has drained. The contract, for every kernel launched with launch_pdl:
//   - before pdl_wait() it reads only what no earlier kernel of the step writes (weights, constant
//     tables) and writes nothing; one exception, argued where it is used: the MoE decode experts read
//     moe_route's output two or more launches after it (moe_fp8_decode.cu, routing_before_wait);
//   - every thread that reads or writes step data calls pdl_wait() first, and every block calls it
//     before exiting (a later kernel's wait covers only its direct predecessor, which must itself
//     have waited for the one before);
//   - pdl_launch_dependents() lets the next kernel be scheduled once every block of this one has
//     called it or exited; calling it early only lends idle SM slots to the next kernel.
// Both are no-ops for a kernel launched without the attribute.
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;" :::); }

// Whether launches ask for PDL: on unless Q3N_PDL=0 (for measuring what it gains).
bool pdl_enabled();

// kernel<<<grid, block, smem, stream>>>(args...) with the programmatic-serialization attribute when
// pdl_enabled(), its blocks forming thread block clusters (sm_90) of cluster_x consecutive blocks
// along x when cluster_x > 0 (grid.x a multiple of it, at most 8: the portable size). Returns the
// launch status: wrap it in Q3N_CUDA(...).
template <typename... Params, typename... Args>
cudaError_t launch_pdl_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                               unsigned cluster_x, Args&&... args) {
    cudaLaunchConfig_t config{};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    cudaLaunchAttribute attribute[2];
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = pdl_enabled() ? 1 : 0;
    attribute[1].id = cudaLaunchAttributeClusterDimension;
    attribute[1].val.clusterDim.x = cluster_x;
    attribute[1].val.clusterDim.y = 1;
    attribute[1].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = cluster_x > 0 ? 2 : 1;
    return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(std::forward<Args>(args))...);
}

template <typename... Params, typename... Args>
cudaError_t launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       Args&&... args) {
    return launch_pdl_cluster(kernel, grid, block, smem, stream, 0u, std::forward<Args>(args)...);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block; every thread gets the result. `scratch` holds one float per warp.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < warps; ++w) total += scratch[w];
    return total;
}

__device__ __forceinline__ float bf16_bits_to_float(uint16_t h) { return __uint_as_float(static_cast<uint32_t>(h) << 16); }

// e4m3fn -> fp32 exactly as the CPU backend does it (magnitude bits at bit 20, times 2^120).
__device__ __forceinline__ float e4m3_to_float(uint32_t v) {
    const float mag = __uint_as_float((v & 0x7fu) << 20) * 1.329227995784916e36f;  // 2^120
    return __uint_as_float(__float_as_uint(mag) | ((v & 0x80u) << 24));
}

// fp32 -> e4m3fn, round to nearest even, saturating: the CPU's float_to_e4m3 for finite input.
__device__ __forceinline__ uint8_t float_to_e4m3(float f) {
    const uint8_t sign = (__float_as_uint(f) >> 24) & 0x80u;
    const float a = fabsf(f);
    if (a >= 448.0f) return sign | 0x7e;
    if (a < 0.015625f) return sign | static_cast<uint8_t>(__float2int_rn(a * 512.0f));  // subnormals
    int e;
    const float frac = frexpf(a, &e);
    int m = __float2int_rn((frac * 2.0f - 1.0f) * 8.0f);
    int exp = e - 1 + 7;
    if (m == 8) {
        m = 0;
        ++exp;
    }
    if (exp > 15 || (exp == 15 && m == 7)) return sign | 0x7e;
    return sign | static_cast<uint8_t>((exp << 3) | m);
}

// float_to_e4m3 by the hardware conversion (sm_89 and later: round to nearest even, finite values
// past 448 saturating to it): the same code for every input but NaN (test
// CudaOps.HardwareE4m3ConversionEqualsTheReference compares all 2^32 bit patterns). Five times fewer
// instructions than the reference's frexp and rounding steps, which left the many-row quantising
// kernels bound by their arithmetic rather than by memory.
__device__ __forceinline__ uint8_t float_to_e4m3_hw(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    uint16_t pair;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(pair) : "f"(0.0f), "f"(f));
    return static_cast<uint8_t>(pair & 0xffu);
#else
    return float_to_e4m3(f);
#endif
}

// Two values at once: lo in bits 0-7, hi in bits 8-15.
__device__ __forceinline__ uint32_t float2_to_e4m3x2_hw(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    uint16_t pair;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(pair) : "f"(hi), "f"(lo));
    return pair;
#else
    return float_to_e4m3(lo) | (static_cast<uint32_t>(float_to_e4m3(hi)) << 8);
#endif
}

// The FP8 activation rule of quantize_fp8 and of every kernel that quantises its own output, in two
// halves so that kernels whose groups span several warps share it too: a 128-channel group's scale
// from its amax (the max of |x|, which any reduction order gives exactly), then each value as its
// e4m3 code widened to fp32. Division, not a reciprocal multiply: the same codes as the CPU and torch.
__device__ __forceinline__ float fp8_group_scale(float amax) { return fmaxf(amax, 1e-10f) / 448.0f; }
// x / s clamped to e4m3's range: what rounds to x's code (float_to_e4m3_hw of it is the code).
__device__ __forceinline__ float fp8_scaled(float x, float s) { return fminf(fmaxf(__fdiv_rn(x, s), -448.0f), 448.0f); }
__device__ __forceinline__ float fp8_quantize_value(float x, float s) { return e4m3_to_float(float_to_e4m3_hw(fp8_scaled(x, s))); }

// One warp quantises one 128-channel group held as v[j] = x[j * 32 + lane] (zero past the row's end):
// returns the group's scale and replaces v by its e4m3 values widened to fp32.
__device__ __forceinline__ float quantize_group_warp(float (&v)[4]) {
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) amax = fmaxf(amax, fabsf(v[j]));
    const float s = fp8_group_scale(warp_max(amax));
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = fp8_quantize_value(v[j], s);
    return s;
}

// Two floats as one bf16x2 word, each rounded to nearest even; lo is the low half (the .x element).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}

// The two reductions of an online softmax's row statistics, as functors for a shared tree reduction.
struct MaxOp {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct AddOp {
    __device__ float operator()(float a, float b) const { return a + b; }
};

// One slot pair of a rotary: (a, b) turned by the angle whose cosine and sine are c and s. The
// products and the sum are spelled out so that every kernel that turns a pair (the vision rotary's
// own kernels, and the attention that turns q as it loads it) rounds identically, whatever nvcc would
// contract in each context.
__device__ __forceinline__ float2 rope_turn(float a, float b, float c, float s) {
    return make_float2(__fmaf_rn(a, c, -__fmul_rn(b, s)), __fmaf_rn(b, c, __fmul_rn(a, s)));
}

// One MUFU.EX2: exp2f without fast math adds range fix-ups for denormals, which a softmax does not
// need (results below 2^-126 flush to 0; ex2(-inf) = +0).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

}  // namespace q3n::cuda
