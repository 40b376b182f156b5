// The Qwen3-Next CPU kernels (shared/spec section 3) against naive double-precision references
// written from the spec's formulas, on odd sizes (T in {1, 15, 63, 64, 65, 300}, head dims 100 and
// 128), with state carried across calls; plus the layout functions against hand-built examples.
//
// Tolerances (relative Frobenius error over a whole tensor unless stated):
//   - Norms and gates: one fp32 reduction of n <= 2048 terms and a few roundings per element:
//     1e-5 relative, as in test_cpu_ops.
//   - Delta rule vs the double reference: each token's update is a dk- or dv-term fp32 dot product
//     (~sqrt(128) * 6e-8 ~ 1e-6 relative), and the error of S is carried forward; the recurrence is
//     non-expanding (|k| = 1, 0 < beta < 1, exp(g) <= 1 make each step's map I - beta k k^T times a
//     decay, of norm <= 1), so errors add at worst linearly in T and in practice like sqrt(T).
//     Measured: at most 1.6e-6 (states, T = 300 with almost no decay), outputs at most 6e-7; the
//     bound used is 1e-5, about 6x the worst case seen, for other ISAs' summation orders.
//   - Chunked vs recurrent: two such fp32 errors against each other; same measurements, same bound.
//   - Conv: a K-term fp32 sum and the silu per output (measured 8e-8): 1e-6.
//   - Where two runs perform identical arithmetic (recurrent split into several calls, packed vs
//     one-by-one, conv prefill vs decode) the results must be bitwise equal: each (sequence, head)
//     or (sequence, channel) is computed by the same code in the same order regardless of how the
//     tokens are split or which thread runs it.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/thread_pool.h"
#include "cpu/next_ops.h"
#include "cpu/ops.h"
#include "model/qwen3_next_layout.h"

using namespace q3n;

namespace {

std::vector<float> randn(size_t n, uint32_t seed, float scale = 1.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> d(0.0f, scale);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return v;
}

std::vector<float> uniform(size_t n, uint32_t seed, float lo, float hi) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> d(lo, hi);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return v;
}

double rel_err(const std::vector<float>& a, const std::vector<double>& b) {
    EXPECT_EQ(a.size(), b.size());
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += b[i] * b[i];
    }
    return std::sqrt(num / std::max(den, 1e-300));
}

double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
    return rel_err(a, std::vector<double>(b.begin(), b.end()));
}

ThreadPool& pool() {
    static ThreadPool p(3);  // more workers than cores on CI: exercises the splitting
    return p;
}

double silu(double x) { return x / (1.0 + std::exp(-x)); }
double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
double softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }

// ---- Norms ---------------------------------------------------------------------------------------

TEST(NextNorms, ZeroCentredRmsNormUsesOnePlusWeight) {
    for (size_t n : {1u, 7u, 100u, 2048u}) {
        const size_t rows = 5;
        auto x = randn(rows * n, 1 + n), w = randn(n, 2 + n, 0.1f);
        std::vector<float> y(rows * n);
        cpu::rmsnorm_1p(x.data(), w.data(), y.data(), rows, n, 1e-6f, pool());
        std::vector<double> ref(rows * n);
        for (size_t r = 0; r < rows; ++r) {
            double ss = 0;
            for (size_t i = 0; i < n; ++i) ss += double(x[r * n + i]) * x[r * n + i];
            const double inv = 1.0 / std::sqrt(ss / n + 1e-6);
            for (size_t i = 0; i < n; ++i) ref[r * n + i] = x[r * n + i] * inv * (1.0 + w[i]);
        }
        EXPECT_LT(rel_err(y, ref), 1e-5) << n;
        // In place gives the same bits.
        auto z = x;
        cpu::rmsnorm_1p(z.data(), w.data(), z.data(), rows, n, 1e-6f, pool());
        EXPECT_EQ(z, y);
    }
    // The stored zeros of a fresh checkpoint mean "no scaling": same as the plain norm with ones.
    const size_t n = 64;
    auto x = randn(3 * n, 5);
    std::vector<float> zeros(n, 0.0f), ones(n, 1.0f), a(3 * n), b(3 * n);
    cpu::rmsnorm_1p(x.data(), zeros.data(), a.data(), 3, n, 1e-6f, pool());
    cpu::rmsnorm(x.data(), ones.data(), b.data(), 3, n, 1e-6f, pool());
    EXPECT_LT(rel_err(a, b), 1e-6);
}

TEST(NextNorms, GatedRmsNormIsPlainWeightThenSiluGate) {
    const size_t n = 100, rows = 2 * 7;  // e.g. 2 tokens x 7 value heads of dv = 100
    auto x = randn(rows * n, 21), z = randn(rows * n, 22, 2.0f), w = uniform(n, 23, 0.5f, 1.5f);
    std::vector<float> y(rows * n);
    cpu::rmsnorm_gated(x.data(), z.data(), w.data(), y.data(), rows, n, 1e-6f, pool());
    std::vector<double> ref(rows * n);
    for (size_t r = 0; r < rows; ++r) {
        double ss = 0;
        for (size_t i = 0; i < n; ++i) ss += double(x[r * n + i]) * x[r * n + i];
        const double inv = 1.0 / std::sqrt(ss / n + 1e-6);
        for (size_t i = 0; i < n; ++i) ref[r * n + i] = w[i] * (x[r * n + i] * inv) * silu(z[r * n + i]);
    }
    EXPECT_LT(rel_err(y, ref), 1e-5);
    auto inplace = x;
    cpu::rmsnorm_gated(inplace.data(), z.data(), w.data(), inplace.data(), rows, n, 1e-6f, pool());
    EXPECT_EQ(inplace, y);
}

