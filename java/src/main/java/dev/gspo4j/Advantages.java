package dev.gspo4j;

import dev.gspo4j.internal.Device;
import dev.gspo4j.internal.Kernels;
import dev.gspo4j.internal.TokenLayout;
import dev.gspo4j.internal.Tensors;
import java.util.Arrays;
import org.bytedeco.javacpp.FloatPointer;
import org.bytedeco.javacpp.Pointer;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * Advantages from rewards (<a href="https://github.com/gspo4j/gspo4j/blob/main/docs/math.md#advantages">docs/math.md,
 * "Advantages"</a>: group advantages and GAE), by gspo4j's kernels. Tensors may be on the CPU or
 * on a CUDA device (the kernels run where the rewards are; every tensor of a call on one device).
 * Inputs are
 * not modified; results are new float32 tensors on the rewards' device (or new arrays), owned by
 * the caller. Every intermediate is released before a method returns or throws. Stateless and
 * thread-safe.
 *
 * <p>Means are taken in float64, so they cannot overflow, but the advantages are float32: MEAN's
 * {@code r - mean} and RLOO's {@code r - mean of the others} of rewards beyond about 1.7e38 in
 * magnitude may not fit, and such a call is an {@link IllegalArgumentException}, not an Inf.
 */
public final class Advantages {
    /** The default eps of MEAN_STD's {@code (r - mean) / (std + eps)}. */
    public static final double DEFAULT_EPS = 1e-6;

    private Advantages() {}

    /**
     * Group-relative advantages of outcome rewards {@code [B]}, groups being contiguous runs of
     * {@code groupSize} responses (the G samples of one prompt). All-equal groups get exactly 0.
     * The eps of MEAN_STD is {@link #DEFAULT_EPS}.
     *
     * @param rewards {@code [B]}, any floating dtype (read as float32), CPU or CUDA; NaN or Inf is a
     *     {@link NonFiniteDataException}
     * @param groupSize the responses per group, G: at least 1 (at least 2 for RLOO), dividing B
     * @param mode how each reward is compared with its group
     * @return {@code [B]} float32 advantages on the rewards' device, owned by the caller
     * @throws IllegalArgumentException when an argument is null, of the wrong shape or dtype, or
     *     the advantages overflow float32
     */
    public static Tensor group(Tensor rewards, int groupSize, AdvantageMode mode) {
        return group(rewards, groupSize, mode, DEFAULT_EPS);
    }

    /**
     * {@link #group(Tensor, int, AdvantageMode)} with MEAN_STD's eps given.
     *
     * @param rewards {@code [B]}, any floating dtype (read as float32), CPU or CUDA
     * @param groupSize the responses per group, G, dividing B
     * @param mode how each reward is compared with its group
     * @param eps MEAN_STD's {@code eps} in {@code (r - mean) / (std + eps)}: finite and {@code >= 0}
     * @return {@code [B]} float32 advantages on the rewards' device, owned by the caller
     */
    public static Tensor group(Tensor rewards, int groupSize, AdvantageMode mode, double eps) {
        return compute(rewards, groupSize, null, mode, eps);
    }

    /**
     * Group-relative advantages where {@code groupIds} names each response's group (the groups
     * need not be contiguous or of one size).
     *
     * @param rewards {@code [B]}, any floating dtype (read as float32), CPU or CUDA
     * @param groupIds {@code [B]}, any integer dtype, on the rewards' device: equal ids are one group
     * @param mode how each reward is compared with its group
     * @param eps MEAN_STD's {@code eps}: finite and {@code >= 0} ({@link #DEFAULT_EPS} is the default)
     * @return {@code [B]} float32 advantages on the rewards' device, owned by the caller
     */
    public static Tensor groupByIds(Tensor rewards, Tensor groupIds, AdvantageMode mode, double eps) {
        TensorArgs.requireOpen(groupIds, "groupIds");
        return compute(rewards, 0, groupIds, mode, eps);
    }

