// CUDA token log-prob forward and backward (docs/math.md "Per-token log-probs").
//
// One CTA per logits row (or per slice of a row when there are too few rows to fill the GPU),
// 16-byte loads and stores, everything accumulated in fp32 per thread and combined in fp64 in a
// fixed order. The forward is a single online-softmax pass: each thread keeps a running max m of
// the raw logits, with s = (z - m) / tau the count of elements at m, R = the sum of e^s over the
// others and T = sum e^s s, rescaled when m grows, so the logits are read once and nothing of
// size [N, V] is written. -Inf logits are values of probability 0; NaN and +Inf are errors. The backward reads each logit once and writes its
// gradient once, and rebuilds the target's entry in fp64 from the sum of the other
// probabilities, never from a rounded p_y.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cfloat>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common.cuh"
#include "cuda_ops.h"

namespace gspo4j {
namespace cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

// Where the backward clamps log p in its coefficient (p is 0 far above it), as on the CPU.
constexpr float kLowestLogP = -1e4f;

// ex2.approx: 2 ulp, one MUFU instruction. exp(v) = 2^(v * log2 e), applied only to v = x - max
// (exact for the entries that matter), so the product's rounding stays relative to a small v.
// Off the device (the SIMT emulator of cuda/test) the host's exp2f stands in for it.
__device__ __forceinline__ float exp_shifted(float v) {
    float y;
#ifdef __CUDA_ARCH__
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(v * kLog2e));
#else
    y = exp2f(v * kLog2e);
#endif
    return y;
}

// The three logits dtypes: storage type, elements per 16-byte vector, conversions. Widening is
// exact; narrowing rounds to nearest even, as torch does.
struct Float32 {
    typedef float storage;
    static constexpr int kVector = 4;
    __device__ static float widen(float v) { return v; }
    __device__ static float narrow(float v) { return v; }
    __device__ static void unpack(const uint4& v, float* out) {
        out[0] = __uint_as_float(v.x);
        out[1] = __uint_as_float(v.y);
        out[2] = __uint_as_float(v.z);
        out[3] = __uint_as_float(v.w);
    }
    __device__ static uint4 pack(const float* in) {
        return make_uint4(__float_as_uint(in[0]), __float_as_uint(in[1]), __float_as_uint(in[2]), __float_as_uint(in[3]));
    }
};

template <typename Derived>
struct Half16 {
    typedef unsigned short storage;
    static constexpr int kVector = 8;
    __device__ static void unpack(const uint4& v, float* out) {
        const unsigned words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            out[2 * i] = Derived::widen(static_cast<unsigned short>(words[i] & 0xffffu));
            out[2 * i + 1] = Derived::widen(static_cast<unsigned short>(words[i] >> 16));
        }
    }
    __device__ static uint4 pack(const float* in) {
        unsigned words[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            words[i] = static_cast<unsigned>(Derived::narrow(in[2 * i])) | (static_cast<unsigned>(Derived::narrow(in[2 * i + 1])) << 16);
        }
        return make_uint4(words[0], words[1], words[2], words[3]);
    }
};

