package dev.gspo4j.internal;

import org.bytedeco.javacpp.BytePointer;
import org.bytedeco.javacpp.DoublePointer;
import org.bytedeco.javacpp.FloatPointer;
import org.bytedeco.javacpp.LongPointer;
import org.bytedeco.javacpp.Pointer;
import org.bytedeco.pytorch.MemoryFormatOptional;
import org.bytedeco.pytorch.ScalarTypeOptional;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorOptions;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;

/** Small bridges between libtorch tensors and the kernels' pointers. */
public final class Tensors {
    private Tensors() {}

    /** A float32 pointer to a float32 tensor's data, or null for a null tensor. */
    public static FloatPointer floats(Tensor t) {
        return t == null ? null : new FloatPointer(t.data_ptr());
    }

    public static DoublePointer doubles(Tensor t) {
        return t == null ? null : new DoublePointer(t.data_ptr());
    }

    public static LongPointer longs(Tensor t) {
        return t == null ? null : new LongPointer(t.data_ptr());
    }

    public static BytePointer bytes(Tensor t) {
        return t == null ? null : new BytePointer(t.data_ptr());
    }

    public static Pointer raw(Tensor t) {
        return t.data_ptr();
    }

    /** An uninitialised tensor of the given shape and dtype on {@code like}'s device. */
    public static Tensor empty(long[] shape, ScalarType type, Tensor like) {
        try (TensorOptions base = like.options(); ScalarTypeOptional dtype = new ScalarTypeOptional(type);
                TensorOptions options = base.dtype(dtype); MemoryFormatOptional format = new MemoryFormatOptional()) {
            return torch.empty(shape, options, format);
        }
    }

    public static long[] shape(Tensor t) {
        final long[] out = new long[(int) t.dim()];
        for (int i = 0; i < out.length; i++) {
            out[i] = t.size(i);
        }
        return out;
    }

    /** The kernels' name for a logits dtype, or null when they do not read it. */
    public static LogitsDtype logitsDtype(ScalarType type) {
        return switch (type.intern()) {
            case Float -> LogitsDtype.FLOAT32;
            case BFloat16 -> LogitsDtype.BFLOAT16;
            case Half -> LogitsDtype.FLOAT16;
            default -> null;
        };
    }

    public static Device device(Tensor t) {
        return t.is_cuda() ? Device.CUDA : Device.CPU;
    }

    /**
     * The stream a kernel call on {@code t}'s device runs on: null on the CPU, libtorch's current
     * CUDA stream on a GPU (so the kernels order with the model's own work, no synchronisation).
     */
    public static Pointer stream(Tensor t) {
        return t.is_cuda() ? CudaStreams.current(t) : null;
    }
}
