package dev.gspo4j.examples;

import dev.gspo4j.AdvantageMode;
import dev.gspo4j.Advantages;
import dev.gspo4j.DataParallel;
import dev.gspo4j.Gspo4j;
import dev.gspo4j.LossInput;
import dev.gspo4j.LossMetrics;
import dev.gspo4j.LossResult;
import dev.gspo4j.PolicyLoss;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Locale;
import java.util.Random;
import org.bytedeco.openblas.global.openblas_nolapack;
import org.bytedeco.pytorch.AdamW;
import org.bytedeco.pytorch.AdamWOptions;
import org.bytedeco.pytorch.Backend;
import org.bytedeco.pytorch.EmbeddingImpl;
import org.bytedeco.pytorch.FileStore;
import org.bytedeco.pytorch.LinearImpl;
import org.bytedeco.pytorch.NoGradGuard;
import org.bytedeco.pytorch.ProcessGroupGloo;
import org.bytedeco.pytorch.Scalar;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorVector;
import org.bytedeco.pytorch.global.torch;
import org.knowm.xchart.BitmapEncoder;
import org.knowm.xchart.XYChart;
import org.knowm.xchart.XYChartBuilder;

/**
 * GSPO (and GRPO on the same seeds, for comparison) training a tiny libtorch policy on a task with a
 * verifiable reward: the prompt names a digit d, the response is {@code length} digits, and the
 * reward is the fraction of positions k holding (d + k) mod 10, i.e. counting up from d. A random
 * policy scores 0.1.
 *
 * <p>Per step: sample {@code groupSize} responses to each of {@code prompts} prompts at the sampling
 * temperature, keep their log-probs as the old log-probs, form group advantages (mean/std), then
 * run several minibatch AdamW updates on that rollout (off-policy after the first, which is where
 * GSPO's sequence ratio and its clipping act).
 */
public final class DigitsDemo {
    static final int DIGITS = 10;
    static final int BOS = DIGITS; // the "previous token" of the first position

    /** Run settings; {@link #defaults()} is what the README's command runs. */
    public record Config(int steps, int prompts, int groupSize, int length, int epochs, int minibatches, double learningRate,
            double temperature, long seed) {
        public static Config defaults() {
            return new Config(300, 16, 8, 6, 2, 2, 3e-3, 1.0, 7);
        }

        public Config withSteps(int value) {
            return new Config(value, prompts, groupSize, length, epochs, minibatches, learningRate, temperature, seed);
        }
    }

    /** Per-step statistics of one run. */
    public record Curve(String name, double[] reward, double[] clipFraction, double[] approxKl, double seconds) {
        public double startReward() {
            return mean(reward, 0, Math.min(5, reward.length));
        }

        public double endReward() {
            return mean(reward, Math.max(0, reward.length - 5), reward.length);
        }

        private static double mean(double[] values, int from, int to) {
            double sum = 0;
            for (int i = from; i < to; i++) {
                sum += values[i];
            }
            return to > from ? sum / (to - from) : 0;
        }
    }

    /**
     * The policy: embeddings of the prompt digit, the previous token and the position, summed, then
     * a two-layer MLP to logits over the ten digits. Markov in the previous token, so sampling and
     * teacher-forced scoring see the same distribution.
     */
    static final class Policy implements AutoCloseable {
        final EmbeddingImpl prompt = new EmbeddingImpl(DIGITS, 32);
        final EmbeddingImpl previous = new EmbeddingImpl(DIGITS + 1, 32);
        final EmbeddingImpl position;
        final LinearImpl hidden = new LinearImpl(32, 64);
        final LinearImpl head = new LinearImpl(64, DIGITS);

        Policy(int length) {
            position = new EmbeddingImpl(length, 32);
        }

        TensorVector parameters() {
            final TensorVector all = new TensorVector();
            for (var module : new org.bytedeco.pytorch.Module[] {prompt, previous, position, hidden, head}) {
                final TensorVector p = module.parameters();
                for (long i = 0; i < p.size(); i++) {
                    all.push_back(p.get(i));
                }
            }
            return all;
        }

