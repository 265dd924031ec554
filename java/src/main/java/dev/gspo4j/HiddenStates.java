package dev.gspo4j;

import dev.gspo4j.internal.Tensors;
import org.bytedeco.pytorch.Device;
import org.bytedeco.pytorch.Tensor;

/**
 * The hidden-state path's inputs checked: hidden states, the lm_head's weight and bias, and the
 * chunk size their budget gives. Owns its views and a stand-in for the logits that {@link
 * PreparedInput} checks the per-token inputs against: the logits' shape ({@code [B, T, V]} or
 * {@code [N, V]}), dtype and device, over one row of memory that nothing reads.
 */
final class HiddenStates implements AutoCloseable {
    /** The caller's hidden states, for the graph. */
    final Tensor hidden;
    /** The hidden states as {@code [N, H]} rows (a view, or a copy when no view exists). */
    final Tensor rows;
    final Tensor weight;
    final Tensor bias; // null: none
    final long chunkRows;
    final Tensor standInLogits;

    private HiddenStates(LossInput in) {
        hidden = in.hiddenStates;
        weight = in.weight;
        bias = in.bias;
        TensorArgs.requireReadable(hidden, "hiddenStates");
        TensorArgs.requireNoLazyBits(hidden, "hiddenStates");
        TensorArgs.requireReadable(weight, "weight");
        TensorArgs.requireNoLazyBits(weight, "weight");
        if (Tensors.logitsDtype(hidden.scalar_type()) == null) {
            throw new IllegalArgumentException("hiddenStates must be float32, bfloat16 or float16, got " + PreparedInput.typeName(hidden));
        }
        final boolean packed = in.offsets != null;
        if (packed ? hidden.dim() != 2 : hidden.dim() != 3) {
            throw new IllegalArgumentException(packed ? "packed hiddenStates (offsets given) must be [N, H], got shape "
                    + PreparedInput.shapeOf(hidden) : "hiddenStates must be [B, T, H] (or [N, H] with offsets), got shape "
                    + PreparedInput.shapeOf(hidden));
        }
        final long h = hidden.size(hidden.dim() - 1);
        if (weight.dim() != 2 || weight.size(1) != h || weight.size(0) < 1) {
            throw new IllegalArgumentException("weight must be the lm_head's [V, H] with V >= 1 and H = " + h
                    + " (the hidden states' last dimension), got shape " + PreparedInput.shapeOf(weight));
        }
        requireLike(weight, "weight", hidden);
        final long vocab = weight.size(0);
        if (bias != null) {
            TensorArgs.requireReadable(bias, "bias");
            TensorArgs.requireNoLazyBits(bias, "bias");
            PreparedInput.requireShape(bias, new long[] {vocab}, "bias");
            requireLike(bias, "bias", hidden);
        }
        final long tokens = packed ? hidden.size(0) : hidden.size(0) * hidden.size(1);
        final long rowBytes = vocab * weight.element_size();
        chunkRows = Math.max(1, Math.min(Math.max(tokens, 1), in.logitsChunkBytes / rowBytes));
        Tensor flat = null;
        Tensor row = null;
        try {
            try (Tensor detached = hidden.detach()) {
                flat = detached.reshape(tokens, h);
            }
            row = Tensors.empty(packed ? new long[] {1, vocab} : new long[] {1, 1, vocab}, hidden.scalar_type().intern(), hidden);
            standInLogits = packed ? row.expand(tokens, vocab) : row.expand(hidden.size(0), hidden.size(1), vocab);
            rows = flat;
        } catch (RuntimeException | Error e) {
            if (flat != null) {
                flat.close();
            }
            throw e;
        } finally {
            if (row != null) {
                row.close();
            }
        }
    }

    static HiddenStates of(LossInput in) {
        return new HiddenStates(in);
    }

    private static void requireLike(Tensor t, String name, Tensor hidden) {
        try (Device device = t.device(); Device hiddenDevice = hidden.device()) {
            if (!device.equals(hiddenDevice)) {
                throw new IllegalArgumentException(name + " is on " + PreparedInput.deviceName(t) + " but the hidden states are on "
                        + PreparedInput.deviceName(hidden) + "; " + name + ".to(hiddenStates.device()) moves it");
            }
        }
        if (t.scalar_type().intern() != hidden.scalar_type().intern()) {
            throw new IllegalArgumentException(name + " must have the hidden states' dtype " + PreparedInput.typeName(hidden)
                    + " (libtorch's matmul takes one dtype), got " + PreparedInput.typeName(t) + "; " + name + ".to(dtype) converts it");
        }
    }

    /** Whether any of the three requires grad. */
    boolean requiresGrad() {
        return hidden.requires_grad() || weight.requires_grad() || (bias != null && bias.requires_grad());
    }

    @Override
    public void close() {
        rows.close();
        standInLogits.close();
    }
}