TEST(NextNorms, L2NormHeadsInsideStridedRows) {
    // q and k heads in the first 2 * 3 * 100 values of rows 700 wide; the rest must stay untouched.
    const size_t T = 4, heads = 6, d = 100, stride = 700;
    auto x = randn(T * stride, 31, 3.0f);
    auto y = x;
    cpu::l2norm_heads(y.data(), T, heads, d, stride, 1e-6f, pool());
    for (size_t t = 0; t < T; ++t) {
        for (size_t h = 0; h < heads; ++h) {
            double ss = 0;
            for (size_t i = 0; i < d; ++i) ss += double(x[t * stride + h * d + i]) * x[t * stride + h * d + i];
            const double inv = 1.0 / std::sqrt(ss + 1e-6);
            for (size_t i = 0; i < d; ++i)
                EXPECT_NEAR(y[t * stride + h * d + i], x[t * stride + h * d + i] * inv, 1e-6);
        }
        for (size_t i = heads * d; i < stride; ++i) ASSERT_EQ(y[t * stride + i], x[t * stride + i]);
    }
    // eps is inside the root: a zero vector stays zero (no division by zero).
    std::vector<float> zero(d, 0.0f);
    cpu::l2norm_heads(zero.data(), 1, 1, d, d, 1e-6f, pool());
    for (float v : zero) EXPECT_EQ(v, 0.0f);
}

// ---- Gates ---------------------------------------------------------------------------------------

TEST(DeltaRule, GatesMatchSpec) {
    const size_t T = 9, nv = 6;
    auto b = randn(T * nv, 41, 3.0f), a = randn(T * nv, 42, 3.0f);
    std::vector<float> A_log = {-4.0f, -0.5f, 0.0f, 1.0f, 2.7f, 0.3f};
    std::vector<float> dt_bias = {0.5f, -1.0f, 25.0f, -30.0f, 1.0f, 19.5f};  // crosses softplus' threshold
    a[0 * nv + 5] = 0.6f;  // 20.1 after the bias: the linear branch
    std::vector<float> beta(T * nv), g(T * nv);
    cpu::gdn_gates(b.data(), a.data(), A_log.data(), dt_bias.data(), T, nv, beta.data(), g.data());
    for (size_t t = 0; t < T; ++t)
        for (size_t h = 0; h < nv; ++h) {
            const size_t i = t * nv + h;
            EXPECT_NEAR(beta[i], sigmoid(b[i]), 1e-7);
            const double want = -std::exp(double(A_log[h])) * softplus(double(a[i]) + dt_bias[h]);
            EXPECT_NEAR(g[i], want, 2e-6 * std::fabs(want) + 1e-30) << t << " " << h;
            EXPECT_LE(g[i], 0.0f);
        }
}

// ---- Gated delta rule ----------------------------------------------------------------------------

struct GdnCase {
    size_t nk, nv, dk, dv;
    size_t T;
    uint32_t seed;
    bool slow_decay = false;  // A_log so small that g ~ -1e-4: state memory spans the whole sequence
};

// Raw layer inputs as the conv would leave them (q, k not yet normalised) and the gate inputs.
struct GdnData {
    GdnCase c;
    std::vector<float> q, k, v, b, a, A_log, dt_bias;
};

GdnData make_data(const GdnCase& c) {
    GdnData d{c, randn(c.T * c.nk * c.dk, c.seed), randn(c.T * c.nk * c.dk, c.seed + 1),
              randn(c.T * c.nv * c.dv, c.seed + 2), randn(c.T * c.nv, c.seed + 3, 2.0f),
              randn(c.T * c.nv, c.seed + 4), {}, {}};
    // A spread of decay rates across heads, as trained models have (HF initialises A ~ U(0, 16)).
    d.A_log = uniform(c.nv, c.seed + 5, c.slow_decay ? -12.0f : -3.0f, c.slow_decay ? -9.0f : 2.7f);
    d.dt_bias = uniform(c.nv, c.seed + 6, -2.0f, 1.0f);
    return d;
}

