// Qwen3-VL and Qwen3-VL-MoE end to end through the C ABI, against transformers 5.17 on the tiny
// fixtures (tests/fixtures/qwen3_vl/*, make_vl_fixtures.py): every prompt is appended as its text
// tokens plus its images and video slices (q3n_sequence_append_vision with the fixture's pixel
// formula), and the rotary positions, last logits and greedy tokens are compared.
//
// Tolerances. BF16 fixtures: the engine computes in fp32 from the same bf16 weights as the fp32
// reference, so only summation order and libm differ (test_fixtures.cpp); the vision tower adds its
// own ~1e-6 (test_qwen3_vl_vision.cpp) before its features enter the decoder. Relative L2 of the
// logits below 1e-4 (measured: see the printed figures, a few 1e-7); a wrong MRoPE axis, DeepStack
// layer or placeholder row moves them by 1e-2 or more. FP8: the rules of fixture_checks.h, against
// the activation-quantising emulation (every prompt within 0.1, half within 2e-3: e4m3 rounding
// flips) and against the plain reference within 0.3 (test_fixtures.cpp explains both); greedy
// tokens teacher-forced where the margin exceeds 0.5. BF16 greedy tokens are compared free-running
// up to the first step whose reference margin is within 8x the largest logit error seen.
// Same-engine comparisons (decode vs prefill, chunked vs whole, re-appended vs first) are fp32
// rounding only: 1e-5.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>

#include "fixture_checks.h"
#include "vl_fixture.h"

using namespace q3n_test;

namespace {

// One appendable piece of a prompt: text ids, or one vision item (an image, or video slices).
struct Segment {
    size_t begin = 0, end = 0;  // the prompt's ids this covers
    bool vision = false;
    q3n_vision_kind kind = Q3N_VISION_IMAGE;
    uint32_t t = 1, h = 0, w = 0;
    std::vector<float> pixels;
};

struct Prompt {
    std::string name;
    std::vector<int32_t> ids;
    std::vector<int32_t> positions;  // [3][n]
    int64_t rope_delta = 0;
    std::vector<float> last_logits;
    Greedy greedy;
    std::vector<Segment> segments;
};

struct VlReference {
    std::vector<Prompt> prompts;
    std::vector<Prompt> emulated;  // FP8 only: logits and greedy with activation quantisation
};

constexpr size_t kPatchDim = 3 * 2 * 16 * 16;  // the fixtures' processor rows
constexpr size_t kMerge = 2;

// Cuts the prompt at its placeholder runs: an image run is one image; a video run is one temporal
// slice of the next video (the processor puts timestamps between slices), its pixels the slice's rows.
std::vector<Segment> segments_of(const nlohmann::json& p, const nlohmann::json& inputs, int32_t image_pad,
                                 int32_t video_pad) {
    const auto ids = p.at("input_ids").get<std::vector<int32_t>>();
    const auto images = p.at("images").get<std::vector<int>>(), videos = p.at("videos").get<std::vector<int>>();
    size_t next_image = 0, next_video = 0, next_slice = 0;
    std::vector<Segment> out;
    size_t i = 0;
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
        const auto all = fixture_pixels(k, size_t(g[0]) * rows, kPatchDim);
        const size_t slice = image ? 0 : next_slice;
        s.pixels.assign(all.begin() + slice * rows * kPatchDim, all.begin() + (slice + 1) * rows * kPatchDim);
        if (!image && ++next_slice == g[0]) {
            next_slice = 0;
            ++next_video;
        }
        out.push_back(std::move(s));
    }
    return out;
}

