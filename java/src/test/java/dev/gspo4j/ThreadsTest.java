package dev.gspo4j;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.List;
import java.util.Map;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.global.torch.ScalarType;
import org.junit.jupiter.api.Test;

/**
 * The CPU pool's size: its default (the JVM's available processors, or libtorch's thread count
 * when lower), the {@code gspo4j.threads} property, {@link Gspo4j#setThreads}, and results that do
 * not depend on it.
 */
class ThreadsTest {

    private static Map<String, Long> probe(Map<String, String> environment, String... jvmOptions) throws Exception {
        return ChildJvm.run(environment, List.of(jvmOptions), ThreadsProbe.class);
    }

    @Test
    void defaultIsTheSmallerOfAvailableProcessorsAndLibtorchsThreads() throws Exception {
        final Map<String, Long> plain = probe(Map.of());
        assertEquals(Math.min(plain.get("processors"), plain.get("torch")), plain.get("threads"));
        // A CPU quota as the JVM sees it (cgroups set the same count): one processor, one thread.
        final Map<String, Long> quota = probe(Map.of(), "-XX:ActiveProcessorCount=1");
        assertEquals(1L, quota.get("processors"));
        assertEquals(1L, quota.get("threads"));
        // libtorch limited by OMP_NUM_THREADS: gspo4j follows it down.
        final Map<String, Long> omp = probe(Map.of("OMP_NUM_THREADS", "1"));
        assertEquals(1L, omp.get("torch"));
        assertEquals(1L, omp.get("threads"));
        // More processors than libtorch's threads, as on a machine with SMT (libtorch counts physical cores).
        final Map<String, Long> more = probe(Map.of("OMP_NUM_THREADS", "1"), "-XX:ActiveProcessorCount=4");
        assertEquals(1L, more.get("threads"));
    }

    @Test
    void systemPropertyReplacesTheDefault() throws Exception {
        assertEquals(3L, probe(Map.of(), "-Dgspo4j.threads=3").get("threads"));
        assertEquals(5L, probe(Map.of("OMP_NUM_THREADS", "1"), "-Dgspo4j.threads=5", "-XX:ActiveProcessorCount=1").get("threads"));
        for (String bad : new String[] {"0", "-2", "1025", "two", ""}) {
            final Map<String, Long> out = probe(Map.of(), "-Dgspo4j.threads=" + bad);
            assertEquals(1L, out.get("loadFailed"), "gspo4j.threads=" + bad);
            assertEquals(1L, out.get("messageNamesProperty"), "gspo4j.threads=" + bad);
        }
    }

    @Test
    void setterValidatesAndApplies() {
        final int before = Gspo4j.threads();
        try {
            for (int bad : new int[] {0, -1, Gspo4j.MAX_THREADS + 1, Integer.MIN_VALUE}) {
                final IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> Gspo4j.setThreads(bad));
                assertTrue(e.getMessage().contains("threads must be in [1, 1024], got " + bad), e.getMessage());
                assertEquals(before, Gspo4j.threads(), "a rejected count changes nothing");
            }
            Gspo4j.setThreads(3);
            assertEquals(3, Gspo4j.threads());
            Gspo4j.setThreads(Gspo4j.MAX_THREADS);
            assertEquals(Gspo4j.MAX_THREADS, Gspo4j.threads());
        } finally {
            Gspo4j.setThreads(before);
        }
    }

    @Test
    void resultsAreBitwiseIdenticalForEveryThreadCount() {
        // Large enough that every count splits the rows differently (the kernels' grain is per row).
        final PolicyLossModuleTest.Batch b = new PolicyLossModuleTest.Batch(41, 7, 33, 2003, 0.4);
        final PolicyLoss gspo = PolicyLoss.gspo().entropyCoefficient(0.01).build();
        final int before = Gspo4j.threads();
        float[] first = null;
        try {
            for (int threads : new int[] {1, 2, 3, 4, 5, 8, 13, 64, 1}) {
                Gspo4j.setThreads(threads);
                try (Tensor logits = b.logits(ScalarType.Half); Tensor targets = b.targets(); Tensor mask = b.mask(); Tensor old = b.old();
                        Tensor adv = b.sequenceAdvantages();
                        LossResult r = gspo.compute(LossInput.builder().logits(logits).targets(targets).mask(mask).oldLogProbs(old)
                                .advantages(adv).build());
                        Tensor lp = TokenLogProbs.compute(logits, targets, 0.9);
                        Tensor rewards = b.sequenceAdvantages(); Tensor a = Advantages.group(rewards, 7, AdvantageMode.MEAN_STD)) {
                    r.backward();
                    final float[] g = ErgonomicsTest.floats(logits.grad());
                    final float[] l = ErgonomicsTest.floats(lp);
                    final float[] e = ErgonomicsTest.floats(r.entropy());
                    final float[] adv2 = ErgonomicsTest.floats(a);
                    final float[] out = new float[g.length + l.length + e.length + adv2.length + 2];
                    System.arraycopy(g, 0, out, 0, g.length);
                    System.arraycopy(l, 0, out, g.length, l.length);
                    System.arraycopy(e, 0, out, g.length + l.length, e.length);
                    System.arraycopy(adv2, 0, out, g.length + l.length + e.length, adv2.length);
                    out[out.length - 2] = r.lossValue().item_float();
                    out[out.length - 1] = r.metrics().clipFractionHigh();
                    if (first == null) {
                        first = out;
                    } else {
                        assertArrayEquals(first, out, threads + " threads");
                    }
                }
            }
        } finally {
            Gspo4j.setThreads(before);
        }
    }
}
