package dev.gspo4j.internal;

import dev.gspo4j.AdvantageMode;
import dev.gspo4j.Gspo4jException;
import org.bytedeco.javacpp.BytePointer;
import org.bytedeco.javacpp.DoublePointer;
import org.bytedeco.javacpp.FloatPointer;
import org.bytedeco.javacpp.LongPointer;
import org.bytedeco.javacpp.Pointer;

/**
 * The checked entry to the native kernels; internal to gspo4j (the loss modules call it).
 *
 * <p>Each method checks what it can without reading the data (null pointers, sizes, the capacity
 * of JavaCPP-allocated buffers, options) and throws {@link IllegalArgumentException} before any
 * native code runs; the native code then checks the data (token ids, offsets, finiteness) and a
 * failure there becomes a {@link Gspo4jException} carrying its message. Per-token arrays are
 * float32 and contiguous over the {@link TokenLayout}; masks are uint8. Every method is
 * thread-safe: calls on different buffers may run concurrently.
 */
public final class Kernels {
    private Kernels() {}

    public static String version() {
        return Gspo4jLibrary.gspo4j_version().getString();
    }

    /** The instruction set the CPU kernels dispatched to: "avx512", "avx2" or "sse2". */
    public static String cpuIsa() {
        return Gspo4jLibrary.gspo4j_cpu_isa().getString();
    }

    public static int cudaDeviceCount() {
        return Gspo4jLibrary.gspo4j_cuda_device_count();
    }

    /**
     * The CUDA runtime version the native library was built with (1000 * major + 10 * minor), 0
     * when it was built without its CUDA kernels.
     */
    public static int cudaRuntimeVersion() {
        return Gspo4jLibrary.gspo4j_cuda_runtime_version();
    }

    /** The system property that replaces the default thread count (see {@link #defaultThreads}). */
    public static final String THREADS_PROPERTY = "gspo4j.threads";
    /** The largest thread count (the C header's limit). */
    public static final int MAX_THREADS = 1024;

    public static int numThreads() {
        return Gspo4jLibrary.gspo4j_get_num_threads();
    }

    /** CPU worker threads for the kernels; results do not depend on it. */
    public static void setNumThreads(int threads) {
        if (threads < 1 || threads > MAX_THREADS) {
            throw new IllegalArgumentException("threads must be in [1, " + MAX_THREADS + "], got " + threads);
        }
        check(Gspo4jLibrary.gspo4j_set_num_threads(threads));
    }

    /**
     * The pool's default: {@code gspo4j.threads} when set, else the smaller of the JVM's available
     * processors (cgroup quotas and affinity included) and libtorch's intra-op thread count, so
     * gspo4j's workers and libtorch's OpenMP threads do not oversubscribe the CPUs between them.
     *
     * @throws IllegalArgumentException when the property is set but not an integer in [1, 1024]
     */
    public static int defaultThreads() {
        final String property = System.getProperty(THREADS_PROPERTY);
        if (property != null) {
            final int threads;
            try {
                threads = Integer.parseInt(property.trim());
            } catch (NumberFormatException e) {
                throw threadsPropertyError(property);
            }
            if (threads < 1 || threads > MAX_THREADS) {
                throw threadsPropertyError(property);
            }
            return threads;
        }
        final int processors = Runtime.getRuntime().availableProcessors();
        return Math.max(1, Math.min(Math.min(processors, torchThreads()), MAX_THREADS));
    }

    private static IllegalArgumentException threadsPropertyError(String value) {
        return new IllegalArgumentException("the system property " + THREADS_PROPERTY + " must be an integer in [1, " + MAX_THREADS
                + "] (the CPU kernels' thread count), got \"" + value + "\"; remove it for the default (min of the available "
                + "processors and torch.get_num_threads()) or call Gspo4j.setThreads");
    }

