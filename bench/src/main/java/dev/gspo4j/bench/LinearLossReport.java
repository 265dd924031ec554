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
 * {@link LinearLossBenchmark} in one JMH run, each path's peak extra memory in a fresh JVM, and a
 * markdown table: {@code --out=DIR}, {@code --shapes=NxHxV,...}, {@code --dtypes=float32,bfloat16},
 * {@code --chunkBytes=BYTES} (the fused path's budget; default the library's).
 * {@code main} with {@code peak SHAPE DTYPE METHOD} is the fresh JVM's side.
 */
public final class LinearLossReport {
    static final String[] METHODS = {"fusedLinear", "unfused", "composite"};

    public static void main(String[] args) throws Exception {
        if (args.length == 4 && args[0].equals("peak")) {
            peakChild(args[1], args[2], args[3]);
            return;
        }
        Path out = Path.of("results");
        String[] shapes = {"2048x896x32000"};
        String[] dtypes = {"float32", "bfloat16"};
        long chunkBytes = dev.gspo4j.LossInput.DEFAULT_LOGITS_CHUNK_BYTES;
        for (String arg : String.join(" ", args).trim().split("\\s+")) {
            if (arg.startsWith("--out=")) {
                out = Path.of(arg.substring(6));
            } else if (arg.startsWith("--shapes=")) {
                shapes = arg.substring(9).split(",");
            } else if (arg.startsWith("--dtypes=")) {
                dtypes = arg.substring(9).split(",");
            } else if (arg.startsWith("--chunkBytes=")) {
                chunkBytes = Long.parseLong(arg.substring(13));
            }
        }
        final Options options = new OptionsBuilder().include(LinearLossBenchmark.class.getSimpleName() + "\\.")
                .param("shape", shapes).param("dtype", dtypes)
                // The options' jvmArgsAppend replaces the @Fork annotation's: repeat its arguments.
                .jvmArgsAppend("-Xmx2g", "-Dorg.bytedeco.javacpp.maxBytes=0", "-Dorg.bytedeco.javacpp.maxPhysicalBytes=0",
                        "-Dgspo4j.bench.chunkBytes=" + chunkBytes).build();
        final Collection<RunResult> results = new Runner(options).run();
        final Map<String, double[]> times = new HashMap<>();
        for (RunResult r : results) {
            final String method = r.getParams().getBenchmark().replaceAll(".*\\.", "").replace("_", "");
            times.put(method + " " + r.getParams().getParam("shape") + " " + r.getParams().getParam("dtype"),
                    new double[] {r.getPrimaryResult().getScore(), r.getPrimaryResult().getScoreError()});
        }
        final StringBuilder table = new StringBuilder();
        table.append(String.format(Locale.ROOT, "# Fused linear GSPO step, CPU, %s%n%n", LocalDate.now()));
        table.append(BenchmarkReport.header().replaceFirst("# CPU benchmarks, [0-9-]+\\s+", ""));
        table.append("Hidden states [N, H] and an lm_head [V, H] (no bias) to the gradients of both; fused linear: "
                + "LossInput.hiddenStates, chunk budget " + (chunkBytes >> 20) + " MiB; unfused: torch.linear, then compute() and "
                + "loss().backward() through the lm_head; composite: torch.linear, then the libtorch composite (bf16 upcast). "
                + "GEMM floor: h W^T, g W and g^T h once each into warm buffers.\n\n");
        table.append("| N x H x V | dtype | fused linear ms | unfused ms | composite ms | fused / unfused | GEMM floor ms "
                + "| fused / floor | peak extra memory fused / unfused / composite | beyond the parameter gradients fused / unfused |\n");
        table.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
        for (String shape : shapes) {
            for (String dtype : dtypes) {
                final double[] fused = times.get("fusedLinear " + shape + " " + dtype);
                if (fused == null) {
                    continue;
                }
                final double[] unfused = times.get("unfused " + shape + " " + dtype);
                final double[] composite = times.get("composite " + shape + " " + dtype);
                final double[] floor = times.get("gemmFloor " + shape + " " + dtype);
                final StringBuilder memory = new StringBuilder();
                final double[] peaks = new double[METHODS.length];
                for (int i = 0; i < METHODS.length; i++) {
                    peaks[i] = peak(shape, dtype, METHODS[i], chunkBytes) / 1e6;
                    memory.append(i == 0 ? "" : " / ").append(String.format(Locale.ROOT, "%.0f MB", peaks[i]));
                }
                // The gradients of the hidden states [N, H] and the weight [V, H], in the dtype.
                final String[] nhv = shape.split("x");
                final double parameters = (Double.parseDouble(nhv[0]) + Double.parseDouble(nhv[2])) * Double.parseDouble(nhv[1])
                        * (dtype.equals("float32") ? 4 : 2) / 1e6;
                final String beyond = String.format(Locale.ROOT, "%.0f MB / %.0f MB (%.1fx)", peaks[0] - parameters,
                        peaks[1] - parameters, (peaks[1] - parameters) / (peaks[0] - parameters));
                table.append(String.format(Locale.ROOT, "| %s | %s | %s | %s | %s | %.2fx | %s | %.2fx | %s | %s |%n", shape, dtype,
                        cell(fused), cell(unfused), cell(composite), fused[0] / unfused[0], cell(floor), fused[0] / floor[0], memory,
                        beyond));
            }
        }
        System.out.println(table);
        Files.createDirectories(out);
        final Path file = out.resolve("cpu-linear-" + LocalDate.now() + "-" + String.join("_", shapes) + ".md");
        Files.writeString(file, table.toString());
        System.out.println("written: " + file);
    }

    static String cell(double[] t) {
        return t == null ? "not run" : String.format(Locale.ROOT, "%.0f ± %.0f", t[0], t[1]);
    }

    static long peak(String shape, String dtype, String method, long chunkBytes) throws Exception {
        final List<String> command = new ArrayList<>(List.of(Path.of(System.getProperty("java.home"), "bin", "java").toString(),
                "-Xmx2g", "-Dgspo4j.bench.chunkBytes=" + chunkBytes, "-Dorg.bytedeco.javacpp.maxBytes=0", "-Dorg.bytedeco.javacpp.maxPhysicalBytes=0", "-cp",
                System.getProperty("java.class.path"), LinearLossReport.class.getName(), "peak", shape, dtype, method));
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

    // Peak RSS growth of one step over the RSS once the inputs exist, after a tiny warm-up.
    static void peakChild(String shape, String dtype, String method) throws Exception {
        final LinearLossBenchmark.Head w = new LinearLossBenchmark.Head(shape, dtype);
        w.setUp();
        final LinearLossBenchmark.Head small = new LinearLossBenchmark.Head("16x8x100", dtype);
        small.setUp();
        run(small, method);
        small.tearDown();
        System.gc();
        final long before = PeakMemory.status("VmRSS:");
        Files.writeString(Path.of("/proc/self/clear_refs"), "5");
        final long baseline = Math.max(before, PeakMemory.status("VmHWM:"));
        run(w, method);
        System.out.println("extra=" + (PeakMemory.status("VmHWM:") - baseline));
    }

    static void run(LinearLossBenchmark.Head w, String method) {
        switch (method) {
            case "fusedLinear" -> LinearLossBenchmark.fusedLinear(w);
            case "unfused" -> LinearLossBenchmark.unfused(w);
            case "composite" -> LinearLossBenchmark.composite(w);
            default -> throw new IllegalArgumentException("unknown method " + method);
        }
    }
}
