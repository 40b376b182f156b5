#include "model/config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace q3n {
namespace {

using nlohmann::json;

// Limits far above every released model; they stop absurd values before they size allocations.
constexpr uint64_t kMaxVocab = 1u << 22;
constexpr uint64_t kMaxHidden = 1u << 16;
constexpr uint64_t kMaxIntermediate = 1u << 20;
constexpr uint64_t kMaxLayers = 1024;
constexpr uint64_t kMaxHeads = 1024;
constexpr uint64_t kMaxHeadDim = 1024;
constexpr uint64_t kMaxPositions = 1u << 24;
constexpr uint64_t kMaxExperts = 1u << 12;  // released models: 128 (Qwen3-MoE), 512 (Qwen3-Next)

struct Reader {
    const json& j;
    const std::string& source;

    [[noreturn]] void bad(const std::string& key, const std::string& why) const {
        fail(Q3N_ERR_BAD_CONFIG, source + ": field '" + key + "' " + why);
    }

    const json* find(const std::string& key) const {
        auto it = j.find(key);
        if (it == j.end() || it->is_null()) return nullptr;
        return &*it;
    }

    uint32_t u32(const std::string& key, uint64_t max, std::optional<uint32_t> fallback = std::nullopt) const {
        const json* v = find(key);
        if (!v) {
            if (fallback) return *fallback;
            bad(key, "is missing");
        }
        if (!v->is_number_integer() && !v->is_number_unsigned()) bad(key, "must be an integer");
        const int64_t x = v->get<int64_t>();
        if (x <= 0) bad(key, "must be positive, got " + std::to_string(x));
        if (static_cast<uint64_t>(x) > max) bad(key, "is absurdly large: " + std::to_string(x));
        return static_cast<uint32_t>(x);
    }

    double number(const json& obj, const std::string& key, double fallback, const std::string& where) const {
        auto it = obj.find(key);
        if (it == obj.end() || it->is_null()) return fallback;
        if (!it->is_number()) bad(where + key, "must be a number");
        return it->get<double>();
    }

    bool boolean(const std::string& key, bool fallback) const {
        const json* v = find(key);
        if (!v) return fallback;
        if (!v->is_boolean()) bad(key, "must be true or false");
        return v->get<bool>();
    }

