package dev.gspo4j.internal;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import dev.gspo4j.Gspo4jException;
import java.util.ArrayList;
import java.util.List;
import java.util.Random;
import java.util.stream.Stream;
import org.bytedeco.javacpp.DoublePointer;
import org.bytedeco.javacpp.FloatPointer;
import org.bytedeco.javacpp.LongPointer;
import org.bytedeco.javacpp.Pointer;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.Arguments;
import org.junit.jupiter.params.provider.EnumSource;
import org.junit.jupiter.params.provider.MethodSource;

/** The fused token log-prob forward and backward against the double-precision reference. */
class TokenLogProbTest {

    /**
     * Allowed error per dtype. Log-probs and entropies are computed in float32/float64 whatever the
     * input dtype (the reference reads the same rounded logits), so their tolerance is the same for
     * all; the gradient is written in the logits' dtype and carries its rounding.
     * |got - want| <= relative * |want| + rowScaled * max|want over the row| + floor.
     */
    record Tolerance(double logprob, double gradRelative, double gradRowScaled, double gradFloor) {
        static Tolerance of(LogitsDtype dtype) {
            return switch (dtype) {
                case FLOAT32 -> new Tolerance(1e-5, 1e-5, 1e-6, 1e-30);
                case BFLOAT16 -> new Tolerance(1e-5, 8e-3, 1e-6, 1e-30);
                case FLOAT16 -> new Tolerance(1e-5, 1.5e-3, 1e-6, 6e-8);
            };
        }
    }

    /** One batch of logits and targets with everything the kernels produce for it. */
    static final class Case {
        final LogitsDtype dtype;
        final int rows;
        final int vocab;
        final double temperature;
        final double[] logits;   // already representable in dtype
        final long[] targets;
        final double[] gradLogprob;
        final double[] gradEntropy;

        Case(LogitsDtype dtype, int rows, int vocab, double temperature, double[] logits, long[] targets, Random random) {
            this.dtype = dtype;
            this.rows = rows;
            this.vocab = vocab;
            this.temperature = temperature;
            this.logits = logits;
            this.targets = targets;
            this.gradLogprob = new double[rows];
            this.gradEntropy = new double[rows];
            for (int r = 0; r < rows; r++) {
                gradLogprob[r] = (float) random.nextGaussian();
                gradEntropy[r] = (float) (0.3 * random.nextGaussian());
            }
        }

        static Case random(LogitsDtype dtype, int rows, int vocab, double temperature, double scale, double shift, long seed) {
            final Random random = new Random(seed);
            final double[] z = new double[rows * vocab];
            for (int i = 0; i < z.length; i++) {
                z[i] = Dtypes.round(dtype, shift + scale * random.nextGaussian());
            }
            final long[] y = new long[rows];
            for (int r = 0; r < rows; r++) {
                y[r] = random.nextInt(vocab);
            }
            return new Case(dtype, rows, vocab, temperature, z, y, random);
        }
    }

    record Outputs(double[] logprob, double[] lse, double[] entropy) {}

    static Outputs forward(Case c, Pointer logits) {
        try (LongPointer targets = NativeBuffers.longs(c.targets);
                FloatPointer logprob = NativeBuffers.floats(c.rows, Float.NaN);
                DoublePointer lse = new DoublePointer(Math.max(1, c.rows));
                FloatPointer entropy = NativeBuffers.floats(c.rows, Float.NaN)) {
            lse.limit(c.rows);
            Kernels.tokenLogProbForward(Device.CPU, null, LogitsView.packed(logits, c.dtype, c.rows, c.vocab), targets,
                    c.temperature, true, logprob, lse, entropy);
            final double[] lseValues = new double[c.rows];
            lse.get(lseValues);
            return new Outputs(NativeBuffers.toArray(logprob, c.rows), lseValues, NativeBuffers.toArray(entropy, c.rows));
        }
    }

