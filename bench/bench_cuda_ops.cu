// The GPU kernels one at a time, at a dense config's shapes, each against its own floor:
//   - the linear paths (warp-per-row GEMV, cuBLASLt block-scaled FP8) at M = 1, 16, 64, 512, 4096
//     for every projection of a layer, as a fraction of the weight-streaming floor (bytes over the
//     same-run copy bandwidth) and of the FP8 tensor-core peak measured in the same run;
//   - with --gemv-stages, the FP8 GEMV's persistent launches at M = 1 and 8 with each weight-ring
//     depth listed (0: the next weights in registers), to choose Q3N_GEMV_STAGES' default;
//   - every op of a decode step at batch 1 and 32, so a step's time can be split into its parts;
//   - attention at prefill lengths, where it is quadratic.
//
//   bench_cuda_ops --config CONFIG.json [--context 640] [--gemv-stages 0,2,4] [--linear-only]
//                  [--out bench/results]
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench_common.h"
#include "cuda/device_weights.h"
#include "cuda/linear_fp8_mma.h"
#include "cuda/ops.h"
#include "cuda/sample.h"
#include "cuda_bench_util.h"
#include "cuda_peak.h"

namespace fs = std::filesystem;
using q3n::cuda::DeviceBuffer;
using q3n::cuda::DeviceLinear;

namespace {

struct Shapes {
    int hidden, inter, heads, kv_heads, head_dim, vocab, layers;
    bool fp8;
};

Shapes read_config(const std::string& path) {
    const nlohmann::json j = nlohmann::json::parse(std::ifstream(path));
    Shapes s{};
    s.hidden = j.at("hidden_size");
    s.inter = j.at("intermediate_size");
    s.heads = j.at("num_attention_heads");
    s.kv_heads = j.at("num_key_value_heads");
    s.head_dim = j.value("head_dim", s.hidden / s.heads);
    s.vocab = j.at("vocab_size");
    s.layers = j.at("num_hidden_layers");
    s.fp8 = j.contains("quantization_config");
    return s;
}

void fill_random(DeviceBuffer& b, uint32_t seed, bool e4m3) {
    std::vector<uint8_t> host(b.bytes());
    std::mt19937 rng(seed);
    for (auto& v : host) {
        v = static_cast<uint8_t>(rng());
        if (e4m3 && (v & 0x7f) == 0x7f) v = 0x7e;  // no NaN codes
    }
    cudaMemcpy(b.get(), host.data(), host.size(), cudaMemcpyHostToDevice);
}

void fill_floats(DeviceBuffer& b, uint32_t seed, float lo, float hi) {
    std::vector<float> host(b.bytes() / 4);
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> d(lo, hi);
    for (auto& v : host) v = d(rng);
    cudaMemcpy(b.get(), host.data(), host.size() * 4, cudaMemcpyHostToDevice);
}

// Enough copies of a weight that cycling through them never hits L2 (50 MB on an H100).
struct WeightSet {
    std::vector<DeviceBuffer> data;
    DeviceBuffer scales, gemm_scales;
    std::vector<DeviceLinear> views;

