// cuda::attention's decode kernels (split over keys, then merged) against the CPU attention on the
// same paged cache: contexts around the tile and split edges, a token whose position is inside the
// last partial block, several sequences of different lengths in one step, several tokens of one
// sequence (a chunk that does not take the prefill kernel), block-table widths far beyond the
// longest sequence (splits with no keys), GQA groups 1 to 16 (powers of two or not), head_dim 36 to
// 256 (rows that are not whole 16-byte vectors take the element-by-element path), both cache dtypes,
// block sizes 1 to 32, no workspace (one split) or one too small for the preferred split count, and
// replays of one captured graph with new positions and tables.
//
// Tolerance: both sides compute in fp32 from the same cache values; only summation order and
// exp2 against exp differ: relative L2 below 2e-6 over the step, as in test_cuda_ops.cu's decode
// test, and below 5e-6 for every token on its own (a token or head missed or misplaced moves its
// error to 1e-3 and beyond). Contexts stay at or under 1200 keys: the CPU's own fp32 sums drift
// with length (1.4e-6 from the exact result at 3000 keys, 0.9e-6 at 1200; the kernels' 0.6e-6).
// Rows of q are strided with NaN in the gaps, the output and workspace are NaN-poisoned, and
// unused table entries are -1: a read of any of them shows up or faults.
//
// The FP8 copy of the output that attention() writes for an FP8 o_proj (q_out, q_scales) must equal
// attention() then quantize_fp8 bit for bit, whichever kernel finalises the heads (the split kernel,
// the merge, or the prefill kernel and quantize_fp8 after it) and for head_dims that are not whole
// quantisation groups (quantize_fp8 after the kernels).
//
// The decode launch that normalises, rotates and caches q|k|v itself (attention_decode_qk_norm_rope)
// must equal qk_norm_rope_kv_write then attention() bit for bit: outputs and both caches.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "core/numeric.h"
#include "cpu/ops.h"
#include "cuda/device_buffer.h"
#include "cuda/ops.h"
#include "cuda_test_util.h"

using namespace q3n;
using cuda::DeviceBuffer;
using namespace q3n::cuda_test;

namespace {

struct Token {
    int seq, pos;
};

struct Case {
    std::vector<int> lengths;   // keys in the cache per sequence
    std::vector<Token> tokens;  // this step; empty: one per sequence, at its last position
    int heads = 32, kv_heads = 8, d = 128, bs = 16;
    KvDtype dtype = KvDtype::BF16;
    int width = 0;  // block-table width; 0: the longest sequence's blocks rounded up to a power of two, as decode graphs pad it
    uint32_t seed = 1;
};

std::string describe(const Case& c) {
    std::ostringstream s;
    s << "lengths {";
    for (int l : c.lengths) s << " " << l;
    s << " }";
    if (!c.tokens.empty()) {
        s << " tokens {";
        for (const Token& t : c.tokens) s << " " << t.seq << "@" << t.pos;
        s << " }";
    }
    s << " heads " << c.heads << " kv_heads " << c.kv_heads << " d " << c.d << " block " << c.bs << " width " << c.width
      << " " << (c.dtype == KvDtype::F32 ? "F32" : "BF16");
    return s.str();
}

// out against ref ([tokens][heads][d]): the whole step and each token on its own.
void expect_close(const std::vector<float>& out, const std::vector<float>& ref, int T, int heads, int d,
                  const std::string& what) {
    ASSERT_EQ(out.size(), ref.size());
    const size_t per = size_t(heads) * d;
    double worst = 0;
    int worst_t = 0;
    for (int t = 0; t < T; ++t) {
        const double r = rel(out.data() + t * per, ref.data() + t * per, per);
        if (!(r <= worst)) worst = std::isnan(r) ? INFINITY : r, worst_t = t;
    }
    const double all = rel(out, ref);
    EXPECT_TRUE(all < 2e-6 && worst < 5e-6) << what << ": relative L2 " << all << " over the step, worst token " << worst_t
                                            << " at " << worst << "; " << diff_report(out, ref);
}

// The cache, tables and q of one case, on the host and on the device, with the CPU's answer.
struct Prepared {
    int T = 0, width = 0, q_stride = 0;
    std::vector<int32_t> tables, positions, seq_of;
    std::vector<cpu::TokenSlot> slots;
    std::vector<uint8_t> kmem, vmem;
    std::vector<float> q, qrows, ref;
    DeviceBuffer dk, dv, dq, dpos, dseq, dtab;
    float scale = 1.0f;

