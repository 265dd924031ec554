package dev.gspo4j;

import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Random;
import java.util.function.Supplier;
import org.bytedeco.pytorch.FileStore;
import org.bytedeco.pytorch.NoGradGuard;
import org.bytedeco.pytorch.ProcessGroupGloo;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * One rank of {@link DataParallelTest}: {@code scenario rank world storeFile timeoutMillis}.
 *
 * <p>{@code equal}: every rank builds the same batch (fixed seed) of responses of unequal lengths,
 * some of them empty, takes its shard (unequal sizes; the last rank gets only empty responses),
 * and for each loss computes its share with the global counts, backwards through a float64 lm_head
 * and all-reduces that gradient with Gloo; the sum must equal the gradient of one call on the
 * whole batch, and the reduced metrics its metrics. Prints {@code cases=} and {@code failures=}.
 *
 * <p>{@code neverjoins} (the last rank is not started), {@code dies} (rank 1 halts after joining),
 * {@code stalls} (rank 1 joins and never calls the collective): the others must print
 * {@code failed=1} with {@code elapsedMillis=}.
 */
public final class DataParallelProbe {
    static final int HIDDEN = 6;
    static final int VOCAB = 11;
    static final int RESPONSES = 13;
    static final double GRADIENT_TOLERANCE = 1e-12;

    public static void main(String[] args) throws Exception {
        final String scenario = args[0];
        final int rank = Integer.parseInt(args[1]);
        final int world = Integer.parseInt(args[2]);
        final String storeFile = args[3];
        final Duration timeout = Duration.ofMillis(Long.parseLong(args[4]));
        final long start = System.nanoTime();
        final ProcessGroupGloo group;
        try {
            group = DataParallel.gloo(new FileStore(storeFile, world), rank, world, "127.0.0.1", timeout);
        } catch (DataParallelException e) {
            System.out.println("rendezvous: " + e.getMessage());
            System.out.println("failed=1");
            System.out.println("messageNamesRank=" + (e.getMessage().contains("rank " + rank + " of " + world) ? 1 : 0));
            System.out.println("elapsedMillis=" + (System.nanoTime() - start) / 1_000_000);
            return;
        }
        System.out.println("joinedMillis=" + (System.nanoTime() - start) / 1_000_000);
        switch (scenario) {
            case "equal" -> equivalence(group, rank, world, timeout);
            case "threshold" -> thresholdChecks(group, timeout);
            case "dies", "stalls" -> {
                if (rank == 1) {
                    if (scenario.equals("dies")) {
                        System.out.println("halting");
                        System.out.flush();
                        Runtime.getRuntime().halt(0);
                    }
                    Thread.sleep(3 * timeout.toMillis());
                    return;
                }
                final Batch batch = Batch.generate();
                final long before = System.nanoTime();
                try {
                    final Shard shard = batch.shard(0, world);
                    try (Inputs in = batch.input(shard, false, false, batch.weights())) {
                        DataParallel.allReduceCounts(group, in.input, timeout);
                    }
                    System.out.println("failed=0");
                } catch (DataParallelException e) {
                    System.out.println("collective: " + e.getMessage());
                    System.out.println("failed=1");
                    System.out.println("messageNamesRank=" + (e.getMessage().contains("rank " + rank + " of " + world) ? 1 : 0));
                }
                System.out.println("elapsedMillis=" + (System.nanoTime() - before) / 1_000_000);
                // Gloo's own threads may still wait on the dead peer: leave at once.
                System.out.flush();
                Runtime.getRuntime().halt(0);
            }
            default -> throw new IllegalArgumentException("unknown scenario " + scenario);
        }
    }

    /** topEntropyRho > 0: the loss selects top-entropy tokens, the ranks by the step's threshold. */
    record Case(String name, Supplier<PolicyLoss> loss, boolean padded, boolean tokenAdvantages, double topEntropyRho) {
        Case(String name, Supplier<PolicyLoss> loss, boolean padded, boolean tokenAdvantages) {
            this(name, loss, padded, tokenAdvantages, 0);
        }
    }

