// CPU decode benchmark on a full-size config with dummy weights.
//
//   bench_cpu_decode --config shared/configs/Qwen3-0.6B.json [--prompt 128] [--tokens 32] [--batch 1]
//                    [--threads 0] [--out bench/results]
//
// Decode at batch 1 streams every weight once per token, so the floor is weight bytes over the
// memory bandwidth this machine reaches in a plain read loop, measured in the same run. The figure
// reported is achieved tokens/s as a fraction of that floor.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <unistd.h>
#include <vector>

#include "bench_common.h"
#include "qwen3native.h"

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::string cpu_name() {
    std::ifstream in("/proc/cpuinfo");
    std::string line;
    while (std::getline(in, line))
        if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
    return "unknown CPU";
}

// Read bandwidth with all threads: each sums its slice of a buffer far larger than the caches.
double measure_read_bandwidth(unsigned threads) {
    const size_t bytes = size_t{1} << 30;
    std::vector<uint64_t> buf(bytes / 8);
    for (size_t i = 0; i < buf.size(); ++i) buf[i] = i * 0x9e3779b97f4a7c15ull;
    double best = 0;
    for (int rep = 0; rep < 5; ++rep) {
        std::vector<uint64_t> sums(threads);
        const auto t0 = Clock::now();
        std::vector<std::thread> pool;
        for (unsigned t = 0; t < threads; ++t)
            pool.emplace_back([&, t] {
                const size_t n = buf.size() / threads, b = t * n;
                uint64_t s = 0;
                for (size_t i = b; i < b + n; ++i) s += buf[i];
                sums[t] = s;
            });
        for (auto& th : pool) th.join();
        const double dt = seconds_since(t0);
        volatile uint64_t sink = 0;
        for (auto s : sums) sink = sink + s;
        best = std::max(best, static_cast<double>(bytes) / dt);
    }
    return best;
}


}  // namespace

