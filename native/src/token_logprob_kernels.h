// The per-row work of the token log-prob kernels, written once over simd.h and compiled once
// per instruction set (token_logprob_isa.cpp with GSPO4J_VECTOR_BYTES = 16, 32, 64).
// token_logprob.cpp picks the widest set the processor has at run time.
#ifndef GSPO4J_TOKEN_LOGPROB_KERNELS_H
#define GSPO4J_TOKEN_LOGPROB_KERNELS_H

#include <cstdint>

namespace gspo4j {

// What the forward learns from one row of z (x = z / tau). -Inf entries are values of
// probability 0; NaN and +Inf are errors.
struct RowForward {
    float max;          // M, the largest z (-FLT_MAX when there is no finite entry)
    double log_sum;     // log S, S = sum_v exp((z_v - M) / tau)
    double lse;         // M / tau + log S = log sum_v exp(x_v)
    double entropy;     // log S - T / S, T = sum_v e^(s_v) s_v, s_v = (z_v - M) / tau
    bool non_finite;    // some z_v is NaN or +Inf (then lse, log_sum and entropy are NaN), or no
                        // z_v is finite (all -Inf: lse -Inf, log_sum -Inf, entropy NaN)
};

struct RowKernels {
    const char* isa;
    // inverse_temperature is float(1 / tau), the factor of every s_v; inverse_temperature_wide is
    // 1 / tau in float64, for M / tau.
    void (*forward)(const void* row, int32_t dtype, int64_t vocab, float inverse_temperature,
                    double inverse_temperature_wide, RowForward* out);
    // Writes dz_v = -p_v * (g_lp + g_H * (log p_v + H)) / tau for every v, with
    // log p_v = ((z_v - shift_hi) - shift_lo) / tau, where shift_hi + shift_lo = tau * lse split
    // into two floats (z_v - shift_hi is exact near the max), and dz_v = 0 where p_v = 0 (a -Inf
    // logit); returns sum_{v != target} p_v. The caller then overwrites the target's entry, whose
    // 1 - p_y is that sum. `row` and `grad_row` may be the same memory. vocab < 2^31.
    double (*backward)(const void* row, void* grad_row, int32_t dtype, int64_t vocab, int64_t target,
                       float inverse_temperature, float shift_hi, float shift_lo, float grad_logprob,
                       float grad_entropy, float entropy);
};

const RowKernels& row_kernels_sse2();
const RowKernels& row_kernels_avx2();
const RowKernels& row_kernels_avx512();

}  // namespace gspo4j

#endif