// Spec 3.4 steps 3-5 in double, from raw q, k, b, a: gates, L2 norm with eps 1e-6 inside the root,
// q * dk^-0.5, head h reading q/k head h / r, then the recurrence token by token.
std::vector<double> naive_gdn(const GdnData& d, std::vector<double>& S /* [nv, dk, dv] in/out */) {
    const auto& c = d.c;
    const size_t r = c.nv / c.nk;
    std::vector<double> out(c.T * c.nv * c.dv);
    std::vector<double> q(c.dk), k(c.dk), u(c.dv), delta(c.dv);
    for (size_t t = 0; t < c.T; ++t) {
        for (size_t h = 0; h < c.nv; ++h) {
            const size_t kh = h / r;
            double qq = 0, kk = 0;
            for (size_t i = 0; i < c.dk; ++i) {
                q[i] = d.q[(t * c.nk + kh) * c.dk + i];
                k[i] = d.k[(t * c.nk + kh) * c.dk + i];
                qq += q[i] * q[i];
                kk += k[i] * k[i];
            }
            const double qs = 1.0 / std::sqrt(qq + 1e-6) / std::sqrt(double(c.dk)), ks = 1.0 / std::sqrt(kk + 1e-6);
            for (size_t i = 0; i < c.dk; ++i) {
                q[i] *= qs;
                k[i] *= ks;
            }
            const double beta = sigmoid(d.b[t * c.nv + h]);
            const double g = -std::exp(double(d.A_log[h])) * softplus(double(d.a[t * c.nv + h]) + d.dt_bias[h]);
            double* Sh = S.data() + h * c.dk * c.dv;
            for (size_t i = 0; i < c.dk * c.dv; ++i) Sh[i] *= std::exp(g);
            for (size_t j = 0; j < c.dv; ++j) {
                u[j] = 0;
                for (size_t i = 0; i < c.dk; ++i) u[j] += Sh[i * c.dv + j] * k[i];
                delta[j] = beta * (d.v[(t * c.nv + h) * c.dv + j] - u[j]);
            }
            for (size_t i = 0; i < c.dk; ++i)
                for (size_t j = 0; j < c.dv; ++j) Sh[i * c.dv + j] += k[i] * delta[j];
            for (size_t j = 0; j < c.dv; ++j) {
                double o = 0;
                for (size_t i = 0; i < c.dk; ++i) o += Sh[i * c.dv + j] * q[i];
                out[(t * c.nv + h) * c.dv + j] = o;
            }
        }
    }
    return out;
}

// The kernels' pipeline on tokens [t0, t1) of the data: L2 norm, gates, then one of the two forms.
// Inputs are read straight from separate q/k/v buffers (strides nk*dk and nv*dv).
struct Prepared {
    std::vector<float> q, k, beta, g;
};

Prepared prepare(const GdnData& d) {
    const auto& c = d.c;
    Prepared p{d.q, d.k, std::vector<float>(c.T * c.nv), std::vector<float>(c.T * c.nv)};
    cpu::l2norm_heads(p.q.data(), c.T, c.nk, c.dk, c.nk * c.dk, 1e-6f, pool());
    cpu::l2norm_heads(p.k.data(), c.T, c.nk, c.dk, c.nk * c.dk, 1e-6f, pool());
    cpu::gdn_gates(d.b.data(), d.a.data(), d.A_log.data(), d.dt_bias.data(), c.T, c.nv, p.beta.data(), p.g.data());
    return p;
}

enum class Form { Recurrent, Chunked };

// Runs tokens [t0, t1) of one sequence as one call, appending to out.
void run_gdn(Form form, const GdnData& d, const Prepared& p, size_t t0, size_t t1, std::vector<float>& S,
             std::vector<float>& out) {
    const auto& c = d.c;
    const cpu::GdnShape shape{c.nk, c.nv, c.dk, c.dv};
    const cpu::GdnInputs in{p.q.data() + t0 * c.nk * c.dk, c.nk * c.dk, p.k.data() + t0 * c.nk * c.dk, c.nk * c.dk,
                            d.v.data() + t0 * c.nv * c.dv, c.nv * c.dv, p.g.data() + t0 * c.nv,
                            p.beta.data() + t0 * c.nv};
    const size_t starts[2] = {0, t1 - t0};
    float* states[1] = {S.data()};
    std::vector<float> o((t1 - t0) * c.nv * c.dv, NAN);
    const float scale = 1.0f / std::sqrt(float(c.dk));
    if (form == Form::Recurrent)
        cpu::gated_delta_rule_recurrent(shape, in, scale, starts, 1, states, o.data(), pool());
    else
        cpu::gated_delta_rule_chunked(shape, in, scale, starts, 1, states, o.data(), pool());
    out.insert(out.end(), o.begin(), o.end());
}

std::vector<float> initial_state(const GdnCase& c, uint32_t seed) { return randn(c.nv * c.dk * c.dv, seed, 0.5f); }

TEST(DeltaRule, RecurrentMatchesNaive) {
    for (const GdnCase& c : {GdnCase{2, 4, 100, 100, 65, 100}, GdnCase{1, 2, 128, 128, 300, 200},
                             GdnCase{2, 2, 128, 100, 15, 300}, GdnCase{1, 3, 100, 128, 300, 400, true}}) {
        const GdnData d = make_data(c);
        const Prepared p = prepare(d);
        std::vector<float> S = initial_state(c, c.seed + 9), out;
        std::vector<double> Sref(S.begin(), S.end());
        run_gdn(Form::Recurrent, d, p, 0, c.T, S, out);
        const auto ref = naive_gdn(d, Sref);
        const double tol = 1e-5;
        EXPECT_LT(rel_err(out, ref), tol) << "T=" << c.T << " dk=" << c.dk;
        EXPECT_LT(rel_err(S, Sref), tol) << "T=" << c.T << " dk=" << c.dk;
    }
}

