// Qwen3-VL on CUDA: the vision tower's kernels (cuda/vision_ops.h) against their CPU twins, the GPU
// tower (cuda/qwen3_vl_vision_cuda.h) against the CPU tower and transformers on the fixtures
// (tests/fixtures/qwen3_vl/*), and the VL runner (cuda/qwen3_vl_cuda.cu) end to end against
// transformers' last logits and the CPU runner. Skipped, with a message, without a GPU.
//
// Tolerances (relative L2 unless said otherwise):
//   - Kernels with fp32 arithmetic (layer_norm, pos_embed, rope_2d, attention, the MRoPE qk-norm):
//     1e-5, summation order and CUDA's libm against glibc only.
//   - vision_gemm against a host product of the same bf16-rounded activations and bf16 weights: 1e-5
//     (fp32 accumulation order only), so the rounding itself is checked exactly.
//   - The GPU tower against the CPU tower and transformers' fp32 outputs: 2e-2. The GEMMs round every
//     activation to bf16 (unit roundoff u = 2^-8); with random-sign roundings a dot product moves by
//     about u / sqrt(3) ~ 2.3e-3 of its size, independently of its length, and a tower chains a patch
//     embedding, six GEMMs per block and two per merger, with LayerNorms passing relative errors on:
//     a few 1e-3 expected after the fixtures' three blocks (printed). A composition mistake (a wrong
//     tap, merge order, GELU or axis) moves the outputs by 1e-1 or more.
//   - VL logits (BF16 fixtures) against transformers and against the CPU runner: 2e-2 where the CPU
//     test has 1e-4, since the vision features enter the decoder with the tower's bf16-GEMM error
//     (the decoder itself computes in fp32 as the CPU does); prompts without vision rows would stay
//     at 1e-4. FP8 fixture: the CPU test's 0.1 against the activation-quantising emulation and 0.3
//     against the plain reference (e4m3 rounding flips dominate). Greedy tokens: free-running up to
//     the first step whose reference margin is within 8x the largest logit error seen (the CPU test's
//     rule, so fewer steps are compared where the error is larger).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "core/numeric.h"
#include "cpu/ops.h"
#include "cuda/qwen3_vl_vision_cuda.h"
#include "cuda/vision_ops.h"
#include "cuda_test_util.h"
#include "model/config.h"
#include "model/qwen3_vl_vision.h"
#include "../fixture_checks.h"
#include "../fixture_util.h"
#include "../vl_fixture.h"

using namespace q3n;
using namespace q3n::cuda_test;
namespace fs = std::filesystem;

namespace {

const char* const kFixtures[] = {"bf16_dense_tied", "bf16_moe", "fp8_dense"};

float bf16_round(float v) { return bf16_to_float(float_to_bf16(v)); }

std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
    std::vector<uint16_t> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = float_to_bf16(v[i]);
    return o;
}

// ---- Kernels against their CPU twins --------------------------------------------------------------

