// The gated delta rule in chunked form (spec 3.4 step 5'), the prefill kernel, fp32 throughout.
//
// One block per (sequence, value head, 32-column slice of the state) walks its sequence's chunks of
// 64 tokens in order with its dk x 32 slice of S in shared memory. Every chunk quantity that does not
// involve V or S (G, the decays, M = strict_lower(diag(beta) K K^T . D), T = (I + M)^-1,
// A = lower(Q K^T . D)) is the same for every slice and is recomputed by each slice's block: the
// column split is what lets one block hold a whole head's chunk in shared memory, and those C x C
// products cost less than the C x dk x 32 work each block does anyway.
//
// V' = U - W S is formed as T (diag(beta) (V - diag(exp G) K S)): the same matrix, since
// U = T diag(beta) V and W = T diag(beta exp G) K, but W (C x dk) is never stored, which keeps a
// dk = 256 head within the 227 KB of shared memory. T comes from forward substitution, column by
// column (each column of T solves (I + M) x = e_j on its own), four lanes per column.
#include "core/error.h"
#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/next_ops.h"

namespace q3n::cuda {
namespace {

constexpr int C = 64;         // chunk length, as cpu::kGdnChunk
constexpr int BV = 32;        // state columns per block
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kLdc = C + 1;   // C x C matrices: one pad column against bank conflicts
constexpr int kMaxDk = 256;   // shared memory bound (see chunked_smem_floats)

// Rows of Q and K are dk long with an odd stride, so the 16 different rows a warp reads in the
// K K^T tiles fall in different banks.
__host__ __device__ inline int ld_k(int dk) { return dk % 2 == 0 ? dk + 1 : dk; }

__host__ __device__ inline size_t chunked_smem_floats(int dk) {
    return 2 * static_cast<size_t>(C) * ld_k(dk)   // Q, K
           + static_cast<size_t>(dk) * BV          // S slice
           + 2 * static_cast<size_t>(C) * kLdc     // M (then A), T
           + 2 * static_cast<size_t>(C) * BV       // V (then V'), R
           + 4 * C;                                // G, exp(G), exp(G_last - G), beta
}

// Row i of q or k for this chunk into shared memory by one warp: optionally L2-normalised as
// cpu::l2norm_heads does, then multiplied by post_scale (the query scale); zeros past the chunk.
__device__ __forceinline__ void load_row(const float* src, bool valid, int d, bool l2norm, float eps,
                                         float post_scale, float* dst) {
    const int lane = threadIdx.x & 31;
    float ss = 0.0f;
    for (int x = lane; x < d; x += 32) {
        const float v = valid ? src[x] : 0.0f;
        dst[x] = v;
        ss += v * v;
    }
    const float inv = l2norm ? 1.0f / sqrtf(warp_sum(ss) + eps) : 1.0f;
    if (valid && (l2norm || post_scale != 1.0f))
        for (int x = lane; x < d; x += 32) dst[x] = post_scale * (l2norm ? dst[x] * inv : dst[x]);
}

__global__ void __launch_bounds__(kThreads)
    gdn_chunked_kernel(GdnShape sh, GdnInputs in, float scale, const int32_t* seq_starts, float* const* state,
                       float* out) {
    extern __shared__ float smem[];
    const int dk = sh.dk, dv = sh.dv, ldk = ld_k(dk);
    float* Qs = smem;
    float* Ks = Qs + C * ldk;
    float* Ss = Ks + C * ldk;
    float* Ms = Ss + dk * BV;  // M, then A once T is formed
    float* Ts = Ms + C * kLdc;
    float* Vs = Ts + C * kLdc;  // V, then V'
    float* Rs = Vs + C * BV;
    float* G = Rs + C * BV;
    float* eG = G + C;
    float* fG = eG + C;
    float* bs = fG + C;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int c0 = blockIdx.x * BV, h = blockIdx.y, s = blockIdx.z;
    const int t_begin = seq_starts[s], t_end = seq_starts[s + 1];
    if (t_begin >= t_end) return;
    const int kh = h / (sh.nv / sh.nk);
    const int col = c0 + lane;
    const bool col_ok = col < dv;
    float* S = state[s] + static_cast<size_t>(h) * dk * dv;

    // Thread (warp, lane) owns column `lane` of rows warp, warp + 8, ... of every C x BV and dk x BV
    // tile: a warp touches one row at a time, 32 consecutive floats.
    for (int x = warp; x < dk; x += kWarps) Ss[x * BV + lane] = col_ok ? S[static_cast<size_t>(x) * dv + col] : 0.0f;

    for (int t0 = t_begin; t0 < t_end; t0 += C) {
        const int L = min(C, t_end - t0);
        __syncthreads();  // the previous chunk is finished with every tile

        // ---- Load the chunk; rows past L are zero (k = 0, beta = 0, g = 0 add nothing).
        for (int i = warp; i < C; i += kWarps) {
            const size_t t = static_cast<size_t>(t0 + i);
            load_row(in.q + t * in.q_stride + kh * dk, i < L, dk, in.l2norm, in.l2norm_eps, scale, Qs + i * ldk);
            load_row(in.k + t * in.k_stride + kh * dk, i < L, dk, in.l2norm, in.l2norm_eps, 1.0f, Ks + i * ldk);
            Vs[i * BV + lane] = i < L && col_ok ? in.v[t * in.v_stride + h * dv + col] : 0.0f;
        }
        if (tid < C) {
            const size_t t = static_cast<size_t>(t0 + tid);
            G[tid] = tid < L ? in.g[t * sh.nv + h] : 0.0f;
            bs[tid] = tid < L ? in.beta[t * sh.nv + h] : 0.0f;
        }
        __syncthreads();
        if (tid == 0) {
            float cum = 0.0f;  // sequential, like the CPU op's running sum
            for (int i = 0; i < C; ++i) G[i] = cum += G[i];
        }
        __syncthreads();
        const float g_last = G[L - 1];
        if (tid < C) {
            eG[tid] = expf(G[tid]);
            fG[tid] = tid < L ? expf(g_last - G[tid]) : 0.0f;
        }

        // ---- M = strict_lower(diag(beta) K K^T . D), 4 x 4 entries per thread (rows ti + 16a,
        // columns tj + 16b), and against the entering state: X = K S, O_inter = Q S.
        {
            const int ti = tid >> 4, tj = tid & 15;
            float acc[4][4] = {};
            for (int x = 0; x < dk; ++x) {
                float ki[4], kj[4];
#pragma unroll
                for (int a = 0; a < 4; ++a) ki[a] = Ks[(ti + 16 * a) * ldk + x];
#pragma unroll
                for (int b = 0; b < 4; ++b) kj[b] = Ks[(tj + 16 * b) * ldk + x];
#pragma unroll
                for (int a = 0; a < 4; ++a)
#pragma unroll
                    for (int b = 0; b < 4; ++b) acc[a][b] += ki[a] * kj[b];
            }
#pragma unroll
            for (int a = 0; a < 4; ++a)
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    const int i = ti + 16 * a, j = tj + 16 * b;
                    Ms[i * kLdc + j] = j < i ? bs[i] * acc[a][b] * expf(G[i] - G[j]) : 0.0f;
                }
        }
        __syncthreads();  // eG visible below
        float o_inter[C / kWarps];
#pragma unroll
        for (int m = 0; m < C / kWarps; ++m) {
            const int i = warp + kWarps * m;
            float xs = 0.0f, os = 0.0f;
            for (int x = 0; x < dk; ++x) {
                const float sv = Ss[x * BV + lane];
                xs += Ks[i * ldk + x] * sv;
                os += Qs[i * ldk + x] * sv;
            }
            o_inter[m] = os * eG[i];
            Rs[i * BV + lane] = bs[i] * (Vs[i * BV + lane] - eG[i] * xs);
        }
        __syncthreads();

        // ---- T = (I + M)^-1: T_ij = -sum_{m=j}^{i-1} M_im T_mj, column j by lanes 4j .. 4j+3. Every
        // lane runs every i so the shuffles see the whole warp.
        {
            const int j = tid >> 2, p = tid & 3;
            for (int i = 0; i < C; ++i) {
                float part = 0.0f;
                if (i > j && i < L)
                    for (int m = j + p; m < i; m += 4) part -= Ms[i * kLdc + m] * Ts[m * kLdc + j];
                part += __shfl_xor_sync(0xffffffffu, part, 1);
                part += __shfl_xor_sync(0xffffffffu, part, 2);
                if (p == 0) Ts[i * kLdc + j] = i == j ? 1.0f : (i > j && i < L ? part : 0.0f);
                __syncwarp();
            }
        }
        __syncthreads();

        // ---- A = lower_incl(Q K^T . D) into M's place; V' = T R into V's place.
        {
            const int ti = tid >> 4, tj = tid & 15;
            float acc[4][4] = {};
            for (int x = 0; x < dk; ++x) {
                float qi[4], kj[4];
#pragma unroll
                for (int a = 0; a < 4; ++a) qi[a] = Qs[(ti + 16 * a) * ldk + x];
#pragma unroll
                for (int b = 0; b < 4; ++b) kj[b] = Ks[(tj + 16 * b) * ldk + x];
#pragma unroll
                for (int a = 0; a < 4; ++a)
#pragma unroll
                    for (int b = 0; b < 4; ++b) acc[a][b] += qi[a] * kj[b];
            }
#pragma unroll
            for (int a = 0; a < 4; ++a)
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    const int i = ti + 16 * a, j = tj + 16 * b;
                    Ms[i * kLdc + j] = j <= i ? acc[a][b] * expf(G[i] - G[j]) : 0.0f;
                }
        }
#pragma unroll
        for (int m = 0; m < C / kWarps; ++m) {
            const int i = warp + kWarps * m;
            float acc = 0.0f;
            for (int j = 0; j <= i; ++j) acc += Ts[i * kLdc + j] * Rs[j * BV + lane];
            Vs[i * BV + lane] = acc;
        }
        __syncthreads();

