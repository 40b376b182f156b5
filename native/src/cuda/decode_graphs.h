// What every CUDA runner does around its layers each step: the step's inputs on the device (tokens,
// positions, each token's sequence, the block tables) and, for decode-only steps, CUDA graphs.
//
// A decode step at batch 1 is a few hundred small launches; replaying them as one captured graph
// keeps the CPU out of the way of the weight stream. A graph bakes in every pointer and launch size,
// so it is keyed by (tokens, block-table width) and dropped whenever a buffer it reads moves: the
// runner keeps every per-step input at a stable device address and refreshes only the contents
// (with copies enqueued before the replay), including per-sequence state tables.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <map>
#include <vector>

#include "cuda/device_buffer.h"
#include "cuda/ops.h"
#include "model/model_runner.h"

namespace q3n::cuda {

// Decode steps at most this wide replay captured graphs; wider ones (and prefills) launch directly.
constexpr int kMaxGraphTokens = 256;

class DecodeGraphs {
public:
    DecodeGraphs() = default;
    ~DecodeGraphs() { clear(); }
    DecodeGraphs(const DecodeGraphs&) = delete;
    DecodeGraphs& operator=(const DecodeGraphs&) = delete;

    static uint64_t key(int tokens, int max_blocks) {
        return (static_cast<uint64_t>(tokens) << 32) | static_cast<uint32_t>(max_blocks);
    }
    // Replays the graph under `key`, capturing `enqueue` (kernel launches only) on `stream` first.
    void run(uint64_t key, cudaStream_t stream, const std::function<void()>& enqueue);
    void clear();

private:
    std::map<uint64_t, cudaGraphExec_t> graphs_;
};

// The device copy of a StepBatch's per-token inputs. Sequences are told apart by their block tables
// (the engine gives each sequence its own); each gets the blocks its tokens reach.
class StepInputs {
public:
    // Stages and enqueues the copies on `stream`. Decode-only steps round the table width up to a
    // power of two so a growing context reuses a few graphs. Returns true when a device buffer moved
    // (captured graphs that read it are stale).
    bool upload(const StepBatch& b, int block_size, bool decode_only, cudaStream_t stream);

    DeviceBatch batch() const {
        DeviceBatch b{tokens_, positions_.as<int32_t>(), seq_.as<int32_t>(), tables_dev_.as<int32_t>(), max_blocks_};
        b.prefill = prefill_;
        return b;
    }
    const int32_t* tokens() const { return tokens_dev_.as<int32_t>(); }
    int max_blocks() const { return max_blocks_; }

private:
    int tokens_ = 0, max_blocks_ = 0;
    bool prefill_ = false;  // some sequence steps several tokens
    DeviceBuffer tokens_dev_, positions_, seq_, tables_dev_;
    std::map<const int32_t*, int> seq_ids_;
    std::vector<int> seq_of_token_, blocks_needed_;
    std::vector<const int32_t*> tables_;
    std::vector<int32_t> host_tables_;
};

// Whether a step is decode only: every sequence steps one token and the step fits a graph.
inline bool is_decode_only(const StepBatch& b) {
    if (b.tokens.size() > static_cast<size_t>(kMaxGraphTokens)) return false;
    for (const SequenceSpan& s : b.sequences)
        if (s.count != 1) return false;
    return true;
}

}  // namespace q3n::cuda