    static List<Case> cases() {
        final List<Case> cases = new ArrayList<>();
        cases.add(new Case("gspo", () -> PolicyLoss.gspo().clip(0.05, 0.05).build(), false, false));
        cases.add(new Case("gspo padded", () -> PolicyLoss.gspo().clip(0.05, 0.05).build(), true, false));
        cases.add(new Case("gspo token-mean kl entropy", () -> PolicyLoss.gspo().clip(0.05, 0.05).aggregation(Aggregation.TOKEN_MEAN)
                .kl(0.1, KlEstimator.K3).entropyCoefficient(0.01).build(), false, false));
        cases.add(new Case("gspo-token", () -> PolicyLoss.gspoToken().clip(0.05, 0.05).build(), false, true));
        for (Aggregation aggregation : Aggregation.values()) {
            cases.add(new Case("grpo " + aggregation, () -> PolicyLoss.grpo().aggregation(aggregation).kl(0.05, KlEstimator.K2)
                    .build(), false, true));
            cases.add(new Case("grpo padded " + aggregation, () -> PolicyLoss.grpo().aggregation(aggregation)
                    .entropyCoefficient(0.02).build(), true, false));
        }
        cases.add(new Case("grpo SEQ_MEAN_TOKEN_SUM_NORM lengthNorm", () -> PolicyLoss.drGrpo().lengthNorm(16).build(), false, false));
        cases.add(new Case("cispo", () -> PolicyLoss.cispo().build(), false, true));
        cases.add(new Case("sapo entropy", () -> PolicyLoss.sapo().entropyCoefficient(0.01).build(), false, false));
        cases.add(new Case("gmpo", () -> PolicyLoss.gmpo().build(), false, false));
        cases.add(new Case("gmpo token-mean kl", () -> PolicyLoss.gmpo().aggregation(Aggregation.TOKEN_MEAN).kl(0.1, KlEstimator.K1)
                .build(), true, false));
        cases.add(new Case("luspo", () -> PolicyLoss.luspo().clip(0.05, 0.05).build(), false, false));
        cases.add(new Case("vespo", () -> PolicyLoss.vespo().build(), false, false));
        cases.add(new Case("dppo-tv", () -> PolicyLoss.dppoTv().build(), false, true));
        cases.add(new Case("dppo-kl padded", () -> PolicyLoss.dppoKl().build(), true, false));
        cases.add(new Case("grpo top-entropy 0.3", () -> PolicyLoss.grpo().topEntropyQuantile(0.3).build(), false, true, 0.3));
        cases.add(new Case("gspo padded top-entropy 0.5", () -> PolicyLoss.gspo().clip(0.05, 0.05).topEntropyQuantile(0.5).build(), true,
                false, 0.5));
        return cases;
    }

