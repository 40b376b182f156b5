// Log-probabilities and per-request statistics.
//
// References are computed here in double from the logits the engine returns (an independent
// log-softmax) and from the transformers fixtures. Tolerances: the engine's log-softmax is fp32 over
// a few hundred logits of magnitude < 20, so it lands within 1e-5 of the double result; against
// transformers the logits themselves differ by up to ~1e-5 (BF16) and ~5e-3 (FP8, rare e4m3
// rounding flips, see test_fixtures.cpp), which carries over to the log-probabilities.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "fixture_util.h"
#include "sampling/logprobs.h"

using namespace q3n_test;

namespace {

std::vector<double> log_softmax(const std::vector<float>& logits) {
    double mx = -1e300;
    for (float x : logits) mx = std::max(mx, double(x));
    double sum = 0;
    for (float x : logits) sum += std::exp(x - mx);
    std::vector<double> out(logits.size());
    for (size_t i = 0; i < logits.size(); ++i) out[i] = logits[i] - mx - std::log(sum);
    return out;
}

std::vector<int32_t> top_ids(const std::vector<double>& lp, size_t k) {
    std::vector<int32_t> ids(lp.size());
    std::iota(ids.begin(), ids.end(), 0);
    std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return lp[a] > lp[b]; });
    ids.resize(k);
    return ids;
}

q3n_model* load(const std::string& name, ModelHandle& h) {
    q3n_model_options o;
    q3n_model_options_init(&o, sizeof o);
    o.device = Q3N_DEVICE_CPU;
    o.context_length = 128;
    EXPECT_EQ(q3n_model_load(fixture_dir(name).c_str(), &o, &h.m), Q3N_OK) << q3n_last_error();
    return h.m;
}

void set_logprobs(q3n_sequence* s, uint32_t top, bool prompt, float temperature = 0.0f) {
    q3n_sampling_params p;
    q3n_sampling_params_init(&p, sizeof p);
    p.temperature = temperature;
    p.seed = 3;
    p.logprobs = 1;
    p.top_logprobs = top;
    p.prompt_logprobs = prompt ? 1 : 0;
    ASSERT_EQ(q3n_sequence_set_sampling(s, &p), Q3N_OK) << q3n_last_error();
}

std::vector<float> logits_of(q3n_sequence* s) {
    std::vector<float> l(1 << 16);
    size_t n = 0;
    EXPECT_EQ(q3n_sequence_get_logits(s, l.data(), l.size(), &n), Q3N_OK);
    l.resize(n);
    return l;
}

TEST(Logprobs, FullDistributionSumsToOne) {
    const size_t V = 151936;
    std::vector<float> logits(V);
    std::mt19937 rng(5);
    std::normal_distribution<float> d(0.0f, 4.0f);
    for (auto& x : logits) x = d(rng);
    q3n::LogprobCalculator calc(V);
    q3n_token_logprob lp;
    double sum = 0;
    for (int32_t t = 0; t < static_cast<int32_t>(V); t += 1) {
        if (t % 997 == 0) {
            calc.compute(logits.data(), t, 0, lp);
            EXPECT_NEAR(lp.logprob, logits[t] - q3n::log_sum_exp(logits.data(), V), 1e-6);
        }
    }
    const float lse = q3n::log_sum_exp(logits.data(), V);
    for (float x : logits) sum += std::exp(double(x) - lse);
    // fp32 log-sum-exp over 151,936 terms: the sum is exact to ~1e-6 relative.
    EXPECT_NEAR(sum, 1.0, 1e-5);
}

TEST(Logprobs, SampledTokenMatchesIndependentLogSoftmax) {
    ModelHandle h;
    load("bf16_untied_sharded", h);
    SequenceHandle s;
    ASSERT_EQ(q3n_sequence_create(h.m, &s.s), Q3N_OK);
    for (float temperature : {0.0f, 1.0f}) {
        set_logprobs(s.s, 20, false, temperature);
        const int32_t prompt[] = {3, 14, 15, 92, 65};
        ASSERT_EQ(q3n_sequence_append(s.s, prompt, 5), Q3N_OK);
        for (int step = 0; step < 6; ++step) {
            ASSERT_EQ(q3n_model_step(h.m, &s.s, 1, 0), Q3N_OK);
            const auto ref = log_softmax(logits_of(s.s));
            int32_t token;
            ASSERT_EQ(q3n_sequence_sample(s.s, &token), Q3N_OK);
            q3n_token_logprob lp;
            ASSERT_EQ(q3n_sequence_get_token_logprob(s.s, &lp), Q3N_OK) << q3n_last_error();
            EXPECT_EQ(lp.token, token);
            EXPECT_NEAR(lp.logprob, ref[token], 1e-5);
            ASSERT_EQ(lp.num_top, 20u);
            const auto want = top_ids(ref, 20);
            for (size_t i = 0; i < 20; ++i) {
                EXPECT_EQ(lp.top_tokens[i], want[i]) << i;
                EXPECT_NEAR(lp.top_logprobs[i], ref[want[i]], 1e-5);
                if (i) EXPECT_GE(lp.top_logprobs[i - 1], lp.top_logprobs[i]);
            }
            if (temperature == 0.0f) EXPECT_EQ(lp.top_tokens[0], token);  // greedy picks the top one
        }
        ASSERT_EQ(q3n_sequence_truncate(s.s, 0), Q3N_OK);
    }
}

