#include "sampling/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "core/error.h"

namespace {

using q3n::Sampler;
using q3n::SamplingContext;
using q3n::sampling_uniform;

q3n_sampling_params greedy_params() {
    q3n_sampling_params p{};
    p.struct_size = sizeof(p);
    p.temperature = 0.0f;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.min_p = 0.0f;
    p.repetition_penalty = 1.0f;
    p.presence_penalty = 0.0f;
    p.frequency_penalty = 0.0f;
    p.seed = 0;
    return p;
}

q3n_sampling_params random_params(float temperature, uint64_t seed) {
    q3n_sampling_params p = greedy_params();
    p.temperature = temperature;
    p.seed = seed;
    return p;
}

// Draws `draws` tokens with counters 0..draws-1 and returns the frequency of each id.
std::vector<double> histogram(const std::vector<float>& logits, const q3n_sampling_params& p, int draws) {
    Sampler s(logits.size());
    std::vector<double> freq(logits.size(), 0.0);
    for (int c = 0; c < draws; ++c) {
        std::vector<float> l = logits;
        SamplingContext ctx;
        ctx.counter = static_cast<uint64_t>(c);
        freq[s.sample(l, p, ctx)] += 1.0;
    }
    for (double& f : freq) f /= draws;
    return freq;
}

// The status a call throws, or Q3N_OK when it throws nothing.
template <class F>
q3n_status status_of(F&& f) {
    try {
        f();
    } catch (const q3n::Error& e) {
        return e.status();
    }
    return Q3N_OK;
}

// ---- sampling_uniform ------------------------------------------------------------------------------

TEST(SamplerUniform, InUnitIntervalAndRoughlyUniform) {
    constexpr int kN = 100000;
    double sum = 0.0;
    int buckets[10] = {};
    for (int i = 0; i < kN; ++i) {
        const float u = sampling_uniform(12345, static_cast<uint64_t>(i));
        ASSERT_GE(u, 0.0f);
        ASSERT_LT(u, 1.0f);
        // A multiple of 2^-24: the top 24 bits of the hash.
        ASSERT_EQ(std::ldexp(u, 24), std::floor(std::ldexp(u, 24)));
        sum += u;
        ++buckets[std::min(9, static_cast<int>(u * 10))];
    }
    EXPECT_NEAR(sum / kN, 0.5, 0.01);
    for (int b : buckets) EXPECT_NEAR(b / double(kN), 0.1, 0.01);
}

TEST(SamplerUniform, MatchesTheDocumentedHash) {
    // An independent transcription of the formula in sampler.h, so the CUDA side has a reference.
    const auto mix = [](uint64_t z) {
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    };
    for (uint64_t seed : {0ull, 1ull, 42ull, 0xFFFFFFFFFFFFFFFFull}) {
        for (uint64_t counter : {0ull, 1ull, 2ull, 1000ull, 0xFFFFFFFFFFFFFFFEull}) {
            const uint64_t r = mix(mix(seed) + (counter + 1) * 0x9E3779B97F4A7C15ull);
            const float expect = static_cast<float>(static_cast<double>(r >> 40) / 16777216.0);
            EXPECT_EQ(sampling_uniform(seed, counter), expect) << seed << " " << counter;
        }
    }
    // splitmix64 of state 0 is the well-known first output 0xE220A8397B1DCDAF: mix(0 + gamma).
    EXPECT_EQ(mix(0x9E3779B97F4A7C15ull), 0xE220A8397B1DCDAFull);
}

TEST(SamplerUniform, DeterministicAndSeedSensitive) {
    EXPECT_EQ(sampling_uniform(7, 3), sampling_uniform(7, 3));
    int same = 0;
    for (uint64_t c = 0; c < 1000; ++c) same += sampling_uniform(7, c) == sampling_uniform(8, c);
    EXPECT_LT(same, 5);
    // Seeds one golden-ratio step apart must not replay each other's stream shifted by one.
    int shifted = 0;
    for (uint64_t c = 0; c < 1000; ++c)
        shifted += sampling_uniform(7 + 0x9E3779B97F4A7C15ull, c) == sampling_uniform(7, c + 1);
    EXPECT_LT(shifted, 5);
}

// ---- greedy ----------------------------------------------------------------------------------------

TEST(SamplerGreedy, ReturnsArgmaxLowestIdOnTies) {
    Sampler s(6);
    const q3n_sampling_params p = greedy_params();
    std::vector<float> a = {0.5f, -1.0f, 3.25f, 2.0f, 3.0f, -7.0f};
    EXPECT_EQ(s.sample(a, p, {}), 2);
    std::vector<float> b = {1.0f, 4.0f, -2.0f, 4.0f, 4.0f, 0.0f};
    EXPECT_EQ(s.sample(b, p, {}), 1);
    std::vector<float> c = {-3.0f, -3.0f, -3.0f, -3.0f, -3.0f, -3.0f};
    EXPECT_EQ(s.sample(c, p, {}), 0);
    std::vector<float> d = {-9.0f, -8.0f, -7.0f, -6.0f, -5.0f, -4.5f};
    EXPECT_EQ(s.sample(d, p, {}), 5);
}

TEST(SamplerGreedy, IgnoresFiltersAndSeed) {
    Sampler s(4);
    q3n_sampling_params p = greedy_params();
    p.top_k = 2;
    p.top_p = 0.1f;
    p.min_p = 0.9f;
    for (uint64_t seed = 0; seed < 20; ++seed) {
        p.seed = seed;
        std::vector<float> l = {0.0f, 1.0f, 5.0f, 4.9f};
        SamplingContext ctx;
        ctx.counter = seed * 3;
        EXPECT_EQ(s.sample(l, p, ctx), 2);
    }
}

TEST(SamplerGreedy, RandomLogitsMatchIndependentArgmax) {
    std::mt19937 rng(5);
    std::normal_distribution<float> dist(0.0f, 3.0f);
    Sampler s(1000);
    for (int trial = 0; trial < 50; ++trial) {
        std::vector<float> l(1000);
        for (float& x : l) x = dist(rng);
        const auto expect = std::max_element(l.begin(), l.end()) - l.begin();  // first max
        EXPECT_EQ(s.sample(l, greedy_params(), {}), expect);
    }
}

// ---- penalties -------------------------------------------------------------------------------------

TEST(SamplerPenalties, RepetitionPenaltyOncePerDistinctToken) {
    Sampler s(5);
    q3n_sampling_params p = greedy_params();
    p.repetition_penalty = 2.0f;
    std::vector<float> l = {2.0f, -1.0f, 0.5f, 3.0f, 0.0f};
    const std::vector<int32_t> seq = {0, 1, 1, 3, 3, 3, 4};
    SamplingContext ctx;
    ctx.sequence_tokens = seq;
    // 0: 2/2 = 1; 1: -1*2 = -2 (not -4); 2 untouched; 3: 3/2 = 1.5 (not 0.375); 4: 0 stays 0.
    EXPECT_EQ(s.sample(l, p, ctx), 3);
    EXPECT_EQ(l, (std::vector<float>{1.0f, -2.0f, 0.5f, 1.5f, 0.0f}));
}

TEST(SamplerPenalties, PenaltyBelowOneBoostsRepeatedTokens) {
    Sampler s(3);
    q3n_sampling_params p = greedy_params();
    p.repetition_penalty = 0.5f;
    std::vector<float> l = {1.0f, 1.5f, -4.0f};
    const std::vector<int32_t> seq = {0, 2};
    SamplingContext ctx;
    ctx.sequence_tokens = seq;
    EXPECT_EQ(s.sample(l, p, ctx), 0);  // 1/0.5 = 2 beats 1.5
    EXPECT_EQ(l, (std::vector<float>{2.0f, 1.5f, -2.0f}));
}

TEST(SamplerPenalties, PresenceAndFrequencyOnOutputTokens) {
    Sampler s(4);
    q3n_sampling_params p = greedy_params();
    p.presence_penalty = 0.5f;
    p.frequency_penalty = 0.25f;
    std::vector<float> l = {2.0f, -1.0f, 0.5f, 3.0f};
    const std::vector<int32_t> out = {2, 3, 2, 2};
    SamplingContext ctx;
    ctx.output_tokens = out;
    // 2 (three times): 0.5 - 0.5 - 0.75 = -0.75; 3 (once): 3 - 0.5 - 0.25 = 2.25.
    EXPECT_EQ(s.sample(l, p, ctx), 3);
    EXPECT_EQ(l, (std::vector<float>{2.0f, -1.0f, -0.75f, 2.25f}));
}

TEST(SamplerPenalties, NegativePresenceAndFrequencyRaise) {
    Sampler s(3);
    q3n_sampling_params p = greedy_params();
    p.presence_penalty = -1.0f;
    p.frequency_penalty = -0.5f;
    std::vector<float> l = {1.0f, 0.0f, 0.5f};
    const std::vector<int32_t> out = {1, 1};
    SamplingContext ctx;
    ctx.output_tokens = out;
    EXPECT_EQ(s.sample(l, p, ctx), 1);  // 0 + 1 + 1 = 2
    EXPECT_EQ(l, (std::vector<float>{1.0f, 2.0f, 0.5f}));
}

TEST(SamplerPenalties, RepetitionThenPresenceFrequencyThenTemperature) {
    Sampler s(4);
    q3n_sampling_params p = random_params(2.0f, 1);
    p.top_k = 1;  // deterministic pick; the logits are what is checked
    p.repetition_penalty = 2.0f;
    p.presence_penalty = 0.5f;
    p.frequency_penalty = 0.25f;
    std::vector<float> l = {2.0f, -1.0f, 0.5f, 3.0f};
    const std::vector<int32_t> seq = {0, 1, 1, 3, 2, 2};
    const std::vector<int32_t> out = {2, 2, 3};
    SamplingContext ctx;
    ctx.sequence_tokens = seq;
    ctx.output_tokens = out;
    // rep: {1, -2, 0.25, 1.5}; pres/freq: 2 -> 0.25 - 1 = -0.75, 3 -> 1.5 - 0.75 = 0.75;
    // temperature 2: {0.5, -1, -0.375, 0.375}.
    EXPECT_EQ(s.sample(l, p, ctx), 0);
    EXPECT_EQ(l, (std::vector<float>{0.5f, -1.0f, -0.375f, 0.375f}));
}

TEST(SamplerPenalties, ScratchIsCleanBetweenCalls) {
    // A leftover count from one call would penalise the next call's tokens again.
    Sampler s(3);
    q3n_sampling_params p = greedy_params();
    p.frequency_penalty = 1.0f;
    p.repetition_penalty = 2.0f;
    const std::vector<int32_t> tokens = {1, 1};
    for (int i = 0; i < 3; ++i) {
        std::vector<float> l = {0.0f, 4.0f, 1.0f};
        SamplingContext ctx;
        ctx.sequence_tokens = tokens;
        ctx.output_tokens = tokens;
        s.sample(l, p, ctx);
        EXPECT_EQ(l, (std::vector<float>{0.0f, 0.0f, 1.0f}));  // 4/2 - 2*1
    }
}

// ---- temperature, top-k, top-p, min-p --------------------------------------------------------------

TEST(SamplerFilters, TopKOneIsGreedyForAnyTemperature) {
    std::mt19937 rng(11);
    std::normal_distribution<float> dist(0.0f, 2.0f);
    Sampler s(500);
    for (float t : {0.1f, 0.7f, 1.0f, 1.5f, 10.0f}) {
        for (int trial = 0; trial < 20; ++trial) {
            std::vector<float> l(500);
            for (float& x : l) x = dist(rng);
            const auto expect = std::max_element(l.begin(), l.end()) - l.begin();
            q3n_sampling_params p = random_params(t, static_cast<uint64_t>(trial));
            p.top_k = 1;
            SamplingContext ctx;
            ctx.counter = static_cast<uint64_t>(trial);
            EXPECT_EQ(s.sample(l, p, ctx), expect);
        }
    }
    // Ties at the top: the lowest id, as greedy.
    std::vector<float> tie = {1.0f, 3.0f, 3.0f, 2.0f};
    q3n_sampling_params p = random_params(0.8f, 3);
    p.top_k = 1;
    EXPECT_EQ(Sampler(4).sample(tie, p, {}), 1);
}

TEST(SamplerFilters, SameSeedSameTokensDifferentSeedDiffers) {
    std::vector<float> logits(50);
    for (size_t i = 0; i < logits.size(); ++i) logits[i] = 0.05f * static_cast<float>(i % 7);
    const auto run = [&](uint64_t seed) {
        Sampler s(logits.size());
        std::vector<int32_t> tokens;
        for (uint64_t c = 0; c < 100; ++c) {
            std::vector<float> l = logits;
            SamplingContext ctx;
            ctx.counter = c;
            tokens.push_back(s.sample(l, random_params(1.0f, seed), ctx));
        }
        return tokens;
    };
    const auto a = run(1234), b = run(1234), c = run(1235);
    EXPECT_EQ(a, b);
    EXPECT_NE(a, c);
    // Not a constant stream either.
    EXPECT_GT(std::set<int32_t>(a.begin(), a.end()).size(), 10u);
}

TEST(SamplerFilters, TemperatureOneMatchesSoftmax) {
    const std::vector<float> logits = {1.0f, 2.0f, 0.5f, -1.0f, 1.5f};
    const std::vector<double> freq = histogram(logits, random_params(1.0f, 99), 20000);
    double z = 0.0;
    for (float l : logits) z += std::exp(static_cast<double>(l));
    for (size_t i = 0; i < logits.size(); ++i)
        EXPECT_NEAR(freq[i], std::exp(static_cast<double>(logits[i])) / z, 0.01) << "token " << i;
}

TEST(SamplerFilters, TemperatureScalesTheDistribution) {
    const std::vector<float> logits = {1.0f, 2.0f, 0.5f, -1.0f, 1.5f};
    const float t = 0.5f;
    const std::vector<double> freq = histogram(logits, random_params(t, 7), 20000);
    double z = 0.0;
    for (float l : logits) z += std::exp(l / static_cast<double>(t));
    for (size_t i = 0; i < logits.size(); ++i)
        EXPECT_NEAR(freq[i], std::exp(logits[i] / static_cast<double>(t)) / z, 0.01) << "token " << i;
}

TEST(SamplerFilters, TopKRenormalisesOverTheKBest) {
    // Tokens 1 (2.0) and 4 (1.5) are the two best: a two-way softmax, 1 : e^-0.5.
    const std::vector<float> logits = {1.0f, 2.0f, 0.5f, -1.0f, 1.5f};
    q3n_sampling_params p = random_params(1.0f, 5);
    p.top_k = 2;
    const std::vector<double> freq = histogram(logits, p, 20000);
    const double p1 = 1.0 / (1.0 + std::exp(-0.5));
    EXPECT_NEAR(freq[1], p1, 0.01);
    EXPECT_NEAR(freq[4], 1.0 - p1, 0.01);
    EXPECT_EQ(freq[0] + freq[2] + freq[3], 0.0);
}

TEST(SamplerFilters, TopKTieAtTheBoundaryKeepsLowerIds) {
    // Ids 1, 2 and 3 tie for second place; top_k = 2 keeps 0 and 1 only.
    const std::vector<float> logits = {2.0f, 1.0f, 1.0f, 1.0f, -5.0f};
    q3n_sampling_params p = random_params(1.0f, 8);
    p.top_k = 2;
    const std::vector<double> freq = histogram(logits, p, 5000);
    EXPECT_GT(freq[1], 0.1);
    EXPECT_EQ(freq[2] + freq[3] + freq[4], 0.0);
}

// Logits whose softmax is exactly {0.5, 0.3, 0.15, 0.05} (up to float rounding), shuffled so that
// the order of ids differs from the order of probabilities.
const std::vector<float> kQuarterLogits = {std::log(0.15f), std::log(0.5f), std::log(0.05f), std::log(0.3f)};
// ids by probability: 1 (0.5), 3 (0.3), 0 (0.15), 2 (0.05)

TEST(SamplerFilters, TopPKeepsTheNucleus) {
    q3n_sampling_params p = random_params(1.0f, 21);
    p.top_p = 0.7f;  // 0.5 < 0.7 <= 0.8: the nucleus is {1, 3}
    std::vector<double> freq = histogram(kQuarterLogits, p, 20000);
    EXPECT_EQ(freq[0] + freq[2], 0.0);
    EXPECT_NEAR(freq[1], 0.5 / 0.8, 0.01);
    EXPECT_NEAR(freq[3], 0.3 / 0.8, 0.01);

    p.top_p = 0.4f;  // the top token alone reaches it
    freq = histogram(kQuarterLogits, p, 2000);
    EXPECT_EQ(freq[1], 1.0);

    p.top_p = 0.9f;  // 0.8 < 0.9 <= 0.95: {1, 3, 0}
    freq = histogram(kQuarterLogits, p, 20000);
    EXPECT_EQ(freq[2], 0.0);
    EXPECT_NEAR(freq[0], 0.15 / 0.95, 0.01);

    p.top_p = 1.0f;  // off
    freq = histogram(kQuarterLogits, p, 20000);
    EXPECT_NEAR(freq[2], 0.05, 0.01);
}

TEST(SamplerFilters, MinPDropsTokensBelowTheScaledMax) {
    q3n_sampling_params p = random_params(1.0f, 31);
    p.min_p = 0.2f;  // threshold 0.1: drops only id 2 (0.05)
    std::vector<double> freq = histogram(kQuarterLogits, p, 20000);
    EXPECT_EQ(freq[2], 0.0);
    EXPECT_NEAR(freq[0], 0.15 / 0.95, 0.01);
    EXPECT_NEAR(freq[1], 0.5 / 0.95, 0.01);

    p.min_p = 0.5f;  // threshold 0.25: keeps 1 and 3
    freq = histogram(kQuarterLogits, p, 20000);
    EXPECT_EQ(freq[0] + freq[2], 0.0);
    EXPECT_NEAR(freq[1], 0.5 / 0.8, 0.01);

    p.min_p = 1.0f;  // only the maximum survives
    freq = histogram(kQuarterLogits, p, 2000);
    EXPECT_EQ(freq[1], 1.0);
}

TEST(SamplerFilters, TopPThenMinPCombine) {
    // top_p = 0.9 keeps {1, 3, 0}; min_p = 0.35 then drops 0 (0.15 < 0.175) but keeps 3 (0.3).
    q3n_sampling_params p = random_params(1.0f, 41);
    p.top_p = 0.9f;
    p.min_p = 0.35f;
    const std::vector<double> freq = histogram(kQuarterLogits, p, 20000);
    EXPECT_EQ(freq[0] + freq[2], 0.0);
    EXPECT_NEAR(freq[1], 0.5 / 0.8, 0.01);
}

TEST(SamplerFilters, TemperatureIsAppliedBeforeTopP) {
    // At temperature 0.5 the probabilities are proportional to {0.25, 0.09, 0.0225, 0.0025}:
    // {0.6954, 0.2503, 0.0626, 0.0070}. top_p = 0.9 keeps {1, 3}, while at temperature 1 it would
    // also keep 0.
    q3n_sampling_params p = random_params(0.5f, 51);
    p.top_p = 0.9f;
    const std::vector<double> freq = histogram(kQuarterLogits, p, 20000);
    EXPECT_EQ(freq[0] + freq[2], 0.0);
    EXPECT_NEAR(freq[1], 0.25 / 0.34, 0.01);
}

TEST(SamplerFilters, LogitsHoldTheScaledValuesAfterSampling) {
    Sampler s(3);
    std::vector<float> l = {1.0f, -3.0f, 0.5f};
    s.sample(l, random_params(4.0f, 0), {});
    EXPECT_EQ(l, (std::vector<float>{0.25f, -0.75f, 0.125f}));
}

// The contract of sampler.h written the obvious way: full sort, every sum in candidate order.
// Sorting once per distribution keeps the large-vocabulary cases fast; draw() is per counter.
class Reference {
public:
    Reference(std::vector<float> l, const q3n_sampling_params& p) : seed_(p.seed) {
        for (float& x : l) x /= p.temperature;
        for (size_t i = 0; i < l.size(); ++i) c_.push_back({l[i], static_cast<int32_t>(i)});
        std::sort(c_.begin(), c_.end(),
                  [](const C& a, const C& b) { return a.v > b.v || (a.v == b.v && a.id < b.id); });
        kept_ = p.top_k > 0 ? std::min(c_.size(), static_cast<size_t>(p.top_k)) : c_.size();
        const float top = c_[0].v;
        for (C& x : c_) x.v = std::exp(x.v - top);
        double total = 0.0;
        for (size_t i = 0; i < kept_; ++i) total += c_[i].v;
        double run = 0.0;
        for (size_t i = 0; i < kept_; ++i) {
            run += c_[i].v;
            if (run >= static_cast<double>(p.top_p) * total) {
                kept_ = i + 1;
                break;
            }
        }
        while (kept_ > 1 && c_[kept_ - 1].v < p.min_p) --kept_;
        for (size_t i = 0; i < kept_; ++i) total_ += c_[i].v;
    }

