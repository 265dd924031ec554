package dev.gspo4j;

import dev.gspo4j.internal.Device;
import dev.gspo4j.internal.FusedLogProbs;
import dev.gspo4j.internal.Kernels;
import dev.gspo4j.internal.LogitsDtype;
import dev.gspo4j.internal.LogitsView;
import dev.gspo4j.internal.LossSettings;
import dev.gspo4j.internal.Metric;
import dev.gspo4j.internal.RatioLevel;
import dev.gspo4j.internal.TokenLayout;
import dev.gspo4j.internal.Tensors;
import dev.gspo4j.internal.Unscoped;
import org.bytedeco.javacpp.Pointer;
import org.bytedeco.pytorch.GradMode;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * A policy loss of SPEC.md (GSPO, GSPO-token, GRPO, PPO) over libtorch logits, computed by gspo4j's
 * fused kernels: the logits are read once in the forward, once in the backward, and the gradient
 * written once; no log-softmax is materialised.
 *
 * <pre>{@code
 * PolicyLoss gspo = PolicyLoss.gspo().build();
 * try (LossResult result = gspo.compute(LossInput.builder()
 *         .logits(logits).targets(tokens).mask(mask).oldLogProbs(oldLogProbs).advantages(advantages).build())) {
 *     result.loss().backward();
 * }
 * }</pre>
 *
 * Immutable and thread-safe: one instance may serve any number of threads.
 */
public final class PolicyLoss {
    private final String name;
    private final LossSettings settings;
    private final double temperature;

    private PolicyLoss(String name, LossSettings settings, double temperature) {
        this.name = name;
        this.settings = settings;
        this.temperature = temperature;
    }

    /** GSPO as in the paper: sequence ratio, clip 3e-4 / 4e-4, sequence mean, no KL. */
    public static Builder gspo() {
        return new Builder("GSPO", LossSettings.gspo());
    }

    /** GSPO-token: GSPO's sequence ratio with per-token advantages allowed; clip 3e-4 / 4e-4. */
    public static Builder gspoToken() {
        return new Builder("GSPO-token", LossSettings.gspo().withRatioLevel(RatioLevel.SEQUENCE_TOKEN));
    }

    /** GRPO: token ratio, clip 0.2 / 0.2, sequence-mean token-mean, no KL. */
    public static Builder grpo() {
        return new Builder("GRPO", LossSettings.grpo());
    }

    /** PPO: token ratio, clip 0.2 / 0.2, token mean; dual clip available through {@link Builder#dualClip}. */
    public static Builder ppo() {
        return new Builder("PPO", LossSettings.grpo().withAggregation(Aggregation.TOKEN_MEAN));
    }

    /** Options of a {@link PolicyLoss}; each setter checks its value. */
    public static final class Builder {
        private final String name;
        private LossSettings settings;
        private double temperature = 1.0;

        private Builder(String name, LossSettings settings) {
            this.name = name;
            this.settings = settings;
        }

        /** Clip range: ratios outside [1 - low, 1 + high] are clipped (asymmetric: DAPO's clip-higher). */
        public Builder clip(double low, double high) {
            settings = settings.withClip(low, high);
            return this;
        }

        /** Dual clip c > 1 (0 disables): for A < 0 the objective is at least c * A. */
        public Builder dualClip(double c) {
            settings = settings.withDualClip(c);
            return this;
        }

        public Builder aggregation(Aggregation aggregation) {
            settings = settings.withAggregation(aggregation);
            return this;
        }

        /**
         * A global count replacing the local denominator of the aggregation (responses B', tokens
         * sum m, or B for SEQ_MEAN_TOKEN_SUM_NORM): for data-parallel ranks and gradient accumulation
         * over micro-batches. 0 restores the local count.
         */
        public Builder normalizer(double count) {
            settings = settings.withNormalizer(count);
            return this;
        }

        /** Lnorm of SEQ_MEAN_TOKEN_SUM_NORM; 0: T (padded) or the longest response (packed). */
        public Builder lengthNorm(double length) {
            settings = settings.withLengthNorm(length);
            return this;
        }

        /** KL to the reference policy with coefficient beta (needs {@link LossInput.Builder#refLogProbs}). */
        public Builder kl(double beta, KlEstimator estimator) {
            if (estimator == null) {
                throw new IllegalArgumentException("estimator must not be null");
            }
            settings = settings.withKl(beta, estimator);
            return this;
        }

        /** Entropy bonus: the loss gets {@code - coefficient * aggregated entropy}. */
        public Builder entropyCoefficient(double coefficient) {
            settings = settings.withEntropyCoef(coefficient);
            return this;
        }

        /**
         * Sampling temperature tau in [1e-4, 1e4]: every log-prob is of softmax(z / tau). (1 / tau is
         * a float32 factor on the logits: a tinier tau makes it infinite.)
         */
        public Builder temperature(double tau) {
            if (!(tau >= 1e-4 && tau <= 1e4)) {
                throw new IllegalArgumentException("temperature must be in [1e-4, 1e4], got " + tau);
            }
            this.temperature = tau;
            return this;
        }

