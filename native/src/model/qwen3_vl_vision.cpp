#include "model/qwen3_vl_vision.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "cpu/ops.h"
#include "io/checkpoint.h"
#include "model/config.h"

namespace q3n {
namespace {

uint32_t get_u32(const nlohmann::json& v, const char* key, const std::string& source, bool required,
                 uint32_t fallback = 0) {
    if (!v.contains(key) || v[key].is_null()) {
        if (required) fail(Q3N_ERR_BAD_CONFIG, source + ": vision_config." + key + " is missing");
        return fallback;
    }
    if (!v[key].is_number_integer() || v[key].get<int64_t>() < 0)
        fail(Q3N_ERR_BAD_CONFIG, source + ": vision_config." + key + " must be a non-negative integer");
    return v[key].get<uint32_t>();
}

VisionLinear vision_linear(WeightSource& src, const std::string& module, size_t out, size_t in) {
    VisionLinear l;
    l.w = src.linear(module, out, in);
    l.b = src.vector(module + ".bias", out);
    return l;
}

VisionMergerWeights vision_merger(WeightSource& src, const std::string& prefix, const VisionConfig& c,
                                  bool postshuffle) {
    const size_t wide = size_t(c.hidden_size) * c.spatial_merge_size * c.spatial_merge_size;
    VisionMergerWeights m;
    m.postshuffle_norm = postshuffle;
    const size_t norm = postshuffle ? wide : c.hidden_size;
    m.norm_w = src.vector(prefix + ".norm.weight", norm);
    m.norm_b = src.vector(prefix + ".norm.bias", norm);
    m.fc1 = vision_linear(src, prefix + ".linear_fc1", wide, wide);
    m.fc2 = vision_linear(src, prefix + ".linear_fc2", c.out_hidden_size, wide);
    return m;
}

// x[rows, in] . W^T + b
void affine(const float* x, size_t rows, const VisionLinear& l, float* y, ThreadPool& pool) {
    cpu::linear(x, rows, l.w, y, pool);
    cpu::add_bias(y, l.b.data(), rows, l.w.out);
}

nlohmann::json read_json_file(const std::string& path) {
    std::ifstream in(path);
    if (!in) fail(Q3N_ERR_IO, "cannot read " + path);
    std::stringstream ss;
    ss << in.rdbuf();
    try {
        return nlohmann::json::parse(ss.str());
    } catch (const nlohmann::json::exception& e) {
        fail(Q3N_ERR_BAD_CONFIG, path + " is not valid JSON: " + e.what());
    }
}

}  // namespace

uint32_t VisionConfig::grid_side() const {
    return static_cast<uint32_t>(std::lround(std::sqrt(static_cast<double>(num_position_embeddings))));
}

VisionConfig VisionConfig::from_json(const nlohmann::json& config, const std::string& source) {
    if (!config.contains("vision_config") || !config["vision_config"].is_object())
        fail(Q3N_ERR_BAD_CONFIG, source + ": vision_config is missing");
    const auto& v = config["vision_config"];
    VisionConfig c;
    c.depth = get_u32(v, "depth", source, true);
    c.hidden_size = get_u32(v, "hidden_size", source, true);
    c.intermediate_size = get_u32(v, "intermediate_size", source, true);
    c.num_heads = get_u32(v, "num_heads", source, true);
    c.patch_size = get_u32(v, "patch_size", source, false, 16);
    c.temporal_patch_size = get_u32(v, "temporal_patch_size", source, false, 2);
    c.in_channels = get_u32(v, "in_channels", source, false, 3);
    c.spatial_merge_size = get_u32(v, "spatial_merge_size", source, false, 2);
    c.num_position_embeddings = get_u32(v, "num_position_embeddings", source, true);
    c.out_hidden_size = get_u32(v, "out_hidden_size", source, true);
    if (v.contains("deepstack_visual_indexes") && !v["deepstack_visual_indexes"].is_null()) {
        if (!v["deepstack_visual_indexes"].is_array())
            fail(Q3N_ERR_BAD_CONFIG, source + ": vision_config.deepstack_visual_indexes must be a list");
        for (const auto& i : v["deepstack_visual_indexes"]) {
            if (!i.is_number_integer() || i.get<int64_t>() < 0 || i.get<int64_t>() >= c.depth)
                fail(Q3N_ERR_BAD_CONFIG, source + ": vision_config.deepstack_visual_indexes holds " + i.dump() +
                                             ", not a block index below depth " + std::to_string(c.depth));
            c.deepstack_visual_indexes.push_back(i.get<uint32_t>());
        }
    }
    const std::string act = v.value("hidden_act", std::string("gelu_pytorch_tanh"));
    if (act == "gelu_pytorch_tanh" || act == "gelu_new" || act == "gelu_fast") {
        c.gelu_tanh = true;
    } else if (act == "gelu") {
        c.gelu_tanh = false;
    } else {
        fail(Q3N_ERR_UNSUPPORTED, source + ": vision_config.hidden_act \"" + act + "\" is not supported");
    }
    if (c.num_heads == 0 || c.hidden_size % c.num_heads || c.head_dim() % 4)
        fail(Q3N_ERR_BAD_CONFIG, source + ": vision hidden_size / num_heads must be a whole multiple of 4");
    if (c.spatial_merge_size == 0 || c.depth == 0 || c.out_hidden_size == 0)
        fail(Q3N_ERR_BAD_CONFIG, source + ": vision depth, spatial_merge_size and out_hidden_size must be positive");
    const uint32_t side = c.grid_side();
    if (size_t(side) * side != c.num_position_embeddings)
        fail(Q3N_ERR_BAD_CONFIG, source + ": vision_config.num_position_embeddings must be a perfect square");
    return c;
}

Qwen3VlVisionWeights load_qwen3_vl_vision(WeightSource& src, const VisionConfig& c,
                                          std::vector<std::unique_ptr<uint8_t[]>>& owned) {
    const std::string p = "model.visual.";
    Qwen3VlVisionWeights w;
    // The Conv3d kernel [hidden, C, T, P, P] flattens in the same (c, t, py, px) order as a patch row,
    // so it is a [hidden, patch_dim] Linear once widened.
    {
        const auto k = src.tensor(p + "patch_embed.proj.weight",
                                  {c.hidden_size, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size});
        owned.emplace_back(new uint8_t[k.size() * sizeof(float)]);
        std::memcpy(owned.back().get(), k.data(), k.size() * sizeof(float));
        w.patch_embed.w.type = WeightType::F32;
        w.patch_embed.w.data = owned.back().get();
        w.patch_embed.w.out = c.hidden_size;
        w.patch_embed.w.in = c.patch_dim();
        w.patch_embed.b = src.vector(p + "patch_embed.proj.bias", c.hidden_size);
    }
    w.pos_embed = src.table(p + "pos_embed.weight", c.num_position_embeddings, c.hidden_size);
    const size_t h = c.hidden_size;
    for (uint32_t i = 0; i < c.depth; ++i) {
        const std::string b = p + "blocks." + std::to_string(i) + ".";
        VisionBlockWeights blk;
        blk.norm1_w = src.vector(b + "norm1.weight", h);
        blk.norm1_b = src.vector(b + "norm1.bias", h);
        blk.norm2_w = src.vector(b + "norm2.weight", h);
        blk.norm2_b = src.vector(b + "norm2.bias", h);
        blk.qkv = vision_linear(src, b + "attn.qkv", 3 * h, h);
        blk.proj = vision_linear(src, b + "attn.proj", h, h);
        blk.fc1 = vision_linear(src, b + "mlp.linear_fc1", c.intermediate_size, h);
        blk.fc2 = vision_linear(src, b + "mlp.linear_fc2", h, c.intermediate_size);
        w.blocks.push_back(std::move(blk));
    }
    w.merger = vision_merger(src, p + "merger", c, false);
    for (size_t k = 0; k < c.deepstack_visual_indexes.size(); ++k)
        w.deepstack.push_back(vision_merger(src, p + "deepstack_merger_list." + std::to_string(k), c, true));
    return w;
}

Qwen3VlVision::Qwen3VlVision(VisionConfig config, Qwen3VlVisionWeights weights)
    : config_(std::move(config)), weights_(std::move(weights)) {}

Qwen3VlVision::~Qwen3VlVision() = default;

std::unique_ptr<Qwen3VlVision> Qwen3VlVision::load(const std::string& directory) {
    const std::string path = directory + "/config.json";
    const auto j = read_json_file(path);
    VisionConfig vc = VisionConfig::from_json(j, path);
    // The loader needs only the FP8 settings; Qwen3-VL keeps quantization_config at the top level.
    ModelConfig mc;
    if (j.contains("quantization_config") && j["quantization_config"].is_object()) {
        const auto& q = j["quantization_config"];
        mc.fp8.enabled = q.value("quant_method", std::string()).find("fp8") != std::string::npos;
        if (q.contains("weight_block_size") && q["weight_block_size"].is_array() && q["weight_block_size"].size() == 2) {
            mc.fp8.block_n = q["weight_block_size"][0].get<uint32_t>();
            mc.fp8.block_k = q["weight_block_size"][1].get<uint32_t>();
        }
        for (const char* key : {"modules_to_not_convert", "ignored_layers"})
            if (q.contains(key) && q[key].is_array())
                for (const auto& m : q[key]) mc.fp8.not_converted.push_back(m.get<std::string>());
    }
    auto checkpoint = Checkpoint::open(directory);
    std::vector<std::unique_ptr<uint8_t[]>> owned;
    auto source = checkpoint_source(*checkpoint, mc, owned);
    auto weights = load_qwen3_vl_vision(*source, vc, owned);
    auto model = std::make_unique<Qwen3VlVision>(std::move(vc), std::move(weights));
    model->checkpoint_ = std::move(checkpoint);
    model->owned_ = std::move(owned);
    return model;
}

void Qwen3VlVision::merge(const std::vector<float>& x, size_t patches, const VisionMergerWeights& m,
                          std::vector<float>& out, ThreadPool& pool) const {
    const size_t h = config_.hidden_size, unit = size_t(config_.spatial_merge_size) * config_.spatial_merge_size;
    const size_t tokens = patches / unit, wide = h * unit;
    // Consecutive `unit` patches are one merged token, so [patches, h] is already [tokens, wide] in
    // memory; the two mergers differ only in whether the norm runs before or after that view.
    std::vector<float> y(patches * h);
    if (m.postshuffle_norm)
        cpu::layer_norm(x.data(), m.norm_w.data(), m.norm_b.data(), y.data(), tokens, wide, config_.layer_norm_eps, pool);
    else
        cpu::layer_norm(x.data(), m.norm_w.data(), m.norm_b.data(), y.data(), patches, h, config_.layer_norm_eps, pool);
    std::vector<float> mid(tokens * wide);
    affine(y.data(), tokens, m.fc1, mid.data(), pool);
    cpu::gelu_erf(mid.data(), mid.size());
    out.assign(tokens * config_.out_hidden_size, 0.0f);
    affine(mid.data(), tokens, m.fc2, out.data(), pool);
}

VisionOutput Qwen3VlVision::forward(const float* pixel_values, size_t n_patches, const std::vector<GridThw>& grids,
                                    ThreadPool& pool) const {
    const VisionConfig& c = config_;
    const uint32_t ms = c.spatial_merge_size;
    size_t expected = 0;
    std::vector<uint32_t> cu{0};
    for (const GridThw& g : grids) {
        require(g.t > 0 && g.h > 0 && g.w > 0 && g.h % ms == 0 && g.w % ms == 0, Q3N_ERR_INVALID_ARGUMENT,
                "a vision grid must be positive and divisible by spatial_merge_size " + std::to_string(ms));
        expected += size_t(g.t) * g.h * g.w;
        // Attention stays within one temporal slice of one image or video.
        for (uint32_t t = 0; t < g.t; ++t) cu.push_back(cu.back() + g.h * g.w);
    }
    require(!grids.empty() && n_patches == expected, Q3N_ERR_INVALID_ARGUMENT,
            "pixel_values has " + std::to_string(n_patches) + " patches but the grids describe " + std::to_string(expected));

    const size_t n = n_patches, h = c.hidden_size, heads = c.num_heads, hd = c.head_dim();
    std::vector<float> x(n * h), pos(n * h);
    affine(pixel_values, n, weights_.patch_embed, x.data(), pool);
    cpu::pos_embed_interpolate(weights_.pos_embed, c.grid_side(), grids.data(), grids.size(), ms, pos.data());
    cpu::add_inplace(x.data(), pos.data(), x.size());

    std::vector<int32_t> coords(2 * n);
    cpu::vision_patch_coords(grids.data(), grids.size(), ms, coords.data());

    VisionOutput out;
    out.tokens = n / (size_t(ms) * ms);
    std::vector<float> y(n * h), qkv(n * 3 * h), q(n * h), k(n * h), v(n * h), att(n * h),
        mid(n * c.intermediate_size);
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    for (size_t b = 0; b < weights_.blocks.size(); ++b) {
        const VisionBlockWeights& blk = weights_.blocks[b];
        cpu::layer_norm(x.data(), blk.norm1_w.data(), blk.norm1_b.data(), y.data(), n, h, c.layer_norm_eps, pool);
        affine(y.data(), n, blk.qkv, qkv.data(), pool);
        // Each row of qkv is [3, heads, hd]: all query heads, then all keys, then all values.
        for (size_t t = 0; t < n; ++t) {
            std::memcpy(&q[t * h], &qkv[t * 3 * h], h * sizeof(float));
            std::memcpy(&k[t * h], &qkv[t * 3 * h + h], h * sizeof(float));
            std::memcpy(&v[t * h], &qkv[t * 3 * h + 2 * h], h * sizeof(float));
        }
        cpu::vision_rope_2d(q.data(), n, heads, hd, coords.data(), c.rope_theta);
        cpu::vision_rope_2d(k.data(), n, heads, hd, coords.data(), c.rope_theta);
        cpu::segment_attention(q.data(), k.data(), v.data(), n, heads, hd, cu.data(), cu.size() - 1, scale, att.data(),
                               pool);
        affine(att.data(), n, blk.proj, y.data(), pool);
        cpu::add_inplace(x.data(), y.data(), x.size());

        cpu::layer_norm(x.data(), blk.norm2_w.data(), blk.norm2_b.data(), y.data(), n, h, c.layer_norm_eps, pool);
        affine(y.data(), n, blk.fc1, mid.data(), pool);
        if (c.gelu_tanh)
            cpu::gelu_tanh(mid.data(), mid.size());
        else
            cpu::gelu_erf(mid.data(), mid.size());
        affine(mid.data(), n, blk.fc2, y.data(), pool);
        cpu::add_inplace(x.data(), y.data(), x.size());

        // transformers taps in block order and picks the merger by the index's position in the list.
        const auto& idx = c.deepstack_visual_indexes;
        const auto it = std::find(idx.begin(), idx.end(), static_cast<uint32_t>(b));
        if (it != idx.end()) {
            out.deepstack.emplace_back();
            merge(x, n, weights_.deepstack[static_cast<size_t>(it - idx.begin())], out.deepstack.back(), pool);
        }
    }
    merge(x, n, weights_.merger, out.merged, pool);
    return out;
}

}  // namespace q3n
