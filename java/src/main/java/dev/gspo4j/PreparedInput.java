package dev.gspo4j;

import dev.gspo4j.internal.DeferredChecks;
import dev.gspo4j.internal.HostScan;
import dev.gspo4j.internal.Kernels;
import dev.gspo4j.internal.LogitsDtype;
import dev.gspo4j.internal.LogitsView;
import dev.gspo4j.internal.LossSettings;
import dev.gspo4j.internal.Objective;
import dev.gspo4j.internal.RatioLevel;
import dev.gspo4j.internal.TokenLayout;
import dev.gspo4j.internal.Tensors;
import dev.gspo4j.internal.TokenWeights;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import org.bytedeco.javacpp.BytePointer;
import org.bytedeco.javacpp.LongPointer;
import org.bytedeco.pytorch.Device;
import org.bytedeco.pytorch.Scalar;
import org.bytedeco.pytorch.T_TensorTensor_T;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * A {@link LossInput} checked against the loss's options and brought to the kernels' dtypes: every
 * problem the tensors' metadata shows is an {@link IllegalArgumentException} naming the argument,
 * its expected and its actual value, before any kernel runs. Owns the converted copies, and
 * releases them itself when it rejects the input after making some.
 */
final class PreparedInput implements AutoCloseable {
    final LogitsView view;
    final TokenLayout layout;
    final long[] tokenShape;
    final Tensor targets;
    final Tensor mask;
    final Tensor oldLogProbs;
    final Tensor refLogProbs;
    final Tensor rolloutLogProbs;
    final Double entropyThreshold; // the caller's, or null
    final Tensor advantages;
    final boolean tokenAdvantages;
    private final Tensor offsets;
    private final List<Tensor> owned = new ArrayList<>();
    // CUDA, deferred checks: whether the mask holds values other than 0/1 (a device bool scalar,
    // read with the kernels' checks), and the message then; null otherwise.
    Tensor maskBad;
    String maskMessage;

    final DataErrors errors;

