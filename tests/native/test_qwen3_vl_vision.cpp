// The Qwen3-VL vision tower end to end:
//  * on a small random checkpoint written here (BF16, unsorted deepstack_visual_indexes, two grids of
//    which one is a two-slice video) against a forward written out in double from shared/spec 4.2;
//  * on the tiny transformers fixtures (tests/fixtures/qwen3_vl/*, made by make_vl_fixtures.py; skipped
//    while absent) against transformers 5.17's fp32 outputs.
//
// Tolerance, relative L2 < 1e-4 for both: the weights are BF16 but every side computes in fp32 (or
// double) from the same widened values, so the outputs differ only by summation order, libm and the
// float32 rotary/interpolation tables — a few 1e-7 per op, ~1e-6 after a few blocks. A real mistake
// (a wrong merge order, GELU form, norm or rotary axis) moves them by 1e-2 or more. Row sums of the
// summarised fixture outputs cancel, so they get 1e-3.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <random>
#include <vector>

#include "core/error.h"
#include "core/numeric.h"
#include "core/thread_pool.h"
#include "fixture_util.h"
#include "vl_fixture.h"
#include "model/qwen3_vl_vision.h"

using namespace q3n;

namespace {

ThreadPool& pool() {
    static ThreadPool p(3);
    return p;
}

double rel_l2(const std::vector<float>& a, const std::vector<double>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += b[i] * b[i];
    }
    return std::sqrt(num / std::max(den, 1e-300));
}

// ---- A synthetic checkpoint and the spec in double ------------------------------------------------

struct Spec {
    size_t depth = 2, hidden = 16, heads = 2, inter = 24, patch = 4, tp = 2, merge = 2, side = 4, out = 12;
    std::vector<size_t> deepstack = {1, 0};
    size_t patch_dim() const { return 3 * tp * patch * patch; }
    size_t hd() const { return hidden / heads; }
};

struct Tensors {
    std::map<std::string, q3n_test::RawTensor> raw;
    std::map<std::string, std::vector<double>> val;  // the bf16-rounded values, widened

    void add(const std::string& name, std::vector<int64_t> shape, float scale, float mean, std::mt19937& rng) {
        size_t n = 1;
        for (auto d : shape) n *= size_t(d);
        std::normal_distribution<float> d(mean, scale);
        q3n_test::RawTensor t{"BF16", shape, std::vector<uint8_t>(2 * n)};
        std::vector<double> v(n);
        for (size_t i = 0; i < n; ++i) {
            const uint16_t b = float_to_bf16(d(rng));
            std::memcpy(&t.bytes[2 * i], &b, 2);
            v[i] = bf16_to_float(b);
        }
        raw[name] = std::move(t);
        val[name] = std::move(v);
    }
};

void add_linear(Tensors& t, const std::string& m, size_t out, size_t in, std::mt19937& rng) {
    t.add(m + ".weight", {int64_t(out), int64_t(in)}, float(1.0 / std::sqrt(double(in))), 0.0f, rng);
    t.add(m + ".bias", {int64_t(out)}, 0.1f, 0.0f, rng);
}

void add_norm(Tensors& t, const std::string& m, size_t n, std::mt19937& rng) {
    t.add(m + ".weight", {int64_t(n)}, 0.2f, 1.0f, rng);
    t.add(m + ".bias", {int64_t(n)}, 0.1f, 0.0f, rng);
}

Tensors make_tensors(const Spec& s) {
    std::mt19937 rng(77);
    Tensors t;
    const std::string p = "model.visual.";
    t.add(p + "patch_embed.proj.weight", {int64_t(s.hidden), 3, int64_t(s.tp), int64_t(s.patch), int64_t(s.patch)},
          float(1.0 / std::sqrt(double(s.patch_dim()))), 0.0f, rng);
    t.add(p + "patch_embed.proj.bias", {int64_t(s.hidden)}, 0.1f, 0.0f, rng);
    t.add(p + "pos_embed.weight", {int64_t(s.side * s.side), int64_t(s.hidden)}, 0.5f, 0.0f, rng);
    for (size_t b = 0; b < s.depth; ++b) {
        const std::string q = p + "blocks." + std::to_string(b) + ".";
        add_norm(t, q + "norm1", s.hidden, rng);
        add_norm(t, q + "norm2", s.hidden, rng);
        add_linear(t, q + "attn.qkv", 3 * s.hidden, s.hidden, rng);
        add_linear(t, q + "attn.proj", s.hidden, s.hidden, rng);
        add_linear(t, q + "mlp.linear_fc1", s.inter, s.hidden, rng);
        add_linear(t, q + "mlp.linear_fc2", s.hidden, s.inter, rng);
    }
    const size_t wide = 4 * s.hidden;
    auto merger = [&](const std::string& m, bool post) {
        add_norm(t, m + ".norm", post ? wide : s.hidden, rng);
        add_linear(t, m + ".linear_fc1", wide, wide, rng);
        add_linear(t, m + ".linear_fc2", s.out, wide, rng);
    };
    merger(p + "merger", false);
    for (size_t k = 0; k < s.deepstack.size(); ++k) merger(p + "deepstack_merger_list." + std::to_string(k), true);
    return t;
}