    // libtorch's intra-op thread count; the JVM's processor count when libtorch is not loadable
    // (the kernels need no libtorch themselves).
    private static int torchThreads() {
        try {
            return org.bytedeco.pytorch.global.torch.get_num_threads();
        } catch (LinkageError e) {
            return Integer.MAX_VALUE;
        }
    }

    /**
     * Per-token log-probs {@code lp = z_y/tau - logsumexp(z/tau)}, the log-sum-exp, and optionally
     * the entropy, reading each logits row once.
     *
     * @param targets int64 {@code [rows]} token ids in [0, vocab)
     * @param logprob float32 {@code [rows]} output
     * @param lse float64 {@code [rows]} output, needed by the backward
     * @param entropy float32 {@code [rows]} output, or null
     */
    public static void tokenLogProbForward(Device device, Pointer stream, LogitsView logits, LongPointer targets,
            double temperature, boolean checkFinite, FloatPointer logprob, DoublePointer lse, FloatPointer entropy) {
        checkDevice(device, stream);
        checkTemperature(temperature);
        final long rows = logits.rows();
        if (rows > 0) {
            Checks.capacityBytes(logits.data(), logits.extent() * logits.dtype().bytes(), "logits");
            Checks.capacity(targets, rows, "targets");
            Checks.capacity(logprob, rows, "logprob");
            Checks.capacity(lse, rows, "lse");
            Checks.optionalCapacity(entropy, rows, "entropy");
        }
        check(Gspo4jLibrary.gspo4j_token_logprob_forward(device.code, stream, logits.data(), logits.dtype().code,
                logits.batch(), logits.seq(), logits.vocab(), logits.strideBatch(), logits.strideSeq(), targets,
                temperature, checkFinite ? 1 : 0, logprob, lse, entropy));
    }

    /**
     * The gradient of the logits from per-token {@code dLoss/dlp} and {@code dLoss/dH}, written in
     * the logits' dtype: one read of the logits, one write of the gradient.
     *
     * @param lse float64 {@code [rows]} from the forward
     * @param entropy float32 {@code [rows]} from the forward; needed when gradEntropy is given
     * @param gradLogprob float32 {@code [rows]}
     * @param gradEntropy float32 {@code [rows]} or null (zero)
     * @param gradLogits output rows at the given strides, in the logits' dtype; may be
     *     {@code logits.data()} itself (same strides) to overwrite the logits in place
     */
    public static void tokenLogProbBackward(Device device, Pointer stream, LogitsView logits, LongPointer targets,
            double temperature, DoublePointer lse, FloatPointer entropy, FloatPointer gradLogprob,
            FloatPointer gradEntropy, Pointer gradLogits, long gradStrideBatch, long gradStrideSeq) {
        checkDevice(device, stream);
        checkTemperature(temperature);
        Checks.nonNegative(gradStrideBatch, "gradStrideBatch");
        Checks.nonNegative(gradStrideSeq, "gradStrideSeq");
        final long rows = logits.rows();
        if (rows > 0) {
            Checks.capacityBytes(logits.data(), logits.extent() * logits.dtype().bytes(), "logits");
            Checks.capacity(targets, rows, "targets");
            Checks.capacity(lse, rows, "lse");
            Checks.capacity(gradLogprob, rows, "gradLogprob");
            if (gradEntropy != null) {
                Checks.capacity(gradEntropy, rows, "gradEntropy");
                Checks.capacity(entropy, rows, "entropy (needed with gradEntropy)");
            }
            final long gradExtent = Math.addExact(Math.addExact(Math.multiplyExact(logits.batch() - 1, gradStrideBatch),
                    Math.multiplyExact(logits.seq() - 1, gradStrideSeq)), logits.vocab());
            Checks.capacityBytes(gradLogits, gradExtent * logits.dtype().bytes(), "gradLogits");
        }
        check(Gspo4jLibrary.gspo4j_token_logprob_backward(device.code, stream, logits.data(), logits.dtype().code,
                logits.batch(), logits.seq(), logits.vocab(), logits.strideBatch(), logits.strideSeq(), targets,
                temperature, lse, entropy, gradLogprob, gradEntropy, gradLogits, gradStrideBatch, gradStrideSeq));
    }

