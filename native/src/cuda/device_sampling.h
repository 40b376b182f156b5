// The end of every CUDA runner's step: the chosen rows of the last hidden states through the final
// RMSNorm and the LM head into device logits, then ModelRunner::logits / sample / score from them.
// Logits stay on the device for sampling and prompt scoring (cuda/sample.h); only the sampled
// tokens, their log-probabilities, or logits the caller asked for come back. Host staging vectors
// and device buffers are members, so a steady decode allocates nothing.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "cuda/device_buffer.h"
#include "cuda/ops.h"
#include "cuda/sample.h"
#include "model/model_runner.h"

namespace q3n::cuda {

class DeviceOutput {
public:
    // final_norm is the plain w * x_hat weight (a 1 + w norm passes its weight shifted).
    DeviceOutput(int hidden, int vocab, float eps, const DeviceLinear& lm_head, const float* final_norm)
        : hidden_(hidden), vocab_(vocab), eps_(eps), lm_head_(lm_head), final_norm_(final_norm) {}

    // Logits of rows[0..count) of x ([tokens, hidden], the last forward's) into the device buffer.
    void compute(const float* x, size_t tokens, const size_t* rows, size_t count, cudaStream_t stream);
    const float* logits() const { return logits_.as<float>(); }

    void copy_logits(size_t count, float* out, cudaStream_t stream);
    void sample(size_t count, const DeviceSamplingRequest* requests, DeviceSamplingResult* results, cudaStream_t stream);
    void score(size_t count, const int32_t* tokens, uint32_t top_k, q3n_token_logprob* out, cudaStream_t stream);

private:
    void launch_sampler(size_t count, cudaStream_t stream);

    int hidden_, vocab_;
    float eps_;
    DeviceLinear lm_head_;
    const float* final_norm_;
    DeviceBuffer rows_dev_, final_, finaln_, qf_, qs_, logits_;
    GemmScratch lm_scratch_;  // linear_bf16_tc for steps with many rows
    DeviceBuffer sample_params_, sample_results_, sample_work_, penalty_ids_, penalty_counts_;
    std::vector<int32_t> rows_host_, penalty_ids_host_, penalty_counts_host_;
    std::vector<DeviceSampleParams> sample_params_host_;
    std::vector<DeviceSampleResult> sample_results_host_;
};

}  // namespace q3n::cuda
