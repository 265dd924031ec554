package dev.gspo4j.internal;

import org.bytedeco.pytorch.Tensor;

/**
 * What a {@code LossResult} needs from the state behind its gradient, whatever the loss read: the
 * logits ({@link FusedLogProbs}) or hidden states and an lm_head ({@link FusedLinear}). Both send
 * their gradient through libtorch's engine from a graph built over the loss value.
 */
public interface LossGraph extends AutoCloseable {

    /** Another holder of the same state (for a graph, while the first stays with its result). */
    LossGraph copy();

    /**
     * The differentiable loss: {@code value} (a 0-dim float32 tensor) with the inputs attached to
     * the graph. This object then belongs to the graph, which releases it; on an exception it is
     * closed.
     */
    Tensor attach(Tensor value);

    /**
     * The direct path: the gradient of {@code scale * value}, sent through libtorch's engine at once
     * (a graph of its own, or an entry into the inputs' graphs).
     */
    void backwardInto(Tensor value, double scale);

    /** Throws {@link IllegalStateException} when something the backward reads changed since compute(). */
    void checkUnchanged();

    /** Whether a backward through any graph made from this holder has produced the gradient. */
    boolean gradientSent();

    /** What a graph's gradient hook threw (the engine passes on only its text), or null. */
    RuntimeException hookFailure();

    /** Releases every reference; idempotent. */
    @Override
    void close();
}
