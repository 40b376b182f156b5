// LayerNorm over rows. Mean and variance are summed in double in two passes, as the CPU's layer_norm
// does: the ViT's residual stream has a large mean relative to its spread, where a one-pass
// E[x^2] - E[x]^2 in fp32 would cancel.
//
// vision_layer_norm: one block per row. vision_layer_norm_bf16: one warp per row (eight rows a block),
// so its reductions are shuffles alone. Its statistics then differ from the block kernel's only in the
// order of the double additions, far below fp32's resolution, so each element is the block kernel's
// float, rounded once to bf16 for the GEMM that reads it.
//
// The bf16 kernel runs 58 times per 1024x1024 image (two per block and the mergers'), on rows the
// GEMM before it has just written, so it should run at the memory's speed; the scalar kernel above
// took 14 us a call at 4096 x 1152 (H100), limited by its per-element double arithmetic (each
// float-to-double conversion issues at a quarter of the fp64 rate) and its three passes over L1. The
// register kernel reads a row once as float4 into registers (one warp per row up to 1536 floats, four
// up to 6144: the mergers' 4608), and keeps double only where cancellation needs it:
//   - the mean: float sums of four elements (off by at most 2 ulp of the largest of them), added in
//     double;
//   - the deviations: d = (x - hi) - lo with the double mean split into floats hi + lo: x - hi is exact
//     for x within a factor two of the mean (Sterbenz), so d carries the mean to double precision,
//     the point of the two-pass form;
//   - the variance: per-lane float sums of at most 48 squares (relative error < 48 ulp, positive
//     terms), added in double; 1/sqrt in double.
// y = float(d * inv) * w + b differs from the double kernel's float((x - mean) * inv) * w + b by an ulp
// or two of fp32, i.e. a bf16 rounding flips for about one element in 10^4 (the test's bound: 1 in 10^3,
// none more than one bf16 ulp).
//
// The bf16 tower's residual stream is bf16 (qwen3_vl_vision_cuda.h), so the same kernels also take
// bf16 rows: four elements are one 8-byte load, widened exactly, and everything after is the float
// path's arithmetic.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/device_info.h"
#include "cuda/vision_ops.h"

