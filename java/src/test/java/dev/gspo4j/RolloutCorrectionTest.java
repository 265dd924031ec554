package dev.gspo4j;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import dev.gspo4j.PolicyLossModuleTest.Batch;
import dev.gspo4j.internal.LossSettings;
import dev.gspo4j.internal.TokenWeights;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Random;
import java.util.function.UnaryOperator;
import java.util.stream.Stream;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.global.torch.ScalarType;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.Arguments;
import org.junit.jupiter.params.provider.MethodSource;

/**
 * Rollout correction (docs/math.md "Training-inference mismatch") and top-entropy selection ("Token
 * selection"): every objective with each weight option, value and gradient against the float64
 * composite (itself checked by central differences), the metrics against their definitions, packed
 * against padded, the hidden-state path against the logits path, and the errors.
 */
public class RolloutCorrectionTest {

    /** A named weight option. */
    record Variant(String name, UnaryOperator<PolicyLoss.Builder> apply, boolean mu, boolean select) {
        @Override
        public String toString() {
            return name;
        }
    }

    static List<Variant> variants() {
        return List.of(
                new Variant("mu for metrics only", b -> b, true, false),
                new Variant("TIS token C=1.5", b -> b.rolloutWeights(Rollout.Level.TOKEN, Rollout.Mode.TRUNCATE, 0, 1.5), true, false),
                new Variant("MIS sequence C=3 (TRL's default)",
                        b -> b.rolloutWeights(Rollout.Level.SEQUENCE, Rollout.Mode.MASK, 0, 3), true, false),
                new Variant("geometric band [0.9, 1.1]",
                        b -> b.rolloutWeights(Rollout.Level.GEOMETRIC, Rollout.Mode.MASK, 0.9, 1.1), true, false),
                new Variant("IcePop token mask [0.5, 2] + k3 token rejection",
                        b -> b.rolloutWeights(Rollout.Level.TOKEN, Rollout.Mode.MASK, 0.5, 2)
                                .rolloutRejection(Rollout.Divergence.K3, Rollout.Scope.TOKEN, 0.05), true, false),
                new Variant("truncate band [0.8, 1.25] sequence",
                        b -> b.rolloutWeights(Rollout.Level.SEQUENCE, Rollout.Mode.TRUNCATE, 0.8, 1.25), true, false),
                new Variant("k1 mean [-0.1, 0.05]",
                        b -> b.rolloutRejection(Rollout.Divergence.K1, Rollout.Scope.MEAN, -0.1, 0.05), true, false),
                new Variant("k2 sum 0.1", b -> b.rolloutRejection(Rollout.Divergence.K2, Rollout.Scope.SUM, 0.1), true, false),
                new Variant("k3 max 0.05 + off-policy mask",
                        b -> b.rolloutRejection(Rollout.Divergence.K3, Rollout.Scope.MAX, 0.05).offPolicyMask(0.0), true, false),
                new Variant("off-policy mask without mu", b -> b.offPolicyMask(-0.05), false, false),
                new Variant("top-entropy 0.3", b -> b.topEntropyQuantile(0.3), false, true),
                new Variant("top-entropy 0.5 + TIS token",
                        b -> b.topEntropyQuantile(0.5).rolloutWeights(Rollout.Level.TOKEN, Rollout.Mode.TRUNCATE, 0.5, 2), true, true));
    }

    static Stream<Arguments> objectivesAndVariants() {
        final List<Arguments> out = new ArrayList<>();
        final List<ObjectivesTest.Case> objectives = new ArrayList<>(ObjectivesTest.objectives());
        objectives.add(new ObjectivesTest.Case("GSPO", () -> PolicyLoss.gspo().clip(0.01, 0.02), false));
        objectives.add(new ObjectivesTest.Case("GSPO-token", () -> PolicyLoss.gspoToken().clip(0.01, 0.02), true));
        objectives.add(new ObjectivesTest.Case("GRPO", PolicyLoss::grpo, true));
        for (ObjectivesTest.Case o : objectives) {
            for (Variant v : variants()) {
                out.add(Arguments.of(o, v));
            }
        }
        return out.stream();
    }