    /**
     * Per-response mean log-ratio {@code (1/L_b) sum_t m (lp - olp)}, 0 for an empty response.
     *
     * @param oldLogprob float32 {@code [tokens]} or null (on-policy)
     * @param mask uint8 {@code [tokens]} or null (all counted)
     * @param logRatio float32 {@code [batch]} output
     * @param lengths float32 {@code [batch]} output (L_b), or null
     */
    public static void sequenceLogRatio(Device device, Pointer stream, TokenLayout layout, FloatPointer logprob,
            FloatPointer oldLogprob, BytePointer mask, boolean checkFinite, FloatPointer logRatio, FloatPointer lengths) {
        checkDevice(device, stream);
        Checks.notNull(layout, "layout");
        final long tokens = layout.tokens();
        if (tokens > 0) {
            Checks.capacity(logprob, tokens, "logprob");
        }
        Checks.optionalCapacity(oldLogprob, tokens, "oldLogprob");
        Checks.optionalCapacity(mask, tokens, "mask");
        if (layout.batch() > 0) {
            Checks.capacity(logRatio, layout.batch(), "logRatio");
        }
        Checks.optionalCapacity(lengths, layout.batch(), "lengths");
        check(Gspo4jLibrary.gspo4j_sequence_log_ratio(device.code, stream, layout.batch(), layout.seq(), tokens,
                layout.offsets(), logprob, oldLogprob, mask, checkFinite ? 1 : 0, logRatio, lengths));
    }

    /**
     * The policy loss and its per-token coefficients.
     *
     * @param oldLogprob float32 {@code [tokens]} or null (on-policy)
     * @param mask uint8 {@code [tokens]} or null
     * @param advantages float32 {@code [batch]}, or {@code [tokens]} when advantagesPerToken
     * @param refLogprob float32 {@code [tokens]}, needed when the KL coefficient is not 0
     * @param entropy float32 {@code [tokens]}, needed when the entropy coefficient is not 0
     * @param loss float32 {@code [1]} output
     * @param gradLogprob float32 {@code [tokens]} output: dLoss/dlp
     * @param gradEntropy float32 {@code [tokens]} output: dLoss/dH, or null
     * @param metrics float32 {@code [Metric.COUNT]} output, or null
     */
    public static void policyLoss(Device device, Pointer stream, LossSettings settings, TokenLayout layout,
            FloatPointer logprob, FloatPointer oldLogprob, BytePointer mask, FloatPointer advantages,
            boolean advantagesPerToken, FloatPointer refLogprob, FloatPointer entropy, FloatPointer loss,
            FloatPointer gradLogprob, FloatPointer gradEntropy, FloatPointer metrics) {
        policyLoss(device, stream, settings, StepTotals.NONE, layout, logprob, oldLogprob, null, mask, advantages,
                advantagesPerToken, refLogprob, entropy, null, loss, gradLogprob, gradEntropy, metrics);
    }

