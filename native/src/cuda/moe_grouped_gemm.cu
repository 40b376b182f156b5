// The routed experts (and Qwen3-Next's shared expert) of one MoE block, all sized from host-known
// bounds so nothing waits for the routing to reach the host, then moe_unpermute.cu's weighted sum.
//
// FP8 experts whose widths are multiples of 16 run on tensor cores: moe_fp8_decode.cu up to
// kFp8DecodeMaxTokens tokens (weight-streaming GEMVs over all (expert, row tile) pairs),
// moe_fp8_prefill.cu past that (tiled grouped GEMMs). Everything else (BF16, odd widths) takes the
// CUDA-core path below.
//
// CUDA-core path. Grid: x = a tile of 8 output rows (a warp each, streaming one weight row as
// linear.cu's GEMV does), y = a slot in the list of experts that got tokens (moe_route's `active`),
// plus one slot for the shared expert, which takes every token. The grid has min(E, tokens * k)
// routed slots; the slots past the number of active experts exit at once, so an expert nobody chose
// costs nothing but that. A warp walks its expert's rows (a few at decode) 4 at a time, so each
// weight row is read from memory once per 4 rows and the weights of one expert are streamed once at
// batch 1. FP8 follows spec 5.3-5.4 like linear.cu: activations quantised per token per 128 channels
// (quantize_fp8, once per token, not per copy of the token), per-group partial sums scaled by the
// activation and the block weight scale. The SwiGLU output is written in permuted row order with
// stride max(I_e, I_shared), zeros past an expert's width so its 128-groups quantise as a row of I.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/moe_internal.h"
#include "cuda/next_ops.h"

namespace q3n::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kRowsPerPass = 4;
constexpr int kMaxTopK = 64;

using moe::Dims;
using moe::token_of_row;

// The rows one grid slot works on: expert e owns permuted rows first .. first + count.
struct Slot {
    int e, first, count;
};

__device__ __forceinline__ bool resolve_slot(const Dims& d, const int32_t* offsets, const int32_t* active, Slot& s) {
    const int slot = blockIdx.y;
    if (d.shared && slot == static_cast<int>(gridDim.y) - 1) {
        s = {d.E, d.routed_rows, d.tokens};
        return true;
    }
    if (slot >= active[0]) return false;
    s.e = active[1 + slot];
    s.first = offsets[s.e];
    s.count = offsets[s.e + 1] - s.first;
    return s.count > 0;
}

__device__ __forceinline__ void unpack_bf16x8(const uint4& raw, float* w) {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        w[2 * i] = __uint_as_float(words[i] << 16);
        w[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ void unpack_e4m3x16(const uint4& raw, float* w) {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int b = 0; b < 4; ++b) w[4 * i + b] = e4m3_to_float((words[i] >> (8 * b)) & 0xffu);
}

// Up to kRowsPerPass activation rows (FP8: quantised values and their per-group scales).
struct Acts {
    const float* a[kRowsPerPass];
    const float* s[kRowsPerPass];
    int rows;
};

// acc[r] = this lane's share of weight row n . act row r; the caller sums over the warp.
template <WeightType kType, bool kVector>
__device__ __forceinline__ void row_dot(const DeviceLinear& W, int n, const Acts& x, float (&acc)[kRowsPerPass]) {
    const int lane = threadIdx.x & 31, K = W.in;
#pragma unroll
    for (int r = 0; r < kRowsPerPass; ++r) acc[r] = 0.0f;
    if constexpr (kType == WeightType::BF16) {
        const uint16_t* w = static_cast<const uint16_t*>(W.data) + static_cast<size_t>(n) * K;
        if constexpr (kVector) {
            for (int k = lane * 8; k < K; k += 256) {
                float wf[8];
                unpack_bf16x8(*reinterpret_cast<const uint4*>(w + k), wf);
#pragma unroll
                for (int r = 0; r < kRowsPerPass; ++r) {
                    if (r >= x.rows) break;
                    const float4* xr = reinterpret_cast<const float4*>(x.a[r] + k);
                    const float4 a = xr[0], b = xr[1];
                    acc[r] += a.x * wf[0] + a.y * wf[1] + a.z * wf[2] + a.w * wf[3] + b.x * wf[4] + b.y * wf[5] +
                              b.z * wf[6] + b.w * wf[7];
                }
            }
        } else {
            for (int k = lane; k < K; k += 32) {
                const float wk = bf16_bits_to_float(w[k]);
#pragma unroll
                for (int r = 0; r < kRowsPerPass; ++r)
                    if (r < x.rows) acc[r] += x.a[r][k] * wk;
            }
        }
    } else {
        const uint8_t* w = static_cast<const uint8_t*>(W.data) + static_cast<size_t>(n) * K;
        const float* ws = W.scales + static_cast<size_t>(n / 128) * W.scale_cols;
        if constexpr (kVector) {
            for (int k = lane * 16; k < K; k += 512) {
                float wf[16];
                unpack_e4m3x16(*reinterpret_cast<const uint4*>(w + k), wf);
                const int g = k / 128;
                const float wscale = ws[g];
#pragma unroll
                for (int r = 0; r < kRowsPerPass; ++r) {
                    if (r >= x.rows) break;
                    const float4* qr = reinterpret_cast<const float4*>(x.a[r] + k);
                    float part = 0.0f;
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const float4 a = qr[j];
                        part += a.x * wf[4 * j] + a.y * wf[4 * j + 1] + a.z * wf[4 * j + 2] + a.w * wf[4 * j + 3];
                    }
                    acc[r] += part * x.s[r][g] * wscale;
                }
            }
        } else {
            for (int k = lane; k < K; k += 32) {
                const float wk = e4m3_to_float(w[k]) * ws[k / 128];
#pragma unroll
                for (int r = 0; r < kRowsPerPass; ++r)
                    if (r < x.rows) acc[r] += x.a[r][k] * x.s[r][k / 128] * wk;
            }
        }
    }
}

