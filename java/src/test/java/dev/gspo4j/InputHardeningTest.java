package dev.gspo4j;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import dev.gspo4j.PolicyLossModuleTest.Batch;
import dev.gspo4j.internal.Metric;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.function.Function;
import java.util.function.Supplier;
import org.bytedeco.pytorch.Device;
import org.bytedeco.pytorch.MemoryFormatOptional;
import org.bytedeco.pytorch.Storage;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorOptions;
import org.bytedeco.pytorch.TensorVector;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.function.Executable;

/**
 * Issue 12, round two: tensors whose memory is not their values, arguments that are not tensors
 * at all (null, undefined, closed), messages in the Java API's words, exact counts, option ranges,
 * the GAE mask, MEAN's overflow, and ignoreIndex.
 */
class InputHardeningTest {
    private static final PolicyLoss GRPO = PolicyLoss.grpo().build();

    private static IllegalArgumentException expect(Executable call, String... parts) {
        final IllegalArgumentException e = assertThrows(IllegalArgumentException.class, call);
        for (String part : parts) {
            assertTrue(e.getMessage().contains(part), "message \"" + e.getMessage() + "\" should contain \"" + part + "\"");
        }
        return e;
    }

    private static float loss(PolicyLoss loss, LossInput.Builder input) {
        try (LossResult result = loss.compute(input.build())) {
            return result.lossValue().item_float();
        }
    }

    // ---- 8: negative and conjugate bits, raw-memory hazards -------------------------------------

    @Test
    void negativeBitOfSmallInputsIsResolved() {
        final Batch batch = new Batch(1, 3, 4, 11, 0.3);
        try (Tensor logits = batch.logits(ScalarType.Float); Tensor targets = batch.targets(); Tensor mask = batch.mask();
                Tensor old = batch.old(); Tensor adv = batch.sequenceAdvantages(); Tensor tokenAdv = batch.tokenAdvantages();
                Tensor negOld = old.neg(); Tensor oldView = negOld._neg_view(); Tensor negAdv = adv.neg(); Tensor advView = negAdv._neg_view();
                Tensor negTokenAdv = tokenAdv.neg(); Tensor tokenAdvView = negTokenAdv._neg_view()) {
            assertTrue(oldView.is_neg());
            final float want = loss(GRPO, LossInput.builder().logits(logits).targets(targets).mask(mask).oldLogProbs(old).advantages(adv));
            assertEquals(want, loss(GRPO, LossInput.builder().logits(logits).targets(targets).mask(mask).oldLogProbs(oldView)
                    .advantages(advView)));
            assertEquals(loss(GRPO, LossInput.builder().logits(logits).targets(targets).mask(mask).oldLogProbs(old).tokenAdvantages(tokenAdv)),
                    loss(GRPO, LossInput.builder().logits(logits).targets(targets).mask(mask).oldLogProbs(oldView).tokenAdvantages(tokenAdvView)));
            try (Tensor rewards = Tensor.create(1f, -2f, 0.5f, 3f); Tensor negRewards = rewards.neg(); Tensor view = negRewards._neg_view();
                    Tensor a = Advantages.group(rewards, 2, AdvantageMode.MEAN); Tensor b = Advantages.group(view, 2, AdvantageMode.MEAN)) {
                PolicyLossModuleTest.assertClose(a, b, 0, 0, "group advantages of a _neg_view()");
            }
            try (Tensor r = batch.old(); Tensor v = batch.ref(); Tensor negR = r.neg(); Tensor rView = negR._neg_view();
                    Advantages.Gae a = Advantages.gae(r, v, mask, 0.9, 0.8); Advantages.Gae b = Advantages.gae(rView, v, mask, 0.9, 0.8)) {
                PolicyLossModuleTest.assertClose(a.advantages(), b.advantages(), 0, 0, "GAE of a _neg_view()");
            }
        }
    }