TEST(CudaVisionOps, GemmMatchesHostProductOfBf16RoundedOperands) {
    REQUIRE_GPU();
    struct Shape {
        int rows, k, out;
    };
    // Edges of both tile heights (64 / 128), of the 128-wide column tile and of the 32-deep k slice.
    for (const Shape s : {Shape{37, 48, 70}, Shape{300, 200, 130}, Shape{1, 8, 3}, Shape{129, 1536, 257}}) {
        const auto x = randn(size_t(s.rows) * s.k, 11 + s.k, 1.0f);
        const auto wf = randn(size_t(s.out) * s.k, 12 + s.out, 1.0f / std::sqrt(float(s.k)));
        const auto bias = randn(s.out, 13, 0.1f);
        const auto wb = to_bf16(wf);
        const auto dx = to_device(x), dw = to_device(wb), db = to_device(bias);
        const auto y0 = randn(size_t(s.rows) * s.out, 14, 1.0f);
        std::vector<double> p(size_t(s.rows) * s.out);
        for (int m = 0; m < s.rows; ++m)
            for (int n = 0; n < s.out; ++n) {
                double acc = 0;
                for (int k = 0; k < s.k; ++k)
                    acc += double(bf16_round(x[size_t(m) * s.k + k])) * bf16_to_float(wb[size_t(n) * s.k + k]);
                p[size_t(m) * s.out + n] = acc + bias[n];
            }
        for (auto epi : {cuda::VisionEpilogue::Store, cuda::VisionEpilogue::GeluTanh, cuda::VisionEpilogue::GeluErf,
                         cuda::VisionEpilogue::Accumulate}) {
            auto dy = to_device(y0);
            cuda::vision_gemm(dx.as<float>(), s.rows, s.k, dw.as<__nv_bfloat16>(), s.out, db.as<float>(), dy.as<float>(),
                              s.out, epi, nullptr);
            const auto got = to_host(dy, y0.size());
            std::vector<float> want(y0.size());
            for (size_t i = 0; i < want.size(); ++i) {
                const double v = p[i];
                switch (epi) {
                    case cuda::VisionEpilogue::Store: want[i] = float(v); break;
                    case cuda::VisionEpilogue::GeluTanh:
                        want[i] = float(0.5 * v * (1 + std::tanh(0.7978845608028654 * (v + 0.044715 * v * v * v))));
                        break;
                    case cuda::VisionEpilogue::GeluErf: want[i] = float(0.5 * v * (1 + std::erf(v / std::sqrt(2.0)))); break;
                    case cuda::VisionEpilogue::Accumulate: want[i] = float(y0[i] + v); break;
                }
            }
            EXPECT_LT(rel(got, want), 1e-5) << s.rows << "x" << s.k << "x" << s.out << " epilogue " << int(epi) << ": "
                                            << diff_report(got, want);
        }
    }
}

TEST(CudaVisionOps, LayerNormMatchesCpu) {
    REQUIRE_GPU();
    for (int n : {48, 192, 1152, 4608}) {
        const int rows = 7;
        // A large mean over a small spread, as in the ViT's residual stream.
        auto x = randn(size_t(rows) * n, n, 0.5f);
        for (auto& v : x) v += 30.0f;
        const auto w = randn(n, 2, 0.2f), b = randn(n, 3, 0.1f);
        std::vector<float> want(x.size());
        cpu::layer_norm(x.data(), w.data(), b.data(), want.data(), rows, n, 1e-6f, pool());
        const auto dx = to_device(x), dw = to_device(w), dbias = to_device(b);
        cuda::DeviceBuffer dy(x.size() * 4);
        cuda::vision_layer_norm(dx.as<float>(), dw.as<float>(), dbias.as<float>(), dy.as<float>(), rows, n, 1e-6f, nullptr);
        const auto got = to_host(dy, x.size());
        EXPECT_LT(rel(got, want), 1e-6) << "n " << n << ": " << diff_report(got, want);
    }
}

TEST(CudaVisionOps, PosEmbedMatchesCpu) {
    REQUIRE_GPU();
    const size_t side = 8, hidden = 40;
    std::vector<float> tf = randn(side * side * hidden, 22, 1.0f);
    Linear t;
    t.type = WeightType::F32;
    t.data = tf.data();
    t.out = side * side;
    t.in = hidden;
    for (const GridThw g : {GridThw{1, 4, 6}, GridThw{2, 10, 6}, GridThw{1, 16, 2}}) {
        const size_t n = size_t(g.t) * g.h * g.w;
        std::vector<float> want(n * hidden);
        cpu::pos_embed_interpolate(t, side, &g, 1, 2, want.data());
        const auto x0 = randn(n * hidden, 23, 1.0f);
        for (size_t i = 0; i < want.size(); ++i) want[i] += x0[i];
        auto dx = to_device(x0);
        const auto dt = to_device(tf);
        cuda::vision_pos_embed_add(dx.as<float>(), dt.as<float>(), side, g.t, g.h, g.w, 2, hidden, nullptr);
        const auto got = to_host(dx, want.size());
        EXPECT_LT(rel(got, want), 1e-6) << g.t << "x" << g.h << "x" << g.w << ": " << diff_report(got, want);
    }
}

