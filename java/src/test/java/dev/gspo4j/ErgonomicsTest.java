package dev.gspo4j;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.List;
import java.util.Map;
import org.bytedeco.pytorch.Scalar;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorOptions;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;
import org.junit.jupiter.api.Test;

/**
 * Issue 14's ergonomics: log-probs without a loss ({@link TokenLogProbs}), the normaliser per call,
 * {@link LossMetrics#asMap()}, and {@link NonFiniteDataException} for NaN/Inf data.
 */
class ErgonomicsTest {

    static float[] floats(Tensor t) {
        try (Tensor f = t.to(ScalarType.Float); Tensor c = f.contiguous()) {
            final float[] out = new float[(int) c.numel()];
            if (out.length > 0) {
                c.data_ptr_float().get(out);
            }
            return out;
        }
    }

    private static LossInput.Builder input(Tensor logits, Tensor targets, Tensor mask, Tensor old, Tensor adv) {
        return LossInput.builder().logits(logits).targets(targets).mask(mask).oldLogProbs(old).advantages(adv);
    }

    // ---- TokenLogProbs ----

    @Test
    void tokenLogProbsEqualTheLossesLogProbsBitForBitWithoutAGraph() {
        final PolicyLossModuleTest.Batch b = new PolicyLossModuleTest.Batch(3, 3, 7, 1001, 0.4);
        for (ScalarType type : new ScalarType[] {ScalarType.Float, ScalarType.BFloat16, ScalarType.Half}) {
            for (double tau : new double[] {1.0, 0.7}) {
                final PolicyLoss loss = PolicyLoss.grpo().temperature(tau).entropyCoefficient(0.01).build();
                try (Tensor logits = b.logits(type); Tensor targets = b.targets(); Tensor mask = b.mask(); Tensor old = b.old();
                        Tensor adv = b.sequenceAdvantages();
                        LossResult r = loss.compute(input(logits, targets, mask, old, adv).build());
                        Tensor lp = tau == 1.0 ? TokenLogProbs.compute(logits, targets) : TokenLogProbs.compute(logits, targets, tau);
                        TokenLogProbs both = TokenLogProbs.computeWithEntropy(logits, targets, tau)) {
                    final String what = type + " tau " + tau;
                    assertArrayEquals(floats(r.logProbs()), floats(lp), what);
                    assertArrayEquals(floats(r.logProbs()), floats(both.logProbs()), what);
                    assertArrayEquals(floats(r.entropy()), floats(both.entropy()), what);
                    assertArrayEquals(new long[] {3, 7}, lp.sizes().vec().get());
                    assertFalse(lp.requires_grad(), "detached: " + what);
                    assertFalse(both.entropy().requires_grad(), "detached: " + what);
                    assertEquals(ScalarType.Float, lp.scalar_type().intern());
                }
            }
        }
    }

    @Test
    void tokenLogProbsMatchFloat64LogSoftmaxPaddedAndPacked() {
        torch.manual_seed(4);
        try (Tensor base = torch.randn(2, 5, 333); Tensor logits = base.mul(new Scalar(3.0));
                Tensor targets = torch.randint(333, new long[] {2, 5}, new TensorOptions(ScalarType.Long));
                Tensor z = logits.to(ScalarType.Double); Tensor scaled = z.div(new Scalar(0.7)); Tensor ls = scaled.log_softmax(-1);
                Tensor idx = targets.unsqueeze(-1); Tensor g = ls.gather(-1, idx); Tensor expected = g.squeeze(-1);
                Tensor padded = TokenLogProbs.compute(logits, targets, 0.7);
                Tensor flatLogits = logits.reshape(10, 333); Tensor flatTargets = targets.reshape(10);
                Tensor packed = TokenLogProbs.compute(flatLogits, flatTargets, 0.7)) {
            final float[] want = floats(expected);
            final float[] got = floats(padded);
            for (int i = 0; i < want.length; i++) {
                assertEquals(want[i], got[i], 1e-5 * (1 + Math.abs(want[i])), "token " + i);
            }
            assertArrayEquals(got, floats(packed), "packed [N, V] equals padded");
        }
    }