        /** Logits [B, T, 10] for prompts [B] and previous tokens [B, T] (teacher forcing). */
        Tensor logits(Tensor prompts, Tensor previousTokens) {
            final long length = previousTokens.size(1);
            try (Tensor p = prompt.forward(prompts).unsqueeze(1); Tensor q = previous.forward(previousTokens);
                    Tensor positions = torch.arange(new Scalar(length)); Tensor r = position.forward(positions).unsqueeze(0);
                    Tensor sum = p.add(q).add(r); Tensor h = hidden.forward(sum); Tensor a = h.relu()) {
                return head.forward(a);
            }
        }

        @Override
        public void close() {
            for (var module : new org.bytedeco.pytorch.Module[] {prompt, previous, position, hidden, head}) {
                module.close();
            }
        }
    }

    /** Trains one policy from `config.seed` with `loss`; prints a progress bar when asked. */
    public static Curve train(String name, PolicyLoss.Builder lossBuilder, Config config, boolean progress) {
        return train(name, lossBuilder, config, null, progress);
    }

    /**
     * {@link #train(String, PolicyLoss.Builder, Config, boolean)} as one rank of a data-parallel
     * group (null: one process). Every rank starts from the same weights (the same seed), samples
     * its own share of the step's prompts (its own seed), computes each minibatch's loss with the
     * counts of all ranks' minibatches ({@link DataParallel#allReduceCounts}), and sums the
     * gradients over the ranks before the optimizer step, so the ranks keep identical weights and
     * take the single-process step of the union of their minibatches. The curve is the step's
     * reward over all ranks, the metrics reduced over all ranks.
     */
    public static Curve train(String name, PolicyLoss.Builder lossBuilder, Config config, Backend group, boolean progress) {
        final int rank = group == null ? 0 : group.getRank();
        final int ranks = group == null ? 1 : group.getSize();
        torch.manual_seed(config.seed());
        final Random random = new Random(config.seed() + 1_000_003L * rank);
        final PolicyLoss loss = lossBuilder.temperature(config.temperature()).build();
        // This rank's prompts: the step's, split as evenly as they go.
        final int ownPrompts = config.prompts() / ranks + (rank < config.prompts() % ranks ? 1 : 0);
        if (ownPrompts == 0) {
            throw new IllegalArgumentException(ranks + " ranks for " + config.prompts() + " prompts: every rank needs one");
        }
        final int batch = ownPrompts * config.groupSize();
        final int length = config.length();
        final double[] rewardCurve = new double[config.steps()];
        final double[] clipCurve = new double[config.steps()];
        final double[] klCurve = new double[config.steps()];
        final long start = System.nanoTime();
        try (Policy policy = new Policy(length); TensorVector parameters = policy.parameters();
                AdamW optimizer = new AdamW(parameters, new AdamWOptions(config.learningRate()))) {
            // Same initial weights on every rank (seeded above); its own samples from here on.
            if (group != null) {
                torch.manual_seed(config.seed() + 1_000_003L * rank);
            }
            for (int step = 0; step < config.steps(); step++) {
                // 1. Prompts, G responses each.
                final long[] promptDigits = new long[batch];
                for (int p = 0; p < ownPrompts; p++) {
                    final int digit = random.nextInt(DIGITS);
                    for (int g = 0; g < config.groupSize(); g++) {
                        promptDigits[p * config.groupSize() + g] = digit;
                    }
                }
                try (Tensor prompts = Tensor.create(promptDigits);
                        Tensor tokens = sample(policy, prompts, batch, length, config.temperature());
                        Tensor previous = shiftRight(tokens, batch)) {
                    // 2. Verifiable rewards and group advantages.
                    final long[] sampled = new long[batch * length];
                    tokens.reshape(-1).data_ptr_long().get(sampled);
                    final float[] rewards = new float[batch];
                    double rewardSum = 0;
                    for (int b = 0; b < batch; b++) {
                        int hits = 0;
                        for (int k = 0; k < length; k++) {
                            hits += sampled[b * length + k] == (promptDigits[b] + k) % DIGITS ? 1 : 0;
                        }
                        rewards[b] = (float) hits / length;
                        rewardSum += rewards[b];
                    }
                    rewardCurve[step] = group == null ? rewardSum / batch : globalMean(group, rewardSum, batch);
                    try (Tensor advantages = Tensor.create(Advantages.group(rewards, config.groupSize(), AdvantageMode.MEAN_STD));
                            Tensor oldLogProbs = oldLogProbs(policy, loss, prompts, previous, tokens, advantages)) {
                        // 3. Several minibatch updates on the rollout.
                        double clip = 0;
                        double kl = 0;
                        int updates = 0;
                        for (int epoch = 0; epoch < config.epochs(); epoch++) {
                            try (Tensor order = torch.randperm(batch)) {
                                final long size = batch / config.minibatches();
                                for (int m = 0; m < config.minibatches(); m++) {
                                    try (Tensor idx = order.narrow(0, m * size, size); Tensor mp = prompts.index_select(0, idx);
                                            Tensor mprev = previous.index_select(0, idx); Tensor mt = tokens.index_select(0, idx);
                                            Tensor mold = oldLogProbs.index_select(0, idx); Tensor madv = advantages.index_select(0, idx);
                                            Tensor logits = policy.logits(mp, mprev)) {
                                        final LossInput input = LossInput.builder().logits(logits).targets(mt).oldLogProbs(mold)
                                                .advantages(madv).build();
                                        // Data-parallel: the minibatch's counts over all ranks, one allreduce.
                                        try (LossResult result = group == null ? loss.compute(input)
                                                : loss.compute(input, DataParallel.allReduceCounts(group, input, TIMEOUT))) {
                                            optimizer.zero_grad();
                                            result.loss().backward();
                                            if (group != null) {
                                                allReduceGradients(group, parameters); // the ranks' shares summed
                                            }
                                            optimizer.step();
                                            try (LossMetrics metrics = group == null ? null
                                                    : DataParallel.reduceMetrics(group, loss, result.metrics(), TIMEOUT)) {
                                                final LossMetrics reduced = metrics == null ? result.metrics() : metrics;
                                                clip += reduced.clipFractionLow() + reduced.clipFractionHigh();
                                                kl += reduced.approxKl();
                                            }
                                            updates++;
                                        }
                                    }
                                }
                            }
                        }
                        clipCurve[step] = clip / updates;
                        klCurve[step] = kl / updates;
                    }
                }
                if (progress) {
                    printProgress(name, step + 1, config.steps(), rewardCurve[step], clipCurve[step], klCurve[step]);
                }
            }
        }
        if (progress) {
            System.out.println();
        }
        return new Curve(name, rewardCurve, clipCurve, klCurve, (System.nanoTime() - start) / 1e9);
    }

