package dev.gspo4j.bench;

import dev.gspo4j.Gspo4j;
import dev.gspo4j.LossInput;
import dev.gspo4j.LossResult;
import dev.gspo4j.PolicyLoss;
import java.util.concurrent.TimeUnit;
import org.bytedeco.pytorch.BoolOptional;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorArrayRefOptional;
import org.openjdk.jmh.annotations.Benchmark;
import org.openjdk.jmh.annotations.BenchmarkMode;
import org.openjdk.jmh.annotations.Fork;
import org.openjdk.jmh.annotations.Level;
import org.openjdk.jmh.annotations.Measurement;
import org.openjdk.jmh.annotations.Mode;
import org.openjdk.jmh.annotations.OutputTimeUnit;
import org.openjdk.jmh.annotations.Scope;
import org.openjdk.jmh.annotations.Setup;
import org.openjdk.jmh.annotations.State;
import org.openjdk.jmh.annotations.TearDown;
import org.openjdk.jmh.annotations.Warmup;

/**
 * A whole GSPO step (compute + backward into the logits) in steady state, against its floor, the
 * fused forward and backward kernels alone into warm buffers ({@code kernels}):
 * <ul>
 *   <li>{@code fresh}: the gradient pool off, a fresh [N, V] gradient each step (0.1's behaviour);
 *   <li>{@code pooled}: the default, the gradient in memory reused from the previous step;
 *   <li>{@code pooledGraph}: the same through {@code loss().backward()};
 *   <li>{@code inPlace}: {@code inPlaceBackward(true)}, the gradient over the logits. The logits are
 *       then the output of an op ({@code clone} of the leaf, made outside the measurement), as an
 *       lm_head's are; the clone's backward hands the gradient to the leaf as it is.
 * </ul>
 * Each step also clears the leaf's gradient, as {@code zero_grad(set_to_none)} does.
 */
@BenchmarkMode(Mode.SingleShotTime)
@OutputTimeUnit(TimeUnit.MILLISECONDS)
@Fork(value = 1, jvmArgsAppend = {"-Xmx2g", "-Dorg.bytedeco.javacpp.maxBytes=0", "-Dorg.bytedeco.javacpp.maxPhysicalBytes=0"})
@Warmup(iterations = 2, batchSize = 1)
@Measurement(iterations = 5, batchSize = 1)
public class StepBenchmark {
    static final PolicyLoss GSPO = PolicyLoss.gspo().build();
    static final PolicyLoss GSPO_IN_PLACE = PolicyLoss.gspo().inPlaceBackward(true).build();

    /** Logits made by an op from the workload's leaf, for the in-place step (outside the timing). */
    @State(Scope.Thread)
    public static class OpLogits {
        Tensor logits;

        @Setup(Level.Invocation)
        public void make(Workload w) {
            w.clearGradient();
            logits = w.logits.clone();
        }

        @TearDown(Level.Invocation)
        public void drop(Workload w) {
            logits.close();
            w.clearGradient();
        }
    }

    static LossInput input(Workload w, Tensor logits) {
        return LossInput.builder().logits(logits).targets(w.targets).mask(w.mask).oldLogProbs(w.old).advantages(w.advantages).build();
    }

    /** One step: compute and the direct backward, or loss().backward(). */
    public static float step(Workload w, Tensor logits, PolicyLoss loss, boolean graph) {
        try (LossResult result = loss.compute(input(w, logits))) {
            if (graph) {
                try (Tensor l = result.loss()) {
                    l.backward(new Tensor(), new BoolOptional(false), false, new TensorArrayRefOptional());
                }
            } else {
                result.backward();
            }
            return result.lossValue().item_float();
        }
    }

    @Benchmark
    public long kernels(Workload w) {
        return TokenLogProbBenchmark.fusedForwardBackward(w).numel();
    }

    @Benchmark
    public float fresh(Workload w) {
        final long limit = Gspo4j.gradientPoolLimit();
        Gspo4j.setGradientPoolLimit(0);
        try {
            w.clearGradient();
            return step(w, w.logits, GSPO, false);
        } finally {
            w.clearGradient();
            Gspo4j.setGradientPoolLimit(limit);
        }
    }

    @Benchmark
    public float pooled(Workload w) {
        w.clearGradient();
        final float v = step(w, w.logits, GSPO, false);
        w.clearGradient();
        return v;
    }

    @Benchmark
    public float pooledGraph(Workload w) {
        w.clearGradient();
        final float v = step(w, w.logits, GSPO, true);
        w.clearGradient();
        return v;
    }

    @Benchmark
    public float inPlace(Workload w, OpLogits op) {
        return step(w, op.logits, GSPO_IN_PLACE, false);
    }
}
