// The sparse-MoE CUDA kernels (cuda/next_ops.h: moe_route, moe_experts) against the CPU MoE
// (cpu::moe_route, cpu::moe_forward plus Qwen3-Next's shared expert as qwen3_next.cpp adds it) and
// against a per-token loop over each token's experts, on odd token counts, top-2 of 8, top-4 of 16,
// top-10 of 64 and of 512, BF16 and FP8 experts, experts that get no tokens, every token on the same
// experts, exact ties. Token counts cover each path: routing in one launch (up to 64 tokens) or two;
// FP8 experts (widths multiples of 16) on tensor cores, as decode GEMVs whose last blocks quantise the
// SwiGLU rows and sum each token's experts (up to 64 tokens) or as tiled GEMMs (65 and more), with
// widths that are not multiples of 128 (short scale groups) nor of the tiles; BF16 and odd widths on
// the CUDA-core path. Every call runs twice, on differently poisoned workspaces, and must repeat bit
// for bit. Qwen3-Next's router and shared-expert gate stacked into one [E + 1, H] matrix
// (DeviceWeights::upload_moe), with moe_route and moe_experts reading the logits and the gate at a row
// stride of E + 1, must give the logits, routing and output of the two run apart bit for bit.
// Skipped, with a message, without a GPU.
//
// Tolerances:
//   - Routing: expert ids and the permutation must be equal (both sides select on probabilities from
//     the same fp32 logits; random logits leave no near-ties at 1e-7); weights differ only by the
//     order of the softmax denominator's sum, ~sqrt(E) ulps (1e-6 at E = 512; it cancels when
//     renormalising): 1e-5 relative per weight.
//   - BF16 experts: fp32 sums of the same products in another order: relative L2 1e-5 per token.
//   - FP8 experts: x quantises to the same e4m3 codes on both sides (same rule, bit for bit), but the
//     SwiGLU output is quantised again, and a value within an fp32 rounding of an e4m3 midpoint can
//     round the other way (a flip, fixture_checks.h), moving that token's output by up to a few %.
//     So: every token within 5e-2, all but max(1, T/10) tokens within 1e-5 (a wrong scale or layout
//     is ~100% off everywhere).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "core/numeric.h"
#include "core/thread_pool.h"
#include "cpu/ops.h"
#include "cuda/cuda_backend.h"
#include "cuda/device_buffer.h"
#include "cuda/device_weights.h"
#include "cuda/next_ops.h"
#include "cuda_test_util.h"

using namespace q3n;
using cuda::DeviceBuffer;
using namespace q3n::cuda_test;

namespace {

// A random Linear of the given type with its storage.
struct HostLinear {
    Linear l;
    std::vector<uint16_t> bf16;
    std::vector<uint8_t> fp8;
    std::vector<float> f32;
};

void make_linear(HostLinear& h, WeightType type, size_t out, size_t in, std::mt19937& rng) {
    h.l.type = type;
    h.l.out = out;
    h.l.in = in;
    if (type == WeightType::F32) {
        h.f32 = randn(out * in, rng(), 0.05f);
        h.l.data = h.f32.data();
    } else if (type == WeightType::BF16) {
        const auto f = randn(out * in, rng(), 0.05f);
        h.bf16.resize(f.size());
        for (size_t i = 0; i < f.size(); ++i) h.bf16[i] = float_to_bf16(f[i]);
        h.l.data = h.bf16.data();
    } else {
        h.fp8.resize(out * in);
        std::uniform_int_distribution<int> code(0, 253);
        for (auto& v : h.fp8) {
            const int c = code(rng);
            v = static_cast<uint8_t>(c == 0x7f ? 0x7e : c);  // no NaN code in a valid checkpoint
        }
        h.l.data = h.fp8.data();
        h.l.scale_cols = (in + 127) / 128;
        h.l.block_scales = randn(((out + 127) / 128) * h.l.scale_cols, rng(), 0.002f);
        for (auto& s : h.l.block_scales) s = std::fabs(s) + 2e-4f;
    }
}

struct Case {
    WeightType type;
    size_t E, k, H, I;
    bool shared = false;
    size_t Is = 0;
    bool renormalize = true;
    std::vector<size_t> unused = {};  // experts the router never picks
};

// The experts of a case on the host (cpu::MoeExpert views) and on the device (one buffer for all
// weights, one for all scales, each matrix 256-byte aligned).
struct Experts {
    std::vector<HostLinear> mats;  // 3 per expert: gate, up, down; the shared expert last
    std::vector<cpu::MoeExpert> cpu;
    cpu::MoeExpert shared;
    DeviceBuffer data, scales, table;

