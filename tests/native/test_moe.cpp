// Qwen3-MoE on the CPU: the router against hand-computed cases, the routed block against a naive
// per-token loop over each token's k experts, config validation, dummy-weight models, and the
// transformers fixtures of tests/fixtures/make_moe_fixtures.py.
//
// Tolerances. The block computes in fp32 and the loop in double from the same bf16 weights: a few
// fp32 ulps times sqrt(n) apart, relative 1e-5 (as test_cpu_ops.cpp). With FP8 experts the loop
// runs the same cpu::linear per token, so only the kernels' summation order (one row vs a gathered
// run of rows) differs: also 1e-5. The fixture bounds are test_fixtures.cpp's, with the same
// reasoning: BF16 logits within 1e-4 relative L2 of transformers in fp32, FP8 within 2e-3 (most prompts; 0.1 for rounding flips, see fixture_checks.h) of the
// reference that quantises activations like the engine.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <numeric>
#include <random>

#include "core/error.h"
#include "core/numeric.h"
#include "core/thread_pool.h"
#include "cpu/ops.h"
#include "fixture_checks.h"
#include "fixture_util.h"
#include "model/config.h"
#include "model/qwen3_moe.h"
#include "model/weight_loader.h"

using namespace q3n;
using namespace q3n_test;
namespace fs = std::filesystem;

namespace {

ThreadPool& pool() {
    static ThreadPool p(3);  // more workers than cores on CI: exercises the splitting
    return p;
}

std::vector<float> randn(size_t n, uint32_t seed, float scale = 1.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> d(0.0f, scale);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return v;
}

double rel_err(const std::vector<float>& a, const std::vector<double>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < b.size(); ++i) {
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += b[i] * b[i];
    }
    return std::sqrt(num / std::max(den, 1e-300));
}

// ---- Router -----------------------------------------------------------------------------------------

struct Routed {
    std::vector<int32_t> experts;
    std::vector<float> weights;
};

Routed route(const std::vector<float>& logits, size_t E, size_t k, bool renormalize) {
    const size_t T = logits.size() / E;
    Routed r{std::vector<int32_t>(T * k), std::vector<float>(T * k)};
    cpu::moe_route(logits.data(), T, E, k, renormalize, r.experts.data(), r.weights.data());
    return r;
}

TEST(MoeRouter, HandComputedSoftmaxTopKAndRenormalisation) {
    const double e = std::exp(1.0);
    // softmax([3, 1, 1, 0]) = [e^3, e, e, 1] / Z; top-2 are experts 0 and 1 (1 beats 2 on the tie).
    const double Z = e * e * e + 2 * e + 1;
    {
        const Routed r = route({3, 1, 1, 0}, 4, 2, /*renormalize=*/false);
        EXPECT_EQ(r.experts, (std::vector<int32_t>{0, 1}));
        EXPECT_NEAR(r.weights[0], e * e * e / Z, 1e-6);
        EXPECT_NEAR(r.weights[1], e / Z, 1e-6);
    }
    {
        // Renormalised over the two: e^3 / (e^3 + e) = 1 / (1 + e^-2).
        const Routed r = route({3, 1, 1, 0}, 4, 2, /*renormalize=*/true);
        EXPECT_EQ(r.experts, (std::vector<int32_t>{0, 1}));
        EXPECT_NEAR(r.weights[0], 1 / (1 + std::exp(-2.0)), 1e-6);
        EXPECT_NEAR(r.weights[1], std::exp(-2.0) / (1 + std::exp(-2.0)), 1e-6);
        EXPECT_NEAR(r.weights[0] + r.weights[1], 1.0, 1e-6);
    }
    {
        // The best is not first: order is by probability, not by index.
        const Routed r = route({-1, 0.5, 2, 0.25, 1.5}, 5, 3, false);
        EXPECT_EQ(r.experts, (std::vector<int32_t>{2, 4, 1}));
        const double z = std::exp(-1.0) + std::exp(0.5) + std::exp(2.0) + std::exp(0.25) + std::exp(1.5);
        EXPECT_NEAR(r.weights[0], std::exp(2.0) / z, 1e-6);
        EXPECT_NEAR(r.weights[1], std::exp(1.5) / z, 1e-6);
        EXPECT_NEAR(r.weights[2], std::exp(0.5) / z, 1e-6);
    }
}

TEST(MoeRouter, TiesGoToTheLowerIndex) {
    EXPECT_EQ(route({2, 5, 5, 5}, 4, 1, true).experts, (std::vector<int32_t>{1}));
    EXPECT_EQ(route({2, 5, 5, 5}, 4, 2, true).experts, (std::vector<int32_t>{1, 2}));
    const Routed all = route({2, 5, 5, 5}, 4, 3, true);
    EXPECT_EQ(all.experts, (std::vector<int32_t>{1, 2, 3}));
    for (float w : all.weights) EXPECT_NEAR(w, 1.0 / 3.0, 1e-6);
    EXPECT_EQ(route({0, 0, 0, 0, 0, 0}, 6, 4, false).experts, (std::vector<int32_t>{0, 1, 2, 3}));
    // k = E returns every expert, best first, ties by index.
    EXPECT_EQ(route({1, 3, 1, 2}, 4, 4, false).experts, (std::vector<int32_t>{1, 3, 0, 2}));
}

