package dev.gspo4j;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import dev.gspo4j.internal.LossSettings;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Random;
import org.bytedeco.pytorch.Device;
import org.bytedeco.pytorch.Scalar;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;
import org.junit.jupiter.api.Test;

/**
 * Seeded random calls across every public entry point, valid and malformed. Each call either
 * succeeds and matches the reference, or fails with {@link IllegalArgumentException} carrying a
 * message; the generator knows which to expect. Calls: {@code -Dgspo4j.fuzz.calls} (default 10000).
 */
class FuzzTest {
    static final int CALLS = Integer.getInteger("gspo4j.fuzz.calls", 10_000);

    /** One random padded case and whether its mutation (if any) makes it invalid. */
    static final class LossCase {
        final Random random;
        int b;
        int t;
        int v;
        ScalarType type;
        double[] logits;
        long[] targets;
        double[] mask;
        double[] old;
        double[] ref;
        double[] advantages;
        boolean tokenAdvantages;
        boolean onPolicy;
        boolean packed;
        boolean strided;
        String mutation = "none";
        /** Set when the mutation's random data turned out invalid (negInfLogits decides only while placing). */
        boolean invalidData;
        PolicyLoss.Builder builder;
        String module;
        /** The engine's log-probs (rollout correction), or null. */
        double[] rollout;
        /** Top-entropy selection: the caller's threshold (NaN: the kernel's quantile), when selecting. */
        boolean selecting;
        double threshold = Double.NaN;
        double rho;

        LossCase(Random random) {
            this.random = random;
        }
    }

    @Test
    void randomCallsNeverCrashAndAreEitherRightOrRejected() {
        final Random random = new Random(20261123);
        final int[] counts = new int[3]; // successes, expected rejections, edge cases
        for (int call = 0; call < CALLS; call++) {
            final int kind = random.nextInt(100);
            final String label = "call " + call;
            if (kind < 70) {
                lossCall(random, label, counts);
            } else if (kind < 85) {
                groupCall(random, label, counts, false);
            } else if (kind < 90) {
                groupCall(random, label, counts, true);
            } else {
                gaeCall(random, label, counts);
            }
        }
        System.out.printf("fuzz: %d calls, %d matched the reference, %d rejected as expected%n", CALLS, counts[0], counts[1]);
        assertTrue(counts[0] > CALLS / 4 && counts[1] > CALLS / 5, Arrays.toString(counts));
    }

    // ---- PolicyLoss.compute ---------------------------------------------------------------------

    static final String[] MUTATIONS = {"dtype", "rank", "targetShape", "targetType", "targetRange", "logitsNaN", "oldNaN",
        "advantageNaN", "maskValue", "advantageShape", "klWithoutRef", "gspoTokenAdvantages", "lastStride", "device",
        "offsets", "option", "inPlaceLogits", "inPlaceTargets", "negInfLogits", "negBit", "extremeTemperature", "rolloutNaN",
        "rolloutMissing"};

