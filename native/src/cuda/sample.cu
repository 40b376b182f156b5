// One block of 1024 threads per row; thread t owns a contiguous slice of the vocabulary, so
// "lowest id first" tie rules follow from a prefix scan over threads.

#include <cfloat>

#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/sample.h"

namespace q3n::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarpsPerBlock = kThreads / 32;

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ull;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBull;
    z ^= z >> 31;
    return z;
}

// sampling_uniform of sampler.h, bit for bit.
__device__ __forceinline__ float uniform(uint64_t seed, uint64_t counter) {
    const uint64_t r = mix64(mix64(seed) + (counter + 1) * 0x9E3779B97F4A7C15ull);
    return static_cast<float>(r >> 40) * 5.9604644775390625e-8f;  // 2^-24
}

// Larger key = larger float; NaN never reaches here.
__device__ __forceinline__ uint32_t order_key(float v) {
    const uint32_t u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// (value desc, id asc): true when a comes first.
__device__ __forceinline__ bool before(float va, int ia, float vb, int ib) { return va > vb || (va == vb && ia < ib); }

// A (value, id) pair as one 64-bit key whose unsigned order is the sampler's order: larger value
// first, then lower id. One key keeps the block reduction a plain max with no tie logic.
__device__ __forceinline__ uint64_t rank_key(float v, int id) {
    if (v == 0.0f) v = 0.0f;  // -0 and +0 compare equal on the host: the id decides
    return (static_cast<uint64_t>(order_key(v)) << 32) | static_cast<uint32_t>(0x7fffffff - id);
}
__device__ __forceinline__ int key_id(uint64_t k) { return 0x7fffffff - static_cast<int>(k & 0xffffffffu); }
__device__ __forceinline__ float key_value(uint64_t k) {
    const uint32_t o = static_cast<uint32_t>(k >> 32);
    return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}

// Block-wide maximum of one key per thread; every thread gets it.
__device__ uint64_t block_max_key(uint64_t k, uint64_t* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) k = max(k, __shfl_xor_sync(0xffffffffu, k, o));
    __syncthreads();  // the previous call's readers are done with scratch
    if (lane == 0) scratch[warp] = k;
    __syncthreads();
    uint64_t r = scratch[0];
    for (int w = 1; w < kWarpsPerBlock; ++w) r = max(r, scratch[w]);
    return r;
}

__device__ double block_sum_double(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double r = 0.0;
    for (int w = 0; w < kWarpsPerBlock; ++w) r += scratch[w];
    return r;
}

// Exclusive prefix sum of one int per thread, in thread order.
__device__ int block_exclusive_scan(int v, int* scratch, int* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads();
    if (lane == 31) scratch[warp] = x;
    __syncthreads();
    if (threadIdx.x == 0) {
        int run = 0;
        for (int w = 0; w < kWarpsPerBlock; ++w) {
            const int s = scratch[w];
            scratch[w] = run;
            run += s;
        }
        scratch[kWarpsPerBlock] = run;
    }
    __syncthreads();
    *total = scratch[kWarpsPerBlock];
    return scratch[warp] + x - v;
}

