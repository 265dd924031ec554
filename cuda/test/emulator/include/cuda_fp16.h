// Stands in for CUDA's cuda_fp16.h under the SIMT emulator: the half storage type and the
// conversions the kernels use, through the compiler's own _Float16 (IEEE binary16, round to
// nearest even; an implementation independent of the CPU kernels' bit manipulation).
#ifndef GSPO4J_SIMT_CUDA_FP16_H
#define GSPO4J_SIMT_CUDA_FP16_H

#include <cstring>

#include "cuda_runtime.h"

struct __half {
    unsigned short bits;
};

inline __half __float2half_rn(float value) {
    const _Float16 narrow = static_cast<_Float16>(value);
    __half h;
    std::memcpy(&h.bits, &narrow, sizeof h.bits);
    return h;
}
inline float __half2float(__half value) {
    _Float16 narrow;
    std::memcpy(&narrow, &value.bits, sizeof narrow);
    return static_cast<float>(narrow);
}
inline unsigned short __half_as_ushort(__half value) { return value.bits; }
inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }

#endif