VlReference parse(const std::string& fixture) {
    const auto j = read_json(vl_fixture_dir(fixture) + "/reference.json");
    const int32_t image_pad = j.at("special_ids").at("image_pad"), video_pad = j.at("special_ids").at("video_pad");
    VlReference r;
    for (const auto& p : j.at("prompts")) {
        Prompt q;
        q.name = p.at("name");
        q.ids = p.at("input_ids").get<std::vector<int32_t>>();
        for (const auto& row : p.at("position_ids"))
            for (const auto& v : row) q.positions.push_back(v.get<int32_t>());
        q.rope_delta = p.at("rope_delta");
        q.last_logits = p.at("last_logits").get<std::vector<float>>();
        q.greedy.tokens = p.at("greedy").at("tokens").get<std::vector<int32_t>>();
        q.greedy.margins = p.at("greedy").at("margins").get<std::vector<double>>();
        q.segments = segments_of(p, j.at("vision_inputs"), image_pad, video_pad);
        r.prompts.push_back(std::move(q));
    }
    if (j.contains("emulated"))
        for (size_t i = 0; i < j.at("emulated").size(); ++i) {
            const auto& e = j.at("emulated")[i];
            Prompt q = r.prompts.at(i);
            q.last_logits = e.at("last_logits").get<std::vector<float>>();
            q.greedy.tokens = e.at("greedy").at("tokens").get<std::vector<int32_t>>();
            q.greedy.margins = e.at("greedy").at("margins").get<std::vector<double>>();
            r.emulated.push_back(std::move(q));
        }
    return r;
}

void load(const std::string& dir, ModelHandle& h, uint32_t context = 256) {
    q3n_model_options o;
    q3n_model_options_init(&o, sizeof o);
    o.device = Q3N_DEVICE_CPU;
    o.context_length = context;
    ASSERT_EQ(q3n_model_load(dir.c_str(), &o, &h.m), Q3N_OK) << q3n_last_error();
}

q3n_status append_segment(q3n_sequence* s, const Prompt& p, const Segment& g) {
    if (!g.vision) return q3n_sequence_append(s, p.ids.data() + g.begin, g.end - g.begin);
    return q3n_sequence_append_vision(s, g.kind, g.t, g.h, g.w, g.pixels.data(), g.pixels.size());
}

void append_prompt(q3n_sequence* s, const Prompt& p) {
    for (const auto& g : p.segments) ASSERT_EQ(append_segment(s, p, g), Q3N_OK) << p.name << ": " << q3n_last_error();
}

std::vector<int32_t> positions_of(q3n_sequence* s) {
    size_t n = 0;
    q3n_sequence_get_rope_positions(s, nullptr, 0, &n);
    std::vector<int32_t> out(n);
    EXPECT_EQ(q3n_sequence_get_rope_positions(s, out.data(), out.size(), &n), Q3N_OK) << q3n_last_error();
    return out;
}

size_t length_of(q3n_sequence* s) {
    size_t n = 0;
    EXPECT_EQ(q3n_sequence_length(s, &n), Q3N_OK);
    return n;
}

std::vector<float> prompt_logits(q3n_model* m, const Prompt& p, size_t vocab) {
    SequenceHandle s;
    EXPECT_EQ(q3n_sequence_create(m, &s.s), Q3N_OK);
    append_prompt(s.s, p);
    EXPECT_EQ(q3n_model_step(m, &s.s, 1, 0), Q3N_OK) << q3n_last_error();
    return logits_of(s.s, vocab);
}

bool is_vision_id(int32_t t) { return t >= 248 && t <= 251; }

const std::vector<std::string> kFixtures = {"bf16_dense_tied", "bf16_moe", "fp8_dense"};

class VlFixture : public ::testing::TestWithParam<std::string> {
protected:
    void SetUp() override {
        dir_ = vl_fixture_dir(GetParam());
        if (!std::filesystem::exists(dir_ + "/reference.json"))
            GTEST_SKIP() << dir_ << " is missing: run tests/fixtures/make_vl_fixtures.py with transformers 5.17";
        ref_ = parse(GetParam());
        load(dir_, model_);
        info_.struct_size = sizeof info_;
        ASSERT_EQ(q3n_model_get_info(model_.m, &info_), Q3N_OK);
        fp8_ = GetParam().rfind("fp8", 0) == 0;
    }

    std::string dir_;
    VlReference ref_;
    ModelHandle model_;
    q3n_model_info info_{};
    bool fp8_ = false;
};

