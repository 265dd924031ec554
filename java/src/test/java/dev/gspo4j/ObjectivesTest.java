package dev.gspo4j;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import dev.gspo4j.PolicyLossModuleTest.Batch;
import dev.gspo4j.internal.LossSettings;
import dev.gspo4j.internal.Objective;
import dev.gspo4j.internal.RatioLevel;
import java.util.ArrayList;
import java.util.List;
import java.util.function.Supplier;
import java.util.stream.Stream;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.global.torch.ScalarType;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.Arguments;
import org.junit.jupiter.params.provider.MethodSource;

/**
 * The further objectives of docs/math.md (CISPO, SAPO, GMPO, LUSPO, VESPO, DPPO, the DAPO and Dr. GRPO
 * presets, delta) and the KL estimators K3_PLUS, K3_UNBIASED and ABS: fused value and gradient
 * against the float64 composite (itself checked by central differences here), in every dtype, on
 * and off policy, with moderate and extreme ratios, padded and packed, and empty responses.
 */
public class ObjectivesTest {

    /** A named builder and whether its objective takes per-token advantages. */
    record Case(String name, Supplier<PolicyLoss.Builder> builder, boolean tokenAdvantages) {
        @Override
        public String toString() {
            return name;
        }
    }

    static List<Case> objectives() {
        return List.of(
                new Case("CISPO", PolicyLoss::cispo, true),
                new Case("CISPO clip 0.2/0.28", () -> PolicyLoss.cispo().clip(0.2, 0.28), true),
                new Case("CISPO sequence", () -> PolicyLoss.cispo().sequenceRatio(true).clip(0.5, 0.01), true),
                new Case("SAPO", PolicyLoss::sapo, true),
                new Case("SAPO tau 0.3/2 token-mean", () -> PolicyLoss.sapo().sapoTemperatures(0.3, 2)
                        .aggregation(Aggregation.TOKEN_MEAN), true),
                new Case("SAPO sequence", () -> PolicyLoss.sapo().sequenceRatio(true), true),
                new Case("GMPO", () -> PolicyLoss.gmpo().clip(0.1, 0.15), false),
                new Case("LUSPO", () -> PolicyLoss.luspo().clip(0.02, 0.03), false),
                new Case("LUSPO dual clip", () -> PolicyLoss.luspo().clip(0.02, 0.03).dualClip(1.05), false),
                new Case("VESPO", PolicyLoss::vespo, true),
                new Case("VESPO shape 1/0.5/4/1", () -> PolicyLoss.vespo().vespoShape(1, 0.5, 4, 1), true),
                new Case("DPPO-TV", () -> PolicyLoss.dppoTv().dppoDivergence(0.02, 0.03), true),
                new Case("DPPO-KL", () -> PolicyLoss.dppoKl().dppoDivergence(0.004, 0.006).dppoRatioCap(1.3), true),
                new Case("DAPO", PolicyLoss::dapo, true),
                new Case("Dr. GRPO", PolicyLoss::drGrpo, false),
                new Case("GRPO delta", () -> PolicyLoss.grpo().delta(1.3), true));
    }

    static final KlEstimator[] NEW_ESTIMATORS = {KlEstimator.K3_PLUS, KlEstimator.K3_UNBIASED, KlEstimator.ABS, KlEstimator.LOW_VAR_KL};

    static Stream<Arguments> objectivesAndDtypes() {
        final List<Arguments> out = new ArrayList<>();
        for (Case o : objectives()) {
            for (ScalarType type : new ScalarType[] {ScalarType.Float, ScalarType.BFloat16, ScalarType.Half}) {
                out.add(Arguments.of(o, type));
            }
        }
        return out.stream();
    }

    static Stream<Case> allObjectives() {
        return objectives().stream();
    }

