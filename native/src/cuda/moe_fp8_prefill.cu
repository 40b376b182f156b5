// The FP8 experts at prefill sizes: grouped GEMMs on tensor cores over tiles of up to 64 rows of one
// expert, so each weight byte is read once per 64 rows (the decode kernels read it once per 8).
//
// A plan kernel lists the tiles (expert, first permuted row, rows): each active expert's rows cut in
// 64s, then the shared expert's tokens. The GEMM grid is (weight-row tiles, an upper bound on the
// tiles known from the token count); blocks past the plan's count exit, so nothing waits for the
// routing on the host.
//
// Block: 128 weight rows (gate/up: 64 of each for the same outputs, so SwiGLU happens in registers;
// down: 128 rows, one scale block) x 64 activation rows, K in 128-wide stages (one scale group each)
// through a 3-deep cp.async pipeline. 8 warps as 4 (weight rows) x 2 (activation rows); a warp holds
// two m16 tiles x four n8 tiles. Per stage, every lane converts its 16-byte weight pieces to f16 once
// (linear_fp8_mma.cu's integer trick) and reuses them for its four column tiles; products are exact
// and the stage's sums are scaled by the activation's and the weight block's scales (spec 5.4).
// Activations are quantize_fp8's values stored as f16 (moe_quantize_rows.cu), gathered by token.
//
// Shared memory swizzles like moe_fp8_decode.cu: weight rows swap 64-byte halves on odd rows,
// activation rows swap adjacent 16-byte pieces, so fragment loads are free of bank conflicts.
#include <algorithm>

#include "core/error.h"
#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/moe_common.cuh"
#include "cuda/moe_internal.h"

