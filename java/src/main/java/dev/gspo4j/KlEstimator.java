package dev.gspo4j;

/** Per-token estimators of KL(policy || reference), with {@code d = lp_ref - lp}. */
public enum KlEstimator {
    /** {@code -d}. */
    K1(0),
    /** {@code d^2 / 2}. */
    K2(1),
    /** {@code exp(d) - d - 1}: unbiased and non-negative. */
    K3(2);

    private final int code;

    KlEstimator(int code) {
        this.code = code;
    }

    /** The C header's {@code gspo4j_kl_estimator} value. */
    public int code() {
        return code;
    }
}