// h[p, n] = silu(x_t . gate_n) * (x_t . up_n) for every row p of the slot's expert (t = p's token).
// x is the fp32 input (BF16) or its quantisation with xs the group scales (FP8).
template <WeightType kType, bool kVector>
__global__ void __launch_bounds__(kWarps * 32)
    gate_up_kernel(const float* x, const float* xs, Dims d, const DeviceMoeExpert* experts, const int32_t* offsets,
                   const int32_t* order, const int32_t* active, float* h) {
    Slot s;
    if (!resolve_slot(d, offsets, active, s)) return;
    const int n = blockIdx.x * kWarps + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (n >= d.width) return;
    const DeviceMoeExpert& ex = experts[s.e];
    const int groups = (d.hidden + 127) / 128;
    if (n >= ex.gate.out) {
        for (int r = lane; r < s.count; r += 32) h[static_cast<size_t>(s.first + r) * d.width + n] = 0.0f;
        return;
    }
    for (int m0 = 0; m0 < s.count; m0 += kRowsPerPass) {
        Acts a;
        a.rows = min(kRowsPerPass, s.count - m0);
#pragma unroll
        for (int r = 0; r < kRowsPerPass; ++r) {
            const int t = r < a.rows ? token_of_row(d, order, s.first + m0 + r) : 0;
            a.a[r] = x + static_cast<size_t>(t) * d.hidden;
            a.s[r] = xs ? xs + static_cast<size_t>(t) * groups : nullptr;
        }
        float g[kRowsPerPass], u[kRowsPerPass];
        row_dot<kType, kVector>(ex.gate, n, a, g);
        row_dot<kType, kVector>(ex.up, n, a, u);
#pragma unroll
        for (int r = 0; r < kRowsPerPass; ++r) {
            const float gs = warp_sum(g[r]), us = warp_sum(u[r]);
            if (lane == 0 && r < a.rows)
                h[static_cast<size_t>(s.first + m0 + r) * d.width + n] = gs / (1.0f + expf(-gs)) * us;
        }
    }
}

// o[p, n] = h_p . down_n for every row p of the slot's expert; h is fp32 (BF16) or quantised (FP8).
template <WeightType kType, bool kVector>
__global__ void __launch_bounds__(kWarps * 32)
    down_kernel(const float* h, const float* hs, Dims d, const DeviceMoeExpert* experts, const int32_t* offsets,
                const int32_t* active, float* o) {
    Slot s;
    if (!resolve_slot(d, offsets, active, s)) return;
    const int n = blockIdx.x * kWarps + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (n >= d.hidden) return;
    const DeviceMoeExpert& ex = experts[s.e];
    const int groups = (d.width + 127) / 128;
    for (int m0 = 0; m0 < s.count; m0 += kRowsPerPass) {
        Acts a;
        a.rows = min(kRowsPerPass, s.count - m0);
#pragma unroll
        for (int r = 0; r < kRowsPerPass; ++r) {
            const size_t p = static_cast<size_t>(s.first + m0 + min(r, a.rows - 1));
            a.a[r] = h + p * d.width;
            a.s[r] = hs ? hs + p * groups : nullptr;
        }
        float acc[kRowsPerPass];
        row_dot<kType, kVector>(ex.down, n, a, acc);
#pragma unroll
        for (int r = 0; r < kRowsPerPass; ++r) {
            const float v = warp_sum(acc[r]);
            if (lane == 0 && r < a.rows) o[static_cast<size_t>(s.first + m0 + r) * d.hidden + n] = v;
        }
    }
}

