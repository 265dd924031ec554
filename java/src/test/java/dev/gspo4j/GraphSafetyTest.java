package dev.gspo4j;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import dev.gspo4j.internal.FusedLogProbs;
import java.util.List;
import java.util.Map;
import org.bytedeco.pytorch.BoolOptional;
import org.bytedeco.pytorch.InferenceMode;
import org.bytedeco.pytorch.NoGradGuard;
import org.bytedeco.pytorch.Scalar;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorArrayRefOptional;
import org.bytedeco.pytorch.TensorBase;
import org.bytedeco.pytorch.TensorTensorHook;
import org.bytedeco.pytorch.VoidTensorHook;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;
import org.junit.jupiter.api.Test;

/**
 * Public call sequences that used to crash, compute a silently wrong gradient or keep memory:
 * changes to what the backward reads, grad modes, the leaf's hooks, repeated and concurrent
 * backwards. The crash reproducers run in a child JVM ({@link GraphSafetyProbe}).
 */
class GraphSafetyTest {
    static final PolicyLoss GRPO = PolicyLoss.grpo().build();
    static final PolicyLoss GRPO_ENTROPY = PolicyLoss.grpo().entropyCoefficient(0.05).build();

    static PolicyLossModuleTest.Batch batch(long seed) {
        return new PolicyLossModuleTest.Batch(seed, 2, 4, 30, 0.4);
    }

    static LossInput input(Tensor logits, Tensor targets, Tensor old, Tensor adv) {
        return LossInput.builder().logits(logits).targets(targets).oldLogProbs(old).advantages(adv).build();
    }

    /** The logits gradient of one fresh compute + loss().backward(), for reference. */
    static Tensor referenceGradient(PolicyLoss loss, PolicyLossModuleTest.Batch b) {
        try (Tensor logits = b.logits(ScalarType.Float); Tensor targets = b.targets(); Tensor old = b.old(); Tensor adv = b.sequenceAdvantages();
                LossResult r = loss.compute(input(logits, targets, old, adv))) {
            r.loss().backward();
            return logits.grad().clone();
        }
    }

    @Test
    void metadataChangesBeforeBackwardAreErrorsNotCrashes() throws Exception {
        final Map<String, Long> values = ChildJvm.run(List.of("-Xmx256m"), GraphSafetyProbe.class, "metadata");
        assertEquals(1L, values.get("passed"));
        assertEquals(0L, values.get("liveGraphs"));
    }

    @Test
    void closingDuringAnotherThreadsBackwardDoesNotCrash() throws Exception {
        final Map<String, Long> values = ChildJvm.run(List.of("-Xmx256m"), GraphSafetyProbe.class, "race", "1500");
        assertEquals(1L, values.get("passed"));
        assertEquals(0L, values.get("liveGraphs"));
    }

    @Test
    void inPlaceChangesToWhatTheBackwardReadsAreErrors() {
        final PolicyLossModuleTest.Batch b = batch(21);
        for (String path : new String[] {"direct", "graph"}) {
            for (String change : new String[] {"logits", "targets", "entropy"}) {
                final int before = FusedLogProbs.liveGraphs();
                try (Tensor logits = b.logits(ScalarType.Float); Tensor targets = b.targets(); Tensor old = b.old();
                        Tensor adv = b.sequenceAdvantages()) {
                    final LossResult r = GRPO_ENTROPY.compute(input(logits, targets, old, adv));
                    final Tensor loss = path.equals("graph") ? r.loss() : null;
                    try (NoGradGuard noGrad = new NoGradGuard(); Scalar three = new Scalar(3)) {
                        switch (change) {
                            case "logits" -> logits.mul_(three);
                            case "targets" -> targets.fill_(three);
                            default -> r.entropy().mul_(three);
                        }
                    }
                    final Class<? extends RuntimeException> type = path.equals("graph") ? RuntimeException.class
                            : IllegalStateException.class;
                    final RuntimeException e = assertThrows(type,
                            () -> {
                                if (loss != null) {
                                    loss.backward();
                                } else {
                                    r.backward();
                                }
                            }, path + " " + change);
                    final String what = path + ", " + change + ": " + e.getMessage();
                    assertTrue(e.getMessage().contains("modified by an in-place operation after compute(): version 0 at compute(), 1 now"),
                            what);
                    assertTrue(e.getMessage().contains(change.equals("entropy") ? "the entropy tensor (LossResult.entropy())" : "the " + change),
                            what);
                    assertTrue(e.getMessage().contains("Clone the tensor before modifying it, or call compute() after the change"), what);
                    assertTrue(!logits.grad().defined(), what + ": nothing may reach .grad");
                    r.close();
                    assertEquals(before, FusedLogProbs.liveGraphs(), what + ": the failed graph is released with its result");
                }
            }
        }
    }