    std::string string(const std::string& key, const std::string& fallback) const {
        const json* v = find(key);
        if (!v) return fallback;
        if (!v->is_string()) bad(key, "must be a string");
        return v->get<std::string>();
    }
};

std::vector<int32_t> token_ids(const json* v, const std::string& key, const Reader& r) {
    std::vector<int32_t> ids;
    if (!v) return ids;
    auto one = [&](const json& x) {
        if (!x.is_number_integer() || x.get<int64_t>() < 0 || x.get<int64_t>() > INT32_MAX)
            r.bad(key, "must be a non-negative token id or a list of them");
        ids.push_back(static_cast<int32_t>(x.get<int64_t>()));
    };
    if (v->is_array()) {
        for (const auto& x : *v) one(x);
    } else {
        one(*v);
    }
    return ids;
}

void read_mrope(const Reader& r, ModelConfig& c, const json& p, const std::string& where);
void read_quantization(const Reader& r, ModelConfig& c);

void read_rope(const Reader& r, ModelConfig& c) {
    // transformers 5 keeps everything in rope_parameters; releases use rope_theta + rope_scaling.
    const json* params = r.find("rope_parameters");
    const json* scaling = r.find("rope_scaling");
    if (params && !params->is_object()) r.bad("rope_parameters", "must be an object");
    if (scaling && !scaling->is_object()) r.bad("rope_scaling", "must be an object or null");
    const json empty = json::object();
    const json& p = params ? *params : (scaling ? *scaling : empty);
    const std::string where = params ? "rope_parameters." : "rope_scaling.";

    c.rope.theta = r.number(p, "rope_theta", 0.0, where);
    if (c.rope.theta == 0.0) c.rope.theta = r.number(r.j, "rope_theta", 10000.0, "");
    if (!(c.rope.theta > 1.0)) r.bad("rope_theta", "must be greater than 1");
    c.rope.partial_rotary_factor = r.number(p, "partial_rotary_factor", r.number(r.j, "partial_rotary_factor", 1.0, ""), where);
    if (!(c.rope.partial_rotary_factor > 0.0 && c.rope.partial_rotary_factor <= 1.0))
        r.bad(where + "partial_rotary_factor", "must be in (0, 1]");

    std::string type = "default";
    for (const char* key : {"rope_type", "type"}) {
        auto it = p.find(key);
        if (it != p.end() && !it->is_null()) {
            if (!it->is_string()) r.bad(where + key, "must be a string");
            type = it->get<std::string>();
            break;
        }
    }
    c.rope.type = type;
    read_mrope(r, c, p, where);
    if (type == "default") return;
    if (type != "yarn")
        fail(Q3N_ERR_UNSUPPORTED, r.source + ": rope type '" + type + "' is not supported (supported: default, yarn)");

    c.rope.factor = r.number(p, "factor", 0.0, where);
    const double original = r.number(p, "original_max_position_embeddings", 0.0, where);
    if (original > 0) {
        if (original > kMaxPositions) r.bad(where + "original_max_position_embeddings", "is absurdly large");
        c.rope.original_max_position_embeddings = static_cast<uint32_t>(original);
    } else {
        c.rope.original_max_position_embeddings = c.max_position_embeddings;
    }
    // The newest transformers derive the factor from the position ratio only when it is absent;
    // vLLM always uses the explicit factor. Both agree on Qwen's documented settings.
    if (c.rope.factor == 0.0)
        c.rope.factor = static_cast<double>(c.max_position_embeddings) / c.rope.original_max_position_embeddings;
    if (!(c.rope.factor >= 1.0 && c.rope.factor <= 1024.0)) r.bad(where + "factor", "must be in [1, 1024]");
    c.rope.beta_fast = r.number(p, "beta_fast", 32.0, where);
    c.rope.beta_slow = r.number(p, "beta_slow", 1.0, where);
    auto af = p.find("attention_factor");
    if (af != p.end() && !af->is_null()) {
        if (!af->is_number() || !(af->get<double>() > 0)) r.bad(where + "attention_factor", "must be a positive number");
        c.rope.attention_factor = af->get<double>();
    }
    auto tr = p.find("truncate");
    if (tr != p.end() && !tr->is_null()) {
        if (!tr->is_boolean()) r.bad(where + "truncate", "must be true or false");
        c.rope.truncate = tr->get<bool>();
    }
}

void read_mrope(const Reader& r, ModelConfig& c, const json& p, const std::string& where) {
    auto it = p.find("mrope_section");
    if (it == p.end() || it->is_null()) return;
    if (!it->is_array() || it->size() != 3) r.bad(where + "mrope_section", "must be a list of three slot counts (t, h, w)");
    uint64_t total = 0;
    for (const auto& v : *it) {
        if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > static_cast<int64_t>(kMaxHeadDim))
            r.bad(where + "mrope_section", "must hold non-negative slot counts");
        c.rope.mrope_section.push_back(static_cast<uint32_t>(v.get<int64_t>()));
        total += v.get<uint64_t>();
    }
    // Contiguous sections (Qwen2-VL's layout) would silently mix the axes up: only the interleaved
    // layout of Qwen3-VL is implemented.
    auto inter = p.find("mrope_interleaved");
    if (inter != p.end() && !inter->is_null()) {
        if (!inter->is_boolean()) r.bad(where + "mrope_interleaved", "must be true or false");
        if (!inter->get<bool>())
            fail(Q3N_ERR_UNSUPPORTED, r.source + ": mrope_interleaved false (contiguous MRoPE sections) is not supported");
    }
    const double rot = c.head_dim * c.rope.partial_rotary_factor;
    if (static_cast<double>(2 * total) != rot)
        r.bad(where + "mrope_section", "must sum to half the rotary dimension (" + std::to_string(rot / 2) + "), got " +
                                          std::to_string(total));
    // The interleaved assignment must give each axis exactly its section, or the h and w sections
    // were too large for their stride of three.
    const auto axes = mrope_axes(c.rope.mrope_section);
    for (uint32_t a = 0; a < 3; ++a)
        if (static_cast<uint32_t>(std::count(axes.begin(), axes.end(), a)) != c.rope.mrope_section[a])
            r.bad(where + "mrope_section", "does not fit the interleaved layout (h and w sections too large)");
}

