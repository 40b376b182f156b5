// Two launches per call. A row's 600 KB of logits is too much for one SM to walk several times,
// so the first launch ("split") cuts each row into up to 64 slices and gives each slice a block
// that reads it once into shared memory and derives everything later steps need from it: the
// lowest non-finite index (raw, after penalties, after temperature), the arg-max key, the
// log-sum-exp and softmax-tail partial sums (relative to the slice's own maximum), and two short
// lists of the slice's best keys (for the top log-probabilities and for the sampling candidates).
// The second launch ("merge") gives each row one block that combines the slices' summaries and
// lists, then runs the filters and the draw exactly as the single-block sampler did.
//
// Order everywhere is the 64-bit rank key (value descending, then id ascending, -0 == +0), the
// host sampler's order, so the selected sets never depend on which slice an id falls in.

#include <algorithm>
#include <cfloat>
#include <climits>
#include <string>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/sample.h"

namespace q3n::cuda {
namespace {

constexpr int kSplitThreads = 512;
constexpr int kSplitWarps = kSplitThreads / 32;
constexpr int kMergeThreads = 1024;
constexpr int kMergeWarps = kMergeThreads / 32;
constexpr int kMaxSlices = 64;
// 2,304 ids per slice at least keeps the scratch within the old [rows, vocab] fp32 buffer (a slice
// of that length holds its 8 KB candidate list in 9 KB); 4,608 at most follows (slices = vocab / 2304).
constexpr int kMinSliceLen = 2304;
constexpr int kMaxSliceLen = 4608;
static_assert(kMaxSlices * kMaxSliceLen == kMaxSampleVocab);
constexpr int kMaxTop = Q3N_MAX_TOP_LOGPROBS;
// The merge first takes this many keys of each slice's candidate list; a slice whose next key
// would still make the cut gives four times as many in the next round (64 -> 256 -> 1024).
constexpr int kFirstTake = 64;
constexpr int kUnionCap = kMaxSlices * kFirstTake;  // also >= 4 * kMaxCandidates, the bound after a round
static_assert(kUnionCap >= 4 * kMaxCandidates);
constexpr int kMaxRounds = 8;                       // three suffice (see merge_lists); a guard only

// One slice's summary, written by split_kernel for the merge.
struct SliceStats {
    uint64_t raw_max;  // rank key of the largest raw logit (with logprobs)
    uint64_t pen_max;  // rank key of the largest penalised logit (greedy)
    double raw_sum;    // sum of expf(raw - raw max value), in double (with logprobs)
    double w_sum;      // sum of expf(w - w_max), w after penalties and temperature (when the tail counts)
    float w_max;
    int32_t bad_raw;   // lowest id with a non-finite raw logit; INT_MAX if none
    int32_t bad_pen;   // lowest penalised id that overflowed
    int32_t bad_temp;  // lowest id that overflowed after the temperature
    int32_t top_count;   // keys in this slice's top-logprob list
    int32_t cand_count;  // keys in this slice's candidate list
    int32_t len;         // ids in the slice
    int32_t pad;
};
static_assert(sizeof(SliceStats) == 64);

// Per-row scratch: SliceStats[slices], then uint64 top lists [slices][kMaxTop], then uint64
// candidate lists [slices][cand_cap]. Depends on the vocabulary only.
struct Geometry {
    int slices, slice_len, cand_cap;
    size_t top_offset, cand_offset, row_bytes;
};

Geometry geometry(int vocab) {
    Geometry g{};
    g.slices = std::clamp(vocab / kMinSliceLen, 1, kMaxSlices);
    g.slice_len = (vocab + g.slices - 1) / g.slices;
    g.cand_cap = std::min(kMaxCandidates, g.slice_len);
    g.top_offset = size_t(g.slices) * sizeof(SliceStats);
    g.cand_offset = g.top_offset + size_t(g.slices) * kMaxTop * sizeof(uint64_t);
    g.row_bytes = (g.cand_offset + size_t(g.slices) * g.cand_cap * sizeof(uint64_t) + 255) / 256 * 256;
    return g;
}

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

// Larger key = larger float.
__device__ __forceinline__ uint32_t order_key(float v) {
    const uint32_t u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// A (value, id) pair as one 64-bit key whose unsigned order is the sampler's order: larger value
// first, then lower id. Keys of one row are all distinct, which every selection below relies on.
// Finite values give keys > 0, so 0 can pad and mean "none".
__device__ __forceinline__ uint64_t rank_key(float v, int id) {
    if (v == 0.0f) v = 0.0f;  // -0 and +0 compare equal on the host: the id decides
    return (static_cast<uint64_t>(order_key(v)) << 32) | static_cast<uint32_t>(0x7fffffff - id);
}
__device__ __forceinline__ int key_id(uint64_t k) { return 0x7fffffff - static_cast<int>(k & 0xffffffffu); }
__device__ __forceinline__ float key_value(uint64_t k) {
    const uint32_t o = static_cast<uint32_t>(k >> 32);
    return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}

// Block reductions; every thread gets the result. The leading barrier lets a call reuse the
// scratch that the previous call's threads may still be reading.
template <int kWarps>
__device__ uint64_t block_max_key(uint64_t k, uint64_t* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) k = max(k, __shfl_xor_sync(0xffffffffu, k, o));
    __syncthreads();
    if (lane == 0) scratch[warp] = k;
    __syncthreads();
    uint64_t r = scratch[0];
    for (int w = 1; w < kWarps; ++w) r = max(r, scratch[w]);
    return r;
}

template <int kWarps>
__device__ int block_min_int(int v, int* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int r = scratch[0];
    for (int w = 1; w < kWarps; ++w) r = min(r, scratch[w]);
    return r;
}

template <int kWarps>
__device__ double block_sum_double(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double r = 0.0;
    for (int w = 0; w < kWarps; ++w) r += scratch[w];
    return r;
}

// Radix select over n distinct 64-bit keys (key_at(i), i < n): returns P such that exactly m
// keys (1 <= m <= n) are >= P. One byte per pass from the top; it stops as soon as the bucket
// holding the m-th key is taken whole, so distinct floats rarely need more than 3 or 4 passes.
// Ends with every thread past its last read of hist and bcast, so both may be reused at once.
template <int kThreads, class KeyAt>
__device__ uint64_t radix_select(KeyAt key_at, int n, int m, int* hist, int* bcast) {
    const int tid = threadIdx.x, lane = tid & 31;
    uint64_t prefix = 0;
    int remaining = m;  // keys still to take among those matching `prefix` in the bits above `shift`
    for (int shift = 56; shift >= 0; shift -= 8) {
        const uint64_t high = shift == 56 ? 0ull : ~0ull << (shift + 8);
        for (int i = tid; i < 256; i += kThreads) hist[i] = 0;
        __syncthreads();
        for (int i = tid; i < n; i += kThreads) {
            const uint64_t k = key_at(i);
            if ((k & high) == prefix) atomicAdd(&hist[(k >> shift) & 0xffu], 1);
        }
        __syncthreads();
        if (tid < 32) {
            // Lane l holds buckets 8l..8l+7; a suffix scan over lanes finds the one lane whose
            // buckets contain the remaining-th largest key, and that lane walks down its eight.
            int c[8], own = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                c[j] = hist[lane * 8 + j];
                own += c[j];
            }
            int incl = own;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int y = __shfl_down_sync(0xffffffffu, incl, o);
                if (lane + o < 32) incl += y;
            }
            const int above = incl - own;
            if (above < remaining && incl >= remaining) {
                int acc = above;
                bool found = false;
#pragma unroll
                for (int j = 7; j >= 0; --j) {
                    if (!found && acc + c[j] >= remaining) {
                        found = true;
                        bcast[0] = lane * 8 + j;
                        bcast[1] = remaining - acc;
                        bcast[2] = c[j] == remaining - acc;
                    }
                    if (!found) acc += c[j];
                }
            }
        }
        __syncthreads();
        prefix |= static_cast<uint64_t>(bcast[0]) << shift;
        remaining = bcast[1];
        const bool whole = bcast[2] != 0;
        if (whole) break;  // keys >= prefix are exactly the m wanted (at shift 0 the bucket is one key)
    }
    __syncthreads();  // bcast is read above; the next call's winner lane may write it
    return prefix;
}

