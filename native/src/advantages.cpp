// CPU group advantages (docs/math.md "Advantages") and GAE ("Advantages", GAE).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "cpu_ops.h"
#include "loss_math.h"
#include "parallel.h"

namespace gspo4j {
namespace cpu {
namespace {

// Advantages of one group, given the indices of its members. Sums in float64.
// `batch_std`: MEAN_BATCH_STD's denominator, the std of every reward of the call.
void advantages_of_group(const float* rewards, const int64_t* members, int64_t size, int32_t mode, double eps,
                         double batch_std, const int64_t* group_ids, float* advantages) {
    float low = rewards[members[0]];
    float high = low;
    double sum = 0.0;
    for (int64_t k = 0; k < size; ++k) {
        const float r = rewards[members[k]];
        low = std::min(low, r);
        high = std::max(high, r);
        sum += r;
    }
    if (mode == GSPO4J_ADVANTAGE_RLOO && size < 2) {
        fail(GSPO4J_ERROR_INVALID_ARGUMENT,
             "RLOO needs at least 2 responses per group; the group of response " + std::to_string(members[0]) +
                 (group_ids ? " (group id " + std::to_string(group_ids[members[0]]) + ")" : std::string()) + " has 1");
    }
    // All equal (a group of one included): exactly 0, not rounding residue divided by eps. A NaN
    // reward (checking off) makes the sum NaN and every advantage of its group NaN, wherever it
    // sits in the group (std::min and std::max keep a NaN only in their first argument).
    if (low == high && !std::isnan(sum)) {
        for (int64_t k = 0; k < size; ++k) advantages[members[k]] = 0.0f;
        return;
    }
    const double n = static_cast<double>(size);
    const double mean = sum / n;
    if (mode == GSPO4J_ADVANTAGE_MEAN) {
        for (int64_t k = 0; k < size; ++k) advantages[members[k]] = static_cast<float>(rewards[members[k]] - mean);
    } else if (mode == GSPO4J_ADVANTAGE_MEAN_BATCH_STD) {
        for (int64_t k = 0; k < size; ++k) {
            advantages[members[k]] = static_cast<float>((rewards[members[k]] - mean) / (batch_std + eps));
        }
    } else if (mode == GSPO4J_ADVANTAGE_RLOO) {
        for (int64_t k = 0; k < size; ++k) {
            const double r = rewards[members[k]];
            advantages[members[k]] = static_cast<float>(r - (sum - r) / (n - 1.0));
        }
    } else {
        double squares = 0.0;
        for (int64_t k = 0; k < size; ++k) {
            const double centred = rewards[members[k]] - mean;
            squares += centred * centred;
        }
        const double std_dev = std::sqrt(squares / (n - 1.0));
        for (int64_t k = 0; k < size; ++k) {
            advantages[members[k]] = static_cast<float>((rewards[members[k]] - mean) / (std_dev + eps));
        }
    }
}

}  // namespace

void group_advantages(int64_t count, const float* rewards, int64_t group_size, const int64_t* group_ids,
                      int32_t mode, double eps, bool check_finite, float* advantages) {
    if (check_finite) {
        for (int64_t i = 0; i < count; ++i) {
            if (!std::isfinite(rewards[i])) {
                fail(GSPO4J_ERROR_NON_FINITE, "rewards[" + std::to_string(i) + "] = " + std::to_string(rewards[i]) + " is not finite");
            }
        }
    }
    // MEAN_BATCH_STD: the Bessel-corrected std of all `count` rewards, two passes in float64.
    double batch_std = 0.0;
    if (mode == GSPO4J_ADVANTAGE_MEAN_BATCH_STD && count > 1) {
        double sum = 0.0;
        for (int64_t i = 0; i < count; ++i) sum += rewards[i];
        const double mean = sum / static_cast<double>(count);
        double squares = 0.0;
        for (int64_t i = 0; i < count; ++i) {
            const double centred = rewards[i] - mean;
            squares += centred * centred;
        }
        batch_std = std::sqrt(squares / static_cast<double>(count - 1));
    }
    std::vector<int64_t> order(static_cast<size_t>(count));
    std::iota(order.begin(), order.end(), int64_t{0});
    if (group_ids == nullptr) {
        if (count % group_size != 0) {
            fail(GSPO4J_ERROR_INVALID_ARGUMENT, "group_size " + std::to_string(group_size) + " does not divide the " +
                                                    std::to_string(count) + " rewards");
        }
        for (int64_t start = 0; start < count; start += group_size) {
            advantages_of_group(rewards, order.data() + start, group_size, mode, eps, batch_std, nullptr, advantages);
        }
        return;
    }
    // Group ids in any order: a stable sort by id makes each group a run of `order`.
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return group_ids[a] < group_ids[b]; });
    for (int64_t start = 0; start < count;) {
        int64_t stop = start + 1;
        while (stop < count && group_ids[order[stop]] == group_ids[order[start]]) ++stop;
        advantages_of_group(rewards, order.data() + start, stop - start, mode, eps, batch_std, group_ids, advantages);
        start = stop;
    }
}

void gae(const TokenLayout& layout, const float* rewards, const float* values, const uint8_t* mask, double gamma,
         double lambda, bool check_finite, float* advantages, float* returns) {
    check_layout(layout);
    if (check_finite) {
        for (int64_t i = 0; i < layout.tokens; ++i) {
            if (mask && mask[i] == 0) continue;
            for (const float* array : {rewards, values}) {
                if (!std::isfinite(array[i])) {
                    fail(GSPO4J_ERROR_NON_FINITE, std::string(array == rewards ? "rewards" : "values") + "[" +
                                                      std::to_string(i) + "] = " + std::to_string(array[i]) + " is not finite");
                }
            }
        }
    }
    const int64_t mean_length = layout.batch > 0 ? std::max<int64_t>(1, layout.tokens / layout.batch) : 1;
    parallel_for(layout.batch, std::max<int64_t>(1, 4096 / mean_length), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
            math::gae_response(layout.begin(b), layout.end(b), rewards, values, mask, gamma, lambda, advantages, returns);
        }
    });
}

}  // namespace cpu
}  // namespace gspo4j
