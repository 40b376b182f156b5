// The vision tower's attention on tensor cores (cuda/vision_ops.h's vision_attention_bf16) against the
// CPU's segment_attention on the same bf16 values, and the isolation of segments. Skipped, with a
// message, without a GPU. Two kernels sit behind vision_attention_bf16:
//   - on Hopper, head_dim 64, 72, 80 and 128 take the wgmma kernel (vision_attention_wgmma.cu):
//     blocks of 128 queries, keys in tiles of 128, Q K^T padded from 72 to 80 dims with zeros. Its
//     paths: one key tile that is also the last (seg_len 1, 15, 64, 100), a full first tile and a
//     one-key last one (129), many tiles through its three-stage rings (784, 1000, 4096: a ragged
//     last tile of 16 and 104 keys, and a full one), last query blocks whose second warpgroup has
//     no rows (15, 64, 129, 784: 16 rows) or some (100, 1000: 104 rows), several segments and heads
//     (tensor-map coordinates), soft and sharp softmaxes (the running rescale);
//   - every other head_dim (and any head_dim off Hopper) takes the mma.sync kernel of
//     vision_attention.cu, which has two tilings chosen by grid size: small launches take the narrow
//     one, and WideTilingOnFullGrids sizes its launches from the device's SM count so that they take
//     the wide one.
//
// Tolerances. The inputs are bf16, so the CPU computes on exactly the values the GPU reads, in fp32
// (its own error, ~1e-6 relative, is negligible here). The kernel's error has two sources, both bf16
// roundings with unit roundoff u = 2^-8 (8 significant bits):
//   - P is rounded to bf16 for the P V product while the row sum l is of the fp32 P, so
//     out = sum_j w_j (1 + d_j) v_j with |d_j| <= u and sum_j w_j = 1: off by at most u max_j |v_j|;
//   - out is rounded to bf16: at most u |out| <= u max_j |v_j| more.
// Hence, per element, |got - want| <= 2u max_j |v[j, head, dim]| over the segment's keys, a worst
// case (exp2.approx's 2^-22 and fp32 summation order add ~1e-6 relative, covered by the 10% slack).
// With random roundings the typical error is far smaller: each of the two terms has an rms of about
// u / sqrt(3) relative to the output, so relative L2 ~ sqrt(2/3) u ~ 3e-3; the bound 6e-3 leaves a
// factor 2 for the mantissa distribution. Both kernels have exactly these two roundings (the wgmma
// kernel's zero pad adds exact zeros to the scores). A broken fragment layout, a transposed operand,
// a wrong swizzle or descriptor offset, a missed pad or tail mask, or a lost rescale moves outputs by
// 1e-2 (24 stray zero keys among 1000) to 1: random q, k and v make every key, dim and row distinct,
// so any such slip shows in rel L2 and in the per-element bound (a host emulation of the wgmma
// kernel's index arithmetic with such slips planted gave 3.5e-2 to 1.3).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/numeric.h"
#include "cpu/ops.h"
#include "cuda/vision_ops.h"
#include "cuda_test_util.h"

using namespace q3n;
using namespace q3n::cuda_test;

