// Qwen3 dense on one GPU. The graph is the CPU runner's (model/qwen3_dense.cpp) with neighbouring
// ops fused (residual add + RMSNorm + FP8 quantisation; SwiGLU + quantisation) and q|k|v and
// gate|up stored as one matrix each, so a decode layer is seven kernels. Decode-only steps replay a
// CUDA graph captured per (batch size, block-table width): at batch 1 the ~250 launches of a step
// would otherwise cost more than the weight stream. Logits stay on the device: sampling and
// log-probabilities run there (cuda/sample.cu).
#include <algorithm>
#include <bit>
#include <cmath>
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

// Projections that read the same input: one matrix when they can be stacked (same dtype and, for
// FP8, every part a whole number of 128-row scale blocks), else one Linear per part.
struct StackedLinear {
    std::vector<cuda::DeviceLinear> parts;
    std::vector<int> offsets;  // each part's first output column in the shared output row
    bool fp8_input = false;    // some part reads quantised activations
    bool f32_input = false;    // some part reads fp32 activations
};

struct LayerOnDevice {
    DeviceBuffer input_norm, post_norm, q_norm, k_norm;
    StackedLinear qkv, gate_up;
    cuda::DeviceLinear o, down;
};

// Decode steps at most this wide replay captured graphs; wider ones (and prefills) launch directly.
constexpr int kMaxGraphTokens = 256;

bool is_fp8(const cuda::DeviceLinear& l) { return l.type == WeightType::FP8_E4M3; }