    /** Runs forward then backward (into a separate buffer, or in place) and returns the gradient. */
    static double[] backward(Case c, Pointer logits, boolean withEntropy, boolean inPlace) {
        try (LongPointer targets = NativeBuffers.longs(c.targets);
                FloatPointer logprob = NativeBuffers.floats(c.rows, Float.NaN);
                DoublePointer lse = new DoublePointer(Math.max(1, c.rows));
                FloatPointer entropy = NativeBuffers.floats(c.rows, Float.NaN);
                FloatPointer gradLogprob = NativeBuffers.floats(c.gradLogprob);
                FloatPointer gradEntropy = withEntropy ? NativeBuffers.floats(c.gradEntropy) : null) {
            lse.limit(c.rows);
            final LogitsView view = LogitsView.packed(logits, c.dtype, c.rows, c.vocab);
            Kernels.tokenLogProbForward(Device.CPU, null, view, targets, c.temperature, true, logprob, lse, entropy);
            final Pointer grad = inPlace ? logits : NativeBuffers.logits(c.dtype, filled(c.rows * c.vocab, Double.NaN));
            Kernels.tokenLogProbBackward(Device.CPU, null, view, targets, c.temperature, lse, entropy, gradLogprob,
                    gradEntropy, grad, (long) c.rows * c.vocab, c.vocab);
            final double[] out = new double[c.rows * c.vocab];
            for (int i = 0; i < out.length; i++) {
                out[i] = NativeBuffers.readLogit(c.dtype, grad, i);
            }
            if (!inPlace) {
                grad.close();
            }
            return out;
        }
    }

    static double[] filled(int n, double value) {
        final double[] a = new double[n];
        java.util.Arrays.fill(a, value);
        return a;
    }

    static void assertForward(Case c, Outputs got) {
        final Tolerance tol = Tolerance.of(c.dtype);
        for (int r = 0; r < c.rows; r++) {
            final Reference.Row want = Reference.forward(c.logits, r * c.vocab, c.vocab, (int) c.targets[r], c.temperature);
            assertClose(want.logprob(), got.logprob()[r], tol.logprob() * Math.max(1, Math.abs(want.logprob())), "logprob", c, r, -1);
            assertClose(want.lse(), got.lse()[r], tol.logprob() * Math.max(1, Math.abs(want.lse())), "lse", c, r, -1);
            assertClose(want.entropy(), got.entropy()[r], tol.logprob() * Math.max(1, Math.abs(want.entropy())), "entropy", c, r, -1);
        }
    }

    static void assertBackward(Case c, double[] got, boolean withEntropy) {
        final Tolerance tol = Tolerance.of(c.dtype);
        for (int r = 0; r < c.rows; r++) {
            final double[] want = Reference.backward(c.logits, r * c.vocab, c.vocab, (int) c.targets[r], c.temperature,
                    (float) c.gradLogprob[r], withEntropy ? (float) c.gradEntropy[r] : 0);
            double scale = 0;
            for (double w : want) {
                scale = Math.max(scale, Math.abs(w));
            }
            for (int v = 0; v < c.vocab; v++) {
                final double allowed = tol.gradRelative() * Math.abs(want[v]) + tol.gradRowScaled() * scale + tol.gradFloor();
                assertClose(want[v], got[r * c.vocab + v], allowed, "grad", c, r, v);
            }
        }
    }

    static void assertClose(double want, double got, double allowed, String what, Case c, int row, int column) {
        if (!(Math.abs(want - got) <= allowed)) {
            fail(String.format("%s %s V=%d tau=%s row %d%s: want %.9g got %.9g (allowed %.3g)", what, c.dtype, c.vocab,
                    c.temperature, row, column >= 0 ? " column " + column : "", want, got, allowed));
        }
    }

    static Stream<Arguments> sizes() {
        final List<Arguments> out = new ArrayList<>();
        for (LogitsDtype dtype : LogitsDtype.values()) {
            for (int vocab : new int[] {1, 7, 1000, 32001, 151936}) {
                for (double temperature : new double[] {1.0, 0.7}) {
                    out.add(Arguments.of(dtype, vocab, temperature));
                }
            }
        }
        return out.stream();
    }

    @ParameterizedTest(name = "{0} V={1} tau={2}")
    @MethodSource("sizes")
    void matchesReferenceOnRandomLogits(LogitsDtype dtype, int vocab, double temperature) {
        final int rows = Math.max(3, Math.min(37, 300_000 / vocab));
        final Case c = Case.random(dtype, rows, vocab, temperature, 3.0, 0.0, 17L * vocab + dtype.ordinal());
        try (Pointer logits = NativeBuffers.logits(dtype, c.logits)) {
            assertForward(c, forward(c, logits));
            assertBackward(c, backward(c, logits, true, false), true);
            assertBackward(c, backward(c, logits, false, false), false);
        }
    }

    @ParameterizedTest
    @EnumSource(LogitsDtype.class)
    void inPlaceBackwardEqualsOutOfPlace(LogitsDtype dtype) {
        final Case c = Case.random(dtype, 9, 1003, 1.0, 2.0, 0.0, 5);
        final double[] separate;
        try (Pointer logits = NativeBuffers.logits(dtype, c.logits)) {
            separate = backward(c, logits, true, false);
        }
        try (Pointer logits = NativeBuffers.logits(dtype, c.logits)) {
            assertArrayEquals(separate, backward(c, logits, true, true));
        }
    }