    Experts(const Case& c, uint32_t seed) {
        std::mt19937 rng(seed);
        const size_t n = c.E + (c.shared ? 1 : 0);
        mats.resize(3 * n);
        for (size_t e = 0; e < n; ++e) {
            const size_t I = e < c.E ? c.I : c.Is;
            make_linear(mats[3 * e], c.type, I, c.H, rng);
            make_linear(mats[3 * e + 1], c.type, I, c.H, rng);
            make_linear(mats[3 * e + 2], c.type, c.H, I, rng);
        }
        for (size_t e = 0; e < c.E; ++e) cpu.push_back({mats[3 * e].l, mats[3 * e + 1].l, mats[3 * e + 2].l});
        if (c.shared) shared = {mats[3 * c.E].l, mats[3 * c.E + 1].l, mats[3 * c.E + 2].l};

        const size_t elem = c.type == WeightType::BF16 ? 2 : 1;
        std::vector<size_t> at, sat;
        size_t bytes = 0, sbytes = 0;
        for (const auto& m : mats) {
            at.push_back(bytes);
            sat.push_back(sbytes);
            bytes += (m.l.out * m.l.in * elem + 255) & ~size_t{255};
            sbytes += (m.l.block_scales.size() * 4 + 255) & ~size_t{255};
        }
        data = DeviceBuffer(bytes);
        scales = DeviceBuffer(std::max<size_t>(sbytes, 4));
        std::vector<cuda::DeviceLinear> dl;
        for (size_t i = 0; i < mats.size(); ++i) {
            const Linear& l = mats[i].l;
            auto* d = static_cast<char*>(data.get()) + at[i];
            Q3N_CUDA(cudaMemcpy(d, l.data, l.out * l.in * elem, cudaMemcpyHostToDevice));
            float* s = nullptr;
            if (!l.block_scales.empty()) {
                s = reinterpret_cast<float*>(static_cast<char*>(scales.get()) + sat[i]);
                Q3N_CUDA(cudaMemcpy(s, l.block_scales.data(), l.block_scales.size() * 4, cudaMemcpyHostToDevice));
            }
            dl.push_back({l.type, d, s, int(l.out), int(l.in), int(l.scale_cols)});
        }
        std::vector<cuda::DeviceMoeExpert> t;
        for (size_t e = 0; e < n; ++e) t.push_back({dl[3 * e], dl[3 * e + 1], dl[3 * e + 2]});
        table = to_device(t);
    }
};

// An F32 router [E, H]. x's last channel is the constant 1, so the router's last column is a bias:
// -1000 there keeps an expert from ever being picked.
Linear make_router(const Case& c, std::vector<float>& storage, uint32_t seed) {
    storage = randn(c.E * c.H, seed, 0.3f);
    for (size_t e = 0; e < c.E; ++e) storage[e * c.H + c.H - 1] = 0.0f;
    for (size_t e : c.unused) storage[e * c.H + c.H - 1] = -1000.0f;
    Linear r;
    r.type = WeightType::F32;
    r.out = c.E;
    r.in = c.H;
    r.data = storage.data();
    return r;
}

struct DeviceRouting {
    DeviceBuffer experts, weights, offsets, order, position, active;
    cuda::MoeRouting r;
    DeviceRouting(size_t T, size_t E, size_t k)
        : experts(T * k * 4 + 4), weights(T * k * 4 + 4), offsets((E + 1) * 4), order(T * k * 4 + 4),
          position(T * k * 4 + 4), active((E + 1) * 4) {
        r = {experts.as<int32_t>(), weights.as<float>(), offsets.as<int32_t>(), order.as<int32_t>(),
             position.as<int32_t>(), active.as<int32_t>()};
    }
};

// cpu::moe_forward's counting sort, written out: the permutation the GPU must produce.
void expected_permutation(const std::vector<int32_t>& experts, size_t E, std::vector<int32_t>& offsets,
                          std::vector<int32_t>& order, std::vector<int32_t>& active) {
    offsets.assign(E + 1, 0);
    for (int32_t e : experts) ++offsets[e + 1];
    active = {0};
    for (size_t e = 0; e < E; ++e) {
        if (offsets[e + 1] > 0) active.push_back(int32_t(e));
        offsets[e + 1] += offsets[e];
    }
    active[0] = int32_t(active.size() - 1);
    order.assign(experts.size(), -1);
    std::vector<int32_t> cursor(offsets.begin(), offsets.end() - 1);
    for (size_t i = 0; i < experts.size(); ++i) order[cursor[experts[i]]++] = int32_t(i);
}

// The per-token reference: each token's experts in ascending index order, one cpu::linear row at a time.
std::vector<float> per_token_loop(const Case& c, const Experts& ex, const std::vector<float>& x, size_t T,
                                  const std::vector<int32_t>& experts, const std::vector<float>& weights,
                                  const std::vector<float>& sg) {
    std::vector<float> y(T * c.H, 0.0f);
    for (size_t t = 0; t < T; ++t) {
        std::vector<std::pair<int32_t, float>> picks;
        for (size_t j = 0; j < c.k; ++j) picks.push_back({experts[t * c.k + j], weights[t * c.k + j]});
        std::sort(picks.begin(), picks.end());
        auto run = [&](const cpu::MoeExpert& e, float w) {
            const size_t I = e.gate.out;
            std::vector<float> g(I), u(I), o(c.H);
            cpu::linear(x.data() + t * c.H, 1, e.gate, g.data(), pool());
            cpu::linear(x.data() + t * c.H, 1, e.up, u.data(), pool());
            cpu::silu_mul(g.data(), u.data(), g.data(), I);
            cpu::linear(g.data(), 1, e.down, o.data(), pool());
            for (size_t h = 0; h < c.H; ++h) y[t * c.H + h] += w * o[h];
        };
        for (auto [e, w] : picks) run(ex.cpu[e], w);
        if (c.shared) run(ex.shared, 1.0f / (1.0f + std::exp(-sg[t])));
    }
    return y;
}

// Per-token comparison with the tolerance rule of the file header.
void expect_close(const Case& c, const std::vector<float>& got, const std::vector<float>& ref, size_t T,
                  const char* what) {
    size_t loose = 0;
    double worst = 0;
    for (size_t t = 0; t < T; ++t) {
        const double r = rel(got.data() + t * c.H, ref.data() + t * c.H, c.H);
        worst = std::max(worst, r);
        if (c.type == WeightType::BF16) {
            EXPECT_LT(r, 1e-5) << what << " token " << t;
        } else {
            EXPECT_LT(r, 5e-2) << what << " token " << t;
            loose += r >= 1e-5;
        }
    }
    EXPECT_LE(loose, std::max<size_t>(1, T / 10)) << what << ": tokens off by more than 1e-5 (worst " << worst << ")";
}

template <typename T>
void expect_same_bits(const std::vector<T>& got, const std::vector<T>& want, const char* what) {
    ASSERT_EQ(got.size(), want.size()) << what;
    for (size_t i = 0; i < got.size(); ++i)
        if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) {
            ADD_FAILURE() << what << ": first difference at " << i << " (" << got[i] << " vs " << want[i] << ")";
            return;
        }
}

