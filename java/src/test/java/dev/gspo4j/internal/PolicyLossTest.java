package dev.gspo4j.internal;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import dev.gspo4j.Aggregation;
import dev.gspo4j.Gspo4jException;
import dev.gspo4j.KlEstimator;
import java.util.ArrayList;
import java.util.List;
import java.util.Random;
import java.util.stream.Stream;
import org.bytedeco.javacpp.BytePointer;
import org.bytedeco.javacpp.FloatPointer;
import org.bytedeco.javacpp.LongPointer;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.Arguments;
import org.junit.jupiter.params.provider.EnumSource;
import org.junit.jupiter.params.provider.MethodSource;

/** The policy loss and the sequence log-ratio against the double-precision reference. */
class PolicyLossTest {

    /** Random responses: padded [batch, seq] with a mask, or packed with random lengths (some 0). */
    static final class Generated {
        final Reference.LossInputs inputs;
        final long[] offsets; // null: padded
        final int batch;
        final int seq;

        Generated(Reference.LossInputs inputs, long[] offsets, int batch, int seq) {
            this.inputs = inputs;
            this.offsets = offsets;
            this.batch = batch;
            this.seq = seq;
        }

        TokenLayout layout(LongPointer offsetsPointer) {
            return offsets == null ? TokenLayout.padded(batch, seq) : TokenLayout.packed(offsetsPointer, batch, offsets[batch]);
        }
    }

    record Options(boolean packed, boolean onPolicy, boolean perTokenAdvantages, boolean withRef, boolean withEntropy,
            double logRatioSpread) {}

    static Generated generate(long seed, Options o) {
        final Random random = new Random(seed);
        final int batch = 12;
        final int seq = 9;
        final Reference.Batch shape;
        long[] offsets = null;
        boolean[] mask = null;
        if (o.packed()) {
            offsets = new long[batch + 1];
            for (int b = 0; b < batch; b++) {
                offsets[b + 1] = offsets[b] + (b % 5 == 3 ? 0 : 1 + random.nextInt(15));
            }
            shape = Reference.Batch.packed(offsets);
        } else {
            shape = Reference.Batch.padded(batch, seq);
        }
        final int tokens = o.packed() ? (int) offsets[batch] : batch * seq;
        if (!o.packed()) {
            // Left-aligned responses of random length; response 4 is empty.
            mask = new boolean[tokens];
            for (int b = 0; b < batch; b++) {
                final int length = b == 4 ? 0 : 1 + random.nextInt(seq);
                for (int t = 0; t < length; t++) {
                    mask[b * seq + t] = true;
                }
            }
        } else if (random.nextBoolean()) {
            mask = new boolean[tokens];
            for (int i = 0; i < tokens; i++) {
                mask[i] = random.nextDouble() < 0.85;
            }
        }
        final double[] lp = new double[tokens];
        final double[] olp = o.onPolicy() ? null : new double[tokens];
        final double[] ref = o.withRef() ? new double[tokens] : null;
        final double[] entropy = o.withEntropy() ? new double[tokens] : null;
        for (int i = 0; i < tokens; i++) {
            lp[i] = (float) (-Math.abs(random.nextGaussian()) * 2 - 0.01);
            if (olp != null) {
                olp[i] = (float) (lp[i] + o.logRatioSpread() * random.nextGaussian());
            }
            if (ref != null) {
                ref[i] = (float) (lp[i] + 0.3 * random.nextGaussian());
            }
            if (entropy != null) {
                entropy[i] = (float) Math.abs(random.nextGaussian());
            }
        }
        final double[] advantages = new double[o.perTokenAdvantages() ? tokens : batch];
        for (int i = 0; i < advantages.length; i++) {
            advantages[i] = (float) random.nextGaussian();
        }
        return new Generated(new Reference.LossInputs(shape, lp, olp, mask, advantages, o.perTokenAdvantages(), ref, entropy),
                offsets, batch, seq);
    }