    @Test
    void tokenLogProbsOfEmptyInputsAndTargetsWithMinusInfLogits() {
        try (Tensor logits = torch.zeros(0, 7); Tensor targets = torch.zeros(new long[] {0}, new TensorOptions(ScalarType.Long));
                Tensor lp = TokenLogProbs.compute(logits, targets)) {
            assertEquals(0, lp.numel());
        }
        // A banned entry as target: probability 0, log-prob -Inf (a value here; the loss refuses it where counted).
        try (Tensor logits = Tensor.create(new float[] {0f, Float.NEGATIVE_INFINITY, 1f}).reshape(1, 3);
                Tensor targets = Tensor.create(new long[] {1L}); Tensor lp = TokenLogProbs.compute(logits, targets)) {
            assertEquals(Float.NEGATIVE_INFINITY, lp.item_float());
        }
    }

    @Test
    void tokenLogProbsRejectBadInputLikeTheLoss() {
        try (Tensor logits = torch.randn(2, 3, 5); Tensor targets = torch.randint(5, new long[] {2, 3}, new TensorOptions(ScalarType.Long));
                Tensor wrongShape = torch.randint(5, new long[] {2, 4}, new TensorOptions(ScalarType.Long));
                Tensor floatTargets = torch.zeros(2, 3); Tensor doubles = logits.to(ScalarType.Double);
                Tensor transposed = logits.transpose(1, 2); Tensor flat = torch.randn(5)) {
            assertMessage(IllegalArgumentException.class, "targets must have shape [2, 3]", () -> TokenLogProbs.compute(logits, wrongShape));
            assertMessage(IllegalArgumentException.class, "targets must be an integer tensor", () -> TokenLogProbs.compute(logits, floatTargets));
            assertMessage(IllegalArgumentException.class, "logits must be float32, bfloat16 or float16", () -> TokenLogProbs.compute(doubles, targets));
            assertMessage(IllegalArgumentException.class, "stride(-1) = 1", () -> TokenLogProbs.compute(transposed, wrongShape));
            assertMessage(IllegalArgumentException.class, "logits must be [B, T, V] or [N, V]", () -> TokenLogProbs.compute(flat, targets));
            assertMessage(IllegalArgumentException.class, "temperature must be in [1e-4, 1e4]", () -> TokenLogProbs.compute(logits, targets, 0));
            assertMessage(IllegalArgumentException.class, "temperature", () -> TokenLogProbs.compute(logits, targets, Double.NaN));
            assertMessage(IllegalArgumentException.class, "logits", () -> TokenLogProbs.compute(null, targets));
            assertMessage(IllegalArgumentException.class, "targets", () -> TokenLogProbs.compute(logits, null));
        }
        try (Tensor logits = torch.randn(2, 3, 5); Tensor targets = Tensor.create(new long[] {0, 1, 2, 3, 9, 4}).reshape(2, 3)) {
            final IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> TokenLogProbs.compute(logits, targets));
            assertFalse(e instanceof NonFiniteDataException);
            assertTrue(e.getMessage().contains("targets[1, 1] = 9"), e.getMessage());
        }
        try (Tensor base = torch.randn(2, 3, 5); Tensor targets = torch.zeros(new long[] {2, 3}, new TensorOptions(ScalarType.Long))) {
            base.data_ptr_float().put(2 * 5 + 3, Float.NaN); // row [0, 2]
            final NonFiniteDataException e = assertThrows(NonFiniteDataException.class, () -> TokenLogProbs.compute(base, targets));
            assertTrue(e.getMessage().contains("logits[0, 2, :] holds NaN or Inf"), e.getMessage());
        }
    }

    static void assertMessage(Class<? extends Throwable> type, String part, org.junit.jupiter.api.function.Executable call) {
        final Throwable e = assertThrows(type, call);
        assertTrue(e.getMessage() != null && e.getMessage().contains(part), "expected '" + part + "' in: " + e.getMessage());
    }

    // ---- the normaliser per call ----

    private static float[] lossAndGradient(PolicyLoss loss, PolicyLossModuleTest.Batch b, Double perCall) {
        try (Tensor logits = b.logits(ScalarType.Float); Tensor targets = b.targets(); Tensor mask = b.mask(); Tensor old = b.old();
                Tensor adv = b.sequenceAdvantages()) {
            final LossInput.Builder in = input(logits, targets, mask, old, adv);
            if (perCall != null) {
                in.normalizer(perCall);
            }
            try (LossResult r = loss.compute(in.build())) {
                r.backward();
                final float[] g = floats(logits.grad());
                final float[] out = java.util.Arrays.copyOf(g, g.length + 1);
                out[g.length] = r.lossValue().item_float();
                return out;
            }
        }
    }

    @Test
    void normalizerPerCallOverridesTheLosses() {
        final PolicyLossModuleTest.Batch b = new PolicyLossModuleTest.Batch(8, 4, 6, 101, 0.4);
        for (Aggregation aggregation : Aggregation.values()) {
            final PolicyLoss local = PolicyLoss.grpo().aggregation(aggregation).build();
            final PolicyLoss seven = PolicyLoss.grpo().aggregation(aggregation).normalizer(7).build();
            final PolicyLoss hundred = PolicyLoss.grpo().aggregation(aggregation).normalizer(100).build();
            final String what = aggregation.toString();
            assertArrayEquals(lossAndGradient(seven, b, null), lossAndGradient(local, b, 7.0), what + ": per call = per loss");
            assertArrayEquals(lossAndGradient(seven, b, null), lossAndGradient(hundred, b, 7.0), what + ": per call overrides");
            assertArrayEquals(lossAndGradient(local, b, null), lossAndGradient(hundred, b, 0.0), what + ": 0 is the local count");
            assertArrayEquals(lossAndGradient(hundred, b, null), lossAndGradient(hundred, b, null), what + ": unset keeps the loss's");
            assertFalse(java.util.Arrays.equals(lossAndGradient(local, b, null), lossAndGradient(local, b, 7.0)), what + ": it acts");
        }
    }

    @Test
    void normalizerPerCallHasTheLossesRange() {
        for (double bad : new double[] {-1, 1e-7, 1e19, Double.NaN, Double.POSITIVE_INFINITY, -0.5}) {
            assertMessage(IllegalArgumentException.class, "normalizer must be 0 (0: the local count) or in [1.0E-6, 1.0E18]",
                    () -> LossInput.builder().normalizer(bad));
        }
        for (double good : new double[] {0, 1e-6, 1, 12345.5, 1e18}) {
            LossInput.builder().normalizer(good);
        }
    }

    // ---- LossMetrics.asMap ----

    @Test
    void asMapHasTrlAndVerlNamesWithTheGettersValues() {
        final PolicyLossModuleTest.Batch b = new PolicyLossModuleTest.Batch(9, 5, 8, 64, 2.0);
        final PolicyLoss loss = PolicyLoss.ppo().dualClip(3).kl(0.05, KlEstimator.K3).entropyCoefficient(0.01).build();
        try (Tensor logits = b.logits(ScalarType.Float); Tensor targets = b.targets(); Tensor mask = b.mask(); Tensor old = b.old();
                Tensor ref = b.ref(); Tensor adv = b.tokenAdvantages();
                LossResult r = loss.compute(LossInput.builder().logits(logits).targets(targets).mask(mask).oldLogProbs(old).refLogProbs(ref)
                        .tokenAdvantages(adv).build())) {
            final LossMetrics m = r.metrics();
            final Map<String, Double> map = m.asMap();
            assertEquals(List.of("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy", "kl", "actor/pg_loss",
                    "actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl", "actor/entropy", "actor/kl_loss", "gspo4j/ratio_mean",
                    "gspo4j/ratio_min", "gspo4j/ratio_max", "gspo4j/sequences", "gspo4j/tokens", "rollout_corr/rollout_is_mean",
                    "rollout_corr/rollout_rs_masked_fraction", "rollout_corr/rollout_rs_seq_masked_fraction", "rollout_corr/kl",
                    "rollout_corr/k3_kl", "gspo4j/entropy_kept_fraction"), List.copyOf(map.keySet()));
            assertEquals(m.rolloutWeightMean(), map.get("rollout_corr/rollout_is_mean"), 0);
            assertEquals(m.rolloutMaskedFraction(), map.get("rollout_corr/rollout_rs_masked_fraction"), 0);
            assertEquals(m.rolloutSeqMaskedFraction(), map.get("rollout_corr/rollout_rs_seq_masked_fraction"), 0);
            assertEquals(m.rolloutKl(), map.get("rollout_corr/kl"), 0);
            assertEquals(m.rolloutK3Kl(), map.get("rollout_corr/k3_kl"), 0);
            assertEquals(m.entropyKeptFraction(), map.get("gspo4j/entropy_kept_fraction"), 0);
            assertEquals(m.clipFractionLow(), map.get("clip_ratio/low_mean"), 0);
            assertEquals(m.clipFractionHigh(), map.get("clip_ratio/high_mean"), 0);
            assertEquals((double) m.clipFractionLow() + m.clipFractionHigh(), map.get("clip_ratio/region_mean"), 0);
            assertEquals(map.get("clip_ratio/region_mean"), map.get("actor/pg_clipfrac"), 0);
            assertEquals(m.entropyMean(), map.get("entropy"), 0);
            assertEquals(m.kl(), map.get("kl"), 0);
            assertEquals(m.kl(), map.get("actor/kl_loss"), 0);
            assertEquals(m.policyLoss(), map.get("actor/pg_loss"), 0);
            assertEquals(m.dualClipFraction(), map.get("actor/pg_clipfrac_lower"), 0);
            assertEquals(m.approxKl(), map.get("actor/ppo_kl"), 0);
            assertEquals(m.entropy(), map.get("actor/entropy"), 0);
            assertEquals(m.ratioMean(), map.get("gspo4j/ratio_mean"), 0);
            assertEquals(m.ratioMin(), map.get("gspo4j/ratio_min"), 0);
            assertEquals(m.ratioMax(), map.get("gspo4j/ratio_max"), 0);
            assertEquals(m.sequences(), map.get("gspo4j/sequences"), 0);
            assertEquals(m.tokens(), map.get("gspo4j/tokens"), 0);
            assertTrue(map.get("clip_ratio/region_mean") > 0, "the spread clips something");
            assertTrue(map.get("kl") != 0, "KL is on");
            assertThrows(UnsupportedOperationException.class, () -> map.put("x", 1.0));
            // Counted from the mask: exact, as the getters.
            try (Tensor sum = mask.sum()) {
                assertEquals(sum.item_float(), map.get("gspo4j/tokens"), 0);
            }
        }
    }

    @Test
    void asMapOfAFreshResultReadsCountsAndValuesTogether() {
        // asMap first (no getter before it): values and the device-held counts come from one copy.
        final PolicyLossModuleTest.Batch b = new PolicyLossModuleTest.Batch(10, 4, 5, 30, 0.4);
        try (Tensor logits = b.logits(ScalarType.BFloat16); Tensor targets = b.targets(); Tensor mask = b.mask(); Tensor old = b.old();
                Tensor adv = b.sequenceAdvantages();
                LossResult r = PolicyLoss.gspo().build().compute(input(logits, targets, mask, old, adv).build());
                LossResult again = PolicyLoss.gspo().build().compute(input(logits, targets, mask, old, adv).build())) {
            final Map<String, Double> first = r.metrics().asMap();
            assertEquals(again.metrics().sequences(), first.get("gspo4j/sequences"), 0);
            assertEquals(again.metrics().tokens(), first.get("gspo4j/tokens"), 0);
            assertEquals(again.metrics().ratioMean(), first.get("gspo4j/ratio_mean"), 0);
            assertEquals(first, r.metrics().asMap());
        }
        try (Tensor logits = b.logits(ScalarType.Float); Tensor targets = b.targets(); Tensor old = b.old(); Tensor adv = b.sequenceAdvantages();
                LossResult r = PolicyLoss.gspo().build().compute(LossInput.builder().logits(logits).targets(targets).oldLogProbs(old)
                        .advantages(adv).build())) {
            assertEquals(4.0, r.metrics().asMap().get("gspo4j/sequences"), 0, "no mask: counts known on the host");
            assertEquals(20.0, r.metrics().asMap().get("gspo4j/tokens"), 0);
        }
    }

    // ---- NonFiniteDataException ----

    @Test
    void nonFiniteDataHasItsOwnTypeArgumentErrorsDoNot() {
        final PolicyLossModuleTest.Batch b = new PolicyLossModuleTest.Batch(11, 3, 4, 20, 0.4);
        final PolicyLoss loss = PolicyLoss.grpo().build();
        try (Tensor logits = b.logits(ScalarType.Float); Tensor targets = b.targets(); Tensor old = b.old(); Tensor adv = b.sequenceAdvantages()) {
            try (Tensor nanLogits = logits.detach().clone()) {
                nanLogits.data_ptr_float().put(5 * 20 + 2, Float.NaN); // row [1, 1]
                final NonFiniteDataException e = assertThrows(NonFiniteDataException.class,
                        () -> loss.compute(LossInput.builder().logits(nanLogits).targets(targets).oldLogProbs(old).advantages(adv).build()));
                assertInstanceOf(IllegalArgumentException.class, e, "compatible with code catching IllegalArgumentException");
                assertTrue(e.getMessage().contains("logits[1, 1, :] holds NaN or Inf"), e.getMessage());
                final Gspo4jException cause = assertInstanceOf(Gspo4jException.class, e.getCause());
                assertEquals(Gspo4jException.Status.NON_FINITE, cause.status());
            }
            try (Tensor nanOld = old.clone()) {
                nanOld.data_ptr_float().put(6, Float.POSITIVE_INFINITY); // [1, 2]
                final NonFiniteDataException e = assertThrows(NonFiniteDataException.class,
                        () -> loss.compute(LossInput.builder().logits(logits).targets(targets).oldLogProbs(nanOld).advantages(adv).build()));
                assertTrue(e.getMessage().contains("oldLogProbs[1, 2] = Infinity is not finite"), e.getMessage());
            }
            try (Tensor nanAdv = adv.clone()) {
                nanAdv.data_ptr_float().put(2, Float.NaN);
                assertThrows(NonFiniteDataException.class,
                        () -> loss.compute(LossInput.builder().logits(logits).targets(targets).oldLogProbs(old).advantages(nanAdv).build()));
            }
            // Token ids, shapes and options are argument errors, not divergence.
            try (Tensor badIds = targets.clone()) {
                badIds.data_ptr_long().put(3, 99);
                final IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                        () -> loss.compute(LossInput.builder().logits(logits).targets(badIds).oldLogProbs(old).advantages(adv).build()));
                assertFalse(e instanceof NonFiniteDataException, e.getMessage());
            }
            try (Tensor shortAdv = torch.zeros(2)) {
                final IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                        () -> loss.compute(LossInput.builder().logits(logits).targets(targets).advantages(shortAdv).build()));
                assertFalse(e instanceof NonFiniteDataException, e.getMessage());
            }
        }
        // Advantages: a NaN reward is divergence too.
        try (Tensor rewards = Tensor.create(1f, Float.NaN, 0f, 1f)) {
            assertThrows(NonFiniteDataException.class, () -> Advantages.group(rewards, 2, AdvantageMode.MEAN_STD));
        }
        assertThrows(NonFiniteDataException.class, () -> Advantages.group(new float[] {1f, Float.NaN}, 2, AdvantageMode.MEAN));
    }
}
