// Qwen3-Next on the CPU: config parsing, the runner's per-sequence recurrent state (decode vs
// prefill, packed batches, truncation, release), the FP8 dtype split of dummy weights, MTP tensors
// in checkpoints, and the transformers fixtures of tests/fixtures/make_next_fixtures.py.
//
// Tolerances. Decode token by token and one prefill run the same recurrent kernels in the same
// order; only attention's summation and the MoE row grouping differ, so 1e-5 relative L2 (as
// test_moe.cpp). Fixture bounds are test_fixtures.cpp's: BF16 within 1e-4 of transformers in fp32,
// FP8 within 2e-3 (most prompts; 0.1 for rounding flips, see fixture_checks.h) of the reference that quantises activations like the engine.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>

#include "core/error.h"
#include "core/numeric.h"
#include "core/thread_pool.h"
#include "fixture_checks.h"
#include "fixture_util.h"
#include "next_test_config.h"
#include "io/checkpoint.h"
#include "kv/kv_cache.h"
#include "model/config.h"
#include "model/qwen3_next.h"
#include "model/weight_loader.h"

using namespace q3n;
using namespace q3n_test;
namespace fs = std::filesystem;

namespace {

ThreadPool& pool() {
    static ThreadPool p(3);
    return p;
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

using K = NextLayerKind;

// ---- Config -------------------------------------------------------------------------------------------

TEST(NextConfig, ReadsTheFieldsAndTheIntervalSchedule) {
    const ModelConfig c = ModelConfig::from_json(next_config(), "config.json");
    EXPECT_TRUE(c.is_qwen3_next());
    EXPECT_EQ(c.next_layer_kinds, (std::vector<K>{K::LinearAttention, K::FullAttention, K::LinearAttention, K::FullAttention}));
    EXPECT_EQ(c.linear_num_key_heads, 2u);
    EXPECT_EQ(c.linear_num_value_heads, 4u);
    EXPECT_EQ(c.linear_key_head_dim, 32u);
    EXPECT_EQ(c.linear_value_head_dim, 32u);
    EXPECT_EQ(c.linear_conv_kernel_dim, 4u);
    EXPECT_EQ(c.shared_expert_intermediate_size, 96u);
    EXPECT_EQ(c.num_experts, 8u);
    EXPECT_EQ(c.num_nextn_predict_layers, 1u);  // absent: vLLM's default
    EXPECT_DOUBLE_EQ(c.rope.partial_rotary_factor, 0.25);
    EXPECT_EQ(c.gdn_dims().conv_dim(), 2u * 64 + 128);
    EXPECT_EQ(qwen3_next_kv_layers(c), 2u);

    // The default interval is 4 (transformers): layers 3 and 7 of 8 are full attention.
    auto j = next_config();
    j.erase("full_attention_interval");
    j["num_hidden_layers"] = 8;
    const ModelConfig d = ModelConfig::from_json(j, "config.json");
    for (size_t l = 0; l < 8; ++l)
        EXPECT_EQ(d.next_layer_kinds[l], (l + 1) % 4 == 0 ? K::FullAttention : K::LinearAttention) << l;
}

TEST(NextConfig, LayerTypesWinAndNewSpellingIsRead) {
    auto j = next_config();
    j["layer_types"] = {"full_attention", "linear_attention", "linear_attention", "full_attention"};
    j["num_nextn_predict_layers"] = 0;
    // transformers 5 spelling: rope settings inside rope_parameters, dtype instead of torch_dtype.
    j.erase("rope_theta");
    j.erase("rope_scaling");
    j.erase("partial_rotary_factor");
    j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 5000000.0}, {"partial_rotary_factor", 0.5}};
    const ModelConfig c = ModelConfig::from_json(j, "config.json");
    EXPECT_EQ(c.next_layer_kinds, (std::vector<K>{K::FullAttention, K::LinearAttention, K::LinearAttention, K::FullAttention}));
    EXPECT_EQ(c.num_nextn_predict_layers, 0u);
    EXPECT_DOUBLE_EQ(c.rope.theta, 5000000.0);
    EXPECT_DOUBLE_EQ(c.rope.partial_rotary_factor, 0.5);

    // No partial_rotary_factor anywhere: Qwen3NextConfig's default, 0.25.
    j["rope_parameters"].erase("partial_rotary_factor");
    EXPECT_DOUBLE_EQ(ModelConfig::from_json(j, "config.json").rope.partial_rotary_factor, 0.25);
}

TEST(NextConfig, OtherArchitecturesAreUnchanged) {
    const ModelConfig dense = ModelConfig::load(fixture_dir("bf16_tied"));
    EXPECT_FALSE(dense.is_qwen3_next());
    EXPECT_EQ(dense.linear_num_key_heads, 0u);
    // A Qwen3-MoE config with stray GDN fields reads them not at all, and partial rotary stays 1.
    auto j = next_config();
    j["architectures"] = {"Qwen3MoeForCausalLM"};
    j["model_type"] = "qwen3_moe";
    j.erase("partial_rotary_factor");
    const ModelConfig moe = ModelConfig::from_json(j, "config.json");
    EXPECT_FALSE(moe.is_qwen3_next());
    EXPECT_EQ(moe.shared_expert_intermediate_size, 0u);
    EXPECT_DOUBLE_EQ(moe.rope.partial_rotary_factor, 1.0);
}

