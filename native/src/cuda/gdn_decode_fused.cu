// A Gated DeltaNet decode step after in_proj in one launch (next_ops.h): the causal conv, the gates,
// q/k L2 norms, the delta rule and the gated output norm with its FP8 quantisation. At decode these
// were three launches (gdn_split_conv, gated_delta_rule_decode, rmsnorm_gated_quantize) of a few
// microseconds each, mostly launch, wait and drain (H100, Qwen3-Next: 3.5 + 4.2 + 3.8 us a layer).
//
// The recurrent kernel's blocks (one per value head and 32-column slice of the state) stay, and
// each now computes its own inputs: the conv of its key head's q and k channels (every block that
// reads them; cheaper than a barrier to share them), of its 32 v channels, and its head's gates.
// The blocks of a key head (its r value heads times their slices: 2 x 4 = 8 for Qwen3-Next) form a
// thread block cluster. After the delta rule each slice pushes its 32 outputs into its head's first
// block; one cluster barrier later that block norms, gates and quantises the head with one warp, the
// way the per-head norm kernel does. The same barrier orders the carried conv state: each q/k
// channel's new state is written by one block of the cluster, after every block has read the old.
//
// Every value comes from the same expressions, in the same order, as in the three kernels
// (gdn_common.cuh holds them), so outputs and carried states are theirs bit for bit
// (test_cuda_next_model.cu compares them).
//
// Measured (bench_cuda_next_ops, Qwen3-Next shapes, states from DRAM): one sequence 7.6 -> 5.7 us on
// the H200 (8.1 -> 5.9 on the H100). Inside a decode step the gain is smaller: the blocks cannot
// start, and load their state, until in_proj's GEMV leaves the SMs, where the recurrent kernel used
// to load it while the conv ran. H100 timelines of Qwen3-Next-4L: the layer's GDN work ends 1.7 us
// sooner after in_proj (10.2 -> 8.5 us) and out_proj 0.6 us sooner (14.9 -> 14.3), within the
// noise of whole-step tokens/s. With 2 or more sequences it is slower (two blocks an SM at 128
// registers, clusters of 8: 2 sequences 9.4 -> 11.4 us), so the runner keeps it to one.
#include <cooperative_groups.h>

#include "core/error.h"
#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/gdn_common.cuh"
#include "cuda/next_ops.h"

namespace q3n::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = kGdnCols * kGdnRowGroups;
constexpr int kMaxDk = 128;
constexpr int kMaxCluster = 8;
constexpr int kMaxDv = kMaxCluster * kGdnCols;
constexpr int kMaxConvTaps = 4;

struct FusedParams {
    const float* proj;  // in_proj_qkvz rows, proj_stride floats apart
    int proj_stride;
    const float* ba;  // in_proj_ba rows
    int ba_stride;
    GdnShape sh;
    const float* A_log;
    const float* dt_bias;
    const float* conv_weight;
    const float* norm_weight;
    float norm_eps;
    float l2norm_eps;
    float scale;
    const int32_t* seq_starts;
    float* const* conv_state;
    float* const* state;
    float* y;
    float* q;
    float* scales;
};

int cluster_size(const GdnShape& sh) { return sh.nv / sh.nk * ((sh.dv + kGdnCols - 1) / kGdnCols); }