    @ParameterizedTest
    @EnumSource(LogitsDtype.class)
    void allNegativeRows(LogitsDtype dtype) {
        // A max initialised to 0 instead of -inf gets every row of this case wrong.
        final Case c = Case.random(dtype, 6, 517, 1.0, 5.0, -900.0, 11);
        try (Pointer logits = NativeBuffers.logits(dtype, c.logits)) {
            assertForward(c, forward(c, logits));
            assertBackward(c, backward(c, logits, true, false), true);
        }
    }

    @ParameterizedTest
    @EnumSource(LogitsDtype.class)
    void logitsOfPlusMinusTenThousand(LogitsDtype dtype) {
        // Shifted by +-1e4: lse - E[z] and z - lse would cancel catastrophically in float32.
        for (double shift : new double[] {1e4, -1e4}) {
            final Case c = Case.random(dtype, 5, 2001, 1.0, 3.0, shift, 23);
            try (Pointer logits = NativeBuffers.logits(dtype, c.logits)) {
                final Outputs got = forward(c, logits);
                for (int r = 0; r < c.rows; r++) {
                    final Reference.Row want = Reference.forward(c.logits, r * c.vocab, c.vocab, (int) c.targets[r], 1.0);
                    assertClose(want.logprob(), got.logprob()[r], 1e-4 * Math.max(1, Math.abs(want.logprob())), "logprob", c, r, -1);
                    assertClose(want.entropy(), got.entropy()[r], 1e-4, "entropy", c, r, -1);
                }
                assertBackward(c, backward(c, logits, true, false), true);
            }
        }
        // Mixed +-1e4 in one row: only the +1e4 entries carry probability.
        final Random random = new Random(3);
        final double[] z = new double[4 * 300];
        for (int i = 0; i < z.length; i++) {
            z[i] = Dtypes.round(dtype, random.nextBoolean() ? 1e4 : -1e4);
        }
        final Case mixed = new Case(dtype, 4, 300, 1.0, z, new long[] {0, 1, 2, 3}, random);
        try (Pointer logits = NativeBuffers.logits(dtype, mixed.logits)) {
            assertForward(mixed, forward(mixed, logits));
            assertBackward(mixed, backward(mixed, logits, true, false), true);
        }
    }

    @ParameterizedTest
    @EnumSource(value = LogitsDtype.class, names = {"FLOAT32", "BFLOAT16"})
    void dominantLogitKeepsTheTargetGradientExact(LogitsDtype dtype) {
        // p_y = 1 - 9.4e-11: float32 rounds p_y to 1, so 1 - p would be 0; the kernel must give
        // g * 9.4e-11 to the dtype's relative precision. (float16 cannot hold 9.4e-11 at all.)
        final int vocab = 1000;
        final double[] z = new double[vocab];
        z[17] = 30;
        final Case c = new Case(dtype, 1, vocab, 1.0, z, new long[] {17}, new Random(1));
        try (Pointer logits = NativeBuffers.logits(dtype, c.logits)) {
            final double[] got = backward(c, logits, false, false);
            final double[] want = Reference.backward(z, 0, vocab, 17, 1.0, (float) c.gradLogprob[0], 0);
            assertTrue(Math.abs(want[17]) > 1e-11 && Math.abs(want[17]) < 1e-9, "the case must sit where 1 - p rounds away");
            final double relative = dtype == LogitsDtype.FLOAT32 ? 1e-5 : 8e-3;
            assertClose(want[17], got[17], relative * Math.abs(want[17]), "target grad", c, 0, 17);
        }
    }