TEST(DeltaRule, ChunkedEqualsRecurrentOnOddLengths) {
    for (size_t T : {1u, 15u, 63u, 64u, 65u, 300u}) {
        for (const GdnCase& base : {GdnCase{2, 4, 100, 100, 0, 1000}, GdnCase{1, 2, 128, 128, 0, 2000},
                                    GdnCase{1, 2, 100, 128, 0, 3000, true}}) {
            GdnCase c = base;
            c.T = T;
            c.seed += static_cast<uint32_t>(T);
            const GdnData d = make_data(c);
            const Prepared p = prepare(d);
            const auto S0 = initial_state(c, c.seed + 9);
            std::vector<float> Sr = S0, Sc = S0, outr, outc;
            run_gdn(Form::Recurrent, d, p, 0, T, Sr, outr);
            run_gdn(Form::Chunked, d, p, 0, T, Sc, outc);
            const double tol = 1e-5;
            EXPECT_LT(rel_err(outc, outr), tol) << "T=" << T << " dk=" << c.dk << " dv=" << c.dv;
            EXPECT_LT(rel_err(Sc, Sr), tol) << "T=" << T << " dk=" << c.dk << " dv=" << c.dv;
            // And both against the double reference, so neither can be wrong in the same way.
            std::vector<double> Sref(S0.begin(), S0.end());
            const auto ref = naive_gdn(d, Sref);
            EXPECT_LT(rel_err(outc, ref), tol) << "T=" << T;
            EXPECT_LT(rel_err(Sc, Sref), tol) << "T=" << T;
        }
    }
}

TEST(DeltaRule, ZeroStateAndNoDecayStillMatch) {
    // g == 0 exactly (A_log -> -inf) is the hardest case for memory: nothing fades, and in the
    // chunked form every D_ij is 1. Starts from a zero state, as a new sequence does.
    GdnCase c{2, 2, 100, 100, 130, 77};
    GdnData d = make_data(c);
    std::fill(d.A_log.begin(), d.A_log.end(), -INFINITY);
    const Prepared p = prepare(d);
    for (float g : p.g) ASSERT_EQ(g, -0.0f);
    std::vector<float> Sr(c.nv * c.dk * c.dv, 0.0f), Sc = Sr, outr, outc;
    std::vector<double> Sref(Sr.size(), 0.0);
    run_gdn(Form::Recurrent, d, p, 0, c.T, Sr, outr);
    run_gdn(Form::Chunked, d, p, 0, c.T, Sc, outc);
    const auto ref = naive_gdn(d, Sref);
    EXPECT_LT(rel_err(outr, ref), 1e-5);
    EXPECT_LT(rel_err(outc, ref), 1e-5);
    EXPECT_LT(rel_err(Sr, Sref), 1e-5);
    EXPECT_LT(rel_err(Sc, Sref), 1e-5);
}

TEST(DeltaRule, StateCarriesAcrossCalls) {
    const GdnCase c{2, 4, 100, 128, 300, 500};
    const GdnData d = make_data(c);
    const Prepared p = prepare(d);
    const auto S0 = initial_state(c, 509);
    std::vector<float> S_one = S0, out_one;
    run_gdn(Form::Recurrent, d, p, 0, c.T, S_one, out_one);

    for (size_t T1 : {1u, 63u, 64u, 65u, 200u}) {
        // Recurrent split in two: the same operations in the same order, so the same bits.
        std::vector<float> S = S0, out;
        run_gdn(Form::Recurrent, d, p, 0, T1, S, out);
        run_gdn(Form::Recurrent, d, p, T1, c.T, S, out);
        EXPECT_EQ(out, out_one) << T1;
        EXPECT_EQ(S, S_one) << T1;

        // Chunked split in two: chunk boundaries move, so only fp32-close.
        std::vector<float> Sc = S0, outc;
        run_gdn(Form::Chunked, d, p, 0, T1, Sc, outc);
        run_gdn(Form::Chunked, d, p, T1, c.T, Sc, outc);
        EXPECT_LT(rel_err(outc, out_one), 1e-5) << T1;
        EXPECT_LT(rel_err(Sc, S_one), 1e-5) << T1;
    }

    // Chunked prefill, then one-token recurrent decode steps, equals one long prefill.
    const size_t prefill = 65;
    std::vector<float> S = S0, out;
    run_gdn(Form::Chunked, d, p, 0, prefill, S, out);
    for (size_t t = prefill; t < c.T; ++t) run_gdn(Form::Recurrent, d, p, t, t + 1, S, out);
    std::vector<float> S_chunk = S0, out_chunk;
    run_gdn(Form::Chunked, d, p, 0, c.T, S_chunk, out_chunk);
    EXPECT_LT(rel_err(out, out_chunk), 1e-5);
    EXPECT_LT(rel_err(S, S_chunk), 1e-5);
    EXPECT_LT(rel_err(out, out_one), 1e-5);
    EXPECT_LT(rel_err(S, S_one), 1e-5);
    // One-token chunked calls are decode steps too.
    std::vector<float> S1 = S0, out1;
    for (size_t t = 0; t < 20; ++t) run_gdn(Form::Chunked, d, p, t, t + 1, S1, out1);
    std::vector<float> S2 = S0, out2;
    run_gdn(Form::Recurrent, d, p, 0, 20, S2, out2);
    EXPECT_LT(rel_err(out1, out2), 1e-5);
    EXPECT_LT(rel_err(S1, S2), 1e-5);
}

