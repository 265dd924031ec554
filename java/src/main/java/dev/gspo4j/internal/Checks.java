package dev.gspo4j.internal;

import org.bytedeco.javacpp.Pointer;

/** Argument checks shared by the internal layer; each message names the argument. */
final class Checks {
    private Checks() {}

    static void notNull(Object value, String name) {
        if (value == null) {
            throw new IllegalArgumentException(name + " must not be null");
        }
    }

    static void nonNegative(long value, String name) {
        if (value < 0) {
            throw new IllegalArgumentException(name + " must be >= 0, got " + value);
        }
    }

    static void finite(double value, String name) {
        if (!Double.isFinite(value)) {
            throw new IllegalArgumentException(name + " must be finite, got " + value);
        }
    }

    /**
     * Requires {@code pointer} to hold at least {@code elements} elements of its type past its
     * position, where its limit is known (JavaCPP-allocated memory). A pointer into foreign memory
     * (a tensor's data) has no limit, and the caller vouches for its size.
     */
    static void capacity(Pointer pointer, long elements, String name) {
        notNull(pointer, name);
        if (pointer.isNull() && elements > 0) {
            throw new IllegalArgumentException(name + " is a null pointer");
        }
        if (pointer.limit() > 0 && pointer.limit() - pointer.position() < elements) {
            throw new IllegalArgumentException(name + " holds " + (pointer.limit() - pointer.position())
                    + " elements, needs " + elements);
        }
    }

    /** Like {@link #capacity} but counting bytes, for untyped pointers. */
    static void capacityBytes(Pointer pointer, long bytes, String name) {
        notNull(pointer, name);
        if (pointer.isNull() && bytes > 0) {
            throw new IllegalArgumentException(name + " is a null pointer");
        }
        if (pointer.limit() > 0) {
            final long available = (pointer.limit() - pointer.position()) * pointer.sizeof();
            if (available < bytes) {
                throw new IllegalArgumentException(name + " holds " + available + " bytes, needs " + bytes);
            }
        }
    }

    static void optionalCapacity(Pointer pointer, long elements, String name) {
        if (pointer != null) {
            capacity(pointer, elements, name);
        }
    }
}