TEST_P(VlFixture, PositionsLogitsAndGreedyMatchTransformers) {
    const size_t V = info_.vocab_size;
    EXPECT_EQ(info_.weight_dtype, fp8_ ? Q3N_DTYPE_FP8_E4M3 : Q3N_DTYPE_BF16);
    double worst = 0;
    size_t tight = 0;
    const std::vector<Prompt>& logit_refs = fp8_ ? ref_.emulated : ref_.prompts;
    ASSERT_EQ(logit_refs.size(), ref_.prompts.size());
    for (size_t i = 0; i < ref_.prompts.size(); ++i) {
        const Prompt& p = ref_.prompts[i];
        SequenceHandle s;
        ASSERT_EQ(q3n_sequence_create(model_.m, &s.s), Q3N_OK);
        append_prompt(s.s, p);
        // get_rope_index's positions, exactly, before anything runs.
        EXPECT_EQ(positions_of(s.s), p.positions) << p.name;
        ASSERT_EQ(q3n_model_step(model_.m, &s.s, 1, 0), Q3N_OK) << q3n_last_error();
        const auto logits = logits_of(s.s, V);
        const double plain = relative_l2(logits, p.last_logits);
        const double rel = relative_l2(logits, logit_refs[i].last_logits);
        worst = std::max(worst, max_abs_diff(logits, logit_refs[i].last_logits));
        if (fp8_) {
            EXPECT_LT(plain, 0.3) << p.name << " against the plain reference";
            EXPECT_LT(rel, 0.1) << p.name << " against the emulation";
            tight += rel < 2e-3;
        } else {
            EXPECT_LT(rel, 1e-4) << p.name << ": relative L2 " << rel;
        }
        std::printf("[ %s/%s ] logits relative L2 %.3g (max abs %.3g)%s\n", GetParam().c_str(), p.name.c_str(), rel,
                    max_abs_diff(logits, logit_refs[i].last_logits), fp8_ ? " against the emulation" : "");
        ::testing::Test::RecordProperty(GetParam() + "_" + p.name + "_rel_l2", std::to_string(rel));

        // A decode token after the prompt sits at index + rope_delta on all three axes.
        const int32_t next = 7;
        ASSERT_EQ(q3n_sequence_append(s.s, &next, 1), Q3N_OK);
        const auto pos = positions_of(s.s);
        const size_t n = p.ids.size() + 1;
        for (size_t a = 0; a < 3; ++a) EXPECT_EQ(pos[a * n + n - 1], int64_t(n - 1) + p.rope_delta) << p.name;
    }
    if (fp8_) EXPECT_GE(tight * 2, ref_.prompts.size()) << "too many prompts differ from the emulation by more than 2e-3";

    for (const Prompt& p : logit_refs) {
        SequenceHandle s;
        ASSERT_EQ(q3n_sequence_create(model_.m, &s.s), Q3N_OK);
        append_prompt(s.s, p);
        size_t checked = 0, agree = 0;
        if (!fp8_) {
            while (checked < p.greedy.margins.size() && p.greedy.margins[checked] > 8 * worst) ++checked;
            for (size_t k = 0; k < checked; ++k) {
                ASSERT_EQ(q3n_model_step(model_.m, &s.s, 1, Q3N_STEP_SAMPLE), Q3N_OK) << q3n_last_error();
                int32_t t = -1;
                q3n_sequence_last_token(s.s, &t);
                ASSERT_EQ(t, p.greedy.tokens[k]) << p.name << ": greedy token " << k << " (margin " << p.greedy.margins[k] << ")";
            }
            agree = checked;
        } else {
            // Teacher-forced: one e4m3 flip cannot derail later steps.
            for (size_t k = 0; k < p.greedy.tokens.size(); ++k) {
                ASSERT_EQ(q3n_model_step(model_.m, &s.s, 1, 0), Q3N_OK) << q3n_last_error();
                const auto l = logits_of(s.s, V);
                const auto argmax = static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin());
                agree += argmax == p.greedy.tokens[k];
                if (p.greedy.margins[k] > 0.5) {
                    ++checked;
                    EXPECT_EQ(argmax, p.greedy.tokens[k]) << p.name << ": step " << k << " (margin " << p.greedy.margins[k] << ")";
                }
                if (k + 1 < p.greedy.tokens.size()) ASSERT_EQ(q3n_sequence_append(s.s, &p.greedy.tokens[k], 1), Q3N_OK);
            }
        }
        std::printf("[ %s/%s ] greedy: %zu of %zu steps compared%s, %zu equal\n", GetParam().c_str(), p.name.c_str(),
                    checked, p.greedy.tokens.size(), fp8_ ? " (teacher-forced, margin > 0.5)" : " (free-running)", agree);
    }
}

