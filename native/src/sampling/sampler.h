// Token sampling on the host, in the order HF and vLLM apply it: penalties, temperature, top-k,
// top-p, min-p, then one draw. The random stream is counter-based (seed, draw index) so that the
// CUDA sampler can reproduce the same draws.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "qwen3native.h"

namespace q3n {

// Throws q3n::Error(Q3N_ERR_INVALID_ARGUMENT) naming the field for NaN, negative or out-of-range values.
void validate_sampling_params(const q3n_sampling_params& params);

// The uniform draw in [0, 1) for draw number `counter` of the stream `seed`.
float sampling_uniform(uint64_t seed, uint64_t counter);

struct SamplingContext {
    std::span<const int32_t> sequence_tokens;  // every token of the sequence (repetition penalty)
    std::span<const int32_t> output_tokens;    // tokens sampled in this request (presence/frequency)
    uint64_t counter = 0;                      // draw index in the seed's stream
};

class Sampler {
public:
    // Allocates its scratch for `vocab_size` candidates once, here.
    explicit Sampler(size_t vocab_size);

    // Returns the chosen token. `logits` is modified in place (penalties and temperature applied).
    // Throws Q3N_ERR_NUMERIC if any logit is NaN or +-Inf before sampling.
    int32_t sample(std::span<float> logits, const q3n_sampling_params& params, const SamplingContext& ctx);

private:
    // scratch for candidate indices/probabilities, sized once
    struct Candidate { float logit; int32_t id; };
    std::vector<Candidate> candidates_;
    std::vector<uint32_t> counts_;
};

}  // namespace q3n
