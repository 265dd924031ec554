package dev.gspo4j.internal;

import dev.gspo4j.AdvantageMode;
import dev.gspo4j.Aggregation;
import dev.gspo4j.KlEstimator;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.ArrayList;

/**
 * Plain double-precision references for every kernel, written straight from docs/math.md. The loss
 * reference computes values only; its gradients are central finite differences of that value, so
 * a sign or branch error in the kernels' analytic gradients cannot be repeated here.
 */
final class Reference {
    private Reference() {}

    // ---- token log-probs ---------------------------------------------------------------------

    /** One row's softmax; max = max z/tau and logSum = log sum exp(z/tau - max), lse = max + logSum. */
    record Row(double lse, double logprob, double entropy, double max, double logSum) {}

    /**
     * -Inf logits have probability 0 and add nothing (not 0 * -Inf) to the entropy. The sum is
     * split as c + R, c the entries at the max (exactly 1 each) and R the rest, so that R keeps
     * its relative precision when p -> 1 (1 + R would round R away even in float64), and log p is
     * formed as (z/tau - max) - log S, which keeps its precision when |z/tau| is large.
     */
    static Row forward(double[] z, int offset, int vocab, int target, double temperature) {
        double max = Double.NEGATIVE_INFINITY;
        for (int v = 0; v < vocab; v++) {
            max = Math.max(max, z[offset + v] / temperature);
        }
        // R Neumaier-compensated: with one dominant logit, plain float64 summation rounds each
        // tiny term against the larger ones.
        double count = 0;
        double rest = 0;
        double compensation = 0;
        for (int v = 0; v < vocab; v++) {
            final double shifted = z[offset + v] / temperature - max;
            if (shifted == 0) {
                count++;
                continue;
            }
            final double term = Math.exp(shifted);
            final double t = rest + term;
            compensation += Math.abs(rest) >= Math.abs(term) ? (rest - t) + term : (term - t) + rest;
            rest = t;
        }
        rest += compensation;
        final double logSum = Math.log(count) + Math.log1p(rest / count);
        final double lse = max + logSum;
        double expectedShifted = 0;
        for (int v = 0; v < vocab; v++) {
            final double shifted = z[offset + v] / temperature - max;
            final double p = Math.exp(shifted - logSum);
            if (p > 0) {
                expectedShifted += p * shifted;
            }
        }
        final double entropy = logSum - expectedShifted;
        return new Row(lse, (z[offset + target] / temperature - max) - logSum, entropy, max, logSum);
    }

    /** dz = (g_lp (1[v==y] - p) - g_H p (log p + H)) / tau for one row (no entropy term where p = 0). */
    static double[] backward(double[] z, int offset, int vocab, int target, double temperature, double gradLogprob,
            double gradEntropy) {
        final Row row = forward(z, offset, vocab, target, temperature);
        final double[] dz = new double[vocab];
        for (int v = 0; v < vocab; v++) {
            final double logP = (z[offset + v] / temperature - row.max()) - row.logSum();
            final double p = Math.exp(logP);
            final double oneHotMinusP = v == target ? -Math.expm1(logP) : -p;
            final double entropyTerm = p > 0 ? gradEntropy * p * (logP + row.entropy()) : 0;
            dz[v] = (gradLogprob * oneHotMinusP - entropyTerm) / temperature;
        }
        return dz;
    }

    // ---- policy loss -----------------------------------------------------------------------------

    /** A batch over the token axis: `starts[b]..ends[b]`. */
    record Batch(int[] starts, int[] ends, int seq, boolean packed) {
        int size() {
            return starts.length;
        }

        static Batch padded(int batch, int seq) {
            final int[] s = new int[batch];
            final int[] e = new int[batch];
            for (int b = 0; b < batch; b++) {
                s[b] = b * seq;
                e[b] = b * seq + seq;
            }
            return new Batch(s, e, seq, false);
        }

        static Batch packed(long[] offsets) {
            final int batch = offsets.length - 1;
            final int[] s = new int[batch];
            final int[] e = new int[batch];
            for (int b = 0; b < batch; b++) {
                s[b] = (int) offsets[b];
                e[b] = (int) offsets[b + 1];
            }
            return new Batch(s, e, 0, true);
        }
    }