    @Test
    void stridedViewIsReadInPlaceAndGradientKeepsItsStrides() {
        // logits[:, :-1, :] of a [3, 6, V] tensor: rows contiguous, batch stride 6V, 5 rows each.
        final LogitsDtype dtype = LogitsDtype.BFLOAT16;
        final int batch = 3, fullSeq = 6, seq = 5, vocab = 129;
        final Case full = Case.random(dtype, batch * fullSeq, vocab, 0.9, 2.0, 0.0, 31);
        final double[] viewLogits = new double[batch * seq * vocab];
        final long[] viewTargets = new long[batch * seq];
        for (int b = 0; b < batch; b++) {
            for (int t = 0; t < seq; t++) {
                System.arraycopy(full.logits, (b * fullSeq + t) * vocab, viewLogits, (b * seq + t) * vocab, vocab);
                viewTargets[b * seq + t] = full.targets[b * fullSeq + t];
            }
        }
        final Case view = new Case(dtype, batch * seq, vocab, 0.9, viewLogits, viewTargets, new Random(2));
        try (Pointer logits = NativeBuffers.logits(dtype, full.logits);
                LongPointer targets = NativeBuffers.longs(viewTargets);
                FloatPointer logprob = NativeBuffers.floats(view.rows, Float.NaN);
                DoublePointer lse = new DoublePointer(view.rows);
                FloatPointer entropy = NativeBuffers.floats(view.rows, Float.NaN);
                FloatPointer gradLogprob = NativeBuffers.floats(view.gradLogprob);
                FloatPointer gradEntropy = NativeBuffers.floats(view.gradEntropy)) {
            final LogitsView strided = new LogitsView(logits, dtype, batch, seq, vocab, (long) fullSeq * vocab, vocab);
            Kernels.tokenLogProbForward(Device.CPU, null, strided, targets, 0.9, true, logprob, lse, entropy);
            final double[] lseValues = new double[view.rows];
            lse.get(lseValues);
            assertForward(view, new Outputs(NativeBuffers.toArray(logprob, view.rows), lseValues, NativeBuffers.toArray(entropy, view.rows)));
            // In place over the same strided view: the skipped last position of each response keeps its logits.
            Kernels.tokenLogProbBackward(Device.CPU, null, strided, targets, 0.9, lse, entropy, gradLogprob, gradEntropy,
                    logits, (long) fullSeq * vocab, vocab);
            final double[] grad = new double[view.rows * vocab];
            for (int b = 0; b < batch; b++) {
                for (int t = 0; t < fullSeq; t++) {
                    for (int v = 0; v < vocab; v++) {
                        final double value = NativeBuffers.readLogit(dtype, logits, ((long) b * fullSeq + t) * vocab + v);
                        if (t < seq) {
                            grad[(b * seq + t) * vocab + v] = value;
                        } else {
                            assertEquals(full.logits[(b * fullSeq + t) * vocab + v], value, "untouched logit");
                        }
                    }
                }
            }
            assertBackward(view, grad, true);
        }
    }

    @Test
    void resultsDoNotDependOnTheThreadCount() {
        final int threads = Kernels.numThreads();
        try {
            final Case c = Case.random(LogitsDtype.FLOAT32, 64, 3001, 1.0, 3.0, 0.0, 77);
            final Outputs[] forwards = new Outputs[2];
            final double[][] grads = new double[2][];
            for (int k = 0; k < 2; k++) {
                Kernels.setNumThreads(k == 0 ? 1 : Math.max(2, threads));
                try (Pointer logits = NativeBuffers.logits(c.dtype, c.logits)) {
                    forwards[k] = forward(c, logits);
                    grads[k] = backward(c, logits, true, false);
                }
            }
            assertArrayEquals(forwards[0].logprob(), forwards[1].logprob());
            assertArrayEquals(forwards[0].lse(), forwards[1].lse());
            assertArrayEquals(forwards[0].entropy(), forwards[1].entropy());
            assertArrayEquals(grads[0], grads[1]);
        } finally {
            Kernels.setNumThreads(threads);
        }
    }

    @Test
    void noRowsIsANoOp() {
        try (LongPointer targets = new LongPointer(1L); FloatPointer logprob = new FloatPointer(1L);
                DoublePointer lse = new DoublePointer(1L); FloatPointer logits = new FloatPointer(1L)) {
            Kernels.tokenLogProbForward(Device.CPU, null, LogitsView.packed(logits, LogitsDtype.FLOAT32, 0, 10),
                    targets, 1.0, true, logprob, lse, null);
        }
    }

    @Test
    void tokenIdsOutsideTheVocabularyAreRejectedBeforeAnyWrite() {
        final Case c = Case.random(LogitsDtype.FLOAT32, 4, 100, 1.0, 1.0, 0.0, 3);
        for (long bad : new long[] {100, -1, Long.MAX_VALUE}) {
            c.targets[2] = bad;
            try (Pointer logits = NativeBuffers.logits(c.dtype, c.logits)) {
                final Gspo4jException e = assertThrows(Gspo4jException.class, () -> forward(c, logits));
                assertEquals(Gspo4jException.Status.OUT_OF_RANGE, e.status());
                assertTrue(e.getMessage().contains("targets[2] = " + bad), e.getMessage());
                assertTrue(e.getMessage().contains("[0, 100)"), e.getMessage());
            }
        }
        // In place: the logits must survive a rejected call untouched.
        c.targets[2] = 1;
        try (Pointer logits = NativeBuffers.logits(c.dtype, c.logits);
                LongPointer targets = NativeBuffers.longs(new long[] {0, 1, 100, 3});
                DoublePointer lse = new DoublePointer(4);
                FloatPointer grad = NativeBuffers.floats(c.gradLogprob)) {
            assertThrows(Gspo4jException.class, () -> Kernels.tokenLogProbBackward(Device.CPU, null,
                    LogitsView.packed(logits, c.dtype, 4, 100), targets, 1.0, lse, null, grad, null, logits, 400, 100));
            for (int i = 0; i < c.logits.length; i++) {
                assertEquals(c.logits[i], NativeBuffers.readLogit(c.dtype, logits, i));
            }
        }
    }