    /** Loss, log-probs, entropy, counts and the logits gradient against the float64 composite. */
    static void compare(String label, PolicyLoss loss, Batch batch, ScalarType type, boolean tokenAdvantages, boolean onPolicy) {
        final double gradRelative = type == ScalarType.Float ? 1e-4 : type == ScalarType.BFloat16 ? 1.6e-2 : 4e-3;
        final LossSettings settings = loss.settings();
        try (Tensor logits = batch.logits(type); Tensor targets = batch.targets(); Tensor mask = batch.mask(); Tensor old = batch.old();
                Tensor ref = batch.ref(); Tensor advantages = tokenAdvantages ? batch.tokenAdvantages() : batch.sequenceAdvantages();
                Tensor reference = logits.to(ScalarType.Double).detach().set_requires_grad(true)) {
            final LossInput.Builder input = LossInput.builder().logits(logits).targets(targets).mask(mask).refLogProbs(ref);
            if (!onPolicy) {
                input.oldLogProbs(old);
            }
            if (tokenAdvantages) {
                input.tokenAdvantages(advantages);
            } else {
                input.advantages(advantages);
            }
            try (LossResult result = loss.compute(input.build())) {
                result.loss().backward();
                final CompositeLoss.Output want = CompositeLoss.compute(settings, loss.temperature(), reference, targets, mask,
                        onPolicy ? null : old, ref, advantages, tokenAdvantages);
                want.loss().backward();
                final String what = label + " " + type + (onPolicy ? " on-policy" : "") + (tokenAdvantages ? " token-A" : "");
                PolicyLossModuleTest.assertClose(want.loss(), result.lossValue(), 2e-5, 1e-7, what + " loss");
                PolicyLossModuleTest.assertClose(want.logProbs(), result.logProbs(), 1e-5, 1e-6, what + " logProbs");
                final double scale = PolicyLossModuleTest.maxAbs(reference.grad());
                PolicyLossModuleTest.assertClose(reference.grad(), logits.grad(), gradRelative, 1e-3 * scale + 1e-9, what + " dLoss/dlogits");
                int responses = 0;
                int tokens = 0;
                for (int b = 0; b < batch.b; b++) {
                    int length = 0;
                    for (int t = 0; t < batch.t; t++) {
                        length += batch.maskValues[b * batch.t + t] != 0 ? 1 : 0;
                    }
                    responses += length > 0 ? 1 : 0;
                    tokens += length;
                }
                assertEquals(responses, result.metrics().sequences(), what + " counted responses");
                assertEquals(tokens, result.metrics().tokens(), what + " counted tokens");
            }
        }
    }

    @ParameterizedTest(name = "{0} {1}")
    @MethodSource("objectivesAndDtypes")
    void matchesTheCompositeInEveryDtype(Case o, ScalarType type) {
        final boolean sequence = o.builder.get().build().settings().ratioLevel() != RatioLevel.TOKEN;
        // Spreads that put ratios on both sides of the clip ranges (sequence ratios need less).
        final double spread = sequence ? 0.02 : 0.4;
        int estimator = 0;
        for (boolean onPolicy : new boolean[] {false, true}) {
            for (boolean tokenAdvantages : o.tokenAdvantages ? new boolean[] {false, true} : new boolean[] {false}) {
                final KlEstimator kl = NEW_ESTIMATORS[estimator++ % NEW_ESTIMATORS.length];
                compare(o.name + " " + kl, o.builder.get().kl(0.05, kl).entropyCoefficient(0.01).build(),
                        new Batch(300 + estimator, 4, 6, 37, spread), type, tokenAdvantages, onPolicy);
            }
        }
    }

    @ParameterizedTest(name = "{0}")
    @MethodSource("allObjectives")
    void extremeRatiosAndTemperature(Case o) {
        // Log-ratio spreads of 3 and 30: ratios far outside every clip range, beyond the clamp R = 20,
        // and R lowered to 2 so that the clamp itself acts on many tokens.
        for (double spread : new double[] {3, 30}) {
            compare(o.name + " spread " + spread, o.builder.get().temperature(0.8).build(), new Batch(400, 5, 7, 41, spread),
                    ScalarType.Float, o.tokenAdvantages, false);
        }
        compare(o.name + " R=2", o.builder.get().logRatioClamp(2).kl(0.1, KlEstimator.K3_UNBIASED).build(),
                new Batch(401, 4, 5, 30, 3), ScalarType.Float, o.tokenAdvantages, false);
    }