    /** The engine's log-probs: the old ones plus noise of `spread`. */
    static float[] rolloutValues(Batch batch, long seed, double spread) {
        final Random random = new Random(seed);
        final float[] mu = new float[batch.oldValues.length];
        for (int i = 0; i < mu.length; i++) {
            mu[i] = (float) (batch.oldValues[i] + spread * random.nextGaussian());
        }
        return mu;
    }

    static Tensor tensor(float[] values, Batch batch) {
        return Tensor.create(values).reshape(batch.b, batch.t);
    }

    /** numpy.quantile(values, q) (method "linear"), as docs/math.md defines the threshold. */
    static double quantile(double[] values, double q) {
        final double[] sorted = values.clone();
        Arrays.sort(sorted);
        final int n = sorted.length;
        if (n == 0) {
            return Double.POSITIVE_INFINITY;
        }
        final double position = (n - 1) * q;
        final int k = (int) Math.floor(position);
        if (k >= n - 1) {
            return sorted[n - 1];
        }
        final double t = position - k;
        final double a = sorted[k];
        final double b = sorted[k + 1];
        // numpy's _lerp: a + (b - a) t, from the upper end when t >= 0.5
        return t >= 0.5 ? b - (b - a) * (1 - t) : a + (b - a) * t;
    }

    /** Loss, log-probs and the logits gradient against the float64 composite; returns the metrics. */
    static float[] compare(String label, PolicyLoss loss, Batch batch, float[] mu, ScalarType type, boolean tokenAdvantages,
            boolean onPolicy, boolean callerThreshold) {
        final double gradRelative = type == ScalarType.Float ? 1e-4 : type == ScalarType.BFloat16 ? 1.6e-2 : 4e-3;
        final LossSettings settings = loss.settings();
        final TokenWeights tw = settings.weights();
        try (Tensor logits = batch.logits(type); Tensor targets = batch.targets(); Tensor mask = batch.mask(); Tensor old = batch.old();
                Tensor ref = batch.ref(); Tensor advantages = tokenAdvantages ? batch.tokenAdvantages() : batch.sequenceAdvantages();
                Tensor rollout = mu == null ? null : tensor(mu, batch);
                Tensor reference = logits.to(ScalarType.Double).detach().set_requires_grad(true)) {
            final LossInput.Builder input = LossInput.builder().logits(logits).targets(targets).mask(mask).refLogProbs(ref)
                    .rolloutLogProbs(rollout);
            if (!onPolicy) {
                input.oldLogProbs(old);
            }
            if (tokenAdvantages) {
                input.tokenAdvantages(advantages);
            } else {
                input.advantages(advantages);
            }
            // The caller's threshold: the quantile of the same entropies, from a first call.
            double threshold = Double.NaN;
            if (tw.topEntropy() && callerThreshold) {
                try (LossResult probe = PolicyLoss.grpo().build().compute(LossInput.builder().logits(logits.detach()).targets(targets)
                        .mask(mask).advantages(batch.sequenceAdvantages()).build())) {
                    threshold = quantile(countedEntropies(probe, batch), 1 - tw.topEntropyRho()) + 1e-3;
                }
                input.entropyThreshold(threshold);
            }
            try (LossResult result = loss.compute(input.build())) {
                result.loss().backward();
                final float[] entropy = floats(result.entropy());
                Tensor keep = null;
                final double[] counted = countedEntropies(result, batch);
                if (tw.topEntropy()) {
                    if (!callerThreshold) {
                        threshold = quantile(counted, 1 - tw.topEntropyRho());
                    }
                    final float[] k = new float[entropy.length];
                    for (int i = 0; i < k.length; i++) {
                        k[i] = entropy[i] >= threshold ? 1 : 0;
                    }
                    keep = tensor(k, batch);
                }
                final CompositeLoss.Output want = CompositeLoss.compute(settings, loss.temperature(), reference, targets, mask,
                        onPolicy ? null : old, ref, advantages, tokenAdvantages, null, rollout, keep);
                want.loss().backward();
                final String what = label + " " + type + (onPolicy ? " on-policy" : "") + (tokenAdvantages ? " token-A" : "");
                PolicyLossModuleTest.assertClose(want.loss(), result.lossValue(), 2e-5, 1e-7, what + " loss");
                PolicyLossModuleTest.assertClose(want.logProbs(), result.logProbs(), 1e-5, 1e-6, what + " logProbs");
                final double scale = PolicyLossModuleTest.maxAbs(reference.grad());
                PolicyLossModuleTest.assertClose(reference.grad(), logits.grad(), gradRelative, 1e-3 * scale + 1e-9, what + " dLoss/dlogits");
                final float[] metrics = floats(result.metrics().tensor());
                if (tw.topEntropy()) {
                    long kept = 0;
                    for (double h : counted) {
                        kept += h >= threshold ? 1 : 0;
                    }
                    assertEquals((double) kept / counted.length, result.metrics().entropyKeptFraction(), 1e-6, what + " kept fraction");
                    if (keep != null) {
                        keep.close();
                    }
                } else {
                    assertEquals(1.0, result.metrics().entropyKeptFraction(), 0, what + " kept fraction without selection");
                }
                checkRolloutMetrics(what, result, batch, mu, onPolicy, tokenAdvantages, tw, settings.logRatioClamp());
                return metrics;
            }
        }
    }