TEST(Logprobs, NotRequestedMeansNotComputed) {
    ModelHandle h;
    load("bf16_tied", h);
    SequenceHandle s;
    ASSERT_EQ(q3n_sequence_create(h.m, &s.s), Q3N_OK);
    const int32_t t = 4;
    q3n_sequence_append(s.s, &t, 1);
    ASSERT_EQ(q3n_model_step(h.m, &s.s, 1, Q3N_STEP_SAMPLE), Q3N_OK);
    q3n_token_logprob lp;
    EXPECT_EQ(q3n_sequence_get_token_logprob(s.s, &lp), Q3N_ERR_INVALID_STATE);
    q3n_sampling_params p;
    q3n_sampling_params_init(&p, sizeof p);
    p.top_logprobs = 21;
    EXPECT_EQ(q3n_sequence_set_sampling(s.s, &p), Q3N_ERR_INVALID_ARGUMENT);
}

// First-step top-5 log-probabilities against a log-softmax of transformers' logits.
TEST(Logprobs, FirstStepMatchesTransformers) {
    struct Case {
        const char* fixture;
        const char* section;
        double tolerance;
    };
    for (const Case& c : {Case{"bf16_tied", nullptr, 1e-4}, Case{"bf16_yarn", nullptr, 1e-4},
                          Case{"fp8_f32_scales", "emulated", 1e-2}, Case{"fp8_bf16_scales", "emulated", 1e-2}}) {
        const auto j = read_json(fixture_dir(c.fixture) + "/reference.json");
        const auto prompts = j.at("prompts").get<std::vector<std::vector<int32_t>>>();
        const auto& logits_json = c.section ? j.at(c.section).at("last_logits") : j.at("last_logits");
        ModelHandle h;
        load(c.fixture, h);
        size_t flips = 0;
        for (size_t p = 0; p < prompts.size(); ++p) {
            const auto ref = log_softmax(logits_json[p].get<std::vector<float>>());
            SequenceHandle s;
            ASSERT_EQ(q3n_sequence_create(h.m, &s.s), Q3N_OK);
            set_logprobs(s.s, 5, false);
            q3n_sequence_append(s.s, prompts[p].data(), prompts[p].size());
            ASSERT_EQ(q3n_model_step(h.m, &s.s, 1, Q3N_STEP_SAMPLE), Q3N_OK);
            q3n_token_logprob lp;
            ASSERT_EQ(q3n_sequence_get_token_logprob(s.s, &lp), Q3N_OK);
            // FP8: a prompt whose logits were moved by an e4m3 rounding flip (see test_fixtures.cpp)
            // is held to 1.0 instead; at most half the prompts may be such.
            std::vector<float> logits(ref.size());
            size_t n_logits = 0;
            ASSERT_EQ(q3n_sequence_get_logits(s.s, logits.data(), logits.size(), &n_logits), Q3N_OK);
            const bool flipped = c.section && relative_l2(logits, logits_json[p].get<std::vector<float>>()) >= 2e-3;
            flips += flipped;
            for (size_t i = 0; i < lp.num_top; ++i)
                EXPECT_NEAR(lp.top_logprobs[i], ref[lp.top_tokens[i]], flipped ? 1.0 : c.tolerance)
                    << c.fixture << " prompt " << p << " rank " << i;
            if (!flipped) EXPECT_EQ(lp.top_tokens[0], top_ids(ref, 1)[0]) << c.fixture << " prompt " << p;
        }
        EXPECT_LE(flips * 2, prompts.size()) << c.fixture << ": too many prompts moved by rounding flips";
    }
}