    @Test
    void logitsWhoseMemoryIsNotTheirValuesAreRefused() {
        final Batch batch = new Batch(2, 2, 3, 5, 0.3);
        try (Tensor logits = batch.logits(ScalarType.Float); Tensor plain = logits.detach(); Tensor targets = batch.targets();
                Tensor adv = batch.sequenceAdvantages()) {
            final Function<Tensor, LossInput.Builder> with = z -> LossInput.builder().logits(z).targets(targets).advantages(adv);
            try (Tensor negated = plain.neg(); Tensor view = negated._neg_view()) {
                expect(() -> GRPO.compute(with.apply(view).build()), "logits", "negative bit", "logits.resolve_neg()");
            }
            try (Tensor sparse = plain.to_sparse()) {
                expect(() -> GRPO.compute(with.apply(sparse).build()), "logits has layout Sparse", "logits.to_dense()");
            }
            try (Tensor quantized = torch.quantize_per_tensor(plain, 0.1, 0, ScalarType.QInt8)) {
                expect(() -> GRPO.compute(with.apply(quantized).build()), "logits is quantized", "logits.dequantize()");
            }
            try (Device meta = new Device("meta"); TensorOptions options = new TensorOptions(meta);
                    Tensor onMeta = torch.empty(new long[] {2, 3, 5}, options, new MemoryFormatOptional())) {
                expect(() -> GRPO.compute(with.apply(onMeta).build()), "logits are on meta, which holds no data");
            }
            try (Tensor a = torch.randn(2, 5); Tensor b = torch.randn(3, 5); TensorVector parts = new TensorVector(a, b);
                    Tensor nested = torch.nested_tensor(parts)) {
                expect(() -> GRPO.compute(with.apply(nested).build()), "logits is a nested tensor");
            }
            try (Tensor emptied = plain.clone(); Storage storage = emptied.storage()) {
                storage.set_nbytes(0);
                expect(() -> GRPO.compute(with.apply(emptied).build()), "logits's storage holds 0 bytes", "reach 120 bytes");
            }
            Tensor mkldnn = null;
            try {
                mkldnn = plain.to_mkldnn();
            } catch (RuntimeException notBuiltWithMkldnn) {
                System.out.println("mkldnn logits not checked: this libtorch cannot make an mkldnn tensor");
            }
            if (mkldnn != null) {
                final Tensor m = mkldnn;
                expect(() -> GRPO.compute(with.apply(m).build()), "logits has layout Mkldnn", "logits.to_dense()");
                mkldnn.close();
            }
        }
    }

    // ---- 9: every entry point with null, undefined, closed, meta and sparse tensors ------------

    /** A bad tensor of each kind, with what its message must say; each closed by the caller. */
    private static Map<String, Supplier<Tensor>> badTensors(long... shape) {
        final Map<String, Supplier<Tensor>> bad = new LinkedHashMap<>();
        bad.put("undefined tensor", Tensor::new);
        bad.put("closed Tensor", () -> {
            final Tensor t = torch.ones(shape);
            t.close();
            return t;
        });
        bad.put("which holds no data", () -> {
            try (Device meta = new Device("meta"); TensorOptions options = new TensorOptions(meta)) {
                return torch.empty(shape, options, new MemoryFormatOptional());
            }
        });
        bad.put("layout Sparse", () -> {
            try (Tensor dense = torch.ones(shape)) {
                return dense.to_sparse();
            }
        });
        return bad;
    }

