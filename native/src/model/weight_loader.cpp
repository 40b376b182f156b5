#include "model/weight_loader.h"

#include <cmath>
#include <cstring>

#include "core/checked_math.h"
#include "core/error.h"
#include "core/numeric.h"

namespace q3n {
namespace {

std::string shape_str(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

bool is_aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

uint8_t* own(std::vector<std::unique_ptr<uint8_t[]>>& owned, size_t bytes) {
    owned.emplace_back(new (std::nothrow) uint8_t[bytes == 0 ? 1 : bytes]);
    if (!owned.back()) fail(Q3N_ERR_OUT_OF_MEMORY, "out of memory converting weights");
    return owned.back().get();
}

float scalar_to_float(const TensorView& t, size_t i) {
    switch (t.dtype) {
        case StDtype::F32: { float f; std::memcpy(&f, t.data + 4 * i, 4); return f; }
        case StDtype::BF16: { uint16_t h; std::memcpy(&h, t.data + 2 * i, 2); return bf16_to_float(h); }
        case StDtype::F16: { uint16_t h; std::memcpy(&h, t.data + 2 * i, 2); return f16_to_float(h); }
        default: fail(Q3N_ERR_INTERNAL, "scalar_to_float on an unsupported dtype");
    }
}

class CheckpointSource : public WeightSource {
public:
    CheckpointSource(const Checkpoint& ckpt, const ModelConfig& config, std::vector<std::unique_ptr<uint8_t[]>>& owned)
        : ckpt_(ckpt), config_(config), owned_(owned) {}

    bool has(const std::string& name) const override { return ckpt_.has(name); }

    Linear linear(const std::string& module, size_t out, size_t in) override {
        const std::string name = module + ".weight";
        const TensorView& t = ckpt_.get(name);
        check_shape(t, {static_cast<int64_t>(out), static_cast<int64_t>(in)});
        const TensorView* scale = ckpt_.find(module + ".weight_scale_inv");
        if (t.dtype == StDtype::F8_E4M3) {
            if (!scale)
                fail(Q3N_ERR_BAD_CHECKPOINT, "FP8 weight " + name + " has no " + module +
                                                 ".weight_scale_inv in " + t.file + " (without it the weights are meaningless)");
            if (config_.fp8.is_excluded(module))
                fail(Q3N_ERR_BAD_CHECKPOINT, name + " is listed in the quantization_config exclusions but stored as FP8");
            return fp8(t, *scale, out, in);
        }
        if (scale)
            fail(Q3N_ERR_BAD_CHECKPOINT, module + ".weight_scale_inv is present but " + name + " is " +
                                             st_dtype_name(t.dtype) + ", not F8_E4M3");
        return dense(t, out, in);
    }

    Linear table(const std::string& name, size_t rows, size_t cols) override {
        const TensorView& t = ckpt_.get(name);
        check_shape(t, {static_cast<int64_t>(rows), static_cast<int64_t>(cols)});
        if (t.dtype == StDtype::F8_E4M3)
            fail(Q3N_ERR_UNSUPPORTED, name + " is FP8; embeddings are expected in BF16 as in the official checkpoints");
        return dense(t, rows, cols);
    }

    std::vector<float> vector(const std::string& name, size_t size) override {
        const TensorView& t = ckpt_.get(name);
        check_shape(t, {static_cast<int64_t>(size)});
        check_float(t, {StDtype::F32, StDtype::BF16, StDtype::F16});
        std::vector<float> v(size);
        for (size_t i = 0; i < size; ++i) v[i] = scalar_to_float(t, i);
        return v;
    }

    // ---- Added for Qwen3-Next -------------------------------------------------------------------
    std::vector<float> tensor(const std::string& name, const std::vector<size_t>& shape) override {
        const TensorView& t = ckpt_.get(name);
        std::vector<int64_t> want;
        size_t n = 1;
        for (size_t d : shape) {
            want.push_back(static_cast<int64_t>(d));
            n *= d;
        }
        check_shape(t, want);
        check_float(t, {StDtype::F32, StDtype::BF16, StDtype::F16});
        std::vector<float> v(n);
        for (size_t i = 0; i < n; ++i) v[i] = scalar_to_float(t, i);
        return v;
    }

    Linear linear_unquantized(const std::string& module, size_t out, size_t in) override {
        return linear(module, out, in);
    }

    // ---- Added for Qwen3-VL-MoE -----------------------------------------------------------------
    Linear fused_expert_linear(const std::string& name, size_t experts, size_t in, size_t total, size_t expert,
                               size_t first, size_t out) override {
        const TensorView& t = ckpt_.get(name);
        check_shape(t, {static_cast<int64_t>(experts), static_cast<int64_t>(in), static_cast<int64_t>(total)});
        if (t.dtype == StDtype::F8_E4M3)
            fail(Q3N_ERR_UNSUPPORTED, name + " is a fused FP8 expert tensor; its block-scale layout is unverified "
                                             "(spec 5.7), so it is not loaded");
        check_float(t, {StDtype::F32, StDtype::BF16, StDtype::F16});
        if (expert >= experts || first + out > total) fail(Q3N_ERR_INTERNAL, "fused expert slice out of range");
        Linear l;
        l.out = out;
        l.in = in;
        const size_t base = expert * in * total + first;
        if (t.dtype == StDtype::BF16) {
            uint16_t* dst = reinterpret_cast<uint16_t*>(own(owned_, out * in * 2));
            for (size_t o = 0; o < out; ++o)
                for (size_t i = 0; i < in; ++i) std::memcpy(&dst[o * in + i], t.data + 2 * (base + i * total + o), 2);
            l.type = WeightType::BF16;
            l.data = dst;
        } else {
            float* dst = reinterpret_cast<float*>(own(owned_, out * in * 4));
            for (size_t o = 0; o < out; ++o)
                for (size_t i = 0; i < in; ++i) dst[o * in + i] = scalar_to_float(t, base + i * total + o);
            l.type = WeightType::F32;
            l.data = dst;
        }
        return l;
    }

private:
    void check_shape(const TensorView& t, const std::vector<int64_t>& want) const {
        if (t.shape != want)
            fail(Q3N_ERR_BAD_CHECKPOINT, t.name + " in " + t.file + " has shape " + shape_str(t.shape) +
                                             " but the config implies " + shape_str(want));
    }

    void check_float(const TensorView& t, std::initializer_list<StDtype> allowed) const {
        for (StDtype d : allowed)
            if (t.dtype == d) return;
        fail(Q3N_ERR_BAD_CHECKPOINT, t.name + " in " + t.file + " has dtype " + st_dtype_name(t.dtype) +
                                         ", which is not valid for this tensor");
    }

    Linear dense(const TensorView& t, size_t out, size_t in) {
        check_float(t, {StDtype::F32, StDtype::BF16, StDtype::F16});
        Linear l;
        l.out = out;
        l.in = in;
        if (t.dtype == StDtype::F16) {
            // F16 checkpoints are rare; widen them once rather than add a third kernel family.
            float* dst = reinterpret_cast<float*>(own(owned_, out * in * 4));
            for (size_t i = 0; i < out * in; ++i) dst[i] = scalar_to_float(t, i);
            l.type = WeightType::F32;
            l.data = dst;
            return l;
        }
        l.type = t.dtype == StDtype::F32 ? WeightType::F32 : WeightType::BF16;
        const size_t elem = st_dtype_size(t.dtype);
        if (is_aligned(t.data, elem)) {
            l.data = t.data;
        } else {
            // The format does not promise aligned data; copy rather than read misaligned.
            uint8_t* dst = own(owned_, t.nbytes);
            std::memcpy(dst, t.data, t.nbytes);
            l.data = dst;
        }
        return l;
    }

    Linear fp8(const TensorView& t, const TensorView& scale, size_t out, size_t in) {
        const size_t rows = ceil_div(out, config_.fp8.block_n), cols = ceil_div(in, config_.fp8.block_k);
        check_float(scale, {StDtype::F32, StDtype::BF16, StDtype::F16});
        if (scale.shape != std::vector<int64_t>{static_cast<int64_t>(rows), static_cast<int64_t>(cols)})
            fail(Q3N_ERR_BAD_CHECKPOINT, scale.name + " has shape " + shape_str(scale.shape) + " but a " +
                                             std::to_string(out) + "x" + std::to_string(in) +
                                             " weight in 128x128 blocks needs [" + std::to_string(rows) + ", " +
                                             std::to_string(cols) + "]");
        Linear l;
        l.type = WeightType::FP8_E4M3;
        l.out = out;
        l.in = in;
        l.data = t.data;
        l.scale_cols = cols;
        l.block_scales.resize(rows * cols);
        for (size_t i = 0; i < rows * cols; ++i) {
            const float s = scalar_to_float(scale, i);
            if (!std::isfinite(s) || s < 0.0f)
                fail(Q3N_ERR_BAD_CHECKPOINT, scale.name + " holds a negative or non-finite scale at block " + std::to_string(i));
            l.block_scales[i] = s;
        }
        return l;
    }

    const Checkpoint& ckpt_;
    const ModelConfig& config_;
    std::vector<std::unique_ptr<uint8_t[]>>& owned_;
};

// splitmix64: a fast, well-mixed counter hash; each element's value depends only on (seed, tensor, index).
inline uint64_t mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

class DummySource : public WeightSource {
public:
    DummySource(const ModelConfig& config, uint64_t seed, ThreadPool& pool, std::vector<std::unique_ptr<uint8_t[]>>& owned)
        : config_(config), seed_(seed), pool_(pool), owned_(owned) {}

    bool has(const std::string&) const override { return false; }

    Linear linear(const std::string& module, size_t out, size_t in) override {
        if (config_.fp8.enabled && !config_.fp8.is_excluded(module)) return fp8(out, in);
        return bf16(out, in, 1.0f / std::sqrt(static_cast<float>(in)));
    }

    Linear table(const std::string&, size_t rows, size_t cols) override { return bf16(rows, cols, 1.0f); }

    std::vector<float> vector(const std::string&, size_t size) override { return std::vector<float>(size, 1.0f); }

    // ---- Added for Qwen3-Next -------------------------------------------------------------------
    std::vector<float> tensor(const std::string&, const std::vector<size_t>& shape) override {
        size_t n = 1;
        for (size_t d : shape) n *= d;
        const float amplitude = shape.empty() ? 1.0f : 1.0f / std::sqrt(static_cast<float>(shape.back()));
        const uint64_t stream = mix(seed_ + ++tensor_counter_);
        std::vector<float> v(n);
        for (size_t i = 0; i < n; ++i) v[i] = uniform(stream, i) * amplitude;
        return v;
    }

    Linear linear_unquantized(const std::string&, size_t out, size_t in) override {
        return bf16(out, in, 1.0f / std::sqrt(static_cast<float>(in)));
    }

    Linear fused_expert_linear(const std::string&, size_t, size_t in, size_t, size_t, size_t, size_t out) override {
        return bf16(out, in, 1.0f / std::sqrt(static_cast<float>(in)));
    }

private:
    // Uniform in [-1, 1) from the top 24 bits of the hash.
    float uniform(uint64_t stream, size_t i) const {
        return static_cast<float>(mix(stream ^ mix(i)) >> 40) * 0x1p-23f - 1.0f;
    }

    Linear bf16(size_t out, size_t in, float amplitude) {
        const uint64_t stream = mix(seed_ + ++tensor_counter_);
        uint16_t* dst = reinterpret_cast<uint16_t*>(own(owned_, out * in * 2));
        pool_.parallel_for(out * in, [&](size_t b, size_t e) {
            for (size_t i = b; i < e; ++i) dst[i] = float_to_bf16(uniform(stream, i) * amplitude);
        }, 1 << 16);
        Linear l;
        l.type = WeightType::BF16;
        l.data = dst;
        l.out = out;
        l.in = in;
        return l;
    }

    Linear fp8(size_t out, size_t in) {
        const uint64_t stream = mix(seed_ + ++tensor_counter_);
        uint8_t* dst = own(owned_, out * in);
        pool_.parallel_for(out * in, [&](size_t b, size_t e) {
            for (size_t i = b; i < e; ++i) dst[i] = float_to_e4m3(uniform(stream, i) * 448.0f);
        }, 1 << 16);
        Linear l;
        l.type = WeightType::FP8_E4M3;
        l.data = dst;
        l.out = out;
        l.in = in;
        l.scale_cols = ceil_div(in, 128);
        l.block_scales.assign(ceil_div(out, 128) * l.scale_cols, 1.0f / (448.0f * std::sqrt(static_cast<float>(in))));
        return l;
    }

    const ModelConfig& config_;
    uint64_t seed_;
    ThreadPool& pool_;
    std::vector<std::unique_ptr<uint8_t[]>>& owned_;
    uint64_t tensor_counter_ = 0;
};

}  // namespace

std::unique_ptr<WeightSource> checkpoint_source(const Checkpoint& checkpoint, const ModelConfig& config,
                                                std::vector<std::unique_ptr<uint8_t[]>>& owned) {
    return std::make_unique<CheckpointSource>(checkpoint, config, owned);
}

std::unique_ptr<WeightSource> dummy_source(const ModelConfig& config, uint64_t seed, ThreadPool& pool,
                                           std::vector<std::unique_ptr<uint8_t[]>>& owned) {
    return std::make_unique<DummySource>(config, seed, pool, owned);
}

}  // namespace q3n
