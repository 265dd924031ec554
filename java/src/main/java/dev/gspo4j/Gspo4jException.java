package dev.gspo4j;

/**
 * A failure reported by gspo4j's native code: bad data found while reading it (a token id out of
 * range, NaN or Inf in an input), an unsupported call, or an internal error. Arguments that can be
 * checked without reading the data are rejected earlier, with {@link IllegalArgumentException}; the
 * loss modules report bad data as {@link IllegalArgumentException} too (NaN/Inf as its subclass
 * {@link NonFiniteDataException}), with this as its cause.
 */
public final class Gspo4jException extends RuntimeException {
    private static final long serialVersionUID = 1L;

    /** What kind of failure, mirroring {@code gspo4j_status} of the C header. */
    public enum Status {
        INVALID_ARGUMENT(1),
        OUT_OF_RANGE(2),
        NON_FINITE(3),
        UNSUPPORTED(4),
        CUDA(5),
        INTERNAL(6);

        private final int code;

        Status(int code) {
            this.code = code;
        }

        /** The C header's status code. */
        public int code() {
            return code;
        }

        static Status of(int code) {
            for (Status status : values()) {
                if (status.code == code) {
                    return status;
                }
            }
            return INTERNAL;
        }
    }

    private final Status status;

    public Gspo4jException(int statusCode, String message) {
        super(message);
        this.status = Status.of(statusCode);
    }

    public Status status() {
        return status;
    }
}
