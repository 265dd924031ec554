package dev.gspo4j.internal;

/** The double-precision reference's loss value and metrics, for tests outside this package. */
public final class ReferenceMetrics {
    private ReferenceMetrics() {}

    /**
     * Padded [batch, seq] inputs as flat arrays; oldLogprob null for on-policy.
     *
     * @return the metrics in {@link Metric} order
     */
    public static double[] of(LossSettings settings, int batch, int seq, double[] logprob, double[] oldLogprob, boolean[] mask,
            double[] advantages, boolean tokenAdvantages, double[] refLogprob, double[] entropy) {
        final Reference.LossInputs inputs = new Reference.LossInputs(Reference.Batch.padded(batch, seq), logprob, oldLogprob, mask,
                advantages, tokenAdvantages, refLogprob, entropy);
        return Reference.lossValue(settings, inputs).metrics();
    }
}
