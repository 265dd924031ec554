package dev.gspo4j.internal;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import org.bytedeco.javacpp.BytePointer;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * One pass from Java over the memory of a contiguous CPU tensor, for what compute() checks and
 * counts on the host anyway: a mask's 0/1 values (converted to the kernels' bytes in the same
 * pass), the range of the token ids, the exact counts. Each is a loop over a direct buffer instead
 * of the four to six libtorch ops (and their JNI crossings) the same answer costs through libtorch,
 * which dominate a call on small inputs; on large ones the pass reads the memory once, as the op
 * would. Callers make sure the tensor is a dense, contiguous CPU tensor without lazy bits.
 */
public final class HostScan {
    private HostScan() {}

    /** Whether {@link #maskToBytes} reads masks of this dtype. */
    public static boolean readsMask(ScalarType type) {
        return switch (type.intern()) {
            case Float, Double, Long, Int, Byte -> true; // Byte: uint8
            default -> false;
        };
    }

    /** Whether {@code t}'s memory fits one Java buffer (at most 2 GiB - 1): the passes here read it. */
    public static boolean fits(Tensor t) {
        return t.numel() * t.element_size() <= Integer.MAX_VALUE;
    }

    /** The memory of a contiguous CPU tensor, in native byte order. */
    static ByteBuffer bytes(Tensor t) {
        final long size = t.numel() * t.element_size();
        if (size > Integer.MAX_VALUE) {
            throw new IllegalArgumentException("a tensor of " + size + " bytes does not fit one Java buffer (see fits())");
        }
        final BytePointer data = new BytePointer(t.data_ptr());
        data.capacity(size);
        return data.asByteBuffer().order(ByteOrder.nativeOrder());
    }

    /**
     * Writes 1 where {@code mask} (float32, float64, int64, int32 or uint8, contiguous, on the CPU)
     * holds 1 and 0 where it holds 0 (-0.0 included) into {@code out} (bool, same number of
     * elements, contiguous); stops at the first other value (NaN included).
     *
     * @return the index of the first value other than 0 and 1, or -1 when there is none
     */
    public static long maskToBytes(Tensor mask, Tensor out) {
        final long n = mask.numel();
        if (n == 0) {
            return -1;
        }
        final ByteBuffer in = bytes(mask);
        final ByteBuffer to = bytes(out);
        final int count = (int) n;
        switch (mask.scalar_type().intern()) {
            case Float -> {
                for (int i = 0; i < count; i++) {
                    final float v = in.getFloat(4 * i);
                    if (v != 0f && v != 1f) {
                        return i;
                    }
                    to.put(i, v == 0f ? (byte) 0 : (byte) 1);
                }
            }
            case Double -> {
                for (int i = 0; i < count; i++) {
                    final double v = in.getDouble(8 * i);
                    if (v != 0.0 && v != 1.0) {
                        return i;
                    }
                    to.put(i, v == 0.0 ? (byte) 0 : (byte) 1);
                }
            }
            case Long -> {
                for (int i = 0; i < count; i++) {
                    final long v = in.getLong(8 * i);
                    if ((v & ~1L) != 0) {
                        return i;
                    }
                    to.put(i, (byte) v);
                }
            }
            case Int -> {
                for (int i = 0; i < count; i++) {
                    final int v = in.getInt(4 * i);
                    if ((v & ~1) != 0) {
                        return i;
                    }
                    to.put(i, (byte) v);
                }
            }
            case Byte -> {
                for (int i = 0; i < count; i++) {
                    final byte v = in.get(i);
                    if ((v & ~1) != 0) {
                        return i;
                    }
                    to.put(i, v);
                }
            }
            default -> throw new IllegalArgumentException("HostScan reads float32, float64, int64, int32 and uint8 masks, not "
                    + mask.scalar_type());
        }
        return -1;
    }

    /**
     * The first index of a contiguous int64 CPU tensor whose value is outside [0, bound), or -1.
     */
    public static long firstOutside(Tensor ids, long bound) {
        final long n = ids.numel();
        if (n == 0) {
            return -1;
        }
        final ByteBuffer in = bytes(ids);
        final int count = (int) n;
        for (int i = 0; i < count; i++) {
            final long v = in.getLong(8 * i);
            if (v < 0 || v >= bound) {
                return i;
            }
        }
        return -1;
    }

    /**
     * The exact counts of a 0/1 byte mask (contiguous, on the CPU) in {@code layout}: responses with
     * at least one counted token, and counted tokens. Packed: the offsets the kernels checked.
     *
     * @return {responses, tokens}
     */
    public static long[] counts(Tensor mask, TokenLayout layout) {
        final long batch = layout.batch();
        final long tokens = layout.tokens();
        if (tokens == 0) {
            return new long[] {0, 0};
        }
        final ByteBuffer m = bytes(mask);
        long responses = 0;
        long counted = 0;
        for (long b = 0; b < batch; b++) {
            final long start = layout.isPacked() ? layout.offsets().get(b) : b * layout.seq();
            final long end = layout.isPacked() ? layout.offsets().get(b + 1) : start + layout.seq();
            long here = 0;
            for (long i = start; i < end; i++) {
                here += m.get((int) i) != 0 ? 1 : 0;
            }
            counted += here;
            responses += here > 0 ? 1 : 0;
        }
        return new long[] {responses, counted};
    }

    /** Packed without a mask: the responses with at least one token. */
    public static long nonEmpty(TokenLayout layout) {
        long responses = 0;
        for (long b = 0; b < layout.batch(); b++) {
            responses += layout.offsets().get(b + 1) > layout.offsets().get(b) ? 1 : 0;
        }
        return responses;
    }
}