    @ParameterizedTest
    @EnumSource(LogitsDtype.class)
    void nonFiniteLogitsAreReportedWithTheirRow(LogitsDtype dtype) {
        // NaN and +Inf are errors; -Inf is a value (below), but a row with no finite entry is an error.
        for (double poison : new double[] {Double.NaN, Double.POSITIVE_INFINITY}) {
            final Case c = Case.random(dtype, 5, 300, 1.0, 1.0, 0.0, 8);
            c.logits[3 * 300 + 123] = poison;
            try (Pointer logits = NativeBuffers.logits(dtype, c.logits)) {
                final Gspo4jException e = assertThrows(Gspo4jException.class, () -> forward(c, logits));
                assertEquals(Gspo4jException.Status.NON_FINITE, e.status());
                assertTrue(e.getMessage().contains("row 3"), e.getMessage());
            }
        }
        final Case c = Case.random(dtype, 5, 300, 1.0, 1.0, 0.0, 8);
        java.util.Arrays.fill(c.logits, 2 * 300, 3 * 300, Double.NEGATIVE_INFINITY);
        try (Pointer logits = NativeBuffers.logits(dtype, c.logits)) {
            final Gspo4jException e = assertThrows(Gspo4jException.class, () -> forward(c, logits));
            assertEquals(Gspo4jException.Status.NON_FINITE, e.status());
            assertTrue(e.getMessage().contains("row 2") && e.getMessage().contains("no finite entry"), e.getMessage());
        }
    }

    /** -Inf at the head (whole vectors), in a run, at the tail and at some targets, with checking on. */
    static Case negativeInfinityCase(LogitsDtype dtype, int vocab, double temperature) {
        final Case c = Case.random(dtype, 6, vocab, temperature, 2.0, 0.0, 41L + vocab);
        for (int r = 0; r < c.rows; r++) {
            final int base = r * vocab;
            for (int v = 0; v < vocab; v++) {
                if (v < 16 || (v >= vocab / 2 && v < vocab / 2 + 40) || v >= vocab - 2) {
                    c.logits[base + v] = Double.NEGATIVE_INFINITY;
                }
            }
            c.logits[base + 16 % vocab] = 1.0;  // a finite entry, whatever the vocabulary
            c.targets[r] = switch (r) {
                case 0 -> 0;                // a -Inf target at the head
                case 1 -> vocab - 1;        // and at the tail
                case 2 -> vocab / 2 + 7;    // and in the run
                default -> Math.min(vocab - 3, 16 + r);
            };
        }
        return c;
    }

    @ParameterizedTest
    @EnumSource(LogitsDtype.class)
    void negativeInfinityLogitsHaveProbabilityZero(LogitsDtype dtype) {
        for (double temperature : new double[] {1.0, 0.7}) {
            for (int vocab : new int[] {61, 1001}) {
                final Case c = negativeInfinityCase(dtype, vocab, temperature);
                try (Pointer logits = NativeBuffers.logits(dtype, c.logits)) {
                    final Outputs got = forward(c, logits);
                    assertExtremeForward(c, got);
                    for (int r = 0; r < 3; r++) {
                        assertEquals(Double.NEGATIVE_INFINITY, got.logprob()[r], "a -Inf target's log-prob");
                        assertTrue(Double.isFinite(got.lse()[r]) && Double.isFinite(got.entropy()[r]), "finite lse and H");
                    }
                    for (boolean withEntropy : new boolean[] {true, false}) {
                        final double[] grad = backward(c, logits, withEntropy, false);
                        assertExtremeBackward(c, grad, withEntropy);
                        for (int r = 0; r < c.rows; r++) {
                            for (int v = 0; v < vocab; v++) {
                                if (c.logits[r * vocab + v] == Double.NEGATIVE_INFINITY && v != c.targets[r]) {
                                    assertTrue(grad[r * vocab + v] == 0, "the gradient of a -Inf logit is 0, got " + grad[r * vocab + v]);
                                }
                            }
                            if (r < 3) {
                                // d lp / d z_y = 1 - p_y = 1: g_lp / tau, no entropy term.
                                final double want = Dtypes.round(dtype, (float) c.gradLogprob[r] / temperature);
                                assertEquals(want, grad[r * vocab + (int) c.targets[r]], Math.abs(want) * (dtype == LogitsDtype.FLOAT32 ? 1e-6 : 1e-2), "a -Inf target's gradient");
                            }
                        }
                    }
                }
            }
        }
    }

