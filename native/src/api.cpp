// The C entry points: the error funnel, the checks that need no look at the data, and the
// choice between the CPU implementation and the CUDA one.
#include <cmath>
#include <string>

#include "common.h"
#include "cpu_ops.h"
#include "parallel.h"
#ifdef GSPO4J_WITH_CUDA
#include "cuda_ops.h"
#define GSPO4J_ON_DEVICE(device, stream, op, ...) \
    ((device) == GSPO4J_DEVICE_CUDA ? ::gspo4j::cuda::op(stream, __VA_ARGS__) : ::gspo4j::cpu::op(__VA_ARGS__))
#else
#define GSPO4J_ON_DEVICE(device, stream, op, ...) ::gspo4j::cpu::op(__VA_ARGS__)
#endif

namespace gspo4j {

namespace {
thread_local std::string last_error;
}  // namespace

void fail(gspo4j_status status, const std::string& message) { throw Error{status, message}; }
void set_last_error(const std::string& message) { last_error = message; }
void clear_last_error() { last_error.clear(); }

namespace {

// Checks of one entry point; every message starts with the function's name.
class Checker {
public:
    explicit Checker(const char* function) : function_(function) {}

    // The message is built only when the check fails: `message` returns it (a lambda), so a call
    // that passes its checks formats no numbers and allocates no strings.
    template <class Message>
    void require(bool condition, Message&& message) const {
        if (!condition) reject(message());
    }

    [[noreturn]] void reject(const std::string& message) const {
        fail(GSPO4J_ERROR_INVALID_ARGUMENT, std::string(function_) + ": " + message);
    }

    void pointer(const void* p, const char* name) const {
        require(p != nullptr, [&] { return std::string(name) + " must not be NULL"; });
    }

    void non_negative(int64_t value, const char* name) const {
        require(value >= 0, [&] { return std::string(name) + " must be >= 0, got " + std::to_string(value); });
    }

    void device(int32_t device, const void* stream) const {
        require(device == GSPO4J_DEVICE_CPU || device == GSPO4J_DEVICE_CUDA,
                [&] { return "device must be GSPO4J_DEVICE_CPU (0) or GSPO4J_DEVICE_CUDA (1), got " + std::to_string(device); });
        if (device == GSPO4J_DEVICE_CPU) require(stream == nullptr, [&] { return "stream must be NULL for the CPU"; });
#ifndef GSPO4J_WITH_CUDA
        if (device == GSPO4J_DEVICE_CUDA) {
            fail(GSPO4J_ERROR_UNSUPPORTED, std::string(function_) + ": this gspo4j library was built without CUDA");
        }
#endif
    }

    TokenLayout layout(int64_t batch, int64_t seq, int64_t tokens, const int64_t* offsets) const {
        non_negative(batch, "batch");
        non_negative(seq, "seq");
        non_negative(tokens, "tokens");
        if (!offsets) {
            int64_t product = 0;
            require(!__builtin_mul_overflow(batch, seq, &product) && product == tokens,
                    [&] { return "padded layout needs tokens = batch * seq, got tokens = " + std::to_string(tokens) + ", batch = " +
                        std::to_string(batch) + ", seq = " + std::to_string(seq); });
        }
        return TokenLayout{batch, seq, tokens, offsets};
    }

    // Rows [batch, seq] of `vocab` elements at the given strides: no negative stride, and the
    // last element's offset fits in int64. With `distinct`, no two rows overlap (a gradient
    // written by several threads at once must not be).
    void strides(int64_t batch, int64_t seq, int64_t vocab, int64_t stride_batch, int64_t stride_seq, const char* what,
                 bool distinct) const {
        require(stride_batch >= 0, [&] { return std::string(what) + " stride_batch must be >= 0, got " + std::to_string(stride_batch); });
        require(stride_seq >= 0, [&] { return std::string(what) + " stride_seq must be >= 0, got " + std::to_string(stride_seq); });
        if (batch == 0 || seq == 0) return;
        int64_t a = 0, b = 0, end = 0;
        const bool overflow = __builtin_mul_overflow(batch - 1, stride_batch, &a) ||
                              __builtin_mul_overflow(seq - 1, stride_seq, &b) || __builtin_add_overflow(a, b, &end) ||
                              __builtin_add_overflow(end, vocab, &end);
        require(!overflow, [&] { return std::string(what) + ": the last element's offset overflows int64"; });
        if (distinct) {
            require(seq == 1 || stride_seq >= vocab,
                    [&] { return std::string(what) + " rows overlap: stride_seq = " + std::to_string(stride_seq) + " < vocab = " + std::to_string(vocab); });
            require(batch == 1 || stride_batch >= (seq - 1) * stride_seq + vocab,
                    [&] { return std::string(what) + " rows overlap: stride_batch = " + std::to_string(stride_batch) + " < " +
                        std::to_string((seq - 1) * stride_seq + vocab); });
        }
    }