TEST(CudaVisionOps, Rope2dMatchesCpu) {
    REQUIRE_GPU();
    for (int hd : {24, 72}) {
        const int heads = 3, hidden = heads * hd;
        const GridThw g{2, 6, 8};
        const int n = g.t * g.h * g.w;
        const auto qkv = randn(size_t(n) * 3 * hidden, 31 + hd, 1.0f);
        std::vector<int32_t> coords(2 * n);
        cpu::vision_patch_coords(&g, 1, 2, coords.data());
        std::vector<float> q(size_t(n) * hidden), k(q.size());
        for (int t = 0; t < n; ++t) {
            std::copy_n(&qkv[size_t(t) * 3 * hidden], hidden, &q[size_t(t) * hidden]);
            std::copy_n(&qkv[size_t(t) * 3 * hidden + hidden], hidden, &k[size_t(t) * hidden]);
        }
        cpu::vision_rope_2d(q.data(), n, heads, hd, coords.data(), 10000.0f);
        cpu::vision_rope_2d(k.data(), n, heads, hd, coords.data(), 10000.0f);
        std::vector<float> inv(hd / 4);
        for (int i = 0; i < hd / 4; ++i) inv[i] = float(1.0 / std::pow(10000.0, (2.0 * i) / (hd / 2)));
        auto d = to_device(qkv);
        const auto di = to_device(inv);
        cuda::vision_rope_2d(d.as<float>(), n, heads, hd, g.h, g.w, 2, di.as<float>(), nullptr);
        const auto got = to_host(d, qkv.size());
        std::vector<float> want = qkv;
        for (int t = 0; t < n; ++t) {
            std::copy_n(&q[size_t(t) * hidden], hidden, &want[size_t(t) * 3 * hidden]);
            std::copy_n(&k[size_t(t) * hidden], hidden, &want[size_t(t) * 3 * hidden + hidden]);
        }
        EXPECT_LT(rel(got, want), 1e-6) << "head_dim " << hd << ": " << diff_report(got, want);
    }
}

TEST(CudaVisionOps, SegmentAttentionMatchesCpu) {
    REQUIRE_GPU();
    for (int hd : {24, 64, 72, 80, 128}) {
        const int heads = 2, hidden = heads * hd, segments = 2, len = 150;  // a partial key tile and query block
        const int n = segments * len;
        const auto qkv = randn(size_t(n) * 3 * hidden, 41 + hd, 1.0f);
        std::vector<float> q(size_t(n) * hidden), k(q.size()), v(q.size()), want(q.size());
        for (int t = 0; t < n; ++t) {
            std::copy_n(&qkv[size_t(t) * 3 * hidden], hidden, &q[size_t(t) * hidden]);
            std::copy_n(&qkv[size_t(t) * 3 * hidden + hidden], hidden, &k[size_t(t) * hidden]);
            std::copy_n(&qkv[size_t(t) * 3 * hidden + 2 * hidden], hidden, &v[size_t(t) * hidden]);
        }
        const uint32_t cu[] = {0, uint32_t(len), uint32_t(n)};
        const float scale = 1.0f / std::sqrt(float(hd));
        cpu::segment_attention(q.data(), k.data(), v.data(), n, heads, hd, cu, segments, scale, want.data(), pool());
        const auto d = to_device(qkv);
        cuda::DeviceBuffer out(want.size() * 4);
        cuda::vision_attention(d.as<float>(), segments, len, heads, hd, scale, out.as<float>(), nullptr);
        const auto got = to_host(out, want.size());
        EXPECT_LT(rel(got, want), 1e-5) << "head_dim " << hd << ": " << diff_report(got, want);
    }
}