    WeightSet(int out, int in, q3n::WeightType type, cudaStream_t stream) {
        const size_t elem = type == q3n::WeightType::FP8_E4M3 ? 1 : 2;
        const size_t bytes = size_t(out) * in * elem;
        const int copies = static_cast<int>(std::max<size_t>(2, std::min<size_t>(16, (size_t(160) << 20) / bytes + 1)));
        const int sr = (out + 127) / 128, sc = (in + 127) / 128;
        std::vector<float> s(size_t(sr) * sc);
        std::mt19937 rng(out * 31 + in);
        for (auto& v : s) v = 0.0005f + 0.001f * (rng() % 1000) / 1000.0f;
        if (type == q3n::WeightType::FP8_E4M3) {
            scales.resize(s.size() * 4);
            cudaMemcpy(scales.get(), s.data(), s.size() * 4, cudaMemcpyHostToDevice);
            const std::vector<float> g = q3n::cuda::gemm_fp8_weight_scales(s, out, in, stream);
            if (!g.empty()) {
                gemm_scales.resize(g.size() * 4);
                cudaMemcpy(gemm_scales.get(), g.data(), g.size() * 4, cudaMemcpyHostToDevice);
            }
        }
        for (int c = 0; c < copies; ++c) {
            data.emplace_back(bytes);
            if (c == 0)
                fill_random(data.back(), out + in, type == q3n::WeightType::FP8_E4M3);
            else
                cudaMemcpy(data.back().get(), data[0].get(), bytes, cudaMemcpyDeviceToDevice);
            DeviceLinear d;
            d.type = type;
            d.data = data.back().get();
            d.out = out;
            d.in = in;
            if (type == q3n::WeightType::FP8_E4M3) {
                d.scales = scales.as<float>();
                d.scale_cols = sc;
                d.gemm_scales = gemm_scales.bytes() ? gemm_scales.as<float>() : nullptr;
            }
            views.push_back(d);
        }
    }
    const DeviceLinear& at(int i) const { return views[i % views.size()]; }
};

}  // namespace

