package dev.gspo4j;

import dev.gspo4j.internal.Device;
import dev.gspo4j.internal.Kernels;
import dev.gspo4j.internal.LogitsDtype;
import dev.gspo4j.internal.LogitsView;
import dev.gspo4j.internal.Tensors;
import org.bytedeco.javacpp.LongPointer;
import org.bytedeco.javacpp.Pointer;
import org.bytedeco.pytorch.T_TensorTensor_T;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * Per-token log-probs of the targets without a loss: for scoring the old (rollout) and reference
 * policies, whose log-probs a loss call then takes as {@link LossInput.Builder#oldLogProbs} and
 * {@link LossInput.Builder#refLogProbs}. The same fused forward kernel as the loss (one read of
 * the logits, no log-softmax materialised), so the numbers are bitwise those a loss call with the
 * same logits and temperature reports in {@link LossResult#logProbs()}.
 *
 * <p>Logits {@code [B, T, V]} with targets {@code [B, T]}, or {@code [N, V]} with targets {@code
 * [N]}; float32, bfloat16 or float16 logits on the CPU or a CUDA device, read in place when their
 * last dimension is contiguous. Checked like a loss input: shapes, dtypes, devices, token ids in
 * [0, V) ({@link IllegalArgumentException}), NaN/+Inf or no finite entry in a logits row ({@link
 * NonFiniteDataException}). A target whose logit is -Inf gets log-prob -Inf (probability 0; the
 * loss refuses such a token only where it is counted). The results are new float32 tensors of the
 * targets' shape on the logits' device, detached whatever the grad mode (no graph is built); they
 * belong to the caller, like the result of a libtorch op.
 */
public final class TokenLogProbs implements AutoCloseable {
    private final Tensor logProbs;
    private final Tensor entropy;

    private TokenLogProbs(Tensor logProbs, Tensor entropy) {
        this.logProbs = logProbs;
        this.entropy = entropy;
    }

    /**
     * Log-probs at temperature 1.
     *
     * @param logits {@code [B, T, V]} (padded) or {@code [N, V]} (packed), float32, bfloat16 or
     *     float16, on the CPU or a CUDA device; read in place when the last dimension is contiguous
     * @param targets {@code [B, T]} or {@code [N]}, int64 (or another integer dtype), ids in
     *     {@code [0, V)}, on the logits' device
     * @return float32 log-probs of the targets' shape on the logits' device, owned by the caller
     */
    public static Tensor compute(Tensor logits, Tensor targets) {
        return compute(logits, targets, 1.0);
    }

    /**
     * Log-probs of softmax(logits / temperature) at the targets.
     *
     * @param logits {@code [B, T, V]} (padded) or {@code [N, V]} (packed), float32, bfloat16 or
     *     float16, on the CPU or a CUDA device; read in place when the last dimension is contiguous
     * @param targets {@code [B, T]} or {@code [N]}, int64 (or another integer dtype), ids in
     *     {@code [0, V)}, on the logits' device
     * @param temperature in [1e-4, 1e4], as {@link PolicyLoss.Builder#temperature}
     * @return float32 log-probs of the targets' shape on the logits' device, owned by the caller
     */
    public static Tensor compute(Tensor logits, Tensor targets, double temperature) {
        return run(logits, targets, temperature, false).logProbs;
    }

    /**
     * Log-probs and the per-token entropy of softmax(logits / temperature), in one read of the logits.
     *
     * @param logits {@code [B, T, V]} (padded) or {@code [N, V]} (packed), float32, bfloat16 or
     *     float16, on the CPU or a CUDA device; read in place when the last dimension is contiguous
     * @param targets {@code [B, T]} or {@code [N]}, int64 (or another integer dtype), ids in
     *     {@code [0, V)}, on the logits' device
     * @param temperature in [1e-4, 1e4], as {@link PolicyLoss.Builder#temperature}
     * @return both, owned by the caller (close it)
     */
    public static TokenLogProbs computeWithEntropy(Tensor logits, Tensor targets, double temperature) {
        return run(logits, targets, temperature, true);
    }

    /** @return the log-probs: float32, the targets' shape, on the logits' device */
    public Tensor logProbs() {
        return logProbs;
    }

    /** @return the entropy: float32, the targets' shape, on the logits' device */
    public Tensor entropy() {
        return entropy;
    }

    /** Closes both tensors (clone what must outlive this object). */
    @Override
    public void close() {
        logProbs.close();
        if (entropy != null) {
            entropy.close();
        }
    }

    private static TokenLogProbs run(Tensor logits, Tensor targets, double temperature, boolean withEntropy) {
        if (!(temperature >= 1e-4 && temperature <= 1e4)) {
            throw new IllegalArgumentException("temperature must be in [1e-4, 1e4], got " + temperature);
        }
        TensorArgs.requireOpen(logits, "logits");
        TensorArgs.requireOpen(targets, "targets");
        TensorArgs.requireReadable(logits, "logits");
        CudaChecks.beforeCall(CudaChecks.deviceOf(logits));
        TensorArgs.requireNoLazyBits(logits, "logits");
        final LogitsDtype dtype = Tensors.logitsDtype(logits.scalar_type());
        if (dtype == null) {
            throw new IllegalArgumentException("logits must be float32, bfloat16 or float16, got " + PreparedInput.typeName(logits));
        }
        if (logits.is_cuda() && Kernels.cudaDeviceCount() == 0) {
            throw new IllegalArgumentException("logits are on " + PreparedInput.deviceName(logits)
                    + "; this gspo4j library runs on cpu only (built without CUDA kernels)");
        }
        if (logits.dim() != 2 && logits.dim() != 3) {
            throw new IllegalArgumentException("logits must be [B, T, V] or [N, V], got shape " + PreparedInput.shapeOf(logits));
        }
        final boolean padded = logits.dim() == 3;
        final long vocab = logits.size(logits.dim() - 1);
        if (vocab < 1) {
            throw new IllegalArgumentException("the vocabulary (last logits dimension) must not be empty, got shape "
                    + PreparedInput.shapeOf(logits));
        }
        if (vocab > 1 && logits.stride(logits.dim() - 1) != 1) {
            throw new IllegalArgumentException("logits rows must be contiguous (stride(-1) = 1), got stride(-1) = "
                    + logits.stride(logits.dim() - 1) + "; logits.contiguous() makes a copy the kernels can read");
        }
        final long[] tokenShape = padded ? new long[] {logits.size(0), logits.size(1)} : new long[] {logits.size(0)};
        final long rows = padded ? tokenShape[0] * tokenShape[1] : tokenShape[0];
        final LogitsView view = padded
                ? new LogitsView(logits.data_ptr(), dtype, tokenShape[0], tokenShape[1], vocab, logits.stride(0), logits.stride(1))
                : new LogitsView(logits.data_ptr(), dtype, 1, rows, vocab, 0, logits.stride(0));
        PreparedInput.requireSameDevice(targets, "targets", logits);
        if (!torch.isIntegralType(targets.scalar_type(), false)) {
            throw new IllegalArgumentException("targets must be an integer tensor (int64 or int32), got "
                    + PreparedInput.typeName(targets));
        }
        PreparedInput.requireShape(targets, tokenShape, "targets");
        final Tensor ids;
        try (Tensor resolved = TensorArgs.resolved(targets); Tensor typed = resolved.to(ScalarType.Long)) {
            ids = typed.contiguous();
        }
        Tensor logProbs = null;
        Tensor entropy = null;
        final Tensor lse = Tensors.empty(new long[] {rows}, ScalarType.Double, logits);
        try {
            final DataErrors errors = new DataErrors(padded ? tokenShape[1] : 0, "").temperature(temperature)
                    .targets(ids, null, vocab);
            if (rows > 0 && !Tensors.isCuda(logits)) {
                requireIds(ids, rows, vocab, errors);
            }
            logProbs = Tensors.empty(tokenShape, ScalarType.Float, logits);
            entropy = withEntropy ? Tensors.empty(tokenShape, ScalarType.Float, logits) : null;
            final Device device = Tensors.device(logits);
            final Pointer stream = Tensors.stream(logits);
            final Tensor lp = logProbs;
            final Tensor h = entropy;
            errors.run(() -> Kernels.tokenLogProbForward(device, stream, view, Tensors.longs(ids), temperature, true,
                    Tensors.floats(lp), Tensors.doubles(lse), Tensors.floats(h)));
            // On a GPU the kernel checks ids and finiteness as it reads: reported at the next gspo4j
            // call on the device (now, in strict mode).
            CudaChecks.afterKernels(CudaChecks.deviceOf(logits), stream, errors, null, null);
            return new TokenLogProbs(logProbs, entropy);
        } catch (RuntimeException | Error e) {
            for (Tensor t : new Tensor[] {logProbs, entropy}) {
                if (t != null) {
                    t.close();
                }
            }
            throw e;
        } finally {
            lse.close();
            ids.close();
        }
    }

    // The CPU pre-check of the ids, as the loss's: one aminmax pass, the first bad id named.
    private static void requireIds(Tensor ids, long rows, long vocab, DataErrors errors) {
        final long min;
        final long max;
        try (T_TensorTensor_T range = ids.aminmax(); Tensor lo = range.get0(); Tensor hi = range.get1()) {
            min = lo.item_long();
            max = hi.item_long();
        }
        if (min >= 0 && max < vocab) {
            return;
        }
        final LongPointer values = Tensors.longs(ids);
        for (long i = 0; i < rows; i++) {
            final long id = values.get(i);
            if (id < 0 || id >= vocab) {
                throw new IllegalArgumentException(errors.targetMessage(i, id, false));
            }
        }
    }
}
