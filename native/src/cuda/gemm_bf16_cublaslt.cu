// gemm_bf16 (gemm_bf16.h) on cuBLASLt: bf16 A and B, CUBLAS_COMPUTE_32F, fp32 alpha and beta, the
// epilogue fused.
//
// Orientation. cuBLASLt is column-major. Read column-major, our row-major y [rows, out] (row stride
// ldy) is y^T, an out x rows matrix with leading dimension ldy; x [rows, k] (ldx) is x^T, k x rows
// with ld ldx; the checkpoint's W [out, k] is W^T, k x out with ld k. y = x W^T is y^T = W x^T, so
// D (out x rows) = op(A) op(B) with A = the stored W^T and TRANSA = T (out x k), B = the stored x^T
// and TRANSB = N (k x rows): the "TN" form every Hopper kernel takes, and no copy of anything. The
// bias is a vector over D's rows, i.e. over our output channels, which CUBLASLT_EPILOGUE_BIAS
// broadcasts along D's columns (our rows) and adds before the GELU.
//
// Epilogues. Store: DEFAULT or BIAS, beta = 0 (C is not read). GeluTanh: GELU or GELU_BIAS (PyTorch
// substitutes gelu(approximate="tanh") for this epilogue where it cannot use cuBLASLt, and the test
// checks the form). Accumulate: beta = 1 with C = D, one layout object for both (cuBLASLt's condition
// for in-place); for a bf16 y the epilogue rounds p + bias to bf16 before adding C (measured: CUDA
// 13.0 on an H100, test_cuda_gemm_bf16.cu prints it). GeluErf: Store, then gelu_erf_kernel over y.
//
// Precision. For a bf16 y the heuristic may only pick split-K algorithms that reduce the partial sums
// in fp32 (CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE): the in-place and output-type schemes would add them
// up in bf16.
//
// Alignment. Unless told otherwise the heuristic assumes 256-byte aligned matrices
// (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES) and reads the bias pointer's alignment from the
// descriptor, so each pointer's actual alignment (capped at 256) is part of a plan's key, the
// preference states it and the bias pointer is in the descriptor when the heuristic runs. 16-byte
// pointers and 16-byte row strides are required (the TMA-fed kernels' minimum); anything else
// returns false for the caller's fallback.
//
// Plans (descriptor, layouts and the heuristic's first algorithm) are cached per device, shape,
// leading dimensions, output type, epilogue and alignments; refusals are cached too, so an unplannable
// shape costs one heuristic query. Pointers, the bias included, are set per call. The workspace is
// one per (device, stream), so work on two streams never shares one.
#include <cublasLt.h>
#include <cublas_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda/cuda_check.h"
#include "cuda/device_buffer.h"
#include "cuda/gemm_bf16.h"

namespace q3n::cuda {
namespace {

constexpr size_t kWorkspaceBytes = 32u << 20;

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void narrow(float* p, float v) { *p = v; }
__device__ __forceinline__ void narrow(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// vision_gemm's erf GELU, in place over rows x cols of a matrix with row stride ld. Rows along grid y,
// columns along x: no 64-bit division per element.
template <typename T>
__global__ void gelu_erf_kernel(T* __restrict__ y, int rows, int cols, int ld) {
    for (int r = blockIdx.y; r < rows; r += gridDim.y)
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
            T* p = y + static_cast<size_t>(r) * ld + c;
            const float v = widen(*p);
            narrow(p, 0.5f * v * (1.0f + erff(v * 0.7071067811865476f)));
        }
}

// The same over a packed bf16 matrix (ld == cols) eight elements a thread: the mergers' GELU (1024 x
// 4608 per image) took 17 us on an H100 one scalar a thread, 3x its memory time.
__global__ void gelu_erf_packed_kernel(uint4* __restrict__ y, size_t vectors) {
    const size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
    if (i >= vectors) return;
    uint4 v = y[i];
    uint32_t* words = reinterpret_cast<uint32_t*>(&v);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        __nv_bfloat162 pair;
        memcpy(&pair, &words[j], 4);
        const float2 f = __bfloat1622float2(pair);
        pair = __floats2bfloat162_rn(0.5f * f.x * (1.0f + erff(f.x * 0.7071067811865476f)),
                                     0.5f * f.y * (1.0f + erff(f.y * 0.7071067811865476f)));
        memcpy(&words[j], &pair, 4);
    }
    y[i] = v;
}

template <typename T>
void gelu_erf(T* y, int rows, int cols, int ld, cudaStream_t stream) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        if (ld == cols && (static_cast<size_t>(rows) * cols) % 8 == 0 && (reinterpret_cast<uintptr_t>(y) & 15) == 0) {
            const size_t vectors = static_cast<size_t>(rows) * cols / 8;
            gelu_erf_packed_kernel<<<static_cast<unsigned>((vectors + 255) / 256), 256, 0, stream>>>(
                reinterpret_cast<uint4*>(y), vectors);
            Q3N_CUDA_LAUNCHED("gemm_bf16 gelu_erf");
            return;
        }
    }
    const dim3 grid(static_cast<unsigned>(std::min((cols + 255) / 256, 64)), static_cast<unsigned>(std::min(rows, 65535)));
    gelu_erf_kernel<T><<<grid, 256, 0, stream>>>(y, rows, cols, ld);
    Q3N_CUDA_LAUNCHED("gemm_bf16 gelu_erf");
}

