package dev.gspo4j;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import dev.gspo4j.internal.FusedLogProbs;
import dev.gspo4j.internal.LossSettings;
import dev.gspo4j.internal.Metric;
import dev.gspo4j.internal.ReferenceMetrics;
import dev.gspo4j.internal.RatioLevel;
import java.util.ArrayList;
import java.util.List;
import java.util.Random;
import java.util.stream.Stream;
import org.bytedeco.pytorch.BoolOptional;
import org.bytedeco.pytorch.LinearImpl;
import org.bytedeco.pytorch.NoGradGuard;
import org.bytedeco.pytorch.Scalar;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorArrayRefOptional;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.Arguments;
import org.junit.jupiter.params.provider.EnumSource;
import org.junit.jupiter.params.provider.MethodSource;

/** The loss modules on libtorch against the plain composite (log_softmax + gather + autograd). */
public class PolicyLossModuleTest {

    /** A random padded batch: response 1 is empty, the others have random lengths. */
    static final class Batch {
        final int b;
        final int t;
        final int v;
        final float[] logitValues;
        final long[] targetValues;
        final float[] maskValues;
        final float[] oldValues;
        final float[] refValues;
        final float[] sequenceAdvantages;
        final float[] tokenAdvantages;

        Batch(long seed, int b, int t, int v, double logRatioSpread) {
            this.b = b;
            this.t = t;
            this.v = v;
            final Random random = new Random(seed);
            logitValues = new float[b * t * v];
            for (int i = 0; i < logitValues.length; i++) {
                logitValues[i] = (float) (2.0 * random.nextGaussian());
            }
            targetValues = new long[b * t];
            maskValues = new float[b * t];
            oldValues = new float[b * t];
            refValues = new float[b * t];
            tokenAdvantages = new float[b * t];
            sequenceAdvantages = new float[b];
            for (int r = 0; r < b; r++) {
                final int length = r == 1 ? 0 : 1 + random.nextInt(t);
                sequenceAdvantages[r] = (float) random.nextGaussian();
                for (int k = 0; k < t; k++) {
                    final int i = r * t + k;
                    targetValues[i] = random.nextInt(v);
                    maskValues[i] = k < length ? 1 : 0;
                    tokenAdvantages[i] = (float) random.nextGaussian();
                }
            }
            // Old and reference log-probs near the true ones, so ratios straddle the clip range.
            try (Tensor z = Tensor.create(logitValues).reshape(b, t, v); Tensor lsm = z.log_softmax(-1);
                    Tensor y = Tensor.create(targetValues).reshape(b, t, 1); Tensor g = lsm.gather(-1, y)) {
                for (int i = 0; i < b * t; i++) {
                    final float lp = g.data_ptr_float().get(i);
                    oldValues[i] = (float) (lp + logRatioSpread * random.nextGaussian());
                    refValues[i] = (float) (lp + 0.3 * random.nextGaussian());
                }
            }
        }

        /** Logits as a leaf requiring grad, rounded to `type`. */
        Tensor logits(ScalarType type) {
            try (Tensor base = Tensor.create(logitValues).reshape(b, t, v); Tensor cast = base.to(type)) {
                return cast.detach().set_requires_grad(true);
            }
        }

        Tensor targets() { return Tensor.create(targetValues).reshape(b, t); }
        Tensor mask() { return Tensor.create(maskValues).reshape(b, t); }
        Tensor old() { return Tensor.create(oldValues).reshape(b, t); }
        Tensor ref() { return Tensor.create(refValues).reshape(b, t); }
        Tensor sequenceAdvantages() { return Tensor.create(sequenceAdvantages); }
        Tensor tokenAdvantages() { return Tensor.create(tokenAdvantages).reshape(b, t); }
    }

    record Case(String name, PolicyLoss loss, LossSettings settings, double temperature, boolean tokenAdvantages,
            boolean onPolicy) {}

    /** The settings inside a PolicyLoss (for references that need them). */
    public static LossSettings settingsOf(PolicyLoss loss) {
        return loss.settings();
    }

    static Case caseOf(String name, PolicyLoss.Builder builder, double temperature, boolean tokenAdvantages, boolean onPolicy) {
        final PolicyLoss loss = builder.temperature(temperature).build();
        return new Case(name, loss, settingsOf(loss), temperature, tokenAdvantages, onPolicy);
    }

