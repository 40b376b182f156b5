// Many-row FP8 linears (prefill, wide decode steps) through cuBLASLt's block-scaled FP8 matmul:
// e4m3 activations with one fp32 scale per token and 128 channels (VEC128), e4m3 weights with one
// per 128x128 block (BLK128x128), fp32 out; the exact definition of spec 5.4 on tensor cores.
//
// The scale tensors' memory order is cuBLASLt's own and the operand roles it accepts for these
// modes are not the same on every release, so the first use probes: it runs a small problem in
// each candidate arrangement and keeps the one that equals the GEMV (the reference path, tested
// against the CPU) to 1e-3. If none does, or cuBLASLt lacks the modes, every call returns false
// and the GEMV runs instead. The bound: on CUDA 13.0 / H100 the right arrangement lands at 2.3e-4
// (Hopper's FP8 tensor-core accumulator keeps fewer bits than fp32 within each 128-wide group),
// the wrong ones at 3e-2 and above.
#include <cublasLt.h>
#include <cublas_api.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/device_buffer.h"
#include "cuda/ops.h"

#if defined(CUBLAS_VER_MAJOR) && (CUBLAS_VER_MAJOR > 12 || (CUBLAS_VER_MAJOR == 12 && CUBLAS_VER_MINOR >= 9))
#define Q3N_LT_BLOCK_SCALING 1
#else
#define Q3N_LT_BLOCK_SCALING 0
#endif

namespace q3n::cuda {
namespace {

// How scales are laid out, and which operand is the weight.
struct Arrangement {
    bool weights_are_a;      // A = W (BLK), B = X (VEC): D is y itself; else D = y^T, transposed after
    bool act_scales_m_fast;  // VEC128 scales indexed [k_block][row] (else [row][k_block])
    bool w_scales_k_fast;    // BLK128x128 scales indexed [n_block][k_block] (else [k_block][n_block])
    bool w_scales_pad4;      // the fast index's extent rounded up to a multiple of 4
};

__host__ __device__ int ceil_div(int a, int b) { return (a + b - 1) / b; }
int round4(int a) { return (a + 3) / 4 * 4; }

constexpr double kProbeTolerance = 1e-3;
constexpr int kArrangements = 16;

// Rows from `rows` up to `padded` are zero (data and scales): cuBLASLt plans FP8 only for row
// counts that are multiples of 16. k is a multiple of 128 (gemm_fp8's condition), so a thread packs
// 16 consecutive values of one row: four 16-byte loads, one 16-byte store. The values are e4m3
// numbers already, so the conversion is exact. (One value a thread moved a quarter of the bytes a
// memory transaction can: 20 us for Qwen3-4B's 1K-token q|k|v input against 5 us of traffic.)
__global__ void pack_activations_kernel(const float* qf, const float* qs, int rows, int padded, int k, uint8_t* q8,
                                        float* scales, bool m_fast) {
    const int groups = k / 128;
    const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const size_t chunks = static_cast<size_t>(padded) * k / 16;
    if (i < chunks) {
        const size_t e = i * 16;
        uint32_t words[4] = {0, 0, 0, 0};
        if (e < static_cast<size_t>(rows) * k) {
            const float4* src = reinterpret_cast<const float4*>(qf + e);
#pragma unroll
            for (int w = 0; w < 4; ++w) {
                const float4 v = src[w];
                words[w] = float2_to_e4m3x2_hw(v.x, v.y) | (float2_to_e4m3x2_hw(v.z, v.w) << 16);
            }
        }
        reinterpret_cast<uint4*>(q8)[i] = make_uint4(words[0], words[1], words[2], words[3]);
    }
    if (i < static_cast<size_t>(padded) * groups) {
        const int r = static_cast<int>(i / groups), g = static_cast<int>(i % groups);
        scales[m_fast ? static_cast<size_t>(g) * padded + r : i] = r < rows ? qs[i] : 0.0f;
    }
}

__global__ void transpose_kernel(const float* in, int rows_in, int cols_in, int ld_in, float* out, int ld_out) {
    // in: [rows_in][ld_in], of which cols_in columns are read; out[c * ld_out + r] = in[r][c]
    __shared__ float tile[32][33];
    const int c0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
    for (int j = threadIdx.y; j < 32; j += blockDim.y) {
        const int r = r0 + j, c = c0 + threadIdx.x;
        if (r < rows_in && c < cols_in) tile[j][threadIdx.x] = in[static_cast<size_t>(r) * ld_in + c];
    }
    __syncthreads();
    for (int j = threadIdx.y; j < 32; j += blockDim.y) {
        const int c = c0 + j, r = r0 + threadIdx.x;
        if (r < rows_in && c < cols_in) out[static_cast<size_t>(c) * ld_out + r] = tile[threadIdx.x][j];
    }
}

class LtGemm {
public:
    static LtGemm& instance() {
        static LtGemm g;
        return g;
    }

