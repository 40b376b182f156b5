// The Qwen3-Next CUDA kernels (cuda/next_ops.h) against their CPU twins (cpu/next_ops.h) on random
// inputs of odd sizes: the gated delta rule in recurrent (decode) and chunked (prefill) form, and the
// causal conv1d with its carried state. Skipped, with a message, without a GPU.
//
// q | k | v are read from one conv-shaped buffer [T, 2 nk dk + nv dv], as the layer will call them, so
// the strides are exercised everywhere. Initial states are random (a sequence mid-way), g and beta
// come from cpu::gdn_gates as in test_next_ops.cpp (a spread of decays; one case with almost none).
//
// Tolerances (relative Frobenius error over a whole tensor):
//   - Delta rule, either GPU form against the CPU recurrent form: 1e-5. The recurrence is
//     non-expanding, so errors grow at most linearly in T; test_next_ops.cpp measured 1.6e-6 for the
//     CPU chunked form against the recurrent one at T = 300, both fp32. The decode kernel is fp32 with
//     other summation orders. The chunked kernel runs its products on tensor cores as three tf32
//     products each (hi hi + hi lo + lo hi, hi = x rounded to tf32, lo = x - hi): ~2^-22 of each
//     product is lost, the size of fp32 rounding, so it is held to the same bound as fp32 code (one
//     tf32 product, 2^-11 per input, would give ~3e-4 and fail it). The same bound up to T = 1000 and
//     at the Qwen3-Next shape (16 key heads, 32 value heads, 128 x 128) checks that nothing grows.
//   - In-kernel L2 norm vs cpu::l2norm_heads first: the same expression, a different sum order: 1e-5.
//   - Conv: a K-term fp32 sum and a silu per output, expf vs libm exp (2 ulp): 1e-6.
//   - Bitwise equality where the GPU performs the same arithmetic: a sequence alone or packed with
//     others (each block reads only its sequence), conv prefill-then-decode vs one prefill and in
//     place vs out of place, recurrent decode split across calls.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "core/thread_pool.h"
#include "cpu/next_ops.h"
#include "cuda/cuda_backend.h"
#include "cuda/device_buffer.h"
#include "cuda/next_ops.h"
#include "cuda_test_util.h"

using namespace q3n;
using cuda::DeviceBuffer;
using namespace q3n::cuda_test;

