// CPU token log-prob forward and backward: rows in parallel, the row work in the widest
// instruction set this processor has (token_logprob_isa.cpp).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>

#include "cpu_ops.h"
#include "parallel.h"
#include "token_logprob_kernels.h"

namespace gspo4j {
namespace cpu {
namespace {

const RowKernels& select_kernels() {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
        return row_kernels_avx512();
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
        return row_kernels_avx2();
    }
    return row_kernels_sse2();
}

const RowKernels& kernels() {
    static const RowKernels& selected = select_kernels();
    return selected;
}

// About 64k logits per chunk: enough work per task to hide the pool's overhead for small
// vocabularies, one row per task for large ones.
int64_t rows_per_chunk(int64_t vocab) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, vocab)); }

void check_targets(const int64_t* targets, int64_t rows, int64_t vocab) {
    for (int64_t r = 0; r < rows; ++r) {
        if (targets[r] < 0 || targets[r] >= vocab) {
            fail(GSPO4J_ERROR_OUT_OF_RANGE, "targets[" + std::to_string(r) + "] = " + std::to_string(targets[r]) +
                                                " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
        }
    }
}

// Tracks the smallest failing row, so the message does not depend on thread timing.
class FirstBadRow {
public:
    void report(int64_t row) {
        int64_t seen = first_.load();
        while (row < seen && !first_.compare_exchange_weak(seen, row)) {}
    }
    int64_t get() const { return first_.load(); }
    bool any() const { return first_.load() != kNone; }

private:
    static constexpr int64_t kNone = INT64_MAX;
    std::atomic<int64_t> first_{kNone};
};

void store_logit(void* base, int32_t dtype, int64_t index, double value) {
    const float f = static_cast<float>(value);
    switch (dtype) {
        case GSPO4J_BFLOAT16: static_cast<uint16_t*>(base)[index] = float_to_bf16(f); break;
        case GSPO4J_FLOAT16: static_cast<uint16_t*>(base)[index] = float_to_fp16(f); break;
        default: static_cast<float*>(base)[index] = f; break;
    }
}

}  // namespace

const char* isa() { return kernels().isa; }

void token_logprob_forward(const LogitsView& logits, const int64_t* targets, double temperature,
                           bool check_finite, float* logprob, double* lse, float* entropy) {
    const int64_t rows = logits.rows();
    check_targets(targets, rows, logits.vocab);
    const RowKernels& k = kernels();
    const double inverse_temperature_wide = 1.0 / temperature;
    const float inverse_temperature = static_cast<float>(inverse_temperature_wide);
    const char* base = static_cast<const char*>(logits.data);
    const int64_t element = dtype_size(logits.dtype);
    FirstBadRow bad;
    parallel_for(rows, rows_per_chunk(logits.vocab), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const void* row = base + logits.row_offset(r) * element;
            RowForward result;
            k.forward(row, logits.dtype, logits.vocab, inverse_temperature, inverse_temperature_wide, &result);
            if (result.non_finite) bad.report(r);
            // lp = s_y - log S with s_y formed as the kernel forms s: exact in relative terms as
            // p_y -> 1, -Inf for a -Inf target logit. NaN for a row with NaN, +Inf or no finite entry.
            const float target = load_logit(row, logits.dtype, targets[r]);
            const float shifted = (target - result.max) * inverse_temperature;
            logprob[r] = result.non_finite ? NAN : static_cast<float>(static_cast<double>(shifted) - result.log_sum);
            lse[r] = result.lse;
            if (entropy) entropy[r] = static_cast<float>(result.entropy);
        }
    });
    if (check_finite && bad.any()) {
        const int64_t r = bad.get();
        fail(GSPO4J_ERROR_NON_FINITE, "logits row " + std::to_string(r) + " (batch " + std::to_string(r / logits.seq) +
                                          ", position " + std::to_string(r % logits.seq) +
                                          ") holds NaN or Inf: a NaN or +Inf, or no finite entry (-Inf entries are allowed)");
    }
}

void token_logprob_backward(const LogitsView& logits, const int64_t* targets, double temperature,
                            const double* lse, const float* entropy, const float* grad_logprob,
                            const float* grad_entropy, void* grad_logits, int64_t grad_stride_batch,
                            int64_t grad_stride_seq) {
    const int64_t rows = logits.rows();
    // Checked before any write: grad_logits may be the caller's logits (in place).
    check_targets(targets, rows, logits.vocab);
    const RowKernels& k = kernels();
    const double inverse_temperature_wide = 1.0 / temperature;
    const float inverse_temperature = static_cast<float>(inverse_temperature_wide);
    const char* base = static_cast<const char*>(logits.data);
    char* grad_base = static_cast<char*>(grad_logits);
    const int64_t element = dtype_size(logits.dtype);
    parallel_for(rows, rows_per_chunk(logits.vocab), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const void* row = base + logits.row_offset(r) * element;
            const int64_t grad_offset = (r / logits.seq) * grad_stride_batch + (r % logits.seq) * grad_stride_seq;
            void* grad_row = grad_base + grad_offset * element;
            const int64_t y = targets[r];
            // Read before the row is overwritten when working in place.
            const float target = load_logit(row, logits.dtype, y);
            const float g_lp = grad_logprob[r];
            const float g_h = grad_entropy ? grad_entropy[r] : 0.0f;
            const float h = grad_entropy ? entropy[r] : 0.0f;
            // log p_v = (z_v - tau * lse) / tau, tau * lse = M + tau * log S split into two floats.
            const double shift = lse[r] * temperature;
            const float shift_hi = static_cast<float>(shift);
            // What lies below fp64's resolution of tau * lse (|noise| <= 2^-51 |tau * lse|) is dropped:
            // a row whose log S was lost in lse (|M / tau| of 1e22 and more) then still gives its max
            // entries log p = 0 rather than the noise / tau.
            const double low = shift - static_cast<double>(shift_hi);
            const float shift_lo = std::fabs(low) <= std::fabs(shift) * 0x1p-50 ? 0.0f : static_cast<float>(low);
            const double others = k.backward(row, grad_row, logits.dtype, logits.vocab, y, inverse_temperature, shift_hi,
                                             shift_lo, g_lp, g_h, h);
            // The target's entry in float64 from 1 - p_y = sum of the other p_v: exact as p_y -> 1,
            // where 1 - p from a rounded p (bf16, or even float32) would give 0. For the same reason
            // log p_y is log1p(-others) there. A -Inf target logit: lp = -Inf, p_y = 0, and the
            // entropy term is 0 (not 0 * -Inf), so dz_y = g_lp * 1 / tau.
            const double lp = others < 0.5 ? std::log1p(-others) : (static_cast<double>(target) - shift) * inverse_temperature_wide;
            const double p = others < 0.5 ? 1.0 - others : std::exp(lp);
            const double entropy_term = p == 0.0 ? 0.0 : p * (lp + static_cast<double>(h));
            const double dz = (static_cast<double>(g_lp) * others - static_cast<double>(g_h) * entropy_term) * inverse_temperature_wide;
            store_logit(grad_row, logits.dtype, y, dz);
        }
    });
}

}  // namespace cpu
}  // namespace gspo4j
