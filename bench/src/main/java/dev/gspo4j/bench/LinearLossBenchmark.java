package dev.gspo4j.bench;

import dev.gspo4j.CompositeLoss;
import dev.gspo4j.Gspo4j;
import dev.gspo4j.LossInput;
import dev.gspo4j.LossResult;
import dev.gspo4j.PolicyLoss;
import dev.gspo4j.PolicyLossModuleTest;
import dev.gspo4j.internal.Tensors;
import java.util.concurrent.TimeUnit;
import org.bytedeco.javacpp.PointerScope;
import org.bytedeco.openblas.global.openblas_nolapack;
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
import org.openjdk.jmh.annotations.Param;
import org.openjdk.jmh.annotations.Scope;
import org.openjdk.jmh.annotations.Setup;
import org.openjdk.jmh.annotations.State;
import org.openjdk.jmh.annotations.TearDown;
import org.openjdk.jmh.annotations.Warmup;

/**
 * A GSPO step from hidden states through an lm_head (no bias, as Qwen's), forward + backward into
 * the hidden states and the weight, three ways in the same run: the fused linear path
 * ({@code hiddenStates}, logits one chunk at a time), the unfused path (the lm_head's logits, then
 * {@code compute} and its backward through the lm_head), and the libtorch composite over the same
 * logits (bf16 upcast to float32). Beside them the GEMM floor: the three products every path
 * needs ({@code h W^T}, {@code g W}, {@code g^T h}) into warm buffers.
 */
@BenchmarkMode(Mode.SingleShotTime)
@OutputTimeUnit(TimeUnit.MILLISECONDS)
@Fork(value = 1, jvmArgsAppend = {"-Xmx2g", "-Dorg.bytedeco.javacpp.maxBytes=0", "-Dorg.bytedeco.javacpp.maxPhysicalBytes=0"})
@Warmup(iterations = 1, batchSize = 1)
@Measurement(iterations = 3, batchSize = 1)
public class LinearLossBenchmark {
    static final PolicyLoss GSPO = PolicyLoss.gspo().build();
    /** The fused path's chunk budget: {@code -Dgspo4j.bench.chunkBytes}, default the library's. */
    static final long CHUNK_BYTES = Long.getLong("gspo4j.bench.chunkBytes", LossInput.DEFAULT_LOGITS_CHUNK_BYTES);

    /** Hidden states [8, N / 8, H], an lm_head [V, H] (leaves requiring grad) and the rollout. */
    @State(Scope.Benchmark)
    public static class Head {
        @Param({"2048x896x32000"})
        public String shape;

        @Param({"float32", "bfloat16"})
        public String dtype;

        public int rows;
        public int width;
        public int vocab;
        public ScalarType type;
        public Tensor hidden;
        public Tensor weight;
        public Tensor targets;
        public Tensor mask;
        public Tensor old;
        public Tensor advantages;
        // The GEMM floor's warm buffers (allocated by floor() on first use: [N, V] each).
        Tensor logitsBuffer;
        Tensor gradBuffer;
        Tensor gradHidden;
        Tensor gradWeight;

        public Head() {}

        public Head(String shape, String dtype) {
            this.shape = shape;
            this.dtype = dtype;
        }

        @Setup(Level.Trial)
        public void setUp() {
            torch.set_num_threads(Workload.threads());
            openblas_nolapack.blas_set_num_threads(Workload.threads());
            Gspo4j.setThreads(Math.min(Workload.threads(), Gspo4j.MAX_THREADS));
            final String[] parts = shape.split("x");
            rows = Integer.parseInt(parts[0]);
            width = Integer.parseInt(parts[1]);
            vocab = Integer.parseInt(parts[2]);
            type = dtype.equals("bfloat16") ? ScalarType.BFloat16 : ScalarType.Float;
            final int t = rows / Workload.RESPONSES;
            torch.manual_seed(11);
            try (Tensor h = torch.randn(Workload.RESPONSES, t, width); Tensor w = torch.randn(vocab, width);
                    Scalar scale = new Scalar(2.0 / Math.sqrt(width)); Tensor ws = w.mul(scale); Tensor hc = h.to(type);
                    Tensor wc = ws.to(type)) {
                hidden = hc.detach().set_requires_grad(true);
                weight = wc.detach().set_requires_grad(true);
            }
            targets = torch.randint(vocab, new long[] {Workload.RESPONSES, t}, new TensorOptions(ScalarType.Long));
            mask = torch.ones(Workload.RESPONSES, t);
            try (Tensor noise = torch.randn(Workload.RESPONSES, t); Scalar s = new Scalar(2e-3); Tensor small = noise.mul(s);
                    Scalar shift = new Scalar(-Math.log(vocab) - 2.0)) {
                old = small.add(shift);
            }
            advantages = torch.randn(Workload.RESPONSES);
        }