    record LossInputs(Batch batch, double[] logprob, double[] oldLogprob, boolean[] mask, double[] advantages,
            boolean advantagesPerToken, double[] refLogprob, double[] entropy) {
        LossInputs withLogprob(double[] lp) {
            return new LossInputs(batch, lp, oldLogprob, mask, advantages, advantagesPerToken, refLogprob, entropy);
        }

        LossInputs withEntropy(double[] h) {
            return new LossInputs(batch, logprob, oldLogprob, mask, advantages, advantagesPerToken, refLogprob, h);
        }
    }

    record LossValue(double loss, double[] metrics) {}

    record LossResult(double loss, double[] metrics, double[] gradLogprob, double[] gradEntropy) {}

    private static boolean counted(boolean[] mask, int i) {
        return mask == null || mask[i];
    }

    private static double clip(double x, LossSettings s) {
        return Math.min(Math.max(x, 1 - s.epsLow()), 1 + s.epsHigh());
    }

    /** J = min(x A, clip(x) A), dual-clipped for A < 0. */
    private static double objective(double x, double a, LossSettings s) {
        double j = Math.min(x * a, clip(x, s) * a);
        if (s.dualClip() > 0 && a < 0) {
            j = Math.max(j, s.dualClip() * a);
        }
        return j;
    }

    /** The KL estimate of d = ref - lp; {@code ratio} is the token ratio exp(clamp(lp - olp)) K3_UNBIASED weighs k3 by. */
    private static double kl(double d, KlEstimator estimator, double ratio) {
        return switch (estimator) {
            case K1 -> -d;
            case K2 -> d * d / 2;
            case K3, K3_PLUS -> Math.exp(d) - d - 1;
            case K3_UNBIASED -> ratio * (Math.exp(d) - d - 1);
            case ABS -> Math.abs(d);
            case LOW_VAR_KL -> Math.min(Math.max(Math.exp(d) - d - 1, -10), 10);
        };
    }