    @ParameterizedTest(name = "{0}")
    @MethodSource("allObjectives")
    void lowVarKlAtAndBeyondItsBound(Case o) {
        // verl's low_var_kl: ref - lp pushed up by 0..6 so that k3 crosses 10 (d of about 2.53) on
        // many tokens: value min(k3, 10), no KL gradient beyond the bound; every dtype.
        for (ScalarType type : new ScalarType[] {ScalarType.Float, ScalarType.BFloat16, ScalarType.Half}) {
            final Batch batch = new Batch(700, 5, 6, 29, 0.3);
            for (int i = 0; i < batch.refValues.length; i++) {
                batch.refValues[i] += (float) (i % 7);
            }
            compare(o.name + " LOW_VAR_KL", o.builder.get().kl(0.2, KlEstimator.LOW_VAR_KL).build(), batch, type, o.tokenAdvantages, false);
            compare(o.name + " LOW_VAR_KL on-policy", o.builder.get().kl(0.2, KlEstimator.LOW_VAR_KL).build(), batch, type,
                    o.tokenAdvantages, true);
        }
    }

    @ParameterizedTest(name = "{0}")
    @MethodSource("allObjectives")
    void compositeMatchesFloat64FiniteDifferences(Case o) {
        // The reference itself: autograd of the float64 composite against central differences of its
        // value, every stop-gradient factor frozen at the base point.
        int round = 0;
        for (KlEstimator kl : NEW_ESTIMATORS) {
            final Batch batch = new Batch(500 + round++, 3, 4, 7, 0.3);
            final PolicyLoss loss = o.builder.get().kl(0.1, kl).entropyCoefficient(0.05).build();
            final LossSettings settings = loss.settings();
            try (Tensor base = batch.logits(ScalarType.Float); Tensor z = base.to(ScalarType.Double).detach().set_requires_grad(true);
                    Tensor frozen = z.detach().clone(); Tensor targets = batch.targets(); Tensor mask = batch.mask(); Tensor old = batch.old();
                    Tensor ref = batch.ref(); Tensor adv = o.tokenAdvantages ? batch.tokenAdvantages() : batch.sequenceAdvantages()) {
                CompositeLoss.compute(settings, 0.9, z, targets, mask, old, ref, adv, o.tokenAdvantages).loss().backward();
                final double h = 1e-6;
                final Tensor flat = frozen.reshape(-1);
                boolean nonZero = false;
                for (int i = 0; i < flat.numel(); i += 3) {
                    final double[] values = new double[2];
                    for (int k = 0; k < 2; k++) {
                        try (Tensor perturbed = flat.clone()) {
                            perturbed.data_ptr_double().put(i, flat.data_ptr_double().get(i) + (k == 0 ? h : -h));
                            values[k] = CompositeLoss.compute(settings, 0.9, perturbed.reshape(3, 4, 7), targets, mask, old, ref, adv,
                                    o.tokenAdvantages, frozen).loss().item_double();
                        }
                    }
                    final double numeric = (values[0] - values[1]) / (2 * h);
                    final double analytic = z.grad().reshape(-1).data_ptr_double().get(i);
                    nonZero |= analytic != 0;
                    assertEquals(analytic, numeric, 1e-6 + 1e-5 * Math.abs(analytic), o.name + " " + kl + " d/dz[" + i + "]");
                }
                assertTrue(nonZero, o.name + ": a zero gradient checks nothing");
            }
        }
    }

