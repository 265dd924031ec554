package dev.gspo4j.bench;

import dev.gspo4j.CompositeLoss;
import dev.gspo4j.LossInput;
import dev.gspo4j.LossResult;
import dev.gspo4j.PolicyLoss;
import dev.gspo4j.PolicyLossModuleTest;
import java.util.concurrent.TimeUnit;
import org.bytedeco.pytorch.BoolOptional;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorArrayRefOptional;
import org.bytedeco.pytorch.global.torch.ScalarType;
import org.openjdk.jmh.annotations.Benchmark;
import org.openjdk.jmh.annotations.BenchmarkMode;
import org.openjdk.jmh.annotations.Fork;
import org.openjdk.jmh.annotations.Measurement;
import org.openjdk.jmh.annotations.Mode;
import org.openjdk.jmh.annotations.OutputTimeUnit;
import org.openjdk.jmh.annotations.Warmup;

/**
 * Whole GSPO and GRPO losses, forward + backward into the logits: gspo4j ({@code result.backward()})
 * beside the libtorch composite (log_softmax + gather + the formulas of docs/math.md, autograd; bf16 logits
 * upcast to float32 first). Both allocate
 * the [N, V] gradient each time, as a training step does.
 */
@BenchmarkMode(Mode.SingleShotTime)
@OutputTimeUnit(TimeUnit.MILLISECONDS)
@Fork(value = 1, jvmArgsAppend = {"-Xmx2g", "-Dorg.bytedeco.javacpp.maxBytes=0", "-Dorg.bytedeco.javacpp.maxPhysicalBytes=0"})
@Warmup(iterations = 1, batchSize = 1)
@Measurement(iterations = 3, batchSize = 1)
public class PolicyLossBenchmark {
    static final PolicyLoss GSPO = PolicyLoss.gspo().build();
    static final PolicyLoss GRPO = PolicyLoss.grpo().build();

    /** Loss value; the gradient is in {@code w.logits.grad()}. */
    public static float fused(Workload w, PolicyLoss loss) {
        w.clearGradient();
        try (LossResult result = loss.compute(LossInput.builder().logits(w.logits).targets(w.targets).mask(w.mask)
                .oldLogProbs(w.old).advantages(w.advantages).build())) {
            result.backward();
            return result.lossValue().item_float();
        }
    }

    public static float composite(Workload w, PolicyLoss loss) {
        w.clearGradient();
        // bf16 logits are upcast first, as careful trainers do: log-probs near -12 have a resolution
        // of 0.06 in bf16, which moves ratios by 6%.
        try (Tensor z = w.logits.to(ScalarType.Float)) {
            final CompositeLoss.Output out = CompositeLoss.compute(PolicyLossModuleTest.settingsOf(loss), 1.0, z, w.targets, w.mask,
                    w.old, null, w.advantages, false);
            return backward(out);
        }
    }

    private static float backward(CompositeLoss.Output out) {
        try (Tensor value = out.loss(); Tensor lp = out.logProbs(); Tensor h = out.entropy()) {
            value.backward(new Tensor(), new BoolOptional(), false, new TensorArrayRefOptional());
            return value.item_float();
        }
    }

    @Benchmark
    public float fusedGspo(Workload w) {
        return fused(w, GSPO);
    }

    @Benchmark
    public float compositeGspo(Workload w) {
        return composite(w, GSPO);
    }

    @Benchmark
    public float fusedGrpo(Workload w) {
        return fused(w, GRPO);
    }

    @Benchmark
    public float compositeGrpo(Workload w) {
        return composite(w, GRPO);
    }
}
