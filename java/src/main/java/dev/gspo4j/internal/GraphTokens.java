package dev.gspo4j.internal;

import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import org.bytedeco.javacpp.FloatPointer;
import org.bytedeco.javacpp.Pointer;
import org.bytedeco.pytorch.PointerConsumer;
import org.bytedeco.pytorch.Scalar;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorOptions;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * The pieces both fused graphs ({@link FusedLogProbs}, {@link FusedLinear}) build from: one-element
 * tokens over memory of ours whose deleter tells when libtorch drops them, and the attachment of a
 * tensor to the graph through storage-less zero tensors (see FusedLogProbs for the whole design).
 */
final class GraphTokens {
    // The memory behind every live token, freed by the token's deleter alone (a node may still read
    // the token after the state is released). On the device where the graph's nodes run: a tensor
    // of libtorch's on a GPU, a float of ours on the CPU.
    private static final Map<Long, Pointer> TOKEN_MEMORY = new ConcurrentHashMap<>();

    private GraphTokens() {}

    /**
     * A 0-dim float32 tensor holding {@code value} over memory of ours, with {@code deleter}.
     *
     * @param cpu whether {@code options} are for the CPU (the memory is then a plain native float,
     *     not a libtorch op)
     */
    static Tensor token(double value, PointerConsumer deleter, TensorOptions options, boolean cpu) {
        final Pointer memory;
        final Pointer data;
        if (cpu) {
            final FloatPointer f = new FloatPointer(1);
            f.put((float) value);
            memory = f;
            data = f;
        } else {
            try (Scalar v = new Scalar(value)) {
                final Tensor t = torch.full(new long[] {1}, v, options);
                memory = t;
                data = t.data_ptr();
            }
        }
        TOKEN_MEMORY.put(data.address(), memory);
        try {
            return torch.from_blob(data, new long[0], deleter, options);
        } catch (RuntimeException | Error e) {
            TOKEN_MEMORY.remove(data.address());
            memory.close();
            throw e;
        }
    }

    /** The deleter's first step: frees the memory behind the token at {@code data}. */
    static void freeTokenMemory(Pointer data) {
        final Pointer memory = TOKEN_MEMORY.remove(data.address());
        if (memory != null) {
            memory.close();
        }
    }

    static Tensor keep(List<Pointer> made, Tensor t) {
        made.add(t);
        return t;
    }

    /**
     * {@code float(dot(view(-1, alias * Z), Z'))} ({@code alias * Z} only when {@code alias} is not
     * contiguous): exactly 0, differentiable in {@code alias}, with zero tensors in {@code like}'s
     * dtype so that neither direction reads or allocates [N, V].
     * Every intermediate goes to {@code made}.
     */
    static Tensor zeroDot(List<Pointer> made, Tensor alias, Tensor like) {
        final TensorOptions options = Tensors.options(like.scalar_type(), like); // shared: not closed
        final Tensor flat;
        if (alias.is_contiguous()) {
            // A contiguous alias views as [N * V] itself: dot() with a zero tensor is a zero tensor
            // too (libtorch's zero-tensor kernel reads neither side), so the product is not needed.
            flat = keep(made, alias.view(-1));
        } else {
            // Any other strides (an expanded or transposed tensor): the product with a 0-dim zero
            // tensor is a contiguous zero tensor of the same shape, which views.
            final Tensor zero = keep(made, torch.torch__efficientzerotensor(new long[0], options));
            final Tensor zeros = keep(made, alias.mul(zero));
            flat = keep(made, zeros.view(-1));
        }
        final Tensor zeroFlat = keep(made, torch.torch__efficientzerotensor(new long[] {flat.size(0)}, options));
        final Tensor dot = keep(made, flat.dot(zeroFlat));
        return keep(made, dot.to(ScalarType.Float));
    }
}
