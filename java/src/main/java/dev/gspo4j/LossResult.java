package dev.gspo4j;

import dev.gspo4j.internal.LossGraph;
import dev.gspo4j.internal.Unscoped;
import org.bytedeco.pytorch.BoolOptional;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.TensorArrayRef;
import org.bytedeco.pytorch.TensorArrayRefOptional;
import org.bytedeco.pytorch.TensorOptional;
import org.bytedeco.pytorch.TensorVector;

/**
 * The loss of one call, its per-token log-probs and entropy, and its metrics. Not thread-safe: one
 * owner. {@link #close()} releases every tensor this object handed out, the one {@link #loss()}
 * returned included (clone what must outlive it); tensors computed from them, such as
 * {@code loss().mul(2)}, stay valid and keep their graph, which owns what its backward needs.
 * Closing while another thread is inside {@link #backward()} or {@code loss().backward()} is
 * misuse, but safe: the release waits for that backward to return (it does not block the closing
 * thread), and a backward started after the close fails with {@link IllegalStateException}.
 *
 * <p>What the backward reads is checked first, as libtorch checks its saved tensors: changing the
 * logits' shape, strides or storage after {@code compute()} ({@code set_}, {@code as_strided_},
 * {@code resize_}), or modifying in place the logits, the int64 targets or (with an entropy term)
 * the tensor {@link #entropy()} returned, makes either backward path fail with an {@link
 * IllegalStateException} naming the tensor, instead of computing a wrong gradient. {@code
 * loss().backward()} throws that exception itself; a backward from a tensor computed from {@code
 * loss()} (such as {@code loss().mul(2).backward()}) gets it as libtorch's engine reports it, a
 * {@code RuntimeException} whose message starts with {@code java.lang.IllegalStateException}.
 *
 * <p>Double backward is not supported: the gradient comes from the fused kernel, outside autograd,
 * so it has no graph of its own; a backward with {@code create_graph=true} through {@link #loss()}
 * (what a gradient of the gradient needs) fails with that reason instead of returning a silently
 * missing second derivative.
 */
public final class LossResult implements AutoCloseable {
    private final Tensor lossValue;
    private final Tensor logProbs;
    private final Tensor entropy;
    private final LossMetrics metrics;
    private final LossGraph fused; // null when computed without grad
    private GraphLoss loss;
    private boolean closed;
    private boolean released;
    private boolean directBackwardRan;
    private int runningBackwards;
    // The CUDA device whose deferred data checks a read of this result reports first; -1: CPU.
    private int cudaDevice = -1;

    LossResult(Tensor lossValue, Tensor logProbs, Tensor entropy, LossMetrics metrics, LossGraph fused) {
        this.lossValue = lossValue;
        this.logProbs = logProbs;
        this.entropy = entropy;
        this.metrics = metrics;
        this.fused = fused;
    }

    LossResult onCudaDevice(int device) {
        this.cudaDevice = device;
        return this;
    }

    // CUDA: what the kernels of this call (and earlier ones on the device) found, reported before
    // any of the result is handed out.
    private void checked() {
        ensureOpen();
        CudaChecks.beforeRead(cudaDevice);
    }

    /**
     * The scalar loss (0-dim float32). When computed with grad enabled and logits that require grad,
     * it is differentiable: {@code loss().backward()}, alone or inside a larger expression, sends
     * the fused kernel's exact gradient into the logits and on through the model. The graph is built
     * on the first call, whatever the grad mode then (the loss was computed with grad); building it
     * reads nothing. Like any libtorch graph it takes one backward unless {@code retain_graph}.
     *
     * @return the 0-dim float32 loss on the logits' device, owned by this result
     * @throws IllegalStateException when the logits' metadata changed since compute(), or in
     *     inference mode
     */
    public synchronized Tensor loss() {
        ensureOpen();
        if (loss == null) {
            // Owned by this result, not by a PointerScope open now (see Unscoped).
            loss = Unscoped.call(() -> {
                final LossGraph graph = fused == null ? null : fused.copy();
                final Tensor built = graph == null ? new Tensor(lossValue) : graph.attach(lossValue);
                try {
                    return new GraphLoss(built, graph);
                } finally {
                    built.close();
                }
            });
        }
        return loss;
    }

