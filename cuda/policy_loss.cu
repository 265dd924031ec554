// CUDA sequence log-ratio and policy loss (SPEC.md "Policy losses"): the same passes as
// native/src/policy_loss.cpp, each a kernel on the caller's stream, with every reduction a
// fixed-shape tree (one CTA per response, then one CTA over the responses) so the loss and the
// coefficients are bitwise reproducible. O(tokens) work: a few microseconds next to the logits.
#include <cfloat>
#include <initializer_list>
#include <utility>

#include "common.cuh"
#include "cuda_ops.h"

namespace gspo4j {
namespace cuda {
namespace {

constexpr int kResponseThreads = 256;
constexpr int kTotalThreads = 1024;

__device__ __forceinline__ bool counted(const uint8_t* mask, int64_t i) { return mask == nullptr || mask[i] != 0; }

// std::min and std::max as the CPU code uses them, NaN included (fmin/fmax would drop a NaN:
// with checking off, a NaN log-ratio must stay NaN, not become e^-R).
__device__ __forceinline__ double min_of(double a, double b) { return b < a ? b : a; }
__device__ __forceinline__ double max_of(double a, double b) { return a < b ? b : a; }

__device__ __forceinline__ void require_finite(const float* values, int64_t i, DataError kind, ErrorRecord record) {
    if (values && !isfinite(values[i])) report(record, kind, i);
}

// What the first pass learns of each response.
struct ResponseStats {
    int64_t length;      // L_b: counted tokens
    int64_t span;        // tokens in the response, counted or not (the longest sets Lnorm)
    double log_ratio;    // (1/L_b) sum m (lp - olp), 0 when L_b = 0 or on-policy
};

// What is needed to finish a response's coefficients: the aggregation denominators.
struct Scales {
    double token_scale;     // weight of q_bt before the optional 1/L_b
    double response_scale;  // 1/B' (or 1/normalizer)
    int64_t responses;      // B'
    int64_t total_tokens;   // sum L_b
    int divide_by_length;
};

struct Clip {
    double low;
    double high;
    double dual;
    double clamp;

    struct Decision {
        double objective;
        bool gradient;
        bool clipped_low;
        bool clipped_high;
        bool dual_clipped;
    };

    // J = min(x A, clip(x) A), then max(J, c A) for A < 0 with dual clip; a tie takes the full
    // gradient, as min + clamp do in autograd.
    __device__ Decision decide(double ratio, double advantage) const {
        const double bounded = min_of(max_of(ratio, low), high);
        const double unclipped = ratio * advantage;
        const double clipped = bounded * advantage;
        Decision d;
        d.gradient = unclipped <= clipped;
        d.objective = d.gradient ? unclipped : clipped;
        d.clipped_low = ratio < low && advantage < 0.0;
        d.clipped_high = ratio > high && advantage > 0.0;
        d.dual_clipped = false;
        if (dual > 0.0 && advantage < 0.0 && d.objective < dual * advantage) {
            d.objective = dual * advantage;
            d.gradient = false;
            d.dual_clipped = true;
        }
        return d;
    }