    static void lossCall(Random random, String label, int[] counts) {
        final LossCase c = new LossCase(random);
        c.b = random.nextInt(6);
        c.t = random.nextInt(7);
        c.v = new int[] {1, 2, 3, 17, 64, 70001}[random.nextInt(random.nextInt(20) == 0 ? 6 : 5)];
        if (c.v > 1000) {
            c.b = Math.min(c.b, 1);
            c.t = Math.min(c.t, 2);
        }
        c.type = new ScalarType[] {ScalarType.Float, ScalarType.BFloat16, ScalarType.Half}[random.nextInt(3)];
        final int n = c.b * c.t;
        c.logits = new double[n * c.v];
        for (int i = 0; i < c.logits.length; i++) {
            c.logits[i] = 3 * random.nextGaussian();
        }
        c.targets = new long[n];
        c.mask = new double[n];
        c.old = new double[n];
        c.ref = new double[n];
        final boolean allMasked = random.nextInt(10) == 0;
        for (int r = 0; r < c.b; r++) {
            final int length = allMasked ? 0 : random.nextInt(c.t + 1);
            for (int k = 0; k < c.t; k++) {
                final int i = r * c.t + k;
                c.targets[i] = random.nextInt(c.v);
                c.mask[i] = k < length ? 1 : 0;
                c.old[i] = -Math.abs(2 * random.nextGaussian());
                c.ref[i] = -Math.abs(2 * random.nextGaussian());
            }
        }
        final int module = random.nextInt(13);
        c.module = new String[] {"GSPO", "GSPO-token", "GRPO", "PPO", "CISPO", "SAPO", "GMPO", "LUSPO", "VESPO", "DPPO-TV", "DPPO-KL",
            "DAPO", "Dr. GRPO"}[module];
        c.builder = switch (module) {
            case 0 -> PolicyLoss.gspo();
            case 1 -> PolicyLoss.gspoToken();
            case 2 -> PolicyLoss.grpo();
            case 3 -> PolicyLoss.ppo();
            case 4 -> PolicyLoss.cispo().sequenceRatio(random.nextInt(3) == 0);
            case 5 -> PolicyLoss.sapo().sequenceRatio(random.nextInt(3) == 0).sapoTemperatures(0.5 + random.nextDouble(), 0.5 + random.nextDouble());
            case 6 -> PolicyLoss.gmpo();
            case 7 -> PolicyLoss.luspo();
            case 8 -> PolicyLoss.vespo().vespoShape(random.nextInt(4), random.nextInt(4), random.nextInt(4), random.nextInt(4));
            case 9 -> PolicyLoss.dppoTv().dppoDivergence(random.nextDouble() * 0.2, random.nextDouble() * 0.2);
            case 10 -> PolicyLoss.dppoKl().dppoDivergence(random.nextDouble() * 0.1, random.nextDouble() * 0.1).dppoRatioCap(1 + 20 * random.nextDouble());
            case 11 -> PolicyLoss.dapo();
            default -> PolicyLoss.drGrpo();
        };
        final boolean sequenceObjective = module == 0 || module == 6 || module == 7;
        final boolean clipped = module <= 3 || module == 7 || module >= 11;
        c.tokenAdvantages = module == 1 || module == 3 ? random.nextBoolean() : !sequenceObjective && random.nextInt(4) == 0;
        c.advantages = new double[c.tokenAdvantages ? n : c.b];
        for (int i = 0; i < c.advantages.length; i++) {
            c.advantages[i] = random.nextGaussian();
        }
        c.onPolicy = random.nextInt(4) == 0;
        if (random.nextBoolean()) {
            c.builder.clip(random.nextDouble() * 0.3, random.nextDouble() * 0.3);
        }
        if (clipped && module >= 2 && random.nextInt(3) == 0) {
            if (random.nextBoolean()) {
                c.builder.dualClip(1.5 + 3 * random.nextDouble());
            } else {
                c.builder.delta(1.35 + 3 * random.nextDouble()); // >= 1 + the largest eps_high drawn above
            }
        }
        if (module != 0 && random.nextBoolean()) {
            c.builder.aggregation(Aggregation.values()[random.nextInt(4)]);
        }
        if (random.nextInt(4) == 0) {
            c.builder.normalizer(1 + random.nextInt(20));
        }
        final boolean kl = random.nextInt(3) == 0;
        if (kl) {
            c.builder.kl(0.01 + random.nextDouble() * 0.1, KlEstimator.values()[random.nextInt(KlEstimator.values().length)]);
        }
        if (random.nextInt(3) == 0) {
            c.builder.entropyCoefficient(random.nextDouble() * 0.05);
        }
        if (random.nextInt(3) == 0) {
            c.builder.temperature(0.5 + random.nextDouble());
        }
        // Rollout correction and top-entropy selection, in any combination.
        final boolean needsRollout;
        if (random.nextInt(3) == 0) {
            c.rollout = new double[n];
            for (int i = 0; i < n; i++) {
                c.rollout[i] = c.old[i] + (random.nextBoolean() ? 0.05 : 1.0) * random.nextGaussian();
            }
            final boolean importance = random.nextBoolean();
            if (importance) {
                final double cMax = random.nextBoolean() ? Double.POSITIVE_INFINITY : 1 + 3 * random.nextDouble();
                c.builder.rolloutWeights(Rollout.Level.values()[random.nextInt(3)], Rollout.Mode.values()[random.nextInt(2)],
                        random.nextBoolean() ? 0 : 0.5 * random.nextDouble(), cMax);
            }
            final boolean rejection = random.nextInt(3) == 0;
            if (rejection) {
                c.builder.rolloutRejection(Rollout.Divergence.values()[random.nextInt(3)], Rollout.Scope.values()[random.nextInt(4)],
                        0.01 + random.nextDouble());
            }
            needsRollout = importance || rejection;
            if (!c.tokenAdvantages && random.nextInt(3) == 0) {
                c.builder.offPolicyMask(random.nextGaussian() * 0.2);
            }
        } else {
            needsRollout = false;
        }
        if (random.nextInt(5) == 0) {
            c.selecting = true;
            c.rho = random.nextBoolean() ? 1 : 0.05 + 0.95 * random.nextDouble();
            c.builder.topEntropyQuantile(c.rho);
            if (random.nextInt(3) == 0) {
                c.threshold = 3 * random.nextDouble();
            }
        }
        c.packed = c.b > 0 && random.nextInt(5) == 0;
        c.strided = !c.packed && random.nextInt(5) == 0;
        final boolean mutate = random.nextInt(100) < 45;
        if (mutate) {
            c.mutation = MUTATIONS[random.nextInt(MUTATIONS.length)];
        }
        final boolean hasCounted = Arrays.stream(c.mask).anyMatch(m -> m != 0);
        // Mutations that need data to act on become no-ops (and the case stays valid) without it.
        boolean expectError = switch (c.mutation) {
            case "none" -> false;
            case "targetRange", "logitsNaN" -> n > 0;
            case "oldNaN", "advantageNaN" -> hasCounted;
            case "maskValue" -> n > 0;
            case "lastStride" -> c.v > 1 && c.t > 1 && c.b > 0;
            case "klWithoutRef" -> kl;
            case "gspoTokenAdvantages" -> module == 0;
            case "offsets" -> c.packed;
            case "advantageShape" -> true;
            // Valid data the kernels must take as it is (compared with the composite below).
            case "negBit", "extremeTemperature" -> false;
            case "rolloutNaN" -> hasCounted && c.rollout != null;
            case "rolloutMissing" -> needsRollout;
            // Decided in runLoss: valid unless a -Inf lands on a counted target or fills a row.
            case "negInfLogits" -> false;
            // Differentiable results refuse a backward after the change (IllegalStateException).
            case "inPlaceLogits", "inPlaceTargets" -> false;
            default -> true;
        };
        if (c.mutation.equals("extremeTemperature")) {
            // The ends of the accepted range [1e-4, 1e4] and a decade inside each.
            c.builder.temperature(new double[] {1e-4, 1e-3, 1e3, 1e4}[random.nextInt(4)]);
        }
        if (c.mutation.equals("gspoTokenAdvantages") && module == 0) {
            c.tokenAdvantages = true;
            c.advantages = new double[n];
        }
        try {
            if (c.mutation.equals("option")) {
                invalidOption(random, c.builder);
                fail(label + ": an invalid option was accepted");
            }
            runLoss(c, kl && !c.mutation.equals("klWithoutRef"), label, expectError, counts);
        } catch (IllegalArgumentException e) {
            if (!expectError && !c.invalidData) {
                throw new AssertionError(label + " (" + c.module + ", mutation " + c.mutation + ") rejected a valid case: " + e.getMessage(), e);
            }
            assertTrue(e.getMessage() != null && e.getMessage().length() > 10, label + ": message too thin: " + e.getMessage());
            counts[1]++;
        }
    }