    /** Loss value, log-probs, entropy and the logits gradient of our module and of the composite. */
    static void compare(Case c, Batch batch, ScalarType type, boolean viaDirectBackward) {
        final double gradRelative = type == ScalarType.Float ? 1e-4 : type == ScalarType.BFloat16 ? 1.6e-2 : 4e-3;
        try (Tensor logits = batch.logits(type); Tensor targets = batch.targets(); Tensor mask = batch.mask();
                Tensor old = batch.old(); Tensor ref = batch.ref();
                Tensor advantages = c.tokenAdvantages ? batch.tokenAdvantages() : batch.sequenceAdvantages();
                Tensor reference = logits.to(ScalarType.Double).detach().set_requires_grad(true)) {
            final LossInput.Builder input = LossInput.builder().logits(logits).targets(targets).mask(mask).refLogProbs(ref);
            if (!c.onPolicy) {
                input.oldLogProbs(old);
            }
            if (c.tokenAdvantages) {
                input.tokenAdvantages(advantages);
            } else {
                input.advantages(advantages);
            }
            try (LossResult result = c.loss.compute(input.build())) {
                if (viaDirectBackward) {
                    result.backward();
                } else {
                    result.loss().backward();
                }
                final CompositeLoss.Output want = CompositeLoss.compute(c.settings, c.temperature, reference, targets, mask,
                        c.onPolicy ? null : old, ref, advantages, c.tokenAdvantages);
                want.loss().backward();
                final String label = c.name + " " + type + (viaDirectBackward ? " direct" : "");
                assertClose(want.loss(), result.lossValue(), 2e-5, 1e-7, label + " loss");
                assertClose(want.logProbs(), result.logProbs(), 1e-5, 1e-6, label + " logProbs");
                assertClose(want.entropy(), result.entropy(), 1e-5, 1e-6, label + " entropy");
                assertClose(reference.grad(), logits.grad(), gradRelative, 1e-3 * maxAbs(reference.grad()), label + " dLoss/dlogits");
                assertMetrics(c, batch, want, result.metrics(), label);
            }
        }
    }

    /** Every metric against the double-precision reference fed the composite's log-probs and entropy. */
    static void assertMetrics(Case c, Batch batch, CompositeLoss.Output want, LossMetrics got, String label) {
        final int n = batch.b * batch.t;
        final boolean[] mask = new boolean[n];
        final double[] old = new double[n];
        final double[] ref = new double[n];
        for (int i = 0; i < n; i++) {
            mask[i] = batch.maskValues[i] != 0;
            old[i] = batch.oldValues[i];
            ref[i] = batch.refValues[i];
        }
        final float[] adv = c.tokenAdvantages ? batch.tokenAdvantages : batch.sequenceAdvantages;
        final double[] advantages = new double[adv.length];
        for (int i = 0; i < adv.length; i++) {
            advantages[i] = adv[i];
        }
        final double[] expected = ReferenceMetrics.of(c.settings, batch.b, batch.t, doubles(want.logProbs()), c.onPolicy ? null : old,
                mask, advantages, c.tokenAdvantages, ref, doubles(want.entropy()));
        try (Tensor values = got.tensor().to(ScalarType.Double).contiguous()) {
            for (Metric m : Metric.values()) {
                final double actual = values.data_ptr_double().get(m.index());
                final double w = expected[m.index()];
                if (!(Math.abs(actual - w) <= 1e-4 * Math.abs(w) + 1e-6)) {
                    fail(String.format("%s metric %s: want %.9g got %.9g", label, m, w, actual));
                }
            }
        }
    }

    static double[] doubles(Tensor t) {
        try (Tensor d = t.to(ScalarType.Double).contiguous()) {
            final double[] out = new double[(int) d.numel()];
            d.data_ptr_double().get(out);
            return out;
        }
    }

    static double maxAbs(Tensor t) {
        if (t.numel() == 0) {
            return 0;
        }
        try (Tensor a = t.abs(); Tensor m = a.max(); Tensor d = m.to(ScalarType.Double)) {
            return d.item_double();
        }
    }

    /** Elementwise |got - want| <= relative * |want| + absolute. */
    static void assertClose(Tensor want, Tensor got, double relative, double absolute, String what) {
        try (Tensor w = want.to(ScalarType.Double).contiguous(); Tensor g = got.to(ScalarType.Double).contiguous()) {
            assertEquals(w.numel(), g.numel(), what + " size");
            final double[] wv = new double[(int) w.numel()];
            final double[] gv = new double[(int) g.numel()];
            w.data_ptr_double().get(wv);
            g.data_ptr_double().get(gv);
            for (int i = 0; i < wv.length; i++) {
                if (!(Math.abs(wv[i] - gv[i]) <= relative * Math.abs(wv[i]) + absolute)) {
                    fail(String.format("%s[%d]: want %.9g got %.9g", what, i, wv[i], gv[i]));
                }
            }
        }
    }