    /**
     * {@link #group(Tensor, int, AdvantageMode)} on a Java array (on the CPU).
     *
     * @param rewards the B rewards
     * @param groupSize the responses per group, G, dividing B
     * @param mode how each reward is compared with its group
     * @return a new array of the B advantages
     */
    public static float[] group(float[] rewards, int groupSize, AdvantageMode mode) {
        if (rewards == null) {
            throw new IllegalArgumentException("rewards must not be null");
        }
        requireMode(mode);
        final DataErrors errors = new DataErrors(0, "").name("rewards", "rewards", null, DataErrors.Axis.FLAT);
        try (FloatPointer in = new FloatPointer(rewards); FloatPointer out = new FloatPointer(Math.max(1, rewards.length))) {
            out.limit(rewards.length);
            errors.run(() -> Kernels.groupAdvantages(Device.CPU, null, rewards.length, in, groupSize, null, mode,
                    DEFAULT_EPS, true, out));
            final float[] result = new float[rewards.length];
            out.get(result);
            for (int i = 0; i < result.length; i++) {
                if (!Float.isFinite(result[i])) {
                    throw new IllegalArgumentException(overflowMessage(mode, "rewards[" + i + "] = " + rewards[i]));
                }
            }
            return result;
        }
    }

    private static void requireMode(AdvantageMode mode) {
        if (mode == null) {
            throw new IllegalArgumentException("mode must not be null (MEAN_STD, MEAN, RLOO or MEAN_BATCH_STD)");
        }
    }

    private static String overflowMessage(AdvantageMode mode, String where) {
        return mode + " advantages overflow float32 at " + where + ": the reward minus its group's mean exceeds 3.4e38; "
                + "rewards within +-1.7e38 cannot overflow, so scale the rewards down";
    }

    private static Tensor compute(Tensor rewards, long groupSize, Tensor groupIds, AdvantageMode mode, double eps) {
        TensorArgs.requireReadable(rewards, "rewards");
        CudaChecks.beforeCall(CudaChecks.deviceOf(rewards));
        requireMode(mode);
        if (rewards.dim() != 1 || !torch.isFloatingType(rewards.scalar_type())) {
            throw new IllegalArgumentException("rewards must be a floating-point [B] tensor, got " + PreparedInput.typeName(rewards)
                    + " of shape " + PreparedInput.shapeOf(rewards));
        }
        final long count = rewards.size(0);
        try (Tensor rc = floatCopy(rewards); Tensor ids = groupIds == null ? null : idsCopy(groupIds, count, rewards)) {
            final DataErrors errors = new DataErrors(0, "").name("rewards", "rewards", rc, DataErrors.Axis.FLAT).groupIds(ids);
            final Tensor out = Tensors.empty(new long[] {count}, ScalarType.Float, rewards);
            try {
                final Device device = Tensors.device(rewards);
                final Pointer stream = Tensors.stream(rewards);
                errors.run(() -> Kernels.groupAdvantages(device, stream, count, Tensors.floats(rc),
                        groupSize, Tensors.longs(ids), mode, eps, true, Tensors.floats(out)));
                errors.run(() -> Kernels.reportDataErrors(device, stream));
                if (mode != AdvantageMode.MEAN_STD && count > 0) {
                    // The rewards were checked finite, so a non-finite advantage is a float32
                    // overflow of r - mean. (On a GPU this reads one flag after the wait above.)
                    try (Tensor finite = torch.isfinite(out); Tensor all = finite.all()) {
                        if (!all.item_bool()) {
                            throw new IllegalArgumentException(overflowMessage(mode, "a reward of magnitude up to "
                                    + maxAbs(rc)));
                        }
                    }
                }
            } catch (RuntimeException e) {
                out.close();
                throw e;
            }
            return out;
        }
    }

    private static double maxAbs(Tensor t) {
        try (Tensor abs = t.abs(); Tensor max = abs.amax()) {
            return max.item_double();
        }
    }

    // A float32 contiguous copy (or a new reference, when it already is one) with the negative
    // bit resolved; the caller closes it.
    private static Tensor floatCopy(Tensor t) {
        try (Tensor resolved = TensorArgs.resolved(t); Tensor typed = resolved.to(ScalarType.Float)) {
            return typed.contiguous();
        }
    }

    private static Tensor idsCopy(Tensor groupIds, long count, Tensor rewards) {
        TensorArgs.requireReadable(groupIds, "groupIds");
        if (!Arrays.equals(Tensors.shape(groupIds), new long[] {count}) || !torch.isIntegralType(groupIds.scalar_type(), false)) {
            throw new IllegalArgumentException("groupIds must be an integer [" + count + "] tensor, got "
                    + PreparedInput.typeName(groupIds) + " of shape " + PreparedInput.shapeOf(groupIds));
        }
        requireSameDevice(groupIds, "groupIds", rewards);
        try (Tensor resolved = TensorArgs.resolved(groupIds); Tensor l = resolved.to(ScalarType.Long)) {
            return l.contiguous();
        }
    }