    @ParameterizedTest
    @EnumSource(LogitsDtype.class)
    void aRowWithoutAFiniteEntryIsNaNWithCheckingOff(LogitsDtype dtype) {
        final Case c = Case.random(dtype, 3, 101, 1.0, 1.0, 0.0, 5);
        java.util.Arrays.fill(c.logits, 101, 202, Double.NEGATIVE_INFINITY);
        try (Pointer logits = NativeBuffers.logits(dtype, c.logits);
                LongPointer targets = NativeBuffers.longs(c.targets);
                FloatPointer logprob = NativeBuffers.floats(c.rows, 0f);
                DoublePointer lse = new DoublePointer(c.rows);
                FloatPointer entropy = NativeBuffers.floats(c.rows, 0f);
                FloatPointer gradLogprob = NativeBuffers.floats(c.gradLogprob)) {
            final LogitsView view = LogitsView.packed(logits, dtype, c.rows, c.vocab);
            Kernels.tokenLogProbForward(Device.CPU, null, view, targets, 1.0, false, logprob, lse, entropy);
            assertEquals(Double.NEGATIVE_INFINITY, lse.get(1));
            assertTrue(Float.isNaN(logprob.get(1)) && Float.isNaN(entropy.get(1)), "lp and H of a row of only -Inf are NaN");
            assertTrue(Double.isFinite(lse.get(0)) && Double.isFinite(lse.get(2)), "the other rows are untouched by it");
            Kernels.tokenLogProbBackward(Device.CPU, null, view, targets, 1.0, lse, entropy, gradLogprob, null, logits, 303, 101);
            for (int v = 0; v < 101; v++) {
                assertTrue(Double.isNaN(NativeBuffers.readLogit(dtype, logits, 101 + v)), "its gradient is NaN");
                assertTrue(Double.isFinite(NativeBuffers.readLogit(dtype, logits, v)), "the other rows' gradients are finite");
            }
        }
    }

    // ---- Numerics at extremes (issue 12), in relative terms against the float64 reference ------------------

    /**
     * lp and H to 2e-5 of themselves (float32 s = (z - M) / tau carries |s| 2^-24 into each e^s,
     * and nothing else may be lost: not the small terms next to the max's 1 as p -> 1, not z / tau
     * rounded before the max is subtracted); lse to 2e-6 of |M / tau| + |log S|.
     */
    static void assertExtremeForward(Case c, Outputs got) {
        for (int r = 0; r < c.rows; r++) {
            final Reference.Row want = Reference.forward(c.logits, r * c.vocab, c.vocab, (int) c.targets[r], c.temperature);
            assertRelative(want.logprob(), got.logprob()[r], 2e-5 * Math.abs(want.logprob()), "logprob", c, r);
            assertRelative(want.lse(), got.lse()[r], 2e-6 * (Math.abs(want.max()) + Math.abs(want.logSum())), "lse", c, r);
            assertRelative(want.entropy(), got.entropy()[r], 2e-5 * Math.abs(want.entropy()) + 1e-300, "entropy", c, r);
        }
    }

    /** One rounding step of the dtype relative to each entry, plus 1e-6 of the row's largest. */
    static void assertExtremeBackward(Case c, double[] got, boolean withEntropy) {
        final double relative = switch (c.dtype) {
            case FLOAT32 -> 1e-5;
            case BFLOAT16 -> 1.0 / 128;
            case FLOAT16 -> 1.0 / 1024;
        };
        final double floor = c.dtype == LogitsDtype.FLOAT16 ? 6e-8 : 1e-300;
        for (int r = 0; r < c.rows; r++) {
            final double[] want = Reference.backward(c.logits, r * c.vocab, c.vocab, (int) c.targets[r], c.temperature,
                    (float) c.gradLogprob[r], withEntropy ? (float) c.gradEntropy[r] : 0);
            double scale = 0;
            for (double w : want) {
                scale = Math.max(scale, Math.abs(w));
            }
            for (int v = 0; v < c.vocab; v++) {
                final double g = got[r * c.vocab + v];
                if (c.dtype == LogitsDtype.FLOAT16 && Math.abs(want[v]) >= 65520) {
                    assertEquals(Math.copySign(Double.POSITIVE_INFINITY, want[v]), g, "past float16's range");
                    continue;
                }
                assertClose(want[v], g, relative * Math.abs(want[v]) + 1e-6 * scale + floor, "grad", c, r, v);
            }
        }
    }

