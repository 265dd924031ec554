package dev.gspo4j;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * Data-parallel equivalence across processes: 2 and 3 child JVMs on 127.0.0.1 meet through a
 * c10d FileStore in a temp dir and form a Gloo process group ({@link DataParallelProbe}). Each
 * rank computes its shard's loss with the global counts and Gloo sums the lm_head gradients: the
 * sum must equal the single-process gradient of the whole batch within 1e-12 of its largest entry.
 * Why that tight: the per-token gradients dLoss/dlogits are the same float32 numbers on a rank as
 * in the single call (batch invariance; the counts are exact and the scales are computed in
 * float64 from the same integers), so what remains is float64 rounding of the lm_head's matmul
 * and of the allreduce summing the ranks' parts in another order (about 1e-16 times the number
 * of terms). A count taken locally instead would be off by a factor (2x and more here).
 * A rank that never joins, dies, or never reaches the collective makes the others throw
 * {@link DataParallelException} within the time-out, and no child outlives its bound.
 */
class DataParallelTest {
    private static final long TIMEOUT_MILLIS = 4000;
    private static final long CHILD_LIMIT_SECONDS = 120;
    private static final List<String> JVM = List.of("-Xmx256m", "-Dgspo4j.threads=1");

    @TempDir
    Path temp;

    private List<ChildJvm.Outcome> ranks(String scenario, int world, int started) throws Exception {
        final Path store = temp.resolve(scenario + "-" + world + ".store");
        Files.deleteIfExists(store);
        final List<List<String>> args = new ArrayList<>();
        for (int rank = 0; rank < started; rank++) {
            args.add(List.of(scenario, Integer.toString(rank), Integer.toString(world), store.toString(),
                    Long.toString(TIMEOUT_MILLIS)));
        }
        return ChildJvm.runAll(JVM, DataParallelProbe.class, CHILD_LIMIT_SECONDS, args);
    }

    private static void assertEquivalent(List<ChildJvm.Outcome> outcomes) {
        final int cases = DataParallelProbe.cases().size();
        for (int rank = 0; rank < outcomes.size(); rank++) {
            final ChildJvm.Outcome o = outcomes.get(rank);
            assertEquals(0, o.exitCode(), "rank " + rank + " exited with " + o.exitCode() + ":\n" + o.output());
            assertEquals(Long.valueOf(cases), o.values().get("cases"), "rank " + rank + ":\n" + o.output());
            assertEquals(Long.valueOf(0), o.values().get("failures"), "rank " + rank + ":\n" + o.output());
        }
    }

    @Test
    void twoRanksGiveTheSingleProcessGradient() throws Exception {
        assertEquivalent(ranks("equal", 2, 2));
    }

    @Test
    void threeRanksGiveTheSingleProcessGradient() throws Exception {
        assertEquivalent(ranks("equal", 3, 3));
    }

    private static void assertFailedInTime(ChildJvm.Outcome o, String what) {
        assertEquals(0, o.exitCode(), what + ": the rank crashed:\n" + o.output());
        assertEquals(Long.valueOf(1), o.values().get("failed"), what + ": no DataParallelException:\n" + o.output());
        assertEquals(Long.valueOf(1), o.values().get("messageNamesRank"), what + ": the message names no rank:\n" + o.output());
        final Long elapsed = o.values().get("elapsedMillis");
        // The rendezvous waits up to the time-out for each of its steps; a few of them, plus a loaded machine.
        assertTrue(elapsed != null && elapsed <= 6 * TIMEOUT_MILLIS, what + ": took " + elapsed + " ms:\n" + o.output());
    }

    @Test
    void aRankThatNeverJoinsFailsTheOthersInTime() throws Exception {
        final List<ChildJvm.Outcome> outcomes = ranks("neverjoins", 3, 2);
        for (ChildJvm.Outcome o : outcomes) {
            assertFailedInTime(o, "rank 2 never started");
            assertTrue(o.output().contains("never joined"), o.output());
        }
    }

