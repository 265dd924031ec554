package dev.gspo4j;

import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Assumptions;
import org.junit.jupiter.api.Test;

/**
 * Peak extra memory of a loss forward + backward from hidden states, as the peak resident memory
 * of a child JVM ({@link LinearMemoryProbe}): the fused linear path stays within its chunk budget
 * plus the parameter gradients and O(N·H), far below one [N, V] tensor; the unfused path needs the
 * logits and their gradient.
 */
class LinearMemoryTest {

    static Map<String, Long> probe(String mode) throws Exception {
        final Map<String, Long> values = ChildJvm.run(List.of("-Xms64m", "-Xmx64m", "-XX:+AlwaysPreTouch",
                "-Dorg.bytedeco.javacpp.maxBytes=0", "-Dorg.bytedeco.javacpp.maxPhysicalBytes=0"), LinearMemoryProbe.class, mode);
        assertTrue(values.containsKey("extra"), "probe " + mode + " printed no result: " + values);
        return values;
    }

    @Test
    void noLogitsSizedTensorIsAllocated() throws Exception {
        Assumptions.assumeTrue(Files.exists(Path.of("/proc/self/status")), "needs Linux /proc");
        final Map<String, Long> graph = probe("linear-graph");
        final Map<String, Long> direct = probe("linear-direct");
        final Map<String, Long> unfused = probe("unfused");
        final long logits = graph.get("logits");
        final long slack = 24L << 20; // O(N) and O(N·H) buffers (under 1 MB here), GEMM workspaces, allocator and JVM noise
        final long bound = graph.get("budget") + graph.get("weightGrad") + slack;
        System.out.printf("peak extra memory, bf16 logits of %.1f MB (never made by the fused path): linear loss().backward() "
                + "%.1f MB, linear backward() %.1f MB, unfused %.1f MB; bound %.1f MB%n", logits / 1e6, graph.get("extra") / 1e6,
                direct.get("extra") / 1e6, unfused.get("extra") / 1e6, bound / 1e6);
        assertTrue(bound < logits / 3, "the sizes must make the bound tell a chunk from the logits");
        assertTrue(graph.get("extra") < bound, "graph path: " + graph.get("extra") + " bytes");
        assertTrue(direct.get("extra") < bound, "direct path: " + direct.get("extra") + " bytes");
        assertTrue(unfused.get("extra") > logits, "the unfused path holds at least the logits: " + unfused.get("extra"));
    }
}
