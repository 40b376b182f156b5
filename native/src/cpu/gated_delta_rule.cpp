// The gated delta rule (spec 3.4 steps 3 and 5/5'), fp32 state [nv, dk, dv] per sequence.
//
// Recurrent form, per value head, token by token (HF torch_recurrent_gated_delta_rule, FLA
// fused_recurrent, vLLM's decode kernel):
//   S <- exp(g_t) S;   u = S^T k_t;   delta = beta_t (v_t - u);   S <- S + k_t delta^T;   o_t = S^T q_t
// with q_t already L2-normalised and multiplied by scale = dk^-0.5, and k_t L2-normalised.
//
// Chunked form (HF torch_chunk_gated_delta_rule, FLA chunk_gated_delta_rule), per chunk of C rows
// with S the state entering the chunk and G the inclusive cumsum of g inside the chunk:
//   D_ij = exp(G_i - G_j) (i >= j);  M = strict_lower(diag(beta) K K^T . D);  T = (I + M)^-1
//   U = T diag(beta) V;   W = T diag(beta exp(G)) K;   A = lower_incl(Q K^T . D)
//   V' = U - W S;   O = diag(exp(G)) Q S + A V';   S <- exp(G_last) S + (diag(exp(G_last - G)) K)^T V'
// Every exponent above is <= 0 (g <= 0, G non-increasing), so no factor can overflow; this is why
// the form is written with differences of G rather than exp(-G). A short last chunk is processed
// with its L rows only: the spec's zero padding adds rows with k = 0 and g = 0, which contribute
// nothing to S or G_last, so the result is the same.
//
// Value head h reads q/k head h / (nv / nk) (repeat_interleave in HF), without copying them.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "cpu/next_ops.h"
#include "cpu/simd.h"

