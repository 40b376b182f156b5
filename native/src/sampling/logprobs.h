// Log-probabilities for the API: log-softmax of the raw logits in fp32, and the k most likely
// tokens, found by partial selection (never a sort of the whole vocabulary).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "qwen3native.h"

namespace q3n {

class LogprobCalculator {
public:
    explicit LogprobCalculator(size_t vocab_size);

    // Fills `out` for `token` under `logits` (vocab_size values) with `top_k` (<= 20) alternatives.
    void compute(const float* logits, int32_t token, uint32_t top_k, q3n_token_logprob& out);

private:
    std::vector<int32_t> order_;
};

// log(sum(exp(logits))) with the maximum factored out: fp32 terms, a double sum.
float log_sum_exp(const float* logits, size_t n);

}  // namespace q3n
