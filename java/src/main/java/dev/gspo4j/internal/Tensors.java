package dev.gspo4j.internal;

import org.bytedeco.javacpp.BytePointer;
import org.bytedeco.javacpp.DoublePointer;
import org.bytedeco.javacpp.FloatPointer;
import org.bytedeco.javacpp.LongPointer;
import org.bytedeco.javacpp.Pointer;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import org.bytedeco.pytorch.DeviceOptional;
import org.bytedeco.pytorch.MemoryFormatOptional;
import org.bytedeco.pytorch.ScalarTypeOptional;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorOptions;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.DeviceType;
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

    // No memory format: libtorch's default (contiguous). Read-only, shared by every call.
    private static final MemoryFormatOptional DEFAULT_FORMAT = Unscoped.call(MemoryFormatOptional::new);
    // The options of a strided tensor of each dtype on the CPU (key -1) and on each CUDA device
    // (its index), made once: building them per call is three native objects, as much time as the
    // allocation they describe on small inputs. Read-only, shared by every thread; never closed.
    private static final Map<Long, TensorOptions> OPTIONS = new ConcurrentHashMap<>();

    /** An uninitialised tensor of the given shape and dtype on {@code like}'s device. */
    public static Tensor empty(long[] shape, ScalarType type, Tensor like) {
        return torch.empty(shape, options(type, like), DEFAULT_FORMAT);
    }

    /**
     * Options for a strided tensor of dtype {@code type} on {@code like}'s device (CPU or CUDA),
     * shared: do not close them.
     */
    public static TensorOptions options(ScalarType type, Tensor like) {
        final boolean cuda = like.is_cuda();
        final long device = cuda ? DeferredChecks.deviceOf(like) : -1;
        final int dtype = type.intern().ordinal();
        final long key = (device << 8) | dtype;
        final TensorOptions cached = OPTIONS.get(key);
        if (cached != null) {
            return cached;
        }
        return OPTIONS.computeIfAbsent(key, k -> Unscoped.call(() -> {
            try (TensorOptions base = new TensorOptions(type);
                    org.bytedeco.pytorch.Device where = cuda ? new org.bytedeco.pytorch.Device(DeviceType.CUDA, (byte) device)
                            : new org.bytedeco.pytorch.Device(DeviceType.CPU); DeviceOptional at = new DeviceOptional(where)) {
                return base.device(at);
            }
        }));
    }

    public static long[] shape(Tensor t) {
        final long[] out = new long[(int) t.dim()];
        for (int i = 0; i < out.length; i++) {
            out[i] = t.size(i);
        }
        return out;
    }

    public static long[] strides(Tensor t) {
        final long[] out = new long[(int) t.dim()];
        for (int i = 0; i < out.length; i++) {
            out[i] = t.stride(i);
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

    /**
     * Whether the kernels take {@code t} for CUDA memory: a CUDA tensor, or any CPU tensor while
     * {@link #emulateCudaOnCpuTensors} is on (tests only).
     */
    public static boolean isCuda(Tensor t) {
        return t.is_cuda() || (cpuTensorsAsCuda && t.is_cpu());
    }

    public static Device device(Tensor t) {
        return isCuda(t) ? Device.CUDA : Device.CPU;
    }

    /**
     * The stream a kernel call on {@code t}'s device runs on: null on the CPU, libtorch's current
     * CUDA stream on a GPU (so the kernels order with the model's own work, no synchronisation).
     * A CPU tensor sent to the emulated CUDA kernels has no stream either: null is the emulator's
     * (synchronous) default stream.
     */
    public static Pointer stream(Tensor t) {
        return t.is_cuda() ? CudaStreams.current(t) : null;
    }

    // The CUDA emulator's test switch. CudaEmulatorTest loads the SIMT emulator's build of the
    // native library (cuda/test/emulator) in place of libgspo4j.so, which runs GSPO4J_DEVICE_CUDA
    // calls on host memory, and turns this on: CPU tensors then take every CUDA branch of the Java
    // layer (device code, no id pre-check, gspo4j_cuda_check_error) while libtorch keeps them on
    // the CPU. Package-private, and refused unless the emulator's own switch is in the
    // environment: no production code path can reach it.
    private static volatile boolean cpuTensorsAsCuda;

    /**
     * Tests only: sends CPU tensors to the kernels as CUDA memory. Needs the emulated library and
     * {@code GSPO4J_SIMT_HOST_IS_DEVICE=1}; with the real one the CUDA entry points would reject
     * host pointers.
     */
    static void emulateCudaOnCpuTensors(boolean on) {
        if (on && !"1".equals(System.getenv("GSPO4J_SIMT_HOST_IS_DEVICE"))) {
            throw new IllegalStateException("CPU tensors as CUDA memory need the SIMT emulator's library and "
                    + "GSPO4J_SIMT_HOST_IS_DEVICE=1");
        }
        cpuTensorsAsCuda = on;
    }
}