    @Test
    void everyEntryPointNamesABadTensorArgument() {
        final int b = 2, t = 3, v = 5;
        try (Tensor logits = torch.randn(b, t, v); Tensor targets = torch.zeros(new long[] {b, t}, new TensorOptions(ScalarType.Long));
                Tensor mask = torch.ones(b, t); Tensor old = torch.randn(b, t); Tensor adv = torch.randn(b);
                Tensor rewards = torch.randn(4); Tensor ids = Tensor.create(0L, 0L, 1L, 1L); Tensor tokenRewards = torch.randn(b, t)) {
            final List<String> checked = new ArrayList<>();
            for (Map.Entry<String, Supplier<Tensor>> kind : badTensors(b, t).entrySet()) {
                final String what = kind.getKey();
                final List<Map.Entry<String, Function<Tensor, Executable>>> calls = new ArrayList<>();
                calls.add(Map.entry("logits", x -> () -> GRPO.compute(LossInput.builder().logits(x).targets(targets).advantages(adv).build())));
                calls.add(Map.entry("targets", x -> () -> GRPO.compute(LossInput.builder().logits(logits).targets(x).advantages(adv).build())));
                calls.add(Map.entry("mask", x -> () -> GRPO.compute(LossInput.builder().logits(logits).targets(targets).mask(x).advantages(adv).build())));
                calls.add(Map.entry("oldLogProbs", x -> () -> GRPO.compute(LossInput.builder().logits(logits).targets(targets).oldLogProbs(x)
                        .advantages(adv).build())));
                calls.add(Map.entry("refLogProbs", x -> () -> PolicyLoss.grpo().kl(0.1, KlEstimator.K3).build().compute(LossInput.builder()
                        .logits(logits).targets(targets).refLogProbs(x).advantages(adv).build())));
                calls.add(Map.entry("advantages", x -> () -> GRPO.compute(LossInput.builder().logits(logits).targets(targets).advantages(x).build())));
                calls.add(Map.entry("advantages", x -> () -> GRPO.compute(LossInput.builder().logits(logits).targets(targets).tokenAdvantages(x).build())));
                calls.add(Map.entry("offsets", x -> () -> GRPO.compute(LossInput.builder().logits(logits).targets(targets).offsets(x).advantages(adv).build())));
                calls.add(Map.entry("rewards", x -> () -> Advantages.group(x, 2, AdvantageMode.MEAN_STD)));
                calls.add(Map.entry("rewards", x -> () -> Advantages.groupByIds(x, ids, AdvantageMode.MEAN, 1e-6)));
                calls.add(Map.entry("groupIds", x -> () -> Advantages.groupByIds(rewards, x, AdvantageMode.MEAN, 1e-6)));
                calls.add(Map.entry("rewards", x -> () -> Advantages.gae(x, tokenRewards, null, 0.9, 0.9)));
                calls.add(Map.entry("values", x -> () -> Advantages.gae(tokenRewards, x, null, 0.9, 0.9)));
                calls.add(Map.entry("mask", x -> () -> Advantages.gae(tokenRewards, tokenRewards, x, 0.9, 0.9)));
                for (Map.Entry<String, Function<Tensor, Executable>> call : calls) {
                    final String name = call.getKey();
                    // Logits must be 3-D to get past the layout checks: use a fitting bad tensor.
                    final Tensor x = name.equals("logits") ? badTensors(b, t, v).get(what).get() : kind.getValue().get();
                    try {
                        // Meta tensors elsewhere than the logits are "on meta but the logits are on cpu".
                        final boolean otherDevice = what.equals("which holds no data") && !name.equals("logits")
                                && !name.equals("rewards");
                        final String expected = otherDevice ? "is on meta" : what;
                        final IllegalArgumentException e = assertThrows(IllegalArgumentException.class, call.getValue().apply(x),
                                name + " as " + what);
                        assertTrue(e.getMessage().startsWith(name), name + " as " + what + ": " + e.getMessage());
                        assertTrue(e.getMessage().contains(expected), name + " as " + what + ": " + e.getMessage());
                        checked.add(name + "/" + what);
                    } finally {
                        x.close();
                    }
                }
            }
            assertEquals(4 * 14, checked.size());
            // Null: required arguments at the builder, optional ones mean absent.
            expect(() -> LossInput.builder().logits(null), "logits must not be null");
            expect(() -> LossInput.builder().targets(null), "targets must not be null");
            expect(() -> LossInput.builder().advantages(null), "advantages must not be null");
            expect(() -> GRPO.compute(null), "input must not be null");
            expect(() -> Advantages.group((Tensor) null, 2, AdvantageMode.MEAN), "rewards must not be null");
            expect(() -> Advantages.gae(tokenRewards, null, null, 0.9, 0.9), "values must not be null");
            expect(() -> Advantages.group(rewards, 2, null), "mode must not be null");
            // Closed and undefined tensors are refused at the builder too.
            final Tensor closed = torch.ones(2);
            closed.close();
            expect(() -> LossInput.builder().mask(closed), "mask is a closed Tensor");
            expect(() -> LossInput.builder().logits(new Tensor()), "logits is an undefined tensor");
        }
    }