    static void equivalence(ProcessGroupGloo group, int rank, int world, Duration timeout) {
        final Batch batch = Batch.generate();
        final Shard all = batch.all();
        final Shard mine = batch.shard(rank, world);
        System.out.println("shard responses=" + mine.responses.size());
        int failures = 0;
        int count = 0;
        for (Case c : cases()) {
            count++;
            final PolicyLoss loss = c.loss.get();
            final double[] wValues = batch.weights();
            // One call on the whole batch.
            final Tensor wRef;
            final double lossRef;
            final double[] refMetrics;
            try (Inputs in = batch.input(all, c.padded, c.tokenAdvantages, wValues); LossResult r = loss.compute(in.input)) {
                r.backward();
                wRef = in.weights.grad().clone();
                lossRef = r.loss().item_double();
                refMetrics = metricValues(r.metrics());
            }
            // This rank's share with the step's counts, gradients summed over the ranks.
            final Tensor wDp;
            final double lossDp;
            final double[] dpMetrics;
            // Top-entropy selection: the step's threshold, from this rank's entropies and every other's.
            Double threshold = null;
            if (c.topEntropyRho > 0) {
                try (Inputs probe = batch.input(mine, c.padded, c.tokenAdvantages, wValues); NoGradGuard noGrad = new NoGradGuard();
                        TokenLogProbs first = TokenLogProbs.computeWithEntropy(probe.input.logits, probe.input.targets, 1.0)) {
                    threshold = DataParallel.entropyThreshold(group, first.entropy(), probe.input.mask, c.topEntropyRho, timeout);
                }
            }
            try (Inputs in = batch.input(mine, c.padded, c.tokenAdvantages, wValues, threshold)) {
                final GlobalCounts counts = DataParallel.allReduceCounts(group, in.input, timeout);
                try (LossResult r = loss.compute(in.input, counts)) {
                    r.backward();
                    wDp = in.weights.grad().clone();
                    final Tensor shareLoss = r.loss().to(ScalarType.Double).reshape(1).contiguous();
                    DataParallel.allReduceSum(group, wDp, timeout);
                    DataParallel.allReduceSum(group, shareLoss, timeout);
                    lossDp = shareLoss.item_double();
                    try (LossMetrics reduced = DataParallel.reduceMetrics(group, loss, r.metrics(), timeout)) {
                        dpMetrics = metricValues(reduced);
                    }
                }
            }
            final double scale = Math.max(wRef.abs().max().item_double(), 1e-30);
            final double gradientError = wDp.sub(wRef).abs().max().item_double() / scale;
            final double lossError = Math.abs(lossDp - lossRef);
            String metricProblem = null;
            for (int i = 0; i < refMetrics.length; i++) {
                final double tolerance = 2e-5 * Math.max(1, Math.abs(refMetrics[i]));
                if (!(Math.abs(refMetrics[i] - dpMetrics[i]) <= tolerance)) {
                    metricProblem = "metric " + METRIC_NAMES[i] + ": single " + refMetrics[i] + " data-parallel " + dpMetrics[i];
                }
            }
            final boolean bad = !(gradientError <= GRADIENT_TOLERANCE) || !(lossError <= 1e-5 * Math.max(1, Math.abs(lossRef)))
                    || metricProblem != null || scale <= 1e-30;
            System.out.printf("case %-40s max|dW|/max|W.grad| = %.3g (max|W.grad| %.3g), loss %.8g vs %.8g%s%s%n", c.name,
                    gradientError, scale, lossRef, lossDp, metricProblem == null ? "" : ", " + metricProblem, bad ? "  FAILED" : "");
            if (bad) {
                failures++;
            }
        }
        System.out.println("cases=" + count);
        System.out.println("failures=" + failures);
    }