    // The arrangement, probing on first use; null when cuBLASLt cannot do it.
    const Arrangement* arrangement(cudaStream_t stream) {
        std::call_once(probed_, [&] { probe(stream); });
        return usable_ ? &chosen_ : nullptr;
    }

    std::string report(cudaStream_t stream) {
        arrangement(stream);
        return report_;
    }

    bool run(const Arrangement& a, const uint8_t* x8, const float* xs, int M, const uint8_t* w8, const float* ws, int N,
             int K, float* d, int ldd, cudaStream_t stream) {
        std::lock_guard<std::mutex> lock(mutex_);
        const auto key = std::make_tuple(a.weights_are_a, M, N, K, ldd);
        auto it = plans_.find(key);
        const void* a_scale = a.weights_are_a ? static_cast<const void*>(ws) : xs;
        const void* b_scale = a.weights_are_a ? static_cast<const void*>(xs) : ws;
        if (it == plans_.end()) {
            Plan p;
            if (!make_plan(a, M, N, K, ldd, a_scale, b_scale, p)) return false;
            it = plans_.emplace(key, p).first;
        }
        Plan& p = it->second;
        if (cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scale, sizeof a_scale) ||
            cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scale, sizeof b_scale))
            return false;
        const float alpha = 1.0f, beta = 0.0f;
        const void* A = a.weights_are_a ? static_cast<const void*>(w8) : x8;
        const void* B = a.weights_are_a ? static_cast<const void*>(x8) : w8;
        const cublasStatus_t st = cublasLtMatmul(handle_, p.desc, &alpha, A, p.a, B, p.b, &beta, d, p.d, d, p.d, &p.algo,
                                                 workspace_.get(), workspace_.bytes(), stream);
        if (st != CUBLAS_STATUS_SUCCESS) last_failure_ = std::string("matmul failed: ") + cublasLtGetStatusName(st);
        return st == CUBLAS_STATUS_SUCCESS;
    }

private:
    struct Plan {
        cublasLtMatmulDesc_t desc = nullptr;
        cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
        cublasLtMatmulAlgo_t algo{};
    };

    LtGemm() {
        if (cublasLtCreate(&handle_) != CUBLAS_STATUS_SUCCESS) handle_ = nullptr;
        workspace_.resize(32u << 20);
    }

