// The Qwen3-VL vision tower alone on the GPU (cuda/qwen3_vl_vision_cuda.h), random BF16 weights at a
// config's vision_config, for one 448x448 and one 1024x1024 image (grids from smart_resize, patch 16,
// merge 2): milliseconds per image and the fraction of the FLOP floor, i.e. the tower's FLOPs (every
// GEMM, the attention's QK and PV products; norms and elementwise work not counted) over the BF16
// tensor-core peak measured in the same run with cuBLASLt (bench_cuda_ops's 8192^3 matmul). Timed as
// the engine runs it: a repeated grid replays the tower's cached graph ("ms"), a grid's first call
// launches kernel by kernel ("ms_first_call"). Then the
// attention alone (cuda::vision_attention_bf16, one segment of each image's patches at the config's
// heads and head_dim): milliseconds, TFLOP/s of its QK^T and PV products, and their fraction of that peak.
// Named *_ops so CMake links the engine's internal objects.
//
//   bench_cuda_vision_ops --config CONFIG.json [--out bench/results]
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
#include "core/numeric.h"
#include "cuda/device_buffer.h"
#include "cuda/qwen3_vl_vision_cuda.h"
#include "cuda/vision_ops.h"
#include "cuda_bench_util.h"
#include "cuda_peak.h"
#include "model/qwen3_vl_vision.h"

namespace fs = std::filesystem;
using q3n::cuda::DeviceBuffer;

namespace {

// BF16 cuBLASLt matmul at 8192^3, bf16 out, as bench_cuda_ops measures it (device-side random fill).
__global__ void fill_bf16(__nv_bfloat16* p, size_t n, uint32_t seed) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
        uint32_t h = uint32_t(i) * 2654435761u ^ seed;
        h ^= h >> 15;
        h *= 2246822519u;
        p[i] = __float2bfloat16(float(h & 0xffff) / 65536.0f - 0.5f);
    }
}


// Random host weights: every block views the same storage (the GPU tower uploads each block anyway).
struct RandomTower {
    std::vector<std::vector<uint16_t>> store;
    std::mt19937 rng{7};

    q3n::Linear bf16(size_t out, size_t in) {
        std::normal_distribution<float> d(0.0f, 1.0f / std::sqrt(float(in)));
        store.emplace_back(out * in);
        for (auto& v : store.back()) v = q3n::float_to_bf16(d(rng));
        q3n::Linear l;
        l.type = q3n::WeightType::BF16;
        l.data = store.back().data();
        l.out = out;
        l.in = in;
        return l;
    }
    q3n::VisionLinear affine(size_t out, size_t in) {
        q3n::VisionLinear l;
        l.w = bf16(out, in);
        l.b.assign(out, 0.01f);
        return l;
    }
    q3n::VisionMergerWeights merger(const q3n::VisionConfig& c, bool post) {
        const size_t wide = size_t(c.hidden_size) * c.spatial_merge_size * c.spatial_merge_size;
        q3n::VisionMergerWeights m;
        m.postshuffle_norm = post;
        m.norm_w.assign(post ? wide : c.hidden_size, 1.0f);
        m.norm_b.assign(post ? wide : c.hidden_size, 0.0f);
        m.fc1 = affine(wide, wide);
        m.fc2 = affine(c.out_hidden_size, wide);
        return m;
    }
};

}  // namespace

