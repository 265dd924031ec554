package dev.gspo4j.internal;

import dev.gspo4j.Aggregation;
import dev.gspo4j.KlEstimator;

/**
 * Every option of the policy loss (docs/math.md, "Policy losses"), checked on construction. The loss
 * modules build one; {@link #gspo()} holds the GSPO paper's defaults.
 *
 * @param ratioLevel which ratio is clipped
 * @param aggregation how per-token terms reduce to a scalar (GSPO's surrogate is always the mean over responses)
 * @param klEstimator the KL estimator, used when {@code klCoef != 0}
 * @param checkFinite whether NaN/Inf in a counted input is an error
 * @param epsLow lower clip: ratios below {@code 1 - epsLow} are clipped, in [0, 1] (1: no lower bound, CISPO's default)
 * @param epsHigh upper clip: ratios above {@code 1 + epsHigh} are clipped, in [0, 1e6]
 * @param dualClip 0 (off) or c in (1, 1e6]: for {@code A < 0} the objective is at least {@code c * A}
 * @param logRatioClamp R in (0, 88]: log-ratios are clamped to [-R, R] before exp
 * @param normalizer 0 (local count) or a global count in [1e-6, 1e18] replacing the denominator of the aggregation
 * @param lengthNorm Lnorm of SEQ_MEAN_TOKEN_SUM_NORM, 0 for the default, else in [1e-6, 1e18]
 * @param klCoef the KL coefficient beta, in [-1e6, 1e6]
 * @param entropyCoef the entropy bonus coefficient, in [-1e6, 1e6]
 * @param objective the objective and its own parameters; CISPO and SAPO take the ratio level TOKEN or
 *     SEQUENCE_TOKEN, GMPO and LUSPO SEQUENCE, VESPO and DPPO TOKEN; dual clip only with the clipped ones
 * @param weights rollout correction and top-entropy selection ({@link TokenWeights#NONE}: off)
 */
