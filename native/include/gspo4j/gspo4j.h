/*
 * gspo4j: the C contract between the kernels (CPU in native/, CUDA in cuda/) and every caller.
 *
 * Plain C ABI: raw pointers, 64-bit sizes, no libtorch or JNI types. The math is docs/math.md.
 *
 * Conventions shared by every function:
 * - Every function returns a gspo4j_status. On anything but GSPO4J_OK, gspo4j_last_error()
 *   returns a message for the calling thread; outputs may have been partly written.
 * - `device` says where every pointer of the call lives (all on the host, or all on one CUDA
 *   device). `stream` is a cudaStream_t for CUDA calls (NULL = the legacy default stream) and
 *   must be NULL on the CPU. A CUDA call is asynchronous: it returns once the work is queued,
 *   and data-dependent errors (a token id out of range, a non-finite value) are reported by a
 *   later call of gspo4j_cuda_check_error on the same stream.
 * - The token axis: a batch of `batch` responses, either padded (`offsets` NULL, `tokens` =
 *   batch * seq, response b holds tokens b*seq .. b*seq+seq-1) or packed (`offsets` holds
 *   batch+1 non-decreasing int64 values from 0, response b holds tokens offsets[b] ..
 *   offsets[b+1]-1, `tokens` = offsets[batch]). Every per-token array is contiguous over that
 *   axis (float32 unless said otherwise); a per-response array has `batch` entries.
 * - A mask is uint8 over the token axis (0 = ignored, anything else = counted); NULL counts
 *   every token.
 * - Logits rows are contiguous over the vocabulary; the outer strides (in elements, not bytes)
 *   let a view such as logits[:, :-1, :] be read in place. Row (b, t) starts at
 *   logits + b * stride_batch + t * stride_seq. For packed logits pass batch = 1, seq = N.
 * - Every sum is accumulated in float32 or wider, whatever the logits dtype. Every offset is
 *   64-bit. Results are bitwise reproducible for the same inputs on the same machine,
 *   whatever the number of threads.
 */
#ifndef GSPO4J_H
#define GSPO4J_H

#include <stdint.h>

#if defined(_WIN32)
#  define GSPO4J_API __declspec(dllexport)
#else
#  define GSPO4J_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum gspo4j_status {
    GSPO4J_OK = 0,
    GSPO4J_ERROR_INVALID_ARGUMENT = 1, /* a pointer, size, stride or option is wrong */
    GSPO4J_ERROR_OUT_OF_RANGE = 2,     /* a token id outside [0, vocab) or a bad offset */
    GSPO4J_ERROR_NON_FINITE = 3,       /* NaN or Inf in an input while checking is on */
    GSPO4J_ERROR_UNSUPPORTED = 4,      /* e.g. a CUDA call into a library built without CUDA */
    GSPO4J_ERROR_CUDA = 5,             /* a CUDA runtime error */
    GSPO4J_ERROR_INTERNAL = 6          /* anything else (out of memory, a bug) */
} gspo4j_status;

typedef enum gspo4j_device {
    GSPO4J_DEVICE_CPU = 0,
    GSPO4J_DEVICE_CUDA = 1
} gspo4j_device;

typedef enum gspo4j_dtype {
    GSPO4J_FLOAT32 = 0,
    GSPO4J_BFLOAT16 = 1,
    GSPO4J_FLOAT16 = 2
} gspo4j_dtype;

/* Which ratio the policy loss clips (docs/math.md, "Policy losses"). */
typedef enum gspo4j_ratio_level {
    GSPO4J_RATIO_TOKEN = 0,          /* GRPO / PPO: r = exp(lp - olp) per token */
    GSPO4J_RATIO_SEQUENCE = 1,       /* GSPO: s_b, one clip decision per response */
    GSPO4J_RATIO_SEQUENCE_TOKEN = 2  /* GSPO-token: sg(s_b) * exp(lp - sg(lp)) per token */
} gspo4j_ratio_level;

