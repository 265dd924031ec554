// CUDA group advantages (docs/math.md "Advantages") and GAE ("Advantages", GAE). Both are tiny next to
// the logits (one value per response or per token), so they favour plainness: a thread per
// response computes its own group's statistics in fp64 by scanning the group's members in index
// order, which needs no sort for arbitrary group ids and gives every member of a group the same
// bitwise mean; a thread per response runs GAE's backward recurrence, the CPU's own (loss_math.h).
#include <initializer_list>
#include <utility>

#include "common.cuh"
#include "cuda_ops.h"
#include "loss_math.h"

namespace gspo4j {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Members of response i's group: the contiguous run [begin, end) when group_ids is null, else
// every j in [0, count) with group_ids[j] == group_ids[i].
struct Group {
    const int64_t* ids;
    int64_t count;
    int64_t begin;
    int64_t end;
    int64_t id;

    __device__ Group(const int64_t* group_ids, int64_t n, int64_t group_size, int64_t i) : ids(group_ids), count(n) {
        if (ids) {
            begin = 0;
            end = n;
            id = ids[i];
        } else {
            begin = i / group_size * group_size;
            end = begin + group_size;
            id = 0;
        }
    }

    template <typename Visit> __device__ void for_each(Visit visit) const {
        for (int64_t j = begin; j < end; ++j) {
            if (ids == nullptr || ids[j] == id) visit(j);
        }
    }
};

__global__ void check_rewards_kernel(int64_t count, const float* __restrict__ rewards, ErrorRecord record) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < count && !isfinite(rewards[i])) report(record, DataError::kNonFiniteRewards, i);
}

// MEAN_BATCH_STD's denominator, one CTA: the Bessel-corrected std of every reward, two fixed-shape
// tree reductions in float64 (0 for fewer than 2 rewards: the one group is then all equal).
__global__ void __launch_bounds__(kThreads) batch_std_kernel(int64_t count, const float* __restrict__ rewards,
                                                             double* __restrict__ batch_std) {
    GSPO4J_SHARED(double, shared, 32);
    double sum = 0.0;
    for (int64_t i = threadIdx.x; i < count; i += kThreads) sum += rewards[i];
    const double mean = block_reduce(sum, Add(), 0.0, shared) / static_cast<double>(count);
    double squares = 0.0;
    for (int64_t i = threadIdx.x; i < count; i += kThreads) {
        const double centred = rewards[i] - mean;
        squares += centred * centred;
    }
    const double total = block_reduce(squares, Add(), 0.0, shared);
    if (threadIdx.x == 0) *batch_std = count > 1 ? sqrt(total / static_cast<double>(count - 1)) : 0.0;
}

__global__ void group_advantages_kernel(int64_t count, const float* __restrict__ rewards, int64_t group_size,
                                        const int64_t* __restrict__ group_ids, int mode, double eps,
                                        const double* __restrict__ batch_std, ErrorRecord record,
                                        float* __restrict__ advantages) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= count) return;
    const Group group(group_ids, count, group_size, i);
    float low = rewards[i];
    float high = low;
    double sum = 0.0;
    int64_t size = 0;
    int64_t first = i;
    group.for_each([&](int64_t j) {
        const float r = rewards[j];
        low = fminf(low, r);
        high = fmaxf(high, r);
        sum += r;
        first = j < first ? j : first;
        ++size;
    });
    if (mode == GSPO4J_ADVANTAGE_RLOO && size < 2) {
        report(record, DataError::kGroupOfOne, first);
        advantages[i] = NAN;
        return;
    }
    // All equal (a group of one included): exactly 0, not rounding residue divided by eps. A NaN
    // reward (checking off) makes the sum NaN and every advantage of its group NaN, as on the
    // CPU; fminf and fmaxf alone would drop it.
    if (low == high && !isnan(sum)) {
        advantages[i] = 0.0f;
        return;
    }
    const double n = static_cast<double>(size);
    const double mean = sum / n;
    const double r = rewards[i];
    if (mode == GSPO4J_ADVANTAGE_MEAN) {
        advantages[i] = static_cast<float>(r - mean);
    } else if (mode == GSPO4J_ADVANTAGE_MEAN_BATCH_STD) {
        advantages[i] = static_cast<float>((r - mean) / (*batch_std + eps));
    } else if (mode == GSPO4J_ADVANTAGE_RLOO) {
        advantages[i] = static_cast<float>(r - (sum - r) / (n - 1.0));
    } else {
        double squares = 0.0;
        group.for_each([&](int64_t j) {
            const double centred = rewards[j] - mean;
            squares += centred * centred;
        });
        const double std_dev = sqrt(squares / (n - 1.0));
        advantages[i] = static_cast<float>((r - mean) / (std_dev + eps));
    }
}