TEST(MoeRouter, LargeLogitsAndManyTokens) {
    // Max-subtracted softmax: logits near 1000 neither overflow nor lose their differences.
    const Routed big = route({1000, 999, -1000, 998}, 4, 2, true);
    EXPECT_EQ(big.experts, (std::vector<int32_t>{0, 1}));
    EXPECT_NEAR(big.weights[0], 1 / (1 + std::exp(-1.0)), 1e-6);
    const Routed raw = route({1000, 999, -1000, 998}, 4, 2, false);
    const double z = 1 + std::exp(-1.0) + std::exp(-2.0);
    EXPECT_NEAR(raw.weights[0], 1 / z, 1e-6);
    EXPECT_NEAR(raw.weights[1], std::exp(-1.0) / z, 1e-6);

    // Rows are independent: three tokens in one call route as each alone.
    const std::vector<float> rows = {3, 1, 1, 0, /**/ 0, 0, 9, 0, /**/ -5, 4, 4.5, 4};
    const Routed r = route(rows, 4, 2, true);
    EXPECT_EQ(r.experts, (std::vector<int32_t>{0, 1, 2, 0, 2, 1}));
    for (size_t t = 0; t < 3; ++t) {
        const Routed one = route(std::vector<float>(rows.begin() + 4 * t, rows.begin() + 4 * t + 4), 4, 2, true);
        EXPECT_EQ(one.weights[0], r.weights[2 * t]);
        EXPECT_EQ(one.weights[1], r.weights[2 * t + 1]);
    }
}

// ---- The routed block against a naive loop ---------------------------------------------------------

// Holds the numbers behind the Linear views of a test block.
struct TestBlock {
    size_t E = 0, k = 0, H = 0, I = 0;
    bool renormalize = true;
    std::vector<std::vector<uint16_t>> bf16;
    std::vector<std::vector<uint8_t>> e4m3;
    Linear router;
    std::vector<cpu::MoeExpert> experts;

    cpu::MoeBlock block() const { return {&router, experts.data(), E, k, renormalize}; }

    Linear make_bf16(const std::vector<float>& w, size_t out, size_t in) {
        bf16.emplace_back(w.size());
        for (size_t i = 0; i < w.size(); ++i) bf16.back()[i] = float_to_bf16(w[i]);
        Linear l;
        l.type = WeightType::BF16;
        l.data = bf16.back().data();
        l.out = out;
        l.in = in;
        return l;
    }

    // Block-FP8 as the checkpoints: per 128x128 block, scale amax/448, e4m3 round to nearest.
    Linear make_fp8(const std::vector<float>& w, size_t out, size_t in) {
        Linear l;
        l.type = WeightType::FP8_E4M3;
        l.out = out;
        l.in = in;
        l.scale_cols = (in + 127) / 128;
        l.block_scales.assign(((out + 127) / 128) * l.scale_cols, 0.0f);
        for (size_t n = 0; n < out; ++n)
            for (size_t c = 0; c < in; ++c) {
                float& s = l.block_scales[(n / 128) * l.scale_cols + c / 128];
                s = std::max(s, std::fabs(w[n * in + c]) / 448.0f);
            }
        e4m3.emplace_back(w.size());
        for (size_t n = 0; n < out; ++n)
            for (size_t c = 0; c < in; ++c)
                e4m3.back()[n * in + c] = float_to_e4m3(w[n * in + c] / l.block_scales[(n / 128) * l.scale_cols + c / 128]);
        l.data = e4m3.back().data();
        return l;
    }

    double weight(const Linear& l, size_t n, size_t c) const {
        if (l.type == WeightType::BF16) return bf16_to_float(static_cast<const uint16_t*>(l.data)[n * l.in + c]);
        return e4m3_to_float(static_cast<const uint8_t*>(l.data)[n * l.in + c]) *
               double(l.block_scales[(n / 128) * l.scale_cols + c / 128]);
    }
};

