// The per-response and per-token math of the policy loss and of GAE (SPEC.md), written once for
// the CPU code (policy_loss.cpp, advantages.cpp) and the CUDA kernels (cuda/policy_loss.cu,
// cuda/advantages.cu): both devices run the same expressions in the same order, so they agree
// bit for bit on each token's coefficients. Plain C++ when compiled by a C++ compiler,
// __host__ __device__ under nvcc.
#ifndef GSPO4J_LOSS_MATH_H
#define GSPO4J_LOSS_MATH_H

#include <cmath>
#include <cstdint>

#include "gspo4j/gspo4j.h"

#ifdef __CUDACC__
#define GSPO4J_HOST_DEVICE __host__ __device__
#else
#define GSPO4J_HOST_DEVICE
#endif

namespace gspo4j {
namespace math {

// std::min and std::max, NaN behaviour included (fmin/fmax would drop a NaN: with checking off,
// a NaN log-ratio must stay NaN, not become e^-R).
GSPO4J_HOST_DEVICE inline double min_of(double a, double b) { return b < a ? b : a; }
GSPO4J_HOST_DEVICE inline double max_of(double a, double b) { return a < b ? b : a; }

GSPO4J_HOST_DEVICE inline double exp_of(double x) {
#ifdef __CUDA_ARCH__
    return ::exp(x);
#else
    return std::exp(x);
#endif
}

struct Clip {
    double low;   // 1 - eps_low
    double high;  // 1 + eps_high
    double dual;  // 0: off
    double clamp; // R

    struct Decision {
        double objective;  // J
        bool gradient;     // dJ/dratio = A (the unclipped, undual-clipped branch is the one taken)
        bool clipped_low;
        bool clipped_high;
        bool dual_clipped;
    };

    GSPO4J_HOST_DEVICE static Clip of(const gspo4j_loss_config& config) {
        return Clip{1.0 - config.eps_low, 1.0 + config.eps_high, config.dual_clip, config.log_ratio_clamp};
    }

    // J = min(x A, clip(x) A), then max(J, c A) for A < 0 with dual clip.
    GSPO4J_HOST_DEVICE Decision decide(double ratio, double advantage) const {
        const double bounded = min_of(max_of(ratio, low), high);
        const double unclipped = ratio * advantage;
        const double clipped = bounded * advantage;
        Decision d;
        // A tie (ratio inside the range) takes the full gradient, as min + clamp do in autograd.
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
    GSPO4J_HOST_DEVICE double ratio(double log_ratio, bool* inside) const {
        *inside = log_ratio >= -clamp && log_ratio <= clamp;
        return exp_of(min_of(max_of(log_ratio, -clamp), clamp));
    }
};

GSPO4J_HOST_DEVICE inline double kl_value(int32_t estimator, double d) {
    switch (estimator) {
        case GSPO4J_KL_K1: return -d;
        case GSPO4J_KL_K2: return 0.5 * d * d;
        default: return exp_of(d) - d - 1.0;
    }
}

// d(k)/d(lp) with d = ref - lp.
GSPO4J_HOST_DEVICE inline double kl_gradient(int32_t estimator, double d) {
    switch (estimator) {
        case GSPO4J_KL_K1: return 1.0;
        case GSPO4J_KL_K2: return -d;
        default: return 1.0 - exp_of(d);
    }
}

// The aggregation's denominators, from the counts of the batch.
struct Scales {
    double token_scale;     // weight of q_bt before the optional 1/L_b
    double response_scale;  // 1/B' (or 1/normalizer)
    int64_t responses;      // B': responses with L_b > 0
    int64_t tokens;         // sum L_b
    bool divide_by_length;
};

// `longest` is the longest response, counted tokens or not (Lnorm of packed batches).
GSPO4J_HOST_DEVICE inline Scales aggregation_scales(const gspo4j_loss_config& config, bool packed, int64_t batch, int64_t seq,
                                                    int64_t responses, int64_t tokens, int64_t longest) {
    const bool explicit_normalizer = config.normalizer > 0.0;
    const double response_denominator = explicit_normalizer ? config.normalizer : static_cast<double>(responses);
    double token_denominator = 0.0;
    bool divide_by_length = false;
    switch (config.aggregation) {
        case GSPO4J_SEQ_MEAN_TOKEN_MEAN:
            token_denominator = response_denominator;
            divide_by_length = true;
            break;
        case GSPO4J_TOKEN_MEAN:
            token_denominator = explicit_normalizer ? config.normalizer : static_cast<double>(tokens);
            break;
        case GSPO4J_SEQ_MEAN_TOKEN_SUM:
            token_denominator = response_denominator;
            break;
        default: {
            const double length_norm = config.length_norm > 0.0 ? config.length_norm
                                       : packed                       ? static_cast<double>(longest)
                                                                      : static_cast<double>(seq);
            token_denominator = (explicit_normalizer ? config.normalizer : static_cast<double>(batch)) * length_norm;
            break;
        }
    }
    Scales s;
    s.token_scale = token_denominator > 0.0 ? 1.0 / token_denominator : 0.0;
    s.response_scale = response_denominator > 0.0 ? 1.0 / response_denominator : 0.0;
    s.responses = responses;
    s.tokens = tokens;
    s.divide_by_length = divide_by_length;
    return s;
}

// Partial sums of one response (or of a set of them), added in a fixed order.
struct Partial {
    double surrogate = 0.0;  // sum of weight * J (token level) or J_b (sequence level)
    double kl = 0.0;         // sum of weight * k
    double entropy = 0.0;    // sum of weight * H
    double clip_low = 0.0;
    double clip_high = 0.0;
    double dual_clip = 0.0;
    double ratio_sum = 0.0;
    double ratio_min = static_cast<double>(INFINITY);
    double ratio_max = -static_cast<double>(INFINITY);
    double ratio_count = 0.0;
    double approx_kl = 0.0;  // sum of olp - lp
    double entropy_sum = 0.0;

