package dev.gspo4j;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import dev.gspo4j.PolicyLossModuleTest.Batch;
import dev.gspo4j.internal.DeferredChecks;
import dev.gspo4j.internal.Device;
import dev.gspo4j.internal.EmulatedCuda;
import dev.gspo4j.internal.Kernels;
import dev.gspo4j.internal.Tensors;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.function.Supplier;
import org.bytedeco.pytorch.BoolOptional;
import org.bytedeco.pytorch.MemoryFormatOptional;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorArrayRefOptional;
import org.bytedeco.pytorch.TensorOptions;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;
import org.junit.jupiter.api.function.Executable;

/**
 * Run in a child JVM by {@link CudaEmulatorTest}, on the SIMT emulator's build of the native
 * library with {@code GSPO4J_SIMT_HOST_IS_DEVICE=1}: computes each case twice from the same CPU
 * tensors, once on the CPU kernels and once, with {@link EmulatedCuda} on, through the Java
 * layer's CUDA path and the emulated CUDA kernels, and compares. Exits non-zero (an assertion
 * error) on the first difference; prints {@code cases=}, {@code checks=} and {@code millis=}.
 *
 * @see CudaEmulatorTest for what this covers and what it cannot
 */
public final class CudaEmulatorProbe {
    // The CUDA kernels sum in another order than the CPU ones (trees over threads, split rows
    // merged in fp64), so agreement is to rounding, not bitwise. Gradients are written in the
    // logits' dtype: one rounding step of it apart.
    private static final double VALUE_RELATIVE = 1e-5;
    private static final double VALUE_ABSOLUTE = 1e-6;

    private static int cases;
    private static int checks;

    private CudaEmulatorProbe() {}

    public static void main(String[] args) throws Exception {
        final long start = System.nanoTime();
        requireEmulatedLibrary(Path.of(args[0]));
        // The emulator runs each launch on the calling thread; libtorch's OpenMP workers, which
        // spin after each op, would only take the processor from it.
        torch.set_num_threads(1);
        torch.manual_seed(7);
        losses();
        linear();
        advantages();
        tokenLogProbs();
        badData();
        deferredChecks();
        System.out.println("cases=" + cases);
        System.out.println("checks=" + checks);
        System.out.println("millis=" + (System.nanoTime() - start) / 1_000_000);
    }

    /** The test must not pass on the real library: these answers only the emulator gives without a GPU. */
    private static void requireEmulatedLibrary(Path expected) throws Exception {
        assertEquals(1, Kernels.cudaDeviceCount(), "the emulator reports one CUDA device");
        assertEquals(13000, Kernels.cudaRuntimeVersion(), "the emulator's CUDA runtime version");
        final List<String> mapped = new ArrayList<>();
        for (String line : Files.readAllLines(Path.of("/proc/self/maps"))) {
            final int path = line.indexOf('/');
            if (path >= 0 && line.endsWith("/libgspo4j.so")) {
                mapped.add(Path.of(line.substring(path)).toRealPath().toString());
            }
        }
        assertTrue(!mapped.isEmpty(), "no libgspo4j.so mapped");
        for (String path : mapped) {
            assertEquals(expected.toRealPath().toString(), path, "the libgspo4j.so this JVM runs");
        }
        try (Tensor t = torch.zeros(1)) {
            assertEquals(Device.CPU, Tensors.device(t));
            assertEquals(Device.CUDA, emulated(() -> Tensors.device(t)), "the switch routes CPU tensors to CUDA");
            assertNull(emulated(() -> Tensors.stream(t)), "no stream for an emulated CUDA tensor");
        }
        checks += 4;
    }

    /** Runs {@code body} with CPU tensors sent to the emulated CUDA kernels. */
    private static <T> T emulated(Supplier<T> body) {
        EmulatedCuda.route(true);
        try {
            return body.get();
        } finally {
            EmulatedCuda.route(false);
        }
    }

    /** Runs {@code body} with every CUDA call waiting for its own data checks. */
    private static <T> T strict(Supplier<T> body) {
        final boolean before = Gspo4j.syncChecks();
        Gspo4j.setSyncChecks(true);
        try {
            return body.get();
        } finally {
            Gspo4j.setSyncChecks(before);
        }
    }

    private static <T> T onDevice(boolean cuda, Supplier<T> body) {
        return cuda ? emulated(body) : body.get();
    }

    // ---- Loss modules ---------------------------------------------------------------------------

    private enum Layout { PADDED, PACKED, STRIDED }