    static void assertRelative(double want, double got, double allowed, String what, Case c, int row) {
        if (Double.isInfinite(want)) {
            assertEquals(want, got, what + " row " + row);
        } else {
            assertClose(want, got, allowed, what, c, row, -1);
        }
    }

    static Stream<Arguments> extremes() {
        final List<Arguments> out = new ArrayList<>();
        for (LogitsDtype dtype : LogitsDtype.values()) {
            for (double temperature : new double[] {1e-6, 1e-3, 0.7, 1.0}) {
                out.add(Arguments.of(dtype, temperature));
            }
        }
        return out.stream();
    }

    /** z = 3 + tau * N(0, 2): s = (z - M) / tau is O(1) at every tau, near-ties ulps apart at 1e-6. */
    @ParameterizedTest(name = "{0} tau={1}")
    @MethodSource("extremes")
    void nearTiesAtEveryTemperature(LogitsDtype dtype, double temperature) {
        final Case c = Case.random(dtype, 7, 1001, temperature, 2.0 * temperature, 3.0, 3);
        assertExtremes(c);
    }

    /** Logits around 1e4 at every temperature: z / tau rounded before the max is subtracted loses 5e-4 nats. */
    @ParameterizedTest(name = "{0} tau={1}")
    @MethodSource("extremes")
    void largeLogitsAtEveryTemperature(LogitsDtype dtype, double temperature) {
        final Case c = Case.random(dtype, 5, 1001, temperature, 3.0 * Math.max(temperature, 1e-3), 1e4, 4);
        assertExtremes(c);
    }

    /** |z| up to 1e30 and maxima of 3e31 (float16: 6e4 and 65000); 1001 columns leave padding lanes. */
    @ParameterizedTest(name = "{0} tau={1}")
    @MethodSource("extremes")
    void hugeLogits(LogitsDtype dtype, double temperature) {
        final double range = dtype == LogitsDtype.FLOAT16 ? 6e4 : 1e30;
        final Random random = new Random(5);
        final int rows = 4, vocab = 1001;
        final double[] z = new double[rows * vocab];
        for (int i = 0; i < z.length; i++) {
            z[i] = Dtypes.round(dtype, range * (2 * random.nextDouble() - 1));
        }
        final long[] y = {3, 500, 1000, 17};
        for (int r = 0; r < rows; r++) {
            z[r * vocab + (int) (r % 2 == 0 ? y[r] : (y[r] + 1) % vocab)] = Dtypes.round(dtype, dtype == LogitsDtype.FLOAT16 ? 65000 : 3e31);
        }
        assertExtremes(new Case(dtype, rows, vocab, temperature, z, y, random));
    }

    /** p -> 1, on the target (lp of -1e-8 and -4e-16 to their relative precision) and off it. */
    @ParameterizedTest(name = "{0} tau={1}")
    @MethodSource("extremes")
    void dominantTargetsAndNonTargets(LogitsDtype dtype, double temperature) {
        final Case c = Case.random(dtype, 4, 1001, temperature, temperature, 3.0, 6);
        for (int r = 0; r < c.rows; r++) {
            final double margin = r < 2 ? 18 : 40;
            final int column = r % 2 == 0 ? (int) c.targets[r] : (int) (c.targets[r] + 1) % c.vocab;
            c.logits[r * c.vocab + column] = Dtypes.round(dtype, 3 + margin * temperature);
        }
        assertExtremes(c);
    }

    static void assertExtremes(Case c) {
        try (Pointer logits = NativeBuffers.logits(c.dtype, c.logits)) {
            assertExtremeForward(c, forward(c, logits));
            assertExtremeBackward(c, backward(c, logits, true, false), true);
            assertExtremeBackward(c, backward(c, logits, false, false), false);
        }
    }