    static void invalidOption(Random random, PolicyLoss.Builder builder) {
        switch (random.nextInt(6)) {
            case 0 -> builder.clip(1.5, 0.2);
            case 1 -> builder.clip(0.2, Double.NaN);
            case 2 -> builder.dualClip(0.5);
            case 3 -> builder.temperature(random.nextBoolean() ? 0 : Double.NaN);
            case 4 -> builder.normalizer(-1);
            default -> builder.kl(Double.POSITIVE_INFINITY, KlEstimator.K1);
        }
    }

    static Tensor floats(double[] values, long... shape) {
        final float[] f = new float[values.length];
        for (int i = 0; i < f.length; i++) {
            f[i] = (float) values[i];
        }
        try (Tensor flat = values.length == 0 ? torch.zeros(0) : Tensor.create(f)) {
            return flat.reshape(shape);
        }
    }

    static void runLoss(LossCase c, boolean withRef, String label, boolean expectErrorIn, int[] counts) {
        boolean expectError = expectErrorIn;
        final int n = c.b * c.t;
        final List<Tensor> owned = new ArrayList<>();
        try {
            final String m = c.mutation;
            Tensor logitsBase = own(owned, floats(c.logits, c.b, c.t, c.v));
            if (m.equals("logitsNaN") && c.logits.length > 0) {
                logitsBase.reshape(-1).data_ptr_float().put(c.random.nextInt(c.logits.length), c.random.nextBoolean() ? Float.NaN : Float.POSITIVE_INFINITY);
            }
            if (m.equals("negInfLogits") && c.logits.length > 0) {
                c.invalidData = placeNegativeInfinities(c, logitsBase);
                expectError |= c.invalidData;
            }
            final ScalarType type = m.equals("dtype") ? (c.random.nextBoolean() ? ScalarType.Double : ScalarType.Int) : c.type;
            Tensor logits;
            if (c.strided) {
                // A [B, T, V] view with a gap after each response, as logits[:, :-1, :] has.
                final Tensor wide = own(owned, torch.cat(new org.bytedeco.pytorch.TensorArrayRef(
                        new org.bytedeco.pytorch.TensorVector(logitsBase, torch.zeros(c.b, 1, c.v))), 1).to(type));
                logits = own(owned, wide.narrow(1, 0, c.t)).detach();
            } else {
                logits = own(owned, logitsBase.to(type)).detach();
            }
            if (type == ScalarType.Float || type == ScalarType.BFloat16 || type == ScalarType.Half || type == ScalarType.Double) {
                logits.set_requires_grad(true);
            }
            Tensor inputLogits = logits;
            if (m.equals("rank")) {
                inputLogits = own(owned, logits.reshape(-1));
            } else if (m.equals("lastStride") && c.v > 1 && n > 0) {
                inputLogits = own(owned, own(owned, logits.transpose(1, 2).contiguous()).transpose(1, 2));
            } else if (m.equals("device")) {
                inputLogits = own(owned, logits.detach().to(new Device("meta"), type));
            }
            Tensor targets = own(owned, Tensor.create(c.targets.length == 0 ? new long[] {0} : c.targets));
            targets = own(owned, c.targets.length == 0 ? targets.narrow(0, 0, 0).reshape(c.b, c.t) : targets.reshape(c.b, c.t));
            if (m.equals("targetType")) {
                targets = own(owned, targets.to(ScalarType.Float));
            } else if (m.equals("targetRange") && n > 0) {
                targets.reshape(-1).data_ptr_long().put(c.random.nextInt(n), c.random.nextBoolean() ? c.v : -1);
            }
            final double[] maskValues = c.mask.clone();
            if (m.equals("maskValue") && n > 0) {
                maskValues[c.random.nextInt(n)] = c.random.nextBoolean() ? 2 : 0.5;
            }
            final double[] old = c.old.clone();
            if (m.equals("oldNaN")) {
                for (int i = 0; i < n; i++) {
                    if (c.mask[i] != 0) {
                        old[i] = Double.NaN;
                        break;
                    }
                }
            }
            double[] advantages = c.advantages.clone();
            if (m.equals("advantageNaN")) {
                for (int i = 0; i < n; i++) {
                    if (c.mask[i] != 0) {
                        advantages[c.tokenAdvantages ? i : i / c.t] = Double.NaN;
                        break;
                    }
                }
            }
            final Tensor mask = own(owned, floats(maskValues, c.b, c.t));
            Tensor oldTensor = own(owned, floats(old, c.b, c.t));
            Tensor ref = own(owned, floats(c.ref, c.b, c.t));
            Tensor adv = own(owned, c.tokenAdvantages ? floats(advantages, c.b, c.t) : floats(advantages, c.b));
            if (m.equals("negBit")) {
                // libtorch's lazy negation: the values are the same, the memory holds their negatives.
                oldTensor = negBitView(owned, oldTensor);
                ref = negBitView(owned, ref);
                adv = negBitView(owned, adv);
            }
            if (m.equals("advantageShape")) {
                adv = own(owned, floats(new double[c.b + 1], c.b + 1));
                c.tokenAdvantages = false;
            }
            final LossInput.Builder input = LossInput.builder().targets(targets).mask(mask);
            if (!c.onPolicy || m.equals("oldNaN")) {
                input.oldLogProbs(oldTensor);
            }
            if (withRef) {
                input.refLogProbs(ref);
            }
            double[] rolloutValues = c.rollout == null ? null : c.rollout.clone();
            if (m.equals("rolloutNaN") && rolloutValues != null) {
                for (int i = 0; i < n; i++) {
                    if (c.mask[i] != 0) {
                        rolloutValues[i] = Double.NaN;
                        break;
                    }
                }
            }
            final Tensor rollout = rolloutValues == null || m.equals("rolloutMissing") ? null : own(owned, floats(rolloutValues, c.b, c.t));
            input.rolloutLogProbs(rollout);
            if (c.selecting && !Double.isNaN(c.threshold)) {
                input.entropyThreshold(c.threshold);
            }
            if (c.tokenAdvantages) {
                input.tokenAdvantages(adv);
            } else {
                input.advantages(adv);
            }
            if (c.packed && !m.equals("rank") && !m.equals("lastStride")) {
                // Every token of the padded case, responses back to back (mask carried along).
                final long[] offsets = new long[c.b + 1];
                for (int r = 0; r < c.b; r++) {
                    offsets[r + 1] = offsets[r] + c.t;
                }
                if (m.equals("offsets")) {
                    // A start other than 0, or an end other than N.
                    offsets[c.random.nextBoolean() ? 0 : c.b] += 1;
                }
                input.logits(own(owned, inputLogits.reshape(n, c.v))).targets(own(owned, targets.reshape(-1)))
                        .mask(own(owned, mask.reshape(-1))).offsets(own(owned, Tensor.create(offsets)));
                if (!c.onPolicy || m.equals("oldNaN")) {
                    input.oldLogProbs(own(owned, oldTensor.reshape(-1)));
                }
                if (withRef) {
                    input.refLogProbs(own(owned, ref.reshape(-1)));
                }
                if (rollout != null) {
                    input.rolloutLogProbs(own(owned, rollout.reshape(-1)));
                }
                if (c.tokenAdvantages) {
                    input.tokenAdvantages(own(owned, adv.reshape(-1)));
                }
            } else {
                input.logits(inputLogits);
            }
            if (m.equals("targetShape")) {
                input.targets(own(owned, own(owned, targets.reshape(-1).unsqueeze(-1)).unsqueeze(-1)));
            }
            final PolicyLoss loss = c.builder.build();
            final boolean direct = c.random.nextBoolean();
            try (LossResult result = loss.compute(input.build())) {
                if ((m.equals("inPlaceLogits") || m.equals("inPlaceTargets")) && !expectError) {
                    checkInPlaceRefused(c, result, logits, targets, direct, label);
                    counts[1]++;
                    return;
                }
                if (result.differentiable()) {
                    if (direct) {
                        result.backward();
                    } else {
                        result.loss().backward();
                    }
                }
                if (expectError) {
                    fail(label + " (" + c.module + ", mutation " + m + ") accepted an invalid case");
                }
                checkAgainstComposite(c, loss, logits, targets, mask, c.onPolicy ? null : oldTensor, withRef ? ref : null, adv, result, label,
                        rollout);
                counts[0]++;
            }
        } finally {
            for (int i = owned.size() - 1; i >= 0; i--) {
                owned.get(i).close();
            }
        }
    }