    /**
     * {@link #policyLoss(Device, Pointer, LossSettings, TokenLayout, FloatPointer, FloatPointer, BytePointer,
     * FloatPointer, boolean, FloatPointer, FloatPointer, FloatPointer, FloatPointer, FloatPointer, FloatPointer)}
     * with the counts of a whole step replacing this call's own denominators, and the token weights'
     * inputs.
     *
     * @param rolloutLogprob float32 {@code [tokens]}: the inference engine's log-probs mu, or null;
     *     needed by the settings' importance weight and rejection
     * @param entropyThreshold one float64 on the tensors' device: top-entropy selection keeps the
     *     counted tokens with {@code H >= *entropyThreshold}; null: no selection
     */
    public static void policyLoss(Device device, Pointer stream, LossSettings settings, StepTotals totals, TokenLayout layout,
            FloatPointer logprob, FloatPointer oldLogprob, FloatPointer rolloutLogprob, BytePointer mask, FloatPointer advantages,
            boolean advantagesPerToken, FloatPointer refLogprob, FloatPointer entropy, DoublePointer entropyThreshold,
            FloatPointer loss, FloatPointer gradLogprob, FloatPointer gradEntropy, FloatPointer metrics) {
        checkDevice(device, stream);
        Checks.notNull(settings, "settings");
        Checks.notNull(totals, "totals");
        Checks.notNull(layout, "layout");
        if (settings.ratioLevel() == RatioLevel.SEQUENCE && advantagesPerToken) {
            throw new IllegalArgumentException(
                    settings.objective().objective().label() + "'s sequence term needs one advantage per response; use GSPO-token for "
                            + "per-token advantages");
        }
        final long tokens = layout.tokens();
        Checks.capacity(loss, 1, "loss");
        if (tokens > 0) {
            Checks.capacity(logprob, tokens, "logprob");
            Checks.capacity(gradLogprob, tokens, "gradLogprob");
            Checks.capacity(advantages, advantagesPerToken ? tokens : layout.batch(), "advantages");
            if (settings.klCoef() != 0) {
                Checks.capacity(refLogprob, tokens, "refLogprob (needed when the KL coefficient is not 0)");
            }
            if (settings.entropyCoef() != 0) {
                Checks.capacity(entropy, tokens, "entropy (needed when the entropy coefficient is not 0)");
            }
        }
        final TokenWeights weights = settings.weights();
        if (tokens > 0 && weights.needsRolloutLogProbs()) {
            Checks.capacity(rolloutLogprob, tokens, "rolloutLogprob (needed by the rollout importance weight and rejection)");
        }
        if (weights.offPolicyMask() && advantagesPerToken) {
            throw new IllegalArgumentException("the off-policy mask drops responses with A_b < 0: it needs one advantage per "
                    + "response, not per token");
        }
        if (tokens > 0 && entropyThreshold != null) {
            Checks.capacity(entropy, tokens, "entropy (needed with an entropy threshold)");
        }
        Checks.optionalCapacity(rolloutLogprob, tokens, "rolloutLogprob");
        Checks.optionalCapacity(entropyThreshold, 1, "entropyThreshold");
        Checks.optionalCapacity(oldLogprob, tokens, "oldLogprob");
        Checks.optionalCapacity(mask, tokens, "mask");
        Checks.optionalCapacity(refLogprob, tokens, "refLogprob");
        Checks.optionalCapacity(entropy, tokens, "entropy");
        Checks.optionalCapacity(gradEntropy, tokens, "gradEntropy");
        Checks.optionalCapacity(metrics, Metric.COUNT, "metrics");
        try (Gspo4jLibrary.LossConfig config = new Gspo4jLibrary.LossConfig()) {
            config.ratio_level(settings.ratioLevel().code)
                    .aggregation(settings.aggregation().code())
                    .kl_estimator(settings.klEstimator().code())
                    .check_finite(settings.checkFinite() ? 1 : 0)
                    .eps_low(settings.epsLow())
                    .eps_high(settings.epsHigh())
                    .dual_clip(settings.dualClip())
                    .log_ratio_clamp(settings.logRatioClamp())
                    .normalizer(settings.normalizer())
                    .length_norm(settings.lengthNorm())
                    .kl_coef(settings.klCoef())
                    .entropy_coef(settings.entropyCoef());
            final ObjectiveParams objective = settings.objective();
            config.objective(objective.objective().code)
                    .sapo_tau_pos(objective.sapoTauPos())
                    .sapo_tau_neg(objective.sapoTauNeg())
                    .vespo_k_pos(objective.vespoKPos())
                    .vespo_lambda_pos(objective.vespoLambdaPos())
                    .vespo_k_neg(objective.vespoKNeg())
                    .vespo_lambda_neg(objective.vespoLambdaNeg())
                    .dppo_delta_low(objective.dppoDeltaLow())
                    .dppo_delta_high(objective.dppoDeltaHigh())
                    .dppo_ratio_cap(objective.dppoRatioCap());
            config.responses_total(totals.responses())
                    .tokens_total(totals.tokens())
                    .batch_total(totals.batch());
            config.rollout_level(weights.level() == null ? 0 : weights.level().code())
                    .rollout_mode(weights.mode().code())
                    .rollout_c_min(weights.cMin())
                    .rollout_c_max(weights.cMax() == Double.POSITIVE_INFINITY ? 0 : weights.cMax())
                    .rejection_divergence(weights.divergence() == null ? 0 : weights.divergence().code())
                    .rejection_scope(weights.scope().code())
                    .rejection_low(weights.low())
                    .rejection_high(weights.high())
                    .off_policy_mask(weights.offPolicyMask() ? 1 : 0)
                    .off_policy_delta(weights.offPolicyDelta());
            check(Gspo4jLibrary.gspo4j_policy_loss(device.code, stream, config, layout.batch(), layout.seq(), tokens,
                    layout.offsets(), logprob, oldLogprob, rolloutLogprob, mask, advantages, advantagesPerToken ? 1 : 0,
                    refLogprob, entropy, entropyThreshold, loss, gradLogprob, gradEntropy, metrics));
        }
    }

