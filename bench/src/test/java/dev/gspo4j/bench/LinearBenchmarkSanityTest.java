package dev.gspo4j.bench;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import org.bytedeco.pytorch.Tensor;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;

/** Every method of {@link LinearLossBenchmark}, once on a small head: the three paths agree. */
class LinearBenchmarkSanityTest {

    @ParameterizedTest
    @ValueSource(strings = {"float32", "bfloat16"})
    void pathsAgree(String dtype) {
        final LinearLossBenchmark.Head w = new LinearLossBenchmark.Head("64x24x1000", dtype);
        w.setUp();
        try {
            final boolean bf16 = dtype.equals("bfloat16");
            final float unfused = LinearLossBenchmark.unfused(w);
            final Tensor[] want = {w.hidden.grad().clone(), w.weight.grad().clone()};
            final float fused = LinearLossBenchmark.fusedLinear(w);
            assertEquals(unfused, fused, (bf16 ? 2e-2 : 1e-4) * Math.abs(unfused) + 1e-6, "loss, fused linear vs unfused");
            final Tensor[] got = {w.hidden.grad(), w.weight.grad()};
            for (int i = 0; i < 2; i++) {
                final double scale = BenchmarkSanityTest.maxAbs(want[i]);
                assertTrue(scale > 0, "a gradient flows");
                assertTrue(BenchmarkSanityTest.maxDifference(want[i], got[i]) <= (bf16 ? 5e-2 : 1e-4) * scale, "gradient " + i);
            }
            final float composite = LinearLossBenchmark.composite(w);
            assertEquals(composite, fused, (bf16 ? 2e-2 : 1e-3) * Math.abs(composite) + 1e-5, "loss vs composite");
            assertEquals(64L * 1000, LinearLossBenchmark.gemmFloor(w));
            final LinearLossBenchmark jmh = new LinearLossBenchmark();
            assertEquals(jmh.unfused_(w), jmh.fusedLinear_(w), (bf16 ? 2e-2 : 1e-4) * Math.abs(unfused) + 1e-6);
            jmh.composite_(w);
            jmh.gemmFloor_(w);
        } finally {
            w.tearDown();
        }
    }
}
