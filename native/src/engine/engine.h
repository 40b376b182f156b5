// The engine's model and sequence objects behind the C handles: one loaded model with its KV pool
// and runner, and token streams that own KV blocks. All calls on a model and its sequences take the
// model's mutex.
#pragma once

#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/thread_pool.h"
#include "io/checkpoint.h"
#include "kv/kv_cache.h"
#include "model/config.h"
#include "model/model_runner.h"
#include "model/mrope_positions.h"
#include "qwen3native.h"
#include "sampling/logprobs.h"
#include "sampling/sampler.h"

namespace q3n {

class Sequence;

class Model {
public:
    // Loads the directory (or only its config for the dummy format). Options must be validated.
    static std::shared_ptr<Model> load(const std::string& directory, const q3n_model_options& options);

    void fill_info(q3n_model_info& info) const;
    // Runs one step over the listed sequences (see q3n_model_step). Each processes at most
    // `max_tokens` of its queued tokens, 0 meaning all (q3n_model_step_limited). Caller holds mutex().
    void step(Sequence* const* sequences, size_t count, uint32_t flags, size_t max_tokens = 0);

    std::mutex& mutex() const { return mutex_; }
    const ModelConfig& config() const { return config_; }
    KvCache& kv() { return *kv_; }
    ModelRunner& runner() { return *runner_; }
    uint64_t next_sequence_id() { return ++sequence_ids_; }
    Sampler& sampler() { return *sampler_; }
    std::vector<float>& sample_scratch() { return sample_scratch_; }
    LogprobCalculator& logprobs() { return *logprobs_; }
    uint32_t context_length() const { return context_length_; }
    bool has_vision() const { return runner_->has_vision(); }
    // MRoPE models keep three rotary positions per token (spec 4.4).
    bool uses_mrope() const { return !config_.rope.mrope_section.empty(); }

private:
    Model() = default;

    mutable std::mutex mutex_;
    ModelConfig config_;
    std::string architecture_;
    q3n_device device_ = Q3N_DEVICE_CPU;
    uint32_t context_length_ = 0;
    // Declared so that the runner goes first and the storage its weights point into goes last.
    std::unique_ptr<ThreadPool> pool_;
    std::unique_ptr<Checkpoint> checkpoint_;  // the mapped files the weights point into
    std::vector<std::unique_ptr<uint8_t[]>> owned_;
    std::unique_ptr<KvCache> kv_;
    std::unique_ptr<ModelRunner> runner_;
    std::unique_ptr<Sampler> sampler_;
    std::unique_ptr<LogprobCalculator> logprobs_;
    std::vector<float> sample_scratch_;
    WeightStats stats_;
    // Step scratch, grow-only.
    StepBatch batch_;
    std::vector<size_t> rows_, first_rows_, blocks_before_, ends_;
    std::vector<int32_t> mrope_h_, mrope_w_;
    std::vector<float> logits_;
    uint64_t step_stamp_ = 0;
    std::vector<int32_t> penalty_ids_, penalty_counts_;
    uint64_t sequence_ids_ = 0;

    void sample_on_device(Sequence* const* seqs, size_t count);

    // Rows of [first_position, end) predict the tokens after them, up to end - 1 (the last row's
    // prediction is the step's logits).
    void prompt_logprobs(Sequence& s, size_t first_row, size_t first_position, size_t end);
};

class Sequence {
public:
    explicit Sequence(std::shared_ptr<Model> model);
    ~Sequence();  // returns the KV blocks (takes the model's mutex)

    Model& model() const { return *model_; }

    void append(const int32_t* tokens, size_t count);
    // Queues an image or video's placeholders with a copy of its pixels (q3n_sequence_append_vision).
    void append_vision(q3n_vision_kind kind, GridThw grid, const float* pixels, size_t value_count);
    // Appends a token chosen elsewhere (the device sampler) with the bookkeeping of sample().
    void accept_sampled(int32_t token, const q3n_token_logprob* logprob);
    void check_room_to_sample() const;
    // Keeps the first `length` tokens, or fewer: a cut inside a vision item drops the whole item.
    void truncate(size_t length);
    // Rotary positions, [3][length] (t, h, w rows); for a model without MRoPE every row is the index.
    void rope_positions(int32_t* out) const;
    void set_sampling(const q3n_sampling_params& params);
    int32_t sample();

    void fill_stats(q3n_sequence_stats& stats) const;
    const q3n_token_logprob* last_logprob() const { return has_last_logprob_ ? &last_logprob_ : nullptr; }
    const std::vector<q3n_token_logprob>& prompt_logprobs() const { return prompt_logprobs_; }

    const std::vector<int32_t>& tokens() const { return tokens_; }
    size_t cached() const { return cached_; }
    const std::vector<float>& logits() const { return logits_; }
    bool has_logits() const { return has_logits_; }
    int32_t last_token() const { return last_token_; }

private:
    friend class Model;

    std::shared_ptr<Model> model_;
    uint64_t id_;
    uint64_t step_stamp_ = 0;  // the model step that last listed this sequence
    std::vector<int32_t> tokens_;
    size_t cached_ = 0;                 // tokens whose K/V are in the cache
    std::vector<int32_t> block_table_;
    std::vector<float> logits_;
    bool has_logits_ = false;           // logits exist for the current last position
    bool logits_fresh_ = false;         // not sampled from yet
    q3n_sampling_params sampling_{};
    uint64_t draws_ = 0;
    std::vector<int32_t> output_tokens_;     // sampled in this request, for the penalties
    std::vector<size_t> output_positions_;   // where each of them sits in tokens_
    int32_t last_token_ = -1;

    // An image or video whose placeholders are tokens_[first, first + count).
    struct VisionItem {
        q3n_vision_kind kind;
        GridThw grid;
        size_t first;
        size_t count;
        std::vector<float> pixels;    // the caller's rows, until the tower has run
        std::vector<float> features;  // from the step that first reaches the item until all its rows are cached
        bool encoded = false;
    };
    std::vector<VisionItem> vision_;
    // MRoPE models: each token's (t, h, w) position, and the position the next text token takes.
    std::vector<int32_t> pos_t_, pos_h_, pos_w_;
    int64_t next_position_ = 0;
    void push_text_positions(size_t count);
    void encode_vision(size_t end);          // runs the tower for items that [cached_, end) reaches
    void release_consumed_vision();          // frees features whose rows are all cached

    // Log-probabilities of this request.
    q3n_token_logprob last_logprob_{};
    bool has_last_logprob_ = false;
    std::vector<q3n_token_logprob> prompt_logprobs_;

    // Statistics of this request (see q3n_sequence_stats).
    using Clock = std::chrono::steady_clock;
    void begin_request();
    uint64_t request_cached_ = 0;
    uint64_t prompt_tokens_ = 0;
    bool stepped_ = false;
    Clock::time_point first_step_{}, first_sample_{}, last_sample_{};
};

}  // namespace q3n