using Mat = std::vector<double>;  // row-major

Mat affine(const Mat& x, size_t rows, const Tensors& t, const std::string& m, size_t out, size_t in) {
    const auto& w = t.val.at(m + ".weight");
    const auto& b = t.val.at(m + ".bias");
    Mat y(rows * out);
    for (size_t r = 0; r < rows; ++r)
        for (size_t o = 0; o < out; ++o) {
            double acc = b[o];
            for (size_t i = 0; i < in; ++i) acc += x[r * in + i] * w[o * in + i];
            y[r * out + o] = acc;
        }
    return y;
}

Mat layer_norm(const Mat& x, size_t rows, size_t n, const Tensors& t, const std::string& m) {
    const auto& w = t.val.at(m + ".weight");
    const auto& b = t.val.at(m + ".bias");
    Mat y(x.size());
    for (size_t r = 0; r < rows; ++r) {
        double mean = 0, var = 0;
        for (size_t i = 0; i < n; ++i) mean += x[r * n + i];
        mean /= n;
        for (size_t i = 0; i < n; ++i) var += (x[r * n + i] - mean) * (x[r * n + i] - mean);
        var /= n;
        for (size_t i = 0; i < n; ++i) y[r * n + i] = (x[r * n + i] - mean) / std::sqrt(var + 1e-6) * w[i] + b[i];
    }
    return y;
}

Mat spec_merger(const Mat& x, size_t patches, const Spec& s, const Tensors& t, const std::string& m, bool post) {
    const size_t tokens = patches / 4, wide = 4 * s.hidden;
    Mat y = post ? layer_norm(x, tokens, wide, t, m + ".norm") : layer_norm(x, patches, s.hidden, t, m + ".norm");
    Mat h = affine(y, tokens, t, m + ".linear_fc1", wide, wide);
    for (auto& v : h) v = 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
    return affine(h, tokens, t, m + ".linear_fc2", s.out, wide);
}

struct SpecOut {
    Mat merged;
    std::vector<Mat> deepstack;
};