namespace {

constexpr double kUnit = 1.0 / 256;  // bf16 unit roundoff, 2^-8

struct Shape {
    int segments, seg_len, heads, head_dim;
};

// Random qkv rows [segments * seg_len, 3, heads, head_dim] as bf16; q and k are drawn with standard
// deviation qk_sd, so scaled scores have a spread of about qk_sd^2 (1: a soft softmax over many keys;
// 3: a sharp one, whose running maximum keeps moving from tile to tile).
std::vector<uint16_t> random_qkv(const Shape& s, uint32_t seed, float qk_sd) {
    const size_t hidden = size_t(s.heads) * s.head_dim, tokens = size_t(s.segments) * s.seg_len;
    const auto qk = randn(tokens * 2 * hidden, seed, qk_sd);
    const auto v = randn(tokens * hidden, seed + 1, 1.0f);
    std::vector<uint16_t> out(tokens * 3 * hidden);
    for (size_t t = 0; t < tokens; ++t)
        for (size_t i = 0; i < hidden; ++i) {
            out[t * 3 * hidden + i] = float_to_bf16(qk[t * 2 * hidden + i]);
            out[t * 3 * hidden + hidden + i] = float_to_bf16(qk[t * 2 * hidden + hidden + i]);
            out[t * 3 * hidden + 2 * hidden + i] = float_to_bf16(v[t * hidden + i]);
        }
    return out;
}

float default_scale(int head_dim) { return 1.0f / std::sqrt(float(head_dim)); }

// Whether the current device is compute capability 9.0, where the wgmma kernel runs.
bool hopper() {
    int device = 0, major = 0;
    Q3N_CUDA(cudaGetDevice(&device));
    Q3N_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    return major == 9;
}

// Consumer warpgroups for run_gpu to pin in the wgmma kernel (0: vision_attention_bf16's own choice).
int pinned_warpgroups = 0;
struct PinWarpgroups {
    explicit PinWarpgroups(int n) { pinned_warpgroups = n; }
    ~PinWarpgroups() { pinned_warpgroups = 0; }
};

// out [tokens, heads * head_dim] as floats, from a device output pre-filled with NaN, so rows the
// kernel fails to write show up.
std::vector<float> run_gpu(const Shape& s, const std::vector<uint16_t>& qkv, float scale) {
    const size_t n = size_t(s.segments) * s.seg_len * s.heads * s.head_dim;
    const auto d_qkv = to_device(qkv);
    const auto d_out = to_device(std::vector<uint16_t>(n, 0x7fc0));  // bf16 NaN
    if (pinned_warpgroups)
        cuda::vision_attention_bf16_wgmma(d_qkv.as<__nv_bfloat16>(), s.segments, s.seg_len, s.heads, s.head_dim, scale,
                                          d_out.as<__nv_bfloat16>(), nullptr, pinned_warpgroups);
    else
        cuda::vision_attention_bf16(d_qkv.as<__nv_bfloat16>(), s.segments, s.seg_len, s.heads, s.head_dim, scale,
                                    d_out.as<__nv_bfloat16>(), nullptr);
    Q3N_CUDA(cudaGetLastError());
    const auto bits = to_host<uint16_t>(d_out, n);
    std::vector<float> out(n);
    for (size_t i = 0; i < n; ++i) out[i] = bf16_to_float(bits[i]);
    return out;
}

std::vector<float> run_cpu(const Shape& s, const std::vector<uint16_t>& qkv, float scale) {
    const size_t hidden = size_t(s.heads) * s.head_dim, tokens = size_t(s.segments) * s.seg_len;
    std::vector<float> q(tokens * hidden), k(q.size()), v(q.size()), out(q.size());
    for (size_t t = 0; t < tokens; ++t)
        for (size_t i = 0; i < hidden; ++i) {
            q[t * hidden + i] = bf16_to_float(qkv[t * 3 * hidden + i]);
            k[t * hidden + i] = bf16_to_float(qkv[t * 3 * hidden + hidden + i]);
            v[t * hidden + i] = bf16_to_float(qkv[t * 3 * hidden + 2 * hidden + i]);
        }
    std::vector<uint32_t> cu(s.segments + 1);
    for (int i = 0; i <= s.segments; ++i) cu[i] = uint32_t(i) * s.seg_len;
    cpu::segment_attention(q.data(), k.data(), v.data(), tokens, s.heads, s.head_dim, cu.data(), s.segments, scale,
                           out.data(), pool());
    return out;
}

// The per-element worst case of the header: 2u max_j |v[j, head, dim]| over the element's segment.
// Returns the number of elements beyond it (and reports the first).
size_t count_beyond_bound(const Shape& s, const std::vector<uint16_t>& qkv, const std::vector<float>& got,
                          const std::vector<float>& want, std::string* first) {
    const size_t hidden = size_t(s.heads) * s.head_dim;
    size_t bad = 0;
    for (int seg = 0; seg < s.segments; ++seg) {
        std::vector<float> vmax(hidden, 0.0f);
        for (int t = 0; t < s.seg_len; ++t) {
            const size_t row = size_t(seg) * s.seg_len + t;
            for (size_t i = 0; i < hidden; ++i)
                vmax[i] = std::max(vmax[i], std::fabs(bf16_to_float(qkv[row * 3 * hidden + 2 * hidden + i])));
        }
        for (int t = 0; t < s.seg_len; ++t) {
            const size_t row = size_t(seg) * s.seg_len + t;
            for (size_t i = 0; i < hidden; ++i) {
                const size_t at = row * hidden + i;
                const double err = std::fabs(double(got[at]) - want[at]);
                const double bound = 2.2 * kUnit * vmax[i] + 1e-6;
                if (!(err <= bound)) {
                    if (bad++ == 0)
                        *first = "token " + std::to_string(row) + " head " + std::to_string(i / s.head_dim) + " dim " +
                                 std::to_string(i % s.head_dim) + ": " + std::to_string(got[at]) + " vs " +
                                 std::to_string(want[at]) + " (bound " + std::to_string(bound) + ")";
                }
            }
        }
    }
    return bad;
}

void expect_matches_cpu(const Shape& s, const std::vector<uint16_t>& qkv) {
    const float scale = default_scale(s.head_dim);
    const auto got = run_gpu(s, qkv, scale);
    const auto want = run_cpu(s, qkv, scale);
    EXPECT_LT(rel(got, want), 6e-3) << diff_report(got, want);
    std::string first;
    EXPECT_EQ(count_beyond_bound(s, qkv, got, want, &first), 0u) << "first: " << first;
}

void expect_matches_cpu(const Shape& s, uint32_t seed, float qk_sd) {
    SCOPED_TRACE(::testing::Message() << "segments " << s.segments << ", seg_len " << s.seg_len << ", heads "
                                      << s.heads << ", head_dim " << s.head_dim << ", q/k sd " << qk_sd);
    expect_matches_cpu(s, random_qkv(s, seed, qk_sd));
}

// Enough segments that the launch fills every SM with the wide tiling (256 queries a block up to
// head_dim 80, one block per SM; 128 beyond, two per SM), so that it is the one chosen.
int full_grid_segments(int seg_len, int heads) {
    int device = 0, sms = 0;
    Q3N_CUDA(cudaGetDevice(&device));
    Q3N_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    const int per_segment_256 = (seg_len + 255) / 256 * heads, per_segment_128 = (seg_len + 127) / 128 * heads;
    return std::max((sms + per_segment_256 - 1) / per_segment_256, (2 * sms + per_segment_128 - 1) / per_segment_128);
}

}  // namespace