// E experts of width I over hidden H; experts listed in `dead` can never win: their router row has
// -30 at channel 0, where every test token holds 1 (other logits are O(1)).
TestBlock make_block(size_t E, size_t k, size_t H, size_t I, bool renormalize, bool fp8,
                     const std::vector<size_t>& dead, uint32_t seed) {
    TestBlock b;
    b.E = E;
    b.k = k;
    b.H = H;
    b.I = I;
    b.renormalize = renormalize;
    b.bf16.reserve(4 * E + 1);  // the views point into these vectors: no reallocation
    b.e4m3.reserve(4 * E + 1);
    auto r = randn(E * H, seed, 1.0f / std::sqrt(float(H)) * 2.0f);
    for (size_t e : dead) r[e * H] = -30.0f;
    b.router = b.make_bf16(r, E, H);
    for (size_t e = 0; e < E; ++e) {
        const uint32_t s = seed + 100 * static_cast<uint32_t>(e + 1);
        auto g = randn(I * H, s + 1, 1.0f / std::sqrt(float(H)));
        auto u = randn(I * H, s + 2, 1.0f / std::sqrt(float(H)));
        auto d = randn(H * I, s + 3, 1.0f / std::sqrt(float(I)));
        if (fp8)
            b.experts.push_back({b.make_fp8(g, I, H), b.make_fp8(u, I, H), b.make_fp8(d, H, I)});
        else
            b.experts.push_back({b.make_bf16(g, I, H), b.make_bf16(u, I, H), b.make_bf16(d, H, I)});
    }
    return b;
}

std::vector<float> tokens_for(size_t T, size_t H, uint32_t seed) {
    auto x = randn(T * H, seed);
    for (size_t t = 0; t < T; ++t) x[t * H] = 1.0f;  // the dead experts' channel
    return x;
}

// Spec 2.2 one token at a time, in double: softmax, top-k (ties to the lower index), optional
// renormalisation, then each chosen expert's SwiGLU weighted.
struct NaiveResult {
    std::vector<double> y;
    std::vector<int32_t> experts;
};

NaiveResult naive_moe(const TestBlock& b, const std::vector<float>& x, size_t T) {
    NaiveResult out{std::vector<double>(T * b.H, 0.0), {}};
    for (size_t t = 0; t < T; ++t) {
        const float* xt = x.data() + t * b.H;
        std::vector<double> p(b.E);
        for (size_t e = 0; e < b.E; ++e)
            for (size_t h = 0; h < b.H; ++h) p[e] += double(xt[h]) * b.weight(b.router, e, h);
        const double m = *std::max_element(p.begin(), p.end());
        double z = 0;
        for (auto& v : p) z += v = std::exp(v - m);
        for (auto& v : p) v /= z;
        std::vector<size_t> idx(b.E);
        std::iota(idx.begin(), idx.end(), 0);
        std::stable_sort(idx.begin(), idx.end(), [&](size_t a, size_t c) { return p[a] > p[c]; });
        double sum = 0;
        for (size_t j = 0; j < b.k; ++j) sum += p[idx[j]];
        for (size_t j = 0; j < b.k; ++j) {
            const size_t e = idx[j];
            out.experts.push_back(static_cast<int32_t>(e));
            const double w = b.renormalize ? p[e] / sum : p[e];
            const cpu::MoeExpert& ex = b.experts[e];
            std::vector<double> a(b.I);
            for (size_t i = 0; i < b.I; ++i) {
                double g = 0, u = 0;
                for (size_t h = 0; h < b.H; ++h) {
                    g += double(xt[h]) * b.weight(ex.gate, i, h);
                    u += double(xt[h]) * b.weight(ex.up, i, h);
                }
                a[i] = g / (1 + std::exp(-g)) * u;
            }
            for (size_t h = 0; h < b.H; ++h) {
                double s = 0;
                for (size_t i = 0; i < b.I; ++i) s += a[i] * b.weight(ex.down, h, i);
                out.y[t * b.H + h] += w * s;
            }
        }
    }
    return out;
}

size_t idle_experts(const std::vector<int32_t>& chosen, size_t E) {
    std::vector<int> used(E, 0);
    for (int32_t e : chosen) used[e] = 1;
    return E - std::accumulate(used.begin(), used.end(), size_t{0});
}

TEST(MoeBlock, MatchesPerTokenLoopInDouble) {
    // H and I not multiples of anything the kernels like; experts 3 and 6 can never win.
    for (bool renormalize : {true, false}) {
        const TestBlock b = make_block(8, 2, 72, 40, renormalize, false, {3, 6}, 7);
        cpu::MoeScratch scratch;  // reused across token counts, as the runner does
        for (size_t T : {1, 5, 17}) {
            const auto x = tokens_for(T, b.H, 100 + static_cast<uint32_t>(T));
            std::vector<float> y(T * b.H, NAN);
            cpu::moe_forward(x.data(), T, b.block(), y.data(), scratch, pool());
            const NaiveResult ref = naive_moe(b, x, T);
            EXPECT_EQ(std::vector<int32_t>(scratch.experts.begin(), scratch.experts.begin() + T * b.k), ref.experts)
                << "routing differs at T=" << T;
            EXPECT_LT(rel_err(y, ref.y), 1e-5) << "T=" << T << " renormalize=" << renormalize;
            EXPECT_GE(idle_experts(ref.experts, b.E), 2u) << "T=" << T;
        }
    }
}