__global__ void round_to_bf16_kernel(const float* __restrict__ x, __nv_bfloat16* __restrict__ y, size_t n) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
        y[i] = __float2bfloat16_rn(x[i]);
}

// Four at a time, one float4 per thread (the tower's 4096 x 1536 patch input: 24 us scalar on an H100).
__global__ void round_to_bf16_x4_kernel(const float4* __restrict__ x, uint2* __restrict__ y, size_t quads) {
    const size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
    if (i >= quads) return;
    const float4 v = x[i];
    const __nv_bfloat162 first = __floats2bfloat162_rn(v.x, v.y), second = __floats2bfloat162_rn(v.z, v.w);
    uint2 packed;
    memcpy(&packed.x, &first, 4);
    memcpy(&packed.y, &second, 4);
    y[i] = packed;
}

uint32_t alignment(const void* p) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    return a == 0 ? 256u : static_cast<uint32_t>(std::min<uintptr_t>(256, a & (~a + 1)));
}

struct Problem {
    const __nv_bfloat16 *x, *w;
    int ldx, rows, k, out, ldy;
    const void* bias;
    void* y;
    bool fp32_out;
    cublasLtEpilogue_t epilogue;
    float beta;
};

class LtBf16 {
public:
    static LtBf16& instance() {
        // Never destroyed: cuBLASLt and the device may be gone by the time static destructors run.
        static LtBf16* const lt = new LtBf16();
        return *lt;
    }

    bool available() {
        int device = 0;
        if (cudaGetDevice(&device) != cudaSuccess) {
            cudaGetLastError();
            return false;
        }
        std::lock_guard<std::mutex> lock(mutex_);
        return handle(device) != nullptr;
    }

    bool run(const Problem& p, cudaStream_t stream) {
        int device = 0;
        if (cudaGetDevice(&device) != cudaSuccess) {
            cudaGetLastError();
            return refuse("no current CUDA device");
        }
        std::lock_guard<std::mutex> lock(mutex_);
        const cublasLtHandle_t h = handle(device);
        if (!h) return refuse("cuBLASLt could not be opened on device " + std::to_string(device));
        const Key key{device,       p.fp32_out,   static_cast<int>(p.epilogue), p.rows,          p.k,
                      p.out,        p.ldx,        p.ldy,                        alignment(p.x),  alignment(p.w),
                      alignment(p.y), p.bias ? alignment(p.bias) : 0u};
        auto it = plans_.find(key);
        if (it == plans_.end()) it = plans_.emplace(key, make_plan(h, p)).first;
        Plan& plan = it->second;
        if (!plan.usable) return refuse(plan.why);
        void* workspace = nullptr;
        try {
            DeviceBuffer& ws = workspaces_[{device, stream}];
            // An allocation would invalidate a graph being captured on this stream; the caller then
            // takes its non-cuBLASLt path (the engine's prefill reserves it before any capture).
            cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
            if (ws.bytes() < kWorkspaceBytes && cudaStreamIsCapturing(stream, &capture) == cudaSuccess &&
                capture != cudaStreamCaptureStatusNone)
                return refuse("the stream's first cuBLASLt call is inside a graph capture");
            ws.reserve(kWorkspaceBytes);
            workspace = ws.get();
        } catch (const std::exception& e) {
            return refuse(std::string("no workspace: ") + e.what());
        }
        if (p.bias && cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p.bias, sizeof p.bias) !=
                          CUBLAS_STATUS_SUCCESS)
            return refuse("the bias pointer was rejected");
        const float alpha = 1.0f;
        const cublasStatus_t st = cublasLtMatmul(h, plan.desc, &alpha, p.w, plan.a, p.x, plan.b, &p.beta, p.y, plan.d, p.y,
                                                 plan.d, &plan.algo, workspace, kWorkspaceBytes, stream);
        if (st != CUBLAS_STATUS_SUCCESS) return refuse(std::string("cublasLtMatmul: ") + cublasLtGetStatusName(st));
        return true;
    }

    bool refuse(std::string why) {
        std::lock_guard<std::mutex> lock(failure_mutex_);
        last_failure_ = std::move(why);
        return false;
    }

    std::string last_failure() {
        std::lock_guard<std::mutex> lock(failure_mutex_);
        return last_failure_;
    }