constexpr size_t align256(size_t b) { return (b + 255) & ~size_t{255}; }

int width_of(const DeviceMoe& m) { return m.has_shared ? std::max(m.inter, m.shared_inter) : m.inter; }

// Carves the workspace (or, with base == nullptr, measures it): one layout for every path, the
// activation buffers sized for fp32 (the f16 paths use half of them). Sizes grow with the token
// count, so a workspace sized for T tokens serves any fewer.
size_t carve(const DeviceMoe& m, int tokens, void* base, moe::Workspace* w) {
    const size_t T = tokens, rows = T * m.top_k + (m.has_shared ? T : 0), H = m.hidden, I = width_of(m);
    const size_t sizes[8] = {T * H * 4,
                             T * ((H + 127) / 128) * 4,
                             rows * I * 4,
                             rows * I * 4,
                             rows * ((I + 127) / 128) * 4,
                             rows * H * 4,
                             moe::fp8_prefill_plan_bytes(m, tokens),
                             moe::fp8_decode_scratch_bytes(m, tokens)};
    void* ptrs[8];
    size_t at = 0;
    for (int i = 0; i < 8; ++i) {
        ptrs[i] = base ? static_cast<char*>(base) + at : nullptr;
        at += align256(sizes[i]);
    }
    if (w)
        *w = {ptrs[0],
              static_cast<float*>(ptrs[1]),
              static_cast<float*>(ptrs[2]),
              ptrs[3],
              static_cast<float*>(ptrs[4]),
              static_cast<float*>(ptrs[5]),
              static_cast<int32_t*>(ptrs[6]),
              static_cast<int32_t*>(ptrs[7])};
    return at;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <WeightType kType, bool kVector>
void launch_cuda_cores(const float* x, const DeviceMoe& m, const Dims& d, const MoeRouting& r, const moe::Workspace& w,
                       cudaStream_t stream) {
    const int tokens = d.tokens, slots = std::min(m.num_experts, d.routed_rows) + (m.has_shared ? 1 : 0);
    constexpr bool fp8 = kType == WeightType::FP8_E4M3;
    float* xq = static_cast<float*>(w.xq);
    float* hq = static_cast<float*>(w.hq);
    if (fp8) quantize_fp8(x, tokens, m.hidden, xq, w.xs, stream);
    gate_up_kernel<kType, kVector><<<dim3((d.width + kWarps - 1) / kWarps, slots), kWarps * 32, 0, stream>>>(
        fp8 ? xq : x, fp8 ? w.xs : nullptr, d, m.experts, r.offsets, r.order, r.active, w.h);
    Q3N_CUDA_LAUNCHED("moe gate_up");
    const int rows = d.routed_rows + (m.has_shared ? tokens : 0);
    if (fp8) quantize_fp8(w.h, rows, d.width, hq, w.hs, stream);
    down_kernel<kType, kVector><<<dim3((m.hidden + kWarps - 1) / kWarps, slots), kWarps * 32, 0, stream>>>(
        fp8 ? hq : w.h, fp8 ? w.hs : nullptr, d, m.experts, r.offsets, r.active, w.o);
    Q3N_CUDA_LAUNCHED("moe down");
}

}  // namespace

size_t moe_workspace_bytes(const DeviceMoe& moe, int tokens) { return carve(moe, tokens, nullptr, nullptr); }

namespace {

void require_block_shape(const DeviceMoe& moe, const float* shared_gate_logits, int shared_gate_ld) {
    require(moe.num_experts > 0 && moe.top_k >= 1 && moe.top_k <= std::min(moe.num_experts, kMaxTopK) &&
                moe.hidden > 0 && moe.inter > 0 &&
                (!moe.has_shared || (moe.shared_inter > 0 && shared_gate_logits && shared_gate_ld >= 1)),
            Q3N_ERR_INTERNAL, "moe_experts: bad block shape (top_k in [1, min(E, 64)], shared gate given)");
    require(moe.type == WeightType::BF16 || moe.type == WeightType::FP8_E4M3, Q3N_ERR_INTERNAL,
            "moe_experts: experts must be BF16 or FP8");
}

}  // namespace