// Sorts a[0, n) descending (n <= 1024), using a[n, next power of two) as padding.
template <int kThreads>
__device__ void bitonic_sort_desc(uint64_t* a, int n) {
    const int tid = threadIdx.x;
    int size = 1;
    while (size < n) size <<= 1;
    for (int i = n + tid; i < size; i += kThreads) a[i] = 0;
    __syncthreads();
    for (int k = 2; k <= size; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int t = tid; t < size / 2; t += kThreads) {
                const int i = 2 * t - (t & (j - 1));  // the pair's lower index: bit j clear
                const uint64_t x = a[i], y = a[i + j];
                const bool descending = (i & k) == 0;
                if ((x < y) == descending) {
                    a[i] = y;
                    a[i + j] = x;
                }
            }
            __syncthreads();
        }
    }
}

// split_kernel: writes the m largest keys of the slice (key_at(i), i < len) to `out`, sorted
// descending when `sorted` (the merge reads prefixes of sorted lists only), else in any order.
template <class KeyAt>
__device__ void slice_select(KeyAt key_at, int len, int m, bool sorted, uint64_t* out, uint64_t* sel, int* hist,
                             int* bcast, int* slot) {
    const int tid = threadIdx.x;
    const uint64_t threshold = m < len ? radix_select<kSplitThreads>(key_at, len, m, hist, bcast) : 0;
    __syncthreads();  // the previous user of slot is done
    if (tid == 0) *slot = 0;
    __syncthreads();
    for (int i = tid; i < len; i += kSplitThreads) {
        const uint64_t k = key_at(i);
        if (k >= threshold) {
            const int at = atomicAdd(slot, 1);
            if (at < kMaxCandidates) sel[at] = k;  // at < m always; a guard only
        }
    }
    __syncthreads();
    if (sorted) bitonic_sort_desc<kSplitThreads>(sel, m);
    for (int i = tid; i < m; i += kSplitThreads) out[i] = sel[i];
    __syncthreads();  // sel and slot are free again
}

