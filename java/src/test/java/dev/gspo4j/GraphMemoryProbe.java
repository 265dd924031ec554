package dev.gspo4j;

import org.bytedeco.pytorch.LinearImpl;
import org.bytedeco.pytorch.Scalar;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorOptions;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * Run in a child JVM by {@link GraphMemoryTest}: the growth of the peak resident memory during one
 * step, in bytes ({@code extra}), and the bytes of the logits the loss reads ({@code logits}).
 *
 * <ul>
 *   <li>{@code attach-view}: building {@code loss()} (nothing else) over the {@code [:, :-1, :]}
 *       view of an lm_head's bf16 output [4, 257, 32000];
 *   <li>{@code attach-expanded}: the same over one bf16 row expanded to [16, 512, 32000] (strides 0,
 *       0, 1: 0.5 GB of logits over 64 KB of memory);
 *   <li>{@code view-direct}, {@code view-graph}: a whole forward + {@code backward()} or
 *       {@code loss().backward()} over that view, through the slice and the lm_head;
 *   <li>{@code leaf-direct}, {@code leaf-graph}: the same on leaf bf16 logits [4, 256, 32000].
 * </ul>
 */
public final class GraphMemoryProbe {
    public static void main(String[] args) throws Exception {
        final String mode = args[0];
        torch.manual_seed(3);
        final PolicyLoss gspo = PolicyLoss.gspo().build();
        // Warm-up on a tiny batch: loads libraries and the kernels' thread pool outside the measurement.
        try (Tensor small = torch.randn(1, 2, 8).set_requires_grad(true); LossResult r = gspo.compute(LossInput.builder()
                .logits(small).targets(torch.zeros(new long[] {1, 2}, new TensorOptions(ScalarType.Long)))
                .advantages(torch.ones(1)).build())) {
            r.loss().backward();
        }
        final int b;
        final int t;
        final int v = 32000;
        final Tensor logits;
        if (mode.equals("attach-view") || mode.startsWith("view-")) {
            b = 4;
            t = 256;
            final LinearImpl head = new LinearImpl(32, v);
            head.to(ScalarType.BFloat16, false);
            final Tensor hidden = torch.randn(b, t + 1, 32).to(ScalarType.BFloat16);
            logits = head.forward(hidden).narrow(1, 0, t);
        } else if (mode.equals("attach-expanded")) {
            b = 16;
            t = 512;
            try (Tensor row = torch.randn(1, 1, v); Tensor rowBf16 = row.to(ScalarType.BFloat16)) {
                logits = rowBf16.detach().set_requires_grad(true).expand(b, t, v);
            }
        } else {
            b = 4;
            t = 256;
            // Every temporary closed here: one freed by a later GC would lower the baseline.
            try (Tensor z = torch.randn(b, t, v); Tensor zBf16 = z.to(ScalarType.BFloat16)) {
                logits = zBf16.detach().set_requires_grad(true);
            }
        }
        final Tensor targets = torch.randint(v, new long[] {b, t}, new TensorOptions(ScalarType.Long));
        final Tensor old = torch.randn(b, t).mul(new Scalar(0.01)).sub(new Scalar(10.0));
        final Tensor advantages = torch.randn(b);
        final boolean attachOnly = mode.startsWith("attach");
        final LossResult result = gspo.compute(LossInput.builder().logits(logits).targets(targets).oldLogProbs(old)
                .advantages(advantages).build());
        System.gc();
        final long before = MemoryProbe.status("VmRSS:");
        MemoryProbe.resetPeak();
        final long baseline = Math.max(before, MemoryProbe.status("VmHWM:"));
        if (attachOnly) {
            result.loss();
        } else if (mode.endsWith("-graph")) {
            result.loss().backward();
        } else {
            result.backward();
        }
        System.out.println("extra=" + (MemoryProbe.status("VmHWM:") - baseline));
        System.out.println("logits=" + logits.numel() * logits.element_size());
        result.close();
    }
}
