package dev.gspo4j.internal;

import static dev.gspo4j.internal.GraphTokens.keep;

import dev.gspo4j.Gspo4jException;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicReference;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.bytedeco.javacpp.Pointer;
import org.bytedeco.pytorch.AutoGradMode;
import org.bytedeco.pytorch.BoolOptional;
import org.bytedeco.pytorch.GradMode;
import org.bytedeco.pytorch.InferenceMode;
import org.bytedeco.pytorch.PointerConsumer;
import org.bytedeco.pytorch.Scalar;
import org.bytedeco.pytorch.ScalarTypeOptional;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorArrayRefOptional;
import org.bytedeco.pytorch.TensorBase;
import org.bytedeco.pytorch.TensorOptions;
import org.bytedeco.pytorch.TensorTensorHook;
import org.bytedeco.pytorch.VoidTensorHook;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * The fused linear path: the per-token log-probs of the logits {@code hidden @ weight^T + bias}
 * computed one chunk of token rows at a time, and the state and graph of its backward. The logits
 * exist only as one {@code [chunkRows, V]} buffer in the weight's dtype.
 *
 * <p>Two passes, for every objective. The forward ({@link #forward}) fills each chunk of the
 * buffer by libtorch's matrix product ({@code addmm}/{@code mm} with {@code out=}: the CPU GEMM or
 * cuBLAS) and runs the fused forward kernel over it (lse, lp, entropy per row). The policy loss
 * then runs once over all tokens, exactly as for logits, so its per-token coefficients
 * {@code dLoss/dlp} and {@code dLoss/dH} see every response whole: sequence ratios, any
 * aggregation, token selection and weights need nothing of the chunking. The backward recomputes
 * each chunk's logits into the buffer, lets the fused backward kernel overwrite them in place with
 * their gradient {@code g}, and then {@code grad_hidden[chunk] = g @ W},
 * {@code grad_W += g^T @ h[chunk]}, {@code grad_b += sum_rows g}: four GEMMs of N x H x V in all,
 * against three for an unfused lm_head (the recompute is the price of never holding [N, V]). The
 * forward's buffer stays alive until the first backward ({@link SavedChunk}), which takes it and
 * starts with the last chunk, whose logits are still in it: that chunk skips its recompute (one
 * chunk of C fewer; none at all when everything fits one chunk), and the backward allocates no
 * buffer of its own. Memory between forward and backward: that one buffer, the budget.
 *
 * <p>The graph follows {@link FusedLogProbs}: each input that requires grad (hidden states,
 * weight, bias) is attached through a storage-less zero tensor and two hooks, the first of which
 * to run computes all gradients (one pass over the chunks) scaled by the upstream gradient a hook
 * on the float32 node recorded; the second drops our reference before the input's own node sees
 * it (AccumulateGrad then steals it instead of copying). Lifetime: the same two tokens with
 * deleters ({@code one}: the graph's last backward; {@code anchor}: the graph dropped).
 */
public final class FusedLinear implements LossGraph {

    private static final Map<Long, FusedLinear> LIVE_GRAPHS = new ConcurrentHashMap<>();
    private static final Map<Long, FusedLinear> BY_ONE = new ConcurrentHashMap<>();

    private static final PointerConsumer GRAPH_DROPPED = Unscoped.call(() -> new PointerConsumer() {
        @Override
        public void call(Pointer data) {
            // The entry goes before the memory: once freed, its address may serve another graph's token.
            final FusedLinear state = LIVE_GRAPHS.remove(data.address());
            GraphTokens.freeTokenMemory(data);
            if (state != null) {
                state.close();
            }
        }
    });

    private static final PointerConsumer ONE_RELEASED = Unscoped.call(() -> new PointerConsumer() {
        @Override
        public void call(Pointer data) {
            final FusedLinear state = BY_ONE.remove(data.address());
            GraphTokens.freeTokenMemory(data);
            if (state != null) {
                state.lastBackward = true;
            }
        }
    });


    private static final int HIDDEN = 0;
    private static final int WEIGHT = 1;
    private static final int BIAS = 2;
    private static final String[] NAMES = {"the hidden states", "the weight", "the bias"};

    // The caller's tensors (the graph attaches to those that required grad at compute time; null
    // entries: absent or not requiring grad) and detached aliases for the versions and metadata.
    private final Tensor[] callers = new Tensor[3];
    private final Tensor[] versionAliases = new Tensor[3];
    private final long[] versions = new long[3];
    private final long[][] shapes = new long[3][];
    // What the GEMMs read: [N, H] rows of the hidden states, the weight [V, H], the bias [V].
    private final Tensor rows;
    private final Tensor weight;
    private final Tensor bias;
    private final long chunkRows;
    private final Tensor targets;
    private final long targetsVersion;
    private final double temperature;
    private final Tensor lse;
    private final Tensor entropy;
    private final long entropyVersion;
    private final Tensor gradLogprob;
    private final Tensor gradEntropy;
    private final AtomicBoolean gradientSent;
    private final SavedChunk savedChunk; // shared by the copies; null: none kept
    private final AtomicBoolean directSent;
    private boolean directGraph;
    // Graph-only state, set by attach().
    private final List<Object> hooks = new ArrayList<>(); // reachable as long as the graph may call them
    private long anchorAddress;
    private long oneAddress;
    private volatile boolean lastBackward;
    private volatile Tensor upstream;
    private volatile RuntimeException hookFailure;
    // Gradients of the running backward, computed by the first gradient hook; each is dropped by
    // its input's release hook. pendingCount: branches whose release hook has not run yet.
    private final Tensor[] pending = new Tensor[3];
    private boolean computed;
    private int pendingCount;
    private int attachedCount;
    private boolean closed;

    /**
     * Takes its own references to every tensor (the caller keeps and closes its own).
     *
     * @param hidden the caller's hidden states; rows their {@code [N, H]} view or copy
     * @param bias the lm_head's bias or null
     * @param targets int64 ids, contiguous over the N rows
     * @param lse float64 {@code [N]}, entropy, gradLogprob and gradEntropy float32 over the N rows
     *     (gradEntropy null without an entropy term)
     */
    public FusedLinear(Tensor hidden, Tensor rows, Tensor weight, Tensor bias, long chunkRows, Tensor targets, double temperature,
            Tensor lse, Tensor entropy, Tensor gradLogprob, Tensor gradEntropy, SavedChunk savedChunk) {
        final Tensor[] given = {hidden, weight, bias};
        for (int i = 0; i < 3; i++) {
            if (given[i] != null) {
                versionAliases[i] = given[i].detach();
                versions[i] = given[i]._version();
                shapes[i] = Tensors.shape(given[i]);
                if (given[i].requires_grad()) {
                    callers[i] = new Tensor(given[i]);
                }
            }
        }
        this.rows = new Tensor(rows);
        this.weight = versionAliases[WEIGHT].detach();
        this.bias = bias == null ? null : versionAliases[BIAS].detach();
        this.chunkRows = chunkRows;
        this.targets = targets.detach();
        this.targetsVersion = targets._version();
        this.temperature = temperature;
        this.lse = new Tensor(lse);
        this.entropy = entropy.detach();
        this.entropyVersion = entropy._version();
        this.gradLogprob = new Tensor(gradLogprob);
        this.gradEntropy = gradEntropy == null ? null : new Tensor(gradEntropy);
        this.gradientSent = new AtomicBoolean();
        this.directSent = new AtomicBoolean();
        this.savedChunk = savedChunk;
    }

    private FusedLinear(FusedLinear other) {
        for (int i = 0; i < 3; i++) {
            callers[i] = other.callers[i] == null ? null : new Tensor(other.callers[i]);
            versionAliases[i] = other.versionAliases[i] == null ? null : new Tensor(other.versionAliases[i]);
            versions[i] = other.versions[i];
            shapes[i] = other.shapes[i];
        }
        this.rows = new Tensor(other.rows);
        this.weight = new Tensor(other.weight);
        this.bias = other.bias == null ? null : new Tensor(other.bias);
        this.chunkRows = other.chunkRows;
        this.targets = new Tensor(other.targets);
        this.targetsVersion = other.targetsVersion;
        this.temperature = other.temperature;
        this.lse = new Tensor(other.lse);
        this.entropy = new Tensor(other.entropy);
        this.entropyVersion = other.entropyVersion;
        this.gradLogprob = new Tensor(other.gradLogprob);
        this.gradEntropy = other.gradEntropy == null ? null : new Tensor(other.gradEntropy);
        this.gradientSent = other.gradientSent;
        this.directSent = other.directSent;
        this.savedChunk = other.savedChunk;
    }

    /**
     * The forward's chunk buffer, holding the last chunk's logits: taken once, by the first
     * backward; released by close() if no backward takes it.
     */
    public static final class SavedChunk implements AutoCloseable {
        private final AtomicReference<Tensor> buffer;

        SavedChunk(Tensor buffer) {
            this.buffer = new AtomicReference<>(buffer);
        }

        /** The buffer, now the caller's to close; null once taken or closed. */
        Tensor take() {
            return buffer.getAndSet(null);
        }

        @Override
        public void close() {
            final Tensor t = buffer.getAndSet(null);
            if (t != null) {
                t.close();
            }
        }
    }

    /**
     * The forward over {@code rows @ weight^T + bias}, chunk by chunk into one reused buffer: per
     * token row the log-prob, the log-sum-exp and the entropy, as the fused forward kernel gives
     * them for logits. A NaN/Inf or bad id the kernel reports names the row in the whole batch.
     *
     * @param rows {@code [N, H]}; weight {@code [V, H]}; bias {@code [V]} or null; one dtype
     * @param targets int64, contiguous over the N rows; logProbs, entropy float32 and lse float64 likewise
     * @param keepLastChunk whether to keep the buffer with the last chunk's logits for the backward
     * @return the kept buffer (the caller's to hand to the backward's state or close), or null
     */
    public static SavedChunk forward(Tensor rows, Tensor weight, Tensor bias, long chunkRows, Tensor targets, double temperature,
            boolean checkFinite, Tensor logProbs, Tensor lse, Tensor entropy, boolean keepLastChunk) {
        final long tokens = rows.size(0);
        if (tokens == 0) {
            return null;
        }
        final Device device = Tensors.device(rows);
        final Pointer stream = Tensors.stream(rows);
        final LogitsDtype dtype = Tensors.logitsDtype(weight.scalar_type());
        final long vocab = weight.size(0);
        // Detached: libtorch refuses out= arguments to ops on tensors that require grad.
        final Tensor buffer = Tensors.empty(new long[] {Math.min(chunkRows, tokens), vocab}, weight.scalar_type().intern(), weight);
        boolean kept = false;
        try (Tensor weightData = weight.detach(); Tensor weightT = weightData.t(); Tensor biasData = bias == null ? null : bias.detach();
                Tensor hiddenRows = rows.detach(); Tensor y = targets.view(-1); Tensor lp = logProbs.view(-1); Tensor h = entropy.view(-1)) {
            for (long start = 0; start < tokens; start += chunkRows) {
                final long n = Math.min(chunkRows, tokens - start);
                final long first = start;
                try (Tensor logits = buffer.narrow(0, 0, n); Tensor hiddenChunk = hiddenRows.narrow(0, start, n);
                        Tensor yChunk = y.narrow(0, start, n); Tensor lpChunk = lp.narrow(0, start, n);
                        Tensor lseChunk = lse.narrow(0, start, n); Tensor hChunk = h.narrow(0, start, n)) {
                    logitsInto(logits, hiddenChunk, weightT, biasData);
                    inWholeBatch(first, () -> {
                        Kernels.tokenLogProbForward(device, stream, LogitsView.packed(logits.data_ptr(), dtype, n, vocab),
                                Tensors.longs(yChunk), temperature, checkFinite, Tensors.floats(lpChunk), Tensors.doubles(lseChunk),
                                Tensors.floats(hChunk));
                        // On a GPU the kernel reports what it found later: ask now, while the chunk's first row is known.
                        Kernels.reportDataErrors(device, stream);
                    });
                }
            }
            final SavedChunk saved = keepLastChunk ? new SavedChunk(buffer) : null;
            kept = saved != null;
            return saved;
        } finally {
            if (!kept) {
                buffer.close();
            }
        }
    }

    private static void logitsInto(Tensor out, Tensor hiddenChunk, Tensor weightT, Tensor bias) {
        if (bias == null) {
            torch.mm_out(out, hiddenChunk, weightT);
        } else {
            torch.addmm_out(out, bias, hiddenChunk, weightT);
        }
    }

    private static final Pattern CHUNK_ROW = Pattern.compile("(logits row |targets\\[)(\\d+)");

    // The kernels number rows within the chunk; the caller's messages number them in the batch.
    private static void inWholeBatch(long first, Runnable call) {
        try {
            call.run();
        } catch (Gspo4jException e) {
            final Matcher m = CHUNK_ROW.matcher(e.getMessage());
            if (first == 0 || !m.find()) {
                throw e;
            }
            final String message = e.getMessage().substring(0, m.start(2)) + (Long.parseLong(m.group(2)) + first)
                    + e.getMessage().substring(m.end(2)).replaceFirst(" \\(batch \\d+, position \\d+\\)", "");
            final Gspo4jException shifted = new Gspo4jException(e.status().code(), message);
            shifted.initCause(e);
            throw shifted;
        }
    }

    @Override
    public FusedLinear copy() {
        return Unscoped.call(() -> new FusedLinear(this));
    }

    @Override
    public RuntimeException hookFailure() {
        return hookFailure;
    }

    @Override
    public boolean gradientSent() {
        return gradientSent.get();
    }

    @Override
    public void checkUnchanged() {
        for (int i = 0; i < 3; i++) {
            if (versionAliases[i] == null) {
                continue;
            }
            final Tensor caller = callers[i] != null ? callers[i] : versionAliases[i];
            if (!Arrays.equals(Tensors.shape(caller), shapes[i])) {
                throw new IllegalStateException(NAMES[i] + "' shape changed after compute() (" + Arrays.toString(shapes[i])
                        + " then, " + Arrays.toString(Tensors.shape(caller)) + " now): the backward would not match it. Call "
                        + "compute() after the change");
            }
            requireVersion(versionAliases[i], versions[i], NAMES[i]);
        }
        requireVersion(targets, targetsVersion, "the targets");
        if (gradEntropy != null) {
            requireVersion(entropy, entropyVersion, "the entropy tensor (LossResult.entropy())");
        }
    }

    private static void requireVersion(Tensor t, long recorded, String name) {
        final long now = t._version();
        if (now != recorded) {
            throw new IllegalStateException(name + ", needed for the gradient computation, were modified by an in-place "
                    + "operation after compute(): version " + recorded + " at compute(), " + now + " now (an optimizer step "
                    + "before the backward?). The backward would read the new values and give a wrong gradient. Clone the "
                    + "tensor before modifying it, or call compute() after the change");
        }
    }

    /**
     * The gradients of {@code scale * loss} for the inputs the graph attached (null elsewhere):
     * hidden states in their shape, the weight {@code [V, H]}, the bias {@code [V]}, each in its
     * dtype. One pass over the chunks: recompute, gradient in place, three GEMMs.
     *
     * @param scale a 0-dim float32 tensor on the device, or null for 1
     */
    Tensor[] gradients(Tensor scale, boolean[] wanted) {
        checkUnchanged();
        final Tensor[] out = new Tensor[3];
        final Tensor gLp = scale == null ? new Tensor(gradLogprob) : gradLogprob.mul(scale);
        final Tensor gH = gradEntropy == null ? null : scale == null ? new Tensor(gradEntropy) : gradEntropy.mul(scale);
        boolean done = false;
        try {
            final long tokens = rows.size(0);
            final long vocab = weight.size(0);
            final long width = weight.size(1);
            final ScalarType type = weight.scalar_type().intern();
            if (wanted[HIDDEN]) {
                out[HIDDEN] = Tensors.empty(new long[] {tokens, width}, type, weight);
            }
            if (wanted[WEIGHT]) {
                out[WEIGHT] = tokens == 0 ? zeros(new long[] {vocab, width}, type) : Tensors.empty(new long[] {vocab, width}, type, weight);
            }
            if (wanted[BIAS]) {
                out[BIAS] = tokens == 0 ? zeros(new long[] {vocab}, type) : Tensors.empty(new long[] {vocab}, type, weight);
            }
            if (tokens > 0) {
                backwardChunks(gLp, gH, out);
            }
            if (out[HIDDEN] != null) {
                final Tensor flat = out[HIDDEN];
                out[HIDDEN] = flat.view(shapes[HIDDEN]);
                flat.close();
            }
            done = true;
            return out;
        } catch (Gspo4jException e) {
            throw FusedLogProbs.backwardFailure(e);
        } finally {
            gLp.close();
            if (gH != null) {
                gH.close();
            }
            if (!done) {
                for (Tensor t : out) {
                    if (t != null) {
                        t.close();
                    }
                }
            }
        }
    }

    private Tensor zeros(long[] shape, ScalarType type) {
        final Tensor t = Tensors.empty(shape, type, weight);
        t.zero_();
        return t;
    }

    private void backwardChunks(Tensor gLp, Tensor gH, Tensor[] out) {
        final long tokens = rows.size(0);
        final long vocab = weight.size(0);
        final Device device = Tensors.device(rows);
        final Pointer stream = Tensors.stream(rows);
        final LogitsDtype dtype = Tensors.logitsDtype(weight.scalar_type());
        // The first backward takes the forward's buffer: the last chunk's logits are in it already.
        final Tensor taken = savedChunk == null ? null : savedChunk.take();
        final long chunks = (tokens + chunkRows - 1) / chunkRows;
        try (Tensor buffer = taken != null ? taken
                : Tensors.empty(new long[] {Math.min(chunkRows, tokens), vocab}, weight.scalar_type().intern(), weight);
                Tensor weightT = weight.t(); Tensor y = targets.view(-1); Tensor h = entropy.view(-1); Tensor gLpFlat = gLp.view(-1);
                Tensor gHFlat = gH == null ? null : gH.view(-1)) {
            for (long index = 0; index < chunks; index++) {
                // With the saved chunk: the last chunk first, then the others in order.
                final boolean saved = taken != null && index == 0;
                final long start = (taken == null ? index : (index + chunks - 1) % chunks) * chunkRows;
                final long n = Math.min(chunkRows, tokens - start);
                try (Tensor logits = buffer.narrow(0, 0, n); Tensor hiddenChunk = rows.narrow(0, start, n);
                        Tensor yChunk = y.narrow(0, start, n); Tensor lseChunk = lse.narrow(0, start, n);
                        Tensor hChunk = h.narrow(0, start, n); Tensor gLpChunk = gLpFlat.narrow(0, start, n);
                        Tensor gHChunk = gHFlat == null ? null : gHFlat.narrow(0, start, n)) {
                    if (!saved) {
                        logitsInto(logits, hiddenChunk, weightT, bias);
                    }
                    // The gradient overwrites the chunk's logits (same rows, same strides).
                    Kernels.tokenLogProbBackward(device, stream, LogitsView.packed(logits.data_ptr(), dtype, n, vocab),
                            Tensors.longs(yChunk), temperature, Tensors.doubles(lseChunk), Tensors.floats(hChunk),
                            Tensors.floats(gLpChunk), Tensors.floats(gHChunk), logits.data_ptr(), n * vocab, vocab);
                    final boolean first = index == 0;
                    if (out[HIDDEN] != null) {
                        try (Tensor gradRows = out[HIDDEN].narrow(0, start, n)) {
                            torch.mm_out(gradRows, logits, weight);
                        }
                    }
                    if (out[WEIGHT] != null) {
                        try (Tensor gT = logits.t()) {
                            if (first) {
                                torch.mm_out(out[WEIGHT], gT, hiddenChunk);
                            } else {
                                out[WEIGHT].addmm_(gT, hiddenChunk);
                            }
                        }
                    }
                    if (out[BIAS] != null) {
                        if (first) {
                            torch.sum_out(out[BIAS], logits, 0);
                        } else {
                            try (Tensor sum = logits.sum(0)) {
                                out[BIAS].add_(sum);
                            }
                        }
                    }
                }
            }
        }
    }

    @Override
    public void backwardInto(Tensor value, double scale) {
        Unscoped.run(() -> backwardIntoUnscoped(value, scale));
    }

    private void backwardIntoUnscoped(Tensor value, double scale) {
        checkUnchanged();
        final FusedLinear graph = copy();
        graph.directGraph = true;
        directSent.set(true);
        final Tensor loss;
        try {
            loss = graph.attach(value);
        } catch (RuntimeException | Error e) {
            graph.close();
            throw e;
        }
        try (Tensor root = loss; TensorOptions base = value.options(); ScalarTypeOptional float32 = new ScalarTypeOptional(ScalarType.Float);
                TensorOptions options = base.dtype(float32); Scalar s = new Scalar(scale);
                Tensor gradient = torch.full(new long[0], s, options); BoolOptional retain = new BoolOptional(false);
                TensorArrayRefOptional inputs = new TensorArrayRefOptional()) {
            root.backward(gradient, retain, false, inputs);
        } catch (RuntimeException e) {
            final RuntimeException cause = graph.hookFailure;
            throw cause != null ? cause : e;
        }
    }

    @Override
    public Tensor attach(Tensor value) {
        return Unscoped.call(() -> attachUnscoped(value));
    }

    private Tensor attachUnscoped(Tensor value) {
        checkUnchanged();
        if (InferenceMode.is_enabled()) {
            throw new IllegalStateException("loss() cannot build its autograd graph in inference mode (c10::InferenceMode): "
                    + "call loss() outside the InferenceMode guard, or use lossValue() for the value");
        }
        final boolean[] attached = new boolean[3];
        for (int i = 0; i < 3; i++) {
            attached[i] = callers[i] != null && callers[i].requires_grad();
            attachedCount += attached[i] ? 1 : 0;
        }
        if (attachedCount == 0) {
            throw new IllegalStateException("neither the hidden states, the weight nor the bias require grad any longer "
                    + "(requires_grad_(false) after compute()): there is nothing to send the gradient to");
        }
        final List<Pointer> made = new ArrayList<>();
        Tensor loss = null;
        boolean built = false;
        try (AutoGradMode gradMode = new AutoGradMode(true); Scalar zeroScalar = new Scalar(0.0);
                TensorOptions base = weight.options(); ScalarTypeOptional float32 = new ScalarTypeOptional(ScalarType.Float);
                TensorOptions options = base.dtype(float32)) {
            final Tensor anchorBase = keep(made, GraphTokens.token(0.0, GRAPH_DROPPED, options, !weight.is_cuda()));
            anchorAddress = anchorBase.data_ptr().address();
            LIVE_GRAPHS.put(anchorAddress, this);
            final Tensor one = keep(made, GraphTokens.token(1.0, ONE_RELEASED, options, !weight.is_cuda()));
            oneAddress = one.data_ptr().address();
            BY_ONE.put(oneAddress, this);
            final Tensor anchor = keep(made, anchorBase.set_requires_grad(true));
            Tensor sum = null;
            for (int i = 0; i < 3; i++) {
                if (!attached[i]) {
                    continue;
                }
                final int branch = i;
                final Tensor caller = callers[i];
                // input -> released (hook: drop our reference) -> alias (hook: the gradient) -> * Z
                final Tensor released = keep(made, caller.alias());
                final VoidTensorHook releaseHook = new VoidTensorHook() {
                    @Override
                    public void call(TensorBase grad) {
                        grad.close();
                        released(branch);
                    }
                };
                hooks.add(releaseHook);
                released.register_hook(releaseHook);
                final Tensor alias = keep(made, released.alias());
                final TensorTensorHook gradientHook = new TensorTensorHook() {
                    @Override
                    public TensorBase call(TensorBase ignored) {
                        ignored.close();
                        return Unscoped.call(() -> sendGradient(branch, attached));
                    }
                };
                hooks.add(gradientHook);
                alias.register_hook(gradientHook);
                final Tensor asFloat = GraphTokens.zeroDot(made, alias, caller);
                sum = sum == null ? asFloat : keep(made, sum.add(asFloat));
            }
            final VoidTensorHook upstreamHook = new VoidTensorHook() {
                @Override
                public void call(TensorBase grad) {
                    final Tensor previous = upstream;
                    upstream = Unscoped.call(() -> new Tensor(grad));
                    grad.close();
                    if (previous != null) {
                        previous.close();
                    }
                    newBackward();
                }
            };
            hooks.add(upstreamHook);
            sum.register_hook(upstreamHook);
            final Tensor guarded = keep(made, sum.mul(one));
            final Tensor keepAlive = keep(made, anchor.mul(zeroScalar));
            final Tensor partial = keep(made, value.add(guarded));
            loss = partial.add(keepAlive);
            built = true;
            return loss;
        } finally {
            for (Pointer p : made) {
                p.close();
            }
            if (!built) {
                if (loss != null) {
                    loss.close();
                }
                close();
            }
        }
    }



    // A backward reached the upstream hook: the gradients are computed afresh (retain_graph).
    private synchronized void newBackward() {
        for (int i = 0; i < 3; i++) {
            if (pending[i] != null) {
                pending[i].close();
                pending[i] = null;
            }
        }
        computed = false;
        pendingCount = attachedCount;
    }

    private Tensor sendGradient(int branch, boolean[] attached) {
        try {
            synchronized (this) {
                if (closed) {
                    throw new IllegalStateException("this loss's graph was released after an earlier failure in its backward; "
                            + "call compute() again");
                }
            }
            if (GradMode.is_enabled()) {
                throw new IllegalStateException("gspo4j's fused loss does not support double backward (create_graph=true, or a "
                        + "gradient of its gradient): the fused kernel's gradient is computed outside autograd and is not itself "
                        + "differentiable. Run the backward without create_graph, or use a libtorch composite loss for "
                        + "higher-order gradients");
            }
            if (!directGraph && directSent.get()) {
                throw new IllegalStateException("LossResult.backward() already sent this loss's gradient: loss().backward() "
                        + "would add it again. Use one of the two paths per result");
            }
            synchronized (this) {
                if (!computed) {
                    final Tensor[] grads = gradients(upstream, attached);
                    System.arraycopy(grads, 0, pending, 0, 3);
                    computed = true;
                    gradientSent.set(true);
                }
                return pending[branch];
            }
        } catch (RuntimeException e) {
            hookFailure = e;
            close();
            throw e;
        }
    }

    private void released(int branch) {
        final boolean last;
        synchronized (this) {
            if (pending[branch] != null) {
                pending[branch].close();
                pending[branch] = null;
            }
            pendingCount--;
            last = lastBackward && pendingCount <= 0 && anchorAddress != 0;
        }
        if (last) {
            close(); // no later backward can reach this graph's hooks
        }
    }

    /** Live graphs whose hooks are still registered (for tests of the release logic). */
    public static int liveGraphs() {
        return LIVE_GRAPHS.size();
    }

    @Override
    public synchronized void close() {
        if (closed) {
            return;
        }
        closed = true;
        final List<Tensor> all = new ArrayList<>(Arrays.asList(callers));
        all.addAll(Arrays.asList(versionAliases));
        all.addAll(Arrays.asList(pending));
        all.addAll(Arrays.asList(rows, weight, bias, targets, lse, entropy, gradLogprob, gradEntropy, upstream));
        for (Tensor t : all) {
            if (t != null && !t.isNull()) {
                t.close();
            }
        }
        Arrays.fill(pending, null);
        upstream = null;
        if (savedChunk != null) {
            // No backward took it. (A copy closed before the original's backward only costs that
            // backward its recompute of the last chunk.)
            savedChunk.close();
        }
        if (anchorAddress != 0) {
            LIVE_GRAPHS.remove(anchorAddress, this); // not another graph's entry at a reused address
        }
        if (oneAddress != 0) {
            BY_ONE.remove(oneAddress, this);
        }
    }
}
