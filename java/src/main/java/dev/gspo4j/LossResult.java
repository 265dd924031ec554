package dev.gspo4j;

import dev.gspo4j.internal.FusedLogProbs;
import org.bytedeco.pytorch.Tensor;

/**
 * The loss of one call, its per-token log-probs and entropy, and its metrics. Not thread-safe: one
 * owner. {@link #close()} releases every tensor this object handed out, the one {@link #loss()}
 * returned included (clone what must outlive it); tensors computed from them, such as
 * {@code loss().mul(2)}, stay valid and keep their graph, which owns what its backward needs.
 */
public final class LossResult implements AutoCloseable {
    private final Tensor lossValue;
    private final Tensor logProbs;
    private final Tensor entropy;
    private final LossMetrics metrics;
    private final FusedLogProbs fused; // null when computed without grad
    private Tensor loss;
    private boolean closed;

    LossResult(Tensor lossValue, Tensor logProbs, Tensor entropy, LossMetrics metrics, FusedLogProbs fused) {
        this.lossValue = lossValue;
        this.logProbs = logProbs;
        this.entropy = entropy;
        this.metrics = metrics;
        this.fused = fused;
    }

    /**
     * The scalar loss (0-dim float32). When computed with grad enabled and logits that require grad,
     * it is differentiable: {@code loss().backward()}, alone or inside a larger expression, sends
     * the fused kernel's exact gradient into the logits and on through the model. Building that
     * graph reads the logits once more (a {@code sum}); {@link #backward()} avoids it.
     */
    public Tensor loss() {
        ensureOpen();
        if (loss == null) {
            loss = fused == null ? lossValue : fused.copy().attach(lossValue);
        }
        return loss;
    }

    /** The loss value, detached (0-dim float32). */
    public Tensor lossValue() {
        ensureOpen();
        return lossValue;
    }

    /** Per-token log-probs of the targets, detached, float32 {@code [B, T]} or {@code [N]}. */
    public Tensor logProbs() {
        ensureOpen();
        return logProbs;
    }

    /** Per-token entropy of the policy, detached, float32 {@code [B, T]} or {@code [N]}. */
    public Tensor entropy() {
        ensureOpen();
        return entropy;
    }

    public LossMetrics metrics() {
        ensureOpen();
        return metrics;
    }

    /** Whether the loss carries a gradient (grad was enabled and the logits require grad). */
    public boolean differentiable() {
        return fused != null;
    }

    /**
     * The direct path: computes d(loss)/d(logits) with the fused kernel (one read of the logits, one
     * write of the gradient) and calls {@code logits.backward(gradient)}, which accumulates into a
     * leaf's {@code grad} or continues through the model. Reads the logits three times in all,
     * forward included; {@code loss().backward()} reads them four times.
     */
    public void backward() {
        backward(1.0);
    }

    /** {@link #backward()} for {@code scale * loss} (gradient accumulation, loss weights). */
    public void backward(double scale) {
        ensureOpen();
        if (fused == null) {
            throw new IllegalStateException("the loss was computed without grad (no-grad mode or logits without requires_grad)");
        }
        if (!Double.isFinite(scale)) {
            throw new IllegalArgumentException("scale must be finite, got " + scale);
        }
        fused.backwardInto(scale);
    }

    private void ensureOpen() {
        if (closed) {
            throw new IllegalStateException("this LossResult is closed");
        }
    }

    /** Releases this result's tensors; idempotent. */
    @Override
    public void close() {
        if (closed) {
            return;
        }
        closed = true;
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

}