    static double[] countedEntropies(LossResult result, Batch batch) {
        final float[] h = floats(result.entropy());
        final List<Double> out = new ArrayList<>();
        for (int i = 0; i < h.length; i++) {
            if (batch.maskValues[i] != 0) {
                out.add((double) h[i]);
            }
        }
        return out.stream().mapToDouble(Double::doubleValue).toArray();
    }

    static float[] floats(Tensor t) {
        try (Tensor c = t.detach().to(ScalarType.Float).contiguous()) {
            final float[] out = new float[(int) c.numel()];
            c.data_ptr_float().get(out);
            return out;
        }
    }

    /** The rollout metrics from their definitions, in double on the host. */
    static void checkRolloutMetrics(String what, LossResult result, Batch batch, float[] mu, boolean onPolicy, boolean tokenAdvantages,
            TokenWeights tw, double r) {
        final float[] lp = floats(result.logProbs());
        double weightSum = 0;
        double zero = 0;
        double zeroResponses = 0;
        double k1 = 0;
        double k3 = 0;
        long tokens = 0;
        long responses = 0;
        for (int b = 0; b < batch.b; b++) {
            double mismatch = 0;
            double divergence = 0;
            double divergenceMax = Double.NEGATIVE_INFINITY;
            double gap = 0;
            int length = 0;
            final double[] f = new double[batch.t];
            for (int t = 0; t < batch.t; t++) {
                final int i = b * batch.t + t;
                if (batch.maskValues[i] == 0) {
                    continue;
                }
                length++;
                final double olp = onPolicy ? lp[i] : batch.oldValues[i];
                final double beh = mu != null ? mu[i] : olp;
                gap += beh - lp[i];
                f[t] = 1;
                if (mu != null) {
                    final double d = olp - mu[i];
                    mismatch += d;
                    k1 += -d;
                    k3 += Math.exp(d) - d - 1;
                    final double v = divergence(tw, d);
                    divergence += v;
                    divergenceMax = Math.max(divergenceMax, v);
                    if (tw.level() == Rollout.Level.TOKEN) {
                        f[t] = band(tw, Math.exp(Math.max(-r, Math.min(r, d))));
                    }
                    if (tw.divergence() != null && tw.scope() == Rollout.Scope.TOKEN && !accepts(tw, v)) {
                        f[t] = 0;
                    }
                }
            }
            if (length == 0) {
                continue;
            }
            responses++;
            tokens += length;
            double response = 1;
            if (mu != null && (tw.level() == Rollout.Level.SEQUENCE || tw.level() == Rollout.Level.GEOMETRIC)) {
                final double logRho = tw.level() == Rollout.Level.SEQUENCE ? mismatch : mismatch / length;
                response = band(tw, Math.exp(Math.max(-r, Math.min(r, logRho))));
            }
            if (mu != null && tw.divergence() != null && tw.scope() != Rollout.Scope.TOKEN) {
                final double v = switch (tw.scope()) {
                    case MEAN -> divergence / length;
                    case SUM -> divergence;
                    default -> divergenceMax;
                };
                if (!accepts(tw, v)) {
                    response = 0;
                }
            }
            if (tw.offPolicyMask() && !tokenAdvantages && batch.sequenceAdvantages[b] < 0 && gap / length > tw.offPolicyDelta()) {
                response = 0;
            }
            int zeros = 0;
            for (int t = 0; t < batch.t; t++) {
                if (batch.maskValues[b * batch.t + t] != 0) {
                    weightSum += response * f[t];
                    zeros += response * f[t] == 0 ? 1 : 0;
                }
            }
            zero += zeros;
            zeroResponses += zeros == length ? 1 : 0;
        }
        final LossMetrics m = result.metrics();
        assertEquals(weightSum / tokens, m.rolloutWeightMean(), 2e-6 * Math.max(1, weightSum / tokens), what + " rollout weight mean");
        assertEquals(zero / tokens, m.rolloutMaskedFraction(), 1e-6, what + " masked fraction");
        assertEquals(zeroResponses / responses, m.rolloutSeqMaskedFraction(), 1e-6, what + " sequence masked fraction");
        final double wantK1 = mu == null ? 0 : k1 / tokens;
        final double wantK3 = mu == null ? 0 : k3 / tokens;
        assertEquals(wantK1, m.rolloutKl(), 1e-6 * Math.max(1, Math.abs(wantK1)), what + " rollout k1");
        assertEquals(wantK3, m.rolloutK3Kl(), 1e-6 * Math.max(1, Math.abs(wantK3)), what + " rollout k3");
    }

