package dev.gspo4j;

/** Per-token estimators of KL(policy || reference), with {@code d = lp_ref - lp}. */
public enum KlEstimator {
    /** {@code -d}. */
    K1(0),
    /** {@code d^2 / 2}. */
    K2(1),
    /** {@code exp(d) - d - 1}: unbiased and non-negative. */
    K3(2),
    /** The value of K3 with the gradient of K2 (verl's {@code "k3+"}). */
    K3_PLUS(3),
    /**
     * {@code r_t * k3} with the token ratio {@code r_t = exp(lp - olp)}, differentiated through both
     * factors (DeepSeek-V3.2; TRL's {@code use_bias_correction_kl}, which uses its ratio at its
     * importance-sampling level: with GSPO's sequence level TRL multiplies by s_b instead).
     */
    K3_UNBIASED(4),
    /** {@code |d|} (verl's {@code "abs"}). */
    ABS(5),
    /**
     * K3 with its estimate clamped to [-10, 10] (verl's {@code "low_var_kl"}, whose {@code d} is
     * clamped to [-20, 20] first, as {@code logRatioClamp}'s default 20 does here): no gradient
     * where the clamp binds, as {@code torch.clamp}. Since k3 >= 0, only the upper bound can bind,
     * for {@code d} above about 2.6 (a reference log-prob far above the policy's).
     */
    LOW_VAR_KL(6);

    private final int code;

    KlEstimator(int code) {
        this.code = code;
    }

    /**
     * The C header's value of this estimator.
     *
     * @return the {@code gspo4j_kl_estimator} value
     */
    public int code() {
        return code;
    }
}