    static Stream<Arguments> modulesAndDtypes() {
        final List<Arguments> out = new ArrayList<>();
        for (ScalarType type : new ScalarType[] {ScalarType.Float, ScalarType.BFloat16, ScalarType.Half}) {
            for (double temperature : new double[] {1.0, 0.8}) {
                out.add(Arguments.of(caseOf("GSPO", PolicyLoss.gspo().clip(3e-3, 4e-3), temperature, false, false), type));
                out.add(Arguments.of(caseOf("GSPO-token", PolicyLoss.gspoToken().clip(3e-3, 4e-3), temperature, true, false), type));
                out.add(Arguments.of(caseOf("GRPO", PolicyLoss.grpo().clip(0.2, 0.28), temperature, false, false), type));
                out.add(Arguments.of(caseOf("PPO", PolicyLoss.ppo().dualClip(3.0), temperature, true, false), type));
            }
        }
        return out.stream();
    }

    @ParameterizedTest(name = "{0} {1}")
    @MethodSource("modulesAndDtypes")
    void matchesTheComposite(Case c, ScalarType type) {
        final double spread = c.settings.ratioLevel() == RatioLevel.TOKEN ? 0.4 : 0.01;
        compare(c, new Batch(11, 4, 6, 37, spread), type, false);
        compare(c, new Batch(12, 3, 5, 1000, spread), type, true);
    }

    @ParameterizedTest
    @EnumSource(Aggregation.class)
    void aggregationsKlEntropyAndOnPolicy(Aggregation aggregation) {
        for (KlEstimator estimator : KlEstimator.values()) {
            compare(caseOf("GRPO " + aggregation + " " + estimator, PolicyLoss.grpo().aggregation(aggregation).kl(0.05, estimator)
                    .entropyCoefficient(0.01), 1.0, false, false), new Batch(21, 4, 7, 50, 0.4), ScalarType.Float, false);
        }
        compare(caseOf("GRPO on-policy " + aggregation, PolicyLoss.grpo().aggregation(aggregation), 1.0, false, true),
                new Batch(22, 4, 7, 50, 0.4), ScalarType.Float, false);
        compare(caseOf("GSPO-token on-policy " + aggregation, PolicyLoss.gspoToken().aggregation(aggregation)
                .entropyCoefficient(0.02), 0.9, true, true), new Batch(23, 4, 7, 50, 0.01), ScalarType.Float, false);
        compare(caseOf("GRPO normalized " + aggregation, PolicyLoss.grpo().aggregation(aggregation).normalizer(17).lengthNorm(9),
                1.0, false, false), new Batch(24, 4, 7, 50, 0.4), ScalarType.Float, false);
    }

    @Test
    void gspoTokenEqualsGspoForSequenceConstantAdvantages() {
        final Batch batch = new Batch(31, 5, 6, 40, 0.01);
        try (Tensor targets = batch.targets(); Tensor mask = batch.mask(); Tensor old = batch.old();
                Tensor sequence = batch.sequenceAdvantages(); Tensor perToken = sequence.unsqueeze(1).expand(5, 6).contiguous();
                Tensor a = batch.logits(ScalarType.Float); Tensor b = batch.logits(ScalarType.Float)) {
            final PolicyLoss gspo = PolicyLoss.gspo().clip(3e-3, 4e-3).build();
            final PolicyLoss gspoToken = PolicyLoss.gspoToken().clip(3e-3, 4e-3).build();
            try (LossResult x = gspo.compute(LossInput.builder().logits(a).targets(targets).mask(mask).oldLogProbs(old).advantages(sequence).build());
                    LossResult y = gspoToken.compute(LossInput.builder().logits(b).targets(targets).mask(mask).oldLogProbs(old)
                            .tokenAdvantages(perToken).build())) {
                x.loss().backward();
                y.loss().backward();
                assertClose(x.lossValue(), y.lossValue(), 1e-6, 1e-9, "loss");
                assertClose(a.grad(), b.grad(), 1e-5, 1e-9, "gradient");
                assertTrue(x.metrics().clipFractionLow() + x.metrics().clipFractionHigh() > 0, "some responses clip");
            }
        }
    }