TEST(DeltaRule, PackedSequencesEqualOneByOne) {
    // Sequences of lengths 70, 0, 1 and 15 (the 1-token one new, with a zero state), read from a
    // conv-shaped buffer [T, conv_dim] with q | k | v per row, as the layer will call it.
    const size_t nk = 2, nv = 4, dk = 100, dv = 100, conv = 2 * nk * dk + nv * dv;
    const std::vector<size_t> starts = {0, 70, 70, 71, 86};
    const size_t T = starts.back(), seqs = starts.size() - 1;
    auto mixed = randn(T * conv, 601);
    cpu::l2norm_heads(mixed.data(), T, 2 * nk, dk, conv, 1e-6f, pool());
    auto beta = uniform(T * nv, 602, 0.0f, 1.0f), g = uniform(T * nv, 603, -2.0f, 0.0f);
    const cpu::GdnShape shape{nk, nv, dk, dv};
    const cpu::GdnInputs in{mixed.data(), conv, mixed.data() + nk * dk, conv, mixed.data() + 2 * nk * dk, conv,
                            g.data(), beta.data()};
    const float scale = 0.1f;
    for (Form form : {Form::Recurrent, Form::Chunked}) {
        auto run = form == Form::Recurrent ? cpu::gated_delta_rule_recurrent : cpu::gated_delta_rule_chunked;
        std::vector<std::vector<float>> states(seqs);
        for (size_t s = 0; s < seqs; ++s)
            states[s] = s == 2 ? std::vector<float>(nv * dk * dv, 0.0f) : randn(nv * dk * dv, 610 + s, 0.3f);
        auto states_one = states;
        std::vector<float*> ptrs;
        for (auto& st : states) ptrs.push_back(st.data());
        std::vector<float> out(T * nv * dv, NAN);
        run(shape, in, scale, starts.data(), seqs, ptrs.data(), out.data(), pool());

        std::vector<float> out_one(T * nv * dv, NAN);
        for (size_t s = 0; s < seqs; ++s) {
            const size_t t0 = starts[s], one[2] = {0, starts[s + 1] - t0};
            const cpu::GdnInputs sub{in.q + t0 * conv, conv, in.k + t0 * conv, conv, in.v + t0 * conv, conv,
                                     g.data() + t0 * nv, beta.data() + t0 * nv};
            float* st = states_one[s].data();
            run(shape, sub, scale, one, 1, &st, out_one.data() + t0 * nv * dv, pool());
        }
        for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(out[i], out_one[i]) << i;
        for (size_t s = 0; s < seqs; ++s) EXPECT_EQ(states[s], states_one[s]) << s;
    }
}

// ---- Causal conv1d -------------------------------------------------------------------------------

// Spec 3.4 step 2 in double, with the history before the first token taken from `state`
// ([channels, K-1], oldest first). Returns the outputs and leaves the new state in `state`.
std::vector<double> naive_conv(const std::vector<float>& x, size_t T, size_t C, const std::vector<float>& w, size_t K,
                               std::vector<double>& state) {
    std::vector<double> out(T * C);
    for (size_t c = 0; c < C; ++c) {
        std::vector<double> m;  // the channel's full input sequence, history first
        for (size_t j = 0; j + 1 < K; ++j) m.push_back(state[c * (K - 1) + j]);
        for (size_t t = 0; t < T; ++t) m.push_back(x[t * C + c]);
        for (size_t t = 0; t < T; ++t) {
            double acc = 0;
            for (size_t j = 0; j < K; ++j) acc += w[c * K + j] * m[t + j];  // m[t + j] is input t - (K-1) + j
            out[t * C + c] = silu(acc);
        }
        for (size_t j = 0; j + 1 < K; ++j) state[c * (K - 1) + j] = m[T + j];
    }
    return out;
}

void run_conv(const std::vector<float>& x, size_t t0, size_t t1, size_t C, const std::vector<float>& w, size_t K,
              std::vector<float>& state, std::vector<float>& out) {
    const size_t starts[2] = {0, t1 - t0};
    float* st = state.data();
    std::vector<float> o((t1 - t0) * C, NAN);
    cpu::causal_conv1d_silu(x.data() + t0 * C, C, w.data(), K, starts, 1, &st, o.data(), pool());
    out.insert(out.end(), o.begin(), o.end());
}