// The shapes the Qwen3-VL towers use (head_dim 64: 4B; 72: 8B and 30B-A3B) and their neighbours, with
// segment lengths below one key tile (1, 15), exactly one (64), one key past a 128-key tile (129), and
// with a partial tile and partial query block (100, 1000), and one query past the wgmma kernel's
// 192-query block (193: a second block whose last two warpgroups hold no live rows).
TEST(CudaVisionAttentionBf16, MatchesCpuSegmentAttention) {
    REQUIRE_GPU();
    const Shape shapes[] = {{1, 1, 1, 0},   {3, 15, 16, 0},  {1, 64, 1, 0},   {3, 100, 16, 0},
                            {2, 129, 3, 0}, {2, 193, 2, 0},  {1, 1000, 1, 0}, {3, 1000, 2, 0}};
    uint32_t seed = 100;
    for (int hd : {64, 72, 80, 128})
        for (Shape s : shapes) {
            s.head_dim = hd;
            expect_matches_cpu(s, seed++, 1.0f);
        }
}

// head_dim 72 at the tower's own sizes: a 448x448 image (784 patches, 16 heads; two segments, as a
// two-frame video would give) and a 1024x1024 one (4096 patches; two heads, to keep the CPU reference
// short), soft and sharp softmaxes.
TEST(CudaVisionAttentionBf16, TowerSizesMatchCpu) {
    REQUIRE_GPU();
    expect_matches_cpu({2, 784, 16, 72}, 1100, 1.0f);
    expect_matches_cpu({2, 784, 16, 72}, 1101, 3.0f);
    expect_matches_cpu({1, 4096, 2, 72}, 1102, 1.0f);
    expect_matches_cpu({1, 4096, 2, 72}, 1103, 3.0f);
}