    LogitsView logits(const void* data, int32_t dtype, int64_t batch, int64_t seq, int64_t vocab, int64_t stride_batch,
                      int64_t stride_seq) const {
        require(dtype == GSPO4J_FLOAT32 || dtype == GSPO4J_BFLOAT16 || dtype == GSPO4J_FLOAT16,
                [&] { return "dtype must be GSPO4J_FLOAT32 (0), GSPO4J_BFLOAT16 (1) or GSPO4J_FLOAT16 (2), got " + std::to_string(dtype); });
        non_negative(batch, "batch");
        non_negative(seq, "seq");
        require(vocab > 0 && vocab <= INT32_MAX, [&] { return "vocab must be in [1, 2^31), got " + std::to_string(vocab); });
        strides(batch, seq, vocab, stride_batch, stride_seq, "logits", false);
        int64_t rows = 0;
        require(!__builtin_mul_overflow(batch, seq, &rows), [&] { return "batch * seq overflows int64"; });
        if (rows > 0) pointer(data, "logits");
        return LogitsView{data, dtype, batch, seq, vocab, stride_batch, stride_seq};
    }

    void temperature(double t) const {
        require(std::isfinite(t) && t > 0.0, [&] { return "temperature must be finite and > 0, got " + std::to_string(t); });
    }

    void finite(double value, const char* name) const {
        require(std::isfinite(value), [&] { return std::string(name) + " must be finite, got " + std::to_string(value); });
    }

private:
    const char* function_;
};

}  // namespace
}  // namespace gspo4j

using gspo4j::Checker;

