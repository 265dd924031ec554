package dev.gspo4j.internal;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertSame;
import static org.junit.jupiter.api.Assertions.assertTrue;

import dev.gspo4j.Gspo4jException;
import org.junit.jupiter.api.Test;

/**
 * What a failure of the native backward says. compute() has validated what the backward reads, so
 * the public API cannot provoke one; the wording is checked here directly: the caller's terms
 * first, the native message (with its C argument names) kept after it and as the cause.
 */
class FusedBackwardFailureTest {
    @Test
    void aCudaErrorPointsAtTheDeviceNotTheInputs() {
        final Gspo4jException nativeError = new Gspo4jException(5, "gspo4j_token_logprob_backward: an illegal memory access");
        final Gspo4jException e = FusedLogProbs.backwardFailure(nativeError);
        assertEquals(Gspo4jException.Status.CUDA, e.status());
        assertTrue(e.getMessage().startsWith("a CUDA error in the fused backward of the log-probs"), e.getMessage());
        assertTrue(e.getMessage().contains("[native: gspo4j_token_logprob_backward: an illegal memory access]"), e.getMessage());
        assertSame(nativeError, e.getCause());
    }

    @Test
    void anyOtherStatusIsReportedAsABug() {
        final Gspo4jException nativeError = new Gspo4jException(1, "gspo4j_token_logprob_backward: grad_logprob must not be NULL");
        final Gspo4jException e = FusedLogProbs.backwardFailure(nativeError);
        assertEquals(Gspo4jException.Status.INVALID_ARGUMENT, e.status());
        assertTrue(e.getMessage().contains("a gspo4j bug, please report it"), e.getMessage());
        assertSame(nativeError, e.getCause());
    }
}
