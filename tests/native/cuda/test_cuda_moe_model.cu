// The Qwen3-MoE CUDA runner (cuda/qwen3_moe_cuda.cu) end to end: the transformers fixtures of
// tests/fixtures/qwen3_moe on the GPU, the GPU against the CPU runner on the same checkpoints, decode
// (CUDA graphs) after a prefill against one longer prefill, and several sequences in one step against
// each alone. Skipped, with a message, without a GPU.
//
// Tolerances:
//   - Against transformers: test_moe.cpp's bounds for the CPU runner, for the same reasons (both
//     backends compute in fp32 from the same bf16/e4m3 numbers): BF16 1e-4 relative L2; FP8 against
//     the activation-quantising reference, every prompt within 0.1 and most within 2e-3
//     (fixture_checks.h: one e4m3 rounding flip moves these tiny random models by a few %).
//   - GPU against CPU: BF16 1e-5 (test_cuda_ops.cu's CudaFixture: summation order only; the router
//     picks the same experts since random logits leave no near-ties at 1e-6); FP8 as above.
//   - Decode after prefill, batch against single: BF16 1e-5 (the GEMV and the grouped expert kernels
//     sum in the same order for any row count; attention splits keys the same way); FP8 0.1, since a
//     prefill's wider rows take cuBLASLt for the dense projections and the rounding flips follow.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "../fixture_checks.h"
#include "../fixture_util.h"

using namespace q3n_test;
namespace fs = std::filesystem;

namespace {

std::string moe_root() { return fixture_root("Q3N_MOE_FIXTURES", "qwen3_moe"); }

void load(const std::string& dir, q3n_device device, ModelHandle& h) {
    q3n_model_options o;
    q3n_model_options_init(&o, sizeof o);
    o.device = device;
    o.kv_cache_dtype = Q3N_DTYPE_F32;  // the CPU's cache dtype: compare like with like
    o.context_length = 256;
    o.kv_cache_tokens = 2048;
    ASSERT_EQ(q3n_model_load(dir.c_str(), &o, &h.m), Q3N_OK) << dir << ": " << q3n_last_error();
}


struct Case {
    std::string name;
    bool fp8;
};

class CudaMoeFixture : public ::testing::TestWithParam<Case> {};

#define SKIP_WITHOUT_GPU_OR_FIXTURE()                                                             \
    REQUIRE_GPU();                                                                                \
    if (!fs::exists(moe_root() + "/" + GetParam().name))                                          \
    GTEST_SKIP() << moe_root() << "/" << GetParam().name << " is missing: run tests/fixtures/make_moe_fixtures.py"

TEST_P(CudaMoeFixture, LogitsMatchTransformersAndCpu) {
    SKIP_WITHOUT_GPU_OR_FIXTURE();
    const Case& fc = GetParam();
    const std::string dir = moe_root() + "/" + fc.name;
    ModelHandle gpu, cpu;
    load(dir, Q3N_DEVICE_CUDA, gpu);
    load(dir, Q3N_DEVICE_CPU, cpu);
    ASSERT_TRUE(gpu.m && cpu.m);
    const q3n_model_info gi = model_info(gpu.m), ci = model_info(cpu.m);
    EXPECT_EQ(gi.device, Q3N_DEVICE_CUDA);
    EXPECT_STREQ(gi.architecture, "Qwen3MoeForCausalLM");
    // Both runners count the same tensors.
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
        check_logits_fp8(gpu.m, ref, V, fc.name + "_gpu_emulated");
        check_greedy_teacher_forced(gpu.m, ref, V, fc.name + "_gpu_emulated");
    }

    const Reference ref = parse_reference(j);
    size_t tight = 0;
    for (size_t p = 0; p < ref.prompts.size(); ++p) {
        const auto g = prefill(gpu.m, ref.prompts[p], V), c = prefill(cpu.m, ref.prompts[p], V);
        const double r = relative_l2(g, c);
        EXPECT_LT(r, fc.fp8 ? 0.1 : 1e-5) << "GPU vs CPU, prompt " << p << ": " << q3n::cuda_test::diff_report(g, c);
        tight += r < 2e-3;
    }
    if (fc.fp8) EXPECT_GE(tight * 2, ref.prompts.size()) << "too many prompts differ from the CPU by more than 2e-3";
}

