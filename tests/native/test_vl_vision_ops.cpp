// The Qwen3-VL vision-tower CPU ops against straightforward double-precision references, on odd sizes.
//
// Tolerances: the kernels run in fp32 (LayerNorm statistics in double), so results differ from the
// double references by a few fp32 ulps times sqrt(n): relative 1e-5 for the reductions (n <= 200),
// absolute 1e-6 for the elementwise GELUs.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "core/numeric.h"
#include "core/thread_pool.h"
#include "cpu/ops.h"

using namespace q3n;

namespace {

std::vector<float> randn(size_t n, uint32_t seed, float scale = 1.0f, float mean = 0.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> d(mean, scale);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return v;
}

double rel_err(const std::vector<float>& a, const std::vector<double>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += b[i] * b[i];
    }
    return std::sqrt(num / std::max(den, 1e-300));
}

ThreadPool& pool() {
    static ThreadPool p(3);
    return p;
}

Linear f32_table(const std::vector<float>& data, size_t rows, size_t cols) {
    Linear l;
    l.type = WeightType::F32;
    l.data = data.data();
    l.out = rows;
    l.in = cols;
    return l;
}

// Patch order of spec 4.2: (t, h/m, w/m, m, m); returns (row, col) per patch.
std::vector<std::pair<int, int>> patch_order(const std::vector<GridThw>& grids, int m) {
    std::vector<std::pair<int, int>> out;
    for (const auto& g : grids)
        for (uint32_t t = 0; t < g.t; ++t)
            for (int bh = 0; bh < int(g.h) / m; ++bh)
                for (int bw = 0; bw < int(g.w) / m; ++bw)
                    for (int mh = 0; mh < m; ++mh)
                        for (int mw = 0; mw < m; ++mw) out.emplace_back(bh * m + mh, bw * m + mw);
    return out;
}

}  // namespace

TEST(VlVisionOps, LayerNormMatchesDoubleReference) {
    for (size_t n : {37, 200}) {
        const size_t rows = 7;
        // A large common offset: the case where a one-pass fp32 variance would cancel.
        auto x = randn(rows * n, 1, 2.0f, 30.0f);
        auto w = randn(n, 2, 0.3f, 1.0f), b = randn(n, 3, 0.2f);
        std::vector<float> y(rows * n);
        cpu::layer_norm(x.data(), w.data(), b.data(), y.data(), rows, n, 1e-6f, pool());
        std::vector<double> want(rows * n);
        for (size_t r = 0; r < rows; ++r) {
            double mean = 0, var = 0;
            for (size_t i = 0; i < n; ++i) mean += x[r * n + i];
            mean /= n;
            for (size_t i = 0; i < n; ++i) var += (x[r * n + i] - mean) * (x[r * n + i] - mean);
            var /= n;
            for (size_t i = 0; i < n; ++i) want[r * n + i] = (x[r * n + i] - mean) / std::sqrt(var + 1e-6) * w[i] + b[i];
        }
        EXPECT_LT(rel_err(y, want), 1e-5) << "n " << n;
        // In place gives the same numbers.
        cpu::layer_norm(x.data(), w.data(), b.data(), x.data(), rows, n, 1e-6f, pool());
        EXPECT_EQ(x, y);
    }
}

TEST(VlVisionOps, GeluTanhAndErfMatchTheirDefinitions) {
    auto x = randn(1001, 4, 3.0f);
    auto t = x, e = x;
    cpu::gelu_tanh(t.data(), t.size());
    cpu::gelu_erf(e.data(), e.size());
    for (size_t i = 0; i < x.size(); ++i) {
        const double v = x[i];
        const double want_t = 0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
        const double want_e = 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
        EXPECT_NEAR(t[i], want_t, 1e-6 + 1e-6 * std::fabs(want_t)) << x[i];
        EXPECT_NEAR(e[i], want_e, 1e-6 + 1e-6 * std::fabs(want_e)) << x[i];
    }
    // The two forms differ by up to ~1e-3 here: a swap of them would show.
    double worst = 0;
    for (size_t i = 0; i < x.size(); ++i) worst = std::max(worst, double(std::fabs(t[i] - e[i])));
    EXPECT_GT(worst, 1e-4);
}

