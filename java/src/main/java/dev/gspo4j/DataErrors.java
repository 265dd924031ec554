package dev.gspo4j;

import java.util.HashMap;
import java.util.Map;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * Turns what the native kernels found in the data (a token id out of range, NaN/Inf, bad offsets)
 * into an {@link IllegalArgumentException} (NaN/Inf: {@link NonFiniteDataException}) in the Java API's words: the Java argument's name
 * ({@code oldLogProbs}, not {@code old_logprob}), its index as the caller's tensor has it
 * ({@code [b, t]} padded, {@code [n]} packed, not a flat offset), the value read from the Java
 * side's tensor, and the fix. The CPU and the CUDA kernels word their findings differently (a CUDA
 * kernel records an index only); both become the same message here. The native status and
 * message stay available as the cause. Anything it does not recognise keeps the native message
 * (less the CUDA path's "a CUDA kernel found" prefix).
 */
final class DataErrors {
    private static final String CUDA_PREFIX = "a CUDA kernel found ";
    private static final Pattern ARRAY_NOT_FINITE = Pattern.compile("(\\w+)\\[(\\d+)\\]( = \\S+)? is not finite.*");
    private static final Pattern TARGET_OUT_OF_RANGE = Pattern.compile("targets\\[(\\d+)\\].* is outside the vocabulary.*");
    private static final Pattern LOGITS_NOT_FINITE = Pattern.compile("logits row (\\d+)\\b.* holds NaN or Inf.*");
    private static final Pattern OFFSETS = Pattern.compile("offsets(\\[| must not decrease).*");
    private static final Pattern RLOO_GROUP_OF_ONE = Pattern.compile("RLOO needs at least 2 responses per group; the group of response (\\d+)\\b.*");

    /** How the index of a native array maps onto the Java tensor. */
    enum Axis {
        /** The token axis: {@code [b, t]} padded, {@code [n]} packed. */
        TOKENS,
        /** A one-dimensional argument: {@code [i]}. */
        FLAT
    }

    private record Name(String javaName, Tensor tensor, Axis axis) {}

    private final Map<String, Name> names = new HashMap<>();
    private final long seq; // padded: T; packed: 0
    private final String finiteHint;
    private long vocab;
    private Tensor targets;
    private Tensor mask;
    private Tensor offsets;
    private long tokens;
    private double temperature = 1;
    private Tensor groupIds;
    private boolean retained; // a retain() copy: owns its tensor references

    /**
     * @param seq T of the padded layout, 0 for the packed one
     * @param finiteHint what the caller can do about NaN/Inf, appended to such messages
     */
    DataErrors(long seq, String finiteHint) {
        this.seq = seq;
        this.finiteHint = finiteHint;
    }

    /** Names the native array {@code nativeName} as {@code javaName}, its values read from {@code tensor} (or none). */
    DataErrors name(String nativeName, String javaName, Tensor tensor, Axis axis) {
        names.put(nativeName, new Name(javaName, tensor, axis));
        return this;
    }

    DataErrors targets(Tensor targets, Tensor mask, long vocab) {
        this.targets = targets;
        this.mask = mask;
        this.vocab = vocab;
        return this;
    }

    DataErrors offsets(Tensor offsets, long tokens) {
        this.offsets = offsets;
        this.tokens = tokens;
        return this;
    }

    DataErrors groupIds(Tensor groupIds) {
        this.groupIds = groupIds;
        return this;
    }

    DataErrors temperature(double temperature) {
        this.temperature = temperature;
        return this;
    }

    /**
     * Runs a kernel call; bad data it reports becomes IllegalArgumentException with a Java message,
     * NaN/Inf its subclass {@link NonFiniteDataException}.
     */
    void run(Runnable call) {
        try {
            call.run();
        } catch (Gspo4jException e) {
            throw translate(e, "");
        }
    }

    /** A kernel's finding in the caller's terms, with {@code suffix} after the message. */
    RuntimeException translate(Gspo4jException e, String suffix) {
        return switch (e.status()) {
            case NON_FINITE -> new NonFiniteDataException(message(e.getMessage()) + suffix, e);
            case INVALID_ARGUMENT, OUT_OF_RANGE -> new IllegalArgumentException(message(e.getMessage()) + suffix, e);
            default -> e;
        };
    }

    /**
     * A copy that holds its own references to the tensors its messages read, for a check read
     * after the call's own copies are gone; {@link #close()} releases them.
     */
    DataErrors retain() {
        final DataErrors copy = new DataErrors(seq, finiteHint);
        for (Map.Entry<String, Name> e : names.entrySet()) {
            final Name n = e.getValue();
            copy.names.put(e.getKey(), new Name(n.javaName, ref(n.tensor), n.axis));
        }
        copy.vocab = vocab;
        copy.targets = ref(targets);
        copy.mask = ref(mask);
        copy.offsets = ref(offsets);
        copy.tokens = tokens;
        copy.temperature = temperature;
        copy.groupIds = ref(groupIds);
        copy.retained = true;
        return copy;
    }

    private static Tensor ref(Tensor t) {
        return t == null ? null : new Tensor(t);
    }

    /** Releases the references a {@link #retain()} copy holds; a no-op otherwise. */
    void close() {
        if (!retained) {
            return;
        }
        retained = false;
        for (Name n : names.values()) {
            if (n.tensor != null) {
                n.tensor.close();
            }
        }
        for (Tensor t : new Tensor[] {targets, mask, offsets, groupIds}) {
            if (t != null) {
                t.close();
            }
        }
    }

    /** The Java message for a native one. */
    String message(String nativeMessage) {
        final String m = nativeMessage.startsWith(CUDA_PREFIX) ? nativeMessage.substring(CUDA_PREFIX.length()) : nativeMessage;
        Matcher match = TARGET_OUT_OF_RANGE.matcher(m);
        if (match.matches() && targets != null) {
            final long index = Long.parseLong(match.group(1));
            return targetMessage(index, readLong(targets, index), mask != null && readLong(mask, index) == 0);
        }
        match = LOGITS_NOT_FINITE.matcher(m);
        if (match.matches()) {
            return "logits" + tokenIndex(Long.parseLong(match.group(1)), ", :") + " holds NaN or Inf"
                    + (temperature != 1 ? " after division by the temperature " + temperature : "") + finiteHint;
        }
        match = OFFSETS.matcher(m);
        if (match.matches() && offsets != null) {
            final String offsetsMessage = offsetsMessage(offsets, tokens);
            if (offsetsMessage != null) {
                return offsetsMessage;
            }
        }
        match = RLOO_GROUP_OF_ONE.matcher(m);
        if (match.matches()) {
            final long response = Long.parseLong(match.group(1));
            return "RLOO needs at least 2 responses per group; the group of response " + response
                    + (groupIds != null ? " (groupIds[" + response + "] = " + readLong(groupIds, response) + ")" : "")
                    + " has 1: RLOO's baseline is the mean of the others; MEAN or MEAN_STD give a group of one 0";
        }
        match = ARRAY_NOT_FINITE.matcher(m);
        if (match.matches() && match.group(1).equals("logprob")) {
            // The forward's own log-prob: -Inf for a counted token whose target logit is -Inf.
            return "the log-prob of targets" + tokenIndex(Long.parseLong(match.group(2)), "")
                    + " is not finite: a counted token whose target logit is -Inf (probability 0) or NaN" + finiteHint;
        }
        if (match.matches() && names.containsKey(match.group(1))) {
            final Name name = names.get(match.group(1));
            final long index = Long.parseLong(match.group(2));
            final String where = name.axis == Axis.TOKENS ? tokenIndex(index, "") : "[" + index + "]";
            final String value = name.tensor == null ? "" : " = " + readFloat(name.tensor, index);
            return name.javaName + where + value + " is not finite" + finiteHint;
        }
        return m;
    }

    /** {@code [b, t]} (padded) or {@code [n]} (packed) of token {@code index}, with {@code tail} before the bracket. */
    String tokenIndex(long index, String tail) {
        return seq > 0 ? "[" + index / seq + ", " + index % seq + tail + "]" : "[" + index + tail + "]";
    }

    /** The message of a token id outside [0, vocab): the same for the CPU pre-check and the CUDA kernel. */
    String targetMessage(long index, long value, boolean masked) {
        String message = "targets must be token ids in [0, " + vocab + "), got targets" + tokenIndex(index, "") + " = " + value;
        if (masked) {
            message += " at a masked position (ids are checked at masked positions too, so the kernels never read outside a row)";
        }
        if (masked || value < 0) {
            message += "; for labels that mark ignored positions (Hugging Face's -100) use LossInput.Builder.ignoreIndex(" + value
                    + "), which masks them";
        }
        return message;
    }

    /**
     * The first offset breaking {@code 0 = offsets[0] <= ... <= offsets[B] = tokens}, as the CPU
     * kernel finds it and the CUDA kernel records it, or null when they hold.
     */
    static String offsetsMessage(Tensor offsets, long tokens) {
        final long[] values = longs(offsets);
        final int batch = values.length - 1;
        for (int i = 0; i <= batch; i++) {
            final boolean bad = i == 0 ? values[0] != 0 : values[i] < values[i - 1];
            if (bad || (i == batch && values[i] != tokens)) {
                return "offsets[" + i + "] = " + values[i] + " breaks 0 = offsets[0] <= offsets[1] <= ... <= offsets[" + batch
                        + "] = N = " + tokens + " (the logits' rows): offsets must be [B + 1] non-decreasing token offsets "
                        + "from 0 to N";
            }
        }
        return null;
    }

    private static long[] longs(Tensor t) {
        try (Tensor cpu = t.cpu(); Tensor asLong = cpu.to(ScalarType.Long); Tensor contiguous = asLong.contiguous()) {
            final long[] values = new long[(int) contiguous.numel()];
            if (values.length > 0) {
                contiguous.data_ptr_long().get(values);
            }
            return values;
        }
    }

    // One element of a contiguous tensor, on the error path only (a device sync on a GPU, after
    // the one that found the error).
    private static long readLong(Tensor t, long index) {
        try (Tensor flat = t.reshape(-1); Tensor element = flat.select(0, index); Tensor asLong = element.to(ScalarType.Long)) {
            return asLong.item_long();
        }
    }

    private static float readFloat(Tensor t, long index) {
        try (Tensor flat = t.reshape(-1); Tensor element = flat.select(0, index)) {
            return element.item_float();
        }
    }
}