    // The scale pointers are part of the description: with block scaling the heuristic rejects a
    // descriptor without them (CUBLAS_STATUS_INVALID_VALUE on CUDA 13.0).
    bool make_plan(const Arrangement& a, int M, int N, int K, int ldd, const void* a_scale, const void* b_scale, Plan& p) {
#if !Q3N_LT_BLOCK_SCALING
        return false;  // this cuBLASLt predates block-scaled FP8 (12.9)
#else
        if (!handle_) return false;
        // Column-major view: D (m x n) = op(A) (m x k) * op(B) (k x n); FP8 wants A transposed, B not.
        const int m = a.weights_are_a ? N : M, n = a.weights_are_a ? M : N;
        const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
        const cublasLtMatmulMatrixScale_t vec = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F,
                                          blk = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
        const cublasLtMatmulMatrixScale_t a_mode = a.weights_are_a ? blk : vec, b_mode = a.weights_are_a ? vec : blk;
        bool ok = cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS;
        ok = ok && !cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
        ok = ok && !cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
        ok = ok && !cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &a_mode, sizeof a_mode);
        ok = ok && !cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &b_mode, sizeof b_mode);
        ok = ok && !cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scale, sizeof a_scale);
        ok = ok && !cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scale, sizeof b_scale);
        ok = ok && !cublasLtMatrixLayoutCreate(&p.a, CUDA_R_8F_E4M3, K, m, K);
        ok = ok && !cublasLtMatrixLayoutCreate(&p.b, CUDA_R_8F_E4M3, K, n, K);
        ok = ok && !cublasLtMatrixLayoutCreate(&p.d, CUDA_R_32F, m, n, ldd);
        cublasLtMatmulPreference_t pref = nullptr;
        ok = ok && !cublasLtMatmulPreferenceCreate(&pref);
        const size_t ws = workspace_.bytes();
        ok = ok && !cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
        cublasLtMatmulHeuristicResult_t result{};
        int found = 0;
        if (!ok) last_failure_ = "descriptor or layout rejected";
        if (ok) {
            const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle_, p.desc, p.a, p.b, p.d, p.d, pref, 1, &result, &found);
            if (st != CUBLAS_STATUS_SUCCESS || found == 0) {
                last_failure_ = std::string("no algorithm (") + cublasLtGetStatusName(st) + ", " + std::to_string(found) + " found)";
                ok = false;
            }
        }
        if (pref) cublasLtMatmulPreferenceDestroy(pref);
        if (!ok) {
            if (p.desc) cublasLtMatmulDescDestroy(p.desc);
            for (auto l : {p.a, p.b, p.d})
                if (l) cublasLtMatrixLayoutDestroy(l);
            return false;
        }
        p.algo = result.algo;
        return true;
