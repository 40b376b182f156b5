// The C boundary. Every entry point runs its body inside Q3N_GUARD, which turns q3n::Error,
// std::bad_alloc and any other exception into a status plus the thread-local message.
#include <algorithm>
#include <cstring>
#include <new>
#include <string>

#include "core/error.h"
#include "engine/engine.h"
#include "qwen3native.h"

struct q3n_model {
    std::shared_ptr<q3n::Model> impl;
};

struct q3n_sequence {
    std::unique_ptr<q3n::Sequence> impl;
};

namespace {

thread_local std::string g_last_error;

q3n_status set_error(q3n_status status, const char* message) {
    try {
        g_last_error = message;
    } catch (...) {
        // Keep the status even if the message itself cannot be stored.
    }
    return status;
}

template <typename F>
q3n_status guard(F&& body) noexcept {
    try {
        g_last_error.clear();
        body();
        return Q3N_OK;
    } catch (const q3n::Error& e) {
        return set_error(e.status(), e.what());
    } catch (const std::bad_alloc&) {
        return set_error(Q3N_ERR_OUT_OF_MEMORY, "out of memory");
    } catch (const std::exception& e) {
        return set_error(Q3N_ERR_INTERNAL, e.what());
    } catch (...) {
        return set_error(Q3N_ERR_INTERNAL, "unknown internal error");
    }
}

void need(const void* p, const char* what) {
    if (!p) q3n::fail(Q3N_ERR_INVALID_ARGUMENT, std::string(what) + " is NULL");
}

// Copies a caller's versioned struct into a defaulted full-size one.
template <typename T>
T read_versioned(const T* in, void (*init)(T*, size_t), const char* what) {
    T out;
    init(&out, sizeof(T));
    if (!in) return out;
    if (in->struct_size < sizeof(uint32_t) || in->struct_size > sizeof(T))
        q3n::fail(Q3N_ERR_INVALID_ARGUMENT, std::string(what) + ".struct_size is " + std::to_string(in->struct_size) +
                                                 "; set it with the matching _init function");
    std::memcpy(&out, in, in->struct_size);
    out.struct_size = sizeof(T);
    return out;
}

void validate(const q3n_model_options& o) {
    if (o.device != Q3N_DEVICE_AUTO && o.device != Q3N_DEVICE_CPU && o.device != Q3N_DEVICE_CUDA)
        q3n::fail(Q3N_ERR_INVALID_ARGUMENT, "unknown device " + std::to_string(o.device));
    if (o.kv_cache_dtype != Q3N_DTYPE_AUTO && o.kv_cache_dtype != Q3N_DTYPE_F32 && o.kv_cache_dtype != Q3N_DTYPE_BF16)
        q3n::fail(Q3N_ERR_INVALID_ARGUMENT, "kv_cache_dtype must be AUTO, F32 or BF16 on this build");
    if (o.load_format != Q3N_LOAD_SAFETENSORS && o.load_format != Q3N_LOAD_DUMMY)
        q3n::fail(Q3N_ERR_INVALID_ARGUMENT, "unknown load_format " + std::to_string(o.load_format));
    if (o.kv_block_size > 1024) q3n::fail(Q3N_ERR_INVALID_ARGUMENT, "kv_block_size must be at most 1024");
    if (o.num_threads > 4096) q3n::fail(Q3N_ERR_INVALID_ARGUMENT, "num_threads is absurdly large");
    if (o.kv_cache_tokens > (uint64_t{1} << 32)) q3n::fail(Q3N_ERR_INVALID_ARGUMENT, "kv_cache_tokens is absurdly large");
}

// Builds the full default struct, then copies as much of it as the caller's struct holds.
template <typename T>
void init_versioned(T* out, size_t struct_size, const T& defaults) {
    if (!out || struct_size < sizeof(uint32_t)) return;
    const size_t n = std::min(struct_size, sizeof(T));
    std::memcpy(out, &defaults, n);
    out->struct_size = static_cast<uint32_t>(n);
}

}  // namespace