/* How a per-token quantity q is reduced to a scalar (docs/math.md, "Aggregation"). */
typedef enum gspo4j_aggregation {
    GSPO4J_SEQ_MEAN_TOKEN_MEAN = 0,     /* (1/B') sum_b (1/L_b) sum_t m q */
    GSPO4J_TOKEN_MEAN = 1,              /* sum m q / sum m */
    GSPO4J_SEQ_MEAN_TOKEN_SUM = 2,      /* (1/B') sum_b sum_t m q */
    GSPO4J_SEQ_MEAN_TOKEN_SUM_NORM = 3  /* sum m q / (B * Lnorm) */
} gspo4j_aggregation;

typedef enum gspo4j_kl_estimator {
    GSPO4J_KL_K1 = 0, /* -d */
    GSPO4J_KL_K2 = 1, /* d^2 / 2 */
    GSPO4J_KL_K3 = 2, /* exp(d) - d - 1 */
    GSPO4J_KL_K3_PLUS = 3,     /* the value of k3, the gradient of k2 (verl "k3+") */
    GSPO4J_KL_K3_UNBIASED = 4, /* r_t * k3 with r_t = exp(lp - olp), differentiated through both */
    GSPO4J_KL_ABS = 5,         /* |d| */
    GSPO4J_KL_LOW_VAR = 6      /* k3 clamped to [-10, 10], no gradient where clamped (verl's low_var_kl) */
} gspo4j_kl_estimator;

typedef enum gspo4j_advantage_mode {
    GSPO4J_ADVANTAGE_MEAN_STD = 0, /* (r - mean) / (std + eps), Bessel-corrected std */
    GSPO4J_ADVANTAGE_MEAN = 1,     /* r - mean */
    GSPO4J_ADVANTAGE_RLOO = 2,     /* r - mean of the other G-1 rewards */
    GSPO4J_ADVANTAGE_MEAN_BATCH_STD = 3 /* (r - group mean) / (std of every reward of the call + eps),
                                           Bessel-corrected (TRL's scale_rewards="batch") */
} gspo4j_advantage_mode;

/* The policy objective (docs/math.md "Further objectives"). x_t = clamp(lp - olp, -R, R), r_t = exp(x_t);
 * a per-token term q_t is aggregated with `aggregation`, a per-response term J_b is averaged over
 * the B' counted responses. */
typedef enum gspo4j_objective {
    GSPO4J_OBJECTIVE_CLIP = 0,     /* min(ratio A, clip(ratio) A): GSPO, GSPO-token, GRPO, PPO by ratio_level */
    GSPO4J_OBJECTIVE_CISPO = 1,    /* q = sg[clip(r)] A lp (ratio_level TOKEN, or SEQUENCE_TOKEN: s_b) */
    GSPO4J_OBJECTIVE_SAPO = 2,     /* q = (4/tau) sigmoid(tau (r - 1)) A (TOKEN, or SEQUENCE_TOKEN: s_b) */
    GSPO4J_OBJECTIVE_GMPO = 3,     /* J_b = exp((1/L_b) sum m l_t) A_b, l_t the log-space pessimistic clip */
    GSPO4J_OBJECTIVE_LUSPO = 4,    /* J_b = L_b min(s_b A_b, clip(s_b) A_b) */
    GSPO4J_OBJECTIVE_VESPO = 5,    /* q = sg[W^k exp(lambda (1 - W))] A lp, W = exp(clamp(sum m x, -R, R)) */
    GSPO4J_OBJECTIVE_DPPO_TV = 6,  /* q = keep_TV sg[min(r, C)] A lp */
    GSPO4J_OBJECTIVE_DPPO_KL = 7   /* q = keep_binaryKL sg[min(r, C)] A lp */
} gspo4j_objective;

