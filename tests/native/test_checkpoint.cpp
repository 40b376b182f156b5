// Checkpoint directories: single files, sharded indexes and every way an index can lie.
#include <gtest/gtest.h>

#include <stdlib.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/checkpoint.h"

namespace {

namespace fs = std::filesystem;
using Bytes = std::vector<uint8_t>;

class ScratchDir {
public:
    ScratchDir() {
        std::string pattern = (fs::path(testing::TempDir()) / "q3n_ckpt_XXXXXX").string();
        if (mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
        path_ = pattern;
    }
    ~ScratchDir() {
        std::error_code ec;
        fs::remove_all(path_, ec);
    }
    const fs::path& path() const { return path_; }
    std::string str() const { return path_.string(); }

private:
    fs::path path_;
};

void write_file(const fs::path& path, const std::string& text) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << text;
    if (!out) throw std::runtime_error("cannot write " + path.string());
}

void write_file(const fs::path& path, const Bytes& bytes) {
    write_file(path, std::string(bytes.begin(), bytes.end()));
}

struct Spec {
    std::string name;
    std::string dtype;
    std::vector<uint64_t> shape;
    Bytes bytes;
};

// A well-formed safetensors image (the format's own tests live in test_safetensors.cpp).
Bytes build_file(const std::vector<Spec>& specs) {
    std::string header = "{\"__metadata__\":{\"format\":\"pt\"}";
    Bytes data;
    for (const auto& s : specs) {
        header += ",\"" + s.name + "\":{\"dtype\":\"" + s.dtype + "\",\"shape\":[";
        for (size_t i = 0; i < s.shape.size(); ++i) header += (i ? "," : "") + std::to_string(s.shape[i]);
        header += "],\"data_offsets\":[" + std::to_string(data.size()) + "," +
                  std::to_string(data.size() + s.bytes.size()) + "]}";
        data.insert(data.end(), s.bytes.begin(), s.bytes.end());
    }
    header += "}";
    while (header.size() % 8) header += ' ';
    Bytes out;
    for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(uint64_t{header.size()} >> (8 * i)));
    out.insert(out.end(), header.begin(), header.end());
    out.insert(out.end(), data.begin(), data.end());
    return out;
}

Spec u8_tensor(const std::string& name, size_t n, uint8_t fill) { return {name, "U8", {n}, Bytes(n, fill)}; }

std::string index_json(const std::vector<std::pair<std::string, std::string>>& weight_map) {
    std::string s = "{\"metadata\":{\"total_size\":0},\"weight_map\":{";
    for (size_t i = 0; i < weight_map.size(); ++i)
        s += (i ? ",\"" : "\"") + weight_map[i].first + "\":\"" + weight_map[i].second + "\"";
    return s + "}}";
}

// Two shards, "a" and "b" in the first, "c" in the second; the index lists them.
void write_good_sharded(const fs::path& dir) {
    write_file(dir / "model-1.safetensors", build_file({u8_tensor("a", 4, 0xA1), u8_tensor("b", 2, 0xB2)}));
    write_file(dir / "model-2.safetensors", build_file({u8_tensor("c", 3, 0xC3)}));
    write_file(dir / "model.safetensors.index.json",
               index_json({{"a", "model-1.safetensors"}, {"b", "model-1.safetensors"}, {"c", "model-2.safetensors"}}));
}

struct Outcome {
    q3n_status status = Q3N_OK;
    std::string message;
};

Outcome open_dir(const std::string& dir) {
    try {
        q3n::Checkpoint::open(dir);
        return {};
    } catch (const q3n::Error& e) {
        return {e.status(), e.what()};
    }
}

bool contains(const std::string& haystack, const std::string& needle) {
    return haystack.find(needle) != std::string::npos;
}

#define EXPECT_OPEN_FAILS(dir, status_, needle)                                               \
    do {                                                                                      \
        const Outcome outcome_ = open_dir(dir);                                               \
        EXPECT_EQ(outcome_.status, status_) << outcome_.message;                              \
        EXPECT_TRUE(contains(outcome_.message, needle)) << "message: " << outcome_.message;   \
    } while (0)

const std::string kFixtures = Q3N_FIXTURE_DIR "/qwen3";

}  // namespace

