// Shared by every CPU source: the error funnel, scalar dtype conversions, the token layout.
#ifndef GSPO4J_COMMON_H
#define GSPO4J_COMMON_H

#include <cstdint>
#include <cstring>
#include <exception>
#include <new>
#include <string>

#include "gspo4j/gspo4j.h"

namespace gspo4j {

// Every failure inside the library is one of these; the C entry points turn it into a status
// and a thread-local message (the API_BEGIN / API_END funnel below).
struct Error {
    gspo4j_status status;
    std::string message;
};

[[noreturn]] void fail(gspo4j_status status, const std::string& message);

void set_last_error(const std::string& message);
void clear_last_error();

// Wrap the body of every extern "C" entry point: no C++ exception crosses the C ABI.
#define GSPO4J_API_BEGIN() \
    ::gspo4j::clear_last_error(); \
    try {
#define GSPO4J_API_END() \
    } catch (const ::gspo4j::Error& e) { \
        ::gspo4j::set_last_error(e.message); \
        return e.status; \
    } catch (const std::bad_alloc&) { \
        ::gspo4j::set_last_error("out of host memory"); \
        return GSPO4J_ERROR_INTERNAL; \
    } catch (const std::exception& e) { \
        ::gspo4j::set_last_error(std::string("internal error: ") + e.what()); \
        return GSPO4J_ERROR_INTERNAL; \
    } catch (...) { \
        ::gspo4j::set_last_error("internal error: unknown exception"); \
        return GSPO4J_ERROR_INTERNAL; \
    } \
    return GSPO4J_OK;

inline float bits_to_float(uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline uint32_t float_to_bits(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    return bits;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even, as torch's .to(torch.bfloat16) does; NaN stays a quiet NaN.
inline uint16_t float_to_bf16(float f) {
    uint32_t u = float_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

// IEEE binary16 <-> binary32, exact in the widening direction, round to nearest even in the
// narrowing one; subnormals, infinities and NaN included. The vector kernels use the same
// formulas lane by lane (simd.h).
inline float fp16_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu;
    const uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent != 0) return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
    // Subnormal: mantissa * 2^-24, exact in float32.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return bits_to_float(sign | float_to_bits(magnitude));
}

inline uint16_t float_to_fp16(float f) {
    const uint32_t u = float_to_bits(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t absolute = u & 0x7fffffffu;
    if (absolute > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
    if (absolute >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u); // rounds to Inf
    if (absolute < 0x38800000u) {
        // Result is subnormal or zero: adding 0.5 lets the float adder round the value to a
        // multiple of 2^-24 (nearest even), which then sits in the low mantissa bits.
        const float shifted = bits_to_float(absolute) + 0.5f;
        return static_cast<uint16_t>(sign | (float_to_bits(shifted) - 0x3f000000u));
    }
    const uint32_t odd = (absolute >> 13) & 1u;
    const uint32_t rounded = absolute + 0xc8000fffu + odd;  // rebias exponent 127 -> 15
    return static_cast<uint16_t>(sign | (rounded >> 13));
}

inline float load_logit(const void* base, int32_t dtype, int64_t index) {
    switch (dtype) {
        case GSPO4J_BFLOAT16: return bf16_to_float(static_cast<const uint16_t*>(base)[index]);
        case GSPO4J_FLOAT16: return fp16_to_float(static_cast<const uint16_t*>(base)[index]);
        default: return static_cast<const float*>(base)[index];
    }
}

inline bool is_finite(float x) { return (float_to_bits(x) & 0x7f800000u) != 0x7f800000u; }

// Logits [batch, seq, vocab] with contiguous rows; row (b, t) starts at
// data + b * stride_batch + t * stride_seq elements.
struct LogitsView {
    const void* data;
    int32_t dtype;
    int64_t batch;
    int64_t seq;
    int64_t vocab;
    int64_t stride_batch;
    int64_t stride_seq;

    int64_t rows() const { return batch * seq; }
    int64_t row_offset(int64_t row) const { return (row / seq) * stride_batch + (row % seq) * stride_seq; }
};

inline int64_t dtype_size(int32_t dtype) { return dtype == GSPO4J_FLOAT32 ? 4 : 2; }

// The token axis of docs/math.md: padded (offsets == nullptr) or packed.
struct TokenLayout {
    int64_t batch;
    int64_t seq;
    int64_t tokens;
    const int64_t* offsets;

    int64_t begin(int64_t b) const { return offsets ? offsets[b] : b * seq; }
    int64_t end(int64_t b) const { return offsets ? offsets[b + 1] : (b + 1) * seq; }
};

}  // namespace gspo4j

#endif
