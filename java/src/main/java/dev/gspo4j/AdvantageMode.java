package dev.gspo4j;

/** How group-relative advantages are formed from the outcome rewards of a group of G responses. */
public enum AdvantageMode {
    /** {@code (r - mean) / (std + eps)}, Bessel-corrected std: GRPO's and GSPO's. */
    MEAN_STD(0),
    /** {@code r - mean}: Dr. GRPO's. */
    MEAN(1),
    /** {@code r_i - (sum - r_i) / (G - 1)}: leave-one-out; needs G >= 2. */
    RLOO(2),
    /**
     * {@code (r - group mean) / (std + eps)} with the Bessel-corrected std of every reward of the call
     * (TRL's {@code scale_rewards="batch"}); a group whose rewards are all equal still gets exactly 0.
     * Across data-parallel ranks the std needs the gathered rewards: call it on them.
     */
    MEAN_BATCH_STD(3);

    private final int code;

    AdvantageMode(int code) {
        this.code = code;
    }

    /**
     * The C header's value of this mode.
     *
     * @return the {@code gspo4j_advantage_mode} value
     */
    public int code() {
        return code;
    }
}