    @Test
    void metricsOfAClosedResultAreAnIllegalState() {
        final Batch batch = new Batch(3, 2, 3, 7, 0.3);
        try (Tensor logits = batch.logits(ScalarType.Float); Tensor targets = batch.targets(); Tensor adv = batch.sequenceAdvantages()) {
            final LossResult result = GRPO.compute(LossInput.builder().logits(logits).targets(targets).advantages(adv).build());
            final LossMetrics metrics = result.metrics();
            result.close();
            final IllegalStateException e = assertThrows(IllegalStateException.class, metrics::tokens);
            assertTrue(e.getMessage().contains("closed LossResult"), e.getMessage());
            assertThrows(IllegalStateException.class, metrics::clipFractionLow);
            assertThrows(IllegalStateException.class, metrics::tensor);
            assertEquals("LossMetrics(closed)", metrics.toString());
            metrics.close(); // idempotent
        }
    }

    @Test
    void packedOffsetsOfNoResponseNameTheOffsets() {
        try (Tensor logits = torch.randn(10, 4); Tensor targets = torch.zeros(new long[] {10}, new TensorOptions(ScalarType.Long));
                Tensor offsets = Tensor.create(0L); Tensor adv = torch.randn(0)) {
            final IllegalArgumentException e = expect(() -> GRPO.compute(LossInput.builder().logits(logits).targets(targets)
                    .offsets(offsets).advantages(adv).build()), "offsets", "N = 10");
            assertFalse(e.getMessage().contains("NULL"), e.getMessage());
        }
    }