    int32_t draw(uint64_t counter) const {
        const double threshold = static_cast<double>(sampling_uniform(seed_, counter)) * total_;
        double run = 0.0;
        for (size_t i = 0; i < kept_; ++i) {
            run += c_[i].v;
            if (run > threshold) return c_[i].id;
        }
        return c_[kept_ - 1].id;
    }

private:
    struct C {
        float v;
        int32_t id;
    };
    std::vector<C> c_;
    size_t kept_ = 0;
    double total_ = 0.0;
    uint64_t seed_;
};

struct RefConfig {
    float temperature;
    int32_t top_k;
    float top_p;
    float min_p;
};

void expect_matches_reference(const std::vector<float>& logits, const RefConfig& rc, int draws) {
    Sampler s(logits.size());
    q3n_sampling_params p = random_params(rc.temperature, 77);
    p.top_k = rc.top_k;
    p.top_p = rc.top_p;
    p.min_p = rc.min_p;
    const Reference ref(logits, p);
    int mismatches = 0;
    for (int c = 0; c < draws; ++c) {
        std::vector<float> l = logits;
        SamplingContext ctx;
        ctx.counter = static_cast<uint64_t>(c);
        mismatches += s.sample(l, p, ctx) != ref.draw(ctx.counter);
    }
    EXPECT_EQ(mismatches, 0) << "T=" << rc.temperature << " top_k=" << rc.top_k << " top_p=" << rc.top_p
                             << " min_p=" << rc.min_p;
}

TEST(SamplerFilters, MatchesNaiveReferenceOnRandomLogits) {
    std::mt19937 rng(17);
    std::normal_distribution<float> dist(0.0f, 5.0f);
    std::vector<float> logits(5000);
    for (float& x : logits) x = dist(rng);
    // Some exact ties, to exercise the id order.
    for (size_t i = 0; i < 200; i += 2) logits[i + 1] = logits[i];
    for (const RefConfig& rc : {RefConfig{1.0f, 0, 1.0f, 0.0f}, RefConfig{0.6f, 0, 0.95f, 0.0f},
                                RefConfig{1.3f, 0, 1.0f, 0.05f}, RefConfig{0.7f, 20, 0.8f, 0.0f},
                                RefConfig{1.0f, 4000, 1.0f, 0.0f}, RefConfig{3.0f, 50, 0.9f, 0.01f},
                                RefConfig{5.0f, 0, 0.99f, 1e-9f}})
        expect_matches_reference(logits, rc, 300);
}

TEST(SamplerFilters, FarTailIsStillSampledAtItsWeight) {
    // One token 16.5 nats above 150k equal ones: each of those weighs e^-16.5 (far below the
    // sampler's sorting cut), together ~1% of the mass. In exact arithmetic a draw u lands in the
    // tail iff u >= 1 / (1 + tail), at tail position floor((u * (1 + tail) - 1) / w), tail tokens
    // being in id order. An fp32 running sum near 1 rounds each w to a whole ulp and would move
    // that boundary to ~0.9815, so draws just around 0.99 tell the two apart.
    constexpr size_t kVocab = 150000;
    constexpr int32_t kTop = 1234;
    std::vector<float> logits(kVocab, 0.0f);
    logits[kTop] = 16.5f;
    const double w = std::exp(static_cast<double>(0.0f - 16.5f));
    const double tail = (kVocab - 1) * w;
    const double boundary = 1.0 / (1.0 + tail);
    const q3n_sampling_params p = random_params(1.0f, 5);
    const Reference ref(logits, p);
    Sampler s(kVocab);
    int checked = 0, in_tail = 0;
    for (uint64_t c = 0; checked < 80; ++c) {
        const double u = sampling_uniform(p.seed, c);
        if (u < boundary - 0.01 || std::fabs(u - boundary) < 1e-6) continue;  // only draws near the tail
        std::vector<float> l = logits;
        SamplingContext ctx;
        ctx.counter = c;
        const int32_t tok = s.sample(l, p, ctx);
        ASSERT_EQ(tok, ref.draw(c)) << "counter " << c;
        ++checked;
        if (u < boundary) {
            EXPECT_EQ(tok, kTop) << "u=" << u;
            continue;
        }
        ++in_tail;
        ASSERT_NE(tok, kTop) << "u=" << u;
        const double position = (u * (1.0 + tail) - 1.0) / w;
        const double got = tok < kTop ? tok : tok - 1;  // position among the tail's ids
        EXPECT_NEAR(got, position, 2.0) << "u=" << u;
    }
    EXPECT_GT(in_tail, 10);
    EXPECT_LT(in_tail, 70);
    // A min_p below the tail weight keeps it (sorting it), one above drops it without sorting.
    // (Cases that reach the tail on every draw sort 150k candidates each time: few draws.)
    expect_matches_reference(logits, {1.0f, 0, 1.0f, 1e-9f}, 30);
    expect_matches_reference(logits, {1.0f, 0, 1.0f, 1e-6f}, 300);
    // top_p above the head's share must reach into the tail.
    expect_matches_reference(logits, {1.0f, 0, 0.995f, 0.0f}, 30);
    // top_k larger than the head selects over everything.
    expect_matches_reference(logits, {1.0f, 1000, 1.0f, 0.0f}, 100);
}

// ---- errors ----------------------------------------------------------------------------------------

TEST(SamplerErrors, NonFiniteLogitsThrowNumeric) {
    Sampler s(4);
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float inf = std::numeric_limits<float>::infinity();
    for (float bad : {nan, inf, -inf}) {
        for (const auto& p : {greedy_params(), random_params(1.0f, 1)}) {
            std::vector<float> l = {0.0f, 1.0f, bad, 2.0f};
            try {
                s.sample(l, p, {});
                FAIL() << "no exception for " << bad;
            } catch (const q3n::Error& e) {
                EXPECT_EQ(e.status(), Q3N_ERR_NUMERIC);
                EXPECT_NE(std::string(e.what()).find("token 2"), std::string::npos) << e.what();
            }
        }
    }
}

TEST(SamplerErrors, OverflowFromTemperatureThrowsNumeric) {
    Sampler s(2);
    std::vector<float> l = {3e38f, 1.0f};
    EXPECT_EQ(status_of([&] { s.sample(l, random_params(0.5f, 1), {}); }), Q3N_ERR_NUMERIC);
    std::vector<float> m = {3e38f, 1.0f};
    q3n_sampling_params p = greedy_params();
    p.repetition_penalty = 0.1f;
    const std::vector<int32_t> seq = {0};
    SamplingContext ctx;
    ctx.sequence_tokens = seq;
    EXPECT_EQ(status_of([&] { s.sample(m, p, ctx); }), Q3N_ERR_NUMERIC);
    // The scratch was left clean: the same token is penalised normally next time.
    std::vector<float> n = {1.0f, 2.0f};
    s.sample(n, p, ctx);
    EXPECT_FLOAT_EQ(n[0], 10.0f);
}

TEST(SamplerErrors, InvalidParamsThrowInvalidArgument) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float inf = std::numeric_limits<float>::infinity();
    struct Case {
        const char* field;
        void (*mutate)(q3n_sampling_params&, float);
        std::vector<float> bad;
        std::vector<float> good;
    };
    const std::vector<Case> cases = {
        {"temperature", [](q3n_sampling_params& p, float v) { p.temperature = v; }, {-0.1f, -inf, inf, nan},
         {0.0f, 1e-6f, 1.0f, 100.0f}},
        {"top_p", [](q3n_sampling_params& p, float v) { p.top_p = v; }, {0.0f, -0.5f, 1.0001f, nan, inf},
         {1e-6f, 0.5f, 1.0f}},
        {"min_p", [](q3n_sampling_params& p, float v) { p.min_p = v; }, {-0.01f, 1.01f, nan}, {0.0f, 0.5f, 1.0f}},
        {"repetition_penalty", [](q3n_sampling_params& p, float v) { p.repetition_penalty = v; },
         {0.0f, -1.0f, inf, nan}, {0.01f, 1.0f, 5.0f}},
        {"presence_penalty", [](q3n_sampling_params& p, float v) { p.presence_penalty = v; },
         {-2.01f, 2.01f, inf, nan}, {-2.0f, 0.0f, 2.0f}},
        {"frequency_penalty", [](q3n_sampling_params& p, float v) { p.frequency_penalty = v; },
         {-2.5f, 3.0f, -inf, nan}, {-2.0f, 0.3f, 2.0f}},
    };
    Sampler s(3);
    for (const Case& c : cases) {
        for (float v : c.bad) {
            q3n_sampling_params p = random_params(1.0f, 0);
            c.mutate(p, v);
            try {
                q3n::validate_sampling_params(p);
                FAIL() << c.field << " = " << v << " accepted";
            } catch (const q3n::Error& e) {
                EXPECT_EQ(e.status(), Q3N_ERR_INVALID_ARGUMENT);
                EXPECT_NE(std::string(e.what()).find(c.field), std::string::npos) << e.what();
            }
            std::vector<float> l = {0.0f, 1.0f, 2.0f};
            EXPECT_EQ(status_of([&] { s.sample(l, p, {}); }), Q3N_ERR_INVALID_ARGUMENT) << c.field << " " << v;
        }
        for (float v : c.good) {
            q3n_sampling_params p = random_params(1.0f, 0);
            c.mutate(p, v);
            EXPECT_EQ(status_of([&] { q3n::validate_sampling_params(p); }), Q3N_OK) << c.field << " " << v;
        }
    }
    // top_k: every value is valid, <= 0 meaning off.
    for (int32_t k : {std::numeric_limits<int32_t>::min(), -1, 0, 1, 1000000}) {
        q3n_sampling_params p = random_params(1.0f, 0);
        p.top_k = k;
        EXPECT_EQ(status_of([&] { q3n::validate_sampling_params(p); }), Q3N_OK) << k;
    }
    for (uint32_t size : {0u, 3u, static_cast<uint32_t>(sizeof(q3n_sampling_params) + 1), 0xFFFFFFFFu}) {
        q3n_sampling_params p = greedy_params();
        p.struct_size = size;
        EXPECT_EQ(status_of([&] { q3n::validate_sampling_params(p); }), Q3N_ERR_INVALID_ARGUMENT) << size;
    }
}