    /**
     * The loss value, detached.
     *
     * @return a 0-dim float32 tensor on the logits' device, owned by this result
     */
    public Tensor lossValue() {
        checked();
        return lossValue;
    }

    /**
     * Per-token log-probs of the targets, detached.
     *
     * @return float32 {@code [B, T]} (padded) or {@code [N]} (packed) on the logits' device, owned by
     *     this result (clone it to keep it past {@link #close()})
     */
    public Tensor logProbs() {
        checked();
        return logProbs;
    }

    /**
     * Per-token entropy of the policy, detached, float32 {@code [B, T]} or {@code [N]}. With an
     * entropy term the backward reads it: clone it before modifying it in place.
     *
     * @return float32 {@code [B, T]} (padded) or {@code [N]} (packed) on the logits' device, owned by
     *     this result
     */
    public Tensor entropy() {
        checked();
        return entropy;
    }

    /**
     * The call's metrics, read from the device only when a number is asked for.
     *
     * @return the metrics, owned by this result (closed with it)
     */
    public LossMetrics metrics() {
        checked();
        return metrics;
    }

    /**
     * Whether the loss carries a gradient.
     *
     * @return true when grad was enabled and the logits required grad at {@code compute}
     */
    public boolean differentiable() {
        return fused != null;
    }

    /**
     * The direct path: d(loss)/d(logits) from the fused kernel (one read of the logits, one write of
     * the gradient), delivered by libtorch's engine as from {@code loss().backward()}: it accumulates
     * into a leaf's {@code grad} (the leaf's hooks run) or continues through the model. Reads the
     * logits three times in all, forward included, as {@code loss().backward()} does.
     *
     * <p>Once per result, like a libtorch graph without {@code retain_graph}: a second call, or a call
     * after {@code loss().backward()} sent this loss's gradient, would add the same gradient again
     * and throws {@link IllegalStateException}. Compute the loss again for another backward.
     */
    public void backward() {
        backward(1.0);
    }

    /**
     * {@link #backward()} for {@code scale * loss} (gradient accumulation, loss weights).
     *
     * @param scale finite and within the float32 range (the upstream gradient is a float32 scalar)
     */
    public void backward(double scale) {
        checked();
        synchronized (this) {
            ensureOpen();
            if (fused == null) {
                throw new IllegalStateException("the loss was computed without grad (no-grad mode or logits without requires_grad)");
            }
            if (!Double.isFinite(scale) || Math.abs(scale) > Float.MAX_VALUE) {
                throw new IllegalArgumentException("scale must be finite and within the float32 range [" + -Float.MAX_VALUE + ", "
                        + Float.MAX_VALUE + "] (the upstream gradient is a float32 scalar), got " + scale);
            }
            if (directBackwardRan) {
                throw new IllegalStateException("backward() already ran for this result: a second call would add the same "
                        + "gradient to the logits again (libtorch's own graphs refuse a second backward without retain_graph). "
                        + "Compute the loss again for another backward");
            }
            if (fused.gradientSent()) {
                throw new IllegalStateException("loss().backward() already sent this loss's gradient into the logits: backward() "
                        + "would add it again. Use one of the two paths per result");
            }
            fused.checkUnchanged();
            directBackwardRan = true;
            runningBackwards++;
        }
        try {
            fused.backwardInto(lossValue, scale);
        } finally {
            leave();
        }
    }

    private void ensureOpen() {
        if (closed) {
            throw new IllegalStateException("this LossResult is closed");
        }
    }

