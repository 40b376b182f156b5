// attention_prefill (tensor cores) against the CPU attention on the same paged cache: odd lengths
// around the tile edges (128 queries a block; keys in tiles of 128, 64 at head_dim 256; a warpgroup
// per 64 queries), several sequences packed in one step (one block then runs several query tiles,
// up to one per token), continued prefill over a cached prefix starting anywhere in a tile, long
// prompts (many key tiles through the two-stage pipeline), head_dim 64/128/256, GQA 1/4/8/16, BF16
// and F32 caches, block sizes on both load paths (power of two >= the rows a thread copies: one
// table lookup per row group; others: one per row), q rows not 16-byte aligned, block tables in
// random order.
//
// Tolerances (inputs of unit scale: q, k, v ~ N(0, 1), scale 1/sqrt(d), so logits ~ N(0, 1)):
//   - tight, against the CPU fed what the tensor cores see (Q * scale * log2 e rounded to bf16 and
//     scaled back, K and V rounded to bf16): what is left is P rounded to bf16 for the PV product
//     (relative 2^-9 per weight, so |error| <= 2^-9 max|v| ~ 1e-2 at worst, ~1e-3 typically, the
//     signs being random) and fp32 summation order: max abs 5e-3, relative L2 3e-3;
//   - loose, against the fp32 CPU reference as is: Q's bf16 rounding adds ~2^-9 |logit| to each
//     logit and, for F32 caches, K and V are rounded too: max abs 2e-2, relative L2 1e-2.
// A failure names the largest error and the first (token, head, dim) beyond tolerance.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
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

struct Seq {
    int len;    // tokens of this step
    int start;  // position of its first token; positions [0, start) are a prefix already cached
};

struct Case {
    std::vector<Seq> seqs;
    int heads = 8, kv_heads = 2, d = 128, bs = 16;
    KvDtype dtype = KvDtype::BF16;
    uint32_t seed = 1;
    int q_pad = 0;  // floats after each q row's k and v: an odd pad makes rows 4-byte aligned only
    bool quant = false;  // also check the packed FP8 output against quantize_fp8 of out
};

std::string describe(const Case& c) {
    std::ostringstream s;
    s << "seqs {";
    for (const Seq& q : c.seqs) s << " " << q.len << "@" << q.start;
    s << " } heads " << c.heads << " kv_heads " << c.kv_heads << " d " << c.d << " block " << c.bs << " "
      << (c.dtype == KvDtype::F32 ? "F32" : "BF16") << (c.q_pad ? " q_pad " + std::to_string(c.q_pad) : "");
    return s.str();
}

// Max abs and relative L2 error of out against ref ([tokens][heads][d]); on failure, says where.
void expect_close(const std::vector<float>& out, const std::vector<float>& ref, int heads, int d, double atol,
                  double rel_tol, const std::string& what) {
    ASSERT_EQ(out.size(), ref.size());
    double worst = 0, num = 0, den = 0;
    size_t worst_at = 0, first_bad = out.size();
    for (size_t i = 0; i < out.size(); ++i) {
        const double e = std::fabs(double(out[i]) - ref[i]);
        if (!(e <= worst)) worst = std::isnan(e) ? INFINITY : e, worst_at = i;
        if (first_bad == out.size() && !(e <= atol)) first_bad = i;
        num += std::isnan(e) ? INFINITY : e * e;
        den += double(ref[i]) * ref[i];
    }
    const double r = std::sqrt(num / std::max(den, 1e-300));
    auto where = [&](size_t i) {
        std::ostringstream s;
        s << "(token " << i / (size_t(heads) * d) << ", head " << (i / d) % heads << ", dim " << i % d << ": " << out[i]
          << " vs " << ref[i] << ")";
        return s.str();
    };
    EXPECT_TRUE(first_bad == out.size() && r <= rel_tol)
        << what << ": max abs error " << worst << " at " << where(worst_at) << ", relative L2 " << r << " (tolerance "
        << atol << " abs, " << rel_tol << " rel)"
        << (first_bad < out.size() ? ", first beyond tolerance " + where(first_bad) : std::string());
}