TEST(VlVisionOps, AddBiasAddsPerColumn) {
    std::vector<float> y(3 * 5, 1.0f), b = {0.5f, -1.0f, 2.0f, 0.0f, 3.25f};
    cpu::add_bias(y.data(), b.data(), 3, 5);
    for (size_t r = 0; r < 3; ++r)
        for (size_t i = 0; i < 5; ++i) EXPECT_EQ(y[r * 5 + i], 1.0f + b[i]);
}

TEST(VlVisionOps, PatchCoordsFollowTheMergeWindowOrder) {
    const std::vector<GridThw> grids = {{2, 2, 4}, {1, 4, 2}};
    const auto want = patch_order(grids, 2);
    std::vector<int32_t> coords(2 * want.size());
    cpu::vision_patch_coords(grids.data(), grids.size(), 2, coords.data());
    for (size_t p = 0; p < want.size(); ++p) {
        EXPECT_EQ(coords[2 * p], want[p].first) << p;
        EXPECT_EQ(coords[2 * p + 1], want[p].second) << p;
    }
    // Hand-checked start of the first grid: one 2x2 window, then the next one to the right.
    const std::vector<int32_t> head = {0, 0, 0, 1, 1, 0, 1, 1, 0, 2, 0, 3, 1, 2, 1, 3};
    EXPECT_EQ(std::vector<int32_t>(coords.begin(), coords.begin() + 16), head);
}

TEST(VlVisionOps, PosEmbedInterpolateIsBilinearInPatchOrder) {
    const size_t side = 8, hidden = 5;
    const auto data = randn(side * side * hidden, 5);
    const Linear t = f32_table(data, side * side, hidden);
    const std::vector<GridThw> grids = {{1, 4, 6}, {2, 10, 6}, {1, 2, 2}, {1, 16, 2}};
    const auto order = patch_order(grids, 2);
    std::vector<float> out(order.size() * hidden);
    cpu::pos_embed_interpolate(t, side, grids.data(), grids.size(), 2, out.data());
    std::vector<double> want(out.size());
    size_t p = 0;
    for (const auto& g : grids) {
        const size_t n = size_t(g.t) * g.h * g.w;
        for (size_t q = 0; q < n; ++q, ++p) {
            const auto [r, c] = order[p];
            const double yy = g.h == 1 ? 0.0 : r * double(side - 1) / (g.h - 1);
            const double xx = g.w == 1 ? 0.0 : c * double(side - 1) / (g.w - 1);
            const size_t y0 = size_t(yy), x0 = size_t(xx);
            const size_t y1 = std::min(y0 + 1, side - 1), x1 = std::min(x0 + 1, side - 1);
            const double dy = yy - y0, dx = xx - x0;
            for (size_t i = 0; i < hidden; ++i)
                want[p * hidden + i] = (1 - dy) * (1 - dx) * data[(y0 * side + x0) * hidden + i] +
                                       (1 - dy) * dx * data[(y0 * side + x1) * hidden + i] +
                                       dy * (1 - dx) * data[(y1 * side + x0) * hidden + i] +
                                       dy * dx * data[(y1 * side + x1) * hidden + i];
        }
    }
    EXPECT_LT(rel_err(out, want), 1e-6);

    // An 8x8 grid on the 8x8 table lands on the table rows exactly; in BF16 the rows are widened.
    std::vector<uint16_t> bf(data.size());
    for (size_t i = 0; i < data.size(); ++i) bf[i] = float_to_bf16(data[i]);
    Linear tb;
    tb.type = WeightType::BF16;
    tb.data = bf.data();
    tb.out = side * side;
    tb.in = hidden;
    const GridThw same{1, 8, 8};
    std::vector<float> exact(64 * hidden);
    cpu::pos_embed_interpolate(tb, side, &same, 1, 2, exact.data());
    const auto o = patch_order({same}, 2);
    for (size_t q = 0; q < o.size(); ++q)
        for (size_t i = 0; i < hidden; ++i)
            EXPECT_EQ(exact[q * hidden + i], bf16_to_float(bf[(o[q].first * side + o[q].second) * hidden + i]));
}

