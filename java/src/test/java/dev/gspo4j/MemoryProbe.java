package dev.gspo4j;

import java.nio.file.Files;
import java.nio.file.Path;
import org.bytedeco.pytorch.LinearImpl;
import org.bytedeco.pytorch.Scalar;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorOptions;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * Run in a child JVM by {@link MemoryFootprintTest}: one GSPO loss forward + backward over the bf16
 * logits of an lm_head, by gspo4j ("fused": result.backward(), "graph": result.loss().backward())
 * or the composite ("composite"); prints the growth of the process's peak resident memory over its
 * resident memory once the logits exist, in bytes.
 */
public final class MemoryProbe {
    public static void main(String[] args) throws Exception {
        final String mode = args[0];
        final int b = 4, t = 256, h = 32, v = 32000;
        torch.manual_seed(3);
        // A bf16 lm_head over hidden states: the logits are an activation, as in a trainer.
        final LinearImpl head = new LinearImpl(h, v);
        head.to(ScalarType.BFloat16, false);
        final Tensor hidden = torch.randn(b, t, h).to(ScalarType.BFloat16);
        final Tensor targets = torch.randint(v, new long[] {b, t}, new TensorOptions(ScalarType.Long));
        final Tensor old = torch.randn(b, t).mul(new Scalar(0.01)).sub(new Scalar(10.0));
        final Tensor advantages = torch.randn(b);
        final Tensor mask = torch.ones(b, t);
        final PolicyLoss gspo = PolicyLoss.gspo().build();
        // Warm-up on a tiny batch: loads libraries and the kernels' thread pool outside the measurement.
        try (Tensor small = torch.randn(1, 2, 8).set_requires_grad(true); LossResult r = gspo.compute(LossInput.builder()
                .logits(small).targets(torch.zeros(new long[] {1, 2}, new TensorOptions(ScalarType.Long)))
                .advantages(torch.ones(1)).build())) {
            r.backward();
        }
        final Tensor logits = head.forward(hidden);
        System.gc();
        final long before = status("VmRSS:");
        resetPeak();
        final long baseline = Math.max(before, status("VmHWM:"));
        if (mode.equals("composite")) {
            CompositeLoss.compute(PolicyLossModuleTest.settingsOf(gspo), 1.0, logits, targets, mask, old, null, advantages, false)
                    .loss().backward();
        } else {
            try (LossResult result = gspo.compute(LossInput.builder().logits(logits).targets(targets).mask(mask)
                    .oldLogProbs(old).advantages(advantages).build())) {
                if (mode.equals("graph")) {
                    result.loss().backward();
                } else {
                    result.backward();
                }
            }
        }
        System.out.println("extra=" + (status("VmHWM:") - baseline));
        System.out.println("logits=" + logits.numel() * logits.element_size());
    }

    /** Clears the peak (Linux: writing 5 to clear_refs resets VmHWM to the current RSS). */
    static void resetPeak() {
        try {
            Files.writeString(Path.of("/proc/self/clear_refs"), "5");
        } catch (Exception e) {
            // Older kernels: the peak then includes start-up, which only makes the bound looser.
        }
    }

    static long status(String key) throws Exception {
        for (String line : Files.readAllLines(Path.of("/proc/self/status"))) {
            if (line.startsWith(key)) {
                return Long.parseLong(line.replaceAll("[^0-9]", "")) * 1024;
            }
        }
        throw new IllegalStateException(key + " not in /proc/self/status");
    }
}