    static Reference.LossResult runNative(LossSettings settings, Generated g) {
        final Reference.LossInputs in = g.inputs;
        final int tokens = in.logprob().length;
        try (LongPointer offsets = NativeBuffers.longs(g.offsets);
                FloatPointer logprob = NativeBuffers.floats(in.logprob());
                FloatPointer oldLogprob = NativeBuffers.floats(in.oldLogprob());
                BytePointer mask = NativeBuffers.mask(in.mask());
                FloatPointer advantages = NativeBuffers.floats(in.advantages());
                FloatPointer ref = NativeBuffers.floats(in.refLogprob());
                FloatPointer entropy = NativeBuffers.floats(in.entropy());
                FloatPointer loss = NativeBuffers.floats(1, Float.NaN);
                FloatPointer gradLogprob = NativeBuffers.floats(tokens, Float.NaN);
                FloatPointer gradEntropy = NativeBuffers.floats(tokens, Float.NaN);
                FloatPointer metrics = NativeBuffers.floats(Metric.COUNT, Float.NaN)) {
            Kernels.policyLoss(Device.CPU, null, settings, g.layout(offsets), logprob, oldLogprob, mask, advantages,
                    in.advantagesPerToken(), ref, entropy, loss, gradLogprob, gradEntropy, metrics);
            return new Reference.LossResult(loss.get(0), NativeBuffers.toArray(metrics, Metric.COUNT),
                    NativeBuffers.toArray(gradLogprob, tokens), NativeBuffers.toArray(gradEntropy, tokens));
        }
    }

    static void assertMatches(Reference.LossResult want, Reference.LossResult got, String label) {
        assertNear(want.loss(), got.loss(), 2e-6 * Math.abs(want.loss()) + 1e-8, label + " loss");
        for (Metric m : Metric.values()) {
            final double w = want.metrics()[m.index()];
            assertNear(w, got.metrics()[m.index()], 2e-6 * Math.abs(w) + 1e-8, label + " metric " + m);
        }
        double scale = 0;
        for (double w : want.gradLogprob()) {
            scale = Math.max(scale, Math.abs(w));
        }
        for (int i = 0; i < want.gradLogprob().length; i++) {
            final double w = want.gradLogprob()[i];
            assertNear(w, got.gradLogprob()[i], 1e-4 * Math.abs(w) + 1e-6 * scale + 1e-10, label + " dLoss/dlp[" + i + "]");
            final double we = want.gradEntropy()[i];
            assertNear(we, got.gradEntropy()[i], 1e-5 * Math.abs(we) + 1e-10, label + " dLoss/dH[" + i + "]");
        }
    }

    static void assertNear(double want, double got, double allowed, String what) {
        if (!(Math.abs(want - got) <= allowed)) {
            fail(String.format("%s: want %.9g got %.9g (allowed %.3g)", what, want, got, allowed));
        }
    }

    static Stream<Arguments> modes() {
        final List<Arguments> out = new ArrayList<>();
        for (RatioLevel level : RatioLevel.values()) {
            for (Aggregation aggregation : Aggregation.values()) {
                for (boolean packed : new boolean[] {false, true}) {
                    for (boolean onPolicy : new boolean[] {false, true}) {
                        out.add(Arguments.of(level, aggregation, packed, onPolicy));
                    }
                }
            }
        }
        return out.stream();
    }

    static LossSettings settingsFor(RatioLevel level) {
        return level == RatioLevel.TOKEN ? LossSettings.grpo() : LossSettings.gspo().withRatioLevel(level);
    }

    @ParameterizedTest(name = "{0} {1} packed={2} onPolicy={3}")
    @MethodSource("modes")
    void matchesReference(RatioLevel level, Aggregation aggregation, boolean packed, boolean onPolicy) {
        // Spreads that put a good share of ratios outside the clip range of each loss.
        final double spread = level == RatioLevel.TOKEN ? 0.3 : 3e-3;
        final Generated g = generate(1000L * level.ordinal() + 10L * aggregation.ordinal() + (packed ? 5 : 0) + (onPolicy ? 1 : 0),
                new Options(packed, onPolicy, level == RatioLevel.SEQUENCE_TOKEN, false, true, spread));
        final LossSettings settings = settingsFor(level).withAggregation(aggregation);
        assertMatches(Reference.loss(settings, g.inputs), runNative(settings, g), level + " " + aggregation);
        if (!onPolicy) {
            final double clipped = runNative(settings, g).metrics()[Metric.CLIP_FRACTION_LOW.index()]
                    + runNative(settings, g).metrics()[Metric.CLIP_FRACTION_HIGH.index()];
            assertTrue(clipped > 0, "the case should clip something");
        }
    }

