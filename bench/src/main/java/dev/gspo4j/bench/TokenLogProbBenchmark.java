package dev.gspo4j.bench;

import dev.gspo4j.internal.Device;
import dev.gspo4j.internal.Kernels;
import dev.gspo4j.internal.Tensors;
import java.util.concurrent.TimeUnit;
import org.bytedeco.pytorch.BoolOptional;
import org.bytedeco.pytorch.NoGradGuard;
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
 * Per-token log-probs: the fused kernels (warm output buffers) beside log_softmax + gather in
 * libtorch (bf16 logits upcast to float32 first, as careful trainers do), forward alone and forward +
 * backward (gradient of sum(lp * g) into the logits).
 */
@BenchmarkMode(Mode.SingleShotTime)
@OutputTimeUnit(TimeUnit.MILLISECONDS)
@Fork(value = 1, jvmArgsAppend = {"-Xmx2g", "-Dorg.bytedeco.javacpp.maxBytes=0", "-Dorg.bytedeco.javacpp.maxPhysicalBytes=0"})
@Warmup(iterations = 1, batchSize = 1)
@Measurement(iterations = 3, batchSize = 1)
public class TokenLogProbBenchmark {

    /** Log-probs into the workload's warm buffer. */
    public static Tensor fusedForward(Workload w) {
        Kernels.tokenLogProbForward(Device.CPU, null, w.view(), Tensors.longs(w.targets), 1.0, true, Tensors.floats(w.logProbs),
                Tensors.doubles(w.lse), Tensors.floats(w.entropy));
        return w.logProbs;
    }

    public static Tensor compositeForward(Workload w) {
        try (NoGradGuard noGrad = new NoGradGuard(); Tensor z = w.logits.to(ScalarType.Float); Tensor lsm = z.log_softmax(-1);
                Tensor index = w.targets.unsqueeze(-1);
                Tensor gathered = lsm.gather(-1, index)) {
            return gathered.squeeze(-1);
        }
    }

    /** The gradient of sum(lp * g) into the workload's warm gradient buffer. */
    public static Tensor fusedForwardBackward(Workload w) {
        fusedForward(w);
        Kernels.tokenLogProbBackward(Device.CPU, null, w.view(), Tensors.longs(w.targets), 1.0, Tensors.doubles(w.lse), null,
                Tensors.floats(w.upstream), null, w.gradient.data_ptr(), (long) (w.rows / Workload.RESPONSES) * w.vocab, w.vocab);
        return w.gradient;
    }

    public static Tensor compositeForwardBackward(Workload w) {
        w.clearGradient();
        try (Tensor z = w.logits.to(ScalarType.Float); Tensor lsm = z.log_softmax(-1); Tensor index = w.targets.unsqueeze(-1);
                Tensor gathered = lsm.gather(-1, index);
                Tensor lp = gathered.squeeze(-1); Tensor weighted = lp.mul(w.upstream); Tensor total = weighted.sum()) {
            total.backward(new Tensor(), new BoolOptional(), false, new TensorArrayRefOptional());
        }
        return w.logits.grad();
    }

    @Benchmark
    public long fusedForward_(Workload w) {
        return fusedForward(w).numel();
    }

    @Benchmark
    public long compositeForward_(Workload w) {
        try (Tensor lp = compositeForward(w)) {
            return lp.numel();
        }
    }

    @Benchmark
    public long fusedForwardBackward_(Workload w) {
        return fusedForwardBackward(w).numel();
    }

    @Benchmark
    public long compositeForwardBackward_(Workload w) {
        try (Tensor g = compositeForwardBackward(w)) {
            return g.numel();
        }
    }
}