    /**
     * DataParallel.entropyThreshold on one rank: the quantile of the call's own counted entropies
     * (numpy's definition), the loss with it equal to the loss's own selection, and its argument
     * errors. Prints {@code failures=}.
     */
    static void thresholdChecks(ProcessGroupGloo group, Duration timeout) {
        final Batch batch = Batch.generate();
        int failures = 0;
        try (Inputs in = batch.input(batch.all(), false, false, batch.weights()); NoGradGuard noGrad = new NoGradGuard();
                TokenLogProbs first = TokenLogProbs.computeWithEntropy(in.input.logits, in.input.targets, 1.0)) {
            final Tensor entropy = first.entropy();
            final float[] h = new float[(int) entropy.numel()];
            final float[] m = new float[h.length];
            try (Tensor hc = entropy.contiguous(); Tensor mc = in.input.mask.contiguous()) {
                hc.data_ptr_float().get(h);
                mc.data_ptr_float().get(m);
            }
            final List<Double> counted = new ArrayList<>();
            for (int i = 0; i < h.length; i++) {
                if (m[i] != 0) {
                    counted.add((double) h[i]);
                }
            }
            for (double rho : new double[] {1.0, 0.5, 0.3, 0.01}) {
                final double want = RolloutCorrectionTest.quantile(counted.stream().mapToDouble(Double::doubleValue).toArray(), 1 - rho);
                final double got = DataParallel.entropyThreshold(group, entropy, in.input.mask, rho, timeout);
                final boolean ok = got == want;
                System.out.printf("threshold rho=%g: %.17g, numpy's quantile %.17g%s%n", rho, got, want, ok ? "" : "  FAILED");
                failures += ok ? 0 : 1;
            }
            // The loss with the rank's threshold is the loss's own selection, bit for bit.
            final PolicyLoss loss = PolicyLoss.grpo().topEntropyQuantile(0.3).build();
            final double threshold = DataParallel.entropyThreshold(group, entropy, in.input.mask, 0.3, timeout);
            try (Inputs given = batch.input(batch.all(), false, false, batch.weights(), threshold);
                    LossResult own = loss.compute(in.input); LossResult passed = loss.compute(given.input)) {
                final boolean same = own.lossValue().item_float() == passed.lossValue().item_float()
                        && own.metrics().entropyKeptFraction() == passed.metrics().entropyKeptFraction();
                System.out.println("loss with the threshold equals the loss's own selection: " + same);
                failures += same ? 0 : 1;
            }
            // No counted token: +Inf.
            try (Tensor none = torch.zeros_like(in.input.mask)) {
                final double t = DataParallel.entropyThreshold(group, entropy, none, 0.3, timeout);
                System.out.println("no counted token: " + t);
                failures += t == Double.POSITIVE_INFINITY ? 0 : 1;
            }
            // Argument errors name the argument; NaN is a NonFiniteDataException.
            try (Tensor wide = entropy.to(ScalarType.Double); Tensor shortMask = in.input.mask.narrow(0, 0, 3);
                    Tensor nan = entropy.clone()) {
                nan.data_ptr_float().put(0, Float.NaN);
                failures += expect(() -> DataParallel.entropyThreshold(group, wide, in.input.mask, 0.3, timeout),
                        IllegalArgumentException.class, "entropy must be float32");
                failures += expect(() -> DataParallel.entropyThreshold(group, entropy, shortMask, 0.3, timeout),
                        IllegalArgumentException.class, "mask has");
                failures += expect(() -> DataParallel.entropyThreshold(group, entropy, in.input.mask, 0, timeout),
                        IllegalArgumentException.class, "rho must be in (0, 1]");
                failures += expect(() -> DataParallel.entropyThreshold(group, nan, null, 0.3, timeout),
                        NonFiniteDataException.class, "NaN");
                failures += expect(() -> DataParallel.entropyThreshold(null, entropy, null, 0.3, timeout),
                        IllegalArgumentException.class, "group must be");
            }
        }
        System.out.println("cases=1");
        System.out.println("failures=" + failures);
    }

    private static int expect(Runnable call, Class<? extends RuntimeException> type, String part) {
        try {
            call.run();
        } catch (RuntimeException e) {
            final boolean ok = type.isInstance(e) && String.valueOf(e.getMessage()).contains(part);
            System.out.println((ok ? "refused: " : "FAILED, wrong refusal: ") + e);
            return ok ? 0 : 1;
        }
        System.out.println("FAILED: not refused (expected " + type.getSimpleName() + " with \"" + part + "\")");
        return 1;
    }

    static final String[] METRIC_NAMES = {"policyLoss", "kl", "entropy", "clipLow", "clipHigh", "dualClip", "ratioMean", "ratioMin",
        "ratioMax", "approxKl", "entropyMean", "sequences", "tokens"};

    static double[] metricValues(LossMetrics m) {
        return new double[] {m.policyLoss(), m.kl(), m.entropy(), m.clipFractionLow(), m.clipFractionHigh(), m.dualClipFraction(),
            m.ratioMean(), m.ratioMin(), m.ratioMax(), m.approxKl(), m.entropyMean(), m.sequences(), m.tokens()};
    }

    /** Responses b in this order. */
    record Shard(List<Integer> responses) {}

    /** A LossInput and the leaf lm_head weight its logits come from; closes its tensors. */
    static final class Inputs implements AutoCloseable {
        final LossInput input;
        final Tensor weights;
        final List<Tensor> owned;

