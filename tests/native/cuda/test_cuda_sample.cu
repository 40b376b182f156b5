// The GPU sampler against two references: the host sampler (sampling/sampler.h's contract) with
// the host log-probabilities, and the earlier single-block GPU sampler, kept below as `legacy`.
//
// Against the host. Exactness: greedy and top-k 1 must give the host's token every time. With
// temperature/top-k/top-p/min-p, both follow the same order and fp32 weights, but the device's expf
// may differ from glibc's by an ulp and its sums run in another order, so a draw that lands within
// ~1e-7 of a boundary can differ: allowed in at most 1% of draws (none expected at this count). Rows
// the device hands back (`fallback`) are the host's to decide and are not compared. Log-probabilities:
// fp32 log-sum-exp over up to 151,936 terms with double accumulation on both sides: within 2e-5.
//
// Against the legacy kernel: the same token, fallback flag, non-finite flag and index in every row.
// The one sum that is merged from per-slice parts (the whole-vocabulary weight sum, used only when
// top-k is off) rounds differently in its last bits, so a draw or top-p cut that lands right on it
// may differ: allowed in at most 1% of those rows. The running sums over the candidates are the
// same sequential double sums in both, so rows with top-k <= 1024 must match exactly. Rows with
// 1024 < top-k < vocab are not compared with the legacy kernel: it used the whole-vocabulary sum
// where the host uses the sum of the k best (a bug); the new kernel bounds that sum and either
// settles the row as the host does or hands it to the host. Log-probabilities within 1e-5.
#include <gtest/gtest.h>

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "cuda/cuda_backend.h"
#include "cuda/cuda_check.h"
#include "cuda/device_buffer.h"
#include "cuda/sample.h"
#include "sampling/logprobs.h"
#include "sampling/sampler.h"

using namespace q3n;
using cuda::DeviceBuffer;