void run_case(const Case& c) {
    SCOPED_TRACE(describe(c));
    std::mt19937 rng(c.seed);
    const int S = static_cast<int>(c.seqs.size()), d = c.d, H = c.heads, KH = c.kv_heads;
    // Block tables: each sequence gets blocks for its prefix and this step, drawn in random order
    // from a shuffled pool (with spares, so no block id is implied by position); unused table
    // entries are -1 so that reading one faults rather than passing.
    std::vector<int> nblk(S);
    int max_blocks = 1, total_blocks = 0;
    for (int s = 0; s < S; ++s) {
        nblk[s] = (c.seqs[s].start + c.seqs[s].len + c.bs - 1) / c.bs;
        max_blocks = std::max(max_blocks, nblk[s]);
        total_blocks += nblk[s];
    }
    const int num_blocks = total_blocks + 3;
    std::vector<int32_t> pool_ids(num_blocks);
    std::iota(pool_ids.begin(), pool_ids.end(), 0);
    std::shuffle(pool_ids.begin(), pool_ids.end(), rng);
    std::vector<int32_t> tables(size_t(S) * max_blocks, -1);
    for (int s = 0, next = 0; s < S; ++s)
        for (int b = 0; b < nblk[s]; ++b) tables[size_t(s) * max_blocks + b] = pool_ids[next++];

    // Cache contents for every position of every sequence (prefix and this step alike): the
    // tested cache in its dtype, and a BF16 twin for the tight reference.
    const size_t elem = c.dtype == KvDtype::F32 ? 4 : 2;
    const size_t cache_elems = size_t(num_blocks) * c.bs * KH * d;
    std::vector<uint8_t> kmem(cache_elems * elem, 0), vmem(kmem.size(), 0), kb16(cache_elems * 2, 0), vb16(kb16.size(), 0);
    cpu::PagedKvLayer ckv{c.dtype, kmem.data(), vmem.data(), size_t(c.bs), size_t(KH), size_t(d)};
    cpu::PagedKvLayer ckv16{KvDtype::BF16, kb16.data(), vb16.data(), size_t(c.bs), size_t(KH), size_t(d)};
    for (int s = 0; s < S; ++s) {
        const int n = c.seqs[s].start + c.seqs[s].len;
        const auto k = randn(size_t(n) * KH * d, c.seed * 101 + 2 * s), v = randn(size_t(n) * KH * d, c.seed * 101 + 2 * s + 1);
        std::vector<cpu::TokenSlot> slots(n);
        for (int p = 0; p < n; ++p) slots[p] = {&tables[size_t(s) * max_blocks], p};
        cpu::kv_write(ckv, k.data(), v.data(), slots.data(), n);
        cpu::kv_write(ckv16, k.data(), v.data(), slots.data(), n);
    }

    // This step's tokens, sequence after sequence; q rows carry k and v after them as in the model.
    std::vector<int32_t> positions, seq_of;
    std::vector<cpu::TokenSlot> slots;
    for (int s = 0; s < S; ++s)
        for (int i = 0; i < c.seqs[s].len; ++i) {
            positions.push_back(c.seqs[s].start + i);
            seq_of.push_back(s);
            slots.push_back({&tables[size_t(s) * max_blocks], c.seqs[s].start + i});
        }
    const int T = static_cast<int>(positions.size());
    const int q_stride = (H + 2 * KH) * d + c.q_pad;
    const auto qrows = randn(size_t(T) * q_stride, c.seed * 7 + 5);
    const float scale = 1.0f / std::sqrt(float(d));
    const float q_scale = scale * 1.4426950408889634f;  // what attention_prefill folds into Q
    std::vector<float> q(size_t(T) * H * d), q16(q.size());
    for (int t = 0; t < T; ++t)
        for (int i = 0; i < H * d; ++i) {
            const float x = qrows[size_t(t) * q_stride + i];
            q[size_t(t) * H * d + i] = x;
            q16[size_t(t) * H * d + i] = bf16_to_float(float_to_bf16(x * q_scale)) / q_scale;
        }
    std::vector<float> ref(q.size()), ref16(q.size());
    cpu::attention(ckv, q.data(), slots.data(), T, H, scale, ref.data(), pool());
    cpu::attention(ckv16, q16.data(), slots.data(), T, H, scale, ref16.data(), pool());

    auto dq = to_device(qrows), dpos = to_device(positions), dseq = to_device(seq_of), dtab = to_device(tables),
         dk = to_device(kmem), dv = to_device(vmem);
    DeviceBuffer dout(q.size() * 4);
    Q3N_CUDA(cudaMemset(dout.get(), 0xff, dout.bytes()));  // NaN: rows never written show up
    const cuda::DeviceKvLayer gkv{c.dtype, dk.get(), dv.get(), c.bs, KH, d};
    const cuda::DeviceBatch batch{T, dpos.as<int32_t>(), dseq.as<int32_t>(), dtab.as<int32_t>(), max_blocks};
    cuda::attention_prefill(gkv, dq.as<float>(), q_stride, H, scale, batch, dout.as<float>(), nullptr);
    const auto out = to_host(dout, q.size());

    // An F32 cache is rounded to bf16 on load exactly as kv_write rounds the BF16 twin: same bound.
    expect_close(out, ref16, H, d, 5e-3, 3e-3, "against bf16 Q/K/V on the CPU");
    expect_close(out, ref, H, d, 2e-2, 1e-2, "against the fp32 CPU reference");

    if (!c.quant) return;
    // The packed FP8 output for o_proj (quantised in the epilogue at head_dim 128, by quantize_fp8
    // otherwise) equals quantize_fp8 of the plain output, code for code and scale for scale; the
    // packed buffers start as garbage and padding rows must come out zero.
    const int k = H * d, groups = k / 128, padded = (T + 15) / 16 * 16;
    ASSERT_EQ(k % 128, 0);
    cuda::GemmScratch want_s, got_s;
    for (cuda::GemmScratch* sc : {&want_s, &got_s}) {
        sc->q8.reserve(size_t(padded) * k);
        sc->scales.reserve(size_t(padded) * groups * 4);
        Q3N_CUDA(cudaMemset(sc->q8.get(), 0x5a, sc->q8.bytes()));
        Q3N_CUDA(cudaMemset(sc->scales.get(), 0x7f, sc->scales.bytes()));
    }
    const cuda::Fp8Out want = cuda::gemm_fp8_packed_out(want_s, T, nullptr), got = cuda::gemm_fp8_packed_out(got_s, T, nullptr);
    ASSERT_NE(got.q8, nullptr);
    cuda::zero_fp8_padding(want, T, k, nullptr);
    cuda::zero_fp8_padding(got, T, k, nullptr);
    cuda::quantize_fp8(dout.as<float>(), T, k, want, nullptr);
    DeviceBuffer dout2(q.size() * 4);
    cuda::attention_prefill(gkv, dq.as<float>(), q_stride, H, scale, batch, dout2.as<float>(), nullptr, got);
    std::vector<uint8_t> w8(size_t(padded) * k), g8(w8.size());
    Q3N_CUDA(cudaMemcpy(w8.data(), want_s.q8.get(), w8.size(), cudaMemcpyDeviceToHost));
    Q3N_CUDA(cudaMemcpy(g8.data(), got_s.q8.get(), g8.size(), cudaMemcpyDeviceToHost));
    size_t codes = 0;
    for (size_t i = 0; i < w8.size(); ++i) codes += w8[i] != g8[i];
    EXPECT_EQ(codes, 0u) << "e4m3 codes differ";
    EXPECT_EQ(to_host(want_s.scales, size_t(padded) * groups), to_host(got_s.scales, size_t(padded) * groups)) << "scales differ";
}

