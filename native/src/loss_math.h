// The per-response and per-token math of the policy loss and of GAE (docs/math.md), written once for
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

GSPO4J_HOST_DEVICE inline double log_of(double x) {
#ifdef __CUDA_ARCH__
    return ::log(x);
#else
    return std::log(x);
#endif
}

// A term's value and its derivative by lp, before the aggregation's weight and the loss sign.
struct Term {
    double value;
    double gradient;
};

// The KL term of a counted token: d = ref - lp clamped to [-R, R] (no gradient through d outside),
// x = lp - olp likewise for K3_UNBIASED's ratio r = exp(x).
GSPO4J_HOST_DEVICE inline Term kl_term(int32_t estimator, const Clip& clip, double lp, double olp, double ref) {
    const double raw = ref - lp;
    const double d = min_of(max_of(raw, -clip.clamp), clip.clamp);
    const bool inside = raw >= -clip.clamp && raw <= clip.clamp;
    Term t;
    switch (estimator) {
        case GSPO4J_KL_K1:
            t.value = -d;
            t.gradient = 1.0;
            break;
        case GSPO4J_KL_K2:
            t.value = 0.5 * d * d;
            t.gradient = -d;
            break;
        case GSPO4J_KL_K3_PLUS:  // the value of k3, the gradient of k2
            t.value = exp_of(d) - d - 1.0;
            t.gradient = -d;
            break;
        case GSPO4J_KL_ABS:  // |d|; d|d|/dlp = -sign(d), 0 at d = 0 as autograd's abs
            t.value = d < 0.0 ? -d : d;
            t.gradient = d > 0.0 ? -1.0 : d < 0.0 ? 1.0 : 0.0;
            break;
        case GSPO4J_KL_LOW_VAR: {  // verl's low_var_kl: k3, its value clamped to [-10, 10] (k3 >= 0: at 10)
            const double k3 = exp_of(d) - d - 1.0;
            t.value = min_of(max_of(k3, -10.0), 10.0);
            t.gradient = k3 <= 10.0 ? 1.0 - exp_of(d) : 0.0;
            break;
        }
        case GSPO4J_KL_K3_UNBIASED: {  // r * k3, through both factors
            bool ratio_inside = true;
            const double r = clip.ratio(lp - olp, &ratio_inside);
            const double k3 = exp_of(d) - d - 1.0;
            t.value = r * k3;
            t.gradient = (ratio_inside ? r * k3 : 0.0) + (inside ? r * (1.0 - exp_of(d)) : 0.0);
            return t;
        }
        default:  // k3
            t.value = exp_of(d) - d - 1.0;
            t.gradient = 1.0 - exp_of(d);
            break;
    }
    if (!inside) t.gradient = 0.0;
    return t;
}

// GMPO's log-space clip of a token log-ratio x on the pessimistic side only:
// l = a min(a x, a clip(x, -eps_low, eps_high)) with a = sign(A_b). `unclipped`: l is x itself.
GSPO4J_HOST_DEVICE inline double geometric_log_ratio(const gspo4j_loss_config& config, double x, double sign, bool* unclipped) {
    const double bounded = min_of(max_of(x, -config.eps_low), config.eps_high);
    *unclipped = sign * x <= sign * bounded;
    return sign * min_of(sign * x, sign * bounded);
}

