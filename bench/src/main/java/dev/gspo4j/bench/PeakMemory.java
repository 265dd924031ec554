package dev.gspo4j.bench;

import java.nio.file.Files;
import java.nio.file.Path;

/**
 * Peak extra resident memory of one benchmark method, in a fresh JVM: {@code shape dtype method};
 * prints {@code extra=<bytes>} over the resident memory once the workload exists (which includes
 * the kernel benchmarks' warm output buffers, the gradient among them).
 */
public final class PeakMemory {
    public static void main(String[] args) throws Exception {
        final Workload w = new Workload(args[0], args[1]);
        w.setUp();
        // Warm-up on the real workload would double the peak; a tiny one loads everything instead.
        final Workload small = new Workload("16x100", args[1]);
        small.setUp();
        run(small, args[2]);
        small.tearDown();
        System.gc();
        final long before = status("VmRSS:");
        Files.writeString(Path.of("/proc/self/clear_refs"), "5");
        final long baseline = Math.max(before, status("VmHWM:"));
        run(w, args[2]);
        System.out.println("extra=" + (status("VmHWM:") - baseline));
    }

    static void run(Workload w, String method) {
        switch (method) {
            case "fusedGspo" -> PolicyLossBenchmark.fused(w, PolicyLossBenchmark.GSPO);
            case "compositeGspo" -> PolicyLossBenchmark.composite(w, PolicyLossBenchmark.GSPO);
            case "fusedGrpo" -> PolicyLossBenchmark.fused(w, PolicyLossBenchmark.GRPO);
            case "compositeGrpo" -> PolicyLossBenchmark.composite(w, PolicyLossBenchmark.GRPO);
            case "fusedForward" -> TokenLogProbBenchmark.fusedForward(w);
            case "compositeForward" -> TokenLogProbBenchmark.compositeForward(w).close();
            case "fusedForwardBackward" -> TokenLogProbBenchmark.fusedForwardBackward(w);
            case "compositeForwardBackward" -> TokenLogProbBenchmark.compositeForwardBackward(w).close();
            default -> throw new IllegalArgumentException("unknown method " + method);
        }
    }

    static long status(String key) throws Exception {
        for (String line : Files.readAllLines(Path.of("/proc/self/status"))) {
            if (line.startsWith(key)) {
                return Long.parseLong(line.replaceAll("[^0-9]", "")) * 1024;
            }
        }
        throw new IllegalStateException(key);
    }
}
