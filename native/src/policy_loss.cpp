// CPU sequence log-ratio and policy loss (SPEC.md "Policy losses"). O(tokens) work: responses
// in parallel, each writing its own tokens' coefficients and one row of partial sums, which
// are then added in response order so the loss does not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cpu_ops.h"
#include "parallel.h"

namespace gspo4j {
namespace cpu {
namespace {

inline bool counted(const uint8_t* mask, int64_t i) { return mask == nullptr || mask[i] != 0; }

void require_finite(const float* values, const char* name, int64_t index) {
    if (values && !std::isfinite(values[index])) {
        fail(GSPO4J_ERROR_NON_FINITE, std::string(name) + "[" + std::to_string(index) + "] = " +
                                          std::to_string(values[index]) + " is not finite");
    }
}

// Responses per parallel chunk: the per-response work is tiny, keep tasks a few thousand
// tokens long.
int64_t responses_per_chunk(const TokenLayout& layout) {
    const int64_t mean_length = layout.batch > 0 ? std::max<int64_t>(1, layout.tokens / layout.batch) : 1;
    return std::max<int64_t>(1, 4096 / mean_length);
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

    // J = min(x A, clip(x) A), then max(J, c A) for A < 0 with dual clip.
    Decision decide(double ratio, double advantage) const {
        const double bounded = std::min(std::max(ratio, low), high);
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
    double ratio(double log_ratio, bool* inside) const {
        *inside = log_ratio >= -clamp && log_ratio <= clamp;
        return std::exp(std::min(std::max(log_ratio, -clamp), clamp));
    }
};

struct Partial {
    double surrogate = 0.0;  // sum of weight * J (token level) or J_b (sequence level)
    double kl = 0.0;         // sum of weight * k
    double entropy = 0.0;    // sum of weight * H
    double clip_low = 0.0;
    double clip_high = 0.0;
    double dual_clip = 0.0;
    double ratio_sum = 0.0;
    double ratio_min = std::numeric_limits<double>::infinity();
    double ratio_max = -std::numeric_limits<double>::infinity();
    double ratio_count = 0.0;
    double approx_kl = 0.0;  // sum of olp - lp
    double entropy_sum = 0.0;
    int64_t length = 0;

    void add_ratio(double r) {
        ratio_sum += r;
        ratio_min = std::min(ratio_min, r);
        ratio_max = std::max(ratio_max, r);
        ratio_count += 1.0;
    }
};

double kl_value(int32_t estimator, double d) {
    switch (estimator) {
        case GSPO4J_KL_K1: return -d;
        case GSPO4J_KL_K2: return 0.5 * d * d;
        default: return std::exp(d) - d - 1.0;
    }
}

// d(k)/d(lp) with d = ref - lp.
double kl_gradient(int32_t estimator, double d) {
    switch (estimator) {
        case GSPO4J_KL_K1: return 1.0;
        case GSPO4J_KL_K2: return -d;
        default: return 1.0 - std::exp(d);
    }
}

}  // namespace

void check_layout(const TokenLayout& layout) {
    if (!layout.offsets) return;
    if (layout.offsets[0] != 0) {
        fail(GSPO4J_ERROR_OUT_OF_RANGE, "offsets[0] must be 0, got " + std::to_string(layout.offsets[0]));
    }
    for (int64_t b = 0; b < layout.batch; ++b) {
        if (layout.offsets[b + 1] < layout.offsets[b]) {
            fail(GSPO4J_ERROR_OUT_OF_RANGE, "offsets must not decrease: offsets[" + std::to_string(b + 1) + "] = " +
                                                std::to_string(layout.offsets[b + 1]) + " < offsets[" + std::to_string(b) +
                                                "] = " + std::to_string(layout.offsets[b]));
        }
    }
    if (layout.offsets[layout.batch] != layout.tokens) {
        fail(GSPO4J_ERROR_OUT_OF_RANGE, "offsets[batch] = " + std::to_string(layout.offsets[layout.batch]) +
                                            " must equal tokens = " + std::to_string(layout.tokens));
    }
}

void sequence_log_ratio(const TokenLayout& layout, const float* logprob, const float* old_logprob,
                        const uint8_t* mask, bool check_finite, float* log_ratio, float* lengths) {
    check_layout(layout);
    if (check_finite) {
        for (int64_t i = 0; i < layout.tokens; ++i) {
            if (!counted(mask, i)) continue;
            require_finite(logprob, "logprob", i);
            require_finite(old_logprob, "old_logprob", i);
        }
    }
    parallel_for(layout.batch, responses_per_chunk(layout), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
            double sum = 0.0;
            int64_t length = 0;
            for (int64_t i = layout.begin(b); i < layout.end(b); ++i) {
                if (!counted(mask, i)) continue;
                sum += static_cast<double>(logprob[i]) - (old_logprob ? static_cast<double>(old_logprob[i]) : logprob[i]);
                ++length;
            }
            log_ratio[b] = length > 0 ? static_cast<float>(sum / static_cast<double>(length)) : 0.0f;
            if (lengths) lengths[b] = static_cast<float>(length);
        }
    });
}

void policy_loss(const gspo4j_loss_config& config, const TokenLayout& layout, const float* logprob,
                 const float* old_logprob, const uint8_t* mask, const float* advantages,
                 bool advantages_per_token, const float* ref_logprob, const float* entropy,
                 float* loss, float* grad_logprob, float* grad_entropy, float* metrics) {
    check_layout(layout);
    const bool use_kl = config.kl_coef != 0.0;
    const bool use_entropy = config.entropy_coef != 0.0;
    if (config.check_finite) {
        for (int64_t b = 0; b < layout.batch; ++b) {
            bool any_counted = false;
            for (int64_t i = layout.begin(b); i < layout.end(b); ++i) {
                if (!counted(mask, i)) continue;
                any_counted = true;
                require_finite(logprob, "logprob", i);
                require_finite(old_logprob, "old_logprob", i);
                if (advantages_per_token) require_finite(advantages, "advantages", i);
                if (use_kl) require_finite(ref_logprob, "ref_logprob", i);
                require_finite(entropy, "entropy", i);
            }
            if (any_counted && !advantages_per_token) require_finite(advantages, "advantages", b);
        }
    }

    // Pass 1: lengths, and the sequence log-ratios GSPO needs.
    std::vector<int64_t> length(static_cast<size_t>(layout.batch));
    std::vector<double> sequence_log_ratio(static_cast<size_t>(layout.batch));
    parallel_for(layout.batch, responses_per_chunk(layout), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
            double sum = 0.0;
            int64_t n = 0;
            for (int64_t i = layout.begin(b); i < layout.end(b); ++i) {
                if (!counted(mask, i)) continue;
                if (old_logprob) sum += static_cast<double>(logprob[i]) - static_cast<double>(old_logprob[i]);
                ++n;
            }
            length[b] = n;
            sequence_log_ratio[b] = n > 0 ? sum / static_cast<double>(n) : 0.0;
        }
    });
    int64_t responses = 0;
    int64_t total_tokens = 0;
    int64_t longest = 0;
    for (int64_t b = 0; b < layout.batch; ++b) {
        responses += length[b] > 0 ? 1 : 0;
        total_tokens += length[b];
        longest = std::max(longest, layout.end(b) - layout.begin(b));
    }

    // Aggregation weights: q_bt counts with weight token_scale / (L_b if per-response mean).
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
            token_denominator = explicit_normalizer ? config.normalizer : static_cast<double>(total_tokens);
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
    const double token_scale = token_denominator > 0.0 ? 1.0 / token_denominator : 0.0;
    const double response_scale = response_denominator > 0.0 ? 1.0 / response_denominator : 0.0;

    const Clip clip{1.0 - config.eps_low, 1.0 + config.eps_high, config.dual_clip, config.log_ratio_clamp};
    const int32_t level = config.ratio_level;
    std::vector<Partial> partials(static_cast<size_t>(layout.batch));

    // Pass 2: per-token coefficients and per-response partial sums.
    parallel_for(layout.batch, responses_per_chunk(layout), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
            Partial& part = partials[b];
            const int64_t n = length[b];
            part.length = n;
            const double weight = n == 0 ? 0.0 : divide_by_length ? token_scale / static_cast<double>(n) : token_scale;
            // Sequence ratio s_b (GSPO, GSPO-token).
            bool sequence_inside = true;
            const double sequence_ratio = level == GSPO4J_RATIO_TOKEN ? 1.0 : clip.ratio(sequence_log_ratio[b], &sequence_inside);
            double sequence_coefficient = 0.0;  // GSPO: dJ_b/dlp per counted token, before the loss sign
            if (level == GSPO4J_RATIO_SEQUENCE && n > 0) {
                const double a = advantages[b];
                const Clip::Decision d = clip.decide(sequence_ratio, a);
                part.surrogate = d.objective;
                part.clip_low = d.clipped_low;
                part.clip_high = d.clipped_high;
                part.dual_clip = d.dual_clipped;
                if (d.gradient && sequence_inside) sequence_coefficient = a * sequence_ratio / static_cast<double>(n);
            }
            if (level != GSPO4J_RATIO_TOKEN && n > 0) part.add_ratio(sequence_ratio);

            for (int64_t i = layout.begin(b); i < layout.end(b); ++i) {
                if (!counted(mask, i)) {
                    grad_logprob[i] = 0.0f;
                    if (grad_entropy) grad_entropy[i] = 0.0f;
                    continue;
                }
                const double lp = logprob[i];
                const double olp = old_logprob ? static_cast<double>(old_logprob[i]) : lp;
                double g = 0.0;  // dLoss/dlp
                if (level == GSPO4J_RATIO_SEQUENCE) {
                    g = -response_scale * sequence_coefficient;
                } else {
                    const double a = advantages_per_token ? advantages[i] : advantages[b];
                    bool inside = sequence_inside;
                    const double r = level == GSPO4J_RATIO_TOKEN ? clip.ratio(lp - olp, &inside) : sequence_ratio;
                    const Clip::Decision d = clip.decide(r, a);
                    part.surrogate += weight * d.objective;
                    part.clip_low += d.clipped_low;
                    part.clip_high += d.clipped_high;
                    part.dual_clip += d.dual_clipped;
                    if (level == GSPO4J_RATIO_TOKEN) part.add_ratio(r);
                    if (d.gradient && inside) g = -weight * a * r;
                }
                if (use_kl) {
                    const double raw = static_cast<double>(ref_logprob[i]) - lp;
                    const double d = std::min(std::max(raw, -config.log_ratio_clamp), config.log_ratio_clamp);
                    part.kl += weight * kl_value(config.kl_estimator, d);
                    if (raw >= -config.log_ratio_clamp && raw <= config.log_ratio_clamp) {
                        g += config.kl_coef * weight * kl_gradient(config.kl_estimator, d);
                    }
                }
                if (entropy) {
                    part.entropy += weight * entropy[i];
                    part.entropy_sum += entropy[i];
                }
                part.approx_kl += olp - lp;
                grad_logprob[i] = static_cast<float>(g);
                if (grad_entropy) grad_entropy[i] = use_entropy ? static_cast<float>(-config.entropy_coef * weight) : 0.0f;
            }
        }
    });

    // Fixed-order reduction.
    Partial total;
    for (const Partial& part : partials) {
        total.surrogate += part.surrogate;
        total.kl += part.kl;
        total.entropy += part.entropy;
        total.clip_low += part.clip_low;
        total.clip_high += part.clip_high;
        total.dual_clip += part.dual_clip;
        total.ratio_sum += part.ratio_sum;
        total.ratio_min = std::min(total.ratio_min, part.ratio_min);
        total.ratio_max = std::max(total.ratio_max, part.ratio_max);
        total.ratio_count += part.ratio_count;
        total.approx_kl += part.approx_kl;
        total.entropy_sum += part.entropy_sum;
    }
    // "+ 0.0" turns the -0.0 of an empty batch into 0.0.
    const double policy_loss = (level == GSPO4J_RATIO_SEQUENCE ? -response_scale * total.surrogate : -total.surrogate) + 0.0;
    const double value = policy_loss + config.kl_coef * total.kl - config.entropy_coef * total.entropy + 0.0;
    loss[0] = static_cast<float>(value);
    if (metrics) {
        // Clip decisions are per response for GSPO and per counted token otherwise.
        const double decisions = level == GSPO4J_RATIO_SEQUENCE ? static_cast<double>(responses) : static_cast<double>(total_tokens);
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
        metrics[GSPO4J_METRIC_APPROX_KL] = static_cast<float>(mean(total.approx_kl, static_cast<double>(total_tokens)));
        metrics[GSPO4J_METRIC_ENTROPY_MEAN] = static_cast<float>(mean(total.entropy_sum, static_cast<double>(total_tokens)));
        metrics[GSPO4J_METRIC_SEQUENCES] = static_cast<float>(responses);
        metrics[GSPO4J_METRIC_TOKENS] = static_cast<float>(total_tokens);
    }
}

}  // namespace cpu
}  // namespace gspo4j