    private static void losses() {
        // The emulator's cost grows with rows x threads x synchronisations: few short rows.
        final Batch small = new Batch(31, 3, 4, 1000, 0.02);
        final Batch odd = new Batch(32, 3, 3, 999, 0.3);
        // Split rows: fewer rows than 4 per emulated multiprocessor and over 2 x 8192 columns,
        // so each row is two CTAs merged by a second kernel (V not a multiple of 64: a tail).
        final Batch wide = new Batch(33, 1, 2, 16411, 0.2);
        lossCase("GSPO kl+entropy", PolicyLoss.gspo().clip(3e-3, 4e-3).kl(0.05, KlEstimator.K3).entropyCoefficient(0.01), small,
                ScalarType.Float, Layout.PADDED, false, false);
        lossCase("GSPO", PolicyLoss.gspo().clip(3e-3, 4e-3), small, ScalarType.BFloat16, Layout.PACKED, false, false);
        lossCase("GSPO-token kl+entropy", PolicyLoss.gspoToken().clip(3e-3, 4e-3).kl(0.1, KlEstimator.K1).entropyCoefficient(0.02),
                small, ScalarType.BFloat16, Layout.PADDED, true, false);
        lossCase("GSPO-token", PolicyLoss.gspoToken().clip(3e-3, 4e-3), small, ScalarType.Float, Layout.PACKED, true, false);
        lossCase("GRPO kl+entropy tau=0.7", PolicyLoss.grpo().kl(0.05, KlEstimator.K2).entropyCoefficient(0.01).temperature(0.7),
                odd, ScalarType.Float, Layout.PACKED, false, false);
        lossCase("GRPO kl+entropy", PolicyLoss.grpo().kl(0.05, KlEstimator.K3).entropyCoefficient(0.01), odd, ScalarType.BFloat16,
                Layout.STRIDED, false, false);
        lossCase("GRPO on-policy", PolicyLoss.grpo(), odd, ScalarType.Half, Layout.PADDED, false, true);
        lossCase("PPO dual-clip kl+entropy", PolicyLoss.ppo().dualClip(3).kl(0.05, KlEstimator.K3).entropyCoefficient(0.01), odd,
                ScalarType.BFloat16, Layout.PACKED, true, false);
        lossCase("PPO seq-mean-token-sum-norm", PolicyLoss.ppo().aggregation(Aggregation.SEQ_MEAN_TOKEN_SUM_NORM).normalizer(5),
                small, ScalarType.Float, Layout.PADDED, true, false);
        // The further objectives and KL estimators, through the same loss_math.h on both devices.
        lossCase("CISPO k3+", PolicyLoss.cispo().kl(0.05, KlEstimator.K3_PLUS), odd, ScalarType.Float, Layout.PACKED, true, false);
        lossCase("SAPO sequence unbiased-k3", PolicyLoss.sapo().sequenceRatio(true).kl(0.05, KlEstimator.K3_UNBIASED), small,
                ScalarType.BFloat16, Layout.PADDED, true, false);
        lossCase("SAPO abs-kl", PolicyLoss.sapo().kl(0.05, KlEstimator.ABS).entropyCoefficient(0.01), odd, ScalarType.Half,
                Layout.STRIDED, false, false);
        lossCase("GSPO-token low_var_kl", PolicyLoss.gspoToken().kl(0.05, KlEstimator.LOW_VAR_KL), odd, ScalarType.Float,
                Layout.PACKED, true, false);
        lossCase("GMPO", PolicyLoss.gmpo().clip(0.1, 0.1).entropyCoefficient(0.01), odd, ScalarType.Float, Layout.PADDED, false, false);
        lossCase("LUSPO dual-clip", PolicyLoss.luspo().dualClip(2).kl(0.05, KlEstimator.K2), small, ScalarType.Float, Layout.PACKED,
                false, false);
        lossCase("VESPO", PolicyLoss.vespo(), small, ScalarType.Float, Layout.PADDED, true, false);
        lossCase("DPPO-TV", PolicyLoss.dppoTv().dppoDivergence(0.01, 0.01), odd, ScalarType.BFloat16, Layout.PACKED, false, false);
        lossCase("DPPO-KL", PolicyLoss.dppoKl().dppoDivergence(0.005, 0.005).dppoRatioCap(1.2), odd, ScalarType.Float,
                Layout.PADDED, true, false);
        lossCase("GRPO split rows", PolicyLoss.grpo().kl(0.05, KlEstimator.K3).entropyCoefficient(0.01), wide, ScalarType.Float,
                Layout.PADDED, false, false);
        lossCase("GSPO split rows", PolicyLoss.gspo().clip(3e-3, 4e-3).entropyCoefficient(0.01), wide, ScalarType.BFloat16,
                Layout.PACKED, false, false);
        // Rollout correction and top-entropy selection (the threshold computed and read on the device).
        lossCase("GRPO TIS token + k3 rejection", PolicyLoss.grpo().rolloutWeights(Rollout.Level.TOKEN, Rollout.Mode.TRUNCATE, 0, 1.5)
                .rolloutRejection(Rollout.Divergence.K3, Rollout.Scope.TOKEN, 0.05), odd, ScalarType.Float, Layout.PACKED, true, false, 0.2);
        lossCase("GSPO MIS sequence + off-policy mask", PolicyLoss.gspo().clip(3e-3, 4e-3)
                .rolloutWeights(Rollout.Level.SEQUENCE, Rollout.Mode.MASK, 0, 3).offPolicyMask(0), odd, ScalarType.BFloat16,
                Layout.PADDED, false, true, 0.03); // on-policy (at this clip off-policy ratios clip), one A_b > 0 the mask keeps
        lossCase("GRPO top-entropy 0.4 + k1 mean", PolicyLoss.grpo().topEntropyQuantile(0.4)
                .rolloutRejection(Rollout.Divergence.K1, Rollout.Scope.MEAN, 0.1), odd, ScalarType.Float, Layout.STRIDED, false, false, 0.1);
        lossCase("GMPO top-entropy 0.5", PolicyLoss.gmpo().clip(0.1, 0.1).topEntropyQuantile(0.5), odd, ScalarType.Half,
                Layout.PACKED, false, false);
    }

    /** A case's inputs as tensors, built from a {@link Batch} in one of three layouts. */
    private static final class Inputs implements AutoCloseable {
        final long[] leafShape;
        final float[] leafValues;
        final Layout layout;
        final int tokensPerResponse;
        final Tensor targets;
        final Tensor mask;
        final Tensor old;
        final Tensor ref;
        final Tensor advantages;
        final Tensor offsets;
        Tensor rollout; // the engine's log-probs (old + noise), or null

