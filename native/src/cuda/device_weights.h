// Weights on the device for the CUDA model runners: single Linears, projections stacked into one
// matrix when they read the same input, norm vectors, and the experts of a MoE block with their
// device-side descriptor table. One owner per runner; every upload is counted in WeightStats the way
// the CPU runners count their weights, so q3n_model_info reads the same on either backend.
#pragma once

#include <cuda_runtime.h>

#include <initializer_list>
#include <vector>

#include "cpu/ops.h"
#include "cuda/device_buffer.h"
#include "cuda/next_ops.h"
#include "cuda/ops.h"
#include "model/model_runner.h"
#include "model/weights.h"

namespace q3n::cuda {

// Projections that read the same input: one matrix when they can be stacked (same dtype and, for
// FP8, every part a whole number of 128-row scale blocks), else one Linear per part written side by
// side into the same output row.
struct StackedLinear {
    std::vector<DeviceLinear> parts;
    std::vector<int> offsets;  // each part's first output column in the shared output row
    bool fp8_input = false;    // some part reads quantised activations
    bool f32_input = false;    // some part reads fp32 activations
    int out = 0;               // total output columns
};

inline bool is_fp8(const DeviceLinear& l) { return l.type == WeightType::FP8_E4M3; }

// Every runner's projection: y = x W^T from the step's activations (fp32 `x`, or quantize_fp8's `q`
// and `qs` for FP8 weights). Up to 8 rows (one column tile of linear_fp8_mma) the weight stream of
// linear() wins; from 16 rows cuBLASLt's block-scaled GEMM does (H100: 12.8 against 22.2 us for
// q|k|v at 16 rows, bench_cuda_ops). Only weights whose DeviceWeights enabled the GEMM carry
// gemm_scales, so a runner turns the GEMM off by not enabling it there.
void project(const float* x, const float* q, const float* qs, int rows, const DeviceLinear& w, float* y, int ldy,
             GemmScratch& scratch, cudaStream_t stream);
// Each part of a stack into its columns of the shared output row.
void project(const float* x, const float* q, const float* qs, int rows, const StackedLinear& w, float* y, int ldy,
             GemmScratch& scratch, cudaStream_t stream);
// project() for a step whose quantising kernels wrote packed activations (Fp8Out in ops.h): FP8
// weights run gemm_fp8_packed on them (throwing where it cannot take the weight: callers ask
// takes_packed first), other weights read x as project() does.
void project_packed(const float* x, const Fp8Out& q, int rows, const DeviceLinear& w, float* y, int ldy,
                    GemmScratch& scratch, cudaStream_t stream);
void project_packed(const float* x, const Fp8Out& q, int rows, const StackedLinear& w, float* y, int ldy,
                    GemmScratch& scratch, cudaStream_t stream);
// Whether project_packed takes this weight writing at column `offset` of rows of `ldy` floats.
bool takes_packed(const DeviceLinear& w, int ldy, int offset = 0);
bool takes_packed(const StackedLinear& w, int ldy);

// A MoE block on the device: the descriptor the kernels take, and the storage behind it.
struct DeviceMoeBlock {
    DeviceMoe moe;
    DeviceLinear router;       // [E, H]
    DeviceLinear shared_gate;  // [1, H] (Qwen3-Next); empty otherwise
    // [E + 1, H]: the router's rows, then the shared gate's, when upload_moe could stack them (same
    // dtype and width, BF16 or F32); router and shared_gate are then views of these rows. Empty
    // otherwise.
    DeviceLinear router_gate;
};

// Up to this many rows a linear streams its weights through the GEMV; past it, FP8 layer weights
// go to gemm_fp8 and BF16 ones to linear_bf16_tc (tensor cores) when they can take the call.
constexpr int kGemvMaxRows = 8;

class DeviceWeights {
public:
    // `gemm` attaches cuBLASLt's scale layout to FP8 layer weights (gemm_fp8_available passed).
    DeviceWeights(cudaStream_t stream, bool gemm) : stream_(stream), gemm_(gemm) {}
    DeviceWeights(const DeviceWeights&) = delete;
    DeviceWeights& operator=(const DeviceWeights&) = delete;

    // `layer` weights may take the cuBLASLt path; embedding and lm_head always use the GEMV.
    DeviceLinear upload(const Linear& l, bool layer = true);
    StackedLinear upload_stacked(std::initializer_list<const Linear*> parts);
    // Counted as parameters; `offset` is added to every element on the host in fp32 (the Qwen3-Next
    // 1 + w norms become plain w * x_hat norms, bit for bit: the same product in another order).
    const float* upload_vector(const std::vector<float>& v, float offset = 0.0f, bool count = true);
    // Uncounted device copies of host arrays (tables, rotary frequencies).
    template <typename T>
    T* upload_array(const std::vector<T>& v) {
        owned_.emplace_back(std::max<size_t>(v.size() * sizeof(T), 4));
        if (!v.empty()) Q3N_CUDA(cudaMemcpy(owned_.back().get(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
        return owned_.back().as<T>();
    }
    // The router, the experts (all in one allocation per block, rows 256-byte aligned) and, when
    // given, the shared expert and its gate (stacked under the router where it can be: router_gate).
    // Every expert weight must have one type (BF16 or FP8).
    DeviceMoeBlock upload_moe(const Linear& router, const std::vector<cpu::MoeExpert>& experts, size_t top_k,
                              const cpu::MoeExpert* shared, const Linear* shared_gate);

    const WeightStats& stats() const { return stats_; }
    int max_gemm_out() const { return max_gemm_out_; }
    bool gemm() const { return gemm_; }
    // Grows the scratch of gemm_fp8 (FP8 layer weights, rows padded to 16 as it pads them) and of
    // linear_bf16_tc (BF16 layer weights) for `rows` activation rows of at most `max_in` columns, so
    // neither grows it itself (a captured graph would keep the old address). Returns true when a
    // buffer moved.
    bool size_gemm_scratch(GemmScratch& scratch, size_t rows, size_t max_in) const;
    // The parameter count of a vector not uploaded (norms folded elsewhere).
    void count(size_t parameters, size_t bytes) {
        stats_.parameter_count += parameters;
        stats_.bytes += bytes;
    }

private:
    void attach_gemm_scales(DeviceLinear& d, const std::vector<float>& scales);
    void count(const Linear& l);

    cudaStream_t stream_;
    bool gemm_;
    std::vector<DeviceBuffer> owned_;
    WeightStats stats_;
    int max_gemm_out_ = 0;
    int bf16_max_in_ = 0;  // the widest input of a BF16 layer weight (linear_bf16_tc's scratch)
};

}  // namespace q3n::cuda
