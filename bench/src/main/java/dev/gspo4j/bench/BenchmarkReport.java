package dev.gspo4j.bench;

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.LocalDate;
import java.util.ArrayList;
import java.util.Collection;
import java.util.HashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import org.openjdk.jmh.results.RunResult;
import org.openjdk.jmh.runner.Runner;
import org.openjdk.jmh.runner.options.Options;
import org.openjdk.jmh.runner.options.OptionsBuilder;

/**
 * Runs every benchmark (JMH, settings in the benchmark classes), measures each whole-loss path's
 * peak memory in a fresh JVM, and writes a markdown table: {@code --out=DIR},
 * {@code --shapes=2048x32000,4096x151936}, {@code --dtypes=float32,bfloat16}.
 */
public final class BenchmarkReport {
    public static void main(String[] args) throws Exception {
        Path out = Path.of("results");
        String[] shapes = {"2048x32000", "4096x151936"};
        String[] dtypes = {"float32", "bfloat16"};
        String methods = ".*";
        // Maven hands ${bench.args} over as one argument: split it.
        for (String arg : String.join(" ", args).trim().split("\\s+")) {
            if (arg.startsWith("--out=")) {
                out = Path.of(arg.substring(6));
            } else if (arg.startsWith("--shapes=")) {
                shapes = arg.substring(9).split(",");
            } else if (arg.startsWith("--dtypes=")) {
                dtypes = arg.substring(9).split(",");
            } else if (arg.startsWith("--methods=")) {
                methods = arg.substring(10);
            }
        }
        final Options options = new OptionsBuilder().include(TokenLogProbBenchmark.class.getSimpleName() + "\\." + methods)
                .include(PolicyLossBenchmark.class.getSimpleName() + "\\." + methods)
                .include(StepBenchmark.class.getSimpleName() + "\\." + methods)
                .include(TinyCallBenchmark.class.getSimpleName() + "\\." + methods).param("shape", shapes).param("dtype", dtypes).build();
        final Collection<RunResult> results = new Runner(options).run();
        final Map<String, double[]> times = new HashMap<>(); // "method shape dtype" -> {mean ms, error ms}
        final Map<String, double[]> tiny = new HashMap<>(); // TinyCallBenchmark: method -> {mean us, error us}
        for (RunResult r : results) {
            final String benchmark = r.getParams().getBenchmark();
            final String method = benchmark.replaceAll(".*\\.", "").replace("_", "");
            final double[] score = {r.getPrimaryResult().getScore(), r.getPrimaryResult().getScoreError()};
            if (benchmark.contains(TinyCallBenchmark.class.getSimpleName())) {
                tiny.put(method, score);
                continue;
            }
            final String prefix = benchmark.contains(StepBenchmark.class.getSimpleName()) ? "step." : "";
            times.put(prefix + method + " " + r.getParams().getParam("shape") + " " + r.getParams().getParam("dtype"), score);
        }
        final StringBuilder table = new StringBuilder();
        table.append(header());
        table.append("| op | N x V | dtype | fused ms | composite ms | composite / fused | fused GB/s | peak extra memory fused / composite |\n");
        table.append("| --- | --- | --- | --- | --- | --- | --- | --- |\n");
        final String[][] ops = {{"log-prob forward", "fusedForward", "compositeForward", "1"},
            {"log-prob forward + backward", "fusedForwardBackward", "compositeForwardBackward", "3"},
            {"GSPO loss forward + backward", "fusedGspo", "compositeGspo", "3"},
            {"GRPO loss forward + backward", "fusedGrpo", "compositeGrpo", "3"}};
        for (String[] op : ops) {
            for (String shape : shapes) {
                for (String dtype : dtypes) {
                    final double[] fused = times.get(op[1] + " " + shape + " " + dtype);
                    final double[] composite = times.get(op[2] + " " + shape + " " + dtype);
                    if (fused == null) {
                        continue;
                    }
                    final String[] nv = shape.split("x");
                    final double bytes = Double.parseDouble(nv[0]) * Double.parseDouble(nv[1]) * (dtype.equals("bfloat16") ? 2 : 4)
                            * Integer.parseInt(op[3]);
                    // Kernel rows run in warm buffers: their fused peak is ~0 (clamped, not "-0").
                    final String memory = String.format(Locale.ROOT, "%.0f MB / %s", Math.max(0, peak(shape, dtype, op[1])) / 1e6,
                            composite == null ? "not run" : String.format(Locale.ROOT, "%.0f MB", peak(shape, dtype, op[2]) / 1e6));
                    table.append(String.format(Locale.ROOT, "| %s | %s | %s | %.1f ± %.1f | %s | %s | %.1f | %s |%n", op[0],
                            shape, dtype, fused[0], fused[1],
                            composite == null ? "not run" : String.format(Locale.ROOT, "%.1f ± %.1f", composite[0], composite[1]),
                            composite == null ? "" : String.format(Locale.ROOT, "%.2fx", composite[0] / fused[0]),
                            bytes / (fused[0] / 1e3) / 1e9, memory));
                }
            }
        }
        table.append(stepTable(times, shapes, dtypes));
        table.append(tinyTable(tiny));
        System.out.println(table);
        Files.createDirectories(out);
        final Path file = out.resolve("cpu-" + LocalDate.now() + "-" + String.join("_", shapes) + ".md");
        Files.writeString(file, table.toString());
        System.out.println("written: " + file);
    }

