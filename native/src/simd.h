// Portable SIMD through GCC/Clang vector extensions. The including translation unit defines
// GSPO4J_VECTOR_BYTES (16, 32 or 64) and is compiled with the matching -m flags; everything
// here has internal linkage, so the SSE2, AVX2 and AVX-512 copies of these functions never
// meet at link time (a shared inline symbol could let the linker hand AVX-512 code to a
// machine without it).
#ifndef GSPO4J_SIMD_H
#define GSPO4J_SIMD_H

#include <cstdint>

#ifndef GSPO4J_VECTOR_BYTES
#error "define GSPO4J_VECTOR_BYTES before including simd.h"
#endif

namespace {
namespace simd {

constexpr int kLanes = GSPO4J_VECTOR_BYTES / 4;

typedef float vf __attribute__((vector_size(GSPO4J_VECTOR_BYTES)));
typedef int32_t vi __attribute__((vector_size(GSPO4J_VECTOR_BYTES)));
typedef uint32_t vu __attribute__((vector_size(GSPO4J_VECTOR_BYTES)));
typedef uint16_t vh __attribute__((vector_size(GSPO4J_VECTOR_BYTES / 2)));

inline vf broadcast(float x) { return vf{} + x; }

inline vf load_f32(const float* p) { vf v; __builtin_memcpy(&v, p, sizeof v); return v; }
inline void store_f32(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }

inline vu load_u16(const uint16_t* p) {
    vh h;
    __builtin_memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, vu);
}

inline void store_u16(uint16_t* p, vu v) {
    const vh h = __builtin_convertvector(v, vh);  // keeps the low 16 bits of each lane
    __builtin_memcpy(p, &h, sizeof h);
}

inline vf bf16_to_f32(vu h) { return (vf)(h << 16); }

inline vu f32_to_bf16(vf f) {
    const vu u = (vu)f;
    const vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const vu quiet_nan = (u >> 16) | 0x40u;
    return (u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded;
}

// Lane-wise twins of fp16_to_float / float_to_fp16 in common.h (same formulas, selects
// instead of branches).
inline vf fp16_to_f32(vu h) {
    const vu sign = (h & 0x8000u) << 16;
    const vu exponent = (h >> 10) & 0x1fu;
    const vu mantissa = h & 0x3ffu;
    const vu normal = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    const vu special = sign | 0x7f800000u | (mantissa << 13);
    const vf subnormal_magnitude = __builtin_convertvector((vi)mantissa, vf) * 5.9604644775390625e-8f;
    const vu subnormal = sign | (vu)subnormal_magnitude;
    vu bits = exponent == 0x1fu ? special : normal;
    bits = exponent == 0u ? subnormal : bits;
    return (vf)bits;
}

inline vu f32_to_fp16(vf f) {
    const vu u = (vu)f;
    const vu sign = (u >> 16) & 0x8000u;
    const vu absolute = u & 0x7fffffffu;
    const vf shifted = (vf)absolute + 0.5f;  // rounds to a multiple of 2^-24 (subnormal case)
    const vu subnormal = (vu)shifted - 0x3f000000u;
    const vu normal = (absolute + 0xc8000fffu + ((absolute >> 13) & 1u)) >> 13;
    vu bits = absolute < 0x38800000u ? subnormal : normal;
    bits = absolute >= 0x477ff000u ? vu{} + 0x7c00u : bits;
    bits = absolute > 0x7f800000u ? vu{} + 0x7e00u : bits;
    return sign | bits;
}

// All-ones lanes where x is NaN or +Inf: the logits' errors. -Inf (a banned or padded vocabulary
// entry) is a value, of probability 0.
inline vu nan_or_positive_infinity(vf x) { return ~(vu)(x < broadcast(__builtin_inff())); }

inline vf max(vf a, vf b) { return a > b ? a : b; }

// The product a * b rounded to float before it is used. GCC's default -ffp-contract=fast fuses
// a * b - c into one FMA when FMA is enabled (the AVX2 and AVX-512 builds), which would skip this
// rounding: the backward's log p must start from the same x = z / tau as the forward's.
inline vf rounded_product(vf a, vf b) {
    vf product = a * b;
    asm("" : "+v"(product));  // opaque to the optimiser: the product is materialised, rounded
    return product;
}

// The argument clamp of exp: x below -88 (-Inf included) becomes -88, where exp_core gives 0.
// Finite whatever x but NaN, so callers may multiply by it where e^x is 0 (0 * -Inf would be NaN).
inline vf exp_argument(vf x) { return x < -88.0f ? broadcast(-88.0f) : x; }

// e^c for c = exp_argument(x): about 1 ulp for c in [-87, 88], 0 at -88 and below 2^-126 in
// between, NaN for NaN. Range reduction c = n ln2 + r with ln2 split in two so n*ln2_hi is exact,
// then a degree-7 Taylor polynomial on |r| <= ln2/2 (truncation error below 5e-9).
inline vf exp_core(vf clamped) {
    const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const vf shifted = clamped * 1.44269504088896341f + magic;
    const vf n = shifted - magic;
    const vi n_int = (vi)shifted - (vi)(vf{} + magic);
    vf r = clamped - n * 0.693145751953125f;
    r = r - n * 1.428606765330187045e-06f;
    vf p = broadcast(1.0f / 5040.0f);
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const vf scale = (vf)((n_int + 127) << 23);  // 2^n; 0 for n = -127 (c = -88)
    return p * scale;
}

// e^x in float32 to about 1 ulp for x in [-87, 88]; 0 below -87, -Inf included (the terms this
// drops are under 1e-38 of a sum that is at least 1) and NaN for NaN.
inline vf exp(vf x) {
    const vf result = exp_core(exp_argument(x));
    return x < -87.0f ? vf{} : result;
}

inline float horizontal_max(vf v) {
    float m = v[0];
    for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
    return m;
}

inline double horizontal_sum(vf v) {
    double s = 0.0;
    for (int i = 0; i < kLanes; ++i) s += v[i];
    return s;
}

inline bool any(vu v) {
    uint32_t acc = 0;
    for (int i = 0; i < kLanes; ++i) acc |= v[i];
    return acc != 0;
}

}  // namespace simd
}  // namespace

#endif
