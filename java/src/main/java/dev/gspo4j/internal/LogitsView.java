package dev.gspo4j.internal;

import org.bytedeco.javacpp.Pointer;

/**
 * Logits {@code [batch, seq, vocab]} whose rows are contiguous; row (b, t) starts {@code
 * b * strideBatch + t * strideSeq} elements after {@code data}. A packed {@code [N, vocab]} tensor
 * is {@code batch = 1, seq = N}.
 */
public record LogitsView(Pointer data, LogitsDtype dtype, long batch, long seq, long vocab, long strideBatch, long strideSeq) {

    public LogitsView {
        Checks.notNull(dtype, "dtype");
        Checks.nonNegative(batch, "batch");
        Checks.nonNegative(seq, "seq");
        if (vocab <= 0) {
            throw new IllegalArgumentException("vocab must be > 0, got " + vocab);
        }
        Checks.nonNegative(strideBatch, "strideBatch");
        Checks.nonNegative(strideSeq, "strideSeq");
        Math.multiplyExact(batch, seq);
        if (batch > 0 && seq > 0) {
            Checks.notNull(data, "logits");
            Math.addExact(Math.addExact(Math.multiplyExact(batch - 1, strideBatch), Math.multiplyExact(seq - 1, strideSeq)), vocab);
        }
    }

    /** Contiguous {@code [rows, vocab]} logits. */
    public static LogitsView packed(Pointer data, LogitsDtype dtype, long rows, long vocab) {
        return new LogitsView(data, dtype, 1, rows, vocab, rows * vocab, vocab);
    }

    /** Contiguous {@code [batch, seq, vocab]} logits. */
    public static LogitsView padded(Pointer data, LogitsDtype dtype, long batch, long seq, long vocab) {
        return new LogitsView(data, dtype, batch, seq, vocab, seq * vocab, vocab);
    }

    public long rows() {
        return batch * seq;
    }

    /** Elements from {@code data} to one past the last logit read. */
    long extent() {
        return rows() == 0 ? 0 : (batch - 1) * strideBatch + (seq - 1) * strideSeq + vocab;
    }
}