/* Indices into the metrics array the policy loss writes (float32[GSPO4J_METRIC_COUNT]). */
typedef enum gspo4j_metric {
    GSPO4J_METRIC_POLICY_LOSS = 0,     /* the surrogate part of the loss */
    GSPO4J_METRIC_KL = 1,              /* the aggregated KL term, before its coefficient */
    GSPO4J_METRIC_ENTROPY = 2,         /* the aggregated entropy, before its coefficient */
    GSPO4J_METRIC_CLIP_FRACTION_LOW = 3,  /* ratio < 1-eps_low with A < 0 (clip active) */
    GSPO4J_METRIC_CLIP_FRACTION_HIGH = 4, /* ratio > 1+eps_high with A > 0 (clip active) */
    GSPO4J_METRIC_DUAL_CLIP_FRACTION = 5, /* A < 0 and ratio > dual_clip */
    GSPO4J_METRIC_RATIO_MEAN = 6,
    GSPO4J_METRIC_RATIO_MIN = 7,
    GSPO4J_METRIC_RATIO_MAX = 8,
    GSPO4J_METRIC_APPROX_KL = 9,       /* token mean of olp - lp */
    GSPO4J_METRIC_ENTROPY_MEAN = 10,   /* token mean of H, 0 when no entropy is given */
    GSPO4J_METRIC_SEQUENCES = 11,      /* responses with L_b > 0 */
    GSPO4J_METRIC_TOKENS = 12,         /* tokens with m = 1 */
    /* Rollout correction (0 without rollout_logprob and its options), over counted tokens: */
    GSPO4J_METRIC_ROLLOUT_WEIGHT_MEAN = 13,     /* token mean of w (IS weight x rejection x off-policy mask) */
    GSPO4J_METRIC_ROLLOUT_MASKED_FRACTION = 14, /* fraction of counted tokens with w = 0 */
    GSPO4J_METRIC_ROLLOUT_SEQ_MASKED_FRACTION = 15, /* fraction of counted responses whose every w is 0 */
    GSPO4J_METRIC_ROLLOUT_KL = 16,     /* token mean of mu - olp (k1 of the mismatch); needs rollout_logprob */
    GSPO4J_METRIC_ROLLOUT_K3_KL = 17,  /* token mean of exp(olp - mu) - (olp - mu) - 1, unclamped */
    GSPO4J_METRIC_ENTROPY_KEPT_FRACTION = 18, /* top-entropy selection: fraction of counted tokens kept (1 without) */
    GSPO4J_METRIC_COUNT = 19
} gspo4j_metric;
/* Clip fractions count one decision per response for GSPO and LUSPO and one per counted token
 * otherwise (GMPO: tokens its log-space clip cut; CISPO: weights cut by either bound; DPPO:
 * dropped tokens, A > 0 as high and A <= 0 as low; SAPO and VESPO: none). Ratio statistics are
 * per response for GSPO, GSPO-token, LUSPO and the sequence variants of CISPO and SAPO (s_b), GMPO
 * (exp of the mean clipped log-ratio) and VESPO (W_b), and per counted token (r_t) otherwise. */

/* Rollout correction (docs/math.md "Training-inference mismatch"): the weight w of each counted
 * token's policy term compares the old policy olp (sg(lp) on-policy) with the inference engine's
 * log-probs mu (rollout_logprob). Levels of the importance weight rho: */
typedef enum gspo4j_rollout_level {
    GSPO4J_ROLLOUT_OFF = 0,        /* no IS weight (rejection and the off-policy mask may still apply) */
    GSPO4J_ROLLOUT_TOKEN = 1,      /* rho_t = exp(clamp(olp_t - mu_t, -R, R)) */
    GSPO4J_ROLLOUT_SEQUENCE = 2,   /* rho_b = exp(clamp(sum_t m (olp - mu), -R, R)) */
    GSPO4J_ROLLOUT_GEOMETRIC = 3   /* rho_b = exp(clamp((1/L_b) sum_t m (olp - mu), -R, R)) */
} gspo4j_rollout_level;

typedef enum gspo4j_rollout_mode {
    GSPO4J_ROLLOUT_TRUNCATE = 0,   /* w = clamp(rho, C_min, C_max) (TIS) */
    GSPO4J_ROLLOUT_MASK = 1        /* w = rho inside [C_min, C_max], else 0 (MIS, IcePop's band) */
} gspo4j_rollout_mode;

