package dev.gspo4j.internal;

/** Which ratio the policy loss clips: the C header's {@code gspo4j_ratio_level}. */
public enum RatioLevel {
    /** GRPO / PPO: {@code r = exp(lp - olp)} per token. */
    TOKEN(0),
    /** GSPO: the length-normalised sequence ratio, one clip decision per response. */
    SEQUENCE(1),
    /** GSPO-token: {@code sg(s_b) * exp(lp - sg(lp))}, per-token advantages allowed. */
    SEQUENCE_TOKEN(2);

    final int code;

    RatioLevel(int code) {
        this.code = code;
    }
}