    private static void requireSameDevice(Tensor t, String name, Tensor rewards) {
        try (org.bytedeco.pytorch.Device device = t.device(); org.bytedeco.pytorch.Device rewardsDevice = rewards.device()) {
            if (!device.equals(rewardsDevice)) {
                throw new IllegalArgumentException(name + " must be on the rewards' device (" + PreparedInput.deviceName(rewards)
                        + "), got " + PreparedInput.deviceName(t) + "; " + name + ".to(rewards.device()) moves it");
            }
        }
    }

    /**
     * GAE's advantages and returns, float32, shaped like the rewards ({@code [B, T]}) and on their
     * device; {@link #close()} releases both.
     *
     * @param advantages {@code [B, T]} float32, 0 on masked tokens
     * @param returns {@code [B, T]} float32, {@code advantages + values} on counted tokens, 0 on masked ones
     */
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
     * @param rewards {@code [B, T]} per-token rewards, any floating dtype (read as float32), CPU or CUDA
     * @param values {@code [B, T]} the value model's estimates, floating, on the rewards' device
     * @param mask {@code [B, T]} of 0/1 (bool, integer or floating; any other value, NaN included,
     *     is an error, as for the loss's mask) on the rewards' device, or null (every token counts)
     * @param gamma the discount, in [0, 1]
     * @param lambda GAE's lambda, in [0, 1]
     * @return the advantages and returns, owned by the caller (close it, or each tensor)
     */
    public static Gae gae(Tensor rewards, Tensor values, Tensor mask, double gamma, double lambda) {
        TensorArgs.requireReadable(rewards, "rewards");
        CudaChecks.beforeCall(CudaChecks.deviceOf(rewards));
        TensorArgs.requireReadable(values, "values");
        if (mask != null) {
            TensorArgs.requireReadable(mask, "mask");
        }
        if (rewards.dim() != 2) {
            throw new IllegalArgumentException("rewards must be [B, T], got shape " + PreparedInput.shapeOf(rewards));
        }
        final long[] shape = Tensors.shape(rewards);
        for (Tensor t : new Tensor[] {values, mask}) {
            if (t == null) {
                continue;
            }
            final String name = t == values ? "values" : "mask";
            if (!Arrays.equals(Tensors.shape(t), shape)) {
                throw new IllegalArgumentException(name + " must have the rewards' shape " + Arrays.toString(shape) + ", got "
                        + PreparedInput.shapeOf(t));
            }
            requireSameDevice(t, name, rewards);
        }
        for (Tensor t : new Tensor[] {rewards, values}) {
            if (!torch.isFloatingType(t.scalar_type())) {
                throw new IllegalArgumentException((t == rewards ? "rewards" : "values") + " must be a floating-point tensor, got "
                        + PreparedInput.typeName(t));
            }
        }
        try (Tensor r = floatCopy(rewards); Tensor v = floatCopy(values); Tensor m = mask == null ? null : PreparedInput.validMask(mask, "mask")) {
            final DataErrors errors = new DataErrors(shape[1], " (a counted position: mask it out or fix the value)")
                    .name("rewards", "rewards", r, DataErrors.Axis.TOKENS).name("values", "values", v, DataErrors.Axis.TOKENS);
            final Tensor advantages = Tensors.empty(shape, ScalarType.Float, rewards);
            final Tensor returns = Tensors.empty(shape, ScalarType.Float, rewards);
            try {
                final Device device = Tensors.device(rewards);
                final Pointer stream = Tensors.stream(rewards);
                errors.run(() -> Kernels.gae(device, stream, TokenLayout.padded(shape[0], shape[1]),
                        Tensors.floats(r), Tensors.floats(v), Tensors.bytes(m), gamma, lambda, true, Tensors.floats(advantages),
                        Tensors.floats(returns)));
                errors.run(() -> Kernels.reportDataErrors(device, stream));
            } catch (RuntimeException e) {
                advantages.close();
                returns.close();
                throw e;
            }
            return new Gae(advantages, returns);
        }
    }
}