    @Test
    void packedEqualsPadded() {
        final Batch batch = new Batch(41, 4, 6, 30, 0.4);
        final PolicyLoss grpo = PolicyLoss.grpo().kl(0.1, KlEstimator.K3).entropyCoefficient(0.01).build();
        // Pack the counted tokens of each response back to back.
        final List<Integer> kept = new ArrayList<>();
        final long[] offsets = new long[batch.b + 1];
        for (int r = 0; r < batch.b; r++) {
            for (int k = 0; k < batch.t; k++) {
                if (batch.maskValues[r * batch.t + k] != 0) {
                    kept.add(r * batch.t + k);
                }
            }
            offsets[r + 1] = kept.size();
        }
        final long[] index = kept.stream().mapToLong(Integer::longValue).toArray();
        try (Tensor padded = batch.logits(ScalarType.Float); Tensor targets = batch.targets(); Tensor mask = batch.mask();
                Tensor old = batch.old(); Tensor ref = batch.ref(); Tensor adv = batch.sequenceAdvantages();
                Tensor idx = Tensor.create(index); Tensor flat = padded.detach().reshape(-1, batch.v);
                Tensor packedLogits = flat.index_select(0, idx).detach().set_requires_grad(true);
                Tensor packedTargets = targets.reshape(-1).index_select(0, idx); Tensor packedOld = old.reshape(-1).index_select(0, idx);
                Tensor packedRef = ref.reshape(-1).index_select(0, idx); Tensor offsetTensor = Tensor.create(offsets)) {
            try (LossResult a = grpo.compute(LossInput.builder().logits(padded).targets(targets).mask(mask).oldLogProbs(old)
                    .refLogProbs(ref).advantages(adv).build());
                    LossResult b = grpo.compute(LossInput.builder().logits(packedLogits).targets(packedTargets).offsets(offsetTensor)
                            .oldLogProbs(packedOld).refLogProbs(packedRef).advantages(adv).build())) {
                assertEquals(a.lossValue().item_float(), b.lossValue().item_float());
                a.loss().backward();
                b.loss().backward();
                try (Tensor paddedGrad = padded.grad().reshape(-1, batch.v).index_select(0, idx)) {
                    assertClose(paddedGrad, packedLogits.grad(), 0, 0, "packed gradient");
                }
                assertEquals(a.metrics().tokens(), b.metrics().tokens());
            }
        }
    }

    @Test
    void allEmptyBatchGivesZeroLossAndZeroGradient() {
        final Batch batch = new Batch(51, 3, 4, 20, 0.4);
        java.util.Arrays.fill(batch.maskValues, 0);
        for (PolicyLoss loss : new PolicyLoss[] {PolicyLoss.gspo().build(), PolicyLoss.grpo().kl(0.1, KlEstimator.K3).build(),
                PolicyLoss.gspoToken().entropyCoefficient(0.1).build()}) {
            try (Tensor logits = batch.logits(ScalarType.BFloat16); Tensor targets = batch.targets(); Tensor mask = batch.mask();
                    Tensor adv = batch.sequenceAdvantages(); Tensor ref = batch.ref();
                    LossResult result = loss.compute(LossInput.builder().logits(logits).targets(targets).mask(mask)
                            .refLogProbs(ref).advantages(adv).build())) {
                result.loss().backward();
                assertEquals(0.0f, result.lossValue().item_float());
                assertEquals(0.0, maxAbs(logits.grad()));
                assertEquals(0, result.metrics().sequences());
            }
        }
    }

    @Test
    void composesWithOtherTermsAndScales() {
        final Batch batch = new Batch(61, 3, 5, 40, 0.4);
        final PolicyLoss grpo = PolicyLoss.grpo().build();
        final LossSettings settings = settingsOf(grpo);
        try (Tensor logits = batch.logits(ScalarType.Float); Tensor targets = batch.targets(); Tensor mask = batch.mask();
                Tensor old = batch.old(); Tensor adv = batch.sequenceAdvantages();
                Tensor reference = logits.detach().clone().set_requires_grad(true);
                LossResult result = grpo.compute(LossInput.builder().logits(logits).targets(targets).mask(mask).oldLogProbs(old)
                        .advantages(adv).build())) {
            // 2.5 * loss + 0.1 * mean(z^2), one backward.
            final Tensor total = result.loss().mul(new Scalar(2.5)).add(logits.pow(new Scalar(2)).mean().mul(new Scalar(0.1)));
            total.backward();
            final CompositeLoss.Output want = CompositeLoss.compute(settings, 1.0, reference, targets, mask, old, null, adv, false);
            want.loss().mul(new Scalar(2.5)).add(reference.pow(new Scalar(2)).mean().mul(new Scalar(0.1))).backward();
            assertClose(reference.grad(), logits.grad(), 1e-4, 1e-7, "gradient of 2.5 * loss + 0.1 * mean(z^2)");
        }
    }

    @Test
    void backwardThroughATinyModel() {
        // hidden [B, T, H] -> lm_head Linear(H, V) -> logits; parameters' gradients against the composite.
        final Batch batch = new Batch(71, 3, 5, 64, 0.4);
        torch.manual_seed(7);
        try (LinearImpl head = new LinearImpl(16, 64); LinearImpl copy = new LinearImpl(16, 64);
                Tensor hidden = torch.randn(3, 5, 16); Tensor targets = batch.targets(); Tensor mask = batch.mask();
                Tensor old = batch.old(); Tensor adv = batch.sequenceAdvantages()) {
            try (NoGradGuard guard = new NoGradGuard()) {
                copy.weight().copy_(head.weight());
                copy.bias().copy_(head.bias());
            }
            final PolicyLoss gspo = PolicyLoss.gspo().clip(3e-3, 4e-3).build();
            final PolicyLoss grpo = PolicyLoss.grpo().entropyCoefficient(0.01).build();
            for (PolicyLoss loss : new PolicyLoss[] {gspo, grpo}) {
                try (Tensor logits = head.forward(hidden); LossResult result = loss.compute(LossInput.builder().logits(logits)
                        .targets(targets).mask(mask).oldLogProbs(old).advantages(adv).build())) {
                    result.loss().backward();
                }
                try (Tensor logits = copy.forward(hidden)) {
                    CompositeLoss.compute(settingsOf(loss), 1.0, logits, targets, mask, old, null, adv, false).loss().backward();
                }
                assertClose(copy.weight().grad(), head.weight().grad(), 1e-4, 1e-7, "lm_head weight gradient");
                assertClose(copy.bias().grad(), head.bias().grad(), 1e-4, 1e-7, "lm_head bias gradient");
                head.weight().grad().zero_();
                head.bias().grad().zero_();
                copy.weight().grad().zero_();
                copy.bias().grad().zero_();
            }
        }
    }