    @ParameterizedTest
    @EnumSource(KlEstimator.class)
    void klEntropyDualClipAndClampTogether(KlEstimator estimator) {
        for (RatioLevel level : RatioLevel.values()) {
            final Generated g = generate(77 + estimator.ordinal() + 10L * level.ordinal(),
                    new Options(level == RatioLevel.SEQUENCE, false, level == RatioLevel.SEQUENCE_TOKEN, true, true,
                            level == RatioLevel.TOKEN ? 1.0 : 0.4));
            final LossSettings settings = settingsFor(level).withClip(0.2, 0.28).withDualClip(3.0).withLogRatioClamp(1.2)
                    .withKl(0.05, estimator).withEntropyCoef(0.01);
            final Reference.LossResult want = Reference.loss(settings, g.inputs);
            final Reference.LossResult got = runNative(settings, g);
            assertMatches(want, got, level + " " + estimator);
            if (level == RatioLevel.TOKEN) {
                assertTrue(got.metrics()[Metric.DUAL_CLIP_FRACTION.index()] > 0, "dual clip should act");
                assertTrue(got.metrics()[Metric.RATIO_MAX.index()] <= Math.exp(1.2) + 1e-5, "ratios clamped");
            }
        }
    }

    @Test
    void explicitNormalizerAndLengthNorm() {
        for (Aggregation aggregation : Aggregation.values()) {
            final Generated g = generate(5 + aggregation.ordinal(), new Options(true, false, false, false, false, 0.3));
            final LossSettings settings = LossSettings.grpo().withAggregation(aggregation).withNormalizer(57).withLengthNorm(13);
            assertMatches(Reference.loss(settings, g.inputs), runNative(settings, g), aggregation.toString());
        }
        final Generated g = generate(9, new Options(false, false, false, false, false, 3e-3));
        final LossSettings gspo = LossSettings.gspo().withNormalizer(40);
        assertMatches(Reference.loss(gspo, g.inputs), runNative(gspo, g), "GSPO normalizer");
    }

    @Test
    void gspoTokenEqualsGspoForSequenceConstantAdvantages() {
        final Generated g = generate(42, new Options(false, false, false, true, true, 3e-3));
        final LossSettings gspo = LossSettings.gspo().withKl(0.02, KlEstimator.K3);
        final Reference.LossResult sequence = runNative(gspo, g);
        // The same advantage on every token of a response, given per token.
        final Reference.LossInputs in = g.inputs;
        final double[] perToken = new double[in.logprob().length];
        for (int b = 0; b < g.batch; b++) {
            for (int t = 0; t < g.seq; t++) {
                perToken[b * g.seq + t] = in.advantages()[b];
            }
        }
        final Generated tokenLevel = new Generated(new Reference.LossInputs(in.batch(), in.logprob(), in.oldLogprob(), in.mask(),
                perToken, true, in.refLogprob(), in.entropy()), null, g.batch, g.seq);
        final Reference.LossResult token = runNative(gspo.withRatioLevel(RatioLevel.SEQUENCE_TOKEN), tokenLevel);
        assertNear(sequence.loss(), token.loss(), 1e-6 * Math.abs(sequence.loss()) + 1e-9, "loss");
        for (int i = 0; i < perToken.length; i++) {
            assertNear(sequence.gradLogprob()[i], token.gradLogprob()[i], 1e-6 * Math.abs(sequence.gradLogprob()[i]) + 1e-12, "grad " + i);
        }
        assertTrue(sequence.metrics()[Metric.CLIP_FRACTION_LOW.index()] + sequence.metrics()[Metric.CLIP_FRACTION_HIGH.index()] > 0);
    }