namespace q3n::cpu {
namespace {

inline float dot(const float* a, const float* b, size_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (size_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
}

// y += a * x
inline void axpy(float* y, float a, const float* x, size_t n) {
#pragma omp simd
    for (size_t i = 0; i < n; ++i) y[i] += a * x[i];
}

inline void scale_row(float* y, float a, size_t n) {
#pragma omp simd
    for (size_t i = 0; i < n; ++i) y[i] *= a;
}

void check_shape(const GdnShape& s) {
    require(s.nk > 0 && s.nv > 0 && s.dk > 0 && s.dv > 0 && s.nv % s.nk == 0, Q3N_ERR_INTERNAL,
            "gated delta rule: value heads must be a positive multiple of key heads");
}

// One value head of one sequence, tokens [t0, t1). Two passes over S per token: the first decays S
// and forms the prediction u = S^T k, the second applies the rank-1 update and reads o = S^T q from
// the updated rows while they are still in cache.
Q3N_MULTIVERSION
void recurrent_head(const GdnShape& sh, const GdnInputs& in, float scale, size_t t0, size_t t1, size_t h, float* S,
                    float* out, float* u, float* delta) {
    const size_t dk = sh.dk, dv = sh.dv, kh = h / (sh.nv / sh.nk);
    for (size_t t = t0; t < t1; ++t) {
        const float* q = in.q + t * in.q_stride + kh * dk;
        const float* k = in.k + t * in.k_stride + kh * dk;
        const float* v = in.v + t * in.v_stride + h * dv;
        const float decay = std::exp(in.g[t * sh.nv + h]);
        const float beta = in.beta[t * sh.nv + h];
        for (size_t j = 0; j < dv; ++j) u[j] = 0.0f;
        for (size_t i = 0; i < dk; ++i) {
            float* row = S + i * dv;
            scale_row(row, decay, dv);
            axpy(u, k[i], row, dv);
        }
#pragma omp simd
        for (size_t j = 0; j < dv; ++j) delta[j] = beta * (v[j] - u[j]);
        float* o = out + (t * sh.nv + h) * dv;
        for (size_t j = 0; j < dv; ++j) o[j] = 0.0f;
        for (size_t i = 0; i < dk; ++i) {
            float* row = S + i * dv;
            axpy(row, k[i], delta, dv);
            axpy(o, scale * q[i], row, dv);
        }
    }
}

// Per-thread scratch for one chunk; sized once per call.
struct ChunkScratch {
    std::vector<float> Q, K, V, G, beta, KK, Tm, A, U, W, Vp;
    void resize(size_t dk, size_t dv) {
        constexpr size_t C = kGdnChunk;
        Q.resize(C * dk);
        K.resize(C * dk);
        V.resize(C * dv);
        G.resize(C);
        beta.resize(C);
        KK.resize(C * C);
        Tm.resize(C * C);
        A.resize(C * C);
        U.resize(C * dv);
        W.resize(C * dk);
        Vp.resize(C * dv);
    }
};

// One value head of one sequence, tokens [t0, t1), chunk by chunk.
Q3N_MULTIVERSION
void chunked_head(const GdnShape& sh, const GdnInputs& in, float scale, size_t t0, size_t t1, size_t h, float* S,
                  float* out, ChunkScratch& w) {
    constexpr size_t C = kGdnChunk;
    const size_t dk = sh.dk, dv = sh.dv, kh = h / (sh.nv / sh.nk);
    float *Q = w.Q.data(), *K = w.K.data(), *V = w.V.data(), *G = w.G.data(), *beta = w.beta.data();
    float *M = w.KK.data(), *Tm = w.Tm.data(), *A = w.A.data(), *U = w.U.data(), *W = w.W.data(), *Vp = w.Vp.data();

    for (size_t c0 = t0; c0 < t1; c0 += C) {
        const size_t L = std::min(C, t1 - c0);
        float cum = 0.0f;
        for (size_t i = 0; i < L; ++i) {
            const size_t t = c0 + i;
            const float* q = in.q + t * in.q_stride + kh * dk;
            const float* k = in.k + t * in.k_stride + kh * dk;
            const float* v = in.v + t * in.v_stride + h * dv;
            for (size_t x = 0; x < dk; ++x) Q[i * dk + x] = scale * q[x];
            for (size_t x = 0; x < dk; ++x) K[i * dk + x] = k[x];
            for (size_t x = 0; x < dv; ++x) V[i * dv + x] = v[x];
            cum += in.g[t * sh.nv + h];
            G[i] = cum;
            beta[i] = in.beta[t * sh.nv + h];
        }

        // M (strict lower) and A (lower, diagonal included), both carrying the decay D_ij.
        for (size_t i = 0; i < L; ++i) {
            for (size_t j = 0; j <= i; ++j) {
                const float d = std::exp(G[i] - G[j]);
                A[i * C + j] = dot(Q + i * dk, K + j * dk, dk) * d;
                if (j < i) M[i * C + j] = beta[i] * dot(K + i * dk, K + j * dk, dk) * d;
            }
        }

        // T = (I + M)^-1 by forward substitution, row by row (the UT transform):
        //   T_ii = 1,  T_ij = -sum_{m=j}^{i-1} M_im T_mj  for j < i.
        // T is formed explicitly, as the GPU kernels do, and then applied to two right-hand sides.
        for (size_t i = 0; i < L; ++i) {
            float* Ti = Tm + i * C;
            for (size_t j = 0; j < L; ++j) Ti[j] = 0.0f;
            for (size_t m = 0; m < i; ++m) {
                const float mim = M[i * C + m];
                const float* Tmr = Tm + m * C;
                for (size_t j = 0; j <= m; ++j) Ti[j] -= mim * Tmr[j];
            }
            Ti[i] = 1.0f;
        }

        // U = T diag(beta) V,  W = T diag(beta exp(G)) K.
        for (size_t i = 0; i < L; ++i) {
            float* Ui = U + i * dv;
            float* Wi = W + i * dk;
            for (size_t x = 0; x < dv; ++x) Ui[x] = 0.0f;
            for (size_t x = 0; x < dk; ++x) Wi[x] = 0.0f;
            for (size_t j = 0; j <= i; ++j) {
                const float tij = Tm[i * C + j];
                axpy(Ui, tij * beta[j], V + j * dv, dv);
                axpy(Wi, tij * (beta[j] * std::exp(G[j])), K + j * dk, dk);
            }
        }

        // V' = U - W S and O = diag(exp(G)) Q S + A V', both against the entering state.
        for (size_t i = 0; i < L; ++i) {
            float* Vpi = Vp + i * dv;
            float* o = out + ((c0 + i) * sh.nv + h) * dv;
            for (size_t x = 0; x < dv; ++x) {
                Vpi[x] = U[i * dv + x];
                o[x] = 0.0f;
            }
            for (size_t r = 0; r < dk; ++r) {
                const float* Sr = S + r * dv;
                axpy(Vpi, -W[i * dk + r], Sr, dv);
                axpy(o, Q[i * dk + r], Sr, dv);
            }
            scale_row(o, std::exp(G[i]), dv);
        }
        for (size_t i = 0; i < L; ++i) {
            float* o = out + ((c0 + i) * sh.nv + h) * dv;
            for (size_t j = 0; j <= i; ++j) axpy(o, A[i * C + j], Vp + j * dv, dv);
        }

        // S <- exp(G_last) S + sum_i exp(G_last - G_i) k_i V'_i^T.
        const float glast = G[L - 1];
        for (size_t i = 0; i < L; ++i) {
            const float f = std::exp(glast - G[i]);
            for (size_t x = 0; x < dk; ++x) K[i * dk + x] *= f;
        }
        const float decay = std::exp(glast);
        for (size_t r = 0; r < dk; ++r) {
            float* Sr = S + r * dv;
            scale_row(Sr, decay, dv);
            for (size_t i = 0; i < L; ++i) axpy(Sr, K[i * dk + r], Vp + i * dv, dv);
        }
    }
}

}  // namespace

void gdn_gates(const float* b, const float* a, const float* A_log, const float* dt_bias, size_t tokens, size_t nv,
               float* beta, float* g) {
    for (size_t t = 0; t < tokens; ++t) {
        for (size_t h = 0; h < nv; ++h) {
            const size_t i = t * nv + h;
            beta[i] = 1.0f / (1.0f + std::exp(-b[i]));
            // PyTorch's softplus (threshold 20): above it log1p(exp(x)) equals x in fp32 anyway, and
            // below it log1p keeps precision for very negative x where exp(x) is tiny.
            const float x = a[i] + dt_bias[h];
            const float sp = x > 20.0f ? x : std::log1p(std::exp(x));
            g[i] = -std::exp(A_log[h]) * sp;
        }
    }
}

void gated_delta_rule_recurrent(const GdnShape& shape, const GdnInputs& in, float scale, const size_t* seq_starts,
                                size_t num_seqs, float* const* state, float* out, ThreadPool& pool) {
    check_shape(shape);
    pool.parallel_for(num_seqs * shape.nv, [&](size_t begin, size_t end) {
        thread_local std::vector<float> u, delta;
        u.resize(shape.dv);
        delta.resize(shape.dv);
        for (size_t item = begin; item < end; ++item) {
            const size_t s = item / shape.nv, h = item % shape.nv;
            recurrent_head(shape, in, scale, seq_starts[s], seq_starts[s + 1], h,
                           state[s] + h * shape.dk * shape.dv, out, u.data(), delta.data());
        }
    }, 1);
}

void gated_delta_rule_chunked(const GdnShape& shape, const GdnInputs& in, float scale, const size_t* seq_starts,
                              size_t num_seqs, float* const* state, float* out, ThreadPool& pool) {
    check_shape(shape);
    pool.parallel_for(num_seqs * shape.nv, [&](size_t begin, size_t end) {
        thread_local ChunkScratch scratch;
        scratch.resize(shape.dk, shape.dv);
        for (size_t item = begin; item < end; ++item) {
            const size_t s = item / shape.nv, h = item % shape.nv;
            chunked_head(shape, in, scale, seq_starts[s], seq_starts[s + 1], h, state[s] + h * shape.dk * shape.dv,
                         out, scratch);
        }
    }, 1);
}

}  // namespace q3n::cpu