TEST(MoeBlock, TopThreeOfSixWithRenormalisation) {
    const TestBlock b = make_block(6, 3, 48, 24, true, false, {0}, 11);
    cpu::MoeScratch scratch;
    for (size_t T : {1, 5, 17}) {
        const auto x = tokens_for(T, b.H, 200 + static_cast<uint32_t>(T));
        std::vector<float> y(T * b.H);
        cpu::moe_forward(x.data(), T, b.block(), y.data(), scratch, pool());
        EXPECT_LT(rel_err(y, naive_moe(b, x, T).y), 1e-5) << "T=" << T;
    }
}

// FP8 experts: the grouped block equals running cpu::linear per token on that token's experts
// (activation quantisation is per token, so grouping rows must not change it).
TEST(MoeBlock, Fp8ExpertsMatchPerTokenLinearLoop) {
    const TestBlock b = make_block(8, 2, 256, 128, true, true, {5}, 13);
    cpu::MoeScratch scratch;
    for (size_t T : {1, 5, 17}) {
        const auto x = tokens_for(T, b.H, 300 + static_cast<uint32_t>(T));
        std::vector<float> y(T * b.H);
        cpu::moe_forward(x.data(), T, b.block(), y.data(), scratch, pool());
        const std::vector<int32_t> chosen(scratch.experts.begin(), scratch.experts.begin() + T * b.k);
        const std::vector<float> weights(scratch.weights.begin(), scratch.weights.begin() + T * b.k);
        EXPECT_EQ(chosen, naive_moe(b, x, T).experts);
        std::vector<double> ref(T * b.H, 0.0);
        std::vector<float> g(b.I), u(b.I), o(b.H);
        for (size_t t = 0; t < T; ++t)
            for (size_t j = 0; j < b.k; ++j) {
                const cpu::MoeExpert& ex = b.experts[chosen[t * b.k + j]];
                cpu::linear(x.data() + t * b.H, 1, ex.gate, g.data(), pool());
                cpu::linear(x.data() + t * b.H, 1, ex.up, u.data(), pool());
                cpu::silu_mul(g.data(), u.data(), g.data(), b.I);
                cpu::linear(g.data(), 1, ex.down, o.data(), pool());
                for (size_t h = 0; h < b.H; ++h) ref[t * b.H + h] += double(weights[t * b.k + j]) * o[h];
            }
        EXPECT_LT(rel_err(y, ref), 1e-5) << "T=" << T;
        EXPECT_GE(idle_experts(chosen, b.E), 1u);
    }
}

// ---- Config ------------------------------------------------------------------------------------------

nlohmann::json moe_config() {
    return {{"architectures", {"Qwen3MoeForCausalLM"}},
            {"model_type", "qwen3_moe"},
            {"vocab_size", 256},
            {"hidden_size", 128},
            {"intermediate_size", 192},
            {"num_hidden_layers", 3},
            {"num_attention_heads", 4},
            {"num_key_value_heads", 2},
            {"head_dim", 32},
            {"max_position_embeddings", 4096},
            {"rms_norm_eps", 1e-6},
            {"rope_theta", 1000000.0},
            {"rope_scaling", nullptr},
            {"tie_word_embeddings", false},
            {"num_experts", 8},
            {"num_experts_per_tok", 2},
            {"moe_intermediate_size", 128},
            {"norm_topk_prob", true},
            {"decoder_sparse_step", 1},
            {"mlp_only_layers", {1}},
            {"bos_token_id", 151643},
            {"eos_token_id", 151645}};
}

q3n_status parse(const nlohmann::json& j, std::string* message = nullptr) {
    try {
        ModelConfig::from_json(j, "config.json");
        return Q3N_OK;
    } catch (const Error& e) {
        if (message) *message = e.what();
        return e.status();
    }
}

TEST(MoeConfig, ReadsTheMoeFields) {
    const ModelConfig c = ModelConfig::from_json(moe_config(), "config.json");
    EXPECT_EQ(c.num_experts, 8u);
    EXPECT_EQ(c.num_experts_per_tok, 2u);
    EXPECT_EQ(c.moe_intermediate_size, 128u);
    EXPECT_TRUE(c.norm_topk_prob);
    EXPECT_EQ(c.decoder_sparse_step, 1u);
    EXPECT_EQ(c.mlp_only_layers, (std::vector<uint32_t>{1}));
    EXPECT_TRUE(c.is_moe_layer(0));
    EXPECT_FALSE(c.is_moe_layer(1));
    EXPECT_TRUE(c.is_moe_layer(2));

    // Spec 2.1: with decoder_sparse_step 2 only layers whose (l + 1) is even are sparse.
    auto j = moe_config();
    j["decoder_sparse_step"] = 2;
    j["mlp_only_layers"] = nlohmann::json::array();
    j["num_hidden_layers"] = 4;
    const ModelConfig s = ModelConfig::from_json(j, "config.json");
    EXPECT_FALSE(s.is_moe_layer(0));
    EXPECT_TRUE(s.is_moe_layer(1));
    EXPECT_FALSE(s.is_moe_layer(2));
    EXPECT_TRUE(s.is_moe_layer(3));

    // transformers' defaults for the optional fields: no renormalisation, every layer sparse.
    j = moe_config();
    j.erase("norm_topk_prob");
    j.erase("decoder_sparse_step");
    j["mlp_only_layers"] = nullptr;
    const ModelConfig d = ModelConfig::from_json(j, "config.json");
    EXPECT_FALSE(d.norm_topk_prob);
    for (size_t l = 0; l < 3; ++l) EXPECT_TRUE(d.is_moe_layer(l));
}

