package dev.gspo4j.internal;

/** Where every pointer of a native call lives: the C header's {@code gspo4j_device}. */
public enum Device {
    CPU(0),
    CUDA(1);

    final int code;

    Device(int code) {
        this.code = code;
    }
}
