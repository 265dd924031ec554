package dev.gspo4j.bench;

import dev.gspo4j.CompositeLoss;
import dev.gspo4j.LossInput;
import dev.gspo4j.LossResult;
import dev.gspo4j.PolicyLoss;
import dev.gspo4j.PolicyLossModuleTest;
import java.util.concurrent.TimeUnit;
import org.bytedeco.javacpp.PointerScope;
import org.bytedeco.pytorch.BoolOptional;
import org.bytedeco.pytorch.Scalar;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorArrayRefOptional;
import org.bytedeco.pytorch.TensorOptions;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;
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
 * Per-call overhead: a GSPO step on tiny inputs (B = 2, T = 4, V = 16, fp32), where the kernels
 * cost next to nothing and what is measured is the Java layer, the JNI crossings and libtorch's
 * per-op cost: the direct path ({@code result.backward()}), {@code loss().backward()}, and the
 * libtorch composite (log_softmax + gather + the SPEC formulas, autograd) on the same inputs.
 */
@BenchmarkMode(Mode.AverageTime)
@OutputTimeUnit(TimeUnit.MICROSECONDS)
@Fork(value = 1, jvmArgsAppend = {"-Xmx1g", "-Dorg.bytedeco.javacpp.maxBytes=0", "-Dorg.bytedeco.javacpp.maxPhysicalBytes=0"})
@Warmup(iterations = 3, time = 1)
@Measurement(iterations = 5, time = 1)
public class TinyCallBenchmark {
    static final PolicyLoss GSPO = PolicyLoss.gspo().build();

    @State(Scope.Thread)
    public static class Tiny {
        Tensor logits;
        Tensor targets;
        Tensor mask;
        Tensor old;
        Tensor advantages;
        LossInput input;

        @Setup(Level.Trial)
        public void setUp() {
            torch.set_num_threads(1);
            torch.manual_seed(3);
            try (Tensor z = torch.randn(2, 4, 16)) {
                logits = z.detach().set_requires_grad(true);
            }
            targets = torch.randint(16, new long[] {2, 4}, new TensorOptions(ScalarType.Long));
            mask = torch.ones(2, 4);
            try (Tensor n = torch.randn(2, 4); Tensor s = n.mul(new Scalar(0.01))) {
                old = s.add(new Scalar(-Math.log(16)));
            }
            advantages = torch.randn(2);
            input = LossInput.builder().logits(logits).targets(targets).mask(mask).oldLogProbs(old).advantages(advantages).build();
        }

        void clear() {
            try (Tensor g = logits.mutable_grad()) {
                g.reset();
            }
        }

        @TearDown(Level.Trial)
        public void tearDown() {
            for (Tensor t : new Tensor[] {logits, targets, mask, old, advantages}) {
                t.close();
            }
        }
    }

    @Benchmark
    public float direct(Tiny t) {
        t.clear();
        try (LossResult r = GSPO.compute(t.input)) {
            r.backward();
            return r.lossValue().item_float();
        }
    }

    @Benchmark
    public float graph(Tiny t) {
        t.clear();
        try (LossResult r = GSPO.compute(t.input); Tensor l = r.loss()) {
            l.backward(new Tensor(), new BoolOptional(false), false, new TensorArrayRefOptional());
            return r.lossValue().item_float();
        }
    }

    @Benchmark
    public float composite(Tiny t) {
        t.clear();
        // A PointerScope frees the composite's temporaries at once, as a careful Java user would.
        try (PointerScope scope = new PointerScope()) {
            final CompositeLoss.Output out = CompositeLoss.compute(PolicyLossModuleTest.settingsOf(GSPO), 1.0, t.logits, t.targets,
                    t.mask, t.old, null, t.advantages, false);
            final Tensor value = out.loss();
            value.backward(new Tensor(), new BoolOptional(), false, new TensorArrayRefOptional());
            return value.item_float();
        }
    }
}
