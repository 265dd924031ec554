// CUDA token log-prob forward and backward (SPEC.md "Per-token log-probs").
//
// One CTA per logits row (or per slice of a row when there are too few rows to fill the GPU),
// 16-byte loads and stores, everything accumulated in fp32 per thread and combined in fp64 in a
// fixed order. The forward is a single online-softmax pass: each thread keeps a running max m,
// S = sum e^(x - m) and T = sum e^(x - m) (x - m), rescaled when m grows, so the logits are read
// once and nothing of size [N, V] is written. The backward reads each logit once and writes its
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

// The softmax statistics of a set of x = z / tau, relative to its max: S = sum e^(x - max),
// T = sum e^(x - max) (x - max). Merging two is exact algebra; fp64 keeps the rescaling exact.
struct Statistics {
    double max;
    double sum;
    double weighted;
};

__device__ __forceinline__ Statistics merge(const Statistics& a, const Statistics& b) {
    // Empty: no column at all. A slice of only -Inf (sum 0, weighted NaN) is not empty.
    if (a.sum == 0.0 && a.weighted == 0.0) return b;
    if (b.sum == 0.0 && b.weighted == 0.0) return a;
    const double max = a.max > b.max ? a.max : b.max;
    const double da = a.max - max;
    const double db = b.max - max;
    const double fa = exp(da);
    const double fb = exp(db);
    return Statistics{max, fa * a.sum + fb * b.sum, fa * (a.weighted + da * a.sum) + fb * (b.weighted + db * b.sum)};
}

// A CTA's statistics over its columns; `bad` is set when some x is NaN or +-Inf.
template <typename D, int kThreads>
__device__ Statistics row_statistics(const typename D::storage* row, int64_t begin, int64_t end, float inverse_temperature,
                                     bool* bad) {
    GSPO4J_SHARED(double, shared, 32);
    GSPO4J_SHARED(int, shared_flag, 32);
    // -FLT_MAX, not -Inf, as on the CPU: a thread whose first chunk is all -Inf (masked
    // vocabulary entries, with checking off) then takes e^(-Inf - -FLT_MAX) = 0, where
    // -Inf - -Inf would make its sum NaN and with it lse.
    float running_max = -FLT_MAX;
    float sum = 0.0f;
    float weighted = 0.0f;
    for_each_chunk<D, kThreads>(row, begin, end, [&](int64_t, float* values, int count) {
        float chunk_max = -FLT_MAX;
        for (int i = 0; i < count; ++i) {
            // Rounded, never fused into the subtraction below: lp and the backward use this x.
            values[i] = __fmul_rn(values[i], inverse_temperature);
            chunk_max = fmaxf(chunk_max, values[i]);
        }
        if (chunk_max > running_max) {
            if (sum > 0.0f) {
                const float delta = running_max - chunk_max;
                const float factor = exp_shifted(delta);
                weighted = factor * fmaf(delta, sum, weighted);
                sum *= factor;
            }
            running_max = chunk_max;
        }
        for (int i = 0; i < count; ++i) {
            // NaN and +-Inf turn sum or weighted into NaN here (Inf - Inf, 0 * -Inf): one test
            // at the end finds them, none per element.
            const float shifted = values[i] - running_max;
            const float e = exp_shifted(shifted);
            sum += e;
            weighted = fmaf(e, shifted, weighted);
        }
    });
    const int thread_bad = !(isfinite(sum) && isfinite(weighted));
    // Fixed-order merge: the block max first, then every thread's sums rescaled to it in fp64.
    // A thread that saw a finite element has sum >= 1 (its max contributes e^0), one that saw NaN
    // a NaN sum, one that saw only -Inf a zero sum and a NaN weighted sum (0 * -Inf); only empty
    // threads are left out. So NaN reaches lse as on the CPU, and a -Inf logit (a masked
    // vocabulary entry, with checking off) spoils only the entropy, not lse, as on the CPU.
    const bool any = sum != 0.0f || weighted != 0.0f;
    const double own_max = any ? static_cast<double>(running_max) : -INFINITY;
    const double block_max = block_reduce(own_max, Max(), static_cast<double>(-INFINITY), shared);
    double scaled_sum = 0.0;
    double scaled_weighted = 0.0;
    if (any) {
        const double delta = own_max - block_max;
        const double factor = exp(delta);
        scaled_sum = factor * sum;
        scaled_weighted = factor * (static_cast<double>(weighted) + delta * sum);
    }
    const double total_sum = block_reduce(scaled_sum, Add(), 0.0, shared);
    const double total_weighted = block_reduce(scaled_weighted, Add(), 0.0, shared);
    *bad = block_reduce(thread_bad, Max(), 0, shared_flag) != 0;
    return Statistics{block_max, total_sum, total_weighted};
}