    GSPO4J_HOST_DEVICE void add_ratio(double r) {
        ratio_sum += r;
        ratio_min = min_of(ratio_min, r);
        ratio_max = max_of(ratio_max, r);
        ratio_count += 1.0;
    }

    GSPO4J_HOST_DEVICE void add(const Partial& other) {
        surrogate += other.surrogate;
        kl += other.kl;
        entropy += other.entropy;
        clip_low += other.clip_low;
        clip_high += other.clip_high;
        dual_clip += other.dual_clip;
        ratio_sum += other.ratio_sum;
        ratio_min = min_of(ratio_min, other.ratio_min);
        ratio_max = max_of(ratio_max, other.ratio_max);
        ratio_count += other.ratio_count;
        approx_kl += other.approx_kl;
        entropy_sum += other.entropy_sum;
    }
};

// What a response fixes for all its tokens.
struct Response {
    double weight;             // of each counted token's q: token_scale, divided by L_b for a per-response mean
    double sequence_ratio;     // s_b (GSPO, GSPO-token); 1 at token level
    bool sequence_inside;      // s_b's log-ratio inside [-R, R]
    double sequence_gradient;  // GSPO: dLoss/dlp of each counted token
};

// Starts response b of `length` counted tokens and mean log-ratio `log_ratio`. GSPO's one clip
// decision and the per-response ratio statistics go to `part` (nullable: with several threads per
// response, one of them passes it). advantages[b] is read only for GSPO.
GSPO4J_HOST_DEVICE inline Response begin_response(const gspo4j_loss_config& config, const Clip& clip, const Scales& s,
                                                  int64_t length, double log_ratio, const float* advantages, int64_t b,
                                                  Partial* part) {
    const int32_t level = config.ratio_level;
    Response r;
    r.weight = length == 0 ? 0.0 : s.divide_by_length ? s.token_scale / static_cast<double>(length) : s.token_scale;
    r.sequence_inside = true;
    r.sequence_ratio = level == GSPO4J_RATIO_TOKEN ? 1.0 : clip.ratio(log_ratio, &r.sequence_inside);
    double sequence_coefficient = 0.0;  // GSPO: dJ_b/dlp per counted token, before the loss sign
    if (level == GSPO4J_RATIO_SEQUENCE && length > 0) {
        const double a = advantages[b];
        const Clip::Decision d = clip.decide(r.sequence_ratio, a);
        if (part) {
            part->surrogate += d.objective;
            part->clip_low += d.clipped_low;
            part->clip_high += d.clipped_high;
            part->dual_clip += d.dual_clipped;
        }
        if (d.gradient && r.sequence_inside) sequence_coefficient = a * r.sequence_ratio / static_cast<double>(length);
    }
    r.sequence_gradient = -s.response_scale * sequence_coefficient;
    if (level != GSPO4J_RATIO_TOKEN && length > 0 && part) part->add_ratio(r.sequence_ratio);
    return r;
}

// Counted token i of a response: writes dLoss/dlp and dLoss/dH (nullable) and adds its terms to
// `part`. `advantage` is the token's A (per token, or its response's), unused for GSPO.
GSPO4J_HOST_DEVICE inline void counted_token(const gspo4j_loss_config& config, const Clip& clip, const Response& r, int64_t i,
                                             const float* logprob, const float* old_logprob, double advantage,
                                             const float* ref_logprob, const float* entropy, Partial& part,
                                             float* grad_logprob, float* grad_entropy) {
    const int32_t level = config.ratio_level;
    const double lp = logprob[i];
    const double olp = old_logprob ? static_cast<double>(old_logprob[i]) : lp;
    double g = 0.0;  // dLoss/dlp
    if (level == GSPO4J_RATIO_SEQUENCE) {
        g = r.sequence_gradient;
    } else {
        bool inside = r.sequence_inside;
        const double ratio = level == GSPO4J_RATIO_TOKEN ? clip.ratio(lp - olp, &inside) : r.sequence_ratio;
        const Clip::Decision d = clip.decide(ratio, advantage);
        part.surrogate += r.weight * d.objective;
        part.clip_low += d.clipped_low;
        part.clip_high += d.clipped_high;
        part.dual_clip += d.dual_clipped;
        if (level == GSPO4J_RATIO_TOKEN) part.add_ratio(ratio);
        if (d.gradient && inside) g = -r.weight * advantage * ratio;
    }
    if (config.kl_coef != 0.0) {
        const double raw = static_cast<double>(ref_logprob[i]) - lp;
        const double d = min_of(max_of(raw, -config.log_ratio_clamp), config.log_ratio_clamp);
        part.kl += r.weight * kl_value(config.kl_estimator, d);
        if (raw >= -config.log_ratio_clamp && raw <= config.log_ratio_clamp) {
            g += config.kl_coef * r.weight * kl_gradient(config.kl_estimator, d);
        }
    }
    if (entropy) {
        part.entropy += r.weight * entropy[i];
        part.entropy_sum += entropy[i];
    }
    part.approx_kl += olp - lp;
    grad_logprob[i] = static_cast<float>(g);
    if (grad_entropy) grad_entropy[i] = config.entropy_coef != 0.0 ? static_cast<float>(-config.entropy_coef * r.weight) : 0.0f;
}

// The loss and the metrics (nullable) from the batch's total.
GSPO4J_HOST_DEVICE inline void finish_loss(const gspo4j_loss_config& config, const Partial& total, const Scales& s, float* loss,
                                           float* metrics) {
    const int32_t level = config.ratio_level;
    // "+ 0.0" turns the -0.0 of an empty batch into 0.0.
    const double policy_loss = (level == GSPO4J_RATIO_SEQUENCE ? -s.response_scale * total.surrogate : -total.surrogate) + 0.0;
    loss[0] = static_cast<float>(policy_loss + config.kl_coef * total.kl - config.entropy_coef * total.entropy + 0.0);
    if (!metrics) return;
    const double responses = static_cast<double>(s.responses);
    const double tokens = static_cast<double>(s.tokens);
    // Clip decisions are per response for GSPO and per counted token otherwise.
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

// GAE over tokens [begin, end) of one response, backwards over its counted tokens; masked
// tokens get advantage 0 and return 0.
GSPO4J_HOST_DEVICE inline void gae_response(int64_t begin, int64_t end, const float* rewards, const float* values,
                                            const uint8_t* mask, double gamma, double lambda, float* advantages,
                                            float* returns) {
    double next_value = 0.0;
    double next_advantage = 0.0;
    for (int64_t i = end - 1; i >= begin; --i) {
        if (mask && mask[i] == 0) {
            advantages[i] = 0.0f;
            returns[i] = 0.0f;
            continue;
        }
        const double value = values[i];
        const double delta = static_cast<double>(rewards[i]) + gamma * next_value - value;
        const double advantage = delta + gamma * lambda * next_advantage;
        advantages[i] = static_cast<float>(advantage);
        returns[i] = static_cast<float>(advantage + value);
        next_value = value;
        next_advantage = advantage;
    }
}

}  // namespace math
}  // namespace gspo4j

#endif
