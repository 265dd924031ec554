// CPU sequence log-ratio and policy loss (docs/math.md "Policy losses"). O(tokens) work: responses
// in parallel, each writing its own tokens' coefficients and one row of partial sums, which
// are then added in response order so the loss does not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cpu_ops.h"
#include "loss_math.h"
#include "parallel.h"

namespace gspo4j {
namespace cpu {
namespace {

inline bool counted(const uint8_t* mask, int64_t i) { return mask == nullptr || mask[i] != 0; }

void require_finite(const float* values, const char* name, int64_t index) {
    if (values && !std::isfinite(values[index])) {
        // A log-prob of -Inf is what the token log-prob forward gives a target whose logit is -Inf
        // (a banned or padded vocabulary entry): the counted token had probability 0.
        // Only the policy's own log-probs: a caller's old or reference log-prob of -Inf is just bad input.
        const bool impossible_token = values[index] < 0 && std::string(name) == "logprob";
        fail(GSPO4J_ERROR_NON_FINITE, std::string(name) + "[" + std::to_string(index) + "] = " +
                                          std::to_string(values[index]) + " is not finite" +
                                          (impossible_token ? " (a counted token of probability 0: its logit is -Inf)" : ""));
    }
}

// Responses per parallel chunk: the per-response work is tiny, keep tasks a few thousand
// tokens long.
int64_t responses_per_chunk(const TokenLayout& layout) {
    const int64_t mean_length = layout.batch > 0 ? std::max<int64_t>(1, layout.tokens / layout.batch) : 1;
    return std::max<int64_t>(1, 4096 / mean_length);
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
                // On-policy (no old log-probs) the ratio is sg-detached lp - lp: exactly 0, also for
                // a NaN lp with checking off, as in policy_loss below and on CUDA.
                if (old_logprob) sum += static_cast<double>(logprob[i]) - static_cast<double>(old_logprob[i]);
                ++length;
            }
            log_ratio[b] = length > 0 ? static_cast<float>(sum / static_cast<double>(length)) : 0.0f;
            if (lengths) lengths[b] = static_cast<float>(length);
        }
    });
}

