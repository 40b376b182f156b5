// Every CPU kernel against a naive reference computed in double on odd sizes, plus the number
// format conversions against their definitions.
//
// Tolerances: the kernels compute in fp32 with a different summation order than the double
// references, so results differ by a few fp32 ulps times sqrt(n): relative 1e-5 for the reductions
// used here (n <= 1000), absolute 1e-6 for elementwise ops.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "core/numeric.h"
#include "core/thread_pool.h"
#include "cpu/ops.h"
#include "model/config.h"
#include "model/qwen3_dense.h"

using namespace q3n;

namespace {

std::vector<float> randn(size_t n, uint32_t seed, float scale = 1.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> d(0.0f, scale);
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
    static ThreadPool p(3);  // more workers than cores on CI: exercises the splitting
    return p;
}

// e4m3fn by its definition: (-1)^s * 2^(e-7) * (1 + m/8), subnormals 2^-6 * m/8, S.1111.111 NaN.
double e4m3_definition(uint8_t v) {
    const int s = v >> 7, e = (v >> 3) & 15, m = v & 7;
    if (e == 15 && m == 7) return NAN;
    const double mag = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
    return s ? -mag : mag;
}

TEST(Numeric, E4m3DecodeMatchesDefinitionForAllCodes) {
    for (int v = 0; v < 256; ++v) {
        const double want = e4m3_definition(static_cast<uint8_t>(v));
        const float got = e4m3_to_float(static_cast<uint8_t>(v));
        if (std::isnan(want)) {
            EXPECT_TRUE(std::isnan(got)) << v;
        } else {
            EXPECT_EQ(got, static_cast<float>(want)) << "code " << v;
        }
    }
}

TEST(Numeric, E4m3EncodeRoundsToNearestEven) {
    EXPECT_EQ(float_to_e4m3(1.0f), 0x38);
    EXPECT_EQ(float_to_e4m3(448.0f), 0x7e);
    EXPECT_EQ(float_to_e4m3(-448.0f), 0xfe);
    EXPECT_EQ(float_to_e4m3(0.0f), 0x00);
    EXPECT_EQ(float_to_e4m3(std::ldexp(1.0f, -9)), 0x01);   // smallest subnormal
    EXPECT_EQ(float_to_e4m3(std::ldexp(1.0f, -10)), 0x00);  // half of it: tie to even (0)
    EXPECT_EQ(float_to_e4m3(std::ldexp(3.0f, -10)), 0x02);  // 1.5 ulps: tie to even (2)
    EXPECT_EQ(float_to_e4m3(1.0625f), 0x38);                // between 1 and 1.125: even is 1
    EXPECT_EQ(float_to_e4m3(1.1875f), 0x3a);                // between 1.125 and 1.25: even is 1.25
    EXPECT_EQ(float_to_e4m3(1.2f), 0x3a);
    EXPECT_EQ(float_to_e4m3(-3.3f), 0xc5);                  // -3.25
    EXPECT_EQ(float_to_e4m3(0.0149f), 0x08);                // nearest is 2^-6 (0.015625), the smallest normal
}

TEST(Numeric, E4m3EncodeIsNearestForEveryValueInRange) {
    // Exhaustive over a dense grid: the encoded value is a nearest representable one.
    std::vector<double> grid;
    for (int v = 0; v < 127; ++v) grid.push_back(e4m3_definition(static_cast<uint8_t>(v)));
    std::mt19937 rng(1);
    std::uniform_real_distribution<float> d(0.0f, 448.0f);
    for (int i = 0; i < 200000; ++i) {
        const float x = i < 1000 ? std::ldexp(d(rng), -12) : d(rng);
        const double got = e4m3_definition(float_to_e4m3(x));
        double best = 1e9;
        for (double g : grid) best = std::min(best, std::fabs(g - x));
        ASSERT_LE(std::fabs(got - x), best) << x;
    }
}

TEST(Numeric, Bf16AndF16) {
    EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
    EXPECT_EQ(float_to_bf16(bits_to_float(0x3f808000u)), 0x3f80);  // tie to even (down)
    EXPECT_EQ(float_to_bf16(bits_to_float(0x3f818000u)), 0x3f82);  // tie to even (up)
    EXPECT_EQ(bf16_to_float(0xc040), -3.0f);
    EXPECT_EQ(f16_to_float(0x3c00), 1.0f);
    EXPECT_EQ(f16_to_float(0xc000), -2.0f);
    EXPECT_EQ(f16_to_float(0x0001), std::ldexp(1.0f, -24));
    EXPECT_EQ(f16_to_float(0x7bff), 65504.0f);
    EXPECT_TRUE(std::isinf(f16_to_float(0x7c00)));
}

TEST(CpuOps, RmsNorm) {
    for (size_t n : {1u, 7u, 64u, 1000u}) {
        const size_t rows = 5;
        auto x = randn(rows * n, 1 + n), w = randn(n, 2 + n);
        std::vector<float> y(rows * n);
        cpu::rmsnorm(x.data(), w.data(), y.data(), rows, n, 1e-6f, pool());
        std::vector<double> ref(rows * n);
        for (size_t r = 0; r < rows; ++r) {
            double ss = 0;
            for (size_t i = 0; i < n; ++i) ss += double(x[r * n + i]) * x[r * n + i];
            const double inv = 1.0 / std::sqrt(ss / n + 1e-6);
            for (size_t i = 0; i < n; ++i) ref[r * n + i] = w[i] * x[r * n + i] * inv;
        }
        EXPECT_LT(rel_err(y, ref), 1e-5) << n;
    }
}

Linear bf16_linear(const std::vector<uint16_t>& data, size_t out, size_t in) {
    Linear l;
    l.type = WeightType::BF16;
    l.data = data.data();
    l.out = out;
    l.in = in;
    return l;
}

TEST(CpuOps, LinearBf16AllRowCounts) {
    const size_t N = 67, K = 131;
    auto wf = randn(N * K, 3, 0.1f);
    std::vector<uint16_t> w(N * K);
    for (size_t i = 0; i < w.size(); ++i) w[i] = float_to_bf16(wf[i]);
    const Linear l = bf16_linear(w, N, K);
    for (size_t rows : {1u, 2u, 3u, 5u, 9u}) {  // both the fused (<= 2) and the widened path
        auto x = randn(rows * K, 4 + rows);
        std::vector<float> y(rows * N, NAN);
        cpu::linear(x.data(), rows, l, y.data(), pool());
        std::vector<double> ref(rows * N);
        for (size_t m = 0; m < rows; ++m)
            for (size_t n = 0; n < N; ++n) {
                double s = 0;
                for (size_t k = 0; k < K; ++k) s += double(x[m * K + k]) * bf16_to_float(w[n * K + k]);
                ref[m * N + n] = s;
            }
        EXPECT_LT(rel_err(y, ref), 1e-5) << rows;
    }
}

TEST(CpuOps, QuantizeActivationPerTokenGroup) {
    const size_t rows = 3, K = 300;  // groups of 128, 128 and 44
    auto x = randn(rows * K, 5, 3.0f);
    x[0] = 0.0f;
    std::fill(x.begin() + K, x.begin() + K + 128, 0.0f);  // an all-zero group stays finite
    std::vector<uint8_t> q(rows * K);
    std::vector<float> s(rows * 3);
    cpu::quantize_fp8_per_token_group(x.data(), rows, K, q.data(), s.data());
    for (size_t r = 0; r < rows; ++r)
        for (size_t g = 0; g < 3; ++g) {
            const size_t b = g * 128, e = std::min(K, b + 128);
            float amax = 0;
            for (size_t i = b; i < e; ++i) amax = std::max(amax, std::fabs(x[r * K + i]));
            const float want = std::max(amax, 1e-10f) / 448.0f;
            EXPECT_EQ(s[r * 3 + g], want);
            for (size_t i = b; i < e; ++i) {
                const double deq = e4m3_definition(q[r * K + i]) * want;
                // Within half an e4m3 step of the value: 2^-4 relative, or the subnormal step.
                EXPECT_LE(std::fabs(deq - x[r * K + i]), std::max(std::fabs(x[r * K + i]) / 16.0, want * std::ldexp(1.0, -10)))
                    << r << "," << i;
            }
            if (amax > 0) {
                bool hit = false;  // the largest element maps to +-448 exactly
                for (size_t i = b; i < e; ++i) hit = hit || (q[r * K + i] & 0x7f) == 0x7e;
                EXPECT_TRUE(hit);
            }
        }
}

TEST(CpuOps, LinearFp8BlockScaledMatchesDefinition) {
    // Shapes with edge blocks in both directions: N = 200 (128 + 72), K = 300 (128 + 128 + 44).
    const size_t N = 200, K = 300, nb = 2, kb = 3;
    std::mt19937 rng(6);
    std::uniform_int_distribution<int> code(0, 253);
    std::vector<uint8_t> w(N * K);
    for (auto& v : w) {
        v = static_cast<uint8_t>(code(rng));
        if ((v & 0x7f) == 0x7f) v = 0x7e;
    }
    Linear l;
    l.type = WeightType::FP8_E4M3;
    l.data = w.data();
    l.out = N;
    l.in = K;
    l.scale_cols = kb;
    l.block_scales = randn(nb * kb, 7, 0.01f);
    for (auto& s : l.block_scales) s = std::fabs(s) + 1e-3f;
    for (size_t rows : {1u, 4u, 7u}) {
        auto x = randn(rows * K, 8 + rows);
        std::vector<float> y(rows * N, NAN);
        cpu::linear(x.data(), rows, l, y.data(), pool());
        std::vector<uint8_t> q(rows * K);
        std::vector<float> sx(rows * kb);
        cpu::quantize_fp8_per_token_group(x.data(), rows, K, q.data(), sx.data());
        std::vector<double> ref(rows * N);
        for (size_t m = 0; m < rows; ++m)
            for (size_t n = 0; n < N; ++n) {
                double acc = 0;
                for (size_t g = 0; g < kb; ++g) {
                    double part = 0;
                    for (size_t k = g * 128; k < std::min(K, g * 128 + 128); ++k)
                        part += e4m3_definition(q[m * K + k]) * e4m3_definition(w[n * K + k]);
                    acc += part * sx[m * kb + g] * l.block_scales[(n / 128) * kb + g];
                }
                ref[m * N + n] = acc;
            }
        EXPECT_LT(rel_err(y, ref), 1e-5) << rows;
    }
}

TEST(CpuOps, SiluMulAndAdd) {
    auto g = randn(333, 9, 4.0f), u = randn(333, 10);
    std::vector<float> out(333);
    cpu::silu_mul(g.data(), u.data(), out.data(), 333);
    for (size_t i = 0; i < 333; ++i) EXPECT_NEAR(out[i], g[i] / (1 + std::exp(-double(g[i]))) * u[i], 1e-5 * (1 + std::fabs(out[i])));
    auto a = g;
    cpu::add_inplace(a.data(), u.data(), 333);
    for (size_t i = 0; i < 333; ++i) EXPECT_EQ(a[i], g[i] + u[i]);
}

TEST(CpuOps, RopeRotatesPairsHalfApart) {
    const size_t T = 3, heads = 2, d = 10;
    cpu::Rope rope;
    rope.rot_dim = d;
    for (size_t i = 0; i < d / 2; ++i) rope.inv_freq.push_back(std::pow(10000.0f, -2.0f * i / d));
    rope.attention_scaling = 1.25f;
    auto x = randn(T * heads * d, 11);
    auto y = x;
    const int32_t pos[] = {0, 5, 1000};
    cpu::apply_rope(y.data(), T, heads, d, pos, rope);
    for (size_t t = 0; t < T; ++t)
        for (size_t h = 0; h < heads; ++h)
            for (size_t i = 0; i < d / 2; ++i) {
                const float* v = x.data() + (t * heads + h) * d;
                const double phi = double(float(pos[t]) * rope.inv_freq[i]);
                const double c = std::cos(phi) * 1.25, s = std::sin(phi) * 1.25;
                EXPECT_NEAR(y[(t * heads + h) * d + i], v[i] * c - v[i + d / 2] * s, 1e-4);
                EXPECT_NEAR(y[(t * heads + h) * d + i + d / 2], v[i + d / 2] * c + v[i] * s, 1e-4);
            }
}

TEST(CpuOps, YarnMatchesTheSpecWorkedExample) {
    // shared/spec 1.4: D = 128, theta = 1e6, L0 = 32768, s = 4 -> low 23, high 40, mscale 1.13863.
    ModelConfig c;
    c.head_dim = 128;
    c.rope.theta = 1e6;
    c.rope.type = "yarn";
    c.rope.factor = 4.0;
    c.rope.original_max_position_embeddings = 32768;
    const cpu::Rope r = make_rope(c);
    EXPECT_NEAR(r.attention_scaling, 1.13863, 1e-5);
    for (size_t i = 0; i < 64; ++i) {
        const double base = std::pow(1e6, -2.0 * i / 128);
        if (i <= 23) EXPECT_FLOAT_EQ(r.inv_freq[i], base) << i;        // kept (extrapolated)
        if (i >= 40) EXPECT_FLOAT_EQ(r.inv_freq[i], base / 4) << i;    // interpolated
        if (i > 23 && i < 40) {
            const double ramp = (i - 23.0) / 17.0;
            EXPECT_FLOAT_EQ(r.inv_freq[i], base / 4 * ramp + base * (1 - ramp)) << i;
        }
    }
}

// Paged attention against dense causal attention: two sequences with scattered blocks, GQA 3:1.
void check_attention(KvDtype dtype, double tol) {
    const size_t kv_heads = 2, heads = 6, d = 40, bs = 5, blocks = 16;
    const size_t row = kv_heads * d, elem = dtype == KvDtype::F32 ? 4 : 2;
    std::vector<uint8_t> kmem(blocks * bs * row * elem), vmem(kmem.size());
    cpu::PagedKvLayer kv{dtype, kmem.data(), vmem.data(), bs, kv_heads, d};
    const std::vector<int32_t> table_a = {7, 2, 11, 0}, table_b = {5, 14, 3};
    const size_t len_a = 17, len_b = 12;
    auto k_a = randn(len_a * row, 12), v_a = randn(len_a * row, 13), k_b = randn(len_b * row, 14), v_b = randn(len_b * row, 15);
    std::vector<cpu::TokenSlot> slots;
    for (size_t p = 0; p < len_a; ++p) slots.push_back({table_a.data(), int32_t(p)});
    cpu::kv_write(kv, k_a.data(), v_a.data(), slots.data(), len_a);
    slots.clear();
    for (size_t p = 0; p < len_b; ++p) slots.push_back({table_b.data(), int32_t(p)});
    cpu::kv_write(kv, k_b.data(), v_b.data(), slots.data(), len_b);

    // Queries: the last 3 positions of a and positions 0 and 11 of b.
    std::vector<cpu::TokenSlot> q_slots = {{table_a.data(), 14}, {table_a.data(), 15}, {table_a.data(), 16},
                                           {table_b.data(), 0}, {table_b.data(), 11}};
    auto q = randn(q_slots.size() * heads * d, 16);
    std::vector<float> out(q.size(), NAN);
    const float scale = 1.0f / std::sqrt(float(d));
    cpu::attention(kv, q.data(), q_slots.data(), q_slots.size(), heads, scale, out.data(), pool());

    auto stored = [&](float x) { return dtype == KvDtype::F32 ? double(x) : double(bf16_to_float(float_to_bf16(x))); };
    std::vector<double> ref(out.size());
    for (size_t t = 0; t < q_slots.size(); ++t) {
        const bool is_a = q_slots[t].block_table == table_a.data();
        const auto& K = is_a ? k_a : k_b;
        const auto& V = is_a ? v_a : v_b;
        const size_t n = q_slots[t].position + 1;
        for (size_t h = 0; h < heads; ++h) {
            const size_t g = h / (heads / kv_heads);
            std::vector<double> s(n);
            double mx = -1e300;
            for (size_t j = 0; j < n; ++j) {
                double dot = 0;
                for (size_t i = 0; i < d; ++i) dot += q[(t * heads + h) * d + i] * stored(K[j * row + g * d + i]);
                s[j] = dot * scale;
                mx = std::max(mx, s[j]);
            }
            double sum = 0;
            for (auto& v : s) sum += (v = std::exp(v - mx));
            for (size_t i = 0; i < d; ++i) {
                double acc = 0;
                for (size_t j = 0; j < n; ++j) acc += s[j] / sum * stored(V[j * row + g * d + i]);
                ref[(t * heads + h) * d + i] = acc;
            }
        }
    }
    EXPECT_LT(rel_err(out, ref), tol);
}

TEST(CpuOps, PagedAttentionF32) { check_attention(KvDtype::F32, 1e-5); }
TEST(CpuOps, PagedAttentionBf16Cache) { check_attention(KvDtype::BF16, 1e-5); }

}  // namespace
