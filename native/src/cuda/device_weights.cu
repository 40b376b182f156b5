#include "cuda/device_weights.h"

#include <algorithm>
#include <string>

#include "core/error.h"

namespace q3n::cuda {
namespace {

size_t elem_bytes(WeightType t) { return t == WeightType::F32 ? 4 : t == WeightType::BF16 ? 2 : 1; }

constexpr size_t align256(size_t b) { return (b + 255) & ~size_t{255}; }

}  // namespace

void DeviceWeights::count(const Linear& l) {
    stats_.parameter_count += l.out * l.in;
    stats_.bytes += l.bytes();
    if (l.type == WeightType::FP8_E4M3) stats_.fp8 = true;
}

void DeviceWeights::attach_gemm_scales(DeviceLinear& d, const std::vector<float>& scales) {
    if (!gemm_) return;
    const std::vector<float> g = gemm_fp8_weight_scales(scales, d.out, d.in, stream_);
    if (g.empty()) return;
    d.gemm_scales = upload_array(g);
    max_gemm_out_ = std::max(max_gemm_out_, d.out);
}

DeviceLinear DeviceWeights::upload(const Linear& l, bool layer) {
    DeviceLinear d;
    d.type = l.type;
    d.out = static_cast<int>(l.out);
    d.in = static_cast<int>(l.in);
    const size_t bytes = l.out * l.in * elem_bytes(l.type);
    owned_.emplace_back(std::max<size_t>(bytes, 4));
    if (bytes) Q3N_CUDA(cudaMemcpy(owned_.back().get(), l.data, bytes, cudaMemcpyHostToDevice));
    d.data = owned_.back().get();
    count(l);
    if (layer && l.type == WeightType::BF16) bf16_max_in_ = std::max(bf16_max_in_, d.in);
    if (l.type == WeightType::FP8_E4M3) {
        d.scale_cols = static_cast<int>(l.scale_cols);
        d.scales = upload_array(l.block_scales);
        if (layer) attach_gemm_scales(d, l.block_scales);
    }
    return d;
}

StackedLinear DeviceWeights::upload_stacked(std::initializer_list<const Linear*> parts) {
    StackedLinear s;
    const Linear& first = **parts.begin();
    bool stackable = true;
    for (const Linear* l : parts)
        stackable = stackable && l->type == first.type && l->in == first.in &&
                    (l->type != WeightType::FP8_E4M3 || (l->out % 128 == 0 && l->scale_cols == first.scale_cols));
    for (const Linear* l : parts) s.out += static_cast<int>(l->out);
    if (stackable) {
        // Rows of all parts one after another; FP8 scale rows likewise, as each part's out is a
        // multiple of the 128-row scale block.
        const size_t elem = elem_bytes(first.type);
        owned_.emplace_back(static_cast<size_t>(s.out) * first.in * elem);
        DeviceBuffer& data = owned_.back();
        DeviceLinear d;
        d.type = first.type;
        d.out = s.out;
        d.in = static_cast<int>(first.in);
        std::vector<float> scales;
        size_t at = 0;
        for (const Linear* l : parts) {
            Q3N_CUDA(cudaMemcpy(data.as<uint8_t>() + at, l->data, l->out * l->in * elem, cudaMemcpyHostToDevice));
            at += l->out * l->in * elem;
            scales.insert(scales.end(), l->block_scales.begin(), l->block_scales.end());
            count(*l);
        }
        d.data = data.get();
        if (first.type == WeightType::BF16) bf16_max_in_ = std::max(bf16_max_in_, d.in);
        if (first.type == WeightType::FP8_E4M3) {
            d.scale_cols = static_cast<int>(first.scale_cols);
            d.scales = upload_array(scales);
            attach_gemm_scales(d, scales);
        }
        s.parts.push_back(d);
        s.offsets.push_back(0);
    } else {
        int offset = 0;
        for (const Linear* l : parts) {
            s.parts.push_back(upload(*l));
            s.offsets.push_back(offset);
            offset += static_cast<int>(l->out);
        }
    }
    for (const auto& p : s.parts) (is_fp8(p) ? s.fp8_input : s.f32_input) = true;
    return s;
}

bool DeviceWeights::size_gemm_scratch(GemmScratch& scratch, size_t rows, size_t max_in) const {
    bool moved = false;
    auto grow = [&](DeviceBuffer& b, size_t bytes) {
        if (bytes > b.bytes()) {
            b.resize(bytes);
            moved = true;
        }
    };
    if (bf16_max_in_ > 0 && rows > kGemvMaxRows)
        grow(scratch.hilo, linear_bf16_tc_scratch_bytes(static_cast<int>(rows), bf16_max_in_));
    if (!gemm_) return moved;
    const size_t padded = (rows + 15) / 16 * 16;
    grow(scratch.q8, padded * max_in);
    grow(scratch.scales, padded * ((max_in + 127) / 128) * 4);
    grow(scratch.transposed, padded * static_cast<size_t>(max_gemm_out_) * 4);
    return moved;
}

const float* DeviceWeights::upload_vector(const std::vector<float>& v, float offset, bool counted) {
    if (counted) count(v.size(), v.size() * sizeof(float));
    if (offset == 0.0f) return upload_array(v);
    std::vector<float> shifted(v.size());
    for (size_t i = 0; i < v.size(); ++i) shifted[i] = offset + v[i];
    return upload_array(shifted);
}

DeviceMoeBlock DeviceWeights::upload_moe(const Linear& router, const std::vector<cpu::MoeExpert>& experts, size_t top_k,
                                         const cpu::MoeExpert* shared, const Linear* shared_gate) {
    DeviceMoeBlock b;
    // Qwen3-Next's router and shared-expert gate read the same input and are each a launch's fixed
    // cost at decode, so the gate becomes the router's row E and one GEMV computes both. Not for FP8,
    // where the gate's row would need a 128-row scale block of its own; both are high-precision
    // Linears (WeightSource::linear_unquantized).
    const bool stack = shared_gate && shared_gate->out == 1 && shared_gate->type == router.type &&
                       shared_gate->in == router.in &&
                       (router.type == WeightType::BF16 || router.type == WeightType::F32);
    if (stack) {
        b.router_gate = upload_stacked({&router, shared_gate}).parts.at(0);
        b.router = b.router_gate;
        b.router.out = static_cast<int>(router.out);
        b.shared_gate = b.router_gate;
        b.shared_gate.out = 1;
        b.shared_gate.data =
            static_cast<const uint8_t*>(b.router_gate.data) + router.out * router.in * elem_bytes(router.type);
    } else {
        b.router = upload(router);
        if (shared_gate) b.shared_gate = upload(*shared_gate);
    }

    std::vector<const cpu::MoeExpert*> all;
    for (const auto& e : experts) all.push_back(&e);
    if (shared) all.push_back(shared);
    const WeightType type = experts.at(0).gate.type;
    size_t data_bytes = 0, scale_count = 0;
    for (const cpu::MoeExpert* e : all)
        for (const Linear* l : {&e->gate, &e->up, &e->down}) {
            if (l->type != type)
                fail(Q3N_ERR_UNSUPPORTED, std::string("MoE experts of mixed dtypes (") + weight_type_name(type) + " and " +
                                              weight_type_name(l->type) + ") are not supported on the GPU");
            data_bytes += align256(l->out * l->in * elem_bytes(type));
            scale_count += l->block_scales.size();
        }
    if (type != WeightType::BF16 && type != WeightType::FP8_E4M3)
        fail(Q3N_ERR_UNSUPPORTED, "MoE experts must be BF16 or FP8 on the GPU");

    // One allocation for the block's expert weights and one for their scales: thousands of experts
    // would otherwise be thousands of cudaMallocs.
    owned_.emplace_back(std::max<size_t>(data_bytes, 4));
    uint8_t* data = owned_.back().as<uint8_t>();
    owned_.emplace_back(std::max<size_t>(scale_count * sizeof(float), 4));
    float* scales = owned_.back().as<float>();
    std::vector<DeviceMoeExpert> desc;
    size_t at = 0, s_at = 0;
    for (const cpu::MoeExpert* e : all) {
        DeviceMoeExpert d;
        DeviceLinear* dst[3] = {&d.gate, &d.up, &d.down};
        const Linear* src[3] = {&e->gate, &e->up, &e->down};
        for (int i = 0; i < 3; ++i) {
            const Linear& l = *src[i];
            const size_t bytes = l.out * l.in * elem_bytes(type);
            Q3N_CUDA(cudaMemcpy(data + at, l.data, bytes, cudaMemcpyHostToDevice));
            DeviceLinear& o = *dst[i];
            o.type = type;
            o.data = data + at;
            o.out = static_cast<int>(l.out);
            o.in = static_cast<int>(l.in);
            at += align256(bytes);
            if (type == WeightType::FP8_E4M3) {
                Q3N_CUDA(cudaMemcpy(scales + s_at, l.block_scales.data(), l.block_scales.size() * sizeof(float),
                                    cudaMemcpyHostToDevice));
                o.scales = scales + s_at;
                o.scale_cols = static_cast<int>(l.scale_cols);
                s_at += l.block_scales.size();
            }
            count(l);
        }
        desc.push_back(d);
    }
    b.moe.type = type;
    b.moe.experts = upload_array(desc);
    b.moe.num_experts = static_cast<int>(experts.size());
    b.moe.top_k = static_cast<int>(top_k);
    b.moe.hidden = static_cast<int>(router.in);
    b.moe.inter = static_cast<int>(experts[0].gate.out);
    b.moe.has_shared = shared != nullptr;
    b.moe.shared_inter = shared ? static_cast<int>(shared->gate.out) : 0;
    return b;
}

void project(const float* x, const float* q, const float* qs, int rows, const DeviceLinear& w, float* y, int ldy,
             GemmScratch& scratch, cudaStream_t stream) {
    if (rows > kGemvMaxRows && w.gemm_scales && gemm_fp8(q, qs, rows, w, y, ldy, scratch, stream)) return;
    if (rows > kGemvMaxRows && w.type == WeightType::BF16 && linear_bf16_tc(x, rows, w, y, ldy, scratch, stream)) return;
    linear(x, q, qs, rows, w, y, ldy, stream);
}

void project(const float* x, const float* q, const float* qs, int rows, const StackedLinear& w, float* y, int ldy,
             GemmScratch& scratch, cudaStream_t stream) {
    for (size_t i = 0; i < w.parts.size(); ++i) project(x, q, qs, rows, w.parts[i], y + w.offsets[i], ldy, scratch, stream);
}

void project_packed(const float* x, const Fp8Out& q, int rows, const DeviceLinear& w, float* y, int ldy,
                    GemmScratch& scratch, cudaStream_t stream) {
    if (w.type != WeightType::FP8_E4M3) return project(x, nullptr, nullptr, rows, w, y, ldy, scratch, stream);
    if (!gemm_fp8_packed(q, rows, w, y, ldy, scratch, stream))
        fail(Q3N_ERR_INTERNAL, "FP8 linear given packed activations that cuBLASLt's GEMM cannot take");
}

void project_packed(const float* x, const Fp8Out& q, int rows, const StackedLinear& w, float* y, int ldy,
                    GemmScratch& scratch, cudaStream_t stream) {
    for (size_t i = 0; i < w.parts.size(); ++i) project_packed(x, q, rows, w.parts[i], y + w.offsets[i], ldy, scratch, stream);
}

bool takes_packed(const DeviceLinear& w, int ldy, int offset) {
    // A part's columns start 16-byte aligned in the runner's (aligned) output rows.
    return w.type != WeightType::FP8_E4M3 || (gemm_fp8_takes(w, ldy) && offset % 4 == 0);
}

bool takes_packed(const StackedLinear& w, int ldy) {
    for (size_t i = 0; i < w.parts.size(); ++i)
        if (!takes_packed(w.parts[i], ldy, w.offsets[i])) return false;
    return true;
}

}  // namespace q3n::cuda
