package dev.gspo4j;

import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Assumptions;
import org.junit.jupiter.api.Test;

/**
 * Peak extra memory of the graph's parts, measured as the peak resident memory of a child JVM
 * ({@link GraphMemoryProbe}): building {@code loss()} costs no pass over the logits and O(1)
 * memory, for a view and for expanded logits; the direct path needs no more than the graph path
 * (it runs through the same graph).
 */
class GraphMemoryTest {
    static final long NOISE = 8L << 20; // allocator and JVM noise

    static Map<String, Long> probe(String mode) throws Exception {
        final Map<String, Long> values = ChildJvm.run(List.of("-Xms64m", "-Xmx64m", "-XX:+AlwaysPreTouch",
                "-Dorg.bytedeco.javacpp.maxBytes=0", "-Dorg.bytedeco.javacpp.maxPhysicalBytes=0"), GraphMemoryProbe.class, mode);
        assertTrue(values.containsKey("extra"), "probe " + mode + " printed no result: " + values);
        return values;
    }

    @Test
    void attachingTheLogitsAllocatesNothingOfTheirSize() throws Exception {
        Assumptions.assumeTrue(Files.exists(Path.of("/proc/self/status")), "needs Linux /proc");
        for (String mode : new String[] {"attach-view", "attach-expanded"}) {
            final Map<String, Long> values = probe(mode);
            System.out.printf("%s: loss() over %.1f MB of bf16 logits: peak extra %.1f MB%n", mode, values.get("logits") / 1e6,
                    values.get("extra") / 1e6);
            assertTrue(values.get("extra") < NOISE, mode + ": " + values.get("extra") + " bytes");
        }
    }

    @Test
    void directPathPeaksNoHigherThanTheGraphPath() throws Exception {
        Assumptions.assumeTrue(Files.exists(Path.of("/proc/self/status")), "needs Linux /proc");
        for (String logits : new String[] {"leaf", "view"}) {
            final Map<String, Long> direct = probe(logits + "-direct");
            final Map<String, Long> graph = probe(logits + "-graph");
            final long size = direct.get("logits");
            System.out.printf("%s bf16 logits of %.1f MB, forward + backward: backward() %.1f MB, loss().backward() %.1f MB%n",
                    logits, size / 1e6, direct.get("extra") / 1e6, graph.get("extra") / 1e6);
            // Leaf: the gradient (stolen by AccumulateGrad, not copied) and O(N). View: plus the
            // slice's own [B, T + 1, V] gradient, which libtorch allocates while ours is alive.
            final long bound = (logits.equals("leaf") ? size : 2 * size) + 3 * NOISE;
            assertTrue(direct.get("extra") < bound, logits + " direct path: " + direct.get("extra") + " bytes");
            assertTrue(graph.get("extra") < bound, logits + " graph path: " + graph.get("extra") + " bytes");
            assertTrue(direct.get("extra") < graph.get("extra") + NOISE, logits + ": direct " + direct.get("extra") + ", graph "
                    + graph.get("extra"));
        }
    }
}