// The MRoPE variant against the CPU's norm + apply_rope with three distinct position rows, and, with
// all three rows equal, bit for bit against the 1-D kernel it extends.
TEST(CudaVisionOps, MropeQkNormRopeMatchesCpu) {
    REQUIRE_GPU();
    const int heads = 4, kvh = 2, d = 32, T = 20, bs = 16, rot = 32;
    const int row = (heads + 2 * kvh) * d;
    const auto qkv = randn(size_t(T) * row, 51, 1.0f);
    const auto qn = randn(d, 52, 0.2f), kn = randn(d, 53, 0.2f);
    std::vector<float> qn1(qn), kn1(kn);
    for (auto& x : qn1) x += 1.0f;
    for (auto& x : kn1) x += 1.0f;
    cpu::Rope rope;
    rope.rot_dim = rot;
    for (int i = 0; i < rot / 2; ++i) rope.inv_freq.push_back(float(1.0 / std::pow(5e6, 2.0 * i / rot)));
    rope.axis = mrope_axes({6, 5, 5});
    std::vector<int32_t> pos(T), mpos(3 * T);
    for (int t = 0; t < T; ++t) {
        pos[t] = t;
        mpos[t] = t / 2;
        mpos[T + t] = 3 + t % 5;
        mpos[2 * T + t] = 7 + t % 3;
    }
    std::vector<int32_t> table = {0, 1};
    const std::vector<int32_t> seq(T, 0);
    const auto dpos = to_device(pos), dseq = to_device(seq), dtab = to_device(table), dmpos = to_device(mpos);
    const auto dqn = to_device(qn1), dkn = to_device(kn1), dinv = to_device(rope.inv_freq), daxis = to_device(rope.axis);
    cuda::DeviceBatch batch{T, dpos.as<int32_t>(), dseq.as<int32_t>(), dtab.as<int32_t>(), 2};
    auto run = [&](const cuda::DeviceBuffer& positions3, bool one_d, std::vector<float>& q_out, std::vector<float>& k_out) {
        auto dq = to_device(qkv);
        cuda::DeviceBuffer kc(size_t(2) * bs * kvh * d * 4), vc(kc.bytes());
        Q3N_CUDA(cudaMemset(kc.get(), 0, kc.bytes()));
        const cuda::DeviceKvLayer kv{KvDtype::F32, kc.get(), vc.get(), bs, kvh, d};
        if (one_d)
            cuda::qk_norm_rope_kv_write(dq.as<float>(), heads, kv, dqn.as<float>(), dkn.as<float>(), 1e-6f,
                                        dinv.as<float>(), rot, 1.0f, batch, nullptr);
        else
            cuda::qk_norm_rope_kv_write_mrope(dq.as<float>(), heads, kv, dqn.as<float>(), dkn.as<float>(), 1e-6f,
                                              dinv.as<float>(), daxis.as<uint8_t>(), rot, 1.0f,
                                              positions3.as<int32_t>(), batch, nullptr);
        const auto all = to_host(dq, qkv.size());
        q_out.assign(size_t(T) * heads * d, 0.0f);
        for (int t = 0; t < T; ++t) std::copy_n(&all[size_t(t) * row], heads * d, &q_out[size_t(t) * heads * d]);
        k_out = to_host(kc, size_t(T) * kvh * d);  // slots 0..T-1 of blocks 0, 1 in order
    };
    // Host: q/k head RMSNorm then MRoPE.
    std::vector<float> q(size_t(T) * heads * d), k(size_t(T) * kvh * d);
    for (int t = 0; t < T; ++t) {
        std::copy_n(&qkv[size_t(t) * row], heads * d, &q[size_t(t) * heads * d]);
        std::copy_n(&qkv[size_t(t) * row + heads * d], kvh * d, &k[size_t(t) * kvh * d]);
    }
    cpu::rmsnorm(q.data(), qn1.data(), q.data(), size_t(T) * heads, d, 1e-6f, pool());
    cpu::rmsnorm(k.data(), kn1.data(), k.data(), size_t(T) * kvh, d, 1e-6f, pool());
    cpu::apply_rope(q.data(), T, heads, d, mpos.data(), rope);
    cpu::apply_rope(k.data(), T, kvh, d, mpos.data(), rope);
    std::vector<float> gq, gk;
    run(dmpos, false, gq, gk);
    EXPECT_LT(rel(gq, q), 1e-6) << "q: " << diff_report(gq, q);
    EXPECT_LT(rel(gk, k), 1e-6) << "k in the cache: " << diff_report(gk, k);

    std::vector<int32_t> same(3 * T);
    for (int a = 0; a < 3; ++a) std::copy(pos.begin(), pos.end(), same.begin() + a * T);
    const auto dsame = to_device(same);
    std::vector<float> mq, mk, oq, ok;
    run(dsame, false, mq, mk);
    run(dsame, true, oq, ok);
    EXPECT_EQ(mq, oq) << "equal rows must reduce to the 1-D rope exactly: " << diff_report(mq, oq, 0, 0);
    EXPECT_EQ(mk, ok) << diff_report(mk, ok, 0, 0);
}

// ---- The tower ------------------------------------------------------------------------------------

double rel_to(const std::vector<float>& a, const std::vector<double>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += b[i] * b[i];
    }
    return std::sqrt(num / std::max(den, 1e-300));
}