__global__ void __launch_bounds__(kSplitThreads) split_kernel(const float* __restrict__ logits,
                                                              unsigned char* __restrict__ work, int vocab, Geometry g,
                                                              const DeviceSampleParams* __restrict__ all_params,
                                                              const int32_t* __restrict__ pen_ids,
                                                              const int32_t* __restrict__ pen_counts) {
    __shared__ float vals[kMaxSliceLen];
    __shared__ uint64_t sel[kMaxCandidates];
    __shared__ int hist[256];
    __shared__ int bcast[4];
    __shared__ uint64_t kscratch[kSplitWarps];
    __shared__ double dscratch[kSplitWarps];
    __shared__ int iscratch[kSplitWarps];
    __shared__ int bad_shared;
    __shared__ int slot;

    const int tid = threadIdx.x;
    const int row = blockIdx.x / g.slices, slice = blockIdx.x - row * g.slices;
    const DeviceSampleParams p = all_params[row];
    const int begin = slice * g.slice_len;
    const int len = max(0, min(vocab - begin, g.slice_len));
    const float* raw = logits + size_t(row) * vocab + begin;
    unsigned char* base = work + size_t(row) * g.row_bytes;
    uint64_t* top_list = reinterpret_cast<uint64_t*>(base + g.top_offset) + size_t(slice) * kMaxTop;
    uint64_t* cand_list = reinterpret_cast<uint64_t*>(base + g.cand_offset) + size_t(slice) * g.cand_cap;
    const bool logprobs = p.want_logprobs != 0;
    auto key_at = [&](int i) { return rank_key(vals[i], begin + i); };

    SliceStats st{};
    st.bad_raw = st.bad_pen = st.bad_temp = INT_MAX;
    st.len = len;

    // 1. The one read of the logits.
    int bad = INT_MAX;
    uint64_t best = 0;
#pragma unroll 4
    for (int i = tid; i < len; i += kSplitThreads) {
        const float v = raw[i];
        vals[i] = v;
        if (!isfinite(v)) bad = min(bad, begin + i);
        best = max(best, rank_key(v, begin + i));
    }
    st.bad_raw = block_min_int<kSplitWarps>(bad, iscratch);
    // A non-finite logit anywhere ends the row in the merge before it reads anything else.
    if (st.bad_raw == INT_MAX) {
        // 2. Log-probabilities of the raw logits: this slice's share of the log-sum-exp, and its
        // best top_logprobs keys.
        if (logprobs) {
            st.raw_max = block_max_key<kSplitWarps>(best, kscratch);
            const float mx = key_value(st.raw_max);
            double s = 0.0;
            for (int i = tid; i < len; i += kSplitThreads) s += static_cast<double>(expf(vals[i] - mx));
            st.raw_sum = block_sum_double<kSplitWarps>(s, dscratch);
            st.top_count = min(min(max(p.top_logprobs, 0), kMaxTop), len);
            if (st.top_count > 0) slice_select(key_at, len, st.top_count, false, top_list, sel, hist, bcast, &slot);
        }
        if (p.forced_token < 0) {
            // 3. Penalties on this slice's share of the sequence's distinct ids (host rules:
            // repetition first, then presence + frequency * count, each product and sum rounded).
            const bool penalize =
                p.repetition_penalty != 1.0f || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f;
            __syncthreads();  // every reader of the raw values in step 2 is done
            if (tid == 0) bad_shared = INT_MAX;
            __syncthreads();
            if (penalize) {
                for (int j = tid; j < p.penalty_count; j += kSplitThreads) {
                    const int id = pen_ids[p.penalty_offset + j];
                    if (id < begin || id >= begin + len) continue;
                    const int c = pen_counts[p.penalty_offset + j];
                    float v = vals[id - begin];
                    if (p.repetition_penalty != 1.0f)
                        v = v > 0.0f ? __fdiv_rn(v, p.repetition_penalty) : __fmul_rn(v, p.repetition_penalty);
                    if (c > 0 && (p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f))
                        v = __fsub_rn(v, __fadd_rn(p.presence_penalty, __fmul_rn(p.frequency_penalty, static_cast<float>(c))));
                    if (!isfinite(v)) atomicMin(&bad_shared, id);
                    vals[id - begin] = v;
                }
            }
            __syncthreads();
            st.bad_pen = bad_shared;
            if (st.bad_pen == INT_MAX) {
                if (p.temperature == 0.0f || p.top_k == 1) {
                    // 4. Greedy (or top-k 1: division keeps the order): the arg-max only.
                    uint64_t k = 0;
                    for (int i = tid; i < len; i += kSplitThreads) k = max(k, key_at(i));
                    st.pen_max = block_max_key<kSplitWarps>(k, kscratch);
                } else {
                    // 5. Temperature (a true division, as on the host).
                    int bt = INT_MAX;
                    if (p.temperature != 1.0f) {
                        for (int i = tid; i < len; i += kSplitThreads) {
                            const float w = __fdiv_rn(vals[i], p.temperature);
                            vals[i] = w;
                            if (!isfinite(w)) bt = min(bt, begin + i);
                        }
                    }
                    st.bad_temp = block_min_int<kSplitWarps>(bt, iscratch);
                    if (st.bad_temp == INT_MAX) {
                        const int k = (p.top_k <= 0 || p.top_k >= vocab) ? vocab : p.top_k;
                        const int want = min(k, kMaxCandidates);
                        uint64_t mk = 0;
                        for (int i = tid; i < len; i += kSplitThreads) mk = max(mk, key_at(i));
                        st.w_max = key_value(block_max_key<kSplitWarps>(mk, kscratch));
                        if (k > want) {
                            // The whole-vocabulary weight sum, needed when the candidates are not all of the k.
                            double s = 0.0;
                            for (int i = tid; i < len; i += kSplitThreads)
                                s += static_cast<double>(expf(vals[i] - st.w_max));
                            st.w_sum = block_sum_double<kSplitWarps>(s, dscratch);
                        }
                        // 6. This slice's best `want`: a superset of its share of the row's best `want`.
                        st.cand_count = min(want, len);
                        if (st.cand_count > 0)
                            slice_select(key_at, len, st.cand_count, want > kFirstTake, cand_list, sel, hist, bcast, &slot);
                    }
                }
            }
        }
    }
    if (tid == 0) reinterpret_cast<SliceStats*>(base)[slice] = st;
}