        Inputs(LossInput input, Tensor weights, List<Tensor> owned) {
            this.input = input;
            this.weights = weights;
            this.owned = owned;
        }

        @Override
        public void close() {
            for (Tensor t : owned) {
                t.close();
            }
        }
    }

    /** The whole batch: per response its span (tokens, counted or not) and per token its data. */
    static final class Batch {
        final int[] span = new int[RESPONSES];
        final List<double[][]> hidden = new ArrayList<>(); // [span][HIDDEN] per response
        final List<int[]> targets = new ArrayList<>();
        final List<boolean[]> mask = new ArrayList<>();
        final List<double[]> old = new ArrayList<>();
        final List<double[]> ref = new ArrayList<>();
        final List<double[]> tokenAdvantage = new ArrayList<>();
        final double[] advantage = new double[RESPONSES];
        final boolean[] empty = new boolean[RESPONSES];
        final double[] weights = new double[HIDDEN * VOCAB];

        static Batch generate() {
            final Random random = new Random(20261203L);
            final Batch b = new Batch();
            for (int i = 0; i < b.weights.length; i++) {
                b.weights[i] = random.nextGaussian() * 0.7;
            }
            // Responses 10, 11 and 12 are empty (no counted token; 12 has no token at all).
            final int[] spans = {5, 1, 9, 3, 7, 2, 8, 4, 6, 3, 4, 2, 0};
            for (int r = 0; r < RESPONSES; r++) {
                b.span[r] = spans[r];
                b.empty[r] = r >= 10;
                final int n = spans[r];
                final double[][] h = new double[n][HIDDEN];
                final int[] y = new int[n];
                final boolean[] m = new boolean[n];
                final double[] o = new double[n];
                final double[] rf = new double[n];
                final double[] ta = new double[n];
                for (int t = 0; t < n; t++) {
                    for (int k = 0; k < HIDDEN; k++) {
                        h[t][k] = random.nextGaussian();
                    }
                    y[t] = random.nextInt(VOCAB);
                    m[t] = !b.empty[r] && (t == 0 || random.nextDouble() < 0.8);
                    final double lp = logProb(h[t], y[t], b.weights);
                    o[t] = lp + 0.25 * random.nextGaussian(); // off-policy: ratios around 1, some clipped
                    rf[t] = lp + 0.3 * random.nextGaussian();
                    ta[t] = random.nextGaussian();
                }
                b.hidden.add(h);
                b.targets.add(y);
                b.mask.add(m);
                b.old.add(o);
                b.ref.add(rf);
                b.tokenAdvantage.add(ta);
                b.advantage[r] = random.nextGaussian();
            }
            return b;
        }

        static double logProb(double[] h, int y, double[] w) {
            final double[] z = new double[VOCAB];
            double max = Double.NEGATIVE_INFINITY;
            for (int v = 0; v < VOCAB; v++) {
                for (int k = 0; k < HIDDEN; k++) {
                    z[v] += h[k] * w[k * VOCAB + v];
                }
                max = Math.max(max, z[v]);
            }
            double sum = 0;
            for (int v = 0; v < VOCAB; v++) {
                sum += Math.exp(z[v] - max);
            }
            return z[y] - max - Math.log(sum);
        }

        double[] weights() {
            return weights.clone();
        }

        Shard all() {
            final List<Integer> r = new ArrayList<>();
            for (int i = 0; i < RESPONSES; i++) {
                r.add(i);
            }
            return new Shard(r);
        }

        /** Unequal shards of the non-empty responses 0..9; the last rank gets only the empty ones 10..12. */
        Shard shard(int rank, int world) {
            final List<Integer> r = new ArrayList<>();
            if (rank == world - 1) {
                for (int i = 10; i < RESPONSES; i++) {
                    r.add(i);
                }
                return new Shard(r);
            }
            // world - 1 ranks share responses 0..9: 7 + 3 (world 3) or all 10 (world 2).
            final int[][] bounds = world == 2 ? new int[][] {{0, 10}} : new int[][] {{0, 7}, {7, 10}};
            for (int i = bounds[rank][0]; i < bounds[rank][1]; i++) {
                r.add(i);
            }
            return new Shard(r);
        }