// Rows [row0, row0 + rows) of column block `block` (width `out`) of a [tokens, width] feature matrix.
std::vector<float> feature_slice(const std::vector<float>& f, size_t width, size_t block, size_t out) {
    const size_t tokens = f.size() / width;
    std::vector<float> s(tokens * out);
    for (size_t t = 0; t < tokens; ++t) std::copy_n(&f[t * width + block * out], out, &s[t * out]);
    return s;
}

// The recorded transformers output (full, or first/last rows and samples) against ours.
double against_summary(const std::vector<float>& got, size_t cols, const nlohmann::json& s) {
    std::vector<float> mine;
    std::vector<double> want;
    if (s.contains("full")) {
        mine = got;
        want = s.at("full").get<std::vector<double>>();
    } else {
        const auto first = s.at("first_row").get<std::vector<double>>(), last = s.at("last_row").get<std::vector<double>>();
        mine.insert(mine.end(), got.begin(), got.begin() + cols);
        want.insert(want.end(), first.begin(), first.end());
        mine.insert(mine.end(), got.end() - cols, got.end());
        want.insert(want.end(), last.begin(), last.end());
        for (const auto& smp : s.at("samples")) {
            mine.push_back(got[smp.at(0).get<size_t>() * cols + smp.at(1).get<size_t>()]);
            want.push_back(smp.at(2).get<double>());
        }
    }
    EXPECT_EQ(mine.size(), want.size());
    return rel_to(mine, want);
}

TEST(CudaVisionTower, MatchesCpuTowerAndTransformersOnVlFixtures) {
    REQUIRE_GPU();
    size_t checked = 0;
    for (const char* name : kFixtures) {
        const std::string dir = q3n_test::vl_fixture_dir(name);
        if (!fs::exists(dir + "/reference.json")) continue;
        const auto ref = q3n_test::read_json(dir + "/reference.json");
        auto cpu_tower = Qwen3VlVision::load(dir);
        const VisionConfig& vc = cpu_tower->config();
        cudaStream_t stream = nullptr;
        Q3N_CUDA(cudaStreamCreate(&stream));
        {
            cuda::Qwen3VlVisionCuda gpu(vc, cpu_tower->weights(), stream);
            const size_t cols = vc.patch_dim(), out = vc.out_hidden_size, width = gpu.feature_width();
            const auto& inputs = ref.at("vision_inputs");
            for (const auto& call : ref.at("vision")) {
                // The GPU tower takes one item per call; items are independent, so their rows concatenate.
                std::vector<float> px, features;
                std::vector<GridThw> grids;
                for (int k : call.at("inputs")) {
                    const auto g = inputs.at(k).at("grid_thw").get<std::vector<uint32_t>>();
                    const GridThw grid{g[0], g[1], g[2]};
                    grids.push_back(grid);
                    const auto part = q3n_test::fixture_pixels(k, size_t(g[0]) * g[1] * g[2], cols);
                    px.insert(px.end(), part.begin(), part.end());
                    const auto dpx = to_device(part);
                    cuda::DeviceBuffer dfeat(gpu.tokens(grid) * width * 4);
                    gpu.forward(dpx.as<float>(), grid, dfeat.as<float>());
                    Q3N_CUDA(cudaStreamSynchronize(stream));
                    const auto f = to_host(dfeat, gpu.tokens(grid) * width);
                    features.insert(features.end(), f.begin(), f.end());
                }
                const VisionOutput want = cpu_tower->forward(px.data(), px.size() / cols, grids, pool());
                const std::string where = std::string(name) + "/" + call.at("name").get<std::string>();
                ASSERT_EQ(features.size(), want.tokens * width) << where;
                ASSERT_EQ(want.deepstack.size(), gpu.taps()) << where;
                for (size_t b = 0; b <= gpu.taps(); ++b) {
                    const auto got = feature_slice(features, width, b, out);
                    const auto& cpu_out = b == 0 ? want.merged : want.deepstack[b - 1];
                    const auto& summary = b == 0 ? call.at("merged") : call.at("deepstack").at(b - 1);
                    const std::string what = where + (b == 0 ? " merged" : " deepstack " + std::to_string(b - 1));
                    const double vs_cpu = rel(got, cpu_out), vs_hf = against_summary(got, out, summary);
                    EXPECT_LT(vs_cpu, 2e-2) << what << " against the CPU tower: " << diff_report(got, cpu_out, 1e-2, 1e-2);
                    EXPECT_LT(vs_hf, 2e-2) << what << " against transformers";
                    std::printf("[ %s ] relative L2 %.3g against the CPU tower, %.3g against transformers\n", what.c_str(),
                                vs_cpu, vs_hf);
                }
                ++checked;
            }
        }
        Q3N_CUDA(cudaStreamDestroy(stream));
    }
    if (checked == 0) GTEST_SKIP() << "no tests/fixtures/qwen3_vl/*/reference.json: run tests/fixtures/make_vl_fixtures.py";
}