__global__ void check_gae_kernel(int64_t tokens, const float* __restrict__ rewards, const float* __restrict__ values,
                                 const uint8_t* __restrict__ mask, ErrorRecord record) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= tokens || (mask && mask[i] == 0)) return;
    if (!isfinite(rewards[i])) report(record, DataError::kNonFiniteRewards, i);
    if (!isfinite(values[i])) report(record, DataError::kNonFiniteValues, i);
}

__global__ void gae_kernel(DeviceLayout layout, const float* __restrict__ rewards, const float* __restrict__ values,
                           const uint8_t* __restrict__ mask, double gamma, double lambda, float* __restrict__ advantages,
                           float* __restrict__ returns) {
    const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (b >= layout.batch || layout.rejected()) return;
    int64_t begin = layout.begin(b);
    int64_t end = layout.end(b);
    clamp_range(layout.tokens, &begin, &end);
    math::gae_response(begin, end, rewards, values, mask, gamma, lambda, advantages, returns);
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>(ceil_div(n, kThreads)); }

}  // namespace

void group_advantages(void* stream_pointer, int64_t count, const float* rewards, int64_t group_size, const int64_t* group_ids,
                      int32_t mode, double eps, bool check_finite, float* advantages) {
    if (group_ids == nullptr && count % group_size != 0) {
        fail(GSPO4J_ERROR_INVALID_ARGUMENT,
             "group_size " + std::to_string(group_size) + " does not divide the " + std::to_string(count) + " rewards");
    }
    if (count == 0) return;
    const DeviceGuard guard(rewards, "rewards");
    require_device_pointer(group_ids, "group_ids");
    require_device_pointer(advantages, "advantages");
    const cudaStream_t stream = as_stream(stream_pointer);
    const ErrorRecord record = error_record();
    if (check_finite) {
        GSPO4J_LAUNCH(blocks_for(count), kThreads, 0, stream, check_rewards_kernel)(count, rewards, record);
        check_launch("check_rewards_kernel");
    }
    const bool batch_std = mode == GSPO4J_ADVANTAGE_MEAN_BATCH_STD;
    Scratch scratch(batch_std ? sizeof(double) : 0, stream);
    double* std_dev = batch_std ? scratch.as<double>() : nullptr;
    if (batch_std) {
        GSPO4J_LAUNCH(1, kThreads, 0, stream, batch_std_kernel)(count, rewards, std_dev);
        check_launch("batch_std_kernel");
    }
    GSPO4J_LAUNCH(blocks_for(count), kThreads, 0, stream, group_advantages_kernel)(count, rewards, group_size, group_ids, mode, eps,
                                                                                  std_dev, record, advantages);
    check_launch("group_advantages_kernel");
}

void gae(void* stream_pointer, const TokenLayout& layout, const float* rewards, const float* values, const uint8_t* mask,
         double gamma, double lambda, bool check_finite, float* advantages, float* returns) {
    if (layout.tokens == 0 && layout.offsets == nullptr) return;
    const void* anchor = layout.tokens > 0 ? static_cast<const void*>(rewards) : static_cast<const void*>(layout.offsets);
    const DeviceGuard guard(anchor, layout.tokens > 0 ? "rewards" : "offsets");
    for (auto [p, name] : {std::pair<const void*, const char*>{values, "values"}, {mask, "mask"}, {advantages, "advantages"},
                           {returns, "returns"}, {layout.offsets, "offsets"}}) {
        require_device_pointer(p, name);
    }
    const cudaStream_t stream = as_stream(stream_pointer);
    const ErrorRecord record = error_record();
    const CheckedLayout checked(stream, layout, record);
    if (check_finite && layout.tokens > 0) {
        GSPO4J_LAUNCH(blocks_for(layout.tokens), kThreads, 0, stream, check_gae_kernel)(layout.tokens, rewards, values, mask, record);
        check_launch("check_gae_kernel");
    }
    if (layout.batch == 0) return;
    GSPO4J_LAUNCH(blocks_for(layout.batch), kThreads, 0, stream, gae_kernel)(checked.device(), rewards, values, mask, gamma, lambda,
                                                                  advantages, returns);
    check_launch("gae_kernel");
}

}  // namespace cuda
}  // namespace gspo4j