extern "C" {

const char* gspo4j_last_error(void) { return gspo4j::last_error.c_str(); }

const char* gspo4j_version(void) { return GSPO4J_VERSION_STRING; }

int32_t gspo4j_cuda_device_count(void) {
#ifdef GSPO4J_WITH_CUDA
    return gspo4j::cuda::device_count();
#else
    return 0;
#endif
}

int32_t gspo4j_cuda_runtime_version(void) {
#ifdef GSPO4J_WITH_CUDA
    return gspo4j::cuda::runtime_version();
#else
    return 0;
#endif
}

gspo4j_status gspo4j_set_num_threads(int32_t threads) {
    GSPO4J_API_BEGIN()
    Checker("gspo4j_set_num_threads").require(threads >= 1 && threads <= 1024, [&] { return "threads must be in [1, 1024], got " + std::to_string(threads); });
    gspo4j::set_num_threads(threads);
    GSPO4J_API_END()
}

int32_t gspo4j_get_num_threads(void) { return gspo4j::num_threads(); }

const char* gspo4j_cpu_isa(void) { return gspo4j::cpu::isa(); }

gspo4j_status gspo4j_cuda_check_error(void* stream) {
    GSPO4J_API_BEGIN()
#ifdef GSPO4J_WITH_CUDA
    gspo4j::cuda::check_error(stream);
#else
    (void)stream;
#endif
    GSPO4J_API_END()
}

gspo4j_status gspo4j_cuda_defer_error_check(void* stream, int64_t* ticket) {
    GSPO4J_API_BEGIN()
    Checker("gspo4j_cuda_defer_error_check").pointer(ticket, "ticket");
    *ticket = 0;
#ifdef GSPO4J_WITH_CUDA
    *ticket = gspo4j::cuda::defer_error_check(stream);
#else
    (void)stream;
#endif
    GSPO4J_API_END()
}

gspo4j_status gspo4j_cuda_resolve_error_check(int64_t ticket) {
    GSPO4J_API_BEGIN()
#ifdef GSPO4J_WITH_CUDA
    gspo4j::cuda::resolve_error_check(ticket);
#else
    Checker("gspo4j_cuda_resolve_error_check").require(ticket == 0, [&] { return "ticket " + std::to_string(ticket) + " is unknown (built without CUDA)"; });
#endif
    GSPO4J_API_END()
}

gspo4j_status gspo4j_loss_config_init(gspo4j_loss_config* config) {
    GSPO4J_API_BEGIN()
    Checker("gspo4j_loss_config_init").pointer(config, "config");
    config->ratio_level = GSPO4J_RATIO_SEQUENCE;
    config->aggregation = GSPO4J_SEQ_MEAN_TOKEN_MEAN;
    config->kl_estimator = GSPO4J_KL_K3;
    config->check_finite = 1;
    config->eps_low = 3e-4;
    config->eps_high = 4e-4;
    config->dual_clip = 0.0;
    config->log_ratio_clamp = 20.0;
    config->normalizer = 0.0;
    config->length_norm = 0.0;
    config->kl_coef = 0.0;
    config->entropy_coef = 0.0;
    config->objective = GSPO4J_OBJECTIVE_CLIP;
    config->reserved = 0;
    config->sapo_tau_pos = 1.0;
    config->sapo_tau_neg = 1.05;
    config->vespo_k_pos = 2.0;
    config->vespo_lambda_pos = 3.0;
    config->vespo_k_neg = 3.0;
    config->vespo_lambda_neg = 2.0;
    config->dppo_delta_low = 0.15;
    config->dppo_delta_high = 0.15;
    config->dppo_ratio_cap = 20.0;
    config->responses_total = 0.0;
    config->tokens_total = 0.0;
    config->batch_total = 0.0;
    config->rollout_level = GSPO4J_ROLLOUT_OFF;
    config->rollout_mode = GSPO4J_ROLLOUT_TRUNCATE;
    config->rollout_c_min = 0.0;
    config->rollout_c_max = 0.0;
    config->rejection_divergence = GSPO4J_DIVERGENCE_NONE;
    config->rejection_scope = GSPO4J_REJECT_TOKEN;
    config->rejection_low = 0.0;
    config->rejection_high = 0.0;
    config->off_policy_mask = 0;
    config->reserved2 = 0;
    config->off_policy_delta = 0.0;
    GSPO4J_API_END()
}

gspo4j_status gspo4j_token_logprob_forward(int32_t device, void* stream, const void* logits, int32_t dtype, int64_t batch,
                                           int64_t seq, int64_t vocab, int64_t stride_batch, int64_t stride_seq,
                                           const int64_t* targets, double temperature, int32_t check_finite,
                                           float* logprob, double* lse, float* entropy) {
    GSPO4J_API_BEGIN()
    const Checker check("gspo4j_token_logprob_forward");
    check.device(device, stream);
    const gspo4j::LogitsView view = check.logits(logits, dtype, batch, seq, vocab, stride_batch, stride_seq);
    check.temperature(temperature);
    if (view.rows() > 0) {
        check.pointer(targets, "targets");
        check.pointer(logprob, "logprob");
        check.pointer(lse, "lse");
        GSPO4J_ON_DEVICE(device, stream, token_logprob_forward, view, targets, temperature, check_finite != 0, logprob, lse, entropy);
    }
    GSPO4J_API_END()
}

gspo4j_status gspo4j_token_logprob_backward(int32_t device, void* stream, const void* logits, int32_t dtype, int64_t batch,
                                            int64_t seq, int64_t vocab, int64_t stride_batch, int64_t stride_seq,
                                            const int64_t* targets, double temperature, const double* lse,
                                            const float* entropy, const float* grad_logprob, const float* grad_entropy,
                                            void* grad_logits, int64_t grad_stride_batch, int64_t grad_stride_seq) {
    GSPO4J_API_BEGIN()
    const Checker check("gspo4j_token_logprob_backward");
    check.device(device, stream);
    const gspo4j::LogitsView view = check.logits(logits, dtype, batch, seq, vocab, stride_batch, stride_seq);
    check.temperature(temperature);
    check.strides(batch, seq, vocab, grad_stride_batch, grad_stride_seq, "grad_logits", true);
    if (view.rows() > 0) {
        if (grad_logits == logits) {
            check.require(grad_stride_batch == stride_batch && grad_stride_seq == stride_seq,
                          [&] { return "in place (grad_logits == logits) needs the same strides"; });
        }
        check.pointer(targets, "targets");
        check.pointer(lse, "lse");
        check.pointer(grad_logprob, "grad_logprob");
        check.pointer(grad_logits, "grad_logits");
        if (grad_entropy) check.pointer(entropy, "entropy (needed with grad_entropy)");
        GSPO4J_ON_DEVICE(device, stream, token_logprob_backward, view, targets, temperature, lse, entropy, grad_logprob,
                         grad_entropy, grad_logits, grad_stride_batch, grad_stride_seq);
    }
    GSPO4J_API_END()
}

gspo4j_status gspo4j_sequence_log_ratio(int32_t device, void* stream, int64_t batch, int64_t seq, int64_t tokens,
                                        const int64_t* offsets, const float* logprob, const float* old_logprob,
                                        const uint8_t* mask, int32_t check_finite, float* log_ratio, float* lengths) {
    GSPO4J_API_BEGIN()
    const Checker check("gspo4j_sequence_log_ratio");
    check.device(device, stream);
    const gspo4j::TokenLayout layout = check.layout(batch, seq, tokens, offsets);
    if (tokens > 0) check.pointer(logprob, "logprob");
    if (batch > 0) check.pointer(log_ratio, "log_ratio");
    GSPO4J_ON_DEVICE(device, stream, sequence_log_ratio, layout, logprob, old_logprob, mask, check_finite != 0, log_ratio, lengths);
    GSPO4J_API_END()
}

gspo4j_status gspo4j_policy_loss(int32_t device, void* stream, const gspo4j_loss_config* config, int64_t batch,
                                 int64_t seq, int64_t tokens, const int64_t* offsets, const float* logprob,
                                 const float* old_logprob, const float* rollout_logprob, const uint8_t* mask,
                                 const float* advantages, int32_t advantages_per_token, const float* ref_logprob,
                                 const float* entropy, const double* entropy_threshold, float* loss, float* grad_logprob,
                                 float* grad_entropy, float* metrics) {
    GSPO4J_API_BEGIN()
    const Checker check("gspo4j_policy_loss");
    check.device(device, stream);
    check.pointer(config, "config");
    const gspo4j_loss_config& c = *config;
    check.require(c.ratio_level >= GSPO4J_RATIO_TOKEN && c.ratio_level <= GSPO4J_RATIO_SEQUENCE_TOKEN,
                  [&] { return "config.ratio_level must be 0 (token), 1 (sequence) or 2 (sequence-token), got " + std::to_string(c.ratio_level); });
    check.require(c.aggregation >= GSPO4J_SEQ_MEAN_TOKEN_MEAN && c.aggregation <= GSPO4J_SEQ_MEAN_TOKEN_SUM_NORM,
                  [&] { return "config.aggregation must be in [0, 3], got " + std::to_string(c.aggregation); });
    check.require(c.kl_estimator >= GSPO4J_KL_K1 && c.kl_estimator <= GSPO4J_KL_LOW_VAR,
                  [&] { return "config.kl_estimator must be 0 (k1), 1 (k2), 2 (k3), 3 (k3+), 4 (unbiased k3), 5 (abs) or 6 (low-var k3), got " +
                      std::to_string(c.kl_estimator); });
    check.require(c.objective >= GSPO4J_OBJECTIVE_CLIP && c.objective <= GSPO4J_OBJECTIVE_DPPO_KL,
                  [&] { return "config.objective must be in [0, 7], got " + std::to_string(c.objective); });
    switch (c.objective) {
        case GSPO4J_OBJECTIVE_CISPO:
        case GSPO4J_OBJECTIVE_SAPO:
            check.require(c.ratio_level != GSPO4J_RATIO_SEQUENCE,
                          [&] { return "CISPO and SAPO take ratio_level 0 (token) or 2 (sequence-token), got 1 (sequence)"; });
            break;
        case GSPO4J_OBJECTIVE_GMPO:
        case GSPO4J_OBJECTIVE_LUSPO:
            check.require(c.ratio_level == GSPO4J_RATIO_SEQUENCE,
                          [&] { return "GMPO and LUSPO take ratio_level 1 (sequence), got " + std::to_string(c.ratio_level); });
            break;
        case GSPO4J_OBJECTIVE_VESPO:
        case GSPO4J_OBJECTIVE_DPPO_TV:
        case GSPO4J_OBJECTIVE_DPPO_KL:
            check.require(c.ratio_level == GSPO4J_RATIO_TOKEN,
                          [&] { return "VESPO and DPPO take ratio_level 0 (token), got " + std::to_string(c.ratio_level); });
            break;
        default:
            break;
    }
    check.require(c.dual_clip == 0.0 || c.objective == GSPO4J_OBJECTIVE_CLIP || c.objective == GSPO4J_OBJECTIVE_LUSPO,
                  [&] { return "config.dual_clip applies to the clipped objectives (GSPO, GSPO-token, GRPO, PPO, LUSPO); set it to 0"; });
    check.require(std::isfinite(c.sapo_tau_pos) && c.sapo_tau_pos > 0.0 && std::isfinite(c.sapo_tau_neg) && c.sapo_tau_neg > 0.0,
                  [&] { return "config.sapo_tau_pos and sapo_tau_neg must be finite and > 0, got " + std::to_string(c.sapo_tau_pos) + " and " +
                      std::to_string(c.sapo_tau_neg); });
    check.finite(c.vespo_k_pos, "config.vespo_k_pos");
    check.finite(c.vespo_lambda_pos, "config.vespo_lambda_pos");
    check.finite(c.vespo_k_neg, "config.vespo_k_neg");
    check.finite(c.vespo_lambda_neg, "config.vespo_lambda_neg");
    check.require(std::isfinite(c.dppo_delta_low) && c.dppo_delta_low >= 0.0 && std::isfinite(c.dppo_delta_high) &&
                      c.dppo_delta_high >= 0.0,
                  [&] { return "config.dppo_delta_low and dppo_delta_high must be finite and >= 0, got " + std::to_string(c.dppo_delta_low) +
                      " and " + std::to_string(c.dppo_delta_high); });
    check.require(std::isfinite(c.dppo_ratio_cap) && c.dppo_ratio_cap > 0.0,
                  [&] { return "config.dppo_ratio_cap must be finite and > 0, got " + std::to_string(c.dppo_ratio_cap); });
    check.require(std::isfinite(c.eps_low) && c.eps_low >= 0.0 && c.eps_low <= 1.0,
                  [&] { return "config.eps_low must be in [0, 1] (1: no lower bound), got " + std::to_string(c.eps_low); });
    check.require(std::isfinite(c.eps_high) && c.eps_high >= 0.0, [&] { return "config.eps_high must be finite and >= 0, got " + std::to_string(c.eps_high); });
    check.require(c.dual_clip == 0.0 || (std::isfinite(c.dual_clip) && c.dual_clip > 1.0),
                  [&] { return "config.dual_clip must be 0 (off) or > 1, got " + std::to_string(c.dual_clip); });
    check.require(std::isfinite(c.log_ratio_clamp) && c.log_ratio_clamp > 0.0,
                  [&] { return "config.log_ratio_clamp must be finite and > 0, got " + std::to_string(c.log_ratio_clamp); });
    check.require(std::isfinite(c.normalizer) && c.normalizer >= 0.0,
                  [&] { return "config.normalizer must be finite and >= 0 (0: local count), got " + std::to_string(c.normalizer); });
    check.require(std::isfinite(c.responses_total) && c.responses_total >= 0.0 && std::isfinite(c.tokens_total) &&
                      c.tokens_total >= 0.0 && std::isfinite(c.batch_total) && c.batch_total >= 0.0,
                  [&] { return "config.responses_total, tokens_total and batch_total must be finite and >= 0 (0: this call's count), got " +
                      std::to_string(c.responses_total) + ", " + std::to_string(c.tokens_total) + " and " +
                      std::to_string(c.batch_total); });
    check.require(std::isfinite(c.length_norm) && c.length_norm >= 0.0,
                  [&] { return "config.length_norm must be finite and >= 0 (0: default), got " + std::to_string(c.length_norm); });
    check.finite(c.kl_coef, "config.kl_coef");
    check.finite(c.entropy_coef, "config.entropy_coef");
    check.require(c.rollout_level >= GSPO4J_ROLLOUT_OFF && c.rollout_level <= GSPO4J_ROLLOUT_GEOMETRIC,
                  [&] { return "config.rollout_level must be 0 (off), 1 (token), 2 (sequence) or 3 (geometric), got " +
                      std::to_string(c.rollout_level); });
    check.require(c.rollout_mode == GSPO4J_ROLLOUT_TRUNCATE || c.rollout_mode == GSPO4J_ROLLOUT_MASK,
                  [&] { return "config.rollout_mode must be 0 (truncate) or 1 (mask), got " + std::to_string(c.rollout_mode); });
    check.require(std::isfinite(c.rollout_c_min) && c.rollout_c_min >= 0.0 && std::isfinite(c.rollout_c_max) &&
                      c.rollout_c_max >= 0.0 && (c.rollout_c_max == 0.0 || c.rollout_c_min <= c.rollout_c_max),
                  [&] { return "config.rollout_c_min and rollout_c_max must be finite and >= 0 (0: no bound) with c_min <= c_max, got " +
                      std::to_string(c.rollout_c_min) + " and " + std::to_string(c.rollout_c_max); });
    check.require(c.rejection_divergence >= GSPO4J_DIVERGENCE_NONE && c.rejection_divergence <= GSPO4J_DIVERGENCE_K3,
                  [&] { return "config.rejection_divergence must be 0 (none), 1 (k1), 2 (k2) or 3 (k3), got " +
                      std::to_string(c.rejection_divergence); });
    check.require(c.rejection_scope >= GSPO4J_REJECT_TOKEN && c.rejection_scope <= GSPO4J_REJECT_MAX,
                  [&] { return "config.rejection_scope must be 0 (token), 1 (mean), 2 (sum) or 3 (max), got " + std::to_string(c.rejection_scope); });
    check.require(c.rejection_divergence == GSPO4J_DIVERGENCE_NONE ||
                      (std::isfinite(c.rejection_high) && std::isfinite(c.rejection_low) &&
                       (c.rejection_divergence == GSPO4J_DIVERGENCE_K1 ? c.rejection_low <= c.rejection_high : c.rejection_high > 0.0)),
                  [&] { return "config.rejection_high must be finite (> 0 for k2 and k3) and, for k1, rejection_low finite and <= rejection_high, got " +
                      std::to_string(c.rejection_low) + " and " + std::to_string(c.rejection_high); });
    check.finite(c.off_policy_delta, "config.off_policy_delta");
    check.require(!(c.off_policy_mask != 0 && advantages_per_token),
                  [&] { return "config.off_policy_mask drops responses with A_b < 0: it needs one advantage per response"; });
    check.require(!(c.ratio_level == GSPO4J_RATIO_SEQUENCE && advantages_per_token),
                  [&] { return "a sequence objective (GSPO, LUSPO, GMPO) needs one advantage per response; use GSPO-token for per-token advantages"; });
    const gspo4j::TokenLayout layout = check.layout(batch, seq, tokens, offsets);
    check.pointer(loss, "loss");
    if (tokens > 0) {
        check.pointer(logprob, "logprob");
        check.pointer(grad_logprob, "grad_logprob");
        check.pointer(advantages, "advantages");
        if (c.kl_coef != 0.0) check.pointer(ref_logprob, "ref_logprob (needed when kl_coef != 0)");
        if (c.entropy_coef != 0.0) check.pointer(entropy, "entropy (needed when entropy_coef != 0)");
        if (c.rollout_level != GSPO4J_ROLLOUT_OFF || c.rejection_divergence != GSPO4J_DIVERGENCE_NONE)
            check.pointer(rollout_logprob, "rollout_logprob (needed by rollout_level and rejection_divergence)");
        if (entropy_threshold) check.pointer(entropy, "entropy (needed with entropy_threshold)");
    }
    GSPO4J_ON_DEVICE(device, stream, policy_loss, c, layout, logprob, old_logprob, rollout_logprob, mask, advantages,
                     advantages_per_token != 0, ref_logprob, entropy, entropy_threshold, loss, grad_logprob, grad_entropy, metrics);
    GSPO4J_API_END()
}

gspo4j_status gspo4j_entropy_threshold(int32_t device, void* stream, int64_t tokens, const float* entropy, const uint8_t* mask,
                                       double rho, int32_t check_finite, double* threshold) {
    GSPO4J_API_BEGIN()
    const Checker check("gspo4j_entropy_threshold");
    check.device(device, stream);
    check.non_negative(tokens, "tokens");
    check.require(rho > 0.0 && rho <= 1.0, [&] { return "rho must be in (0, 1], got " + std::to_string(rho); });
    check.pointer(threshold, "threshold");
    if (tokens > 0) check.pointer(entropy, "entropy");
    GSPO4J_ON_DEVICE(device, stream, entropy_threshold, tokens, entropy, mask, rho, check_finite != 0, threshold);
    GSPO4J_API_END()
}

gspo4j_status gspo4j_group_advantages(int32_t device, void* stream, int64_t count, const float* rewards, int64_t group_size,
                                      const int64_t* group_ids, int32_t mode, double eps, int32_t check_finite,
                                      float* advantages) {
    GSPO4J_API_BEGIN()
    const Checker check("gspo4j_group_advantages");
    check.device(device, stream);
    check.non_negative(count, "count");
    check.require(mode >= GSPO4J_ADVANTAGE_MEAN_STD && mode <= GSPO4J_ADVANTAGE_MEAN_BATCH_STD,
                  [&] { return "mode must be 0 (MEAN_STD), 1 (MEAN), 2 (RLOO) or 3 (MEAN_BATCH_STD), got " + std::to_string(mode); });
    check.require(std::isfinite(eps) && eps >= 0.0, [&] { return "eps must be finite and >= 0, got " + std::to_string(eps); });
    if (!group_ids) check.require(group_size > 0, [&] { return "group_size must be > 0 without group_ids, got " + std::to_string(group_size); });
    if (count > 0) {
        check.pointer(rewards, "rewards");
        check.pointer(advantages, "advantages");
    }
    GSPO4J_ON_DEVICE(device, stream, group_advantages, count, rewards, group_size, group_ids, mode, eps, check_finite != 0, advantages);
    GSPO4J_API_END()
}

gspo4j_status gspo4j_gae(int32_t device, void* stream, int64_t batch, int64_t seq, int64_t tokens, const int64_t* offsets,
                         const float* rewards, const float* values, const uint8_t* mask, double gamma, double lambda,
                         int32_t check_finite, float* advantages, float* returns) {
    GSPO4J_API_BEGIN()
    const Checker check("gspo4j_gae");
    check.device(device, stream);
    const gspo4j::TokenLayout layout = check.layout(batch, seq, tokens, offsets);
    check.require(std::isfinite(gamma) && gamma >= 0.0 && gamma <= 1.0, [&] { return "gamma must be in [0, 1], got " + std::to_string(gamma); });
    check.require(std::isfinite(lambda) && lambda >= 0.0 && lambda <= 1.0, [&] { return "lambda must be in [0, 1], got " + std::to_string(lambda); });
    if (tokens > 0) {
        check.pointer(rewards, "rewards");
        check.pointer(values, "values");
        check.pointer(advantages, "advantages");
        check.pointer(returns, "returns");
    }
    GSPO4J_ON_DEVICE(device, stream, gae, layout, rewards, values, mask, gamma, lambda, check_finite != 0, advantages, returns);
    GSPO4J_API_END()
}

}  // extern "C"
