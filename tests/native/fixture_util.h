// Reading the transformers reference fixtures (tests/fixtures/qwen3/*/reference.json).
#pragma once

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "qwen3native.h"

namespace q3n_test {

inline std::string fixture_dir(const std::string& name) { return std::string(Q3N_FIXTURE_DIR) + "/qwen3/" + name; }

inline nlohmann::json read_json(const std::string& path) {
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    return nlohmann::json::parse(ss.str());
}

struct Greedy {
    std::vector<int32_t> tokens;
    std::vector<double> margins;
};

struct Reference {
    std::vector<std::vector<int32_t>> prompts;
    std::vector<std::vector<float>> last_logits;
    Greedy greedy;
};

inline Reference parse_reference(const nlohmann::json& j) {
    Reference r;
    r.prompts = j.at("prompts").get<std::vector<std::vector<int32_t>>>();
    r.last_logits = j.at("last_logits").get<std::vector<std::vector<float>>>();
    r.greedy.tokens = j.at("greedy").at("tokens").get<std::vector<int32_t>>();
    r.greedy.margins = j.at("greedy").at("margins").get<std::vector<double>>();
    return r;
}

// ||a - b|| / ||b||
inline double relative_l2(const std::vector<float>& a, const std::vector<float>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
        den += double(b[i]) * b[i];
    }
    return std::sqrt(num / den);
}

inline double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
    double m = 0;
    for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(double(a[i]) - b[i]));
    return m;
}

// RAII wrappers so a failing assertion cannot leak handles.
struct ModelHandle {
    q3n_model* m = nullptr;
    ~ModelHandle() { q3n_model_free(m); }
};
struct SequenceHandle {
    q3n_sequence* s = nullptr;
    ~SequenceHandle() { q3n_sequence_free(s); }
};

}  // namespace q3n_test

#include <cstring>
#include <filesystem>
#include <map>

namespace q3n_test {

// A tensor to write: dtype name as in safetensors, shape and raw little-endian bytes.
struct RawTensor {
    std::string dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
};

// Writes a valid safetensors file (header padded to 8 bytes as the Python writer does).
inline void write_safetensors(const std::string& path, const std::map<std::string, RawTensor>& tensors) {
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    header["__metadata__"] = {{"format", "pt"}};
    uint64_t offset = 0;
    for (const auto& [name, t] : tensors) {
        header[name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes.size()}}};
        offset += t.bytes.size();
    }
    std::string h = header.dump();
    while ((h.size() + 8) % 8) h.push_back(' ');
    std::ofstream out(path, std::ios::binary);
    const uint64_t n = h.size();
    out.write(reinterpret_cast<const char*>(&n), 8);
    out.write(h.data(), static_cast<std::streamsize>(h.size()));
    for (const auto& [name, t] : tensors) out.write(reinterpret_cast<const char*>(t.bytes.data()), t.bytes.size());
}

// Reads every tensor of a single-file fixture back as RawTensor (for writing altered copies).
inline std::map<std::string, RawTensor> read_safetensors(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::vector<uint8_t> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    uint64_t n;
    std::memcpy(&n, data.data(), 8);
    auto header = nlohmann::json::parse(std::string(data.begin() + 8, data.begin() + 8 + n));
    std::map<std::string, RawTensor> out;
    for (auto& [name, v] : header.items()) {
        if (name == "__metadata__") continue;
        RawTensor t;
        t.dtype = v["dtype"];
        t.shape = v["shape"].get<std::vector<int64_t>>();
        const auto off = v["data_offsets"].get<std::vector<uint64_t>>();
        t.bytes.assign(data.begin() + 8 + n + off[0], data.begin() + 8 + n + off[1]);
        out[name] = std::move(t);
    }
    return out;
}

// A fresh empty directory under the test temp dir.
inline std::string temp_dir(const std::string& name) {
    const auto dir = std::filesystem::path(::testing::TempDir()) / ("q3n_" + name);
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
    return dir.string();
}

inline void write_text(const std::string& path, const std::string& text) {
    std::ofstream(path) << text;
}

// A fresh directory holding only `config` as config.json (for dummy-weight loads).
inline std::string write_config(const std::string& tag, const nlohmann::json& config) {
    const std::string dir = temp_dir(tag);
    write_text(dir + "/config.json", config.dump(2));
    return dir;
}

// Options for a CPU model; with `dummy`, weights come from the seeded dummy source.
inline q3n_model_options cpu_options(bool dummy, uint64_t seed = 1, uint32_t context_length = 128,
                                     uint64_t kv_cache_tokens = 0) {
    q3n_model_options o;
    q3n_model_options_init(&o, sizeof o);
    o.device = Q3N_DEVICE_CPU;
    o.context_length = context_length;
    if (kv_cache_tokens) o.kv_cache_tokens = kv_cache_tokens;
    if (dummy) {
        o.load_format = Q3N_LOAD_DUMMY;
        o.dummy_seed = seed;
    }
    return o;
}

// A fixture family's directory under tests/fixtures, or the directory `env_var` names (freshly
// generated fixtures are checked there before they are put in place).
inline std::string fixture_root(const char* env_var, const std::string& family) {
    if (const char* env = std::getenv(env_var)) return env;
    return std::string(Q3N_FIXTURE_DIR) + "/" + family;
}

// Loads `dir` into `h` or fails the test with the engine's message (a void helper: ASSERT returns).
inline void load_model(const std::string& dir, const q3n_model_options& o, ModelHandle& h) {
    ASSERT_EQ(q3n_model_load(dir.c_str(), &o, &h.m), Q3N_OK) << dir << ": " << q3n_last_error();
}

inline q3n_model_info model_info(q3n_model* m) {
    q3n_model_info info{};
    info.struct_size = sizeof info;
    EXPECT_EQ(q3n_model_get_info(m, &info), Q3N_OK);
    return info;
}

// Deterministic token ids below 256 (the tiny test vocabularies).
inline std::vector<int32_t> some_tokens(size_t n, uint32_t seed) {
    std::vector<int32_t> t(n);
    for (size_t i = 0; i < n; ++i) t[i] = static_cast<int32_t>((seed * 2654435761u + i * 40503u) % 256);
    return t;
}

}  // namespace q3n_test