    @Test
    void aRankThatDiesFailsTheOthersInTime() throws Exception {
        final List<ChildJvm.Outcome> outcomes = ranks("dies", 2, 2);
        assertFailedInTime(outcomes.get(0), "rank 1 died");
    }

    @Test
    void aRankThatStallsFailsTheOthersInTime() throws Exception {
        final List<ChildJvm.Outcome> outcomes = ranks("stalls", 2, 2);
        assertFailedInTime(outcomes.get(0), "rank 1 stalled");
    }

    @Test
    void theStepsEntropyThresholdOnOneRankIsTheCallsOwn() throws Exception {
        final ChildJvm.Outcome o = ranks("threshold", 1, 1).get(0);
        assertEquals(0, o.exitCode(), "exited with " + o.exitCode() + ":\n" + o.output());
        assertEquals(Long.valueOf(0), o.values().get("failures"), o.output());
    }

    @Test
    void localCountsAreTheKernelsCounts() {
        final DataParallelProbe.Batch batch = DataParallelProbe.Batch.generate();
        for (boolean padded : new boolean[] {false, true}) {
            try (DataParallelProbe.Inputs in = batch.input(batch.all(), padded, false, batch.weights());
                    LossResult r = PolicyLoss.grpo().build().compute(in.input)) {
                final GlobalCounts counts = DataParallel.localCounts(in.input);
                assertEquals(r.metrics().sequences(), counts.responses(), "B'");
                assertEquals(r.metrics().tokens(), counts.tokens(), "tokens");
                assertEquals(DataParallelProbe.RESPONSES, counts.batch(), "B");
                assertEquals(9, counts.longest(), "longest response / T");
            }
        }
    }

    @Test
    void theOwnCountsChangeNothingAndDoubledCountsHalveTheLoss() {
        final DataParallelProbe.Batch batch = DataParallelProbe.Batch.generate();
        for (DataParallelProbe.Case c : DataParallelProbe.cases()) {
            final PolicyLoss loss = c.loss().get();
            try (DataParallelProbe.Inputs in = batch.input(batch.all(), c.padded(), c.tokenAdvantages(), batch.weights())) {
                final GlobalCounts own = DataParallel.localCounts(in.input);
                final GlobalCounts doubled = new GlobalCounts(2 * own.responses(), 2 * own.tokens(), 2 * own.batch(), own.longest());
                try (LossResult plain = loss.compute(in.input); LossResult same = loss.compute(in.input, own);
                        LossResult half = loss.compute(in.input, doubled)) {
                    final float value = plain.loss().item_float();
                    assertEquals(value, same.loss().item_float(), c.name() + ": its own counts");
                    // Every denominator doubled: an exact factor 1/2 (a power of two).
                    assertEquals(value / 2, half.loss().item_float(), c.name() + ": doubled counts");
                }
            }
        }
    }

    @Test
    void countsBelowTheCallsOwnAreRejected() {
        final DataParallelProbe.Batch batch = DataParallelProbe.Batch.generate();
        try (DataParallelProbe.Inputs in = batch.input(batch.all(), false, false, batch.weights())) {
            final GlobalCounts own = DataParallel.localCounts(in.input);
            final GlobalCounts fewer = new GlobalCounts(own.responses() - 1, own.tokens(), own.batch(), own.longest());
            final RuntimeException e = assertThrows(RuntimeException.class, () -> PolicyLoss.gspo().build().compute(in.input, fewer));
            assertTrue(String.valueOf(e.getMessage()).contains("responses_total") && e.getMessage().contains("every rank"),
                    e.toString());
        }
    }

    @Test
    void countsAreCheckedAndAddUp() {
        assertThrows(IllegalArgumentException.class, () -> new GlobalCounts(3, 2, 5, 4), "responses > tokens");
        assertThrows(IllegalArgumentException.class, () -> new GlobalCounts(3, 9, 2, 4), "responses > batch");
        assertThrows(IllegalArgumentException.class, () -> new GlobalCounts(-1, 9, 2, 4), "negative");
        assertEquals(new GlobalCounts(5, 12, 9, 7), new GlobalCounts(2, 5, 4, 7).plus(new GlobalCounts(3, 7, 5, 3)));
    }
}
