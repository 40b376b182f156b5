// The Qwen3-Next and Qwen3-MoE kernels one at a time, at a config's shapes, each against its own floor:
//   - gated_delta_rule_decode at 1, 8, 32 sequences: the fp32 state read and written once per
//     sequence, plus q/k/v/g/beta in and the output out, over the same-run copy bandwidth;
//   - the whole decode step between in_proj and out_proj at 1, 2, 8, 32 sequences: the three launches
//     (gdn_split_conv, gated_delta_rule_decode, rmsnorm_gated_quantize) against gdn_decode_fused, over
//     the bytes of both states, the conv weights, the in_proj rows and the outputs;
//   - gated_delta_rule_chunked at 1K and 8K prompt tokens (one sequence): ms, tokens/s, and the
//     chunked algorithm's FLOPs over the nominal fp32 CUDA-core peak (the kernel is fp32 on CUDA
//     cores) and over the measured BF16 tensor-core peak (what a tensor-core kernel could reach);
//   - causal_conv1d_silu with its state, decode at 1, 8, 32 sequences and prefill at 1K and 8K tokens:
//     bytes over the copy bandwidth;
//   - the MoE block at decode 1, 8, 32 tokens and prefill 1K: moe_route + moe_experts, and beside it
//     moe_forward_fused where it applies (1-8 tokens, routing included), random weights
//     of the config's dtype and random N(0, 1) router logits; floor = the bytes of the distinct
//     experts the generated routing selects (counted on the host) plus the shared expert.
// Sections a config has no layers for are skipped (Qwen3-MoE has no GDN, no shared expert).
//
//   bench_cuda_next_ops --config CONFIG.json [--out bench/results]
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench_common.h"
#include "cuda/next_ops.h"
#include "cuda/ops.h"
#include "cuda_bench_util.h"
#include "cuda_peak.h"
#include "model/config.h"

namespace fs = std::filesystem;
using q3n::cuda::DeviceBuffer;
using q3n::cuda::DeviceLinear;
using Json = nlohmann::ordered_json;

namespace {

// Working sets rotated through per call add up to this, well past the 50-60 MB of L2, so a kernel
// that reads its state or weights once per call reads them from DRAM as it does inside a full step
// (where every other layer's weights pass through L2 in between).
constexpr size_t kFlushBytes = size_t{160} << 20;

int copies_for(size_t bytes_per_call, int cap) {
    return static_cast<int>(std::clamp<size_t>(kFlushBytes / std::max<size_t>(bytes_per_call, 1) + 1, 2, cap));
}

__global__ void fill_uniform_kernel(float* p, size_t n, uint32_t seed, float lo, float hi) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
        uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ (seed * 0x9e3779b9u + static_cast<uint32_t>(i >> 32));
        h ^= h >> 16;
        h *= 0x85ebca6bu;
        h ^= h >> 13;
        h *= 0xc2b2ae35u;
        h ^= h >> 16;
        p[i] = lo + (hi - lo) * (h >> 8) * (1.0f / 16777216.0f);
    }
}

// Filled on the device: gigabytes of expert weights through a host RNG would take most of the run.
void fill_uniform(float* p, size_t n, uint32_t seed, float lo, float hi) {
    fill_uniform_kernel<<<2048, 256>>>(p, n, seed, lo, hi);
}

void fill_weights(void* p, size_t bytes, uint32_t seed, bool fp8) {
    q3n_bench::fill_peak_operand<<<4096, 256>>>(static_cast<uint8_t*>(p), bytes, seed, fp8);
}

size_t align256(size_t b) { return (b + 255) & ~size_t{255}; }

// The kernels here are fp32 CUDA-core code: SMs x FP32 lanes x 2 (FMA) x the boost clock.
double nominal_fp32_tflops(const cudaDeviceProp& prop) {
    int khz = 0;
    cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0);
    const int lanes = prop.major >= 9 || (prop.major == 8 && prop.minor != 0) ? 128 : 64;
    return double(prop.multiProcessorCount) * lanes * 2.0 * khz * 1e3 / 1e12;
}

// time_on_stream after one eager call (which surfaces launch errors outside a capture and does the
// launchers' one-time setup); an eager loop if the capture fails, marked so in the output.
double timed(cudaStream_t stream, int reps, const std::function<void(int)>& f, bool* eager = nullptr) {
    cudaDeviceSynchronize();  // the fills ran on the legacy stream, which a non-blocking stream does not wait for
    f(0);
    if (const cudaError_t e = cudaStreamSynchronize(stream); e != cudaSuccess) {
        std::fprintf(stderr, "CUDA error: %s\n", cudaGetErrorString(e));
        std::exit(1);
    }
    double ms = -1;
    try {
        ms = q3n_bench::time_on_stream(stream, reps, f);
    } catch (const std::exception&) {
        cudaGraph_t g = nullptr;
        cudaStreamEndCapture(stream, &g);
        if (g) cudaGraphDestroy(g);
    }
    if (eager) *eager = ms < 0;
    if (ms >= 0) return ms;
    cudaGetLastError();
    return q3n_bench::median_round_ms(stream, 1, 0, reps, [&] {
        for (int i = 0; i < reps; ++i) f(i);
    });
}