        Inputs(Batch batch, Layout layout, boolean tokenAdvantages) {
            this.layout = layout;
            this.tokensPerResponse = batch.t;
            final int b = batch.b;
            final int t = batch.t;
            final int v = batch.v;
            if (layout == Layout.PACKED) {
                // Each response keeps its counted tokens and one masked one; response 1 is empty.
                final List<Integer> rows = new ArrayList<>();
                final long[] offsetValues = new long[b + 1];
                for (int r = 0; r < b; r++) {
                    int length = 0;
                    for (int k = 0; k < t; k++) {
                        length += batch.maskValues[r * t + k] != 0 ? 1 : 0;
                    }
                    final int span = length == 0 ? 0 : Math.min(t, length + 1);
                    for (int k = 0; k < span; k++) {
                        rows.add(r * t + k);
                    }
                    offsetValues[r + 1] = rows.size();
                }
                final int n = rows.size();
                leafShape = new long[] {n, v};
                leafValues = new float[n * v];
                final long[] targetValues = new long[n];
                final float[] maskValues = new float[n];
                final float[] oldValues = new float[n];
                final float[] refValues = new float[n];
                final float[] tokenAdvantageValues = new float[n];
                for (int i = 0; i < n; i++) {
                    final int row = rows.get(i);
                    System.arraycopy(batch.logitValues, row * v, leafValues, i * v, v);
                    targetValues[i] = batch.targetValues[row];
                    maskValues[i] = batch.maskValues[row];
                    oldValues[i] = batch.oldValues[row];
                    refValues[i] = batch.refValues[row];
                    tokenAdvantageValues[i] = batch.tokenAdvantages[row];
                }
                targets = Tensor.create(targetValues);
                mask = Tensor.create(maskValues);
                old = Tensor.create(oldValues);
                ref = Tensor.create(refValues);
                advantages = tokenAdvantages ? Tensor.create(tokenAdvantageValues) : batch.sequenceAdvantages();
                offsets = Tensor.create(offsetValues);
            } else {
                if (layout == Layout.STRIDED) {
                    // [B, T + 1, V] of which the loss reads [:, :T, :]: rows in place at outer
                    // strides that are not T * V, and (V odd, 2-byte dtypes) not 16-byte aligned.
                    leafShape = new long[] {b, t + 1, v};
                    leafValues = new float[b * (t + 1) * v];
                    for (int r = 0; r < b; r++) {
                        System.arraycopy(batch.logitValues, r * t * v, leafValues, r * (t + 1) * v, t * v);
                        Arrays.fill(leafValues, (r * (t + 1) + t) * v, (r + 1) * (t + 1) * v, 1.5f);
                    }
                } else {
                    leafShape = new long[] {b, t, v};
                    leafValues = batch.logitValues;
                }
                targets = batch.targets();
                mask = batch.mask();
                old = batch.old();
                ref = batch.ref();
                advantages = tokenAdvantages ? batch.tokenAdvantages() : batch.sequenceAdvantages();
                offsets = null;
            }
        }

        /** A fresh leaf requiring grad, in {@code type}. */
        Tensor leaf(ScalarType type) {
            try (Tensor base = Tensor.create(leafValues).reshape(leafShape); Tensor cast = base.to(type)) {
                return cast.detach().set_requires_grad(true);
            }
        }

        /** What the loss reads of the leaf. */
        Tensor logits(Tensor leaf) {
            return layout == Layout.STRIDED ? leaf.narrow(1, 0, tokensPerResponse) : new Tensor(leaf);
        }

        /** Adds rollout log-probs: the old ones plus seeded noise of {@code spread}. */
        Inputs withRollout(double spread) {
            final float[] values = new float[(int) old.numel()];
            try (Tensor flat = old.contiguous()) {
                flat.data_ptr_float().get(values);
            }
            final java.util.Random random = new java.util.Random(7);
            for (int i = 0; i < values.length; i++) {
                values[i] += (float) (spread * random.nextGaussian());
            }
            try (Tensor raw = Tensor.create(values)) {
                rollout = raw.reshape(Tensors.shape(old));
            }
            return this;
        }

        LossInput input(Tensor logits, boolean tokenAdvantages, boolean onPolicy) {
            final LossInput.Builder in = LossInput.builder().logits(logits).targets(targets).mask(mask).refLogProbs(ref)
                    .rolloutLogProbs(rollout);
            if (!onPolicy) {
                in.oldLogProbs(old);
            }
            if (tokenAdvantages) {
                in.tokenAdvantages(advantages);
            } else {
                in.advantages(advantages);
            }
            if (offsets != null) {
                in.offsets(offsets);
            }
            return in.build();
        }

        @Override
        public void close() {
            for (Tensor t : new Tensor[] {targets, mask, old, ref, advantages, offsets, rollout}) {
                if (t != null) {
                    t.close();
                }
            }
        }
    }

    /** What one path computed: the forward's values and the gradients of the three backward paths. */
    private record Outcome(Tensor loss, Tensor logProbs, Tensor entropy, Tensor metrics, long sequences, long tokens,
            Tensor gradientDirect, Tensor gradientGraph, Tensor gradientScaled) implements AutoCloseable {
        @Override
        public void close() {
            for (Tensor t : new Tensor[] {loss, logProbs, entropy, metrics, gradientDirect, gradientGraph, gradientScaled}) {
                t.close();
            }
        }
    }