// Grid (cluster, key heads, sequences); cluster rank = blockIdx.x. Block x serves value head
// kh r + x / slices, columns 32 (x % slices) .. + 31.
template <int R, int K>
__global__ void __launch_bounds__(kThreads, 2) gdn_decode_fused_kernel(FusedParams P) {
    __shared__ float qk_raw[2 * kMaxDk];  // the key head's conv outputs q | k
    __shared__ float head_out[2][kMaxDv];  // first block of a head: its slices' outputs, by token parity
    __shared__ float z_head[2][kMaxDv];    // first block of a head: its z, by parity
    __shared__ float norm_w[kMaxDv];
    __shared__ float sq[kMaxDk], sk[kMaxDk], v_cols[kGdnCols];
    __shared__ float red_u[kGdnRowGroups][kGdnCols], red_o[kGdnRowGroups][kGdnCols];
    const cg::cluster_group cluster = cg::this_cluster();
    const GdnShape& sh = P.sh;
    const int tid = threadIdx.x, lane = tid & 31, rg = tid >> 5;
    const int cs = gridDim.x, rank = blockIdx.x, kh = blockIdx.y, s = blockIdx.z;
    const int dk = sh.dk, dv = sh.dv, r = sh.nv / sh.nk, slices = (dv + kGdnCols - 1) / kGdnCols;
    const int h = kh * r + rank / slices, slice = rank % slices, col = slice * kGdnCols + lane;
    const int key_dim = sh.nk * dk, n_v = min(kGdnCols, dv - slice * kGdnCols);

    // The block's conv channels: all 2 dk of its key head's q | k (every block of the cluster
    // computes them: cheaper than a cluster barrier to share them), then its own v columns; thread
    // tid takes entries tid and tid + kThreads of that list. The carried conv state of q | k entry j
    // is written by rank j % cs alone, after the cluster's last barrier, which every block reaches
    // only after reading that state.
    ConvChannel<K> conv[2];
    int source[2];
    float* conv_state[2];
    const int t0 = P.seq_starts[s], t1 = P.seq_starts[s + 1];
    const bool live = t0 < t1, col_ok = live && col < dv;
    bool owner[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int j = tid + e * kThreads;
        int channel = -1;
        if (j < 2 * dk) channel = j < dk ? kh * dk + j : key_dim + kh * dk + (j - dk);
        else if (j - 2 * dk < n_v) channel = 2 * key_dim + h * dv + slice * kGdnCols + (j - 2 * dk);
        owner[e] = channel >= 0 && (j >= 2 * dk || j % cs == rank);
        source[e] = channel >= 0 ? gdn_conv_source(channel, sh) : -1;
        // seq_starts and the state tables are uploaded before the step, and only this kernel (of
        // this layer) writes the carried states: conv weights and states, the delta-rule state and
        // the norm weight load before pdl_wait(), while the in_proj GEMV still runs.
        conv_state[e] = live && channel >= 0 ? P.conv_state[s] + static_cast<size_t>(channel) * (K - 1) : nullptr;
        if (conv_state[e]) conv[e].load(P.conv_weight, channel, conv_state[e]);
    }
    const float A_log_h = P.A_log[h], dt_bias_h = P.dt_bias[h];
    if (slice == 0)
        for (int i = tid; i < dv; i += kThreads) norm_w[i] = P.norm_weight[i];
    float* S = live ? P.state[s] + static_cast<size_t>(h) * dk * dv : nullptr;
    float st[R];
    gdn_load_state_rows<R>(st, S, dk, dv, col, col_ok);
    pdl_wait();
    pdl_launch_dependents();
    if (!live) return;  // the whole cluster: its blocks share the sequence

    const int b_source = gdn_b_source(h, sh), a_source = gdn_a_source(h, sh), z_source = gdn_z_source(h, sh);
    const int head_first = rank - slice;  // cluster rank of the head's first block
    const int groups = sh.nv * dv / 128;
    for (int t = t0; t < t1; ++t) {
        // The double buffers are written again only two tokens on, after a cluster barrier their
        // reader must have passed.
        const int buf = (t - t0) & 1;
        const float* row = P.proj + static_cast<size_t>(t) * P.proj_stride;
        if (slice == 0 && tid < dv) z_head[buf][tid] = row[z_source + tid];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            if (source[e] < 0) continue;
            const int j = tid + e * kThreads;
            const float x = conv[e].step(row[source[e]]);
            if (j < 2 * dk) qk_raw[j] = x;
            else v_cols[j - 2 * dk] = x;
        }
        const float* ba_row = P.ba + static_cast<size_t>(t) * P.ba_stride;
        float beta, g;
        gdn_gate_values(ba_row[b_source], ba_row[a_source], A_log_h, dt_bias_h, beta, g);
        const float decay = expf(g);
        __syncthreads();

        if (rg == 0) gdn_load_head(qk_raw, dk, true, P.l2norm_eps, P.scale, sq);
        if (rg == 1) gdn_load_head(qk_raw + dk, dk, true, P.l2norm_eps, 1.0f, sk);
        __syncthreads();
        const float v = col_ok ? v_cols[lane] : 0.0f;
        const float o = gdn_recurrent_token<R>(st, sq, sk, dk, decay, beta, v, red_u, red_o);
        if (rg == 0 && col_ok) *cluster.map_shared_rank(&head_out[buf][col], head_first) = o;
        cluster.sync();  // the head's outputs are with its first block; no block reads another's memory after this

        if (slice == 0 && rg == 0) {
            const size_t head = (static_cast<size_t>(t) * sh.nv + h) * dv;
            gated_norm_head_warp(head_out[buf], z_head[buf], norm_w, dv, P.norm_eps, P.y + head,
                                 P.q ? P.q + head : nullptr,
                                 P.q ? P.scales + static_cast<size_t>(t) * groups + h * dv / 128 : nullptr);
        }
    }