    static double divergence(TokenWeights tw, double d) {
        if (tw.divergence() == null) {
            return 0;
        }
        return switch (tw.divergence()) {
            case K1 -> d;
            case K2 -> 0.5 * d * d;
            case K3 -> Math.exp(-d) + d - 1;
        };
    }

    static boolean accepts(TokenWeights tw, double v) {
        return tw.divergence() == Rollout.Divergence.K1 ? v >= tw.low() && v <= tw.high() : v <= tw.high();
    }

    static double band(TokenWeights tw, double rho) {
        final boolean inside = (tw.cMin() <= 0 || rho >= tw.cMin()) && rho <= tw.cMax();
        if (tw.mode() == Rollout.Mode.MASK) {
            return inside ? rho : 0;
        }
        return Math.min(Math.max(rho, tw.cMin()), tw.cMax());
    }

    @ParameterizedTest(name = "{0} {1}")
    @MethodSource("objectivesAndVariants")
    void matchesTheComposite(ObjectivesTest.Case o, Variant v) {
        final boolean sequence = o.builder().get().build().settings().ratioLevel() != dev.gspo4j.internal.RatioLevel.TOKEN;
        final double spread = sequence ? 0.02 : 0.3;
        int round = 0;
        for (boolean onPolicy : new boolean[] {false, true}) {
            for (boolean tokenAdvantages : o.tokenAdvantages() && !label(v).contains("off-policy") ? new boolean[] {false, true}
                    : new boolean[] {false}) {
                final Batch batch = new Batch(900 + round, 5, 7, 31, spread);
                final float[] mu = v.mu ? rolloutValues(batch, 77 + round, sequence ? 0.03 : 0.2) : null;
                round++;
                compare(o.name() + " " + v.name, v.apply.apply(o.builder().get().kl(0.05, KlEstimator.K3).entropyCoefficient(0.01)).build(),
                        batch, mu, ScalarType.Float, tokenAdvantages, onPolicy, false);
            }
        }
    }

    private static String label(Variant v) {
        return v.name;
    }