// ---- The VL runner end to end ---------------------------------------------------------------------

// One appendable piece of a prompt: text ids, or one vision item (an image, or one video slice), cut
// at the placeholder runs as test_qwen3_vl.cpp does.
struct Segment {
    size_t begin = 0, end = 0;
    bool vision = false;
    q3n_vision_kind kind = Q3N_VISION_IMAGE;
    uint32_t t = 1, h = 0, w = 0;
    std::vector<float> pixels;
};

struct VlPrompt {
    std::string name;
    std::vector<int32_t> ids;
    std::vector<float> last_logits, emulated_logits;  // emulated: FP8 fixtures only
    std::vector<int32_t> greedy;
    std::vector<double> margins;
    std::vector<Segment> segments;
};

std::vector<Segment> segments_of(const nlohmann::json& p, const nlohmann::json& inputs, int32_t image_pad,
                                 int32_t video_pad, size_t patch_dim) {
    const auto ids = p.at("input_ids").get<std::vector<int32_t>>();
    const auto images = p.at("images").get<std::vector<int>>(), videos = p.at("videos").get<std::vector<int>>();
    size_t next_image = 0, next_video = 0, next_slice = 0, i = 0;
    std::vector<Segment> out;
    while (i < ids.size()) {
        Segment s;
        s.begin = i;
        if (ids[i] != image_pad && ids[i] != video_pad) {
            while (i < ids.size() && ids[i] != image_pad && ids[i] != video_pad) ++i;
            s.end = i;
            out.push_back(std::move(s));
            continue;
        }
        const int32_t pad = ids[i];
        while (i < ids.size() && ids[i] == pad) ++i;
        s.end = i;
        s.vision = true;
        const bool image = pad == image_pad;
        s.kind = image ? Q3N_VISION_IMAGE : Q3N_VISION_VIDEO;
        const int k = image ? images.at(next_image++) : videos.at(next_video);
        const auto g = inputs.at(k).at("grid_thw").get<std::vector<uint32_t>>();
        s.h = g[1];
        s.w = g[2];
        const size_t rows = size_t(s.h) * s.w;
        const auto all = q3n_test::fixture_pixels(k, size_t(g[0]) * rows, patch_dim);
        const size_t slice = image ? 0 : next_slice;
        s.pixels.assign(all.begin() + slice * rows * patch_dim, all.begin() + (slice + 1) * rows * patch_dim);
        if (!image && ++next_slice == g[0]) {
            next_slice = 0;
            ++next_video;
        }
        out.push_back(std::move(s));
    }
    return out;
}

std::vector<VlPrompt> parse_prompts(const std::string& dir) {
    const auto j = q3n_test::read_json(dir + "/reference.json");
    const int32_t image_pad = j.at("special_ids").at("image_pad"), video_pad = j.at("special_ids").at("video_pad");
    std::vector<VlPrompt> out;
    for (size_t i = 0; i < j.at("prompts").size(); ++i) {
        const auto& p = j.at("prompts")[i];
        VlPrompt q;
        q.name = p.at("name");
        q.ids = p.at("input_ids").get<std::vector<int32_t>>();
        q.last_logits = p.at("last_logits").get<std::vector<float>>();
        q.greedy = p.at("greedy").at("tokens").get<std::vector<int32_t>>();
        q.margins = p.at("greedy").at("margins").get<std::vector<double>>();
        if (j.contains("emulated")) q.emulated_logits = j.at("emulated")[i].at("last_logits").get<std::vector<float>>();
        q.segments = segments_of(p, j.at("vision_inputs"), image_pad, video_pad, 3 * 2 * 16 * 16);
        out.push_back(std::move(q));
    }
    return out;
}

