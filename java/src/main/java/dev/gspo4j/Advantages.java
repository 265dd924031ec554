package dev.gspo4j;

import dev.gspo4j.internal.Device;
import dev.gspo4j.internal.Kernels;
import dev.gspo4j.internal.TokenLayout;
import dev.gspo4j.internal.Tensors;
import java.util.Arrays;
import org.bytedeco.javacpp.Pointer;
import org.bytedeco.javacpp.FloatPointer;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * Advantages from rewards (SPEC.md "Advantages", "PPO advantages"), by gspo4j's kernels. Inputs are
 * not modified; results are new float32 tensors on the rewards' device (or new arrays), owned by
 * the caller. Stateless and thread-safe.
 */
public final class Advantages {
    /** SPEC.md's default eps of MEAN_STD. */
    public static final double DEFAULT_EPS = 1e-6;

    private Advantages() {}

    /**
     * Group-relative advantages of outcome rewards {@code [B]}, groups being contiguous runs of
     * {@code groupSize} responses (the G samples of one prompt). All-equal groups get exactly 0.
     */
    public static Tensor group(Tensor rewards, int groupSize, AdvantageMode mode) {
        return group(rewards, groupSize, mode, DEFAULT_EPS);
    }

    public static Tensor group(Tensor rewards, int groupSize, AdvantageMode mode, double eps) {
        return compute(rewards, groupSize, null, mode, eps);
    }

    /** Group-relative advantages where {@code groupIds [B]} (integer) names each response's group. */
    public static Tensor groupByIds(Tensor rewards, Tensor groupIds, AdvantageMode mode, double eps) {
        if (groupIds == null) {
            throw new IllegalArgumentException("groupIds must not be null");
        }
        return compute(rewards, 0, groupIds, mode, eps);
    }

    /** {@link #group(Tensor, int, AdvantageMode)} on a Java array. */
    public static float[] group(float[] rewards, int groupSize, AdvantageMode mode) {
        if (rewards == null) {
            throw new IllegalArgumentException("rewards must not be null");
        }
        try (FloatPointer in = new FloatPointer(rewards); FloatPointer out = new FloatPointer(Math.max(1, rewards.length))) {
            out.limit(rewards.length);
            PreparedInput.translate(() -> Kernels.groupAdvantages(Device.CPU, null, rewards.length, in, groupSize, null, mode,
                    DEFAULT_EPS, true, out));
            final float[] result = new float[rewards.length];
            out.get(result);
            return result;
        }
    }

    private static Tensor compute(Tensor rewards, long groupSize, Tensor groupIds, AdvantageMode mode, double eps) {
        if (rewards == null) {
            throw new IllegalArgumentException("rewards must not be null");
        }
        if (rewards.dim() != 1 || !torch.isFloatingType(rewards.scalar_type())) {
            throw new IllegalArgumentException("rewards must be a floating-point [B] tensor, got " + PreparedInput.typeName(rewards)
                    + " of shape " + PreparedInput.shapeOf(rewards));
        }
        final long count = rewards.size(0);
        try (Tensor r = rewards.to(ScalarType.Float); Tensor rc = r.contiguous();
                Tensor ids = groupIds == null ? null : idsCopy(groupIds, count, rewards)) {
            final Tensor out = Tensors.empty(new long[] {count}, ScalarType.Float, rewards);
            try {
                final Device device = Tensors.device(rewards);
                final Pointer stream = Tensors.stream(rewards);
                PreparedInput.translate(() -> Kernels.groupAdvantages(device, stream, count, Tensors.floats(rc),
                        groupSize, Tensors.longs(ids), mode, eps, true, Tensors.floats(out)));
                PreparedInput.translate(() -> Kernels.reportDataErrors(device, stream));
            } catch (RuntimeException e) {
                out.close();
                throw e;
            }
            return out;
        }
    }

    private static Tensor idsCopy(Tensor groupIds, long count, Tensor rewards) {
        if (!Arrays.equals(Tensors.shape(groupIds), new long[] {count}) || !torch.isIntegralType(groupIds.scalar_type(), false)) {
            throw new IllegalArgumentException("groupIds must be an integer [" + count + "] tensor, got "
                    + PreparedInput.typeName(groupIds) + " of shape " + PreparedInput.shapeOf(groupIds));
        }
        if (!groupIds.device().equals(rewards.device())) {
            throw new IllegalArgumentException("groupIds must be on the rewards' device");
        }
        try (Tensor l = groupIds.to(ScalarType.Long)) {
            return l.contiguous();
        }
    }

    /** GAE's advantages and returns, float32, shaped like the rewards. */
    public record Gae(Tensor advantages, Tensor returns) implements AutoCloseable {
        @Override
        public void close() {
            advantages.close();
            returns.close();
        }
    }

    /**
     * Generalised advantage estimation over padded per-token rewards and values {@code [B, T]};
     * masked tokens are skipped (advantage and return 0).
     *
     * @param mask {@code [B, T]} 0/1, or null
     */
    public static Gae gae(Tensor rewards, Tensor values, Tensor mask, double gamma, double lambda) {
        if (rewards == null || values == null) {
            throw new IllegalArgumentException("rewards and values must not be null");
        }
        if (rewards.dim() != 2) {
            throw new IllegalArgumentException("rewards must be [B, T], got shape " + PreparedInput.shapeOf(rewards));
        }
        final long[] shape = Tensors.shape(rewards);
        for (Tensor t : new Tensor[] {values, mask}) {
            if (t != null && !Arrays.equals(Tensors.shape(t), shape)) {
                throw new IllegalArgumentException("values and mask must have the rewards' shape " + Arrays.toString(shape)
                        + ", got " + PreparedInput.shapeOf(t));
            }
            if (t != null && !t.device().equals(rewards.device())) {
                throw new IllegalArgumentException("values and mask must be on the rewards' device ("
                        + PreparedInput.deviceName(rewards) + "), got " + PreparedInput.deviceName(t));
            }
        }
        try (Tensor r = rewards.to(ScalarType.Float).contiguous(); Tensor v = values.to(ScalarType.Float).contiguous();
                Tensor m = mask == null ? null : mask.ne(new org.bytedeco.pytorch.Scalar(0)).contiguous()) {
            final Tensor advantages = Tensors.empty(shape, ScalarType.Float, rewards);
            final Tensor returns = Tensors.empty(shape, ScalarType.Float, rewards);
            try {
                final Device device = Tensors.device(rewards);
                final Pointer stream = Tensors.stream(rewards);
                PreparedInput.translate(() -> Kernels.gae(device, stream, TokenLayout.padded(shape[0], shape[1]),
                        Tensors.floats(r), Tensors.floats(v), Tensors.bytes(m), gamma, lambda, true, Tensors.floats(advantages),
                        Tensors.floats(returns)));
                PreparedInput.translate(() -> Kernels.reportDataErrors(device, stream));
            } catch (RuntimeException e) {
                advantages.close();
                returns.close();
                throw e;
            }
            return new Gae(advantages, returns);
        }
    }
}
