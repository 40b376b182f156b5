#include "model/qwen3_vl.h"

#include <algorithm>

#include "core/error.h"
#include "model/qwen3_dense.h"
#include "model/qwen3_moe.h"
#include "model/qwen3_vl_vision.h"

namespace q3n {
namespace {

const char* const kTextPrefix = "model.language_model.";

WeightStats vision_stats(const Qwen3VlVisionWeights& w) {
    WeightStats s;
    auto add = [&](const Linear& l) {
        s.parameter_count += l.out * l.in;
        s.bytes += l.bytes();
        s.fp8 = s.fp8 || l.type == WeightType::FP8_E4M3;
    };
    auto vec = [&](const std::vector<float>& v) {
        s.parameter_count += v.size();
        s.bytes += v.size() * sizeof(float);
    };
    auto affine = [&](const VisionLinear& l) {
        add(l.w);
        vec(l.b);
    };
    auto merger = [&](const VisionMergerWeights& m) {
        vec(m.norm_w);
        vec(m.norm_b);
        affine(m.fc1);
        affine(m.fc2);
    };
    affine(w.patch_embed);
    add(w.pos_embed);
    for (const auto& b : w.blocks) {
        for (const auto* v : {&b.norm1_w, &b.norm1_b, &b.norm2_w, &b.norm2_b}) vec(*v);
        for (const auto* l : {&b.qkv, &b.proj, &b.fc1, &b.fc2}) affine(*l);
    }
    merger(w.merger);
    for (const auto& m : w.deepstack) merger(m);
    return s;
}

class Qwen3VlCpu : public ModelRunner {
public:
    Qwen3VlCpu(std::unique_ptr<ModelRunner> text, std::unique_ptr<Qwen3VlVision> vision, WeightStats vision_stats,
               std::vector<std::unique_ptr<uint8_t[]>> vision_owned, ThreadPool& pool)
        : vision_owned_(std::move(vision_owned)),
          text_(std::move(text)),
          vision_(std::move(vision)),
          vision_stats_(vision_stats),
          pool_(pool) {}

    void forward(const StepBatch& batch) override { text_->forward(batch); }
    void logits(const size_t* rows, size_t count, float* out) override { text_->logits(rows, count, out); }

    WeightStats weight_stats() const override {
        WeightStats s = text_->weight_stats();
        s.parameter_count += vision_stats_.parameter_count;
        s.bytes += vision_stats_.bytes;
        // The tower is BF16 in the FP8 releases too (spec 5.6); the checkpoint's format is the text model's.
        return s;
    }

    bool has_vision() const override { return true; }

    void encode_vision(const float* pixels, const GridThw& grid, std::vector<float>& features) override {
        const size_t patches = size_t(grid.t) * grid.h * grid.w;
        const VisionOutput out = vision_->forward(pixels, patches, {grid}, pool_);
        const size_t H = vision_->config().out_hidden_size, taps = out.deepstack.size(), width = (1 + taps) * H;
        // One row per merged token holds everything a decoder layer may add to it, so a step's batch
        // needs one pointer per placeholder row.
        features.resize(out.tokens * width);
        for (size_t t = 0; t < out.tokens; ++t) {
            float* row = features.data() + t * width;
            std::copy_n(out.merged.data() + t * H, H, row);
            for (size_t k = 0; k < taps; ++k) std::copy_n(out.deepstack[k].data() + t * H, H, row + (k + 1) * H);
        }
    }

private:
    std::vector<std::unique_ptr<uint8_t[]>> vision_owned_;  // what the tower's widened tensors point into
    std::unique_ptr<ModelRunner> text_;
    std::unique_ptr<Qwen3VlVision> vision_;
    WeightStats vision_stats_;
    ThreadPool& pool_;
};

}  // namespace

std::unique_ptr<ModelRunner> make_qwen3_vl_cpu(const ModelConfig& c, WeightSource& src, KvCache& kv, ThreadPool& pool,
                                               const std::function<bool(float)>& progress) {
    if (!c.vision) fail(Q3N_ERR_BAD_CONFIG, "a Qwen3-VL architecture needs vision_config and text_config");
    std::vector<std::unique_ptr<uint8_t[]>> owned;
    Qwen3VlVisionWeights vw = load_qwen3_vl_vision(src, *c.vision, owned);
    if (vw.deepstack.size() > c.num_layers)
        fail(Q3N_ERR_BAD_CONFIG, "more DeepStack taps than text decoder layers");
    const WeightStats vs = vision_stats(vw);
    auto vision = std::make_unique<Qwen3VlVision>(*c.vision, std::move(vw));
    std::unique_ptr<ModelRunner> text;
    if (c.num_experts > 0)
        text = make_qwen3_moe_cpu(c, load_qwen3_moe_weights(c, src, progress, kTextPrefix), kv, pool);
    else
        text = make_qwen3_dense_cpu(c, load_qwen3_weights(c, src, progress, kTextPrefix), kv, pool);
    return std::make_unique<Qwen3VlCpu>(std::move(text), std::move(vision), vs, std::move(owned), pool);
}

}  // namespace q3n