    @ParameterizedTest(name = "{0}")
    @MethodSource("allObjectives")
    void packedEqualsPaddedBitwise(Case o) {
        final Batch batch = new Batch(600, 4, 6, 30, 0.3);
        // Lnorm defaults to T padded and to the longest response packed: give it explicitly (Dr. GRPO).
        final PolicyLoss loss = o.builder.get().kl(0.1, KlEstimator.K3_UNBIASED).entropyCoefficient(0.01).lengthNorm(batch.t).build();
        final List<Integer> kept = new ArrayList<>();
        final long[] offsets = new long[batch.b + 1];
        for (int r = 0; r < batch.b; r++) {
            for (int k = 0; k < batch.t; k++) {
                if (batch.maskValues[r * batch.t + k] != 0) {
                    kept.add(r * batch.t + k);
                }
            }
            offsets[r + 1] = kept.size();
        }
        final long[] index = kept.stream().mapToLong(Integer::longValue).toArray();
        try (Tensor padded = batch.logits(ScalarType.BFloat16); Tensor targets = batch.targets(); Tensor mask = batch.mask();
                Tensor old = batch.old(); Tensor ref = batch.ref();
                Tensor adv = o.tokenAdvantages ? batch.tokenAdvantages() : batch.sequenceAdvantages();
                Tensor idx = Tensor.create(index); Tensor flat = padded.detach().reshape(-1, batch.v);
                Tensor packedLogits = flat.index_select(0, idx).detach().set_requires_grad(true);
                Tensor packedTargets = targets.reshape(-1).index_select(0, idx); Tensor packedOld = old.reshape(-1).index_select(0, idx);
                Tensor packedRef = ref.reshape(-1).index_select(0, idx); Tensor packedAdv = o.tokenAdvantages
                        ? adv.reshape(-1).index_select(0, idx) : adv.clone();
                Tensor offsetTensor = Tensor.create(offsets)) {
            final LossInput.Builder paddedInput = LossInput.builder().logits(padded).targets(targets).mask(mask).oldLogProbs(old)
                    .refLogProbs(ref);
            final LossInput.Builder packedInput = LossInput.builder().logits(packedLogits).targets(packedTargets).offsets(offsetTensor)
                    .oldLogProbs(packedOld).refLogProbs(packedRef);
            if (o.tokenAdvantages) {
                paddedInput.tokenAdvantages(adv);
                packedInput.tokenAdvantages(packedAdv);
            } else {
                paddedInput.advantages(adv);
                packedInput.advantages(packedAdv);
            }
            try (LossResult a = loss.compute(paddedInput.build()); LossResult b = loss.compute(packedInput.build())) {
                assertEquals(a.lossValue().item_float(), b.lossValue().item_float(), o.name + " loss");
                a.loss().backward();
                b.loss().backward();
                try (Tensor paddedGrad = padded.grad().reshape(-1, batch.v).index_select(0, idx)) {
                    PolicyLossModuleTest.assertClose(paddedGrad, packedLogits.grad(), 0, 0, o.name + " packed gradient");
                }
            }
        }
    }

    @ParameterizedTest(name = "{0}")
    @MethodSource("allObjectives")
    void emptyResponsesAndAllEmptyBatch(Case o) {
        // Response 1 of every Batch is empty; here every response is.
        final Batch batch = new Batch(700, 3, 4, 20, 0.4);
        java.util.Arrays.fill(batch.maskValues, 0);
        final PolicyLoss loss = o.builder.get().kl(0.1, KlEstimator.ABS).entropyCoefficient(0.1).build();
        try (Tensor logits = batch.logits(ScalarType.Half); Tensor targets = batch.targets(); Tensor mask = batch.mask();
                Tensor old = batch.old(); Tensor ref = batch.ref();
                Tensor adv = o.tokenAdvantages ? batch.tokenAdvantages() : batch.sequenceAdvantages();
                LossResult result = loss.compute((o.tokenAdvantages ? LossInput.builder().tokenAdvantages(adv)
                        : LossInput.builder().advantages(adv)).logits(logits).targets(targets).mask(mask).oldLogProbs(old)
                        .refLogProbs(ref).build())) {
            result.loss().backward();
            assertEquals(0.0f, result.lossValue().item_float(), o.name);
            assertEquals(0.0, PolicyLossModuleTest.maxAbs(logits.grad()), o.name);
            assertEquals(0, result.metrics().sequences());
        }
    }