#endif
    }

    void probe(cudaStream_t stream) {
        if (!handle_) {
            report_ = "cuBLASLt handle could not be created\n";
            return;
        }
#if !Q3N_LT_BLOCK_SCALING
        report_ = "this cuBLASLt predates block-scaled FP8 (12.9)\n";
        return;
#endif
        // A problem with several blocks along every dimension and no symmetry that would hide a
        // transposed scale, and block counts (5 along K, 3 along N) that are not multiples of 4, so a
        // padded and an unpadded scale layout differ: M = 192 rows, N = 384, K = 640.
        const int M = 192, N = 384, K = 640, kb = K / 128, nb = N / 128;
        std::vector<float> x(size_t(M) * K);
        std::vector<uint8_t> w(size_t(N) * K);
        std::vector<float> wscale(size_t(nb) * kb);
        uint32_t state = 12345;
        auto next = [&] {
            state = state * 1664525u + 1013904223u;
            return state >> 8;
        };
        for (auto& v : x) v = (static_cast<float>(next() % 2001) - 1000.0f) / 250.0f * (1 + (next() % 3));
        for (auto& v : w) {
            v = static_cast<uint8_t>(next() % 254);
            if ((v & 0x7f) == 0x7f) v = 0x7e;
        }
        for (size_t i = 0; i < wscale.size(); ++i) wscale[i] = 0.001f * static_cast<float>(1 + i % 7);
        DeviceBuffer dx(x.size() * 4), dqf(x.size() * 4), dqs(size_t(M) * kb * 4), dw(w.size()), dws(wscale.size() * 4);
        DeviceBuffer dref(size_t(M) * N * 4), dout(size_t(M) * N * 4), dtmp(size_t(M) * N * 4), dx8(x.size()),
            dxs(size_t(M) * kb * 4), dwlt(size_t(round4(kb)) * round4(nb) * 4);
        Q3N_CUDA(cudaMemcpyAsync(dx.get(), x.data(), x.size() * 4, cudaMemcpyHostToDevice, stream));
        Q3N_CUDA(cudaMemcpyAsync(dw.get(), w.data(), w.size(), cudaMemcpyHostToDevice, stream));
        Q3N_CUDA(cudaMemcpyAsync(dws.get(), wscale.data(), wscale.size() * 4, cudaMemcpyHostToDevice, stream));
        quantize_fp8(dx.as<float>(), M, K, dqf.as<float>(), dqs.as<float>(), stream);
        DeviceLinear lin{WeightType::FP8_E4M3, dw.get(), dws.as<float>(), N, K, kb};
        linear(dx.as<float>(), dqf.as<float>(), dqs.as<float>(), M, lin, dref.as<float>(), N, stream);
        std::vector<float> ref(size_t(M) * N), got(ref.size());
        Q3N_CUDA(cudaMemcpyAsync(ref.data(), dref.get(), ref.size() * 4, cudaMemcpyDeviceToHost, stream));
        Q3N_CUDA(cudaStreamSynchronize(stream));
        for (int order = 0; order < kArrangements; ++order) {
            const Arrangement a{(order & 1) == 0, (order & 2) == 0, (order & 4) == 0, (order & 8) == 0};
            pack_activations_for_gemm(dqf.as<float>(), dqs.as<float>(), M, M, K, a, dx8.as<uint8_t>(), dxs.as<float>(), stream);
            std::vector<float> wl = weight_scales_for_gemm(wscale, N, K, a);
            Q3N_CUDA(cudaMemcpyAsync(dwlt.get(), wl.data(), wl.size() * 4, cudaMemcpyHostToDevice, stream));
            Q3N_CUDA(cudaStreamSynchronize(stream));
            Q3N_CUDA(cudaMemsetAsync(dout.get(), 0, dout.bytes(), stream));
            float* d = a.weights_are_a ? dout.as<float>() : dtmp.as<float>();
            const int ldd = a.weights_are_a ? N : M;
            const std::string name = "arrangement " + std::to_string(order) + " (weights " +
                                     (a.weights_are_a ? "A" : "B") + ", activation scales " +
                                     (a.act_scales_m_fast ? "row-fast" : "block-fast") + ", weight scales " +
                                     (a.w_scales_k_fast ? "k-fast" : "n-fast") + (a.w_scales_pad4 ? " padded to 4" : "") + "): ";
            if (!run(a, dx8.as<uint8_t>(), dxs.as<float>(), M, dw.as<uint8_t>(), dwlt.as<float>(), N, K, d, ldd, stream)) {
                cudaGetLastError();
                report_ += name + last_failure_ + "\n";
                continue;
            }
            if (!a.weights_are_a) transpose_into(dtmp.as<float>(), N, M, M, dout.as<float>(), N, stream);
            if (const cudaError_t e = cudaStreamSynchronize(stream); e != cudaSuccess) {
                cudaGetLastError();
                report_ += name + "CUDA error " + cudaGetErrorName(e) + "\n";
                continue;
            }
            Q3N_CUDA(cudaMemcpy(got.data(), dout.get(), got.size() * 4, cudaMemcpyDeviceToHost));
            double num = 0, den = 0;
            for (size_t i = 0; i < got.size(); ++i) {
                num += (double(got[i]) - ref[i]) * (double(got[i]) - ref[i]);
                den += double(ref[i]) * ref[i];
            }
            const double rel = den > 0 ? std::sqrt(num / den) : -1.0;
            report_ += name + "relative error " + std::to_string(rel) + (rel >= 0 && rel < kProbeTolerance ? " (chosen)" : "") + "\n";
            if (rel >= 0 && rel < kProbeTolerance) {
                chosen_ = a;
                usable_ = true;
                return;
            }
        }
    }

    cublasLtHandle_t handle_ = nullptr;
    DeviceBuffer workspace_;
    std::once_flag probed_;
    bool usable_ = false;
    std::string report_, last_failure_;
    Arrangement chosen_{};
    std::mutex mutex_;
    std::map<std::tuple<bool, int, int, int, int>, Plan> plans_;