    @Test
    void secondBackwardFailsWithoutRetainGraphAndWorksWithIt() {
        final Batch batch = new Batch(81, 2, 4, 16, 0.4);
        final int before = FusedLogProbs.liveGraphs();
        try (Tensor logits = batch.logits(ScalarType.Float); Tensor targets = batch.targets(); Tensor adv = batch.sequenceAdvantages();
                Tensor old = batch.old()) {
            final LossInput input = LossInput.builder().logits(logits).targets(targets).oldLogProbs(old).advantages(adv).build();
            try (LossResult result = PolicyLoss.grpo().build().compute(input)) {
                final Tensor loss = result.loss();
                assertEquals(before + 1, FusedLogProbs.liveGraphs());
                loss.backward();
                assertEquals(before, FusedLogProbs.liveGraphs(), "a backward without retain_graph releases the hooks");
                final RuntimeException e = assertThrows(RuntimeException.class, loss::backward);
                assertTrue(e.getMessage().contains("backward through the graph a second time"), e.getMessage());
            }
            try (Tensor once = logits.grad().clone()) {
                logits.grad().zero_();
                try (LossResult result = PolicyLoss.grpo().build().compute(input)) {
                    final Tensor loss = result.loss();
                    loss.backward(new Tensor(), new BoolOptional(true), false, new TensorArrayRefOptional());
                    loss.backward();
                    try (Tensor twice = once.mul(new Scalar(2))) {
                        assertClose(twice, logits.grad(), 1e-6, 1e-9, "two backwards accumulate");
                    }
                }
                assertEquals(before, FusedLogProbs.liveGraphs());
            }
        }
    }

    @Test
    void manyMicroBatchLossesThenOneBackward() {
        // Gradient accumulation: 40 losses (40 live graphs and hooks) summed, one backward.
        final PolicyLoss grpo = PolicyLoss.grpo().build();
        final int before = FusedLogProbs.liveGraphs();
        final List<Batch> batches = new ArrayList<>();
        for (int k = 0; k < 40; k++) {
            batches.add(new Batch(200 + k, 2, 3, 11, 0.4));
        }
        try (Tensor shared = batches.get(0).logits(ScalarType.Float); Tensor separate = shared.detach().clone().set_requires_grad(true)) {
            Tensor total = null;
            final List<LossResult> results = new ArrayList<>();
            for (Batch batch : batches) {
                final LossResult r = grpo.compute(LossInput.builder().logits(shared).targets(batch.targets()).mask(batch.mask())
                        .oldLogProbs(batch.old()).advantages(batch.sequenceAdvantages()).build());
                results.add(r);
                total = total == null ? r.loss() : total.add(r.loss());
            }
            assertEquals(before + 40, FusedLogProbs.liveGraphs());
            total.backward();
            for (Batch batch : batches) {
                try (LossResult r = grpo.compute(LossInput.builder().logits(separate).targets(batch.targets()).mask(batch.mask())
                        .oldLogProbs(batch.old()).advantages(batch.sequenceAdvantages()).build())) {
                    r.backward();
                }
            }
            assertClose(separate.grad(), shared.grad(), 1e-5, 1e-8, "accumulated gradient");
            results.forEach(LossResult::close);
            total.close();
            assertEquals(before, FusedLogProbs.liveGraphs());
        }
    }