    private PreparedInput(LossInput in, Tensor logits, LossSettings settings, double temperature) {
        try {
            TensorArgs.requireReadable(logits, "logits");
            TensorArgs.requireNoLazyBits(logits, "logits");
            final LogitsDtype dtype = Tensors.logitsDtype(logits.scalar_type());
            if (dtype == null) {
                throw new IllegalArgumentException("logits must be float32, bfloat16 or float16, got " + typeName(logits));
            }
            if (logits.is_cuda() && Kernels.cudaDeviceCount() == 0) {
                throw new IllegalArgumentException("logits are on " + deviceName(logits)
                        + "; this gspo4j library runs on cpu only (built without CUDA kernels)");
            }
            for (Tensor t : new Tensor[] {in.targets, in.advantages}) {
                TensorArgs.requireOpen(t, t == in.targets ? "targets" : "advantages");
            }
            final boolean packed = in.offsets != null;
            final long batch;
            final long seq;
            final long vocab;
            if (packed) {
                offsets = integerCopy(in.offsets, "offsets", logits);
                if (logits.dim() != 2) {
                    throw new IllegalArgumentException("packed logits (offsets given) must be [N, V], got shape " + shapeOf(logits));
                }
                if (offsets.dim() != 1 || offsets.size(0) < 1) {
                    throw new IllegalArgumentException("offsets must be [B + 1] with B >= 0, got shape " + shapeOf(in.offsets));
                }
                batch = offsets.size(0) - 1;
                seq = logits.size(0);
                vocab = logits.size(1);
                tokenShape = new long[] {seq};
                if (batch == 0 && seq > 0) {
                    throw new IllegalArgumentException("offsets of shape [1] describe no response, but the logits have N = " + seq
                            + " rows: offsets must be [B + 1] non-decreasing token offsets from 0 to N = " + seq);
                }
            } else {
                if (logits.dim() != 3) {
                    throw new IllegalArgumentException("logits must be [B, T, V] (or [N, V] with offsets), got shape " + shapeOf(logits));
                }
                offsets = null;
                batch = logits.size(0);
                seq = logits.size(1);
                vocab = logits.size(2);
                tokenShape = new long[] {batch, seq};
            }
            if (vocab < 1) {
                throw new IllegalArgumentException("the vocabulary (last logits dimension) must not be empty, got shape " + shapeOf(logits));
            }
            if (vocab > 1 && logits.stride(logits.dim() - 1) != 1) {
                throw new IllegalArgumentException("logits rows must be contiguous (stride(-1) = 1), got stride(-1) = "
                        + logits.stride(logits.dim() - 1) + "; logits.contiguous() makes a copy the kernels can read");
            }
            final long tokens = packed ? seq : batch * seq;
            view = packed
                    ? new LogitsView(logits.data_ptr(), dtype, 1, seq, vocab, 0, logits.stride(0))
                    : new LogitsView(logits.data_ptr(), dtype, batch, seq, vocab, logits.stride(0), logits.stride(1));
            layout = packed ? TokenLayout.packed(Tensors.longs(offsets), batch, tokens) : TokenLayout.padded(batch, seq);

            final Tensor ids = integerCopy(in.targets, "targets", logits);
            requireShape(ids, tokenShape, "targets");
            final Tensor givenMask = in.mask == null ? null : maskCopy(in.mask, tokenShape, logits);
            if (in.ignoreIndex != null) {
                // Positions labelled ignoreIndex count for nothing and read target 0 (a valid id),
                // so the kernels never index outside a row; the caller's tensors are not touched.
                try (Scalar ignore = new Scalar(in.ignoreIndex.longValue()); Scalar zero = new Scalar(0L);
                        Tensor ignored = ids.eq(ignore); Tensor kept = ignored.logical_not()) {
                    targets = own(ids.masked_fill(ignored, zero));
                    mask = own(givenMask == null ? kept.contiguous() : givenMask.logical_and(kept));
                }
            } else {
                targets = ids;
                mask = givenMask;
            }
            errors = new DataErrors(packed ? 0 : seq, CHECK_FINITE_HINT).temperature(temperature)
                    .targets(targets, mask, vocab).offsets(offsets, tokens);
            // On a GPU the forward kernel checks every id as it reads the row (no host round trip);
            // PolicyLoss reports what it found before returning.
            if (tokens > 0 && !Tensors.isCuda(logits) && hostReadable(targets)) {
                if (HostScan.firstOutside(targets, vocab) >= 0) {
                    throw new IllegalArgumentException(firstBadTarget(vocab, tokens));
                }
            } else if (tokens > 0 && !Tensors.isCuda(logits)) {
                final long min;
                final long max;
                // One pass over the ids (aminmax), not two.
                try (T_TensorTensor_T range = targets.aminmax(); Tensor lo = range.get0(); Tensor hi = range.get1()) {
                    min = lo.item_long();
                    max = hi.item_long();
                }
                if (min < 0 || max >= vocab) {
                    throw new IllegalArgumentException(firstBadTarget(vocab, tokens));
                }
            }
            oldLogProbs = in.oldLogProbs == null ? null : floatCopy(in.oldLogProbs, tokenShape, "oldLogProbs", logits);
            refLogProbs = in.refLogProbs == null ? null : floatCopy(in.refLogProbs, tokenShape, "refLogProbs", logits);
            rolloutLogProbs = in.rolloutLogProbs == null ? null
                    : floatCopy(in.rolloutLogProbs, tokenShape, "rolloutLogProbs", logits);
            entropyThreshold = in.entropyThreshold;
            tokenAdvantages = in.tokenAdvantages;
            advantages = floatCopy(in.advantages, tokenAdvantages ? tokenShape : new long[] {batch},
                    tokenAdvantages ? "advantages (per token)" : "advantages (per response)", logits);
            errors.name("old_logprob", "oldLogProbs", oldLogProbs, DataErrors.Axis.TOKENS)
                    .name("ref_logprob", "refLogProbs", refLogProbs, DataErrors.Axis.TOKENS)
                    .name("rollout_logprob", "rolloutLogProbs", rolloutLogProbs, DataErrors.Axis.TOKENS)
                    .name("advantages", "advantages", advantages, tokenAdvantages ? DataErrors.Axis.TOKENS : DataErrors.Axis.FLAT)
                    .name("logprob", "logProbs (computed from the logits)", null, DataErrors.Axis.TOKENS)
                    .name("entropy", "entropy (computed from the logits)", null, DataErrors.Axis.TOKENS);
            if (settings.klCoef() != 0 && refLogProbs == null) {
                throw new IllegalArgumentException("refLogProbs are required when the KL coefficient is not 0 (it is "
                        + settings.klCoef() + ")");
            }
            final TokenWeights weights = settings.weights();
            if (weights.needsRolloutLogProbs() && rolloutLogProbs == null) {
                throw new IllegalArgumentException("rolloutLogProbs (the inference engine's log-probs of the sampled tokens) are "
                        + "required by the loss's rollout " + (weights.level() != null ? "importance weight" : "rejection")
                        + "; pass them with LossInput.Builder.rolloutLogProbs");
            }
            if (weights.offPolicyMask() && tokenAdvantages) {
                throw new IllegalArgumentException("the off-policy mask drops responses with A_b < 0: it needs one advantage per "
                        + "response ([B]), not per token");
            }
            if (entropyThreshold != null && !weights.topEntropy()) {
                throw new IllegalArgumentException("entropyThreshold is given but the loss has no top-entropy selection; build "
                        + "it with PolicyLoss.Builder.topEntropyQuantile(rho)");
            }
            if (settings.ratioLevel() == RatioLevel.SEQUENCE && tokenAdvantages) {
                throw new IllegalArgumentException((settings.objective().objective() == Objective.CLIP ? "GSPO's sequence ratio"
                        : settings.objective().objective().label()) + " takes one advantage per response ([B]); "
                        + "use PolicyLoss.gspoToken() for per-token advantages");
            }
        } catch (RuntimeException | Error e) {
            // Whatever was converted so far belongs to nobody else: release it now, not at a GC.
            close();
            throw e;
        }
    }

