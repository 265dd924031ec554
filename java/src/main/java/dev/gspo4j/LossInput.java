package dev.gspo4j;

import dev.gspo4j.internal.LossSettings;
import org.bytedeco.pytorch.Tensor;

/**
 * The tensors of one loss call, all on one device: the CPU or one CUDA device (the logits'). Padded layout: logits {@code [B, T, V]} and every per-token tensor
 * {@code [B, T]}. Packed layout: logits {@code [N, V]}, per-token tensors {@code [N]}, and
 * {@link Builder#offsets} ({@code [B + 1]}) marking where each response starts.
 *
 * <p>The logits are read in place: any float32, bfloat16 or float16 tensor whose last dimension is
 * contiguous, such as the view {@code logits[:, :-1, :]}. The per-token and per-response tensors are
 * small (O(N)); any that is not already contiguous in the dtype the kernels use (int64 ids and
 * offsets, uint8 mask, float32 values) is converted, a copy of O(N).
 *
 * <p>In place of the logits, {@link Builder#hiddenStates} takes the hidden states and the lm_head
 * that makes them ({@code [B, T, H]} or {@code [N, H]}, weight {@code [V, H]}, bias {@code [V]}):
 * the fused linear path, whose logits exist only one chunk at a time ({@link Builder#logitsChunkBytes}).
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
    final Tensor rolloutLogProbs;
    final Double entropyThreshold; // null: the loss's top-entropy quantile of this call's tokens, if any
    final Tensor advantages;
    final boolean tokenAdvantages;
    final Tensor offsets;
    final Long ignoreIndex; // null: off
    final Double normalizer; // null: the PolicyLoss's own
    // The hidden-state path (logits == null): hidden states, the lm_head's weight and bias.
    final Tensor hiddenStates;
    final Tensor weight;
    final Tensor bias;
    final long logitsChunkBytes;

    private LossInput(Builder b) {
        this.logits = b.logits;
        this.targets = b.targets;
        this.mask = b.mask;
        this.oldLogProbs = b.oldLogProbs;
        this.refLogProbs = b.refLogProbs;
        this.rolloutLogProbs = b.rolloutLogProbs;
        this.entropyThreshold = b.entropyThreshold;
        this.advantages = b.advantages;
        this.tokenAdvantages = b.tokenAdvantages;
        this.offsets = b.offsets;
        this.ignoreIndex = b.ignoreIndex;
        this.normalizer = b.normalizer;
        this.hiddenStates = b.hiddenStates;
        this.weight = b.weight;
        this.bias = b.bias;
        this.logitsChunkBytes = b.logitsChunkBytes;
    }

    /**
     * The default budget of the hidden-state path's logits chunk: 128 MiB. Measured at N = 2048,
     * H = 896, V = 151936 fp32 (README, "Fused linear"): 64 MiB costs 1.31x the unfused path's
     * time, 128 MiB 1.19x and 256 MiB 1.15x (the weight gradient is read and written once per
     * chunk), with 31x, 12x and 7x less memory beyond the parameter gradients.
     */
    public static final long DEFAULT_LOGITS_CHUNK_BYTES = 128L << 20;

    /**
     * A new builder.
     *
     * @return an empty builder
     */
    public static Builder builder() {
        return new Builder();
    }

    /** Builds a {@link LossInput}; logits (or hidden states), targets and advantages are required. */
    public static final class Builder {
        private Tensor logits;
        private Tensor targets;
        private Tensor mask;
        private Tensor oldLogProbs;
        private Tensor refLogProbs;
        private Tensor rolloutLogProbs;
        private Double entropyThreshold;
        private Tensor advantages;
        private boolean tokenAdvantages;
        private Tensor offsets;
        private Long ignoreIndex;
        private Double normalizer;
        private Tensor hiddenStates;
        private Tensor weight;
        private Tensor bias;
        private long logitsChunkBytes = DEFAULT_LOGITS_CHUNK_BYTES;

        private Builder() {}

        /**
         * The policy's logits, read in place.
         *
         * @param logits {@code [B, T, V]} or packed {@code [N, V]}; float32, bfloat16 or float16; last
         *     dimension contiguous; on the CPU or a CUDA device (where the loss runs)
         * @return this builder
         */
        public Builder logits(Tensor logits) {
            TensorArgs.requireOpen(logits, "logits");
            this.logits = logits;
            return this;
        }

        /**
         * Token ids {@code [B, T]} or {@code [N]}, int64 or int32, each in [0, V). Ids are checked at masked
         * positions too (the kernels read every row); labels such as Hugging Face's {@code -100} need
         * {@link #ignoreIndex}.
         *
         * @param targets {@code [B, T]} or {@code [N]}, int64 or int32, on the logits' device
         * @return this builder
         */
        public Builder targets(Tensor targets) {
            TensorArgs.requireOpen(targets, "targets");
            this.targets = targets;
            return this;
        }

        /**
         * Response mask {@code [B, T]} or {@code [N]} of 0/1 (bool, integer or floating; any other value, NaN
         * included, is an error); absent: every token counts. See {@link #ignoreIndex} for labels that mark
         * ignored positions.
         *
         * @param mask {@code [B, T]} or {@code [N]}, bool, integer or floating 0/1, on the logits'
         *     device, or null
         * @return this builder
         */
        public Builder mask(Tensor mask) {
            optionalOpen(mask, "mask");
            this.mask = mask;
            return this;
        }

        /**
         * Old-policy log-probs; absent: on-policy (ratio 1, gradient flowing).
         *
         * @param oldLogProbs {@code [B, T]} or {@code [N]}, floating (read as float32), on the logits'
         *     device, or null; NaN or Inf on a counted token is a {@link NonFiniteDataException}
         * @return this builder
         */
        public Builder oldLogProbs(Tensor oldLogProbs) {
            optionalOpen(oldLogProbs, "oldLogProbs");
            this.oldLogProbs = oldLogProbs;
            return this;
        }

        /**
         * Reference-policy log-probs for the KL term.
         *
         * @param refLogProbs {@code [B, T]} or {@code [N]}, floating (read as float32), on the logits'
         *     device, or null (required when the loss has a KL coefficient)
         * @return this builder
         */
        public Builder refLogProbs(Tensor refLogProbs) {
            optionalOpen(refLogProbs, "refLogProbs");
            this.refLogProbs = refLogProbs;
            return this;
        }

        /**
         * The inference engine's log-probs {@code mu} of the sampled tokens (vLLM's or SGLang's
         * {@code logprobs}), for rollout correction ({@link PolicyLoss.Builder#rolloutWeights},
         * {@link PolicyLoss.Builder#rolloutRejection}, {@link PolicyLoss.Builder#offPolicyMask}) and the
         * mismatch metrics ({@link LossMetrics#rolloutKl()}, {@link LossMetrics#rolloutK3Kl()}). Given
         * without any rollout option, they only feed the metrics.
         *
         * @param rolloutLogProbs {@code [B, T]} or {@code [N]}, floating (read as float32), on the
         *     logits' device, or null (required by an importance weight or a rejection); NaN or Inf on
         *     a counted token is a {@link NonFiniteDataException}
         * @return this builder
         */
        public Builder rolloutLogProbs(Tensor rolloutLogProbs) {
            optionalOpen(rolloutLogProbs, "rolloutLogProbs");
            this.rolloutLogProbs = rolloutLogProbs;
            return this;
        }

        /**
         * The entropy threshold of top-entropy selection for this call, in place of the quantile of
         * this call's own tokens: only counted tokens with {@code H >= threshold} keep their policy
         * term. For data-parallel training pass the quantile of the whole step's entropies (gathered
         * over the ranks, as TRL does), so that every rank selects by the same threshold.
         *
         * @param threshold any number but NaN ({@code -Infinity} keeps every token); needs the loss's
         *     {@link PolicyLoss.Builder#topEntropyQuantile}
         * @return this builder
         */
        public Builder entropyThreshold(double threshold) {
            if (Double.isNaN(threshold)) {
                throw new IllegalArgumentException("entropyThreshold must not be NaN");
            }
            this.entropyThreshold = threshold;
            return this;
        }

        /**
         * One advantage per response.
         *
         * @param advantages {@code [B]}, floating (read as float32), on the logits' device
         * @return this builder
         */
        public Builder advantages(Tensor advantages) {
            TensorArgs.requireOpen(advantages, "advantages");
            this.advantages = advantages;
            this.tokenAdvantages = false;
            return this;
        }

        /**
         * One advantage per token (GRPO, PPO, GSPO-token and the token-level objectives).
         *
         * @param advantages {@code [B, T]} or {@code [N]}, floating (read as float32), on the logits' device
         * @return this builder
         */
        public Builder tokenAdvantages(Tensor advantages) {
            TensorArgs.requireOpen(advantages, "advantages");
            this.advantages = advantages;
            this.tokenAdvantages = true;
            return this;
        }

        /**
         * The packed layout's response boundaries.
         *
         * @param offsets {@code [B + 1]} non-decreasing token offsets from 0 to N, integer (read as
         *     int64), on the logits' device, or null (padded layout)
         * @return this builder
         */
        public Builder offsets(Tensor offsets) {
            optionalOpen(offsets, "offsets");
            this.offsets = offsets;
            return this;
        }

        /**
         * Treats every position whose target equals {@code index} as masked (Hugging Face's {@code -100}
         * labels): its target is read as 0 in gspo4j's own copy of the ids (the caller's tensor is not
         * modified), so the kernels never index outside a row, and the mask becomes {@code mask AND
         * (targets != index)}, or just {@code targets != index} without a mask. Such positions count
         * for nothing: no loss, no gradient, not in the token or response counts. Default: off,
         * where every id, masked or not, must be in [0, V). Costs two O(N) passes and an O(N) copy.
         *
         * @param index the label of ignored positions, e.g. -100
         * @return this builder
         */
        public Builder ignoreIndex(long index) {
            this.ignoreIndex = index;
            return this;
        }

        /**
         * The normaliser of this call, overriding {@link PolicyLoss.Builder#normalizer} of the loss:
         * a global count replacing the local denominator of the aggregation (responses, counted
         * tokens, or B for SEQ_MEAN_TOKEN_SUM_NORM), for a count that changes per step (tokens
         * across data-parallel ranks, or across the micro-batches of one accumulated step). 0
         * means the local count for this call, whatever the loss's setting. Unset: the loss's.
         *
         * @param count 0 or in [1e-6, 1e18], the range of {@link PolicyLoss.Builder#normalizer}
         * @return this builder
         */
        public Builder normalizer(double count) {
            LossSettings.requireNormalizer(count);
            this.normalizer = count;
            return this;
        }

        /**
         * The fused linear path, in place of {@link #logits}: the loss of the logits
         * {@code hidden @ weight^T + bias} (an lm_head, {@code nn.Linear(H, V)}), which never exist
         * whole: they are computed by libtorch's matrix product one chunk of token rows at a time
         * (at most {@link #logitsChunkBytes} of them), read by the same fused kernels, and recomputed
         * chunk by chunk in the backward, whose gradient goes to the hidden states, the weight and
         * the bias (each that requires grad). Every other input and option is as with logits.
         *
         * @param hidden {@code [B, T, H]} (padded) or {@code [N, H]} (packed, with {@link #offsets});
         *     float32, bfloat16 or float16
         * @param weight {@code [V, H]}, the hidden states' dtype and device
         * @param bias {@code [V]} in the same dtype, or null
         * @return this builder
         */
        public Builder hiddenStates(Tensor hidden, Tensor weight, Tensor bias) {
            TensorArgs.requireOpen(hidden, "hiddenStates");
            TensorArgs.requireOpen(weight, "weight");
            optionalOpen(bias, "bias");
            this.hiddenStates = hidden;
            this.weight = weight;
            this.bias = bias;
            return this;
        }

        /**
         * The hidden-state path's memory budget for one chunk of logits, in bytes: a chunk holds
         * {@code max(1, bytes / (V * element size))} token rows, and that one buffer serves every
         * chunk of the forward and of the backward (the gradient is written into it in place).
         * Default {@link #DEFAULT_LOGITS_CHUNK_BYTES} (128 MiB: 441 rows of V = 151936 in bf16, 220 in
         * fp32). Smaller saves memory and costs time: each chunk reads and writes the whole weight
         * gradient once.
         *
         * @param bytes at least 1
         * @return this builder
         */
        public Builder logitsChunkBytes(long bytes) {
            if (bytes < 1) {
                throw new IllegalArgumentException("logitsChunkBytes must be >= 1, got " + bytes);
            }
            this.logitsChunkBytes = bytes;
            return this;
        }

        private static void optionalOpen(Tensor t, String name) {
            if (t != null) {
                TensorArgs.requireOpen(t, name);
            }
        }

        /**
         * The input; its shapes, dtypes and devices are checked by {@link PolicyLoss#compute}.
         *
         * @return the input
         * @throws IllegalArgumentException when the logits, targets or advantages are missing
         */
        public LossInput build() {
            if (logits == null && hiddenStates == null) {
                throw new IllegalArgumentException("logits are required (or hiddenStates(hidden, weight, bias) for the fused "
                        + "linear path)");
            }
            if (logits != null && hiddenStates != null) {
                throw new IllegalArgumentException("logits and hiddenStates are both set: give one, the logits or the hidden "
                        + "states with the lm_head that makes them");
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