union MergeSpace {
    uint64_t keys[kUnionCap];  // the union of the slices' lists while selecting
    struct {
        float weight[kMaxCandidates];   // then the candidates' weights
        double prefix[kMaxCandidates];  // and their running sums
    } draw;
};

struct MergeShared {
    MergeSpace u;
    uint64_t cand[kMaxCandidates];
    int hist[256];
    int bcast[4];
    int taken[kMaxSlices];
    int avail[kMaxSlices];
    int offset[kMaxSlices + 1];
    int slot;
    int bad_raw, bad_pen, bad_temp;
    uint64_t pen_max;
    float lse;
    double tail;
};

// merge_kernel: fills s.cand[0, want) with the `want` largest keys of the row, descending. Slice
// t's list (count from its stats) holds its `count` best keys, so it holds every one of its keys
// among the row's best `want`. Rather than read all lists whole (64 x 1024 keys when want is 1024),
// take kFirstTake of each, find the want-th largest key T of what was taken, and ask each slice
// whether its next key is >= T. If none is, every key >= T was taken, and the taken set's best
// `want` are the row's. Otherwise the slices that answered yes give four times as many (their
// lists are sorted whenever want > kFirstTake) and the others keep only their keys >= T (their
// next key is below T, and T never decreases): at most 4 * want keys, so kUnionCap always holds
// them. A slice that answered no never answers yes later, and one that did reaches its whole list
// after two rounds of growth (64 * 16 >= 1024): three rounds at most.
__device__ void merge_lists(const uint64_t* lists, int stride, const SliceStats* st, bool top_lists, int slices,
                            int want, MergeShared& s) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (tid < slices) {
        const int n = st[tid].len > 0 ? (top_lists ? st[tid].top_count : st[tid].cand_count) : 0;
        s.avail[tid] = n;
        s.taken[tid] = min(n, kFirstTake);
    }
    __syncthreads();
    uint64_t threshold = 0;
    int total = 0;
    for (int round = 0;; ++round) {
        if (tid == 0) {
            int run = 0;
            for (int t = 0; t < slices; ++t) {
                s.offset[t] = run;
                run += s.taken[t];
            }
            s.offset[slices] = run;
        }
        __syncthreads();
        total = min(s.offset[slices], kUnionCap);
        for (int t = warp; t < slices; t += kMergeWarps) {
            const int o = s.offset[t], n = min(s.taken[t], kUnionCap - o);
            const uint64_t* src = lists + size_t(t) * stride;
            for (int j = lane; j < n; j += 32) s.u.keys[o + j] = src[j];
        }
        __syncthreads();
        threshold = total > want
                        ? radix_select<kMergeThreads>([&](int i) { return s.u.keys[i]; }, total, want, s.hist, s.bcast)
                        : 0;
        const bool more = tid < slices && s.taken[tid] < s.avail[tid] &&
                          lists[size_t(tid) * stride + s.taken[tid]] >= threshold;
        if (!__syncthreads_or(more) || round == kMaxRounds) break;
        if (tid < slices) {
            if (more) {
                s.taken[tid] = min(s.avail[tid], 4 * s.taken[tid]);
            } else {
                // This slice's taken keys are a sorted prefix: keep those >= threshold.
                const uint64_t* seg = s.u.keys + s.offset[tid];
                int lo = 0, hi = s.taken[tid];
                while (lo < hi) {
                    const int mid = (lo + hi) >> 1;
                    if (seg[mid] >= threshold) lo = mid + 1;
                    else hi = mid;
                }
                s.taken[tid] = lo;
            }
        }
        __syncthreads();
    }
    if (tid == 0) s.slot = 0;
    __syncthreads();
    for (int i = tid; i < total; i += kMergeThreads) {
        const uint64_t k = s.u.keys[i];
        if (k >= threshold) {
            const int at = atomicAdd(&s.slot, 1);
            if (at < kMaxCandidates) s.cand[at] = k;  // exactly `want` land here; a guard only
        }
    }
    __syncthreads();
    bitonic_sort_desc<kMergeThreads>(s.cand, want);
}