    @ParameterizedTest(name = "{0}")
    @MethodSource("variants")
    void everyDtypeAndTheCallersThreshold(Variant v) {
        for (ScalarType type : new ScalarType[] {ScalarType.BFloat16, ScalarType.Half}) {
            final Batch batch = new Batch(950, 4, 9, 40, 0.3);
            final float[] mu = v.mu ? rolloutValues(batch, 51, 0.2) : null;
            compare("GRPO " + v.name, v.apply.apply(PolicyLoss.grpo()).build(), batch, mu, type, false, false, false);
            compare("GSPO " + v.name, v.apply.apply(PolicyLoss.gspo().clip(0.01, 0.02)).build(), new Batch(951, 4, 9, 40, 0.02),
                    v.mu ? rolloutValues(new Batch(951, 4, 9, 40, 0.02), 52, 0.03) : null, type, false, false, false);
        }
        if (v.select) {
            compare("GRPO caller threshold " + v.name, v.apply.apply(PolicyLoss.grpo()).build(), new Batch(952, 4, 9, 40, 0.3),
                    v.mu ? rolloutValues(new Batch(952, 4, 9, 40, 0.3), 53, 0.2) : null, ScalarType.Float, false, false, true);
        }
    }

    @Test
    void extremeMismatchesAndEmptyResponses() {
        // mu far from olp (spread 5): importance weights at the clamp and bands, most tokens rejected.
        for (Variant v : variants()) {
            final Batch batch = new Batch(960, 6, 5, 23, 2);
            compare("GRPO extreme " + v.name, v.apply.apply(PolicyLoss.grpo().logRatioClamp(3)).build(), batch,
                    v.mu ? rolloutValues(batch, 61, 5) : null, ScalarType.Float, false, false, false);
        }
        // Every response empty: loss 0, gradient 0, metrics 0 (no NaN).
        final Batch batch = new Batch(961, 3, 4, 11, 0.3);
        Arrays.fill(batch.maskValues, 0);
        try (Tensor logits = batch.logits(ScalarType.Float); Tensor targets = batch.targets(); Tensor mask = batch.mask();
                Tensor adv = batch.sequenceAdvantages(); Tensor mu = tensor(rolloutValues(batch, 62, 0.3), batch);
                LossResult result = PolicyLoss.grpo().rolloutWeights(Rollout.Level.SEQUENCE, Rollout.Mode.MASK, 0, 3)
                        .topEntropyQuantile(0.2).build().compute(LossInput.builder().logits(logits).targets(targets).mask(mask)
                                .advantages(adv).rolloutLogProbs(mu).build())) {
            result.loss().backward();
            assertEquals(0.0, result.lossValue().item_double(), 0);
            for (float g : floats(logits.grad())) {
                assertEquals(0.0f, g, 0);
            }
            for (float m : floats(result.metrics().tensor())) {
                assertTrue(Float.isFinite(m), "a metric of an empty batch is not finite");
            }
        }
    }

    @Test
    void packedEqualsPadded() {
        for (Variant v : variants()) {
            final Batch batch = new Batch(970, 5, 6, 19, 0.3);
            final float[] mu = rolloutValues(batch, 71, 0.2);
            final PolicyLoss loss = v.apply.apply(PolicyLoss.grpo()).build();
            final float[] padded;
            final float[] packedValues;
            try (Tensor logits = batch.logits(ScalarType.Float); Tensor targets = batch.targets(); Tensor mask = batch.mask();
                    Tensor old = batch.old(); Tensor adv = batch.sequenceAdvantages(); Tensor rollout = tensor(mu, batch)) {
                try (LossResult r = loss.compute(LossInput.builder().logits(logits).targets(targets).mask(mask).oldLogProbs(old)
                        .advantages(adv).rolloutLogProbs(v.mu ? rollout : null).build())) {
                    padded = new float[] {r.lossValue().item_float(), r.metrics().rolloutWeightMean(), r.metrics().rolloutMaskedFraction(),
                        r.metrics().entropyKeptFraction()};
                }
                // The same responses packed: their counted tokens back to back.
                final List<Integer> rows = new ArrayList<>();
                final long[] offsets = new long[batch.b + 1];
                for (int b = 0; b < batch.b; b++) {
                    for (int t = 0; t < batch.t; t++) {
                        if (batch.maskValues[b * batch.t + t] != 0) {
                            rows.add(b * batch.t + t);
                        }
                    }
                    offsets[b + 1] = rows.size();
                }
                final long[] index = rows.stream().mapToLong(Integer::longValue).toArray();
                try (Tensor idx = Tensor.create(index); Tensor flat = logits.detach().reshape(batch.b * batch.t, batch.v);
                        Tensor packedLogits = flat.index_select(0, idx); Tensor packedTargets = targets.reshape(-1).index_select(0, idx);
                        Tensor packedOld = old.reshape(-1).index_select(0, idx); Tensor packedMu = rollout.reshape(-1).index_select(0, idx);
                        Tensor off = Tensor.create(offsets);
                        LossResult r = loss.compute(LossInput.builder().logits(packedLogits).targets(packedTargets).offsets(off)
                                .oldLogProbs(packedOld).advantages(adv).rolloutLogProbs(v.mu ? packedMu : null).build())) {
                    packedValues = new float[] {r.lossValue().item_float(), r.metrics().rolloutWeightMean(), r.metrics().rolloutMaskedFraction(),
                        r.metrics().entropyKeptFraction()};
                }
            }
            for (int k = 0; k < padded.length; k++) {
                assertEquals(padded[k], packedValues[k], 1e-6 * Math.max(1, Math.abs(padded[k])), v.name + " packed vs padded [" + k + "]");
            }
        }
    }

