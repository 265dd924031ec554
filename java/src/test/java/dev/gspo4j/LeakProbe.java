package dev.gspo4j;

import java.nio.file.Files;
import java.nio.file.Path;
import org.bytedeco.pytorch.Scalar;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorOptions;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * Run in a child JVM by {@link LeakTest}: loss forward + backward in a loop, both backward paths
 * and several modules, printing the resident memory after a warm-up and at the end. For hunting a
 * leak by hand: {@code -Dleak.mode=graph|direct|build} runs one path only, {@code -Dleak.trace}
 * prints the resident memory every 2,000 iterations.
 */
public final class LeakProbe {
    public static void main(String[] args) throws Exception {
        final int iterations = Integer.parseInt(args[0]);
        final int warmUp = iterations / 10;
        final PolicyLoss[] losses = {PolicyLoss.gspo().build(), PolicyLoss.grpo().kl(0.05, KlEstimator.K3).entropyCoefficient(0.01).build(),
            PolicyLoss.gspoToken().build(), PolicyLoss.ppo().dualClip(3).build()};
        torch.manual_seed(5);
        final int b = 4, t = 64, v = 1000;
        long afterWarmUp = 0;
        for (int i = 0; i < iterations; i++) {
            if (i == warmUp) {
                System.gc();
                afterWarmUp = rss();
            }
            if (i % 2000 == 0 && System.getProperty("leak.trace") != null) {
                System.out.println("trace " + i + " rss " + rss() / 1000000 + " MB");
            }
            final PolicyLoss loss = losses[i % losses.length];
            final boolean tokenAdvantages = i % losses.length == 2;
            // Every intermediate closed: a wrapper left to the garbage collector holds native
            // memory until a GC, which would read as a leak here.
            try (Tensor base = torch.randn(b, t, v); Tensor logits = base.to(ScalarType.BFloat16);
                    Tensor targets = torch.randint(v, new long[] {b, t}, new TensorOptions(ScalarType.Long));
                    Tensor noise = torch.randn(b, t); Tensor scaled = noise.mul(new Scalar(0.1)); Tensor old = scaled.sub(new Scalar(7.0));
                    Tensor refNoise = torch.randn(b, t); Tensor ref = refNoise.sub(new Scalar(7.0));
                    Tensor adv = tokenAdvantages ? torch.randn(b, t) : torch.randn(b);
                    Tensor mask = torch.ones(b, t);
                    Tensor requiresGrad = logits.set_requires_grad(true);
                    LossResult result = loss.compute(tokenAdvantages
                            ? LossInput.builder().logits(logits).targets(targets).mask(mask).oldLogProbs(old).refLogProbs(ref).tokenAdvantages(adv).build()
                            : LossInput.builder().logits(logits).targets(targets).mask(mask).oldLogProbs(old).refLogProbs(ref).advantages(adv).build())) {
                final String mode = System.getProperty("leak.mode", "both");
                if (mode.equals("build")) {
                    result.loss();
                } else if (mode.equals("graph") || (mode.equals("both") && i % 2 == 0)) {
                    result.loss().backward();
                } else {
                    result.backward();
                }
                result.metrics().clipFractionHigh();
                try (Tensor grad = logits.mutable_grad()) {
                    grad.reset();
                }
            }
        }
        System.gc();
        Thread.sleep(500);
        System.out.println("warmup=" + afterWarmUp);
        System.out.println("end=" + rss());
        System.out.println("liveGraphs=" + dev.gspo4j.internal.FusedLogProbs.liveGraphs());
    }

    static long rss() throws Exception {
        for (String line : Files.readAllLines(Path.of("/proc/self/status"))) {
            if (line.startsWith("VmRSS:")) {
                return Long.parseLong(line.replaceAll("[^0-9]", "")) * 1024;
            }
        }
        throw new IllegalStateException("no VmRSS");
    }
}
