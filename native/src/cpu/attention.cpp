#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/ops.h"
#include "cpu/simd.h"

namespace q3n::cpu {
namespace {

Q3N_MULTIVERSION
float dot_row(const float* q, const void* k, KvDtype dtype, size_t n) {
    float s = 0.0f;
    if (dtype == KvDtype::F32) {
        const float* kf = static_cast<const float*>(k);
#pragma omp simd reduction(+ : s)
        for (size_t i = 0; i < n; ++i) s += q[i] * kf[i];
    } else {
        const uint16_t* kb = static_cast<const uint16_t*>(k);
#pragma omp simd reduction(+ : s)
        for (size_t i = 0; i < n; ++i) s += q[i] * widen_bf16(kb[i]);
    }
    return s;
}

Q3N_MULTIVERSION
void axpy_row(float* out, float a, const void* v, KvDtype dtype, size_t n) {
    if (dtype == KvDtype::F32) {
        const float* vf = static_cast<const float*>(v);
#pragma omp simd
        for (size_t i = 0; i < n; ++i) out[i] += a * vf[i];
    } else {
        const uint16_t* vb = static_cast<const uint16_t*>(v);
#pragma omp simd
        for (size_t i = 0; i < n; ++i) out[i] += a * widen_bf16(vb[i]);
    }
}

}  // namespace

void attention(const PagedKvLayer& kv, const float* q, const TokenSlot* slots, size_t tokens, size_t heads,
               float scale, float* out, ThreadPool& pool) {
    const size_t d = kv.head_dim;
    const size_t group = heads / kv.kv_heads;
    const size_t elem = kv.dtype == KvDtype::F32 ? 4 : 2;
    const size_t row_bytes = kv.kv_heads * d * elem;
    const auto* kbase = static_cast<const uint8_t*>(kv.k);
    const auto* vbase = static_cast<const uint8_t*>(kv.v);

    pool.parallel_for(tokens * heads, [&](size_t begin, size_t end) {
        thread_local std::vector<float> scores;
        for (size_t item = begin; item < end; ++item) {
            const size_t t = item / heads, h = item % heads, kvh = h / group;
            const TokenSlot& slot = slots[t];
            const size_t n = static_cast<size_t>(slot.position) + 1;
            const float* qh = q + item * d;
            scores.resize(n);
            float max_score = -INFINITY;
            for (size_t j = 0; j < n; ++j) {
                const size_t block = static_cast<size_t>(slot.block_table[j / kv.block_size]);
                const size_t off = (block * kv.block_size + j % kv.block_size) * row_bytes + kvh * d * elem;
                scores[j] = dot_row(qh, kbase + off, kv.dtype, d) * scale;
                max_score = std::max(max_score, scores[j]);
            }
            float sum = 0.0f;
            for (size_t j = 0; j < n; ++j) {
                scores[j] = std::exp(scores[j] - max_score);
                sum += scores[j];
            }
            const float inv = 1.0f / sum;
            float* o = out + item * d;
            std::fill(o, o + d, 0.0f);
            for (size_t j = 0; j < n; ++j) {
                const size_t block = static_cast<size_t>(slot.block_table[j / kv.block_size]);
                const size_t off = (block * kv.block_size + j % kv.block_size) * row_bytes + kvh * d * elem;
                axpy_row(o, scores[j] * inv, vbase + off, kv.dtype, d);
            }
        }
    }, 1);
}

}  // namespace q3n::cpu
