// The C ABI's behaviour: errors are typed and explained, bad checkpoints and configs are refused
// before anything is computed, batching gives the same numbers as single sequences, and a full
// cache or an over-long prompt changes nothing.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "core/numeric.h"
#include "fixture_util.h"

using namespace q3n_test;
namespace fs = std::filesystem;

namespace {

q3n_model_options cpu_options() {
    q3n_model_options o;
    q3n_model_options_init(&o, sizeof o);
    o.device = Q3N_DEVICE_CPU;
    o.context_length = 256;
    return o;
}

q3n_status try_load(const std::string& dir, q3n_model_options o, ModelHandle& h) {
    return q3n_model_load(dir.c_str(), &o, &h.m);
}

std::string last_error() { return q3n_last_error(); }

// A copy of a fixture directory whose config.json has been edited by `edit`.
std::string fixture_with_config(const std::string& fixture, const std::string& tag,
                                const std::function<void(nlohmann::json&)>& edit) {
    const std::string dir = temp_dir(tag);
    for (const auto& e : fs::directory_iterator(fixture_dir(fixture))) fs::copy(e.path(), dir + "/" + e.path().filename().string());
    auto cfg = read_json(dir + "/config.json");
    edit(cfg);
    write_text(dir + "/config.json", cfg.dump());
    return dir;
}

// A copy of a single-file fixture whose tensors have been edited by `edit`.
std::string fixture_with_tensors(const std::string& fixture, const std::string& tag,
                                 const std::function<void(std::map<std::string, RawTensor>&)>& edit) {
    const std::string dir = temp_dir(tag);
    fs::copy(fixture_dir(fixture) + "/config.json", dir + "/config.json");
    auto tensors = read_safetensors(fixture_dir(fixture) + "/model.safetensors");
    edit(tensors);
    write_safetensors(dir + "/model.safetensors", tensors);
    return dir;
}

std::vector<float> logits_of(q3n_sequence* s) {
    std::vector<float> l(1 << 16);
    size_t n = 0;
    EXPECT_EQ(q3n_sequence_get_logits(s, l.data(), l.size(), &n), Q3N_OK) << q3n_last_error();
    l.resize(n);
    return l;
}

TEST(Abi, VersionAndNames) {
    EXPECT_EQ(q3n_abi_version(), static_cast<uint32_t>(Q3N_ABI_VERSION));
    EXPECT_STREQ(q3n_status_name(Q3N_ERR_BAD_CONFIG), "Q3N_ERR_BAD_CONFIG");
    EXPECT_NE(std::string(q3n_version_string()).find("cpu"), std::string::npos);
}

TEST(Abi, NullArgumentsAreInvalidNotCrashes) {
    q3n_model* m = reinterpret_cast<q3n_model*>(0x1);
    EXPECT_EQ(q3n_model_load(nullptr, nullptr, &m), Q3N_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(m, nullptr);
    EXPECT_NE(last_error().find("path"), std::string::npos);
    EXPECT_EQ(q3n_sequence_create(nullptr, nullptr), Q3N_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(q3n_sequence_append(nullptr, nullptr, 0), Q3N_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(q3n_model_step(nullptr, nullptr, 0, 0), Q3N_ERR_INVALID_ARGUMENT);
    q3n_model_free(nullptr);
    q3n_sequence_free(nullptr);
}

TEST(Abi, OptionsStructSizeIsChecked) {
    q3n_model_options o = cpu_options();
    o.struct_size = 2;
    ModelHandle h;
    EXPECT_EQ(try_load(fixture_dir("bf16_tied"), o, h), Q3N_ERR_INVALID_ARGUMENT);
    EXPECT_NE(last_error().find("struct_size"), std::string::npos);
}

TEST(Abi, OlderSmallerOptionsStructStillWorks) {
    // A caller built against a header whose options ended after `device` gets defaults for the rest.
    q3n_model_options o = cpu_options();
    o.struct_size = offsetof(q3n_model_options, device_index);
    ModelHandle h;
    EXPECT_EQ(try_load(fixture_dir("bf16_tied"), o, h), Q3N_OK) << last_error();
}

TEST(Abi, ErrorMessageIsThreadLocalAndClearedOnSuccess) {
    ModelHandle h;
    EXPECT_EQ(try_load("/nonexistent/dir", cpu_options(), h), Q3N_ERR_IO);
    EXPECT_FALSE(last_error().empty());
    EXPECT_EQ(try_load(fixture_dir("bf16_tied"), cpu_options(), h), Q3N_OK);
    EXPECT_TRUE(last_error().empty());
}

TEST(Load, ModelInfo) {
    ModelHandle h;
    ASSERT_EQ(try_load(fixture_dir("fp8_bf16_scales"), cpu_options(), h), Q3N_OK) << last_error();
    q3n_model_info info{};
    info.struct_size = sizeof(info);
    ASSERT_EQ(q3n_model_get_info(h.m, &info), Q3N_OK);
    EXPECT_STREQ(info.architecture, "Qwen3ForCausalLM");
    EXPECT_EQ(info.weight_dtype, Q3N_DTYPE_FP8_E4M3);
    EXPECT_EQ(info.device, Q3N_DEVICE_CPU);
    EXPECT_EQ(info.vocab_size, 320u);
    EXPECT_EQ(info.hidden_size, 192u);
    EXPECT_EQ(info.num_attention_heads, 3u);
    EXPECT_EQ(info.num_kv_heads, 1u);
    EXPECT_EQ(info.head_dim, 64u);
    EXPECT_EQ(info.context_length, 256u);
    EXPECT_EQ(info.eos_token_id, 151645);
    EXPECT_EQ(info.bos_token_id, 151643);
    ASSERT_EQ(info.num_eos_token_ids, 1u);
    EXPECT_EQ(info.eos_token_ids[0], 151645);
}

TEST(Load, MissingDirectoryIsIo) {
    ModelHandle h;
    EXPECT_EQ(try_load(temp_dir("empty"), cpu_options(), h), Q3N_ERR_IO);
    EXPECT_NE(last_error().find("config.json"), std::string::npos);
}

TEST(Load, UnknownArchitectureNamesTheSupportedOnes) {
    ModelHandle h;
    const auto dir = fixture_with_config("bf16_tied", "arch", [](auto& c) { c["architectures"] = {"LlamaForCausalLM"}; });
    EXPECT_EQ(try_load(dir, cpu_options(), h), Q3N_ERR_UNSUPPORTED);
    EXPECT_NE(last_error().find("LlamaForCausalLM"), std::string::npos);
    EXPECT_NE(last_error().find("Qwen3ForCausalLM"), std::string::npos);
}

TEST(Load, BadConfigs) {
    struct Case {
        const char* tag;
        std::function<void(nlohmann::json&)> edit;
        q3n_status status;
        const char* mention;
    };
    const std::vector<Case> cases = {
        {"no_hidden", [](auto& c) { c.erase("hidden_size"); }, Q3N_ERR_BAD_CONFIG, "hidden_size"},
        {"string_hidden", [](auto& c) { c["hidden_size"] = "128"; }, Q3N_ERR_BAD_CONFIG, "hidden_size"},
        {"negative_layers", [](auto& c) { c["num_hidden_layers"] = -2; }, Q3N_ERR_BAD_CONFIG, "num_hidden_layers"},
        {"kv_not_dividing", [](auto& c) { c["num_key_value_heads"] = 3; }, Q3N_ERR_BAD_CONFIG, "num_key_value_heads"},
        {"absurd_vocab", [](auto& c) { c["vocab_size"] = 1ll << 40; }, Q3N_ERR_BAD_CONFIG, "vocab_size"},
        {"odd_head_dim", [](auto& c) { c["head_dim"] = 63; }, Q3N_ERR_BAD_CONFIG, "head_dim"},
        {"bad_eps", [](auto& c) { c["rms_norm_eps"] = -1; }, Q3N_ERR_BAD_CONFIG, "rms_norm_eps"},
        {"bias", [](auto& c) { c["attention_bias"] = true; }, Q3N_ERR_UNSUPPORTED, "attention_bias"},
        {"gelu", [](auto& c) { c["hidden_act"] = "gelu"; }, Q3N_ERR_UNSUPPORTED, "gelu"},
        {"rope_type", [](auto& c) { c["rope_scaling"] = {{"rope_type", "dynamic"}, {"factor", 2.0}}; }, Q3N_ERR_UNSUPPORTED, "dynamic"},
        {"quant_method", [](auto& c) { c["quantization_config"] = {{"quant_method", "awq"}}; }, Q3N_ERR_UNSUPPORTED, "awq"},
        {"fp8_tensorwise", [](auto& c) { c["quantization_config"] = {{"quant_method", "fp8"}, {"activation_scheme", "dynamic"}}; },
         Q3N_ERR_UNSUPPORTED, "weight_block_size"},
        // The weights must match the config: a wrong intermediate size is caught at the first tensor.
        {"shape_mismatch", [](auto& c) { c["intermediate_size"] = 512; }, Q3N_ERR_BAD_CHECKPOINT, "shape"},
    };
    for (const auto& cs : cases) {
        ModelHandle h;
        const auto dir = fixture_with_config("bf16_tied", cs.tag, cs.edit);
        EXPECT_EQ(try_load(dir, cpu_options(), h), cs.status) << cs.tag << ": " << last_error();
        EXPECT_NE(last_error().find(cs.mention), std::string::npos) << cs.tag << ": " << last_error();
        EXPECT_EQ(h.m, nullptr);
    }
}

TEST(Load, ConfigThatIsNotJson) {
    const auto dir = temp_dir("notjson");
    write_text(dir + "/config.json", "{\"hidden_size\": 12,");
    ModelHandle h;
    EXPECT_EQ(try_load(dir, cpu_options(), h), Q3N_ERR_BAD_CONFIG);
    EXPECT_NE(last_error().find("JSON"), std::string::npos);
}

TEST(Load, Fp8WeightWithoutScaleIsRefused) {
    const auto dir = fixture_with_tensors("fp8_f32_scales", "noscale", [](auto& t) {
        t.erase("model.layers.1.mlp.up_proj.weight_scale_inv");
    });
    ModelHandle h;
    EXPECT_EQ(try_load(dir, cpu_options(), h), Q3N_ERR_BAD_CHECKPOINT);
    EXPECT_NE(last_error().find("model.layers.1.mlp.up_proj.weight_scale_inv"), std::string::npos) << last_error();
}

TEST(Load, Fp8ScaleGridOfTheWrongShapeIsRefused) {
    const auto dir = fixture_with_tensors("fp8_f32_scales", "scaleshape", [](auto& t) {
        RawTensor& s = t.at("model.layers.0.self_attn.q_proj.weight_scale_inv");
        s.shape = {static_cast<int64_t>(s.bytes.size() / 4), 1};
    });
    ModelHandle h;
    EXPECT_EQ(try_load(dir, cpu_options(), h), Q3N_ERR_BAD_CHECKPOINT);
    EXPECT_NE(last_error().find("128x128"), std::string::npos) << last_error();
}

TEST(Load, ExcludedModuleStoredAsFp8IsRefused) {
    const auto dir = fixture_with_config("fp8_f32_scales", "excluded", [](auto& c) {
        c["quantization_config"]["modules_to_not_convert"].push_back("model.layers.0.mlp.gate_proj");
    });
    ModelHandle h;
    EXPECT_EQ(try_load(dir, cpu_options(), h), Q3N_ERR_BAD_CHECKPOINT);
    EXPECT_NE(last_error().find("exclusions"), std::string::npos) << last_error();
}

TEST(Load, MissingTensorIsNamed) {
    const auto dir = fixture_with_tensors("bf16_tied", "missing", [](auto& t) { t.erase("model.layers.1.self_attn.k_norm.weight"); });
    ModelHandle h;
    EXPECT_EQ(try_load(dir, cpu_options(), h), Q3N_ERR_BAD_CHECKPOINT);
    EXPECT_NE(last_error().find("model.layers.1.self_attn.k_norm.weight"), std::string::npos) << last_error();
}

TEST(Load, UntiedModelWithoutLmHeadIsRefused) {
    const auto dir = fixture_with_tensors("fp8_f32_scales", "nolmhead", [](auto& t) { t.erase("lm_head.weight"); });
    ModelHandle h;
    EXPECT_EQ(try_load(dir, cpu_options(), h), Q3N_ERR_BAD_CHECKPOINT);
    EXPECT_NE(last_error().find("lm_head.weight"), std::string::npos) << last_error();
}

TEST(Load, ContextLongerThanTheModelIsRefused) {
    q3n_model_options o = cpu_options();
    o.context_length = 1u << 20;
    ModelHandle h;
    EXPECT_EQ(try_load(fixture_dir("bf16_tied"), o, h), Q3N_ERR_INVALID_ARGUMENT);
    EXPECT_NE(last_error().find("max_position_embeddings"), std::string::npos);
}

TEST(Load, CancelledByProgressCallback) {
    q3n_model_options o = cpu_options();
    int calls = 0;
    o.progress = [](float f, void* user) {
        ++*static_cast<int*>(user);
        return f > 0.3f ? 1 : 0;
    };
    o.progress_user_data = &calls;
    ModelHandle h;
    EXPECT_EQ(try_load(fixture_dir("bf16_untied_sharded"), o, h), Q3N_ERR_INVALID_STATE);
    EXPECT_NE(last_error().find("cancelled"), std::string::npos);
    EXPECT_GE(calls, 2);
}

TEST(Load, NanInWeightsIsReportedNotSampled) {
    const auto dir = fixture_with_tensors("bf16_tied", "nan", [](auto& t) {
        RawTensor& w = t.at("model.norm.weight");
        const uint16_t nan = q3n::float_to_bf16(std::nanf(""));
        std::memcpy(w.bytes.data(), &nan, 2);
    });
    ModelHandle h;
    ASSERT_EQ(try_load(dir, cpu_options(), h), Q3N_OK) << last_error();
    SequenceHandle s;
    ASSERT_EQ(q3n_sequence_create(h.m, &s.s), Q3N_OK);
    const int32_t t[] = {1, 2, 3};
    ASSERT_EQ(q3n_sequence_append(s.s, t, 3), Q3N_OK);
    EXPECT_EQ(q3n_model_step(h.m, &s.s, 1, Q3N_STEP_SAMPLE), Q3N_ERR_NUMERIC);
    int32_t token = 0;
    EXPECT_EQ(q3n_sequence_sample(s.s, &token), Q3N_ERR_INVALID_STATE);
}

TEST(Load, DummyWeightsAreSeededAndRun) {
    auto run = [](uint64_t seed) {
        q3n_model_options o = cpu_options();
        o.load_format = Q3N_LOAD_DUMMY;
        o.dummy_seed = seed;
        ModelHandle h;
        // The dummy format needs only config.json: point it at a directory holding nothing else.
        const auto dir = temp_dir("dummy" + std::to_string(seed));
        fs::copy(fixture_dir("fp8_bf16_scales") + "/config.json", dir + "/config.json");
        EXPECT_EQ(try_load(dir, o, h), Q3N_OK) << last_error();
        SequenceHandle s;
        q3n_sequence_create(h.m, &s.s);
        const int32_t t[] = {5, 6, 7};
        q3n_sequence_append(s.s, t, 3);
        EXPECT_EQ(q3n_model_step(h.m, &s.s, 1, 0), Q3N_OK) << last_error();
        q3n_model_info info{};
        info.struct_size = sizeof(info);
        q3n_model_get_info(h.m, &info);
        EXPECT_EQ(info.weight_dtype, Q3N_DTYPE_FP8_E4M3);
        return logits_of(s.s);
    };
    const auto a = run(1), b = run(1), c = run(2);
    EXPECT_EQ(a, b);
    EXPECT_NE(a, c);
    EXPECT_TRUE(std::all_of(a.begin(), a.end(), [](float x) { return std::isfinite(x); }));
}

class Engine : public ::testing::Test {
protected:
    void SetUp() override {
        ref_ = parse_reference(read_json(fixture_dir("bf16_untied_sharded") + "/reference.json"));
        load({});
    }
    void load(std::function<void(q3n_model_options&)> edit) {
        q3n_model_options o = cpu_options();
        if (edit) edit(o);
        q3n_model_free(h_.m);
        h_.m = nullptr;
        ASSERT_EQ(try_load(fixture_dir("bf16_untied_sharded"), o, h_), Q3N_OK) << last_error();
    }
    q3n_sequence* make(const std::vector<int32_t>& tokens) {
        q3n_sequence* s = nullptr;
        EXPECT_EQ(q3n_sequence_create(h_.m, &s), Q3N_OK);
        seqs_.push_back(std::make_unique<SequenceHandle>());
        seqs_.back()->s = s;
        if (!tokens.empty()) EXPECT_EQ(q3n_sequence_append(s, tokens.data(), tokens.size()), Q3N_OK) << last_error();
        return s;
    }
    std::vector<float> single(const std::vector<int32_t>& tokens) {
        q3n_sequence* s = make(tokens);
        EXPECT_EQ(q3n_model_step(h_.m, &s, 1, 0), Q3N_OK) << last_error();
        return logits_of(s);
    }

    Reference ref_;
    ModelHandle h_;
    std::vector<std::unique_ptr<SequenceHandle>> seqs_;
};

// One step over several sequences of different lengths equals stepping each alone.
TEST_F(Engine, BatchedPrefillEqualsSingle) {
    std::vector<q3n_sequence*> batch;
    for (const auto& p : ref_.prompts) batch.push_back(make(p));
    ASSERT_EQ(q3n_model_step(h_.m, batch.data(), batch.size(), 0), Q3N_OK) << last_error();
    for (size_t i = 0; i < batch.size(); ++i)
        EXPECT_LT(max_abs_diff(logits_of(batch[i]), single(ref_.prompts[i])), 1e-5) << "sequence " << i;
}

// Prefill of one sequence and decode of others in the same step (continuous batching).
TEST_F(Engine, MixedPrefillAndDecodeInOneStep) {
    const auto& p0 = ref_.prompts[3];
    const auto& p1 = ref_.prompts[2];
    q3n_sequence* a = make(p0);
    q3n_sequence* b = make(p1);
    q3n_sequence* both[] = {a, b};
    ASSERT_EQ(q3n_model_step(h_.m, both, 2, 0), Q3N_OK);
    // a decodes one token, b two, and c prefills, together.
    const int32_t ta = 7, tb[] = {8, 9};
    q3n_sequence_append(a, &ta, 1);
    q3n_sequence_append(b, tb, 2);
    q3n_sequence* c = make(ref_.prompts[1]);
    q3n_sequence* three[] = {a, b, c};
    ASSERT_EQ(q3n_model_step(h_.m, three, 3, 0), Q3N_OK) << last_error();

    auto with = [](std::vector<int32_t> v, std::initializer_list<int32_t> extra) {
        v.insert(v.end(), extra);
        return v;
    };
    EXPECT_LT(max_abs_diff(logits_of(a), single(with(p0, {7}))), 1e-5);
    EXPECT_LT(max_abs_diff(logits_of(b), single(with(p1, {8, 9}))), 1e-5);
    EXPECT_LT(max_abs_diff(logits_of(c), single(ref_.prompts[1])), 1e-5);
}

TEST_F(Engine, StepErrors) {
    q3n_sequence* a = make({1, 2});
    q3n_sequence* twice[] = {a, a};
    EXPECT_EQ(q3n_model_step(h_.m, twice, 2, 0), Q3N_ERR_INVALID_ARGUMENT);
    EXPECT_NE(last_error().find("twice"), std::string::npos);
    EXPECT_EQ(q3n_model_step(h_.m, &a, 1, 0x80), Q3N_ERR_INVALID_ARGUMENT);
    ASSERT_EQ(q3n_model_step(h_.m, &a, 1, 0), Q3N_OK);
    EXPECT_EQ(q3n_model_step(h_.m, &a, 1, 0), Q3N_ERR_INVALID_STATE);  // nothing queued
    q3n_sequence* empty = make({});
    int32_t t;
    EXPECT_EQ(q3n_sequence_sample(empty, &t), Q3N_ERR_INVALID_STATE);
    std::vector<float> small(3);
    size_t n = 0;
    EXPECT_EQ(q3n_sequence_get_logits(a, small.data(), small.size(), &n), Q3N_ERR_BUFFER_TOO_SMALL);
    EXPECT_EQ(n, 384u);
}

TEST_F(Engine, OutOfVocabularyTokenIsRefused) {
    q3n_sequence* a = make({});
    const int32_t bad[] = {1, 384};
    EXPECT_EQ(q3n_sequence_append(a, bad, 2), Q3N_ERR_INVALID_ARGUMENT);
    EXPECT_NE(last_error().find("384"), std::string::npos);
    const int32_t neg = -1;
    EXPECT_EQ(q3n_sequence_append(a, &neg, 1), Q3N_ERR_INVALID_ARGUMENT);
    size_t len = 9;
    q3n_sequence_length(a, &len);
    EXPECT_EQ(len, 0u);
}

TEST_F(Engine, PromptOverTheContextIsRefusedAndNothingChanges) {
    load([](q3n_model_options& o) { o.context_length = 16; });
    q3n_sequence* a = make({});
    std::vector<int32_t> tokens(17, 3);
    EXPECT_EQ(q3n_sequence_append(a, tokens.data(), tokens.size()), Q3N_ERR_CONTEXT_OVERFLOW);
    EXPECT_NE(last_error().find("context length"), std::string::npos);
    size_t len = 1;
    q3n_sequence_length(a, &len);
    EXPECT_EQ(len, 0u);
    // Generating up to the limit, then one more sample, is refused too.
    ASSERT_EQ(q3n_sequence_append(a, tokens.data(), 15), Q3N_OK);
    ASSERT_EQ(q3n_model_step(h_.m, &a, 1, Q3N_STEP_SAMPLE), Q3N_OK) << last_error();
    EXPECT_EQ(q3n_model_step(h_.m, &a, 1, Q3N_STEP_SAMPLE), Q3N_ERR_CONTEXT_OVERFLOW);
}

TEST_F(Engine, FullKvCacheRefusesTheStepAndLeavesOthersIntact) {
    load([](q3n_model_options& o) {
        o.kv_cache_tokens = 32;
        o.kv_block_size = 16;
    });
    q3n_sequence* a = make(ref_.prompts[2]);  // 17 tokens: 2 blocks
    ASSERT_EQ(q3n_model_step(h_.m, &a, 1, 0), Q3N_OK);
    const auto before = logits_of(a);
    q3n_sequence* b = make({1, 2, 3});
    q3n_sequence* both[] = {b};
    EXPECT_EQ(q3n_model_step(h_.m, both, 1, 0), Q3N_ERR_KV_CACHE_FULL);
    EXPECT_NE(last_error().find("KV cache"), std::string::npos);
    EXPECT_EQ(logits_of(a), before);
    size_t cached = 9;
    q3n_sequence_cached_length(b, &cached);
    EXPECT_EQ(cached, 0u);
    // Freeing the first sequence returns its blocks at once.
    q3n_sequence_free(a);
    seqs_.front()->s = nullptr;
    EXPECT_EQ(q3n_model_step(h_.m, both, 1, 0), Q3N_OK) << last_error();
}

TEST_F(Engine, TruncateRollsBack) {
    const auto& p = ref_.prompts[3];
    q3n_sequence* a = make(p);
    ASSERT_EQ(q3n_model_step(h_.m, &a, 1, 0), Q3N_OK);
    const auto first = logits_of(a);
    int32_t t;
    ASSERT_EQ(q3n_sequence_sample(a, &t), Q3N_OK);
    for (int i = 0; i < 20; ++i) ASSERT_EQ(q3n_model_step(h_.m, &a, 1, Q3N_STEP_SAMPLE), Q3N_OK) << last_error();
    ASSERT_EQ(q3n_sequence_truncate(a, p.size() - 1), Q3N_OK);
    size_t cached = 0;
    q3n_sequence_cached_length(a, &cached);
    EXPECT_EQ(cached, p.size() - 1);
    ASSERT_EQ(q3n_sequence_append(a, &p.back(), 1), Q3N_OK);
    ASSERT_EQ(q3n_model_step(h_.m, &a, 1, 0), Q3N_OK);
    EXPECT_LT(max_abs_diff(logits_of(a), first), 1e-5);
    EXPECT_EQ(q3n_sequence_truncate(a, 1000), Q3N_ERR_INVALID_ARGUMENT);
}

TEST_F(Engine, SameSeedSameTokens) {
    q3n_sampling_params p;
    q3n_sampling_params_init(&p, sizeof p);
    p.temperature = 1.0f;
    p.top_k = 50;
    p.top_p = 0.9f;
    p.seed = 1234;
    auto generate = [&](uint64_t seed) {
        q3n_sequence* s = make(ref_.prompts[1]);
        p.seed = seed;
        EXPECT_EQ(q3n_sequence_set_sampling(s, &p), Q3N_OK) << last_error();
        std::vector<int32_t> out;
        for (int i = 0; i < 24; ++i) {
            EXPECT_EQ(q3n_model_step(h_.m, &s, 1, Q3N_STEP_SAMPLE), Q3N_OK) << last_error();
            int32_t t;
            q3n_sequence_last_token(s, &t);
            out.push_back(t);
        }
        return out;
    };
    EXPECT_EQ(generate(1234), generate(1234));
    EXPECT_NE(generate(1234), generate(99));
}

TEST_F(Engine, InvalidSamplingParamsAreRefused) {
    q3n_sequence* s = make({1});
    q3n_sampling_params p;
    q3n_sampling_params_init(&p, sizeof p);
    p.temperature = std::nanf("");
    EXPECT_EQ(q3n_sequence_set_sampling(s, &p), Q3N_ERR_INVALID_ARGUMENT);
    EXPECT_NE(last_error().find("temperature"), std::string::npos);
    q3n_sampling_params_init(&p, sizeof p);
    p.top_p = 0.0f;
    EXPECT_EQ(q3n_sequence_set_sampling(s, &p), Q3N_ERR_INVALID_ARGUMENT);
}

TEST_F(Engine, FreeingTheModelFirstIsSafe) {
    q3n_sequence* s = make({1, 2, 3});
    q3n_model_free(h_.m);
    h_.m = nullptr;
    // The sequence keeps the model alive; its own calls still work.
    size_t len = 0;
    EXPECT_EQ(q3n_sequence_length(s, &len), Q3N_OK);
    EXPECT_EQ(len, 3u);
}

TEST_F(Engine, ThousandRequestsReturnEveryBlock) {
    load([](q3n_model_options& o) { o.kv_cache_tokens = 64; });
    for (int i = 0; i < 1000; ++i) {
        q3n_sequence* s = nullptr;
        ASSERT_EQ(q3n_sequence_create(h_.m, &s), Q3N_OK);
        const int32_t t[] = {1, 2, 3, 4, 5};
        q3n_sequence_append(s, t, 5);
        ASSERT_EQ(q3n_model_step(h_.m, &s, 1, Q3N_STEP_SAMPLE), Q3N_OK) << "request " << i << ": " << last_error();
        q3n_sequence_free(s);
    }
    // All 64 token slots must be free again: a 64-token sequence fits.
    std::vector<int32_t> full(64, 1);
    q3n_sequence* s = make(full);
    EXPECT_EQ(q3n_model_step(h_.m, &s, 1, 0), Q3N_OK) << last_error();
}

}  // namespace

namespace {

// A caller built against an older, shorter struct passes its own size: nothing past it is written.
TEST(Abi, InitWritesOnlyTheCallersSize) {
    struct Padded {
        q3n_sampling_params p;
        unsigned char canary[64];
    } buf;
    std::memset(&buf, 0xAB, sizeof buf);
    const size_t old_size = offsetof(q3n_sampling_params, logprobs);
    q3n_sampling_params_init(&buf.p, old_size);
    EXPECT_EQ(buf.p.struct_size, old_size);
    EXPECT_EQ(buf.p.top_p, 1.0f);
    const auto* bytes = reinterpret_cast<const unsigned char*>(&buf.p);
    for (size_t i = old_size; i < sizeof buf.p; ++i) EXPECT_EQ(bytes[i], 0xAB) << i;
    q3n_sampling_params_init(&buf.p, sizeof buf.p + 1000);  // a larger one is capped at the library's size
    EXPECT_EQ(buf.p.struct_size, sizeof buf.p);
    for (unsigned char c : buf.canary) EXPECT_EQ(c, 0xAB);
}

}  // namespace

namespace {

// Embedding rows past the tokenizer (padding) are never sampled when the caller says where it ends.
TEST(Sampling, VocabLimitExcludesTrailingIds) {
    q3n_model_options o;
    q3n_model_options_init(&o, sizeof o);
    o.device = Q3N_DEVICE_CPU;
    ModelHandle h;
    ASSERT_EQ(q3n_model_load(fixture_dir("bf16_untied_sharded").c_str(), &o, &h.m), Q3N_OK) << q3n_last_error();
    const std::vector<int32_t> prompt = {5, 9, 77, 130};
    SequenceHandle s;
    ASSERT_EQ(q3n_sequence_create(h.m, &s.s), Q3N_OK);
    ASSERT_EQ(q3n_sequence_append(s.s, prompt.data(), prompt.size()), Q3N_OK);
    ASSERT_EQ(q3n_model_step(h.m, &s.s, 1, 0), Q3N_OK);
    std::vector<float> logits(384);
    size_t n = 0;
    ASSERT_EQ(q3n_sequence_get_logits(s.s, logits.data(), logits.size(), &n), Q3N_OK);
    const int32_t argmax = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    ASSERT_GT(argmax, 0);
    // With the limit at the argmax, greedy must pick the best id below it.
    q3n_sampling_params p;
    q3n_sampling_params_init(&p, sizeof p);
    p.vocab_limit = static_cast<uint32_t>(argmax);
    ASSERT_EQ(q3n_sequence_set_sampling(s.s, &p), Q3N_OK);
    int32_t token = -1;
    ASSERT_EQ(q3n_sequence_sample(s.s, &token), Q3N_OK);
    const int32_t best_below =
        static_cast<int32_t>(std::max_element(logits.begin(), logits.begin() + argmax) - logits.begin());
    EXPECT_EQ(token, best_below);
    // Random draws stay below it too.
    p.temperature = 2.0f;
    p.vocab_limit = 10;
    for (int i = 0; i < 50; ++i) {
        ASSERT_EQ(q3n_sequence_set_sampling(s.s, &p), Q3N_OK);
        p.seed = static_cast<uint64_t>(i);
        ASSERT_EQ(q3n_model_step(h.m, &s.s, 1, Q3N_STEP_SAMPLE), Q3N_OK) << q3n_last_error();
        q3n_sequence_last_token(s.s, &token);
        EXPECT_LT(token, 10);
    }
}

}  // namespace
