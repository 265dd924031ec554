package dev.gspo4j;

/**
 * The options of rollout correction (docs/math.md, "Training-inference mismatch"): the inference
 * engine's log-probs {@code mu} of the sampled tokens ({@link LossInput.Builder#rolloutLogProbs})
 * against the trainer's old log-probs {@code olp} (the policy's own, without gradient, when the
 * input has none) give each counted token's policy term a weight {@code w} without gradient. The
 * weight is the product of an importance weight ({@link PolicyLoss.Builder#rolloutWeights}), a
 * rejection ({@link PolicyLoss.Builder#rolloutRejection}) and the off-policy sequence mask
 * ({@link PolicyLoss.Builder#offPolicyMask}). The KL and entropy terms are not weighted.
 */
public final class Rollout {
    private Rollout() {}

    /** Where the importance weight {@code rho} is formed (R is the loss's log-ratio clamp). */
    public enum Level {
        /** {@code rho_t = exp(clamp(olp_t - mu_t, -R, R))}, one per token (TRL/verl "token"). */
        TOKEN(1),
        /** {@code rho_b = exp(clamp(sum_t m (olp - mu), -R, R))}, the product over the response (TRL/verl "sequence"). */
        SEQUENCE(2),
        /** {@code rho_b = exp(clamp((1/L_b) sum_t m (olp - mu), -R, R))}, the geometric mean (verl "geometric"). */
        GEOMETRIC(3);

        private final int code;

        Level(int code) {
            this.code = code;
        }

        /**
         * The C header's value.
         *
         * @return the {@code gspo4j_rollout_level} value
         */
        public int code() {
            return code;
        }
    }

    /** What the band {@code [C_min, C_max]} does to {@code rho}. */
    public enum Mode {
        /** {@code w = clamp(rho, C_min, C_max)}: truncated importance sampling (TIS). */
        TRUNCATE(0),
        /** {@code w = rho} inside the band, else 0: masked importance sampling (MIS, IcePop's band). */
        MASK(1);

        private final int code;

        Mode(int code) {
            this.code = code;
        }

        /**
         * The C header's value.
         *
         * @return the {@code gspo4j_rollout_mode} value
         */
        public int code() {
            return code;
        }
    }

    /** The divergence of {@code olp} against {@code mu} that rejection bounds (verl's {@code rollout_rs}). */
    public enum Divergence {
        /** {@code olp - mu}, signed: rejected outside {@code [low, high]}. */
        K1(1),
        /** {@code (olp - mu)^2 / 2}: rejected above the threshold. */
        K2(2),
        /** {@code exp(mu - olp) - (mu - olp) - 1}: rejected above the threshold. */
        K3(3);

        private final int code;

        Divergence(int code) {
            this.code = code;
        }

        /**
         * The C header's value.
         *
         * @return the {@code gspo4j_divergence} value
         */
        public int code() {
            return code;
        }
    }

    /** Where rejection applies: to each token, or to a whole response by a statistic of its tokens. */
    public enum Scope {
        /** Each counted token on its own (verl {@code token_*}). */
        TOKEN(0),
        /** A response by the mean over its counted tokens (verl {@code seq_mean_*}). */
        MEAN(1),
        /** A response by the sum (verl {@code seq_sum_*}). */
        SUM(2),
        /** A response by the maximum (verl {@code seq_max_*}). */
        MAX(3);

        private final int code;

        Scope(int code) {
            this.code = code;
        }

        /**
         * The C header's value.
         *
         * @return the {@code gspo4j_rejection_scope} value
         */
        public int code() {
            return code;
        }
    }
}