struct BFloat16 : Half16<BFloat16> {
    __device__ static float widen(unsigned short v) { return __uint_as_float(static_cast<unsigned>(v) << 16); }
    __device__ static unsigned short narrow(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};

struct Float16 : Half16<Float16> {
    __device__ static float widen(unsigned short v) { return __half2float(__ushort_as_half(v)); }
    __device__ static unsigned short narrow(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

// 16-byte vectors loaded before the first is used: 64 bytes in flight per thread.
constexpr int kUnroll = 4;

struct Geometry {
    int64_t rows;
    int64_t seq;
    int64_t vocab;
    int64_t stride_batch;
    int64_t stride_seq;
    int64_t grad_stride_batch;
    int64_t grad_stride_seq;
    int splits;           // CTAs per row
    int64_t split_width;  // columns per CTA, a multiple of 64 so every slice starts 16-byte aligned
                          // whenever its row does

    __device__ int64_t offset(int64_t row) const { return (row / seq) * stride_batch + (row % seq) * stride_seq; }
    __device__ int64_t grad_offset(int64_t row) const { return (row / seq) * grad_stride_batch + (row % seq) * grad_stride_seq; }
};

__device__ __forceinline__ int64_t column_end(const Geometry& g, int64_t begin) {
    return begin + g.split_width < g.vocab ? begin + g.split_width : g.vocab;
}

// Calls visit(column, values, count) over columns [begin, end) of `row`, each thread taking
// 16-byte vectors in turn (coalesced across the warp); the unaligned head and the tail go
// element by element. `values` holds `count` widened logits.
template <typename D, int kThreads, typename Visit>
__device__ __forceinline__ void for_each_chunk(const typename D::storage* row, int64_t begin, int64_t end, Visit visit) {
    typedef typename D::storage S;
    constexpr int V = D::kVector;
    const uintptr_t address = reinterpret_cast<uintptr_t>(row + begin);
    const int64_t misaligned = static_cast<int64_t>((16 - (address & 15)) & 15) / static_cast<int64_t>(sizeof(S));
    const int64_t head = end - begin < misaligned ? end - begin : misaligned;
    const int64_t vectors = (end - begin - head) / V;
    const int64_t body = begin + head;
    const int64_t tail = body + vectors * V;
    for (int64_t c = begin + threadIdx.x; c < body; c += kThreads) {
        float value = D::widen(row[c]);
        visit(c, &value, 1);
    }
    const uint4* vector_row = reinterpret_cast<const uint4*>(row + body);
    int64_t v = threadIdx.x;
    for (; v + (kUnroll - 1) * kThreads < vectors; v += kUnroll * kThreads) {
        uint4 raw[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) raw[u] = __ldcs(vector_row + v + u * kThreads);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            float values[V];
            D::unpack(raw[u], values);
            visit(body + (v + u * kThreads) * V, values, V);
        }
    }
    for (; v < vectors; v += kThreads) {
        float values[V];
        D::unpack(__ldcs(vector_row + v), values);
        visit(body + v * V, values, V);
    }
    for (int64_t c = tail + threadIdx.x; c < end; c += kThreads) {
        float value = D::widen(row[c]);
        visit(c, &value, 1);
    }
}

// The softmax statistics of a set of logits z relative to their max M (tau > 0, so the max of
// z / tau is M / tau), with s = (z - M) / tau: `count` c elements equal M (their term is exactly
// 1), `rest` R = sum of e^s over the others, `weighted` T = sum e^s s. S = c + R; keeping the 1s
// out of R keeps R's relative precision, so lp = s_y - log c - log1p(R / c) and the entropy
// log S - T / S are exact in relative terms as p_y -> 1. -Inf entries have e^s = 0 and count in
// none of them. Nothing (c = R = T = 0): no column, or only -Inf.
struct Statistics {
    double max;
    double count;
    double rest;
    double weighted;
};

__device__ __forceinline__ bool contributes(const Statistics& s) { return s.count != 0.0 || s.rest != 0.0 || s.weighted != 0.0; }

// `s` relative to a max >= its own, in fp64 (exact algebra): its max's elements join the rest.
// The factor uses the same fp32 1/tau as every s.
__device__ __forceinline__ Statistics rescale(const Statistics& s, double max, double inverse_temperature) {
    if (s.max == max) return s;
    const double delta = (s.max - max) * inverse_temperature;
    const double factor = exp(delta);
    const double sum = s.count + s.rest;
    return Statistics{max, 0.0, factor * sum, factor * (s.weighted + delta * sum)};
}

__device__ __forceinline__ Statistics merge(const Statistics& a, const Statistics& b, double inverse_temperature) {
    if (!contributes(a)) return b;
    if (!contributes(b)) return a;
    const double max = a.max > b.max ? a.max : b.max;
    const Statistics x = rescale(a, max, inverse_temperature);
    const Statistics y = rescale(b, max, inverse_temperature);
    return Statistics{max, x.count + y.count, x.rest + y.rest, x.weighted + y.weighted};
}

// A CTA's statistics over its columns; `bad` is set when some z is NaN or +Inf.
template <typename D, int kThreads>
__device__ Statistics row_statistics(const typename D::storage* row, int64_t begin, int64_t end, float inverse_temperature,
                                     bool* bad) {
    GSPO4J_SHARED(double, shared, 32);
    // -FLT_MAX, not -Inf, as on the CPU: a thread whose first chunk is all -Inf (banned or padded
    // vocabulary entries) then takes s = -Inf - -FLT_MAX = -Inf and e^s = 0, where -Inf - -Inf
    // would be NaN.
    float running_max = -FLT_MAX;
    float count = 0.0f;
    float rest = 0.0f;
    float weighted = 0.0f;
    for_each_chunk<D, kThreads>(row, begin, end, [&](int64_t, float* values, int count_here) {
        float chunk_max = -FLT_MAX;
        for (int i = 0; i < count_here; ++i) chunk_max = fmaxf(chunk_max, values[i]);
        if (chunk_max > running_max) {
            if (count > 0.0f) {
                // The old max's elements join the rest.
                const float delta = __fmul_rn(running_max - chunk_max, inverse_temperature);
                const float factor = exp_shifted(delta);
                // factor 0: delta may be -Inf (z - M overflowing at tiny tau), and 0 * -Inf NaN.
                weighted = factor == 0.0f ? 0.0f : factor * fmaf(delta, count + rest, weighted);
                rest = factor * (rest + count);
                count = 0.0f;
            }
            running_max = chunk_max;
        }
        for (int i = 0; i < count_here; ++i) {
            // The difference first, then the rounded product (never fused): z - M is exact near
            // the max, so s keeps fp32 precision whatever |z / tau|.
            const float shifted = __fmul_rn(values[i] - running_max, inverse_temperature);
            const float e = exp_shifted(shifted);
            const bool at_max = values[i] == running_max;
            count += at_max ? 1.0f : 0.0f;
            // A NaN logit makes rest NaN here (fmaxf skipped it, so it is never at the max), a +Inf
            // one the max: one test at the end finds them, none per element.
            rest += at_max ? 0.0f : e;
            // e = 0 (a -Inf logit, or z - M overflowing): no term, where 0 * -Inf would be NaN.
            weighted = e > 0.0f ? fmaf(e, shifted, weighted) : weighted;
        }
    });
    // Fixed-order merge in fp64: the block max first, then every thread's statistics rescaled to
    // it. A thread with nothing (no column, only -Inf) has max -FLT_MAX and adds zeros.
    const double own_max = static_cast<double>(running_max);
    const double block_max = block_reduce(own_max, Max(), static_cast<double>(-FLT_MAX), shared);
    const Statistics own = rescale(Statistics{own_max, count, rest, weighted}, block_max, static_cast<double>(inverse_temperature));
    const double total_count = block_reduce(own.count, Add(), 0.0, shared);
    const double total_rest = block_reduce(own.rest, Add(), 0.0, shared);
    const double total_weighted = block_reduce(own.weighted, Add(), 0.0, shared);
    // R and T are finite sums of bounded terms unless a logit was NaN; M is +Inf only for +Inf.
    *bad = !(isfinite(total_rest) && isfinite(total_weighted) && block_max < INFINITY);
    return Statistics{block_max, total_count, total_rest, total_weighted};
}

// lse, lp and H of one row from its statistics; checks the row's token id. A row with NaN or
// +Inf gives NaN everywhere, one without a finite entry lse = -Inf and NaN lp and H, as on the CPU.
template <typename D>
__device__ void write_forward(const Statistics& s, bool bad, int64_t row, const typename D::storage* row_pointer, const Geometry& g,
                              const int64_t* targets, float inverse_temperature, double inverse_temperature_wide, bool check_finite,
                              ErrorRecord record, float* logprob, double* lse, float* entropy) {
    const int64_t y = targets[row];
    const bool target_ok = y >= 0 && y < g.vocab;
    if (!target_ok) report(record, DataError::kTargetOutOfRange, row);
    const bool empty = !(s.count > 0.0);
    if ((bad || empty) && check_finite) report(record, DataError::kNonFiniteLogits, row);
    double log_sum = NAN;
    double row_lse = NAN;
    double h = NAN;
    if (bad) {
    } else if (empty) {
        row_lse = -INFINITY;
    } else {
        log_sum = log(s.count) + log1p(s.rest / s.count);
        row_lse = s.max * inverse_temperature_wide + log_sum;
        h = log_sum - s.weighted / (s.count + s.rest);
    }
    lse[row] = row_lse;
    // s_y formed as the statistics formed every s: -Inf for a -Inf target logit.
    const float shifted = target_ok ? __fmul_rn(D::widen(row_pointer[y]) - static_cast<float>(s.max), inverse_temperature) : NAN;
    logprob[row] = static_cast<float>(static_cast<double>(shifted) - log_sum);
    if (entropy) entropy[row] = static_cast<float>(h);
}

template <typename D, int kThreads>
__global__ void __launch_bounds__(kThreads, 1024 / kThreads) forward_kernel(const typename D::storage* __restrict__ logits, Geometry g,
                                                           const int64_t* __restrict__ targets, float inverse_temperature,
                                                           double inverse_temperature_wide, bool check_finite, ErrorRecord record,
                                                           float* __restrict__ logprob,
                                                           double* __restrict__ lse, float* __restrict__ entropy,
                                                           Statistics* __restrict__ partial, int* __restrict__ partial_bad) {
    const int split = blockIdx.y;
    for (int64_t row = blockIdx.x; row < g.rows; row += gridDim.x) {
        const typename D::storage* row_pointer = logits + g.offset(row);
        const int64_t begin = split * g.split_width;
        const int64_t end = column_end(g, begin);
        bool bad = false;
        const Statistics s = begin < end ? row_statistics<D, kThreads>(row_pointer, begin, end, inverse_temperature, &bad)
                                         : Statistics{-FLT_MAX, 0.0, 0.0, 0.0};
        if (threadIdx.x != 0) continue;
        if (g.splits > 1) {
            partial[row * g.splits + split] = s;
            partial_bad[row * g.splits + split] = bad;
            continue;
        }
        write_forward<D>(s, bad, row, row_pointer, g, targets, inverse_temperature, inverse_temperature_wide, check_finite, record,
                         logprob, lse, entropy);
    }
}

// Merges the CTAs of split rows, in split order.
template <typename D>
__global__ void forward_merge_kernel(const typename D::storage* __restrict__ logits, Geometry g, const int64_t* __restrict__ targets,
                                     float inverse_temperature, double inverse_temperature_wide, bool check_finite,
                                     ErrorRecord record, float* __restrict__ logprob, double* __restrict__ lse,
                                     float* __restrict__ entropy, const Statistics* __restrict__ partial,
                                     const int* __restrict__ partial_bad) {
    const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (row >= g.rows) return;
    Statistics s{-FLT_MAX, 0.0, 0.0, 0.0};
    bool bad = false;
    for (int k = 0; k < g.splits; ++k) {
        s = merge(s, partial[row * g.splits + k], static_cast<double>(inverse_temperature));
        bad |= partial_bad[row * g.splits + k] != 0;
    }
    write_forward<D>(s, bad, row, logits + g.offset(row), g, targets, inverse_temperature, inverse_temperature_wide, check_finite,
                     record, logprob, lse, entropy);
}

// tau * lse - hi, or 0 where that is no more than the rounding noise of tau * lse in fp64
// (|noise| <= 2^-51 |tau * lse|): a row whose log S lies below fp64's resolution of lse (|M / tau|
// of 1e22 and more) then still gives its max entries log p = 0 rather than the noise / tau.
__device__ __forceinline__ float shift_low_part(double shift, float hi) {
    const double low = shift - static_cast<double>(hi);
    return fabs(low) <= fabs(shift) * 0x1p-50 ? 0.0f : static_cast<float>(low);
}

// shift_hi + shift_lo = tau * lse in two floats: log p_v = ((z_v - shift_hi) - shift_lo) / tau.
struct BackwardRow {
    float shift_hi;
    float shift_lo;
    float grad_logprob;
    float grad_entropy;
    float entropy;
};

// dz_v = -p_v (g_lp + g_H (log p_v + H)) / tau for every v of the CTA's columns (the target's
// entry is rewritten afterwards); returns this thread's sum of p_v over v != target.
template <typename D, int kThreads>
__device__ float backward_columns(const typename D::storage* row, typename D::storage* grad, int64_t begin, int64_t end,
                                  int64_t target, float inverse_temperature, const BackwardRow& r) {
    typedef typename D::storage S;
    float others = 0.0f;
    auto gradient = [&](int64_t column, float z) {
        // The difference first, then the rounded product (never fused): z - hi is exact for the
        // entries that matter (z near the max, Sterbenz), so log p keeps fp32 precision even for
        // logits of 1e4 or tau = 1e-6. At tau = 1 this is (z - lse_hi) - lse_lo.
        const float log_p = __fmul_rn((z - r.shift_hi) - r.shift_lo, inverse_temperature);
        const float p = exp_shifted(log_p);
        if (column != target) others += p;
        // log p clamped in the coefficient only: a -Inf logit (p = 0) then gets 0 * finite = 0, where
        // 0 * -Inf would be NaN; below -1e4 p is 0 anyway, and a NaN log p still reaches the result
        // through p. (A select on p would split the loop's basic block and its 128-bit stores.)
        const float coefficient = fmaf(r.grad_entropy, fmaxf(log_p, kLowestLogP) + r.entropy, r.grad_logprob);
        return -(p * coefficient) * inverse_temperature;
    };
    const uintptr_t in_address = reinterpret_cast<uintptr_t>(row + begin);
    const uintptr_t out_address = reinterpret_cast<uintptr_t>(grad + begin);
    if ((in_address & 15) == (out_address & 15)) {
        for_each_chunk<D, kThreads>(row, begin, end, [&](int64_t column, float* values, int count) {
            if (count == D::kVector) {
                float out[D::kVector];
#pragma unroll
                for (int i = 0; i < D::kVector; ++i) out[i] = gradient(column + i, values[i]);
                __stcs(reinterpret_cast<uint4*>(grad + column), D::pack(out));
            } else {
                for (int i = 0; i < count; ++i) grad[column + i] = static_cast<S>(D::narrow(gradient(column + i, values[i])));
            }
        });
    } else {
        // Rows aligned differently (a gradient with other strides than the logits): element by
        // element, still coalesced across the warp.
        for (int64_t c = begin + threadIdx.x; c < end; c += kThreads) grad[c] = static_cast<S>(D::narrow(gradient(c, D::widen(row[c]))));
    }
    return others;
}

// The target's gradient in fp64 from 1 - p_y = sum of the other p_v; log p_y likewise from
// log1p(-others) when p_y is large, where x_y - lse has lost what the forward's fp32 sums could not
// resolve next to 1.
__device__ __forceinline__ double target_gradient(double target_z, double shift, double others, const BackwardRow& r,
                                                  double inverse_temperature) {
    const double lp = others < 0.5 ? log1p(-others) : (target_z - shift) * inverse_temperature;
    const double p = others < 0.5 ? 1.0 - others : exp(lp);
    // A -Inf target logit: lp = -Inf, p = 0, no entropy term (not 0 * -Inf): dz_y = g_lp / tau.
    const double entropy_term = p == 0.0 ? 0.0 : p * (lp + static_cast<double>(r.entropy));
    return (static_cast<double>(r.grad_logprob) * others - static_cast<double>(r.grad_entropy) * entropy_term) * inverse_temperature;
}

// Before the backward writes anything: every token id in range? Sets *any_bad and records the
// first bad id. The backward then writes nothing at all, so an in-place call on bad ids leaves
// every row of the caller's logits as it was, as the CPU path does.
__global__ void check_targets_kernel(const int64_t* __restrict__ targets, int64_t rows, int64_t vocab, ErrorRecord record,
                                     int* __restrict__ any_bad) {
    for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < rows;
         row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t y = targets[row];
        if (y < 0 || y >= vocab) {
            report(record, DataError::kTargetOutOfRange, row);
            *any_bad = 1;
        }
    }
}

template <typename D, int kThreads>
__global__ void __launch_bounds__(kThreads, 1024 / kThreads) backward_kernel(const typename D::storage* logits, Geometry g,
                                                            const int64_t* __restrict__ targets, float inverse_temperature,
                                                            double inverse_temperature_wide, double temperature,
                                                            const double* __restrict__ lse,
                                                            const float* __restrict__ entropy, const float* __restrict__ grad_logprob,
                                                            const float* __restrict__ grad_entropy, typename D::storage* grad_logits,
                                                            const int* __restrict__ any_bad, double* __restrict__ partial_others,
                                                            float* __restrict__ target_z_out) {
    GSPO4J_SHARED(double, shared, 32);
    // Any bad id (check_targets_kernel ran first on this stream): nothing is written, so an
    // in-place call leaves the caller's logits as they were. The whole block leaves at once.
    if (*any_bad) return;
    const int split = blockIdx.y;
    for (int64_t row = blockIdx.x; row < g.rows; row += gridDim.x) {
        const typename D::storage* row_pointer = logits + g.offset(row);
        typename D::storage* grad_row = grad_logits + g.grad_offset(row);
        const int64_t begin = split * g.split_width;
        const int64_t end = column_end(g, begin);
        const int64_t y = targets[row];
        if (threadIdx.x == 0 && y >= begin && y < end) {
            // Read before any thread overwrites it (in place: grad_logits == logits).
            target_z_out[row] = D::widen(row_pointer[y]);
        }
        __syncthreads();
        const double shift = lse[row] * temperature;
        BackwardRow r;
        r.shift_hi = static_cast<float>(shift);
        r.shift_lo = shift_low_part(shift, r.shift_hi);
        r.grad_logprob = grad_logprob[row];
        r.grad_entropy = grad_entropy ? grad_entropy[row] : 0.0f;
        r.entropy = grad_entropy ? entropy[row] : 0.0f;
        const float own = begin < end ? backward_columns<D, kThreads>(row_pointer, grad_row, begin, end, y, inverse_temperature, r) : 0.0f;
        const double others = block_reduce(static_cast<double>(own), Add(), 0.0, shared);
        if (threadIdx.x == 0) {
            if (g.splits > 1) {
                partial_others[row * g.splits + split] = others;
            } else {
                // After the block reduction's barrier: every thread's write of this entry is done.
                // y, lse and the target's x are read again rather than kept across the column loop:
                // at 64 registers (1024 threads per SM) keeping them spilled at sm_80.
                const int64_t target = targets[row];
                grad_logits[g.grad_offset(row) + target] = static_cast<typename D::storage>(D::narrow(static_cast<float>(
                    target_gradient(target_z_out[row], lse[row] * temperature, others, r, inverse_temperature_wide))));
            }
        }
    }
}

// Split rows: the target's entry once every slice has summed its share of the other p_v.
template <typename D>
__global__ void backward_target_kernel(Geometry g, const int64_t* __restrict__ targets, double inverse_temperature_wide,
                                       double temperature,
                                       const double* __restrict__ lse, const float* __restrict__ entropy,
                                       const float* __restrict__ grad_logprob, const float* __restrict__ grad_entropy,
                                       typename D::storage* grad_logits, const int* __restrict__ any_bad,
                                       const double* __restrict__ partial_others, const float* __restrict__ target_z) {
    const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (row >= g.rows || *any_bad) return;
    const int64_t y = targets[row];
    double others = 0.0;
    for (int k = 0; k < g.splits; ++k) others += partial_others[row * g.splits + k];
    BackwardRow r;
    r.grad_logprob = grad_logprob[row];
    r.grad_entropy = grad_entropy ? grad_entropy[row] : 0.0f;
    r.entropy = grad_entropy ? entropy[row] : 0.0f;
    grad_logits[g.grad_offset(row) + y] = static_cast<typename D::storage>(
        D::narrow(static_cast<float>(target_gradient(target_z[row], lse[row] * temperature, others, r, inverse_temperature_wide))));
}

// The launch plan, shared by the forward and the backward of the same shape.
struct Plan {
    int threads;
    int splits;
    int64_t split_width;
    unsigned grid_rows;
};

// Calls launch(D()) with the dtype tag of `dtype`.
template <typename Launch>
void with_dtype(int32_t dtype, Launch launch) {
    switch (dtype) {
        case GSPO4J_BFLOAT16: launch(BFloat16()); break;
        case GSPO4J_FLOAT16: launch(Float16()); break;
        default: launch(Float32()); break;
    }
}

// GSPO4J_CUDA_THREADS=128|256|512|1024 overrides the CTA size: a tuning knob for the device
// harness (bench/gpu), read on every call so one process can compare them.
int threads_override() {
    const char* value = std::getenv("GSPO4J_CUDA_THREADS");
    if (value == nullptr) return 0;
    for (int t : {128, 256, 512, 1024}) {
        if (std::strcmp(value, std::to_string(t).c_str()) == 0) return t;
    }
    return 0;
}

// GSPO4J_CUDA_SPLIT_ROWS=1 lets the plan split rows over CTAs when there are few rows (see plan()).
// Read on every call, like GSPO4J_CUDA_THREADS.
bool split_rows_opt_in() {
    const char* value = std::getenv("GSPO4J_CUDA_SPLIT_ROWS");
    return value != nullptr && std::strcmp(value, "1") == 0;
}

// Calls launch(std::integral_constant<int, threads>) for the compiled CTA sizes.
template <typename Launch>
void with_threads(int threads, Launch launch) {
    switch (threads) {
        case 128: launch(std::integral_constant<int, 128>()); break;
        case 256: launch(std::integral_constant<int, 256>()); break;
        case 1024: launch(std::integral_constant<int, 1024>()); break;
        default: launch(std::integral_constant<int, 512>()); break;
    }
}

Plan plan(int64_t rows, int64_t vocab) {
    int device = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    int multiprocessors = 0;
    check_cuda(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    Plan p;
    // 512 threads hold enough 16-byte loads in flight for long rows; short rows would leave
    // most of them idle.
    p.threads = vocab >= 8192 ? 512 : 128;
    if (const int forced = threads_override()) p.threads = forced;
    // A row's reduction order depends on how many CTAs share it, so splitting rows when there are
    // few of them would make a row's lp, lse and H depend on the batch around it (SPEC,
    // "Invariances"). By default every row is one CTA, whatever the batch. Opting in
    // (GSPO4J_CUDA_SPLIT_ROWS=1) trades that invariance for latency on small batches: with fewer
    // rows than 4 CTAs per multiprocessor, rows are split into slices of at least 8192 columns.
    const int64_t wanted = 4LL * multiprocessors;
    p.splits = 1;
    if (split_rows_opt_in() && rows < wanted) {
        const int64_t by_rows = ceil_div(wanted, std::max<int64_t>(rows, 1));
        const int64_t by_width = std::max<int64_t>(1, vocab / 8192);
        p.splits = static_cast<int>(std::min<int64_t>(64, std::min(by_rows, by_width)));
    }
    p.split_width = ceil_div(ceil_div(vocab, p.splits), 64) * 64;
    p.splits = static_cast<int>(ceil_div(vocab, p.split_width));
    p.grid_rows = static_cast<unsigned>(std::min<int64_t>(rows, 0x7fffffffLL));
    return p;
}

Geometry geometry(const LogitsView& logits, const Plan& p, int64_t grad_stride_batch, int64_t grad_stride_seq) {
    return Geometry{logits.rows(), logits.seq, logits.vocab, logits.stride_batch, logits.stride_seq,
                    grad_stride_batch, grad_stride_seq, p.splits, p.split_width};
}

template <typename D>
void forward_typed(cudaStream_t stream, const LogitsView& logits, const int64_t* targets, float inverse_temperature,
                   double inverse_temperature_wide, bool check_finite, ErrorRecord record, float* logprob, double* lse, float* entropy) {
    const Plan p = plan(logits.rows(), logits.vocab);
    const Geometry g = geometry(logits, p, 0, 0);
    const auto* data = static_cast<const typename D::storage*>(logits.data);
    const size_t partial_count = p.splits > 1 ? static_cast<size_t>(g.rows) * p.splits : 0;
    Scratch scratch(partial_count * (sizeof(Statistics) + sizeof(int)), stream);
    Statistics* partial = scratch.as<Statistics>();
    int* partial_bad = scratch.as<int>(partial_count * sizeof(Statistics));
    const dim3 grid(p.grid_rows, static_cast<unsigned>(p.splits));
    with_threads(p.threads, [&](auto threads) {
        constexpr int kThreads = decltype(threads)::value;
        GSPO4J_LAUNCH(grid, kThreads, 0, stream, forward_kernel<D, kThreads>)(data, g, targets, inverse_temperature, inverse_temperature_wide,
                                                                  check_finite, record,
                                                                  logprob, lse, entropy, partial, partial_bad);
    });
    check_launch("token_logprob forward_kernel");
    if (p.splits > 1) {
        GSPO4J_LAUNCH(static_cast<unsigned>(ceil_div(g.rows, 256)), 256, 0, stream, forward_merge_kernel<D>)(
            data, g, targets, inverse_temperature, inverse_temperature_wide, check_finite, record, logprob, lse, entropy, partial,
            partial_bad);
        check_launch("token_logprob forward_merge_kernel");
    }
}

template <typename D>
void backward_typed(cudaStream_t stream, const LogitsView& logits, const int64_t* targets, double temperature, const double* lse,
                    const float* entropy, const float* grad_logprob, const float* grad_entropy, void* grad_logits,
                    int64_t grad_stride_batch, int64_t grad_stride_seq, ErrorRecord record) {
    const Plan p = plan(logits.rows(), logits.vocab);
    const Geometry g = geometry(logits, p, grad_stride_batch, grad_stride_seq);
    typedef typename D::storage S;
    const auto* data = static_cast<const S*>(logits.data);
    auto* grad = static_cast<S*>(grad_logits);
    const double inverse_wide = 1.0 / temperature;
    const float inverse = static_cast<float>(inverse_wide);
    const size_t partial_count = p.splits > 1 ? static_cast<size_t>(g.rows) * p.splits : 0;
    const size_t target_count = static_cast<size_t>(g.rows);
    Scratch scratch(partial_count * sizeof(double) + target_count * sizeof(float) + sizeof(int), stream);
    double* partial_others = scratch.as<double>();
    float* target_z = scratch.as<float>(partial_count * sizeof(double));
    int* any_bad = scratch.as<int>(partial_count * sizeof(double) + target_count * sizeof(float));
    check_cuda(cudaMemsetAsync(any_bad, 0, sizeof(int), stream), "cudaMemsetAsync");
    const unsigned check_blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(g.rows, 256), 4096));
    GSPO4J_LAUNCH(check_blocks, 256, 0, stream, check_targets_kernel)(targets, g.rows, g.vocab, record, any_bad);
    check_launch("token_logprob check_targets_kernel");
    const dim3 grid(p.grid_rows, static_cast<unsigned>(p.splits));
    with_threads(p.threads, [&](auto threads) {
        constexpr int kThreads = decltype(threads)::value;
        GSPO4J_LAUNCH(grid, kThreads, 0, stream, backward_kernel<D, kThreads>)(data, g, targets, inverse, inverse_wide, temperature, lse, entropy,
                                                                   grad_logprob, grad_entropy, grad, any_bad, partial_others,
                                                                   target_z);
    });
    check_launch("token_logprob backward_kernel");
    if (p.splits > 1) {
        GSPO4J_LAUNCH(static_cast<unsigned>(ceil_div(g.rows, 256)), 256, 0, stream, backward_target_kernel<D>)(
            g, targets, inverse_wide, temperature, lse, entropy, grad_logprob, grad_entropy, grad, any_bad, partial_others, target_z);
        check_launch("token_logprob backward_target_kernel");
    }
}

}  // namespace

