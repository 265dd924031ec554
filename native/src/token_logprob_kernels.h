// The per-row work of the token log-prob kernels, written once over simd.h and compiled once
// per instruction set (token_logprob_isa.cpp with GSPO4J_VECTOR_BYTES = 16, 32, 64).
// token_logprob.cpp picks the widest set the processor has at run time.
#ifndef GSPO4J_TOKEN_LOGPROB_KERNELS_H
#define GSPO4J_TOKEN_LOGPROB_KERNELS_H

#include <cstdint>

namespace gspo4j {

// What the forward learns from one row of x = z / tau.
struct RowForward {
    double lse;        // log sum_v exp(x_v)
    double entropy;    // lse - sum_v p_v x_v
    bool non_finite;   // some x_v is NaN or +-Inf
};

struct RowKernels {
    const char* isa;
    void (*forward)(const void* row, int32_t dtype, int64_t vocab, float inverse_temperature,
                    RowForward* out);
    // Writes dz_v = -p_v * (g_lp + g_H * (log p_v + H)) / tau for every v, p_v rebuilt as
    // exp((x_v - lse_hi) - lse_lo), and returns sum_{v != target} p_v. The caller then
    // overwrites the target's entry, whose 1 - p_y is that sum. `row` and `grad_row` may be the
    // same memory. vocab < 2^31.
    double (*backward)(const void* row, void* grad_row, int32_t dtype, int64_t vocab, int64_t target,
                       float inverse_temperature, float lse_hi, float lse_lo, float grad_logprob,
                       float grad_entropy, float entropy);
};

const RowKernels& row_kernels_sse2();
const RowKernels& row_kernels_avx2();
const RowKernels& row_kernels_avx512();

}  // namespace gspo4j

#endif