// Qwen3-VL: the text model's config is nested; the vision tower's too. Token ids default to the
// released tokenizer's (spec 4.5) as transformers' Qwen3VLConfig does.
ModelConfig read_vision_language(const Reader& r) {
    const json* text = r.find("text_config");
    if (!text->is_object()) r.bad("text_config", "must be an object");
    ModelConfig c = ModelConfig::from_json(*text, r.source + " (text_config)");
    if (c.vision) r.bad("text_config", "must not nest another vision-language config");
    c.architecture.clear();
    if (const json* arch = r.find("architectures")) {
        if (!arch->is_array() || arch->empty() || !(*arch)[0].is_string())
            r.bad("architectures", "must be a non-empty list of names");
        c.architecture = (*arch)[0].get<std::string>();
    }
    c.model_type = r.string("model_type", "");
    const bool moe = c.architecture == "Qwen3VLMoeForConditionalGeneration" || c.model_type == "qwen3_vl_moe";
    if (moe && c.num_experts == 0) r.bad("text_config.num_experts", "is missing (the MoE text model routes experts)");
    if (c.rope.mrope_section.empty())
        r.bad("text_config.rope_scaling.mrope_section", "is missing (Qwen3-VL positions have three axes)");
    if (r.find("tie_word_embeddings")) c.tie_word_embeddings = r.boolean("tie_word_embeddings", false);
    if (c.fp8.enabled) fail(Q3N_ERR_BAD_CONFIG, r.source + ": quantization_config belongs at the top level of a Qwen3-VL config");
    read_quantization(r, c);
    c.vision = VisionConfig::from_json(r.j, r.source);
    if (c.vision->out_hidden_size != c.hidden_size)
        r.bad("vision_config.out_hidden_size", "(" + std::to_string(c.vision->out_hidden_size) +
                                                   ") must equal text_config.hidden_size (" + std::to_string(c.hidden_size) + ")");
    if (c.vision->deepstack_visual_indexes.size() > c.num_layers)
        r.bad("vision_config.deepstack_visual_indexes", "has more taps than the text model has layers");
    auto id = [&](const char* key, int32_t fallback) {
        const json* v = r.find(key);
        if (!v) return fallback;
        auto ids = token_ids(v, key, r);
        if (ids.size() != 1) r.bad(key, "must be one token id");
        if (static_cast<uint32_t>(ids[0]) >= c.vocab_size)
            r.bad(key, "(" + std::to_string(ids[0]) + ") is outside the vocabulary of " + std::to_string(c.vocab_size));
        return ids[0];
    };
    c.image_token_id = id("image_token_id", 151655);
    c.video_token_id = id("video_token_id", 151656);
    c.vision_start_token_id = id("vision_start_token_id", 151652);
    c.vision_end_token_id = id("vision_end_token_id", 151653);
    if (c.image_token_id == c.video_token_id) r.bad("video_token_id", "must differ from image_token_id");
    if (c.bos_token_id < 0)
        if (const json* bos = r.find("bos_token_id")) {
            auto ids = token_ids(bos, "bos_token_id", r);
            if (!ids.empty()) c.bos_token_id = ids[0];
        }
    if (c.eos_token_ids.empty()) c.eos_token_ids = token_ids(r.find("eos_token_id"), "eos_token_id", r);
    return c;
}