// The prompt plus its greedy tokens in one prefill equals the prompt then one decode step per token.
TEST_P(VlFixture, DecodeAfterPrefillEqualsLongerPrefill) {
    const size_t V = info_.vocab_size;
    for (const Prompt& p : ref_.prompts) {
        std::vector<int32_t> tail;
        for (int32_t t : p.greedy.tokens)
            if (!is_vision_id(t)) tail.push_back(t);
        SequenceHandle a, b;
        ASSERT_EQ(q3n_sequence_create(model_.m, &a.s), Q3N_OK);
        append_prompt(a.s, p);
        ASSERT_EQ(q3n_sequence_append(a.s, tail.data(), tail.size()), Q3N_OK);
        ASSERT_EQ(q3n_model_step(model_.m, &a.s, 1, 0), Q3N_OK) << q3n_last_error();
        ASSERT_EQ(q3n_sequence_create(model_.m, &b.s), Q3N_OK);
        append_prompt(b.s, p);
        ASSERT_EQ(q3n_model_step(model_.m, &b.s, 1, 0), Q3N_OK);
        for (int32_t t : tail) {
            ASSERT_EQ(q3n_sequence_append(b.s, &t, 1), Q3N_OK);
            ASSERT_EQ(q3n_model_step(model_.m, &b.s, 1, 0), Q3N_OK) << q3n_last_error();
        }
        EXPECT_EQ(positions_of(a.s), positions_of(b.s)) << p.name;
        EXPECT_LT(relative_l2(logits_of(b.s, V), logits_of(a.s, V)), 1e-5) << p.name;
    }
}

// Steps of a few tokens cut images and video slices in pieces: the tower runs once per item and
// its rows are handed out across steps, giving the logits of one whole prefill.
TEST_P(VlFixture, ChunkedPrefillSplittingImagesEqualsWholePrefill) {
    const size_t V = info_.vocab_size;
    for (const Prompt& p : ref_.prompts) {
        const auto whole = prompt_logits(model_.m, p, V);
        for (size_t chunk : {3u, 5u}) {
            SequenceHandle s;
            ASSERT_EQ(q3n_sequence_create(model_.m, &s.s), Q3N_OK);
            append_prompt(s.s, p);
            size_t cached = 0, steps = 0;
            while (cached < p.ids.size()) {
                // Sampling is refused while a step leaves tokens queued.
                if (cached + chunk < p.ids.size())
                    EXPECT_EQ(q3n_model_step_limited(model_.m, &s.s, 1, Q3N_STEP_SAMPLE, chunk), Q3N_ERR_INVALID_ARGUMENT);
                ASSERT_EQ(q3n_model_step_limited(model_.m, &s.s, 1, 0, chunk), Q3N_OK) << q3n_last_error();
                ASSERT_EQ(q3n_sequence_cached_length(s.s, &cached), Q3N_OK);
                ++steps;
            }
            EXPECT_EQ(steps, (p.ids.size() + chunk - 1) / chunk);
            EXPECT_LT(relative_l2(logits_of(s.s, V), whole), 1e-5) << p.name << " in chunks of " << chunk;
        }
    }
}