    /** Time-out of each collective of a data-parallel run. */
    static final Duration TIMEOUT = Duration.ofSeconds(60);

    /** The mean over every rank of a sum over `count` values, in one allreduce. */
    static double globalMean(Backend group, double sum, long count) {
        try (Tensor both = Tensor.create(new double[] {sum, count})) {
            DataParallel.allReduceSum(group, both, TIMEOUT);
            final double[] total = new double[2];
            both.data_ptr_double().get(total);
            return total[0] / total[1];
        }
    }

    /** Sums every parameter's gradient over the ranks: one allreduce of them all, flattened. */
    static void allReduceGradients(Backend group, TensorVector parameters) {
        final long n = parameters.size();
        try (TensorVector grads = new TensorVector()) {
            for (long i = 0; i < n; i++) {
                grads.push_back(parameters.get(i).grad().reshape(-1));
            }
            try (Tensor flat = torch.cat(grads)) {
                DataParallel.allReduceSum(group, flat, TIMEOUT);
                long offset = 0;
                for (long i = 0; i < n; i++) {
                    final Tensor grad = parameters.get(i).grad();
                    final long size = grad.numel();
                    try (Tensor part = flat.narrow(0, offset, size); Tensor shaped = part.view_as(grad)) {
                        grad.copy_(shaped);
                    }
                    offset += size;
                }
            }
        }
    }