    @Test
    void compositeWeightsMatchFiniteDifferences() {
        // The reference with weights: autograd of the float64 composite against central differences,
        // the weights (functions of sg values) frozen at the base point as every sg factor.
        final Batch batch = new Batch(980, 3, 4, 7, 0.3);
        final float[] mu = rolloutValues(batch, 81, 0.2);
        for (Variant v : variants()) {
            if (v.select) {
                continue; // the selection is a fixed 0/1 tensor in the composite: nothing new to differentiate
            }
            final PolicyLoss loss = v.apply.apply(PolicyLoss.grpo().kl(0.1, KlEstimator.K3)).build();
            final LossSettings settings = loss.settings();
            try (Tensor base = batch.logits(ScalarType.Float); Tensor z = base.to(ScalarType.Double).detach().set_requires_grad(true);
                    Tensor frozen = z.detach().clone(); Tensor targets = batch.targets(); Tensor mask = batch.mask(); Tensor old = batch.old();
                    Tensor ref = batch.ref(); Tensor adv = batch.sequenceAdvantages(); Tensor rollout = tensor(mu, batch)) {
                CompositeLoss.compute(settings, 1, z, targets, mask, old, ref, adv, false, null, v.mu ? rollout : null, null).loss()
                        .backward();
                final double h = 1e-6;
                final Tensor flat = frozen.reshape(-1);
                boolean nonZero = false;
                for (int i = 0; i < flat.numel(); i += 5) {
                    final double[] values = new double[2];
                    for (int k = 0; k < 2; k++) {
                        try (Tensor perturbed = flat.clone()) {
                            perturbed.data_ptr_double().put(i, flat.data_ptr_double().get(i) + (k == 0 ? h : -h));
                            values[k] = CompositeLoss.compute(settings, 1, perturbed.reshape(3, 4, 7), targets, mask, old, ref, adv, false,
                                    frozen, v.mu ? rollout : null, null).loss().item_double();
                        }
                    }
                    final double numeric = (values[0] - values[1]) / (2 * h);
                    final double analytic = z.grad().reshape(-1).data_ptr_double().get(i);
                    nonZero |= analytic != 0;
                    assertEquals(analytic, numeric, 1e-6 + 1e-5 * Math.abs(analytic), v.name + " d/dz[" + i + "]");
                }
                assertTrue(nonZero, v.name + ": a zero gradient checks nothing");
            }
        }
    }

