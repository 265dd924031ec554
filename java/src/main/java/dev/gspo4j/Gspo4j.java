package dev.gspo4j;

import dev.gspo4j.internal.Kernels;
import dev.gspo4j.internal.NativeLoader;

/**
 * Library-wide settings and facts: the CPU kernels' thread pool, and {@link #info()} (version,
 * instruction set, CUDA runtime, devices, threads).
 *
 * <p>The CPU kernels run on gspo4j's own pool, not on libtorch's (OpenMP) threads. Its default,
 * applied when the native library loads, is the smaller of {@link Runtime#availableProcessors()}
 * (which honours container CPU quotas and affinity masks) and libtorch's intra-op thread count
 * {@code at::get_num_threads()} ({@code torch.get_num_threads()}, itself set by {@code
 * OMP_NUM_THREADS} or {@code torch.set_num_threads}), so the two pools do not ask for more CPUs
 * than the process has. The system property {@code gspo4j.threads} (an integer in [1, 1024])
 * replaces that default; {@link #setThreads} changes the count at any time. Results are bitwise
 * identical for any count (per-row work, reductions in a fixed order).
 */
public final class Gspo4j {
    /** The system property that replaces the default thread count. */
    public static final String THREADS_PROPERTY = Kernels.THREADS_PROPERTY;
    /** The largest thread count. */
    public static final int MAX_THREADS = Kernels.MAX_THREADS;

    private Gspo4j() {}

    /**
     * What the loaded native library is and runs on.
     *
     * @param version gspo4j's version, the same for the classes and the native library (checked
     *     when it loads)
     * @param platform the natives' platform: {@code linux-x86_64} (CPU kernels) or {@code
     *     linux-x86_64-gpu} (CPU and CUDA kernels)
     * @param cpuIsa the instruction set the CPU kernels dispatched to on this processor: {@code
     *     avx512}, {@code avx2} or {@code sse2}
     * @param cudaRuntimeVersion the CUDA runtime the library was built with, {@code 1000 * major +
     *     10 * minor} (13000 for 13.0), 0 when it has no CUDA kernels
     * @param cudaDevices the CUDA devices it can use now (0 without CUDA kernels, a driver or a GPU)
     * @param threads the CPU kernels' thread count now ({@link #threads()})
     * @param nativeLibrary the file of the JNI library that was loaded
     */
    public record Info(String version, String platform, String cpuIsa, int cudaRuntimeVersion, int cudaDevices,
            int threads, String nativeLibrary) {
        /** One line: {@code gspo4j 0.1.0 linux-x86_64-gpu, CPU avx2, CUDA 13.0 (1 device), 8 threads}. */
        @Override
        public String toString() {
            final String cuda = cudaRuntimeVersion == 0 ? "no CUDA kernels"
                    : "CUDA " + cudaRuntimeVersion / 1000 + "." + cudaRuntimeVersion % 1000 / 10 + " (" + cudaDevices
                            + (cudaDevices == 1 ? " device)" : " devices)");
            return "gspo4j " + version + " " + platform + ", CPU " + cpuIsa + ", " + cuda + ", " + threads
                    + (threads == 1 ? " thread" : " threads");
        }
    }

    /**
     * Loads the native library if needed and describes it.
     *
     * @return the version, platform, CPU instruction set, CUDA runtime and devices, and thread count
     * @throws UnsatisfiedLinkError on a platform other than linux-x86_64, or when no natives jar
     *     is on the class path (the message says which dependency to add)
     * @throws LinkageError when the natives jar is of another version than the classes
     */
    public static Info info() {
        final String path = NativeLoader.loadedPath();
        final String platform = path.contains("linux-x86_64-gpu") ? "linux-x86_64-gpu" : "linux-x86_64";
        return new Info(Kernels.version(), platform, Kernels.cpuIsa(), Kernels.cudaRuntimeVersion(),
                Kernels.cudaDeviceCount(), Kernels.numThreads(), path);
    }

    /**
     * The CPU kernels' thread count now.
     *
     * @return the count, in [1, {@value #MAX_THREADS}]
     */
    public static int threads() {
        return Kernels.numThreads();
    }

    /**
     * Sets the CPU kernels' thread count; workers start when a kernel first needs them. Safe to
     * call while other threads compute losses (a running kernel keeps the count it started with).
     *
     * @param threads in [1, {@value #MAX_THREADS}]
     */
    public static void setThreads(int threads) {
        Kernels.setNumThreads(threads);
    }

    /**
     * The default thread count as it would be computed now: {@code gspo4j.threads} when set, else
     * {@code min(Runtime.availableProcessors(), torch.get_num_threads())}.
     *
     * @return the count, in [1, {@value #MAX_THREADS}]
     * @throws IllegalArgumentException when {@code gspo4j.threads} is set but not an integer in
     *     [1, {@value #MAX_THREADS}]
     */
    public static int defaultThreads() {
        return Kernels.defaultThreads();
    }
}
