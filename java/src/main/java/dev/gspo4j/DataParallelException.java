package dev.gspo4j;

/**
 * A collective of {@link DataParallel} failed or did not finish within its time-out: a rank died,
 * never joined, or is stuck in another step. The message names the operation, this rank, the
 * group's size and the time-out; the cause, where there is one, is c10d's own error. The step
 * cannot be completed on this rank: rebuild the process group (or restart the job).
 */
public final class DataParallelException extends RuntimeException {
    private static final long serialVersionUID = 1L;

    /**
     * A failure of a collective.
     *
     * @param message the operation, the rank, the group's size and the time-out
     * @param cause c10d's own error, or null
     */
    public DataParallelException(String message, Throwable cause) {
        super(message, cause);
    }
}
