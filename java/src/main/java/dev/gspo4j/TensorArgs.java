package dev.gspo4j;

import dev.gspo4j.internal.Kernels;
import org.bytedeco.pytorch.Device;
import org.bytedeco.pytorch.Storage;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.global.torch.Layout;

/**
 * The checks every tensor argument of the public API passes before anything reads its metadata or
 * its memory: each one names the argument, what it is, and the fix. The kernels read tensors as
 * raw memory, so anything whose memory is not its plain values (a sparse, mkldnn, nested or
 * quantized tensor, a tensor with libtorch's negative or conjugate bit, a storage smaller than its
 * shape) is refused or resolved here, never read.
 */
final class TensorArgs {
    private TensorArgs() {}

    /**
     * Requires {@code t} to be an open, defined, dense tensor on the CPU or a GPU whose storage
     * holds every element its shape and strides reach. Reads metadata only (no device sync).
     */
    static void requireReadable(Tensor t, String name) {
        requireOpen(t, name);
        if (t.is_nested()) {
            throw new IllegalArgumentException(name + " is a nested tensor; gspo4j reads dense tensors: pad it ("
                    + "torch.nested_to_padded_tensor) or pack it into one [N, ...] tensor with offsets");
        }
        final Layout layout = t.layout().intern();
        if (layout != Layout.Strided) {
            throw new IllegalArgumentException(name + " has layout " + layout + "; gspo4j reads dense (strided) tensors: "
                    + name + ".to_dense() makes one");
        }
        if (t.is_quantized()) {
            throw new IllegalArgumentException(name + " is quantized (" + PreparedInput.typeName(t) + "); " + name
                    + ".dequantize() gives the float tensor gspo4j reads");
        }
        if (!t.is_cpu() && !t.is_cuda()) {
            try (Device device = t.device()) {
                throw new IllegalArgumentException(name + (name.equals("logits") ? " are" : " is") + " on "
                        + PreparedInput.deviceName(t) + (device.is_meta() ? ", which holds no data" : "")
                        + "; this gspo4j library runs on " + (Kernels.cudaDeviceCount() > 0 ? "cpu and cuda"
                                : "cpu only (built without CUDA kernels)"));
            }
        }
        requireStorage(t, name);
    }

    /** Requires a non-null, open (not closed from Java) and defined tensor. */
    static void requireOpen(Tensor t, String name) {
        if (t == null) {
            throw new IllegalArgumentException(name + " must not be null");
        }
        if (t.isNull()) {
            throw new IllegalArgumentException(name + " is a closed Tensor (its Java object was closed or deallocated); "
                    + "pass a tensor that is still open");
        }
        if (!t.defined()) {
            throw new IllegalArgumentException(name + " is an undefined tensor (new Tensor() holds no data); pass a tensor "
                    + "with values");
        }
    }

    /**
     * Requires logits without libtorch's negative or conjugate bit: resolving them would copy the
     * whole [N, V] tensor, which the caller should decide to do.
     */
    static void requireNoLazyBits(Tensor t, String name) {
        if (t.is_neg()) {
            throw new IllegalArgumentException(name + " has libtorch's negative bit set (a _neg_view()): its memory holds "
                    + "the values negated; " + name + ".resolve_neg() makes the copy gspo4j can read");
        }
        if (t.is_conj()) {
            throw new IllegalArgumentException(name + " has libtorch's conjugate bit set; " + name
                    + ".resolve_conj() makes the copy gspo4j can read");
        }
    }

    /**
     * {@code t} with its negative and conjugate bits resolved: a new reference to the same tensor
     * when neither is set (no copy), else a resolved copy. The caller closes the result.
     */
    static Tensor resolved(Tensor t) {
        if (!t.is_neg() && !t.is_conj()) {
            return new Tensor(t);
        }
        try (Tensor noNeg = t.resolve_neg()) {
            return noNeg.resolve_conj();
        }
    }

    // A storage resized by hand (FSDP frees parameters this way) keeps the tensor's shape: reading
    // it would run past its memory, or through a null pointer.
    private static void requireStorage(Tensor t, String name) {
        final long numel = t.numel();
        if (numel == 0) {
            return;
        }
        long last = t.storage_offset();
        for (int d = 0; d < t.dim(); d++) {
            last += (t.size(d) - 1) * t.stride(d);
        }
        final long needed = (last + 1) * t.element_size();
        final long held;
        if (!t.has_storage()) {
            held = 0;
        } else {
            try (Storage storage = t.storage()) {
                held = storage.data() == null || storage.data().isNull() ? 0 : storage.nbytes();
            }
        }
        if (held < needed) {
            throw new IllegalArgumentException(name + "'s storage holds " + held + " bytes but its shape "
                    + PreparedInput.shapeOf(t) + " and strides reach " + needed + " bytes (a storage resized or freed by "
                    + "hand); pass a tensor whose storage holds its values");
        }
    }
}
