// Qwen3 dense on one GPU. The graph is the CPU runner's (model/qwen3_dense.cpp), op for op, so the
// two can be compared at every layer; q, k and v (and gate and up) write side by side into one row.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <vector>

#include "cuda/cuda_backend.h"
#include "cuda/cuda_check.h"
#include "cuda/device_buffer.h"
#include "cuda/ops.h"
#include "cuda/sample.h"
#include "model/qwen3_dense.h"

namespace q3n {

int cuda_device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // no driver: not an error, just no devices
        return 0;
    }
    return n;
}

namespace {

using cuda::DeviceBuffer;

struct LayerOnDevice {
    DeviceBuffer input_norm, post_norm, q_norm, k_norm;
    cuda::DeviceLinear q, k, v, o, gate, up, down;
};

class Qwen3DenseCuda : public ModelRunner {
public:
    Qwen3DenseCuda(const ModelConfig& c, const Qwen3Weights& w, KvCache& kv, int device) : c_(c), kv_(kv), device_(device) {
        Q3N_CUDA(cudaSetDevice(device));
        Q3N_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
        embed_ = upload(w.embed);
        lm_head_ = c.tie_word_embeddings ? embed_ : upload(w.lm_head);
        final_norm_ = upload_vector(w.final_norm);
        layers_.resize(c.num_layers);
        for (size_t l = 0; l < c.num_layers; ++l) {
            const Qwen3LayerWeights& L = w.layers[l];
            LayerOnDevice& D = layers_[l];
            D.input_norm = upload_vector(L.input_norm);
            D.post_norm = upload_vector(L.post_attn_norm);
            D.q_norm = upload_vector(L.q_norm);
            D.k_norm = upload_vector(L.k_norm);
            D.q = upload(L.q);
            D.k = upload(L.k);
            D.v = upload(L.v);
            D.o = upload(L.o);
            D.gate = upload(L.gate);
            D.up = upload(L.up);
            D.down = upload(L.down);
        }
        const cpu::Rope rope = make_rope(c);
        rot_dim_ = static_cast<int>(rope.rot_dim);
        attention_scaling_ = rope.attention_scaling;
        inv_freq_ = upload_vector(rope.inv_freq);

        const KvCacheShape& s = kv.shape();
        const size_t elem = s.dtype == KvDtype::F32 ? 4 : 2;
        layer_kv_bytes_ = s.num_blocks * s.block_size * s.kv_heads * s.head_dim * elem;
        kv_k_.resize(layer_kv_bytes_ * s.num_layers);
        kv_v_.resize(layer_kv_bytes_ * s.num_layers);
        Q3N_CUDA(cudaStreamSynchronize(stream_));
    }

    ~Qwen3DenseCuda() override {
        if (stream_) cudaStreamDestroy(stream_);
    }

    WeightStats weight_stats() const override { return stats_; }

    void forward(const StepBatch& b) override {
        guard([&] { run_forward(b); });
    }

    void logits(const size_t* rows, size_t count, float* out) override {
        guard([&] { run_logits(rows, count, out); });
    }

    // TEMPORARY: the device sampler (cuda/sample.cu) runs only with Q3N_CUDA_SAMPLER=1 until its
    // test passes on the GPU; otherwise logits are copied to the host.
    bool samples_on_device() const override {
        static const bool on = [] { const char* e = std::getenv("Q3N_CUDA_SAMPLER"); return e && e[0] == '1'; }();
        return on;
    }

    void sample(const size_t* rows, size_t count, const DeviceSamplingRequest* requests,
                DeviceSamplingResult* results) override {
        guard([&] { run_sample(rows, count, requests, results); });
    }

private:
    // A device error leaves the context unusable: every later call fails the same way.
    template <typename F>
    void guard(F&& body) {
        if (!device_error_.empty()) fail(Q3N_ERR_DEVICE, "the GPU failed earlier (" + device_error_ + "); restart the process");
        try {
            Q3N_CUDA(cudaSetDevice(device_));
            body();
        } catch (const Error& e) {
            if (e.status() == Q3N_ERR_DEVICE) device_error_ = e.what();
            throw;
        }
    }

