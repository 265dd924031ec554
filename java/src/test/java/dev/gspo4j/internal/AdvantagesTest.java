package dev.gspo4j.internal;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import dev.gspo4j.AdvantageMode;
import dev.gspo4j.Gspo4jException;
import java.util.Random;
import org.bytedeco.javacpp.BytePointer;
import org.bytedeco.javacpp.FloatPointer;
import org.bytedeco.javacpp.LongPointer;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.EnumSource;

/** Group advantages and GAE against the double-precision reference. */
class AdvantagesTest {

    static double[] groupAdvantages(double[] rewards, long groupSize, long[] groupIds, AdvantageMode mode, double eps) {
        try (FloatPointer r = NativeBuffers.floats(rewards); LongPointer ids = NativeBuffers.longs(groupIds);
                FloatPointer out = NativeBuffers.floats(rewards.length, Float.NaN)) {
            Kernels.groupAdvantages(Device.CPU, null, rewards.length, r, groupSize, ids, mode, eps, true, out);
            return NativeBuffers.toArray(out, rewards.length);
        }
    }

    static double[] randomRewards(Random random, int count) {
        final double[] rewards = new double[count];
        for (int i = 0; i < count; i++) {
            rewards[i] = random.nextInt(3) == 0 ? (float) random.nextGaussian() : random.nextInt(2);
        }
        return rewards;
    }

    @ParameterizedTest
    @EnumSource(AdvantageMode.class)
    void contiguousGroupsMatchReference(AdvantageMode mode) {
        final Random random = new Random(mode.ordinal());
        for (int groupSize : new int[] {2, 3, 8, 16}) {
            final double[] rewards = randomRewards(random, groupSize * 7);
            final long[] ids = new long[rewards.length];
            for (int i = 0; i < ids.length; i++) {
                ids[i] = i / groupSize;
            }
            final double[] want = Reference.groupAdvantages(rewards, ids, mode, 1e-6);
            final double[] got = groupAdvantages(rewards, groupSize, null, mode, 1e-6);
            for (int i = 0; i < want.length; i++) {
                assertEquals(want[i], got[i], 1e-6 * Math.max(1, Math.abs(want[i])), mode + " G=" + groupSize + " [" + i + "]");
            }
            // The same groups given by id.
            assertEquals(java.util.Arrays.toString(got), java.util.Arrays.toString(groupAdvantages(rewards, 0, ids, mode, 1e-6)));
        }
    }

    @ParameterizedTest
    @EnumSource(AdvantageMode.class)
    void groupIdsInAnyOrderAndOfUnequalSize(AdvantageMode mode) {
        final Random random = new Random(7);
        final double[] rewards = randomRewards(random, 40);
        final long[] ids = new long[rewards.length];
        for (int i = 0; i < ids.length; i++) {
            ids[i] = 1000 - 7 * random.nextInt(6); // six groups, interleaved, sizes vary
        }
        final double[] want = Reference.groupAdvantages(rewards, ids, mode, 1e-6);
        final double[] got = groupAdvantages(rewards, 0, ids, mode, 1e-6);
        for (int i = 0; i < want.length; i++) {
            assertEquals(want[i], got[i], 1e-6 * Math.max(1, Math.abs(want[i])), mode + " [" + i + "]");
        }
    }

    @ParameterizedTest
    @EnumSource(AdvantageMode.class)
    void equalRewardsGiveExactlyZero(AdvantageMode mode) {
        // 0.1f summed 7 times and divided by 7 is not exactly 0.1f: rounding residue over eps would
        // give advantages of 1e-2 or more without the all-equal rule.
        final double[] rewards = new double[14];
        java.util.Arrays.fill(rewards, 0, 7, 0.1f);
        java.util.Arrays.fill(rewards, 7, 14, 0.7f);
        for (double a : groupAdvantages(rewards, 7, null, mode, 1e-6)) {
            assertEquals(0.0, a);
        }
    }

    @Test
    void groupOfOne() {
        final double[] rewards = {0.5, 1.0, -2.0};
        for (AdvantageMode mode : new AdvantageMode[] {AdvantageMode.MEAN_STD, AdvantageMode.MEAN}) {
            for (double a : groupAdvantages(rewards, 1, null, mode, 1e-6)) {
                assertEquals(0.0, a);
            }
        }
        final Gspo4jException e = assertThrows(Gspo4jException.class,
                () -> groupAdvantages(rewards, 1, null, AdvantageMode.RLOO, 1e-6));
        assertTrue(e.getMessage().contains("RLOO needs at least 2"), e.getMessage());
        final Gspo4jException byId = assertThrows(Gspo4jException.class,
                () -> groupAdvantages(new double[] {1, 2, 3}, 0, new long[] {4, 4, 9}, AdvantageMode.RLOO, 1e-6));
        assertTrue(byId.getMessage().contains("group id 9"), byId.getMessage());
    }

