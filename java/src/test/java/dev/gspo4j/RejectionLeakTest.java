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
 * Rejected calls and advantages release what they made before they return or throw: a child JVM
 * with a fixed, pre-touched heap loops over the rejection paths of {@link RejectionLeakProbe}
 * ({@code -Dgspo4j.leak.rejections=N} iterations of 13 rejected calls and 3 advantages, default
 * 300) and its resident memory after the warm-up stays flat. Before the fix each rejected loss call
 * held about 1.5 MB of converted copies until a GC, and each GAE its intermediates.
 */
class RejectionLeakTest {
    static final int ITERATIONS = Integer.getInteger("gspo4j.leak.rejections", 300);
    static final long BOUND = 50L << 20;

    @Test
    void rejectedCallsHoldNoMemory() throws Exception {
        Assumptions.assumeTrue(Files.exists(Path.of("/proc/self/status")), "needs Linux /proc");
        final Map<String, Long> values = ChildJvm.run(List.of("-Xms256m", "-Xmx256m", "-XX:+AlwaysPreTouch"), RejectionLeakProbe.class,
                Integer.toString(ITERATIONS));
        assertTrue(values.containsKey("end"), "probe printed no result: " + values);
        final long growth = values.get("end") - values.get("warmup");
        System.out.printf("rejection leak: %d iterations, resident memory %.1f MB after warm-up, %.1f MB at the end (%+.1f MB)%n",
                ITERATIONS, values.get("warmup") / 1e6, values.get("end") / 1e6, growth / 1e6);
        assertEquals(13L * ITERATIONS, values.get("rejections"));
        assertTrue(growth < BOUND, "resident memory grew by " + growth + " bytes");
    }
}