    /** Autoregressive sampling at the given temperature: tokens [B, T]. */
    static Tensor sample(Policy policy, Tensor prompts, int batch, int length, double temperature) {
        try (NoGradGuard noGrad = new NoGradGuard()) {
            final long[] previous = new long[batch * length];
            final long[] chosen = new long[batch * length];
            java.util.Arrays.fill(previous, BOS);
            for (int k = 0; k < length; k++) {
                try (Tensor prev = Tensor.create(previous).reshape(batch, length); Tensor logits = policy.logits(prompts, prev);
                        Tensor step = logits.select(1, k); Tensor scaled = step.div(new Scalar(temperature));
                        Tensor probs = scaled.softmax(-1); Tensor draw = torch.multinomial(probs, 1); Tensor flat = draw.reshape(-1)) {
                    final long[] picked = new long[batch];
                    flat.data_ptr_long().get(picked);
                    for (int b = 0; b < batch; b++) {
                        chosen[b * length + k] = picked[b];
                        if (k + 1 < length) {
                            previous[b * length + k + 1] = picked[b];
                        }
                    }
                }
            }
            return Tensor.create(chosen).reshape(batch, length);
        }
    }

    /** [BOS, t_0, ..., t_{T-2}] per response: what each position conditions on. */
    static Tensor shiftRight(Tensor tokens, int batch) {
        try (Tensor bos = torch.full(new long[] {batch, 1}, new Scalar(BOS), new org.bytedeco.pytorch.TensorOptions(torch.ScalarType.Long));
                Tensor head = tokens.narrow(1, 0, tokens.size(1) - 1);
                org.bytedeco.pytorch.TensorVector parts = new org.bytedeco.pytorch.TensorVector(bos, head)) {
            return torch.cat(new org.bytedeco.pytorch.TensorArrayRef(parts), 1);
        }
    }

    /** The sampler's log-probs of its own tokens, from the fused kernel, detached. */
    static Tensor oldLogProbs(Policy policy, PolicyLoss loss, Tensor prompts, Tensor previous, Tensor tokens, Tensor advantages) {
        try (NoGradGuard noGrad = new NoGradGuard(); Tensor logits = policy.logits(prompts, previous);
                LossResult result = loss.compute(LossInput.builder().logits(logits).targets(tokens).advantages(advantages).build())) {
            return result.logProbs().clone();
        }
    }

    static void printProgress(String name, int step, int steps, double reward, double clip, double kl) {
        final int width = 30;
        final int filled = step * width / steps;
        final String bar = "=".repeat(filled) + (filled < width ? ">" : "") + " ".repeat(Math.max(0, width - filled - 1));
        System.out.printf(Locale.ROOT, "\r%-4s [%s] %3d/%d  reward %.3f  clip %.3f  kl %+.5f", name, bar, step, steps, reward, clip, kl);
        System.out.flush();
    }

    /** Reward curves of the runs, as a PNG. */
    public static void plot(Path png, Curve... curves) throws IOException {
        final XYChart chart = new XYChartBuilder().width(900).height(480)
                .title("gspo4j demo: counting digits, G = 8, reward per step").xAxisTitle("step").yAxisTitle("mean reward").build();
        for (Curve curve : curves) {
            final double[] x = new double[curve.reward().length];
            for (int i = 0; i < x.length; i++) {
                x[i] = i + 1;
            }
            chart.addSeries(curve.name(), x, curve.reward());
        }
        chart.getStyler().setYAxisMin(0.0).setYAxisMax(1.0).setMarkerSize(0);
        Files.createDirectories(png.toAbsolutePath().getParent());
        BitmapEncoder.saveBitmap(chart, png.toString(), BitmapEncoder.BitmapFormat.PNG);
    }

