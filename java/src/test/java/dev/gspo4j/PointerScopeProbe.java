package dev.gspo4j;

import dev.gspo4j.internal.FusedLogProbs;
import org.bytedeco.javacpp.PointerScope;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * Run in a fresh JVM by {@link PointerScopeTest}: gspo4j's first call happens inside a {@link
 * PointerScope}; after it closes, many results computed in scopes backward outside them.
 */
public final class PointerScopeProbe {
    public static void main(String[] args) {
        final int rounds = Integer.parseInt(args[0]);
        final PolicyLossModuleTest.Batch b = new PolicyLossModuleTest.Batch(31, 3, 4, 41, 0.4);
        final PolicyLoss loss = PolicyLoss.gspo().build();
        long left = 0;
        for (int i = 0; i < rounds; i++) {
            try (Tensor source = b.logits(ScalarType.Float); Tensor logits = PointerScopeTest.fresh(source); Tensor targets = b.targets(); Tensor mask = b.mask(); Tensor old = b.old();
                    Tensor adv = b.sequenceAdvantages()) {
                final long[] before = PointerScopeTest.counts(logits);
                final LossResult result;
                try (PointerScope scope = new PointerScope()) {
                    result = loss.compute(LossInput.builder().logits(logits).targets(targets).mask(mask).oldLogProbs(old).advantages(adv).build());
                }
                try (result) {
                    if (i % 2 == 0) {
                        result.backward();
                    } else {
                        result.loss().backward();
                    }
                }
                final long[] after = PointerScopeTest.counts(logits);
                left += after[0] - before[0];
            }
            System.gc(); // a collection must not free anything a later round uses
        }
        System.out.println("liveGraphs=" + FusedLogProbs.liveGraphs());
        System.out.println("leftStorageRefs=" + left);
        System.out.println("ok=1");
    }
}
