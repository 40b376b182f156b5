// The host sampler. sampler.h states the contract; the comments here give the exact fp32 forms
// the CUDA sampler reproduces.
#include "sampling/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>

#include "core/error.h"

namespace q3n {
namespace {

uint64_t mix64(uint64_t z) {
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ull;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBull;
    z ^= z >> 31;
    return z;
}

std::string show(double v) {
    char buf[40];
    std::snprintf(buf, sizeof buf, "%.9g", v);
    return buf;
}

[[noreturn]] void bad_param(const char* field, const char* rule, double value) {
    fail(Q3N_ERR_INVALID_ARGUMENT,
         std::string("q3n_sampling_params.") + field + " must be " + rule + " (got " + show(value) + ")");
}

// True when the float's exponent is all ones (NaN or +-Inf). Written on the bits so that the scan
// over a 150k vocabulary vectorises; it stays correct under -ffast-math, where isfinite may not.
inline bool not_finite(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return (u & 0x7f800000u) == 0x7f800000u;
}

// Index of the first non-finite value, or size() when there is none. One branch-free pass first,
// because the common case is that all are fine.
size_t first_non_finite(std::span<const float> v) {
    uint32_t any = 0;
    for (float f : v) any |= not_finite(f) ? 1u : 0u;
    if (!any) return v.size();
    for (size_t i = 0; i < v.size(); ++i)
        if (not_finite(v[i])) return i;
    return v.size();
}

void check_ids(std::span<const int32_t> tokens, size_t vocab, const char* what) {
    for (int32_t t : tokens)
        if (t < 0 || static_cast<size_t>(t) >= vocab)
            fail(Q3N_ERR_INVALID_ARGUMENT, std::string(what) + " contains token id " + std::to_string(t) +
                                               ", outside the vocabulary of " + std::to_string(vocab));
}

// Candidates more than this many nats below the best have weight < 1.1e-7 each; see sample().
constexpr float kHeadSpan = 16.0f;

float max_of(std::span<const float> v) {
    float m = v[0];
#pragma omp simd reduction(max : m)
    for (size_t i = 0; i < v.size(); ++i) m = v[i] > m ? v[i] : m;
    return m;
}

[[noreturn]] void overflowed(size_t id, const char* after) {
    fail(Q3N_ERR_NUMERIC, "logit of token " + std::to_string(id) + " overflowed to Inf after " + after);
}

}  // namespace

void validate_sampling_params(const q3n_sampling_params& p) {
    if (p.struct_size < sizeof(uint32_t) || p.struct_size > sizeof(q3n_sampling_params))
        fail(Q3N_ERR_INVALID_ARGUMENT, "q3n_sampling_params.struct_size must be in [" +
                                           std::to_string(sizeof(uint32_t)) + ", " +
                                           std::to_string(sizeof(q3n_sampling_params)) + "] (got " +
                                           std::to_string(p.struct_size) + ")");
    // Every test is written so that NaN fails it.
    if (!(std::isfinite(p.temperature) && p.temperature >= 0.0f))
        bad_param("temperature", "finite and >= 0", p.temperature);
    if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) bad_param("top_p", "in (0, 1]", p.top_p);
    if (!(p.min_p >= 0.0f && p.min_p <= 1.0f)) bad_param("min_p", "in [0, 1]", p.min_p);
    if (!(std::isfinite(p.repetition_penalty) && p.repetition_penalty > 0.0f))
        bad_param("repetition_penalty", "finite and > 0", p.repetition_penalty);
    if (!(p.presence_penalty >= -2.0f && p.presence_penalty <= 2.0f))
        bad_param("presence_penalty", "in [-2, 2]", p.presence_penalty);
    if (!(p.frequency_penalty >= -2.0f && p.frequency_penalty <= 2.0f))
        bad_param("frequency_penalty", "in [-2, 2]", p.frequency_penalty);
}

float sampling_uniform(uint64_t seed, uint64_t counter) {
    // Hashing the seed first makes streams of nearby seeds unrelated; with seed + counter * gamma
    // alone, seed s + gamma would replay seed s's stream shifted by one draw.
    const uint64_t key = mix64(seed);
    const uint64_t r = mix64(key + (counter + 1) * 0x9E3779B97F4A7C15ull);
    // 24 bits fit a float's mantissa, so the value is exact and never rounds up to 1.
    return static_cast<float>(r >> 40) * 0x1p-24f;
}

