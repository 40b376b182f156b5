#include "cpu/fp8_dot.h"

#include <algorithm>
#include <bit>

#include "core/numeric.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define Q3N_HAVE_AVX512BF16_PATH 1
// GCC 12's _mm512_reduce_add_ps expands to code that trips -Wmaybe-uninitialized inside its header.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace q3n::cpu {

#ifdef Q3N_HAVE_AVX512BF16_PATH
namespace {

// bf16 bits of each e4m3 magnitude (codes 0..127; the sign is ORed in separately).
struct Bf16Table {
    alignas(64) uint16_t v[128];
    Bf16Table() {
        for (int i = 0; i < 128; ++i)
            v[i] = static_cast<uint16_t>(std::bit_cast<uint32_t>(e4m3_to_float(static_cast<uint8_t>(i))) >> 16);
        v[127] = v[126];  // 0x7f is NaN in e4m3fn; never in a valid checkpoint
    }
};
const Bf16Table kTable;

}  // namespace

bool fp8_bf16_dot_available() {
    static const bool available = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
    return available;
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
float dot_fp8_row_bf16(const uint16_t* a, const uint8_t* w, const float* a_scales, const float* w_scales, size_t K) {
    const __m512i t0 = _mm512_load_si512(kTable.v), t1 = _mm512_load_si512(kTable.v + 32);
    const __m512i t2 = _mm512_load_si512(kTable.v + 64), t3 = _mm512_load_si512(kTable.v + 96);
    const __m512i mag_mask = _mm512_set1_epi16(0x7f), high_bit = _mm512_set1_epi16(0x40), sign_bit = _mm512_set1_epi16(0x80);
    float acc = 0.0f;
    for (size_t k0 = 0, g = 0; k0 < K; k0 += 128, ++g) {
        const size_t len = std::min<size_t>(128, K - k0);
        __m512 sum = _mm512_setzero_ps();
        for (size_t j = 0; j < len; j += 32) {
            const size_t n = std::min<size_t>(32, len - j);
            const __mmask32 m = n == 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << n) - 1);
            const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(m, w + k0 + j));
            const __m512i mag = _mm512_and_si512(bytes, mag_mask);
            const __m512i lo = _mm512_permutex2var_epi16(t0, mag, t1);  // codes 0..63
            const __m512i hi = _mm512_permutex2var_epi16(t2, mag, t3);  // codes 64..127
            __m512i wv = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(mag, high_bit), lo, hi);
            wv = _mm512_or_si512(wv, _mm512_slli_epi16(_mm512_and_si512(bytes, sign_bit), 8));
            const __m512i av = _mm512_maskz_loadu_epi16(m, a + k0 + j);  // masked lanes are +0
            sum = _mm512_dpbf16_ps(sum, (__m512bh)av, (__m512bh)wv);
        }
        acc += _mm512_reduce_add_ps(sum) * a_scales[g] * w_scales[g];
    }
    return acc;
}

#else

bool fp8_bf16_dot_available() { return false; }

float dot_fp8_row_bf16(const uint16_t*, const uint8_t*, const float*, const float*, size_t) { return 0.0f; }

#endif

}  // namespace q3n::cpu
