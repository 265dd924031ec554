package dev.gspo4j;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import dev.gspo4j.internal.FusedLinear;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Random;
import java.util.function.Supplier;
import java.util.stream.Stream;
import org.bytedeco.pytorch.NoGradGuard;
import org.bytedeco.pytorch.Scalar;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.Arguments;
import org.junit.jupiter.params.provider.MethodSource;

/**
 * The fused linear path ({@link LossInput.Builder#hiddenStates}) against the unfused path on the
 * same inputs: an lm_head's logits {@code hidden @ W^T + b} handed to {@code compute}. Values (loss,
 * log-probs, entropy, metrics) and the gradients of the hidden states, the weight and the bias, for
 * every objective, padded and packed, fp32 and bf16, with chunks of a few rows so responses straddle
 * chunk boundaries.
 */
class LinearLossTest {
    static final int B = 4;
    static final int T = 7;
    static final int H = 16;
    static final int V = 37;
    static final int[] LENGTHS = {5, 0, 7, 3}; // response 1 empty

    record Objective(String name, Supplier<PolicyLoss.Builder> builder) {
        @Override
        public String toString() {
            return name;
        }
    }

    static List<Objective> objectives() {
        return List.of(new Objective("GSPO", () -> PolicyLoss.gspo().clip(0.02, 0.03)),
                new Objective("GSPO-token", () -> PolicyLoss.gspoToken().clip(0.02, 0.03)),
                new Objective("GRPO", PolicyLoss::grpo), new Objective("PPO dual clip", () -> PolicyLoss.ppo().dualClip(2)),
                new Objective("DAPO", PolicyLoss::dapo), new Objective("Dr. GRPO", PolicyLoss::drGrpo),
                new Objective("CISPO", () -> PolicyLoss.cispo().clip(0.2, 0.28)), new Objective("SAPO", PolicyLoss::sapo),
                new Objective("GMPO", () -> PolicyLoss.gmpo().clip(0.1, 0.15)),
                new Objective("LUSPO", () -> PolicyLoss.luspo().clip(0.02, 0.03)), new Objective("VESPO", PolicyLoss::vespo),
                new Objective("DPPO-TV", PolicyLoss::dppoTv), new Objective("DPPO-KL", PolicyLoss::dppoKl));
    }

    static Stream<Arguments> cases() {
        final List<Arguments> out = new ArrayList<>();
        for (Objective o : objectives()) {
            for (boolean packed : new boolean[] {false, true}) {
                for (ScalarType type : new ScalarType[] {ScalarType.Float, ScalarType.BFloat16}) {
                    for (boolean options : new boolean[] {false, true}) {
                        out.add(Arguments.of(o, packed, type, options));
                    }
                }
            }
        }
        return out.stream();
    }

    /** One random lm_head problem: leaves hidden, weight, bias (in the dtype) and the per-token inputs. */
    static final class Problem implements AutoCloseable {
        final boolean packed;
        final Tensor hidden;
        final Tensor weight;
        final Tensor bias;
        final Tensor targets;
        final Tensor mask;
        final Tensor offsets;
        final Tensor advantages;
        Tensor old;
        Tensor ref;

        Problem(long seed, boolean packed, ScalarType type, double spread) {
            this.packed = packed;
            torch.manual_seed(seed);
            final Random random = new Random(seed);
            final int tokens = packed ? sum(LENGTHS) : B * T;
            try (Tensor h = torch.randn(packed ? new long[] {tokens, H} : new long[] {B, T, H}); Tensor w = torch.randn(V, H);
                    Tensor b = torch.randn(V); Scalar hs = new Scalar(0.5); Tensor hScaled = h.mul(hs);
                    Tensor ht = hScaled.to(type); Tensor wt = w.to(type); Tensor bt = b.to(type)) {
                hidden = ht.detach().set_requires_grad(true);
                weight = wt.detach().set_requires_grad(true);
                bias = bt.detach().set_requires_grad(true);
            }
            final long[] ids = new long[tokens];
            final float[] m = new float[tokens];
            for (int i = 0; i < tokens; i++) {
                ids[i] = random.nextInt(V);
            }
            if (packed) {
                final long[] cu = new long[B + 1];
                for (int r = 0; r < B; r++) {
                    cu[r + 1] = cu[r] + LENGTHS[r];
                }
                offsets = Tensor.create(cu);
                java.util.Arrays.fill(m, 1);
                m[2] = 0; // a masked token inside response 0
                targets = Tensor.create(ids);
                mask = Tensor.create(m);
            } else {
                offsets = null;
                for (int r = 0; r < B; r++) {
                    for (int t = 0; t < LENGTHS[r]; t++) {
                        m[r * T + t] = 1;
                    }
                }
                targets = Tensor.create(ids).reshape(B, T);
                mask = Tensor.create(m).reshape(B, T);
            }
            final float[] a = new float[B];
            for (int r = 0; r < B; r++) {
                a[r] = (float) random.nextGaussian();
            }
            advantages = Tensor.create(a);
            // Old and reference log-probs near the current ones, so ratios straddle the clips.
            try (NoGradGuard noGrad = new NoGradGuard(); Tensor logits = logits(); Tensor f = logits.to(ScalarType.Float);
                    Tensor lsm = f.log_softmax(-1); Tensor y = targets.unsqueeze(-1); Tensor g = lsm.gather(-1, y);
                    Tensor lp = g.squeeze(-1); Tensor n1 = torch.randn_like(lp); Tensor n2 = torch.randn_like(lp);
                    Scalar s1 = new Scalar(spread); Scalar s2 = new Scalar(0.3); Tensor d1 = n1.mul(s1); Tensor d2 = n2.mul(s2)) {
                old = lp.add(d1);
                ref = lp.add(d2);
            }
        }