    @Test
    void concurrentCallsMatchSequentialOnes() throws Exception {
        // 8 threads, each on its own tensors, 5 rounds: bitwise the results of one thread.
        final PolicyLoss grpo = PolicyLoss.grpo().kl(0.05, KlEstimator.K3).entropyCoefficient(0.01).build();
        final int threads = 8;
        final float[][] sequential = new float[threads][];
        final java.util.function.IntFunction<float[]> run = k -> {
            final Batch batch = new Batch(300 + k, 3, 5, 300, 0.4);
            try (Tensor logits = batch.logits(ScalarType.BFloat16); Tensor targets = batch.targets(); Tensor mask = batch.mask();
                    Tensor old = batch.old(); Tensor ref = batch.ref(); Tensor adv = batch.sequenceAdvantages();
                    LossResult r = grpo.compute(LossInput.builder().logits(logits).targets(targets).mask(mask).oldLogProbs(old)
                            .refLogProbs(ref).advantages(adv).build())) {
                r.loss().backward();
                try (Tensor g = logits.grad().to(ScalarType.Float).contiguous()) {
                    final float[] out = new float[(int) g.numel() + 1];
                    g.data_ptr_float().get(out, 0, out.length - 1);
                    out[out.length - 1] = r.lossValue().item_float();
                    return out;
                }
            }
        };
        for (int k = 0; k < threads; k++) {
            sequential[k] = run.apply(k);
        }
        final java.util.concurrent.ExecutorService pool = java.util.concurrent.Executors.newFixedThreadPool(threads);
        try {
            for (int round = 0; round < 5; round++) {
                final List<java.util.concurrent.Future<float[]>> futures = new ArrayList<>();
                for (int k = 0; k < threads; k++) {
                    final int id = k;
                    futures.add(pool.submit(() -> run.apply(id)));
                }
                for (int k = 0; k < threads; k++) {
                    org.junit.jupiter.api.Assertions.assertArrayEquals(sequential[k], futures.get(k).get(), "thread " + k);
                }
            }
        } finally {
            pool.shutdown();
        }
    }

    @Test
    void tensorsOnAnotherDeviceAreRejected() {
        final Batch batch = new Batch(131, 2, 3, 10, 0.4);
        try (Tensor logits = batch.logits(ScalarType.Float); Tensor targets = batch.targets(); Tensor adv = batch.sequenceAdvantages();
                Tensor meta = logits.detach().to(new org.bytedeco.pytorch.Device("meta"), ScalarType.Float);
                Tensor metaMask = torch.ones(2, 3).to(new org.bytedeco.pytorch.Device("meta"), ScalarType.Float)) {
            expectBad(PolicyLoss.grpo().build(), LossInput.builder().logits(meta).targets(targets).advantages(adv), "logits are on meta");
            expectBad(PolicyLoss.grpo().build(), LossInput.builder().logits(logits).targets(targets).mask(metaMask).advantages(adv),
                    "mask is on meta but the logits are on cpu");
        }
    }

    @Test
    void droppedGraphReleasesItsHooks() {
        final Batch batch = new Batch(82, 2, 4, 16, 0.4);
        final int before = FusedLogProbs.liveGraphs();
        try (Tensor logits = batch.logits(ScalarType.Float); Tensor targets = batch.targets(); Tensor adv = batch.sequenceAdvantages()) {
            try (LossResult result = PolicyLoss.gspo().build().compute(LossInput.builder().logits(logits).targets(targets)
                    .advantages(adv).build())) {
                result.loss();
                assertEquals(before + 1, FusedLogProbs.liveGraphs());
            }
            assertEquals(before, FusedLogProbs.liveGraphs(), "closing the result drops the graph, and its hooks with it");
        }
    }

    @Test
    void noGradComputesTheValueOnly() {
        final Batch batch = new Batch(91, 3, 4, 25, 0.4);
        try (Tensor logits = batch.logits(ScalarType.Float); Tensor targets = batch.targets(); Tensor adv = batch.sequenceAdvantages();
                Tensor old = batch.old(); NoGradGuard guard = new NoGradGuard();
                LossResult result = PolicyLoss.grpo().build().compute(LossInput.builder().logits(logits).targets(targets)
                        .oldLogProbs(old).advantages(adv).build())) {
            assertFalse(result.differentiable());
            assertFalse(result.loss().requires_grad());
            assertThrows(IllegalStateException.class, result::backward);
            assertTrue(Float.isFinite(result.lossValue().item_float()));
        }
    }

    @Test
    void stridedViewIsReadInPlace() {
        // logits[:, :-1, :] of a [B, T+1, V] tensor, the everyday shift by one.
        final Batch batch = new Batch(101, 3, 5, 33, 0.4);
        try (Tensor full = torch.randn(3, 6, 33).set_requires_grad(true); Tensor view = full.narrow(1, 0, 5);
                Tensor copy = full.detach().narrow(1, 0, 5).contiguous().set_requires_grad(true);
                Tensor targets = batch.targets(); Tensor adv = batch.sequenceAdvantages(); Tensor old = batch.old()) {
            assertFalse(view.is_contiguous());
            final PolicyLoss grpo = PolicyLoss.grpo().build();
            try (LossResult a = grpo.compute(LossInput.builder().logits(view).targets(targets).oldLogProbs(old).advantages(adv).build());
                    LossResult b = grpo.compute(LossInput.builder().logits(copy).targets(targets).oldLogProbs(old).advantages(adv).build())) {
                a.loss().backward();
                b.loss().backward();
                assertEquals(b.lossValue().item_float(), a.lossValue().item_float());
                try (Tensor g = full.grad().narrow(1, 0, 5); Tensor last = full.grad().narrow(1, 5, 1)) {
                    assertClose(copy.grad(), g, 0, 0, "gradient of the view");
                    assertEquals(0.0, maxAbs(last));
                }
            }
        }
    }