void read_quantization(const Reader& r, ModelConfig& c) {
    const json* q = r.find("quantization_config");
    if (!q) return;
    if (!q->is_object()) r.bad("quantization_config", "must be an object");
    Reader qr{*q, r.source};
    const std::string method = qr.string("quant_method", "");
    if (method.find("fp8") == std::string::npos)
        fail(Q3N_ERR_UNSUPPORTED, r.source + ": quantization method '" + method +
                                      "' is not supported (supported: fp8 with 128x128 weight blocks)");
    const std::string scheme = qr.string("activation_scheme", "dynamic");
    if (scheme != "dynamic")
        fail(Q3N_ERR_UNSUPPORTED, r.source + ": FP8 activation_scheme '" + scheme + "' is not supported (dynamic only)");
    const std::string fmt = qr.string("fmt", "e4m3");
    if (fmt != "e4m3") fail(Q3N_ERR_UNSUPPORTED, r.source + ": FP8 format '" + fmt + "' is not supported (e4m3 only)");
    const json* block = qr.find("weight_block_size");
    if (!block || !block->is_array() || block->size() != 2 || !(*block)[0].is_number_integer() ||
        !(*block)[1].is_number_integer())
        fail(Q3N_ERR_UNSUPPORTED, r.source + ": FP8 checkpoints need weight_block_size [128, 128] (per-tensor scales are not supported)");
    c.fp8.block_n = static_cast<uint32_t>((*block)[0].get<int64_t>());
    c.fp8.block_k = static_cast<uint32_t>((*block)[1].get<int64_t>());
    if (c.fp8.block_n != 128 || c.fp8.block_k != 128)
        fail(Q3N_ERR_UNSUPPORTED, r.source + ": FP8 weight_block_size must be [128, 128]");
    for (const char* key : {"modules_to_not_convert", "ignored_layers"}) {
        const json* list = qr.find(key);
        if (!list) continue;
        if (!list->is_array()) qr.bad(std::string("quantization_config.") + key, "must be a list of module names");
        for (const auto& m : *list) {
            if (!m.is_string()) qr.bad(std::string("quantization_config.") + key, "must be a list of module names");
            c.fp8.not_converted.push_back(m.get<std::string>());
        }
    }
    c.fp8.enabled = true;
}

void read_moe(const Reader& r, ModelConfig& c) {
    // A config names experts either by its architecture or by carrying num_experts; then the
    // three sizes that shape the expert tensors are required, and the rest take transformers'
    // defaults. Dense Qwen3 configs have none of these fields and are read exactly as before.
    const bool moe = c.model_type == "qwen3_moe" || c.architecture == "Qwen3MoeForCausalLM" || r.find("num_experts");
    if (!moe) return;
    c.num_experts = r.u32("num_experts", kMaxExperts);
    c.num_experts_per_tok = r.u32("num_experts_per_tok", kMaxExperts);
    if (c.num_experts_per_tok > c.num_experts)
        r.bad("num_experts_per_tok", "(" + std::to_string(c.num_experts_per_tok) + ") must not exceed num_experts (" +
                                         std::to_string(c.num_experts) + ")");
    c.moe_intermediate_size = r.u32("moe_intermediate_size", kMaxIntermediate);
    c.norm_topk_prob = r.boolean("norm_topk_prob", false);
    c.decoder_sparse_step = r.u32("decoder_sparse_step", kMaxLayers, 1);
    if (const json* only = r.find("mlp_only_layers")) {
        if (!only->is_array()) r.bad("mlp_only_layers", "must be a list of layer indices");
        for (const auto& l : *only) {
            if (!l.is_number_integer() || l.get<int64_t>() < 0 || l.get<int64_t>() >= c.num_layers)
                r.bad("mlp_only_layers", "must hold layer indices in [0, " + std::to_string(c.num_layers) + "), got " + l.dump());
            c.mlp_only_layers.push_back(static_cast<uint32_t>(l.get<int64_t>()));
        }
    }
}