__device__ void write_non_finite(DeviceSampleResult& out, int index) {
    out.token = -1;
    out.non_finite = 1;
    out.bad_index = index;
    out.fallback = 0;
}

__device__ void write_token(DeviceSampleResult& out, int token, int fallback, bool logprobs, const float* raw, float lse) {
    out.non_finite = 0;
    out.bad_index = -1;
    out.fallback = fallback;
    out.token = fallback ? -1 : token;
    if (logprobs && !fallback) {
        out.logprob.token = token;
        out.logprob.logprob = raw[token] - lse;
    }
}

// Warp-wide: the first i in [0, n) with pred(i), or n.
template <class Pred>
__device__ int warp_first(int n, Pred pred) {
    const int lane = threadIdx.x & 31;
    for (int base = 0; base < n; base += 32) {
        const int i = base + lane;
        const unsigned hits = __ballot_sync(0xffffffffu, i < n && pred(i));
        if (hits) return base + __ffs(hits) - 1;
    }
    return n;
}

// Warp-wide: the last i in [lo, hi) with pred(i), or lo - 1.
template <class Pred>
__device__ int warp_last(int lo, int hi, Pred pred) {
    const int lane = threadIdx.x & 31;
    for (int top = hi; top > lo; top -= 32) {
        const int i = top - 32 + lane;
        const unsigned hits = __ballot_sync(0xffffffffu, i >= lo && pred(i));
        if (hits) return top - 32 + 31 - __clz(hits);
    }
    return lo - 1;
}