    @Test
    void lowVarKlClampsLikeVerlWhereTheReferenceIsFarAbove() {
        // A reference log-prob of 0 (p = 1) on every other token: d = -lp is about log V = 4, k3 about
        // 50, clamped to 10 with no gradient there; the other tokens stay below the clamp.
        final Batch batch = new Batch(760, 4, 6, 50, 0.3);
        for (int i = 0; i < batch.refValues.length; i += 2) {
            batch.refValues[i] = 0f;
        }
        for (ScalarType type : new ScalarType[] {ScalarType.Float, ScalarType.BFloat16}) {
            compare("GRPO low-var KL", PolicyLoss.grpo().kl(0.1, KlEstimator.LOW_VAR_KL).build(), batch, type, false, false);
            compare("GSPO low-var KL", PolicyLoss.gspo().kl(0.1, KlEstimator.LOW_VAR_KL).build(), batch, type, false, true);
        }
        // And it differs from plain k3 exactly there: the clamp bound.
        try (Tensor logits = batch.logits(ScalarType.Float); Tensor targets = batch.targets(); Tensor mask = batch.mask();
                Tensor old = batch.old(); Tensor ref = batch.ref(); Tensor adv = batch.sequenceAdvantages();
                LossResult low = PolicyLoss.grpo().kl(1, KlEstimator.LOW_VAR_KL).build().compute(LossInput.builder().logits(logits)
                        .targets(targets).mask(mask).oldLogProbs(old).refLogProbs(ref).advantages(adv).build());
                LossResult k3 = PolicyLoss.grpo().kl(1, KlEstimator.K3).build().compute(LossInput.builder().logits(logits)
                        .targets(targets).mask(mask).oldLogProbs(old).refLogProbs(ref).advantages(adv).build())) {
            assertTrue(low.lossValue().item_float() < k3.lossValue().item_float() - 1, "the clamp binds");
        }
    }

    @Test
    void deltaIsDualClipAndRefusesWhereTheyDiffer() {
        final Batch batch = new Batch(800, 4, 6, 30, 1.0);
        try (Tensor a = batch.logits(ScalarType.Float); Tensor b = batch.logits(ScalarType.Float); Tensor targets = batch.targets();
                Tensor mask = batch.mask(); Tensor old = batch.old(); Tensor adv = batch.tokenAdvantages();
                LossResult x = PolicyLoss.grpo().clip(0.2, 0.28).delta(1.5).build().compute(LossInput.builder().logits(a)
                        .targets(targets).mask(mask).oldLogProbs(old).tokenAdvantages(adv).build());
                LossResult y = PolicyLoss.grpo().clip(0.2, 0.28).dualClip(1.5).build().compute(LossInput.builder().logits(b)
                        .targets(targets).mask(mask).oldLogProbs(old).tokenAdvantages(adv).build())) {
            x.loss().backward();
            y.loss().backward();
            assertEquals(y.lossValue().item_float(), x.lossValue().item_float());
            PolicyLossModuleTest.assertClose(b.grad(), a.grad(), 0, 0, "delta gradient");
            assertTrue(x.metrics().dualClipFraction() > 0, "delta acts on some tokens");
        }
        final IllegalArgumentException below = assertThrows(IllegalArgumentException.class,
                () -> PolicyLoss.grpo().clip(0.2, 0.28).delta(1.2).build());
        assertTrue(below.getMessage().contains("1 + epsHigh"), below.getMessage());
        // ...also when the clip is widened after delta.
        assertThrows(IllegalArgumentException.class, () -> PolicyLoss.grpo().delta(1.3).clip(0.2, 0.5).build());
        assertThrows(IllegalArgumentException.class, () -> PolicyLoss.grpo().delta(1.0));
    }