    @Test
    void dataErrorsUseTheJavaNamesAndIndices() {
        final Batch batch = new Batch(4, 3, 4, 9, 0.3);
        final PolicyLoss grpoKl = PolicyLoss.grpo().kl(0.1, KlEstimator.K3).build();
        try (Tensor logits = batch.logits(ScalarType.Float); Tensor targets = batch.targets(); Tensor old = batch.old();
                Tensor ref = batch.ref(); Tensor adv = batch.sequenceAdvantages(); Tensor tokenAdv = batch.tokenAdvantages()) {
            try (Tensor bad = old.clone()) {
                bad.data_ptr_float().put(2 * 4 + 1, Float.NaN); // [2, 1]; no mask: counted
                expect(() -> GRPO.compute(LossInput.builder().logits(logits).targets(targets).oldLogProbs(bad).advantages(adv).build()),
                        "oldLogProbs[2, 1] = NaN is not finite", "checkFinite(false)");
            }
            try (Tensor bad = ref.clone()) {
                bad.data_ptr_float().put(5, Float.NEGATIVE_INFINITY); // [1, 1]
                expect(() -> grpoKl.compute(LossInput.builder().logits(logits).targets(targets).refLogProbs(bad).advantages(adv).build()),
                        "refLogProbs[1, 1] = -Infinity is not finite");
            }
            try (Tensor bad = adv.clone()) {
                bad.data_ptr_float().put(2, Float.NaN);
                expect(() -> GRPO.compute(LossInput.builder().logits(logits).targets(targets).advantages(bad).build()),
                        "advantages[2] = NaN is not finite");
            }
            try (Tensor bad = tokenAdv.clone()) {
                bad.data_ptr_float().put(7, Float.NaN);
                expect(() -> GRPO.compute(LossInput.builder().logits(logits).targets(targets).tokenAdvantages(bad).build()),
                        "advantages[1, 3] = NaN is not finite");
            }
            try (Tensor bad = logits.detach().clone()) {
                bad.data_ptr_float().put((1 * 4 + 2) * 9 + 3, Float.POSITIVE_INFINITY);
                expect(() -> GRPO.compute(LossInput.builder().logits(bad).targets(targets).advantages(adv).build()),
                        "logits[1, 2, :] holds NaN or Inf");
                expect(() -> PolicyLoss.grpo().temperature(0.5).build().compute(LossInput.builder().logits(bad).targets(targets)
                        .advantages(adv).build()), "logits[1, 2, :] holds NaN or Inf after division by the temperature 0.5");
            }
            try (Tensor bad = targets.clone()) {
                bad.data_ptr_long().put(6, 12);
                expect(() -> GRPO.compute(LossInput.builder().logits(logits).targets(bad).advantages(adv).build()),
                        "targets must be token ids in [0, 9), got targets[1, 2] = 12");
            }
        }
        // Packed: [n] indices, and offsets named as given.
        try (Tensor logits = torch.randn(6, 5); Tensor targets = torch.zeros(new long[] {6}, new TensorOptions(ScalarType.Long));
                Tensor old = torch.zeros(6); Tensor adv = torch.randn(3); Tensor offsets = Tensor.create(0L, 2L, 4L, 6L)) {
            old.data_ptr_float().put(5, Float.NaN);
            expect(() -> GRPO.compute(LossInput.builder().logits(logits).targets(targets).offsets(offsets).oldLogProbs(old)
                    .advantages(adv).build()), "oldLogProbs[5] = NaN");
            try (Tensor decreasing = Tensor.create(0L, 4L, 3L, 6L)) {
                expect(() -> GRPO.compute(LossInput.builder().logits(logits).targets(targets).offsets(decreasing).advantages(adv).build()),
                        "offsets[2] = 3 breaks 0 = offsets[0] <= offsets[1] <= ... <= offsets[3] = N = 6");
            }
            try (Tensor shortOffsets = Tensor.create(0L, 2L, 4L, 5L)) {
                expect(() -> GRPO.compute(LossInput.builder().logits(logits).targets(targets).offsets(shortOffsets).advantages(adv).build()),
                        "offsets[3] = 5 breaks");
            }
        }
        // GAE: [b, t] of the rewards and values; group advantages: [i].
        try (Tensor rewards = torch.zeros(2, 4); Tensor values = torch.zeros(2, 4)) {
            values.data_ptr_float().put(5, Float.NaN);
            expect(() -> Advantages.gae(rewards, values, null, 0.9, 0.9), "values[1, 1] = NaN is not finite");
        }
        try (Tensor rewards = Tensor.create(1f, Float.NaN, 0f, 1f)) {
            expect(() -> Advantages.group(rewards, 2, AdvantageMode.MEAN), "rewards[1] = NaN is not finite");
        }
        expect(() -> Advantages.group(new float[] {1f, Float.NaN}, 2, AdvantageMode.MEAN), "rewards[1] is not finite");
        try (Tensor rewards = Tensor.create(1f, 2f, 3f); Tensor ids = Tensor.create(4L, 4L, 9L)) {
            final IllegalArgumentException e = expect(() -> Advantages.groupByIds(rewards, ids, AdvantageMode.RLOO, 1e-6),
                    "the group of response 2 (groupIds[2] = 9) has 1", "MEAN or MEAN_STD");
            assertTrue(e.getCause() instanceof Gspo4jException, "the native status stays the cause");
        }
    }

