package dev.gspo4j.internal;

/**
 * The test tree's handle on {@link Tensors}' package-private CUDA emulator switch, for
 * {@code dev.gspo4j.CudaEmulatorProbe}: on, CPU tensors take the Java layer's CUDA path.
 */
public final class EmulatedCuda {
    private EmulatedCuda() {}

    public static void route(boolean on) {
        Tensors.emulateCudaOnCpuTensors(on);
    }
}