// A device array of `host`'s values.
template <typename T>
DeviceBuffer upload(const std::vector<T>& host) {
    DeviceBuffer b(std::max<size_t>(host.size() * sizeof(T), 4));
    cudaMemcpy(b.get(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
    return b;
}

DeviceBuffer seq_starts_of(int num_seqs, int tokens_each) {
    std::vector<int32_t> s(num_seqs + 1);
    for (int i = 0; i <= num_seqs; ++i) s[i] = i * tokens_each;
    return upload(s);
}

void line(const char* section, const std::string& what, double ms, double floor_ms, const char* floor_kind, int per_step) {
    std::printf("%-14s %-14s %10.4f ms  floor %9.4f ms (%s) %6.1f%%", section, what.c_str(), ms, floor_ms, floor_kind,
                100 * floor_ms / ms);
    if (per_step > 0) std::printf("  x%-3d = %8.3f ms/step", per_step, ms * per_step);
    std::printf("\n");
}

}  // namespace

int main(int argc, char** argv) try {
    std::string config, out_dir = "bench/results";
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto next = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
        if (a == "--config") config = next();
        else if (a == "--out") out_dir = next();
        else {
            std::fprintf(stderr, "usage: %s --config CONFIG.json [--out DIR]\n", argv[0]);
            return 2;
        }
    }
    if (config.empty()) return q3n_bench::die("--config is required");
    const q3n::ModelConfig c = q3n::ModelConfig::from_json(nlohmann::json::parse(std::ifstream(config)), config);
    const bool gdn = c.is_qwen3_next(), moe = c.num_experts > 0;
    if (!gdn && !moe) {
        std::fprintf(stderr, "%s has neither Gated DeltaNet nor MoE layers: use bench_cuda_ops\n", config.c_str());
        return 2;
    }
    int gdn_layers = 0, moe_layers = 0;
    for (size_t l = 0; l < c.num_layers; ++l) {
        if (gdn && c.next_layer_kinds[l] == q3n::NextLayerKind::LinearAttention) ++gdn_layers;
        if (moe && c.is_moe_layer(l)) ++moe_layers;
    }

    cudaStream_t stream;
    cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    cudaDeviceProp prop;
    cudaGetDeviceProperties(&prop, 0);
    const double bw = q3n_bench::measure_d2d_bandwidth();
    const double fp8_peak = q3n_bench::measure_peak_tflops(true, stream), bf16_peak = q3n_bench::measure_peak_tflops(false, stream);
    const double fp32_peak = nominal_fp32_tflops(prop);
    std::printf("device %s: copy bandwidth %.0f GB/s, FP8 peak %.0f TFLOP/s, BF16 peak %.0f TFLOP/s (measured), "
                "fp32 CUDA-core peak %.0f TFLOP/s (nominal)\n",
                prop.name, bw / 1e9, fp8_peak, bf16_peak, fp32_peak);
    auto floor_ms = [&](double bytes) { return bytes / bw * 1e3; };

    Json js;
    js["benchmark"] = "cuda_next_ops";
    js["config"] = fs::path(config).stem().string();
    js["device"] = prop.name;
    js["date"] = q3n_bench::utc_now();
    js["commit"] = q3n_bench::commit_id();
    js["d2d_bandwidth_gb_s"] = bw / 1e9;
    js["fp8_peak_tflops"] = fp8_peak;
    js["bf16_peak_tflops"] = bf16_peak;
    js["fp32_nominal_tflops"] = fp32_peak;
    js["floor_note"] = "bytes floors are bytes over the same-run device-to-device copy bandwidth; decode states and "
                       "weights rotate through copies totalling > 160 MB so they come from DRAM";
    bool any_eager = false;

    if (gdn) {
        const int nk = c.linear_num_key_heads, nv = c.linear_num_value_heads, dk = c.linear_key_head_dim,
                  dv = c.linear_value_head_dim, K = c.linear_conv_kernel_dim;
        const q3n::cuda::GdnShape shape{nk, nv, dk, dv};
        const int key_dim = nk * dk, conv_dim = 2 * key_dim + nv * dv, value_dim = nv * dv;
        const size_t state_bytes = size_t(nv) * dk * dv * 4, conv_state_bytes = size_t(conv_dim) * (K - 1) * 4;
        const float scale = 1.0f / std::sqrt(float(dk));
        const int maxT = 8192;
        // The runner's layout: q | k | v rows of the conv output read in place, normalised in-kernel.
        DeviceBuffer conv(size_t(maxT) * conv_dim * 4), g(size_t(maxT) * nv * 4), beta(size_t(maxT) * nv * 4),
            core(size_t(maxT) * value_dim * 4);
        fill_uniform(conv.as<float>(), conv.bytes() / 4, 1, -1.0f, 1.0f);
        fill_uniform(g.as<float>(), g.bytes() / 4, 2, -2.0f, -0.01f);  // log-decays are <= 0
        fill_uniform(beta.as<float>(), beta.bytes() / 4, 3, 0.05f, 0.95f);
        const float* q = conv.as<float>();
        const q3n::cuda::GdnInputs in{q, conv_dim, q + key_dim, conv_dim, q + 2 * key_dim, conv_dim, g.as<float>(),
                                      beta.as<float>(), true, 1e-6f};
        std::printf("\nGated DeltaNet: nk %d nv %d dk %d dv %d, conv %d channels x %d, %d GDN layers\n", nk, nv, dk, dv,
                    conv_dim, K, gdn_layers);

        Json rows = Json::array();
        for (int B : {1, 8, 32}) {
            const int copies = copies_for(B * state_bytes, 256);
            DeviceBuffer states(copies * B * state_bytes);
            fill_uniform(states.as<float>(), states.bytes() / 4, 4, -0.1f, 0.1f);
            std::vector<float*> table(size_t(copies) * B);
            for (size_t i = 0; i < table.size(); ++i) table[i] = states.as<float>() + i * (state_bytes / 4);
            DeviceBuffer table_d = upload(table), starts = seq_starts_of(B, 1);
            bool eager = false;
            const double ms = timed(stream, std::max(40, copies), [&](int i) {
                q3n::cuda::gated_delta_rule_decode(shape, in, scale, starts.as<int32_t>(), B,
                                                   table_d.as<float*>() + size_t(i % copies) * B, core.as<float>(), stream);
            }, &eager);
            any_eager |= eager;
            const double bytes = B * (2.0 * state_bytes + (size_t(conv_dim) + value_dim + 2 * nv) * 4.0);
            line("gdn decode", "batch " + std::to_string(B), ms, floor_ms(bytes), "bytes", gdn_layers);
            rows.push_back({{"batch", B}, {"ms", ms}, {"floor_bytes", bytes}, {"floor_ms", floor_ms(bytes)},
                            {"fraction_of_floor", floor_ms(bytes) / ms}, {"layers_per_step", gdn_layers},
                            {"ms_per_step", ms * gdn_layers}, {"state_copies", copies}, {"eager_timing", eager}});
        }
        js["gdn_decode"] = rows;

        // The whole decode step between in_proj and out_proj: the three launches the runner used
        // (gdn_split_conv, gated_delta_rule_decode, rmsnorm_gated_quantize) against gdn_decode_fused,
        // both from the in_proj rows, with both states and the conv weights rotated out of L2.
        if (q3n::cuda::gdn_decode_fusable(shape, K, true)) {
            const int wide = 2 * key_dim + 2 * value_dim + 2 * nv, groups = value_dim / 128;
            DeviceBuffer proj(size_t(32) * wide * 4), z(size_t(32) * value_dim * 4), qv(size_t(32) * value_dim * 4),
                qsc(size_t(32) * groups * 4), A_log(nv * 4), dt_bias(nv * 4), norm_w(dv * 4);
            fill_uniform(proj.as<float>(), proj.bytes() / 4, 11, -1.0f, 1.0f);
            fill_uniform(A_log.as<float>(), nv, 12, -2.0f, 1.0f);
            fill_uniform(dt_bias.as<float>(), nv, 13, -1.0f, 1.0f);
            fill_uniform(norm_w.as<float>(), dv, 14, 0.5f, 1.5f);
            rows = Json::array();
            for (int B : {1, 2, 8, 32}) {
                const size_t w_floats = align256(size_t(conv_dim) * K * 4) / 4, cs_floats = align256(conv_state_bytes) / 4;
                const size_t per_copy = B * state_bytes / 4 + w_floats + B * cs_floats;
                const int copies = copies_for(per_copy * 4, 256);
                DeviceBuffer pool(copies * per_copy * 4);
                fill_uniform(pool.as<float>(), pool.bytes() / 4, 15, -0.1f, 0.1f);
                std::vector<float*> table(size_t(copies) * 2 * B);  // per copy: B conv states, then B states
                for (int cp = 0; cp < copies; ++cp)
                    for (int b = 0; b < B; ++b) {
                        float* base = pool.as<float>() + cp * per_copy;
                        table[(size_t(cp) * 2) * B + b] = base + w_floats + b * cs_floats;
                        table[(size_t(cp) * 2 + 1) * B + b] = base + w_floats + B * cs_floats + b * (state_bytes / 4);
                    }
                DeviceBuffer table_d = upload(table), starts = seq_starts_of(B, 1);
                const float* pj = proj.as<float>();
                const q3n::cuda::GdnInputs step_in{conv.as<float>(), conv_dim, conv.as<float>() + key_dim, conv_dim,
                                                   conv.as<float>() + 2 * key_dim, conv_dim, g.as<float>(), beta.as<float>(),
                                                   true, 1e-6f};
                double ms[2] = {0, 0};
                bool step_eager = false;
                for (int fused = 0; fused < 2; ++fused) {
                    bool eager = false;
                    ms[fused] = timed(stream, std::max(40, copies), [&](int i) {
                        const int cp = i % copies;
                        float* w = pool.as<float>() + cp * per_copy;
                        float* const* conv_states = table_d.as<float*>() + size_t(cp) * 2 * B;
                        float* const* states = conv_states + B;
                        if (fused) {
                            q3n::cuda::gdn_decode_fused(pj, wide, pj + 2 * key_dim + 2 * value_dim, wide, shape, A_log.as<float>(),
                                                        dt_bias.as<float>(), w, K, norm_w.as<float>(), 1e-6f, 1e-6f, scale,
                                                        starts.as<int32_t>(), B, conv_states, states, core.as<float>(),
                                                        qv.as<float>(), qsc.as<float>(), stream);
                            return;
                        }
                        q3n::cuda::gdn_split_conv(pj, wide, pj + 2 * key_dim + 2 * value_dim, wide, shape, A_log.as<float>(),
                                                  dt_bias.as<float>(), w, K, starts.as<int32_t>(), B, conv_states,
                                                  conv.as<float>(), z.as<float>(), beta.as<float>(), g.as<float>(), stream);
                        q3n::cuda::gated_delta_rule_decode(shape, step_in, scale, starts.as<int32_t>(), B, states,
                                                           core.as<float>(), stream);
                        q3n::cuda::rmsnorm_gated_quantize(core.as<float>(), z.as<float>(), norm_w.as<float>(), B, nv, dv,
                                                          1e-6f, core.as<float>(), qv.as<float>(), qsc.as<float>(), stream);
                    }, &eager);
                    step_eager |= eager;
                }
                any_eager |= step_eager;
                const double bytes = B * (2.0 * state_bytes + 2.0 * conv_state_bytes + double(wide) * 4 +
                                          2.0 * value_dim * 4 + groups * 4.0) +
                                     double(conv_dim) * K * 4;
                line("gdn step", "batch " + std::to_string(B) + " 3 launches", ms[0], floor_ms(bytes), "bytes", gdn_layers);
                line("gdn step", "batch " + std::to_string(B) + " fused", ms[1], floor_ms(bytes), "bytes", gdn_layers);
                rows.push_back({{"batch", B}, {"ms_three_launches", ms[0]}, {"ms_fused", ms[1]}, {"floor_bytes", bytes},
                                {"floor_ms", floor_ms(bytes)}, {"fraction_of_floor_three_launches", floor_ms(bytes) / ms[0]},
                                {"fraction_of_floor_fused", floor_ms(bytes) / ms[1]}, {"layers_per_step", gdn_layers},
                                {"copies", copies}, {"eager_timing", step_eager}});
            }
            js["gdn_decode_step"] = rows;
            js["gdn_decode_step_note"] = "conv + gates + L2 norms + delta rule + gated RMSNorm + FP8 quantisation of a "
                                         "decode step, from in_proj's rows: the three launches the runner used against "
                                         "gdn_decode_fused (one launch, thread block clusters); floor = both states read "
                                         "and written, the conv weights, the in_proj rows in, the output and its FP8 "
                                         "copy out";
        }

        // Useful FLOPs of the chunked form per value head and chunk of C tokens: K K^T and Q K^T
        // (2 C^2 dk each), T = (I + M)^-1 (C^3 / 3), T (beta V) and A V' (2 C^2 dv each), K S, Q S and
        // the state update K^T V' (2 C dk dv each). The per-slice recomputation of the C x C products
        // inside the kernel is not counted.
        constexpr int C = 64;
        rows = Json::array();
        for (int T : {1024, 8192}) {
            const double chunks = std::ceil(T / double(C));
            const double flops = nv * chunks * (4.0 * C * C * dk + C * double(C) * C / 3 + 4.0 * C * C * dv + 6.0 * C * dk * dv);
            const double bytes = T * (double(conv_dim) + value_dim + 2 * nv) * 4 + 2.0 * state_bytes;
            DeviceBuffer state(state_bytes);
            fill_uniform(state.as<float>(), state_bytes / 4, 5, -0.1f, 0.1f);
            DeviceBuffer table_d = upload(std::vector<float*>{state.as<float>()}), starts = seq_starts_of(1, T);
            bool eager = false;
            const double ms = timed(stream, 5, [&](int) {
                q3n::cuda::gated_delta_rule_chunked(shape, in, scale, starts.as<int32_t>(), 1, table_d.as<float*>(),
                                                    core.as<float>(), stream);
            }, &eager);
            any_eager |= eager;
            const double tf = flops / (ms / 1e3) / 1e12, tok_s = T / (ms / 1e3);
            line("gdn chunked", std::to_string(T) + " tokens", ms, flops / (fp32_peak * 1e12) * 1e3, "fp32", gdn_layers);
            std::printf("%-14s %-14s %10.0f tokens/s per layer (%.0f over %d layers), %.1f TFLOP/s = %.1f%% of fp32 "
                        "nominal, %.1f%% of BF16 tensor peak; bytes floor %.4f ms\n",
                        "", "", tok_s, tok_s / std::max(gdn_layers, 1), gdn_layers, tf, 100 * tf / fp32_peak,
                        100 * tf / bf16_peak, floor_ms(bytes));
            rows.push_back({{"tokens", T}, {"sequences", 1}, {"ms", ms}, {"tokens_per_s", tok_s},
                            {"tokens_per_s_all_gdn_layers", tok_s / std::max(gdn_layers, 1)}, {"flops", flops},
                            {"tflops", tf}, {"fraction_of_fp32_nominal_peak", tf / fp32_peak},
                            {"fraction_of_bf16_tensor_peak", tf / bf16_peak}, {"floor_bytes", bytes},
                            {"floor_ms", floor_ms(bytes)}, {"fraction_of_bytes_floor", floor_ms(bytes) / ms},
                            {"eager_timing", eager}});
        }
        js["gdn_chunked"] = rows;
        js["gdn_chunked_flops_note"] = "useful FLOPs of the 64-token chunked form (K K^T, Q K^T, the triangular "
                                       "inverse, T beta V, A V', K S, Q S, K^T V'), not the kernel's per-slice "
                                       "recomputation; the kernel is fp32 on CUDA cores, so the fp32 nominal peak "
                                       "(SMs x 128 lanes x 2 x boost clock) is its ceiling and the measured BF16 "
                                       "tensor peak that of a tensor-core kernel";

        // Conv weights and states per copy; x is read in place as the runner does (it was just
        // written by gdn_split_gates, so only weights and states are kept out of L2).
        rows = Json::array();
        DeviceBuffer xconv(size_t(32) * conv_dim * 4);
        fill_uniform(xconv.as<float>(), xconv.bytes() / 4, 6, -1.0f, 1.0f);
        for (int B : {1, 8, 32}) {
            const size_t w_floats = align256(size_t(conv_dim) * K * 4) / 4, s_floats = align256(conv_state_bytes) / 4;
            const size_t per_copy = w_floats + B * s_floats;
            const int copies = copies_for(per_copy * 4, 1024);
            DeviceBuffer pool(copies * per_copy * 4);
            fill_uniform(pool.as<float>(), pool.bytes() / 4, 7, -0.3f, 0.3f);
            std::vector<float*> table(size_t(copies) * B);
            for (int cp = 0; cp < copies; ++cp)
                for (int b = 0; b < B; ++b) table[size_t(cp) * B + b] = pool.as<float>() + cp * per_copy + w_floats + b * s_floats;
            DeviceBuffer table_d = upload(table), starts = seq_starts_of(B, 1);
            bool eager = false;
            const double ms = timed(stream, std::max(40, copies), [&](int i) {
                const int cp = i % copies;
                q3n::cuda::causal_conv1d_silu(xconv.as<float>(), conv_dim, pool.as<float>() + cp * per_copy, K,
                                              starts.as<int32_t>(), B, table_d.as<float*>() + size_t(cp) * B,
                                              xconv.as<float>(), stream);
            }, &eager);
            any_eager |= eager;
            const double bytes = 2.0 * B * conv_dim * 4 + double(conv_dim) * K * 4 + 2.0 * B * conv_state_bytes;
            line("conv1d decode", "batch " + std::to_string(B), ms, floor_ms(bytes), "bytes", gdn_layers);
            rows.push_back({{"phase", "decode"}, {"sequences", B}, {"tokens", B}, {"ms", ms}, {"floor_bytes", bytes},
                            {"floor_ms", floor_ms(bytes)}, {"fraction_of_floor", floor_ms(bytes) / ms},
                            {"layers_per_step", gdn_layers}, {"copies", copies}, {"eager_timing", eager}});
        }
        {
            DeviceBuffer w(size_t(conv_dim) * K * 4), st(conv_state_bytes);
            fill_uniform(w.as<float>(), w.bytes() / 4, 8, -0.3f, 0.3f);
            fill_uniform(st.as<float>(), st.bytes() / 4, 9, -1.0f, 1.0f);
            DeviceBuffer table_d = upload(std::vector<float*>{st.as<float>()});
            for (int T : {1024, 8192}) {
                // A prompt's activations are as large as L2 at 1K tokens: rotate them too.
                const size_t xbytes = size_t(T) * conv_dim * 4;
                const int copies = copies_for(xbytes, 16);
                std::vector<DeviceBuffer> xs;
                for (int cp = 0; cp < copies; ++cp) {
                    xs.emplace_back(xbytes);
                    fill_uniform(xs.back().as<float>(), xbytes / 4, 10 + cp, -1.0f, 1.0f);
                }
                DeviceBuffer starts = seq_starts_of(1, T);
                bool eager = false;
                const double ms = timed(stream, std::max(8, copies), [&](int i) {
                    float* x = xs[i % copies].as<float>();
                    q3n::cuda::causal_conv1d_silu(x, conv_dim, w.as<float>(), K, starts.as<int32_t>(), 1, table_d.as<float*>(),
                                                  x, stream);
                }, &eager);
                any_eager |= eager;
                const double bytes = 2.0 * xbytes + double(conv_dim) * K * 4 + 2.0 * conv_state_bytes;
                line("conv1d prefill", std::to_string(T) + " tokens", ms, floor_ms(bytes), "bytes", 0);
                rows.push_back({{"phase", "prefill"}, {"sequences", 1}, {"tokens", T}, {"ms", ms}, {"floor_bytes", bytes},
                                {"floor_ms", floor_ms(bytes)}, {"fraction_of_floor", floor_ms(bytes) / ms},
                                {"tokens_per_s", T / (ms / 1e3)}, {"copies", copies}, {"eager_timing", eager}});
            }
        }
        js["causal_conv1d"] = rows;
    }

    if (moe) {
        const int E = c.num_experts, k = c.num_experts_per_tok, H = c.hidden_size, I = c.moe_intermediate_size;
        const int Is = gdn ? static_cast<int>(c.shared_expert_intermediate_size) : 0;
        const bool shared = Is > 0;
        const bool fp8 = c.fp8.enabled && !c.fp8.is_excluded("model.layers.0.mlp.experts.0.gate_proj");
        const q3n::WeightType type = fp8 ? q3n::WeightType::FP8_E4M3 : q3n::WeightType::BF16;
        const size_t elem = fp8 ? 1 : 2;
        auto scale_count = [](int out, int in) { return size_t((out + 127) / 128) * ((in + 127) / 128); };
        // Bytes one expert's three matrices (and their block scales) put on the bus.
        auto expert_bytes = [&](int inter) {
            return 3.0 * inter * H * elem + (fp8 ? 4.0 * (2 * scale_count(inter, H) + scale_count(H, inter)) : 0.0);
        };
        const double routed_bytes = expert_bytes(I), shared_bytes = shared ? expert_bytes(Is) : 0.0;
        std::printf("\nMoE: %d experts, top-%d, hidden %d, moe_intermediate %d, shared %d, %s weights, %d MoE layers "
                    "(one layer's experts allocated, %.0f MB)\n",
                    E, k, H, I, Is, fp8 ? "FP8 block-scaled" : "BF16", moe_layers, E * routed_bytes / 1e6);

        // One allocation per weight kind, laid out as DeviceWeights::upload_moe does (256-byte aligned
        // matrices), and a few copies of the shared expert, which every call reads.
        const int shared_copies = shared ? 16 : 0;
        auto matrices_bytes = [&](int inter) { return 2 * align256(size_t(inter) * H * elem) + align256(size_t(H) * inter * elem); };
        const size_t total_data = E * matrices_bytes(I) + shared_copies * (shared ? matrices_bytes(Is) : 0);
        const size_t total_scales = fp8 ? E * (2 * scale_count(I, H) + scale_count(H, I)) +
                                              shared_copies * (2 * scale_count(Is, H) + scale_count(H, Is))
                                        : 0;
        DeviceBuffer wdata(total_data), wscales(std::max<size_t>(total_scales * 4, 4));
        fill_weights(wdata.get(), wdata.bytes(), 21, fp8);
        if (fp8) fill_uniform(wscales.as<float>(), total_scales, 22, 0.0005f, 0.0015f);
        size_t at = 0, s_at = 0;
        auto make_linear = [&](int out, int in) {
            DeviceLinear d;
            d.type = type;
            d.data = wdata.as<uint8_t>() + at;
            d.out = out;
            d.in = in;
            at += align256(size_t(out) * in * elem);
            if (fp8) {
                d.scales = wscales.as<float>() + s_at;
                d.scale_cols = (in + 127) / 128;
                s_at += scale_count(out, in);
            }
            return d;
        };
        auto make_expert = [&](int inter) {
            q3n::cuda::DeviceMoeExpert e;
            e.gate = make_linear(inter, H);
            e.up = make_linear(inter, H);
            e.down = make_linear(H, inter);
            return e;
        };
        std::vector<q3n::cuda::DeviceMoeExpert> routed;
        for (int e = 0; e < E; ++e) routed.push_back(make_expert(I));
        std::vector<q3n::cuda::DeviceMoeExpert> descs;
        for (int cp = 0; cp < std::max(shared_copies, 1); ++cp) {
            descs.insert(descs.end(), routed.begin(), routed.end());
            if (shared) descs.push_back(make_expert(Is));
        }
        const int desc_sets = std::max(shared_copies, 1), per_set = E + (shared ? 1 : 0);
        DeviceBuffer descs_d = upload(descs);
        q3n::cuda::DeviceMoe block;
        block.type = type;
        block.num_experts = E;
        block.top_k = k;
        block.hidden = H;
        block.inter = I;
        block.has_shared = shared;
        block.shared_inter = Is;

        const int maxT = 1024;
        DeviceBuffer x(size_t(maxT) * H * 4), y(size_t(maxT) * H * 4), sg(maxT * 4), r_experts(size_t(maxT) * k * 4),
            r_weights(size_t(maxT) * k * 4), r_order(size_t(maxT) * k * 4), r_position(size_t(maxT) * k * 4),
            r_offsets((E + 1) * 4), r_active((E + 1) * 4);
        block.experts = descs_d.as<q3n::cuda::DeviceMoeExpert>();
        DeviceBuffer ws(q3n::cuda::moe_workspace_bytes(block, maxT));
        fill_uniform(x.as<float>(), x.bytes() / 4, 23, -1.0f, 1.0f);
        fill_uniform(sg.as<float>(), maxT, 24, -2.0f, 2.0f);
        const q3n::cuda::MoeRouting routing{r_experts.as<int32_t>(), r_weights.as<float>(), r_offsets.as<int32_t>(),
                                            r_order.as<int32_t>(), r_position.as<int32_t>(), r_active.as<int32_t>()};

        Json rows = Json::array();
        std::mt19937 rng(25);
        std::normal_distribution<float> normal(0.0f, 1.0f);
        for (int T : {1, 8, 32, 1024}) {
            const bool prefill = T > 32;
            // Several routings per shape so the chosen experts change from call to call, as they do
            // from layer to layer; the floor averages their distinct-expert counts.
            const int sets = prefill ? 4 : 16, reps = prefill ? 4 : 48;
            std::vector<float> logits(size_t(sets) * T * E);
            for (auto& v : logits) v = normal(rng);
            double distinct = 0;
            std::vector<int> idx(E);
            for (int s = 0; s < sets; ++s) {
                std::vector<char> used(E, 0);
                for (int t = 0; t < T; ++t) {
                    const float* l = logits.data() + (size_t(s) * T + t) * E;
                    std::iota(idx.begin(), idx.end(), 0);
                    // moe_route's order: larger first, ties to the lower index.
                    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                                      [&](int a, int b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
                    for (int j = 0; j < k; ++j) used[idx[j]] = 1;
                }
                distinct += std::count(used.begin(), used.end(), 1);
            }
            distinct /= sets;
            const double expected = E * (1.0 - std::pow(1.0 - double(k) / E, T));
            DeviceBuffer logits_d = upload(logits);
            auto route = [&](int i) {
                q3n::cuda::moe_route(logits_d.as<float>() + size_t(i % sets) * T * E, T, E, k, c.norm_topk_prob, routing,
                                     stream);
            };
            auto experts_for = [&](int i) {
                q3n::cuda::DeviceMoe m = block;
                m.experts = descs_d.as<q3n::cuda::DeviceMoeExpert>() + size_t(i % desc_sets) * per_set;
                return m;
            };
            bool eager_r = false, eager_b = false, eager_f = false;
            const double route_ms = timed(stream, reps, route, &eager_r);
            const double ms = timed(stream, reps, [&](int i) {
                route(i);
                q3n::cuda::moe_experts(x.as<float>(), T, experts_for(i), routing, shared ? sg.as<float>() : nullptr,
                                       y.as<float>(), ws.get(), stream);
            }, &eager_b);
            // The fused launch beside it, where it applies (moe_forward_fused: routing included).
            const bool fusable = q3n::cuda::moe_forward_fusable(block, T);
            const double fused_ms = !fusable ? 0.0 : timed(stream, reps, [&](int i) {
                q3n::cuda::moe_forward_fused(logits_d.as<float>() + size_t(i % sets) * T * E, E, T, experts_for(i),
                                             c.norm_topk_prob, x.as<float>(), shared ? sg.as<float>() : nullptr,
                                             y.as<float>(), ws.get(), stream);
            }, &eager_f);
            any_eager |= eager_r || eager_b || eager_f;
            const double bytes = distinct * routed_bytes + shared_bytes, uniform_bytes = expected * routed_bytes + shared_bytes;
            const double flops = 2.0 * T * (k * 3.0 * I * H + (shared ? 3.0 * Is * H : 0.0));
            const double tf = flops / (ms / 1e3) / 1e12, peak = fp8 ? fp8_peak : bf16_peak;
            const std::string what = (prefill ? "prefill " : "decode ") + std::to_string(T);
            line("moe", what, ms, floor_ms(bytes), "bytes", prefill ? 0 : moe_layers);
            std::printf("%-14s %-14s route %.4f ms;", "", "", route_ms);
            if (fusable) std::printf(" fused launch %.4f ms (%.1f%% of the floor);", fused_ms, 100 * floor_ms(bytes) / fused_ms);
            std::printf(" %.1f distinct experts (uniform expectation %.1f)", distinct, expected);
            if (prefill)
                std::printf("; %.1f TFLOP/s = %.1f%% of the %s tensor peak, %.0f tokens/s per layer", tf, 100 * tf / peak,
                            fp8 ? "FP8" : "BF16", T / (ms / 1e3));
            std::printf("\n");
            Json r = {{"phase", prefill ? "prefill" : "decode"}, {"tokens", T}, {"ms", ms}, {"route_ms", route_ms},
                      {"experts_ms", ms - route_ms}, {"distinct_experts_counted", distinct},
                      {"distinct_experts_uniform_expectation", expected}, {"floor_bytes", bytes},
                      {"floor_ms", floor_ms(bytes)}, {"fraction_of_floor", floor_ms(bytes) / ms},
                      {"floor_ms_uniform_expectation", floor_ms(uniform_bytes)}, {"flops", flops}, {"tflops", tf},
                      {"fraction_of_tensor_peak", tf / peak}, {"eager_timing", eager_r || eager_b || eager_f}};
            if (fusable) {
                r["fused_ms"] = fused_ms;
                r["fused_fraction_of_floor"] = floor_ms(bytes) / fused_ms;
            }
            if (!prefill) {
                r["layers_per_step"] = moe_layers;
                r["ms_per_step"] = ms * moe_layers;
            } else {
                r["tokens_per_s"] = T / (ms / 1e3);
            }
            rows.push_back(r);
        }
        js["moe"] = {{"experts", E}, {"top_k", k}, {"hidden", H}, {"moe_intermediate", I}, {"shared_intermediate", Is},
                     {"weights", fp8 ? "fp8_e4m3_block128" : "bf16"}, {"expert_bytes", routed_bytes},
                     {"shared_expert_bytes", shared_bytes}, {"moe_layers", moe_layers},
                     {"floor_note", "ms is moe_route + moe_experts (what the runners call by default); fused_ms is "
                                    "moe_forward_fused (routing included) where it applies; floor = the distinct experts the generated routing "
                                    "selects (counted on the host, averaged over the routings cycled through) times "
                                    "an expert's weight and scale bytes, plus the shared expert; random N(0,1) router "
                                    "logits; tensor peak of the weights' dtype (FP8 experts run on f16 tensor cores, BF16 ones on CUDA cores)"},
                     {"rows", rows}};
    }

    if (const cudaError_t e = cudaDeviceSynchronize(); e != cudaSuccess) {
        std::fprintf(stderr, "CUDA error: %s\n", cudaGetErrorString(e));
        return 1;
    }
    if (any_eager) std::printf("note: some figures were timed eagerly (graph capture failed), host gaps included\n");
    fs::create_directories(out_dir);
    const fs::path out = fs::path(out_dir) / ("cuda-next-ops-" + fs::path(config).stem().string() + ".json");
    std::ofstream(out) << js.dump(2) << "\n";
    std::printf("wrote %s\n", out.c_str());
    return 0;
} catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
}
