package dev.gspo4j.internal;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.TimeUnit;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.junit.jupiter.api.Assumptions;
import org.junit.jupiter.api.Test;

/**
 * The CUDA kernels on the CPU: runs the programs of {@code cuda/test} that CMake built beside the
 * library (see {@code cuda/test/README.md}). {@code simt_suite} runs every CUDA entry point under
 * the SIMT emulator and compares it with the CPU entry point; {@code simt_selftest} proves the
 * emulator's detectors fire on seeded bugs. Each runs as built plainly and with ASan + UBSan (the
 * sanitised suite with {@code --quick}, every third case of its large sections). Their reports go
 * to the test output; a failure lists the failing lines. Skipped only when Maven built no emulator
 * ({@code -Dgspo4j.simt=OFF}).
 */
class SimtSuiteTest {

    private static final Pattern CLOSING = Pattern.compile("^\\w+: (\\d+) passed, (\\d+) failed$", Pattern.MULTILINE);

    private static Path program(String name) {
        Assumptions.assumeFalse("OFF".equalsIgnoreCase(System.getProperty("gspo4j.simt", "ON")),
                "built without the SIMT emulator (-Dgspo4j.simt=OFF)");
        final Path folder = Path.of(System.getProperty("gspo4j.native.build", "target/native-build")).toAbsolutePath();
        final Path program = folder.resolve(name);
        assertTrue(Files.isExecutable(program), "the SIMT emulator was built (gspo4j.simt is on) but " + program + " is missing");
        return program;
    }

    /** Runs the program, prints its report and returns it; fails on a non-zero exit or no count. */
    private static String run(String name, String... arguments) throws IOException, InterruptedException {
        final List<String> command = new ArrayList<>();
        command.add(program(name).toString());
        command.addAll(List.of(arguments));
        final ProcessBuilder builder = new ProcessBuilder(command).redirectErrorStream(true);
        // ASan: fail on the first error, report leaks; UBSan: print the stack.
        builder.environment().put("ASAN_OPTIONS", "abort_on_error=0:detect_leaks=1");
        builder.environment().put("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1");
        final Process process = builder.start();
        process.getOutputStream().close();
        final byte[] output = process.getInputStream().readAllBytes();
        assertTrue(process.waitFor(15, TimeUnit.MINUTES), name + " did not finish");
        final String report = new String(output, StandardCharsets.UTF_8);
        System.out.println("---- " + String.join(" ", command) + "\n" + report);
        final Matcher closing = CLOSING.matcher(report);
        assertTrue(closing.find(), name + " printed no closing count (exit " + process.exitValue() + "):\n" + tail(report));
        assertEquals("0", closing.group(2), name + " found failures:\n" + failures(report));
        assertTrue(Long.parseLong(closing.group(1)) > 0, name + " ran no check");
        assertEquals(0, process.exitValue(), name + " exited with " + process.exitValue() + ":\n" + tail(report));
        return report;
    }

    private static String failures(String report) {
        final StringBuilder out = new StringBuilder();
        report.lines().filter(line -> line.startsWith("FAIL")).limit(40).forEach(line -> out.append(line).append('\n'));
        return out.toString();
    }

    private static String tail(String report) {
        return report.length() > 6000 ? report.substring(report.length() - 6000) : report;
    }

    @Test
    void cudaKernelsAgreeWithCpuKernels() throws Exception {
        final String report = run("simt_suite_plain");
        assertTrue(Long.parseLong(CLOSING.matcher(report).results().findFirst().orElseThrow().group(1)) > 3000,
                "the suite ran fewer checks than it has");
    }

    @Test
    void cudaKernelsAgreeWithCpuKernelsUnderAsan() throws Exception {
        run("simt_suite_asan", "--quick");
    }

    @Test
    void emulatorDetectorsFire() throws Exception {
        run("simt_selftest_plain");
    }

    @Test
    void emulatorDetectorsFireUnderAsan() throws Exception {
        run("simt_selftest_asan");
    }
}