// The other api/*.cpp files report through the same thread-local message (api/last_error.h).
namespace q3n::api {
void clear_last_error() noexcept { g_last_error.clear(); }
q3n_status set_last_error(q3n_status status, const char* message) noexcept { return set_error(status, message); }
}  // namespace q3n::api

extern "C" {

uint32_t q3n_abi_version(void) { return Q3N_ABI_VERSION; }

const char* q3n_version_string(void) {
#ifdef Q3N_WITH_CUDA
    return Q3N_VERSION "+cpu+cuda";
#else
    return Q3N_VERSION "+cpu";
#endif
}

const char* q3n_last_error(void) { return g_last_error.c_str(); }

const char* q3n_status_name(q3n_status status) {
    switch (status) {
        case Q3N_OK: return "Q3N_OK";
        case Q3N_ERR_INVALID_ARGUMENT: return "Q3N_ERR_INVALID_ARGUMENT";
        case Q3N_ERR_IO: return "Q3N_ERR_IO";
        case Q3N_ERR_BAD_CHECKPOINT: return "Q3N_ERR_BAD_CHECKPOINT";
        case Q3N_ERR_BAD_CONFIG: return "Q3N_ERR_BAD_CONFIG";
        case Q3N_ERR_UNSUPPORTED: return "Q3N_ERR_UNSUPPORTED";
        case Q3N_ERR_OUT_OF_MEMORY: return "Q3N_ERR_OUT_OF_MEMORY";
        case Q3N_ERR_CONTEXT_OVERFLOW: return "Q3N_ERR_CONTEXT_OVERFLOW";
        case Q3N_ERR_KV_CACHE_FULL: return "Q3N_ERR_KV_CACHE_FULL";
        case Q3N_ERR_NUMERIC: return "Q3N_ERR_NUMERIC";
        case Q3N_ERR_DEVICE: return "Q3N_ERR_DEVICE";
        case Q3N_ERR_BUFFER_TOO_SMALL: return "Q3N_ERR_BUFFER_TOO_SMALL";
        case Q3N_ERR_INVALID_STATE: return "Q3N_ERR_INVALID_STATE";
        case Q3N_ERR_INTERNAL: return "Q3N_ERR_INTERNAL";
    }
    return "Q3N_ERR_UNKNOWN";
}

void q3n_model_options_init(q3n_model_options* o, size_t struct_size) {
    q3n_model_options d;
    std::memset(&d, 0, sizeof(d));
    d.device = Q3N_DEVICE_AUTO;
    d.kv_cache_dtype = Q3N_DTYPE_AUTO;
    d.load_format = Q3N_LOAD_SAFETENSORS;
    init_versioned(o, struct_size, d);
}

q3n_status q3n_model_load(const char* path, const q3n_model_options* options, q3n_model** out_model) {
    if (out_model) *out_model = nullptr;
    return guard([&] {
        need(path, "path");
        need(out_model, "out_model");
        const q3n_model_options o = read_versioned(options, q3n_model_options_init, "q3n_model_options");
        validate(o);
        auto handle = std::make_unique<q3n_model>();
        handle->impl = q3n::Model::load(path, o);
        *out_model = handle.release();
    });
}

void q3n_model_free(q3n_model* model) { delete model; }

q3n_status q3n_model_get_info(const q3n_model* model, q3n_model_info* info) {
    return guard([&] {
        need(model, "model");
        need(info, "info");
        if (info->struct_size < sizeof(uint32_t) || info->struct_size > sizeof(q3n_model_info))
            q3n::fail(Q3N_ERR_INVALID_ARGUMENT, "q3n_model_info.struct_size must be set to sizeof(q3n_model_info)");
        std::lock_guard<std::mutex> lock(model->impl->mutex());
        model->impl->fill_info(*info);
    });
}

q3n_status q3n_sequence_create(q3n_model* model, q3n_sequence** out_sequence) {
    if (out_sequence) *out_sequence = nullptr;
    return guard([&] {
        need(model, "model");
        need(out_sequence, "out_sequence");
        auto handle = std::make_unique<q3n_sequence>();
        handle->impl = std::make_unique<q3n::Sequence>(model->impl);
        *out_sequence = handle.release();
    });
}

void q3n_sequence_free(q3n_sequence* sequence) {
    try {
        delete sequence;
    } catch (...) {
        // A destructor that cannot take its lock has nothing better to do than leak.
    }
}

q3n_status q3n_sequence_append(q3n_sequence* s, const int32_t* tokens, size_t count) {
    return guard([&] {
        need(s, "sequence");
        std::lock_guard<std::mutex> lock(s->impl->model().mutex());
        s->impl->append(tokens, count);
    });
}

q3n_status q3n_sequence_length(const q3n_sequence* s, size_t* out_length) {
    return guard([&] {
        need(s, "sequence");
        need(out_length, "out_length");
        std::lock_guard<std::mutex> lock(s->impl->model().mutex());
        *out_length = s->impl->tokens().size();
    });
}

q3n_status q3n_sequence_cached_length(const q3n_sequence* s, size_t* out_length) {
    return guard([&] {
        need(s, "sequence");
        need(out_length, "out_length");
        std::lock_guard<std::mutex> lock(s->impl->model().mutex());
        *out_length = s->impl->cached();
    });
}

q3n_status q3n_sequence_get_tokens(const q3n_sequence* s, int32_t* tokens, size_t capacity, size_t* out_count) {
    return guard([&] {
        need(s, "sequence");
        need(out_count, "out_count");
        std::lock_guard<std::mutex> lock(s->impl->model().mutex());
        const auto& t = s->impl->tokens();
        *out_count = t.size();
        if (capacity < t.size()) q3n::fail(Q3N_ERR_BUFFER_TOO_SMALL, "need room for " + std::to_string(t.size()) + " tokens");
        if (!t.empty()) {
            need(tokens, "tokens");
            std::memcpy(tokens, t.data(), t.size() * sizeof(int32_t));
        }
    });
}

q3n_status q3n_sequence_truncate(q3n_sequence* s, size_t length) {
    return guard([&] {
        need(s, "sequence");
        std::lock_guard<std::mutex> lock(s->impl->model().mutex());
        s->impl->truncate(length);
    });
}

q3n_status q3n_sequence_get_rope_positions(const q3n_sequence* s, int32_t* positions, size_t capacity,
                                           size_t* out_count) {
    return guard([&] {
        need(s, "sequence");
        need(out_count, "out_count");
        std::lock_guard<std::mutex> lock(s->impl->model().mutex());
        const size_t n = 3 * s->impl->tokens().size();
        *out_count = n;
        if (capacity < n) q3n::fail(Q3N_ERR_BUFFER_TOO_SMALL, "need room for " + std::to_string(n) + " positions");
        if (n) {
            need(positions, "positions");
            s->impl->rope_positions(positions);
        }
    });
}

q3n_status q3n_sequence_append_vision(q3n_sequence* s, q3n_vision_kind kind, uint32_t grid_t, uint32_t grid_h,
                                      uint32_t grid_w, const float* pixel_values, size_t value_count) {
    return guard([&] {
        need(s, "sequence");
        std::lock_guard<std::mutex> lock(s->impl->model().mutex());
        s->impl->append_vision(kind, q3n::GridThw{grid_t, grid_h, grid_w}, pixel_values, value_count);
    });
}

q3n_status q3n_model_step(q3n_model* model, q3n_sequence* const* sequences, size_t count, uint32_t flags) {
    return q3n_model_step_limited(model, sequences, count, flags, 0);
}

q3n_status q3n_model_step_limited(q3n_model* model, q3n_sequence* const* sequences, size_t count, uint32_t flags,
                                  size_t max_tokens) {
    return guard([&] {
        need(model, "model");
        need(sequences, "sequences");
        if (flags & ~uint32_t{Q3N_STEP_SAMPLE}) q3n::fail(Q3N_ERR_INVALID_ARGUMENT, "unknown step flags");
        std::lock_guard<std::mutex> lock(model->impl->mutex());
        std::vector<q3n::Sequence*> seqs(count);
        for (size_t i = 0; i < count; ++i) seqs[i] = sequences[i] ? sequences[i]->impl.get() : nullptr;
        model->impl->step(seqs.data(), count, flags, max_tokens);
    });
}

q3n_status q3n_sequence_get_logits(const q3n_sequence* s, float* logits, size_t capacity, size_t* out_count) {
    return guard([&] {
        need(s, "sequence");
        need(out_count, "out_count");
        std::lock_guard<std::mutex> lock(s->impl->model().mutex());
        if (!s->impl->has_logits()) q3n::fail(Q3N_ERR_INVALID_STATE, "the sequence has no logits: run q3n_model_step first");
        const auto& l = s->impl->logits();
        *out_count = l.size();
        if (capacity < l.size()) q3n::fail(Q3N_ERR_BUFFER_TOO_SMALL, "need room for " + std::to_string(l.size()) + " logits");
        need(logits, "logits");
        std::memcpy(logits, l.data(), l.size() * sizeof(float));
    });
}

void q3n_sampling_params_init(q3n_sampling_params* p, size_t struct_size) {
    q3n_sampling_params d;
    std::memset(&d, 0, sizeof(d));
    d.temperature = 0.0f;
    d.top_k = 0;
    d.top_p = 1.0f;
    d.min_p = 0.0f;
    d.repetition_penalty = 1.0f;
    init_versioned(p, struct_size, d);
}

q3n_status q3n_sequence_set_sampling(q3n_sequence* s, const q3n_sampling_params* params) {
    return guard([&] {
        need(s, "sequence");
        need(params, "params");
        const q3n_sampling_params p = read_versioned(params, q3n_sampling_params_init, "q3n_sampling_params");
        std::lock_guard<std::mutex> lock(s->impl->model().mutex());
        s->impl->set_sampling(p);
    });
}

q3n_status q3n_sequence_sample(q3n_sequence* s, int32_t* out_token) {
    if (out_token) *out_token = -1;
    return guard([&] {
        need(s, "sequence");
        need(out_token, "out_token");
        std::lock_guard<std::mutex> lock(s->impl->model().mutex());
        *out_token = s->impl->sample();
    });
}

q3n_status q3n_sequence_last_token(const q3n_sequence* s, int32_t* out_token) {
    return guard([&] {
        need(s, "sequence");
        need(out_token, "out_token");
        std::lock_guard<std::mutex> lock(s->impl->model().mutex());
        *out_token = s->impl->last_token();
    });
}

q3n_status q3n_sequence_get_token_logprob(const q3n_sequence* s, q3n_token_logprob* out) {
    return guard([&] {
        need(s, "sequence");
        need(out, "out");
        std::lock_guard<std::mutex> lock(s->impl->model().mutex());
        const q3n_token_logprob* lp = s->impl->last_logprob();
        if (!lp) q3n::fail(Q3N_ERR_INVALID_STATE, "no log-probability: set logprobs in the sampling params and sample a token");
        *out = *lp;
    });
}

q3n_status q3n_sequence_get_prompt_logprobs(const q3n_sequence* s, q3n_token_logprob* out, size_t capacity,
                                            size_t* out_count) {
    return guard([&] {
        need(s, "sequence");
        need(out_count, "out_count");
        std::lock_guard<std::mutex> lock(s->impl->model().mutex());
        const auto& v = s->impl->prompt_logprobs();
        *out_count = v.size();
        if (capacity < v.size()) q3n::fail(Q3N_ERR_BUFFER_TOO_SMALL, "need room for " + std::to_string(v.size()) + " entries");
        if (!v.empty()) {
            need(out, "out");
            std::memcpy(out, v.data(), v.size() * sizeof(q3n_token_logprob));
        }
    });
}

q3n_status q3n_sequence_get_stats(const q3n_sequence* s, q3n_sequence_stats* stats) {
    return guard([&] {
        need(s, "sequence");
        need(stats, "stats");
        if (stats->struct_size < sizeof(uint32_t) || stats->struct_size > sizeof(q3n_sequence_stats))
            q3n::fail(Q3N_ERR_INVALID_ARGUMENT, "q3n_sequence_stats.struct_size must be set to sizeof(q3n_sequence_stats)");
        std::lock_guard<std::mutex> lock(s->impl->model().mutex());
        s->impl->fill_stats(*stats);
    });
}

}  // extern "C"
