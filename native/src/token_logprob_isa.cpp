// Row kernels of the token log-prob op for one instruction set. CMake compiles this file three
// times: GSPO4J_VECTOR_BYTES=16 (baseline x86-64, SSE2), 32 (-mavx2 -mfma -mf16c) and 64
// (-mavx512f -mavx512bw ...), each defining its own row_kernels_<isa>() entry point. Nothing
// from the C++ standard library is instantiated here: an inline template emitted with AVX-512
// instructions could be picked by the linker for the baseline path.
#include <cfloat>
#include <cmath>
#include <cstdint>

#include "gspo4j/gspo4j.h"
#include "simd.h"
#include "token_logprob_kernels.h"

#if GSPO4J_VECTOR_BYTES == 16
#define GSPO4J_ISA_ENTRY row_kernels_sse2
#define GSPO4J_ISA_NAME "sse2"
#elif GSPO4J_VECTOR_BYTES == 32
#define GSPO4J_ISA_ENTRY row_kernels_avx2
#define GSPO4J_ISA_NAME "avx2"
#elif GSPO4J_VECTOR_BYTES == 64
#define GSPO4J_ISA_ENTRY row_kernels_avx512
#define GSPO4J_ISA_NAME "avx512"
#else
#error "GSPO4J_VECTOR_BYTES must be 16, 32 or 64"
#endif