        /**
         * The lm_head's logits as one GEMM with the bias fused (addmm over the [N, H] rows), the
         * formula of the fused path: in bf16, torch.linear of a 3-d input adds the bias after
         * rounding the product, a second rounding that would move bf16 logits by an ulp.
         */
        Tensor logits() {
            try (Tensor rows = hidden.reshape(-1, H); Tensor wt = weight.t(); Tensor flat = torch.addmm(bias, rows, wt)) {
                return packed ? new Tensor(flat) : flat.view(B, T, V);
            }
        }

        LossInput.Builder common(LossInput.Builder b, boolean options) {
            b.targets(targets).mask(mask).oldLogProbs(old).advantages(advantages);
            if (packed) {
                b.offsets(offsets);
            }
            if (options) {
                b.refLogProbs(ref);
            }
            return b;
        }

        void zeroGrads() {
            for (Tensor t : new Tensor[] {hidden, weight, bias}) {
                final Tensor g = t.grad();
                if (g.defined()) {
                    g.zero_();
                }
                g.close();
            }
        }

        Tensor[] grads() {
            return new Tensor[] {hidden.grad().clone(), weight.grad().clone(), bias.grad().clone()};
        }

        @Override
        public void close() {
            for (Tensor t : new Tensor[] {hidden, weight, bias, targets, mask, offsets, advantages, old, ref}) {
                if (t != null) {
                    t.close();
                }
            }
        }
    }

    static int sum(int[] a) {
        int s = 0;
        for (int x : a) {
            s += x;
        }
        return s;
    }

    static PolicyLoss build(Objective o, boolean options) {
        final PolicyLoss.Builder b = o.builder().get();
        if (options) {
            b.temperature(0.7).entropyCoefficient(0.01).kl(0.05, KlEstimator.K3);
        }
        return b.build();
    }

    static long chunkBytes(int rows, ScalarType type) {
        return (long) rows * V * (type == ScalarType.Float ? 4 : 2);
    }

    @ParameterizedTest(name = "{0} packed={1} {2} options={3}")
    @MethodSource("cases")
    void matchesTheUnfusedPath(Objective objective, boolean packed, ScalarType type, boolean options) {
        final PolicyLoss loss = build(objective, options);
        final boolean bf16 = type == ScalarType.BFloat16;
        try (Problem p = new Problem(11 + objective.name().hashCode(), packed, type, 0.05)) {
            final Tensor[] want;
            final LossResult unfused;
            try (Tensor logits = p.logits()) {
                unfused = loss.compute(p.common(LossInput.builder().logits(logits), options).build());
                unfused.loss().backward();
                want = p.grads();
            }
            p.zeroGrads();
            // Three rows per chunk: every response with more than one token straddles a boundary.
            try (LossResult fused = loss.compute(p.common(LossInput.builder().hiddenStates(p.hidden, p.weight, p.bias), options)
                    .logitsChunkBytes(chunkBytes(3, type)).build())) {
                final String what = objective + (packed ? " packed " : " padded ") + type + (options ? " +options" : "");
                final double tol = bf16 ? 2e-2 : 1e-4;
                PolicyLossModuleTest.assertClose(unfused.lossValue(), fused.lossValue(), tol, tol * 1e-2, what + " loss");
                PolicyLossModuleTest.assertClose(unfused.logProbs(), fused.logProbs(), tol, tol * 1e-1, what + " logProbs");
                PolicyLossModuleTest.assertClose(unfused.entropy(), fused.entropy(), tol, tol * 1e-1, what + " entropy");
                final Map<String, Double> a = unfused.metrics().asMap();
                final Map<String, Double> b = fused.metrics().asMap();
                for (String key : a.keySet()) {
                    assertEquals(a.get(key), b.get(key), bf16 ? 5e-2 : 1e-4 * Math.max(1, Math.abs(a.get(key))), what + " " + key);
                }
                fused.loss().backward();
                final Tensor[] got = p.grads();
                final String[] names = {"hidden", "weight", "bias"};
                for (int i = 0; i < 3; i++) {
                    PolicyLossModuleTest.assertClose(want[i], got[i], bf16 ? 5e-2 : 1e-4, bf16 ? 2e-3 : 1e-6, what + " grad " + names[i]);
                    want[i].close();
                    got[i].close();
                }
            } finally {
                unfused.close();
            }
        }
    }