TEST(NextConfig, BadFieldsAreNamed) {
    struct Case {
        const char* tag;
        std::function<void(nlohmann::json&)> edit;
        const char* mention;
    };
    const std::vector<Case> cases = {
        {"no_nk", [](auto& c) { c.erase("linear_num_key_heads"); }, "linear_num_key_heads"},
        {"no_nv", [](auto& c) { c.erase("linear_num_value_heads"); }, "linear_num_value_heads"},
        {"no_dk", [](auto& c) { c.erase("linear_key_head_dim"); }, "linear_key_head_dim"},
        {"zero_dv", [](auto& c) { c["linear_value_head_dim"] = 0; }, "linear_value_head_dim"},
        {"nv_not_multiple", [](auto& c) { c["linear_num_value_heads"] = 3; }, "linear_num_value_heads"},
        {"conv_one", [](auto& c) { c["linear_conv_kernel_dim"] = 1; }, "linear_conv_kernel_dim"},
        {"conv_string", [](auto& c) { c["linear_conv_kernel_dim"] = "4"; }, "linear_conv_kernel_dim"},
        {"no_shared", [](auto& c) { c.erase("shared_expert_intermediate_size"); }, "shared_expert_intermediate_size"},
        {"no_experts", [](auto& c) { c.erase("num_experts"); }, "num_experts"},
        {"interval_zero", [](auto& c) { c["full_attention_interval"] = 0; }, "full_attention_interval"},
        {"types_short", [](auto& c) { c["layer_types"] = {"linear_attention", "full_attention"}; }, "layer_types"},
        {"types_bad_entry",
         [](auto& c) { c["layer_types"] = {"linear_attention", "full_attention", "sliding_attention", "full_attention"}; },
         "layer_types"},
        {"types_not_list", [](auto& c) { c["layer_types"] = "full_attention"; }, "layer_types"},
        {"mtp_negative", [](auto& c) { c["num_nextn_predict_layers"] = -1; }, "num_nextn_predict_layers"},
        {"rotary_odd", [](auto& c) { c["partial_rotary_factor"] = 0.03125; }, "partial_rotary_factor"},
        {"rotary_zero", [](auto& c) { c["partial_rotary_factor"] = 0.0; }, "partial_rotary_factor"},
    };
    for (const auto& cs : cases) {
        auto j = next_config();
        cs.edit(j);
        std::string message;
        EXPECT_EQ(parse(j, &message), Q3N_ERR_BAD_CONFIG) << cs.tag;
        EXPECT_NE(message.find(cs.mention), std::string::npos) << cs.tag << ": " << message;
    }
}

// ---- Dummy weights and the FP8 split ------------------------------------------------------------------

TEST(NextModel, DummyWeightsFollowTheFp8Split) {
    const ModelConfig c = ModelConfig::from_json(fp8_next_config(), "config.json");
    std::vector<std::unique_ptr<uint8_t[]>> owned;
    auto src = dummy_source(c, 3, pool(), owned);
    const Qwen3NextWeights w = load_qwen3_next_weights(c, *src, nullptr);
    ASSERT_EQ(w.layers.size(), 4u);
    for (size_t l = 0; l < 4; ++l) {
        const NextLayerWeights& L = w.layers[l];
        ASSERT_EQ(L.kind, l % 2 ? K::FullAttention : K::LinearAttention);
        if (L.kind == K::FullAttention) {
            EXPECT_EQ(L.attn.q.out, 4u * 32 * 2);  // query and gate
            for (const Linear* x : {&L.attn.q, &L.attn.k, &L.attn.v, &L.attn.o}) EXPECT_EQ(x->type, WeightType::FP8_E4M3);
        } else {
            EXPECT_EQ(L.gdn.qkvz.type, WeightType::FP8_E4M3);
            EXPECT_EQ(L.gdn.out.type, WeightType::FP8_E4M3);
            EXPECT_EQ(L.gdn.ba.type, WeightType::BF16);  // spec 5.6
            EXPECT_EQ(L.gdn.qkvz.out, 384u);
            EXPECT_EQ(L.gdn.ba.out, 8u);
            EXPECT_EQ(L.gdn.conv.size(), 256u * 4);
            EXPECT_EQ(L.gdn.A_log.size(), 4u);
        }
        EXPECT_EQ(L.mlp.router.type, WeightType::BF16);
        EXPECT_EQ(L.mlp.shared_gate.type, WeightType::BF16);
        EXPECT_EQ(L.mlp.shared_gate.out, 1u);
        EXPECT_EQ(L.mlp.shared.gate.type, WeightType::FP8_E4M3);
        EXPECT_EQ(L.mlp.shared.down.in, 96u);
        ASSERT_EQ(L.mlp.experts.size(), 8u);
        EXPECT_EQ(L.mlp.experts[5].up.type, WeightType::FP8_E4M3);
    }
    EXPECT_EQ(w.lm_head.type, WeightType::BF16);
    EXPECT_EQ(w.mtp.tensors, 0u);  // the dummy format has no MTP
}

// Longer contexts and several long sequences at once.
q3n_model_options cpu_options(bool dummy, uint64_t seed = 1) { return q3n_test::cpu_options(dummy, seed, 256, 2048); }

