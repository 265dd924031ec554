package dev.gspo4j.internal;

import static org.junit.jupiter.api.Assertions.assertEquals;

import java.util.Random;
import org.bytedeco.javacpp.DoublePointer;
import org.bytedeco.javacpp.FloatPointer;
import org.bytedeco.javacpp.LongPointer;
import org.bytedeco.javacpp.Pointer;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.EnumSource;

/**
 * docs/math.md "Invariances": a token's lp, lse and H are bitwise identical whatever else is in the call.
 * The same rows are computed alone, inside a large padded batch (other rows around them, padding
 * after them, a chunk boundary of the thread pool through them) and packed back to back, with one
 * thread and with several, and must agree to the bit.
 */
public class BatchInvarianceTest {

    /** lp, lse and H of `rows` logits rows laid out as `view`, for the target of each row. */
    record Rows(float[] lp, double[] lse, float[] h) {}

    static Rows forward(LogitsView view, long[] targets) {
        final int rows = (int) view.rows();
        try (LongPointer y = NativeBuffers.longs(targets); FloatPointer lp = NativeBuffers.floats(rows, Float.NaN);
                DoublePointer lse = new DoublePointer(Math.max(1, rows)); FloatPointer h = NativeBuffers.floats(rows, Float.NaN)) {
            Kernels.tokenLogProbForward(Device.CPU, null, view, y, 0.7, true, lp, lse, h);
            final Rows out = new Rows(new float[rows], new double[rows], new float[rows]);
            for (int i = 0; i < rows; i++) {
                out.lp[i] = lp.get(i);
                out.lse[i] = lse.get(i);
                out.h[i] = h.get(i);
            }
            return out;
        }
    }

    @ParameterizedTest
    @EnumSource(LogitsDtype.class)
    void sameRowsAloneInALargePaddedBatchAndPackedAreBitwiseEqual(LogitsDtype dtype) {
        // A vocabulary that is no multiple of any vector width, and responses of 1, 7 and 33 tokens.
        final int vocab = 1003;
        final int[] lengths = {1, 7, 33};
        final Random random = new Random(15);
        final double[][] rowsOf = new double[lengths.length][];
        final long[][] targetsOf = new long[lengths.length][];
        for (int r = 0; r < lengths.length; r++) {
            rowsOf[r] = new double[lengths[r] * vocab];
            targetsOf[r] = new long[lengths[r]];
            for (int i = 0; i < rowsOf[r].length; i++) {
                rowsOf[r][i] = Dtypes.round(dtype, 3 * random.nextGaussian());
            }
            for (int t = 0; t < lengths[r]; t++) {
                targetsOf[r][t] = random.nextInt(vocab);
            }
        }
        final int previous = Kernels.numThreads();
        try {
            for (int threads : new int[] {1, 3, Math.max(2, previous)}) {
                Kernels.setNumThreads(threads);
                final Rows[] alone = new Rows[lengths.length];
                for (int r = 0; r < lengths.length; r++) {
                    try (Pointer z = NativeBuffers.logits(dtype, rowsOf[r])) {
                        alone[r] = forward(LogitsView.packed(z, dtype, lengths[r], vocab), targetsOf[r]);
                    }
                }
                // Inside a large padded batch: 96 responses of T = 40, ours at responses 5, 50 and 95,
                // the rest random; padding rows after each of ours.
                final int batch = 96;
                final int seq = 40;
                final int[] slots = {5, 50, 95};
                final double[] padded = new double[batch * seq * vocab];
                final long[] paddedTargets = new long[batch * seq];
                for (int i = 0; i < padded.length; i++) {
                    padded[i] = Dtypes.round(dtype, 3 * random.nextGaussian());
                }
                for (int i = 0; i < paddedTargets.length; i++) {
                    paddedTargets[i] = random.nextInt(vocab);
                }
                for (int r = 0; r < lengths.length; r++) {
                    System.arraycopy(rowsOf[r], 0, padded, slots[r] * seq * vocab, rowsOf[r].length);
                    System.arraycopy(targetsOf[r], 0, paddedTargets, slots[r] * seq, lengths[r]);
                }
                final Rows inBatch;
                try (Pointer z = NativeBuffers.logits(dtype, padded)) {
                    inBatch = forward(LogitsView.padded(z, dtype, batch, seq, vocab), paddedTargets);
                }
                // Packed: the three responses back to back after a random one of 11 tokens.
                final int lead = 11;
                int total = lead;
                for (int length : lengths) {
                    total += length;
                }
                final double[] packed = new double[total * vocab];
                final long[] packedTargets = new long[total];
                for (int i = 0; i < lead * vocab; i++) {
                    packed[i] = Dtypes.round(dtype, 3 * random.nextGaussian());
                }
                int at = lead;
                final int[] starts = new int[lengths.length];
                for (int r = 0; r < lengths.length; r++) {
                    starts[r] = at;
                    System.arraycopy(rowsOf[r], 0, packed, at * vocab, rowsOf[r].length);
                    System.arraycopy(targetsOf[r], 0, packedTargets, at, lengths[r]);
                    at += lengths[r];
                }
                final Rows inPack;
                try (Pointer z = NativeBuffers.logits(dtype, packed)) {
                    inPack = forward(LogitsView.packed(z, dtype, total, vocab), packedTargets);
                }
                for (int r = 0; r < lengths.length; r++) {
                    for (int t = 0; t < lengths[r]; t++) {
                        final String where = dtype + " threads=" + threads + " response " + r + " token " + t;
                        final int b = slots[r] * seq + t;
                        final int p = starts[r] + t;
                        assertBits(alone[r].lp[t], inBatch.lp[b], where + " lp, padded");
                        assertBits(alone[r].lp[t], inPack.lp[p], where + " lp, packed");
                        assertEquals(Double.doubleToRawLongBits(alone[r].lse[t]), Double.doubleToRawLongBits(inBatch.lse[b]),
                                where + " lse, padded");
                        assertEquals(Double.doubleToRawLongBits(alone[r].lse[t]), Double.doubleToRawLongBits(inPack.lse[p]),
                                where + " lse, packed");
                        assertBits(alone[r].h[t], inBatch.h[b], where + " H, padded");
                        assertBits(alone[r].h[t], inPack.h[p], where + " H, packed");
                    }
                }
            }
        } finally {
            Kernels.setNumThreads(previous);
        }
    }

    static void assertBits(float want, float got, String what) {
        assertEquals(Float.floatToRawIntBits(want), Float.floatToRawIntBits(got), what + ": want " + want + " got " + got);
    }
}
