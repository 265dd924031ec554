package dev.gspo4j;

import dev.gspo4j.internal.Device;
import dev.gspo4j.internal.FusedLinear;
import dev.gspo4j.internal.FusedLogProbs;
import dev.gspo4j.internal.Kernels;
import dev.gspo4j.internal.LogitsDtype;
import dev.gspo4j.internal.LogitsView;
import dev.gspo4j.internal.LossGraph;
import dev.gspo4j.internal.LossSettings;
import dev.gspo4j.internal.Metric;
import dev.gspo4j.internal.Objective;
import dev.gspo4j.internal.ObjectiveParams;
import dev.gspo4j.internal.RatioLevel;
import dev.gspo4j.internal.StepTotals;
import dev.gspo4j.internal.TokenLayout;
import dev.gspo4j.internal.Tensors;
import dev.gspo4j.internal.Unscoped;
import org.bytedeco.javacpp.Pointer;
import org.bytedeco.pytorch.GradMode;
import org.bytedeco.pytorch.Scalar;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * A policy loss of <a href="https://github.com/gspo4j/gspo4j/blob/main/docs/math.md#policy-losses">docs/math.md</a> (GSPO, GSPO-token, GRPO, PPO, DAPO, Dr. GRPO, CISPO, SAPO, GMPO, LUSPO,
 * VESPO, DPPO) over libtorch logits, computed by gspo4j's
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
    private final boolean inPlaceBackward;

    private PolicyLoss(String name, LossSettings settings, double temperature, boolean inPlaceBackward) {
        this.name = name;
        this.settings = settings;
        this.temperature = temperature;
        this.inPlaceBackward = inPlaceBackward;
    }

    /**
     * GSPO as in the paper: sequence ratio, clip 3e-4 / 4e-4, sequence mean, no KL.
     *
     * @return a builder with these defaults
     */
    public static Builder gspo() {
        return new Builder("GSPO", LossSettings.gspo());
    }

    /**
     * GSPO-token: GSPO's sequence ratio with per-token advantages allowed; clip 3e-4 / 4e-4.
     *
     * @return a builder with these defaults
     */
    public static Builder gspoToken() {
        return new Builder("GSPO-token", LossSettings.gspo().withRatioLevel(RatioLevel.SEQUENCE_TOKEN));
    }

    /**
     * GRPO: token ratio, clip 0.2 / 0.2, sequence-mean token-mean, no KL.
     *
     * @return a builder with these defaults
     */
    public static Builder grpo() {
        return new Builder("GRPO", LossSettings.grpo());
    }

    /**
     * PPO: token ratio, clip 0.2 / 0.2, token mean; dual clip available through {@link Builder#dualClip}.
     *
     * @return a builder with these defaults
     */
    public static Builder ppo() {
        return new Builder("PPO", LossSettings.grpo().withAggregation(Aggregation.TOKEN_MEAN));
    }

    /**
     * DAPO's recipe: GRPO's token ratio with clip-higher 0.2 / 0.28 and the token mean.
     *
     * @return a builder with these defaults
     */
    public static Builder dapo() {
        return new Builder("DAPO", LossSettings.grpo().withClip(0.2, 0.28).withAggregation(Aggregation.TOKEN_MEAN));
    }

    /**
     * Dr. GRPO's recipe: GRPO's token ratio, clip 0.2 / 0.2, {@link Aggregation#SEQ_MEAN_TOKEN_SUM_NORM}
     * (every token sum divided by B x Lnorm, Lnorm = T by default: set the generation budget with
     * {@link Builder#lengthNorm}). Pair it with {@link AdvantageMode#MEAN} advantages (no division by
     * the group's std): that is the other half of Dr. GRPO.
     *
     * @return a builder with these defaults
     */
    public static Builder drGrpo() {
        return new Builder("Dr. GRPO", LossSettings.grpo().withAggregation(Aggregation.SEQ_MEAN_TOKEN_SUM_NORM));
    }

    /**
     * CISPO (MiniMax-M1): {@code q_t = sg[clip(r_t)] A_t lp_t}, so clipped tokens keep the gradient
     * {@code sg[clip(r_t)] A_t}. Defaults: clip eps 1 / 4, i.e. no lower bound and an absolute cap of
     * 5 on the weight (TRL's {@code epsilon_high} is that cap itself: TRL's 5.0 is {@code clip(1, 4)}
     * here), token mean. Its loss value is a REINFORCE surrogate, not an objective value.
     * {@link Builder#sequenceRatio} uses s_b for r_t.
     *
     * @return a builder with these defaults
     */
    public static Builder cispo() {
        return new Builder("CISPO", objective(Objective.CISPO, RatioLevel.TOKEN).withClip(1, 4).withAggregation(Aggregation.TOKEN_MEAN));
    }

    /**
     * SAPO (Qwen): the soft gate {@code q_t = (4 / tau) sigmoid(tau (r_t - 1)) A_t} in place of the
     * clip, tau = 1 for {@code A > 0} and 1.05 for {@code A <= 0} ({@link Builder#sapoTemperatures}), sequence-mean
     * token-mean. {@link Builder#sequenceRatio} uses s_b for r_t (AReaL's sequence variant).
     *
     * @return a builder with these defaults
     */
    public static Builder sapo() {
        return new Builder("SAPO", objective(Objective.SAPO, RatioLevel.TOKEN));
    }

    /**
     * GMPO (verl's {@code geo_mean}): {@code J_b = exp((1/L_b) sum_t l_t) A_b}, each token log-ratio
     * clipped in log space to [-0.4, 0.4] on the pessimistic side only ({@link Builder#clip} sets the
     * two bounds); one advantage per response; the mean over responses.
     *
     * @return a builder with these defaults
     */
    public static Builder gmpo() {
        return new Builder("GMPO", objective(Objective.GMPO, RatioLevel.SEQUENCE).withClip(0.4, 0.4));
    }

    /**
     * LUSPO: GSPO with each response's term weighted by its length,
     * {@code J_b = L_b min(s_b A_b, clip(s_b) A_b)}; clip 2e-3 / 2.5e-3; the mean over responses.
     *
     * @return a builder with these defaults
     */
    public static Builder luspo() {
        return new Builder("LUSPO", objective(Objective.LUSPO, RatioLevel.SEQUENCE).withClip(2e-3, 2.5e-3));
    }

    /**
     * VESPO: {@code q_t = sg[phi(W_b)] A lp_t} with the product ratio
     * {@code W_b = exp(clamp(sum_t (lp - olp), -R, R))} and {@code phi(W) = W^k exp(lambda (1 - W))},
     * (k, lambda) = (2, 3) for {@code A >= 0} and (3, 2) for {@code A < 0} ({@link Builder#vespoShape}); token mean.
     *
     * @return a builder with these defaults
     */
    public static Builder vespo() {
        return new Builder("VESPO", objective(Objective.VESPO, RatioLevel.TOKEN).withAggregation(Aggregation.TOKEN_MEAN));
    }

    /**
     * DPPO-Binary-TV (verl's {@code dppo_tv}): {@code q_t = keep_t sg[min(r_t, C)] A_t lp_t}, a token
     * kept when {@code p - p_old <= delta_high} ({@code A > 0}) or {@code p - p_old >= -delta_low} ({@code A <= 0}), p
     * the sampled token's probability. Defaults delta 0.15 / 0.15 ({@link Builder#dppoDivergence}),
     * C = 20 ({@link Builder#dppoRatioCap}), token mean.
     *
     * @return a builder with these defaults
     */
    public static Builder dppoTv() {
        return new Builder("DPPO-TV", objective(Objective.DPPO_TV, RatioLevel.TOKEN).withAggregation(Aggregation.TOKEN_MEAN));
    }

    /**
     * DPPO-Binary-KL (verl's {@code dppo_kl}): as {@link #dppoTv} with the one-sided binary KL
     * {@code p_old (olp - lp) + (1 - p_old) log((1 - p_old + 1e-8) / (1 - p + 1e-8))}: a token is kept
     * when {@code A > 0} and ({@code KL <= delta_high} or {@code p <= p_old}), or {@code A <= 0} and ({@code KL <= delta_low} or {@code p >= p_old}).
     * Defaults delta 0.05 / 0.05, C = 20, token mean.
     *
     * @return a builder with these defaults
     */
    public static Builder dppoKl() {
        return new Builder("DPPO-KL", objective(Objective.DPPO_KL, RatioLevel.TOKEN).withAggregation(Aggregation.TOKEN_MEAN));
    }

    private static LossSettings objective(Objective objective, RatioLevel level) {
        return LossSettings.grpo().withObjective(ObjectiveParams.of(objective), level);
    }

    /** Options of a {@link PolicyLoss}; each setter checks its value. */
    public static final class Builder {
        private final String name;
        private LossSettings settings;
        private double temperature = 1.0;
        private boolean inPlaceBackward;
        private double delta; // 0: not set through delta()

        private Builder(String name, LossSettings settings) {
            this.name = name;
            this.settings = settings;
        }

        /**
         * Clip range: ratios outside [1 - low, 1 + high] are clipped (asymmetric: DAPO's clip-higher).
         *
         * @param low eps_low, in [0, 1] (1: no lower bound)
         * @param high eps_high, in [0, 1e6]
         * @return this builder
         */
        public Builder clip(double low, double high) {
            settings = settings.withClip(low, high);
            return this;
        }

        /**
         * Dual clip {@code c > 1} (0 disables): for {@code A < 0} the objective is at least c * A. For the clipped
         * objectives (GSPO, GSPO-token, GRPO, PPO, DAPO, Dr. GRPO, LUSPO).
         *
         * @param c the dual clip, in (1, 1e6], or 0 (off)
         * @return this builder
         */
        public Builder dualClip(double c) {
            settings = settings.withDualClip(c);
            delta = 0;
            return this;
        }

        /**
         * TRL's and Liger's two-sided clip {@code delta}: {@code min(min(r, delta) A, clip(r) A)}. It
         * equals dual clip with c = delta whenever {@code delta >= 1 + eps_high}, so that is what it
         * sets; {@link #build} refuses a delta below {@code 1 + eps_high} (where the two differ).
         *
         * @param d TRL's delta, in (1, 1e6]
         * @return this builder
         */
        public Builder delta(double d) {
            if (!(d > 1 && d <= LossSettings.MAX_DUAL_CLIP)) {
                throw new IllegalArgumentException("delta must be in (1, " + LossSettings.MAX_DUAL_CLIP + "], got " + d);
            }
            settings = settings.withDualClip(d);
            delta = d;
            return this;
        }

        /**
         * CISPO and SAPO: use the sequence ratio s_b for r_t (value s_b, gradient s_b dlp per token).
         *
         * @param sequence true for the sequence ratio, false for the token ratio (the default)
         * @return this builder
         */
        public Builder sequenceRatio(boolean sequence) {
            final Objective objective = settings.objective().objective();
            if (objective != Objective.CISPO && objective != Objective.SAPO) {
                throw new IllegalStateException("sequenceRatio applies to CISPO and SAPO, not to " + name);
            }
            settings = settings.withObjective(settings.objective(), sequence ? RatioLevel.SEQUENCE_TOKEN : RatioLevel.TOKEN);
            return this;
        }

        /**
         * SAPO's gate temperatures: tau for {@code A > 0} and for {@code A <= 0}, each in (0, 1e4].
         *
         * @param positive tau where {@code A > 0} (default 1.0)
         * @param negative tau where {@code A <= 0} (default 1.05)
         * @return this builder
         */
        public Builder sapoTemperatures(double positive, double negative) {
            requireObjective(Objective.SAPO, "sapoTemperatures");
            settings = settings.withObjectiveParams(settings.objective().withSapoTemperatures(positive, negative));
            return this;
        }

        /**
         * VESPO's phi(W) = W^k exp(lambda (1 - W)): (k, lambda) for {@code A >= 0} and for {@code A < 0}, each in [0, 1e3].
         *
         * @param kPositive k where {@code A >= 0} (default 2)
         * @param lambdaPositive lambda where {@code A >= 0} (default 3)
         * @param kNegative k where {@code A < 0} (default 3)
         * @param lambdaNegative lambda where {@code A < 0} (default 2)
         * @return this builder
         */
        public Builder vespoShape(double kPositive, double lambdaPositive, double kNegative, double lambdaNegative) {
            requireObjective(Objective.VESPO, "vespoShape");
            settings = settings.withObjectiveParams(settings.objective().withVespoShape(kPositive, lambdaPositive, kNegative,
                    lambdaNegative));
            return this;
        }

        /**
         * DPPO's divergence bounds delta_low and delta_high (TV: of p - p_old; KL: of the binary KL), in [0, 1e6].
         *
         * @param low delta_low
         * @param high delta_high
         * @return this builder
         */
        public Builder dppoDivergence(double low, double high) {
            requireDppo("dppoDivergence");
            settings = settings.withObjectiveParams(settings.objective().withDppoDivergence(low, high));
            return this;
        }

        /**
         * DPPO's ratio cap C: a kept token's weight is sg[min(r, C)], C in (0, 1e38].
         *
         * @param cap C (default 20)
         * @return this builder
         */
        public Builder dppoRatioCap(double cap) {
            requireDppo("dppoRatioCap");
            settings = settings.withObjectiveParams(settings.objective().withDppoRatioCap(cap));
            return this;
        }

        private void requireObjective(Objective objective, String option) {
            if (settings.objective().objective() != objective) {
                throw new IllegalStateException(option + " applies to " + objective.label() + ", not to " + name);
            }
        }

        private void requireDppo(String option) {
            final Objective objective = settings.objective().objective();
            if (objective != Objective.DPPO_TV && objective != Objective.DPPO_KL) {
                throw new IllegalStateException(option + " applies to DPPO-TV and DPPO-KL, not to " + name);
            }
        }

        /**
         * How per-token terms become the scalar loss (docs/math.md, "Aggregation").
         *
         * @param aggregation the aggregation; each objective has its default
         * @return this builder
         */
        public Builder aggregation(Aggregation aggregation) {
            settings = settings.withAggregation(aggregation);
            return this;
        }

        /**
         * A global count replacing the local denominator of the aggregation (responses B', tokens
         * sum m, or B for SEQ_MEAN_TOKEN_SUM_NORM): for data-parallel ranks and gradient accumulation
         * over micro-batches. 0 restores the local count. One number replaces every denominator
         * alike, which is not right where a loss has two (GSPO, LUSPO or GMPO with TOKEN_MEAN or
         * SEQ_MEAN_TOKEN_SUM_NORM: J_b over B', the KL and entropy terms over the tokens or B x Lnorm):
         * {@link PolicyLoss#compute(LossInput, GlobalCounts)} passes each count apart.
         *
         * @param count 0 or in [1e-6, 1e18]
         * @return this builder
         */
        public Builder normalizer(double count) {
            settings = settings.withNormalizer(count);
            return this;
        }

        /**
         * Lnorm of SEQ_MEAN_TOKEN_SUM_NORM; 0: T (padded) or the longest response (packed).
         *
         * @param length 0, or Lnorm in [1e-6, 1e18]
         * @return this builder
         */
        public Builder lengthNorm(double length) {
            settings = settings.withLengthNorm(length);
            return this;
        }

        /**
         * KL to the reference policy with coefficient beta (needs {@link LossInput.Builder#refLogProbs}).
         *
         * @param beta the coefficient, in [-1e6, 1e6] (0: off)
         * @param estimator the per-token estimator
         * @return this builder
         */
        public Builder kl(double beta, KlEstimator estimator) {
            if (estimator == null) {
                throw new IllegalArgumentException("estimator must not be null");
            }
            settings = settings.withKl(beta, estimator);
            return this;
        }

        /**
         * Entropy bonus: the loss gets {@code - coefficient * aggregated entropy}.
         *
         * @param coefficient c_H, in [-1e6, 1e6] (0: off)
         * @return this builder
         */
        public Builder entropyCoefficient(double coefficient) {
            settings = settings.withEntropyCoef(coefficient);
            return this;
        }

        /**
         * Sampling temperature tau in [1e-4, 1e4]: every log-prob is of softmax(z / tau). (1 / tau is
         * a float32 factor on the logits: a tinier tau makes it infinite.)
         *
         * @param tau the temperature
         * @return this builder
         */
        public Builder temperature(double tau) {
            if (!(tau >= 1e-4 && tau <= 1e4)) {
                throw new IllegalArgumentException("temperature must be in [1e-4, 1e4], got " + tau);
            }
            this.temperature = tau;
            return this;
        }

        /**
         * Log-ratios are clamped to [-R, R] before exp (default 20); the gradient is 0 outside.
         *
         * @param r R, in (0, 88]
         * @return this builder
         */
        public Builder logRatioClamp(double r) {
            settings = settings.withLogRatioClamp(r);
            return this;
        }

        /**
         * Rollout correction's importance weight (docs/math.md "Training-inference mismatch"):
         * {@code rho} of the old policy against the inference engine's log-probs ({@link
         * LossInput.Builder#rolloutLogProbs}, then required) at {@code level}, banded by {@code mode}
         * to {@code [cMin, cMax]}, multiplies each counted token's policy term (no gradient). TRL's
         * default ({@code vllm_importance_sampling_correction}) is {@code (SEQUENCE, MASK, 0, 3)};
         * TRL's token truncation and verl's TIS are {@code (TOKEN, TRUNCATE, 0, C)}; IcePop's band is
         * {@code (TOKEN, MASK, 0.5, 2)}. A sequence objective's term is multiplied by the mean of
         * the weights over the response.
         *
         * @param level where rho is formed
         * @param mode truncate (TIS) or mask (MIS) outside the band
         * @param cMin the lower bound, 0 for none
         * @param cMax the upper bound, {@code Double.POSITIVE_INFINITY} for none; at least cMin
         * @return this builder
         */
        public Builder rolloutWeights(Rollout.Level level, Rollout.Mode mode, double cMin, double cMax) {
            if (level == null || mode == null) {
                throw new IllegalArgumentException("level and mode must not be null");
            }
            settings = settings.withWeights(settings.weights().withImportance(level, mode, cMin, cMax));
            return this;
        }

        /**
         * Rollout rejection (verl's {@code rollout_rs}): a token ({@link Rollout.Scope#TOKEN}) or a
         * whole response (by the mean, sum or max over its counted tokens) whose divergence of the
         * old policy from the inference engine ({@link LossInput.Builder#rolloutLogProbs}, then
         * required) is above {@code threshold} gets weight 0 in the policy term; for {@link
         * Rollout.Divergence#K1} (signed) the accepted band is {@code [-threshold, threshold]}. The
         * denominators still count rejected tokens (verl drops them: pass the count of accepted
         * tokens with {@link Builder#normalizer} to reproduce that).
         *
         * @param divergence k1, k2 or k3 of {@code olp} against {@code mu}
         * @param scope per token, or per response by mean, sum or max
         * @param threshold above 0 and finite
         * @return this builder
         */
        public Builder rolloutRejection(Rollout.Divergence divergence, Rollout.Scope scope, double threshold) {
            if (!(threshold > 0)) {
                throw new IllegalArgumentException("the rejection threshold must be > 0, got " + threshold);
            }
            final boolean signed = divergence == Rollout.Divergence.K1;
            return rolloutRejection(divergence, scope, signed ? -threshold : 0, threshold);
        }

        /**
         * {@link #rolloutRejection(Rollout.Divergence, Rollout.Scope, double)} with the band of
         * {@link Rollout.Divergence#K1} given: accepted when {@code low <= k1 <= high} (verl's {@code
         * rollout_rs_threshold_lower} and upper, as log-ratios: a ratio bound {@code c} is {@code
         * log(c)}). For k2 and k3 {@code low} is ignored and {@code high} is the threshold.
         *
         * @param divergence k1, k2 or k3
         * @param scope per token, or per response by mean, sum or max
         * @param low k1's lower bound, finite and at most high
         * @param high k1's upper bound, or k2's and k3's threshold (above 0); finite
         * @return this builder
         */
        public Builder rolloutRejection(Rollout.Divergence divergence, Rollout.Scope scope, double low, double high) {
            if (divergence == null || scope == null) {
                throw new IllegalArgumentException("divergence and scope must not be null");
            }
            settings = settings.withWeights(settings.weights().withRejection(divergence, scope, low, high));
            return this;
        }

        /**
         * The off-policy sequence mask (DeepSeek-V3.2; TRL's {@code off_policy_mask_threshold}): a
         * response with {@code A_b < 0} whose mean over its counted tokens of {@code beh - lp}
         * exceeds {@code delta} gets weight 0 in the policy term, where {@code beh} is the inference
         * engine's log-prob when {@link LossInput.Builder#rolloutLogProbs} are given and the old
         * policy's otherwise. Needs one advantage per response.
         *
         * @param delta the threshold on the mean log-ratio, finite
         * @return this builder
         */
        public Builder offPolicyMask(double delta) {
            settings = settings.withWeights(settings.weights().withOffPolicyMask(delta));
            return this;
        }

        /**
         * Top-entropy token selection (TRL's {@code top_entropy_quantile}, the "80/20" paper): only
         * counted tokens whose entropy is at least the {@code 1 - rho} quantile of the counted
         * tokens' entropies keep their policy term. The quantile is numpy's default (linear) in
         * float64, over this call's tokens, or the caller's threshold ({@link
         * LossInput.Builder#entropyThreshold}, for data-parallel steps). The denominators still count
         * every counted token (as TRL's); the entropy bonus and the KL term are not restricted (TRL
         * masks its entropy bonus too); a sequence objective's term is multiplied by the kept
         * fraction of its tokens.
         *
         * @param rho the kept fraction, in (0, 1]; 1 keeps every token
         * @return this builder
         */
        public Builder topEntropyQuantile(double rho) {
            if (!(rho > 0 && rho <= 1)) {
                throw new IllegalArgumentException("topEntropyQuantile rho must be in (0, 1] (1 keeps every token), got " + rho);
            }
            settings = settings.withWeights(settings.weights().withTopEntropy(rho));
            return this;
        }

        /**
         * Whether NaN or Inf in the logits or a counted input is an error (default true). Off saves
         * a few O(N) checks; a NaN then flows into the loss.
         *
         * @param check true to check (the default)
         * @return this builder
         */
        public Builder checkFinite(boolean check) {
            settings = settings.withCheckFinite(check);
            return this;
        }

        /**
         * Whether the backward writes the logits' gradient over the logits themselves (default
         * false), as Liger's and quack's in-place options do: no [N, V] allocation and no first
         * touch of fresh memory per step. After the backward the logits hold their gradient, not
         * their values, and their version counter has been bumped, so anything autograd saved that
         * still needs them (a second loss term on the same logits that saved them, a
         * {@code retain_graph=true} second backward) fails with libtorch's "modified by an inplace
         * operation" error or an {@link IllegalStateException} instead of reading the gradient.
         *
         * <p>Safe when nothing downstream of the backward reads the logits' values: the usual
         * {@code logits = hidden.matmul(lmHead.t())} (or {@code linear}) saves its inputs, not its
         * output, so its backward works from the overwritten buffer as from a fresh one. Read
         * {@link LossResult#logProbs()} and the entropy, not the logits, after the backward. The
         * logits must be produced by an op: a leaf tensor (or a view of a leaf that requires grad)
         * is refused at {@code compute}, since its {@code .grad} would be its own memory, and so
         * are logits whose rows overlap in memory (an expanded tensor). A view such as {@code
         * logits[:, :-1, :]} works, but its slice backward allocates the base's gradient anyway;
         * compute the lm_head on {@code hidden[:, :-1, :]} to save that too.
         *
         * @param inPlace whether the gradient overwrites the logits
         * @return this builder
         */
        public Builder inPlaceBackward(boolean inPlace) {
            this.inPlaceBackward = inPlace;
            return this;
        }

        /**
         * The loss with these options.
         *
         * @return an immutable, thread-safe loss
         * @throws IllegalArgumentException when {@link #delta} is below {@code 1 + eps_high}
         */
        public PolicyLoss build() {
            if (delta != 0 && delta < 1 + settings.epsHigh()) {
                throw new IllegalArgumentException("delta = " + delta + " is below 1 + epsHigh = " + (1 + settings.epsHigh())
                        + ": TRL's two-sided clip equals dual clip only for delta >= 1 + epsHigh; raise delta or lower the clip");
            }
            return new PolicyLoss(name, settings, temperature, inPlaceBackward);
        }
    }

    /**
     * Computes the loss, the log-probs, the entropy and the metrics. With grad enabled and logits
     * that require grad, {@link LossResult#loss()} is differentiable and {@link LossResult#backward()}
     * works; otherwise only values are computed. With {@link LossInput.Builder#hiddenStates} in place
     * of logits, the same loss over {@code hidden @ weight^T + bias} computed one chunk of logits at a
     * time; its gradient goes to the hidden states, the weight and the bias (those requiring grad).
     *
     * <p>The result owns its tensors and graph state, not a JavaCPP {@code PointerScope} open
     * while this runs: it may be backwarded after that scope closed; close the result.
     *
     * @param input the logits and per-token tensors (shapes, dtypes and devices: {@link LossInput.Builder})
     * @return the result, owned by the caller (close it)
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
        return Unscoped.call(() -> computeUnscoped(input, null));
    }

    /**
     * {@link #compute(LossInput)} with the counts of the whole step in place of this call's own
     * denominators, for this one call: this rank's share of a batch split over data-parallel ranks
     * (or one micro-batch of an accumulated step). Every mean over responses divides by
     * {@link GlobalCounts#responses()}, {@link Aggregation#TOKEN_MEAN} by {@link GlobalCounts#tokens()},
     * {@link Aggregation#SEQ_MEAN_TOKEN_SUM_NORM} by {@link GlobalCounts#batch()} times Lnorm (the
     * loss's {@link Builder#lengthNorm}, else {@link GlobalCounts#longest()}). The shares then add
     * up to the step's loss: sum the ranks' gradients (see {@link DataParallel} for the contract).
     * The counts take precedence over a {@link LossInput.Builder#normalizer}.
     *
     * @param input this call's input, as for {@link #compute(LossInput)}
     * @param counts the step's counts, from {@link DataParallel#allReduceCounts} or summed with
     *     {@link GlobalCounts#plus}; each at least this call's own (the CPU kernels check)
     * @return this call's share of the step's loss, its log-probs, entropy and metrics
     */
    public LossResult compute(LossInput input, GlobalCounts counts) {
        if (input == null) {
            throw new IllegalArgumentException("input must not be null");
        }
        if (counts == null) {
            throw new IllegalArgumentException("counts must not be null (compute(input) uses this call's own counts)");
        }
        return Unscoped.call(() -> computeUnscoped(input, counts));
    }

    private LossResult computeUnscoped(LossInput input, GlobalCounts counts) {
        // A normaliser given with the input overrides the loss's own for this call.
        LossSettings settings = input.normalizer == null ? this.settings : this.settings.withNormalizer(input.normalizer);
        // The step's counts override both; Lnorm defaults to the step's longest (padded: its T).
        final StepTotals totals = counts == null ? StepTotals.NONE : counts.totals();
        if (counts != null && settings.lengthNorm() == 0 && counts.longest() > 0) {
            settings = settings.withLengthNorm(counts.longest());
        }
        final LossSettings chosen = settings;
        return computePrepared(input, chosen, totals);
    }

    private LossResult computePrepared(LossInput input, LossSettings settings, StepTotals totals) {
        final Tensor deviceTensor = input.logits != null ? input.logits : input.hiddenStates;
        final int cudaDevice = deviceTensor == null || deviceTensor.isNull() ? -1 : CudaChecks.deviceOf(deviceTensor);
        CudaChecks.beforeCall(cudaDevice);
        // The hidden-state path: the same pipeline, the logits computed chunk by chunk (FusedLinear).
        try (HiddenStates head = input.hiddenStates == null ? null : HiddenStates.of(input);
                PreparedInput in = head == null ? PreparedInput.of(input, settings, temperature)
                        : PreparedInput.of(input, head.standInLogits, settings, temperature)) {
            final Tensor logits = head == null ? input.logits : head.rows; // the device and dtype of the outputs
            if (inPlaceBackward && head == null && GradMode.is_enabled() && logits.requires_grad()) {
                FusedLogProbs.checkInPlace(logits, in.view);
            }
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
            LossGraph fused = null;
            LossMetrics lossMetrics = null;
            Tensor threshold = null;
            // The hidden-state path's forward buffer, kept for the backward (FusedLinear.SavedChunk).
            final FusedLinear.SavedChunk[] savedChunk = new FusedLinear.SavedChunk[1];
            try {
                if (head == null) {
                    in.translate(() -> Kernels.tokenLogProbForward(device, stream, in.view, Tensors.longs(in.targets),
                            temperature, settings.checkFinite(), Tensors.floats(logProbs), Tensors.doubles(lse),
                            Tensors.floats(entropy)));
                } else {
                    final boolean keep = GradMode.is_enabled() && head.requiresGrad();
                    in.translate(() -> savedChunk[0] = FusedLinear.forward(head.rows, head.weight, head.bias, head.chunkRows,
                            in.targets, temperature, settings.checkFinite(), logProbs, lse, entropy, keep));
                }
                // Top-entropy selection: the caller's threshold, or the quantile of this call's
                // counted entropies (on CUDA computed and read on the device: no host sync).
                if (settings.weights().topEntropy()) {
                    threshold = Tensors.empty(new long[] {1}, ScalarType.Double, logits);
                    if (in.entropyThreshold != null) {
                        try (Scalar fill = new Scalar(in.entropyThreshold)) {
                            threshold.fill_(fill);
                        }
                    } else {
                        // The quantile on the tensors' device, into the threshold the loss kernels
                        // read there: no host sync on CUDA.
                        final Tensor cutOut = threshold;
                        in.translate(() -> Kernels.entropyThreshold(device, stream, in.layout.tokens(), Tensors.floats(entropy),
                                Tensors.bytes(in.mask), settings.weights().topEntropyRho(), settings.checkFinite(),
                                Tensors.doubles(cutOut)));
                    }
                }
                final Tensor cut = threshold;
                in.translate(() -> Kernels.policyLoss(device, stream, settings, totals, in.layout, Tensors.floats(logProbs),
                        Tensors.floats(in.oldLogProbs), Tensors.floats(in.rolloutLogProbs), Tensors.bytes(in.mask),
                        Tensors.floats(in.advantages), in.tokenAdvantages, Tensors.floats(in.refLogProbs), Tensors.floats(entropy),
                        cut == null ? null : Tensors.doubles(cut), Tensors.floats(value), Tensors.floats(gradLogprob),
                        Tensors.floats(gradEntropy), Tensors.floats(metrics)));
                // On a GPU the kernels check the data as they run (token ids, NaN/Inf): what they
                // found becomes the exception the CPU path throws, at the next gspo4j call on the
                // device or the first read of this result (now, in strict mode).
                CudaChecks.afterKernels(cudaDevice, stream, in.errors, in.maskBad, in.maskMessage);
                lossMetrics = in.metrics(metrics);
                if (GradMode.is_enabled() && head == null && logits.requires_grad()) {
                    fused = new FusedLogProbs(logits, in.view, in.targets, temperature, lse, entropy, gradLogprob, gradEntropy,
                            inPlaceBackward);
                } else if (GradMode.is_enabled() && head != null && head.requiresGrad()) {
                    fused = new FusedLinear(head.hidden, head.rows, head.weight, head.bias, head.chunkRows, in.targets,
                            temperature, lse, entropy, gradLogprob, gradEntropy, savedChunk[0]);
                    savedChunk[0] = null; // the backward's state owns it now
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
                if (savedChunk[0] != null) {
                    savedChunk[0].close(); // no backward state took it (an error, or nothing to differentiate)
                }
                // Freed once the kernels that read it are queued, as lse: the caching allocator
                // reuses the block only in the stream's order.
                if (threshold != null) {
                    threshold.close();
                }
                lse.close();
                gradLogprob.close();
                if (gradEntropy != null) {
                    gradEntropy.close();
                }
            }
            return new LossResult(value, logProbs, entropy, lossMetrics, fused).onCudaDevice(cudaDevice);
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
        return name + settings.toString().replace("LossSettings", "") + " temperature=" + temperature
                + (inPlaceBackward ? " inPlaceBackward" : "");
    }
}
