// The safetensors rules of shared/RELIABILITY.md, one corrupt file per rule, each written here.
#include <gtest/gtest.h>

#include <stdlib.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/mapped_file.h"
#include "io/safetensors.h"

namespace {

namespace fs = std::filesystem;
using Bytes = std::vector<uint8_t>;

// A fresh directory per test, removed afterwards.
class ScratchDir {
public:
    ScratchDir() {
        std::string pattern = (fs::path(testing::TempDir()) / "q3n_st_XXXXXX").string();
        if (mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
        path_ = pattern;
    }
    ~ScratchDir() {
        std::error_code ec;
        fs::remove_all(path_, ec);
    }
    std::string file(const std::string& name) const { return (path_ / name).string(); }

private:
    fs::path path_;
};

void write_file(const std::string& path, const Bytes& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    if (!out) throw std::runtime_error("cannot write " + path);
}

// A file image from a literal header: 8-byte little-endian length (the header's own unless
// `declared_len` says otherwise), the header text, then `data`.
Bytes raw_file(const std::string& header, const Bytes& data = {}, std::optional<uint64_t> declared_len = {}) {
    const uint64_t n = declared_len.value_or(header.size());
    Bytes out;
    for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(n >> (8 * i)));
    out.insert(out.end(), header.begin(), header.end());
    out.insert(out.end(), data.begin(), data.end());
    return out;
}

struct Spec {
    std::string name;
    std::string dtype;
    std::vector<uint64_t> shape;
    Bytes bytes;
};

std::string entry_json(const std::string& dtype, const std::vector<uint64_t>& shape, uint64_t begin, uint64_t end) {
    std::string s = "{\"dtype\":\"" + dtype + "\",\"shape\":[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
    return s + "],\"data_offsets\":[" + std::to_string(begin) + "," + std::to_string(end) + "]}";
}

// A well-formed file the way real writers lay it out: data in the given order, header padded with
// spaces to a multiple of 8.
Bytes build_file(const std::vector<Spec>& specs, const std::string& metadata_json = "") {
    std::string header = "{";
    Bytes data;
    bool first = true;
    if (!metadata_json.empty()) {
        header += "\"__metadata__\":" + metadata_json;
        first = false;
    }
    for (const auto& s : specs) {
        header += (first ? "" : ",") + std::string("\"") + s.name + "\":" +
                  entry_json(s.dtype, s.shape, data.size(), data.size() + s.bytes.size());
        data.insert(data.end(), s.bytes.begin(), s.bytes.end());
        first = false;
    }
    header += "}";
    while (header.size() % 8) header += ' ';
    return raw_file(header, data);
}

Bytes iota_bytes(size_t n, uint8_t start = 0) {
    Bytes b(n);
    for (size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(start + i);
    return b;
}

struct Outcome {
    q3n_status status = Q3N_OK;
    std::string message;
};

// Writes the image to a file and opens it through the mapping path, as the engine does.
Outcome open_image(const Bytes& image) {
    ScratchDir dir;
    const std::string path = dir.file("model.safetensors");
    write_file(path, image);
    try {
        q3n::SafetensorsFile::open(path);
        return {};
    } catch (const q3n::Error& e) {
        return {e.status(), e.what()};
    }
}

bool contains(const std::string& haystack, const std::string& needle) {
    return haystack.find(needle) != std::string::npos;
}

#define EXPECT_REJECTED(image, needle)                                                        \
    do {                                                                                      \
        const Outcome outcome_ = open_image(image);                                           \
        EXPECT_EQ(outcome_.status, Q3N_ERR_BAD_CHECKPOINT) << outcome_.message;               \
        EXPECT_TRUE(contains(outcome_.message, needle)) << "message: " << outcome_.message;   \
        EXPECT_TRUE(contains(outcome_.message, "model.safetensors")) << outcome_.message;     \
    } while (0)

#define EXPECT_ACCEPTED(image)                                                                \
    do {                                                                                      \
        const Outcome outcome_ = open_image(image);                                           \
        EXPECT_EQ(outcome_.status, Q3N_OK) << outcome_.message;                               \
    } while (0)

const std::string kU8x4 = entry_json("U8", {4}, 0, 4);

}  // namespace

TEST(Safetensors, ReadsValidFileWithCorrectDataPointers) {
    Bytes f32(24), bf16(8);
    const float values[6] = {1.5f, -2.0f, 3.25f, 0.0f, 1e-3f, 42.0f};
    std::memcpy(f32.data(), values, sizeof values);
    const uint16_t halves[4] = {0x3f80, 0xbf80, 0x4000, 0x0000};
    std::memcpy(bf16.data(), halves, sizeof halves);
    const Bytes u8 = {7, 8, 9};

    const Bytes image = build_file({{"w.f32", "F32", {2, 3}, f32}, {"w.bf16", "BF16", {4}, bf16}, {"w.u8", "U8", {3}, u8}},
                                   "{\"format\":\"pt\"}");
    ScratchDir dir;
    const std::string path = dir.file("good.safetensors");
    write_file(path, image);
    const auto file = q3n::SafetensorsFile::open(path);

    ASSERT_EQ(file->tensors().size(), 3u);
    EXPECT_EQ(file->path(), path);
    EXPECT_EQ(file->metadata().at("format"), "pt");

    const auto& a = file->tensors().at("w.f32");
    EXPECT_EQ(a.name, "w.f32");
    EXPECT_EQ(a.dtype, q3n::StDtype::F32);
    EXPECT_EQ(a.shape, (std::vector<int64_t>{2, 3}));
    EXPECT_EQ(a.nbytes, 24u);
    EXPECT_EQ(a.numel(), 6u);
    EXPECT_EQ(a.file, path);
    float back[6];
    std::memcpy(back, a.data, sizeof back);
    for (int i = 0; i < 6; ++i) EXPECT_EQ(back[i], values[i]);

    const auto& b = file->tensors().at("w.bf16");
    EXPECT_EQ(b.dtype, q3n::StDtype::BF16);
    EXPECT_EQ(std::memcmp(b.data, bf16.data(), 8), 0);
    EXPECT_EQ(b.data, a.data + 24);  // contiguous in the order written

    const auto& c = file->tensors().at("w.u8");
    EXPECT_EQ(c.dtype, q3n::StDtype::U8);
    EXPECT_EQ(std::memcmp(c.data, u8.data(), 3), 0);
    EXPECT_EQ(c.data, b.data + 8);
}

TEST(Safetensors, ValidateSetsPointersIntoTheImage) {
    // Data listed out of offset order in the header: pointers follow data_offsets, not key order.
    const std::string header = "{\"b\":" + entry_json("U8", {2}, 4, 6) + ",\"a\":" + entry_json("I32", {1}, 0, 4) + "}";
    const Bytes image = raw_file(header, {1, 0, 0, 0, 0xAA, 0xBB});
    std::map<std::string, q3n::TensorView> tensors;
    std::map<std::string, std::string> metadata;
    q3n::SafetensorsFile::validate(image.data(), image.size(), "in-memory", &tensors, &metadata);
    const uint8_t* base = image.data() + 8 + header.size();
    EXPECT_EQ(tensors.at("a").data, base);
    EXPECT_EQ(tensors.at("b").data, base + 4);
    EXPECT_EQ(tensors.at("b").data[1], 0xBB);
    EXPECT_EQ(tensors.at("a").file, "in-memory");
    EXPECT_TRUE(metadata.empty());
    // Null outputs are allowed: validation only.
    EXPECT_NO_THROW(q3n::SafetensorsFile::validate(image.data(), image.size(), "x", nullptr, nullptr));
}

TEST(Safetensors, AcceptsMetadata) {
    EXPECT_ACCEPTED(build_file({{"a", "U8", {4}, iota_bytes(4)}}, "{\"format\":\"pt\",\"note\":\"\"}"));
    EXPECT_ACCEPTED(raw_file("{\"__metadata__\":{}}"));
}

TEST(Safetensors, RejectsBadMetadata) {
    EXPECT_REJECTED(build_file({{"a", "U8", {4}, iota_bytes(4)}}, "{\"n\":3}"), "not a string");
    EXPECT_REJECTED(build_file({{"a", "U8", {4}, iota_bytes(4)}}, "[\"pt\"]"), "__metadata__");
    EXPECT_REJECTED(build_file({{"a", "U8", {4}, iota_bytes(4)}}, "\"pt\""), "__metadata__");
}

TEST(Safetensors, AcceptsHeaderWithoutTensors) {
    EXPECT_ACCEPTED(raw_file("{}"));
    EXPECT_ACCEPTED(raw_file("  {}      "));  // whitespace padding, as writers align the header
}

TEST(Safetensors, RejectsFileShorterThan8Bytes) {
    EXPECT_REJECTED(Bytes{}, "shorter than");
    EXPECT_REJECTED(Bytes(7, 0), "shorter than");
}

TEST(Safetensors, RejectsHeaderTooLarge) {
    EXPECT_REJECTED(raw_file("{}", {}, 100'000'001), "exceeds the limit");
    EXPECT_REJECTED(raw_file("{}", {}, ~uint64_t{0}), "exceeds the limit");
    // Exactly at the limit passes that rule and then fails the bound against the file size.
    EXPECT_REJECTED(raw_file("{}", {}, 100'000'000), "runs past the end");
}

TEST(Safetensors, RejectsHeaderPastEndOfFile) {
    EXPECT_REJECTED(raw_file("{}", {}, 3), "runs past the end");
    EXPECT_REJECTED(raw_file("{\"a\":" + kU8x4 + "}", {}, 4096), "runs past the end");
}

TEST(Safetensors, RejectsNonJsonHeader) {
    EXPECT_REJECTED(raw_file("not json"), "not valid JSON");
    EXPECT_REJECTED(raw_file(""), "not valid JSON");
    EXPECT_REJECTED(raw_file("{\"a\":" + kU8x4 + "} extra"), "not valid JSON");
    EXPECT_REJECTED(raw_file("{\"a\":" + kU8x4), "not valid JSON");
    EXPECT_REJECTED(raw_file(std::string("{}\0\0\0\0\0\0", 8)), "not valid JSON");  // NUL padding
}

TEST(Safetensors, RejectsNonObjectHeader) {
    EXPECT_REJECTED(raw_file("[]"), "not an object");
    EXPECT_REJECTED(raw_file("42"), "not an object");
    EXPECT_REJECTED(raw_file("null"), "not an object");
}

TEST(Safetensors, RejectsInvalidUtf8Header) {
    const Bytes four = iota_bytes(4);
    EXPECT_REJECTED(raw_file("{\"a\xC3\x28\":" + kU8x4 + "}", four), "UTF-8");  // bad continuation
    EXPECT_REJECTED(raw_file("{\"a\xC0\xAF\":" + kU8x4 + "}", four), "UTF-8");  // overlong '/'
    EXPECT_REJECTED(raw_file("{\"a\xED\xA0\x80\":" + kU8x4 + "}", four), "UTF-8");  // surrogate
    EXPECT_REJECTED(raw_file("{\"a\xF5\x80\x80\x80\":" + kU8x4 + "}", four), "UTF-8");  // > U+10FFFF
    EXPECT_REJECTED(raw_file("{\"a\xE2\x82\":" + kU8x4 + "}", four), "UTF-8");  // truncated sequence
    // Well-formed multi-byte names are fine.
    EXPECT_ACCEPTED(raw_file("{\"\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80\":" + kU8x4 + "}", four));
}

TEST(Safetensors, RejectsUnknownDtype) {
    EXPECT_REJECTED(raw_file("{\"a\":" + entry_json("F8_E8M0", {4}, 0, 4) + "}", iota_bytes(4)), "unknown dtype 'F8_E8M0'");
    EXPECT_REJECTED(raw_file("{\"a\":" + entry_json("bf16", {2}, 0, 4) + "}", iota_bytes(4)), "unknown dtype");
    EXPECT_REJECTED(raw_file("{\"a\":" + entry_json("", {4}, 0, 4) + "}", iota_bytes(4)), "unknown dtype");
}

TEST(Safetensors, AcceptsEveryKnownDtype) {
    const std::vector<std::pair<std::string, size_t>> known = {
        {"BOOL", 1}, {"U8", 1},   {"I8", 1},  {"I16", 2}, {"U16", 2}, {"F16", 2},     {"BF16", 2},   {"I32", 4},
        {"U32", 4},  {"F32", 4},  {"F64", 8}, {"I64", 8}, {"U64", 8}, {"F8_E4M3", 1}, {"F8_E5M2", 1},
    };
    std::vector<Spec> specs;
    for (const auto& [name, size] : known) specs.push_back({"t_" + name, name, {3}, iota_bytes(3 * size)});
    const Bytes image = build_file(specs);
    std::map<std::string, q3n::TensorView> tensors;
    q3n::SafetensorsFile::validate(image.data(), image.size(), "all", &tensors, nullptr);
    ASSERT_EQ(tensors.size(), known.size());
    for (const auto& [name, size] : known) {
        const auto& t = tensors.at("t_" + name);
        EXPECT_EQ(q3n::st_dtype_name(t.dtype), name);
        EXPECT_EQ(q3n::st_dtype_size(t.dtype), size) << name;
        EXPECT_EQ(t.nbytes, 3 * size);
    }
}

TEST(Safetensors, RejectsTenTensorsSharingOneOffset) {
    std::string header = "{";
    for (int i = 0; i < 10; ++i) header += (i ? ",\"t" : "\"t") + std::to_string(i) + "\":" + kU8x4;
    header += "}";
    EXPECT_REJECTED(raw_file(header, iota_bytes(4)), "overlapping");
}

TEST(Safetensors, RejectsGapBetweenTensors) {
    const std::string header = "{\"a\":" + kU8x4 + ",\"b\":" + entry_json("U8", {4}, 8, 12) + "}";
    EXPECT_REJECTED(raw_file(header, iota_bytes(12)), "gap");
}

TEST(Safetensors, RejectsFirstTensorNotAtZero) {
    const std::string header = "{\"a\":" + entry_json("U8", {4}, 4, 8) + "}";
    EXPECT_REJECTED(raw_file(header, iota_bytes(8)), "offset 0");
}

TEST(Safetensors, RejectsOverlappingTensors) {
    const std::string header = "{\"a\":" + kU8x4 + ",\"b\":" + entry_json("U8", {4}, 2, 6) + "}";
    EXPECT_REJECTED(raw_file(header, iota_bytes(6)), "overlapping");
    // One tensor inside another, with the outer one's end matching the data size.
    const std::string nested = "{\"a\":" + entry_json("U8", {8}, 0, 8) + ",\"b\":" + entry_json("U8", {2}, 2, 4) + "}";
    EXPECT_REJECTED(raw_file(nested, iota_bytes(8)), "overlapping");
}

TEST(Safetensors, RejectsShapeOverflow) {
    // 2 * (2^64 - 2) wraps to 2^64 - 4 in unchecked arithmetic; it must be caught, not wrapped.
    const std::string header = "{\"a\":{\"dtype\":\"U8\",\"shape\":[2,18446744073709551614],\"data_offsets\":[0,4]}}";
    EXPECT_REJECTED(raw_file(header, iota_bytes(4)), "overflows");
    // The element size is part of the product: 2^63 elements of BF16.
    const std::string by_size = "{\"a\":{\"dtype\":\"BF16\",\"shape\":[9223372036854775808],\"data_offsets\":[0,0]}}";
    EXPECT_REJECTED(raw_file(by_size), "overflows");
    // A product that wraps exactly to zero must not pass as a zero-sized tensor.
    const std::string to_zero = "{\"a\":{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,0]}}";
    EXPECT_REJECTED(raw_file(to_zero), "overflows");
}

TEST(Safetensors, RejectsSizeMismatch) {
    EXPECT_REJECTED(raw_file("{\"a\":" + entry_json("BF16", {4}, 0, 4) + "}", iota_bytes(4)), "needs 8 bytes");
    EXPECT_REJECTED(raw_file("{\"a\":" + entry_json("U8", {2, 2}, 0, 3) + "}", iota_bytes(3)), "needs 4 bytes");
}

TEST(Safetensors, AcceptsZeroSizedTensors) {
    // Zero-sized tensors before, between and after real ones, several at one offset.
    const std::string header = "{\"z1\":" + entry_json("F32", {0}, 0, 0) + ",\"a\":" + kU8x4 +
                               ",\"z2\":" + entry_json("BF16", {3, 0}, 4, 4) + ",\"z3\":" + entry_json("U8", {0, 5}, 4, 4) +
                               ",\"b\":" + entry_json("U8", {2}, 4, 6) + ",\"z4\":" + entry_json("I64", {0}, 6, 6) + "}";
    const Bytes image = raw_file(header, iota_bytes(6, 10));
    std::map<std::string, q3n::TensorView> tensors;
    ASSERT_NO_THROW(q3n::SafetensorsFile::validate(image.data(), image.size(), "zero", &tensors, nullptr));
    ASSERT_EQ(tensors.size(), 6u);
    const uint8_t* base = image.data() + 8 + header.size();
    EXPECT_EQ(tensors.at("z2").numel(), 0u);
    EXPECT_EQ(tensors.at("z2").nbytes, 0u);
    EXPECT_EQ(tensors.at("z2").shape, (std::vector<int64_t>{3, 0}));
    EXPECT_EQ(tensors.at("z3").data, base + 4);
    EXPECT_EQ(tensors.at("b").data, base + 4);
    EXPECT_EQ(tensors.at("b").data[0], 14);
    EXPECT_EQ(tensors.at("z4").data, base + 6);
    EXPECT_ACCEPTED(image);
    // An empty tensor shares offset 0 with a scalar (shape [] is one element, not zero).
    EXPECT_ACCEPTED(raw_file("{\"e\":" + entry_json("F16", {0, 7}, 0, 0) + ",\"s\":" + entry_json("F32", {}, 0, 4) + "}",
                             iota_bytes(4)));
    // A file of nothing but empty tensors has no data region at all.
    EXPECT_ACCEPTED(raw_file("{\"e\":" + entry_json("F16", {0, 7}, 0, 0) + ",\"f\":" + entry_json("U8", {0}, 0, 0) + "}"));
}

TEST(Safetensors, ZeroSizedTensorStillNeedsContiguousOffsets) {
    // A zero-sized tensor at an offset nobody else reaches is a gap, not a free pass.
    const std::string header = "{\"a\":" + kU8x4 + ",\"z\":" + entry_json("U8", {0}, 9, 9) + "}";
    EXPECT_REJECTED(raw_file(header, iota_bytes(4)), "gap");
}

TEST(Safetensors, RejectsTrailingBytes) {
    // A polyglot: a valid safetensors file with a second format appended behind the last tensor.
    Bytes image = build_file({{"a", "U8", {4}, iota_bytes(4)}});
    const Bytes zip_tail = {'P', 'K', 3, 4, 20, 0, 0, 0};
    image.insert(image.end(), zip_tail.begin(), zip_tail.end());
    EXPECT_REJECTED(image, "trailing bytes");
    // Trailing bytes with no tensors at all.
    EXPECT_REJECTED(raw_file("{}", {0}), "trailing bytes");
}

TEST(Safetensors, RejectsTruncatedData) {
    Bytes image = build_file({{"a", "U8", {4}, iota_bytes(4)}, {"b", "F32", {2}, iota_bytes(8)}});
    image.pop_back();
    EXPECT_REJECTED(image, "past the end");
}

TEST(Safetensors, RejectsDuplicateTensorNames) {
    // Laid out so that either copy alone would tile the data: only the duplicate rule can catch it.
    const std::string header = "{\"a\":" + kU8x4 + ",\"a\":" + entry_json("U8", {4}, 4, 8) + "}";
    EXPECT_REJECTED(raw_file(header, iota_bytes(8)), "duplicate tensor name 'a'");
    // Duplicate fields inside one entry are just as ambiguous.
    const std::string field = "{\"a\":{\"dtype\":\"U8\",\"dtype\":\"I8\",\"shape\":[4],\"data_offsets\":[0,4]}}";
    EXPECT_REJECTED(raw_file(field, iota_bytes(4)), "duplicate key 'dtype'");
}

TEST(Safetensors, RejectsEndBeforeBegin) {
    EXPECT_REJECTED(raw_file("{\"a\":" + entry_json("U8", {0}, 4, 0) + "}", iota_bytes(4)), "before begin");
}

TEST(Safetensors, RejectsNegativeNumbers) {
    const Bytes four = iota_bytes(4);
    EXPECT_REJECTED(raw_file("{\"a\":{\"dtype\":\"U8\",\"shape\":[-4],\"data_offsets\":[0,4]}}", four), "negative");
    EXPECT_REJECTED(raw_file("{\"a\":{\"dtype\":\"U8\",\"shape\":[-1,-4],\"data_offsets\":[0,4]}}", four), "negative");
    EXPECT_REJECTED(raw_file("{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[-4,0]}}", four), "negative");
    EXPECT_REJECTED(raw_file("{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,-4]}}", four), "negative");
}

TEST(Safetensors, RejectsWrongTypes) {
    const Bytes four = iota_bytes(4);
    auto entry = [&](const std::string& body) { return raw_file("{\"a\":" + body + "}", four); };
    EXPECT_REJECTED(entry("\"U8\""), "not an object");
    EXPECT_REJECTED(entry("[\"U8\",[4],[0,4]]"), "not an object");
    EXPECT_REJECTED(entry("{\"dtype\":8,\"shape\":[4],\"data_offsets\":[0,4]}"), "\"dtype\" is not a string");
    EXPECT_REJECTED(entry("{\"dtype\":\"U8\",\"shape\":4,\"data_offsets\":[0,4]}"), "\"shape\" is not an array");
    EXPECT_REJECTED(entry("{\"dtype\":\"U8\",\"shape\":\"4\",\"data_offsets\":[0,4]}"), "\"shape\" is not an array");
    EXPECT_REJECTED(entry("{\"dtype\":\"U8\",\"shape\":[4.0],\"data_offsets\":[0,4]}"), "not an integer");
    EXPECT_REJECTED(entry("{\"dtype\":\"U8\",\"shape\":[\"4\"],\"data_offsets\":[0,4]}"), "not an integer");
    EXPECT_REJECTED(entry("{\"dtype\":\"U8\",\"shape\":[true],\"data_offsets\":[0,4]}"), "not an integer");
    EXPECT_REJECTED(entry("{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0]}"), "[begin, end]");
    EXPECT_REJECTED(entry("{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4,8]}"), "[begin, end]");
    EXPECT_REJECTED(entry("{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":{\"0\":4}}"), "[begin, end]");
    EXPECT_REJECTED(entry("{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4.5]}"), "not an integer");
    EXPECT_REJECTED(entry("{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,1e2]}"), "not an integer");
    // Numbers beyond 64 bits parse as floating point and are refused as such.
    EXPECT_REJECTED(entry("{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,18446744073709551616]}"), "not an integer");
}

TEST(Safetensors, RejectsMissingFields) {
    const Bytes four = iota_bytes(4);
    EXPECT_REJECTED(raw_file("{\"a\":{\"shape\":[4],\"data_offsets\":[0,4]}}", four), "missing \"dtype\"");
    EXPECT_REJECTED(raw_file("{\"a\":{\"dtype\":\"U8\",\"data_offsets\":[0,4]}}", four), "missing \"shape\"");
    EXPECT_REJECTED(raw_file("{\"a\":{\"dtype\":\"U8\",\"shape\":[4]}}", four), "missing \"data_offsets\"");
}

TEST(Safetensors, ErrorNamesTheTensor) {
    const Outcome o = open_image(raw_file("{\"model.layers.3.mlp.up_proj.weight\":" + entry_json("F4", {4}, 0, 4) + "}",
                                          iota_bytes(4)));
    EXPECT_EQ(o.status, Q3N_ERR_BAD_CHECKPOINT);
    EXPECT_TRUE(contains(o.message, "model.layers.3.mlp.up_proj.weight")) << o.message;
}

TEST(Safetensors, RejectsDeeplyNestedHeader) {
    const std::string deep = "{\"x\":" + std::string(5000, '[') + std::string(5000, ']') + "}";
    EXPECT_REJECTED(raw_file(deep), "nests deeper");
}

TEST(Safetensors, MissingFileIsIoError) {
    ScratchDir dir;
    const std::string path = dir.file("absent.safetensors");
    try {
        q3n::SafetensorsFile::open(path);
        FAIL() << "opened a missing file";
    } catch (const q3n::Error& e) {
        EXPECT_EQ(e.status(), Q3N_ERR_IO);
        EXPECT_TRUE(contains(e.what(), path)) << e.what();
        EXPECT_TRUE(contains(e.what(), "No such file")) << e.what();
    }
}

TEST(SafetensorsMappedFile, MapsContents) {
    ScratchDir dir;
    const std::string path = dir.file("bytes.bin");
    write_file(path, iota_bytes(300, 5));
    q3n::MappedFile m(path);
    ASSERT_EQ(m.size(), 300u);
    ASSERT_NE(m.data(), nullptr);
    EXPECT_EQ(m.path(), path);
    for (size_t i = 0; i < 300; ++i) ASSERT_EQ(m.data()[i], static_cast<uint8_t>(5 + i));
}

TEST(SafetensorsMappedFile, EmptyFileMapsToNothing) {
    ScratchDir dir;
    const std::string path = dir.file("empty.bin");
    write_file(path, {});
    q3n::MappedFile m(path);
    EXPECT_EQ(m.size(), 0u);
    EXPECT_EQ(m.data(), nullptr);
}

TEST(SafetensorsMappedFile, DirectoryIsIoError) {
    ScratchDir dir;
    const std::string path = dir.file("sub");
    fs::create_directory(path);
    try {
        q3n::MappedFile m(path);
        FAIL() << "mapped a directory";
    } catch (const q3n::Error& e) {
        EXPECT_EQ(e.status(), Q3N_ERR_IO);
        EXPECT_TRUE(contains(e.what(), path)) << e.what();
    }
}
