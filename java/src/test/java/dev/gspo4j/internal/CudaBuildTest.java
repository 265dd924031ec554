package dev.gspo4j.internal;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.File;
import java.nio.file.Files;
import java.nio.file.Path;
import org.bytedeco.javacpp.FloatPointer;
import org.bytedeco.javacpp.LongPointer;
import org.bytedeco.javacpp.DoublePointer;
import org.junit.jupiter.api.Test;

/**
 * The library Maven built holds the CUDA kernels exactly when the build asked for them, and a
 * CUDA build loads and runs its CPU path on a machine without a GPU or a driver (CI is such a
 * machine, with nvcc).
 */
class CudaBuildTest {

    private static boolean nvccOnPath() {
        final String path = System.getenv().getOrDefault("PATH", "");
        for (String dir : path.split(File.pathSeparator)) {
            if (!dir.isEmpty() && Files.isExecutable(Path.of(dir, "nvcc"))) {
                return true;
            }
        }
        return Files.isExecutable(Path.of("/usr/local/cuda/bin/nvcc"));
    }

    @Test
    void cudaKernelsArePresentWhenTheBuildAskedForThem() {
        final String requested = System.getProperty("gspo4j.cuda", "AUTO");
        final int version = Kernels.cudaRuntimeVersion();
        switch (requested) {
            case "ON" -> assertTrue(version >= 12000, "GSPO4J_CUDA=ON but the library reports CUDA runtime " + version);
            case "OFF" -> assertEquals(0, version, "GSPO4J_CUDA=OFF but the library holds CUDA kernels");
            default -> {
                if (nvccOnPath()) {
                    assertTrue(version >= 12000, "nvcc is on the PATH and GSPO4J_CUDA=AUTO, but the library reports CUDA runtime " + version);
                }
            }
        }
    }

    @Test
    void theCpuPathRunsWhateverTheGpu() {
        // With or without CUDA kernels, with or without a driver: the CPU kernels answer.
        assertTrue(Kernels.cudaDeviceCount() >= 0);
        try (FloatPointer logits = new FloatPointer(0f, 1f, 2f, 3f); LongPointer targets = new LongPointer(1L);
                FloatPointer logprob = new FloatPointer(1L); DoublePointer lse = new DoublePointer(1L)) {
            targets.put(0, 3L);
            Kernels.tokenLogProbForward(Device.CPU, null, new LogitsView(logits, LogitsDtype.FLOAT32, 1, 1, 4, 4, 4), targets, 1.0,
                    true, logprob, lse, null);
            final double expected = 3.0 - Math.log(1 + Math.exp(1) + Math.exp(2) + Math.exp(3));
            assertEquals(expected, logprob.get(0), 1e-6);
        }
    }

    @Test
    void checkErrorWithoutAGpuIsAStatusNotACrash() {
        if (Kernels.cudaDeviceCount() > 0) {
            return; // a real device: the GPU harness (bench/gpu) covers it
        }
        final int status = Gspo4jLibrary.gspo4j_cuda_check_error(null);
        final String message = Gspo4jLibrary.gspo4j_last_error().getString();
        if (Kernels.cudaRuntimeVersion() == 0) {
            assertEquals(0, status, message); // nothing can have been queued
        } else {
            assertEquals(5, status, message);
            assertTrue(message.contains("cuda"), message);
        }
    }
}
