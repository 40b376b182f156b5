#include "engine/engine.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <unordered_map>

#include "core/error.h"
#include "model/registry.h"
#include "model/weight_loader.h"
#ifdef Q3N_WITH_CUDA
#include "cuda/cuda_backend.h"
#endif

namespace q3n {

std::shared_ptr<Model> Model::load(const std::string& directory, const q3n_model_options& o) {
    std::shared_ptr<Model> m(new Model());
    m->config_ = ModelConfig::load(directory);
    const ArchitectureEntry& arch = find_architecture(m->config_);
    m->architecture_ = arch.name;  // also when config.json only names the model_type

    bool use_cuda = false;
#ifdef Q3N_WITH_CUDA
    const int gpus = o.device == Q3N_DEVICE_CPU ? 0 : cuda_device_count();
    if (o.device == Q3N_DEVICE_CUDA && o.device_index >= gpus)
        fail(Q3N_ERR_DEVICE, "CUDA device " + std::to_string(o.device_index) + " requested but " + std::to_string(gpus) +
                                 " usable GPU(s) found (is the NVIDIA driver loaded?)");
    // AUTO takes the GPU only for architectures that have a CUDA implementation.
    use_cuda = o.device == Q3N_DEVICE_CUDA || (o.device == Q3N_DEVICE_AUTO && gpus > 0 && arch.create_cuda);
    if (use_cuda && !arch.create_cuda)
        fail(Q3N_ERR_UNSUPPORTED, arch.name + " has no CUDA implementation yet; load it with device CPU");
#else
    if (o.device == Q3N_DEVICE_CUDA)
        fail(Q3N_ERR_UNSUPPORTED, "this build has no CUDA backend (built without nvcc); load with device CPU or AUTO");
#endif
    m->device_ = use_cuda ? Q3N_DEVICE_CUDA : Q3N_DEVICE_CPU;

    const ModelConfig& c = m->config_;
    m->context_length_ = o.context_length ? o.context_length : std::min<uint32_t>(c.max_position_embeddings, 32768);
    if (m->context_length_ > c.max_position_embeddings)
        fail(Q3N_ERR_INVALID_ARGUMENT, "context_length " + std::to_string(m->context_length_) +
                                           " exceeds the model's max_position_embeddings " +
                                           std::to_string(c.max_position_embeddings));
    m->pool_ = std::make_unique<ThreadPool>(o.num_threads);

    KvCacheShape kv;
    kv.num_layers = arch.kv_layers ? arch.kv_layers(c) : c.num_layers;
    kv.kv_heads = c.num_kv_heads;
    kv.head_dim = c.head_dim;
    kv.block_size = o.kv_block_size ? o.kv_block_size : 16;
    // AUTO: fp32 on the CPU (the reference), bf16 on the GPU (half the bytes per decode step).
    kv.dtype = o.kv_cache_dtype == Q3N_DTYPE_BF16 || (o.kv_cache_dtype == Q3N_DTYPE_AUTO && use_cuda) ? KvDtype::BF16
                                                                                                      : KvDtype::F32;
    const uint64_t tokens = o.kv_cache_tokens ? o.kv_cache_tokens : m->context_length_;
    kv.num_blocks = (tokens + kv.block_size - 1) / kv.block_size;
    m->kv_ = std::make_unique<KvCache>(kv, /*host_storage=*/!use_cuda);

    auto progress = [&](float f) { return o.progress ? o.progress(f, o.progress_user_data) != 0 : false; };
    if (progress(0.0f)) fail(Q3N_ERR_INVALID_STATE, "loading was cancelled by the progress callback");
    std::vector<std::unique_ptr<uint8_t[]>> owned;
    std::unique_ptr<WeightSource> source;
    if (o.load_format == Q3N_LOAD_DUMMY) {
        source = dummy_source(c, o.dummy_seed, *m->pool_, owned);
    } else {
        m->checkpoint_ = Checkpoint::open(directory);
        source = checkpoint_source(*m->checkpoint_, c, owned);
    }
    if (use_cuda) {
#ifdef Q3N_WITH_CUDA
        m->runner_ = arch.create_cuda(c, *source, *m->kv_, o.device_index, progress);
        // The weights now live on the GPU: the host copies and the mapping can go.
        source.reset();
        owned.clear();
        m->checkpoint_.reset();
#endif
    } else {
        m->runner_ = arch.create_cpu(c, *source, *m->kv_, *m->pool_, progress);
    }
    m->owned_ = std::move(owned);
    m->stats_ = m->runner_->weight_stats();
    m->sampler_ = std::make_unique<Sampler>(c.vocab_size);
    m->logprobs_ = std::make_unique<LogprobCalculator>(c.vocab_size);
    if (progress(1.0f)) fail(Q3N_ERR_INVALID_STATE, "loading was cancelled by the progress callback");
    return m;
}

void Model::fill_info(q3n_model_info& info) const {
    // Writes only the fields the caller's struct has room for (older callers have smaller structs).
    q3n_model_info full{};
    full.struct_size = info.struct_size;
    full.architecture = architecture_.c_str();
    full.weight_dtype = stats_.fp8 ? Q3N_DTYPE_FP8_E4M3 : Q3N_DTYPE_BF16;
    full.device = device_;
    full.kv_cache_dtype = kv_->shape().dtype == KvDtype::F32 ? Q3N_DTYPE_F32 : Q3N_DTYPE_BF16;
    full.vocab_size = config_.vocab_size;
    full.hidden_size = config_.hidden_size;
    full.intermediate_size = config_.intermediate_size;
    full.num_layers = config_.num_layers;
    full.num_attention_heads = config_.num_heads;
    full.num_kv_heads = config_.num_kv_heads;
    full.head_dim = config_.head_dim;
    full.max_position_embeddings = config_.max_position_embeddings;
    full.context_length = context_length_;
    full.kv_cache_tokens = kv_->shape().num_blocks * kv_->shape().block_size;
    full.kv_block_size = static_cast<uint32_t>(kv_->shape().block_size);
    full.bos_token_id = config_.bos_token_id;
    full.eos_token_id = config_.eos_token_ids.empty() ? -1 : config_.eos_token_ids[0];
    full.num_eos_token_ids = static_cast<uint32_t>(config_.eos_token_ids.size());
    full.eos_token_ids = config_.eos_token_ids.data();
    full.parameter_count = stats_.parameter_count;
    full.weight_bytes = stats_.bytes;
    full.image_token_id = full.video_token_id = full.vision_start_token_id = full.vision_end_token_id = -1;
    if (config_.vision && runner_->has_vision()) {
        full.has_vision = 1;
        full.patch_size = config_.vision->patch_size;
        full.temporal_patch_size = config_.vision->temporal_patch_size;
        full.spatial_merge_size = config_.vision->spatial_merge_size;
        full.image_token_id = config_.image_token_id;
        full.video_token_id = config_.video_token_id;
        full.vision_start_token_id = config_.vision_start_token_id;
        full.vision_end_token_id = config_.vision_end_token_id;
    }
    std::memcpy(&info, &full, std::min<size_t>(info.struct_size, sizeof(full)));
}

void Model::step(Sequence* const* seqs, size_t count, uint32_t flags, size_t max_tokens) {
    if (count == 0) fail(Q3N_ERR_INVALID_ARGUMENT, "q3n_model_step needs at least one sequence");
    // Duplicates are found with a per-step stamp on each sequence: no set to allocate per token.
    ++step_stamp_;
    for (size_t i = 0; i < count; ++i) {
        Sequence* s = seqs[i];
        if (!s) fail(Q3N_ERR_INVALID_ARGUMENT, "sequence " + std::to_string(i) + " is NULL");
        if (&s->model() != this) fail(Q3N_ERR_INVALID_ARGUMENT, "sequence " + std::to_string(i) + " belongs to another model");
        if (s->step_stamp_ == step_stamp_) fail(Q3N_ERR_INVALID_ARGUMENT, "sequence " + std::to_string(i) + " is listed twice");
        s->step_stamp_ = step_stamp_;
        if (s->cached_ >= s->tokens_.size())
            fail(Q3N_ERR_INVALID_STATE, "sequence " + std::to_string(i) + " has no queued tokens to process");
    }
    // Where each sequence's part of this step ends: all queued tokens, or the first max_tokens.
    std::vector<size_t>& ends = ends_;
    ends.resize(count);
    for (size_t i = 0; i < count; ++i) {
        const Sequence& s = *seqs[i];
        ends[i] = max_tokens == 0 ? s.tokens_.size() : std::min(s.tokens_.size(), s.cached_ + max_tokens);
        if ((flags & Q3N_STEP_SAMPLE) && ends[i] != s.tokens_.size())
            fail(Q3N_ERR_INVALID_ARGUMENT, "sequence " + std::to_string(i) + " keeps queued tokens after this step, so "
                                           "nothing can be sampled; step without Q3N_STEP_SAMPLE until its queue is done");
    }
    // The vision tower runs before any block is reserved, so a failure there changes nothing but the
    // features already computed (kept for the next attempt).
    for (size_t i = 0; i < count; ++i) seqs[i]->encode_vision(ends[i]);

    // Reserve every block the step needs first, all or nothing, so a full cache changes nothing.
    const size_t bs = kv_->shape().block_size;
    std::vector<size_t>& before = blocks_before_;
    before.resize(count);
    for (size_t i = 0; i < count; ++i) {
        Sequence& s = *seqs[i];
        before[i] = s.block_table_.size();
        const size_t need = (ends[i] + bs - 1) / bs;
        if (need > s.block_table_.size() && !kv_->allocate(need - s.block_table_.size(), s.block_table_)) {
            for (size_t j = 0; j <= i; ++j) kv_->release(seqs[j]->block_table_, before[j]);
            fail(Q3N_ERR_KV_CACHE_FULL, "the KV cache has " + std::to_string(kv_->free_blocks() * bs) +
                                            " free token slots, too few for this step; free or shorten sequences");
        }
    }

    StepBatch& b = batch_;
    b.tokens.clear();
    b.positions.clear();
    b.slots.clear();
    b.sequences.clear();
    b.mrope_positions.clear();
    b.vision_rows.clear();
    b.vision_features.clear();
    mrope_h_.clear();
    mrope_w_.clear();
    const bool mrope = uses_mrope();
    rows_.clear();
    std::vector<size_t>& first_rows = first_rows_;
    first_rows.resize(count);
    const auto now = Sequence::Clock::now();
    for (size_t i = 0; i < count; ++i) {
        Sequence& s = *seqs[i];
        if (!s.stepped_) {
            s.stepped_ = true;
            s.first_step_ = now;
        }
        // Tokens this step processes that were not sampled: the request's prompt.
        const size_t end = ends[i];
        size_t sampled_here = 0;
        for (auto it = s.output_positions_.rbegin(); it != s.output_positions_.rend() && *it >= s.cached_; ++it)
            sampled_here += *it < end;
        s.prompt_tokens_ += end - s.cached_ - sampled_here;
        first_rows[i] = b.tokens.size();
        b.sequences.push_back(SequenceSpan{s.id_, b.tokens.size(), end - s.cached_, s.cached_ == 0});
        for (size_t p = s.cached_; p < end; ++p) {
            b.tokens.push_back(s.tokens_[p]);
            b.positions.push_back(static_cast<int32_t>(p));
            b.slots.push_back(cpu::TokenSlot{s.block_table_.data(), static_cast<int32_t>(p)});
        }
        if (mrope) {
            b.mrope_positions.insert(b.mrope_positions.end(), s.pos_t_.begin() + s.cached_, s.pos_t_.begin() + end);
            mrope_h_.insert(mrope_h_.end(), s.pos_h_.begin() + s.cached_, s.pos_h_.begin() + end);
            mrope_w_.insert(mrope_w_.end(), s.pos_w_.begin() + s.cached_, s.pos_w_.begin() + end);
        }
        for (const auto& item : s.vision_) {
            const size_t from = std::max(item.first, s.cached_), to = std::min(item.first + item.count, end);
            if (from >= to) continue;
            const size_t width = item.features.size() / item.count;
            for (size_t p = from; p < to; ++p) {
                b.vision_rows.push_back(static_cast<uint32_t>(first_rows[i] + (p - s.cached_)));
                b.vision_features.push_back(item.features.data() + (p - item.first) * width);
            }
        }
        rows_.push_back(b.tokens.size() - 1);
    }
    if (mrope) {
        b.mrope_positions.insert(b.mrope_positions.end(), mrope_h_.begin(), mrope_h_.end());
        b.mrope_positions.insert(b.mrope_positions.end(), mrope_w_.begin(), mrope_w_.end());
    }
    const size_t V = config_.vocab_size;
    if (logits_.size() < count * V) logits_.resize(count * V);
    runner_->forward(b);
    for (size_t i = 0; i < count; ++i)
        if (seqs[i]->sampling_.prompt_logprobs) prompt_logprobs(*seqs[i], first_rows[i], seqs[i]->cached_, ends[i]);
    // The device sampler does not know vocab_limit yet: such requests sample on the host.
    const bool limited = std::any_of(seqs, seqs + count, [](const Sequence* q) { return q->sampling_.vocab_limit != 0; });
    if ((flags & Q3N_STEP_SAMPLE) && runner_->samples_on_device() && !limited) {
        sample_on_device(seqs, count);
        return;
    }
    runner_->logits(rows_.data(), count, logits_.data());

    bool numeric_error = false;
    std::string where;
    for (size_t i = 0; i < count; ++i) {
        Sequence& s = *seqs[i];
        s.cached_ = ends[i];
        s.release_consumed_vision();
        const float* row = logits_.data() + i * V;
        s.logits_.assign(row, row + V);
        const bool finite = std::all_of(row, row + V, [](float x) { return std::isfinite(x); });
        s.has_logits_ = finite;
        // Logits of a position with queued tokens after it are readable but predict nothing to sample.
        s.logits_fresh_ = finite && s.cached_ == s.tokens_.size();
        if (!finite && !numeric_error) {
            numeric_error = true;
            where = "sequence " + std::to_string(i);
        }
    }
    if (numeric_error) fail(Q3N_ERR_NUMERIC, "the logits of " + where + " contain NaN or Inf; no token was sampled");
    if (flags & Q3N_STEP_SAMPLE)
        for (size_t i = 0; i < count; ++i) seqs[i]->sample();
}

void Model::sample_on_device(Sequence* const* seqs, size_t count) {
    for (size_t i = 0; i < count; ++i) {
        seqs[i]->cached_ = seqs[i]->tokens_.size();
        seqs[i]->release_consumed_vision();
        seqs[i]->has_logits_ = seqs[i]->logits_fresh_ = false;  // the logits stay on the device
    }
    for (size_t i = 0; i < count; ++i) seqs[i]->check_room_to_sample();

    // Penalties need each sequence's distinct ids and how often each was sampled in the request.
    penalty_ids_.clear();
    penalty_counts_.clear();
    std::vector<size_t> offsets(count + 1, 0);
    for (size_t i = 0; i < count; ++i) {
        const Sequence& s = *seqs[i];
        const auto& p = s.sampling_;
        if (p.repetition_penalty != 1.0f || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f) {
            std::unordered_map<int32_t, int32_t> counts;
            for (int32_t t : s.tokens_) counts.emplace(t, 0);
            for (int32_t t : s.output_tokens_) ++counts[t];
            // Only ids that a penalty touches: repetition touches all, presence/frequency sampled ones.
            const bool all = p.repetition_penalty != 1.0f;
            for (const auto& [id, c] : counts)
                if (all || c > 0) {
                    penalty_ids_.push_back(id);
                    penalty_counts_.push_back(c);
                }
        }
        offsets[i + 1] = penalty_ids_.size();
    }
    std::vector<DeviceSamplingRequest> requests(count);
    for (size_t i = 0; i < count; ++i)
        requests[i] = DeviceSamplingRequest{&seqs[i]->sampling_, penalty_ids_.data() + offsets[i],
                                            penalty_counts_.data() + offsets[i], offsets[i + 1] - offsets[i],
                                            seqs[i]->draws_};
    std::vector<DeviceSamplingResult> results(count);
    runner_->sample(rows_.data(), count, requests.data(), results.data());

    std::string numeric;
    for (size_t i = 0; i < count; ++i) {
        Sequence& s = *seqs[i];
        const DeviceSamplingResult& r = results[i];
        if (r.non_finite) {
            if (numeric.empty())
                numeric = "the logits of sequence " + std::to_string(i) + " contain NaN or Inf (or a penalty or the " +
                          "temperature overflowed) at token " + std::to_string(r.bad_index) + "; no token was sampled";
            continue;
        }
        if (r.fallback) {
            // A nearly flat distribution whose filters reach past the device's candidates: the
            // host sampler decides, with the same draw.
            s.logits_.resize(config_.vocab_size);
            runner_->logits(&rows_[i], 1, s.logits_.data());
            s.has_logits_ = s.logits_fresh_ = true;
            s.sample();
            continue;
        }
        s.accept_sampled(r.token, s.sampling_.logprobs ? &r.logprob : nullptr);
    }
    if (!numeric.empty()) fail(Q3N_ERR_NUMERIC, numeric);
}

void Model::prompt_logprobs(Sequence& s, size_t first_row, size_t first_position, size_t end) {
    const size_t V = config_.vocab_size;
    LogprobCalculator& calc = *logprobs_;
    // The first new token was predicted by the previous step's last logits, when there are any;
    // a token that was sampled there has its own log-probability and is not part of the prompt.
    const bool first_was_sampled = !s.output_positions_.empty() && s.output_positions_.back() == first_position;
    if (first_position > 0 && s.has_logits_ && s.logits_.size() == V && !first_was_sampled) {
        s.prompt_logprobs_.emplace_back();
        calc.compute(s.logits_.data(), s.tokens_[first_position], s.sampling_.top_logprobs, s.prompt_logprobs_.back());
    }
    // Each processed position predicts the next processed token; done a few rows at a time so the
    // logits of a long prompt never exist all at once.
    const size_t n = end - first_position - 1;
    if (runner_->samples_on_device()) {
        // On the device: only the chosen log-probabilities and their top-k cross to the host.
        constexpr size_t kDeviceChunk = 64;
        std::vector<size_t> rows;
        std::vector<int32_t> targets;
        for (size_t done = 0; done < n; done += kDeviceChunk) {
            const size_t m = std::min(kDeviceChunk, n - done);
            rows.resize(m);
            targets.resize(m);
            for (size_t r = 0; r < m; ++r) {
                rows[r] = first_row + done + r;
                targets[r] = s.tokens_[first_position + done + r + 1];
            }
            const size_t at = s.prompt_logprobs_.size();
            s.prompt_logprobs_.resize(at + m);
            runner_->score(rows.data(), m, targets.data(), s.sampling_.top_logprobs, s.prompt_logprobs_.data() + at);
        }
        return;
    }
    constexpr size_t kChunk = 16;
    std::vector<size_t> rows;
    std::vector<float> chunk;
    for (size_t done = 0; done < n; done += kChunk) {
        const size_t m = std::min(kChunk, n - done);
        rows.resize(m);
        for (size_t r = 0; r < m; ++r) rows[r] = first_row + done + r;
        chunk.resize(m * V);
        runner_->logits(rows.data(), m, chunk.data());
        for (size_t r = 0; r < m; ++r) {
            s.prompt_logprobs_.emplace_back();
            calc.compute(chunk.data() + r * V, s.tokens_[first_position + done + r + 1], s.sampling_.top_logprobs,
                         s.prompt_logprobs_.back());
        }
    }
}

Sequence::Sequence(std::shared_ptr<Model> model) : model_(std::move(model)), id_(model_->next_sequence_id()) {
    q3n_sampling_params_init(&sampling_, sizeof sampling_);
}

void Sequence::begin_request() {
    draws_ = 0;
    output_tokens_.clear();
    output_positions_.clear();
    has_last_logprob_ = false;
    prompt_logprobs_.clear();
    request_cached_ = cached_;
    prompt_tokens_ = 0;
    stepped_ = false;
    first_step_ = first_sample_ = last_sample_ = Clock::time_point{};
}

void Sequence::fill_stats(q3n_sequence_stats& out) const {
    q3n_sequence_stats st{};
    st.struct_size = out.struct_size;
    st.prompt_tokens = prompt_tokens_;
    st.cached_tokens = request_cached_;
    st.generated_tokens = output_tokens_.size();
    using ms = std::chrono::duration<double, std::milli>;
    if (!output_tokens_.empty()) {
        st.time_to_first_token_ms = ms(first_sample_ - first_step_).count();
        st.prefill_ms = st.time_to_first_token_ms;
        const double decode_s = ms(last_sample_ - first_sample_).count() / 1e3;
        if (output_tokens_.size() > 1 && decode_s > 0) st.decode_tokens_per_s = (output_tokens_.size() - 1) / decode_s;
    }
    std::memcpy(&out, &st, std::min<size_t>(out.struct_size, sizeof(st)));
}

Sequence::~Sequence() {
    std::lock_guard<std::mutex> lock(model_->mutex());
    model_->kv().release(block_table_);
    model_->runner().release_sequence(id_);
}

void Sequence::append(const int32_t* tokens, size_t count) {
    if (count == 0) return;
    if (!tokens) fail(Q3N_ERR_INVALID_ARGUMENT, "tokens is NULL");
    const uint32_t V = model_->config().vocab_size;
    for (size_t i = 0; i < count; ++i)
        if (tokens[i] < 0 || static_cast<uint32_t>(tokens[i]) >= V)
            fail(Q3N_ERR_INVALID_ARGUMENT, "token " + std::to_string(tokens[i]) + " at index " + std::to_string(i) +
                                               " is outside the vocabulary [0, " + std::to_string(V) + ")");
    const ModelConfig& c = model_->config();
    if (model_->has_vision())
        for (size_t i = 0; i < count; ++i)
            if (tokens[i] == c.image_token_id || tokens[i] == c.video_token_id)
                fail(Q3N_ERR_INVALID_ARGUMENT, "token " + std::to_string(tokens[i]) + " at index " + std::to_string(i) +
                                                   " is an image/video placeholder; append images and videos with "
                                                   "q3n_sequence_append_vision, which queues the placeholders with their pixels");
    const size_t limit = model_->context_length();
    if (tokens_.size() + count > limit)
        fail(Q3N_ERR_CONTEXT_OVERFLOW, "the sequence would hold " + std::to_string(tokens_.size() + count) +
                                           " tokens, over the context length of " + std::to_string(limit));
    tokens_.insert(tokens_.end(), tokens, tokens + count);
    push_text_positions(count);
}

void Sequence::push_text_positions(size_t count) {
    if (!model_->uses_mrope()) return;
    // Text after anything counts on from one past the largest position so far, on all three axes
    // (spec 4.4); after the prompt this is index + rope_delta.
    for (size_t i = 0; i < count; ++i) {
        const auto p = static_cast<int32_t>(next_position_++);
        pos_t_.push_back(p);
        pos_h_.push_back(p);
        pos_w_.push_back(p);
    }
}

void Sequence::append_vision(q3n_vision_kind kind, GridThw grid, const float* pixels, size_t value_count) {
    const ModelConfig& c = model_->config();
    if (!model_->has_vision() || !c.vision)
        fail(Q3N_ERR_UNSUPPORTED, "this model (" + c.architecture + ") has no vision tower; images and videos need a "
                                  "Qwen3-VL checkpoint");
    if (kind != Q3N_VISION_IMAGE && kind != Q3N_VISION_VIDEO)
        fail(Q3N_ERR_INVALID_ARGUMENT, "unknown vision kind " + std::to_string(static_cast<int>(kind)));
    const VisionConfig& v = *c.vision;
    const uint32_t m = v.spatial_merge_size;
    if (grid.t == 0 || grid.h == 0 || grid.w == 0)
        fail(Q3N_ERR_INVALID_ARGUMENT, "grid_t, grid_h and grid_w must be positive");
    if (grid.h % m || grid.w % m)
        fail(Q3N_ERR_INVALID_ARGUMENT, "grid_h (" + std::to_string(grid.h) + ") and grid_w (" + std::to_string(grid.w) +
                                           ") must be multiples of spatial_merge_size " + std::to_string(m));
    // The processor duplicates a still image into one temporal patch; only videos have more.
    if (kind == Q3N_VISION_IMAGE && grid.t != 1)
        fail(Q3N_ERR_INVALID_ARGUMENT, "an image has grid_t 1 (got " + std::to_string(grid.t) + "); pass videos as VIDEO");
    // 64-bit products of 32-bit factors cannot overflow; the context check bounds them before any
    // size_t arithmetic on the pixel count.
    const uint64_t patches = uint64_t(grid.t) * grid.h * grid.w;
    const uint64_t count = patches / (uint64_t(m) * m);
    const size_t limit = model_->context_length();
    if (tokens_.size() + count > limit)
        fail(Q3N_ERR_CONTEXT_OVERFLOW, "the sequence would hold " + std::to_string(tokens_.size() + count) +
                                           " tokens with this item's " + std::to_string(count) +
                                           " placeholders, over the context length of " + std::to_string(limit));
    const uint64_t values = patches * v.patch_dim();
    if (value_count != values)
        fail(Q3N_ERR_INVALID_ARGUMENT, "value_count is " + std::to_string(value_count) + " but a " + std::to_string(grid.t) +
                                           "x" + std::to_string(grid.h) + "x" + std::to_string(grid.w) + " grid needs " +
                                           std::to_string(values) + " (" + std::to_string(patches) + " patches of " +
                                           std::to_string(v.patch_dim()) + " values)");
    if (!pixels) fail(Q3N_ERR_INVALID_ARGUMENT, "pixel_values is NULL");
    for (size_t i = 0; i < value_count; ++i)
        if (!std::isfinite(pixels[i]))
            fail(Q3N_ERR_INVALID_ARGUMENT, "pixel_values[" + std::to_string(i) + "] is NaN or infinite");

    VisionItem item;
    item.kind = kind;
    item.grid = grid;
    item.first = tokens_.size();
    item.count = static_cast<size_t>(count);
    item.pixels.assign(pixels, pixels + value_count);
    const int32_t pad = kind == Q3N_VISION_IMAGE ? c.image_token_id : c.video_token_id;
    // Everything that can throw is done before the sequence changes.
    pos_t_.reserve(tokens_.size() + item.count);
    pos_h_.reserve(tokens_.size() + item.count);
    pos_w_.reserve(tokens_.size() + item.count);
    tokens_.reserve(tokens_.size() + item.count);
    vision_.reserve(vision_.size() + 1);
    tokens_.insert(tokens_.end(), item.count, pad);
    // transformers positions a video slice by slice (t = 1 each, its timestamps carry the time), so a
    // grid_t > 1 item gets what its slices appended one by one would get (spec 4.4).
    const int64_t hh = grid.h / m, ww = grid.w / m;
    for (uint32_t t = 0; t < grid.t; ++t) {
        const int64_t s0 = next_position_;
        for (int64_t y = 0; y < hh; ++y)
            for (int64_t x = 0; x < ww; ++x) {
                pos_t_.push_back(static_cast<int32_t>(s0));
                pos_h_.push_back(static_cast<int32_t>(s0 + y));
                pos_w_.push_back(static_cast<int32_t>(s0 + x));
            }
        next_position_ = s0 + std::max(hh, ww);
    }
    vision_.push_back(std::move(item));
}

void Sequence::encode_vision(size_t end) {
    for (auto& item : vision_) {
        if (item.encoded || item.first >= end || item.first + item.count <= cached_) continue;
        if (item.pixels.empty())
            fail(Q3N_ERR_INVALID_STATE, "an image or video must be processed again but its pixels were released; "
                                        "truncate before it and append it again");
        std::vector<float> features;
        model_->runner().encode_vision(item.pixels.data(), item.grid, features);
        if (features.size() % item.count != 0 || features.size() / item.count < model_->config().hidden_size)
            fail(Q3N_ERR_INTERNAL, "the vision tower returned features that do not fit the item's placeholders");
        item.features = std::move(features);
        item.encoded = true;
        // The rows are what later steps read; the pixels are not needed again.
        std::vector<float>().swap(item.pixels);
    }
}

void Sequence::release_consumed_vision() {
    for (auto& item : vision_)
        if (item.encoded && !item.features.empty() && item.first + item.count <= cached_)
            std::vector<float>().swap(item.features);
}

void Sequence::rope_positions(int32_t* out) const {
    const size_t n = tokens_.size();
    if (!model_->uses_mrope()) {
        for (size_t a = 0; a < 3; ++a)
            for (size_t i = 0; i < n; ++i) out[a * n + i] = static_cast<int32_t>(i);
        return;
    }
    std::copy(pos_t_.begin(), pos_t_.end(), out);
    std::copy(pos_h_.begin(), pos_h_.end(), out + n);
    std::copy(pos_w_.begin(), pos_w_.end(), out + 2 * n);
}

void Sequence::truncate(size_t length) {
    if (length > tokens_.size())
        fail(Q3N_ERR_INVALID_ARGUMENT, "cannot truncate a sequence of " + std::to_string(tokens_.size()) +
                                           " tokens to " + std::to_string(length));
    // Part of an item's placeholders would have no pixels to stand for: the item goes as a whole.
    for (const auto& item : vision_)
        if (item.first < length && length < item.first + item.count) length = item.first;
    if (length == tokens_.size()) return;
    while (!vision_.empty() && vision_.back().first >= length) vision_.pop_back();
    if (model_->uses_mrope()) {
        pos_t_.resize(length);
        pos_h_.resize(length);
        pos_w_.resize(length);
        // Positions never exceed the next one to hand out, so this is the largest kept one plus one.
        int64_t next = 0;
        for (size_t i = 0; i < length; ++i) next = std::max<int64_t>({next, pos_t_[i] + 1, pos_h_[i] + 1, pos_w_[i] + 1});
        next_position_ = next;
    }
    tokens_.resize(length);
    cached_ = std::min(cached_, length);
    // A recurrent state holds the whole prefix folded in; it cannot be rewound, so the kept
    // tokens are prefilled again from position 0 (their KV blocks are simply rewritten).
    if (model_->runner().has_recurrent_state() && cached_ > 0) {
        cached_ = 0;
        model_->runner().release_sequence(id_);
    }
    const size_t bs = model_->kv().shape().block_size;
    model_->kv().release(block_table_, (length + bs - 1) / bs);
    has_logits_ = logits_fresh_ = false;
    last_token_ = -1;
    while (!output_positions_.empty() && output_positions_.back() >= length) {
        output_positions_.pop_back();
        output_tokens_.pop_back();
    }
}

void Sequence::set_sampling(const q3n_sampling_params& params) {
    validate_sampling_params(params);
    if (params.top_logprobs > Q3N_MAX_TOP_LOGPROBS)
        fail(Q3N_ERR_INVALID_ARGUMENT, "top_logprobs is " + std::to_string(params.top_logprobs) + "; at most " +
                                           std::to_string(Q3N_MAX_TOP_LOGPROBS) + " alternatives are reported");
    sampling_ = q3n_sampling_params{};
    std::memcpy(&sampling_, &params, std::min<size_t>(params.struct_size, sizeof(sampling_)));
    sampling_.struct_size = sizeof(sampling_);
    begin_request();
}

void Sequence::check_room_to_sample() const {
    if (tokens_.size() + 1 > model_->context_length())
        fail(Q3N_ERR_CONTEXT_OVERFLOW, "the sequence is at the context length (" +
                                           std::to_string(model_->context_length()) + " tokens); nothing can be sampled");
}

void Sequence::accept_sampled(int32_t token, const q3n_token_logprob* logprob) {
    ++draws_;
    if (logprob) {
        last_logprob_ = *logprob;
        has_last_logprob_ = true;
    }
    last_sample_ = Clock::now();
    if (output_tokens_.empty()) first_sample_ = last_sample_;
    logits_fresh_ = false;
    tokens_.push_back(token);
    push_text_positions(1);
    output_tokens_.push_back(token);
    output_positions_.push_back(tokens_.size() - 1);
    last_token_ = token;
}

int32_t Sequence::sample() {
    if (!logits_fresh_) fail(Q3N_ERR_INVALID_STATE, "no fresh logits to sample from: run q3n_model_step first");
    check_room_to_sample();
    // The sampler works in place; the caller may still read this step's raw logits afterwards.
    std::vector<float>& scratch = model_->sample_scratch();
    scratch.assign(logits_.begin(), logits_.end());
    SamplingContext ctx{tokens_, output_tokens_, draws_, sampling_.vocab_limit};
    const int32_t token = model_->sampler().sample(scratch, sampling_, ctx);
    if (sampling_.logprobs) {
        q3n_token_logprob lp;
        model_->logprobs().compute(logits_.data(), token, sampling_.top_logprobs, lp);
        accept_sampled(token, &lp);
    } else {
        accept_sampled(token, nullptr);
    }
    return token;
}

}  // namespace q3n