    /**
     * Threads for libtorch in this demo: {@code OMP_NUM_THREADS} when set, else 1. The demo's
     * tensors are tiny ([128, 6, 64] activations, ten logits per token), so a parallel region
     * costs more than it saves, and idle OpenMP and OpenBLAS threads spin-wait between ops,
     * taking the CPU from everything else: on the 2-vCPU CI machine kind libtorch's defaults (2
     * and 2) made the demo 5 to 20x slower than 1 (README, "Threads and processes").
     */
    static int defaultThreads() {
        final String env = System.getenv("OMP_NUM_THREADS");
        if (env != null) {
            try {
                return Math.max(1, Integer.parseInt(env.trim()));
            } catch (NumberFormatException e) {
                return 1;
            }
        }
        return 1;
    }

    /**
     * Sizes both of libtorch's CPU pools: its intra-op (OpenMP) threads, and the pthread pool of
     * the OpenBLAS it calls for matrix products, which {@code torch.set_num_threads} does not
     * reach (OpenBLAS sizes it from the environment when it loads). Call before gspo4j's first
     * call: gspo4j's own pool then defaults to the same count.
     */
    static void useThreads(int threads) {
        torch.set_num_threads(threads);
        openblas_nolapack.blas_set_num_threads(threads);
    }

    public static void main(String[] args) throws Exception {
        Config config = Config.defaults();
        Path out = Path.of("target", "demo");
        int threads = defaultThreads();
        int ranks = 1;
        int rank = -1; // a child of --ranks: its rank
        String store = null;
        // -Ddemo.args="--ranks=2 --steps=100" reaches main as one argument: split it.
        final List<String> words = new ArrayList<>();
        for (String arg : args) {
            words.addAll(List.of(arg.trim().split("\\s+")));
        }
        for (String arg : words) {
            if (arg.startsWith("--ranks=")) {
                ranks = Integer.parseInt(arg.substring("--ranks=".length()));
                if (ranks < 1) {
                    throw new IllegalArgumentException("--ranks must be at least 1, got " + ranks);
                }
            } else if (arg.startsWith("--rank=")) {
                rank = Integer.parseInt(arg.substring("--rank=".length()));
            } else if (arg.startsWith("--store=")) {
                store = arg.substring("--store=".length());
            } else if (arg.startsWith("--steps=")) {
                config = config.withSteps(Integer.parseInt(arg.substring("--steps=".length())));
            } else if (arg.startsWith("--out=")) {
                out = Path.of(arg.substring("--out=".length()));
            } else if (arg.startsWith("--threads=")) {
                threads = Integer.parseInt(arg.substring("--threads=".length()));
                if (threads < 1) {
                    throw new IllegalArgumentException("--threads must be at least 1, got " + threads);
                }
            } else if (!arg.isBlank()) {
                throw new IllegalArgumentException("unknown argument " + arg + " (use --steps=N, --out=DIR, --threads=N, --ranks=N)");
            }
        }
        useThreads(threads); // before gspo4j's first call: its pool's default follows libtorch's count
        if (rank >= 0) {
            runRank(config, rank, ranks, store, out);
            return;
        }
        System.out.printf(Locale.ROOT, "gspo4j demo: %d steps, %d prompts x %d responses of %d digits, %d x %d minibatch updates per rollout%n",
                config.steps(), config.prompts(), config.groupSize(), config.length(), config.epochs(), config.minibatches());
        System.out.printf(Locale.ROOT, "threads: libtorch %d, OpenBLAS %d, gspo4j %d (of %d available processors)%n",
                torch.get_num_threads(), openblas_nolapack.blas_get_num_threads(), Gspo4j.threads(),
                Runtime.getRuntime().availableProcessors());
        final Curve gspo = train("GSPO", PolicyLoss.gspo(), config, true);
        final Curve grpo = train("GRPO", PolicyLoss.grpo(), config, true);
        for (Curve c : new Curve[] {gspo, grpo}) {
            System.out.printf(Locale.ROOT, "%s: reward %.3f -> %.3f in %.1f s%n", c.name(), c.startReward(), c.endReward(), c.seconds());
        }
        final Path png = out.resolve("rewards.png");
        if (ranks > 1) {
            final Curve parallel = launchRanks(config, ranks, threads, out);
            System.out.printf(Locale.ROOT, "%s: reward %.3f -> %.3f in %.1f s%n", parallel.name(), parallel.startReward(),
                    parallel.endReward(), parallel.seconds());
            plot(png, gspo, grpo, parallel);
        } else {
            plot(png, gspo, grpo);
        }
        System.out.println("reward curves: " + png);
    }