SpecOut spec_forward(const Spec& s, const Tensors& t, const std::vector<float>& px, const std::vector<GridThw>& grids) {
    const std::string p = "model.visual.";
    // Patch order (t, h/2, w/2, 2, 2) -> (row, col) and segment of every patch.
    std::vector<std::pair<size_t, size_t>> rc;
    std::vector<size_t> seg;
    std::vector<double> pos_rows;  // interpolated position embedding per patch
    size_t segment = 0;
    const auto& table = t.val.at(p + "pos_embed.weight");
    for (const auto& g : grids)
        for (uint32_t f = 0; f < g.t; ++f, ++segment)
            for (size_t bh = 0; bh < g.h / 2; ++bh)
                for (size_t bw = 0; bw < g.w / 2; ++bw)
                    for (size_t mh = 0; mh < 2; ++mh)
                        for (size_t mw = 0; mw < 2; ++mw) {
                            const size_t r = 2 * bh + mh, c = 2 * bw + mw;
                            rc.emplace_back(r, c);
                            seg.push_back(segment);
                            const double yy = r * double(s.side - 1) / (g.h - 1), xx = c * double(s.side - 1) / (g.w - 1);
                            const size_t y0 = size_t(yy), x0 = size_t(xx);
                            const size_t y1 = std::min(y0 + 1, s.side - 1), x1 = std::min(x0 + 1, s.side - 1);
                            const double dy = yy - y0, dx = xx - x0;
                            for (size_t i = 0; i < s.hidden; ++i)
                                pos_rows.push_back((1 - dy) * (1 - dx) * table[(y0 * s.side + x0) * s.hidden + i] +
                                                   (1 - dy) * dx * table[(y0 * s.side + x1) * s.hidden + i] +
                                                   dy * (1 - dx) * table[(y1 * s.side + x0) * s.hidden + i] +
                                                   dy * dx * table[(y1 * s.side + x1) * s.hidden + i]);
                        }
    const size_t n = rc.size(), H = s.hidden, hd = s.hd(), half = hd / 2, quarter = hd / 4;
    Mat x = affine(Mat(px.begin(), px.end()), n, t, p + "patch_embed.proj", H, s.patch_dim());
    for (size_t i = 0; i < x.size(); ++i) x[i] += pos_rows[i];
    auto rope = [&](Mat& v, size_t off) {  // v is [n, 3H]; rotates the block at column offset `off`
        for (size_t tk = 0; tk < n; ++tk)
            for (size_t h = 0; h < s.heads; ++h)
                for (size_t i = 0; i < half; ++i) {
                    const double f = std::pow(10000.0, -2.0 * double(i % quarter) / double(half));
                    const double a = (i < quarter ? rc[tk].first : rc[tk].second) * f;
                    double* e = &v[tk * 3 * H + off + h * hd];
                    const double u = e[i], w = e[half + i];
                    e[i] = u * std::cos(a) - w * std::sin(a);
                    e[half + i] = w * std::cos(a) + u * std::sin(a);
                }
    };
    SpecOut out;
    for (size_t b = 0; b < s.depth; ++b) {
        const std::string q = p + "blocks." + std::to_string(b) + ".";
        Mat qkv = affine(layer_norm(x, n, H, t, q + "norm1"), n, t, q + "attn.qkv", 3 * H, H);
        rope(qkv, 0);
        rope(qkv, H);
        Mat att(n * H, 0.0);
        for (size_t i = 0; i < n; ++i)
            for (size_t h = 0; h < s.heads; ++h) {
                std::vector<double> sc(n, 0.0);
                double mx = -1e300;
                for (size_t j = 0; j < n; ++j) {
                    if (seg[j] != seg[i]) continue;
                    double d = 0;
                    for (size_t e = 0; e < hd; ++e) d += qkv[i * 3 * H + h * hd + e] * qkv[j * 3 * H + H + h * hd + e];
                    sc[j] = d / std::sqrt(double(hd));
                    mx = std::max(mx, sc[j]);
                }
                double sum = 0;
                for (size_t j = 0; j < n; ++j)
                    if (seg[j] == seg[i]) sum += (sc[j] = std::exp(sc[j] - mx));
                for (size_t j = 0; j < n; ++j)
                    if (seg[j] == seg[i])
                        for (size_t e = 0; e < hd; ++e) att[i * H + h * hd + e] += sc[j] / sum * qkv[j * 3 * H + 2 * H + h * hd + e];
            }
        Mat o = affine(att, n, t, q + "attn.proj", H, H);
        for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
        Mat m = affine(layer_norm(x, n, H, t, q + "norm2"), n, t, q + "mlp.linear_fc1", s.inter, H);
        for (auto& v : m) v = 0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
        Mat f = affine(m, n, t, q + "mlp.linear_fc2", H, s.inter);
        for (size_t i = 0; i < x.size(); ++i) x[i] += f[i];
        for (size_t k = 0; k < s.deepstack.size(); ++k)
            if (s.deepstack[k] == b)
                out.deepstack.push_back(spec_merger(x, n, s, t, p + "deepstack_merger_list." + std::to_string(k), true));
    }
    out.merged = spec_merger(x, n, s, t, p + "merger", false);
    return out;
}

std::string write_synthetic(const Spec& s, const Tensors& t) {
    const std::string dir = q3n_test::temp_dir("vl_vision_synthetic");
    q3n_test::write_safetensors(dir + "/model.safetensors", t.raw);
    nlohmann::json cfg = {
        {"architectures", {"Qwen3VLForConditionalGeneration"}},
        {"model_type", "qwen3_vl"},
        {"vision_config",
         {{"depth", s.depth}, {"hidden_size", s.hidden}, {"intermediate_size", s.inter}, {"num_heads", s.heads},
          {"patch_size", s.patch}, {"temporal_patch_size", s.tp}, {"in_channels", 3}, {"spatial_merge_size", s.merge},
          {"num_position_embeddings", s.side * s.side}, {"out_hidden_size", s.out},
          {"deepstack_visual_indexes", s.deepstack}, {"hidden_act", "gelu_pytorch_tanh"}}}};
    q3n_test::write_text(dir + "/config.json", cfg.dump(2));
    return dir;
}

// ---- The transformers fixtures --------------------------------------------------------------------