public:
    static void pack_activations_for_gemm(const float* qf, const float* qs, int rows, int padded, int k, const Arrangement& a,
                                          uint8_t* q8, float* scales, cudaStream_t stream) {
        // One thread per 16 values, and enough threads for the scales (a row has k / 16 chunks and
        // k / 128 scales, so the chunks always outnumber them).
        const size_t n = static_cast<size_t>(padded) * k / 16;
        pack_activations_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(qf, qs, rows, padded, k, q8,
                                                                                         scales, a.act_scales_m_fast);
        Q3N_CUDA_LAUNCHED("pack_activations_for_gemm");
    }

    static std::vector<float> weight_scales_for_gemm(const std::vector<float>& s, int N, int K, const Arrangement& a) {
        const int kb = ceil_div(K, 128), nb = ceil_div(N, 128);
        const int fast = a.w_scales_k_fast ? kb : nb, slow = a.w_scales_k_fast ? nb : kb;
        const int ld = a.w_scales_pad4 ? round4(fast) : fast;
        std::vector<float> out(size_t(ld) * slow, 0.0f);
        for (int i = 0; i < nb; ++i)
            for (int j = 0; j < kb; ++j)
                out[a.w_scales_k_fast ? size_t(i) * ld + j : size_t(j) * ld + i] = s[size_t(i) * kb + j];
        return out;
    }

    static void transpose_into(const float* in, int rows_in, int cols_in, int ld_in, float* out, int ld_out,
                               cudaStream_t stream) {
        transpose_kernel<<<dim3(ceil_div(cols_in, 32), ceil_div(rows_in, 32)), dim3(32, 8), 0, stream>>>(in, rows_in, cols_in,
                                                                                                      ld_in, out, ld_out);
        Q3N_CUDA_LAUNCHED("transpose");
    }
};

}  // namespace

bool gemm_fp8_available(cudaStream_t stream) { return LtGemm::instance().arrangement(stream) != nullptr; }

bool fp8_gemm_enabled(cudaStream_t stream) {
    const char* exact = std::getenv("Q3N_FP8_EXACT");
    if (exact && std::strcmp(exact, "0") != 0 && *exact) return false;
    return gemm_fp8_available(stream);
}

std::string gemm_fp8_probe_report(cudaStream_t stream) { return LtGemm::instance().report(stream); }

std::vector<float> gemm_fp8_weight_scales(const std::vector<float>& scales, int out, int in, cudaStream_t stream) {
    const Arrangement* a = LtGemm::instance().arrangement(stream);
    return a ? LtGemm::weight_scales_for_gemm(scales, out, in, *a) : std::vector<float>();
}

bool gemm_fp8_takes(const DeviceLinear& w, int ldy) {
    // K must be whole 128-wide scale blocks: with a partial last block the results were off by 13-25%
    // on the tiny FP8 fixtures (Qwen3-Next, Qwen3-VL, K = 192), so those take the exact GEMV. Every
    // released Qwen3 shape is whole blocks.
    return w.gemm_scales && w.type == WeightType::FP8_E4M3 && w.in % 128 == 0 && ldy % 4 == 0;
}

namespace {
bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
}  // namespace