public record LossSettings(
        RatioLevel ratioLevel,
        Aggregation aggregation,
        KlEstimator klEstimator,
        boolean checkFinite,
        double epsLow,
        double epsHigh,
        double dualClip,
        double logRatioClamp,
        double normalizer,
        double lengthNorm,
        double klCoef,
        double entropyCoef,
        ObjectiveParams objective,
        TokenWeights weights) {

    public LossSettings {
        Checks.notNull(objective, "objective");
        Checks.notNull(weights, "weights");
        Checks.notNull(ratioLevel, "ratioLevel");
        Checks.notNull(aggregation, "aggregation");
        Checks.notNull(klEstimator, "klEstimator");
        if (!(epsLow >= 0 && epsLow <= 1)) {
            throw new IllegalArgumentException("epsLow must be in [0, 1] (1: no lower bound), got " + epsLow);
        }
        if (!(epsHigh >= 0 && epsHigh <= MAX_EPS_HIGH)) {
            throw new IllegalArgumentException("epsHigh must be in [0, " + MAX_EPS_HIGH + "], got " + epsHigh);
        }
        if (!(dualClip == 0 || (dualClip > 1 && dualClip <= MAX_DUAL_CLIP))) {
            throw new IllegalArgumentException("dualClip must be 0 (off) or in (1, " + MAX_DUAL_CLIP + "], got " + dualClip);
        }
        if (!(logRatioClamp > 0 && logRatioClamp <= MAX_LOG_RATIO_CLAMP)) {
            throw new IllegalArgumentException("logRatioClamp must be in (0, " + MAX_LOG_RATIO_CLAMP + "] (exp(" + MAX_LOG_RATIO_CLAMP
                    + ") = 1.65e38 is about the largest ratio float32 holds), got " + logRatioClamp);
        }
        requireCount(normalizer, "normalizer", "0: the local count");
        requireCount(lengthNorm, "lengthNorm", "0: the default");
        requireCoefficient(klCoef, "klCoef");
        requireCoefficient(entropyCoef, "entropyCoef");
        final Objective kind = objective.objective();
        final boolean levelFits = switch (kind) {
            case CLIP -> true;
            case CISPO, SAPO -> ratioLevel != RatioLevel.SEQUENCE;
            case GMPO, LUSPO -> ratioLevel == RatioLevel.SEQUENCE;
            case VESPO, DPPO_TV, DPPO_KL -> ratioLevel == RatioLevel.TOKEN;
        };
        if (!levelFits) {
            throw new IllegalArgumentException(kind.label() + " does not take the ratio level " + ratioLevel);
        }
        if (dualClip != 0 && !kind.clipped()) {
            throw new IllegalArgumentException("dualClip (and delta) apply to the clipped objectives (GSPO, GSPO-token, GRPO, PPO, "
                    + "LUSPO), not to " + kind.label() + "; leave it 0");
        }
    }

    /** The largest epsHigh: 1 + epsHigh stays an ordinary number (a clip of 1e6 is no clip). */
    public static final double MAX_EPS_HIGH = 1e6;
    /** The largest dual clip c. */
    public static final double MAX_DUAL_CLIP = 1e6;
    /** The largest log-ratio clamp R: exp(R) fits float32. */
    public static final double MAX_LOG_RATIO_CLAMP = 88;
    /**
     * The range of an explicit normaliser or length norm. The loss divides by it: a subnormal or
     * tiny one makes 1/x infinite (and Inf * 0 = NaN); a count is at least 1, a per-rank share of
     * one well above 1e-6.
     */
    public static final double MIN_COUNT = 1e-6;
    public static final double MAX_COUNT = 1e18;
    /** The largest coefficient magnitude (KL, entropy): beyond it the loss loses its own terms. */
    public static final double MAX_COEFFICIENT = 1e6;

    /** Checks an explicit normaliser as the constructor does: 0 (the local count) or in [MIN_COUNT, MAX_COUNT]. */
    public static void requireNormalizer(double value) {
        requireCount(value, "normalizer", "0: the local count");
    }

    private static void requireCount(double value, String name, String zeroMeans) {
        if (!(value == 0 || (value >= MIN_COUNT && value <= MAX_COUNT))) {
            throw new IllegalArgumentException(name + " must be 0 (" + zeroMeans + ") or in [" + MIN_COUNT + ", " + MAX_COUNT
                    + "], got " + value);
        }
    }

    private static void requireCoefficient(double value, String name) {
        if (!(Math.abs(value) <= MAX_COEFFICIENT)) {
            throw new IllegalArgumentException(name + " must be finite and in [-" + MAX_COEFFICIENT + ", " + MAX_COEFFICIENT
                    + "], got " + value);
        }
    }

    /** GSPO as in the paper: sequence ratio, eps 3e-4 / 4e-4, R = 20, no KL, no entropy term. */
    public static LossSettings gspo() {
        return new LossSettings(RatioLevel.SEQUENCE, Aggregation.SEQ_MEAN_TOKEN_MEAN, KlEstimator.K3, true,
                3e-4, 4e-4, 0, 20, 0, 0, 0, 0, ObjectiveParams.of(Objective.CLIP), TokenWeights.NONE);
    }

    /** GRPO's token ratio with eps 0.2, sequence-mean token-mean, no KL. */
    public static LossSettings grpo() {
        return new LossSettings(RatioLevel.TOKEN, Aggregation.SEQ_MEAN_TOKEN_MEAN, KlEstimator.K3, true,
                0.2, 0.2, 0, 20, 0, 0, 0, 0, ObjectiveParams.of(Objective.CLIP), TokenWeights.NONE);
    }

    public LossSettings withRatioLevel(RatioLevel value) {
        return new LossSettings(value, aggregation, klEstimator, checkFinite, epsLow, epsHigh, dualClip, logRatioClamp, normalizer, lengthNorm, klCoef, entropyCoef, objective, weights);
    }

    public LossSettings withAggregation(Aggregation value) {
        return new LossSettings(ratioLevel, value, klEstimator, checkFinite, epsLow, epsHigh, dualClip, logRatioClamp, normalizer, lengthNorm, klCoef, entropyCoef, objective, weights);
    }

    public LossSettings withClip(double low, double high) {
        return new LossSettings(ratioLevel, aggregation, klEstimator, checkFinite, low, high, dualClip, logRatioClamp, normalizer, lengthNorm, klCoef, entropyCoef, objective, weights);
    }

    public LossSettings withDualClip(double value) {
        return new LossSettings(ratioLevel, aggregation, klEstimator, checkFinite, epsLow, epsHigh, value, logRatioClamp, normalizer, lengthNorm, klCoef, entropyCoef, objective, weights);
    }

    public LossSettings withLogRatioClamp(double value) {
        return new LossSettings(ratioLevel, aggregation, klEstimator, checkFinite, epsLow, epsHigh, dualClip, value, normalizer, lengthNorm, klCoef, entropyCoef, objective, weights);
    }

    public LossSettings withNormalizer(double value) {
        return new LossSettings(ratioLevel, aggregation, klEstimator, checkFinite, epsLow, epsHigh, dualClip, logRatioClamp, value, lengthNorm, klCoef, entropyCoef, objective, weights);
    }

    public LossSettings withLengthNorm(double value) {
        return new LossSettings(ratioLevel, aggregation, klEstimator, checkFinite, epsLow, epsHigh, dualClip, logRatioClamp, normalizer, value, klCoef, entropyCoef, objective, weights);
    }

    public LossSettings withKl(double coef, KlEstimator estimator) {
        return new LossSettings(ratioLevel, aggregation, estimator, checkFinite, epsLow, epsHigh, dualClip, logRatioClamp, normalizer, lengthNorm, coef, entropyCoef, objective, weights);
    }

    public LossSettings withEntropyCoef(double value) {
        return new LossSettings(ratioLevel, aggregation, klEstimator, checkFinite, epsLow, epsHigh, dualClip, logRatioClamp, normalizer, lengthNorm, klCoef, value, objective, weights);
    }

    /** The objective, with the ratio level it needs; the clip range and the aggregation stay as they are. */
    public LossSettings withObjective(ObjectiveParams value, RatioLevel level) {
        return new LossSettings(level, aggregation, klEstimator, checkFinite, epsLow, epsHigh, dualClip, logRatioClamp, normalizer, lengthNorm, klCoef, entropyCoef, value, weights);
    }

    public LossSettings withObjectiveParams(ObjectiveParams value) {
        return new LossSettings(ratioLevel, aggregation, klEstimator, checkFinite, epsLow, epsHigh, dualClip, logRatioClamp, normalizer, lengthNorm, klCoef, entropyCoef, value, weights);
    }

    public LossSettings withWeights(TokenWeights value) {
        return new LossSettings(ratioLevel, aggregation, klEstimator, checkFinite, epsLow, epsHigh, dualClip, logRatioClamp, normalizer, lengthNorm, klCoef, entropyCoef, objective, value);
    }

    public LossSettings withCheckFinite(boolean value) {
        return new LossSettings(ratioLevel, aggregation, klEstimator, value, epsLow, epsHigh, dualClip, logRatioClamp, normalizer, lengthNorm, klCoef, entropyCoef, objective, weights);
    }
}
