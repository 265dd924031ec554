package dev.gspo4j.internal;

import org.bytedeco.javacpp.BytePointer;
import org.bytedeco.javacpp.FloatPointer;
import org.bytedeco.javacpp.LongPointer;
import org.bytedeco.javacpp.Pointer;
import org.bytedeco.javacpp.ShortPointer;

/** Native buffers from Java arrays, and back, for the kernel tests. */
final class NativeBuffers {
    private NativeBuffers() {}

    static FloatPointer floats(double[] values) {
        if (values == null) {
            return null;
        }
        final FloatPointer p = new FloatPointer(Math.max(1, values.length));
        p.limit(values.length);
        for (int i = 0; i < values.length; i++) {
            p.put(i, (float) values[i]);
        }
        return p;
    }

    static FloatPointer floats(int count, float poison) {
        final FloatPointer p = new FloatPointer(Math.max(1, count));
        p.limit(count);
        for (int i = 0; i < count; i++) {
            p.put(i, poison);
        }
        return p;
    }

    static double[] toArray(FloatPointer p, int count) {
        final double[] out = new double[count];
        for (int i = 0; i < count; i++) {
            out[i] = p.get(i);
        }
        return out;
    }

    static LongPointer longs(long[] values) {
        if (values == null) {
            return null;
        }
        final LongPointer p = new LongPointer(Math.max(1, values.length));
        p.limit(values.length);
        p.put(values);
        return p;
    }

    static BytePointer mask(boolean[] values) {
        if (values == null) {
            return null;
        }
        final BytePointer p = new BytePointer(Math.max(1, values.length));
        p.limit(values.length);
        for (int i = 0; i < values.length; i++) {
            p.put(i, (byte) (values[i] ? 1 : 0));
        }
        return p;
    }

    /** Logits of `dtype` holding the already-representable `values`. */
    static Pointer logits(LogitsDtype dtype, double[] values) {
        if (dtype == LogitsDtype.FLOAT32) {
            return floats(values);
        }
        final ShortPointer p = new ShortPointer(Math.max(1, values.length));
        p.limit(values.length);
        for (int i = 0; i < values.length; i++) {
            p.put(i, Dtypes.bits(dtype, values[i]));
        }
        return p;
    }

    static Pointer empty(LogitsDtype dtype, long elements) {
        final Pointer p = dtype == LogitsDtype.FLOAT32 ? new FloatPointer(Math.max(1, elements)) : new ShortPointer(Math.max(1, elements));
        return p.limit(elements);
    }

    static double readLogit(LogitsDtype dtype, Pointer p, long index) {
        if (dtype == LogitsDtype.FLOAT32) {
            return ((FloatPointer) p).get(index);
        }
        return Dtypes.fromBits(dtype, ((ShortPointer) p).get(index));
    }
}
