package dev.gspo4j.examples;

import dev.gspo4j.AdvantageMode;
import dev.gspo4j.Advantages;
import dev.gspo4j.Gspo4j;
import dev.gspo4j.LossInput;
import dev.gspo4j.LossResult;
import dev.gspo4j.PolicyLoss;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Locale;
import java.util.Random;
import org.bytedeco.openblas.global.openblas_nolapack;
import org.bytedeco.pytorch.AdamW;
import org.bytedeco.pytorch.AdamWOptions;
import org.bytedeco.pytorch.EmbeddingImpl;
import org.bytedeco.pytorch.LinearImpl;
import org.bytedeco.pytorch.NoGradGuard;
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
        torch.manual_seed(config.seed());
        final Random random = new Random(config.seed());
        final PolicyLoss loss = lossBuilder.temperature(config.temperature()).build();
        final int batch = config.prompts() * config.groupSize();
        final int length = config.length();
        final double[] rewardCurve = new double[config.steps()];
        final double[] clipCurve = new double[config.steps()];
        final double[] klCurve = new double[config.steps()];
        final long start = System.nanoTime();
        try (Policy policy = new Policy(length); TensorVector parameters = policy.parameters();
                AdamW optimizer = new AdamW(parameters, new AdamWOptions(config.learningRate()))) {
            for (int step = 0; step < config.steps(); step++) {
                // 1. Prompts, G responses each.
                final long[] promptDigits = new long[batch];
                for (int p = 0; p < config.prompts(); p++) {
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
                    rewardCurve[step] = rewardSum / batch;
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
                                            Tensor logits = policy.logits(mp, mprev);
                                            LossResult result = loss.compute(LossInput.builder().logits(logits).targets(mt)
                                                    .oldLogProbs(mold).advantages(madv).build())) {
                                        optimizer.zero_grad();
                                        result.loss().backward();
                                        optimizer.step();
                                        clip += result.metrics().clipFractionLow() + result.metrics().clipFractionHigh();
                                        kl += result.metrics().approxKl();
                                        updates++;
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
     * and 2) made the demo 5 to 20x slower than 1 (README, "Threads").
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

    public static void main(String[] args) throws IOException {
        Config config = Config.defaults();
        Path out = Path.of("target", "demo");
        int threads = defaultThreads();
        for (String arg : args) {
            if (arg.startsWith("--steps=")) {
                config = config.withSteps(Integer.parseInt(arg.substring("--steps=".length())));
            } else if (arg.startsWith("--out=")) {
                out = Path.of(arg.substring("--out=".length()));
            } else if (arg.startsWith("--threads=")) {
                threads = Integer.parseInt(arg.substring("--threads=".length()));
                if (threads < 1) {
                    throw new IllegalArgumentException("--threads must be at least 1, got " + threads);
                }
            } else if (!arg.isBlank()) {
                throw new IllegalArgumentException("unknown argument " + arg + " (use --steps=N, --out=DIR, --threads=N)");
            }
        }
        useThreads(threads); // before gspo4j's first call: its pool's default follows libtorch's count
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
        plot(png, gspo, grpo);
        System.out.println("reward curves: " + png);
    }
}