namespace q3n::cuda {
namespace {

constexpr int kWarpRows = 8;
constexpr int kRegisterChunks = 12;  // float4s per lane: rows of n <= 1536, n % 4 == 0

__device__ __forceinline__ double block_sum_double(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double total = 0.0;
    for (int i = 0; i < warps; ++i) total += scratch[i];
    return total;
}

__device__ __forceinline__ double warp_sum_double(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__global__ void vision_layer_norm_kernel(const float* __restrict__ x, const float* __restrict__ weight,
                                         const float* __restrict__ bias, float* __restrict__ y, int n, float eps) {
    __shared__ double scratch[32];
    const float* xr = x + static_cast<size_t>(blockIdx.x) * n;
    float* yr = y + static_cast<size_t>(blockIdx.x) * n;
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += xr[i];
    const double mean = block_sum_double(s, scratch) / n;
    double v = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const double d = xr[i] - mean;
        v += d * d;
    }
    const double var = block_sum_double(v, scratch) / n;
    const double inv = 1.0 / sqrt(var + static_cast<double>(eps));
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        yr[i] = static_cast<float>((xr[i] - mean) * inv) * weight[i] + bias[i];
}

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

// Four bf16 in 8 bytes, widened (exactly), and four floats rounded into 8 bytes.
__device__ __forceinline__ float4 widen4(uint2 packed) {
    __nv_bfloat162 first, second;
    memcpy(&first, &packed.x, 4);
    memcpy(&second, &packed.y, 4);
    const float2 a = __bfloat1622float2(first), b = __bfloat1622float2(second);
    return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ uint2 round4(float a, float b, float c, float d) {
    const __nv_bfloat162 first = __floats2bfloat162_rn(a, b), second = __floats2bfloat162_rn(c, d);
    uint2 packed;
    memcpy(&packed.x, &first, 4);
    memcpy(&packed.y, &second, 4);
    return packed;
}

// Four elements' float sum (the caller adds these in double).
__device__ __forceinline__ float quad_sum(float4 v) { return (v.x + v.y) + (v.z + v.w); }
// v minus the double mean split into floats hi + lo (exact while v is within a factor two of it);
// returns the float sum of the four squared deviations.
__device__ __forceinline__ float centre4(float4& v, float hi, float lo) {
    v.x = (v.x - hi) - lo;
    v.y = (v.y - hi) - lo;
    v.z = (v.z - hi) - lo;
    v.w = (v.w - hi) - lo;
    return (v.x * v.x + v.y * v.y) + (v.z * v.z + v.w * v.w);
}

// (d * inv) * w + b of four centred elements, rounded to bf16.
__device__ __forceinline__ uint2 scale_shift4(float4 d, float inv, float4 w, float4 b) {
    return round4((d.x * inv) * w.x + b.x, (d.y * inv) * w.y + b.y, (d.z * inv) * w.z + b.z, (d.w * inv) * w.w + b.w);
}

// Four consecutive elements of a row as floats: a float4, or four bf16 in one 8-byte load.
__device__ __forceinline__ float4 load4(const float* row, int quad) { return reinterpret_cast<const float4*>(row)[quad]; }
__device__ __forceinline__ float4 load4(const __nv_bfloat16* row, int quad) {
    return widen4(reinterpret_cast<const uint2*>(row)[quad]);
}

// The row is read three times; after the first pass it comes from L1 (8 rows of 4.6 KB at hidden 1152).
template <typename T>
__global__ void __launch_bounds__(32 * kWarpRows)
    vision_layer_norm_bf16_kernel(const T* __restrict__ x, const float* __restrict__ weight,
                                  const float* __restrict__ bias, __nv_bfloat16* __restrict__ y, int rows, int n,
                                  float eps) {
    const int lane = threadIdx.x & 31, row = blockIdx.x * kWarpRows + (threadIdx.x >> 5);
    if (row >= rows) return;  // whole warps: no shuffle below misses a lane
    const T* xr = x + static_cast<size_t>(row) * n;
    __nv_bfloat16* yr = y + static_cast<size_t>(row) * n;
    double s = 0.0;
    for (int i = lane; i < n; i += 32) s += widen(xr[i]);
    const double mean = warp_sum_double(s) / n;
    double v = 0.0;
    for (int i = lane; i < n; i += 32) {
        const double d = widen(xr[i]) - mean;
        v += d * d;
    }
    const double var = warp_sum_double(v) / n;
    const double inv = 1.0 / sqrt(var + static_cast<double>(eps));
    for (int i = lane; i < n; i += 32)
        yr[i] = __float2bfloat16_rn(static_cast<float>((widen(xr[i]) - mean) * inv) * weight[i] + bias[i]);
}

// kWarps warps per row (kWarpRows / kWarps rows a block); lane l of warp w owns the float4s
// (j * kWarps + w) * 32 + l, j < kRegisterChunks. T: the residual stream's type, float or bf16.
template <int kWarps, typename T>
__global__ void __launch_bounds__(32 * kWarpRows)
    vision_layer_norm_bf16_registers_kernel(const T* __restrict__ x, const float* __restrict__ weight,
                                            const float* __restrict__ bias, __nv_bfloat16* __restrict__ y, int rows,
                                            int n, float eps) {
    __shared__ double partial[kWarpRows];
    pdl_launch_dependents();
    pdl_wait();  // x comes from the GEMM before
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, sub = warp % kWarps;
    const int row = blockIdx.x * (kWarpRows / kWarps) + warp / kWarps;
    const bool live = row < rows;  // no early return: the block's barriers need every warp
    const T* xr = x + static_cast<size_t>(live ? row : 0) * n;
    const int quads = n / 4;
    auto owned = [&](int j) { return (j * kWarps + sub) * 32 + lane; };
    // The sum of the row's warps' values, in double.
    auto row_sum = [&](double v) {
        v = warp_sum_double(v);
        if (kWarps == 1) return v;
        __syncthreads();  // partial may still be read by the previous reduction
        if (lane == 0) partial[warp] = v;
        __syncthreads();
        double total = 0.0;
        for (int i = 0; i < kWarps; ++i) total += partial[warp - sub + i];
        return total;
    };
    float4 v[kRegisterChunks];
    double s = 0.0;
#pragma unroll
    for (int j = 0; j < kRegisterChunks; ++j) {
        const int q = owned(j);
        v[j] = live && q < quads ? load4(xr, q) : make_float4(0.f, 0.f, 0.f, 0.f);
        s += static_cast<double>(quad_sum(v[j]));
    }
    const double mean = row_sum(s) / n;
    const float hi = static_cast<float>(mean), lo = static_cast<float>(mean - static_cast<double>(hi));
    float squares = 0.0f;
#pragma unroll
    for (int j = 0; j < kRegisterChunks; ++j)
        if (owned(j) < quads) squares += centre4(v[j], hi, lo);
    const float inv = static_cast<float>(1.0 / sqrt(row_sum(squares) / n + static_cast<double>(eps)));
    if (!live) return;
    const float4* w4 = reinterpret_cast<const float4*>(weight);
    const float4* b4 = reinterpret_cast<const float4*>(bias);
    uint2* yr = reinterpret_cast<uint2*>(y + static_cast<size_t>(row) * n);
#pragma unroll
    for (int j = 0; j < kRegisterChunks; ++j) {
        const int q = owned(j);
        if (q >= quads) continue;
        yr[q] = scale_shift4(v[j], inv, w4[q], b4[q]);
    }
}

// The register kernel's one-warp-a-row arithmetic over bf16 rows, with each warp taking rows
// row, row + warps, ... and the next row's loads in flight while it reduces and writes the current one.
// A launch of one row a warp runs as one wave whose warps all load, then all reduce, then all write,
// so its reads and writes do not overlap; here they do.
__global__ void __launch_bounds__(32 * kWarpRows)
    vision_layer_norm_bf16_rows_pipelined_kernel(const __nv_bfloat16* __restrict__ x, const float* __restrict__ weight,
                                                 const float* __restrict__ bias, __nv_bfloat16* __restrict__ y, int rows,
                                                 int n, float eps) {
    pdl_launch_dependents();
    pdl_wait();  // x comes from the GEMM before
    const int lane = threadIdx.x & 31, warps = gridDim.x * kWarpRows;
    const int quads = n / 4;
    auto owned = [&](int j) { return j * 32 + lane; };
    auto load_row = [&](int row, uint2 (&raw)[kRegisterChunks]) {
        const uint2* xr = reinterpret_cast<const uint2*>(x + static_cast<size_t>(row) * n);
#pragma unroll
        for (int j = 0; j < kRegisterChunks; ++j) raw[j] = owned(j) < quads ? xr[owned(j)] : make_uint2(0u, 0u);
    };
    int row = blockIdx.x * kWarpRows + (threadIdx.x >> 5);
    if (row >= rows) return;  // whole warps
    uint2 raw[kRegisterChunks];
    load_row(row, raw);
    const float4* w4 = reinterpret_cast<const float4*>(weight);
    const float4* b4 = reinterpret_cast<const float4*>(bias);
    for (; row < rows; row += warps) {
        float4 v[kRegisterChunks];
#pragma unroll
        for (int j = 0; j < kRegisterChunks; ++j) v[j] = widen4(raw[j]);
        if (row + warps < rows) load_row(row + warps, raw);
        double s = 0.0;
#pragma unroll
        for (int j = 0; j < kRegisterChunks; ++j) s += static_cast<double>(quad_sum(v[j]));
        const double mean = warp_sum_double(s) / n;
        const float hi = static_cast<float>(mean), lo = static_cast<float>(mean - static_cast<double>(hi));
        float squares = 0.0f;
#pragma unroll
        for (int j = 0; j < kRegisterChunks; ++j)
            if (owned(j) < quads) squares += centre4(v[j], hi, lo);
        const float inv = static_cast<float>(1.0 / sqrt(warp_sum_double(squares) / n + static_cast<double>(eps)));
        uint2* yr = reinterpret_cast<uint2*>(y + static_cast<size_t>(row) * n);
#pragma unroll
        for (int j = 0; j < kRegisterChunks; ++j) {
            const int q = owned(j);
            if (q >= quads) continue;
            yr[q] = scale_shift4(v[j], inv, w4[q], b4[q]);
        }
    }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Blocks of the pipelined kernel an SM: 16 warps, about two rows each at 4096 rows on 132 SMs. H100,
// 4096 x 1152: 7.9-10 us with one block an SM, 6.6 with two, 7.2 with three, 7.4 with four; the
// one-row-a-warp kernel 8.6 (a device-to-device copy of the same bytes: 5.0).
constexpr int kPipelinedBlocksPerSm = 2;


}  // namespace

void vision_layer_norm(const float* x, const float* weight, const float* bias, float* y, int rows, int n, float eps,
                       cudaStream_t stream) {
    if (rows == 0) return;
    vision_layer_norm_kernel<<<rows, 256, 0, stream>>>(x, weight, bias, y, n, eps);
    Q3N_CUDA_LAUNCHED("vision_layer_norm");
}

namespace {

template <typename T>
void layer_norm_to_bf16(const T* x, const float* weight, const float* bias, __nv_bfloat16* y, int rows, int n, float eps,
                        cudaStream_t stream) {
    if (rows == 0) return;
    const bool vectors = n % 4 == 0 && (reinterpret_cast<uintptr_t>(x) & (4 * sizeof(T) - 1)) == 0 && aligned16(weight) &&
                         aligned16(bias) && (reinterpret_cast<uintptr_t>(y) & 7) == 0;
    if (vectors && n <= kRegisterChunks * 128) {
        // PDL: the launch overlaps the end of the GEMM before it (55 of these a 27-block tower).
        if constexpr (std::is_same_v<T, __nv_bfloat16>) {
            const int blocks = std::min((rows + kWarpRows - 1) / kWarpRows, kPipelinedBlocksPerSm * sm_count());
            Q3N_CUDA(launch_pdl(vision_layer_norm_bf16_rows_pipelined_kernel, blocks, 32 * kWarpRows, 0, stream, x, weight,
                                bias, y, rows, n, eps));
        } else {
            Q3N_CUDA(launch_pdl(vision_layer_norm_bf16_registers_kernel<1, T>, (rows + kWarpRows - 1) / kWarpRows,
                                32 * kWarpRows, 0, stream, x, weight, bias, y, rows, n, eps));
        }
        Q3N_CUDA_LAUNCHED("vision_layer_norm_bf16");
        return;
    }
    if (vectors && n <= 4 * kRegisterChunks * 128) {
        constexpr int kRows = kWarpRows / 4;
        Q3N_CUDA(launch_pdl(vision_layer_norm_bf16_registers_kernel<4, T>, (rows + kRows - 1) / kRows, 32 * kWarpRows, 0,
                            stream, x, weight, bias, y, rows, n, eps));
        Q3N_CUDA_LAUNCHED("vision_layer_norm_bf16");
        return;
    }
    vision_layer_norm_bf16_kernel<T><<<(rows + kWarpRows - 1) / kWarpRows, 32 * kWarpRows, 0, stream>>>(x, weight, bias, y,
                                                                                                        rows, n, eps);
    Q3N_CUDA_LAUNCHED("vision_layer_norm_bf16");
}

}  // namespace

void vision_layer_norm_bf16(const float* x, const float* weight, const float* bias, __nv_bfloat16* y, int rows, int n,
                            float eps, cudaStream_t stream) {
    layer_norm_to_bf16(x, weight, bias, y, rows, n, eps, stream);
}

void vision_layer_norm_bf16(const __nv_bfloat16* x, const float* weight, const float* bias, __nv_bfloat16* y, int rows,
                            int n, float eps, cudaStream_t stream) {
    layer_norm_to_bf16(x, weight, bias, y, rows, n, eps, stream);
}

}  // namespace q3n::cuda
