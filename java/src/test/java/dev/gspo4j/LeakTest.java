package dev.gspo4j;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.HashMap;
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
        final String java = Path.of(System.getProperty("java.home"), "bin", "java").toString();
        final Process process = new ProcessBuilder(List.of(java, "-Xmx256m", "-cp", System.getProperty("java.class.path"),
                LeakProbe.class.getName(), Integer.toString(ITERATIONS))).redirectErrorStream(true).start();
        final Map<String, Long> values = new HashMap<>();
        final StringBuilder output = new StringBuilder();
        try (BufferedReader reader = new BufferedReader(new InputStreamReader(process.getInputStream(), StandardCharsets.UTF_8))) {
            String line;
            while ((line = reader.readLine()) != null) {
                output.append(line).append('\n');
                final int eq = line.indexOf('=');
                if (eq > 0 && line.substring(eq + 1).matches("-?[0-9]+")) {
                    values.put(line.substring(0, eq), Long.parseLong(line.substring(eq + 1)));
                }
            }
        }
        assertTrue(process.waitFor() == 0 && values.containsKey("end"), "leak probe failed:\n" + output);
        final long growth = values.get("end") - values.get("warmup");
        System.out.printf("leak: %d iterations, resident memory %.1f MB after warm-up, %.1f MB at the end (%+.1f MB)%n", ITERATIONS,
                values.get("warmup") / 1e6, values.get("end") / 1e6, growth / 1e6);
        assertTrue(growth < BOUND, "resident memory grew by " + growth + " bytes");
        assertEquals(0L, values.get("liveGraphs"), "graphs left registered");
    }
}