    /**
     * Values of one forward and the gradients of its three backward paths: {@code backward()},
     * {@code loss().backward()} and {@code backward(0.5)} (the scale multiplies dL/dlp on the
     * device). One forward for the first, one more for each other path: on the emulator the policy loss's kernels, four passes
     * of wide CTAs with a dozen block reductions, cost more than the rest of the case.
     */
    private static Outcome run(PolicyLoss loss, Inputs inputs, ScalarType type, boolean tokenAdvantages, boolean onPolicy) {
        final Tensor[] gradients = new Tensor[3];
        try (Tensor leaf = inputs.leaf(type); Tensor logits = inputs.logits(leaf);
                LossResult result = loss.compute(inputs.input(logits, tokenAdvantages, onPolicy))) {
            assertTrue(result.differentiable());
            for (int path = 0; path < 3; path++) {
                // One backward per result (a second one is refused): paths 1 and 2 compute again.
                try (LossResult again = path == 0 ? null : loss.compute(inputs.input(logits, tokenAdvantages, onPolicy))) {
                    switch (path) {
                        case 0 -> result.backward();
                        case 1 -> again.loss().backward();
                        default -> again.backward(0.5);
                    }
                }
                try (Tensor grad = leaf.grad(); Tensor slot = leaf.mutable_grad()) {
                    gradients[path] = grad.clone();
                    slot.reset(); // the next path starts from no gradient
                }
            }
            return new Outcome(result.lossValue().clone(), result.logProbs().clone(), result.entropy().clone(),
                    result.metrics().tensor().clone(), result.metrics().sequences(), result.metrics().tokens(), gradients[0],
                    gradients[1], gradients[2]);
        }
    }

    private static void lossCase(String name, PolicyLoss.Builder builder, Batch batch, ScalarType type, Layout layout,
            boolean tokenAdvantages, boolean onPolicy) {
        lossCase(name, builder, batch, type, layout, tokenAdvantages, onPolicy, 0);
    }

    // rolloutSpread > 0: with rollout log-probs that far from the old ones.
    private static void lossCase(String name, PolicyLoss.Builder builder, Batch batch, ScalarType type, Layout layout,
            boolean tokenAdvantages, boolean onPolicy, double rolloutSpread) {
        final long start = System.nanoTime();
        final PolicyLoss loss = builder.build();
        final String label = name + " " + layout.name().toLowerCase() + " " + type + " V=" + batch.v;
        try (Inputs inputs = rolloutSpread > 0 ? new Inputs(batch, layout, tokenAdvantages).withRollout(rolloutSpread)
                : new Inputs(batch, layout, tokenAdvantages);
                Outcome cpu = run(loss, inputs, type, tokenAdvantages, onPolicy);
                Outcome cuda = emulated(() -> run(loss, inputs, type, tokenAdvantages, onPolicy))) {
            assertForwardClose(cpu.loss, cpu.logProbs, cpu.entropy, cpu.metrics, cuda.loss, cuda.logProbs, cuda.entropy, cuda.metrics,
                    label);
            assertEquals(cpu.sequences, cuda.sequences, label + " counted responses");
            assertEquals(cpu.tokens, cuda.tokens, label + " counted tokens");
            final double scale = PolicyLossModuleTest.maxAbs(cpu.gradientDirect);
            assertTrue(scale > 0, label + ": a zero gradient compares nothing");
            // One rounding of the gradient's dtype apart (bf16: 2^-8, fp16: 2^-11), or fp32 reductions.
            final double relative = type == ScalarType.BFloat16 ? 8e-3 : type == ScalarType.Half ? 1e-3 : 1e-5;
            assertClose(cpu.gradientDirect, cuda.gradientDirect, relative, 1e-6 * scale, label + " gradient, backward()");
            assertClose(cpu.gradientGraph, cuda.gradientGraph, relative, 1e-6 * scale, label + " gradient, loss().backward()");
            assertClose(cpu.gradientScaled, cuda.gradientScaled, relative, 1e-6 * scale, label + " gradient, backward(0.5)");
            checks += 2;
        }
        cases++;
        System.out.printf("case %s: %.0f ms%n", label, (System.nanoTime() - start) / 1e6);
    }

    // ---- The fused linear path ----------------------------------------------------------------------

    private static void linear() {
        // Chunks of 2 and 3 rows: responses split across chunks; 64 rows: one chunk for all.
        linearCase("GSPO", PolicyLoss.gspo().clip(0.05, 0.05), false, ScalarType.Float, 3, false);
        linearCase("GSPO kl+entropy tau=0.7", PolicyLoss.gspo().clip(0.05, 0.05).temperature(0.7).entropyCoefficient(0.01)
                .kl(0.05, KlEstimator.K3), true, ScalarType.BFloat16, 2, true);
        linearCase("GRPO kl+entropy", PolicyLoss.grpo().entropyCoefficient(0.01).kl(0.05, KlEstimator.K3), true, ScalarType.Float, 2,
                true);
        linearCase("PPO dual-clip", PolicyLoss.ppo().dualClip(3), false, ScalarType.BFloat16, 64, false);
        linearCase("GRPO top-entropy 0.5", PolicyLoss.grpo().topEntropyQuantile(0.5), true, ScalarType.Float, 3, false);
    }

    /** The fused linear path's values and the gradients of hidden states, weight and bias, by backward() and loss().backward(). */
    private record LinearOutcome(Tensor loss, Tensor logProbs, Tensor entropy, Tensor metrics, Tensor[] direct, Tensor[] graph)
            implements AutoCloseable {
        @Override
        public void close() {
            for (Tensor t : new Tensor[] {loss, logProbs, entropy, metrics}) {
                t.close();
            }
            for (Tensor[] g : new Tensor[][] {direct, graph}) {
                for (Tensor t : g) {
                    t.close();
                }
            }
        }
    }

    private static LinearOutcome runLinear(PolicyLoss loss, LinearLossTest.Problem p, ScalarType type, int chunkRows, boolean options) {
        final Supplier<LossInput> input = () -> p.common(LossInput.builder().hiddenStates(p.hidden, p.weight, p.bias)
                .logitsChunkBytes(LinearLossTest.chunkBytes(chunkRows, type)), options).build();
        try (LossResult result = loss.compute(input.get())) {
            assertTrue(result.differentiable());
            result.backward();
            final Tensor[] direct = p.grads();
            p.zeroGrads();
            try (LossResult again = loss.compute(input.get())) {
                again.loss().backward();
            }
            final Tensor[] graph = p.grads();
            p.zeroGrads();
            return new LinearOutcome(result.lossValue().clone(), result.logProbs().clone(), result.entropy().clone(),
                    result.metrics().tensor().clone(), direct, graph);
        }
    }

