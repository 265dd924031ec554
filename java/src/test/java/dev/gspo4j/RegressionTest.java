package dev.gspo4j;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import dev.gspo4j.internal.Kernels;
import org.bytedeco.pytorch.Scalar;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorOptions;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;
import org.junit.jupiter.api.Test;

/**
 * The bug classes other RL-loss libraries shipped, each pinned at the public API. (The N * V > 2^31
 * case runs at the kernel level, {@code TokenLogProbLargeTest}: a module-level one would need 8.6 GB
 * of logits and gradient.)
 */
class RegressionTest {

    static PolicyLossModuleTest.Batch batch(long seed) {
        return new PolicyLossModuleTest.Batch(seed, 4, 5, 50, 0.4);
    }

    @Test
    void gspoRatioOverflowDoesNotBecomeNaNThroughMin() {
        // log s = +-100: exp overflows float32 unless clamped first; inf * A then min() gives NaN.
        final PolicyLossModuleTest.Batch b = batch(1);
        for (int i = 0; i < b.oldValues.length; i++) {
            b.oldValues[i] -= (i / b.t) % 2 == 0 ? 100 : -100;
        }
        for (PolicyLoss.Builder builder : new PolicyLoss.Builder[] {PolicyLoss.gspo(), PolicyLoss.grpo()}) {
            final PolicyLoss loss = builder.build();
            try (Tensor logits = b.logits(ScalarType.Float); Tensor targets = b.targets(); Tensor old = b.old(); Tensor adv = b.sequenceAdvantages();
                    LossResult r = loss.compute(LossInput.builder().logits(logits).targets(targets).oldLogProbs(old).advantages(adv).build())) {
                r.loss().backward();
                assertTrue(Float.isFinite(r.lossValue().item_float()));
                try (Tensor finite = logits.grad().isfinite(); Tensor all = finite.all()) {
                    assertTrue(all.item_bool(), "finite gradient");
                }
            }
            PolicyLossModuleTest.compare(PolicyLossModuleTest.caseOf("overflow", builder, 1.0, false, false), b, ScalarType.Float, false);
        }
    }

    @Test
    void equalRewardsGiveZeroAdvantagesNotResidueOverEps() {
        final float[] rewards = {0.1f, 0.1f, 0.1f, 0.1f, 0.1f, 0.1f, 0.1f, 0.3f, 0.3f, 0.3f};
        try (Tensor r = Tensor.create(java.util.Arrays.copyOf(rewards, 7))) {
            for (AdvantageMode mode : AdvantageMode.values()) {
                try (Tensor a = Advantages.group(r, 7, mode); Tensor abs = a.abs(); Tensor max = abs.max()) {
                    assertEquals(0.0f, max.item_float(), mode.toString());
                }
            }
        }
        assertArrayEquals(new float[] {0, 0, 0, 0, 0}, Advantages.group(new float[] {0.3f, 0.3f, 0.3f, 0.3f, 0.3f}, 5, AdvantageMode.MEAN_STD));
    }

    @Test
    void allMaskedBatchIsZeroNotZeroOverZero() {
        final PolicyLossModuleTest.Batch b = batch(2);
        java.util.Arrays.fill(b.maskValues, 0);
        for (Aggregation aggregation : Aggregation.values()) {
            try (Tensor logits = b.logits(ScalarType.Float); Tensor targets = b.targets(); Tensor mask = b.mask(); Tensor adv = b.sequenceAdvantages();
                    LossResult r = PolicyLoss.grpo().aggregation(aggregation).build().compute(LossInput.builder().logits(logits)
                            .targets(targets).mask(mask).advantages(adv).build())) {
                r.loss().backward();
                assertEquals(0.0f, r.lossValue().item_float());
                assertEquals(0.0, PolicyLossModuleTest.maxAbs(logits.grad()));
                assertEquals(0.0f, r.metrics().ratioMean());
            }
        }
    }