int main(int argc, char** argv) {
    std::string config, out_dir = "bench/results";
    size_t prompt_len = 128, new_tokens = 32, batch = 1;
    unsigned threads = 0;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto next = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
        if (a == "--config") config = next();
        else if (a == "--prompt") prompt_len = std::stoul(next());
        else if (a == "--tokens") new_tokens = std::stoul(next());
        else if (a == "--batch") batch = std::stoul(next());
        else if (a == "--threads") threads = static_cast<unsigned>(std::stoul(next()));
        else if (a == "--out") out_dir = next();
        else {
            std::fprintf(stderr, "usage: %s --config CONFIG.json [--prompt N] [--tokens N] [--batch N] [--threads N] [--out DIR]\n", argv[0]);
            return 2;
        }
    }
    if (config.empty()) {
        std::fprintf(stderr, "--config is required (e.g. shared/configs/Qwen3-0.6B.json)\n");
        return 2;
    }
    if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());

    // The loader reads a directory: put the config alone in a temporary one.
    const fs::path dir = fs::temp_directory_path() / ("q3n-bench-" + std::to_string(::getpid()));
    fs::create_directories(dir);
    fs::copy_file(config, dir / "config.json", fs::copy_options::overwrite_existing);

    q3n_model_options o;
    q3n_model_options_init(&o, sizeof o);
    o.device = Q3N_DEVICE_CPU;
    o.load_format = Q3N_LOAD_DUMMY;
    o.dummy_seed = 1;
    o.num_threads = threads;
    o.context_length = static_cast<uint32_t>(prompt_len + new_tokens + 1);
    o.kv_cache_tokens = (prompt_len + new_tokens + 16) * batch;
    q3n_model* model = nullptr;
    const auto t_load = Clock::now();
    if (q3n_model_load(dir.c_str(), &o, &model) != Q3N_OK) return q3n_bench::die("load");
    const double load_s = seconds_since(t_load);
    fs::remove_all(dir);
    q3n_model_info info{};
    info.struct_size = sizeof(info);
    q3n_model_get_info(model, &info);

    std::mt19937 rng(7);
    std::vector<q3n_sequence*> seqs(batch);
    for (auto& s : seqs) {
        if (q3n_sequence_create(model, &s) != Q3N_OK) return q3n_bench::die("sequence");
        std::vector<int32_t> prompt(prompt_len);
        for (auto& t : prompt) t = static_cast<int32_t>(rng() % 151643);
        q3n_sequence_append(s, prompt.data(), prompt.size());
    }
    const auto t_prefill = Clock::now();
    if (q3n_model_step(model, seqs.data(), seqs.size(), Q3N_STEP_SAMPLE) != Q3N_OK) return q3n_bench::die("prefill");
    const double prefill_s = seconds_since(t_prefill);

    std::vector<double> step_s;
    for (size_t i = 0; i < new_tokens; ++i) {
        const auto t0 = Clock::now();
        if (q3n_model_step(model, seqs.data(), seqs.size(), Q3N_STEP_SAMPLE) != Q3N_OK) return q3n_bench::die("decode");
        step_s.push_back(seconds_since(t0));
    }
    std::vector<double> sorted = step_s;
    std::sort(sorted.begin(), sorted.end());
    const double median = sorted[sorted.size() / 2];
    const double tok_s = static_cast<double>(batch) / median;

    const double bandwidth = measure_read_bandwidth(threads);
    // Weights streamed per decode step (the tied embedding is read once as the lm_head; the
    // embedding lookup itself touches only a few rows).
    const double floor_s = static_cast<double>(info.weight_bytes) / bandwidth;
    const double fraction = floor_s / median;

    const std::string date = q3n_bench::utc_now();
    const std::string commit = q3n_bench::commit_id();
    std::printf("model        %s (%s weights, %.2f GB)\n", fs::path(config).filename().c_str(),
                info.weight_dtype == Q3N_DTYPE_FP8_E4M3 ? "fp8" : "bf16", info.weight_bytes / 1e9);
    std::printf("cpu          %s, %u threads\n", cpu_name().c_str(), threads);
    std::printf("load         %.2f s (dummy weights)\n", load_s);
    std::printf("prefill      %zu x %zu tokens in %.3f s (%.1f tok/s)\n", batch, prompt_len, prefill_s,
                batch * prompt_len / prefill_s);
    std::printf("decode       batch %zu: median %.1f ms/step, %.2f tok/s\n", batch, median * 1e3, tok_s);
    std::printf("bandwidth    %.2f GB/s (read, all threads)\n", bandwidth / 1e9);
    std::printf("floor        %.1f ms/step (weights / bandwidth); achieved %.0f%% of the floor\n", floor_s * 1e3,
                fraction * 100);

    fs::create_directories(out_dir);
    const std::string stem = fs::path(config).stem().string();
    const fs::path out = fs::path(out_dir) / ("cpu-decode-" + stem + "-b" + std::to_string(batch) + ".json");
    std::ofstream js(out);
    js << "{\n"
       << "  \"benchmark\": \"cpu_decode\",\n"
       << "  \"config\": \"" << stem << "\",\n"
       << "  \"device\": \"" << cpu_name() << "\",\n"
       << "  \"threads\": " << threads << ",\n"
       << "  \"date\": \"" << date << "\",\n"
       << "  \"commit\": \"" << commit << "\",\n"
       << "  \"weight_bytes\": " << info.weight_bytes << ",\n"
       << "  \"batch\": " << batch << ",\n"
       << "  \"prompt_tokens\": " << prompt_len << ",\n"
       << "  \"new_tokens\": " << new_tokens << ",\n"
       << "  \"prefill_tokens_per_s\": " << batch * prompt_len / prefill_s << ",\n"
       << "  \"decode_ms_per_step_median\": " << median * 1e3 << ",\n"
       << "  \"decode_tokens_per_s\": " << tok_s << ",\n"
       << "  \"read_bandwidth_gb_s\": " << bandwidth / 1e9 << ",\n"
       << "  \"floor_ms_per_step\": " << floor_s * 1e3 << ",\n"
       << "  \"fraction_of_floor\": " << fraction << "\n"
       << "}\n";
    std::printf("wrote %s\n", out.c_str());
    for (auto s : seqs) q3n_sequence_free(s);
    q3n_model_free(model);
    return 0;
}