// Truncating into an image drops the whole image; appending it again gives the first logits.
TEST_P(VlFixture, TruncateIntoImageThenReappend) {
    const size_t V = info_.vocab_size;
    for (const Prompt& p : ref_.prompts) {
        const auto whole = prompt_logits(model_.m, p, V);
        SequenceHandle s;
        ASSERT_EQ(q3n_sequence_create(model_.m, &s.s), Q3N_OK);
        append_prompt(s.s, p);
        ASSERT_EQ(q3n_model_step(model_.m, &s.s, 1, 0), Q3N_OK);
        // The last vision item, cut two placeholders in.
        size_t last = p.segments.size();
        for (size_t g = 0; g < p.segments.size(); ++g)
            if (p.segments[g].vision) last = g;
        ASSERT_LT(last, p.segments.size());
        const Segment& item = p.segments[last];
        ASSERT_EQ(q3n_sequence_truncate(s.s, item.begin + 2), Q3N_OK) << q3n_last_error();
        EXPECT_EQ(length_of(s.s), item.begin) << p.name << ": the cut image must go as a whole";
        auto pos = positions_of(s.s);
        std::vector<int32_t> want;
        for (size_t a = 0; a < 3; ++a)
            want.insert(want.end(), p.positions.begin() + a * p.ids.size(), p.positions.begin() + a * p.ids.size() + item.begin);
        EXPECT_EQ(pos, want) << p.name;
        for (size_t g = last; g < p.segments.size(); ++g) ASSERT_EQ(append_segment(s.s, p, p.segments[g]), Q3N_OK);
        EXPECT_EQ(positions_of(s.s), p.positions) << p.name;
        ASSERT_EQ(q3n_model_step(model_.m, &s.s, 1, 0), Q3N_OK) << q3n_last_error();
        EXPECT_LT(relative_l2(logits_of(s.s, V), whole), 1e-5) << p.name;
    }
}

// A video appended as one grid_t = 2 item equals its two slices appended one after the other.
TEST_P(VlFixture, VideoAsOneItemEqualsItsSlices) {
    const size_t V = info_.vocab_size;
    const auto j = read_json(dir_ + "/reference.json");
    const auto& inputs = j.at("vision_inputs");
    int k = -1;
    for (size_t i = 0; i < inputs.size(); ++i)
        if (inputs[i].at("kind") == "video") k = static_cast<int>(i);
    ASSERT_GE(k, 0);
    const auto g = inputs.at(k).at("grid_thw").get<std::vector<uint32_t>>();
    ASSERT_GT(g[0], 1u);
    const size_t rows = size_t(g[1]) * g[2];
    const auto px = fixture_pixels(k, g[0] * rows, kPatchDim);
    const std::vector<int32_t> before = {5, 248}, after = {249, 17, 33};

    SequenceHandle one, slices;
    ASSERT_EQ(q3n_sequence_create(model_.m, &one.s), Q3N_OK);
    ASSERT_EQ(q3n_sequence_append(one.s, before.data(), before.size()), Q3N_OK);
    ASSERT_EQ(q3n_sequence_append_vision(one.s, Q3N_VISION_VIDEO, g[0], g[1], g[2], px.data(), px.size()), Q3N_OK)
        << q3n_last_error();
    ASSERT_EQ(q3n_sequence_append(one.s, after.data(), after.size()), Q3N_OK);
    ASSERT_EQ(q3n_sequence_create(model_.m, &slices.s), Q3N_OK);
    ASSERT_EQ(q3n_sequence_append(slices.s, before.data(), before.size()), Q3N_OK);
    for (uint32_t t = 0; t < g[0]; ++t)
        ASSERT_EQ(q3n_sequence_append_vision(slices.s, Q3N_VISION_VIDEO, 1, g[1], g[2], px.data() + t * rows * kPatchDim,
                                             rows * kPatchDim),
                  Q3N_OK);
    ASSERT_EQ(q3n_sequence_append(slices.s, after.data(), after.size()), Q3N_OK);
    const auto pos = positions_of(one.s);
    EXPECT_EQ(pos, positions_of(slices.s));
    // Each slice restarts t at its first position and the next begins max(h, w) / merge later.
    const size_t n = pos.size() / 3, hh = g[1] / kMerge, ww = g[2] / kMerge;
    EXPECT_EQ(pos[2], 2);
    EXPECT_EQ(pos[2 + hh * ww], int32_t(2 + std::max(hh, ww)));
    EXPECT_EQ(pos[n - 1], int32_t(2 + g[0] * std::max(hh, ww) + after.size() - 1));
    ASSERT_EQ(q3n_model_step(model_.m, &one.s, 1, 0), Q3N_OK) << q3n_last_error();
    ASSERT_EQ(q3n_model_step(model_.m, &slices.s, 1, 0), Q3N_OK) << q3n_last_error();
    EXPECT_LT(relative_l2(logits_of(one.s, V), logits_of(slices.s, V)), 1e-5);
}

