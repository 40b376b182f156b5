#include "sampling/logprobs.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "core/error.h"

namespace q3n {

float log_sum_exp(const float* logits, size_t n) {
    const float mx = *std::max_element(logits, logits + n);
    // A running fp32 sum over 151,936 terms drifts by ~1e-4; double keeps the total exact to fp32
    // rounding (a GPU's tree reduction in fp32 gets the same).
    double sum = 0.0;
    for (size_t i = 0; i < n; ++i) sum += std::exp(logits[i] - mx);
    return mx + static_cast<float>(std::log(sum));
}

LogprobCalculator::LogprobCalculator(size_t vocab_size) : order_(vocab_size) {}

void LogprobCalculator::compute(const float* logits, int32_t token, uint32_t top_k, q3n_token_logprob& out) {
    const size_t V = order_.size();
    if (token < 0 || static_cast<size_t>(token) >= V) fail(Q3N_ERR_INTERNAL, "log-probability of a token outside the vocabulary");
    std::memset(&out, 0, sizeof(out));
    const float lse = log_sum_exp(logits, V);
    out.token = token;
    out.logprob = logits[token] - lse;
    const size_t k = std::min<size_t>({top_k, Q3N_MAX_TOP_LOGPROBS, V});
    if (k == 0) return;
    std::iota(order_.begin(), order_.end(), 0);
    auto better = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
    std::nth_element(order_.begin(), order_.begin() + static_cast<long>(k - 1), order_.end(), better);
    std::sort(order_.begin(), order_.begin() + static_cast<long>(k), better);
    out.num_top = static_cast<uint32_t>(k);
    for (size_t i = 0; i < k; ++i) {
        out.top_tokens[i] = order_[i];
        out.top_logprobs[i] = logits[order_[i]] - lse;
    }
}

}  // namespace q3n
