package dev.gspo4j;

import dev.gspo4j.internal.Metric;
import dev.gspo4j.internal.Tensors;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.Map;
import org.bytedeco.pytorch.Scalar;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorVector;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * The metrics of one loss call (<a href="https://github.com/gspo4j/gspo4j/blob/main/docs/math.md#metrics">docs/math.md,
 * "Metrics"</a>). They stay in a float32 tensor on the logits' device until a
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

    /**
     * The metrics as they are on the device, without a sync: a float32 tensor {@code [19]} on the
     * logits' device (CPU or CUDA), owned by this object (clone it to keep it past {@link #close()}).
     * Its slots, in this order (the C header's {@code gspo4j_metric}):
     * <ol start="0">
     * <li>{@link #policyLoss()}</li>
     * <li>{@link #kl()}</li>
     * <li>{@link #entropy()}</li>
     * <li>{@link #clipFractionLow()}</li>
     * <li>{@link #clipFractionHigh()}</li>
     * <li>{@link #dualClipFraction()}</li>
     * <li>{@link #ratioMean()}</li>
     * <li>{@link #ratioMin()}</li>
     * <li>{@link #ratioMax()}</li>
     * <li>{@link #approxKl()}</li>
     * <li>{@link #entropyMean()}</li>
     * <li>{@link #sequences()}, as a float32 (inexact past 2^24)</li>
     * <li>{@link #tokens()}, as a float32 (inexact past 2^24)</li>
     * <li>{@link #rolloutWeightMean()}</li>
     * <li>{@link #rolloutMaskedFraction()}</li>
     * <li>{@link #rolloutSeqMaskedFraction()}</li>
     * <li>{@link #rolloutKl()}</li>
     * <li>{@link #rolloutK3Kl()}</li>
     * <li>{@link #entropyKeptFraction()}</li>
     * </ol>
     *
     * @return the {@code [19]} float32 tensor on the logits' device
     */
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

    /** @return the surrogate part of the loss */
    public float policyLoss() { return get(Metric.POLICY_LOSS); }
    /** @return the aggregated KL term before its coefficient (0 without KL) */
    public float kl() { return get(Metric.KL); }
    /** @return the aggregated entropy before its coefficient */
    public float entropy() { return get(Metric.ENTROPY); }
    /** @return the fraction clipped at 1 - eps_low with a negative advantage */
    public float clipFractionLow() { return get(Metric.CLIP_FRACTION_LOW); }
    /** @return the fraction clipped at 1 + eps_high with a positive advantage */
    public float clipFractionHigh() { return get(Metric.CLIP_FRACTION_HIGH); }
    /** @return the fraction held at c * A by the dual clip */
    public float dualClipFraction() { return get(Metric.DUAL_CLIP_FRACTION); }
    /** @return the mean of the ratio (per response or per counted token, see above) */
    public float ratioMean() { return get(Metric.RATIO_MEAN); }
    /** @return the smallest ratio */
    public float ratioMin() { return get(Metric.RATIO_MIN); }
    /** @return the largest ratio */
    public float ratioMax() { return get(Metric.RATIO_MAX); }
    /** @return the token mean of old log-prob minus log-prob (the approximate KL) */
    public float approxKl() { return get(Metric.APPROX_KL); }
    /** @return the token mean of the entropy over counted tokens */
    public float entropyMean() { return get(Metric.ENTROPY_MEAN); }
    /**
     * @return the token mean over counted tokens of the rollout weight w (importance weight x
     *     rejection x off-policy mask; 1 without rollout correction)
     */
    public float rolloutWeightMean() { return get(Metric.ROLLOUT_WEIGHT_MEAN); }
    /** @return the fraction of counted tokens whose rollout weight is 0 (masked or rejected) */
    public float rolloutMaskedFraction() { return get(Metric.ROLLOUT_MASKED_FRACTION); }
    /** @return the fraction of counted responses whose every rollout weight is 0 */
    public float rolloutSeqMaskedFraction() { return get(Metric.ROLLOUT_SEQ_MASKED_FRACTION); }
    /** @return the token mean of {@code mu - olp} (0 without rollout log-probs) */
    public float rolloutKl() { return get(Metric.ROLLOUT_KL); }
    /** @return the token mean of {@code exp(olp - mu) - (olp - mu) - 1}, unclamped (0 without rollout log-probs) */
    public float rolloutK3Kl() { return get(Metric.ROLLOUT_K3_KL); }
    /** @return top-entropy selection's kept fraction of the counted tokens (1 without selection) */
    public float entropyKeptFraction() { return get(Metric.ENTROPY_KEPT_FRACTION); }

    /**
     * The responses with at least one counted token.
     *
     * @return the exact count
     */
    public long sequences() {
        ensureOpen();
        if (sequences < 0) {
            sequences = sequenceCount == null ? knownSequences : sequenceCount.item_long();
        }
        return sequences;
    }

    /**
     * The counted tokens.
     *
     * @return the exact count
     */
    public long tokens() {
        ensureOpen();
        if (tokens < 0) {
            tokens = tokenCount == null ? knownTokens : tokenCount.item_long();
        }
        return tokens;
    }

    /**
     * Every metric under the names TRL's {@code GRPOTrainer} and verl's actor log, plus gspo4j's own,
     * read from the device in one copy (one sync on a GPU; later reads of this object use it too).
     * Insertion-ordered; values are doubles (the counts exact). The mapping, where the definitions
     * agree and where they differ:
     * <table>
     * <caption>asMap keys</caption>
     * <tr><th>key</th><th>value</th><th>as logged by</th></tr>
     * <tr><td>{@code clip_ratio/low_mean}</td><td>{@link #clipFractionLow()}</td><td>TRL: the fraction with ratio
     *     below 1 - eps_low and a negative advantage</td></tr>
     * <tr><td>{@code clip_ratio/high_mean}</td><td>{@link #clipFractionHigh()}</td><td>TRL: above 1 + eps_high with a
     *     positive advantage</td></tr>
     * <tr><td>{@code clip_ratio/region_mean}</td><td>low + high (disjoint events)</td><td>TRL</td></tr>
     * <tr><td>{@code entropy}</td><td>{@link #entropyMean()}</td><td>TRL: the token mean over counted tokens</td></tr>
     * <tr><td>{@code kl}</td><td>{@link #kl()}</td><td>TRL logs the token mean of the per-token KL; this is the KL
     *     term as aggregated by the loss's aggregation (the same number under {@code TOKEN_MEAN}); 0 without KL</td></tr>
     * <tr><td>{@code actor/pg_loss}</td><td>{@link #policyLoss()}</td><td>verl</td></tr>
     * <tr><td>{@code actor/pg_clipfrac}</td><td>low + high</td><td>verl: where the clipped objective is the one taken
     *     (its {@code pg_losses2 > pg_losses1})</td></tr>
     * <tr><td>{@code actor/pg_clipfrac_lower}</td><td>{@link #dualClipFraction()}</td><td>verl: held at c * A by the
     *     dual clip; 0 here when the dual clip is off (verl always applies its c = 3)</td></tr>
     * <tr><td>{@code actor/ppo_kl}</td><td>{@link #approxKl()}</td><td>verl: token mean of old log-prob minus
     *     log-prob</td></tr>
     * <tr><td>{@code actor/entropy}</td><td>{@link #entropy()}</td><td>verl: the entropy aggregated like the
     *     loss</td></tr>
     * <tr><td>{@code actor/kl_loss}</td><td>{@link #kl()}</td><td>verl: the KL term aggregated like the loss</td></tr>
     * <tr><td>{@code gspo4j/ratio_mean}, {@code gspo4j/ratio_min}, {@code gspo4j/ratio_max}</td><td>{@link #ratioMean()},
     *     {@link #ratioMin()}, {@link #ratioMax()}</td><td>gspo4j</td></tr>
     * <tr><td>{@code gspo4j/sequences}, {@code gspo4j/tokens}</td><td>{@link #sequences()}, {@link #tokens()}</td>
     *     <td>gspo4j</td></tr>
     * <tr><td>{@code rollout_corr/rollout_is_mean}</td><td>{@link #rolloutWeightMean()}</td><td>verl</td></tr>
     * <tr><td>{@code rollout_corr/rollout_rs_masked_fraction}</td><td>{@link #rolloutMaskedFraction()}</td><td>verl</td></tr>
     * <tr><td>{@code rollout_corr/rollout_rs_seq_masked_fraction}</td><td>{@link #rolloutSeqMaskedFraction()}</td>
     *     <td>verl</td></tr>
     * <tr><td>{@code rollout_corr/kl}, {@code rollout_corr/k3_kl}</td><td>{@link #rolloutKl()}, {@link #rolloutK3Kl()}</td>
     *     <td>verl</td></tr>
     * <tr><td>{@code gspo4j/entropy_kept_fraction}</td><td>{@link #entropyKeptFraction()}</td><td>gspo4j</td></tr>
     * </table>
     * Fractions and ratio statistics are per response for GSPO (TRL's sequence-level importance
     * sampling logs them per response too) and per counted token otherwise.
     *
     * @return an unmodifiable, insertion-ordered map from the keys above to the values
     */
    public Map<String, Double> asMap() {
        readAll();
        final double low = get(Metric.CLIP_FRACTION_LOW);
        final double high = get(Metric.CLIP_FRACTION_HIGH);
        final double kl = get(Metric.KL);
        final Map<String, Double> map = new LinkedHashMap<>();
        map.put("clip_ratio/low_mean", low);
        map.put("clip_ratio/high_mean", high);
        map.put("clip_ratio/region_mean", low + high);
        map.put("entropy", (double) get(Metric.ENTROPY_MEAN));
        map.put("kl", kl);
        map.put("actor/pg_loss", (double) get(Metric.POLICY_LOSS));
        map.put("actor/pg_clipfrac", low + high);
        map.put("actor/pg_clipfrac_lower", (double) get(Metric.DUAL_CLIP_FRACTION));
        map.put("actor/ppo_kl", (double) get(Metric.APPROX_KL));
        map.put("actor/entropy", (double) get(Metric.ENTROPY));
        map.put("actor/kl_loss", kl);
        map.put("gspo4j/ratio_mean", (double) get(Metric.RATIO_MEAN));
        map.put("gspo4j/ratio_min", (double) get(Metric.RATIO_MIN));
        map.put("gspo4j/ratio_max", (double) get(Metric.RATIO_MAX));
        map.put("gspo4j/sequences", (double) sequences());
        map.put("gspo4j/tokens", (double) tokens());
        map.put("rollout_corr/rollout_is_mean", (double) get(Metric.ROLLOUT_WEIGHT_MEAN));
        map.put("rollout_corr/rollout_rs_masked_fraction", (double) get(Metric.ROLLOUT_MASKED_FRACTION));
        map.put("rollout_corr/rollout_rs_seq_masked_fraction", (double) get(Metric.ROLLOUT_SEQ_MASKED_FRACTION));
        map.put("rollout_corr/kl", (double) get(Metric.ROLLOUT_KL));
        map.put("rollout_corr/k3_kl", (double) get(Metric.ROLLOUT_K3_KL));
        map.put("gspo4j/entropy_kept_fraction", (double) get(Metric.ENTROPY_KEPT_FRACTION));
        return Collections.unmodifiableMap(map);
    }

    // The float32 set and the device-held counts in one copy: both go into one float64 tensor on
    // the device (the counts stay exact below 2^53), then one read.
    private void readAll() {
        ensureOpen();
        final boolean needCounts = (sequences < 0 && sequenceCount != null) || (tokens < 0 && tokenCount != null);
        if (host != null && !needCounts) {
            return;
        }
        try (Tensor all = asDoubles(); Tensor cpu = all.cpu(); Tensor contiguous = cpu.contiguous()) {
            final double[] copy = new double[Metric.COUNT + 2];
            contiguous.data_ptr_double().get(copy);
            if (host == null) {
                final float[] values = new float[Metric.COUNT];
                for (int i = 0; i < Metric.COUNT; i++) {
                    values[i] = (float) copy[i];
                }
                host = values;
            }
            if (sequences < 0) {
                sequences = sequenceCount == null ? knownSequences : (long) copy[Metric.COUNT];
            }
            if (tokens < 0) {
                tokens = tokenCount == null ? knownTokens : (long) copy[Metric.COUNT + 1];
            }
        }
    }

    /**
     * The float32 set and the two exact counts as one new float64 tensor {@code [Metric.COUNT + 2]}
     * on the logits' device, without a sync (the counts stay exact below 2^53); the caller closes it.
     */
    Tensor asDoubles() {
        ensureOpen();
        try (Tensor asDouble = values.to(ScalarType.Double); Tensor s = count(sequenceCount, knownSequences);
                Tensor t = count(tokenCount, knownTokens); TensorVector parts = new TensorVector(asDouble, s, t)) {
            return torch.cat(parts);
        }
    }

    // A count as a float64 [1] on the values' device: the device-held one, or the host-known value.
    private Tensor count(Tensor held, long known) {
        if (held != null) {
            try (Tensor flat = held.reshape(1)) {
                return flat.to(ScalarType.Double);
            }
        }
        final Tensor t = Tensors.empty(new long[] {1}, ScalarType.Double, values);
        try (Scalar value = new Scalar((double) known)) {
            t.fill_(value);
        }
        return t;
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
        readAll();
        return String.format("loss_pi=%.6g kl=%.6g H=%.6g clip_low=%.4f clip_high=%.4f dual=%.4f ratio=%.6g [%.6g, %.6g] "
                + "approx_kl=%.6g sequences=%d tokens=%d", policyLoss(), kl(), entropyMean(), clipFractionLow(),
                clipFractionHigh(), dualClipFraction(), ratioMean(), ratioMin(), ratioMax(), approxKl(), sequences(), tokens());
    }
}