        Inputs input(Shard shard, boolean padded, boolean tokenAdvantages, double[] w) {
            return input(shard, padded, tokenAdvantages, w, null);
        }

        // threshold: the caller's top-entropy threshold, or null.
        Inputs input(Shard shard, boolean padded, boolean tokenAdvantages, double[] w, Double threshold) {
            final List<Tensor> owned = new ArrayList<>();
            final int b = shard.responses.size();
            int longest = 0;
            int total = 0;
            for (int r : shard.responses) {
                longest = Math.max(longest, span[r]);
                total += span[r];
            }
            final int rows = padded ? b * longest : total;
            final double[] h = new double[rows * HIDDEN];
            final long[] y = new long[rows];
            final float[] m = new float[rows];
            final float[] o = new float[rows];
            final float[] rf = new float[rows];
            final float[] ta = new float[rows];
            final float[] a = new float[b];
            final long[] offsets = new long[b + 1];
            int row = 0;
            for (int i = 0; i < b; i++) {
                final int r = shard.responses.get(i);
                if (padded) {
                    row = i * longest;
                }
                offsets[i] = row;
                for (int t = 0; t < span[r]; t++, row++) {
                    System.arraycopy(hidden.get(r)[t], 0, h, row * HIDDEN, HIDDEN);
                    y[row] = targets.get(r)[t];
                    m[row] = mask.get(r)[t] ? 1 : 0;
                    o[row] = (float) old.get(r)[t];
                    rf[row] = (float) ref.get(r)[t];
                    ta[row] = (float) tokenAdvantage.get(r)[t];
                }
                a[i] = (float) advantage[r];
            }
            offsets[b] = padded ? (long) b * longest : row;
            final long[] tokenShape = padded ? new long[] {b, longest} : new long[] {rows};
            final Tensor weights = own(owned, Tensor.create(w).reshape(HIDDEN, VOCAB));
            weights.requires_grad_(true);
            final Tensor hiddenT = own(owned, rows == 0 ? torch.zeros(0, HIDDEN).to(ScalarType.Double) : Tensor.create(h).reshape(rows, HIDDEN));
            final Tensor logits2d = own(owned, own(owned, hiddenT.matmul(weights)).to(ScalarType.Float));
            final Tensor logits = padded ? own(owned, logits2d.reshape(b, longest, VOCAB)) : logits2d;
            final LossInput.Builder builder = LossInput.builder()
                    .logits(logits)
                    .targets(own(owned, tensor(y, tokenShape)))
                    .mask(own(owned, tensor(m, tokenShape)))
                    .oldLogProbs(own(owned, tensor(o, tokenShape)))
                    .refLogProbs(own(owned, tensor(rf, tokenShape)));
            if (tokenAdvantages) {
                builder.tokenAdvantages(own(owned, tensor(ta, tokenShape)));
            } else {
                builder.advantages(own(owned, tensor(a, new long[] {b})));
            }
            if (!padded) {
                builder.offsets(own(owned, tensor(offsets, new long[] {b + 1})));
            }
            if (threshold != null) {
                builder.entropyThreshold(threshold);
            }
            return new Inputs(builder.build(), weights, owned);
        }

        static Tensor own(List<Tensor> owned, Tensor t) {
            owned.add(t);
            return t;
        }

        static Tensor tensor(float[] values, long[] shape) {
            try (Tensor flat = values.length == 0 ? torch.zeros(0) : Tensor.create(values)) {
                return flat.reshape(shape);
            }
        }

        static Tensor tensor(long[] values, long[] shape) {
            try (Tensor flat = values.length == 0 ? torch.zeros(0).to(ScalarType.Long) : Tensor.create(values)) {
                return flat.reshape(shape);
            }
        }
    }
}