// A known answer that says where a layout slip sends each query. Keys are random +-1 vectors and
// query i is 3 k_{pi(i)} for a random permutation pi of the segment: its scaled score with key pi(i)
// is 3 sqrt(head_dim) (25 at 72) against scores of sd 3 for the other 999 keys (at most ~12), so the
// softmax puts all but ~1e-6 of its weight on pi(i), and out_i = v_{pi(i)} to within that and the
// bf16 roundings (2^-8 of |v| each; P of the key itself is exactly 1). A K read with the wrong
// swizzle or transposed finds other keys, a V read so mixes dims, a P fragment in the wrong columns
// weighs the wrong values: each turns whole rows into other rows. The CPU comparison runs too.
void expect_each_query_finds_its_key(int hd) {
    {
        const Shape s{2, 1000, 3, hd};
        SCOPED_TRACE(::testing::Message() << "head_dim " << hd);
        const size_t hidden = size_t(s.heads) * hd;
        // Element d of head h's q (part 0), k (1) or v (2) of token t of segment seg.
        auto at = [&](int seg, int t, int part, int h, int d) {
            return (size_t(seg) * s.seg_len + t) * 3 * hidden + part * hidden + size_t(h) * hd + d;
        };
        auto qkv = random_qkv(s, 1200 + hd, 1.0f);
        std::mt19937 rng(1300 + hd);
        std::vector<std::vector<int>> pi(size_t(s.segments) * s.heads, std::vector<int>(s.seg_len));
        for (int seg = 0; seg < s.segments; ++seg)
            for (int h = 0; h < s.heads; ++h) {
                auto& p = pi[size_t(seg) * s.heads + h];
                for (int i = 0; i < s.seg_len; ++i) p[i] = i;
                std::shuffle(p.begin(), p.end(), rng);
                for (int j = 0; j < s.seg_len; ++j)
                    for (int d = 0; d < hd; ++d) qkv[at(seg, j, 1, h, d)] = float_to_bf16(rng() & 1 ? 1.0f : -1.0f);
                for (int i = 0; i < s.seg_len; ++i)
                    for (int d = 0; d < hd; ++d)
                        qkv[at(seg, i, 0, h, d)] = float_to_bf16(3.0f * bf16_to_float(qkv[at(seg, p[i], 1, h, d)]));
            }
        const auto got = run_gpu(s, qkv, default_scale(hd));
        size_t wrong = 0;
        std::string first;
        for (int seg = 0; seg < s.segments; ++seg)
            for (int h = 0; h < s.heads; ++h)
                for (int i = 0; i < s.seg_len; ++i) {
                    const int key = pi[size_t(seg) * s.heads + h][i];
                    for (int d = 0; d < hd; ++d) {
                        const float want = bf16_to_float(qkv[at(seg, key, 2, h, d)]);
                        const float g = got[(size_t(seg) * s.seg_len + i) * hidden + size_t(h) * hd + d];
                        if (!(std::fabs(g - want) <= 2 * kUnit * std::fabs(want) + 2e-3) && wrong++ == 0)
                            first = "segment " + std::to_string(seg) + " head " + std::to_string(h) + " query " +
                                    std::to_string(i) + " (its key " + std::to_string(key) + ") dim " +
                                    std::to_string(d) + ": " + std::to_string(g) + " vs " + std::to_string(want);
                    }
                }
        EXPECT_EQ(wrong, 0u) << "first: " << first;
        expect_matches_cpu(s, qkv);
    }
}

TEST(CudaVisionAttentionBf16, EachQueryFindsItsKey) {
    REQUIRE_GPU();
    for (int hd : {72, 64, 128}) expect_each_query_finds_its_key(hd);
}