private:
    // device, fp32 out, epilogue, rows, k, out, ldx, ldy, alignments of x, W, y and the bias (0: none)
    using Key = std::tuple<int, bool, int, int, int, int, int, int, uint32_t, uint32_t, uint32_t, uint32_t>;

    struct Plan {
        bool usable = false;
        std::string why;
        cublasLtMatmulDesc_t desc = nullptr;
        cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
        cublasLtMatmulAlgo_t algo{};
    };

    LtBf16() = default;

    cublasLtHandle_t handle(int device) {
        auto it = handles_.find(device);
        if (it == handles_.end()) {
            cublasLtHandle_t h = nullptr;
            if (cublasLtCreate(&h) != CUBLAS_STATUS_SUCCESS) h = nullptr;
            it = handles_.emplace(device, h).first;
        }
        return it->second;
    }

    static Plan make_plan(cublasLtHandle_t h, const Problem& p) {
        Plan plan;
        const cudaDataType_t out_type = p.fp32_out ? CUDA_R_32F : CUDA_R_16BF;
        const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
        bool ok = cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS;
        ok = ok && !cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
        ok = ok && !cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
        ok = ok && !cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &p.epilogue, sizeof p.epilogue);
        if (p.bias) ok = ok && !cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p.bias, sizeof p.bias);
        ok = ok && !cublasLtMatrixLayoutCreate(&plan.a, CUDA_R_16BF, p.k, p.out, p.k);
        ok = ok && !cublasLtMatrixLayoutCreate(&plan.b, CUDA_R_16BF, p.k, p.rows, p.ldx);
        ok = ok && !cublasLtMatrixLayoutCreate(&plan.d, out_type, p.out, p.rows, p.ldy);
        cublasLtMatmulPreference_t pref = nullptr;
        ok = ok && !cublasLtMatmulPreferenceCreate(&pref);
        const uint64_t ws = kWorkspaceBytes;
        const uint32_t align_a = alignment(p.w), align_b = alignment(p.x), align_d = alignment(p.y);
        ok = ok && !cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
        ok = ok && !cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof align_a);
        ok = ok && !cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof align_b);
        ok = ok && !cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_d, sizeof align_d);
        ok = ok && !cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d, sizeof align_d);
        if (!p.fp32_out) {
            const uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
            ok = ok && !cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &schemes,
                                                             sizeof schemes);
        }
        if (!ok) plan.why = "a descriptor, layout or preference was rejected";
        cublasLtMatmulHeuristicResult_t result{};
        int found = 0;
        if (ok) {
            const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(h, plan.desc, plan.a, plan.b, plan.d, plan.d, pref, 1,
                                                                     &result, &found);
            if (st != CUBLAS_STATUS_SUCCESS || found == 0 || result.state != CUBLAS_STATUS_SUCCESS) {
                plan.why = std::string("no algorithm for ") + std::to_string(p.rows) + "x" + std::to_string(p.k) + "x" +
                           std::to_string(p.out) + " (" + cublasLtGetStatusName(st) + ", " + std::to_string(found) + " found)";
                ok = false;
            }
        }
        if (pref) cublasLtMatmulPreferenceDestroy(pref);
        if (!ok) {
            if (plan.desc) cublasLtMatmulDescDestroy(plan.desc);
            for (auto l : {plan.a, plan.b, plan.d})
                if (l) cublasLtMatrixLayoutDestroy(l);
            plan.desc = nullptr;
            plan.a = plan.b = plan.d = nullptr;
            return plan;
        }
        plan.algo = result.algo;
        plan.usable = true;
        return plan;
    }

    std::mutex mutex_, failure_mutex_;
    std::map<int, cublasLtHandle_t> handles_;
    std::map<std::pair<int, cudaStream_t>, DeviceBuffer> workspaces_;
    std::map<Key, Plan> plans_;
    std::string last_failure_;
};

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The checks every call makes before cuBLASLt sees it; elem is y's element size.
bool check(const __nv_bfloat16* x, int ldx, int rows, int k, const __nv_bfloat16* w, int out, const void* bias,
           const void* y, int ldy, size_t elem) {
    LtBf16& lt = LtBf16::instance();
    if (rows < 0 || k <= 0 || out <= 0 || ldx < k || ldy < out)
        return lt.refuse("bad shape: rows " + std::to_string(rows) + ", k " + std::to_string(k) + ", out " +
                         std::to_string(out) + ", ldx " + std::to_string(ldx) + ", ldy " + std::to_string(ldy));
    if (!aligned16(x) || !aligned16(w) || !aligned16(y) || (bias && !aligned16(bias)))
        return lt.refuse("a pointer is not 16-byte aligned");
    if (ldx % 8 != 0 || k % 8 != 0 || (static_cast<size_t>(ldy) * elem) % 16 != 0)
        return lt.refuse("a row stride is not a multiple of 16 bytes");
    return true;
}