    private static final String CHECK_FINITE_HINT = " (a counted position: mask it out or fix the value; "
            + "PolicyLoss.Builder.checkFinite(false) lets NaN/Inf flow into the loss instead)";

    /** The converted offsets {@code [B + 1]} (int64), or null in the padded layout. */
    Tensor offsets() {
        return offsets;
    }

    static PreparedInput of(LossInput in, LossSettings settings, double temperature) {
        return new PreparedInput(in, in.logits, settings, temperature);
    }

    /**
     * {@link #of} with {@code logits} in place of the input's: for the hidden-state path, a
     * stand-in with the logits' shape, dtype and device over one row of memory that nothing reads
     * (see {@link HiddenStates}).
     */
    static PreparedInput of(LossInput in, Tensor logits, LossSettings settings, double temperature) {
        return new PreparedInput(in, logits, settings, temperature);
    }

    /** Runs a kernel call; bad data it finds (ids, offsets, NaN/Inf) becomes IllegalArgumentException naming the Java argument. */
    void translate(Runnable call) {
        errors.run(call);
    }

    /**
     * The metrics of this call: the kernels' float32 set and the exact counts (responses with a
     * counted token, counted tokens) as int64, computed here by device ops without a sync, or on
     * the host where the layout alone gives them. Call after the kernels have checked the offsets.
     */
    LossMetrics metrics(Tensor values) {
        final long batch = layout.batch();
        final long tokens = layout.tokens();
        Tensor sequenceCount = null;
        Tensor tokenCount = null;
        try {
            if (mask == null && offsets == null) {
                return new LossMetrics(values, null, tokens > 0 ? batch : 0, null, tokens);
            }
            if (!Tensors.isCuda(values) && (mask == null || hostReadable(mask))) {
                // On the CPU the counts are one pass over the mask bytes (and the checked offsets).
                if (mask == null) {
                    return new LossMetrics(values, null, HostScan.nonEmpty(layout), null, tokens);
                }
                final long[] counts = HostScan.counts(mask, layout);
                return new LossMetrics(values, null, counts[0], null, counts[1]);
            }
            if (mask == null) {
                try (Tensor ends = offsets.narrow(0, 1, batch); Tensor starts = offsets.narrow(0, 0, batch);
                        Tensor lengths = ends.sub(starts); Scalar zero = new Scalar(0L); Tensor nonEmpty = lengths.gt(zero)) {
                    sequenceCount = nonEmpty.sum();
                }
                return new LossMetrics(values, sequenceCount, 0, null, tokens);
            }
            tokenCount = mask.sum();
            if (offsets == null) {
                try (Tensor any = mask.any(1)) {
                    sequenceCount = any.sum();
                }
            } else {
                // Counted tokens of response b: prefix[offsets[b + 1]] - prefix[offsets[b]].
                try (Tensor prefix = Tensors.empty(new long[] {tokens + 1}, ScalarType.Long, mask);
                        Tensor head = prefix.narrow(0, 0, 1); Tensor tail = prefix.narrow(0, 1, tokens);
                        Tensor running = mask.cumsum(0); Tensor ends = offsets.narrow(0, 1, batch);
                        Tensor starts = offsets.narrow(0, 0, batch)) {
                    head.zero_();
                    tail.copy_(running);
                    try (Tensor atEnds = prefix.index_select(0, ends); Tensor atStarts = prefix.index_select(0, starts);
                            Tensor lengths = atEnds.sub(atStarts); Scalar zero = new Scalar(0L); Tensor nonEmpty = lengths.gt(zero)) {
                        sequenceCount = nonEmpty.sum();
                    }
                }
            }
            return new LossMetrics(values, sequenceCount, 0, tokenCount, 0);
        } catch (RuntimeException | Error e) {
            for (Tensor t : new Tensor[] {sequenceCount, tokenCount}) {
                if (t != null) {
                    t.close();
                }
            }
            throw e;
        }
    }