/* The divergence of olp against mu that rejection sampling bounds (verl's rollout_rs). */
typedef enum gspo4j_divergence {
    GSPO4J_DIVERGENCE_NONE = 0,
    GSPO4J_DIVERGENCE_K1 = 1,      /* olp - mu (signed: rejected outside [low, high]) */
    GSPO4J_DIVERGENCE_K2 = 2,      /* (olp - mu)^2 / 2 (rejected above high) */
    GSPO4J_DIVERGENCE_K3 = 3       /* exp(mu - olp) - (mu - olp) - 1 (rejected above high) */
} gspo4j_divergence;

/* Where rejection applies: each token on its own, or a response by the mean, sum or max of the
 * divergence over its counted tokens. */
typedef enum gspo4j_rejection_scope {
    GSPO4J_REJECT_TOKEN = 0,
    GSPO4J_REJECT_MEAN = 1,
    GSPO4J_REJECT_SUM = 2,
    GSPO4J_REJECT_MAX = 3
} gspo4j_rejection_scope;

typedef struct gspo4j_loss_config {
    int32_t ratio_level;      /* gspo4j_ratio_level */
    int32_t aggregation;      /* gspo4j_aggregation (per-token terms; GSPO's surrogate is
                                 always the mean over responses) */
    int32_t kl_estimator;     /* gspo4j_kl_estimator */
    int32_t check_finite;     /* non-zero: NaN/Inf in a counted input is an error */
    double eps_low;           /* clip(x) = min(max(x, 1-eps_low), 1+eps_high) */
    double eps_high;
    double dual_clip;         /* c > 1 enables dual clip for A < 0; 0 disables */
    double log_ratio_clamp;   /* R > 0: log-ratios are clamped to [-R, R] before exp */
    double normalizer;        /* > 0: replaces the local denominator (B', sum m or B) by a
                                 global count, for data-parallel ranks or accumulation */
    double length_norm;       /* Lnorm of SEQ_MEAN_TOKEN_SUM_NORM; <= 0: seq (padded) or
                                 the longest response (packed) */
    double kl_coef;           /* beta; 0 disables the KL term */
    double entropy_coef;      /* c_H; 0 disables the entropy term */
    int32_t objective;        /* gspo4j_objective; CISPO and SAPO take ratio_level TOKEN or
                                 SEQUENCE_TOKEN, GMPO and LUSPO SEQUENCE, VESPO and DPPO TOKEN */
    int32_t reserved;         /* 0 */
    double sapo_tau_pos;      /* SAPO's temperature for A > 0 (> 0) */
    double sapo_tau_neg;      /* SAPO's temperature for A <= 0 (> 0) */
    double vespo_k_pos;       /* VESPO's phi for A >= 0: W^k exp(lambda (1 - W)) */
    double vespo_lambda_pos;
    double vespo_k_neg;       /* ... and for A < 0 */
    double vespo_lambda_neg;
    double dppo_delta_low;    /* DPPO's divergence bounds (TV: p - p_old; KL: the binary KL) */
    double dppo_delta_high;
    double dppo_ratio_cap;    /* DPPO's C: the weight is sg[min(r, C)] */
    /* The counts of a whole step when it is split over data-parallel ranks (or micro-batches), each
     * > 0 replacing this call's own and taking precedence over `normalizer`; 0: this call's. With
     * them the calls' losses add up to the step's loss (SPEC.md "Data-parallel equivalence"). */
    double responses_total;   /* B' of every mean over responses (GSPO's, LUSPO's, GMPO's J_b; SEQ_MEAN_*) */
    double tokens_total;      /* the counted tokens of TOKEN_MEAN */
    double batch_total;       /* B of SEQ_MEAN_TOKEN_SUM_NORM (Lnorm: length_norm) */
    /* Rollout correction, all off by default; the IS weight and rejection need rollout_logprob.
     * w carries no gradient and multiplies only the policy term; a sequence objective's J_b is
     * multiplied by the mean of w over the response's counted tokens. */
    int32_t rollout_level;    /* gspo4j_rollout_level */
    int32_t rollout_mode;     /* gspo4j_rollout_mode */
    double rollout_c_min;     /* the band's lower bound C_min; 0: none */
    double rollout_c_max;     /* the band's upper bound C_max; 0: none (else >= C_min) */
    int32_t rejection_divergence; /* gspo4j_divergence; NONE: no rejection */
    int32_t rejection_scope;  /* gspo4j_rejection_scope */
    double rejection_low;     /* K1 only: the lower bound (rejected below) */
    double rejection_high;    /* K1: the upper bound (>= low); K2, K3: the threshold (> 0) */
    int32_t off_policy_mask;  /* non-zero: w = 0 for a response with A_b < 0 and
                                 (1/L_b) sum_t m (beh - sg(lp)) > off_policy_delta, beh = mu or olp */
    int32_t reserved2;        /* 0 */
    double off_policy_delta;
} gspo4j_loss_config;