TEST(VlVisionOps, Rope2dMatchesDoubleReference) {
    for (size_t hd : {8, 24}) {
        const size_t tokens = 11, heads = 3;
        auto x = randn(tokens * heads * hd, 6);
        std::vector<int32_t> coords(2 * tokens);
        for (size_t t = 0; t < tokens; ++t) {
            coords[2 * t] = int32_t((t * 7) % 13);
            coords[2 * t + 1] = int32_t((t * 5) % 9);
        }
        auto y = x;
        cpu::vision_rope_2d(y.data(), tokens, heads, hd, coords.data(), 10000.0f);
        std::vector<double> want(x.size());
        const size_t half = hd / 2, quarter = hd / 4;
        for (size_t t = 0; t < tokens; ++t)
            for (size_t h = 0; h < heads; ++h)
                for (size_t i = 0; i < half; ++i) {
                    const double f = std::pow(10000.0, -2.0 * double(i % quarter) / double(half));
                    const double angle = (i < quarter ? coords[2 * t] : coords[2 * t + 1]) * f;
                    const size_t base = (t * heads + h) * hd;
                    const double a = x[base + i], b = x[base + half + i];
                    want[base + i] = a * std::cos(angle) - b * std::sin(angle);
                    want[base + half + i] = b * std::cos(angle) + a * std::sin(angle);
                }
        EXPECT_LT(rel_err(y, want), 1e-5) << "head_dim " << hd;
    }
}

TEST(VlVisionOps, SegmentAttentionStaysInsideEachSegment) {
    const size_t tokens = 13, heads = 3, hd = 7;
    const std::vector<uint32_t> cu = {0, 5, 6, 13};
    auto q = randn(tokens * heads * hd, 7), k = randn(tokens * heads * hd, 8), v = randn(tokens * heads * hd, 9);
    const float scale = 1.0f / std::sqrt(float(hd));
    std::vector<float> out(q.size());
    cpu::segment_attention(q.data(), k.data(), v.data(), tokens, heads, hd, cu.data(), cu.size() - 1, scale, out.data(),
                           pool());
    std::vector<double> want(q.size());
    for (size_t s = 0; s + 1 < cu.size(); ++s)
        for (size_t t = cu[s]; t < cu[s + 1]; ++t)
            for (size_t h = 0; h < heads; ++h) {
                std::vector<double> sc;
                double mx = -1e300;
                for (size_t j = cu[s]; j < cu[s + 1]; ++j) {
                    double d = 0;
                    for (size_t e = 0; e < hd; ++e) d += double(q[(t * heads + h) * hd + e]) * k[(j * heads + h) * hd + e];
                    sc.push_back(d * scale);
                    mx = std::max(mx, sc.back());
                }
                double sum = 0;
                for (auto& x : sc) sum += (x = std::exp(x - mx));
                for (size_t e = 0; e < hd; ++e) {
                    double acc = 0;
                    for (size_t j = cu[s]; j < cu[s + 1]; ++j) acc += sc[j - cu[s]] / sum * v[(j * heads + h) * hd + e];
                    want[(t * heads + h) * hd + e] = acc;
                }
            }
    EXPECT_LT(rel_err(out, want), 1e-5);
    // A one-token segment returns its own value row.
    for (size_t e = 0; e < heads * hd; ++e) EXPECT_FLOAT_EQ(out[5 * heads * hd + e], v[5 * heads * hd + e]);
    // Changing the last segment's values leaves the first segment alone.
    for (size_t i = 6 * heads * hd; i < v.size(); ++i) v[i] += 5.0f;
    std::vector<float> again(q.size());
    cpu::segment_attention(q.data(), k.data(), v.data(), tokens, heads, hd, cu.data(), cu.size() - 1, scale,
                           again.data(), pool());
    for (size_t i = 0; i < 6 * heads * hd; ++i) EXPECT_EQ(again[i], out[i]);
}
