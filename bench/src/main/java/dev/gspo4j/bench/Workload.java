package dev.gspo4j.bench;

import dev.gspo4j.Gspo4j;
import dev.gspo4j.internal.LogitsDtype;
import dev.gspo4j.internal.LogitsView;
import dev.gspo4j.internal.Tensors;
import org.bytedeco.openblas.global.openblas_nolapack;
import org.bytedeco.pytorch.Scalar;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorOptions;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;
import org.openjdk.jmh.annotations.Level;
import org.openjdk.jmh.annotations.Param;
import org.openjdk.jmh.annotations.Scope;
import org.openjdk.jmh.annotations.Setup;
import org.openjdk.jmh.annotations.State;
import org.openjdk.jmh.annotations.TearDown;

/** One batch of logits (N = 8 responses x T tokens, V) and everything the benchmarks read. */
@State(Scope.Benchmark)
public class Workload {
    @Param({"2048x32000", "4096x151936"})
    public String shape;

    @Param({"float32", "bfloat16"})
    public String dtype;

    public static final int RESPONSES = 8;
    public int rows;
    public int vocab;
    public ScalarType type;
    public Tensor logits;      // [8, T, V], a leaf requiring grad
    public Tensor targets;     // [8, T] int64
    public Tensor mask;        // [8, T] ones
    public Tensor old;         // [8, T] old log-probs near the current ones
    public Tensor advantages;  // [8]
    // Warm buffers of the kernel-level benchmarks.
    public Tensor logProbs;
    public Tensor lse;
    public Tensor entropy;
    public Tensor upstream;    // dLoss/dlp
    public Tensor gradient;    // [8, T, V] in the logits' dtype

    public Workload() {}

    public Workload(String shape, String dtype) {
        this.shape = shape;
        this.dtype = dtype;
    }

    /**
     * Threads of both pools for a benchmark run: {@code OMP_NUM_THREADS} when set, else every
     * available processor. The composite rows are large libtorch ops that scale with threads, and
     * gspo4j's kernels the same; the two pools never compute at once here, so they do not
     * oversubscribe the CPUs. Set explicitly, so a run does not depend on libtorch's default
     * (physical cores) or on which pool was initialised first.
     */
    static int threads() {
        final String env = System.getenv("OMP_NUM_THREADS");
        if (env != null && env.trim().matches("[0-9]+") && Integer.parseInt(env.trim()) > 0) {
            return Integer.parseInt(env.trim());
        }
        return Runtime.getRuntime().availableProcessors();
    }

    @Setup(Level.Trial)
    public void setUp() {
        torch.set_num_threads(threads());
        openblas_nolapack.blas_set_num_threads(threads()); // libtorch's BLAS has its own pool
        Gspo4j.setThreads(Math.min(threads(), Gspo4j.MAX_THREADS));
        final String[] parts = shape.split("x");
        rows = Integer.parseInt(parts[0]);
        vocab = Integer.parseInt(parts[1]);
        type = dtype.equals("bfloat16") ? ScalarType.BFloat16 : ScalarType.Float;
        final int t = rows / RESPONSES;
        torch.manual_seed(11);
        try (Tensor base = torch.randn(RESPONSES, t, vocab); Tensor scaled = base.mul(new Scalar(2.0)); Tensor cast = scaled.to(type)) {
            logits = cast.detach().set_requires_grad(true);
        }
        targets = torch.randint(vocab, new long[] {RESPONSES, t}, new TensorOptions(ScalarType.Long));
        mask = torch.ones(RESPONSES, t);
        try (Tensor noise = torch.randn(RESPONSES, t); Tensor small = noise.mul(new Scalar(2e-3))) {
            // Old log-probs about log(1/V): sequence ratios straddle GSPO's clip range.
            old = small.add(new Scalar(-Math.log(vocab) - 2.0));
        }
        advantages = torch.randn(RESPONSES);
        logProbs = torch.empty(RESPONSES, t);
        lse = Tensors.empty(new long[] {rows}, ScalarType.Double, logProbs);
        entropy = torch.empty(RESPONSES, t);
        upstream = torch.full(new long[] {RESPONSES, t}, new Scalar(1.0 / rows));
        gradient = Tensors.empty(new long[] {RESPONSES, t, vocab}, type, logits);
        gradient.zero_(); // first touch outside the measurement
    }

    public LogitsView view() {
        return LogitsView.padded(logits.data_ptr(), type == ScalarType.BFloat16 ? LogitsDtype.BFLOAT16 : LogitsDtype.FLOAT32,
                RESPONSES, rows / RESPONSES, vocab);
    }

    /** Bytes of one pass over the logits. */
    public long bytes() {
        return (long) rows * vocab * (type == ScalarType.BFloat16 ? 2 : 4);
    }

    /** Clears the logits' gradient between invocations (no accumulation into the next). */
    public void clearGradient() {
        try (Tensor g = logits.mutable_grad()) {
            g.reset();
        }
    }

    @TearDown(Level.Trial)
    public void tearDown() {
        for (Tensor tensor : new Tensor[] {logits, targets, mask, old, advantages, logProbs, lse, entropy, upstream, gradient}) {
            if (tensor != null) {
                tensor.close();
            }
        }
    }
}