TEST(MoeConfig, DenseConfigsAreUnchanged) {
    const auto j = read_json(fixture_dir("bf16_tied") + "/config.json");
    const ModelConfig c = ModelConfig::from_json(j, "config.json");
    EXPECT_EQ(c.num_experts, 0u);
    EXPECT_EQ(c.num_experts_per_tok, 0u);
    EXPECT_FALSE(c.is_moe_layer(0));
}

TEST(MoeConfig, BadMoeFieldsAreNamed) {
    struct Case {
        const char* tag;
        std::function<void(nlohmann::json&)> edit;
        const char* mention;
    };
    const std::vector<Case> cases = {
        {"k_above_e", [](auto& c) { c["num_experts_per_tok"] = 9; }, "num_experts_per_tok"},
        {"k_zero", [](auto& c) { c["num_experts_per_tok"] = 0; }, "num_experts_per_tok"},
        {"no_experts", [](auto& c) { c.erase("num_experts"); }, "num_experts"},
        {"no_k", [](auto& c) { c.erase("num_experts_per_tok"); }, "num_experts_per_tok"},
        {"no_moe_inter", [](auto& c) { c.erase("moe_intermediate_size"); }, "moe_intermediate_size"},
        {"no_moe_inter_by_type_only", [](auto& c) { c.erase("architectures"); c.erase("moe_intermediate_size"); },
         "moe_intermediate_size"},
        {"absurd_experts", [](auto& c) { c["num_experts"] = 1 << 20; }, "num_experts"},
        {"absurd_moe_inter", [](auto& c) { c["moe_intermediate_size"] = 1ll << 33; }, "moe_intermediate_size"},
        {"string_experts", [](auto& c) { c["num_experts"] = "8"; }, "num_experts"},
        {"step_zero", [](auto& c) { c["decoder_sparse_step"] = 0; }, "decoder_sparse_step"},
        {"norm_not_bool", [](auto& c) { c["norm_topk_prob"] = 1; }, "norm_topk_prob"},
        {"only_not_list", [](auto& c) { c["mlp_only_layers"] = 1; }, "mlp_only_layers"},
        {"only_out_of_range", [](auto& c) { c["mlp_only_layers"] = {0, 3}; }, "mlp_only_layers"},
        {"only_negative", [](auto& c) { c["mlp_only_layers"] = {-1}; }, "mlp_only_layers"},
    };
    for (const auto& cs : cases) {
        auto j = moe_config();
        cs.edit(j);
        std::string message;
        EXPECT_EQ(parse(j, &message), Q3N_ERR_BAD_CONFIG) << cs.tag;
        EXPECT_NE(message.find(cs.mention), std::string::npos) << cs.tag << ": " << message;
    }
}

// ---- Models with dummy weights ------------------------------------------------------------------------

nlohmann::json fp8_moe_config() {
    auto j = moe_config();
    nlohmann::json keep = {"lm_head"};
    for (int l = 0; l < 3; ++l) {
        const std::string p = "model.layers." + std::to_string(l);
        keep.push_back(p + ".input_layernorm");
        keep.push_back(p + ".mlp.gate");
        keep.push_back(p + ".post_attention_layernorm");
    }
    j["quantization_config"] = {{"activation_scheme", "dynamic"}, {"fmt", "e4m3"}, {"quant_method", "fp8"},
                                {"weight_block_size", {128, 128}}, {"modules_to_not_convert", keep}};
    return j;
}

uint64_t expected_parameters(const ModelConfig& c) {
    const uint64_t H = c.hidden_size, d = c.head_dim, V = c.vocab_size;
    uint64_t n = 2 * V * H + H;  // embedding, lm_head, final norm
    for (size_t l = 0; l < c.num_layers; ++l) {
        n += 2 * H * c.num_heads * d + 2 * H * c.num_kv_heads * d + 2 * H + 2 * d;
        n += c.is_moe_layer(l) ? c.num_experts * H + c.num_experts * 3 * H * c.moe_intermediate_size
                               : 3 * H * c.intermediate_size;
    }
    return n;
}

