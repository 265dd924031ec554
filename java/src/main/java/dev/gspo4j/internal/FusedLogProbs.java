package dev.gspo4j.internal;

import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import org.bytedeco.javacpp.Pointer;
import org.bytedeco.pytorch.BoolOptional;
import org.bytedeco.pytorch.PointerConsumer;
import org.bytedeco.pytorch.Scalar;
import org.bytedeco.pytorch.ScalarOptional;
import org.bytedeco.pytorch.ScalarTypeOptional;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorBase;
import org.bytedeco.pytorch.TensorArrayRefOptional;
import org.bytedeco.pytorch.TensorOptions;
import org.bytedeco.pytorch.TensorTensorHook;
import org.bytedeco.pytorch.VoidTensorHook;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * What the fused backward needs from one forward, and the two ways to run it: straight into
 * {@code logits.backward(grad)} (three passes over the logits) or from libtorch's autograd through
 * a differentiable loss tensor (one more read, by a {@code sum}).
 *
 * <p>The presets offer no custom autograd Function for Java, so the differentiable loss is built
 * from stock ops plus three hooks:
 * <pre>
 *   loss = value + float(alias(released(logits)).sum()).clamp(0, 0) * one + 0 * (anchor * token)
 * </pre>
 * {@code value} is the kernels' loss; the clamp term is exactly 0 whatever the sum (even an fp16
 * overflow to Inf) and puts the logits on the graph. A hook on the float32 clamp output records the
 * upstream gradient d(total)/d(loss) exactly; the hook on {@code alias} then receives sum's
 * stride-0 expanded gradient (no [N, V] allocation) and returns the fused backward kernel's
 * gradient scaled by that upstream value; the hook on {@code released}, the next node, drops our
 * Java reference to that gradient before the logits' own node sees it (AccumulateGrad clones a
 * gradient somebody else still holds).
 *
 * <p>Lifetime: the hooks are Java callbacks and must stay reachable as long as the graph can call
 * them; the forward's tensors (logits, lse, coefficients) likewise. {@code token} is a one-element
 * tensor over memory we own with a deleter, saved by the MulBackward of {@code anchor * token},
 * which is created before the alias: libtorch's engine runs ready nodes in decreasing sequence
 * number, so that node runs after the alias hook in every backward, and the graph frees the token
 * when a backward does not retain the graph, or when the graph itself is dropped. The deleter then
 * releases the hooks and the saved tensors. {@code * one} saves a tensor in a node that runs before
 * both hooks: a second backward without retain_graph fails there, as libtorch's own graphs do,
 * before it could reach a released hook.
 */
public final class FusedLogProbs implements AutoCloseable {

    private static final Map<Long, FusedLogProbs> LIVE_GRAPHS = new ConcurrentHashMap<>();

    /** Called by libtorch when a graph frees its token: the graph can no longer reach its hooks. */
    private static final PointerConsumer RELEASE = new PointerConsumer() {
        @Override
        public void call(Pointer data) {
            final FusedLogProbs state = LIVE_GRAPHS.remove(data.address());
            if (state != null) {
                state.close();
            }
        }
    };

    private final Tensor logits;
    private final LogitsView view;
    private final Tensor targets;
    private final double temperature;
    private final Tensor lse;
    private final Tensor entropy;
    private final Tensor gradLogprob;
    private final Tensor gradEntropy;
    // Graph-only state, set by attach().
    private VoidTensorHook upstreamHook;
    private TensorTensorHook gradientHook;
    // The memory behind the graph's token: one float on the logits' device, ours until the graph
    // calls RELEASE. On the logits' device so that every node of the trick runs on the device's
    // own autograd queue, where the ordering by sequence number holds.
    private Tensor tokenHolder;
    private volatile Tensor upstream;
    // The gradient just handed to autograd. Our Java reference must be gone before the logits'
    // own node sees it: AccumulateGrad clones a gradient someone else still holds (2x memory).
    private Tensor pendingGradient;
    // JavaCPP hands each hook an owning copy of its argument: every hook closes it, or the
    // argument (here the [N, V] gradient) stays alive until a garbage collection.
    private final VoidTensorHook releaseHook = new VoidTensorHook() {
        @Override
        public void call(TensorBase grad) {
            releasePendingGradient();
            grad.close();
        }
    };

    /**
     * Takes its own references to every tensor (the caller keeps and closes its own).
     *
     * @param gradEntropy dLoss/dH per token, or null when the loss has no entropy term
     */
    public FusedLogProbs(Tensor logits, LogitsView view, Tensor targets, double temperature, Tensor lse, Tensor entropy,
            Tensor gradLogprob, Tensor gradEntropy) {
        this.logits = new Tensor(logits);
        this.view = view;
        this.targets = new Tensor(targets);
        this.temperature = temperature;
        this.lse = new Tensor(lse);
        this.entropy = new Tensor(entropy);
        this.gradLogprob = new Tensor(gradLogprob);
        this.gradEntropy = gradEntropy == null ? null : new Tensor(gradEntropy);
    }