TEST(Conv1d, MatchesNaiveWithCarriedState) {
    for (size_t K : {1u, 2u, 4u}) {
        for (size_t T : {1u, 2u, 15u, 65u}) {
            const size_t C = 200;  // not a multiple of the 64-channel blocks
            auto x = randn(T * C, 700 + T), w = randn(C * K, 701 + K, 0.5f);
            std::vector<float> state = randn(C * (K - 1), 702 + T), out;
            std::vector<double> sref(state.begin(), state.end());
            run_conv(x, 0, T, C, w, K, state, out);
            const auto ref = naive_conv(x, T, C, w, K, sref);
            EXPECT_LT(rel_err(out, ref), 1e-6) << "K=" << K << " T=" << T;
            EXPECT_EQ(rel_err(state, sref), 0.0) << "the state is a copy of inputs";
        }
    }
}

TEST(Conv1d, PrefillThenDecodeEqualsOnePrefill) {
    const size_t C = 8192 / 64 + 5, K = 4, T = 40;
    auto x = randn(T * C, 711), w = randn(C * K, 712, 0.5f);
    std::vector<float> s_one(C * (K - 1), 0.0f), out_one;
    run_conv(x, 0, T, C, w, K, s_one, out_one);
    for (size_t prefill : {0u, 1u, 2u, 3u, 17u}) {
        std::vector<float> s(C * (K - 1), 0.0f), out;
        run_conv(x, 0, prefill, C, w, K, s, out);
        for (size_t t = prefill; t < T; ++t) run_conv(x, t, t + 1, C, w, K, s, out);
        EXPECT_EQ(out, out_one) << prefill;
        EXPECT_EQ(s, s_one) << prefill;
    }
    // A new sequence's zero state is the spec's m[< 0] = 0.
    std::vector<double> zero(C * (K - 1), 0.0);
    EXPECT_LT(rel_err(out_one, naive_conv(x, T, C, w, K, zero)), 1e-6);
}

TEST(Conv1d, PackedInPlaceDecodeBatch) {
    // Four sequences, one token each (a decode batch), computed in place, against one by one.
    const size_t C = 130, K = 4, seqs = 4;
    auto x = randn(seqs * C, 721), w = randn(C * K, 722, 0.5f);
    std::vector<std::vector<float>> st(seqs), st_one(seqs);
    std::vector<float*> ptrs;
    for (size_t s = 0; s < seqs; ++s) {
        st[s] = randn(C * (K - 1), 730 + s);
        st_one[s] = st[s];
        ptrs.push_back(st[s].data());
    }
    const size_t starts[] = {0, 1, 2, 3, 4};
    auto y = x;
    cpu::causal_conv1d_silu(y.data(), C, w.data(), K, starts, seqs, ptrs.data(), y.data(), pool());
    for (size_t s = 0; s < seqs; ++s) {
        std::vector<float> out;
        run_conv(x, s, s + 1, C, w, K, st_one[s], out);
        for (size_t c = 0; c < C; ++c) ASSERT_EQ(y[s * C + c], out[c]);
        EXPECT_EQ(st[s], st_one[s]);
    }
}

// ---- Layout (spec 3.1, 3.4 step 1) ---------------------------------------------------------------

// nk = 2 key heads of dk = 2, nv = 4 value heads of dv = 3 (r = 2). Values name what they are:
// q 1gi, k 2gi for key head g; v 3hj, z 4hj for value head h; token 1 adds 1000.
const GdnDims kTiny{2, 4, 2, 3};

TEST(NextLayout, DeinterleaveQkvzHandBuilt) {
    // The projection output per spec 3.4: per key-head group, q_g | k_g | v(2 heads) | z(2 heads).
    const std::vector<float> token0 = {
        100, 101, 200, 201, 300, 301, 302, 310, 311, 312, 400, 401, 402, 410, 411, 412,  // group 0
        110, 111, 210, 211, 320, 321, 322, 330, 331, 332, 420, 421, 422, 430, 431, 432,  // group 1
    };
    ASSERT_EQ(token0.size(), kTiny.qkvz_width());
    std::vector<float> P = token0;
    for (float v : token0) P.push_back(v + 1000);
    std::vector<float> qkv(2 * kTiny.conv_dim(), NAN), z(2 * kTiny.value_dim(), NAN);
    deinterleave_qkvz(kTiny, P.data(), 2, qkv.data(), z.data());
    const std::vector<float> want_qkv = {100, 101, 110, 111,                                   // q heads 0, 1
                                         200, 201, 210, 211,                                   // k heads 0, 1
                                         300, 301, 302, 310, 311, 312, 320, 321, 322, 330, 331, 332};  // v 0..3
    const std::vector<float> want_z = {400, 401, 402, 410, 411, 412, 420, 421, 422, 430, 431, 432};
    for (size_t t = 0; t < 2; ++t) {
        for (size_t i = 0; i < want_qkv.size(); ++i) EXPECT_EQ(qkv[t * kTiny.conv_dim() + i], want_qkv[i] + 1000 * t) << i;
        for (size_t i = 0; i < want_z.size(); ++i) EXPECT_EQ(z[t * kTiny.value_dim() + i], want_z[i] + 1000 * t) << i;
    }
}