namespace q3n::cuda::moe {
namespace {

constexpr int kThreads = 256;
constexpr int kBM = 64;         // activation rows per tile
constexpr int kBK = 128;        // K per stage: one scale group
constexpr int kStages = 3;
constexpr int kARows = 128;     // weight rows per block
constexpr int kMaxGroups = 64;  // K <= 8192
constexpr size_t kAStage = size_t{kARows} * kBK;   // e4m3 bytes
constexpr size_t kBStage = size_t{kBM} * kBK * 2;  // f16

struct Params {
    Dims d;
    const DeviceMoeExpert* experts;
    const int32_t* plan;  // [0] = tiles; tiles from plan + 4 as int4 {expert, first row, rows, 0}
    const int32_t* order;
    const __half* act_q;
    const float* act_s;
    int act_ld, act_sld;
    float* out;
    int out_ld;
    int gmax;  // scale groups of the longest K: row stride of the scale tables in shared memory
};

size_t smem_bytes(int gmax) {
    return kStages * (kAStage + kBStage) + kBM * sizeof(int) + (2 + kBM) * static_cast<size_t>(gmax) * sizeof(float);
}

__global__ void __launch_bounds__(1024) plan_kernel(Dims d, const int32_t* offsets, const int32_t* active, int32_t* plan) {
    __shared__ int tmp[64];
    pdl_wait();
    pdl_launch_dependents();
    int4* tiles = reinterpret_cast<int4*>(plan + 4);
    const int used = active[0];
    int at = 0;
    for (int base = 0; base < used; base += blockDim.x) {
        const int i = base + threadIdx.x;
        int e = 0, first = 0, count = 0;
        if (i < used) {
            e = active[1 + i];
            first = offsets[e];
            count = offsets[e + 1] - first;
        }
        const int mine = (count + kBM - 1) / kBM;
        int before = mine, unused = 0, total = 0, unused_total = 0;
        block_scan2(before, unused, total, unused_total, tmp);
        for (int j = 0; j < mine; ++j)
            tiles[at + before + j] = make_int4(e, first + j * kBM, min(kBM, count - j * kBM), 0);
        at += total;
    }
    if (d.shared)
        for (int j = threadIdx.x; j * kBM < d.tokens; j += blockDim.x)
            tiles[at + j] = make_int4(d.E, d.routed_rows + j * kBM, min(kBM, d.tokens - j * kBM), 0);
    if (threadIdx.x == 0) plan[0] = at + (d.shared ? (d.tokens + kBM - 1) / kBM : 0);
}

template <bool kGateUp>
__global__ void __launch_bounds__(kThreads, 2) expert_gemm(Params P) {
    constexpr int kTileN = kGateUp ? kARows / 2 : kARows;  // outputs per block
    extern __shared__ __align__(16) unsigned char smem[];
    unsigned char* As = smem;
    unsigned char* Bs = smem + kStages * kAStage;
    int* s_arow = reinterpret_cast<int*>(Bs + kStages * kBStage);  // activation row of each tile row, -1 past the end
    float* s_sw = reinterpret_cast<float*>(s_arow + kBM);          // [2][gmax] weight scales * 256
    float* s_sa = s_sw + 2 * P.gmax;                               // [kBM][gmax] activation scales
    pdl_wait();
    pdl_launch_dependents();
    if (static_cast<int>(blockIdx.y) >= P.plan[0]) return;
    const int4 tile = reinterpret_cast<const int4*>(P.plan + 4)[blockIdx.y];
    const int row0 = tile.y, rows = tile.z;
    const DeviceMoeExpert& ex = P.experts[tile.x];
    const DeviceLinear& a = kGateUp ? ex.gate : ex.down;
    const int N = a.out, K = a.in, G = (K + kBK - 1) / kBK, scale_cols = a.scale_cols;
    const int n0 = blockIdx.x * kTileN;
    if (n0 >= N) return;
    const uint8_t* w0 = static_cast<const uint8_t*>(a.data);
    const uint8_t* w1 = kGateUp ? static_cast<const uint8_t*>(ex.up.data) : w0;
    const float* sc1 = kGateUp ? ex.up.scales : a.scales;
    const int tid = threadIdx.x;

    if (tid < kBM) s_arow[tid] = tid < rows ? (kGateUp ? token_of_row(P.d, P.order, row0 + tid) : row0 + tid) : -1;
    for (int i = tid; i < 2 * G; i += kThreads) {
        const int m = i / G, g = i - m * G;
        s_sw[m * P.gmax + g] = (m ? sc1 : a.scales)[(n0 >> 7) * scale_cols + g] * 256.0f;  // f16 weights = e4m3 * 2^-8
    }
    __syncthreads();
    for (int i = tid; i < kBM * G; i += kThreads) {
        const int c = i / G, g = i - c * G, r = s_arow[c];
        s_sa[c * P.gmax + g] = r >= 0 ? P.act_s[static_cast<size_t>(r) * P.act_sld + g] : 0.0f;
    }

    auto load_stage = [&](int buf, int g) {
        unsigned char* as = As + buf * kAStage;
#pragma unroll
        for (int u = 0; u < kARows * kBK / 16 / kThreads; ++u) {
            const int idx = tid + u * kThreads, r = idx >> 3, c = idx & 7;
            const int n = n0 + (kGateUp ? (r & (kTileN - 1)) : r), k = g * kBK + c * 16;
            const bool ok = n < N && k < K;
            const uint8_t* base = kGateUp && r >= kTileN ? w1 : w0;
            cp_async16(as + r * kBK + ((c ^ ((r & 1) << 2)) << 4), ok ? base + static_cast<size_t>(n) * K + k : base, ok);
        }
        unsigned char* bs = Bs + buf * kBStage;
#pragma unroll
        for (int u = 0; u < kBM * kBK * 2 / 16 / kThreads; ++u) {
            const int idx = tid + u * kThreads, r = idx >> 4, c = idx & 15;
            const int ar = s_arow[r], k = g * kBK + c * 8;
            const bool ok = ar >= 0 && k < K;
            cp_async16(bs + r * (kBK * 2) + ((c ^ (r & 1)) << 4),
                       ok ? P.act_q + static_cast<size_t>(ar) * P.act_ld + k : P.act_q, ok);
        }
    };

    const int warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tig = lane & 3, wn = warp & 3, wm = warp >> 2;
    // The warp's two m16 tiles (shared-memory rows): gate and up of the same outputs, or two of down.
    const int rb[2] = {kGateUp ? 16 * wn : 32 * wn, kGateUp ? kTileN + 16 * wn : 32 * wn + 16};
    float acc[2][4][4];
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[t][nt][i] = 0.0f;

#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < G) load_stage(s, s);
        cp_async_commit();
    }
    for (int g = 0; g < G; ++g) {
        cp_async_wait<kStages - 2>();
        __syncthreads();  // stage g is in for every thread; stage g - 1's buffer is free
        if (g + kStages - 1 < G) load_stage((g + kStages - 1) % kStages, g + kStages - 1);
        cp_async_commit();
        const unsigned char* as = As + (g % kStages) * kAStage;
        const unsigned char* bs = Bs + (g % kStages) * kBStage;
        float part[2][4][4];
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) part[t][nt][i] = 0.0f;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            uint32_t f[2][4][4];
#pragma unroll
            for (int t = 0; t < 2; ++t) {
                const int r = rb[t] + gid, off = ((h * 4 + tig) ^ ((r & 1) << 2)) << 4;  // rows r, r + 8: same parity
                a_fragments(*reinterpret_cast<const uint4*>(as + r * kBK + off),
                            *reinterpret_cast<const uint4*>(as + (r + 8) * kBK + off), f[t]);
            }
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const int c = 32 * wm + 8 * nt + gid, q = 8 * h + 2 * tig;  // q: the lane's first 16-byte piece
                const unsigned char* row = bs + c * (kBK * 2);
                uint32_t b[4][2];
                b_fragments(*reinterpret_cast<const uint4*>(row + ((q ^ (c & 1)) << 4)),
                            *reinterpret_cast<const uint4*>(row + (((q + 1) ^ (c & 1)) << 4)), b);
                mma_piece(part[0][nt], f[0], b);
                mma_piece(part[1][nt], f[1], b);
            }
        }
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const int c = 32 * wm + 8 * nt + 2 * tig;
            const float sa0 = s_sa[c * P.gmax + g], sa1 = s_sa[(c + 1) * P.gmax + g];