TEST(Checkpoint, OpensShardedDirectory) {
    ScratchDir dir;
    write_good_sharded(dir.path());
    const auto ckpt = q3n::Checkpoint::open(dir.str());
    ASSERT_EQ(ckpt->files().size(), 2u);
    ASSERT_EQ(ckpt->tensors().size(), 3u);
    for (const char* name : {"a", "b", "c"}) EXPECT_TRUE(ckpt->has(name)) << name;

    const auto& c = ckpt->get("c");
    EXPECT_EQ(c.file, (dir.path() / "model-2.safetensors").string());
    EXPECT_EQ(c.nbytes, 3u);
    EXPECT_EQ(c.data[0], 0xC3);
    EXPECT_EQ(c.data[2], 0xC3);
    EXPECT_EQ(ckpt->get("b").data[1], 0xB2);
    EXPECT_EQ(ckpt->get("a").file, (dir.path() / "model-1.safetensors").string());
}

TEST(Checkpoint, OpensSingleFile) {
    ScratchDir dir;
    write_file(dir.path() / "model.safetensors", build_file({u8_tensor("x", 5, 7), {"y", "F32", {1}, Bytes(4, 0)}}));
    const auto ckpt = q3n::Checkpoint::open(dir.str());
    EXPECT_EQ(ckpt->files().size(), 1u);
    EXPECT_EQ(ckpt->tensors().size(), 2u);
    EXPECT_EQ(ckpt->get("y").dtype, q3n::StDtype::F32);
    EXPECT_EQ(ckpt->get("x").data[4], 7);
}

TEST(Checkpoint, IndexTakesPrecedenceOverSingleFile) {
    ScratchDir dir;
    write_good_sharded(dir.path());
    write_file(dir.path() / "model.safetensors", build_file({u8_tensor("stale", 1, 0)}));
    const auto ckpt = q3n::Checkpoint::open(dir.str());
    EXPECT_FALSE(ckpt->has("stale"));
    EXPECT_EQ(ckpt->tensors().size(), 3u);
}

TEST(Checkpoint, IncludesShardTensorsMissingFromIndex) {
    ScratchDir dir;
    write_file(dir.path() / "s1.safetensors", build_file({u8_tensor("listed", 2, 1), u8_tensor("unlisted", 2, 2)}));
    write_file(dir.path() / "model.safetensors.index.json", index_json({{"listed", "s1.safetensors"}}));
    const auto ckpt = q3n::Checkpoint::open(dir.str());
    EXPECT_TRUE(ckpt->has("unlisted"));
    EXPECT_EQ(ckpt->get("unlisted").data[0], 2);
}

TEST(Checkpoint, GetMissingTensorThrowsAndFindReturnsNull) {
    ScratchDir dir;
    write_good_sharded(dir.path());
    const auto ckpt = q3n::Checkpoint::open(dir.str());
    EXPECT_EQ(ckpt->find("nope"), nullptr);
    EXPECT_NE(ckpt->find("a"), nullptr);
    try {
        ckpt->get("lm_head.weight");
        FAIL() << "got a missing tensor";
    } catch (const q3n::Error& e) {
        EXPECT_EQ(e.status(), Q3N_ERR_BAD_CHECKPOINT);
        EXPECT_TRUE(contains(e.what(), "missing tensor lm_head.weight")) << e.what();
    }
}

TEST(Checkpoint, RejectsIndexNamingMissingShard) {
    ScratchDir dir;
    write_good_sharded(dir.path());
    fs::remove(dir.path() / "model-2.safetensors");
    EXPECT_OPEN_FAILS(dir.str(), Q3N_ERR_BAD_CHECKPOINT, "model-2.safetensors");
    EXPECT_OPEN_FAILS(dir.str(), Q3N_ERR_BAD_CHECKPOINT, "does not exist");
}

TEST(Checkpoint, RejectsIndexNamingTensorAbsentFromShard) {
    ScratchDir dir;
    write_good_sharded(dir.path());
    // "c" is said to be in shard 1 but lives in shard 2.
    write_file(dir.path() / "model.safetensors.index.json",
               index_json({{"a", "model-1.safetensors"}, {"b", "model-1.safetensors"}, {"c", "model-1.safetensors"}}));
    const Outcome o = open_dir(dir.str());
    EXPECT_EQ(o.status, Q3N_ERR_BAD_CHECKPOINT) << o.message;
    EXPECT_TRUE(contains(o.message, "'c'")) << o.message;
    EXPECT_TRUE(contains(o.message, "model-1.safetensors")) << o.message;
    EXPECT_TRUE(contains(o.message, "does not contain")) << o.message;
}