namespace {

using simd::kLanes;
using simd::vf;
using simd::vu;

// Elements converted per block. The block's float copy (4 KiB) stays in L1 between the max
// pass and the exp pass, so the logits are read from memory once; per-lane float sums cover
// at most 1024 / kLanes terms before they are folded into float64.
constexpr int64_t kBlock = 1024;

template <int Dtype> struct Element;
template <> struct Element<GSPO4J_FLOAT32> { typedef float type; };
template <> struct Element<GSPO4J_BFLOAT16> { typedef uint16_t type; };
template <> struct Element<GSPO4J_FLOAT16> { typedef uint16_t type; };

template <int Dtype>
inline vf load(const typename Element<Dtype>::type* p) {
    if constexpr (Dtype == GSPO4J_FLOAT32) return simd::load_f32(p);
    else if constexpr (Dtype == GSPO4J_BFLOAT16) return simd::bf16_to_f32(simd::load_u16(p));
    else return simd::fp16_to_f32(simd::load_u16(p));
}

template <int Dtype>
inline void store(typename Element<Dtype>::type* p, vf v) {
    if constexpr (Dtype == GSPO4J_FLOAT32) simd::store_f32(p, v);
    else if constexpr (Dtype == GSPO4J_BFLOAT16) simd::store_u16(p, simd::f32_to_bf16(v));
    else simd::store_u16(p, simd::f32_to_fp16(v));
}

// Loads `count` < kLanes elements, filling the other lanes with `fill`.
template <int Dtype>
inline vf load_partial(const typename Element<Dtype>::type* p, int64_t count, float fill) {
    typename Element<Dtype>::type staged[kLanes] = {};
    for (int64_t i = 0; i < count; ++i) staged[i] = p[i];
    vf v = load<Dtype>(staged);
    for (int64_t i = count; i < kLanes; ++i) v[i] = fill;
    return v;
}

template <int Dtype>
inline void store_partial(typename Element<Dtype>::type* p, int64_t count, vf v) {
    typename Element<Dtype>::type staged[kLanes];
    store<Dtype>(staged, v);
    for (int64_t i = 0; i < count; ++i) p[i] = staged[i];
}

// Online softmax over blocks, relative to the running max M of the raw logits z (tau > 0, so
// the max of z / tau is M / tau): s = (z - M) * (1 / tau) is formed after the subtraction, so
// z - M is exact near the max (Sterbenz) and s keeps float32 precision even when |z / tau| is
// large. The sum S = sum e^s is kept as c + R: c counts the elements equal to M (their term is
// exactly 1) and R sums the terms below it, so R keeps its relative precision next to the 1s
// (as p_y -> 1, lp = -log1p(R / c) and the entropy log S - T / S stay exact in relative terms).
// T = sum e^s s. c, R and T are lanes per block, float64 across blocks, rescaled when a block
// raises M. -Inf entries (and the -Inf padding lanes) have e^s = 0: they count in neither c nor
// R, and s clamped at -88 (exp's own clamp, where e^s is 0) keeps them out of T (0 * -Inf would
// be NaN); so do the finite entries whose z - M overflows (a max above ~1e38 / tau). A NaN logit
// is found by the first pass (its e^s is NaN too).
template <int Dtype>
void forward_row(const void* row_pointer, int64_t vocab, float inverse_temperature, double inverse_temperature_wide,
                 gspo4j::RowForward* out) {
    const auto* row = static_cast<const typename Element<Dtype>::type*>(row_pointer);
    const float negative_infinity = -__builtin_inff();
    alignas(64) float block[kBlock];
    double count = 0.0;
    double rest = 0.0;
    double weighted = 0.0;
    // The lowest float, not -Inf: a block of only -Inf then has s = -Inf and e^s = 0, where
    // -Inf - -Inf would be NaN. A row at -FLT_MAX itself has M = -FLT_MAX and c = V.
    float running_max = -FLT_MAX;
    vu bad = vu{};
    for (int64_t start = 0; start < vocab; start += kBlock) {
        const int64_t count_here = vocab - start < kBlock ? vocab - start : kBlock;
        const int64_t full = count_here / kLanes * kLanes;
        vf block_max = simd::broadcast(-FLT_MAX);
        for (int64_t i = 0; i < full; i += kLanes) {
            const vf z = load<Dtype>(row + start + i);
            bad |= simd::nan_or_positive_infinity(z);
            block_max = simd::max(block_max, z);
            simd::store_f32(block + i, z);
        }
        int64_t padded = full;
        if (full < count_here) {
            // Padding lanes are -Inf: like a banned entry they count for nothing.
            const vf z = load_partial<Dtype>(row + start + full, count_here - full, negative_infinity);
            bad |= simd::nan_or_positive_infinity(z);
            block_max = simd::max(block_max, z);
            simd::store_f32(block + full, z);
            padded += kLanes;
        }
        const float block_peak = simd::horizontal_max(block_max);
        const float new_max = block_peak > running_max ? block_peak : running_max;
        const vf peak = simd::broadcast(new_max);
        simd::vi lane_count = simd::vi{};
        vf lane_rest = vf{};
        vf lane_weighted = vf{};
        for (int64_t i = 0; i < padded; i += kLanes) {
            const vf z = simd::load_f32(block + i);
            // s clamped at -88: a -Inf logit (or z - M overflowing) then has e^s = 0 and
            // e^s s = 0 * -88 = 0, where 0 * -Inf would be NaN.
            const vf shifted = simd::exp_argument(simd::rounded_product(z - peak, simd::broadcast(inverse_temperature)));
            const vf e = simd::exp_core(shifted);
            const simd::vi at_max = z == peak;  // all ones where z = M: e^0 = 1, counted apart
            lane_count -= at_max;
            lane_rest += (vf)(~(vu)at_max & (vu)e);
            lane_weighted += e * shifted;
        }
        if (count > 0.0 && new_max > running_max) {
            // The old max's elements join the rest.
            const double delta =
                (static_cast<double>(running_max) - static_cast<double>(new_max)) * static_cast<double>(inverse_temperature);
            const double factor = ::exp(delta);
            weighted = factor * (weighted + delta * (count + rest));
            rest = factor * (rest + count);
            count = 0.0;
        }
        for (int l = 0; l < kLanes; ++l) count += lane_count[l];
        rest += simd::horizontal_sum(lane_rest);
        weighted += simd::horizontal_sum(lane_weighted);
        running_max = new_max;
    }
    out->max = running_max;
    if (simd::any(bad)) {
        const double nan = __builtin_nan("");
        out->log_sum = out->lse = out->entropy = nan;
        out->non_finite = true;
    } else if (!(count > 0.0)) {
        // No finite entry: S = 0, there is no distribution.
        out->log_sum = out->lse = static_cast<double>(negative_infinity);
        out->entropy = __builtin_nan("");
        out->non_finite = true;
    } else {
        const double log_sum = ::log(count) + ::log1p(rest / count);
        out->log_sum = log_sum;
        out->lse = static_cast<double>(running_max) * inverse_temperature_wide + log_sum;
        out->entropy = log_sum - weighted / (count + rest);
        out->non_finite = false;
    }
}

// Returns sum_{v != y} p_v: the target's 1 - p_y, summed from the small terms so it keeps its
// relative precision as p_y -> 1 (1 - p_y itself would cancel to 0 in float32).
template <int Dtype>
double backward_row(const void* row_pointer, void* grad_pointer, int64_t vocab, int64_t target,
                    float inverse_temperature, float shift_hi, float shift_lo, float grad_logprob, float grad_entropy,
                    float entropy) {
    typedef typename Element<Dtype>::type T;
    const T* row = static_cast<const T*>(row_pointer);
    T* grad = static_cast<T*>(grad_pointer);
    const int64_t full = vocab / kLanes * kLanes;
    const int32_t target_index = static_cast<int32_t>(target);
    const int32_t vocab_index = static_cast<int32_t>(vocab);
    simd::vi index;
    for (int i = 0; i < kLanes; ++i) index[i] = i;
    vf others = vf{};
    // log p = (z - tau * lse) / tau, the difference first: (z - hi) is exact for the entries that
    // matter (z near the max, Sterbenz), so log p keeps float32 precision even when |z| is 1e4 or
    // tau is 1e-6; the product is rounded on its own, never fused. At tau = 1 this is
    // (z - lse_hi) - lse_lo.
    auto gradient = [&](vf z) {
        const vf log_p = simd::rounded_product((z - shift_hi) - shift_lo, simd::broadcast(inverse_temperature));
        const vf p = simd::exp(log_p);
        others += (index != target_index) & (index < vocab_index) ? p : vf{};
        index += kLanes;
        // log p clamped at -88 in the coefficient only (exp's own clamp: p is 0 below -87): a -Inf
        // logit (p = 0) then gets 0 * finite = 0, where 0 * -Inf would be NaN, and a NaN log p
        // still reaches the result through p. The CUDA kernel clamps at -1e4.
        const vf coefficient = grad_logprob + grad_entropy * (simd::exp_argument(log_p) + entropy);
        return -(p * coefficient) * inverse_temperature;
    };
    // Lane sums fold into float64 every block, as in the forward.
    double others_total = 0.0;
    for (int64_t start = 0; start < full; start += kBlock) {
        const int64_t stop = full - start < kBlock ? full : start + kBlock;
        for (int64_t i = start; i < stop; i += kLanes) {
            store<Dtype>(grad + i, gradient(load<Dtype>(row + i)));
        }
        others_total += simd::horizontal_sum(others);
        others = vf{};
    }
    if (full < vocab) {
        store_partial<Dtype>(grad + full, vocab - full, gradient(load_partial<Dtype>(row + full, vocab - full, 0.0f)));
    }
    return others_total + simd::horizontal_sum(others);
}

void forward_dispatch(const void* row, int32_t dtype, int64_t vocab, float inverse_temperature, double inverse_temperature_wide,
                      gspo4j::RowForward* out) {
    switch (dtype) {
        case GSPO4J_BFLOAT16: forward_row<GSPO4J_BFLOAT16>(row, vocab, inverse_temperature, inverse_temperature_wide, out); break;
        case GSPO4J_FLOAT16: forward_row<GSPO4J_FLOAT16>(row, vocab, inverse_temperature, inverse_temperature_wide, out); break;
        default: forward_row<GSPO4J_FLOAT32>(row, vocab, inverse_temperature, inverse_temperature_wide, out); break;
    }
}

double backward_dispatch(const void* row, void* grad, int32_t dtype, int64_t vocab, int64_t target,
                         float inverse_temperature, float shift_hi, float shift_lo, float grad_logprob, float grad_entropy,
                         float entropy) {
    switch (dtype) {
        case GSPO4J_BFLOAT16:
            return backward_row<GSPO4J_BFLOAT16>(row, grad, vocab, target, inverse_temperature, shift_hi, shift_lo,
                                                 grad_logprob, grad_entropy, entropy);
        case GSPO4J_FLOAT16:
            return backward_row<GSPO4J_FLOAT16>(row, grad, vocab, target, inverse_temperature, shift_hi, shift_lo,
                                                grad_logprob, grad_entropy, entropy);
        default:
            return backward_row<GSPO4J_FLOAT32>(row, grad, vocab, target, inverse_temperature, shift_hi, shift_lo,
                                                grad_logprob, grad_entropy, entropy);
    }
}

const gspo4j::RowKernels kKernels = {GSPO4J_ISA_NAME, forward_dispatch, backward_dispatch};

}  // namespace

namespace gspo4j {
const RowKernels& GSPO4J_ISA_ENTRY() { return kKernels; }
}  // namespace gspo4j
