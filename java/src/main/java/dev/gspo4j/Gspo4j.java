package dev.gspo4j;

import dev.gspo4j.internal.DeferredChecks;
import dev.gspo4j.internal.GradientPool;
import dev.gspo4j.internal.Kernels;
import dev.gspo4j.internal.NativeLoader;

/**
 * Library-wide settings and facts: the CPU kernels' thread pool, the pool of gradient memory, when
 * CUDA data checks are read, and {@link #info()} (version, instruction set, CUDA runtime, devices,
 * threads).
 *
 * <p>The CPU kernels run on gspo4j's own pool, not on libtorch's (OpenMP) threads. Its default,
 * applied when the native library loads, is the smaller of {@link Runtime#availableProcessors()}
 * (which honours container CPU quotas and affinity masks) and libtorch's intra-op thread count
 * {@code at::get_num_threads()} ({@code torch.get_num_threads()}, itself set by {@code
 * OMP_NUM_THREADS} or {@code torch.set_num_threads}), so the two pools do not ask for more CPUs
 * than the process has. The system property {@code gspo4j.threads} (an integer in [1, 1024])
 * replaces that default; {@link #setThreads} changes the count at any time. Results are bitwise
 * identical for any count (per-row work, reductions in a fixed order).
 *
 * <p>Gradient memory: on the CPU the logits' [N, V] gradient is written into memory reused from
 * earlier steps, since allocating and first touching fresh memory costs more than the fused
 * backward itself. A block returns to the pool only when libtorch frees the last tensor that uses
 * it (so a retained {@code .grad} is never reused under you); the idle blocks total at most {@link
 * #gradientPoolLimit()} bytes (default 1 GiB, system property {@value #GRADIENT_POOL_PROPERTY}, 0
 * disables the pool), the oldest freed first; {@link #releaseGradientPool()} frees them all. CUDA
 * gradients use libtorch's caching allocator, which already reuses device memory.
 */
public final class Gspo4j {
    /** The system property that replaces the default thread count. */
    public static final String THREADS_PROPERTY = Kernels.THREADS_PROPERTY;
    /** The largest thread count. */
    public static final int MAX_THREADS = Kernels.MAX_THREADS;

    /** The system property that sets the gradient pool's idle-bytes limit (0 disables it). */
    public static final String GRADIENT_POOL_PROPERTY = GradientPool.PROPERTY;

    private Gspo4j() {}

    /** The system property that makes every CUDA call wait for its own data checks. */
    public static final String SYNC_CHECKS_PROPERTY = DeferredChecks.STRICT_PROPERTY;

    /**
     * Whether every CUDA call waits for its kernels' data checks (strict mode; default false). The
     * CUDA kernels check their data as they run: token ids in [0, V), packed offsets, NaN/Inf with
     * checking on, and a float mask's 0/1 values. By default a call does not wait for that:
     * {@code PolicyLoss.compute} and {@code TokenLogProbs} queue their kernels and a snapshot of
     * what they found, and return with no host sync; the finding becomes the same exception the
     * CPU path throws at the next gspo4j call on that device (its message then says it came from an
     * earlier call) or at the first read of the result ({@code LossResult.lossValue()},
     * {@code logProbs()}, {@code entropy()}, {@code metrics()}, {@code backward()}, and the
     * gradient hook of {@code loss().backward()}), whichever comes first. That read waits for the
     * snapshot only (the work queued before it), not for later work on the stream. With strict
     * mode on, every CUDA call waits for its own kernels and throws at once, as on the CPU.
     * {@code Advantages} always waits (its results are small and usually read at once). On the
     * CPU every check happens before the call returns, whatever this setting.
     *
     * @return whether strict mode is on
     */
    public static boolean syncChecks() {
        return DeferredChecks.strict();
    }

    /**
     * Sets strict mode (see {@link #syncChecks()}); the system property {@value
     * #SYNC_CHECKS_PROPERTY} sets it at start-up.
     *
     * @param sync whether every CUDA call waits for its own data checks
     */
    public static void setSyncChecks(boolean sync) {
        DeferredChecks.setStrict(sync);
    }

    /**
     * The most bytes of idle gradient memory the pool keeps between steps.
     *
     * @return the limit in bytes (0: the pool is off)
     */
    public static long gradientPoolLimit() {
        return GradientPool.limit();
    }

    /**
     * Sets the gradient pool's idle-bytes limit and frees idle blocks beyond it at once.
     *
     * @param bytes {@code >= 0}; 0 disables the pool (every gradient is a fresh allocation)
     */
    public static void setGradientPoolLimit(long bytes) {
        GradientPool.setLimit(bytes);
    }

    /** Frees every idle block of the gradient pool (for example at the end of training). */
    public static void releaseGradientPool() {
        GradientPool.release();
    }

    /**
     * Bytes of idle gradient memory the pool holds now.
     *
     * @return the bytes of blocks returned and not yet reused
     */
    public static long gradientPoolIdleBytes() {
        return GradientPool.idleBytes();
    }

    /** The CPU kernels' thread count now. */
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
