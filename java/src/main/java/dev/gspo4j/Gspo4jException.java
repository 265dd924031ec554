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
        /** A pointer, size, stride or option is wrong. */
        INVALID_ARGUMENT(1),
        /** A token id outside {@code [0, V)} or a bad offset. */
        OUT_OF_RANGE(2),
        /** NaN or Inf in the data. */
        NON_FINITE(3),
        /** A call this build cannot serve (e.g. CUDA in a library built without it). */
        UNSUPPORTED(4),
        /** A CUDA error. */
        CUDA(5),
        /** A bug in gspo4j: please report it. */
        INTERNAL(6);

        private final int code;

        Status(int code) {
            this.code = code;
        }

        /**
         * The C header's status code.
         *
         * @return the {@code gspo4j_status} value
         */
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

    /** The kind of failure. */
    private final Status status;

    /**
     * A failure of the native code.
     *
     * @param statusCode the {@code gspo4j_status} the native call returned (an unknown code is
     *     {@link Status#INTERNAL})
     * @param message the native message
     */
    public Gspo4jException(int statusCode, String message) {
        super(message);
        this.status = Status.of(statusCode);
    }

    /**
     * What kind of failure it is.
     *
     * @return the status
     */
    public Status status() {
        return status;
    }
}