    cuda::DeviceLinear upload(const Linear& l) {
        cuda::DeviceLinear d;
        d.type = l.type;
        d.out = static_cast<int>(l.out);
        d.in = static_cast<int>(l.in);
        const size_t elem = l.type == WeightType::F32 ? 4 : l.type == WeightType::BF16 ? 2 : 1;
        owned_.emplace_back(l.out * l.in * elem);
        Q3N_CUDA(cudaMemcpy(owned_.back().get(), l.data, l.out * l.in * elem, cudaMemcpyHostToDevice));
        d.data = owned_.back().get();
        stats_.parameter_count += l.out * l.in;
        stats_.bytes += l.bytes();
        if (l.type == WeightType::FP8_E4M3) {
            stats_.fp8 = true;
            d.scale_cols = static_cast<int>(l.scale_cols);
            owned_.push_back(upload_vector(l.block_scales));
            d.scales = owned_.back().as<float>();
        }
        return d;
    }

    DeviceBuffer upload_vector(const std::vector<float>& v) {
        DeviceBuffer b(v.size() * sizeof(float));
        if (!v.empty()) Q3N_CUDA(cudaMemcpy(b.get(), v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice));
        return b;
    }

    cuda::DeviceKvLayer kv_layer(size_t l) const {
        const KvCacheShape& s = kv_.shape();
        return cuda::DeviceKvLayer{s.dtype, kv_k_.as<uint8_t>() + l * layer_kv_bytes_, kv_v_.as<uint8_t>() + l * layer_kv_bytes_,
                                   static_cast<int>(s.block_size), static_cast<int>(s.kv_heads), static_cast<int>(s.head_dim)};
    }

    // Quantises `x` for the FP8 Linears among `ws` that read it (once for all of them).
    void prepare(const float* x, int rows, int k, std::initializer_list<const cuda::DeviceLinear*> ws) {
        for (const auto* w : ws)
            if (w->type == WeightType::FP8_E4M3) {
                cuda::quantize_fp8(x, rows, k, qf_.as<float>(), qs_.as<float>(), stream_);
                return;
            }
    }

    void lin(const float* x, int rows, const cuda::DeviceLinear& w, float* y, int ldy) {
        cuda::linear(x, qf_.as<float>(), qs_.as<float>(), rows, w, y, ldy, stream_);
    }