    // The CPU path's pre-check found an id outside [0, V): the first one, in the words the CUDA
    // path's kernel report gets.
    private String firstBadTarget(long vocab, long tokens) {
        final LongPointer ids = Tensors.longs(targets);
        final BytePointer counted = Tensors.bytes(mask);
        for (long i = 0; i < tokens; i++) {
            final long id = ids.get(i);
            if (id < 0 || id >= vocab) {
                return errors.targetMessage(i, id, counted != null && counted.get(i) == 0);
            }
        }
        return "targets must be token ids in [0, " + vocab + ")";
    }

    private Tensor own(Tensor t) {
        owned.add(t);
        return t;
    }

    static void requireSameDevice(Tensor t, String name, Tensor logits) {
        TensorArgs.requireOpen(t, name);
        if (t.is_cpu() && logits.is_cpu()) {
            TensorArgs.requireReadable(t, name);
            return;
        }
        try (Device device = t.device(); Device logitsDevice = logits.device()) {
            if (!device.equals(logitsDevice)) {
                throw new IllegalArgumentException(name + " is on " + deviceName(t) + " but the logits are on " + deviceName(logits)
                        + "; " + name + ".to(logits.device()) moves it");
            }
        }
        TensorArgs.requireReadable(t, name);
    }

    // A dense, contiguous CPU tensor whose memory holds its values (no negative or conjugate bit,
    // not a storage-less zero tensor) and fits one Java buffer (2 GiB): what HostScan reads. The caller checked it is readable.
    static boolean hostReadable(Tensor t) {
        return t.is_cpu() && t.is_contiguous() && !t.is_neg() && !t.is_conj() && !t._is_zerotensor() && HostScan.fits(t);
    }

    // t converted to `type` and made contiguous, its negative bit resolved (a copy only when the
    // bit is set): the kernels read the memory, where a _neg_view() holds the values negated.
    private Tensor converted(Tensor t, ScalarType type) {
        if (t.scalar_type().intern() == type && t.is_contiguous() && !t.is_neg() && !t.is_conj()) {
            return own(new Tensor(t)); // already what the kernels read: another reference, no op
        }
        final Tensor resolved = TensorArgs.resolved(t);
        try (Tensor typed = resolved.to(type)) {
            return own(typed.contiguous());
        } finally {
            resolved.close();
        }
    }

    static void requireShape(Tensor t, long[] shape, String name) {
        if (!Arrays.equals(Tensors.shape(t), shape)) {
            throw new IllegalArgumentException(name + " must have shape " + Arrays.toString(shape) + ", got " + shapeOf(t));
        }
    }