// lse, lp and H of one row from its statistics; checks the row's token id.
template <typename D>
__device__ void write_forward(const Statistics& s, bool bad, int64_t row, const typename D::storage* row_pointer, const Geometry& g,
                              const int64_t* targets, float inverse_temperature, bool check_finite, ErrorRecord record,
                              float* logprob, double* lse, float* entropy) {
    const int64_t y = targets[row];
    const bool target_ok = y >= 0 && y < g.vocab;
    if (!target_ok) report(record, DataError::kTargetOutOfRange, row);
    const bool non_finite = bad || !(s.sum > 0.0) || !isfinite(s.max);
    if (non_finite && check_finite) report(record, DataError::kNonFiniteLogits, row);
    const double log_sum = log(s.sum);
    const double row_lse = s.max + log_sum;
    lse[row] = row_lse;
    // The same fp32 product the statistics used, so lp and the backward agree.
    logprob[row] = target_ok ? static_cast<float>(static_cast<double>(__fmul_rn(D::widen(row_pointer[y]), inverse_temperature)) - row_lse) : NAN;
    if (entropy) entropy[row] = static_cast<float>(log_sum - s.weighted / s.sum);
}

template <typename D, int kThreads>
__global__ void __launch_bounds__(kThreads, 1024 / kThreads) forward_kernel(const typename D::storage* __restrict__ logits, Geometry g,
                                                           const int64_t* __restrict__ targets, float inverse_temperature,
                                                           bool check_finite, ErrorRecord record, float* __restrict__ logprob,
                                                           double* __restrict__ lse, float* __restrict__ entropy,
                                                           Statistics* __restrict__ partial, int* __restrict__ partial_bad) {
    const int split = blockIdx.y;
    for (int64_t row = blockIdx.x; row < g.rows; row += gridDim.x) {
        const typename D::storage* row_pointer = logits + g.offset(row);
        const int64_t begin = split * g.split_width;
        const int64_t end = column_end(g, begin);
        bool bad = false;
        const Statistics s = begin < end ? row_statistics<D, kThreads>(row_pointer, begin, end, inverse_temperature, &bad)
                                         : Statistics{-INFINITY, 0.0, 0.0};
        if (threadIdx.x != 0) continue;
        if (g.splits > 1) {
            partial[row * g.splits + split] = s;
            partial_bad[row * g.splits + split] = bad;
            continue;
        }
        write_forward<D>(s, bad, row, row_pointer, g, targets, inverse_temperature, check_finite, record, logprob, lse, entropy);
    }
}

// Merges the CTAs of split rows, in split order.
template <typename D>
__global__ void forward_merge_kernel(const typename D::storage* __restrict__ logits, Geometry g, const int64_t* __restrict__ targets,
                                     float inverse_temperature, bool check_finite, ErrorRecord record, float* __restrict__ logprob,
                                     double* __restrict__ lse, float* __restrict__ entropy, const Statistics* __restrict__ partial,
                                     const int* __restrict__ partial_bad) {
    const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (row >= g.rows) return;
    Statistics s{-INFINITY, 0.0, 0.0};
    bool bad = false;
    for (int k = 0; k < g.splits; ++k) {
        s = merge(s, partial[row * g.splits + k]);
        bad |= partial_bad[row * g.splits + k] != 0;
    }
    write_forward<D>(s, bad, row, logits + g.offset(row), g, targets, inverse_temperature, check_finite, record, logprob, lse,
                     entropy);
}