void moe_experts(const float* x, int tokens, const DeviceMoe& moe, const MoeRouting& routing,
                 const float* shared_gate_logits, float* y, void* workspace, cudaStream_t stream, int shared_gate_ld) {
    require_block_shape(moe, shared_gate_logits, shared_gate_ld);
    if (tokens == 0) return;
    moe::Workspace w;
    carve(moe, tokens, workspace, &w);
    const Dims d{moe.num_experts, moe.top_k, tokens, tokens * moe.top_k, width_of(moe), moe.hidden, moe.has_shared};
    if (moe::fp8_decode_applicable(moe) && tokens <= moe::kFp8DecodeMaxTokens) {
        moe::fp8_decode(x, moe, d, routing, shared_gate_logits, shared_gate_ld, y, w, stream);  // sums into y itself
        return;
    }
    if (moe::fp8_prefill_applicable(moe)) {
        moe::fp8_prefill(x, moe, d, routing, w, stream);
    } else {
        const bool vec = moe.hidden % 16 == 0 && moe.inter % 16 == 0 && (!moe.has_shared || moe.shared_inter % 16 == 0) &&
                         aligned16(x) && aligned16(workspace);
        if (moe.type == WeightType::BF16) {
            if (vec)
                launch_cuda_cores<WeightType::BF16, true>(x, moe, d, routing, w, stream);
            else
                launch_cuda_cores<WeightType::BF16, false>(x, moe, d, routing, w, stream);
        } else {
            if (vec)
                launch_cuda_cores<WeightType::FP8_E4M3, true>(x, moe, d, routing, w, stream);
            else
                launch_cuda_cores<WeightType::FP8_E4M3, false>(x, moe, d, routing, w, stream);
        }
    }
    moe::unpermute(w.o, d, routing, shared_gate_logits, shared_gate_ld, y, stream);
}

bool moe_forward_fusable(const DeviceMoe& moe, int tokens) { return moe::fused_decode_applicable(moe, tokens); }

void moe_forward_fused(const float* logits, int logits_ld, int tokens, const DeviceMoe& moe, bool renormalize,
                       const float* x, const float* shared_gate_logits, float* y, void* workspace, cudaStream_t stream,
                       int shared_gate_ld) {
    require(moe_forward_fusable(moe, tokens), Q3N_ERR_INTERNAL, "moe_forward_fused: block or token count not fusable");
    require_block_shape(moe, shared_gate_logits, shared_gate_ld);
    const int ld = logits_ld == 0 ? moe.num_experts : logits_ld;
    require(ld >= moe.num_experts, Q3N_ERR_INTERNAL, "moe_forward_fused: logits row stride below num_experts");
    moe::Workspace w;
    carve(moe, tokens, workspace, &w);
    const Dims d{moe.num_experts, moe.top_k, tokens, tokens * moe.top_k, width_of(moe), moe.hidden, moe.has_shared};
    moe::fused_decode(logits, ld, x, moe, d, renormalize, shared_gate_logits, shared_gate_ld, y, w, stream);
}

namespace {

// Q3N_MOE_FUSED=1 lets moe_forward take the fused launch (off by default: slower so far, see
// moe_fp8_decode_fused.cu).
bool fused_by_default() {
    static const bool on = [] {
        const char* env = std::getenv("Q3N_MOE_FUSED");
        return env && std::strcmp(env, "1") == 0;
    }();
    return on;
}

}  // namespace

void moe_forward(const float* logits, int logits_ld, int tokens, const DeviceMoe& moe, bool renormalize,
                 const MoeRouting& routing, const float* x, const float* shared_gate_logits, float* y, void* workspace,
                 cudaStream_t stream, int shared_gate_ld) {
    if (fused_by_default() && moe_forward_fusable(moe, tokens)) {
        moe_forward_fused(logits, logits_ld, tokens, moe, renormalize, x, shared_gate_logits, y, workspace, stream,
                          shared_gate_ld);
        return;
    }
    moe_route(logits, tokens, moe.num_experts, moe.top_k, renormalize, routing, stream, logits_ld);
    moe_experts(x, tokens, moe, routing, shared_gate_logits, y, workspace, stream, shared_gate_ld);
}

}  // namespace q3n::cuda
