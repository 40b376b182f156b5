// The gated delta rule in recurrent form (spec 3.4 step 5), the decode kernel: each block owns one
// (sequence, value head, 32-column slice of the state) and keeps that slice of S in registers while it
// walks the sequence's tokens, so the fp32 state is read once and written once per call, and the
// decay, the delta-rule update and the output happen in the one pass over it.
//
// Columns of S are independent in this recurrence (u_j, delta_j and o_j read only column j and the
// shared k, q), which is what lets the state split over blocks with no communication between them.
// Inside a block, lane = column (a warp reads 128 contiguous bytes of a state row) and the 8 warps
// split the dk rows; the two dk-long sums (S^T k and S^T q) finish through shared memory.
#include "core/error.h"
#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/gdn_common.cuh"
#include "cuda/next_ops.h"

namespace q3n::cuda {
namespace {

constexpr int kCols = kGdnCols;
constexpr int kRowGroups = kGdnRowGroups;
constexpr int kMaxDk = 512;

// R rows of the state per thread: dk <= R * kRowGroups.
template <int R>
__global__ void __launch_bounds__(kCols * kRowGroups)
    gdn_recurrent_kernel(GdnShape sh, GdnInputs in, float scale, const int32_t* seq_starts, float* const* state,
                         float* out) {
    __shared__ float sq[kMaxDk], sk[kMaxDk];
    __shared__ float red_u[kRowGroups][kCols], red_o[kRowGroups][kCols];
    const int lane = threadIdx.x & 31, rg = threadIdx.x >> 5;
    const int col = blockIdx.x * kCols + lane, h = blockIdx.y, s = blockIdx.z;
    // seq_starts and the state table are uploaded before the step, and only this kernel (of this
    // layer) writes the state: the block's slice of S loads before pdl_wait(), while the kernel
    // before it still runs.
    const int t0 = seq_starts ? seq_starts[s] : s, t1 = seq_starts ? seq_starts[s + 1] : s + 1;
    const int dk = sh.dk, dv = sh.dv, kh = h / (sh.nv / sh.nk);
    const bool col_ok = col < dv && t0 < t1;
    float* S = t0 < t1 ? state[s] + static_cast<size_t>(h) * dk * dv : nullptr;

    float r[R];
    gdn_load_state_rows<R>(r, S, dk, dv, col, col_ok);
    pdl_wait();
    pdl_launch_dependents();
    if (t0 >= t1) return;

    for (int t = t0; t < t1; ++t) {
        __syncthreads();  // the previous token's readers of sq, sk, red_* are done
        if (rg == 0)
            gdn_load_head(in.q + static_cast<size_t>(t) * in.q_stride + kh * dk, dk, in.l2norm, in.l2norm_eps, scale, sq);
        if (rg == 1)
            gdn_load_head(in.k + static_cast<size_t>(t) * in.k_stride + kh * dk, dk, in.l2norm, in.l2norm_eps, 1.0f, sk);
        const float decay = expf(in.g[static_cast<size_t>(t) * sh.nv + h]);
        const float beta = in.beta[static_cast<size_t>(t) * sh.nv + h];
        const float v = col_ok ? in.v[static_cast<size_t>(t) * in.v_stride + h * dv + col] : 0.0f;
        __syncthreads();
        const float o = gdn_recurrent_token<R>(r, sq, sk, dk, decay, beta, v, red_u, red_o);
        if (rg == 0 && col_ok) out[(static_cast<size_t>(t) * sh.nv + h) * dv + col] = o;
    }

    gdn_store_state_rows<R>(r, S, dk, dv, col, col_ok);
}

}  // namespace

void gated_delta_rule_decode(const GdnShape& shape, const GdnInputs& in, float scale, const int32_t* seq_starts,
                             int num_seqs, float* const* state, float* out, cudaStream_t stream) {
    require(shape.nk > 0 && shape.nv > 0 && shape.nv % shape.nk == 0 && shape.dk > 0 && shape.dv > 0 &&
                shape.dk <= kMaxDk,
            Q3N_ERR_INTERNAL, "gated_delta_rule_decode: bad head shape (nv a multiple of nk, dk <= 512)");
    if (num_seqs == 0) return;
    const dim3 grid((shape.dv + kCols - 1) / kCols, shape.nv, num_seqs), block(kCols * kRowGroups);
    const int rows = (shape.dk + kRowGroups - 1) / kRowGroups;
    if (rows <= 4)
        Q3N_CUDA(launch_pdl(gdn_recurrent_kernel<4>, grid, block, 0, stream, shape, in, scale, seq_starts, state, out));
    else if (rows <= 8)
        Q3N_CUDA(launch_pdl(gdn_recurrent_kernel<8>, grid, block, 0, stream, shape, in, scale, seq_starts, state, out));
    else if (rows <= 16)
        Q3N_CUDA(launch_pdl(gdn_recurrent_kernel<16>, grid, block, 0, stream, shape, in, scale, seq_starts, state, out));
    else if (rows <= 32)
        Q3N_CUDA(launch_pdl(gdn_recurrent_kernel<32>, grid, block, 0, stream, shape, in, scale, seq_starts, state, out));
    else
        Q3N_CUDA(launch_pdl(gdn_recurrent_kernel<64>, grid, block, 0, stream, shape, in, scale, seq_starts, state, out));
}

}  // namespace q3n::cuda