// Every tensor of the checkpoint is used once: the reported parameters are the file's elements
// (FP8 scales are not parameters).
TEST_P(VlFixture, ParameterCountIsTheCheckpoints) {
    uint64_t elements = 0;
    for (const auto& [name, t] : read_safetensors(dir_ + "/model.safetensors")) {
        if (name.size() > 16 && name.compare(name.size() - 16, 16, "weight_scale_inv") == 0) continue;
        uint64_t n = 1;
        for (int64_t d : t.shape) n *= uint64_t(d);
        elements += n;
    }
    EXPECT_EQ(info_.parameter_count, elements);
}

INSTANTIATE_TEST_SUITE_P(Transformers, VlFixture, ::testing::ValuesIn(kFixtures),
                         [](const auto& info) { return info.param; });

TEST(VlModel, InfoReportsVisionAndTheMoeTextModel) {
    for (const auto& name : kFixtures) {
        if (!std::filesystem::exists(vl_fixture_dir(name) + "/config.json")) GTEST_SKIP() << "VL fixtures missing";
        ModelHandle h;
        load(vl_fixture_dir(name), h);
        q3n_model_info info{};
        info.struct_size = sizeof info;
        ASSERT_EQ(q3n_model_get_info(h.m, &info), Q3N_OK);
        EXPECT_EQ(info.has_vision, 1u);
        EXPECT_EQ(info.patch_size, 16u);
        EXPECT_EQ(info.temporal_patch_size, 2u);
        EXPECT_EQ(info.spatial_merge_size, 2u);
        EXPECT_EQ(info.image_token_id, 250);
        EXPECT_EQ(info.video_token_id, 251);
        EXPECT_EQ(info.vision_start_token_id, 248);
        EXPECT_EQ(info.vision_end_token_id, 249);
        EXPECT_EQ(info.hidden_size, 128u);  // text_config's, not vision_config's
        EXPECT_EQ(info.vocab_size, 256u);
        EXPECT_STREQ(info.architecture, name == "bf16_moe" ? "Qwen3VLMoeForConditionalGeneration"
                                                           : "Qwen3VLForConditionalGeneration");
        // A caller built before the vision fields: nothing is written past its struct.
        q3n_model_info old{};
        std::memset(&old, 0x5a, sizeof old);
        old.struct_size = static_cast<uint32_t>(offsetof(q3n_model_info, has_vision));
        ASSERT_EQ(q3n_model_get_info(h.m, &old), Q3N_OK);
        EXPECT_EQ(old.has_vision, 0x5a5a5a5au);
        EXPECT_EQ(old.vocab_size, 256u);
    }
}