    @Test
    void theWeightsActuallyAct() {
        // A mask band that drops every token leaves only the KL term; truncation changes the loss.
        final Batch batch = new Batch(990, 4, 6, 17, 0.3);
        final float[] mu = rolloutValues(batch, 91, 0.5);
        try (Tensor logits = batch.logits(ScalarType.Float); Tensor targets = batch.targets(); Tensor mask = batch.mask();
                Tensor old = batch.old(); Tensor adv = batch.sequenceAdvantages(); Tensor rollout = tensor(mu, batch)) {
            final LossInput input = LossInput.builder().logits(logits.detach()).targets(targets).mask(mask).oldLogProbs(old)
                    .advantages(adv).rolloutLogProbs(rollout).build();
            try (LossResult plain = PolicyLoss.grpo().build().compute(input);
                    LossResult none = PolicyLoss.grpo().rolloutWeights(Rollout.Level.TOKEN, Rollout.Mode.MASK, 1e6, 1e7).build()
                            .compute(input);
                    LossResult truncated = PolicyLoss.grpo().rolloutWeights(Rollout.Level.TOKEN, Rollout.Mode.TRUNCATE, 0, 1.0).build()
                            .compute(input)) {
                assertEquals(0.0, none.lossValue().item_double(), 0, "every token masked out: no policy term");
                assertEquals(1.0, none.metrics().rolloutMaskedFraction(), 0);
                assertEquals(1.0, none.metrics().rolloutSeqMaskedFraction(), 0);
                assertTrue(Math.abs(plain.lossValue().item_double() - truncated.lossValue().item_double()) > 1e-4, "truncation at 1 changes the loss");
                assertEquals(1.0, plain.metrics().rolloutWeightMean(), 0, "no correction: w = 1");
                assertTrue(plain.metrics().rolloutK3Kl() > 0, "the mismatch k3 is reported with mu alone");
            }
        }
    }

    @Test
    void hiddenStatesPathMatchesTheLogitsPath() {
        final Random random = new Random(5);
        final int b = 3;
        final int t = 5;
        final int h = 8;
        final int v = 29;
        final float[] hidden = new float[b * t * h];
        final float[] weight = new float[v * h];
        for (int i = 0; i < hidden.length; i++) {
            hidden[i] = (float) random.nextGaussian();
        }
        for (int i = 0; i < weight.length; i++) {
            weight[i] = (float) (0.5 * random.nextGaussian());
        }
        final float[] mu = new float[b * t];
        final float[] old = new float[b * t];
        final long[] target = new long[b * t];
        for (int i = 0; i < mu.length; i++) {
            target[i] = random.nextInt(v);
            old[i] = (float) (-3 + 0.3 * random.nextGaussian());
            mu[i] = (float) (old[i] + 0.2 * random.nextGaussian());
        }
        final PolicyLoss loss = PolicyLoss.gspo().clip(0.05, 0.05).topEntropyQuantile(0.6)
                .rolloutWeights(Rollout.Level.SEQUENCE, Rollout.Mode.TRUNCATE, 0, 2).offPolicyMask(0.1).build();
        try (Tensor hs = Tensor.create(hidden).reshape(b, t, h); Tensor w = Tensor.create(weight).reshape(v, h);
                Tensor logits = hs.matmul(w.t()); Tensor targets = Tensor.create(target).reshape(b, t);
                Tensor olp = Tensor.create(old).reshape(b, t); Tensor rollout = Tensor.create(mu).reshape(b, t);
                Tensor adv = Tensor.create(new float[] {0.5f, -1.0f, 1.5f});
                LossResult fromLogits = loss.compute(LossInput.builder().logits(logits).targets(targets).oldLogProbs(olp)
                        .rolloutLogProbs(rollout).advantages(adv).build());
                LossResult fromHidden = loss.compute(LossInput.builder().hiddenStates(hs, w, null).logitsChunkBytes(3 * v * 4)
                        .targets(targets).oldLogProbs(olp).rolloutLogProbs(rollout).advantages(adv).build())) {
            final double want = fromLogits.lossValue().item_double();
            assertEquals(want, fromHidden.lossValue().item_double(), 1e-6 * Math.max(1, Math.abs(want)));
            final float[] a = floats(fromLogits.metrics().tensor());
            final float[] c = floats(fromHidden.metrics().tensor());
            for (int i = 0; i < a.length; i++) {
                assertEquals(a[i], c[i], 1e-5 * Math.max(1, Math.abs(a[i])), "metric " + i);
            }
        }
    }

