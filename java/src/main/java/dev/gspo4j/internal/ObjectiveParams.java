package dev.gspo4j.internal;

/**
 * Which objective the policy loss computes and the parameters of the objectives that have their own
 * (docs/math.md "Further objectives"); the clip range, R and the aggregation stay in {@link LossSettings}.
 *
 * @param objective the objective
 * @param sapoTauPos SAPO's temperature for A > 0, in (0, 1e4]
 * @param sapoTauNeg SAPO's temperature for A <= 0, in (0, 1e4]
 * @param vespoKPos VESPO's exponent k for A >= 0, in [0, 1e3]
 * @param vespoLambdaPos VESPO's lambda for A >= 0, in [0, 1e3]
 * @param vespoKNeg VESPO's k for A < 0, in [0, 1e3]
 * @param vespoLambdaNeg VESPO's lambda for A < 0, in [0, 1e3]
 * @param dppoDeltaLow DPPO's lower divergence bound, in [0, 1e6]
 * @param dppoDeltaHigh DPPO's upper divergence bound, in [0, 1e6]
 * @param dppoRatioCap DPPO's C (the weight is sg[min(r, C)]), in (0, 1e38]
 */
public record ObjectiveParams(
        Objective objective,
        double sapoTauPos,
        double sapoTauNeg,
        double vespoKPos,
        double vespoLambdaPos,
        double vespoKNeg,
        double vespoLambdaNeg,
        double dppoDeltaLow,
        double dppoDeltaHigh,
        double dppoRatioCap) {

    /** The largest SAPO temperature. */
    public static final double MAX_SAPO_TAU = 1e4;
    /** The largest VESPO k or lambda: W^k exp(lambda (1 - W)) is evaluated in float64 log space. */
    public static final double MAX_VESPO_SHAPE = 1e3;
    /** The largest DPPO divergence bound (a probability difference or a binary KL; 1e6 is no bound). */
    public static final double MAX_DPPO_DELTA = 1e6;
    /** The largest DPPO ratio cap. */
    public static final double MAX_DPPO_RATIO_CAP = 1e38;

    public ObjectiveParams {
        Checks.notNull(objective, "objective");
        requireIn(sapoTauPos, "sapoTauPos", false, MAX_SAPO_TAU);
        requireIn(sapoTauNeg, "sapoTauNeg", false, MAX_SAPO_TAU);
        requireIn(vespoKPos, "vespoKPos", true, MAX_VESPO_SHAPE);
        requireIn(vespoLambdaPos, "vespoLambdaPos", true, MAX_VESPO_SHAPE);
        requireIn(vespoKNeg, "vespoKNeg", true, MAX_VESPO_SHAPE);
        requireIn(vespoLambdaNeg, "vespoLambdaNeg", true, MAX_VESPO_SHAPE);
        requireIn(dppoDeltaLow, "dppoDeltaLow", true, MAX_DPPO_DELTA);
        requireIn(dppoDeltaHigh, "dppoDeltaHigh", true, MAX_DPPO_DELTA);
        requireIn(dppoRatioCap, "dppoRatioCap", false, MAX_DPPO_RATIO_CAP);
    }

    private static void requireIn(double value, String name, boolean zeroAllowed, double max) {
        if (!((zeroAllowed ? value >= 0 : value > 0) && value <= max)) {
            throw new IllegalArgumentException(name + " must be in " + (zeroAllowed ? "[0, " : "(0, ") + max + "], got " + value);
        }
    }

    /** The anchors' defaults (SAPO tau 1 / 1.05, VESPO (2, 3) / (3, 2), DPPO-TV delta 0.15 / 0.15, C = 20). */
    public static ObjectiveParams of(Objective objective) {
        final double delta = objective == Objective.DPPO_KL ? 0.05 : 0.15;
        return new ObjectiveParams(objective, 1.0, 1.05, 2, 3, 3, 2, delta, delta, 20);
    }

    public ObjectiveParams withSapoTemperatures(double pos, double neg) {
        return new ObjectiveParams(objective, pos, neg, vespoKPos, vespoLambdaPos, vespoKNeg, vespoLambdaNeg, dppoDeltaLow, dppoDeltaHigh,
                dppoRatioCap);
    }

    public ObjectiveParams withVespoShape(double kPos, double lambdaPos, double kNeg, double lambdaNeg) {
        return new ObjectiveParams(objective, sapoTauPos, sapoTauNeg, kPos, lambdaPos, kNeg, lambdaNeg, dppoDeltaLow, dppoDeltaHigh,
                dppoRatioCap);
    }

    public ObjectiveParams withDppoDivergence(double low, double high) {
        return new ObjectiveParams(objective, sapoTauPos, sapoTauNeg, vespoKPos, vespoLambdaPos, vespoKNeg, vespoLambdaNeg, low, high,
                dppoRatioCap);
    }

    public ObjectiveParams withDppoRatioCap(double cap) {
        return new ObjectiveParams(objective, sapoTauPos, sapoTauNeg, vespoKPos, vespoLambdaPos, vespoKNeg, vespoLambdaNeg, dppoDeltaLow,
                dppoDeltaHigh, cap);
    }
}