    static LossValue lossValue(LossSettings s, LossInputs in) {
        final Batch batch = in.batch();
        final int n = batch.size();
        final double r = s.logRatioClamp();
        final int[] length = new int[n];
        int responses = 0;
        int tokens = 0;
        int longest = 0;
        for (int b = 0; b < n; b++) {
            for (int i = batch.starts()[b]; i < batch.ends()[b]; i++) {
                length[b] += counted(in.mask(), i) ? 1 : 0;
            }
            responses += length[b] > 0 ? 1 : 0;
            tokens += length[b];
            longest = Math.max(longest, batch.ends()[b] - batch.starts()[b]);
        }
        final double norm = s.normalizer();
        // weight(b): the factor of sum_t m q for response b
        final double[] weight = new double[n];
        for (int b = 0; b < n; b++) {
            if (length[b] == 0) {
                continue;
            }
            final double lengthNorm = s.lengthNorm() > 0 ? s.lengthNorm() : batch.packed() ? longest : batch.seq();
            final double denominator = switch (s.aggregation()) {
                case SEQ_MEAN_TOKEN_MEAN -> (norm > 0 ? norm : responses) * length[b];
                case TOKEN_MEAN -> norm > 0 ? norm : tokens;
                case SEQ_MEAN_TOKEN_SUM -> norm > 0 ? norm : responses;
                case SEQ_MEAN_TOKEN_SUM_NORM -> (norm > 0 ? norm : n) * lengthNorm;
            };
            weight[b] = denominator > 0 ? 1 / denominator : 0;
        }
        final double responseDenominator = norm > 0 ? norm : responses;

        double surrogate = 0;
        double klTerm = 0;
        double entropyTerm = 0;
        double clipLow = 0;
        double clipHigh = 0;
        double dual = 0;
        final List<Double> ratios = new ArrayList<>();
        double approxKl = 0;
        double entropySum = 0;
        for (int b = 0; b < n; b++) {
            if (length[b] == 0) {
                continue;
            }
            double logS = 0;
            for (int i = batch.starts()[b]; i < batch.ends()[b]; i++) {
                if (counted(in.mask(), i)) {
                    logS += in.logprob()[i] - (in.oldLogprob() == null ? in.logprob()[i] : in.oldLogprob()[i]);
                }
            }
            logS /= length[b];
            final double sequenceRatio = Math.exp(Math.min(Math.max(logS, -r), r));
            if (s.ratioLevel() != RatioLevel.TOKEN) {
                ratios.add(sequenceRatio);
            }
            if (s.ratioLevel() == RatioLevel.SEQUENCE) {
                final double a = in.advantages()[b];
                surrogate += objective(sequenceRatio, a, s) / responseDenominator;
                clipLow += sequenceRatio < 1 - s.epsLow() && a < 0 ? 1 : 0;
                clipHigh += sequenceRatio > 1 + s.epsHigh() && a > 0 ? 1 : 0;
                dual += s.dualClip() > 0 && a < 0 && Math.min(sequenceRatio * a, clip(sequenceRatio, s) * a) < s.dualClip() * a ? 1 : 0;
            }
            for (int i = batch.starts()[b]; i < batch.ends()[b]; i++) {
                if (!counted(in.mask(), i)) {
                    continue;
                }
                final double lp = in.logprob()[i];
                final double olp = in.oldLogprob() == null ? lp : in.oldLogprob()[i];
                if (s.ratioLevel() != RatioLevel.SEQUENCE) {
                    final double a = in.advantagesPerToken() ? in.advantages()[i] : in.advantages()[b];
                    // GSPO-token's ratio sg(s_b) * exp(lp - sg(lp)) has the value s_b.
                    final double x = s.ratioLevel() == RatioLevel.TOKEN
                            ? Math.exp(Math.min(Math.max(lp - olp, -r), r))
                            : sequenceRatio;
                    surrogate += weight[b] * objective(x, a, s);
                    clipLow += x < 1 - s.epsLow() && a < 0 ? 1 : 0;
                    clipHigh += x > 1 + s.epsHigh() && a > 0 ? 1 : 0;
                    dual += s.dualClip() > 0 && a < 0 && Math.min(x * a, clip(x, s) * a) < s.dualClip() * a ? 1 : 0;
                    if (s.ratioLevel() == RatioLevel.TOKEN) {
                        ratios.add(x);
                    }
                }
                if (s.klCoef() != 0) {
                    final double d = Math.min(Math.max(in.refLogprob()[i] - lp, -r), r);
                    klTerm += weight[b] * kl(d, s.klEstimator(), Math.exp(Math.min(Math.max(lp - olp, -r), r)));
                }
                if (in.entropy() != null) {
                    entropyTerm += weight[b] * in.entropy()[i];
                    entropySum += in.entropy()[i];
                }
                approxKl += olp - lp;
            }
        }
        final double policyLoss = -surrogate;
        final double loss = policyLoss + s.klCoef() * klTerm - s.entropyCoef() * entropyTerm;
        final double decisions = s.ratioLevel() == RatioLevel.SEQUENCE ? responses : tokens;
        final double[] metrics = new double[Metric.COUNT];
        metrics[Metric.POLICY_LOSS.index()] = policyLoss;
        metrics[Metric.KL.index()] = klTerm;
        metrics[Metric.ENTROPY.index()] = entropyTerm;
        metrics[Metric.CLIP_FRACTION_LOW.index()] = decisions > 0 ? clipLow / decisions : 0;
        metrics[Metric.CLIP_FRACTION_HIGH.index()] = decisions > 0 ? clipHigh / decisions : 0;
        metrics[Metric.DUAL_CLIP_FRACTION.index()] = decisions > 0 ? dual / decisions : 0;
        metrics[Metric.RATIO_MEAN.index()] = ratios.stream().mapToDouble(Double::doubleValue).average().orElse(0);
        metrics[Metric.RATIO_MIN.index()] = ratios.stream().mapToDouble(Double::doubleValue).min().orElse(0);
        metrics[Metric.RATIO_MAX.index()] = ratios.stream().mapToDouble(Double::doubleValue).max().orElse(0);
        metrics[Metric.APPROX_KL.index()] = tokens > 0 ? approxKl / tokens : 0;
        metrics[Metric.ENTROPY_MEAN.index()] = tokens > 0 ? entropySum / tokens : 0;
        metrics[Metric.SEQUENCES.index()] = responses;
        metrics[Metric.TOKENS.index()] = tokens;
        // Without rollout correction or selection (RolloutCorrectionTest covers them): w = 1, all kept.
        metrics[Metric.ROLLOUT_WEIGHT_MEAN.index()] = tokens > 0 ? 1 : 0;
        metrics[Metric.ENTROPY_KEPT_FRACTION.index()] = tokens > 0 ? 1 : 0;
        return new LossValue(loss, metrics);
    }

