package dev.gspo4j;

import java.util.Objects;
import org.bytedeco.pytorch.Tensor;

/**
 * The tensors of one loss call. Padded layout: logits {@code [B, T, V]} and every per-token tensor
 * {@code [B, T]}. Packed layout: logits {@code [N, V]}, per-token tensors {@code [N]}, and
 * {@link Builder#offsets} ({@code [B + 1]}) marking where each response starts.
 *
 * <p>The logits are read in place: any float32, bfloat16 or float16 tensor whose last dimension is
 * contiguous, such as the view {@code logits[:, :-1, :]}. The per-token and per-response tensors are
 * small (O(N)); any that is not already contiguous in the dtype the kernels use (int64 ids and
 * offsets, uint8 mask, float32 values) is converted, a copy of O(N).
 *
 * <p>Holds references to the caller's tensors, not copies; it does not close them. Immutable once
 * built; it may be shared between threads as long as nobody writes into its tensors meanwhile.
 */
public final class LossInput {
    final Tensor logits;
    final Tensor targets;
    final Tensor mask;
    final Tensor oldLogProbs;
    final Tensor refLogProbs;
    final Tensor advantages;
    final boolean tokenAdvantages;
    final Tensor offsets;

    private LossInput(Builder b) {
        this.logits = b.logits;
        this.targets = b.targets;
        this.mask = b.mask;
        this.oldLogProbs = b.oldLogProbs;
        this.refLogProbs = b.refLogProbs;
        this.advantages = b.advantages;
        this.tokenAdvantages = b.tokenAdvantages;
        this.offsets = b.offsets;
    }

    public static Builder builder() {
        return new Builder();
    }

    /** Builds a {@link LossInput}; logits, targets and advantages are required. */
    public static final class Builder {
        private Tensor logits;
        private Tensor targets;
        private Tensor mask;
        private Tensor oldLogProbs;
        private Tensor refLogProbs;
        private Tensor advantages;
        private boolean tokenAdvantages;
        private Tensor offsets;

        private Builder() {}

        /** {@code [B, T, V]} or packed {@code [N, V]}; float32, bfloat16 or float16; last dimension contiguous. */
        public Builder logits(Tensor logits) {
            this.logits = Objects.requireNonNull(logits, "logits");
            return this;
        }

        /** Token ids {@code [B, T]} or {@code [N]}, int64 or int32, each in [0, V). */
        public Builder targets(Tensor targets) {
            this.targets = Objects.requireNonNull(targets, "targets");
            return this;
        }

        /** Response mask {@code [B, T]} or {@code [N]} of 0/1 (bool, integer or floating); absent: every token counts. */
        public Builder mask(Tensor mask) {
            this.mask = mask;
            return this;
        }

        /** Old-policy log-probs {@code [B, T]} or {@code [N]}; absent: on-policy (ratio 1, gradient flowing). */
        public Builder oldLogProbs(Tensor oldLogProbs) {
            this.oldLogProbs = oldLogProbs;
            return this;
        }

        /** Reference-policy log-probs for the KL term, {@code [B, T]} or {@code [N]}. */
        public Builder refLogProbs(Tensor refLogProbs) {
            this.refLogProbs = refLogProbs;
            return this;
        }

        /** One advantage per response, {@code [B]}. */
        public Builder advantages(Tensor advantages) {
            this.advantages = Objects.requireNonNull(advantages, "advantages");
            this.tokenAdvantages = false;
            return this;
        }

        /** One advantage per token, {@code [B, T]} or {@code [N]} (GRPO, PPO, GSPO-token). */
        public Builder tokenAdvantages(Tensor advantages) {
            this.advantages = Objects.requireNonNull(advantages, "advantages");
            this.tokenAdvantages = true;
            return this;
        }

        /** Packed layout: {@code [B + 1]} non-decreasing token offsets from 0 to N. */
        public Builder offsets(Tensor offsets) {
            this.offsets = offsets;
            return this;
        }

        public LossInput build() {
            if (logits == null) {
                throw new IllegalArgumentException("logits are required");
            }
            if (targets == null) {
                throw new IllegalArgumentException("targets are required");
            }
            if (advantages == null) {
                throw new IllegalArgumentException("advantages are required");
            }
            return new LossInput(this);
        }
    }
}
