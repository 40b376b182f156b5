// The seam between the engine (sequences, KV blocks, sampling) and a model implementation on a
// backend. The engine flattens a step's tokens into a StepBatch; the runner computes logits.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu/ops.h"
#include "model/config.h"

namespace q3n {

struct StepBatch {
    std::vector<int32_t> tokens;          // every queued token of every stepped sequence, in order
    std::vector<int32_t> positions;       // each token's position in its sequence
    std::vector<cpu::TokenSlot> slots;    // each token's block table and position
};

struct WeightStats {
    uint64_t parameter_count = 0;
    uint64_t bytes = 0;
    bool fp8 = false;
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
};

}  // namespace q3n
