// GPU decode and prefill benchmark on a full-size config with dummy weights.
//
//   bench_cuda_decode --config DIR_OR_JSON [--batches 1,8,32,128] [--prompt 512] [--tokens 256]
//                     [--kv-dtype bf16|f32] [--image WIDTHxHEIGHT] [--out bench/results]
//
// --image (Qwen3-VL configs): each prompt starts with one image of that size (random pixel values,
// the grid smart_resize gives with patch 16 and merge 2), so TTFT includes the vision encoder and
// decode runs after the image's tokens.
//
// The floor of a decode step is the weight bytes read once (plus, for bigger batches, the KV cache
// read) over the device-to-device bandwidth measured in the same run (bytes read + written by a
// large cudaMemcpy, i.e. its DRAM traffic). Figures are reported as a fraction of that floor.
//
// Sparse models (Qwen3MoeForCausalLM, Qwen3NextForCausalLM) read only the experts their tokens pick:
// their floor counts the active bytes of a step, i.e. every weight but the routed experts and an
// untied embedding table (one row per token), plus the experts a batch is expected to touch under
// uniform routing, E (1 - (1 - k/E)^batch) per sparse layer, plus (Qwen3-Next) each sequence's fp32
// recurrent state read and written once. Only full-attention layers keep a KV cache.
//
// Dense text models (Qwen3ForCausalLM, no --image) also report the first prefill's arithmetic rate:
// 2 FLOPs per weight of every layer linear per prompt token, the causal attention's 4 * heads *
// head_dim per (query, visible key) pair, and the LM head for the one sampled row, over TTFT, as a
// fraction of the cuBLASLt FP8 tensor-core peak (8192^3, tensor-wide scales) measured in the same
// run.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <unistd.h>

#include "bench_common.h"
#include "cuda_bench_util.h"
#include "cuda_peak.h"
#include "qwen3native.h"

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

// What a decode step must read besides the KV cache, from config.json (see the header comment).
struct ActiveBytes {
    bool sparse = false;
    double fixed = 0;         // bytes every step reads whatever the batch: weight_bytes less the routed
                              // experts and an untied embedding table
    double expert = 0;        // one routed expert's gate, up and down (with FP8 scales)
    double embed_row = 0;     // per token, untied embedding only
    size_t sparse_layers = 0, experts = 0, top_k = 0;
    size_t kv_layers = 0;     // layers with a KV cache
    double state = 0;         // per sequence: recurrent state read + written (Qwen3-Next)

    double step(size_t batch) const {
        if (!sparse) return fixed;
        const double E = static_cast<double>(experts), touched = E * (1.0 - std::pow(1.0 - top_k / E, double(batch)));
        return fixed + sparse_layers * touched * expert + batch * (embed_row + state);
    }
};

ActiveBytes active_bytes(const nlohmann::json& j, double weight_bytes, size_t num_layers) {
    ActiveBytes a;
    a.fixed = weight_bytes;
    a.kv_layers = num_layers;
    const std::string arch = j.value("architectures", nlohmann::json::array({""}))[0].get<std::string>();
    const bool next = arch == "Qwen3NextForCausalLM";
    if (next) {
        const size_t interval = j.value("full_attention_interval", 4);
        size_t full = 0;
        if (j.contains("layer_types") && j["layer_types"].is_array()) {
            for (const auto& t : j["layer_types"]) full += t == "full_attention";
        } else {
            for (size_t l = 0; l < num_layers; ++l) full += (l + 1) % interval == 0;
        }
        a.kv_layers = full;
        const double nv = j["linear_num_value_heads"], dk = j["linear_key_head_dim"], dv = j["linear_value_head_dim"];
        const double nk = j["linear_num_key_heads"], K = j["linear_conv_kernel_dim"];
        a.state = 2.0 * (num_layers - full) * (nv * dk * dv + (2 * nk * dk + nv * dv) * (K - 1)) * 4;
    }
    if (arch != "Qwen3MoeForCausalLM" && !next) return a;
    a.sparse = true;
    const bool fp8 = j.contains("quantization_config");
    const double H = j["hidden_size"], Ie = j["moe_intermediate_size"], V = j["vocab_size"];
    auto linear = [&](double out, double in) {
        return out * in * (fp8 ? 1 : 2) + (fp8 ? std::ceil(out / 128) * std::ceil(in / 128) * 4 : 0);
    };
    a.expert = 2 * linear(Ie, H) + linear(H, Ie);
    a.experts = j["num_experts"];
    a.top_k = j["num_experts_per_tok"];
    const size_t step = j.value("decoder_sparse_step", 1);
    const auto only = j.value("mlp_only_layers", std::vector<size_t>{});
    for (size_t l = 0; l < num_layers; ++l)
        a.sparse_layers += std::find(only.begin(), only.end(), l) == only.end() && (l + 1) % step == 0;
    a.fixed -= a.sparse_layers * a.experts * a.expert;
    if (!j.value("tie_word_embeddings", false)) {
        a.fixed -= V * H * 2;
        a.embed_row = H * 2;
    }
    return a;
}