    @Test
    void packedEqualsPadded() {
        // The padded batch's responses, packed back to back without their padding.
        final Generated padded = generate(8, new Options(false, false, false, true, true, 0.3));
        final Reference.LossInputs in = padded.inputs;
        final List<Integer> kept = new ArrayList<>();
        final long[] offsets = new long[padded.batch + 1];
        for (int b = 0; b < padded.batch; b++) {
            for (int t = 0; t < padded.seq; t++) {
                if (in.mask()[b * padded.seq + t]) {
                    kept.add(b * padded.seq + t);
                }
            }
            offsets[b + 1] = kept.size();
        }
        final double[][] arrays = {in.logprob(), in.oldLogprob(), in.refLogprob(), in.entropy()};
        final double[][] packedArrays = new double[arrays.length][kept.size()];
        for (int k = 0; k < arrays.length; k++) {
            for (int i = 0; i < kept.size(); i++) {
                packedArrays[k][i] = arrays[k][kept.get(i)];
            }
        }
        final Generated packed = new Generated(new Reference.LossInputs(Reference.Batch.packed(offsets), packedArrays[0],
                packedArrays[1], null, in.advantages(), false, packedArrays[2], packedArrays[3]), offsets, padded.batch, 0);
        for (RatioLevel level : new RatioLevel[] {RatioLevel.TOKEN, RatioLevel.SEQUENCE}) {
            for (Aggregation aggregation : new Aggregation[] {Aggregation.SEQ_MEAN_TOKEN_MEAN, Aggregation.TOKEN_MEAN, Aggregation.SEQ_MEAN_TOKEN_SUM}) {
                final LossSettings settings = settingsFor(level).withAggregation(aggregation).withKl(0.1, KlEstimator.K2).withEntropyCoef(0.01);
                final Reference.LossResult a = runNative(settings, padded);
                final Reference.LossResult b = runNative(settings, packed);
                assertEquals(a.loss(), b.loss(), level + " " + aggregation);
                assertArrayEquals(a.metrics(), b.metrics());
                for (int i = 0; i < kept.size(); i++) {
                    assertEquals(a.gradLogprob()[kept.get(i)], b.gradLogprob()[i]);
                    assertEquals(a.gradEntropy()[kept.get(i)], b.gradEntropy()[i]);
                }
            }
        }
    }

    @Test
    void allEmptyBatchGivesZeroLossAndGradient() {
        for (RatioLevel level : RatioLevel.values()) {
            for (Aggregation aggregation : Aggregation.values()) {
                final Generated g = generate(3, new Options(false, false, level == RatioLevel.SEQUENCE_TOKEN, true, true, 0.3));
                java.util.Arrays.fill(g.inputs.mask(), false);
                final LossSettings settings = settingsFor(level).withAggregation(aggregation).withKl(0.1, KlEstimator.K3).withEntropyCoef(0.1);
                final Reference.LossResult got = runNative(settings, g);
                assertEquals(0.0, got.loss());
                for (double v : got.metrics()) {
                    assertEquals(0.0, v);
                }
                for (int i = 0; i < got.gradLogprob().length; i++) {
                    assertEquals(0.0, got.gradLogprob()[i]);
                    assertEquals(0.0, got.gradEntropy()[i]);
                }
            }
        }
        // No tokens at all.
        final Generated none = new Generated(new Reference.LossInputs(Reference.Batch.padded(0, 0), new double[0], null, null,
                new double[0], false, null, null), null, 0, 0);
        assertEquals(0.0, runNative(LossSettings.gspo(), none).loss());
    }

