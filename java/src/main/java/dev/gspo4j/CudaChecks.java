package dev.gspo4j;

import dev.gspo4j.internal.DeferredChecks;
import dev.gspo4j.internal.Kernels;
import dev.gspo4j.internal.Tensors;
import org.bytedeco.javacpp.Pointer;
import org.bytedeco.pytorch.Tensor;

/**
 * When the data checks of a CUDA call are read (see {@link DeferredChecks}): after the call's
 * kernels in strict mode, else at the next gspo4j call on the device or the first read of the
 * call's result. A no-op on the CPU, whose kernels check before they return.
 */
final class CudaChecks {
    static final String LATER = " (found by the CUDA kernels of an earlier gspo4j call on this device: CUDA data "
            + "checks are read at the next gspo4j call or at the first read of that call's result; "
            + "Gspo4j.setSyncChecks(true) reports them in the call itself)";

    private CudaChecks() {}

    /** The device key of CUDA logits (or of CPU tensors sent to the emulator), -1 on the CPU. */
    static int deviceOf(Tensor logits) {
        return Tensors.isCuda(logits) ? DeferredChecks.deviceOf(logits) : -1;
    }

    /** At the start of a gspo4j call: reports what earlier calls on the device found. */
    static void beforeCall(int device) {
        if (device >= 0) {
            DeferredChecks.resolve(device, true);
        }
    }

    /** At the first read of a result: reports what the calls on its device found. */
    static void beforeRead(int device) {
        if (device >= 0) {
            DeferredChecks.resolve(device, false);
        }
    }

    /**
     * After a CUDA call's kernels: waits and throws now in strict mode; otherwise queues the
     * check. {@code errors} words the kernels' findings; {@code maskBad} (nullable, a device bool
     * scalar: a mask value other than 0 and 1) is read with them and reported as {@code
     * maskMessage}. Takes its own references; the caller keeps and closes its own.
     */
    static void afterKernels(int device, Pointer stream, DataErrors errors, Tensor maskBad, String maskMessage) {
        if (device < 0) {
            return;
        }
        if (DeferredChecks.strict()) {
            if (maskBad != null && maskBad.item_bool()) {
                throw new IllegalArgumentException(maskMessage);
            }
            errors.run(() -> Kernels.reportDataErrors(dev.gspo4j.internal.Device.CUDA, stream));
            return;
        }
        final long ticket = Kernels.deferDataErrors(stream);
        if (ticket == 0 && maskBad == null) {
            return;
        }
        DeferredChecks.add(device, new Pending(ticket, errors.retain(), maskBad == null ? null : new Tensor(maskBad), maskMessage));
    }

    private static final class Pending implements DeferredChecks.Check {
        private final long ticket;
        private final DataErrors errors;
        private final Tensor maskBad;
        private final String maskMessage;

        Pending(long ticket, DataErrors errors, Tensor maskBad, String maskMessage) {
            this.ticket = ticket;
            this.errors = errors;
            this.maskBad = maskBad;
            this.maskMessage = maskMessage;
        }

        @Override
        public void resolve(boolean later) {
            final String suffix = later ? LATER : "";
            RuntimeException found = null;
            try {
                Kernels.resolveDataErrors(ticket); // spends the ticket, with or without an error
            } catch (Gspo4jException e) {
                found = errors.translate(e, suffix);
            }
            // A bad mask is an argument error, checked before the kernels in strict mode: it comes first.
            if (maskBad != null && maskBad.item_bool()) {
                final IllegalArgumentException mask = new IllegalArgumentException(maskMessage + suffix);
                if (found != null) {
                    mask.addSuppressed(found);
                }
                throw mask;
            }
            if (found != null) {
                throw found;
            }
        }

        @Override
        public void close() {
            errors.close();
            if (maskBad != null) {
                maskBad.close();
            }
        }
    }
}