TEST(CudaAttentionPrefill, Lengths) {
    REQUIRE_GPU();
    uint32_t seed = 10;
    for (int len : {1, 15, 16, 17, 63, 64, 65, 127, 128, 129, 200, 255, 256, 257, 1000})
        run_case({{{len, 0}}, 8, 2, 128, 16, KvDtype::BF16, seed++});
    for (int len : {17, 200}) run_case({{{len, 0}}, 8, 2, 128, 16, KvDtype::F32, seed++});
    // head_dim 256 walks keys in tiles of 64: both stage parities at the end of the loop.
    for (int len : {64, 65, 127, 128, 129, 191, 192, 193})
        run_case({{{len, 0}}, 4, 2, 256, 16, KvDtype::BF16, seed++});
    for (int len : {63, 64, 65, 129}) run_case({{{len, 0}}, 4, 2, 64, 16, KvDtype::BF16, seed++});
}

TEST(CudaAttentionPrefill, LongPrompts) {
    REQUIRE_GPU();
    uint32_t seed = 20;
    // 16 to 32 key tiles: the pipeline's steady state, and maxima that grow late in the row.
    for (int d : {64, 128, 256}) run_case({{{2000, 0}}, 2, 1, d, 16, KvDtype::BF16, seed++});
    run_case({{{1500, 0}, {700, 0}}, 4, 1, 128, 16, KvDtype::BF16, seed++});
}

TEST(CudaAttentionPrefill, HeadDimsGqaDtypes) {
    REQUIRE_GPU();
    uint32_t seed = 30;
    for (int d : {64, 128, 256})
        for (auto [heads, kv_heads] : {std::pair{4, 4}, std::pair{8, 2}, std::pair{8, 1}})
            for (KvDtype dtype : {KvDtype::BF16, KvDtype::F32})
                run_case({{{150, 0}}, heads, kv_heads, d, 16, dtype, seed++});
    for (int d : {64, 128, 256}) run_case({{{100, 0}}, 16, 1, d, 16, KvDtype::BF16, seed++});  // group 16
}

