package dev.gspo4j.internal;

import org.bytedeco.javacpp.LongPointer;

/**
 * The token axis of a batch of {@code batch} responses: padded ({@code offsets == null}, response
 * b holds tokens {@code b*seq .. b*seq+seq-1}) or packed (response b holds tokens {@code
 * offsets[b] .. offsets[b+1]-1}, {@code tokens = offsets[batch]}). Per-token arrays are contiguous
 * over it.
 */
public record TokenLayout(long batch, long seq, long tokens, LongPointer offsets) {

    public TokenLayout {
        Checks.nonNegative(batch, "batch");
        Checks.nonNegative(seq, "seq");
        Checks.nonNegative(tokens, "tokens");
        if (offsets == null) {
            if (Math.multiplyExact(batch, seq) != tokens) {
                throw new IllegalArgumentException("padded layout needs tokens = batch * seq, got tokens = " + tokens
                        + ", batch = " + batch + ", seq = " + seq);
            }
        } else {
            Checks.capacity(offsets, batch + 1, "offsets");
        }
    }

    public static TokenLayout padded(long batch, long seq) {
        return new TokenLayout(batch, seq, Math.multiplyExact(batch, seq), null);
    }

    /**
     * Packed responses. {@code offsets} holds {@code batch + 1} int64 values; {@code seq} is the
     * default length norm of {@link dev.gspo4j.Aggregation#SEQ_MEAN_TOKEN_SUM_NORM} (0: the longest
     * response).
     */
    public static TokenLayout packed(LongPointer offsets, long batch, long tokens) {
        Checks.notNull(offsets, "offsets");
        return new TokenLayout(batch, 0, tokens, offsets);
    }

    public boolean isPacked() {
        return offsets != null;
    }
}
