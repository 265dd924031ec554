package dev.gspo4j;

import org.bytedeco.pytorch.Scalar;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorOptions;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * Run in a child JVM by {@link LinearMemoryTest}: one GSPO forward + backward from bf16 hidden
 * states [4, 512, 64] through an lm_head [32000, 64] (logits [2048, 32000], 131 MB in bf16), by
 * the fused linear path ({@code linear-graph}: {@code loss().backward()}, {@code linear-direct}:
 * {@code backward()}, a 8 MiB chunk budget) or the unfused one ({@code unfused}: the lm_head's
 * logits, then compute() and {@code loss().backward()}). Prints the growth of the peak resident
 * memory over the resident memory before the step ({@code extra}), the logits' bytes ({@code
 * logits}), the chunk budget ({@code budget}) and the weight gradient's bytes ({@code weightGrad}).
 */
public final class LinearMemoryProbe {
    static final long BUDGET = 8L << 20;

    public static void main(String[] args) throws Exception {
        final String mode = args[0];
        final int b = 4, t = 512, h = 64, v = 32000;
        torch.manual_seed(3);
        final Tensor hidden;
        final Tensor weight;
        final Tensor bias;
        try (Tensor x = torch.randn(b, t, h); Tensor w = torch.randn(v, h); Tensor bb = torch.randn(v); Scalar s = new Scalar(0.1);
                Tensor ws = w.mul(s); Tensor xb = x.to(ScalarType.BFloat16); Tensor wb = ws.to(ScalarType.BFloat16);
                Tensor bbb = bb.to(ScalarType.BFloat16)) {
            hidden = xb.detach().set_requires_grad(true);
            weight = wb.detach().set_requires_grad(true);
            bias = bbb.detach().set_requires_grad(true);
        }
        final Tensor targets = torch.randint(v, new long[] {b, t}, new TensorOptions(ScalarType.Long));
        final Tensor old = torch.randn(b, t).mul(new Scalar(0.01)).sub(new Scalar(10.0));
        final Tensor advantages = torch.randn(b);
        final Tensor mask = torch.ones(b, t);
        final PolicyLoss gspo = PolicyLoss.gspo().build();
        // Warm-up on a tiny batch of both paths: loads libraries and the kernels' thread pool outside the measurement.
        try (Tensor sh = torch.randn(1, 2, h).to(ScalarType.BFloat16).set_requires_grad(true);
                Tensor sw = torch.randn(8, h).to(ScalarType.BFloat16).set_requires_grad(true);
                Tensor y = torch.zeros(new long[] {1, 2}, new TensorOptions(ScalarType.Long)); Tensor a = torch.ones(1);
                Tensor logits = torch.linear(sh, sw);
                LossResult r = gspo.compute(LossInput.builder().hiddenStates(sh, sw, null).targets(y).advantages(a).build());
                LossResult u = gspo.compute(LossInput.builder().logits(logits).targets(y).advantages(a).build())) {
            r.loss().backward();
            u.loss().backward();
        }
        System.gc();
        final long before = MemoryProbe.status("VmRSS:");
        MemoryProbe.resetPeak();
        final long baseline = Math.max(before, MemoryProbe.status("VmHWM:"));
        if (mode.equals("unfused")) {
            try (Tensor logits = torch.linear(hidden, weight, bias); LossResult result = gspo.compute(LossInput.builder().logits(logits)
                    .targets(targets).mask(mask).oldLogProbs(old).advantages(advantages).build())) {
                result.loss().backward();
            }
        } else {
            try (LossResult result = gspo.compute(LossInput.builder().hiddenStates(hidden, weight, bias).logitsChunkBytes(BUDGET)
                    .targets(targets).mask(mask).oldLogProbs(old).advantages(advantages).build())) {
                if (mode.equals("linear-graph")) {
                    result.loss().backward();
                } else {
                    result.backward();
                }
            }
        }
        System.out.println("extra=" + (MemoryProbe.status("VmHWM:") - baseline));
        System.out.println("logits=" + (long) b * t * v * 2);
        System.out.println("budget=" + BUDGET);
        System.out.println("weightGrad=" + (long) v * h * 2);
    }
}