class Qwen3DenseCuda : public ModelRunner {
public:
    Qwen3DenseCuda(const ModelConfig& c, const Qwen3Weights& w, KvCache& kv, int device) : c_(c), kv_(kv), device_(device) {
        Q3N_CUDA(cudaSetDevice(device));
        Q3N_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
        const bool any_fp8 = std::any_of(w.layers.begin(), w.layers.end(), [](const Qwen3LayerWeights& L) {
            return L.gate.type == WeightType::FP8_E4M3 || L.q.type == WeightType::FP8_E4M3;
        });
        gemm_ = any_fp8 && cuda::gemm_fp8_available(stream_);
        embed_ = upload(w.embed, false);
        lm_head_ = c.tie_word_embeddings ? embed_ : upload(w.lm_head, false);
        final_norm_ = upload_vector(w.final_norm);
        layers_.resize(c.num_layers);
        for (size_t l = 0; l < c.num_layers; ++l) {
            const Qwen3LayerWeights& L = w.layers[l];
            LayerOnDevice& D = layers_[l];
            D.input_norm = upload_vector(L.input_norm);
            D.post_norm = upload_vector(L.post_attn_norm);
            D.q_norm = upload_vector(L.q_norm);
            D.k_norm = upload_vector(L.k_norm);
            D.qkv = upload_stacked({&L.q, &L.k, &L.v});
            D.o = upload(L.o);
            D.gate_up = upload_stacked({&L.gate, &L.up});
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
        size_activations(kMaxGraphTokens);
        Q3N_CUDA(cudaStreamSynchronize(stream_));
    }

    ~Qwen3DenseCuda() override {
        drop_graphs();
        if (stream_) cudaStreamDestroy(stream_);
    }

    WeightStats weight_stats() const override { return stats_; }

    void forward(const StepBatch& b) override {
        guard([&] { run_forward(b); });
    }

    void logits(const size_t* rows, size_t count, float* out) override {
        guard([&] { run_logits(rows, count, out); });
    }

    bool samples_on_device() const override { return true; }

    void sample(const size_t* rows, size_t count, const DeviceSamplingRequest* requests,
                DeviceSamplingResult* results) override {
        guard([&] { run_sample(rows, count, requests, results); });
    }

    void score(const size_t* rows, size_t count, const int32_t* tokens, uint32_t top_k, q3n_token_logprob* out) override {
        guard([&] { run_score(rows, count, tokens, top_k, out); });
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

    cuda::DeviceLinear upload(const Linear& l, bool layer = true) {
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
            if (layer) attach_gemm_scales(d, l.block_scales);
        }
        return d;
    }

    void attach_gemm_scales(cuda::DeviceLinear& d, const std::vector<float>& scales) {
        if (!gemm_) return;
        const std::vector<float> g = cuda::gemm_fp8_weight_scales(scales, d.out, d.in, stream_);
        if (g.empty()) return;
        owned_.push_back(upload_vector(g));
        d.gemm_scales = owned_.back().as<float>();
        max_gemm_out_ = std::max(max_gemm_out_, d.out);
    }

    StackedLinear upload_stacked(std::initializer_list<const Linear*> parts) {
        StackedLinear s;
        const Linear& first = **parts.begin();
        bool stackable = true;
        for (const Linear* l : parts)
            stackable = stackable && l->type == first.type && l->in == first.in &&
                        (l->type != WeightType::FP8_E4M3 || (l->out % 128 == 0 && l->scale_cols == first.scale_cols));
        int offset = 0;
        if (stackable) {
            // Rows of all parts one after another; FP8 scale rows likewise, as each part's out is a
            // multiple of the 128-row scale block.
            const size_t elem = first.type == WeightType::F32 ? 4 : first.type == WeightType::BF16 ? 2 : 1;
            size_t rows = 0;
            for (const Linear* l : parts) rows += l->out;
            owned_.emplace_back(rows * first.in * elem);
            DeviceBuffer& data = owned_.back();
            cuda::DeviceLinear d;
            d.type = first.type;
            d.out = static_cast<int>(rows);
            d.in = static_cast<int>(first.in);
            std::vector<float> scales;
            size_t at = 0;
            for (const Linear* l : parts) {
                Q3N_CUDA(cudaMemcpy(data.as<uint8_t>() + at, l->data, l->out * l->in * elem, cudaMemcpyHostToDevice));
                at += l->out * l->in * elem;
                scales.insert(scales.end(), l->block_scales.begin(), l->block_scales.end());
                stats_.parameter_count += l->out * l->in;
                stats_.bytes += l->bytes();
            }
            d.data = data.get();
            if (first.type == WeightType::FP8_E4M3) {
                stats_.fp8 = true;
                d.scale_cols = static_cast<int>(first.scale_cols);
                owned_.push_back(upload_vector(scales));
                d.scales = owned_.back().as<float>();
                attach_gemm_scales(d, scales);
            }
            s.parts.push_back(d);
            s.offsets.push_back(0);
        } else {
            for (const Linear* l : parts) {
                s.parts.push_back(upload(*l));
                s.offsets.push_back(offset);
                offset += static_cast<int>(l->out);
            }
        }
        for (const auto& p : s.parts) (is_fp8(p) ? s.fp8_input : s.f32_input) = true;
        return s;
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

    // Every activation buffer sized for `tokens` rows. A reallocation moves buffers that captured
    // graphs point at, so it drops them.
    void size_activations(int tokens) {
        const size_t T = static_cast<size_t>(std::max(tokens, 1));
        const int H = c_.hidden_size, I = c_.intermediate_size, d = c_.head_dim;
        const size_t row = static_cast<size_t>(c_.num_heads + 2 * c_.num_kv_heads) * d;
        const size_t kmax = std::max<size_t>({size_t(H), size_t(I), size_t(c_.num_heads) * d});
        bool moved = false;
        auto grow = [&](DeviceBuffer& b, size_t bytes) {
            if (bytes > b.bytes()) {
                b.resize(bytes);
                moved = true;
            }
        };
        grow(tokens_dev_, T * 4);
        grow(positions_dev_, T * 4);
        grow(seq_dev_, T * 4);
        grow(x_, T * H * 4);
        grow(h_, T * H * 4);
        grow(hn_, T * H * 4);
        grow(qkv_, T * row * 4);
        grow(attn_, T * c_.num_heads * d * 4);
        grow(gu_, T * 2 * I * 4);
        grow(act_, T * I * 4);
        grow(qf_, T * kmax * 4);
        grow(qs_, T * ((kmax + 127) / 128) * 4);
        grow(attn_ws_, cuda::attention_workspace_bytes(static_cast<int>(T), c_.num_heads, c_.num_kv_heads, d));
        if (gemm_) {
            const size_t Tp = (T + 15) / 16 * 16;  // gemm_fp8 pads rows to 16
            grow(gemm_scratch_.q8, Tp * kmax);
            grow(gemm_scratch_.scales, Tp * ((kmax + 127) / 128) * 4);
            grow(gemm_scratch_.transposed, Tp * static_cast<size_t>(max_gemm_out_) * 4);
        }
        if (moved) drop_graphs();
    }

    void drop_graphs() {
        for (auto& [key, exec] : graphs_) cudaGraphExecDestroy(exec);
        graphs_.clear();
    }

    // Up to 8 rows (one column tile of linear_fp8_mma) the weight stream of linear() wins; from 16
    // rows cuBLASLt's GEMM does (H100: 12.8 against 22.2 us for q|k|v at 16 rows, bench_cuda_ops).
    static constexpr int kGemvMaxRows = 8;

    void lin(const float* x, int rows, const cuda::DeviceLinear& w, float* y, int ldy) {
        if (rows > kGemvMaxRows && w.gemm_scales &&
            cuda::gemm_fp8(qf_.as<float>(), qs_.as<float>(), rows, w, y, ldy, gemm_scratch_, stream_))
            return;
        cuda::linear(x, qf_.as<float>(), qs_.as<float>(), rows, w, y, ldy, stream_);
    }

    void lin(const float* x, int rows, const StackedLinear& w, float* y, int ldy) {
        for (size_t i = 0; i < w.parts.size(); ++i) lin(x, rows, w.parts[i], y + w.offsets[i], ldy);
    }

    // x (+ residual) -> RMSNorm -> what the next Linears read: fp32 into hn_, FP8 into qf_/qs_.
    void norm_for(float* x, const float* residual, const DeviceBuffer& weight, int T, bool f32, bool fp8) {
        cuda::rmsnorm_quantize(x, residual, weight.as<float>(), T, c_.hidden_size, c_.rms_norm_eps,
                               f32 ? hn_.as<float>() : nullptr, fp8 ? qf_.as<float>() : nullptr,
                               fp8 ? qs_.as<float>() : nullptr, stream_);
    }

    // The layers, from the embedding to the last residual add: kernel launches only, so the same
    // sequence can be captured into a graph.
    void enqueue_layers(int T, const cuda::DeviceBatch& batch) {
        const int H = c_.hidden_size, I = c_.intermediate_size, d = c_.head_dim;
        const int nH = c_.num_heads, row = (nH + 2 * c_.num_kv_heads) * d;
        float *x = x_.as<float>(), *h = h_.as<float>(), *hn = hn_.as<float>(), *qkv = qkv_.as<float>();
        float *attn = attn_.as<float>(), *gu = gu_.as<float>(), *act = act_.as<float>();
        const float scale = 1.0f / std::sqrt(static_cast<float>(d));

        cuda::embed(embed_, tokens_dev_.as<int32_t>(), T, x, stream_);
        for (size_t l = 0; l < c_.num_layers; ++l) {
            LayerOnDevice& L = layers_[l];
            const cuda::DeviceKvLayer kv = kv_layer(l);
            // The previous layer's MLP output joins the residual stream inside this norm.
            norm_for(x, l == 0 ? nullptr : h, L.input_norm, T, L.qkv.f32_input, L.qkv.fp8_input);
            lin(hn, T, L.qkv, qkv, row);
            cuda::qk_norm_rope_kv_write(qkv, nH, kv, L.q_norm.as<float>(), L.k_norm.as<float>(), c_.rms_norm_eps,
                                        inv_freq_.as<float>(), rot_dim_, attention_scaling_, batch, stream_);
            cuda::attention(kv, qkv, row, nH, scale, batch, attn, stream_, attn_ws_.get(), attn_ws_.bytes());
            if (is_fp8(L.o)) cuda::quantize_fp8(attn, T, nH * d, qf_.as<float>(), qs_.as<float>(), stream_);
            lin(attn, T, L.o, h, H);
            norm_for(x, h, L.post_norm, T, L.gate_up.f32_input, L.gate_up.fp8_input);
            lin(hn, T, L.gate_up, gu, 2 * I);
            const bool down_fp8 = is_fp8(L.down);
            cuda::silu_mul_quantize(gu, T, I, down_fp8 ? nullptr : act, down_fp8 ? qf_.as<float>() : nullptr,
                                    down_fp8 ? qs_.as<float>() : nullptr, stream_);
            lin(act, T, L.down, h, H);
        }
        cuda::add_inplace(x, h, T * H, stream_);
    }

    void run_forward(const StepBatch& b) {
        const int T = static_cast<int>(b.tokens.size());
        const int bs = static_cast<int>(kv_.shape().block_size);

        // Sequences are told apart by their block tables; each gets the blocks its tokens reach.
        seq_ids_.clear();
        seq_of_token_.resize(T);
        blocks_needed_.clear();
        tables_.clear();
        bool one_token_each = true;
        for (const SequenceSpan& span : b.sequences) one_token_each = one_token_each && span.count == 1;
        const bool decode_only = one_token_each && T <= kMaxGraphTokens;
        for (int t = 0; t < T; ++t) {
            auto [it, fresh] = seq_ids_.emplace(b.slots[t].block_table, static_cast<int>(tables_.size()));
            if (fresh) {
                tables_.push_back(b.slots[t].block_table);
                blocks_needed_.push_back(0);
            }
            seq_of_token_[t] = it->second;
            blocks_needed_[it->second] = std::max(blocks_needed_[it->second], b.slots[t].position / bs + 1);
        }
        int max_blocks = *std::max_element(blocks_needed_.begin(), blocks_needed_.end());
        // A graph bakes in the table width: round it up so a growing context reuses a few graphs.
        if (decode_only) max_blocks = static_cast<int>(std::bit_ceil(static_cast<unsigned>(max_blocks)));
        host_tables_.assign(tables_.size() * max_blocks, 0);
        for (size_t s = 0; s < tables_.size(); ++s)
            std::copy_n(tables_[s], blocks_needed_[s], host_tables_.begin() + s * max_blocks);

        size_activations(T);
        if (host_tables_.size() * 4 > tables_dev_.bytes()) {
            tables_dev_.resize(std::max(host_tables_.size() * 4, tables_dev_.bytes() * 2));
            drop_graphs();
        }
        // Pageable sources: each copy is staged before the call returns, so the host vectors may change after.
        Q3N_CUDA(cudaMemcpyAsync(tokens_dev_.get(), b.tokens.data(), T * 4, cudaMemcpyHostToDevice, stream_));
        Q3N_CUDA(cudaMemcpyAsync(positions_dev_.get(), b.positions.data(), T * 4, cudaMemcpyHostToDevice, stream_));
        Q3N_CUDA(cudaMemcpyAsync(seq_dev_.get(), seq_of_token_.data(), T * 4, cudaMemcpyHostToDevice, stream_));
        Q3N_CUDA(cudaMemcpyAsync(tables_dev_.get(), host_tables_.data(), host_tables_.size() * 4, cudaMemcpyHostToDevice, stream_));

        cuda::DeviceBatch batch{T, positions_dev_.as<int32_t>(), seq_dev_.as<int32_t>(), tables_dev_.as<int32_t>(), max_blocks};
        batch.prefill = !one_token_each;
        if (decode_only) {
            const uint64_t key = (static_cast<uint64_t>(T) << 32) | static_cast<uint32_t>(max_blocks);
            auto it = graphs_.find(key);
            if (it == graphs_.end()) {
                cudaGraph_t graph = nullptr;
                Q3N_CUDA(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
                try {
                    enqueue_layers(T, batch);
                } catch (...) {
                    cudaStreamEndCapture(stream_, &graph);
                    if (graph) cudaGraphDestroy(graph);
                    throw;
                }
                Q3N_CUDA(cudaStreamEndCapture(stream_, &graph));
                cudaGraphExec_t exec = nullptr;
                const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
                cudaGraphDestroy(graph);
                Q3N_CUDA(e);
                it = graphs_.emplace(key, exec).first;
            }
            Q3N_CUDA(cudaGraphLaunch(it->second, stream_));
        } else {
            enqueue_layers(T, batch);
        }
        tokens_ = T;
    }

    // Logits of the given rows into logits_ on the device (nothing waits for them here).
    void device_logits(const size_t* rows, size_t count) {
        const int H = c_.hidden_size, V = c_.vocab_size;
        rows_host_.resize(count);
        for (size_t i = 0; i < count; ++i) {
            if (rows[i] >= tokens_) fail(Q3N_ERR_INTERNAL, "logits requested for a row the last forward did not compute");
            rows_host_[i] = static_cast<int32_t>(rows[i]);
        }
        rows_dev_.reserve(count * 4);
        final_.reserve(count * H * 4);
        finaln_.reserve(count * H * 4);
        logits_.reserve(count * size_t(V) * 4);
        // qf_/qs_ hold at least kMaxGraphTokens rows; more rows than that only come with a wider
        // forward, which sized them. Growing them here would drop the graphs for nothing.
        if (count > static_cast<size_t>(std::max<size_t>(tokens_, kMaxGraphTokens))) size_activations(static_cast<int>(count));
        Q3N_CUDA(cudaMemcpyAsync(rows_dev_.get(), rows_host_.data(), count * 4, cudaMemcpyHostToDevice, stream_));
        cuda::gather_rows(x_.as<float>(), rows_dev_.as<int32_t>(), static_cast<int>(count), H, final_.as<float>(), stream_);
        const bool fp8 = is_fp8(lm_head_);
        cuda::rmsnorm_quantize(final_.as<float>(), nullptr, final_norm_.as<float>(), static_cast<int>(count), H,
                               c_.rms_norm_eps, fp8 ? nullptr : finaln_.as<float>(), fp8 ? qf_.as<float>() : nullptr,
                               fp8 ? qs_.as<float>() : nullptr, stream_);
        // The GEMV, also for many rows: gemm_fp8's scratch is sized for the layers, not the vocabulary.
        cuda::linear(finaln_.as<float>(), qf_.as<float>(), qs_.as<float>(), static_cast<int>(count), lm_head_,
                     logits_.as<float>(), V, stream_);
    }

    // Runs the sampler over logits_ rows with sample_params_host_ (and the penalty lists) and
    // returns its results in sample_results_host_. Member vectors: no allocation per token.
    void launch_sampler(size_t count) {
        const int V = c_.vocab_size;
        const std::vector<int32_t>& ids = penalty_ids_host_;
        sample_params_.reserve(count * sizeof(cuda::DeviceSampleParams));
        sample_results_.reserve(count * sizeof(cuda::DeviceSampleResult));
        sample_work_.reserve(cuda::sample_work_bytes(static_cast<int>(count), V));
        penalty_ids_.reserve(std::max<size_t>(ids.size(), 1) * 4);
        penalty_counts_.reserve(std::max<size_t>(ids.size(), 1) * 4);
        Q3N_CUDA(cudaMemcpyAsync(sample_params_.get(), sample_params_host_.data(),
                                 count * sizeof(cuda::DeviceSampleParams), cudaMemcpyHostToDevice, stream_));
        if (!ids.empty()) {
            Q3N_CUDA(cudaMemcpyAsync(penalty_ids_.get(), ids.data(), ids.size() * 4, cudaMemcpyHostToDevice, stream_));
            Q3N_CUDA(cudaMemcpyAsync(penalty_counts_.get(), penalty_counts_host_.data(), ids.size() * 4,
                                     cudaMemcpyHostToDevice, stream_));
        }
        cuda::sample_rows(logits_.as<float>(), sample_work_.as<float>(), static_cast<int>(count), V,
                          sample_params_.as<cuda::DeviceSampleParams>(), penalty_ids_.as<int32_t>(),
                          penalty_counts_.as<int32_t>(), sample_results_.as<cuda::DeviceSampleResult>(), stream_);
        sample_results_host_.resize(count);
        Q3N_CUDA(cudaMemcpyAsync(sample_results_host_.data(), sample_results_.get(),
                                 count * sizeof(cuda::DeviceSampleResult), cudaMemcpyDeviceToHost, stream_));
        Q3N_CUDA(cudaStreamSynchronize(stream_));
    }

    void run_sample(const size_t* rows, size_t count, const DeviceSamplingRequest* requests, DeviceSamplingResult* results) {
        device_logits(rows, count);
        sample_params_host_.resize(count);
        penalty_ids_host_.clear();
        penalty_counts_host_.clear();
        for (size_t i = 0; i < count; ++i) {
            const q3n_sampling_params& p = *requests[i].params;
            sample_params_host_[i] = cuda::DeviceSampleParams{
                p.temperature, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty, p.frequency_penalty, p.top_k,
                static_cast<int32_t>(p.top_logprobs), p.logprobs ? 1 : 0, static_cast<int32_t>(penalty_ids_host_.size()),
                static_cast<int32_t>(requests[i].penalty_count), -1, p.seed, requests[i].counter};
            penalty_ids_host_.insert(penalty_ids_host_.end(), requests[i].penalty_ids,
                                     requests[i].penalty_ids + requests[i].penalty_count);
            penalty_counts_host_.insert(penalty_counts_host_.end(), requests[i].penalty_counts,
                                        requests[i].penalty_counts + requests[i].penalty_count);
        }
        launch_sampler(count);
        for (size_t i = 0; i < count; ++i) {
            const cuda::DeviceSampleResult& r = sample_results_host_[i];
            results[i].token = r.token;
            results[i].fallback = r.fallback != 0;
            results[i].non_finite = r.non_finite != 0;
            results[i].bad_index = r.bad_index;
            results[i].logprob = r.logprob;
        }
    }

    void run_score(const size_t* rows, size_t count, const int32_t* tokens, uint32_t top_k, q3n_token_logprob* out) {
        device_logits(rows, count);
        sample_params_host_.resize(count);
        penalty_ids_host_.clear();
        penalty_counts_host_.clear();
        for (size_t i = 0; i < count; ++i)
            sample_params_host_[i] = cuda::DeviceSampleParams{
                0.0f, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, 0, static_cast<int32_t>(std::min<uint32_t>(top_k, Q3N_MAX_TOP_LOGPROBS)),
                1, 0, 0, tokens[i], 0, 0};
        launch_sampler(count);
        for (size_t i = 0; i < count; ++i) {
            const cuda::DeviceSampleResult& r = sample_results_host_[i];
            if (r.non_finite)
                fail(Q3N_ERR_NUMERIC, "the logits of a prompt position contain NaN or Inf at token " +
                                          std::to_string(r.bad_index) + "; no log-probability was computed");
            out[i] = r.logprob;
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
    DeviceBuffer x_, h_, hn_, qkv_, attn_, gu_, act_, qf_, qs_, final_, finaln_, logits_, attn_ws_;
    DeviceBuffer sample_params_, sample_results_, sample_work_, penalty_ids_, penalty_counts_;
    std::vector<int32_t> host_tables_, rows_host_, penalty_ids_host_, penalty_counts_host_;
    std::vector<cuda::DeviceSampleParams> sample_params_host_;
    std::vector<cuda::DeviceSampleResult> sample_results_host_;
    std::map<const int32_t*, int> seq_ids_;
    std::vector<int> seq_of_token_, blocks_needed_;
    std::vector<const int32_t*> tables_;
    std::map<uint64_t, cudaGraphExec_t> graphs_;
    bool gemm_ = false;  // cuBLASLt's block-scaled FP8 matmul passed its probe
    int max_gemm_out_ = 0;
    cuda::GemmScratch gemm_scratch_;
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