// head_dim 64 and 72 have two tilings on Hopper: blocks of three consumer warpgroups (128-key S tiles)
// and of four (each 128-key tile as two 64-key S tiles, so stages are released after their second
// half, and a segment's last tile may have only one). The dispatcher takes four only where the waves
// favour them (the 1024x1024 tower), which the tests' shapes mostly do not, so each tiling is pinned
// here through the shapes above that cover its edges: segments shorter than a sub-tile, one key past a
// tile or a sub-tile, partial query blocks, and the permutation test for layout slips.
TEST(CudaVisionAttentionBf16, BothSmallHeadTilingsMatchCpu) {
    REQUIRE_GPU();
    if (!hopper()) GTEST_SKIP() << "the wgmma kernel runs on compute capability 9.0 only";
    const Shape shapes[] = {{1, 1, 1, 0},  {3, 15, 16, 0}, {1, 64, 1, 0},  {2, 65, 2, 0},  {3, 100, 16, 0},
                            {2, 129, 3, 0}, {2, 193, 2, 0}, {2, 257, 2, 0}, {3, 1000, 2, 0}};
    for (int warpgroups : {3, 4}) {
        const PinWarpgroups pin(warpgroups);
        uint32_t seed = 2000 + 100 * warpgroups;
        for (int hd : {64, 72}) {
            SCOPED_TRACE(::testing::Message() << warpgroups << " warpgroups");
            for (Shape s : shapes) {
                s.head_dim = hd;
                expect_matches_cpu(s, seed++, 1.0f);
                expect_matches_cpu(s, seed++, 3.0f);
            }
            expect_each_query_finds_its_key(hd);
        }
        SCOPED_TRACE(::testing::Message() << warpgroups << " warpgroups at the 1024x1024 tower's length");
        expect_matches_cpu({1, 4096, 2, 72}, seed++, 1.0f);
    }
}

// Peaked softmaxes: the row maximum moves between key tiles, so the running rescale of O and l is
// what keeps the result right.
TEST(CudaVisionAttentionBf16, SharpSoftmaxMatchesCpu) {
    REQUIRE_GPU();
    for (int hd : {56, 64, 72})
        for (int len : {200, 1000}) expect_matches_cpu({2, len, 4, hd}, 300 + hd + len, 3.0f);
}

// Scores that rise steadily along the keys, by `per_key` in log2 units: at 0.15 (~10 per 64-key
// tile) every tile raises the row maximum past the mma.sync kernel's lazy-rescale threshold (8), at
// 0.06 (~4) the maximum is left stale for a tile or two and then caught up (head_dim 56 runs there);
// the wgmma kernel (64, 72) rescales on every 128-key tile, by 2^-19 or 2^-7.7 each time. q = 1 and
// k_j = c j in every dim.
TEST(CudaVisionAttentionBf16, RisingScoresRescaleExactly) {
    REQUIRE_GPU();
    for (int hd : {56, 64, 72})
        for (double per_key : {0.06, 0.15}) {
            SCOPED_TRACE(::testing::Message() << "head_dim " << hd << ", rise per key " << per_key);
            const Shape s{1, 1000, 2, hd};
            auto qkv = random_qkv(s, 800 + hd, 1.0f);
            const size_t hidden = size_t(s.heads) * hd;
            const double c = per_key / (default_scale(hd) * 1.4426950408889634 * hd);
            for (int t = 0; t < s.seg_len; ++t)
                for (size_t i = 0; i < hidden; ++i) {
                    qkv[t * 3 * hidden + i] = float_to_bf16(1.0f);
                    qkv[t * 3 * hidden + hidden + i] = float_to_bf16(float(c * t));
                }
            expect_matches_cpu(s, qkv);
        }
}

// The mma.sync kernel's wide tiling (two m-tiles a warp): 300 tokens leave its second block with 44
// query rows, so one warp has a partial first m-tile and an empty second one; soft and sharp
// softmaxes. Head dims that the wgmma kernel does not take, on both sides of the tiling's switch at
// 80, with and without Q K^T's 8-wide last k-step; on full grids too for the wgmma head dims.
TEST(CudaVisionAttentionBf16, WideTilingOnFullGrids) {
    REQUIRE_GPU();
    for (int hd : {56, 64, 72, 80, 96, 120, 128}) {
        const int heads = 16, len = 300;
        expect_matches_cpu({full_grid_segments(len, heads), len, heads, hd}, 900 + hd, 1.0f);
        expect_matches_cpu({full_grid_segments(len, heads), len, heads, hd}, 950 + hd, 3.0f);
    }
}