cublasLtEpilogue_t lt_epilogue(VisionEpilogue e, bool bias) {
    if (e == VisionEpilogue::GeluTanh) return bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
    return bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
}

}  // namespace

bool gemm_bf16_available() { return LtBf16::instance().available(); }

std::string gemm_bf16_last_failure() { return LtBf16::instance().last_failure(); }

void round_to_bf16(const float* x, __nv_bfloat16* y, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    if (n % 4 == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0 && (reinterpret_cast<uintptr_t>(y) & 7) == 0) {
        const size_t quads = n / 4;
        round_to_bf16_x4_kernel<<<static_cast<unsigned>((quads + 255) / 256), 256, 0, stream>>>(
            reinterpret_cast<const float4*>(x), reinterpret_cast<uint2*>(y), quads);
        Q3N_CUDA_LAUNCHED("round_to_bf16");
        return;
    }
    const unsigned blocks = static_cast<unsigned>(std::min<size_t>((n + 255) / 256, 1u << 16));
    round_to_bf16_kernel<<<blocks, 256, 0, stream>>>(x, y, n);
    Q3N_CUDA_LAUNCHED("round_to_bf16");
}

bool gemm_bf16(const __nv_bfloat16* x, int ldx, int rows, int k, const __nv_bfloat16* w, int out,
               const __nv_bfloat16* bias, __nv_bfloat16* y, int ldy, VisionEpilogue epilogue, cudaStream_t stream) {
    if (!check(x, ldx, rows, k, w, out, bias, y, ldy, sizeof(__nv_bfloat16))) return false;
    if (rows == 0) return true;
    const float beta = epilogue == VisionEpilogue::Accumulate ? 1.0f : 0.0f;
    const Problem p{x, w, ldx, rows, k, out, ldy, bias, y, false, lt_epilogue(epilogue, bias != nullptr), beta};
    if (!LtBf16::instance().run(p, stream)) return false;
    if (epilogue == VisionEpilogue::GeluErf) gelu_erf(y, rows, out, ldy, stream);
    return true;
}

bool gemm_bf16(const __nv_bfloat16* x, int ldx, int rows, int k, const __nv_bfloat16* w, int out, const float* bias,
               float* y, int ldy, VisionEpilogue epilogue, cudaStream_t stream) {
    if (!check(x, ldx, rows, k, w, out, bias, y, ldy, sizeof(float))) return false;
    if (rows == 0) return true;
    const float beta = epilogue == VisionEpilogue::Accumulate ? 1.0f : 0.0f;
    const Problem p{x, w, ldx, rows, k, out, ldy, bias, y, true, lt_epilogue(epilogue, bias != nullptr), beta};
    if (!LtBf16::instance().run(p, stream)) return false;
    if (epilogue == VisionEpilogue::GeluErf) gelu_erf(y, rows, out, ldy, stream);
    return true;
}

}  // namespace q3n::cuda