namespace {

// ---- The single-block sampler this one replaced (one 1024-thread block per row). ----
namespace legacy {

constexpr int kThreads = 1024;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kMaxCandidates = 1024;

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ull;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBull;
    z ^= z >> 31;
    return z;
}
__device__ __forceinline__ float uniform(uint64_t seed, uint64_t counter) {
    const uint64_t r = mix64(mix64(seed) + (counter + 1) * 0x9E3779B97F4A7C15ull);
    return static_cast<float>(r >> 40) * 5.9604644775390625e-8f;
}
__device__ __forceinline__ uint32_t order_key(float v) {
    const uint32_t u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ bool before(float va, int ia, float vb, int ib) { return va > vb || (va == vb && ia < ib); }
__device__ __forceinline__ uint64_t rank_key(float v, int id) {
    if (v == 0.0f) v = 0.0f;
    return (static_cast<uint64_t>(order_key(v)) << 32) | static_cast<uint32_t>(0x7fffffff - id);
}
__device__ __forceinline__ int key_id(uint64_t k) { return 0x7fffffff - static_cast<int>(k & 0xffffffffu); }
__device__ __forceinline__ float key_value(uint64_t k) {
    const uint32_t o = static_cast<uint32_t>(k >> 32);
    return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}
__device__ uint64_t block_max_key(uint64_t k, uint64_t* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) k = max(k, __shfl_xor_sync(0xffffffffu, k, o));
    __syncthreads();
    if (lane == 0) scratch[warp] = k;
    __syncthreads();
    uint64_t r = scratch[0];
    for (int w = 1; w < kWarpsPerBlock; ++w) r = max(r, scratch[w]);
    return r;
}
__device__ double block_sum_double(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double r = 0.0;
    for (int w = 0; w < kWarpsPerBlock; ++w) r += scratch[w];
    return r;
}
__device__ int block_exclusive_scan(int v, int* scratch, int* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int x = v;
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
                                                          const cuda::DeviceSampleParams* all_params,
                                                          const int32_t* pen_ids, const int32_t* pen_counts,
                                                          cuda::DeviceSampleResult* results) {
    __shared__ uint64_t key_scratch[kWarpsPerBlock];
    __shared__ double dscratch[kWarpsPerBlock];
    __shared__ int iscratch[kWarpsPerBlock + 1];
    __shared__ int hist[256];
    __shared__ float cand_v[kMaxCandidates];
    __shared__ int cand_id[kMaxCandidates];
    __shared__ int flag;
    __shared__ int cand_count;

    const int row = blockIdx.x, tid = threadIdx.x;
    const cuda::DeviceSampleParams p = all_params[row];
    const float* raw = logits + static_cast<size_t>(row) * vocab;
    float* w = work + static_cast<size_t>(row) * vocab;
    cuda::DeviceSampleResult& out = results[row];
    const int chunk = (vocab + kThreads - 1) / kThreads;
    const int begin = min(vocab, tid * chunk), end = min(vocab, begin + chunk);

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
    __syncthreads();
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
        uint64_t best = 0;
        for (int i = begin; i < end; ++i) best = max(best, rank_key(w[i], i));
        token = key_id(block_max_key(best, key_scratch));
    } else {
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
        const uint32_t threshold = prefix;
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
        const int n = cand_count;
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
        const float top = cand_v[0];
        double tail_total = 0.0;
        if (k > n) {
            double s = 0.0;
            for (int i = begin; i < end; ++i) s += static_cast<double>(expf(w[i] - top));
            tail_total = block_sum_double(s, dscratch);
        }
        if (tid == 0) {
            double cand_sum = 0.0;
            for (int i = 0; i < n; ++i) cand_sum += static_cast<double>(expf(cand_v[i] - top));
            const bool truncated = k > n;
            const double total_k = truncated ? tail_total : cand_sum;
            int kept = n;
            bool kept_is_all = true;
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
                    if (includes_tail) fallback = 1;
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

}  // namespace legacy

constexpr int kVocab = 151936;

struct Case {
    const char* name;
    float temperature;
    int top_k;
    float top_p;
    float min_p;
    float repetition;
    float presence;
    float frequency;
    int top_logprobs = 20;
    int logprobs = 1;
};

// One row: its parameters (penalty_offset/count are filled in by run_rows) and its sequence.
struct Row {
    Case c;
    uint64_t seed = 1, counter = 0;
    int forced = -1;
    std::vector<int32_t> seq, outs;  // every token; the sampled ones (presence/frequency)
};

struct Results {
    std::vector<cuda::DeviceSampleResult> now, old;
};

// Runs the new sampler and the legacy one over the same rows.
Results run_rows(int vocab, const std::vector<float>& logits, const std::vector<Row>& rows) {
    const int n = static_cast<int>(rows.size());
    std::vector<int32_t> pen_ids, pen_counts;
    std::vector<cuda::DeviceSampleParams> params(n);
    for (int r = 0; r < n; ++r) {
        const Row& row = rows[r];
        std::map<int32_t, int32_t> counts;
        for (int32_t t : row.seq) counts.emplace(t, 0);
        for (int32_t t : row.outs) ++counts[t];
        const int offset = static_cast<int>(pen_ids.size());
        for (auto [id, c] : counts) {
            pen_ids.push_back(id);
            pen_counts.push_back(c);
        }
        const Case& c = row.c;
        params[r] = cuda::DeviceSampleParams{c.temperature, c.top_p, c.min_p, c.repetition, c.presence, c.frequency,
                                             c.top_k, c.top_logprobs, c.logprobs, offset,
                                             static_cast<int32_t>(counts.size()), row.forced, row.seed, row.counter};
    }
    pen_ids.push_back(0);  // never empty
    pen_counts.push_back(0);
    DeviceBuffer dl(logits.size() * 4), dw(cuda::sample_work_bytes(n, vocab)), dwo(logits.size() * 4),
        dp(n * sizeof(cuda::DeviceSampleParams)), dids(pen_ids.size() * 4), dcounts(pen_counts.size() * 4),
        dres(n * sizeof(cuda::DeviceSampleResult)), dold(n * sizeof(cuda::DeviceSampleResult));
    Q3N_CUDA(cudaMemcpy(dl.get(), logits.data(), logits.size() * 4, cudaMemcpyHostToDevice));
    Q3N_CUDA(cudaMemcpy(dp.get(), params.data(), n * sizeof(cuda::DeviceSampleParams), cudaMemcpyHostToDevice));
    Q3N_CUDA(cudaMemcpy(dids.get(), pen_ids.data(), pen_ids.size() * 4, cudaMemcpyHostToDevice));
    Q3N_CUDA(cudaMemcpy(dcounts.get(), pen_counts.data(), pen_counts.size() * 4, cudaMemcpyHostToDevice));
    // Garbage in the scratch and the results: nothing may depend on their previous contents.
    Q3N_CUDA(cudaMemset(dw.get(), 0xA5, dw.bytes()));
    Q3N_CUDA(cudaMemset(dres.get(), 0x5A, dres.bytes()));
    Q3N_CUDA(cudaMemset(dold.get(), 0x5A, dold.bytes()));
    cuda::sample_rows(dl.as<float>(), dw.as<float>(), n, vocab, dp.as<cuda::DeviceSampleParams>(), dids.as<int32_t>(),
                      dcounts.as<int32_t>(), dres.as<cuda::DeviceSampleResult>(), nullptr);
    Q3N_CUDA(cudaGetLastError());
    legacy::sample_kernel<<<n, legacy::kThreads>>>(dl.as<float>(), dwo.as<float>(), vocab,
                                                    dp.as<cuda::DeviceSampleParams>(), dids.as<int32_t>(),
                                                    dcounts.as<int32_t>(), dold.as<cuda::DeviceSampleResult>());
    Q3N_CUDA(cudaGetLastError());
    Results out;
    out.now.resize(n);
    out.old.resize(n);
    Q3N_CUDA(cudaMemcpy(out.now.data(), dres.get(), n * sizeof(cuda::DeviceSampleResult), cudaMemcpyDeviceToHost));
    Q3N_CUDA(cudaMemcpy(out.old.data(), dold.get(), n * sizeof(cuda::DeviceSampleResult), cudaMemcpyDeviceToHost));
    return out;
}

std::string describe(const cuda::DeviceSampleResult& r) {
    std::ostringstream s;
    s << "{token " << r.token << ", non_finite " << r.non_finite << ", bad_index " << r.bad_index << ", fallback "
      << r.fallback << ", logprob " << r.logprob.token << ":" << r.logprob.logprob << ", num_top " << r.logprob.num_top;
    for (uint32_t j = 0; j < std::min<uint32_t>(r.logprob.num_top, 4); ++j)
        s << (j ? " " : " [") << r.logprob.top_tokens[j] << ":" << r.logprob.top_logprobs[j];
    s << (r.logprob.num_top ? " ...]}" : "}");
    return s.str();
}

std::string describe(const Row& row, int vocab) {
    std::ostringstream s;
    s << row.c.name << " vocab " << vocab << " (t " << row.c.temperature << ", k " << row.c.top_k << ", p "
      << row.c.top_p << ", min_p " << row.c.min_p << ", rep " << row.c.repetition << ", pres " << row.c.presence
      << ", freq " << row.c.frequency << ", logprobs " << row.c.logprobs << "/" << row.c.top_logprobs << ", forced "
      << row.forced << ", seed " << row.seed << ", counter " << row.counter << ")";
    return s.str();
}

struct Tally {
    int compared = 0, host_differ = 0, fallbacks = 0, tail_rows = 0, legacy_differ = 0, capped_rows = 0;
};

// Checks every row against the legacy kernel and the host sampler; returns the tallies.
Tally check_rows(const char* what, int vocab, const std::vector<float>& logits, const std::vector<Row>& rows,
                 const Results& res) {
    Tally t;
    Sampler host(vocab);
    LogprobCalculator calc(vocab);
    int reported = 0;
    auto report = [&](int r, const std::string& msg) {
        if (reported++ < 12)
            ADD_FAILURE() << what << " row " << r << ": " << msg << "\n  row: " << describe(rows[r], vocab)
                          << "\n  new:    " << describe(res.now[r]) << "\n  legacy: " << describe(res.old[r]);
    };
    for (size_t r = 0; r < rows.size(); ++r) {
        const Row& row = rows[r];
        const cuda::DeviceSampleResult& a = res.now[r];
        const cuda::DeviceSampleResult& b = res.old[r];
        const Case& c = row.c;
        const bool sampling = row.forced < 0 && c.temperature != 0.0f && c.top_k != 1;
        const int k = (c.top_k <= 0 || c.top_k >= vocab) ? vocab : c.top_k;
        // top-k above the candidate count but below the vocabulary: the legacy kernel is wrong there.
        const bool capped = sampling && k > cuda::kMaxCandidates && k < vocab;
        const bool uses_tail = sampling && k > cuda::kMaxCandidates && !capped;
        if (capped) ++t.capped_rows;

        // Against the legacy kernel.
        if (a.non_finite != b.non_finite || (a.non_finite && a.bad_index != b.bad_index)) {
            report(int(r), "non-finite flag or index differs from the legacy kernel");
            continue;
        }
        const bool same_draw = a.token == b.token && a.fallback == b.fallback;
        if (uses_tail) ++t.tail_rows;
        if (!a.non_finite && !same_draw) {
            if (uses_tail) ++t.legacy_differ;
            else if (!capped) report(int(r), "token or fallback differs from the legacy kernel");
        }
        const bool has_logprobs = c.logprobs != 0;
        const std::vector<float> raw(logits.begin() + size_t(r) * vocab, logits.begin() + size_t(r + 1) * vocab);
        bool raw_finite = true;
        for (float x : raw) raw_finite = raw_finite && std::isfinite(x);
        const uint32_t tn = std::min<uint32_t>(std::min<uint32_t>(c.top_logprobs, Q3N_MAX_TOP_LOGPROBS), vocab);
        if (has_logprobs && raw_finite) {
            if (a.logprob.num_top != tn) report(int(r), "num_top " + std::to_string(a.logprob.num_top));
            for (uint32_t j = 0; j < tn && j < b.logprob.num_top; ++j) {
                if (a.logprob.top_tokens[j] != b.logprob.top_tokens[j] ||
                    std::fabs(a.logprob.top_logprobs[j] - b.logprob.top_logprobs[j]) > 1e-5f) {
                    report(int(r), "top log-probability " + std::to_string(j) + " differs from the legacy kernel");
                    break;
                }
            }
            if (!a.non_finite && !a.fallback && same_draw && std::fabs(a.logprob.logprob - b.logprob.logprob) > 1e-5f)
                report(int(r), "log-probability differs from the legacy kernel");
        }

        // Against the host.
        if (!raw_finite) {
            if (!a.non_finite) report(int(r), "non-finite logits not reported");
            continue;
        }
        if (row.forced >= 0) {
            if (!c.logprobs) continue;  // the engine always asks for them with a forced token
            q3n_token_logprob lp;
            calc.compute(raw.data(), row.forced, c.top_logprobs, lp);
            if (a.token != row.forced || std::fabs(a.logprob.logprob - lp.logprob) > 2e-5f)
                report(int(r), "forced token: host log-probability " + std::to_string(lp.logprob));
            continue;
        }
        std::vector<float> work = raw;
        q3n_sampling_params p;
        q3n_sampling_params_init(&p, sizeof p);
        p.temperature = c.temperature;
        p.top_k = c.top_k;
        p.top_p = c.top_p;
        p.min_p = c.min_p;
        p.repetition_penalty = c.repetition;
        p.presence_penalty = c.presence;
        p.frequency_penalty = c.frequency;
        p.seed = row.seed;
        int32_t want = -1;
        try {
            want = host.sample(work, p, SamplingContext{row.seq, row.outs, row.counter});
        } catch (const Error& e) {
            if (!a.non_finite) report(int(r), std::string("the host failed (") + e.what() + ") but the device did not");
            continue;
        }
        if (a.non_finite) {
            report(int(r), "the device reports a non-finite value, the host sampled " + std::to_string(want));
            continue;
        }
        if (a.fallback) {
            ++t.fallbacks;
            continue;
        }
        ++t.compared;
        if (a.token != want) {
            ++t.host_differ;
            if (!sampling) report(int(r), "greedy token differs from the host's " + std::to_string(want));
        }
        if (c.logprobs) {
            q3n_token_logprob lp;
            calc.compute(raw.data(), a.token, c.top_logprobs, lp);
            bool ok = std::fabs(a.logprob.logprob - lp.logprob) <= 2e-5f && a.logprob.token == a.token &&
                      a.logprob.num_top == lp.num_top;
            for (uint32_t j = 0; ok && j < lp.num_top; ++j)
                ok = a.logprob.top_tokens[j] == lp.top_tokens[j] &&
                     std::fabs(a.logprob.top_logprobs[j] - lp.top_logprobs[j]) <= 2e-5f;
            if (!ok) {
                std::ostringstream s;
                s << "log-probabilities differ from the host's: token " << lp.token << ":" << lp.logprob << ", num_top "
                  << lp.num_top;
                for (uint32_t j = 0; j < std::min<uint32_t>(lp.num_top, 4); ++j)
                    s << " " << lp.top_tokens[j] << ":" << lp.top_logprobs[j];
                report(int(r), s.str());
            }
        }
    }
    EXPECT_LE(t.host_differ * 100, t.compared)
        << what << ": " << t.host_differ << " of " << t.compared << " draws differ from the host's";
    EXPECT_LE(t.legacy_differ * 100, std::max(t.tail_rows, 1))
        << what << ": " << t.legacy_differ << " of " << t.tail_rows << " tail-dependent rows differ from the legacy kernel";
    std::printf("[ %s ] %zu rows, %d draws compared with the host, %d differ, %d handed to the host; "
                "%d of %d tail-dependent rows differ from the legacy kernel; %d rows with 1024 < top-k < vocab\n",
                what, rows.size(), t.compared, t.host_differ, t.fallbacks, t.legacy_differ, t.tail_rows,
                t.capped_rows);
    return t;
}

// A random sequence of `len` tokens below `limit`, the last `sampled` of them sampled in this request.
void random_sequence(Row& row, std::mt19937& rng, int limit, int len = 40, int sampled = 10) {
    row.seq.clear();
    for (int j = 0; j < len; ++j) row.seq.push_back(static_cast<int32_t>(rng() % limit));
    row.outs.assign(row.seq.end() - std::min(sampled, len), row.seq.end());
}

// Peaked rows (a few large logits) and flat ones, like real and random models.
std::vector<float> random_logits(int rows, int vocab, std::mt19937& rng, float sigma, int spikes = 5) {
    std::vector<float> logits(size_t(rows) * vocab);
    std::normal_distribution<float> d(0.0f, sigma);
    for (auto& x : logits) x = d(rng);
    for (int r = 0; r < rows; ++r)
        for (int j = 0; j < spikes; ++j) logits[size_t(r) * vocab + rng() % vocab] += 12.0f;
    return logits;
}

const std::vector<Case>& standard_cases() {
    static const std::vector<Case> cases = {
        {"greedy", 0.0f, 0, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f},
        {"greedy+penalties", 0.0f, 0, 1.0f, 0.0f, 1.3f, 0.5f, 0.2f},
        {"top_k1", 0.8f, 1, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f},
        {"qwen_instruct", 0.7f, 20, 0.8f, 0.0f, 1.0f, 0.0f, 0.0f},
        {"qwen_thinking", 0.6f, 20, 0.95f, 0.0f, 1.0f, 1.5f, 0.0f},
        {"top_p_only", 1.0f, 0, 0.9f, 0.0f, 1.0f, 0.0f, 0.0f},
        {"min_p", 1.0f, 0, 1.0f, 0.05f, 1.0f, 0.0f, 0.0f},
        {"top_k_1024", 1.2f, 1024, 1.0f, 0.0f, 1.05f, 0.0f, 0.3f},
        {"plain_temperature", 1.0f, 0, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f},
        {"top_k_100_min_p", 0.9f, 100, 0.97f, 0.02f, 1.1f, 0.0f, 0.0f, 5},
        {"top_k_2000_top_p", 1.0f, 2000, 0.5f, 0.0f, 1.0f, 0.0f, 0.0f, 0, 0},
        {"top_p_min_p_no_logprobs", 0.8f, 0, 0.99f, 0.1f, 1.0f, 0.0f, 0.0f, 0, 0},
    };
    return cases;
}

TEST(CudaSampler, MatchesHostSampler) {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: GPU tests skipped";
    const int rows = 24;
    std::mt19937 rng(11);
    for (const Case& c : standard_cases()) {
        int compared = 0;
        for (int round = 0; round < 4; ++round) {
            const std::vector<float> logits = random_logits(rows, kVocab, rng, round % 2 ? 1.0f : 3.0f);
            std::vector<Row> rs(rows);
            for (int r = 0; r < rows; ++r) {
                rs[r].c = c;
                rs[r].seed = 1000 + r;
                rs[r].counter = round;
                random_sequence(rs[r], rng, 300);
            }
            const std::string what = std::string(c.name) + " round " + std::to_string(round);
            compared += check_rows(what.c_str(), kVocab, logits, rs, run_rows(kVocab, logits, rs)).compared;
        }
        // Every configuration settles some rows on the device: in peaked rows (the sigma-1 rounds)
        // even top-k 2000's bounds pin the top-p cut down.
        if (c.temperature != 0.0f) EXPECT_GT(compared, 0) << c.name << ": every row was handed to the host";
    }
}

// Vocabularies that do not split evenly, one slice or two, and smaller than the candidate count.
TEST(CudaSampler, OddVocabularies) {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: GPU tests skipped";
    std::mt19937 rng(23);
    for (int vocab : {1, 2, 19, 257, 1000, 1023, 1025, 2303, 2304, 4607, 4609, 6913, 147455, 151936, 200003}) {
        for (const Case& c : standard_cases()) {
            const int rows = 6;
            const std::vector<float> logits = random_logits(rows, vocab, rng, 2.0f, vocab > 100 ? 5 : 1);
            std::vector<Row> rs(rows);
            for (int r = 0; r < rows; ++r) {
                rs[r].c = c;
                rs[r].seed = 77 + r;
                rs[r].counter = r;
                random_sequence(rs[r], rng, std::min(vocab, 300));
            }
            const std::string what = std::string(c.name) + " vocab " + std::to_string(vocab);
            check_rows(what.c_str(), vocab, logits, rs, run_rows(vocab, logits, rs));
        }
    }
}

// Rows built around the slice structure at the real vocabulary (64 slices of 2,374 ids).
TEST(CudaSampler, SliceBoundaries) {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: GPU tests skipped";
    const int L = (kVocab + 63) / 64;
    std::mt19937 rng(5);
    std::normal_distribution<float> d(0.0f, 1.0f);
    std::vector<std::pair<std::string, std::vector<float>>> shapes;
    auto noise = [&](float sigma) {
        std::vector<float> v(kVocab);
        for (auto& x : v) x = sigma * d(rng);
        return v;
    };
    {
        auto v = noise(1.0f);
        v[kVocab - 1] = 20.0f;
        shapes.emplace_back("max at the last id", v);
    }
    {
        auto v = noise(1.0f);
        v[63 * L] = 20.0f;
        v[63 * L + 1] = 19.0f;
        shapes.emplace_back("max at the first id of the last slice", v);
    }
    {
        auto v = noise(1.0f);
        for (int id : {L - 1, L, 2 * L + 5, 63 * L, kVocab - 1}) v[id] = 9.0f;
        shapes.emplace_back("ties across slice boundaries", v);
    }
    shapes.emplace_back("every logit equal", std::vector<float>(kVocab, 0.25f));
    {
        std::vector<float> v(kVocab, -3.0f);
        for (int s = 0; s < 64; ++s)
            for (int j = 0; j < 40; ++j) v[s * L + (j * 59) % L] = 4.0f;  // 2,560 ties at the top
        shapes.emplace_back("ties at the top in every slice", v);
    }
    {
        auto v = noise(1.0f);
        for (int j = 0; j < L; ++j) v[5 * L + j] = 8.0f + 0.5f * d(rng);
        shapes.emplace_back("the best 1024 in one slice", v);
    }
    {
        auto v = noise(1.0f);
        for (int j = 0; j < 700; ++j) v[17 * L + j * 3] = 8.0f + 0.5f * d(rng);
        for (int j = 0; j < 300; ++j) v[40 * L + j * 7] = 8.0f + 0.5f * d(rng);
        for (int j = 0; j < 200; ++j) v[rng() % kVocab] = 8.0f + 0.5f * d(rng);
        shapes.emplace_back("the best 1024 in two slices and spread", v);
    }
    {
        auto v = noise(1.0f);
        for (int s = 0; s < 64; ++s)
            for (int j = 0; j < 16 + s; ++j) v[s * L + (j * 131) % L] = 6.0f + 0.3f * d(rng);
        shapes.emplace_back("the best 1024 across all slices", v);
    }
    {
        auto v = noise(0.01f);  // nearly flat: top-p and min-p reach past the candidates
        shapes.emplace_back("nearly flat", v);
    }
    {
        auto v = noise(1.0f);
        for (auto& x : v)
            if (std::fabs(x) < 0.3f) x = (rng() & 1) ? 0.0f : -0.0f;
        v[12345] = -0.0f;
        shapes.emplace_back("signed zeros", v);
    }
    {
        auto v = noise(1.0f);
        v[777] = std::numeric_limits<float>::infinity();
        v[70000] = -std::numeric_limits<float>::infinity();
        shapes.emplace_back("an infinity", v);
    }

    std::vector<Case> cases = standard_cases();
    cases.push_back({"top_k_3", 1.0f, 3, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f});
    cases.push_back({"top_k_1024_top_p", 0.5f, 1024, 0.99f, 0.0f, 1.0f, 0.0f, 0.0f});
    // top-k above the candidate count without top-p: min-p alone, and the plain draw over the k.
    cases.push_back({"top_k_1025_min_p", 1.0f, 1025, 1.0f, 0.2f, 1.0f, 0.0f, 0.0f});
    cases.push_back({"top_k_5000", 0.7f, 5000, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, 3});
    for (const Case& c : cases) {
        std::vector<float> logits;
        std::vector<Row> rs;
        for (size_t s = 0; s < shapes.size(); ++s)
            for (int rep = 0; rep < 3; ++rep) {
                logits.insert(logits.end(), shapes[s].second.begin(), shapes[s].second.end());
                Row row;
                row.c = c;
                row.seed = 5 + rep;
                row.counter = s;
                // Penalised ids next to the boundaries too.
                row.seq = {L - 1, L, 63 * L, kVocab - 1, 5 * L + 3, 777, 12345, 17 * L};
                row.outs = {L, kVocab - 1, kVocab - 1};
                rs.push_back(row);
            }
        const std::string what = std::string(c.name) + " (slice shapes)";
        const Results res = run_rows(kVocab, logits, rs);
        check_rows(what.c_str(), kVocab, logits, rs, res);
        // The greedy answers are known exactly.
        if (c.temperature == 0.0f && c.repetition == 1.0f) {
            EXPECT_EQ(res.now[0].token, kVocab - 1) << "max at the last id";
            EXPECT_EQ(res.now[3].token, 63 * L) << "max at the first id of the last slice";
            EXPECT_EQ(res.now[6].token, L - 1) << "ties across slice boundaries";
            EXPECT_EQ(res.now[9].token, 0) << "every logit equal";
        }
    }
}

// NaN/Inf: the lowest index wins, whichever slice it lies in; overflow after penalties and after
// the temperature likewise.
TEST(CudaSampler, NonFiniteAcrossSlices) {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: GPU tests skipped";
    const int L = (kVocab + 63) / 64;
    struct Bad {
        const char* name;
        std::vector<std::pair<int, float>> set;
        Case c;
        std::vector<int32_t> seq;
        int expect;
    };
    const float nan = std::nanf(""), inf = std::numeric_limits<float>::infinity();
    const Case greedy{"greedy", 0.0f, 0, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f};
    const Case sample{"sample", 0.7f, 20, 0.8f, 0.0f, 1.0f, 0.0f, 0.0f};
    const Case rep{"repetition 0.5", 0.7f, 20, 0.8f, 0.0f, 0.5f, 0.0f, 0.0f};
    const Case hot{"temperature 0.5", 0.5f, 0, 0.9f, 0.0f, 1.0f, 0.0f, 0.0f};
    const std::vector<Bad> bads = {
        {"NaN in slices 63 and 1", {{150000, nan}, {3000, nan}}, sample, {}, 3000},
        {"NaN in slices 63 and 1, greedy", {{150000, nan}, {3000, nan}}, greedy, {}, 3000},
        {"Inf at a slice's last id, NaN at the next's first", {{2 * L, nan}, {2 * L - 1, inf}}, sample, {}, 2 * L - 1},
        {"-Inf at 0, NaN in the last slice", {{0, -inf}, {kVocab - 1, nan}}, greedy, {}, 0},
        {"NaN at the last id only", {{kVocab - 1, nan}}, sample, {}, kVocab - 1},
        {"penalty overflow in two slices", {{140000, 3e38f}, {5000, 3e38f}}, rep, {140000, 5000, 9}, 5000},
        {"temperature overflow in two slices", {{100000, 3e38f}, {7000, -3e38f}}, hot, {}, 7000},
    };
    std::mt19937 rng(3);
    std::normal_distribution<float> d(0.0f, 1.0f);
    for (int logprobs = 0; logprobs < 2; ++logprobs) {
        std::vector<float> logits;
        std::vector<Row> rs;
        for (const Bad& b : bads) {
            std::vector<float> v(kVocab);
            for (auto& x : v) x = d(rng);
            for (auto [id, x] : b.set) v[id] = x;
            logits.insert(logits.end(), v.begin(), v.end());
            Row row;
            row.c = b.c;
            row.c.name = b.name;
            row.c.logprobs = logprobs;
            row.seq = b.seq;
            rs.push_back(row);
        }
        const Results res = run_rows(kVocab, logits, rs);
        for (size_t i = 0; i < bads.size(); ++i) {
            EXPECT_TRUE(res.now[i].non_finite) << bads[i].name << ": " << describe(res.now[i]);
            EXPECT_EQ(res.now[i].bad_index, bads[i].expect) << bads[i].name << ": " << describe(res.now[i]);
            EXPECT_EQ(res.now[i].token, -1) << bads[i].name;
            EXPECT_EQ(res.now[i].fallback, 0) << bads[i].name;
        }
        check_rows(logprobs ? "non-finite rows with logprobs" : "non-finite rows", kVocab, logits, rs, res);
    }
}

TEST(CudaSampler, NanIsReported) {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: GPU tests skipped";
    std::vector<float> logits(kVocab, 0.5f);
    logits[777] = std::nanf("");
    cuda::DeviceSampleParams p{0.0f, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, 0, 0, 0, 0, 0, -1, 1, 0};
    DeviceBuffer dl(logits.size() * 4), dw(cuda::sample_work_bytes(1, kVocab)), dp(sizeof p),
        dres(sizeof(cuda::DeviceSampleResult)), dummy(4);
    Q3N_CUDA(cudaMemcpy(dl.get(), logits.data(), logits.size() * 4, cudaMemcpyHostToDevice));
    Q3N_CUDA(cudaMemcpy(dp.get(), &p, sizeof p, cudaMemcpyHostToDevice));
    cuda::sample_rows(dl.as<float>(), dw.as<float>(), 1, kVocab, dp.as<cuda::DeviceSampleParams>(), dummy.as<int32_t>(),
                      dummy.as<int32_t>(), dres.as<cuda::DeviceSampleResult>(), nullptr);
    cuda::DeviceSampleResult r;
    Q3N_CUDA(cudaMemcpy(&r, dres.get(), sizeof r, cudaMemcpyDeviceToHost));
    EXPECT_TRUE(r.non_finite);
    EXPECT_EQ(r.bad_index, 777);
}

// 64 rows in one call, each with its own parameters (forced tokens, logprobs on and off, greedy and
// sampling side by side), so that no row's settings leak into another's slices.
TEST(CudaSampler, MixedBatch64) {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: GPU tests skipped";
    const int rows = 64;
    std::mt19937 rng(64);
    const std::vector<float> logits = random_logits(rows, kVocab, rng, 2.0f);
    const std::vector<Case>& cases = standard_cases();
    std::vector<Row> rs(rows);
    for (int r = 0; r < rows; ++r) {
        rs[r].c = cases[r % cases.size()];
        rs[r].c.top_logprobs = r % 21;
        rs[r].c.logprobs = (r / 3) % 2;
        rs[r].seed = 9000 + r;
        rs[r].counter = r * 7;
        if (r % 11 == 5) rs[r].forced = static_cast<int>(rng() % kVocab);
        random_sequence(rs[r], rng, kVocab, 1 + r * 30, r % 13);
    }
    check_rows("mixed batch of 64", kVocab, logits, rs, run_rows(kVocab, logits, rs));
}

TEST(CudaSampler, WorkFitsTheOldContract) {
    for (int vocab : {2304, 4607, 4608, 32000, 151936, cuda::kMaxSampleVocab})
        EXPECT_LE(cuda::sample_work_bytes(3, vocab), size_t(3) * vocab * 4) << "vocab " << vocab;
}

}  // namespace
