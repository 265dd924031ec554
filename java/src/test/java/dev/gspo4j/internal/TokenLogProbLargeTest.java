package dev.gspo4j.internal;

import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.Random;
import org.bytedeco.javacpp.DoublePointer;
import org.bytedeco.javacpp.FloatPointer;
import org.bytedeco.javacpp.LongPointer;
import org.bytedeco.javacpp.Pointer;
import org.bytedeco.javacpp.ShortPointer;
import org.junit.jupiter.api.Tag;
import org.junit.jupiter.api.Test;

/**
 * More than 2^31 logits in one call (14200 x 151936 bf16, 4.3 GB): every offset past the 2^31st
 * element must be 64-bit. Tagged "large"; it runs in the default build (about 10 s and 4.5 GB
 * off-heap) and can be left out with {@code -DexcludedGroups=large}.
 */
@Tag("large")
class TokenLogProbLargeTest {

    @Test
    void moreThanTwoToTheThirtyOneLogits() {
        final LogitsDtype dtype = LogitsDtype.BFLOAT16;
        final int vocab = 151936;
        final int rows = 14200;
        final long elements = (long) rows * vocab;
        assertTrue(elements > (1L << 31));
        // Five random rows, repeated: row r holds pattern r % 5.
        final int patterns = 5;
        final TokenLogProbTest.Case pattern = TokenLogProbTest.Case.random(dtype, patterns, vocab, 1.0, 3.0, 0.0, 2024);
        final Random random = new Random(5);
        final long[] targets = new long[rows];
        final double[] gradLogprob = new double[rows];
        final double[] gradEntropy = new double[rows];
        for (int r = 0; r < rows; r++) {
            targets[r] = random.nextInt(vocab);
            gradLogprob[r] = (float) random.nextGaussian();
            gradEntropy[r] = (float) (0.3 * random.nextGaussian());
        }
        final int crossing = (int) ((1L << 31) / vocab); // the row that straddles element 2^31
        final int[] checked = {0, 3, crossing - 1, crossing, crossing + 1, rows - 2, rows - 1};
        try (ShortPointer logits = new ShortPointer(elements);
                LongPointer targetPointer = NativeBuffers.longs(targets);
                FloatPointer logprob = NativeBuffers.floats(rows, Float.NaN);
                DoublePointer lse = new DoublePointer(rows);
                FloatPointer entropy = NativeBuffers.floats(rows, Float.NaN);
                FloatPointer gradLogprobPointer = NativeBuffers.floats(gradLogprob);
                FloatPointer gradEntropyPointer = NativeBuffers.floats(gradEntropy)) {
            final short[] rowBits = new short[vocab];
            for (int p = 0; p < patterns; p++) {
                for (int v = 0; v < vocab; v++) {
                    rowBits[v] = Dtypes.bits(dtype, pattern.logits[p * vocab + v]);
                }
                logits.position((long) p * vocab).put(rowBits);
            }
            logits.position(0);
            final long rowBytes = (long) vocab * 2;
            for (int r = patterns; r < rows; r++) {
                Pointer.memcpy(logits.getPointer((long) r * vocab), logits.getPointer((long) (r % patterns) * vocab), rowBytes);
            }
            final LogitsView view = LogitsView.packed(logits, dtype, rows, vocab);
            Kernels.tokenLogProbForward(Device.CPU, null, view, targetPointer, 1.0, true, logprob, lse, entropy);
            for (int r : checked) {
                final Reference.Row want = Reference.forward(pattern.logits, (r % patterns) * vocab, vocab, (int) targets[r], 1.0);
                assertTrue(Math.abs(want.logprob() - logprob.get(r)) <= 1e-5 * Math.max(1, Math.abs(want.logprob())), "logprob row " + r);
                assertTrue(Math.abs(want.entropy() - entropy.get(r)) <= 1e-5 * Math.max(1, want.entropy()), "entropy row " + r);
            }
            // In place, the only way to keep this within memory: the gradient overwrites the logits.
            Kernels.tokenLogProbBackward(Device.CPU, null, view, targetPointer, 1.0, lse, entropy, gradLogprobPointer,
                    gradEntropyPointer, logits, elements, vocab);
            for (int r : checked) {
                final double[] want = Reference.backward(pattern.logits, (r % patterns) * vocab, vocab, (int) targets[r], 1.0,
                        gradLogprob[r], gradEntropy[r]);
                double scale = 0;
                for (double w : want) {
                    scale = Math.max(scale, Math.abs(w));
                }
                for (int v = 0; v < vocab; v++) {
                    final double got = Dtypes.fromBf16(logits.get((long) r * vocab + v));
                    final double allowed = 8e-3 * Math.abs(want[v]) + 1e-6 * scale;
                    if (!(Math.abs(got - want[v]) <= allowed)) {
                        throw new AssertionError("grad row " + r + " column " + v + ": want " + want[v] + " got " + got);
                    }
                }
            }
        }
    }
}