struct BackwardRow {
    float lse_hi;
    float lse_lo;
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
        const float x = __fmul_rn(z, inverse_temperature);  // the forward's x, never fused into x - hi
        // (x - hi) is exact for the entries that matter (Sterbenz), so log p keeps fp32
        // precision even for logits of 1e4.
        const float log_p = (x - r.lse_hi) - r.lse_lo;
        const float p = exp_shifted(log_p);
        if (column != target) others += p;
        return -(p * fmaf(r.grad_entropy, log_p + r.entropy, r.grad_logprob)) * inverse_temperature;
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
__device__ __forceinline__ double target_gradient(double target_x, double row_lse, double others, const BackwardRow& r,
                                                  double inverse_temperature) {
    const double lp = others < 0.5 ? log1p(-others) : target_x - row_lse;
    const double p = others < 0.5 ? 1.0 - others : exp(lp);
    return (static_cast<double>(r.grad_logprob) * others -
            static_cast<double>(r.grad_entropy) * p * (lp + static_cast<double>(r.entropy))) * inverse_temperature;
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
                                                            double inverse_temperature_wide, const double* __restrict__ lse,
                                                            const float* __restrict__ entropy, const float* __restrict__ grad_logprob,
                                                            const float* __restrict__ grad_entropy, typename D::storage* grad_logits,
                                                            const int* __restrict__ any_bad, double* __restrict__ partial_others,
                                                            float* __restrict__ target_x_out) {
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
            target_x_out[row] = __fmul_rn(D::widen(row_pointer[y]), inverse_temperature);
        }
        __syncthreads();
        const double row_lse = lse[row];
        BackwardRow r;
        r.lse_hi = static_cast<float>(row_lse);
        r.lse_lo = static_cast<float>(row_lse - static_cast<double>(r.lse_hi));
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
                    target_gradient(target_x_out[row], lse[row], others, r, inverse_temperature_wide))));
            }
        }
    }
}

// Split rows: the target's entry once every slice has summed its share of the other p_v.
template <typename D>
__global__ void backward_target_kernel(Geometry g, const int64_t* __restrict__ targets, double inverse_temperature_wide,
                                       const double* __restrict__ lse, const float* __restrict__ entropy,
                                       const float* __restrict__ grad_logprob, const float* __restrict__ grad_entropy,
                                       typename D::storage* grad_logits, const int* __restrict__ any_bad,
                                       const double* __restrict__ partial_others, const float* __restrict__ target_x) {
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
        D::narrow(static_cast<float>(target_gradient(target_x[row], lse[row], others, r, inverse_temperature_wide))));
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
    // Enough CTAs for every multiprocessor to hold several; a row is split only when there are
    // fewer rows than that, into slices of at least 8192 columns.
    const int64_t wanted = 4LL * multiprocessors;
    p.splits = 1;
    if (rows < wanted) {
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
                   bool check_finite, ErrorRecord record, float* logprob, double* lse, float* entropy) {
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
        GSPO4J_LAUNCH(grid, kThreads, 0, stream, forward_kernel<D, kThreads>)(data, g, targets, inverse_temperature, check_finite, record,
                                                                  logprob, lse, entropy, partial, partial_bad);
    });
    check_launch("token_logprob forward_kernel");
    if (p.splits > 1) {
        GSPO4J_LAUNCH(static_cast<unsigned>(ceil_div(g.rows, 256)), 256, 0, stream, forward_merge_kernel<D>)(
            data, g, targets, inverse_temperature, check_finite, record, logprob, lse, entropy, partial, partial_bad);
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
    float* target_x = scratch.as<float>(partial_count * sizeof(double));
    int* any_bad = scratch.as<int>(partial_count * sizeof(double) + target_count * sizeof(float));
    check_cuda(cudaMemsetAsync(any_bad, 0, sizeof(int), stream), "cudaMemsetAsync");
    const unsigned check_blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(g.rows, 256), 4096));
    GSPO4J_LAUNCH(check_blocks, 256, 0, stream, check_targets_kernel)(targets, g.rows, g.vocab, record, any_bad);
    check_launch("token_logprob check_targets_kernel");
    const dim3 grid(p.grid_rows, static_cast<unsigned>(p.splits));
    with_threads(p.threads, [&](auto threads) {
        constexpr int kThreads = decltype(threads)::value;
        GSPO4J_LAUNCH(grid, kThreads, 0, stream, backward_kernel<D, kThreads>)(data, g, targets, inverse, inverse_wide, lse, entropy,
                                                                   grad_logprob, grad_entropy, grad, any_bad, partial_others,
                                                                   target_x);
    });
    check_launch("token_logprob backward_kernel");
    if (p.splits > 1) {
        GSPO4J_LAUNCH(static_cast<unsigned>(ceil_div(g.rows, 256)), 256, 0, stream, backward_target_kernel<D>)(
            g, targets, inverse_wide, lse, entropy, grad_logprob, grad_entropy, grad, any_bad, partial_others, target_x);
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
    const float inverse_temperature = static_cast<float>(1.0 / temperature);
    with_dtype(logits.dtype, [&](auto tag) {
        forward_typed<decltype(tag)>(stream, logits, targets, inverse_temperature, check_finite, record, logprob, lse, entropy);
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
