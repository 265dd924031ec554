// The CUDA implementations behind the C entry points (cuda/*.cu), declared for api.cpp. The same
// operations and arguments as cpu_ops.h with the caller's cudaStream_t first; every pointer is
// device memory on one GPU. api.cpp has already checked what needs no look at the data; these
// check that the pointers are device memory, queue their kernels on `stream` and return without
// waiting. Checks of the data itself (token ids, offsets, finiteness) run inside the kernels and
// are reported by check_error.
#ifndef GSPO4J_CUDA_OPS_H
#define GSPO4J_CUDA_OPS_H

#include "common.h"

namespace gspo4j {
namespace cuda {

// CUDA devices usable by this process; 0 without a driver or a device (never an error).
int device_count();

// CUDART_VERSION of the runtime linked in.
int runtime_version();

// Waits for `stream` and raises the first data error its kernels recorded since the last call
// (the lowest-numbered kind, at its lowest index), then clears the record.
void check_error(void* stream);

// Queues, on `stream`, a snapshot of the error record (what the kernels queued before it found)
// and clears the record, without waiting; returns a ticket for resolve_error_check (0: no kernel
// of this library ran on the device, nothing to check).
int64_t defer_error_check(void* stream);

// Waits for the snapshot of `ticket` (the work queued before it, not the stream's later work) and
// raises the first data error it holds, as check_error does. The ticket is spent either way.
void resolve_error_check(int64_t ticket);

void token_logprob_forward(void* stream, const LogitsView& logits, const int64_t* targets, double temperature,
                           bool check_finite, float* logprob, double* lse, float* entropy);

void token_logprob_backward(void* stream, const LogitsView& logits, const int64_t* targets, double temperature,
                            const double* lse, const float* entropy, const float* grad_logprob,
                            const float* grad_entropy, void* grad_logits, int64_t grad_stride_batch,
                            int64_t grad_stride_seq);

void sequence_log_ratio(void* stream, const TokenLayout& layout, const float* logprob, const float* old_logprob,
                        const uint8_t* mask, bool check_finite, float* log_ratio, float* lengths);

void policy_loss(void* stream, const gspo4j_loss_config& config, const TokenLayout& layout, const float* logprob,
                 const float* old_logprob, const float* rollout_logprob, const uint8_t* mask, const float* advantages,
                 bool advantages_per_token, const float* ref_logprob, const float* entropy, const double* entropy_threshold,
                 float* loss, float* grad_logprob, float* grad_entropy, float* metrics);

void entropy_threshold(void* stream, int64_t tokens, const float* entropy, const uint8_t* mask, double rho, bool check_finite,
                       double* threshold);

void group_advantages(void* stream, int64_t count, const float* rewards, int64_t group_size, const int64_t* group_ids,
                      int32_t mode, double eps, bool check_finite, float* advantages);

void gae(void* stream, const TokenLayout& layout, const float* rewards, const float* values, const uint8_t* mask,
         double gamma, double lambda, bool check_finite, float* advantages, float* returns);

}  // namespace cuda
}  // namespace gspo4j

#endif
