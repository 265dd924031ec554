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

// Online softmax over blocks: the running sums S = sum e^(x - M) and T = sum e^(x - M)(x - M)
// are kept in float64 relative to the running max M and rescaled when a block raises it.
// Entropy as log S - T / S avoids the cancellation of lse - E[x] when logits are large.
template <int Dtype>
void forward_row(const void* row_pointer, int64_t vocab, float inverse_temperature, gspo4j::RowForward* out) {
    const auto* row = static_cast<const typename Element<Dtype>::type*>(row_pointer);
    // Padding lanes hold -FLT_MAX rather than -Inf: e^(pad - M) is 0 and 0 * (pad - M) is 0,
    // where -Inf would give 0 * -Inf = NaN.
    const float pad = -FLT_MAX;
    alignas(64) float block[kBlock];
    double sum = 0.0;
    double weighted = 0.0;
    float running_max = -FLT_MAX;
    vu bad = vu{};
    for (int64_t start = 0; start < vocab; start += kBlock) {
        const int64_t count = vocab - start < kBlock ? vocab - start : kBlock;
        const int64_t full = count / kLanes * kLanes;
        vf block_max = simd::broadcast(pad);
        for (int64_t i = 0; i < full; i += kLanes) {
            const vf x = load<Dtype>(row + start + i) * inverse_temperature;
            bad |= simd::non_finite(x);
            block_max = simd::max(block_max, x);
            simd::store_f32(block + i, x);
        }
        int64_t padded = full;
        if (full < count) {
            vf x = load_partial<Dtype>(row + start + full, count - full, 0.0f) * inverse_temperature;
            for (int64_t i = count - full; i < kLanes; ++i) x[i] = pad;  // after scaling: pad / tau is -Inf
            bad |= simd::non_finite(x);
            block_max = simd::max(block_max, x);
            simd::store_f32(block + full, x);
            padded += kLanes;
        }
        const float block_peak = simd::horizontal_max(block_max);
        const float new_max = block_peak > running_max ? block_peak : running_max;
        vf lane_sum = vf{};
        vf lane_weighted = vf{};
        for (int64_t i = 0; i < padded; i += kLanes) {
            const vf shifted = simd::load_f32(block + i) - new_max;
            vf e = simd::exp(shifted);
            if (i + kLanes > count) {
                // The padding lanes past the row's end count for nothing, also when the row's max is
                // -FLT_MAX itself (a row masked with the lowest float), where e^(pad - max) is 1.
                simd::vi lane;
                for (int l = 0; l < kLanes; ++l) lane[l] = l;
                e = lane < static_cast<int32_t>(count - i) ? e : vf{};
            }
            lane_sum += e;
            lane_weighted += e * shifted;
        }
        if (sum > 0.0 && new_max > running_max) {
            const double delta = static_cast<double>(running_max) - static_cast<double>(new_max);
            const double factor = ::exp(delta);
            weighted = factor * (weighted + delta * sum);
            sum *= factor;
        }
        sum += simd::horizontal_sum(lane_sum);
        weighted += simd::horizontal_sum(lane_weighted);
        running_max = new_max;
    }
    const double log_sum = ::log(sum);
    out->lse = static_cast<double>(running_max) + log_sum;
    out->entropy = log_sum - weighted / sum;
    out->non_finite = simd::any(bad) || !(sum > 0.0) || sum != sum;
}

// Returns sum_{v != y} p_v: the target's 1 - p_y, summed from the small terms so it keeps its
// relative precision as p_y -> 1 (1 - p_y itself would cancel to 0 in float32).
template <int Dtype>
double backward_row(const void* row_pointer, void* grad_pointer, int64_t vocab, int64_t target,
                    float inverse_temperature, float lse_hi, float lse_lo, float grad_logprob, float grad_entropy,
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
    // (x - hi) is exact for the entries that matter (x near lse, Sterbenz), so log p keeps
    // float32 precision even when |x| is 1e4.
    auto gradient = [&](vf z) {
        const vf x = simd::rounded_product(z, simd::broadcast(inverse_temperature));
        const vf log_p = (x - lse_hi) - lse_lo;
        const vf p = simd::exp(log_p);
        others += (index != target_index) & (index < vocab_index) ? p : vf{};
        index += kLanes;
        const vf coefficient = grad_logprob + grad_entropy * (log_p + entropy);
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

void forward_dispatch(const void* row, int32_t dtype, int64_t vocab, float inverse_temperature, gspo4j::RowForward* out) {
    switch (dtype) {
        case GSPO4J_BFLOAT16: forward_row<GSPO4J_BFLOAT16>(row, vocab, inverse_temperature, out); break;
        case GSPO4J_FLOAT16: forward_row<GSPO4J_FLOAT16>(row, vocab, inverse_temperature, out); break;
        default: forward_row<GSPO4J_FLOAT32>(row, vocab, inverse_temperature, out); break;
    }
}

double backward_dispatch(const void* row, void* grad, int32_t dtype, int64_t vocab, int64_t target,
                         float inverse_temperature, float lse_hi, float lse_lo, float grad_logprob, float grad_entropy,
                         float entropy) {
    switch (dtype) {
        case GSPO4J_BFLOAT16:
            return backward_row<GSPO4J_BFLOAT16>(row, grad, vocab, target, inverse_temperature, lse_hi, lse_lo,
                                                 grad_logprob, grad_entropy, entropy);
        case GSPO4J_FLOAT16:
            return backward_row<GSPO4J_FLOAT16>(row, grad, vocab, target, inverse_temperature, lse_hi, lse_lo,
                                                grad_logprob, grad_entropy, entropy);
        default:
            return backward_row<GSPO4J_FLOAT32>(row, grad, vocab, target, inverse_temperature, lse_hi, lse_lo,
                                                grad_logprob, grad_entropy, entropy);
    }
}

const gspo4j::RowKernels kKernels = {GSPO4J_ISA_NAME, forward_dispatch, backward_dispatch};

}  // namespace

namespace gspo4j {
const RowKernels& GSPO4J_ISA_ENTRY() { return kKernels; }
}  // namespace gspo4j
