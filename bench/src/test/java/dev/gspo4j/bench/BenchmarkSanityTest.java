package dev.gspo4j.bench;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.global.torch.ScalarType;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;

/** Every benchmark method, run once on a small workload: the fused and composite paths agree. */
class BenchmarkSanityTest {

    static double maxDifference(Tensor a, Tensor b) {
        try (Tensor x = a.to(ScalarType.Double); Tensor y = b.to(ScalarType.Double); Tensor d = x.sub(y); Tensor abs = d.abs();
                Tensor max = abs.max()) {
            return max.item_double();
        }
    }

    static double maxAbs(Tensor a) {
        try (Tensor x = a.to(ScalarType.Double); Tensor abs = x.abs(); Tensor max = abs.max()) {
            return max.item_double();
        }
    }

    @ParameterizedTest
    @ValueSource(strings = {"float32", "bfloat16"})
    void fusedAndCompositeAgree(String dtype) {
        final Workload w = new Workload("64x1000", dtype);
        w.setUp();
        try {
            final double tolerance = dtype.equals("float32") ? 1e-4 : 5e-2;
            try (Tensor composite = TokenLogProbBenchmark.compositeForward(w)) {
                assertTrue(maxDifference(TokenLogProbBenchmark.fusedForward(w), composite) < tolerance, "log-probs");
            }
            final Tensor fusedGradient = TokenLogProbBenchmark.fusedForwardBackward(w).clone();
            try (Tensor composite = TokenLogProbBenchmark.compositeForwardBackward(w)) {
                assertTrue(maxDifference(fusedGradient, composite) <= 1e-2 * maxAbs(composite) + 1e-7, "log-prob gradient");
            }
            for (var loss : new dev.gspo4j.PolicyLoss[] {PolicyLossBenchmark.GSPO, PolicyLossBenchmark.GRPO}) {
                final float fused = PolicyLossBenchmark.fused(w, loss);
                final Tensor fusedLossGradient = w.logits.grad().clone();
                final float composite = PolicyLossBenchmark.composite(w, loss);
                assertEquals(composite, fused, 1e-3 * Math.abs(composite) + 1e-5, "loss");
                try (Tensor exact = w.logits.detach().to(ScalarType.Double).set_requires_grad(true)) {
                    final var out = dev.gspo4j.CompositeLoss.compute(dev.gspo4j.PolicyLossModuleTest.settingsOf(loss), 1.0, exact,
                            w.targets, w.mask, w.old, null, w.advantages, false);
                    out.loss().backward();
                    assertEquals(out.loss().item_double(), fused, 1e-4 * Math.abs(out.loss().item_double()) + 1e-6, "loss vs float64");
                    assertTrue(maxDifference(fusedLossGradient, exact.grad()) <= 1e-2 * maxAbs(exact.grad()) + 1e-8, "loss gradient");
                }
                assertTrue(maxAbs(fusedLossGradient) > 0, "a gradient flows");
            }
            // The JMH entry points themselves, once each.
            final TokenLogProbBenchmark tokens = new TokenLogProbBenchmark();
            assertEquals(64, tokens.fusedForward_(w));
            assertEquals(64, tokens.compositeForward_(w));
            assertEquals(64_000, tokens.fusedForwardBackward_(w));
            assertEquals(64_000, tokens.compositeForwardBackward_(w));
            final PolicyLossBenchmark losses = new PolicyLossBenchmark();
            assertEquals(losses.compositeGspo(w), losses.fusedGspo(w), 1e-3);
            assertEquals(losses.compositeGrpo(w), losses.fusedGrpo(w), 1e-3);
        } finally {
            w.tearDown();
        }
    }
}