    private static void linearCase(String name, PolicyLoss.Builder builder, boolean packed, ScalarType type, int chunkRows,
            boolean options) {
        final long start = System.nanoTime();
        final PolicyLoss loss = builder.build();
        final String label = "linear " + name + (packed ? " packed " : " padded ") + type + " chunk=" + chunkRows;
        try (LinearLossTest.Problem p = new LinearLossTest.Problem(41, packed, type, 0.05);
                LinearOutcome cpu = runLinear(loss, p, type, chunkRows, options);
                LinearOutcome cuda = emulated(() -> runLinear(loss, p, type, chunkRows, options))) {
            assertForwardClose(cpu.loss, cpu.logProbs, cpu.entropy, cpu.metrics, cuda.loss, cuda.logProbs, cuda.entropy, cuda.metrics,
                    label);
            final String[] names = {"hidden states", "weight", "bias"};
            for (int i = 0; i < 3; i++) {
                final double scale = PolicyLossModuleTest.maxAbs(cpu.direct[i]);
                assertTrue(scale > 0, label + ": a zero " + names[i] + " gradient compares nothing");
                // The chunk's logit gradient one rounding of its dtype apart, then the same CPU GEMMs.
                final double relative = type == ScalarType.BFloat16 ? 1.6e-2 : 1e-5;
                final double absolute = (type == ScalarType.BFloat16 ? 4e-3 : 1e-6) * scale;
                assertClose(cpu.direct[i], cuda.direct[i], relative, absolute, label + " " + names[i] + " gradient, backward()");
                assertClose(cpu.graph[i], cuda.graph[i], relative, absolute, label + " " + names[i] + " gradient, loss().backward()");
                assertClose(cpu.direct[i], cpu.graph[i], relative, absolute, label + " " + names[i] + " gradient, the two paths");
            }
        }
        cases++;
        System.out.printf("case %s: %.0f ms%n", label, (System.nanoTime() - start) / 1e6);
    }

    // ---- Advantages -------------------------------------------------------------------------------

    private static void advantages() {
        final long start = System.nanoTime();
        // Three groups of four; the last all equal (exactly 0 on both paths).
        final float[] rewardValues = {1, 0, 0.5f, 1, 0.25f, 0, 1, 0.75f, 0.5f, 0.5f, 0.5f, 0.5f};
        final long[] idValues = {2, 0, 1, 0, 2, 1, 1, 0, 2, 0, 1, 2};
        try (Tensor rewards = Tensor.create(rewardValues); Tensor ids = Tensor.create(idValues)) {
            for (AdvantageMode mode : AdvantageMode.values()) {
                try (Tensor cpu = Advantages.group(rewards, 4, mode); Tensor cuda = emulated(() -> Advantages.group(rewards, 4, mode))) {
                    assertClose(cpu, cuda, VALUE_RELATIVE, VALUE_ABSOLUTE, "group advantages " + mode);
                    assertEquals(0f, cuda.data_ptr_float().get(11), "an all-equal group on CUDA: exactly 0");
                }
                try (Tensor cpu = Advantages.groupByIds(rewards, ids, mode, 1e-6);
                        Tensor cuda = emulated(() -> Advantages.groupByIds(rewards, ids, mode, 1e-6))) {
                    assertClose(cpu, cuda, VALUE_RELATIVE, VALUE_ABSOLUTE, "group advantages by id " + mode);
                }
                checks += 3;
            }
        }
        final Batch batch = new Batch(41, 5, 8, 3, 0);
        try (Tensor rewards = torch.randn(5, 8); Tensor values = torch.randn(5, 8); Tensor mask = batch.mask();
                Advantages.Gae cpu = Advantages.gae(rewards, values, mask, 0.99, 0.95);
                Advantages.Gae cuda = emulated(() -> Advantages.gae(rewards, values, mask, 0.99, 0.95));
                Advantages.Gae cpuUnmasked = Advantages.gae(rewards, values, null, 1.0, 1.0);
                Advantages.Gae cudaUnmasked = emulated(() -> Advantages.gae(rewards, values, null, 1.0, 1.0))) {
            assertClose(cpu.advantages(), cuda.advantages(), VALUE_RELATIVE, VALUE_ABSOLUTE, "GAE advantages");
            assertClose(cpu.returns(), cuda.returns(), VALUE_RELATIVE, VALUE_ABSOLUTE, "GAE returns");
            assertClose(cpuUnmasked.advantages(), cudaUnmasked.advantages(), VALUE_RELATIVE, VALUE_ABSOLUTE, "GAE advantages, no mask");
            assertClose(cpuUnmasked.returns(), cudaUnmasked.returns(), VALUE_RELATIVE, VALUE_ABSOLUTE, "GAE returns, no mask");
            checks += 4;
        }
        cases++;
        System.out.printf("case advantages: %.0f ms%n", (System.nanoTime() - start) / 1e6);
    }

    // ---- Log-probs without a loss --------------------------------------------------------------------

