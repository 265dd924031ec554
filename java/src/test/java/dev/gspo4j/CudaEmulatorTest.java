package dev.gspo4j;

import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Assumptions;
import org.junit.jupiter.api.Test;

/**
 * The Java layer's CUDA path, without a GPU: a child JVM loads the SIMT emulator's build of the
 * native library ({@code cuda/test/emulator}; CMake target {@code gspo4j_simt}, built as
 * {@code <native build>/simt/libgspo4j.so}) in place of the real one, and {@link CudaEmulatorProbe}
 * computes every case from the same CPU tensors twice: on the CPU kernels, and with the test
 * switch on (CPU tensors routed as CUDA memory) through the CUDA path, the real {@code cuda/*.cu}
 * kernels run by the emulator. Skipped only when Maven built no emulator ({@code -Dgspo4j.simt=OFF}).
 *
 * <p>Loading: the JNI glue needs {@code libgspo4j.so}, and JavaCPP loads a class's link libraries
 * before its JNI library. With {@code -Dorg.bytedeco.javacpp.pathsFirst=true} it looks in
 * {@code java.library.path} (here the emulator's folder, alone) before the class resources, so it
 * loads the emulated {@code libgspo4j.so}, whose soname then satisfies the glue's dependency. The
 * emulator treats host memory as device memory under {@code GSPO4J_SIMT_HOST_IS_DEVICE=1}, which
 * the child's environment sets. The probe first checks that this worked: one CUDA device, CUDA
 * runtime 13000, and the only {@code libgspo4j.so} mapped is the emulator's.
 *
 * <p>Covered on the CUDA path: {@code Tensors.device} giving CUDA and {@code Tensors.stream} null
 * for such tensors; {@code PreparedInput} skipping its host-side id check; the forward, the policy
 * loss and {@code Kernels.reportDataErrors} calling {@code gspo4j_cuda_check_error} in
 * {@code PolicyLoss.compute}; the fused backward through {@code result.backward()},
 * {@code backward(scale)} and {@code result.loss().backward()} (FusedLogProbs on the "device",
 * the alias path of a non-leaf view included); {@code Advantages.group}, {@code groupByIds} and
 * {@code gae}; the top-entropy threshold ({@code Kernels.entropyThreshold}) taken and read on the
 * device; the fused linear path ({@code LossInput.Builder#hiddenStates}: libtorch's GEMMs on the
 * tensors, the emulated kernels per chunk), its hidden-state, weight and bias gradients through
 * both backward paths. Cases: every objective, rollout correction (token TIS with k3 rejection,
 * sequence MIS with the off-policy mask, k1 mean rejection with top-entropy selection); padded, packed and strided views; fp32, bf16,
 * fp16; KL, entropy, temperature, dual clip, on-policy, explicit normaliser; rows split over CTAs
 * (V = 16411); loss, log-probs, entropy, every metric and the three gradients within rounding of
 * the CPU's, and repeated calls bitwise equal. Bad data (ids out of range either way, NaN logits,
 * Inf/NaN per-token and per-response inputs, decreasing and short offsets, NaN rewards and
 * values, an RLOO group of one) gives IllegalArgumentException on both paths naming the offender,
 * the CUDA one with the kernels' record ("a CUDA kernel found ...") and the CPU's status; the
 * record is cleared after each report; NaN passes through on both with checking off. Logits on
 * another device (meta) are refused with a message that lists cpu and cuda, since the library
 * reports a CUDA device.
 *
 * <p>Not covered, since it needs a CUDA tensor, a GPU or the presets' GPU build:
 * <ul>
 *   <li>{@code CudaStreams} (libtorch's current stream through {@code torch_cuda} and the CUDA
 *       preset), hence the kernels' ordering with libtorch's work on a real stream, asynchrony
 *       (the emulator runs each launch to completion) and the one wait per call being enough;
 *   <li>libtorch's side of CUDA tensors: allocation on the device, {@code LossMetrics}' copy to
 *       the host, the autograd engine's per-device threads calling the Java hooks, the
 *       ordering of the graph trick's nodes on a device queue;
 *   <li>device guards and the per-device error record with several GPUs, tensors on a device
 *       other than the current one, a host pointer rejected by the real runtime;
 *   <li>{@code PreparedInput}'s device checks against real CUDA tensors (a CPU tensor routed to
 *       CUDA still is on the CPU for libtorch), and the CPU classpath never loading the CUDA
 *       preset (that is {@code CpuClasspathTest});
 *   <li>anything of the hardware: timings, memory bandwidth, real warp scheduling and memory
 *       model (the emulator's own tests cover what it can of those), the CUDA compiler's code.
 * </ul>
 * {@link CudaLossTest} covers the first three on a machine with a GPU, and {@code bench/gpu}
 * the kernels on the device.
 */
class CudaEmulatorTest {

    @Test
    void cudaPathAgreesWithCpuPath() throws Exception {
        Assumptions.assumeFalse("OFF".equalsIgnoreCase(System.getProperty("gspo4j.simt", "ON")),
                "built without the SIMT emulator (-Dgspo4j.simt=OFF)");
        final Path folder = Path.of(System.getProperty("gspo4j.simt.library", "target/native-build/simt")).toAbsolutePath();
        final Path library = folder.resolve("libgspo4j.so");
        assertTrue(Files.isRegularFile(library), "the SIMT emulator was built (gspo4j.simt is on) but " + library + " is missing");
        final Map<String, Long> values = ChildJvm.run(Map.of("GSPO4J_SIMT_HOST_IS_DEVICE", "1"),
                List.of("-Xmx1g", "-Dorg.bytedeco.javacpp.pathsFirst=true", "-Djava.library.path=" + folder,
                        "-Dorg.bytedeco.javacpp.maxBytes=0", "-Dorg.bytedeco.javacpp.maxPhysicalBytes=0"),
                CudaEmulatorProbe.class, library.toString());
        assertTrue(values.containsKey("checks"), "the probe printed no result: " + values);
        System.out.printf("CUDA path on the emulator: %d cases, %d checks, %d ms in the child JVM%n", values.get("cases"),
                values.get("checks"), values.get("millis"));
        assertTrue(values.get("cases") >= 13 && values.get("checks") > 100, "too few checks ran: " + values);
    }
}
