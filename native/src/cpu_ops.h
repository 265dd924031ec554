// The CPU implementations behind the C entry points. api.cpp has already checked every
// pointer, size and option it can without reading the data; these check the data itself
// (token ids, offsets, finiteness) before writing anything the caller owns.
#ifndef GSPO4J_CPU_OPS_H
#define GSPO4J_CPU_OPS_H

#include "common.h"

namespace gspo4j {
namespace cpu {

const char* isa();

void token_logprob_forward(const LogitsView& logits, const int64_t* targets, double temperature,
                           bool check_finite, float* logprob, double* lse, float* entropy);

void token_logprob_backward(const LogitsView& logits, const int64_t* targets, double temperature,
                            const double* lse, const float* entropy, const float* grad_logprob,
                            const float* grad_entropy, void* grad_logits, int64_t grad_stride_batch,
                            int64_t grad_stride_seq);

void sequence_log_ratio(const TokenLayout& layout, const float* logprob, const float* old_logprob,
                        const uint8_t* mask, bool check_finite, float* log_ratio, float* lengths);

void policy_loss(const gspo4j_loss_config& config, const TokenLayout& layout, const float* logprob,
                 const float* old_logprob, const float* rollout_logprob, const uint8_t* mask, const float* advantages,
                 bool advantages_per_token, const float* ref_logprob, const float* entropy, const double* entropy_threshold,
                 float* loss, float* grad_logprob, float* grad_entropy, float* metrics);

void entropy_threshold(int64_t tokens, const float* entropy, const uint8_t* mask, double rho, bool check_finite,
                       double* threshold);
void group_advantages(int64_t count, const float* rewards, int64_t group_size, const int64_t* group_ids,
                      int32_t mode, double eps, bool check_finite, float* advantages);

void gae(const TokenLayout& layout, const float* rewards, const float* values, const uint8_t* mask,
         double gamma, double lambda, bool check_finite, float* advantages, float* returns);

// Shared by the ops over the token axis: offsets start at 0, never decrease, end at tokens.
void check_layout(const TokenLayout& layout);

}  // namespace cpu
}  // namespace gspo4j

#endif