__global__ void __launch_bounds__(kMergeThreads) merge_kernel(const float* __restrict__ logits,
                                                              const unsigned char* __restrict__ work, int vocab,
                                                              Geometry g, const DeviceSampleParams* __restrict__ all_params,
                                                              DeviceSampleResult* __restrict__ results) {
    __shared__ MergeShared s;
    const int tid = threadIdx.x, lane = tid & 31;
    const int row = blockIdx.x;
    const DeviceSampleParams p = all_params[row];
    const unsigned char* base = work + size_t(row) * g.row_bytes;
    const SliceStats* st = reinterpret_cast<const SliceStats*>(base);
    const uint64_t* top_lists = reinterpret_cast<const uint64_t*>(base + g.top_offset);
    const uint64_t* cand_lists = reinterpret_cast<const uint64_t*>(base + g.cand_offset);
    const float* raw = logits + size_t(row) * vocab;
    DeviceSampleResult& out = results[row];
    const bool logprobs = p.want_logprobs != 0;

    if (tid < 32) {
        int br = INT_MAX, bp = INT_MAX, bt = INT_MAX;
        uint64_t rm = 0, pm = 0;
        for (int t = lane; t < g.slices; t += 32) {
            br = min(br, st[t].bad_raw);
            bp = min(bp, st[t].bad_pen);
            bt = min(bt, st[t].bad_temp);
            rm = max(rm, st[t].raw_max);
            pm = max(pm, st[t].pen_max);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            br = min(br, __shfl_xor_sync(0xffffffffu, br, o));
            bp = min(bp, __shfl_xor_sync(0xffffffffu, bp, o));
            bt = min(bt, __shfl_xor_sync(0xffffffffu, bt, o));
            rm = max(rm, __shfl_xor_sync(0xffffffffu, rm, o));
            pm = max(pm, __shfl_xor_sync(0xffffffffu, pm, o));
        }
        // The log-sum-exp from the slices' sums, each rescaled from its slice maximum to the row's
        // (in double; the terms stay expf of fp32 differences, as on the host).
        const float mx = key_value(rm);
        double sum = 0.0;
        if (logprobs && br == INT_MAX)
            for (int t = lane; t < g.slices; t += 32)
                if (st[t].len > 0)
                    sum += st[t].raw_sum * exp(static_cast<double>(key_value(st[t].raw_max)) - static_cast<double>(mx));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if (lane == 0) {
            s.bad_raw = br;
            s.bad_pen = bp;
            s.bad_temp = bt;
            s.pen_max = pm;
            s.lse = logprobs ? mx + static_cast<float>(log(sum)) : 0.0f;
        }
    }
    __syncthreads();

    // 1. A NaN/Inf logit: the lowest such index, like the host.
    if (s.bad_raw != INT_MAX) {
        if (tid == 0) write_non_finite(out, s.bad_raw);
        return;
    }
    // 2. Log-probabilities of the raw logits.
    const float lse = s.lse;
    if (logprobs) {
        const int tn = min(min(max(p.top_logprobs, 0), kMaxTop), vocab);
        if (tn > 0) {
            merge_lists(top_lists, kMaxTop, st, true, g.slices, tn, s);
            if (tid < tn) {
                out.logprob.top_tokens[tid] = key_id(s.cand[tid]);
                out.logprob.top_logprobs[tid] = key_value(s.cand[tid]) - lse;
            }
        }
        if (tid == 0) out.logprob.num_top = tn;
        __syncthreads();  // s.cand is reused below
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
    // 3. A penalty pushed a logit to +-Inf.
    if (s.bad_pen != INT_MAX) {
        if (tid == 0) write_non_finite(out, s.bad_pen);
        return;
    }
    // 4. Greedy, or top-k 1.
    if (p.temperature == 0.0f || p.top_k == 1) {
        if (tid == 0) write_token(out, key_id(s.pen_max), 0, logprobs, raw, lse);
        return;
    }
    // 5. The temperature pushed a logit to +-Inf.
    if (s.bad_temp != INT_MAX) {
        if (tid == 0) write_non_finite(out, s.bad_temp);
        return;
    }
    // 6. The best min(k, kMaxCandidates) candidates, sorted.
    const int k = (p.top_k <= 0 || p.top_k >= vocab) ? vocab : p.top_k;
    const int n = min(k, kMaxCandidates);
    const bool truncated = k > n;
    merge_lists(cand_lists, g.cand_cap, st, false, g.slices, n, s);
    const float top = key_value(s.cand[0]);
    for (int i = tid; i < n; i += kMergeThreads) s.u.draw.weight[i] = expf(key_value(s.cand[i]) - top);
    if (truncated && tid < 32) {
        // 7. The whole-vocabulary weight sum, needed when the candidates are not all of the k.
        double sum = 0.0;
        for (int t = lane; t < g.slices; t += 32)
            if (st[t].len > 0) sum += st[t].w_sum * exp(static_cast<double>(st[t].w_max) - static_cast<double>(top));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if (lane == 0) s.tail = sum;
    }
    __syncthreads();
    // The running sums in candidate order, one after another in double: the host's (and the
    // single-block sampler's) exact roundings, which a parallel scan would not reproduce.
    if (tid == 0) {
        double run = 0.0;
#pragma unroll 8
        for (int i = 0; i < n; ++i) {
            run += static_cast<double>(s.u.draw.weight[i]);
            s.u.draw.prefix[i] = run;
        }
    }
    __syncthreads();

    // 8. Filters and the draw (host arithmetic); every "first/last i such that" is a warp search
    // over the running sums, which are non-decreasing.
    if (tid < 32) {
        const float* wt = s.u.draw.weight;
        const double* pre = s.u.draw.prefix;
        const double total_k = truncated ? s.tail : pre[n - 1];
        int kept = n, fallback = 0, token = -1;
        bool kept_is_all = true;  // kept still includes whatever lies past the candidates
        if (p.top_p < 1.0f) {
            const double target = static_cast<double>(p.top_p) * total_k;
            const int i = warp_first(n, [&](int j) { return pre[j] >= target; });
            if (i < n) {
                kept = i + 1;
                kept_is_all = false;
            } else if (truncated) {
                fallback = 1;
            }
        }
        if (!fallback && p.min_p > 0.0f) {
            // Drop trailing candidates below min_p, never the first: keep through the last j >= 1
            // whose weight is >= min_p.
            const int j = warp_last(1, kept, [&](int i) { return wt[i] >= p.min_p; });
            const int nk = j >= 1 ? j + 1 : 1;
            if (nk != kept) {
                kept = nk;
                kept_is_all = false;
            }
            // Candidates past the last one could still weigh >= min_p: only the host can tell.
            if (truncated && kept_is_all && wt[n - 1] >= p.min_p) fallback = 1;
        }
        if (!fallback) {
            const bool includes_tail = truncated && kept_is_all;
            const double total = includes_tail ? total_k : pre[kept - 1];
            const double threshold = static_cast<double>(uniform(p.seed, p.counter)) * total;
            const int i = warp_first(kept, [&](int j) { return pre[j] > threshold; });
            if (i < kept) token = key_id(s.cand[i]);
            else if (includes_tail) fallback = 1;  // the draw lands in the tail
            else token = key_id(s.cand[kept - 1]);
        }
        if (lane == 0) write_token(out, token, fallback, logprobs, raw, lse);
    }
}

}  // namespace