// Prompt log-probabilities: each prefilled token under the logits of the prefix before it,
// computed here by running every prefix on its own.
TEST(Logprobs, PromptLogprobsEqualPerPrefixLogSoftmax) {
    ModelHandle h;
    load("bf16_untied_sharded", h);
    const auto ref = parse_reference(read_json(fixture_dir("bf16_untied_sharded") + "/reference.json"));
    const auto& prompt = ref.prompts[3];  // 45 tokens: several chunks of rows
    SequenceHandle s;
    ASSERT_EQ(q3n_sequence_create(h.m, &s.s), Q3N_OK);
    set_logprobs(s.s, 3, true);
    ASSERT_EQ(q3n_sequence_append(s.s, prompt.data(), prompt.size()), Q3N_OK);
    ASSERT_EQ(q3n_model_step(h.m, &s.s, 1, Q3N_STEP_SAMPLE), Q3N_OK);
    // A later step prefills more tokens: the first of them is predicted by the last step's logits.
    const int32_t more[] = {11, 12, 13};
    ASSERT_EQ(q3n_sequence_append(s.s, more, 3), Q3N_OK);
    ASSERT_EQ(q3n_model_step(h.m, &s.s, 1, 0), Q3N_OK);

    std::vector<int32_t> all(64);
    size_t n_all = 0;
    ASSERT_EQ(q3n_sequence_get_tokens(s.s, all.data(), all.size(), &n_all), Q3N_OK);
    all.resize(n_all);  // prompt, sampled token, 11, 12, 13
    std::vector<q3n_token_logprob> got(64);
    size_t n = 0;
    ASSERT_EQ(q3n_sequence_get_prompt_logprobs(s.s, got.data(), got.size(), &n), Q3N_OK) << q3n_last_error();
    // Prompt positions 1..44, then 11, 12, 13 (the sampled token has its own logprob, not a prompt one).
    ASSERT_EQ(n, prompt.size() - 1 + 3);
    std::vector<size_t> positions;
    for (size_t p = 1; p < prompt.size(); ++p) positions.push_back(p);
    for (size_t p = prompt.size() + 1; p < all.size(); ++p) positions.push_back(p);
    for (size_t i = 0; i < n; ++i) {
        const size_t pos = positions[i];
        SequenceHandle prefix;
        ASSERT_EQ(q3n_sequence_create(h.m, &prefix.s), Q3N_OK);
        q3n_sequence_append(prefix.s, all.data(), pos);
        ASSERT_EQ(q3n_model_step(h.m, &prefix.s, 1, 0), Q3N_OK);
        const auto lsm = log_softmax(logits_of(prefix.s));
        EXPECT_EQ(got[i].token, all[pos]);
        EXPECT_NEAR(got[i].logprob, lsm[all[pos]], 2e-5) << "position " << pos;
        ASSERT_EQ(got[i].num_top, 3u);
        EXPECT_EQ(got[i].top_tokens[0], top_ids(lsm, 1)[0]) << "position " << pos;
    }
    std::vector<q3n_token_logprob> small(2);
    EXPECT_EQ(q3n_sequence_get_prompt_logprobs(s.s, small.data(), small.size(), &n), Q3N_ERR_BUFFER_TOO_SMALL);
}

TEST(Stats, CountsAndTimings) {
    ModelHandle h;
    load("bf16_tied", h);
    SequenceHandle s;
    ASSERT_EQ(q3n_sequence_create(h.m, &s.s), Q3N_OK);
    set_logprobs(s.s, 0, false);
    const std::vector<int32_t> prompt = {1, 2, 3, 4, 5, 6, 7};
    q3n_sequence_append(s.s, prompt.data(), prompt.size());
    for (int i = 0; i < 10; ++i) ASSERT_EQ(q3n_model_step(h.m, &s.s, 1, Q3N_STEP_SAMPLE), Q3N_OK);
    q3n_sequence_stats st{};
    st.struct_size = sizeof st;
    ASSERT_EQ(q3n_sequence_get_stats(s.s, &st), Q3N_OK);
    EXPECT_EQ(st.prompt_tokens, 7u);
    EXPECT_EQ(st.generated_tokens, 10u);
    EXPECT_EQ(st.cached_tokens, 0u);
    EXPECT_GT(st.time_to_first_token_ms, 0.0);
    EXPECT_GT(st.decode_tokens_per_s, 0.0);

    // A second request on the same sequence reuses its cache: 16 cached tokens (7 + 10 - the
    // pending last sample), then 3 new prompt tokens.
    set_logprobs(s.s, 0, false);
    const int32_t more[] = {8, 9, 10};
    q3n_sequence_append(s.s, more, 3);
    ASSERT_EQ(q3n_model_step(h.m, &s.s, 1, Q3N_STEP_SAMPLE), Q3N_OK);
    ASSERT_EQ(q3n_sequence_get_stats(s.s, &st), Q3N_OK);
    EXPECT_EQ(st.cached_tokens, 16u);
    EXPECT_EQ(st.prompt_tokens, 4u);  // the pending sampled token of the last request counts as input now
    EXPECT_EQ(st.generated_tokens, 1u);
    st.struct_size = 3;
    EXPECT_EQ(q3n_sequence_get_stats(s.s, &st), Q3N_ERR_INVALID_ARGUMENT);
}

}  // namespace