/* Thread-local message of the last failed call on this thread ("" if none). */
GSPO4J_API const char* gspo4j_last_error(void);
/* The library's version, e.g. "0.1.0" (the Maven project's version; the Java layer requires its
 * own). */
GSPO4J_API const char* gspo4j_version(void);
/* Number of CUDA devices usable by this build (0 when built without CUDA or no driver). */
GSPO4J_API int32_t gspo4j_cuda_device_count(void);
/* The CUDA runtime version this library was built with and links statically (1000 * major +
 * 10 * minor, e.g. 13000 for 13.0), 0 when it was built without the CUDA kernels. */
GSPO4J_API int32_t gspo4j_cuda_runtime_version(void);
/* CPU worker threads (default: the CPUs in this process's affinity mask; the Java layer sets its
 * own default before its first kernel call). Workers start on the first call that needs them.
 * Results do not depend on the count. */
GSPO4J_API gspo4j_status gspo4j_set_num_threads(int32_t threads);
GSPO4J_API int32_t gspo4j_get_num_threads(void);
/* Name of the CPU instruction set the kernels dispatched to: "avx512", "avx2" or "sse2". */
GSPO4J_API const char* gspo4j_cpu_isa(void);
/* Waits for `stream` and reports the data-dependent errors (token ids, offsets, NaN/Inf) that
 * earlier asynchronous CUDA calls recorded, then clears them. The record is per device: an error
 * of a call on another stream of the same device is reported (once) too. */
GSPO4J_API gspo4j_status gspo4j_cuda_check_error(void* stream);
/* The same check without a wait: queues on `stream` a copy of the record (what the calls queued
 * before it found) into pinned host memory, clears the record, and returns at once with a ticket
 * in *ticket (0 when no kernel of this library ran on the device yet: nothing to check).
 * gspo4j_cuda_resolve_error_check(ticket) later waits for that copy only (an event, not the
 * stream's later work) and reports its first error as gspo4j_cuda_check_error would. Every ticket
 * must be resolved once; resolving spends it, with or without an error. Resolving 0 is OK. */
GSPO4J_API gspo4j_status gspo4j_cuda_defer_error_check(void* stream, int64_t* ticket);
GSPO4J_API gspo4j_status gspo4j_cuda_resolve_error_check(int64_t ticket);

/* docs/math.md's paper defaults: GSPO, sequence mean, eps 3e-4 / 4e-4, R = 20, KL and entropy off,
 * checking on; the other objectives' parameters at their anchors' defaults (SAPO tau 1 / 1.05,
 * VESPO (k, lambda) = (2, 3) / (3, 2), DPPO delta 0.15 / 0.15 and C = 20). */
GSPO4J_API gspo4j_status gspo4j_loss_config_init(gspo4j_loss_config* config);

