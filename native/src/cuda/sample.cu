// Two launches per call. A row's 600 KB of logits is too much for one SM to walk several times,
// so the first launch ("split") cuts each row into up to 64 slices and gives each slice a block
// that reads it once into shared memory and derives everything later steps need from it: the
// lowest non-finite index (raw, after penalties, after temperature), the arg-max key, the
// log-sum-exp and softmax-tail partial sums (relative to the slice's own maximum), and two short
// lists of the slice's best keys (for the top log-probabilities and for the sampling candidates).
// The second launch ("merge") gives each row one block that combines the slices' summaries and
// lists, then runs the filters and the draw exactly as the single-block sampler did (decide();
// with no top-k it first tries the best 64 candidates and merges all 1024 only when those do not
// settle the row; top-k above 1024 is bounded there, see decide()).
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
// A step at distance j <= 32 pairs, for pair index t, elements inside [64 * (t / 32), + 64): with
// kThreads a multiple of 32, every thread of a warp works inside blocks of 64 that no other warp
// touches in that step. So between two such steps a __syncwarp orders the shared-memory accesses;
// only the 10 steps at distance 64..512 (and the end) need the whole block (10 block barriers of
// 55 steps for 1024 keys instead of 55).
template <int kThreads>
__device__ void bitonic_sort_desc(uint64_t* a, int n) {
    static_assert(kThreads % 32 == 0);
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
            // The next step's distance: j / 2, or the next k's first (k); none after the last.
            const bool last = k == size && j == 1;
            const int next = j > 1 ? j >> 1 : k;
            if (!last && j <= 32 && next <= 32) __syncwarp();
            else __syncthreads();
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
        const bool penalize = p.repetition_penalty != 1.0f || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f;
        const int top_want = min(min(max(p.top_logprobs, 0), kMaxTop), len);
        const int k = (p.top_k <= 0 || p.top_k >= vocab) ? vocab : p.top_k;
        const int want = min(k, kMaxCandidates);
        // With temperature 1 and no penalties the sampling values are the raw logits: the
        // candidate list (then sorted) starts with the top-logprob list, and the tail sum is the
        // log-sum-exp share, bit for bit (same values, same maximum, same reduction). Both are
        // taken from there instead of being computed twice.
        const bool same_values = logprobs && p.forced_token < 0 && p.temperature == 1.0f && p.top_k != 1 && !penalize;
        const bool top_from_cands = same_values && top_want <= want;
        // 2. Log-probabilities of the raw logits: this slice's share of the log-sum-exp, and its
        // best top_logprobs keys.
        if (logprobs) {
            st.raw_max = block_max_key<kSplitWarps>(best, kscratch);
            const float mx = key_value(st.raw_max);
            double s = 0.0;
            for (int i = tid; i < len; i += kSplitThreads) s += static_cast<double>(expf(vals[i] - mx));
            st.raw_sum = block_sum_double<kSplitWarps>(s, dscratch);
            st.top_count = top_want;
            if (st.top_count > 0 && !top_from_cands)
                slice_select(key_at, len, st.top_count, false, top_list, sel, hist, bcast, &slot);
        }
        if (p.forced_token < 0) {
            // 3. Penalties on this slice's share of the sequence's distinct ids (host rules:
            // repetition first, then presence + frequency * count, each product and sum rounded).
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
                    uint64_t mk = 0;
                    for (int i = tid; i < len; i += kSplitThreads) mk = max(mk, key_at(i));
                    st.pen_max = block_max_key<kSplitWarps>(mk, kscratch);
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
                        if (same_values) {
                            st.w_max = key_value(st.raw_max);
                            st.w_sum = st.raw_sum;
                        } else {
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
                        }
                        // 6. This slice's best `want`: a superset of its share of the row's best `want`.
                        st.cand_count = min(want, len);
                        if (st.cand_count > 0) {
                            slice_select(key_at, len, st.cand_count, want > kFirstTake || top_from_cands, cand_list, sel,
                                         hist, bcast, &slot);
                            // sel still holds the sorted list (slice_select ends with a barrier).
                            if (top_from_cands)
                                for (int i = tid; i < st.top_count; i += kSplitThreads) top_list[i] = sel[i];
                        }
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
    int unresolved;
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

// Relative slack on the bounds below. A double sum of N positive terms, in any order, is within
// about N * 2^-53 of the exact sum (N <= 2^19 here: ~6e-11), and so are the bounds' own roundings:
// with 1e-9 a conclusion drawn from a bound also holds for the rounded sums (the host's included),
// so a row settled from bounds gets the answer it would get from the exact sums.
constexpr double kSlack = 1e-9;

struct Decision {
    int token;
    int fallback;
    int resolved;  // 0: the first m candidates do not settle it, decide again with all n
};

// Warp-wide (all 32 lanes, uniform arguments). Runs the host's top-p, min-p and draw over the
// sorted candidates (s.cand, s.u.draw.weight, s.u.draw.prefix: the first m of the n best, m <= n,
// n = min(k, kMaxCandidates)), with s_all the whole-vocabulary weight sum when k > n.
//
// What lies past the n candidates (k > n):
//  - no top-k (k == vocab): the k weights sum to s_all. A top-p cut, a min-p cut or the draw that
//    reaches past the n candidates hands the row to the host (fallback).
//  - top-k above kMaxCandidates (n < k < vocab): the host limits everything to the best k, so the
//    sum that top-p and the draw use is S_k, the sum of the k best weights, which the device does
//    not hold. Every weight ranked n or later is <= w[n-1], so
//        max(pre[n-1], s_all - (vocab - k) * w[n-1]) <= S_k <= min(s_all, pre[n-1] + (k - n) * w[n-1]).
//    Where the top-p cut (or the draw with no cut) falls at the same candidate for every S_k in
//    those bounds, that is the host's answer; otherwise, or where it falls past the n candidates,
//    the row goes to the host. min-p needs no sum: the ranks past n weigh <= w[n-1], so when
//    w[n-1] < min_p they all go; otherwise (with no top-p cut) the row goes to the host.
// With m < n (stage A, no top-k only), pre[n-1] <= pre[m-1] + (n - m) * w[m-1] likewise decides
// whether all n candidates would reach a cut or the draw; when the m do not settle the row exactly
// as the n would, the result is unresolved.
__device__ Decision decide(const MergeShared& s, int m, int n, int k, int vocab, double s_all,
                           const DeviceSampleParams& p) {
    const float* wt = s.u.draw.weight;
    const double* pre = s.u.draw.prefix;
    const bool tail = k > n, partial = m < n;
    // Bounds on the sum of the k best weights.
    double lo = 0.0, hi = 0.0;
    if (!tail) {
        lo = hi = pre[n - 1];
    } else if (k == vocab) {
        lo = hi = s_all;
    } else {
        const double wn = wt[n - 1];
        lo = fmax(pre[n - 1], s_all - static_cast<double>(vocab - k) * wn) * (1.0 - kSlack);
        hi = fmin(s_all, pre[n - 1] + static_cast<double>(k - n) * wn) * (1.0 + kSlack);
    }
    // An upper bound on the running sum of all n candidates.
    const double reach = partial ? (pre[m - 1] + static_cast<double>(n - m) * wt[m - 1]) * (1.0 + kSlack) : pre[n - 1];
    Decision d{-1, 0, 1};
    int kept = n;
    bool kept_is_all = true;  // kept still includes whatever lies past the candidates
    if (p.top_p < 1.0f) {
        const double t_lo = static_cast<double>(p.top_p) * lo, t_hi = static_cast<double>(p.top_p) * hi;
        const int a = warp_first(m, [&](int j) { return pre[j] >= t_lo; });
        const int b = lo == hi ? a : warp_first(m, [&](int j) { return pre[j] >= t_hi; });
        if (b < m && a == b) {
            kept = a + 1;
            kept_is_all = false;
        } else if (tail) {
            if (partial && !(reach < t_lo)) d.resolved = 0;  // the cut may lie in [m, n)
            else d.fallback = 1;                             // past the candidates, or not pinned down
            return d;
        }
    }
    if (p.min_p > 0.0f) {
        // Drop trailing candidates below min_p, never the first: keep through the last j >= 1
        // whose weight is >= min_p.
        if (kept > m) {
            // Stage A, nothing cut yet: settled only if the candidates from m - 1 on all fall.
            if (!(wt[m - 1] < p.min_p)) {
                d.resolved = 0;
                return d;
            }
            const int j = warp_last(1, m, [&](int i) { return wt[i] >= p.min_p; });
            kept = j >= 1 ? j + 1 : 1;
            kept_is_all = false;
        } else {
            const int j = warp_last(1, kept, [&](int i) { return wt[i] >= p.min_p; });
            const int nk = j >= 1 ? j + 1 : 1;
            if (nk != kept) {
                kept = nk;
                kept_is_all = false;
            }
            // Candidates past the last one could still weigh >= min_p: only the host can tell.
            if (tail && kept_is_all && wt[n - 1] >= p.min_p) {
                d.fallback = 1;
                return d;
            }
        }
    }
    const double u = static_cast<double>(uniform(p.seed, p.counter));
    if (tail && kept_is_all) {
        // Nothing cut: the draw is over all k, total S_k.
        const double t_lo = u * lo, t_hi = u * hi;
        const int a = warp_first(m, [&](int j) { return pre[j] > t_lo; });
        const int b = lo == hi ? a : warp_first(m, [&](int j) { return pre[j] > t_hi; });
        if (b < m && a == b) d.token = key_id(s.cand[a]);
        else if (partial && !(reach <= t_lo)) d.resolved = 0;  // the draw may land in [m, n)
        else d.fallback = 1;                                   // in the tail, or not pinned down
        return d;
    }
    const double threshold = u * pre[kept - 1];
    const int i = warp_first(kept, [&](int j) { return pre[j] > threshold; });
    d.token = key_id(s.cand[i < kept ? i : kept - 1]);
    return d;
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
    // 6. The candidates: the best n = min(k, kMaxCandidates), sorted, with their fp32 weights and
    // running sums. With no top-k the draw usually ends within the first few: stage A takes only
    // the best m = kFirstTake, and decide() tells whether they settle the row exactly as all n
    // would (stage B, all n, only when they do not).
    const int k = (p.top_k <= 0 || p.top_k >= vocab) ? vocab : p.top_k;
    const int n = min(k, kMaxCandidates);
    const bool tail = k > n;
    const int m = tail && k == vocab ? min(n, kFirstTake) : n;
    for (int stage = 0; stage < 2; ++stage) {
        const int count = stage == 0 ? m : n;
        merge_lists(cand_lists, g.cand_cap, st, false, g.slices, count, s);
        const float top = key_value(s.cand[0]);
        for (int i = tid; i < count; i += kMergeThreads) s.u.draw.weight[i] = expf(key_value(s.cand[i]) - top);
        __syncthreads();
        if (tid == 0) {
            // The running sums in candidate order, one after another in double: the host's (and
            // the single-block sampler's) exact roundings, which a parallel scan would not reproduce.
            double run = 0.0;
#pragma unroll 8
            for (int i = 0; i < count; ++i) {
                run += static_cast<double>(s.u.draw.weight[i]);
                s.u.draw.prefix[i] = run;
            }
        } else if (stage == 0 && tail && tid >= 32 && tid < 64) {
            // 7. Meanwhile, the whole-vocabulary weight sum (the candidates are not all of the k).
            double sum = 0.0;
            for (int t = lane; t < g.slices; t += 32)
                if (st[t].len > 0) sum += st[t].w_sum * exp(static_cast<double>(st[t].w_max) - static_cast<double>(top));
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            if (lane == 0) s.tail = sum;
        }
        __syncthreads();
        // 8. Filters and the draw.
        if (tid < 32) {
            const Decision d = decide(s, count, n, k, vocab, tail ? s.tail : 0.0, p);
            if (lane == 0) {
                s.unresolved = !d.resolved;
                if (d.resolved) write_token(out, d.token, d.fallback, logprobs, raw, lse);
            }
        }
        if (count == n) return;  // decide() always settles all n
        __syncthreads();
        if (!s.unresolved) return;
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
