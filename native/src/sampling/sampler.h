// Token sampling on the host, in the order HF and vLLM apply it: penalties, temperature, top-k,
// top-p, min-p, then one draw. The random stream is counter-based (seed, draw index) so that the
// CUDA sampler can reproduce the same draws.
//
// The contract (the CUDA sampler implements the same steps; sampler.cpp has the exact fp32 forms):
//  0. Every id in ctx.sequence_tokens / ctx.output_tokens must be in [0, vocab): else
//     Q3N_ERR_INVALID_ARGUMENT. logits.size() must equal the vocabulary size.
//  1. Any NaN or +-Inf logit: Q3N_ERR_NUMERIC ("logits contain NaN/Inf at token i"), nothing drawn.
//  2. Repetition penalty p (HF rule), once per DISTINCT id in ctx.sequence_tokens:
//     logit > 0 ? logit / p : logit * p.
//  3. Presence/frequency (OpenAI/vLLM rule) on ctx.output_tokens, c = occurrences of the id:
//     logit -= presence + frequency * c   (for ids with c > 0 only).
//     A logit pushed to +-Inf by 2 or 3 (absurd parameters or logits): Q3N_ERR_NUMERIC.
//  4. temperature == 0: the argmax, lowest id on ties. top_k/top_p/min_p and the seed are ignored;
//     penalties still apply.
//  5. Otherwise logit /= temperature (Inf here: Q3N_ERR_NUMERIC). Candidates are ordered by
//     (logit descending, id ascending); top-k keeps the first k (top_k <= 0 or >= vocab: all).
//     w_i = exp(logit_i - logit_0) (so w_0 == 1).
//     top-p (< 1): keep the shortest prefix whose running sum of w reaches top_p * sum(w).
//     min-p (> 0): drop the candidates with w_i < min_p, i.e. whose probability, renormalised over
//     what top-p kept, is below min_p times the largest probability (never the first).
//     Draw: u = sampling_uniform(seed, ctx.counter); the first candidate, in order, at which the
//     running sum of the kept w exceeds u * sum(kept w); the last kept one if rounding leaves none.
//  Weights are fp32 (logit - max and exp, each rounded). Sums and the products top_p * sum and
//  u * sum are double on the host: an fp32 running sum near 1 rounds every tail weight below its
//  ulp up or down to a whole ulp, which skews the far tail's share by up to 2x. The order in which a
//  sum accumulates is not part of the contract (the host sums the candidates near the maximum in
//  order and the far tail in one pass; a GPU reduces in a tree, in fp32 with pairwise/tree
//  accumulation at least). So the CUDA sampler matches this one exactly in greedy mode and with
//  top_k = 1, and otherwise up to rounding right at a filter boundary or at the draw point.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "qwen3native.h"

namespace q3n {

// Throws q3n::Error(Q3N_ERR_INVALID_ARGUMENT) naming the field and value for NaN, infinite,
// negative or out-of-range values: struct_size in [4, sizeof], temperature finite and >= 0,
// top_p in (0, 1], min_p in [0, 1], repetition_penalty finite and > 0, presence_penalty and
// frequency_penalty in [-2, 2] (OpenAI's range). Every top_k is valid (<= 0 means off).
// Fields past struct_size are read too: the C boundary fills them with the defaults first.
void validate_sampling_params(const q3n_sampling_params& params);

// The uniform draw in [0, 1) for draw number `counter` of the stream `seed`:
//   mix(z)   = splitmix64's finaliser: z ^= z >> 30; z *= 0xBF58476D1CE4E5B9;
//              z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31   (all mod 2^64)
//   key      = mix(seed)
//   r        = mix(key + (counter + 1) * 0x9E3779B97F4A7C15)
//   returns  float(r >> 40) * 2^-24   (exact: a multiple of 2^-24 in [0, 1 - 2^-24])
float sampling_uniform(uint64_t seed, uint64_t counter);

struct SamplingContext {
    std::span<const int32_t> sequence_tokens;  // every token of the sequence (repetition penalty)
    std::span<const int32_t> output_tokens;    // tokens sampled in this request (presence/frequency)
    uint64_t counter = 0;                      // draw index in the seed's stream
    size_t vocab_limit = 0;                    // ids >= this are never drawn; 0: none excluded
};

class Sampler {
public:
    // Allocates its scratch for `vocab_size` candidates once, here.
    explicit Sampler(size_t vocab_size);

    size_t vocab_size() const { return candidates_.size(); }

    // Returns the chosen token. `logits` (vocab_size() values) is modified in place: penalties
    // applied, and divided by the temperature when it is not greedy.
    // Throws Q3N_ERR_NUMERIC if any logit is NaN or +-Inf before sampling (see the contract above),
    // Q3N_ERR_INVALID_ARGUMENT for bad parameters, a wrong logits size or an out-of-range token id.
    int32_t sample(std::span<float> logits, const q3n_sampling_params& params, const SamplingContext& ctx);

private:
    struct Candidate {
        float value;  // the logit while ordering, then its weight w = exp(logit - max logit)
        int32_t id;
    };
    std::vector<Candidate> candidates_;
    std::vector<uint32_t> counts_;  // all zero between calls; per-id marks and occurrence counts
};

}  // namespace q3n