TEST(NextModel, DummyLoadsAndStepsDeterministically) {
    for (bool fp8 : {false, true}) {
        const std::string dir = write_config(fp8 ? "next_dummy_fp8" : "next_dummy_bf16", fp8 ? fp8_next_config() : next_config());
        auto run = [&](uint64_t seed) {
            ModelHandle h;
            const q3n_model_options o = cpu_options(true, seed);
            EXPECT_EQ(q3n_model_load(dir.c_str(), &o, &h.m), Q3N_OK) << q3n_last_error();
            if (!h.m) return std::vector<float>();
            q3n_model_info info{};
            info.struct_size = sizeof(info);
            EXPECT_EQ(q3n_model_get_info(h.m, &info), Q3N_OK);
            EXPECT_STREQ(info.architecture, "Qwen3NextForCausalLM");
            EXPECT_EQ(info.weight_dtype, fp8 ? Q3N_DTYPE_FP8_E4M3 : Q3N_DTYPE_BF16);
            return prefill(h.m, {5, 6, 7, 200, 9, 3, 255}, 256);
        };
        const auto a = run(1), b = run(1), c = run(2);
        ASSERT_EQ(a.size(), 256u);
        EXPECT_EQ(a, b) << "fp8=" << fp8;
        EXPECT_NE(a, c) << "fp8=" << fp8;
        EXPECT_TRUE(std::all_of(a.begin(), a.end(), [](float x) { return std::isfinite(x); })) << "fp8=" << fp8;
    }
}

// Decode reads the conv and delta-rule states the earlier steps left (and the KV of the attention
// layers): token by token must equal one prefill. The prompt crosses 64 tokens (the chunk size of
// the GPU prefill kernels) and a KV block boundary.
TEST(NextModel, DecodeEqualsPrefillAndBatchEqualsSingle) {
    for (bool fp8 : {false, true}) {
        const std::string dir = write_config(fp8 ? "next_decode_fp8" : "next_decode_bf16", fp8 ? fp8_next_config() : next_config());
        ModelHandle h;
        const q3n_model_options o = cpu_options(true, 5);
        ASSERT_EQ(q3n_model_load(dir.c_str(), &o, &h.m), Q3N_OK) << q3n_last_error();
        const std::vector<int32_t> tokens = some_tokens(70, 3);
        const auto full = prefill(h.m, tokens, 256);
        // BF16: the same fp32 math in another order, 1e-5. FP8: decode (one row) and prefill (many)
        // take different CPU dot-product kernels, so an activation within an ulp of an e4m3 rounding
        // midpoint can round to the other neighbour; on the GPU machine's CPU one such flip moved
        // these tiny random logits by 4%. A lost or stale state moves them by ~100%: 0.1.
        const double tol = fp8 ? 0.1 : 1e-5;

        SequenceHandle s;
        ASSERT_EQ(q3n_sequence_create(h.m, &s.s), Q3N_OK);
        // Prefill 40, then one token at a time.
        ASSERT_EQ(q3n_sequence_append(s.s, tokens.data(), 40), Q3N_OK);
        ASSERT_EQ(q3n_model_step(h.m, &s.s, 1, 0), Q3N_OK) << q3n_last_error();
        for (size_t i = 40; i < tokens.size(); ++i) {
            ASSERT_EQ(q3n_sequence_append(s.s, &tokens[i], 1), Q3N_OK);
            ASSERT_EQ(q3n_model_step(h.m, &s.s, 1, 0), Q3N_OK) << q3n_last_error();
        }
        EXPECT_LT(relative_l2(logits_of(s.s, 256), full), tol) << "fp8=" << fp8;

        // Sequences of different lengths in one step equal each alone; then a mixed step where one
        // decodes and another prefills more.
        const std::vector<std::vector<int32_t>> prompts = {some_tokens(5, 1), {77}, some_tokens(19, 2), some_tokens(66, 4)};
        std::vector<SequenceHandle> seqs(prompts.size());
        std::vector<q3n_sequence*> batch;
        for (size_t i = 0; i < prompts.size(); ++i) {
            ASSERT_EQ(q3n_sequence_create(h.m, &seqs[i].s), Q3N_OK);
            ASSERT_EQ(q3n_sequence_append(seqs[i].s, prompts[i].data(), prompts[i].size()), Q3N_OK);
            batch.push_back(seqs[i].s);
        }
        ASSERT_EQ(q3n_model_step(h.m, batch.data(), batch.size(), 0), Q3N_OK) << q3n_last_error();
        for (size_t i = 0; i < prompts.size(); ++i)
            EXPECT_LT(relative_l2(logits_of(seqs[i].s, 256), prefill(h.m, prompts[i], 256)), tol)
                << "fp8=" << fp8 << " sequence " << i;
        const std::vector<std::vector<int32_t>> more = {{9}, {10, 11, 12}, {13}, some_tokens(7, 9)};
        for (size_t i = 0; i < prompts.size(); ++i)
            ASSERT_EQ(q3n_sequence_append(seqs[i].s, more[i].data(), more[i].size()), Q3N_OK);
        ASSERT_EQ(q3n_model_step(h.m, batch.data(), batch.size(), 0), Q3N_OK) << q3n_last_error();
        for (size_t i = 0; i < prompts.size(); ++i) {
            std::vector<int32_t> all = prompts[i];
            all.insert(all.end(), more[i].begin(), more[i].end());
            EXPECT_LT(relative_l2(logits_of(seqs[i].s, 256), prefill(h.m, all, 256)), tol)
                << "fp8=" << fp8 << " sequence " << i << " second step";
        }
    }
}