TEST(NextLayout, DeinterleaveBaHandBuilt) {
    // Per group: b for value heads 2g, 2g+1, then a for the same heads.
    const std::vector<float> B = {50, 51, 60, 61, 52, 53, 62, 63,    // token 0
                                  150, 151, 160, 161, 152, 153, 162, 163};  // token 1
    std::vector<float> b(8), a(8);
    deinterleave_ba(kTiny, B.data(), 2, b.data(), a.data());
    EXPECT_EQ(b, (std::vector<float>{50, 51, 52, 53, 150, 151, 152, 153}));
    EXPECT_EQ(a, (std::vector<float>{60, 61, 62, 63, 160, 161, 162, 163}));
}

TEST(NextLayout, ContiguousRowOrderMatchesDeinterleave) {
    // Permuting the weight rows at load time must give what de-interleaving the output gives.
    const GdnDims dims{2, 6, 4, 5};  // r = 3
    const size_t H = 7, T = 3;
    auto W = randn(dims.qkvz_width() * H, 801), x = randn(T * H, 802);
    auto Wba = randn(dims.ba_width() * H, 803);
    auto project = [&](const std::vector<float>& w, size_t rows, const std::vector<uint32_t>* order) {
        std::vector<float> y(T * rows);
        for (size_t t = 0; t < T; ++t)
            for (size_t n = 0; n < rows; ++n) {
                const size_t src = order ? (*order)[n] : n;
                float acc = 0;
                for (size_t i = 0; i < H; ++i) acc += x[t * H + i] * w[src * H + i];
                y[t * rows + n] = acc;
            }
        return y;
    };
    const auto rows = qkvz_contiguous_rows(dims);
    std::vector<uint32_t> sorted = rows;
    std::sort(sorted.begin(), sorted.end());
    for (size_t i = 0; i < sorted.size(); ++i) ASSERT_EQ(sorted[i], i) << "a permutation";
    const auto P = project(W, dims.qkvz_width(), nullptr), Pc = project(W, dims.qkvz_width(), &rows);
    std::vector<float> qkv(T * dims.conv_dim()), z(T * dims.value_dim());
    deinterleave_qkvz(dims, P.data(), T, qkv.data(), z.data());
    for (size_t t = 0; t < T; ++t) {
        for (size_t i = 0; i < dims.conv_dim(); ++i) EXPECT_EQ(qkv[t * dims.conv_dim() + i], Pc[t * dims.qkvz_width() + i]);
        for (size_t i = 0; i < dims.value_dim(); ++i)
            EXPECT_EQ(z[t * dims.value_dim() + i], Pc[t * dims.qkvz_width() + dims.conv_dim() + i]);
    }
    const auto ba_rows = ba_contiguous_rows(dims);
    const auto B = project(Wba, dims.ba_width(), nullptr), Bc = project(Wba, dims.ba_width(), &ba_rows);
    std::vector<float> b(T * dims.nv), a(T * dims.nv);
    deinterleave_ba(dims, B.data(), T, b.data(), a.data());
    for (size_t t = 0; t < T; ++t)
        for (size_t h = 0; h < dims.nv; ++h) {
            EXPECT_EQ(b[t * dims.nv + h], Bc[t * dims.ba_width() + h]);
            EXPECT_EQ(a[t * dims.nv + h], Bc[t * dims.ba_width() + dims.nv + h]);
        }
    // The released 80B-A3B sizes: 16 groups of 768 rows, whole FP8 scale blocks.
    const GdnDims big{16, 32, 128, 128};
    EXPECT_EQ(big.group_width(), 768u);
    EXPECT_EQ(big.qkvz_width(), 12288u);
    EXPECT_EQ(big.conv_dim(), 8192u);
    EXPECT_EQ(big.ba_width(), 64u);
    EXPECT_NO_THROW(big.validate("test"));
    EXPECT_THROW((GdnDims{3, 4, 2, 2}.validate("test")), Error);
}