TEST(Checkpoint, RejectsPathTraversalShardNames) {
    ScratchDir outer;
    const fs::path dir = outer.path() / "ckpt";
    fs::create_directory(dir);
    // A perfectly valid file one level up: opening it would be the bug.
    write_file(outer.path() / "x.safetensors", build_file({u8_tensor("a", 4, 1)}));
    for (const std::string& name : {std::string("../x.safetensors"), (outer.path() / "x.safetensors").string(),
                                    std::string(".."), std::string("."), std::string(""), std::string("sub/x.safetensors"),
                                    std::string("..\\\\x.safetensors")}) {
        write_file(dir / "model.safetensors.index.json", index_json({{"a", name}}));
        const Outcome o = open_dir(dir.string());
        EXPECT_EQ(o.status, Q3N_ERR_BAD_CHECKPOINT) << name << ": " << o.message;
        EXPECT_TRUE(contains(o.message, "not a plain file name")) << name << ": " << o.message;
    }
}

TEST(Checkpoint, RejectsMalformedIndex) {
    ScratchDir dir;
    write_good_sharded(dir.path());
    const fs::path index = dir.path() / "model.safetensors.index.json";
    const std::vector<std::pair<std::string, std::string>> cases = {
        {"{\"weight_map\": {\"a\": \"model-1.safetensors\"", "not valid JSON"},
        {"", "not valid JSON"},
        {"weight_map", "not valid JSON"},
        {"{\"weight_map\":{\"a\":\"model-1.safetensors\"}} trailing", "not valid JSON"},
        {"{\"weight_map\":{\"\xC3\x28\":\"model-1.safetensors\"}}", "not valid JSON"},  // invalid UTF-8
        {"[]", "not an object"},
        {"{\"metadata\":{}}", "missing \"weight_map\""},
        {"{\"weight_map\":[\"model-1.safetensors\"]}", "\"weight_map\" is not an object"},
        {"{\"weight_map\":{}}", "empty"},
        {"{\"weight_map\":{\"a\":1}}", "not a string"},
        {"{\"weight_map\":{\"a\":null}}", "not a string"},
        {"{\"metadata\":7,\"weight_map\":{\"a\":\"model-1.safetensors\"}}", "\"metadata\""},
        {"{\"weight_map\":{\"a\":\"model-1.safetensors\",\"a\":\"model-2.safetensors\"}}", "duplicate key 'a'"},
        // nlohmann would stop at the NUL and never see the tail.
        {std::string("{\"weight_map\":{\"a\":\"model-1.safetensors\"}}\0{", 44), "NUL"},
    };
    for (const auto& [text, needle] : cases) {
        write_file(index, text);
        const Outcome o = open_dir(dir.str());
        EXPECT_EQ(o.status, Q3N_ERR_BAD_CHECKPOINT) << text << ": " << o.message;
        EXPECT_TRUE(contains(o.message, needle)) << text << ": " << o.message;
        EXPECT_TRUE(contains(o.message, "model.safetensors.index.json")) << o.message;
    }
}

TEST(Checkpoint, RejectsTensorInTwoShards) {
    ScratchDir dir;
    write_file(dir.path() / "s1.safetensors", build_file({u8_tensor("a", 4, 1), u8_tensor("dup", 2, 1)}));
    write_file(dir.path() / "s2.safetensors", build_file({u8_tensor("b", 4, 2), u8_tensor("dup", 2, 2)}));
    write_file(dir.path() / "model.safetensors.index.json",
               index_json({{"a", "s1.safetensors"}, {"b", "s2.safetensors"}, {"dup", "s1.safetensors"}}));
    const Outcome o = open_dir(dir.str());
    EXPECT_EQ(o.status, Q3N_ERR_BAD_CHECKPOINT) << o.message;
    EXPECT_TRUE(contains(o.message, "'dup'")) << o.message;
    EXPECT_TRUE(contains(o.message, "s1.safetensors")) << o.message;
    EXPECT_TRUE(contains(o.message, "s2.safetensors")) << o.message;
}

