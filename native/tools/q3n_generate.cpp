// q3n_generate: generate tokens from a checkpoint directory through the C API.
//
//   q3n_generate --model DIR [--prompt-ids 1,2,3] [--max-tokens N] [--temperature T] [--top-k K]
//                [--top-p P] [--min-p P] [--seed S] [--threads N] [--dummy] [--json]
//
// Token ids in, token ids out: the tokenizer and chat template live in the .NET façade. Stops at
// max-tokens, at an end-of-sequence id from the model's config, or at the context length.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "qwen3native.h"

namespace {

int fail(const char* what) {
    std::fprintf(stderr, "error: %s: %s\n", what, q3n_last_error());
    return 1;
}

std::vector<int32_t> parse_ids(const std::string& s) {
    std::vector<int32_t> ids;
    std::stringstream ss(s);
    std::string item;
    while (std::getline(ss, item, ',')) {
        if (item.empty()) continue;
        char* end = nullptr;
        const long v = std::strtol(item.c_str(), &end, 10);
        if (*end != '\0' || v < 0 || v > INT32_MAX) {
            std::fprintf(stderr, "error: '%s' is not a token id\n", item.c_str());
            std::exit(2);
        }
        ids.push_back(static_cast<int32_t>(v));
    }
    return ids;
}

}  // namespace

int main(int argc, char** argv) {
    std::string model_dir;
    std::vector<int32_t> prompt = {0};
    size_t max_tokens = 32;
    bool json = false;
    q3n_model_options o;
    q3n_model_options_init(&o, sizeof o);
    o.device = Q3N_DEVICE_CPU;
    q3n_sampling_params sp;
    q3n_sampling_params_init(&sp, sizeof sp);
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc) {
                std::fprintf(stderr, "error: %s needs a value\n", a.c_str());
                std::exit(2);
            }
            return argv[++i];
        };
        if (a == "--model") model_dir = next();
        else if (a == "--prompt-ids") prompt = parse_ids(next());
        else if (a == "--max-tokens") max_tokens = std::stoul(next());
        else if (a == "--temperature") sp.temperature = std::stof(next());
        else if (a == "--top-k") sp.top_k = std::stoi(next());
        else if (a == "--top-p") sp.top_p = std::stof(next());
        else if (a == "--min-p") sp.min_p = std::stof(next());
        else if (a == "--seed") sp.seed = std::stoull(next());
        else if (a == "--threads") o.num_threads = static_cast<uint32_t>(std::stoul(next()));
        else if (a == "--dummy") o.load_format = Q3N_LOAD_DUMMY;
        else if (a == "--json") json = true;
        else {
            std::fprintf(stderr,
                         "usage: %s --model DIR [--prompt-ids 1,2,3] [--max-tokens N] [--temperature T] [--top-k K]\n"
                         "          [--top-p P] [--min-p P] [--seed S] [--threads N] [--dummy] [--json]\n",
                         argv[0]);
            return 2;
        }
    }
    if (model_dir.empty()) {
        std::fprintf(stderr, "error: --model DIR is required\n");
        return 2;
    }

    using Clock = std::chrono::steady_clock;
    const auto t0 = Clock::now();
    q3n_model* model = nullptr;
    if (q3n_model_load(model_dir.c_str(), &o, &model) != Q3N_OK) return fail("loading the model");
    q3n_model_info info{};
    info.struct_size = sizeof(info);
    q3n_model_get_info(model, &info);
    const auto t1 = Clock::now();

    q3n_sequence* seq = nullptr;
    if (q3n_sequence_create(model, &seq) != Q3N_OK) return fail("creating a sequence");
    if (q3n_sequence_set_sampling(seq, &sp) != Q3N_OK) return fail("sampling options");
    if (q3n_sequence_append(seq, prompt.data(), prompt.size()) != Q3N_OK) return fail("the prompt");

    std::vector<int32_t> generated;
    std::string finish = "length";
    double first_token_s = 0;
    for (size_t i = 0; i < max_tokens; ++i) {
        const q3n_status st = q3n_model_step(model, &seq, 1, Q3N_STEP_SAMPLE);
        if (st == Q3N_ERR_CONTEXT_OVERFLOW) {
            finish = "context";
            break;
        }
        if (st != Q3N_OK) return fail("generating");
        if (i == 0) first_token_s = std::chrono::duration<double>(Clock::now() - t1).count();
        int32_t token = -1;
        q3n_sequence_last_token(seq, &token);
        generated.push_back(token);
        bool eos = false;
        for (uint32_t e = 0; e < info.num_eos_token_ids; ++e) eos = eos || info.eos_token_ids[e] == token;
        if (eos) {
            finish = "stop";
            break;
        }
    }
    const double total_s = std::chrono::duration<double>(Clock::now() - t1).count();
    const double decode_tps = generated.size() > 1 ? (generated.size() - 1) / (total_s - first_token_s) : 0.0;

    if (json) {
        std::printf("{\"ids\": [");
        for (size_t i = 0; i < generated.size(); ++i) std::printf("%s%d", i ? ", " : "", generated[i]);
        std::printf("], \"finish_reason\": \"%s\", \"prompt_tokens\": %zu, \"ttft_ms\": %.3f, \"decode_tokens_per_s\": %.3f}\n",
                    finish.c_str(), prompt.size(), first_token_s * 1e3, decode_tps);
    } else {
        std::printf("model: %s, %s weights, %u layers, hidden %u (loaded in %.2f s)\n", info.architecture,
                    info.weight_dtype == Q3N_DTYPE_FP8_E4M3 ? "FP8" : "BF16", info.num_layers, info.hidden_size,
                    std::chrono::duration<double>(t1 - t0).count());
        std::printf("prompt ids (%zu): ", prompt.size());
        for (int32_t t : prompt) std::printf("%d ", t);
        std::printf("\ngenerated ids (%zu, finish: %s): ", generated.size(), finish.c_str());
        for (int32_t t : generated) std::printf("%d ", t);
        std::printf("\ntime to first token %.1f ms, decode %.1f tokens/s\n", first_token_s * 1e3, decode_tps);
    }
    q3n_sequence_free(seq);
    q3n_model_free(model);
    return 0;
}