    private static void tokenLogProbs() {
        final long start = System.nanoTime();
        final Batch batch = new Batch(45, 3, 4, 999, 0.2);
        for (ScalarType type : new ScalarType[] {ScalarType.Float, ScalarType.BFloat16}) {
            try (Inputs padded = new Inputs(batch, Layout.PADDED, false); Tensor logits = padded.leaf(type);
                    Tensor flatLogits = logits.reshape(12, 999); Tensor flatTargets = padded.targets.reshape(12)) {
                for (double tau : new double[] {1.0, 0.7}) {
                    try (TokenLogProbs cpu = TokenLogProbs.computeWithEntropy(logits, padded.targets, tau);
                            TokenLogProbs cuda = emulated(() -> TokenLogProbs.computeWithEntropy(logits, padded.targets, tau));
                            Tensor cpuPacked = TokenLogProbs.compute(flatLogits, flatTargets, tau);
                            Tensor cudaPacked = emulated(() -> TokenLogProbs.compute(flatLogits, flatTargets, tau))) {
                        final String what = "TokenLogProbs " + type + " tau " + tau;
                        assertClose(cpu.logProbs(), cuda.logProbs(), VALUE_RELATIVE, VALUE_ABSOLUTE, what + " log-probs");
                        assertClose(cpu.entropy(), cuda.entropy(), VALUE_RELATIVE, VALUE_ABSOLUTE, what + " entropy");
                        assertClose(cpuPacked, cudaPacked, VALUE_RELATIVE, VALUE_ABSOLUTE, what + " packed");
                    }
                }
                // Bad data found by the CUDA kernel, reported as on the CPU.
                try (Tensor targets = padded.targets.clone()) {
                    targets.data_ptr_long().put(5, batch.v);
                    badOnBoth("TokenLogProbs target id", () -> TokenLogProbs.compute(logits, targets).close(), "targets[1, 1] = " + batch.v);
                }
                try (Tensor poisoned = logits.detach().clone()) {
                    if (type == ScalarType.Float) {
                        poisoned.data_ptr_float().put(999 * 6 + 3, Float.NaN);
                        final IllegalArgumentException e = badOnBoth("TokenLogProbs NaN logits",
                                () -> TokenLogProbs.compute(poisoned, padded.targets).close(), "logits[1, 2, :]");
                        assertInstanceOf(NonFiniteDataException.class, e, "NaN: divergence on the CPU");
                        assertInstanceOf(NonFiniteDataException.class,
                                emulated(() -> strict(() -> assertThrows(IllegalArgumentException.class,
                                        () -> TokenLogProbs.compute(poisoned, padded.targets)))),
                                "NaN: divergence on CUDA");
                        checks += 2;
                    }
                }
            }
        }
        cases++;
        System.out.printf("case token log-probs: %.0f ms%n", (System.nanoTime() - start) / 1e6);
    }

    // ---- Bad data -----------------------------------------------------------------------------------