    /**
     * Top-entropy selection's threshold: the {@code 1 - rho} quantile (numpy's linear method, in
     * float64) of the counted tokens' entropies, written to {@code threshold} on the device.
     *
     * @param tokens the number of tokens
     * @param entropy float32 {@code [tokens]}
     * @param mask uint8 {@code [tokens]} or null (every token counts)
     * @param rho the kept fraction, in (0, 1]
     * @param checkFinite whether NaN/Inf at a counted token is an error
     * @param threshold float64 {@code [1]} output (+Infinity when no token counts)
     */
    public static void entropyThreshold(Device device, Pointer stream, long tokens, FloatPointer entropy, BytePointer mask,
            double rho, boolean checkFinite, DoublePointer threshold) {
        checkDevice(device, stream);
        Checks.nonNegative(tokens, "tokens");
        if (!(rho > 0 && rho <= 1)) {
            throw new IllegalArgumentException("rho must be in (0, 1], got " + rho);
        }
        Checks.capacity(entropy, tokens, "entropy");
        Checks.optionalCapacity(mask, tokens, "mask");
        Checks.capacity(threshold, 1, "threshold");
        check(Gspo4jLibrary.gspo4j_entropy_threshold(device.code, stream, tokens, entropy, mask, rho, checkFinite ? 1 : 0,
                threshold));
    }

    /**
     * Group-relative advantages of outcome rewards.
     *
     * @param rewards float32 {@code [count]}
     * @param groupSize the size of each contiguous group (must divide count) when groupIds is null
     * @param groupIds int64 {@code [count]} group of each response, or null
     * @param eps MEAN_STD's denominator guard
     * @param advantages float32 {@code [count]} output
     */
    public static void groupAdvantages(Device device, Pointer stream, long count, FloatPointer rewards, long groupSize,
            LongPointer groupIds, AdvantageMode mode, double eps, boolean checkFinite, FloatPointer advantages) {
        checkDevice(device, stream);
        Checks.nonNegative(count, "count");
        Checks.notNull(mode, "mode");
        if (!(eps >= 0) || Double.isInfinite(eps)) {
            throw new IllegalArgumentException("eps must be finite and >= 0, got " + eps);
        }
        if (groupIds == null) {
            if (groupSize <= 0) {
                throw new IllegalArgumentException("groupSize must be > 0, got " + groupSize);
            }
            if (count % groupSize != 0) {
                throw new IllegalArgumentException("groupSize " + groupSize + " does not divide the " + count + " rewards");
            }
        } else {
            Checks.capacity(groupIds, count, "groupIds");
        }
        if (count == 0) {
            return; // nothing to do (and an empty tensor's ids pointer is NULL, which means "contiguous")
        }
        Checks.capacity(rewards, count, "rewards");
        Checks.capacity(advantages, count, "advantages");
        check(Gspo4jLibrary.gspo4j_group_advantages(device.code, stream, count, rewards, groupSize, groupIds, mode.code(),
                eps, checkFinite ? 1 : 0, advantages));
    }