    /**
     * Writes -Inf (a banned or padded vocabulary entry) over some logits and says whether the case
     * became invalid: a counted token whose target logit is -Inf has probability 0, and a row of
     * nothing but -Inf has no distribution. Anything else is valid data.
     */
    static boolean placeNegativeInfinities(LossCase c, Tensor logitsBase) {
        final int n = c.b * c.t;
        final float[] values = new float[n * c.v];
        boolean invalid = false;
        try (Tensor flat = logitsBase.reshape(-1)) {
            flat.data_ptr_float().get(values);
            final boolean wholeRow = c.random.nextInt(8) == 0;
            final boolean onTarget = c.random.nextInt(6) == 0;
            for (int row = 0; row < n; row++) {
                if (c.random.nextBoolean()) {
                    continue;
                }
                final int target = (int) c.targets[row];
                for (int k = 0; k < c.v; k++) {
                    final boolean hit = wholeRow || (k == target ? onTarget : c.random.nextInt(3) == 0);
                    if (hit) {
                        values[row * c.v + k] = Float.NEGATIVE_INFINITY;
                    }
                }
                boolean allNegativeInfinity = true;
                for (int k = 0; k < c.v; k++) {
                    allNegativeInfinity &= values[row * c.v + k] == Float.NEGATIVE_INFINITY;
                }
                invalid |= allNegativeInfinity || (c.mask[row] != 0 && values[row * c.v + target] == Float.NEGATIVE_INFINITY);
            }
            flat.data_ptr_float().put(values);
        }
        return invalid;
    }