        void clearGradients() {
            for (Tensor t : new Tensor[] {hidden, weight}) {
                try (Tensor g = t.mutable_grad()) {
                    g.reset();
                }
            }
        }

        LossInput.Builder rollout(LossInput.Builder b) {
            return b.targets(targets).mask(mask).oldLogProbs(old).advantages(advantages);
        }

        @TearDown(Level.Trial)
        public void tearDown() {
            for (Tensor t : new Tensor[] {hidden, weight, targets, mask, old, advantages, logitsBuffer, gradBuffer, gradHidden,
                gradWeight}) {
                if (t != null) {
                    t.close();
                }
            }
        }
    }

    /** The fused linear path; the gradients are in {@code hidden.grad()} and {@code weight.grad()}. */
    public static float fusedLinear(Head w) {
        w.clearGradients();
        try (LossResult result = GSPO.compute(w.rollout(LossInput.builder().hiddenStates(w.hidden, w.weight, null)
                .logitsChunkBytes(CHUNK_BYTES)).build())) {
            result.loss().backward();
            return result.lossValue().item_float();
        }
    }

    /** The lm_head's logits, gspo4j's loss over them, the backward through the lm_head. */
    public static float unfused(Head w) {
        w.clearGradients();
        try (Tensor logits = torch.linear(w.hidden, w.weight);
                LossResult result = GSPO.compute(w.rollout(LossInput.builder().logits(logits)).build())) {
            result.loss().backward();
            return result.lossValue().item_float();
        }
    }

    /** The lm_head's logits and the libtorch composite loss (bf16 upcast to float32), autograd. */
    public static float composite(Head w) {
        w.clearGradients();
        // A PointerScope frees the composite's temporaries ([N, V] each) at once, as a careful Java
        // user would; left to the GC they pile up over iterations (the JMH fork was killed for
        // memory at V = 151936).
        try (PointerScope scope = new PointerScope(); Tensor logits = torch.linear(w.hidden, w.weight);
                Tensor z = logits.to(ScalarType.Float)) {
            final CompositeLoss.Output out = CompositeLoss.compute(PolicyLossModuleTest.settingsOf(GSPO), 1.0, z, w.targets, w.mask,
                    w.old, null, w.advantages, false);
            try (Tensor value = out.loss(); Tensor lp = out.logProbs(); Tensor h = out.entropy()) {
                value.backward(new Tensor(), new BoolOptional(), false, new TensorArrayRefOptional());
                return value.item_float();
            }
        }
    }

    /** The three GEMMs of any path, {@code h W^T}, {@code g W}, {@code g^T h}, into warm buffers. */
    public static long gemmFloor(Head w) {
        if (w.logitsBuffer == null) {
            w.logitsBuffer = Tensors.empty(new long[] {w.rows, w.vocab}, w.type, w.weight);
            w.gradBuffer = Tensors.empty(new long[] {w.rows, w.vocab}, w.type, w.weight);
            w.gradBuffer.zero_();
            w.gradHidden = Tensors.empty(new long[] {w.rows, w.width}, w.type, w.weight);
            w.gradWeight = Tensors.empty(new long[] {w.vocab, w.width}, w.type, w.weight);
            w.logitsBuffer.zero_();
            w.gradHidden.zero_();
            w.gradWeight.zero_();
        }
        try (Tensor h3 = w.hidden.detach(); Tensor h = h3.reshape(w.rows, w.width); Tensor wd = w.weight.detach(); Tensor wt = wd.t();
                Tensor gt = w.gradBuffer.t()) {
            torch.mm_out(w.logitsBuffer, h, wt);
            torch.mm_out(w.gradHidden, w.gradBuffer, wd);
            torch.mm_out(w.gradWeight, gt, h);
        }
        return w.logitsBuffer.numel();
    }

    @Benchmark
    public float fusedLinear_(Head w) {
        return fusedLinear(w);
    }

    @Benchmark
    public float unfused_(Head w) {
        return unfused(w);
    }

    @Benchmark
    public float composite_(Head w) {
        return composite(w);
    }

    @Benchmark
    public long gemmFloor_(Head w) {
        return gemmFloor(w);
    }
}
