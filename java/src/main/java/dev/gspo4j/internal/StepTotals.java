package dev.gspo4j.internal;

/**
 * The counts of a whole step (every data-parallel rank, or every micro-batch) that replace one
 * call's own denominators: the C config's {@code responses_total}, {@code tokens_total} and
 * {@code batch_total}. 0 keeps the call's own count.
 *
 * @param responses B', the responses with a counted token
 * @param tokens the counted tokens
 * @param batch B, every response, empty ones included
 */
public record StepTotals(double responses, double tokens, double batch) {
    /** No totals: every denominator is the call's own (or the loss's normaliser). */
    public static final StepTotals NONE = new StepTotals(0, 0, 0);

    public StepTotals {
        for (double v : new double[] {responses, tokens, batch}) {
            if (!(v >= 0 && v <= 1e18)) {
                throw new IllegalArgumentException("step totals must be in [0, 1e18] (0: the call's own count), got responses="
                        + responses + " tokens=" + tokens + " batch=" + batch);
            }
        }
    }
}
