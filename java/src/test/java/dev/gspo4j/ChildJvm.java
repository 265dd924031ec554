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

    /** What one of {@link #runAll}'s children printed. */
    record Outcome(int exitCode, String output, Map<String, Long> values) {}

    /**
     * Starts one child JVM per argument list at once (the ranks of a process group), waits for all of
     * them at most {@code limitSeconds}, and returns their outcomes in order. A child still running
     * then is killed (with the others) and the test fails: no hang.
     */
    static List<Outcome> runAll(List<String> jvmOptions, Class<?> main, long limitSeconds, List<List<String>> argsPerChild)
            throws Exception {
        final List<Process> processes = new ArrayList<>();
        final List<StringBuilder> outputs = new ArrayList<>();
        final List<Thread> readers = new ArrayList<>();
        try {
            for (List<String> args : argsPerChild) {
                final List<String> command = new ArrayList<>();
                command.add(Path.of(System.getProperty("java.home"), "bin", "java").toString());
                command.addAll(jvmOptions);
                command.add("-cp");
                command.add(System.getProperty("java.class.path"));
                command.add(main.getName());
                command.addAll(args);
                final Process process = new ProcessBuilder(command).redirectErrorStream(true).start();
                processes.add(process);
                final StringBuilder output = new StringBuilder();
                outputs.add(output);
                final Thread reader = new Thread(() -> {
                    try (BufferedReader in = new BufferedReader(new InputStreamReader(process.getInputStream(), StandardCharsets.UTF_8))) {
                        String line;
                        while ((line = in.readLine()) != null) {
                            synchronized (output) {
                                output.append(line).append('\n');
                            }
                        }
                    } catch (java.io.IOException e) {
                        synchronized (output) {
                            output.append("(output lost: ").append(e).append(")\n");
                        }
                    }
                });
                reader.setDaemon(true);
                reader.start();
                readers.add(reader);
            }
            final long deadline = System.nanoTime() + limitSeconds * 1_000_000_000L;
            for (int i = 0; i < processes.size(); i++) {
                final long left = Math.max(1, (deadline - System.nanoTime()) / 1_000_000L);
                if (!processes.get(i).waitFor(left, java.util.concurrent.TimeUnit.MILLISECONDS)) {
                    final StringBuilder all = new StringBuilder();
                    for (int j = 0; j < outputs.size(); j++) {
                        synchronized (outputs.get(j)) {
                            all.append("--- child ").append(j).append(":\n").append(outputs.get(j));
                        }
                    }
                    throw new AssertionError(main.getSimpleName() + " child " + i + " still ran after " + limitSeconds + " s:\n" + all);
                }
            }
            final List<Outcome> outcomes = new ArrayList<>();
            for (int i = 0; i < processes.size(); i++) {
                readers.get(i).join(10_000);
                final String text;
                synchronized (outputs.get(i)) {
                    text = outputs.get(i).toString();
                }
                final Map<String, Long> values = new HashMap<>();
                for (String line : text.split("\n")) {
                    final int eq = line.indexOf('=');
                    if (eq > 0 && line.substring(eq + 1).matches("-?[0-9]+")) {
                        values.put(line.substring(0, eq), Long.parseLong(line.substring(eq + 1)));
                    }
                }
                outcomes.add(new Outcome(processes.get(i).exitValue(), text, values));
            }
            return outcomes;
        } finally {
            for (Process process : processes) {
                if (process.isAlive()) {
                    process.destroyForcibly();
                }
            }
        }
    }
}