namespace {

// The GEMM on packed activations (rows of them, padded to a multiple of 16 with zeros) into y.
bool run_packed(const Arrangement& a, const uint8_t* q8, const float* s8, int rows, const DeviceLinear& w, float* y,
                int ldy, GemmScratch& scratch, cudaStream_t stream) {
    const int K = w.in, N = w.out, padded = (rows + 15) / 16 * 16;
    LtGemm& lt = LtGemm::instance();
    const auto* W = static_cast<const uint8_t*>(w.data);
    if (a.weights_are_a && padded == rows) return lt.run(a, q8, s8, rows, W, w.gemm_scales, N, K, y, ldy, stream);
    scratch.transposed.reserve(static_cast<size_t>(padded) * N * 4);
    float* tmp = scratch.transposed.as<float>();
    if (a.weights_are_a) {  // [padded][N], of which the first `rows` rows are y's
        if (!lt.run(a, q8, s8, padded, W, w.gemm_scales, N, K, tmp, N, stream)) return false;
        Q3N_CUDA(cudaMemcpy2DAsync(y, static_cast<size_t>(ldy) * 4, tmp, static_cast<size_t>(N) * 4, static_cast<size_t>(N) * 4,
                                   rows, cudaMemcpyDeviceToDevice, stream));
        return true;
    }
    // [N][padded]: transposed into y's rows.
    if (!lt.run(a, q8, s8, padded, W, w.gemm_scales, N, K, tmp, padded, stream)) return false;
    LtGemm::transpose_into(tmp, N, rows, padded, y, ldy, stream);
    return true;
}

}  // namespace

bool gemm_fp8(const float* quantized, const float* act_scales, int rows, const DeviceLinear& w, float* y, int ldy,
              GemmScratch& scratch, cudaStream_t stream) {
    const Arrangement* a = LtGemm::instance().arrangement(stream);
    if (!a || !gemm_fp8_takes(w, ldy) || !aligned16(y) || !aligned16(quantized)) return false;
    const int K = w.in, groups = ceil_div(K, 128), padded = (rows + 15) / 16 * 16;
    scratch.q8.reserve(static_cast<size_t>(padded) * K);
    scratch.scales.reserve(static_cast<size_t>(padded) * groups * 4);
    LtGemm::pack_activations_for_gemm(quantized, act_scales, rows, padded, K, *a, scratch.q8.as<uint8_t>(),
                                      scratch.scales.as<float>(), stream);
    return run_packed(*a, scratch.q8.as<uint8_t>(), scratch.scales.as<float>(), rows, w, y, ldy, scratch, stream);
}

Fp8Out gemm_fp8_packed_out(GemmScratch& scratch, int rows, cudaStream_t stream) {
    Fp8Out out;
    const Arrangement* a = LtGemm::instance().arrangement(stream);
    if (!a) return out;
    out.q8 = scratch.q8.as<uint8_t>();
    out.scales8 = scratch.scales.as<float>();
    out.padded = (rows + 15) / 16 * 16;
    out.scales_m_fast = a->act_scales_m_fast;
    return out;
}

void zero_fp8_padding(const Fp8Out& out, int rows, int k, cudaStream_t stream) {
    if (!out.q8 || out.padded == rows) return;
    const int groups = ceil_div(k, 128);
    Q3N_CUDA(cudaMemsetAsync(out.q8 + static_cast<size_t>(rows) * k, 0, static_cast<size_t>(out.padded - rows) * k, stream));
    if (out.scales_m_fast)  // [group][padded]: each group's padding is its own stretch
        Q3N_CUDA(cudaMemset2DAsync(out.scales8 + rows, static_cast<size_t>(out.padded) * 4, 0,
                                   static_cast<size_t>(out.padded - rows) * 4, groups, stream));
    else
        Q3N_CUDA(cudaMemsetAsync(out.scales8 + static_cast<size_t>(rows) * groups, 0,
                                 static_cast<size_t>(out.padded - rows) * groups * 4, stream));
}

bool gemm_fp8_packed(const Fp8Out& in, int rows, const DeviceLinear& w, float* y, int ldy, GemmScratch& scratch,
                     cudaStream_t stream) {
    const Arrangement* a = LtGemm::instance().arrangement(stream);
    if (!a || !in.q8 || !gemm_fp8_takes(w, ldy) || !aligned16(y)) return false;
    return run_packed(*a, in.q8, in.scales8, rows, w, y, ldy, scratch, stream);
}

}  // namespace q3n::cuda
