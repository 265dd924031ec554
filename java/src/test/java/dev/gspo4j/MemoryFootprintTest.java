package dev.gspo4j;

import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Assumptions;
import org.junit.jupiter.api.Test;

/**
 * Peak extra memory of a loss forward + backward through an lm_head, measured as the peak resident
 * memory of a child JVM (bf16 logits [4, 256, 32000], 65.5 MB): gspo4j needs the logits' gradient
 * plus O(N), the composite several [N, V] intermediates, in float32 for bf16 logits.
 */
class MemoryFootprintTest {

    static Map<String, Long> probe(String mode) throws Exception {
        final Map<String, Long> values = ChildJvm.run(List.of("-Xms64m", "-Xmx64m", "-XX:+AlwaysPreTouch",
                "-Dorg.bytedeco.javacpp.maxBytes=0", "-Dorg.bytedeco.javacpp.maxPhysicalBytes=0"), MemoryProbe.class, mode);
        assertTrue(values.containsKey("extra"), "probe " + mode + " printed no result: " + values);
        return values;
    }

    @Test
    void peakExtraMemoryIsTheGradientPlusLinearInTokens() throws Exception {
        Assumptions.assumeTrue(Files.exists(Path.of("/proc/self/status")), "needs Linux /proc");
        final Map<String, Long> fused = probe("fused");
        final Map<String, Long> graph = probe("graph");
        final Map<String, Long> composite = probe("composite");
        final long logits = fused.get("logits");
        final long slack = 24L << 20; // O(N) buffers (a few MB here), allocator and JVM noise
        System.out.printf("peak extra memory, bf16 logits of %.1f MB: fused %.1f MB, graph %.1f MB, composite %.1f MB%n",
                logits / 1e6, fused.get("extra") / 1e6, graph.get("extra") / 1e6, composite.get("extra") / 1e6);
        // The gradient (the logits' size, in bf16) and O(N): no [N, V] float32 intermediate.
        assertTrue(fused.get("extra") < logits + slack, "fused path: " + fused.get("extra") + " bytes");
        assertTrue(graph.get("extra") < logits + slack, "graph path: " + graph.get("extra") + " bytes");
        assertTrue(composite.get("extra") > 3 * logits, "the composite should need several [N, V] tensors: " + composite.get("extra"));
    }
}