GSPO4J_HOST_DEVICE inline double sign_of(double a) { return a > 0.0 ? 1.0 : a < 0.0 ? -1.0 : 0.0; }

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
    // A step's total (data-parallel ranks) first, then the single normaliser, then this call's count.
    const bool explicit_normalizer = config.normalizer > 0.0;
    const double response_denominator = config.responses_total > 0.0 ? config.responses_total
                                        : explicit_normalizer         ? config.normalizer
                                                                      : static_cast<double>(responses);
    double token_denominator = 0.0;
    bool divide_by_length = false;
    switch (config.aggregation) {
        case GSPO4J_SEQ_MEAN_TOKEN_MEAN:
            token_denominator = response_denominator;
            divide_by_length = true;
            break;
        case GSPO4J_TOKEN_MEAN:
            token_denominator = config.tokens_total > 0.0 ? config.tokens_total
                                : explicit_normalizer      ? config.normalizer
                                                           : static_cast<double>(tokens);
            break;
        case GSPO4J_SEQ_MEAN_TOKEN_SUM:
            token_denominator = response_denominator;
            break;
        default: {
            const double length_norm = config.length_norm > 0.0 ? config.length_norm
                                       : packed                       ? static_cast<double>(longest)
                                                                      : static_cast<double>(seq);
            const double batch_denominator = config.batch_total > 0.0 ? config.batch_total
                                             : explicit_normalizer     ? config.normalizer
                                                                       : static_cast<double>(batch);
            token_denominator = batch_denominator * length_norm;
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

// Token weights (docs/math.md "Training-inference mismatch" and "Token selection"): each counted
// token's policy term is multiplied by w_t = R_b f_t k_t, with no gradient through any factor:
// - R_b, the response's factor: rho_b of rollout level SEQUENCE or GEOMETRIC (banded), the
//   per-response rejection and the off-policy mask; it needs the first pass's sums;
// - f_t, the token's factor: rho_t of level TOKEN (banded) and the per-token rejection;
// - k_t, top-entropy selection: 1 when H_t >= the threshold (or without selection), else 0.
// The rollout metrics see R_b f_t (the rollout weight); the selection is reported apart.
struct Weights {
    const float* rollout_logprob;     // mu, or null
    const double* entropy_threshold;  // the selection's threshold, or null
    const float* entropy;             // H (needed with a threshold)
    bool rollout;                     // any rollout option or mu: the first pass sums WeightSums

    GSPO4J_HOST_DEVICE bool any() const { return rollout || entropy_threshold != nullptr; }
};

GSPO4J_HOST_DEVICE inline bool rollout_enabled(const gspo4j_loss_config& config) {
    return config.rollout_level != GSPO4J_ROLLOUT_OFF || config.rejection_divergence != GSPO4J_DIVERGENCE_NONE ||
           config.off_policy_mask != 0;
}

// k1, k2 or k3 of olp against mu.
GSPO4J_HOST_DEVICE inline double rollout_divergence(int32_t kind, double olp, double mu) {
    const double d = olp - mu;
    if (kind == GSPO4J_DIVERGENCE_K1) return d;
    if (kind == GSPO4J_DIVERGENCE_K2) return 0.5 * d * d;
    return exp_of(-d) + d - 1.0;  // k3: exp(mu - olp) - (mu - olp) - 1
}

// Whether a divergence passes the rejection bound (a NaN does not).
GSPO4J_HOST_DEVICE inline bool rollout_accepts(const gspo4j_loss_config& config, double divergence) {
    if (config.rejection_divergence == GSPO4J_DIVERGENCE_K1)
        return divergence >= config.rejection_low && divergence <= config.rejection_high;
    return divergence <= config.rejection_high;
}

// The mode (TRUNCATE or MASK) and the band [C_min, C_max] applied to an IS ratio rho.
GSPO4J_HOST_DEVICE inline double rollout_band(const gspo4j_loss_config& config, double rho) {
    const bool has_min = config.rollout_c_min > 0.0;
    const bool has_max = config.rollout_c_max > 0.0;
    if (config.rollout_mode == GSPO4J_ROLLOUT_MASK) {
        const bool inside = (!has_min || rho >= config.rollout_c_min) && (!has_max || rho <= config.rollout_c_max);
        return inside ? rho : 0.0;
    }
    if (has_min) rho = max_of(rho, config.rollout_c_min);
    if (has_max) rho = min_of(rho, config.rollout_c_max);
    return rho;
}

// f_t of a counted token: rho_t (level TOKEN) and the per-token rejection; 1 without mu.
GSPO4J_HOST_DEVICE inline double rollout_token_factor(const gspo4j_loss_config& config, double olp, const float* mu, int64_t i) {
    if (mu == nullptr) return 1.0;
    const double m = mu[i];
    double f = 1.0;
    if (config.rollout_level == GSPO4J_ROLLOUT_TOKEN)
        f = rollout_band(config, exp_of(min_of(max_of(olp - m, -config.log_ratio_clamp), config.log_ratio_clamp)));
    if (config.rejection_divergence != GSPO4J_DIVERGENCE_NONE && config.rejection_scope == GSPO4J_REJECT_TOKEN &&
        !rollout_accepts(config, rollout_divergence(config.rejection_divergence, olp, m)))
        f = 0.0;
    return f;
}

// k_t of a counted token.
GSPO4J_HOST_DEVICE inline double selection_factor(const Weights& w, int64_t i) {
    if (w.entropy_threshold == nullptr) return 1.0;
    return static_cast<double>(w.entropy[i]) >= *w.entropy_threshold ? 1.0 : 0.0;
}

// What the first pass sums over a response's counted tokens for its weights and their metrics.
struct WeightSums {
    double mismatch = 0.0;       // sum m (olp - mu)
    double divergence = 0.0;     // sum m of the rejection divergence
    double divergence_max = -static_cast<double>(INFINITY);
    double behaviour_gap = 0.0;  // sum m (beh - sg(lp)), beh = mu (olp without mu)
    double token_factor = 0.0;   // sum m f_t
    double kept_factor = 0.0;    // sum m f_t k_t
    double zero_tokens = 0.0;    // counted tokens with f_t = 0
    double kept = 0.0;           // counted tokens with k_t = 1
    double k3 = 0.0;             // sum m (exp(olp - mu) - (olp - mu) - 1), unclamped

    GSPO4J_HOST_DEVICE void add_token(const gspo4j_loss_config& config, const Weights& w, double lp, double olp, int64_t i) {
        const float* mu = w.rollout_logprob;
        const double beh = mu ? static_cast<double>(mu[i]) : olp;
        behaviour_gap += beh - lp;
        if (mu) {
            const double d = olp - beh;
            mismatch += d;
            k3 += exp_of(d) - d - 1.0;
            if (config.rejection_divergence != GSPO4J_DIVERGENCE_NONE) {
                const double v = rollout_divergence(config.rejection_divergence, olp, beh);
                divergence += v;
                divergence_max = max_of(divergence_max, v);
            }
        }
        const double f = rollout_token_factor(config, olp, mu, i);
        const double k = selection_factor(w, i);
        token_factor += f;
        kept_factor += f * k;
        zero_tokens += f == 0.0 ? 1.0 : 0.0;
        kept += k;
    }

    // Sums of several threads' tokens of one response (CUDA), in a fixed order.
    GSPO4J_HOST_DEVICE void add(const WeightSums& o) {
        mismatch += o.mismatch;
        divergence += o.divergence;
        divergence_max = max_of(divergence_max, o.divergence_max);
        behaviour_gap += o.behaviour_gap;
        token_factor += o.token_factor;
        kept_factor += o.kept_factor;
        zero_tokens += o.zero_tokens;
        kept += o.kept;
        k3 += o.k3;
    }
};

// R_b from a response's sums: rho_b (SEQUENCE, GEOMETRIC), the per-response rejection and the
// off-policy mask. `advantage` is A_b (the off-policy mask needs per-response advantages).
GSPO4J_HOST_DEVICE inline double rollout_response_factor(const gspo4j_loss_config& config, const WeightSums& sums, int64_t length,
                                                         double advantage) {
    if (length == 0) return 0.0;
    const double n = static_cast<double>(length);
    double r = 1.0;
    if (config.rollout_level == GSPO4J_ROLLOUT_SEQUENCE || config.rollout_level == GSPO4J_ROLLOUT_GEOMETRIC) {
        const double log_rho = config.rollout_level == GSPO4J_ROLLOUT_SEQUENCE ? sums.mismatch : sums.mismatch / n;
        r = rollout_band(config, exp_of(min_of(max_of(log_rho, -config.log_ratio_clamp), config.log_ratio_clamp)));
    }
    if (config.rejection_divergence != GSPO4J_DIVERGENCE_NONE && config.rejection_scope != GSPO4J_REJECT_TOKEN) {
        const double v = config.rejection_scope == GSPO4J_REJECT_MEAN  ? sums.divergence / n
                         : config.rejection_scope == GSPO4J_REJECT_SUM ? sums.divergence
                                                                       : sums.divergence_max;
        if (!rollout_accepts(config, v)) r = 0.0;
    }
    if (config.off_policy_mask != 0 && advantage < 0.0 && sums.behaviour_gap / n > config.off_policy_delta) r = 0.0;
    return r;
}

// A response's weight figures, from its sums (what the second pass and the metrics need).
struct ResponseWeights {
    double response = 1.0;     // R_b
    double mean = 1.0;         // (1/L_b) sum m R_b f_t k_t: a sequence objective's factor of J_b
    double rollout_sum = 0.0;  // metrics: sum m R_b f_t
    double zero_tokens = 0.0;  // counted tokens with R_b f_t = 0
    double kept = 0.0;         // counted tokens with k_t = 1
    double k1 = 0.0;           // sum m (mu - olp)
    double k3 = 0.0;
};

GSPO4J_HOST_DEVICE inline ResponseWeights response_weights(const gspo4j_loss_config& config, const WeightSums& sums, int64_t length,
                                                           double advantage) {
    ResponseWeights r;
    const double n = static_cast<double>(length);
    if (length == 0) return r;
    r.response = rollout_response_factor(config, sums, length, advantage);
    r.mean = r.response * sums.kept_factor / n;
    r.rollout_sum = r.response * sums.token_factor;
    r.zero_tokens = r.response == 0.0 ? n : sums.zero_tokens;
    r.kept = sums.kept;
    r.k1 = -sums.mismatch;
    r.k3 = sums.k3;
    return r;
}

// What the first pass learns of a response: its counted tokens and sums over them.
struct ResponseSums {
    int64_t length;        // L_b
    double log_ratio_sum;  // sum m (lp - olp), 0 on-policy
    double geometric_sum;  // GMPO: sum m l_t (0 for the other objectives)
    ResponseWeights weights;
};

// The batch's weight metrics: the responses' figures added in a fixed order.
struct WeightTotals {
    double rollout_sum = 0.0;
    double zero_tokens = 0.0;
    double zero_responses = 0.0;  // counted responses whose every R_b f_t is 0
    double kept = 0.0;
    double k1 = 0.0;
    double k3 = 0.0;

    GSPO4J_HOST_DEVICE void add(const ResponseSums& sums) {
        if (sums.length == 0) return;
        rollout_sum += sums.weights.rollout_sum;
        zero_tokens += sums.weights.zero_tokens;
        zero_responses += sums.weights.zero_tokens == static_cast<double>(sums.length) ? 1.0 : 0.0;
        kept += sums.weights.kept;
        k1 += sums.weights.k1;
        k3 += sums.weights.k3;
    }

    GSPO4J_HOST_DEVICE void add(const WeightTotals& o) {
        rollout_sum += o.rollout_sum;
        zero_tokens += o.zero_tokens;
        zero_responses += o.zero_responses;
        kept += o.kept;
        k1 += o.k1;
        k3 += o.k3;
    }
};

// GMPO's l_t of counted token i, or 0 for the other objectives: the first pass sums it.
GSPO4J_HOST_DEVICE inline double geometric_term(const gspo4j_loss_config& config, double lp, double olp, double advantage) {
    if (config.objective != GSPO4J_OBJECTIVE_GMPO) return 0.0;
    const double x = min_of(max_of(lp - olp, -config.log_ratio_clamp), config.log_ratio_clamp);
    bool unclipped = true;
    return geometric_log_ratio(config, x, sign_of(advantage), &unclipped);
}

// Whether the ratio statistics are one per response (GSPO, GSPO-token, LUSPO, GMPO, VESPO, and the
// sequence variants of CISPO and SAPO) or one per counted token.
GSPO4J_HOST_DEVICE inline bool ratio_per_response(const gspo4j_loss_config& config) {
    return config.ratio_level != GSPO4J_RATIO_TOKEN || config.objective == GSPO4J_OBJECTIVE_VESPO;
}

// What a response fixes for all its tokens.
struct Response {
    double weight;             // of each counted token's q: token_scale, divided by L_b for a per-response mean
    double sequence_ratio;     // s_b (GSPO, GSPO-token, LUSPO), rho_b (GMPO), W_b (VESPO); 1 at token level
    bool sequence_inside;      // s_b's log-ratio inside [-R, R]
    double sequence_gradient;  // sequence objectives: dLoss/dlp of each counted token (GMPO: of each unclipped one)
    double phi_pos;            // VESPO's sg weight phi(W_b) for A >= 0
    double phi_neg;            // ... and for A < 0
    double advantage_sign;     // GMPO: sign(A_b)
    double weight_response;    // R_b (1 without weights)
};

// Starts response b. A sequence objective's one term J_b (GSPO, LUSPO, GMPO), its clip decision and
// the per-response ratio statistics go to `part` (nullable: with several threads per response, one
// of them passes it). advantages[b] is read only for the sequence objectives.
GSPO4J_HOST_DEVICE inline Response begin_response(const gspo4j_loss_config& config, const Clip& clip, const Scales& s,
                                                  const ResponseSums& sums, const float* advantages, int64_t b,
                                                  Partial* part) {
    const int32_t level = config.ratio_level;
    const int64_t length = sums.length;
    const double n = static_cast<double>(length);
    Response r;
    r.weight = length == 0 ? 0.0 : s.divide_by_length ? s.token_scale / n : s.token_scale;
    r.sequence_inside = true;
    r.phi_pos = 0.0;
    r.phi_neg = 0.0;
    r.advantage_sign = 0.0;
    r.weight_response = sums.weights.response;
    // A sequence objective's J_b is multiplied by the mean of w over the response (1 without weights).
    const double weight_mean = sums.weights.mean;
    const double log_ratio = length > 0 ? sums.log_ratio_sum / n : 0.0;
    r.sequence_ratio = level == GSPO4J_RATIO_TOKEN ? 1.0 : clip.ratio(log_ratio, &r.sequence_inside);
    double sequence_coefficient = 0.0;  // dJ_b/dlp per counted token, before the loss sign
    if (config.objective == GSPO4J_OBJECTIVE_VESPO) {
        // W_b = exp(clamp(sum m x, -R, R)); phi = W^k exp(lambda (1 - W)), in log space.
        const double log_w = min_of(max_of(sums.log_ratio_sum, -clip.clamp), clip.clamp);
        const double w = exp_of(log_w);
        r.sequence_ratio = w;
        r.phi_pos = exp_of(config.vespo_k_pos * log_w + config.vespo_lambda_pos * (1.0 - w));
        r.phi_neg = exp_of(config.vespo_k_neg * log_w + config.vespo_lambda_neg * (1.0 - w));
    } else if (config.objective == GSPO4J_OBJECTIVE_GMPO && length > 0) {
        const double a = advantages[b];
        r.advantage_sign = sign_of(a);
        r.sequence_ratio = exp_of(sums.geometric_sum / n);  // each l_t lies in [-R, R]
        r.sequence_inside = true;
        if (part) part->surrogate += weight_mean * r.sequence_ratio * a;
        sequence_coefficient = weight_mean * a * r.sequence_ratio / n;
    } else if (level == GSPO4J_RATIO_SEQUENCE && length > 0) {
        // GSPO, or LUSPO: L_b times GSPO's term.
        const double a = advantages[b];
        const double length_weight = config.objective == GSPO4J_OBJECTIVE_LUSPO ? n : 1.0;
        const Clip::Decision d = clip.decide(r.sequence_ratio, a);
        if (part) {
            part->surrogate += weight_mean * length_weight * d.objective;
            part->clip_low += d.clipped_low;
            part->clip_high += d.clipped_high;
            part->dual_clip += d.dual_clipped;
        }
        if (d.gradient && r.sequence_inside) sequence_coefficient = weight_mean * length_weight * a * r.sequence_ratio / n;
    }
    r.sequence_gradient = -s.response_scale * sequence_coefficient;
    if (ratio_per_response(config) && length > 0 && part) part->add_ratio(r.sequence_ratio);
    return r;
}

// The clip decisions a token's policy term reports.
struct TermFlags {
    bool clipped_low;
    bool clipped_high;
    bool dual_clipped;
};

// The per-token policy term q_t of the token-level objectives (everything but GSPO, LUSPO and GMPO):
// its value and dq/dlp. `ratio` is r_t (ratio level TOKEN) or s_b (SEQUENCE_TOKEN), `inside` false
// where the [-R, R] clamp cut its gradient.
GSPO4J_HOST_DEVICE inline Term token_policy_term(const gspo4j_loss_config& config, const Clip& clip, const Response& r,
                                                 double ratio, bool inside, double lp, double olp, double advantage,
                                                 TermFlags* flags) {
    Term t;
    flags->clipped_low = false;
    flags->clipped_high = false;
    flags->dual_clipped = false;
    switch (config.objective) {
        case GSPO4J_OBJECTIVE_CISPO: {  // sg[clip(ratio)] A lp: clipped tokens keep a gradient
            const double w = min_of(max_of(ratio, clip.low), clip.high);
            t.value = w * advantage * lp;
            t.gradient = w * advantage;
            flags->clipped_low = ratio < clip.low;
            flags->clipped_high = ratio > clip.high;
            return t;
        }
        case GSPO4J_OBJECTIVE_SAPO: {  // (4/tau) sigmoid(tau (ratio - 1)) A
            const double tau = advantage > 0.0 ? config.sapo_tau_pos : config.sapo_tau_neg;
            const double gate = 1.0 / (1.0 + exp_of(-tau * (ratio - 1.0)));
            t.value = 4.0 / tau * gate * advantage;
            t.gradient = inside ? 4.0 * gate * (1.0 - gate) * ratio * advantage : 0.0;
            return t;
        }
        case GSPO4J_OBJECTIVE_VESPO: {  // sg[phi(W_b)] A lp
            const double phi = advantage >= 0.0 ? r.phi_pos : r.phi_neg;
            t.value = phi * advantage * lp;
            t.gradient = phi * advantage;
            return t;
        }
        case GSPO4J_OBJECTIVE_DPPO_TV:
        case GSPO4J_OBJECTIVE_DPPO_KL: {  // keep sg[min(r, C)] A lp
            const double p = exp_of(lp);
            const double p_old = exp_of(olp);
            bool keep;
            if (config.objective == GSPO4J_OBJECTIVE_DPPO_TV) {
                keep = advantage > 0.0 ? p - p_old <= config.dppo_delta_high : p - p_old >= -config.dppo_delta_low;
            } else {
                const double binary_kl = p_old * (olp - lp) + (1.0 - p_old) * log_of((1.0 - p_old + 1e-8) / (1.0 - p + 1e-8));
                keep = advantage > 0.0 ? (binary_kl <= config.dppo_delta_high || p <= p_old)
                                       : (binary_kl <= config.dppo_delta_low || p >= p_old);
            }
            const double w = keep ? min_of(ratio, config.dppo_ratio_cap) : 0.0;
            t.value = w * advantage * lp;
            t.gradient = w * advantage;
            flags->clipped_high = !keep && advantage > 0.0;
            flags->clipped_low = !keep && !(advantage > 0.0);
            return t;
        }
        default: {  // the clipped surrogate min(ratio A, clip(ratio) A), dual-clipped
            const Clip::Decision d = clip.decide(ratio, advantage);
            t.value = d.objective;
            t.gradient = d.gradient && inside ? advantage * ratio : 0.0;
            flags->clipped_low = d.clipped_low;
            flags->clipped_high = d.clipped_high;
            flags->dual_clipped = d.dual_clipped;
            return t;
        }
    }
}

// Counted token i of a response: writes dLoss/dlp and dLoss/dH (nullable) and adds its terms to
// `part`. `advantage` is the token's A (per token, or its response's), unused for GSPO and LUSPO.
GSPO4J_HOST_DEVICE inline void counted_token(const gspo4j_loss_config& config, const Clip& clip, const Response& r, int64_t i,
                                             const float* logprob, const float* old_logprob, double advantage,
                                             const float* ref_logprob, const float* entropy, const Weights& weights,
                                             Partial& part, float* grad_logprob, float* grad_entropy) {
    const int32_t level = config.ratio_level;
    const double lp = logprob[i];
    const double olp = old_logprob ? static_cast<double>(old_logprob[i]) : lp;
    double g = 0.0;  // dLoss/dlp
    if (config.objective == GSPO4J_OBJECTIVE_GMPO) {
        // The gradient reaches lp_t only where l_t = x_t (and x_t inside [-R, R]).
        const double raw = lp - olp;
        const double x = min_of(max_of(raw, -clip.clamp), clip.clamp);
        bool unclipped = true;
        (void)geometric_log_ratio(config, x, r.advantage_sign, &unclipped);
        part.clip_low += !unclipped && r.advantage_sign < 0.0;
        part.clip_high += !unclipped && r.advantage_sign > 0.0;
        if (unclipped && raw >= -clip.clamp && raw <= clip.clamp) g = r.sequence_gradient;
    } else if (level == GSPO4J_RATIO_SEQUENCE) {
        g = r.sequence_gradient;
    } else {
        bool inside = r.sequence_inside;
        const double ratio = level == GSPO4J_RATIO_TOKEN ? clip.ratio(lp - olp, &inside) : r.sequence_ratio;
        TermFlags flags;
        const Term q = token_policy_term(config, clip, r, ratio, inside, lp, olp, advantage, &flags);
        // w_t = R_b f_t k_t (no gradient) multiplies the policy term only.
        const double w = weights.any() ? r.weight_response * rollout_token_factor(config, olp, weights.rollout_logprob, i) *
                                             selection_factor(weights, i)
                                       : 1.0;
        part.surrogate += r.weight * w * q.value;
        part.clip_low += flags.clipped_low;
        part.clip_high += flags.clipped_high;
        part.dual_clip += flags.dual_clipped;
        if (!ratio_per_response(config)) part.add_ratio(ratio);
        g = -r.weight * w * q.gradient;
    }
    if (config.kl_coef != 0.0) {
        const Term k = kl_term(config.kl_estimator, clip, lp, olp, static_cast<double>(ref_logprob[i]));
        part.kl += r.weight * k.value;
        g += config.kl_coef * r.weight * k.gradient;
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
GSPO4J_HOST_DEVICE inline void finish_loss(const gspo4j_loss_config& config, const Partial& total, const Scales& s,
                                           const WeightTotals& weights, bool weighted, bool selected, float* loss,
                                           float* metrics) {
    const int32_t level = config.ratio_level;
    // "+ 0.0" turns the -0.0 of an empty batch into 0.0.
    const double policy_loss = (level == GSPO4J_RATIO_SEQUENCE ? -s.response_scale * total.surrogate : -total.surrogate) + 0.0;
    loss[0] = static_cast<float>(policy_loss + config.kl_coef * total.kl - config.entropy_coef * total.entropy + 0.0);
    if (!metrics) return;
    const double responses = static_cast<double>(s.responses);
    const double tokens = static_cast<double>(s.tokens);
    // Clip decisions are per response for GSPO and LUSPO and per counted token otherwise (GMPO clips tokens).
    const double decisions = level == GSPO4J_RATIO_SEQUENCE && config.objective != GSPO4J_OBJECTIVE_GMPO ? responses : tokens;
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
    // Without weights w = 1 and every token is kept.
    metrics[GSPO4J_METRIC_ROLLOUT_WEIGHT_MEAN] = static_cast<float>(weighted ? mean(weights.rollout_sum, tokens) : tokens > 0.0 ? 1.0 : 0.0);
    metrics[GSPO4J_METRIC_ROLLOUT_MASKED_FRACTION] = static_cast<float>(weighted ? mean(weights.zero_tokens, tokens) : 0.0);
    metrics[GSPO4J_METRIC_ROLLOUT_SEQ_MASKED_FRACTION] = static_cast<float>(weighted ? mean(weights.zero_responses, responses) : 0.0);
    metrics[GSPO4J_METRIC_ROLLOUT_KL] = static_cast<float>(weighted ? mean(weights.k1, tokens) : 0.0);
    metrics[GSPO4J_METRIC_ROLLOUT_K3_KL] = static_cast<float>(weighted ? mean(weights.k3, tokens) : 0.0);
    metrics[GSPO4J_METRIC_ENTROPY_KEPT_FRACTION] = static_cast<float>(selected ? mean(weights.kept, tokens) : tokens > 0.0 ? 1.0 : 0.0);
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

// ---- Top-entropy selection's threshold (gspo4j_entropy_threshold) ----------------------------

// A float's bits as an unsigned key whose order is the float order (-Inf < ... < -0 < +0 < ... <
// +Inf); NaN is kept out by the callers. Both devices select on keys, so they pick the same bits.
GSPO4J_HOST_DEVICE inline uint32_t order_key(uint32_t bits) { return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u; }
GSPO4J_HOST_DEVICE inline uint32_t key_bits(uint32_t key) { return (key & 0x80000000u) ? key & 0x7fffffffu : ~key; }

// numpy.quantile's linear method: the ranks to select among n >= 1 sorted values and the weight
// of the upper one. position = (n - 1) q, q = 1 - rho, in float64 (float32 picks other ranks).
struct QuantileRank {
    int64_t k;   // the lower rank
    double t;    // p - k
    bool upper;  // whether v[k+1] takes part (k < n - 1)
};

GSPO4J_HOST_DEVICE inline QuantileRank quantile_rank(int64_t n, double rho) {
#ifdef __CUDA_ARCH__
    const double position = __dmul_rn(static_cast<double>(n - 1), 1.0 - rho);  // not fused into t's subtraction
#else
    const double position = static_cast<double>(n - 1) * (1.0 - rho);
#endif
    const int64_t k = static_cast<int64_t>(position);  // position >= 0: truncation is floor
    if (k >= n - 1) return QuantileRank{n - 1, 0.0, false};
    return QuantileRank{k, position - static_cast<double>(k), true};
}

// numpy's _lerp: from the upper end when t >= 0.5. The product is rounded before the sum on both
// devices: nvcc contracts a * b + c into an FMA by default, the CPU build has none, and the
// threshold must be the same bits on both (__dmul_rn is never fused).
GSPO4J_HOST_DEVICE inline double quantile_lerp(double a, double b, double t) {
#ifdef __CUDA_ARCH__
    return t >= 0.5 ? b - __dmul_rn(b - a, 1.0 - t) : a + __dmul_rn(b - a, t);
#else
    return t >= 0.5 ? b - (b - a) * (1.0 - t) : a + (b - a) * t;
#endif
}

}  // namespace math
}  // namespace gspo4j

#endif
