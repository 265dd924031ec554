package dev.gspo4j;

/**
 * NaN or Inf found in the data of a call (with checking on): in the logits (a NaN or +Inf, or a row
 * with no finite entry), in a counted old or reference log-prob, advantage or reward, or a counted
 * token whose own log-prob is -Inf. In training this usually means divergence (a policy or a value
 * that blew up), not a programming error; catch this type to skip or roll back a step, apart from
 * argument errors.
 *
 * <p>It extends {@link IllegalArgumentException}, which gspo4j threw for such data before this type
 * existed, so code catching {@code IllegalArgumentException} still catches it. The message names
 * the Java argument and its index ({@code [b, t]} padded, {@code [n]} packed); the cause is the
 * native {@link Gspo4jException} with status {@link Gspo4jException.Status#NON_FINITE}. Shapes,
 * dtypes, devices, token ids, offsets, mask values and options stay plain
 * {@code IllegalArgumentException}s.
 */
public final class NonFiniteDataException extends IllegalArgumentException {
    private static final long serialVersionUID = 1L;

    NonFiniteDataException(String message, Gspo4jException cause) {
        super(message, cause);
    }
}