    /**
     * Loss, metrics, and gradients by central differences of {@link #lossValue}. GSPO-token's
     * surrogate depends on lp only through the stop-gradient expression s_b exp(lp - sg(lp)), which
     * differencing the value cannot see; {@link #sequenceTokenGradient} differences that expression.
     */
    static LossResult loss(LossSettings s, LossInputs onOrOffPolicy) {
        // On-policy, olp = sg(lp): a frozen copy, so the differences see the ratio move.
        final LossInputs in = onOrOffPolicy.oldLogprob() != null ? onOrOffPolicy
                : new LossInputs(onOrOffPolicy.batch(), onOrOffPolicy.logprob(), onOrOffPolicy.logprob().clone(),
                        onOrOffPolicy.mask(), onOrOffPolicy.advantages(), onOrOffPolicy.advantagesPerToken(),
                        onOrOffPolicy.refLogprob(), onOrOffPolicy.entropy());
        final LossValue value = lossValue(s, in);
        // K3_PLUS has the value of k3 and the gradient of k2: difference the loss with k2 in its place.
        final LossSettings differenced = s.klEstimator() == KlEstimator.K3_PLUS ? s.withKl(s.klCoef(), KlEstimator.K2) : s;
        final int tokens = in.logprob().length;
        final double[] gradLogprob = new double[tokens];
        final double[] gradEntropy = new double[tokens];
        final double h = 1e-6;
        for (int i = 0; i < tokens; i++) {
            if (!counted(in.mask(), i)) {
                continue;
            }
            if (s.ratioLevel() == RatioLevel.SEQUENCE_TOKEN) {
                gradLogprob[i] = sequenceTokenGradient(differenced, in, i, h);
            } else {
                gradLogprob[i] = centralDifference(differenced, in, i, h, false);
            }
            if (in.entropy() != null) {
                gradEntropy[i] = centralDifference(differenced, in, i, h, true);
            }
        }
        if (s.entropyCoef() == 0) {
            Arrays.fill(gradEntropy, 0);
        }
        return new LossResult(value.loss(), value.metrics(), gradLogprob, gradEntropy);
    }

    private static double centralDifference(LossSettings s, LossInputs in, int i, double h, boolean entropy) {
        final double[] plus = (entropy ? in.entropy() : in.logprob()).clone();
        final double[] minus = plus.clone();
        plus[i] += h;
        minus[i] -= h;
        final LossInputs up = entropy ? in.withEntropy(plus) : in.withLogprob(plus);
        final LossInputs down = entropy ? in.withEntropy(minus) : in.withLogprob(minus);
        return (lossValue(s, up).loss() - lossValue(s, down).loss()) / (2 * h);
    }

    /**
     * GSPO-token: lp_t enters the surrogate through s_bt = sg(s_b) exp(lp_t - sg(lp_t)) and the KL
     * term directly. The surrogate's part is differenced on that expression with s_b frozen; the
     * KL part by differencing the whole loss with every advantage zeroed, which removes the
     * surrogate.
     */
    private static double sequenceTokenGradient(LossSettings s, LossInputs in, int i, double h) {
        final Batch batch = in.batch();
        int b = 0;
        while (!(i >= batch.starts()[b] && i < batch.ends()[b])) {
            b++;
        }
        // weight and s_b as lossValue computes them
        final LossValue base = lossValue(s, in);
        final double responses = base.metrics()[Metric.SEQUENCES.index()];
        final double tokenCount = base.metrics()[Metric.TOKENS.index()];
        int length = 0;
        double logS = 0;
        int longest = 0;
        for (int k = 0; k < batch.size(); k++) {
            longest = Math.max(longest, batch.ends()[k] - batch.starts()[k]);
        }
        for (int k = batch.starts()[b]; k < batch.ends()[b]; k++) {
            if (counted(in.mask(), k)) {
                length++;
                logS += in.logprob()[k] - (in.oldLogprob() == null ? in.logprob()[k] : in.oldLogprob()[k]);
            }
        }
        logS /= length;
        final double r = s.logRatioClamp();
        final boolean inside = logS >= -r && logS <= r;
        final double sb = Math.exp(Math.min(Math.max(logS, -r), r));
        final double norm = s.normalizer();
        final double lengthNorm = s.lengthNorm() > 0 ? s.lengthNorm() : batch.packed() ? longest : batch.seq();
        final double denominator = switch (s.aggregation()) {
            case SEQ_MEAN_TOKEN_MEAN -> (norm > 0 ? norm : responses) * length;
            case TOKEN_MEAN -> norm > 0 ? norm : tokenCount;
            case SEQ_MEAN_TOKEN_SUM -> norm > 0 ? norm : responses;
            case SEQ_MEAN_TOKEN_SUM_NORM -> (norm > 0 ? norm : batch.size()) * lengthNorm;
        };
        final double weight = 1 / denominator;
        final double a = in.advantagesPerToken() ? in.advantages()[i] : in.advantages()[b];
        final double surrogate = inside
                ? -weight * (objective(sb * Math.exp(h), a, s) - objective(sb * Math.exp(-h), a, s)) / (2 * h)
                : 0;
        // KL part: difference the whole loss with every advantage zeroed (surrogate then constant 0).
        final double[] zero = new double[in.advantages().length];
        final LossInputs noSurrogate = new LossInputs(batch, in.logprob(), in.oldLogprob(), in.mask(), zero,
                in.advantagesPerToken(), in.refLogprob(), in.entropy());
        final double klPart = s.klCoef() == 0 ? 0 : centralDifference(s, noSurrogate, i, h, false);
        return surrogate + klPart;
    }