// FLOPs of a prefill of `prompt` tokens (no cached prefix) in a dense Qwen3 text model; 0 for
// other architectures.
double dense_prefill_flops(const nlohmann::json& j, size_t prompt) {
    const std::string arch = j.value("architectures", nlohmann::json::array({""}))[0].get<std::string>();
    if (arch != "Qwen3ForCausalLM") return 0;
    const double H = j["hidden_size"], I = j["intermediate_size"], V = j["vocab_size"], L = j["num_hidden_layers"];
    const double nH = j["num_attention_heads"], nKV = j["num_key_value_heads"];
    const double d = j.value("head_dim", H / nH), P = static_cast<double>(prompt);
    const double linear = H * (nH + 2 * nKV) * d + nH * d * H + 3 * H * I;
    return L * (2 * P * linear + 4 * nH * d * P * (P + 1) / 2) + 2 * V * H;
}

}  // namespace

int main(int argc, char** argv) {
    std::string config, out_dir = "bench/results", batches_arg = "1,8,32,128", kv = "bf16", image_arg;
    size_t prompt_len = 512, new_tokens = 256;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto next = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
        if (a == "--config") config = next();
        else if (a == "--batches") batches_arg = next();
        else if (a == "--prompt") prompt_len = std::stoul(next());
        else if (a == "--tokens") new_tokens = std::stoul(next());
        else if (a == "--kv-dtype") kv = next();
        else if (a == "--out") out_dir = next();
        else if (a == "--image") image_arg = next();
        else {
            std::fprintf(stderr, "usage: %s --config CONFIG.json [--batches 1,8] [--prompt N] [--tokens N] [--kv-dtype bf16|f32] [--image WxH] [--out DIR]\n", argv[0]);
            return 2;
        }
    }
    std::vector<size_t> batches;
    std::stringstream ss(batches_arg);
    for (std::string item; std::getline(ss, item, ',');) batches.push_back(std::stoul(item));
    const size_t max_batch = *std::max_element(batches.begin(), batches.end());
    uint32_t image_w = 0, image_h = 0, grid_h = 0, grid_w = 0;
    size_t image_tokens = 0;  // the image's pad tokens plus <|vision_start|> and <|vision_end|>
    if (!image_arg.empty()) {
        if (std::sscanf(image_arg.c_str(), "%ux%u", &image_w, &image_h) != 2 || image_w == 0 || image_h == 0)
            return q3n_bench::die("--image wants WIDTHxHEIGHT");
        const auto [rh, rw] = q3n_bench::smart_resize(image_h, image_w);
        grid_h = rh / 16;
        grid_w = rw / 16;
        image_tokens = size_t(grid_h) * grid_w / 4 + 2;
    }

    const fs::path dir = fs::temp_directory_path() / ("q3n-gpu-bench-" + std::to_string(getpid()));
    fs::create_directories(dir);
    fs::copy_file(config, dir / "config.json", fs::copy_options::overwrite_existing);

    const double bandwidth = q3n_bench::measure_d2d_bandwidth();
    q3n_model_options o;
    q3n_model_options_init(&o, sizeof o);
    o.device = Q3N_DEVICE_CUDA;
    o.load_format = Q3N_LOAD_DUMMY;
    o.dummy_seed = 1;
    o.kv_cache_dtype = kv == "f32" ? Q3N_DTYPE_F32 : Q3N_DTYPE_BF16;
    o.context_length = static_cast<uint32_t>(image_tokens + prompt_len + new_tokens + 8);
    o.kv_cache_tokens = (image_tokens + prompt_len + new_tokens + 16) * max_batch;
    // GPU memory this process holds: total less free, sampled after the load and after every prefill
    // and batch (the engine's buffers only grow, so the largest sample is the peak of the run).
    auto gpu_used = [] {
        size_t free_bytes = 0, total_bytes = 0;
        cudaMemGetInfo(&free_bytes, &total_bytes);
        return static_cast<double>(total_bytes - free_bytes);
    };
    const double used_before = gpu_used();
    q3n_model* model = nullptr;
    const auto t_load = Clock::now();
    if (q3n_model_load(dir.c_str(), &o, &model) != Q3N_OK) return q3n_bench::die("load");
    const double load_s = std::chrono::duration<double>(Clock::now() - t_load).count();
    const double used_after_load = gpu_used() - used_before;
    double used_peak = used_after_load;
    fs::remove_all(dir);
    q3n_model_info info{};
    info.struct_size = sizeof info;
    q3n_model_get_info(model, &info);
    nlohmann::json config_json;
    {
        std::ifstream in(fs::is_directory(config) ? fs::path(config) / "config.json" : fs::path(config));
        config_json = nlohmann::json::parse(in);
    }
    const ActiveBytes active = active_bytes(config_json, static_cast<double>(info.weight_bytes), info.num_layers);
    const double kv_bytes_per_token = 2.0 * active.kv_layers * info.num_kv_heads * info.head_dim * (kv == "f32" ? 4 : 2);
    const double prefill_flops = image_tokens ? 0 : dense_prefill_flops(config_json, prompt_len);
    double fp8_peak = 0;
    if (prefill_flops > 0) {  // timed through a graph capture, which the legacy stream does not allow
        cudaStream_t peak_stream = nullptr;
        cudaStreamCreateWithFlags(&peak_stream, cudaStreamNonBlocking);
        fp8_peak = q3n_bench::measure_peak_tflops(true, peak_stream);
        cudaStreamDestroy(peak_stream);
    }

    cudaDeviceProp prop;
    cudaGetDeviceProperties(&prop, 0);
    std::printf("device       %s, D2D bandwidth %.0f GB/s (read + write)\n", prop.name, bandwidth / 1e9);
    std::printf("model        %s, %s weights %.2f GB, loaded in %.1f s\n", fs::path(config).filename().c_str(),
                info.weight_dtype == Q3N_DTYPE_FP8_E4M3 ? "fp8" : "bf16", info.weight_bytes / 1e9, load_s);
    if (active.sparse)
        std::printf("active       %.2f GB per step at batch 1 (%zu of %zu experts in %zu sparse layers)\n",
                    active.step(1) / 1e9, active.top_k, active.experts, active.sparse_layers);

    std::vector<float> pixels;
    if (image_tokens) {
        if (!info.has_vision) return q3n_bench::die("--image needs a Qwen3-VL config");
        pixels.resize(size_t(grid_h) * grid_w * 3 * info.temporal_patch_size * info.patch_size * info.patch_size);
        std::mt19937 prng(11);
        std::uniform_real_distribution<float> value(-1.8f, 2.1f);  // the normalised range
        for (auto& v : pixels) v = value(prng);
        std::printf("image        %ux%u -> grid %ux%u, %zu tokens\n", image_w, image_h, grid_h, grid_w, image_tokens - 2);
    }

    std::ostringstream js;
    js << "{\n  \"benchmark\": \"cuda_decode\",\n  \"config\": \"" << fs::path(config).stem().string() << "\",\n"
       << "  \"device\": \"" << prop.name << "\",\n  \"date\": \"" << q3n_bench::utc_now() << "\",\n"
       << "  \"commit\": \"" << q3n_bench::commit_id() << "\",\n"
       << "  \"weight_bytes\": " << info.weight_bytes << ",\n  \"kv_dtype\": \"" << kv << "\",\n"
       << "  \"d2d_bandwidth_gb_s\": " << bandwidth / 1e9 << ",\n  \"prompt_tokens\": " << prompt_len
       << ",\n  \"new_tokens\": " << new_tokens << ",\n";
    if (image_tokens)
        js << "  \"image\": {\"width\": " << image_w << ", \"height\": " << image_h << ", \"grid_h\": " << grid_h
           << ", \"grid_w\": " << grid_w << ", \"tokens\": " << image_tokens - 2 << "},\n";
    js << "  \"runs\": [";

    std::mt19937 rng(7);
    {
        // One untimed prefill of the same length first: TTFT is the steady state, not the first
        // call's cuBLASLt planning and scratch growth.
        q3n_sequence* warm = nullptr;
        std::vector<int32_t> prompt(prompt_len);
        for (auto& t : prompt) t = static_cast<int32_t>(rng() % 151643);
        if (q3n_sequence_create(model, &warm) != Q3N_OK) return q3n_bench::die("sequence");
        if (image_tokens) {
            const int32_t start = info.vision_start_token_id, end = info.vision_end_token_id;
            if (q3n_sequence_append(warm, &start, 1) != Q3N_OK ||
                q3n_sequence_append_vision(warm, Q3N_VISION_IMAGE, 1, grid_h, grid_w, pixels.data(), pixels.size()) != Q3N_OK ||
                q3n_sequence_append(warm, &end, 1) != Q3N_OK)
                return q3n_bench::die("image");
        }
        if (q3n_sequence_append(warm, prompt.data(), prompt.size()) != Q3N_OK ||
            q3n_model_step(model, &warm, 1, Q3N_STEP_SAMPLE) != Q3N_OK)
            return q3n_bench::die("warm-up prefill");
        q3n_sequence_free(warm);
    }
    for (size_t bi = 0; bi < batches.size(); ++bi) {
        const size_t batch = batches[bi];
        std::vector<q3n_sequence*> seqs(batch);
        for (auto& s : seqs) {
            if (q3n_sequence_create(model, &s) != Q3N_OK) return q3n_bench::die("sequence");
            if (image_tokens) {
                const int32_t start = info.vision_start_token_id, end = info.vision_end_token_id;
                if (q3n_sequence_append(s, &start, 1) != Q3N_OK ||
                    q3n_sequence_append_vision(s, Q3N_VISION_IMAGE, 1, grid_h, grid_w, pixels.data(), pixels.size()) != Q3N_OK ||
                    q3n_sequence_append(s, &end, 1) != Q3N_OK)
                    return q3n_bench::die("image");
            }
            std::vector<int32_t> prompt(prompt_len);
            for (auto& t : prompt) t = static_cast<int32_t>(rng() % 151643);
            q3n_sequence_append(s, prompt.data(), prompt.size());
        }
        // Prefill one sequence alone for TTFT, then the rest together.
        // Q3N_BENCH_PROFILE=prefill: the first batch's timed prefill instead of its decode steps.
        const bool profile_prefill = bi == 0 && q3n_bench::profiling_prefill();
        if (profile_prefill) cudaProfilerStart();
        const auto t0 = Clock::now();
        if (q3n_model_step(model, seqs.data(), 1, Q3N_STEP_SAMPLE) != Q3N_OK) return q3n_bench::die("prefill");
        const double ttft_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
        if (profile_prefill) cudaProfilerStop();
        used_peak = std::max(used_peak, gpu_used() - used_before);
        if (batch > 1 && q3n_model_step(model, seqs.data() + 1, batch - 1, Q3N_STEP_SAMPLE) != Q3N_OK) return q3n_bench::die("prefill");
        std::vector<double> step_ms;
        for (size_t i = 0; i < new_tokens; ++i) {
            // Q3N_BENCH_PROFILE: the first batch's last two decode steps, for ncu --profile-from-start off.
            if (bi == 0 && q3n_bench::profiling_decode() && i + 2 == new_tokens) cudaProfilerStart();
            const auto s0 = Clock::now();
            if (q3n_model_step(model, seqs.data(), batch, Q3N_STEP_SAMPLE) != Q3N_OK) return q3n_bench::die("decode");
            step_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - s0).count());
        }
        if (bi == 0 && q3n_bench::profiling_decode()) cudaProfilerStop();
        used_peak = std::max(used_peak, gpu_used() - used_before);
        std::sort(step_ms.begin(), step_ms.end());
        const double median = step_ms[step_ms.size() / 2];
        const double ctx = image_tokens + prompt_len + new_tokens / 2.0;
        // The copy's figure counts bytes read plus bytes written, the same DRAM traffic a pure read stream
        // of that many bytes makes: the floor is the step's bytes over it.
        const double floor_ms = (active.step(batch) + batch * ctx * kv_bytes_per_token) / bandwidth * 1e3;
        std::printf("batch %4zu   TTFT(%zu) %8.2f ms   decode %8.3f ms/step  %9.1f tok/s   floor %.3f ms  -> %5.1f%% of floor\n",
                    batch, prompt_len, ttft_ms, median, batch * 1e3 / median, floor_ms, 100.0 * floor_ms / median);
        const double prefill_tflops = prefill_flops / (ttft_ms / 1e3) / 1e12;
        if (prefill_flops > 0 && fp8_peak > 0)
            std::printf("             prefill %.1f TFLOP/s = %.1f%% of the FP8 peak (%.0f TFLOP/s, this run)\n", prefill_tflops,
                        100 * prefill_tflops / fp8_peak, fp8_peak);
        js << (bi ? "," : "") << "\n    {\"batch\": " << batch << ", \"ttft_ms\": " << ttft_ms << ", \"decode_ms_per_step\": " << median
           << ", \"decode_tokens_per_s\": " << batch * 1e3 / median << ", \"floor_ms_per_step\": " << floor_ms
           << ", \"fraction_of_floor\": " << floor_ms / median;
        if (active.sparse) js << ", \"active_bytes_per_step\": " << active.step(batch);
        if (prefill_flops > 0 && fp8_peak > 0)
            js << ", \"prefill_tflops\": " << prefill_tflops << ", \"fp8_peak_tflops\": " << fp8_peak
               << ", \"prefill_fraction_of_fp8_peak\": " << prefill_tflops / fp8_peak;
        js << "}";
        for (auto s : seqs) q3n_sequence_free(s);
    }
    js << "\n  ],\n  \"gpu_memory_after_load_gb\": " << used_after_load / 1e9 << ",\n  \"gpu_memory_peak_gb\": " << used_peak / 1e9
       << "\n}\n";
    std::printf("GPU memory   %.2f GB after the load, %.2f GB at the peak of the run\n", used_after_load / 1e9, used_peak / 1e9);
    fs::create_directories(out_dir);
    const std::string image_suffix = image_tokens ? "-image" + std::to_string(image_w) + "x" + std::to_string(image_h) : "";
    const fs::path out = fs::path(out_dir) / ("cuda-decode-" + fs::path(config).stem().string() + image_suffix + ".json");
    std::ofstream(out) << js.str();
    std::printf("wrote %s\n", out.c_str());
    q3n_model_free(model);
    return 0;
}