    @Test
    void bf16TargetGradientKeepsItsPrecisionAsPTendsToOne() {
        // p_y = 1 - 9.4e-11: 1 - p from a rounded p is 0; the gradient must be g * 9.4e-11.
        final int v = 1000;
        final float[] z = new float[v];
        z[17] = 30;
        try (Tensor base = Tensor.create(z).reshape(1, 1, v); Tensor logits = base.to(ScalarType.BFloat16).set_requires_grad(true);
                Tensor targets = Tensor.create(17L).reshape(1, 1); Tensor adv = Tensor.create(1f);
                LossResult r = PolicyLoss.grpo().build().compute(LossInput.builder().logits(logits).targets(targets).advantages(adv).build())) {
            r.backward();
            final double oneMinusP = 999 * Math.exp(-30) / (1 + 999 * Math.exp(-30));
            // GRPO on-policy, one token, A = 1: dLoss/dlp = -1, so dLoss/dz_y = -(1 - p_y).
            final double got = logits.grad().reshape(-1).to(ScalarType.Float).data_ptr_float().get(17);
            assertEquals(-oneMinusP, got, 8e-3 * oneMinusP);
        }
    }

    @Test
    void allNegativeLogitRowsAreExact() {
        // A running max initialised to 0 instead of -inf breaks every row below 0.
        final PolicyLossModuleTest.Batch b = batch(3);
        for (int i = 0; i < b.logitValues.length; i++) {
            b.logitValues[i] -= 1000;
        }
        for (ScalarType type : new ScalarType[] {ScalarType.Float, ScalarType.BFloat16}) {
            PolicyLossModuleTest.compare(PolicyLossModuleTest.caseOf("all negative", PolicyLoss.grpo(), 1.0, false, false), b, type, false);
        }
    }

    @Test
    void temperatureDividesTheLogitsNotTheLogProbs() {
        final PolicyLossModuleTest.Batch b = batch(4);
        try (Tensor logits = b.logits(ScalarType.Float); Tensor targets = b.targets(); Tensor adv = b.sequenceAdvantages();
                LossResult r = PolicyLoss.grpo().temperature(0.5).build().compute(LossInput.builder().logits(logits).targets(targets)
                        .advantages(adv).build());
                Tensor scaled = logits.detach().div(new Scalar(0.5)); Tensor lsm = scaled.log_softmax(-1);
                Tensor want = lsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1);
                Tensor plain = logits.detach().log_softmax(-1); Tensor wrong = plain.gather(-1, targets.unsqueeze(-1)).squeeze(-1).div(new Scalar(0.5))) {
            PolicyLossModuleTest.assertClose(want, r.logProbs(), 1e-5, 1e-6, "log_softmax(z / tau)");
            try (Tensor diff = wrong.sub(r.logProbs()); Tensor abs = diff.abs(); Tensor max = abs.max()) {
                assertTrue(max.item_float() > 0.1, "log_softmax(z) / tau is a different thing");
            }
        }
    }

    @Test
    void bitwiseIdenticalAcrossRunsAndThreadCounts() {
        final PolicyLossModuleTest.Batch b = new PolicyLossModuleTest.Batch(5, 6, 40, 3001, 0.4);
        final PolicyLoss loss = PolicyLoss.grpo().kl(0.05, KlEstimator.K3).entropyCoefficient(0.01).build();
        final int threads = Kernels.numThreads();
        float[] first = null;
        try {
            for (int run = 0; run < 6; run++) {
                Kernels.setNumThreads(run % 3 == 0 ? 1 : run % 3 == 1 ? 2 : 7);
                try (Tensor logits = b.logits(ScalarType.BFloat16); Tensor targets = b.targets(); Tensor mask = b.mask(); Tensor old = b.old();
                        Tensor ref = b.ref(); Tensor adv = b.sequenceAdvantages();
                        LossResult r = loss.compute(LossInput.builder().logits(logits).targets(targets).mask(mask).oldLogProbs(old)
                                .refLogProbs(ref).advantages(adv).build())) {
                    r.loss().backward();
                    try (Tensor g = logits.grad().to(ScalarType.Float).contiguous(); Tensor lp = r.logProbs().contiguous()) {
                        final float[] out = new float[(int) (g.numel() + lp.numel() + 1)];
                        g.data_ptr_float().get(out, 0, (int) g.numel());
                        lp.data_ptr_float().get(out, (int) g.numel(), (int) lp.numel());
                        out[out.length - 1] = r.lossValue().item_float();
                        if (first == null) {
                            first = out;
                        } else {
                            assertArrayEquals(first, out, "run " + run);
                        }
                    }
                }
            }
        } finally {
            Kernels.setNumThreads(threads);
        }
    }
}