    static Tensor negBitView(List<Tensor> owned, Tensor values) {
        final Tensor negated = own(owned, values.neg());
        final Tensor view = own(owned, negated._neg_view());
        assertTrue(view.is_neg());
        return view;
    }

    /**
     * An in-place change to what the backward reads (the logits, or int64 targets), made after
     * compute() under NoGradGuard as an optimiser step or a data loader would: the backward must
     * refuse it as libtorch's "modified by an inplace operation" does, and leave no gradient.
     */
    static void checkInPlaceRefused(LossCase c, LossResult result, Tensor logits, Tensor targets, boolean direct, String label) {
        final String what = label + " (" + c.module + ", mutation " + c.mutation + (direct ? ", direct" : ", graph") + ")";
        // mul_ and fill_ return the tensor itself (a reference JavaCPP does not own): nothing to close.
        try (org.bytedeco.pytorch.NoGradGuard guard = new org.bytedeco.pytorch.NoGradGuard(); Scalar three = new Scalar(3.0);
                Scalar zero = new Scalar(0)) {
            if (c.mutation.equals("inPlaceLogits")) {
                logits.mul_(three);
            } else {
                targets.fill_(zero);
            }
        }
        if (!result.differentiable()) {
            return;
        }
        try {
            if (direct) {
                result.backward();
            } else {
                result.loss().backward();
            }
            fail(what + ": a backward after an in-place change ran");
        } catch (IllegalStateException e) {
            assertTrue(e.getMessage() != null && e.getMessage().contains("in-place"), what + ": message " + e.getMessage());
        }
        assertTrue(!logits.grad().defined() || PolicyLossModuleTest.maxAbs(logits.grad()) == 0, what + ": gradient written");
    }

