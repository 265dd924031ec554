package dev.gspo4j;

import dev.gspo4j.internal.Metric;
import org.bytedeco.pytorch.Tensor;

/**
 * SPEC.md's metrics of one loss call. They stay in a float32 tensor on the logits' device until a
 * number is asked for: reading one copies the whole set once (a device sync on a GPU).
 * Clip fractions are per response for GSPO and LUSPO and per counted token otherwise; ratio
 * statistics are of the one ratio per response where the objective has one (GSPO, GSPO-token,
 * LUSPO, GMPO, VESPO, the sequence variants of CISPO and SAPO) and per counted token otherwise
 * (README, "The objectives", says what each objective counts as clipped). The counts ({@link #sequences()}, {@link #tokens()}) are exact int64
 * values, counted apart from the float32 set (whose float32 slots for them lose integers past
 * 2^24). Belongs to its {@link LossResult}, and is closed with it: not thread-safe.
 */
public final class LossMetrics implements AutoCloseable {
    private final Tensor values;
    // Exact counts: 0-dim int64 tensors on the logits' device, or null where the count was known
    // on the host (then in knownSequences / knownTokens).
    private final Tensor sequenceCount;
    private final Tensor tokenCount;
    private final long knownSequences;
    private final long knownTokens;
    private float[] host;
    private long sequences = -1;
    private long tokens = -1;
    private boolean closed;

    LossMetrics(Tensor values, Tensor sequenceCount, long knownSequences, Tensor tokenCount, long knownTokens) {
        this.values = values;
        this.sequenceCount = sequenceCount;
        this.knownSequences = knownSequences;
        this.tokenCount = tokenCount;
        this.knownTokens = knownTokens;
    }

    /** The metrics as a float32 tensor {@code [13]} in {@link Metric} order, without a sync. */
    public Tensor tensor() {
        ensureOpen();
        return values;
    }

    private void ensureOpen() {
        if (closed) {
            throw new IllegalStateException("these metrics belong to a closed LossResult: read them (or clone tensor()) "
                    + "before closing it");
        }
    }

    private float get(Metric metric) {
        ensureOpen();
        if (host == null) {
            try (Tensor cpu = values.cpu(); Tensor contiguous = cpu.contiguous()) {
                final float[] copy = new float[Metric.COUNT];
                contiguous.data_ptr_float().get(copy);
                host = copy;
            }
        }
        return host[metric.index()];
    }

    /** The surrogate part of the loss. */
    public float policyLoss() { return get(Metric.POLICY_LOSS); }
    /** The aggregated KL term before its coefficient (0 without KL). */
    public float kl() { return get(Metric.KL); }
    /** The aggregated entropy before its coefficient. */
    public float entropy() { return get(Metric.ENTROPY); }
    /** Fraction clipped at 1 - eps_low with a negative advantage. */
    public float clipFractionLow() { return get(Metric.CLIP_FRACTION_LOW); }
    /** Fraction clipped at 1 + eps_high with a positive advantage. */
    public float clipFractionHigh() { return get(Metric.CLIP_FRACTION_HIGH); }
    /** Fraction held at c * A by the dual clip. */
    public float dualClipFraction() { return get(Metric.DUAL_CLIP_FRACTION); }
    public float ratioMean() { return get(Metric.RATIO_MEAN); }
    public float ratioMin() { return get(Metric.RATIO_MIN); }
    public float ratioMax() { return get(Metric.RATIO_MAX); }
    /** Token mean of old log-prob minus log-prob. */
    public float approxKl() { return get(Metric.APPROX_KL); }
    /** Token mean of the entropy. */
    public float entropyMean() { return get(Metric.ENTROPY_MEAN); }

    /** Responses with at least one counted token (exact). */
    public long sequences() {
        ensureOpen();
        if (sequences < 0) {
            sequences = sequenceCount == null ? knownSequences : sequenceCount.item_long();
        }
        return sequences;
    }

    /** Counted tokens (exact). */
    public long tokens() {
        ensureOpen();
        if (tokens < 0) {
            tokens = tokenCount == null ? knownTokens : tokenCount.item_long();
        }
        return tokens;
    }

    /** Releases the metrics' tensors; idempotent. Reading a metric afterwards is an IllegalStateException. */
    @Override
    public void close() {
        if (closed) {
            return;
        }
        closed = true;
        for (Tensor t : new Tensor[] {values, sequenceCount, tokenCount}) {
            if (t != null) {
                t.close();
            }
        }
    }

    @Override
    public String toString() {
        if (closed) {
            return "LossMetrics(closed)";
        }
        return String.format("loss_pi=%.6g kl=%.6g H=%.6g clip_low=%.4f clip_high=%.4f dual=%.4f ratio=%.6g [%.6g, %.6g] "
                + "approx_kl=%.6g sequences=%d tokens=%d", policyLoss(), kl(), entropyMean(), clipFractionLow(),
                clipFractionHigh(), dualClipFraction(), ratioMean(), ratioMin(), ratioMax(), approxKl(), sequences(), tokens());
    }
}
