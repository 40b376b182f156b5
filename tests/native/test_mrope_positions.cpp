// Qwen3-VL MRoPE positions (shared/spec 4.4, transformers 5.17 get_rope_index): hand-computed cases,
// the placeholder/grid mismatches it must refuse, and the transformers references of the tiny VL
// fixtures (tests/fixtures/qwen3_vl/*/reference.json; skipped until make_vl_fixtures.py has run).
#include <gtest/gtest.h>

#include <filesystem>
#include <vector>

#include "core/error.h"
#include "fixture_util.h"
#include "model/mrope_positions.h"

using namespace q3n;

namespace {

constexpr int32_t VS = 248, VE = 249, IMG = 250, VID = 251;
const char* kVlFixtures[] = {"bf16_dense_tied", "bf16_moe", "fp8_dense"};

std::string vl_dir(const std::string& name) { return std::string(Q3N_FIXTURE_DIR) + "/qwen3_vl/" + name; }

}  // namespace

TEST(Mrope, TextOnlyCountsFromZeroOnAllAxes) {
    const std::vector<int32_t> ids = {5, 9, 1, 200, 7};
    const auto p = mrope_positions(ids.data(), ids.size(), {}, {}, IMG, VID, 2);
    const std::vector<int32_t> want = {0, 1, 2, 3, 4};
    EXPECT_EQ(p.t, want);
    EXPECT_EQ(p.h, want);
    EXPECT_EQ(p.w, want);
    EXPECT_EQ(p.rope_delta, 0);
    EXPECT_EQ(mrope_decode_position(5, p.rope_delta), 5);
}

TEST(Mrope, OneImageSpansItsGridThenTextResumesAfterIt) {
    // Grid 1x4x6 patches = 2x3 merged tokens, starting at position 3.
    std::vector<int32_t> ids = {10, 11, VS};
    for (int i = 0; i < 6; ++i) ids.push_back(IMG);
    ids.insert(ids.end(), {VE, 12});
    const auto p = mrope_positions(ids.data(), ids.size(), {{1, 4, 6}}, {}, IMG, VID, 2);
    EXPECT_EQ(p.t, (std::vector<int32_t>{0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7}));
    EXPECT_EQ(p.h, (std::vector<int32_t>{0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7}));
    EXPECT_EQ(p.w, (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7}));
    EXPECT_EQ(p.rope_delta, 8 - 11);
    EXPECT_EQ(mrope_decode_position(11, p.rope_delta), 8);
}

TEST(Mrope, ImageThenTextThenVideoWithTimestamps) {
    // Image 1x4x4 -> 2x2 tokens; video 2x2x4 -> two slices of 1x2 tokens, each after its timestamp
    // text (here one token, TS) and inside its own vision_start/end.
    constexpr int32_t A = 20, TS = 30, C = 40;
    const std::vector<int32_t> ids = {VS, IMG, IMG, IMG, IMG, VE, A,  TS, VS, VID, VID, VE, TS, VS, VID, VID, VE, C};
    const auto p = mrope_positions(ids.data(), ids.size(), {{1, 4, 4}}, {{2, 2, 4}}, IMG, VID, 2);
    EXPECT_EQ(p.t, (std::vector<int32_t>{0, 1, 1, 1, 1, 3, 4, 5, 6, 7, 7, 9, 10, 11, 12, 12, 14, 15}));
    EXPECT_EQ(p.h, (std::vector<int32_t>{0, 1, 1, 2, 2, 3, 4, 5, 6, 7, 7, 9, 10, 11, 12, 12, 14, 15}));
    EXPECT_EQ(p.w, (std::vector<int32_t>{0, 1, 2, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}));
    EXPECT_EQ(p.rope_delta, 16 - 18);
}

TEST(Mrope, RefusesPlaceholdersThatDoNotMatchTheGrids) {
    std::vector<int32_t> ids = {VS, IMG, IMG, IMG, VE};  // 3 pads, the grid says 4
    EXPECT_THROW(mrope_positions(ids.data(), ids.size(), {{1, 4, 4}}, {}, IMG, VID, 2), Error);
    ids = {VS, IMG, VE};  // no grid at all
    EXPECT_THROW(mrope_positions(ids.data(), ids.size(), {}, {}, IMG, VID, 2), Error);
    ids = {1, 2, 3};  // a grid without placeholders
    EXPECT_THROW(mrope_positions(ids.data(), ids.size(), {{1, 2, 2}}, {}, IMG, VID, 2), Error);
    ids = {VS, VID, VE};  // a two-slice video with one slice in the prompt
    EXPECT_THROW(mrope_positions(ids.data(), ids.size(), {}, {{2, 2, 2}}, IMG, VID, 2), Error);
}

TEST(Mrope, MatchesTransformersGetRopeIndexOnVlFixtures) {
    size_t checked = 0;
    for (const char* name : kVlFixtures) {
        const std::string path = vl_dir(name) + "/reference.json";
        if (!std::filesystem::exists(path)) continue;
        const auto ref = q3n_test::read_json(path);
        const auto& ids_json = ref.at("special_ids");
        const int32_t img = ids_json.at("image_pad"), vid = ids_json.at("video_pad");
        const auto& inputs = ref.at("vision_inputs");
        auto grid_of = [&](int k) {
            const auto g = inputs.at(k).at("grid_thw").get<std::vector<uint32_t>>();
            return GridThw{g[0], g[1], g[2]};
        };
        for (const auto& pr : ref.at("prompts")) {
            const auto ids = pr.at("input_ids").get<std::vector<int32_t>>();
            std::vector<GridThw> images, videos;
            for (int k : pr.at("images")) images.push_back(grid_of(k));
            for (int k : pr.at("videos")) videos.push_back(grid_of(k));
            const auto p = mrope_positions(ids.data(), ids.size(), images, videos, img, vid, 2);
            const auto want = pr.at("position_ids").get<std::vector<std::vector<int32_t>>>();
            const std::string where = std::string(name) + "/" + pr.at("name").get<std::string>();
            EXPECT_EQ(p.t, want.at(0)) << where;
            EXPECT_EQ(p.h, want.at(1)) << where;
            EXPECT_EQ(p.w, want.at(2)) << where;
            EXPECT_EQ(p.rope_delta, pr.at("rope_delta").get<int64_t>()) << where;
            ++checked;
        }
    }
    if (checked == 0)
        GTEST_SKIP() << "no tests/fixtures/qwen3_vl/*/reference.json yet: run tests/fixtures/make_vl_fixtures.py "
                        "(build/device/make_fixtures.sh vl) on a machine with transformers 5.17";
}
