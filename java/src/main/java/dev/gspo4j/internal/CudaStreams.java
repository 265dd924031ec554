package dev.gspo4j.internal;

import java.lang.reflect.Method;
import org.bytedeco.javacpp.Pointer;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.cuda.CUDAStream;
import org.bytedeco.pytorch.global.torch_cuda;

/**
 * libtorch's current CUDA stream, the one the kernels run on. The only class of gspo4j that names
 * a CUDA class of the presets: the JVM loads it, and with it {@code torch_cuda} and the CUDA
 * preset, only when a CUDA tensor reaches a kernel, so a CPU-only classpath never touches them.
 */
final class CudaStreams {
    private CudaStreams() {}

    // CUDAStream.stream() returns the CUDA preset's CUstream_st, a class the CPU-only classpath
    // lacks: called reflectively so that gspo4j compiles without the CUDA preset.
    private static volatile Method rawStream;

    /** The cudaStream_t of libtorch's current stream on the tensor's device. */
    static Pointer current(Tensor onDevice) {
        try (org.bytedeco.pytorch.Device device = onDevice.device()) {
            final CUDAStream stream = torch_cuda.getCurrentCUDAStream(device.index());
            try {
                Method method = rawStream;
                if (method == null) {
                    method = CUDAStream.class.getMethod("stream");
                    rawStream = method;
                }
                final Pointer raw = (Pointer) method.invoke(stream);
                // A plain Pointer over the same address: the caller needs no CUDA preset type.
                return raw == null ? null : new Pointer(raw);
            } catch (ReflectiveOperationException e) {
                throw new IllegalStateException("cannot read libtorch's current CUDA stream (is the CUDA preset on the classpath?)", e);
            } finally {
                stream.close();
            }
        }
    }
}
