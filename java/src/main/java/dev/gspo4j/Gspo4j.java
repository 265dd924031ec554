package dev.gspo4j;

import dev.gspo4j.internal.DeferredChecks;
import dev.gspo4j.internal.GradientPool;
import dev.gspo4j.internal.Kernels;

/**
 * Library-wide settings: the CPU kernels' thread pool, and the pool of gradient memory.
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
     */
    public static boolean syncChecks() {
        return DeferredChecks.strict();
    }

    /** Sets strict mode (see {@link #syncChecks()}); also the system property {@value #SYNC_CHECKS_PROPERTY}. */
    public static void setSyncChecks(boolean sync) {
        DeferredChecks.setStrict(sync);
    }

    /** The most bytes of idle gradient memory the pool keeps between steps. */
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

    /** Bytes of idle gradient memory the pool holds now. */
    public static long gradientPoolIdleBytes() {
        return GradientPool.idleBytes();
    }

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