    /**
     * The gradient of {@code scale * loss} with respect to the logits, contiguous, in the logits'
     * dtype: one read of the logits and one write.
     *
     * @param scale a 0-dim float32 tensor on the logits' device, or null for 1
     */
    public Tensor logitsGradient(Tensor scale) {
        final Tensor gLp = scale == null ? gradLogprob : gradLogprob.mul(scale);
        final Tensor gH = gradEntropy == null ? null : scale == null ? gradEntropy : gradEntropy.mul(scale);
        try {
            final Tensor grad = Tensors.empty(Tensors.shape(logits), logits.scalar_type(), logits);
            Kernels.tokenLogProbBackward(Tensors.device(logits), Tensors.stream(logits), view, Tensors.longs(targets), temperature,
                    Tensors.doubles(lse), Tensors.floats(entropy), Tensors.floats(gLp), Tensors.floats(gH), grad.data_ptr(),
                    view.seq() * view.vocab(), view.vocab());
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

    /** Another holder of the same tensors (for a graph, while the first stays with its result). */
    public FusedLogProbs copy() {
        return new FusedLogProbs(logits, view, targets, temperature, lse, entropy, gradLogprob, gradEntropy);
    }

    /** The direct path: {@code logits.backward(d(scale * loss)/d(logits))}. */
    public void backwardInto(double scale) {
        final Tensor grad;
        if (scale == 1.0) {
            grad = logitsGradient(null);
        } else {
            try (TensorOptions options = logits.options().dtype(new ScalarTypeOptional(ScalarType.Float));
                    Tensor s = torch.full(new long[0], new Scalar(scale), options)) {
                grad = logitsGradient(s);
            }
        }
        if (logits.is_leaf()) {
            // What AccumulateGrad would do, minus its clone: a gradient someone else still holds
            // (our reference, backward()'s argument list) is copied, doubling the memory.
            try (Tensor current = logits.grad()) {
                if (current.defined()) {
                    current.add_(grad);
                } else {
                    logits.mutable_grad().put(grad);
                }
            } finally {
                grad.close();
            }
            return;
        }
        // Through an alias whose hook drops our reference to the gradient before the model's
        // node runs, so the buffer is freed as soon as that node is done with it.
        pendingGradient = grad;
        try (Tensor alias = logits.alias(); BoolOptional retain = new BoolOptional(); TensorArrayRefOptional inputs = new TensorArrayRefOptional()) {
            alias.register_hook(releaseHook);
            alias.backward(grad, retain, false, inputs);
        } finally {
            releasePendingGradient();
        }
    }

    private synchronized void releasePendingGradient() {
        if (pendingGradient != null) {
            pendingGradient.close();
            pendingGradient = null;
        }
    }

    /**
     * The differentiable loss: {@code value} (a 0-dim float32 tensor) with the logits attached to the
     * graph through this object's hooks. This object then belongs to the graph: the graph releases
     * it; do not close it.
     */
    public Tensor attach(Tensor value) {
        final Scalar zeroScalar = new Scalar(0.0);
        final ScalarOptional zero = new ScalarOptional(zeroScalar);
        final Tensor token;
        final Tensor anchorBase;
        final Tensor one;
        try (Scalar oneScalar = new Scalar(1.0); TensorOptions base = logits.options();
                ScalarTypeOptional float32 = new ScalarTypeOptional(ScalarType.Float); TensorOptions options = base.dtype(float32)) {
            tokenHolder = torch.full(new long[] {1}, oneScalar, options);
            final Pointer tokenMemory = tokenHolder.data_ptr();
            token = torch.from_blob(tokenMemory, new long[0], RELEASE, options);
            LIVE_GRAPHS.put(tokenMemory.address(), this);
            anchorBase = torch.full(new long[0], zeroScalar, options);
            one = torch.full(new long[0], oneScalar, options);
        }
        final Tensor anchor = anchorBase.set_requires_grad(true);
        // Created before the alias: a lower sequence number, so it runs after the alias hook.
        final Tensor lifetime = anchor.mul(token);
        // logits -> released (hook: drop our reference) -> alias (hook: the gradient) -> sum
        final Tensor released = logits.alias();
        released.register_hook(releaseHook);
        final Tensor alias = released.alias();
        gradientHook = new TensorTensorHook() {
            @Override
            public TensorBase call(TensorBase ignored) {
                ignored.close();
                releasePendingGradient();
                final Tensor grad = logitsGradient(upstream);
                synchronized (FusedLogProbs.this) {
                    pendingGradient = grad;
                }
                return grad;
            }
        };
        alias.register_hook(gradientHook);
        final Tensor sum = alias.sum();
        final Tensor sum32 = sum.to(ScalarType.Float);
        final Tensor attached = sum32.clamp(zero, zero);
        upstreamHook = new VoidTensorHook() {
            @Override
            public void call(TensorBase grad) {
                final Tensor previous = upstream;
                upstream = new Tensor(grad);
                grad.close();
                if (previous != null) {
                    previous.close();
                }
            }
        };
        attached.register_hook(upstreamHook);
        final Tensor guarded = attached.mul(one);
        final Tensor keepAlive = lifetime.mul(zeroScalar);
        final Tensor partial = value.add(guarded);
        final Tensor loss = partial.add(keepAlive);
        for (Tensor t : new Tensor[] {token, anchor, anchorBase, lifetime, released, alias, sum, sum32, attached, one, guarded, keepAlive,
            partial}) {
            t.close();
        }
        zero.close();
        zeroScalar.close();
        return loss;
    }

    /** Live graphs whose hooks are still registered (for tests of the release logic). */
    public static int liveGraphs() {
        return LIVE_GRAPHS.size();
    }

    /** Releases every reference; idempotent. */
    @Override
    public synchronized void close() {
        for (Tensor t : new Tensor[] {logits, targets, lse, entropy, gradLogprob, gradEntropy, upstream, pendingGradient}) {
            if (t != null && !t.isNull()) {
                t.close();
            }
        }
        upstream = null;
        pendingGradient = null;
        if (tokenHolder != null) {
            tokenHolder.close();
            tokenHolder = null;
        }
    }
}
