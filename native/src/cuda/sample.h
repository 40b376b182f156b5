// Sampling and log-probabilities on the GPU: logits never leave the device. Implements the
// contract in sampling/sampler.h (penalties, temperature, top-k, top-p, min-p, one counter-based
// draw) over the best kMaxCandidates candidates; when a filter or the draw would reach past them
// (nearly flat distributions with no top-k), the row is flagged and the host sampler decides.
// A top_k above kMaxCandidates (and below the vocabulary) limits the host's sums to the best k,
// which the device only bounds: a row is settled on the device when the top-p cut (or, with no
// cut, the draw) falls on the same candidate for every sum within the bounds and min-p needs
// nothing past the candidates; otherwise it is flagged too.
// It does not honour q3n_sampling_params.vocab_limit yet; the engine samples such requests on the host.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "qwen3native.h"

namespace q3n::cuda {

constexpr int kMaxCandidates = 1024;

struct DeviceSampleParams {
    float temperature;
    float top_p;
    float min_p;
    float repetition_penalty;
    float presence_penalty;
    float frequency_penalty;
    int32_t top_k;
    int32_t top_logprobs;       // 0..Q3N_MAX_TOP_LOGPROBS
    int32_t want_logprobs;
    int32_t penalty_offset;     // into the penalty arrays
    int32_t penalty_count;      // distinct ids of the sequence
    int32_t forced_token;       // >= 0: no sampling, only the log-probabilities of this token (prompt scoring)
    uint64_t seed;
    uint64_t counter;
};

struct DeviceSampleResult {
    int32_t token;              // -1 with `fallback` or `non_finite`
    int32_t non_finite;         // a NaN/Inf logit (index in `bad_index`), or a penalty/temperature overflow
    int32_t bad_index;
    int32_t fallback;           // the host must sample this row from its logits
    q3n_token_logprob logprob;  // filled when want_logprobs
};

// Bytes of scratch that sample_rows needs (the `work` argument). For every vocab >= 2304 it is at
// most rows * vocab * 4, so a [rows, vocab] fp32 buffer (the earlier contract) still suffices.
size_t sample_work_bytes(int rows, int vocab);

// Largest vocabulary sample_rows accepts (64 slices of 4,608 ids); larger ones throw.
constexpr int kMaxSampleVocab = 64 * 4608;

// logits: [rows, vocab] fp32 (left unchanged); work: sample_work_bytes(rows, vocab) bytes of device
// scratch, any contents; penalty_ids/counts: distinct ids of each row's sequence and how often each
// was sampled in this request. Two kernel launches, no allocation, no host synchronisation: it can
// be captured in a CUDA graph (the launch shapes depend on rows and vocab only).
void sample_rows(const float* logits, float* work, int rows, int vocab, const DeviceSampleParams* params,
                 const int32_t* penalty_ids, const int32_t* penalty_counts, DeviceSampleResult* results,
                 cudaStream_t stream);

}  // namespace q3n::cuda
