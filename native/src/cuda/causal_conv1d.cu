// Causal depthwise conv1d + SiLU with a carried state (spec 3.4 step 2, state per spec 3.5), for
// prefill and decode alike.
//
// One thread per (sequence, channel) walks the sequence's tokens with the K-1 previous inputs in
// registers, exactly the CPU op's order of terms, so prefill-then-decode equals one long prefill bit
// for bit here too. A warp covers 32 consecutive channels, so every load and store of x and out is
// one coalesced 128-byte row segment. Because a channel belongs to a single thread, out may alias x:
// the thread reads its next few inputs before it overwrites them, and no other thread needs them.
#include "core/error.h"
#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/gdn_common.cuh"
#include "cuda/next_ops.h"

namespace q3n::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kAhead = 8;  // inputs loaded before the first of them is used: hides load latency in prefill

template <int K>
__global__ void __launch_bounds__(kThreads)
    conv_kernel(const float* x, int channels, const float* w, const int32_t* seq_starts, float* const* state,
                float* out) {
    const int c = blockIdx.x * kThreads + threadIdx.x, s = blockIdx.y;
    if (c >= channels) return;
    const int t0 = seq_starts[s], t1 = seq_starts[s + 1];
    if (t0 >= t1) return;
    float* st = state[s] + static_cast<size_t>(c) * (K - 1);
    ConvChannel<K> ch;
    ch.load(w, c, st);
    for (int t = t0; t < t1; t += kAhead) {
        float cur[kAhead];
#pragma unroll
        for (int p = 0; p < kAhead; ++p) cur[p] = t + p < t1 ? x[static_cast<size_t>(t + p) * channels + c] : 0.0f;
#pragma unroll
        for (int p = 0; p < kAhead; ++p) {
            if (t + p >= t1) break;
            out[static_cast<size_t>(t + p) * channels + c] = ch.step(cur[p]);
        }
    }
    ch.store(st);
}

template <int K>
void launch(const float* x, int channels, const float* w, const int32_t* seq_starts, int num_seqs,
            float* const* state, float* out, cudaStream_t stream) {
    const dim3 grid((channels + kThreads - 1) / kThreads, num_seqs);
    conv_kernel<K><<<grid, kThreads, 0, stream>>>(x, channels, w, seq_starts, state, out);
}

}  // namespace

void causal_conv1d_silu(const float* x, int channels, const float* weight, int kernel, const int32_t* seq_starts,
                        int num_seqs, float* const* state, float* out, cudaStream_t stream) {
    require(kernel >= 1 && kernel <= 8, Q3N_ERR_INTERNAL, "causal_conv1d_silu: kernel size must be in [1, 8]");
    if (num_seqs == 0 || channels == 0) return;
    switch (kernel) {
        case 1: launch<1>(x, channels, weight, seq_starts, num_seqs, state, out, stream); break;
        case 2: launch<2>(x, channels, weight, seq_starts, num_seqs, state, out, stream); break;
        case 3: launch<3>(x, channels, weight, seq_starts, num_seqs, state, out, stream); break;
        case 4: launch<4>(x, channels, weight, seq_starts, num_seqs, state, out, stream); break;
        case 5: launch<5>(x, channels, weight, seq_starts, num_seqs, state, out, stream); break;
        case 6: launch<6>(x, channels, weight, seq_starts, num_seqs, state, out, stream); break;
        case 7: launch<7>(x, channels, weight, seq_starts, num_seqs, state, out, stream); break;
        default: launch<8>(x, channels, weight, seq_starts, num_seqs, state, out, stream); break;
    }
    Q3N_CUDA_LAUNCHED("causal_conv1d_silu");
}

}  // namespace q3n::cuda