    void run_forward(const StepBatch& b) {
        const int T = static_cast<int>(b.tokens.size());
        const int H = c_.hidden_size, I = c_.intermediate_size, d = c_.head_dim;
        const int nH = c_.num_heads, nKV = c_.num_kv_heads, row = (nH + 2 * nKV) * d;
        const int kmax = std::max({H, I, nH * d});

        // Sequences are told apart by their block tables; each gets the blocks its tokens reach.
        std::map<const int32_t*, int> seq_ids;
        std::vector<int> seq_of_token(T), blocks_needed;
        std::vector<const int32_t*> tables;
        const int bs = static_cast<int>(kv_.shape().block_size);
        for (int t = 0; t < T; ++t) {
            auto [it, fresh] = seq_ids.emplace(b.slots[t].block_table, static_cast<int>(tables.size()));
            if (fresh) {
                tables.push_back(b.slots[t].block_table);
                blocks_needed.push_back(0);
            }
            seq_of_token[t] = it->second;
            blocks_needed[it->second] = std::max(blocks_needed[it->second], b.slots[t].position / bs + 1);
        }
        const int max_blocks = *std::max_element(blocks_needed.begin(), blocks_needed.end());
        host_tables_.assign(tables.size() * max_blocks, 0);
        for (size_t s = 0; s < tables.size(); ++s)
            std::copy_n(tables[s], blocks_needed[s], host_tables_.begin() + s * max_blocks);

        tokens_dev_.reserve(T * 4);
        positions_dev_.reserve(T * 4);
        seq_dev_.reserve(T * 4);
        tables_dev_.reserve(host_tables_.size() * 4);
        Q3N_CUDA(cudaMemcpyAsync(tokens_dev_.get(), b.tokens.data(), T * 4, cudaMemcpyHostToDevice, stream_));
        Q3N_CUDA(cudaMemcpyAsync(positions_dev_.get(), b.positions.data(), T * 4, cudaMemcpyHostToDevice, stream_));
        Q3N_CUDA(cudaMemcpyAsync(seq_dev_.get(), seq_of_token.data(), T * 4, cudaMemcpyHostToDevice, stream_));
        Q3N_CUDA(cudaMemcpyAsync(tables_dev_.get(), host_tables_.data(), host_tables_.size() * 4, cudaMemcpyHostToDevice, stream_));

        x_.reserve(size_t(T) * H * 4);
        h_.reserve(size_t(T) * H * 4);
        qkv_.reserve(size_t(T) * row * 4);
        attn_.reserve(size_t(T) * nH * d * 4);
        gu_.reserve(size_t(T) * 2 * I * 4);
        act_.reserve(size_t(T) * I * 4);
        qf_.reserve(size_t(T) * kmax * 4);
        qs_.reserve(size_t(T) * ((kmax + 127) / 128) * 4);

        cuda::DeviceBatch batch{T, positions_dev_.as<int32_t>(), seq_dev_.as<int32_t>(), tables_dev_.as<int32_t>(), max_blocks};
        float *x = x_.as<float>(), *h = h_.as<float>(), *qkv = qkv_.as<float>(), *attn = attn_.as<float>();
        float *gu = gu_.as<float>(), *act = act_.as<float>();
        const float scale = 1.0f / std::sqrt(static_cast<float>(d));

        cuda::embed(embed_, tokens_dev_.as<int32_t>(), T, x, stream_);
        for (size_t l = 0; l < c_.num_layers; ++l) {
            LayerOnDevice& L = layers_[l];
            const cuda::DeviceKvLayer kv = kv_layer(l);
            cuda::rmsnorm(x, L.input_norm.as<float>(), h, T, H, c_.rms_norm_eps, stream_);
            prepare(h, T, H, {&L.q, &L.k, &L.v});
            lin(h, T, L.q, qkv, row);
            lin(h, T, L.k, qkv + nH * d, row);
            lin(h, T, L.v, qkv + (nH + nKV) * d, row);
            cuda::qk_norm_rope_kv_write(qkv, nH, kv, L.q_norm.as<float>(), L.k_norm.as<float>(), c_.rms_norm_eps,
                                        inv_freq_.as<float>(), rot_dim_, attention_scaling_, batch, stream_);
            cuda::attention(kv, qkv, row, nH, scale, batch, attn, stream_);
            prepare(attn, T, nH * d, {&L.o});
            lin(attn, T, L.o, h, H);
            cuda::add_inplace(x, h, T * H, stream_);

            cuda::rmsnorm(x, L.post_norm.as<float>(), h, T, H, c_.rms_norm_eps, stream_);
            prepare(h, T, H, {&L.gate, &L.up});
            lin(h, T, L.gate, gu, 2 * I);
            lin(h, T, L.up, gu + I, 2 * I);
            cuda::silu_mul(gu, T, I, act, stream_);
            prepare(act, T, I, {&L.down});
            lin(act, T, L.down, h, H);
            cuda::add_inplace(x, h, T * H, stream_);
        }
        tokens_ = T;
        // Host arrays above are reused next step: the copies must be done before returning.
        Q3N_CUDA(cudaStreamSynchronize(stream_));
    }

    // Logits of the given rows into logits_ on the device.
    void device_logits(const size_t* rows, size_t count) {
        const int H = c_.hidden_size, V = c_.vocab_size;
        std::vector<int32_t> r(count);
        for (size_t i = 0; i < count; ++i) {
            if (rows[i] >= tokens_) fail(Q3N_ERR_INTERNAL, "logits requested for a row the last forward did not compute");
            r[i] = static_cast<int32_t>(rows[i]);
        }
        rows_dev_.reserve(count * 4);
        final_.reserve(count * H * 4);
        logits_.reserve(count * size_t(V) * 4);
        qf_.reserve(count * size_t(H) * 4);
        qs_.reserve(count * size_t((H + 127) / 128) * 4);
        Q3N_CUDA(cudaMemcpyAsync(rows_dev_.get(), r.data(), count * 4, cudaMemcpyHostToDevice, stream_));
        cuda::gather_rows(x_.as<float>(), rows_dev_.as<int32_t>(), static_cast<int>(count), H, final_.as<float>(), stream_);
        cuda::rmsnorm(final_.as<float>(), final_norm_.as<float>(), final_.as<float>(), static_cast<int>(count), H,
                      c_.rms_norm_eps, stream_);
        prepare(final_.as<float>(), static_cast<int>(count), H, {&lm_head_});
        lin(final_.as<float>(), static_cast<int>(count), lm_head_, logits_.as<float>(), V);
        // r is read by the copy above: finish it before r goes out of scope.
        Q3N_CUDA(cudaStreamSynchronize(stream_));
    }