namespace {

// Per-sequence fp32 states held in one device buffer, with the device array of per-sequence pointers
// the kernels take.
struct DeviceStates {
    DeviceBuffer data, ptrs;
    size_t per = 0, count = 0;
    DeviceStates(const std::vector<std::vector<float>>& states) : per(states.empty() ? 0 : states[0].size()), count(states.size()) {
        std::vector<float> all;
        for (const auto& s : states) all.insert(all.end(), s.begin(), s.end());
        data = to_device(all);
        std::vector<float*> p(count);
        for (size_t i = 0; i < count; ++i) p[i] = data.as<float>() + i * per;
        ptrs = to_device(p);
    }
    float* const* get() const { return ptrs.as<float* const>(); }
    std::vector<float> host(size_t s) const {
        const auto all = to_host(data, per * count);
        return std::vector<float>(all.begin() + s * per, all.begin() + (s + 1) * per);
    }
};

std::vector<size_t> starts_of(const std::vector<size_t>& lens) {
    std::vector<size_t> s{0};
    for (size_t l : lens) s.push_back(s.back() + l);
    return s;
}

// ---- Gated delta rule ----------------------------------------------------------------------------

struct Gdn {
    size_t nk, nv, dk, dv;
    size_t conv() const { return 2 * nk * dk + nv * dv; }
};

// One problem: several sequences of given lengths, packed. `mixed` holds raw q | k | v rows, `normed`
// the same rows with q and k L2-normalised (what the CPU op and the GPU op without l2norm read).
struct GdnProblem {
    Gdn s;
    std::vector<size_t> lens, starts;
    size_t T;
    std::vector<float> mixed, normed, g, beta;
    std::vector<std::vector<float>> S0;
};

GdnProblem make_problem(const Gdn& s, const std::vector<size_t>& lens, uint32_t seed, bool slow_decay = false) {
    GdnProblem p{s, lens, starts_of(lens), 0, {}, {}, {}, {}, {}};
    p.T = p.starts.back();
    p.mixed = randn(p.T * s.conv(), seed, 1.5f);
    p.normed = p.mixed;
    cpu::l2norm_heads(p.normed.data(), p.T, 2 * s.nk, s.dk, s.conv(), 1e-6f, pool());
    const auto b = randn(p.T * s.nv, seed + 1, 2.0f), a = randn(p.T * s.nv, seed + 2);
    const auto A_log = uniform(s.nv, seed + 3, slow_decay ? -12.0f : -3.0f, slow_decay ? -9.0f : 2.7f);
    const auto dt_bias = uniform(s.nv, seed + 4, -2.0f, 1.0f);
    p.g.resize(p.T * s.nv);
    p.beta.resize(p.T * s.nv);
    cpu::gdn_gates(b.data(), a.data(), A_log.data(), dt_bias.data(), p.T, s.nv, p.beta.data(), p.g.data());
    for (size_t i = 0; i < lens.size(); ++i) p.S0.push_back(randn(s.nv * s.dk * s.dv, seed + 10 + i, 0.5f));
    return p;
}

float scale_of(const Gdn& s) { return 1.0f / std::sqrt(float(s.dk)); }

// The CPU recurrent form over the whole problem: outputs [T, nv, dv] and final states.
void cpu_reference(const GdnProblem& p, std::vector<float>& out, std::vector<std::vector<float>>& S) {
    const auto& s = p.s;
    S = p.S0;
    out.assign(p.T * s.nv * s.dv, NAN);
    const cpu::GdnShape shape{s.nk, s.nv, s.dk, s.dv};
    const cpu::GdnInputs in{p.normed.data(), s.conv(), p.normed.data() + s.nk * s.dk, s.conv(),
                            p.normed.data() + 2 * s.nk * s.dk, s.conv(), p.g.data(), p.beta.data()};
    std::vector<float*> ptrs;
    for (auto& st : S) ptrs.push_back(st.data());
    cpu::gated_delta_rule_recurrent(shape, in, scale_of(s), p.starts.data(), p.lens.size(), ptrs.data(), out.data(),
                                    pool());
}

enum class Form { Decode, Chunked };

// Runs tokens [from[s], to[s]) of every sequence s as one GPU call on `states`, scattering the
// outputs into `out` ([T, nv, dv] of the whole problem). raw: read unnormalised q, k and normalise
// in the kernel. one_each: every sequence has one token and the decode form gets no seq_starts.
void gpu_call(Form form, const GdnProblem& p, const std::vector<size_t>& from, const std::vector<size_t>& to,
              bool raw, DeviceStates& states, std::vector<float>& out, bool one_each = false) {
    const auto& s = p.s;
    const size_t C = s.conv();
    std::vector<float> rows, g, beta;
    std::vector<int32_t> starts{0};
    std::vector<size_t> where;  // packed row -> token of the problem
    const auto& src = raw ? p.mixed : p.normed;
    for (size_t q = 0; q < p.lens.size(); ++q) {
        for (size_t t = p.starts[q] + from[q]; t < p.starts[q] + to[q]; ++t) {
            rows.insert(rows.end(), src.begin() + t * C, src.begin() + (t + 1) * C);
            g.insert(g.end(), p.g.begin() + t * s.nv, p.g.begin() + (t + 1) * s.nv);
            beta.insert(beta.end(), p.beta.begin() + t * s.nv, p.beta.begin() + (t + 1) * s.nv);
            where.push_back(t);
        }
        starts.push_back(static_cast<int32_t>(where.size()));
    }
    const size_t n = where.size();
    auto drows = to_device(rows), dg = to_device(g), dbeta = to_device(beta), dstarts = to_device(starts);
    DeviceBuffer dout(std::max<size_t>(n * s.nv * s.dv * 4, 4));
    Q3N_CUDA(cudaMemset(dout.get(), 0xff, dout.bytes()));  // NaN poison: every output must be written
    const cuda::GdnShape shape{int(s.nk), int(s.nv), int(s.dk), int(s.dv)};
    cuda::GdnInputs in{drows.as<float>(), int(C), drows.as<float>() + s.nk * s.dk, int(C),
                       drows.as<float>() + 2 * s.nk * s.dk, int(C), dg.as<float>(), dbeta.as<float>()};
    in.l2norm = raw;
    in.l2norm_eps = 1e-6f;
    const int num = static_cast<int>(p.lens.size());
    if (form == Form::Decode)
        cuda::gated_delta_rule_decode(shape, in, scale_of(s), one_each ? nullptr : dstarts.as<int32_t>(), num,
                                      states.get(), dout.as<float>(), nullptr);
    else
        cuda::gated_delta_rule_chunked(shape, in, scale_of(s), dstarts.as<int32_t>(), num, states.get(),
                                       dout.as<float>(), nullptr);
    const auto o = to_host(dout, n * s.nv * s.dv);
    const size_t row = s.nv * s.dv;
    for (size_t i = 0; i < n; ++i) std::copy_n(o.begin() + i * row, row, out.begin() + where[i] * row);
}

// The whole problem in one GPU call.
void gpu_whole(Form form, const GdnProblem& p, bool raw, std::vector<float>& out, std::vector<std::vector<float>>& S) {
    DeviceStates st(p.S0);
    out.assign(p.T * p.s.nv * p.s.dv, NAN);
    std::vector<size_t> from(p.lens.size(), 0);
    gpu_call(form, p, from, p.lens, raw, st, out);
    S.clear();
    for (size_t i = 0; i < p.lens.size(); ++i) S.push_back(st.host(i));
}

std::vector<float> flat(const std::vector<std::vector<float>>& v) {
    std::vector<float> all;
    for (const auto& x : v) all.insert(all.end(), x.begin(), x.end());
    return all;
}

const Gdn kShapes[] = {{2, 4, 100, 100}, {1, 2, 128, 128}, {2, 2, 128, 100}, {1, 3, 100, 128}};

TEST(CudaGdn, DecodeStepsMatchCpuRecurrent) {
    REQUIRE_GPU();
    for (const Gdn& s : kShapes) {
        for (bool raw : {false, true}) {
            const auto p = make_problem(s, {6, 6, 6}, 11 + s.dk + s.nv + raw);
            std::vector<float> ref;
            std::vector<std::vector<float>> Sref;
            cpu_reference(p, ref, Sref);
            // Six decode steps, one token of every sequence per call, the state carried on the device.
            DeviceStates st(p.S0);
            std::vector<float> out(ref.size(), NAN);
            for (size_t step = 0; step < 6; ++step)
                gpu_call(Form::Decode, p, std::vector<size_t>(3, step), std::vector<size_t>(3, step + 1), raw, st, out,
                         true);
            std::vector<std::vector<float>> S;
            for (size_t i = 0; i < 3; ++i) S.push_back(st.host(i));
            EXPECT_LT(rel(out, ref), 1e-5) << "dk=" << s.dk << " dv=" << s.dv << " raw=" << raw;
            EXPECT_LT(rel(flat(S), flat(Sref)), 1e-5) << "dk=" << s.dk << " dv=" << s.dv << " raw=" << raw;
        }
    }
}

TEST(CudaGdn, RecurrentPackedLengthsMatchCpu) {
    REQUIRE_GPU();
    for (const Gdn& s : kShapes) {
        const auto p = make_problem(s, {3, 0, 17, 1}, 40 + s.dk);
        std::vector<float> ref, out;
        std::vector<std::vector<float>> Sref, S;
        cpu_reference(p, ref, Sref);
        gpu_whole(Form::Decode, p, false, out, S);
        EXPECT_LT(rel(out, ref), 1e-5) << "dk=" << s.dk;
        EXPECT_LT(rel(flat(S), flat(Sref)), 1e-5) << "dk=" << s.dk;
        EXPECT_EQ(S[1], p.S0[1]) << "a sequence with no tokens keeps its state";
    }
}

TEST(CudaGdn, ChunkedMatchesCpuOnOddLengths) {
    REQUIRE_GPU();
    for (size_t T : {1u, 15u, 63u, 64u, 65u, 300u, 1000u}) {
        for (const Gdn& s : {Gdn{2, 4, 100, 100}, Gdn{1, 2, 128, 128}, Gdn{2, 2, 128, 100}}) {
            for (bool slow : {false, true}) {
                const auto p = make_problem(s, {T}, 100 + uint32_t(T) + s.dk + slow, slow);
                std::vector<float> ref, out;
                std::vector<std::vector<float>> Sref, S;
                cpu_reference(p, ref, Sref);
                gpu_whole(Form::Chunked, p, false, out, S);
                EXPECT_LT(rel(out, ref), 1e-5) << "T=" << T << " dk=" << s.dk << " dv=" << s.dv << " slow=" << slow;
                EXPECT_LT(rel(S[0], Sref[0]), 1e-5) << "T=" << T << " dk=" << s.dk << " dv=" << s.dv << " slow=" << slow;
            }
        }
    }
}

// The tensor-core kernel's other instantiations: dk <= 64 (a 64-wide key tile), a dk that is not a
// multiple of 4 (4-byte copies of q and k), and 1, 2 and 3 state slices of 32 columns per head
// (clusters of 1 and 2 blocks; 3 slices take 4 blocks, one owning no columns but computing its share
// of K K^T).
TEST(CudaGdn, ChunkedOtherHeadShapes) {
    REQUIRE_GPU();
    for (const Gdn& s : {Gdn{1, 2, 64, 40}, Gdn{2, 2, 66, 24}, Gdn{1, 1, 48, 72}, Gdn{2, 4, 120, 96}}) {
        for (bool raw : {false, true}) {
            const auto p = make_problem(s, {200, 64, 1}, 2000 + s.dk + s.dv + raw);
            std::vector<float> ref, out;
            std::vector<std::vector<float>> Sref, S;
            cpu_reference(p, ref, Sref);
            gpu_whole(Form::Chunked, p, raw, out, S);
            EXPECT_LT(rel(out, ref), 1e-5) << "dk=" << s.dk << " dv=" << s.dv << " raw=" << raw;
            EXPECT_LT(rel(flat(S), flat(Sref)), 1e-5) << "dk=" << s.dk << " dv=" << s.dv << " raw=" << raw;
        }
    }
}

// Qwen3-Next's shape (GQA 2, 4 state slices per head, 32 heads x 4 sequences), as the runner calls
// it: raw q and k normalised in the kernel, several sequences of odd lengths, one long; then the same
// tokens as two calls, each sequence continued from the state the first call left (split mid-chunk,
// one sequence with no tokens in the first call).
TEST(CudaGdn, ChunkedQwen3NextShape) {
    REQUIRE_GPU();
    const std::vector<size_t> lens = {1000, 65, 300, 1};
    const auto p = make_problem(Gdn{16, 32, 128, 128}, lens, 8080);
    std::vector<float> ref, one;
    std::vector<std::vector<float>> Sref, Sone;
    cpu_reference(p, ref, Sref);
    gpu_whole(Form::Chunked, p, true, one, Sone);
    EXPECT_LT(rel(one, ref), 1e-5) << diff_report(one, ref);
    EXPECT_LT(rel(flat(Sone), flat(Sref)), 1e-5) << diff_report(flat(Sone), flat(Sref));

    DeviceStates st(p.S0);
    std::vector<float> two(ref.size(), NAN);
    const std::vector<size_t> split = {650, 1, 129, 0};
    gpu_call(Form::Chunked, p, {0, 0, 0, 0}, split, true, st, two);
    gpu_call(Form::Chunked, p, split, lens, true, st, two);
    std::vector<std::vector<float>> S2;
    for (size_t i = 0; i < lens.size(); ++i) S2.push_back(st.host(i));
    EXPECT_LT(rel(two, ref), 1e-5) << diff_report(two, ref);
    EXPECT_LT(rel(flat(S2), flat(Sref)), 1e-5) << diff_report(flat(S2), flat(Sref));
}

TEST(CudaGdn, ChunkedNormalisesInKernel) {
    REQUIRE_GPU();
    const auto p = make_problem(Gdn{2, 4, 128, 128}, {130, 7}, 777);
    std::vector<float> ref, out;
    std::vector<std::vector<float>> Sref, S;
    cpu_reference(p, ref, Sref);
    gpu_whole(Form::Chunked, p, true, out, S);
    EXPECT_LT(rel(out, ref), 1e-5);
    EXPECT_LT(rel(flat(S), flat(Sref)), 1e-5);
}

TEST(CudaGdn, ChunkedHeadDim256) {
    REQUIRE_GPU();  // the largest dk the chunked kernel's shared memory takes
    const auto p = make_problem(Gdn{1, 2, 256, 72}, {130}, 4242);
    std::vector<float> ref, out;
    std::vector<std::vector<float>> Sref, S;
    cpu_reference(p, ref, Sref);
    gpu_whole(Form::Chunked, p, false, out, S);
    EXPECT_LT(rel(out, ref), 1e-5);
    EXPECT_LT(rel(S[0], Sref[0]), 1e-5);
}

TEST(CudaGdn, ChunkedStateCarriesAcrossCalls) {
    REQUIRE_GPU();
    const auto p = make_problem(Gdn{2, 4, 128, 128}, {137}, 901);
    std::vector<float> ref, one;
    std::vector<std::vector<float>> Sref, Sone;
    cpu_reference(p, ref, Sref);
    gpu_whole(Form::Chunked, p, false, one, Sone);

    // Prefill 100, then 37 more: the chunk boundaries move, so fp32-close, not equal.
    DeviceStates st(p.S0);
    std::vector<float> two(ref.size(), NAN);
    gpu_call(Form::Chunked, p, {0}, {100}, false, st, two);
    gpu_call(Form::Chunked, p, {100}, {137}, false, st, two);
    EXPECT_LT(rel(two, one), 1e-5);
    EXPECT_LT(rel(st.host(0), Sone[0]), 1e-5);
    EXPECT_LT(rel(two, ref), 1e-5);
    EXPECT_LT(rel(st.host(0), Sref[0]), 1e-5);
}

TEST(CudaGdn, DecodeAfterChunkedPrefillEqualsLongPrefill) {
    REQUIRE_GPU();
    const auto p = make_problem(Gdn{2, 4, 100, 128}, {72, 70}, 333);
    std::vector<float> ref, one;
    std::vector<std::vector<float>> Sref, Sone;
    cpu_reference(p, ref, Sref);
    gpu_whole(Form::Chunked, p, false, one, Sone);

    DeviceStates st(p.S0);
    std::vector<float> out(ref.size(), NAN);
    gpu_call(Form::Chunked, p, {0, 0}, {65, 63}, false, st, out);
    gpu_call(Form::Decode, p, {65, 63}, {66, 64}, false, st, out, true);
    gpu_call(Form::Decode, p, {66, 64}, {72, 70}, false, st, out);  // several tokens per sequence
    EXPECT_LT(rel(out, one), 1e-5);
    EXPECT_LT(rel(flat({st.host(0), st.host(1)}), flat(Sone)), 1e-5);
    EXPECT_LT(rel(out, ref), 1e-5);
    EXPECT_LT(rel(flat({st.host(0), st.host(1)}), flat(Sref)), 1e-5);
}

TEST(CudaGdn, ChunkedPackedBatchEqualsOneByOne) {
    REQUIRE_GPU();
    const std::vector<size_t> lens = {300, 1, 0, 64, 65, 17};
    const auto p = make_problem(Gdn{2, 4, 100, 100}, lens, 555);
    std::vector<float> ref, out;
    std::vector<std::vector<float>> Sref, S;
    cpu_reference(p, ref, Sref);
    gpu_whole(Form::Chunked, p, false, out, S);
    EXPECT_LT(rel(out, ref), 1e-5);
    EXPECT_LT(rel(flat(S), flat(Sref)), 1e-5);
    EXPECT_EQ(S[2], p.S0[2]) << "a sequence with no tokens keeps its state";

    // Alone, each sequence's blocks do exactly what they did in the batch: the same bits.
    for (size_t q = 0; q < lens.size(); ++q) {
        DeviceStates st(p.S0);
        std::vector<float> o(out.size(), NAN);
        std::vector<size_t> from(lens.size(), 0), to(lens.size(), 0);
        to[q] = lens[q];
        gpu_call(Form::Chunked, p, from, to, false, st, o);
        for (size_t t = p.starts[q]; t < p.starts[q + 1]; ++t)
            for (size_t i = 0; i < p.s.nv * p.s.dv; ++i)
                ASSERT_EQ(o[t * p.s.nv * p.s.dv + i], out[t * p.s.nv * p.s.dv + i]) << "sequence " << q << " token " << t;
        EXPECT_EQ(st.host(q), S[q]) << "sequence " << q;
    }
}

// ---- Causal conv1d -------------------------------------------------------------------------------

struct ConvProblem {
    size_t C, K;
    std::vector<size_t> lens, starts;
    std::vector<float> x, w;
    std::vector<std::vector<float>> S0;
};

ConvProblem make_conv(size_t C, size_t K, const std::vector<size_t>& lens, uint32_t seed) {
    ConvProblem p{C, K, lens, starts_of(lens), {}, randn(C * K, seed + 1, 0.5f), {}};
    p.x = randn(p.starts.back() * C, seed);
    for (size_t i = 0; i < lens.size(); ++i) p.S0.push_back(randn(C * (K - 1), seed + 2 + i));
    return p;
}

// Tokens [from[s], to[s]) of every sequence in one GPU call, outputs scattered into out.
void gpu_conv(const ConvProblem& p, const std::vector<size_t>& from, const std::vector<size_t>& to, DeviceStates& st,
              std::vector<float>& out, bool in_place) {
    std::vector<float> rows;
    std::vector<int32_t> starts{0};
    std::vector<size_t> where;
    for (size_t q = 0; q < p.lens.size(); ++q) {
        for (size_t t = p.starts[q] + from[q]; t < p.starts[q] + to[q]; ++t) {
            rows.insert(rows.end(), p.x.begin() + t * p.C, p.x.begin() + (t + 1) * p.C);
            where.push_back(t);
        }
        starts.push_back(static_cast<int32_t>(where.size()));
    }
    auto dx = to_device(rows), dw = to_device(p.w), ds = to_device(starts);
    DeviceBuffer dout(std::max<size_t>(rows.size() * 4, 4));
    Q3N_CUDA(cudaMemset(dout.get(), 0xff, dout.bytes()));
    float* o = in_place ? dx.as<float>() : dout.as<float>();
    cuda::causal_conv1d_silu(dx.as<float>(), int(p.C), dw.as<float>(), int(p.K), ds.as<int32_t>(),
                             int(p.lens.size()), st.get(), o, nullptr);
    const auto h = to_host(in_place ? dx : dout, rows.size());
    for (size_t i = 0; i < where.size(); ++i) std::copy_n(h.begin() + i * p.C, p.C, out.begin() + where[i] * p.C);
}

void cpu_conv(const ConvProblem& p, std::vector<float>& out, std::vector<std::vector<float>>& S) {
    S = p.S0;
    std::vector<float*> ptrs;
    for (auto& s : S) ptrs.push_back(s.data());
    out.assign(p.x.size(), NAN);
    cpu::causal_conv1d_silu(p.x.data(), p.C, p.w.data(), p.K, p.starts.data(), p.lens.size(), ptrs.data(), out.data(),
                            pool());
}

TEST(CudaConv, PrefillMatchesCpu) {
    REQUIRE_GPU();
    for (size_t K : {4u, 2u, 1u, 5u}) {
        for (size_t C : {300u, 8192u, 33u}) {
            const auto p = make_conv(C, K, {1, 70, 0, 2, 9}, uint32_t(C + K));
            std::vector<float> ref, out(p.x.size(), NAN);
            std::vector<std::vector<float>> Sref;
            cpu_conv(p, ref, Sref);
            DeviceStates st(p.S0);
            std::vector<size_t> from(p.lens.size(), 0);
            gpu_conv(p, from, p.lens, st, out, false);
            EXPECT_LT(rel(out, ref), 1e-6) << "K=" << K << " C=" << C;
            std::vector<std::vector<float>> S;
            for (size_t i = 0; i < p.lens.size(); ++i) S.push_back(st.host(i));
            if (K > 1) EXPECT_LT(rel(flat(S), flat(Sref)), 1e-6) << "K=" << K << " C=" << C;
            if (K > 1) EXPECT_EQ(S[2], p.S0[2]) << "a sequence with no tokens keeps its state";

            // In place: the same bits.
            DeviceStates st2(p.S0);
            std::vector<float> out2(p.x.size(), NAN);
            gpu_conv(p, from, p.lens, st2, out2, true);
            EXPECT_EQ(out2, out) << "K=" << K << " C=" << C;
        }
    }
}

TEST(CudaConv, DecodeAfterPrefillEqualsOnePrefill) {
    REQUIRE_GPU();
    const auto p = make_conv(1000, 4, {40, 12, 3}, 61);
    DeviceStates one(p.S0);
    std::vector<float> out_one(p.x.size(), NAN);
    gpu_conv(p, {0, 0, 0}, p.lens, one, out_one, false);

    DeviceStates st(p.S0);
    std::vector<float> out(p.x.size(), NAN);
    const std::vector<size_t> prefill = {37, 10, 1};
    gpu_conv(p, {0, 0, 0}, prefill, st, out, true);
    for (size_t step = 0; step < 3; ++step) {  // single-token decode steps; a finished sequence gets none
        std::vector<size_t> from, to;
        for (size_t q = 0; q < 3; ++q) {
            from.push_back(std::min(prefill[q] + step, p.lens[q]));
            to.push_back(std::min(prefill[q] + step + 1, p.lens[q]));
        }
        gpu_conv(p, from, to, st, out, false);
    }
    EXPECT_EQ(out, out_one);
    for (size_t i = 0; i < 3; ++i) EXPECT_EQ(st.host(i), one.host(i)) << i;
}

}  // namespace
