// Comparisons of a loaded model with a transformers reference (tests/fixtures/*/reference.json),
// shared by the dense, MoE and Qwen3-Next fixture tests. The rules and their tolerances are
// explained in test_fixtures.cpp.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "fixture_util.h"

namespace q3n_test {

inline std::vector<float> logits_of(q3n_sequence* s, size_t vocab) {
    std::vector<float> l(vocab);
    size_t n = 0;
    EXPECT_EQ(q3n_sequence_get_logits(s, l.data(), l.size(), &n), Q3N_OK) << q3n_last_error();
    l.resize(n);
    return l;
}

inline std::vector<float> prefill(q3n_model* m, const std::vector<int32_t>& tokens, size_t vocab) {
    SequenceHandle s;
    EXPECT_EQ(q3n_sequence_create(m, &s.s), Q3N_OK);
    EXPECT_EQ(q3n_sequence_append(s.s, tokens.data(), tokens.size()), Q3N_OK) << q3n_last_error();
    EXPECT_EQ(q3n_model_step(m, &s.s, 1, 0), Q3N_OK) << q3n_last_error();
    return logits_of(s.s, vocab);
}

inline double check_logits(q3n_model* m, const Reference& ref, size_t vocab, double bound, const std::string& label) {
    double worst = 0;
    for (size_t p = 0; p < ref.prompts.size(); ++p) {
        const auto logits = prefill(m, ref.prompts[p], vocab);
        const double rel = relative_l2(logits, ref.last_logits[p]), mad = max_abs_diff(logits, ref.last_logits[p]);
        worst = std::max(worst, mad);
        EXPECT_LT(rel, bound) << label << " prompt " << p << " (length " << ref.prompts[p].size()
                              << "): relative L2 " << rel << ", max abs " << mad;
        ::testing::Test::RecordProperty(label + "_prompt" + std::to_string(p) + "_rel_l2", std::to_string(rel));
    }
    return worst;
}

// Free-running greedy decode, compared up to the first step whose reference margin is within 8x
// the largest logit error seen (test_fixtures.cpp's rule).
inline void check_greedy(q3n_model* m, const Reference& ref, double error, const std::string& label) {
    size_t comparable = 0;
    while (comparable < ref.greedy.margins.size() && ref.greedy.margins[comparable] > 8 * error) ++comparable;
    ASSERT_GT(comparable, 0u) << label << ": the first reference margin is too small to compare anything";
    SequenceHandle s;
    ASSERT_EQ(q3n_sequence_create(m, &s.s), Q3N_OK);
    ASSERT_EQ(q3n_sequence_append(s.s, ref.prompts.back().data(), ref.prompts.back().size()), Q3N_OK);
    for (size_t i = 0; i < comparable; ++i) {
        ASSERT_EQ(q3n_model_step(m, &s.s, 1, Q3N_STEP_SAMPLE), Q3N_OK) << q3n_last_error();
        int32_t t = -1;
        q3n_sequence_last_token(s.s, &t);
        ASSERT_EQ(t, ref.greedy.tokens[i]) << label << ": greedy token " << i << " differs (reference margin "
                                           << ref.greedy.margins[i] << ")";
    }
    std::printf("[ %s ] greedy tokens equal for %zu of %zu steps\n", label.c_str(), comparable, ref.greedy.tokens.size());
}

// FP8: teacher-forced, so one rounding flip cannot derail the rest; argmax must match wherever the
// reference margin exceeds 0.5 and on at least 90% of the steps (test_fixtures.cpp's rule).
inline void check_greedy_teacher_forced(q3n_model* m, const Reference& ref, size_t vocab, const std::string& label) {
    SequenceHandle s;
    ASSERT_EQ(q3n_sequence_create(m, &s.s), Q3N_OK);
    ASSERT_EQ(q3n_sequence_append(s.s, ref.prompts.back().data(), ref.prompts.back().size()), Q3N_OK);
    size_t checked = 0, agree = 0;
    for (size_t i = 0; i < ref.greedy.tokens.size(); ++i) {
        ASSERT_EQ(q3n_model_step(m, &s.s, 1, 0), Q3N_OK) << q3n_last_error();
        const auto logits = logits_of(s.s, vocab);
        const auto argmax = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
        agree += argmax == ref.greedy.tokens[i];
        if (ref.greedy.margins[i] > 0.5) {
            ++checked;
            EXPECT_EQ(argmax, ref.greedy.tokens[i]) << label << ": step " << i << " (margin " << ref.greedy.margins[i] << ")";
        }
        ASSERT_EQ(q3n_sequence_append(s.s, &ref.greedy.tokens[i], 1), Q3N_OK);
    }
    EXPECT_GT(checked, ref.greedy.tokens.size() / 2) << label << ": too few steps with a usable margin";
    EXPECT_GE(agree * 10, ref.greedy.tokens.size() * 9) << label << ": argmax agrees on only " << agree << " steps";
    std::printf("[ %s ] teacher-forced argmax: %zu of %zu steps equal; all %zu with margin > 0.5 equal\n",
                label.c_str(), agree, ref.greedy.tokens.size(), checked);
}

// FP8 against the activation-quantising emulation: an activation within an ulp of an e4m3 rounding
// midpoint can round the other way under another summation order (a flip), which moved whole logit
// vectors by up to ~6% on the tiny random fixtures. Every prompt within 0.1, at least half within
// 2e-3 (a wrong scale or layout is ~100% off). Returns the largest absolute logit difference.
inline double check_logits_fp8(q3n_model* m, const Reference& ref, size_t vocab, const std::string& label) {
    double worst = 0;
    size_t tight = 0;
    for (size_t p = 0; p < ref.prompts.size(); ++p) {
        const auto logits = prefill(m, ref.prompts[p], vocab);
        const double rel = relative_l2(logits, ref.last_logits[p]);
        worst = std::max(worst, max_abs_diff(logits, ref.last_logits[p]));
        EXPECT_LT(rel, 0.1) << label << " prompt " << p << ": relative L2 " << rel;
        tight += rel < 2e-3;
    }
    EXPECT_GE(tight * 2, ref.prompts.size()) << label << ": too many prompts differ by more than 2e-3";
    return worst;
}

}  // namespace q3n_test
