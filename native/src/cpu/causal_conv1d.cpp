// Causal depthwise conv1d + SiLU with a carried state (spec 3.4 step 2, state per spec 3.5).
//
// State layout [channels, K-1], oldest input first. This is vLLM's "DS" layout with no speculative
// columns; HF keeps K columns (the newest input included), which is one redundant column. Keeping
// only the pre-conv inputs means prefill-then-decode and one long prefill run identical arithmetic:
// each output is the same K-term sum in the same order whether its history came from this call or
// from the state.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "cpu/next_ops.h"
#include "cpu/simd.h"

namespace q3n::cpu {
namespace {

// Channels per work item: wide enough to vectorise across channels, small enough that a 2-core
// decode of one sequence still splits (conv_dim is 8192 for Qwen3-Next-80B).
constexpr size_t kBlock = 64;

// One sequence, channels [c0, c0 + nc). `hist` is a [K-1][kBlock] window of past inputs, oldest
// row first, so the sum over j runs oldest to newest exactly as the formula is written.
Q3N_MULTIVERSION
void conv_block(const float* x, float* out, size_t rows, size_t channels, size_t c0, size_t nc, const float* w,
                size_t K, float* state, float* hist) {
    const size_t H = K - 1;
    for (size_t j = 0; j < H; ++j)
        for (size_t c = 0; c < nc; ++c) hist[j * kBlock + c] = state[(c0 + c) * H + j];
    for (size_t t = 0; t < rows; ++t) {
        const float* xt = x + t * channels + c0;
        float* ot = out + t * channels + c0;
        for (size_t c = 0; c < nc; ++c) {
            const float* wc = w + (c0 + c) * K;
            float acc = 0.0f;
            for (size_t j = 0; j < H; ++j) acc += wc[j] * hist[j * kBlock + c];
            const float cur = xt[c];  // read before the write below: out may alias x
            acc += wc[H] * cur;
            for (size_t j = 0; j + 1 < H; ++j) hist[j * kBlock + c] = hist[(j + 1) * kBlock + c];
            if (H > 0) hist[(H - 1) * kBlock + c] = cur;
            ot[c] = acc / (1.0f + std::exp(-acc));
        }
    }
    for (size_t j = 0; j < H; ++j)
        for (size_t c = 0; c < nc; ++c) state[(c0 + c) * H + j] = hist[j * kBlock + c];
}

}  // namespace

void causal_conv1d_silu(const float* x, size_t channels, const float* weight, size_t kernel, const size_t* seq_starts,
                        size_t num_seqs, float* const* state, float* out, ThreadPool& pool) {
    require(kernel >= 1, Q3N_ERR_INTERNAL, "causal_conv1d_silu: kernel size must be at least 1");
    const size_t blocks = (channels + kBlock - 1) / kBlock;
    pool.parallel_for(num_seqs * blocks, [&](size_t begin, size_t end) {
        thread_local std::vector<float> hist;
        hist.resize((kernel - 1) * kBlock);
        for (size_t item = begin; item < end; ++item) {
            const size_t s = item / blocks, c0 = (item % blocks) * kBlock;
            const size_t t0 = seq_starts[s], rows = seq_starts[s + 1] - t0;
            conv_block(x + t0 * channels, out + t0 * channels, rows, channels, c0, std::min(kBlock, channels - c0),
                       weight, kernel, state[s], hist.data());
        }
    }, 1);
}

}  // namespace q3n::cpu
