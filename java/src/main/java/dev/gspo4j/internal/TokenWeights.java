package dev.gspo4j.internal;

import dev.gspo4j.Rollout;

/**
 * The options that weight each counted token's policy term (docs/math.md "Training-inference
 * mismatch" and "Token selection"): rollout correction and top-entropy selection. All off in
 * {@link #NONE}.
 *
 * @param level the importance weight's level, or null (no importance weight)
 * @param mode what the band does to the importance weight
 * @param cMin the band's lower bound, 0 for none, else finite and at most cMax
 * @param cMax the band's upper bound, {@code +Infinity} for none
 * @param divergence the rejection's divergence, or null (no rejection)
 * @param scope where rejection applies
 * @param low K1's lower bound (rejected below it)
 * @param high K1's upper bound (at least low); K2 and K3's threshold (above 0)
 * @param offPolicyMask whether the off-policy sequence mask is on
 * @param offPolicyDelta the mask's delta (finite)
 * @param topEntropyRho 0 (off) or the fraction of highest-entropy tokens kept, in (0, 1]
 */
public record TokenWeights(
        Rollout.Level level,
        Rollout.Mode mode,
        double cMin,
        double cMax,
        Rollout.Divergence divergence,
        Rollout.Scope scope,
        double low,
        double high,
        boolean offPolicyMask,
        double offPolicyDelta,
        double topEntropyRho) {

    /** Nothing weighted. */
    public static final TokenWeights NONE = new TokenWeights(null, Rollout.Mode.TRUNCATE, 0, Double.POSITIVE_INFINITY, null,
            Rollout.Scope.TOKEN, 0, 0, false, 0, 0);

    public TokenWeights {
        Checks.notNull(mode, "mode");
        Checks.notNull(scope, "scope");
        if (!(cMin >= 0 && cMin < Double.POSITIVE_INFINITY)) {
            throw new IllegalArgumentException("cMin must be finite and >= 0 (0: no lower bound), got " + cMin);
        }
        if (!(cMax > 0) || !(cMax >= cMin)) {
            throw new IllegalArgumentException("cMax must be > 0 and >= cMin = " + cMin
                    + " (Double.POSITIVE_INFINITY: no upper bound), got " + cMax);
        }
        if (divergence != null) {
            if (!Double.isFinite(high) || !Double.isFinite(low)) {
                throw new IllegalArgumentException("the rejection bounds must be finite, got low = " + low + " and high = " + high);
            }
            if (divergence == Rollout.Divergence.K1 ? low > high : !(high > 0)) {
                throw new IllegalArgumentException(divergence == Rollout.Divergence.K1
                        ? "K1 rejection needs low <= high, got low = " + low + " and high = " + high
                        : divergence + " rejection needs a threshold > 0, got " + high);
            }
        }
        if (!Double.isFinite(offPolicyDelta)) {
            throw new IllegalArgumentException("offPolicyDelta must be finite, got " + offPolicyDelta);
        }
        if (!(topEntropyRho == 0 || (topEntropyRho > 0 && topEntropyRho <= 1))) {
            throw new IllegalArgumentException("topEntropyQuantile rho must be in (0, 1] (1 keeps every token), got " + topEntropyRho);
        }
    }

    /** Whether the kernel needs the rollout log-probs (an importance weight or a rejection). */
    public boolean needsRolloutLogProbs() {
        return level != null || divergence != null;
    }

    /** Whether top-entropy selection is on. */
    public boolean topEntropy() {
        return topEntropyRho > 0;
    }

    public TokenWeights withImportance(Rollout.Level value, Rollout.Mode valueMode, double min, double max) {
        Checks.notNull(value, "level");
        Checks.notNull(valueMode, "mode");
        return new TokenWeights(value, valueMode, min, max, divergence, scope, low, high, offPolicyMask, offPolicyDelta, topEntropyRho);
    }

    public TokenWeights withRejection(Rollout.Divergence value, Rollout.Scope valueScope, double valueLow, double valueHigh) {
        Checks.notNull(value, "divergence");
        Checks.notNull(valueScope, "scope");
        return new TokenWeights(level, mode, cMin, cMax, value, valueScope, valueLow, valueHigh, offPolicyMask, offPolicyDelta,
                topEntropyRho);
    }

    public TokenWeights withOffPolicyMask(double delta) {
        return new TokenWeights(level, mode, cMin, cMax, divergence, scope, low, high, true, delta, topEntropyRho);
    }

    public TokenWeights withTopEntropy(double rho) {
        return new TokenWeights(level, mode, cMin, cMax, divergence, scope, low, high, offPolicyMask, offPolicyDelta, rho);
    }
}