    /**
     * Starts `ranks` JVMs (this classpath) that train GSPO data-parallel over Gloo on 127.0.0.1,
     * meeting through a FileStore in `out`; returns rank 0's curve (the rewards of all ranks).
     */
    static Curve launchRanks(Config config, int ranks, int threads, Path out) throws Exception {
        Files.createDirectories(out);
        final Path store = Files.createTempFile(out.toAbsolutePath(), "gloo-", ".store");
        Files.delete(store); // the FileStore creates it
        final List<Process> processes = new ArrayList<>();
        try {
            for (int r = 0; r < ranks; r++) {
                final List<String> command = new ArrayList<>(List.of(Path.of(System.getProperty("java.home"), "bin", "java").toString(),
                        "-Djava.awt.headless=true", "-cp", System.getProperty("java.class.path"), DigitsDemo.class.getName(),
                        "--rank=" + r, "--ranks=" + ranks, "--store=" + store, "--steps=" + config.steps(), "--threads=" + threads,
                        "--out=" + out));
                final ProcessBuilder builder = new ProcessBuilder(command);
                // Rank 0 shows its progress; the others' output goes to a log each.
                if (r == 0) {
                    builder.inheritIO();
                } else {
                    builder.redirectErrorStream(true).redirectOutput(out.resolve("rank-" + r + ".log").toFile());
                }
                processes.add(builder.start());
            }
            for (int r = 0; r < ranks; r++) {
                final int code = processes.get(r).waitFor();
                if (code != 0) {
                    throw new IllegalStateException("rank " + r + " of " + ranks + " exited with " + code
                            + (r > 0 ? " (see " + out.resolve("rank-" + r + ".log") + ")" : ""));
                }
            }
        } finally {
            for (Process p : processes) {
                if (p.isAlive()) {
                    p.destroyForcibly();
                }
            }
            Files.deleteIfExists(store);
        }
        final List<String> lines = Files.readAllLines(out.resolve("rewards-" + ranks + "-ranks.csv"));
        final double seconds = Double.parseDouble(lines.get(0));
        final double[] reward = new double[lines.size() - 1];
        for (int i = 1; i < lines.size(); i++) {
            reward[i - 1] = Double.parseDouble(lines.get(i));
        }
        return new Curve("GSPO, " + ranks + " ranks", reward, new double[reward.length], new double[reward.length], seconds);
    }

    /** One rank of {@link #launchRanks}: rank 0 writes the curve (first line: seconds). */
    static void runRank(Config config, int rank, int ranks, String store, Path out) throws IOException {
        if (store == null) {
            throw new IllegalArgumentException("--rank needs --store=FILE (the FileStore the ranks meet through)");
        }
        try (FileStore fileStore = new FileStore(store, ranks);
                ProcessGroupGloo group = DataParallel.gloo(fileStore, rank, ranks, "127.0.0.1", TIMEOUT)) {
            final Curve curve = train("GSPO x" + ranks, PolicyLoss.gspo(), config, group, rank == 0);
            if (rank == 0) {
                final StringBuilder csv = new StringBuilder().append(curve.seconds()).append('\n');
                for (double r : curve.reward()) {
                    csv.append(r).append('\n');
                }
                Files.writeString(out.resolve("rewards-" + ranks + "-ranks.csv"), csv);
            }
        }
    }
}