TEST(SamplerErrors, BadShapesAndTokenIdsThrowInvalidArgument) {
    Sampler s(3);
    std::vector<float> short_logits = {0.0f, 1.0f};
    EXPECT_EQ(status_of([&] { s.sample(short_logits, greedy_params(), {}); }), Q3N_ERR_INVALID_ARGUMENT);
    for (int32_t bad : {-1, 3, 1000}) {
        const std::vector<int32_t> tokens = {0, bad};
        std::vector<float> l = {0.0f, 1.0f, 2.0f};
        SamplingContext a;
        a.sequence_tokens = tokens;
        EXPECT_EQ(status_of([&] { s.sample(l, greedy_params(), a); }), Q3N_ERR_INVALID_ARGUMENT);
        SamplingContext b;
        b.output_tokens = tokens;
        EXPECT_EQ(status_of([&] { s.sample(l, greedy_params(), b); }), Q3N_ERR_INVALID_ARGUMENT);
    }
    EXPECT_EQ(status_of([] { Sampler empty(0); }), Q3N_ERR_INVALID_ARGUMENT);
}

// ---- cost at Qwen3's vocabulary size (printed, not asserted) ---------------------------------------

TEST(SamplerCost, FullVocabulary) {
    constexpr size_t kVocab = 151936;
    std::mt19937 rng(3);
    std::normal_distribution<float> dist(0.0f, 4.0f);
    std::vector<float> logits(kVocab);
    for (float& x : logits) x = dist(rng);
    Sampler s(kVocab);
    std::vector<int32_t> seq(2000);
    for (auto& t : seq) t = static_cast<int32_t>(rng() % kVocab);
    struct Config {
        const char* name;
        float temperature;
        int32_t top_k;
        float top_p;
    };
    for (const Config& c : {Config{"greedy", 0.0f, 0, 1.0f}, Config{"top_k=20 top_p=0.8", 0.7f, 20, 0.8f},
                            Config{"top_p=0.95, top_k off", 0.6f, 0, 0.95f}}) {
        q3n_sampling_params p = random_params(c.temperature, 1);
        p.top_k = c.top_k;
        p.top_p = c.top_p;
        p.repetition_penalty = 1.05f;
        SamplingContext ctx;
        ctx.sequence_tokens = seq;
        constexpr int kIters = 20;
        std::vector<float> l;
        double us = 0.0;
        for (int i = 0; i < kIters; ++i) {
            l = logits;
            ctx.counter = static_cast<uint64_t>(i);
            const auto t0 = std::chrono::steady_clock::now();
            const int32_t tok = s.sample(l, p, ctx);
            us += std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
            ASSERT_GE(tok, 0);
            ASSERT_LT(tok, static_cast<int32_t>(kVocab));
        }
        std::printf("[          ] Sampler %s over %zu logits: %.1f us per token\n", c.name, kVocab, us / kIters);
    }
}

}  // namespace