    /** The steady-state GSPO step against its kernels (StepBenchmark). */
    static String stepTable(Map<String, double[]> times, String[] shapes, String[] dtypes) {
        final StringBuilder t = new StringBuilder();
        final String[][] rows = {{"fresh", "fresh [N, V] gradient (pool off)"}, {"pooled", "pooled gradient (default)"},
            {"pooledGraph", "pooled, through loss().backward()"}, {"inPlace", "inPlaceBackward(true)"}};
        boolean any = false;
        for (String shape : shapes) {
            for (String dtype : dtypes) {
                final double[] kernels = times.get("step.kernels " + shape + " " + dtype);
                if (kernels == null) {
                    continue;
                }
                if (!any) {
                    t.append("\nGSPO step (compute + backward into the logits) in steady state, against the fused forward and "
                            + "backward kernels alone into warm buffers:\n\n");
                    t.append("| N x V | dtype | step | ms | step / kernels |\n| --- | --- | --- | --- | --- |\n");
                    any = true;
                }
                t.append(String.format(Locale.ROOT, "| %s | %s | kernels alone | %.1f ± %.1f | 1.00x |%n", shape, dtype, kernels[0],
                        kernels[1]));
                for (String[] row : rows) {
                    final double[] step = times.get("step." + row[0] + " " + shape + " " + dtype);
                    if (step != null) {
                        t.append(String.format(Locale.ROOT, "| %s | %s | %s | %.1f ± %.1f | %.2fx |%n", shape, dtype, row[1], step[0],
                                step[1], step[0] / kernels[0]));
                    }
                }
            }
        }
        return t.toString();
    }

    /** Per-call overhead on tiny inputs (TinyCallBenchmark). */
    static String tinyTable(Map<String, double[]> tiny) {
        if (tiny.isEmpty()) {
            return "";
        }
        final StringBuilder t = new StringBuilder("\nPer-call cost of a GSPO step on tiny inputs (B = 2, T = 4, V = 16, fp32; "
                + "JMH average time, 5 x 1 s):\n\n| path | us per step |\n| --- | --- |\n");
        for (String[] row : new String[][] {{"direct", "result.backward()"}, {"graph", "loss().backward()"},
                {"composite", "libtorch composite"}}) {
            final double[] v = tiny.get(row[0]);
            if (v != null) {
                t.append(String.format(Locale.ROOT, "| %s | %.1f ± %.1f |%n", row[1], v[0], v[1]));
            }
        }
        return t.toString();
    }

    static String header() throws Exception {
        String cpu = "unknown";
        for (String line : Files.readAllLines(Path.of("/proc/cpuinfo"))) {
            if (line.startsWith("model name")) {
                cpu = line.substring(line.indexOf(':') + 1).trim();
                break;
            }
        }
        return String.format(Locale.ROOT, "# CPU benchmarks, %s%n%nMachine: %s, %d cores, Java %s. Commit: %s. "
                + "JMH single-shot, 1 warm-up + 3 measured invocations, 1 fork; mean ± 99.9%% error. "
                + "Fused GB/s counts the logits passes of the op (1 forward, 3 with backward). Composite: log_softmax + gather + "
                + "the formulas of docs/math.md in libtorch, autograd; bf16 logits upcast to float32 first. Peak extra memory: peak RSS of a "
                + "fresh JVM over its RSS once the logits exist.%n%n", LocalDate.now(), cpu, Runtime.getRuntime().availableProcessors(),
                System.getProperty("java.version"), commit());
    }

    static String commit() {
        try {
            final Process p = new ProcessBuilder("git", "rev-parse", "--short", "HEAD").start();
            try (BufferedReader r = new BufferedReader(new InputStreamReader(p.getInputStream(), StandardCharsets.UTF_8))) {
                final String line = r.readLine();
                return line == null ? "unknown" : line;
            }
        } catch (Exception e) {
            return "unknown";
        }
    }

    static long peak(String shape, String dtype, String method) throws Exception {
        final List<String> command = new ArrayList<>(List.of(Path.of(System.getProperty("java.home"), "bin", "java").toString(),
                "-Xmx2g", "-Dorg.bytedeco.javacpp.maxBytes=0", "-Dorg.bytedeco.javacpp.maxPhysicalBytes=0", "-cp",
                System.getProperty("java.class.path"), PeakMemory.class.getName(), shape, dtype, method));
        final Process process = new ProcessBuilder(command).redirectErrorStream(true).start();
        long extra = -1;
        try (BufferedReader r = new BufferedReader(new InputStreamReader(process.getInputStream(), StandardCharsets.UTF_8))) {
            String line;
            while ((line = r.readLine()) != null) {
                if (line.startsWith("extra=")) {
                    extra = Long.parseLong(line.substring(6));
                }
            }
        }
        process.waitFor();
        return extra;
    }
}
