#include "cuda/device_sampling.h"

#include <algorithm>
#include <string>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/device_weights.h"

namespace q3n::cuda {

void DeviceOutput::compute(const float* x, size_t tokens, const size_t* rows, size_t count, cudaStream_t stream) {
    const int H = hidden_;
    rows_host_.resize(count);
    for (size_t i = 0; i < count; ++i) {
        if (rows[i] >= tokens) fail(Q3N_ERR_INTERNAL, "logits requested for a row the last forward did not compute");
        rows_host_[i] = static_cast<int32_t>(rows[i]);
    }
    const bool fp8 = lm_head_.type == WeightType::FP8_E4M3;
    const size_t groups = (static_cast<size_t>(H) + 127) / 128;
    rows_dev_.reserve(count * 4);
    final_.reserve(count * H * 4);
    finaln_.reserve(count * H * 4);
    if (fp8) {
        qf_.reserve(count * H * 4);
        qs_.reserve(count * groups * 4);
    }
    logits_.reserve(count * size_t(vocab_) * 4);
    Q3N_CUDA(cudaMemcpyAsync(rows_dev_.get(), rows_host_.data(), count * 4, cudaMemcpyHostToDevice, stream));
    gather_rows(x, rows_dev_.as<int32_t>(), static_cast<int>(count), H, final_.as<float>(), stream);
    rmsnorm_quantize(final_.as<float>(), nullptr, final_norm_, static_cast<int>(count), H, eps_,
                     fp8 ? nullptr : finaln_.as<float>(), fp8 ? qf_.as<float>() : nullptr, fp8 ? qs_.as<float>() : nullptr,
                     stream);
    // The layers' rule (project): past the GEMV's rows a BF16 head runs on tensor cores (at 32 rows the
    // CUDA-core GEMV took 3.5 ms for Qwen3-4B's 151936 x 2560 head). Not captured in a graph, so the
    // scratch may grow here.
    if (lm_head_.type == WeightType::BF16 && static_cast<int>(count) > kGemvMaxRows)
        lm_scratch_.hilo.reserve(linear_bf16_tc_scratch_bytes(static_cast<int>(count), H));
    project(finaln_.as<float>(), qf_.as<float>(), qs_.as<float>(), static_cast<int>(count), lm_head_, logits_.as<float>(),
            vocab_, lm_scratch_, stream);
}

void DeviceOutput::copy_logits(size_t count, float* out, cudaStream_t stream) {
    Q3N_CUDA(cudaMemcpyAsync(out, logits_.get(), count * size_t(vocab_) * 4, cudaMemcpyDeviceToHost, stream));
    Q3N_CUDA(cudaStreamSynchronize(stream));
}

void DeviceOutput::launch_sampler(size_t count, cudaStream_t stream) {
    const std::vector<int32_t>& ids = penalty_ids_host_;
    sample_params_.reserve(count * sizeof(DeviceSampleParams));
    sample_results_.reserve(count * sizeof(DeviceSampleResult));
    sample_work_.reserve(sample_work_bytes(static_cast<int>(count), vocab_));
    penalty_ids_.reserve(std::max<size_t>(ids.size(), 1) * 4);
    penalty_counts_.reserve(std::max<size_t>(ids.size(), 1) * 4);
    Q3N_CUDA(cudaMemcpyAsync(sample_params_.get(), sample_params_host_.data(), count * sizeof(DeviceSampleParams),
                             cudaMemcpyHostToDevice, stream));
    if (!ids.empty()) {
        Q3N_CUDA(cudaMemcpyAsync(penalty_ids_.get(), ids.data(), ids.size() * 4, cudaMemcpyHostToDevice, stream));
        Q3N_CUDA(cudaMemcpyAsync(penalty_counts_.get(), penalty_counts_host_.data(), ids.size() * 4,
                                 cudaMemcpyHostToDevice, stream));
    }
    sample_rows(logits_.as<float>(), sample_work_.as<float>(), static_cast<int>(count), vocab_,
                sample_params_.as<DeviceSampleParams>(), penalty_ids_.as<int32_t>(), penalty_counts_.as<int32_t>(),
                sample_results_.as<DeviceSampleResult>(), stream);
    sample_results_host_.resize(count);
    Q3N_CUDA(cudaMemcpyAsync(sample_results_host_.data(), sample_results_.get(), count * sizeof(DeviceSampleResult),
                             cudaMemcpyDeviceToHost, stream));
    Q3N_CUDA(cudaStreamSynchronize(stream));
}

void DeviceOutput::sample(size_t count, const DeviceSamplingRequest* requests, DeviceSamplingResult* results,
                          cudaStream_t stream) {
    sample_params_host_.resize(count);
    penalty_ids_host_.clear();
    penalty_counts_host_.clear();
    for (size_t i = 0; i < count; ++i) {
        const q3n_sampling_params& p = *requests[i].params;
        sample_params_host_[i] = DeviceSampleParams{
            p.temperature, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty, p.frequency_penalty, p.top_k,
            static_cast<int32_t>(p.top_logprobs), p.logprobs ? 1 : 0, static_cast<int32_t>(penalty_ids_host_.size()),
            static_cast<int32_t>(requests[i].penalty_count), -1, p.seed, requests[i].counter};
        penalty_ids_host_.insert(penalty_ids_host_.end(), requests[i].penalty_ids,
                                 requests[i].penalty_ids + requests[i].penalty_count);
        penalty_counts_host_.insert(penalty_counts_host_.end(), requests[i].penalty_counts,
                                    requests[i].penalty_counts + requests[i].penalty_count);
    }
    launch_sampler(count, stream);
    for (size_t i = 0; i < count; ++i) {
        const DeviceSampleResult& r = sample_results_host_[i];
        results[i].token = r.token;
        results[i].fallback = r.fallback != 0;
        results[i].non_finite = r.non_finite != 0;
        results[i].bad_index = r.bad_index;
        results[i].logprob = r.logprob;
    }
}

void DeviceOutput::score(size_t count, const int32_t* tokens, uint32_t top_k, q3n_token_logprob* out,
                         cudaStream_t stream) {
    sample_params_host_.resize(count);
    penalty_ids_host_.clear();
    penalty_counts_host_.clear();
    for (size_t i = 0; i < count; ++i)
        sample_params_host_[i] = DeviceSampleParams{
            0.0f, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, 0, static_cast<int32_t>(std::min<uint32_t>(top_k, Q3N_MAX_TOP_LOGPROBS)),
            1, 0, 0, tokens[i], 0, 0};
    launch_sampler(count, stream);
    for (size_t i = 0; i < count; ++i) {
        const DeviceSampleResult& r = sample_results_host_[i];
        if (r.non_finite)
            fail(Q3N_ERR_NUMERIC, "the logits of a prompt position contain NaN or Inf at token " +
                                      std::to_string(r.bad_index) + "; no log-probability was computed");
        out[i] = r.logprob;
    }
}

}  // namespace q3n::cuda
