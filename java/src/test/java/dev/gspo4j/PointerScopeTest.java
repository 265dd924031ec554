package dev.gspo4j;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;

import dev.gspo4j.internal.FusedLogProbs;
import java.util.List;
import java.util.Map;
import org.bytedeco.javacpp.PointerScope;
import org.bytedeco.pytorch.BoolOptional;
import org.bytedeco.pytorch.Storage;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorArrayRefOptional;
import org.bytedeco.pytorch.global.torch.ScalarType;
import org.junit.jupiter.api.Test;

/**
 * gspo4j's own native objects stay out of the caller's {@link PointerScope}: a result computed
 * inside a scope backwards after the scope closed (it was an NPE: the scope had freed the graph
 * state), and {@link LossResult#close()} releases every reference gspo4j took.
 */
class PointerScopeTest {

    private static final PolicyLoss LOSS = PolicyLoss.grpo().kl(0.05, KlEstimator.K3).entropyCoefficient(0.01).build();

    private static LossInput input(Tensor logits, Tensor targets, Tensor mask, Tensor old, Tensor ref, Tensor adv) {
        return LossInput.builder().logits(logits).targets(targets).mask(mask).oldLogProbs(old).refLogProbs(ref).advantages(adv).build();
    }

    /** The gradient of the loss computed outside any scope. */
    private static float[] reference(PolicyLossModuleTest.Batch b) {
        try (Tensor source = b.logits(ScalarType.Float); Tensor logits = PointerScopeTest.fresh(source); Tensor targets = b.targets(); Tensor mask = b.mask(); Tensor old = b.old();
                Tensor ref = b.ref(); Tensor adv = b.sequenceAdvantages(); LossResult r = LOSS.compute(input(logits, targets, mask, old, ref, adv))) {
            r.backward();
            return ErgonomicsTest.floats(logits.grad());
        }
    }

    /**
     * A leaf copy of {@code source} that requires grad, held by nothing but the returned wrapper
     * (a wrapper left to the garbage collector would change the counts below when it is collected).
     */
    static Tensor fresh(Tensor source) {
        try (Tensor detached = source.detach()) {
            final Tensor copy = detached.clone();
            copy.requires_grad_(true); // returns `copy` itself (JavaCPP hands back the same object)
            return copy;
        }
    }

    /** Storage and TensorImpl reference counts of {@code t} (each less the one our probe adds). */
    static long[] counts(Tensor t) {
        try (Storage storage = t.storage()) {
            return new long[] {storage.use_count(), t.use_count()};
        }
    }

    @Test
    void aResultComputedInAScopeBackwardsAfterTheScopeClosed() {
        final PolicyLossModuleTest.Batch b = new PolicyLossModuleTest.Batch(21, 4, 6, 97, 0.4);
        final float[] expected = reference(b);
        for (String path : List.of("direct", "graph", "graph built in the scope")) {
            try (Tensor source = b.logits(ScalarType.Float); Tensor logits = PointerScopeTest.fresh(source); Tensor targets = b.targets(); Tensor mask = b.mask(); Tensor old = b.old();
                    Tensor ref = b.ref(); Tensor adv = b.sequenceAdvantages()) {
                final long[] before = counts(logits);
                final LossResult result;
                try (PointerScope scope = new PointerScope()) {
                    result = LOSS.compute(input(logits, targets, mask, old, ref, adv));
                    if (path.equals("graph built in the scope")) {
                        result.loss();
                    }
                    result.metrics().asMap(); // read inside the scope too
                }
                try (result) {
                    if (path.equals("direct")) {
                        result.backward();
                    } else {
                        result.loss().backward();
                    }
                    assertArrayEquals(expected, ErgonomicsTest.floats(logits.grad()), path);
                    assertEquals(result.metrics().tokens(), result.metrics().asMap().get("gspo4j/tokens"), 0, path);
                }
                assertArrayEquals(before, counts(logits), path + ": every reference to the logits released by close()");
                assertEquals(0, FusedLogProbs.liveGraphs(), path + ": no graph state left");
            }
        }
    }

    @Test
    void aBackwardInsideAnotherScopeAndRetainedGraphs() {
        final PolicyLossModuleTest.Batch b = new PolicyLossModuleTest.Batch(22, 3, 5, 61, 0.4);
        try (Tensor source = b.logits(ScalarType.BFloat16); Tensor logits = PointerScopeTest.fresh(source); Tensor targets = b.targets(); Tensor mask = b.mask(); Tensor old = b.old();
                Tensor ref = b.ref(); Tensor adv = b.sequenceAdvantages()) {
            final long[] before = counts(logits);
            final LossResult result;
            final Tensor loss;
            try (PointerScope first = new PointerScope()) {
                result = LOSS.compute(input(logits, targets, mask, old, ref, adv));
                loss = result.loss();
            }
            // Two backwards through the retained graph, each inside its own scope, closed before the next.
            try (PointerScope second = new PointerScope(); Tensor implicitOne = new Tensor(); BoolOptional retain = new BoolOptional(true);
                    TensorArrayRefOptional inputs = new TensorArrayRefOptional()) {
                loss.backward(implicitOne, retain, false, inputs);
            }
            try (PointerScope third = new PointerScope()) {
                loss.backward();
            }
            result.close();
            // bf16 logits: compare with a bf16 reference of twice the gradient, computed without scopes.
            try (Tensor logits2 = b.logits(ScalarType.BFloat16); Tensor targets2 = b.targets(); Tensor mask2 = b.mask(); Tensor old2 = b.old();
                    Tensor ref2 = b.ref(); Tensor adv2 = b.sequenceAdvantages();
                    LossResult r2 = LOSS.compute(input(logits2, targets2, mask2, old2, ref2, adv2))) {
                r2.backward(2.0);
                assertArrayEquals(ErgonomicsTest.floats(logits2.grad()), ErgonomicsTest.floats(logits.grad()));
            }
            assertArrayEquals(before, counts(logits), "every reference to the logits released");
            assertEquals(0, FusedLogProbs.liveGraphs());
        }
    }

    @Test
    void gspo4jsFirstUseInsideAScopeInAFreshJvm() throws Exception {
        // Static native objects (the graph's deleters) made while the first scope was open must not die with it.
        final Map<String, Long> out = ChildJvm.run(List.of("-Xmx512m"), PointerScopeProbe.class, "200");
        assertEquals(1L, out.get("ok"));
        assertEquals(0L, out.get("liveGraphs"));
        assertEquals(0L, out.get("leftStorageRefs"));
    }
}