TEST(MoeModel, DummyWeightsLoadAndStep) {
    for (bool fp8 : {false, true}) {
        const auto j = fp8 ? fp8_moe_config() : moe_config();
        const std::string dir = write_config(fp8 ? "moe_dummy_fp8" : "moe_dummy_bf16", j);
        auto run = [&](uint64_t seed) {
            ModelHandle h;
            const q3n_model_options o = cpu_options(true, seed);
            EXPECT_EQ(q3n_model_load(dir.c_str(), &o, &h.m), Q3N_OK) << q3n_last_error();
            if (!h.m) return std::vector<float>();
            q3n_model_info info{};
            info.struct_size = sizeof(info);
            EXPECT_EQ(q3n_model_get_info(h.m, &info), Q3N_OK);
            EXPECT_STREQ(info.architecture, "Qwen3MoeForCausalLM");
            EXPECT_EQ(info.weight_dtype, fp8 ? Q3N_DTYPE_FP8_E4M3 : Q3N_DTYPE_BF16);
            EXPECT_EQ(info.parameter_count, expected_parameters(ModelConfig::from_json(j, "config.json")));
            return prefill(h.m, {5, 6, 7, 200, 9, 3, 255}, 256);
        };
        const auto a = run(1), b = run(1), c = run(2);
        ASSERT_EQ(a.size(), 256u);
        EXPECT_EQ(a, b) << "fp8=" << fp8;
        EXPECT_NE(a, c) << "fp8=" << fp8;
        EXPECT_TRUE(std::all_of(a.begin(), a.end(), [](float x) { return std::isfinite(x); })) << "fp8=" << fp8;
    }
}

// The dummy format follows the quantization_config per module, exactly like a checkpoint: routers
// and norms listed in modules_to_not_convert stay BF16, experts and attention become FP8, and the
// dense (mlp_only) layer has a SwiGLU of intermediate_size instead of experts.
TEST(MoeModel, DummyWeightsFollowTheExclusions) {
    const ModelConfig c = ModelConfig::from_json(fp8_moe_config(), "config.json");
    std::vector<std::unique_ptr<uint8_t[]>> owned;
    auto src = dummy_source(c, 3, pool(), owned);
    const Qwen3MoeWeights w = load_qwen3_moe_weights(c, *src, nullptr);
    ASSERT_EQ(w.layers.size(), 3u);
    for (size_t l : {0u, 2u}) {
        const Qwen3MoeLayerWeights& L = w.layers[l];
        EXPECT_TRUE(L.sparse);
        EXPECT_EQ(L.router.type, WeightType::BF16);
        EXPECT_EQ(L.router.out, 8u);
        ASSERT_EQ(L.experts.size(), 8u);
        for (const auto& e : L.experts) {
            EXPECT_EQ(e.gate.type, WeightType::FP8_E4M3);
            EXPECT_EQ(e.down.out, 128u);
            EXPECT_EQ(e.down.in, 128u);
        }
        EXPECT_NE(L.experts[0].gate.data, L.experts[1].gate.data);  // separate tensors, not one copy
        EXPECT_EQ(L.common.q.type, WeightType::FP8_E4M3);
        EXPECT_EQ(L.common.gate.data, nullptr);
    }
    const Qwen3MoeLayerWeights& dense = w.layers[1];
    EXPECT_FALSE(dense.sparse);
    EXPECT_TRUE(dense.experts.empty());
    EXPECT_EQ(dense.common.gate.type, WeightType::FP8_E4M3);
    EXPECT_EQ(dense.common.gate.out, 192u);
    EXPECT_EQ(w.lm_head.type, WeightType::BF16);
}

// Decoding token by token reads the cache the earlier steps wrote and routes one token at a time:
// it must give the logits of one prefill over the same tokens (every expert sees a run of rows there).
TEST(MoeModel, DecodeEqualsPrefillAndBatchEqualsSingle) {
    for (bool fp8 : {false, true}) {
        const std::string dir = write_config(fp8 ? "moe_decode_fp8" : "moe_decode_bf16", fp8 ? fp8_moe_config() : moe_config());
        ModelHandle h;
        const q3n_model_options o = cpu_options(true, 5);
        ASSERT_EQ(q3n_model_load(dir.c_str(), &o, &h.m), Q3N_OK) << q3n_last_error();
        const std::vector<int32_t> tokens = {11, 42, 7, 7, 190, 3, 64, 128, 250, 1, 99};
        const auto full = prefill(h.m, tokens, 256);

        SequenceHandle s;
        ASSERT_EQ(q3n_sequence_create(h.m, &s.s), Q3N_OK);
        for (int32_t t : tokens) {
            ASSERT_EQ(q3n_sequence_append(s.s, &t, 1), Q3N_OK);
            ASSERT_EQ(q3n_model_step(h.m, &s.s, 1, 0), Q3N_OK) << q3n_last_error();
        }
        EXPECT_LT(relative_l2(logits_of(s.s, 256), full), 1e-5) << "fp8=" << fp8;

        // Three sequences of different lengths in one step equal each alone.
        const std::vector<std::vector<int32_t>> prompts = {{1, 2, 3, 4, 5}, {77}, {200, 201, 9, 9, 9, 9, 30, 31, 32}};
        std::vector<SequenceHandle> seqs(prompts.size());
        std::vector<q3n_sequence*> batch;
        for (size_t i = 0; i < prompts.size(); ++i) {
            ASSERT_EQ(q3n_sequence_create(h.m, &seqs[i].s), Q3N_OK);
            ASSERT_EQ(q3n_sequence_append(seqs[i].s, prompts[i].data(), prompts[i].size()), Q3N_OK);
            batch.push_back(seqs[i].s);
        }
        ASSERT_EQ(q3n_model_step(h.m, batch.data(), batch.size(), 0), Q3N_OK) << q3n_last_error();
        for (size_t i = 0; i < prompts.size(); ++i)
            EXPECT_LT(relative_l2(logits_of(seqs[i].s, 256), prefill(h.m, prompts[i], 256)), 1e-5)
                << "fp8=" << fp8 << " sequence " << i;
    }
}

