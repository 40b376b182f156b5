// Scalar conversions between the checkpoint number formats and fp32. Bit-exact definitions that
// the vector kernels and the CUDA kernels must reproduce.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace q3n {

inline float bits_to_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint32_t float_to_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even, as torch's .to(torch.bfloat16). NaN stays NaN.
inline uint16_t float_to_bf16(float f) {
    uint32_t u = float_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t man = h & 0x3ffu;
    if (exp == 0) {  // zero or subnormal: man * 2^-24
        float v = std::ldexp(static_cast<float>(man), -24);
        return sign ? -v : v;
    }
    if (exp == 31) return bits_to_float(sign | 0x7f800000u | (man << 13));
    return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

// float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa; no infinities; S.1111.111 is NaN; max 448.
// Placing the 7 magnitude bits at fp32 bit 20 and multiplying by 2^120 maps normals and subnormals
// alike (an fp32 subnormal times 2^120 is exact), which is also how the vector kernels convert.
inline float e4m3_to_float(uint8_t v) {
    if ((v & 0x7fu) == 0x7fu) return std::nanf("");
    const float mag = bits_to_float(static_cast<uint32_t>(v & 0x7fu) << 20) * 0x1p120f;
    return (v & 0x80u) ? -mag : mag;
}

// Round to nearest even with saturation to +-448, as torch's clamp(-448, 448).to(float8_e4m3fn).
inline uint8_t float_to_e4m3(float f) {
    if (std::isnan(f)) return 0x7f;
    const uint8_t sign = std::signbit(f) ? 0x80 : 0x00;
    float a = std::fabs(f);
    if (a >= 448.0f) return sign | 0x7e;
    if (a < 0x1p-6f) {
        // Subnormal range: multiples of 2^-9. rint rounds half to even in the default mode.
        const int m = static_cast<int>(std::nearbyint(a * 512.0f));
        return sign | static_cast<uint8_t>(m);  // m == 8 is the smallest normal, encoded the same way
    }
    int e;
    const float frac = std::frexp(a, &e);  // a = frac * 2^e, frac in [0.5, 1)
    // Mantissa with 3 fractional bits: a = (1 + m/8) * 2^(e-1)
    int m = static_cast<int>(std::nearbyint((frac * 2.0f - 1.0f) * 8.0f));
    int exp = e - 1 + 7;
    if (m == 8) { m = 0; ++exp; }
    if (exp > 15 || (exp == 15 && m == 7)) return sign | 0x7e;
    return sign | static_cast<uint8_t>((exp << 3) | m);
}

}  // namespace q3n