void check_moe(const Case& c, size_t T, uint32_t seed) {
    SCOPED_TRACE(testing::Message() << weight_type_name(c.type) << " E=" << c.E << " k=" << c.k << " H=" << c.H
                                    << " I=" << c.I << " shared=" << c.shared << " T=" << T);
    const Experts ex(c, seed);
    std::vector<float> router_storage;
    const Linear router = make_router(c, router_storage, seed + 1);
    auto x = randn(T * c.H, seed + 2);
    for (size_t t = 0; t < T; ++t) x[t * c.H + c.H - 1] = 1.0f;
    const auto sg = randn(T, seed + 3, 2.0f);

    // CPU: the block as the models run it, and its routing.
    const cpu::MoeBlock block{&router, ex.cpu.data(), c.E, c.k, c.renormalize};
    cpu::MoeScratch scratch;
    std::vector<float> ref(T * c.H);
    cpu::moe_forward(x.data(), T, block, ref.data(), scratch, pool());
    if (c.shared) {
        const size_t I = c.Is;
        std::vector<float> g(T * I), u(T * I), o(T * c.H);
        cpu::linear(x.data(), T, ex.shared.gate, g.data(), pool());
        cpu::linear(x.data(), T, ex.shared.up, u.data(), pool());
        cpu::silu_mul(g.data(), u.data(), g.data(), T * I);
        cpu::linear(g.data(), T, ex.shared.down, o.data(), pool());
        for (size_t t = 0; t < T; ++t) {
            const float s = 1.0f / (1.0f + std::exp(-sg[t]));
            for (size_t h = 0; h < c.H; ++h) ref[t * c.H + h] += s * o[t * c.H + h];
        }
    }
    std::vector<float> logits(T * c.E), wref(T * c.k);
    std::vector<int32_t> eref(T * c.k);
    cpu::linear(x.data(), T, router, logits.data(), pool());
    cpu::moe_route(logits.data(), T, c.E, c.k, c.renormalize, eref.data(), wref.data());

    // GPU: routing from the same logits, then the experts.
    auto dlogits = to_device(logits), dx = to_device(x), dsg = to_device(sg);
    DeviceRouting dr(T, c.E, c.k);
    cuda::moe_route(dlogits.as<float>(), int(T), int(c.E), int(c.k), c.renormalize, dr.r, nullptr);
    cuda::DeviceMoe m;
    m.type = c.type;
    m.experts = ex.table.as<cuda::DeviceMoeExpert>();
    m.num_experts = int(c.E);
    m.top_k = int(c.k);
    m.hidden = int(c.H);
    m.inter = int(c.I);
    m.has_shared = c.shared;
    m.shared_inter = int(c.Is);
    DeviceBuffer ws(cuda::moe_workspace_bytes(m, int(T))), dy(T * c.H * 4);
    Q3N_CUDA(cudaMemset(ws.get(), 0xff, ws.bytes()));  // NaN poison: nothing may read what was not written
    Q3N_CUDA(cudaMemset(dy.get(), 0xff, dy.bytes()));
    cuda::moe_experts(dx.as<float>(), int(T), m, dr.r, c.shared ? dsg.as<float>() : nullptr, dy.as<float>(), ws.get(),
                      nullptr);
    const auto y = to_host(dy, T * c.H);
    // Again, on a workspace poisoned differently: the same bits (fixed summation orders, no atomics).
    Q3N_CUDA(cudaMemset(ws.get(), 0x7f, ws.bytes()));
    cuda::moe_experts(dx.as<float>(), int(T), m, dr.r, c.shared ? dsg.as<float>() : nullptr, dy.as<float>(), ws.get(),
                      nullptr);
    const auto again = to_host(dy, T * c.H);
    EXPECT_EQ(0, std::memcmp(y.data(), again.data(), y.size() * sizeof(float))) << "two runs differ";

    // The fused launch from the same logits (1-8 tokens, FP8 experts; routing in every block, its
    // counters cleared by its own prologue): moe_route + moe_experts' y bit for bit, on workspaces
    // poisoned both ways.
    if (cuda::moe_forward_fusable(m, int(T))) {
        DeviceBuffer dy_fused(T * c.H * 4);
        for (int poison : {0xff, 0x7f}) {
            Q3N_CUDA(cudaMemset(ws.get(), poison, ws.bytes()));
            Q3N_CUDA(cudaMemset(dy_fused.get(), 0xff, dy_fused.bytes()));
            cuda::moe_forward_fused(dlogits.as<float>(), int(c.E), int(T), m, c.renormalize, dx.as<float>(),
                                    c.shared ? dsg.as<float>() : nullptr, dy_fused.as<float>(), ws.get(), nullptr);
            expect_same_bits(to_host(dy_fused, T * c.H), y, "moe_forward_fused vs moe_route + moe_experts");
        }
    }

    // Routing.
    const auto ge = to_host<int32_t>(dr.experts, T * c.k);
    const auto gw = to_host(dr.weights, T * c.k);
    ASSERT_EQ(ge, eref);
    for (size_t i = 0; i < gw.size(); ++i) EXPECT_NEAR(gw[i], wref[i], 1e-5 * std::fabs(wref[i]) + 1e-12) << i;
    std::vector<int32_t> offsets, order, active;
    expected_permutation(eref, c.E, offsets, order, active);
    EXPECT_EQ(to_host<int32_t>(dr.offsets, c.E + 1), offsets);
    EXPECT_EQ(to_host<int32_t>(dr.order, T * c.k), order);
    const auto gact = to_host<int32_t>(dr.active, c.E + 1);
    EXPECT_EQ(std::vector<int32_t>(gact.begin(), gact.begin() + active.size()), active);
    const auto pos = to_host<int32_t>(dr.position, T * c.k);
    for (size_t p = 0; p < order.size(); ++p) EXPECT_EQ(pos[order[p]], int32_t(p));
    for (size_t e : c.unused) EXPECT_EQ(offsets[e + 1] - offsets[e], 0) << "expert " << e << " got tokens";

    // Output, against the block and against the per-token loop.
    expect_close(c, y, ref, T, "vs cpu::moe_forward");
    expect_close(c, y, per_token_loop(c, ex, x, T, eref, wref, sg), T, "vs per-token loop");
}