    // ---- 11: counts, ranges, GAE mask, overflow, ignoreIndex -----------------------------------

    @Test
    void countsMatchTheKernelsOnEveryLayout() {
        final Batch batch = new Batch(5, 4, 6, 7, 0.3);
        try (Tensor logits = batch.logits(ScalarType.Float); Tensor targets = batch.targets(); Tensor mask = batch.mask();
                Tensor adv = batch.sequenceAdvantages(); Tensor flat = logits.detach().reshape(24, 7); Tensor flatTargets = targets.reshape(24);
                Tensor flatMask = mask.reshape(24); Tensor offsets = Tensor.create(0L, 6L, 6L, 15L, 24L)) {
            final List<LossInput.Builder> inputs = List.of(
                    LossInput.builder().logits(logits).targets(targets).advantages(adv),
                    LossInput.builder().logits(logits).targets(targets).mask(mask).advantages(adv),
                    LossInput.builder().logits(flat).targets(flatTargets).offsets(offsets).advantages(adv),
                    LossInput.builder().logits(flat).targets(flatTargets).mask(flatMask).offsets(offsets).advantages(adv));
            for (LossInput.Builder input : inputs) {
                try (LossResult result = GRPO.compute(input.build())) {
                    final float[] slots = new float[Metric.COUNT];
                    result.metrics().tensor().data_ptr_float().get(slots);
                    assertEquals(Math.round(slots[Metric.SEQUENCES.index()]), result.metrics().sequences());
                    assertEquals(Math.round(slots[Metric.TOKENS.index()]), result.metrics().tokens());
                }
            }
        }
    }

    @Test
    void tokenCountIsExactPastTwoToThe24() {
        final int t = (1 << 24) + 2;
        try (Tensor logits = torch.zeros(1, t, 1); Tensor targets = torch.zeros(new long[] {1, t}, new TensorOptions(ScalarType.Long));
                Tensor mask = torch.ones(new long[] {1, t}, new TensorOptions(ScalarType.Bool)); Tensor adv = torch.ones(1)) {
            mask.data_ptr_bool().put(7, false);
            try (LossResult result = PolicyLoss.gspo().checkFinite(false).build().compute(LossInput.builder().logits(logits).targets(targets)
                    .mask(mask).advantages(adv).build())) {
                assertEquals((1L << 24) + 1, result.metrics().tokens(), "float32 would say " + (float) ((1 << 24) + 1));
                assertEquals(1, result.metrics().sequences());
            }
        }
    }