    void run_sample(const size_t* rows, size_t count, const DeviceSamplingRequest* requests, DeviceSamplingResult* results) {
        const int V = c_.vocab_size;
        device_logits(rows, count);
        std::vector<cuda::DeviceSampleParams> params(count);
        std::vector<int32_t> ids, counts;
        for (size_t i = 0; i < count; ++i) {
            const q3n_sampling_params& p = *requests[i].params;
            params[i] = cuda::DeviceSampleParams{p.temperature, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
                                                 p.frequency_penalty, p.top_k, static_cast<int32_t>(p.top_logprobs),
                                                 p.logprobs ? 1 : 0, static_cast<int32_t>(ids.size()),
                                                 static_cast<int32_t>(requests[i].penalty_count), p.seed, requests[i].counter};
            ids.insert(ids.end(), requests[i].penalty_ids, requests[i].penalty_ids + requests[i].penalty_count);
            counts.insert(counts.end(), requests[i].penalty_counts, requests[i].penalty_counts + requests[i].penalty_count);
        }
        sample_params_.reserve(count * sizeof(cuda::DeviceSampleParams));
        sample_results_.reserve(count * sizeof(cuda::DeviceSampleResult));
        sample_work_.reserve(count * size_t(V) * 4);
        penalty_ids_.reserve(std::max<size_t>(ids.size(), 1) * 4);
        penalty_counts_.reserve(std::max<size_t>(counts.size(), 1) * 4);
        Q3N_CUDA(cudaMemcpyAsync(sample_params_.get(), params.data(), count * sizeof(cuda::DeviceSampleParams),
                                 cudaMemcpyHostToDevice, stream_));
        if (!ids.empty()) {
            Q3N_CUDA(cudaMemcpyAsync(penalty_ids_.get(), ids.data(), ids.size() * 4, cudaMemcpyHostToDevice, stream_));
            Q3N_CUDA(cudaMemcpyAsync(penalty_counts_.get(), counts.data(), counts.size() * 4, cudaMemcpyHostToDevice, stream_));
        }
        cuda::sample_rows(logits_.as<float>(), sample_work_.as<float>(), static_cast<int>(count), V,
                          sample_params_.as<cuda::DeviceSampleParams>(), penalty_ids_.as<int32_t>(),
                          penalty_counts_.as<int32_t>(), sample_results_.as<cuda::DeviceSampleResult>(), stream_);
        std::vector<cuda::DeviceSampleResult> out(count);
        Q3N_CUDA(cudaMemcpyAsync(out.data(), sample_results_.get(), count * sizeof(cuda::DeviceSampleResult),
                                 cudaMemcpyDeviceToHost, stream_));
        Q3N_CUDA(cudaStreamSynchronize(stream_));
        for (size_t i = 0; i < count; ++i) {
            results[i].token = out[i].token;
            results[i].fallback = out[i].fallback != 0;
            results[i].non_finite = out[i].non_finite != 0;
            results[i].bad_index = out[i].bad_index;
            results[i].logprob = out[i].logprob;
        }
    }

    void run_logits(const size_t* rows, size_t count, float* out) {
        device_logits(rows, count);
        Q3N_CUDA(cudaMemcpyAsync(out, logits_.get(), count * size_t(c_.vocab_size) * 4, cudaMemcpyDeviceToHost, stream_));
        Q3N_CUDA(cudaStreamSynchronize(stream_));
    }

    ModelConfig c_;
    KvCache& kv_;
    int device_;
    cudaStream_t stream_ = nullptr;
    std::vector<DeviceBuffer> owned_;
    cuda::DeviceLinear embed_, lm_head_;
    DeviceBuffer final_norm_, inv_freq_;
    std::vector<LayerOnDevice> layers_;
    int rot_dim_ = 0;
    float attention_scaling_ = 1.0f;
    size_t layer_kv_bytes_ = 0;
    DeviceBuffer kv_k_, kv_v_;
    DeviceBuffer tokens_dev_, positions_dev_, seq_dev_, tables_dev_, rows_dev_;
    DeviceBuffer x_, h_, qkv_, attn_, gu_, act_, qf_, qs_, final_, logits_;
    DeviceBuffer sample_params_, sample_results_, sample_work_, penalty_ids_, penalty_counts_;
    std::vector<int32_t> host_tables_;
    size_t tokens_ = 0;
    WeightStats stats_;
    std::string device_error_;
};

}  // namespace

std::unique_ptr<ModelRunner> make_qwen3_dense_cuda(const ModelConfig& config, const Qwen3Weights& weights, KvCache& kv,
                                                   int device) {
    return std::make_unique<Qwen3DenseCuda>(config, weights, kv, device);
}

}  // namespace q3n