    @Test
    void badInputIsRejectedWithTheArgumentNamed() {
        final Batch batch = new Batch(111, 2, 3, 10, 0.4);
        final PolicyLoss grpo = PolicyLoss.grpo().build();
        try (Tensor logits = batch.logits(ScalarType.Float); Tensor targets = batch.targets(); Tensor adv = batch.sequenceAdvantages();
                Tensor old = batch.old()) {
            expectBad(grpo, LossInput.builder().logits(logits.reshape(6, 10)).targets(targets).advantages(adv), "logits must be [B, T, V]");
            expectBad(grpo, LossInput.builder().logits(logits.to(ScalarType.Double)).targets(targets).advantages(adv), "float32, bfloat16 or float16");
            expectBad(grpo, LossInput.builder().logits(logits).targets(targets.reshape(3, 2)).advantages(adv), "targets must have shape [2, 3]");
            expectBad(grpo, LossInput.builder().logits(logits).targets(targets.to(ScalarType.Float)).advantages(adv), "targets must be an integer");
            expectBad(grpo, LossInput.builder().logits(logits).targets(targets.add(new Scalar(10))).advantages(adv), "[0, 10)");
            expectBad(grpo, LossInput.builder().logits(logits).targets(targets.sub(new Scalar(20))).advantages(adv), "[0, 10)");
            expectBad(grpo, LossInput.builder().logits(logits).targets(targets).advantages(Tensor.create(1f, 2f, 3f)), "advantages (per response) must have shape [2]");
            expectBad(grpo, LossInput.builder().logits(logits).targets(targets).advantages(adv).oldLogProbs(old.reshape(3, 2)), "oldLogProbs must have shape");
            expectBad(grpo, LossInput.builder().logits(logits).targets(targets).advantages(adv).mask(torch.full(new long[] {2, 3}, new Scalar(0.5))), "mask must hold only 0 and 1");
            expectBad(grpo, LossInput.builder().logits(logits.transpose(1, 2).contiguous().transpose(1, 2)).targets(targets).advantages(adv), "stride(-1) = 1");
            expectBad(PolicyLoss.grpo().kl(0.1, KlEstimator.K1).build(), LossInput.builder().logits(logits).targets(targets).advantages(adv), "refLogProbs are required");
            expectBad(PolicyLoss.gspo().build(), LossInput.builder().logits(logits).targets(targets).tokenAdvantages(old), "gspoToken");
            expectBad(grpo, LossInput.builder().logits(logits).targets(targets).advantages(adv).oldLogProbs(old.mul(new Scalar(Double.NaN))), "oldLogProbs[0, 0] = NaN");
            expectBad(grpo, LossInput.builder().logits(logits.detach().mul(new Scalar(Double.POSITIVE_INFINITY))).targets(targets).advantages(adv), "NaN or Inf");
            expectBad(grpo, LossInput.builder().logits(logits.reshape(6, 10)).targets(targets.reshape(6)).offsets(Tensor.create(0L, 4L, 3L)).advantages(adv), "offsets");
            assertThrows(IllegalArgumentException.class, () -> PolicyLoss.grpo().clip(1.5, 0.2));
            assertThrows(IllegalArgumentException.class, () -> PolicyLoss.ppo().dualClip(0.9));
            assertThrows(IllegalArgumentException.class, () -> PolicyLoss.grpo().temperature(0));
            assertThrows(IllegalArgumentException.class, () -> LossInput.builder().logits(logits).build());
        }
    }

