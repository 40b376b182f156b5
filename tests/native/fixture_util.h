// Reading the transformers reference fixtures (tests/fixtures/qwen3/*/reference.json).
#pragma once

#include <cmath>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

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