void read_next(const Reader& r, ModelConfig& c) {
    const bool next = c.model_type == "qwen3_next" || c.architecture == "Qwen3NextForCausalLM";
    if (!next) return;
    if (c.num_experts == 0) r.bad("num_experts", "is missing (every Qwen3-Next layer has a routed MoE block)");
    c.next_layer_kinds = next_layer_schedule(r.j, r.source);
    c.linear_num_key_heads = r.u32("linear_num_key_heads", kMaxHeads);
    c.linear_num_value_heads = r.u32("linear_num_value_heads", kMaxHeads);
    c.linear_key_head_dim = r.u32("linear_key_head_dim", kMaxHeadDim);
    c.linear_value_head_dim = r.u32("linear_value_head_dim", kMaxHeadDim);
    if (c.linear_num_value_heads % c.linear_num_key_heads != 0)
        r.bad("linear_num_value_heads", "(" + std::to_string(c.linear_num_value_heads) +
                                            ") must be a multiple of linear_num_key_heads (" +
                                            std::to_string(c.linear_num_key_heads) + ")");
    // transformers' default is 4, as in every released config.
    c.linear_conv_kernel_dim = r.u32("linear_conv_kernel_dim", 64, 4u);
    if (c.linear_conv_kernel_dim < 2) r.bad("linear_conv_kernel_dim", "must be at least 2");
    c.shared_expert_intermediate_size = r.u32("shared_expert_intermediate_size", kMaxIntermediate);
    // The MTP count may be 0 (no draft module), so it is not read with u32's positivity rule.
    c.num_nextn_predict_layers = 1;
    if (const json* mtp = r.find("num_nextn_predict_layers")) {
        if (!mtp->is_number_integer() || mtp->get<int64_t>() < 0 || mtp->get<int64_t>() > 64)
            r.bad("num_nextn_predict_layers", "must be an integer in [0, 64]");
        c.num_nextn_predict_layers = static_cast<uint32_t>(mtp->get<int64_t>());
    }
    // Qwen3NextConfig's default partial_rotary_factor is 0.25, not 1: a config that omits it
    // everywhere means a quarter of each head rotates.
    const json* params = r.find("rope_parameters");
    const json* scaling = r.find("rope_scaling");
    const bool explicit_factor = r.find("partial_rotary_factor") ||
                                 (params && params->contains("partial_rotary_factor")) ||
                                 (!params && scaling && scaling->contains("partial_rotary_factor"));
    if (!explicit_factor) c.rope.partial_rotary_factor = 0.25;
    const double rot = c.head_dim * c.rope.partial_rotary_factor;
    if (rot < 2.0 || std::fabs(rot - std::round(rot)) > 1e-9 || static_cast<int64_t>(std::lround(rot)) % 2 != 0)
        r.bad("partial_rotary_factor", "times head_dim (" + std::to_string(c.head_dim) +
                                           ") must be a positive even number of channels");
}

json parse_file(const std::string& path, bool required) {
    std::ifstream in(path, std::ios::binary);
    if (!in) {
        if (!required) return json();
        fail(Q3N_ERR_IO, "cannot open " + path);
    }
    std::stringstream ss;
    ss << in.rdbuf();
    json j = json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) fail(Q3N_ERR_BAD_CONFIG, path + ": not valid JSON");
    if (!j.is_object()) fail(Q3N_ERR_BAD_CONFIG, path + ": must hold a JSON object");
    return j;
}

}  // namespace

std::vector<uint8_t> mrope_axes(const std::vector<uint32_t>& section) {
    uint32_t slots = 0;
    for (uint32_t n : section) slots += n;
    std::vector<uint8_t> axis(slots, 0);
    if (section.size() != 3) return axis;
    for (uint32_t i = 0; i < slots; ++i) {
        if (i % 3 == 1 && i < 3 * section[1]) axis[i] = 1;
        else if (i % 3 == 2 && i < 3 * section[2]) axis[i] = 2;
    }
    return axis;
}

bool Fp8Config::is_excluded(const std::string& module) const {
    for (const auto& prefix : not_converted) {
        if (module == prefix) return true;
        if (module.size() > prefix.size() && module.compare(0, prefix.size(), prefix) == 0 &&
            module[prefix.size()] == '.')
            return true;
    }
    return false;
}

bool ModelConfig::is_moe_layer(size_t layer) const {
    if (num_experts == 0 || (layer + 1) % decoder_sparse_step != 0) return false;
    return std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) == mlp_only_layers.end();
}

