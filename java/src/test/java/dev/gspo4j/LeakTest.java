package dev.gspo4j;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Assumptions;
import org.junit.jupiter.api.Test;

/**
 * 10,000 loss forward + backward iterations (both backward paths, four modules) in a child JVM with
 * JavaCPP's default memory limits: resident memory after the warm-up stays flat, no physical-memory
 * error, no graph left registered. Iterations: {@code -Dgspo4j.leak.iterations} (default 10000).
 */
class LeakTest {
    static final int ITERATIONS = Integer.getInteger("gspo4j.leak.iterations", 10_000);
    static final long BOUND = 50L << 20;

    @Test
    void residentMemoryStaysFlat() throws Exception {
        Assumptions.assumeTrue(Files.exists(Path.of("/proc/self/status")), "needs Linux /proc");
        // A fixed, pre-touched heap: its growth would otherwise read as a leak.
        final Map<String, Long> values = ChildJvm.run(List.of("-Xms256m", "-Xmx256m", "-XX:+AlwaysPreTouch"), LeakProbe.class,
                Integer.toString(ITERATIONS));
        assertTrue(values.containsKey("end"), "leak probe printed no result: " + values);
        final long growth = values.get("end") - values.get("warmup");
        System.out.printf("leak: %d iterations, resident memory %.1f MB after warm-up, %.1f MB at the end (%+.1f MB)%n", ITERATIONS,
                values.get("warmup") / 1e6, values.get("end") / 1e6, growth / 1e6);
        assertTrue(growth < BOUND, "resident memory grew by " + growth + " bytes");
        assertEquals(0L, values.get("liveGraphs"), "graphs left registered");
    }
}
