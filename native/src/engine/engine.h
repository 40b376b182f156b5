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
    // Runs one step over the listed sequences (see q3n_model_step). Caller holds mutex().
    void step(Sequence* const* sequences, size_t count, uint32_t flags);

    std::mutex& mutex() const { return mutex_; }
    const ModelConfig& config() const { return config_; }
    KvCache& kv() { return *kv_; }
    ModelRunner& runner() { return *runner_; }
    uint64_t next_sequence_id() { return ++sequence_ids_; }
    Sampler& sampler() { return *sampler_; }
    std::vector<float>& sample_scratch() { return sample_scratch_; }
    LogprobCalculator& logprobs() { return *logprobs_; }
    uint32_t context_length() const { return context_length_; }

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
    std::vector<size_t> rows_, first_rows_, blocks_before_;
    std::vector<float> logits_;
    uint64_t step_stamp_ = 0;
    std::vector<int32_t> penalty_ids_, penalty_counts_;
    uint64_t sequence_ids_ = 0;

    void sample_on_device(Sequence* const* seqs, size_t count);

    void prompt_logprobs(Sequence& s, size_t first_row, size_t first_position);
};

class Sequence {
public:
    explicit Sequence(std::shared_ptr<Model> model);
    ~Sequence();  // returns the KV blocks (takes the model's mutex)

    Model& model() const { return *model_; }

    void append(const int32_t* tokens, size_t count);
    // Appends a token chosen elsewhere (the device sampler) with the bookkeeping of sample().
    void accept_sampled(int32_t token, const q3n_token_logprob* logprob);
    void check_room_to_sample() const;
    void truncate(size_t length);
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
