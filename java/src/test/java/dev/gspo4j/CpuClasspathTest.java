package dev.gspo4j;

import static org.junit.jupiter.api.Assertions.assertEquals;

import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Test;

/**
 * The CUDA dispatch touches no GPU class of the presets on CPU work: a trainer with only the CPU
 * presets on its classpath never loads {@code torch_cuda} or the CUDA preset through gspo4j.
 */
class CpuClasspathTest {
    @Test
    void cpuWorkLoadsNoCudaClass() throws Exception {
        final Map<String, Long> values = ChildJvm.run(List.of("--add-opens", "java.base/java.lang=ALL-UNNAMED", "-Xmx512m"),
                CpuClasspathProbe.class);
        assertEquals(10L, values.get("gae"), "the probe ran every entry point: " + values);
        assertEquals(1L, values.get("control"), "the probe cannot see loaded classes: " + values);
        assertEquals(0L, values.get("cudaClasses"), "CUDA-only classes were loaded by CPU work");
    }
}