        // ---- O = diag(exp G) Q S + A V' for the chunk's rows; then
        // S <- exp(G_last) S + (diag(exp(G_last - G)) K)^T V'.
#pragma unroll
        for (int m = 0; m < C / kWarps; ++m) {
            const int i = warp + kWarps * m;
            if (i < L && col_ok) {
                float acc = o_inter[m];
                for (int j = 0; j <= i; ++j) acc += Ms[i * kLdc + j] * Vs[j * BV + lane];
                out[(static_cast<size_t>(t0 + i) * sh.nv + h) * dv + col] = acc;
            }
        }
        const float decay = expf(g_last);
        for (int x = warp; x < dk; x += kWarps) {
            float acc = Ss[x * BV + lane] * decay;
            for (int i = 0; i < L; ++i) acc += (fG[i] * Ks[i * ldk + x]) * Vs[i * BV + lane];
            Ss[x * BV + lane] = acc;
        }
    }

    __syncthreads();
    if (col_ok)
        for (int x = warp; x < dk; x += kWarps) S[static_cast<size_t>(x) * dv + col] = Ss[x * BV + lane];
}

}  // namespace

void gated_delta_rule_chunked(const GdnShape& shape, const GdnInputs& in, float scale, const int32_t* seq_starts,
                              int num_seqs, float* const* state, float* out, cudaStream_t stream) {
    require(shape.nk > 0 && shape.nv > 0 && shape.nv % shape.nk == 0 && shape.dk > 0 && shape.dv > 0 &&
                shape.dk <= kMaxDk,
            Q3N_ERR_INTERNAL, "gated_delta_rule_chunked: bad head shape (nv a multiple of nk, dk <= 256)");
    if (num_seqs == 0) return;
    const size_t bytes = chunked_smem_floats(shape.dk) * sizeof(float);
    Q3N_CUDA(cudaFuncSetAttribute(gdn_chunked_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(bytes)));
    const dim3 grid((shape.dv + BV - 1) / BV, shape.nv, num_seqs);
    gdn_chunked_kernel<<<grid, kThreads, bytes, stream>>>(shape, in, scale, seq_starts, state, out);
    Q3N_CUDA_LAUNCHED("gated_delta_rule_chunked");
}

}  // namespace q3n::cuda