ModelConfig ModelConfig::from_json(const json& j, const std::string& source) {
    if (!j.is_object()) fail(Q3N_ERR_BAD_CONFIG, source + ": must hold a JSON object");
    Reader r{j, source};
    if (r.find("text_config")) return read_vision_language(r);
    ModelConfig c;

    const json* arch = r.find("architectures");
    if (arch) {
        if (!arch->is_array() || arch->empty() || !(*arch)[0].is_string())
            r.bad("architectures", "must be a non-empty list of names");
        c.architecture = (*arch)[0].get<std::string>();
    }
    c.model_type = r.string("model_type", "");

    c.vocab_size = r.u32("vocab_size", kMaxVocab);
    c.hidden_size = r.u32("hidden_size", kMaxHidden);
    c.intermediate_size = r.u32("intermediate_size", kMaxIntermediate);
    c.num_layers = r.u32("num_hidden_layers", kMaxLayers);
    c.num_heads = r.u32("num_attention_heads", kMaxHeads);
    c.num_kv_heads = r.u32("num_key_value_heads", kMaxHeads, c.num_heads);
    if (c.num_heads % c.num_kv_heads != 0)
        r.bad("num_key_value_heads", "(" + std::to_string(c.num_kv_heads) + ") must divide num_attention_heads (" +
                                         std::to_string(c.num_heads) + ")");
    // head_dim is explicit in every Qwen3 config; older configs imply hidden / heads.
    if (!r.find("head_dim") && c.hidden_size % c.num_heads != 0)
        r.bad("head_dim", "is missing and hidden_size is not a multiple of num_attention_heads");
    c.head_dim = r.u32("head_dim", kMaxHeadDim, c.hidden_size / c.num_heads);
    if (c.head_dim % 2 != 0) r.bad("head_dim", "must be even for rotary embeddings");
    c.max_position_embeddings = r.u32("max_position_embeddings", kMaxPositions, 32768);

    const json* eps = r.find("rms_norm_eps");
    if (eps) {
        if (!eps->is_number() || !(eps->get<double>() > 0.0) || eps->get<double>() > 1.0)
            r.bad("rms_norm_eps", "must be a number in (0, 1]");
        c.rms_norm_eps = static_cast<float>(eps->get<double>());
    }
    c.tie_word_embeddings = r.boolean("tie_word_embeddings", false);

    const std::string act = r.string("hidden_act", "silu");
    if (act != "silu") fail(Q3N_ERR_UNSUPPORTED, source + ": hidden_act '" + act + "' is not supported (silu only)");
    if (r.boolean("attention_bias", false))
        fail(Q3N_ERR_UNSUPPORTED, source + ": attention_bias true is not supported (no Qwen3 model uses it)");
    if (r.boolean("use_sliding_window", false))
        fail(Q3N_ERR_UNSUPPORTED, source + ": use_sliding_window true is not supported (no released Qwen3 model uses it)");

    c.dtype = r.string("torch_dtype", r.string("dtype", ""));
    read_rope(r, c);
    read_quantization(r, c);
    read_moe(r, c);
    read_next(r, c);

    if (const json* bos = r.find("bos_token_id")) {
        auto ids = token_ids(bos, "bos_token_id", r);
        if (!ids.empty()) c.bos_token_id = ids[0];
    }
    c.eos_token_ids = token_ids(r.find("eos_token_id"), "eos_token_id", r);
    return c;
}

ModelConfig ModelConfig::load(const std::string& directory) {
    const std::string path = directory + "/config.json";
    ModelConfig c = from_json(parse_file(path, true), path);
    // generation_config.json often lists more end-of-turn ids (<|im_end|> and <|endoftext|>).
    const std::string gen_path = directory + "/generation_config.json";
    json gen = parse_file(gen_path, false);
    if (gen.is_object()) {
        Reader gr{gen, gen_path};
        for (int32_t id : token_ids(gr.find("eos_token_id"), "eos_token_id", gr))
            if (std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), id) == c.eos_token_ids.end())
                c.eos_token_ids.push_back(id);
    }
    return c;
}

}  // namespace q3n