TEST(Checkpoint, RejectsCorruptShard) {
    ScratchDir dir;
    write_good_sharded(dir.path());
    Bytes shard = build_file({u8_tensor("c", 3, 0xC3)});
    shard.push_back(0);  // one trailing byte
    write_file(dir.path() / "model-2.safetensors", shard);
    EXPECT_OPEN_FAILS(dir.str(), Q3N_ERR_BAD_CHECKPOINT, "model-2.safetensors");
    EXPECT_OPEN_FAILS(dir.str(), Q3N_ERR_BAD_CHECKPOINT, "trailing bytes");
}

TEST(Checkpoint, RejectsCorruptSingleFile) {
    ScratchDir dir;
    write_file(dir.path() / "model.safetensors", std::string("short"));
    EXPECT_OPEN_FAILS(dir.str(), Q3N_ERR_BAD_CHECKPOINT, "model.safetensors");
}

TEST(Checkpoint, RejectsDirectoryWithoutCheckpoint) {
    ScratchDir dir;
    write_file(dir.path() / "config.json", std::string("{}"));
    EXPECT_OPEN_FAILS(dir.str(), Q3N_ERR_IO, "no model.safetensors or model.safetensors.index.json in " + dir.str());
    EXPECT_OPEN_FAILS((dir.path() / "does-not-exist").string(), Q3N_ERR_IO, "no model.safetensors");
}

TEST(Checkpoint, OpensShardedFixture) {
    const auto ckpt = q3n::Checkpoint::open(kFixtures + "/bf16_untied_sharded");
    EXPECT_EQ(ckpt->files().size(), 3u);
    EXPECT_EQ(ckpt->tensors().size(), 36u);
    std::set<std::string> files;
    for (const auto& [name, view] : ckpt->tensors()) {
        EXPECT_EQ(view.dtype, q3n::StDtype::BF16) << name;
        EXPECT_EQ(view.nbytes, view.numel() * 2) << name;
        files.insert(fs::path(view.file).filename().string());
    }
    EXPECT_EQ(files.size(), 3u);
    EXPECT_TRUE(ckpt->has("model.embed_tokens.weight"));
    EXPECT_TRUE(ckpt->has("lm_head.weight"));  // untied
}

TEST(Checkpoint, OpensTiedFixture) {
    const auto ckpt = q3n::Checkpoint::open(kFixtures + "/bf16_tied");
    EXPECT_EQ(ckpt->files().size(), 1u);
    EXPECT_EQ(ckpt->tensors().size(), 24u);
    for (const auto& [name, view] : ckpt->tensors()) EXPECT_EQ(view.dtype, q3n::StDtype::BF16) << name;
    EXPECT_TRUE(ckpt->has("model.embed_tokens.weight"));
    EXPECT_FALSE(ckpt->has("lm_head.weight"));  // tied to the embedding
    EXPECT_EQ(ckpt->files().front()->metadata().at("format"), "pt");
}

TEST(Checkpoint, OpensFp8FixtureWithF32Scales) {
    const auto ckpt = q3n::Checkpoint::open(kFixtures + "/fp8_f32_scales");
    int fp8_weights = 0;
    for (const auto& [name, view] : ckpt->tensors()) {
        if (view.dtype != q3n::StDtype::F8_E4M3) continue;
        ++fp8_weights;
        ASSERT_EQ(view.shape.size(), 2u) << name;
        const auto* scale = ckpt->find(name + "_scale_inv");
        ASSERT_NE(scale, nullptr) << name << " has no weight_scale_inv";
        EXPECT_EQ(scale->dtype, q3n::StDtype::F32) << name;
        EXPECT_EQ(scale->shape.size(), 2u) << name;
    }
    EXPECT_GT(fp8_weights, 0);
}

TEST(Checkpoint, OpensEveryFixture) {
    for (const auto& entry : fs::directory_iterator(kFixtures)) {
        if (!entry.is_directory()) continue;
        EXPECT_NO_THROW({
            const auto ckpt = q3n::Checkpoint::open(entry.path().string());
            EXPECT_FALSE(ckpt->tensors().empty()) << entry.path();
        }) << entry.path();
    }
}