// Compares one output against its summary: the full tensor when recorded, else the recorded rows and
// samples; row sums always.
void expect_matches(const std::vector<float>& got, size_t cols, const nlohmann::json& s, const std::string& where) {
    const auto shape = s.at("shape").get<std::vector<size_t>>();
    ASSERT_EQ(got.size(), shape[0] * shape[1]) << where;
    ASSERT_EQ(cols, shape[1]) << where;
    const size_t rows = shape[0];
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
    EXPECT_LT(rel_l2(mine, want), 1e-4) << where;
    std::vector<float> sums(rows, 0.0f);
    std::vector<double> want_sums = s.at("row_sums").get<std::vector<double>>();
    for (size_t r = 0; r < rows; ++r) {
        double acc = 0;
        for (size_t c = 0; c < cols; ++c) acc += got[r * cols + c];
        sums[r] = static_cast<float>(acc);
    }
    EXPECT_LT(rel_l2(sums, want_sums), 1e-3) << where << " (row sums)";
}

}  // namespace

TEST(Qwen3VlVision, SyntheticCheckpointMatchesTheSpecInDouble) {
    const Spec s;
    const Tensors t = make_tensors(s);
    const std::string dir = write_synthetic(s, t);
    auto vision = Qwen3VlVision::load(dir);
    ASSERT_EQ(vision->config().deepstack_visual_indexes, (std::vector<uint32_t>{1, 0}));
    const std::vector<GridThw> grids = {{1, 4, 6}, {2, 2, 4}};
    const size_t n = 24 + 16;
    std::vector<float> px(n * s.patch_dim());
    std::mt19937 rng(5);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (auto& v : px) v = u(rng);

    const VisionOutput got = vision->forward(px.data(), n, grids, pool());
    const SpecOut want = spec_forward(s, t, px, grids);
    EXPECT_EQ(got.tokens, n / 4);
    ASSERT_EQ(got.merged.size(), want.merged.size());
    EXPECT_LT(rel_l2(got.merged, want.merged), 1e-4);
    ASSERT_EQ(got.deepstack.size(), 2u);
    // Block order: block 0 feeds merger 1, block 1 feeds merger 0.
    for (size_t k = 0; k < 2; ++k) EXPECT_LT(rel_l2(got.deepstack[k], want.deepstack[k]), 1e-4) << "deepstack " << k;

    // One grid at a time gives the same rows: attention never crosses an image.
    const VisionOutput first = vision->forward(px.data(), 24, {grids[0]}, pool());
    for (size_t i = 0; i < first.merged.size(); ++i) EXPECT_NEAR(first.merged[i], got.merged[i], 1e-5);

    EXPECT_THROW(vision->forward(px.data(), n - 4, grids, pool()), Error);
    EXPECT_THROW(vision->forward(px.data(), n, {{1, 3, 6}, {2, 2, 4}}, pool()), Error);
}

TEST(Qwen3VlVision, MatchesTransformersOnVlFixtures) {
    size_t checked = 0;
    for (const char* name : {"bf16_dense_tied", "bf16_moe", "fp8_dense"}) {
        const std::string dir = std::string(Q3N_FIXTURE_DIR) + "/qwen3_vl/" + name;
        if (!std::filesystem::exists(dir + "/reference.json")) continue;
        const auto ref = q3n_test::read_json(dir + "/reference.json");
        auto vision = Qwen3VlVision::load(dir);
        const size_t cols = vision->config().patch_dim(), out = vision->config().out_hidden_size;
        const auto& inputs = ref.at("vision_inputs");
        for (const auto& call : ref.at("vision")) {
            std::vector<float> px;
            std::vector<GridThw> grids;
            for (int k : call.at("inputs")) {
                const auto g = inputs.at(k).at("grid_thw").get<std::vector<uint32_t>>();
                grids.push_back({g[0], g[1], g[2]});
                const auto part = q3n_test::fixture_pixels(k, size_t(g[0]) * g[1] * g[2], cols);
                px.insert(px.end(), part.begin(), part.end());
            }
            const VisionOutput got = vision->forward(px.data(), px.size() / cols, grids, pool());
            const std::string where = std::string(name) + "/" + call.at("name").get<std::string>();
            expect_matches(got.merged, out, call.at("merged"), where + " merged");
            ASSERT_EQ(got.deepstack.size(), call.at("deepstack").size()) << where;
            for (size_t k = 0; k < got.deepstack.size(); ++k)
                expect_matches(got.deepstack[k], out, call.at("deepstack").at(k), where + " deepstack " + std::to_string(k));
            ++checked;
        }
    }
    if (checked == 0)
        GTEST_SKIP() << "no tests/fixtures/qwen3_vl/*/reference.json yet: run tests/fixtures/make_vl_fixtures.py "
                        "(build/device/make_fixtures.sh vl) on a machine with transformers 5.17";
}
