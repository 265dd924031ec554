package dev.gspo4j.internal;

import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

/**
 * The data checks of CUDA calls that have not been read yet. A CUDA kernel checks its data (token
 * ids, offsets, NaN/Inf) as it runs; waiting for it in every call would stall the host once per
 * loss. By default a call queues a snapshot of what its kernels found ({@code
 * gspo4j_cuda_defer_error_check}) and registers it here; the snapshot is read, and an error
 * thrown, no later than the next gspo4j call on that device or the first read of the call's
 * result ({@link #resolve}), waiting then only for the work queued before the snapshot. In strict
 * mode ({@link #setStrict}, system property {@value #STRICT_PROPERTY}) every call waits for its
 * own kernels instead, as the CPU path does.
 */
public final class DeferredChecks {
    /** The system property that makes every CUDA call wait for its data checks. */
    public static final String STRICT_PROPERTY = "gspo4j.syncChecks";

    /** One call's pending check. */
    public interface Check {
        /**
         * Reads the snapshot and throws what it found, in the caller's terms.
         *
         * @param later whether a later call, not the call's own result, reads it (the message says so)
         */
        void resolve(boolean later);

        /** Releases what the check held; called once, after {@link #resolve} or instead of it. */
        void close();
    }

    private static final Map<Integer, ArrayDeque<Check>> PENDING = new HashMap<>();
    private static volatile boolean strict = Boolean.parseBoolean(System.getProperty(STRICT_PROPERTY, "false"));

    private DeferredChecks() {}

    public static boolean strict() {
        return strict;
    }

    public static void setStrict(boolean on) {
        strict = on;
    }

    /** Registers a call's check on CUDA device {@code device}. */
    public static void add(int device, Check check) {
        synchronized (PENDING) {
            PENDING.computeIfAbsent(device, d -> new ArrayDeque<>()).addLast(check);
        }
    }

    /** Whether checks of {@code device} wait to be read. */
    public static boolean pending(int device) {
        synchronized (PENDING) {
            final ArrayDeque<Check> checks = PENDING.get(device);
            return checks != null && !checks.isEmpty();
        }
    }

    /**
     * Reads every pending check of {@code device}, oldest first, and throws the first error found
     * (the others are read and released too: each call's error is reported once).
     *
     * @param later whether a new call, not a read of a result, is reading them
     */
    public static void resolve(int device, boolean later) {
        final List<Check> taken;
        synchronized (PENDING) {
            final ArrayDeque<Check> checks = PENDING.get(device);
            if (checks == null || checks.isEmpty()) {
                return;
            }
            taken = new ArrayList<>(checks);
            checks.clear();
        }
        RuntimeException first = null;
        for (Check c : taken) {
            try {
                c.resolve(later);
            } catch (RuntimeException e) {
                if (first == null) {
                    first = e;
                } else {
                    first.addSuppressed(e);
                }
            } finally {
                c.close();
            }
        }
        if (first != null) {
            throw first;
        }
    }

    /** The key of {@code t}'s CUDA device: its index (0 for CPU tensors sent to the emulator). */
    public static int deviceOf(org.bytedeco.pytorch.Tensor t) {
        if (!t.is_cuda()) {
            return 0;
        }
        try (org.bytedeco.pytorch.Device device = t.device()) {
            return device.has_index() ? device.index() : 0;
        }
    }
}