    // exp of a log-ratio clamped to [-R, R]; `inside` is false where the clamp cut the gradient.
    __device__ double ratio(double log_ratio, bool* inside) const {
        *inside = log_ratio >= -clamp && log_ratio <= clamp;
        return exp(min_of(max_of(log_ratio, -clamp), clamp));
    }
};

__device__ double kl_value(int estimator, double d) {
    switch (estimator) {
        case GSPO4J_KL_K1: return -d;
        case GSPO4J_KL_K2: return 0.5 * d * d;
        default: return exp(d) - d - 1.0;
    }
}

__device__ double kl_gradient(int estimator, double d) {
    switch (estimator) {
        case GSPO4J_KL_K1: return 1.0;
        case GSPO4J_KL_K2: return -d;
        default: return 1.0 - exp(d);
    }
}

// Which inputs the first pass checks for NaN/Inf at counted tokens.
struct FiniteChecks {
    bool enabled;
    bool advantages_per_token;
    bool advantages_per_response;
    const float* advantages;
    const float* ref_logprob;
    const float* entropy;
};

// Pass 1, one CTA per response: L_b, the span, the mean log-ratio, and the data checks.
__global__ void __launch_bounds__(kResponseThreads) response_stats_kernel(DeviceLayout layout, const float* __restrict__ logprob,
                                                                          const float* __restrict__ old_logprob,
                                                                          const uint8_t* __restrict__ mask, FiniteChecks checks,
                                                                          ErrorRecord record, ResponseStats* __restrict__ stats,
                                                                          float* __restrict__ log_ratio_out,
                                                                          float* __restrict__ lengths_out) {
    __shared__ double shared[32];
    __shared__ long long shared_count[32];
    for (int64_t b = blockIdx.x; b < layout.batch; b += gridDim.x) {
        int64_t begin = layout.begin(b);
        int64_t end = layout.end(b);
        clamp_range(layout.tokens, &begin, &end);
        long long count = 0;
        double sum = 0.0;
        for (int64_t i = begin + threadIdx.x; i < end; i += kResponseThreads) {
            if (!counted(mask, i)) continue;
            ++count;
            if (checks.enabled) {
                require_finite(logprob, i, DataError::kNonFiniteLogprob, record);
                require_finite(old_logprob, i, DataError::kNonFiniteOldLogprob, record);
                if (checks.advantages_per_token) require_finite(checks.advantages, i, DataError::kNonFiniteAdvantages, record);
                require_finite(checks.ref_logprob, i, DataError::kNonFiniteRefLogprob, record);
                require_finite(checks.entropy, i, DataError::kNonFiniteEntropy, record);
            }
            if (old_logprob) sum += static_cast<double>(logprob[i]) - static_cast<double>(old_logprob[i]);
        }
        const long long length = block_reduce(count, Add(), 0LL, shared_count);
        const double total = block_reduce(sum, Add(), 0.0, shared);
        if (threadIdx.x == 0) {
            const double log_ratio = length > 0 ? total / static_cast<double>(length) : 0.0;
            if (checks.enabled && checks.advantages_per_response && length > 0) {
                require_finite(checks.advantages, b, DataError::kNonFiniteAdvantages, record);
            }
            if (stats) stats[b] = ResponseStats{length, end - begin, log_ratio};
            if (log_ratio_out) log_ratio_out[b] = static_cast<float>(log_ratio);
            if (lengths_out) lengths_out[b] = static_cast<float>(length);
        }
    }
}

// Pass 2, one CTA: B', the token count, the longest response, and the denominators.
__global__ void __launch_bounds__(kTotalThreads) scales_kernel(gspo4j_loss_config config, DeviceLayout layout,
                                                               const ResponseStats* __restrict__ stats, Scales* __restrict__ scales) {
    __shared__ long long shared[32];
    long long responses = 0, tokens = 0, longest = 0;
    for (int64_t b = threadIdx.x; b < layout.batch; b += kTotalThreads) {
        responses += stats[b].length > 0 ? 1 : 0;
        tokens += stats[b].length;
        longest = stats[b].span > longest ? stats[b].span : longest;
    }
    responses = block_reduce(responses, Add(), 0LL, shared);
    tokens = block_reduce(tokens, Add(), 0LL, shared);
    longest = block_reduce(longest, Max(), 0LL, shared);
    if (threadIdx.x != 0) return;
    const bool explicit_normalizer = config.normalizer > 0.0;
    const double response_denominator = explicit_normalizer ? config.normalizer : static_cast<double>(responses);
    double token_denominator = 0.0;
    int divide_by_length = 0;
    switch (config.aggregation) {
        case GSPO4J_SEQ_MEAN_TOKEN_MEAN:
            token_denominator = response_denominator;
            divide_by_length = 1;
            break;
        case GSPO4J_TOKEN_MEAN:
            token_denominator = explicit_normalizer ? config.normalizer : static_cast<double>(tokens);
            break;
        case GSPO4J_SEQ_MEAN_TOKEN_SUM:
            token_denominator = response_denominator;
            break;
        default: {
            const double length_norm = config.length_norm > 0.0 ? config.length_norm
                                       : layout.offsets               ? static_cast<double>(longest)
                                                                      : static_cast<double>(layout.seq);
            token_denominator = (explicit_normalizer ? config.normalizer : static_cast<double>(layout.batch)) * length_norm;
            break;
        }
    }
    Scales s;
    s.token_scale = token_denominator > 0.0 ? 1.0 / token_denominator : 0.0;
    s.response_scale = response_denominator > 0.0 ? 1.0 / response_denominator : 0.0;
    s.responses = responses;
    s.total_tokens = tokens;
    s.divide_by_length = divide_by_length;
    *scales = s;
}

// Per-response partial sums, added over responses in a fixed order by the last pass.
struct Partial {
    double surrogate, kl, entropy, clip_low, clip_high, dual_clip, ratio_sum, ratio_min, ratio_max, ratio_count, approx_kl,
        entropy_sum;
};

struct LossInputs {
    const float* logprob;
    const float* old_logprob;
    const uint8_t* mask;
    const float* advantages;
    bool advantages_per_token;
    const float* ref_logprob;
    const float* entropy;
};

// Pass 3, one CTA per response: the per-token coefficients and the response's partial sums.
__global__ void __launch_bounds__(kResponseThreads) coefficients_kernel(gspo4j_loss_config config, DeviceLayout layout, LossInputs in,
                                                                        const ResponseStats* __restrict__ stats,
                                                                        const Scales* __restrict__ scales,
                                                                        float* __restrict__ grad_logprob,
                                                                        float* __restrict__ grad_entropy,
                                                                        Partial* __restrict__ partials) {
    __shared__ double shared[32];
    const Scales s = *scales;
    const Clip clip{1.0 - config.eps_low, 1.0 + config.eps_high, config.dual_clip, config.log_ratio_clamp};
    const int level = config.ratio_level;
    const bool use_kl = config.kl_coef != 0.0;
    const bool use_entropy = config.entropy_coef != 0.0;
    for (int64_t b = blockIdx.x; b < layout.batch; b += gridDim.x) {
        int64_t begin = layout.begin(b);
        int64_t end = layout.end(b);
        clamp_range(layout.tokens, &begin, &end);
        const int64_t n = stats[b].length;
        const double weight = n == 0 ? 0.0 : s.divide_by_length ? s.token_scale / static_cast<double>(n) : s.token_scale;
        bool sequence_inside = true;
        const double sequence_ratio = level == GSPO4J_RATIO_TOKEN ? 1.0 : clip.ratio(stats[b].log_ratio, &sequence_inside);
        double sequence_coefficient = 0.0;
        Partial own = {};
        own.ratio_min = INFINITY;
        own.ratio_max = -INFINITY;
        if (level == GSPO4J_RATIO_SEQUENCE && n > 0) {
            const double a = in.advantages[b];
            const Clip::Decision d = clip.decide(sequence_ratio, a);
            if (threadIdx.x == 0) {
                own.surrogate = d.objective;
                own.clip_low = d.clipped_low;
                own.clip_high = d.clipped_high;
                own.dual_clip = d.dual_clipped;
            }
            if (d.gradient && sequence_inside) sequence_coefficient = a * sequence_ratio / static_cast<double>(n);
        }
        if (level != GSPO4J_RATIO_TOKEN && n > 0 && threadIdx.x == 0) {
            own.ratio_sum = sequence_ratio;
            own.ratio_min = sequence_ratio;
            own.ratio_max = sequence_ratio;
            own.ratio_count = 1.0;
        }
        for (int64_t i = begin + threadIdx.x; i < end; i += kResponseThreads) {
            if (!counted(in.mask, i)) {
                grad_logprob[i] = 0.0f;
                if (grad_entropy) grad_entropy[i] = 0.0f;
                continue;
            }
            const double lp = in.logprob[i];
            const double olp = in.old_logprob ? static_cast<double>(in.old_logprob[i]) : lp;
            double g = 0.0;
            if (level == GSPO4J_RATIO_SEQUENCE) {
                g = -s.response_scale * sequence_coefficient;
            } else {
                const double a = in.advantages_per_token ? in.advantages[i] : in.advantages[b];
                bool inside = sequence_inside;
                const double r = level == GSPO4J_RATIO_TOKEN ? clip.ratio(lp - olp, &inside) : sequence_ratio;
                const Clip::Decision d = clip.decide(r, a);
                own.surrogate += weight * d.objective;
                own.clip_low += d.clipped_low;
                own.clip_high += d.clipped_high;
                own.dual_clip += d.dual_clipped;
                if (level == GSPO4J_RATIO_TOKEN) {
                    own.ratio_sum += r;
                    own.ratio_min = min_of(own.ratio_min, r);
                    own.ratio_max = max_of(own.ratio_max, r);
                    own.ratio_count += 1.0;
                }
                if (d.gradient && inside) g = -weight * a * r;
            }
            if (use_kl) {
                const double raw = static_cast<double>(in.ref_logprob[i]) - lp;
                const double d = min_of(max_of(raw, -config.log_ratio_clamp), config.log_ratio_clamp);
                own.kl += weight * kl_value(config.kl_estimator, d);
                if (raw >= -config.log_ratio_clamp && raw <= config.log_ratio_clamp) {
                    g += config.kl_coef * weight * kl_gradient(config.kl_estimator, d);
                }
            }
            if (in.entropy) {
                own.entropy += weight * in.entropy[i];
                own.entropy_sum += in.entropy[i];
            }
            own.approx_kl += olp - lp;
            grad_logprob[i] = static_cast<float>(g);
            if (grad_entropy) grad_entropy[i] = use_entropy ? static_cast<float>(-config.entropy_coef * weight) : 0.0f;
        }
        Partial total;
        total.surrogate = block_reduce(own.surrogate, Add(), 0.0, shared);
        total.kl = block_reduce(own.kl, Add(), 0.0, shared);
        total.entropy = block_reduce(own.entropy, Add(), 0.0, shared);
        total.clip_low = block_reduce(own.clip_low, Add(), 0.0, shared);
        total.clip_high = block_reduce(own.clip_high, Add(), 0.0, shared);
        total.dual_clip = block_reduce(own.dual_clip, Add(), 0.0, shared);
        total.ratio_sum = block_reduce(own.ratio_sum, Add(), 0.0, shared);
        total.ratio_min = block_reduce(own.ratio_min, Min(), static_cast<double>(INFINITY), shared);
        total.ratio_max = block_reduce(own.ratio_max, Max(), static_cast<double>(-INFINITY), shared);
        total.ratio_count = block_reduce(own.ratio_count, Add(), 0.0, shared);
        total.approx_kl = block_reduce(own.approx_kl, Add(), 0.0, shared);
        total.entropy_sum = block_reduce(own.entropy_sum, Add(), 0.0, shared);
        if (threadIdx.x == 0) partials[b] = total;
    }
}

// Pass 4, one CTA: the responses' partial sums in a fixed order, the loss and the metrics.
__global__ void __launch_bounds__(kTotalThreads) finish_kernel(gspo4j_loss_config config, int64_t batch,
                                                               const Partial* __restrict__ partials, const Scales* __restrict__ scales,
                                                               float* __restrict__ loss, float* __restrict__ metrics) {
    __shared__ double shared[32];
    Partial own = {};
    own.ratio_min = INFINITY;
    own.ratio_max = -INFINITY;
    for (int64_t b = threadIdx.x; b < batch; b += kTotalThreads) {
        const Partial& p = partials[b];
        own.surrogate += p.surrogate;
        own.kl += p.kl;
        own.entropy += p.entropy;
        own.clip_low += p.clip_low;
        own.clip_high += p.clip_high;
        own.dual_clip += p.dual_clip;
        own.ratio_sum += p.ratio_sum;
        own.ratio_min = min_of(own.ratio_min, p.ratio_min);
        own.ratio_max = max_of(own.ratio_max, p.ratio_max);
        own.ratio_count += p.ratio_count;
        own.approx_kl += p.approx_kl;
        own.entropy_sum += p.entropy_sum;
    }
    Partial total;
    total.surrogate = block_reduce(own.surrogate, Add(), 0.0, shared);
    total.kl = block_reduce(own.kl, Add(), 0.0, shared);
    total.entropy = block_reduce(own.entropy, Add(), 0.0, shared);
    total.clip_low = block_reduce(own.clip_low, Add(), 0.0, shared);
    total.clip_high = block_reduce(own.clip_high, Add(), 0.0, shared);
    total.dual_clip = block_reduce(own.dual_clip, Add(), 0.0, shared);
    total.ratio_sum = block_reduce(own.ratio_sum, Add(), 0.0, shared);
    total.ratio_min = block_reduce(own.ratio_min, Min(), static_cast<double>(INFINITY), shared);
    total.ratio_max = block_reduce(own.ratio_max, Max(), static_cast<double>(-INFINITY), shared);
    total.ratio_count = block_reduce(own.ratio_count, Add(), 0.0, shared);
    total.approx_kl = block_reduce(own.approx_kl, Add(), 0.0, shared);
    total.entropy_sum = block_reduce(own.entropy_sum, Add(), 0.0, shared);
    if (threadIdx.x != 0) return;
    const Scales s = *scales;
    const int level = config.ratio_level;
    // "+ 0.0" turns the -0.0 of an empty batch into 0.0.
    const double policy_loss = (level == GSPO4J_RATIO_SEQUENCE ? -s.response_scale * total.surrogate : -total.surrogate) + 0.0;
    loss[0] = static_cast<float>(policy_loss + config.kl_coef * total.kl - config.entropy_coef * total.entropy + 0.0);
    if (!metrics) return;
    const double responses = static_cast<double>(s.responses);
    const double tokens = static_cast<double>(s.total_tokens);
    const double decisions = level == GSPO4J_RATIO_SEQUENCE ? responses : tokens;
    auto mean = [](double sum, double count) { return count > 0.0 ? sum / count : 0.0; };
    const bool any_ratio = total.ratio_count > 0.0;
    metrics[GSPO4J_METRIC_POLICY_LOSS] = static_cast<float>(policy_loss);
    metrics[GSPO4J_METRIC_KL] = static_cast<float>(total.kl);
    metrics[GSPO4J_METRIC_ENTROPY] = static_cast<float>(total.entropy);
    metrics[GSPO4J_METRIC_CLIP_FRACTION_LOW] = static_cast<float>(mean(total.clip_low, decisions));
    metrics[GSPO4J_METRIC_CLIP_FRACTION_HIGH] = static_cast<float>(mean(total.clip_high, decisions));
    metrics[GSPO4J_METRIC_DUAL_CLIP_FRACTION] = static_cast<float>(mean(total.dual_clip, decisions));
    metrics[GSPO4J_METRIC_RATIO_MEAN] = static_cast<float>(mean(total.ratio_sum, total.ratio_count));
    metrics[GSPO4J_METRIC_RATIO_MIN] = any_ratio ? static_cast<float>(total.ratio_min) : 0.0f;
    metrics[GSPO4J_METRIC_RATIO_MAX] = any_ratio ? static_cast<float>(total.ratio_max) : 0.0f;
    metrics[GSPO4J_METRIC_APPROX_KL] = static_cast<float>(mean(total.approx_kl, tokens));
    metrics[GSPO4J_METRIC_ENTROPY_MEAN] = static_cast<float>(mean(total.entropy_sum, tokens));
    metrics[GSPO4J_METRIC_SEQUENCES] = static_cast<float>(responses);
    metrics[GSPO4J_METRIC_TOKENS] = static_cast<float>(tokens);
}

unsigned response_grid(int64_t batch) { return static_cast<unsigned>(batch < 65535 * 16 ? batch : 65535 * 16); }

// Runs on the device of the first non-null pointer; every other one must be there too.
const void* first_pointer(std::initializer_list<const void*> pointers) {
    for (const void* p : pointers) {
        if (p) return p;
    }
    return nullptr;
}

}  // namespace

void sequence_log_ratio(void* stream_pointer, const TokenLayout& layout, const float* logprob, const float* old_logprob,
                        const uint8_t* mask, bool check_finite, float* log_ratio, float* lengths) {
    const void* anchor = first_pointer({log_ratio, logprob, lengths});
    if (anchor == nullptr) return;  // batch = 0 and tokens = 0: nothing to compute
    const DeviceGuard guard(anchor, "log_ratio");
    for (auto [p, name] : {std::pair<const void*, const char*>{logprob, "logprob"}, {old_logprob, "old_logprob"}, {mask, "mask"},
                           {log_ratio, "log_ratio"}, {lengths, "lengths"}, {layout.offsets, "offsets"}}) {
        require_device_pointer(p, name);
    }
    const cudaStream_t stream = as_stream(stream_pointer);
    const ErrorRecord record = error_record();
    check_offsets(stream, layout, record);
    if (layout.batch == 0) return;
    const FiniteChecks checks{check_finite, false, false, nullptr, nullptr, nullptr};
    response_stats_kernel<<<response_grid(layout.batch), kResponseThreads, 0, stream>>>(
        device_layout(layout), logprob, old_logprob, mask, checks, record, nullptr, log_ratio, lengths);
    check_launch("sequence_log_ratio response_stats_kernel");
}

void policy_loss(void* stream_pointer, const gspo4j_loss_config& config, const TokenLayout& layout, const float* logprob,
                 const float* old_logprob, const uint8_t* mask, const float* advantages, bool advantages_per_token,
                 const float* ref_logprob, const float* entropy, float* loss, float* grad_logprob, float* grad_entropy,
                 float* metrics) {
    const DeviceGuard guard(loss, "loss");
    for (auto [p, name] : {std::pair<const void*, const char*>{logprob, "logprob"}, {old_logprob, "old_logprob"}, {mask, "mask"},
                           {advantages, "advantages"}, {ref_logprob, "ref_logprob"}, {entropy, "entropy"},
                           {grad_logprob, "grad_logprob"}, {grad_entropy, "grad_entropy"}, {metrics, "metrics"},
                           {layout.offsets, "offsets"}}) {
        require_device_pointer(p, name);
    }
    const cudaStream_t stream = as_stream(stream_pointer);
    const ErrorRecord record = error_record();
    check_offsets(stream, layout, record);
    const size_t batch = static_cast<size_t>(layout.batch);
    Scratch scratch(batch * (sizeof(ResponseStats) + sizeof(Partial)) + sizeof(Scales), stream);
    ResponseStats* stats = scratch.as<ResponseStats>();
    Partial* partials = scratch.as<Partial>(batch * sizeof(ResponseStats));
    Scales* scales = scratch.as<Scales>(batch * (sizeof(ResponseStats) + sizeof(Partial)));
    const DeviceLayout device = device_layout(layout);
    const bool use_kl = config.kl_coef != 0.0;
    if (layout.batch > 0) {
        const FiniteChecks checks{config.check_finite != 0, advantages_per_token, !advantages_per_token, advantages,
                                  use_kl ? ref_logprob : nullptr, entropy};
        response_stats_kernel<<<response_grid(layout.batch), kResponseThreads, 0, stream>>>(
            device, logprob, old_logprob, mask, checks, record, stats, nullptr, nullptr);
        check_launch("policy_loss response_stats_kernel");
    }
    scales_kernel<<<1, kTotalThreads, 0, stream>>>(config, device, stats, scales);
    check_launch("policy_loss scales_kernel");
    if (layout.batch > 0) {
        const LossInputs in{logprob, old_logprob, mask, advantages, advantages_per_token, ref_logprob, entropy};
        coefficients_kernel<<<response_grid(layout.batch), kResponseThreads, 0, stream>>>(config, device, in, stats, scales,
                                                                                         grad_logprob, grad_entropy, partials);
        check_launch("policy_loss coefficients_kernel");
    }
    finish_kernel<<<1, kTotalThreads, 0, stream>>>(config, layout.batch, partials, scales, loss, metrics);
    check_launch("policy_loss finish_kernel");
}

}  // namespace cuda
}  // namespace gspo4j
