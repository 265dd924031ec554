package dev.gspo4j.internal;

/** Element type of the logits and of their gradient: the C header's {@code gspo4j_dtype}. */
public enum LogitsDtype {
    FLOAT32(0, 4),
    BFLOAT16(1, 2),
    FLOAT16(2, 2);

    final int code;
    private final int bytes;

    LogitsDtype(int code, int bytes) {
        this.code = code;
        this.bytes = bytes;
    }

    /** Bytes per element. */
    public int bytes() {
        return bytes;
    }
}
