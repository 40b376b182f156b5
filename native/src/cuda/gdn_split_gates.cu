// The Gated DeltaNet's input projections taken apart (spec 3.4 step 1) and its gates (step 3) in one
// pass per token: the fused projections keep the checkpoint's per-key-head interleave (so FP8 scale
// blocks never move) and this kernel writes the conv's channel order, z, beta and the log-decay g.
// Blocks of kChunk source elements per token (grid y), so a decode step's single token is spread over
// the GPU rather than one block (12,288 elements a token at the 80B config: 14.5 us in one block on an
// H100, a launch's cost in twelve); the first chunk's block also writes the token's gates. The copies
// are coalesced on the read side (source order).
#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/gdn_common.cuh"
#include "cuda/next_ops.h"

namespace q3n::cuda {
namespace {

constexpr int kChunk = 1024;

__global__ void gdn_split_gates_kernel(const float* proj, int proj_stride, const float* ba, int ba_stride, GdnShape sh,
                                       const float* A_log, const float* dt_bias, float* qkv, float* z, float* beta,
                                       float* g) {
    const int t = blockIdx.x;
    const int r = sh.nv / sh.nk, rdv = r * sh.dv, gw = 2 * sh.dk + 2 * rdv;
    const int key_dim = sh.nk * sh.dk, conv = 2 * key_dim + sh.nv * sh.dv, width = sh.nk * gw;
    const float* src = proj + static_cast<size_t>(t) * proj_stride;
    float* q = qkv + static_cast<size_t>(t) * conv;
    float* k = q + key_dim;
    float* v = k + key_dim;
    float* zt = z + static_cast<size_t>(t) * sh.nv * sh.dv;
    const int end = min(width, (static_cast<int>(blockIdx.y) + 1) * kChunk);
    for (int i = blockIdx.y * kChunk + threadIdx.x; i < end; i += blockDim.x) {
        const int grp = i / gw, off = i % gw;
        const float x = src[i];
        if (off < sh.dk)
            q[grp * sh.dk + off] = x;
        else if (off < 2 * sh.dk)
            k[grp * sh.dk + off - sh.dk] = x;
        else if (off < 2 * sh.dk + rdv)
            v[grp * rdv + off - 2 * sh.dk] = x;
        else
            zt[grp * rdv + off - 2 * sh.dk - rdv] = x;
    }
    if (blockIdx.y != 0) return;
    const size_t row = static_cast<size_t>(t) * sh.nv;
    gdn_token_gates(ba + static_cast<size_t>(t) * ba_stride, sh, A_log, dt_bias, beta + row, g + row, threadIdx.x,
                    blockDim.x);
}

}  // namespace

void gdn_split_gates(const float* proj, int proj_stride, const float* ba, int ba_stride, int tokens,
                     const GdnShape& shape, const float* A_log, const float* dt_bias, float* qkv, float* z, float* beta,
                     float* g, cudaStream_t stream) {
    if (tokens == 0) return;
    const int width = shape.nk * (2 * shape.dk + 2 * (shape.nv / shape.nk) * shape.dv);
    const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>((width + kChunk - 1) / kChunk));
    gdn_split_gates_kernel<<<grid, 256, 0, stream>>>(proj, proj_stride, ba, ba_stride, shape, A_log, dt_bias, qkv, z,
                                                       beta, g);
    Q3N_CUDA_LAUNCHED("gdn_split_gates");
}

}  // namespace q3n::cuda