void policy_loss(const gspo4j_loss_config& config, const TokenLayout& layout, const float* logprob,
                 const float* old_logprob, const float* rollout_logprob, const uint8_t* mask, const float* advantages,
                 bool advantages_per_token, const float* ref_logprob, const float* entropy, const double* entropy_threshold,
                 float* loss, float* grad_logprob, float* grad_entropy, float* metrics) {
    check_layout(layout);
    const bool use_kl = config.kl_coef != 0.0;
    if (config.check_finite) {
        for (int64_t b = 0; b < layout.batch; ++b) {
            bool any_counted = false;
            for (int64_t i = layout.begin(b); i < layout.end(b); ++i) {
                if (!counted(mask, i)) continue;
                any_counted = true;
                require_finite(logprob, "logprob", i);
                require_finite(old_logprob, "old_logprob", i);
                require_finite(rollout_logprob, "rollout_logprob", i);
                if (advantages_per_token) require_finite(advantages, "advantages", i);
                if (use_kl) require_finite(ref_logprob, "ref_logprob", i);
                require_finite(entropy, "entropy", i);
            }
            if (any_counted && !advantages_per_token) require_finite(advantages, "advantages", b);
        }
    }

    // Pass 1: lengths, the sums of log-ratios the sequence objectives need, and the responses'
    // weight factors (rollout correction, top-entropy selection).
    std::vector<math::ResponseSums> sums(static_cast<size_t>(layout.batch));
    const bool geometric = config.objective == GSPO4J_OBJECTIVE_GMPO;
    const math::Weights weights{rollout_logprob, entropy_threshold, entropy,
                                rollout_logprob != nullptr || math::rollout_enabled(config)};
    const bool weighted = weights.any();
    parallel_for(layout.batch, responses_per_chunk(layout), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
            double sum = 0.0;
            double geometric_sum = 0.0;
            int64_t n = 0;
            math::WeightSums weight_sums;
            for (int64_t i = layout.begin(b); i < layout.end(b); ++i) {
                if (!counted(mask, i)) continue;
                if (weighted) {
                    const double lp = logprob[i];
                    weight_sums.add_token(config, weights, lp, old_logprob ? static_cast<double>(old_logprob[i]) : lp, i);
                }
                if (old_logprob) sum += static_cast<double>(logprob[i]) - static_cast<double>(old_logprob[i]);
                if (geometric) {
                    const double lp = logprob[i];
                    geometric_sum += math::geometric_term(config, lp, old_logprob ? static_cast<double>(old_logprob[i]) : lp,
                                                          advantages[b]);
                }
                ++n;
            }
            sums[b] = math::ResponseSums{n, sum, geometric_sum, math::ResponseWeights()};
            if (weighted) {
                sums[b].weights = math::response_weights(config, weight_sums, n, advantages_per_token ? 0.0 : advantages[b]);
            }
        }
    });
    int64_t responses = 0;
    int64_t total_tokens = 0;
    int64_t longest = 0;
    math::WeightTotals weight_totals;
    for (int64_t b = 0; b < layout.batch; ++b) {
        weight_totals.add(sums[b]);
        responses += sums[b].length > 0 ? 1 : 0;
        total_tokens += sums[b].length;
        longest = std::max(longest, layout.end(b) - layout.begin(b));
    }
    // A step's total below this call's own count is a caller's mistake (the counts of another step,
    // or a rank's own): it would scale this call's share past the whole.
    if (config.responses_total > 0.0 && config.responses_total < static_cast<double>(responses)) {
        fail(GSPO4J_ERROR_INVALID_ARGUMENT, "config.responses_total = " + std::to_string(config.responses_total) +
                                                " is below this call's " + std::to_string(responses) +
                                                " counted responses: pass the step's total over every rank");
    }
    if (config.tokens_total > 0.0 && config.tokens_total < static_cast<double>(total_tokens)) {
        fail(GSPO4J_ERROR_INVALID_ARGUMENT, "config.tokens_total = " + std::to_string(config.tokens_total) +
                                                " is below this call's " + std::to_string(total_tokens) +
                                                " counted tokens: pass the step's total over every rank");
    }
    if (config.batch_total > 0.0 && config.batch_total < static_cast<double>(layout.batch)) {
        fail(GSPO4J_ERROR_INVALID_ARGUMENT, "config.batch_total = " + std::to_string(config.batch_total) + " is below this call's " +
                                                std::to_string(layout.batch) + " responses: pass the step's total over every rank");
    }
    const math::Scales scales = math::aggregation_scales(config, layout.offsets != nullptr, layout.batch, layout.seq, responses,
                                                         total_tokens, longest);
    const math::Clip clip = math::Clip::of(config);
    std::vector<math::Partial> partials(static_cast<size_t>(layout.batch));

    // Pass 2: per-token coefficients and per-response partial sums.
    parallel_for(layout.batch, responses_per_chunk(layout), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
            math::Partial& part = partials[b];
            const math::Response response =
                math::begin_response(config, clip, scales, sums[b], advantages, b, &part);
            for (int64_t i = layout.begin(b); i < layout.end(b); ++i) {
                if (!counted(mask, i)) {
                    grad_logprob[i] = 0.0f;
                    if (grad_entropy) grad_entropy[i] = 0.0f;
                    continue;
                }
                const double advantage = advantages_per_token ? advantages[i] : advantages[b];
                math::counted_token(config, clip, response, i, logprob, old_logprob, advantage, ref_logprob, entropy, weights,
                                    part, grad_logprob, grad_entropy);
            }
        }
    });

    // Fixed-order reduction.
    math::Partial total;
    for (const math::Partial& part : partials) total.add(part);
    math::finish_loss(config, total, scales, weight_totals, weighted, entropy_threshold != nullptr, loss, metrics);
}

// The (1 - rho) quantile of the counted entropies: a selection (nth_element) on the order keys, then
// the smallest key above the k-th for the upper rank; the same keys and ranks as the CUDA kernel.
void entropy_threshold(int64_t tokens, const float* entropy, const uint8_t* mask, double rho, bool check_finite,
                       double* threshold) {
    std::vector<uint32_t> keys;
    bool any_nan = false;
    for (int64_t i = 0; i < tokens; ++i) {
        if (!counted(mask, i)) continue;
        if (check_finite) require_finite(entropy, "entropy", i);
        if (std::isnan(entropy[i])) {
            any_nan = true;
            continue;
        }
        uint32_t bits;
        std::memcpy(&bits, &entropy[i], sizeof bits);
        keys.push_back(math::order_key(bits));
    }
    if (any_nan) {
        *threshold = std::numeric_limits<double>::quiet_NaN();
        return;
    }
    if (keys.empty()) {
        *threshold = std::numeric_limits<double>::infinity();
        return;
    }
    const math::QuantileRank rank = math::quantile_rank(static_cast<int64_t>(keys.size()), rho);
    const auto kth = keys.begin() + rank.k;
    std::nth_element(keys.begin(), kth, keys.end());
    const auto value = [](uint32_t key) {
        const uint32_t bits = math::key_bits(key);
        float v;
        std::memcpy(&v, &bits, sizeof v);
        return static_cast<double>(v);
    };
    const double a = value(*kth);
    *threshold = rank.upper ? math::quantile_lerp(a, value(*std::min_element(kth + 1, keys.end())), rank.t) : a;
}

}  // namespace cpu
}  // namespace gspo4j