// Greedy generation through the device sampler equals the CPU's token for token while the reference
// margin allows (the same rule as test_cuda_ops.cu's CudaFixture), with matching log-probabilities.
TEST_P(CudaMoeFixture, GreedyTokensEqualTheCpu) {
    SKIP_WITHOUT_GPU_OR_FIXTURE();
    const Case& fc = GetParam();
    const std::string dir = moe_root() + "/" + fc.name;
    ModelHandle gpu, cpu;
    load(dir, Q3N_DEVICE_CUDA, gpu);
    load(dir, Q3N_DEVICE_CPU, cpu);
    ASSERT_TRUE(gpu.m && cpu.m);
    const Reference ref = parse_reference(read_json(dir + "/reference.json"));
    SequenceHandle sg, sc;
    ASSERT_EQ(q3n_sequence_create(gpu.m, &sg.s), Q3N_OK);
    ASSERT_EQ(q3n_sequence_create(cpu.m, &sc.s), Q3N_OK);
    q3n_sampling_params sp;
    q3n_sampling_params_init(&sp, sizeof sp);
    sp.logprobs = 1;
    sp.top_logprobs = 3;
    ASSERT_EQ(q3n_sequence_set_sampling(sg.s, &sp), Q3N_OK);
    ASSERT_EQ(q3n_sequence_set_sampling(sc.s, &sp), Q3N_OK);
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
        ASSERT_EQ(a, b) << "step " << i << " (reference margin " << ref.greedy.margins[i] << ")";
        q3n_token_logprob lg, lc;
        ASSERT_EQ(q3n_sequence_get_token_logprob(sg.s, &lg), Q3N_OK);
        ASSERT_EQ(q3n_sequence_get_token_logprob(sc.s, &lc), Q3N_OK);
        EXPECT_NEAR(lg.logprob, lc.logprob, fc.fp8 ? 0.5 : 1e-4) << "step " << i;
        ++equal;
    }
    std::printf("[ %s ] GPU greedy equals the CPU for %zu of %zu steps\n", fc.name.c_str(), equal, ref.greedy.tokens.size());
    // Nothing is compared when the first reference margin is already too small (FP8 fixtures can be).
    if (ref.greedy.margins[0] >= (fc.fp8 ? 0.5 : 1e-3)) EXPECT_GT(equal, 0u);
}

// Prefill then decode token by token (decode steps replay CUDA graphs) equals one prefill of the
// whole sequence.
TEST_P(CudaMoeFixture, DecodeAfterPrefillEqualsLongerPrefill) {
    SKIP_WITHOUT_GPU_OR_FIXTURE();
    const Case& fc = GetParam();
    const std::string dir = moe_root() + "/" + fc.name;
    ModelHandle gpu;
    load(dir, Q3N_DEVICE_CUDA, gpu);
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
    EXPECT_LT(relative_l2(got, full), fc.fp8 ? 0.1 : 1e-5) << q3n::cuda_test::diff_report(got, full);
}

// Sequences of different lengths prefilled in one step, then decoded together (a graph of batch 3),
// each equal to the same sequence run alone.
TEST_P(CudaMoeFixture, BatchEqualsEachAlone) {
    SKIP_WITHOUT_GPU_OR_FIXTURE();
    const Case& fc = GetParam();
    const std::string dir = moe_root() + "/" + fc.name;
    ModelHandle gpu;
    load(dir, Q3N_DEVICE_CUDA, gpu);
    ASSERT_TRUE(gpu.m);
    const size_t V = model_info(gpu.m).vocab_size;
    const double tol = fc.fp8 ? 0.1 : 1e-5;
    const std::vector<std::vector<int32_t>> prompts = {{1, 2, 3, 4, 5}, {77}, {200, 201, 9, 9, 9, 9, 30, 31, 32, 33, 34, 35}};
    const std::vector<int32_t> next = {17, 18, 19};
    std::vector<SequenceHandle> seqs(prompts.size());
    std::vector<q3n_sequence*> batch;
    for (size_t i = 0; i < prompts.size(); ++i) {
        ASSERT_EQ(q3n_sequence_create(gpu.m, &seqs[i].s), Q3N_OK);
        ASSERT_EQ(q3n_sequence_append(seqs[i].s, prompts[i].data(), prompts[i].size()), Q3N_OK);
        batch.push_back(seqs[i].s);
    }
    ASSERT_EQ(q3n_model_step(gpu.m, batch.data(), batch.size(), 0), Q3N_OK) << q3n_last_error();
    for (size_t i = 0; i < prompts.size(); ++i) {
        const auto got = logits_of(seqs[i].s, V), alone = prefill(gpu.m, prompts[i], V);
        EXPECT_LT(relative_l2(got, alone), tol) << "sequence " << i << ": " << q3n::cuda_test::diff_report(got, alone);
    }
    for (int round = 0; round < 2; ++round) {  // the second round replays the captured graph
        for (size_t i = 0; i < prompts.size(); ++i) ASSERT_EQ(q3n_sequence_append(seqs[i].s, &next[i], 1), Q3N_OK);
        ASSERT_EQ(q3n_model_step(gpu.m, batch.data(), batch.size(), 0), Q3N_OK) << q3n_last_error();
    }
    for (size_t i = 0; i < prompts.size(); ++i) {
        std::vector<int32_t> all = prompts[i];
        all.push_back(next[i]);
        all.push_back(next[i]);
        const auto got = logits_of(seqs[i].s, V), alone = prefill(gpu.m, all, V);
        EXPECT_LT(relative_l2(got, alone), tol) << "sequence " << i << " after two batched decode steps: "
                                                << q3n::cuda_test::diff_report(got, alone);
    }
}

INSTANTIATE_TEST_SUITE_P(Transformers, CudaMoeFixture,
                         ::testing::Values(Case{"bf16_e8k2", false}, Case{"bf16_mlp_only", false},
                                           Case{"fp8_f32_scales", true}),
                         [](const auto& info) { return info.param.name; });

}  // namespace