// Every tensor of a config in the released per-expert names, BF16 zeros (the values do not matter here).
std::map<std::string, RawTensor> zero_checkpoint(const ModelConfig& c) {
    std::map<std::string, RawTensor> t;
    auto put = [&](const std::string& name, std::vector<int64_t> shape) {
        int64_t n = 1;
        for (int64_t d : shape) n *= d;
        t[name] = RawTensor{"BF16", shape, std::vector<uint8_t>(2 * static_cast<size_t>(n), 0)};
    };
    const int64_t H = c.hidden_size, d = c.head_dim, q = c.num_heads * d, kv = c.num_kv_heads * d;
    put("model.embed_tokens.weight", {c.vocab_size, H});
    put("lm_head.weight", {c.vocab_size, H});
    put("model.norm.weight", {H});
    for (size_t l = 0; l < c.num_layers; ++l) {
        const std::string p = "model.layers." + std::to_string(l) + ".";
        put(p + "input_layernorm.weight", {H});
        put(p + "post_attention_layernorm.weight", {H});
        put(p + "self_attn.q_norm.weight", {d});
        put(p + "self_attn.k_norm.weight", {d});
        put(p + "self_attn.q_proj.weight", {q, H});
        put(p + "self_attn.k_proj.weight", {kv, H});
        put(p + "self_attn.v_proj.weight", {kv, H});
        put(p + "self_attn.o_proj.weight", {H, q});
        if (!c.is_moe_layer(l)) {
            const int64_t I = c.intermediate_size;
            put(p + "mlp.gate_proj.weight", {I, H});
            put(p + "mlp.up_proj.weight", {I, H});
            put(p + "mlp.down_proj.weight", {H, I});
            continue;
        }
        const int64_t Ie = c.moe_intermediate_size;
        put(p + "mlp.gate.weight", {c.num_experts, H});
        for (size_t e = 0; e < c.num_experts; ++e) {
            const std::string x = p + "mlp.experts." + std::to_string(e) + ".";
            put(x + "gate_proj.weight", {Ie, H});
            put(x + "up_proj.weight", {Ie, H});
            put(x + "down_proj.weight", {H, Ie});
        }
    }
    return t;
}

TEST(MoeModel, CheckpointTensorsAreCheckedPerExpert) {
    auto j = moe_config();
    j["moe_intermediate_size"] = 64;  // not square, so a transposed expert has the wrong shape
    const ModelConfig c = ModelConfig::from_json(j, "config.json");
    auto load = [&](const std::string& tag, const std::function<void(std::map<std::string, RawTensor>&)>& edit) {
        const std::string dir = write_config(tag, j);
        auto t = zero_checkpoint(c);
        edit(t);
        write_safetensors(dir + "/model.safetensors", t);
        ModelHandle h;
        const q3n_model_options o = cpu_options(false);
        return q3n_model_load(dir.c_str(), &o, &h.m);
    };
    EXPECT_EQ(load("moe_ckpt_ok", [](auto&) {}), Q3N_OK) << q3n_last_error();

    EXPECT_EQ(load("moe_ckpt_missing", [](auto& t) { t.erase("model.layers.2.mlp.experts.7.down_proj.weight"); }),
              Q3N_ERR_BAD_CHECKPOINT);
    EXPECT_NE(std::string(q3n_last_error()).find("model.layers.2.mlp.experts.7.down_proj.weight"), std::string::npos)
        << q3n_last_error();

    // A transposed expert (down stored [I_e, H]) is caught by its shape, not silently misread.
    EXPECT_EQ(load("moe_ckpt_transposed",
                   [](auto& t) {
                       auto& d = t["model.layers.0.mlp.experts.3.down_proj.weight"];
                       std::swap(d.shape[0], d.shape[1]);
                   }),
              Q3N_ERR_BAD_CHECKPOINT);
    EXPECT_NE(std::string(q3n_last_error()).find("experts.3.down_proj.weight"), std::string::npos) << q3n_last_error();
    EXPECT_NE(std::string(q3n_last_error()).find("shape"), std::string::npos) << q3n_last_error();
}

