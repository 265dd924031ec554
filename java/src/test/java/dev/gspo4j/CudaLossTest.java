package dev.gspo4j;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import dev.gspo4j.internal.Kernels;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorOptions;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;
import org.junit.jupiter.api.Assumptions;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;

/**
 * The loss modules on CUDA tensors agree with the same modules on the CPU: values, log-probs,
 * gradients through both backward paths, and bad data raised as IllegalArgumentException. Runs
 * only with a GPU, the PyTorch presets' GPU build and a library built with CUDA; skipped elsewhere
 * (the kernels themselves are checked on a GPU by bench/gpu).
 */
class CudaLossTest {

    @BeforeEach
    void needsAGpu() {
        Assumptions.assumeTrue(Kernels.cudaRuntimeVersion() > 0, "libgspo4j built without CUDA");
        Assumptions.assumeTrue(torch.cuda_is_available(), "no CUDA device visible to libtorch");
        Assumptions.assumeTrue(Kernels.cudaDeviceCount() > 0, "no CUDA device visible to gspo4j");
    }

    @Test
    void cudaAgreesWithCpu() {
        torch.manual_seed(11);
        for (ScalarType type : new ScalarType[] {ScalarType.Float, ScalarType.BFloat16}) {
            for (PolicyLoss loss : new PolicyLoss[] {PolicyLoss.gspo().clip(3e-3, 4e-3).build(), PolicyLoss.grpo().build()}) {
                try (Tensor base = torch.randn(4, 9, 1003).mul(new org.bytedeco.pytorch.Scalar(2.0));
                        Tensor cpuLogits = base.to(type).set_requires_grad(true);
                        Tensor gpuLogits = base.to(type).cuda().set_requires_grad(true);
                        Tensor targets = torch.randint(1003, new long[] {4, 9}, new TensorOptions(ScalarType.Long));
                        Tensor advantages = torch.randn(4);
                        Tensor oldLogProbs = torch.randn(4, 9).mul(new org.bytedeco.pytorch.Scalar(0.01));
                        Tensor gpuTargets = targets.cuda(); Tensor gpuAdvantages = advantages.cuda()) {
                    final String what = loss + " " + type;
                    try (Tensor cpuOld = computeLogProbs(loss, cpuLogits, targets, advantages).add(oldLogProbs);
                            Tensor gpuOld = cpuOld.cuda();
                            LossResult cpu = loss.compute(LossInput.builder().logits(cpuLogits).targets(targets).oldLogProbs(cpuOld)
                                    .advantages(advantages).build());
                            LossResult gpu = loss.compute(LossInput.builder().logits(gpuLogits).targets(gpuTargets)
                                    .oldLogProbs(gpuOld).advantages(gpuAdvantages).build())) {
                        assertTrue(gpu.lossValue().is_cuda(), what + ": the loss stays on the GPU");
                        final double tolerance = type == ScalarType.Float ? 1e-5 : 1e-4;
                        try (Tensor gpuLogProbs = gpu.logProbs().cpu(); Tensor gpuLoss = gpu.lossValue().cpu()) {
                            PolicyLossModuleTest.assertClose(cpu.logProbs(), gpuLogProbs, tolerance, tolerance, what + " log-probs");
                            PolicyLossModuleTest.assertClose(cpu.lossValue(), gpuLoss, tolerance, 1e-7, what + " loss");
                        }
                        cpu.loss().backward();
                        gpu.loss().backward();
                        try (Tensor cpuGrad = cpuLogits.grad(); Tensor gpuGrad = gpuLogits.grad(); Tensor back = gpuGrad.cpu()) {
                            final double gradTolerance = type == ScalarType.Float ? 1e-5 : 1e-2;
                            PolicyLossModuleTest.assertClose(cpuGrad, back, gradTolerance, 1e-6, what + " gradient (graph)");
                        }
                    }
                }
            }
        }
    }

    @Test
    void badDataOnTheGpuIsAnIllegalArgument() {
        try (Tensor logits = torch.randn(2, 3, 50).cuda();
                Tensor targets = torch.full(new long[] {2, 3}, new org.bytedeco.pytorch.Scalar(50),
                        new TensorOptions(ScalarType.Long)).cuda();
                Tensor advantages = torch.randn(2).cuda()) {
            final IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> PolicyLoss.gspo().build()
                    .compute(LossInput.builder().logits(logits).targets(targets).advantages(advantages).build()).close());
            assertTrue(e.getMessage().contains("targets["), e.getMessage());
        }
        // The error record is cleared: the next call is clean.
        try (Tensor logits = torch.randn(2, 3, 50).cuda(); Tensor targets = torch.zeros(new long[] {2, 3},
                new TensorOptions(ScalarType.Long)).cuda(); Tensor advantages = torch.randn(2).cuda();
                LossResult result = PolicyLoss.gspo().build().compute(LossInput.builder().logits(logits).targets(targets)
                        .advantages(advantages).build())) {
            assertEquals(2, result.metrics().sequences());
        }
    }

    private static Tensor computeLogProbs(PolicyLoss loss, Tensor logits, Tensor targets, Tensor advantages) {
        try (org.bytedeco.pytorch.NoGradGuard noGrad = new org.bytedeco.pytorch.NoGradGuard();
                LossResult r = loss.compute(LossInput.builder().logits(logits).targets(targets).advantages(advantages).build())) {
            return r.logProbs().clone();
        }
    }
}