    static Tensor own(List<Tensor> owned, Tensor t) {
        owned.add(t);
        return t;
    }

    static void checkAgainstComposite(LossCase c, PolicyLoss loss, Tensor logits, Tensor targets, Tensor mask, Tensor old, Tensor ref,
            Tensor adv, LossResult result, String label, Tensor rollout) {
        final String what = label + " (" + c.module + " " + c.type + (c.packed ? " packed" : "") + (c.strided ? " strided" : "")
                + (c.mutation.equals("none") ? "" : ", mutation " + c.mutation) + ", temperature " + loss.temperature() + ")";
        final boolean anyCounted = Arrays.stream(c.mask).anyMatch(m -> m != 0);
        final float value = result.lossValue().item_float();
        assertTrue(Float.isFinite(value), what + ": loss " + value);
        if (!anyCounted) {
            assertEquals(0.0f, value, what + ": empty batch");
            if (logits.grad().defined()) {
                assertEquals(0.0, PolicyLossModuleTest.maxAbs(logits.grad()), what + ": empty batch gradient");
            }
            return;
        }
        final LossSettings settings = PolicyLossModuleTest.settingsOf(loss);
        final double temperature = loss.temperature();
        try (Tensor reference = logits.detach().to(ScalarType.Double).contiguous().set_requires_grad(true)) {
            // Top-entropy selection: the kept tokens by the kernel's own entropies and the threshold
            // (the caller's, or numpy's quantile of the counted ones).
            Tensor keep = null;
            if (c.selecting) {
                final float[] h = RolloutCorrectionTest.floats(result.entropy());
                final List<Double> counted = new ArrayList<>();
                for (int i = 0; i < h.length; i++) {
                    if (c.mask[i] != 0) {
                        counted.add((double) h[i]);
                    }
                }
                final double threshold = !Double.isNaN(c.threshold) ? c.threshold
                        : RolloutCorrectionTest.quantile(counted.stream().mapToDouble(Double::doubleValue).toArray(), 1 - c.rho);
                final double[] k = new double[h.length];
                for (int i = 0; i < k.length; i++) {
                    k[i] = h[i] >= threshold ? 1 : 0;
                }
                keep = floats(k, c.b, c.t);
            }
            final CompositeLoss.Output want = CompositeLoss.compute(settings, temperature, reference, targets, mask, old, ref, adv,
                    c.tokenAdvantages, null, rollout, keep);
            if (keep != null) {
                keep.close();
            }
            want.loss().backward();
            final double w = want.loss().item_double();
            if (!(Math.abs(w - value) <= 1e-4 * Math.abs(w) + 1e-5)) {
                fail(String.format("%s: loss want %.9g got %.9g", what, w, value));
            }
            final double relative = c.type == ScalarType.Float ? 1e-3 : c.type == ScalarType.BFloat16 ? 2e-2 : 5e-3;
            final double scale = PolicyLossModuleTest.maxAbs(reference.grad());
            try (Tensor got = logits.grad().reshape(c.b, c.t, c.v)) {
                if (c.type == ScalarType.Half && scale > 65504) {
                    // Past float16's range the gradient is +-Inf, as libtorch's own would be.
                    final double[] wantGrad = PolicyLossModuleTest.doubles(reference.grad());
                    final double[] gotGrad = PolicyLossModuleTest.doubles(got);
                    for (int i = 0; i < wantGrad.length; i++) {
                        if (Math.abs(wantGrad[i]) >= 65520) {
                            assertEquals(Math.copySign(Double.POSITIVE_INFINITY, wantGrad[i]), gotGrad[i], what + " overflowing gradient " + i);
                        } else if (!(Math.abs(wantGrad[i] - gotGrad[i]) <= relative * Math.abs(wantGrad[i]) + 2e-3 * 65504)) {
                            fail(what + " gradient " + i + ": want " + wantGrad[i] + " got " + gotGrad[i]);
                        }
                    }
                } else {
                    PolicyLossModuleTest.assertClose(reference.grad(), got, relative, 2e-3 * scale + 1e-7, what + " gradient");
                }
            }
        }
    }


