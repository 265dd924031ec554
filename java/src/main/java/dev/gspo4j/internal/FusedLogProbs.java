package dev.gspo4j.internal;

import static dev.gspo4j.internal.GraphTokens.keep;

import dev.gspo4j.Gspo4jException;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicBoolean;
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
 * What the fused backward needs from one forward, and the differentiable loss that runs it from
 * libtorch's autograd. Both backward paths hand the gradient to libtorch's engine at the logits, so
 * the logits' tensor hooks and gradient accumulation run as for any libtorch gradient: {@code
 * loss().backward()} through the graph below, the direct {@code LossResult.backward(scale)} through
 * the two aliases at its end alone (its upstream gradient is known and it runs at once, so it needs
 * neither the upstream hook nor the tokens; see backwardIntoUnscoped).
 *
 * <p>The presets offer no custom autograd Function for Java, so the differentiable loss is built
 * from stock ops plus three hooks:
 * <pre>
 *   loss = (value + float(dot(view(-1, alias(released(logits)) * Z), Z'))) * one * anchor
 * </pre>
 * {@code Z} and {@code Z'} are libtorch "efficient zero tensors" (no storage; ops on them only
 * compute the result's metadata): the product, the dot and their backwards never touch the logits'
 * data or allocate [N, V] memory, whatever the logits' strides (a view, an expanded tensor), so
 * attaching the logits costs no pass over them (contiguous logits skip the product: their alias
 * views as [N * V] itself, and a dot with a zero tensor is one too). The term is exactly 0. A hook
 * on the float32 dot
 * records the upstream gradient d(total)/d(loss) exactly; the hook on {@code alias} then receives
 * the product's gradient (another zero tensor: no memory) and returns the fused backward kernel's
 * gradient scaled by that upstream value; the hook on {@code released}, the next node, drops our
 * Java reference to that gradient before the logits' own node sees it (AccumulateGrad clones a
 * gradient somebody else still holds).
 *
 * <p>What the backward reads is checked before the kernel runs, as libtorch checks its saved
 * tensors: the logits are read through a detached alias taken at compute time (its own metadata,
 * the same storage and version counter), so {@code set_}, {@code as_strided_} or {@code resize_}
 * on the caller's tensor cannot make the kernel read or write outside what compute() saw; such a
 * change, and an in-place change to the logits, the int64 targets or the entropy tensor that
 * {@code LossResult.entropy()} hands out (when the loss has an entropy term), is an {@link
 * IllegalStateException}. Inside {@code loss().backward()} libtorch reports a hook's exception as
 * a {@code RuntimeException} whose message is that exception's class and message.
 *
 * <p>Lifetime: the hooks are Java callbacks and must stay reachable as long as the graph can call
 * them; the forward's tensors (logits, lse, coefficients) likewise. Two one-element tensors over
 * memory we own, each holding 1 and with a deleter, tell us when that ends. {@code one} is saved by the
 * MulBackward of {@code * one}, which every backward runs before both hooks (they are downstream of
 * it): a backward without retain_graph frees it there, so we know this backward is the graph's last
 * and release everything once the gradient has passed the {@code released} hook; a second backward
 * without retain_graph fails at that node, as libtorch's own graphs do, before it could reach a
 * released hook. {@code anchor} is held by its AccumulateGrad node, which no backward frees: its
 * deleter runs when the graph itself is dropped (with or without a backward, after a failed one).
 * A failure in our gradient hook releases at once. No node of ours is left waiting in the engine's
 * ready queue when a backward fails elsewhere (a node that was ready but had not run would keep the
 * graph alive in the thread's queue), so the state never outlives the graph.
 */
public final class FusedLogProbs implements LossGraph {

    // Graphs whose state is alive, by the address of their anchor's memory.
    private static final Map<Long, FusedLogProbs> LIVE_GRAPHS = new ConcurrentHashMap<>();
    // The same states by the address of their {@code one}'s memory.
    private static final Map<Long, FusedLogProbs> BY_ONE = new ConcurrentHashMap<>();

    /** Called by libtorch when a graph drops its anchor: the graph itself is gone. */
    // Made outside any caller's PointerScope (see Unscoped): they live as long as the class.
    private static final PointerConsumer GRAPH_DROPPED = Unscoped.call(() -> new PointerConsumer() {
        @Override
        public void call(Pointer data) {
            // The entry goes before the memory: once freed, its address may serve another graph's token.
            final FusedLogProbs state = LIVE_GRAPHS.remove(data.address());
            GraphTokens.freeTokenMemory(data);
            if (state != null) {
                state.close();
            }
        }
    });

    /**
     * Called by libtorch when a graph frees {@code one}: during a backward without retain_graph (the
     * graph's last, before our hooks run), or when the graph is dropped.
     */
    private static final PointerConsumer ONE_RELEASED = Unscoped.call(() -> new PointerConsumer() {
        @Override
        public void call(Pointer data) {
            final FusedLogProbs state = BY_ONE.remove(data.address());
            GraphTokens.freeTokenMemory(data);
            if (state != null) {
                state.lastBackward = true;
            }
        }
    });


    // The caller's logits: the graph attaches to this tensor, and its metadata is checked against
    // the snapshot below; the kernels never read through it.
    private final Tensor callerLogits;
    // A detached alias of the logits taken at compute time: its own TensorImpl (metadata changes on
    // the caller's tensor leave it alone), the same storage (kept alive) and version counter.
    private final Tensor logits;
    private final long[] logitsShape;
    private final long[] logitsStrides;
    private final long logitsStorageOffset;
    private final long logitsAddress;
    private final long logitsVersion;
    private final LogitsView view;
    // The targets as the kernels read them: a detached alias of the caller's tensor when it was
    // already contiguous int64, else our converted copy.
    private final Tensor targets;
    private final long targetsVersion;
    private final double temperature;
    private final Tensor lse;
    // A detached alias of the entropy LossResult.entropy() hands out: same storage and version.
    // Null without an entropy term, whose backward does not read the entropy.
    private final Tensor entropy;
    private final long entropyVersion;
    private final Tensor gradLogprob;
    private final Tensor gradEntropy;
    // The backward writes the gradient over the logits' own memory (PolicyLoss.Builder.inPlaceBackward).
    private final boolean inPlace;
    // Shared by every copy: whether an in-place backward overwrote the logits.
    private final AtomicBoolean overwritten;
    // Shared by the result's holder and every graph made from it: whether a gradient was sent.
    private final AtomicBoolean gradientSent;
    // Shared by every copy: whether the direct path (LossResult.backward) ran. A graph from loss()
    // then refuses its backward, which would add the same gradient a second time.
    private final AtomicBoolean directSent;
    // Graph-only state, set by attach().
    private VoidTensorHook upstreamHook;
    private TensorTensorHook gradientHook;
    // The addresses of this graph's anchor and one (0 until attach() made them).
    private long anchorAddress;
    private long oneAddress;
    // Set when a backward without retain_graph freed {@code one}: this backward is the graph's last.
    private volatile boolean lastBackward;
    private volatile Tensor upstream;
    // What the gradient hook threw, for the direct path to rethrow with its own type.
    private volatile RuntimeException hookFailure;
    // The gradient just handed to autograd. Our Java reference must be gone before the logits'
    // own node sees it: AccumulateGrad clones a gradient someone else still holds (2x memory).
    private Tensor pendingGradient;
    private boolean closed;
    // JavaCPP hands each hook an owning copy of its argument: every hook closes it, or the
    // argument (here the [N, V] gradient) stays alive until a garbage collection.
    private VoidTensorHook releaseHook;

    /**
     * Takes its own references to every tensor (the caller keeps and closes its own), and records
     * the logits' metadata and the versions of what the backward reads.
     *
     * @param gradEntropy dLoss/dH per token, or null when the loss has no entropy term
     * @param inPlace whether the backward writes the gradient over the logits (the caller checked
     *     {@link #checkInPlace})
     */
    public FusedLogProbs(Tensor logits, LogitsView view, Tensor targets, double temperature, Tensor lse, Tensor entropy,
            Tensor gradLogprob, Tensor gradEntropy, boolean inPlace) {
        this.callerLogits = new Tensor(logits);
        this.logits = logits.detach();
        this.logitsShape = Tensors.shape(logits);
        this.logitsStrides = Tensors.strides(logits);
        this.logitsStorageOffset = logits.storage_offset();
        this.logitsAddress = address(logits);
        this.logitsVersion = logits._version();
        this.view = view;
        this.targets = targets.detach();
        this.targetsVersion = targets._version();
        this.temperature = temperature;
        this.lse = new Tensor(lse);
        this.entropy = gradEntropy == null ? null : entropy.detach();
        this.entropyVersion = gradEntropy == null ? 0 : entropy._version();
        this.gradLogprob = new Tensor(gradLogprob);
        this.gradEntropy = gradEntropy == null ? null : new Tensor(gradEntropy);
        this.inPlace = inPlace;
        this.overwritten = new AtomicBoolean();
        this.gradientSent = new AtomicBoolean();
        this.directSent = new AtomicBoolean();
    }

    /** As the full constructor, with the gradient in memory of its own. */
    public FusedLogProbs(Tensor logits, LogitsView view, Tensor targets, double temperature, Tensor lse, Tensor entropy,
            Tensor gradLogprob, Tensor gradEntropy) {
        this(logits, view, targets, temperature, lse, entropy, gradLogprob, gradEntropy, false);
    }

    /**
     * Refuses logits that an in-place backward could not safely overwrite with their gradient: a
     * leaf, or a view of a leaf (its {@code .grad} would be the leaf's own memory), and rows that
     * overlap in memory (an expanded tensor: one element would hold several gradients).
     *
     * @throws IllegalArgumentException naming the problem and the fix
     */
    public static void checkInPlace(Tensor logits, LogitsView view) {
        final String fix = "; build the loss without inPlaceBackward(true) for such logits";
        if (logits.is_leaf()) {
            throw new IllegalArgumentException("inPlaceBackward(true) needs logits produced by an op (the lm_head's matmul, a "
                    + "cast), not a leaf tensor: the leaf's .grad would be the logits' own memory, overwritten" + fix);
        }
        if (logits.is_view()) {
            try (TensorBase base = logits._base()) {
                if (base.is_leaf() && base.requires_grad()) {
                    throw new IllegalArgumentException("inPlaceBackward(true) needs logits produced by an op, not a view of a leaf "
                            + "tensor that requires grad: the gradient would reach the leaf's .grad over the leaf's own memory" + fix);
                }
            }
        }
        // The two row dimensions, inner (smaller stride) first; rows are `vocab` contiguous elements.
        long innerCount = view.seq();
        long innerStride = view.strideSeq();
        long outerCount = view.batch();
        long outerStride = view.strideBatch();
        if (outerCount > 1 && (innerCount <= 1 || outerStride < innerStride)) {
            final long c = innerCount;
            final long st = innerStride;
            innerCount = outerCount;
            innerStride = outerStride;
            outerCount = c;
            outerStride = st;
        }
        final boolean innerOk = innerCount <= 1 || innerStride >= view.vocab();
        final boolean outerOk = outerCount <= 1 || outerStride >= (innerCount - 1) * innerStride + view.vocab();
        if (!innerOk || !outerOk) {
            throw new IllegalArgumentException("inPlaceBackward(true) needs logits whose rows do not overlap in memory (strides "
                    + Arrays.toString(Tensors.strides(logits)) + " for shape " + Arrays.toString(Tensors.shape(logits))
                    + ": an expanded tensor?), since each element receives its own gradient" + fix);
        }
    }

    /** Another holder of the same tensors and the same compute-time records. */
    private FusedLogProbs(FusedLogProbs other) {
        this.callerLogits = new Tensor(other.callerLogits);
        this.logits = new Tensor(other.logits);
        this.logitsShape = other.logitsShape;
        this.logitsStrides = other.logitsStrides;
        this.logitsStorageOffset = other.logitsStorageOffset;
        this.logitsAddress = other.logitsAddress;
        this.logitsVersion = other.logitsVersion;
        this.view = other.view;
        this.targets = new Tensor(other.targets);
        this.targetsVersion = other.targetsVersion;
        this.temperature = other.temperature;
        this.lse = new Tensor(other.lse);
        this.entropy = other.entropy == null ? null : new Tensor(other.entropy);
        this.entropyVersion = other.entropyVersion;
        this.gradLogprob = new Tensor(other.gradLogprob);
        this.gradEntropy = other.gradEntropy == null ? null : new Tensor(other.gradEntropy);
        this.inPlace = other.inPlace;
        this.overwritten = other.overwritten;
        this.gradientSent = other.gradientSent;
        this.directSent = other.directSent;
    }

    /** Another holder of the same tensors (for a graph, while the first stays with its result). */
    @Override
    public FusedLogProbs copy() {
        return Unscoped.call(() -> new FusedLogProbs(this));
    }

    /** What this graph's gradient hook threw (the engine passes on only its text), or null. */
    @Override
    public RuntimeException hookFailure() {
        return hookFailure;
    }

    /** Whether a backward through any graph made from this holder has produced the gradient. */
    @Override
    public boolean gradientSent() {
        return gradientSent.get();
    }

    /**
     * Throws {@link IllegalStateException} when something the backward reads changed since compute():
     * the logits' metadata or storage, or the data of the logits, the targets or (with an entropy
     * term) the entropy tensor, as libtorch's version counter shows.
     */
    @Override
    public void checkUnchanged() {
        if (overwritten.get()) {
            throw new IllegalStateException("the in-place backward (inPlaceBackward(true)) already overwrote the logits with "
                    + "their gradient: a second backward of this result has no logits to read. Call compute() again, or build "
                    + "the loss without inPlaceBackward for a retain_graph=true backward");
        }
        final long[] shape = Tensors.shape(callerLogits);
        final long[] strides = Tensors.strides(callerLogits);
        final long offset = callerLogits.storage_offset();
        final long address = address(callerLogits);
        if (!Arrays.equals(shape, logitsShape) || !Arrays.equals(strides, logitsStrides) || offset != logitsStorageOffset
                || address != logitsAddress || callerLogits.scalar_type().intern() != logits.scalar_type().intern()) {
            throw new IllegalStateException("the logits' shape, strides or storage changed after compute() (shape "
                    + Arrays.toString(logitsShape) + ", strides " + Arrays.toString(logitsStrides) + ", storage offset "
                    + logitsStorageOffset + " then; shape " + Arrays.toString(shape) + ", strides " + Arrays.toString(strides)
                    + ", storage offset " + offset + (address != logitsAddress ? ", other memory" : "")
                    + " now; set_, resize_ or as_strided_?): the backward would not match them. Clone the logits before "
                    + "changing them, or call compute() after the change");
        }
        // Nobody else holds the saved alias; checked anyway, since the kernel trusts it.
        if (!Arrays.equals(Tensors.shape(logits), logitsShape) || !Arrays.equals(Tensors.strides(logits), logitsStrides)
                || address(logits) != logitsAddress) {
            throw new IllegalStateException("gspo4j's saved alias of the logits changed (a gspo4j bug)");
        }
        requireVersion(logits, logitsVersion, "the logits");
        requireVersion(targets, targetsVersion, "the targets");
        if (gradEntropy != null) {
            requireVersion(entropy, entropyVersion, "the entropy tensor (LossResult.entropy())");
        }
    }

    private static void requireVersion(Tensor t, long recorded, String name) {
        final long now = t._version();
        if (now != recorded) {
            throw new IllegalStateException(name + ", needed for the gradient computation, were modified by an in-place "
                    + "operation after compute(): version " + recorded + " at compute(), " + now + " now. The backward would "
                    + "read the new values and give a wrong gradient. Clone the tensor before modifying it, or call compute() "
                    + "after the change");
        }
    }

    /**
     * The gradient of {@code scale * loss} with respect to the logits, in the logits' dtype and with
     * the shape compute() saw: one read of the logits and one write. Contiguous, over memory of the
     * {@link GradientPool} on the CPU; or, for an in-place backward, the logits' own memory (their
     * strides), whose version counter is then bumped so that any later use autograd would need fails.
     *
     * @param scale a 0-dim float32 tensor on the logits' device, or null for 1
     */
    public Tensor logitsGradient(Tensor scale) {
        checkUnchanged();
        return scaledGradient(scale == null ? gradLogprob : gradLogprob.mul(scale),
                gradEntropy == null ? null : scale == null ? gradEntropy : gradEntropy.mul(scale));
    }

    /**
     * {@link #logitsGradient(Tensor)} with the scale as a number, rounded to float32 as the upstream
     * gradient of a float32 loss is: the products are those of a 0-dim float32 scale tensor.
     */
    public Tensor logitsGradient(double scale) {
        checkUnchanged();
        if (scale == 1.0) {
            return scaledGradient(gradLogprob, gradEntropy);
        }
        try (Scalar s = new Scalar((double) (float) scale)) {
            return scaledGradient(gradLogprob.mul(s), gradEntropy == null ? null : gradEntropy.mul(s));
        }
    }

    // The kernel's gradient for the (scaled) per-token gradients gLp and gH; closes them when they
    // are not this object's own.
    private Tensor scaledGradient(Tensor gLp, Tensor gH) {
        try {
            if (inPlace) {
                return overwriteLogits(gLp, gH);
            }
            final Tensor grad = GradientPool.empty(logitsShape, logits.scalar_type(), logits);
            try {
                Kernels.tokenLogProbBackward(Tensors.device(logits), Tensors.stream(logits), view, Tensors.longs(targets),
                        temperature, Tensors.doubles(lse), Tensors.floats(entropy), Tensors.floats(gLp), Tensors.floats(gH),
                        grad.data_ptr(), view.seq() * view.vocab(), view.vocab());
            } catch (Gspo4jException e) {
                grad.close();
                throw backwardFailure(e);
            } catch (RuntimeException | Error e) {
                grad.close();
                throw e;
            }
            return grad;
        } finally {
            if (gLp != gradLogprob) {
                gLp.close();
            }
            if (gH != null && gH != gradEntropy) {
                gH.close();
            }
        }
    }

    // The in-place backward: the kernel writes over the rows it reads (each element's gradient
    // depends on that element and the row's saved statistics only), then the version bump: an
    // in-place op on an empty slice changes no data but increments the counter the logits share
    // with their views and base, as libtorch's own in-place ops do.
    private Tensor overwriteLogits(Tensor gLp, Tensor gH) {
        if (!overwritten.compareAndSet(false, true)) {
            throw new IllegalStateException("the in-place backward already overwrote the logits (a gspo4j bug: checked before)");
        }
        try {
            Kernels.tokenLogProbBackward(Tensors.device(logits), Tensors.stream(logits), view, Tensors.longs(targets),
                    temperature, Tensors.doubles(lse), Tensors.floats(entropy), Tensors.floats(gLp), Tensors.floats(gH),
                    view.data(), view.strideBatch(), view.strideSeq());
        } catch (Gspo4jException e) {
            // A failed kernel leaves the logits as they were (ids are checked before any write).
            overwritten.set(false);
            throw backwardFailure(e);
        }
        try (Tensor none = logits.narrow(-1, 0, 0)) {
            none.zero_();
        }
        // A fresh TensorImpl over the same memory: the engine's reference is the only one, so the
        // logits' producer (or a leaf's AccumulateGrad further down) may keep it without a copy.
        return logits.alias();
    }

    /**
     * The direct path: the gradient of {@code scale * loss} enters the logits' graph through two
     * aliases (see backwardIntoUnscoped), so it reaches the logits through libtorch's engine, as
     * from {@code loss().backward()}, without loss()'s graph. Checks first, so a change since
     * compute() is an exception with nothing sent.
     *
     * @param scale finite, within the float32 range (checked by the caller)
     */
    @Override
    public void backwardInto(Tensor value, double scale) {
        Unscoped.run(() -> backwardIntoUnscoped(value, scale));
    }

    // The direct path needs none of loss()'s graph: the upstream gradient is `scale`, known now, and
    // this backward runs to its end before returning, so no token has to tell when the graph goes.
    // What is left is the entry into the logits' own graph, two aliases whose backward nodes carry
    // our hooks:
    //   logits -> released (hook: drop our reference) -> entry (hook: the fused gradient)
    // and a backward from `entry` with a storage-less zero tensor as its gradient, which the
    // gradient hook replaces by the fused kernel's. As in loss()'s graph, the release hook runs
    // before the logits' own node sees the gradient (AccumulateGrad would clone a gradient somebody
    // else holds).
    private void backwardIntoUnscoped(Tensor value, double scale) {
        checkUnchanged();
        requireAttachable();
        directSent.set(true);
        final Tensor[] sent = new Tensor[1];
        final RuntimeException[] failure = new RuntimeException[1];
        final TensorTensorHook gradient = new TensorTensorHook() {
            @Override
            public TensorBase call(TensorBase ignored) {
                ignored.close();
                try {
                    return Unscoped.call(() -> {
                        if (Tensors.isCuda(logits)) {
                            // What the CUDA kernels of compute() (and earlier calls) found, before a gradient from them.
                            DeferredChecks.resolve(DeferredChecks.deviceOf(logits), false);
                        }
                        final Tensor grad = logitsGradient(scale);
                        sent[0] = grad;
                        gradientSent.set(true);
                        return grad;
                    });
                } catch (RuntimeException e) {
                    failure[0] = e;
                    throw e;
                }
            }
        };
        final VoidTensorHook release = new VoidTensorHook() {
            @Override
            public void call(TensorBase grad) {
                grad.close();
                if (sent[0] != null) {
                    sent[0].close();
                    sent[0] = null;
                }
            }
        };
        try {
            try (AutoGradMode gradMode = new AutoGradMode(true); Tensor released = callerLogits.alias(); Tensor entry = released.alias();
                    Tensor zero = torch.torch__efficientzerotensor(logitsShape, Tensors.options(logits.scalar_type(), logits));
                    BoolOptional retain = new BoolOptional(false); TensorArrayRefOptional inputs = new TensorArrayRefOptional()) {
                released.register_hook(release);
                entry.register_hook(gradient);
                entry.backward(zero, retain, false, inputs);
            } catch (RuntimeException e) {
                throw failure[0] != null ? failure[0] : e;
            } finally {
                if (sent[0] != null) {
                    sent[0].close(); // the engine failed between the two hooks
                }
            }
        } finally {
            // The aliases, and with them the nodes that held the hooks, are gone.
            gradient.close();
            release.close();
        }
    }

    /**
     * The native backward's failure in the caller's terms. compute() validated everything the
     * backward reads and checkUnchanged() found it unchanged, so only a device error or a gspo4j
     * bug gets here; the native argument names mean nothing to the caller and stay in the cause.
     */
    static Gspo4jException backwardFailure(Gspo4jException e) {
        final String what = e.status() == Gspo4jException.Status.CUDA
                ? "a CUDA error in the fused backward of the log-probs (the device's state, not the loss's inputs: check "
                        + "the device's memory and earlier CUDA work on this stream)"
                : "the fused backward of the log-probs failed although compute() had accepted its inputs and they are "
                        + "unchanged: a gspo4j bug, please report it with this message";
        final Gspo4jException failure = new Gspo4jException(e.status().code(), what + " [native: " + e.getMessage() + "]");
        failure.initCause(e);
        return failure;
    }

    private synchronized void releasePendingGradient() {
        if (pendingGradient != null) {
            pendingGradient.close();
            pendingGradient = null;
        }
    }

    /**
     * The differentiable loss: {@code value} (a 0-dim float32 tensor) with the logits attached to the
     * graph through this object's hooks, built whatever the current grad mode (the loss was computed
     * with grad). This object then belongs to the graph: the graph releases it; do not close it. On
     * an exception nothing stays registered and this object is closed.
     *
     * @throws IllegalStateException when the logits changed since compute(), or in inference mode
     */
    @Override
    public Tensor attach(Tensor value) {
        return Unscoped.call(() -> attachUnscoped(value));
    }

    private Tensor attachUnscoped(Tensor value) {
        checkUnchanged();
        requireAttachable();
        final List<Pointer> made = new ArrayList<>();
        Tensor loss = null;
        boolean built = false;
        try (AutoGradMode gradMode = new AutoGradMode(true)) {
            final TensorOptions options = Tensors.options(ScalarType.Float, callerLogits); // shared: not closed
            final Tensor anchorBase = keep(made, GraphTokens.token(1.0, GRAPH_DROPPED, options, !callerLogits.is_cuda()));
            anchorAddress = anchorBase.data_ptr().address();
            LIVE_GRAPHS.put(anchorAddress, this);
            final Tensor one = keep(made, GraphTokens.token(1.0, ONE_RELEASED, options, !callerLogits.is_cuda()));
            oneAddress = one.data_ptr().address();
            BY_ONE.put(oneAddress, this);
            final Tensor anchor = keep(made, anchorBase.set_requires_grad(true));
            // logits -> released (hook: drop our reference) -> alias (hook: the gradient) -> * Z
            final Tensor released = keep(made, callerLogits.alias());
            releaseHook = new VoidTensorHook() {
                @Override
                public void call(TensorBase grad) {
                    releasePendingGradient();
                    grad.close();
                    if (lastBackward && anchorAddress != 0) {
                        FusedLogProbs.this.close(); // no later backward can reach this graph's hooks
                    }
                }
            };
            released.register_hook(releaseHook);
            final Tensor alias = keep(made, released.alias());
            gradientHook = new TensorTensorHook() {
                @Override
                public TensorBase call(TensorBase ignored) {
                    ignored.close();
                    return Unscoped.call(() -> sendGradient());
                }
            };
            alias.register_hook(gradientHook);
            // Zero tensors in the logits' dtype: the product and the dot only compute metadata, and
            // their backwards return zero tensors too, so neither direction reads the logits.
            final Tensor attached = GraphTokens.zeroDot(made, alias, callerLogits);
            upstreamHook = new VoidTensorHook() {
                @Override
                public void call(TensorBase grad) {
                    final Tensor previous = upstream;
                    upstream = Unscoped.call(() -> new Tensor(grad));
                    grad.close();
                    if (previous != null) {
                        previous.close();
                    }
                }
            };
            attached.register_hook(upstreamHook);
            // Both tokens are 1: the products pass the value and the upstream gradient on unchanged,
            // exactly. The anchor multiplies the sum, not the zero term, so that its own gradient
            // (upstream * the loss) is a plain tensor: a zero tensor there could not take a second
            // backward's accumulation (retain_graph).
            // The zero term is added first: the products then see a plain tensor, not libtorch's
            // zero-tensor path (several times slower per op), forward and backward.
            final Tensor partial = keep(made, value.add(attached));
            final Tensor guarded = keep(made, partial.mul(one));
            loss = guarded.mul(anchor);
            built = true;
            return loss;
        } finally {
            // Dropping our references leaves the graph owned by the loss alone; on an exception
            // it drops the graph too, and this closes.
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



    private void requireAttachable() {
        if (InferenceMode.is_enabled()) {
            throw new IllegalStateException("loss() cannot build its autograd graph in inference mode (c10::InferenceMode): "
                    + "call loss() outside the InferenceMode guard, or use lossValue() for the value");
        }
        if (!callerLogits.requires_grad()) {
            throw new IllegalStateException("the logits no longer require grad (requires_grad_(false) after compute()): there is "
                    + "nothing to send the gradient to");
        }
    }

    /** The gradient hook's body: the fused gradient scaled by the recorded upstream gradient. */
    private Tensor sendGradient() {
        try {
            if (Tensors.isCuda(logits)) {
                // What the CUDA kernels of compute() (and earlier calls) found, before a gradient from them.
                DeferredChecks.resolve(DeferredChecks.deviceOf(logits), false);
            }
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
            if (directSent.get()) {
                throw new IllegalStateException("LossResult.backward() already sent this loss's gradient into the logits: "
                        + "loss().backward() would add it again. Use one of the two paths per result");
            }
            releasePendingGradient();
            // On the CPU the upstream gradient is read (no device to wait for): 1, the usual
            // loss().backward(), needs no product at all.
            final Tensor grad = Tensors.isCuda(upstream) ? logitsGradient(upstream) : logitsGradient(upstream.item_float());
            synchronized (this) {
                pendingGradient = grad;
            }
            gradientSent.set(true);
            return grad;
        } catch (RuntimeException e) {
            hookFailure = e;
            // Nothing of this graph runs after a failed hook: release now, not when the graph goes.
            close();
            throw e;
        }
    }

    /** Live graphs whose hooks are still registered (for tests of the release logic). */
    public static int liveGraphs() {
        return LIVE_GRAPHS.size();
    }

    private static long address(Tensor t) {
        return t.numel() == 0 ? 0 : t.data_ptr().address();
    }

    /** Releases every reference; idempotent. */
    @Override
    public synchronized void close() {
        if (closed) {
            return;
        }
        closed = true;
        for (Tensor t : new Tensor[] {callerLogits, logits, targets, lse, entropy, gradLogprob, gradEntropy, upstream, pendingGradient}) {
            if (t != null && !t.isNull()) {
                t.close();
            }
        }
        upstream = null;
        pendingGradient = null;
        if (anchorAddress != 0) {
            LIVE_GRAPHS.remove(anchorAddress, this); // not another graph's entry at a reused address
        }
        if (oneAddress != 0) {
            BY_ONE.remove(oneAddress, this);
        }
    }
}