    /** The direct path, an upstream scale, a sum with another term, accumulation into .grad. */
    @Test
    void composesLikeTheUnfusedPath() {
        final PolicyLoss loss = PolicyLoss.grpo().entropyCoefficient(0.02).build();
        try (Problem p = new Problem(5, false, ScalarType.Float, 0.1)) {
            final LossInput unfusedIn;
            final Tensor[] want;
            try (Tensor logits = p.logits(); LossResult r = loss.compute(p.common(LossInput.builder().logits(logits), false).build());
                    Tensor l = r.loss(); Scalar three = new Scalar(3.0); Tensor scaled = l.mul(three);
                    Tensor other = p.weight.sum(); Tensor total = scaled.add(other)) {
                total.backward();
                // Twice more through the direct path, scale 0.5 each: 4x the loss's gradient in all, plus the sum's.
                try (Tensor logits2 = p.logits(); LossResult r2 = loss.compute(p.common(LossInput.builder().logits(logits2), false).build())) {
                    r2.backward(0.5);
                }
                try (Tensor logits3 = p.logits(); LossResult r3 = loss.compute(p.common(LossInput.builder().logits(logits3), false).build())) {
                    r3.backward(0.5);
                }
                want = p.grads();
            }
            p.zeroGrads();
            final LossInput fusedIn = p.common(LossInput.builder().hiddenStates(p.hidden, p.weight, p.bias), false)
                    .logitsChunkBytes(chunkBytes(4, ScalarType.Float)).build();
            try (LossResult r = loss.compute(fusedIn); Tensor l = r.loss(); Scalar three = new Scalar(3.0); Tensor scaled = l.mul(three);
                    Tensor other = p.weight.sum(); Tensor total = scaled.add(other)) {
                total.backward();
            }
            try (LossResult r2 = loss.compute(fusedIn)) {
                r2.backward(0.5);
                assertThrows(IllegalStateException.class, () -> r2.backward(0.5));
            }
            try (LossResult r3 = loss.compute(fusedIn)) {
                r3.backward(0.5);
            }
            final Tensor[] got = p.grads();
            for (int i = 0; i < 3; i++) {
                PolicyLossModuleTest.assertClose(want[i], got[i], 1e-4, 1e-6, "accumulated grad " + i);
            }
        }
        assertEquals(0, FusedLinear.liveGraphs(), "graphs released");
    }

    /** Only the inputs that require grad get one (a frozen lm_head, or a frozen trunk); no bias. */
    @Test
    void gradientsOnlyWhereRequiredAndWithoutBias() {
        final PolicyLoss loss = PolicyLoss.gspo().clip(0.02, 0.03).build();
        try (Problem p = new Problem(9, true, ScalarType.Float, 0.05)) {
            final Tensor[] want;
            try (Tensor logits = torch.linear(p.hidden, p.weight); LossResult r = loss.compute(p.common(LossInput.builder()
                    .logits(logits), false).build())) {
                r.loss().backward();
                want = new Tensor[] {p.hidden.grad().clone(), p.weight.grad().clone()};
            }
            p.zeroGrads();
            try (LossResult r = loss.compute(p.common(LossInput.builder().hiddenStates(p.hidden, p.weight, null), false)
                    .logitsChunkBytes(1).build())) {
                r.loss().backward();
            }
            PolicyLossModuleTest.assertClose(want[0], p.hidden.grad(), 1e-4, 1e-6, "hidden grad, one row per chunk");
            PolicyLossModuleTest.assertClose(want[1], p.weight.grad(), 1e-4, 1e-6, "weight grad, one row per chunk");
            // A frozen lm_head: the hidden states alone get the gradient.
            p.zeroGrads();
            p.weight.requires_grad_(false);
            try (LossResult r = loss.compute(p.common(LossInput.builder().hiddenStates(p.hidden, p.weight, null), false).build())) {
                r.backward();
            }
            PolicyLossModuleTest.assertClose(want[0], p.hidden.grad(), 1e-4, 1e-6, "hidden grad, frozen weight");
            try (Tensor wg = p.weight.grad()) {
                assertEquals(0.0, PolicyLossModuleTest.maxAbs(wg), "a frozen weight's old grad is untouched (zeroed above)");
            }
            p.weight.requires_grad_(true);
            for (Tensor t : want) {
                t.close();
            }
        }
    }

