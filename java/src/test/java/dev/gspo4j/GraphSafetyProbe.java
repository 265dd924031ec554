package dev.gspo4j;

import dev.gspo4j.internal.FusedLogProbs;
import java.util.concurrent.CountDownLatch;
import org.bytedeco.pytorch.NoGradGuard;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * Run in a child JVM by {@link GraphSafetyTest}: misuse that used to crash the JVM (a crash then
 * fails the test instead of killing the test runner). Each scenario throws AssertionError when the
 * library misbehaves without crashing, and prints {@code passed=1} when it behaves.
 *
 * <ul>
 *   <li>{@code metadata}: the logits' storage or strides change under NoGradGuard between compute()
 *       and either backward ({@code set_} to a smaller tensor, a smaller {@code as_strided_}), or
 *       before the first loss(): a clear IllegalStateException, no graph left registered.
 *   <li>{@code race N}: N rounds of closing a result while another thread runs {@code
 *       loss().backward()}, and N of closing it while another runs {@code result.backward()}.
 * </ul>
 */
public final class GraphSafetyProbe {
    public static void main(String[] args) throws Exception {
        switch (args[0]) {
            case "metadata" -> metadata();
            case "race" -> race(Integer.parseInt(args[1]));
            default -> throw new IllegalArgumentException(args[0]);
        }
        System.out.println("liveGraphs=" + FusedLogProbs.liveGraphs());
        System.out.println("passed=1");
    }

    private static void metadata() {
        final PolicyLoss grpo = PolicyLoss.grpo().entropyCoefficient(0.01).build();
        final PolicyLossModuleTest.Batch batch = new PolicyLossModuleTest.Batch(11, 2, 4, 50, 0.4);
        for (String change : new String[] {"set_", "as_strided_"}) {
            for (String path : new String[] {"direct", "graph", "loss() after the change"}) {
                try (Tensor logits = batch.logits(ScalarType.Float); Tensor targets = batch.targets(); Tensor old = batch.old();
                        Tensor adv = batch.sequenceAdvantages(); Tensor small = torch.randn(1, 2, 10)) {
                    final LossResult result = grpo.compute(LossInput.builder().logits(logits).targets(targets).oldLogProbs(old)
                            .advantages(adv).build());
                    final Tensor loss = path.equals("graph") ? result.loss() : null;
                    try (NoGradGuard noGrad = new NoGradGuard()) {
                        if (change.equals("set_")) {
                            logits.set_(small);
                        } else {
                            logits.as_strided_(new long[] {2, 2, 50}, new long[] {100, 50, 1});
                        }
                    }
                    final String what = change + ", " + path;
                    String message;
                    try {
                        if (path.equals("direct")) {
                            result.backward();
                        } else if (path.equals("graph")) {
                            loss.backward();
                        } else {
                            result.loss();
                        }
                        throw new AssertionError(what + ": no exception");
                    } catch (IllegalStateException e) {
                        // loss().backward() throws the hook's own exception, not the engine's wrapper.
                        message = e.getMessage();
                    }
                    check(message != null && message.contains("the logits' shape, strides or storage changed after compute()"),
                            what + ": " + message);
                    result.close();
                    check(FusedLogProbs.liveGraphs() == 0, what + ": a graph is left registered");
                }
            }
        }
    }

    private static void race(int rounds) throws Exception {
        final PolicyLoss gspo = PolicyLoss.gspo().build();
        final PolicyLossModuleTest.Batch batch = new PolicyLossModuleTest.Batch(12, 2, 8, 50, 0.4);
        int refused = 0;
        for (int i = 0; i < 2 * rounds; i++) {
            final boolean graph = i < rounds;
            try (Tensor logits = batch.logits(ScalarType.Float); Tensor targets = batch.targets();
                    Tensor adv = batch.sequenceAdvantages()) {
                final LossResult result = gspo.compute(LossInput.builder().logits(logits).targets(targets).advantages(adv).build());
                final Tensor loss = graph ? result.loss() : null;
                final CountDownLatch start = new CountDownLatch(1);
                final int[] failures = new int[1];
                final Thread backward = new Thread(() -> {
                    start.countDown();
                    try {
                        if (graph) {
                            loss.backward();
                        } else {
                            result.backward();
                        }
                    } catch (IllegalStateException e) {
                        failures[0]++; // closed first: refused
                    }
                });
                backward.start();
                start.await();
                if (i % 3 == 1) {
                    Thread.yield();
                }
                result.close();
                backward.join();
                refused += failures[0];
            }
        }
        check(FusedLogProbs.liveGraphs() == 0, "graphs left registered after the race: " + FusedLogProbs.liveGraphs());
        System.out.println("refused=" + refused);
    }

    private static void check(boolean condition, String message) {
        if (!condition) {
            throw new AssertionError(message);
        }
    }
}