// The recurrent state cannot be rewound: after a truncation the engine re-prefills from 0 and the
// runner must start from the zero state, not from the one that had seen the dropped tokens.
TEST(NextModel, TruncationRebuildsTheState) {
    const std::string dir = write_config("next_truncate", next_config());
    ModelHandle h;
    const q3n_model_options o = cpu_options(true, 7);
    ASSERT_EQ(q3n_model_load(dir.c_str(), &o, &h.m), Q3N_OK) << q3n_last_error();
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
    const auto fresh = prefill(h.m, expect, 256);
    EXPECT_LT(relative_l2(logits_of(s.s, 256), fresh), 1e-5);

    // Truncating to nothing and starting over behaves like a new sequence too.
    ASSERT_EQ(q3n_sequence_truncate(s.s, 0), Q3N_OK);
    ASSERT_EQ(q3n_sequence_append(s.s, tail.data(), tail.size()), Q3N_OK);
    ASSERT_EQ(q3n_model_step(h.m, &s.s, 1, 0), Q3N_OK);
    EXPECT_LT(relative_l2(logits_of(s.s, 256), prefill(h.m, tail, 256)), 1e-5);
}

// ---- The runner directly: state lifetime -----------------------------------------------------------

// Drives a runner like the engine does: block tables from the cache, spans per sequence.
struct Driver {
    ModelConfig c;
    std::vector<std::unique_ptr<uint8_t[]>> owned;
    std::unique_ptr<KvCache> kv;
    std::unique_ptr<Qwen3NextRunner> runner;
    std::map<uint64_t, std::vector<int32_t>> tables;
    std::map<uint64_t, size_t> lengths;

    explicit Driver(const nlohmann::json& j) : c(ModelConfig::from_json(j, "config.json")) {
        KvCacheShape shape;
        shape.num_layers = c.num_layers;
        shape.kv_heads = c.num_kv_heads;
        shape.head_dim = c.head_dim;
        shape.block_size = 16;
        shape.num_blocks = 64;
        kv = std::make_unique<KvCache>(shape);
        auto src = dummy_source(c, 11, pool(), owned);
        runner = make_qwen3_next_cpu(c, load_qwen3_next_weights(c, *src, nullptr), *kv, pool());
    }

