package dev.gspo4j;

import java.util.List;
import java.util.function.Supplier;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorOptions;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * Run in a child JVM by {@link RejectionLeakTest}: calls that are rejected after their inputs were
 * converted (bad targets, bad mask, bad shapes, NaN inputs, bad offsets, missing options...), and
 * GAE and group advantages, in a loop over inputs made once; prints the resident memory after a
 * warm-up and at the end. Each rejected loss call converts about 1.5 MB of O(N) inputs (int32
 * targets, float64 log-probs and advantages, a float mask) before it fails. {@code -Dleak.trace}
 * prints the resident memory every 500 iterations.
 */
public final class RejectionLeakProbe {
    public static void main(String[] args) throws Exception {
        final int iterations = Integer.parseInt(args[0]);
        final int warmUp = iterations / 10;
        final int b = 8, t = 4096, v = 16;
        final TensorOptions ints = new TensorOptions(ScalarType.Int);
        final PolicyLoss grpo = PolicyLoss.grpo().build();
        final PolicyLoss needsRef = PolicyLoss.grpo().kl(0.1, KlEstimator.K3).build();
        final PolicyLoss gspo = PolicyLoss.gspo().build();
        try (Tensor logits = torch.randn(b, t, v); Tensor packedLogits = logits.reshape(b * t, v);
                Tensor targets = torch.randint(v, new long[] {b, t}, ints); Tensor badTargets = targets.clone();
                Tensor packedTargets = targets.reshape(b * t);
                Tensor mask = torch.ones(b, t); Tensor badMask = mask.clone();
                Tensor old = torch.randn(new long[] {b, t}, new TensorOptions(ScalarType.Double)); Tensor nanOld = old.clone();
                Tensor packedOld = old.reshape(b * t);
                Tensor adv = torch.randn(new long[] {b}, new TensorOptions(ScalarType.Double));
                Tensor tokenAdv = torch.randn(new long[] {b, t}, new TensorOptions(ScalarType.Double));
                Tensor wrongShape = torch.randn(b, t + 1);
                Tensor badOffsets = Tensor.create(0L, 4096L, 4000L, 12288L, 16384L, 20480L, 24576L, 28672L, 32768L);
                Tensor shortOffsets = Tensor.create(0L, 4096L, 8192L, 12288L, 16384L, 20480L, 24576L, 28672L, 32767L);
                Tensor rewards = torch.randn(b, t); Tensor values = torch.randn(b, t); Tensor nanValues = values.clone();
                Tensor groupRewards = torch.randn(4096); Tensor nanRewards = groupRewards.clone();
                Tensor ids = torch.randint(64, new long[] {4096}, ints)) {
            badTargets.data_ptr_int().put(b * t - 1, v);
            badMask.data_ptr_float().put(b * t - 1, 0.5f);
            nanOld.data_ptr_double().put(b * t - 1, Double.NaN);
            nanValues.data_ptr_float().put(b * t - 1, Float.NaN);
            nanRewards.data_ptr_float().put(4095, Float.NaN);
            final List<Supplier<Object>> rejected = List.of(
                    () -> grpo.compute(LossInput.builder().logits(logits).targets(badTargets).mask(mask).oldLogProbs(old).advantages(adv).build()),
                    () -> grpo.compute(LossInput.builder().logits(logits).targets(targets).mask(badMask).oldLogProbs(old).advantages(adv).build()),
                    () -> grpo.compute(LossInput.builder().logits(logits).targets(targets).mask(mask).oldLogProbs(old).refLogProbs(wrongShape)
                            .advantages(adv).build()),
                    () -> grpo.compute(LossInput.builder().logits(logits).targets(targets).mask(mask).oldLogProbs(nanOld).advantages(adv).build()),
                    () -> needsRef.compute(LossInput.builder().logits(logits).targets(targets).mask(mask).oldLogProbs(old).advantages(adv).build()),
                    () -> gspo.compute(LossInput.builder().logits(logits).targets(targets).mask(mask).oldLogProbs(old).tokenAdvantages(tokenAdv)
                            .build()),
                    () -> grpo.compute(LossInput.builder().logits(packedLogits).targets(packedTargets).offsets(badOffsets).oldLogProbs(packedOld)
                            .advantages(adv).build()),
                    () -> grpo.compute(LossInput.builder().logits(packedLogits).targets(packedTargets).offsets(shortOffsets).oldLogProbs(packedOld)
                            .advantages(adv).build()),
                    () -> Advantages.gae(rewards, nanValues, mask, 0.9, 0.9),
                    () -> Advantages.gae(rewards, values, badMask, 0.9, 0.9),
                    () -> Advantages.gae(rewards, values, mask, 1.5, 0.9),
                    () -> Advantages.group(nanRewards, 8, AdvantageMode.MEAN_STD),
                    () -> Advantages.groupByIds(nanRewards, ids, AdvantageMode.RLOO, 1e-6));
            long afterWarmUp = 0;
            long rejections = 0;
            for (int i = 0; i < iterations; i++) {
                if (i == warmUp) {
                    System.gc();
                    afterWarmUp = LeakProbe.rss();
                }
                if (i % 500 == 0 && System.getProperty("leak.trace") != null) {
                    System.out.println("trace " + i + " rss " + LeakProbe.rss() / 1000000 + " MB");
                }
                for (Supplier<Object> call : rejected) {
                    try {
                        call.get();
                        throw new AssertionError("a bad call was accepted");
                    } catch (IllegalArgumentException expected) {
                        rejections++;
                    }
                }
                // Successful advantages: their results closed here, their intermediates by them.
                try (Advantages.Gae gae = Advantages.gae(rewards, values, mask, 0.99, 0.95);
                        Tensor group = Advantages.group(groupRewards, 8, AdvantageMode.MEAN_STD);
                        Tensor byIds = Advantages.groupByIds(groupRewards, ids, AdvantageMode.MEAN, 1e-6)) {
                    if (gae.advantages().numel() != (long) b * t || group.numel() != 4096 || byIds.numel() != 4096) {
                        throw new AssertionError("wrong sizes");
                    }
                }
            }
            System.gc();
            Thread.sleep(500);
            System.out.println("warmup=" + afterWarmUp);
            System.out.println("end=" + LeakProbe.rss());
            System.out.println("rejections=" + rejections);
        }
    }
}
