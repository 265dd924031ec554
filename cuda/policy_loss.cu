// CUDA sequence log-ratio and policy loss (docs/math.md "Policy losses"): the same passes as
// native/src/policy_loss.cpp, with the same per-response and per-token math (loss_math.h), each a
// kernel on the caller's stream, with every reduction a
// fixed-shape tree (one CTA per response, then one CTA over the responses) so the loss and the
// coefficients are bitwise reproducible. O(tokens) work: a few microseconds next to the logits.
#include <cfloat>
#include <initializer_list>
#include <utility>

#include "common.cuh"
#include "cuda_ops.h"
#include "loss_math.h"

namespace gspo4j {
namespace cuda {
namespace {

constexpr int kResponseThreads = 256;
constexpr int kTotalThreads = 1024;

__device__ __forceinline__ bool counted(const uint8_t* mask, int64_t i) { return mask == nullptr || mask[i] != 0; }

__device__ __forceinline__ void require_finite(const float* values, int64_t i, DataError kind, ErrorRecord record) {
    if (values && !isfinite(values[i])) report(record, kind, i);
}

// What the first pass learns of each response.
struct ResponseStats {
    math::ResponseSums sums;  // L_b, sum m (lp - olp), GMPO's sum m l_t
    int64_t span;             // tokens in the response, counted or not (the longest sets Lnorm)
};

// GMPO's first pass also sums l_t, which needs A_b: `advantages` null for everything else.
struct GeometricInputs {
    const float* advantages;
    gspo4j_loss_config config;
};

// Which inputs the first pass checks for NaN/Inf at counted tokens.
struct FiniteChecks {
    bool enabled;
    bool advantages_per_token;
    bool advantages_per_response;
    const float* advantages;
    const float* ref_logprob;
    const float* entropy;
};

// The token weights' inputs of the first pass (rollout correction, top-entropy selection).
struct WeightInputs {
    math::Weights weights;
    const float* advantages;  // A_b for the off-policy mask (per response), or null
};

// A response's WeightSums over its CTA, each field a fixed-shape tree.
__device__ math::WeightSums block_reduce_weights(const math::WeightSums& own, double* shared) {
    math::WeightSums total;
    total.mismatch = block_reduce(own.mismatch, Add(), 0.0, shared);
    total.divergence = block_reduce(own.divergence, Add(), 0.0, shared);
    total.divergence_max = block_reduce(own.divergence_max, Max(), -static_cast<double>(INFINITY), shared);
    total.behaviour_gap = block_reduce(own.behaviour_gap, Add(), 0.0, shared);
    total.token_factor = block_reduce(own.token_factor, Add(), 0.0, shared);
    total.kept_factor = block_reduce(own.kept_factor, Add(), 0.0, shared);
    total.zero_tokens = block_reduce(own.zero_tokens, Add(), 0.0, shared);
    total.kept = block_reduce(own.kept, Add(), 0.0, shared);
    total.k3 = block_reduce(own.k3, Add(), 0.0, shared);
    return total;
}

// Pass 1, one CTA per response: L_b, the span, the mean log-ratio, the weights' factors, and the
// data checks.
__global__ void __launch_bounds__(kResponseThreads) response_stats_kernel(DeviceLayout layout, const float* __restrict__ logprob,
                                                                          const float* __restrict__ old_logprob,
                                                                          const uint8_t* __restrict__ mask, FiniteChecks checks,
                                                                          GeometricInputs geometric, WeightInputs weight_in,
                                                                          ErrorRecord record, ResponseStats* __restrict__ stats,
                                                                          float* __restrict__ log_ratio_out,
                                                                          float* __restrict__ lengths_out) {
    GSPO4J_SHARED(double, shared, 32);
    GSPO4J_SHARED(long long, shared_count, 32);
    if (layout.rejected()) return;  // the whole block
    for (int64_t b = blockIdx.x; b < layout.batch; b += gridDim.x) {
        int64_t begin = layout.begin(b);
        int64_t end = layout.end(b);
        clamp_range(layout.tokens, &begin, &end);
        long long count = 0;
        double sum = 0.0;
        double geometric_sum = 0.0;
        const double advantage = geometric.advantages ? static_cast<double>(geometric.advantages[b]) : 0.0;
        const bool weighted = weight_in.weights.any();
        math::WeightSums weight_sums;
        for (int64_t i = begin + threadIdx.x; i < end; i += kResponseThreads) {
            if (!counted(mask, i)) continue;
            ++count;
            if (weighted) {
                const double lp = logprob[i];
                weight_sums.add_token(geometric.config, weight_in.weights, lp, old_logprob ? static_cast<double>(old_logprob[i]) : lp, i);
            }
            if (checks.enabled) {
                require_finite(logprob, i, DataError::kNonFiniteLogprob, record);
                require_finite(old_logprob, i, DataError::kNonFiniteOldLogprob, record);
                require_finite(weight_in.weights.rollout_logprob, i, DataError::kNonFiniteRolloutLogprob, record);
                if (checks.advantages_per_token) require_finite(checks.advantages, i, DataError::kNonFiniteAdvantages, record);
                require_finite(checks.ref_logprob, i, DataError::kNonFiniteRefLogprob, record);
                require_finite(checks.entropy, i, DataError::kNonFiniteEntropy, record);
            }
            if (old_logprob) sum += static_cast<double>(logprob[i]) - static_cast<double>(old_logprob[i]);
            if (geometric.advantages) {
                const double lp = logprob[i];
                geometric_sum += math::geometric_term(geometric.config, lp, old_logprob ? static_cast<double>(old_logprob[i]) : lp,
                                                      advantage);
            }
        }
        const long long length = block_reduce(count, Add(), 0LL, shared_count);
        const double total = block_reduce(sum, Add(), 0.0, shared);
        const double geometric_total = geometric.advantages ? block_reduce(geometric_sum, Add(), 0.0, shared) : 0.0;
        math::WeightSums weight_total;
        if (weighted) weight_total = block_reduce_weights(weight_sums, shared);
        if (threadIdx.x == 0) {
            const double log_ratio = length > 0 ? total / static_cast<double>(length) : 0.0;
            if (checks.enabled && checks.advantages_per_response && length > 0) {
                require_finite(checks.advantages, b, DataError::kNonFiniteAdvantages, record);
            }
            if (stats) {
                ResponseStats out{math::ResponseSums{length, total, geometric_total, math::ResponseWeights()}, end - begin};
                if (weighted) {
                    const double a = weight_in.advantages && length > 0 ? static_cast<double>(weight_in.advantages[b]) : 0.0;
                    out.sums.weights = math::response_weights(geometric.config, weight_total, length, a);
                }
                stats[b] = out;
            }
            if (log_ratio_out) log_ratio_out[b] = static_cast<float>(log_ratio);
            if (lengths_out) lengths_out[b] = static_cast<float>(length);
        }
    }
}

// Pass 2, one CTA: B', the token count, the longest response, and the denominators.
// Pass 2, one CTA: B', the token count, the longest response, the denominators, and the weights'
// metric totals (`weight_totals` null without weights).
__global__ void __launch_bounds__(kTotalThreads) scales_kernel(gspo4j_loss_config config, DeviceLayout layout,
                                                               const ResponseStats* __restrict__ stats,
                                                               math::Scales* __restrict__ scales,
                                                               math::WeightTotals* __restrict__ weight_totals) {
    GSPO4J_SHARED(long long, shared, 32);
    GSPO4J_SHARED(double, shared_double, 32);
    if (layout.rejected()) return;
    long long responses = 0, tokens = 0, longest = 0;
    math::WeightTotals weights;
    for (int64_t b = threadIdx.x; b < layout.batch; b += kTotalThreads) {
        responses += stats[b].sums.length > 0 ? 1 : 0;
        tokens += stats[b].sums.length;
        longest = stats[b].span > longest ? stats[b].span : longest;
        if (weight_totals) weights.add(stats[b].sums);
    }
    responses = block_reduce(responses, Add(), 0LL, shared);
    tokens = block_reduce(tokens, Add(), 0LL, shared);
    longest = block_reduce(longest, Max(), 0LL, shared);
    if (weight_totals) {
        math::WeightTotals total;
        total.rollout_sum = block_reduce(weights.rollout_sum, Add(), 0.0, shared_double);
        total.zero_tokens = block_reduce(weights.zero_tokens, Add(), 0.0, shared_double);
        total.zero_responses = block_reduce(weights.zero_responses, Add(), 0.0, shared_double);
        total.kept = block_reduce(weights.kept, Add(), 0.0, shared_double);
        total.k1 = block_reduce(weights.k1, Add(), 0.0, shared_double);
        total.k3 = block_reduce(weights.k3, Add(), 0.0, shared_double);
        if (threadIdx.x == 0) *weight_totals = total;
    }
    if (threadIdx.x == 0) {
        *scales = math::aggregation_scales(config, layout.offsets != nullptr, layout.batch, layout.seq, responses, tokens, longest);
    }
}

// Every field of a block's partial sums through block_reduce, in a fixed order.
__device__ math::Partial block_reduce_partial(const math::Partial& own, double* shared) {
    const double infinity = static_cast<double>(INFINITY);
    math::Partial total;
    total.surrogate = block_reduce(own.surrogate, Add(), 0.0, shared);
    total.kl = block_reduce(own.kl, Add(), 0.0, shared);
    total.entropy = block_reduce(own.entropy, Add(), 0.0, shared);
    total.clip_low = block_reduce(own.clip_low, Add(), 0.0, shared);
    total.clip_high = block_reduce(own.clip_high, Add(), 0.0, shared);
    total.dual_clip = block_reduce(own.dual_clip, Add(), 0.0, shared);
    total.ratio_sum = block_reduce(own.ratio_sum, Add(), 0.0, shared);
    total.ratio_min = block_reduce(own.ratio_min, Min(), infinity, shared);
    total.ratio_max = block_reduce(own.ratio_max, Max(), -infinity, shared);
    total.ratio_count = block_reduce(own.ratio_count, Add(), 0.0, shared);
    total.approx_kl = block_reduce(own.approx_kl, Add(), 0.0, shared);
    total.entropy_sum = block_reduce(own.entropy_sum, Add(), 0.0, shared);
    return total;
}

struct LossInputs {
    const float* logprob;
    const float* old_logprob;
    const uint8_t* mask;
    const float* advantages;
    bool advantages_per_token;
    const float* ref_logprob;
    const float* entropy;
    math::Weights weights;
};

// Pass 3, one CTA per response: the per-token coefficients and the response's partial sums, by
// the CPU's own per-response and per-token math (loss_math.h). Two CTAs per multiprocessor, not
// the four ptxas aims at for 256 threads: the token loop keeps a Partial (twelve doubles), the
// clip bounds, the response's terms (VESPO's two weights, GMPO's sign) and every objective's
// per-token branch beside fp64 exp and log, about 80 registers; at three CTAs (a cap of 85) ptxas
// spilled, and cuda/ptx_check.cmake fails the build on spills. The pass is O(tokens).
__global__ void __launch_bounds__(kResponseThreads, 2) coefficients_kernel(gspo4j_loss_config config, DeviceLayout layout, LossInputs in,
                                                                        const ResponseStats* __restrict__ stats,
                                                                        const math::Scales* __restrict__ scales,
                                                                        float* __restrict__ grad_logprob,
                                                                        float* __restrict__ grad_entropy,
                                                                        math::Partial* __restrict__ partials) {
    GSPO4J_SHARED(double, shared, 32);
    if (layout.rejected()) return;
    const math::Scales s = *scales;
    const math::Clip clip = math::Clip::of(config);
    for (int64_t b = blockIdx.x; b < layout.batch; b += gridDim.x) {
        int64_t begin = layout.begin(b);
        int64_t end = layout.end(b);
        clamp_range(layout.tokens, &begin, &end);
        // Thread 0 carries the response's own terms (GSPO's clip decision, its ratio); the others
        // drop theirs. Every thread passes &own: a pointer that is null on some threads would keep
        // own's twelve doubles in local memory (a 104-byte stack frame and a spill, ptxas -v).
        math::Partial own;
        const math::Response response =
            math::begin_response(config, clip, s, stats[b].sums, in.advantages, b, &own);
        if (threadIdx.x != 0) own = math::Partial();
        for (int64_t i = begin + threadIdx.x; i < end; i += kResponseThreads) {
            if (!counted(in.mask, i)) {
                grad_logprob[i] = 0.0f;
                if (grad_entropy) grad_entropy[i] = 0.0f;
                continue;
            }
            const double advantage = in.advantages_per_token ? in.advantages[i] : in.advantages[b];
            math::counted_token(config, clip, response, i, in.logprob, in.old_logprob, advantage, in.ref_logprob, in.entropy,
                                in.weights, own, grad_logprob, grad_entropy);
        }
        const math::Partial total = block_reduce_partial(own, shared);
        if (threadIdx.x == 0) partials[b] = total;
    }
}

// Pass 4, one CTA: the responses' partial sums in a fixed order, the loss and the metrics.
__global__ void __launch_bounds__(kTotalThreads) finish_kernel(gspo4j_loss_config config, DeviceLayout layout,
                                                               const math::Partial* __restrict__ partials,
                                                               const math::Scales* __restrict__ scales,
                                                               const math::WeightTotals* __restrict__ weight_totals, bool selected,
                                                               float* __restrict__ loss, float* __restrict__ metrics) {
    GSPO4J_SHARED(double, shared, 32);
    if (layout.rejected()) return;
    math::Partial own;
    for (int64_t b = threadIdx.x; b < layout.batch; b += kTotalThreads) own.add(partials[b]);
    const math::Partial total = block_reduce_partial(own, shared);
    if (threadIdx.x == 0) {
        const math::WeightTotals weights = weight_totals ? *weight_totals : math::WeightTotals();
        math::finish_loss(config, total, *scales, weights, weight_totals != nullptr, selected, loss, metrics);
    }
}

unsigned response_grid(int64_t batch) { return static_cast<unsigned>(batch < 65535 * 16 ? batch : 65535 * 16); }

// Runs on the device of the first non-null pointer; every other one must be there too.
const void* first_pointer(std::initializer_list<const void*> pointers) {
    for (const void* p : pointers) {
        if (p) return p;
    }
    return nullptr;
}

// ---- Top-entropy selection's threshold -------------------------------------------------------------

constexpr int kSelectThreads = 1024;
constexpr int kSelectBins = 256;  // 8 bits of the key per pass, four passes

// One CTA selects the k-th smallest counted entropy by radix selection on the order keys
// (loss_math.h): a histogram of the top 8 bits of every key, the bin that holds rank k, then the
// next 8 bits of the keys in that bin, down to the whole key; then, when the upper rank counts, the
// smallest key above it (or the same key again when it repeats). The counts are sums, so the
// result does not depend on the order threads add them in, and it is the CPU's own: the same keys,
// ranks and lerp. Reads the entropies at most five times (1 MB for 50,000 tokens): tens of
// microseconds at most next to the loss; the threshold never leaves the device.
__global__ void __launch_bounds__(kSelectThreads) entropy_threshold_kernel(int64_t tokens, const float* __restrict__ entropy,
                                                                           const uint8_t* __restrict__ mask, double rho, bool check_finite,
                                                                           ErrorRecord record, double* __restrict__ threshold) {
    GSPO4J_SHARED(unsigned long long, bins, kSelectBins);
    GSPO4J_SHARED(unsigned long long, sums, 32);
    GSPO4J_SHARED(unsigned long long, state, 4);  // n; the key's digits so far; the rank left among them; their count
    GSPO4J_SHARED(unsigned, low_keys, 32);
    const int tid = threadIdx.x;
    for (int d = tid; d < kSelectBins; d += kSelectThreads) bins[d] = 0;
    __syncthreads();
    // Pass 1: the top digits' histogram, and the entries that rule a selection out (a NaN; with
    // checking on, any non-finite value, reported at its index).
    unsigned long long bad = 0;
    for (int64_t i = tid; i < tokens; i += kSelectThreads) {
        if (!counted(mask, i)) continue;
        const float h = entropy[i];
        if (!isfinite(h)) {
            if (check_finite) report(record, DataError::kNonFiniteEntropy, i);
            if (check_finite || isnan(h)) {
                ++bad;
                continue;
            }
        }
        atomicAdd(&bins[math::order_key(__float_as_uint(h)) >> 24], 1ull);
    }
    bad = block_reduce(bad, Add(), 0ull, sums);  // its barriers also complete the histogram
    if (bad > 0) {
        if (tid == 0) *threshold = NAN;
        return;
    }
    if (tid == 0) {
        unsigned long long n = 0;
        for (int d = 0; d < kSelectBins; ++d) n += bins[d];
        state[0] = n;
    }
    __syncthreads();
    const int64_t n = static_cast<int64_t>(state[0]);
    if (n == 0) {
        if (tid == 0) *threshold = INFINITY;
        return;
    }
    const math::QuantileRank rank = math::quantile_rank(n, rho);
    uint32_t prefix = 0;
    unsigned long long left = static_cast<unsigned long long>(rank.k);
    unsigned long long equal = 0;
    for (int shift = 24;; shift -= 8) {
        if (shift < 24) {
            for (int d = tid; d < kSelectBins; d += kSelectThreads) bins[d] = 0;
            __syncthreads();
            const uint32_t high = prefix >> (shift + 8);
            for (int64_t i = tid; i < tokens; i += kSelectThreads) {
                if (!counted(mask, i)) continue;
                const uint32_t key = math::order_key(__float_as_uint(entropy[i]));
                if ((key >> (shift + 8)) == high) atomicAdd(&bins[(key >> shift) & 0xffu], 1ull);
            }
            __syncthreads();
        }
        if (tid == 0) {
            int d = 0;
            unsigned long long rest = left;
            while (d < kSelectBins - 1 && rest >= bins[d]) rest -= bins[d++];
            state[1] = prefix | (static_cast<uint32_t>(d) << shift);
            state[2] = rest;
            state[3] = bins[d];
        }
        __syncthreads();
        prefix = static_cast<uint32_t>(state[1]);
        left = state[2];
        equal = state[3];
        if (shift == 0) break;
    }
    const double a = __uint_as_float(math::key_bits(prefix));
    double b = a;
    if (rank.upper && left + 1 >= equal) {
        // Rank k + 1 is the smallest key above the k-th.
        unsigned above = 0xffffffffu;
        for (int64_t i = tid; i < tokens; i += kSelectThreads) {
            if (!counted(mask, i)) continue;
            const uint32_t key = math::order_key(__float_as_uint(entropy[i]));
            if (key > prefix && key < above) above = key;
        }
        above = block_reduce(above, Min(), 0xffffffffu, low_keys);
        b = __uint_as_float(math::key_bits(above));
    }
    if (tid == 0) *threshold = rank.upper ? math::quantile_lerp(a, b, rank.t) : a;
}

}  // namespace

void entropy_threshold(void* stream_pointer, int64_t tokens, const float* entropy, const uint8_t* mask, double rho, bool check_finite,
                       double* threshold) {
    const DeviceGuard guard(threshold, "threshold");
    require_device_pointer(entropy, "entropy");
    require_device_pointer(mask, "mask");
    const cudaStream_t stream = as_stream(stream_pointer);
    const ErrorRecord record = error_record();
    GSPO4J_LAUNCH(1, kSelectThreads, 0, stream, entropy_threshold_kernel)(tokens, entropy, mask, rho, check_finite, record, threshold);
    check_launch("entropy_threshold_kernel");
}

void sequence_log_ratio(void* stream_pointer, const TokenLayout& layout, const float* logprob, const float* old_logprob,
                        const uint8_t* mask, bool check_finite, float* log_ratio, float* lengths) {
    // With batch = 0 and tokens = 0 only the offsets may be there, and offsets[0] must still be 0.
    const void* anchor = first_pointer({log_ratio, logprob, lengths, layout.offsets});
    if (anchor == nullptr) return;  // padded, batch = 0 and tokens = 0: nothing to compute or check
    const DeviceGuard guard(anchor, "log_ratio");
    for (auto [p, name] : {std::pair<const void*, const char*>{logprob, "logprob"}, {old_logprob, "old_logprob"}, {mask, "mask"},
                           {log_ratio, "log_ratio"}, {lengths, "lengths"}, {layout.offsets, "offsets"}}) {
        require_device_pointer(p, name);
    }
    const cudaStream_t stream = as_stream(stream_pointer);
    const ErrorRecord record = error_record();
    const CheckedLayout checked(stream, layout, record);
    if (layout.batch == 0) return;
    const FiniteChecks checks{check_finite, false, false, nullptr, nullptr, nullptr};
    GeometricInputs geometric{};
    geometric.advantages = nullptr;
    GSPO4J_LAUNCH(response_grid(layout.batch), kResponseThreads, 0, stream, response_stats_kernel)(
        checked.device(), logprob, old_logprob, mask, checks, geometric, WeightInputs{math::Weights{nullptr, nullptr, nullptr, false}, nullptr},
        record, nullptr, log_ratio, lengths);
    check_launch("sequence_log_ratio response_stats_kernel");
}

void policy_loss(void* stream_pointer, const gspo4j_loss_config& config, const TokenLayout& layout, const float* logprob,
                 const float* old_logprob, const float* rollout_logprob, const uint8_t* mask, const float* advantages,
                 bool advantages_per_token, const float* ref_logprob, const float* entropy, const double* entropy_threshold,
                 float* loss, float* grad_logprob, float* grad_entropy, float* metrics) {
    const DeviceGuard guard(loss, "loss");
    for (auto [p, name] : {std::pair<const void*, const char*>{logprob, "logprob"}, {old_logprob, "old_logprob"},
                           {rollout_logprob, "rollout_logprob"}, {entropy_threshold, "entropy_threshold"}, {mask, "mask"},
                           {advantages, "advantages"}, {ref_logprob, "ref_logprob"}, {entropy, "entropy"},
                           {grad_logprob, "grad_logprob"}, {grad_entropy, "grad_entropy"}, {metrics, "metrics"},
                           {layout.offsets, "offsets"}}) {
        require_device_pointer(p, name);
    }
    const cudaStream_t stream = as_stream(stream_pointer);
    const ErrorRecord record = error_record();
    const CheckedLayout checked(stream, layout, record);
    const size_t batch = static_cast<size_t>(layout.batch);
    const size_t scales_at = batch * (sizeof(ResponseStats) + sizeof(math::Partial));
    const size_t totals_at = scales_at + (sizeof(math::Scales) + 15) / 16 * 16;
    Scratch scratch(totals_at + sizeof(math::WeightTotals), stream);
    ResponseStats* stats = scratch.as<ResponseStats>();
    math::Partial* partials = scratch.as<math::Partial>(batch * sizeof(ResponseStats));
    math::Scales* scales = scratch.as<math::Scales>(scales_at);
    const math::Weights weights{rollout_logprob, entropy_threshold, entropy,
                                rollout_logprob != nullptr || math::rollout_enabled(config)};
    math::WeightTotals* weight_totals = weights.any() ? scratch.as<math::WeightTotals>(totals_at) : nullptr;
    const DeviceLayout& device = checked.device();
    const bool use_kl = config.kl_coef != 0.0;
    if (layout.batch > 0) {
        const FiniteChecks checks{config.check_finite != 0, advantages_per_token, !advantages_per_token, advantages,
                                  use_kl ? ref_logprob : nullptr, entropy};
        const GeometricInputs geometric{config.objective == GSPO4J_OBJECTIVE_GMPO ? advantages : nullptr, config};
        const WeightInputs weight_in{weights, advantages_per_token ? nullptr : advantages};
        GSPO4J_LAUNCH(response_grid(layout.batch), kResponseThreads, 0, stream, response_stats_kernel)(
            device, logprob, old_logprob, mask, checks, geometric, weight_in, record, stats, nullptr, nullptr);
        check_launch("policy_loss response_stats_kernel");
    }
    GSPO4J_LAUNCH(1, kTotalThreads, 0, stream, scales_kernel)(config, device, stats, scales, weight_totals);
    check_launch("policy_loss scales_kernel");
    if (layout.batch > 0) {
        const LossInputs in{logprob, old_logprob, mask, advantages, advantages_per_token, ref_logprob, entropy, weights};
        GSPO4J_LAUNCH(response_grid(layout.batch), kResponseThreads, 0, stream, coefficients_kernel)(config, device, in, stats, scales,
                                                                                         grad_logprob, grad_entropy, partials);
        check_launch("policy_loss coefficients_kernel");
    }
    GSPO4J_LAUNCH(1, kTotalThreads, 0, stream, finish_kernel)(config, device, partials, scales, weight_totals,
                                                              entropy_threshold != nullptr, loss, metrics);
    check_launch("policy_loss finish_kernel");
}

}  // namespace cuda
}  // namespace gspo4j