#pragma unroll
            for (int t = 0; t < 2; ++t) {
                const float sw = s_sw[(kGateUp ? t : 0) * P.gmax + g];
                acc[t][nt][0] += part[t][nt][0] * sa0 * sw;
                acc[t][nt][1] += part[t][nt][1] * sa1 * sw;
                acc[t][nt][2] += part[t][nt][2] * sa0 * sw;
                acc[t][nt][3] += part[t][nt][3] * sa1 * sw;
            }
        }
    }
    cp_async_wait<0>();

    // C fragment i: row gid (+8 for i >= 2), column 2 tig (+1 for odd i).
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int col = 32 * wm + 8 * nt + 2 * tig + (i & 1);
            if (col >= rows) continue;
            float* o = P.out + static_cast<size_t>(row0 + col) * P.out_ld;
            if constexpr (kGateUp) {
                const int n = n0 + 16 * wn + gid + (i >> 1) * 8;
                if (n < N) o[n] = silu_mul(acc[0][nt][i], acc[1][nt][i]);
            } else {
#pragma unroll
                for (int t = 0; t < 2; ++t) {
                    const int n = n0 + 32 * wn + 16 * t + gid + (i >> 1) * 8;
                    if (n < N) o[n] = acc[t][nt][i];
                }
            }
        }
}

// Tiles the plan can hold: sum over experts of ceil(rows / 64) <= assignments / 64 + experts used.
int max_tiles(const DeviceMoe& m, int tokens) {
    const long n = static_cast<long>(tokens) * m.top_k;
    return static_cast<int>(n / kBM + std::min<long>(m.num_experts, n) + 1 +
                            (m.has_shared ? (tokens + kBM - 1) / kBM : 0));
}

template <bool kGateUp>
void launch_gemm(const Params& P, int tiles_n, int tiles, cudaStream_t stream) {
    const size_t smem = smem_bytes(P.gmax);
    allow_shared_memory(reinterpret_cast<const void*>(expert_gemm<kGateUp>), smem);
    Q3N_CUDA(launch_pdl(expert_gemm<kGateUp>, dim3(tiles_n, tiles), dim3(kThreads), smem, stream, P));
}

}  // namespace

bool fp8_prefill_applicable(const DeviceMoe& m) {
    const int inter = m.has_shared ? std::max(m.inter, m.shared_inter) : m.inter;
    return m.type == WeightType::FP8_E4M3 && m.hidden % 16 == 0 && m.inter % 16 == 0 &&
           (!m.has_shared || m.shared_inter % 16 == 0) && (m.hidden + kBK - 1) / kBK <= kMaxGroups &&
           (inter + kBK - 1) / kBK <= kMaxGroups;
}

size_t fp8_prefill_plan_bytes(const DeviceMoe& m, int tokens) { return 16 + 16 * static_cast<size_t>(max_tiles(m, tokens)); }

void fp8_prefill(const float* x, const DeviceMoe& m, const Dims& d, const MoeRouting& r, const Workspace& w,
                 cudaStream_t stream) {
    const int T = d.tokens, H = d.hidden, hg = (H + kBK - 1) / kBK, wg = (d.width + kBK - 1) / kBK;
    const int tiles = max_tiles(m, T);
    require(tiles <= 65535, Q3N_ERR_INTERNAL, "moe: too many tokens for one prefill launch");
    quantize_rows_f16(x, T, T, H, H, H, static_cast<__half*>(w.xq), w.xs, hg, stream);
    Q3N_CUDA(launch_pdl(plan_kernel, dim3(1), dim3(1024), 0, stream, d, r.offsets, r.active, w.plan));

    Params P{};
    P.d = d;
    P.experts = m.experts;
    P.plan = w.plan;
    P.order = r.order;
    P.act_q = static_cast<const __half*>(w.xq);
    P.act_s = w.xs;
    P.act_ld = H;
    P.act_sld = hg;
    P.out = w.h;
    P.out_ld = d.width;
    P.gmax = hg;
    launch_gemm<true>(P, (d.width + kARows / 2 - 1) / (kARows / 2), tiles, stream);

    const int rows = d.routed_rows + (d.shared ? T : 0);
    quantize_rows_f16(w.h, rows, d.routed_rows, m.inter, m.shared_inter, d.width, static_cast<__half*>(w.hq), w.hs, wg,
                      stream);
    P.act_q = static_cast<const __half*>(w.hq);
    P.act_s = w.hs;
    P.act_ld = d.width;
    P.act_sld = wg;
    P.out = w.o;
    P.out_ld = H;
    P.gmax = wg;
    launch_gemm<false>(P, (H + kARows - 1) / kARows, tiles, stream);
}

}  // namespace q3n::cuda::moe