    @Test
    void changesTheBackwardDoesNotReadAreFine() {
        // int32 targets are copied, and without an entropy term the entropy is not read.
        final PolicyLossModuleTest.Batch b = batch(22);
        try (Tensor want = referenceGradient(GRPO, b); Tensor logits = b.logits(ScalarType.Float); Tensor targets64 = b.targets();
                Tensor targets = targets64.to(ScalarType.Int); Tensor old = b.old(); Tensor adv = b.sequenceAdvantages();
                LossResult r = GRPO.compute(input(logits, targets, old, adv)); Scalar three = new Scalar(3)) {
            targets.fill_(three);
            r.entropy().mul_(three);
            r.backward();
            PolicyLossModuleTest.assertClose(want, logits.grad(), 1e-6, 1e-9, "gradient");
        }
    }

    @Test
    void lossFirstCalledUnderNoGradIsStillDifferentiable() {
        final PolicyLossModuleTest.Batch b = batch(23);
        final int before = FusedLogProbs.liveGraphs();
        try (Tensor want = referenceGradient(GRPO, b); Tensor logits = b.logits(ScalarType.Float); Tensor targets = b.targets();
                Tensor old = b.old(); Tensor adv = b.sequenceAdvantages()) {
            for (int i = 0; i < 50; i++) {
                try (LossResult r = GRPO.compute(input(logits, targets, old, adv))) {
                    try (NoGradGuard noGrad = new NoGradGuard()) {
                        assertTrue(r.loss().requires_grad());
                    }
                    if (i == 0) {
                        r.loss().backward();
                        PolicyLossModuleTest.assertClose(want, logits.grad(), 1e-6, 1e-9, "gradient");
                    }
                }
                assertEquals(before, FusedLogProbs.liveGraphs(), "iteration " + i);
            }
            try (LossResult r = GRPO.compute(input(logits, targets, old, adv))) {
                logits.set_requires_grad(false);
                final IllegalStateException e = assertThrows(IllegalStateException.class, r::backward);
                assertTrue(e.getMessage().contains("the logits no longer require grad"), e.getMessage());
                logits.set_requires_grad(true);
                assertEquals(before, FusedLogProbs.liveGraphs(), "a refused backward registers nothing");
            }
            try (LossResult r = GRPO.compute(input(logits, targets, old, adv)); InferenceMode inference = new InferenceMode()) {
                final IllegalStateException e = assertThrows(IllegalStateException.class, r::loss);
                assertTrue(e.getMessage().contains("inference mode"), e.getMessage());
                assertEquals(before, FusedLogProbs.liveGraphs(), "a refused loss() registers nothing");
            }
        }
    }