    /**
     * Generalised advantage estimation over each response's counted tokens.
     *
     * @param rewards float32 {@code [tokens]} per-token rewards
     * @param values float32 {@code [tokens]} value estimates
     * @param mask uint8 {@code [tokens]} or null
     * @param advantages float32 {@code [tokens]} output
     * @param returns float32 {@code [tokens]} output: advantages + values (0 where masked)
     */
    public static void gae(Device device, Pointer stream, TokenLayout layout, FloatPointer rewards, FloatPointer values,
            BytePointer mask, double gamma, double lambda, boolean checkFinite, FloatPointer advantages,
            FloatPointer returns) {
        checkDevice(device, stream);
        Checks.notNull(layout, "layout");
        if (!(gamma >= 0 && gamma <= 1)) {
            throw new IllegalArgumentException("gamma must be in [0, 1], got " + gamma);
        }
        if (!(lambda >= 0 && lambda <= 1)) {
            throw new IllegalArgumentException("lambda must be in [0, 1], got " + lambda);
        }
        final long tokens = layout.tokens();
        if (tokens > 0) {
            Checks.capacity(rewards, tokens, "rewards");
            Checks.capacity(values, tokens, "values");
            Checks.capacity(advantages, tokens, "advantages");
            Checks.capacity(returns, tokens, "returns");
        }
        Checks.optionalCapacity(mask, tokens, "mask");
        check(Gspo4jLibrary.gspo4j_gae(device.code, stream, layout.batch(), layout.seq(), tokens, layout.offsets(),
                rewards, values, mask, gamma, lambda, checkFinite ? 1 : 0, advantages, returns));
    }

    /**
     * CUDA kernels check the data (token ids, offsets, NaN/Inf) as they run and report it later:
     * this waits for {@code stream} and throws what they found, as the CPU kernels would have. A
     * no-op on the CPU.
     */
    public static void reportDataErrors(Device device, Pointer stream) {
        Checks.notNull(device, "device");
        if (device == Device.CUDA) {
            check(Gspo4jLibrary.gspo4j_cuda_check_error(stream));
        }
    }

    /**
     * Queues a snapshot of what the CUDA kernels queued so far on {@code stream}'s device found,
     * without waiting; returns its ticket for {@link #resolveDataErrors} (0: nothing to check).
     */
    public static long deferDataErrors(Pointer stream) {
        try (LongPointer ticket = new LongPointer(1)) {
            check(Gspo4jLibrary.gspo4j_cuda_defer_error_check(stream, ticket));
            return ticket.get();
        }
    }

    /** Waits for the snapshot of {@code ticket} and throws what it holds, as reportDataErrors. */
    public static void resolveDataErrors(long ticket) {
        check(Gspo4jLibrary.gspo4j_cuda_resolve_error_check(ticket));
    }

    private static void checkDevice(Device device, Pointer stream) {
        Checks.notNull(device, "device");
        if (device == Device.CPU && stream != null && !stream.isNull()) {
            throw new IllegalArgumentException("stream must be null for the CPU");
        }
    }

    private static void checkTemperature(double temperature) {
        if (!(temperature > 0) || Double.isInfinite(temperature)) {
            throw new IllegalArgumentException("temperature must be finite and > 0, got " + temperature);
        }
    }

    /** The one place a native status becomes an exception. */
    private static void check(int status) {
        if (status != 0) {
            throw new Gspo4jException(status, Gspo4jLibrary.gspo4j_last_error().getString());
        }
    }
}