// Every other supported head_dim (a multiple of 8 up to 128): odd and even counts of 8-wide output
// tiles, with and without Q K^T's 8-wide last k-step.
TEST(CudaVisionAttentionBf16, EveryHeadDim) {
    REQUIRE_GPU();
    for (int hd = 8; hd <= 128; hd += 8) expect_matches_cpu({2, 70, 2, hd}, 500 + hd, 1.0f);
}

// A segment's output depends on its own tokens only: changing every q, k and v of the middle segment
// leaves the outer two bit for bit the same (and does change the middle one).
TEST(CudaVisionAttentionBf16, SegmentsDoNotSeeEachOther) {
    REQUIRE_GPU();
    const Shape s{3, 100, 16, 72};
    const size_t row = size_t(3) * s.heads * s.head_dim, out_row = size_t(s.heads) * s.head_dim;
    auto qkv = random_qkv(s, 700, 1.0f);
    const float scale = default_scale(s.head_dim);
    const auto before = run_gpu(s, qkv, scale);
    const auto other = random_qkv(s, 701, 1.0f);
    std::copy(other.begin() + s.seg_len * row, other.begin() + 2 * s.seg_len * row, qkv.begin() + s.seg_len * row);
    const auto after = run_gpu(s, qkv, scale);
    for (int seg = 0; seg < 3; ++seg) {
        const size_t lo = seg * s.seg_len * out_row, hi = lo + s.seg_len * out_row;
        const bool same = std::memcmp(&before[lo], &after[lo], (hi - lo) * sizeof(float)) == 0;
        EXPECT_EQ(same, seg != 1) << "segment " << seg;
    }
}

// On Hopper the head dims of the Qwen3-VL towers must reach the wgmma kernel, or the tests above
// would check the mma.sync kernel twice and the wgmma one never.
TEST(CudaVisionAttentionBf16, HopperTakesTheWgmmaKernel) {
    REQUIRE_GPU();
    const bool on_hopper = hopper();
    for (int hd : {64, 72, 80, 128}) EXPECT_EQ(cuda::vision_attention_wgmma_applies(hd), on_hopper) << hd;
    for (int hd : {8, 56, 96, 120}) EXPECT_FALSE(cuda::vision_attention_wgmma_applies(hd)) << hd;
}

TEST(CudaVisionAttentionBf16, RejectsUnsupportedHeadDim) {
    REQUIRE_GPU();
    cuda::DeviceBuffer qkv(3 * 36 * 2 * 4), out(36 * 2 * 4);
    try {
        cuda::vision_attention_bf16(qkv.as<__nv_bfloat16>(), 1, 4, 1, 36, 0.1f, out.as<__nv_bfloat16>(), nullptr);
        ADD_FAILURE() << "head_dim 36 was accepted";
    } catch (const Error& e) {
        EXPECT_EQ(e.status(), Q3N_ERR_UNSUPPORTED) << e.what();
    }
}

// ---- The rotary's q half inside the attention ------------------------------------------------------

