package dev.gspo4j.internal;

/** The policy objective: the C header's {@code gspo4j_objective} (docs/math.md "Further objectives"). */
public enum Objective {
    /** {@code min(ratio A, clip(ratio) A)}: GSPO, GSPO-token, GRPO, PPO, by the ratio level. */
    CLIP(0, "the clipped surrogate"),
    /** {@code sg[clip(r)] A lp}. */
    CISPO(1, "CISPO"),
    /** {@code (4 / tau) sigmoid(tau (r - 1)) A}. */
    SAPO(2, "SAPO"),
    /** {@code exp((1/L_b) sum l_t) A_b} with the pessimistic log-space clip l_t. */
    GMPO(3, "GMPO"),
    /** {@code L_b min(s_b A_b, clip(s_b) A_b)}. */
    LUSPO(4, "LUSPO"),
    /** {@code sg[W^k exp(lambda (1 - W))] A lp} with the product ratio W. */
    VESPO(5, "VESPO"),
    /** {@code keep_TV sg[min(r, C)] A lp}. */
    DPPO_TV(6, "DPPO-TV"),
    /** {@code keep_binaryKL sg[min(r, C)] A lp}. */
    DPPO_KL(7, "DPPO-KL");

    final int code;
    private final String label;

    Objective(int code, String label) {
        this.code = code;
        this.label = label;
    }

    /** The name users know it by, for messages. */
    public String label() {
        return label;
    }

    /** Whether dual clip (and its alias delta) applies: the objectives built on the clipped surrogate. */
    public boolean clipped() {
        return this == CLIP || this == LUSPO;
    }
}