TEST(CudaAttentionPrefill, PackedFp8OutputEqualsQuantizeFp8) {
    REQUIRE_GPU();
    if (!cuda::gemm_fp8_available(nullptr)) GTEST_SKIP() << "cuBLASLt block-scaled FP8 not usable here";
    uint32_t seed = 90;
    // head_dim 128 quantises in the epilogue (two sequences, a padded last row block, both caches);
    // 64 and 256 take quantize_fp8 after the kernel.
    run_case({{{200, 0}, {57, 30}}, 8, 2, 128, 16, KvDtype::BF16, seed++, 0, true});
    run_case({{{130, 0}}, 4, 4, 128, 16, KvDtype::F32, seed++, 0, true});
    run_case({{{100, 0}}, 4, 2, 64, 16, KvDtype::BF16, seed++, 0, true});
    run_case({{{100, 0}}, 4, 2, 256, 16, KvDtype::BF16, seed++, 0, true});
}

TEST(CudaAttentionPrefill, PackedSequences) {
    REQUIRE_GPU();
    uint32_t seed = 60;
    for (int d : {64, 128, 256}) {
        run_case({{{300, 0}, {77, 0}}, 8, 2, d, 16, KvDtype::BF16, seed++});
        run_case({{{1, 0}, {130, 0}, {65, 0}}, 8, 2, d, 16, KvDtype::BF16, seed++});
        run_case({{{129, 0}, {5, 0}, {64, 0}}, 4, 4, d, 16, KvDtype::BF16, seed++});
    }
    run_case({{{200, 0}, {33, 0}}, 8, 1, 128, 16, KvDtype::F32, seed++});
    // Many short sequences: windows holding dozens of query tiles, run one after another.
    std::vector<Seq> many;
    for (int i = 0; i < 60; ++i) many.push_back({1 + (i * 7) % 5, (i * 37) % 300});
    many.push_back({150, 0});
    for (int d : {64, 128, 256}) run_case({many, 8, 2, d, 16, KvDtype::BF16, seed++});
}

TEST(CudaAttentionPrefill, ContinuedPrefill) {
    REQUIRE_GPU();
    uint32_t seed = 80;
    for (int d : {64, 128, 256}) {
        run_case({{{150, 100}}, 8, 2, d, 16, KvDtype::BF16, seed++});
        // A continued chunk, a fresh prompt and a one-token continuation in one step.
        run_case({{{37, 100}, {90, 0}, {1, 250}}, 8, 2, d, 16, KvDtype::BF16, seed++});
        // Chunks that start on, just before and just after a 128-position tile edge, or deep in a
        // long cached prefix (the query tile then sees many more key tiles than it has rows).
        run_case({{{64, 64}, {1, 127}, {130, 126}, {100, 129}}, 8, 2, d, 16, KvDtype::BF16, seed++});
        run_case({{{200, 1000}}, 4, 2, d, 16, KvDtype::BF16, seed++});
    }
    run_case({{{150, 100}}, 8, 2, 128, 16, KvDtype::F32, seed++});
}

TEST(CudaAttentionPrefill, BlockSizes) {
    REQUIRE_GPU();
    uint32_t seed = 90;
    // A thread copies 8 consecutive rows of a key tile (4 at head_dim 64): 4 and 8 sit on either side.
    for (int bs : {1, 4, 5, 8, 32, 64})
        for (int d : {64, 128, 256}) run_case({{{100, 7}, {70, 0}}, 8, 2, d, bs, KvDtype::BF16, seed++});
    run_case({{{100, 7}, {70, 0}}, 8, 2, 128, 8, KvDtype::F32, seed++});
}

TEST(CudaAttentionPrefill, UnalignedQ) {
    REQUIRE_GPU();
    uint32_t seed = 110;
    for (int d : {64, 128, 256}) {
        Case c{{{130, 0}, {20, 5}}, 8, 2, d, 16, KvDtype::BF16, seed++};
        c.q_pad = 1;
        run_case(c);
    }
}

TEST(CudaAttentionPrefill, Applicable) {
    alignas(16) int dummy[4];
    cuda::DeviceKvLayer kv{KvDtype::BF16, dummy, dummy, 16, 2, 128};
    EXPECT_TRUE(cuda::attention_prefill_applicable(kv, 65));
    EXPECT_FALSE(cuda::attention_prefill_applicable(kv, 64));
    kv.head_dim = 96;
    EXPECT_FALSE(cuda::attention_prefill_applicable(kv, 4096));
    kv.head_dim = 256;
    EXPECT_TRUE(cuda::attention_prefill_applicable(kv, 4096));
    kv.dtype = KvDtype::F32;
    EXPECT_FALSE(cuda::attention_prefill_applicable(kv, 4096));
}

}  // namespace