    private Tensor integerCopy(Tensor t, String name, Tensor logits) {
        requireSameDevice(t, name, logits);
        if (!torch.isIntegralType(t.scalar_type(), false)) {
            throw new IllegalArgumentException(name + " must be an integer tensor (int64 or int32), got " + typeName(t));
        }
        return converted(t, ScalarType.Long);
    }

    private Tensor floatCopy(Tensor t, long[] shape, String name, Tensor logits) {
        requireSameDevice(t, name, logits);
        requireShape(t, shape, name);
        if (!torch.isFloatingType(t.scalar_type())) {
            throw new IllegalArgumentException(name + " must be a floating-point tensor, got " + typeName(t));
        }
        return converted(t, ScalarType.Float);
    }

    private Tensor maskCopy(Tensor t, long[] shape, Tensor logits) {
        requireSameDevice(t, "mask", logits);
        requireShape(t, shape, "mask");
        if (Tensors.isCuda(logits) && !DeferredChecks.strict() && t.scalar_type().intern() != ScalarType.Bool
                && !torch.isComplexType(t.scalar_type())) {
            // Reading whether the values are 0/1 would wait for the device: the answer stays on the
            // device and is read with the kernels' own checks (CudaChecks).
            maskBad = own(otherThanZeroOrOne(t));
            maskMessage = maskValuesMessage("mask", t);
            try (Tensor resolved = TensorArgs.resolved(t); Tensor typed = resolved.to(ScalarType.Bool)) {
                return own(typed.contiguous());
            }
        }
        return own(validMask(t, "mask"));
    }

    // A bool scalar: whether t holds a value other than 0 and 1 (NaN included).
    private static Tensor otherThanZeroOrOne(Tensor t) {
        try (Scalar zero = new Scalar(0); Scalar one = new Scalar(1); Tensor notZero = t.ne(zero); Tensor notOne = t.ne(one);
                Tensor other = notZero.logical_and(notOne)) {
            return other.any();
        }
    }

    private static String maskValuesMessage(String name, Tensor t) {
        return name + " must hold only 0 and 1, got other values (a " + typeName(t) + " tensor; NaN counts as another value)";
    }

    /**
     * A 0/1 mask as a new contiguous bool tensor (one byte per element, 0 or 1: the kernels' uint8
     * mask), its negative bit resolved; the caller closes it. Any value but 0 and 1 (NaN included)
     * is an error: reading the values, a device sync on a GPU unless the mask is already bool.
     */
    static Tensor validMask(Tensor t, String name) {
        if (hostReadable(t)) {
            final ScalarType type = t.scalar_type().intern();
            if (type == ScalarType.Bool) {
                return new Tensor(t); // already the kernels' bytes: no copy
            }
            if (HostScan.readsMask(type)) {
                // One pass that checks the values and writes the bytes.
                final Tensor bytes = Tensors.empty(Tensors.shape(t), ScalarType.Bool, t);
                if (HostScan.maskToBytes(t, bytes) >= 0) {
                    bytes.close();
                    throw new IllegalArgumentException(maskValuesMessage(name, t));
                }
                return bytes;
            }
        }
        if (t.scalar_type().intern() != ScalarType.Bool) {
            if (torch.isComplexType(t.scalar_type())) {
                throw new IllegalArgumentException(name + " must be bool, integer or floating 0/1, got " + typeName(t));
            }
            // NaN is neither 0 nor 1: rejected too.
            try (Tensor any = otherThanZeroOrOne(t)) {
                if (any.item_bool()) {
                    throw new IllegalArgumentException(maskValuesMessage(name, t));
                }
            }
        }
        try (Tensor resolved = TensorArgs.resolved(t); Tensor typed = resolved.to(ScalarType.Bool)) {
            return typed.contiguous();
        }
    }

    static String shapeOf(Tensor t) {
        return Arrays.toString(Tensors.shape(t));
    }

    static String typeName(Tensor t) {
        return torch.toString(t.scalar_type()).getString();
    }

    static String deviceName(Tensor t) {
        try (Device device = t.device(); BytePointer name = device.str()) {
            return name.getString();
        }
    }

    @Override
    public void close() {
        for (Tensor t : owned) {
            t.close();
        }
        owned.clear();
    }
}