int main(int argc, char** argv) {
    std::string config, out_dir = "bench/results";
    int context = 640;
    bool linear_only = false;
    std::vector<int> gemv_stages;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto next = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
        if (a == "--config") config = next();
        else if (a == "--context") context = std::stoi(next());
        else if (a == "--out") out_dir = next();
        else if (a == "--linear-only") linear_only = true;
        else if (a == "--gemv-stages") {
            std::stringstream list(next());
            for (std::string v; std::getline(list, v, ',');) gemv_stages.push_back(std::stoi(v));
        } else {
            std::fprintf(stderr, "usage: %s --config CONFIG.json [--context N] [--gemv-stages LIST] [--linear-only] [--out DIR]\n",
                         argv[0]);
            return 2;
        }
    }
    if (config.empty()) return q3n_bench::die("--config is required");
    const Shapes s = read_config(config);
    cudaStream_t stream;
    cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    cudaDeviceProp prop;
    cudaGetDeviceProperties(&prop, 0);

    const double bw = q3n_bench::measure_d2d_bandwidth();
    const double fp8_peak = q3n_bench::measure_peak_tflops(true, stream), bf16_peak = q3n_bench::measure_peak_tflops(false, stream);
    const bool lt = q3n::cuda::gemm_fp8_available(stream);
    std::printf("device %s: copy bandwidth %.0f GB/s, FP8 peak %.0f TFLOP/s, BF16 peak %.0f TFLOP/s\n", prop.name, bw / 1e9,
                fp8_peak, bf16_peak);
    std::printf("cuBLASLt block-scaled FP8: %s\n%s", lt ? "usable" : "NOT usable",
                q3n::cuda::gemm_fp8_probe_report(stream).c_str());

    std::ostringstream js;
    js << "{\n  \"benchmark\": \"cuda_ops\",\n  \"config\": \"" << fs::path(config).stem().string() << "\",\n"
       << "  \"device\": \"" << prop.name << "\",\n  \"date\": \"" << q3n_bench::utc_now() << "\",\n"
       << "  \"commit\": \"" << q3n_bench::commit_id() << "\",\n  \"d2d_bandwidth_gb_s\": " << bw / 1e9
       << ",\n  \"fp8_peak_tflops\": " << fp8_peak << ",\n  \"bf16_peak_tflops\": " << bf16_peak
       << ",\n  \"cublaslt_block_fp8\": " << (lt ? "true" : "false") << ",\n  \"linear\": [";

    const int H = s.hidden, I = s.inter, d = s.head_dim, nH = s.heads, nKV = s.kv_heads;
    const int maxM = 4096, kmax = std::max({H, I, nH * d});
    DeviceBuffer x(size_t(maxM) * kmax * 4), qf(size_t(maxM) * kmax * 4), qs(size_t(maxM) * ((kmax + 127) / 128) * 4),
        y(size_t(maxM) * std::max(2 * I, s.vocab) * 4);
    fill_floats(x, 3, -2.0f, 2.0f);
    q3n::cuda::quantize_fp8(x.as<float>(), maxM, kmax, qf.as<float>(), qs.as<float>(), stream);
    q3n::cuda::GemmScratch scratch;
    scratch.q8.resize(size_t(maxM) * kmax);
    scratch.scales.resize(size_t(maxM) * ((kmax + 127) / 128) * 4);
    scratch.transposed.resize(size_t(maxM) * 2 * I * 4);

    struct Proj {
        const char* name;
        int out, in;
    };
    const Proj projs[] = {{"qkv", (nH + 2 * nKV) * d, H}, {"o", H, nH * d}, {"gate_up", 2 * I, H}, {"down", H, I}};
    bool first = true;
    for (const Proj& p : projs) {
        WeightSet w8(p.out, p.in, q3n::WeightType::FP8_E4M3, stream), w16(p.out, p.in, q3n::WeightType::BF16, stream);
        for (int M : {1, 16, 64, 512, 4096}) {
            const double flops = 2.0 * M * p.out * double(p.in);
            auto report = [&](const char* path, const char* dtype, double ms, double wbytes) {
                if (ms <= 0) return;
                const double floor_ms = wbytes / bw * 1e3;
                const double tf = flops / (ms / 1e3) / 1e12;
                std::printf("%-8s %-5s M=%-5d %-8s %9.4f ms  %5.1f%% of stream floor  %6.1f TFLOP/s (%5.1f%% of peak)\n",
                            p.name, dtype, M, path, ms, 100 * floor_ms / ms, tf,
                            100 * tf / (dtype[0] == 'f' ? fp8_peak : bf16_peak));
                js << (first ? "" : ",") << "\n    {\"proj\": \"" << p.name << "\", \"n\": " << p.out << ", \"k\": " << p.in
                   << ", \"m\": " << M << ", \"dtype\": \"" << dtype << "\", \"path\": \"" << path << "\", \"ms\": " << ms
                   << ", \"fraction_of_stream_floor\": " << floor_ms / ms << ", \"tflops\": " << tf << "}";
                first = false;
            };
            const int reps = M >= 512 ? 5 : 40;
            const double fp8_bytes = double(p.out) * p.in, bf16_bytes = 2.0 * p.out * p.in;
            if (M <= 64) {
                report("gemv", "fp8", q3n_bench::time_on_stream(stream, reps, [&](int i) {
                           q3n::cuda::linear(x.as<float>(), qf.as<float>(), qs.as<float>(), M, w8.at(i), y.as<float>(), p.out, stream);
                       }), fp8_bytes);
                report("gemv", "bf16", q3n_bench::time_on_stream(stream, reps, [&](int i) {
                           q3n::cuda::linear(x.as<float>(), qf.as<float>(), qs.as<float>(), M, w16.at(i), y.as<float>(), p.out, stream);
                       }), bf16_bytes);
            }
            for (int stages : gemv_stages) {
                for (int rows : {1, 8}) {
                    if (M != (rows == 1 ? 1 : 16)) continue;  // once per projection and row count
                    int ran = 0;
                    const double ms = q3n_bench::time_on_stream(stream, reps, [&](int i) {
                        ran = q3n::cuda::linear_fp8_mma_launch(qf.as<float>(), qs.as<float>(), rows, w8.at(i), y.as<float>(), p.out,
                                                               0, stages, true, stream);
                    });
                    const std::string path = "gemv-stages" + std::to_string(stages) + "-ran" + std::to_string(ran);
                    const double floor_ms = fp8_bytes / bw * 1e3;
                    std::printf("%-8s fp8   M=%-5d %-18s %9.4f ms  %5.1f%% of stream floor\n", p.name, rows, path.c_str(), ms,
                                100 * floor_ms / ms);
                    js << ",\n    {\"proj\": \"" << p.name << "\", \"n\": " << p.out << ", \"k\": " << p.in << ", \"m\": " << rows
                       << ", \"dtype\": \"fp8\", \"path\": \"" << path << "\", \"ms\": " << ms
                       << ", \"fraction_of_stream_floor\": " << floor_ms / ms << "}";
                }
            }
            if (M >= 16 && lt)
                report("cublaslt", "fp8", q3n_bench::time_on_stream(stream, reps, [&](int i) {
                           q3n::cuda::gemm_fp8(qf.as<float>(), qs.as<float>(), M, w8.at(i), y.as<float>(), p.out, scratch, stream);
                       }), fp8_bytes);
        }
    }
    js << "\n  ],\n  \"decode_ops\": [";
    if (linear_only) {
        js << "]\n}\n";
        std::printf("(--linear-only: no decode ops, no prefill attention)\n");
        if (const cudaError_t e = cudaDeviceSynchronize(); e != cudaSuccess) {
            std::fprintf(stderr, "CUDA error: %s\n", cudaGetErrorString(e));
            return 1;
        }
        fs::create_directories(out_dir);
        const fs::path out = fs::path(out_dir) / ("cuda-ops-linear-" + fs::path(config).stem().string() + ".json");
        std::ofstream(out) << js.str();
        std::printf("wrote %s\n", out.c_str());
        return 0;
    }

    // ---- the ops of a decode step ----
    WeightSet head(s.vocab, H, q3n::WeightType::BF16, stream);
    DeviceBuffer norm_w(size_t(kmax) * 4), qn(d * 4), kn(d * 4), inv_freq(d / 2 * 4), tokens(maxM * 4);
    fill_floats(norm_w, 5, 0.5f, 1.5f);
    fill_floats(qn, 6, 0.5f, 1.5f);
    fill_floats(kn, 7, 0.5f, 1.5f);
    {
        std::vector<float> f(d / 2);
        for (int i = 0; i < d / 2; ++i) f[i] = std::pow(1e6f, -2.0f * i / d);
        cudaMemcpy(inv_freq.get(), f.data(), f.size() * 4, cudaMemcpyHostToDevice);
        std::vector<int32_t> t(maxM);
        for (int i = 0; i < maxM; ++i) t[i] = (i * 7919) % s.vocab;
        cudaMemcpy(tokens.get(), t.data(), t.size() * 4, cudaMemcpyHostToDevice);
    }
    const int row = (nH + 2 * nKV) * d;
    DeviceBuffer qkv(size_t(maxM) * row * 4), attn(size_t(maxM) * nH * d * 4), gu(size_t(maxM) * 2 * I * 4),
        act(size_t(maxM) * I * 4), hbuf(size_t(maxM) * H * 4);
    fill_floats(qkv, 8, -1.0f, 1.0f);
    fill_floats(gu, 9, -3.0f, 3.0f);

    first = true;
    auto op_line = [&](int batch, const char* name, double ms, double per_step) {
        std::printf("  batch %-3d %-22s %9.4f ms  x%-3.0f = %8.4f ms/step\n", batch, name, ms, per_step, ms * per_step);
        js << (first ? "" : ",") << "\n    {\"batch\": " << batch << ", \"op\": \"" << name << "\", \"ms\": " << ms
           << ", \"per_step\": " << per_step << "}";
        first = false;
    };
    const int bs = 16;
    for (int batch : {1, 32}) {
        // Each sequence at `context` tokens; a copy of the cache per layer so attention reads DRAM.
        const int blocks_per_seq = (context + bs - 1) / bs;
        const size_t layer_bytes = size_t(batch) * blocks_per_seq * bs * nKV * d * 2;
        const int kv_copies = static_cast<int>(std::min<size_t>(s.layers, std::max<size_t>(2, (size_t(160) << 20) / layer_bytes + 1)));
        std::vector<DeviceBuffer> kc, vc;
        for (int c = 0; c < kv_copies; ++c) {
            kc.emplace_back(layer_bytes);
            vc.emplace_back(layer_bytes);
            fill_random(kc.back(), 11 + c, false);
            fill_random(vc.back(), 31 + c, false);
        }
        std::vector<int32_t> table(size_t(batch) * blocks_per_seq), pos(batch), seq(batch);
        for (size_t i = 0; i < table.size(); ++i) table[i] = static_cast<int32_t>(i);
        for (int b = 0; b < batch; ++b) {
            pos[b] = context - 1;
            seq[b] = b;
        }
        DeviceBuffer table_d(table.size() * 4), pos_d(batch * 4), seq_d(batch * 4);
        cudaMemcpy(table_d.get(), table.data(), table.size() * 4, cudaMemcpyHostToDevice);
        cudaMemcpy(pos_d.get(), pos.data(), batch * 4, cudaMemcpyHostToDevice);
        cudaMemcpy(seq_d.get(), seq.data(), batch * 4, cudaMemcpyHostToDevice);
        const q3n::cuda::DeviceBatch db{batch, pos_d.as<int32_t>(), seq_d.as<int32_t>(), table_d.as<int32_t>(), blocks_per_seq};
        auto kv_at = [&](int i) {
            return q3n::cuda::DeviceKvLayer{q3n::KvDtype::BF16, kc[i % kv_copies].get(), vc[i % kv_copies].get(), bs, nKV, d};
        };
        const float scale = 1.0f / std::sqrt(float(d));
        const int L = s.layers;
        double total = 0;
        auto op = [&](const char* name, double per_step, const std::function<void(int)>& f) {
            const double ms = q3n_bench::time_on_stream(stream, 40, f);
            op_line(batch, name, ms, per_step);
            total += ms * per_step;
        };
        op("embed", 1, [&](int) {
            q3n::cuda::embed(head.at(0), tokens.as<int32_t>(), batch, x.as<float>(), stream);
        });
        op("rmsnorm_quantize", 2 * L + 1, [&](int) {
            q3n::cuda::rmsnorm_quantize(x.as<float>(), hbuf.as<float>(), norm_w.as<float>(), batch, H, 1e-6f,
                                        s.fp8 ? nullptr : act.as<float>(), s.fp8 ? qf.as<float>() : nullptr,
                                        s.fp8 ? qs.as<float>() : nullptr, stream);
        });
        WeightSet wq(row, H, s.fp8 ? q3n::WeightType::FP8_E4M3 : q3n::WeightType::BF16, stream);
        WeightSet wo(H, nH * d, s.fp8 ? q3n::WeightType::FP8_E4M3 : q3n::WeightType::BF16, stream);
        WeightSet wgu(2 * I, H, s.fp8 ? q3n::WeightType::FP8_E4M3 : q3n::WeightType::BF16, stream);
        WeightSet wd(H, I, s.fp8 ? q3n::WeightType::FP8_E4M3 : q3n::WeightType::BF16, stream);
        auto lin = [&](const DeviceLinear& w, float* out, int ldy) {
            q3n::cuda::linear(act.as<float>(), qf.as<float>(), qs.as<float>(), batch, w, out, ldy, stream);
        };
        op("linear qkv", L, [&](int i) { lin(wq.at(i), qkv.as<float>(), row); });
        op("qk_norm_rope_kv_write", L, [&](int i) {
            q3n::cuda::qk_norm_rope_kv_write(qkv.as<float>(), nH, kv_at(i), qn.as<float>(), kn.as<float>(), 1e-6f,
                                             inv_freq.as<float>(), d, 1.0f, db, stream);
        });
        DeviceBuffer attn_ws(q3n::cuda::attention_workspace_bytes(batch, nH, nKV, d));
        op("attention", L, [&](int i) {
            q3n::cuda::attention(kv_at(i), qkv.as<float>(), row, nH, scale, db, attn.as<float>(), stream, attn_ws.get(),
                                 attn_ws.bytes());
        });
        if (s.fp8)
            op("quantize_fp8", L, [&](int) {
                q3n::cuda::quantize_fp8(attn.as<float>(), batch, nH * d, qf.as<float>(), qs.as<float>(), stream);
            });
        op("linear o", L, [&](int i) { lin(wo.at(i), hbuf.as<float>(), H); });
        op("linear gate_up", L, [&](int i) { lin(wgu.at(i), gu.as<float>(), 2 * I); });
        op("silu_mul_quantize", L, [&](int) {
            q3n::cuda::silu_mul_quantize(gu.as<float>(), batch, I, s.fp8 ? nullptr : act.as<float>(),
                                         s.fp8 ? qf.as<float>() : nullptr, s.fp8 ? qs.as<float>() : nullptr, stream);
        });
        op("linear down", L, [&](int i) { lin(wd.at(i), hbuf.as<float>(), H); });
        // The engine's rule (project, as DeviceOutput::compute uses it): GEMV, tensor cores past kGemvMaxRows.
        q3n::cuda::GemmScratch head_scratch;
        if (batch > q3n::cuda::kGemvMaxRows) head_scratch.hilo.resize(q3n::cuda::linear_bf16_tc_scratch_bytes(batch, H));
        op("lm_head (bf16)", 1, [&](int i) {
            q3n::cuda::project(act.as<float>(), nullptr, nullptr, batch, head.at(i), y.as<float>(), s.vocab, head_scratch, stream);
        });
        {
            DeviceBuffer work(q3n::cuda::sample_work_bytes(batch, s.vocab)), params(batch * sizeof(q3n::cuda::DeviceSampleParams)),
                results(batch * sizeof(q3n::cuda::DeviceSampleResult)), ids(4), counts(4);
            fill_floats(y, 12, -10.0f, 10.0f);
            std::vector<q3n::cuda::DeviceSampleParams> hp(batch);
            for (auto& p : hp) p = {0.0f, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, 0, 0, 0, 0, 0, -1, 1, 0};
            cudaMemcpy(params.get(), hp.data(), params.bytes(), cudaMemcpyHostToDevice);
            op("sample (greedy)", 1, [&](int) {
                q3n::cuda::sample_rows(y.as<float>(), work.as<float>(), batch, s.vocab,
                                       params.as<q3n::cuda::DeviceSampleParams>(), ids.as<int32_t>(), counts.as<int32_t>(),
                                       results.as<q3n::cuda::DeviceSampleResult>(), stream);
            });
            for (auto& p : hp) p = {0.7f, 0.8f, 0.0f, 1.05f, 0.0f, 0.0f, 20, 0, 1, 0, 0, -1, 1, 0};
            cudaMemcpy(params.get(), hp.data(), params.bytes(), cudaMemcpyHostToDevice);
            op("sample (t0.7 k20 p0.8)", 0, [&](int) {
                q3n::cuda::sample_rows(y.as<float>(), work.as<float>(), batch, s.vocab,
                                       params.as<q3n::cuda::DeviceSampleParams>(), ids.as<int32_t>(), counts.as<int32_t>(),
                                       results.as<q3n::cuda::DeviceSampleResult>(), stream);
            });
            // No top-k: 1024 candidates, the whole-vocabulary tail sum, and 20 log-probabilities.
            for (auto& p : hp) p = {1.0f, 0.9f, 0.05f, 1.0f, 0.0f, 0.0f, 0, 20, 1, 0, 0, -1, 1, 0};
            cudaMemcpy(params.get(), hp.data(), params.bytes(), cudaMemcpyHostToDevice);
            op("sample (p0.9 minp0.05 lp20)", 0, [&](int) {
                q3n::cuda::sample_rows(y.as<float>(), work.as<float>(), batch, s.vocab,
                                       params.as<q3n::cuda::DeviceSampleParams>(), ids.as<int32_t>(), counts.as<int32_t>(),
                                       results.as<q3n::cuda::DeviceSampleResult>(), stream);
            });
        }
        std::printf("  batch %-3d sum of the ops: %.3f ms per step (launch gaps inside a graph excluded)\n", batch, total);
        js << (first ? "" : ",") << "\n    {\"batch\": " << batch << ", \"op\": \"sum\", \"ms\": " << total << ", \"per_step\": 1}";
    }
    js << "\n  ],\n  \"prefill_attention\": [";

    // ---- attention over a whole prompt (one sequence): the CUDA-core kernel (up to 4096 tokens,
    // beyond that it takes seconds) and attention_prefill on tensor cores ----
    first = true;
    for (int P : {512, 1024, 4096, 16384}) {
        const int blocks = (P + bs - 1) / bs;
        DeviceBuffer kc(size_t(blocks) * bs * nKV * d * 2), vc(kc.bytes()), q(size_t(P) * row * 4), o(size_t(P) * nH * d * 4);
        fill_random(kc, 41, false);
        fill_random(vc, 42, false);
        fill_floats(q, 43, -1.0f, 1.0f);
        std::vector<int32_t> table(blocks), pos(P), seq(P, 0);
        for (int i = 0; i < blocks; ++i) table[i] = i;
        for (int i = 0; i < P; ++i) pos[i] = i;
        DeviceBuffer table_d(blocks * 4), pos_d(P * 4), seq_d(P * 4);
        cudaMemcpy(table_d.get(), table.data(), blocks * 4, cudaMemcpyHostToDevice);
        cudaMemcpy(pos_d.get(), pos.data(), P * 4, cudaMemcpyHostToDevice);
        cudaMemcpy(seq_d.get(), seq.data(), P * 4, cudaMemcpyHostToDevice);
        const q3n::cuda::DeviceBatch db{P, pos_d.as<int32_t>(), seq_d.as<int32_t>(), table_d.as<int32_t>(), blocks};
        const q3n::cuda::DeviceKvLayer kv{q3n::KvDtype::BF16, kc.get(), vc.get(), bs, nKV, d};
        // Causal: about half of the P x P score matrix, QK^T and PV.
        const double flops = 4.0 * nH * d * double(P) * P / 2;
        const double ms = P > 4096 ? -1 : q3n_bench::time_on_stream(stream, 3, [&](int) {
            q3n::cuda::attention(kv, q.as<float>(), row, nH, 1.0f / std::sqrt(float(d)), db, o.as<float>(), stream);
        });
        if (ms > 0)
            std::printf("prefill attention P=%-5d %9.3f ms per layer  %6.1f TFLOP/s (%4.1f%% of the BF16 peak)\n", P, ms,
                        flops / (ms / 1e3) / 1e12, 100 * flops / (ms / 1e3) / 1e12 / bf16_peak);
        const bool tc = q3n::cuda::attention_prefill_applicable(kv, P);
        const double tc_ms = !tc ? -1 : q3n_bench::time_on_stream(stream, 5, [&](int) {
            q3n::cuda::attention_prefill(kv, q.as<float>(), row, nH, 1.0f / std::sqrt(float(d)), db, o.as<float>(), stream);
        });
        if (tc_ms > 0)
            std::printf("prefill attention P=%-5d %9.3f ms per layer  %6.1f TFLOP/s (%4.1f%% of the BF16 peak)  tensor cores\n",
                        P, tc_ms, flops / (tc_ms / 1e3) / 1e12, 100 * flops / (tc_ms / 1e3) / 1e12 / bf16_peak);
        else
            std::printf("prefill attention P=%-5d tensor-core path not applicable (head_dim %d)\n", P, d);
        js << (first ? "" : ",") << "\n    {\"tokens\": " << P;
        if (ms > 0) js << ", \"ms_per_layer\": " << ms << ", \"tflops\": " << flops / (ms / 1e3) / 1e12;
        if (tc_ms > 0)
            js << ", \"tensor_core_ms_per_layer\": " << tc_ms << ", \"tensor_core_tflops\": " << flops / (tc_ms / 1e3) / 1e12
               << ", \"tensor_core_fraction_of_bf16_peak\": " << flops / (tc_ms / 1e3) / 1e12 / bf16_peak;
        js << "}";
        first = false;
    }
    js << "\n  ]\n}\n";
    if (const cudaError_t e = cudaDeviceSynchronize(); e != cudaSuccess) {
        std::fprintf(stderr, "CUDA error: %s\n", cudaGetErrorString(e));
        return 1;
    }
    fs::create_directories(out_dir);
    const fs::path out = fs::path(out_dir) / ("cuda-ops-" + fs::path(config).stem().string() + ".json");
    std::ofstream(out) << js.str();
    std::printf("wrote %s\n", out.c_str());
    return 0;
}