    @Test
    void errorsNameTheArgument() {
        final Batch batch = new Batch(995, 3, 4, 11, 0.3);
        try (Tensor logits = batch.logits(ScalarType.Float); Tensor targets = batch.targets(); Tensor mask = batch.mask();
                Tensor adv = batch.sequenceAdvantages(); Tensor tokenAdv = batch.tokenAdvantages();
                Tensor mu = tensor(rolloutValues(batch, 96, 0.3), batch)) {
            final IllegalArgumentException missing = assertThrows(IllegalArgumentException.class,
                    () -> PolicyLoss.grpo().rolloutWeights(Rollout.Level.TOKEN, Rollout.Mode.TRUNCATE, 0, 2).build()
                            .compute(LossInput.builder().logits(logits).targets(targets).mask(mask).advantages(adv).build()).close());
            assertTrue(missing.getMessage().contains("rolloutLogProbs"), missing.getMessage());
            final IllegalArgumentException perToken = assertThrows(IllegalArgumentException.class,
                    () -> PolicyLoss.grpo().offPolicyMask(0.1).build()
                            .compute(LossInput.builder().logits(logits).targets(targets).mask(mask).tokenAdvantages(tokenAdv).build()).close());
            assertTrue(perToken.getMessage().contains("off-policy mask"), perToken.getMessage());
            final IllegalArgumentException noSelection = assertThrows(IllegalArgumentException.class,
                    () -> PolicyLoss.grpo().build().compute(LossInput.builder().logits(logits).targets(targets).mask(mask).advantages(adv)
                            .entropyThreshold(1.0).build()).close());
            assertTrue(noSelection.getMessage().contains("topEntropyQuantile"), noSelection.getMessage());
            // NaN in the engine's log-probs at a counted token: named, the caller's tensor unchanged.
            try (Tensor bad = mu.clone()) {
                int first = 0;
                while (batch.maskValues[first] == 0) {
                    first++;
                }
                bad.reshape(-1).data_ptr_float().put(first, Float.NaN);
                final NonFiniteDataException nan = assertThrows(NonFiniteDataException.class,
                        () -> PolicyLoss.grpo().build().compute(LossInput.builder().logits(logits).targets(targets).mask(mask)
                                .advantages(adv).rolloutLogProbs(bad).build()).close());
                assertTrue(nan.getMessage().contains("rolloutLogProbs"), nan.getMessage());
                assertTrue(Float.isNaN(bad.reshape(-1).data_ptr_float().get(first)));
            }
            // Wrong shape.
            try (Tensor wrong = Tensor.create(new float[5])) {
                final IllegalArgumentException shape = assertThrows(IllegalArgumentException.class,
                        () -> PolicyLoss.grpo().build().compute(LossInput.builder().logits(logits).targets(targets).mask(mask)
                                .advantages(adv).rolloutLogProbs(wrong).build()).close());
                assertTrue(shape.getMessage().contains("rolloutLogProbs"), shape.getMessage());
            }
        }
        // Options out of range.
        assertThrows(IllegalArgumentException.class, () -> PolicyLoss.grpo().topEntropyQuantile(0));
        assertThrows(IllegalArgumentException.class, () -> PolicyLoss.grpo().topEntropyQuantile(1.5));
        assertThrows(IllegalArgumentException.class, () -> PolicyLoss.grpo().rolloutWeights(Rollout.Level.TOKEN, Rollout.Mode.MASK, 3, 2));
        assertThrows(IllegalArgumentException.class, () -> PolicyLoss.grpo().rolloutWeights(Rollout.Level.TOKEN, Rollout.Mode.MASK, -1, 2));
        assertThrows(IllegalArgumentException.class, () -> PolicyLoss.grpo().rolloutWeights(null, Rollout.Mode.MASK, 0, 2));
        assertThrows(IllegalArgumentException.class, () -> PolicyLoss.grpo().rolloutRejection(Rollout.Divergence.K3, Rollout.Scope.TOKEN, 0));
        assertThrows(IllegalArgumentException.class,
                () -> PolicyLoss.grpo().rolloutRejection(Rollout.Divergence.K1, Rollout.Scope.MEAN, 0.2, 0.1));
        assertThrows(IllegalArgumentException.class, () -> PolicyLoss.grpo().offPolicyMask(Double.NaN));
        assertThrows(IllegalArgumentException.class, () -> LossInput.builder().entropyThreshold(Double.NaN));
    }
}