TEST(CudaMoe, Top2Of8) {
    REQUIRE_GPU();
    for (WeightType type : {WeightType::BF16, WeightType::FP8_E4M3})
        for (size_t T : {1u, 3u, 17u, 100u}) check_moe(Case{type, 8, 2, 256, 128}, T, 10 + uint32_t(T));
}

TEST(CudaMoe, Top10Of64OddSizes) {
    REQUIRE_GPU();  // H = 200, I = 72: not multiples of 16 (scalar path) nor of 128 (short FP8 groups)
    for (WeightType type : {WeightType::BF16, WeightType::FP8_E4M3})
        for (size_t T : {1u, 3u, 17u, 100u}) check_moe(Case{type, 64, 10, 200, 72}, T, 20 + uint32_t(T));
}

TEST(CudaMoe, Top10Of64NoRenormalisation) {
    REQUIRE_GPU();
    Case c{WeightType::BF16, 64, 10, 256, 64};
    c.renormalize = false;
    check_moe(c, 17, 33);
}

TEST(CudaMoe, ExpertsWithoutTokensAreSkipped) {
    REQUIRE_GPU();
    for (WeightType type : {WeightType::BF16, WeightType::FP8_E4M3}) {
        Case c{type, 8, 2, 256, 128};
        c.unused = {0, 3, 4, 7};
        for (size_t T : {1u, 17u}) check_moe(c, T, 40 + uint32_t(T));
    }
}

TEST(CudaMoe, Top10Of512WithSharedExpert) {
    REQUIRE_GPU();  // Qwen3-Next's routing shape with small hidden sizes; shared width != routed width
    for (WeightType type : {WeightType::BF16, WeightType::FP8_E4M3}) {
        Case c{type, 512, 10, 128, 32, true, 48};
        for (size_t T : {1u, 3u, 17u, 100u}) check_moe(c, T, 50 + uint32_t(T));
    }
}