TEST(NextLayout, ScheduleFromIntervalAndFromLayerTypes) {
    using K = NextLayerKind;
    // 80B-A3B: 48 layers, interval 4 -> full attention at 3, 7, ..., 47.
    nlohmann::json cfg = {{"num_hidden_layers", 48}, {"full_attention_interval", 4}};
    const auto s = next_layer_schedule(cfg, "config.json");
    ASSERT_EQ(s.size(), 48u);
    size_t full = 0;
    for (size_t i = 0; i < 48; ++i) {
        EXPECT_EQ(s[i], i % 4 == 3 ? K::FullAttention : K::LinearAttention) << i;
        full += s[i] == K::FullAttention;
    }
    EXPECT_EQ(full, 12u);
    // The interval defaults to 4 when absent.
    EXPECT_EQ(next_layer_schedule(nlohmann::json{{"num_hidden_layers", 48}}, "c"), s);
    // Another interval, and a layer count that is not a multiple of it.
    const auto s3 = next_layer_schedule(nlohmann::json{{"num_hidden_layers", 7}, {"full_attention_interval", 3}}, "c");
    EXPECT_EQ(s3, (std::vector<K>{K::LinearAttention, K::LinearAttention, K::FullAttention, K::LinearAttention,
                                  K::LinearAttention, K::FullAttention, K::LinearAttention}));

    // layer_types, when written, is authoritative (even if it disagrees with the interval).
    nlohmann::json listed = {{"num_hidden_layers", 4},
                             {"full_attention_interval", 4},
                             {"layer_types", {"full_attention", "linear_attention", "linear_attention", "full_attention"}}};
    EXPECT_EQ(next_layer_schedule(listed, "c"),
              (std::vector<K>{K::FullAttention, K::LinearAttention, K::LinearAttention, K::FullAttention}));
    // The list form of the released layout equals the interval form.
    nlohmann::json released = {{"num_hidden_layers", 48}, {"layer_types", nlohmann::json::array()}};
    for (size_t i = 0; i < 48; ++i) released["layer_types"].push_back((i + 1) % 4 ? "linear_attention" : "full_attention");
    EXPECT_EQ(next_layer_schedule(released, "c"), s);

    // Malformed configs name the field.
    auto bad = [](const nlohmann::json& j) {
        try {
            next_layer_schedule(j, "config.json");
        } catch (const Error& e) {
            EXPECT_EQ(e.status(), Q3N_ERR_BAD_CONFIG);
            return std::string(e.what());
        }
        ADD_FAILURE() << "no error for " << j.dump();
        return std::string();
    };
    EXPECT_NE(bad({{"num_hidden_layers", 3}, {"layer_types", {"linear_attention"}}}).find("layer_types"), std::string::npos);
    EXPECT_NE(bad({{"num_hidden_layers", 1}, {"layer_types", {"attention"}}}).find("layer_types"), std::string::npos);
    EXPECT_NE(bad({{"num_hidden_layers", 1}, {"layer_types", "full_attention"}}).find("layer_types"), std::string::npos);
    EXPECT_NE(bad({{"num_hidden_layers", 4}, {"full_attention_interval", 0}}).find("full_attention_interval"),
              std::string::npos);
    EXPECT_NE(bad(nlohmann::json::object()).find("num_hidden_layers"), std::string::npos);
}

// ---- Gated attention pieces (spec 3.3) -----------------------------------------------------------

TEST(NextGatedAttention, QueryGateSplitIsPerHead) {
    // 2 tokens, 3 heads of d = 2: q_proj output per token is [q0 g0 | q1 g1 | q2 g2].
    const std::vector<float> qg = {1, 2, -1, -2, 3, 4, -3, -4, 5, 6, -5, -6,
                                   11, 12, -11, -12, 13, 14, -13, -14, 15, 16, -15, -16};
    std::vector<float> q(12), gate(12);
    cpu::split_query_gate(qg.data(), 2, 3, 2, q.data(), gate.data());
    EXPECT_EQ(q, (std::vector<float>{1, 2, 3, 4, 5, 6, 11, 12, 13, 14, 15, 16}));
    EXPECT_EQ(gate, (std::vector<float>{-1, -2, -3, -4, -5, -6, -11, -12, -13, -14, -15, -16}));
}

TEST(NextGatedAttention, SigmoidOutputGate) {
    const size_t n = 333;
    auto o = randn(n, 901), g = randn(n, 902, 6.0f);
    g[0] = 100.0f;   // sigmoid 1
    g[1] = -100.0f;  // sigmoid ~0 without overflow trouble
    auto y = o;
    cpu::sigmoid_gate_mul(y.data(), g.data(), n);
    for (size_t i = 0; i < n; ++i) EXPECT_NEAR(y[i], o[i] * sigmoid(g[i]), 1e-6 * (1 + std::fabs(o[i]))) << i;
    EXPECT_EQ(y[0], o[0]);
    EXPECT_LT(std::fabs(y[1]), 1e-40);
}

TEST(NextGatedAttention, PartialRopeLeavesTheTailChannels) {
    // Spec 3.3 step 3: head_dim 256, partial_rotary_factor 0.25 -> channels [0, 64) rotate, the rest pass.
    const size_t T = 2, heads = 3, d = 256, rot = 64;
    cpu::Rope rope;
    rope.rot_dim = rot;
    for (size_t i = 0; i < rot / 2; ++i) rope.inv_freq.push_back(std::pow(1e7f, -2.0f * i / rot));
    auto x = randn(T * heads * d, 911);
    auto y = x;
    const int32_t pos[] = {3, 40000};
    cpu::apply_rope(y.data(), T, heads, d, pos, rope);
    for (size_t t = 0; t < T; ++t)
        for (size_t h = 0; h < heads; ++h) {
            const float* a = x.data() + (t * heads + h) * d;
            const float* b = y.data() + (t * heads + h) * d;
            for (size_t i = rot; i < d; ++i) ASSERT_EQ(b[i], a[i]);
            for (size_t i = 0; i < rot / 2; ++i) {
                const double phi = double(float(pos[t]) * rope.inv_freq[i]);
                EXPECT_NEAR(b[i], a[i] * std::cos(phi) - a[i + rot / 2] * std::sin(phi), 1e-4);
            }
        }
}

}  // namespace