size_t sample_work_bytes(int rows, int vocab) {
    return size_t(std::max(rows, 0)) * geometry(std::clamp(vocab, 1, kMaxSampleVocab)).row_bytes;
}

void sample_rows(const float* logits, float* work, int rows, int vocab, const DeviceSampleParams* params,
                 const int32_t* penalty_ids, const int32_t* penalty_counts, DeviceSampleResult* results,
                 cudaStream_t stream) {
    if (rows == 0) return;
    if (vocab < 1 || vocab > kMaxSampleVocab)
        fail(Q3N_ERR_INVALID_ARGUMENT, "sample_rows: vocabulary of " + std::to_string(vocab) + " outside [1, " +
                                           std::to_string(kMaxSampleVocab) + "]");
    const Geometry g = geometry(vocab);
    unsigned char* w = reinterpret_cast<unsigned char*>(work);
    split_kernel<<<rows * g.slices, kSplitThreads, 0, stream>>>(logits, w, vocab, g, params, penalty_ids, penalty_counts);
    Q3N_CUDA_LAUNCHED("sample_rows (split)");
    merge_kernel<<<rows, kMergeThreads, 0, stream>>>(logits, w, vocab, g, params, results);
    Q3N_CUDA_LAUNCHED("sample_rows (merge)");
}

}  // namespace q3n::cuda