TEST(CudaMoe, SharedExpertOddSizes) {
    REQUIRE_GPU();
    for (WeightType type : {WeightType::BF16, WeightType::FP8_E4M3}) {
        Case c{type, 8, 2, 200, 136, true, 100};
        for (size_t T : {1u, 17u}) check_moe(c, T, 60 + uint32_t(T));
    }
}

TEST(CudaMoe, Fp8TensorCorePathsEveryTokenCount) {
    REQUIRE_GPU();  // up to 64: decode GEMVs (several 8-row passes at 33 and 64); 65+: tiled GEMMs, several per expert
    for (size_t T : {1u, 3u, 4u, 5u, 8u, 33u, 64u, 65u, 300u, 1024u})
        check_moe(Case{WeightType::FP8_E4M3, 16, 4, 512, 256}, T, 70 + uint32_t(T));
}

TEST(CudaMoe, Fp8ShortGroupsAndPartialTiles) {
    REQUIRE_GPU();  // K = 208, 80, 48: multiples of 16, not of 128; 80 and 208 rows: partial 64- and 128-row tiles
    for (size_t T : {1u, 8u, 65u, 200u}) {
        Case c{WeightType::FP8_E4M3, 8, 2, 208, 80, true, 48};
        check_moe(c, T, 90 + uint32_t(T));
    }
}

TEST(CudaMoe, Fp8WideHiddenIdleWarps) {
    REQUIRE_GPU();  // hidden 1280: 10 groups, two per warp with three warps idle; down K = 384
    for (size_t T : {1u, 8u, 100u}) check_moe(Case{WeightType::FP8_E4M3, 8, 2, 1280, 384}, T, 110 + uint32_t(T));
}

TEST(CudaMoe, Fp8WideShapesFourGroupsPerWarp) {
    REQUIRE_GPU();  // hidden 3072 and intermediate 1536 (Qwen3-235B's widths are 4096 and 1536): 3-4 groups a warp
    for (size_t T : {1u, 8u, 70u}) check_moe(Case{WeightType::FP8_E4M3, 4, 2, 3072, 1536}, T, 130 + uint32_t(T));
}

TEST(CudaMoe, EveryTokenOnTheSameExperts) {
    REQUIRE_GPU();  // each used expert gets every token: many 8-row passes (decode) and 64-row tiles (prefill)
    for (WeightType type : {WeightType::BF16, WeightType::FP8_E4M3})
        for (size_t T : {3u, 33u, 300u}) {
            Case c{type, 16, 4, 256, 128};
            for (size_t e = 0; e < 16; ++e)
                if (e != 2 && e != 5 && e != 7 && e != 11) c.unused.push_back(e);
            check_moe(c, T, 120 + uint32_t(T));
        }
}

TEST(CudaMoe, NextShapeWithSharedExpertAllPaths) {
    REQUIRE_GPU();  // top-10 of 64 with a wider shared expert, from one token to prefill
    for (WeightType type : {WeightType::BF16, WeightType::FP8_E4M3})
        for (size_t T : {1u, 4u, 9u, 64u, 300u}) {
            Case c{type, 64, 10, 256, 64, true, 128};
            check_moe(c, T, 140 + uint32_t(T));
        }
}