    // One step of the given sequences, each with its new tokens; returns the last row's logits.
    std::vector<std::vector<float>> step(const std::vector<std::pair<uint64_t, std::vector<int32_t>>>& work) {
        StepBatch b;
        std::vector<size_t> rows;
        for (const auto& [id, toks] : work) {
            size_t& len = lengths[id];
            auto& table = tables[id];
            const size_t need = (len + toks.size() + 15) / 16;
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

TEST(NextRunner, FreeingDropsTheStateAndNothingGrows) {
    Driver d(next_config());
    EXPECT_TRUE(d.runner->has_recurrent_state());
    // 2 GDN layers x (conv 256 x 3 + delta rule 4 x 32 x 32) fp32.
    EXPECT_EQ(d.runner->state_bytes_per_sequence(), 2u * (256 * 3 + 4 * 32 * 32) * 4);
    const auto reference = d.step({{1, some_tokens(9, 1)}})[0];
    d.step({{1, {4}}});
    d.free(1);
    EXPECT_EQ(d.runner->live_sequences(), 0u);
    const size_t free_blocks = d.kv->free_blocks();
    uint64_t id = 100;
    for (int cycle = 0; cycle < 200; ++cycle) {
        const uint64_t a = id++, b = id++;
        auto first = d.step({{a, some_tokens(9, 1)}, {b, some_tokens(3 + cycle % 5, cycle)}});
        if (cycle % 50 == 0) EXPECT_LT(relative_l2(first[0], reference), 1e-5) << cycle;
        d.step({{a, {4}}, {b, {5}}});
        EXPECT_EQ(d.runner->live_sequences(), 2u);
        d.free(a);
        d.free(b);
        EXPECT_EQ(d.runner->live_sequences(), 0u);
    }
    EXPECT_EQ(d.kv->free_blocks(), free_blocks);
}

TEST(NextRunner, ContinuingWithoutStateIsAnError) {
    Driver d(next_config());
    d.step({{1, some_tokens(4, 1)}});
    d.runner->release_sequence(1);
    // The span does not start at 0, but the state is gone: the runner must refuse, not guess zeros.
    try {
        d.step({{1, {7}}});
        ADD_FAILURE() << "stepping a released sequence at a later position was accepted";
    } catch (const Error& e) {
        EXPECT_EQ(e.status(), Q3N_ERR_INTERNAL);
    }
    EXPECT_EQ(d.runner->live_sequences(), 0u);
}

// ---- The runner against the spec written out naively, in double -------------------------------------

using Vec = std::vector<double>;

double wt(const Linear& l, size_t n, size_t c) {
    return bf16_to_float(static_cast<const uint16_t*>(l.data)[n * l.in + c]);
}
Vec matvec(const Linear& l, const Vec& x) {
    Vec y(l.out, 0.0);
    for (size_t n = 0; n < l.out; ++n)
        for (size_t c = 0; c < l.in; ++c) y[n] += wt(l, n, c) * x[c];
    return y;
}
Vec rms1p(const Vec& x, const std::vector<float>& w, size_t off = 0, size_t n = 0) {
    if (!n) n = x.size();
    double ss = 0;
    for (size_t i = 0; i < n; ++i) ss += x[off + i] * x[off + i];
    const double r = 1.0 / std::sqrt(ss / n + 1e-6);
    Vec y(n);
    for (size_t i = 0; i < n; ++i) y[i] = x[off + i] * r * (1.0 + w[i]);
    return y;
}
double silu(double v) { return v / (1 + std::exp(-v)); }
double sigm(double v) { return 1 / (1 + std::exp(-v)); }

// Spec 3.1-3.6 for one sequence, from the weights alone: no runner code, no kernels.
Vec naive_next_logits(const ModelConfig& c, const Qwen3NextWeights& w, const std::vector<int32_t>& toks) {
    const size_t T = toks.size(), H = c.hidden_size, d = c.head_dim, nH = c.num_heads, nKV = c.num_kv_heads;
    const GdnDims g = c.gdn_dims();
    const size_t r = g.ratio(), Kc = c.linear_conv_kernel_dim, rot = static_cast<size_t>(d * c.rope.partial_rotary_factor);
    std::vector<Vec> x(T, Vec(H));
    for (size_t t = 0; t < T; ++t)
        for (size_t i = 0; i < H; ++i) x[t][i] = wt(w.embed, toks[t], i);
    for (size_t l = 0; l < c.num_layers; ++l) {
        const NextLayerWeights& L = w.layers[l];
        std::vector<Vec> h(T);
        for (size_t t = 0; t < T; ++t) h[t] = rms1p(x[t], L.input_norm);
        std::vector<Vec> mix(T);
        if (L.kind == K::FullAttention) {
            std::vector<Vec> q(T), gate(T), k(T), v(T);
            for (size_t t = 0; t < T; ++t) {
                const Vec qg = matvec(L.attn.q, h[t]);
                q[t].resize(nH * d);
                gate[t].resize(nH * d);
                for (size_t hh = 0; hh < nH; ++hh)
                    for (size_t i = 0; i < d; ++i) {
                        q[t][hh * d + i] = qg[hh * 2 * d + i];
                        gate[t][hh * d + i] = qg[hh * 2 * d + d + i];
                    }
                k[t] = matvec(L.attn.k, h[t]);
                v[t] = matvec(L.attn.v, h[t]);
                auto norm_rope = [&](Vec& a, size_t heads, const std::vector<float>& nw) {
                    for (size_t hh = 0; hh < heads; ++hh) {
                        Vec n = rms1p(a, nw, hh * d, d);
                        Vec out = n;
                        for (size_t i = 0; i < rot / 2; ++i) {
                            const double f = std::pow(c.rope.theta, -2.0 * i / rot) * t;
                            out[i] = n[i] * std::cos(f) - n[i + rot / 2] * std::sin(f);
                            out[i + rot / 2] = n[i + rot / 2] * std::cos(f) + n[i] * std::sin(f);
                        }
                        std::copy(out.begin(), out.end(), a.begin() + hh * d);
                    }
                };
                norm_rope(q[t], nH, L.attn.q_norm);
                norm_rope(k[t], nKV, L.attn.k_norm);
            }
            for (size_t t = 0; t < T; ++t) {
                Vec o(nH * d, 0.0);
                for (size_t hh = 0; hh < nH; ++hh) {
                    const size_t kh = hh / (nH / nKV);
                    Vec s(t + 1);
                    double m = -1e300, z = 0;
                    for (size_t u = 0; u <= t; ++u) {
                        s[u] = 0;
                        for (size_t i = 0; i < d; ++i) s[u] += q[t][hh * d + i] * k[u][kh * d + i];
                        s[u] /= std::sqrt(double(d));
                        m = std::max(m, s[u]);
                    }
                    for (auto& e : s) z += e = std::exp(e - m);
                    for (size_t u = 0; u <= t; ++u)
                        for (size_t i = 0; i < d; ++i) o[hh * d + i] += s[u] / z * v[u][kh * d + i];
                }
                for (size_t i = 0; i < nH * d; ++i) o[i] *= sigm(gate[t][i]);
                mix[t] = matvec(L.attn.o, o);
            }
        } else {
            const NextGdnWeights& G = L.gdn;
            const size_t C = g.conv_dim(), kd = g.key_dim();
            std::vector<Vec> m(T, Vec(C)), z(T, Vec(g.value_dim())), b(T, Vec(g.nv)), a(T, Vec(g.nv));
            for (size_t t = 0; t < T; ++t) {
                const Vec P = matvec(G.qkvz, h[t]), B = matvec(G.ba, h[t]);
                const size_t gw = 2 * g.dk + 2 * r * g.dv;
                for (size_t grp = 0; grp < g.nk; ++grp) {
                    for (size_t i = 0; i < g.dk; ++i) {
                        m[t][grp * g.dk + i] = P[grp * gw + i];
                        m[t][kd + grp * g.dk + i] = P[grp * gw + g.dk + i];
                    }
                    for (size_t i = 0; i < r * g.dv; ++i) {
                        m[t][2 * kd + grp * r * g.dv + i] = P[grp * gw + 2 * g.dk + i];
                        z[t][grp * r * g.dv + i] = P[grp * gw + 2 * g.dk + r * g.dv + i];
                    }
                    for (size_t j = 0; j < r; ++j) {
                        b[t][grp * r + j] = B[grp * 2 * r + j];
                        a[t][grp * r + j] = B[grp * 2 * r + r + j];
                    }
                }
            }
            std::vector<Vec> mc(T, Vec(C));
            for (size_t t = 0; t < T; ++t)
                for (size_t ch = 0; ch < C; ++ch) {
                    double acc = 0;
                    for (size_t j = 0; j < Kc; ++j) {
                        const long src = long(t) - long(Kc - 1) + long(j);
                        if (src >= 0) acc += G.conv[ch * Kc + j] * m[src][ch];
                    }
                    mc[t][ch] = silu(acc);
                }
            std::vector<Vec> S(g.nv, Vec(g.dk * g.dv, 0.0));
            for (size_t t = 0; t < T; ++t) {
                Vec y(g.value_dim());
                for (size_t hv = 0; hv < g.nv; ++hv) {
                    const size_t hk = hv / r;
                    Vec q(g.dk), k(g.dk);
                    double nq = 0, nk = 0;
                    for (size_t i = 0; i < g.dk; ++i) {
                        q[i] = mc[t][hk * g.dk + i];
                        k[i] = mc[t][kd + hk * g.dk + i];
                        nq += q[i] * q[i];
                        nk += k[i] * k[i];
                    }
                    for (size_t i = 0; i < g.dk; ++i) {
                        q[i] /= std::sqrt(nq + 1e-6) * std::sqrt(double(g.dk));
                        k[i] /= std::sqrt(nk + 1e-6);
                    }
                    const double beta = sigm(b[t][hv]);
                    const double sp = a[t][hv] + G.dt_bias[hv];
                    const double decay = std::exp(-std::exp(double(G.A_log[hv])) * (sp > 20 ? sp : std::log1p(std::exp(sp))));
                    Vec& s = S[hv];
                    for (auto& e : s) e *= decay;
                    for (size_t j = 0; j < g.dv; ++j) {
                        double u = 0;
                        for (size_t i = 0; i < g.dk; ++i) u += s[i * g.dv + j] * k[i];
                        const double delta = beta * (mc[t][2 * kd + hv * g.dv + j] - u);
                        for (size_t i = 0; i < g.dk; ++i) s[i * g.dv + j] += k[i] * delta;
                    }
                    Vec o(g.dv, 0.0);
                    double ss = 0;
                    for (size_t j = 0; j < g.dv; ++j) {
                        for (size_t i = 0; i < g.dk; ++i) o[j] += s[i * g.dv + j] * q[i];
                        ss += o[j] * o[j];
                    }
                    const double rr = 1 / std::sqrt(ss / g.dv + 1e-6);
                    for (size_t j = 0; j < g.dv; ++j)
                        y[hv * g.dv + j] = G.norm[j] * o[j] * rr * silu(z[t][hv * g.dv + j]);
                }
                mix[t] = matvec(G.out, y);
            }
        }
        for (size_t t = 0; t < T; ++t) {
            for (size_t i = 0; i < H; ++i) x[t][i] += mix[t][i];
            const Vec hn = rms1p(x[t], L.post_attn_norm);
            const NextMlpWeights& M = L.mlp;
            auto swiglu = [&](const cpu::MoeExpert& e) {
                Vec gg = matvec(e.gate, hn), uu = matvec(e.up, hn);
                for (size_t i = 0; i < gg.size(); ++i) gg[i] = silu(gg[i]) * uu[i];
                return matvec(e.down, gg);
            };
            Vec p = matvec(M.router, hn);
            const double mx = *std::max_element(p.begin(), p.end());
            double zs = 0;
            for (auto& e : p) zs += e = std::exp(e - mx);
            std::vector<size_t> idx(p.size());
            for (size_t i = 0; i < idx.size(); ++i) idx[i] = i;
            std::stable_sort(idx.begin(), idx.end(), [&](size_t u, size_t v2) { return p[u] > p[v2]; });
            double sum = 0;
            for (size_t j = 0; j < c.num_experts_per_tok; ++j) sum += p[idx[j]];
            for (size_t j = 0; j < c.num_experts_per_tok; ++j) {
                const Vec e = swiglu(M.experts[idx[j]]);
                for (size_t i = 0; i < H; ++i) x[t][i] += p[idx[j]] / sum * e[i];
            }
            const Vec sh = swiglu(M.shared);
            const double sg = sigm(matvec(M.shared_gate, hn)[0]);
            for (size_t i = 0; i < H; ++i) x[t][i] += sg * sh[i];
        }
    }
    return matvec(w.lm_head, rms1p(x.back(), w.final_norm));
}

TEST(NextRunner, MatchesTheSpecWrittenOutInDouble) {
    Driver d(next_config());
    std::vector<std::unique_ptr<uint8_t[]>> owned;
    auto src = dummy_source(d.c, 11, pool(), owned);  // the Driver's seed: the same weights
    const Qwen3NextWeights w = load_qwen3_next_weights(d.c, *src, nullptr);
    const std::vector<int32_t> toks = some_tokens(13, 8);
    const auto got = d.step({{1, toks}})[0];
    const Vec want = naive_next_logits(d.c, w, toks);
    double num = 0, den = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        num += (got[i] - want[i]) * (got[i] - want[i]);
        den += want[i] * want[i];
    }
    EXPECT_LT(std::sqrt(num / den), 1e-5);
}

// ---- Checkpoints: every tensor by name, with and without MTP -------------------------------------------

std::map<std::string, RawTensor> zero_checkpoint(const ModelConfig& c, bool with_mtp) {
    std::map<std::string, RawTensor> t;
    auto put = [&](const std::string& name, std::vector<int64_t> shape, const char* dtype = "BF16") {
        int64_t n = 1;
        for (int64_t d : shape) n *= d;
        const size_t elem = std::string(dtype) == "F32" ? 4 : 2;
        t[name] = RawTensor{dtype, shape, std::vector<uint8_t>(elem * static_cast<size_t>(n), 0)};
    };
    const int64_t H = c.hidden_size, d = c.head_dim, q = c.num_heads * d, kv = c.num_kv_heads * d;
    const GdnDims g = c.gdn_dims();
    auto layer = [&](const std::string& p, bool full) {
        put(p + "input_layernorm.weight", {H});
        put(p + "post_attention_layernorm.weight", {H});
        if (full) {
            put(p + "self_attn.q_norm.weight", {d});
            put(p + "self_attn.k_norm.weight", {d});
            put(p + "self_attn.q_proj.weight", {2 * q, H});
            put(p + "self_attn.k_proj.weight", {kv, H});
            put(p + "self_attn.v_proj.weight", {kv, H});
            put(p + "self_attn.o_proj.weight", {H, q});
        } else {
            const std::string a = p + "linear_attn.";
            put(a + "in_proj_qkvz.weight", {static_cast<int64_t>(g.qkvz_width()), H});
            put(a + "in_proj_ba.weight", {static_cast<int64_t>(g.ba_width()), H});
            put(a + "conv1d.weight", {static_cast<int64_t>(g.conv_dim()), 1, c.linear_conv_kernel_dim});
            put(a + "A_log", {static_cast<int64_t>(g.nv)}, "F32");  // vLLM keeps it fp32
            put(a + "dt_bias", {static_cast<int64_t>(g.nv)});
            put(a + "norm.weight", {static_cast<int64_t>(g.dv)});
            put(a + "out_proj.weight", {H, static_cast<int64_t>(g.value_dim())});
        }
        const int64_t Ie = c.moe_intermediate_size, Is = c.shared_expert_intermediate_size;
        put(p + "mlp.gate.weight", {c.num_experts, H});
        for (size_t e = 0; e < c.num_experts; ++e) {
            const std::string x = p + "mlp.experts." + std::to_string(e) + ".";
            put(x + "gate_proj.weight", {Ie, H});
            put(x + "up_proj.weight", {Ie, H});
            put(x + "down_proj.weight", {H, Ie});
        }
        put(p + "mlp.shared_expert.gate_proj.weight", {Is, H});
        put(p + "mlp.shared_expert.up_proj.weight", {Is, H});
        put(p + "mlp.shared_expert.down_proj.weight", {H, Is});
        put(p + "mlp.shared_expert_gate.weight", {1, H});
    };
    put("model.embed_tokens.weight", {c.vocab_size, H});
    put("lm_head.weight", {c.vocab_size, H});
    put("model.norm.weight", {H});
    for (size_t l = 0; l < c.num_layers; ++l)
        layer("model.layers." + std::to_string(l) + ".", c.next_layer_kinds[l] == K::FullAttention);
    if (with_mtp) {
        put("mtp.pre_fc_norm_embedding.weight", {H});
        put("mtp.pre_fc_norm_hidden.weight", {H});
        put("mtp.fc.weight", {H, 2 * H});
        put("mtp.norm.weight", {H});
        layer("mtp.layers.0.", true);
    }
    return t;
}

TEST(NextCheckpoint, LoadsWithAndWithoutMtp) {
    const auto j = next_config();
    const ModelConfig c = ModelConfig::from_json(j, "config.json");
    for (bool mtp : {false, true}) {
        const std::string dir = write_config(mtp ? "next_ckpt_mtp" : "next_ckpt_plain", j);
        const auto tensors = zero_checkpoint(c, mtp);
        write_safetensors(dir + "/model.safetensors", tensors);
        {
            ModelHandle h;
            const q3n_model_options o = cpu_options(false);
            ASSERT_EQ(q3n_model_load(dir.c_str(), &o, &h.m), Q3N_OK) << q3n_last_error();
            // All-zero weights: every logit is 0, and the step runs through every kind of layer.
            const auto l = prefill(h.m, {1, 2, 3}, 256);
            ASSERT_EQ(l.size(), 256u);
            EXPECT_TRUE(std::all_of(l.begin(), l.end(), [](float x) { return x == 0.0f; }));
        }
        // The MTP tensors are kept, not skipped.
        auto ckpt = Checkpoint::open(dir);
        std::vector<std::unique_ptr<uint8_t[]>> owned;
        auto src = checkpoint_source(*ckpt, c, owned);
        const Qwen3NextWeights w = load_qwen3_next_weights(c, *src, nullptr);
        size_t mtp_tensors = 0;
        for (const auto& [name, t] : tensors) mtp_tensors += name.rfind("mtp.", 0) == 0;
        EXPECT_EQ(w.mtp.tensors, mtp_tensors) << "mtp=" << mtp;
        EXPECT_EQ(w.mtp.layers.size(), mtp ? 1u : 0u);
        if (mtp) {
            EXPECT_EQ(w.mtp.fc.in, 256u);
            EXPECT_EQ(w.mtp.layers[0].layer.mlp.experts.size(), 8u);
            EXPECT_EQ(w.mtp.layers[0].layer.attn.q.out, 256u);
        }
    }
}

TEST(NextCheckpoint, WrongShapesAreNamed) {
    const auto j = next_config();
    const ModelConfig c = ModelConfig::from_json(j, "config.json");
    auto load = [&](const std::string& tag, const std::function<void(std::map<std::string, RawTensor>&)>& edit) {
        const std::string dir = write_config(tag, j);
        auto t = zero_checkpoint(c, true);
        edit(t);
        write_safetensors(dir + "/model.safetensors", t);
        ModelHandle h;
        const q3n_model_options o = cpu_options(false);
        return q3n_model_load(dir.c_str(), &o, &h.m);
    };
    // conv1d stored without its middle axis.
    EXPECT_EQ(load("next_bad_conv", [](auto& t) { t["model.layers.0.linear_attn.conv1d.weight"].shape = {256, 4, 1}; }),
              Q3N_ERR_BAD_CHECKPOINT);
    EXPECT_NE(std::string(q3n_last_error()).find("conv1d.weight"), std::string::npos) << q3n_last_error();
    // q_proj without the gate half (a dense Qwen3 attention).
    EXPECT_EQ(load("next_bad_q", [](auto& t) { t["model.layers.1.self_attn.q_proj.weight"].shape[0] /= 2; }),
              Q3N_ERR_BAD_CHECKPOINT);
    EXPECT_NE(std::string(q3n_last_error()).find("q_proj"), std::string::npos) << q3n_last_error();
    EXPECT_EQ(load("next_missing_shared_gate", [](auto& t) { t.erase("model.layers.2.mlp.shared_expert_gate.weight"); }),
              Q3N_ERR_BAD_CHECKPOINT);
    // A present MTP tensor is shape-checked like the rest.
    EXPECT_EQ(load("next_bad_mtp_fc", [](auto& t) { t["mtp.fc.weight"].shape = {256, 128}; }), Q3N_ERR_BAD_CHECKPOINT);
    EXPECT_NE(std::string(q3n_last_error()).find("mtp.fc.weight"), std::string::npos) << q3n_last_error();
}

// ---- transformers fixtures -------------------------------------------------------------------------------

// Q3N_NEXT_FIXTURES points at freshly generated fixtures before they are put in place.
std::string next_fixture_root() { return fixture_root("Q3N_NEXT_FIXTURES", "qwen3_next"); }

#define SKIP_WITHOUT_NEXT_FIXTURES()                                                                        \
    if (!fs::exists(next_fixture_root()))                                                                   \
    GTEST_SKIP() << next_fixture_root() << " does not exist yet: generate it with "                         \
                 << "python3 tests/fixtures/make_next_fixtures.py (PyTorch + transformers 5.17)"

void load_fixture(const std::string& name, ModelHandle& h) { load_model(next_fixture_root() + "/" + name, cpu_options(false), h); }

struct NextFixtureCase {
    std::string name;
    bool fp8;
    bool mtp;
};

class NextFixture : public ::testing::TestWithParam<NextFixtureCase> {};

TEST_P(NextFixture, LogitsAndGreedyMatchTransformers) {
    SKIP_WITHOUT_NEXT_FIXTURES();
    const NextFixtureCase& fc = GetParam();
    const auto j = read_json(next_fixture_root() + "/" + fc.name + "/reference.json");
    ModelHandle h;
    load_fixture(fc.name, h);
    q3n_model_info info{};
    info.struct_size = sizeof(info);
    ASSERT_EQ(q3n_model_get_info(h.m, &info), Q3N_OK);
    EXPECT_STREQ(info.architecture, "Qwen3NextForCausalLM");
    EXPECT_EQ(info.weight_dtype, fc.fp8 ? Q3N_DTYPE_FP8_E4M3 : Q3N_DTYPE_BF16);

    const Reference plain = parse_reference(j);
    ASSERT_FALSE(plain.prompts.empty());
    ASSERT_GT(plain.prompts.back().size(), 64u) << "the longest prompt should cross a 64-token chunk";
    if (!fc.fp8) {
        const double worst = check_logits(h.m, plain, info.vocab_size, 1e-4, fc.name);
        check_greedy(h.m, plain, worst, fc.name);
    } else {
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

TEST_P(NextFixture, DecodeEqualsPrefillAndMtpIsKept) {
    SKIP_WITHOUT_NEXT_FIXTURES();
    const NextFixtureCase& fc = GetParam();
    const std::string dir = next_fixture_root() + "/" + fc.name;
    const Reference ref = parse_reference(read_json(dir + "/reference.json"));
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

    const ModelConfig c = ModelConfig::load(dir);
    auto ckpt = Checkpoint::open(dir);
    std::vector<std::unique_ptr<uint8_t[]>> owned;
    auto src = checkpoint_source(*ckpt, c, owned);
    const Qwen3NextWeights w = load_qwen3_next_weights(c, *src, nullptr);
    if (fc.mtp) {
        EXPECT_GT(w.mtp.tensors, 0u);
        EXPECT_EQ(w.mtp.layers.size(), 1u);
    } else {
        EXPECT_EQ(w.mtp.tensors, 0u);
    }
}

INSTANTIATE_TEST_SUITE_P(Transformers, NextFixture,
                         ::testing::Values(NextFixtureCase{"bf16_interval_mtp", false, true},
                                           NextFixtureCase{"bf16_layer_types", false, false},
                                           NextFixtureCase{"fp8_f32_scales", true, true}),
                         [](const auto& info) { return info.param.name; });

}  // namespace