void load_vl(const std::string& dir, q3n_device device, q3n_test::ModelHandle& h) {
    q3n_model_options o;
    q3n_model_options_init(&o, sizeof o);
    o.device = device;
    o.kv_cache_dtype = Q3N_DTYPE_F32;  // the CPU's cache dtype: compare like with like
    o.context_length = 256;
    o.kv_cache_tokens = 2048;
    ASSERT_EQ(q3n_model_load(dir.c_str(), &o, &h.m), Q3N_OK) << dir << ": " << q3n_last_error();
}

void append_prompt(q3n_sequence* s, const VlPrompt& p) {
    for (const auto& g : p.segments) {
        const q3n_status st = g.vision ? q3n_sequence_append_vision(s, g.kind, g.t, g.h, g.w, g.pixels.data(), g.pixels.size())
                                       : q3n_sequence_append(s, p.ids.data() + g.begin, g.end - g.begin);
        ASSERT_EQ(st, Q3N_OK) << p.name << ": " << q3n_last_error();
    }
}

std::vector<float> prompt_logits(q3n_model* m, const VlPrompt& p, size_t vocab) {
    q3n_test::SequenceHandle s;
    EXPECT_EQ(q3n_sequence_create(m, &s.s), Q3N_OK);
    append_prompt(s.s, p);
    EXPECT_EQ(q3n_model_step(m, &s.s, 1, 0), Q3N_OK) << q3n_last_error();
    return q3n_test::logits_of(s.s, vocab);
}

bool is_vision_id(int32_t t) { return t >= 248 && t <= 251; }  // the fixtures' vision specials

class CudaVlFixture : public ::testing::TestWithParam<std::string> {
protected:
    void SetUp() override {
        if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: GPU tests skipped";
        dir_ = q3n_test::vl_fixture_dir(GetParam());
        if (!fs::exists(dir_ + "/reference.json"))
            GTEST_SKIP() << dir_ << " is missing: run tests/fixtures/make_vl_fixtures.py with transformers 5.17";
        prompts_ = parse_prompts(dir_);
        fp8_ = GetParam().rfind("fp8", 0) == 0;
        const ScopedEnv exact = exact_fp8();  // see exact_fp8()
        load_vl(dir_, Q3N_DEVICE_CUDA, gpu_);
        q3n_model_info info{};
        info.struct_size = sizeof info;
        ASSERT_EQ(q3n_model_get_info(gpu_.m, &info), Q3N_OK);
        EXPECT_EQ(info.device, Q3N_DEVICE_CUDA);
        EXPECT_NE(info.has_vision, 0u);
        vocab_ = info.vocab_size;
    }

    std::string dir_;
    std::vector<VlPrompt> prompts_;
    bool fp8_ = false;
    q3n_test::ModelHandle gpu_;
    size_t vocab_ = 0;
};

