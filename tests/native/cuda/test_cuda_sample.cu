// The GPU sampler against the host sampler (sampling/sampler.h's contract) and the host
// log-probabilities, on random logits over the real vocabulary size.
//
// Exactness: greedy and top-k 1 must give the host's token every time. With temperature/top-k/top-p/
// min-p, both follow the same order and fp32 weights, but the device's expf may differ from glibc's
// by an ulp and its sums run in another order, so a draw that lands within ~1e-7 of a boundary can
// differ: allowed in at most 1% of draws (none expected at this count). Rows the device hands back
// (`fallback`) are the host's to decide and are not compared. Log-probabilities: fp32 log-sum-exp
// over 151,936 terms with double accumulation on both sides: within 2e-5.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>
#include <vector>

#include "cuda/cuda_backend.h"
#include "cuda/device_buffer.h"
#include "cuda/sample.h"
#include "sampling/logprobs.h"
#include "sampling/sampler.h"

using namespace q3n;
using cuda::DeviceBuffer;

namespace {

constexpr int kVocab = 151936;

struct Case {
    const char* name;
    float temperature;
    int top_k;
    float top_p;
    float min_p;
    float repetition;
    float presence;
    float frequency;
};

TEST(CudaSampler, MatchesHostSampler) {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: GPU tests skipped";
    const std::vector<Case> cases = {
        {"greedy", 0.0f, 0, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f},
        {"greedy+penalties", 0.0f, 0, 1.0f, 0.0f, 1.3f, 0.5f, 0.2f},
        {"top_k1", 0.8f, 1, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f},
        {"qwen_instruct", 0.7f, 20, 0.8f, 0.0f, 1.0f, 0.0f, 0.0f},
        {"qwen_thinking", 0.6f, 20, 0.95f, 0.0f, 1.0f, 1.5f, 0.0f},
        {"top_p_only", 1.0f, 0, 0.9f, 0.0f, 1.0f, 0.0f, 0.0f},
        {"min_p", 1.0f, 0, 1.0f, 0.05f, 1.0f, 0.0f, 0.0f},
        {"top_k_1024", 1.2f, 1024, 1.0f, 0.0f, 1.05f, 0.0f, 0.3f},
        {"plain_temperature", 1.0f, 0, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f},
    };
    const int rows = 24;
    std::mt19937 rng(11);
    Sampler host(kVocab);
    LogprobCalculator calc(kVocab);
    for (const Case& c : cases) {
        int compared = 0, mismatched = 0, fallbacks = 0;
        for (int round = 0; round < 4; ++round) {
            // Peaked rows (a few large logits) and flat ones, like real and random models.
            std::vector<float> logits(size_t(rows) * kVocab);
            std::normal_distribution<float> d(0.0f, round % 2 ? 1.0f : 3.0f);
            for (auto& x : logits) x = d(rng);
            for (int r = 0; r < rows; ++r)
                for (int j = 0; j < 5; ++j) logits[size_t(r) * kVocab + rng() % kVocab] += 12.0f;
            // Each row's sequence: 40 tokens, the last 10 "sampled".
            std::vector<std::vector<int32_t>> seq(rows), outs(rows);
            std::vector<int32_t> pen_ids, pen_counts;
            std::vector<cuda::DeviceSampleParams> params(rows);
            for (int r = 0; r < rows; ++r) {
                for (int j = 0; j < 40; ++j) seq[r].push_back(static_cast<int32_t>(rng() % 300));
                outs[r].assign(seq[r].end() - 10, seq[r].end());
                std::map<int32_t, int32_t> counts;
                for (int32_t t : seq[r]) counts.emplace(t, 0);
                for (int32_t t : outs[r]) ++counts[t];
                const int offset = static_cast<int>(pen_ids.size());
                for (auto [id, n] : counts) {
                    pen_ids.push_back(id);
                    pen_counts.push_back(n);
                }
                params[r] = cuda::DeviceSampleParams{c.temperature, c.top_p, c.min_p, c.repetition, c.presence, c.frequency,
                                                     c.top_k, 20, 1, offset, static_cast<int32_t>(counts.size()), -1,
                                                     uint64_t(1000 + r), uint64_t(round)};
            }
            DeviceBuffer dl(logits.size() * 4), dw(logits.size() * 4), dp(rows * sizeof(cuda::DeviceSampleParams)),
                dids(pen_ids.size() * 4), dcounts(pen_counts.size() * 4), dres(rows * sizeof(cuda::DeviceSampleResult));
            Q3N_CUDA(cudaMemcpy(dl.get(), logits.data(), logits.size() * 4, cudaMemcpyHostToDevice));
            Q3N_CUDA(cudaMemcpy(dp.get(), params.data(), rows * sizeof(cuda::DeviceSampleParams), cudaMemcpyHostToDevice));
            Q3N_CUDA(cudaMemcpy(dids.get(), pen_ids.data(), pen_ids.size() * 4, cudaMemcpyHostToDevice));
            Q3N_CUDA(cudaMemcpy(dcounts.get(), pen_counts.data(), pen_counts.size() * 4, cudaMemcpyHostToDevice));
            cuda::sample_rows(dl.as<float>(), dw.as<float>(), rows, kVocab, dp.as<cuda::DeviceSampleParams>(),
                              dids.as<int32_t>(), dcounts.as<int32_t>(), dres.as<cuda::DeviceSampleResult>(), nullptr);
            std::vector<cuda::DeviceSampleResult> res(rows);
            Q3N_CUDA(cudaMemcpy(res.data(), dres.get(), rows * sizeof(cuda::DeviceSampleResult), cudaMemcpyDeviceToHost));

            for (int r = 0; r < rows; ++r) {
                ASSERT_FALSE(res[r].non_finite) << c.name;
                std::vector<float> row(logits.begin() + size_t(r) * kVocab, logits.begin() + size_t(r + 1) * kVocab);
                const std::vector<float> raw = row;
                q3n_sampling_params p;
                q3n_sampling_params_init(&p, sizeof p);
                p.temperature = c.temperature;
                p.top_k = c.top_k;
                p.top_p = c.top_p;
                p.min_p = c.min_p;
                p.repetition_penalty = c.repetition;
                p.presence_penalty = c.presence;
                p.frequency_penalty = c.frequency;
                p.seed = 1000 + r;
                const int32_t want = host.sample(row, p, SamplingContext{seq[r], outs[r], uint64_t(round)});
                if (res[r].fallback) {
                    ++fallbacks;
                    continue;
                }
                ++compared;
                const bool exact = c.temperature == 0.0f || c.top_k == 1;
                if (exact) ASSERT_EQ(res[r].token, want) << c.name << " row " << r;
                mismatched += res[r].token != want;
                // Log-probabilities of the raw logits.
                q3n_token_logprob lp;
                calc.compute(raw.data(), res[r].token, 20, lp);
                EXPECT_NEAR(res[r].logprob.logprob, lp.logprob, 2e-5) << c.name;
                ASSERT_EQ(res[r].logprob.num_top, 20u);
                for (int j = 0; j < 20; ++j) {
                    EXPECT_EQ(res[r].logprob.top_tokens[j], lp.top_tokens[j]) << c.name << " rank " << j;
                    EXPECT_NEAR(res[r].logprob.top_logprobs[j], lp.top_logprobs[j], 2e-5) << c.name << " rank " << j;
                }
            }
        }
        EXPECT_LE(mismatched * 100, compared) << c.name << ": " << mismatched << " of " << compared << " draws differ";
        std::printf("[ %s ] %d draws compared, %d differ, %d handed to the host\n", c.name, compared, mismatched, fallbacks);
    }
}

TEST(CudaSampler, NanIsReported) {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: GPU tests skipped";
    std::vector<float> logits(kVocab, 0.5f);
    logits[777] = std::nanf("");
    cuda::DeviceSampleParams p{0.0f, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, 0, 0, 0, 0, 0, -1, 1, 0};
    DeviceBuffer dl(logits.size() * 4), dw(logits.size() * 4), dp(sizeof p), dres(sizeof(cuda::DeviceSampleResult)), dummy(4);
    Q3N_CUDA(cudaMemcpy(dl.get(), logits.data(), logits.size() * 4, cudaMemcpyHostToDevice));
    Q3N_CUDA(cudaMemcpy(dp.get(), &p, sizeof p, cudaMemcpyHostToDevice));
    cuda::sample_rows(dl.as<float>(), dw.as<float>(), 1, kVocab, dp.as<cuda::DeviceSampleParams>(), dummy.as<int32_t>(),
                      dummy.as<int32_t>(), dres.as<cuda::DeviceSampleResult>(), nullptr);
    cuda::DeviceSampleResult r;
    Q3N_CUDA(cudaMemcpy(&r, dres.get(), sizeof r, cudaMemcpyDeviceToHost));
    EXPECT_TRUE(r.non_finite);
    EXPECT_EQ(r.bad_index, 777);
}

}  // namespace