Sampler::Sampler(size_t vocab_size) : candidates_(vocab_size), counts_(vocab_size, 0) {
    require(vocab_size > 0 && vocab_size <= static_cast<size_t>(std::numeric_limits<int32_t>::max()),
            Q3N_ERR_INVALID_ARGUMENT, "Sampler: vocabulary size " + std::to_string(vocab_size) + " out of range");
}

int32_t Sampler::sample(std::span<float> logits, const q3n_sampling_params& params, const SamplingContext& ctx) {
    validate_sampling_params(params);
    const size_t vocab = candidates_.size();
    require(logits.size() == vocab, Q3N_ERR_INVALID_ARGUMENT,
            "Sampler: got " + std::to_string(logits.size()) + " logits for a vocabulary of " + std::to_string(vocab));
    check_ids(ctx.sequence_tokens, vocab, "the sequence");
    check_ids(ctx.output_tokens, vocab, "the output tokens");

    if (const size_t bad = first_non_finite(logits); bad != vocab)
        fail(Q3N_ERR_NUMERIC, "logits contain NaN/Inf at token " + std::to_string(bad));

    // Repetition penalty. counts_ marks ids already penalised, so a token repeated in the
    // sequence is penalised once, as HF's gather/scatter does.
    const float rep = params.repetition_penalty;
    if (rep != 1.0f) {
        for (int32_t t : ctx.sequence_tokens) {
            if (counts_[t]) continue;
            counts_[t] = 1;
            float& l = logits[t];
            l = l > 0.0f ? l / rep : l * rep;
            if (not_finite(l)) {
                for (int32_t u : ctx.sequence_tokens) counts_[u] = 0;
                overflowed(t, "the repetition penalty");
            }
        }
        for (int32_t t : ctx.sequence_tokens) counts_[t] = 0;
    }

    // Presence and frequency: in fp32, logit - (presence + frequency * float(count)), the
    // product and the sum each rounded (no fused multiply-add).
    const float presence = params.presence_penalty, frequency = params.frequency_penalty;
    if (presence != 0.0f || frequency != 0.0f) {
        for (int32_t t : ctx.output_tokens) ++counts_[t];
        for (int32_t t : ctx.output_tokens) {
            const uint32_t c = counts_[t];
            if (c == 0) continue;  // already applied at this id's first occurrence
            counts_[t] = 0;
            const float scaled = frequency * static_cast<float>(c);
            const float penalty = presence + scaled;
            logits[t] -= penalty;
            if (not_finite(logits[t])) {
                for (int32_t u : ctx.output_tokens) counts_[u] = 0;
                overflowed(t, "the presence/frequency penalties");
            }
        }
    }

    // Ids at or past the sampleable limit (a checkpoint's padding rows past its tokenizer) are
    // never drawn: everything below works on the first `sampleable` logits only.
    const size_t sampleable = ctx.vocab_limit ? std::min(ctx.vocab_limit, vocab) : vocab;
    logits = logits.first(sampleable);

    if (params.temperature == 0.0f) {  // validated >= 0, so this is every temperature <= 0
        // Two vectorisable passes (max, then its first index) beat one branchy argmax scan.
        const float top = max_of(logits);
        size_t best = 0;
        while (logits[best] != top) ++best;  // the first index: the lowest id wins ties
        return static_cast<int32_t>(best);
    }

    // Temperature: a true division, not a multiplication by 1/T, so both backends round alike.
    const float temperature = params.temperature;
    if (temperature != 1.0f) {
        for (float& l : logits) l /= temperature;
        if (const size_t bad = first_non_finite(logits); bad != sampleable) overflowed(bad, "the temperature");
    }

    // Sorting a 150k vocabulary costs ~10 ms, while only the few candidates near the maximum
    // ever matter in practice. So split into a head (logit >= max - kHeadSpan) and a tail: every
    // head candidate precedes every tail candidate in the order, so the head sorted alone is the
    // order's exact prefix. Tail weights are below exp(-kHeadSpan) ~ 1e-7 each; the tail enters
    // the sums in one unsorted pass, and is sorted only if a filter boundary or the draw reaches it.
    const float top = max_of(logits);
    const float cut = top - kHeadSpan;
    size_t head = 0;
    {
        size_t back = sampleable;
        for (size_t i = 0; i < sampleable; ++i) {
            const float l = logits[i];
            candidates_[l >= cut ? head++ : --back] = Candidate{l, static_cast<int32_t>(i)};
        }
    }
    // A strict total order, so the selection does not depend on the sort algorithm.
    const auto before = [](const Candidate& a, const Candidate& b) {
        return a.value > b.value || (a.value == b.value && a.id < b.id);
    };
    const auto first = candidates_.begin();

    // [0, ready) holds candidates in final order with value = weight; [ready, limit) holds the
    // rest of the candidates in play, unsorted, value = logit.
    size_t limit = sampleable, ready = 0;
    if (params.top_k > 0 && static_cast<size_t>(params.top_k) < sampleable) {
        limit = static_cast<size_t>(params.top_k);
        // The k best lie in the head whenever it holds k; select there, else over everything.
        const auto pool_end = limit <= head ? first + static_cast<std::ptrdiff_t>(head) : first + static_cast<std::ptrdiff_t>(sampleable);
        std::nth_element(first, first + static_cast<std::ptrdiff_t>(limit - 1), pool_end, before);
        std::sort(first, first + static_cast<std::ptrdiff_t>(limit), before);
        ready = limit;
    } else {
        std::sort(first, first + static_cast<std::ptrdiff_t>(head), before);
        ready = head;
    }
    if (limit == 1) return candidates_[0].id;  // top_k = 1: exactly greedy on the scaled logits

    // Unnormalised softmax weights, max-subtracted: w_0 = exp(0) = 1 exactly, which lets min-p
    // compare weights with min_p directly.
    for (size_t i = 0; i < ready; ++i) candidates_[i].value = std::exp(candidates_[i].value - top);
    const auto make_ready = [&] {
        std::sort(first + static_cast<std::ptrdiff_t>(ready), first + static_cast<std::ptrdiff_t>(limit), before);
        for (size_t i = ready; i < limit; ++i) candidates_[i].value = std::exp(candidates_[i].value - top);
        ready = limit;
    };
    const auto weight_at = [&](size_t i) {
        if (i >= ready) make_ready();
        return candidates_[i].value;
    };
    // Sum of the weights of the first n candidates (n <= ready, or n == limit). Sums are double:
    // in fp32, each of 150k tail weights of ~7e-8 added to a sum near 1 rounds up to a whole ulp
    // (1.2e-7), which nearly doubled the tail's share in testing.
    const auto weight_sum = [&](size_t n) {
        double sum = 0.0;
        for (size_t i = 0; i < std::min(n, ready); ++i) sum += candidates_[i].value;
        if (n > ready)
            for (size_t i = ready; i < n; ++i) sum += std::exp(candidates_[i].value - top);
        return sum;
    };

    size_t kept = limit;

    // top-p: the smallest prefix with running sum >= top_p * total; top_p = 1 keeps all, which
    // this rule would also do up to rounding, so skip the passes.
    if (params.top_p < 1.0f) {
        const double target = static_cast<double>(params.top_p) * weight_sum(limit);
        double running = 0.0;
        for (size_t i = 0; i < limit; ++i) {
            running += weight_at(i);
            if (running >= target) {
                kept = i + 1;
                break;
            }
        }
    }

    // min-p: p_i < min_p * p_max with p renormalised over the kept prefix is w_i / S < min_p * 1 / S,
    // i.e. w_i < min_p. Weights fall along the order, so the dropped ones are a suffix, and w_0 = 1
    // >= min_p is never dropped.
    if (params.min_p > 0.0f) {
        // Unsorted candidates remain only when nothing was cut yet (kept == limit). Their logits
        // are all below `cut`, so their weights are at most exp(cut - top): when that is already
        // below min_p, all of them go without sorting them.
        if (kept > ready && std::exp(cut - top) < params.min_p) kept = ready;
        while (kept > 1 && weight_at(kept - 1) < params.min_p) --kept;
    }

    const double total = weight_sum(kept);
    const double threshold = static_cast<double>(sampling_uniform(params.seed, ctx.counter)) * total;
    double running = 0.0;
    for (size_t i = 0; i < kept; ++i) {
        running += weight_at(i);
        if (running > threshold) return candidates_[i].id;
    }
    weight_at(kept - 1);  // the fallback is the last in order, so the order must be final
    return candidates_[kept - 1].id;
}

}  // namespace q3n