TEST(VlModel, BadVisionInputsAreTypedErrorsAndQueueNothing) {
    const std::string dir = vl_fixture_dir("bf16_dense_tied");
    if (!std::filesystem::exists(dir + "/config.json")) GTEST_SKIP() << "VL fixtures missing";
    ModelHandle h;
    load(dir, h, 20);
    SequenceHandle s;
    ASSERT_EQ(q3n_sequence_create(h.m, &s.s), Q3N_OK);
    const std::vector<int32_t> text = {1, 2, 248};
    ASSERT_EQ(q3n_sequence_append(s.s, text.data(), text.size()), Q3N_OK);
    auto px = fixture_pixels(0, 4 * 6, kPatchDim);  // a 4x6 grid: 6 placeholders

    EXPECT_EQ(q3n_sequence_append_vision(s.s, Q3N_VISION_IMAGE, 1, 4, 6, px.data(), px.size() - 1),
              Q3N_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(q3n_last_error()).find("value_count"), std::string::npos) << q3n_last_error();
    EXPECT_EQ(q3n_sequence_append_vision(s.s, Q3N_VISION_IMAGE, 1, 3, 8, px.data(), px.size()), Q3N_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(q3n_sequence_append_vision(s.s, Q3N_VISION_IMAGE, 1, 4, 5, px.data(), 20 * kPatchDim),
              Q3N_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(q3n_sequence_append_vision(s.s, Q3N_VISION_IMAGE, 0, 4, 6, px.data(), 0), Q3N_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(q3n_sequence_append_vision(s.s, Q3N_VISION_IMAGE, 2, 2, 6, px.data(), px.size()), Q3N_ERR_INVALID_ARGUMENT)
        << "an image has one temporal patch";
    EXPECT_EQ(q3n_sequence_append_vision(s.s, static_cast<q3n_vision_kind>(7), 1, 4, 6, px.data(), px.size()),
              Q3N_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(q3n_sequence_append_vision(s.s, Q3N_VISION_IMAGE, 1, 4, 6, nullptr, px.size()), Q3N_ERR_INVALID_ARGUMENT);
    px[1000] = std::numeric_limits<float>::quiet_NaN();
    EXPECT_EQ(q3n_sequence_append_vision(s.s, Q3N_VISION_IMAGE, 1, 4, 6, px.data(), px.size()), Q3N_ERR_INVALID_ARGUMENT);
    px[1000] = std::numeric_limits<float>::infinity();
    EXPECT_EQ(q3n_sequence_append_vision(s.s, Q3N_VISION_IMAGE, 1, 4, 6, px.data(), px.size()), Q3N_ERR_INVALID_ARGUMENT);
    px[1000] = 0.5f;
    // Raw placeholders would have no pixels behind them.
    const int32_t image_pad = 250, video_pad = 251;
    EXPECT_EQ(q3n_sequence_append(s.s, &image_pad, 1), Q3N_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(q3n_sequence_append(s.s, &video_pad, 1), Q3N_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(length_of(s.s), text.size()) << "a refused call must queue nothing";
    EXPECT_EQ(positions_of(s.s).size(), 3 * text.size());

    // 3 + 6 fit a context of 20; a 10x6 image's 15 more do not.
    EXPECT_EQ(q3n_sequence_append_vision(s.s, Q3N_VISION_IMAGE, 1, 4, 6, px.data(), px.size()), Q3N_OK) << q3n_last_error();
    const auto big = fixture_pixels(1, 10 * 6, kPatchDim);
    EXPECT_EQ(q3n_sequence_append_vision(s.s, Q3N_VISION_IMAGE, 1, 10, 6, big.data(), big.size()), Q3N_ERR_CONTEXT_OVERFLOW);
    EXPECT_EQ(length_of(s.s), text.size() + 6);
    // The queued image still runs: the refused calls left the sequence usable.
    const int32_t end = 249;
    ASSERT_EQ(q3n_sequence_append(s.s, &end, 1), Q3N_OK);
    EXPECT_EQ(q3n_model_step(h.m, &s.s, 1, 0), Q3N_OK) << q3n_last_error();
    EXPECT_EQ(q3n_sequence_append_vision(nullptr, Q3N_VISION_IMAGE, 1, 4, 6, px.data(), px.size()), Q3N_ERR_INVALID_ARGUMENT);
}

TEST(VlModel, TextOnlyModelRefusesVision) {
    const std::string dir = fixture_dir("bf16_tied");
    if (!std::filesystem::exists(dir + "/config.json")) GTEST_SKIP() << "text fixtures missing";
    ModelHandle h;
    load(dir, h, 128);
    q3n_model_info info{};
    info.struct_size = sizeof info;
    ASSERT_EQ(q3n_model_get_info(h.m, &info), Q3N_OK);
    EXPECT_EQ(info.has_vision, 0u);
    EXPECT_EQ(info.spatial_merge_size, 0u);
    EXPECT_EQ(info.image_token_id, -1);
    EXPECT_EQ(info.vision_start_token_id, -1);
    SequenceHandle s;
    ASSERT_EQ(q3n_sequence_create(h.m, &s.s), Q3N_OK);
    const auto px = fixture_pixels(0, 4 * 6, kPatchDim);
    EXPECT_EQ(q3n_sequence_append_vision(s.s, Q3N_VISION_IMAGE, 1, 4, 6, px.data(), px.size()), Q3N_ERR_UNSUPPORTED);
    EXPECT_EQ(length_of(s.s), 0u);
    // Text models keep one position per token: all three rows are the index.
    const std::vector<int32_t> t = {3, 4, 5};
    ASSERT_EQ(q3n_sequence_append(s.s, t.data(), t.size()), Q3N_OK);
    EXPECT_EQ(positions_of(s.s), (std::vector<int32_t>{0, 1, 2, 0, 1, 2, 0, 1, 2}));
}

// The dummy load format makes the tower and the text model from config.json alone (both spellings of
// the rotary settings: the dense fixture's rope_scaling, the MoE one's rope_parameters).
TEST(VlModel, DummyWeightsRunAnImage) {
    for (const char* name : {"bf16_dense_tied", "bf16_moe"}) {
        const std::string dir = vl_fixture_dir(name);
        if (!std::filesystem::exists(dir + "/config.json")) GTEST_SKIP() << "VL fixtures missing";
        q3n_model_options o;
        q3n_model_options_init(&o, sizeof o);
        o.device = Q3N_DEVICE_CPU;
        o.context_length = 64;
        o.load_format = Q3N_LOAD_DUMMY;
        ModelHandle h;
        ASSERT_EQ(q3n_model_load(dir.c_str(), &o, &h.m), Q3N_OK) << q3n_last_error();
        SequenceHandle s;
        ASSERT_EQ(q3n_sequence_create(h.m, &s.s), Q3N_OK);
        const std::vector<int32_t> start = {3, 248}, end = {249, 9};
        const auto px = fixture_pixels(0, 4 * 6, kPatchDim);
        ASSERT_EQ(q3n_sequence_append(s.s, start.data(), start.size()), Q3N_OK);
        ASSERT_EQ(q3n_sequence_append_vision(s.s, Q3N_VISION_IMAGE, 1, 4, 6, px.data(), px.size()), Q3N_OK);
        ASSERT_EQ(q3n_sequence_append(s.s, end.data(), end.size()), Q3N_OK);
        ASSERT_EQ(q3n_model_step(h.m, &s.s, 1, Q3N_STEP_SAMPLE), Q3N_OK) << name << ": " << q3n_last_error();
    }
}

// Config errors name the field; settings this engine does not implement are UNSUPPORTED.
TEST(VlModel, ConfigMropeErrors) {
    const std::string src = vl_fixture_dir("bf16_dense_tied");
    if (!std::filesystem::exists(src + "/config.json")) GTEST_SKIP() << "VL fixtures missing";
    const auto base = read_json(src + "/config.json");
    auto try_load = [](const nlohmann::json& cfg, const std::string& tag) {
        const std::string dir = temp_dir("vl_config_" + tag);
        write_text(dir + "/config.json", cfg.dump());
        q3n_model_options o;
        q3n_model_options_init(&o, sizeof o);
        o.device = Q3N_DEVICE_CPU;
        o.context_length = 64;
        o.load_format = Q3N_LOAD_DUMMY;
        ModelHandle h;
        return q3n_model_load(dir.c_str(), &o, &h.m);
    };
    EXPECT_EQ(try_load(base, "ok"), Q3N_OK) << q3n_last_error();
    auto contiguous = base;
    contiguous["text_config"]["rope_scaling"]["mrope_interleaved"] = false;
    EXPECT_EQ(try_load(contiguous, "contiguous"), Q3N_ERR_UNSUPPORTED);
    auto wrong_sum = base;
    wrong_sum["text_config"]["rope_scaling"]["mrope_section"] = {6, 5, 4};
    EXPECT_EQ(try_load(wrong_sum, "sum"), Q3N_ERR_BAD_CONFIG);
    EXPECT_NE(std::string(q3n_last_error()).find("mrope_section"), std::string::npos) << q3n_last_error();
    auto too_wide = base;
    too_wide["text_config"]["rope_scaling"]["mrope_section"] = {2, 7, 7};  // h needs slots up to 19 of 16
    EXPECT_EQ(try_load(too_wide, "wide"), Q3N_ERR_BAD_CONFIG);
    auto no_section = base;
    no_section["text_config"]["rope_scaling"].erase("mrope_section");
    EXPECT_EQ(try_load(no_section, "missing"), Q3N_ERR_BAD_CONFIG);
    auto bad_width = base;
    bad_width["vision_config"]["out_hidden_size"] = 64;
    EXPECT_EQ(try_load(bad_width, "width"), Q3N_ERR_BAD_CONFIG);
    auto bad_id = base;
    bad_id["image_token_id"] = 300;
    EXPECT_EQ(try_load(bad_id, "id"), Q3N_ERR_BAD_CONFIG);
}

}  // namespace
