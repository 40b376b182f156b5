#include "model/qwen3_next_layout.h"

#include <cstring>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace q3n {

std::vector<NextLayerKind> next_layer_schedule(uint32_t num_layers, const std::optional<std::vector<std::string>>& layer_types,
                                               uint32_t full_attention_interval, const std::string& source) {
    std::vector<NextLayerKind> kinds;
    kinds.reserve(num_layers);
    if (layer_types) {
        // transformers validates the same way: the list is authoritative and must cover every layer.
        if (layer_types->size() != num_layers)
            fail(Q3N_ERR_BAD_CONFIG, source + ": field 'layer_types' has " + std::to_string(layer_types->size()) +
                                         " entries for " + std::to_string(num_layers) + " layers");
        for (size_t i = 0; i < layer_types->size(); ++i) {
            const std::string& t = (*layer_types)[i];
            if (t == "linear_attention")
                kinds.push_back(NextLayerKind::LinearAttention);
            else if (t == "full_attention")
                kinds.push_back(NextLayerKind::FullAttention);
            else
                fail(Q3N_ERR_BAD_CONFIG, source + ": field 'layer_types' entry " + std::to_string(i) + " is '" + t +
                                             "', expected 'linear_attention' or 'full_attention'");
        }
        return kinds;
    }
    if (full_attention_interval == 0)
        fail(Q3N_ERR_BAD_CONFIG, source + ": field 'full_attention_interval' must be positive");
    for (uint32_t i = 0; i < num_layers; ++i)
        kinds.push_back((i + 1) % full_attention_interval == 0 ? NextLayerKind::FullAttention
                                                               : NextLayerKind::LinearAttention);
    return kinds;
}

std::vector<NextLayerKind> next_layer_schedule(const nlohmann::json& config, const std::string& source) {
    auto positive = [&](const char* key, std::optional<uint32_t> fallback) -> uint32_t {
        auto it = config.find(key);
        if (it == config.end() || it->is_null()) {
            if (fallback) return *fallback;
            fail(Q3N_ERR_BAD_CONFIG, source + ": field '" + key + "' is missing");
        }
        if (!it->is_number_integer() || it->get<int64_t>() <= 0 || it->get<int64_t>() > 1024)
            fail(Q3N_ERR_BAD_CONFIG, source + ": field '" + key + "' must be a positive integer (at most 1024)");
        return static_cast<uint32_t>(it->get<int64_t>());
    };
    const uint32_t layers = positive("num_hidden_layers", std::nullopt);
    std::optional<std::vector<std::string>> types;
    auto it = config.find("layer_types");
    if (it != config.end() && !it->is_null()) {
        if (!it->is_array()) fail(Q3N_ERR_BAD_CONFIG, source + ": field 'layer_types' must be a list of strings");
        types.emplace();
        for (const auto& v : *it) {
            if (!v.is_string()) fail(Q3N_ERR_BAD_CONFIG, source + ": field 'layer_types' must be a list of strings");
            types->push_back(v.get<std::string>());
        }
    }
    const uint32_t interval = types ? 1 : positive("full_attention_interval", 4u);
    return next_layer_schedule(layers, types, interval, source);
}

void GdnDims::validate(const std::string& source) const {
    if (nk == 0 || nv == 0 || dk == 0 || dv == 0)
        fail(Q3N_ERR_BAD_CONFIG, source + ": the linear attention head counts and dims must be positive");
    if (nv % nk != 0)
        fail(Q3N_ERR_BAD_CONFIG, source + ": linear_num_value_heads (" + std::to_string(nv) +
                                     ") must be a multiple of linear_num_key_heads (" + std::to_string(nk) + ")");
}

void deinterleave_qkvz(const GdnDims& d, const float* P, size_t tokens, float* qkv, float* z) {
    const size_t r = d.ratio(), gw = d.group_width(), conv = d.conv_dim(), vd = d.value_dim();
    const size_t rdv = r * d.dv;
    for (size_t t = 0; t < tokens; ++t) {
        const float* src = P + t * d.qkvz_width();
        float* q = qkv + t * conv;
        float* k = q + d.key_dim();
        float* v = k + d.key_dim();
        float* zt = z + t * vd;
        for (size_t g = 0; g < d.nk; ++g) {
            const float* grp = src + g * gw;
            std::memcpy(q + g * d.dk, grp, d.dk * sizeof(float));
            std::memcpy(k + g * d.dk, grp + d.dk, d.dk * sizeof(float));
            // Value heads r*g .. r*g+r-1 are consecutive, so the group's v (and z) is one run.
            std::memcpy(v + g * rdv, grp + 2 * d.dk, rdv * sizeof(float));
            std::memcpy(zt + g * rdv, grp + 2 * d.dk + rdv, rdv * sizeof(float));
        }
    }
}

void deinterleave_ba(const GdnDims& d, const float* B, size_t tokens, float* b, float* a) {
    const size_t r = d.ratio();
    for (size_t t = 0; t < tokens; ++t) {
        const float* src = B + t * d.ba_width();
        for (size_t g = 0; g < d.nk; ++g)
            for (size_t j = 0; j < r; ++j) {
                b[t * d.nv + g * r + j] = src[g * 2 * r + j];
                a[t * d.nv + g * r + j] = src[g * 2 * r + r + j];
            }
    }
}

std::vector<uint32_t> qkvz_contiguous_rows(const GdnDims& d) {
    const size_t r = d.ratio(), gw = d.group_width();
    std::vector<uint32_t> rows;
    rows.reserve(d.qkvz_width());
    // The four parts in order; inside each, groups in order, each group's run of rows in order.
    const size_t offset[4] = {0, d.dk, 2 * d.dk, 2 * d.dk + r * d.dv};
    const size_t length[4] = {d.dk, d.dk, r * d.dv, r * d.dv};
    for (size_t part = 0; part < 4; ++part)
        for (size_t g = 0; g < d.nk; ++g)
            for (size_t i = 0; i < length[part]; ++i) rows.push_back(static_cast<uint32_t>(g * gw + offset[part] + i));
    return rows;
}

std::vector<uint32_t> ba_contiguous_rows(const GdnDims& d) {
    const size_t r = d.ratio();
    std::vector<uint32_t> rows;
    rows.reserve(d.ba_width());
    for (size_t part = 0; part < 2; ++part)
        for (size_t g = 0; g < d.nk; ++g)
            for (size_t j = 0; j < r; ++j) rows.push_back(static_cast<uint32_t>(g * 2 * r + part * r + j));
    return rows;
}

}  // namespace q3n