// ---- transformers fixtures ---------------------------------------------------------------------------

// Q3N_MOE_FIXTURES points at freshly generated fixtures before they are put in place.
std::string moe_fixture_root() { return fixture_root("Q3N_MOE_FIXTURES", "qwen3_moe"); }

#define SKIP_WITHOUT_MOE_FIXTURES()                                                                         \
    if (!fs::exists(moe_fixture_root()))                                                                    \
    GTEST_SKIP() << moe_fixture_root() << " does not exist yet: generate it with "                          \
                 << "python3 tests/fixtures/make_moe_fixtures.py (PyTorch + transformers 5.17)"

void load_fixture(const std::string& name, ModelHandle& h) { load_model(moe_fixture_root() + "/" + name, cpu_options(false), h); }

struct MoeFixtureCase {
    std::string name;
    bool fp8;
};

class MoeFixture : public ::testing::TestWithParam<MoeFixtureCase> {};

TEST_P(MoeFixture, LogitsAndGreedyMatchTransformers) {
    SKIP_WITHOUT_MOE_FIXTURES();
    const MoeFixtureCase& fc = GetParam();
    const auto j = read_json(moe_fixture_root() + "/" + fc.name + "/reference.json");
    ModelHandle h;
    load_fixture(fc.name, h);
    q3n_model_info info{};
    info.struct_size = sizeof(info);
    ASSERT_EQ(q3n_model_get_info(h.m, &info), Q3N_OK);
    EXPECT_STREQ(info.architecture, "Qwen3MoeForCausalLM");
    EXPECT_EQ(info.weight_dtype, fc.fp8 ? Q3N_DTYPE_FP8_E4M3 : Q3N_DTYPE_BF16);

    const Reference plain = parse_reference(j);
    ASSERT_FALSE(plain.prompts.empty());
    if (!fc.fp8) {
        const double worst = check_logits(h.m, plain, info.vocab_size, 1e-4, fc.name);
        check_greedy(h.m, plain, worst, fc.name);
    } else {
        // "plain" (unquantised activations, what the checkpoint means) is reported, not bounded:
        // activation rounding can move a token to another expert, so its distance says little.
        for (size_t p = 0; p < plain.prompts.size(); ++p)
            std::printf("[ %s ] prompt %zu: relative L2 to the unquantised reference %.4f\n", fc.name.c_str(), p,
                        relative_l2(prefill(h.m, plain.prompts[p], info.vocab_size), plain.last_logits[p]));
        nlohmann::json em = j.at("emulated");
        em["prompts"] = j.at("prompts");
        const Reference emulated = parse_reference(em);
        check_logits_fp8(h.m, emulated, info.vocab_size, fc.name + "_emulated");
        check_greedy_teacher_forced(h.m, emulated, info.vocab_size, fc.name + "_emulated");
    }
}

TEST_P(MoeFixture, DecodeEqualsPrefill) {
    SKIP_WITHOUT_MOE_FIXTURES();
    const MoeFixtureCase& fc = GetParam();
    const Reference ref = parse_reference(read_json(moe_fixture_root() + "/" + fc.name + "/reference.json"));
    ModelHandle h;
    load_fixture(fc.name, h);
    q3n_model_info info{};
    info.struct_size = sizeof(info);
    ASSERT_EQ(q3n_model_get_info(h.m, &info), Q3N_OK);
    std::vector<int32_t> all = ref.prompts.back();
    all.insert(all.end(), ref.greedy.tokens.begin(), ref.greedy.tokens.end());
    const auto full = prefill(h.m, all, info.vocab_size);
    SequenceHandle s;
    ASSERT_EQ(q3n_sequence_create(h.m, &s.s), Q3N_OK);
    ASSERT_EQ(q3n_sequence_append(s.s, ref.prompts.back().data(), ref.prompts.back().size()), Q3N_OK);
    ASSERT_EQ(q3n_model_step(h.m, &s.s, 1, 0), Q3N_OK);
    for (int32_t t : ref.greedy.tokens) {
        ASSERT_EQ(q3n_sequence_append(s.s, &t, 1), Q3N_OK);
        ASSERT_EQ(q3n_model_step(h.m, &s.s, 1, 0), Q3N_OK) << q3n_last_error();
    }
    EXPECT_LT(relative_l2(logits_of(s.s, info.vocab_size), full), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Transformers, MoeFixture,
                         ::testing::Values(MoeFixtureCase{"bf16_e8k2", false}, MoeFixtureCase{"bf16_mlp_only", false},
                                           MoeFixtureCase{"fp8_f32_scales", true}),
                         [](const auto& info) { return info.param.name; });

}  // namespace