    // ---- Advantages -----------------------------------------------------------------------------

    static void groupCall(Random random, String label, int[] counts, boolean byIds) {
        final int count = random.nextInt(13);
        final int groupSize = random.nextInt(6) - (random.nextInt(10) == 0 ? 1 : 0);
        final AdvantageMode mode = AdvantageMode.values()[random.nextInt(AdvantageMode.values().length)];
        final float[] rewards = new float[count];
        for (int i = 0; i < count; i++) {
            rewards[i] = random.nextInt(3) == 0 ? random.nextInt(2) : (float) random.nextGaussian();
        }
        final boolean poison = count > 0 && random.nextInt(8) == 0;
        if (poison) {
            rewards[random.nextInt(count)] = random.nextBoolean() ? Float.NaN : Float.NEGATIVE_INFINITY;
        }
        final long[] ids = new long[count];
        for (int i = 0; i < count; i++) {
            ids[i] = byIds ? random.nextInt(4) * 7 : (groupSize > 0 ? i / groupSize : 0);
        }
        boolean singleton = false;
        for (int i = 0; i < count; i++) {
            final long id = ids[i];
            singleton |= Arrays.stream(ids).filter(x -> x == id).count() == 1;
        }
        final boolean expectError = poison || (!byIds && (groupSize <= 0 || count % groupSize != 0))
                || (mode == AdvantageMode.RLOO && singleton && (byIds || groupSize > 0 && count % groupSize == 0));
        try {
            final float[] got;
            if (!byIds && random.nextBoolean()) {
                got = Advantages.group(rewards, groupSize, mode);
            } else {
                try (Tensor r = count == 0 ? torch.zeros(0) : Tensor.create(rewards);
                        Tensor idTensor = count == 0 ? torch.zeros(new long[] {0}, new org.bytedeco.pytorch.TensorOptions(ScalarType.Long)) : Tensor.create(ids);
                        Tensor out = byIds ? Advantages.groupByIds(r, idTensor, mode, Advantages.DEFAULT_EPS) : Advantages.group(r, groupSize, mode)) {
                    got = new float[count];
                    if (count > 0) {
                        out.data_ptr_float().get(got);
                    }
                }
            }
            if (expectError) {
                fail(label + ": advantages accepted an invalid case");
            }
            final double[] want = groupReference(rewards, ids, mode);
            for (int i = 0; i < count; i++) {
                assertEquals(want[i], got[i], 1e-5 * Math.max(1, Math.abs(want[i])), label + " advantage " + i);
            }
            counts[0]++;
        } catch (IllegalArgumentException e) {
            if (!expectError) {
                throw new AssertionError(label + ": advantages rejected a valid case: " + e.getMessage(), e);
            }
            counts[1]++;
        }
    }

