// Stands in for CUDA's cuda_bf16.h under the SIMT emulator: the bfloat16 storage type and the
// conversions the kernels use. Narrowing rounds to nearest even, as the device's cvt.rn.bf16.f32.
#ifndef GSPO4J_SIMT_CUDA_BF16_H
#define GSPO4J_SIMT_CUDA_BF16_H

#include <cstring>

#include "cuda_runtime.h"

struct __nv_bfloat16 {
    unsigned short bits;
};

inline __nv_bfloat16 __float2bfloat16_rn(float value) {
    unsigned u;
    std::memcpy(&u, &value, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<unsigned short>((u >> 16) | 0x40u)};  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{static_cast<unsigned short>(u >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 value) { return __uint_as_float(static_cast<unsigned>(value.bits) << 16); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 value) { return value.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) { return __nv_bfloat16{bits}; }

#endif