// The tower's flow on Hopper: a rotary table per frame, the k heads turned by a pass over memory and
// the q heads by the attention as they land (q_rope). Both halves use the rotary kernels' arithmetic
// on the same cos and sin, so against the separate pass (vision_rope_2d_bf16 on q and k, then the
// attention) everything is bit for bit equal: the k heads after the keys-only pass, the q heads left
// untouched by it, and the attention's output. Any slip in the shared-memory addressing of the turn
// (swizzle, the second column block of head_dim 72 and 80, rows of the wrong warpgroup, a missing
// proxy fence) changes outputs, and random inputs make every element distinct. Frames of 48, 480 and
// 4096 patches (the 1024x1024 tower's), two frames where the grid allows (the table is per frame);
// head_dim 64 and 72 with three and four consumer warpgroups pinned.
TEST(CudaVisionAttentionBf16, QTurnedInsideEqualsTheRotaryPass) {
    REQUIRE_GPU();
    if (!hopper()) GTEST_SKIP() << "only the wgmma kernel turns q (compute capability 9.0)";
    struct Grid {
        int t, h, w, heads;
    };
    const Grid grids[] = {{2, 6, 8, 3}, {1, 20, 24, 2}, {2, 10, 14, 5}, {1, 64, 64, 2}};
    uint32_t seed = 4100;
    for (int hd : {64, 72, 80, 128})
        for (int warpgroups : {0, 3, 4}) {
            if (warpgroups != 0 && hd > 72) continue;
            for (const Grid& g : grids) {
                SCOPED_TRACE(::testing::Message() << "head_dim " << hd << ", grid " << g.t << "x" << g.h << "x" << g.w
                                                  << ", warpgroups " << warpgroups);
                const int frame = g.h * g.w, n = g.t * frame, hidden = g.heads * hd;
                const Shape s{g.t, frame, g.heads, hd};
                const auto qkv = random_qkv(s, seed++, 1.0f);
                std::vector<float> inv(hd / 4);
                for (int i = 0; i < hd / 4; ++i) inv[i] = float(1.0 / std::pow(10000.0, (2.0 * i) / (hd / 2)));
                const auto d_inv = to_device(inv);
                const float scale = default_scale(hd);
                const size_t out_n = size_t(n) * hidden;
                auto attend = [&](const cuda::DeviceBuffer& d, const cuda::VisionRopeTable* q_rope) {
                    const auto d_out = to_device(std::vector<uint16_t>(out_n, 0x7fc0));
                    cuda::vision_attention_bf16_wgmma(d.as<__nv_bfloat16>(), g.t, frame, g.heads, hd, scale,
                                                      d_out.as<__nv_bfloat16>(), nullptr, warpgroups, q_rope);
                    Q3N_CUDA(cudaGetLastError());
                    return to_host<uint16_t>(d_out, out_n);
                };
                // The separate pass.
                const auto d_sep = to_device(qkv);
                cuda::vision_rope_2d_bf16(d_sep.as<__nv_bfloat16>(), n, g.heads, hd, g.h, g.w, 2, d_inv.as<float>(), nullptr);
                const auto sep_qkv = to_host<uint16_t>(d_sep, qkv.size());
                const auto want = attend(d_sep, nullptr);
                // The table, k only, q in the attention.
                cuda::DeviceBuffer table(cuda::vision_rope_table_entries(g.h, g.w, hd) * sizeof(float2));
                cuda::vision_rope_table(table.as<float2>(), g.h, g.w, hd, d_inv.as<float>(), nullptr);
                cuda::VisionRopeTable rope;
                rope.cs = table.as<float2>();
                rope.h = g.h;
                rope.w = g.w;
                rope.merge = 2;
                const auto d_fused = to_device(qkv);
                cuda::vision_rope_2d_bf16_keys(d_fused.as<__nv_bfloat16>(), n, g.heads, hd, rope, nullptr);
                const auto fused_qkv = to_host<uint16_t>(d_fused, qkv.size());
                size_t q_changed = 0, k_differs = 0, v_changed = 0;
                for (int t = 0; t < n; ++t)
                    for (int j = 0; j < hidden; ++j) {
                        const size_t at = size_t(t) * 3 * hidden + j;
                        q_changed += fused_qkv[at] != qkv[at];
                        k_differs += fused_qkv[at + hidden] != sep_qkv[at + hidden];
                        v_changed += fused_qkv[at + 2 * hidden] != qkv[at + 2 * hidden];
                    }
                EXPECT_EQ(q_changed, 0u);
                EXPECT_EQ(k_differs, 0u);
                EXPECT_EQ(v_changed, 0u);
                const auto got = attend(d_fused, &rope);
                size_t unequal = 0;
                for (size_t i = 0; i < out_n; ++i) unequal += got[i] != want[i];
                EXPECT_EQ(unequal, 0u) << "of " << out_n;
                // The turn matters: without it (q unturned, no table) the outputs move.
                if (g.h == 20 && warpgroups == 0) {
                    const auto unturned = attend(d_fused, nullptr);
                    size_t moved = 0;
                    for (size_t i = 0; i < out_n; ++i) moved += unturned[i] != want[i];
                    EXPECT_GT(moved * 2, out_n);
                }
            }
        }
}