    /** The Bessel-corrected std of every reward (MEAN_BATCH_STD), 0 for fewer than two. */
    static double batchStd(float[] rewards) {
        if (rewards.length < 2) {
            return 0;
        }
        double sum = 0;
        for (float x : rewards) {
            sum += x;
        }
        double squares = 0;
        for (float x : rewards) {
            squares += (x - sum / rewards.length) * (x - sum / rewards.length);
        }
        return Math.sqrt(squares / (rewards.length - 1));
    }

    static double[] groupReference(float[] rewards, long[] ids, AdvantageMode mode) {
        final double[] out = new double[rewards.length];
        for (int i = 0; i < rewards.length; i++) {
            double sum = 0;
            int g = 0;
            boolean equal = true;
            for (int j = 0; j < rewards.length; j++) {
                if (ids[j] == ids[i]) {
                    sum += rewards[j];
                    g++;
                    equal &= rewards[j] == rewards[i];
                }
            }
            final double mean = sum / g;
            double squares = 0;
            for (int j = 0; j < rewards.length; j++) {
                if (ids[j] == ids[i]) {
                    squares += (rewards[j] - mean) * (rewards[j] - mean);
                }
            }
            out[i] = equal ? 0 : switch (mode) {
                case MEAN -> rewards[i] - mean;
                case RLOO -> rewards[i] - (sum - rewards[i]) / (g - 1);
                case MEAN_STD -> (rewards[i] - mean) / (Math.sqrt(squares / (g - 1)) + Advantages.DEFAULT_EPS);
                case MEAN_BATCH_STD -> (rewards[i] - mean) / (batchStd(rewards) + Advantages.DEFAULT_EPS);
            };
        }
        return out;
    }

    static void gaeCall(Random random, String label, int[] counts) {
        final int b = random.nextInt(4);
        final int t = random.nextInt(6);
        final double gamma = random.nextInt(10) == 0 ? 1.5 : random.nextDouble();
        final double lambda = random.nextInt(10) == 0 ? Double.NaN : random.nextDouble();
        final boolean mismatch = random.nextInt(10) == 0;
        final boolean poison = b * t > 0 && random.nextInt(10) == 0;
        final double[] rewards = new double[b * t];
        final double[] values = new double[b * (mismatch ? t + 1 : t)];
        for (int i = 0; i < b * t; i++) {
            rewards[i] = random.nextGaussian();
        }
        for (int i = 0; i < values.length; i++) {
            values[i] = random.nextGaussian();
        }
        if (poison) {
            rewards[random.nextInt(b * t)] = Double.NaN;
        }
        final boolean expectError = gamma > 1 || Double.isNaN(lambda) || mismatch || poison;
        try (Tensor r = floats(rewards, b, t); Tensor v = floats(values, b, mismatch ? t + 1 : t)) {
            try (Advantages.Gae gae = Advantages.gae(r, v, null, gamma, lambda)) {
                if (expectError) {
                    fail(label + ": GAE accepted an invalid case");
                }
                for (int row = 0; row < b; row++) {
                    double next = 0;
                    double nextValue = 0;
                    for (int k = t - 1; k >= 0; k--) {
                        final int i = row * t + k;
                        final double delta = (float) rewards[i] + gamma * nextValue - (float) values[i];
                        next = delta + gamma * lambda * next;
                        nextValue = (float) values[i];
                        assertEquals(next, gae.advantages().reshape(-1).data_ptr_float().get(i), 1e-4 * Math.max(1, Math.abs(next)), label);
                    }
                }
                counts[0]++;
            }
        } catch (IllegalArgumentException e) {
            if (!expectError) {
                throw new AssertionError(label + ": GAE rejected a valid case: " + e.getMessage(), e);
            }
            counts[1]++;
        }
    }
}