void token_logprob_forward(void* stream_pointer, const LogitsView& logits, const int64_t* targets, double temperature,
                           bool check_finite, float* logprob, double* lse, float* entropy) {
    const DeviceGuard guard(logits.data, "logits");
    require_device_pointer(targets, "targets");
    require_device_pointer(logprob, "logprob");
    require_device_pointer(lse, "lse");
    require_device_pointer(entropy, "entropy");
    const cudaStream_t stream = as_stream(stream_pointer);
    const ErrorRecord record = error_record();
    const double inverse_temperature_wide = 1.0 / temperature;
    const float inverse_temperature = static_cast<float>(inverse_temperature_wide);
    with_dtype(logits.dtype, [&](auto tag) {
        forward_typed<decltype(tag)>(stream, logits, targets, inverse_temperature, inverse_temperature_wide, check_finite, record, logprob,
                                     lse, entropy);
    });
}

void token_logprob_backward(void* stream_pointer, const LogitsView& logits, const int64_t* targets, double temperature,
                            const double* lse, const float* entropy, const float* grad_logprob, const float* grad_entropy,
                            void* grad_logits, int64_t grad_stride_batch, int64_t grad_stride_seq) {
    const DeviceGuard guard(logits.data, "logits");
    require_device_pointer(targets, "targets");
    require_device_pointer(lse, "lse");
    require_device_pointer(entropy, "entropy");
    require_device_pointer(grad_logprob, "grad_logprob");
    require_device_pointer(grad_entropy, "grad_entropy");
    require_device_pointer(grad_logits, "grad_logits");
    const cudaStream_t stream = as_stream(stream_pointer);
    const ErrorRecord record = error_record();
    with_dtype(logits.dtype, [&](auto tag) {
        backward_typed<decltype(tag)>(stream, logits, targets, temperature, lse, entropy, grad_logprob, grad_entropy, grad_logits,
                                      grad_stride_batch, grad_stride_seq, record);
    });
}

}  // namespace cuda
}  // namespace gspo4j