    @Test
    void optionsThatWouldGiveNanOrInfAreRefused() {
        expect(() -> PolicyLoss.grpo().normalizer(1e-320), "normalizer must be 0", "[1.0E-6, 1.0E18]");
        expect(() -> PolicyLoss.grpo().normalizer(Double.NaN), "normalizer");
        expect(() -> PolicyLoss.grpo().normalizer(1e300), "normalizer");
        expect(() -> PolicyLoss.grpo().lengthNorm(1e-320), "lengthNorm must be 0", "[1.0E-6, 1.0E18]");
        expect(() -> PolicyLoss.grpo().logRatioClamp(1000), "logRatioClamp must be in (0, 88.0]");
        expect(() -> PolicyLoss.grpo().logRatioClamp(Double.POSITIVE_INFINITY), "logRatioClamp");
        expect(() -> PolicyLoss.grpo().clip(0.2, 1e300), "epsHigh must be in [0, 1000000.0]");
        expect(() -> PolicyLoss.grpo().clip(Double.NaN, 0.2), "epsLow");
        expect(() -> PolicyLoss.ppo().dualClip(1e300), "dualClip must be 0 (off) or in (1, 1000000.0]");
        expect(() -> PolicyLoss.grpo().kl(1e300, KlEstimator.K3), "klCoef must be finite and in [-1000000.0, 1000000.0]");
        expect(() -> PolicyLoss.grpo().entropyCoefficient(Double.NEGATIVE_INFINITY), "entropyCoef");
        expect(() -> PolicyLoss.grpo().temperature(1e-320), "temperature must be in [1e-4, 1e4]");
        expect(() -> PolicyLoss.grpo().temperature(1e300), "temperature");
        // The bounds themselves work and give finite losses.
        final Batch batch = new Batch(6, 2, 3, 5, 0.3);
        try (Tensor logits = batch.logits(ScalarType.Float); Tensor targets = batch.targets(); Tensor old = batch.old();
                Tensor ref = batch.ref(); Tensor adv = batch.sequenceAdvantages()) {
            final Map<String, PolicyLoss> extremes = new LinkedHashMap<>();
            extremes.put("normalizer 1e-6", PolicyLoss.grpo().normalizer(1e-6).build());
            extremes.put("lengthNorm 1e-6", PolicyLoss.grpo().aggregation(Aggregation.SEQ_MEAN_TOKEN_SUM_NORM).lengthNorm(1e-6).build());
            extremes.put("logRatioClamp 88", PolicyLoss.grpo().logRatioClamp(88).build());
            extremes.put("epsHigh 1e6", PolicyLoss.grpo().clip(0.2, 1e6).build());
            extremes.put("dualClip 1e6", PolicyLoss.ppo().dualClip(1e6).build());
            extremes.put("kl 1e6", PolicyLoss.grpo().kl(1e6, KlEstimator.K3).build());
            extremes.put("entropy -1e6", PolicyLoss.grpo().entropyCoefficient(-1e6).build());
            extremes.put("temperature 1e-4", PolicyLoss.grpo().temperature(1e-4).build());
            extremes.put("temperature 1e4", PolicyLoss.grpo().temperature(1e4).build());
            for (Map.Entry<String, PolicyLoss> extreme : extremes.entrySet()) {
                final float value = loss(extreme.getValue(), LossInput.builder().logits(logits).targets(targets).oldLogProbs(old)
                        .refLogProbs(ref).advantages(adv));
                assertTrue(Float.isFinite(value), extreme.getKey() + ": " + value);
            }
        }
    }

    @Test
    void gaeMaskIsValidatedLikeTheLossMask() {
        try (Tensor rewards = torch.randn(2, 3); Tensor values = torch.randn(2, 3)) {
            for (double bad : new double[] {0.5, Double.NaN, 2, -1}) {
                try (Tensor mask = torch.ones(2, 3)) {
                    mask.data_ptr_float().put(4, (float) bad);
                    expect(() -> Advantages.gae(rewards, values, mask, 0.9, 0.9).close(), "mask must hold only 0 and 1");
                }
            }
            try (Tensor boolMask = torch.ones(new long[] {2, 3}, new TensorOptions(ScalarType.Bool)); Tensor floatMask = torch.ones(2, 3);
                    Advantages.Gae a = Advantages.gae(rewards, values, boolMask, 0.9, 0.9);
                    Advantages.Gae b = Advantages.gae(rewards, values, floatMask, 0.9, 0.9)) {
                PolicyLossModuleTest.assertClose(a.advantages(), b.advantages(), 0, 0, "bool and float masks");
            }
        }
    }

    @Test
    void meanAndRlooOverflowIsAnErrorNotInf() {
        final float big = 3.4e38f;
        for (AdvantageMode mode : new AdvantageMode[] {AdvantageMode.MEAN, AdvantageMode.RLOO}) {
            try (Tensor rewards = Tensor.create(big, -big, -big)) {
                expect(() -> Advantages.group(rewards, 3, mode).close(), "overflow float32", "scale the rewards down");
            }
            expect(() -> Advantages.group(new float[] {big, -big, -big}, 3, mode), "overflow float32");
        }
        // MEAN_STD divides by the spread: finite.
        try (Tensor rewards = Tensor.create(big, -big, -big); Tensor a = Advantages.group(rewards, 3, AdvantageMode.MEAN_STD);
                Tensor finite = torch.isfinite(a); Tensor all = finite.all()) {
            assertTrue(all.item_bool());
        }
        // Large but safe: 1.7e38 cannot overflow.
        try (Tensor rewards = Tensor.create(1.7e38f, -1.7e38f, -1.7e38f); Tensor a = Advantages.group(rewards, 3, AdvantageMode.MEAN);
                Tensor finite = torch.isfinite(a); Tensor all = finite.all()) {
            assertTrue(all.item_bool());
        }
    }