TEST_P(CudaVlFixture, LogitsMatchTransformersAndCpuAndGreedyTokens) {
    q3n_test::ModelHandle cpu_model;
    load_vl(dir_, Q3N_DEVICE_CPU, cpu_model);
    double worst = 0;
    for (const VlPrompt& p : prompts_) {
        const auto gpu = prompt_logits(gpu_.m, p, vocab_), cpu = prompt_logits(cpu_model.m, p, vocab_);
        const double plain = q3n_test::relative_l2(gpu, p.last_logits), vs_cpu = q3n_test::relative_l2(gpu, cpu);
        if (fp8_) {
            const double emu = q3n_test::relative_l2(gpu, p.emulated_logits);
            // The GPU tower feeds its GEMMs bf16 inputs (3.5-5e-3 from the fp32 CPU tower and
            // transformers, bounded by the tower tests above); in an FP8 text model each visual row's
            // e4m3 re-rounding turns that into a larger logit change the more visual tokens a prompt
            // has. The video prompts measured 0.11-0.14 (with the exact FP8 GEMV and with either GPU
            // tower flow), the image prompts under 0.1; a wrong scale or layout is ~1.
            const double bound = p.name.find("video") != std::string::npos ? 0.2 : 0.1;
            EXPECT_LT(plain, 0.3) << p.name << " against the plain reference";
            EXPECT_LT(emu, bound) << p.name << " against the emulation: " << diff_report(gpu, p.emulated_logits, 1e-2, 1e-2);
            EXPECT_LT(vs_cpu, bound) << p.name << " against the CPU runner: " << diff_report(gpu, cpu, 1e-2, 1e-2);
            std::printf("[ %s/%s ] logits relative L2 %.3g against the emulation, %.3g against the CPU runner\n",
                        GetParam().c_str(), p.name.c_str(), emu, vs_cpu);
        } else {
            worst = std::max(worst, q3n_test::max_abs_diff(gpu, p.last_logits));
            EXPECT_LT(plain, 2e-2) << p.name << " against transformers: " << diff_report(gpu, p.last_logits, 1e-2, 1e-2);
            EXPECT_LT(vs_cpu, 2e-2) << p.name << " against the CPU runner: " << diff_report(gpu, cpu, 1e-2, 1e-2);
            std::printf("[ %s/%s ] logits relative L2 %.3g against transformers, %.3g against the CPU runner\n",
                        GetParam().c_str(), p.name.c_str(), plain, vs_cpu);
        }
    }
    if (fp8_) return;  // e4m3 flips: the CPU test's teacher-forced check is the FP8 one; the logits above cover it
    for (const VlPrompt& p : prompts_) {
        q3n_test::SequenceHandle s;
        ASSERT_EQ(q3n_sequence_create(gpu_.m, &s.s), Q3N_OK);
        append_prompt(s.s, p);
        size_t checked = 0;
        while (checked < p.margins.size() && p.margins[checked] > 8 * worst) ++checked;
        for (size_t k = 0; k < checked; ++k) {
            ASSERT_EQ(q3n_model_step(gpu_.m, &s.s, 1, Q3N_STEP_SAMPLE), Q3N_OK) << q3n_last_error();
            int32_t t = -1;
            q3n_sequence_last_token(s.s, &t);
            ASSERT_EQ(t, p.greedy[k]) << p.name << ": greedy token " << k << " (margin " << p.margins[k] << ")";
        }
        std::printf("[ %s/%s ] greedy: %zu of %zu steps compared free-running\n", GetParam().c_str(), p.name.c_str(),
                    checked, p.greedy.size());
    }
}

// Decode steps (CUDA graphs, MRoPE positions index + rope_delta) after the prompt equal one prefill
// of the prompt and those tokens: BF16 1e-5 (the GEMV and attention sum alike for any row count; the
// tower runs on the same pixels in both); FP8 0.1 (a prefill's wider rows take cuBLASLt's FP8 GEMM).
TEST_P(CudaVlFixture, DecodeAfterPrefillEqualsLongerPrefill) {
    for (const VlPrompt& p : prompts_) {
        std::vector<int32_t> tail;
        for (int32_t t : p.greedy)
            if (!is_vision_id(t)) tail.push_back(t);
        q3n_test::SequenceHandle a, b;
        ASSERT_EQ(q3n_sequence_create(gpu_.m, &a.s), Q3N_OK);
        append_prompt(a.s, p);
        ASSERT_EQ(q3n_sequence_append(a.s, tail.data(), tail.size()), Q3N_OK);
        ASSERT_EQ(q3n_model_step(gpu_.m, &a.s, 1, 0), Q3N_OK) << q3n_last_error();
        ASSERT_EQ(q3n_sequence_create(gpu_.m, &b.s), Q3N_OK);
        append_prompt(b.s, p);
        ASSERT_EQ(q3n_model_step(gpu_.m, &b.s, 1, 0), Q3N_OK) << q3n_last_error();
        for (int32_t t : tail) {
            ASSERT_EQ(q3n_sequence_append(b.s, &t, 1), Q3N_OK);
            ASSERT_EQ(q3n_model_step(gpu_.m, &b.s, 1, 0), Q3N_OK) << q3n_last_error();
        }
        const auto la = q3n_test::logits_of(a.s, vocab_), lb = q3n_test::logits_of(b.s, vocab_);
        EXPECT_LT(q3n_test::relative_l2(lb, la), fp8_ ? 0.1 : 1e-5) << p.name << ": " << diff_report(lb, la);
    }
}

INSTANTIATE_TEST_SUITE_P(Transformers, CudaVlFixture,
                         ::testing::Values(std::string("bf16_dense_tied"), std::string("bf16_moe"), std::string("fp8_dense")));

}  // namespace