    /** Hidden states from a model below (a non-leaf, and the [:, :-1, :] view): the gradient reaches its parameters. */
    @Test
    void gradientContinuesThroughTheModelBelow() {
        final PolicyLoss loss = PolicyLoss.gspoToken().clip(0.02, 0.03).entropyCoefficient(0.01).build();
        try (Problem p = new Problem(21, false, ScalarType.Float, 0.05); Tensor x = torch.randn(B, T + 1, H).set_requires_grad(true);
                Tensor a = torch.randn(H, H).set_requires_grad(true)) {
            final Tensor[] want = new Tensor[3];
            for (int pass = 0; pass < 2; pass++) {
                try (Tensor mixed = x.matmul(a); Tensor activated = mixed.tanh(); Tensor hidden = activated.narrow(1, 0, T)) {
                    final LossInput.Builder in = pass == 0
                            ? LossInput.builder().logits(torch.linear(hidden, p.weight, p.bias))
                            : LossInput.builder().hiddenStates(hidden, p.weight, p.bias).logitsChunkBytes(chunkBytes(5, ScalarType.Float));
                    try (LossResult r = loss.compute(p.common(in, false).build())) {
                        r.loss().backward();
                    }
                }
                final Tensor[] grads = {x.grad().clone(), a.grad().clone(), p.weight.grad().clone()};
                if (pass == 0) {
                    System.arraycopy(grads, 0, want, 0, 3);
                    for (Tensor t : new Tensor[] {x, a}) {
                        try (Tensor g = t.grad()) {
                            g.zero_();
                        }
                    }
                    p.zeroGrads();
                } else {
                    for (int i = 0; i < 3; i++) {
                        PolicyLossModuleTest.assertClose(want[i], grads[i], 1e-4, 1e-6, "grad " + i + " through the model below");
                        want[i].close();
                        grads[i].close();
                    }
                }
            }
        }
    }

    @Test
    void doubleBackwardIsRefused() {
        final PolicyLoss loss = PolicyLoss.grpo().build();
        try (Problem p = new Problem(22, false, ScalarType.Float, 0.05);
                LossResult r = loss.compute(p.common(LossInput.builder().hiddenStates(p.hidden, p.weight, p.bias), false).build());
                Tensor l = r.loss()) {
            final RuntimeException e = assertThrows(RuntimeException.class, () -> l.backward(new Tensor(),
                    new org.bytedeco.pytorch.BoolOptional(true), true, new org.bytedeco.pytorch.TensorArrayRefOptional()));
            assertTrue(e.getMessage().contains("double backward"), e.getMessage());
        }
        assertEquals(0, FusedLinear.liveGraphs(), "graphs released");
    }

    @Test
    void retainGraphRunsTwice() {
        final PolicyLoss loss = PolicyLoss.grpo().build();
        try (Problem p = new Problem(23, true, ScalarType.Float, 0.05);
                LossResult r = loss.compute(p.common(LossInput.builder().hiddenStates(p.hidden, p.weight, p.bias), false)
                        .logitsChunkBytes(chunkBytes(4, ScalarType.Float)).build());
                Tensor l = r.loss()) {
            l.backward(new Tensor(), new org.bytedeco.pytorch.BoolOptional(true), false, new org.bytedeco.pytorch.TensorArrayRefOptional());
            final Tensor once = p.weight.grad().clone();
            l.backward(new Tensor(), new org.bytedeco.pytorch.BoolOptional(false), false, new org.bytedeco.pytorch.TensorArrayRefOptional());
            try (Scalar two = new Scalar(2.0); Tensor twice = once.mul(two)) {
                PolicyLossModuleTest.assertClose(twice, p.weight.grad(), 1e-5, 1e-7, "two backwards add");
            }
            once.close();
        }
        assertEquals(0, FusedLinear.liveGraphs(), "graphs released");
    }