__global__ void __launch_bounds__(kThreads) sample_kernel(const float* logits, float* work, int vocab,
                                                          const DeviceSampleParams* all_params, const int32_t* pen_ids,
                                                          const int32_t* pen_counts, DeviceSampleResult* results) {
    __shared__ uint64_t key_scratch[kWarpsPerBlock];
    __shared__ double dscratch[kWarpsPerBlock];
    __shared__ int iscratch[kWarpsPerBlock + 1];
    __shared__ int hist[256];
    __shared__ float cand_v[kMaxCandidates];
    __shared__ int cand_id[kMaxCandidates];
    __shared__ int flag;
    __shared__ int cand_count;

    const int row = blockIdx.x, tid = threadIdx.x;
    const DeviceSampleParams p = all_params[row];
    const float* raw = logits + static_cast<size_t>(row) * vocab;
    float* w = work + static_cast<size_t>(row) * vocab;
    DeviceSampleResult& out = results[row];
    const int chunk = (vocab + kThreads - 1) / kThreads;
    const int begin = min(vocab, tid * chunk), end = min(vocab, begin + chunk);

    // 1. Copy, checking for NaN/Inf (the lowest bad index is reported, like the host).
    if (tid == 0) flag = INT_MAX;
    __syncthreads();
    for (int i = begin; i < end; ++i) {
        const float v = raw[i];
        w[i] = v;
        if (!isfinite(v)) atomicMin(&flag, i);
    }
    __syncthreads();
    if (flag != INT_MAX) {
        if (tid == 0) {
            out.token = -1;
            out.non_finite = 1;
            out.bad_index = flag;
            out.fallback = 0;
        }
        return;
    }

    // 2. Log-probabilities of the raw logits: log-sum-exp and the best top_logprobs, found as
    // successive maxima in (value desc, id asc) order.
    float lse = 0.0f;
    if (p.want_logprobs) {
        uint64_t best = 0;
        for (int i = begin; i < end; ++i) best = max(best, rank_key(raw[i], i));
        const float mx = key_value(block_max_key(best, key_scratch));
        double s = 0.0;
        for (int i = begin; i < end; ++i) s += static_cast<double>(expf(raw[i] - mx));
        lse = mx + static_cast<float>(log(block_sum_double(s, dscratch)));
        uint64_t last = ~0ull;
        for (int r = 0; r < p.top_logprobs; ++r) {
            uint64_t c = 0;
            for (int i = begin; i < end; ++i) {
                const uint64_t k = rank_key(raw[i], i);
                if (k < last) c = max(c, k);
            }
            last = block_max_key(c, key_scratch);
            if (tid == 0) {
                out.logprob.top_tokens[r] = key_id(last);
                out.logprob.top_logprobs[r] = key_value(last) - lse;
            }
        }
        if (tid == 0) out.logprob.num_top = p.top_logprobs;
    }
    if (p.forced_token >= 0) {
        if (tid == 0) {
            out.non_finite = 0;
            out.bad_index = -1;
            out.fallback = 0;
            out.token = p.forced_token;
            out.logprob.token = p.forced_token;
            out.logprob.logprob = raw[p.forced_token] - lse;
        }
        return;
    }

    // 3. Penalties on the distinct ids of the sequence (host rules: repetition first, then
    // presence + frequency * count, each product and sum rounded).
    __syncthreads();  // every thread has read `flag` above before it is reset
    if (tid == 0) flag = INT_MAX;
    __syncthreads();
    for (int j = tid; j < p.penalty_count; j += kThreads) {
        const int id = pen_ids[p.penalty_offset + j], c = pen_counts[p.penalty_offset + j];
        float v = w[id];
        if (p.repetition_penalty != 1.0f) v = v > 0.0f ? __fdiv_rn(v, p.repetition_penalty) : __fmul_rn(v, p.repetition_penalty);
        if (c > 0 && (p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f))
            v = __fsub_rn(v, __fadd_rn(p.presence_penalty, __fmul_rn(p.frequency_penalty, static_cast<float>(c))));
        if (!isfinite(v)) atomicMin(&flag, id);
        w[id] = v;
    }
    __syncthreads();

    int token = -1, fallback = 0;
    if (flag != INT_MAX) {
        if (tid == 0) {
            out.token = -1;
            out.non_finite = 1;
            out.bad_index = flag;
            out.fallback = 0;
        }
        return;
    }
    if (p.temperature == 0.0f || p.top_k == 1) {
        // Greedy, or top-k 1 (greedy on the scaled logits, and division keeps the order).
        uint64_t best = 0;
        for (int i = begin; i < end; ++i) best = max(best, rank_key(w[i], i));
        token = key_id(block_max_key(best, key_scratch));
    } else {
        // 4. Temperature (a true division, as on the host).
        if (p.temperature != 1.0f) {
            __syncthreads();
            if (tid == 0) flag = INT_MAX;
            __syncthreads();
            for (int i = begin; i < end; ++i) {
                w[i] = __fdiv_rn(w[i], p.temperature);
                if (!isfinite(w[i])) atomicMin(&flag, i);
            }
            __syncthreads();
            if (flag != INT_MAX) {
                if (tid == 0) {
                    out.token = -1;
                    out.non_finite = 1;
                    out.bad_index = flag;
                    out.fallback = 0;
                }
                return;
            }
        }
        const int k = (p.top_k <= 0 || p.top_k >= vocab) ? vocab : p.top_k;
        const int want = min(k, kMaxCandidates);

        // 5. Radix-select the want-th largest key, one byte at a time from the top.
        uint32_t prefix = 0, mask = 0;
        int remaining = want;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int i = tid; i < 256; i += kThreads) hist[i] = 0;
            __syncthreads();
            for (int i = begin; i < end; ++i) {
                const uint32_t key = order_key(w[i]);
                if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1);
            }
            __syncthreads();
            if (tid == 0) {
                int b = 255;
                for (; b > 0; --b) {
                    if (hist[b] >= remaining) break;
                    remaining -= hist[b];
                }
                iscratch[0] = b;
                iscratch[1] = remaining;
            }
            __syncthreads();
            prefix |= static_cast<uint32_t>(iscratch[0]) << shift;
            mask |= 0xffu << shift;
            remaining = iscratch[1];
            __syncthreads();
        }
        const uint32_t threshold = prefix;  // the want-th largest key; `remaining` ties at it are in

        // 6. Gather: every key above the threshold, and the first `remaining` equal ones by id.
        int equal_here = 0;
        for (int i = begin; i < end; ++i) equal_here += order_key(w[i]) == threshold;
        int total_equal;
        const int rank0 = block_exclusive_scan(equal_here, iscratch, &total_equal);
        if (tid == 0) cand_count = 0;
        __syncthreads();
        int rank = rank0;
        for (int i = begin; i < end; ++i) {
            const uint32_t key = order_key(w[i]);
            bool take = key > threshold;
            if (key == threshold) take = rank++ < remaining;
            if (take) {
                const int slot = atomicAdd(&cand_count, 1);
                cand_v[slot] = w[i];
                cand_id[slot] = i;
            }
        }
        __syncthreads();
        const int n = cand_count;  // == want
        // Bitonic sort of the candidates in (value desc, id asc) order, padded to 1024.
        for (int i = n + tid; i < kMaxCandidates; i += kThreads) {
            cand_v[i] = -FLT_MAX;
            cand_id[i] = INT_MAX;
        }
        __syncthreads();
        for (int size = 2; size <= kMaxCandidates; size <<= 1) {
            for (int stride = size >> 1; stride > 0; stride >>= 1) {
                const int i = tid, j = i ^ stride;
                if (j > i) {
                    const bool ascending_block = (i & size) == 0;
                    const bool i_first = before(cand_v[i], cand_id[i], cand_v[j], cand_id[j]);
                    if (ascending_block != i_first) {
                        const float tv = cand_v[i];
                        cand_v[i] = cand_v[j];
                        cand_v[j] = tv;
                        const int ti = cand_id[i];
                        cand_id[i] = cand_id[j];
                        cand_id[j] = ti;
                    }
                }
                __syncthreads();
            }
        }

        // 7. The whole-vocabulary weight sum, needed when the candidates are not all of the k.
        const float top = cand_v[0];
        double tail_total = 0.0;
        if (k > n) {
            double s = 0.0;
            for (int i = begin; i < end; ++i) s += static_cast<double>(expf(w[i] - top));
            tail_total = block_sum_double(s, dscratch);
        }

        // 8. Filters and the draw, sequentially over at most 1024 candidates (host arithmetic).
        if (tid == 0) {
            double cand_sum = 0.0;
            for (int i = 0; i < n; ++i) cand_sum += static_cast<double>(expf(cand_v[i] - top));
            const bool truncated = k > n;
            const double total_k = truncated ? tail_total : cand_sum;
            int kept = n;
            bool kept_is_all = true;  // kept still includes whatever lies past the candidates
            if (p.top_p < 1.0f) {
                const double target = static_cast<double>(p.top_p) * total_k;
                double running = 0.0;
                int i = 0;
                for (; i < n; ++i) {
                    running += expf(cand_v[i] - top);
                    if (running >= target) break;
                }
                if (i < n) {
                    kept = i + 1;
                    kept_is_all = false;
                } else if (truncated) {
                    fallback = 1;
                }
            }
            if (!fallback && p.min_p > 0.0f) {
                while (kept > 1 && expf(cand_v[kept - 1] - top) < p.min_p) {
                    --kept;
                    kept_is_all = false;
                }
                // Candidates past the last one could still weigh >= min_p: only the host can tell.
                if (truncated && kept_is_all && expf(cand_v[n - 1] - top) >= p.min_p) fallback = 1;
            }
            if (!fallback) {
                const bool includes_tail = truncated && kept_is_all;
                double total = 0.0;
                if (includes_tail) {
                    total = total_k;
                } else {
                    for (int i = 0; i < kept; ++i) total += static_cast<double>(expf(cand_v[i] - top));
                }
                const double threshold_w = static_cast<double>(uniform(p.seed, p.counter)) * total;
                double running = 0.0;
                token = -1;
                for (int i = 0; i < kept; ++i) {
                    running += expf(cand_v[i] - top);
                    if (running > threshold_w) {
                        token = cand_id[i];
                        break;
                    }
                }
                if (token < 0) {
                    if (includes_tail) fallback = 1;  // the draw lands in the tail
                    else token = cand_id[kept - 1];
                }
            }
            iscratch[0] = token;
            iscratch[1] = fallback;
        }
        __syncthreads();
        token = iscratch[0];
        fallback = iscratch[1];
    }

    if (tid == 0) {
        out.non_finite = 0;
        out.bad_index = -1;
        out.fallback = fallback;
        out.token = fallback ? -1 : token;
        if (p.want_logprobs && !fallback) {
            out.logprob.token = token;
            out.logprob.logprob = raw[token] - lse;
        }
    }
}

}  // namespace

void sample_rows(const float* logits, float* work, int rows, int vocab, const DeviceSampleParams* params,
                 const int32_t* penalty_ids, const int32_t* penalty_counts, DeviceSampleResult* results,
                 cudaStream_t stream) {
    if (rows == 0) return;
    sample_kernel<<<rows, kThreads, 0, stream>>>(logits, work, vocab, params, penalty_ids, penalty_counts, results);
    Q3N_CUDA_LAUNCHED("sample_rows");
}

}  // namespace q3n::cuda