// The runner's two ways through a Qwen3-Next MoE block: router and shared gate uploaded and run apart
// (logits [T, E], gate [T]), or stacked by upload_moe and run as one linear (logits [T, E + 1], the
// gate in column E) read in place by moe_route and moe_experts. The GEMV computes each output row on
// its own, so every result must be the same bits. The runner stacks only up to kGemvMaxRows rows;
// past that the strided buffer is filled from the apart results, which still checks the strided
// reads (two-launch routing past 64 tokens, the prefill paths' shared term), and the router and gate
// views of the stacked rows must give what the apart uploads give through project().
void check_stacked_router(const Case& c, WeightType router_type, size_t T, uint32_t seed) {
    SCOPED_TRACE(testing::Message() << "experts " << weight_type_name(c.type) << " router "
                                    << weight_type_name(router_type) << " E=" << c.E << " k=" << c.k << " H=" << c.H
                                    << " T=" << T);
    const int E = int(c.E), ld = E + 1, rows = int(T);
    const Experts ex(c, seed);
    std::mt19937 rng(seed + 1);
    HostLinear router, gate;
    make_linear(router, router_type, c.E, c.H, rng);
    make_linear(gate, router_type, 1, c.H, rng);
    const auto x = randn(T * c.H, seed + 2);

    cuda::DeviceWeights stacked_w(nullptr, false), apart_w(nullptr, false);
    const cuda::DeviceMoeBlock b = stacked_w.upload_moe(router.l, ex.cpu, c.k, &ex.shared, &gate.l);
    ASSERT_NE(b.router_gate.data, nullptr) << "router and shared gate were not stacked";
    EXPECT_EQ(b.router_gate.out, E + 1);
    EXPECT_EQ(b.router.out, E);
    EXPECT_EQ(b.shared_gate.out, 1);
    size_t params = (c.E + 1) * c.H;
    for (const auto& m : ex.mats) params += m.l.out * m.l.in;
    EXPECT_EQ(stacked_w.stats().parameter_count, params) << "the stacked rows are counted once";
    const cuda::DeviceLinear router_d = apart_w.upload(router.l), gate_d = apart_w.upload(gate.l);
    cuda::GemmScratch scratch;
    stacked_w.size_gemm_scratch(scratch, T, c.H);
    apart_w.size_gemm_scratch(scratch, T, c.H);

    auto dx = to_device(x);
    DeviceBuffer logits(T * c.E * 4), sg(T * 4), view_logits(T * c.E * 4), view_sg(T * 4), stacked(T * ld * 4);
    for (DeviceBuffer* buf : {&logits, &sg, &view_logits, &view_sg, &stacked})
        Q3N_CUDA(cudaMemset(buf->get(), 0xff, buf->bytes()));  // NaN: every value read must have been written
    auto project = [&](const cuda::DeviceLinear& w, DeviceBuffer& y, int ldy) {
        cuda::project(dx.as<float>(), nullptr, nullptr, rows, w, y.as<float>(), ldy, scratch, nullptr);
    };
    project(router_d, logits, E);
    project(gate_d, sg, 1);
    project(b.router, view_logits, E);
    project(b.shared_gate, view_sg, 1);
    const auto apart_logits = to_host(logits, T * c.E), apart_sg = to_host(sg, T);
    expect_same_bits(to_host(view_logits, T * c.E), apart_logits, "router view vs router uploaded alone");
    expect_same_bits(to_host(view_sg, T), apart_sg, "shared gate view vs gate uploaded alone");
    if (rows <= cuda::kGemvMaxRows) {
        project(b.router_gate, stacked, ld);
    } else {
        Q3N_CUDA(cudaMemcpy2D(stacked.get(), ld * 4, logits.get(), c.E * 4, c.E * 4, T, cudaMemcpyDeviceToDevice));
        Q3N_CUDA(cudaMemcpy2D(stacked.as<float>() + E, ld * 4, sg.get(), 4, 4, T, cudaMemcpyDeviceToDevice));
    }
    const auto both = to_host(stacked, T * ld);
    std::vector<float> st_logits(T * c.E), st_sg(T);
    for (size_t t = 0; t < T; ++t) {
        std::copy_n(both.begin() + t * ld, c.E, st_logits.begin() + t * c.E);
        st_sg[t] = both[t * ld + c.E];
    }
    expect_same_bits(st_logits, apart_logits, "stacked router columns vs router apart");
    expect_same_bits(st_sg, apart_sg, "stacked gate column vs gate apart");

    // Routing and the block, each way, from its own buffers.
    DeviceRouting ra(T, c.E, c.k), rs(T, c.E, c.k);
    cuda::moe_route(logits.as<float>(), rows, E, int(c.k), c.renormalize, ra.r, nullptr);
    cuda::moe_route(stacked.as<float>(), rows, E, int(c.k), c.renormalize, rs.r, nullptr, ld);
    DeviceBuffer ws(cuda::moe_workspace_bytes(b.moe, rows)), ya(T * c.H * 4), ys(T * c.H * 4);
    for (DeviceBuffer* buf : {&ws, &ya, &ys}) Q3N_CUDA(cudaMemset(buf->get(), 0xff, buf->bytes()));
    cuda::moe_experts(dx.as<float>(), rows, b.moe, ra.r, sg.as<float>(), ya.as<float>(), ws.get(), nullptr);
    cuda::moe_experts(dx.as<float>(), rows, b.moe, rs.r, stacked.as<float>() + E, ys.as<float>(), ws.get(), nullptr, ld);

    const size_t n = T * c.k;
    expect_same_bits(to_host<int32_t>(rs.experts, n), to_host<int32_t>(ra.experts, n), "experts");
    expect_same_bits(to_host(rs.weights, n), to_host(ra.weights, n), "weights");
    expect_same_bits(to_host<int32_t>(rs.offsets, c.E + 1), to_host<int32_t>(ra.offsets, c.E + 1), "offsets");
    expect_same_bits(to_host<int32_t>(rs.order, n), to_host<int32_t>(ra.order, n), "order");
    expect_same_bits(to_host<int32_t>(rs.position, n), to_host<int32_t>(ra.position, n), "position");
    const auto act_a = to_host<int32_t>(ra.active, c.E + 1), act_s = to_host<int32_t>(rs.active, c.E + 1);
    ASSERT_EQ(act_s[0], act_a[0]);
    ASSERT_TRUE(act_a[0] >= 1 && act_a[0] <= E);
    expect_same_bits(std::vector<int32_t>(act_s.begin(), act_s.begin() + 1 + act_s[0]),
                     std::vector<int32_t>(act_a.begin(), act_a.begin() + 1 + act_a[0]), "active experts");
    const auto y_apart = to_host(ya, T * c.H);
    for (float v : y_apart) ASSERT_FALSE(std::isnan(v)) << "the block left part of y unwritten";
    expect_same_bits(to_host(ys, T * c.H), y_apart, "block output");

    // moe_forward (and the fused launch, where it applies) reading the stacked rows in place, as the
    // runner calls it at decode sizes.
    for (bool fused : {false, true}) {
        if (fused && !cuda::moe_forward_fusable(b.moe, rows)) continue;
        Q3N_CUDA(cudaMemset(ws.get(), 0xff, ws.bytes()));
        Q3N_CUDA(cudaMemset(ys.get(), 0xff, ys.bytes()));
        if (fused)
            cuda::moe_forward_fused(stacked.as<float>(), ld, rows, b.moe, c.renormalize, dx.as<float>(),
                                    stacked.as<float>() + E, ys.as<float>(), ws.get(), nullptr, ld);
        else
            cuda::moe_forward(stacked.as<float>(), ld, rows, b.moe, c.renormalize, rs.r, dx.as<float>(),
                              stacked.as<float>() + E, ys.as<float>(), ws.get(), nullptr, ld);
        expect_same_bits(to_host(ys, T * c.H), y_apart, fused ? "fused launch on the stacked rows" : "moe_forward");
    }
}