    @Test
    void presetsAndDefaults() {
        final LossSettings dapo = PolicyLoss.dapo().build().settings();
        assertEquals(RatioLevel.TOKEN, dapo.ratioLevel());
        assertEquals(Aggregation.TOKEN_MEAN, dapo.aggregation());
        assertEquals(0.2, dapo.epsLow());
        assertEquals(0.28, dapo.epsHigh());
        final LossSettings drGrpo = PolicyLoss.drGrpo().build().settings();
        assertEquals(Aggregation.SEQ_MEAN_TOKEN_SUM_NORM, drGrpo.aggregation());
        assertEquals(0.2, drGrpo.epsHigh());
        final LossSettings cispo = PolicyLoss.cispo().build().settings();
        assertEquals(Objective.CISPO, cispo.objective().objective());
        assertEquals(1.0, cispo.epsLow());
        assertEquals(4.0, cispo.epsHigh());
        assertEquals(Aggregation.TOKEN_MEAN, cispo.aggregation());
        final LossSettings sapo = PolicyLoss.sapo().build().settings();
        assertEquals(1.0, sapo.objective().sapoTauPos());
        assertEquals(1.05, sapo.objective().sapoTauNeg());
        assertEquals(Aggregation.SEQ_MEAN_TOKEN_MEAN, sapo.aggregation());
        final LossSettings gmpo = PolicyLoss.gmpo().build().settings();
        assertEquals(0.4, gmpo.epsLow());
        assertEquals(0.4, gmpo.epsHigh());
        assertEquals(RatioLevel.SEQUENCE, gmpo.ratioLevel());
        final LossSettings luspo = PolicyLoss.luspo().build().settings();
        assertEquals(2e-3, luspo.epsLow());
        assertEquals(2.5e-3, luspo.epsHigh());
        final LossSettings vespo = PolicyLoss.vespo().build().settings();
        assertEquals(2, vespo.objective().vespoKPos());
        assertEquals(3, vespo.objective().vespoLambdaPos());
        assertEquals(3, vespo.objective().vespoKNeg());
        assertEquals(2, vespo.objective().vespoLambdaNeg());
        assertEquals(Aggregation.TOKEN_MEAN, vespo.aggregation());
        final LossSettings tv = PolicyLoss.dppoTv().build().settings();
        assertEquals(0.15, tv.objective().dppoDeltaLow());
        assertEquals(0.15, tv.objective().dppoDeltaHigh());
        assertEquals(20, tv.objective().dppoRatioCap());
        final LossSettings kl = PolicyLoss.dppoKl().build().settings();
        assertEquals(0.05, kl.objective().dppoDeltaLow());
        assertEquals(0.05, kl.objective().dppoDeltaHigh());
        assertEquals(Aggregation.TOKEN_MEAN, kl.aggregation());
    }

    @Test
    void optionsThatDoNotApplyAreRefusedClearly() {
        expectState(() -> PolicyLoss.grpo().sapoTemperatures(1, 1), "sapoTemperatures applies to SAPO");
        expectState(() -> PolicyLoss.sapo().vespoShape(1, 1, 1, 1), "vespoShape applies to VESPO");
        expectState(() -> PolicyLoss.cispo().dppoDivergence(0.1, 0.1), "dppoDivergence applies to DPPO");
        expectState(() -> PolicyLoss.gspo().sequenceRatio(true), "sequenceRatio applies to CISPO and SAPO");
        final IllegalArgumentException dual = assertThrows(IllegalArgumentException.class, () -> PolicyLoss.cispo().dualClip(3));
        assertTrue(dual.getMessage().contains("not to CISPO"), dual.getMessage());
        assertThrows(IllegalArgumentException.class, () -> PolicyLoss.sapo().sapoTemperatures(0, 1));
        assertThrows(IllegalArgumentException.class, () -> PolicyLoss.vespo().vespoShape(-1, 1, 1, 1));
        assertThrows(IllegalArgumentException.class, () -> PolicyLoss.dppoTv().dppoRatioCap(0));
        final Batch batch = new Batch(900, 2, 3, 10, 0.1);
        for (PolicyLoss sequence : new PolicyLoss[] {PolicyLoss.gmpo().build(), PolicyLoss.luspo().build()}) {
            try (Tensor logits = batch.logits(ScalarType.Float); Tensor targets = batch.targets(); Tensor adv = batch.tokenAdvantages()) {
                PolicyLossModuleTest.expectBad(sequence, LossInput.builder().logits(logits).targets(targets).tokenAdvantages(adv),
                        "takes one advantage per response");
            }
        }
    }

    static void expectState(Runnable r, String part) {
        final IllegalStateException e = assertThrows(IllegalStateException.class, r::run);
        if (!e.getMessage().contains(part)) {
            fail("message \"" + e.getMessage() + "\" should contain \"" + part + "\"");
        }
    }
}