    @Test
    void noGradComputesValuesOnly() {
        final PolicyLoss loss = PolicyLoss.grpo().build();
        try (Problem p = new Problem(3, false, ScalarType.Float, 0.05); NoGradGuard noGrad = new NoGradGuard();
                LossResult r = loss.compute(p.common(LossInput.builder().hiddenStates(p.hidden, p.weight, p.bias), false).build())) {
            assertFalse(r.differentiable());
            assertThrows(IllegalStateException.class, r::backward);
        }
    }

    @Test
    void modifiedWeightIsRefused() {
        final PolicyLoss loss = PolicyLoss.grpo().build();
        try (Problem p = new Problem(4, false, ScalarType.Float, 0.05);
                LossResult r = loss.compute(p.common(LossInput.builder().hiddenStates(p.hidden, p.weight, p.bias), false).build())) {
            try (NoGradGuard noGrad = new NoGradGuard(); Scalar s = new Scalar(1.0)) {
                p.weight.add_(s);
            }
            final IllegalStateException e = assertThrows(IllegalStateException.class, r::backward);
            assertTrue(e.getMessage().contains("the weight"), e.getMessage());
        }
    }

    @Test
    void badInputsNameTheArgument() {
        final PolicyLoss loss = PolicyLoss.grpo().build();
        try (Problem p = new Problem(6, false, ScalarType.Float, 0.05); Tensor wrongH = torch.randn(V, H + 1);
                Tensor half = p.weight.to(ScalarType.BFloat16); Tensor shortBias = torch.randn(V - 1);
                Tensor logits = p.logits()) {
            expect(loss, p.common(LossInput.builder().hiddenStates(p.hidden, wrongH, null), false), "weight must be the lm_head's [V, H]");
            expect(loss, p.common(LossInput.builder().hiddenStates(p.hidden, half, null), false), "weight must have the hidden states' dtype");
            expect(loss, p.common(LossInput.builder().hiddenStates(p.hidden, p.weight, shortBias), false), "bias must have shape");
            final IllegalArgumentException both = assertThrows(IllegalArgumentException.class,
                    () -> p.common(LossInput.builder().logits(logits).hiddenStates(p.hidden, p.weight, null), false).build());
            assertTrue(both.getMessage().contains("both set"), both.getMessage());
            assertThrows(IllegalArgumentException.class, () -> LossInput.builder().logitsChunkBytes(0));
        }
    }

    @Test
    void nonFiniteHiddenStatesNameTheRowInTheBatch() {
        final PolicyLoss loss = PolicyLoss.grpo().build();
        try (Problem p = new Problem(8, false, ScalarType.Float, 0.05); NoGradGuard noGrad = new NoGradGuard();
                Tensor hidden = p.hidden.clone()) {
            try (Tensor row = hidden.select(0, 2); Tensor cell = row.select(0, 5); Scalar nan = new Scalar(Double.NaN)) {
                cell.fill_(nan);
            }
            final NonFiniteDataException e = assertThrows(NonFiniteDataException.class, () -> loss.compute(p.common(
                    LossInput.builder().hiddenStates(hidden, p.weight, p.bias), false).logitsChunkBytes(chunkBytes(3, ScalarType.Float))
                    .build()));
            assertTrue(e.getMessage().contains("[2, 5, :]"), e.getMessage());
        }
    }

    static void expect(PolicyLoss loss, LossInput.Builder input, String part) {
        final IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> loss.compute(input.build()).close());
        assertTrue(e.getMessage().contains(part), e.getMessage());
    }

    @Test
    void emptyBatch() {
        final PolicyLoss loss = PolicyLoss.grpo().build();
        try (Tensor hidden = torch.randn(0, H).set_requires_grad(true); Tensor weight = torch.randn(V, H).set_requires_grad(true);
                Tensor targets = Tensor.create(new long[0]); Tensor offsets = Tensor.create(new long[] {0});
                Tensor adv = Tensor.create(new float[0]);
                LossResult r = loss.compute(LossInput.builder().hiddenStates(hidden, weight, null).targets(targets).offsets(offsets)
                        .advantages(adv).build())) {
            r.backward();
            assertEquals(0.0, PolicyLossModuleTest.maxAbs(weight.grad()));
        }
    }
}
