// The tensor-core peak the prefill and vision figures are divided by: cuBLASLt at 8192^3 (FP8 with
// tensor-wide scales, or BF16), bf16 out, random operands, timed inside a graph. Benchmarks that
// link the engine's objects (the *_ops programs) include it.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/device_buffer.h"
#include "cuda_bench_util.h"

namespace q3n_bench {

// Random bytes; for e4m3 operands no NaN codes (0x7f / 0xff).
__global__ void fill_peak_operand(uint8_t* p, size_t n, uint32_t seed, bool e4m3) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
        uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
        h ^= h >> 15;
        h *= 2246822519u;
        uint8_t v = static_cast<uint8_t>(h >> 13);
        if (e4m3 && (v & 0x7f) == 0x7f) v = 0x7e;
        if (!e4m3 && (i & 1)) v = static_cast<uint8_t>(0x3c + (v & 3));  // bf16 high bytes: finite, modest
        p[i] = v;
    }
}

inline double measure_peak_tflops(bool fp8, cudaStream_t stream) {
    using q3n::cuda::DeviceBuffer;
    const int n = 8192;
    cublasLtHandle_t h;
    if (cublasLtCreate(&h) != CUBLAS_STATUS_SUCCESS) return 0;
    const size_t elem = fp8 ? 1 : 2;
    DeviceBuffer a(size_t(n) * n * elem), b(size_t(n) * n * elem), d(size_t(n) * n * 2), ws(32u << 20), one(4);
    fill_peak_operand<<<1024, 256, 0, stream>>>(a.as<uint8_t>(), a.bytes(), 1, fp8);
    fill_peak_operand<<<1024, 256, 0, stream>>>(b.as<uint8_t>(), b.bytes(), 2, fp8);
    const float f1 = 1.0f;
    cudaMemcpy(one.get(), &f1, 4, cudaMemcpyHostToDevice);
    cublasLtMatmulDesc_t desc;
    cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    const cublasOperation_t t = CUBLAS_OP_T, nn = CUBLAS_OP_N;
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof t);
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &nn, sizeof nn);
    if (fp8) {
        const void* p = one.get();
        cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &p, sizeof p);
        cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &p, sizeof p);
    }
    const cudaDataType_t in = fp8 ? CUDA_R_8F_E4M3 : CUDA_R_16BF;
    cublasLtMatrixLayout_t la, lb, ld;
    cublasLtMatrixLayoutCreate(&la, in, n, n, n);
    cublasLtMatrixLayoutCreate(&lb, in, n, n, n);
    cublasLtMatrixLayoutCreate(&ld, CUDA_R_16BF, n, n, n);
    cublasLtMatmulPreference_t pref;
    cublasLtMatmulPreferenceCreate(&pref);
    const size_t wsb = ws.bytes();
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof wsb);
    cublasLtMatmulHeuristicResult_t r{};
    int found = 0;
    double tflops = 0;
    if (cublasLtMatmulAlgoGetHeuristic(h, desc, la, lb, ld, ld, pref, 1, &r, &found) == CUBLAS_STATUS_SUCCESS && found) {
        const float alpha = 1.0f, beta = 0.0f;
        const double ms = time_on_stream(stream, 5, [&](int) {
            cublasLtMatmul(h, desc, &alpha, a.get(), la, b.get(), lb, &beta, d.get(), ld, d.get(), ld, &r.algo, ws.get(),
                           wsb, stream);
        });
        tflops = 2.0 * n * n * double(n) / (ms / 1e3) / 1e12;
    }
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(ld);
    cublasLtMatmulDescDestroy(desc);
    cublasLtDestroy(h);
    return tflops;
}

}  // namespace q3n_bench