    @Test
    void aHookThrowingInsideTheGraphBackwardIsReportedAndReleased() {
        // What libtorch does with a Java exception thrown in a hook: a RuntimeException carrying
        // its class and message; the half-run graph is released with its tensors.
        final PolicyLossModuleTest.Batch b = batch(24);
        final int before = FusedLogProbs.liveGraphs();
        try (Tensor logits = b.logits(ScalarType.Float); Tensor targets = b.targets(); Tensor old = b.old(); Tensor adv = b.sequenceAdvantages()) {
            final int hook = logits.register_hook(new VoidTensorHook() {
                @Override
                public void call(TensorBase grad) {
                    grad.close();
                    throw new IllegalStateException("the user's hook failed");
                }
            });
            try (LossResult r = GRPO.compute(input(logits, targets, old, adv))) {
                final RuntimeException e = assertThrows(RuntimeException.class, () -> r.loss().backward());
                assertEquals("java.lang.IllegalStateException: the user's hook failed", e.getMessage());
            }
            assertEquals(before, FusedLogProbs.liveGraphs());
            logits.remove_hook(hook);
        }
    }

    @Test
    void directBackwardRunsTheLeafsHooks() {
        final PolicyLossModuleTest.Batch b = batch(25);
        try (Tensor logits = b.logits(ScalarType.Float); Tensor targets = b.targets(); Tensor old = b.old(); Tensor adv = b.sequenceAdvantages()) {
            final int[] calls = new int[1];
            final TensorTensorHook zeroing = new TensorTensorHook() {
                @Override
                public TensorBase call(TensorBase grad) {
                    calls[0]++;
                    try (Tensor g = new Tensor(grad)) {
                        grad.close();
                        return g.mul(new Scalar(0));
                    }
                }
            };
            final int hook = logits.register_hook(zeroing);
            try (LossResult r = GRPO.compute(input(logits, targets, old, adv))) {
                r.backward();
            }
            assertEquals(1, calls[0], "the leaf's hook ran once");
            assertEquals(0.0, PolicyLossModuleTest.maxAbs(logits.grad()), "the hook zeroed the gradient");
            logits.remove_hook(hook);
        }
    }

    @Test
    void directBackwardIsOncePerResultAndAccumulatesAcrossResults() {
        final PolicyLossModuleTest.Batch b = batch(26);
        try (Tensor once = referenceGradient(GRPO, b); Tensor logits = b.logits(ScalarType.Float); Tensor targets = b.targets();
                Tensor old = b.old(); Tensor adv = b.sequenceAdvantages()) {
            try (LossResult r = GRPO.compute(input(logits, targets, old, adv))) {
                r.backward();
                final IllegalStateException e = assertThrows(IllegalStateException.class, r::backward);
                assertTrue(e.getMessage().contains("backward() already ran for this result"), e.getMessage());
            }
            PolicyLossModuleTest.assertClose(once, logits.grad(), 1e-6, 1e-9, "one gradient, not two");
            try (LossResult r = GRPO.compute(input(logits, targets, old, adv))) {
                r.loss().backward();
                final IllegalStateException e = assertThrows(IllegalStateException.class, r::backward);
                assertTrue(e.getMessage().contains("loss().backward() already sent this loss's gradient"), e.getMessage());
            }
            try (LossResult r = GRPO.compute(input(logits, targets, old, adv))) {
                r.backward();
                final IllegalStateException e = assertThrows(IllegalStateException.class, () -> r.loss().backward());
                assertTrue(e.getMessage().contains("LossResult.backward() already sent this loss's gradient"), e.getMessage());
            }
            try (LossResult r = GRPO.compute(input(logits, targets, old, adv))) {
                // The graph built first, the direct path run, then the graph's backward: still refused.
                final Tensor graph = r.loss();
                r.backward(0.5);
                final IllegalStateException e = assertThrows(IllegalStateException.class, graph::backward);
                assertTrue(e.getMessage().contains("LossResult.backward() already sent this loss's gradient"), e.getMessage());
            }
            try (Tensor want = once.mul(new Scalar(3.5))) {
                PolicyLossModuleTest.assertClose(want, logits.grad(), 1e-6, 1e-9, "1 + 1 + 1 + 0.5 gradients accumulated, the refused ones none");
            }
        }
    }