    @Test
    void hugeLogRatioDoesNotTurnIntoNaN() {
        // exp(100) * A, min'd with the clipped term, must not give Inf - Inf or 0 * Inf.
        final Generated g = generate(12, new Options(false, false, false, false, false, 0.0));
        for (int i = 0; i < g.inputs.logprob().length; i++) {
            g.inputs.oldLogprob()[i] = g.inputs.logprob()[i] + (i % 2 == 0 ? -100 : 100);
        }
        for (RatioLevel level : new RatioLevel[] {RatioLevel.TOKEN, RatioLevel.SEQUENCE}) {
            final Reference.LossResult got = runNative(settingsFor(level), g);
            assertTrue(Double.isFinite(got.loss()));
            for (double v : got.gradLogprob()) {
                assertTrue(Double.isFinite(v));
            }
            assertMatches(Reference.loss(settingsFor(level), g.inputs), got, "clamped " + level);
        }
    }

    @Test
    void resultsDoNotDependOnTheThreadCount() {
        final int threads = Kernels.numThreads();
        try {
            final Generated g = generate(21, new Options(true, false, false, true, true, 0.3));
            final LossSettings settings = LossSettings.grpo().withKl(0.1, KlEstimator.K3).withEntropyCoef(0.01);
            Kernels.setNumThreads(1);
            final Reference.LossResult one = runNative(settings, g);
            Kernels.setNumThreads(Math.max(2, threads));
            final Reference.LossResult many = runNative(settings, g);
            assertEquals(one.loss(), many.loss());
            assertArrayEquals(one.metrics(), many.metrics());
            assertArrayEquals(one.gradLogprob(), many.gradLogprob());
        } finally {
            Kernels.setNumThreads(threads);
        }
    }

    @Test
    void nonFiniteInputsAreNamed() {
        final Options options = new Options(false, false, true, true, true, 0.3);
        final LossSettings settings = settingsFor(RatioLevel.TOKEN).withKl(0.1, KlEstimator.K1);
        final String[] names = {"logprob", "old_logprob", "advantages", "ref_logprob", "entropy"};
        for (int k = 0; k < names.length; k++) {
            final Generated g = generate(4, options);
            final Reference.LossInputs in = g.inputs;
            final double[] target = new double[][] {in.logprob(), in.oldLogprob(), in.advantages(), in.refLogprob(), in.entropy()}[k];
            target[0] = Double.NaN;
            final Gspo4jException e = assertThrows(Gspo4jException.class, () -> runNative(settings, g));
            assertEquals(Gspo4jException.Status.NON_FINITE, e.status());
            assertTrue(e.getMessage().startsWith(names[k] + "[0]"), e.getMessage());
            // Unchecked mode: no exception (the caller takes the NaN).
            runNative(settings.withCheckFinite(false), g);
        }
        // A non-finite value at a masked-out token is not an error (engines pad with -inf).
        final Generated g = generate(4, options);
        final int masked = firstMasked(g.inputs.mask());
        g.inputs.oldLogprob()[masked] = Double.NEGATIVE_INFINITY;
        g.inputs.logprob()[masked] = Double.NaN;
        final Reference.LossResult got = runNative(settings, g);
        assertTrue(Double.isFinite(got.loss()));
    }

    static int firstMasked(boolean[] mask) {
        for (int i = 0; i < mask.length; i++) {
            if (!mask[i]) {
                return i;
            }
        }
        throw new AssertionError("no masked token");
    }

