#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "cpu/ops.h"

namespace q3n::cpu {

void segment_attention(const float* q, const float* k, const float* v, size_t tokens, size_t heads, size_t head_dim,
                       const uint32_t* cu_seqlens, size_t segments, float scale, float* out, ThreadPool& pool) {
    require(segments > 0 && cu_seqlens[0] == 0 && cu_seqlens[segments] == tokens, Q3N_ERR_INVALID_ARGUMENT,
            "segment boundaries do not cover the tokens");
    // Which segment each token belongs to, so the work splits evenly over (token, head) pairs.
    std::vector<uint32_t> seg_of(tokens);
    for (size_t s = 0; s < segments; ++s)
        for (uint32_t t = cu_seqlens[s]; t < cu_seqlens[s + 1]; ++t) seg_of[t] = static_cast<uint32_t>(s);
    const size_t row = heads * head_dim;
    pool.parallel_for(tokens * heads, [&](size_t begin, size_t end) {
        std::vector<float> scores;
        std::vector<float> acc(head_dim);
        for (size_t job = begin; job < end; ++job) {
            const size_t t = job / heads, h = job % heads;
            const uint32_t lo = cu_seqlens[seg_of[t]], hi = cu_seqlens[seg_of[t] + 1];
            const float* qv = q + t * row + h * head_dim;
            scores.resize(hi - lo);
            float mx = -INFINITY;
            for (uint32_t j = lo; j < hi; ++j) {
                const float* kv = k + j * row + h * head_dim;
                float s = 0.0f;
                for (size_t d = 0; d < head_dim; ++d) s += qv[d] * kv[d];
                scores[j - lo] = s * scale;
                mx = std::max(mx, scores[j - lo]);
            }
            float sum = 0.0f;
            for (auto& s : scores) sum += (s = std::exp(s - mx));
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (uint32_t j = lo; j < hi; ++j) {
                const float p = scores[j - lo] / sum;
                const float* vv = v + j * row + h * head_dim;
                for (size_t d = 0; d < head_dim; ++d) acc[d] += p * vv[d];
            }
            std::copy(acc.begin(), acc.end(), out + t * row + h * head_dim);
        }
    }, 8);
}

}  // namespace q3n::cpu
