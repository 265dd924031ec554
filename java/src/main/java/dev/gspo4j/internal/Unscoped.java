package dev.gspo4j.internal;

import java.util.function.Supplier;
import org.bytedeco.javacpp.PointerScope;

/**
 * Keeps gspo4j's own native objects out of the caller's {@link PointerScope}. JavaCPP attaches
 * every object it allocates to the thread's innermost scope, and releases them when that scope
 * closes; a {@code LossResult} and its graph state must outlive the scope they were computed in
 * (a backward after the scope closed), and are released by their owner instead ({@code
 * LossResult.close()}, the graph's own release).
 *
 * <p>How: while the body runs, a scope of our own is the innermost, so what the body allocates is
 * attached there; it is then closed with {@link PointerScope#extend()}, which drops the scope
 * without releasing anything. Each object keeps the one reference that scope took, so its own
 * {@code close()} frees it as usual; nothing is left to a garbage collection. Temporaries the body
 * closes are freed at once, as before. Without a scope on the thread the body simply runs.
 */
public final class Unscoped {
    private Unscoped() {}

    public static <T> T call(Supplier<T> body) {
        if (PointerScope.getInnerScope() == null) {
            return body.get();
        }
        final PointerScope own = new PointerScope();
        try {
            return body.get();
        } finally {
            own.extend();
            own.close();
        }
    }

    public static void run(Runnable body) {
        call(() -> {
            body.run();
            return null;
        });
    }
}
