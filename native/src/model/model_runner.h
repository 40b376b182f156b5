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
    std::vector<size_t> logit_rows;       // indices into tokens whose logits are wanted, in order
};

struct WeightStats {
    uint64_t parameter_count = 0;
    uint64_t bytes = 0;
    bool fp8 = false;
};

class ModelRunner {
public:
    virtual ~ModelRunner() = default;
    // Runs the batch, writing K/V of every token into the cache, and fills `logits` with
    // logit_rows.size() rows of vocab_size floats.
    virtual void forward(const StepBatch& batch, float* logits) = 0;
    virtual WeightStats weight_stats() const = 0;
};

}  // namespace q3n
