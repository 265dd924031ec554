package dev.gspo4j.internal;

import java.util.ArrayDeque;
import java.util.Deque;
import java.util.HashMap;
import java.util.Iterator;
import java.util.Map;
import org.bytedeco.javacpp.Pointer;
import org.bytedeco.pytorch.MemoryFormatOptional;
import org.bytedeco.pytorch.PointerConsumer;
import org.bytedeco.pytorch.ScalarTypeOptional;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorOptions;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * Memory for the logits' gradient on the CPU, reused between steps. Allocating and first touching
 * a fresh [N, V] tensor each step costs more than the fused backward kernel itself (the kernel
 * streams at memory bandwidth; the page faults of a fresh mapping do not), so the gradient is
 * handed out over a block of this pool.
 *
 * <p>Safe by construction: a block is handed out as a tensor over its memory whose deleter returns
 * the block here. libtorch calls the deleter when the last tensor that uses that storage is freed
 * (the autograd engine's copy after the logits' producer consumed it, or a leaf's {@code .grad}
 * when the caller resets it), never before, so a block is never reused while anything can still
 * read it.
 *
 * <p>Bounded: the idle blocks (returned, not yet reused) total at most {@link #limit()} bytes; a
 * block returned beyond that is freed at once (the oldest idle ones go first), and a request larger
 * than the limit is an ordinary allocation. A block is reused for a request of at least half its
 * size, so at most half of a handed-out block is slack. {@link #release()} frees every idle block.
 * The default limit is {@value #DEFAULT_LIMIT} bytes (1 GiB), or the system property {@value
 * #PROPERTY}; 0 disables the pool. CUDA tensors never come here: libtorch's caching allocator
 * already reuses device memory without a first touch.
 */
public final class GradientPool {
    /** The system property that sets the idle-bytes limit (0 disables the pool). */
    public static final String PROPERTY = "gspo4j.gradientPool";
    /** The default idle-bytes limit: 1 GiB. */
    public static final long DEFAULT_LIMIT = 1L << 30;

    // A block of memory: a uint8 tensor of `capacity` bytes that only this class frees.
    private static final class Block {
        final Tensor memory;
        final long capacity;
        final long address;

        Block(Tensor memory, long capacity) {
            this.memory = memory;
            this.capacity = capacity;
            this.address = memory.data_ptr().address();
        }
    }

    private static final Object LOCK = new Object();
    // Idle blocks, oldest first.
    private static final Deque<Block> IDLE = new ArrayDeque<>();
    // Handed-out blocks by address: their tensor's deleter brings them back.
    private static final Map<Long, Block> IN_USE = new HashMap<>();
    private static long idleBytes;
    private static long limit = initialLimit();
    // Counters for tests and benchmarks.
    private static long reused;
    private static long allocated;

    private static final PointerConsumer RETURNED = Unscoped.call(() -> new PointerConsumer() {
        @Override
        public void call(Pointer data) {
            giveBack(data.address());
        }
    });

    private GradientPool() {}

    private static long initialLimit() {
        final String value = System.getProperty(PROPERTY);
        if (value == null || value.isBlank()) {
            return DEFAULT_LIMIT;
        }
        try {
            final long bytes = Long.parseLong(value.trim());
            if (bytes >= 0) {
                return bytes;
            }
        } catch (NumberFormatException ignored) {
            // reported below
        }
        throw new IllegalArgumentException("system property " + PROPERTY + " must be a byte count >= 0 (0 disables the "
                + "gradient pool), got \"" + value + "\"");
    }

    /**
     * An uninitialised contiguous tensor of {@code shape} and {@code type} on {@code like}'s device:
     * over a pooled block on the CPU, a plain allocation elsewhere or when the pool cannot serve it.
     */
    public static Tensor empty(long[] shape, ScalarType type, Tensor like) {
        if (!like.is_cpu()) {
            return Tensors.empty(shape, type, like);
        }
        long elements = 1;
        for (long s : shape) {
            elements = Math.multiplyExact(elements, s);
        }
        final long bytes = Math.multiplyExact(elements, (long) elementSize(type));
        if (bytes == 0) {
            return Tensors.empty(shape, type, like);
        }
        final boolean poolable;
        final Block idle;
        synchronized (LOCK) {
            poolable = bytes <= limit;
            idle = poolable ? takeIdle(bytes) : null;
            reused += idle != null ? 1 : 0;
        }
        if (!poolable) {
            return Tensors.empty(shape, type, like); // too large to keep: an ordinary allocation
        }
        final Block block = idle != null ? idle : allocate(bytes, like);
        try (TensorOptions base = like.options(); ScalarTypeOptional dtype = new ScalarTypeOptional(type);
                TensorOptions options = base.dtype(dtype)) {
            synchronized (LOCK) {
                IN_USE.put(block.address, block);
            }
            try {
                return torch.from_blob(block.memory.data_ptr(), shape, RETURNED, options);
            } catch (RuntimeException | Error e) {
                giveBack(block.address);
                throw e;
            }
        }
    }

    // The smallest idle block of at least `bytes` and at most twice that, or null.
    private static Block takeIdle(long bytes) {
        Block best = null;
        for (Block b : IDLE) {
            if (b.capacity >= bytes && b.capacity / 2 <= bytes && (best == null || b.capacity < best.capacity)) {
                best = b;
            }
        }
        if (best != null) {
            IDLE.remove(best);
            idleBytes -= best.capacity;
        }
        return best;
    }

    private static Block allocate(long bytes, Tensor like) {
        try (TensorOptions base = like.options(); ScalarTypeOptional dtype = new ScalarTypeOptional(ScalarType.Byte);
                TensorOptions options = base.dtype(dtype); MemoryFormatOptional format = new MemoryFormatOptional()) {
            final Tensor memory = Unscoped.call(() -> torch.empty(new long[] {bytes}, options, format));
            synchronized (LOCK) {
                allocated++;
            }
            return new Block(memory, bytes);
        }
    }

    // The deleter: a handed-out block comes back idle, or is freed when the limit says so.
    private static void giveBack(long address) {
        final Tensor free;
        synchronized (LOCK) {
            final Block block = IN_USE.remove(address);
            if (block == null) {
                return;
            }
            if (block.capacity > limit) {
                free = block.memory;
            } else {
                free = null;
                IDLE.addLast(block);
                idleBytes += block.capacity;
                trim();
            }
        }
        if (free != null) {
            free.close();
        }
    }

    // Frees the oldest idle blocks until the idle bytes are within the limit. Holds LOCK.
    private static void trim() {
        final Iterator<Block> oldest = IDLE.iterator();
        while (idleBytes > limit && oldest.hasNext()) {
            final Block b = oldest.next();
            oldest.remove();
            idleBytes -= b.capacity;
            b.memory.close();
        }
    }

    /** The idle-bytes limit now. */
    public static long limit() {
        synchronized (LOCK) {
            return limit;
        }
    }

    /** Sets the idle-bytes limit (0 disables the pool) and frees idle blocks beyond it. */
    public static void setLimit(long bytes) {
        if (bytes < 0) {
            throw new IllegalArgumentException("the gradient pool's limit must be a byte count >= 0 (0 disables it), got " + bytes);
        }
        synchronized (LOCK) {
            limit = bytes;
            trim();
        }
    }

    /** Frees every idle block; blocks in use are freed or kept idle when their tensors go. */
    public static void release() {
        synchronized (LOCK) {
            for (Block b : IDLE) {
                b.memory.close();
            }
            IDLE.clear();
            idleBytes = 0;
        }
    }

    /** Bytes held by idle blocks. */
    public static long idleBytes() {
        synchronized (LOCK) {
            return idleBytes;
        }
    }

    /** Blocks handed out now (tensors libtorch has not freed yet). */
    public static int inUse() {
        synchronized (LOCK) {
            return IN_USE.size();
        }
    }

    /** Whether {@code t}'s memory is a block handed out now (its tensor not yet freed by libtorch). */
    public static boolean handedOut(Tensor t) {
        final long address;
        try (Pointer data = t.data_ptr()) {
            address = data.address();
        }
        synchronized (LOCK) {
            return IN_USE.containsKey(address);
        }
    }

    /** Requests served from an idle block, and blocks allocated, since the process started. */
    public static long[] counters() {
        synchronized (LOCK) {
            return new long[] {reused, allocated};
        }
    }

    private static int elementSize(ScalarType type) {
        switch (type.intern()) {
            case Float:
                return 4;
            case BFloat16:
            case Half:
                return 2;
            case Double:
            case Long:
                return 8;
            default:
                throw new IllegalArgumentException("no gradient pool for dtype " + type);
        }
    }
}
