package dev.gspo4j;

import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

/** Runs a probe's main in a fresh JVM on the test classpath and collects its {@code name=number} lines. */
final class ChildJvm {
    private ChildJvm() {}

    static Map<String, Long> run(List<String> jvmOptions, Class<?> main, String... args) throws Exception {
        return run(Map.of(), jvmOptions, main, args);
    }

    /** {@link #run(List, Class, String...)} with these variables added to the child's environment. */
    static Map<String, Long> run(Map<String, String> environment, List<String> jvmOptions, Class<?> main, String... args)
            throws Exception {
        final List<String> command = new ArrayList<>();
        command.add(Path.of(System.getProperty("java.home"), "bin", "java").toString());
        command.addAll(jvmOptions);
        command.add("-cp");
        command.add(System.getProperty("java.class.path"));
        command.add(main.getName());
        command.addAll(List.of(args));
        final ProcessBuilder builder = new ProcessBuilder(command).redirectErrorStream(true);
        builder.environment().putAll(environment);
        final Process process = builder.start();
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
        assertTrue(process.waitFor() == 0, main.getSimpleName() + " failed:\n" + output);
        return values;
    }
}