    @Test
    void masksOfEveryDtypeAndLayoutGiveTheBoolMasksLossGradientAndCounts() {
        // The CPU reads float32, float64, int64, int32 and uint8 masks in one pass from Java, bool
        // ones as they are, and the rest (float16, int8, non-contiguous) through libtorch ops: all
        // must agree bit for bit with the bool mask, and refuse a value other than 0 and 1 alike.
        final Batch batch = new Batch(131, 3, 5, 11, 0.3);
        final PolicyLoss grpo = PolicyLoss.grpo().build();
        try (Tensor logits = batch.logits(ScalarType.Float); Tensor targets = batch.targets(); Tensor adv = batch.sequenceAdvantages();
                Tensor old = batch.old(); Tensor floatMask = batch.mask(); Tensor boolMask = floatMask.to(ScalarType.Bool)) {
            logits.set_requires_grad(true);
            final float want;
            final long[] wantCounts;
            final Tensor wantGrad;
            try (LossResult r = grpo.compute(LossInput.builder().logits(logits).targets(targets).mask(boolMask).oldLogProbs(old)
                    .advantages(adv).build())) {
                r.backward();
                want = r.lossValue().item_float();
                wantCounts = new long[] {r.metrics().sequences(), r.metrics().tokens()};
            }
            assertTrue(wantCounts[1] > 0 && wantCounts[1] < 15, "the mask holds both values: " + wantCounts[1] + " of 15 counted");
            try (Tensor g = logits.grad()) {
                wantGrad = g.clone();
            }
            try {
                for (ScalarType type : new ScalarType[] {ScalarType.Float, ScalarType.Double, ScalarType.Long, ScalarType.Int,
                        ScalarType.Byte, ScalarType.Half, ScalarType.Char}) {
                    for (boolean strided : new boolean[] {false, true}) {
                        final String label = type + (strided ? " (non-contiguous)" : "");
                        try (Tensor typed = floatMask.to(type); Tensor wide = strided ? torch.cat(new org.bytedeco.pytorch.TensorVector(
                                typed, typed), 1) : null; Tensor mask = strided ? wide.narrow(1, 0, 5) : new Tensor(typed);
                                Tensor g = logits.mutable_grad()) {
                            g.reset();
                            assertEquals(!strided, mask.is_contiguous(), label);
                            try (LossResult r = grpo.compute(LossInput.builder().logits(logits).targets(targets).mask(mask).oldLogProbs(old)
                                    .advantages(adv).build())) {
                                r.backward();
                                assertEquals(want, r.lossValue().item_float(), 0f, label + " loss");
                                assertEquals(wantCounts[0], r.metrics().sequences(), label + " sequences");
                                assertEquals(wantCounts[1], r.metrics().tokens(), label + " tokens");
                            }
                            try (Tensor got = logits.grad()) {
                                assertTrue(got.equal(wantGrad), label + " gradient");
                            }
                            // A 2 at [1, 3] is refused, and the caller's mask is left as it was.
                            try (Tensor bad = mask.clone(); Tensor at = bad.narrow(0, 1, 1).narrow(1, 3, 1); Scalar two = new Scalar(2)) {
                                at.fill_(two);
                                expectBad(grpo, LossInput.builder().logits(logits).targets(targets).mask(bad).advantages(adv),
                                        "mask must hold only 0 and 1");
                                try (Tensor after = bad.narrow(0, 1, 1).narrow(1, 3, 1)) {
                                    assertEquals(2.0, after.item_double(), 0.0, label + ": the caller's mask is not changed");
                                }
                            }
                        }
                    }
                }
            } finally {
                wantGrad.close();
            }
        }
    }

    static void expectBad(PolicyLoss loss, LossInput.Builder input, String messagePart) {
        final IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> loss.compute(input.build()).close());
        assertTrue(e.getMessage().contains(messagePart), "message \"" + e.getMessage() + "\" should contain \"" + messagePart + "\"");
    }

    @Test
    void compositeGradientMatchesFloat64FiniteDifferences() {
        // Checks the reference itself: autograd of the composite in float64 against central differences.
        final Batch batch = new Batch(121, 2, 3, 7, 0.4);
        final PolicyLoss loss = PolicyLoss.grpo().kl(0.1, KlEstimator.K3).entropyCoefficient(0.05).build();
        final LossSettings settings = settingsOf(loss);
        try (Tensor base = batch.logits(ScalarType.Float); Tensor z = base.to(ScalarType.Double).detach().set_requires_grad(true);
                Tensor targets = batch.targets(); Tensor mask = batch.mask(); Tensor old = batch.old(); Tensor ref = batch.ref();
                Tensor adv = batch.sequenceAdvantages()) {
            CompositeLoss.compute(settings, 0.9, z, targets, mask, old, ref, adv, false).loss().backward();
            final double h = 1e-6;
            final Tensor flat = z.detach().reshape(-1);
            for (int i = 0; i < flat.numel(); i += 5) {
                final double[] values = new double[2];
                for (int k = 0; k < 2; k++) {
                    try (Tensor perturbed = flat.clone()) {
                        perturbed.data_ptr_double().put(i, flat.data_ptr_double().get(i) + (k == 0 ? h : -h));
                        values[k] = CompositeLoss.compute(settings, 0.9, perturbed.reshape(2, 3, 7), targets, mask, old, ref, adv, false)
                                .loss().item_double();
                    }
                }
                final double numeric = (values[0] - values[1]) / (2 * h);
                final double analytic = z.grad().reshape(-1).data_ptr_double().get(i);
                assertEquals(analytic, numeric, 1e-6 + 1e-5 * Math.abs(analytic), "d/dz[" + i + "]");
            }
        }
        // ...and our module against that float64 composite, float32 logits.
        compare(caseOf("GRPO kl+entropy", PolicyLoss.grpo().kl(0.1, KlEstimator.K3).entropyCoefficient(0.05), 0.9, false, false),
                batch, ScalarType.Float, false);
    }
}
