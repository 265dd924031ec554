package dev.gspo4j;

import dev.gspo4j.internal.Kernels;
import dev.gspo4j.internal.LogitsDtype;
import dev.gspo4j.internal.LogitsView;
import dev.gspo4j.internal.LossSettings;
import dev.gspo4j.internal.RatioLevel;
import dev.gspo4j.internal.TokenLayout;
import dev.gspo4j.internal.Tensors;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import org.bytedeco.pytorch.Scalar;
import org.bytedeco.pytorch.T_TensorTensor_T;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * A {@link LossInput} checked against the loss's options and brought to the kernels' dtypes: every
 * problem the tensors' metadata shows is an {@link IllegalArgumentException} naming the argument,
 * its expected and its actual value, before any kernel runs. Owns the converted copies.
 */
final class PreparedInput implements AutoCloseable {
    final LogitsView view;
    final TokenLayout layout;
    final long[] tokenShape;
    final Tensor targets;
    final Tensor mask;
    final Tensor oldLogProbs;
    final Tensor refLogProbs;
    final Tensor advantages;
    final boolean tokenAdvantages;
    private final Tensor offsets;
    private final List<Tensor> owned = new ArrayList<>();

    private PreparedInput(LossInput in, LossSettings settings) {
        final Tensor logits = in.logits;
        final LogitsDtype dtype = Tensors.logitsDtype(logits.scalar_type());
        if (dtype == null) {
            throw new IllegalArgumentException("logits must be float32, bfloat16 or float16, got " + typeName(logits));
        }
        if (!logits.device().is_cpu() && !(logits.is_cuda() && Kernels.cudaDeviceCount() > 0)) {
            throw new IllegalArgumentException("logits are on " + deviceName(logits) + "; this gspo4j library runs on "
                    + (Kernels.cudaDeviceCount() > 0 ? "cpu and cuda" : "cpu only (built without CUDA kernels)"));
        }
        final boolean packed = in.offsets != null;
        final long batch;
        final long seq;
        final long vocab;
        if (packed) {
            if (logits.dim() != 2) {
                throw new IllegalArgumentException("packed logits (offsets given) must be [N, V], got shape " + shapeOf(logits));
            }
            offsets = integerCopy(in.offsets, "offsets", logits);
            if (offsets.dim() != 1 || offsets.size(0) < 1) {
                throw new IllegalArgumentException("offsets must be [B + 1] with B >= 0, got shape " + shapeOf(in.offsets));
            }
            batch = offsets.size(0) - 1;
            seq = logits.size(0);
            vocab = logits.size(1);
            tokenShape = new long[] {seq};
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

        targets = integerCopy(in.targets, "targets", logits);
        requireShape(targets, tokenShape, "targets");
        // On a GPU the forward kernel checks every id as it reads the row (no host round trip);
        // PolicyLoss reports what it found before returning.
        if (tokens > 0 && !Tensors.isCuda(logits)) {
            final long min;
            final long max;
            // One pass over the ids (aminmax), not two.
            try (T_TensorTensor_T range = targets.aminmax(); Tensor lo = range.get0(); Tensor hi = range.get1()) {
                min = lo.item_long();
                max = hi.item_long();
            }
            if (min < 0 || max >= vocab) {
                throw new IllegalArgumentException("targets must be token ids in [0, " + vocab + "), got values from " + min
                        + " to " + max);
            }
        }
        mask = in.mask == null ? null : maskCopy(in.mask, tokenShape, logits);
        oldLogProbs = in.oldLogProbs == null ? null : floatCopy(in.oldLogProbs, tokenShape, "oldLogProbs", logits);
        refLogProbs = in.refLogProbs == null ? null : floatCopy(in.refLogProbs, tokenShape, "refLogProbs", logits);
        tokenAdvantages = in.tokenAdvantages;
        advantages = floatCopy(in.advantages, tokenAdvantages ? tokenShape : new long[] {batch},
                tokenAdvantages ? "advantages (per token)" : "advantages (per response)", logits);
        if (settings.klCoef() != 0 && refLogProbs == null) {
            throw new IllegalArgumentException("refLogProbs are required when the KL coefficient is not 0 (it is "
                    + settings.klCoef() + ")");
        }
        if (settings.ratioLevel() == RatioLevel.SEQUENCE && tokenAdvantages) {
            throw new IllegalArgumentException("GSPO's sequence ratio takes one advantage per response ([B]); "
                    + "use PolicyLoss.gspoToken() for per-token advantages");
        }
    }

    static PreparedInput of(LossInput in, LossSettings settings) {
        return new PreparedInput(in, settings);
    }

    /** Runs a kernel call; bad data it finds (ids, offsets, NaN/Inf) becomes IllegalArgumentException. */
    static void translate(Runnable call) {
        try {
            call.run();
        } catch (Gspo4jException e) {
            switch (e.status()) {
                case INVALID_ARGUMENT, OUT_OF_RANGE, NON_FINITE -> throw new IllegalArgumentException(e.getMessage(), e);
                default -> throw e;
            }
        }
    }

    private Tensor own(Tensor t) {
        owned.add(t);
        return t;
    }

    private void requireSameDevice(Tensor t, String name, Tensor logits) {
        if (!t.device().equals(logits.device())) {
            throw new IllegalArgumentException(name + " is on " + deviceName(t) + " but the logits are on " + deviceName(logits));
        }
    }

    private static void requireShape(Tensor t, long[] shape, String name) {
        if (!Arrays.equals(Tensors.shape(t), shape)) {
            throw new IllegalArgumentException(name + " must have shape " + Arrays.toString(shape) + ", got " + shapeOf(t));
        }
    }

    private Tensor integerCopy(Tensor t, String name, Tensor logits) {
        requireSameDevice(t, name, logits);
        if (!torch.isIntegralType(t.scalar_type(), false)) {
            throw new IllegalArgumentException(name + " must be an integer tensor (int64 or int32), got " + typeName(t));
        }
        try (Tensor converted = t.to(ScalarType.Long)) {
            return own(converted.contiguous());
        }
    }

    private Tensor floatCopy(Tensor t, long[] shape, String name, Tensor logits) {
        requireSameDevice(t, name, logits);
        requireShape(t, shape, name);
        if (!torch.isFloatingType(t.scalar_type())) {
            throw new IllegalArgumentException(name + " must be a floating-point tensor, got " + typeName(t));
        }
        try (Tensor converted = t.to(ScalarType.Float)) {
            return own(converted.contiguous());
        }
    }

    private Tensor maskCopy(Tensor t, long[] shape, Tensor logits) {
        requireSameDevice(t, "mask", logits);
        requireShape(t, shape, "mask");
        if (t.scalar_type().intern() != ScalarType.Bool) {
            try (Scalar zero = new Scalar(0); Scalar one = new Scalar(1); Tensor notZero = t.ne(zero); Tensor notOne = t.ne(one);
                    Tensor other = notZero.logical_and(notOne); Tensor any = other.any()) {
                if (any.item_bool()) {
                    throw new IllegalArgumentException("mask must hold only 0 and 1, got other values (a " + typeName(t) + " tensor)");
                }
            }
        }
        // A bool tensor is one byte per element, 0 or 1: the kernels' uint8 mask.
        try (Tensor converted = t.to(ScalarType.Bool)) {
            return own(converted.contiguous());
        }
    }

    static String shapeOf(Tensor t) {
        return Arrays.toString(Tensors.shape(t));
    }

    static String typeName(Tensor t) {
        return torch.toString(t.scalar_type()).getString();
    }

    static String deviceName(Tensor t) {
        return t.device().str().getString();
    }

    @Override
    public void close() {
        for (Tensor t : owned) {
            t.close();
        }
        owned.clear();
    }
}