    private void leave() {
        final boolean release;
        synchronized (this) {
            runningBackwards--;
            release = closed && runningBackwards == 0 && !released;
            released |= release;
        }
        if (release) {
            releaseTensors();
        }
    }

    /**
     * Releases this result's tensors; idempotent. While another thread runs {@link #backward()} the
     * release happens when that backward returns.
     */
    @Override
    public void close() {
        final boolean release;
        synchronized (this) {
            if (closed) {
                return;
            }
            closed = true;
            release = runningBackwards == 0;
            released = release;
        }
        if (release) {
            releaseTensors();
        }
    }

    private void releaseTensors() {
        for (Tensor t : new Tensor[] {lossValue, logProbs, entropy, loss}) {
            if (t != null && !t.isNull()) {
                t.close();
            }
        }
        metrics.close();
        if (fused != null) {
            fused.close();
        }
    }

    /**
     * The tensor {@link #loss()} hands out: another reference to the loss, whose backward holds off a
     * concurrent {@link #close()} (of this tensor or of its result) until it returns, so a close
     * never frees the tensor under a running backward.
     */
    private static final class GraphLoss extends Tensor {
        private int running;
        private boolean closeRequested;
        // The graph's holder, owned by the graph (never closed here): read for the exception its
        // hook threw, which libtorch's engine reports only as a RuntimeException with its text.
        private final LossGraph graph;

        GraphLoss(Tensor loss, LossGraph graph) {
            super(loss);
            this.graph = graph;
        }

        private synchronized void enter() {
            if (closeRequested) {
                throw new IllegalStateException("this loss tensor is closed (its LossResult was closed)");
            }
            running++;
        }

        private void leave() {
            final boolean free;
            synchronized (this) {
                running--;
                free = closeRequested && running == 0;
            }
            if (free) {
                super.close();
            }
        }

        /** Runs one backward overload with close() held off until it returns. */
        private void guarded(Runnable backward) {
            enter();
            try {
                backward.run();
            } catch (RuntimeException e) {
                final RuntimeException cause = graph == null ? null : graph.hookFailure();
                throw cause != null ? cause : e;
            } finally {
                leave();
            }
        }

        @Override
        public void close() {
            final boolean free;
            synchronized (this) {
                if (closeRequested) {
                    return;
                }
                closeRequested = true;
                free = running == 0;
            }
            if (free) {
                super.close();
            }
        }

        @Override
        public void backward() {
            guarded(() -> super.backward());
        }

        @Override
        public void backward(Tensor gradient, BoolOptional retainGraph, boolean createGraph, TensorArrayRefOptional inputs) {
            guarded(() -> super.backward(gradient, retainGraph, createGraph, inputs));
        }

        @Override
        public void _backward(TensorArrayRef inputs, TensorOptional gradient, BoolOptional retainGraph, boolean createGraph) {
            guarded(() -> super._backward(inputs, gradient, retainGraph, createGraph));
        }

        @Override
        public void _backward(TensorVector inputs, TensorOptional gradient, BoolOptional retainGraph, boolean createGraph) {
            guarded(() -> super._backward(inputs, gradient, retainGraph, createGraph));
        }

        @Override
        public void __dispatch__backward(TensorArrayRef inputs, TensorOptional gradient, BoolOptional retainGraph,
                boolean createGraph) {
            guarded(() -> super.__dispatch__backward(inputs, gradient, retainGraph, createGraph));
        }

        @Override
        public void __dispatch__backward(TensorArrayRef inputs) {
            guarded(() -> super.__dispatch__backward(inputs));
        }

        @Override
        public void __dispatch__backward(TensorVector inputs, TensorOptional gradient, BoolOptional retainGraph, boolean createGraph) {
            guarded(() -> super.__dispatch__backward(inputs, gradient, retainGraph, createGraph));
        }

        @Override
        public void __dispatch__backward(TensorVector inputs) {
            guarded(() -> super.__dispatch__backward(inputs));
        }
    }
}