    private static void badData() {
        final long start = System.nanoTime();
        final PolicyLoss grpo = PolicyLoss.grpo().kl(0.05, KlEstimator.K3).entropyCoefficient(0.01).build();
        final Batch batch = new Batch(51, 3, 3, 100, 0.2);
        try (Inputs padded = new Inputs(batch, Layout.PADDED, false); Tensor logits = padded.leaf(ScalarType.Float)) {
            // A token id out of range: the CPU path finds it in Java before any kernel (aminmax),
            // the CUDA path skips that host round trip and the forward kernel reports it.
            for (long bad : new long[] {batch.v, -1}) {
                try (Tensor targets = padded.targets.clone()) {
                    targets.data_ptr_long().put(7, bad);
                    final LossInput in = LossInput.builder().logits(logits).targets(targets).mask(padded.mask).oldLogProbs(padded.old)
                            .refLogProbs(padded.ref).advantages(padded.advantages).build();
                    final IllegalArgumentException cpu = badOnBoth("target id " + bad, () -> grpo.compute(in).close(),
                            "targets[2, 1] = " + bad);
                    assertTrue(cpu.getMessage().contains("targets must be token ids in [0, " + batch.v + ")"), cpu.getMessage());
                }
            }
            // NaN in a logits row (checked by default): both name the row.
            try (Tensor poisoned = logits.detach().clone()) {
                poisoned.data_ptr_float().put(17, Float.NaN);
                final LossInput in = LossInput.builder().logits(poisoned).targets(padded.targets).mask(padded.mask)
                        .oldLogProbs(padded.old).refLogProbs(padded.ref).advantages(padded.advantages).build();
                badOnBoth("NaN logits", () -> grpo.compute(in).close(), "logits[0, ");
                // With checking off NaN flows into the loss on both paths, with no exception.
                final PolicyLoss unchecked = PolicyLoss.grpo().checkFinite(false).build();
                for (boolean cuda : new boolean[] {false, true}) {
                    try (LossResult result = onDevice(cuda, () -> unchecked.compute(in))) {
                        assertTrue(Float.isNaN(result.lossValue().item_float()), "unchecked NaN, cuda=" + cuda);
                    }
                }
            }
            // Counted per-token and per-response inputs: Inf old log-prob, NaN reference log-prob, NaN advantage.
            try (Tensor old = padded.old.clone(); Tensor ref = padded.ref.clone(); Tensor advantages = padded.advantages.clone()) {
                old.data_ptr_float().put(0, Float.POSITIVE_INFINITY);
                badOnBoth("Inf old log-prob", () -> grpo.compute(LossInput.builder().logits(logits).targets(padded.targets).mask(padded.mask)
                        .oldLogProbs(old).refLogProbs(padded.ref).advantages(padded.advantages).build()).close(), "oldLogProbs[0, 0] = Infinity");
                ref.data_ptr_float().put(0, Float.NaN);
                badOnBoth("NaN reference log-prob", () -> grpo.compute(LossInput.builder().logits(logits).targets(padded.targets)
                        .mask(padded.mask).oldLogProbs(padded.old).refLogProbs(ref).advantages(padded.advantages).build()).close(),
                        "refLogProbs[0, 0] = NaN");
                advantages.data_ptr_float().put(2, Float.NaN);
                badOnBoth("NaN advantage", () -> grpo.compute(LossInput.builder().logits(logits).targets(padded.targets).mask(padded.mask)
                        .oldLogProbs(padded.old).refLogProbs(padded.ref).advantages(advantages).build()).close(), "advantages[2] = NaN");
            }
            // NaN in the engine's log-probs, named by both paths.
            try (Tensor rollout = padded.old.clone()) {
                rollout.data_ptr_float().put(0, Float.NaN);
                badOnBoth("NaN rollout log-prob", () -> grpo.compute(LossInput.builder().logits(logits).targets(padded.targets)
                        .mask(padded.mask).oldLogProbs(padded.old).refLogProbs(padded.ref).rolloutLogProbs(rollout)
                        .advantages(padded.advantages).build()).close(), "rolloutLogProbs[0, 0] = NaN");
            }
        }
        // Packed offsets that decrease, and offsets that do not end at N.
        try (Tensor logits = torch.randn(6, 10); Tensor targets = torch.zeros(new long[] {6}, new TensorOptions(ScalarType.Long));
                Tensor advantages = torch.randn(3)) {
            for (long[] offsetValues : new long[][] {{0, 4, 3, 6}, {0, 2, 4, 5}}) {
                try (Tensor offsets = Tensor.create(offsetValues)) {
                    final LossInput in = LossInput.builder().logits(logits).targets(targets).offsets(offsets).advantages(advantages).build();
                    badOnBoth("offsets " + Arrays.toString(offsetValues), () -> PolicyLoss.grpo().build().compute(in).close(),
                            offsetValues[3] == 6 ? "offsets[2] = 3 breaks" : "offsets[3] = 5 breaks");
                }
            }
        }
        // Advantages: NaN reward, NaN value, an RLOO group of one.
        try (Tensor rewards = Tensor.create(1f, 0f, Float.NaN, 1f)) {
            badOnBoth("NaN reward", () -> Advantages.group(rewards, 2, AdvantageMode.MEAN_STD).close(), "rewards[2] = NaN");
        }
        try (Tensor rewards = torch.zeros(2, 4); Tensor values = torch.zeros(2, 4)) {
            values.data_ptr_float().put(5, Float.NaN);
            badOnBoth("NaN value", () -> Advantages.gae(rewards, values, null, 0.9, 0.9).close(), "values[1, 1] = NaN");
        }
        try (Tensor rewards = Tensor.create(1f, 0f, 0.5f); Tensor ids = Tensor.create(0L, 0L, 1L)) {
            badOnBoth("RLOO group of one", () -> Advantages.groupByIds(rewards, ids, AdvantageMode.RLOO, 1e-6).close(),
                    "RLOO needs at least 2 responses per group");
        }
        // The device's error record was cleared by each report: a good call after them is clean.
        final Batch clean = new Batch(52, 2, 4, 50, 0.2);
        try (Inputs inputs = new Inputs(clean, Layout.PADDED, false); Tensor logits = inputs.leaf(ScalarType.Float);
                LossResult cpu = grpo.compute(inputs.input(logits, false, false));
                LossResult cuda = emulated(() -> grpo.compute(inputs.input(logits, false, false)))) {
            assertClose(cpu.lossValue(), cuda.lossValue(), VALUE_RELATIVE, VALUE_ABSOLUTE, "a clean call after the errors");
            checks++;
        }
        // Logits on neither the CPU nor a GPU: the message lists what this library runs on.
        try (org.bytedeco.pytorch.Device meta = new org.bytedeco.pytorch.Device("meta");
                TensorOptions options = new TensorOptions(meta);
                Tensor logits = torch.empty(new long[] {2, 3, 5}, options, new MemoryFormatOptional());
                Tensor targets = torch.zeros(new long[] {2, 3}, new TensorOptions(ScalarType.Long)); Tensor advantages = torch.randn(2)) {
            final LossInput in = LossInput.builder().logits(logits).targets(targets).advantages(advantages).build();
            final IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> grpo.compute(in).close());
            assertTrue(e.getMessage().contains("runs on cpu and cuda"), e.getMessage());
            checks++;
        }
        cases++;
        System.out.printf("case bad data: %.0f ms%n", (System.nanoTime() - start) / 1e6);
    }

    /**
     * The same bad call on both paths: an IllegalArgumentException naming {@code offender} each
     * time, with the same message on both (the Java layer words the CPU and the CUDA kernels'
     * findings alike); on the CUDA path reported by gspo4j_cuda_check_error ("a CUDA kernel
     * found", the cause's native message), with the CPU path's status when the CPU's comes from
     * native code too. Returns the CPU path's exception.
     */
    private static IllegalArgumentException badOnBoth(String what, Executable call, String offender) {
        final IllegalArgumentException cpu = assertThrows(IllegalArgumentException.class, call, what + " on the CPU");
        final IllegalArgumentException cuda = emulated(() -> strict(() -> assertThrows(IllegalArgumentException.class, call,
                what + " on CUDA, strict")));
        // Deferred (the default): the call itself (checks before any kernel, Advantages) or, at the
        // latest, the next gspo4j call on the device reports it, in the same words.
        final IllegalArgumentException deferred = emulated(() -> assertThrows(IllegalArgumentException.class, () -> {
            call.execute();
            CudaChecks.beforeCall(0);
        }, what + " on CUDA, deferred"));
        assertTrue(deferred.getMessage().equals(cpu.getMessage()) || deferred.getMessage().equals(cpu.getMessage() + CudaChecks.LATER),
                what + ": deferred message \"" + deferred.getMessage() + "\"");
        assertFalse(DeferredChecks.pending(0), what + ": nothing left pending");
        assertTrue(cuda.getCause() != null && cuda.getCause().getMessage().startsWith("a CUDA kernel found "),
                what + " on CUDA: " + cuda.getCause());
        assertEquals(cpu.getMessage(), cuda.getMessage(), what + ": the same message on both paths");
        for (IllegalArgumentException e : new IllegalArgumentException[] {cpu, cuda}) {
            if (!e.getMessage().contains(offender)) {
                fail(what + ": \"" + e.getMessage() + "\" should name " + offender);
            }
        }
        final Gspo4jException cudaStatus = assertInstanceOf(Gspo4jException.class, cuda.getCause(), what + " on CUDA: the native status");
        if (cpu.getCause() instanceof Gspo4jException cpuStatus) {
            assertEquals(cpuStatus.status(), cudaStatus.status(), what + ": the same status on both paths");
        } else {
            assertEquals(Gspo4jException.Status.OUT_OF_RANGE, cudaStatus.status(), what + " on CUDA");
        }
        checks += 6;
        return cpu;
    }

    /**
     * Issue 14 item 2: by default a CUDA loss call does not wait for its data checks. What its
     * kernels found is thrown at the first read of its result, or at the next gspo4j call on the
     * device (the message then says so), and only once; strict mode throws in the call.
     */
    private static void deferredChecks() {
        final long start = System.nanoTime();
        final PolicyLoss grpo = PolicyLoss.grpo().entropyCoefficient(0.01).build();
        final Batch batch = new Batch(61, 3, 3, 100, 0.2);
        try (Inputs padded = new Inputs(batch, Layout.PADDED, false); Tensor logits = padded.leaf(ScalarType.Float);
                Tensor poisoned = logits.detach().clone(); Tensor halfMask = padded.mask.clone()) {
            poisoned.data_ptr_float().put(17, Float.NaN);
            poisoned.set_requires_grad(true);
            halfMask.data_ptr_float().put(4, 0.5f);
            final LossInput nan = LossInput.builder().logits(poisoned).targets(padded.targets).mask(padded.mask).oldLogProbs(padded.old)
                    .advantages(padded.advantages).build();
            final LossInput badMask = LossInput.builder().logits(logits).targets(padded.targets).mask(halfMask)
                    .oldLogProbs(padded.old).advantages(padded.advantages).build();
            final LossInput clean = padded.input(logits, false, false);
            final String nanMessage = assertThrows(NonFiniteDataException.class, () -> grpo.compute(nan).close()).getMessage();
            final String maskMessage = assertThrows(IllegalArgumentException.class, () -> grpo.compute(badMask).close()).getMessage();
            emulated(() -> {
                // The call returns; the first read of its result throws the CPU's exception, once.
                for (LossInput bad : new LossInput[] {nan, badMask}) {
                    final String want = bad == nan ? nanMessage : maskMessage;
                    try (LossResult r = grpo.compute(bad)) {
                        final IllegalArgumentException e = assertThrows(IllegalArgumentException.class, r::lossValue);
                        assertEquals(want, e.getMessage(), "read of the result");
                        assertEquals(bad == nan, e instanceof NonFiniteDataException, "the exception type");
                        assertFalse(DeferredChecks.pending(0));
                        r.lossValue(); // reported once
                    }
                    // Closed unread: the next call reports it, saying it came from an earlier call.
                    grpo.compute(bad).close();
                    assertTrue(DeferredChecks.pending(0));
                    final IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> grpo.compute(clean).close());
                    assertEquals(want + CudaChecks.LATER, e.getMessage(), "the next call");
                    try (LossResult r = grpo.compute(clean)) {
                        assertTrue(Float.isFinite(r.lossValue().item_float()), "a clean call after it");
                    }
                    // The backward reads first: no gradient from bad data, on either path.
                    try (LossResult r = grpo.compute(bad)) {
                        assertThrows(IllegalArgumentException.class, r::backward);
                    }
                    final Tensor leaf = bad == nan ? poisoned : logits;
                    try (Tensor g = leaf.mutable_grad()) {
                        g.reset();
                    }
                    try (LossResult r = grpo.compute(bad); Tensor l = r.loss()) {
                        final RuntimeException e2 = assertThrows(RuntimeException.class,
                                () -> l.backward(new Tensor(), new BoolOptional(false), false, new TensorArrayRefOptional()));
                        assertTrue(e2.getMessage().contains(bad == nan ? "holds NaN or Inf" : "must hold only 0 and 1"), e2.getMessage());
                    }
                    try (Tensor g = leaf.grad()) {
                        assertTrue(g.isNull() || !g.defined(), "no gradient reached the logits");
                    }
                    checks += 9;
                }
                // Strict mode: the call itself throws.
                strict(() -> assertThrows(NonFiniteDataException.class, () -> grpo.compute(nan).close()));
                assertFalse(DeferredChecks.pending(0));
                checks += 2;
                return null;
            });
        }
        cases++;
        System.out.printf("case deferred checks: %.0f ms%n", (System.nanoTime() - start) / 1e6);
    }

    /** Elementwise |got - want| <= relative * |want| + absolute. */
    /** The forward's values of the two paths: loss, log-probs, entropy and metrics, within rounding. */
    private static void assertForwardClose(Tensor loss, Tensor logProbs, Tensor entropy, Tensor metrics, Tensor cudaLoss,
            Tensor cudaLogProbs, Tensor cudaEntropy, Tensor cudaMetrics, String label) {
        assertClose(loss, cudaLoss, VALUE_RELATIVE, VALUE_ABSOLUTE, label + " loss");
        assertClose(logProbs, cudaLogProbs, VALUE_RELATIVE, 1e-5, label + " log-probs");
        assertClose(entropy, cudaEntropy, VALUE_RELATIVE, 1e-5, label + " entropy");
        assertClose(metrics, cudaMetrics, VALUE_RELATIVE, VALUE_ABSOLUTE, label + " metrics");
    }

    private static void assertClose(Tensor want, Tensor got, double relative, double absolute, String what) {
        PolicyLossModuleTest.assertClose(want, got, relative, absolute, what);
        checks++;
    }
}