/*
 * Per-token log-probs, one read of the logits.
 * logits: [batch, seq, vocab] of `dtype` with the given outer strides.
 * targets: int64[batch * seq], each in [0, vocab).
 * Writes logprob[r] = z_y/tau - lse, lse[r] (float64: the backward rebuilds p from it without
 * losing the target's precision) and, when entropy != NULL, entropy[r] = H, r = b*seq + t.
 *
 * Logit values (CPU and CUDA alike):
 * - -Inf (a banned or padded vocabulary entry) is a value: p = 0, no share of lse or H, and a
 *   gradient of exactly 0 in its column.
 * - A target whose logit is -Inf gets lp = -Inf (exact: the token has probability 0), with lse
 *   and H finite, and the backward gives it dz_y = g_lp / tau (d lp / d z_y = 1 - p_y = 1).
 *   gspo4j_policy_loss and gspo4j_sequence_log_ratio reject such a counted token with checking
 *   on (GSPO4J_ERROR_NON_FINITE naming logprob[i]); with checking off its log-ratio is clamped
 *   to -R (no gradient through it) and the approx-KL metric is +Inf. An uncounted one
 *   (m = 0) is harmless.
 * - NaN, +Inf, and a row with no finite entry (all -Inf) are GSPO4J_ERROR_NON_FINITE with
 *   check_finite. With it off, a row with NaN or +Inf gives NaN lse, lp and H, and a row of
 *   only -Inf gives lse = -Inf and NaN lp and H (and a NaN gradient row from the backward).
 * Precision: the max M of the raw z is subtracted before the division by tau, and the terms at
 * the max are summed apart from the others, so lp, lse and H keep float32 relative precision
 * at any temperature, for |z| up to 1e30 and as p_y -> 1 (lp of -1e-15 to a few ulps).
 */
GSPO4J_API gspo4j_status gspo4j_token_logprob_forward(
    int32_t device, void* stream,
    const void* logits, int32_t dtype, int64_t batch, int64_t seq, int64_t vocab,
    int64_t stride_batch, int64_t stride_seq,
    const int64_t* targets, double temperature, int32_t check_finite,
    float* logprob, double* lse, float* entropy);

/*
 * Gradient of the logits from per-token g_lp = dLoss/dlp and g_H = dLoss/dH (NULL: zero):
 *   dz_v = (g_lp * (1[v==y] - p_v) - g_H * p_v * (log p_v + H)) / tau,
 * one read of the logits row, one write of the gradient row in `dtype`. `lse` and `entropy`
 * are the forward's outputs (`entropy` is needed only when grad_entropy != NULL). grad_logits
 * has its own outer strides and may be the logits themselves (same strides) to work in place.
 * -Inf logits get exactly 0 (see the forward). p is rebuilt from lse as
 * exp((z_v - tau * lse) / tau), so its precision is bounded by float64's resolution of lse:
 * float32 relative precision while |max z / tau| < ~1e9, a relative error of about
 * |max z / tau| * 2^-52 beyond; a row whose unique max holds all the mass stays exact.
 */
GSPO4J_API gspo4j_status gspo4j_token_logprob_backward(
    int32_t device, void* stream,
    const void* logits, int32_t dtype, int64_t batch, int64_t seq, int64_t vocab,
    int64_t stride_batch, int64_t stride_seq,
    const int64_t* targets, double temperature,
    const double* lse, const float* entropy,
    const float* grad_logprob, const float* grad_entropy,
    void* grad_logits, int64_t grad_stride_batch, int64_t grad_stride_seq);

/*
 * Per-response mean log-ratio: log_ratio[b] = (1/L_b) sum_t m (lp - olp), 0 when L_b = 0;
 * old_logprob NULL means on-policy (olp = sg(lp)): log_ratio is exactly 0, NaN lp included.
 * lengths (nullable) receives L_b.
 * No clamp is applied here.
 */
GSPO4J_API gspo4j_status gspo4j_sequence_log_ratio(
    int32_t device, void* stream,
    int64_t batch, int64_t seq, int64_t tokens, const int64_t* offsets,
    const float* logprob, const float* old_logprob, const uint8_t* mask,
    int32_t check_finite, float* log_ratio, float* lengths);