    @Test
    void argumentsAreCheckedBeforeNativeCode() {
        try (FloatPointer logits = new FloatPointer(20L); LongPointer targets = new LongPointer(2L);
                FloatPointer logprob = new FloatPointer(2L); DoublePointer lse = new DoublePointer(2L)) {
            final LogitsView view = LogitsView.packed(logits, LogitsDtype.FLOAT32, 2, 10);
            assertThrows(IllegalArgumentException.class, () -> LogitsView.packed(logits, LogitsDtype.FLOAT32, 2, 0));
            assertThrows(IllegalArgumentException.class, () -> LogitsView.packed(logits, LogitsDtype.FLOAT32, -1, 10));
            assertThrows(IllegalArgumentException.class, () -> LogitsView.packed(null, LogitsDtype.FLOAT32, 2, 10));
            assertThrows(IllegalArgumentException.class, () -> new LogitsView(logits, LogitsDtype.FLOAT32, 1, 2, 10, 20, -10));
            assertThrows(IllegalArgumentException.class,
                    () -> Kernels.tokenLogProbForward(Device.CPU, null, view, null, 1.0, true, logprob, lse, null));
            assertThrows(IllegalArgumentException.class,
                    () -> Kernels.tokenLogProbForward(Device.CPU, null, view, targets, 0.0, true, logprob, lse, null));
            assertThrows(IllegalArgumentException.class,
                    () -> Kernels.tokenLogProbForward(Device.CPU, null, view, targets, Double.NaN, true, logprob, lse, null));
            assertThrows(IllegalArgumentException.class, () -> Kernels.tokenLogProbForward(Device.CPU, null,
                    LogitsView.packed(logits, LogitsDtype.FLOAT32, 3, 10), targets, 1.0, true, logprob, lse, null),
                    "logits too small for 3 rows of 10");
            final IllegalArgumentException small = assertThrows(IllegalArgumentException.class, () -> Kernels.tokenLogProbForward(
                    Device.CPU, null, view, targets, 1.0, true, logprob.limit(1), lse, null));
            assertTrue(small.getMessage().contains("logprob holds 1 elements, needs 2"), small.getMessage());
        }
    }

    @Test
    void nativeLayerRechecksWhatItIsGiven() {
        // Straight through the binding, past the Java checks: statuses, never a crash.
        try (FloatPointer logits = new FloatPointer(20L); LongPointer targets = new LongPointer(2L);
                FloatPointer logprob = new FloatPointer(2L); DoublePointer lse = new DoublePointer(2L)) {
            assertEquals(1, Gspo4jLibrary.gspo4j_token_logprob_forward(0, null, null, 0, 1, 2, 10, 20, 10, targets, 1.0, 1, logprob, lse, null));
            assertTrue(Gspo4jLibrary.gspo4j_last_error().getString().contains("logits must not be NULL"));
            assertEquals(1, Gspo4jLibrary.gspo4j_token_logprob_forward(0, null, logits, 0, 1, 2, 10, 20, 10, null, 1.0, 1, logprob, lse, null));
            assertEquals(1, Gspo4jLibrary.gspo4j_token_logprob_forward(0, null, logits, 0, -1, 2, 10, 20, 10, targets, 1.0, 1, logprob, lse, null));
            assertEquals(1, Gspo4jLibrary.gspo4j_token_logprob_forward(0, null, logits, 0, 1, 2, 0, 20, 10, targets, 1.0, 1, logprob, lse, null));
            assertEquals(1, Gspo4jLibrary.gspo4j_token_logprob_forward(0, null, logits, 7, 1, 2, 10, 20, 10, targets, 1.0, 1, logprob, lse, null));
            assertEquals(1, Gspo4jLibrary.gspo4j_token_logprob_forward(0, null, logits, 0, 1, 2, 10, 20, 10, targets, -1.0, 1, logprob, lse, null));
            assertEquals(1, Gspo4jLibrary.gspo4j_token_logprob_forward(5, null, logits, 0, 1, 2, 10, 20, 10, targets, 1.0, 1, logprob, lse, null));
            assertEquals(1, Gspo4jLibrary.gspo4j_token_logprob_forward(0, null, logits, 0, 2, 2, 10, Long.MAX_VALUE, 10, targets, 1.0, 1, logprob, lse, null));
            assertTrue(Gspo4jLibrary.gspo4j_last_error().getString().contains("overflows"));
            // Overlapping gradient rows would race.
            assertEquals(1, Gspo4jLibrary.gspo4j_token_logprob_backward(0, null, logits, 0, 1, 2, 10, 20, 10, targets, 1.0, lse,
                    null, logprob, null, logits, 20, 5));
            // A CUDA call where there is no GPU: a CPU-only build says so (UNSUPPORTED), a CUDA build
            // reports what the CUDA runtime said (no driver, or host memory passed as device memory).
            if (Kernels.cudaDeviceCount() == 0) {
                final int status = Gspo4jLibrary.gspo4j_token_logprob_forward(1, null, logits, 0, 1, 2, 10, 20, 10, targets, 1.0, 1,
                        logprob, lse, null);
                final String message = Gspo4jLibrary.gspo4j_last_error().getString();
                if (Kernels.cudaRuntimeVersion() == 0) {
                    assertEquals(4, status, message);
                    assertTrue(message.contains("built without CUDA"), message);
                } else {
                    assertEquals(5, status, message);
                    assertTrue(message.startsWith("cudaPointerGetAttributes(logits): cuda"), message);
                }
            }
        }
    }
}
