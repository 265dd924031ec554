package dev.gspo4j.internal;

/** Slots of the metrics array the policy loss writes: the C header's {@code gspo4j_metric}. */
public enum Metric {
    POLICY_LOSS,
    KL,
    ENTROPY,
    CLIP_FRACTION_LOW,
    CLIP_FRACTION_HIGH,
    DUAL_CLIP_FRACTION,
    RATIO_MEAN,
    RATIO_MIN,
    RATIO_MAX,
    APPROX_KL,
    ENTROPY_MEAN,
    SEQUENCES,
    TOKENS,
    ROLLOUT_WEIGHT_MEAN,
    ROLLOUT_MASKED_FRACTION,
    ROLLOUT_SEQ_MASKED_FRACTION,
    ROLLOUT_KL,
    ROLLOUT_K3_KL,
    ENTROPY_KEPT_FRACTION;

    /** Length of the metrics array. */
    public static final int COUNT = values().length;

    /** Index into the metrics array (the enum order is the header's). */
    public int index() {
        return ordinal();
    }
}