TEST(CudaMoe, StackedRouterAndSharedGateMatchApart) {
    REQUIRE_GPU();  // FP8 experts: decode GEMVs up to 64 tokens, tiled GEMMs past; BF16: CUDA cores + unpermute
    for (WeightType type : {WeightType::BF16, WeightType::FP8_E4M3})
        for (size_t T : {1u, 3u, 8u, 17u, 100u})
            check_stacked_router(Case{type, 64, 10, 256, 64, true, 128}, WeightType::BF16, T, 160 + uint32_t(T));
}

TEST(CudaMoe, StackedRouterNextRoutingShapeAndF32) {
    REQUIRE_GPU();  // 512 experts, top-10 (Qwen3-Next's routing); an F32 router|gate takes the F32 GEMV
    for (WeightType router : {WeightType::BF16, WeightType::F32})
        for (size_t T : {1u, 8u, 65u})
            check_stacked_router(Case{WeightType::FP8_E4M3, 512, 10, 128, 32, true, 48}, router, T, 180 + uint32_t(T));
}

TEST(CudaMoe, StackedRouterOddWidths) {
    REQUIRE_GPU();  // hidden 196: the scalar GEMV (not a multiple of 8) and the scalar expert path
    for (size_t T : {1u, 5u, 17u})
        check_stacked_router(Case{WeightType::BF16, 8, 2, 196, 136, true, 100}, WeightType::BF16, T, 200 + uint32_t(T));
}

TEST(CudaMoe, FusedDecodeAtQwen3NextAndQwen3MoeShapes) {
    REQUIRE_GPU();  // the real expert shapes: gate/up stages of 32 KB, down runs of 64 (I = 512) and 32 (I = 768) rows
    Case next{WeightType::FP8_E4M3, 32, 10, 2048, 512, true, 512};
    for (size_t T : {1u, 2u, 7u, 8u}) check_moe(next, T, 220 + uint32_t(T));
    for (size_t T : {1u, 8u}) check_moe(Case{WeightType::FP8_E4M3, 16, 8, 2048, 768}, T, 230 + uint32_t(T));
}

TEST(CudaMoe, FusedDecodeTakesOneToEightTokens) {
    REQUIRE_GPU();  // which blocks the fused launch takes: FP8 experts on the tensor-core path, 1-8 tokens
    cuda::DeviceMoe m;
    m.type = WeightType::FP8_E4M3;
    m.num_experts = 64;
    m.top_k = 10;
    m.hidden = 256;
    m.inter = 64;
    m.has_shared = true;
    m.shared_inter = 128;
    for (int T = 1; T <= 8; ++T) EXPECT_TRUE(cuda::moe_forward_fusable(m, T)) << T;
    EXPECT_FALSE(cuda::moe_forward_fusable(m, 0));
    EXPECT_FALSE(cuda::moe_forward_fusable(m, 9));
    m.hidden = 200;  // not a multiple of 16: the CUDA-core path
    EXPECT_FALSE(cuda::moe_forward_fusable(m, 1));
    m.hidden = 256;
    m.type = WeightType::BF16;
    EXPECT_FALSE(cuda::moe_forward_fusable(m, 1));
}

