// gdn_split_gates followed by causal_conv1d_silu, in one launch for decode steps (next_ops.h). At
// decode each of those launches moves a few tens of KB and costs its launch and drain: the conv's
// threads here read their input channel straight from in_proj_qkvz's interleaved row (the inverse of
// the split's map), and extra blocks copy z and compute the gates. Every value is computed by the
// same expressions as in the two kernels, so the outputs and the carried state are theirs bit for bit
// (test_cuda_next_model.cu compares them); gdn_common.cuh holds the arithmetic they share.
#include <algorithm>

#include "core/error.h"
#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/gdn_common.cuh"
#include "cuda/next_ops.h"

namespace q3n::cuda {
namespace {

constexpr int kThreads = 128;

// Blocks [0, conv_blocks) of grid x: one thread per conv channel (conv_kernel's arithmetic); the rest:
// z and, in the first of them, the gates, for the tokens of sequence blockIdx.y.
template <int K>
__global__ void __launch_bounds__(kThreads)
    gdn_split_conv_kernel(const float* proj, int proj_stride, const float* ba, int ba_stride, GdnShape sh, const float* w,
                          const int32_t* seq_starts, float* const* state, const float* A_log, const float* dt_bias,
                          int conv_blocks, float* out, float* z, float* beta, float* g) {
    // seq_starts and the state table are uploaded before the step, and only this kernel (of this
    // layer) writes the carried state: the weights and the state load before pdl_wait().
    const int s = blockIdx.y;
    const int t0 = seq_starts[s], t1 = seq_starts[s + 1];
    const int channels = 2 * sh.nk * sh.dk + sh.nv * sh.dv;
    if (static_cast<int>(blockIdx.x) < conv_blocks) {
        const int c = blockIdx.x * kThreads + threadIdx.x;
        const bool live = t0 < t1 && c < channels;
        float* st = live ? state[s] + static_cast<size_t>(c) * (K - 1) : nullptr;
        ConvChannel<K> ch;
        if (live) ch.load(w, c, st);
        pdl_wait();
        pdl_launch_dependents();
        if (!live) return;
        const int src = gdn_conv_source(c, sh);
        for (int t = t0; t < t1; ++t)
            out[static_cast<size_t>(t) * channels + c] = ch.step(proj[static_cast<size_t>(t) * proj_stride + src]);
        ch.store(st);
        return;
    }
    pdl_wait();
    pdl_launch_dependents();
    const int r = sh.nv / sh.nk, rdv = r * sh.dv, gw = 2 * sh.dk + 2 * rdv, zw = sh.nv * sh.dv;
    const int zb = blockIdx.x - conv_blocks, zblocks = gridDim.x - conv_blocks;
    for (int t = t0; t < t1; ++t) {
        const float* row = proj + static_cast<size_t>(t) * proj_stride;
        for (int j = zb * kThreads + threadIdx.x; j < zw; j += zblocks * kThreads)
            z[static_cast<size_t>(t) * zw + j] = row[(j / rdv) * gw + 2 * sh.dk + rdv + j % rdv];
        if (zb != 0) continue;
        const size_t gates = static_cast<size_t>(t) * sh.nv;
        gdn_token_gates(ba + static_cast<size_t>(t) * ba_stride, sh, A_log, dt_bias, beta + gates, g + gates, threadIdx.x,
                        kThreads);
    }
}

}  // namespace

void gdn_split_conv(const float* proj, int proj_stride, const float* ba, int ba_stride, const GdnShape& shape,
                    const float* A_log, const float* dt_bias, const float* weight, int kernel, const int32_t* seq_starts,
                    int num_seqs, float* const* state, float* out, float* z, float* beta, float* g, cudaStream_t stream) {
    require(kernel >= 1 && kernel <= 8, Q3N_ERR_INTERNAL, "gdn_split_conv: kernel size must be in [1, 8]");
    if (num_seqs == 0) return;
    static constexpr decltype(&gdn_split_conv_kernel<1>) kernels[] = {
        gdn_split_conv_kernel<1>, gdn_split_conv_kernel<2>, gdn_split_conv_kernel<3>, gdn_split_conv_kernel<4>,
        gdn_split_conv_kernel<5>, gdn_split_conv_kernel<6>, gdn_split_conv_kernel<7>, gdn_split_conv_kernel<8>};
    const int channels = 2 * shape.nk * shape.dk + shape.nv * shape.dv;
    const int conv_blocks = (channels + kThreads - 1) / kThreads;
    const int z_blocks = std::max(1, (shape.nv * shape.dv + kThreads - 1) / kThreads);
    const dim3 grid(static_cast<unsigned>(conv_blocks + z_blocks), static_cast<unsigned>(num_seqs));
    Q3N_CUDA(launch_pdl(kernels[kernel - 1], grid, dim3(kThreads), 0, stream, proj, proj_stride, ba, ba_stride, shape, weight,
                        seq_starts, state, A_log, dt_bias, conv_blocks, out, z, beta, g));
}

}  // namespace q3n::cuda