#pragma unroll
    for (int e = 0; e < 2; ++e)
        if (owner[e] && conv_state[e]) conv[e].store(conv_state[e]);
    gdn_store_state_rows<R>(st, S, dk, dv, col, col_ok);
}

using FusedKernel = void (*)(FusedParams);

template <int R>
FusedKernel pick_taps(int kernel) {
    static constexpr FusedKernel kernels[kMaxConvTaps] = {gdn_decode_fused_kernel<R, 1>, gdn_decode_fused_kernel<R, 2>,
                                                          gdn_decode_fused_kernel<R, 3>, gdn_decode_fused_kernel<R, 4>};
    return kernels[kernel - 1];
}

}  // namespace

bool gdn_decode_fusable(const GdnShape& shape, int kernel, bool quantize) {
    if (shape.nk <= 0 || shape.nv <= 0 || shape.nv % shape.nk != 0 || shape.dk <= 0 || shape.dv <= 0) return false;
    if (shape.dk > kMaxDk || kernel < 1 || kernel > kMaxConvTaps) return false;
    if (quantize && shape.dv % 128 != 0) return false;  // quantisation groups must lie inside a head
    return cluster_size(shape) <= kMaxCluster;
}

void gdn_decode_fused(const float* proj, int proj_stride, const float* ba, int ba_stride, const GdnShape& shape,
                      const float* A_log, const float* dt_bias, const float* conv_weight, int kernel,
                      const float* norm_weight, float norm_eps, float l2norm_eps, float scale, const int32_t* seq_starts,
                      int num_seqs, float* const* conv_state, float* const* state, float* y, float* q, float* scales,
                      cudaStream_t stream) {
    require(gdn_decode_fusable(shape, kernel, q != nullptr), Q3N_ERR_INTERNAL,
            "gdn_decode_fused: shape outside gdn_decode_fusable");
    if (num_seqs == 0) return;
    const FusedParams params{proj,        proj_stride, ba,       ba_stride,  shape, A_log,      dt_bias,
                             conv_weight, norm_weight, norm_eps, l2norm_eps, scale, seq_starts, conv_state,
                             state,       y,           q,        scales};
    const int cluster = cluster_size(shape);
    const dim3 grid(static_cast<unsigned>(cluster), static_cast<unsigned>(shape.nk), static_cast<unsigned>(num_seqs));
    const int rows = (shape.dk + kGdnRowGroups - 1) / kGdnRowGroups;
    const auto k = rows <= 4 ? pick_taps<4>(kernel) : rows <= 8 ? pick_taps<8>(kernel) : pick_taps<16>(kernel);
    Q3N_CUDA(launch_pdl_cluster(k, grid, dim3(kThreads), 0, stream, static_cast<unsigned>(cluster), params));
}

}  // namespace q3n::cuda
