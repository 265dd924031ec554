package dev.gspo4j;

/**
 * How a per-token quantity q (the surrogate, the KL term, the entropy) becomes a scalar; m is the
 * response mask, L_b the counted tokens of response b, B' the responses with L_b > 0.
 */
public enum Aggregation {
    /** {@code (1/B') sum_b (1/L_b) sum_t m q}: the GRPO paper's and GSPO's. */
    SEQ_MEAN_TOKEN_MEAN(0),
    /** {@code sum m q / sum m}: DAPO's. */
    TOKEN_MEAN(1),
    /** {@code (1/B') sum_b sum_t m q}. */
    SEQ_MEAN_TOKEN_SUM(2),
    /** {@code sum m q / (B * Lnorm)}: Dr. GRPO's, Lnorm a constant length. */
    SEQ_MEAN_TOKEN_SUM_NORM(3);

    private final int code;

    Aggregation(int code) {
        this.code = code;
    }

    /**
     * The C header's value of this aggregation.
     *
     * @return the {@code gspo4j_aggregation} value
     */
    public int code() {
        return code;
    }
}
