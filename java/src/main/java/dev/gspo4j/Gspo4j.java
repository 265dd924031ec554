package dev.gspo4j;

import dev.gspo4j.internal.Kernels;

/**
 * Library-wide settings: the CPU kernels' thread pool.
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

    /** The CPU kernels' thread count now. */
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
     * @throws IllegalArgumentException when {@code gspo4j.threads} is set but not an integer in
     *     [1, {@value #MAX_THREADS}]
     */
    public static int defaultThreads() {
        return Kernels.defaultThreads();
    }
}