    @Test
    void badGroupArguments() {
        final double[] rewards = {1, 2, 3, 4, 5};
        final IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                () -> groupAdvantages(rewards, 2, null, AdvantageMode.MEAN, 1e-6));
        assertTrue(e.getMessage().contains("does not divide"), e.getMessage());
        assertThrows(IllegalArgumentException.class, () -> groupAdvantages(rewards, 0, null, AdvantageMode.MEAN, 1e-6));
        assertThrows(IllegalArgumentException.class, () -> groupAdvantages(rewards, 5, null, AdvantageMode.MEAN, -1));
        assertThrows(IllegalArgumentException.class, () -> groupAdvantages(rewards, 5, null, null, 1e-6));
        assertThrows(IllegalArgumentException.class, () -> groupAdvantages(rewards, 5, new long[] {1, 2}, AdvantageMode.MEAN, 1e-6));
        final Gspo4jException nan = assertThrows(Gspo4jException.class,
                () -> groupAdvantages(new double[] {1, Double.NaN}, 2, null, AdvantageMode.MEAN, 1e-6));
        assertTrue(nan.getMessage().contains("rewards[1]"), nan.getMessage());
        assertEquals(0, groupAdvantages(new double[0], 4, null, AdvantageMode.MEAN, 1e-6).length);
        // Native re-checks, past the Java facade.
        try (FloatPointer r = NativeBuffers.floats(rewards); FloatPointer out = new FloatPointer(5L)) {
            assertEquals(1, Gspo4jLibrary.gspo4j_group_advantages(0, null, 5, r, 0, null, 0, 1e-6, 1, out));
            assertEquals(1, Gspo4jLibrary.gspo4j_group_advantages(0, null, 5, r, 5, null, 4, 1e-6, 1, out));
            assertEquals(1, Gspo4jLibrary.gspo4j_group_advantages(0, null, 5, null, 5, null, 0, 1e-6, 1, out));
            assertEquals(1, Gspo4jLibrary.gspo4j_group_advantages(0, null, 5, r, 2, null, 0, 1e-6, 1, out));
        }
    }

    @Test
    void gaeMatchesReference() {
        final Random random = new Random(99);
        for (boolean packed : new boolean[] {false, true}) {
            final int batch = 6;
            final int seq = 11;
            long[] offsets = null;
            final Reference.Batch shape;
            if (packed) {
                offsets = new long[batch + 1];
                for (int b = 0; b < batch; b++) {
                    offsets[b + 1] = offsets[b] + (b == 2 ? 0 : 1 + random.nextInt(14));
                }
                shape = Reference.Batch.packed(offsets);
            } else {
                shape = Reference.Batch.padded(batch, seq);
            }
            final int tokens = packed ? (int) offsets[batch] : batch * seq;
            final double[] rewards = new double[tokens];
            final double[] values = new double[tokens];
            final boolean[] mask = new boolean[tokens];
            for (int i = 0; i < tokens; i++) {
                rewards[i] = random.nextInt(4) == 0 ? (float) random.nextGaussian() : 0;
                values[i] = (float) random.nextGaussian();
                mask[i] = random.nextDouble() < 0.8;
            }
            for (boolean withMask : new boolean[] {false, true}) {
                final boolean[] m = withMask ? mask : null;
                final double[][] want = Reference.gae(shape, rewards, values, m, 0.99, 0.95);
                try (LongPointer o = NativeBuffers.longs(offsets); FloatPointer r = NativeBuffers.floats(rewards);
                        FloatPointer v = NativeBuffers.floats(values); BytePointer mp = NativeBuffers.mask(m);
                        FloatPointer advantages = NativeBuffers.floats(tokens, Float.NaN);
                        FloatPointer returns = NativeBuffers.floats(tokens, Float.NaN)) {
                    final TokenLayout layout = packed ? TokenLayout.packed(o, batch, tokens) : TokenLayout.padded(batch, seq);
                    Kernels.gae(Device.CPU, null, layout, r, v, mp, 0.99, 0.95, true, advantages, returns);
                    for (int i = 0; i < tokens; i++) {
                        assertEquals(want[0][i], advantages.get(i), 1e-5 * Math.max(1, Math.abs(want[0][i])), "advantage " + i);
                        assertEquals(want[1][i], returns.get(i), 1e-5 * Math.max(1, Math.abs(want[1][i])), "return " + i);
                    }
                }
            }
        }
    }

    @Test
    void gaeRejectsBadInput() {
        try (FloatPointer r = NativeBuffers.floats(new double[] {1, Double.POSITIVE_INFINITY}); FloatPointer v = NativeBuffers.floats(new double[] {0, 0});
                FloatPointer a = new FloatPointer(2L); FloatPointer ret = new FloatPointer(2L)) {
            final Gspo4jException e = assertThrows(Gspo4jException.class,
                    () -> Kernels.gae(Device.CPU, null, TokenLayout.padded(1, 2), r, v, null, 0.9, 0.9, true, a, ret));
            assertTrue(e.getMessage().contains("rewards[1]"), e.getMessage());
            assertThrows(IllegalArgumentException.class,
                    () -> Kernels.gae(Device.CPU, null, TokenLayout.padded(1, 2), r, v, null, 1.5, 0.9, true, a, ret));
            assertThrows(IllegalArgumentException.class,
                    () -> Kernels.gae(Device.CPU, null, TokenLayout.padded(1, 3), r, v, null, 0.9, 0.9, true, a, ret));
            assertThrows(IllegalArgumentException.class, () -> new TokenLayout(2, 3, 5, null));
        }
    }
}