    @Test
    void ignoreIndexMasksLabelledPositions() {
        final Batch batch = new Batch(7, 3, 5, 8, 0.3);
        try (Tensor logits = batch.logits(ScalarType.Float); Tensor targets = batch.targets(); Tensor mask = batch.mask();
                Tensor old = batch.old(); Tensor adv = batch.sequenceAdvantages(); Tensor labels = targets.clone();
                Tensor ignoreMask = mask.clone(); Tensor zeroed = targets.clone()) {
            // -100 at every masked position and at one counted one, [0, 1].
            for (int i = 0; i < 15; i++) {
                if (mask.data_ptr_float().get(i) == 0 || i == 1) {
                    labels.data_ptr_long().put(i, -100);
                    ignoreMask.data_ptr_float().put(i, 0);
                    zeroed.data_ptr_long().put(i, 0);
                }
            }
            // Without ignoreIndex: an error naming the position and the fix.
            expect(() -> GRPO.compute(LossInput.builder().logits(logits).targets(labels).mask(mask).oldLogProbs(old).advantages(adv)
                    .build()), "targets[0, 1] = -100", "ignoreIndex(-100)");
            try (Tensor masked = labels.clone()) {
                masked.data_ptr_long().put(1, targets.data_ptr_long().get(1));
                expect(() -> GRPO.compute(LossInput.builder().logits(logits).targets(masked).mask(mask).oldLogProbs(old).advantages(adv)
                        .build()), "at a masked position", "ignoreIndex(-100)");
            }
            final long[] before = new long[15];
            labels.data_ptr_long().get(before);
            try (LossResult want = GRPO.compute(LossInput.builder().logits(logits).targets(zeroed).mask(ignoreMask).oldLogProbs(old)
                    .advantages(adv).build());
                    LossResult got = GRPO.compute(LossInput.builder().logits(logits).targets(labels).mask(mask).ignoreIndex(-100)
                            .oldLogProbs(old).advantages(adv).build());
                    LossResult noMask = GRPO.compute(LossInput.builder().logits(logits).targets(labels).ignoreIndex(-100)
                            .oldLogProbs(old).advantages(adv).build())) {
                assertEquals(want.lossValue().item_float(), got.lossValue().item_float());
                assertEquals(want.lossValue().item_float(), noMask.lossValue().item_float(), "the labels alone make the mask");
                assertEquals(want.metrics().tokens(), got.metrics().tokens());
                assertEquals(want.metrics().tokens(), noMask.metrics().tokens());
                got.loss().backward();
                try (Tensor g = logits.grad().clone()) {
                    try (Tensor slot = logits.mutable_grad()) {
                        slot.reset();
                    }
                    want.loss().backward();
                    PolicyLossModuleTest.assertClose(logits.grad(), g, 0, 0, "gradient with ignoreIndex");
                }
            }
            final long[] after = new long[15];
            labels.data_ptr_long().get(after);
            assertArrayEquals(before, after, "the caller's targets are not modified");
            // Other ids out of range are still an error with ignoreIndex on.
            try (Tensor worse = labels.clone()) {
                worse.data_ptr_long().put(3, 99);
                expect(() -> GRPO.compute(LossInput.builder().logits(logits).targets(worse).ignoreIndex(-100).advantages(adv).build()),
                        "targets[0, 3] = 99");
            }
        }
    }
}