/*
 * The policy loss of `config` and its per-token coefficients.
 * logprob: the forward's log-probs. old_logprob: NULL for on-policy. ref_logprob: needed when
 * kl_coef != 0. entropy: needed when entropy_coef != 0, optional otherwise (for the metric).
 * advantages: per response [batch] (advantages_per_token = 0) or per token.
 * Writes loss[0], grad_logprob[tokens] = dLoss/dlp, grad_entropy[tokens] = dLoss/dH (nullable;
 * all zero when entropy_coef = 0) and metrics[GSPO4J_METRIC_COUNT] (nullable).
 * rollout_logprob (nullable): the inference engine's log-probs mu of the sampled tokens, for the
 * rollout correction of config (needed by rollout_level and rejection_divergence) and the mismatch
 * metrics. entropy_threshold (nullable; one double, in device memory on CUDA, as
 * gspo4j_entropy_threshold writes it): top-entropy selection, only counted tokens with
 * entropy >= *entropy_threshold keep their policy term (needs entropy); the denominators still
 * count every counted token, and a sequence objective's J_b is multiplied by the mean over the
 * response of w times the kept indicator.
 */
GSPO4J_API gspo4j_status gspo4j_policy_loss(
    int32_t device, void* stream, const gspo4j_loss_config* config,
    int64_t batch, int64_t seq, int64_t tokens, const int64_t* offsets,
    const float* logprob, const float* old_logprob, const float* rollout_logprob,
    const uint8_t* mask, const float* advantages, int32_t advantages_per_token,
    const float* ref_logprob, const float* entropy, const double* entropy_threshold,
    float* loss, float* grad_logprob, float* grad_entropy, float* metrics);

/*
 * Top-entropy selection's threshold (docs/math.md "Token selection"): the (1 - rho) quantile of
 * the counted tokens' entropies (float32[tokens]; mask NULL counts every token), numpy.quantile's
 * default linear method in float64: sorted values v of the n counted tokens, position
 * p = (n - 1)(1 - rho), k = floor(p), t = p - k, and v[k] + t (v[k+1] - v[k]) (from the upper
 * end, v[k+1] - (1 - t)(v[k+1] - v[k]), when t >= 0.5; v[n-1] when k = n - 1). -0 sorts before
 * +0. Writes one double to *threshold (device memory on CUDA, where it stays: the result feeds
 * gspo4j_policy_loss's entropy_threshold without a host sync). No counted token: +Inf (nothing
 * kept). A NaN or Inf at a counted token is an error with check_finite; without it a NaN gives a
 * NaN threshold (nothing kept), as numpy gives NaN. rho in (0, 1].
 */
GSPO4J_API gspo4j_status gspo4j_entropy_threshold(
    int32_t device, void* stream,
    int64_t tokens, const float* entropy, const uint8_t* mask,
    double rho, int32_t check_finite, double* threshold);

/*
 * Group-relative advantages of outcome rewards (float32[count]).
 * Groups are contiguous runs of group_size responses (group_ids NULL; group_size must divide
 * count) or the responses sharing a value of group_ids (int64[count]; group_size ignored).
 * A group whose rewards are all equal gets exactly 0; a group of one gets 0 for MEAN_STD, MEAN and
 * MEAN_BATCH_STD and is an error for RLOO. eps: MEAN_STD's and MEAN_BATCH_STD's denominator guard
 * (default 1e-6). MEAN_BATCH_STD divides by the std of all `count` rewards of the call.
 */
GSPO4J_API gspo4j_status gspo4j_group_advantages(
    int32_t device, void* stream,
    int64_t count, const float* rewards, int64_t group_size, const int64_t* group_ids,
    int32_t mode, double eps, int32_t check_finite, float* advantages);

/*
 * Generalised advantage estimation over each response's counted tokens, in order:
 *   delta_t = r_t + gamma * V_next - V_t,  A_t = delta_t + gamma * lambda * A_next,
 * where "next" is the response's next counted token (V and A zero past the last one).
 * Tokens with m = 0 are skipped and get advantage 0 and return 0; returns = A + V.
 */
GSPO4J_API gspo4j_status gspo4j_gae(
    int32_t device, void* stream,
    int64_t batch, int64_t seq, int64_t tokens, const int64_t* offsets,
    const float* rewards, const float* values, const uint8_t* mask,
    double gamma, double lambda, int32_t check_finite,
    float* advantages, float* returns);

#ifdef __cplusplus
}
#endif

#endif /* GSPO4J_H */
