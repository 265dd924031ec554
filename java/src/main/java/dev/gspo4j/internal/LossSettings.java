package dev.gspo4j.internal;

import dev.gspo4j.Aggregation;
import dev.gspo4j.KlEstimator;

/**
 * Every option of the policy loss (SPEC.md "Policy losses"), checked on construction. The loss
 * modules build one; {@link #gspo()} holds the GSPO paper's defaults.
 *
 * @param ratioLevel which ratio is clipped
 * @param aggregation how per-token terms reduce to a scalar (GSPO's surrogate is always the mean over responses)
 * @param klEstimator the KL estimator, used when {@code klCoef != 0}
 * @param checkFinite whether NaN/Inf in a counted input is an error
 * @param epsLow lower clip: ratios below {@code 1 - epsLow} are clipped, in [0, 1)
 * @param epsHigh upper clip: ratios above {@code 1 + epsHigh} are clipped, >= 0
 * @param dualClip 0 (off) or c > 1: for A < 0 the objective is at least {@code c * A}
 * @param logRatioClamp R > 0: log-ratios are clamped to [-R, R] before exp
 * @param normalizer 0 (local count) or a global count replacing the denominator of the aggregation
 * @param lengthNorm Lnorm of SEQ_MEAN_TOKEN_SUM_NORM, 0 for the default
 * @param klCoef the KL coefficient beta
 * @param entropyCoef the entropy bonus coefficient
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
        double entropyCoef) {

    public LossSettings {
        Checks.notNull(ratioLevel, "ratioLevel");
        Checks.notNull(aggregation, "aggregation");
        Checks.notNull(klEstimator, "klEstimator");
        if (!(epsLow >= 0 && epsLow < 1)) {
            throw new IllegalArgumentException("epsLow must be in [0, 1), got " + epsLow);
        }
        if (!(epsHigh >= 0) || Double.isInfinite(epsHigh)) {
            throw new IllegalArgumentException("epsHigh must be finite and >= 0, got " + epsHigh);
        }
        if (!(dualClip == 0 || (dualClip > 1 && Double.isFinite(dualClip)))) {
            throw new IllegalArgumentException("dualClip must be 0 (off) or > 1, got " + dualClip);
        }
        if (!(logRatioClamp > 0) || Double.isInfinite(logRatioClamp)) {
            throw new IllegalArgumentException("logRatioClamp must be finite and > 0, got " + logRatioClamp);
        }
        if (!(normalizer >= 0) || Double.isInfinite(normalizer)) {
            throw new IllegalArgumentException("normalizer must be finite and >= 0 (0: local count), got " + normalizer);
        }
        if (!(lengthNorm >= 0) || Double.isInfinite(lengthNorm)) {
            throw new IllegalArgumentException("lengthNorm must be finite and >= 0 (0: default), got " + lengthNorm);
        }
        Checks.finite(klCoef, "klCoef");
        Checks.finite(entropyCoef, "entropyCoef");
    }

    /** GSPO as in the paper: sequence ratio, eps 3e-4 / 4e-4, R = 20, no KL, no entropy term. */
    public static LossSettings gspo() {
        return new LossSettings(RatioLevel.SEQUENCE, Aggregation.SEQ_MEAN_TOKEN_MEAN, KlEstimator.K3, true,
                3e-4, 4e-4, 0, 20, 0, 0, 0, 0);
    }

    /** GRPO's token ratio with eps 0.2, sequence-mean token-mean, no KL. */
    public static LossSettings grpo() {
        return new LossSettings(RatioLevel.TOKEN, Aggregation.SEQ_MEAN_TOKEN_MEAN, KlEstimator.K3, true,
                0.2, 0.2, 0, 20, 0, 0, 0, 0);
    }

    public LossSettings withRatioLevel(RatioLevel value) {
        return new LossSettings(value, aggregation, klEstimator, checkFinite, epsLow, epsHigh, dualClip, logRatioClamp, normalizer, lengthNorm, klCoef, entropyCoef);
    }

    public LossSettings withAggregation(Aggregation value) {
        return new LossSettings(ratioLevel, value, klEstimator, checkFinite, epsLow, epsHigh, dualClip, logRatioClamp, normalizer, lengthNorm, klCoef, entropyCoef);
    }

    public LossSettings withClip(double low, double high) {
        return new LossSettings(ratioLevel, aggregation, klEstimator, checkFinite, low, high, dualClip, logRatioClamp, normalizer, lengthNorm, klCoef, entropyCoef);
    }

    public LossSettings withDualClip(double value) {
        return new LossSettings(ratioLevel, aggregation, klEstimator, checkFinite, epsLow, epsHigh, value, logRatioClamp, normalizer, lengthNorm, klCoef, entropyCoef);
    }

    public LossSettings withLogRatioClamp(double value) {
        return new LossSettings(ratioLevel, aggregation, klEstimator, checkFinite, epsLow, epsHigh, dualClip, value, normalizer, lengthNorm, klCoef, entropyCoef);
    }

    public LossSettings withNormalizer(double value) {
        return new LossSettings(ratioLevel, aggregation, klEstimator, checkFinite, epsLow, epsHigh, dualClip, logRatioClamp, value, lengthNorm, klCoef, entropyCoef);
    }

    public LossSettings withLengthNorm(double value) {
        return new LossSettings(ratioLevel, aggregation, klEstimator, checkFinite, epsLow, epsHigh, dualClip, logRatioClamp, normalizer, value, klCoef, entropyCoef);
    }

    public LossSettings withKl(double coef, KlEstimator estimator) {
        return new LossSettings(ratioLevel, aggregation, estimator, checkFinite, epsLow, epsHigh, dualClip, logRatioClamp, normalizer, lengthNorm, coef, entropyCoef);
    }

    public LossSettings withEntropyCoef(double value) {
        return new LossSettings(ratioLevel, aggregation, klEstimator, checkFinite, epsLow, epsHigh, dualClip, logRatioClamp, normalizer, lengthNorm, klCoef, value);
    }

    public LossSettings withCheckFinite(boolean value) {
        return new LossSettings(ratioLevel, aggregation, klEstimator, value, epsLow, epsHigh, dualClip, logRatioClamp, normalizer, lengthNorm, klCoef, entropyCoef);
    }
}