int main(int argc, char** argv) {
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
    try {
        const nlohmann::json j = nlohmann::json::parse(std::ifstream(config));
        const q3n::VisionConfig c = q3n::VisionConfig::from_json(j, config);
        cudaStream_t stream;
        cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
        cudaDeviceProp prop;
        cudaGetDeviceProperties(&prop, 0);
        const double peak = q3n_bench::measure_peak_tflops(false, stream);
        std::printf("device %s: BF16 peak %.0f TFLOP/s (cuBLASLt 8192^3)\n", prop.name, peak);

        RandomTower rt;
        q3n::Qwen3VlVisionWeights w;
        const size_t h = c.hidden_size, inter = c.intermediate_size;
        w.patch_embed = rt.affine(h, c.patch_dim());
        w.pos_embed = rt.bf16(c.num_position_embeddings, h);
        q3n::VisionBlockWeights blk;
        blk.norm1_w.assign(h, 1.0f);
        blk.norm1_b.assign(h, 0.0f);
        blk.norm2_w = blk.norm1_w;
        blk.norm2_b = blk.norm1_b;
        blk.qkv = rt.affine(3 * h, h);
        blk.proj = rt.affine(h, h);
        blk.fc1 = rt.affine(inter, h);
        blk.fc2 = rt.affine(h, inter);
        w.blocks.assign(c.depth, blk);
        w.merger = rt.merger(c, false);
        for (size_t k = 0; k < c.deepstack_visual_indexes.size(); ++k) w.deepstack.push_back(rt.merger(c, true));
        q3n::cuda::Qwen3VlVisionCuda tower(c, w, stream);

        std::ostringstream js;
        js << "{\n  \"benchmark\": \"cuda_vision\",\n  \"config\": \"" << fs::path(config).stem().string() << "\",\n"
           << "  \"device\": \"" << prop.name << "\",\n  \"date\": \"" << q3n_bench::utc_now() << "\",\n"
           << "  \"commit\": \"" << q3n_bench::commit_id() << "\",\n  \"bf16_peak_tflops\": " << peak
           << ",\n  \"precision\": \"bf16 weights and activations: GEMMs through cuBLASLt (fp32 accumulation), bf16 residual stream, attention on wgmma (fp32 softmax and accumulation)\""
           << ",\n  \"images\": [";
        bool first = true;
        for (const int side : {448, 1024}) {
            const auto [rh, rw] = q3n_bench::smart_resize(side, side);
            const q3n::GridThw grid{1, rh / c.patch_size, rw / c.patch_size};
            const size_t n = size_t(grid.h) * grid.w, tokens = tower.tokens(grid);
            DeviceBuffer px(n * c.patch_dim() * 4), feat(tokens * tower.feature_width() * 4);
            std::vector<float> host(n * c.patch_dim());
            std::mt19937 rng(3);
            std::uniform_real_distribution<float> u(-1.0f, 1.0f);
            for (auto& v : host) v = u(rng);
            cudaMemcpy(px.get(), host.data(), host.size() * 4, cudaMemcpyHostToDevice);
            tower.forward(px.as<float>(), grid, feat.as<float>());  // sizes the scratch before the capture
            if (cudaStreamSynchronize(stream) != cudaSuccess) return q3n_bench::die("the tower failed on the device");
            // As the engine runs it: a grid's first call launches each kernel (eager_ms), later calls
            // replay the graph the second one captured (ms).
            tower.use_graphs(false);
            const double eager_ms =
                q3n_bench::time_eager(stream, 3, [&](int) { tower.forward(px.as<float>(), grid, feat.as<float>()); });
            tower.use_graphs(true);
            const double ms = q3n_bench::time_eager(stream, 3, [&](int) { tower.forward(px.as<float>(), grid, feat.as<float>()); });
            if (side == 1024) q3n_bench::profile_once(stream, [&] { tower.forward(px.as<float>(), grid, feat.as<float>()); });
            const double wide = double(h) * c.spatial_merge_size * c.spatial_merge_size;
            const double gemm = 2.0 * n * c.patch_dim() * h +
                                c.depth * 2.0 * n * (3.0 * h * h + h * h + 2.0 * h * inter) +
                                (1 + c.deepstack_visual_indexes.size()) * 2.0 * tokens * (wide * wide + wide * c.out_hidden_size);
            const double attn = c.depth * 4.0 * double(n) * n * h;  // QK^T and PV over one frame
            const double flops = gemm + attn;
            const double tflops = flops / (ms / 1e3) / 1e12;
            const double floor_ms = flops / (peak * 1e12) * 1e3;
            std::printf("%4dx%-4d grid %ux%u: %5zu patches, %4zu tokens  %8.3f ms  %7.1f GFLOP (%4.1f%% attention)  "
                        "%6.1f TFLOP/s  %5.1f%% of the BF16 floor (%.3f ms); a grid's first call %.3f ms\n",
                        side, side, grid.h, grid.w, n, tokens, ms, flops / 1e9, 100 * attn / flops, tflops,
                        100 * floor_ms / ms, floor_ms, eager_ms);
            js << (first ? "" : ",") << "\n    {\"image\": \"" << side << "x" << side << "\", \"grid_thw\": [1, " << grid.h
               << ", " << grid.w << "], \"patches\": " << n << ", \"tokens\": " << tokens << ", \"ms\": " << ms << ", \"ms_first_call\": " << eager_ms
               << ", \"gflop\": " << flops / 1e9 << ", \"attention_gflop\": " << attn / 1e9 << ", \"tflops\": " << tflops
               << ", \"fraction_of_bf16_floor\": " << floor_ms / ms << "}";
            first = false;
        }
        js << "\n  ],\n  \"attention\": [";
        first = true;
        for (const int side : {448, 1024}) {
            const auto [rh, rw] = q3n_bench::smart_resize(side, side);
            const int n = int(rh / c.patch_size) * int(rw / c.patch_size), heads = int(c.num_heads),
                      hd = int(c.head_dim());
            DeviceBuffer qkv(size_t(n) * 3 * h * 2), att(size_t(n) * h * 2);
            fill_bf16<<<1024, 256, 0, stream>>>(qkv.as<__nv_bfloat16>(), size_t(n) * 3 * h, 11);
            const float scale = 1.0f / std::sqrt(float(hd));
            auto run = [&](int) {
                q3n::cuda::vision_attention_bf16(qkv.as<__nv_bfloat16>(), 1, n, heads, hd, scale,
                                                 att.as<__nv_bfloat16>(), stream);
            };
            run(0);
            if (cudaStreamSynchronize(stream) != cudaSuccess) return q3n_bench::die("the attention failed on the device");
            const double ms = q3n_bench::time_on_stream(stream, 20, run);
            const double flops = 4.0 * double(n) * n * h;  // QK^T and PV at the true head_dim
            const double tflops = flops / (ms / 1e3) / 1e12;
            std::printf("attention alone %4dx%-4d %5d tokens, %d heads x %d: %8.4f ms  %6.1f TFLOP/s  %5.1f%% of the BF16 peak\n",
                        side, side, n, heads, hd, ms, tflops, 100 * tflops / peak);
            js << (first ? "" : ",") << "\n    {\"image\": \"" << side << "x" << side << "\", \"tokens\": " << n
               << ", \"heads\": " << heads << ", \"head_dim\": " << hd << ", \"ms\": " << ms
               << ", \"gflop\": " << flops / 1e9 << ", \"tflops\": " << tflops
               << ", \"fraction_of_bf16_peak\": " << tflops / peak << "}";
            first = false;
        }
        js << "\n  ]\n}\n";
        fs::create_directories(out_dir);
        const std::string path = out_dir + "/cuda-vision-" + fs::path(config).stem().string() + ".json";
        std::ofstream(path) << js.str();
        std::printf("wrote %s\n", path.c_str());
        cudaStreamDestroy(stream);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
    return 0;
}
