package dev.gspo4j.internal;

/**
 * Rounding to bf16 / fp16 and their bit patterns, written independently of the native
 * conversions (from the formats' definitions, with Math.rint's round-half-even) so the two check
 * each other.
 */
final class Dtypes {
    private Dtypes() {}

    /** x rounded to the nearest value of dtype (ties to even), as a double. */
    static double round(LogitsDtype dtype, double x) {
        return switch (dtype) {
            case FLOAT32 -> (float) x;
            case BFLOAT16 -> roundBinary((float) x, 8, -126, Float.MAX_VALUE);
            case FLOAT16 -> roundBinary(x, 11, -14, 65504.0);
        };
    }

    /** Rounds to a binary format with `precision` significant bits and minimum normal exponent. */
    private static double roundBinary(double x, int precision, int minExponent, double max) {
        if (x == 0 || Double.isNaN(x) || Double.isInfinite(x)) {
            return x;
        }
        final int exponent = Math.max(Math.getExponent(x), minExponent);
        final double quantum = Math.scalb(1.0, exponent - (precision - 1));
        final double rounded = Math.rint(x / quantum) * quantum;
        if (Math.abs(rounded) > max) {
            return Math.copySign(Double.POSITIVE_INFINITY, x);
        }
        return rounded;
    }

    /** Bits of a value already representable in bf16. */
    static short bf16Bits(double representable) {
        return (short) (Float.floatToRawIntBits((float) representable) >>> 16);
    }

    static double fromBf16(short bits) {
        return Float.intBitsToFloat((bits & 0xffff) << 16);
    }

    /** Bits of a value already representable in fp16. */
    static short fp16Bits(double representable) {
        final int sign = (Double.doubleToRawLongBits(representable) < 0) ? 0x8000 : 0;
        final double magnitude = Math.abs(representable);
        if (Double.isNaN(representable)) {
            return (short) 0x7e00;
        }
        if (Double.isInfinite(magnitude)) {
            return (short) (sign | 0x7c00);
        }
        if (magnitude < Math.scalb(1.0, -14)) {
            return (short) (sign | (int) (magnitude / Math.scalb(1.0, -24)));
        }
        final int exponent = Math.getExponent(magnitude);
        final int mantissa = (int) (magnitude / Math.scalb(1.0, exponent - 10)) - 1024;
        return (short) (sign | ((exponent + 15) << 10) | mantissa);
    }

    static double fromFp16(short bits) {
        final int h = bits & 0xffff;
        final double sign = (h & 0x8000) != 0 ? -1 : 1;
        final int exponent = (h >> 10) & 0x1f;
        final int mantissa = h & 0x3ff;
        if (exponent == 0x1f) {
            return mantissa == 0 ? sign * Double.POSITIVE_INFINITY : Double.NaN;
        }
        if (exponent == 0) {
            return sign * mantissa * Math.scalb(1.0, -24);
        }
        return sign * (1024 + mantissa) * Math.scalb(1.0, exponent - 25);
    }

    static short bits(LogitsDtype dtype, double representable) {
        return dtype == LogitsDtype.BFLOAT16 ? bf16Bits(representable) : fp16Bits(representable);
    }

    static double fromBits(LogitsDtype dtype, short bits) {
        return dtype == LogitsDtype.BFLOAT16 ? fromBf16(bits) : fromFp16(bits);
    }
}
