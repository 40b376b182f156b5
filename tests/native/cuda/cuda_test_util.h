// Helpers shared by the CUDA test files: the skip without a GPU, random inputs, host <-> device
// copies, error measures that say where results differ, and the CPU thread pool the references use.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/thread_pool.h"
#include "cuda/cuda_backend.h"
#include "cuda/cuda_check.h"
#include "cuda/device_buffer.h"

// Every GPU test starts with this: without a device it is skipped with a message, never passed silently.
#define REQUIRE_GPU()                                                          \
    if (::q3n::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: GPU tests skipped"

namespace q3n::cuda_test {

// Sets an environment variable for one scope (runners read theirs when created), restoring it after.
class ScopedEnv {
public:
    ScopedEnv(const char* name, const char* value) : name_(name) {
        if (const char* old = std::getenv(name)) old_ = old, had_ = true;
        setenv(name, value, 1);
    }
    ~ScopedEnv() { had_ ? setenv(name_.c_str(), old_.c_str(), 1) : unsetenv(name_.c_str()); }
    ScopedEnv(const ScopedEnv&) = delete;
    ScopedEnv& operator=(const ScopedEnv&) = delete;

private:
    std::string name_, old_;
    bool had_ = false;
};

// The tiny random Qwen3-Next and Qwen3-VL FP8 fixtures test the exact FP8 definition (spec 5.4), so
// their GPU runners use the exact GEMV at every row count. With cuBLASLt's block-scaled GEMM each
// prefill linear moves by 1-3e-4 (Hopper's FP8 accumulator; measured per call against the GEMV on
// these very fixtures), and these models turn that into 10-25% of the logits: MoE routing flips
// between near-tied experts and e4m3 re-roundings compound over the layers. The GEMM path itself is
// checked per call (CudaOps.GemmFp8MatchesCpu) and end to end by the dense FP8 fixtures.
inline ScopedEnv exact_fp8() { return ScopedEnv("Q3N_FP8_EXACT", "1"); }

inline std::vector<float> randn(size_t n, uint32_t seed, float scale = 1.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> d(0.0f, scale);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return v;
}

inline std::vector<float> uniform(size_t n, uint32_t seed, float lo, float hi) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> d(lo, hi);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return v;
}

template <typename T>
cuda::DeviceBuffer to_device(const std::vector<T>& v) {
    cuda::DeviceBuffer b(std::max<size_t>(v.size() * sizeof(T), 4));
    if (!v.empty()) Q3N_CUDA(cudaMemcpy(b.get(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    return b;
}

// Waits for the device first, so a kernel's fault surfaces here rather than in a later test.
template <typename T = float>
std::vector<T> to_host(const cuda::DeviceBuffer& b, size_t n) {
    Q3N_CUDA(cudaDeviceSynchronize());
    std::vector<T> v(n);
    if (n) Q3N_CUDA(cudaMemcpy(v.data(), b.get(), n * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
}

// ||a - b|| / ||b||
inline double rel(const float* a, const float* b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; ++i) {
        num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
        den += double(b[i]) * b[i];
    }
    return std::sqrt(num / std::max(den, 1e-300));
}

inline double rel(const std::vector<float>& a, const std::vector<float>& b) {
    EXPECT_EQ(a.size(), b.size());
    return rel(a.data(), b.data(), std::min(a.size(), b.size()));
}

// For failure messages: the relative L2 error, the largest absolute difference and where it is, and
// the first index whose difference exceeds atol + rtol |b|.
inline std::string diff_report(const std::vector<float>& a, const std::vector<float>& b, double atol = 1e-5,
                               double rtol = 1e-4) {
    std::ostringstream s;
    const size_t n = std::min(a.size(), b.size());
    double worst = 0;
    size_t worst_at = 0, first_bad = n;
    for (size_t i = 0; i < n; ++i) {
        const double d = std::fabs(double(a[i]) - b[i]);
        if (!(d <= worst) || std::isnan(d)) {
            worst = std::isnan(d) ? INFINITY : d;
            worst_at = i;
        }
        if (first_bad == n && !(d <= atol + rtol * std::fabs(double(b[i])))) first_bad = i;
    }
    s << "relative L2 " << rel(a.data(), b.data(), n) << ", max abs diff " << worst << " at " << worst_at;
    if (n) s << " (" << a[worst_at] << " vs " << b[worst_at] << ")";
    if (first_bad < n) s << ", first index beyond tolerance " << first_bad << " (" << a[first_bad] << " vs " << b[first_bad] << ")";
    if (a.size() != b.size()) s << ", sizes " << a.size() << " vs " << b.size();
    return s.str();
}

inline ThreadPool& pool() {
    static ThreadPool p(4);
    return p;
}

}  // namespace q3n::cuda_test
