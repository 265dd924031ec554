package dev.gspo4j;

import dev.gspo4j.internal.StepTotals;

/**
 * The counts of a whole training step that the aggregation divides by (SPEC.md "Policy losses"),
 * when the step is split over data-parallel ranks or micro-batches: pass them to
 * {@link PolicyLoss#compute(LossInput, GlobalCounts)} so that the calls' losses add up to the
 * loss of the whole batch. {@link DataParallel#allReduceCounts} gathers them over a c10d process
 * group; {@link DataParallel#localCounts} gives one call's, which {@link #plus} adds up for
 * micro-batches.
 *
 * @param responses B': the responses with at least one counted token (every mean over responses:
 *     GSPO's, LUSPO's and GMPO's J_b, SEQ_MEAN_TOKEN_MEAN, SEQ_MEAN_TOKEN_SUM)
 * @param tokens the counted tokens (TOKEN_MEAN)
 * @param batch B: every response, empty ones included (SEQ_MEAN_TOKEN_SUM_NORM)
 * @param longest Lnorm's default for SEQ_MEAN_TOKEN_SUM_NORM: the largest T of the padded calls, or
 *     the longest response (counted tokens or not) of the packed ones; unused when the loss sets
 *     {@link PolicyLoss.Builder#lengthNorm}
 */
public record GlobalCounts(long responses, long tokens, long batch, long longest) {
    /** Largest count: float64 holds every integer up to 2^53 exactly, and the kernels divide in float64. */
    static final long MAX = 1L << 53;

    /**
     * Checks each count: in [0, 2^53], and {@code responses <= batch}.
     *
     * @param responses B'
     * @param tokens the counted tokens
     * @param batch B
     * @param longest Lnorm's default
     */
    public GlobalCounts {
        require(responses, "responses");
        require(tokens, "tokens");
        require(batch, "batch");
        require(longest, "longest");
        if (responses > batch) {
            throw new IllegalArgumentException("responses (" + responses + ") cannot exceed batch (" + batch
                    + "): B' counts the responses of B that have a counted token");
        }
        if (responses > tokens) {
            throw new IllegalArgumentException("responses (" + responses + ") cannot exceed tokens (" + tokens
                    + "): each counted response has at least one counted token");
        }
    }

    private static void require(long value, String name) {
        if (value < 0 || value > MAX) {
            throw new IllegalArgumentException(name + " must be in [0, 2^53], got " + value);
        }
    }

    /**
     * The counts of two parts of one step (micro-batches): the sums, and the larger longest.
     *
     * @param other the other part's counts
     * @return the counts of both parts
     */
    public GlobalCounts plus(GlobalCounts other) {
        if (other == null) {
            throw new IllegalArgumentException("other must not be null");
        }
        return new GlobalCounts(responses + other.responses, tokens + other.tokens, batch + other.batch,
                Math.max(longest, other.longest));
    }

    StepTotals totals() {
        return new StepTotals(responses, tokens, batch);
    }
}