    Prepared(const Case& c) {
        std::mt19937 rng(c.seed);
        const int S = static_cast<int>(c.lengths.size()), d = c.d, H = c.heads, KH = c.kv_heads;
        std::vector<int> nblk(S);
        int longest = 1, total = 0;
        for (int s = 0; s < S; ++s) {
            nblk[s] = (c.lengths[s] + c.bs - 1) / c.bs;
            longest = std::max(longest, nblk[s]);
            total += nblk[s];
        }
        width = c.width ? c.width : static_cast<int>(std::bit_ceil(static_cast<unsigned>(longest)));
        EXPECT_GE(width, longest);
        // Blocks in random order from a shuffled pool with spares; unused entries -1.
        const int num_blocks = total + 3;
        std::vector<int32_t> pool_ids(num_blocks);
        std::iota(pool_ids.begin(), pool_ids.end(), 0);
        std::shuffle(pool_ids.begin(), pool_ids.end(), rng);
        tables.assign(size_t(S) * width, -1);
        for (int s = 0, next = 0; s < S; ++s)
            for (int b = 0; b < nblk[s]; ++b) tables[size_t(s) * width + b] = pool_ids[next++];

        const size_t elem = c.dtype == KvDtype::F32 ? 4 : 2, cache_elems = size_t(num_blocks) * c.bs * KH * d;
        kmem.resize(cache_elems * elem);
        vmem.resize(cache_elems * elem);
        const auto kf = randn(cache_elems, c.seed * 31 + 1), vf = randn(cache_elems, c.seed * 31 + 2);
        for (size_t i = 0; i < cache_elems; ++i) {
            if (c.dtype == KvDtype::F32) {
                std::memcpy(&kmem[i * 4], &kf[i], 4);
                std::memcpy(&vmem[i * 4], &vf[i], 4);
            } else {
                const uint16_t a = float_to_bf16(kf[i]), b = float_to_bf16(vf[i]);
                std::memcpy(&kmem[i * 2], &a, 2);
                std::memcpy(&vmem[i * 2], &b, 2);
            }
        }

        std::vector<Token> toks = c.tokens;
        if (toks.empty())
            for (int s = 0; s < S; ++s) toks.push_back({s, c.lengths[s] - 1});
        T = static_cast<int>(toks.size());
        for (const Token& t : toks) {
            EXPECT_LT(t.pos, c.lengths[t.seq]);
            positions.push_back(t.pos);
            seq_of.push_back(t.seq);
            slots.push_back({&tables[size_t(t.seq) * width], t.pos});
        }
        // q rows as the model lays them out (q, then k and v: NaN here, never to be read).
        q_stride = (H + 2 * KH) * d;
        q = randn(size_t(T) * H * d, c.seed * 31 + 3, 2.0f);
        qrows.assign(size_t(T) * q_stride, std::numeric_limits<float>::quiet_NaN());
        for (int t = 0; t < T; ++t) std::copy_n(&q[size_t(t) * H * d], H * d, &qrows[size_t(t) * q_stride]);

        cpu::PagedKvLayer ckv{c.dtype, kmem.data(), vmem.data(), size_t(c.bs), size_t(KH), size_t(d)};
        ref.resize(q.size());
        scale = 1.0f / std::sqrt(float(d));
        cpu::attention(ckv, q.data(), slots.data(), T, H, scale, ref.data(), pool());

        dk = to_device(kmem);
        dv = to_device(vmem);
        dq = to_device(qrows);
        dpos = to_device(positions);
        dseq = to_device(seq_of);
        dtab = to_device(tables);
    }
};

void run_case(const Case& c) {
    SCOPED_TRACE(describe(c));
    Prepared u(c);
    const cuda::DeviceKvLayer gkv{c.dtype, u.dk.get(), u.dv.get(), c.bs, c.kv_heads, c.d};
    const cuda::DeviceBatch batch{u.T, u.dpos.as<int32_t>(), u.dseq.as<int32_t>(), u.dtab.as<int32_t>(), u.width};
    const size_t full = cuda::attention_workspace_bytes(u.T, c.heads, c.kv_heads, c.d);
    const size_t per_split = size_t(u.T) * c.heads * (size_t(c.d) + 2) * 4;
    DeviceBuffer ws(std::max<size_t>(full, 4)), dout(u.ref.size() * 4);
    // No workspace; the full one; one with room for three splits only.
    for (size_t bytes : {size_t(0), full, std::min(full, 3 * per_split)}) {
        Q3N_CUDA(cudaMemset(dout.get(), 0xff, dout.bytes()));
        Q3N_CUDA(cudaMemset(ws.get(), 0xff, ws.bytes()));
        cuda::attention(gkv, u.dq.as<float>(), u.q_stride, c.heads, u.scale, batch, dout.as<float>(), nullptr,
                        bytes ? ws.get() : nullptr, bytes);
        expect_close(to_host(dout, u.ref.size()), u.ref, u.T, c.heads, c.d, "workspace of " + std::to_string(bytes) + " bytes");
    }
}

// Qwen3-4B's shape (32 heads, 8 kv heads, head_dim 128): every length near the 16-key blocks, the
// 32-key tiles and the 64-key split threshold, alone (table widths 1 to 16) and all in one step.
TEST(CudaAttentionDecode, ShortContexts) {
    REQUIRE_GPU();
    const std::vector<int> lengths = {1, 2, 3, 15, 16, 17, 31, 32, 33, 35, 47, 63, 64, 65, 96, 127, 128, 129};
    uint32_t seed = 1;
    for (int len : lengths) run_case({{len}, {}, 32, 8, 128, 16, KvDtype::BF16, 0, seed++});
    run_case({lengths, {}, 32, 8, 128, 16, KvDtype::BF16, 0, seed++});
    run_case({{35, 1, 64}, {}, 32, 8, 128, 16, KvDtype::F32, 0, seed++});
}

// Qwen3-4B and Qwen3-30B-A3B (group 8) at the lengths measured, and a whole batch of mixed lengths.
TEST(CudaAttentionDecode, ModelShapes) {
    REQUIRE_GPU();
    uint32_t seed = 100;
    for (auto [heads, kv_heads] : {std::pair{32, 8}, std::pair{32, 4}})
        for (int len : {35, 768, 1200}) run_case({{len}, {}, heads, kv_heads, 128, 16, KvDtype::BF16, 0, seed++});
    std::mt19937 rng(7);
    std::vector<int> lengths(40);
    for (int& l : lengths) l = 1 + static_cast<int>(rng() % 700);
    run_case({lengths, {}, 32, 8, 128, 16, KvDtype::BF16, 0, seed++});
    run_case({{5, 900, 33, 1, 260}, {}, 32, 4, 128, 16, KvDtype::BF16, 0, seed++});
}

// Qwen3-Next's full-attention layers: head_dim 256, group 8 (16 heads over 2 kv heads).
TEST(CudaAttentionDecode, HeadDim256Group8) {
    REQUIRE_GPU();
    uint32_t seed = 200;
    for (KvDtype dtype : {KvDtype::BF16, KvDtype::F32}) {
        for (int len : {1, 17, 35, 700}) run_case({{len}, {}, 16, 2, 256, 16, dtype, 0, seed++});
        run_case({{35, 700, 3}, {}, 16, 2, 256, 16, dtype, 0, seed++});
    }
    run_case({{300}, {}, 32, 2, 256, 16, KvDtype::BF16, 0, seed++});  // group 16
    run_case({{300}, {}, 32, 2, 256, 16, KvDtype::F32, 0, seed++});
}

// Every group size, powers of two or not, at head_dims 64, 80 (not a power of two), 128 and 48.
TEST(CudaAttentionDecode, GroupsAndHeadDims) {
    REQUIRE_GPU();
    uint32_t seed = 300;
    for (int d : {64, 80, 128, 48})
        for (int group : {1, 2, 3, 4, 5, 6, 8, 12, 16})
            for (KvDtype dtype : {KvDtype::BF16, KvDtype::F32})
                run_case({{37, 300}, {}, 2 * group, 2, d, 16, dtype, 0, seed++});
}

// Rows that are not whole 16-byte vectors (bf16 head_dim not a multiple of 8, f32 not of 4).
TEST(CudaAttentionDecode, OddHeadDims) {
    REQUIRE_GPU();
    uint32_t seed = 400;
    for (int d : {36, 100, 250, 6})
        for (int group : {1, 4, 8}) run_case({{20, 150}, {}, 2 * group, 2, d, 16, KvDtype::BF16, 0, seed++});
    for (int d : {50, 130, 7})
        for (int group : {1, 4, 16}) run_case({{20, 150}, {}, 2 * group, 2, d, 16, KvDtype::F32, 0, seed++});
}

// Block sizes other than 16, positions anywhere in their block.
TEST(CudaAttentionDecode, BlockSizes) {
    REQUIRE_GPU();
    uint32_t seed = 500;
    for (int bs : {1, 5, 32})
        for (int d : {64, 128}) run_case({{1, 40, 97, 300}, {}, 16, 4, d, bs, KvDtype::BF16, 0, seed++});
    run_case({{40, 97}, {}, 16, 4, 128, 5, KvDtype::F32, 0, seed++});
}

// A table much wider than the sequences (a graph captured for long contexts, replayed on short
// ones): most splits lie past every position and must still leave the merge what it expects.
TEST(CudaAttentionDecode, WideTables) {
    REQUIRE_GPU();
    uint32_t seed = 600;
    for (int width : {5, 64, 256}) {
        run_case({{3, 40}, {}, 32, 8, 128, 16, KvDtype::BF16, width, seed++});
        run_case({{1}, {}, 16, 2, 256, 16, KvDtype::BF16, width, seed++});
        run_case({{70, 17}, {}, 32, 4, 64, 16, KvDtype::F32, width, seed++});
    }
}

// Several tokens of one sequence in a step that stays on these kernels (a chunk of a prompt, or an
// F32 cache), next to other sequences' single tokens; positions not in order.
TEST(CudaAttentionDecode, SeveralTokensPerSequence) {
    REQUIRE_GPU();
    uint32_t seed = 700;
    std::vector<Token> tokens;
    for (int p = 90; p < 110; ++p) tokens.push_back({0, p});
    for (int p = 0; p < 5; ++p) tokens.push_back({1, p});
    tokens.push_back({2, 499});
    tokens.push_back({0, 3});
    tokens.push_back({2, 0});
    for (KvDtype dtype : {KvDtype::BF16, KvDtype::F32}) {
        run_case({{110, 5, 500}, tokens, 32, 8, 128, 16, dtype, 0, seed++});
        run_case({{110, 5, 500}, tokens, 16, 2, 256, 16, dtype, 0, seed++});
        run_case({{110, 5, 500}, tokens, 12, 4, 80, 16, dtype, 0, seed++});
    }
}

// One captured graph (launch shapes fixed by the token count and table width) replayed with new
// positions and block tables, each replay against the CPU on what it was given.
TEST(CudaAttentionDecode, GraphReplayWithNewPositions) {
    REQUIRE_GPU();
    const int heads = 32, kv_heads = 8, d = 128, width = 64;  // up to 1024 keys
    // Three sequences per step; every round changes their lengths within the same table width.
    const std::vector<std::vector<int>> rounds = {{35, 1, 700}, {36, 2, 701}, {1000, 64, 65}, {3, 1024, 17}, {33, 33, 33}};
    std::vector<Prepared> setups;
    for (size_t r = 0; r < rounds.size(); ++r)
        setups.emplace_back(Case{rounds[r], {}, heads, kv_heads, d, 16, KvDtype::BF16, width, uint32_t(800 + r)});
    const int T = 3;
    // The graph reads the cache, q, positions and tables through fixed device buffers.
    const size_t cache_bytes = std::max_element(setups.begin(), setups.end(), [](const Prepared& a, const Prepared& b) {
                                   return a.kmem.size() < b.kmem.size();
                               })->kmem.size();
    DeviceBuffer dk(cache_bytes), dv(cache_bytes), dq(setups[0].qrows.size() * 4), dpos(T * 4), dseq(T * 4),
        dtab(size_t(T) * width * 4), dout(size_t(T) * heads * d * 4);
    DeviceBuffer ws(std::max<size_t>(cuda::attention_workspace_bytes(T, heads, kv_heads, d), 4));
    const cuda::DeviceKvLayer gkv{KvDtype::BF16, dk.get(), dv.get(), 16, kv_heads, d};
    const cuda::DeviceBatch batch{T, dpos.as<int32_t>(), dseq.as<int32_t>(), dtab.as<int32_t>(), width};

    cudaStream_t stream;
    Q3N_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cudaGraph_t graph;
    Q3N_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    cuda::attention(gkv, dq.as<float>(), setups[0].q_stride, heads, setups[0].scale, batch, dout.as<float>(), stream,
                    ws.get(), ws.bytes());
    Q3N_CUDA(cudaStreamEndCapture(stream, &graph));
    cudaGraphExec_t exec;
    Q3N_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    for (size_t r = 0; r < setups.size(); ++r) {
        SCOPED_TRACE("round " + std::to_string(r));
        const Prepared& u = setups[r];
        ASSERT_EQ(u.T, T);
        ASSERT_EQ(u.width, width);
        Q3N_CUDA(cudaMemcpy(dk.get(), u.kmem.data(), u.kmem.size(), cudaMemcpyHostToDevice));
        Q3N_CUDA(cudaMemcpy(dv.get(), u.vmem.data(), u.vmem.size(), cudaMemcpyHostToDevice));
        Q3N_CUDA(cudaMemcpy(dq.get(), u.qrows.data(), u.qrows.size() * 4, cudaMemcpyHostToDevice));
        Q3N_CUDA(cudaMemcpy(dpos.get(), u.positions.data(), T * 4, cudaMemcpyHostToDevice));
        Q3N_CUDA(cudaMemcpy(dseq.get(), u.seq_of.data(), T * 4, cudaMemcpyHostToDevice));
        Q3N_CUDA(cudaMemcpy(dtab.get(), u.tables.data(), u.tables.size() * 4, cudaMemcpyHostToDevice));
        Q3N_CUDA(cudaMemset(dout.get(), 0xff, dout.bytes()));
        Q3N_CUDA(cudaMemset(ws.get(), 0xff, ws.bytes()));
        Q3N_CUDA(cudaGraphLaunch(exec, stream));
        Q3N_CUDA(cudaStreamSynchronize(stream));
        expect_close(to_host(dout, u.ref.size()), u.ref, T, heads, d, "replay");
    }
    Q3N_CUDA(cudaGraphExecDestroy(exec));
    Q3N_CUDA(cudaGraphDestroy(graph));
    Q3N_CUDA(cudaStreamDestroy(stream));
}

// a and b (device buffers of n floats) hold the same bits; on failure, how many differ and the first.
void expect_same_bits(const DeviceBuffer& a, const DeviceBuffer& b, size_t n, const std::string& what) {
    const auto x = to_host<uint32_t>(a, n), y = to_host<uint32_t>(b, n);
    size_t differ = 0, first = n;
    for (size_t i = 0; i < n; ++i)
        if (x[i] != y[i]) {
            if (first == n) first = i;
            ++differ;
        }
    float fa = 0, fb = 0;
    if (first < n) std::memcpy(&fa, &x[first], 4), std::memcpy(&fb, &y[first], 4);
    EXPECT_EQ(differ, 0u) << what << ": " << differ << " of " << n << " differ, the first at " << first << " (" << fa
                          << " fused, " << fb << " unfused)";
}

// attention() with q_out against attention() then quantize_fp8, with no workspace (one split), the
// full one and room for three splits; every output NaN-poisoned first. `prefill` marks the step as
// one that may take the tensor-core prefill kernel.
void run_quantized_case(const Case& c, bool prefill = false) {
    SCOPED_TRACE(describe(c) + (prefill ? " prefill" : ""));
    Prepared u(c);
    const cuda::DeviceKvLayer gkv{c.dtype, u.dk.get(), u.dv.get(), c.bs, c.kv_heads, c.d};
    const cuda::DeviceBatch batch{u.T, u.dpos.as<int32_t>(), u.dseq.as<int32_t>(), u.dtab.as<int32_t>(), u.width, prefill};
    const int k = c.heads * c.d, groups = (k + 127) / 128;
    const size_t n = size_t(u.T) * k, ns = size_t(u.T) * groups;
    const size_t full = cuda::attention_workspace_bytes(u.T, c.heads, c.kv_heads, c.d);
    const size_t per_split = size_t(u.T) * c.heads * (size_t(c.d) + 2) * 4;
    DeviceBuffer ws(std::max<size_t>(full, 4)), uout(n * 4), uq(n * 4), us(ns * 4), fout(n * 4), fq(n * 4), fs(ns * 4);
    for (size_t bytes : {size_t(0), full, std::min(full, 3 * per_split)}) {
        const std::string what = "workspace of " + std::to_string(bytes) + " bytes";
        for (DeviceBuffer* b : {&ws, &uout, &uq, &us, &fout, &fq, &fs}) Q3N_CUDA(cudaMemset(b->get(), 0xff, b->bytes()));
        void* w = bytes ? ws.get() : nullptr;
        cuda::attention(gkv, u.dq.as<float>(), u.q_stride, c.heads, u.scale, batch, uout.as<float>(), nullptr, w, bytes);
        cuda::quantize_fp8(uout.as<float>(), u.T, k, uq.as<float>(), us.as<float>(), nullptr);
        Q3N_CUDA(cudaMemset(ws.get(), 0xff, ws.bytes()));
        cuda::attention(gkv, u.dq.as<float>(), u.q_stride, c.heads, u.scale, batch, fout.as<float>(), nullptr, w, bytes,
                        fq.as<float>(), fs.as<float>());
        expect_same_bits(fout, uout, n, what + ", fp32 output");
        expect_same_bits(fq, uq, n, what + ", e4m3 values");
        expect_same_bits(fs, us, ns, what + ", scales");
    }
}

// Single-block heads (1 and 37 keys, or no workspace) and merged ones (600 and 5000 keys), alone and
// in one step; GQA groups 1 to 16; head_dim 256 (two groups per head); an F32 cache; several tokens
// of one sequence (a chunk that stays on these kernels).
TEST(CudaAttentionDecode, QuantizedOutputEqualsQuantizeAfter) {
    REQUIRE_GPU();
    uint32_t seed = 900;
    const std::vector<int> lengths = {1, 37, 600, 5000};
    for (int len : lengths) run_quantized_case({{len}, {}, 32, 8, 128, 16, KvDtype::BF16, 0, seed++});
    run_quantized_case({lengths, {}, 32, 8, 128, 16, KvDtype::BF16, 0, seed++});
    run_quantized_case({{5000, 1, 600, 37, 64, 65}, {}, 32, 4, 128, 16, KvDtype::BF16, 0, seed++});
    run_quantized_case({{37, 600}, {}, 32, 2, 128, 16, KvDtype::BF16, 0, seed++});  // group 16
    run_quantized_case({{37, 600}, {}, 4, 4, 128, 16, KvDtype::BF16, 0, seed++});   // group 1
    run_quantized_case({{1, 600, 37}, {}, 16, 2, 256, 16, KvDtype::BF16, 0, seed++});
    run_quantized_case({{5000}, {}, 16, 2, 256, 16, KvDtype::BF16, 0, seed++});
    run_quantized_case({{37, 600}, {}, 32, 8, 128, 16, KvDtype::F32, 0, seed++});
    run_quantized_case({{3, 40}, {}, 32, 8, 128, 16, KvDtype::BF16, 256, seed++});  // splits past every position
    std::vector<Token> tokens;
    for (int p = 90; p < 110; ++p) tokens.push_back({0, p});
    tokens.push_back({1, 4});
    run_quantized_case({{110, 5}, tokens, 32, 8, 128, 16, KvDtype::BF16, 0, seed++});
}

// Steps that quantise after the kernels: head_dims that are not a multiple of 128 (groups straddle
// heads) and a prefill step on the tensor-core kernel.
TEST(CudaAttentionDecode, QuantizedOutputOtherPaths) {
    REQUIRE_GPU();
    uint32_t seed = 950;
    run_quantized_case({{37, 600}, {}, 32, 8, 64, 16, KvDtype::BF16, 0, seed++});
    run_quantized_case({{37, 600}, {}, 12, 4, 80, 16, KvDtype::BF16, 0, seed++});
    std::vector<Token> tokens;
    for (int p = 520; p < 600; ++p) tokens.push_back({0, p});
    run_quantized_case({{600}, tokens, 32, 8, 128, 16, KvDtype::BF16, 0, seed++}, true);
}

// attention_decode_qk_norm_rope against qk_norm_rope_kv_write then attention(), on copies of one
// cache and one q|k|v row: output, FP8 output and scales, and both whole caches, bit for bit, with no
// workspace (one split walking every tile, so the token's own key can lie past the first two), the
// full one and room for three splits. The q|k|v rows reach the fused launch through a kernel just
// before it on the same stream (an add onto zeros), so a read of them ahead of its PDL wait would
// see zeros; its input must come back unwritten.
void run_fused_case(const Case& c, int rot_dim, float attention_scaling) {
    SCOPED_TRACE(describe(c) + " rot_dim " + std::to_string(rot_dim));
    Prepared u(c);
    const int k = c.heads * c.d, groups = (k + 127) / 128, row = (c.heads + 2 * c.kv_heads) * c.d;
    const size_t n = size_t(u.T) * k, ns = size_t(u.T) * groups, nrow = size_t(u.T) * row;
    const std::vector<float> qkv = randn(nrow, c.seed * 31 + 7, 3.0f), qn = uniform(c.d, c.seed + 1, 0.5f, 1.5f),
                             kn = uniform(c.d, c.seed + 2, 0.5f, 1.5f);
    std::vector<float> inv_freq(rot_dim / 2);
    for (int i = 0; i < rot_dim / 2; ++i) inv_freq[i] = std::pow(1e6f, -2.0f * i / rot_dim);
    auto dqkv = to_device(qkv), dqn = to_device(qn), dkn = to_device(kn), dfreq = to_device(inv_freq);
    DeviceBuffer uqkv(nrow * 4), fqkv(nrow * 4), zeros(nrow * 4);
    DeviceBuffer uk(u.kmem.size()), uv(u.vmem.size()), fk(u.kmem.size()), fv(u.vmem.size());
    const cuda::DeviceKvLayer ukv{c.dtype, uk.get(), uv.get(), c.bs, c.kv_heads, c.d};
    const cuda::DeviceKvLayer fkv{c.dtype, fk.get(), fv.get(), c.bs, c.kv_heads, c.d};
    const cuda::DeviceBatch batch{u.T, u.dpos.as<int32_t>(), u.dseq.as<int32_t>(), u.dtab.as<int32_t>(), u.width};
    const size_t full = cuda::attention_workspace_bytes(u.T, c.heads, c.kv_heads, c.d);
    const size_t per_split = size_t(u.T) * c.heads * (size_t(c.d) + 2) * 4;
    DeviceBuffer ws(std::max<size_t>(full, 4)), uout(n * 4), uq(n * 4), us(ns * 4), fout(n * 4), fq(n * 4), fs(ns * 4);
    const bool quantized = c.d % 128 == 0;
    cudaStream_t stream;
    Q3N_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    for (size_t bytes : {size_t(0), full, std::min(full, 3 * per_split)}) {
        const std::string what = "workspace of " + std::to_string(bytes) + " bytes";
        // Everything on the kernels' stream: a non-blocking stream does not wait for the legacy one.
        for (DeviceBuffer* b : {&ws, &uout, &uq, &us, &fout, &fq, &fs})
            Q3N_CUDA(cudaMemsetAsync(b->get(), 0xff, b->bytes(), stream));
        for (DeviceBuffer* b : {&uk, &fk})
            Q3N_CUDA(cudaMemcpyAsync(b->get(), u.kmem.data(), u.kmem.size(), cudaMemcpyHostToDevice, stream));
        for (DeviceBuffer* b : {&uv, &fv})
            Q3N_CUDA(cudaMemcpyAsync(b->get(), u.vmem.data(), u.vmem.size(), cudaMemcpyHostToDevice, stream));
        Q3N_CUDA(cudaMemcpyAsync(uqkv.get(), dqkv.get(), nrow * 4, cudaMemcpyDeviceToDevice, stream));
        Q3N_CUDA(cudaMemsetAsync(fqkv.get(), 0, nrow * 4, stream));
        void* w = bytes ? ws.get() : nullptr;
        cuda::qk_norm_rope_kv_write(uqkv.as<float>(), c.heads, ukv, dqn.as<float>(), dkn.as<float>(), 1e-6f, dfreq.as<float>(),
                                    rot_dim, attention_scaling, batch, stream);
        cuda::attention(ukv, uqkv.as<float>(), row, c.heads, u.scale, batch, uout.as<float>(), stream, w, bytes,
                        quantized ? uq.as<float>() : nullptr, quantized ? us.as<float>() : nullptr);
        Q3N_CUDA(cudaMemsetAsync(ws.get(), 0xff, ws.bytes(), stream));
        cuda::add_inplace(fqkv.as<float>(), dqkv.as<float>(), static_cast<int>(nrow), stream);
        cuda::attention_decode_qk_norm_rope(fkv, fqkv.as<float>(), c.heads, dqn.as<float>(), dkn.as<float>(), 1e-6f,
                                            dfreq.as<float>(), rot_dim, attention_scaling, u.scale, batch, fout.as<float>(),
                                            stream, w, bytes, quantized ? fq.as<float>() : nullptr,
                                            quantized ? fs.as<float>() : nullptr);
        Q3N_CUDA(cudaStreamSynchronize(stream));
        expect_same_bits(fout, uout, n, what + ", fp32 output");
        if (quantized) {
            expect_same_bits(fq, uq, n, what + ", e4m3 values");
            expect_same_bits(fs, us, ns, what + ", scales");
        }
        const size_t cache_words = u.kmem.size() / 4;
        expect_same_bits(fk, uk, cache_words, what + ", K cache");
        expect_same_bits(fv, uv, cache_words, what + ", V cache");
        expect_same_bits(fqkv, dqkv, nrow, what + ", q|k|v input");
    }
    Q3N_CUDA(cudaStreamDestroy(stream));
}

// Qwen3-4B's shape with positions at and around the tile (32 keys) and block edges, alone and as
// one step of many sequences; GQA groups 1 and 16; head_dim 64 and 256 with a partial rotary;
// an F32 cache; block sizes 1 and 32; a table far wider than every sequence (splits with no keys).
TEST(CudaAttentionDecode, FusedQkNormRopeEqualsTwoLaunches) {
    REQUIRE_GPU();
    uint32_t seed = 1000;
    for (int len : {1, 32, 33, 64, 65, 97, 600})
        run_fused_case({{len}, {}, 32, 8, 128, 16, KvDtype::BF16, 0, seed++}, 128, 1.0f);
    run_fused_case({{1, 33, 600, 5000, 64, 65}, {}, 32, 8, 128, 16, KvDtype::BF16, 0, seed++}, 128, 1.0f);
    run_fused_case({{37, 600}, {}, 32, 2, 128, 16, KvDtype::BF16, 0, seed++}, 128, 1.1f);  // group 16, YaRN-style scaling
    run_fused_case({{37, 600}, {}, 4, 4, 128, 16, KvDtype::BF16, 0, seed++}, 64, 1.0f);    // group 1, half rotary
    run_fused_case({{1, 600, 37}, {}, 16, 2, 256, 16, KvDtype::BF16, 0, seed++}, 128, 1.0f);
    run_fused_case({{70, 300}, {}, 8, 2, 64, 16, KvDtype::BF16, 0, seed++}, 64, 1.0f);
    run_fused_case({{37, 600}, {}, 32, 8, 128, 16, KvDtype::F32, 0, seed++}, 128, 1.0f);
    run_fused_case({{45, 130}, {}, 32, 8, 128, 1, KvDtype::BF16, 0, seed++}, 128, 1.0f);
    run_fused_case({{45, 130}, {}, 32, 8, 128, 32, KvDtype::BF16, 0, seed++}, 0, 1.0f);  // no rotary
    run_fused_case({{3, 40}, {}, 32, 8, 128, 16, KvDtype::BF16, 256, seed++}, 128, 1.0f);
}

TEST(CudaAttentionDecode, FusedQkNormRopeShapes) {
    auto layer = [](int d) { return cuda::DeviceKvLayer{KvDtype::BF16, nullptr, nullptr, 16, 8, d}; };
    EXPECT_TRUE(cuda::attention_decode_fusable(layer(128), 128));
    EXPECT_TRUE(cuda::attention_decode_fusable(layer(256), 64));
    EXPECT_TRUE(cuda::attention_decode_fusable(layer(64), 0));
    EXPECT_FALSE(cuda::attention_decode_fusable(layer(80), 64));    // not whole warps of channels per lane
    EXPECT_FALSE(cuda::attention_decode_fusable(layer(128), 96));   // a rotary half that is not whole 32-lane slices
    EXPECT_FALSE(cuda::attention_decode_fusable(layer(128), 192));  // rotary wider than the head
}

// The workspace a caller allocates for a token count serves every table width at that count.
TEST(CudaAttentionDecode, WorkspaceBytes) {
    for (int tokens : {1, 2, 8, 33, 64, 300})
        for (auto [heads, kv_heads, d] : {std::tuple{32, 8, 128}, std::tuple{32, 4, 128}, std::tuple{16, 2, 256}}) {
            const size_t bytes = cuda::attention_workspace_bytes(tokens, heads, kv_heads, d);
            const size_t per_split = size_t(tokens) * heads * (size_t(d) + 2) * 4;
            EXPECT_EQ(bytes % per_split, 0u);
            EXPECT_LE(bytes / per_split, 64u);  // the merge kernel's limit
            // At least one block per SM's worth of splits where the tokens leave room for them.
            if (tokens * kv_heads < 132) EXPECT_GE(bytes / per_split, 132u / (tokens * kv_heads) / 2) << tokens;
        }
}

}  // namespace