        /** Log-ratios are clamped to [-R, R] before exp (default 20); the gradient is 0 outside. */
        public Builder logRatioClamp(double r) {
            settings = settings.withLogRatioClamp(r);
            return this;
        }

        /**
         * Whether NaN or Inf in the logits or a counted input is an error (default true). Off saves
         * a few O(N) checks; a NaN then flows into the loss.
         */
        public Builder checkFinite(boolean check) {
            settings = settings.withCheckFinite(check);
            return this;
        }

        public PolicyLoss build() {
            return new PolicyLoss(name, settings, temperature);
        }
    }

    /**
     * Computes the loss, the log-probs, the entropy and the metrics. With grad enabled and logits
     * that require grad, {@link LossResult#loss()} is differentiable and {@link LossResult#backward()}
     * works; otherwise only values are computed.
     *
     * <p>The result owns its tensors and graph state, not a JavaCPP {@code PointerScope} open
     * while this runs: it may be backwarded after that scope closed; close the result.
     *
     * @throws IllegalArgumentException for a wrong shape, dtype, device or layout, a token id outside
     *     [0, V), or options the inputs do not satisfy
     * @throws NonFiniteDataException (an IllegalArgumentException) for NaN/Inf in the logits or a
     *     counted input, with checking on
     */
    public LossResult compute(LossInput input) {
        if (input == null) {
            throw new IllegalArgumentException("input must not be null");
        }
        // The result and its graph state belong to the result, not to a PointerScope open now:
        // a backward after that scope closed still works; LossResult.close() releases them.
        return Unscoped.call(() -> computeUnscoped(input));
    }

    private LossResult computeUnscoped(LossInput input) {
        // A normaliser given with the input overrides the loss's own for this call.
        final LossSettings settings = input.normalizer == null ? this.settings : this.settings.withNormalizer(input.normalizer);
        try (PreparedInput in = PreparedInput.of(input, settings, temperature)) {
            final Tensor logits = input.logits;
            final Device device = Tensors.device(logits);
            final Pointer stream = Tensors.stream(logits);
            final long[] tokenShape = in.tokenShape;
            final Tensor logProbs = Tensors.empty(tokenShape, ScalarType.Float, logits);
            final Tensor lse = Tensors.empty(new long[] {in.layout.tokens()}, ScalarType.Double, logits);
            final Tensor entropy = Tensors.empty(tokenShape, ScalarType.Float, logits);
            final Tensor value = Tensors.empty(new long[0], ScalarType.Float, logits);
            final Tensor gradLogprob = Tensors.empty(tokenShape, ScalarType.Float, logits);
            final Tensor gradEntropy = settings.entropyCoef() != 0 ? Tensors.empty(tokenShape, ScalarType.Float, logits) : null;
            final Tensor metrics = Tensors.empty(new long[] {Metric.COUNT}, ScalarType.Float, logits);
            FusedLogProbs fused = null;
            LossMetrics lossMetrics = null;
            try {
                in.translate(() -> Kernels.tokenLogProbForward(device, stream, in.view, Tensors.longs(in.targets),
                        temperature, settings.checkFinite(), Tensors.floats(logProbs), Tensors.doubles(lse),
                        Tensors.floats(entropy)));
                in.translate(() -> Kernels.policyLoss(device, stream, settings, in.layout, Tensors.floats(logProbs),
                        Tensors.floats(in.oldLogProbs), Tensors.bytes(in.mask), Tensors.floats(in.advantages),
                        in.tokenAdvantages, Tensors.floats(in.refLogProbs), Tensors.floats(entropy), Tensors.floats(value),
                        Tensors.floats(gradLogprob), Tensors.floats(gradEntropy), Tensors.floats(metrics)));
                // On a GPU the kernels check the data as they run (token ids, NaN/Inf): one wait
                // here turns what they found into the exception the CPU path throws.
                in.translate(() -> Kernels.reportDataErrors(device, stream));
                lossMetrics = in.metrics(metrics);
                if (GradMode.is_enabled() && logits.requires_grad()) {
                    fused = new FusedLogProbs(logits, in.view, in.targets, temperature, lse, entropy, gradLogprob, gradEntropy);
                }
            } catch (RuntimeException e) {
                if (lossMetrics != null) {
                    lossMetrics.close();
                }
                for (Tensor t : new Tensor[] {logProbs, entropy, value, metrics}) {
                    t.close();
                }
                throw e;
            } finally {
                lse.close();
                gradLogprob.close();
                if (gradEntropy != null) {
                    gradEntropy.close();
                }
            }
            return new LossResult(value, logProbs, entropy, lossMetrics, fused);
        }
    }

    /** The kernels' settings (for tests and benchmarks in this package's test tree). */
    LossSettings settings() {
        return settings;
    }

    /** The sampling temperature tau. */
    double temperature() {
        return temperature;
    }

    /** The options in force, for logs. */
    @Override
    public String toString() {
        return name + settings.toString().replace("LossSettings", "") + " temperature=" + temperature;
    }
}