// One or two decode tokens over 128-1024 experts take the block routing (a thread per expert, picks
// ranked among the experts that reach a threshold; more than 32 such candidates fall back to the
// warp routing). Against cpu::moe_route on rows that keep the candidates few (normal logits) and on
// rows that overflow them (all equal, integer ties, near-uniform, NaN, -inf): experts and the
// permutation exactly, weights to 1e-5 relative (the CPU sums the softmax in another order).
TEST(CudaMoe, BlockRouteMatchesCpuOnFewAndManyCandidates) {
    REQUIRE_GPU();
    struct Shape {
        size_t E, k, T;
    };
    for (const Shape sh : {Shape{512, 10, 1}, Shape{512, 10, 2}, Shape{500, 10, 1}, Shape{128, 8, 1}, Shape{1024, 16, 1},
                           Shape{256, 4, 1}}) {
        std::mt19937 rng(uint32_t(sh.E * 31 + sh.k * 7 + sh.T));
        std::normal_distribution<float> normal(0.0f, 1.0f);
        for (int kind = 0; kind < 6; ++kind) {
            SCOPED_TRACE(testing::Message() << "E=" << sh.E << " k=" << sh.k << " T=" << sh.T << " kind=" << kind);
            std::vector<float> logits(sh.T * sh.E);
            for (size_t i = 0; i < logits.size(); ++i) {
                const float v = normal(rng);
                switch (kind) {
                    case 0: logits[i] = v; break;                           // a dozen candidates
                    case 1: logits[i] = 0.5f; break;                        // all equal
                    case 2: logits[i] = std::floor(v * 2.0f); break;        // integer ties
                    case 3: logits[i] = v * 1e-3f; break;                   // near-uniform
                    case 4: logits[i] = i % 7 == 3 ? NAN : v; break;        // NaN ranks below every number
                    default: logits[i] = i % 5 == 1 ? -INFINITY : v; break;  // experts with zero probability
                }
            }
            std::vector<int32_t> eref(sh.T * sh.k);
            std::vector<float> wref(sh.T * sh.k);
            cpu::moe_route(logits.data(), sh.T, sh.E, sh.k, true, eref.data(), wref.data());
            auto dl = to_device(logits);
            DeviceRouting dr(sh.T, sh.E, sh.k);
            cuda::moe_route(dl.as<float>(), int(sh.T), int(sh.E), int(sh.k), true, dr.r, nullptr);
            ASSERT_EQ(to_host<int32_t>(dr.experts, sh.T * sh.k), eref);
            const auto gw = to_host(dr.weights, sh.T * sh.k);
            for (size_t i = 0; i < gw.size(); ++i) {
                if (std::isnan(wref[i]))  // a NaN logit makes every probability NaN, on both sides
                    EXPECT_TRUE(std::isnan(gw[i])) << i;
                else
                    EXPECT_NEAR(gw[i], wref[i], 1e-5 * std::fabs(wref[i]) + 1e-12) << i;
            }
            std::vector<int32_t> offsets, order, active;
            expected_permutation(eref, sh.E, offsets, order, active);
            EXPECT_EQ(to_host<int32_t>(dr.offsets, sh.E + 1), offsets);
            EXPECT_EQ(to_host<int32_t>(dr.order, sh.T * sh.k), order);
            const auto gact = to_host<int32_t>(dr.active, sh.E + 1);
            EXPECT_EQ(std::vector<int32_t>(gact.begin(), gact.begin() + active.size()), active);
            const auto pos = to_host<int32_t>(dr.position, sh.T * sh.k);
            for (size_t q = 0; q < order.size(); ++q) EXPECT_EQ(pos[order[q]], int32_t(q));
        }
    }
}

TEST(CudaMoe, RouteTiesAndNaN) {
    REQUIRE_GPU();
    // Token 0: all equal (picks 0, 1, 2); token 1: a tie for second place between 5 and 2 (2 first);
    // token 2: NaN logits rank below every number, as cpu::moe_route orders them.
    const size_t E = 8, k = 3, T = 3;
    std::vector<float> logits(T * E, 0.0f);
    for (size_t e = 0; e < E; ++e) logits[E + e] = -1.0f;
    logits[E + 7] = 2.0f;
    logits[E + 5] = 1.0f;
    logits[E + 2] = 1.0f;
    for (size_t e = 0; e < E; ++e) logits[2 * E + e] = float(e);
    logits[2 * E + 7] = NAN;
    std::vector<int32_t> eref(T * k);
    std::vector<float> wref(T * k);
    cpu::moe_route(logits.data(), T, E, k, true, eref.data(), wref.data());
    auto dl = to_device(logits);
    DeviceRouting dr(T, E, k);
    cuda::moe_route(dl.as<float>(), int(T), int(E), int(k), true, dr.r, nullptr);
    const auto ge = to_host<int32_t>(dr.experts, T * k);
    EXPECT_EQ(std::vector<int32_t>(ge.begin(), ge.begin() + 6), std::vector<int32_t>(eref.begin(), eref.begin() + 6));
    EXPECT_EQ(std::vector<int32_t>(ge.begin(), ge.begin() + 3), (std::vector<int32_t>{0, 1, 2}));
    EXPECT_EQ(std::vector<int32_t>(ge.begin() + 3, ge.begin() + 6), (std::vector<int32_t>{7, 2, 5}));
    EXPECT_EQ(std::vector<int32_t>(ge.begin() + 6, ge.end()), std::vector<int32_t>(eref.begin() + 6, eref.end()));
}

}  // namespace