    @Test
    void scaleOutsideFloat32AndDoubleBackwardAreClearErrors() {
        final PolicyLossModuleTest.Batch b = batch(27);
        final int before = FusedLogProbs.liveGraphs();
        try (Tensor logits = b.logits(ScalarType.Float); Tensor targets = b.targets(); Tensor old = b.old(); Tensor adv = b.sequenceAdvantages()) {
            try (LossResult r = GRPO.compute(input(logits, targets, old, adv))) {
                for (double scale : new double[] {1e39, -1e39, Double.NaN}) {
                    final IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> r.backward(scale));
                    assertTrue(e.getMessage().startsWith("scale must be finite and within the float32 range [-3.4028235E38, 3.4028235E38]"),
                            e.getMessage());
                }
                r.backward(-3e38); // allowed: nothing computed with it overflows the check
            }
            logits.mutable_grad().reset();
            try (LossResult r = GRPO.compute(input(logits, targets, old, adv))) {
                final RuntimeException e = assertThrows(RuntimeException.class,
                        () -> r.loss().backward(new Tensor(), new BoolOptional(false), true, new TensorArrayRefOptional()));
                assertTrue(e.getMessage().contains("does not support double backward (create_graph=true"), e.getMessage());
            }
            assertEquals(before, FusedLogProbs.liveGraphs());
        }
    }

    @Test
    void viewsAndExpandedLogitsGetTheRightGradientThroughTheGraph() {
        // A [B, T + 1, V] tensor read through its [:, :-1, :] view, and one row expanded to [B, T, V]
        // (strides 0, 0, 1): the graph attaches them without a pass, the gradient matches the one of
        // a contiguous copy.
        final PolicyLossModuleTest.Batch b = batch(28);
        try (Tensor targets = b.targets(); Tensor old = b.old(); Tensor adv = b.sequenceAdvantages();
                Tensor contiguous = b.logits(ScalarType.BFloat16); Tensor padRow = torch.randn(2, 1, 30);
                Tensor padBf16 = padRow.to(ScalarType.BFloat16); Tensor longer0 = torch.cat(new org.bytedeco.pytorch.TensorVector(contiguous.detach(), padBf16), 1);
                Tensor longer = longer0.set_requires_grad(true); Tensor view = longer.narrow(1, 0, 4)) {
            try (LossResult r = GRPO.compute(input(view, targets, old, adv))) {
                r.loss().backward();
            }
            try (LossResult r = GRPO.compute(input(contiguous, targets, old, adv))) {
                r.loss().backward();
            }
            try (Tensor got = longer.grad().narrow(1, 0, 4); Tensor rest = longer.grad().narrow(1, 4, 1)) {
                PolicyLossModuleTest.assertClose(contiguous.grad(), got, 0, 0, "view gradient");
                assertEquals(0.0, PolicyLossModuleTest.maxAbs(rest), "the row outside the view");
            }
        }
        try (Tensor targets = b.targets(); Tensor old = b.old(); Tensor adv = b.sequenceAdvantages();
                Tensor row0 = torch.randn(1, 1, 30); Tensor row = row0.set_requires_grad(true); Tensor expanded = row.expand(2, 4, 30);
                Tensor copyRow0 = row0.detach().clone(); Tensor copyRow = copyRow0.set_requires_grad(true);
                Tensor copy = copyRow.expand(2, 4, 30).contiguous()) {
            try (LossResult r = GRPO.compute(input(expanded, targets, old, adv))) {
                r.loss().backward();
            }
            try (LossResult r = GRPO.compute(input(copy, targets, old, adv))) {
                r.loss().backward();
            }
            PolicyLossModuleTest.assertClose(copyRow.grad(), row.grad(), 1e-6, 1e-9, "expanded logits' gradient");
        }
    }
}
