// The seam between the engine (sequences, KV blocks, sampling) and a model implementation on a
// backend. The engine flattens a step's tokens into a StepBatch; the runner computes logits.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/ops.h"
#include "model/config.h"
#include "model/mrope_positions.h"
#include "qwen3native.h"

namespace q3n {

// A stepped sequence's part of the batch, for runners that keep per-sequence state besides the
// KV cache (Qwen3-Next's convolution and delta-rule states).
struct SequenceSpan {
    uint64_t id;           // stable for the sequence's life; never reused
    size_t first_token;    // index into StepBatch::tokens
    size_t count;
    bool starts_at_zero;   // the span begins at position 0: the state starts empty
};

struct StepBatch {
    std::vector<int32_t> tokens;          // every queued token of every stepped sequence, in order
    std::vector<int32_t> positions;       // each token's position in its sequence
    std::vector<cpu::TokenSlot> slots;    // each token's block table and position
    std::vector<SequenceSpan> sequences;  // one per stepped sequence, in order

    // ---- Qwen3-VL (spec 4.1, 4.4); empty for text-only models ---------------------------------------
    // Rotary positions [3][tokens] (the t row, the h row, the w row) where the rope is MRoPE.
    // `positions` stays each token's cache index, which the KV slots and the causal mask use.
    std::vector<int32_t> mrope_positions;
    // Rows of `tokens` at image/video placeholders, and for each the vision tower's output for that
    // merged token: (1 + DeepStack taps) x hidden floats, the merger's row then each tap's. The
    // pointers are valid for the forward call.
    std::vector<uint32_t> vision_rows;
    std::vector<const float*> vision_features;
};

struct WeightStats {
    uint64_t parameter_count = 0;
    uint64_t bytes = 0;
    bool fp8 = false;
};

// One row's sampling request for a runner that samples where its logits are (see sampler.h for
// the rules): the sequence's distinct token ids with how often each was sampled in this request.
struct DeviceSamplingRequest {
    const q3n_sampling_params* params = nullptr;
    const int32_t* penalty_ids = nullptr;
    const int32_t* penalty_counts = nullptr;
    size_t penalty_count = 0;
    uint64_t counter = 0;
};

struct DeviceSamplingResult {
    int32_t token = -1;
    bool fallback = false;    // the host sampler must decide from the row's logits
    bool non_finite = false;  // NaN/Inf logits, or a penalty or temperature overflow
    int32_t bad_index = -1;
    q3n_token_logprob logprob{};
};

class ModelRunner {
public:
    virtual ~ModelRunner() = default;
    // Runs the batch through every layer, writing K/V of every token into the cache, and keeps the
    // last hidden states until the next forward.
    virtual void forward(const StepBatch& batch) = 0;
    // Logits (vocab_size floats per row) of the given token indices of the last forward. Split in
    // calls of a few rows by the caller so prompt log-probabilities never hold a [tokens, vocab] matrix.
    virtual void logits(const size_t* rows, size_t count, float* out) = 0;
    virtual WeightStats weight_stats() const = 0;

    // Runners with per-sequence state: true when that state cannot be rewound to an earlier
    // position, so the engine re-prefills a sequence truncated below its cached length.
    virtual bool has_recurrent_state() const { return false; }
    // The sequence is gone (or restarts from position 0): drop its state.
    virtual void release_sequence(uint64_t id) {}

    // Vision-language runners: runs the vision tower on one item's pixels ([t*h*w, patch_dim], the
    // processor's rows) and writes its merged tokens' features, (1 + DeepStack taps) x hidden floats
    // per token as StepBatch::vision_features expects them.
    virtual bool has_vision() const { return false; }
    virtual void encode_vision(const float* pixels, const GridThw& grid, std::vector<float>& features) {
        throw std::logic_error("this runner has no vision tower");
    }

    // Runners whose logits live on an accelerator sample there, so logits never cross to the host.
    virtual bool samples_on_device() const { return false; }
    virtual void sample(const size_t* rows, size_t count, const DeviceSamplingRequest* requests,
                        DeviceSamplingResult* results) {
        throw std::logic_error("this runner does not sample on a device");
    }
    // Prompt log-probabilities where the logits are: for each given row of the last forward, the
    // log-probability of `tokens[i]` and the top_k alternatives (sampling/logprobs.h's rules).
    virtual void score(const size_t* rows, size_t count, const int32_t* tokens, uint32_t top_k, q3n_token_logprob* out) {
        throw std::logic_error("this runner does not score on a device");
    }
};

}  // namespace q3n