    // ---- advantages ----------------------------------------------------------------------------

    static double[] groupAdvantages(double[] rewards, long[] groupIds, AdvantageMode mode, double eps) {
        final Map<Long, List<Integer>> groups = new LinkedHashMap<>();
        for (int i = 0; i < rewards.length; i++) {
            groups.computeIfAbsent(groupIds[i], k -> new ArrayList<>()).add(i);
        }
        final double[] out = new double[rewards.length];
        for (List<Integer> members : groups.values()) {
            final int g = members.size();
            double sum = 0;
            for (int i : members) {
                sum += rewards[i];
            }
            final double mean = sum / g;
            double squares = 0;
            for (int i : members) {
                squares += (rewards[i] - mean) * (rewards[i] - mean);
            }
            final boolean allEqual = members.stream().allMatch(i -> rewards[i] == rewards[members.get(0)]);
            for (int i : members) {
                if (allEqual) {
                    out[i] = 0;
                    continue;
                }
                out[i] = switch (mode) {
                    case MEAN -> rewards[i] - mean;
                    case RLOO -> rewards[i] - (sum - rewards[i]) / (g - 1);
                    case MEAN_STD -> (rewards[i] - mean) / (Math.sqrt(squares / (g - 1)) + eps);
                    case MEAN_BATCH_STD -> (rewards[i] - mean) / (batchStd(rewards) + eps);
                };
            }
        }
        return out;
    }

    /** The Bessel-corrected std of every reward (MEAN_BATCH_STD's denominator); 0 for fewer than two. */
    static double batchStd(double[] rewards) {
        if (rewards.length < 2) {
            return 0;
        }
        double sum = 0;
        for (double x : rewards) {
            sum += x;
        }
        final double mean = sum / rewards.length;
        double squares = 0;
        for (double x : rewards) {
            squares += (x - mean) * (x - mean);
        }
        return Math.sqrt(squares / (rewards.length - 1));
    }

    /** GAE over each response's counted tokens; {advantages, returns}. */
    static double[][] gae(Batch batch, double[] rewards, double[] values, boolean[] mask, double gamma, double lambda) {
        final double[] advantages = new double[rewards.length];
        final double[] returns = new double[rewards.length];
        for (int b = 0; b < batch.size(); b++) {
            final List<Integer> counted = new ArrayList<>();
            for (int i = batch.starts()[b]; i < batch.ends()[b]; i++) {
                if (counted(mask, i)) {
                    counted.add(i);
                }
            }
            for (int k = counted.size() - 1; k >= 0; k--) {
                final int i = counted.get(k);
                final boolean last = k == counted.size() - 1;
                final double nextValue = last ? 0 : values[counted.get(k + 1)];
                final double nextAdvantage = last ? 0 : advantages[counted.get(k + 1)];
                final double delta = rewards[i] + gamma * nextValue - values[i];
                advantages[i] = delta + gamma * lambda * nextAdvantage;
                returns[i] = advantages[i] + values[i];
            }
        }
        return new double[][] {advantages, returns};
    }
}