    @Test
    void badOffsetsAndOptionsAreRejected() {
        final Generated g = generate(6, new Options(true, false, false, false, false, 0.3));
        final long[][] badOffsets = {
            {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25},
            {0, 3, 2, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25},
        };
        for (long[] offsets : badOffsets) {
            final Generated bad = new Generated(g.inputs, offsets, g.batch, 0);
            final Gspo4jException e = assertThrows(Gspo4jException.class, () -> runNative(LossSettings.grpo(), bad));
            assertEquals(Gspo4jException.Status.OUT_OF_RANGE, e.status());
            assertTrue(e.getMessage().contains("offsets"), e.getMessage());
        }
        assertThrows(IllegalArgumentException.class, () -> LossSettings.gspo().withClip(1.01, 0.2));
        assertThrows(IllegalArgumentException.class, () -> LossSettings.gspo().withClip(-0.1, 0.2));
        assertThrows(IllegalArgumentException.class, () -> LossSettings.gspo().withDualClip(0.5));
        assertThrows(IllegalArgumentException.class, () -> LossSettings.gspo().withLogRatioClamp(0));
        assertThrows(IllegalArgumentException.class, () -> LossSettings.gspo().withNormalizer(-1));
        assertThrows(IllegalArgumentException.class, () -> LossSettings.gspo().withKl(Double.NaN, KlEstimator.K1));
        // GSPO with per-token advantages, KL without reference log-probs: caught in Java.
        final Generated perToken = generate(6, new Options(false, false, true, false, false, 0.3));
        final IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> runNative(LossSettings.gspo(), perToken));
        assertTrue(e.getMessage().contains("GSPO-token"), e.getMessage());
        final IllegalArgumentException noRef = assertThrows(IllegalArgumentException.class,
                () -> runNative(LossSettings.grpo().withKl(0.1, KlEstimator.K3), g));
        assertTrue(noRef.getMessage().contains("refLogprob"), noRef.getMessage());
        // The native layer re-checks a config it is handed directly.
        try (Gspo4jLibrary.LossConfig config = new Gspo4jLibrary.LossConfig(); FloatPointer loss = new FloatPointer(1L)) {
            assertEquals(0, Gspo4jLibrary.gspo4j_loss_config_init(config));
            assertEquals(1, config.ratio_level());
            assertEquals(3e-4, config.eps_low());
            config.aggregation(9);
            assertEquals(1, Gspo4jLibrary.gspo4j_policy_loss(0, null, config, 0, 0, 0, null, null, null, null, null, null, 0, null, null, null,
                    loss, null, null, null));
            assertTrue(Gspo4jLibrary.gspo4j_last_error().getString().contains("aggregation"));
            assertEquals(1, Gspo4jLibrary.gspo4j_policy_loss(0, null, null, 0, 0, 0, null, null, null, null, null, null, 0, null, null, null,
                    loss, null, null, null));
            Gspo4jLibrary.gspo4j_loss_config_init(config);
            assertEquals(1, Gspo4jLibrary.gspo4j_policy_loss(0, null, config, 2, 3, 6, null, null, null, null, null, null, 0, null, null, null,
                    loss, null, null, null));
            assertTrue(Gspo4jLibrary.gspo4j_last_error().getString().contains("logprob must not be NULL"));
            assertEquals(1, Gspo4jLibrary.gspo4j_policy_loss(0, null, config, 2, 3, 7, null, null, null, null, null, null, 0, null, null, null,
                    loss, null, null, null));
        }
    }

    @Test
    void sequenceLogRatioMatchesReference() {
        for (boolean packed : new boolean[] {false, true}) {
            final Generated g = generate(15, new Options(packed, false, false, false, false, 0.3));
            final Reference.LossInputs in = g.inputs;
            try (LongPointer offsets = NativeBuffers.longs(g.offsets);
                    FloatPointer logprob = NativeBuffers.floats(in.logprob());
                    FloatPointer oldLogprob = NativeBuffers.floats(in.oldLogprob());
                    BytePointer mask = NativeBuffers.mask(in.mask());
                    FloatPointer logRatio = NativeBuffers.floats(g.batch, Float.NaN);
                    FloatPointer lengths = NativeBuffers.floats(g.batch, Float.NaN)) {
                Kernels.sequenceLogRatio(Device.CPU, null, g.layout(offsets), logprob, oldLogprob, mask, true, logRatio, lengths);
                for (int b = 0; b < g.batch; b++) {
                    double sum = 0;
                    int length = 0;
                    for (int i = in.batch().starts()[b]; i < in.batch().ends()[b]; i++) {
                        if (in.mask() == null || in.mask()[i]) {
                            sum += in.logprob()[i] - in.oldLogprob()[i];
                            length++;
                        }
                    }
                    assertEquals(length, lengths.get(b));
                    assertNear(length == 0 ? 0 : sum / length, logRatio.get(b), 1e-6, "log ratio " + b);
                }
            }
        }
    }
}
